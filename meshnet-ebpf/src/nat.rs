//! Translation: flow state, gateway choice, collision remapping and the rewrites.
//!
//! The forward path looks up flow state before the route trie, so the hot path (a packet
//! of an established flow) costs one hash lookup whatever the number of remote CIDRs; the
//! trie is only walked for a flow's first packet and for traffic meshnet does not own.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use meshnet_common::{
    gateway_start, ip_summed, limits, remap_port, Counter, FlowKey, FragKey, FragPorts, NatFwd, NatRev, FLOW_FIN_PEER, FLOW_FIN_POD,
    FLOW_REMAPPED, FLOW_RST, FLOW_UNANSWERED, GW_UP, IPPROTO_ICMP, IPPROTO_UDP,
};

use crate::{
    log,
    maps::{count, CLOCK, FRAGS, GW_PORTS, LOCAL, NAT_FWD, NAT_REV, PEERS, ROUTES},
    parse::{self, Addr, Ipv4, Ports, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Verdict for traffic meshnet does not own: let the next tc program (or tcx link) decide.
pub const PASS: i32 = TC_ACT_UNSPEC;
/// Verdict for a packet meshnet translated.
const DONE: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;

/// `from_pod`: what a pod sends.
#[inline(always)]
pub fn egress_from_pod(ctx: &TcContext) -> i32 {
    let ip = match parse::ipv4(ctx) {
        Ok(Some(ip)) => ip,
        Ok(None) => return PASS,
        Err(bad) => {
            // Untranslatable and bound for a remote CIDR: sent as it is, it would leave by the
            // default route still addressed to a remote pod.
            return match bad.daddr_be {
                Some(d) if is_remote(d) => {
                    let verdict = counted2(bad.counter, Counter::RemoteParseError, DROP);
                    log::dropped(ctx, bad.counter, 0, 0, 0, d, 0, verdict)
                }
                _ => counted(bad.counter, PASS),
            };
        }
    };
    if is_local(ip.daddr_be) {
        // Between this cluster's pods: never meshnet's, and most of a node's packets.
        return PASS;
    }
    if let Some(node) = crate::tunnel::route(ip.daddr_be) {
        // A tunnel peer's pod: any protocol, fragments included, carried whole.
        return crate::tunnel::encap(ctx, &ip, &node);
    }
    if !ip.has_l4 {
        // A later fragment: it follows its first fragment's translation.
        return later_fragment_fwd(ctx, &ip);
    }
    let l4 = match parse::ports(ctx, &ip) {
        Ok(Some(l4)) => l4,
        Ok(None) => {
            // ICMP (ping), SCTP, ...: there is no port to translate them by.
            return if is_remote(ip.daddr_be) { drop_packet(ctx, Counter::UnsupportedProto, &ip, None) } else { PASS };
        }
        Err(c) => {
            return if is_remote(ip.daddr_be) {
                let verdict = counted2(c, Counter::RemoteParseError, DROP);
                log::dropped(ctx, c, ip.proto, ip.saddr_be, 0, ip.daddr_be, 0, verdict)
            } else {
                counted(c, PASS)
            };
        }
    };
    let key = FlowKey::new(ip.saddr_be, ip.daddr_be, l4.sport_be, l4.dport_be, ip.proto);
    let now = now_ns();
    let (fwd, new) = match NAT_FWD.get_ptr_mut(key) {
        Some(fwd) => {
            // SAFETY: a map value pointer from a successful lookup of a map whose elements are
            // freed only after an RCU grace period; concurrent writers only touch the
            // timestamp and flag bits, where a lost update is harmless. The entry is written
            // only when something changed: the clock ticks once a second, so an established
            // flow's packets write nothing in between.
            let cur = unsafe { *fwd };
            let Some(owner) = flow_owner(cur.ifindex, ip.saddr_be, ifindex(ctx)) else {
                // Another interface's flow: a pod posing as another pod, whose close bits and
                // timestamps it must not touch (a forged RST would get the flow expired).
                return drop_packet(ctx, Counter::SpoofedSource, &ip, Some(&l4));
            };
            // SAFETY: as above.
            let (fwd, idle, rst_was) = unsafe {
                let mut cur = cur;
                let idle = now.saturating_sub(cur.last_seen_ns) >= limits::HALF_CHECK_NS;
                let rst_was = cur.flags & FLOW_RST != 0;
                if cur.ifindex != owner {
                    cur.ifindex = owner;
                    (*fwd).ifindex = owner;
                }
                if now > cur.last_seen_ns {
                    cur.last_seen_ns = now;
                    (*fwd).last_seen_ns = now;
                }
                let flags = cur.flags;
                note_tcp_flags(&mut cur.flags, l4.tcp_flags, FLOW_FIN_POD);
                if cur.flags != flags {
                    (*fwd).flags = cur.flags;
                }
                (cur, idle, rst_was)
            };
            let rst_now = fwd.flags & FLOW_RST != 0;
            let reopens = reopens(l4.tcp_flags);
            if idle || rst_was != rst_now || reopens {
                check_rev(&key, &fwd, now, rst_now, reopens);
            }
            (fwd, false)
        }
        None => match new_flow(&key, ifindex(ctx), now, l4.tcp_flags) {
            Ok(Some(fwd)) => (fwd, true),
            Ok(None) if ip.proto == IPPROTO_UDP && crate::tunnel::is_peer_tunnel(ip.daddr_be, l4.dport_be) => {
                return drop_packet(ctx, Counter::TunnelForged, &ip, Some(&l4));
            }
            Ok(None) => return PASS,
            Err((c, verdict)) => {
                count(c);
                return if verdict == DROP { log::refused(ctx, c, &key, verdict) } else { verdict };
            }
        },
    };
    if rewrite_fwd(ctx, &ip, &l4, &fwd).is_err() {
        return drop_packet(ctx, Counter::RewriteFailed, &ip, Some(&l4));
    }
    if ip.is_fragment {
        // The first fragment carries the ports; the rest of the datagram finds them here.
        remember_fragment(&ip, &l4);
    }
    if new {
        return log::new_flow(ctx, &key, fwd.gw_addr_be, fwd.gw_port_be, fwd.nat_sport_be, DONE);
    }
    DONE
}

/// Records the ports of a first fragment under the datagram's identity (as it arrived).
#[inline(always)]
fn remember_fragment(ip: &Ipv4, l4: &Ports) {
    let key = FragKey { src_be: ip.saddr_be, dst_be: ip.daddr_be, id_be: ip.id_be, proto: ip.proto, _pad: 0 };
    let _ = FRAGS.insert(key, FragPorts { sport_be: l4.sport_be, dport_be: l4.dport_be }, BPF_ANY as u64);
}

/// The ports of the datagram a later fragment belongs to, from its first fragment.
#[inline(always)]
fn fragment_ports(ip: &Ipv4) -> Option<FragPorts> {
    let key = FragKey { src_be: ip.saddr_be, dst_be: ip.daddr_be, id_be: ip.id_be, proto: ip.proto, _pad: 0 };
    // SAFETY: a read-only copy of a value from a successful lookup.
    unsafe { FRAGS.get(key) }.copied()
}

/// A later fragment from a pod: only its destination address changes (the ports, which a
/// remap may change, are in the first fragment). Without its first fragment it cannot be
/// told which flow it belongs to: dropped if bound for a remote CIDR.
#[inline(always)]
fn later_fragment_fwd(ctx: &TcContext, ip: &Ipv4) -> i32 {
    let fwd = fragment_ports(ip).and_then(|p| {
        let key = FlowKey::new(ip.saddr_be, ip.daddr_be, p.sport_be, p.dport_be, ip.proto);
        // SAFETY: as above.
        unsafe { NAT_FWD.get(key) }.copied()
    });
    let Some(fwd) = fwd else {
        return if is_remote(ip.daddr_be) { drop_packet(ctx, Counter::FragmentDropped, ip, None) } else { PASS };
    };
    if flow_owner(fwd.ifindex, ip.saddr_be, ifindex(ctx)).is_none() {
        return drop_packet(ctx, Counter::SpoofedSource, ip, None);
    }
    if parse::set_addr(ctx, Addr::Dst, fwd.gw_addr_be).is_err() {
        return drop_packet(ctx, Counter::RewriteFailed, ip, None);
    }
    counted(Counter::FragmentTranslated, DONE)
}

/// A later fragment of a reply: only its source address changes back.
#[inline(always)]
fn later_fragment_rev(ctx: &TcContext, ip: &Ipv4) -> i32 {
    let rev = fragment_ports(ip).and_then(|p| {
        let key = FlowKey::new(ip.saddr_be, ip.daddr_be, p.sport_be, p.dport_be, ip.proto);
        // SAFETY: as above.
        unsafe { NAT_REV.get(key) }.copied()
    });
    let Some(rev) = rev else {
        return PASS;
    };
    if parse::set_addr(ctx, Addr::Src, rev.remote_addr_be).is_err() {
        return drop_packet(ctx, Counter::RewriteFailed, ip, None);
    }
    counted(Counter::FragmentTranslated, DONE)
}

/// Whether a pod's TCP segment on a flow it has starts the flow's question over: a RST, or a
/// SYN without ACK. Until the peer answers again the flow counts as unanswered. Otherwise a
/// pod with raw sockets could make a flow answered once (any listener behind a NodePort
/// answers a SYN), reset it, clear the RST with one more segment the peer never sees, and
/// hold the entry for the established timeout (a day) at two packets a flow; a live
/// connection's next reply clears the mark again.
#[inline(always)]
fn reopens(tcp: u8) -> bool {
    tcp & TCP_RST != 0 || tcp & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The forward path's look at the reverse half, on the first packet after an idle spell,
/// when the RST state changed or when the pod's segment [`reopens`] the flow: re-creates a
/// missing reverse entry (lost to a race with the agent's GC), mirrors the RST bit so that
/// either direction can clear it, and marks the flow unanswered again.
#[inline(always)]
fn check_rev(key: &FlowKey, fwd: &NatFwd, now: u64, rst: bool, reopens: bool) {
    let rev_key = FlowKey::rev_of_fwd(key, fwd);
    match NAT_REV.get_ptr_mut(rev_key) {
        // SAFETY: as in egress_from_pod. Written only when a bit changes: a write of flags
        // read before a reply cleared the unanswered mark would bring the mark back.
        Some(rev) => unsafe {
            let flags = (*rev).flags;
            let want = if rst { flags | FLOW_RST } else { flags & !FLOW_RST };
            let want = if reopens { want | FLOW_UNANSWERED } else { want };
            if want != flags {
                (*rev).flags = want;
            }
        },
        None => {
            let mut rev = FlowKey::rev_value_of_fwd(key, fwd, now);
            if reopens {
                rev.flags |= FLOW_UNANSWERED;
            }
            match NAT_REV.insert(rev_key, rev, BPF_NOEXIST as u64) {
                Ok(()) => count(Counter::RevRestored),
                Err(E2BIG_NEG) => count(Counter::NatTableFull),
                Err(_) => {}
            }
        }
    }
}

/// The reverse path's counterpart of [`check_rev`].
#[inline(always)]
fn check_fwd(rev_key: &FlowKey, rev: &NatRev, ifindex: u32, now: u64, rst: bool) {
    let key = FlowKey::fwd_of_rev(rev_key, rev);
    match NAT_FWD.get_ptr_mut(key) {
        // SAFETY: as in egress_from_pod; written only when the bit changes, as in check_rev.
        Some(fwd) => unsafe {
            let flags = (*fwd).flags;
            let want = if rst { flags | FLOW_RST } else { flags & !FLOW_RST };
            if want != flags {
                (*fwd).flags = want;
            }
        },
        None => {
            let fwd = FlowKey::fwd_value_of_rev(rev_key, rev, ifindex, now);
            match NAT_FWD.insert(key, fwd, BPF_NOEXIST as u64) {
                Ok(()) => count(Counter::FwdRestored),
                Err(E2BIG_NEG) => count(Counter::NatTableFull),
                Err(_) => {}
            }
        }
    }
}

/// `to_pod`: what a pod receives.
#[inline(always)]
pub fn ingress_to_pod(ctx: &TcContext) -> i32 {
    let ip = match parse::ipv4(ctx) {
        Ok(Some(ip)) => ip,
        Ok(None) => return PASS,
        Err(bad) => return counted(bad.counter, PASS),
    };
    if ip.proto == IPPROTO_ICMP {
        return icmp_to_pod(ctx, &ip);
    }
    if !ip.has_l4 {
        return later_fragment_rev(ctx, &ip);
    }
    let l4 = match parse::ports(ctx, &ip) {
        Ok(Some(l4)) => l4,
        Ok(None) => return PASS,
        Err(c) => return counted(c, PASS),
    };
    let key = FlowKey::new(ip.saddr_be, ip.daddr_be, l4.sport_be, l4.dport_be, ip.proto);
    if !may_be_gateway_port(l4.sport_be) {
        // Not from a gateway, so no reply of a translated flow: most of what pods receive.
        return PASS;
    }
    let Some(rev) = NAT_REV.get_ptr_mut(key) else {
        return PASS;
    };
    if ip.is_fragment {
        // The first fragment of a reply: the rest of the datagram finds its ports here.
        remember_fragment(&ip, &l4);
    }
    let now = now_ns();
    // SAFETY: as in egress_from_pod, which also says why only changes are written.
    let (rev, idle, rst_was, answers) = unsafe {
        let mut cur = *rev;
        let idle = now.saturating_sub(cur.last_seen_ns) >= limits::HALF_CHECK_NS;
        let rst_was = cur.flags & FLOW_RST != 0;
        if now > cur.last_seen_ns {
            cur.last_seen_ns = now;
            (*rev).last_seen_ns = now;
        }
        let flags = cur.flags;
        // Cleared by the first reply, in its write; later replies find it clear and, between
        // two ticks, write nothing.
        let answers = cur.flags & FLOW_UNANSWERED != 0;
        cur.flags &= !FLOW_UNANSWERED;
        note_tcp_flags(&mut cur.flags, l4.tcp_flags, FLOW_FIN_PEER);
        if cur.flags != flags {
            (*rev).flags = cur.flags;
        }
        (cur, idle, rst_was, answers)
    };
    let rst_now = rev.flags & FLOW_RST != 0;
    if idle || rst_was != rst_now {
        // The pod's interface: to_pod runs on the same host-side interface as from_pod.
        check_fwd(&key, &rev, ifindex(ctx), now, rst_now);
    }
    if rewrite_rev(ctx, &ip, &l4, &rev).is_err() {
        return drop_packet(ctx, Counter::RewriteFailed, &ip, Some(&l4));
    }
    if answers {
        count(Counter::FlowAnswered);
    }
    DONE
}

/// An ICMP error about a translated flow quotes the packet as it left: `pod:wire port ->
/// gateway:NodePort`. No socket of the pod matches that, so "fragmentation needed" would
/// never reach PMTU discovery, and unreachables would be lost. The quoted header is
/// translated back as the flow's replies are (Cilium's
/// `snat_v4_rev_nat_handle_icmp_frag_needed`, Katran's `handle_icmp.h`): the quoted
/// destination becomes the remote pod, the quoted ports the pod's own and the remote pod's,
/// with the quoted IP checksum and the ICMP checksum fixed. The outer header stays: Linux
/// matches an ICMP error to its socket by the quoted header, whoever sent it.
#[inline(always)]
fn icmp_to_pod(ctx: &TcContext, ip: &Ipv4) -> i32 {
    let e = match parse::icmp_error(ctx, ip) {
        Ok(Some(e)) => e,
        Ok(None) => return PASS,
        Err(c) => return counted(c, PASS),
    };
    // The reply tuple of the quoted flow.
    let key = FlowKey::new(e.inner_daddr_be, e.inner_saddr_be, e.inner_dport_be, e.inner_sport_be, e.inner_proto);
    // SAFETY: a read-only copy of a value from a successful lookup.
    let Some(rev) = (unsafe { NAT_REV.get(key) }).copied() else {
        return PASS;
    };
    if e.inner_saddr_be != ip.daddr_be {
        // Quotes a packet another host sent: not about this pod's flow.
        return PASS;
    }
    if rewrite_icmp(ctx, &e, &rev).is_err() {
        return drop_packet(ctx, Counter::RewriteFailed, ip, None);
    }
    count(Counter::IcmpErrorTranslated);
    log::icmp_translated(ctx, e.inner_proto, e.inner_saddr_be, rev.pod_port_be, rev.remote_addr_be, rev.remote_port_be, DONE)
}

#[inline(always)]
fn rewrite_icmp(ctx: &TcContext, e: &parse::IcmpError, rev: &NatRev) -> Result<(), i64> {
    let inner_off = parse::bounded(e.inner_off, 0xff);
    let inner_csum_off = inner_off + 10;
    let (old_addr, new_addr) = (e.inner_daddr_be as u64, rev.remote_addr_be as u64);
    ctx.l3_csum_replace(inner_csum_off, old_addr, new_addr, 4)?;
    let new_csum = parse::load_u16(ctx, inner_csum_off).ok_or(-1_i64)?;
    let new_ports = parse::ports_word(rev.pod_port_be, rev.remote_port_be);
    // The ICMP checksum covers the quoted bytes (no pseudo-header): every changed word.
    let icmp_csum_off = parse::bounded(e.icmp_csum_off, 0x7f);
    ctx.l4_csum_replace(icmp_csum_off, e.inner_csum as u64, new_csum as u64, 2)?;
    ctx.l4_csum_replace(icmp_csum_off, old_addr, new_addr, 4)?;
    ctx.l4_csum_replace(icmp_csum_off, e.inner_ports as u64, new_ports as u64, 4)?;
    ctx.store(inner_off + 16, &rev.remote_addr_be, 0)?;
    ctx.store(inner_off + 20, &new_ports, 0)?;
    Ok(())
}

/// Whether a packet on the pod interface `ifindex` may carry the source `src_be`: not when
/// the address is another interface's pod (a pod with `CAP_NET_RAW` can write any source),
/// which would let it claim that pod's reply tuples or speak in its name. An address no pod
/// interface holds may be a pod the agent has not read yet, and passes.
#[inline(always)]
pub(crate) fn may_send_as(src_be: u32, ifindex: u32) -> bool {
    crate::tunnel::pod_behind(src_be, ifindex) != Some(false)
}

/// The interface a flow belongs to once a packet of it from `src_be` came in on `ifindex`
/// (`None`: not to this one; the packet is another pod's in its name). A flow made on another
/// interface passes to this one when its source is this interface's pod: the other one is
/// gone (a pod re-created with its address, which may reopen the same tuple while the old
/// flow lives on), or its flow was opened from an address no pod held yet. Flows of releases
/// that did not record the interface (0) go to the first that sends on them and may send as
/// their source: not to a pod posing as another, who could reset them.
#[inline(always)]
fn flow_owner(flow_ifindex: u32, src_be: u32, ifindex: u32) -> Option<u32> {
    (flow_ifindex == ifindex || (flow_ifindex == 0 && may_send_as(src_be, ifindex)) || may_send_as_itself(src_be, ifindex))
        .then_some(ifindex)
}

/// Whether `src_be` is the pod behind the pod interface `ifindex`, as the agent read it.
#[inline(always)]
fn may_send_as_itself(src_be: u32, ifindex: u32) -> bool {
    crate::tunnel::pod_behind(src_be, ifindex) == Some(true)
}

/// `-E2BIG`: what an insert into a full hash map answers.
const E2BIG_NEG: i32 = -7;

/// The interface the packet is on.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context's `__sk_buff`, valid for the whole program run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The flow timestamp clock (`CLOCK_MONOTONIC`, as the agent's GC reads it): the tick the
/// agent publishes, an inlined array read. Without an agent, the kernel's clock.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    if cfg!(feature = "bench-no-clock") {
        return 0;
    }
    match CLOCK.get(0) {
        Some(&tick) if tick != 0 => tick,
        // SAFETY: a helper without arguments.
        _ => unsafe { bpf_ktime_get_ns() },
    }
}

#[inline(always)]
fn counted(c: Counter, verdict: i32) -> i32 {
    count(c);
    verdict
}

/// Drops a packet for `why`: counted, and logged by the logging object. `l4`: its ports,
/// where they were read.
#[inline(always)]
fn drop_packet(ctx: &TcContext, why: Counter, ip: &Ipv4, l4: Option<&Ports>) -> i32 {
    let (sport_be, dport_be) = l4.map_or((0, 0), |p| (p.sport_be, p.dport_be));
    count(why);
    log::dropped(ctx, why, ip.proto, ip.saddr_be, sport_be, ip.daddr_be, dport_be, DROP)
}

#[inline(always)]
fn counted2(why: Counter, what: Counter, verdict: i32) -> i32 {
    count(why);
    count(what);
    verdict
}

/// Whether `daddr_be` is in one of this cluster's pod CIDRs, as far as a consistent read of
/// `mn_local_v1` tells (its seqlock: see `meshnet_common::LocalCidrs`). `false` when unsure:
/// the caller then takes the lookups, which pass such traffic anyway.
#[inline(always)]
fn is_local(daddr_be: u32) -> bool {
    let Some(l) = LOCAL.get_ptr(0) else {
        return false;
    };
    // SAFETY: a value pointer of an array map, valid for the program run. Volatile reads keep
    // the seqlock's order: `seq`, then the nets, then `seq` again.
    unsafe {
        let seq = core::ptr::read_volatile(core::ptr::addr_of!((*l).seq));
        if seq & 1 != 0 {
            return false;
        }
        let count = core::ptr::read_volatile(core::ptr::addr_of!((*l).count));
        if count == 0 {
            return false;
        }
        // Every slot, at constant offsets: slots past `count` match nothing, so none needs a
        // test of `count`, and each match leaves at once (a flag carried through the slots
        // would multiply the verifier's states by two per slot). Most clusters have one CIDR:
        // a remote destination then leaves after the first slot, not the last.
        for i in 0..limits::MAX_LOCAL_CIDRS {
            if i == 1 && count == 1 {
                return false;
            }
            let net = core::ptr::read_volatile(core::ptr::addr_of!((*l).nets[i]));
            if daddr_be & net.mask_be == net.addr_be {
                return core::ptr::read_volatile(core::ptr::addr_of!((*l).seq)) == seq;
            }
        }
        false
    }
}

/// Whether a packet from `port_be` could be a gateway's reply: its bit in `mn_gw_ports_v1`,
/// or `true` while that bitmap is not in use yet (its bit 0 clear).
#[inline(always)]
fn may_be_gateway_port(port_be: u16) -> bool {
    let port = u32::from(u16::from_be(port_be));
    match (GW_PORTS.get(0), GW_PORTS.get(port >> 6)) {
        (Some(&w0), Some(&w)) => w0 & 1 == 0 || w & (1 << (port & 63)) != 0,
        _ => true,
    }
}

#[inline(always)]
fn is_remote(daddr_be: u32) -> bool {
    ROUTES.get(Key::new(32, daddr_be)).is_some() || crate::tunnel::route(daddr_be).is_some()
}

/// Follows what TCP does with the flow's close bits. `fin` is the FIN bit of this direction.
/// A RST marks the flow as closing, but any later segment without one clears the mark
/// again: a RST the receiver ignored (out of window) must not get a live connection expired.
#[inline(always)]
fn note_tcp_flags(flags: &mut u32, tcp: u8, fin: u32) {
    if tcp == 0 {
        // UDP.
        return;
    }
    if tcp & TCP_SYN != 0 && (fin == FLOW_FIN_PEER || tcp & TCP_ACK == 0) {
        // A new connection reusing the tuple (the pod's SYN or the peer's SYN-ACK): the old
        // one's close no longer applies.
        *flags &= !(FLOW_FIN_POD | FLOW_FIN_PEER | FLOW_RST);
    }
    if tcp & TCP_FIN != 0 {
        *flags |= fin;
    }
    if tcp & TCP_RST != 0 {
        *flags |= FLOW_RST;
    } else {
        *flags &= !FLOW_RST;
    }
}

/// Sets up translation for a flow's first packet, whose TCP flags are `tcp` (0 for UDP).
/// `Ok(None)`: not meshnet's to translate. `Err`: a counter and the verdict to return.
#[inline(always)]
fn new_flow(key: &FlowKey, ifindex: u32, now: u64, tcp: u8) -> Result<Option<NatFwd>, (Counter, i32)> {
    let Some(route) = ROUTES.get(Key::new(32, key.dst_be)) else {
        return Ok(None);
    };
    if !may_send_as(key.src_be, ifindex) {
        return Err((Counter::SpoofedSource, DROP));
    }
    let peer_id = route.peer_id;
    // SAFETY: PEERS is only replaced whole by user space: the kernel swaps in a new element,
    // and the old one is handed out again only after this RCU read section (freed after a
    // grace period before 6.1; from 6.1 the agent waits one out before its next insert,
    // meshnet::grace): the value read here is never torn.
    let Some(peer) = (unsafe { PEERS.get(peer_id) }) else {
        return Err((Counter::NoLiveGateway, DROP));
    };
    let n = if peer.count as usize > limits::MAX_GATEWAYS {
        limits::MAX_GATEWAYS as u32
    } else {
        peer.count
    };
    if n == 0 {
        return Err((Counter::NoLiveGateway, DROP));
    }
    let start = gateway_start(key, n);
    // The first usable gateway at or after `start`, cyclically. Slots are visited by
    // constant index and ranked by their cyclic distance from `start`: indexing the array
    // with `(start + i) % n` instead is rejected by verifiers that do not bound the result
    // of a modulo by a register.
    let mut chosen = None;
    let mut best = u32::MAX;
    let mut has_port = false;
    for (j, gw) in peer.gateways.iter().enumerate() {
        let j = j as u32;
        if j >= n {
            break;
        }
        let port_be = if key.proto == IPPROTO_UDP { gw.udp_port_be } else { gw.tcp_port_be };
        if port_be == 0 {
            continue;
        }
        has_port = true;
        let dist = if j >= start { j - start } else { j + n - start };
        if gw.flags & GW_UP != 0 && dist < best {
            best = dist;
            chosen = Some((gw.addr_be, port_be));
        }
    }
    let Some((gw_addr_be, gw_port_be)) = chosen else {
        return if has_port {
            Err((Counter::NoLiveGateway, DROP))
        } else {
            // A UDP flow to a peer whose gateways take no UDP: not ours to carry.
            Err((Counter::NoGatewayForProto, PASS))
        };
    };

    let mut fwd = NatFwd {
        gw_addr_be,
        gw_port_be,
        nat_sport_be: key.sport_be,
        peer_id,
        flags: 0,
        ifindex,
        _pad: 0,
        last_seen_ns: now,
    };
    // A flow opened by a RST (or a FIN) is closing from its first packet, and its timeout says so.
    note_tcp_flags(&mut fwd.flags, tcp, FLOW_FIN_POD);
    let mut rev = FlowKey::rev_value_of_fwd(key, &fwd, now);
    rev.flags |= FLOW_UNANSWERED;
    let mut rev_key = FlowKey::rev_of_fwd(key, &fwd);
    // Claiming the reply tuple is what detects a collision: two flows from one pod port to
    // different remote pods would otherwise become one tuple towards the gateway, and the
    // gateway and the node's conntrack would merge them.
    let mut claimed = claim(&rev_key, &rev);
    if let Claim::Taken = claimed {
        for attempt in 0..limits::REMAP_ATTEMPTS {
            rev_key.dport_be = remap_port(key, attempt).to_be();
            claimed = claim(&rev_key, &rev);
            if !matches!(claimed, Claim::Taken) {
                break;
            }
        }
        if !matches!(claimed, Claim::Taken | Claim::Full) {
            fwd.nat_sport_be = rev_key.dport_be;
            fwd.flags |= FLOW_REMAPPED;
        }
    }
    let inserted_rev = match claimed {
        Claim::Inserted => true,
        Claim::Held => false,
        Claim::Taken => return Err((Counter::NatInsertFailed, DROP)),
        Claim::Full => return Err((Counter::NatTableFull, DROP)),
    };
    match NAT_FWD.insert(key, fwd, BPF_NOEXIST as u64) {
        Ok(()) => {
            // Counted once the flow exists: a remap whose flow is then refused is no remap.
            // Flow events are counted, not packets: an established flow's packet writes nothing.
            count(Counter::FlowOpened);
            if fwd.flags & FLOW_REMAPPED != 0 {
                count(Counter::PortRemap);
            }
            Ok(Some(fwd))
        }
        Err(e) => {
            // Another CPU created this flow meanwhile: both picked the same gateway and port
            // from the same inputs, so its entry serves this packet too.
            // SAFETY: a read-only copy of a value from a successful lookup.
            if let Some(cur) = unsafe { NAT_FWD.get(key) } {
                return Ok(Some(*cur));
            }
            if inserted_rev {
                let _ = NAT_REV.remove(rev_key);
            }
            Err((if e == E2BIG_NEG { Counter::NatTableFull } else { Counter::NatInsertFailed }, DROP))
        }
    }
}

/// The outcome of claiming a reply tuple.
enum Claim {
    /// Newly inserted for this flow.
    Inserted,
    /// Already holding this very flow: its forward entry was lost (and it keeps its tuple),
    /// or another CPU is creating it.
    Held,
    /// Another flow's.
    Taken,
    /// Free, but the table is full.
    Full,
}

/// Takes the reply tuple `rev_key` for this flow. The insert is tried first: a free tuple,
/// what nearly every new flow finds, then costs one bucket walk instead of a lookup that
/// misses and the insert's own walk; a taken one is refused (`BPF_NOEXIST`) before the
/// kernel takes an element, so probing it changes nothing. Probing a taken tuple now costs
/// the bucket's lock and a lookup, not one lookup: only collisions pay that.
#[inline(always)]
fn claim(rev_key: &FlowKey, rev: &NatRev) -> Claim {
    let same = |cur: &NatRev| {
        cur.remote_addr_be == rev.remote_addr_be
            && cur.remote_port_be == rev.remote_port_be
            && cur.pod_port_be == rev.pod_port_be
    };
    match NAT_REV.insert(rev_key, rev, BPF_NOEXIST as u64) {
        Ok(()) => Claim::Inserted,
        Err(E2BIG_NEG) => Claim::Full,
        // EEXIST: held by this flow already or by another one.
        // SAFETY: a read-only look at a value from a successful lookup.
        Err(_) => match unsafe { NAT_REV.get(rev_key) } {
            Some(cur) if same(cur) => Claim::Held,
            _ => Claim::Taken,
        },
    }
}

fn l4_flags(ip: &Ipv4) -> u64 {
    // A UDP checksum of zero means "none" and must stay zero; MANGLED_0 also turns a
    // computed zero into 0xffff, as RFC 768 asks.
    if ip.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Rewrites the destination to the gateway (and the source port when remapped), fixing the
/// IP checksum and the L4 checksum including its pseudo-header. The kernel helpers handle
/// CHECKSUM_PARTIAL packets (as sent by local sockets through veth) correctly.
#[inline(always)]
pub(crate) fn rewrite_fwd(ctx: &TcContext, ip: &Ipv4, l4: &Ports, fwd: &NatFwd) -> Result<(), i64> {
    if cfg!(feature = "bench-no-rewrite") {
        return Ok(());
    }
    let new_ports = parse::ports_word(fwd.nat_sport_be, fwd.gw_port_be);
    parse::set_addr(ctx, Addr::Dst, fwd.gw_addr_be)?;
    parse::set_ports(ctx, ip, new_ports)?;
    fix_l4_csum(ctx, ip, l4, ip.daddr_be, fwd.gw_addr_be, new_ports)
}

/// Rewrites a reply's source back to the remote pod and its destination port back to the
/// pod's own.
#[inline(always)]
fn rewrite_rev(ctx: &TcContext, ip: &Ipv4, l4: &Ports, rev: &NatRev) -> Result<(), i64> {
    if cfg!(feature = "bench-no-rewrite") {
        return Ok(());
    }
    let new_ports = parse::ports_word(rev.remote_port_be, rev.pod_port_be);
    parse::set_addr(ctx, Addr::Src, rev.remote_addr_be)?;
    parse::set_ports(ctx, ip, new_ports)?;
    fix_l4_csum(ctx, ip, l4, ip.saddr_be, rev.remote_addr_be, new_ports)
}

/// Fixes the L4 checksum for an address (in the pseudo-header) and the ports word that
/// changed. The right update depends on the skb's checksum state, which only the kernel
/// knows before 6.2: with CHECKSUM_PARTIAL (local sockets through veth) the field holds only
/// the pseudo-header's sum, which the port change must not touch; otherwise it holds the
/// whole checksum. The address goes through the kernel's helper, and how the helper changed
/// the field tells which state the skb is in (the two states move the field in opposite
/// directions), so the ports are fixed inline: one helper call per packet instead of two.
#[inline(always)]
fn fix_l4_csum(ctx: &TcContext, ip: &Ipv4, l4: &Ports, old_addr: u32, new_addr: u32, new_ports: u32) -> Result<(), i64> {
    let mangle = l4_flags(ip);
    let off = l4.csum_off;
    let before = parse::load_u16(ctx, off).ok_or(-1_i64)?;
    if mangle != 0 && before == 0 {
        // A UDP datagram without a checksum: nothing covers the change.
        return Ok(());
    }
    let summed = parse::ip_summed(ctx);
    if summed == ip_summed::NONE || summed == ip_summed::UNNECESSARY {
        // The field holds the whole checksum, as the helper would find: both changes inline,
        // each step's zero mangled as the helper's would be.
        let mangled = |c: u16| if mangle != 0 && c == 0 { 0xffff } else { c };
        let after = mangled(parse::csum_replace4(before, old_addr, new_addr));
        let after = if l4.ports == new_ports { after } else { parse::csum_replace4(after, l4.ports, new_ports) };
        return parse::set_l4_csum(ctx, off, after, mangle != 0);
    }
    if summed == ip_summed::PARTIAL {
        // The field holds the pseudo-header's sum, which the ports are not part of.
        return parse::set_l4_csum(ctx, off, !parse::csum_replace4(!before, old_addr, new_addr), mangle != 0);
    }
    // CHECKSUM_COMPLETE (only the kernel can update `skb->csum`), or a kernel that cannot
    // tell: the helper, whose effect on the field tells the state.
    ctx.l4_csum_replace(off, old_addr as u64, new_addr as u64, BPF_F_PSEUDO_HDR as u64 | mangle | 4)?;
    if l4.ports == new_ports {
        return Ok(());
    }
    let after = parse::load_u16(ctx, off).ok_or(-1_i64)?;
    match parse::csum_state(before, after, old_addr, new_addr, mangle != 0) {
        parse::CsumState::Partial => Ok(()),
        parse::CsumState::Full => parse::set_l4_csum(ctx, off, parse::csum_replace4(after, l4.ports, new_ports), mangle != 0),
        parse::CsumState::Unknown => {
            ctx.l4_csum_replace(off, l4.ports as u64, new_ports as u64, mangle | 4)?;
            Ok(())
        }
    }
}
