//! Per-packet cost of the tc programs through `BPF_PROG_TEST_RUN`.
//!
//! The trap: with `repeat`, the kernel runs the program again and again on the one skb it
//! built, so from the second run on a rewriting program sees the packet it already
//! rewrote. For `meshnet_from_pod` that rewritten packet (pod → gateway NodePort) is a miss,
//! so a naive `repeat` measures the miss path. Three methods avoid it, and each checks the
//! verdict and the datapath's counters and flow maps afterwards to prove which path ran:
//!
//! - **A, cycling flow entries, amortised.** Besides the real flow, the NAT maps get an
//!   entry for the *rewritten* tuple that translates it back (gateway → the remote pod; the
//!   remote pod → the gateway for replies). The `repeat` runs alternate between the two, each
//!   a genuine translation with old and new addresses and ports that differ, taking the full
//!   hit path (hash hit, flag and timestamp checks, the rewrite and its checksum work). An
//!   established flow's packet moves no counter, so the proof is the verdict: a run that
//!   missed would leave its packet and the maps as they were, so every later run would miss
//!   too, and the last run's verdict (the one the syscall returns) would be the miss's; the
//!   flow maps and every counter are checked unchanged, which that argument needs. One
//!   syscall runs 10^6 packets.
//! - **B, one syscall per fresh packet.** `repeat = 1`; the kernel copies a fresh packet in
//!   for every call and times that one run (which includes one clock read). Used for new
//!   flows (every call a new source address/port, so a genuinely new flow with its LPM walk
//!   and both state inserts), and for the hot path and the empty program measured the same
//!   way in the same loop, interleaved.
//! - **C, new flows through a chain of routes, amortised.** Each gateway is itself routed to
//!   the next peer's gateway, so every run of one `repeat` loop translates a flow it has never
//!   seen (see [`chain_new_flows`]).
//!
//! Figures are the kernel's per-run times (`BPF_PROG_TEST_RUN`'s duration: integer ns, and
//! the loop stops its clock while it yields the CPU to other tasks); wall times of the
//! syscalls are kept beside them.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use aya::{
    maps::{lpm_trie::Key, Array, MapData, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    Ebpf,
};
use etherparse::{PacketBuilder, TcpHeader, TcpOptionElement};
use meshnet::{
    config::{peer_id, Config},
    datapath::{self, Datapath, EBPF_OBJECT},
    maps::{self, addr_be, ControlMaps, Stats},
};
use meshnet_common::{limits, names, FlowKey, Gateway, LogBudget, NatFwd, NatRev, PeerGateways, RouteValue, GW_UP, IPPROTO_TCP};
use serde_json::{json, Value};

use crate::stats::{ratios, round, trimmed_mean, Stat};

const CONFIG: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
peers:
  - name: cluster2
    podCIDRs: ["10.245.0.0/16"]
    gateways:
      - {address: 192.0.2.2, port: 31674, udpPort: 31675}
"#;

const POD: [u8; 4] = [10, 244, 0, 10];
const LOCAL_POD: [u8; 4] = [10, 244, 0, 20];
/// A Service IP (before kube-proxy's DNAT): neither a local pod nor a remote CIDR, so
/// `from_pod` looks it up in the flow hash and the route trie.
const SERVICE: [u8; 4] = [10, 96, 0, 10];
const REMOTE: [u8; 4] = [10, 245, 0, 20];
const GW: [u8; 4] = [192, 0, 2, 2];
const GW_TCP: u16 = 31674;
const POD_PORT: u16 = 40_000;
const APP_PORT: u16 = 8080;
const DB_PORT: u16 = 5432;
const UNSPEC: u32 = u32::MAX;
const OK: u32 = 0;
/// `TC_ACT_SHOT`: a dropped packet.
const SHOT: u32 = 2;

pub struct Params {
    /// Runs per syscall for method A.
    pub repeat: u32,
    /// Repeats of every method-A figure (and batches of method B).
    pub reps: usize,
    /// New flows (method-B calls) per route configuration, in batches of `new_flow_batch`.
    pub new_flows: usize,
    pub new_flow_batch: usize,
    pub cidr_counts: Vec<usize>,
    /// Another build of the eBPF object to measure instead of the embedded one.
    pub object: Option<Vec<u8>>,
    /// Benchmark-only builds (cargo features of meshnet-ebpf) for the cost breakdown.
    pub variants: Vec<(String, Vec<u8>)>,
}

impl Params {
    #[must_use]
    pub fn new(quick: bool) -> Self {
        let env = |k: &str| std::env::var(k).ok();
        Self {
            repeat: 1_000_000,
            reps: if quick { 7 } else { 15 },
            // Development knobs, not for published figures.
            new_flows: env("MNBENCH_NEW_FLOWS").and_then(|v| v.parse().ok()).unwrap_or(1_000_000),
            new_flow_batch: 50_000,
            cidr_counts: env("MNBENCH_CIDRS").map_or_else(
                || vec![1, 1_000, 10_000, 100_000],
                |v| v.split(',').filter_map(|n| n.parse().ok()).collect(),
            ),
            object: None,
            variants: Vec::new(),
        }
    }
}

/// Which prefixes fill the route trie besides cluster2's 10.245.0.0/16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixSet {
    /// /24s spread evenly over 11.0.0.0–222.255.255.255: far from the addresses the
    /// benchmark looks up (all in 10.0.0.0/8), so a lookup leaves their part of the trie
    /// within the first 8 bits.
    Sparse,
    /// /28s spread evenly over 10.0.0.0/8 around 10.244.0.0/16 (local) and 10.245.0.0/16
    /// (remote): a lookup walks the trie down among them.
    Dense,
}

impl PrefixSet {
    pub fn name(self) -> &'static str {
        match self {
            PrefixSet::Sparse => "sparse",
            PrefixSet::Dense => "dense",
        }
    }
}

/// `count` prefixes of `set`, as (prefix length, network address).
#[must_use]
pub fn prefixes(set: PrefixSet, count: usize) -> Vec<(u32, [u8; 4])> {
    if count == 0 {
        return Vec::new();
    }
    match set {
        PrefixSet::Sparse => {
            // /24 slots from 11.0.0.0 up to 223.0.0.0, minus the gateway's 192.0.2.0/24.
            let first: u64 = 11 << 16;
            let span: u64 = (223 << 16) - first;
            let skip = (192u64 << 16) | 2;
            let mut out = Vec::with_capacity(count);
            let mut j = 0u64;
            while out.len() < count {
                let slot = first + j * span / count as u64;
                j += 1;
                let slot = if slot == skip { slot + 1 } else { slot };
                let a = (slot << 8) as u32;
                out.push((24, a.to_be_bytes()));
            }
            out
        }
        PrefixSet::Dense => {
            // /28 slots of 10.0.0.0/8 (2^20 of them), minus the 8192 of 10.244.0.0/15.
            let hole_start: u64 = (244 << 16) >> 4; // /28 index of 10.244.0.0
            let hole: u64 = 2 << 12;
            let allowed: u64 = (1 << 20) - hole;
            (0..count as u64)
                .map(|j| {
                    let mut slot = j * allowed / count as u64;
                    if slot >= hole_start {
                        slot += hole;
                    }
                    let a = (10u32 << 24) | ((slot as u32) << 4);
                    (28, a.to_be_bytes())
                })
                .collect()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------

pub(crate) fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let mut h = TcpHeader::new(sport, dport, 0x1000_0000, 64240);
    if syn {
        h.syn = true;
        h.set_options(&[TcpOptionElement::MaximumSegmentSize(1460), TcpOptionElement::WindowScale(7)]).unwrap();
    } else {
        h.ack = true;
        h.psh = true;
        h.acknowledgment_number = 0x2000_0001;
    }
    let payload: &[u8] = if syn { b"" } else { b"GET / HTTP/1.1\r\nHost: app\r\n\r\n" };
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 10], [2, 0, 0, 0, 0, 1])
        .ipv4(src, dst, 64)
        .tcp_header(h)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn icmp_echo(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 10], [2, 0, 0, 0, 0, 1])
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(0x4d4e, 1)
        .write(&mut out, b"meshnet")
        .unwrap();
    out
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Recomputes the IPv4 and TCP checksums of an Ethernet + IPv4 (no options) + TCP frame.
fn fix_checksums(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let c = fold(sum16(&f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let l4_len = tot - 20;
    f[34 + 16] = 0;
    f[34 + 17] = 0;
    let pseudo = sum16(&f[26..34]) + u32::from(f[23]) + l4_len as u32;
    let c = fold(pseudo + sum16(&f[34..34 + l4_len]));
    f[50..52].copy_from_slice(&c.to_be_bytes());
}

/// The `i`-th new flow's SYN: a distinct pod address and source port each time.
fn new_flow_syn(template: &mut [u8], i: usize) {
    let (ip, port) = new_flow_tuple(i);
    template[26..30].copy_from_slice(&ip);
    template[34..36].copy_from_slice(&port.to_be_bytes());
    fix_checksums(template);
}

// ---------------------------------------------------------------------------------------
// The loaded datapath
// ---------------------------------------------------------------------------------------

struct Dp {
    ebpf: Ebpf,
    maps: ControlMaps,
    stats: Stats,
}

pub(crate) struct Run {
    pub ret: u32,
    /// The kernel's per-run average.
    pub kernel: Duration,
    /// The whole syscall, measured here.
    pub wall: Duration,
}

impl Dp {
    fn load(max_flows: u32, object: Option<&[u8]>) -> anyhow::Result<Self> {
        // As the agent loads it (the logging build's line writer installed too).
        Self::with(match object {
            None => Datapath::load_unpinned(max_flows)?,
            Some(object) => Datapath::load_unpinned_object(max_flows, object)?,
        })
    }

    /// As the agent loads it, but with the flow maps allocated on demand whatever the kernel.
    fn load_on_demand(max_flows: u32, object: Option<&[u8]>) -> anyhow::Result<Self> {
        let layout = datapath::skb_layout();
        let (patched, _) = datapath::prepare_object(object.unwrap_or(EBPF_OBJECT), layout.as_ref())?;
        Self::with(Datapath::load_unpinned_with_flow_flags(max_flows, &patched, meshnet::migrate::NO_PREALLOC)?)
    }

    fn with(mut ebpf: aya::Ebpf) -> anyhow::Result<Self> {
        let config = Config::from_yaml(CONFIG)?;
        let mut maps = ControlMaps::from_ebpf(&mut ebpf)?;
        maps.sync(&config.desired())?;
        // The agent syncs the tunnel maps too, with no tunnel peer here: that switches the
        // tunnel trie's lookup off. Objects of earlier builds have no such maps.
        if let Ok(mut tunnel) = meshnet::tunnel::TunnelMaps::from_ebpf(&mut ebpf) {
            tunnel.sync(&config.desired(), &std::collections::BTreeMap::new(), meshnet::tunnel::DEFAULT_MTU, &[])?;
        }
        // As the agent does: with a flow clock published the datapath reads no clock. Objects
        // of earlier builds, measured for comparison, have no clock map.
        let _ = maps.publish_clock(meshnet::dump::monotonic_ns());
        let stats = maps::take_stats(&mut ebpf)?;
        Ok(Self { ebpf, maps, stats })
    }


    fn add_routes(&mut self, list: &[(u32, [u8; 4])]) -> anyhow::Result<()> {
        let value = RouteValue { peer_id: peer_id("cluster2") };
        for (len, addr) in list {
            self.maps
                .routes
                .insert(&Key::new(*len, addr_be((*addr).into())), value, 0)
                .context("inserting a route")?;
        }
        Ok(())
    }
}

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey {
        src_be: addr_be(src.into()),
        dst_be: addr_be(dst.into()),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

pub(crate) fn test_run(prog: &SchedClassifier, pkt: &[u8], repeat: u32) -> anyhow::Result<Run> {
    let t = Instant::now();
    let r = prog
        .test_run(TestRunOptions { data_in: Some(pkt), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    let wall = t.elapsed();
    Ok(Run { ret: r.return_value, kernel: r.duration, wall })
}

pub(crate) fn counter(stats: &Stats, name: &str) -> u64 {
    maps::sum_stats(stats).map_or(0, |m| m[name])
}

pub(crate) fn prog<'a>(ebpf: &'a Ebpf, name: &str) -> &'a SchedClassifier {
    ebpf.program(name).expect("program").try_into().expect("a tc program")
}

// ---------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------

/// Method-A figures for one case: ns/packet per repeat.
#[derive(Default)]
struct Amortised {
    wall: Vec<f64>,
    kernel: Vec<f64>,
}

/// One method-A case: a program, its packet, the counter that every run bumps (a drop's;
/// a translation of an established flow counts nothing) and the verdict of every run. A
/// translating case's verdict is `OK`, which no miss returns.
struct Case<'a> {
    name: &'static str,
    prog: &'a SchedClassifier,
    pkt: &'a [u8],
    counter: Option<&'static str>,
    verdict: u32,
}

/// What a run could write: every counter and both flow maps' entries.
type Written = (std::collections::BTreeMap<&'static str, u64>, Vec<(FlowKey, NatFwd)>, Vec<(FlowKey, NatRev)>);

fn written(dp: &Dp) -> anyhow::Result<Written> {
    let mut fwd = dp.maps.nat_fwd.iter().collect::<Result<Vec<_>, _>>()?;
    let mut rev = dp.maps.nat_rev.iter().collect::<Result<Vec<_>, _>>()?;
    let order = |k: &FlowKey| (k.src_be, k.dst_be, k.sport_be, k.dport_be, k.proto);
    fwd.sort_by_key(|(k, _)| order(k));
    rev.sort_by_key(|(k, _)| order(k));
    Ok((maps::sum_stats(&dp.stats)?, fwd, rev))
}

/// Runs one case `repeat` times in one syscall and checks which path ran: the kernel's
/// per-run average (integer ns; it leaves out the time other tasks ran when the loop yielded
/// the CPU) and the syscall's wall time per run.
///
/// The last run's verdict is the one returned. A run that took another path than the case's
/// would leave its packet and the maps as they were (a miss, a pass and a drop write
/// nothing, which the check of every counter and flow entry confirms), so every later run
/// would take it again and return its verdict: the case's verdict proves that every run took
/// the case's path, not only the first. A drop's counter must grow by `repeat`.
fn amortised(dp: &Dp, c: &Case<'_>, repeat: u32) -> anyhow::Result<(f64, f64)> {
    let mut want = written(dp)?;
    let r = test_run(c.prog, c.pkt, repeat)?;
    ensure!(r.ret == c.verdict, "{}: verdict {} instead of {}", c.name, r.ret, c.verdict);
    if let Some(n) = c.counter {
        *want.0.entry(n).or_default() += u64::from(repeat);
    }
    ensure!(written(dp)? == want, "{}: a counter or a flow entry was written, so the runs were not all alike", c.name);
    Ok((r.kernel.as_nanos() as f64, r.wall.as_secs_f64() * 1e9 / f64::from(repeat)))
}

/// The measured packets.
struct Packets {
    /// ICMP to a remote pod: dropped (gateway mode translates TCP and UDP only).
    drop: Vec<u8>,
    hot: Vec<u8>,
    reply: Vec<u8>,
    miss: Vec<u8>,
    local: Vec<u8>,
    foreign: Vec<u8>,
}

impl Packets {
    fn new() -> Self {
        Self {
            drop: icmp_echo(POD, REMOTE),
            hot: tcp(POD, POD_PORT, REMOTE, APP_PORT, false),
            reply: tcp(GW, GW_TCP, POD, POD_PORT, false),
            miss: tcp(POD, POD_PORT, SERVICE, APP_PORT, false),
            local: tcp(POD, POD_PORT, LOCAL_POD, APP_PORT, false),
            // A local pod's answer, from a port no gateway has (APP_PORT is marked as one for
            // the reply's cycle).
            foreign: tcp(LOCAL_POD, DB_PORT, POD, POD_PORT, false),
        }
    }
}

/// Establishes the measured flow the ordinary way (its first packet through `from_pod`), and
/// adds the cycling entries for method A. With `naive`, first shows the trap: a plain
/// `repeat` over the flow's packet.
fn establish(dp: &mut Dp, pk: &Packets, repeat: u32, naive: Option<&mut Value>) -> anyhow::Result<()> {
    let from_pod = prog(&dp.ebpf, names::PROG_FROM_POD);
    let before = counter(&dp.stats, "flow_opened");
    let r = test_run(from_pod, &pk.hot, 1)?;
    ensure!(
        r.ret == OK && counter(&dp.stats, "flow_opened") == before + 1,
        "the first packet was not translated (verdict {})",
        r.ret
    );
    if let Some(naive) = naive {
        // A new flow's first packet, as only a flow's opening is counted: the counter tells
        // how many runs translated.
        let port = POD_PORT + 1;
        let before = counter(&dp.stats, "flow_opened");
        let r = test_run(from_pod, &tcp(POD, port, REMOTE, APP_PORT, true), repeat)?;
        let translated = counter(&dp.stats, "flow_opened") - before;
        dp.maps.nat_fwd.remove(&key(POD, port, REMOTE, APP_PORT)).context("removing the naive run's flow")?;
        dp.maps.nat_rev.remove(&key(GW, GW_TCP, POD, port)).context("removing the naive run's reply tuple")?;
        *naive = json!({
            "ns_per_packet": round(r.kernel.as_nanos() as f64),
            "repeat": repeat,
            "runs_that_translated": translated,
        });
    }
    // The cycles: the rewritten packet's tuples translate back, so that every run is a
    // genuine translation, with old and new addresses and ports that differ as a real flow's
    // do (a tuple translated to itself would change nothing, and checksum work that depends on
    // the change could be skipped).
    let fwd = dp.maps.nat_fwd.get(&key(POD, POD_PORT, REMOTE, APP_PORT), 0).context("the flow's state")?;
    ensure!(fwd.gw_addr_be == addr_be(GW.into()) && fwd.gw_port_be == GW_TCP.to_be(), "unexpected flow state");
    let back = NatFwd { gw_addr_be: addr_be(REMOTE.into()), gw_port_be: APP_PORT.to_be(), ..fwd };
    dp.maps.nat_fwd.insert(key(POD, POD_PORT, GW, GW_TCP), back, 0)?;
    let rev = NatRev {
        remote_addr_be: addr_be(GW.into()),
        remote_port_be: GW_TCP.to_be(),
        pod_port_be: POD_PORT.to_be(),
        flags: 0,
        peer_id: 0,
        last_seen_ns: fwd.last_seen_ns,
    };
    dp.maps.nat_rev.insert(key(REMOTE, APP_PORT, POD, POD_PORT), rev, 0)?;
    // Its source port is the remote pod's, and `to_pod` looks up only packets from ports a
    // gateway has had: marked as one.
    dp.maps.mark_gateway_ports(std::iter::once(APP_PORT.to_be()))?;
    // The flow answered once, as a live one is: the first reply clears its unanswered mark
    // (and counts it), which the measured replies must not do again and again.
    let before = counter(&dp.stats, "flow_answered");
    let r = test_run(prog(&dp.ebpf, names::PROG_TO_POD), &pk.reply, 1)?;
    ensure!(
        r.ret == OK && counter(&dp.stats, "flow_answered") == before + 1,
        "the first reply did not answer the flow (verdict {})",
        r.ret
    );
    Ok(())
}

/// The measured cases; their names key the results, in [`CASES`]' order.
fn cases<'a>(ebpf: &'a Ebpf, pk: &'a Packets) -> [Case<'a>; 6] {
    let from_pod = prog(ebpf, names::PROG_FROM_POD);
    let to_pod = prog(ebpf, names::PROG_TO_POD);
    [
        Case { name: "empty", prog: prog(ebpf, names::PROG_EMPTY), pkt: &pk.hot, counter: None, verdict: UNSPEC },
        Case { name: "hot", prog: from_pod, pkt: &pk.hot, counter: None, verdict: OK },
        Case { name: "reply", prog: to_pod, pkt: &pk.reply, counter: None, verdict: OK },
        Case { name: "miss", prog: from_pod, pkt: &pk.miss, counter: None, verdict: UNSPEC },
        Case { name: "local", prog: from_pod, pkt: &pk.local, counter: None, verdict: UNSPEC },
        Case { name: "foreign", prog: to_pod, pkt: &pk.foreign, counter: None, verdict: UNSPEC },
    ]
}

pub const CASES: [&str; 6] = ["empty", "hot", "reply", "miss", "local", "foreign"];

/// The `i`-th new flow's pod address and source port.
fn new_flow_tuple(i: usize) -> ([u8; 4], u16) {
    ([10, 244, 1, 10 + (i / 50_000) as u8], 10_000 + (i % 50_000) as u16)
}

/// Method B for one route configuration: `batches` batches of `batch` new flows, each new
/// flow interleaved with an empty-program call and a hot-path call. The flow maps have the
/// default size (`nat.maxFlows` 65,536, what a node runs) and are emptied of the batch's flows
/// between batches, so no insert ever meets a full map.
fn per_call(dp: &mut Dp, pk: &Packets, batch: usize, batches: usize) -> anyhow::Result<Value> {
    let from_pod = prog(&dp.ebpf, names::PROG_FROM_POD);
    let empty = prog(&dp.ebpf, names::PROG_EMPTY);
    let opened_before = counter(&dp.stats, "flow_opened");
    let mut syn = tcp(POD, 1, REMOTE, APP_PORT, true);
    let (mut new_b, mut empty_b, mut hot_b) = (Vec::new(), Vec::new(), Vec::new());
    let (mut new_s, mut empty_s, mut hot_s) = (Vec::with_capacity(batch), Vec::with_capacity(batch), Vec::with_capacity(batch));
    let ns = |r: Run| u32::try_from(r.kernel.as_nanos()).unwrap_or(u32::MAX);
    for b in 0..batches {
        for i in b * batch..(b + 1) * batch {
            new_flow_syn(&mut syn, i);
            let r = test_run(from_pod, &syn, 1)?;
            if r.ret != OK {
                bail!("new flow {i}: verdict {}", r.ret);
            }
            new_s.push(ns(r));
            empty_s.push(ns(test_run(empty, &pk.hot, 1)?));
            let hot = test_run(from_pod, &pk.hot, 1)?;
            ensure!(hot.ret == OK, "method B: the established flow's packet got verdict {}", hot.ret);
            hot_s.push(ns(hot));
        }
        new_b.push(trimmed_mean(&mut new_s));
        empty_b.push(trimmed_mean(&mut empty_s));
        hot_b.push(trimmed_mean(&mut hot_s));
        new_s.clear();
        empty_s.clear();
        hot_s.clear();
        for i in b * batch..(b + 1) * batch {
            let (ip, port) = new_flow_tuple(i);
            dp.maps.nat_fwd.remove(&key(ip, port, REMOTE, APP_PORT)).context("removing a new flow")?;
            dp.maps.nat_rev.remove(&key(GW, GW_TCP, ip, port)).context("removing a new flow's reply tuple")?;
        }
    }
    let total = (batch * batches) as u64;
    let moved = counter(&dp.stats, "flow_opened") - opened_before;
    ensure!(moved == total, "method B: flow_opened grew by {moved}, expected {total}");
    for c in ["port_remap", "nat_insert_failed"] {
        ensure!(counter(&dp.stats, c) == 0, "method B: {c} = {}", counter(&dp.stats, c));
    }
    let net = |v: &[f64]| -> Vec<f64> { v.iter().zip(&empty_b).map(|(x, e)| x - e).collect() };
    Ok(json!({
        "batch": batch,
        "new_flows": total,
        "flow_map_entries": limits::DEFAULT_NAT_ENTRIES,
        "empty": { "ns": Stat::of(&empty_b).json() },
        "new_flow": {
            "ns": Stat::of(&new_b).json(),
            "ratio_to_empty": Stat::of(&ratios(&new_b, &empty_b)).json(),
            "net_ns": Stat::of(&net(&new_b)).json(),
        },
        "hot": {
            "ns": Stat::of(&hot_b).json(),
            "ratio_to_empty": Stat::of(&ratios(&hot_b, &empty_b)).json(),
            "net_ns": Stat::of(&net(&hot_b)).json(),
        },
    }))
}

/// Length of the chain of peers for method C.
const CHAIN: usize = 1000;

/// The chain's `k`-th gateway: 240.0.x.y (reserved space, outside both prefix sets).
fn chain_gw(k: usize) -> [u8; 4] {
    [240, 0, (k >> 8) as u8, k as u8]
}

/// Method C: new flows, amortised. A chain of routes makes every run of one `repeat` loop a
/// genuinely new flow: the first run translates the SYN to cluster2's gateway 192.0.2.2;
/// 192.0.2.2/32 is itself routed to a peer whose gateway is 240.0.0.0, which is routed to a
/// peer whose gateway is 240.0.0.1, and so on for `CHAIN` peers. So run k sees the packet
/// run k−1 rewrote, a flow it has never seen: LPM hit, gateway choice, reply-tuple claim,
/// both inserts and the rewrite, `CHAIN + 1` times per syscall. Every syscall sends a SYN
/// from a new source port, so every flow is new; `flow_opened` must grow by `CHAIN + 1` per
/// syscall and the flow maps are emptied of them between batches.
///
/// `on_demand`: with the flow maps allocated on demand (as before 6.1) instead of as the
/// agent would load them on this kernel.
fn chain_new_flows(p: &Params, on_demand: bool) -> anyhow::Result<Value> {
    let mut dp = if on_demand {
        Dp::load_on_demand(limits::DEFAULT_NAT_ENTRIES, p.object.as_deref())?
    } else {
        Dp::load(limits::DEFAULT_NAT_ENTRIES, p.object.as_deref())?
    };
    let gw_port_be = GW_TCP.to_be();
    let route = |dp: &mut Dp, dst: [u8; 4], peer: usize, gw: [u8; 4]| -> anyhow::Result<()> {
        let id = peer_id(&format!("chain-{peer}"));
        let mut pg = PeerGateways { count: 1, ..Default::default() };
        pg.gateways[0] = Gateway { addr_be: addr_be(gw.into()), tcp_port_be: gw_port_be, udp_port_be: 0, flags: GW_UP };
        dp.maps.peers.insert(id, pg, 0)?;
        dp.maps.routes.insert(&Key::new(32, addr_be(dst.into())), RouteValue { peer_id: id }, 0)?;
        Ok(())
    };
    route(&mut dp, GW, 0, chain_gw(0))?;
    for k in 1..CHAIN {
        route(&mut dp, chain_gw(k - 1), k, chain_gw(k))?;
    }
    let from_pod = prog(&dp.ebpf, names::PROG_FROM_POD);
    let empty = prog(&dp.ebpf, names::PROG_EMPTY);
    let repeat = u32::try_from(CHAIN + 1)?;
    let per_batch = limits::DEFAULT_NAT_ENTRIES as usize * 7 / 10 / (CHAIN + 1);
    let syscalls = p.new_flows.div_ceil(CHAIN + 1);
    let mut syn = tcp(POD, 1, REMOTE, APP_PORT, true);
    let (mut new_b, mut empty_b, mut wall_b) = (Vec::new(), Vec::new(), Vec::new());
    let mut done = 0;
    while done < syscalls {
        let n = per_batch.min(syscalls - done);
        let (mut w, mut e, mut kn) = (0.0, 0.0, 0.0);
        for i in done..done + n {
            new_flow_syn(&mut syn, i);
            let before = counter(&dp.stats, "flow_opened");
            let r = test_run(from_pod, &syn, repeat)?;
            let moved = counter(&dp.stats, "flow_opened") - before;
            ensure!(r.ret == OK && moved == u64::from(repeat), "chain {i}: verdict {}, {moved} translations", r.ret);
            w += r.wall.as_secs_f64() * 1e9 / f64::from(repeat);
            kn += r.kernel.as_nanos() as f64;
            let r = test_run(empty, &syn, repeat)?;
            e += r.kernel.as_nanos() as f64;
        }
        new_b.push(kn / n as f64);
        empty_b.push(e / n as f64);
        wall_b.push(w / n as f64);
        for i in done..done + n {
            let (ip, port) = new_flow_tuple(i);
            let mut dsts = vec![(REMOTE, APP_PORT), (GW, GW_TCP)];
            dsts.extend((0..CHAIN - 1).map(|k| (chain_gw(k), GW_TCP)));
            for (dst, dport) in dsts {
                dp.maps.nat_fwd.remove(&key(ip, port, dst, dport)).context("removing a chained flow")?;
            }
            let mut gws = vec![GW];
            gws.extend((0..CHAIN).map(chain_gw));
            for gw in gws {
                dp.maps.nat_rev.remove(&key(gw, GW_TCP, ip, port)).context("removing a chained reply tuple")?;
            }
        }
        done += n;
    }
    for c in ["port_remap", "nat_insert_failed"] {
        ensure!(counter(&dp.stats, c) == 0, "method C: {c} = {}", counter(&dp.stats, c));
    }
    Ok(json!({
        "flow_maps_preallocated": !on_demand && datapath::flow_map_flags(limits::DEFAULT_NAT_ENTRIES) == 0,
        "chain": CHAIN + 1,
        "new_flows": syscalls * (CHAIN + 1),
        "routes": dp.maps.routes.iter().count(),
        "flow_map_entries": limits::DEFAULT_NAT_ENTRIES,
        "empty": { "ns": Stat::of(&empty_b).json() },
        "new_flow": {
            "ns": Stat::of(&new_b).json(),
            "wall_ns": Stat::of(&wall_b).json(),
            "ratio_to_empty": Stat::of(&ratios(&new_b, &empty_b)).json(),
            "net_ns": Stat::of(&new_b.iter().zip(&empty_b).map(|(n, e)| n - e).collect::<Vec<_>>()).json(),
        },
    }))
}

/// The `bench-floor` build: a new flow's floors (`meshnet-ebpf/src/floor.rs`).
pub const FLOOR_VARIANT: &str = "bench-floor";

/// Method C on the floor programs of the `bench-floor` build: the same flow maps, allocated
/// as [`chain_new_flows`] has them, the same calls and batches, each run a new flow (the
/// program sends the packet on to the next address up). `both`: the floor with both inserts
/// (meshnet's design), else with one. Every flow's entries must be there to be removed
/// after its batch: that proves each run inserted.
fn chain_floor(p: &Params, object: &[u8], both: bool) -> anyhow::Result<Value> {
    let mut dp = Dp::load(limits::DEFAULT_NAT_ENTRIES, Some(object))?;
    let name = if both { names::PROG_FLOOR_TWO_INSERTS } else { names::PROG_FLOOR_ONE_INSERT };
    let unloaded: &mut SchedClassifier = dp.ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
    unloaded.load().with_context(|| format!("the kernel refused {name}"))?;
    let floor = prog(&dp.ebpf, name);
    let empty = prog(&dp.ebpf, names::PROG_EMPTY);
    let repeat = u32::try_from(CHAIN + 1)?;
    let per_batch = limits::DEFAULT_NAT_ENTRIES as usize * 7 / 10 / (CHAIN + 1);
    let syscalls = p.new_flows.div_ceil(CHAIN + 1);
    let mut syn = tcp(POD, 1, REMOTE, APP_PORT, true);
    let (mut floor_b, mut empty_b) = (Vec::new(), Vec::new());
    let mut done = 0;
    while done < syscalls {
        let n = per_batch.min(syscalls - done);
        let (mut e, mut f) = (0.0, 0.0);
        for i in done..done + n {
            new_flow_syn(&mut syn, i);
            let r = test_run(floor, &syn, repeat)?;
            ensure!(r.ret == OK, "{name}, call {i}: verdict {}", r.ret);
            f += r.kernel.as_nanos() as f64;
            e += test_run(empty, &syn, repeat)?.kernel.as_nanos() as f64;
        }
        floor_b.push(f / n as f64);
        empty_b.push(e / n as f64);
        for i in done..done + n {
            let (ip, port) = new_flow_tuple(i);
            for k in 0..=CHAIN {
                let dst = (u32::from_be_bytes(REMOTE) + k as u32).to_be_bytes();
                dp.maps.nat_fwd.remove(&key(ip, port, dst, APP_PORT)).with_context(|| format!("{name}: flow {k} of call {i}"))?;
                if both {
                    let next = (u32::from_be_bytes(dst) + 1).to_be_bytes();
                    dp.maps.nat_rev.remove(&key(next, APP_PORT, ip, port)).with_context(|| format!("{name}: reply tuple {k} of call {i}"))?;
                }
            }
        }
        done += n;
    }
    ensure!(dp.maps.nat_fwd.keys().count() == 0 && dp.maps.nat_rev.keys().count() == 0, "{name}: entries left after the batches");
    Ok(json!({
        "inserts": if both { 2 } else { 1 },
        "new_flows": syscalls * (CHAIN + 1),
        "empty": { "ns": Stat::of(&empty_b).json() },
        "new_flow": {
            "ns": Stat::of(&floor_b).json(),
            "net_ns": Stat::of(&floor_b.iter().zip(&empty_b).map(|(f, e)| f - e).collect::<Vec<_>>()).json(),
        },
    }))
}

/// Both floors, where the `bench-floor` build was given.
fn chain_floors(p: &Params) -> anyhow::Result<Value> {
    let Some((_, object)) = p.variants.iter().find(|(n, _)| n == FLOOR_VARIANT) else {
        return Ok(Value::Null);
    };
    Ok(json!({
        "two_inserts": chain_floor(p, object, true).context("the floor with two inserts")?,
        "one_insert": chain_floor(p, object, false).context("the floor with one insert")?,
    }))
}

fn measure_config(p: &Params, n: usize, set: PrefixSet, naive: Option<&mut Value>) -> anyhow::Result<Value> {
    let mut dp = Dp::load(limits::DEFAULT_NAT_ENTRIES, p.object.as_deref())?;
    dp.add_routes(&prefixes(set, n - 1))?;
    let routes = dp.maps.routes.iter().count();
    ensure!(routes == n, "the route trie holds {routes} prefixes, expected {n}");
    let pk = Packets::new();
    establish(&mut dp, &pk, p.repeat, naive)?;

    let cs = cases(&dp.ebpf, &pk);
    let mut am: Vec<Amortised> = (0..cs.len()).map(|_| Amortised::default()).collect();
    for _ in 0..p.reps {
        for (c, a) in cs.iter().zip(&mut am) {
            let (kernel, wall) = amortised(&dp, c, p.repeat)?;
            a.wall.push(wall);
            a.kernel.push(kernel);
        }
    }
    let floor = am[0].kernel.clone();
    let mut a = serde_json::Map::new();
    for (c, m) in cs.iter().zip(&am) {
        a.insert(
            c.name.to_string(),
            json!({
                "ns": Stat::of(&m.kernel).json(),
                "wall_ns": Stat::of(&m.wall).json(),
                "ratio_to_empty": Stat::of(&ratios(&m.kernel, &floor)).json(),
            }),
        );
    }
    let b = per_call(&mut dp, &pk, p.new_flow_batch, p.new_flows / p.new_flow_batch)?;
    Ok(json!({ "cidrs": n, "set": set.name(), "amortised": a, "per_call": b }))
}

/// Room the full-map figures leave in the flow maps: the new flows measured there.
const FULL_ROOM: usize = 1_000;
/// Established flows sampled per repeat of the full-map figures.
const FULL_SAMPLES: usize = 5_000;
/// Where the full maps' flows start in [`new_flow_tuple`]'s numbering, clear of the new
/// flows [`per_call`] makes.
const FULL_BASE: usize = 100_000;

/// The flow maps full (65,536 entries each, less [`FULL_ROOM`]: what a busy node holds), so
/// that the hash lookups miss the CPU caches as they do there: method B over a different
/// established flow at every run, in a shuffled order, for `from_pod`'s hot path and
/// `to_pod`'s replies, each run beside an empty-program run; and new flows (method B) into
/// the room left. The other figures run one flow over and over, whose bucket and entry stay
/// in the cache.
fn full_maps(p: &Params) -> anyhow::Result<Value> {
    let mut dp = Dp::load(limits::DEFAULT_NAT_ENTRIES, p.object.as_deref())?;
    let pk = Packets::new();
    // One more entry of room: `per_call` also runs the established-flow packet, whose flow
    // is opened before it.
    let live = limits::DEFAULT_NAT_ENTRIES as usize - FULL_ROOM - 1;
    let (from_pod, to_pod, empty) = (prog(&dp.ebpf, names::PROG_FROM_POD), prog(&dp.ebpf, names::PROG_TO_POD), prog(&dp.ebpf, names::PROG_EMPTY));
    let mut syn = tcp(POD, 1, REMOTE, APP_PORT, true);
    let (mut hot, mut reply) = (Vec::with_capacity(live), Vec::with_capacity(live));
    for i in FULL_BASE..FULL_BASE + live {
        new_flow_syn(&mut syn, i);
        let r = test_run(from_pod, &syn, 1)?;
        ensure!(r.ret == OK, "filling the flow maps: flow {i} got verdict {}", r.ret);
        let (ip, port) = new_flow_tuple(i);
        hot.push(tcp(ip, port, REMOTE, APP_PORT, false));
        reply.push(tcp(GW, GW_TCP, ip, port, false));
    }
    let held = dp.maps.nat_fwd.keys().count();
    ensure!(held == live, "the forward flow map holds {held} flows, expected {live}");
    let mut rng = fastrand::Rng::with_seed(0x6d65_7368);
    let ns = |r: Run| u32::try_from(r.kernel.as_nanos()).unwrap_or(u32::MAX);
    let (mut empty_b, mut hot_b, mut reply_b) = (Vec::new(), Vec::new(), Vec::new());
    let (mut e, mut h, mut rp) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..p.reps {
        for _ in 0..FULL_SAMPLES {
            let k = rng.usize(..live);
            e.push(ns(test_run(empty, &pk.hot, 1)?));
            let r = test_run(from_pod, &hot[k], 1)?;
            ensure!(r.ret == OK, "full maps: flow {k}'s packet got verdict {}", r.ret);
            h.push(ns(r));
            let r = test_run(to_pod, &reply[rng.usize(..live)], 1)?;
            ensure!(r.ret == OK, "full maps: a reply got verdict {}", r.ret);
            rp.push(ns(r));
        }
        empty_b.push(trimmed_mean(&mut e));
        hot_b.push(trimmed_mean(&mut h));
        reply_b.push(trimmed_mean(&mut rp));
        e.clear();
        h.clear();
        rp.clear();
    }
    let r = test_run(from_pod, &pk.hot, 1)?;
    ensure!(r.ret == OK, "full maps: the established flow's first packet got verdict {}", r.ret);
    let nf = per_call(&mut dp, &pk, FULL_ROOM, p.reps)?;
    let figure = |v: &[f64]| {
        json!({
            "ns": Stat::of(v).json(),
            "ratio_to_empty": Stat::of(&ratios(v, &empty_b)).json(),
            "net_ns": Stat::of(&v.iter().zip(&empty_b).map(|(x, e)| x - e).collect::<Vec<_>>()).json(),
        })
    };
    Ok(json!({
        "flows": live,
        "capacity": limits::DEFAULT_NAT_ENTRIES,
        "samples_per_repeat": FULL_SAMPLES,
        "empty": { "ns": Stat::of(&empty_b).json() },
        "hot": figure(&hot_b),
        "reply": figure(&reply_b),
        "new_flow": nf["new_flow"],
        "new_flow_empty": nf["empty"],
    }))
}

/// Name of the measured object's variant that asks the checksum helper, as every kernel
/// before 6.2 does (`meshnet::ip_summed`): measured beside it where this kernel reads the state.
pub const CHECKSUM_HELPER_VARIANT: &str = "checksum-helper";

/// Whether the measured object reads the skb's checksum state on this kernel.
fn reads_checksum_state(p: &Params) -> anyhow::Result<bool> {
    let layout = datapath::skb_layout();
    Ok(datapath::prepare_object(p.object.as_deref().unwrap_or(EBPF_OBJECT), layout.as_ref())?.1)
}

/// The default object and the benchmark variants side by side, one CIDR, method A: what
/// the rewrite and the clock read cost, by difference.
fn breakdown(p: &Params) -> anyhow::Result<Value> {
    let pk = Packets::new();
    let mut dps = vec![("default".to_string(), Dp::load(limits::DEFAULT_NAT_ENTRIES, p.object.as_deref())?)];
    for (name, obj) in p.variants.iter().filter(|(n, _)| n != FLOOR_VARIANT) {
        dps.push((name.clone(), Dp::load(limits::DEFAULT_NAT_ENTRIES, Some(obj))?));
    }
    if reads_checksum_state(p)? {
        let (helper, _) = datapath::prepare_object(p.object.as_deref().unwrap_or(EBPF_OBJECT), None)?;
        dps.push((CHECKSUM_HELPER_VARIANT.to_string(), Dp::load(limits::DEFAULT_NAT_ENTRIES, Some(&helper))?));
    }
    for (_, dp) in &mut dps {
        establish(dp, &pk, p.repeat, None)?;
    }
    // The hot path's floor (`bench-floor`): the flow's lookup and rewrite alone, on the same
    // cycling entries. A run that missed would leave the packet as it was, and every run
    // after it would miss too: the last run's verdict (a miss is a drop) vouches for all.
    let floor = p.variants.iter().find(|(n, _)| n == FLOOR_VARIANT).map(|(_, obj)| load_hot_floor(obj, &pk, p.repeat)).transpose()?;
    let mut floor_hot = Amortised::default();
    let mut am: Vec<Vec<Amortised>> = dps.iter().map(|_| CASES.iter().map(|_| Amortised::default()).collect()).collect();
    for _ in 0..p.reps {
        for ((_, dp), m) in dps.iter().zip(&mut am) {
            for (c, a) in cases(&dp.ebpf, &pk).iter().zip(m.iter_mut()) {
                let (kernel, wall) = amortised(dp, c, p.repeat)?;
                a.wall.push(wall);
                a.kernel.push(kernel);
            }
        }
        if let Some(dp) = &floor {
            let c = Case { name: "floor_hot", prog: prog(&dp.ebpf, names::PROG_FLOOR_HOT), pkt: &pk.hot, counter: None, verdict: OK };
            let (kernel, wall) = amortised(dp, &c, p.repeat)?;
            floor_hot.wall.push(wall);
            floor_hot.kernel.push(kernel);
        }
    }
    // Decisions, round by round with every build in each round, as the cases above: the
    // machine's speed drifts over minutes, and only figures taken side by side compare.
    let mut logs = Vec::new();
    for (_, dp) in &mut dps {
        logs.push(LogMaps::take(dp)?);
    }
    let mut dec: Vec<Decisions> = dps.iter().map(|_| Decisions::default()).collect();
    for _ in 0..p.reps {
        for (((_, dp), l), d) in dps.iter_mut().zip(&mut logs).zip(&mut dec) {
            decision_round(dp, l, &pk, p, d)?;
        }
    }
    let mut out = serde_json::Map::new();
    if floor.is_some() {
        let empty = &am[0][0].kernel;
        out.insert(
            FLOOR_VARIANT.to_string(),
            json!({ "hot": { "ns": Stat::of(&floor_hot.kernel).json(), "ratio_to_empty": Stat::of(&ratios(&floor_hot.kernel, empty)).json() } }),
        );
    }
    let names = CASES;
    for (i, (name, _)) in dps.iter().enumerate() {
        let mut v = serde_json::Map::new();
        for (j, case) in names.iter().enumerate() {
            let mine = &am[i][j].kernel;
            let dflt = &am[0][j].kernel;
            v.insert(
                (*case).to_string(),
                json!({
                    "ns": Stat::of(mine).json(),
                    // What the default build spends on the part this variant leaves out.
                    "default_minus_this": Stat::of(&dflt.iter().zip(mine).map(|(d, m)| d - m).collect::<Vec<_>>()).json(),
                }),
            );
        }
        let figure = |mine: &[f64], dflt: &[f64]| {
            json!({
                "ns": Stat::of(mine).json(),
                "default_minus_this": Stat::of(&dflt.iter().zip(mine).map(|(d, m)| d - m).collect::<Vec<_>>()).json(),
            })
        };
        let (d, d0) = (&dec[i], &dec[0]);
        v.insert(
            "decisions".into(),
            json!({
                "drop": figure(&d.drop, &d0.drop),
                "drop_single": figure(&d.single, &d0.single),
                "new_flow": figure(&d.new_flow, &d0.new_flow),
                "lines_written": d.lines,
                "single_runs_per_round": DROP_SAMPLES,
            }),
        );
        out.insert(name.clone(), Value::Object(v));
    }
    Ok(Value::Object(out))
}

/// The `bench-floor` object with its flow established and cycling as [`establish`] makes it,
/// and its hot-path floor program loaded.
fn load_hot_floor(object: &[u8], pk: &Packets, repeat: u32) -> anyhow::Result<Dp> {
    let mut dp = Dp::load(limits::DEFAULT_NAT_ENTRIES, Some(object))?;
    establish(&mut dp, pk, repeat, None)?;
    let name = names::PROG_FLOOR_HOT;
    let unloaded: &mut SchedClassifier = dp.ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
    unloaded.load().with_context(|| format!("the kernel refused {name}"))?;
    Ok(dp)
}

/// Single runs of the drop packet per round in [`decision_round`].
const DROP_SAMPLES: usize = 60;
/// New flows per round in [`decision_round`].
const DECISION_NEW_FLOWS: usize = 1_000;

/// The logging build's ring and budget, taken out of its object so that a round can empty
/// the one and refresh the other; `None` for a build without them.
struct LogMaps(Option<(RingBuf<MapData>, Array<MapData, LogBudget>)>);

impl LogMaps {
    fn take(dp: &mut Dp) -> anyhow::Result<Self> {
        let (Some(ring), Some(budget)) = (dp.ebpf.take_map(names::LOG_RING), dp.ebpf.take_map(names::LOG_BUDGET)) else {
            return Ok(Self(None));
        };
        Ok(Self(Some((ring.try_into()?, budget.try_into()?))))
    }
}

/// Per-round figures of [`decision_round`], ns.
#[derive(Default)]
struct Decisions {
    drop: Vec<f64>,
    single: Vec<f64>,
    new_flow: Vec<f64>,
    lines: usize,
}

/// One round of what a build spends on decisions, where the logging build differs from the
/// default one: a drop (ICMP to a remote pod) amortised over `repeat` runs, where the
/// logging build holds all but its budget's first lines back; the same drop run by run with
/// its line written (the ring drained and the line budget made fresh before every run; in
/// the other builds, the same single runs without a line), their trimmed mean; and new
/// flows, method B.
fn decision_round(dp: &mut Dp, logs: &mut LogMaps, pk: &Packets, p: &Params, out: &mut Decisions) -> anyhow::Result<()> {
    let drop_case = Case {
        name: "drop",
        prog: prog(&dp.ebpf, names::PROG_FROM_POD),
        pkt: &pk.drop,
        counter: Some("unsupported_proto"),
        verdict: SHOT,
    };
    out.drop.push(amortised(dp, &drop_case, p.repeat)?.0);
    let from_pod = prog(&dp.ebpf, names::PROG_FROM_POD);
    let mut single = Vec::with_capacity(DROP_SAMPLES);
    for _ in 0..DROP_SAMPLES {
        if let Some((ring, budget)) = logs.0.as_mut() {
            while ring.next().is_some() {}
            budget.set(0, LogBudget::default(), 0)?;
        }
        let r = test_run(from_pod, &pk.drop, 1)?;
        ensure!(r.ret == SHOT, "drop: verdict {}", r.ret);
        single.push(u32::try_from(r.kernel.as_nanos()).unwrap_or(u32::MAX));
        if let Some((ring, _)) = logs.0.as_mut() {
            ensure!(ring.next().is_some(), "the logging build wrote no line for a drop with a fresh budget");
            out.lines += 1;
        }
    }
    out.single.push(trimmed_mean(&mut single));
    let nf = per_call(dp, pk, DECISION_NEW_FLOWS, 1)?;
    out.new_flow.push(nf["new_flow"]["ns"]["median"].as_f64().unwrap_or(f64::NAN));
    Ok(())
}

/// Every route configuration; the 1-CIDR one is shared by both sets.
pub fn run(p: &Params) -> anyhow::Result<Value> {
    let started = Instant::now();
    // Development knob, not for published figures: method C alone (for profiling).
    if std::env::var_os("MNBENCH_CHAIN_ONLY").is_some() {
        let chained = chain_new_flows(p, false).context("new flows through a chain of routes")?;
        let on_demand = chain_new_flows(p, true).context("new flows, flow maps allocated on demand")?;
        let floors = chain_floors(p)?;
        return Ok(json!({
            "repeat": p.repeat, "reps": p.reps, "new_flow_chain": chained, "new_flow_chain_on_demand": on_demand,
            "new_flow_floors": floors,
        }));
    }
    eprintln!("bench: datapath, tunnel mode (encapsulation, decapsulation, the uplink's other traffic)");
    let tunnel = crate::micro_tunnel::run(p).context("tunnel mode")?;
    // Development knob, not for published figures: the tunnel figures alone.
    if std::env::var_os("MNBENCH_TUNNEL_ONLY").is_some() {
        return Ok(json!({ "repeat": p.repeat, "reps": p.reps, "tunnel": tunnel, "seconds": round(started.elapsed().as_secs_f64()) }));
    }
    let mut configs = Vec::new();
    let mut naive = Value::Null;
    for &n in &p.cidr_counts {
        for set in [PrefixSet::Sparse, PrefixSet::Dense] {
            if n == 1 && set == PrefixSet::Dense {
                continue;
            }
            eprintln!("bench: datapath, {n} CIDRs ({})", if n == 1 { "one" } else { set.name() });
            let first = configs.is_empty();
            let mut c = measure_config(p, n, set, first.then_some(&mut naive))
                .with_context(|| format!("{n} CIDRs, {}", set.name()))?;
            if n == 1 {
                c["set"] = json!("both");
            }
            configs.push(c);
        }
    }
    eprintln!("bench: datapath, flow maps full");
    let full = full_maps(p).context("full flow maps")?;
    eprintln!("bench: datapath, new flows amortised over a chain of routes");
    let chained = chain_new_flows(p, false).context("new flows through a chain of routes")?;
    // Where this kernel preallocates the flow maps: what allocating on demand (kernels before
    // 6.1, and this build's predecessors) costs a new flow, measured the same way.
    let on_demand = if datapath::flow_map_flags(limits::DEFAULT_NAT_ENTRIES) == 0 {
        eprintln!("bench: datapath, new flows amortised, flow maps allocated on demand");
        chain_new_flows(p, true).context("new flows, flow maps allocated on demand")?
    } else {
        Value::Null
    };
    eprintln!("bench: datapath, the new flow's floors (its lookup and inserts alone)");
    let floors = chain_floors(p)?;
    let parts = if p.variants.is_empty() {
        Value::Null
    } else {
        eprintln!("bench: datapath, cost breakdown against the benchmark variants");
        breakdown(p)?
    };
    Ok(json!({
        "repeat": p.repeat,
        "reps": p.reps,
        "configs": configs,
        "naive_repeat": naive,
        "new_flow_chain": chained,
        "new_flow_chain_on_demand": on_demand,
        "new_flow_floors": floors,
        "full_maps": full,
        "breakdown": parts,
        "checksum_state_read": reads_checksum_state(p)?,
        "tunnel": tunnel,
        "seconds": round(started.elapsed().as_secs_f64()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_sets_are_distinct_and_keep_clear_of_the_benchmark_addresses() {
        for set in [PrefixSet::Sparse, PrefixSet::Dense] {
            for n in [1, 999, 9_999, 99_999] {
                let v = prefixes(set, n);
                assert_eq!(v.len(), n);
                let mut seen = std::collections::BTreeSet::new();
                for (len, a) in &v {
                    assert!(seen.insert(*a), "{set:?}: {a:?} twice");
                    let mask = u32::MAX << (32 - len);
                    let net = u32::from_be_bytes(*a);
                    for probe in [POD, LOCAL_POD, REMOTE, GW, SERVICE] {
                        assert_ne!(u32::from_be_bytes(probe) & mask, net, "{set:?} covers {probe:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn new_flow_syns_have_valid_checksums() {
        let mut f = tcp(POD, 1, REMOTE, APP_PORT, true);
        let orig = f.clone();
        new_flow_syn(&mut f, 0);
        assert_ne!(f, orig);
        let parsed = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else { panic!() };
        let Some(etherparse::TransportSlice::Tcp(t)) = parsed.transport else { panic!() };
        let want = t.to_header().calc_checksum_ipv4(&ip.header().to_header(), t.payload()).unwrap();
        assert_eq!(t.checksum(), want);
        assert_eq!(ip.header().to_header().calc_header_checksum(), ip.header().header_checksum());
    }
}
