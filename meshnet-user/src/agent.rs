//! The node agent: load, sync the maps to the config, attach to the pod interfaces, then
//! follow the config, the interfaces and the gateways' health, and expire idle flows, until
//! told to stop. Stopping leaves the datapath in place; `meshnet detach` removes it.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use ipnet::Ipv4Net;

use crate::{
    config::{Config, RawConfig, RawPeer},
    discovery::source::{self, ApiUpdate, SourceOptions},
    datapath::{detach_interface, matching_interfaces, AttachMode, Datapath},
    dump::monotonic_ns,
    health::{self, GatewayId, Health},
    maps::ControlMaps,
    metrics::{self, GatewayLabel, Metrics, ResultLabel},
    netlink::LinkEvents,
    pins::Pins,
};

pub struct AgentOptions {
    pub config: PathBuf,
    pub pins: Pins,
    pub attach_mode: AttachMode,
    /// How often interfaces are rescanned besides netlink link events, and how often the
    /// config file is checked for changes.
    pub rescan: Duration,
    pub metrics_addr: Option<SocketAddr>,
    /// An eBPF object to load instead of the embedded one.
    pub ebpf_object: Option<PathBuf>,
    /// Also follow peers published through the Kubernetes API.
    pub kube: Option<SourceOptions>,
    /// How long to wait for another agent holding the pin directory.
    pub lock_wait: Duration,
}

struct Agent {
    opts: AgentOptions,
    /// The effective config: the file merged with what the API published.
    config: Config,
    config_text: String,
    /// The file as parsed, before the API's peers are merged in.
    file: RawConfig,
    /// Published peers; `None` until the API watch first synced (with --kube).
    api_peers: Option<Vec<RawPeer>>,
    node_cidrs: Vec<Ipv4Net>,
    datapath: Datapath,
    maps: ControlMaps,
    attached: BTreeSet<String>,
    /// The interface index of each attached interface, to purge its pod's flows when it goes.
    ifindexes: std::collections::BTreeMap<String, u32>,
    health: Health,
    /// Down gateways past their grace period whose flows the last sync purged.
    evicted: BTreeSet<GatewayId>,
    metrics: Arc<Metrics>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    // A bad config fails here, before anything is loaded or attached.
    let (file, config_text) = RawConfig::load(&opts.config)?;
    let config = file.validated(&opts.config.display().to_string())?;
    // One agent per pin directory, held until this process exits.
    opts.pins.prepare()?;
    let pins = opts.pins.clone();
    let wait = opts.lock_wait;
    let _lock = tokio::task::spawn_blocking(move || {
        pins.lock(wait, |holder| warn!(pin_path = %pins.root().display(), "another meshnet agent{holder} holds the pin directory; waiting for it to stop"))
    })
    .await??;
    let datapath = match &opts.ebpf_object {
        Some(path) => {
            let object = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Datapath::load_object(&opts.pins, config.max_flows, &object)?
        }
        None => Datapath::load(&opts.pins, config.max_flows)?,
    };
    let maps = ControlMaps::open(&opts.pins)?;
    let health = Health::from_pinned(&maps.current_peers()?);
    let metrics = Arc::new(Metrics::new(opts.pins.clone()));
    if let Some(addr) = opts.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}"))?;
        tokio::spawn(metrics::serve(listener, metrics.clone()));
    }
    let (api_tx, mut api_rx) = mpsc::channel::<ApiUpdate>(16);
    if let Some(src) = opts.kube.clone() {
        source::spawn(src, api_tx).await.context("--kube")?;
    }
    let api_peers = if opts.kube.is_some() { None } else { Some(Vec::new()) };
    let mut agent = Agent {
        opts,
        config,
        config_text,
        file,
        api_peers,
        node_cidrs: Vec::new(),
        datapath,
        maps,
        attached: BTreeSet::new(),
        ifindexes: std::collections::BTreeMap::new(),
        health,
        evicted: BTreeSet::new(),
        metrics,
    };
    if agent.api_peers.is_some() {
        agent.sync().context("filling the maps")?;
    } else {
        // Until the API has been heard, the pinned maps (from before a restart) keep
        // serving as they are: nothing is withdrawn on the strength of an empty start.
        info!("waiting for the published peers before changing the maps");
    }
    agent.rescan_interfaces()?;
    // This build's programs now run on every interface: what the old ones added to maps
    // being migrated is copied over, and the old maps go.
    agent.datapath.finish_migration().context("migrating the old maps")?;
    if agent.attached.is_empty() {
        warn!(patterns = ?agent.config.interfaces, "no interface matches yet; waiting for one to appear");
    }
    agent.metrics.ready.store(true, Ordering::Relaxed);
    info!(pin_path = %agent.opts.pins.root().display(), interfaces = ?agent.attached, "meshnet agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
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
    let (probe_tx, mut probe_rx) = mpsc::channel::<Vec<(GatewayId, bool)>>(4);
    let mut probing = false;
    loop {
        tokio::select! {
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
            _ = probe_tick.tick(), if agent.config.health.enabled && !probing => {
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
    info!("stopping; the datapath stays in place (`meshnet detach` removes it)");
    Ok(())
}

impl Agent {
    /// Merges what the API published with the file and applies it if valid.
    fn api_update(&mut self, update: ApiUpdate) {
        match update {
            ApiUpdate::Peers(peers) => {
                info!(peers = ?peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), "published peers changed");
                self.api_peers = Some(peers);
            }
            ApiUpdate::NodeCidrs(c) => self.node_cidrs = c,
            ApiUpdate::Error(e) => {
                warn!(error = %e, "Kubernetes API watch failing; the datapath keeps its state");
                return;
            }
        }
        if self.api_peers.is_some() {
            self.apply_effective("API update");
        }
    }

    /// Validates the file merged with the API's peers and, if valid, syncs the maps to it.
    fn apply_effective(&mut self, why: &str) -> bool {
        let merged = self.file.with_api(self.api_peers.as_deref().unwrap_or_default(), &self.node_cidrs);
        let config = match merged.validated(&self.opts.config.display().to_string()) {
            Ok(c) => c,
            Err(e) => {
                error!(why, error = %e, "reload refused; keeping the previous state");
                self.metrics.reloads.get_or_create(&ResultLabel { result: "error".into() }).inc();
                return false;
            }
        };
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
        self.metrics.reloads.get_or_create(&ResultLabel { result: "ok".into() }).inc();
        self.rescan_logged();
        true
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
        let report = self.maps.sync_evicting(&desired, &evict)?;
        if evict != self.evicted && !evict.is_empty() {
            warn!(gateways = ?evict, grace = ?self.config.health.down_grace, flows = report.flows_purged, "gateways down past their grace period; their flows were purged and start again on live gateways");
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
        if self.api_peers.is_none() {
            // Still waiting for the API: validate the file alone, apply later.
            if let Err(e) = self.file.validated(&self.opts.config.display().to_string()) {
                error!(why, error = %e, "reload refused; keeping the previous config");
                self.file = previous;
            }
            return;
        }
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
        // A gateway that has now been down past its grace period gets its flows purged.
        if self.health.down_past(self.config.health.down_grace, now) != self.evicted {
            changed = true;
        }
        if changed {
            if let Err(e) = self.sync() {
                error!(error = %format!("{e:#}"), "applying gateway health failed");
            }
        }
    }

    fn collect_garbage(&mut self) {
        let report = self.maps.expire(monotonic_ns(), &self.config.gc);
        if report.flows + report.orphans + report.revs_restored > 0 {
            debug!(?report, "expired idle flows");
            self.metrics.gc_expired.inc_by(u64::try_from(report.flows).unwrap_or(0));
        }
    }

    fn rescan_logged(&mut self) {
        if let Err(e) = self.rescan_interfaces() {
            warn!(error = %format!("{e:#}"), "interface rescan failed");
        }
    }

    /// Attaches to matching interfaces not attached yet, and forgets those that are gone.
    fn rescan_interfaces(&mut self) -> anyhow::Result<()> {
        let present = matching_interfaces(&self.config.interfaces)?;
        for iface in present.difference(&self.attached.clone()) {
            match self.datapath.attach(iface, self.opts.attach_mode) {
                Ok(how) => {
                    info!(iface, ?how, "attached");
                    self.attached.insert(iface.clone());
                    if let Ok(idx) = nix::net::if_::if_nametoindex(iface.as_str()) {
                        self.ifindexes.insert(iface.clone(), idx);
                    }
                }
                Err(e) => warn!(iface, error = %format!("{e:#}"), "attach failed; will retry"),
            }
        }
        let gone: Vec<String> = self.attached.difference(&present).cloned().collect();
        for iface in gone {
            info!(iface, "interface gone or no longer matching; detaching");
            detach_interface(&self.opts.pins, &iface);
            self.attached.remove(&iface);
            if let Some(idx) = self.ifindexes.remove(&iface) {
                let n = self.maps.purge_interface(idx);
                if n > 0 {
                    info!(iface, flows = n, "purged the flows of the interface's pod");
                }
            }
        }
        self.metrics.attached_interfaces.set(i64::try_from(self.attached.len()).unwrap_or(0));
        Ok(())
    }
}
