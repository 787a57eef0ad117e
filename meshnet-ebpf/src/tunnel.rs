//! Tunnel mode: a pod's packet to a tunnel peer's pod CIDR leaves encapsulated in UDP to the
//! peer node that hosts the destination, at the peer's tunnel NodePort; the peer node's
//! uplink program takes the outer headers off and hands the packet, addresses untouched, to
//! its pod. There is no per-flow state on either side: every packet is routed by the
//! node tables the agent publishes, so a restart or an upgrade loses nothing.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::{BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_NET},
        bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNSUPP_LWT, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_change_tail},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use meshnet_common::{
    limits, node_slot, pod_port_slot, switch, tun_fast, tunnel, tunnel_sport, Counter, FlowKey, LocalNet, PodPort, TunnelConfig, TunnelNode, IPPROTO_TCP, IPPROTO_UDP,
    TUN_DELIVER_PEER, TUN_DELIVER_REDIRECT,
};

use crate::{
    maps::{count, TUN_CFG_SEQ, TUN_CONFIG, TUN_FAST, TUN_NODES, TUN_NODE_SLOTS, TUN_PEER_PORTS, TUN_PORTS, TUN_PORT_SLOTS, TUN_ROUTES, TUN_STATS},
    nat::PASS,
    parse::{self, Ipv4, ETH_HLEN, IP_DF, IP_MF, IP_MIN_HLEN, IP_OFFSET_MASK, TCP_SYN},
};

/// Set by the agent at load time (`names::GLOBAL_HAVE_REDIRECT_NEIGH`): the kernel has
/// `bpf_redirect_neigh` and `bpf_redirect_peer`, both 5.10. The verifier never walks the
/// branches of the value not set, so older kernels load calls to helpers they lack.
#[unsafe(no_mangle)]
static MN_HAVE_REDIRECT_NEIGH: u8 = 0;

#[inline(always)]
fn have_redirect_neigh() -> bool {
    // SAFETY: a global of the object's read-only data; volatile so that the load-time value
    // is read, not the compile-time 0.
    unsafe { core::ptr::read_volatile(&raw const MN_HAVE_REDIRECT_NEIGH) != 0 }
}

/// A packet split because it was too large is marked with this tag and, in the low 16 bits,
/// how many payload bytes its first part took; the marked copy comes round again through
/// `from_pod`, which drops those bytes and sends the rest. A pod cannot forge the mark: the
/// kernel clears it when a packet crosses into the host's namespace.
const SPLIT_TAG: u32 = 0x4d4e_0000;
const SPLIT_TAG_MASK: u32 = 0xffff_0000;
/// `bpf_skb_adjust_room` removes at most this many bytes at once.
const SPLIT_MAX: u32 = 0xff8;

/// The flags of the encapsulating `bpf_skb_adjust_room`: IPv4 in UDP, with meshnet's
/// header declared as the inner "L2" header so that GSO segments a large TCP send into
/// packets that each carry the whole outer stack.
const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | ((tunnel::HEADER_LEN as u64) << 56);

const AF_INET: u8 = 2;
const DROP: i32 = TC_ACT_SHOT;

/// The peer node whose pod CIDR holds `daddr_be`, for a tunnel peer.
#[inline(always)]
pub fn route(daddr_be: u32) -> Option<TunnelNode> {
    if crate::maps::switch_on(switch::NO_TUNNEL_ROUTES) {
        // Most nodes have no tunnel peer: no helper call for every packet they send.
        return None;
    }
    TUN_ROUTES.get(Key::new(32, daddr_be)).copied()
}

/// Whether `daddr_be:port_be` is a tunnel peer node's tunnel port, where a pod's own datagram
/// could pass for tunnel traffic: the port among the peers' (`names::TUN_PEER_PORTS`, an
/// inlined array read), then the address among their nodes. Only a peer node's: the ports
/// come from the remotes, and one that named 53 must not cut every pod off DNS.
#[inline(always)]
pub fn is_peer_tunnel(daddr_be: u32, port_be: u16) -> bool {
    let port = u32::from(u16::from_be(port_be));
    TUN_PEER_PORTS.get(port >> 6).is_some_and(|w| w & (1 << (port & 63)) != 0)
        // SAFETY: a lookup whose value is not read.
        && unsafe { TUN_NODES.get(&daddr_be) }.is_some()
}

#[inline(always)]
fn config() -> Option<TunnelConfig> {
    // SAFETY: a read-only copy of a value from a successful lookup; an update replaces the
    // value whole, and the old element is reused only after this RCU read section (see
    // PEERS in nat.rs), so this one stays valid.
    unsafe { TUN_CONFIG.get(&0) }.copied()
}

/// The settings for a tunnel packet: their seqlocked copy (`names::TUN_CFG_SEQ`, an array
/// read the verifier inlines) when the seqlock vouches for what was read, else their hash.
#[inline(always)]
fn settings() -> Option<TunnelConfig> {
    if let Some(p) = TUN_CFG_SEQ.get_ptr(0) {
        // SAFETY: a value pointer of an array map, valid for the program run. Volatile reads
        // keep the seqlock's order: `seq`, then the settings, then `seq` again.
        unsafe {
            use core::ptr::read_volatile as rv;
            let seq = rv(&raw const (*p).seq);
            if seq & 1 == 0 {
                let c = &raw const (*p).cfg;
                let mut cfg = TunnelConfig {
                    cluster_id: rv(&raw const (*c).cluster_id),
                    port_be: rv(&raw const (*c).port_be),
                    _pad: 0,
                    flags: rv(&raw const (*c).flags),
                    mtu: rv(&raw const (*c).mtu),
                    nets: [LocalNet::NONE; limits::MAX_NODE_CIDRS],
                    hosts_be: [0; limits::MAX_NODE_CIDRS],
                };
                let mut i = 0;
                while i < limits::MAX_NODE_CIDRS {
                    cfg.nets[i] = rv(&raw const (*c).nets[i]);
                    cfg.hosts_be[i] = rv(&raw const (*c).hosts_be[i]);
                    i += 1;
                }
                if cfg.port_be != 0 && rv(&raw const (*p).seq) == seq {
                    return Some(cfg);
                }
            }
        }
    }
    config()
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: the context's `__sk_buff`, valid for the whole program run.
    unsafe { (*ctx.skb.skb).mark }
}

/// Whether the skb is a GSO packet: its segments are cut after encapsulation, with the
/// overhead taken off their size by `bpf_skb_adjust_room`, so its length is no MTU problem.
/// More than one segment, not any: TCP sets `gso_segs` to 1 on every segment it sends whole,
/// and such a segment too large for the tunnel must get "fragmentation needed" like any
/// other packet (`gso_size`, which says it outright, is readable only from 5.7).
#[inline(always)]
fn is_gso(ctx: &TcContext) -> bool {
    // SAFETY: as above; `gso_segs` is in `__sk_buff` since 5.1.
    unsafe { (*ctx.skb.skb).gso_segs > 1 }
}

/// `skb->pkt_type` (linux/if_packet.h): a frame to the receiving device's own MAC, to the
/// broadcast address, to a multicast one.
const PACKET_HOST: u32 = 0;
const PACKET_BROADCAST: u32 = 1;
const PACKET_MULTICAST: u32 = 2;

#[inline(always)]
fn pkt_type(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).pkt_type }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// `from_pod`'s tunnel branch: `ip` is bound for `node`'s pod CIDR.
#[inline(always)]
pub fn encap(ctx: &TcContext, ip: &Ipv4, node: &TunnelNode) -> i32 {
    match encap_or_why(ctx, ip, node) {
        Ok(verdict) => verdict,
        Err(why) => {
            count(why);
            DROP
        }
    }
}

#[inline(always)]
fn encap_or_why(ctx: &TcContext, ip: &Ipv4, node: &TunnelNode) -> Result<i32, Counter> {
    // The id the agent publishes beside the settings; their hash lookup only where it has not.
    let cluster_id = match TUN_FAST.get(tun_fast::CLUSTER_ID) {
        Some(&id) if id != 0 => id,
        _ => config().ok_or(Counter::TunnelEncapFailed)?.cluster_id,
    };
    if !sends_as_itself(ip.saddr_be, ifindex(ctx)) {
        return Err(Counter::SpoofedSource);
    }
    let tag = mark(ctx);
    let remainder = tag & SPLIT_TAG_MASK == SPLIT_TAG;
    if remainder {
        ctx.set_mark(0);
        drop_first_part(ctx, tag & !SPLIT_TAG_MASK)?;
    }
    let mut key = FlowKey::new(ip.saddr_be, ip.daddr_be, 0, 0, ip.proto);
    // A remainder is a later fragment now, whatever `ip` said of the packet before.
    if !remainder && ip.has_l4 && (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP) {
        if let Ok(Some(l4)) = parse::ports(ctx, ip) {
            key = FlowKey::new(ip.saddr_be, ip.daddr_be, l4.sport_be, l4.dport_be, ip.proto);
            if l4.tcp_flags & TCP_SYN != 0 && clamp(ctx, ip, &l4, node.mtu) {
                count(Counter::TunnelMssClamped);
            }
        }
    }
    let mut hdr = parse::ip_header(ctx).ok_or(Counter::TunnelEncapFailed)?;
    if u32::from(hdr.tot_len) + tunnel::OVERHEAD > node.mtu && !is_gso(ctx) {
        if hdr.frag_off & IP_DF != 0 {
            return frag_needed(ctx, ip, node);
        }
        split(ctx, &hdr, ip.proto, node)?;
        hdr = parse::ip_header(ctx).ok_or(Counter::TunnelEncapFailed)?;
    }
    // A UDP GSO send (UDP_SEGMENT, as QUIC stacks do) keeps its segment size: the kernel
    // refuses to shrink it, since the size delimits the datagrams. Its datagrams fit the
    // tunnel when the sender sized them for the path (its PMTU), not for the pod's MTU.
    let flags = if ip.proto == IPPROTO_UDP && is_gso(ctx) { ENCAP_FLAGS | u64::from(BPF_F_ADJ_ROOM_FIXED_GSO) } else { ENCAP_FLAGS };
    ctx.adjust_room(tunnel::OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags).map_err(|_| Counter::TunnelEncapFailed)?;
    parse::write_outer(ctx, hdr.tos, hdr.tot_len, node.src_be, node.addr_be, tunnel_sport(&key), node.port_be, cluster_id)
        .map_err(|()| Counter::TunnelEncapFailed)?;
    add_stats(node.stats_slot, u64::from(hdr.tot_len), true);
    count(Counter::TunnelEncap);
    transmit(ctx, node)
}

/// Whether a pod's packet on `ifindex` carries a source the peer may take for that pod: the
/// receiving node checks only that the source is one of this cluster's pods, so a pod that
/// wrote another's address (`CAP_NET_RAW`) would pass NetworkPolicy there in its name. The
/// source must be the interface's own pod, or, for a pod the agent has not read yet, an
/// address of this node's pod CIDRs that no pod interface holds and that could be a pod's
/// (not the node's own there, nor a CIDR's network or broadcast address).
#[inline(always)]
fn sends_as_itself(src_be: u32, ifindex: u32) -> bool {
    match pod_behind(src_be, ifindex) {
        Some(own) => own,
        None => settings().is_some_and(|c| is_node_local(&c, src_be)),
    }
}

/// Lowers the MSS of a SYN so that a full segment fits the tunnel toward a link of `mtu`.
#[inline(always)]
fn clamp(ctx: &TcContext, ip: &Ipv4, l4: &parse::Ports, mtu: u32) -> bool {
    let max = mtu.saturating_sub(tunnel::OVERHEAD + tunnel::IP_TCP_LEN).min(u32::from(u16::MAX));
    max != 0 && parse::clamp_mss(ctx, ip, l4, max as u16)
}

/// Sends the encapsulated packet out of the interface toward `node`.
#[inline(always)]
fn transmit(ctx: &TcContext, node: &TunnelNode) -> Result<i32, Counter> {
    if have_redirect_neigh() {
        // SAFETY: a helper call without a next hop of our own: the kernel routes the outer
        // destination and resolves its neighbour, queueing the packet until it has.
        return Ok(unsafe { bpf_redirect_neigh(node.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    let hop = fib_lookup_v4(ctx, node.src_be, node.addr_be, node.ifindex, BPF_FIB_LOOKUP_OUTPUT);
    match hop.rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            parse::set_macs(ctx, hop.dmac, hop.smac).map_err(|()| Counter::TunnelEncapFailed)?;
            // SAFETY: a helper call with plain values.
            Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Counter::TunnelNoNeighbour),
        _ => Err(Counter::TunnelEncapFailed),
    }
}

/// The next hop of an IPv4 route: the kernel's FIB lookup (`flags`: its `BPF_FIB_LOOKUP_*`).
/// The helper's 64-byte argument is filled word by word through a pointer and never moved:
/// a zeroing literal or a copy compiles to a `memset` call, which kernels before 5.10 refuse
/// beside tail calls (the logging build has them).
#[inline(always)]
fn fib_lookup_v4(ctx: &TcContext, src_be: u32, dst_be: u32, ifindex: u32, flags: u32) -> NextHop {
    let mut p = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    let w = p.as_mut_ptr().cast::<u64>();
    // Offsets: family 0, ifindex 8, ipv4_src 16, ipv4_dst 32; everything else zero.
    let words = [u64::from(AF_INET), u64::from(ifindex), u64::from(src_be), 0, u64::from(dst_be), 0, 0, 0];
    // SAFETY: eight words fill the 64-byte struct, any bit pattern valid; the helper gets
    // a pointer to it with its size, and its results are read through the same pointer.
    unsafe {
        let mut i = 0;
        while i < 8 {
            core::ptr::write_volatile(w.add(i), words[i]);
            i += 1;
        }
        let rc = fib_lookup(ctx.skb.skb.cast(), p.as_mut_ptr(), size_of::<bpf_fib_lookup>() as i32, flags) as u32;
        let r = p.as_ptr();
        NextHop { rc, ifindex: core::ptr::read_volatile(&raw const (*r).ifindex), dmac: (*r).dmac, smac: (*r).smac }
    }
}

/// What [`fib_lookup_v4`] found.
struct NextHop {
    rc: u32,
    ifindex: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
}

/// Adds a packet to the peer counters of `slot` (one more than the array index; 0: none).
#[inline(always)]
fn add_stats(slot: u16, bytes: u64, tx: bool) {
    let Some(index) = u32::from(slot).checked_sub(1) else {
        return;
    };
    if let Some(s) = TUN_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU value, written only by this CPU with preemption disabled.
        unsafe {
            if tx {
                (*s).tx_packets += 1;
                (*s).tx_bytes += bytes;
            } else {
                (*s).rx_packets += 1;
                (*s).rx_bytes += bytes;
            }
        }
    }
}

/// A packet with DF set that the tunnel cannot carry: it becomes an ICMP "fragmentation
/// needed" back to the pod, announcing what fits, so that its path MTU discovery works.
#[inline(always)]
fn frag_needed(ctx: &TcContext, ip: &Ipv4, node: &TunnelNode) -> Result<i32, Counter> {
    let hdr = parse::ip_header(ctx).ok_or(Counter::TunnelEncapFailed)?;
    if hdr.ihl != IP_MIN_HLEN {
        // An ICMP error quotes the header whole; with options it would not be the fixed
        // size built here. Such packets are rare enough to drop.
        return Err(Counter::TunnelEncapFailed);
    }
    let mtu = node.mtu.saturating_sub(tunnel::OVERHEAD).min(u32::from(u16::MAX)) as u16;
    let sender = ip.saddr_be;
    // SAFETY: the context's skb; the helper bounds the new length itself.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, parse::ICMP_QUOTE_END, 0) } != 0 {
        return Err(Counter::TunnelEncapFailed);
    }
    ctx.adjust_room(parse::ICMP_ERROR_ROOM, BPF_ADJ_ROOM_MAC, 0).map_err(|_| Counter::TunnelEncapFailed)?;
    parse::write_frag_needed(ctx, sender, node.src_be, mtu).map_err(|()| Counter::TunnelEncapFailed)?;
    count(Counter::TunnelFragNeeded);
    // SAFETY: a helper call with plain values: out of this same interface, to the pod.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}

/// A packet without DF that the tunnel cannot carry whole: a copy marked with the split
/// point goes round again (see [`SPLIT_TAG`]), and this one is cut to a first fragment
/// that fits. The pod that receives them reassembles the datagram, as after any router
/// that fragments.
#[inline(always)]
fn split(ctx: &TcContext, hdr: &parse::IpHeader, proto: u8, node: &TunnelNode) -> Result<(), Counter> {
    if hdr.ihl != IP_MIN_HLEN {
        return Err(Counter::TunnelEncapFailed);
    }
    let first = (node.mtu.saturating_sub(tunnel::OVERHEAD + IP_MIN_HLEN as u32) & !7).min(SPLIT_MAX);
    let payload = u32::from(hdr.tot_len).saturating_sub(IP_MIN_HLEN as u32);
    if first == 0 || payload <= first {
        return Err(Counter::TunnelEncapFailed);
    }
    // A whole datagram carries its L4 checksum in this, the first fragment. Before the copy
    // goes round, so that a failure drops the datagram whole, not half of it; the copy loses
    // the L4 header with the first part.
    if hdr.frag_off & (IP_MF | IP_OFFSET_MASK) == 0 {
        parse::split_keeps_l4_checksum(ctx, proto, usize::from(hdr.tot_len), first as usize).map_err(|()| Counter::TunnelEncapFailed)?;
    }
    ctx.set_mark(SPLIT_TAG | first);
    let cloned = ctx.clone_redirect(ifindex(ctx), u64::from(BPF_F_INGRESS));
    ctx.set_mark(0);
    cloned.map_err(|_| Counter::TunnelEncapFailed)?;
    let len = IP_MIN_HLEN as u32 + first;
    // SAFETY: the context's skb; the helper bounds the new length itself.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, ETH_HLEN as u32 + len, 0) } != 0 {
        return Err(Counter::TunnelEncapFailed);
    }
    parse::set_ip_len_frag(ctx, len as u16, hdr.frag_off | IP_MF).map_err(|()| Counter::TunnelEncapFailed)?;
    count(Counter::TunnelFragmented);
    Ok(())
}

/// The copy [`split`] sent round: its first `first` payload bytes went in the first
/// fragment, the rest is this one, at the fragment offset after them.
#[inline(always)]
fn drop_first_part(ctx: &TcContext, first: u32) -> Result<(), Counter> {
    let hdr = parse::ip_header(ctx).ok_or(Counter::TunnelEncapFailed)?;
    let payload = u32::from(hdr.tot_len).saturating_sub(IP_MIN_HLEN as u32);
    if hdr.ihl != IP_MIN_HLEN || first == 0 || first & 7 != 0 || first >= payload {
        return Err(Counter::TunnelEncapFailed);
    }
    ctx.adjust_room(-(first as i32), BPF_ADJ_ROOM_NET, 0).map_err(|_| Counter::TunnelEncapFailed)?;
    let offset = (hdr.frag_off & IP_OFFSET_MASK) + (first / 8) as u16;
    let frag = (hdr.frag_off & !IP_OFFSET_MASK) | (offset & IP_OFFSET_MASK);
    parse::set_ip_len_frag(ctx, (u32::from(hdr.tot_len) - first) as u16, frag).map_err(|()| Counter::TunnelEncapFailed)
}

/// tc ingress on an uplink: takes tunnel packets off the wire, before netfilter, and
/// delivers their inner packet. Anything sent to this node's tunnel port that fails a check
/// is dropped and counted; everything else, a packet the node routes on to another host's
/// tunnel port included, passes untouched.
#[inline(always)]
pub fn decap(ctx: &TcContext) -> i32 {
    // The uplink carries all of the node's traffic: the settings are read only for UDP to the
    // tunnel port, which an inlined array read tells (`names::TUN_FAST`).
    let Ok(Some(ip)) = parse::ipv4(ctx) else {
        return PASS;
    };
    if ip.proto != IPPROTO_UDP || !ip.has_l4 {
        return PASS;
    }
    let Some(dport_be) = parse::udp_dport(ctx, &ip) else {
        return PASS;
    };
    match TUN_FAST.get(tun_fast::PORT) {
        Some(&port) if port != 0 && port == u32::from(dport_be) => {}
        _ => return PASS,
    }
    // meshnet sends tunnel packets to one node's MAC, never to a broadcast or multicast one.
    let pkt_type = pkt_type(ctx);
    if pkt_type == PACKET_BROADCAST || pkt_type == PACKET_MULTICAST {
        count(Counter::TunnelNotForNode);
        return DROP;
    }
    // A frame to another host's MAC (a switch flooding it, an uplink in promiscuous mode) is
    // counted as such whatever the checks say: on a LAN, frames flooded to every node are
    // no attack on this one.
    let to_this_host = pkt_type == PACKET_HOST;
    // The published port and the settings disagree only while the agent changes them: a
    // packet to the port the uplink takes is meshnet's either way, and would only meet a
    // closed port in the stack, unless the node routes it on.
    let Some(cfg) = settings().filter(|c| c.port_be == dport_be) else {
        if to_this_host && routed_on(ctx, &ip) {
            return PASS;
        }
        count(Counter::TunnelPortChanging);
        return DROP;
    };
    match decap_or_why(ctx, &ip, &cfg, to_this_host) {
        Ok(verdict) => verdict,
        Err(why) => {
            count(if to_this_host { why } else { Counter::TunnelNotForNode });
            DROP
        }
    }
}

#[inline(always)]
fn decap_or_why(ctx: &TcContext, ip: &Ipv4, cfg: &TunnelConfig, to_this_host: bool) -> Result<i32, Counter> {
    // meshnet never sends fragments or outer options.
    let plain = !ip.is_fragment && ip.l4_off == ETH_HLEN + IP_MIN_HLEN;
    let t = if plain { parse::tunnel_packet(ctx, ip).ok() } else { None };
    // The usual sender is the node that hosts the inner source: its slot says so with an
    // array read; else the inner source's route, which the source check needs anyway, names
    // the node's address and peer. The node table is read only when neither matches (a
    // packet to refuse, whose reason the checks find in their order, or a node of the peer
    // sending for a pod another of its nodes hosts).
    let usual = match t {
        Some(t) if meshnet_header_ok(&t) && inner_header_ok(&t) => {
            let cluster = u32::from_be(t.cluster_be);
            slotted_sender(ip.saddr_be, cluster, t.inner_saddr_be)
                .or_else(|| route(t.inner_saddr_be).filter(|n| n.addr_be == ip.saddr_be && n.peer_id == cluster).map(|n| n.stats_slot))
        }
        _ => None,
    };
    let (t, stats_slot) = match (t, usual) {
        (Some(t), Some(stats_slot)) => (t, stats_slot),
        _ => match checked_sender(ip, t) {
            Ok((t, n)) => (t, n.stats_slot),
            Err(why) => return refused(ctx, ip, to_this_host, why),
        },
    };
    if !is_node_local(cfg, t.inner_daddr_be) {
        return refused(ctx, ip, to_this_host, Counter::TunnelNotLocal);
    }
    // As on the way in: a UDP GSO packet (two veths on one host pass them whole) keeps its
    // segment size; a TCP one gets back the 36 bytes its segments lost.
    let flags = if t.inner_proto == IPPROTO_UDP && is_gso(ctx) { u64::from(BPF_F_ADJ_ROOM_FIXED_GSO) } else { 0 };
    ctx.adjust_room(-(tunnel::OVERHEAD as i32), BPF_ADJ_ROOM_MAC, flags).map_err(|_| Counter::TunnelDecapFailed)?;
    if t.maybe_syn {
        if let Ok(Some(inner)) = parse::ipv4(ctx) {
            if inner.proto == IPPROTO_TCP {
                if let Ok(Some(l4)) = parse::ports(ctx, &inner) {
                    if l4.tcp_flags & TCP_SYN != 0 && clamp(ctx, &inner, &l4, cfg.mtu) {
                        count(Counter::TunnelMssClamped);
                    }
                }
            }
        }
    }
    if !to_this_host {
        // A frame to another host's MAC goes to the stack, which decides as for any such frame:
        // `ip_rcv` drops it, unless a bridge or a macvlan above the uplink owns the MAC (the
        // node's address is there). A redirect would hand it to a pod whatever the MAC.
        count(Counter::TunnelNotForNode);
        return Ok(TC_ACT_OK);
    }
    let verdict = deliver(ctx, cfg, t.inner_saddr_be, t.inner_daddr_be)?;
    add_stats(stats_slot, u64::from(t.inner_len), false);
    count(Counter::TunnelDecap);
    Ok(verdict)
}

/// A packet to the tunnel port that failed a check (`why`), before anything was changed:
/// refused, unless it is not this node's to check. One that the node routes on to another
/// host (a pod of a routed pod network, a host behind a node that is also a router) is no
/// tunnel packet of this node's, whatever it carries, and passes untouched as it would
/// without meshnet (see [`routed_on`] for the exceptions). Only refusals pay for the lookup; a frame to another host's MAC is the stack's
/// to drop either way.
#[inline(always)]
fn refused(ctx: &TcContext, ip: &Ipv4, to_this_host: bool, why: Counter) -> Result<i32, Counter> {
    if to_this_host && routed_on(ctx, ip) {
        Ok(PASS)
    } else {
        Err(why)
    }
}

/// Whether the node would forward `ip` to another host rather than take it: the kernel's FIB
/// lookup finds a route on (through a neighbour not resolved yet, to a link whose MTU it
/// exceeds, or into a lightweight tunnel, too). One of the node's own addresses is local
/// ("not forwarded"), and so is every address to an uplink that does not forward: the stack
/// would not route on what came in there. Never for:
/// - a multicast, reserved or limited-broadcast address, which the stack takes in although
///   the FIB finds them a unicast route;
/// - a tunnel peer's node: meshnet sends this cluster's tunnel packets from each node's own
///   uplink, so one on its way to a peer through this node is a forgery in the cluster's
///   name, which the peer would take from a node it knows.
#[inline(always)]
fn routed_on(ctx: &TcContext, ip: &Ipv4) -> bool {
    if u32::from_be(ip.daddr_be) >> 28 >= 0xe {
        return false;
    }
    // SAFETY: a lookup whose value is not read.
    if unsafe { TUN_NODES.get(&ip.daddr_be) }.is_some() {
        return false;
    }
    let hop = fib_lookup_v4(ctx, ip.saddr_be, ip.daddr_be, ifindex(ctx), 0);
    matches!(hop.rc, BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED | BPF_FIB_LKUP_RET_UNSUPP_LWT)
}

/// Every check of a tunnel packet's sender, in the order that names the reason for refusing
/// it: a known peer node, a valid header, that node's cluster, an inner source in its peer's
/// CIDRs. `t` is `None` for a fragment, outer options or a truncated packet.
#[inline(always)]
fn checked_sender(ip: &Ipv4, t: Option<parse::TunnelPacket>) -> Result<(parse::TunnelPacket, TunnelNode), Counter> {
    // SAFETY: a read-only copy of a value from a successful lookup.
    let peer_id = unsafe { TUN_NODES.get(&ip.saddr_be) }.copied().ok_or(Counter::TunnelUnknownNode)?;
    let t = t.ok_or(Counter::TunnelBadHeader)?;
    if !meshnet_header_ok(&t) {
        return Err(Counter::TunnelBadHeader);
    }
    if u32::from_be(t.cluster_be) != peer_id {
        return Err(Counter::TunnelWrongCluster);
    }
    if !inner_header_ok(&t) {
        return Err(Counter::TunnelBadHeader);
    }
    match route(t.inner_saddr_be) {
        Some(n) if n.peer_id == peer_id => Ok((t, n)),
        _ => Err(Counter::TunnelSpoofedSource),
    }
}

/// The counter slot of the sender `saddr_be` when its slot (`names::TUN_NODE_SLOTS`, an array
/// read the verifier inlines) names it as a node of `cluster` that hosts `inner_saddr_be`:
/// what the inner source's route would say, without the trie. `None` sends the packet to the
/// trie: no slot for the sender, a source the slot does not hold, a read its seqlock cannot
/// vouch for.
#[inline(always)]
fn slotted_sender(saddr_be: u32, cluster: u32, inner_saddr_be: u32) -> Option<u16> {
    let s = TUN_NODE_SLOTS.get_ptr(node_slot(saddr_be))?;
    // SAFETY: a value pointer of an array map, valid for the program run. Volatile reads keep
    // the seqlock's order: `seq`, then the value, then `seq` again.
    unsafe {
        use core::ptr::read_volatile as rv;
        // An empty slot holds the address 0, the peer id 0 and CIDRs that hold nothing but with
        // a mask of 0. A read that mixed its values with a node's, on a CPU that reorders
        // loads (the agent changes a slot only through empty), must not take a sender: so no
        // sender at 0, no cluster id 0 (a peer whose name hashed to 0 would be taken by the
        // trie) and no inner source 255.255.255.255 is taken here.
        let seq = rv(&raw const (*s).seq);
        if seq & 1 != 0
            || saddr_be == 0
            || cluster == 0
            || inner_saddr_be == u32::MAX
            || rv(&raw const (*s).addr_be) != saddr_be
            || rv(&raw const (*s).peer_id) != cluster
        {
            return None;
        }
        let stats_slot = rv(&raw const (*s).stats_slot);
        let mut hosts = false;
        let mut i = 0;
        while i < limits::MAX_NODE_CIDRS {
            // A mask of 0 holds nothing: an empty slot's CIDRs, and a zeroed slot's.
            let n = rv(&raw const (*s).nets[i]);
            hosts |= n.mask_be != 0 && inner_saddr_be & n.mask_be == n.addr_be;
            i += 1;
        }
        (hosts && rv(&raw const (*s).seq) == seq).then_some(stats_slot)
    }
}

#[inline(always)]
fn meshnet_header_ok(t: &parse::TunnelPacket) -> bool {
    t.magic_be == tunnel::MAGIC.to_be() && t.version == tunnel::VERSION
}

/// An IPv4 inner header whose length is exactly what the outer packet carries after its 36
/// bytes: nothing smuggled after it, nothing missing.
#[inline(always)]
fn inner_header_ok(t: &parse::TunnelPacket) -> bool {
    t.inner_ver_ihl >> 4 == 4
        && usize::from(t.inner_ver_ihl & 0x0f) * 4 >= IP_MIN_HLEN
        && u32::from(t.inner_len) + tunnel::OVERHEAD == u32::from(t.outer_len)
}

/// Hands a decapsulated packet to its pod: straight to the pod's interface when asked and
/// the kernel can (no netfilter on the way), else through the stack, which routes it as if
/// it had arrived unencapsulated (FORWARD rules and NetworkPolicy see it).
///
/// A redirect bypasses the forwarding path, TTL and FORWARD rules included, so it must not
/// send a packet back out of the uplink it came in on: an address of the node's pod CIDRs
/// routed there has no pod behind it (a node whose bridge does not exist yet, or a default
/// route), and is refused, where the stack would have sent it on to the LAN. A pod the agent
/// has not read yet still gets through, along its route (its own veth on a routed CNI, the
/// bridge otherwise).
#[inline(always)]
fn deliver(ctx: &TcContext, cfg: &TunnelConfig, src_be: u32, dst_be: u32) -> Result<i32, Counter> {
    if cfg.flags & TUN_DELIVER_REDIRECT == 0 {
        return Ok(TC_ACT_OK);
    }
    // Through the pod's own port: through a bridge (the route's device behind most CNIs) a
    // GSO packet would be segmented in software (see `names::TUN_PORTS`). Out of the host end
    // of its veth, whose qdisc and tc egress see it; with `delivery: peer` from 5.10 straight
    // into the pod's end, which skips them and the backlog queue (the port table holds only
    // veths whose other end is in another namespace, as `bpf_redirect_peer` needs).
    if let Some(p) = pod_port(dst_be) {
        if parse::set_macs(ctx, p.pod_mac, p.host_mac).is_ok() {
            let peer = cfg.flags & TUN_DELIVER_PEER != 0 && have_redirect_neigh();
            // SAFETY: helper calls with plain values.
            return Ok(unsafe { if peer { bpf_redirect_peer(p.ifindex, 0) } else { bpf_redirect(p.ifindex, 0) } } as i32);
        }
    }
    let hop = fib_lookup_v4(ctx, src_be, dst_be, ifindex(ctx), 0);
    let found = hop.rc == BPF_FIB_LKUP_RET_SUCCESS || hop.rc == BPF_FIB_LKUP_RET_NO_NEIGH;
    // Before 5.10 a lookup that finds no neighbour leaves the interface as it was given (the
    // uplink); such kernels have no `bpf_redirect_neigh` either, and pass it to the stack.
    let knows_device = hop.rc == BPF_FIB_LKUP_RET_SUCCESS || have_redirect_neigh();
    if found && knows_device && hop.ifindex == ifindex(ctx) {
        return Err(Counter::TunnelNoPod);
    }
    if have_redirect_neigh() && found {
        // SAFETY: a helper call without a next hop: the kernel resolves the pod's address.
        return Ok(unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    if hop.rc == BPF_FIB_LKUP_RET_SUCCESS && parse::set_macs(ctx, hop.dmac, hop.smac).is_ok() {
        // SAFETY: a helper call with plain values.
        return Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32);
    }
    Ok(TC_ACT_OK)
}

/// The interface of the pod at `addr_be`: from its slot (`names::TUN_PORT_SLOTS`, an array
/// read the verifier inlines) when the slot holds that pod and its seqlock vouches for what
/// was read, else from the port table's hash.
#[inline(always)]
pub(crate) fn pod_port(addr_be: u32) -> Option<PodPort> {
    if let Some(s) = TUN_PORT_SLOTS.get_ptr(pod_port_slot(addr_be)) {
        // SAFETY: a value pointer of an array map, valid for the program run. Volatile reads
        // keep the seqlock's order: `seq`, then the value, then `seq` again.
        unsafe {
            use core::ptr::read_volatile as rv;
            let seq = rv(&raw const (*s).seq);
            if seq & 1 == 0 && rv(&raw const (*s).addr_be) == addr_be {
                let p = &raw const (*s).port;
                let port = PodPort { ifindex: rv(&raw const (*p).ifindex), pod_mac: rv(&raw const (*p).pod_mac), host_mac: rv(&raw const (*p).host_mac) };
                // An interface index of 0 is an empty slot's, read half (a CPU that reorders
                // loads, while the slot is being filled): the hash answers instead.
                if rv(&raw const (*s).seq) == seq && port.ifindex != 0 {
                    return Some(port);
                }
            }
        }
    }
    // SAFETY: a read-only copy of a value from a successful lookup.
    unsafe { TUN_PORTS.get(&addr_be) }.copied()
}

/// Whether the pod at `addr_be` is the one behind the pod interface `ifindex` (`None`: no
/// pod interface holds the address). A slot that names another interface may be stale (an
/// agent that crashed between its writes of the hash and the slot): the hash decides then,
/// a lookup that only a packet from another interface's address pays.
#[inline(always)]
pub(crate) fn pod_behind(addr_be: u32, ifindex: u32) -> Option<bool> {
    match pod_port(addr_be) {
        Some(p) if p.ifindex == ifindex => Some(true),
        // SAFETY: a read-only copy of a value from a successful lookup.
        Some(_) => unsafe { TUN_PORTS.get(&addr_be) }.map(|p| p.ifindex == ifindex),
        None => None,
    }
}

/// Whether `addr_be` is one of this node's pods: inside its pod CIDRs, and neither one of the
/// node's own addresses there nor a CIDR's network or broadcast address, which the stack
/// would take for the node itself.
#[inline(always)]
fn is_node_local(cfg: &TunnelConfig, addr_be: u32) -> bool {
    let pod = |n: &LocalNet| {
        let host = !n.mask_be;
        // Only a CIDR with two host bits or more has a network and a broadcast address.
        addr_be & n.mask_be == n.addr_be && (u32::from_be(host) < 3 || (addr_be != n.addr_be && addr_be != n.addr_be | host))
    };
    let own = |h: u32| h != 0 && h == addr_be;
    (pod(&cfg.nets[0]) || pod(&cfg.nets[1]) || pod(&cfg.nets[2]) || pod(&cfg.nets[3]))
        && !(own(cfg.hosts_be[0]) || own(cfg.hosts_be[1]) || own(cfg.hosts_be[2]) || own(cfg.hosts_be[3]))
}
