//! Waiting out the datapath's readers of a hash map element the agent replaced or deleted,
//! before that map can hand the element out again.
//!
//! From kernel 6.1 a hash map, preallocated or not, puts an element freed by an update or a
//! delete in a per-CPU cache and hands it to the next insert into that map on that CPU at
//! once (kernel commit 0fd7c5d43339), with no RCU grace period between: a program on another
//! CPU that looked the old element up a moment before may still be reading it, and would read
//! the next value instead (another key's, or half of each). Before 6.1 the kernel frees such
//! an element only after a grace period. For the maps only the agent writes (the peers'
//! gateways, the tunnel settings, nodes, ports and counters), the agent restores that
//! guarantee itself: between a write that freed an element of one of them and the next write
//! that takes one, it waits for a grace period. `membarrier(MEMBARRIER_CMD_GLOBAL)` is that
//! wait (the kernel runs `synchronize_rcu()`), and a tc program runs whole inside an RCU
//! read-side section. The flow maps cannot be covered so: the datapath inserts into them.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, OnceLock, PoisonError,
    },
    time::Duration,
};

use aya::util::KernelVersion;
use meshnet_common::names;
use tracing::warn;

/// The maps whose freed elements are waited out.
pub const MAPS: [&str; 5] = [names::PEERS, names::TUN_CONFIG, names::TUN_NODES, names::TUN_PORTS, names::TUN_STATS];

/// Where the kernel refuses the wait (`EINVAL` with `nohz_full`, `ENOSYS`, a seccomp filter):
/// a sleep that outlasts a program's run by many orders of magnitude, though it proves nothing.
const FALLBACK: Duration = Duration::from_millis(50);

static WAITS: AtomicU64 = AtomicU64::new(0);
static WARNED: AtomicBool = AtomicBool::new(false);
/// Maps with no element freed since the last wait. Empty at the start: an agent cannot know
/// what the one before it freed a moment ago.
static CLEAN: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());

/// Whether this kernel reuses freed hash elements at once (6.1 and later).
#[must_use]
pub fn needed() -> bool {
    static NEEDED: OnceLock<bool> = OnceLock::new();
    *NEEDED.get_or_init(|| KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 1, 0)))
}

/// Grace periods waited so far (`meshnet_map_reuse_waits_total`).
#[must_use]
pub fn waits() -> u64 {
    WAITS.load(Ordering::Relaxed)
}

/// A write to `map` that may have freed an element (a replacement or a delete) was made.
pub fn freed(map: &'static str) {
    CLEAN.lock().unwrap_or_else(PoisonError::into_inner).remove(map);
}

/// Before a write that takes an element of `map` (an insert, or a replacement): waits out the
/// readers of whatever was freed in it since the last wait, where the kernel needs that.
pub fn before_take(map: &'static str) {
    before_take_with(map, needed(), wait);
}

fn before_take_with(map: &'static str, needed: bool, wait: impl FnOnce()) {
    let mut clean = CLEAN.lock().unwrap_or_else(PoisonError::into_inner);
    if !needed || clean.contains(map) {
        return;
    }
    wait();
    WAITS.fetch_add(1, Ordering::Relaxed);
    // One grace period covers everything freed before it, in every map.
    clean.extend(MAPS);
}

fn wait() {
    // SAFETY: MEMBARRIER_CMD_GLOBAL takes no pointer; flags 0, no CPU id.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, libc::MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!(error = %std::io::Error::last_os_error(), fallback = ?FALLBACK, "membarrier(MEMBARRIER_CMD_GLOBAL) refused: waiting a fixed time instead before a map reuses an element the agent freed");
        }
        std::thread::sleep(FALLBACK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statics are shared by every test of the crate: one test walks the whole story.
    #[test]
    fn a_free_is_waited_out_once_before_the_next_take() {
        let mut waited = 0;
        // The start: nothing is known to be clean.
        before_take_with(names::PEERS, true, || waited += 1);
        assert_eq!(waited, 1);
        // Clean now, every map: inserts of new keys do not wait.
        before_take_with(names::PEERS, true, || waited += 1);
        before_take_with(names::TUN_PORTS, true, || waited += 1);
        assert_eq!(waited, 1);
        // A replacement in the peer map: the next take there waits, once.
        freed(names::PEERS);
        before_take_with(names::TUN_PORTS, true, || waited += 1);
        assert_eq!(waited, 1, "another map's take does not wait for the peer map's free");
        before_take_with(names::PEERS, true, || waited += 1);
        before_take_with(names::PEERS, true, || waited += 1);
        assert_eq!(waited, 2);
        // Kernels that defer frees themselves never wait.
        freed(names::TUN_CONFIG);
        before_take_with(names::TUN_CONFIG, false, || waited += 1);
        assert_eq!(waited, 2);
        // The real wait returns (membarrier, or the fallback sleep).
        wait();
    }
}
