//! The `meshnet` binary: the node agent and the debugging CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use meshnet::discovery::{
    controller::{self, ControllerOptions},
    mesh_networks,
    resolve::{AddressType, ResolveOptions, SecretSource, REMOTE_SECRET_SELECTOR, TUNNEL_SERVICE},
    source::SourceOptions,
};
use meshnet::{
    agent::{self, AgentOptions},
    config::{Config, PeerMode},
    datapath::{self, AttachMode},
    dump,
    pins::{Pins, DEFAULT_PIN_PATH},
};

/// meshnet makes remote Kubernetes pod CIDRs reachable: a tc eBPF program sends traffic for
/// a peer cluster's pods to that cluster's east-west gateway NodePort and restores the
/// original addresses on the replies.
#[derive(Parser)]
#[command(name = "meshnet", version, about, long_about = None)]
struct Cli {
    /// bpffs directory where meshnet pins its maps and links.
    #[arg(long, global = true, env = "MESHNET_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,

    /// Log filter (tracing syntax), e.g. `info` or `meshnet=debug`.
    #[arg(long, global = true, env = "MESHNET_LOG", default_value = "info")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load the datapath, fill its maps from the config, attach to the
    /// pod interfaces, and follow changes (SIGHUP reloads the config). Stopping the agent
    /// leaves the datapath running.
    Agent {
        /// The static config file (YAML).
        #[arg(long)]
        config: PathBuf,
        /// How to attach to interfaces.
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        attach_mode: AttachMode,
        /// Seconds between interface rescans and config-file checks. Link events from
        /// netlink trigger a rescan at once; this is the safety net.
        #[arg(long, default_value_t = 1.0)]
        rescan_seconds: f64,
        /// Serve Prometheus metrics, /healthz and /readyz on this address (e.g. 0.0.0.0:9090).
        /// If it cannot be bound (a port someone else holds), the agent runs on and binds it
        /// in the background once it can; a malformed address is an error at start.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Serve /healthz and /readyz for the kubelet's exec probes (`meshnet probe`) on a Unix
        /// socket at this path, in a directory of the container's own: no client of
        /// --metrics-addr can crowd it out. Bound in the background, as --metrics-addr is.
        #[arg(long, value_name = "PATH")]
        health_socket: Option<PathBuf>,
        /// Load this eBPF object instead of the embedded one (for testing builds).
        #[arg(long, hide = true)]
        ebpf_object: Option<PathBuf>,
        /// Load the datapath's logging build: new flows, drops, refusals and translated ICMP
        /// errors are logged under the target `meshnet::datapath` (rate-limited; never an
        /// established flow's packets). Needs kernel 5.8+ (BPF ring buffers); on an older
        /// kernel the agent says so and loads the default build. Also `datapathLog: true`.
        #[arg(long)]
        datapath_log: bool,
        /// Also take peers from the Kubernetes API: the ConfigMap `meshnet-peers` that
        /// `meshnet controller` publishes, and this node's pod CIDRs. Peers in --config win
        /// over published peers of the same name.
        #[arg(long)]
        kube: bool,
        #[command(flatten)]
        kube_args: KubeArgs,
        /// This node's name (the DaemonSet passes it from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// How long to wait for another agent that holds --pin-path (a rolling update's old
        /// pod) before giving up with an error. Nothing is loaded or changed while waiting.
        #[arg(long, default_value_t = 60.0)]
        lock_wait_seconds: f64,
    },
    /// Run the cluster controller: resolve peers from Istio's remote secrets and the remote
    /// API servers, and publish them for the agents (one replica, with leader election).
    Controller {
        #[command(flatten)]
        kube_args: KubeArgs,
        #[command(flatten)]
        discovery: DiscoveryArgs,
        /// Pod CIDRs of a remote cluster whose CNI does not use node podCIDRs, as
        /// CLUSTER=CIDR[,CIDR...]; repeatable. Overrides the secret's annotation.
        #[arg(long, value_name = "CLUSTER=CIDRS", value_parser = parse_cluster_cidrs)]
        pod_cidrs: Vec<(String, Vec<ipnet::Ipv4Net>)>,
        /// This cluster's Service CIDRs (kube-apiserver's --service-cluster-ip-range),
        /// comma-separated or repeated: a peer that claims one is refused.
        #[arg(long, visible_alias = "service-cidr", value_name = "CIDR", value_delimiter = ',')]
        service_cidrs: Vec<ipnet::Ipv4Net>,
        /// The only pod CIDRs a remote cluster may claim, as CLUSTER=CIDR[,CIDR...];
        /// repeatable. A claim outside them refuses the peer. Wins over the remote secret's
        /// meshnet.io/allowed-cidrs annotation.
        #[arg(long, value_name = "CLUSTER=CIDRS", value_parser = parse_cluster_cidrs)]
        allowed_cidrs: Vec<(String, Vec<ipnet::Ipv4Net>)>,
        /// The Service whose UDP nodePort is a remote cluster's tunnel port, read from the
        /// remote's namespace of --namespace's name (tunnel-mode remotes only).
        #[arg(long, default_value = TUNNEL_SERVICE)]
        tunnel_service: String,
        /// Seconds between probes of each remote API server; a failed probe marks the peer
        /// stale (its last known state stays published).
        #[arg(long, default_value_t = 5)]
        probe_interval_seconds: u64,
        #[arg(long, default_value_t = 3)]
        probe_timeout_seconds: u64,
        /// Take the Lease `meshnet-controller` before publishing.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// This replica's identity in the lease.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a lease holds without renewal before another replica takes over.
        #[arg(long, default_value_t = 15)]
        lease_duration_seconds: u64,
        /// Serve Prometheus metrics, /healthz and /readyz (503 while a peer is stale).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Serve /healthz and /readyz for the kubelet's exec probes (`meshnet probe`) on a Unix
        /// socket at this path, in a directory of the container's own: no client of
        /// --metrics-addr can crowd it out. Bound in the background, as --metrics-addr is.
        #[arg(long, value_name = "PATH")]
        health_socket: Option<PathBuf>,
    },
    /// Print Istio's meshNetworks for the mesh from discovery (the block operators used to
    /// hand-edit in every cluster); --apply writes it into the istio ConfigMap.
    MeshNetworks {
        #[command(flatten)]
        kube_args: KubeArgs,
        #[command(flatten)]
        discovery: DiscoveryArgs,
        /// This cluster's name in the mesh (Istio's multiCluster.clusterName).
        #[arg(long, env = "MESHNET_CLUSTER")]
        cluster: String,
        #[arg(long, short, value_enum, default_value_t = MeshOutput::Yaml)]
        output: MeshOutput,
        /// Patch the istio ConfigMap's meshNetworks key, keeping every other key.
        #[arg(long)]
        apply: bool,
    },
    /// Remove everything meshnet installed: its tc programs and links on every interface,
    /// and every pin under --pin-path. Flow state is lost.
    Detach {
        /// After detaching, print the result and wait for SIGTERM or SIGINT, then exit 0 (for
        /// a DaemonSet's pod, which must not exit). A failed detach exits 1 at once, so that
        /// the kubelet runs it again.
        #[arg(long)]
        then_wait: bool,
    },
    /// Ask a running agent's or controller's --health-socket for /healthz or /readyz: the
    /// manifests' exec probes. Prints the answer; exits 0 on a 200, 1 otherwise (no answer
    /// within --timeout-seconds included).
    Probe {
        #[arg(value_enum)]
        what: ProbeWhat,
        /// The --health-socket of the agent or controller.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Give up (exit 1) after this long: Kubernetes before 1.20 does not time exec probes
        /// out, so a probe must end by itself, within the probe's timeoutSeconds.
        #[arg(long, default_value_t = 2.0)]
        timeout_seconds: f64,
    },
    /// Validate a config file and print what the datapath would hold, without touching it.
    Check {
        /// The static config file (YAML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Read the pinned maps (no running agent needed).
    Maps {
        #[command(subcommand)]
        command: MapsCommand,
    },
    /// Say what the datapath does with a packet a pod sends, and why.
    ///
    /// Shows the flow-state entry that matches or, for a new flow, the route, the peer's
    /// gateways and their health, the gateway the flow is pinned to and whether its source
    /// port gets remapped. Reads the pinned maps; no running agent needed. Exits with status
    /// 2 when a map cannot be read.
    Explain {
        /// The sending pod: IP, or IP:PORT to match its flow exactly (without the port, every
        /// live flow from the IP to the destination is listed).
        #[arg(value_name = "SRC_IP[:PORT]")]
        src: meshnet::explain::Source,
        /// The destination the pod sends to, as IP:PORT.
        #[arg(value_name = "DST_IP:PORT", value_parser = meshnet::explain::parse_destination)]
        dst: std::net::SocketAddrV4,
        /// Transport protocol.
        #[arg(long, value_enum, default_value_t = meshnet::explain::Proto::Tcp)]
        proto: meshnet::explain::Proto,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = meshnet::explain::Output::Text)]
        output: meshnet::explain::Output,
        /// Tunnel mode: explain what this node does with a tunnel packet from this peer node
        /// (its outer source address) carrying the packet, instead of what a local pod's
        /// packet meets.
        #[arg(long, value_name = "NODE_IP")]
        from_node: Option<std::net::Ipv4Addr>,
    },
    /// Check that this node can run meshnet.
    ///
    /// Checks the kernel version and features, the bpffs, the capabilities and, with
    /// --config, the config, its interfaces and the masquerade of pod traffic. Prints one line
    /// per check with a fix for each problem; exits with status 1 when a check fails.
    Doctor {
        /// Also check this config file (YAML) and what it refers to on this node.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// How to reach the local cluster's API server.
#[derive(clap::Args, Clone)]
struct KubeArgs {
    /// A kubeconfig for the local cluster; in-cluster config when absent.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// meshnet's namespace, where the peers ConfigMap and the controller's lease live.
    #[arg(long, default_value = "meshnet")]
    namespace: String,
}

/// Where Istio keeps its remote secrets and east-west gateway, and how to read them.
#[derive(clap::Args, Clone)]
struct DiscoveryArgs {
    /// Istio's namespace (remote secrets, the gateway Service, the istio ConfigMap).
    #[arg(long, default_value = "istio-system")]
    istio_namespace: String,
    /// The east-west gateway Service.
    #[arg(long, default_value = "istio-eastwestgateway")]
    gateway_service: String,
    /// The Service port whose nodePort carries mesh traffic.
    #[arg(long, default_value = "tls")]
    gateway_port_name: String,
    /// Which node address gateways are reached at (a node's meshnet.io/gateway-address
    /// annotation overrides it).
    #[arg(long, value_enum, default_value_t = AddressType::InternalIp)]
    address_type: AddressType,
    /// Namespace of the secrets holding the remote clusters' kubeconfigs; defaults to
    /// --istio-namespace (Istio's own remote secrets).
    #[arg(long)]
    remote_secret_namespace: Option<String>,
    /// Label selector of those secrets.
    #[arg(long, default_value = REMOTE_SECRET_SELECTOR)]
    remote_secret_selector: String,
    /// How a remote cluster's pods are reached, as CLUSTER=gateway|tunnel; repeatable. Wins
    /// over the remote secret's meshnet.io/mode annotation.
    #[arg(long = "mode", value_name = "CLUSTER=MODE", value_parser = parse_cluster_mode)]
    modes: Vec<(String, PeerMode)>,
    /// The mode of a remote cluster with neither --mode nor the annotation: gateway (through
    /// its east-west gateway) or tunnel (encapsulated to the node that hosts the pod).
    #[arg(long, value_name = "MODE", value_parser = parse_mode, default_value = "gateway")]
    default_mode: PeerMode,
}

impl DiscoveryArgs {
    fn secrets(&self) -> SecretSource {
        SecretSource {
            namespace: self.remote_secret_namespace.clone().unwrap_or_else(|| self.istio_namespace.clone()),
            selector: self.remote_secret_selector.clone(),
        }
    }

    fn resolve(&self) -> ResolveOptions {
        ResolveOptions {
            gateway_service: self.gateway_service.clone(),
            gateway_port_name: self.gateway_port_name.clone(),
            address_type: self.address_type,
            ..ResolveOptions::default()
        }
    }

    fn modes(&self) -> std::collections::BTreeMap<String, PeerMode> {
        self.modes.iter().cloned().collect()
    }
}

fn parse_mode(s: &str) -> Result<PeerMode, String> {
    match s {
        "gateway" => Ok(PeerMode::Gateway),
        "tunnel" => Ok(PeerMode::Tunnel),
        _ => Err(format!("{s:?}: expected gateway or tunnel")),
    }
}

fn parse_cluster_mode(s: &str) -> Result<(String, PeerMode), String> {
    let (cluster, mode) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected CLUSTER=gateway or CLUSTER=tunnel"))?;
    Ok((cluster.to_string(), parse_mode(mode)?))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProbeWhat {
    Healthz,
    Readyz,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MeshOutput {
    Yaml,
    Json,
}

fn parse_cluster_cidrs(s: &str) -> Result<(String, Vec<ipnet::Ipv4Net>), String> {
    let (cluster, cidrs) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected CLUSTER=CIDR[,CIDR]"))?;
    let nets = cidrs
        .split(',')
        .map(|c| c.trim().parse::<ipnet::Ipv4Net>().map_err(|_| format!("{c:?} is not a valid IPv4 CIDR")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((cluster.to_string(), nets))
}

#[derive(Subcommand)]
enum MapsCommand {
    /// Print routes, gateways, flow state or counters.
    Dump {
        /// Which maps.
        #[arg(value_enum, default_value_t = dump::What::All)]
        what: dump::What,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = dump::Output::Table)]
        output: dump::Output,
    },
}

/// The log filter `text` asks for. kube's own warnings quote a remote API server's answers
/// whole (a body that is not JSON, a refusal's Status), so a remote could write lines of its
/// choosing into the controller's log; meshnet logs those failures itself, cut and escaped
/// (`discovery::remote_text`). Unless the filter names kube's crate, it logs only its errors.
fn log_filter(text: &str) -> tracing_subscriber::EnvFilter {
    let mut filter = tracing_subscriber::EnvFilter::try_new(text).unwrap_or_else(|_| "info".into());
    for target in ["kube_client", "kube_runtime"] {
        if !text.contains(target) {
            filter = filter.add_directive(format!("{target}=error").parse().expect("a valid directive"));
        }
    }
    filter
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&cli.log_level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let pins = Pins::new(&cli.pin_path);
    match cli.command {
        Command::Agent {
            config,
            attach_mode,
            rescan_seconds,
            metrics_addr,
            health_socket,
            ebpf_object,
            datapath_log,
            kube,
            kube_args,
            node_name,
            lock_wait_seconds,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(agent::run(AgentOptions {
                config,
                pins,
                attach_mode,
                rescan: Duration::from_secs_f64(rescan_seconds.max(0.05)),
                metrics_addr,
                health_socket,
                ebpf_object,
                datapath_log,
                kube: kube.then_some(SourceOptions { kubeconfig: kube_args.kubeconfig, namespace: kube_args.namespace, node_name }),
                lock_wait: Duration::from_secs_f64(lock_wait_seconds.max(0.0)),
            }))?;
        }
        Command::Controller {
            kube_args,
            discovery,
            pod_cidrs,
            service_cidrs,
            allowed_cidrs,
            tunnel_service,
            probe_interval_seconds,
            probe_timeout_seconds,
            leader_election,
            identity,
            lease_duration_seconds,
            metrics_addr,
            health_socket,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(controller::run(ControllerOptions {
                kubeconfig: kube_args.kubeconfig,
                namespace: kube_args.namespace,
                istio_namespace: discovery.istio_namespace.clone(),
                secrets: discovery.secrets(),
                resolve: ResolveOptions { tunnel_service, ..discovery.resolve() },
                modes: discovery.modes(),
                default_mode: discovery.default_mode,
                pod_cidrs: pod_cidrs.into_iter().collect(),
                service_cidrs,
                allowed_cidrs: allowed_cidrs.into_iter().fold(std::collections::BTreeMap::new(), |mut m, (cluster, nets)| {
                    m.entry(cluster).or_insert_with(Vec::new).extend(nets);
                    m
                }),
                probe_interval: Duration::from_secs(probe_interval_seconds.max(1)),
                probe_timeout: Duration::from_secs(probe_timeout_seconds.max(1)),
                leader_election,
                identity: identity.unwrap_or_else(|| {
                    nix::unistd::gethostname().map_or_else(|_| "meshnet-controller".into(), |h| h.to_string_lossy().into_owned())
                }),
                lease_duration: Duration::from_secs(lease_duration_seconds.max(1)),
                metrics_addr,
                health_socket,
            }))?;
        }
        Command::MeshNetworks { kube_args, discovery, cluster, output, apply } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let opts = mesh_networks::Options {
                kubeconfig: kube_args.kubeconfig,
                istio_namespace: discovery.istio_namespace.clone(),
                secrets: discovery.secrets(),
                resolve: discovery.resolve(),
                cluster,
                modes: discovery.modes(),
                default_mode: discovery.default_mode,
            };
            rt.block_on(async {
                let generated = mesh_networks::generate(&opts).await?;
                // The notes stay out of what --apply writes and of the JSON, which scripts
                // hand to Istio as it is.
                match output {
                    MeshOutput::Yaml => {
                        for n in &generated.notes {
                            println!("# {n}");
                        }
                        print!("{}", generated.networks.to_yaml());
                    }
                    MeshOutput::Json => {
                        for n in &generated.notes {
                            eprintln!("{n}");
                        }
                        println!("{}", serde_json::to_string_pretty(&generated.networks)?);
                    }
                }
                if apply {
                    mesh_networks::apply(&opts.istio_namespace, &generated).await?;
                    eprintln!("applied to {}/istio (key meshNetworks)", opts.istio_namespace);
                }
                anyhow::Ok(())
            })?;
        }
        Command::Detach { then_wait } => {
            // A running agent would attach again at its next rescan, so detaching under it
            // would only leave the node half done.
            let running = |path: &str, holder: &str| {
                anyhow::anyhow!(
                    "a meshnet agent{holder} is running on {path}; stop it first (delete the DaemonSet, \
                     or kill the process), then detach"
                )
            };
            let lock = pins.root().is_dir().then(|| pins.prepare().map(|()| pins.lock(Duration::ZERO, |_| {})));
            let lock_guard = match lock.transpose()?.transpose() {
                Err(meshnet::pins::LockError::Held { path, holder, .. }) => return Err(running(&path, &holder)),
                r => r?,
            };
            let r = datapath::detach(&pins)?;
            println!(
                "detached: {} tcx links, {} netlink filters, {} map pins removed from {}",
                r.tcx_links,
                r.netlink_filters,
                r.pins,
                pins.root().display()
            );
            for (path, what) in &r.left {
                println!("left {}: {what}", path.display());
            }
            if r.still_attached > 0 {
                println!(
                    "{} hooks still ran meshnet's unpinned links after {:?}: the kernel detaches them when it \
                     gets to it (a busy RTNL lock)",
                    r.still_attached,
                    datapath::DETACH_WAIT
                );
            }
            // Not held while it waits: an agent installed again must not wait for this pod to go.
            drop(lock_guard);
            if then_wait {
                println!("waiting for SIGTERM");
                wait_for_termination()?;
            }
        }
        Command::Probe { what, socket, timeout_seconds } => {
            let path = match what {
                ProbeWhat::Healthz => "/healthz",
                ProbeWhat::Readyz => "/readyz",
            };
            // Bounded both ways: an `inf` or a NaN must not panic the probe.
            let timeout = Duration::try_from_secs_f64(timeout_seconds.clamp(0.1, 60.0)).unwrap_or(Duration::from_secs(2));
            match meshnet::metrics::probe(&socket, path, timeout) {
                Ok(body) => print!("{body}"),
                Err(why) => anyhow::bail!("{why}"),
            }
        }
        Command::Check { config } => {
            let c = Config::load(&config)?;
            let d = c.desired();
            println!("{}: valid; cluster {}, {} peers, {} routes", config.display(), c.cluster, c.peers.len(), d.routes.len());
            for p in &c.peers {
                let cidrs: Vec<String> = p.pod_cidrs.iter().map(ToString::to_string).collect();
                let gws: Vec<String> = p
                    .gateways
                    .iter()
                    .map(|g| format!("{}:{}{}", g.address, g.port, g.udp_port.map(|u| format!("/udp:{u}")).unwrap_or_default()))
                    .collect();
                println!("  peer {}: {} via {}", p.name, cidrs.join(", "), gws.join(", "));
            }
        }
        Command::Maps { command: MapsCommand::Dump { what, output } } => {
            let d = dump::collect(&pins, what);
            match output {
                dump::Output::Table => print!("{}", dump::table(&d)),
                dump::Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
            }
            if !d.missing.is_empty() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Explain { src, dst, proto, output, from_node } => {
            use meshnet::explain;
            let snapshot = explain::Snapshot::load(&pins, src.addr);
            let q = explain::Query { src, dst, proto };
            let e = match from_node {
                Some(node) => explain::explain_decap(&snapshot, node, &q),
                None => explain::explain(&snapshot, &q),
            };
            match output {
                explain::Output::Text => print!("{}", e.text()),
                explain::Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
            }
            if !e.missing.is_empty() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Doctor { config } => {
            let checks = meshnet::doctor::run(&pins, config.as_deref());
            print!("{}", meshnet::doctor::render(&checks));
            if meshnet::doctor::failed(&checks) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for SIGTERM or SIGINT without spinning. A handler of the runtime's, not the default
/// action: as a container's process 1, the kernel would drop a signal it has no handler for.
fn wait_for_termination() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async {
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn kube_logs_only_its_errors_unless_asked() {
        for (text, client, runtime) in [
            ("info", true, true),
            ("debug", true, true),
            ("not a filter[", true, true),
            ("info,meshnet::discovery::kubeconfig=debug", true, true),
            ("info,kube_client=debug", false, true),
        ] {
            let f = log_filter(text).to_string();
            assert_eq!((f.contains("kube_client=error"), f.contains("kube_runtime=error")), (client, runtime), "{text}: {f}");
        }
    }
}
