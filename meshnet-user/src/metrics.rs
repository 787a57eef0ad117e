//! Prometheus metrics, `/healthz` and `/readyz` for `meshnet agent --metrics-addr`.
//!
//! Datapath counters and map occupancy are read from the pinned maps at scrape time, so the
//! numbers are those of the kernel, not of the agent's memory.
//!
//! The agent shares the host's network namespace, so anything on the node may reach this
//! server. A map walk is one syscall per entry (a full flow table is 2 × 65,536 of them), so
//! walks are cached for [`SCRAPE_CACHE`] and run one at a time, and at most
//! [`MAX_SCRAPES`] scrapes may be in flight: the rest get a 503 at once. Nobody on the host
//! can make the agent spend more than one walk per cache period. Nor can anyone make it hold
//! more than [`MAX_CONNECTIONS`] connections, each for longer than [`HEADER_READ_TIMEOUT`] without
//! a whole request, or at all past [`CONNECTION_LIFETIME`]: the controller's port is open to every
//! pod of the cluster.
//!
//! Those caps are what anyone who reaches the port can fill, and the kubelet's probes would
//! share them: every client of the agent's loopback address is 127.0.0.1, so a host program
//! holding 8 stalled connections would fail the agent's liveness probe and get it restarted. So
//! the probes have a path of their own, [`serve_health`]: `/healthz` and `/readyz` on a Unix
//! socket in a directory of the container's own (`--health-socket`), asked by `meshnet probe`
//! as an exec probe. A second TCP port would not do: it is as open as the first (the agent is
//! on the host's network, and the kubelet's httpGet reaches the controller at its pod IP,
//! where every pod may connect), so its cap could be filled the same way. A socket file in the
//! pod's own volume is reachable from the container and from root on the node, and from
//! nobody else.

use std::{
    io::ErrorKind,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use meshnet_common::{names, FLOW_UNANSWERED};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{debug, info, warn};

use crate::{maps, pins::Pins};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabel {
    pub peer: String,
    pub address: String,
    pub port: String,
}

/// Tunnel traffic with one peer, in one direction (`tx`: encapsulated toward it, `rx`:
/// decapsulated from it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabel {
    pub peer: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// How long one walk of the maps serves scrapes.
pub const SCRAPE_CACHE: Duration = Duration::from_secs(2);
/// Scrapes in flight at once; more are refused with 503.
pub const MAX_SCRAPES: usize = 4;

/// The agent's metrics. Cheap to share: every field is atomic.
pub struct Metrics {
    registry: Registry,
    datapath: Family<EventLabel, Counter>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    pub gateway_up: Family<GatewayLabel, Gauge>,
    tunnel_packets: Family<TunnelLabel, Counter>,
    tunnel_bytes: Family<TunnelLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub gc_expired: Counter,
    /// Flows no reply has reached yet, from the last walk.
    unanswered_flows: Gauge,
    /// Grace periods passed before a map could reuse an element the agent freed (`crate::grace`).
    reuse_periods: Counter,
    pub attached_interfaces: Gauge,
    /// Attaches that failed (each left its interface as it was, and is tried again at the next rescan).
    pub attach_failures: Counter,
    /// The agent loop's pulse, for `/healthz` and `loop_longest_stall_seconds`.
    pub pulse: Pulse,
    longest_stall: Gauge<f64, AtomicU64>,
    /// Walks of the maps for scrapes: what a scraper can make the agent spend.
    map_walks: Counter,
    /// Published peers not applied as published (unreadable or refused).
    pub api_peers_rejected: Gauge,
    /// 1 while the published object as a whole is missing or unreadable.
    pub api_peers_unreadable: Gauge,
    pub ready: AtomicBool,
    /// 1 while the logging object's lines are read (`--datapath-log`).
    pub datapath_log_enabled: Gauge,
    /// Datapath log lines the logging object's rate limit held back.
    pub datapath_log_suppressed: Counter,
    /// Why the node serves something other than what was published, one line each.
    problems: std::sync::Mutex<Vec<String>>,
    pins: Pins,
    /// The last rendering and when it was made; the lock also makes walks one at a time.
    last_walk: Mutex<Option<Instant>>,
}

impl Metrics {
    #[must_use]
    pub fn new(pins: Pins) -> Self {
        let mut registry = Registry::with_prefix("meshnet");
        let m = Self {
            datapath: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            gateway_up: Family::default(),
            tunnel_packets: Family::default(),
            tunnel_bytes: Family::default(),
            reloads: Family::default(),
            last_sync: Gauge::default(),
            gc_expired: Counter::default(),
            unanswered_flows: Gauge::default(),
            reuse_periods: Counter::default(),
            attached_interfaces: Gauge::default(),
            attach_failures: Counter::default(),
            pulse: Pulse::default(),
            longest_stall: Gauge::default(),
            map_walks: Counter::default(),
            api_peers_rejected: Gauge::default(),
            api_peers_unreadable: Gauge::default(),
            ready: AtomicBool::new(false),
            datapath_log_enabled: Gauge::default(),
            datapath_log_suppressed: Counter::default(),
            problems: std::sync::Mutex::new(Vec::new()),
            pins,
            last_walk: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register("datapath_packets", "Datapath events by counter, summed over CPUs", m.datapath.clone());
        registry.register("map_entries", "Entries in each meshnet map", m.map_entries.clone());
        registry.register("map_capacity", "max_entries of each meshnet map", m.map_capacity.clone());
        registry.register("gateway_up", "1 when a gateway passes its health probe", m.gateway_up.clone());
        registry.register("tunnel_packets", "Tunnel mode: packets per peer and direction, summed over CPUs", m.tunnel_packets.clone());
        registry.register("tunnel_bytes", "Tunnel mode: inner IPv4 bytes per peer and direction", m.tunnel_bytes.clone());
        registry.register("config_reloads", "Config reloads by result", m.reloads.clone());
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last successful sync of the maps",
            m.last_sync.clone(),
        );
        registry.register("gc_expired_flows", "Flows expired by the garbage collector", m.gc_expired.clone());
        registry.register(
            "unanswered_flows",
            "Flows opened since the agent started that no reply has reached yet; the GC expires them once idle for nat.unansweredTimeoutSeconds",
            m.unanswered_flows.clone(),
        );
        registry.register(
            "map_reuse_grace_periods",
            "RCU grace periods the agent let pass before a map it alone writes could reuse an element it freed (kernels 6.1 and later; the tunnel counter slots on any kernel)",
            m.reuse_periods.clone(),
        );
        registry.register("attached_interfaces", "Interfaces meshnet is attached to", m.attached_interfaces.clone());
        registry.register(
            "attach_failures",
            "Attaches to an interface that failed; each left the interface as it was and is tried again at the next rescan",
            m.attach_failures.clone(),
        );
        registry.register(
            "loop_longest_stall_seconds",
            "The longest one turn of the agent's loop (a sync, a GC pass, a rescan) has held it since the start",
            m.longest_stall.clone(),
        );
        registry.register("metrics_map_walks", "Walks of the maps made for scrapes (cached, one at a time)", m.map_walks.clone());
        registry.register(
            "api_peers_rejected",
            "Published peers not applied as published (unreadable or invalid); each keeps its last good state",
            m.api_peers_rejected.clone(),
        );
        registry.register(
            "api_peers_unreadable",
            "1 while the published peers object is missing or unreadable; the last good peers stay",
            m.api_peers_unreadable.clone(),
        );
        registry.register(
            "datapath_log_enabled",
            "1 while the datapath's logging build runs and its lines are read (--datapath-log)",
            m.datapath_log_enabled.clone(),
        );
        registry.register(
            "datapath_log_suppressed",
            "Datapath log lines held back by the logging build's rate limit (the datapath counters count every event)",
            m.datapath_log_suppressed.clone(),
        );
        Self { registry, ..m }
    }

    /// Sets why the node is not ready (empty: nothing wrong).
    pub fn set_problems(&self, problems: Vec<String>) {
        *self.problems.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = problems;
    }

    /// Marks a successful sync now.
    pub fn synced(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_sync.set(now);
        self.reuse_periods.inner().store(crate::grace::periods(), Ordering::Relaxed);
    }

    /// Refreshes the kernel-side numbers from the pinned maps.
    fn refresh(&self) {
        self.map_walks.inc();
        self.reuse_periods.inner().store(crate::grace::periods(), Ordering::Relaxed);
        if let Ok(stats) = maps::read_stats(&self.pins) {
            for (name, v) in stats {
                self.datapath.get_or_create(&EventLabel { event: name.to_string() }).inner().store(v, Ordering::Relaxed);
            }
        }
        if let Ok(m) = maps::ControlMaps::open(&self.pins) {
            let revs = m.reverse_flows();
            let unanswered = revs.iter().filter(|(_, r)| r.flags & FLOW_UNANSWERED != 0).count();
            self.unanswered_flows.set(i64::try_from(unanswered).unwrap_or(i64::MAX));
            let entries = [
                (names::ROUTES, m.routes.keys().count()),
                (names::PEERS, m.peers.keys().count()),
                (names::NAT_FWD, m.forward_flows().len()),
                (names::NAT_REV, revs.len()),
            ];
            for (name, n) in entries {
                let label = MapLabel { map: name.to_string() };
                self.map_entries.get_or_create(&label).set(i64::try_from(n).unwrap_or(i64::MAX));
                if let Ok(info) = MapInfo::from_pin(self.pins.map(name)) {
                    self.map_capacity.get_or_create(&label).set(i64::from(info.max_entries()));
                }
            }
            let names: std::collections::BTreeMap<u32, String> =
                m.names.iter().flatten().map(|(id, n)| (id, maps::peer_name_of(&n))).collect();
            if let Ok(t) = crate::tunnel::TunnelMaps::open(&self.pins) {
                // Only the peers counted now: names that came and went must not pile up.
                self.tunnel_packets.clear();
                self.tunnel_bytes.clear();
                for (id, s) in t.peer_stats() {
                    let peer = names.get(&id).cloned().unwrap_or_else(|| format!("#{id:08x}"));
                    for (direction, packets, bytes) in [("tx", s.tx_packets, s.tx_bytes), ("rx", s.rx_packets, s.rx_bytes)] {
                        let label = TunnelLabel { peer: peer.clone(), direction: direction.into() };
                        self.tunnel_packets.get_or_create(&label).inner().store(packets, Ordering::Relaxed);
                        self.tunnel_bytes.get_or_create(&label).inner().store(bytes, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// The text exposition format. The kernel-side numbers come from a walk of the maps at
    /// most [`SCRAPE_CACHE`] old; the agent's own numbers are always current.
    #[must_use]
    pub fn render(&self) -> String {
        {
            let mut last = self.last_walk.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= SCRAPE_CACHE) {
                self.refresh();
                *last = Some(Instant::now());
            }
        }
        self.longest_stall.set(self.pulse.longest_stall().as_secs_f64());
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A control loop silent this long is wedged: `/healthz` fails, and the kubelet restarts it.
pub const WEDGED: Duration = Duration::from_mins(1);

/// A control loop's pulse: the loop beats once a second, and `/healthz` fails once it has
/// been silent for [`WEDGED`]. Every branch of a loop is bounded, so one that stops beating
/// is stuck, and a restart is what helps.
pub struct Pulse {
    /// When the loop last beat, in ms since `started`; `NOT_YET` before its first beat: the
    /// start (a lock wait, a migration) is not the loop, and must not count as silence.
    beat_ms: AtomicU64,
    started: Instant,
    /// The longest the loop has kept a beat waiting, in ms: how long one turn held the loop.
    longest_stall_ms: AtomicU64,
}

impl Default for Pulse {
    fn default() -> Self {
        Self { beat_ms: AtomicU64::new(NOT_YET), started: Instant::now(), longest_stall_ms: AtomicU64::new(0) }
    }
}

const NOT_YET: u64 = u64::MAX;

impl Pulse {
    /// A beat that was due at `due` (the loop's interval tick).
    pub fn beat(&self, due: Instant) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.beat_ms.store(ms(self.started.elapsed()), Ordering::Relaxed);
        self.longest_stall_ms.fetch_max(ms(Instant::now().saturating_duration_since(due)), Ordering::Relaxed);
    }

    /// How long since the loop last beat.
    #[must_use]
    pub fn silent_for(&self) -> Duration {
        match self.beat_ms.load(Ordering::Relaxed) {
            NOT_YET => Duration::ZERO,
            beat => self.started.elapsed().saturating_sub(Duration::from_millis(beat)),
        }
    }

    /// The longest one turn of the loop has kept it from beating.
    #[must_use]
    pub fn longest_stall(&self) -> Duration {
        Duration::from_millis(self.longest_stall_ms.load(Ordering::Relaxed))
    }

    /// `/healthz`'s answer.
    pub fn healthz(&self) -> Result<(), String> {
        let silent = self.silent_for();
        if silent > WEDGED {
            Err(format!("control loop wedged: silent for {}s", silent.as_secs()))
        } else {
            Ok(())
        }
    }

    #[cfg(test)]
    pub fn pretend_started_earlier(&mut self, by: Duration) {
        self.started -= by;
    }
}

/// What a meshnet process answers on its metrics address. The agent and the controller
/// each say what their answers are; [`serve`] serves them the same way.
pub trait Probes: Send + Sync + 'static {
    /// The `/metrics` body. It runs off the runtime's threads: it may make syscalls.
    fn render(&self) -> String;
    /// `/healthz`: `Err` with the reason when the process should be restarted.
    fn healthz(&self) -> Result<(), String>;
    /// `/readyz`: `Err` with the reason, one line per problem, when it is not ready.
    fn readyz(&self) -> Result<(), String>;
}

struct Served<P> {
    probes: Arc<P>,
    scrapes: tokio::sync::Semaphore,
}

/// Connections the metrics server keeps open at once; past it, a new connection is closed as soon
/// as it is accepted. A Prometheus (or an HA pair) and the kubelet's probes hold a handful, so 64
/// leaves room for a dozen scrapers, while it bounds what anyone who reaches the port can make the
/// process hold: 64 tasks with hyper's buffers (at most ~400 KiB each, for a request's headers),
/// some 26 MiB in all, inside the controller's 128 MiB limit and far below the open-files limit.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one client address keeps open at once: a scraper and the kubelet's probes
/// need one or two each, and one pod holding stalled connections cannot take the room of
/// the probes, whose failures would restart the process. (The agent listens on loopback,
/// where every client has one address: there it is the host's own programs that share it.)
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 8;
/// Time a client has to send a request's headers, counted from the connection's start or from the
/// previous answer: a connection left idle, or half a request, is closed after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives. Then it is closed after the request in flight, if any, is
/// answered, and dropped [`HEADER_READ_TIMEOUT`] later if that takes longer (a request body or an
/// answer trickling by).
pub const CONNECTION_LIFETIME: Duration = Duration::from_mins(1);

/// The bounds of [`serve`]'s connections: [`Limits::DEFAULT`], or shorter in the tests.
#[derive(Clone, Copy, Debug)]
struct Limits {
    connections: usize,
    per_client: usize,
    header_read: Duration,
    lifetime: Duration,
}

impl Limits {
    const DEFAULT: Limits =
        Limits { connections: MAX_CONNECTIONS, per_client: MAX_CONNECTIONS_PER_CLIENT, header_read: HEADER_READ_TIMEOUT, lifetime: CONNECTION_LIFETIME };
}

/// Serves `/metrics`, `/healthz` and `/readyz` (HTTP/1) on `listener`, for good. At most
/// [`MAX_SCRAPES`] scrapes are in flight; more get a 503 at once. At most [`MAX_CONNECTIONS`]
/// connections are open; more are closed at once. A connection's request headers must come within
/// [`HEADER_READ_TIMEOUT`], and no connection outlives [`CONNECTION_LIFETIME`].
pub async fn serve<P: Probes>(listener: tokio::net::TcpListener, probes: Arc<P>) {
    serve_with(listener, probes, Limits::DEFAULT).await;
}

/// The routes of `/healthz` and `/readyz`, and of `/metrics` with `scrapes`.
fn routes<P: Probes>(probes: Arc<P>, scrapes: bool) -> Router {
    let state = Arc::new(Served { probes, scrapes: tokio::sync::Semaphore::new(MAX_SCRAPES) });
    let app = Router::new()
        .route("/healthz", get(|State(s): State<Arc<Served<P>>>| async move { answer(s.probes.healthz(), "ok\n") }))
        .route("/readyz", get(|State(s): State<Arc<Served<P>>>| async move { answer(s.probes.readyz(), "ready\n") }));
    let app = if scrapes { app.route("/metrics", get(scrape::<P>)) } else { app };
    app.with_state(state)
}

/// hyper's header-read timeout needs a timer, which axum::serve does not give it.
fn http1(limits: Limits) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read);
    http
}

async fn serve_with<P: Probes>(listener: tokio::net::TcpListener, probes: Arc<P>, limits: Limits) {
    let app = routes(probes, true);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics, /healthz and /readyz");
    }
    let http = http1(limits);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let by_client = ByClient::default();
    let mut full = false;
    loop {
        let Some((stream, peer)) = accepted(listener.accept().await, "metrics server").await else { continue };
        // Accepted and closed, rather than left in the listen queue: the client learns at once.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            if !full {
                warn!(max = limits.connections, "metrics server has all the connections it takes; closing new ones");
            }
            full = true;
            continue;
        };
        full = false;
        let Some(share) = ClientShare::take(&by_client, peer.ip(), limits.per_client) else {
            debug!(client = %peer.ip(), max = limits.per_client, "metrics client has all the connections one client gets; closing a new one");
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            // Given back however the task ends, a panic included.
            let _held = (permit, share);
            bounded(conn, limits).await;
        });
    }
}

/// An accepted connection, or `None` when there is none to serve and the server should accept
/// again.
async fn accepted<T>(r: std::io::Result<T>, server: &str) -> Option<T> {
    match r {
        Ok(accepted) => Some(accepted),
        // The client gave up before we took it.
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) => None,
        // Out of file descriptors, most likely: wait for some to be closed, as axum::serve does.
        Err(e) => {
            warn!(error = %e, "{server} cannot accept connections");
            tokio::time::sleep(Duration::from_secs(1)).await;
            None
        }
    }
}

type ByClient = Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One of a client address's connections, counted while it lives.
struct ClientShare {
    by: ByClient,
    client: std::net::IpAddr,
}

impl ClientShare {
    /// One more connection for `client`, if it has fewer than `max`.
    fn take(by: &ByClient, client: std::net::IpAddr, max: usize) -> Option<Self> {
        let mut counts = by.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(client).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { by: by.clone(), client })
    }
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        let mut counts = self.by.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

type Connection<S> = hyper::server::conn::http1::Connection<TokioIo<S>, TowerToHyperService<Router>>;

/// Runs one connection for at most `limits.lifetime`, then closes it once its request in flight is
/// answered, or `limits.header_read` later at the latest.
async fn bounded<S>(conn: Connection<S>, limits: Limits)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = tokio::time::sleep(limits.lifetime) => {
            conn.as_mut().graceful_shutdown();
            let Ok(result) = tokio::time::timeout(limits.header_read, conn).await else {
                debug!("metrics connection dropped: still busy {:?} past its lifetime", limits.header_read);
                return;
            };
            result
        }
    };
    // Clients that hang up, or send half a request: nothing for the server to do about them.
    if let Err(e) = result {
        debug!(error = %e, "metrics connection ended");
    }
}

/// Connections the health socket keeps open at once. Only the container's own processes reach
/// it (the kubelet's exec probes, two at a time), so this bounds a pile-up of hung probes, not
/// anyone's abuse.
pub const HEALTH_CONNECTIONS: usize = 4;
/// The first wait before a failed bind of `--metrics-addr` or `--health-socket` is tried again;
/// it doubles after each failure, up to [`BIND_RETRY_MAX`].
pub const BIND_RETRY_FIRST: Duration = Duration::from_millis(500);
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(10);
/// A bind that keeps failing the same way is logged again this often.
const BIND_LOG_EVERY: Duration = Duration::from_mins(5);

/// [`serve`] on `addr` once it can be bound. A port someone else holds must not keep the agent
/// from loading and attaching the datapath, which needs no metrics: the bind is tried again in
/// the background, every [`BIND_RETRY_MAX`] at the longest, until it is free. The first try
/// is made here, before the caller goes on: a free port is served by the time it says ready.
pub fn serve_on<P: Probes>(addr: std::net::SocketAddr, probes: Arc<P>) -> impl std::future::Future<Output = ()> {
    let bind = move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    };
    let first = bind();
    async move {
        let listener = bind_retrying(&format!("--metrics-addr {addr}"), first, bind).await;
        serve(listener, probes).await;
    }
}

/// [`serve_health`] on a Unix socket at `path` once it can be bound (first tried here, then
/// again in the background as [`serve_on`] does). Until then the probes fail: liveness
/// restarts the container, which costs the datapath nothing, and the restarts and this log
/// say why.
pub fn serve_health_on<P: Probes>(path: std::path::PathBuf, probes: Arc<P>) -> impl std::future::Future<Output = ()> {
    let first = bind_unix(&path);
    async move {
        let listener = bind_retrying(&format!("--health-socket {}", path.display()), first, || bind_unix(&path)).await;
        serve_health(listener, probes).await;
    }
}

fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    // A container restarted in the same pod finds its predecessor's socket in the volume, which
    // nobody serves any more. Anything else there is not ours to remove.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path)
}

async fn bind_retrying<L>(what: &str, first: std::io::Result<L>, mut bind: impl FnMut() -> std::io::Result<L>) -> L {
    let mut wait = BIND_RETRY_FIRST;
    let mut logged: Option<(String, Instant)> = None;
    let mut attempts = 0u64;
    let mut next = Some(first);
    loop {
        match next.take().unwrap_or_else(&mut bind) {
            Ok(bound) => {
                if logged.is_some() {
                    info!(what, attempts, "bound at last");
                }
                return bound;
            }
            Err(e) => {
                attempts += 1;
                let error = e.to_string();
                if logged.as_ref().is_none_or(|(last, at)| *last != error || at.elapsed() >= BIND_LOG_EVERY) {
                    warn!(what, %error, attempts, "cannot bind; trying again in the background (the datapath does not wait for it)");
                    logged = Some((error, Instant::now()));
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(BIND_RETRY_MAX);
            }
        }
    }
}

/// Serves `/healthz` and `/readyz` (HTTP/1, no `/metrics`) on `listener`, for good, with caps of
/// its own: the probes' path, which no client of the metrics address can crowd out.
pub async fn serve_health<P: Probes>(listener: tokio::net::UnixListener, probes: Arc<P>) {
    serve_health_with(listener, probes, Limits { connections: HEALTH_CONNECTIONS, ..Limits::DEFAULT }).await;
}

async fn serve_health_with<P: Probes>(listener: tokio::net::UnixListener, probes: Arc<P>, limits: Limits) {
    let app = routes(probes, false);
    if let Ok(addr) = listener.local_addr() {
        info!(socket = ?addr.as_pathname(), "serving /healthz and /readyz");
    }
    let http = http1(limits);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        let Some((stream, _)) = accepted(listener.accept().await, "health socket").await else { continue };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            debug!(max = limits.connections, "health socket has all the connections it takes; closing a new one");
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            let _held = permit;
            bounded(conn, limits).await;
        });
    }
}

/// `meshnet probe`: GET `path` from the health socket at `socket`, all within `timeout`. `Ok`
/// with the answer's body when it is a 200, `Err` with why otherwise. The timeout is the probe's
/// own: Kubernetes before 1.20 does not time exec probes out.
pub fn probe(socket: &Path, path: &str, timeout: Duration) -> Result<String, String> {
    let (socket, path) = (socket.to_path_buf(), path.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    // A thread, so that the timeout also covers a connect that blocks (a wedged server whose
    // listen queue is full).
    std::thread::spawn(move || {
        let _ = tx.send(probe_now(&socket, &path));
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

fn probe_now(socket: &Path, path: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    // HTTP/1.0: the server closes the connection after its answer, which ends the read.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).map_err(|e| format!("asking {path}: {e}"))?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).map_err(|e| format!("reading the answer to {path}: {e}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(|| format!("{path}: no whole answer: {reply:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(body.to_string())
    } else {
        Err(format!("{path}: {status}: {}", body.trim_end()))
    }
}

fn answer(r: Result<(), String>, ok: &'static str) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, ok.to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", why.trim_end())),
    }
}

async fn scrape<P: Probes>(State(s): State<Arc<Served<P>>>) -> axum::response::Response {
    let Ok(_permit) = s.scrapes.try_acquire() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many scrapes in flight\n").into_response();
    };
    let p = s.probes.clone();
    let body = tokio::task::spawn_blocking(move || p.render()).await.unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

impl Probes for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }

    /// Liveness is only that the agent's loop goes round: it never depends on the API server
    /// or on the datapath, whose state outlives the agent anyway.
    fn healthz(&self) -> Result<(), String> {
        self.pulse.healthz()
    }

    fn readyz(&self) -> Result<(), String> {
        let problems = self.problems.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if !self.ready.load(Ordering::Relaxed) {
            Err("not ready: the datapath is not loaded and synced yet".into())
        } else if problems.is_empty() {
            Ok(())
        } else {
            // The datapath serves; what it serves is not what was published, and that needs
            // a human. Every line names the peer and field.
            Err(format!("not ready: {}", problems.join("\nnot ready: ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(Pins::new("/nonexistent/meshnet-test")))
    }

    fn walks(text: &str) -> u64 {
        text.lines().find_map(|l| l.strip_prefix("meshnet_metrics_map_walks_total ")?.parse().ok()).unwrap()
    }

    #[test]
    fn scrapes_within_the_cache_period_share_one_walk() {
        let m = metrics();
        let first = m.render();
        assert_eq!(walks(&first), 1);
        for _ in 0..50 {
            assert_eq!(m.render(), first);
        }
        // The agent's own numbers are current all the same.
        m.gc_expired.inc();
        let text = m.render();
        assert!(text.contains("meshnet_gc_expired_flows_total 1"), "{text}");
        assert_eq!(walks(&text), 1);
        // Expire the cache by hand rather than by waiting.
        *m.last_walk.lock().unwrap().as_mut().unwrap() -= SCRAPE_CACHE;
        assert_eq!(walks(&m.render()), 2);
    }

    #[tokio::test]
    async fn scrapes_past_the_bound_are_refused_at_once() {
        let m = metrics();
        let s = Arc::new(Served { probes: m.clone(), scrapes: tokio::sync::Semaphore::new(MAX_SCRAPES) });
        let held: Vec<_> = (0..MAX_SCRAPES).map(|_| s.scrapes.try_acquire().unwrap()).collect();
        let r = scrape(State(s.clone())).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(m.last_walk.lock().unwrap().is_none(), "a refused scrape walked the maps");
        drop(held);
        assert_eq!(scrape(State(s)).await.status(), StatusCode::OK);
    }

    #[test]
    fn the_pulse_counts_silence_only_once_the_loop_beats() {
        let mut p = Pulse::default();
        p.pretend_started_earlier(Duration::from_mins(5));
        assert!(p.healthz().is_ok(), "a long start counted as a wedged loop");
        p.beat(Instant::now().checked_sub(Duration::from_secs(3)).unwrap());
        assert!(p.longest_stall() >= Duration::from_secs(3), "a late beat was not taken as a stall");
        assert!(p.healthz().is_ok());
        p.pretend_started_earlier(Duration::from_mins(2));
        assert!(p.healthz().unwrap_err().contains("silent for 1"), "{:?}", p.healthz());
        p.beat(Instant::now());
        assert!(p.healthz().is_ok());
    }

    /// Serves [`metrics`] on a loopback port with `limits`.
    async fn server(limits: Limits) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_with(listener, metrics(), limits));
        addr
    }

    /// Reads until the server closes `s` (EOF or reset) and returns what it sent; fails the test
    /// if that takes longer than `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> String {
        let mut got = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
        };
        assert!(tokio::time::timeout(within, read).await.is_ok(), "the server kept a connection open for {within:?}");
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Reads one `/healthz` answer (its body is `ok\n`) off a kept-alive connection: `None`
    /// once the server has closed it.
    async fn healthz_answer(s: &mut TcpStream) -> Option<String> {
        let mut got = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"ok\n") {
                match s.read(&mut buf).await {
                    Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                    _ => return None,
                }
            }
            Some(String::from_utf8_lossy(&got).to_ascii_lowercase())
        };
        tokio::time::timeout(Duration::from_secs(5), read).await.expect("no answer to /healthz within 5 s")
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        closed_within(&mut s, Duration::from_secs(10)).await
    }

    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    /// A request whose headers never end.
    const STALLED: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";

    #[tokio::test]
    async fn scrapes_and_probes_are_answered_over_http1() {
        let addr = server(Limits::DEFAULT).await;
        let text = get(addr, "/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.to_ascii_lowercase().contains("\r\ncontent-type: text/plain; version=0.0.4\r\n"), "{text}");
        assert!(text.contains("\nmeshnet_metrics_map_walks_total 1\n"), "{text}");
        let text = get(addr, "/healthz").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\nok\n"), "{text}");
        // Not loaded, so not ready.
        let text = get(addr, "/readyz").await;
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        assert!(text.ends_with("\r\n\r\nnot ready: the datapath is not loaded and synced yet\n"), "{text}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404 "));
        // Keep-alive and pipelining still work: two requests, one connection.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        s.write_all(&[HEALTHZ, last].concat()).await.unwrap();
        let text = closed_within(&mut s, Duration::from_secs(10)).await;
        assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{text}");
    }

    /// Opens a connection from `from` (a loopback address) and sends the start of a request
    /// whose headers never end.
    async fn stalled(addr: std::net::SocketAddr, from: [u8; 4]) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((std::net::Ipv4Addr::from(from), 0).into()).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        // The server may have closed it already.
        let _ = s.write_all(STALLED).await;
        s
    }

    /// Whether the server still holds `s` open, 200 ms on.
    async fn still_open(s: &TcpStream) -> bool {
        tokio::time::timeout(Duration::from_millis(200), s.peek(&mut [0u8; 1])).await.is_err()
    }

    /// `/healthz`, asked until it is answered: a connection the server closed frees its room
    /// only once the server has seen it go.
    async fn healthz_soon(addr: std::net::SocketAddr) -> String {
        for _ in 0..100 {
            let text = get(addr, "/healthz").await;
            if !text.is_empty() {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/healthz went unanswered for 10 s");
    }

    /// Stalled connections past the caps, whole and per client, are closed as soon as they
    /// are accepted; the ones within them are served until their header timeout (an hour
    /// here, so that the two can never be mistaken on a slow machine).
    #[tokio::test]
    async fn connections_past_the_caps_are_closed_at_once() {
        let limits = Limits { connections: 6, per_client: 4, header_read: Duration::from_hours(1), ..Limits::DEFAULT };
        let addr = server(limits).await;
        let mut held = Vec::new();
        for _ in 0..limits.per_client {
            held.push(stalled(addr, [127, 0, 0, 1]).await);
        }
        // One client past its share: closed unanswered, though the server has room.
        for _ in 0..4 {
            let mut s = stalled(addr, [127, 0, 0, 1]).await;
            assert_eq!(closed_within(&mut s, Duration::from_secs(10)).await, "", "a connection past the client's share was answered");
        }
        // Another client still gets in, up to the whole cap.
        held.push(stalled(addr, [127, 0, 0, 2]).await);
        held.push(stalled(addr, [127, 0, 0, 3]).await);
        for from in [[127, 0, 0, 4], [127, 0, 0, 5]] {
            let mut s = stalled(addr, from).await;
            assert_eq!(closed_within(&mut s, Duration::from_secs(10)).await, "", "a connection past the cap was answered");
        }
        for s in &held {
            assert!(still_open(s).await, "a connection within the caps was closed before its header timeout");
        }
        drop(held);
        let text = healthz_soon(addr).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("ok\n"), "{text}");
    }

    /// A directory of this test's own, removed on drop.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("meshnet-{tag}-{}-{:?}", std::process::id(), Instant::now()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn probe_async(socket: &Path, path: &'static str) -> Result<String, String> {
        let socket = socket.to_path_buf();
        tokio::task::spawn_blocking(move || probe(&socket, path, Duration::from_secs(10))).await.unwrap()
    }

    /// Every local client of the agent's loopback port is 127.0.0.1: one that holds its share of
    /// stalled connections shuts everyone else from there out, the kubelet's httpGet probes too.
    /// The probes' socket is not counted with them, and answers all the same.
    #[tokio::test]
    async fn the_health_socket_answers_while_a_client_holds_the_metrics_ports_share() {
        let limits = Limits { header_read: Duration::from_hours(1), ..Limits::DEFAULT };
        let m = metrics();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_with(listener, m.clone(), limits));
        let dir = Dir::new("health");
        let socket = dir.0.join("health.sock");
        tokio::spawn(serve_health_on(socket.clone(), m));
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_CLIENT {
            held.push(stalled(addr, [127, 0, 0, 1]).await);
        }
        // What the kubelet's httpGet would meet.
        assert_eq!(get(addr, "/healthz").await, "", "the metrics port answered past the client's share");
        let mut answered = None;
        for _ in 0..100 {
            match probe_async(&socket, "/healthz").await {
                Err(e) if e.contains("No such file") => tokio::time::sleep(Duration::from_millis(100)).await,
                r => {
                    answered = Some(r);
                    break;
                }
            }
        }
        assert_eq!(answered, Some(Ok("ok\n".to_string())), "/healthz on the health socket");
        // Not loaded, so not ready: the probe says so, and why.
        let e = probe_async(&socket, "/readyz").await.unwrap_err();
        assert!(e.contains(" 503 ") && e.ends_with("not ready: the datapath is not loaded and synced yet"), "{e}");
        // The socket has no /metrics: scrapers have the port.
        assert!(probe_async(&socket, "/metrics").await.unwrap_err().contains(" 404 "));
        for s in &held {
            assert!(still_open(s).await);
        }
    }

    /// A restarted container finds its predecessor's socket in the pod's volume: it is replaced.
    /// Anything else at the path is left alone, and binding is tried again until it is gone.
    #[tokio::test]
    async fn a_stale_health_socket_is_replaced_and_a_file_is_not() {
        let dir = Dir::new("stale");
        let socket = dir.0.join("health.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(probe_async(&socket, "/healthz").await.unwrap_err().contains("refused"));
        drop(bind_unix(&socket).unwrap());
        let file = dir.0.join("file");
        std::fs::write(&file, "mine").unwrap();
        assert!(bind_unix(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    }

    /// A bind that fails is tried again with a growing wait, bounded by BIND_RETRY_MAX.
    #[tokio::test(start_paused = true)]
    async fn a_failed_bind_is_tried_again_with_a_bounded_backoff() {
        let start = tokio::time::Instant::now();
        let mut tries = Vec::new();
        tries.push(start.elapsed());
        let bound = bind_retrying("test", Err(std::io::Error::from(ErrorKind::AddrInUse)), || {
            tries.push(start.elapsed());
            if tries.len() < 8 { Err(std::io::Error::from(ErrorKind::AddrInUse)) } else { Ok("bound") }
        })
        .await;
        assert_eq!(bound, "bound");
        let waits: Vec<Duration> = tries.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
        let ms = Duration::from_millis;
        assert_eq!(waits, [ms(500), ms(1000), ms(2000), ms(4000), ms(8000), BIND_RETRY_MAX, BIND_RETRY_MAX]);
    }

    /// A client's share of connections comes back however its task ends: after as many panics
    /// as it may hold connections, it still gets one.
    #[tokio::test]
    async fn a_clients_share_comes_back_when_its_task_panics() {
        let by = ByClient::default();
        let client: std::net::IpAddr = [10, 0, 0, 1].into();
        for _ in 0..3 {
            let share = ClientShare::take(&by, client, 2).unwrap();
            let task = tokio::spawn(async move {
                let _held = share;
                panic!("a connection's task fails");
            });
            assert!(task.await.is_err());
        }
        let (a, b) = (ClientShare::take(&by, client, 2), ClientShare::take(&by, client, 2));
        assert!(a.is_some() && b.is_some() && ClientShare::take(&by, client, 2).is_none());
        drop((a, b));
        assert!(by.lock().unwrap().is_empty());
    }

    /// A connection that never finishes its request's headers is closed unanswered after
    /// the header timeout, and its room serves again.
    #[tokio::test]
    async fn stalled_connections_time_out() {
        let limits = Limits { connections: 2, header_read: Duration::from_millis(500), ..Limits::DEFAULT };
        let addr = server(limits).await;
        let mut held = vec![stalled(addr, [127, 0, 0, 1]).await, stalled(addr, [127, 0, 0, 1]).await];
        for s in &mut held {
            assert_eq!(closed_within(s, Duration::from_secs(30)).await, "", "a stalled request was answered");
        }
        let text = healthz_soon(addr).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("ok\n"), "{text}");
    }

    #[tokio::test]
    async fn idle_and_long_lived_connections_are_closed() {
        let limits =
            Limits { header_read: Duration::from_millis(500), lifetime: Duration::from_secs(2), ..Limits::DEFAULT };
        let addr = server(limits).await;
        // Kept alive, then silent: closed once the next request's headers are overdue.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(HEALTHZ).await.unwrap();
        assert!(healthz_answer(&mut s).await.unwrap().starts_with("http/1.1 200 ok\r\n"));
        closed_within(&mut s, Duration::from_secs(5)).await;
        // Never silent for long, yet closed once its lifetime is up: the request in flight is
        // answered, and the connection closed after it.
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut answered = 0;
        loop {
            let late = start.elapsed() >= limits.lifetime + Duration::from_secs(5);
            assert!(!late, "a busy connection outlived its lifetime");
            if s.write_all(HEALTHZ).await.is_err() {
                break;
            }
            match healthz_answer(&mut s).await {
                None => break,
                Some(text) if text.contains("\r\nconnection: close\r\n") => {
                    answered += 1;
                    closed_within(&mut s, Duration::from_secs(5)).await;
                    break;
                }
                Some(_) => answered += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(start.elapsed() >= limits.lifetime, "closed after {:?}", start.elapsed());
        assert!(answered >= 2, "only {answered} requests answered");
    }
}
