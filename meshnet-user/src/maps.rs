//! Typed access to the pinned maps: syncing them to a desired state, and reading them back
//! for dumps. Works from pins alone, so the CLI needs no running agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use anyhow::Context as _;
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, PerCpuArray,
};
use ipnet::Ipv4Net;
use meshnet_common::{
    names, Counter, FlowKey, NatFwd, NatRev, PeerGateways, PeerName, RouteValue, FLOW_FIN_PEER, FLOW_FIN_POD,
    FLOW_RST, GW_UP, IPPROTO_TCP,
};

use crate::{
    config::{Desired, GcConfig},
    pins::Pins,
};

pub type Routes = LpmTrie<MapData, u32, RouteValue>;
pub type Peers = HashMap<MapData, u32, PeerGateways>;
pub type Names = HashMap<MapData, u32, PeerName>;
pub type NatFwdMap = HashMap<MapData, FlowKey, NatFwd>;
pub type NatRevMap = HashMap<MapData, FlowKey, NatRev>;
pub type Stats = PerCpuArray<MapData, u64>;

fn take<T>(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).with_context(|| format!("the object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} does not have the layout this build expects"))
}

/// Opens one pinned map by name with its typed view.
pub fn open<T>(pins: &Pins, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!("opening pinned map {} (is the agent running, or was it ever started with this --pin-path?)", path.display())
    })?;
    let map = Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))?;
    T::try_from(map).with_context(|| format!("{} does not have the layout this build expects", path.display()))
}

#[must_use]
pub fn addr_be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

#[must_use]
pub fn addr_of_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

fn route_key(net: Ipv4Net) -> Key<u32> {
    Key::new(u32::from(net.prefix_len()), addr_be(net.network()))
}

fn peer_name_value(name: &str) -> PeerName {
    let mut v = PeerName { bytes: [0; 64] };
    let n = name.len().min(v.bytes.len());
    v.bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    v
}

#[must_use]
pub fn peer_name_of(v: &PeerName) -> String {
    let end = v.bytes.iter().position(|b| *b == 0).unwrap_or(v.bytes.len());
    String::from_utf8_lossy(&v.bytes[..end]).into_owned()
}

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub routes_added: usize,
    pub routes_updated: usize,
    pub routes_removed: usize,
    pub peers_written: usize,
    pub peers_removed: usize,
    pub flows_purged: usize,
}

impl SyncReport {
    #[must_use]
    pub fn is_noop(&self) -> bool {
        *self == Self::default()
    }
}

/// The changes that take the maps from their current content to a desired state, in the
/// order they are applied: gateways and routes in, then removals.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub peer_writes: Vec<(u32, PeerGateways)>,
    /// A route, its peer, and whether it is new (else it moves to another peer).
    pub route_writes: Vec<(Ipv4Net, u32, bool)>,
    pub route_removals: Vec<Ipv4Net>,
    pub peer_removals: Vec<u32>,
}

impl Plan {
    #[must_use]
    pub fn new(cur_routes: &BTreeMap<Ipv4Net, u32>, cur_peers: &BTreeMap<u32, PeerGateways>, desired: &Desired) -> Self {
        Self {
            peer_writes: desired
                .peers
                .iter()
                .filter(|(id, want)| cur_peers.get(id) != Some(want))
                .map(|(id, want)| (*id, *want))
                .collect(),
            route_writes: desired
                .routes
                .iter()
                .filter(|(net, id)| cur_routes.get(net) != Some(id))
                .map(|(net, id)| (*net, *id, !cur_routes.contains_key(net)))
                .collect(),
            route_removals: cur_routes.keys().filter(|n| !desired.routes.contains_key(n)).copied().collect(),
            peer_removals: cur_peers.keys().filter(|id| !desired.peers.contains_key(id)).copied().collect(),
        }
    }

    fn report(&self) -> SyncReport {
        SyncReport {
            routes_added: self.route_writes.iter().filter(|r| r.2).count(),
            routes_updated: self.route_writes.iter().filter(|r| !r.2).count(),
            routes_removed: self.route_removals.len(),
            peers_written: self.peer_writes.len(),
            peers_removed: self.peer_removals.len(),
            flows_purged: 0,
        }
    }

    /// One line per change, for logs and golden tests.
    #[must_use]
    pub fn render(&self, names: &BTreeMap<u32, String>) -> String {
        let name = |id: &u32| names.get(id).cloned().unwrap_or_else(|| format!("#{id:08x}"));
        let mut out = String::new();
        for (id, pg) in &self.peer_writes {
            let _ = writeln!(out, "write peer {}: {}", name(id), render_gateways(pg));
        }
        for (net, id, new) in &self.route_writes {
            let _ = writeln!(out, "{} route {net} -> {}", if *new { "add" } else { "move" }, name(id));
        }
        for net in &self.route_removals {
            let _ = writeln!(out, "remove route {net}");
        }
        for id in &self.peer_removals {
            let _ = writeln!(out, "remove peer {}", name(id));
        }
        out
    }
}

/// A peer's gateways as `addr:tcp[/udp:port][ down], ...`.
#[must_use]
pub fn render_gateways(pg: &PeerGateways) -> String {
    pg.live()
        .iter()
        .map(|g| {
            let udp = u16::from_be(g.udp_port_be);
            format!(
                "{}:{}{}{}",
                addr_of_be(g.addr_be),
                u16::from_be(g.tcp_port_be),
                if udp == 0 { String::new() } else { format!("/udp:{udp}") },
                if g.flags & GW_UP == 0 { " down" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The control-plane maps, open for writing.
pub struct ControlMaps {
    pub routes: Routes,
    pub peers: Peers,
    pub names: Names,
    pub nat_fwd: NatFwdMap,
    pub nat_rev: NatRevMap,
}

impl ControlMaps {
    pub fn open(pins: &Pins) -> anyhow::Result<Self> {
        Ok(Self {
            routes: open(pins, names::ROUTES)?,
            peers: open(pins, names::PEERS)?,
            names: open(pins, names::PEER_NAMES)?,
            nat_fwd: open(pins, names::NAT_FWD)?,
            nat_rev: open(pins, names::NAT_REV)?,
        })
    }

    /// Takes the control maps out of a loaded object (unpinned use: tests, benchmarks).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            routes: take(ebpf, names::ROUTES)?,
            peers: take(ebpf, names::PEERS)?,
            names: take(ebpf, names::PEER_NAMES)?,
            nat_fwd: take(ebpf, names::NAT_FWD)?,
            nat_rev: take(ebpf, names::NAT_REV)?,
        })
    }

    pub fn current_routes(&self) -> anyhow::Result<BTreeMap<Ipv4Net, u32>> {
        let mut out = BTreeMap::new();
        for item in &self.routes {
            let (k, v) = item.context("reading the route map")?;
            let prefix = u8::try_from(k.prefix_len()).unwrap_or(32);
            let net = Ipv4Net::new(addr_of_be(k.data()), prefix).context("bad prefix in route map")?;
            out.insert(net, v.peer_id);
        }
        Ok(out)
    }

    pub fn current_peers(&self) -> anyhow::Result<BTreeMap<u32, PeerGateways>> {
        self.peers
            .iter()
            .map(|r| r.context("reading the peer map"))
            .collect()
    }

    /// The peers the pinned maps serve, as config peers (a restarted agent's last good
    /// state). Peers without a name entry are left out: they cannot be matched to anything.
    pub fn pinned_peers(&self) -> anyhow::Result<BTreeMap<String, crate::config::RawPeer>> {
        let routes = self.current_routes()?;
        let mut out = BTreeMap::new();
        for (id, pg) in self.current_peers()? {
            let Ok(name) = self.names.get(&id, 0).map(|v| peer_name_of(&v)) else { continue };
            if name.is_empty() {
                continue;
            }
            let gateways = pg
                .live()
                .iter()
                .map(|g| crate::config::RawGateway {
                    address: addr_of_be(g.addr_be).to_string(),
                    port: u32::from(u16::from_be(g.tcp_port_be)),
                    udp_port: Some(u32::from(u16::from_be(g.udp_port_be))).filter(|p| *p != 0),
                })
                .collect();
            let pod_cidrs = routes.iter().filter(|(_, v)| **v == id).map(|(k, _)| k.to_string()).collect();
            out.insert(name.clone(), crate::config::RawPeer { name, pod_cidrs, gateways });
        }
        Ok(out)
    }

    /// Makes the maps hold `desired`, touching only what differs. New routes and gateways go
    /// in before anything is removed, so no packet meets a half-applied state that drops it;
    /// flows of withdrawn routes or of gateways that are gone are purged last, so their next
    /// packet picks a live gateway. Flows of a gateway that is merely down stay.
    pub fn sync(&mut self, desired: &Desired) -> anyhow::Result<SyncReport> {
        self.sync_evicting(desired, &BTreeSet::new())
    }

    /// [`ControlMaps::sync`], also purging the flows of the gateways in `evict` (by address
    /// and TCP port): those down longer than their grace period.
    pub fn sync_evicting(&mut self, desired: &Desired, evict: &BTreeSet<(Ipv4Addr, u16)>) -> anyhow::Result<SyncReport> {
        let plan = Plan::new(&self.current_routes()?, &self.current_peers()?, desired);
        for (id, value) in &plan.peer_writes {
            self.peers.insert(id, *value, 0).context("writing the peer map")?;
        }
        for id in desired.peers.keys() {
            let name = peer_name_value(desired.peer_names.get(id).map_or("", String::as_str));
            if self.names.get(id, 0).ok() != Some(name) {
                self.names.insert(id, name, 0).context("writing the peer-name map")?;
            }
        }
        for (net, id, _) in &plan.route_writes {
            self.routes.insert(&route_key(*net), RouteValue { peer_id: *id }, 0).context("writing a route")?;
        }
        for net in &plan.route_removals {
            self.routes.remove(&route_key(*net)).context("removing a route")?;
        }
        for id in &plan.peer_removals {
            self.peers.remove(id).context("removing a peer")?;
            let _ = self.names.remove(id);
        }
        let mut report = plan.report();
        report.flows_purged = self.purge_flows(desired, evict)?;
        Ok(report)
    }

    /// Removes flow state that no longer matches the desired routes and gateways: the flow's
    /// destination left every remote CIDR, moved to another peer, or its gateway is gone or
    /// in `evict`. A gateway marked down only takes no new flows; its flows stay.
    pub fn purge_flows(&mut self, desired: &Desired, evict: &BTreeSet<(Ipv4Addr, u16)>) -> anyhow::Result<usize> {
        let mut doomed = Vec::new();
        for item in &self.nat_fwd {
            let Ok((key, fwd)) = item else { continue };
            let dst = addr_of_be(key.dst_be);
            let owner = desired
                .routes
                .iter()
                .filter(|(net, _)| net.contains(&dst))
                .max_by_key(|(net, _)| net.prefix_len())
                .map(|(_, id)| *id);
            let gateway_ok = owner.is_some_and(|id| {
                id == fwd.peer_id
                    && desired.peers.get(&id).is_some_and(|pg| {
                        pg.live().iter().any(|g| {
                            !evict.contains(&(addr_of_be(g.addr_be), u16::from_be(g.tcp_port_be)))
                                && g.addr_be == fwd.gw_addr_be
                                && (g.tcp_port_be == fwd.gw_port_be || g.udp_port_be == fwd.gw_port_be)
                        })
                    })
            });
            if !gateway_ok {
                doomed.push((key, fwd));
            }
        }
        for (key, fwd) in &doomed {
            self.remove_flow(key, &FlowKey::rev_of_fwd(key, fwd));
        }
        Ok(doomed.len())
    }

    /// Removes the flows first seen on the interface `ifindex` (a pod's, now gone), so that
    /// they do not hold table room and reply tuples until they time out.
    pub fn purge_interface(&mut self, ifindex: u32) -> usize {
        let doomed: Vec<(FlowKey, NatFwd)> =
            self.nat_fwd.iter().flatten().filter(|(_, f)| f.ifindex == ifindex && ifindex != 0).collect();
        for (key, fwd) in &doomed {
            self.remove_flow(key, &FlowKey::rev_of_fwd(key, fwd));
        }
        doomed.len()
    }

    /// Removes both halves of a flow without ever leaving a forward entry without its
    /// reverse one. The datapath runs concurrently and may re-create the forward entry (a
    /// packet of the flow arrives just then and starts it again, on the tuple it held when
    /// the reverse entry is still there); it then gets its reverse half back here.
    pub fn remove_flow(&mut self, key: &FlowKey, rev_key: &FlowKey) {
        // Reverse first: a reverse entry without its forward one is harmless (replies are
        // still restored; the forward path re-creates its half), the other way round is not.
        let _ = self.nat_rev.remove(rev_key);
        let _ = self.nat_fwd.remove(key);
        self.ensure_rev(key);
    }

    /// Re-creates the reverse entry of the flow `key` if the flow has a forward entry but
    /// not its reverse one. True when it did.
    pub fn ensure_rev(&mut self, key: &FlowKey) -> bool {
        let Ok(fwd) = self.nat_fwd.get(key, 0) else { return false };
        let rev_key = FlowKey::rev_of_fwd(key, &fwd);
        if self.nat_rev.get(&rev_key, 0).is_ok() {
            return false;
        }
        self.nat_rev
            .insert(rev_key, FlowKey::rev_value_of_fwd(key, &fwd, fwd.last_seen_ns), BPF_NOEXIST)
            .is_ok()
    }
}

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// What one garbage-collection pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub flows: usize,
    pub orphans: usize,
    /// Forward entries that had lost their reverse half and got it back.
    pub revs_restored: usize,
}

impl ControlMaps {
    /// Expires idle flows: UDP after `udp_timeout`, TCP that saw both FINs or a RST after
    /// `tcp_closed_timeout`, other TCP after `tcp_timeout`. `now_ns` is on the clock the
    /// datapath stamps with (`bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC). Reverse entries without
    /// a forward entry go too once idle as long. Forward entries found without their reverse
    /// half get it back.
    pub fn expire(&mut self, now_ns: u64, gc: &GcConfig) -> GcReport {
        let mut report = GcReport::default();
        let timeout = |proto: u8, flags: u32| -> u64 {
            let d = if proto != IPPROTO_TCP {
                gc.udp_timeout
            } else if flags & FLOW_RST != 0 || flags & (FLOW_FIN_POD | FLOW_FIN_PEER) == FLOW_FIN_POD | FLOW_FIN_PEER {
                gc.tcp_closed_timeout
            } else {
                gc.tcp_timeout
            };
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
        };
        let mut doomed = Vec::new();
        let mut live_rev = std::collections::HashSet::new();
        let mut half = Vec::new();
        for (key, fwd) in self.nat_fwd.iter().flatten() {
            let rev_key = FlowKey::rev_of_fwd(&key, &fwd);
            let rev = self.nat_rev.get(&rev_key, 0).ok();
            let flags = fwd.flags | rev.map_or(0, |r| r.flags);
            let last = fwd.last_seen_ns.max(rev.map_or(0, |r| r.last_seen_ns));
            if now_ns.saturating_sub(last) > timeout(key.proto, flags) {
                doomed.push((key, rev_key));
            } else {
                if rev.is_none() {
                    half.push(key);
                }
                live_rev.insert(rev_key);
            }
        }
        for (key, rev_key) in &doomed {
            self.remove_flow(key, rev_key);
        }
        report.flows = doomed.len();
        let orphans: Vec<FlowKey> = self
            .nat_rev
            .iter()
            .flatten()
            .filter(|(k, r)| !live_rev.contains(k) && now_ns.saturating_sub(r.last_seen_ns) > timeout(k.proto, r.flags))
            .map(|(k, _)| k)
            .collect();
        for k in &orphans {
            let Ok(rev) = self.nat_rev.get(k, 0) else { continue };
            let fwd_key = FlowKey::fwd_of_rev(k, &rev);
            if self.nat_fwd.get(&fwd_key, 0).is_ok() {
                // Its forward half came back (the flow restarted) since the first pass.
                continue;
            }
            let _ = self.nat_rev.remove(k);
            self.ensure_rev(&fwd_key);
            report.orphans += 1;
        }
        for key in &half {
            if self.ensure_rev(key) {
                report.revs_restored += 1;
            }
        }
        report
    }
}

/// Sums the per-CPU counters of the pinned stats map.
pub fn read_stats(pins: &Pins) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    sum_stats(&open(pins, names::STATS)?)
}

/// Takes the stats map out of a loaded object (unpinned use).
pub fn take_stats(ebpf: &mut aya::Ebpf) -> anyhow::Result<Stats> {
    take(ebpf, names::STATS)
}

/// Sums the per-CPU counters.
pub fn sum_stats(stats: &Stats) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let mut out = BTreeMap::new();
    for c in Counter::ALL {
        let values = stats.get(&(c as u32), 0).with_context(|| format!("reading counter {}", c.name()))?;
        out.insert(c.name(), values.iter().sum());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::config::Config;

    const V1: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
peers:
  - name: cluster2
    podCIDRs: ["10.245.0.0/16", "10.250.0.0/24"]
    gateways:
      - {address: 192.0.2.2, port: 31674, udpPort: 31675}
  - name: cluster3
    podCIDRs: ["10.246.0.0/16"]
    gateways:
      - {address: 192.0.2.3, port: 30000}
"#;

    /// cluster2 gets a second gateway and loses a CIDR, cluster3 leaves, cluster4 arrives,
    /// and 10.246.0.0/16 moves from cluster3 to cluster4.
    const V2: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
peers:
  - name: cluster2
    podCIDRs: ["10.245.0.0/16"]
    gateways:
      - {address: 192.0.2.2, port: 31674, udpPort: 31675}
      - {address: 192.0.2.12, port: 31674}
  - name: cluster4
    podCIDRs: ["10.246.0.0/16", "10.247.0.0/16"]
    gateways:
      - {address: 192.0.2.4, port: 32000}
"#;

    fn names(d: &Desired, more: &Desired) -> BTreeMap<u32, String> {
        d.peer_names.iter().chain(&more.peer_names).map(|(k, v)| (*k, v.clone())).collect()
    }

    #[test]
    fn first_sync_plan_is_golden() {
        let d = Config::from_yaml(V1).unwrap().desired();
        let plan = Plan::new(&BTreeMap::new(), &BTreeMap::new(), &d);
        crate::golden::check("plan_initial.txt", &plan.render(&d.peer_names));
        assert_eq!(plan.report().routes_added, 3);
    }

    #[test]
    fn reload_plan_touches_only_the_difference() {
        let d1 = Config::from_yaml(V1).unwrap().desired();
        let d2 = Config::from_yaml(V2).unwrap().desired();
        let plan = Plan::new(&d1.routes, &d1.peers, &d2);
        crate::golden::check("plan_reload.txt", &plan.render(&names(&d1, &d2)));
        // Applying the same config again changes nothing.
        assert_eq!(Plan::new(&d2.routes, &d2.peers, &d2), Plan::default());
    }

    #[test]
    fn health_marks_only_the_dead_gateway() {
        let mut d = Config::from_yaml(V2).unwrap().desired();
        d.apply_health(&std::collections::BTreeSet::from([("192.0.2.12".parse().unwrap(), 31674)]));
        let before = Config::from_yaml(V2).unwrap().desired();
        let plan = Plan::new(&before.routes, &before.peers, &d);
        crate::golden::check("plan_gateway_down.txt", &plan.render(&d.peer_names));
    }
}
