//! Typed access to the pinned maps: syncing them to a desired state, and reading them back
//! for dumps. Works from pins alone, so the CLI needs no running agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsFd as _, OwnedFd},
};

use anyhow::Context as _;
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, MapError, PerCpuArray,
};
use ipnet::Ipv4Net;
use meshnet_common::{
    limits, names, Counter, FlowKey, LocalCidrs, LocalNet, NatFwd, NatRev, PeerGateways, PeerName, RouteValue, FLOW_FIN_PEER, FLOW_FIN_POD,
    FLOW_RST, FLOW_UNANSWERED, GW_UP, IPPROTO_TCP,
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
pub type Clock = Array<MapData, u64>;
pub type LocalMap = Array<MapData, LocalCidrs>;
pub type GwPorts = Array<MapData, u64>;

fn take<T>(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).with_context(|| format!("the object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} does not have the layout this build expects"))
}

/// Replaces `cur`, the value of a seqlocked array slot (see [`LocalCidrs`]), with `next`: the
/// value with an odd sequence number, the new value under it, the new value with the next
/// even one. Each write changes either the sequence number or the value, never both, so a
/// reader that sees the same even number before and after its read has read one whole value.
/// `seq_of` and `with_seq` read and set a value's sequence number. Writes nothing when the
/// value is already there; whether it wrote.
pub fn write_seqlocked<V: Copy + PartialEq>(
    cur: V,
    next: V,
    seq_of: impl Fn(&V) -> u32,
    with_seq: impl Fn(V, u32) -> V,
    mut write: impl FnMut(V) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let seq = seq_of(&cur);
    if seq & 1 == 0 && with_seq(cur, 0) == with_seq(next, 0) {
        return Ok(false);
    }
    let odd = seq | 1;
    if seq & 1 == 0 {
        write(with_seq(cur, odd))?;
    }
    write(with_seq(next, odd))?;
    write(with_seq(next, odd.wrapping_add(1)))?;
    Ok(true)
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

/// The tunnel peers that `routes` (`mn_tun_routes_v1`: a node's pod CIDR → that node, its
/// peer and the peer's tunnel port) serve, as config peers, named by `name_of` (peer id →
/// name; a peer without a name is left out).
///
/// The tunnel maps keep no peer-wide pod CIDRs (the datapath needs none: it routes by the
/// nodes' CIDRs), so a peer's `podCIDRs` here are its nodes' CIDRs, aggregated. That is all
/// it serves: the agent validates this peer as it would the published one, and the maps it
/// makes are the ones it came from. A node the maps hold with no route (no path from this
/// node to it when the routes were written) is left out: without a route nothing is sent
/// to it, and nothing from it is taken either (the uplink checks a packet's inner source
/// against these routes), so leaving it out until the API answers loses no traffic.
pub fn tunnel_peers_of(routes: &BTreeMap<Ipv4Net, meshnet_common::TunnelNode>, name_of: impl Fn(u32) -> Option<String>) -> BTreeMap<String, crate::config::RawPeer> {
    // Peer id → (its tunnel port, its nodes by address with their CIDRs).
    let mut by_peer: BTreeMap<u32, (u16, BTreeMap<Ipv4Addr, Vec<Ipv4Net>>)> = BTreeMap::new();
    for (net, node) in routes {
        let (_, nodes) = by_peer.entry(node.peer_id).or_insert_with(|| (u16::from_be(node.port_be), BTreeMap::new()));
        nodes.entry(addr_of_be(node.addr_be)).or_default().push(*net);
    }
    let mut out = BTreeMap::new();
    for (id, (port, nodes)) in by_peer {
        let Some(name) = name_of(id) else { continue };
        let all: Vec<Ipv4Net> = nodes.values().flatten().copied().collect();
        let peer = crate::config::RawPeer {
            name: name.clone(),
            mode: crate::config::PeerMode::Tunnel,
            pod_cidrs: Ipv4Net::aggregate(&all).iter().map(ToString::to_string).collect(),
            tunnel_port: Some(u32::from(port)),
            nodes: nodes
                .into_iter()
                .map(|(a, cidrs)| crate::config::RawTunnelNode { address: a.to_string(), pod_cidrs: cidrs.iter().map(ToString::to_string).collect() })
                .collect(),
            ..Default::default()
        };
        out.insert(name, peer);
    }
    out
}

/// Every route of a route map, by CIDR, with its peer id.
pub fn routes_of(routes: &Routes) -> anyhow::Result<BTreeMap<Ipv4Net, u32>> {
    let mut out = BTreeMap::new();
    for item in routes {
        let (k, v) = item.with_context(|| format!("reading {}", names::ROUTES))?;
        let prefix = u8::try_from(k.prefix_len()).unwrap_or(32);
        let net = Ipv4Net::new(addr_of_be(k.data()), prefix).with_context(|| format!("a bad prefix in {}", names::ROUTES))?;
        out.insert(net, v.peer_id);
    }
    Ok(out)
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

/// What the control maps hold now: where a [`Plan`] starts from.
#[derive(Debug, Default, Clone)]
pub struct Current {
    pub routes: BTreeMap<Ipv4Net, u32>,
    pub peers: BTreeMap<u32, PeerGateways>,
    pub names: BTreeMap<u32, String>,
    /// The forward flow entries.
    pub flows: Vec<(FlowKey, NatFwd)>,
}

/// What a sync evicts, and the grace it gives (see [`ControlMaps::sync_evicting`]).
#[derive(Debug, Clone, Default)]
pub struct Evicting {
    /// Gateways (address, TCP port) down past their grace period.
    pub evict: BTreeSet<(Ipv4Addr, u16)>,
    /// The grace period; 0: none.
    pub grace_ns: u64,
    /// `CLOCK_MONOTONIC` now.
    pub now_ns: u64,
    /// The ids of the config file's peers.
    pub file_peers: BTreeSet<u32>,
}

/// Why a flow's state is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// Its destination is in no remote CIDR any more.
    RouteGone,
    /// Its destination now belongs to another peer.
    PeerChanged,
    /// Its gateway is no longer one of its peer's.
    GatewayGone,
    /// Its gateway has been down past its grace period.
    Evicted,
    /// Its gateway left its peer's list longer ago than the grace period.
    Retired,
}

impl Purge {
    fn as_str(self) -> &'static str {
        match self {
            Purge::RouteGone => "route withdrawn",
            Purge::PeerChanged => "route moved to another peer",
            Purge::GatewayGone => "gateway removed",
            Purge::Evicted => "gateway down past its grace period",
            Purge::Retired => "gateway removed past its grace period",
        }
    }
}

/// Longest-prefix match over a desired route set: at most one hash lookup per prefix length
/// in use, so that a purge costs O(flows × 33), not O(flows × routes).
struct RouteLookup {
    /// The mask of each prefix length in use and its routes (by network address), longest
    /// first.
    by_len: Vec<(u32, std::collections::HashMap<u32, u32>)>,
}

impl RouteLookup {
    fn new(routes: &BTreeMap<Ipv4Net, u32>) -> Self {
        let mut by_len: BTreeMap<std::cmp::Reverse<u8>, std::collections::HashMap<u32, u32>> = BTreeMap::new();
        for (net, id) in routes {
            by_len.entry(std::cmp::Reverse(net.prefix_len())).or_default().insert(u32::from(net.network()), *id);
        }
        let mask = |len: u8| Ipv4Net::new(Ipv4Addr::UNSPECIFIED, len).map_or(0, |n| u32::from(n.netmask()));
        Self { by_len: by_len.into_iter().map(|(len, m)| (mask(len.0), m)).collect() }
    }

    fn get(&self, addr: Ipv4Addr) -> Option<u32> {
        let a = u32::from(addr);
        self.by_len.iter().find_map(|(mask, m)| m.get(&(a & mask)).copied())
    }
}

/// The changes that take the maps from their current content to a desired state, in the
/// order they are applied: gateways, names and routes in, then removals, then the flows
/// that the new state leaves without a route or a gateway.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub peer_writes: Vec<(u32, PeerGateways)>,
    pub name_writes: Vec<(u32, String)>,
    /// A route, its peer, and whether it is new (else it moves to another peer).
    pub route_writes: Vec<(Ipv4Net, u32, bool)>,
    pub route_removals: Vec<Ipv4Net>,
    /// Peers removed, with their names.
    pub peer_removals: Vec<u32>,
    /// Names of peers that are gone without a gateway entry to remove (tunnel peers).
    pub name_removals: Vec<u32>,
    pub flow_purges: Vec<(FlowKey, NatFwd, Purge)>,
}

impl Plan {
    /// The plan from `cur` to `desired`, purging also the flows of the gateways in `evict`
    /// (by address and TCP port). A gateway that is merely down keeps its flows.
    #[must_use]
    pub fn new(cur: &Current, desired: &Desired, evict: &BTreeSet<(Ipv4Addr, u16)>) -> Self {
        let lookup = RouteLookup::new(&desired.routes);
        let flow_purges = cur
            .flows
            .iter()
            .filter_map(|(key, fwd)| {
                let why = match lookup.get(addr_of_be(key.dst_be)) {
                    None => Purge::RouteGone,
                    Some(id) if id != fwd.peer_id => Purge::PeerChanged,
                    Some(id) => {
                        let same = |g: &&meshnet_common::Gateway| {
                            g.addr_be == fwd.gw_addr_be && (g.tcp_port_be == fwd.gw_port_be || g.udp_port_be == fwd.gw_port_be)
                        };
                        match desired.peers.get(&id).and_then(|pg| pg.live().iter().find(same)) {
                            None => Purge::GatewayGone,
                            Some(g) if evict.contains(&(addr_of_be(g.addr_be), u16::from_be(g.tcp_port_be))) => Purge::Evicted,
                            Some(_) => return None,
                        }
                    }
                };
                Some((*key, *fwd, why))
            })
            .collect();
        Self {
            peer_writes: desired
                .peers
                .iter()
                .filter(|(id, want)| cur.peers.get(id) != Some(want))
                .map(|(id, want)| (*id, *want))
                .collect(),
            // Every peer's name, tunnel peers' too (they have no gateway entry): dumps and
            // metrics name them from this map.
            name_writes: desired
                .peers
                .keys()
                .chain(desired.peer_names.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                // As the map stores it: cut to its 64 bytes.
                .map(|id| (*id, peer_name_of(&peer_name_value(desired.peer_names.get(id).map_or("", String::as_str)))))
                .filter(|(id, name)| cur.names.get(id) != Some(name))
                .collect(),
            route_writes: desired
                .routes
                .iter()
                .filter(|(net, id)| cur.routes.get(net) != Some(id))
                .map(|(net, id)| (*net, *id, !cur.routes.contains_key(net)))
                .collect(),
            route_removals: cur.routes.keys().filter(|n| !desired.routes.contains_key(n)).copied().collect(),
            peer_removals: cur.peers.keys().filter(|id| !desired.peers.contains_key(id)).copied().collect(),
            name_removals: cur
                .names
                .keys()
                .filter(|id| !desired.peers.contains_key(id) && !desired.peer_names.contains_key(id) && !cur.peers.contains_key(id))
                .copied()
                .collect(),
            flow_purges,
        }
    }

    fn report(&self) -> SyncReport {
        SyncReport {
            routes_added: self.route_writes.iter().filter(|r| r.2).count(),
            routes_updated: self.route_writes.iter().filter(|r| !r.2).count(),
            routes_removed: self.route_removals.len(),
            peers_written: self.peer_writes.len(),
            peers_removed: self.peer_removals.len(),
            flows_purged: self.flow_purges.len(),
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
        for (id, n) in &self.name_writes {
            let _ = writeln!(out, "name peer {id:08x}: {n}");
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
        for id in &self.name_removals {
            let _ = writeln!(out, "forget name of peer {}", name(id));
        }
        for (key, fwd, why) in &self.flow_purges {
            let _ = writeln!(
                out,
                "purge flow {}:{} -> {}:{} proto {} via {}:{}: {}",
                addr_of_be(key.src_be),
                u16::from_be(key.sport_be),
                addr_of_be(key.dst_be),
                u16::from_be(key.dport_be),
                key.proto,
                addr_of_be(fwd.gw_addr_be),
                u16::from_be(fwd.gw_port_be),
                why.as_str()
            );
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
    /// Second fds to the two flow maps, for whole-table reads in batches (see batch.rs).
    flow_fds: Option<(OwnedFd, OwnedFd)>,
    /// The flow clock; absent in pins of releases that stamped flows with the kernel's clock.
    clock: Option<Clock>,
    /// This cluster's pod CIDRs; absent in pins of older releases.
    pub local: Option<LocalMap>,
    /// The gateway-port bitmap; absent in pins of older releases.
    pub gw_ports: Option<GwPorts>,
    /// The last tick published.
    clock_published: Option<u64>,
    /// The spells the flow clock stood still, newest last (at most [`MAX_CLOCK_GAPS`]).
    clock_gaps: Vec<ClockGap>,
    /// Flows of an evicted gateway seen sent on after their last reply: that reply's stamp,
    /// when this was first seen, and the pod's stamp then (see [`Self::spare_answered`]).
    unanswered: std::collections::HashMap<FlowKey, Unanswered>,
    /// Gateways (address, port, as flows hold them) gone from their peer's list while flows
    /// still use them, and when each was first seen gone (see [`Self::spare_retiring`]).
    retiring: std::collections::HashMap<(u32, u16), u64>,
    /// Reverse entries marked unanswered when the agent started, whose mark it does not trust
    /// (see [`Self::note_unanswered_at_start`]); each leaves the set once a GC pass sees it
    /// answered, or with its flow.
    marked_before_start: std::collections::HashSet<FlowKey>,
}

/// Ticks further apart than this mean the clock stood still in between.
const CLOCK_GAP_NS: u64 = 2_000_000_000;
/// Gaps remembered; older ones are long past any flow timeout in practice.
const MAX_CLOCK_GAPS: usize = 64;

/// A spell when the flow clock stood still (no agent ran, or its loop or its publishes
/// stalled): the datapath stamped every flow it saw with the last tick, `stale`, until
/// `resumed` was published. A flow stamped `stale` may have been busy all along, so the GC
/// counts it as seen at `resumed`. Gaps live in the agent's memory: in a crash loop, a gap
/// before the last restart is forgotten, and a flow idle since it may expire up to that
/// gap's length early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockGap {
    pub stale: u64,
    pub resumed: u64,
}

impl ClockGap {
    /// When a flow stamped `last_seen` was last seen, for all the GC can tell.
    #[must_use]
    pub fn last_seen(gaps: &[Self], last_seen: u64) -> u64 {
        gaps.iter().fold(last_seen, |last, g| if last >= g.stale && last < g.resumed { g.resumed } else { last })
    }
}

/// `nets` as `mn_local_v1` holds them: the first [`limits::MAX_LOCAL_CIDRS`].
fn local_nets(nets: &[Ipv4Net]) -> Vec<LocalNet> {
    nets.iter()
        .take(limits::MAX_LOCAL_CIDRS)
        .map(|n| LocalNet { addr_be: addr_be(n.network()), mask_be: addr_be(n.netmask()) })
        .collect()
}

/// A second fd to the hash map `name` of `ebpf`, for batch reads.
fn dup_fd(map: Option<&Map>) -> Option<OwnedFd> {
    match map? {
        Map::HashMap(d) => d.fd().as_fd().try_clone_to_owned().ok(),
        _ => None,
    }
}

impl ControlMaps {
    pub fn open(pins: &Pins) -> anyhow::Result<Self> {
        let dup = |name: &str| MapData::from_pin(pins.map(name)).ok().and_then(|d| d.fd().as_fd().try_clone_to_owned().ok());
        Ok(Self {
            routes: open(pins, names::ROUTES)?,
            peers: open(pins, names::PEERS)?,
            names: open(pins, names::PEER_NAMES)?,
            nat_fwd: open(pins, names::NAT_FWD)?,
            nat_rev: open(pins, names::NAT_REV)?,
            flow_fds: dup(names::NAT_FWD).zip(dup(names::NAT_REV)),
            clock: open(pins, names::CLOCK).ok(),
            local: open(pins, names::LOCAL).ok(),
            gw_ports: open(pins, names::GW_PORTS).ok(),
            clock_published: None,
            clock_gaps: Vec::new(),
            unanswered: std::collections::HashMap::new(),
            retiring: std::collections::HashMap::new(),
            marked_before_start: std::collections::HashSet::new(),
        })
    }

    /// Takes the control maps out of a loaded object (unpinned use: tests, benchmarks).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let flow_fds = dup_fd(ebpf.map(names::NAT_FWD)).zip(dup_fd(ebpf.map(names::NAT_REV)));
        Ok(Self {
            routes: take(ebpf, names::ROUTES)?,
            peers: take(ebpf, names::PEERS)?,
            names: take(ebpf, names::PEER_NAMES)?,
            nat_fwd: take(ebpf, names::NAT_FWD)?,
            nat_rev: take(ebpf, names::NAT_REV)?,
            flow_fds,
            clock: take(ebpf, names::CLOCK).ok(),
            local: take(ebpf, names::LOCAL).ok(),
            gw_ports: take(ebpf, names::GW_PORTS).ok(),
            clock_published: None,
            clock_gaps: Vec::new(),
            unanswered: std::collections::HashMap::new(),
            retiring: std::collections::HashMap::new(),
            marked_before_start: std::collections::HashSet::new(),
        })
    }

    /// Publishes this cluster's pod CIDRs (the first [`limits::MAX_LOCAL_CIDRS`]) for the
    /// datapath, with the seqlock's three writes (see [`LocalCidrs`]) when they changed.
    pub fn publish_local(&mut self, nets: &[Ipv4Net]) -> anyhow::Result<()> {
        self.write_local(&local_nets(nets))
    }

    /// The local CIDRs `mn_local_v1` holds now.
    fn published_local(&self) -> anyhow::Result<Vec<LocalNet>> {
        let Some(map) = self.local.as_ref() else {
            return Ok(Vec::new());
        };
        let cur = map.get(&0, 0).context("reading the local CIDR map")?;
        Ok(cur.nets.iter().take(cur.count as usize).copied().collect())
    }

    fn write_local(&mut self, nets: &[LocalNet]) -> anyhow::Result<()> {
        let Some(map) = self.local.as_mut() else {
            // Pins of a release without it: the datapath takes its lookups.
            return Ok(());
        };
        let cur = map.get(&0, 0).context("reading the local CIDR map")?;
        let mut next = LocalCidrs { seq: cur.seq, ..LocalCidrs::default() };
        for (slot, net) in next.nets.iter_mut().zip(nets.iter().copied().chain(std::iter::repeat(LocalNet::NONE))) {
            *slot = net;
        }
        next.count = u32::try_from(nets.len().min(limits::MAX_LOCAL_CIDRS)).unwrap_or(0);
        write_seqlocked(cur, next, |v| v.seq, |v, seq| LocalCidrs { seq, ..v }, |v| map.set(0, v, 0).context("writing the local CIDR map"))
            .map(|_| ())
    }

    /// Whether the gateway-port bitmap is in use (bit 0); `true` without the map, which then
    /// needs no marking.
    fn gateway_ports_in_use(&self) -> anyhow::Result<bool> {
        let Some(map) = self.gw_ports.as_ref() else {
            return Ok(true);
        };
        Ok(map.get(&0, 0).context("reading the gateway-port bitmap")? & 1 != 0)
    }

    /// Sets the bits of `ports_be` (network byte order; 0 is skipped) in the gateway-port
    /// bitmap, then its in-use bit. Bits are never cleared: see `names::GW_PORTS`.
    pub fn mark_gateway_ports(&mut self, ports_be: impl Iterator<Item = u16>) -> anyhow::Result<()> {
        let Some(map) = self.gw_ports.as_mut() else {
            return Ok(());
        };
        let mut words: BTreeMap<u32, u64> = BTreeMap::new();
        for port in ports_be.map(u16::from_be).filter(|p| *p != 0) {
            *words.entry(u32::from(port) >> 6).or_default() |= 1 << (port & 63);
        }
        for (i, bits) in words {
            let cur = map.get(&i, 0).context("reading the gateway-port bitmap")?;
            if cur | bits != cur {
                map.set(i, cur | bits, 0).context("writing the gateway-port bitmap")?;
            }
        }
        let w0 = map.get(&0, 0).context("reading the gateway-port bitmap")?;
        if w0 & 1 == 0 {
            map.set(0, w0 | 1, 0).context("writing the gateway-port bitmap")?;
        }
        Ok(())
    }

    /// Publishes `now_ns` (CLOCK_MONOTONIC) as the datapath's flow clock, noting for the GC
    /// when it stood still since the last tick, this agent's or a previous one's (see
    /// [`ClockGap`]).
    pub fn publish_clock(&mut self, now_ns: u64) -> anyhow::Result<()> {
        let Some(clock) = self.clock.as_mut() else {
            anyhow::bail!("no flow clock map ({}) in the pinned maps", names::CLOCK);
        };
        let prev = match self.clock_published {
            Some(p) => p,
            None => clock.get(&0, 0).context("reading the flow clock")?,
        };
        clock.set(0, now_ns, 0).context("publishing the flow clock")?;
        if prev != 0 && now_ns.saturating_sub(prev) > CLOCK_GAP_NS {
            if self.clock_gaps.len() == MAX_CLOCK_GAPS {
                self.clock_gaps.remove(0);
            }
            self.clock_gaps.push(ClockGap { stale: prev, resumed: now_ns });
        }
        self.clock_published = Some(now_ns);
        Ok(())
    }

    /// The last tick published: the GC's "now". Should publishing stop working, the
    /// datapath stamps busy flows with the last tick, and measured from it none looks idle.
    #[must_use]
    pub fn published_clock(&self) -> Option<u64> {
        self.clock_published
    }

    /// Every forward flow entry: in batches where the kernel has them, else entry by entry.
    #[must_use]
    pub fn forward_flows(&self) -> Vec<(FlowKey, NatFwd)> {
        self.flow_fds
            .as_ref()
            .and_then(|(fwd, _)| crate::batch::lookup_all(fwd.as_fd()).ok())
            .unwrap_or_else(|| self.nat_fwd.iter().flatten().collect())
    }

    /// Every reverse flow entry, read as [`ControlMaps::forward_flows`] reads the forward ones.
    #[must_use]
    pub fn reverse_flows(&self) -> Vec<(FlowKey, NatRev)> {
        self.flow_fds
            .as_ref()
            .and_then(|(_, rev)| crate::batch::lookup_all(rev.as_fd()).ok())
            .unwrap_or_else(|| self.nat_rev.iter().flatten().collect())
    }

    pub fn current_routes(&self) -> anyhow::Result<BTreeMap<Ipv4Net, u32>> {
        routes_of(&self.routes)
    }

    pub fn current_peers(&self) -> anyhow::Result<BTreeMap<u32, PeerGateways>> {
        self.peers
            .iter()
            .map(|r| r.context("reading the peer map"))
            .collect()
    }

    /// The peers the pinned maps serve, as config peers (a restarted agent's last good
    /// state): the gateway peers from the route trie and the peer map, and, given `tunnel`,
    /// the tunnel peers from its routes (see [`tunnel_peers_of`]). Peers without a name
    /// entry are left out: they cannot be matched to anything.
    pub fn pinned_peers(&self, tunnel: Option<&crate::tunnel::TunnelMaps>) -> anyhow::Result<BTreeMap<String, crate::config::RawPeer>> {
        let routes = self.current_routes()?;
        let name_of = |id: u32| self.names.get(&id, 0).ok().map(|v| peer_name_of(&v)).filter(|n| !n.is_empty());
        let mut out = tunnel.map(|t| tunnel_peers_of(&t.current_routes(), name_of)).unwrap_or_default();
        for (id, pg) in self.current_peers()? {
            let Some(name) = name_of(id) else { continue };
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
            out.insert(name.clone(), crate::config::RawPeer { name, pod_cidrs, gateways, ..Default::default() });
        }
        Ok(out)
    }

    /// What the maps hold for each peer, by name (see [`crate::config::Held`]): what
    /// [`ControlMaps::pinned_peers`] gives, and the tunnel nodes held without a route yet.
    pub fn held_claims(&self, tunnel: &crate::tunnel::TunnelMaps) -> anyhow::Result<BTreeMap<String, crate::config::Held>> {
        let pinned = self.pinned_peers(Some(tunnel))?;
        let mut out: BTreeMap<String, crate::config::Held> = pinned.iter().map(|(n, p)| (n.clone(), crate::config::Held::of(p))).collect();
        // A tunnel peer with nodes but no route yet is held too: what no node CIDR of it covers
        // it keeps (see `config::Held`).
        for id in tunnel.current_nodes().into_values() {
            let Some(name) = self.names.get(&id, 0).ok().map(|v| peer_name_of(&v)).filter(|n| !n.is_empty()) else { continue };
            out.entry(name).or_default();
        }
        Ok(out)
    }

    /// Makes the maps hold `desired`, touching only what differs. New routes and gateways go
    /// in before anything is removed, so no packet meets a half-applied state that drops it;
    /// flows of withdrawn routes or of gateways that are gone are purged last, so their next
    /// packet picks a live gateway. Flows of a gateway that is merely down stay. With no
    /// grace period: [`ControlMaps::sync_evicting`] gives one.
    pub fn sync(&mut self, desired: &Desired) -> anyhow::Result<SyncReport> {
        self.sync_evicting(desired, &Evicting::default())
    }

    /// [`ControlMaps::sync`], also purging the flows of the gateways that `e` evicts, and
    /// giving the flows of gateways gone from a published peer's list its grace period (see
    /// [`Self::spare_retiring`]).
    pub fn sync_evicting(&mut self, desired: &Desired, e: &Evicting) -> anyhow::Result<SyncReport> {
        let (evict, grace_ns, now_ns) = (&e.evict, e.grace_ns, e.now_ns);
        let current = self.current()?;
        // Before any gateway is published: a flow's replies must never find its port unmarked.
        // The first time, reverse entries too: one whose forward half was lost (a state
        // `to_pod` repairs) may be all a flow of an earlier release has left.
        let ports = desired.peers.values().chain(current.peers.values()).flat_map(|p| p.live().iter().flat_map(|g| [g.tcp_port_be, g.udp_port_be]));
        let revs = if self.gateway_ports_in_use()? { Vec::new() } else { self.reverse_flows() };
        self.mark_gateway_ports(ports.chain(current.flows.iter().map(|(_, f)| f.gw_port_be)).chain(revs.iter().map(|(k, _)| k.sport_be)))?;
        // A CIDR leaving this cluster (for a peer) stops being local before its route goes in;
        // one joining it becomes local once the peer's route is gone.
        let desired_local = local_nets(&desired.local);
        let staying: Vec<LocalNet> = self.published_local()?.into_iter().filter(|n| desired_local.contains(n)).collect();
        self.write_local(&staying)?;
        let mut plan = Plan::new(&current, desired, evict);
        self.spare_retiring(&mut plan, &e.file_peers, grace_ns, now_ns);
        self.spare_answered(&mut plan, grace_ns, now_ns);
        self.apply(&plan)?;
        self.write_local(&desired_local)?;
        Ok(plan.report())
    }

    /// Whether flows still use a gateway gone from its peer's list, within its grace period or
    /// unanswered past it: the agent syncs at every probe round until none does.
    #[must_use]
    pub fn retiring(&self) -> bool {
        !self.retiring.is_empty()
    }

    /// Of `plan`'s purges of flows whose gateway left its peer's list, spares those within the
    /// grace period since the gateway was first seen gone, and makes the rest evictions, which
    /// [`Self::spare_answered`] purges only once unanswered. A gateway leaves the list for a
    /// moment when its pod is not Ready (a readiness flap, a rollout whose old Envoy still
    /// drains), for good when its NodePort changes or a peer of more gateways than the list
    /// holds gets a new one: its node may still carry the flows it has, and a purge resets
    /// them (the pod's next packet picks another gateway, and the remote end sees a stranger).
    /// A restarted agent counts from its first sync. With no grace period, they go at once, as
    /// do the flows of a gateway an operator took out of the config file (`file_peers`: its
    /// peers' ids): that says the gateway is to be left, now.
    fn spare_retiring(&mut self, plan: &mut Plan, file_peers: &BTreeSet<u32>, grace_ns: u64, now_ns: u64) {
        if grace_ns == 0 {
            self.retiring.clear();
            return;
        }
        let mut still = std::collections::HashMap::new();
        for (_, fwd, why) in plan.flow_purges.iter_mut().filter(|(_, f, why)| *why == Purge::GatewayGone && !file_peers.contains(&f.peer_id)) {
            let gw = (fwd.gw_addr_be, fwd.gw_port_be);
            let since = *self.retiring.get(&gw).unwrap_or(&now_ns);
            still.insert(gw, since);
            if now_ns.saturating_sub(since) > grace_ns {
                *why = Purge::Retired;
            }
        }
        plan.flow_purges.retain(|(_, f, why)| *why != Purge::GatewayGone || file_peers.contains(&f.peer_id));
        self.retiring = still;
    }

    /// Of `plan`'s evictions (flows of a gateway down past its grace period), keeps those the
    /// gateway still answers: a flow goes only once its pod has been sending, with no reply,
    /// for longer than `grace_ns`. Seen sent on after its last reply, a flow is noted with the
    /// pod's stamp; once the pod has sent again, with that reply still the last, the grace
    /// period runs from that sync, and the flow goes past it once two later syncs have seen
    /// the pod send again, still unanswered (a retransmitting pod, a one-way stream). The last
    /// packets of an idle flow may be its pod's own (an ACK, a window update), and a pod that
    /// speaks after a silence must have its round trip: a live gateway's answer, which resets
    /// the watch, comes before a second sync could see a second unanswered packet. Health probes open new connections, and a gateway that refuses those (a full
    /// backlog, a SYN filter) may still carry the ones it has; purging one of those would reset
    /// it. An idle flow stays too (the agent syncs at every probe round while a gateway is
    /// evicted). A flow without its reverse half cannot have its replies restored: it goes.
    fn spare_answered(&mut self, plan: &mut Plan, grace_ns: u64, now_ns: u64) {
        // `retain` keeps what is purged: true purges, false spares.
        let mut still = std::collections::HashMap::new();
        plan.flow_purges.retain(|(key, fwd, why)| {
            if !matches!(why, Purge::Evicted | Purge::Retired) {
                return true;
            }
            let Ok(rev) = self.nat_rev.get(&FlowKey::rev_of_fwd(key, fwd), 0) else { return true };
            if fwd.last_seen_ns <= rev.last_seen_ns {
                // Answered since it last sent, or idle.
                return false;
            }
            let mut seen = match self.unanswered.get(key) {
                Some(u) if u.replied == rev.last_seen_ns => *u,
                _ => Unanswered { replied: rev.last_seen_ns, sent: fwd.last_seen_ns, since: None },
            };
            if fwd.last_seen_ns > seen.sent {
                let (since, last, moved) = seen.since.get_or_insert((now_ns, fwd.last_seen_ns, 0));
                if fwd.last_seen_ns > *last {
                    *last = fwd.last_seen_ns;
                    *moved += 1;
                }
                if *moved >= 2 && now_ns.saturating_sub(*since) > grace_ns {
                    return true;
                }
            }
            still.insert(*key, seen);
            false
        });
        self.unanswered = still;
    }

    /// What the control maps hold now.
    pub fn current(&self) -> anyhow::Result<Current> {
        Ok(Current {
            routes: self.current_routes()?,
            peers: self.current_peers()?,
            names: self.names.iter().flatten().map(|(id, v)| (id, peer_name_of(&v))).collect(),
            flows: self.forward_flows(),
        })
    }

    /// Carries out `plan`, in its order. Where a map is too full to take a new entry beside
    /// the old ones, the removals go first: a withdrawn CIDR or peer then leaves a moment
    /// before its successor arrives (a new flow in between passes untranslated, or is dropped
    /// as having no live gateway), where failing would leave every change out.
    pub fn apply(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let mut removed = false;
        for (id, value) in &plan.peer_writes {
            // Any answer but "no such key" may be a replacement.
            let replaces = !matches!(self.peers.get(id, 0), Err(MapError::KeyNotFound));
            crate::grace::before_take(names::PEERS);
            let mut r = self.peers.insert(id, *value, 0);
            if !removed && r.as_ref().is_err_and(is_full) {
                self.remove_planned(plan)?;
                removed = true;
                crate::grace::before_take(names::PEERS);
                r = self.peers.insert(id, *value, 0);
            }
            r.context("writing the peer map")?;
            if replaces {
                crate::grace::freed(names::PEERS);
            }
        }
        for (id, name) in &plan.name_writes {
            let mut r = self.names.insert(id, peer_name_value(name), 0);
            if !removed && r.as_ref().is_err_and(is_full) {
                self.remove_planned(plan)?;
                removed = true;
                r = self.names.insert(id, peer_name_value(name), 0);
            }
            r.context("writing the peer-name map")?;
        }
        for (net, id, _) in &plan.route_writes {
            let mut r = trie_insert(&mut self.routes, route_key(*net), RouteValue { peer_id: *id });
            if !removed && r.as_ref().is_err_and(is_full) {
                self.remove_planned(plan)?;
                removed = true;
                r = trie_insert(&mut self.routes, route_key(*net), RouteValue { peer_id: *id });
            }
            r.context("writing a route")?;
        }
        if !removed {
            self.remove_planned(plan)?;
        }
        for (key, fwd, _) in &plan.flow_purges {
            self.remove_flow(key, &FlowKey::rev_of_fwd(key, fwd));
        }
        Ok(())
    }

    /// The plan's removals: routes, then the peers no route names any more.
    fn remove_planned(&mut self, plan: &Plan) -> anyhow::Result<()> {
        for net in &plan.route_removals {
            self.routes.remove(&route_key(*net)).context("removing a route")?;
        }
        for id in &plan.peer_removals {
            self.peers.remove(id).context("removing a peer")?;
            crate::grace::freed(names::PEERS);
            let _ = self.names.remove(id);
        }
        for id in &plan.name_removals {
            let _ = self.names.remove(id);
        }
        Ok(())
    }

    /// Removes the flows first seen on the interface `ifindex` (a pod's, now gone), so that
    /// they do not hold table room and reply tuples until they time out.
    pub fn purge_interface(&mut self, ifindex: u32) -> usize {
        if ifindex == 0 {
            return 0;
        }
        let doomed: Vec<(FlowKey, NatFwd)> = self.forward_flows().into_iter().filter(|(_, f)| f.ifindex == ifindex).collect();
        for (key, fwd) in &doomed {
            self.remove_flow(key, &FlowKey::rev_of_fwd(key, fwd));
        }
        doomed.len()
    }

    /// Removes the flows another pod's interface holds in the name of an address that has
    /// just become a pod's (`owners`: the address, as flow keys hold it, → its pod's
    /// interface); how many. The datapath lets a pod send from an address no pod holds yet,
    /// and then lets the flow stay with the interface it was made on: without this, a pod
    /// with raw sockets could open flows from the address the next pod will get, keep them
    /// alive, and hold that pod's reply tuples (and their remaps) for as long as it liked,
    /// failing every flow the new pod opens to a gateway. Flows of releases that recorded no
    /// interface (0) stay: their pod is not known.
    pub fn purge_posers(&mut self, owners: &BTreeMap<u32, u32>) -> usize {
        if owners.is_empty() {
            return 0;
        }
        let posed = |k: &FlowKey, f: &NatFwd| f.ifindex != 0 && owners.get(&k.src_be).is_some_and(|owner| *owner != f.ifindex);
        let doomed: Vec<FlowKey> = self.forward_flows().into_iter().filter(|(k, f)| posed(k, f)).map(|(k, _)| k).collect();
        let mut n = 0;
        for key in &doomed {
            // Read again: the pod's own packet may have taken the flow over since.
            let Ok(fwd) = self.nat_fwd.get(key, 0) else { continue };
            if posed(key, &fwd) {
                self.remove_flow(key, &FlowKey::rev_of_fwd(key, &fwd));
                n += 1;
            }
        }
        n
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
        // A later flow on the reply tuple is judged as its own.
        self.marked_before_start.remove(rev_key);
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

impl ControlMaps {
    /// Takes note of every reverse entry marked [`FLOW_UNANSWERED`], whose mark the GC then
    /// ignores; how many. Run once at the start, after this build's programs are attached: an
    /// earlier release's `to_pod` never clears the bit, so a flow this release's programs
    /// opened before a downgrade and got answered under it would carry it still, and be
    /// expired while established. From here on only flows opened since count as unanswered;
    /// those of before live out the longer timeouts, the safe side (a restart of this very
    /// release forgets too, for the same reason: it cannot tell who ran in between). Nothing
    /// is written: a write of the whole entry would take back what a packet wrote in place
    /// meanwhile (a RST cleared), and a replaced element is reused at once.
    pub fn note_unanswered_at_start(&mut self) -> usize {
        self.marked_before_start =
            self.reverse_flows().into_iter().filter(|(_, r)| r.flags & FLOW_UNANSWERED != 0).map(|(k, _)| k).collect();
        self.marked_before_start.len()
    }

    /// The flags the GC judges a flow by: both halves' close bits, and the reverse half's
    /// unanswered mark unless it was there before the start. A forward entry's copy of the
    /// mark is never trusted: an earlier release re-created forward halves from reverse ones
    /// with every flag, and nothing clears it there.
    fn judged_flags(&self, fwd: &NatFwd, rev: Option<(&FlowKey, &NatRev)>) -> u32 {
        let rev_flags = rev.map_or(0, |(k, r)| if self.marked_before_start.contains(k) { r.flags & !FLOW_UNANSWERED } else { r.flags });
        (fwd.flags & !FLOW_UNANSWERED) | rev_flags
    }
}

/// Whether a map refused an insert for want of room: a hash map says `E2BIG`, an LPM trie
/// `ENOSPC`.
pub(crate) fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) if matches!(io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

/// Inserts into an LPM trie. Before Linux 6.14 a full trie refuses even a key it holds (it
/// counts before it walks): such a key is taken out and put in again, a moment without it.
pub(crate) fn trie_insert<V: aya::Pod>(trie: &mut LpmTrie<MapData, u32, V>, key: Key<u32>, value: V) -> Result<(), MapError> {
    match trie.insert(&key, value, 0) {
        // A removal is exact where a lookup would match any covering prefix.
        Err(e) if is_full(&e) => match trie.remove(&key) {
            Ok(()) => trie.insert(&key, value, 0),
            Err(_) => Err(e),
        },
        r => r,
    }
}

/// A flow of an evicted gateway seen sent on after its last reply.
#[derive(Debug, Clone, Copy)]
struct Unanswered {
    /// The last reply's stamp when first seen so.
    replied: u64,
    /// The pod's last packet's stamp then.
    sent: u64,
    /// When the pod was first seen to send again after that (the agent's clock), the pod's
    /// last stamp seen since, and how many later syncs saw it move on.
    since: Option<(u64, u64, u32)>,
}

/// What [`ControlMaps::expiry_scan`] found: the reverse table as read, the flows that looked
/// expired, the reverse keys of live flows, and forward entries without their reverse half.
#[derive(Debug, Default)]
pub struct ExpiryScan {
    revs: std::collections::HashMap<FlowKey, NatRev>,
    doomed: Vec<(FlowKey, FlowKey)>,
    live_rev: std::collections::HashSet<FlowKey>,
    half: Vec<FlowKey>,
}

impl ExpiryScan {
    /// How many flows looked expired.
    #[must_use]
    pub fn doomed(&self) -> usize {
        self.doomed.len()
    }
}

/// How long a flow of `proto` with the bits `flags` may stay idle: UDP `udp_timeout`, TCP
/// that saw both FINs or a RST `tcp_closed_timeout`, other TCP `tcp_timeout`; a flow that
/// never got a reply no longer than `unanswered_timeout`.
fn flow_timeout(proto: u8, flags: u32, gc: &GcConfig) -> u64 {
    let d = if proto != IPPROTO_TCP {
        gc.udp_timeout
    } else if flags & FLOW_RST != 0 || flags & (FLOW_FIN_POD | FLOW_FIN_PEER) == FLOW_FIN_POD | FLOW_FIN_PEER {
        gc.tcp_closed_timeout
    } else {
        gc.tcp_timeout
    };
    let d = if flags & FLOW_UNANSWERED != 0 { d.min(gc.unanswered_timeout) } else { d };
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

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
    /// `tcp_closed_timeout`, other TCP after `tcp_timeout`, any flow whose reverse entry is
    /// still unanswered after at most `unanswered_timeout`. `now_ns` is on the clock the
    /// datapath stamps with (CLOCK_MONOTONIC: the published tick, or `bpf_ktime_get_ns`). Reverse entries without
    /// a forward entry go too once idle as long. Forward entries found without their reverse
    /// half get it back.
    pub fn expire(&mut self, now_ns: u64, gc: &GcConfig) -> GcReport {
        let scan = self.expiry_scan(now_ns, gc);
        self.expire_scanned(scan, now_ns, gc)
    }

    /// Whether a flow whose halves are `fwd` and `rev` has been idle past its timeout.
    fn idle_past_timeout(&self, proto: u8, fwd: &NatFwd, rev: Option<(&FlowKey, &NatRev)>, now_ns: u64, gc: &GcConfig) -> bool {
        now_ns.saturating_sub(ClockGap::last_seen(&self.clock_gaps, fwd.last_seen_ns.max(rev.map_or(0, |(_, r)| r.last_seen_ns))))
            > flow_timeout(proto, self.judged_flags(fwd, rev), gc)
    }

    /// The first half of [`Self::expire`]: both tables read whole, and what looks expired.
    #[must_use]
    pub fn expiry_scan(&self, now_ns: u64, gc: &GcConfig) -> ExpiryScan {
        // Both tables read whole, the reverse one first: a flow that starts meanwhile has its
        // reverse half in before its forward one, so it is never seen as half a flow.
        let mut scan = ExpiryScan { revs: self.reverse_flows().into_iter().collect(), ..ExpiryScan::default() };
        for (key, fwd) in self.forward_flows() {
            let rev_key = FlowKey::rev_of_fwd(&key, &fwd);
            let rev = scan.revs.get(&rev_key);
            if self.idle_past_timeout(key.proto, &fwd, rev.map(|r| (&rev_key, r)), now_ns, gc) {
                scan.doomed.push((key, rev_key));
            } else {
                if rev.is_none() {
                    scan.half.push(key);
                }
                scan.live_rev.insert(rev_key);
            }
        }
        scan
    }

    /// The second half of [`Self::expire`]. The datapath ran on while the tables were read (a
    /// scan of 65,536 flows takes a while): each flow is read again right before it goes, and
    /// one that a packet has stamped since, or that now holds another tuple, stays. Deleting
    /// a flow a packet has just used would cost that flow its reply's translation.
    pub fn expire_scanned(&mut self, scan: ExpiryScan, now_ns: u64, gc: &GcConfig) -> GcReport {
        let mut report = GcReport::default();
        let ExpiryScan { revs, doomed, mut live_rev, half } = scan;
        // A flow seen answered since the start is judged like any other from here on: a mark
        // it gets later (its pod reset it or opened it again) is this release's own. One whose
        // reverse half the scan did not see keeps its pardon.
        self.marked_before_start.retain(|k| revs.get(k).is_none_or(|r| r.flags & FLOW_UNANSWERED != 0));
        for (key, rev_key) in &doomed {
            let Ok(fwd) = self.nat_fwd.get(key, 0) else { continue };
            let rev = self.nat_rev.get(rev_key, 0).ok();
            if FlowKey::rev_of_fwd(key, &fwd) != *rev_key || !self.idle_past_timeout(key.proto, &fwd, rev.as_ref().map(|r| (rev_key, r)), now_ns, gc) {
                live_rev.insert(*rev_key);
                continue;
            }
            self.remove_flow(key, rev_key);
            report.flows += 1;
        }
        let orphans: Vec<FlowKey> = revs
            .iter()
            .filter(|(k, r)| {
                !live_rev.contains(*k)
                    && now_ns.saturating_sub(ClockGap::last_seen(&self.clock_gaps, r.last_seen_ns))
                        > flow_timeout(k.proto, self.judged_flags(&NatFwd::default(), Some((k, r))), gc)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &orphans {
            let Ok(rev) = self.nat_rev.get(k, 0) else { continue };
            let fwd_key = FlowKey::fwd_of_rev(k, &rev);
            if self.nat_fwd.get(&fwd_key, 0).is_ok() {
                // Its forward half came back (the flow restarted) since the first pass.
                continue;
            }
            let _ = self.nat_rev.remove(k);
            self.marked_before_start.remove(k);
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
        if c as u32 >= stats.len() {
            // Pins of an older agent, which had fewer counters (`maps dump` run by a newer CLI).
            continue;
        }
        let values = stats.get(&(c as u32), 0).with_context(|| format!("reading counter {}", c.name()))?;
        out.insert(c.name(), values.iter().sum());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::config::Config;
    use meshnet_common::IPPROTO_UDP;
    use std::time::Duration;

    /// After a restart, the tunnel peers read back from the tunnel routes are taken by the
    /// agent's validator as they are, and make exactly the tunnel maps they were read from:
    /// an agent restarted during an API outage withdraws none of them.
    #[test]
    fn pinned_tunnel_peers_make_the_maps_they_came_from() {
        let file = |peers: &str| {
            let text = format!(
                "cluster: cluster1\npodCIDRs: [\"10.244.0.0/16\"]\ninterfaces: [\"veth*\"]\ntunnel: {{port: 31800, interfaces: [eth0]}}\npeers: {peers}\n"
            );
            serde_yaml::from_str::<crate::config::RawConfig>(&text).unwrap()
        };
        let published = file(
            "[{name: cluster2, mode: tunnel, podCIDRs: [10.245.0.0/16], tunnelPort: 31801, nodes: [\
             {address: 192.0.2.2, podCIDRs: [10.245.0.0/24, 10.245.7.0/24]}, {address: 192.0.2.4, podCIDRs: [10.245.1.0/24]}]},\
             {name: cluster4, mode: tunnel, podCIDRs: [10.248.0.0/16], tunnelPort: 31802, nodes: [{address: 192.0.2.9, podCIDRs: [10.248.3.0/24]}]},\
             {name: cluster3, podCIDRs: [10.246.0.0/16], gateways: [{address: 192.0.2.3, port: 31674}]}]",
        );
        let before = published.validate().unwrap().desired();
        // What the agent writes: each route with its path (source, interface, MTU) filled in.
        let pinned: BTreeMap<Ipv4Net, meshnet_common::TunnelNode> = before
            .tun_routes
            .iter()
            .map(|(n, t)| (*n, meshnet_common::TunnelNode { src_be: addr_be(Ipv4Addr::new(192, 0, 2, 1)), ifindex: 7, mtu: 1500, ..*t }))
            .collect();
        let names = |id: u32| before.peer_names.get(&id).cloned();
        let peers = tunnel_peers_of(&pinned, names);
        assert_eq!(peers.keys().collect::<Vec<_>>(), ["cluster2", "cluster4"]);
        let c2 = &peers["cluster2"];
        assert_eq!((c2.mode, c2.tunnel_port), (crate::config::PeerMode::Tunnel, Some(31801)));
        assert_eq!(c2.pod_cidrs, ["10.245.0.0/23", "10.245.7.0/24"], "the nodes' CIDRs, aggregated");
        // As the agent merges them before the API is heard: the file has no peers.
        let candidates = peers.into_iter().map(|(n, p)| (n, vec![p])).collect();
        let merged = file("[]").merge_api(&BTreeSet::new(), &candidates).unwrap();
        assert!(merged.rejected.is_empty(), "{:?}", merged.rejected);
        let after = merged.config.desired();
        assert_eq!((after.tun_routes, after.tun_nodes), (before.tun_routes, before.tun_nodes));
        // A peer without a name entry cannot be matched to its published self.
        assert!(tunnel_peers_of(&pinned, |_| None).is_empty());
    }

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
        let plan = Plan::new(&Current::default(), &d, &BTreeSet::new());
        crate::golden::check("plan_initial.txt", &plan.render(&d.peer_names));
        assert_eq!(plan.report().routes_added, 3);
    }

    #[test]
    fn reload_plan_touches_only_the_difference() {
        let d1 = Config::from_yaml(V1).unwrap().desired();
        let d2 = Config::from_yaml(V2).unwrap().desired();
        let plan = Plan::new(&current(&d1, vec![]), &d2, &BTreeSet::new());
        crate::golden::check("plan_reload.txt", &plan.render(&names(&d1, &d2)));
        // Applying the same config again changes nothing.
        assert_eq!(Plan::new(&current(&d2, vec![]), &d2, &BTreeSet::new()), Plan::default());
    }

    #[test]
    fn health_marks_only_the_dead_gateway() {
        let mut d = Config::from_yaml(V2).unwrap().desired();
        d.apply_health(&std::collections::BTreeSet::from([("192.0.2.12".parse().unwrap(), 31674)]));
        let before = Config::from_yaml(V2).unwrap().desired();
        let plan = Plan::new(&current(&before, vec![]), &d, &BTreeSet::new());
        crate::golden::check("plan_gateway_down.txt", &plan.render(&d.peer_names));
    }

    /// The maps as they are after applying `d` with `flows` in the flow table.
    fn current(d: &Desired, flows: Vec<(FlowKey, NatFwd)>) -> Current {
        Current { routes: d.routes.clone(), peers: d.peers.clone(), names: d.peer_names.clone(), flows }
    }

    /// A flow from a local pod to `dst`, held on gateway `gw` of peer `peer`.
    fn flow(sport: u16, dst: &str, peer: &str, gw: &str) -> (FlowKey, NatFwd) {
        let (addr, port) = gw.split_once(':').unwrap();
        let key = FlowKey {
            src_be: addr_be("10.244.0.5".parse().unwrap()),
            dst_be: addr_be(dst.parse().unwrap()),
            sport_be: sport.to_be(),
            dport_be: 80u16.to_be(),
            proto: 6,
            ..FlowKey::default()
        };
        let fwd = NatFwd {
            gw_addr_be: addr_be(addr.parse().unwrap()),
            gw_port_be: port.parse::<u16>().unwrap().to_be(),
            peer_id: crate::config::peer_id(peer),
            ..NatFwd::default()
        };
        (key, fwd)
    }

    /// A reload purges exactly the flows it leaves without their route, peer or gateway, and
    /// the flows of a gateway evicted after its grace period; a flow whose gateway is only
    /// down stays, and so does every flow the new state still carries.
    #[test]
    fn purges_are_part_of_the_plan() {
        let d1 = Config::from_yaml(V1).unwrap().desired();
        let d2 = Config::from_yaml(V2).unwrap().desired();
        let mut flows: Vec<(FlowKey, NatFwd)> = d1
            .routes
            .iter()
            .enumerate()
            .flat_map(|(i, (net, id))| {
                let dst = Ipv4Addr::from(u32::from(net.network()) + 9).to_string();
                let name = &d1.peer_names[id];
                d1.peers[id].live().iter().enumerate().map(move |(j, g)| {
                    let gw = format!("{}:{}", addr_of_be(g.addr_be), u16::from_be(g.tcp_port_be));
                    flow(u16::try_from(40_000 + 10 * i + j).unwrap(), &dst, name, &gw)
                }).collect::<Vec<_>>()
            })
            .collect();
        // A flow on a gateway that cluster2 no longer lists.
        flows.push(flow(41_000, "10.245.0.77", "cluster2", "192.0.2.99:31674"));
        let plan = Plan::new(&current(&d1, flows.clone()), &d2, &BTreeSet::new());
        crate::golden::check("plan_purges.txt", &plan.render(&names(&d1, &d2)));
        assert_eq!(plan.report().flows_purged, plan.flow_purges.len());
        // The same state again purges nothing more than the flows it already purged.
        let kept: Vec<_> = flows.iter().filter(|f| !plan.flow_purges.iter().any(|p| p.0 == f.0)).copied().collect();
        assert!(!kept.is_empty(), "the fixture keeps no flow");
        assert!(Plan::new(&current(&d2, kept.clone()), &d2, &BTreeSet::new()).flow_purges.is_empty());
        // Down is not evicted: only the eviction set removes a live gateway's flows.
        let mut down = d2.clone();
        let all_gws: BTreeSet<(Ipv4Addr, u16)> =
            d2.peers.values().flat_map(|pg| pg.live().iter().map(|g| (addr_of_be(g.addr_be), u16::from_be(g.tcp_port_be)))).collect();
        down.apply_health(&all_gws);
        assert!(Plan::new(&current(&d2, kept.clone()), &down, &BTreeSet::new()).flow_purges.is_empty());
        let evicted = Plan::new(&current(&d2, kept.clone()), &down, &all_gws);
        assert_eq!(evicted.flow_purges.len(), kept.len());
        assert!(evicted.flow_purges.iter().all(|p| p.2 == Purge::Evicted));
    }

    /// After a spell without an agent, a flow stamped with the stale tick may have been busy
    /// all along: the GC counts it as seen when the clock resumed. Flows idle since before
    /// the spell keep their stamp.
    #[test]
    fn a_clock_gap_counts_flows_stamped_with_the_stale_tick_as_seen_at_resume() {
        let gaps = [ClockGap { stale: 100, resumed: 500 }, ClockGap { stale: 700, resumed: 900 }];
        assert_eq!(ClockGap::last_seen(&gaps, 100), 500);
        assert_eq!(ClockGap::last_seen(&gaps, 99), 99);
        assert_eq!(ClockGap::last_seen(&gaps, 600), 600);
        assert_eq!(ClockGap::last_seen(&gaps, 700), 900);
        assert_eq!(ClockGap::last_seen(&[], 100), 100);
    }

    /// A flow no reply reached goes after the unanswered timeout whatever its protocol, or
    /// sooner if its own timeout is shorter; once answered it has its protocol's timeout again.
    #[test]
    fn unanswered_flows_get_the_unanswered_timeout() {
        let s = |n| Duration::from_secs(n);
        let gc =
            GcConfig { udp_timeout: s(120), tcp_closed_timeout: s(10), tcp_timeout: s(86_400), unanswered_timeout: s(60), interval: s(5) };
        let secs = |proto, flags| flow_timeout(proto, flags, &gc) / 1_000_000_000;
        assert_eq!(secs(IPPROTO_TCP, FLOW_UNANSWERED), 60);
        assert_eq!(secs(IPPROTO_UDP, FLOW_UNANSWERED), 60);
        assert_eq!(secs(IPPROTO_TCP, FLOW_UNANSWERED | FLOW_RST), 10);
        assert_eq!(secs(IPPROTO_TCP, FLOW_UNANSWERED | FLOW_FIN_POD), 60);
        assert_eq!(secs(IPPROTO_TCP, 0), 86_400);
        assert_eq!(secs(IPPROTO_TCP, FLOW_FIN_POD), 86_400);
        assert_eq!(secs(IPPROTO_TCP, FLOW_RST), 10);
        assert_eq!(secs(IPPROTO_UDP, 0), 120);
    }

    /// The purge's route lookup agrees with a plain longest-prefix match.
    #[test]
    fn route_lookup_is_the_longest_prefix_match() {
        let mut rng = 0x9e37_79b9_u32;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            rng
        };
        let mut routes = BTreeMap::new();
        for i in 0..2000u32 {
            let len = u8::try_from(8 + next() % 25).unwrap();
            let prefix = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (next() & 0x00ff_ffff)), len).unwrap().trunc();
            routes.insert(prefix, i);
        }
        let lookup = RouteLookup::new(&routes);
        for _ in 0..5_000 {
            let a = Ipv4Addr::from(0x0a00_0000 | (next() & 0x00ff_ffff));
            let want = routes.iter().filter(|(n, _)| n.contains(&a)).max_by_key(|(n, _)| n.prefix_len()).map(|(_, id)| *id);
            assert_eq!(lookup.get(a), want, "{a}");
        }
    }
}
