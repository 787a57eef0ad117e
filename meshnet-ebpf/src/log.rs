//! The datapath's decisions as log lines, in the logging object only (feature
//! `datapath-log`, `meshnet agent --datapath-log`). In the default object every function here
//! returns its verdict and is inlined away: no ring buffer, no instruction.
//!
//! Only decisions are logged (a flow set up, a packet dropped, a flow refused, an ICMP error
//! translated), never an established flow's packet. The translating programs do not format
//! lines themselves: at a decision they note the event in a per-CPU slot and tail-call
//! `meshnet_log`, which writes the line and returns the verdict the event carries. aya-log's
//! formatting inlined at every decision made `from_pod` too big to verify (over 1,000,000
//! processed instructions); in a program of its own it is verified once, and the
//! translating programs gain one map write and one tail call per decision. If the tail call
//! fails (no log program in the slot), the caller returns the same verdict itself.
//!
//! Lines are rate-limited per node and held back while aya-log's ring is filling up, and what
//! is held back is counted, so that a flood of drops costs a counter increment per packet,
//! not a line.

use aya_ebpf::programs::TcContext;
use meshnet_common::{Counter, FlowKey};

/// One decision, handed from a translating program to `meshnet_log`.
#[cfg(feature = "datapath-log")]
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Event {
    pub kind: u32,
    /// A [`Counter`]'s index: the reason of a drop or refusal.
    pub why: u32,
    /// What `meshnet_log` returns for the packet.
    pub verdict: i32,
    pub proto: u32,
    pub src_be: u32,
    pub dst_be: u32,
    pub gw_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub gw_port_be: u16,
    pub nat_sport_be: u16,
}

#[cfg(feature = "datapath-log")]
pub const NEW_FLOW: u32 = 1;
#[cfg(feature = "datapath-log")]
pub const DROPPED: u32 = 2;
#[cfg(feature = "datapath-log")]
pub const REFUSED: u32 = 3;
#[cfg(feature = "datapath-log")]
pub const ICMP_TRANSLATED: u32 = 4;

/// Notes `e` and hands the packet to `meshnet_log`; `e.verdict` if that cannot be done.
#[cfg(feature = "datapath-log")]
#[inline(always)]
fn emit(ctx: &TcContext, e: Event) -> i32 {
    use crate::maps::{LOG_EVENT, LOG_PROGS};
    if let Some(slot) = LOG_EVENT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot; the tail call runs next on this CPU, before any other
        // program of this CPU can write it. Field by field and volatile: a whole-struct
        // store became a call of `memset` for the zeroed fields, a BPF-to-BPF call, and
        // kernels before 5.10 (and any without a JIT that allows it) refuse a program that
        // both calls a BPF function and tail-calls.
        unsafe {
            use core::ptr::{addr_of_mut, write_volatile};
            write_volatile(addr_of_mut!((*slot).kind), e.kind);
            write_volatile(addr_of_mut!((*slot).why), e.why);
            write_volatile(addr_of_mut!((*slot).verdict), e.verdict);
            write_volatile(addr_of_mut!((*slot).proto), e.proto);
            write_volatile(addr_of_mut!((*slot).src_be), e.src_be);
            write_volatile(addr_of_mut!((*slot).dst_be), e.dst_be);
            write_volatile(addr_of_mut!((*slot).gw_be), e.gw_be);
            write_volatile(addr_of_mut!((*slot).sport_be), e.sport_be);
            write_volatile(addr_of_mut!((*slot).dport_be), e.dport_be);
            write_volatile(addr_of_mut!((*slot).gw_port_be), e.gw_port_be);
            write_volatile(addr_of_mut!((*slot).nat_sport_be), e.nat_sport_be);
            LOG_PROGS.tail_call(ctx, 0);
        }
    }
    e.verdict
}

/// A flow set up towards its gateway; logged once the packet was rewritten, so `verdict` is
/// the packet's.
#[inline(always)]
#[allow(unused_variables)]
pub fn new_flow(ctx: &TcContext, key: &FlowKey, gw_be: u32, gw_port_be: u16, nat_sport_be: u16, verdict: i32) -> i32 {
    #[cfg(feature = "datapath-log")]
    return emit(
        ctx,
        Event {
            kind: NEW_FLOW,
            why: 0,
            verdict,
            proto: u32::from(key.proto),
            src_be: key.src_be,
            dst_be: key.dst_be,
            gw_be,
            sport_be: key.sport_be,
            dport_be: key.dport_be,
            gw_port_be,
            nat_sport_be,
        },
    );
    #[cfg(not(feature = "datapath-log"))]
    verdict
}

/// A packet dropped for `why`. Ports are 0 where the packet had none to read.
#[inline(always)]
#[allow(unused_variables, clippy::too_many_arguments)]
pub fn dropped(ctx: &TcContext, why: Counter, proto: u8, src_be: u32, sport_be: u16, dst_be: u32, dport_be: u16, verdict: i32) -> i32 {
    #[cfg(feature = "datapath-log")]
    return emit(
        ctx,
        Event {
            kind: DROPPED,
            why: why as u32,
            verdict,
            proto: u32::from(proto),
            src_be,
            dst_be,
            gw_be: 0,
            sport_be,
            dport_be,
            gw_port_be: 0,
            nat_sport_be: 0,
        },
    );
    #[cfg(not(feature = "datapath-log"))]
    verdict
}

/// A new flow refused for `why` (a full table, no live gateway, every port taken).
#[inline(always)]
#[allow(unused_variables)]
pub fn refused(ctx: &TcContext, why: Counter, key: &FlowKey, verdict: i32) -> i32 {
    #[cfg(feature = "datapath-log")]
    return emit(
        ctx,
        Event {
            kind: REFUSED,
            why: why as u32,
            verdict,
            proto: u32::from(key.proto),
            src_be: key.src_be,
            dst_be: key.dst_be,
            gw_be: 0,
            sport_be: key.sport_be,
            dport_be: key.dport_be,
            gw_port_be: 0,
            nat_sport_be: 0,
        },
    );
    #[cfg(not(feature = "datapath-log"))]
    verdict
}

/// An ICMP error about the translated flow of pod `pod_be:pod_port_be` with remote
/// `remote_be:remote_port_be`, translated back for the pod.
#[inline(always)]
#[allow(unused_variables, clippy::too_many_arguments)]
pub fn icmp_translated(ctx: &TcContext, proto: u8, pod_be: u32, pod_port_be: u16, remote_be: u32, remote_port_be: u16, verdict: i32) -> i32 {
    #[cfg(feature = "datapath-log")]
    return emit(
        ctx,
        Event {
            kind: ICMP_TRANSLATED,
            why: 0,
            verdict,
            proto: u32::from(proto),
            src_be: remote_be,
            dst_be: pod_be,
            gw_be: 0,
            sport_be: remote_port_be,
            dport_be: pod_port_be,
            gw_port_be: 0,
            nat_sport_be: 0,
        },
    );
    #[cfg(not(feature = "datapath-log"))]
    verdict
}

/// `meshnet_log`'s body: writes the line of the event the caller noted, within the budget,
/// and returns the caller's verdict.
///
/// Reasons and protocols go out as numbers (`reason=` a counter's index, `proto=` the IP
/// protocol) and the agent names them (`datapath_log::name_fields`): a name chosen here would
/// be a string of another length on every path, and the verifier walks aya-log's copy of
/// every one of them after every other: 421,646 processed instructions for the drop line
/// alone on 6.18, against 19,396 for all five lines with numbers.
#[cfg(feature = "datapath-log")]
pub mod program {
    use aya_ebpf::{helpers::bpf_ringbuf_query, programs::TcContext};
    use aya_log_ebpf::{
        info,
        macro_support::{level_enabled, Level, AYA_LOGS},
        warn,
    };
    use meshnet_common::limits;

    use super::{Event, DROPPED, ICMP_TRANSLATED, NEW_FLOW, REFUSED};
    use crate::maps::{LOG_BUDGET, LOG_EVENT};

    /// The `tracing` target the agent logs these lines under.
    const TARGET: &str = "meshnet::datapath";
    /// `BPF_RB_AVAIL_DATA`: bytes written to the ring and not yet read.
    const BPF_RB_AVAIL_DATA: u64 = 0;

    #[inline(always)]
    pub fn run(ctx: &TcContext) -> i32 {
        let Some(e) = LOG_EVENT.get(0).copied() else { return crate::nat::PASS };
        let level = if e.kind == DROPPED || e.kind == REFUSED { Level::Warn } else { Level::Info };
        if may_log(level) {
            write(ctx, &e);
        }
        e.verdict
    }

    /// Whether a line at `level` may be written now; a line that may not is counted.
    ///
    /// The budget is the node's, not each CPU's, so that a flood spread over many CPUs is
    /// held to the same rate. Its counters are bumped with atomic adds whose result is not
    /// read (`lock xadd`, in every kernel's verifier; a fetching add needs 5.12), so CPUs
    /// that test the budget at the same instant may pass it together: the overshoot is at
    /// most one line per CPU and second. Starting a new second is a plain store that two
    /// CPUs may both make; either way `used` restarts near 0.
    #[inline(always)]
    fn may_log(level: Level) -> bool {
        use core::{
            intrinsics::{atomic_xadd, AtomicOrdering::Relaxed},
            ptr::{addr_of_mut, read_volatile, write_volatile},
        };
        if !level_enabled(level) {
            return false;
        }
        let Some(b) = LOG_BUDGET.get_ptr_mut(0) else { return false };
        let second = crate::nat::now_ns() / 1_000_000_000;
        // SAFETY: the AYA_LOGS map itself (RingBuf is a transparent map definition), as
        // bpf_ringbuf_query takes it; the query only reads the ring's positions.
        let queued = unsafe { bpf_ringbuf_query(core::ptr::addr_of!(AYA_LOGS).cast_mut().cast(), BPF_RB_AVAIL_DATA) };
        // SAFETY: a map value pointer, valid for the program run; every access is volatile
        // or atomic, as other CPUs use the same value.
        unsafe {
            if read_volatile(addr_of_mut!((*b).second)) != second {
                write_volatile(addr_of_mut!((*b).second), second);
                write_volatile(addr_of_mut!((*b).used), 0);
            }
            if read_volatile(addr_of_mut!((*b).used)) >= limits::LOG_LINES_PER_SEC || queued > limits::LOG_RING_HIGH_WATER {
                // The target's core has no atomic types (no compare-and-swap), but LLVM
                // lowers an add whose result is unused to BPF's atomic add.
                atomic_xadd::<u64, u64, { Relaxed }>(addr_of_mut!((*b).suppressed), 1);
                return false;
            }
            atomic_xadd::<u32, u32, { Relaxed }>(addr_of_mut!((*b).used), 1);
        }
        true
    }

    #[inline(always)]
    fn write(ctx: &TcContext, e: &Event) {
        let proto = e.proto;
        let (src, dst) = (u32::from_be(e.src_be), u32::from_be(e.dst_be));
        let (sport, dport) = (u16::from_be(e.sport_be), u16::from_be(e.dport_be));
        match e.kind {
            NEW_FLOW => {
                let (gw, gw_port) = (u32::from_be(e.gw_be), u16::from_be(e.gw_port_be));
                if e.nat_sport_be == e.sport_be {
                    info!(ctx, target: TARGET, "new flow proto={} {:i}:{} -> {:i}:{} via gateway {:i}:{}", proto, src, sport, dst, dport, gw, gw_port);
                } else {
                    info!(
                        ctx,
                        target: TARGET,
                        "new flow proto={} {:i}:{} -> {:i}:{} via gateway {:i}:{}, source port remapped to {}",
                        proto, src, sport, dst, dport, gw, gw_port, u16::from_be(e.nat_sport_be)
                    );
                }
            }
            DROPPED => {
                warn!(ctx, target: TARGET, "drop reason={} proto={} {:i}:{} -> {:i}:{}", e.why, proto, src, sport, dst, dport);
            }
            REFUSED => {
                warn!(ctx, target: TARGET, "refused new flow reason={} proto={} {:i}:{} -> {:i}:{}", e.why, proto, src, sport, dst, dport);
            }
            ICMP_TRANSLATED => {
                info!(ctx, target: TARGET, "icmp error translated for proto={} {:i}:{} <- {:i}:{}", proto, dst, dport, src, sport);
            }
            _ => {}
        }
    }
}
