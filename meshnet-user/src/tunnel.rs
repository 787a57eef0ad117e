//! Tunnel mode's side of the agent: the path to each peer node (this node's source address,
//! interface and MTU toward it, from the kernel's routes), and the tunnel maps kept equal
//! to the desired state.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
};

use anyhow::Context as _;
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, MapData, PerCpuArray, PerCpuValues,
};
use ipnet::Ipv4Net;
use meshnet_common::{
    names, node_slot, pod_port_slot, switch, tun_fast, LocalNet, PodPort, SeqNodeSlot, SeqPodPort, SeqTunnelConfig, TunnelConfig, TunnelNode, TunnelStats,
};
use serde::Serialize;
use tracing::warn;

use crate::{
    config::Desired,
    grace,
    maps::{addr_be, addr_of_be, open},
    pins::Pins,
};

pub type TunRoutes = LpmTrie<MapData, u32, TunnelNode>;
pub type TunNodes = HashMap<MapData, u32, u32>;
pub type TunConfigMap = HashMap<MapData, u32, TunnelConfig>;
pub type TunStats = PerCpuArray<MapData, TunnelStats>;
pub type TunPorts = HashMap<MapData, u32, PodPort>;
pub type Switches = aya::maps::Array<MapData, u32>;
pub type TunFast = aya::maps::Array<MapData, u32>;
pub type TunCfgSeq = aya::maps::Array<MapData, SeqTunnelConfig>;
pub type TunPortSlots = aya::maps::Array<MapData, SeqPodPort>;
pub type TunNodeSlots = aya::maps::Array<MapData, SeqNodeSlot>;
pub type TunPeerPorts = aya::maps::Array<MapData, u64>;

/// The MTU assumed for an interface whose MTU cannot be read, and for the decapsulating
/// side before any uplink is attached: Ethernet's.
pub const DEFAULT_MTU: u32 = 1500;

/// How this node reaches one peer node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePath {
    /// This node's address toward it: the outer source.
    pub src: Ipv4Addr,
    pub ifindex: u32,
    pub mtu: u32,
}

/// The kernel's route to `dst`: the source address it would use (a connected UDP socket
/// asks the routing table without sending anything), the interface that holds that address
/// (among `addrs`, this namespace's addresses by interface), and its MTU.
fn resolve_with(dst: Ipv4Addr, addrs: &[(Ipv4Addr, String)]) -> io::Result<NodePath> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect((dst, 9))?;
    let SocketAddr::V4(local) = sock.local_addr()? else {
        return Err(io::Error::other("no IPv4 source address"));
    };
    let src = *local.ip();
    let name = addrs.iter().find(|(a, _)| *a == src).map(|(_, n)| n).ok_or_else(|| io::Error::other(format!("no interface holds {src}")))?;
    let ifindex = nix::net::if_::if_nametoindex(name.as_str())?;
    Ok(NodePath { src, ifindex, mtu: mtu_of(name).unwrap_or(DEFAULT_MTU) })
}

/// This namespace's IPv4 addresses with their subnets, for [`TunnelMaps::sync`].
#[must_use]
pub fn node_subnets() -> Vec<Ipv4Net> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    all.filter_map(|ifa| {
        let addr = ifa.address.as_ref()?.as_sockaddr_in()?.ip();
        let len = ifa.netmask.as_ref().and_then(|m| m.as_sockaddr_in()).map_or(32, |m| u32::from(m.ip()).leading_ones());
        Ipv4Net::new(addr, u8::try_from(len).ok()?).ok()
    })
    .collect()
}

/// This namespace's IPv4 addresses with the interface that holds each.
fn interface_addresses() -> Vec<(Ipv4Addr, String)> {
    nix::ifaddrs::getifaddrs()
        .map(|all| {
            all.filter_map(|ifa| Some((ifa.address.as_ref()?.as_sockaddr_in()?.ip(), ifa.interface_name.clone()))).collect()
        })
        .unwrap_or_default()
}

/// `c` as this node delivers it, given `hosts`, its addresses with their subnets, and `pods`,
/// the addresses of the pods it has read. A pod CIDR wider than a bridge of this node (the
/// cluster's podCIDRs, taken when neither `tunnel.podCIDRs` nor the Node's are known) holds
/// every node's pods and the other nodes' bridge addresses, which their own decapsulation
/// refuses, and the bridge's broadcast is not its own, which the stack hands to the node's
/// sockets. Such a CIDR is narrowed to the subnets of this node's interfaces inside it that
/// hold its pods, when they hold every pod of it this node has: so a subnet that holds none
/// (docker0's, the LAN's inside a wide cluster CIDR) narrows nothing, nor do pods routed one
/// by one (Calico, Cilium), and without pods read yet it stays wide. (A /31 or /32 is a host
/// route's address, as Calico's `tunl0` has, not a bridge.) The addresses of `hosts` inside
/// the result go to [`TunnelConfig::hosts_be`], never delivered to; a node has one per
/// bridge, so four slots for four CIDRs suffice. Past the slots, a CIDR stays wide.
fn as_delivered(c: TunnelConfig, hosts: &[Ipv4Net], pods: &[Ipv4Addr]) -> TunnelConfig {
    const SLOTS: usize = meshnet_common::limits::MAX_NODE_CIDRS;
    let local_net = |n: Ipv4Net| LocalNet { addr_be: addr_be(n.network()), mask_be: addr_be(n.netmask()) };
    let net_of = |l: &LocalNet| Ipv4Net::with_netmask(addr_of_be(l.addr_be), addr_of_be(l.mask_be)).ok();
    let wanted: Vec<&LocalNet> = c.nets.iter().filter(|n| n.mask_be != 0).collect();
    let mut nets: Vec<LocalNet> = Vec::new();
    for (i, slot) in wanted.iter().enumerate() {
        let Some(wide) = net_of(slot) else { continue };
        let inside: Vec<&Ipv4Addr> = pods.iter().filter(|p| wide.contains(*p)).collect();
        let mut bridges: Vec<Ipv4Net> = hosts
            .iter()
            .map(Ipv4Net::trunc)
            .filter(|b| b.prefix_len() > wide.prefix_len() && b.prefix_len() <= 30 && wide.contains(b))
            .filter(|b| inside.iter().any(|p| b.contains(*p)))
            .collect();
        bridges.sort_unstable();
        bridges.dedup();
        let all_behind = !inside.is_empty() && inside.iter().all(|p| bridges.iter().any(|b| b.contains(*p)));
        // The CIDRs still to come keep a slot each.
        if all_behind && nets.len() + bridges.len() + (wanted.len() - i - 1) <= SLOTS {
            nets.extend(bridges.into_iter().map(local_net));
        } else {
            nets.push(**slot);
        }
    }
    let mut out = TunnelConfig { nets: [LocalNet::NONE; SLOTS], hosts_be: [0; SLOTS], ..c };
    for (slot, n) in out.nets.iter_mut().zip(nets) {
        *slot = n;
    }
    let inside = hosts.iter().map(|h| addr_be(h.addr())).filter(|h| out.nets.iter().any(|n| n.contains(*h)));
    for (slot, h) in out.hosts_be.iter_mut().zip(inside) {
        *slot = h;
    }
    out
}

/// [`resolve_with`] for one node.
pub fn resolve(dst: Ipv4Addr) -> io::Result<NodePath> {
    resolve_with(dst, &interface_addresses())
}

/// An interface's MTU (SIOCGIFMTU: the namespace's own view, whatever /sys shows).
pub fn mtu_of(iface: &str) -> io::Result<u32> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    // SAFETY: an ifreq zeroed and filled with a NUL-terminated name shorter than IFNAMSIZ;
    // the ioctl writes only into it.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        let bytes = iface.as_bytes();
        if bytes.len() >= req.ifr_name.len() {
            return Err(io::Error::other("interface name too long"));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = s.cast_signed();
        }
        if libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::SIOCGIFMTU as _, &raw mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        u32::try_from(req.ifr_ifru.ifru_mtu).map_err(|_| io::Error::other("negative MTU"))
    }
}

/// The tunnel maps, open for writing.
pub struct TunnelMaps {
    pub routes: TunRoutes,
    pub nodes: TunNodes,
    pub config: TunConfigMap,
    /// `None` where the pins are an older build's (a CLI of this build run against them):
    /// nothing is counted or shown per peer then.
    pub stats: Option<TunStats>,
    pub ports: TunPorts,
    /// `None` where an older agent's pins lack it: the datapath then does every lookup.
    pub switches: Option<Switches>,
    /// The settings the per-packet paths read from an array (`names::TUN_FAST`); `None`
    /// where an older agent's pins lack it, whose programs look the settings up instead.
    pub fast: Option<TunFast>,
    /// The settings' seqlocked copy for the decapsulating program (`names::TUN_CFG_SEQ`);
    /// `None` where an older agent's pins lack it, whose programs look the hash up instead.
    pub cfg_seq: Option<TunCfgSeq>,
    /// The pods' ports again, by slot (`names::TUN_PORT_SLOTS`); `None` where an older
    /// agent's pins lack it, whose programs look the hash up instead.
    pub port_slots: Option<TunPortSlots>,
    /// What each written slot of `port_slots` holds, with its sequence number, read from the
    /// map once (as `slots`): a slot's number only ever grows, so that no reader takes the
    /// end of one write for the start of another.
    port_slots_held: Option<BTreeMap<u32, SeqPodPort>>,
    /// The tunnel peer nodes with the pod CIDRs they host, by slot (`names::TUN_NODE_SLOTS`);
    /// `None` where an older agent's pins lack it, whose programs look every route up.
    pub node_slots: Option<TunNodeSlots>,
    /// What each written slot of `node_slots` holds, as `port_slots_held`.
    node_slots_held: Option<BTreeMap<u32, SeqNodeSlot>>,
    /// The tunnel peers' ports (`names::TUN_PEER_PORTS`); `None` where an older agent's pins
    /// lack it, whose programs do not check them.
    pub peer_ports: Option<TunPeerPorts>,
    /// What `peer_ports` holds, word by word, read from the map once: the agent is its only
    /// writer, so a sync compares with this, not with 1,024 lookups.
    peer_ports_held: Option<Vec<u64>>,
    /// Which counter slot each tunnel peer has (peer id → index), read from the map once.
    /// The agent is the only writer, so it stays true while these maps are open.
    slots: Option<BTreeMap<u32, u32>>,
    /// Peers warned of as uncounted (no slot for them), so that a rescan does not warn again.
    unslotted: BTreeSet<u32>,
}

/// An array of seqlocked slots.
type SlotArray<V> = aya::maps::Array<MapData, V>;
/// A slot map with what the agent wrote to it, by slot.
type HeldSlots<'a, V> = (&'a mut SlotArray<V>, &'a mut BTreeMap<u32, V>);

/// A value of an array of seqlocked slots that only the agent writes, each slot holding one
/// owner or nothing (`names::TUN_PORT_SLOTS`, `names::TUN_NODE_SLOTS`).
trait SeqSlot: aya::Pod + PartialEq + Default {
    /// The map's name, for its grace periods and errors.
    const MAP: &'static str;
    /// What an emptied slot holds, its sequence number aside.
    const EMPTY: Self;
    fn seq(&self) -> u32;
    #[must_use]
    fn with_seq(self, seq: u32) -> Self;
    /// Whether the slot holds no owner, whatever its sequence number: emptied, or zeroed as
    /// the kernel made it.
    fn holds_nothing(&self) -> bool {
        let v = self.with_seq(0);
        v == Self::EMPTY || v == Self::default()
    }
}

impl SeqSlot for SeqPodPort {
    const MAP: &'static str = names::TUN_PORT_SLOTS;
    const EMPTY: Self = SeqPodPort { seq: 0, addr_be: 0, port: PodPort { ifindex: 0, pod_mac: [0; 6], host_mac: [0; 6] } };
    fn seq(&self) -> u32 {
        self.seq
    }
    fn with_seq(self, seq: u32) -> Self {
        SeqPodPort { seq, ..self }
    }
}

impl SeqSlot for SeqNodeSlot {
    const MAP: &'static str = names::TUN_NODE_SLOTS;
    const EMPTY: Self = SeqNodeSlot::EMPTY;
    fn seq(&self) -> u32 {
        self.seq
    }
    fn with_seq(self, seq: u32) -> Self {
        SeqNodeSlot { seq, ..self }
    }
}

/// Writes `next` into `slot` under its seqlock; `cur` (what the slot holds) follows each
/// write that succeeds, so that it stays what the map holds.
fn write_slot<V: SeqSlot>(map: &mut SlotArray<V>, slot: u32, cur: &mut V, next: V) -> anyhow::Result<()> {
    crate::maps::write_seqlocked(*cur, next, V::seq, V::with_seq, |v| {
        map.set(slot, v, 0).with_context(|| format!("writing the slots of {}", V::MAP))?;
        *cur = v;
        Ok(())
    })
    .map(|_| ())
}

/// A slot map and what the agent wrote to it, read from the map the first time (a map an
/// earlier agent, or a crashed one, left behind).
fn held_slots<'a, V: SeqSlot>(
    map: &'a mut Option<SlotArray<V>>,
    held: &'a mut Option<BTreeMap<u32, V>>,
) -> anyhow::Result<Option<HeldSlots<'a, V>>> {
    let Some(map) = map else {
        return Ok(None);
    };
    if held.is_none() {
        let mut read = BTreeMap::new();
        for (slot, v) in map.iter().enumerate() {
            let v = v.with_context(|| format!("reading the slots of {}", V::MAP))?;
            if v != V::default() {
                read.insert(u32::try_from(slot).unwrap_or(u32::MAX), v);
            }
        }
        *held = Some(read);
    }
    Ok(held.as_mut().map(|held| (map, held)))
}

/// Empties every slot that holds anything but its owner as `owners` has it (another owner,
/// the same one with another value, one gone), and starts a grace period after them: a slot
/// changes from one value to another only through empty and a grace period, so that no
/// reader, on any CPU's memory order, mixes two values. Goes on past a failed write; the
/// first error is returned.
fn empty_slots<V: SeqSlot>(
    map: &mut Option<SlotArray<V>>,
    held: &mut Option<BTreeMap<u32, V>>,
    owners: &BTreeMap<u32, V>,
) -> anyhow::Result<()> {
    let Some((map, held)) = held_slots(map, held)? else {
        return Ok(());
    };
    let slots: Vec<u32> = held.keys().copied().collect();
    let first_error = empty_each(map, held, slots, |slot, cur| {
        // A slot left mid-write (odd) is emptied too, and filled again after the grace.
        let keep = cur.seq() & 1 == 0 && owners.get(&slot).is_some_and(|o| o.with_seq(0) == cur.with_seq(0));
        !keep && !cur.holds_nothing()
    });
    first_error.map_or(Ok(()), Err)
}

/// Empties each of `slots` that `empty` picks, then starts a grace period if it emptied any;
/// the first failed write's error.
fn empty_each<V: SeqSlot>(map: &mut SlotArray<V>, held: &mut BTreeMap<u32, V>, slots: Vec<u32>, empty: impl Fn(u32, &V) -> bool) -> Option<anyhow::Error> {
    let mut first_error = None;
    let mut emptied = false;
    for slot in slots {
        let cur = held.entry(slot).or_default();
        if !empty(slot, cur) {
            continue;
        }
        if let Err(e) = write_slot(map, slot, cur, V::EMPTY) {
            first_error.get_or_insert(e);
        }
        emptied = true;
    }
    if emptied {
        grace::freed(V::MAP);
    }
    first_error
}

/// Gives each empty slot its owner, once a grace period has passed since slots were last
/// emptied. A slot still zeroed as the kernel made it, where that is not the emptied value,
/// is emptied first like any other: a read that mixed zeros with its first owner could
/// otherwise hold what neither says (a node's CIDR at address 0). Goes on past a failed
/// write; the first error is returned.
fn fill_slots<V: SeqSlot>(
    map: &mut Option<SlotArray<V>>,
    held: &mut Option<BTreeMap<u32, V>>,
    owners: &BTreeMap<u32, V>,
) -> anyhow::Result<()> {
    let Some((map, held)) = held_slots(map, held)? else {
        return Ok(());
    };
    let mut first_error = None;
    if V::EMPTY != V::default() {
        first_error = empty_each(map, held, owners.keys().copied().collect(), |_, cur| *cur == V::default());
    }
    for (&slot, owner) in owners {
        let cur = held.entry(slot).or_default();
        if !cur.holds_nothing() || cur.with_seq(0) == V::default() && V::EMPTY != V::default() {
            // Its owner already, or not emptied (a failed write).
            continue;
        }
        grace::before_take(V::MAP);
        if let Err(e) = write_slot(map, slot, cur, *owner) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Which node each slot of `names::TUN_NODE_SLOTS` should hold, from the routes `wanted`
/// (CIDR → node): a node's CIDRs that overlap no other route (where another route lies inside
/// or around one, the trie's longest match decides), at most
/// [`meshnet_common::limits::MAX_NODE_CIDRS`] of them; of nodes that share a slot, the lowest
/// address. A node with no such CIDR takes no slot: its packets go to the trie.
fn node_slot_owners(wanted: &BTreeMap<Ipv4Net, TunnelNode>) -> BTreeMap<u32, SeqNodeSlot> {
    let overlaps = |net: &Ipv4Net| {
        let around = (0..net.prefix_len()).any(|len| Ipv4Net::new(net.network(), len).is_ok_and(|n| wanted.contains_key(&n.trunc())));
        // Sorted by address, then prefix: what `net` holds follows it.
        let inside = wanted.range(net..).nth(1).is_some_and(|(n, _)| net.contains(n));
        around || inside
    };
    let mut by_node: BTreeMap<Ipv4Addr, SeqNodeSlot> = BTreeMap::new();
    for (net, node) in wanted {
        if overlaps(net) {
            continue;
        }
        let slot = by_node.entry(addr_of_be(node.addr_be)).or_insert(SeqNodeSlot {
            addr_be: node.addr_be,
            peer_id: node.peer_id,
            stats_slot: node.stats_slot,
            ..SeqNodeSlot::EMPTY
        });
        // A route names its node with its peer and counter slot: routes of one node that
        // disagree (a sync in between) give it no slot.
        if (slot.peer_id, slot.stats_slot) != (node.peer_id, node.stats_slot) {
            slot.peer_id = 0;
        }
        if let Some(free) = slot.nets.iter_mut().find(|n| **n == LocalNet::NONE) {
            *free = LocalNet { addr_be: addr_be(net.network()), mask_be: addr_be(net.netmask()) };
        }
    }
    let mut owners = BTreeMap::new();
    // Ascending addresses: the first node seen for a slot is its lowest.
    for v in by_node.into_values().filter(|v| v.peer_id != 0) {
        owners.entry(node_slot(v.addr_be)).or_insert(v);
    }
    owners
}

/// What a sync changed, for the agent's log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TunnelReport {
    pub routes_written: usize,
    pub routes_removed: usize,
    pub nodes_written: usize,
    pub nodes_removed: usize,
    pub config_changed: bool,
    /// The settings published for the per-packet paths changed (`names::TUN_FAST`, or their
    /// copy for decapsulation, `names::TUN_CFG_SEQ`).
    pub fast_written: bool,
    /// The tunnel peers' ports changed (`names::TUN_PEER_PORTS`).
    pub peer_ports_written: bool,
    /// Peer nodes without a route from here: their pod CIDRs are not routed until they have.
    pub unresolved: Vec<Ipv4Addr>,
}

impl TunnelReport {
    #[must_use]
    pub fn is_noop(&self) -> bool {
        *self == Self { unresolved: self.unresolved.clone(), ..Self::default() }
    }
}

fn route_key(net: Ipv4Net) -> Key<u32> {
    Key::new(u32::from(net.prefix_len()), addr_be(net.network()))
}

impl TunnelMaps {
    pub fn open(pins: &Pins) -> anyhow::Result<Self> {
        Ok(Self {
            routes: open(pins, names::TUN_ROUTES)?,
            nodes: open(pins, names::TUN_NODES)?,
            config: open(pins, names::TUN_CONFIG)?,
            stats: if pins.map(names::TUN_STATS).exists() { Some(open(pins, names::TUN_STATS)?) } else { None },
            ports: open(pins, names::TUN_PORTS)?,
            // Missing only where an older agent made the pins; any other failure is an error,
            // or a switch left on would hide every route written from then on.
            switches: if pins.map(names::SWITCHES).exists() { Some(open(pins, names::SWITCHES)?) } else { None },
            fast: if pins.map(names::TUN_FAST).exists() { Some(open(pins, names::TUN_FAST)?) } else { None },
            cfg_seq: if pins.map(names::TUN_CFG_SEQ).exists() { Some(open(pins, names::TUN_CFG_SEQ)?) } else { None },
            port_slots: if pins.map(names::TUN_PORT_SLOTS).exists() { Some(open(pins, names::TUN_PORT_SLOTS)?) } else { None },
            port_slots_held: None,
            node_slots: if pins.map(names::TUN_NODE_SLOTS).exists() { Some(open(pins, names::TUN_NODE_SLOTS)?) } else { None },
            node_slots_held: None,
            peer_ports: if pins.map(names::TUN_PEER_PORTS).exists() { Some(open(pins, names::TUN_PEER_PORTS)?) } else { None },
            peer_ports_held: None,
            slots: None,
            unslotted: BTreeSet::new(),
        })
    }

    /// Takes the tunnel maps out of a loaded object (unpinned use: packet tests).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("the object has no map {name}"));
        let bad = |name: &'static str| move |e: aya::maps::MapError| anyhow::anyhow!("map {name}: {e}");
        Ok(Self {
            routes: TunRoutes::try_from(take(names::TUN_ROUTES)?).map_err(bad(names::TUN_ROUTES))?,
            nodes: TunNodes::try_from(take(names::TUN_NODES)?).map_err(bad(names::TUN_NODES))?,
            config: TunConfigMap::try_from(take(names::TUN_CONFIG)?).map_err(bad(names::TUN_CONFIG))?,
            stats: Some(TunStats::try_from(take(names::TUN_STATS)?).map_err(bad(names::TUN_STATS))?),
            ports: TunPorts::try_from(take(names::TUN_PORTS)?).map_err(bad(names::TUN_PORTS))?,
            // Objects of earlier builds, measured beside this one, have no such map.
            switches: match ebpf.take_map(names::SWITCHES) {
                Some(m) => Some(Switches::try_from(m).map_err(bad(names::SWITCHES))?),
                None => None,
            },
            fast: match ebpf.take_map(names::TUN_FAST) {
                Some(m) => Some(TunFast::try_from(m).map_err(bad(names::TUN_FAST))?),
                None => None,
            },
            cfg_seq: match ebpf.take_map(names::TUN_CFG_SEQ) {
                Some(m) => Some(TunCfgSeq::try_from(m).map_err(bad(names::TUN_CFG_SEQ))?),
                None => None,
            },
            port_slots: match ebpf.take_map(names::TUN_PORT_SLOTS) {
                Some(m) => Some(TunPortSlots::try_from(m).map_err(bad(names::TUN_PORT_SLOTS))?),
                None => None,
            },
            port_slots_held: None,
            node_slots: match ebpf.take_map(names::TUN_NODE_SLOTS) {
                Some(m) => Some(TunNodeSlots::try_from(m).map_err(bad(names::TUN_NODE_SLOTS))?),
                None => None,
            },
            node_slots_held: None,
            peer_ports: match ebpf.take_map(names::TUN_PEER_PORTS) {
                Some(m) => Some(TunPeerPorts::try_from(m).map_err(bad(names::TUN_PEER_PORTS))?),
                None => None,
            },
            peer_ports_held: None,
            slots: None,
            unslotted: BTreeSet::new(),
        })
    }

    /// Publishes the settings' port and cluster id to the per-packet paths (`None`: clears
    /// them), writing only a change; whether it wrote.
    fn set_fast(&mut self, cfg: Option<&TunnelConfig>) -> anyhow::Result<bool> {
        let Some(map) = &mut self.fast else {
            return Ok(false);
        };
        let want = [(tun_fast::CLUSTER_ID, cfg.map_or(0, |c| c.cluster_id)), (tun_fast::PORT, cfg.map_or(0, |c| u32::from(c.port_be)))];
        let mut wrote = false;
        for (slot, value) in want {
            if map.get(&slot, 0).ok() != Some(value) {
                map.set(slot, value, 0).context("publishing the tunnel settings to the datapath")?;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// Makes the peer-port bitmap hold exactly `ports` (host order), writing only the words
    /// that change; whether it wrote. A bit is cleared only when no peer has the port: the
    /// drop it causes is of a pod's own datagram, so a stale bit would only refuse traffic
    /// to a port no tunnel uses any more, and a missing one would let a forgery through.
    fn set_peer_ports(&mut self, ports: &BTreeSet<u16>) -> anyhow::Result<bool> {
        let Some(map) = &mut self.peer_ports else {
            return Ok(false);
        };
        let mut want: BTreeMap<u32, u64> = BTreeMap::new();
        for p in ports {
            *want.entry(u32::from(*p) >> 6).or_default() |= 1 << (p & 63);
        }
        if self.peer_ports_held.is_none() {
            let words = (0..meshnet_common::limits::GW_PORT_WORDS)
                .map(|i| map.get(&i, 0).context("reading the tunnel peers' ports"))
                .collect::<anyhow::Result<Vec<u64>>>()?;
            self.peer_ports_held = Some(words);
        }
        let held = self.peer_ports_held.get_or_insert_default();
        let mut wrote = false;
        for (i, have) in held.iter_mut().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let w = want.get(&i).copied().unwrap_or(0);
            if *have != w {
                map.set(i, w, 0).context("writing the tunnel peers' ports")?;
                *have = w;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// The tunnel peers' ports the datapath holds (`None` without the map).
    #[must_use]
    pub fn current_peer_ports(&self) -> Option<BTreeSet<u16>> {
        let map = self.peer_ports.as_ref()?;
        let mut out = BTreeSet::new();
        for i in 0..meshnet_common::limits::GW_PORT_WORDS {
            let w = map.get(&i, 0).ok()?;
            for bit in 0..64 {
                if w & (1 << bit) != 0 {
                    out.insert(u16::try_from(i * 64 + bit).ok()?);
                }
            }
        }
        Some(out)
    }

    /// Copies the settings under the seqlock for the decapsulating program (`None`: clears
    /// the copy, so that the program looks the hash up), writing only a change; whether it
    /// wrote.
    fn set_cfg_seq(&mut self, cfg: Option<&TunnelConfig>) -> anyhow::Result<bool> {
        let Some(map) = &mut self.cfg_seq else {
            return Ok(false);
        };
        let cur = map.get(&0, 0).context("reading the settings' copy")?;
        // A cleared copy holds no CIDR, not zeroed ones: a zeroed CIDR (mask 0) would hold
        // every address for a reader that mixed it with the port of the copy before.
        let cleared = TunnelConfig { nets: [LocalNet::NONE; meshnet_common::limits::MAX_NODE_CIDRS], ..TunnelConfig::default() };
        let next = SeqTunnelConfig { cfg: cfg.copied().unwrap_or(cleared), ..cur };
        crate::maps::write_seqlocked(cur, next, |v| v.seq, |v, seq| SeqTunnelConfig { seq, ..v }, |v| {
            map.set(0, v, 0).context("writing the settings' copy for the datapath")
        })
    }

    /// The settings' seqlocked copy, if the seqlock vouches for it and it holds settings.
    #[must_use]
    pub fn current_cfg_seq(&self) -> Option<TunnelConfig> {
        let v = self.cfg_seq.as_ref()?.get(&0, 0).ok()?;
        (v.seq & 1 == 0 && v.cfg.port_be != 0).then_some(v.cfg)
    }

    /// The settings the decapsulating program reads: their copy when it holds any, else
    /// the settings themselves.
    #[must_use]
    pub fn decap_config(&self) -> Option<TunnelConfig> {
        self.current_cfg_seq().or_else(|| self.current_config())
    }

    /// The port the uplink program takes (`Some(0)`: none; `None` without the map).
    #[must_use]
    pub fn taken_port(&self) -> Option<u16> {
        self.fast_slot(tun_fast::PORT).and_then(|v| u16::try_from(v).ok()).map(u16::from_be)
    }

    /// A slot of the settings published to the per-packet paths (`None` without the map).
    #[must_use]
    pub fn fast_slot(&self, slot: u32) -> Option<u32> {
        self.fast.as_ref().and_then(|m| m.get(&slot, 0).ok())
    }


    /// Empties every node slot, for an agent that stops: the programs stay attached, and an
    /// older agent started next keeps the routes without knowing the slots, which would
    /// then say what the routes no longer do. Until the next start fills them, the trie
    /// answers for every sender.
    pub fn empty_node_slots(&mut self) -> anyhow::Result<()> {
        empty_slots(&mut self.node_slots, &mut self.node_slots_held, &BTreeMap::new())
    }

    /// Sets a datapath switch (`meshnet_common::switch`), writing only a change.
    fn set_switch(&mut self, slot: u32, on: bool) -> anyhow::Result<()> {
        let Some(switches) = &mut self.switches else {
            return Ok(());
        };
        let value = u32::from(on);
        if switches.get(&slot, 0).ok() != Some(value) {
            switches.set(slot, value, 0).context("setting a datapath switch")?;
        }
        Ok(())
    }

    /// Whether switch `slot` is on (`None` without the map).
    #[must_use]
    pub fn switch(&self, slot: u32) -> Option<bool> {
        self.switches.as_ref().and_then(|s| s.get(&slot, 0).ok()).map(|v| v != 0)
    }

    /// The routes the datapath looks at: the trie's, unless the switch says there are none
    /// (routes an older agent wrote after a downgrade, under a switch it did not know).
    #[must_use]
    pub fn effective_routes(&self) -> BTreeMap<Ipv4Net, TunnelNode> {
        if self.switch(switch::NO_TUNNEL_ROUTES) == Some(true) {
            return BTreeMap::new();
        }
        self.current_routes()
    }

    /// The routes the trie holds now.
    #[must_use]
    pub fn current_routes(&self) -> BTreeMap<Ipv4Net, TunnelNode> {
        self.routes
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((Ipv4Net::new(addr_of_be(k.data()), u8::try_from(k.prefix_len()).ok()?).ok()?, v)))
            .collect()
    }

    #[must_use]
    pub fn current_nodes(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.nodes.iter().flatten().map(|(k, v)| (addr_of_be(k), v)).collect()
    }

    /// The pods' interfaces by the pods' addresses.
    #[must_use]
    pub fn current_ports(&self) -> BTreeMap<Ipv4Addr, PodPort> {
        self.ports.iter().flatten().map(|(k, v)| (addr_of_be(k), v)).collect()
    }

    /// Makes the port table hold `want` (a pod's address → its interface): entries of pods
    /// gone first. Returns how many entries it wrote and removed.
    ///
    /// The program reads a pod's slot before the hash, so a slot never holds what the hash is
    /// about to lose or change: slots are emptied before the hash changes, whether or not it
    /// then can, and given a pod only once the hash holds it.
    pub fn sync_ports(&mut self, want: &BTreeMap<Ipv4Addr, PodPort>) -> anyhow::Result<(usize, usize)> {
        let mut owners = self.slot_owners(want);
        let emptied = empty_slots(&mut self.port_slots, &mut self.port_slots_held, &owners);
        let have = self.current_ports();
        let mut removed = 0;
        for addr in have.keys().filter(|a| !want.contains_key(a)) {
            self.ports.remove(&addr_be(*addr)).context("removing a pod from the port table")?;
            grace::freed(names::TUN_PORTS);
            removed += 1;
        }
        let mut written = 0;
        // One refused insert (the table full) leaves out only its own pod, not every pod after.
        let mut refused = Ok(());
        let mut left_out = BTreeSet::new();
        for (addr, port) in want {
            if have.get(addr) != Some(port) {
                grace::before_take(names::TUN_PORTS);
                match self.ports.insert(addr_be(*addr), port, 0) {
                    Ok(()) => written += 1,
                    Err(e) => {
                        left_out.insert(addr_be(*addr));
                        if refused.is_ok() {
                            refused = Err(anyhow::Error::new(e).context(format!("writing the port table ({addr})")));
                        }
                        continue;
                    }
                }
                if have.contains_key(addr) {
                    grace::freed(names::TUN_PORTS);
                }
            }
        }
        emptied?;
        // A slot holds only a pod the hash holds.
        owners.retain(|_, o| !left_out.contains(&o.addr_be));
        fill_slots(&mut self.port_slots, &mut self.port_slots_held, &owners)?;
        refused?;
        Ok((written, removed))
    }

    /// Which pod of `want` each slot should hold: of the pods inside this node's tunnel pod
    /// CIDRs (the only ones the program delivers to; an address a pod added to its own
    /// interface elsewhere takes no slot from another pod), the lowest address of a slot.
    fn slot_owners(&self, want: &BTreeMap<Ipv4Addr, PodPort>) -> BTreeMap<u32, SeqPodPort> {
        let nets = self.current_config().map(|c| c.nets).unwrap_or_default();
        let mut owners = BTreeMap::new();
        // Ascending addresses: the first pod seen for a slot is its lowest.
        for (addr, port) in want {
            let addr_be = addr_be(*addr);
            if nets.iter().any(|n| n.contains(addr_be)) {
                owners.entry(pod_port_slot(addr_be)).or_insert(SeqPodPort { seq: 0, addr_be, port: *port });
            }
        }
        owners
    }

    /// Where the decapsulating program finds each pod of the hash: `slot` (its own slot, with
    /// the port the hash has), `stale` (its own slot, with another port: until the next
    /// sync) or `hash`.
    #[must_use]
    pub fn port_lookups(&self) -> BTreeMap<Ipv4Addr, &'static str> {
        self.current_ports()
            .into_iter()
            .map(|(addr, port)| {
                let addr_be = addr_be(addr);
                let slot = self.port_slots.as_ref().and_then(|m| m.get(&pod_port_slot(addr_be), 0).ok());
                let lookup = match slot {
                    Some(v) if v.seq & 1 == 0 && v.addr_be == addr_be => if v.port == port { "slot" } else { "stale" },
                    _ => "hash",
                };
                (addr, lookup)
            })
            .collect()
    }

    /// Whether the node of route `net` → `n` has its slot (`names::TUN_NODE_SLOTS`) with that
    /// CIDR, its peer and its counter slot, where the decapsulating program takes a packet
    /// from it with a source in `net` without the trie.
    #[must_use]
    pub fn slotted(&self, net: Ipv4Net, n: &TunnelNode) -> bool {
        let Some(v) = self.node_slots.as_ref().and_then(|m| m.get(&node_slot(n.addr_be), 0).ok()) else {
            return false;
        };
        let cidr = LocalNet { addr_be: addr_be(net.network()), mask_be: addr_be(net.netmask()) };
        v.seq & 1 == 0 && (v.addr_be, v.peer_id, v.stats_slot) == (n.addr_be, n.peer_id, n.stats_slot) && v.nets.contains(&cidr)
    }

    /// The pods that the decapsulating program finds in their own slot with the port the
    /// hash has for them.
    #[must_use]
    pub fn slotted_ports(&self) -> BTreeSet<Ipv4Addr> {
        self.port_lookups().into_iter().filter(|(_, l)| *l == "slot").map(|(a, _)| a).collect()
    }

    #[must_use]
    pub fn current_config(&self) -> Option<TunnelConfig> {
        self.config.get(&0, 0).ok()
    }

    /// Packets and bytes per peer id, summed over the CPUs.
    #[must_use]
    pub fn peer_stats(&self) -> BTreeMap<u32, TunnelStats> {
        self.used_slots()
            .filter_map(|(_, per_cpu)| {
                let owner = per_cpu.first()?;
                let sum = per_cpu.iter().fold(TunnelStats { peer_id: owner.peer_id, in_use: 1, ..TunnelStats::default() }, |a, s| TunnelStats {
                    tx_packets: a.tx_packets + s.tx_packets,
                    tx_bytes: a.tx_bytes + s.tx_bytes,
                    rx_packets: a.rx_packets + s.rx_packets,
                    rx_bytes: a.rx_bytes + s.rx_bytes,
                    ..a
                });
                Some((owner.peer_id, sum))
            })
            .collect()
    }

    /// The counter slots in use, with their per-CPU values (a slot's owner is on every copy).
    fn used_slots(&self) -> impl Iterator<Item = (u32, PerCpuValues<TunnelStats>)> + '_ {
        let stats = self.stats.as_ref();
        (0..stats.map_or(0, TunStats::len))
            .filter_map(move |i| stats?.get(&i, 0).ok().map(|v| (i, v)))
            .filter(|(_, v)| v.first().is_some_and(|s| s.in_use != 0))
    }

    /// Gives every peer of `peers` that has none a counter slot (a free one, zeroed and
    /// marked as the peer's), returning the peer → slot table. A slot is taken again only a
    /// grace period after it was freed ([`Self::free_slots`]), so that a packet that read a
    /// route of its old peer cannot count into its new one.
    fn assign_slots(&mut self, peers: &BTreeSet<u32>) -> anyhow::Result<BTreeMap<u32, u32>> {
        let mut slots = match self.slots.take() {
            Some(s) => s,
            None => self.used_slots().filter_map(|(i, v)| Some((v.first()?.peer_id, i))).collect(),
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        if let Some(stats) = self.stats.as_mut() {
            let new: Vec<u32> = peers.iter().copied().filter(|id| !slots.contains_key(id)).collect();
            for id in new {
                let taken: BTreeSet<u32> = slots.values().copied().collect();
                // Counters never hold routing up: a peer without a slot is routed, uncounted.
                let Some(free) = (0..stats.len()).find(|i| !taken.contains(i)) else {
                    if !self.unslotted.insert(id) {
                        break;
                    }
                    warn!(peer = format!("{id:#010x}"), slots = stats.len(), "no free tunnel counter slot: the peer's packets are not counted");
                    break;
                };
                grace::before_take(names::TUN_STATS);
                let owned = PerCpuValues::try_from(vec![TunnelStats { peer_id: id, in_use: 1, ..TunnelStats::default() }; cpus])
                    .context("per-CPU values")?;
                if let Err(e) = stats.set(free, owned, 0) {
                    if !self.unslotted.insert(id) {
                        continue;
                    }
                    warn!(peer = format!("{id:#010x}"), error = %e, "could not give a tunnel peer its counters: its packets are not counted");
                    continue;
                }
                slots.insert(id, free);
                self.unslotted.remove(&id);
            }
        }
        self.slots = Some(slots.clone());
        Ok(slots)
    }

    /// Frees the counter slots of peers not in `peers` (their routes are gone). A slot that
    /// cannot be freed stays the old peer's, with a warning: counters never hold a sync up.
    fn free_slots(&mut self, peers: &BTreeSet<u32>) -> anyhow::Result<()> {
        let (Some(slots), Some(stats)) = (&mut self.slots, &mut self.stats) else {
            return Ok(());
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let gone: Vec<(u32, u32)> = slots.iter().filter(|(id, _)| !peers.contains(id)).map(|(id, i)| (*id, *i)).collect();
        for (id, slot) in gone {
            let zero = PerCpuValues::try_from(vec![TunnelStats::default(); cpus]).context("per-CPU values")?;
            if let Err(e) = stats.set(slot, zero, 0) {
                warn!(peer = format!("{id:#010x}"), error = %e, "could not free a gone tunnel peer's counters");
                continue;
            }
            grace::freed(names::TUN_STATS);
            slots.remove(&id);
        }
        Ok(())
    }

    /// Makes the maps hold `desired`'s tunnel state, with each node's path from `paths` (a
    /// node missing there keeps the routes already written for it, else is not routed), and for the decapsulating side `mtu`, the uplinks'
    /// MTU, and `hosts`, this node's addresses with their subnets (with the port table's pods,
    /// they narrow its pod CIDRs to the bridges that hold its pods, and its addresses inside
    /// are never delivered to: see `as_delivered`). The settings and the node table go in before the routes that lead to them, and
    /// routes go before the nodes and settings they used: no packet is encapsulated toward a
    /// node the peer would not take it from, or decapsulated with half a configuration.
    pub fn sync(&mut self, desired: &Desired, paths: &BTreeMap<Ipv4Addr, NodePath>, mtu: u32, hosts: &[Ipv4Net]) -> anyhow::Result<TunnelReport> {
        let mut report = TunnelReport::default();
        let pods: Vec<Ipv4Addr> = self.current_ports().into_keys().collect();
        let want_config = desired.tun_config.map(|c| TunnelConfig { mtu, ..as_delivered(c, hosts, &pods) });
        if let Some(c) = want_config {
            let have = self.current_config();
            if have != Some(c) {
                grace::before_take(names::TUN_CONFIG);
                self.config.insert(0, c, 0).context("writing the tunnel settings")?;
                if have.is_some() {
                    grace::freed(names::TUN_CONFIG);
                }
                report.config_changed = true;
            }
            // After the settings, so that a packet the uplink program takes finds them; checked
            // even when they did not change, for a map an older agent's pins lacked.
            report.fast_written = self.set_cfg_seq(Some(&c))? | self.set_fast(Some(&c))?;
        }
        // Before any route: a pod must not reach a peer's port with its own datagrams from the
        // moment its packets can be encapsulated there.
        report.peer_ports_written = self.set_peer_ports(&desired.tun_peer_ports)?;
        let peers: BTreeSet<u32> = desired.tun_nodes.values().copied().collect();
        // Before the routes that name them.
        let slots = self.assign_slots(&peers)?;
        let nodes = self.current_nodes();
        let routes = self.current_routes();
        let mut wanted = BTreeMap::new();
        for (net, node) in &desired.tun_routes {
            let addr = addr_of_be(node.addr_be);
            let stats_slot = slots.get(&node.peer_id).and_then(|i| u16::try_from(i + 1).ok()).unwrap_or(0);
            let path = if let Some(p) = paths.get(&addr) {
                (addr_be(p.src), p.ifindex, p.mtu)
            } else {
                if !report.unresolved.contains(&addr) {
                    report.unresolved.push(addr);
                }
                // A route written for the same node keeps the path last found (and only that:
                // its port and counter slot are the node's now): a lookup that fails a moment (an
                // address being replaced, a link flapping) must not cut every flow to the node
                // until the next rescan.
                match routes.get(net).filter(|r| r.addr_be == node.addr_be && r.peer_id == node.peer_id) {
                    Some(kept) => (kept.src_be, kept.ifindex, kept.mtu),
                    None => continue,
                }
            };
            let (src_be, ifindex, mtu) = path;
            wanted.insert(*net, TunnelNode { src_be, ifindex, mtu, stats_slot, ..*node });
        }
        // Decapsulation trusts a node's slot without reading the routes or the node table: a
        // slot is emptied before anything it says changes, and filled after the routes below.
        let node_owners = node_slot_owners(&wanted);
        empty_slots(&mut self.node_slots, &mut self.node_slots_held, &node_owners)?;
        // A node address that moves to another peer loses its routes first: decapsulation
        // trusts a route that names the sender without reading the node table, so no route
        // may name the address for its old peer once the table names the new one. (A path
        // kept above is only ever a route of the same peer's node, which this leaves alone.)
        let moving = |n: &TunnelNode| desired.tun_nodes.get(&addr_of_be(n.addr_be)).is_some_and(|id| *id != n.peer_id);
        for (net, _) in routes.iter().filter(|(_, n)| moving(n)) {
            self.routes.remove(&route_key(*net)).context("removing a tunnel route of a node that moves to another peer")?;
            report.routes_removed += 1;
        }
        let routes = self.current_routes();
        // Where a table is too full to take a new entry beside the old ones, the removals go
        // first (routes, then the nodes they named): a node that leaves then stops a moment
        // before its successor starts, where failing would leave every change out.
        let mut room_made = false;
        for (addr, id) in &desired.tun_nodes {
            if nodes.get(addr) != Some(id) {
                grace::before_take(names::TUN_NODES);
                let mut r = self.nodes.insert(addr_be(*addr), *id, 0);
                if !room_made && r.as_ref().is_err_and(crate::maps::is_full) {
                    self.remove_unwanted(&routes, &wanted, &nodes, desired, &mut report)?;
                    room_made = true;
                    grace::before_take(names::TUN_NODES);
                    r = self.nodes.insert(addr_be(*addr), *id, 0);
                }
                r.context("writing the tunnel node table")?;
                if nodes.contains_key(addr) {
                    grace::freed(names::TUN_NODES);
                }
                report.nodes_written += 1;
            }
        }
        if !wanted.is_empty() {
            // Before the first route, or the datapath would not look.
            self.set_switch(switch::NO_TUNNEL_ROUTES, false)?;
        }
        for (net, value) in &wanted {
            if routes.get(net) != Some(value) {
                let mut r = crate::maps::trie_insert(&mut self.routes, route_key(*net), *value);
                if !room_made && r.as_ref().is_err_and(crate::maps::is_full) {
                    self.remove_unwanted(&routes, &wanted, &nodes, desired, &mut report)?;
                    room_made = true;
                    r = crate::maps::trie_insert(&mut self.routes, route_key(*net), *value);
                }
                r.context("writing a tunnel route")?;
                report.routes_written += 1;
            }
        }
        if !room_made {
            self.remove_unwanted(&routes, &wanted, &nodes, desired, &mut report)?;
        }
        if wanted.is_empty() {
            self.set_switch(switch::NO_TUNNEL_ROUTES, true)?;
        }
        // Once the routes and nodes hold what the slots say.
        fill_slots(&mut self.node_slots, &mut self.node_slots_held, &node_owners)?;
        // After the routes that named them.
        self.free_slots(&peers)?;
        if want_config.is_none() {
            report.fast_written = self.set_fast(None)? | self.set_cfg_seq(None)?;
        }
        if want_config.is_none() && self.current_config().is_some() {
            self.config.remove(&0).context("removing the tunnel settings")?;
            grace::freed(names::TUN_CONFIG);
            report.config_changed = true;
        }
        Ok(report)
    }

    /// Removes the routes `wanted` lacks, then the nodes `desired` lacks (after the routes
    /// that named them).
    fn remove_unwanted(
        &mut self,
        routes: &BTreeMap<Ipv4Net, TunnelNode>,
        wanted: &BTreeMap<Ipv4Net, TunnelNode>,
        nodes: &BTreeMap<Ipv4Addr, u32>,
        desired: &Desired,
        report: &mut TunnelReport,
    ) -> anyhow::Result<()> {
        for net in routes.keys().filter(|n| !wanted.contains_key(n)) {
            self.routes.remove(&route_key(*net)).context("removing a tunnel route")?;
            report.routes_removed += 1;
        }
        for addr in nodes.keys().filter(|a| !desired.tun_nodes.contains_key(a)) {
            self.nodes.remove(&addr_be(*addr)).context("removing a tunnel node")?;
            grace::freed(names::TUN_NODES);
            report.nodes_removed += 1;
        }
        Ok(())
    }
}

/// Without `bpf_redirect_neigh` the datapath finds a peer node's next hop with a FIB lookup,
/// which uses the neighbour table but never fills it: a node nothing else talks to would
/// stay unresolved (its packets dropped, `tunnel_no_neighbour`). An empty datagram to the
/// discard port makes the kernel resolve it, and keeps the entry from going stale for long.
pub fn warm_neighbours(paths: &BTreeMap<Ipv4Addr, NodePath>) {
    let Ok(sock) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else { return };
    for node in paths.keys() {
        let _ = sock.send_to(&[], (*node, 9));
    }
}

/// The paths to every node `desired` tunnels to; nodes without a route are left out.
#[must_use]
pub fn resolve_all(desired: &Desired) -> BTreeMap<Ipv4Addr, NodePath> {
    if desired.tun_nodes.is_empty() {
        return BTreeMap::new();
    }
    let addrs = interface_addresses();
    desired.tun_nodes.keys().filter_map(|a| resolve_with(*a, &addrs).ok().map(|p| (*a, p))).collect()
}

/// `meshnet maps dump tunnel`'s rows.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelRouteRow {
    pub cidr: String,
    pub peer: String,
    pub node: String,
    pub port: u16,
    pub source: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// How the decapsulating program finds that a packet from the node with a source in the
    /// CIDR is the node's: `slot` (the node's slot holds the CIDR) or `trie`.
    pub decap: &'static str,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPeerRow {
    pub peer: String,
    pub nodes: Vec<String>,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelSettingsRow {
    pub cluster_id: u32,
    /// The cluster id published for encapsulation (`names::TUN_FAST`; 0: none, the settings'
    /// is used), which goes into every tunnel header; `None` without that map.
    pub published_cluster_id: Option<u32>,
    pub port: u16,
    /// The port published to the uplink program (`names::TUN_FAST`; 0: none), which it takes
    /// only while it is `port`; `None` without that map (pins of an older release).
    pub taken_port: Option<u16>,
    pub delivery: &'static str,
    pub mtu: u32,
    pub pod_cidrs: Vec<String>,
    /// This node's own addresses inside those CIDRs: never delivered to.
    pub node_addresses: Vec<String>,
    /// What the decapsulating program reads (`names::TUN_CFG_SEQ`): `same`, a copy of these
    /// settings; `other`, a copy of other ones (a sync not yet done); `none`, no copy (or one
    /// being written), so it looks these up.
    pub decap_copy: &'static str,
}

/// A pod the decapsulating program sends to directly, out of its own interface.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPortRow {
    pub address: String,
    pub ifindex: u32,
    pub pod_mac: String,
    /// Where the decapsulating program finds it (see [`TunnelMaps::port_lookups`]).
    pub lookup: &'static str,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelDump {
    pub settings: Option<TunnelSettingsRow>,
    pub routes: Vec<TunnelRouteRow>,
    pub peers: Vec<TunnelPeerRow>,
    pub pod_ports: Vec<TunnelPortRow>,
    /// The tunnel peers' ports, where pods' own UDP is dropped (`names::TUN_PEER_PORTS`).
    pub peer_ports: Vec<u16>,
}

impl TunnelMaps {
    /// What the tunnel maps hold, peers named by `names` (id → name).
    #[must_use]
    pub fn dump(&self, names: &BTreeMap<u32, String>) -> TunnelDump {
        let name = |id: u32| names.get(&id).cloned().unwrap_or_else(|| format!("#{id:08x}"));
        let copy = self.current_cfg_seq();
        let settings = self.current_config().map(|c| TunnelSettingsRow {
            decap_copy: match copy {
                Some(k) if k == c => "same",
                Some(_) => "other",
                None => "none",
            },
            cluster_id: c.cluster_id,
            published_cluster_id: self.fast_slot(tun_fast::CLUSTER_ID),
            port: u16::from_be(c.port_be),
            taken_port: self.taken_port(),
            delivery: match (c.flags & meshnet_common::TUN_DELIVER_REDIRECT != 0, c.flags & meshnet_common::TUN_DELIVER_PEER != 0) {
                (false, _) => "stack",
                (true, false) => "redirect",
                (true, true) => "peer",
            },
            mtu: c.mtu,
            pod_cidrs: c
                .nets
                .iter()
                .filter(|n| n.mask_be != 0)
                .filter_map(|n| Ipv4Net::with_netmask(addr_of_be(n.addr_be), addr_of_be(n.mask_be)).ok())
                .map(|n| n.to_string())
                .collect(),
            node_addresses: c.hosts_be.iter().filter(|h| **h != 0).map(|h| addr_of_be(*h).to_string()).collect(),
        });
        let routes = self
            .current_routes()
            .into_iter()
            .map(|(net, n)| TunnelRouteRow {
                decap: if self.slotted(net, &n) { "slot" } else { "trie" },
                cidr: net.to_string(),
                peer: name(n.peer_id),
                node: addr_of_be(n.addr_be).to_string(),
                port: u16::from_be(n.port_be),
                source: addr_of_be(n.src_be).to_string(),
                ifindex: n.ifindex,
                mtu: n.mtu,
            })
            .collect();
        let nodes = self.current_nodes();
        let stats = self.peer_stats();
        let ids: BTreeSet<u32> = nodes.values().copied().chain(stats.keys().copied()).collect();
        let peers = ids
            .into_iter()
            .map(|id| {
                let s = stats.get(&id).copied().unwrap_or_default();
                TunnelPeerRow {
                    peer: name(id),
                    nodes: nodes.iter().filter(|(_, p)| **p == id).map(|(a, _)| a.to_string()).collect(),
                    tx_packets: s.tx_packets,
                    tx_bytes: s.tx_bytes,
                    rx_packets: s.rx_packets,
                    rx_bytes: s.rx_bytes,
                }
            })
            .collect();
        let lookups = self.port_lookups();
        let pod_ports = self
            .current_ports()
            .into_iter()
            .map(|(addr, p)| TunnelPortRow {
                address: addr.to_string(),
                ifindex: p.ifindex,
                pod_mac: p.pod_mac.map(|b| format!("{b:02x}")).join(":"),
                lookup: lookups.get(&addr).copied().unwrap_or("hash"),
            })
            .collect();
        let peer_ports = self.current_peer_ports().unwrap_or_default().into_iter().collect();
        TunnelDump { settings, routes, peers, pod_ports, peer_ports }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addr: [u8; 4], peer_id: u32, stats_slot: u16) -> TunnelNode {
        TunnelNode { addr_be: addr_be(Ipv4Addr::from(addr)), peer_id, stats_slot, ..TunnelNode::default() }
    }

    fn cidr(net: Ipv4Net) -> LocalNet {
        LocalNet { addr_be: addr_be(net.network()), mask_be: addr_be(net.netmask()) }
    }

    /// A slot says what the trie's longest match would: only CIDRs that overlap no other route,
    /// at most four a node, the lowest address of a slot, and no slot for a node whose routes
    /// disagree on its peer or counters.
    #[test]
    fn a_node_slot_holds_only_what_the_trie_would_answer_alike() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let a = node([192, 0, 2, 2], 7, 1);
        let b = node([192, 0, 2, 3], 8, 2);
        // The same low 12 bits as a, a higher address: a has the slot.
        let a_twin = node([192, 1, 2, 2], 7, 1);
        let mut wanted: BTreeMap<Ipv4Net, TunnelNode> = [
            (net("10.245.0.0/24"), a),
            (net("10.245.1.0/24"), a),
            // b's /24 holds a /28 of a: neither is slotted, the trie decides between them.
            (net("10.246.0.0/24"), b),
            (net("10.246.0.16/28"), a),
            (net("10.247.0.0/24"), b),
            (net("10.248.0.0/24"), a_twin),
        ]
        .into();
        let owners = node_slot_owners(&wanted);
        assert_eq!(owners.len(), 2, "{owners:?}");
        let sa = owners[&node_slot(a.addr_be)];
        assert_eq!((sa.addr_be, sa.peer_id, sa.stats_slot), (a.addr_be, 7, 1));
        assert_eq!(sa.nets, [cidr(net("10.245.0.0/24")), cidr(net("10.245.1.0/24")), LocalNet::NONE, LocalNet::NONE]);
        let sb = owners[&node_slot(b.addr_be)];
        assert_eq!(sb.nets, [cidr(net("10.247.0.0/24")), LocalNet::NONE, LocalNet::NONE, LocalNet::NONE]);
        assert_eq!(sb.seq, 0);

        // Six CIDRs: the first four by address are slotted, the others go to the trie.
        for i in 2..6 {
            wanted.insert(net(&format!("10.245.{i}.0/24")), a);
        }
        let sa = node_slot_owners(&wanted)[&node_slot(a.addr_be)];
        assert_eq!(sa.nets.map(|n| n.addr_be), [0, 1, 2, 3].map(|i| addr_be(Ipv4Addr::new(10, 245, i, 0))));

        // Routes of one node that name two counter slots (a sync between them): no slot for
        // it, and the next node of its slot has it.
        wanted.insert(net("10.245.9.0/24"), node([192, 0, 2, 2], 7, 3));
        assert_eq!(node_slot_owners(&wanted)[&node_slot(a.addr_be)].addr_be, a_twin.addr_be);
        // Nor for two peers.
        wanted.insert(net("10.245.9.0/24"), node([192, 0, 2, 2], 9, 1));
        assert_eq!(node_slot_owners(&wanted)[&node_slot(a.addr_be)].addr_be, a_twin.addr_be);
        // A route around another, however far up: neither.
        let wanted: BTreeMap<Ipv4Net, TunnelNode> = [(net("10.0.0.0/8"), b), (net("10.245.0.0/24"), a)].into();
        assert!(node_slot_owners(&wanted).is_empty());
    }
}
