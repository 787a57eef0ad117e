//! Prometheus metrics, `/healthz` and `/readyz` for `meshnet agent --metrics-addr`.
//!
//! Datapath counters and map occupancy are read from the pinned maps at scrape time, so the
//! numbers are those of the kernel, not of the agent's memory.
//!
//! The agent shares the host's network namespace, so anything on the node may reach this
//! server. A map walk is one syscall per entry (a full flow table is 2 × 65,536 of them), so
//! walks are cached for [`SCRAPE_CACHE`] and run one at a time, and at most
//! [`MAX_SCRAPES`] scrapes may be in flight: the rest get a 503 at once. Nobody on the host
//! can make the agent spend more than one walk per cache period.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use meshnet_common::names;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{info, warn};

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
    /// Grace periods passed before a map could reuse an element the agent freed (`crate::grace`).
    reuse_periods: Counter,
    pub attached_interfaces: Gauge,
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
            reuse_periods: Counter::default(),
            attached_interfaces: Gauge::default(),
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
            "map_reuse_grace_periods",
            "RCU grace periods the agent let pass before a map it alone writes could reuse an element it freed (kernels 6.1 and later; the tunnel counter slots on any kernel)",
            m.reuse_periods.clone(),
        );
        registry.register("attached_interfaces", "Interfaces meshnet is attached to", m.attached_interfaces.clone());
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
            let entries = [
                (names::ROUTES, m.routes.keys().count()),
                (names::PEERS, m.peers.keys().count()),
                (names::NAT_FWD, m.forward_flows().len()),
                (names::NAT_REV, m.reverse_flows().len()),
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

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until it fails. At most
/// [`MAX_SCRAPES`] scrapes are in flight; more get a 503 at once.
pub async fn serve<P: Probes>(listener: tokio::net::TcpListener, probes: Arc<P>) {
    let state = Arc::new(Served { probes, scrapes: tokio::sync::Semaphore::new(MAX_SCRAPES) });
    let app = Router::new()
        .route("/metrics", get(scrape::<P>))
        .route("/healthz", get(|State(s): State<Arc<Served<P>>>| async move { answer(s.probes.healthz(), "ok\n") }))
        .route("/readyz", get(|State(s): State<Arc<Served<P>>>| async move { answer(s.probes.readyz(), "ready\n") }))
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics, /healthz and /readyz");
    }
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "metrics server stopped");
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
}
