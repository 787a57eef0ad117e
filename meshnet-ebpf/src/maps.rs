//! The maps, named from `meshnet_common::names` so that user space finds them by the same
//! constants.

use aya_ebpf::{
    macros::map,
    bindings::BPF_F_NO_PREALLOC,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use meshnet_common::{
    limits, Counter, FlowKey, FragKey, FragPorts, LocalCidrs, NatFwd, NatRev, PeerGateways, PeerName, RouteValue, SeqNodeSlot, SeqPodPort, SeqTunnelConfig, TunnelConfig, TunnelNode,
    PodPort, TunnelStats,
};

// The `name = "..."` strings must equal meshnet_common::names; the attribute takes a
// literal, so user space checks every name in the loaded object against those constants.

#[map(name = "mn_routes_v1")]
pub static ROUTES: LpmTrie<u32, RouteValue> = LpmTrie::with_max_entries(limits::MAX_ROUTES, 0);

// Not preallocated: a preallocated hash hands a replaced or deleted element straight to the
// next insert, while a program on another CPU may still be reading it (a torn peer value, or
// a flow translated with another flow's state). Before kernel 6.1 a hash without
// preallocation frees elements only after an RCU grace period; from 6.1 it reuses them at
// once too, and the agent waits the grace period out itself for the maps only it writes
// (meshnet::grace), while the flow maps are preallocated there (meshnet::datapath::
// flow_map_flags rewrites their flags at load time).
#[map(name = "mn_peers_v2")]
pub static PEERS: HashMap<u32, PeerGateways> = HashMap::with_max_entries(limits::MAX_PEERS, BPF_F_NO_PREALLOC);

/// Flow state: plain hashes, not LRU, so that no established flow is ever evicted to make
/// room for a new one; when full, new flows are refused. The agent's GC expires idle flows.
/// Sized by the agent at load time from the config.
#[map(name = "mn_nat_fwd_v2")]
pub static NAT_FWD: HashMap<FlowKey, NatFwd> =
    HashMap::with_max_entries(limits::DEFAULT_NAT_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "mn_nat_rev_v2")]
pub static NAT_REV: HashMap<FlowKey, NatRev> =
    HashMap::with_max_entries(limits::DEFAULT_NAT_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "mn_frags_v1")]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(limits::MAX_FRAGS, 0);

/// Written and read by user space only; it lives in the object so that the loader creates
/// and pins it with the others.
#[map(name = "mn_names_v1")]
pub static PEER_NAMES: HashMap<u32, PeerName> = HashMap::with_max_entries(limits::MAX_PEERS, 0);

#[map(name = "mn_stats_v1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// The flow clock the agent publishes (see `meshnet_common::names::CLOCK`). An array lookup,
/// which the verifier inlines: no helper call.
#[map(name = "mn_clock_v1")]
pub static CLOCK: Array<u64> = Array::with_max_entries(1, 0);

/// This cluster's pod CIDRs (see `meshnet_common::LocalCidrs`).
#[map(name = "mn_local_v1")]
pub static LOCAL: Array<LocalCidrs> = Array::with_max_entries(1, 0);

/// The ports gateways have had (see `meshnet_common::names::GW_PORTS`).
#[map(name = "mn_gw_ports_v1")]
pub static GW_PORTS: Array<u64> = Array::with_max_entries(limits::GW_PORT_WORDS, 0);

/// The tunnel peers' ports (see `meshnet_common::names::TUN_PEER_PORTS`).
#[map(name = "mn_tun_pports_v1")]
pub static TUN_PEER_PORTS: Array<u64> = Array::with_max_entries(limits::GW_PORT_WORDS, 0);

/// Tunnel mode (see `meshnet_common::names::TUN_ROUTES` and the four after it).
#[map(name = "mn_tun_routes_v1")]
pub static TUN_ROUTES: LpmTrie<u32, TunnelNode> = LpmTrie::with_max_entries(limits::MAX_TUNNEL_ROUTES, BPF_F_NO_PREALLOC);

#[map(name = "mn_tun_nodes_v1")]
pub static TUN_NODES: HashMap<u32, u32> = HashMap::with_max_entries(limits::MAX_TUNNEL_NODES, BPF_F_NO_PREALLOC);

#[map(name = "mn_tun_cfg_v1")]
pub static TUN_CONFIG: HashMap<u32, TunnelConfig> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map(name = "mn_tun_stats_v2")]
pub static TUN_STATS: PerCpuArray<TunnelStats> = PerCpuArray::with_max_entries(limits::MAX_PEERS, 0);

/// See `meshnet_common::names::TUN_CFG_SEQ`.
#[map(name = "mn_tun_cfgs_v1")]
pub static TUN_CFG_SEQ: Array<SeqTunnelConfig> = Array::with_max_entries(1, 0);

/// See `meshnet_common::names::TUN_FAST`.
#[map(name = "mn_tun_fast_v1")]
pub static TUN_FAST: Array<u32> = Array::with_max_entries(meshnet_common::tun_fast::COUNT, 0);

#[map(name = "mn_tun_ports_v1")]
pub static TUN_PORTS: HashMap<u32, PodPort> = HashMap::with_max_entries(limits::MAX_POD_PORTS, BPF_F_NO_PREALLOC);

/// See `meshnet_common::names::TUN_PORT_SLOTS`.
#[map(name = "mn_tun_pslots_v1")]
pub static TUN_PORT_SLOTS: Array<SeqPodPort> = Array::with_max_entries(limits::POD_PORT_SLOTS, 0);

/// See `meshnet_common::names::TUN_NODE_SLOTS`.
#[map(name = "mn_tun_nslots_v1")]
pub static TUN_NODE_SLOTS: Array<SeqNodeSlot> = Array::with_max_entries(limits::NODE_SLOTS, 0);

#[map(name = "mn_switches_v1")]
pub static SWITCHES: Array<u32> = Array::with_max_entries(meshnet_common::switch::COUNT, 0);

/// Whether switch `slot` (`meshnet_common::switch`) is on; off when unset.
#[inline(always)]
pub fn switch_on(slot: u32) -> bool {
    matches!(SWITCHES.get(slot), Some(&v) if v != 0)
}

/// The logging object's rate limit (see `meshnet_common::names::LOG_BUDGET`).
#[cfg(feature = "datapath-log")]
#[map(name = "mn_log_budget_v1")]
pub static LOG_BUDGET: Array<meshnet_common::LogBudget> = Array::with_max_entries(1, 0);

/// The decision a translating program hands to `meshnet_log` (see `crate::log`).
#[cfg(feature = "datapath-log")]
#[map(name = "mn_log_event_v1")]
pub static LOG_EVENT: PerCpuArray<crate::log::Event> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: `meshnet_log`, put there by the agent after loading.
#[cfg(feature = "datapath-log")]
#[map(name = "mn_log_progs_v1")]
pub static LOG_PROGS: aya_ebpf::maps::ProgramArray = aya_ebpf::maps::ProgramArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU with preemption disabled.
        unsafe { *p += 1 };
    }
}
