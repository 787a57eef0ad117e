//! The kernel/user ABI of meshnet.
//!
//! Everything both sides must agree on lives here and only here: map names, map keys and
//! values, counters and limits. Every type is `#[repr(C)]` with explicit padding and a
//! compile-time size and offset check, so a layout change cannot slip through unnoticed.
//! A map whose layout changes gets a new versioned name (`_v1` → `_v2`), so a newer agent
//! never misreads a map an older one pinned.
//!
//! Byte order is part of every field name: `_be` fields hold network byte order exactly as
//! on the wire (the eBPF side copies them from packets without swapping).
#![cfg_attr(not(test), no_std)]
// The hash helpers are shared with the eBPF programs, where a call instead of an inlined body
// costs verifier states and a helper frame on every packet.
#![expect(clippy::inline_always, reason = "the hash helpers must inline into the eBPF programs")]
// `_pad` fields are explicit padding of the ABI structs, never read.
#![allow(clippy::pub_underscore_fields)]

pub mod names {
    //! Map and program names. Kernel object names are at most 15 bytes.

    /// LPM trie: remote pod CIDR → peer.
    pub const ROUTES: &str = "mn_routes_v1";
    /// Hash (not preallocated; with meshnet::grace, a replaced value is never read torn): peer id → that
    /// peer's gateways.
    pub const PEERS: &str = "mn_peers_v2";
    /// The preallocated peer map of releases before v2; migrated like the flow maps.
    pub const PEERS_V1: &str = "mn_peers_v1";
    /// Hash (not LRU: nothing is evicted, the agent's GC expires idle flows): a pod's
    /// original flow → its translation.
    pub const NAT_FWD: &str = "mn_nat_fwd_v2";
    /// Hash: a translated reply tuple → the original flow.
    pub const NAT_REV: &str = "mn_nat_rev_v2";
    /// The flow maps of releases before v2 (LRU hashes with the same key and value sizes).
    /// An agent that finds them pinned migrates their entries into the v2 maps.
    pub const NAT_FWD_V1: &str = "mn_nat_fwd_v1";
    pub const NAT_REV_V1: &str = "mn_nat_rev_v1";
    /// Per-CPU array of `u64` counters indexed by [`crate::Counter`].
    pub const STATS: &str = "mn_stats_v1";
    /// Hash: peer id → peer name. Only user space reads it, so that dumps and `explain`
    /// can name peers without a running agent or its config.
    pub const PEER_NAMES: &str = "mn_names_v1";

    /// LRU hash: an IPv4 datagram being fragmented (src, dst, IP id, proto) → the ports its
    /// first fragment carried, so that later fragments follow the same translation. LRU is
    /// right here: an entry lives for one datagram, and losing one loses only that datagram.
    pub const FRAGS: &str = "mn_frags_v1";

    /// Array of one `u64`: the flow clock. The agent publishes `CLOCK_MONOTONIC` there about
    /// once a second, and the datapath stamps flows with it instead of reading the clock per
    /// packet, so that a flow's entry is written once a second at most. While it is zero (no
    /// agent has run yet: packet tests, benchmarks) the datapath reads the kernel's clock.
    pub const CLOCK: &str = "mn_clock_v1";

    /// Array of one [`crate::LocalCidrs`]: this cluster's own pod CIDRs. Traffic between the
    /// cluster's pods, most of what a node carries and never meshnet's, passes `from_pod`
    /// without a flow lookup or a trie walk.
    pub const LOCAL: &str = "mn_local_v1";

    /// Array of 1024 `u64`: a bitmap of the ports any gateway has had (TCP and UDP), bit
    /// `port % 64` of word `port / 64`. A reply to a translated flow comes from a gateway's
    /// NodePort, so `to_pod` passes packets from any other port without a flow lookup. Bits
    /// are set before a gateway is published and never cleared while the maps live, so no
    /// flow's port is ever missing. Bit 0 (port 0, never a gateway's) says the bitmap is in
    /// use; until it is set, `to_pod` looks every packet up.
    pub const GW_PORTS: &str = "mn_gw_ports_v1";

    /// Only in the logging object (`--datapath-log`): the node's rate limit of its log lines
    /// ([`crate::LogBudget`], an array of one). Not pinned: it lives as long as the programs
    /// that use it.
    pub const LOG_BUDGET: &str = "mn_log_budget_v1";
    /// Only in the logging object: the per-CPU slot where a translating program notes a
    /// decision for [`PROG_LOG`]. Kernel-side only.
    pub const LOG_EVENT: &str = "mn_log_event_v1";
    /// Only in the logging object: a program array whose slot 0 the agent fills with
    /// [`PROG_LOG`] after loading. Not pinned.
    pub const LOG_PROGS: &str = "mn_log_progs_v1";
    /// aya-log's ring buffer, only in the logging object. The name is aya-log's.
    pub const LOG_RING: &str = "AYA_LOGS";
    /// aya-log's level global, patched at load time to the agent's level for
    /// `meshnet::datapath`, so that filtered lines are never written. The name is aya-log's.
    pub const LOG_LEVEL: &str = "AYA_LOG_LEVEL";

    /// Tunnel mode. LPM trie: a tunnel peer's node pod CIDR → that node
    /// ([`crate::TunnelNode`]). `from_pod` encapsulates what a pod sends there.
    pub const TUN_ROUTES: &str = "mn_tun_routes_v1";
    /// Hash: a tunnel peer node's address → its peer id. The decapsulating program takes
    /// tunnel packets only from these addresses (read only when the inner source's route
    /// does not name the sender: routes name only these nodes, for the same peers).
    pub const TUN_NODES: &str = "mn_tun_nodes_v1";
    /// Hash of one entry (key 0): this node's tunnel settings ([`crate::TunnelConfig`]).
    /// A hash, not an array, so that an update replaces the value whole: a program never
    /// reads half of the old pod CIDRs and half of the new.
    pub const TUN_CONFIG: &str = "mn_tun_cfg_v1";
    /// Per-CPU array: a tunnel peer's slot → its packets and bytes through the tunnel
    /// ([`crate::TunnelStats`]). The agent gives each tunnel peer a slot, marked with the
    /// peer's id, and writes it into the peer's routes ([`crate::TunnelNode::stats_slot`]); the
    /// datapath only adds to it, found by an array read where a hash lookup cost each packet
    /// about 20 ns.
    pub const TUN_STATS: &str = "mn_tun_stats_v2";
    /// The per-CPU hash (peer id → counters) of builds before v2. An agent that finds it
    /// pinned unpins it: those counters start again from zero.
    pub const TUN_STATS_V1: &str = "mn_tun_stats_v1";
    /// Hash: a pod's IPv4 address → its interface ([`crate::PodPort`]), which the agent
    /// reads from the kernel for every pod interface it attaches to. The decapsulating
    /// program sends a pod's packets out of that port itself, with no FIB lookup and no
    /// neighbour entry needed: through a bridge, the kernel would segment them in software
    /// (a bridge offers no offloads for encapsulated packets, and a decapsulated packet still
    /// counts as one).
    pub const TUN_PORTS: &str = "mn_tun_ports_v1";
    /// Array of [`crate::SeqPodPort`], one slot per [`crate::pod_port_slot`] of a pod's
    /// address: `mn_tun_ports_v1` again, for the pods that own their slot, under a seqlock
    /// per slot. The decapsulating program reads the slot of every packet's pod first, an
    /// array read the verifier inlines where the hash's lookup cost each packet about 25 ns;
    /// a slot that holds another address, or a read its seqlock cannot vouch for, sends it
    /// to the hash. Two pods share a slot only where their addresses agree in their low
    /// bits (pod CIDRs of one node far apart): the lowest address gets it. The agent changes
    /// a slot only through empty and a grace period, so that no reader mixes two pods.
    pub const TUN_PORT_SLOTS: &str = "mn_tun_pslots_v1";
    /// Array of [`crate::SeqNodeSlot`], one slot per [`crate::node_slot`] of a tunnel peer
    /// node's address: the node, its peer, its counter slot and the pod CIDRs its routes in
    /// `mn_tun_routes_v1` name, under a seqlock per slot. The decapsulating program reads the
    /// sender's slot first, an array read the verifier inlines, and looks the inner source's
    /// route up in the trie (about 15 ns a packet) only when the slot does not say that the
    /// sender hosts it: a sender with no slot, a pod of another node of the peer, a packet to
    /// refuse. The slot holds only CIDRs that overlap no other route, so it names the node the
    /// trie's longest match would. The agent empties a slot before the routes or nodes it
    /// reflects change, fills it only once they hold what it says, and changes it only
    /// through empty and a grace period, as `mn_tun_pslots_v1`'s.
    pub const TUN_NODE_SLOTS: &str = "mn_tun_nslots_v1";
    /// Array of `u32`, one slot per [`crate::switch`]: what the agent tells the datapath at
    /// run time to skip work that cannot matter. An array lookup, which the verifier inlines.
    pub const SWITCHES: &str = "mn_switches_v1";
    /// Array of `u32`, one per [`crate::tun_fast`] slot: the tunnel settings that paths run
    /// per packet read, each an inlined array read instead of the settings' hash lookup. The
    /// uplink program runs on every packet the node receives and passes UDP to any other port
    /// than the tunnel's (DNS, another CNI's VXLAN, UDP NodePorts) on it; `from_pod` writes
    /// the cluster id into every packet it encapsulates. The agent writes the slots after the
    /// settings and clears them before removing them. The uplink program still checks the
    /// settings' own port, so a read of a port being changed can only pass a packet, never
    /// take one.
    pub const TUN_FAST: &str = "mn_tun_fast_v1";
    /// Array of one [`crate::SeqTunnelConfig`]: the settings of `mn_tun_cfg_v1` again, under a
    /// seqlock, for the decapsulating program, which reads them for every tunnel packet: an
    /// array read the verifier inlines instead of a hash lookup. A read the seqlock cannot
    /// vouch for, or a copy without a port (none written yet, or cleared before the settings
    /// go), falls back to the hash.
    pub const TUN_CFG_SEQ: &str = "mn_tun_cfgs_v1";
    /// Array of 1024 `u64`: a bitmap of the tunnel peers' ports (their `tunnelPort`), laid out
    /// as [`GW_PORTS`]. `from_pod` drops a pod's own UDP to one of them at a peer node's
    /// address (`mn_tun_nodes_v1`; `tunnel_forged`):
    /// masqueraded to the node's address, as traffic leaving the pod network usually is, it
    /// would come from a node the peer knows, and the peer would deliver what it carries as
    /// if this node had encapsulated it, in the name of any pod of this cluster. meshnet's own
    /// tunnel packets are encapsulated after this check. The agent keeps the bits equal to the
    /// peers' ports.
    pub const TUN_PEER_PORTS: &str = "mn_tun_pports_v1";

    /// Every map, for pinning, dumping and detaching.
    pub const ALL_MAPS: [&str; 21] = [
        ROUTES, PEERS, NAT_FWD, NAT_REV, STATS, PEER_NAMES, FRAGS, CLOCK, LOCAL, GW_PORTS, TUN_ROUTES, TUN_NODES, TUN_CONFIG,
        TUN_STATS, TUN_PORTS, SWITCHES, TUN_FAST, TUN_CFG_SEQ, TUN_PORT_SLOTS, TUN_PEER_PORTS, TUN_NODE_SLOTS,
    ];

    /// tc ingress on the host side of pod interfaces: what pods send. The names are long
    /// and specific because a netlink tc filter is found again by its name.
    pub const PROG_FROM_POD: &str = "meshnet_from_pod";
    /// tc egress on the host side of pod interfaces: what pods receive.
    pub const PROG_TO_POD: &str = "meshnet_to_pod";
    /// Only in the logging object: writes the line of a decision the two programs above
    /// tail-call it with. Never attached.
    pub const PROG_LOG: &str = "meshnet_log";
    /// An empty tc program, the floor in benchmarks.
    pub const PROG_EMPTY: &str = "meshnet_empty";
    /// Only in the `bench-floor` object: a new flow's lookup and both state inserts, nothing
    /// else, and the same with one insert; the floors of a new flow in benchmarks.
    pub const PROG_FLOOR_TWO_INSERTS: &str = "meshnet_floor_two_inserts";
    pub const PROG_FLOOR_ONE_INSERT: &str = "meshnet_floor_one_insert";
    /// Only in the `bench-floor` object: an established flow's lookup and rewrite, nothing
    /// else; the floor of the hot path in benchmarks.
    pub const PROG_FLOOR_HOT: &str = "meshnet_floor_hot";
    /// Only in the `bench-floor` object: a decapsulation without a check, delivered through
    /// the stack and by redirect; the floors of a decapsulation in benchmarks.
    pub const PROG_FLOOR_DECAP_STACK: &str = "meshnet_floor_decap_stack";
    pub const PROG_FLOOR_DECAP_REDIRECT: &str = "meshnet_floor_decap_redirect";
    /// Tunnel mode: tc ingress on the uplinks, where tunnel packets arrive. Decapsulates
    /// what peers' nodes send to this node's tunnel port, before netfilter sees it.
    pub const PROG_TUNNEL_IN: &str = "meshnet_tun_in";

    /// Load-time constant of the object (a `.rodata` global the agent sets): non-zero when
    /// the kernel has `bpf_redirect_neigh` (5.10). Below that, the programs resolve the next
    /// hop with `bpf_fib_lookup`; the verifier prunes the branch the constant rules out, so
    /// an older kernel never sees the helper it lacks.
    pub const GLOBAL_HAVE_REDIRECT_NEIGH: &str = "MN_HAVE_REDIRECT_NEIGH";
}

/// Slots of `names::SWITCHES`. A fresh map holds zeros, and zero is every switch's safe
/// setting: a datapath whose switches were never set does all its lookups.
pub mod switch {
    /// Non-zero while this node has no tunnel route: `from_pod` then skips the tunnel trie,
    /// a helper call on every packet. The agent clears it before it writes the first route
    /// and sets it after it removed the last.
    pub const NO_TUNNEL_ROUTES: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// The slots of `names::TUN_FAST`.
pub mod tun_fast {
    /// This node's tunnel port (network byte order, in the low 16 bits); 0 without tunnel
    /// settings.
    pub const PORT: u32 = 0;
    /// This cluster's id, as in the settings; 0 without them, and `from_pod` then reads the
    /// settings (as it does for a cluster whose id happens to be 0).
    pub const CLUSTER_ID: u32 = 1;
    pub const COUNT: u32 = 2;
}

pub mod ip_summed {
    //! The skb's checksum state (`skb->ip_summed`), which `__sk_buff` does not show. On
    //! kernels with `bpf_cast_to_kern_ctx` (6.2) the program reads it from the kernel's
    //! `struct sk_buff`, whose layout, and the kfunc's BTF id, only the running kernel knows.
    //! So the object carries a placeholder sequence that the loader rewrites before loading:
    //! into the read ([`read`]) where the kernel's BTF has both, otherwise into a constant
    //! [`UNKNOWN`] ([`fallback`]), which sends the program down the path that asks the kernel
    //! through its checksum helper, as every kernel before 6.2 does.
    //!
    //! Each `u64` is one BPF instruction as it lies in the object (little endian: opcode,
    //! registers, 16-bit offset, 32-bit immediate). The sequence leaves the state in r0 and
    //! clobbers r1-r5, as a call does; r1 holds the context on entry.

    /// `CHECKSUM_NONE`, `_UNNECESSARY`, `_COMPLETE`, `_PARTIAL` (include/linux/skbuff.h).
    pub const NONE: u64 = 0;
    pub const UNNECESSARY: u64 = 1;
    pub const COMPLETE: u64 = 2;
    pub const PARTIAL: u64 = 3;
    /// Not read: a value `ip_summed`'s two bits cannot hold.
    pub const UNKNOWN: u64 = UNKNOWN_IMM as u64;
    const UNKNOWN_IMM: u32 = 4;

    /// The immediate of the placeholder call, "MNKF": unlikely anywhere else in code.
    pub const MAGIC: u32 = 0x4d4e_4b46;

    const fn insn(code: u8, regs: u8, off: u16, imm: u32) -> u64 {
        (code as u64) | (regs as u64) << 8 | (off as u64) << 16 | (imm as u64) << 32
    }

    /// `BPF_JMP|BPF_CALL`, `BPF_LDX|BPF_MEM|BPF_B`, `BPF_ALU64|BPF_RSH|BPF_K`,
    /// `BPF_ALU64|BPF_AND|BPF_K`, `BPF_ALU64|BPF_MOV|BPF_K`, `BPF_JMP|BPF_JA`.
    const CALL: u8 = 0x85;
    const LDXB: u8 = 0x71;
    const RSH: u8 = 0x77;
    const AND: u8 = 0x57;
    const MOV: u8 = 0xb7;
    const JA: u8 = 0x05;
    /// src_reg `BPF_PSEUDO_KFUNC_CALL` (2), dst_reg 0.
    const KFUNC: u8 = 0x20;

    /// What the object carries: a kfunc call to no function, a byte load at no offset.
    pub const PLACEHOLDER: [u64; 4] = read(MAGIC, 0, 0);

    /// r0 = bpf_cast_to_kern_ctx(r1) (BTF id `kfunc`); r0 = *(u8 *)(r0 + byte) (`byte` below
    /// 0x8000: the offset is signed); r0 >>= shift; r0 &= 3. `ip_summed` is a two-bit field,
    /// little endian.
    #[must_use]
    pub const fn read(kfunc: u32, byte: u16, shift: u8) -> [u64; 4] {
        [insn(CALL, KFUNC, 0, kfunc), insn(LDXB, 0, byte, 0), insn(RSH, 0, 0, shift as u32), insn(AND, 0, 0, 3)]
    }

    /// r0 = UNKNOWN, then jumps to the next instruction: no-ops the verifier removes (it
    /// refuses code it cannot reach, so the rest cannot just be jumped over).
    #[must_use]
    pub const fn fallback() -> [u64; 4] {
        let nop = insn(JA, 0, 0, 0);
        [insn(MOV, 0, 0, UNKNOWN_IMM), nop, nop, nop]
    }
}

pub mod limits {
    //! Map sizes and per-value limits.

    /// Remote CIDRs across all peers.
    pub const MAX_ROUTES: u32 = 131_072;
    /// Peers (remote clusters).
    pub const MAX_PEERS: u32 = 1024;
    /// Gateways per peer. One peer value holds them all so that a gateway set changes in
    /// one atomic map update.
    pub const MAX_GATEWAYS: usize = 8;
    /// This cluster's pod CIDRs the datapath recognises without a lookup; more are fine,
    /// their traffic just takes the lookups.
    pub const MAX_LOCAL_CIDRS: usize = 8;
    /// Words of the port bitmaps (`names::GW_PORTS`, `names::TUN_PEER_PORTS`): 65,536 bits.
    pub const GW_PORT_WORDS: u32 = 1024;
    /// Datagrams being fragmented at once, per node.
    pub const MAX_FRAGS: u32 = 8192;
    /// Default flow-state size; the config overrides it.
    pub const DEFAULT_NAT_ENTRIES: u32 = 65_536;
    /// A flow idle at least this long has its other half checked (and re-created if it is
    /// missing) on its next packet. Busy flows pay nothing for the check; the only ways to
    /// lose a half are races with the agent's GC and purges, which heal within this time.
    pub const HALF_CHECK_NS: u64 = 1_000_000_000;
    /// How many alternative source ports a colliding flow tries before giving up.
    pub const REMAP_ATTEMPTS: u32 = 8;
    /// Remapped source ports come from this range. It sits above the usual Linux
    /// ephemeral range (32768–60999) so that a remapped port rarely equals a port the
    /// pod's own sockets pick.
    pub const REMAP_PORT_MIN: u16 = 61_000;
    pub const REMAP_PORT_SPAN: u16 = 4_500;
    /// Log lines the logging object writes per second on a node, whatever its number of
    /// CPUs; the rest are counted in [`crate::LogBudget::suppressed`]. A drop flood would
    /// otherwise fill the ring and the agent's log.
    pub const LOG_LINES_PER_SEC: u32 = 200;
    /// The logging object also stops writing while its ring (aya-log's, 128 KiB) is more
    /// than this full, so that however many CPUs log at once, the ring never overflows
    /// unseen: what is not written is counted.
    pub const LOG_RING_HIGH_WATER: u64 = 64 * 1024;
    /// Tunnel peer nodes' pod CIDRs across all tunnel peers.
    pub const MAX_TUNNEL_ROUTES: u32 = 16_384;
    /// Tunnel peer nodes across all tunnel peers.
    pub const MAX_TUNNEL_NODES: u32 = 4096;
    /// This node's own pod CIDRs, the only destinations the tunnel delivers to.
    pub const MAX_NODE_CIDRS: usize = 4;
    /// Pod interfaces on one node (kubelet's default is 110 pods).
    pub const MAX_POD_PORTS: u32 = 4096;
    /// Slots of `mn_tun_pslots_v1`, a power of two: a pod's slot is the low bits of its
    /// address, so the pods of one CIDR up to a /20 never share one. A change needs a new
    /// map name: the agent refuses pins whose layout it does not know.
    pub const POD_PORT_SLOTS: u32 = 4096;
    /// Slots of `mn_tun_nslots_v1`, a power of two: a node's slot is the low bits of its
    /// address, so the nodes of one LAN up to a /20 never share one. A change needs a new
    /// map name, as above.
    pub const NODE_SLOTS: u32 = 4096;
}

pub mod tunnel {
    //! The tunnel's wire format: outer IPv4, UDP, then meshnet's own header, then the pod's
    //! IPv4 packet unchanged.

    /// `b"MN"`: the first bytes after the outer UDP header.
    pub const MAGIC: u16 = 0x4d4e;
    pub const VERSION: u8 = 1;
    /// Outer IPv4 header, without options.
    pub const OUTER_IP_LEN: u32 = 20;
    pub const UDP_LEN: u32 = 8;
    /// meshnet's header ([`crate::TunnelHeader`]).
    pub const HEADER_LEN: u32 = 8;
    /// What the tunnel adds to every packet.
    pub const OVERHEAD: u32 = OUTER_IP_LEN + UDP_LEN + HEADER_LEN;
    /// The outer UDP source port is a hash of the inner flow within this range (the usual
    /// Linux ephemeral range, as VXLAN does), so that RSS and ECMP spread the flows.
    pub const SPORT_MIN: u16 = 32_768;
    pub const SPORT_SPAN: u16 = 28_232;
    /// IPv4 and TCP headers without options: an MSS is the MTU less these.
    pub const IP_TCP_LEN: u32 = 40;
    /// Outer TTL.
    pub const TTL: u8 = 64;
}

/// Datapath counters, one slot each in the per-CPU stats map.
///
/// The discriminants are the map indices, so they never change meaning; new counters go at
/// the end.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    // Slots 0 and 1 are retired: `redirected` and `reverse_translated`, which counted every
    // packet of a translated flow in each direction until flow events replaced them
    // (`FlowOpened`, `FlowAnswered`). A map pinned by an older agent keeps its totals there,
    // shown nowhere, and an older program still attached during a rollout goes on adding to
    // them; so they are never reused.
    /// New flow to a remote CIDR whose peer has no gateway for the protocol (UDP without a
    /// UDP NodePort), passed unchanged.
    NoGatewayForProto = 2,
    /// New flow to a remote CIDR whose peer has gateways, but all are down; dropped.
    NoLiveGateway = 3,
    /// A flow that collided with another one's translated tuple and got another source port.
    PortRemap = 4,
    /// Flow state could not be recorded (map full or every remap port taken); dropped so
    /// that no reply comes back untranslatable.
    NatInsertFailed = 5,
    /// An IPv4 header with IHL < 5 or a total length shorter than its header.
    Malformed = 6,
    /// A packet too short for the headers it claims.
    Truncated = 7,
    /// A later IPv4 fragment to a remote CIDR whose first fragment was not seen (it arrived
    /// first, or its flow could not be set up); dropped, never sent untranslated.
    FragmentDropped = 8,
    /// A packet from a pod to a remote CIDR with a protocol other than TCP or UDP (ping
    /// included); dropped, since it cannot be translated and must not leave untranslated.
    UnsupportedProto = 9,
    /// A helper that rewrites the packet failed; dropped.
    RewriteFailed = 10,
    /// A new flow found the flow table full; dropped. Established flows are never evicted
    /// to make room.
    NatTableFull = 11,
    /// A flow whose reverse entry was missing got it re-created from its forward entry.
    RevRestored = 12,
    /// A flow whose forward entry was missing got it re-created from its reverse entry, so
    /// it keeps its gateway and port.
    FwdRestored = 13,
    /// A packet to a remote CIDR that could not be parsed (malformed or truncated IPv4 or
    /// L4 header); dropped rather than sent untranslated.
    RemoteParseError = 14,
    /// An ICMP error (destination unreachable, fragmentation needed, time exceeded) about a
    /// translated flow, translated back so that the pod's socket sees it.
    IcmpErrorTranslated = 15,
    /// A later IPv4 fragment (without L4 header) translated like its first fragment.
    FragmentTranslated = 16,
    /// Tunnel mode: a packet from a pod encapsulated toward a peer's node.
    TunnelEncap = 17,
    /// A tunnel packet decapsulated and delivered to a local pod.
    TunnelDecap = 18,
    /// A TCP SYN or SYN-ACK whose MSS was lowered so that its segments fit the tunnel.
    TunnelMssClamped = 19,
    /// A packet too large for the tunnel: the pod was sent an ICMP "fragmentation needed"
    /// with the tunnel's MTU (DF set).
    TunnelFragNeeded = 20,
    /// A packet too large for the tunnel without DF, split into two fragments that each fit.
    TunnelFragmented = 21,
    /// A packet that could not be encapsulated, split or answered (a helper failed, or an
    /// oversized packet of a kind that cannot be split); dropped.
    TunnelEncapFailed = 22,
    /// No neighbour entry for the next hop toward a peer node (kernels before 5.10, which
    /// cannot resolve it from BPF); dropped until the kernel has resolved it.
    TunnelNoNeighbour = 23,
    /// To this node's tunnel port, but not from a known peer node: dropped.
    TunnelUnknownNode = 24,
    /// To the tunnel port, from a peer node, with a truncated or malformed meshnet header
    /// (magic, version) or inner packet, or an outer IPv4 header that is a fragment, has
    /// options or a wrong checksum: dropped.
    TunnelBadHeader = 25,
    /// A tunnel header naming another cluster than the sending node's: dropped.
    TunnelWrongCluster = 26,
    /// An inner source outside the sending peer's pod CIDRs (spoofing): dropped.
    TunnelSpoofedSource = 27,
    /// An inner destination outside this node's pod CIDRs: dropped, never forwarded on.
    TunnelNotLocal = 28,
    /// A decapsulated packet that could not be delivered (a helper failed); dropped.
    TunnelDecapFailed = 29,
    /// `delivery: redirect`: an inner destination in this node's pod CIDRs whose route leads
    /// off the node (through a gateway, or back out of the uplink), so no pod is behind it:
    /// dropped, never sent on past the forwarding path.
    TunnelNoPod = 30,
    /// To the port the uplink program takes while the tunnel settings name another (the
    /// agent is changing the port), or have none: dropped.
    TunnelPortChanging = 31,
    /// From a pod interface, with a source address another pod interface holds, or on a flow
    /// another interface made: a pod posing as another pod (spoofing); dropped.
    SpoofedSource = 32,
    /// From a pod, UDP to a tunnel peer node at a tunnel peer's port (`names::TUN_PEER_PORTS`):
    /// a datagram of its own that the peer could take for tunnel traffic; dropped.
    TunnelForged = 33,
    /// To the tunnel port on an uplink, in a frame not addressed to the uplink's MAC. A
    /// broadcast or multicast one (meshnet never sends them) is dropped; one to another host's
    /// MAC (a switch flooding it) is dropped if a check refuses it, else decapsulated and handed
    /// to the stack, never redirected: the stack drops it, unless a bridge or macvlan above the
    /// uplink owns the MAC.
    TunnelNotForNode = 34,
    /// A flow from a pod to a remote pod opened toward a peer's gateway: its forward entry
    /// created, at its first packet. Flow events are counted, not packets, so that an
    /// established flow's packets write no counter; per-flow activity is in the flow table
    /// (`maps dump nat`).
    FlowOpened = 35,
    /// An answer to a translated flow: a reply rewritten back to the remote pod's address
    /// while the flow was unanswered (its first reply, and the first after the pod reset or
    /// reopened it). The flows still unanswered are `meshnet_unanswered_flows`.
    FlowAnswered = 36,
}

impl Counter {
    /// The stats map's slots, the retired ones included.
    pub const COUNT: u32 = 37;
    /// Slots no counter uses any more (see the enum), never shown.
    pub const RETIRED: [u32; 2] = [0, 1];
    /// Every live counter.
    pub const ALL: [Counter; Self::COUNT as usize - Self::RETIRED.len()] = [
        Counter::FlowOpened,
        Counter::FlowAnswered,
        Counter::NoGatewayForProto,
        Counter::NoLiveGateway,
        Counter::PortRemap,
        Counter::NatInsertFailed,
        Counter::Malformed,
        Counter::Truncated,
        Counter::FragmentDropped,
        Counter::UnsupportedProto,
        Counter::RewriteFailed,
        Counter::NatTableFull,
        Counter::RevRestored,
        Counter::FwdRestored,
        Counter::RemoteParseError,
        Counter::IcmpErrorTranslated,
        Counter::FragmentTranslated,
        Counter::TunnelEncap,
        Counter::TunnelDecap,
        Counter::TunnelMssClamped,
        Counter::TunnelFragNeeded,
        Counter::TunnelFragmented,
        Counter::TunnelEncapFailed,
        Counter::TunnelNoNeighbour,
        Counter::TunnelUnknownNode,
        Counter::TunnelBadHeader,
        Counter::TunnelWrongCluster,
        Counter::TunnelSpoofedSource,
        Counter::TunnelNotLocal,
        Counter::TunnelDecapFailed,
        Counter::TunnelNoPod,
        Counter::TunnelPortChanging,
        Counter::SpoofedSource,
        Counter::TunnelForged,
        Counter::TunnelNotForNode,
    ];

    /// The stable name used in dumps and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NoGatewayForProto => "no_gateway_for_proto",
            Counter::NoLiveGateway => "no_live_gateway",
            Counter::PortRemap => "port_remap",
            Counter::NatInsertFailed => "nat_insert_failed",
            Counter::Malformed => "malformed",
            Counter::Truncated => "truncated",
            Counter::FragmentDropped => "fragment_dropped",
            Counter::UnsupportedProto => "unsupported_proto",
            Counter::RewriteFailed => "rewrite_failed",
            Counter::NatTableFull => "nat_table_full",
            Counter::RevRestored => "rev_restored",
            Counter::FwdRestored => "fwd_restored",
            Counter::RemoteParseError => "remote_parse_error",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::FragmentTranslated => "fragment_translated",
            Counter::TunnelEncap => "tunnel_encap",
            Counter::TunnelDecap => "tunnel_decap",
            Counter::TunnelMssClamped => "tunnel_mss_clamped",
            Counter::TunnelFragNeeded => "tunnel_frag_needed",
            Counter::TunnelFragmented => "tunnel_fragmented",
            Counter::TunnelEncapFailed => "tunnel_encap_failed",
            Counter::TunnelNoNeighbour => "tunnel_no_neighbour",
            Counter::TunnelUnknownNode => "tunnel_unknown_node",
            Counter::TunnelBadHeader => "tunnel_bad_header",
            Counter::TunnelWrongCluster => "tunnel_wrong_cluster",
            Counter::TunnelSpoofedSource => "tunnel_spoofed_source",
            Counter::TunnelNotLocal => "tunnel_not_local",
            Counter::TunnelDecapFailed => "tunnel_decap_failed",
            Counter::TunnelNoPod => "tunnel_no_pod",
            Counter::TunnelPortChanging => "tunnel_port_changing",
            Counter::SpoofedSource => "spoofed_source",
            Counter::TunnelForged => "tunnel_forged",
            Counter::TunnelNotForNode => "tunnel_not_for_node",
            Counter::FlowOpened => "flow_opened",
            Counter::FlowAnswered => "flow_answered",
        }
    }

    /// The counter in slot `i` of the stats map, if a live one.
    #[must_use]
    pub fn from_index(i: u32) -> Option<Counter> {
        Self::ALL.iter().copied().find(|c| *c as u32 == i)
    }
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Value of the route trie. The key is an LPM key whose data is the network address in
/// network byte order (`u32` holding the wire bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RouteValue {
    pub peer_id: u32,
}

/// A peer's name as stored in `mn_names_v1`: NUL-padded UTF-8 (Kubernetes cluster names
/// are DNS labels of at most 63 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PeerName {
    pub bytes: [u8; 64],
}

/// One of this cluster's pod CIDRs: address and mask, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LocalNet {
    pub addr_be: u32,
    pub mask_be: u32,
}

impl LocalNet {
    /// Matches no address: any address masked with 0 is 0, never `u32::MAX`.
    pub const NONE: LocalNet = LocalNet { addr_be: u32::MAX, mask_be: 0 };

    /// Whether `addr_be` lies in this CIDR. A zeroed slot (mask 0, as `Default` makes one)
    /// holds nothing rather than everything. The datapath's loops test the mask alone: their
    /// unused slots hold [`LocalNet::NONE`].
    #[must_use]
    pub fn contains(&self, addr_be: u32) -> bool {
        self.mask_be != 0 && addr_be & self.mask_be == self.addr_be
    }
}

/// This cluster's pod CIDRs, as `mn_local_v1` holds them. An array value is overwritten in
/// place, so a program could read one half-written; `seq` guards it as a seqlock. User space
/// writes the whole value three times: the old nets with `seq` made odd, the new nets with
/// `seq` still odd, the new nets with `seq` made even. A program that reads an odd `seq`, or
/// a different `seq` after the nets than before, does not trust what it read and takes the
/// lookups, as it would without this map: a torn read costs time, never a wrong verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LocalCidrs {
    pub seq: u32,
    /// How many of `nets` are in use; the slots past it hold [`LocalNet::NONE`], so that the
    /// datapath can test every slot without testing `count`.
    pub count: u32,
    pub nets: [LocalNet; limits::MAX_LOCAL_CIDRS],
}

/// The logging object's rate limit (`names::LOG_BUDGET`), shared by the node's CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LogBudget {
    /// The second (flow clock / 10^9) that `used` counts in.
    pub second: u64,
    pub used: u32,
    pub _pad: u32,
    /// Lines not written since the programs were loaded: over the per-second budget, or the
    /// ring above its high-water mark.
    pub suppressed: u64,
}

/// One node of a tunnel peer, as `mn_tun_routes_v1` maps that node's pod CIDR to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TunnelNode {
    /// The peer node's address: the outer destination.
    pub addr_be: u32,
    /// This node's address toward it: the outer source.
    pub src_be: u32,
    /// The peer's tunnel NodePort: the outer UDP destination port.
    pub port_be: u16,
    /// 1 + the slot of the peer's counters in `mn_tun_stats_v2`; 0: none (a route an agent
    /// before v2 wrote), nothing counted.
    pub stats_slot: u16,
    pub peer_id: u32,
    /// This node's interface toward the peer node.
    pub ifindex: u32,
    /// That interface's MTU: what an outer packet may not exceed.
    pub mtu: u32,
}

/// [`TunnelConfig::flags`]: deliver decapsulated packets with `bpf_redirect_neigh` straight
/// to the pod's interface, bypassing the node's netfilter; without it they go through the
/// stack (routing, FORWARD, NetworkPolicy) as if they had arrived unencapsulated.
pub const TUN_DELIVER_REDIRECT: u32 = 1;

/// [`TunnelConfig::flags`], with [`TUN_DELIVER_REDIRECT`]: a pod of the port table gets the
/// packet with `bpf_redirect_peer` (5.10) straight into its end of the veth, which skips the
/// host end's qdisc and tc egress (a bandwidth limit, a CNI's eBPF policy there). Without it,
/// or before 5.10, out of the host end with `bpf_redirect`; a program older than this bit
/// ignores it and does the same.
pub const TUN_DELIVER_PEER: u32 = 2;

/// This node's tunnel settings (`mn_tun_cfg_v1`, key 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TunnelConfig {
    /// This cluster's id (`peer_id` of its name), written into every tunnel header.
    pub cluster_id: u32,
    /// This node's tunnel port: the only UDP port the decapsulating program takes.
    pub port_be: u16,
    pub _pad: u16,
    /// `TUN_*` bits.
    pub flags: u32,
    /// The MTU of this node's uplinks: an MSS arriving through the tunnel is clamped to it.
    pub mtu: u32,
    /// This node's pod CIDRs, the only inner destinations delivered. Unused slots hold
    /// [`LocalNet::NONE`].
    pub nets: [LocalNet; limits::MAX_NODE_CIDRS],
    /// This node's own addresses inside `nets` (the bridge's gateway address), which the
    /// tunnel never delivers to: a packet for one would reach the node's own sockets, not a
    /// pod. Unused slots hold 0. The agent fills them from the node's interfaces.
    pub hosts_be: [u32; limits::MAX_NODE_CIDRS],
}

/// The tunnel settings as `mn_tun_cfgs_v1` holds them. An array value is overwritten in
/// place, so `seq` guards it as in [`LocalCidrs`]: user space writes the whole value three
/// times (the old settings with `seq` made odd, the new ones with `seq` still odd, the new
/// ones with `seq` made even), so that each write changes either `seq` or the settings,
/// never both. A program that reads an odd `seq`, or another `seq` after the settings than
/// before, looks the settings' hash up instead: a torn read costs time, never a verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SeqTunnelConfig {
    pub seq: u32,
    pub _pad: u32,
    /// A `port_be` of 0: no settings here (look the hash up).
    pub cfg: TunnelConfig,
}

/// Packets and bytes through the tunnel with one peer (a slot of `mn_tun_stats_v2`, per
/// CPU). Bytes are the inner packets' IPv4 lengths.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TunnelStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// The peer whose slot this is, and 1 while the slot is that peer's (0: free). The agent
    /// writes both on every CPU's copy; the datapath never writes them.
    pub peer_id: u32,
    pub in_use: u32,
}

/// Value of `mn_tun_ports_v1`: where a pod is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PodPort {
    /// The host side of the pod's interface.
    pub ifindex: u32,
    /// The pod's own MAC address (the frame's destination).
    pub pod_mac: [u8; 6],
    /// The host side's MAC address (the frame's source).
    pub host_mac: [u8; 6],
}

/// Value of `mn_tun_pslots_v1`: a pod's [`PodPort`] in its slot, under the slot's seqlock.
/// The agent writes a new value in three writes (`seq` made odd, the value, `seq` made even
/// again), so a reader that sees the same even `seq` before and after has read one whole
/// value. An `addr_be` of 0 (no pod has it): an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SeqPodPort {
    pub seq: u32,
    /// The pod's address, network byte order: the slot holds this pod only.
    pub addr_be: u32,
    pub port: PodPort,
}

/// The slot of `mn_tun_pslots_v1` where the pod at `addr_be` (network byte order) can be.
#[inline(always)]
#[must_use]
pub const fn pod_port_slot(addr_be: u32) -> u32 {
    u32::from_be(addr_be) & (limits::POD_PORT_SLOTS - 1)
}

/// Value of `mn_tun_nslots_v1`: a tunnel peer node in its slot, with the pod CIDRs it hosts
/// (those of its routes that overlap no other route, at most [`limits::MAX_NODE_CIDRS`]),
/// under the slot's seqlock, written as [`SeqPodPort`]'s. A slot holds no CIDR with a mask
/// of 0 (no route is a default route), and the datapath takes none: an empty slot holds
/// [`LocalNet::NONE`] in every CIDR, and a zeroed one, never written, holds nothing either.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SeqNodeSlot {
    pub seq: u32,
    /// The node's address, network byte order: the slot holds this node only.
    pub addr_be: u32,
    pub peer_id: u32,
    /// As [`TunnelNode::stats_slot`].
    pub stats_slot: u16,
    pub _pad: u16,
    pub nets: [LocalNet; limits::MAX_NODE_CIDRS],
}

impl SeqNodeSlot {
    /// A slot that names no node.
    pub const EMPTY: SeqNodeSlot = SeqNodeSlot { seq: 0, addr_be: 0, peer_id: 0, stats_slot: 0, _pad: 0, nets: [LocalNet::NONE; limits::MAX_NODE_CIDRS] };
}

/// The slot of `mn_tun_nslots_v1` where the node at `addr_be` (network byte order) can be.
#[inline(always)]
#[must_use]
pub const fn node_slot(addr_be: u32) -> u32 {
    u32::from_be(addr_be) & (limits::NODE_SLOTS - 1)
}

/// meshnet's header, right after the outer UDP header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TunnelHeader {
    /// [`tunnel::MAGIC`], network byte order.
    pub magic_be: u16,
    /// [`tunnel::VERSION`].
    pub version: u8,
    /// Reserved, 0.
    pub flags: u8,
    /// The sending cluster's id, network byte order.
    pub cluster_be: u32,
}

/// The outer UDP source port of an inner flow (host byte order): a hash of its addresses,
/// protocol and ports (0 for a protocol without them), so that one flow keeps one outer
/// tuple and different flows spread over receive queues and ECMP paths.
#[must_use]
#[inline(always)]
pub const fn tunnel_sport(key: &FlowKey) -> u16 {
    let h = flow_hash(key, 0x7475_6e6e);
    #[expect(clippy::cast_possible_truncation, reason = "the remainder is below SPORT_SPAN, a u16")]
    let offset = (h % tunnel::SPORT_SPAN as u32) as u16;
    tunnel::SPORT_MIN + offset
}

/// [`Gateway::flags`]: the gateway takes new flows.
pub const GW_UP: u32 = 1;

/// One east-west gateway of a peer: a node IP and its NodePorts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Gateway {
    /// Node IP, network byte order.
    pub addr_be: u32,
    /// TCP NodePort, network byte order.
    pub tcp_port_be: u16,
    /// UDP NodePort, network byte order; 0 when the gateway takes no UDP.
    pub udp_port_be: u16,
    /// [`GW_UP`] and future flags.
    pub flags: u32,
}

/// All gateways of one peer, so that a gateway set is replaced in one map update.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PeerGateways {
    /// Valid entries at the front of `gateways`.
    pub count: u32,
    pub gateways: [Gateway; limits::MAX_GATEWAYS],
}

impl PeerGateways {
    /// The valid gateways: the first `count`, never more than the array holds, whatever a
    /// map entry's `count` says.
    #[must_use]
    pub fn live(&self) -> &[Gateway] {
        &self.gateways[..(self.count as usize).min(limits::MAX_GATEWAYS)]
    }

    pub fn live_mut(&mut self) -> &mut [Gateway] {
        &mut self.gateways[..(self.count as usize).min(limits::MAX_GATEWAYS)]
    }
}

/// A flow as the datapath sees it at one point: addresses and ports in network byte order.
///
/// Used for both NAT maps: in `mn_nat_fwd_v2` it is the pod's original flow (src = pod,
/// dst = remote pod); in `mn_nat_rev_v2` it is the reply as it reaches the pod's interface
/// (src = gateway, dst = pod with the possibly remapped port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of `mn_frags_v1`: one IPv4 datagram as RFC 791 identifies its fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `mn_frags_v1`: the ports of the datagram's first fragment, as it arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// [`NatFwd::flags`] / [`NatRev::flags`]: a FIN was seen from the pod.
pub const FLOW_FIN_POD: u32 = 1;
/// A FIN was seen from the gateway side.
pub const FLOW_FIN_PEER: u32 = 2;
/// A RST was seen in either direction.
pub const FLOW_RST: u32 = 4;
/// The flow's source port was remapped because of a collision.
pub const FLOW_REMAPPED: u32 = 8;
/// [`NatRev::flags`] only: no reply has reached the pod since the flow was created. Set by
/// `new_flow`, cleared by the first reply; the GC expires such a flow after
/// `nat.unansweredTimeoutSeconds` instead of the established timeouts, so that junk a pod
/// sends (to ports nobody answers, with bad checksums) cannot hold the table for a day. It
/// says "unanswered", not "answered": entries of earlier releases, and every entry re-created
/// from its other half, lack it and count as answered, the safe side for a live connection.
pub const FLOW_UNANSWERED: u32 = 16;

/// Forward translation of one pod flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NatFwd {
    /// Gateway node IP the flow was pinned to.
    pub gw_addr_be: u32,
    /// Gateway NodePort for the flow's protocol.
    pub gw_port_be: u16,
    /// Source port on the wire: the pod's own, or the remapped one.
    pub nat_sport_be: u16,
    pub peer_id: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// The pod's interface (host side) the flow was seen on, so that the flows of a pod are
    /// purged when its interface goes.
    pub ifindex: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last packet from the pod.
    pub last_seen_ns: u64,
}

/// [`NatFwd`] as releases before v2 laid it out (in `mn_nat_fwd_v1`), for migration.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NatFwdV1 {
    pub gw_addr_be: u32,
    pub gw_port_be: u16,
    pub nat_sport_be: u16,
    pub peer_id: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
}

impl NatFwdV1 {
    /// The v2 entry; the interface is unknown (0) until the flow's next packet.
    #[must_use]
    pub const fn upgrade(self) -> NatFwd {
        NatFwd {
            gw_addr_be: self.gw_addr_be,
            gw_port_be: self.gw_port_be,
            nat_sport_be: self.nat_sport_be,
            peer_id: self.peer_id,
            flags: self.flags,
            ifindex: 0,
            _pad: 0,
            last_seen_ns: self.last_seen_ns,
        }
    }
}

/// Reverse translation: how to restore a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NatRev {
    /// The remote pod the pod believes it talks to.
    pub remote_addr_be: u32,
    pub remote_port_be: u16,
    /// The pod's own source port (differs from the wire port after a remap).
    pub pod_port_be: u16,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// The flow's peer, so that a lost forward entry can be re-created from this one
    /// (`_pad`, always 0, in the v1 layout).
    pub peer_id: u32,
    /// `bpf_ktime_get_ns()` of the last reply.
    pub last_seen_ns: u64,
}

impl FlowKey {
    /// A key with its padding zeroed. Built from whole words: a literal with `_pad: [0; 3]`
    /// compiles, in the eBPF object, to a call of `memset` (a BPF-to-BPF call with a byte
    /// loop) on every packet.
    #[inline(always)]
    #[must_use]
    pub const fn new(src_be: u32, dst_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> FlowKey {
        let (s, d) = (sport_be.to_ne_bytes(), dport_be.to_ne_bytes());
        let words = [src_be, dst_be, u32::from_ne_bytes([s[0], s[1], d[0], d[1]]), u32::from_ne_bytes([proto, 0, 0, 0])];
        // SAFETY: FlowKey is repr(C): four 4-byte words (the ports share the third, proto and
        // the padding the fourth), 16 bytes, alignment 4, any bit pattern valid.
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }

    /// The forward key of the flow a reverse entry restores.
    #[must_use]
    pub const fn fwd_of_rev(rev_key: &FlowKey, rev: &NatRev) -> FlowKey {
        FlowKey::new(rev_key.dst_be, rev.remote_addr_be, rev.pod_port_be, rev.remote_port_be, rev_key.proto)
    }

    /// The forward entry a reverse entry implies: the inverse of [`FlowKey::rev_of_fwd`].
    #[must_use]
    pub const fn fwd_value_of_rev(rev_key: &FlowKey, rev: &NatRev, ifindex: u32, now_ns: u64) -> NatFwd {
        NatFwd {
            ifindex,
            _pad: 0,
            gw_addr_be: rev_key.src_be,
            gw_port_be: rev_key.sport_be,
            nat_sport_be: rev_key.dport_be,
            peer_id: rev.peer_id,
            flags: (rev.flags & !FLOW_UNANSWERED) | if rev_key.dport_be == rev.pod_port_be { 0 } else { FLOW_REMAPPED },
            last_seen_ns: now_ns,
        }
    }

    /// The reverse entry a forward entry implies.
    #[must_use]
    pub const fn rev_value_of_fwd(fwd_key: &FlowKey, fwd: &NatFwd, now_ns: u64) -> NatRev {
        NatRev {
            remote_addr_be: fwd_key.dst_be,
            remote_port_be: fwd_key.dport_be,
            pod_port_be: fwd_key.sport_be,
            // Never unanswered: a re-created reverse entry may belong to a flow that has long
            // been answered; `new_flow` marks its own.
            flags: fwd.flags & !(FLOW_REMAPPED | FLOW_UNANSWERED),
            peer_id: fwd.peer_id,
            last_seen_ns: now_ns,
        }
    }

    /// The reverse key under which replies to a translated flow arrive.
    #[must_use]
    pub const fn rev_of_fwd(fwd_key: &FlowKey, fwd: &NatFwd) -> FlowKey {
        FlowKey::new(fwd.gw_addr_be, fwd_key.src_be, fwd.gw_port_be, fwd.nat_sport_be, fwd_key.proto)
    }
}

/// The flow hash that picks a gateway and remap ports. Shared so that user space
/// (`meshnet explain`) predicts exactly what the datapath picks. It only needs to spread
/// flows, not resist an adversary: a pod can at worst steer its own flows.
#[must_use]
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    // murmur3's finaliser over the tuple words: cheap, branch-free, good avalanche.
    let mut h = seed ^ 0x9e37_79b9;
    h = mix(h, key.src_be);
    h = mix(h, key.dst_be);
    h = mix(h, (key.sport_be as u32) << 16 | key.dport_be as u32);
    h = mix(h, key.proto as u32);
    fmix(h)
}

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    let k = w.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Index of the gateway a new flow starts its search at; the datapath then takes the first
/// live gateway from there on, wrapping around.
#[must_use]
#[inline(always)]
pub const fn gateway_start(key: &FlowKey, count: u32) -> u32 {
    if count == 0 {
        0
    } else {
        flow_hash(key, 0) % count
    }
}

/// The `attempt`-th alternative source port (host byte order) for a colliding flow.
#[must_use]
#[inline(always)]
pub const fn remap_port(key: &FlowKey, attempt: u32) -> u16 {
    let h = flow_hash(key, attempt.wrapping_add(1));
    #[expect(clippy::cast_possible_truncation, reason = "the remainder is below REMAP_PORT_SPAN, a u16")]
    let offset = (h % limits::REMAP_PORT_SPAN as u32) as u16;
    limits::REMAP_PORT_MIN + offset
}

// Layout pins: the eBPF object and the agent are built separately, so these are what keeps
// them agreeing.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<RouteValue>() == 4);
    assert!(size_of::<PeerName>() == 64);
    assert!(size_of::<Gateway>() == 12);
    assert!(offset_of!(Gateway, udp_port_be) == 6);
    assert!(size_of::<PeerGateways>() == 4 + 12 * limits::MAX_GATEWAYS);
    assert!(size_of::<FlowKey>() == 16);
    assert!(offset_of!(FlowKey, proto) == 12);
    assert!(size_of::<NatFwd>() == 32);
    assert!(offset_of!(NatFwd, ifindex) == 16);
    assert!(offset_of!(NatFwd, last_seen_ns) == 24);
    assert!(size_of::<NatFwdV1>() == 24);
    assert!(size_of::<FragKey>() == 12);
    assert!(size_of::<FragPorts>() == 4);
    assert!(offset_of!(NatFwdV1, last_seen_ns) == 16);
    assert!(size_of::<NatRev>() == 24);
    assert!(offset_of!(NatRev, peer_id) == 12);
    assert!(offset_of!(NatRev, last_seen_ns) == 16);
    assert!(Counter::ALL.len() + Counter::RETIRED.len() == Counter::COUNT as usize);
    let mut i = 0;
    while i < Counter::ALL.len() {
        let slot = Counter::ALL[i] as u32;
        assert!(slot < Counter::COUNT && slot != Counter::RETIRED[0] && slot != Counter::RETIRED[1]);
        i += 1;
    }
    assert!(size_of::<LogBudget>() == 24);
    assert!(size_of::<TunnelNode>() == 24);
    assert!(offset_of!(TunnelNode, peer_id) == 12);
    assert!(size_of::<TunnelConfig>() == 16 + 12 * limits::MAX_NODE_CIDRS);
    assert!(size_of::<TunnelStats>() == 40);
    assert!(size_of::<SeqTunnelConfig>() == 8 + size_of::<TunnelConfig>());
    assert!(offset_of!(SeqTunnelConfig, cfg) == 8);
    assert!(offset_of!(TunnelStats, peer_id) == 32);
    assert!(offset_of!(TunnelNode, stats_slot) == 10);
    assert!(size_of::<PodPort>() == 16);
    assert!(size_of::<SeqPodPort>() == 24);
    assert!(offset_of!(SeqPodPort, port) == 8);
    assert!(limits::POD_PORT_SLOTS.is_power_of_two());
    assert!(size_of::<SeqNodeSlot>() == 16 + 8 * limits::MAX_NODE_CIDRS);
    assert!(offset_of!(SeqNodeSlot, nets) == 16);
    assert!(limits::NODE_SLOTS.is_power_of_two());
    assert!(size_of::<TunnelHeader>() == tunnel::HEADER_LEN as usize);
    assert!(tunnel::SPORT_MIN as u32 + tunnel::SPORT_SPAN as u32 <= 61_000);
    assert!(limits::REMAP_PORT_MIN as u32 + limits::REMAP_PORT_SPAN as u32 <= 65_535);
};

// aya's own marker for map keys and values; the orphan rule puts it here, behind `user`.
#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is repr(C), Copy, and has no padding or invalid bit patterns
    // (checked by bytemuck's Pod derive on the same types).
    unsafe impl aya::Pod for super::RouteValue {}
    unsafe impl aya::Pod for super::Gateway {}
    unsafe impl aya::Pod for super::PeerGateways {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::NatFwd {}
    unsafe impl aya::Pod for super::NatFwdV1 {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragPorts {}
    unsafe impl aya::Pod for super::NatRev {}
    unsafe impl aya::Pod for super::PeerName {}
    unsafe impl aya::Pod for super::LocalNet {}
    unsafe impl aya::Pod for super::LocalCidrs {}
    unsafe impl aya::Pod for super::LogBudget {}
    unsafe impl aya::Pod for super::TunnelNode {}
    unsafe impl aya::Pod for super::TunnelConfig {}
    unsafe impl aya::Pod for super::PodPort {}
    unsafe impl aya::Pod for super::SeqPodPort {}
    unsafe impl aya::Pod for super::SeqNodeSlot {}
    unsafe impl aya::Pod for super::TunnelStats {}
    unsafe impl aya::Pod for super::SeqTunnelConfig {}
}

#[cfg(test)]
mod tests {
    use super::{FlowKey, LocalNet};

    /// The word-built key is the field-by-field one, padding zeroed.
    #[test]
    fn flow_key_new_sets_every_field_and_zeroes_the_padding() {
        let k = FlowKey::new(0x0a0b_0c0d, 0x1121_3141, 0xabcd, 0x1234, 17);
        assert_eq!(
            k,
            FlowKey { src_be: 0x0a0b_0c0d, dst_be: 0x1121_3141, sport_be: 0xabcd, dport_be: 0x1234, proto: 17, _pad: [0; 3] }
        );
    }

    /// A CIDR holds its own addresses only; neither an unused slot nor a zeroed one holds any.
    #[test]
    fn local_net_contains_its_addresses_and_an_empty_slot_none() {
        let be = |a: [u8; 4]| u32::from_ne_bytes(a);
        let net = LocalNet { addr_be: be([10, 244, 1, 0]), mask_be: be([255, 255, 255, 0]) };
        assert!(net.contains(be([10, 244, 1, 0])) && net.contains(be([10, 244, 1, 255])));
        assert!(!net.contains(be([10, 244, 2, 1])) && !net.contains(be([11, 244, 1, 1])));
        for empty in [LocalNet::NONE, LocalNet::default()] {
            assert!(!empty.contains(be([10, 244, 1, 1])) && !empty.contains(0) && !empty.contains(u32::MAX));
        }
    }
}
