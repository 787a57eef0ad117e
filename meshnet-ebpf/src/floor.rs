//! Benchmark-only programs (`bench-floor`, never deployed), so that the benchmark can show how
//! much of a cost is the kernel's and how much is meshnet's.
//!
//! [`new_flow`]: the least a translator must do for a flow's first packet, on meshnet's own
//! flow maps. They read the tuple with the datapath's parser, look the flow up (a miss),
//! insert its state and send the packet on to the next address up (so that `repeat` runs of
//! one call each see a flow they have not seen, as method C's chain of routes does), with no
//! route trie, no gateway choice, no L4 checksum and no counter.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use meshnet_common::{tun_fast, tunnel, FlowKey, NatFwd, IPPROTO_UDP};

use crate::{
    maps::{NAT_FWD, NAT_REV, TUN_FAST},
    nat::rewrite_fwd,
    parse::{self, Addr},
};

/// [`established`]: the least a translator must do for an established flow's packet, on
/// meshnet's own flow map: parse the tuple with the datapath's parser, look the flow up and
/// rewrite the packet with the datapath's own rewrite (address, ports, the IP checksum and
/// the L4 checksum as the skb's state wants it). No local-CIDR check, no flow clock, no TCP
/// flags, no counter: what `from_pod`'s hot path costs above this is what those cost.
#[inline(always)]
pub fn established(ctx: &TcContext) -> i32 {
    let Ok(Some(ip)) = parse::ipv4(ctx) else {
        return TC_ACT_SHOT;
    };
    let Ok(Some(l4)) = parse::ports(ctx, &ip) else {
        return TC_ACT_SHOT;
    };
    let key = FlowKey::new(ip.saddr_be, ip.daddr_be, l4.sport_be, l4.dport_be, ip.proto);
    // SAFETY: a read-only copy of a value from a successful lookup.
    let Some(fwd) = (unsafe { NAT_FWD.get(&key) }).copied() else {
        return TC_ACT_SHOT;
    };
    if rewrite_fwd(ctx, &ip, &l4, &fwd).is_err() {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

/// `both`: the reply tuple's entry too, as meshnet inserts; without it, one insert, as a
/// translator that keeps one entry per flow.
#[inline(always)]
pub fn new_flow(ctx: &TcContext, both: bool) -> i32 {
    let Ok(Some(ip)) = parse::ipv4(ctx) else {
        return TC_ACT_SHOT;
    };
    let Ok(Some(l4)) = parse::ports(ctx, &ip) else {
        return TC_ACT_SHOT;
    };
    let key = FlowKey::new(ip.saddr_be, ip.daddr_be, l4.sport_be, l4.dport_be, ip.proto);
    if NAT_FWD.get_ptr(key).is_some() {
        return TC_ACT_SHOT;
    }
    let next_be = u32::from_be(ip.daddr_be).wrapping_add(1).to_be();
    let fwd = NatFwd {
        gw_addr_be: next_be,
        gw_port_be: l4.dport_be,
        nat_sport_be: l4.sport_be,
        peer_id: 0,
        flags: 0,
        ifindex: 0,
        _pad: 0,
        last_seen_ns: 0,
    };
    if both && NAT_REV.insert(FlowKey::rev_of_fwd(&key, &fwd), FlowKey::rev_value_of_fwd(&key, &fwd, 0), u64::from(BPF_NOEXIST)).is_err() {
        return TC_ACT_SHOT;
    }
    if NAT_FWD.insert(key, fwd, u64::from(BPF_NOEXIST)).is_err() || parse::set_addr(ctx, Addr::Dst, next_be).is_err() {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

/// [`decap`]: the least a decapsulation must do, on meshnet's own maps: parse the outer IPv4
/// header and read the UDP port as `meshnet_tun_in` does, tell the tunnel port (the same
/// inlined array read), read the inner destination and check the outer header's checksum
/// (which nothing after a decapsulation before the stack would), take the 36 bytes off and,
/// with `redirect`, send the packet out of that pod's port (its slot, as `meshnet_tun_in`
/// reads it, and `bpf_redirect`, as `delivery: redirect` does) with the pod's MACs. No check of the frame's MAC, of meshnet's
/// header, the sender or the inner addresses, no settings, no counter: what
/// `meshnet_tun_in` costs above this is what its checks and counters cost.
#[inline(always)]
pub fn decap(ctx: &TcContext, redirect: bool) -> i32 {
    let Ok(Some(ip)) = parse::ipv4(ctx) else {
        return TC_ACT_SHOT;
    };
    if ip.proto != IPPROTO_UDP || !ip.has_l4 {
        return TC_ACT_SHOT;
    }
    let Some(dport_be) = parse::udp_dport(ctx, &ip) else {
        return TC_ACT_SHOT;
    };
    match TUN_FAST.get(tun_fast::PORT) {
        Some(&port) if port != 0 && port == u32::from(dport_be) => {}
        _ => return TC_ACT_SHOT,
    }
    let Ok(t) = parse::tunnel_packet(ctx, &ip) else {
        return TC_ACT_SHOT;
    };
    if ctx.adjust_room(-(tunnel::OVERHEAD as i32), BPF_ADJ_ROOM_MAC, 0).is_err() {
        return TC_ACT_SHOT;
    }
    if !redirect {
        return TC_ACT_OK;
    }
    match crate::tunnel::pod_port(t.inner_daddr_be) {
        // SAFETY: a helper call with plain values.
        Some(p) if parse::set_macs(ctx, p.pod_mac, p.host_mac).is_ok() => unsafe { bpf_redirect(p.ifindex, 0) as i32 },
        _ => TC_ACT_SHOT,
    }
}
