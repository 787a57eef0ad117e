//! Keeping flow state across upgrades and `nat.maxFlows` changes.
//!
//! aya reuses a pinned map by name without looking at it. A pinned map this build cannot use
//! as it is (another type, flags or size, or the pre-v2 names of the flow and peer maps) is
//! migrated: its entries are copied into the map this build creates, once right after the
//! load (before the programs are swapped), again after each interface's swap and once more
//! after the last, for the flows the old programs created in between. Only then are the old pins removed. A map that cannot be
//! migrated (its key or value layout is unknown, or its entries do not fit) is refused with a
//! clear message and left in place: flow state is never silently replaced by an empty map.
//!
//! A map that keeps its name but must be recreated (a new `nat.maxFlows`) is re-pinned under
//! `<name>_migrating` first, so that an agent killed mid-migration finds it again (and under
//! `<name>_migrating2` when that agent's own map must be migrated in turn).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use aya::maps::{HashMap, Map, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues};
use meshnet_common::{
    limits, names, Counter, FlowKey, FragKey, FragPorts, LocalCidrs, NatFwd, NatFwdV1, NatRev, PeerGateways, PeerName, RouteValue, TunnelConfig,
    PodPort, SeqNodeSlot, SeqPodPort, SeqTunnelConfig, TunnelNode, TunnelStats, FLOW_UNANSWERED,
};
use tracing::{info, warn};

use crate::pins::Pins;

/// `BPF_F_NO_PREALLOC`.
pub const NO_PREALLOC: u32 = 1;
/// `BPF_NOEXIST`.
const NOEXIST: u64 = 1;

/// What this build wants a pinned map to be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    pub name: &'static str,
    pub ty: MapType,
    pub key: u32,
    pub value: u32,
    pub flags: u32,
    pub max_entries: u32,
}

fn size<T>() -> u32 {
    u32::try_from(size_of::<T>()).unwrap_or(u32::MAX)
}

/// Every map of this build, as the agent loads the embedded object: flow maps sized
/// `max_flows`, with the flags that [`crate::datapath::flow_map_flags`] chooses.
#[must_use]
pub fn specs(max_flows: u32) -> [Spec; 21] {
    let flags = crate::datapath::flow_map_flags(max_flows);
    let flow = |name, value| Spec { name, ty: MapType::Hash, key: size::<FlowKey>(), value, flags, max_entries: max_flows };
    [
        Spec { name: names::ROUTES, ty: MapType::LpmTrie, key: 8, value: size::<RouteValue>(), flags: NO_PREALLOC, max_entries: limits::MAX_ROUTES },
        Spec { name: names::PEERS, ty: MapType::Hash, key: 4, value: size::<PeerGateways>(), flags: NO_PREALLOC, max_entries: limits::MAX_PEERS },
        flow(names::NAT_FWD, size::<NatFwd>()),
        flow(names::NAT_REV, size::<NatRev>()),
        Spec { name: names::STATS, ty: MapType::PerCpuArray, key: 4, value: 8, flags: 0, max_entries: Counter::COUNT },
        Spec { name: names::PEER_NAMES, ty: MapType::Hash, key: 4, value: size::<PeerName>(), flags: 0, max_entries: limits::MAX_PEERS },
        Spec { name: names::FRAGS, ty: MapType::LruHash, key: size::<FragKey>(), value: size::<FragPorts>(), flags: 0, max_entries: limits::MAX_FRAGS },
        Spec { name: names::CLOCK, ty: MapType::Array, key: 4, value: 8, flags: 0, max_entries: 1 },
        Spec { name: names::LOCAL, ty: MapType::Array, key: 4, value: size::<LocalCidrs>(), flags: 0, max_entries: 1 },
        Spec { name: names::GW_PORTS, ty: MapType::Array, key: 4, value: 8, flags: 0, max_entries: limits::GW_PORT_WORDS },
        Spec { name: names::TUN_ROUTES, ty: MapType::LpmTrie, key: 8, value: size::<TunnelNode>(), flags: NO_PREALLOC, max_entries: limits::MAX_TUNNEL_ROUTES },
        Spec { name: names::TUN_NODES, ty: MapType::Hash, key: 4, value: 4, flags: NO_PREALLOC, max_entries: limits::MAX_TUNNEL_NODES },
        Spec { name: names::TUN_CONFIG, ty: MapType::Hash, key: 4, value: size::<TunnelConfig>(), flags: NO_PREALLOC, max_entries: 1 },
        Spec { name: names::TUN_STATS, ty: MapType::PerCpuArray, key: 4, value: size::<TunnelStats>(), flags: 0, max_entries: limits::MAX_PEERS },
        Spec { name: names::TUN_PORTS, ty: MapType::Hash, key: 4, value: size::<PodPort>(), flags: NO_PREALLOC, max_entries: limits::MAX_POD_PORTS },
        Spec { name: names::SWITCHES, ty: MapType::Array, key: 4, value: 4, flags: 0, max_entries: meshnet_common::switch::COUNT },
        Spec { name: names::TUN_FAST, ty: MapType::Array, key: 4, value: 4, flags: 0, max_entries: meshnet_common::tun_fast::COUNT },
        Spec { name: names::TUN_CFG_SEQ, ty: MapType::Array, key: 4, value: size::<SeqTunnelConfig>(), flags: 0, max_entries: 1 },
        Spec { name: names::TUN_PORT_SLOTS, ty: MapType::Array, key: 4, value: size::<SeqPodPort>(), flags: 0, max_entries: limits::POD_PORT_SLOTS },
        Spec { name: names::TUN_PEER_PORTS, ty: MapType::Array, key: 4, value: 8, flags: 0, max_entries: limits::GW_PORT_WORDS },
        Spec { name: names::TUN_NODE_SLOTS, ty: MapType::Array, key: 4, value: size::<SeqNodeSlot>(), flags: 0, max_entries: limits::NODE_SLOTS },
    ]
}

/// The maps whose content can be carried over, with the older names they may be found under.
fn legacy_names(name: &str) -> &'static [&'static str] {
    match name {
        n if n == names::NAT_FWD => &[names::NAT_FWD_V1],
        n if n == names::NAT_REV => &[names::NAT_REV_V1],
        n if n == names::PEERS => &[names::PEERS_V1],
        _ => &[],
    }
}

fn migratable(name: &str) -> bool {
    [names::NAT_FWD, names::NAT_REV, names::PEERS, names::STATS].contains(&name)
}

/// Where a map being migrated is kept meanwhile. bpffs refuses names with a dot.
#[must_use]
pub fn migrating_name(name: &str) -> String {
    format!("{name}_migrating")
}

/// Every name a map being migrated may be kept under: the second holds the map of an agent
/// whose own migration was cut short, when the next one needs another layout again (the
/// first still holds the map that migration started from).
#[must_use]
pub fn migrating_names(name: &str) -> [String; 2] {
    [migrating_name(name), format!("{name}_migrating2")]
}

fn migrating_pins(pins: &Pins, name: &str) -> [PathBuf; 2] {
    migrating_names(name).map(|n| pins.map(&n))
}

/// The flow maps' size this start takes: `wanted` (`nat.maxFlows`), unless the flow maps
/// pinned now (at home, moved aside by a migration cut short, or of an older layout) hold
/// more flows together: then a size that holds them all (the maps' own, when they do, so
/// that they are kept; else the flows and `wanted` more), with why. No flow is dropped for want of room, and a config that
/// asks for too little does not keep the agent from starting: while it is not running, its
/// GC, clock, probes and new pods all wait.
#[must_use]
pub fn room_for_pinned(pins: &Pins, wanted: u32) -> (u32, Option<String>) {
    let mut need = 0;
    let mut own = 0;
    for name in [names::NAT_FWD, names::NAT_REV] {
        let home = pins.map(name);
        let asides = migrating_pins(pins, name).into_iter().chain(legacy_names(name).iter().map(|n| pins.map(n)));
        let mut keys = std::collections::HashSet::new();
        // A map it cannot read is `Migration::prepare`'s to refuse, with its reason.
        for p in std::iter::once(home.clone()).chain(asides).filter(|p| p.exists()) {
            keys.extend(flow_keys(&p).unwrap_or_default());
        }
        need = need.max(u32::try_from(keys.len()).unwrap_or(u32::MAX));
        own = own.max(MapInfo::from_pin(&home).map_or(0, |i| i.max_entries()));
    }
    if need <= wanted {
        return (wanted, None);
    }
    // Room for nat.maxFlows more, too: maps just as full as their flows would refuse every
    // new flow, and lose those the old programs add until the last copy.
    let size = if need <= own { own } else { need.saturating_add(wanted) };
    let why = format!(
        "nat.maxFlows is {wanted}, but the flow maps hold {need} flows: they get {size} entries, so that none is dropped, until \
         a start finds the flows within nat.maxFlows; raise nat.maxFlows to at least {need}, or restart once enough have expired"
    );
    (size, Some(why))
}

/// One old map to copy from.
struct Source {
    target: &'static str,
    path: PathBuf,
    data: MapData,
    /// Moved aside by this agent (so put back should its load fail).
    moved: bool,
}

/// Old maps found at load time, copied into the new ones until [`Migration::finish`].
#[derive(Default)]
pub struct Migration {
    sources: Vec<Source>,
}

fn describe(info: &MapInfo) -> String {
    format!(
        "type {:?}, key/value {}/{} bytes, flags {:#x}, {} entries",
        info.map_type().map_or_else(|e| e.to_string(), |t| format!("{t:?}")),
        info.key_size(),
        info.value_size(),
        info.map_flags(),
        info.max_entries()
    )
}

fn matches(info: &MapInfo, spec: &Spec) -> bool {
    info.map_type().is_ok_and(|t| t == spec.ty)
        && info.key_size() == spec.key
        && info.value_size() == spec.value
        && info.map_flags() == spec.flags
        && info.max_entries() == spec.max_entries
}

impl Migration {
    /// Looks at what is pinned under `pins` before the object is loaded: moves every map this
    /// build must recreate out of the loader's way (re-pinned under a [`migrating_names`] one), and
    /// refuses maps it cannot migrate. Nothing is changed when it refuses.
    pub fn prepare(pins: &Pins, max_flows: u32) -> anyhow::Result<Self> {
        let mut sources = Vec::new();
        let mut moves = Vec::new();
        for spec in specs(max_flows) {
            let path = pins.map(spec.name);
            if path.exists() {
                let info = MapInfo::from_pin(&path).with_context(|| format!("inspecting {}", path.display()))?;
                if !matches(&info, &spec) {
                    check_migratable(pins, &spec, &info, &path)?;
                    let aside = migrating_pins(pins, spec.name).into_iter().find(|p| !p.exists()).with_context(|| {
                        format!(
                            "{} must be migrated, but two earlier migrations of it were cut short ({} and {} are pinned); \
                             `meshnet detach` removes them with the node's flow state",
                            path.display(),
                            migrating_name(spec.name),
                            migrating_names(spec.name)[1]
                        )
                    })?;
                    moves.push((spec, path, aside));
                }
            }
            let asides = migrating_pins(pins, spec.name).into_iter();
            for old in asides.chain(legacy_names(spec.name).iter().map(|n| pins.map(n))) {
                if old.exists() {
                    let info = MapInfo::from_pin(&old).with_context(|| format!("inspecting {}", old.display()))?;
                    check_migratable(pins, &spec, &info, &old)?;
                    let data = MapData::from_pin(&old).with_context(|| format!("opening {}", old.display()))?;
                    sources.push(Source { target: spec.name, path: old, data, moved: false });
                }
            }
        }
        // Several old maps of one flow map (a migration cut short) must fit in it together.
        for spec in specs(max_flows).iter().filter(|s| s.name == names::NAT_FWD || s.name == names::NAT_REV) {
            let mut paths: Vec<&PathBuf> = moves.iter().filter(|m| m.0.name == spec.name).map(|m| &m.1).collect();
            paths.extend(sources.iter().filter(|s| s.target == spec.name).map(|s| &s.path));
            if paths.len() > 1 {
                let mut keys = std::collections::HashSet::new();
                for p in &paths {
                    keys.extend(flow_keys(p)?);
                }
                if keys.len() > spec.max_entries as usize {
                    bail!(
                        "the old maps of {} hold {} flows together and nat.maxFlows is {}; raise nat.maxFlows to at least {}. \
                         Nothing was changed",
                        spec.name,
                        keys.len(),
                        spec.max_entries,
                        keys.len()
                    );
                }
            }
        }
        let mut fresh = Vec::new();
        for (spec, path, aside) in moves {
            match move_aside(spec.name, &path, &aside) {
                Ok(data) => fresh.push(Source { target: spec.name, path: aside, data, moved: true }),
                Err(e) => {
                    // Nothing half done: the maps already moved go back home.
                    Self { sources: fresh }.restore(pins);
                    return Err(e);
                }
            }
        }
        // The maps just moved aside are the newest: copied first, their entries win.
        fresh.extend(sources);
        Ok(Self { sources: fresh })
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Puts the moved-aside maps back where they were (the load failed).
    pub fn restore(self, pins: &Pins) {
        for s in self.sources {
            let home = pins.map(s.target);
            if s.moved && !home.exists() && s.data.pin(&home).is_ok() {
                let _ = std::fs::remove_file(&s.path);
            }
        }
    }

    /// Copies every entry of the old maps into the new pinned ones, leaving entries already
    /// there alone (the new programs' own are newer). Counters are moved, on the first pass
    /// only: added to the new map and taken off the old one.
    pub fn copy(&self, pins: &Pins, first: bool) -> anyhow::Result<usize> {
        let mut copied = 0;
        let (counters, rest): (Vec<&Source>, Vec<&Source>) = self.sources.iter().partition(|s| s.target == names::STATS);
        for s in rest {
            copied += copy_one(pins, s, first, &self.sources)
                .with_context(|| format!("migrating {} into {}", s.path.display(), s.target))?;
        }
        if first && !counters.is_empty() {
            // Last, and every map opened first: a load that fails after this pass puts the old
            // maps back and drops the new ones, so nothing may fail once counts were taken
            // off an old map.
            let mut new = PerCpuArray::<_, u64>::try_from(open_pinned(pins, names::STATS)?)?;
            let mut olds = Vec::new();
            for s in counters {
                let old = as_hash(&s.data).and_then(|m| Ok(PerCpuArray::<_, u64>::try_from(m)?));
                olds.push(old.with_context(|| format!("migrating {} into {}", s.path.display(), s.target))?);
            }
            for old in &mut olds {
                copied += move_counters(old, &mut new);
            }
        }
        Ok(copied)
    }

    /// The second pass after the programs were swapped, then the old pins go.
    pub fn finish(self, pins: &Pins) -> anyhow::Result<()> {
        let copied = self.copy(pins, false)?;
        for s in &self.sources {
            if let Err(e) = std::fs::remove_file(&s.path) {
                warn!(path = %s.path.display(), error = %e, "could not remove a migrated map's pin");
            }
        }
        info!(maps = self.sources.len(), late_entries = copied, "migration finished; old maps unpinned");
        Ok(())
    }
}

fn move_aside(name: &str, path: &std::path::Path, aside: &std::path::Path) -> anyhow::Result<MapData> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    data.pin(aside).with_context(|| format!("re-pinning {} at {}", path.display(), aside.display()))?;
    if let Err(e) = std::fs::remove_file(path) {
        let _ = std::fs::remove_file(aside);
        return Err(e).with_context(|| format!("removing {}", path.display()));
    }
    info!(map = name, from = %aside.display(), "the pinned map differs from what this build needs; migrating its entries");
    Ok(data)
}

/// The keys of a flow map (checked by [`check_migratable`]: forward v1 values are 24 bytes,
/// the others 32), as bytes.
fn flow_keys(path: &std::path::Path) -> anyhow::Result<Vec<[u8; 16]>> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let size = data.info()?.value_size();
    let map = Map::from_map_data(data)?;
    let keys: Vec<FlowKey> = if size == 24 {
        HashMap::<_, FlowKey, [u8; 24]>::try_from(map)?.keys().flatten().collect()
    } else {
        HashMap::<_, FlowKey, [u8; 32]>::try_from(map)?.keys().flatten().collect()
    };
    Ok(keys.iter().map(|k| bytemuck::cast(*k)).collect())
}

fn check_migratable(pins: &Pins, spec: &Spec, info: &MapInfo, path: &std::path::Path) -> anyhow::Result<()> {
    let refuse = |why: String| -> anyhow::Result<()> {
        bail!(
            "{} ({}) cannot be used by this build, which needs {}: {why}. Nothing was changed. If losing its \
             state is acceptable, run `meshnet detach --pin-path {}` and start again",
            path.display(),
            describe(info),
            format_args!("type {:?}, key/value {}/{} bytes, {} entries", spec.ty, spec.key, spec.value, spec.max_entries),
            pins.root().display()
        )
    };
    if !migratable(spec.name) {
        return refuse("only the flow, peer and counter maps can be migrated".into());
    }
    let ty_ok = match spec.ty {
        MapType::Hash => matches!(info.map_type(), Ok(MapType::Hash | MapType::LruHash)),
        other => info.map_type().is_ok_and(|t| t == other),
    };
    // The forward flow value grew in v2 (the pod's interface); v1 entries are converted.
    let value_ok = info.value_size() == spec.value || (spec.name == names::NAT_FWD && info.value_size() == size::<NatFwdV1>());
    if !ty_ok || info.key_size() != spec.key || !value_ok {
        return refuse("its key or value layout is not one this build knows how to convert".into());
    }
    if spec.ty == MapType::Hash && spec.name != names::PEERS {
        let n = flow_keys(path)?.len() as u64;
        if n > u64::from(spec.max_entries) {
            return refuse(format!(
                "it holds {n} flows and nat.maxFlows is {}; raise nat.maxFlows to at least {n}",
                spec.max_entries
            ));
        }
    }
    Ok(())
}

fn open_pinned(pins: &Pins, name: &str) -> anyhow::Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn as_hash(data: &MapData) -> anyhow::Result<Map> {
    let info = data.info()?;
    Ok(Map::from_map_data(MapData::from_id(info.id())?)?)
}

/// The peer id of the flow `rev_key`/`rev` restores, for v1 reverse entries (which had none).
fn peer_of_rev(sources: &[Source], pins: &Pins, rev_key: &FlowKey, rev: &NatRev) -> u32 {
    let fwd_key = FlowKey::fwd_of_rev(rev_key, rev);
    let lookup = |m: Map| HashMap::<_, FlowKey, NatFwd>::try_from(m).ok().and_then(|h| h.get(&fwd_key, 0).ok());
    if let Some(f) = open_pinned(pins, names::NAT_FWD).ok().and_then(lookup) {
        return f.peer_id;
    }
    let lookup_v1 = |m: Map| HashMap::<_, FlowKey, NatFwdV1>::try_from(m).ok().and_then(|h| h.get(&fwd_key, 0).ok());
    sources
        .iter()
        .filter(|s| s.target == names::NAT_FWD)
        .find_map(|s| {
            let f = as_hash(&s.data).ok().and_then(lookup).map(|f| f.peer_id);
            f.or_else(|| as_hash(&s.data).ok().and_then(lookup_v1).map(|f| f.peer_id))
        })
        .unwrap_or(0)
}

/// Inserts a flow entry copied from an old map. Entries already there win, except on the
/// first pass (before this build's programs run, so every entry there is a copy too), where
/// the one seen last wins: two old maps (a migration cut short) may both hold a flow.
fn insert_newest<V: aya::Pod>(
    new: &mut HashMap<MapData, FlowKey, V>,
    k: FlowKey,
    v: V,
    first: bool,
    seen: impl Fn(&V) -> u64,
) -> bool {
    if new.insert(k, v, NOEXIST).is_ok() {
        return true;
    }
    first && new.get(&k, 0).is_ok_and(|cur| seen(&v) > seen(&cur)) && new.insert(k, v, 0).is_ok()
}

fn copy_one(pins: &Pins, s: &Source, first: bool, all: &[Source]) -> anyhow::Result<usize> {
    let mut copied = 0;
    let old = as_hash(&s.data)?;
    match s.target {
        t if t == names::NAT_FWD => {
            let mut new = HashMap::<_, FlowKey, NatFwd>::try_from(open_pinned(pins, t)?)?;
            let entries: Vec<(FlowKey, NatFwd)> = if s.data.info()?.value_size() == size::<NatFwdV1>() {
                HashMap::<_, FlowKey, NatFwdV1>::try_from(old)?.iter().flatten().map(|(k, v)| (k, v.upgrade())).collect()
            } else {
                HashMap::<_, FlowKey, NatFwd>::try_from(old)?.iter().flatten().collect()
            };
            for (k, v) in entries {
                copied += usize::from(insert_newest(&mut new, k, v, first, |v| v.last_seen_ns));
            }
        }
        t if t == names::NAT_REV => {
            let old = HashMap::<_, FlowKey, NatRev>::try_from(old)?;
            let mut new = HashMap::<_, FlowKey, NatRev>::try_from(open_pinned(pins, t)?)?;
            for (k, mut v) in old.iter().flatten() {
                if v.peer_id == 0 {
                    v.peer_id = peer_of_rev(all, pins, &k, &v);
                }
                // The old map's programs may answer the flow after this copy, clearing the bit
                // there only (or be of a release that never clears it): the copy counts as
                // answered, as ControlMaps::note_unanswered_at_start takes every flow of before the start.
                v.flags &= !FLOW_UNANSWERED;
                copied += usize::from(insert_newest(&mut new, k, v, first, |v| v.last_seen_ns));
            }
        }
        t if t == names::PEERS => {
            let old = HashMap::<_, u32, PeerGateways>::try_from(old)?;
            let mut new = HashMap::<_, u32, PeerGateways>::try_from(open_pinned(pins, t)?)?;
            for (k, v) in old.iter().flatten() {
                // The second pass may follow a sync that replaced peers (crate::grace).
                crate::grace::before_take(names::PEERS);
                copied += usize::from(new.insert(k, v, NOEXIST).is_ok());
            }
        }
        _ => {}
    }
    Ok(copied)
}

/// Moves the counts of `old` into `new`, counter by counter: added to `new`, then taken off
/// `old`, so that an agent that resumes a migration cut short adds nothing twice. Only before
/// the swap: after it this build's programs count into `new`, and a read and a write of it
/// from here would lose what they counted in between. What the old programs count after this
/// goes with their map. Never fails: a counter that cannot be moved stays where it is.
fn move_counters(old: &mut PerCpuArray<MapData, u64>, new: &mut PerCpuArray<MapData, u64>) -> usize {
    let mut moved = 0;
    for i in 0..old.len().min(new.len()) {
        let (Ok(a), Ok(b)) = (old.get(&i, 0), new.get(&i, 0)) else { continue };
        if a.iter().all(|&x| x == 0) {
            continue;
        }
        let sum: Vec<u64> = a.iter().zip(b.iter()).map(|(x, y)| x + y).collect();
        let Ok(values) = PerCpuValues::try_from(sum) else { continue };
        if new.set(i, values, 0).is_err() {
            continue;
        }
        moved += 1;
        // Read again: the old programs may have counted meanwhile (until the swap).
        let now = old.get(&i, 0).map_or_else(|_| a.to_vec(), |v| v.to_vec());
        let rest: Vec<u64> = now.iter().zip(a.iter()).map(|(n, x)| n.saturating_sub(*x)).collect();
        if let Ok(values) = PerCpuValues::try_from(rest) {
            if let Err(e) = old.set(i, values, 0) {
                warn!(counter = i, error = %e, "a migrated counter could not be taken off the old map: a resumed migration would count it twice");
            }
        }
    }
    moved
}
