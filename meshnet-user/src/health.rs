//! Gateway health: a TCP connect to each gateway's nodeIP:NodePort. A gateway that fails
//! `failure_threshold` probes in a row is marked down in the datapath, so new flows avoid it
//! and flows pinned to it re-pick a live one; one successful probe marks it up again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use meshnet_common::{PeerGateways, GW_UP};

use crate::config::Config;

pub type GatewayId = (Ipv4Addr, u16);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    up: bool,
    failures: u32,
}

#[derive(Debug, Default)]
pub struct Health {
    state: BTreeMap<GatewayId, State>,
}

impl Health {
    /// Starts from what the pinned peer map says, so a restarted agent neither revives a
    /// dead gateway nor kills a live one before its first probe.
    #[must_use]
    pub fn from_pinned(peers: &BTreeMap<u32, PeerGateways>) -> Self {
        let mut state = BTreeMap::new();
        for pg in peers.values() {
            for g in &pg.gateways[..(pg.count as usize).min(pg.gateways.len())] {
                let id = (Ipv4Addr::from(g.addr_be.to_ne_bytes()), u16::from_be(g.tcp_port_be));
                state.insert(id, State { up: g.flags & GW_UP != 0, failures: 0 });
            }
        }
        Self { state }
    }

    /// Every gateway of `config`, each once.
    #[must_use]
    pub fn targets(config: &Config) -> BTreeSet<GatewayId> {
        config.peers.iter().flat_map(|p| p.gateways.iter().map(|g| (g.address, g.port))).collect()
    }

    /// Records a probe result; true when the gateway changed between up and down.
    pub fn record(&mut self, gw: GatewayId, ok: bool, threshold: u32) -> bool {
        let s = self.state.entry(gw).or_insert(State { up: true, failures: 0 });
        if ok {
            s.failures = 0;
            let changed = !s.up;
            s.up = true;
            changed
        } else {
            s.failures = s.failures.saturating_add(1);
            if s.up && s.failures >= threshold {
                s.up = false;
                true
            } else {
                false
            }
        }
    }

    /// Forgets gateways that left the config.
    pub fn retain(&mut self, targets: &BTreeSet<GatewayId>) {
        self.state.retain(|k, _| targets.contains(k));
    }

    #[must_use]
    pub fn down(&self) -> BTreeSet<GatewayId> {
        self.state.iter().filter(|(_, s)| !s.up).map(|(k, _)| *k).collect()
    }

    #[must_use]
    pub fn is_up(&self, gw: &GatewayId) -> bool {
        self.state.get(gw).is_none_or(|s| s.up)
    }
}

/// One probe: can a TCP connection to the gateway's NodePort be opened in time?
pub async fn probe(gw: GatewayId, timeout: Duration) -> bool {
    let addr = SocketAddrV4::new(gw.0, gw.1);
    matches!(tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_threshold_up_after_one_success() {
        let gw = (Ipv4Addr::new(192, 0, 2, 2), 31674);
        let mut h = Health::default();
        assert!(!h.record(gw, false, 2), "one failure is not enough");
        assert!(h.is_up(&gw));
        assert!(h.record(gw, false, 2), "the second failure marks it down");
        assert_eq!(h.down(), BTreeSet::from([gw]));
        assert!(!h.record(gw, false, 2), "already down");
        assert!(h.record(gw, true, 2), "one success brings it back");
        assert!(h.down().is_empty());
    }
}
