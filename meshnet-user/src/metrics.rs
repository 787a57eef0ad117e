//! Prometheus metrics, `/healthz` and `/readyz` for `meshnet agent --metrics-addr`.
//!
//! Datapath counters and map occupancy are read from the pinned maps at scrape time, so the
//! numbers are those of the kernel, not of the agent's memory.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The agent's metrics. Cheap to share: every field is atomic.
pub struct Metrics {
    registry: Registry,
    datapath: Family<EventLabel, Counter>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    pub gateway_up: Family<GatewayLabel, Gauge>,
    pub reloads: Family<ResultLabel, Counter>,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub gc_expired: Counter,
    pub attached_interfaces: Gauge,
    /// Published peers not applied as published (unreadable or refused).
    pub api_peers_rejected: Gauge,
    /// 1 while the published object as a whole is missing or unreadable.
    pub api_peers_unreadable: Gauge,
    pub ready: AtomicBool,
    /// Why the node serves something other than what was published, one line each.
    problems: std::sync::Mutex<Vec<String>>,
    pins: Pins,
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
            reloads: Family::default(),
            last_sync: Gauge::default(),
            gc_expired: Counter::default(),
            attached_interfaces: Gauge::default(),
            api_peers_rejected: Gauge::default(),
            api_peers_unreadable: Gauge::default(),
            ready: AtomicBool::new(false),
            problems: std::sync::Mutex::new(Vec::new()),
            pins,
            registry: Registry::default(),
        };
        registry.register("datapath_packets", "Datapath events by counter, summed over CPUs", m.datapath.clone());
        registry.register("map_entries", "Entries in each meshnet map", m.map_entries.clone());
        registry.register("map_capacity", "max_entries of each meshnet map", m.map_capacity.clone());
        registry.register("gateway_up", "1 when a gateway passes its health probe", m.gateway_up.clone());
        registry.register("config_reloads", "Config reloads by result", m.reloads.clone());
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last successful sync of the maps",
            m.last_sync.clone(),
        );
        registry.register("gc_expired_flows", "Flows expired by the garbage collector", m.gc_expired.clone());
        registry.register("attached_interfaces", "Interfaces meshnet is attached to", m.attached_interfaces.clone());
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
    }

    /// Refreshes the kernel-side numbers from the pinned maps.
    fn refresh(&self) {
        if let Ok(stats) = maps::read_stats(&self.pins) {
            for (name, v) in stats {
                self.datapath.get_or_create(&EventLabel { event: name.to_string() }).inner().store(v, Ordering::Relaxed);
            }
        }
        if let Ok(m) = maps::ControlMaps::open(&self.pins) {
            let entries = [
                (names::ROUTES, m.routes.keys().count()),
                (names::PEERS, m.peers.keys().count()),
                (names::NAT_FWD, m.nat_fwd.keys().count()),
                (names::NAT_REV, m.nat_rev.keys().count()),
            ];
            for (name, n) in entries {
                let label = MapLabel { map: name.to_string() };
                self.map_entries.get_or_create(&label).set(i64::try_from(n).unwrap_or(i64::MAX));
                if let Ok(info) = MapInfo::from_pin(self.pins.map(name)) {
                    self.map_capacity.get_or_create(&label).set(i64::from(info.max_entries()));
                }
            }
        }
    }

    /// The text exposition format.
    #[must_use]
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves /metrics, /healthz and /readyz until the process exits.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        // Liveness is only that the agent answers: it never depends on the API server or on
        // the datapath, whose state outlives the agent anyway.
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics, /healthz and /readyz");
    }
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "metrics server stopped");
    }
    Ok(())
}

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    // Map reads are syscalls; keep them off the runtime's thread.
    let body = tokio::task::spawn_blocking(move || m.render()).await.unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], body)
}

async fn ready(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let problems = m.problems.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    if !m.ready.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: the datapath is not loaded and synced yet\n".to_string())
    } else if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        // The datapath serves; what it serves is not what was published, and that needs a
        // human. Every line names the peer and field.
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("\nnot ready: ")))
    }
}
