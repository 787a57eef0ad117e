//! `meshnet controller`: one replica (with leader election) that holds the remote clusters'
//! credentials, watches the local and remote API servers, and publishes the resolved peers
//! into the ConfigMap `meshnet-peers`, which every node's agent follows.
//!
//! Failure isolation: every remote cluster has its own task. A remote API server that fails
//! or hangs only makes its own peer stale; its last known state stays published. Nothing is
//! withdrawn before the watch that would justify it has synced, and a restarted controller
//! starts from what it published before, so a restart never flushes the agents' maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Node, Secret},
};
use kube::{
    api::{ObjectMeta, Patch, PatchParams},
    runtime::watcher,
    Api, Client, ResourceExt as _,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, error, info, warn};

use super::{
    bounded,
    desired::{self, Desired, Inputs, RemoteInput},
    leader::Elector,
    probes::{ControllerMetrics, PeerLabel},
    remote::{self, RemoteEvent},
    published::{self, Published, PublishedEntry, HOLDS_CONFIGMAP, HOLDS_KEY, PEERS_CONFIGMAP, PEERS_KEY, STATUS_CONFIGMAP, STATUS_KEY},
    resolve::{self, ClusterView, LocalNode, NodeInfo, ResolveOptions, SecretSource, ALLOWED_CIDRS_ANNOTATION, MODE_ANNOTATION, POD_CIDRS_ANNOTATION},
    watch::{snapshots, Update},
};
use crate::config::{PeerMode, RawPeer};

pub const LEASE_NAME: &str = "meshnet-controller";

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub kubeconfig: Option<PathBuf>,
    /// meshnet's namespace: the published ConfigMap and the lease live here.
    pub namespace: String,
    /// Where Istio's remote secrets, the gateway Service and the `istio` ConfigMap live.
    pub istio_namespace: String,
    /// Where the remote clusters' kubeconfigs are: Istio's remote secrets by default, or
    /// meshnet's own read-only ones (docs/istio.md).
    pub secrets: SecretSource,
    pub resolve: ResolveOptions,
    /// Per-cluster pod CIDR overrides from the command line.
    pub pod_cidrs: BTreeMap<String, Vec<Ipv4Net>>,
    /// The local cluster's Service CIDRs, which no peer may claim.
    pub service_cidrs: Vec<Ipv4Net>,
    /// Per-cluster allow-lists from the command line: the only CIDRs that cluster may claim.
    /// They win over the remote secret's annotation.
    pub allowed_cidrs: BTreeMap<String, Vec<Ipv4Net>>,
    /// Per-cluster modes from the command line (`--mode`); they win over the remote secret's
    /// annotation.
    pub modes: BTreeMap<String, PeerMode>,
    /// The mode of a remote with neither a flag nor an annotation (`--default-mode`).
    pub default_mode: PeerMode,
    /// How often each remote API server is probed; a failed probe marks its peer stale.
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub leader_election: bool,
    pub identity: String,
    /// How long a lease holds without renewal; another replica takes over after that.
    pub lease_duration: Duration,
    pub metrics_addr: Option<SocketAddr>,
    /// A Unix socket for the probes' `/healthz` and `/readyz` (`metrics::serve_health`).
    pub health_socket: Option<std::path::PathBuf>,
}

enum Msg {
    Secrets(Update<Secret>),
    /// What `meshnet-peers` holds now, whoever wrote it.
    Published(Update<ConfigMap>),
    /// What `meshnet-holds` holds now, whoever wrote it.
    Holds(Update<ConfigMap>),
    LocalNodes(Update<NodeInfo>),
    Istio(Update<ConfigMap>),
    Remote { name: String, generation: u64, event: RemoteEvent },
}

struct Remote {
    /// Which secret and key it came from, a hash of the kubeconfig, and the mode its task
    /// watches for, to notice changes.
    fingerprint: (String, u64, PeerMode),
    generation: u64,
    task: JoinHandle<()>,
    /// The secret's pod CIDRs annotation: `Err` when it is unreadable, which refuses the peer
    /// rather than publishing what the rest of it says.
    pod_cidrs: Option<Result<Vec<Ipv4Net>, String>>,
    /// The secret's allow-list annotation: `Err` when it is unreadable, which refuses the
    /// peer rather than allowing everything.
    allowed: Option<Result<Vec<Ipv4Net>, String>>,
    /// The secret's mode annotation, as written.
    mode_annotation: Option<String>,
    view: Option<ClusterView>,
    stale: bool,
    error: Option<String>,
    refused: Option<String>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    opts: ControllerOptions,
    /// Turns for remotes' initial lists.
    lists: Arc<tokio::sync::Semaphore>,
    client: Client,
    tx: mpsc::Sender<Msg>,
    remotes: BTreeMap<String, Remote>,
    next_generation: u64,
    secrets_synced: bool,
    /// Every local Node's pod CIDRs and addresses, `None` until the watch synced: no peer may
    /// claim them, nor use one as a gateway, unless it was published with it before.
    local: Option<Vec<LocalNode>>,
    /// What each peer keeps of what local Nodes claim, as last logged.
    clashes: BTreeMap<String, String>,
    /// `None` until the watch synced; then the ConfigMap, if it exists.
    #[expect(clippy::option_option, reason = "not synced yet differs from synced and absent")]
    istio: Option<Option<ConfigMap>>,
    /// The last known peer of each hand-written network (see `desired::Inputs::hand`): at
    /// the start, every published peer, which the first readable `meshNetworks` narrows, or
    /// none when the ConfigMap is missing then.
    hand: BTreeMap<String, RawPeer>,
    /// The warnings (an unreadable `meshNetworks`, ...) as last logged.
    warned: Vec<String>,
    /// The last good peer of each remote: published while it is stale or not yet synced.
    last_good: BTreeMap<String, RawPeer>,
    /// What this replica last wrote (or saw written) of each object: `peers.yaml`, then
    /// `status.yaml`. `None` makes the next publish write it.
    published: (Option<String>, Option<String>),
    /// What this replica last wrote of `holds.yaml`; `None` makes the next publish write it.
    holds_written: Option<String>,
    /// Holds left out of `holds.yaml` for its size, as last logged.
    holds_left_out: Vec<String>,
    /// The peers `peers.yaml` lists as this replica last read or wrote it (empty when it does
    /// not know): only these may go without a hold.
    listed: BTreeSet<String>,
    /// The peers `peers.yaml` lists as this replica last read, wrote or saw it, never
    /// forgotten as `listed` is on doubt: their records have the tunnel room first (see
    /// `desired::reservations`), and a hand edit must not hand a live peer's room to another.
    live: BTreeSet<String>,
    /// Until when this replica may write as the leader (with leader election): a replica
    /// whose lease ran out must not overwrite the new leader's writes.
    lead_until: Option<tokio::time::Instant>,
    /// The resource versions this replica's own last writes made: a watch event of one of
    /// them is no one else's edit, only an older view of its own.
    own_versions: std::collections::VecDeque<String>,
    /// What the watches last showed of the peers object and of the holds: a replica that does
    /// not lead keeps its record from both, as a new leader would read it.
    watched: (BTreeMap<String, RawPeer>, BTreeMap<String, RawPeer>),
    /// What each configured peer was last published with: whoever was published with a CIDR
    /// or a node address keeps it against another peer's claim (see
    /// `desired::Inputs::published`). A peer's entry stays while the peer is configured, even
    /// while it is refused, stale or left out, so that one publish without it costs it
    /// nothing; what `peers.yaml` does not list is kept in `meshnet-holds`, so that a restart
    /// or a new leader knows it too. A replica that does not lead takes the leader's publishes
    /// as they are, and reads the whole record again when it is elected.
    published_peers: BTreeMap<String, RawPeer>,
    /// The record (the peers object and the holds) has been read: until then this replica
    /// does not know who holds what, and publishes nothing; `publish` reads it again.
    published_seen: bool,
    /// Cluster names more than one remote secret holds: no task follows either kubeconfig,
    /// and the peer stays at its last known state, under the annotations of the remote it
    /// was (its allow-list, pod CIDRs and mode: a second secret must not lift them).
    duplicates: BTreeMap<String, Duplicate>,
    /// The remote secrets as last seen, for choosing the remotes again once the published
    /// record has been read.
    secrets: Arc<BTreeMap<String, Secret>>,
    /// How many refused remote clusters are not listed one by one (see
    /// [`Self::listed_refusals`]), as last logged.
    unlisted_refusals: Option<usize>,
    /// Peers refused (reserved ranges, allow-lists, overlaps, ...), with why: logged and
    /// counted once each.
    refusals: BTreeMap<String, String>,
    /// Peers with a `peer_refused` series: removed once the name is gone from the status, so
    /// that names cycled through the inputs do not pile up.
    refused_series: BTreeSet<String>,
    leader: bool,
    metrics: Arc<ControllerMetrics>,
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(opts: ControllerOptions) -> anyhow::Result<()> {
    let client = super::local_client(opts.kubeconfig.as_deref()).await?;
    let metrics = Arc::new(ControllerMetrics::new());
    if let Some(addr) = opts.metrics_addr {
        tokio::spawn(crate::metrics::serve_on(addr, metrics.clone()));
    }
    if let Some(path) = opts.health_socket.clone() {
        tokio::spawn(crate::metrics::serve_health_on(path, metrics.clone()));
    }
    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    let ns = opts.istio_namespace.clone();
    spawn_watch(
        tx.clone(),
        Api::<Secret>::namespaced(client.clone(), &opts.secrets.namespace),
        watcher::Config::default().labels(&opts.secrets.selector),
        Msg::Secrets,
    );
    spawn_watch(tx.clone(), Api::<Node>::all(client.clone()), watcher::Config::default(), Msg::LocalNodes);
    // Our own object, so that a hand edit, a deletion or a write from a replica that has
    // lost the lease is put right.
    spawn_watch(
        tx.clone(),
        Api::<ConfigMap>::namespaced(client.clone(), &opts.namespace),
        watcher::Config::default().fields(&format!("metadata.name={PEERS_CONFIGMAP}")),
        Msg::Published,
    );
    spawn_watch(
        tx.clone(),
        Api::<ConfigMap>::namespaced(client.clone(), &opts.namespace),
        watcher::Config::default().fields(&format!("metadata.name={HOLDS_CONFIGMAP}")),
        Msg::Holds,
    );
    spawn_watch(
        tx.clone(),
        Api::<ConfigMap>::namespaced(client.clone(), &ns),
        watcher::Config::default().fields("metadata.name=istio"),
        Msg::Istio,
    );

    let mut state = State {
        lists: Arc::new(tokio::sync::Semaphore::new(remote::CONCURRENT_LISTS)),
        client: client.clone(),
        tx: tx.clone(),
        remotes: BTreeMap::new(),
        next_generation: 0,
        secrets_synced: false,
        local: None,
        clashes: BTreeMap::new(),
        istio: None,
        hand: BTreeMap::new(),
        warned: Vec::new(),
        last_good: BTreeMap::new(),
        published: (None, None),
        holds_written: None,
        holds_left_out: Vec::new(),
        listed: BTreeSet::new(),
        live: BTreeSet::new(),
        lead_until: None,
        own_versions: std::collections::VecDeque::new(),
        watched: (BTreeMap::new(), BTreeMap::new()),
        published_peers: BTreeMap::new(),
        published_seen: false,
        duplicates: BTreeMap::new(),
        unlisted_refusals: None,
        secrets: Arc::default(),
        refusals: BTreeMap::new(),
        refused_series: BTreeSet::new(),
        leader: !opts.leader_election,
        metrics,
        opts,
    };
    // Start from what was published before: peers whose remote has not synced yet keep it.
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &state.opts.namespace);
    match read_record(&cms).await {
        Ok(stored) => state.start_from(stored),
        Err(e) => warn!(error = %format!("{e:#}"), "could not read the published peers; reading them again before publishing"),
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Renew well within the lease, so that one late renewal does not hand over leadership.
    let mut lease_tick = tokio::time::interval((state.opts.lease_duration / 4).max(Duration::from_millis(250)));
    let mut elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &state.opts.namespace),
        LEASE_NAME,
        &state.opts.identity,
        state.opts.lease_duration,
    );
    // The loop's pulse for /healthz: every branch below is bounded (API calls by
    // API_TIMEOUT), so a loop that stops beating is wedged and the pod should restart.
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut dirty = false;
    let mut retry = PublishRetry::default();
    let mut last_publish: Option<tokio::time::Instant> = None;
    let mut debounce = Box::pin(tokio::time::sleep(Duration::from_hours(1)));
    info!(namespace = %state.opts.namespace, istio_namespace = %state.opts.istio_namespace, "meshnet controller started");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            due = heartbeat.tick() => state.metrics.pulse.beat(due.into_std()),
            _ = lease_tick.tick(), if state.opts.leader_election => {
                let was = state.leader;
                let terms = elector.terms();
                state.leader = elector.tick().await;
                state.lead_until = elector.leading_until();
                // A term of its own that followed another's (the loop was held up past the lease)
                // is an election too.
                if state.leader != was || elector.terms() != terms {
                    info!(leader = state.leader, identity = %state.opts.identity, "leadership changed");
                    // A new leader writes what it sees, whatever it believes was published:
                    // a write of the old leader's may have landed since.
                    state.published = (None, None);
                    state.holds_written = None;
                    state.listed.clear();
                    // What it knows of who holds what is the old leader's publishes as it saw
                    // them: it reads the record, holds included, before it writes.
                    state.published_seen &= !state.leader;
                    if !state.leader {
                        state.follow();
                    }
                    dirty = true;
                    debounce.as_mut().reset(tokio::time::Instant::now());
                }
            }
            Some(msg) = rx.recv() => {
                // Coalesce bursts (a relist delivers many events) into one publish.
                if state.handle(msg) {
                    let at = publish_after_change(dirty.then(|| debounce.deadline()), tokio::time::Instant::now(), last_publish);
                    dirty = true;
                    debounce.as_mut().reset(at);
                }
            }
            () = &mut debounce, if dirty => {
                dirty = false;
                last_publish = Some(tokio::time::Instant::now());
                debounce.as_mut().reset(tokio::time::Instant::now() + Duration::from_hours(1));
                match state.publish().await {
                    Ok(()) => {
                        if retry.succeeded() {
                            info!("publishing peers works again");
                        }
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        let (after, log) = retry.failed(&error);
                        if log {
                            error!(error = %error, retry_after = ?after, "publishing peers failed; retrying, less often while it fails");
                        }
                        state.metrics.publish_errors.inc();
                        dirty = true;
                        debounce.as_mut().reset(tokio::time::Instant::now() + after);
                    }
                }
            }
        }
    }
    if state.opts.leader_election {
        elector.release().await;
    }
    info!("controller stopping; the published peers stay as they are");
    Ok(())
}

fn spawn_watch<K>(tx: mpsc::Sender<Msg>, api: Api<K>, config: watcher::Config, wrap: fn(Update<K::Kept>) -> Msg)
where
    K: kube::Resource + super::watch::Relevant + PartialEq + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut s = std::pin::pin!(snapshots(api, config));
        while let Some(u) = s.next().await {
            if tx.send(wrap(u)).await.is_err() {
                break;
            }
        }
    });
}

impl State {
    /// Takes in what a watch or a remote task says; whether it may change what is published.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Secrets(Update::Snapshot(secrets)) => {
                self.secrets_synced = true;
                self.reconcile_remotes(&secrets);
                self.secrets = secrets;
            }
            Msg::LocalNodes(Update::Snapshot(nodes)) => {
                self.local = Some(nodes.iter().map(|(name, n)| LocalNode::of(name, n)).collect());
            }
            Msg::Istio(Update::Snapshot(cms)) => {
                let cm = cms.values().next().cloned();
                // Its deletion keeps the networks it gave only once this replica has seen it:
                // a controller started without it (Istio gone for good) publishes none.
                if cm.is_none() && self.istio.is_none() {
                    self.hand.clear();
                }
                self.istio = Some(cm);
            }
            // A replica that does not lead follows the leader's writes; the leader keeps its own
            // record, which no hand edit or deposed leader's late write may rewrite.
            Msg::Published(Update::Snapshot(cms)) => {
                let cm = cms.values().next();
                self.watched.0 = cm.map(published::readable_peers).unwrap_or_default().into_iter().map(|p| (p.name.clone(), p)).collect();
                if !self.leader {
                    self.follow();
                    return true;
                }
                let seen = cm.and_then(|cm| cm.data.as_ref()?.get(PEERS_KEY).cloned());
                if self.published.0.is_none() || self.published.0 == seen || self.is_own(cm) {
                    return false;
                }
                warn!("{PEERS_CONFIGMAP} was changed or deleted by someone else; rewriting it");
                self.published.0 = None;
                self.listed.clear();
            }
            Msg::Holds(Update::Snapshot(cms)) => {
                let cm = cms.values().next();
                self.watched.1 = cm.map(published::readable_holds).unwrap_or_default().into_iter().map(|p| (p.name.clone(), p)).collect();
                if !self.leader {
                    self.follow();
                    return true;
                }
                let seen = cm.and_then(|cm| cm.data.as_ref()?.get(HOLDS_KEY).cloned());
                if self.holds_written.is_none() || self.holds_written == seen || self.is_own(cm) {
                    return false;
                }
                warn!("{HOLDS_CONFIGMAP} was changed or deleted by someone else; rewriting it");
                self.holds_written = None;
            }
            Msg::Secrets(Update::Error(e) | Update::Unfollowed(e))
            | Msg::LocalNodes(Update::Error(e) | Update::Unfollowed(e))
            | Msg::Istio(Update::Error(e) | Update::Unfollowed(e))
            | Msg::Published(Update::Error(e) | Update::Unfollowed(e))
            | Msg::Holds(Update::Error(e) | Update::Unfollowed(e)) => {
                warn!(error = %e, "local API watch failed; keeping the last known state");
                return false;
            }
            Msg::Remote { name, generation, event } => {
                let Some(r) = self.remotes.get_mut(&name).filter(|r| r.generation == generation) else { return false };
                match event {
                    // Empty when an earlier event of this task took the view this one
                    // announced, or a newer one: the remote is as fresh as that view.
                    RemoteEvent::View(latest) => {
                        if let Some(v) = latest.take() {
                            r.view = Some(v);
                        }
                        r.stale = r.view.is_none();
                        r.error = None;
                    }
                    RemoteEvent::Healthy => {
                        if r.stale {
                            info!(peer = %name, "remote API server reachable again");
                        }
                        r.stale = r.view.is_none();
                        r.error = None;
                    }
                    RemoteEvent::Failed(e) => {
                        if !r.stale {
                            warn!(peer = %name, error = %e, "remote API server failing; keeping its last known state");
                        }
                        r.stale = true;
                        r.error = Some(e);
                    }
                    RemoteEvent::Refused(e) => {
                        error!(peer = %name, error = %e, "remote cluster refused");
                        r.refused = Some(e);
                    }
                }
            }
        }
        true
    }

    /// A replica that does not lead takes its record from the leader's writes, the holds and
    /// the peers object, as a new leader reads them.
    fn follow(&mut self) {
        self.live = self.watched.0.keys().cloned().collect();
        self.published_peers = self.watched.1.clone();
        self.published_peers.extend(self.watched.0.iter().map(|(n, p)| (n.clone(), p.clone())));
    }

    /// Whether the remote `name`'s peer has a state to keep: resolved before, published or
    /// held. Its traffic may flow.
    fn has_state(&self, name: &str) -> bool {
        self.last_good.contains_key(name) || self.published_peers.contains_key(name)
    }

    /// The refused remotes that get a status entry and metrics series of their own (the
    /// status's entries make the series): every one with a state to keep, and the first
    /// [`MAX_UNLISTED_REFUSALS`] by name of the others.
    fn listed_refusals(&self) -> BTreeSet<&str> {
        let (kept, others): (Vec<&str>, Vec<&str>) = self.duplicates.keys().map(String::as_str).partition(|n| self.has_state(n));
        kept.into_iter().chain(others.into_iter().take(MAX_UNLISTED_REFUSALS)).collect()
    }

    /// Whether `cm` is one of this replica's own recent writes (an event the watch delivers
    /// after a later write of its own already landed).
    fn is_own(&self, cm: Option<&ConfigMap>) -> bool {
        cm.and_then(|c| c.metadata.resource_version.as_ref()).is_some_and(|v| self.own_versions.contains(v))
    }

    /// Starts, restarts or stops remote tasks to match the remote secrets.
    fn reconcile_remotes(&mut self, secrets: &BTreeMap<String, Secret>) {
        let standing = |n: &str| {
            if self.has_state(n) {
                Standing::State
            } else if self.remotes.contains_key(n) {
                Standing::Followed
            } else {
                Standing::New
            }
        };
        let (wanted, reasons, asked) = wanted_remotes(&self.opts.secrets.namespace, secrets, standing);
        // Every refused name is kept (below), but past a few, those with no state to keep are
        // only counted in the log, as in the status (see `listed_refusals`): one secret with
        // thousands of keys must not cost a log line for each.
        let no_state: Vec<&String> = reasons.keys().filter(|n| !self.has_state(n)).collect();
        let shown: BTreeSet<String> = no_state.iter().take(MAX_UNLISTED_REFUSALS).map(|n| (*n).clone()).collect();
        let beyond = no_state.get(MAX_UNLISTED_REFUSALS).map(|first| ((*first).clone(), no_state.len() - MAX_UNLISTED_REFUSALS));
        let mut duplicates = BTreeMap::new();
        for (name, why) in reasons {
            let listed = self.has_state(&name) || shown.contains(&name);
            if listed && self.duplicates.get(&name).is_none_or(|d| d.why != why) {
                error!(peer = %name, error = %why, "remote cluster refused");
            }
            // The annotations it was followed with, else those of the one secret that asks for
            // it. Its last good state stands either way: followed before this process started
            // (the published record has it), it is not withdrawn because this process never
            // followed it; never published, there is none.
            let was = self.duplicates.remove(&name).map(|d| (d.pod_cidrs, d.allowed, d.mode_annotation));
            let was = was.or_else(|| self.remotes.get(&name).map(|r| (r.pod_cidrs.clone(), r.allowed.clone(), r.mode_annotation.clone())));
            let was = was.or_else(|| asked.get(&name).map(|w| (w.pod_cidrs.clone(), w.allowed.clone(), w.mode_annotation.clone())));
            let (pod_cidrs, allowed, mode_annotation) = was.unwrap_or_default();
            duplicates.insert(name, Duplicate { why, pod_cidrs, allowed, mode_annotation });
        }
        if beyond.as_ref().map(|(_, n)| *n) != self.unlisted_refusals {
            if let Some((first, count)) = &beyond {
                error!(count, %first, "more remote clusters refused than are listed one by one; none of these has a state to keep");
            }
            self.unlisted_refusals = beyond.map(|(_, n)| n);
        }
        self.remotes.retain(|name, _| {
            let keep = wanted.contains_key(name);
            if !keep && !duplicates.contains_key(name) {
                info!(peer = %name, "remote secret removed; withdrawing the peer");
            }
            keep
        });
        // A name refused while two secrets hold it keeps its last good state, as across any
        // other change of its secret: it is published again once one secret holds it.
        self.last_good.retain(|name, _| wanted.contains_key(name) || duplicates.contains_key(name));
        self.duplicates = duplicates;
        for (name, Wanted { origin, text, pod_cidrs: cidrs, allowed, mode_annotation }) in wanted {
            // What the task watches: the gateway's objects or the tunnel Service. A remote
            // whose mode is refused watches as a gateway remote; it is not published anyway.
            let mode = resolve::remote_mode(self.opts.modes.get(&name).copied(), mode_annotation.as_deref(), self.opts.default_mode)
                .unwrap_or_default();
            let fp = (origin.clone(), hash(&text), mode);
            if self.remotes.get(&name).is_some_and(|r| r.fingerprint == fp) {
                if let Some(r) = self.remotes.get_mut(&name) {
                    r.pod_cidrs = cidrs;
                    r.allowed = allowed;
                    r.mode_annotation = mode_annotation;
                }
                continue;
            }
            self.next_generation += 1;
            let generation = self.next_generation;
            let who = name.clone();
            let task = tokio::spawn(remote::remote_task(
                origin,
                text,
                mode,
                self.opts.clone(),
                self.tx.clone(),
                move |event| Msg::Remote { name: who.clone(), generation, event },
                self.lists.clone(),
            ));
            info!(peer = %name, ?mode, "watching remote cluster");
            self.remotes.insert(
                name,
                Remote {
                    fingerprint: fp,
                    generation,
                    task,
                    pod_cidrs: cidrs,
                    allowed,
                    mode_annotation,
                    view: None,
                    stale: true,
                    error: None,
                    refused: None,
                },
            );
        }
    }

    /// Takes what was published before, once read: peers whose remote has not synced yet
    /// keep it, and so do hand-written networks while `meshNetworks` is unreadable. The one
    /// place for it, whether the first read works at the start or only before a publish.
    fn start_from(&mut self, Stored { peers: cm, record, listed }: Stored) {
        match Published::parse(cm.as_ref()) {
            Published::Unreadable(e) => warn!(error = %e, "the published peers are unreadable; starting without them"),
            Published::Entries(entries) => {
                for e in entries {
                    if let PublishedEntry::Bad { index, name, error } = e {
                        warn!(index, peer = ?name, error = %error, "a published peer is unreadable; starting without it");
                    }
                }
            }
            Published::Missing => {}
        }
        let peers = cm.as_ref().map(published::readable_peers).unwrap_or_default();
        info!(peers = peers.len(), held = record.len().saturating_sub(peers.len()), "starting from the published peers");
        let peers: BTreeMap<String, RawPeer> = peers.into_iter().map(|p| (p.name.clone(), p)).collect();
        // A controller that found the ConfigMap missing at its start publishes no network of it.
        if !matches!(self.istio, Some(None)) {
            self.hand.clone_from(&peers);
        }
        // Nothing resolved yet: no peer is published before this.
        self.last_good = peers;
        self.published_peers = record;
        self.live.clone_from(&listed);
        self.listed = listed;
        self.published_seen = true;
    }

    /// Whether every source a withdrawal could be based on has synced.
    fn synced(&self) -> bool {
        self.secrets_synced && self.local.is_some() && self.istio.is_some() && self.published_seen
    }

    /// Decides what to publish and takes note of it: each peer resolved now becomes its
    /// remote's last good state, and each new refusal is logged and counted once.
    fn desired(&mut self) -> Desired {
        let mut d = {
            let remotes: BTreeMap<String, RemoteInput<'_>> = self
                .remotes
                .iter()
                .map(|(name, r)| {
                    let input = RemoteInput {
                        view: r.view.as_ref(),
                        stale: r.stale,
                        error: r.error.as_deref(),
                        refused: r.refused.as_deref(),
                        pod_cidrs: r.pod_cidrs.as_ref(),
                        allowed: r.allowed.as_ref(),
                        mode_annotation: r.mode_annotation.as_deref(),
                    };
                    (name.clone(), input)
                })
                // Neither kubeconfig is followed, and the peer stays at its last known state, as
                // through an outage: a rotation that adds the new secret before it deletes the
                // old one must not withdraw the peer (and reset its flows) on every node.
                .chain(self.duplicates.iter().map(|(name, d)| {
                    let input = RemoteInput {
                        stale: true,
                        error: Some(&d.why),
                        pod_cidrs: d.pod_cidrs.as_ref(),
                        allowed: d.allowed.as_ref(),
                        mode_annotation: d.mode_annotation.as_deref(),
                        ..RemoteInput::default()
                    };
                    (name.clone(), input)
                }))
                .collect();
            desired::desired(&Inputs {
                remotes: &remotes,
                resolve: &self.opts.resolve,
                pod_cidrs: &self.opts.pod_cidrs,
                allowed_cidrs: &self.opts.allowed_cidrs,
                modes: &self.opts.modes,
                default_mode: self.opts.default_mode,
                service_cidrs: &self.opts.service_cidrs,
                local: self.local.as_deref().unwrap_or_default(),
                istio: self.istio.as_ref().and_then(Option::as_ref),
                hand: &self.hand,
                last_good: &self.last_good,
                published: &self.published_peers,
                listed: &self.live,
            })
        };
        // Only their presentation is bounded: every refused remote is an input as before.
        let listed = self.listed_refusals();
        d.status.retain(|name, _| !self.duplicates.contains_key(name) || listed.contains(name.as_str()));
        d.refused.retain(|name, _| !self.duplicates.contains_key(name) || listed.contains(name.as_str()));
        for w in d.warnings.iter().filter(|w| !self.warned.contains(w)) {
            warn!("{w}");
        }
        self.warned.clone_from(&d.warnings);
        self.hand.clone_from(&d.hand);
        self.last_good.extend(d.resolved.iter().map(|(n, p)| (n.clone(), p.clone())));
        for (name, why) in &d.refused {
            if self.refusals.get(name) != Some(why) {
                warn!(peer = %name, reason = %why, "peer refused");
                self.metrics.refused.get_or_create(&PeerLabel { peer: name.clone() }).inc();
                self.refused_series.insert(name.clone());
            }
        }
        self.refused_series.retain(|name| {
            let known = d.status.contains_key(name) || d.refused.contains_key(name);
            if !known {
                self.metrics.refused.remove(&PeerLabel { peer: name.clone() });
            }
            known
        });
        self.refusals.clone_from(&d.refused);
        for (name, what) in &d.clashes {
            if self.clashes.get(name) != Some(what) {
                warn!(peer = %name, clash = %what, "a local Node claims what a published peer holds; the peer keeps it");
            }
        }
        self.clashes.clone_from(&d.clashes);
        d
    }

    async fn publish(&mut self) -> anyhow::Result<()> {
        if !self.published_seen {
            // Retried on failure: nothing is published before this replica knows who holds what.
            let cms = Api::<ConfigMap>::namespaced(self.client.clone(), &self.opts.namespace);
            let stored = read_record(&cms).await?;
            self.start_from(stored);
            // Remotes chosen before this read (the record's first read failed, or a new
            // leadership reads it again) may not have known who was published: chosen again,
            // those published keep their place among the 1,024. Not before the secrets are
            // seen: their absence would end every last good state the record just gave.
            if self.secrets_synced {
                let secrets = self.secrets.clone();
                self.reconcile_remotes(&secrets);
            }
        }
        if !self.synced() {
            debug!("not publishing until the local watches have synced");
            return Ok(());
        }
        let Desired { mut peers, mut status, .. } = self.desired();
        // One remote's enormous entry must not hold back every other peer's updates: the
        // largest entries are left out until the rest fits, each with its reason.
        let left_out = fit_published(&mut peers)?;
        for (name, bytes) in &left_out {
            status.entry(name.clone()).or_default().refused = Some(format!(
                "its entry is {bytes} bytes, and with it {PEERS_KEY} would be over the {MAX_PUBLISHED_BYTES} bytes a ConfigMap \
                 can hold; the largest entries are left out first. Fewer, aggregated pod CIDRs (--pod-cidrs or the \
                 {POD_CIDRS_ANNOTATION} annotation) make it fit"
            ));
        }
        // Who holds what: only configured peers (each has a status) keep an entry.
        self.published_peers.retain(|name, _| status.contains_key(name));
        let names: Vec<&String> = left_out.iter().map(|(n, _)| n).collect();
        if !names.is_empty() && self.metrics.too_large.get() == 0 {
            error!(peers = ?names, "peers left out of {PEERS_KEY}: too large to publish beside the others");
        }
        self.metrics.too_large.set(i64::from(!names.is_empty()));
        self.metrics.observe(&status, peers.len());
        if !self.leader {
            return Ok(());
        }
        let peers_text = serde_yaml::to_string(&peers)?;
        let mut status_text = serde_yaml::to_string(&status)?;
        let why_not = too_large(&peers_text);
        if let Some(why) = &why_not {
            // Retrying could never succeed: the agents keep what was last published, and the
            // status says why nothing newer reaches them.
            if self.metrics.too_large.get() == 0 {
                error!(bytes = peers_text.len(), "{why}");
            }
            self.metrics.too_large.set(1);
            status_text = format!("{status_text}# {why}\n");
        }
        if too_large(&status_text).is_some() {
            status_text = format!("# {} peers; the status of each is too large to publish\n", status.len());
        }
        // The holds go out before the peers object: a peer it stops listing is held first, and
        // one it lists again keeps its hold until the write that lists it has landed.
        self.write_holds(&peers).await?;
        if why_not.is_none() && self.published.0.as_ref() != Some(&peers_text) {
            self.apply(PEERS_CONFIGMAP, PEERS_KEY, &peers_text).await?;
            info!(peers = ?peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), "published peers");
            self.metrics.published();
            self.published.0 = Some(peers_text);
            self.listed = peers.iter().map(|p| p.name.clone()).collect();
            self.live.clone_from(&self.listed);
            self.published_peers.extend(peers.iter().map(|p| (p.name.clone(), p.clone())));
            self.write_holds(&peers).await?;
        }
        if self.published.1.as_ref() != Some(&status_text) {
            self.apply(STATUS_CONFIGMAP, STATUS_KEY, &status_text).await?;
            self.published.1 = Some(status_text);
        }
        Ok(())
    }

    /// Writes the holds: what each configured peer that the peers object may not list (about
    /// to be written as `peers`) was last published with.
    async fn write_holds(&mut self, peers: &[RawPeer]) -> anyhow::Result<()> {
        let listed = |name: &str| self.listed.contains(name) && peers.iter().any(|p| p.name == name);
        let mut holds: Vec<RawPeer> = self.published_peers.values().filter(|p| !listed(&p.name)).cloned().collect();
        // The largest go first: a remote that made its own record enormous loses its own hold
        // across a restart, not anyone else's.
        let left_out: Vec<String> = fit_published(&mut holds)?.into_iter().map(|(name, bytes)| format!("{name} ({bytes} bytes)")).collect();
        if left_out != self.holds_left_out && !left_out.is_empty() {
            warn!(peers = ?left_out, "holds too large to keep beside the others; a restart forgets them");
        }
        self.holds_left_out = left_out;
        let text = serde_yaml::to_string(&holds)?;
        if self.holds_written.as_ref() != Some(&text) {
            self.apply(HOLDS_CONFIGMAP, HOLDS_KEY, &text).await?;
            self.holds_written = Some(text);
        }
        Ok(())
    }

    /// Writes one of the controller's ConfigMaps with server-side apply: the controller owns
    /// every field it writes, and its write wins over an edit by hand (the same as what a
    /// new leader must do over a late write of the old one). Creates it if it is missing.
    async fn apply(&mut self, name: &str, key: &str, text: &str) -> anyhow::Result<()> {
        // A write after the lease ran out could undo the new leader's: of the holds, say. So
        // none starts then, and none is still waited for then.
        let lease_end = self.opts.leader_election.then_some(self.lead_until);
        if lease_end.is_some_and(|end| end.is_none_or(|t| tokio::time::Instant::now() >= t)) {
            anyhow::bail!("not writing {name}: this replica's lease ran out");
        }
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.opts.namespace);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(self.opts.namespace.clone()),
                labels: Some([("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string())].into()),
                ..ObjectMeta::default()
            },
            data: Some([(key.to_string(), text.to_string())].into()),
            ..ConfigMap::default()
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let (what, patch) = (format!("writing {name}"), Patch::Apply(&cm));
        let write = bounded(&what, api.patch(name, &params, &patch));
        let written = match lease_end.flatten() {
            Some(end) => tokio::time::timeout_at(end, write).await.map_err(|_| anyhow::anyhow!("writing {name}: the lease ran out first"))??,
            None => write.await?,
        };
        // Only the watched objects' versions: the status's would push theirs out.
        if let Some(v) = written.metadata.resource_version.filter(|_| name != STATUS_CONFIGMAP) {
            if self.own_versions.len() == 64 {
                self.own_versions.pop_front();
            }
            self.own_versions.push_back(v);
        }
        Ok(())
    }
}

/// Where a remote cluster's name stands when there are more than [`MAX_REMOTES`]: the
/// earlier, the surer its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    /// Its peer has a state (see `State::has_state`).
    State,
    /// Followed by this process, nothing resolved yet.
    Followed,
    New,
}

/// A cluster name that two remote secrets hold (see [`State::duplicates`]).
struct Duplicate {
    why: String,
    pod_cidrs: Option<Result<Vec<Ipv4Net>, String>>,
    allowed: Option<Result<Vec<Ipv4Net>, String>>,
    mode_annotation: Option<String>,
}

/// What one remote secret's key asks for.
#[derive(Clone, PartialEq, Eq)]
struct Wanted {
    /// `namespace/secret[key]`.
    origin: String,
    /// The kubeconfig.
    text: String,
    /// The pod CIDRs annotation: `Err` when it is unreadable, which refuses the peer.
    pod_cidrs: Option<Result<Vec<Ipv4Net>, String>>,
    /// The allow-list annotation: `Err` when it is unreadable, which refuses the peer.
    allowed: Option<Result<Vec<Ipv4Net>, String>>,
    mode_annotation: Option<String>,
}

/// The kubeconfig holds a token or a client key: a `{:?}` in a log line or a panic message
/// must not print it.
impl std::fmt::Debug for Wanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wanted")
            .field("origin", &self.origin)
            .field("text", &format_args!("<redacted, {} bytes>", self.text.len()))
            .field("pod_cidrs", &self.pod_cidrs)
            .field("allowed", &self.allowed)
            .field("mode_annotation", &self.mode_annotation)
            .finish()
    }
}

/// The cluster names that more than one of `secrets` (by name) holds a key for, with why.
/// Whichever secret won would be the later name's, so whoever may create a secret there
/// could take over a cluster another secret holds: none of them is used.
pub(super) fn held_twice<'a>(namespace: &str, secrets: impl IntoIterator<Item = (&'a str, &'a Secret)>) -> BTreeMap<String, String> {
    let mut sources: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (sname, secret) in secrets {
        for cluster in secret.data.iter().flatten().map(|(k, _)| k) {
            sources.entry(cluster).or_default().push(format!("{namespace}/{sname}[{cluster}]"));
        }
    }
    sources
        .into_iter()
        .filter(|(_, origins)| origins.len() > 1)
        .map(|(cluster, origins)| {
            let why = format!(
                "more than one remote secret holds a kubeconfig for this cluster ({}); none is followed until only one does",
                origins.join(", ")
            );
            (cluster.to_owned(), why)
        })
        .collect()
}

/// The most kubeconfigs followed from one remote secret. `istioctl x create-remote-secret`
/// writes one; each is a remote task with its own connections, so one object holding
/// thousands of keys (a Secret may hold 1 MiB) must not start thousands of them.
pub(super) const MAX_KEYS_PER_SECRET: usize = 16;

/// The most refused remote clusters without a state to keep that get a log line, a status
/// entry and a metrics series each; the rest are counted in one log line.
pub(super) const MAX_UNLISTED_REFUSALS: usize = 64;

/// The most remote clusters followed: as many peers as the datapath holds.
pub(super) const MAX_REMOTES: usize = meshnet_common::limits::MAX_PEERS as usize;

/// The remotes the secrets in `namespace` ask for, by cluster name (each data key is one),
/// and the names refused, with why: held by two secrets (see [`held_twice`]), in a secret
/// with more than [`MAX_KEYS_PER_SECRET`] keys (all of its keys), or past [`MAX_REMOTES`]
/// names: those with a [`Standing`] keep their place, those with a state first, and new ones
/// take the room left by name, so that a new secret never pushes out a peer whose traffic
/// flows. A refused name keeps what was published for it. Last, what one secret alone asks
/// for each refused name it holds (not a name two secrets hold).
fn wanted_remotes(
    namespace: &str,
    secrets: &BTreeMap<String, Secret>,
    standing: impl Fn(&str) -> Standing,
) -> (BTreeMap<String, Wanted>, BTreeMap<String, String>, BTreeMap<String, Wanted>) {
    let twice = held_twice(namespace, secrets.iter().map(|(n, s)| (n.as_str(), s)));
    let mut refused = twice.clone();
    let mut asked = BTreeMap::new();
    for (sname, secret) in secrets {
        let keys = secret.data.as_ref().map_or(0, BTreeMap::len);
        if keys > MAX_KEYS_PER_SECRET {
            let why = format!(
                "remote secret {namespace}/{sname} holds {keys} kubeconfigs, more than the {MAX_KEYS_PER_SECRET} meshnet follows from one secret; none of them is followed"
            );
            for cluster in secret.data.iter().flatten().map(|(k, _)| k) {
                refused.entry(cluster.clone()).or_insert_with(|| why.clone());
            }
        }
    }
    let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
    for (sname, secret) in secrets {
        let pod_cidrs = secret
            .annotations()
            .get(POD_CIDRS_ANNOTATION)
            .map(|v| parse_cidrs(v));
        let allowed = secret.annotations().get(ALLOWED_CIDRS_ANNOTATION).map(|v| parse_cidrs(v));
        let mode_annotation = secret.annotations().get(MODE_ANNOTATION).cloned();
        for (cluster, data) in secret.data.iter().flatten() {
            let w = Wanted {
                origin: format!("{namespace}/{sname}[{cluster}]"),
                text: String::from_utf8_lossy(&data.0).into_owned(),
                pod_cidrs: pod_cidrs.clone(),
                allowed: allowed.clone(),
                mode_annotation: mode_annotation.clone(),
            };
            if !refused.contains_key(cluster) {
                wanted.insert(cluster.clone(), w);
            } else if !twice.contains_key(cluster) {
                asked.insert(cluster.clone(), w);
            }
        }
    }
    // A name with a standing refused for now (two secrets hold it while one rotates) keeps
    // its place too: it comes back when the refusal ends.
    let reserved = refused.keys().filter(|n| standing(n) != Standing::New).count();
    let mut order: Vec<&String> = wanted.keys().collect();
    // Stable: by name within each standing.
    order.sort_by_key(|n| standing(n));
    let past: Vec<String> = order.into_iter().skip(MAX_REMOTES.saturating_sub(reserved)).cloned().collect();
    for name in past {
        asked.extend(wanted.remove_entry(&name));
        let why = format!(
            "more remote clusters than meshnet follows (at most {MAX_REMOTES}): those with a state keep their place first, then those followed without one, and new ones take the room left by name"
        );
        refused.insert(name, why);
    }
    (wanted, refused, asked)
}

/// When to publish again after a failure, and whether to say so. An error that persists (a
/// 403, a webhook that denies the write) must not cost the API server a few calls and the log
/// a line every second: the retries back off, and one error is logged once while it lasts.
#[derive(Debug, Default)]
struct PublishRetry {
    /// Failures since the last success.
    failures: u32,
    /// The error last logged, while publishing fails.
    logged: Option<String>,
}

/// When to publish after a change, given when a publish was already due (`None`: none is)
/// and when the last one was tried. Bursts (a relist delivers many events) coalesce into one
/// publish; a change while a failed publish waits for its retry goes out within
/// [`RETRY_FIRST`], not after the backoff: it may be what the failure needs. Never sooner than
/// [`REPUBLISH_MIN`] after the last: a remote whose objects change without pause (nodes
/// flapping, or an API server that means harm) must not have every agent of the cluster
/// resync, and the API server send each of them the ConfigMap, many times a second.
fn publish_after_change(due: Option<tokio::time::Instant>, now: tokio::time::Instant, last: Option<tokio::time::Instant>) -> tokio::time::Instant {
    let at = match due {
        Some(due) => due.min(now + RETRY_FIRST),
        None => now + Duration::from_millis(50),
    };
    last.map_or(at, |l| at.max(l + REPUBLISH_MIN))
}

/// The shortest time between two publishes.
const REPUBLISH_MIN: Duration = Duration::from_secs(1);

/// The first retry's delay; each failure doubles it, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl PublishRetry {
    /// Takes note of a failure with `error`: how long to wait, and whether to log it (not
    /// when it is the one logged last).
    fn failed(&mut self, error: &str) -> (Duration, bool) {
        let after = RETRY_FIRST.saturating_mul(1 << self.failures.min(16)).min(RETRY_MAX);
        self.failures = self.failures.saturating_add(1);
        let log = self.logged.as_deref() != Some(error);
        if log {
            self.logged = Some(error.to_owned());
        }
        (after, log)
    }

    /// Takes note of a success: whether publishing had been failing.
    fn succeeded(&mut self) -> bool {
        self.logged = None;
        std::mem::take(&mut self.failures) > 0
    }
}

/// Who holds what, as stored.
struct Stored {
    /// The peers object.
    peers: Option<ConfigMap>,
    /// The published peers, and what each configured peer that they do not list was last
    /// published with (`meshnet-holds`).
    record: BTreeMap<String, RawPeer>,
    /// The names the peers object lists.
    listed: BTreeSet<String>,
}

/// Reads who holds what. The peers object is read on both sides of the holds: a writer
/// holds a peer before the peers object stops listing it and lets the hold go only after it
/// lists it again, so when the peers object did not change in between, every peer is in one
/// or the other.
async fn read_record(cms: &Api<ConfigMap>) -> anyhow::Result<Stored> {
    let version = |cm: &Option<ConfigMap>| cm.as_ref().map(|c| c.metadata.resource_version.clone());
    for _ in 0..3 {
        let before = bounded("reading the published peers", cms.get_opt(PEERS_CONFIGMAP)).await?;
        let holds = bounded("reading the peers' holds", cms.get_opt(HOLDS_CONFIGMAP)).await?;
        let peers = bounded("reading the published peers", cms.get_opt(PEERS_CONFIGMAP)).await?;
        if version(&before) != version(&peers) {
            continue;
        }
        let held = match published::parse_holds(holds.as_ref()) {
            Published::Missing => Vec::new(),
            Published::Unreadable(e) => {
                warn!(error = %e, "the holds are unreadable; only the published peers hold anything");
                Vec::new()
            }
            Published::Entries(entries) => entries
                .into_iter()
                .filter_map(|e| match e {
                    PublishedEntry::Peer(p) => Some(p),
                    PublishedEntry::Bad { index, name, error } => {
                        warn!(index, peer = ?name, error = %error, "a hold is unreadable; it holds nothing");
                        None
                    }
                })
                .collect(),
        };
        let listed_peers = peers.as_ref().map(published::readable_peers).unwrap_or_default();
        let listed = listed_peers.iter().map(|p| p.name.clone()).collect();
        // A peer the peers object lists holds what it lists, whatever an older hold says.
        let record = held.into_iter().chain(listed_peers).map(|p| (p.name.clone(), p)).collect();
        return Ok(Stored { peers, record, listed });
    }
    anyhow::bail!("{PEERS_CONFIGMAP} changed at every read of the holds")
}

/// What one ConfigMap key may hold: the API server refuses objects over 1 MiB (etcd's
/// request limit), and the rest of the object needs some room.
const MAX_PUBLISHED_BYTES: usize = 1_000_000;

/// Why `text` cannot be published, if it cannot.
fn too_large(text: &str) -> Option<String> {
    (text.len() > MAX_PUBLISHED_BYTES).then(|| {
        format!(
            "not publishing: {PEERS_KEY} would be {} bytes, over the {MAX_PUBLISHED_BYTES} a ConfigMap can hold; \
             the agents keep the last published peers. Fewer, aggregated pod CIDRs per peer \
             (--pod-cidrs or the {POD_CIDRS_ANNOTATION} annotation) make it fit",
            text.len()
        )
    })
}

/// Leaves the largest peers out of `peers` until their list fits one ConfigMap;
/// returns each left out with the bytes its entry takes. A YAML sequence is its entries'
/// texts one after the other, so each entry is measured once.
fn fit_published(peers: &mut Vec<RawPeer>) -> anyhow::Result<Vec<(String, usize)>> {
    let sizes: Vec<usize> = peers.iter().map(|p| serde_yaml::to_string(std::slice::from_ref(p)).map(|t| t.len())).collect::<Result<_, _>>()?;
    let mut total: usize = sizes.iter().sum();
    let mut by_size: Vec<usize> = (0..peers.len()).collect();
    // Largest first; of equal sizes, the later name first, so that the choice is stable.
    by_size.sort_by(|a, b| sizes[*b].cmp(&sizes[*a]).then(peers[*b].name.cmp(&peers[*a].name)));
    let mut out = BTreeSet::new();
    for i in by_size {
        if total <= MAX_PUBLISHED_BYTES {
            break;
        }
        total -= sizes[i];
        out.insert(i);
    }
    let mut left_out = Vec::new();
    let mut i = 0;
    peers.retain(|p| {
        let keep = !out.contains(&i);
        if !keep {
            left_out.push((p.name.clone(), sizes[i]));
        }
        i += 1;
        keep
    });
    Ok(left_out)
}

/// The field manager of the controller's server-side applies.
const FIELD_MANAGER: &str = "meshnet-controller";

/// The CIDRs of a remote secret's annotation (the allow-list, the pod CIDRs). Any entry that
/// is not a CIDR makes the whole list unreadable: a typo must not widen what a remote may
/// claim, nor publish part of what it holds. The entry is quoted and cut: whoever writes the
/// secret writes it, and it goes to the status and the log.
fn parse_cidrs(v: &str) -> Result<Vec<Ipv4Net>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<Ipv4Net>().map_err(|_| format!("{} is not an IPv4 CIDR", resolve::Quoted(c))))
        .collect()
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_past_a_configmaps_limit_are_refused_with_a_reason() {
        assert_eq!(too_large(&"x".repeat(MAX_PUBLISHED_BYTES)), None);
        let why = too_large(&"x".repeat(MAX_PUBLISHED_BYTES + 1)).unwrap();
        assert!(why.contains("1000001 bytes") && why.contains("keep the last published peers"), "{why}");
    }

    /// One enormous peer is left out, with its size, and the others are published; peers that
    /// fit together are all kept.
    #[test]
    fn the_largest_peers_are_left_out_until_the_rest_fits() {
        let peer = |name: &str, cidrs: u32| RawPeer {
            name: name.into(),
            pod_cidrs: (0..cidrs).map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0b00_0000 + i * 2))).collect(),
            ..RawPeer::default()
        };
        let mut peers = vec![peer("a", 10), peer("huge", 60_000), peer("z", 10)];
        let left_out = fit_published(&mut peers).unwrap();
        assert_eq!(peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "z"]);
        assert_eq!(left_out.len(), 1);
        assert_eq!(left_out[0].0, "huge");
        assert!(left_out[0].1 > MAX_PUBLISHED_BYTES, "{left_out:?}");
        assert!(too_large(&serde_yaml::to_string(&peers).unwrap()).is_none());
        // Two that are too large only together: the larger goes.
        let mut peers = vec![peer("b", 30_000), peer("c", 31_000), peer("d", 5)];
        let left_out = fit_published(&mut peers).unwrap();
        assert_eq!(left_out.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["c"]);
        assert!(too_large(&serde_yaml::to_string(&peers).unwrap()).is_none());
        let mut small = vec![peer("a", 3), peer("b", 3)];
        assert!(fit_published(&mut small).unwrap().is_empty() && small.len() == 2);
    }

    fn secret(name: &str, keys: &[&str], annotations: &[(&str, &str)]) -> (String, Secret) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(annotations.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()),
                ..ObjectMeta::default()
            },
            data: Some(keys.iter().map(|k| ((*k).to_string(), k8s_openapi::ByteString(format!("kubeconfig of {name}").into_bytes()))).collect()),
            ..Secret::default()
        };
        (name.to_owned(), secret)
    }

    /// Whoever can write one remote secret must not take over a cluster another one holds:
    /// two kubeconfigs for one name, and neither is used; the reason names every source.
    #[test]
    fn a_cluster_in_two_remote_secrets_follows_neither() {
        let secrets = [
            secret("a-istio-remote-secret", &["cluster2", "cluster3"], &[]),
            secret("z-planted", &["cluster2", "cluster4"], &[]),
            secret("b-third", &["cluster4"], &[]),
        ]
        .into();
        let (wanted, refused, _) = wanted_remotes("istio-system", &secrets, |_| Standing::New);
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["cluster3"]);
        assert_eq!(wanted["cluster3"].text, "kubeconfig of a-istio-remote-secret");
        assert_eq!(
            refused,
            BTreeMap::from([
                (
                    "cluster2".to_owned(),
                    "more than one remote secret holds a kubeconfig for this cluster (istio-system/a-istio-remote-secret[cluster2], \
                     istio-system/z-planted[cluster2]); none is followed until only one does"
                        .to_owned()
                ),
                (
                    "cluster4".to_owned(),
                    "more than one remote secret holds a kubeconfig for this cluster (istio-system/b-third[cluster4], \
                     istio-system/z-planted[cluster4]); none is followed until only one does"
                        .to_owned()
                ),
            ])
        );
        // One secret each: no refusal.
        let (wanted, refused, _) = wanted_remotes("istio-system", &[secret("a", &["cluster2"], &[]), secret("b", &["cluster3"], &[])].into(), |_| Standing::New);
        assert_eq!(wanted.len(), 2);
        assert!(refused.is_empty());
    }

    /// One secret with a key per cluster by the thousand starts no remote task for any of
    /// them, and the remotes followed stay within what the datapath holds.
    #[test]
    fn remote_secrets_are_followed_within_bounds() {
        fn keys(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let names = |n: usize, prefix: &str| (0..n).map(|i| format!("{prefix}{i:04}")).collect::<Vec<_>>();
        let many = names(MAX_KEYS_PER_SECRET + 1, "bulk");
        let full = names(MAX_KEYS_PER_SECRET, "full");
        let secrets = [secret("bulk", &keys(&many), &[(MODE_ANNOTATION, "tunnel")]), secret("full", &keys(&full), &[]), secret("one", &["cluster2"], &[])].into();
        let (wanted, refused, asked) = wanted_remotes("istio-system", &secrets, |_| Standing::New);
        assert_eq!(wanted.len(), MAX_KEYS_PER_SECRET + 1, "{:?}", wanted.keys().collect::<Vec<_>>());
        assert!(wanted.contains_key("cluster2") && full.iter().all(|k| wanted.contains_key(k)));
        assert_eq!(refused.keys().cloned().collect::<Vec<_>>(), many);
        assert!(refused["bulk0000"].contains(&format!("holds {} kubeconfigs", MAX_KEYS_PER_SECRET + 1)), "{}", refused["bulk0000"]);
        // What the one secret asks for each refused name: the annotations its last good state
        // keeps being judged by.
        assert_eq!(asked.keys().cloned().collect::<Vec<_>>(), many);
        assert_eq!(asked["bulk0000"].mode_annotation.as_deref(), Some("tunnel"));

        let per_secret: Vec<Vec<String>> = names(MAX_REMOTES + 2, "c").chunks(MAX_KEYS_PER_SECRET).map(<[String]>::to_vec).collect();
        let secrets: BTreeMap<String, Secret> = per_secret.iter().enumerate().map(|(i, k)| secret(&format!("s{i:03}"), &keys(k), &[])).collect();
        let (wanted, refused, asked) = wanted_remotes("istio-system", &secrets, |_| Standing::New);
        assert_eq!(wanted.len(), MAX_REMOTES);
        assert_eq!(asked.keys().collect::<Vec<_>>(), refused.keys().collect::<Vec<_>>());
        assert_eq!(refused.keys().cloned().collect::<Vec<_>>(), [format!("c{MAX_REMOTES:04}"), format!("c{:04}", MAX_REMOTES + 1)]);
        assert!(refused.values().all(|why| why.contains("at most")), "{refused:?}");

        // Full, a new name first by name does not push out a remote already followed: the
        // new one is refused, and the followed ones stay.
        let followed: Vec<String> = wanted.keys().cloned().collect();
        let mut secrets = secrets;
        secrets.extend([secret("early", &["a-new-cluster"], &[])]);
        let (wanted, refused, _) = wanted_remotes("istio-system", &secrets, |n| if followed.contains(&n.to_string()) { Standing::State } else { Standing::New });
        assert_eq!(wanted.keys().cloned().collect::<Vec<_>>(), followed, "a followed remote lost its place");
        assert_eq!(refused.keys().cloned().collect::<Vec<_>>(), ["a-new-cluster".to_string(), format!("c{MAX_REMOTES:04}"), format!("c{:04}", MAX_REMOTES + 1)]);
        // A followed remote that two secrets hold for a while (a rotation) keeps its place:
        // the new name does not take it.
        let mut rotating = secrets.clone();
        rotating.extend([secret("rotated", &["c0005"], &[])]);
        let (wanted, refused, _) = wanted_remotes("istio-system", &rotating, |n| if followed.contains(&n.to_string()) { Standing::State } else { Standing::New });
        assert!(refused.contains_key("c0005") && refused.contains_key("a-new-cluster"), "{:?}", refused.keys().collect::<Vec<_>>());
        assert_eq!(wanted.len(), MAX_REMOTES - 1);
        // Followed blindly (a controller that could not read what was published when it
        // started), the first 1,024 by name give way to a published name once it is known,
        // before one followed without a state yet.
        let blind: BTreeSet<&String> = followed.iter().collect();
        let mut late = secrets.clone();
        late.extend([secret("zz-published", &["zz-published"], &[])]);
        let standing = |n: &str| {
            if n == "zz-published" {
                Standing::State
            } else if blind.contains(&n.to_string()) {
                Standing::Followed
            } else {
                Standing::New
            }
        };
        let (wanted, refused, _) = wanted_remotes("istio-system", &late, standing);
        assert!(wanted.contains_key("zz-published") && wanted.len() == MAX_REMOTES, "{:?}", refused.keys().collect::<Vec<_>>());
        assert!(refused.contains_key("a-new-cluster") && refused.contains_key(&format!("c{:04}", MAX_REMOTES - 1)), "{:?}", refused.keys().collect::<Vec<_>>());

        // A secret of followed remotes gone, the room it leaves goes to the new names.
        secrets.remove("s000");
        let (wanted, refused, _) = wanted_remotes("istio-system", &secrets, |n| if followed.contains(&n.to_string()) { Standing::State } else { Standing::New });
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(wanted.len(), MAX_REMOTES - MAX_KEYS_PER_SECRET + 3);
        assert!(["a-new-cluster".to_string(), format!("c{MAX_REMOTES:04}")].iter().all(|n| wanted.contains_key(n)));
    }

    /// Nothing that prints a remote secret's key for a log line or a failed assertion shows
    /// its credentials.
    #[test]
    fn a_wanted_remote_never_prints_its_kubeconfig() {
        let token = "eyJhbGciOiJSUzI1NiJ9.planted-token";
        let mut secrets: BTreeMap<String, Secret> = [secret("s", &["cluster2"], &[])].into();
        let data = secrets.get_mut("s").and_then(|s| s.data.as_mut()).unwrap();
        let text = format!("users:\n- name: u\n  user:\n    token: {token}\n");
        data.insert("cluster2".into(), k8s_openapi::ByteString(text.clone().into_bytes()));
        let (wanted, _, _) = wanted_remotes("istio-system", &secrets, |_| Standing::New);
        let shown = format!("{wanted:?}");
        assert!(!shown.contains("planted-token"), "{shown}");
        assert!(shown.contains(&format!("<redacted, {} bytes>", text.len())) && shown.contains("istio-system/s[cluster2]"), "{shown}");
    }

    /// A persistent error is retried less and less often, up to half a minute apart, and
    /// logged once; another error is logged when it comes, and a success starts over.
    #[test]
    fn publish_retries_back_off_and_log_each_error_once() {
        let mut r = PublishRetry::default();
        let schedule: Vec<(u64, bool)> = (0..9).map(|_| r.failed("403 Forbidden")).map(|(d, log)| (d.as_secs(), log)).collect();
        assert_eq!(
            schedule,
            [(1, true), (2, false), (4, false), (8, false), (16, false), (30, false), (30, false), (30, false), (30, false)]
        );
        for _ in 0..100 {
            r.failed("403 Forbidden");
        }
        assert_eq!(r.failed("403 Forbidden"), (RETRY_MAX, false), "the delay stays capped");
        assert_eq!(r.failed("denied by webhook"), (RETRY_MAX, true), "a new error is logged, and the backoff goes on");
        assert_eq!(r.failed("403 Forbidden"), (RETRY_MAX, true), "so is one that comes back");
        assert!(r.succeeded(), "a success after failures is said");
        assert!(!r.succeeded());
        assert_eq!(r.failed("403 Forbidden"), (RETRY_FIRST, true), "a success starts over");
        assert_eq!(r.failed("403 Forbidden"), (2 * RETRY_FIRST, false));
    }

    /// A change is published 50 ms on, with the rest of its burst; one that comes while a failed
    /// publish waits out its backoff goes within a second, and never later than what was due.
    #[test]
    fn a_change_while_a_failed_publish_waits_goes_out_within_a_second() {
        let now = tokio::time::Instant::now();
        assert_eq!(publish_after_change(None, now, None), now + Duration::from_millis(50));
        assert_eq!(publish_after_change(Some(now + RETRY_MAX), now, None), now + RETRY_FIRST, "the backoff is not waited out");
        let mut r = PublishRetry::default();
        let backoff = (0..10).map(|_| r.failed("403 Forbidden").0).last().unwrap();
        assert_eq!(publish_after_change(Some(now + backoff), now, None), now + RETRY_FIRST);
        let burst = now + Duration::from_millis(50);
        assert_eq!(publish_after_change(Some(burst), now + Duration::from_millis(10), None), burst, "a burst is not put off");
    }

    /// Changes without pause are published once a second at most, and one after a quiet second
    /// goes out as before.
    #[test]
    fn publishes_are_a_second_apart_at_least() {
        let now = tokio::time::Instant::now();
        let last = now - Duration::from_millis(200);
        assert_eq!(publish_after_change(None, now, Some(last)), last + REPUBLISH_MIN);
        assert_eq!(publish_after_change(Some(now + Duration::from_millis(10)), now, Some(last)), last + REPUBLISH_MIN);
        let quiet = now - Duration::from_secs(5);
        assert_eq!(publish_after_change(None, now, Some(quiet)), now + Duration::from_millis(50));
    }

    /// A typo in the pod CIDRs annotation must not publish what is left of it: an entry that is
    /// not a CIDR refuses the peer, naming the entry, quoted and cut, as the allow-list does.
    #[test]
    fn pod_cidr_annotations_fail_closed() {
        let read = |v: &str| {
            let (wanted, _, _) = wanted_remotes("istio-system", &[secret("s", &["cluster2"], &[(POD_CIDRS_ANNOTATION, v)])].into(), |_| Standing::New);
            wanted["cluster2"].pod_cidrs.clone().unwrap()
        };
        assert_eq!(read(" 10.245.0.0/16, 10.246.0.0/24 ,"), Ok(vec!["10.245.0.0/16".parse().unwrap(), "10.246.0.0/24".parse().unwrap()]));
        assert_eq!(read("10.245.0.0/16,10.246.0.0"), Err("\"10.246.0.0\" is not an IPv4 CIDR".into()));
        let e = read(&format!("10.245.0.0/16,10.\n{}", "9".repeat(256 * 1024))).unwrap_err();
        assert!(e.len() < 160 && e.starts_with("\"10.\\n999") && !e.contains('\n'), "{e}");
        let (wanted, _, _) = wanted_remotes("istio-system", &[secret("s", &["cluster2"], &[])].into(), |_| Standing::New);
        assert_eq!(wanted["cluster2"].pod_cidrs, None);
    }

    #[test]
    fn allow_list_annotations_fail_closed() {
        assert_eq!(parse_cidrs(" 10.245.0.0/16, 10.246.0.0/24 ,"), Ok(vec!["10.245.0.0/16".parse().unwrap(), "10.246.0.0/24".parse().unwrap()]));
        assert_eq!(
            parse_cidrs("10.245.0.0/16,10.246.0.0"),
            Err("\"10.246.0.0\" is not an IPv4 CIDR".into())
        );
    }
}
