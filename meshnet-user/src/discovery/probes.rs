//! The controller's metrics, `/healthz` and `/readyz`.

use std::collections::{BTreeMap, BTreeSet};

use super::published::PeerStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

/// The controller's metrics and probes.
pub struct ControllerMetrics {
    registry: prometheus_client::registry::Registry,
    stale: prometheus_client::metrics::family::Family<PeerLabel, prometheus_client::metrics::gauge::Gauge>,
    pub(super) refused: prometheus_client::metrics::family::Family<PeerLabel, prometheus_client::metrics::counter::Counter>,
    peers: prometheus_client::metrics::gauge::Gauge,
    pub(super) publish_errors: prometheus_client::metrics::counter::Counter,
    /// 1 while the peers are too large for one ConfigMap together, and the largest are left out.
    pub(super) too_large: prometheus_client::metrics::gauge::Gauge,
    last_publish: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    stale_names: std::sync::Mutex<BTreeSet<String>>,
    ready: std::sync::atomic::AtomicBool,
    pub(super) pulse: crate::metrics::Pulse,
}

impl ControllerMetrics {
    pub(super) fn new() -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("meshnet_controller");
        let m = Self {
            registry: prometheus_client::registry::Registry::default(),
            stale: prometheus_client::metrics::family::Family::default(),
            refused: prometheus_client::metrics::family::Family::default(),
            peers: prometheus_client::metrics::gauge::Gauge::default(),
            publish_errors: prometheus_client::metrics::counter::Counter::default(),
            too_large: prometheus_client::metrics::gauge::Gauge::default(),
            last_publish: prometheus_client::metrics::gauge::Gauge::default(),
            stale_names: std::sync::Mutex::new(BTreeSet::new()),
            ready: std::sync::atomic::AtomicBool::new(false),
            pulse: crate::metrics::Pulse::default(),
        };
        registry.register("peer_stale", "1 while a peer's last known state is served: its API server fails, or what describes it is unreadable or gone", m.stale.clone());
        registry.register(
            "peer_refused",
            "Peers refused (reserved ranges, allow-lists, invalid fields, overlapping CIDRs), counted once per reason",
            m.refused.clone(),
        );
        registry.register("peers", "Peers published", m.peers.clone());
        registry.register("publish_errors", "Failed writes of the peers object", m.publish_errors.clone());
        registry.register("publish_too_large", "1 while the peers together exceed what one ConfigMap holds and the largest are left out", m.too_large.clone());
        registry.register("last_publish_timestamp_seconds", "Unix time of the last publish", m.last_publish.clone());
        Self { registry, ..m }
    }

    pub(super) fn observe(&self, status: &BTreeMap<String, PeerStatus>, peers: usize) {
        self.stale.clear();
        let mut names = BTreeSet::new();
        for (name, st) in status {
            self.stale.get_or_create(&PeerLabel { peer: name.clone() }).set(i64::from(st.stale));
            if st.stale {
                names.insert(name.clone());
            }
        }
        self.peers.set(i64::try_from(peers).unwrap_or(0));
        *self.stale_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = names;
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn published(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.last_publish.set(now);
    }
}

impl crate::metrics::Probes for ControllerMetrics {
    fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn healthz(&self) -> Result<(), String> {
        self.pulse.healthz()
    }

    fn readyz(&self) -> Result<(), String> {
        let stale = self.stale_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            Err("not ready: local watches not synced".into())
        } else if stale.is_empty() {
            Ok(())
        } else {
            Err(format!("stale peers: {}", stale.into_iter().collect::<Vec<_>>().join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_silent_control_loop_is_wedged_until_it_beats_again() {
        use crate::metrics::{Probes as _, WEDGED};
        let mut m = ControllerMetrics::new();
        m.pulse.beat(std::time::Instant::now());
        assert!(m.healthz().is_ok());
        // As if the loop had last gone round two minutes ago.
        m.pulse.pretend_started_earlier(Duration::from_mins(2));
        assert!(m.pulse.silent_for() > WEDGED);
        assert!(m.healthz().unwrap_err().contains("control loop wedged"));
        m.pulse.beat(std::time::Instant::now());
        assert!(m.healthz().is_ok());
    }
}
