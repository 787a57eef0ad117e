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
    gateway_start, limits, remap_port, Counter, FlowKey, NatFwd, NatRev, FLOW_FIN_PEER, FLOW_FIN_POD,
    FLOW_REMAPPED, FLOW_RST, GW_UP, IPPROTO_UDP,
};

use crate::{
    maps::{count, NAT_FWD, NAT_REV, PEERS, ROUTES},
    parse::{self, Ipv4, Ports, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Verdict for traffic meshnet does not own: let the next tc program (or tcx link) decide.
pub const PASS: i32 = TC_ACT_UNSPEC;
/// Verdict for a packet meshnet translated.
const DONE: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

/// `from_pod`: what a pod sends.
#[inline(always)]
pub fn egress_from_pod(ctx: &TcContext) -> i32 {
    let ip = match parse::ipv4(ctx) {
        Ok(Some(ip)) => ip,
        Ok(None) => return PASS,
        Err(c) => return counted(c, PASS),
    };
    if ip.is_fragment {
        // Only the first fragment carries the ports that pick the flow's gateway and port, so
        // a fragmented datagram cannot be translated consistently without reassembly: drop
        // every fragment bound for a remote CIDR rather than let one through half-translated.
        return if is_remote(ip.daddr_be) { counted(Counter::FragmentDropped, DROP) } else { PASS };
    }
    let l4 = match parse::ports(ctx, &ip) {
        Ok(Some(l4)) => l4,
        Ok(None) => {
            return if is_remote(ip.daddr_be) { counted(Counter::UnsupportedProto, PASS) } else { PASS };
        }
        Err(c) => return counted(c, PASS),
    };
    let key = FlowKey {
        src_be: ip.saddr_be,
        dst_be: ip.daddr_be,
        sport_be: l4.sport_be,
        dport_be: l4.dport_be,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let now = now_ns();
    let fwd = match NAT_FWD.get_ptr_mut(&key) {
        Some(fwd) => {
            // SAFETY: a map value pointer from a successful lookup; concurrent writers only
            // touch the timestamp and flag bits, where a lost update is harmless.
            unsafe {
                (*fwd).last_seen_ns = now;
                note_tcp_flags_fwd(&mut (*fwd).flags, l4.tcp_flags);
                *fwd
            }
        }
        None => match new_flow(&key, now) {
            Ok(Some(fwd)) => fwd,
            Ok(None) => return PASS,
            Err((c, verdict)) => return counted(c, verdict),
        },
    };
    if rewrite_fwd(ctx, &ip, &l4, &fwd).is_err() {
        return counted(Counter::RewriteFailed, DROP);
    }
    counted(Counter::Redirected, DONE)
}

/// `to_pod`: what a pod receives.
#[inline(always)]
pub fn ingress_to_pod(ctx: &TcContext) -> i32 {
    let ip = match parse::ipv4(ctx) {
        Ok(Some(ip)) => ip,
        Ok(None) => return PASS,
        Err(c) => return counted(c, PASS),
    };
    let l4 = match parse::ports(ctx, &ip) {
        Ok(Some(l4)) => l4,
        Ok(None) => return PASS,
        Err(c) => return counted(c, PASS),
    };
    let key = FlowKey {
        src_be: ip.saddr_be,
        dst_be: ip.daddr_be,
        sport_be: l4.sport_be,
        dport_be: l4.dport_be,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let Some(rev) = NAT_REV.get_ptr_mut(&key) else {
        return PASS;
    };
    if ip.is_fragment {
        // The first fragment of a reply to a translated flow; the rest cannot be matched.
        return counted(Counter::FragmentDropped, DROP);
    }
    // SAFETY: as in egress_from_pod.
    let rev = unsafe {
        (*rev).last_seen_ns = now_ns();
        note_tcp_flags_rev(&mut (*rev).flags, l4.tcp_flags);
        *rev
    };
    if rewrite_rev(ctx, &ip, &l4, &rev).is_err() {
        return counted(Counter::RewriteFailed, DROP);
    }
    counted(Counter::ReverseTranslated, DONE)
}

/// The flow timestamp clock (`CLOCK_MONOTONIC`, as the agent's GC reads it).
#[inline(always)]
fn now_ns() -> u64 {
    if cfg!(feature = "bench-no-clock") {
        return 0;
    }
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn counted(c: Counter, verdict: i32) -> i32 {
    count(c);
    verdict
}

#[inline(always)]
fn is_remote(daddr_be: u32) -> bool {
    ROUTES.get(Key::new(32, daddr_be)).is_some()
}

#[inline(always)]
fn note_tcp_flags_fwd(flags: &mut u32, tcp: u8) {
    if tcp & (TCP_FIN | TCP_RST | TCP_SYN) == 0 {
        return;
    }
    if tcp & TCP_SYN != 0 && tcp & TCP_ACK == 0 {
        // A new connection reusing the tuple: the old one's close no longer applies.
        *flags &= !(FLOW_FIN_POD | FLOW_FIN_PEER | FLOW_RST);
    }
    if tcp & TCP_FIN != 0 {
        *flags |= FLOW_FIN_POD;
    }
    if tcp & TCP_RST != 0 {
        *flags |= FLOW_RST;
    }
}

#[inline(always)]
fn note_tcp_flags_rev(flags: &mut u32, tcp: u8) {
    if tcp & TCP_SYN != 0 {
        // The peer's SYN-ACK of a new connection reusing the tuple: as on the pod side, the
        // old connection's close no longer applies.
        *flags &= !(FLOW_FIN_POD | FLOW_FIN_PEER | FLOW_RST);
    }
    if tcp & TCP_FIN != 0 {
        *flags |= FLOW_FIN_PEER;
    }
    if tcp & TCP_RST != 0 {
        *flags |= FLOW_RST;
    }
}

/// Sets up translation for a flow's first packet. `Ok(None)`: not meshnet's to translate.
/// `Err`: a counter and the verdict to return.
#[inline(always)]
fn new_flow(key: &FlowKey, now: u64) -> Result<Option<NatFwd>, (Counter, i32)> {
    let Some(route) = ROUTES.get(Key::new(32, key.dst_be)) else {
        return Ok(None);
    };
    let peer_id = route.peer_id;
    // SAFETY: PEERS is only replaced whole by user space, which the kernel does atomically
    // for hash maps (the old value stays valid for this RCU read section).
    let Some(peer) = (unsafe { PEERS.get(&peer_id) }) else {
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
        last_seen_ns: now,
    };
    let rev = NatRev {
        remote_addr_be: key.dst_be,
        remote_port_be: key.dport_be,
        pod_port_be: key.sport_be,
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut rev_key = FlowKey::rev_of_fwd(key, &fwd);
    // Claiming the reply tuple with NOEXIST is what detects a collision: two flows from one
    // pod port to different remote pods would otherwise become one tuple towards the gateway,
    // and the gateway and the node's conntrack would merge them.
    if !claim(&rev_key, &rev) {
        let mut claimed = false;
        for attempt in 0..limits::REMAP_ATTEMPTS {
            rev_key.dport_be = remap_port(key, attempt).to_be();
            if claim(&rev_key, &rev) {
                claimed = true;
                break;
            }
        }
        if !claimed {
            return Err((Counter::NatInsertFailed, DROP));
        }
        fwd.nat_sport_be = rev_key.dport_be;
        fwd.flags |= FLOW_REMAPPED;
        count(Counter::PortRemap);
    }
    if NAT_FWD.insert(key, &fwd, BPF_ANY as u64).is_err() {
        let _ = NAT_REV.remove(&rev_key);
        return Err((Counter::NatInsertFailed, DROP));
    }
    Ok(Some(fwd))
}

/// Takes the reply tuple `rev_key` for this flow. True when it is now this flow's: newly
/// inserted, or already holding this very flow (its forward entry was evicted or is being
/// created on another CPU).
#[inline(always)]
fn claim(rev_key: &FlowKey, rev: &NatRev) -> bool {
    if NAT_REV.insert(rev_key, rev, BPF_NOEXIST as u64).is_ok() {
        return true;
    }
    // SAFETY: read-only look at a value pointer from a successful lookup.
    match unsafe { NAT_REV.get(rev_key) } {
        Some(cur) => {
            cur.remote_addr_be == rev.remote_addr_be
                && cur.remote_port_be == rev.remote_port_be
                && cur.pod_port_be == rev.pod_port_be
        }
        None => false,
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
fn rewrite_fwd(ctx: &TcContext, ip: &Ipv4, l4: &Ports, fwd: &NatFwd) -> Result<(), i64> {
    if cfg!(feature = "bench-no-rewrite") {
        return Ok(());
    }
    let mangle = l4_flags(ip);
    let new_ports = parse::ports_word(fwd.nat_sport_be, fwd.gw_port_be);
    let (old_addr, new_addr) = (ip.daddr_be as u64, fwd.gw_addr_be as u64);
    ctx.l4_csum_replace(l4.csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR as u64 | mangle | 4)?;
    ctx.l4_csum_replace(l4.csum_off, l4.ports as u64, new_ports as u64, mangle | 4)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_addr, new_addr, 4)?;
    ctx.store(IP_DST_OFF, &fwd.gw_addr_be, 0)?;
    ctx.store(ip.l4_off & 0x7f, &new_ports, 0)?;
    Ok(())
}

/// Rewrites a reply's source back to the remote pod and its destination port back to the
/// pod's own.
#[inline(always)]
fn rewrite_rev(ctx: &TcContext, ip: &Ipv4, l4: &Ports, rev: &NatRev) -> Result<(), i64> {
    if cfg!(feature = "bench-no-rewrite") {
        return Ok(());
    }
    let mangle = l4_flags(ip);
    let new_ports = parse::ports_word(rev.remote_port_be, rev.pod_port_be);
    let (old_addr, new_addr) = (ip.saddr_be as u64, rev.remote_addr_be as u64);
    ctx.l4_csum_replace(l4.csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR as u64 | mangle | 4)?;
    ctx.l4_csum_replace(l4.csum_off, l4.ports as u64, new_ports as u64, mangle | 4)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_addr, new_addr, 4)?;
    ctx.store(IP_SRC_OFF, &rev.remote_addr_be, 0)?;
    ctx.store(ip.l4_off & 0x7f, &new_ports, 0)?;
    Ok(())
}
