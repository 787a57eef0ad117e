//! The node agent: load, sync the maps to the config, attach to the pod interfaces, then
//! follow the config, the interfaces and the gateways' health, and expire idle flows, until
//! told to stop. Stopping leaves the datapath in place; `meshnet detach` removes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use ipnet::Ipv4Net;
use meshnet_common::PodPort;

use crate::{
    config::{Config, ConfigError, Desired, KeptLocal, RawConfig, RawPeer},
    discovery::{
        published::{Published, PublishedEntry, PEERS_CONFIGMAP},
        source::{self, ApiUpdate, SourceOptions},
    },
    datapath::{detach_interface, index_name, interface_globs, matching_interfaces, move_pins, AttachMode, Datapath},
    datapath_log,
    dump::monotonic_ns,
    health::{self, GatewayId, Health},
    maps::ControlMaps,
    metrics::{self, GatewayLabel, Metrics, ResultLabel},
    netlink::{self, LinkEvents},
    pins::Pins,
    tunnel::{self, TunnelMaps},
};

pub struct AgentOptions {
    pub config: PathBuf,
    pub pins: Pins,
    pub attach_mode: AttachMode,
    /// How often interfaces are rescanned besides netlink link events, and how often the
    /// config file is checked for changes.
    pub rescan: Duration,
    pub metrics_addr: Option<SocketAddr>,
    /// A Unix socket for the probes' `/healthz` and `/readyz` (`metrics::serve_health`).
    pub health_socket: Option<PathBuf>,
    /// An eBPF object to load instead of the embedded one.
    pub ebpf_object: Option<PathBuf>,
    /// Load the logging build of the datapath (also asked for by the config's `datapathLog`).
    pub datapath_log: bool,
    /// Also follow peers published through the Kubernetes API.
    pub kube: Option<SourceOptions>,
    /// How long to wait for another agent holding the pin directory.
    pub lock_wait: Duration,
}

/// The published peers as the agent follows them: peer by peer, so that one the agent
/// cannot read or validate keeps its last good state and costs nothing else.
#[derive(Debug, Default)]
struct ApiPeers {
    /// Whether a readable peer list was seen (always, without --kube). Until then the
    /// pinned maps keep serving as they are: nothing is withdrawn on an empty start.
    heard: bool,
    /// The newest published version of each peer; `None` when its entry is unreadable.
    latest: BTreeMap<String, Option<RawPeer>>,
    /// The last publish had an entry without a readable name, so a peer missing from it
    /// may be that entry: nothing is withdrawn on its strength.
    incomplete: bool,
    /// The version of each published peer that the maps hold (after a restart: what the
    /// pinned maps hold).
    last_good: BTreeMap<String, RawPeer>,
    /// Why entries could not be read, by peer name (or `peers[i]`).
    unreadable: BTreeMap<String, String>,
    /// Why published peers were refused by validation, by name.
    refused: BTreeMap<String, String>,
    /// Why the object as a whole cannot be used (missing, unreadable).
    object: Option<String>,
    /// What was reported last, so each problem is logged once.
    reported: BTreeMap<String, String>,
    /// The addresses of this node that published peers keep, as last logged (each once).
    kept: BTreeSet<KeptLocal>,
    /// What the maps held for each peer at the last read that worked (see `config::Held`).
    held: BTreeMap<String, crate::config::Held>,
}

impl ApiPeers {
    /// A publish: only a readable list changes what is wanted, and only it may withdraw.
    fn published(&mut self, p: Published) {
        match p {
            Published::Missing => {
                self.object = Some(format!(
                    "ConfigMap {PEERS_CONFIGMAP} does not exist (deleted, or not published yet); keeping the last good peers"
                ));
            }
            Published::Unreadable(e) => {
                self.object = Some(format!("ConfigMap {PEERS_CONFIGMAP} is unreadable: {e}; keeping the last good peers"));
            }
            Published::Entries(entries) => {
                self.object = None;
                self.heard = true;
                self.latest.clear();
                self.unreadable.clear();
                self.incomplete = false;
                for e in entries {
                    match e {
                        PublishedEntry::Peer(p) => {
                            self.latest.insert(p.name.clone(), Some(p));
                        }
                        PublishedEntry::Bad { name: Some(name), error, .. } => {
                            self.unreadable.insert(name.clone(), error);
                            self.latest.entry(name).or_insert(None);
                        }
                        PublishedEntry::Bad { index, name: None, error } => {
                            self.unreadable.insert(format!("peers[{index}]"), error);
                            self.incomplete = true;
                        }
                    }
                }
            }
        }
    }

    /// Each peer's versions to try, newest first, then the last good one.
    fn candidates(&self) -> BTreeMap<String, Vec<RawPeer>> {
        let mut out: BTreeMap<String, Vec<RawPeer>> = BTreeMap::new();
        for (name, newest) in &self.latest {
            let v: Vec<RawPeer> = newest.iter().chain(self.last_good.get(name)).cloned().collect();
            out.insert(name.clone(), v);
        }
        if self.incomplete {
            for (name, p) in &self.last_good {
                out.entry(name.clone()).or_insert_with(|| vec![p.clone()]);
            }
        }
        out
    }

    /// Each published peer's last good version, as the only one to try.
    fn pinned(&self) -> BTreeMap<String, Vec<RawPeer>> {
        self.last_good.iter().map(|(name, p)| (name.clone(), vec![p.clone()])).collect()
    }

    /// Every current problem, by peer (or `object`), worded for a log line and /readyz.
    fn problems(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(o) = &self.object {
            out.insert(String::new(), o.clone());
        }
        let kept = |name: &str| {
            if self.last_good.contains_key(name) {
                "keeping its last good state"
            } else {
                "not applied"
            }
        };
        for (name, e) in &self.unreadable {
            out.insert(name.clone(), format!("published peer {name:?} is unreadable ({e}); {}", kept(name)));
        }
        for (name, e) in &self.refused {
            out.insert(name.clone(), format!("published peer {name:?} refused: {e}; {}", kept(name)));
        }
        out
    }
}

struct Agent {
    opts: AgentOptions,
    /// The effective config: the file merged with what the API published.
    config: Config,
    config_text: String,
    /// The file as parsed, before the API's peers are merged in.
    file: RawConfig,
    /// What the API published, and what of it the maps hold.
    api: ApiPeers,
    node_cidrs: Vec<Ipv4Net>,
    datapath: Datapath,
    maps: ControlMaps,
    /// The last flow clock publish failed (logged once until one succeeds).
    clock_failed: bool,
    /// Attached interfaces with the index each had then: a name can come back as another
    /// device (a pod re-created between two events) and a device can be renamed.
    attached: BTreeMap<String, u32>,
    health: Health,
    /// Down gateways past their grace period whose flows the last sync purged.
    evicted: BTreeSet<GatewayId>,
    metrics: Arc<Metrics>,
    tunnel: TunnelMaps,
    /// The desired state of the last sync, whose tunnel part each rescan re-applies with
    /// fresh paths to the peer nodes.
    desired: Desired,
    /// Uplinks with the decapsulating program, and their index then (as `attached`).
    uplinks: BTreeMap<String, u32>,
    /// Pod interfaces and uplinks whose last attach failed while an earlier agent's programs
    /// were on them: those run on, with the maps they were loaded with, so a migration
    /// away from those maps waits for them.
    behind: BTreeSet<String>,
    uplinks_behind: BTreeSet<String>,
    /// The interfaces a migration's wait was last logged for, and when.
    migration_wait_logged: Option<(Vec<String>, Instant)>,
    /// Peer nodes without a route from here, as last reported.
    unresolved: Vec<std::net::Ipv4Addr>,
    /// When the peer nodes' neighbour entries were last refreshed (kernels without
    /// `bpf_redirect_neigh`; see `tunnel::warm_neighbours`).
    neighbours_warmed: Option<Instant>,
    /// What the kernel said of each attached pod interface (by the index of its host side;
    /// `None`: no veth) and when, for the tunnel's port table.
    pod_ports: BTreeMap<u32, (Option<netlink::VethPeer>, Instant)>,
    /// Each pod address's interface as the last rescan read them (see `sync_ports`).
    port_owners: BTreeMap<std::net::Ipv4Addr, u32>,
    /// Addresses two pod interfaces claim, left out of the port table (as last reported).
    port_conflicts: BTreeSet<std::net::Ipv4Addr>,
    /// Whether a failed read of a pod interface was logged at warning level (once a run).
    port_read_warned: bool,
}

/// How often the peer nodes' neighbour entries are refreshed where the datapath cannot
/// resolve them itself: well within the kernel's default `gc_stale_time` (60 s).
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(15);

/// How often a migration that waits on interfaces says so again.
const MIGRATION_WAIT_LOG: Duration = Duration::from_mins(10);

/// How often a pod interface's addresses are read again. One without an IPv4 address yet (the
/// CNI plugin creates the interface before it configures it) is read at every rescan.
const POD_REREAD: Duration = Duration::from_secs(10);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    // Taken first: a SIGTERM while the agent waits (for the pin lock, for its Node) stops it
    // before it loads anything; one while it loads and attaches, or right after it said it
    // is ready, stops it cleanly once it has started, instead of killing it half-way.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // A bad config fails here, before anything is loaded or attached.
    let (file, config_text) = RawConfig::load(&opts.config)?;
    let config = file.validated_on(&opts.config.display().to_string(), &netlink::local_addresses())?;
    // One agent per pin directory, held until this process exits.
    opts.pins.prepare()?;
    let pins = opts.pins.clone();
    let wait = opts.lock_wait;
    let lock = tokio::task::spawn_blocking(move || {
        pins.lock(wait, |holder| warn!(pin_path = %pins.root().display(), "another meshnet agent{holder} holds the pin directory; waiting for it to stop"))
    });
    let Some(held) = unless_stopped(lock, &mut term, &mut int).await else {
        stopped_before_start("waiting for the pin directory");
        return Ok(());
    };
    let _pin_lock = held??;
    let wanted = opts.datapath_log || config.datapath_log;
    let node_asks = match &opts.kube {
        Some(src) if !wanted => {
            let Some(asks) = unless_stopped(source::node_asks_for_datapath_log(src), &mut term, &mut int).await else {
                stopped_before_start("reading this node's annotations");
                return Ok(());
            };
            asks
        }
        _ => false,
    };
    let (choice, why_not) = datapath_log::choose_here(wanted || node_asks);
    if let Some(why) = why_not {
        warn!("{why}");
    }
    let object = match &opts.ebpf_object {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let (max_flows, too_small) = crate::migrate::room_for_pinned(&opts.pins, config.max_flows);
    if let Some(why) = too_small {
        error!("{why}");
    }
    let load = |choice| match &object {
        Some(object) => Datapath::load_object(&opts.pins, max_flows, object, choice),
        None => Datapath::load(&opts.pins, max_flows, choice),
    };
    let mut datapath = match load(choice) {
        Ok(dp) => dp,
        // Logging is a debugging aid: a kernel that refuses its build still gets the datapath.
        Err(e) if choice != datapath_log::Choice::Default => {
            warn!(error = %format!("{e:#}"), "the datapath's logging build did not load; loading the default build, without datapath logs");
            load(datapath_log::Choice::Default)?
        }
        Err(e) => return Err(e),
    };
    let mut maps = ControlMaps::open(&opts.pins)?;
    let tunnel = TunnelMaps::open(&opts.pins)?;
    // Before any program of this build is attached, so that its first flows get this
    // clock's stamps.
    maps.publish_clock(monotonic_ns())?;
    let health = Health::from_pinned(&maps.current_peers()?);
    let metrics = Arc::new(Metrics::new(opts.pins.clone()));
    // Before any program is attached, so that no line of this build's is written unread.
    datapath_log::spawn(&mut datapath.ebpf, metrics.clone())?;
    // Bound in the background: a port or socket taken by someone else must not keep the
    // datapath from being attached.
    if let Some(addr) = opts.metrics_addr {
        tokio::spawn(metrics::serve_on(addr, metrics.clone()));
    }
    if let Some(path) = opts.health_socket.clone() {
        tokio::spawn(metrics::serve_health_on(path, metrics.clone()));
    }
    let (api_tx, mut api_rx) = mpsc::channel::<ApiUpdate>(16);
    if let Some(src) = opts.kube.clone() {
        source::spawn(src, api_tx).await.context("--kube")?;
    }
    let mut api = ApiPeers { heard: opts.kube.is_none(), ..ApiPeers::default() };
    if opts.kube.is_some() {
        // What the maps hold is each published peer's last good state, until a readable
        // publish says otherwise.
        api.last_good = maps.pinned_peers(Some(&tunnel)).unwrap_or_default();
        api.last_good.retain(|name, _| !file.peers.iter().any(|p| &p.name == name));
    }
    let mut agent = Agent {
        opts,
        config,
        config_text,
        file,
        api,
        node_cidrs: Vec::new(),
        datapath,
        maps,
        clock_failed: false,
        attached: BTreeMap::new(),
        health,
        evicted: BTreeSet::new(),
        metrics,
        tunnel,
        desired: Desired::default(),
        uplinks: BTreeMap::new(),
        behind: BTreeSet::new(),
        uplinks_behind: BTreeSet::new(),
        migration_wait_logged: None,
        unresolved: Vec::new(),
        neighbours_warmed: None,
        pod_ports: BTreeMap::new(),
        port_owners: BTreeMap::new(),
        port_conflicts: BTreeSet::new(),
        port_read_warned: false,
    };
    let started = (|| -> anyhow::Result<()> {
        if agent.api.heard {
            agent.sync().context("filling the maps")?;
        } else {
            // Until the API has been heard, the published peers in the pinned maps (from
            // before a restart) keep serving as they are: nothing is withdrawn on the strength
            // of an empty start. The file's own peers apply now.
            info!("waiting for the published peers; applying the file's peers over the pinned state");
            agent.api.object = Some(format!("waiting for ConfigMap {PEERS_CONFIGMAP}"));
            if !agent.apply_effective("start") {
                anyhow::bail!("the config cannot be applied over the pinned state");
            }
        }
        agent.rescan_interfaces()?;
        agent.settle_migration().context("migrating the old maps")
    })();
    if let Err(e) = started {
        // A start that failed is often rolled back to an older agent, as a stop is.
        agent.empty_node_slots();
        return Err(e);
    }
    // Once this build's programs run: see ControlMaps::note_unanswered_at_start.
    let noted = agent.maps.note_unanswered_at_start();
    if noted > 0 {
        info!(flows = noted, "flows of before this start count as answered");
    }
    if agent.attached.is_empty() {
        warn!(patterns = ?agent.config.interfaces, "no interface matches yet; waiting for one to appear");
    }
    agent.metrics.ready.store(true, Ordering::Relaxed);
    info!(pin_path = %agent.opts.pins.root().display(), interfaces = ?agent.attached.keys().collect::<Vec<_>>(), "meshnet agent ready");

    let links = match LinkEvents::new() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "no netlink link events; relying on periodic rescans");
            None
        }
    };
    let mut tick = tokio::time::interval(agent.opts.rescan);
    let mut gc = tokio::time::interval(agent.config.gc.interval);
    let mut probe_tick = tokio::time::interval(agent.config.health.interval);
    // Its ticks go unpolled for as long as no probe round is due (probes off, nothing
    // retiring) or one is running: a burst of every missed tick would then follow.
    probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (probe_tx, mut probe_rx) = mpsc::channel::<Vec<(GatewayId, bool)>>(4);
    let mut probing = false;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            due = heartbeat.tick() => {
                agent.metrics.pulse.beat(due.into_std());
                agent.publish_clock();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => agent.reload("SIGHUP"),
            r = async { links.as_ref().unwrap().changed().await }, if links.is_some() => {
                if let Err(e) = r {
                    warn!(error = %e, "reading link events");
                }
                agent.rescan_logged();
            }
            _ = tick.tick() => {
                agent.reload_if_changed();
                agent.rescan_logged();
            }
            _ = gc.tick() => agent.collect_garbage(),
            _ = probe_tick.tick(), if !probing && (agent.config.health.enabled || agent.maps.retiring()) => {
                if !agent.config.health.enabled {
                    // No probe rounds, yet flows still use a gateway gone from its peer's list:
                    // the grace period runs, and their answers are then looked at, all the same.
                    if let Err(e) = agent.sync() {
                        error!(error = %format!("{e:#}"), "looking at the flows of removed gateways failed");
                    }
                    continue;
                }
                probing = true;
                let targets = Health::targets(&agent.config);
                let timeout = agent.config.health.timeout;
                let tx = probe_tx.clone();
                tokio::spawn(async move {
                    let mut set = tokio::task::JoinSet::new();
                    for gw in targets {
                        set.spawn(async move { (gw, health::probe(gw, timeout).await) });
                    }
                    let results = set.join_all().await;
                    let _ = tx.send(results).await;
                });
            }
            Some(results) = probe_rx.recv() => {
                probing = false;
                agent.apply_probes(&results);
            }
            Some(update) = api_rx.recv() => agent.api_update(update),
        }
    }
    agent.empty_node_slots();
    info!("stopping; the datapath stays in place (`meshnet detach` removes it)");
    Ok(())
}

/// `fut`'s output, or `None` when SIGTERM or SIGINT comes first.
async fn unless_stopped<T>(fut: impl std::future::Future<Output = T>, term: &mut Signal, int: &mut Signal) -> Option<T> {
    tokio::select! {
        out = fut => Some(out),
        _ = term.recv() => None,
        _ = int.recv() => None,
    }
}

/// What the agent says when told to stop before it loaded anything.
fn stopped_before_start(while_: &str) {
    info!("stopped while {while_}; nothing was loaded or changed");
}

impl Agent {
    /// Before the agent exits: an older agent started next would keep the routes without
    /// knowing the slots, which this build's programs, attached until it swaps them, trust.
    fn empty_node_slots(&mut self) {
        if let Err(e) = self.tunnel.empty_node_slots() {
            warn!(error = %format!("{e:#}"), "could not empty the tunnel nodes' slots before stopping");
        }
    }

    /// Merges what the API published with the file and applies what is valid.
    fn api_update(&mut self, update: ApiUpdate) {
        match update {
            ApiUpdate::Peers(published) => {
                let readable = matches!(published, Published::Entries(_));
                self.api.published(published);
                if readable {
                    info!(peers = ?self.api.latest.keys().collect::<Vec<_>>(), "published peers changed");
                } else {
                    self.report_api();
                    return;
                }
            }
            ApiUpdate::NodeCidrs(c) => self.node_cidrs = c,
            ApiUpdate::Error(e) => {
                warn!(error = %e, "Kubernetes API watch failing; the datapath keeps its state");
                return;
            }
        }
        if self.api.heard {
            self.apply_effective("API update");
        }
    }

    /// Logs what changed among the published peers' problems, and sets the readiness and
    /// metrics from them: a node that serves stale peers says so.
    fn report_api(&mut self) {
        // A published peer the file pins by hand is not used, so its problems are not ours.
        let mut problems = self.api.problems();
        problems.retain(|peer, _| !self.file.peers.iter().any(|p| &p.name == peer));
        for (peer, why) in &problems {
            if self.api.reported.get(peer) != Some(why) {
                error!(peer = %peer, reason = %why, "published peers: not applying");
            }
        }
        for peer in self.api.reported.keys() {
            if !problems.contains_key(peer) {
                info!(peer = %peer, "published peers: problem resolved");
            }
        }
        let peers = problems.keys().filter(|k| !k.is_empty()).count();
        self.metrics.api_peers_rejected.set(i64::try_from(peers).unwrap_or(i64::MAX));
        self.metrics.api_peers_unreadable.set(i64::from(self.api.object.is_some()));
        self.metrics.set_problems(problems.values().cloned().collect());
        self.api.reported = problems;
    }

    /// Validates the file (with this node's pod CIDRs) as a whole, adds the published peers
    /// one by one, and syncs the maps to the result. Only an invalid file is refused whole.
    fn apply_effective(&mut self, why: &str) -> bool {
        let shown = self.opts.config.display().to_string();
        let file = self.file.with_node_cidrs(&self.node_cidrs);
        // Before the API is heard, the published peers are what the pinned maps hold: the
        // file's peers apply now, even through an API outage, and withdraw nothing else.
        let candidates = if self.api.heard { self.api.candidates() } else { self.api.pinned() };
        // What the pinned maps hold for each peer, before this sync changes them: a published
        // peer keeps it, though an address of this node lies in it (see `config::Held`).
        // Unreadable, they would keep nothing, and a peer over a local address would be
        // withdrawn: what the last read found stands in (refusing the apply instead would lose
        // a reload, which nothing tries again).
        let held = match self.maps.held_claims(&self.tunnel) {
            Ok(h) => {
                self.api.held.clone_from(&h);
                h
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "the maps' peers are unreadable; published peers keep what they held at the last read");
                self.api.held.clone()
            }
        };
        let applied = self.api.last_good.keys().cloned().collect();
        let merged = match file.merge_api_with(&netlink::local_addresses(), &held, &candidates, &applied) {
            Ok(m) => m,
            Err(errors) => {
                let e = ConfigError::Invalid { path: shown, errors };
                error!(why, error = %e, "reload refused; keeping the previous state");
                self.metrics.reloads.get_or_create(&ResultLabel { result: "error".into() }).inc();
                return false;
            }
        };
        let config = merged.config;
        if config.datapath_log != self.config.datapath_log {
            warn!("a new datapathLog takes effect when the agent restarts: the logging build is another eBPF object");
        }
        if config.max_flows != self.config.max_flows {
            warn!("a new nat.maxFlows takes effect when the agent restarts, which migrates every flow into maps of the new size");
        }
        let old = std::mem::replace(&mut self.config, config);
        if let Err(e) = self.sync() {
            error!(why, error = %format!("{e:#}"), "applying the new state failed; restoring the previous one");
            self.config = old;
            let _ = self.sync();
            self.metrics.reloads.get_or_create(&ResultLabel { result: "error".into() }).inc();
            return false;
        }
        self.report_kept(merged.kept);
        if self.api.heard {
            self.api.last_good = merged.applied;
            self.api.refused = merged
                .rejected
                .into_iter()
                .map(|(name, errors)| (name, errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))
                .collect();
        }
        self.report_api();
        self.metrics.reloads.get_or_create(&ResultLabel { result: "ok".into() }).inc();
        self.rescan_logged();
        true
    }

    /// Logs each address of this node that a published peer keeps once, when it starts to.
    fn report_kept(&mut self, kept: Vec<KeptLocal>) {
        let kept: BTreeSet<KeptLocal> = kept.into_iter().collect();
        for k in kept.difference(&self.api.kept) {
            warn!(
                peer = %k.peer,
                claim = %k.claim,
                address = %k.address,
                "{k}; the peer keeps it, as the maps held it for the peer before (were it withdrawn, one local address, such as a Service's externalIP, would break every flow to the peer on every node): remove the address, or correct the peer's claim"
            );
        }
        for k in self.api.kept.difference(&kept) {
            info!(peer = %k.peer, claim = %k.claim, address = %k.address, "a published peer no longer covers this address of the node");
        }
        self.api.kept = kept;
    }

    /// Writes the config's desired state, with gateway health applied, into the maps.
    fn sync(&mut self) -> anyhow::Result<()> {
        let targets = Health::targets(&self.config);
        self.health.retain(&targets);
        let mut desired = self.config.desired();
        // Without probing nothing can bring a gateway back, so none is held down.
        let evict = if self.config.health.enabled {
            desired.apply_health(&self.health.down());
            self.health.down_past(self.config.health.down_grace, Instant::now())
        } else {
            BTreeSet::new()
        };
        // Of their flows, those still answered stay (see `ControlMaps::spare_answered`).
        let grace_ns = u64::try_from(self.config.health.down_grace.as_nanos()).unwrap_or(u64::MAX);
        let file_peers = self.file.peers.iter().map(|p| crate::config::peer_id(&p.name)).collect();
        let e = crate::maps::Evicting { evict: evict.clone(), grace_ns, now_ns: monotonic_ns(), file_peers };
        let report = self.maps.sync_evicting(&desired, &e)?;
        self.desired = desired;
        self.sync_tunnel()?;
        if evict != self.evicted && !evict.is_empty() {
            warn!(gateways = ?evict, grace = ?self.config.health.down_grace, flows = report.flows_purged, "gateways down past their grace period; their flows no longer answered are purged and start again on live gateways");
        }
        self.evicted = evict;
        if !report.is_noop() {
            info!(?report, cluster = %self.config.cluster, peers = self.config.peers.len(), "maps synced");
        }
        self.metrics.synced();
        self.metrics.gateway_up.clear();
        for p in &self.config.peers {
            for g in &p.gateways {
                let label = GatewayLabel { peer: p.name.clone(), address: g.address.to_string(), port: g.port.to_string() };
                self.metrics.gateway_up.get_or_create(&label).set(i64::from(self.health.is_up(&(g.address, g.port))));
            }
        }
        Ok(())
    }

    /// Writes the tunnel part of the last desired state, with the paths to the peer nodes
    /// as the kernel's routes give them now.
    fn sync_tunnel(&mut self) -> anyhow::Result<()> {
        let paths = tunnel::resolve_all(&self.desired);
        let mtu = self.uplinks.keys().filter_map(|i| tunnel::mtu_of(i).ok()).min().unwrap_or(tunnel::DEFAULT_MTU);
        let report = self.tunnel.sync(&self.desired, &paths, mtu, &tunnel::node_subnets())?;
        if crate::datapath::have_redirect_neigh() == 0
            && !paths.is_empty()
            && (report.routes_written > 0 || self.neighbours_warmed.is_none_or(|t| t.elapsed() >= NEIGHBOUR_REFRESH))
        {
            tunnel::warm_neighbours(&paths);
            self.neighbours_warmed = Some(Instant::now());
        }
        if report.unresolved != self.unresolved {
            if !report.unresolved.is_empty() {
                warn!(nodes = ?report.unresolved, "no route to these tunnel peer nodes; routes written for them keep their last path, and their other pods are unreachable until there is one");
            }
            self.unresolved.clone_from(&report.unresolved);
        }
        if !report.is_noop() {
            info!(?report, "tunnel maps synced");
        }
        Ok(())
    }

    /// Re-reads the config when its content changed (a ConfigMap update swaps the file).
    fn reload_if_changed(&mut self) {
        match std::fs::read_to_string(&self.opts.config) {
            Ok(text) if text != self.config_text => self.reload("file changed"),
            Ok(_) => {}
            Err(e) => debug!(error = %e, "config file unreadable; keeping the current config"),
        }
    }

    /// Re-reads the config. An invalid one is logged and the old state keeps serving.
    fn reload(&mut self, why: &str) {
        let (file, text) = match RawConfig::load(&self.opts.config) {
            Ok(x) => x,
            Err(e) => {
                // Remember this content, so a bad file is reported once, not every tick.
                self.config_text = std::fs::read_to_string(&self.opts.config).unwrap_or_default();
                error!(why, error = %e, "reload refused; keeping the previous config");
                self.metrics.reloads.get_or_create(&ResultLabel { result: "error".into() }).inc();
                return;
            }
        };
        self.config_text = text;
        let previous = std::mem::replace(&mut self.file, file);
        if self.apply_effective(why) {
            info!(why, "config reloaded");
        } else {
            self.file = previous;
        }
    }

    fn apply_probes(&mut self, results: &[(GatewayId, bool)]) {
        let (fall, rise) = (self.config.health.failure_threshold, self.config.health.rise_threshold);
        let now = Instant::now();
        let mut changed = false;
        for (gw, ok) in results {
            if self.health.record(*gw, *ok, fall, rise, now) {
                changed = true;
                if *ok {
                    info!(gateway = %format!("{}:{}", gw.0, gw.1), "gateway up");
                } else {
                    warn!(gateway = %format!("{}:{}", gw.0, gw.1), grace = ?self.config.health.down_grace, "gateway down; new flows avoid it, its flows stay through the grace period");
                }
            }
        }
        // A gateway that has now been down past its grace period gets its flows purged, those
        // it no longer answers: looked at again every round while one is, and while flows
        // still use a gateway gone from its peer's list (`ControlMaps::spare_retiring`).
        if !self.evicted.is_empty() || self.maps.retiring() || self.health.down_past(self.config.health.down_grace, now) != self.evicted {
            changed = true;
        }
        if changed {
            if let Err(e) = self.sync() {
                error!(error = %format!("{e:#}"), "applying gateway health failed");
            }
        }
    }

    /// The datapath's flow clock, once a second (see `meshnet_common::names::CLOCK`).
    fn publish_clock(&mut self) {
        if let Err(e) = self.maps.publish_clock(monotonic_ns()) {
            if !self.clock_failed {
                error!(error = %format!("{e:#}"), "publishing the flow clock failed; the GC expires nothing more until it works again");
                self.clock_failed = true;
            }
        } else {
            self.clock_failed = false;
        }
    }

    fn collect_garbage(&mut self) {
        // The datapath's clock, not the wall's: see ControlMaps::published_clock.
        let now = self.maps.published_clock().unwrap_or_else(monotonic_ns);
        let report = self.maps.expire(now, &self.config.gc);
        if report.flows + report.orphans + report.revs_restored > 0 {
            debug!(?report, "expired idle flows");
            self.metrics.gc_expired.inc_by(u64::try_from(report.flows).unwrap_or(0));
        }
    }

    fn rescan_logged(&mut self) {
        if let Err(e) = self.rescan_interfaces() {
            warn!(error = %format!("{e:#}"), "interface rescan failed");
        }
        if let Err(e) = self.settle_migration() {
            error!(error = %format!("{e:#}"), "finishing the migration of the old maps failed");
        }
    }

    /// Ends a pending migration once no interface runs an earlier agent's programs: what
    /// they added to the old maps is copied over, and the old maps go. Not before: those
    /// programs use the old maps, and what they add after the last copy would be lost.
    fn settle_migration(&mut self) -> anyhow::Result<()> {
        if !self.datapath.migration_pending() {
            return Ok(());
        }
        if !self.behind.is_empty() || !self.uplinks_behind.is_empty() {
            self.datapath.copy_owed_migration();
            // Said again when the list changes, and every ten minutes while it lasts: a wait
            // that does not end keeps the old maps and their copies going.
            let waiting: Vec<String> = self.behind.iter().chain(&self.uplinks_behind).cloned().collect();
            let due = self.migration_wait_logged.as_ref().is_none_or(|(w, at)| *w != waiting || at.elapsed() >= MIGRATION_WAIT_LOG);
            if due {
                warn!(interfaces = ?waiting, "the old maps stay until these interfaces, which still run the earlier programs, run this build's");
                self.migration_wait_logged = Some((waiting, Instant::now()));
            }
            return Ok(());
        }
        self.datapath.finish_migration()
    }

    /// Attaches to matching interfaces not attached yet, follows those renamed, and forgets
    /// those that are gone, re-created as another device or no longer matching.
    fn rescan_interfaces(&mut self) -> anyhow::Result<()> {
        let globs = interface_globs(&self.config.interfaces)?;
        let mut present = matching_interfaces(&self.config.interfaces)?;
        let pins = &self.opts.pins;
        let seen = reconcile(&self.attached, &present, |n| globs.iter().any(|g| g.matches(n)), index_name, |was, now, i| crate::datapath::runs_ours(pins, was, now, i));
        let (renamed, unsure) = renames_and_unsure(&seen);
        // A device that still exists but no longer matches (the patterns changed, say from the
        // bridge to the pods' veths) is detached after this rescan's attaches of what matches
        // now (whether or not they worked), and its flows stay: its pods live on, and the devices now attached take their flows
        // over (`nat::flow_owner`). Detached first, its pods' replies would pass untranslated
        // meanwhile, and purged, every connection through it would be reset. Not one whose
        // index a matching device now has (another device took it, or ours is not told
        // apart): detached after that device is attached, it would lose its filters.
        let mut no_longer_matching = Vec::new();
        for (iface, index) in follow(&self.opts.pins, &mut self.attached, &mut present, seen) {
            let exists = !matches!(index_name(index), Ok(None));
            self.attached.remove(&iface);
            let matched_again = present.values().any(|i| *i == index);
            if exists && !matched_again && !present.contains_key(&iface) {
                no_longer_matching.push((iface, index));
                continue;
            }
            info!(iface, ifindex = index, "interface gone or re-created; detaching");
            detach_interface(&self.opts.pins, &iface, Some(index));
            // Flows made through a device that is gone belong to a pod that is gone: they
            // would only hold table space until they expire.
            let n = if exists && !matched_again { 0 } else { self.maps.purge_interface(index) };
            if n > 0 {
                info!(iface, flows = n, "purged the flows of the interface's pod");
            }
        }
        // Still running the earlier programs: under its new name, or while the kernel cannot say.
        for (from, to) in renamed {
            if self.behind.remove(&from) {
                self.behind.insert(to);
            }
        }
        self.behind.retain(|iface| present.contains_key(iface) || unsure.contains(iface));
        for (iface, index) in &present {
            if self.attached.contains_key(iface) {
                continue;
            }
            match self.datapath.attach(iface, self.opts.attach_mode) {
                Ok(how) => {
                    info!(iface, ifindex = index, ?how, "attached");
                    self.attached.insert(iface.clone(), *index);
                    self.behind.remove(iface);
                }
                Err(e) => {
                    self.metrics.attach_failures.inc();
                    if e.earlier_run {
                        self.behind.insert(iface.clone());
                        warn!(iface, error = %e, "attach failed; the programs that were there run on, and the next rescan tries again");
                    } else {
                        warn!(iface, error = %e, "attach failed; the next rescan tries again");
                    }
                }
            }
        }
        // Not kept past this rescan, whatever its attaches did: a device that no longer
        // matches must not run the programs on (a restarted agent would not know it had them).
        for (iface, index) in no_longer_matching {
            info!(iface, ifindex = index, "interface no longer matches; detached, its flows kept");
            detach_interface(&self.opts.pins, &iface, Some(index));
        }
        self.metrics.attached_interfaces.set(i64::try_from(self.attached.len()).unwrap_or(0));
        self.sync_ports();
        self.rescan_uplinks(&present)?;
        self.sync_tunnel()
    }

    /// The tunnel's port table (see `names::TUN_PORTS`): each attached pod's addresses, MAC
    /// and interface, read from the kernel. Without an entry, decapsulated packets take the
    /// node's route to the pod, which is right, only slower behind a bridge.
    fn sync_ports(&mut self) {
        let live: BTreeSet<u32> = self.attached.values().copied().collect();
        self.pod_ports.retain(|index, _| live.contains(index));
        let now = Instant::now();
        for index in &live {
            let fresh = self.pod_ports.get(index).is_some_and(|(peer, at)| {
                now.duration_since(*at) < POD_REREAD && peer.as_ref().is_none_or(|p| !p.addrs.is_empty())
            });
            if fresh {
                continue;
            }
            match netlink::veth_peer(*index) {
                Ok(peer) => {
                    self.pod_ports.insert(*index, (peer, now));
                }
                // Not remembered, so the next rescan asks again.
                Err(e) if !self.port_read_warned => {
                    self.port_read_warned = true;
                    warn!(ifindex = index, error = %e, "reading a pod's interface failed; its tunnel packets take the node's route (slower behind a bridge)");
                }
                Err(e) => debug!(ifindex = index, error = %e, "reading the pod's interface failed"),
            }
        }
        let (want, conflicts) = port_table(&self.pod_ports);
        if conflicts != self.port_conflicts {
            if !conflicts.is_empty() {
                warn!(
                    addresses = ?conflicts,
                    "pod interfaces share these addresses; they are left out of the port table (the tunnel delivers to them by the node's route)"
                );
            }
            self.port_conflicts = conflicts;
        }
        match self.tunnel.sync_ports(&want) {
            Ok((0, 0)) => {}
            Ok((written, removed)) => debug!(written, removed, "tunnel port table synced"),
            Err(e) => {
                // The addresses it wrote are not yet taken for owned: a sync that writes them
                // all finds them new, and purges.
                warn!(error = %format!("{e:#}"), "syncing the tunnel port table failed; decapsulated packets take the node's route");
                return;
            }
        }
        // Addresses that have just become a pod's: flows made in their name elsewhere go.
        let owners: BTreeMap<std::net::Ipv4Addr, u32> = want.iter().map(|(addr, port)| (*addr, port.ifindex)).collect();
        let new: BTreeMap<u32, u32> = owners
            .iter()
            .filter(|(addr, index)| self.port_owners.get(addr) != Some(index))
            .map(|(addr, index)| (crate::maps::addr_be(*addr), *index))
            .collect();
        self.port_owners = owners;
        let purged = self.maps.purge_posers(&new);
        if purged > 0 {
            info!(flows = purged, addresses = new.len(), "removed flows other pod interfaces held in the name of addresses that are now a pod's");
        }
    }

    /// The uplinks' side of a rescan: the decapsulating program on every interface the
    /// tunnel section names, except pod interfaces (one program per direction and device).
    fn rescan_uplinks(&mut self, pods: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        let patterns = self.config.tunnel.as_ref().map(|t| t.interfaces.clone()).unwrap_or_default();
        let globs = interface_globs(&patterns)?;
        let mut present = if patterns.is_empty() { BTreeMap::new() } else { matching_interfaces(&patterns)? };
        present.retain(|name, _| !pods.contains_key(name));
        let wanted = |n: &str| !pods.contains_key(n) && globs.iter().any(|g| g.matches(n));
        let pins = &self.opts.pins;
        let seen = reconcile(&self.uplinks, &present, wanted, index_name, |was, now, i| crate::datapath::runs_ours_on_uplink(pins, was, now, i));
        let (renamed, unsure) = renames_and_unsure(&seen);
        for (iface, index) in follow(&self.opts.pins, &mut self.uplinks, &mut present, seen) {
            info!(iface, ifindex = index, "uplink gone or no longer named by tunnel.interfaces; detaching");
            detach_interface(&self.opts.pins, &iface, Some(index));
            self.uplinks.remove(&iface);
        }
        for (from, to) in renamed {
            if self.uplinks_behind.remove(&from) {
                self.uplinks_behind.insert(to);
            }
        }
        self.uplinks_behind.retain(|iface| present.contains_key(iface) || unsure.contains(iface));
        for (iface, index) in &present {
            if self.uplinks.contains_key(iface) {
                continue;
            }
            match self.datapath.attach_uplink(iface, self.opts.attach_mode) {
                Ok(how) => {
                    info!(iface, ifindex = index, ?how, "attached to uplink");
                    self.uplinks.insert(iface.clone(), *index);
                    self.uplinks_behind.remove(iface);
                }
                Err(e) => {
                    self.metrics.attach_failures.inc();
                    if e.earlier_run {
                        self.uplinks_behind.insert(iface.clone());
                    }
                    warn!(iface, error = %e, earlier_programs_run = e.earlier_run, "uplink attach failed; the next rescan tries again");
                }
            }
        }
        Ok(())
    }
}

/// Applies what a rescan found of the interfaces of `entries` (attached pods' or uplinks'):
/// one the listing missed stays, a renamed one moves to its new name with its link pins,
/// and those gone are returned for the caller to detach (and forget). `present` gets each
/// that stays, under its name now, so that it is not attached a second time.
fn follow(
    pins: &Pins,
    entries: &mut BTreeMap<String, u32>,
    present: &mut BTreeMap<String, u32>,
    seen: BTreeMap<String, Seen>,
) -> Vec<(String, u32)> {
    let mut gone = Vec::new();
    let mut moves = Vec::new();
    for (iface, s) in seen {
        let index = entries[&iface];
        match s {
            Seen::Missed => {
                debug!(iface, ifindex = index, "interface missing from the listing, yet there; kept");
                present.insert(iface, index);
            }
            Seen::Unsure(why) => warn!(iface, ifindex = index, why, "cannot tell whether the interface is still there; kept until the next rescan"),
            Seen::Renamed(to) => moves.push((iface, to, index)),
            Seen::Gone => gone.push((iface, index)),
        }
    }
    let names: Vec<(String, String)> = moves.iter().map(|(from, to, _)| (from.clone(), to.clone())).collect();
    let failed = move_pins(pins, &names);
    // Every old name out first: interfaces may have swapped names.
    for (from, _, _) in &moves {
        entries.remove(from);
    }
    for ((from, to, index), failed) in moves.into_iter().zip(failed) {
        if failed {
            // Attached again under the new name in this rescan; the same pod, so its flows stay.
            warn!(iface = to, from, ifindex = index, "interface renamed, and its link pins could not follow; attaching it again");
            detach_interface(pins, &to, Some(index));
        } else {
            info!(iface = to, from, ifindex = index, "interface renamed; its programs and its pod's flows stay");
            entries.insert(to.clone(), index);
        }
        present.insert(to, index);
    }
    gone
}

/// The renames of `seen` (from, to), and the interfaces it is unsure of.
fn renames_and_unsure(seen: &BTreeMap<String, Seen>) -> (Vec<(String, String)>, BTreeSet<String>) {
    let renamed = seen.iter().filter_map(|(from, s)| if let Seen::Renamed(to) = s { Some((from.clone(), to.clone())) } else { None }).collect();
    let unsure = seen.iter().filter(|(_, s)| matches!(s, Seen::Unsure(_))).map(|(n, _)| n.clone()).collect();
    (renamed, unsure)
}

/// What a rescan makes of an interface it attached before that the listing does not show
/// under the name and index it had.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Still there under its name: the listing missed it.
    Missed,
    /// The same device under another name that still matches.
    Renamed(String),
    /// Deleted, re-created as another device, or no longer matching.
    Gone,
    /// The kernel could not say: left as it is until the next rescan.
    Unsure(String),
}

/// Each interface of `attached` that `listed` does not show as it was, and what became of
/// it, by what the kernel says of its index now (`name_of`: its current name, `None` when no
/// device has it), not by the listing alone: one dump of the links can miss a device (musl's
/// `if_nameindex` ignores `NLM_F_DUMP_INTR`), and a device taken for gone would lose its
/// programs and its pod's flows.
fn reconcile(
    attached: &BTreeMap<String, u32>,
    listed: &BTreeMap<String, u32>,
    wanted: impl Fn(&str) -> bool,
    name_of: impl Fn(u32) -> std::io::Result<Option<String>>,
    ours: impl Fn(&str, &str, u32) -> bool,
) -> BTreeMap<String, Seen> {
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    for (iface, index) in attached.iter().filter(|(name, index)| listed.get(*name) != Some(*index)) {
        let s = match name_of(*index) {
            Ok(Some(now)) if !wanted(&now) => Seen::Gone,
            Ok(Some(now)) if now == *iface => Seen::Missed,
            // Another name at the index: the same device renamed only if it runs what was
            // attached to it, not a new one that took a deleted one's index.
            Ok(Some(now)) if !ours(iface, &now, *index) => Seen::Gone,
            Ok(Some(now)) => Seen::Renamed(now),
            Ok(None) => Seen::Gone,
            Err(e) => Seen::Unsure(e.to_string()),
        };
        seen.insert(iface.clone(), s);
    }
    // A name that an entry keeps, or that two renames take, answered for two devices: a
    // rename happened between the looks, and the next rescan sees it whole.
    let kept = |name: &str| attached.contains_key(name) && seen.get(name).is_none_or(|s| matches!(s, Seen::Missed | Seen::Unsure(_)));
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    for s in seen.values() {
        if let Seen::Renamed(to) = s {
            *targets.entry(to.clone()).or_default() += 1;
        }
    }
    let clash: Vec<String> = seen
        .iter()
        .filter(|(_, s)| matches!(s, Seen::Renamed(to) if kept(to) || targets[to] > 1))
        .map(|(n, _)| n.clone())
        .collect();
    for name in clash {
        seen.insert(name, Seen::Unsure("its new name answered for another interface too".into()));
    }
    seen
}

/// Addresses of one pod interface the port table takes; a pod has one or two. A pod with
/// `CAP_NET_ADMIN` can add thousands to its interface, which would fill the table and leave
/// the pods started after it out of it: unknown addresses, which any pod may send as.
const MAX_POD_ADDRS: usize = 16;

/// The port table the pods' interfaces make, and the addresses left out of it because two
/// interfaces claim them: a pod with `CAP_NET_ADMIN` could add another pod's address to its
/// own interface, and must not receive that pod's tunnel traffic. (Keeping the address with
/// the interface that had it first would be worse: such a pod could add the addresses the
/// next pods will be given, and own them before they come.)
fn port_table(pods: &BTreeMap<u32, (Option<netlink::VethPeer>, Instant)>) -> (BTreeMap<std::net::Ipv4Addr, PodPort>, BTreeSet<std::net::Ipv4Addr>) {
    let mut want = BTreeMap::new();
    let mut conflicts = BTreeSet::new();
    for (index, (peer, _)) in pods {
        let Some(p) = peer else { continue };
        for addr in p.addrs.iter().take(MAX_POD_ADDRS) {
            let port = PodPort { ifindex: *index, pod_mac: p.pod_mac, host_mac: p.host_mac };
            if want.insert(*addr, port).is_some_and(|old: PodPort| old.ifindex != *index) {
                conflicts.insert(*addr);
            }
        }
    }
    for addr in &conflicts {
        want.remove(addr);
    }
    (want, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawGateway;

    #[test]
    fn an_address_two_pod_interfaces_claim_is_left_out_of_the_port_table() {
        let peer = |mac: u8, addrs: &[[u8; 4]]| {
            Some(netlink::VethPeer { host_mac: [2; 6], pod_mac: [mac; 6], addrs: addrs.iter().map(|a| std::net::Ipv4Addr::from(*a)).collect() })
        };
        let now = Instant::now();
        let pods = BTreeMap::from([
            (7, (peer(7, &[[10, 245, 0, 20]]), now)),
            // Claims .20 besides its own .21.
            (8, (peer(8, &[[10, 245, 0, 21], [10, 245, 0, 20]]), now)),
            (9, (None, now)),
            (10, (peer(10, &[]), now)),
        ]);
        let (want, conflicts) = port_table(&pods);
        assert_eq!(conflicts, BTreeSet::from([std::net::Ipv4Addr::new(10, 245, 0, 20)]));
        assert_eq!(want.len(), 1);
        assert_eq!(want[&std::net::Ipv4Addr::new(10, 245, 0, 21)], PodPort { ifindex: 8, pod_mac: [8; 6], host_mac: [2; 6] });
    }

    /// A pod that adds thousands of addresses to its interface takes a few slots of the port
    /// table, not all of them: the pods after it are still known.
    #[test]
    fn a_pods_addresses_take_a_bounded_share_of_the_port_table() {
        let many: Vec<std::net::Ipv4Addr> = (0..5000u32).map(|i| std::net::Ipv4Addr::from(0x0af5_0000 + i)).collect();
        let now = Instant::now();
        let pods = BTreeMap::from([
            (7, (Some(netlink::VethPeer { host_mac: [2; 6], pod_mac: [7; 6], addrs: many }), now)),
            (8, (Some(netlink::VethPeer { host_mac: [2; 6], pod_mac: [8; 6], addrs: vec![std::net::Ipv4Addr::new(10, 246, 0, 9)] }), now)),
        ]);
        let (want, _) = port_table(&pods);
        assert_eq!(want.len(), MAX_POD_ADDRS + 1);
        assert_eq!(want[&std::net::Ipv4Addr::new(10, 246, 0, 9)].ifindex, 8);
    }

    #[test]
    fn a_live_interface_missing_from_the_listing_is_not_taken_for_gone() {
        let attached: BTreeMap<String, u32> = [
            ("veth1", 10),
            ("veth2", 11),
            ("veth3", 12),
            ("veth4", 13),
            ("veth5", 14),
            ("veth6", 15),
            ("veth7", 16),
            ("vetha", 20),
            ("vethb", 21),
            ("vethc", 30),
            ("vethd", 31),
            ("vethe", 50),
        ]
        .into_iter()
        .map(|(n, i)| (n.to_string(), i))
        .collect();
        // One dump of the links, as it may come back while pods come and go: veth1 missing
        // though it lives, veth6 re-created under its name, vetha and vethb swapped names.
        let listed: BTreeMap<String, u32> = [("veth2", 11), ("veth3b", 12), ("veth6", 40), ("vetha", 21), ("vethb", 20), ("vethc", 30)]
            .into_iter()
            .map(|(n, i)| (n.to_string(), i))
            .collect();
        // What the kernel says of each index now (vethd's name was taken by the listing's
        // vethc in between: a rename under way, not two devices of one name).
        let name_of = |index: u32| -> std::io::Result<Option<String>> {
            match index {
                10 => Ok(Some("veth1".into())),
                11 => Ok(Some("veth2".into())),
                12 => Ok(Some("veth3b".into())),
                13 => Ok(Some("other0".into())),
                14 | 15 => Ok(None),
                16 => Err(std::io::Error::from_raw_os_error(libc::EMFILE)),
                20 => Ok(Some("vethb".into())),
                21 => Ok(Some("vetha".into())),
                30 | 31 => Ok(Some("vethc".into())),
                50 => Ok(Some("vethf".into())),
                _ => unreachable!("{index}"),
            }
        };
        // Every device under another name runs what was attached to it, but vethe's index:
        // vethe was deleted, and a new pod's vethf took its index.
        let ours = |was: &str, now: &str, index: u32| (was, now, index) != ("vethe", "vethf", 50);
        let seen = reconcile(&attached, &listed, |n| n.starts_with("veth"), name_of, ours);
        let unsure = |s: &Seen| matches!(s, Seen::Unsure(_));
        assert_eq!(seen.get("veth1"), Some(&Seen::Missed), "{seen:?}");
        assert_eq!(seen.get("veth2"), None, "listed as it was");
        assert_eq!(seen.get("veth3"), Some(&Seen::Renamed("veth3b".into())));
        assert_eq!(seen.get("veth4"), Some(&Seen::Gone), "renamed to a name that does not match");
        assert_eq!(seen.get("veth5"), Some(&Seen::Gone), "deleted");
        assert_eq!(seen.get("veth6"), Some(&Seen::Gone), "re-created: the old device is gone");
        assert!(seen.get("veth7").is_some_and(unsure), "{seen:?}");
        assert_eq!(seen.get("vetha"), Some(&Seen::Renamed("vethb".into())));
        assert_eq!(seen.get("vethb"), Some(&Seen::Renamed("vetha".into())));
        assert_eq!(seen.get("vethc"), None);
        assert!(seen.get("vethd").is_some_and(unsure), "{seen:?}");
        assert_eq!(seen.get("vethe"), Some(&Seen::Gone), "another device at a deleted one's index is no rename");
        assert_eq!(seen.len(), 10, "{seen:?}");
    }

    fn peer(name: &str, cidr: &str) -> RawPeer {
        RawPeer {
            name: name.into(),
            pod_cidrs: vec![cidr.into()],
            gateways: vec![RawGateway { address: "10.20.144.165".into(), port: 32361, udp_port: None }],
            ..RawPeer::default()
        }
    }

    fn names(c: &BTreeMap<String, Vec<RawPeer>>) -> Vec<String> {
        c.iter().map(|(n, v)| format!("{n}:{}", v.iter().map(|p| p.pod_cidrs[0].as_str()).collect::<Vec<_>>().join(","))).collect()
    }

    #[test]
    fn only_a_readable_publish_withdraws() {
        let mut api = ApiPeers { heard: false, ..ApiPeers::default() };
        api.last_good = [("a".to_string(), peer("a", "10.1.0.0/16")), ("b".to_string(), peer("b", "10.2.0.0/16"))].into();
        // Deleted or garbage: nothing changes, and the agent says why.
        api.published(Published::Missing);
        assert!(!api.heard);
        assert!(api.problems()[""].contains("does not exist"));
        api.published(Published::Unreadable("not a list".into()));
        assert!(api.problems()[""].contains("unreadable: not a list"));
        // A readable publish: a's newest first, then its last good; b is gone.
        api.published(Published::Entries(vec![PublishedEntry::Peer(peer("a", "10.9.0.0/16"))]));
        assert!(api.heard && api.object.is_none());
        assert_eq!(names(&api.candidates()), ["a:10.9.0.0/16,10.1.0.0/16"]);
        // An unreadable entry with a name keeps that peer's last good state only.
        api.published(Published::Entries(vec![
            PublishedEntry::Bad { index: 0, name: Some("a".into()), error: "unknown field `weight`".into() },
            PublishedEntry::Peer(peer("c", "10.3.0.0/16")),
        ]));
        assert_eq!(names(&api.candidates()), ["a:10.1.0.0/16", "c:10.3.0.0/16"]);
        assert_eq!(api.problems()["a"], "published peer \"a\" is unreadable (unknown field `weight`); keeping its last good state");
        // An entry without a readable name could be any peer: none is withdrawn.
        api.published(Published::Entries(vec![PublishedEntry::Bad { index: 0, name: None, error: "garbage".into() }]));
        assert_eq!(names(&api.candidates()), ["a:10.1.0.0/16", "b:10.2.0.0/16"]);
        assert!(api.problems()["peers[0]"].contains("garbage"));
    }
}
