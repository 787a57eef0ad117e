//! Tunnel mode's per-packet cost through `BPF_PROG_TEST_RUN`: encapsulation in
//! `meshnet_from_pod`, decapsulation in `meshnet_tun_in` (delivery through the stack and by
//! redirect), and what the uplink program costs the node's other traffic.
//!
//! The trap of `repeat` (see `micro.rs`) is worse here, and has no fixed point for
//! encapsulation: from the second run on, `from_pod` sees its own output, an outer packet
//! node → peer node, which it passes untouched; and a packet that came round again would grow
//! by 36 bytes a run, past the 64 bytes of headroom the test run gives it, so that every
//! other run would reallocate the whole packet. So:
//!
//! - **Encapsulation: one syscall per fresh packet** (method B of `micro.rs`): `repeat = 1`,
//!   the kernel copies the packet in and times that one run. Each encapsulation call sits in
//!   a loop with an empty-program call, a decapsulation call and a gateway hot-path call of
//!   the same kind; the net cost is the per-round difference to the empty program.
//! - **Decapsulation: a chain of tunnel packets, amortised.** A packet of [`CHAIN_DEPTH`]
//!   tunnel layers, each one's inner packet again a valid tunnel packet from a peer node to
//!   this node's tunnel port; every run of one `CHAIN_DEPTH`-repeat syscall takes one layer
//!   off, so each run decapsulates a packet it has not seen (`tunnel_decap` must grow by
//!   `CHAIN_DEPTH` per call). The floor is the empty program at the same repeat count on the
//!   same packet, interleaved. For that the chain's sender, 10.245.1.2, is a second node of
//!   the peer hosting 10.245.1.0/24, given to the agent's sync by hand (no config passes it:
//!   its address lies in its own pod CIDR, as it must for the layer it sends to pass the
//!   inner-source check of the layer around it): each layer then comes, as a real packet
//!   does, from the node its inner source's route names, whose slot says so, and the routes'
//!   trie holds two disjoint CIDRs, as configs do (a route nested in another, which the
//!   validator refuses, made each lookup walk deeper than any real one).
//! - **Decapsulation with a wide trie.** The same chain, by redirect, on a third object whose
//!   routes' trie also holds [`wide_routes`], some 16,000 peer-node CIDRs: what a peer with
//!   as many nodes would enter. A sender's slot answers without the trie, so the figure shows
//!   whether decapsulation stays flat as a peer grows.
//! - **The uplink's other traffic: fixed points.** A packet that is no tunnel packet, and a
//!   refused one, come out of `meshnet_tun_in` as they went in, so `repeat` measures them
//!   directly (method A of `micro.rs`). So does the gateway hot path, given `micro.rs`'s
//!   fixed-point flow entry: measured both ways in the same loop, it shows how much more a
//!   program costs net in one-packet runs than amortised, which calibrates the estimate of
//!   what encapsulation would cost amortised.
//!
//! Everything runs in a network namespace of its own, where the peer node's address and the
//! pod's are on a veth with permanent neighbours, so that the FIB lookups (of encapsulation
//! on kernels without `bpf_redirect_neigh`, and of redirect delivery to a pod not in the port
//! table) find a complete path whatever the host's routes are. The pod is in the port table,
//! as the agent enters every pod it attaches to: redirect delivery sends out of its port.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{ensure, Context as _};
use aya::Ebpf;
use etherparse::{IpNumber, Ipv4Header, PacketBuilder};
use meshnet::{
    config::{peer_id, Config},
    datapath::Datapath,
    maps::{self, addr_be, ControlMaps, Stats},
    tunnel::{NodePath, TunnelMaps},
};
use meshnet_common::{names, tunnel, FlowKey, PodPort, IPPROTO_TCP};
use meshnet_tests::NetNs;
use serde_json::{json, Value};

use crate::{
    micro::{counter, prog, tcp, test_run, Params, Run, FLOOR_VARIANT},
    stats::{ratios, round, trimmed_mean, Stat},
};

const POD: [u8; 4] = [10, 244, 0, 10];
/// A pod of this cluster on another node: not this node's to deliver to.
const OTHER_NODE_POD: [u8; 4] = [10, 244, 1, 10];
/// A pod of the tunnel peer (cluster2) on its node 192.0.2.2.
const REMOTE: [u8; 4] = [10, 245, 0, 20];
/// A pod of the gateway peer (cluster3), for the gateway hot path beside the tunnel, and
/// that peer's gateway.
const GW_REMOTE: [u8; 4] = [10, 246, 0, 20];
const GW: [u8; 4] = [192, 0, 2, 3];
const GW_TCP: u16 = 31674;
const NODE: [u8; 4] = [192, 0, 2, 1];
const PEER_NODE: [u8; 4] = [192, 0, 2, 2];
/// Not a node of any peer: its tunnel packets are refused.
const STRANGER: [u8; 4] = [192, 0, 2, 99];
/// The chain's sender: a node of the peer by hand, inside its own pod CIDR, [`CHAIN_NET`].
const CHAIN_NODE: [u8; 4] = [10, 245, 1, 2];
const CHAIN_NET: &str = "10.245.1.0/24";
/// A pod of [`CHAIN_NODE`]: the source of the chain's innermost packet, so that its layer too
/// comes from the node that hosts its source.
const CHAIN_POD: [u8; 4] = [10, 245, 1, 20];
/// The pod CIDR of the peer's first node, [`PEER_NODE`], as [`config`] has it.
const FIRST_NET: &str = "10.245.0.0/24";
const PORT: u16 = 31800;
const MTU: u32 = 1500;
const POD_PORT: u16 = 40_000;
const APP_PORT: u16 = 8080;
const POD_MAC: [u8; 6] = [2, 0, 0, 0, 0, 10];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// Where tunnel packets are addressed: a test run receives its frame on the loopback device,
/// whose MAC is all zeros, and the uplink program delivers only frames to the receiver's own.
const RX_MAC: [u8; 6] = [0; 6];
/// The veth of the benchmark's namespace that holds this node's addresses.
const LINK: &str = "mnb0";
/// `TC_ACT_OK`, `TC_ACT_SHOT`, `TC_ACT_REDIRECT`, `TC_ACT_UNSPEC`.
const OK: u32 = 0;
const SHOT: u32 = 2;
const REDIRECT: u32 = 7;
const UNSPEC: u32 = u32::MAX;

/// Tunnel layers of the decapsulation chain: one packet of 83 + 36 × 64 = 2,387 bytes, well
/// inside what a test run takes (a page less the skb's head- and tailroom, 3,712 bytes).
pub const CHAIN_DEPTH: u32 = 64;
/// Chain syscalls per round (and as many of the empty program beside them).
const CHAIN_CALLS: usize = 1_000;
/// One-packet calls of each case per round: the rounds are short (a quick run's take about
/// 5 s in all), and longer ones average more of the machine's drift away.
const SAMPLES: usize = 30_000;

/// Every /24 of 10.192.0.0/10 but the local cluster's 10.244.0.0/16, the gateway peer's
/// 10.246.0.0/16 and the chain's two: 15,870 CIDRs which, with the chain's, fill the routes'
/// trie to 15,872 of its 16,384 entries, deepening every lookup about 10.245.0.0/16 as a
/// peer of that many nodes would. They all name the peer's first node: what is measured is
/// the trie's depth, and the chain's sender keeps its slot to itself.
fn wide_routes() -> impl Iterator<Item = ipnet::Ipv4Net> {
    (0..1u32 << 14).filter_map(|i| {
        let a = Ipv4Addr::from(0x0ac0_0000 + (i << 8)).octets();
        let taken = matches!(a[1], 244 | 246) || (a[1] == 245 && a[2] < 2);
        (!taken).then(|| ipnet::Ipv4Net::new(a.into(), 24).expect("a /24"))
    })
}

fn config(delivery: &str) -> String {
    format!(
        r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
tunnel:
  port: {PORT}
  interfaces: ["{LINK}"]
  podCIDRs: ["10.244.0.0/24"]
  delivery: {delivery}
peers:
  - name: cluster2
    mode: tunnel
    podCIDRs: ["10.245.0.0/16"]
    tunnelPort: {PORT}
    nodes:
      - address: 192.0.2.2
        podCIDRs: ["10.245.0.0/24"]
  - name: cluster3
    podCIDRs: ["10.246.0.0/16"]
    gateways:
      - {{address: 192.0.2.3, port: 31674, udpPort: 31675}}
"#
    )
}

// ---------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC).ipv4(src, dst, 64).udp(sport, dport).write(&mut out, payload).unwrap();
    out
}

/// A tunnel packet as a peer node sends it: outer IPv4 (DF) and UDP to this node's tunnel
/// port with a checksum of 0, meshnet's header naming cluster2, then the IPv4 packet of
/// `inner` (a frame; its Ethernet header is left out).
fn tunnel_packet(outer_src: [u8; 4], outer_dst: [u8; 4], inner: &[u8]) -> Vec<u8> {
    let m = tunnel::MAGIC.to_be_bytes();
    let c = peer_id("cluster2").to_be_bytes();
    let mut payload = vec![m[0], m[1], tunnel::VERSION, 0, c[0], c[1], c[2], c[3]];
    payload.extend_from_slice(&inner[14..]);
    let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, outer_src, outer_dst).unwrap();
    ip.dont_fragment = true;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, RX_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, etherparse::Ipv4Extensions::default()))
        .udp(40_123, PORT)
        .write(&mut out, &payload)
        .unwrap();
    out[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    out
}

/// `depth` tunnel layers around `innermost`, each sent by [`CHAIN_NODE`] to the pod (the
/// pod's address is this node's, as far as the inner-destination check goes).
fn chain_packet(depth: u32, innermost: &[u8]) -> Vec<u8> {
    let mut f = innermost.to_vec();
    for _ in 0..depth {
        f = tunnel_packet(CHAIN_NODE, POD, &f);
    }
    f
}

struct Packets {
    encap_tcp: Vec<u8>,
    encap_udp: Vec<u8>,
    /// The reply to `encap_tcp`, as it arrives from the peer node.
    inner_reply: Vec<u8>,
    decap: Vec<u8>,
    /// What the chain leaves once every layer is off: a packet of a pod of the chain's node.
    chain_inner: Vec<u8>,
    chain: Vec<u8>,
    gw_hot: Vec<u8>,
    uplink_tcp: Vec<u8>,
    uplink_udp: Vec<u8>,
    refused: Vec<u8>,
    /// A tunnel packet refused at the last check (its inner destination a pod of another
    /// node): every check and lookup of a decapsulation, without taking the headers off.
    not_local: Vec<u8>,
}

impl Packets {
    fn new() -> Self {
        let inner_reply = tcp(REMOTE, APP_PORT, POD, POD_PORT, false);
        let chain_inner = tcp(CHAIN_POD, APP_PORT, POD, POD_PORT, false);
        Self {
            encap_tcp: tcp(POD, POD_PORT, REMOTE, APP_PORT, false),
            encap_udp: udp(POD, 5_000, REMOTE, 53, &[0x5a; 41]),
            decap: tunnel_packet(PEER_NODE, NODE, &inner_reply),
            chain: chain_packet(CHAIN_DEPTH, &chain_inner),
            chain_inner,
            gw_hot: tcp(POD, POD_PORT, GW_REMOTE, APP_PORT, false),
            // The node's own traffic on the uplink: TCP, and UDP to another port than the
            // tunnel's (the dearer of the two: the ports are read).
            uplink_tcp: tcp(PEER_NODE, 443, NODE, POD_PORT, false),
            uplink_udp: udp(PEER_NODE, 53, NODE, 5_353, &[0x5a; 41]),
            refused: tunnel_packet(STRANGER, NODE, &inner_reply),
            not_local: tunnel_packet(PEER_NODE, NODE, &tcp(REMOTE, APP_PORT, OTHER_NODE_POD, POD_PORT, false)),
            inner_reply,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The loaded datapath
// ---------------------------------------------------------------------------------------

struct TunDp {
    ebpf: Ebpf,
    maps: ControlMaps,
    tunnel: TunnelMaps,
    stats: Stats,
}

impl TunDp {
    /// The object with its maps filled from the config as the agent fills them, the path to
    /// the peer node being `ifindex` (this namespace's veth), plus the chain's node, and
    /// [`wide_routes`] if `wide`.
    fn load(object: Option<&[u8]>, delivery: &str, ifindex: u32, wide: bool) -> anyhow::Result<Self> {
        let config = Config::from_yaml(&config(delivery))?;
        let mut ebpf = match object {
            None => Datapath::load_unpinned(config.max_flows)?,
            Some(object) => Datapath::load_unpinned_object(config.max_flows, object)?,
        };
        let mut maps = ControlMaps::from_ebpf(&mut ebpf)?;
        let mut desired = config.desired();
        maps.sync(&desired)?;
        let _ = maps.publish_clock(meshnet::dump::monotonic_ns());
        let mut tun = TunnelMaps::from_ebpf(&mut ebpf)?;
        let peer_node = *desired.tun_routes.values().next().context("the peer node's route")?;
        desired.tun_nodes.insert(CHAIN_NODE.into(), peer_id("cluster2"));
        desired.tun_routes.insert(CHAIN_NET.parse()?, meshnet_common::TunnelNode { addr_be: addr_be(CHAIN_NODE.into()), ..peer_node });
        let path = NodePath { src: NODE.into(), ifindex, mtu: MTU };
        let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(CHAIN_NODE), path)]);
        if wide {
            desired.tun_routes.extend(wide_routes().map(|net| (net, peer_node)));
        }
        let report = tun.sync(&desired, &paths, MTU, &[])?;
        ensure!((report.routes_written, report.nodes_written) == (desired.tun_routes.len(), 2), "tunnel maps: {report:?}");
        // The nodes are taken on their slots, on objects that have them.
        if tun.node_slots.is_some() {
            // The wide routes all name the first node, whose slot keeps only some of them.
            let routes = tun.current_routes();
            let slotted = |net: &str| -> anyhow::Result<bool> {
                let net = net.parse()?;
                Ok(routes.get(&net).is_some_and(|n| tun.slotted(net, n)))
            };
            ensure!(slotted(CHAIN_NET)? && (wide || slotted(FIRST_NET)?), "the nodes' slots do not hold their routes");
        }
        // The pod's entry in the port table, as the agent writes it for a pod it attached to:
        // redirect delivery sends out of the pod's own port, with no FIB lookup. Its port is
        // the loopback (index 1), where TEST_RUN's packets come in: the pod's packets are
        // encapsulated only from its own port.
        tun.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), PodPort { ifindex: 1, pod_mac: POD_MAC, host_mac: HOST_MAC })]))?;
        let stats = maps::take_stats(&mut ebpf)?;
        Ok(Self { ebpf, maps, tunnel: tun, stats })
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        maps::sum_stats(&self.stats).unwrap_or_default()
    }
}

/// Runs `pkt` once through `name` of `dp`, returning the verdict and the packet that came out.
fn run_out(dp: &TunDp, name: &str, pkt: &[u8], repeat: u32) -> anyhow::Result<(u32, Vec<u8>)> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog(&dp.ebpf, name)
        .test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// The decapsulation floors (`bench-floor`): the object loaded with the redirect config, so
/// that its maps hold the tunnel port and the pod's slot, with its two floor programs loaded.
fn load_floor(object: &[u8], ifindex: u32) -> anyhow::Result<TunDp> {
    let mut dp = TunDp::load(Some(object), "redirect", ifindex, false)?;
    for name in [names::PROG_FLOOR_DECAP_STACK, names::PROG_FLOOR_DECAP_REDIRECT] {
        let p: &mut aya::programs::SchedClassifier = dp.ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
        p.load().with_context(|| format!("the kernel refused {name}"))?;
    }
    Ok(dp)
}

/// Checks that each floor takes every layer of the chain off, one a run, as the programs it
/// is the floor of do: a run that failed would leave its layer on the packet.
fn check_floor(floor: &TunDp, pk: &Packets) -> anyhow::Result<()> {
    for (name, want) in [(names::PROG_FLOOR_DECAP_STACK, OK), (names::PROG_FLOOR_DECAP_REDIRECT, REDIRECT)] {
        let (v, out) = run_out(floor, name, &pk.chain, CHAIN_DEPTH)?;
        ensure!(v == want && out[14..] == pk.chain_inner[14..], "{name} on the chain: verdict {v}, {} bytes left", out.len());
        if want == REDIRECT {
            ensure!(out[..12] == [POD_MAC, HOST_MAC].concat()[..], "{name}: MACs {:02x?}", &out[..12]);
        }
        // One run more than the chain has layers: the last run sees no tunnel packet and must
        // refuse it, so the floor cannot pass a packet it did not decapsulate.
        let (v, _) = run_out(floor, name, &pk.chain, CHAIN_DEPTH + 1)?;
        ensure!(v == SHOT, "{name}: verdict {v} for a packet that is no tunnel packet");
    }
    Ok(())
}

/// Checks once, with the output packets, that each case takes the path it is measured for.
fn check_paths(stack: &TunDp, redirect: &TunDp, wide: &TunDp, pk: &Packets) -> anyhow::Result<()> {
    let o = tunnel::OVERHEAD as usize;
    for (what, pkt) in [("TCP", &pk.encap_tcp), ("UDP", &pk.encap_udp)] {
        let (v, out) = run_out(stack, names::PROG_FROM_POD, pkt, 1)?;
        ensure!(v == REDIRECT, "encapsulation of {what}: verdict {v}");
        ensure!(out.len() == pkt.len() + o, "encapsulation of {what}: {} bytes out of {}", out.len(), pkt.len());
        ensure!(out[23] == 17 && out[30..34] == PEER_NODE && out[36..38] == PORT.to_be_bytes(), "encapsulation of {what}: outer headers {:02x?}", &out[..14 + o]);
        ensure!(out[14 + o..] == pkt[14..], "encapsulation of {what}: the inner packet changed");
    }
    let (v, out) = run_out(stack, names::PROG_TUNNEL_IN, &pk.decap, 1)?;
    ensure!(v == OK && out[14..] == pk.inner_reply[14..], "decapsulation (stack): verdict {v}, {} bytes", out.len());
    let (v, out) = run_out(redirect, names::PROG_TUNNEL_IN, &pk.decap, 1)?;
    ensure!(v == REDIRECT && out[..12] == [POD_MAC, HOST_MAC].concat()[..], "decapsulation (redirect): verdict {v}, MACs {:02x?}", &out[..12]);
    for (dp, want) in [(stack, OK), (redirect, REDIRECT), (wide, REDIRECT)] {
        let before = counter(&dp.stats, "tunnel_decap");
        let (v, out) = run_out(dp, names::PROG_TUNNEL_IN, &pk.chain, CHAIN_DEPTH)?;
        let moved = counter(&dp.stats, "tunnel_decap") - before;
        ensure!(v == want && moved == u64::from(CHAIN_DEPTH), "decapsulation chain: verdict {v}, {moved} decapsulations");
        ensure!(out[14..] == pk.chain_inner[14..], "decapsulation chain: {} bytes left", out.len());
    }
    let (v, _) = run_out(stack, names::PROG_FROM_POD, &pk.gw_hot, 1)?;
    ensure!(v == OK, "the gateway flow's first packet: verdict {v}");
    Ok(())
}

fn flow_key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey::new(addr_be(src.into()), addr_be(dst.into()), sport.to_be(), dport.to_be(), IPPROTO_TCP)
}

/// The gateway flow's cycle (see `micro.rs`, method A): the rewritten tuple, pod → gateway,
/// translates back to the remote pod, so every run of a `repeat` loop takes the hot path.
fn gateway_fixed_point(dp: &mut TunDp) -> anyhow::Result<()> {
    let fwd = dp.maps.nat_fwd.get(&flow_key(POD, POD_PORT, GW_REMOTE, APP_PORT), 0).context("the gateway flow's state")?;
    ensure!(fwd.gw_addr_be == addr_be(GW.into()) && fwd.gw_port_be == GW_TCP.to_be(), "unexpected gateway flow state");
    let back = meshnet_common::NatFwd { gw_addr_be: addr_be(GW_REMOTE.into()), gw_port_be: APP_PORT.to_be(), ..fwd };
    dp.maps.nat_fwd.insert(flow_key(POD, POD_PORT, GW, GW_TCP), back, 0)?;
    Ok(())
}

/// Counters that must not move while the figures are taken, but for the fixed points that
/// are refused on purpose (checked call by call).
const FAILURES: [&str; 14] = [
    "spoofed_source",
    "tunnel_forged",
    "tunnel_not_for_node",
    "tunnel_no_pod",
    "tunnel_port_changing",
    "tunnel_encap_failed",
    "tunnel_no_neighbour",
    "tunnel_frag_needed",
    "tunnel_fragmented",
    "tunnel_bad_header",
    "tunnel_wrong_cluster",
    "tunnel_spoofed_source",
    "tunnel_decap_failed",
    "tunnel_mss_clamped",
];

/// Per-round figures.
#[derive(Default)]
struct Rounds {
    b: BTreeMap<&'static str, Vec<f64>>,
    a: BTreeMap<&'static str, Vec<f64>>,
    chain: BTreeMap<&'static str, Vec<f64>>,
}

fn push(m: &mut BTreeMap<&'static str, Vec<f64>>, k: &'static str, v: f64) {
    m.entry(k).or_default().push(v);
}

/// One round: the one-packet cases interleaved, the fixed points, the chains.
fn round_once(stack: &TunDp, redirect: &TunDp, wide: &TunDp, floor: Option<&TunDp>, pk: &Packets, repeat: u32, out: &mut Rounds) -> anyhow::Result<()> {
    let ns = |r: &Run| u32::try_from(r.kernel.as_nanos()).unwrap_or(u32::MAX);
    let (empty, from_pod, tun_in) = (prog(&stack.ebpf, names::PROG_EMPTY), prog(&stack.ebpf, names::PROG_FROM_POD), prog(&stack.ebpf, names::PROG_TUNNEL_IN));
    let tun_in_redirect = prog(&redirect.ebpf, names::PROG_TUNNEL_IN);
    let cases: [(&'static str, &aya::programs::SchedClassifier, &[u8], u32); 6] = [
        ("empty", empty, &pk.encap_tcp, UNSPEC),
        ("encap_tcp", from_pod, &pk.encap_tcp, REDIRECT),
        ("encap_udp", from_pod, &pk.encap_udp, REDIRECT),
        ("decap_stack", tun_in, &pk.decap, OK),
        ("decap_redirect", tun_in_redirect, &pk.decap, REDIRECT),
        ("gateway_hot", from_pod, &pk.gw_hot, OK),
    ];
    let mut samples: Vec<Vec<u32>> = cases.iter().map(|_| Vec::with_capacity(SAMPLES)).collect();
    for _ in 0..SAMPLES {
        for ((name, p, pkt, want), s) in cases.iter().zip(&mut samples) {
            let r = test_run(p, pkt, 1)?;
            ensure!(r.ret == *want, "{name}: verdict {} instead of {want}", r.ret);
            s.push(ns(&r));
        }
    }
    for ((name, ..), s) in cases.iter().zip(&mut samples) {
        push(&mut out.b, name, trimmed_mean(s));
    }
    // Fixed points, `repeat` runs per syscall.
    for (name, pkt, want, grows) in [
        ("empty", &pk.encap_tcp, UNSPEC, None),
        // An established flow: no counter moves, and the verdict vouches for every run (one
        // that missed would pass, and so would every run after it).
        ("gateway_hot", &pk.gw_hot, OK, None),
        ("uplink_tcp", &pk.uplink_tcp, UNSPEC, None),
        ("uplink_udp", &pk.uplink_udp, UNSPEC, None),
        ("uplink_refused", &pk.refused, SHOT, Some("tunnel_unknown_node")),
        ("decap_checks", &pk.not_local, SHOT, Some("tunnel_not_local")),
    ] {
        let p = match name {
            "empty" => empty,
            "gateway_hot" => from_pod,
            _ => tun_in,
        };
        let before = stack.counters();
        let r = test_run(p, pkt, repeat)?;
        ensure!(r.ret == want, "{name}: verdict {} instead of {want}", r.ret);
        let after = stack.counters();
        for (k, v) in &after {
            let moved = v - before.get(k).copied().unwrap_or(0);
            let expect = if Some(*k) == grows { u64::from(repeat) } else { 0 };
            ensure!(moved == expect, "{name}: counter {k} grew by {moved}, not {expect}");
        }
        push(&mut out.a, name, r.kernel.as_nanos() as f64);
    }
    // The chains, interleaved with the empty program on the same packet, and with the floors
    // where they were built.
    let mut chains: Vec<(&'static str, &aya::programs::SchedClassifier, u32, f64)> = vec![
        ("decap_stack", tun_in, OK, 0.0),
        ("decap_redirect", tun_in_redirect, REDIRECT, 0.0),
        ("decap_redirect_wide", prog(&wide.ebpf, names::PROG_TUNNEL_IN), REDIRECT, 0.0),
        ("empty", empty, UNSPEC, 0.0),
    ];
    if let Some(f) = floor {
        chains.push(("floor_stack", prog(&f.ebpf, names::PROG_FLOOR_DECAP_STACK), OK, 0.0));
        chains.push(("floor_redirect", prog(&f.ebpf, names::PROG_FLOOR_DECAP_REDIRECT), REDIRECT, 0.0));
    }
    for _ in 0..CHAIN_CALLS {
        for (name, p, want, total) in &mut chains {
            let run = test_run(p, &pk.chain, CHAIN_DEPTH)?;
            ensure!(run.ret == *want, "chain ({name}): verdict {}", run.ret);
            *total += run.kernel.as_nanos() as f64;
        }
    }
    for (name, _, _, total) in chains {
        push(&mut out.chain, name, total / CHAIN_CALLS as f64);
    }
    Ok(())
}

fn measure(object: Option<&[u8]>, floor: Option<&[u8]>, reps: usize, repeat: u32, ifindex: u32) -> anyhow::Result<Value> {
    let mut stack = TunDp::load(object, "stack", ifindex, false)?;
    let redirect = TunDp::load(object, "redirect", ifindex, false)?;
    let wide = TunDp::load(object, "redirect", ifindex, true)?;
    let floor = floor.map(|o| load_floor(o, ifindex)).transpose().context("the decapsulation floors")?;
    let pk = Packets::new();
    check_paths(&stack, &redirect, &wide, &pk)?;
    if let Some(f) = &floor {
        check_floor(f, &pk)?;
    }
    gateway_fixed_point(&mut stack)?;
    let (s0, r0, w0) = (stack.counters(), redirect.counters(), wide.counters());
    let mut rounds = Rounds::default();
    for _ in 0..reps {
        round_once(&stack, &redirect, &wide, floor.as_ref(), &pk, repeat, &mut rounds)?;
    }
    // Every call took the path it was measured for: the counters account for all of them.
    let (s1, r1, w1) = (stack.counters(), redirect.counters(), wide.counters());
    let grew = |a: &BTreeMap<&str, u64>, b: &BTreeMap<&str, u64>, k: &str| b.get(k).copied().unwrap_or(0) - a.get(k).copied().unwrap_or(0);
    let calls = (reps * SAMPLES) as u64;
    let chains = (reps * CHAIN_CALLS) as u64 * u64::from(CHAIN_DEPTH);
    ensure!(grew(&s0, &s1, "tunnel_encap") == 2 * calls, "tunnel_encap grew by {}, expected {}", grew(&s0, &s1, "tunnel_encap"), 2 * calls);
    ensure!(grew(&s0, &s1, "tunnel_decap") == calls + chains, "tunnel_decap (stack) grew by {}", grew(&s0, &s1, "tunnel_decap"));
    ensure!(grew(&r0, &r1, "tunnel_decap") == calls + chains, "tunnel_decap (redirect) grew by {}", grew(&r0, &r1, "tunnel_decap"));
    ensure!(grew(&w0, &w1, "tunnel_decap") == chains, "tunnel_decap (wide trie) grew by {}", grew(&w0, &w1, "tunnel_decap"));
    ensure!(grew(&s0, &s1, "flow_opened") == 0, "the gateway hot path opened {} flows", grew(&s0, &s1, "flow_opened"));
    for k in FAILURES {
        ensure!(grew(&s0, &s1, k) == 0 && grew(&r0, &r1, k) == 0 && grew(&w0, &w1, k) == 0, "{k} moved while measuring");
    }

    let b_empty = &rounds.b["empty"];
    let a_empty = &rounds.a["empty"];
    let c_empty = &rounds.chain["empty"];
    let net_of = |v: &[f64], floor: &[f64]| -> Vec<f64> { v.iter().zip(floor).map(|(x, e)| x - e).collect() };
    // What a program's net cost amortised is of its net cost in one-packet runs, per round,
    // for the two programs measured both ways: a program run once after the kernel copied a
    // fresh packet in runs colder than one run over and over, and the more so the busier the
    // machine is between two syscalls.
    let scale = |amortised: &[f64], a_floor: &[f64], one: &[f64]| -> Vec<f64> {
        net_of(amortised, a_floor).iter().zip(net_of(one, b_empty)).map(|(a, o)| a / o).collect()
    };
    let by_decap = scale(&rounds.chain["decap_stack"], c_empty, &rounds.b["decap_stack"]);
    let by_gateway = scale(&rounds.a["gateway_hot"], a_empty, &rounds.b["gateway_hot"]);
    let mut per_call = serde_json::Map::new();
    for (k, v) in &rounds.b {
        let net = net_of(v, b_empty);
        // What the program would cost against the empty program if both were run like the
        // fixed points, for the program that cannot be (encapsulation): its net cost in
        // one-packet runs over the empty program's own amortised cost, plus one ("raw", high
        // by the cold start of one-packet runs); and the same with the net cost scaled as
        // decapsulation's or the gateway hot path's scales in the same round.
        let estimate = |f: &[f64]| -> Value {
            let scaled: Vec<f64> = net.iter().zip(f).map(|(n, c)| n * c).collect();
            let r: Vec<f64> = scaled.iter().zip(a_empty).map(|(n, e)| 1.0 + n / e).collect();
            json!({ "net_ns": Stat::of(&scaled).json(), "ratio_to_empty": Stat::of(&r).json() })
        };
        let raw: Vec<f64> = net.iter().zip(a_empty).map(|(n, a)| 1.0 + n / a).collect();
        per_call.insert(
            (*k).to_string(),
            json!({
                "ns": Stat::of(v).json(),
                "net_ns": Stat::of(&net).json(),
                "ratio_to_empty": Stat::of(&ratios(v, b_empty)).json(),
                "estimated_ratio_to_empty_amortised": Stat::of(&raw).json(),
                "estimate_by_decap": estimate(&by_decap),
                "estimate_by_gateway": estimate(&by_gateway),
            }),
        );
    }
    let mut amortised = serde_json::Map::new();
    for (k, v) in &rounds.a {
        amortised.insert(
            (*k).to_string(),
            json!({ "ns": Stat::of(v).json(), "ratio_to_empty": Stat::of(&ratios(v, a_empty)).json(), "net_ns": Stat::of(&v.iter().zip(a_empty).map(|(x, e)| x - e).collect::<Vec<_>>()).json() }),
        );
    }
    let mut chain = serde_json::Map::new();
    for (k, v) in &rounds.chain {
        chain.insert(
            (*k).to_string(),
            json!({ "ns": Stat::of(v).json(), "ratio_to_empty": Stat::of(&ratios(v, c_empty)).json(), "net_ns": Stat::of(&v.iter().zip(c_empty).map(|(x, e)| x - e).collect::<Vec<_>>()).json() }),
        );
    }
    // Net of the empty program, so that the figure's fixed part does not hide the growth.
    let (wide_net, narrow_net) = (net_of(&rounds.chain["decap_redirect_wide"], c_empty), net_of(&rounds.chain["decap_redirect"], c_empty));
    chain["decap_redirect_wide"]["net_ratio_to_narrow"] = Stat::of(&ratios(&wide_net, &narrow_net)).json();
    Ok(json!({
        "rounds": reps,
        "samples_per_round": SAMPLES,
        "repeat": repeat,
        "chain_depth": CHAIN_DEPTH,
        "wide_routes": wide_routes().count() + 2,
        "node_slots": wide.tunnel.node_slots.is_some(),
        "chain_calls_per_round": CHAIN_CALLS,
        "mtu": MTU,
        "packet_bytes": {
            "encap_tcp": pk.encap_tcp.len(),
            "encap_udp": pk.encap_udp.len(),
            "decap": pk.decap.len(),
            "chain": pk.chain.len(),
        },
        "per_call": per_call,
        "amortised": amortised,
        "chain": chain,
        "amortised_to_one_packet": {
            "decap_stack": Stat::of(&by_decap).json(),
            "gateway_hot": Stat::of(&by_gateway).json(),
        },
    }))
}

/// Tunnel mode's figures, measured in a namespace of their own.
pub fn run(p: &Params) -> anyhow::Result<Value> {
    let started = std::time::Instant::now();
    let ns = NetNs::new("tb");
    ns.ip(&format!("link add {LINK} type veth peer name {LINK}p"));
    for cmd in [
        format!("addr add {}/24 dev {LINK}", Ipv4Addr::from(NODE)),
        format!("addr add 10.244.0.1/24 dev {LINK}"),
        format!("link set {LINK} up"),
        format!("link set {LINK}p up"),
        format!("neigh replace {} lladdr 02:00:00:00:00:02 dev {LINK} nud permanent", Ipv4Addr::from(PEER_NODE)),
        format!("neigh replace {} lladdr 02:00:00:00:00:0a dev {LINK} nud permanent", Ipv4Addr::from(POD)),
    ] {
        ns.ip(&cmd);
    }
    // Redirect delivery's FIB lookup is a forwarding lookup: it answers only where the
    // namespace forwards.
    ns.exec("sysctl -qw net.ipv4.ip_forward=1");
    let ifindex: u32 = ns.exec(&format!("cat /sys/class/net/{LINK}/ifindex")).trim().parse().context("the veth's ifindex")?;
    let (object, reps, repeat) = (p.object.clone(), p.reps, p.repeat);
    let floor = p.variants.iter().find(|(n, _)| n == FLOOR_VARIANT).map(|(_, o)| o.clone());
    let mut v = ns.run(move || measure(object.as_deref(), floor.as_deref(), reps, repeat, ifindex))?;
    v["seconds"] = json!(round(started.elapsed().as_secs_f64()));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_is_nested_tunnel_packets_with_consistent_lengths() {
        let inner = tcp(REMOTE, APP_PORT, POD, POD_PORT, false);
        let c = chain_packet(3, &inner);
        assert_eq!(c.len(), inner.len() + 3 * tunnel::OVERHEAD as usize);
        let mut at = 14;
        for layer in 0..3 {
            let ip = etherparse::Ipv4HeaderSlice::from_slice(&c[at..]).unwrap();
            assert_eq!(usize::from(ip.total_len()), c.len() - at, "layer {layer}: outer length");
            assert_eq!(ip.to_header().calc_header_checksum(), ip.header_checksum(), "layer {layer}: checksum");
            assert_eq!((ip.source(), ip.destination()), (CHAIN_NODE, POD));
            assert_eq!(u16::from_be_bytes([c[at + 22], c[at + 23]]), PORT);
            at += tunnel::OVERHEAD as usize;
        }
        assert_eq!(&c[at..], &inner[14..]);
        assert!(chain_packet(CHAIN_DEPTH, &inner).len() <= 3_712);
    }

    #[test]
    fn the_wide_routes_are_disjoint_from_every_other_route_and_fill_the_trie_to_its_limit() {
        let wide: Vec<_> = wide_routes().collect();
        assert_eq!(wide.len() + 2, 15_872);
        assert!(wide.len() + 2 <= meshnet_common::limits::MAX_TUNNEL_ROUTES as usize);
        let others: Vec<ipnet::Ipv4Net> =
            ["10.244.0.0/16", "10.246.0.0/16", FIRST_NET, CHAIN_NET].iter().map(|n| n.parse().unwrap()).collect();
        for net in &wide {
            assert!(others.iter().all(|o| !o.contains(&net.network()) && !net.contains(&o.network())), "{net}");
        }
        assert!(wide.iter().any(|n| n.to_string() == "10.245.2.0/24"));
    }

    #[test]
    fn both_configs_validate_with_a_tunnel_peer_and_a_gateway_peer() {
        for d in ["stack", "redirect"] {
            let desired = Config::from_yaml(&config(d)).unwrap().desired();
            assert_eq!((desired.tun_routes.len(), desired.tun_nodes.len(), desired.routes.len()), (1, 1, 1));
            assert!(desired.tun_config.is_some());
        }
    }
}
