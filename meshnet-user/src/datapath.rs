//! Loading the embedded eBPF object, attaching it to interfaces, and removing it again.
//!
//! Maps are pinned by name under the pin directory and reused when they are already there,
//! so flow state outlives the agent. tcx links are pinned (a tcx link dies with its last
//! fd); netlink clsact filters live on in the kernel by themselves and are found again by
//! their fixed priority and handle, or by their program name.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use aya::{
    maps::ProgramArray,
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use meshnet_common::names;
use tracing::{debug, info, warn};

use crate::{
    datapath_log::Choice,
    ip_summed,
    migrate::{Migration, NO_PREALLOC},
    pins::{Direction, Pins},
};

/// This module's own log target: its default, the module path `meshnet::datapath`, is the
/// target of the datapath's own lines (`crate::datapath_log::TARGET`).
const LOG: &str = "meshnet::loader";

/// The eBPF object, embedded at build time (see build.rs), so the binary ships alone.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshnet.bpf.o"));
/// Its logging build (`--datapath-log`, see [`crate::datapath_log`]): the same maps and
/// programs, plus aya-log's ring buffer and the log lines.
pub static EBPF_LOG_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshnet-datapath-log.bpf.o"));

/// Priority and handle of meshnet's netlink tc filters. Fixed, so that a restarted agent
/// replaces its own filter in place (no window without one) instead of stacking another.
pub const NL_PRIORITY: u16 = 0x4d4e; // "MN"
pub const NL_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Loads the logging object's line writer and puts it where the translating programs
/// tail-call it; nothing for an object without it. Before any program is attached, so that
/// no decision goes unlogged. The kernel empties the slot once no process holds the program
/// array (the agent exited): the programs then return their verdicts without a line.
fn install_log_program(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let Some(prog) = ebpf.program_mut(names::PROG_LOG) else { return Ok(()) };
    let prog: &mut SchedClassifier = prog.try_into()?;
    prog.load().with_context(|| format!("the kernel refused program {}", names::PROG_LOG))?;
    let fd = prog.fd()?.try_clone()?;
    let mut slots: ProgramArray<_> = ebpf
        .map_mut(names::LOG_PROGS)
        .with_context(|| format!("the logging object has no map {}", names::LOG_PROGS))?
        .try_into()?;
    slots.set(0, &fd, 0).context("installing the datapath's log program")?;
    Ok(())
}

/// Set in the agent's environment, takes the path kernels before 5.10 take (a FIB lookup and
/// `bpf_redirect` toward peer nodes and to pods, through the stack where the pod's neighbour
/// entry is not resolved yet) on any kernel: how the tests
/// hold that path to account on the newer kernels of the matrix, and a way out should
/// `bpf_redirect_neigh` misbehave somewhere.
pub const NO_REDIRECT_NEIGH_ENV: &str = "MESHNET_NO_REDIRECT_NEIGH";

/// Whether the kernel has `bpf_redirect_neigh` (5.10), as the object's load-time constant
/// `names::GLOBAL_HAVE_REDIRECT_NEIGH` wants it.
#[must_use]
pub fn have_redirect_neigh() -> u8 {
    if std::env::var_os(NO_REDIRECT_NEIGH_ENV).is_some_and(|v| v == "1") {
        return 0;
    }
    u8::from(KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 10, 0)))
}

/// Set in the agent's environment (to "1"), keeps the flow maps allocated on demand on any
/// kernel: how the tests hold that layout to account on the newer kernels of the matrix.
pub const ON_DEMAND_FLOWS_ENV: &str = "MESHNET_FLOW_MAPS_ON_DEMAND";

/// Flow maps larger than this are allocated on demand on any kernel: preallocated, each entry
/// of each map costs about 110 bytes from the start (29 MB per map at this size), charged to
/// the agent's memory cgroup.
pub const PREALLOC_MAX_FLOWS: u32 = 1 << 18;

/// The flow maps' `map_flags` for maps of `max_flows` entries: preallocated where the kernel
/// reuses a freed hash element at once anyway, allocated on demand otherwise.
///
/// Where the kernel frees a deleted element only after an RCU grace period (before 6.1), a
/// program still reading it never sees it reused, and that is worth its cost: a `kmalloc`
/// per new flow. Where it hands such an element to the next insert at once, exactly as a
/// preallocated map does (6.1 on, [`crate::grace::kernel_reuses_freed_elements`]), the grace
/// period is gone either way, and preallocation makes a new flow's two inserts about 2.5
/// times cheaper (docs/benchmarks.md), for memory allocated up front: up to
/// [`PREALLOC_MAX_FLOWS`] entries.
#[must_use]
pub fn flow_map_flags(max_flows: u32) -> u32 {
    if std::env::var_os(ON_DEMAND_FLOWS_ENV).is_some_and(|v| v == "1") || max_flows > PREALLOC_MAX_FLOWS {
        return NO_PREALLOC;
    }
    if crate::grace::kernel_reuses_freed_elements() {
        0
    } else {
        NO_PREALLOC
    }
}

/// `object` with its checksum-state placeholders rewritten (see [`crate::ip_summed`]): into
/// the read of `skb->ip_summed` at `layout`, or into the helper path without one. The second
/// value says whether the read is in (an object without placeholders has none).
pub fn prepare_object(object: &[u8], layout: Option<&ip_summed::Layout>) -> anyhow::Result<(Vec<u8>, bool)> {
    let (patched, sites) = ip_summed::patch(object, layout)?;
    Ok((patched, layout.is_some() && sites > 0))
}

/// Sets the flow maps' `map_flags` in `object` (see [`flow_map_flags`]).
pub fn set_flow_map_flags(object: &mut [u8], flags: u32) -> anyhow::Result<()> {
    for name in [names::NAT_FWD, names::NAT_REV] {
        set_map_flags(object, name, flags)?;
    }
    Ok(())
}

/// Rewrites the `map_flags` of the hash map `name` in `object`'s legacy map definitions
/// (`struct bpf_map_def`: type, key size, value size, max entries, flags, ...), which aya
/// passes to the kernel as they are; it has no setter for them. An object without that map
/// (one given with `--ebpf-object`) is left alone.
fn set_map_flags(object: &mut [u8], name: &str, flags: u32) -> anyhow::Result<()> {
    /// `BPF_MAP_TYPE_HASH`.
    const HASH: u32 = 1;
    const FLAGS_AT: usize = 16;
    let at = {
        let file = object::File::parse(&*object).context("the eBPF object is not an ELF file")?;
        if !file.is_little_endian() {
            bail!("the eBPF object is not little-endian");
        }
        let Some(sym) = file.symbols().find(|s| s.name() == Ok(name)) else {
            return Ok(());
        };
        let section = sym.section_index().map(|i| file.section_by_index(i)).transpose()?;
        // "maps", or "maps/<name>": the legacy definitions aya reads.
        let Some((section, (start, len))) =
            section.filter(|s| s.name().is_ok_and(|n| n.starts_with("maps"))).and_then(|s| s.file_range().map(|r| (s, r)))
        else {
            bail!("map {name} of the eBPF object is not a legacy map definition");
        };
        let end = FLAGS_AT as u64 + 4;
        let off = sym.address().checked_sub(section.address()).filter(|o| sym.size() >= end && o.checked_add(end).is_some_and(|e| e <= len));
        let at = off.and_then(|o| start.checked_add(o)).and_then(|a| usize::try_from(a).ok());
        at.filter(|a| a.checked_add(FLAGS_AT + 4).is_some_and(|e| e <= object.len()))
            .with_context(|| format!("map {name}'s definition lies outside its section"))?
    };
    let word = |o: usize| u32::from_le_bytes([object[o], object[o + 1], object[o + 2], object[o + 3]]);
    if word(at) != HASH {
        bail!("map {name} of the eBPF object is not a hash map (type {})", word(at));
    }
    let cur = word(at + FLAGS_AT);
    object[at + FLAGS_AT..at + FLAGS_AT + 4].copy_from_slice(&((cur & !NO_PREALLOC) | flags).to_le_bytes());
    Ok(())
}

/// The running kernel's `sk_buff` layout for [`prepare_object`], where it allows the read.
#[must_use]
pub fn skb_layout() -> Option<ip_summed::Layout> {
    ip_summed::Layout::current()
        .map_err(|e| {
            info!(target: LOG, reason = %format!("{e:#}"), "the datapath asks the checksum helper for the skb's checksum state");
        })
        .ok()
}

/// Runs `load` with the object that reads the skb's checksum state at `layout`, and again
/// with the one that asks the checksum helper should the kernel refuse one of its programs
/// (a kernel without a JIT cannot call a kfunc, say); any other failure is returned as it is.
/// The second value says which one loaded.
pub fn with_checksum_variant<T>(
    object: &[u8],
    layout: Option<&ip_summed::Layout>,
    mut load: impl FnMut(&[u8]) -> anyhow::Result<T>,
) -> anyhow::Result<(T, bool)> {
    let (patched, reads) = prepare_object(object, layout)?;
    if !reads {
        return Ok((load(&patched)?, false));
    }
    match load(&patched) {
        Ok(t) => {
            info!(target: LOG, "the datapath reads the skb's checksum state (bpf_cast_to_kern_ctx)");
            Ok((t, true))
        }
        Err(e) if e.chain().any(|c| c.downcast_ref::<aya::programs::ProgramError>().is_some()) => {
            warn!(target: LOG, error = %format!("{e:#}"), "the kernel refused the datapath that reads the skb's checksum state; loading the one that asks the checksum helper");
            let (patched, _) = prepare_object(object, None)?;
            let t = load(&patched).map_err(|e2| e2.context(format!("after the variant that reads the skb's checksum state failed too: {e:#}")))?;
            Ok((t, false))
        }
        Err(e) => Err(e),
    }
}

/// How programs are attached to interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum AttachMode {
    /// tcx links where the kernel has them (>= 6.6), netlink clsact otherwise or when tcx
    /// is refused.
    #[default]
    Auto,
    /// tcx links only.
    Tcx,
    /// netlink clsact filters only (the path kernels before 6.6 take).
    Netlink,
}

/// How one interface and direction ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    Tcx,
    Netlink,
}

impl Direction {
    fn tc(self) -> TcAttachType {
        match self {
            Direction::Ingress | Direction::Uplink => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

/// The loaded object with its maps pinned.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub pins: Pins,
    /// Old maps whose entries are still to be carried over (see [`crate::migrate`]).
    migration: Option<Migration>,
    /// When the last copy of a migration ended, and how long it took.
    last_copy: Option<(std::time::Instant, std::time::Duration)>,
    /// A swap's copy was skipped (the last one was slow): [`Self::copy_owed_migration`] runs
    /// it at the next rescan, not only at the next swap, which an interface whose attach keeps
    /// failing could put off for good.
    copy_owed: bool,
}

/// A migration's copy this long is not repeated after every swap (see `catch_up_migration`).
const SLOW_COPY: std::time::Duration = std::time::Duration::from_millis(10);

impl Datapath {
    /// Loads the embedded object `choice` names, reusing maps already pinned under `pins`,
    /// and loads (but does not attach) the programs.
    pub fn load(pins: &Pins, max_flows: u32, choice: Choice) -> anyhow::Result<Self> {
        let object = match choice {
            Choice::Default => EBPF_OBJECT,
            Choice::Logging { .. } => EBPF_LOG_OBJECT,
        };
        Self::load_object(pins, max_flows, object, choice)
    }

    /// [`Self::load`] with another object; with [`Choice::Logging`] its log level is set,
    /// if it has one.
    pub fn load_object(pins: &Pins, max_flows: u32, object: &[u8], choice: Choice) -> anyhow::Result<Self> {
        pins.prepare()?;
        let migration = Migration::prepare(pins, max_flows)?;
        let fresh: Vec<_> = names::ALL_MAPS.iter().map(|n| pins.map(n)).filter(|p| !p.exists()).collect();
        let layout = skb_layout();
        let how = if flow_map_flags(max_flows) == 0 { "preallocated" } else { "allocated on demand" };
        info!(target: LOG, "the flow maps are {how}");
        let loaded = with_checksum_variant(object, layout.as_ref(), |object| {
            Self::load_pinned(pins, max_flows, object, choice)
        })
        .and_then(|(dp, _)| {
            let started = std::time::Instant::now();
            if !migration.is_empty() {
                // Before any program of this build runs, so that the first packets already
                // find their flows.
                let n = migration.copy(pins, true)?;
                info!(target: LOG, entries = n, "copied the old maps' entries into this build's maps");
            }
            Ok((dp, started))
        });
        match loaded {
            Ok((mut dp, started)) => {
                dp.last_copy = Some((std::time::Instant::now(), started.elapsed()));
                dp.migration = Some(migration);
                // The tunnel counters of builds before v2 (a per-CPU hash this build cannot
                // convert into its slots): they start again from zero.
                let old = pins.map(names::TUN_STATS_V1);
                if old.exists() {
                    match std::fs::remove_file(&old) {
                        Ok(()) => info!(target: LOG, map = names::TUN_STATS_V1, "unpinned the tunnel counters of an earlier build; they start again from zero"),
                        Err(e) => warn!(target: LOG, path = %old.display(), error = %e, "could not unpin the tunnel counters of an earlier build"),
                    }
                }
                Ok(dp)
            }
            Err(e) => {
                // Leave no half-made state behind: drop the pins this attempt created, and
                // put back the maps moved aside for migration.
                for p in fresh {
                    let _ = std::fs::remove_file(p);
                }
                migration.restore(pins);
                Err(e)
            }
        }
    }

    /// While a migration is pending, the old programs still run on the interfaces not swapped
    /// yet and add flows to the old maps, whose replies may already reach an interface this
    /// build runs on: what they added is copied over after each swap (entries already in the
    /// new maps win). A copy that takes [`SLOW_COPY`] or more (a full flow table) runs at most
    /// every other of its own durations, so that a node with many pods is not held up long.
    fn catch_up_migration(&mut self) {
        let Some(m) = self.migration.as_ref().filter(|m| !m.is_empty()) else { return };
        if self.last_copy.is_some_and(|(end, took)| took >= SLOW_COPY && end.elapsed() < took) {
            self.copy_owed = true;
            return;
        }
        self.copy_owed = false;
        let started = std::time::Instant::now();
        if let Err(e) = m.copy(&self.pins, false) {
            warn!(target: LOG, error = %format!("{e:#}"), "copying the old maps' new entries failed; they are copied again once every interface runs this build");
        }
        self.last_copy = Some((std::time::Instant::now(), started.elapsed()));
    }

    /// Runs a copy a swap skipped, once its pause is over. Flows the old programs made just
    /// before that swap have their replies translated only once they are copied.
    pub fn copy_owed_migration(&mut self) {
        if self.copy_owed {
            self.catch_up_migration();
        }
    }

    /// Whether old maps are still to be carried over and unpinned.
    #[must_use]
    pub fn migration_pending(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| !m.is_empty())
    }

    /// Ends a migration once this build's programs are attached everywhere: copies what the
    /// old programs added meanwhile and removes the old pins.
    pub fn finish_migration(&mut self) -> anyhow::Result<()> {
        match self.migration.take() {
            Some(m) if !m.is_empty() => m.finish(&self.pins),
            _ => Ok(()),
        }
    }

    /// Loads the embedded object with fresh, unpinned maps: for packet tests and benchmarks
    /// through BPF_PROG_TEST_RUN, which need no interface and no bpffs.
    pub fn load_unpinned(max_flows: u32) -> anyhow::Result<Ebpf> {
        Self::load_unpinned_object(max_flows, EBPF_OBJECT)
    }

    /// [`Self::load_unpinned`] for another object (a build's output, a variant).
    pub fn load_unpinned_object(max_flows: u32, object: &[u8]) -> anyhow::Result<Ebpf> {
        let layout = skb_layout();
        Ok(with_checksum_variant(object, layout.as_ref(), |object| Self::load_unpinned_as_is(max_flows, object))?.0)
    }

    /// [`Self::load_unpinned_object`] without rewriting the object's placeholders (see
    /// [`prepare_object`]): for a caller that chose the variant itself.
    pub fn load_unpinned_as_is(max_flows: u32, object: &[u8]) -> anyhow::Result<Ebpf> {
        Self::load_unpinned_with_flow_flags(max_flows, object, flow_map_flags(max_flows))
    }

    /// [`Self::load_unpinned_as_is`] with other maps sized as given: for tests that fill one,
    /// where a full-sized table costs minutes in a VM.
    pub fn load_unpinned_resized(max_flows: u32, object: &[u8], sizes: &[(&str, u32)]) -> anyhow::Result<Ebpf> {
        Self::load_unpinned_with(max_flows, object, flow_map_flags(max_flows), sizes)
    }

    /// [`Self::load_unpinned_as_is`] with the flow maps' `map_flags` given: for benchmarks
    /// that measure the other allocation.
    pub fn load_unpinned_with_flow_flags(max_flows: u32, object: &[u8], flow_flags: u32) -> anyhow::Result<Ebpf> {
        Self::load_unpinned_with(max_flows, object, flow_flags, &[])
    }

    fn load_unpinned_with(max_flows: u32, object: &[u8], flow_flags: u32, sizes: &[(&str, u32)]) -> anyhow::Result<Ebpf> {
        let mut object = object.to_vec();
        set_flow_map_flags(&mut object, flow_flags)?;
        let object = &object[..];
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::NAT_FWD, max_flows);
        loader.map_max_entries(names::NAT_REV, max_flows);
        for (name, size) in sizes {
            loader.map_max_entries(name, *size);
        }
        let neigh = have_redirect_neigh();
        loader.override_global(names::GLOBAL_HAVE_REDIRECT_NEIGH, &neigh, false);
        let mut ebpf = loader.load(object).context("loading meshnet's eBPF object")?;
        for prog in [names::PROG_FROM_POD, names::PROG_TO_POD, names::PROG_TUNNEL_IN, names::PROG_EMPTY] {
            let p: &mut SchedClassifier = ebpf.program_mut(prog).context("program missing")?.try_into()?;
            p.load().with_context(|| format!("the kernel refused program {prog}"))?;
        }
        install_log_program(&mut ebpf)?;
        Ok(ebpf)
    }

    fn load_pinned(pins: &Pins, max_flows: u32, object: &[u8], choice: Choice) -> anyhow::Result<Self> {
        let level = match choice {
            Choice::Logging { level } => Some(level),
            Choice::Default => None,
        };
        let mut loader = EbpfLoader::new();
        if let Some(level) = &level {
            // Not required to exist: any object may be loaded with --ebpf-object.
            loader.override_global(names::LOG_LEVEL, level, false);
        }
        // Not required either: an object from before tunnel mode has no such global.
        let neigh = have_redirect_neigh();
        loader.override_global(names::GLOBAL_HAVE_REDIRECT_NEIGH, &neigh, false);
        let paths: Vec<_> = names::ALL_MAPS.iter().map(|n| (*n, pins.map(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(names::NAT_FWD, max_flows);
        loader.map_max_entries(names::NAT_REV, max_flows);
        let mut object = object.to_vec();
        set_flow_map_flags(&mut object, flow_map_flags(max_flows))?;
        let mut ebpf = loader.load(&object).context(
            "loading meshnet's eBPF object (needs root or CAP_BPF+CAP_NET_ADMIN and a kernel with \
             LPM and LRU maps; `meshnet doctor` checks the kernel, docs/kernel-upgrade.md explains)",
        )?;
        for name in names::ALL_MAPS {
            if ebpf.map(name).is_none() {
                bail!("the embedded eBPF object has no map {name}: it was built from another version");
            }
        }
        for prog in [names::PROG_FROM_POD, names::PROG_TO_POD, names::PROG_TUNNEL_IN] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(prog)
                .with_context(|| format!("the embedded eBPF object has no program {prog}"))?
                .try_into()?;
            p.load().with_context(|| format!("the kernel refused program {prog}"))?;
        }
        install_log_program(&mut ebpf)?;
        Ok(Self { ebpf, pins: pins.clone(), migration: None, last_copy: None, copy_owed: false })
    }

    /// Attaches `from_pod` (ingress) and `to_pod` (egress) to `iface`, replacing meshnet's
    /// previous programs there atomically if it had any. One that fails leaves the interface
    /// as it was (see [`AttachFailed`]).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, AttachFailed> {
        let how = self.attach_hooks(iface, &[Direction::Ingress, Direction::Egress], mode)?;
        self.catch_up_migration();
        Ok(how)
    }

    /// Attaches the tunnel's decapsulating program (ingress) to the uplink `iface`.
    pub fn attach_uplink(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, AttachFailed> {
        self.attach_hooks(iface, &[Direction::Uplink], mode)
    }

    /// Attaches the programs of `dirs` to `iface`, all or none of them. Should one fail, each
    /// hook tried gets back what meshnet had on it before (an earlier agent's program, which
    /// still translates its pod's flows) or loses what this attempt added where there was
    /// nothing: half a pair is worse than none (from_pod alone would send a pod's packets to
    /// the gateway with no to_pod to restore the replies), and none is worse than the
    /// earlier pair.
    fn attach_hooks(&mut self, iface: &str, dirs: &[Direction], mode: AttachMode) -> Result<Attached, AttachFailed> {
        let before: Vec<Hook> = dirs.iter().map(|d| Hook::before(&self.pins, iface, *d)).collect();
        // A hook whose state cannot be read (a netlink dump cut short while pods come and go)
        // may hold an earlier agent's program, which an attach would replace and could not
        // put back should it fail: nothing is touched, and the next rescan tries again.
        if let Some(hook) = before.iter().find(|h| h.unknown()) {
            let error = anyhow::anyhow!("cannot read what is attached to {iface} {}; left as it is", hook.dir.as_str());
            return Err(AttachFailed { error, earlier_run: true });
        }
        let mut how = Attached::Tcx;
        for (i, dir) in dirs.iter().enumerate() {
            match self.attach_one(iface, *dir, mode) {
                Ok(h) => how = h,
                Err(error) => {
                    let earlier_run = before.iter().any(Hook::had_programs);
                    // The failed hook too: its attempt may have replaced a link before failing.
                    for hook in before.into_iter().take(i + 1) {
                        let dir = hook.dir;
                        if let Err(e) = hook.put_back(&self.pins, iface) {
                            warn!(target: LOG, iface, direction = dir.as_str(), error = %format!("{e:#}"), "could not put back what was attached before");
                        }
                    }
                    return Err(AttachFailed { error, earlier_run });
                }
            }
        }
        Ok(how)
    }

    fn attach_one(&mut self, iface: &str, dir: Direction, mode: AttachMode) -> anyhow::Result<Attached> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(dir.program())
            .context("program missing")?
            .try_into()?;
        let link_pin = self.pins.link(iface, dir);
        let try_tcx = match mode {
            AttachMode::Tcx => true,
            AttachMode::Netlink => false,
            AttachMode::Auto => KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
        };
        if try_tcx {
            match attach_tcx(prog, iface, dir, &link_pin).or_else(|e| {
                // A pinned link can outlive its interface (a pod re-created under the same
                // name while no agent ran): the kernel refuses to update a link whose device
                // is gone, and one whose device was renamed away is no longer this
                // interface's. Either way it goes, and a new link is made.
                if !link_pin.exists() {
                    return Err(e);
                }
                debug!(target: LOG, iface, direction = dir.as_str(), error = %format!("{e:#}"), "stale tcx link; replacing it");
                if let Ok(link) = PinnedLink::from_pin(&link_pin) {
                    let _ = link.unpin();
                }
                let _ = std::fs::remove_file(&link_pin);
                attach_tcx(prog, iface, dir, &link_pin)
            }) {
                Ok(()) => {
                    // A netlink filter an earlier agent left here (before a kernel upgrade,
                    // or with --attach-mode netlink) would run a second, stale copy.
                    let _ = tc::qdisc_detach_program(iface, dir.tc(), dir.program());
                    return Ok(Attached::Tcx);
                }
                Err(e) if mode == AttachMode::Auto => {
                    warn!(target: LOG, iface, direction = dir.as_str(), error = %format!("{e:#}"), "tcx attach refused; falling back to netlink clsact");
                }
                Err(e) => return Err(e),
            }
        }
        attach_netlink(prog, iface, dir)?;
        if link_pin.exists() {
            // The other way round: retire our tcx link now that the filter is in place.
            if let Ok(link) = PinnedLink::from_pin(&link_pin) {
                let _ = link.unpin();
            }
        }
        Ok(Attached::Netlink)
    }
}

/// An attach that failed, having left the interface as it was.
#[derive(Debug)]
pub struct AttachFailed {
    pub error: anyhow::Error,
    /// meshnet's programs were on the interface before (an earlier agent's, or ones whose
    /// state could not be read): they run on, with the maps they were loaded with.
    pub earlier_run: bool,
}

impl std::fmt::Display for AttachFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// The parent of a tc hook's filters (`TC_H_CLSACT` with `TC_H_MIN_INGRESS` or
/// `TC_H_MIN_EGRESS`), as the filters of that hook are listed.
fn clsact_parent(dir: Direction) -> u32 {
    match dir.tc() {
        TcAttachType::Egress => 0xffff_fff3,
        _ => 0xffff_fff2,
    }
}

/// What meshnet had on one hook of an interface before an attach, to put back should the
/// attach fail.
enum Before {
    Nothing,
    /// A program held open, so that the kernel keeps it while another replaces it.
    Program { id: u32, _fd: std::os::fd::OwnedFd },
    /// Unreadable: left alone whatever happens.
    Unknown,
}

impl Before {
    fn program(id: u32) -> anyhow::Result<Self> {
        Ok(Self::Program { id, _fd: prog_fd_by_id(id).with_context(|| format!("opening program {id}"))? })
    }

    fn from(found: anyhow::Result<Option<u32>>) -> Self {
        match found.and_then(|id| id.map_or(Ok(Self::Nothing), Self::program)) {
            Ok(b) => b,
            Err(e) => {
                debug!(target: LOG, error = %format!("{e:#}"), "cannot tell what is attached before an attach");
                Self::Unknown
            }
        }
    }
}

/// One hook of an interface as meshnet had it before an attach: its pinned tcx link's
/// program, if that link is on this interface, and its netlink filter's.
struct Hook {
    dir: Direction,
    tcx: Before,
    netlink: Before,
}

impl Hook {
    fn before(pins: &Pins, iface: &str, dir: Direction) -> Self {
        // A read that fails once (a dump interrupted by a change) is asked again.
        let mut hook = Self::read(pins, iface, dir);
        for _ in 0..2 {
            if !hook.unknown() {
                break;
            }
            hook = Self::read(pins, iface, dir);
        }
        hook
    }

    fn read(pins: &Pins, iface: &str, dir: Direction) -> Self {
        let pin = pins.link(iface, dir);
        let tcx = if pin.exists() { Before::from(pinned_program_on(&pin, iface, dir)) } else { Before::Nothing };
        let netlink = Before::from(nix::net::if_::if_nametoindex(iface).map_err(Into::into).and_then(|index| filter_program(index, dir)));
        Self { dir, tcx, netlink }
    }

    fn unknown(&self) -> bool {
        matches!(self.tcx, Before::Unknown) || matches!(self.netlink, Before::Unknown)
    }

    fn had_programs(&self) -> bool {
        [&self.tcx, &self.netlink].iter().any(|b| !matches!(b, Before::Nothing))
    }

    /// Puts the hook back as it was. The earlier programs go back first and what this
    /// attempt added goes after: both for a moment are better than neither. Every step is
    /// taken, whichever fails: one that cannot put a program back must not leave what this
    /// attempt added on the other.
    fn put_back(self, pins: &Pins, iface: &str) -> anyhow::Result<()> {
        let pin = pins.link(iface, self.dir);
        let mut failed = None;
        if let Before::Program { id, .. } = &self.tcx {
            if let Err(e) = program_by_id(*id, self.dir).and_then(|mut p| attach_tcx(&mut p, iface, self.dir, &pin)) {
                failed = Some(e);
            }
        }
        if let Before::Program { id, .. } = &self.netlink {
            if let Err(e) = program_by_id(*id, self.dir).and_then(|mut p| attach_netlink(&mut p, iface, self.dir)) {
                failed.get_or_insert(e);
            }
        }
        if matches!(self.tcx, Before::Nothing) {
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                let _ = link.unpin();
            }
        }
        if matches!(self.netlink, Before::Nothing) {
            let _ = tc::qdisc_detach_program(iface, self.dir.tc(), self.dir.program());
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Whether the device at `index`, named `now`, runs the ingress program meshnet attached to
/// the pod interface it knew as `was`: its pinned tcx link's program among the device's tcx
/// programs, or meshnet's netlink filter on it. A device that took a deleted one's index
/// (one moved in from another namespace may keep its index) runs neither.
#[must_use]
pub fn runs_ours(pins: &Pins, was: &str, now: &str, index: u32) -> bool {
    runs_ours_on(pins, Direction::Ingress, was, now, index)
}

/// [`runs_ours`] for an uplink's decapsulating program.
#[must_use]
pub fn runs_ours_on_uplink(pins: &Pins, was: &str, now: &str, index: u32) -> bool {
    runs_ours_on(pins, Direction::Uplink, was, now, index)
}

fn runs_ours_on(pins: &Pins, dir: Direction, was: &str, now: &str, index: u32) -> bool {
    let runs = |found: anyhow::Result<Option<u32>>| found.is_ok_and(|id| id.is_some());
    runs(pinned_program_on(&pins.link(was, dir), now, dir)) || runs(filter_program(index, dir))
}

/// The program of the tcx link pinned at `pin`, if that link is on `iface`: a link follows
/// the device it was made on, which a rename or a re-created device leaves elsewhere.
fn pinned_program_on(pin: &Path, iface: &str, dir: Direction) -> anyhow::Result<Option<u32>> {
    let id = FdLink::from(PinnedLink::from_pin(pin)?).info()?.program_id();
    let (_, on_iface) = SchedClassifier::query_tcx(iface, dir.tc())?;
    Ok(on_iface.iter().any(|p| p.id() == id).then_some(id))
}

/// The id of the program in the link pinned at `pin`, and its name (as the kernel keeps it:
/// its first 15 bytes).
fn pinned_link_program(pin: &Path) -> anyhow::Result<(u32, Option<String>)> {
    let id = FdLink::from(PinnedLink::from_pin(pin)?).info()?.program_id();
    // Listing programs by id takes CAP_SYS_ADMIN, which a detach with only the agent's
    // capabilities lacks: `None` then, the program unknown.
    let info = aya::programs::loaded_programs().filter_map(Result::ok).find(|p| p.id() == id);
    Ok((id, info.map(|p| p.name_as_str().unwrap_or_default().to_string())))
}

/// How long `detach` waits for the kernel to take unpinned links off their hooks.
pub const DETACH_WAIT: Duration = Duration::from_secs(10);

/// How many of `programs` are still on a tcx hook of any interface, waiting up to `wait` for
/// none to be. The kernel detaches an unpinned link in a deferred work item that takes the
/// RTNL lock, so a node busy with netns or device changes can keep it attached for a while
/// after the unpin returned.
fn still_on_tcx_hooks(programs: &[u32], wait: Duration) -> usize {
    if programs.is_empty() {
        return 0;
    }
    let count = || {
        let Ok(all) = nix::net::if_::if_nameindex() else { return 0 };
        let names: Vec<String> = all.iter().filter_map(|i| i.name().to_str().ok().map(str::to_owned)).collect();
        names
            .iter()
            .flat_map(|iface| [TcAttachType::Ingress, TcAttachType::Egress].map(|d| SchedClassifier::query_tcx(iface, d)))
            .filter_map(Result::ok)
            .flat_map(|(_, on_hook)| on_hook)
            .filter(|p| programs.contains(&p.id()))
            .count()
    };
    let deadline = Instant::now() + wait;
    loop {
        let left = count();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a program the kernel names `name` is one meshnet attaches through a tcx link. The
/// kernel keeps 15 bytes of a name, which leave meshnet's three apart.
fn is_link_program(name: &str) -> bool {
    const KEPT: usize = 15;
    [Direction::Ingress, Direction::Egress, Direction::Uplink].iter().any(|d| {
        let full = d.program();
        !name.is_empty() && full.get(..KEPT).unwrap_or(full) == name
    })
}

/// The program of meshnet's netlink filter on the device at `index`, if it has one.
fn filter_program(index: u32, dir: Direction) -> anyhow::Result<Option<u32>> {
    Ok(crate::netlink::tc_filter_program(index, clsact_parent(dir), NL_PRIORITY, NL_HANDLE.into())?)
}

/// `BPF_PROG_GET_FD_BY_ID`: a reference to a loaded program, which keeps it loaded.
fn prog_fd_by_id(id: u32) -> io::Result<std::os::fd::OwnedFd> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    /// `union bpf_attr` as this command reads it: the id, `next_id`, `open_flags`.
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr { id, next_id: 0, open_flags: 0 };
    // SAFETY: the bpf syscall with a `bpf_attr` of the size given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, &raw mut attr, size_of::<Attr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd, which nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A loaded program by its id, as a tc classifier named after `dir`'s program (the name a
/// netlink filter carries).
fn program_by_id(id: u32, dir: Direction) -> anyhow::Result<SchedClassifier> {
    let info = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .with_context(|| format!("program {id} is no longer loaded"))?;
    Ok(SchedClassifier::from_program_info(info, dir.program().into())?)
}

fn attach_tcx(prog: &mut SchedClassifier, iface: &str, dir: Direction, link_pin: &Path) -> anyhow::Result<()> {
    // Checked by path: BPF_OBJ_GET on a missing pin answers EPERM on some kernels, not ENOENT.
    if link_pin.exists() {
        // Our link from an earlier agent: swap the program inside it, which the kernel does
        // atomically, so no packet goes untranslated.
        let old = PinnedLink::from_pin(link_pin)
            .with_context(|| format!("opening pinned link {}", link_pin.display()))?;
        let link = SchedClassifierLink::try_from(FdLink::from(old))?;
        let id = prog.attach_to_link(link).context("replacing the program in a pinned tcx link")?;
        // The pin keeps the link; dropping our fd must not detach it.
        let _fd: FdLink = prog.take_link(id)?.try_into()?;
        // The pin is named after the interface, but the link follows the device it was made
        // on: after a rename, or a device deleted and re-created under this name, it is not
        // this interface's.
        let ours = prog.info()?.id();
        let (_, on_iface) = SchedClassifier::query_tcx(iface, dir.tc()).with_context(|| format!("querying tcx on {iface}"))?;
        if !on_iface.iter().any(|p| p.id() == ours) {
            anyhow::bail!("pinned link {} is not on {iface}", link_pin.display());
        }
        debug!(target: LOG, iface, direction = dir.as_str(), "replaced program in pinned tcx link");
    } else {
        let id = prog
            .attach_with_options(iface, dir.tc(), TcAttachOptions::TcxOrder(LinkOrder::default()))
            .with_context(|| format!("tcx attach to {iface} {}", dir.as_str()))?;
        let fd: FdLink = prog.take_link(id)?.try_into()?;
        fd.pin(link_pin).with_context(|| format!("pinning tcx link at {}", link_pin.display()))?;
        debug!(target: LOG, iface, direction = dir.as_str(), "attached new tcx link");
    }
    Ok(())
}

fn attach_netlink(prog: &mut SchedClassifier, iface: &str, dir: Direction) -> anyhow::Result<()> {
    if let Err(e) = tc::qdisc_add_clsact(iface) {
        // EEXIST: the interface already has a clsact qdisc (ours or another tool's).
        let exists = matches!(&e, tc::TcError::NetlinkError(ne) if ne.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(e).with_context(|| format!("adding clsact qdisc to {iface}"));
        }
    }
    let existing = SchedClassifierLink::attached(iface, dir.tc(), NL_PRIORITY, NL_HANDLE, None)?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => {
            debug!(target: LOG, iface, direction = dir.as_str(), "replaced program in netlink filter");
            id
        }
        Err(_) => prog
            .attach_with_options(
                iface,
                dir.tc(),
                TcAttachOptions::Netlink(NlOptions { priority: NL_PRIORITY, handle: NL_HANDLE, classid: None }),
            )
            .with_context(|| format!("netlink tc attach to {iface} {}", dir.as_str()))?,
    };
    // A netlink filter outlives the agent only if aya does not detach it on drop.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// The interface globs of a config.
pub fn interface_globs(patterns: &[String]) -> anyhow::Result<Vec<glob::Pattern>> {
    patterns.iter().map(|p| glob::Pattern::new(p).with_context(|| format!("bad interface glob {p:?}"))).collect()
}

/// Interfaces in this network namespace whose names match any of `patterns`. One dump of
/// the links: it may miss a device while others come and go (see `index_name`).
pub fn matching_interfaces(patterns: &[String]) -> anyhow::Result<BTreeMap<String, u32>> {
    let globs = interface_globs(patterns)?;
    let all = nix::net::if_::if_nameindex().context("listing interfaces")?;
    Ok(all
        .iter()
        .filter_map(|i| Some((i.name().to_str().ok()?.to_owned(), i.index())))
        .filter(|(name, _)| globs.iter().any(|g| g.matches(name)))
        .collect())
}

/// The current name of the device with this index, `None` when there is none: asked of the
/// kernel by index (`SIOCGIFNAME`), so it answers for one device whatever the others do.
pub fn index_name(index: u32) -> io::Result<Option<String>> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO | libc::ENODEV) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(Some(name.to_string_lossy().into_owned()))
}

/// Renames the link pins of interfaces renamed in place (`from` to `to`): a pin is named
/// after its interface, and the next agent must find these devices' links under their new
/// names, to swap its programs into them rather than add a second pair beside them. Each
/// goes through a name of its own first, so that interfaces that swapped names swap pins.
/// Says, for each move, whether it failed: its links are then unpinned (so detached), and
/// the interface needs attaching again.
#[must_use]
pub fn move_pins(pins: &Pins, moves: &[(String, String)]) -> Vec<bool> {
    const DIRS: [Direction; 3] = [Direction::Ingress, Direction::Egress, Direction::Uplink];
    // '%' never starts an interface's pin name (see `Pins::link`).
    let aside = |i: usize, dir: Direction| pins.links_dir().join(format!("%moving{i}@{}", dir.as_str()));
    let unpin = |path: &Path| {
        if let Ok(link) = PinnedLink::from_pin(path) {
            let _ = link.unpin();
        }
    };
    let mut failed = vec![false; moves.len()];
    for (i, (from, _)) in moves.iter().enumerate() {
        for dir in DIRS {
            let pin = pins.link(from, dir);
            if pin.exists() && std::fs::rename(&pin, aside(i, dir)).is_err() {
                failed[i] = true;
            }
        }
        // Now, before another move may put its pins under this name.
        if failed[i] {
            for dir in DIRS {
                unpin(&aside(i, dir));
                unpin(&pins.link(from, dir));
            }
        }
    }
    for (i, (_, to)) in moves.iter().enumerate() {
        if failed[i] {
            continue;
        }
        for dir in DIRS {
            let from = aside(i, dir);
            if from.exists() && std::fs::rename(&from, pins.link(to, dir)).is_err() {
                failed[i] = true;
            }
        }
        if failed[i] {
            for dir in DIRS {
                unpin(&aside(i, dir));
                unpin(&pins.link(to, dir));
            }
        }
    }
    failed
}

/// Removes meshnet's programs from one interface (tcx link and netlink filters), e.g. when
/// it no longer matches the config. Also right for an interface that is already gone: then
/// only the pins are left to remove. With the `ifindex` it had when attached, a renamed
/// interface is found under its new name, so its netlink filters go too.
pub fn detach_interface(pins: &Pins, iface: &str, ifindex: Option<u32>) {
    let current = ifindex.and_then(name_of_index);
    for dir in [Direction::Ingress, Direction::Egress, Direction::Uplink] {
        let pin = pins.link(iface, dir);
        // Unpinning drops the last reference of the link, which detaches it wherever its
        // device now is.
        if let Ok(link) = PinnedLink::from_pin(&pin) {
            let _ = link.unpin();
        }
        let _ = std::fs::remove_file(&pin);
        let _ = tc::qdisc_detach_program(current.as_deref().unwrap_or(iface), dir.tc(), dir.program());
    }
}

/// The current name of an interface index, if it still exists.
fn name_of_index(index: u32) -> Option<String> {
    index_name(index).ok().flatten()
}

/// What `detach` removed, and what it left.
#[derive(Debug, Default)]
pub struct DetachReport {
    pub tcx_links: usize,
    pub netlink_filters: usize,
    pub pins: usize,
    /// Entries of the links directory that are not meshnet's tcx links, and what they are.
    pub left: Vec<(PathBuf, String)>,
    /// Hooks where an unpinned link was still attached when `detach` stopped waiting.
    pub still_attached: usize,
}

/// Removes everything meshnet installed: its tcx links, its netlink filters (found by their
/// program names, which no other tool uses), and every pin under `pins`. Filters and links of
/// other tools are never touched, even where they are pinned among meshnet's.
pub fn detach(pins: &Pins) -> anyhow::Result<DetachReport> {
    let mut report = DetachReport::default();
    let mut unpinned = Vec::new();
    if let Ok(entries) = std::fs::read_dir(pins.links_dir()) {
        for entry in entries.flatten() {
            let path = entry.path();
            match pinned_link_program(&path) {
                // Unpinning drops the last reference once our fd closes: the kernel then
                // detaches the tcx link. A link whose program cannot be named here is taken
                // for meshnet's, as it was before names were checked: in meshnet's own closed
                // directory, leaving it would leave meshnet attached with its maps gone.
                Ok((id, name)) if name.as_deref().is_none_or(is_link_program) => {
                    std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
                    report.tcx_links += 1;
                    unpinned.push(id);
                }
                // Whoever pinned it there (a user who could write to the directory before it
                // was closed, another tool) keeps it: unpinning another's link detaches it.
                found => {
                    let what = found.map_or_else(
                        |e| format!("not a tcx link of meshnet's: {e:#}"),
                        |(_, name)| format!("a link of program {}, not meshnet's", name.unwrap_or_default()),
                    );
                    warn!(target: LOG, path = %path.display(), what, "left in place");
                    report.left.push((path, what));
                }
            }
        }
    }
    let all = nix::net::if_::if_nameindex().context("listing interfaces")?;
    for iface in all.iter().filter_map(|i| i.name().to_str().ok().map(str::to_owned)) {
        for dir in [Direction::Ingress, Direction::Egress, Direction::Uplink] {
            match tc::qdisc_detach_program(&iface, dir.tc(), dir.program()) {
                Ok(()) => report.netlink_filters += 1,
                Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                // No clsact qdisc on this interface: nothing of ours there.
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => warn!(target: LOG, iface, direction = dir.as_str(), error = %e, "could not look for meshnet filters"),
            }
        }
    }
    let legacy = [names::NAT_FWD_V1, names::NAT_REV_V1, names::PEERS_V1, names::TUN_STATS_V1].map(String::from);
    let migrating = names::ALL_MAPS.iter().flat_map(|n| crate::migrate::migrating_names(n));
    for name in names::ALL_MAPS.iter().map(|n| (*n).to_string()).chain(legacy).chain(migrating) {
        let path = pins.map(&name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            report.pins += 1;
        }
    }
    for dir in [pins.links_dir(), pins.maps_dir(), pins.lock_dir()] {
        let _ = std::fs::remove_dir(dir);
    }
    // The root itself goes too unless it is a mount point (EBUSY) or holds foreign pins.
    let _ = std::fs::remove_dir(pins.root());
    // Said detached only once it is: an uninstall that then unloads or upgrades must not
    // find meshnet's programs still running.
    report.still_attached = still_on_tcx_hooks(&unpinned, DETACH_WAIT);
    if report.still_attached > 0 {
        warn!(target: LOG, hooks = report.still_attached, waited = ?DETACH_WAIT, "unpinned links are still attached; the kernel detaches them when it gets to it");
    }
    info!(target: LOG, ?report, "detached");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of map `name`'s definition in `object`.
    fn def(object: &[u8], name: &str) -> Vec<u8> {
        let file = object::File::parse(object).unwrap();
        let sym = file.symbols().find(|s| s.name() == Ok(name)).unwrap();
        let section = file.section_by_index(sym.section_index().unwrap()).unwrap();
        let off = usize::try_from(sym.address() - section.address()).unwrap();
        section.data().unwrap()[off..off + usize::try_from(sym.size()).unwrap()].to_vec()
    }

    #[test]
    fn the_flow_maps_flags_are_set_and_nothing_else_moves() {
        for object in [EBPF_OBJECT, EBPF_LOG_OBJECT] {
            let flags_of = |o: &[u8], n| u32::from_le_bytes(def(o, n)[16..20].try_into().unwrap());
            // As built: allocated on demand.
            assert_eq!(flags_of(object, names::NAT_FWD), NO_PREALLOC);
            for want in [0, NO_PREALLOC] {
                let mut patched = object.to_vec();
                for name in [names::NAT_FWD, names::NAT_REV] {
                    set_map_flags(&mut patched, name, want).unwrap();
                    assert_eq!(flags_of(&patched, name), want);
                    assert_eq!(def(&patched, name)[..16], def(object, name)[..16], "{name}: type, sizes or entries moved");
                }
                // Every other byte of the object is as it was.
                let changed: Vec<usize> = (0..object.len()).filter(|&i| object[i] != patched[i]).collect();
                assert!(changed.len() <= 2, "{changed:?}");
                // A name the object lacks leaves it alone; a map that is not a hash is refused.
                let before = patched.clone();
                set_map_flags(&mut patched, "no_such_map", want).unwrap();
                assert_eq!(patched, before);
                let err = set_map_flags(&mut patched, names::ROUTES, want).unwrap_err();
                assert!(format!("{err:#}").contains("not a hash map"), "{err:#}");
            }
        }
    }

    #[test]
    fn large_flow_maps_are_never_preallocated() {
        assert_eq!(flow_map_flags(PREALLOC_MAX_FLOWS + 1), NO_PREALLOC);
        let reuses = crate::grace::kernel_reuses_freed_elements() && std::env::var_os(ON_DEMAND_FLOWS_ENV).is_none_or(|v| v != "1");
        assert_eq!(flow_map_flags(PREALLOC_MAX_FLOWS) == 0, reuses);
        assert_eq!(flow_map_flags(65_536) == 0, reuses);
    }
}
