//! Waiting out the datapath's readers of a hash map element the agent replaced or deleted,
//! before that map can hand the element out again.
//!
//! From kernel 6.1 a hash map, preallocated or not, puts an element freed by an update or a
//! delete in a per-CPU cache and hands it to a later insert into that map at once (kernel
//! commits fba1a1c6c912 and 0fd7c5d43339), with no RCU grace period between: a program on
//! another CPU that looked the old element up a moment before may still be reading it, and
//! would read the next value instead (another key's, or half of each). Before 6.1 the kernel
//! frees such an element only after a grace period, except in preallocated maps. For the maps
//! only the agent writes (the peers' gateways, the tunnel settings, nodes, ports and
//! counters), the agent restores that guarantee itself: a write that takes an element of one
//! of them waits until a grace period has passed since the last write that freed one.
//!
//! A grace period is `membarrier(MEMBARRIER_CMD_GLOBAL)` (the kernel runs `synchronize_rcu()`;
//! a tc program runs whole inside an RCU read-side section), called on a thread of its own as
//! soon as something is freed, so that a take seconds later finds it long done: only a burst
//! of replacements in one sync waits, once between each two (about 9 ms each on the benchmark
//! machine). The flow maps cannot be covered so: the datapath inserts into them.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Condvar, Mutex, MutexGuard, OnceLock, PoisonError,
    },
    time::Duration,
};

use aya::util::KernelVersion;
use meshnet_common::names;
use tracing::{info, warn};

/// The maps whose freed elements are waited out.
pub const MAPS: [&str; 7] =
    [names::PEERS, names::TUN_CONFIG, names::TUN_NODES, names::TUN_PORTS, names::TUN_STATS, names::TUN_PORT_SLOTS, names::TUN_NODE_SLOTS];

/// Where the kernel refuses the call (`EINVAL` with `nohz_full`, `ENOSYS`, a seccomp filter):
/// a sleep that outlasts a program's run by many orders of magnitude, though it proves nothing.
const FALLBACK: Duration = Duration::from_millis(50);

/// Grace periods completed (`meshnet_map_reuse_grace_periods_total`).
static PERIODS: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct State {
    /// Frees so far (the agent's start counts as one: it cannot know what the agent before
    /// it freed a moment ago).
    freed: u64,
    /// Frees that a completed grace period followed.
    covered: u64,
    /// Per map, the count of frees when it last freed an element.
    last_free: BTreeMap<&'static str, u64>,
    worker: bool,
}

static STATE: Mutex<State> = Mutex::new(State { freed: 0, covered: 0, last_free: BTreeMap::new(), worker: false });
static DONE: Condvar = Condvar::new();
static WORK: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the kernel's hash maps hand a freed element to the next insert without a grace
/// period: where the kernel's BTF shows `struct bpf_htab` with its per-CPU allocator `ma`
/// (6.1, and kernels that back-ported it), else from the version (6.1 and later).
#[must_use]
pub fn kernel_reuses_freed_elements() -> bool {
    static REUSES: OnceLock<bool> = OnceLock::new();
    *REUSES.get_or_init(|| {
        let by_version = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 1, 0));
        match crate::ip_summed::struct_has_member(Path::new(crate::ip_summed::VMLINUX_BTF), "bpf_htab", "ma") {
            Ok(Some(has)) => {
                if has != by_version {
                    info!(btf = has, version = by_version, "the kernel's BTF and its version disagree on how hash maps reuse elements; the BTF decides");
                }
                has
            }
            // No BTF, or a BTF without the struct: the version decides.
            Ok(None) | Err(_) => by_version,
        }
    })
}

/// Whether `map`'s freed elements can be handed out again under a reader: a tunnel counter
/// slot, a pod's port slot or a node's slot is freed and taken again by the agent itself (on
/// any kernel), the others' elements by the kernel's hash maps.
fn needed(map: &str) -> bool {
    map == names::TUN_STATS || map == names::TUN_PORT_SLOTS || map == names::TUN_NODE_SLOTS || kernel_reuses_freed_elements()
}

/// Grace periods completed so far.
#[must_use]
pub fn periods() -> u64 {
    PERIODS.load(Ordering::Relaxed)
}

/// A write to `map` that may have freed an element (a replacement or a delete) was made: a
/// grace period starts in the background.
pub fn freed(map: &'static str) {
    if needed(map) {
        let mut s = state();
        s.freed += 1;
        let n = s.freed;
        s.last_free.insert(map, n);
        start(s);
    }
}

/// Before a write that takes an element of `map` (an insert, or a replacement): waits until a
/// grace period has passed since its last free, where the kernel needs that.
pub fn before_take(map: &'static str) {
    if !needed(map) {
        return;
    }
    let mut s = state();
    if s.freed == 0 {
        // The agent's start.
        s.freed = 1;
        start(s);
        s = state();
    }
    let want = s.last_free.get(map).copied().unwrap_or(1);
    while s.covered < want {
        s = DONE.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
}

/// Wakes the worker, starting it the first time.
fn start(mut s: MutexGuard<'static, State>) {
    if !s.worker {
        s.worker = true;
        let spawned = std::thread::Builder::new().name("meshnet-grace".into()).spawn(worker);
        if let Err(e) = spawned {
            // Without a thread the agent waits in line: never an unguarded reuse. Tried
            // again at the next free.
            static WARNED: OnceLock<()> = OnceLock::new();
            WARNED.get_or_init(|| warn!(error = %e, "could not start the grace-period thread; waiting in the agent's loop"));
            s.worker = false;
            let target = s.freed;
            drop(s);
            grace_period();
            let mut s = state();
            s.covered = s.covered.max(target);
            DONE.notify_all();
            return;
        }
    }
    WORK.notify_one();
}

fn worker() {
    let mut s = state();
    loop {
        while s.covered >= s.freed {
            s = WORK.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        // Frees made during this period wait for the next one.
        let target = s.freed;
        drop(s);
        grace_period();
        s = state();
        s.covered = s.covered.max(target);
        DONE.notify_all();
    }
}

fn grace_period() {
    static WARNED: OnceLock<()> = OnceLock::new();
    // SAFETY: MEMBARRIER_CMD_GLOBAL takes no pointer; flags 0, no CPU id.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, libc::MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        WARNED.get_or_init(|| {
            warn!(error = %e, fallback = ?FALLBACK, "membarrier(MEMBARRIER_CMD_GLOBAL) refused: waiting a fixed time instead before a map reuses an element the agent freed");
        });
        std::thread::sleep(FALLBACK);
    }
    PERIODS.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statics are shared by the crate's tests: one test walks the whole story, on the
    /// tunnel counter slots, which need it on every kernel.
    #[test]
    fn a_take_waits_for_a_grace_period_after_the_last_free() {
        let map = names::TUN_STATS;
        assert!(needed(map));
        // The pods' port slots too: the agent itself empties a slot and fills it again.
        assert!(needed(names::TUN_PORT_SLOTS));
        assert!(needed(names::TUN_NODE_SLOTS));
        // The start: one grace period, whatever was freed before.
        before_take(map);
        let after_start = periods();
        assert!(after_start >= 1);
        {
            let s = state();
            assert!(s.covered >= 1 && s.covered == s.freed, "{} {}", s.covered, s.freed);
        }
        // Takes with nothing freed do not wait for another one.
        before_take(map);
        assert_eq!(periods(), after_start);
        // A free starts one; the next take finds it passed.
        freed(map);
        before_take(map);
        assert!(periods() > after_start);
        let s = state();
        assert!(s.covered >= s.last_free[map]);
    }
}
