//! Typed access to the pinned maps: syncing them to a desired state, and reading them back
//! for dumps. Works from pins alone, so the CLI needs no running agent.

use std::{collections::BTreeMap, net::Ipv4Addr};

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

fn route_key(net: &Ipv4Net) -> Key<u32> {
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
        for item in self.routes.iter() {
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

    /// Makes the maps hold `desired`, touching only what differs. New routes and gateways go
    /// in before anything is removed, so no packet meets a half-applied state that drops it;
    /// flows of withdrawn routes or of gateways that are gone or down are purged last, so
    /// their next packet picks a live gateway.
    pub fn sync(&mut self, desired: &Desired) -> anyhow::Result<SyncReport> {
        let mut report = SyncReport::default();
        let cur_peers = self.current_peers()?;
        for (id, want) in &desired.peers {
            if cur_peers.get(id) != Some(want) {
                self.peers.insert(id, *want, 0).context("writing the peer map")?;
                report.peers_written += 1;
            }
            let name = peer_name_value(desired.peer_names.get(id).map_or("", String::as_str));
            if self.names.get(id, 0).ok() != Some(name) {
                self.names.insert(id, name, 0).context("writing the peer-name map")?;
            }
        }
        let cur_routes = self.current_routes()?;
        for (net, id) in &desired.routes {
            match cur_routes.get(net) {
                Some(cur) if cur == id => {}
                Some(_) => {
                    self.routes.insert(&route_key(net), RouteValue { peer_id: *id }, 0)?;
                    report.routes_updated += 1;
                }
                None => {
                    self.routes.insert(&route_key(net), RouteValue { peer_id: *id }, 0)?;
                    report.routes_added += 1;
                }
            }
        }
        for net in cur_routes.keys().filter(|n| !desired.routes.contains_key(n)) {
            self.routes.remove(&route_key(net)).context("removing a route")?;
            report.routes_removed += 1;
        }
        for id in cur_peers.keys().filter(|id| !desired.peers.contains_key(id)) {
            self.peers.remove(id).context("removing a peer")?;
            let _ = self.names.remove(id);
            report.peers_removed += 1;
        }
        report.flows_purged = self.purge_flows(desired)?;
        Ok(report)
    }

    /// Removes flow state that no longer matches the desired routes and gateways: the flow's
    /// destination left every remote CIDR, moved to another peer, or its gateway is gone or
    /// down.
    pub fn purge_flows(&mut self, desired: &Desired) -> anyhow::Result<usize> {
        let mut doomed = Vec::new();
        for item in self.nat_fwd.iter() {
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
                        pg.gateways[..(pg.count as usize).min(pg.gateways.len())].iter().any(|g| {
                            g.flags & GW_UP != 0
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
            let _ = self.nat_fwd.remove(key);
            let _ = self.nat_rev.remove(&FlowKey::rev_of_fwd(key, fwd));
        }
        Ok(doomed.len())
    }
}

/// What one garbage-collection pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub flows: usize,
    pub orphans: usize,
}

impl ControlMaps {
    /// Expires idle flows: UDP after `udp_timeout`, TCP that saw both FINs or a RST after
    /// `tcp_closed_timeout`, other TCP after `tcp_timeout`. `now_ns` is on the clock the
    /// datapath stamps with (`bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC). Reverse entries whose
    /// forward entry the LRU evicted go too once idle as long.
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
        for (key, fwd) in self.nat_fwd.iter().flatten() {
            let rev_key = FlowKey::rev_of_fwd(&key, &fwd);
            let rev = self.nat_rev.get(&rev_key, 0).ok();
            let flags = fwd.flags | rev.map_or(0, |r| r.flags);
            let last = fwd.last_seen_ns.max(rev.map_or(0, |r| r.last_seen_ns));
            if now_ns.saturating_sub(last) > timeout(key.proto, flags) {
                doomed.push((key, rev_key));
            } else {
                live_rev.insert(rev_key);
            }
        }
        for (key, rev_key) in &doomed {
            let _ = self.nat_fwd.remove(key);
            let _ = self.nat_rev.remove(rev_key);
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
            let _ = self.nat_rev.remove(k);
        }
        report.orphans = orphans.len();
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
