//! meshnet's tc programs. The entry points only compose the parsing and NAT modules.
#![no_std]
#![no_main]
// `ip_summed`'s placeholder instructions (see `parse::ip_summed`).
#![feature(asm_experimental_arch)]
// The logging build's budget counters: BPF's atomic add (see `log::program::may_log`).
#![cfg_attr(feature = "datapath-log", feature(core_intrinsics))]
#![cfg_attr(feature = "datapath-log", allow(internal_features))]

#[cfg(feature = "bench-floor")]
mod floor;
mod log;
mod maps;
mod nat;
mod parse;
mod tunnel;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// tc ingress on the host side of pod interfaces: sees what pods send.
// The macro calls this body as a function of its own, which LLVM may leave uninlined once it
// grows (the logging build's did): a subprogram, where the logging build's tail call is not
// allowed without BTF. Inlined, the program is one function.
#[classifier]
#[inline(always)]
pub fn meshnet_from_pod(ctx: TcContext) -> i32 {
    #[cfg(feature = "upgrade-canary")]
    // SAFETY: a helper without arguments; its result is deliberately unused.
    unsafe {
        aya_ebpf::helpers::bpf_get_smp_processor_id();
    }
    nat::egress_from_pod(&ctx)
}

/// tc egress on the host side of pod interfaces: sees what pods receive.
#[classifier]
#[inline(always)]
pub fn meshnet_to_pod(ctx: TcContext) -> i32 {
    nat::ingress_to_pod(&ctx)
}

/// tc ingress on the uplinks (tunnel mode): takes tunnel packets off before netfilter.
#[classifier]
#[inline(always)]
pub fn meshnet_tun_in(ctx: TcContext) -> i32 {
    tunnel::decap(&ctx)
}

/// The logging object's line writer: tail-called by the two programs above at each decision
/// (see `log`), never attached.
#[cfg(feature = "datapath-log")]
#[classifier]
pub fn meshnet_log(ctx: TcContext) -> i32 {
    log::program::run(&ctx)
}

/// The floor for benchmarks: an empty tc program in the same object, built the same way.
#[classifier]
pub fn meshnet_empty(_ctx: TcContext) -> i32 {
    nat::PASS
}

/// Benchmark floor: a new flow's lookup and its two inserts, nothing else (see `floor`).
#[cfg(feature = "bench-floor")]
#[classifier]
pub fn meshnet_floor_two_inserts(ctx: TcContext) -> i32 {
    floor::new_flow(&ctx, true)
}

/// Benchmark floor: a new flow's lookup and one insert.
#[cfg(feature = "bench-floor")]
#[classifier]
pub fn meshnet_floor_one_insert(ctx: TcContext) -> i32 {
    floor::new_flow(&ctx, false)
}

/// Benchmark floor: an established flow's lookup and rewrite (see `floor`).
#[cfg(feature = "bench-floor")]
#[classifier]
pub fn meshnet_floor_hot(ctx: TcContext) -> i32 {
    floor::established(&ctx)
}

/// Benchmark floor: a decapsulation without a check, handed to the stack (see `floor`).
#[cfg(feature = "bench-floor")]
#[classifier]
pub fn meshnet_floor_decap_stack(ctx: TcContext) -> i32 {
    floor::decap(&ctx, false)
}

/// Benchmark floor: a decapsulation without a check, redirected out of the pod's port.
#[cfg(feature = "bench-floor")]
#[classifier]
pub fn meshnet_floor_decap_redirect(ctx: TcContext) -> i32 {
    floor::decap(&ctx, true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction: the verifier rejects any program with a reachable loop,
    // so a panic path that survived optimisation shows up at load time, not at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
