//! Benchmark-only programs (`bench-floor`, never deployed): the least a translator must do
//! for a flow's first packet, on meshnet's own flow maps, so that the benchmark can show how
//! much of a new flow's cost is the kernel's hash map and how much is meshnet's. They read
//! the tuple with the datapath's parser, look the flow up (a miss), insert its state and
//! send the packet on to the next address up (so that `repeat` runs of one call each see a
//! flow they have not seen, as method C's chain of routes does), with no route trie, no
//! gateway choice, no L4 checksum and no counter.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use meshnet_common::{FlowKey, NatFwd};

use crate::{
    maps::{NAT_FWD, NAT_REV},
    parse::{self, Addr},
};

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
