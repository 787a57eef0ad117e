//! Gateway health: a TCP connect to each gateway's nodeIP:NodePort, with hysteresis. A
//! gateway that fails `fall` probes in a row is marked down in the datapath: new flows avoid
//! it, while the flows already pinned to it stay (a slow SYN-ACK or two must not reset live
//! connections). It takes `rise` successes in a row to be marked up again. A gateway down
//! longer than the grace period has its flows purged, so that they start again on a live one:
//! those it no longer answers (their pod has sent on, with no reply, for longer than the
//! grace period). A probe is a new connection, and a gateway that refuses those (a full backlog, a
//! SYN filter) may still carry the ones it has: a flow it still answers is kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use meshnet_common::{PeerGateways, GW_UP};

use crate::config::Config;

pub type GatewayId = (Ipv4Addr, u16);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    up: bool,
    /// Consecutive failures while up, or consecutive successes while down.
    streak: u32,
    /// When it was marked down.
    down_since: Option<Instant>,
}

impl State {
    fn up() -> Self {
        Self { up: true, streak: 0, down_since: None }
    }
}

#[derive(Debug, Default)]
pub struct Health {
    state: BTreeMap<GatewayId, State>,
}

impl Health {
    /// Starts from what the pinned peer map says, so a restarted agent neither revives a
    /// dead gateway nor kills a live one before its first probe. A gateway found down starts
    /// its grace period again.
    #[must_use]
    pub fn from_pinned(peers: &BTreeMap<u32, PeerGateways>) -> Self {
        let mut state = BTreeMap::new();
        let now = Instant::now();
        for pg in peers.values() {
            for g in pg.live() {
                let id = (Ipv4Addr::from(g.addr_be.to_ne_bytes()), u16::from_be(g.tcp_port_be));
                let up = g.flags & GW_UP != 0;
                state.insert(id, State { up, streak: 0, down_since: (!up).then_some(now) });
            }
        }
        Self { state }
    }

    /// Every gateway of `config`, each once.
    #[must_use]
    pub fn targets(config: &Config) -> BTreeSet<GatewayId> {
        config.peers.iter().flat_map(|p| p.gateways.iter().map(|g| (g.address, g.port))).collect()
    }

    /// Records a probe result at `now`; true when the gateway changed between up and down.
    /// `fall` failures in a row mark an up gateway down, `rise` successes in a row mark a
    /// down one up.
    pub fn record(&mut self, gw: GatewayId, ok: bool, fall: u32, rise: u32, now: Instant) -> bool {
        let s = self.state.entry(gw).or_insert_with(State::up);
        if s.up == ok {
            s.streak = 0;
            return false;
        }
        s.streak = s.streak.saturating_add(1);
        if s.streak < if s.up { fall } else { rise } {
            return false;
        }
        s.up = ok;
        s.streak = 0;
        s.down_since = (!ok).then_some(now);
        true
    }

    /// Forgets gateways that left the config.
    pub fn retain(&mut self, targets: &BTreeSet<GatewayId>) {
        self.state.retain(|k, _| targets.contains(k));
    }

    #[must_use]
    pub fn down(&self) -> BTreeSet<GatewayId> {
        self.state.iter().filter(|(_, s)| !s.up).map(|(k, _)| *k).collect()
    }

    /// Gateways down for longer than `grace` at `now`: their flows are to be purged.
    #[must_use]
    pub fn down_past(&self, grace: Duration, now: Instant) -> BTreeSet<GatewayId> {
        self.state
            .iter()
            .filter(|(_, s)| s.down_since.is_some_and(|t| now.saturating_duration_since(t) > grace))
            .map(|(k, _)| *k)
            .collect()
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

    const GW: GatewayId = (Ipv4Addr::new(192, 0, 2, 2), 31674);

    #[test]
    fn down_after_fall_failures_up_after_rise_successes() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(!h.record(GW, false, 2, 2, t0), "one failure is not enough");
        assert!(!h.record(GW, true, 2, 2, t0), "a success resets the failure streak");
        assert!(!h.record(GW, false, 2, 2, t0));
        assert!(h.is_up(&GW));
        assert!(h.record(GW, false, 2, 2, t0), "the second failure in a row marks it down");
        assert_eq!(h.down(), BTreeSet::from([GW]));
        assert!(!h.record(GW, false, 2, 2, t0), "already down");
        assert!(!h.record(GW, true, 2, 2, t0), "one success does not bring it back");
        assert!(!h.record(GW, false, 2, 2, t0), "a failure resets the success streak");
        assert!(!h.record(GW, true, 2, 2, t0));
        assert!(h.record(GW, true, 2, 2, t0), "the second success in a row does");
        assert!(h.down().is_empty());
    }

    #[test]
    fn flows_are_kept_through_the_grace_period_only() {
        let t0 = Instant::now();
        let grace = Duration::from_mins(1);
        let mut h = Health::default();
        assert!(h.record(GW, false, 1, 2, t0));
        assert!(h.down_past(grace, t0 + Duration::from_mins(1)).is_empty());
        assert_eq!(h.down_past(grace, t0 + Duration::from_secs(61)), BTreeSet::from([GW]));
        // Back up: no longer past anything, and a later fall starts a new grace period.
        assert!(!h.record(GW, true, 1, 2, t0));
        assert!(h.record(GW, true, 1, 2, t0));
        assert!(h.down_past(grace, t0 + Duration::from_mins(2)).is_empty());
        let t1 = t0 + Duration::from_secs(200);
        assert!(h.record(GW, false, 1, 2, t1));
        assert!(h.down_past(grace, t1 + Duration::from_secs(30)).is_empty());
    }
}
