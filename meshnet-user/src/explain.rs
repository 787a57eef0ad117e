//! `meshnet explain`: what the datapath does with one packet a pod sends, and why.
//!
//! The decision is made by [`explain`], a pure function over a [`Snapshot`] of the maps, so
//! that every outcome is unit-tested without a kernel; [`Snapshot::load`] reads the pinned
//! maps. The logic follows `meshnet_from_pod` step by step (`meshnet-ebpf/src/nat.rs`):
//!
//! 0. anything but TCP and UDP (ICMP, `--proto icmp`) to a remote CIDR is dropped and counted
//!    `unsupported_proto`: it has no port to translate by and must not leave untranslated;
//! 1. flow state (`mn_nat_fwd_v2`) first: an existing flow keeps its gateway and port;
//! 2. otherwise the route trie (`mn_routes_v1`): a miss is not meshnet's and passes unchanged;
//! 3. the peer's gateways (`mn_peers_v2`): the first gateway with a `NodePort` for the protocol
//!    and marked up, in cyclic order from [`gateway_start`]; none with a port: passed (UDP to
//!    a peer without a UDP `NodePort`); none up: dropped;
//! 4. the reply tuple (`mn_nat_rev_v2`): when another flow holds it, the first free port of
//!    [`remap_port`]'s candidates; none free: dropped;
//!
//! On the way back, `meshnet_to_pod` also translates ICMP errors about translated flows
//! (`icmp_error_translated`); the `--proto icmp` explanation says so.
//!
//! 5. a new flow in a full table (`nat.maxFlows` flows) is dropped and counted `nat_table_full`:
//!    established flows are never evicted for it.
//!
//! Tunnel mode comes before all of these: a destination in a tunnel peer node's pod CIDR
//! (`mn_tun_routes_v1`) is encapsulated toward that node, whatever the protocol. With
//! `--from-node`, [`explain_decap`] says what `meshnet_tun_in` does with a tunnel packet from
//! that node carrying the packet: every check it makes, in its order.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::{self, Write as _},
    ops::ControlFlow,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use ipnet::Ipv4Net;
use meshnet_common::{
    gateway_start, limits, names, remap_port, tunnel, tunnel_sport, FlowKey, Gateway, NatFwd, NatRev, PeerGateways,
    TunnelConfig, TunnelNode, FLOW_REMAPPED, FLOW_UNANSWERED, GW_UP, IPPROTO_TCP, IPPROTO_UDP,
};
use serde::Serialize;

use crate::{
    dump::{flow_state, monotonic_ns},
    maps::{self, addr_be, addr_of_be},
    pins::Pins,
};

/// The transport protocol of the packet to explain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
    /// Any ICMP message (ping): meshnet cannot translate it. The destination port is ignored.
    Icmp,
}

impl Proto {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
            Proto::Icmp => 1,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }

    /// The gateway's `NodePort` for this protocol, network byte order; 0 when it has none.
    fn port_be(self, g: &Gateway) -> u16 {
        match self {
            Proto::Tcp => g.tcp_port_be,
            Proto::Udp => g.udp_port_be,
            Proto::Icmp => 0,
        }
    }
}

/// Output format of `meshnet explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// `SRC_IP` or `SRC_IP:PORT`: the sending pod, with its source port when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub addr: Ipv4Addr,
    pub port: Option<u16>,
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<Ipv4Addr>() {
            return Ok(Self { addr, port: None });
        }
        match s.parse::<SocketAddrV4>() {
            Ok(sa) if sa.port() != 0 => Ok(Self { addr: *sa.ip(), port: Some(sa.port()) }),
            Ok(_) => Err(format!("{s:?}: port 0 is not a port a packet carries")),
            Err(_) => Err(format!("{s:?} is neither an IPv4 address nor IPv4:PORT")),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Parses `DST_IP:PORT` (clap value parser).
pub fn parse_destination(s: &str) -> Result<SocketAddrV4, String> {
    match s.parse::<SocketAddrV4>() {
        Ok(sa) if sa.port() != 0 => Ok(sa),
        Ok(_) => Err(format!("{s:?}: port 0 is not a port a packet carries")),
        Err(_) => Err(format!("{s:?} is not IPv4:PORT (the destination port chooses the flow)")),
    }
}

/// The packet to explain: what a pod sends, before any translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub src: Source,
    pub dst: SocketAddrV4,
    pub proto: Proto,
}

impl Query {
    /// The datapath's key for this packet, when the source port is known.
    #[must_use]
    pub fn flow_key(&self) -> Option<FlowKey> {
        self.src.port.map(|sport| FlowKey {
            src_be: addr_be(self.src.addr),
            dst_be: addr_be(*self.dst.ip()),
            sport_be: sport.to_be(),
            dport_be: self.dst.port().to_be(),
            proto: self.proto.number(),
            _pad: [0; 3],
        })
    }
}

/// What `explain` reads from the maps. `None`: that map could not be read (its reason is in
/// `missing`). Flow state only needs the entries of the sending pod.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub routes: Option<BTreeMap<Ipv4Net, u32>>,
    pub peers: Option<BTreeMap<u32, PeerGateways>>,
    pub names: BTreeMap<u32, String>,
    pub nat_fwd: Option<HashMap<FlowKey, NatFwd>>,
    pub nat_rev: Option<HashMap<FlowKey, NatRev>>,
    /// Entries of the forward and the reverse flow map (every pod's) and their capacity
    /// (`nat.maxFlows`): a new flow needs a forward slot, and a reverse one unless its reply
    /// tuple's entry survived.
    pub nat_fill: Option<(usize, usize, u32)>,
    /// `CLOCK_MONOTONIC` now, the clock of the entries' `last_seen_ns`.
    pub now_ns: u64,
    /// Tunnel mode: the peer nodes' pod CIDRs, the node table and this node's settings
    /// (empty without tunnel maps: pins of an older release).
    pub tun_routes: BTreeMap<Ipv4Net, TunnelNode>,
    pub tun_nodes: BTreeMap<Ipv4Addr, u32>,
    pub tun_config: Option<TunnelConfig>,
    /// The port published to the uplink program (`names::TUN_FAST`; `Some(0)`: none), `None`
    /// without that map (pins of an older release, whose program takes the settings' port).
    pub tun_port: Option<u16>,
    /// The tunnel peers' ports, where a pod's own UDP is dropped (`names::TUN_PEER_PORTS`;
    /// empty without that map: pins of an older release, whose program does not check).
    pub tun_peer_ports: BTreeSet<u16>,
    /// Maps that could not be read, with why.
    pub missing: Vec<String>,
}

impl Snapshot {
    /// Reads the pinned maps: routes, peers and names whole, flow state of the pod `pod`
    /// only (forward entries from it, reverse entries to it). A map that cannot be read is
    /// recorded in `missing`.
    #[must_use]
    pub fn load(pins: &Pins, pod: Ipv4Addr) -> Self {
        let pod_be = addr_be(pod);
        let mut missing = Vec::new();
        let routes = keep(read_routes(pins), &mut missing);
        let peers = keep(maps::open::<maps::Peers>(pins, names::PEERS).map(|m| m.iter().flatten().collect()), &mut missing);
        let nat_fwd = keep(
            maps::open::<maps::NatFwdMap>(pins, names::NAT_FWD)
                .map(|m| m.iter().flatten().filter(|(k, _)| k.src_be == pod_be).collect()),
            &mut missing,
        );
        let nat_rev = keep(
            maps::open::<maps::NatRevMap>(pins, names::NAT_REV)
                .map(|m| m.iter().flatten().filter(|(k, _)| k.dst_be == pod_be).collect()),
            &mut missing,
        );
        let nat_fill = maps::open::<maps::NatFwdMap>(pins, names::NAT_FWD).ok().and_then(|fwd| {
            let rev = maps::open::<maps::NatRevMap>(pins, names::NAT_REV).ok()?;
            let cap = aya::maps::MapInfo::from_pin(pins.map(names::NAT_FWD)).ok()?.max_entries();
            Some((fwd.keys().count(), rev.keys().count(), cap))
        });
        // Names are a nicety: without them peers show by id, so a missing map is no gap.
        let names = maps::open::<maps::Names>(pins, names::PEER_NAMES)
            .map(|m| m.iter().flatten().map(|(id, n)| (id, maps::peer_name_of(&n))).collect())
            .unwrap_or_default();
        let (tun_routes, tun_nodes, tun_config, tun_port, tun_peer_ports) = match crate::tunnel::TunnelMaps::open(pins) {
            Ok(t) => (t.effective_routes(), t.current_nodes(), t.decap_config(), t.taken_port(), t.current_peer_ports().unwrap_or_default()),
            Err(_) => Default::default(),
        };
        Snapshot {
            routes,
            peers,
            names,
            nat_fwd,
            nat_rev,
            nat_fill,
            now_ns: monotonic_ns(),
            tun_routes,
            tun_nodes,
            tun_config,
            tun_port,
            tun_peer_ports,
            missing,
        }
    }

    /// The same view of maps already open, such as an unpinned load's, whose flow table
    /// holds `capacity` entries: tests hold `explain` to the program itself with it.
    pub fn of_maps(m: &maps::ControlMaps, capacity: u32, pod: Ipv4Addr) -> anyhow::Result<Self> {
        let pod_be = addr_be(pod);
        let fwd: HashMap<FlowKey, NatFwd> = m.nat_fwd.iter().collect::<Result<_, _>>()?;
        let nat_fill = Some((fwd.len(), m.nat_rev.keys().count(), capacity));
        Ok(Snapshot {
            routes: Some(m.current_routes()?),
            peers: Some(m.peers.iter().collect::<Result<_, _>>()?),
            names: m.names.iter().map(|r| r.map(|(id, n)| (id, maps::peer_name_of(&n)))).collect::<Result<_, _>>()?,
            nat_fwd: Some(fwd.into_iter().filter(|(k, _)| k.src_be == pod_be).collect()),
            nat_rev: Some(m.nat_rev.iter().filter(|r| r.as_ref().map_or(true, |(k, _)| k.dst_be == pod_be)).collect::<Result<_, _>>()?),
            nat_fill,
            now_ns: monotonic_ns(),
            tun_routes: BTreeMap::new(),
            tun_nodes: BTreeMap::new(),
            tun_config: None,
            tun_port: None,
            tun_peer_ports: BTreeSet::new(),
            missing: Vec::new(),
        })
    }

    /// This snapshot with the tunnel maps of `t` (an unpinned load's, in tests).
    #[must_use]
    pub fn with_tunnel(self, t: &crate::tunnel::TunnelMaps) -> Self {
        Self {
            tun_routes: t.current_routes(),
            tun_nodes: t.current_nodes(),
            tun_config: t.decap_config(),
            tun_port: t.taken_port(),
            tun_peer_ports: t.current_peer_ports().unwrap_or_default(),
            ..self
        }
    }

    fn peer_name(&self, id: u32) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| format!("#{id:08x}"))
    }
}

/// The value of `r`, or its error recorded in `missing`.
fn keep<T>(r: anyhow::Result<T>, missing: &mut Vec<String>) -> Option<T> {
    r.map_err(|e| missing.push(format!("{e:#}"))).ok()
}

fn read_routes(pins: &Pins) -> anyhow::Result<BTreeMap<Ipv4Net, u32>> {
    maps::routes_of(&maps::open(pins, names::ROUTES)?)
}

/// What the datapath does with the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// Flow state matches: translated to the flow's recorded gateway.
    ExistingFlow,
    /// A new flow to a remote CIDR: translated to a gateway (`gateway`, or one of
    /// `candidates` when the source port is not known).
    Redirect,
    /// No remote CIDR contains the destination: not meshnet's, passes unchanged.
    PassNotMeshnet,
    /// The peer has no gateway with a `NodePort` for the protocol (UDP without `udpPort`):
    /// passes unchanged.
    PassNoGatewayForProto,
    /// The peer has gateways for the protocol but none is up (or none at all): dropped.
    DropNoLiveGateway,
    /// The reply tuple and every remap candidate are taken by other flows: dropped.
    DropNoFreePort,
    /// A new flow while the flow table is full: dropped (established flows are never
    /// evicted to make room).
    DropTableFull,
    /// Neither TCP nor UDP, to a remote CIDR: dropped, it cannot be translated.
    DropUnsupportedProto,
    /// Tunnel mode: encapsulated toward the peer node that hosts the destination.
    TunnelEncap,
    /// Tunnel mode (`--from-node`): decapsulated and delivered to the pod.
    TunnelDeliver,
    /// Tunnel mode (`--from-node`): the tunnel packet is refused and dropped.
    TunnelDrop,
    /// A map needed to decide could not be read.
    Unknown,
}

/// One flow-state entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRow {
    pub pod: String,
    pub remote: String,
    pub gateway: String,
    /// The source port on the wire when it was remapped.
    pub nat_port: Option<u16>,
    pub idle_seconds: u64,
    pub state: String,
    /// Whether the reverse entry (how replies are restored) exists.
    pub reply_entry: bool,
    /// No reply yet: the GC expires it after `nat.unansweredTimeoutSeconds` of idleness.
    pub unanswered: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteInfo {
    pub cidr: String,
    pub peer: String,
    pub peer_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayInfo {
    /// Slot in the peer's gateway array; the flow hash indexes these.
    pub index: u32,
    pub address: String,
    pub port: u16,
    pub udp_port: Option<u16>,
    pub up: bool,
}

/// A gateway a new flow may be pinned to when the source port is not known.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub index: u32,
    pub gateway: String,
    /// The share of flow hashes that land on it (down gateways pass theirs on).
    pub share: f64,
}

/// One alternative source port for a colliding flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemapCandidate {
    pub attempt: u32,
    pub port: u16,
    /// The flow holding the reply tuple with this port, if any.
    pub taken_by: Option<String>,
}

/// Whether the new flow's reply tuple is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplyInfo {
    /// The tuple replies arrive with: `gateway:NodePort -> pod:port`.
    pub tuple: String,
    /// The flow already holding it, if another one does.
    pub taken_by: Option<String>,
    /// The remap candidates, in the order the datapath tries them (when taken).
    pub remap: Vec<RemapCandidate>,
    /// The source port the flow gets on the wire when remapped.
    pub nat_port: Option<u16>,
}

/// What the datapath does with the packet and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub proto: Proto,
    pub src: String,
    pub dst: String,
    pub verdict: Verdict,
    /// One sentence: what happens to the packet.
    pub action: String,
    /// Datapath counters the packet increments.
    pub counters: Vec<&'static str>,
    /// The flow-state entry that matches (source port given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowRow>,
    /// Live flows from the source address to the destination (source port not given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<Vec<FlowRow>>,
    pub route: Option<RouteInfo>,
    pub gateways: Vec<GatewayInfo>,
    /// The gateway a new flow is pinned to (source port given).
    pub gateway: Option<String>,
    /// The gateways a new flow may be pinned to (source port not given).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    pub reply: Option<ReplyInfo>,
    /// Why, in the order the datapath decides.
    pub steps: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

impl Explanation {
    fn new(q: &Query, missing: Vec<String>) -> Self {
        Self {
            proto: q.proto,
            src: q.src.to_string(),
            dst: q.dst.to_string(),
            verdict: Verdict::Unknown,
            action: String::new(),
            counters: Vec::new(),
            flow: None,
            flows: None,
            route: None,
            gateways: Vec::new(),
            gateway: None,
            candidates: Vec::new(),
            reply: None,
            steps: Vec::new(),
            missing,
        }
    }

    fn step(&mut self, s: impl Into<String>) {
        self.steps.push(s.into());
    }

    fn finish(&mut self, verdict: Verdict, counters: &[&'static str], action: impl Into<String>) {
        self.verdict = verdict;
        self.counters = counters.to_vec();
        self.action = action.into();
    }

    /// Renders the explanation as text.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} {} -> {}", self.proto.as_str(), self.src, self.dst);
        for s in &self.steps {
            let mut lines = s.lines();
            if let Some(first) = lines.next() {
                let _ = writeln!(out, "  - {first}");
            }
            for l in lines {
                let _ = writeln!(out, "    {l}");
            }
        }
        let _ = writeln!(out, "verdict: {}", self.action);
        if !self.counters.is_empty() {
            let _ = writeln!(out, "counters: {}", self.counters.join(", "));
        }
        for m in &self.missing {
            let _ = writeln!(out, "missing: {m}");
        }
        out
    }
}

fn endpoint(addr_be: u32, port_be: u16) -> String {
    format!("{}:{}", addr_of_be(addr_be), u16::from_be(port_be))
}

fn flow_row(snap: &Snapshot, key: &FlowKey, f: &NatFwd) -> FlowRow {
    let rev = snap.nat_rev.as_ref().and_then(|m| m.get(&FlowKey::rev_of_fwd(key, f)));
    // A forward half's copy of the unanswered mark is an earlier release's.
    let flags = (f.flags & !FLOW_UNANSWERED) | rev.map_or(0, |r| r.flags);
    let last = f.last_seen_ns.max(rev.map_or(0, |r| r.last_seen_ns));
    FlowRow {
        pod: endpoint(key.src_be, key.sport_be),
        remote: endpoint(key.dst_be, key.dport_be),
        gateway: endpoint(f.gw_addr_be, f.gw_port_be),
        nat_port: (f.flags & FLOW_REMAPPED != 0).then(|| u16::from_be(f.nat_sport_be)),
        idle_seconds: snap.now_ns.saturating_sub(last) / 1_000_000_000,
        state: flow_state(key.proto, flags).into(),
        reply_entry: rev.is_some(),
        unanswered: flags & FLOW_UNANSWERED != 0,
    }
}

fn describe_flow_row(r: &FlowRow) -> String {
    let nat = r.nat_port.map(|p| format!(", source port remapped to {p}")).unwrap_or_default();
    let rev = if r.reply_entry { "" } else { ", NO reply entry" };
    let unanswered = if r.unanswered { ", no reply yet" } else { "" };
    format!("{} -> {} via {}{nat}, idle {}s, {}{unanswered}{rev}", r.pod, r.remote, r.gateway, r.idle_seconds, r.state)
}

/// The datapath's gateway choice for a new flow whose hash starts at slot `start`: the first
/// gateway with a port for the protocol and marked up, cyclically from `start`.
#[must_use]
pub fn choose_gateway(gws: &[Gateway], proto: Proto, start: u32) -> Option<u32> {
    let n = u32::try_from(gws.len()).ok()?;
    (0..n)
        .map(|i| (start + i) % n)
        .find(|&j| {
            let g = &gws[j as usize];
            proto.port_be(g) != 0 && g.flags & GW_UP != 0
        })
}

/// Who holds the reply tuple `rev_key` for a new flow restoring to `want`.
enum Holder {
    Free,
    /// This very flow (its forward entry was evicted or is being created): claim succeeds.
    Same,
    /// Another flow, described.
    Other(String),
}

fn holder(rev_map: &HashMap<FlowKey, NatRev>, rev_key: &FlowKey, want: &NatRev) -> Holder {
    match rev_map.get(rev_key) {
        None => Holder::Free,
        Some(cur)
            if cur.remote_addr_be == want.remote_addr_be
                && cur.remote_port_be == want.remote_port_be
                && cur.pod_port_be == want.pod_port_be =>
        {
            Holder::Same
        }
        Some(cur) => {
            let f = FlowKey::fwd_of_rev(rev_key, cur);
            Holder::Other(format!("{} -> {}", endpoint(f.src_be, f.sport_be), endpoint(f.dst_be, f.dport_be)))
        }
    }
}

/// Explains what `meshnet_from_pod` does with the packet `q`, given the maps in `snap`.
#[must_use]
pub fn explain(snap: &Snapshot, q: &Query) -> Explanation {
    let mut ex = Explanation::new(q, snap.missing.clone());
    if tunnel_stage(snap, q, &mut ex).is_break() {
        return ex;
    }
    if q.proto == Proto::Icmp {
        unsupported_proto(snap, q, &mut ex);
        return ex;
    }
    if flow_state_stage(snap, q, &mut ex).is_break() {
        return ex;
    }
    let Some((peer_id, gws)) = route_stage(snap, q, &mut ex) else {
        return ex;
    };
    match q.flow_key() {
        None => new_flow_any_port(q.proto, gws, &mut ex),
        Some(key) => new_flow(snap, q, &key, peer_id, gws, &mut ex),
    }
    ex
}

fn tunnel_match(snap: &Snapshot, addr: Ipv4Addr) -> Option<(Ipv4Net, TunnelNode)> {
    snap.tun_routes.iter().filter(|(net, _)| net.contains(&addr)).max_by_key(|(net, _)| net.prefix_len()).map(|(n, v)| (*n, *v))
}

/// Tunnel mode, before everything else: a tunnel peer node's pod.
fn tunnel_stage(snap: &Snapshot, q: &Query, ex: &mut Explanation) -> ControlFlow<()> {
    let dst = *q.dst.ip();
    let Some((net, node)) = tunnel_match(snap, dst) else {
        if !snap.tun_routes.is_empty() {
            ex.step(format!("tunnel: {dst} is in no tunnel peer node's pod CIDR ({})", names::TUN_ROUTES));
        }
        return ControlFlow::Continue(());
    };
    let key = FlowKey::new(
        addr_be(q.src.addr),
        addr_be(dst),
        if q.proto == Proto::Icmp { 0 } else { q.src.port.unwrap_or(0).to_be() },
        if q.proto == Proto::Icmp { 0 } else { q.dst.port().to_be() },
        q.proto.number(),
    );
    let sport = if q.src.port.is_some() || q.proto == Proto::Icmp {
        format!("outer source port {}", tunnel_sport(&key))
    } else {
        "outer source port a hash of the flow (give the source port to see it)".to_string()
    };
    ex.route = Some(RouteInfo { cidr: net.to_string(), peer: snap.peer_name(node.peer_id), peer_id: node.peer_id });
    ex.step(format!(
        "tunnel: {dst} is in {net}, the pod CIDR of node {} of peer {} (tunnel mode)",
        addr_of_be(node.addr_be),
        snap.peer_name(node.peer_id)
    ));
    let room = node.mtu.saturating_sub(tunnel::OVERHEAD);
    ex.step(format!(
        "size: up to {room} bytes (the interface's MTU {} less the tunnel's {}) go whole; TCP SYNs have their MSS \
         clamped to {} (tunnel_mss_clamped); a larger packet with DF set is answered with ICMP \"fragmentation needed\", \
         MTU {room} (tunnel_frag_needed); one without DF is split in two fragments that fit (tunnel_fragmented)",
        node.mtu,
        tunnel::OVERHEAD,
        room.saturating_sub(tunnel::IP_TCP_LEN)
    ));
    ex.finish(
        Verdict::TunnelEncap,
        &["tunnel_encap"],
        format!(
            "encapsulated: outer IPv4/UDP from {} to {}:{} ({sport}) with meshnet's header, out of interface index {}; \
             the pod's packet inside is unchanged, addresses included",
            addr_of_be(node.src_be),
            addr_of_be(node.addr_be),
            u16::from_be(node.port_be),
            node.ifindex
        ),
    );
    ControlFlow::Break(())
}

/// What `meshnet_tun_in` does with a tunnel packet from the node `from` (its outer source)
/// carrying `q` (inner source and destination), given the maps in `snap`.
#[must_use]
pub fn explain_decap(snap: &Snapshot, from: Ipv4Addr, q: &Query) -> Explanation {
    let mut ex = Explanation::new(q, snap.missing.clone());
    let Some(cfg) = snap.tun_config else {
        ex.step(format!("tunnel settings ({}): none, this node takes no tunnel packets", names::TUN_CONFIG));
        ex.finish(Verdict::PassNotMeshnet, &[], "not meshnet's: passes unchanged (no tunnel on this node)");
        return ex;
    };
    let port = u16::from_be(cfg.port_be);
    match snap.tun_port {
        Some(taken) if taken != port => {
            let taken = if taken == 0 { "none".to_string() } else { format!("UDP {taken}") };
            ex.step(format!(
                "tunnel port: the settings say UDP {port}, but the port published to the uplink program ({}) is {taken}",
                names::TUN_FAST
            ));
            let why = if taken == "none" {
                "passes unchanged: the uplink program takes no port (a change the agent's next sync completes)".to_string()
            } else {
                format!("passes unchanged: the uplink program takes {taken} only, and drops what it gets there while the settings name another port (tunnel_port_changing; but for a packet this node routes on to another host), until the agent's next sync completes the change")
            };
            ex.finish(Verdict::PassNotMeshnet, &[], why);
            return ex;
        }
        _ => ex.step(format!("tunnel port: UDP {port} (anything to another port passes untouched, and so does a packet this node routes on to another host, unless that is a tunnel peer's node or a multicast or broadcast address: what follows is for one sent to this node)")),
    }
    let Some(peer_id) = snap.tun_nodes.get(&from).copied() else {
        ex.step(format!("node: {from} is no tunnel peer's node ({})", names::TUN_NODES));
        ex.finish(Verdict::TunnelDrop, &["tunnel_unknown_node"], "dropped: not from a known peer node");
        return ex;
    };
    let peer = snap.peer_name(peer_id);
    ex.step(format!("node: {from} is a node of peer {peer}; its header must carry that cluster's id {peer_id:08x} (else tunnel_wrong_cluster, and a bad magic or version tunnel_bad_header)"));
    let src = q.src.addr;
    match tunnel_match(snap, src) {
        Some((net, n)) if n.peer_id == peer_id => ex.step(format!("inner source: {src} is in {net}, of peer {peer}")),
        _ => {
            ex.step(format!("inner source: {src} is in no pod CIDR of peer {peer}'s nodes"));
            ex.finish(Verdict::TunnelDrop, &["tunnel_spoofed_source"], "dropped: a peer may only send from its own pods");
            return ex;
        }
    }
    let dst = *q.dst.ip();
    let local = cfg.nets.iter().find(|n| n.contains(addr_be(dst)));
    let Some(n) = local else {
        ex.step(format!("inner destination: {dst} is not in this node's pod CIDRs"));
        ex.finish(Verdict::TunnelDrop, &["tunnel_not_local"], "dropped: the tunnel delivers only to this node's pods");
        return ex;
    };
    let host = !n.mask_be;
    let edge = u32::from_be(host) >= 3 && (addr_be(dst) == n.addr_be || addr_be(dst) == n.addr_be | host);
    if edge || cfg.hosts_be.iter().any(|h| *h != 0 && *h == addr_be(dst)) {
        let what = if edge { "the network or broadcast address of one of this node's pod CIDRs" } else { "this node's own address" };
        ex.step(format!("inner destination: {dst} is {what}, not a pod"));
        ex.finish(Verdict::TunnelDrop, &["tunnel_not_local"], "dropped: the tunnel delivers only to this node's pods, never to the node itself");
        return ex;
    }
    ex.step(format!(
        "inner destination: {dst} is in {}/{}, this node's",
        addr_of_be(n.addr_be),
        u32::from_be(n.mask_be).count_ones()
    ));
    let how = if cfg.flags & meshnet_common::TUN_DELIVER_PEER != 0 {
        "straight to the pod's interface, past netfilter (into the pod's end of its veth from 5.10, past the host end's qdisc and tc egress, when mn_tun_ports_v1 holds the pod's address, else along the node's route if it stays on this node: one through a gateway or back out of the uplink has no pod behind it, and the packet is dropped, tunnel_no_pod)"
    } else if cfg.flags & meshnet_common::TUN_DELIVER_REDIRECT != 0 {
        "straight to the pod's interface, past netfilter (out of the pod's own port when mn_tun_ports_v1 holds the pod's address, else along the node's route if it stays on this node: one through a gateway or back out of the uplink has no pod behind it, and the packet is dropped, tunnel_no_pod)"
    } else {
        "through the node's stack, as if it had arrived unencapsulated: routing, FORWARD rules and NetworkPolicy see it"
    };
    ex.finish(Verdict::TunnelDeliver, &["tunnel_decap"], format!("decapsulated and delivered {how}; a TCP SYN has its MSS clamped to {}", cfg.mtu.saturating_sub(tunnel::OVERHEAD + tunnel::IP_TCP_LEN)));
    ex
}

/// Step 0: a protocol without ports.
fn unsupported_proto(snap: &Snapshot, q: &Query, ex: &mut Explanation) {
    let dst = *q.dst.ip();
    let Some(routes) = &snap.routes else {
        ex.finish(Verdict::Unknown, &[], format!("cannot tell: the route map {} could not be read", names::ROUTES));
        return;
    };
    let Some((net, peer_id)) = longest_match(routes, dst) else {
        ex.step(format!("route: no remote CIDR contains {dst}"));
        ex.finish(Verdict::PassNotMeshnet, &[], "not meshnet's: passes unchanged");
        return;
    };
    ex.step(format!("route: {dst} is in {net}, peer {}", snap.peer_name(peer_id)));
    ex.finish(
        Verdict::DropUnsupportedProto,
        &["unsupported_proto"],
        format!(
            "dropped: meshnet translates only TCP and UDP (by their ports) and {} has no port; sent as it is, it would \
             leave by the default route still addressed to a remote pod. Malformed or truncated TCP/UDP to a remote \
             CIDR is dropped the same way (counted malformed or truncated, and remote_parse_error). The other way, ICMP \
             errors (unreachable, fragmentation needed, time exceeded) about a translated flow are translated back \
             before they reach the pod (icmp_error_translated)",
            q.proto.as_str().to_uppercase()
        ),
    );
}

/// Step 1: flow state, looked up before anything else. Breaks when an entry decides.
fn flow_state_stage(snap: &Snapshot, q: &Query, ex: &mut Explanation) -> ControlFlow<()> {
    let Some(fwd_map) = &snap.nat_fwd else {
        ex.step(format!("flow state ({}) could not be read: assuming the packet starts a new flow", names::NAT_FWD));
        return ControlFlow::Continue(());
    };
    if let Some(key) = q.flow_key() {
        if let Some(fwd) = fwd_map.get(&key) {
            existing_flow(snap, ex, &key, fwd);
            return ControlFlow::Break(());
        }
        ex.step(format!("flow state: no entry for this flow in {}: it starts a new flow", names::NAT_FWD));
        return ControlFlow::Continue(());
    }
    let (src_be, dst_be) = (addr_be(q.src.addr), addr_be(*q.dst.ip()));
    let mut rows: Vec<(u16, FlowRow)> = fwd_map
        .iter()
        .filter(|(k, _)| {
            k.src_be == src_be && k.dst_be == dst_be && k.dport_be == q.dst.port().to_be() && k.proto == q.proto.number()
        })
        .map(|(k, f)| (u16::from_be(k.sport_be), flow_row(snap, k, f)))
        .collect();
    rows.sort_by_key(|(port, _)| *port);
    let rows: Vec<FlowRow> = rows.into_iter().map(|(_, row)| row).collect();
    if rows.is_empty() {
        ex.step(format!(
            "flow state: no live flow from {} to {} ({}); no source port given, so what follows is for a new flow",
            q.src.addr,
            q.dst,
            q.proto.as_str()
        ));
    } else {
        let mut text = format!(
            "flow state: {} live flow(s) from {} to {}; a packet from one of their source ports keeps its gateway:",
            rows.len(),
            q.src.addr,
            q.dst
        );
        for row in &rows {
            let _ = write!(text, "\n{}", describe_flow_row(row));
        }
        text.push_str("\nwhat follows is for a new flow from another source port");
        ex.step(text);
    }
    ex.flows = Some(rows);
    ControlFlow::Continue(())
}

/// Steps 2 and 3: the route trie and the peer's gateways. `None`: decided there; otherwise
/// the peer and its gateways, of which at least one is up with a port for the protocol.
fn route_stage<'s>(snap: &'s Snapshot, q: &Query, ex: &mut Explanation) -> Option<(u32, &'s [Gateway])> {
    let dst = *q.dst.ip();
    let Some(routes) = &snap.routes else {
        ex.finish(Verdict::Unknown, &[], format!("cannot tell: the route map {} could not be read", names::ROUTES));
        return None;
    };
    let Some((net, peer_id)) = longest_match(routes, dst) else {
        ex.step(format!("route: no remote CIDR contains {dst} ({} routes in {})", routes.len(), names::ROUTES));
        if q.proto == Proto::Udp && snap.tun_peer_ports.contains(&q.dst.port()) && snap.tun_nodes.contains_key(&dst) {
            ex.finish(
                Verdict::TunnelDrop,
                &["tunnel_forged"],
                format!(
                    "dropped: {dst} is a tunnel peer node and UDP {} a tunnel peer's port ({}); a pod's own datagram \
                     there could pass for this node's tunnel traffic at the peer, in the name of any pod of this cluster",
                    q.dst.port(),
                    names::TUN_PEER_PORTS
                ),
            );
            return None;
        }
        ex.finish(Verdict::PassNotMeshnet, &[], "not meshnet's: passes unchanged");
        return None;
    };
    let peer = snap.peer_name(peer_id);
    ex.step(format!("route: {dst} is in {net}, peer {peer}"));
    ex.route = Some(RouteInfo { cidr: net.to_string(), peer: peer.clone(), peer_id });

    let Some(peers) = &snap.peers else {
        ex.finish(Verdict::Unknown, &[], format!("cannot tell: the peer map {} could not be read", names::PEERS));
        return None;
    };
    let Some(pg) = peers.get(&peer_id) else {
        ex.step(format!("gateways: peer {peer} has no entry in {} (a route without its peer)", names::PEERS));
        ex.finish(Verdict::DropNoLiveGateway, &["no_live_gateway"], "dropped: the peer has no gateways");
        return None;
    };
    let gws = pg.live();
    ex.gateways = gws
        .iter()
        .zip(0u32..)
        .map(|(gw, index)| GatewayInfo {
            index,
            address: addr_of_be(gw.addr_be).to_string(),
            port: u16::from_be(gw.tcp_port_be),
            udp_port: (gw.udp_port_be != 0).then(|| u16::from_be(gw.udp_port_be)),
            up: gw.flags & GW_UP != 0,
        })
        .collect();
    let mut text = format!("gateways of {peer} ({}):", gws.len());
    for info in &ex.gateways {
        let udp = info.udp_port.map_or("-".into(), |p| p.to_string());
        let state = if info.up { "up" } else { "down" };
        let _ = write!(text, "\n[{}] {} tcp {} udp {udp} {state}", info.index, info.address, info.port);
    }
    ex.step(text);
    let proto = q.proto;
    if gws.is_empty() {
        ex.finish(Verdict::DropNoLiveGateway, &["no_live_gateway"], "dropped: the peer has no gateways");
        return None;
    }
    if gws.iter().all(|gw| proto.port_be(gw) == 0) {
        ex.step(format!(
            "no gateway of {peer} has a {} NodePort (udpPort in the config), so meshnet does not carry this flow",
            proto.as_str().to_uppercase()
        ));
        ex.finish(
            Verdict::PassNoGatewayForProto,
            &["no_gateway_for_proto"],
            format!(
                "passes unchanged, still addressed to {} (meshnet carries {} to {peer} only through a gateway with a {} NodePort)",
                q.dst,
                proto.as_str().to_uppercase(),
                proto.as_str()
            ),
        );
        return None;
    }
    if !gws.iter().any(|gw| proto.port_be(gw) != 0 && gw.flags & GW_UP != 0) {
        ex.step(format!("every gateway of {peer} with a {} NodePort is down", proto.as_str()));
        ex.finish(
            Verdict::DropNoLiveGateway,
            &["no_live_gateway"],
            "dropped: no new flow is pinned while every gateway is down",
        );
        return None;
    }
    Some((peer_id, gws))
}

/// The longest remote CIDR containing `addr`, as the LPM trie finds it.
fn longest_match(routes: &BTreeMap<Ipv4Net, u32>, addr: Ipv4Addr) -> Option<(Ipv4Net, u32)> {
    routes
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(net, id)| (*net, *id))
}

fn gw_endpoint(gws: &[Gateway], proto: Proto, index: u32) -> String {
    let gw = &gws[index as usize];
    endpoint(gw.addr_be, proto.port_be(gw))
}

/// Step 4 without a source port: the gateways a new flow may get, with their shares.
fn new_flow_any_port(proto: Proto, gws: &[Gateway], ex: &mut Explanation) {
    let count = u32::try_from(gws.len()).unwrap_or(0);
    let mut slots = vec![0u32; gws.len()];
    for start in 0..count {
        if let Some(index) = choose_gateway(gws, proto, start) {
            slots[index as usize] += 1;
        }
    }
    ex.candidates = slots
        .iter()
        .zip(0u32..)
        .filter(|(hits, _)| **hits > 0)
        .map(|(hits, index)| Candidate {
            index,
            gateway: gw_endpoint(gws, proto, index),
            share: f64::from(*hits) / f64::from(count),
        })
        .collect();
    let list: Vec<String> =
        ex.candidates.iter().map(|c| format!("[{}] {} ({:.0}%)", c.index, c.gateway, c.share * 100.0)).collect();
    ex.step(format!(
        "gateway choice: a hash of the flow (source port included) picks the gateway; a new flow goes to one of {}",
        list.join(", ")
    ));
    ex.step(
        "reply tuple: whether another flow holds it (and the source port gets remapped) depends on the source port; \
         give SRC_IP:PORT to know",
    );
    let one_of: Vec<String> = ex.candidates.iter().map(|c| c.gateway.clone()).collect();
    ex.finish(
        Verdict::Redirect,
        &["flow_opened"],
        format!("a new flow is rewritten to one of {} (give the source port for the exact one)", one_of.join(", ")),
    );
}

/// Step 4 with a source port: the exact gateway, then the claim of the reply tuple.
fn new_flow(snap: &Snapshot, q: &Query, key: &FlowKey, peer_id: u32, gws: &[Gateway], ex: &mut Explanation) {
    let proto = q.proto;
    let count = u32::try_from(gws.len()).unwrap_or(0);
    let start = gateway_start(key, count);
    let chosen = choose_gateway(gws, proto, start).expect("a live gateway with a port exists");
    let mut text = format!("gateway choice: the flow hash starts at slot [{start}]");
    let mut slot = start;
    while slot != chosen {
        let gw = &gws[slot as usize];
        let why = if proto.port_be(gw) == 0 { format!("has no {} port", proto.as_str()) } else { "is down".into() };
        let _ = write!(text, "; [{slot}] {} {why}, skipped", addr_of_be(gw.addr_be));
        slot = (slot + 1) % count;
    }
    let chosen_s = gw_endpoint(gws, proto, chosen);
    let _ = write!(text, "; pinned to [{chosen}] {chosen_s}");
    ex.step(text);
    ex.gateway = Some(chosen_s.clone());

    let gw = &gws[chosen as usize];
    let fwd = NatFwd {
        gw_addr_be: gw.addr_be,
        gw_port_be: proto.port_be(gw),
        nat_sport_be: key.sport_be,
        peer_id,
        flags: 0,
        ifindex: 0,
        _pad: 0,
        last_seen_ns: 0,
    };
    let sport = u16::from_be(key.sport_be);
    let restored = format!("replies restored to come from {}", q.dst);
    let rev_key = FlowKey::rev_of_fwd(key, &fwd);
    let Some(rev_map) = &snap.nat_rev else {
        ex.step(format!(
            "reply tuple {}: the reverse flow map {} could not be read, so a collision cannot be ruled out",
            tuple(&rev_key),
            names::NAT_REV
        ));
        ex.finish(
            Verdict::Redirect,
            &["flow_opened"],
            format!("rewritten to {chosen_s} (source port {sport} unless it collides); {restored}"),
        );
        return;
    };
    let (reply, needs_rev) = claim_reply(rev_map, key, rev_key, ex);
    let (taken, nat_port) = (reply.taken_by.is_some(), reply.nat_port);
    ex.reply = Some(reply);
    // The datapath's order: a reply tuple with no free remap port is refused before any
    // insert; then the reverse entry (unless it survived), then the forward one.
    let full = snap.nat_fill.and_then(|(fwd, rev, cap)| {
        let cap_n = cap as usize;
        if needs_rev && rev >= cap_n {
            Some((rev, cap, names::NAT_REV))
        } else if fwd >= cap_n {
            Some((fwd, cap, names::NAT_FWD))
        } else {
            None
        }
    });
    if let (Some((entries, cap, map)), false) = (full, taken && nat_port.is_none()) {
        ex.step(format!("flow table: {entries} of {cap} entries in {map}: full"));
        ex.finish(
            Verdict::DropTableFull,
            &["nat_table_full"],
            "dropped: the flow table is full and established flows are never evicted for a new one (flows that never \
             got a reply go once idle for nat.unansweredTimeoutSeconds); raise nat.maxFlows (the agent migrates its \
             flows on restart) or lower the nat timeouts",
        );
        return;
    }
    match (taken, nat_port) {
        (false, _) => ex.finish(
            Verdict::Redirect,
            &["flow_opened"],
            format!("rewritten to {chosen_s} and recorded as a new flow; {restored}"),
        ),
        (true, Some(port)) => ex.finish(
            Verdict::Redirect,
            &["flow_opened", "port_remap"],
            format!(
                "rewritten to {chosen_s} with source port {port} and recorded as a new flow; {restored} and to port {sport}"
            ),
        ),
        (true, None) => ex.finish(
            Verdict::DropNoFreePort,
            &["nat_insert_failed"],
            format!(
                "dropped: the reply tuple and all {} remap ports are taken, so no reply could be restored",
                limits::REMAP_ATTEMPTS
            ),
        ),
    }
}

fn tuple(rev_key: &FlowKey) -> String {
    format!("{} -> {}", endpoint(rev_key.src_be, rev_key.sport_be), endpoint(rev_key.dst_be, rev_key.dport_be))
}

/// The datapath's claim of the reply tuple `rev_key` for the new flow `key`: taken by another
/// flow, it tries the remap ports in order.
/// Also says whether the flow needs a new reverse entry (not when its own survived).
fn claim_reply(
    rev_map: &HashMap<FlowKey, NatRev>,
    key: &FlowKey,
    mut rev_key: FlowKey,
    ex: &mut Explanation,
) -> (ReplyInfo, bool) {
    let want = NatRev {
        remote_addr_be: key.dst_be,
        remote_port_be: key.dport_be,
        pod_port_be: key.sport_be,
        flags: 0,
        peer_id: 0,
        last_seen_ns: 0,
    };
    let mut reply = ReplyInfo { tuple: tuple(&rev_key), taken_by: None, remap: Vec::new(), nat_port: None };
    let mut needs_rev = true;
    match holder(rev_map, &rev_key, &want) {
        Holder::Free => ex.step(format!(
            "reply tuple {} is free: the source port stays {}",
            reply.tuple,
            u16::from_be(key.sport_be)
        )),
        Holder::Same => {
            needs_rev = false;
            ex.step(format!(
            "reply tuple {} already restores this very flow (its forward entry was lost): it is reused, so the flow \
             keeps its gateway and port (a reply after 1 s idle would have re-created the forward entry too, counted \
             fwd_restored)",
            reply.tuple
        ));
        }
        Holder::Other(other) => {
            let mut text = format!(
                "reply tuple {} is taken by the flow {other}: the source port is remapped to the first free of:",
                reply.tuple
            );
            reply.taken_by = Some(other);
            for attempt in 0..limits::REMAP_ATTEMPTS {
                let port = remap_port(key, attempt);
                rev_key.dport_be = port.to_be();
                let held = holder(rev_map, &rev_key, &want);
                if reply.nat_port.is_none() && matches!(held, Holder::Same) {
                    needs_rev = false;
                }
                let taken_by = match held {
                    Holder::Free | Holder::Same => None,
                    Holder::Other(flow) => Some(flow),
                };
                let state = match (&taken_by, reply.nat_port) {
                    (Some(flow), _) => format!("taken by {flow}"),
                    (None, None) => "free, chosen".into(),
                    (None, Some(_)) => "free".into(),
                };
                let _ = write!(text, "\n{port}: {state}");
                if taken_by.is_none() && reply.nat_port.is_none() {
                    reply.nat_port = Some(port);
                }
                reply.remap.push(RemapCandidate { attempt, port, taken_by });
            }
            ex.step(text);
        }
    }
    (reply, needs_rev)
}

fn existing_flow(snap: &Snapshot, ex: &mut Explanation, key: &FlowKey, fwd: &NatFwd) {
    let row = flow_row(snap, key, fwd);
    let peer = snap.peer_name(fwd.peer_id);
    ex.step(format!(
        "flow state: an entry in {} matches, so routes are not consulted: the flow keeps the gateway it was pinned to\n{}",
        names::NAT_FWD,
        describe_flow_row(&row)
    ));
    // How the flow's gateway stands now, for context: the datapath keeps a flow on its
    // gateway; the agent purges flows whose gateway is down or left the config.
    if let Some(peers) = &snap.peers {
        let now = peers.get(&fwd.peer_id).and_then(|pg| {
            pg.live().iter().find(|gw| {
                gw.addr_be == fwd.gw_addr_be && (gw.tcp_port_be == fwd.gw_port_be || gw.udp_port_be == fwd.gw_port_be)
            })
        });
        match now {
            Some(gw) if gw.flags & GW_UP != 0 => ex.step(format!("gateway {} of peer {peer} is up", row.gateway)),
            Some(_) => ex.step(format!(
                "gateway {} of peer {peer} is marked down: it takes no new flows, but this established flow stays on \
                 it until the gateway has been down longer than health.downGraceSeconds; the agent then purges the flow \
                 and its next packet starts a new flow on a live gateway",
                row.gateway
            )),
            None => ex.step(format!(
                "gateway {} is no longer among peer {peer}'s gateways: the agent purges this flow at its next sync",
                row.gateway
            )),
        }
    }
    if row.unanswered {
        ex.step(
            "no reply has reached the pod since the flow began: the agent's GC expires it once idle for \
             nat.unansweredTimeoutSeconds, not the established timeouts",
        );
    }
    if snap.nat_rev.is_some() && !row.reply_entry {
        ex.step(format!(
            "the reverse entry in {} is missing: the next packet of the flow after 1 s idle re-creates it (counted \
             rev_restored), as does the agent's next GC pass; until then replies to this flow pass untranslated",
            names::NAT_REV
        ));
    }
    let wire = row.nat_port.map(|p| format!(" with source port {p}")).unwrap_or_default();
    let restored = if row.nat_port.is_some() {
        format!("replies restored to come from {} and to port {}", row.remote, u16::from_be(key.sport_be))
    } else {
        format!("replies restored to come from {}", row.remote)
    };
    let action = format!("rewritten to {}{wire} as recorded for this flow; {restored}", row.gateway);
    ex.flow = Some(row);
    // Flow events are counted, not packets: an established flow's packet moves no counter.
    ex.finish(Verdict::ExistingFlow, &[], action);
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 20);
    const PEER: u32 = 0x1234_5678;

    fn gw(last: u8, tcp: u16, udp: u16, up: bool) -> Gateway {
        Gateway {
            addr_be: addr_be(Ipv4Addr::new(192, 0, 2, last)),
            tcp_port_be: tcp.to_be(),
            udp_port_be: udp.to_be(),
            flags: if up { GW_UP } else { 0 },
        }
    }

    fn peer(gws: &[Gateway]) -> PeerGateways {
        let mut pg = PeerGateways { count: u32::try_from(gws.len()).unwrap(), ..PeerGateways::default() };
        pg.gateways[..gws.len()].copy_from_slice(gws);
        pg
    }

    fn snapshot(gws: &[Gateway]) -> Snapshot {
        Snapshot {
            routes: Some(BTreeMap::from([("10.245.0.0/16".parse().unwrap(), PEER)])),
            peers: Some(BTreeMap::from([(PEER, peer(gws))])),
            names: BTreeMap::from([(PEER, "cluster2".to_string())]),
            nat_fwd: Some(HashMap::new()),
            nat_rev: Some(HashMap::new()),
            nat_fill: None,
            now_ns: 100_000_000_000,
            missing: Vec::new(),
            ..Snapshot::default()
        }
    }

    fn query(src: &str, dst: &str, proto: Proto) -> Query {
        Query { src: src.parse().unwrap(), dst: parse_destination(dst).unwrap(), proto }
    }

    /// Records a flow as the datapath would: both entries.
    fn add_flow(s: &mut Snapshot, key: FlowKey, gw: &Gateway, nat_sport: u16, last_seen_ns: u64) {
        let port_be = if key.proto == IPPROTO_UDP { gw.udp_port_be } else { gw.tcp_port_be };
        let remapped = nat_sport != u16::from_be(key.sport_be);
        let fwd = NatFwd {
            gw_addr_be: gw.addr_be,
            gw_port_be: port_be,
            nat_sport_be: nat_sport.to_be(),
            peer_id: PEER,
            flags: if remapped { FLOW_REMAPPED } else { 0 },
            ifindex: 0,
            _pad: 0,
            last_seen_ns,
        };
        let rev = NatRev {
            remote_addr_be: key.dst_be,
            remote_port_be: key.dport_be,
            pod_port_be: key.sport_be,
            flags: 0,
            peer_id: PEER,
            last_seen_ns,
        };
        s.nat_rev.as_mut().unwrap().insert(FlowKey::rev_of_fwd(&key, &fwd), rev);
        s.nat_fwd.as_mut().unwrap().insert(key, fwd);
    }

    fn key(sport: u16, dst: Ipv4Addr, dport: u16, proto: Proto) -> FlowKey {
        query(&format!("{POD}:{sport}"), &format!("{dst}:{dport}"), proto).flow_key().unwrap()
    }

    #[test]
    fn parses_sources_and_destinations() {
        assert_eq!("10.0.0.1".parse::<Source>().unwrap(), Source { addr: Ipv4Addr::new(10, 0, 0, 1), port: None });
        assert_eq!("10.0.0.1:80".parse::<Source>().unwrap().port, Some(80));
        assert!("10.0.0.1:0".parse::<Source>().is_err());
        assert!("pod".parse::<Source>().is_err());
        assert!("::1".parse::<Source>().is_err());
        assert!(parse_destination("10.0.0.1").is_err());
        assert_eq!(parse_destination("10.0.0.1:8080").unwrap().port(), 8080);
    }

    #[test]
    fn a_destination_outside_every_route_is_not_meshnets() {
        let s = snapshot(&[gw(2, 31674, 0, true)]);
        let e = explain(&s, &query("10.244.0.10:40000", "10.244.1.5:80", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::PassNotMeshnet);
        assert_eq!(e.action, "not meshnet's: passes unchanged");
        assert!(e.route.is_none());
        assert!(e.counters.is_empty());
    }

    #[test]
    fn the_longest_prefix_wins() {
        let mut s = snapshot(&[gw(2, 31674, 0, true)]);
        let other = 0xabcd;
        s.routes.as_mut().unwrap().insert("10.245.0.0/24".parse().unwrap(), other);
        s.peers.as_mut().unwrap().insert(other, peer(&[gw(9, 30000, 0, true)]));
        s.names.insert(other, "cluster3".into());
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:80", Proto::Tcp));
        assert_eq!(e.route.unwrap(), RouteInfo { cidr: "10.245.0.0/24".into(), peer: "cluster3".into(), peer_id: other });
        assert_eq!(e.gateway.as_deref(), Some("192.0.2.9:30000"));
    }

    #[test]
    fn an_existing_flow_keeps_its_gateway() {
        let gws = [gw(2, 31674, 31675, true), gw(3, 31674, 31675, false)];
        let mut s = snapshot(&gws);
        let k = key(40000, REMOTE, 8080, Proto::Tcp);
        // Pinned to the gateway that is down now: it stays there.
        add_flow(&mut s, k, &gws[1], 61234, 97_000_000_000);
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::ExistingFlow);
        let flow = e.flow.as_ref().unwrap();
        assert_eq!(flow.gateway, "192.0.2.3:31674");
        assert_eq!(flow.nat_port, Some(61234));
        assert_eq!(flow.idle_seconds, 3);
        assert!(flow.reply_entry);
        assert!(e.steps.iter().any(|s| s.contains("is marked down")), "{:?}", e.steps);
        assert!(e.action.contains("source port 61234"), "{}", e.action);
        assert!(e.counters.is_empty(), "{:?}", e.counters);
    }

    #[test]
    fn a_new_flow_in_a_full_table_is_dropped_but_an_existing_one_is_not() {
        let gws = [gw(2, 31674, 0, true)];
        let mut s = snapshot(&gws);
        add_flow(&mut s, key(40000, REMOTE, 8080, Proto::Tcp), &gws[0], 40000, 0);
        s.nat_fill = Some((1, 1, 1));
        let e = explain(&s, &query("10.244.0.10:40001", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::DropTableFull);
        assert_eq!(e.counters, ["nat_table_full"]);
        assert!(e.action.contains("never evicted"), "{}", e.action);
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::ExistingFlow);
        s.nat_fill = Some((0, 0, 1));
        let e = explain(&s, &query("10.244.0.10:40001", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::Redirect);
    }

    #[test]
    fn icmp_to_a_remote_pod_is_dropped_and_says_why() {
        let s = snapshot(&[gw(2, 31674, 0, true)]);
        let e = explain(&s, &query("10.244.0.10", "10.245.0.20:1", Proto::Icmp));
        assert_eq!(e.verdict, Verdict::DropUnsupportedProto);
        assert_eq!(e.counters, ["unsupported_proto"]);
        assert!(e.action.contains("only TCP and UDP"), "{}", e.action);
        assert!(e.action.contains("icmp_error_translated"), "{}", e.action);
        let e = explain(&s, &query("10.244.0.10", "10.244.0.20:1", Proto::Icmp));
        assert_eq!(e.verdict, Verdict::PassNotMeshnet);
    }

    #[test]
    fn an_existing_flow_without_its_reverse_entry_is_flagged() {
        let gws = [gw(2, 31674, 0, true)];
        let mut s = snapshot(&gws);
        let k = key(40000, REMOTE, 8080, Proto::Tcp);
        add_flow(&mut s, k, &gws[0], 40000, 0);
        s.nat_rev.as_mut().unwrap().clear();
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::ExistingFlow);
        assert!(!e.flow.unwrap().reply_entry);
        assert!(e.steps.iter().any(|s| s.contains("re-creates it")));
    }

    /// A flow whose reverse entry is still unanswered says so, and when it goes; an answered
    /// one does not.
    #[test]
    fn an_unanswered_flow_is_flagged() {
        let gws = [gw(2, 31674, 0, true)];
        let mut s = snapshot(&gws);
        let k = key(40000, REMOTE, 8080, Proto::Tcp);
        add_flow(&mut s, k, &gws[0], 40000, 0);
        let q = query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp);
        let e = explain(&s, &q);
        assert!(!e.flow.unwrap().unanswered);
        assert!(!e.steps.iter().any(|s| s.contains("unansweredTimeoutSeconds")), "{:?}", e.steps);
        for rev in s.nat_rev.as_mut().unwrap().values_mut() {
            rev.flags |= FLOW_UNANSWERED;
        }
        let e = explain(&s, &q);
        assert_eq!(e.verdict, Verdict::ExistingFlow);
        assert!(e.flow.unwrap().unanswered);
        assert!(e.steps.iter().any(|s| s.contains("no reply yet")), "{:?}", e.steps);
        assert!(e.steps.iter().any(|s| s.contains("nat.unansweredTimeoutSeconds")), "{:?}", e.steps);
    }

    #[test]
    fn without_a_source_port_the_live_flows_are_listed() {
        let gws = [gw(2, 31674, 0, true), gw(3, 31674, 0, true)];
        let mut s = snapshot(&gws);
        add_flow(&mut s, key(40001, REMOTE, 8080, Proto::Tcp), &gws[1], 40001, 0);
        add_flow(&mut s, key(40000, REMOTE, 8080, Proto::Tcp), &gws[0], 40000, 0);
        // Not to the same destination port, or not TCP: not listed.
        add_flow(&mut s, key(40002, REMOTE, 9090, Proto::Tcp), &gws[0], 40002, 0);
        add_flow(&mut s, key(40003, REMOTE, 8080, Proto::Udp), &gw(2, 31674, 31675, true), 40003, 0);
        let e = explain(&s, &query("10.244.0.10", "10.245.0.20:8080", Proto::Tcp));
        let flows = e.flows.as_ref().unwrap();
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[0].pod, "10.244.0.10:40000");
        assert_eq!(flows[0].gateway, "192.0.2.2:31674");
        assert_eq!(flows[1].pod, "10.244.0.10:40001");
        assert_eq!(flows[1].gateway, "192.0.2.3:31674");
        // And what a new flow would do.
        assert_eq!(e.verdict, Verdict::Redirect);
        assert!(e.gateway.is_none());
        assert_eq!(e.candidates.len(), 2);
        assert!(e.candidates.iter().all(|c| (c.share - 0.5).abs() < 1e-9));
    }

    #[test]
    fn candidate_shares_follow_the_down_gateways() {
        // Slot 1 is down, so the hashes starting there go on to slot 2.
        let gws = [gw(2, 1, 0, true), gw(3, 1, 0, false), gw(4, 1, 0, true), gw(5, 1, 0, true)];
        let s = snapshot(&gws);
        let e = explain(&s, &query("10.244.0.10", "10.245.0.20:8080", Proto::Tcp));
        let shares: Vec<(u32, f64)> = e.candidates.iter().map(|c| (c.index, c.share)).collect();
        assert_eq!(shares, [(0, 0.25), (2, 0.5), (3, 0.25)]);
    }

    #[test]
    fn the_gateway_is_predicted_exactly_with_the_datapath_rule() {
        let mut gws = [gw(2, 31674, 0, true), gw(3, 31674, 0, true), gw(4, 31674, 0, true)];
        for sport in 40000..40064 {
            let q = query(&format!("10.244.0.10:{sport}"), "10.245.0.20:8080", Proto::Tcp);
            let start = gateway_start(&q.flow_key().unwrap(), 3);
            for g in &mut gws {
                g.flags = GW_UP;
            }
            let e = explain(&snapshot(&gws), &q);
            assert_eq!(e.verdict, Verdict::Redirect);
            assert_eq!(e.gateway, Some(format!("192.0.2.{}:31674", 2 + start)));
            // The hashed slot down: the next one cyclically.
            gws[start as usize].flags = 0;
            let e = explain(&snapshot(&gws), &q);
            assert_eq!(e.gateway, Some(format!("192.0.2.{}:31674", 2 + (start + 1) % 3)));
            assert!(e.steps.iter().any(|s| s.contains("is down, skipped")));
        }
    }

    #[test]
    fn udp_skips_gateways_without_a_udp_port() {
        let gws = [gw(2, 31674, 0, true), gw(3, 31674, 0, true), gw(4, 31674, 31675, true)];
        for sport in 40000..40032 {
            let e = explain(&snapshot(&gws), &query(&format!("10.244.0.10:{sport}"), "10.245.0.20:53", Proto::Udp));
            assert_eq!(e.gateway.as_deref(), Some("192.0.2.4:31675"));
        }
    }

    #[test]
    fn choose_gateway_matches_a_brute_force_of_the_datapath_loop() {
        // The datapath ranks usable slots by cyclic distance from `start`.
        let all = [gw(1, 1, 0, true), gw(2, 1, 1, false), gw(3, 0, 1, true), gw(4, 1, 1, true), gw(5, 1, 0, false)];
        for proto in [Proto::Tcp, Proto::Udp] {
            for start in 0..5u32 {
                let mut best = (u32::MAX, None);
                for (j, g) in (0u32..).zip(&all) {
                    if proto.port_be(g) == 0 || g.flags & GW_UP == 0 {
                        continue;
                    }
                    let dist = if j >= start { j - start } else { j + 5 - start };
                    if dist < best.0 {
                        best = (dist, Some(j));
                    }
                }
                assert_eq!(choose_gateway(&all, proto, start), best.1, "{proto:?} start {start}");
            }
        }
    }

    #[test]
    fn udp_without_a_udp_nodeport_passes() {
        let s = snapshot(&[gw(2, 31674, 0, true), gw(3, 31674, 0, false)]);
        let e = explain(&s, &query("10.244.0.10:5353", "10.245.0.20:53", Proto::Udp));
        assert_eq!(e.verdict, Verdict::PassNoGatewayForProto);
        assert_eq!(e.counters, ["no_gateway_for_proto"]);
        assert!(e.gateway.is_none());
        // TCP to the same peer is carried.
        let e = explain(&s, &query("10.244.0.10:5353", "10.245.0.20:53", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::Redirect);
    }

    #[test]
    fn all_gateways_down_drops() {
        let s = snapshot(&[gw(2, 31674, 31675, false), gw(3, 31674, 0, false)]);
        for q in [
            query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp),
            query("10.244.0.10", "10.245.0.20:8080", Proto::Tcp),
            query("10.244.0.10", "10.245.0.20:8080", Proto::Udp),
        ] {
            let e = explain(&s, &q);
            assert_eq!(e.verdict, Verdict::DropNoLiveGateway, "{q:?}");
            assert_eq!(e.counters, ["no_live_gateway"]);
        }
        // A UDP gateway that is down but a TCP-only one that is up: still no live UDP gateway.
        let s = snapshot(&[gw(2, 31674, 31675, false), gw(3, 31674, 0, true)]);
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:53", Proto::Udp));
        assert_eq!(e.verdict, Verdict::DropNoLiveGateway);
    }

    #[test]
    fn a_route_without_its_peer_or_gateways_drops() {
        let mut s = snapshot(&[]);
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::DropNoLiveGateway);
        s.peers.as_mut().unwrap().clear();
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::DropNoLiveGateway);
        assert!(e.steps.iter().any(|s| s.contains("has no entry")));
    }

    #[test]
    fn a_taken_reply_tuple_remaps_the_source_port() {
        let gws = [gw(2, 31674, 31675, true)];
        let mut s = snapshot(&gws);
        // Another remote pod, same pod port, same gateway: it holds the reply tuple.
        let other = Ipv4Addr::new(10, 245, 0, 21);
        add_flow(&mut s, key(44444, other, 53, Proto::Udp), &gws[0], 44444, 0);
        let q = query("10.244.0.10:44444", "10.245.0.20:53", Proto::Udp);
        let k = q.flow_key().unwrap();
        let e = explain(&s, &q);
        assert_eq!(e.verdict, Verdict::Redirect);
        let reply = e.reply.as_ref().unwrap();
        assert_eq!(reply.tuple, "192.0.2.2:31675 -> 10.244.0.10:44444");
        assert_eq!(reply.taken_by.as_deref(), Some("10.244.0.10:44444 -> 10.245.0.21:53"));
        assert_eq!(reply.nat_port, Some(remap_port(&k, 0)));
        assert_eq!(reply.remap.len(), limits::REMAP_ATTEMPTS as usize);
        assert_eq!(e.counters, ["flow_opened", "port_remap"]);

        // The first candidate taken too: the second one.
        let p0 = remap_port(&k, 0);
        add_flow(&mut s, key(45000, Ipv4Addr::new(10, 245, 0, 22), 53, Proto::Udp), &gws[0], p0, 0);
        let e = explain(&s, &q);
        let reply = e.reply.as_ref().unwrap();
        assert!(reply.remap[0].taken_by.is_some());
        assert_eq!(reply.nat_port, Some(remap_port(&k, 1)));
    }

    #[test]
    fn every_remap_port_taken_drops() {
        let gws = [gw(2, 31674, 0, true)];
        let mut s = snapshot(&gws);
        let q = query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp);
        let k = q.flow_key().unwrap();
        add_flow(&mut s, key(40000, Ipv4Addr::new(10, 245, 1, 1), 8080, Proto::Tcp), &gws[0], 40000, 0);
        for attempt in 0..limits::REMAP_ATTEMPTS {
            let holder = Ipv4Addr::new(10, 245, 2, u8::try_from(attempt).unwrap());
            add_flow(&mut s, key(1000 + u16::try_from(attempt).unwrap(), holder, 8080, Proto::Tcp), &gws[0], remap_port(&k, attempt), 0);
        }
        let e = explain(&s, &q);
        assert_eq!(e.verdict, Verdict::DropNoFreePort);
        assert_eq!(e.counters, ["nat_insert_failed"]);
        assert!(e.reply.unwrap().remap.iter().all(|c| c.taken_by.is_some()));
    }

    #[test]
    fn a_reply_tuple_held_by_the_same_flow_is_reused() {
        let gws = [gw(2, 31674, 0, true)];
        let mut s = snapshot(&gws);
        let k = key(40000, REMOTE, 8080, Proto::Tcp);
        add_flow(&mut s, k, &gws[0], 40000, 0);
        // The forward entry was evicted; the reverse one still restores this flow.
        s.nat_fwd.as_mut().unwrap().clear();
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::Redirect);
        let reply = e.reply.unwrap();
        assert!(reply.taken_by.is_none() && reply.nat_port.is_none());
        assert_eq!(e.counters, ["flow_opened"]);
    }

    #[test]
    fn unreadable_maps_are_reported_not_fatal() {
        let mut s = snapshot(&[gw(2, 31674, 0, true)]);
        s.nat_fwd = None;
        s.nat_rev = None;
        s.missing.push("opening pinned map /x/mn_nat_fwd_v1: no such file".into());
        let e = explain(&s, &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::Redirect);
        assert_eq!(e.gateway.as_deref(), Some("192.0.2.2:31674"));
        assert!(e.reply.is_none());
        assert_eq!(e.missing.len(), 1);
        assert!(e.text().contains("missing: opening pinned map"));

        let e = explain(&Snapshot::default(), &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::Unknown);
    }

    #[test]
    fn renders_text_and_json() {
        let gws = [gw(2, 31674, 31675, true)];
        let e = explain(&snapshot(&gws), &query("10.244.0.10:40000", "10.245.0.20:8080", Proto::Tcp));
        let text = e.text();
        assert!(text.starts_with("tcp 10.244.0.10:40000 -> 10.245.0.20:8080\n"), "{text}");
        assert!(text.contains("  - route: 10.245.0.20 is in 10.245.0.0/16, peer cluster2\n"), "{text}");
        assert!(text.contains("    [0] 192.0.2.2 tcp 31674 udp 31675 up\n"), "{text}");
        assert!(text.contains("\nverdict: rewritten to 192.0.2.2:31674 and recorded as a new flow"), "{text}");
        assert!(text.ends_with("counters: flow_opened\n"), "{text}");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["verdict"], "redirect");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["gateway"], "192.0.2.2:31674");
        assert_eq!(v["route"]["cidr"], "10.245.0.0/16");
        assert_eq!(v["gateways"][0]["udpPort"], 31675);
        assert_eq!(v["reply"]["natPort"], serde_json::Value::Null);
        assert!(v.get("flow").is_none() && v.get("missing").is_none());
        let e = explain(&snapshot(&gws), &query("10.244.0.10:40000", "10.244.0.2:80", Proto::Tcp));
        assert_eq!(serde_json::to_value(&e).unwrap()["verdict"], "passNotMeshnet");
    }
}

#[cfg(test)]
mod tunnel_tests {
    use super::*;
    use meshnet_common::LocalNet;

    fn snapshot() -> Snapshot {
        let node = TunnelNode {
            addr_be: addr_be(Ipv4Addr::new(192, 0, 2, 2)),
            src_be: addr_be(Ipv4Addr::new(192, 0, 2, 1)),
            port_be: 31801u16.to_be(),
            stats_slot: 0,
            peer_id: 7,
            ifindex: 3,
            mtu: 1500,
        };
        let mut nets = [LocalNet::NONE; limits::MAX_NODE_CIDRS];
        nets[0] = LocalNet { addr_be: addr_be(Ipv4Addr::new(10, 244, 0, 0)), mask_be: addr_be(Ipv4Addr::new(255, 255, 255, 0)) };
        Snapshot {
            routes: Some(BTreeMap::new()),
            peers: Some(BTreeMap::new()),
            names: BTreeMap::from([(7, "cluster2".to_string())]),
            nat_fwd: Some(HashMap::new()),
            nat_rev: Some(HashMap::new()),
            tun_routes: BTreeMap::from([("10.245.0.0/24".parse().unwrap(), node)]),
            tun_nodes: BTreeMap::from([(Ipv4Addr::new(192, 0, 2, 2), 7)]),
            tun_config: Some(TunnelConfig {
                cluster_id: 1,
                port_be: 31800u16.to_be(),
                _pad: 0,
                flags: 0,
                mtu: 1500,
                nets,
                hosts_be: [addr_be(Ipv4Addr::new(10, 244, 0, 1)), 0, 0, 0],
            }),
            tun_peer_ports: BTreeSet::from([31801]),
            ..Snapshot::default()
        }
    }

    fn q(src: &str, dst: &str, proto: Proto) -> Query {
        Query { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto }
    }

    #[test]
    fn a_tunnel_peers_pod_is_encapsulated_whatever_the_protocol() {
        let s = snapshot();
        for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
            let e = explain(&s, &q("10.244.0.10:40000", "10.245.0.20:8080", proto));
            assert_eq!(e.verdict, Verdict::TunnelEncap, "{proto:?}: {}", e.text());
            assert_eq!(e.counters, ["tunnel_encap"]);
            assert!(e.action.contains("192.0.2.2:31801"), "{}", e.action);
            assert!(e.steps.iter().any(|s| s.contains("MTU 1464")), "{:?}", e.steps);
        }
        // Outside the nodes' pod CIDRs the gateway path decides (here: no route, passes).
        let e = explain(&s, &q("10.244.0.10:40000", "10.245.9.9:8080", Proto::Tcp));
        assert_eq!(e.verdict, Verdict::PassNotMeshnet, "{}", e.text());
    }

    /// A pod's own UDP to a peer node's tunnel port is dropped: it could pass for tunnel
    /// traffic there.
    #[test]
    fn a_pods_own_datagram_to_a_peers_tunnel_port_is_dropped() {
        let s = snapshot();
        let e = explain(&s, &q("10.244.0.10:40000", "192.0.2.2:31801", Proto::Udp));
        assert_eq!((e.verdict, e.counters.as_slice()), (Verdict::TunnelDrop, ["tunnel_forged"].as_slice()), "{}", e.text());
        for (dst, proto) in [
            ("192.0.2.77:31801", Proto::Udp),
            ("192.0.2.2:31801", Proto::Tcp),
            ("192.0.2.2:31802", Proto::Udp),
            ("192.0.2.2:31800", Proto::Udp),
        ] {
            let e = explain(&s, &q("10.244.0.10:40000", dst, proto));
            assert_eq!(e.verdict, Verdict::PassNotMeshnet, "{dst} {proto:?}: {}", e.text());
        }
    }

    #[test]
    fn decapsulation_names_the_check_that_refuses() {
        let s = snapshot();
        let cases = [
            ("192.0.2.2", "10.245.0.20:1", "10.244.0.10:2", Verdict::TunnelDeliver, "tunnel_decap"),
            ("192.0.2.9", "10.245.0.20:1", "10.244.0.10:2", Verdict::TunnelDrop, "tunnel_unknown_node"),
            ("192.0.2.2", "10.99.0.1:1", "10.244.0.10:2", Verdict::TunnelDrop, "tunnel_spoofed_source"),
            ("192.0.2.2", "10.245.0.20:1", "10.244.1.10:2", Verdict::TunnelDrop, "tunnel_not_local"),
            // The node itself, inside its pod CIDR: its bridge address, network and broadcast.
            ("192.0.2.2", "10.245.0.20:1", "10.244.0.1:2", Verdict::TunnelDrop, "tunnel_not_local"),
            ("192.0.2.2", "10.245.0.20:1", "10.244.0.0:2", Verdict::TunnelDrop, "tunnel_not_local"),
            ("192.0.2.2", "10.245.0.20:1", "10.244.0.255:2", Verdict::TunnelDrop, "tunnel_not_local"),
            ("192.0.2.2", "10.245.0.20:1", "10.244.0.254:2", Verdict::TunnelDeliver, "tunnel_decap"),
        ];
        for (from, src, dst, verdict, counter) in cases {
            let e = explain_decap(&s, from.parse().unwrap(), &q(src, dst, Proto::Udp));
            assert_eq!((e.verdict, e.counters.as_slice()), (verdict, [counter].as_slice()), "{from} {src} {dst}: {}", e.text());
        }
        let none = Snapshot { tun_config: None, ..snapshot() };
        let e = explain_decap(&none, "192.0.2.2".parse().unwrap(), &q("10.245.0.20:1", "10.244.0.10:2", Proto::Udp));
        assert_eq!(e.verdict, Verdict::PassNotMeshnet);
        // The port published to the uplink program decides too; without that map, the settings.
        for (taken, verdict) in [(None, Verdict::TunnelDeliver), (Some(31800), Verdict::TunnelDeliver), (Some(31801), Verdict::PassNotMeshnet), (Some(0), Verdict::PassNotMeshnet)] {
            let s = Snapshot { tun_port: taken, ..snapshot() };
            let e = explain_decap(&s, "192.0.2.2".parse().unwrap(), &q("10.245.0.20:1", "10.244.0.10:2", Proto::Udp));
            assert_eq!(e.verdict, verdict, "{taken:?}: {}", e.text());
        }
    }
}
