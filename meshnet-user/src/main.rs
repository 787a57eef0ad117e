//! The `meshnet` binary: the node agent and the debugging CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use meshnet::{
    agent::{self, AgentOptions},
    config::Config,
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
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Load this eBPF object instead of the embedded one (for testing builds).
        #[arg(long, hide = true)]
        ebpf_object: Option<PathBuf>,
    },
    /// Remove everything meshnet installed: its tc programs and links on every interface,
    /// and every pin under --pin-path. Flow state is lost.
    Detach,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| "info".into()))
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
        Command::Agent { config, attach_mode, rescan_seconds, metrics_addr, ebpf_object } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(agent::run(AgentOptions {
                config,
                pins,
                attach_mode,
                rescan: Duration::from_secs_f64(rescan_seconds.max(0.05)),
                metrics_addr,
                ebpf_object,
            }))?;
        }
        Command::Detach => {
            let r = datapath::detach(&pins)?;
            println!(
                "detached: {} tcx links, {} netlink filters, {} map pins removed from {}",
                r.tcx_links,
                r.netlink_filters,
                r.pins,
                pins.root().display()
            );
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
    }
    Ok(ExitCode::SUCCESS)
}
