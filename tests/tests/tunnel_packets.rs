//! Tunnel mode's programs, packet by packet, through `BPF_PROG_TEST_RUN`: what
//! `meshnet_from_pod` makes of a packet to a tunnel peer's pod, and what `meshnet_tun_in`
//! accepts, rejects (the adversarial cases: every check of the decapsulation, and every
//! truncation of a valid tunnel packet) or leaves alone.
//!
//! Expected packets are built independently with etherparse; outer headers are checked
//! field by field against the wire format in `meshnet_common::tunnel`.
//!
//! Needs root (loading eBPF): `cargo test -p meshnet-tests --test tunnel_packets`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    Ebpf,
};
use ipnet::Ipv4Net;
use etherparse::{IpNumber, Ipv4Header, Ipv4HeaderSlice, PacketBuilder, TcpHeader, TcpHeaderSlice, TcpOptionElement};
use meshnet::{
    config::{peer_id, Config},
    datapath::Datapath,
    maps::{self, ControlMaps, Stats},
    tunnel::{NodePath, TunnelMaps},
};
use meshnet_common::{
    names, node_slot, pod_port_slot, switch, tun_fast, tunnel, tunnel_sport, FlowKey, LocalNet, PodPort, SeqNodeSlot, SeqPodPort, IPPROTO_ICMP, IPPROTO_UDP,
};
use meshnet_tests::NetNs;
use meshnet_tests::testrun::{assert_bytes_eq, assert_counter_delta, verdict_name, OK, REDIRECT, SHOT, UNSPEC};

const ETH_HLEN: usize = 14;
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A pod of this node (cluster1, node pod CIDR 10.244.0.0/24).
const POD: [u8; 4] = [10, 244, 0, 10];
/// A pod of cluster1 on another node: not this node's to deliver to.
const OTHER_NODE_POD: [u8; 4] = [10, 244, 1, 10];
/// Pods of cluster2 on its two nodes.
const REMOTE: [u8; 4] = [10, 245, 0, 20];
const REMOTE_NODE2: [u8; 4] = [10, 245, 1, 20];
const NODE: [u8; 4] = [192, 0, 2, 1];
/// The node's own address in its pod CIDR (the bridge's, the pods' gateway).
const BRIDGE: [u8; 4] = [10, 244, 0, 1];
const PEER_NODE: [u8; 4] = [192, 0, 2, 2];
const PEER_NODE2: [u8; 4] = [192, 0, 2, 3];
const STRANGER: [u8; 4] = [192, 0, 2, 99];
/// This node's tunnel port, and cluster2's (different, so that a mix-up shows).
const PORT: u16 = 31800;
const PEER_PORT: u16 = 31801;
const MTU: u32 = 1500;
/// Where tunnel packets are addressed. A test run receives its frame on the loopback device,
/// whose MAC is all zeros, and the uplink program redirects only frames to the receiver's
/// own: there a frame to `HOST_MAC` is another host's.
const RX_MAC: [u8; 6] = [0; 6];
/// The harness's uplink, whose MAC is `HOST_MAC`.
const LINK: &str = "tp0";

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

const CONFIG: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
tunnel:
  port: 31800
  interfaces: ["lan0"]
  podCIDRs: ["10.244.0.0/24"]
peers:
  - name: cluster2
    mode: tunnel
    podCIDRs: ["10.245.0.0/16"]
    tunnelPort: 31801
    nodes:
      - address: 192.0.2.2
        podCIDRs: ["10.245.0.0/24"]
      - address: 192.0.2.3
        podCIDRs: ["10.245.1.0/24"]
"#;

struct Harness {
    /// Where this test's thread runs its TEST_RUNs: a veth with this node's address and the
    /// peer nodes as permanent neighbours, so that the FIB lookup of kernels without
    /// `bpf_redirect_neigh` finds a complete path (no route to the pods: delivery along the
    /// route passes decapsulated packets to the stack here).
    ns: NetNs,
    ebpf: Ebpf,
    _maps: ControlMaps,
    tunnel: TunnelMaps,
    /// The uplink's ifindex, as the agent resolves the peer nodes' paths.
    uplink: u32,
    stats: Stats,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(CONFIG)
    }

    fn with_config(config: &str) -> Self {
        Self::sized(config, &[])
    }

    /// With some maps sized as given (see `Datapath::load_unpinned_resized`).
    fn sized(config: &str, sizes: &[(&str, u32)]) -> Self {
        meshnet_tests::require_root();
        let ns = NetNs::new("tp");
        ns.ip(&format!("link add {LINK} address {} type veth peer name {LINK}p", mac(HOST_MAC)));
        ns.ip(&format!("addr add {}/24 dev {LINK}", Ipv4Addr::from(NODE)));
        ns.ip(&format!("link set {LINK} up"));
        ns.ip(&format!("link set {LINK}p up"));
        for peer in [PEER_NODE, PEER_NODE2] {
            ns.ip(&format!("neigh replace {} lladdr {} dev {LINK} nud permanent", Ipv4Addr::from(peer), mac(PEER_MAC)));
        }
        // The FIB lookup answers only for an interface that forwards, as a node's does.
        ns.exec("sysctl -qw net.ipv4.ip_forward=1");
        let ifindex: u32 = ns.exec(&format!("cat /sys/class/net/{LINK}/ifindex")).trim().parse().unwrap();
        // A TEST_RUN runs in its caller's namespace; this thread is the test's own.
        meshnet_tests::enter(&ns.path());
        let config = Config::from_yaml(config).unwrap();
        let (object, _) = meshnet::datapath::prepare_object(meshnet::datapath::EBPF_OBJECT, meshnet::datapath::skb_layout().as_ref()).unwrap();
        let mut ebpf = Datapath::load_unpinned_resized(config.max_flows, &object, sizes).unwrap();
        let mut maps = ControlMaps::from_ebpf(&mut ebpf).unwrap();
        let desired = config.desired();
        maps.sync(&desired).unwrap();
        let mut tunnel = TunnelMaps::from_ebpf(&mut ebpf).unwrap();
        // The paths the agent would resolve from the kernel's routes.
        let path = NodePath { src: Ipv4Addr::from(NODE), ifindex, mtu: MTU };
        let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path)]);
        // This node's addresses: the bridge's, in its pod CIDR, and its LAN address.
        let hosts = [Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))];
        let report = tunnel.sync(&desired, &paths, MTU, &hosts).unwrap();
        assert_eq!((report.routes_written, report.nodes_written), (2, 2), "{report:?}");
        let stats = maps::take_stats(&mut ebpf).unwrap();
        Self { ns, ebpf, _maps: maps, tunnel, uplink: ifindex, stats }
    }

    fn try_run(&self, prog: &str, pkt: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = p.test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), repeat: 1, ..Default::default() })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn run(&self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(prog, pkt).unwrap()
    }

    /// A run of `prog` on `pkt` as an skb of `gso_segs` segments (`__sk_buff.gso_segs`,
    /// which a TEST_RUN context may set on newer kernels): its verdict and the counters that moved;
    /// `None` where the kernel refuses such a context.
    fn run_segs(&self, prog: &str, pkt: &[u8], gso_segs: u32) -> Option<(u32, Vec<(&'static str, u64)>)> {
        const SK_BUFF_LEN: usize = 192;
        const GSO_SEGS_OFFSET: usize = 164;
        let mut ctx = [0u8; SK_BUFF_LEN];
        ctx[GSO_SEGS_OFFSET..GSO_SEGS_OFFSET + 4].copy_from_slice(&gso_segs.to_ne_bytes());
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; pkt.len() + 256];
        let before = self.counters();
        let r = match p.test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat: 1, ..Default::default() }) {
            Ok(r) => r,
            Err(aya::programs::ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => return None,
            Err(e) => panic!("TEST_RUN with a context: {e}"),
        };
        let after = self.counters();
        let moved = after.iter().filter(|(k, n)| before.get(*k) != Some(n)).map(|(k, n)| (*k, n - before.get(k).copied().unwrap_or(0))).collect();
        Some((r.return_value, moved))
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        maps::sum_stats(&self.stats).unwrap()
    }

    #[track_caller]
    fn expect(&self, what: &str, prog: &str, pkt: &[u8], verdict: u32, moved: &[(&str, u64)]) -> Vec<u8> {
        let before = self.counters();
        let (v, out) = self.run(prog, pkt);
        if v != verdict {
            let after = self.counters();
            let moved: Vec<_> = after.iter().filter(|(k, n)| before.get(*k) != Some(n)).collect();
            panic!("{what}: {prog} returned {} instead of {}; counters that moved: {moved:?}", verdict_name(v), verdict_name(verdict));
        }
        assert_counter_delta(what, &before, &self.counters(), moved);
        out
    }

    fn peer_stats(&self) -> meshnet_common::TunnelStats {
        self.tunnel.peer_stats().get(&peer_id("cluster2")).copied().unwrap_or_default()
    }
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC).ipv4(src, dst, 64).udp(sport, dport).write(&mut out, payload).unwrap();
    out
}

fn with_df(mut frame: Vec<u8>, df: bool) -> Vec<u8> {
    let mut ip = Ipv4HeaderSlice::from_slice(&frame[ETH_HLEN..]).unwrap().to_header();
    ip.dont_fragment = df;
    ip.header_checksum = ip.calc_header_checksum();
    frame[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ip.to_bytes());
    frame
}

fn tcp_syn(src: [u8; 4], dst: [u8; 4], mss: u16) -> Vec<u8> {
    let mut h = TcpHeader::new(40000, 8080, 0x1000_0000, 64240);
    h.syn = true;
    h.set_options(&[TcpOptionElement::MaximumSegmentSize(mss), TcpOptionElement::WindowScale(7)]).unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC).ipv4(src, dst, 64).tcp_header(h).write(&mut out, &[]).unwrap();
    out
}

fn ping(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC).ipv4(src, dst, 64).icmpv4_echo_request(7, 1).write(&mut out, b"ping").unwrap();
    out
}

/// meshnet's header for `cluster`.
fn header(magic: u16, version: u8, cluster: u32) -> [u8; 8] {
    let m = magic.to_be_bytes();
    let c = cluster.to_be_bytes();
    [m[0], m[1], version, 0, c[0], c[1], c[2], c[3]]
}

/// A tunnel packet as a peer node sends it: outer IPv4/UDP to this node's port, `hdr`, and
/// the inner IPv4 packet (a frame without its Ethernet header).
fn tunnel_packet(outer_src: [u8; 4], dport: u16, hdr: [u8; 8], inner_frame: &[u8]) -> Vec<u8> {
    tunnel_packet_to(outer_src, NODE, dport, hdr, inner_frame)
}

/// As [`tunnel_packet`], to `outer_dst` instead of this node.
fn tunnel_packet_to(outer_src: [u8; 4], outer_dst: [u8; 4], dport: u16, hdr: [u8; 8], inner_frame: &[u8]) -> Vec<u8> {
    let mut payload = hdr.to_vec();
    payload.extend_from_slice(&inner_frame[ETH_HLEN..]);
    let mut out = Vec::new();
    let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, outer_src, outer_dst).unwrap();
    ip.dont_fragment = true;
    PacketBuilder::ethernet2(PEER_MAC, RX_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, etherparse::Ipv4Extensions::default()))
        .udp(40123, dport)
        .write(&mut out, &payload)
        .unwrap();
    // The tunnel's outer UDP checksum is 0, as meshnet sends it.
    out[ETH_HLEN + 20 + 6..ETH_HLEN + 20 + 8].copy_from_slice(&[0, 0]);
    out
}

fn good_header() -> [u8; 8] {
    header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster2"))
}

/// Checks the outer headers `from_pod` put in front of `inner` (a frame), and returns them.
fn check_encap(what: &str, out: &[u8], inner: &[u8], node: [u8; 4], key: &FlowKey) {
    let o = tunnel::OVERHEAD as usize;
    assert_eq!(out.len(), inner.len() + o, "{what}: length");
    // bpf_redirect_neigh writes the MACs when it transmits; before 5.10 the program writes
    // those of the FIB lookup: the peer node's, from this node's uplink.
    let mut eth = inner[..ETH_HLEN].to_vec();
    if meshnet::datapath::have_redirect_neigh() == 0 {
        eth[..6].copy_from_slice(&PEER_MAC);
        eth[6..12].copy_from_slice(&HOST_MAC);
    }
    assert_bytes_eq(&format!("{what}: Ethernet header"), &out[..ETH_HLEN], &eth);
    let ip = Ipv4HeaderSlice::from_slice(&out[ETH_HLEN..]).unwrap().to_header();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{what}: outer IPv4 checksum");
    assert_eq!((ip.source, ip.destination), (NODE, node), "{what}: outer addresses");
    assert_eq!(ip.protocol, IpNumber::UDP, "{what}: outer protocol");
    assert!(ip.dont_fragment, "{what}: outer DF");
    assert_eq!(usize::from(ip.total_len), inner.len() - ETH_HLEN + o, "{what}: outer length");
    let inner_ip = Ipv4HeaderSlice::from_slice(&inner[ETH_HLEN..]).unwrap();
    assert_eq!(ip.dscp.value() << 2 | ip.ecn.value(), inner_ip.dcp().value() << 2 | inner_ip.ecn().value(), "{what}: outer TOS copied");
    let u = &out[ETH_HLEN + 20..ETH_HLEN + 28];
    let sport = u16::from_be_bytes([u[0], u[1]]);
    assert_eq!(sport, tunnel_sport(key), "{what}: outer source port is the inner flow's hash");
    assert!((tunnel::SPORT_MIN..tunnel::SPORT_MIN + tunnel::SPORT_SPAN).contains(&sport));
    assert_eq!(u16::from_be_bytes([u[2], u[3]]), PEER_PORT, "{what}: the peer's tunnel port");
    assert_eq!(usize::from(u16::from_be_bytes([u[4], u[5]])), inner.len() - ETH_HLEN + 16, "{what}: UDP length");
    assert_eq!(&u[6..8], &[0, 0], "{what}: UDP checksum 0");
    assert_eq!(&out[ETH_HLEN + 28..ETH_HLEN + 36], &header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster1")), "{what}: header");
    assert_bytes_eq(&format!("{what}: inner packet"), &out[ETH_HLEN + o..], &inner[ETH_HLEN..]);
}

#[test]
fn a_packet_to_a_tunnel_peers_pod_leaves_encapsulated_to_the_node_that_hosts_it() {
    let h = Harness::new();
    let cases: Vec<(&str, Vec<u8>, [u8; 4], FlowKey)> = vec![
        ("udp", udp(POD, REMOTE, 5000, 53, b"query"), PEER_NODE, FlowKey::new(be(POD), be(REMOTE), 5000u16.to_be(), 53u16.to_be(), IPPROTO_UDP)),
        ("udp to the second node", udp(POD, REMOTE_NODE2, 5000, 53, b"q"), PEER_NODE2, FlowKey::new(be(POD), be(REMOTE_NODE2), 5000u16.to_be(), 53u16.to_be(), IPPROTO_UDP)),
        ("ping", ping(POD, REMOTE), PEER_NODE, FlowKey::new(be(POD), be(REMOTE), 0, 0, IPPROTO_ICMP)),
    ];
    let mut bytes = 0;
    for (what, inner, node, key) in &cases {
        let out = h.expect(what, names::PROG_FROM_POD, inner, REDIRECT, &[("tunnel_encap", 1)]);
        check_encap(what, &out, inner, *node, key);
        bytes += (inner.len() - ETH_HLEN) as u64;
    }
    let s = h.peer_stats();
    assert_eq!((s.tx_packets, s.tx_bytes, s.rx_packets), (3, bytes, 0));
    // A pod of the peer's CIDR on no node it lists is not routed: gateway mode has no route
    // either, so it passes, as without meshnet.
    let pkt = udp(POD, [10, 245, 9, 9], 5000, 53, b"q");
    let (v, out) = h.run(names::PROG_FROM_POD, &pkt);
    assert_eq!((v, out), (UNSPEC, pkt));
}

/// The decapsulating program reads the settings' seqlocked copy (`names::TUN_CFG_SEQ`) when
/// the seqlock vouches for it, and their hash otherwise: a copy being written (an odd
/// sequence number) or an empty one never decides a verdict, and a sync puts the copy right.
#[test]
fn decapsulation_reads_the_settings_copy_only_when_the_seqlock_vouches_for_it() {
    use meshnet_common::{LocalNet, SeqTunnelConfig, TunnelConfig};
    let mut h = Harness::new();
    let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, POD, 53, 5000, b"answer"));
    let copy = h.tunnel.cfg_seq.as_ref().unwrap().get(&0, 0).unwrap();
    assert_eq!((copy.seq & 1, Some(copy.cfg)), (0, h.tunnel.current_config()), "the sync's copy");
    assert!(copy.seq > 0, "the copy was never written under the seqlock");
    h.expect("the copy", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
    assert_eq!(h.tunnel.dump(&BTreeMap::new()).settings.unwrap().decap_copy, "same");

    let set = |h: &mut Harness, v: SeqTunnelConfig| h.tunnel.cfg_seq.as_mut().unwrap().set(0, v, 0).unwrap();
    // A copy that names another pod CIDR for this node, vouched for: the program goes by it.
    let mut other = copy;
    other.seq += 2;
    other.cfg.nets[0] = LocalNet { addr_be: be([10, 244, 9, 0]), mask_be: be([255, 255, 255, 0]) };
    set(&mut h, other);
    h.expect("a copy of other settings", names::PROG_TUNNEL_IN, &pkt, SHOT, &[("tunnel_not_local", 1)]);
    assert_eq!(h.tunnel.dump(&BTreeMap::new()).settings.unwrap().decap_copy, "other");
    // The same copy while it is being written: the hash decides.
    set(&mut h, SeqTunnelConfig { seq: other.seq + 1, ..other });
    h.expect("a copy being written", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
    // An empty copy: the hash.
    set(&mut h, SeqTunnelConfig { seq: other.seq + 2, cfg: TunnelConfig::default(), ..other });
    h.expect("an empty copy", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
    assert_eq!(h.tunnel.dump(&BTreeMap::new()).settings.unwrap().decap_copy, "none");

    // A sync writes the settings' copy again, under the seqlock.
    set(&mut h, other);
    let config = Config::from_yaml(CONFIG).unwrap();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path)]);
    let report = h.tunnel.sync(&config.desired(), &paths, MTU, &[Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))]).unwrap();
    assert!(report.fast_written, "{report:?}");
    let fixed = h.tunnel.cfg_seq.as_ref().unwrap().get(&0, 0).unwrap();
    assert_eq!((fixed.seq, Some(fixed.cfg)), (other.seq + 2, h.tunnel.current_config()));
    h.expect("the copy written again", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
    // Without settings the copy is empty: nothing is taken, by the copy or by the hash. Its
    // CIDRs hold nothing: a zeroed one would hold every address, for a reader that mixed it
    // with the copy's port from before.
    h.tunnel.sync(&meshnet::config::Desired::default(), &BTreeMap::new(), MTU, &[]).unwrap();
    let cleared = h.tunnel.cfg_seq.as_ref().unwrap().get(&0, 0).unwrap().cfg;
    assert_eq!(cleared, TunnelConfig { nets: [LocalNet::NONE; meshnet_common::limits::MAX_NODE_CIDRS], ..TunnelConfig::default() });
    let (v, out) = h.run(names::PROG_TUNNEL_IN, &pkt);
    assert_eq!((v, out), (UNSPEC, pkt.clone()), "a tunnel packet without settings passes untouched");
}

/// A peer node whose path cannot be found for a moment (an address being replaced, a link
/// flapping, a failed read) keeps the routes written for it with the path last found: its
/// flows go on. A node the peer no longer lists loses them.
#[test]
fn a_node_without_a_path_for_a_moment_keeps_its_routes() {
    let mut h = Harness::new();
    let inner = udp(POD, REMOTE_NODE2, 5000, 53, b"query");
    h.expect("before", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    let before = h.tunnel.current_routes();
    let desired = Config::from_yaml(CONFIG).unwrap().desired();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let only_node1 = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path)]);
    let hosts = [Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))];
    let report = h.tunnel.sync(&desired, &only_node1, MTU, &hosts).unwrap();
    assert_eq!(report.unresolved, [Ipv4Addr::from(PEER_NODE2)]);
    assert_eq!(report.routes_removed, 0, "{report:?}");
    assert_eq!(h.tunnel.current_routes(), before);
    h.expect("while its path is missing", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    // Only the path is kept: a new tunnel port of the peer applies meanwhile.
    let moved = CONFIG.replace("tunnelPort: 31801", "tunnelPort: 31802");
    h.tunnel.sync(&Config::from_yaml(&moved).unwrap().desired(), &only_node1, MTU, &hosts).unwrap();
    let now = h.tunnel.current_routes();
    assert!(now.values().all(|n| u16::from_be(n.port_be) == 31802), "{now:?}");
    assert_eq!(now.values().map(|n| (n.src_be, n.ifindex, n.mtu)).collect::<Vec<_>>(), before.values().map(|n| (n.src_be, n.ifindex, n.mtu)).collect::<Vec<_>>());
    // cluster2 stops listing its second node: its route goes, path or not.
    let one_node = CONFIG.replace("      - address: 192.0.2.3\n        podCIDRs: [\"10.245.1.0/24\"]\n", "");
    let report = h.tunnel.sync(&Config::from_yaml(&one_node.replace("tunnelPort: 31801", "tunnelPort: 31802")).unwrap().desired(), &only_node1, MTU, &hosts).unwrap();
    assert_eq!((report.routes_removed, report.nodes_removed), (1, 1), "{report:?}");
}

/// Each tunnel peer counts into a slot of its own (found by an array read, its index in the
/// peer's routes): both nodes of a peer share it, a peer that goes frees it, and the next
/// peer given it starts from zero, not from what the first one sent.
#[test]
fn a_freed_counter_slot_starts_its_next_peer_at_zero() {
    let mut h = Harness::new();
    let slots = |h: &Harness| h.tunnel.current_routes().values().map(|n| (n.peer_id, n.stats_slot)).collect::<BTreeSet<_>>();
    let first = slots(&h);
    assert_eq!(first.len(), 1, "cluster2's two nodes count into one slot: {first:?}");
    let (_, slot) = *first.first().unwrap();
    assert_ne!(slot, 0, "cluster2's routes name no counter slot");
    let inner = udp(POD, REMOTE, 5000, 53, b"query");
    h.expect("cluster2", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    assert_eq!(h.peer_stats().tx_packets, 1);

    h.tunnel.sync(&meshnet::config::Desired::default(), &BTreeMap::new(), MTU, &[]).unwrap();
    assert!(h.tunnel.peer_stats().is_empty(), "{:?}", h.tunnel.peer_stats());
    // A packet that read cluster2's route before it went may still count after the free:
    // the slot's next peer must not start with it.
    let index = u32::from(slot - 1);
    let stats = h.tunnel.stats.as_mut().unwrap();
    let mut late = stats.get(&index, 0).unwrap().to_vec();
    late[0].tx_packets += 5;
    late[0].tx_bytes += 500;
    stats.set(index, aya::maps::PerCpuValues::try_from(late).unwrap(), 0).unwrap();
    let config = Config::from_yaml(&CONFIG.replace("cluster2", "cluster4")).unwrap();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path)]);
    h.tunnel.sync(&config.desired(), &paths, MTU, &[Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))]).unwrap();
    assert_eq!(slots(&h), [(peer_id("cluster4"), slot)].into(), "the freed slot is not the one taken");
    let fresh = h.tunnel.peer_stats();
    assert_eq!(fresh.get(&peer_id("cluster4")).map(|s| (s.tx_packets, s.tx_bytes)), Some((0, 0)), "{fresh:?}");
    h.expect("cluster4", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    assert_eq!(h.tunnel.peer_stats()[&peer_id("cluster4")].tx_packets, 1);
}

/// `from_pod` writes the cluster id the agent publishes beside the settings
/// (`names::TUN_FAST`) into every tunnel header, with no lookup of the settings' hash; where
/// none is published (0: pins of an older agent before its first sync) it reads the settings.
#[test]
fn encapsulation_takes_the_cluster_id_published_with_the_settings() {
    let mut h = Harness::new();
    let own = peer_id("cluster1");
    assert_eq!(h.tunnel.fast_slot(tun_fast::CLUSTER_ID), Some(own));
    let inner = udp(POD, REMOTE, 5000, 53, b"query");
    let key = FlowKey::new(be(POD), be(REMOTE), 5000u16.to_be(), 53u16.to_be(), IPPROTO_UDP);
    let out = h.expect("published", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    check_encap("published", &out, &inner, PEER_NODE, &key);

    // The program reads the slot, not the settings: another id there goes on the wire.
    h.tunnel.fast.as_mut().unwrap().set(tun_fast::CLUSTER_ID, own ^ 1, 0).unwrap();
    let out = h.expect("another id published", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    assert_eq!(&out[ETH_HLEN + 32..ETH_HLEN + 36], &(own ^ 1).to_be_bytes(), "the header carries the published id");
    // None published: the settings' id.
    h.tunnel.fast.as_mut().unwrap().set(tun_fast::CLUSTER_ID, 0, 0).unwrap();
    let out = h.expect("none published", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    check_encap("none published", &out, &inner, PEER_NODE, &key);

    // The next sync publishes it again; settings removed, nothing is published.
    let desired = Config::from_yaml(CONFIG).unwrap().desired();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path)]);
    let report = h.tunnel.sync(&desired, &paths, MTU, &[Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))]).unwrap();
    assert!(report.fast_written && !report.config_changed, "{report:?}");
    assert_eq!(h.tunnel.fast_slot(tun_fast::CLUSTER_ID), Some(own));
    h.tunnel.sync(&meshnet::config::Desired::default(), &BTreeMap::new(), MTU, &[]).unwrap();
    assert_eq!((h.tunnel.fast_slot(tun_fast::CLUSTER_ID), h.tunnel.fast_slot(tun_fast::PORT)), (Some(0), Some(0)));
    // A route without settings (none the agent leaves: it removes routes first) is refused,
    // counted, as before the id was published: the fallback finds no settings.
    let node = meshnet_common::TunnelNode {
        addr_be: be(PEER_NODE),
        src_be: be(NODE),
        port_be: PEER_PORT.to_be(),
        stats_slot: 0,
        peer_id: peer_id("cluster2"),
        ifindex: h.uplink,
        mtu: MTU,
    };
    h.tunnel.routes.insert(&aya::maps::lpm_trie::Key::new(24, be([10, 245, 0, 0])), node, 0).unwrap();
    h.tunnel.switches.as_mut().unwrap().set(switch::NO_TUNNEL_ROUTES, 0, 0).unwrap();
    h.expect("a route, no settings", names::PROG_FROM_POD, &inner, SHOT, &[("tunnel_encap_failed", 1)]);
}

/// A node without tunnel routes tells its datapath to skip the tunnel trie (a helper call on
/// every packet a pod sends); the switch must be off again before a route is written, or
/// the new peer's pods would not be reached.
#[test]
fn the_tunnel_trie_is_skipped_only_while_there_is_no_tunnel_route() {
    let mut h = Harness::new();
    assert_eq!(h.tunnel.switch(switch::NO_TUNNEL_ROUTES), Some(false), "routes written, the trie is looked at");
    let inner = udp(POD, REMOTE, 5000, 53, b"query");
    h.expect("with routes", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);

    // Every tunnel peer gone: the switch is on and nothing is encapsulated any more.
    let none = meshnet::config::Desired::default();
    let report = h.tunnel.sync(&none, &BTreeMap::new(), MTU, &[]).unwrap();
    assert_eq!(report.routes_removed, 2, "{report:?}");
    assert_eq!(h.tunnel.current_routes().len(), 0);
    assert_eq!(h.tunnel.switch(switch::NO_TUNNEL_ROUTES), Some(true));
    assert!(h.tunnel.effective_routes().is_empty(), "what explain shows follows the switch");
    let (v, out) = h.run(names::PROG_FROM_POD, &inner);
    assert_eq!((v, out), (UNSPEC, inner.clone()));

    // Back: switched off before the routes went in, so the first packet is carried.
    let config = Config::from_yaml(CONFIG).unwrap();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path)]);
    let report = h.tunnel.sync(&config.desired(), &paths, MTU, &[Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))]).unwrap();
    assert_eq!(report.routes_written, 2, "{report:?}");
    assert_eq!(h.tunnel.switch(switch::NO_TUNNEL_ROUTES), Some(false));
    assert_eq!(h.tunnel.effective_routes(), h.tunnel.current_routes());
    let out = h.expect("routes back", names::PROG_FROM_POD, &inner, REDIRECT, &[("tunnel_encap", 1)]);
    check_encap("routes back", &out, &inner, PEER_NODE, &FlowKey::new(be(POD), be(REMOTE), 5000u16.to_be(), 53u16.to_be(), IPPROTO_UDP));
}

#[test]
fn a_syn_through_the_tunnel_has_its_mss_clamped_to_what_fits() {
    let h = Harness::new();
    let max = (MTU - tunnel::OVERHEAD - tunnel::IP_TCP_LEN) as u16;
    let syn = tcp_syn(POD, REMOTE, 1460);
    let out = h.expect("syn", names::PROG_FROM_POD, &syn, REDIRECT, &[("tunnel_encap", 1), ("tunnel_mss_clamped", 1)]);
    let inner = &out[ETH_HLEN + tunnel::OVERHEAD as usize..];
    let ip = Ipv4HeaderSlice::from_slice(inner).unwrap();
    let tcp = TcpHeaderSlice::from_slice(&inner[20..]).unwrap().to_header();
    let mss = tcp.options_iterator().find_map(|o| match o.unwrap() {
        TcpOptionElement::MaximumSegmentSize(m) => Some(m),
        _ => None,
    });
    assert_eq!(mss, Some(max));
    let want = tcp.calc_checksum_ipv4(&ip.to_header(), &[]).unwrap();
    assert_eq!(tcp.checksum, want, "TCP checksum after the clamp");
    // An MSS already small enough is left alone.
    let small = tcp_syn(POD, REMOTE, 1200);
    let out = h.expect("small syn", names::PROG_FROM_POD, &small, REDIRECT, &[("tunnel_encap", 1)]);
    assert_bytes_eq("small syn", &out[ETH_HLEN + tunnel::OVERHEAD as usize..], &small[ETH_HLEN..]);
    // And on the way in, a SYN-ACK to this node's pod is clamped too.
    let synack = tcp_syn(REMOTE, POD, 1460);
    let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &synack);
    let out = h.expect("syn in", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1), ("tunnel_mss_clamped", 1)]);
    let tcp = TcpHeaderSlice::from_slice(&out[ETH_HLEN + 20..]).unwrap().to_header();
    assert!(tcp.options_iterator().any(|o| matches!(o, Ok(TcpOptionElement::MaximumSegmentSize(m)) if m == max)));
    // The decapsulation reads the inner TCP flags in place only behind a plain 20-byte inner
    // header; behind IP options the SYN-ACK is parsed in full, and clamped all the same.
    let synack = with_ip_options(&tcp_syn(REMOTE, POD, 1460));
    let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &synack);
    let out = h.expect("syn in, IP options", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1), ("tunnel_mss_clamped", 1)]);
    let ip = Ipv4HeaderSlice::from_slice(&out[ETH_HLEN..]).unwrap().to_header();
    let tcp = TcpHeaderSlice::from_slice(&out[ETH_HLEN + 24..]).unwrap().to_header();
    assert!(tcp.options_iterator().any(|o| matches!(o, Ok(TcpOptionElement::MaximumSegmentSize(m)) if m == max)), "IP options: {tcp:?}");
    assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, &[]).unwrap(), "TCP checksum after the clamp, IP options");
    // A segment that is not a SYN keeps its bytes, even with an MSS option in it.
    let mut ack = tcp_syn(REMOTE, POD, 1460);
    ack[ETH_HLEN + 20 + 13] = 0x10;
    let ack = with_tcp_checksum(ack);
    let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &ack);
    let out = h.expect("ack in", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
    assert_bytes_eq("ack in", &out[ETH_HLEN..], &ack[ETH_HLEN..]);
}

/// `frame` with 4 bytes of IP options (three NOPs and the end of the list) after its fixed
/// IPv4 header, the header's length, total length and checksum made to match.
fn with_ip_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..ETH_HLEN + 20].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&frame[ETH_HLEN + 20..]);
    f[ETH_HLEN] = 0x46;
    let len = u16::from_be_bytes([f[ETH_HLEN + 2], f[ETH_HLEN + 3]]) + 4;
    f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&len.to_be_bytes());
    let ip = Ipv4HeaderSlice::from_slice(&f[ETH_HLEN..]).unwrap().to_header();
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip.calc_header_checksum().to_be_bytes());
    f
}

/// `frame` (IPv4 without options, TCP) with its TCP checksum computed again.
fn with_tcp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let ip = Ipv4HeaderSlice::from_slice(&frame[ETH_HLEN..]).unwrap().to_header();
    let tcp = TcpHeaderSlice::from_slice(&frame[ETH_HLEN + 20..]).unwrap().to_header();
    let sum = tcp.calc_checksum_ipv4(&ip, &frame[ETH_HLEN + 20 + tcp.header_len() as usize..]).unwrap();
    frame[ETH_HLEN + 36..ETH_HLEN + 38].copy_from_slice(&sum.to_be_bytes());
    frame
}

#[test]
fn a_df_packet_too_large_for_the_tunnel_gets_fragmentation_needed_back() {
    let h = Harness::new();
    let big = with_df(udp(POD, REMOTE, 5000, 9000, &[0x5a; 1472]), true);
    assert_eq!(big.len(), ETH_HLEN + 1500);
    let out = h.expect("DF 1500", names::PROG_FROM_POD, &big, REDIRECT, &[("tunnel_frag_needed", 1)]);
    assert_eq!(&out[..6], &POD_MAC, "back to the pod");
    assert_eq!(&out[6..12], &HOST_MAC);
    let ip = Ipv4HeaderSlice::from_slice(&out[ETH_HLEN..]).unwrap().to_header();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!((ip.source, ip.destination, ip.protocol), (NODE, POD, IpNumber::ICMP));
    let icmp = &out[ETH_HLEN + 20..];
    assert_eq!(icmp.len(), 8 + 40);
    assert_eq!((icmp[0], icmp[1]), (3, 4), "destination unreachable, fragmentation needed");
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), (MTU - tunnel::OVERHEAD) as u16, "the tunnel's MTU");
    assert_eq!(etherparse::checksum::Sum16BitWords::new().add_slice(icmp).ones_complement(), 0, "ICMP checksum");
    assert_bytes_eq("quote", &icmp[8..], &big[ETH_HLEN..ETH_HLEN + 40]);
    // One byte less than the limit fits.
    let fits = with_df(udp(POD, REMOTE, 5000, 9000, &[0x5a; 1436]), true);
    h.expect("DF 1464", names::PROG_FROM_POD, &fits, REDIRECT, &[("tunnel_encap", 1)]);
}

/// TCP marks every segment it sends whole as one segment (`gso_segs` 1): such a segment too
/// large for the tunnel gets "fragmentation needed" as any packet does, and only a packet of
/// several segments, which GSO cuts after encapsulation, is taken whole.
#[test]
fn a_single_tcp_segment_too_large_for_the_tunnel_gets_fragmentation_needed() {
    let h = Harness::new();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC).ipv4(POD, REMOTE, 64).tcp(40000, 8080, 1, 65535).write(&mut out, &[0x5a; 1460]).unwrap();
    let segment = with_df(out, true);
    assert_eq!(segment.len(), ETH_HLEN + 1500);
    let Some((v, moved)) = h.run_segs(names::PROG_FROM_POD, &segment, 1) else {
        meshnet_tests::skip("gso_segs in a TEST_RUN context");
        return;
    };
    assert_eq!((verdict_name(v), moved), (verdict_name(REDIRECT), vec![("tunnel_frag_needed", 1)]), "one segment");
    let (v, moved) = h.run_segs(names::PROG_FROM_POD, &segment, 2).expect("a context the kernel took once");
    assert_eq!((verdict_name(v), moved), (verdict_name(REDIRECT), vec![("tunnel_encap", 1)]), "a GSO packet of two");
}

/// A packet is taken from the node that hosts its inner source without a look at the node
/// table (that node's route names it), and from another node of the same peer after one.
#[test]
fn a_valid_tunnel_packet_is_delivered_unchanged_and_counted() {
    let h = Harness::new();
    let cases = [
        ("udp", PEER_NODE, udp(REMOTE, POD, 53, 5000, b"answer")),
        ("ping", PEER_NODE, ping(REMOTE, POD)),
        ("from the second node", PEER_NODE2, udp(REMOTE_NODE2, POD, 1, 2, b"x")),
        ("from the second node, for a pod the first one hosts", PEER_NODE2, udp(REMOTE, POD, 53, 5000, b"answer")),
    ];
    for (what, src, inner) in &cases {
        let pkt = tunnel_packet(*src, PORT, good_header(), inner);
        let out = h.expect(what, names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
        assert_bytes_eq(what, &out[ETH_HLEN..], &inner[ETH_HLEN..]);
    }
    assert_eq!(h.peer_stats().rx_packets, cases.len() as u64);
}

#[test]
fn a_pod_in_the_port_table_gets_its_packets_out_of_its_own_port() {
    let mut h = Harness::new();
    let port = PodPort { ifindex: 7, pod_mac: POD_MAC, host_mac: HOST_MAC };
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), port)])).unwrap();
    let inner = udp(REMOTE, POD, 53, 5000, b"answer");
    let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &inner);
    // Redirected (to ifindex 7: TEST_RUN returns the verdict, it sends nothing), addressed
    // from the host side to the pod, the inner packet unchanged.
    let out = h.expect("a pod in the port table", names::PROG_TUNNEL_IN, &pkt, REDIRECT, &[("tunnel_decap", 1)]);
    assert_eq!(out[..6], POD_MAC, "destination MAC");
    assert_eq!(out[6..12], HOST_MAC, "source MAC");
    assert_bytes_eq("a pod in the port table", &out[ETH_HLEN..], &inner[ETH_HLEN..]);
    // Another pod of the node, not in the table, takes the route as before (none here).
    let other = udp(REMOTE, [10, 244, 0, 11], 53, 5000, b"answer");
    h.expect("a pod not in the table", names::PROG_TUNNEL_IN, &tunnel_packet(PEER_NODE, PORT, good_header(), &other), OK, &[("tunnel_decap", 1)]);
    // The table is only for delivery: a packet the checks refuse is dropped all the same.
    let spoofed = udp([10, 246, 0, 1], POD, 53, 5000, b"answer");
    h.expect("a spoofed source to a pod in the table", names::PROG_TUNNEL_IN, &tunnel_packet(PEER_NODE, PORT, good_header(), &spoofed), SHOT, &[("tunnel_spoofed_source", 1)]);
    // Gone from the table, the pod's packets take the route again.
    h.tunnel.sync_ports(&BTreeMap::new()).unwrap();
    h.expect("a pod no longer in the table", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
}

/// Delivery by redirect bypasses the node's forwarding (its TTL and FORWARD rules): it must
/// not send a packet back out of the uplink it came in on. An address of the node's pod
/// CIDRs routed there has no pod behind it and is dropped and counted, where the stack would
/// have sent it on to the LAN; one whose route is another device of the node (a pod the
/// agent has not read yet) is redirected there.
#[test]
fn delivery_by_redirect_never_sends_a_packet_back_out_of_the_uplink() {
    let h = Harness::new();
    let free = [10, 244, 0, 77];
    let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, free, 53, 5000, b"x"));
    h.expect("no route", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
    // TEST_RUN's packets come in on the loopback: here the uplink. An address routed back
    // out of it: the lookup names the device only from 5.10 (before, it finds no neighbour
    // on it and the packet takes the stack).
    h.ns.ip("route add 10.244.0.77/32 dev lo");
    if meshnet::datapath::have_redirect_neigh() != 0 {
        h.expect("routed back out of the uplink", names::PROG_TUNNEL_IN, &pkt, SHOT, &[("tunnel_no_pod", 1)]);
        assert_eq!(h.peer_stats().rx_packets, 1, "only delivered packets are counted as received");
    } else {
        h.expect("routed back out of the uplink, before 5.10", names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)]);
    }
    h.ns.ip("route del 10.244.0.77/32 dev lo");
    // Through a gateway on another device (as Cilium's cilium_host is for its pods).
    h.ns.ip(&format!("neigh replace 192.0.2.254 lladdr {} dev {LINK} nud permanent", mac(PEER_MAC)));
    h.ns.ip(&format!("route add default via 192.0.2.254 dev {LINK}"));
    h.expect("through a gateway on another device", names::PROG_TUNNEL_IN, &pkt, REDIRECT, &[("tunnel_decap", 1)]);
    // A pod the agent has not read yet: its route is a link of the node.
    h.ns.ip("link add tpv0 type veth peer name tpv1");
    h.ns.ip("link set tpv0 up");
    h.ns.ip("link set tpv1 up");
    h.ns.ip("route add 10.244.0.64/26 dev tpv0");
    h.ns.ip("neigh replace 10.244.0.77 lladdr 02:00:00:00:00:4d dev tpv0 nud permanent");
    h.expect("a route on a link of the node", names::PROG_TUNNEL_IN, &pkt, REDIRECT, &[("tunnel_decap", 1)]);
}

/// A pod may send through the tunnel only as itself: the peer node checks no more than that
/// the source is one of this cluster's pods, and NetworkPolicy there trusts it.
#[test]
fn a_pod_cannot_send_through_the_tunnel_as_another_pod() {
    let mut h = Harness::new();
    let inner = |src| udp(src, REMOTE, 5000, 53, b"query");
    // TEST_RUN runs on the namespace's loopback, index 1: that is the sending pod's interface.
    let own = PodPort { ifindex: 1, pod_mac: POD_MAC, host_mac: HOST_MAC };
    let other = PodPort { ifindex: 7, ..own };
    let neighbour = [10, 244, 0, 11];
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), own), (Ipv4Addr::from(neighbour), other)])).unwrap();
    h.expect("as itself", names::PROG_FROM_POD, &inner(POD), REDIRECT, &[("tunnel_encap", 1)]);
    h.expect("as the pod of another interface", names::PROG_FROM_POD, &inner(neighbour), SHOT, &[("spoofed_source", 1)]);
    // An address no interface holds: a pod not read yet, if it is in this node's pod CIDRs.
    h.expect("as a pod not read yet", names::PROG_FROM_POD, &inner([10, 244, 0, 12]), REDIRECT, &[("tunnel_encap", 1)]);
    h.expect("as a pod of another node", names::PROG_FROM_POD, &inner(OTHER_NODE_POD), SHOT, &[("spoofed_source", 1)]);
    h.expect("as an address outside the cluster", names::PROG_FROM_POD, &inner([192, 168, 1, 1]), SHOT, &[("spoofed_source", 1)]);
}

/// A pod must not send a datagram of its own to a peer's tunnel port: masqueraded to this
/// node's address on its way out, as most CNIs do with traffic leaving the pod network, it
/// comes from a node the peer knows, and the peer would take it for tunnel traffic and
/// deliver the packet inside in the name of any pod of this cluster (past the check that a
/// pod sends only as itself, and past NetworkPolicy there). An ordinary UDP socket does it.
#[test]
fn a_pod_cannot_pass_its_own_datagram_off_as_tunnel_traffic() {
    let h = Harness::new();
    // What the peer would decapsulate: meshnet's header, then a packet from another pod.
    let mut forged = header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster1")).to_vec();
    forged.extend_from_slice(&udp([10, 244, 0, 99], REMOTE, 5000, 53, b"query")[ETH_HLEN..]);
    let to = |dst, proto_udp: bool, dport| {
        if proto_udp {
            udp(POD, dst, 40000, dport, &forged)
        } else {
            let b = PacketBuilder::ethernet2(POD_MAC, HOST_MAC).ipv4(POD, dst, 64).tcp(40000, dport, 1, 65535);
            let mut f = Vec::new();
            b.write(&mut f, &forged).unwrap();
            f
        }
    };
    let forged_moved: &[(&str, u64)] = &[("tunnel_forged", 1)];
    h.expect("UDP to a peer node's tunnel port", names::PROG_FROM_POD, &to(PEER_NODE, true, PEER_PORT), SHOT, forged_moved);
    h.expect("UDP to another peer node's tunnel port", names::PROG_FROM_POD, &to(PEER_NODE2, true, PEER_PORT), SHOT, forged_moved);
    // Anywhere else the port is anyone's: the ports come from the remotes, and one that named
    // 53 would otherwise cut every pod off DNS. (The node's netfilter covers a peer node's other
    // addresses: operations.md, "Senders".)
    h.expect("UDP to that port at another address", names::PROG_FROM_POD, &to(STRANGER, true, PEER_PORT), UNSPEC, &[]);
    h.expect("UDP to another port of a peer node", names::PROG_FROM_POD, &to(PEER_NODE, true, PEER_PORT + 1), UNSPEC, &[]);
    h.expect("TCP to the tunnel port", names::PROG_FROM_POD, &to(PEER_NODE, false, PEER_PORT), UNSPEC, &[]);
    // This cluster's own port is no peer's: its nodes take tunnel packets only from peers'.
    h.expect("UDP to this cluster's tunnel port", names::PROG_FROM_POD, &to(PEER_NODE, true, PORT), UNSPEC, &[]);
    // The pod's real tunnel traffic, to a peer's pod, still leaves encapsulated.
    h.expect("to a peer's pod", names::PROG_FROM_POD, &udp(POD, REMOTE, 40000, PEER_PORT, b"x"), REDIRECT, &[("tunnel_encap", 1)]);
}

/// The port table's slots (`names::TUN_PORT_SLOTS`): the decapsulating program takes a pod's
/// port from its slot only when the slot names that pod and its seqlock vouches for the read;
/// anything else, a slot another pod holds included, is looked up in the hash.
#[test]
fn a_pod_is_delivered_by_its_own_slot_and_never_by_another_pods() {
    // 10.244.0.10 and 10.244.16.10 agree in their low 12 bits: one slot for the two.
    let mut h = Harness::with_config(&CONFIG.replace(r#"podCIDRs: ["10.244.0.0/24"]"#, r#"podCIDRs: ["10.244.0.0/24", "10.244.16.0/24"]"#));
    let twin = [10, 244, 16, 10];
    assert_eq!(pod_port_slot(be(POD)), pod_port_slot(be(twin)));
    let twin_mac = [0x02, 0, 0, 0, 0, 0x0b];
    let a = PodPort { ifindex: 7, pod_mac: POD_MAC, host_mac: HOST_MAC };
    let b = PodPort { ifindex: 8, pod_mac: twin_mac, host_mac: HOST_MAC };
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), a), (Ipv4Addr::from(twin), b)])).unwrap();
    assert_eq!(h.tunnel.slotted_ports(), BTreeSet::from([Ipv4Addr::from(POD)]), "the lower address owns the slot");
    // An address a pod gave its own interface outside the node's tunnel CIDRs (lower, in the
    // same slot) takes the slot from no one.
    let outside = Ipv4Addr::new(9, 0, 0, 10);
    assert_eq!(pod_port_slot(be(outside.octets())), pod_port_slot(be(POD)));
    let c = PodPort { ifindex: 10, pod_mac: [0x02, 0, 0, 0, 0, 0x0d], host_mac: HOST_MAC };
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), a), (Ipv4Addr::from(twin), b), (outside, c)])).unwrap();
    assert_eq!(h.tunnel.slotted_ports(), BTreeSet::from([Ipv4Addr::from(POD)]), "an address outside the node's CIDRs took a slot");
    let slots = |h: &Harness| h.tunnel.port_slots.as_ref().unwrap().get(&pod_port_slot(be(POD)), 0).unwrap();
    let held = slots(&h);
    assert!(held.seq != 0 && held.seq & 1 == 0, "{held:?}");
    let deliver = |h: &Harness, what: &str, dst: [u8; 4]| {
        let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, dst, 53, 5000, b"answer"));
        let out = h.expect(what, names::PROG_TUNNEL_IN, &pkt, REDIRECT, &[("tunnel_decap", 1)]);
        <[u8; 6]>::try_from(&out[..6]).unwrap()
    };
    assert_eq!(deliver(&h, "the slot's pod", POD), POD_MAC);
    assert_eq!(deliver(&h, "the pod that shares its slot", twin), twin_mac, "sent with the other pod's port");

    // What the slot holds is what the program sends by: a slot written by hand with another
    // MAC for the pod is taken as it is...
    let set = |h: &mut Harness, v: SeqPodPort| h.tunnel.port_slots.as_mut().unwrap().set(pod_port_slot(be(POD)), v, 0).unwrap();
    let forged = SeqPodPort { port: PodPort { pod_mac: [0x02, 0, 0, 0, 0, 0xee], ..a }, ..held };
    set(&mut h, forged);
    assert_eq!(deliver(&h, "a slot rewritten", POD), forged.port.pod_mac, "the slot is not read");
    assert_eq!(h.tunnel.port_lookups()[&Ipv4Addr::from(POD)], "stale", "the dump must tell a slot the hash disagrees with");
    // ...but not while it is being written (odd), and never for another address.
    set(&mut h, SeqPodPort { seq: held.seq + 1, ..forged });
    assert_eq!(deliver(&h, "a slot being written", POD), POD_MAC, "a slot being written was taken");
    // A slot read half while being filled, on a CPU that reorders loads: the pod's address
    // with the empty slot's interface index.
    set(&mut h, SeqPodPort { port: PodPort { ifindex: 0, ..forged.port }, ..forged });
    assert_eq!(deliver(&h, "a slot read half", POD), POD_MAC, "a slot without an interface was taken");
    set(&mut h, SeqPodPort { seq: held.seq + 2, ..forged });
    assert_eq!(deliver(&h, "a slot of another pod", twin), twin_mac);
    set(&mut h, held);

    // The first pod gone, the other takes the slot over, and the gone pod's packets take the
    // route (none here: the stack).
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(twin), b)])).unwrap();
    assert_eq!(h.tunnel.slotted_ports(), BTreeSet::from([Ipv4Addr::from(twin)]));
    assert!(slots(&h).seq > held.seq, "a slot's sequence number must only grow: {:?} after {held:?}", slots(&h));
    assert_eq!(deliver(&h, "the slot's new pod", twin), twin_mac);
    let gone = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, POD, 53, 5000, b"answer"));
    h.expect("a pod gone", names::PROG_TUNNEL_IN, &gone, OK, &[("tunnel_decap", 1)]);
    h.tunnel.sync_ports(&BTreeMap::new()).unwrap();
    assert!(h.tunnel.slotted_ports().is_empty());
    assert_eq!(slots(&h).addr_be, 0, "an emptied slot must name no pod");
}

/// The nodes' slots (`names::TUN_NODE_SLOTS`): the decapsulating program takes a sender for
/// the node that hosts the inner source when the sender's slot says so, for the header's
/// cluster, under a seqlock that vouches for the read; anything else goes to the trie and the
/// node table, which refuse with their reasons. The agent's sync keeps the slots to what the
/// routes say: a CIDR that moves to another peer's node is no longer taken from the old one.
#[test]
fn a_sender_is_taken_by_its_slot_only_while_the_routes_say_the_same() {
    let mut h = Harness::new();
    let routes = h.tunnel.current_routes();
    assert!(routes.iter().all(|(net, n)| h.tunnel.slotted(*net, n)), "every route's node has its slot: {routes:?}");
    let inner = |src: [u8; 4]| udp(src, POD, 53, 5000, b"answer");
    let take = |h: &Harness, what: &str, sender: [u8; 4], src: [u8; 4]| {
        h.expect(what, names::PROG_TUNNEL_IN, &tunnel_packet(sender, PORT, good_header(), &inner(src)), OK, &[("tunnel_decap", 1)]);
    };
    let refuse = |h: &Harness, what: &str, sender: [u8; 4], src: [u8; 4], why: &str| {
        h.expect(what, names::PROG_TUNNEL_IN, &tunnel_packet(sender, PORT, good_header(), &inner(src)), SHOT, &[(why, 1)]);
    };
    take(&h, "a pod of the sender's", PEER_NODE, REMOTE);
    take(&h, "a pod of another node of the peer", PEER_NODE2, REMOTE);
    assert_eq!(h.peer_stats().rx_packets, 2, "packets taken by the slot are counted for their peer");

    // What the slot says is what the program goes by: a slot written by hand that gives the
    // node a CIDR no route holds is taken as it is (so only the agent may write it)...
    let slot = node_slot(be(PEER_NODE));
    let held: SeqNodeSlot = h.tunnel.node_slots.as_ref().unwrap().get(&slot, 0).unwrap();
    assert!(held.seq != 0 && held.seq & 1 == 0 && held.addr_be == be(PEER_NODE), "{held:?}");
    let forged = SeqNodeSlot { nets: [LocalNet { addr_be: be([10, 99, 0, 0]), mask_be: be([255, 255, 0, 0]) }; 4], ..held };
    let set = |h: &mut Harness, v: SeqNodeSlot| h.tunnel.node_slots.as_mut().unwrap().set(slot, v, 0).unwrap();
    set(&mut h, forged);
    take(&h, "a source the slot was given by hand", PEER_NODE, [10, 99, 0, 1]);
    assert!(!h.tunnel.slotted("10.245.0.0/24".parse().unwrap(), &routes[&"10.245.0.0/24".parse().unwrap()]), "the dump must tell a slot the routes disagree with");
    // ...but not while it is being written (odd), nor for another cluster or another sender,
    // nor with a mask of 0, which a zeroed slot holds.
    set(&mut h, SeqNodeSlot { seq: held.seq + 1, ..forged });
    refuse(&h, "a slot being written", PEER_NODE, [10, 99, 0, 1], "tunnel_spoofed_source");
    set(&mut h, SeqNodeSlot { peer_id: peer_id("cluster3"), ..forged });
    refuse(&h, "a slot of another cluster", PEER_NODE, [10, 99, 0, 1], "tunnel_spoofed_source");
    set(&mut h, SeqNodeSlot { addr_be: be(STRANGER), ..forged });
    refuse(&h, "a slot of another address", PEER_NODE, [10, 99, 0, 1], "tunnel_spoofed_source");
    refuse(&h, "from the address the slot names, a stranger", STRANGER, [10, 99, 0, 1], "tunnel_unknown_node");
    set(&mut h, SeqNodeSlot { nets: [LocalNet::default(); 4], ..held });
    refuse(&h, "a slot of zeroed CIDRs", PEER_NODE, [10, 99, 0, 1], "tunnel_spoofed_source");
    take(&h, "a slot of zeroed CIDRs, a pod the trie gives the sender", PEER_NODE, REMOTE);
    set(&mut h, held);

    // The second node's CIDR moves to a node of another tunnel peer: its slot no longer holds
    // it, and the new node's does.
    let third = [192, 0, 2, 4];
    let moved = CONFIG.replace(r#"podCIDRs: ["10.245.0.0/16"]"#, r#"podCIDRs: ["10.245.0.0/24", "10.245.2.0/24"]"#).replace(
        "      - address: 192.0.2.3\n        podCIDRs: [\"10.245.1.0/24\"]\n",
        "      - address: 192.0.2.3\n        podCIDRs: [\"10.245.2.0/24\"]\n",
    ) + "  - name: cluster3\n    mode: tunnel\n    podCIDRs: [\"10.245.1.0/24\"]\n    tunnelPort: 31801\n    nodes:\n      - address: 192.0.2.4\n        podCIDRs: [\"10.245.1.0/24\"]\n";
    let desired = Config::from_yaml(&moved).unwrap().desired();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path), (Ipv4Addr::from(third), path)]);
    let hosts = [Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))];
    h.tunnel.sync(&desired, &paths, MTU, &hosts).unwrap();
    let routes = h.tunnel.current_routes();
    assert_eq!(routes.len(), 3, "{routes:?}");
    assert!(routes.iter().all(|(net, n)| h.tunnel.slotted(*net, n)), "every route's node has its slot: {routes:?}");
    let s2: SeqNodeSlot = h.tunnel.node_slots.as_ref().unwrap().get(&node_slot(be(PEER_NODE2)), 0).unwrap();
    assert!(s2.nets.iter().all(|n| *n != LocalNet { addr_be: be([10, 245, 1, 0]), mask_be: be([255, 255, 255, 0]) }), "{s2:?}");
    refuse(&h, "a pod of a CIDR the sender lost to another peer", PEER_NODE2, REMOTE_NODE2, "tunnel_spoofed_source");
    take(&h, "a pod of the sender's new CIDR", PEER_NODE2, [10, 245, 2, 20]);
    let cluster3 = header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster3"));
    h.expect("the CIDR from its new node", names::PROG_TUNNEL_IN, &tunnel_packet(third, PORT, cluster3, &inner(REMOTE_NODE2)), OK, &[("tunnel_decap", 1)]);

    // No tunnel peer left: every slot is emptied.
    let none = Config::from_yaml(&CONFIG[..CONFIG.find("peers:").unwrap()]).unwrap().desired();
    h.tunnel.sync(&none, &BTreeMap::new(), MTU, &hosts).unwrap();
    for a in [PEER_NODE, PEER_NODE2, third] {
        let v: SeqNodeSlot = h.tunnel.node_slots.as_ref().unwrap().get(&node_slot(be(a)), 0).unwrap();
        assert_eq!(SeqNodeSlot { seq: 0, ..v }, SeqNodeSlot::EMPTY, "{a:?}");
        assert_eq!(v.seq & 1, 0);
    }
}

/// Slots an earlier agent left behind, a crashed one's half-written slot among them, are
/// read before anything is written: a slot that holds another port than the pod's now, or
/// a pod gone, is emptied, and a slot's sequence number goes on from where it was. A pod
/// whose port changes has its slot emptied and then written again, never rewritten in place.
#[test]
fn slots_left_by_an_earlier_agent_are_put_right_before_they_are_trusted() {
    let mut h = Harness::new();
    let gone = [10, 244, 0, 11];
    let a = PodPort { ifindex: 7, pod_mac: POD_MAC, host_mac: HOST_MAC };
    let stale = SeqPodPort { seq: 1000, addr_be: be(POD), port: PodPort { ifindex: 99, pod_mac: [0x02, 0, 0, 0, 0, 0xee], host_mac: HOST_MAC } };
    let half = SeqPodPort { seq: 2001, addr_be: be(gone), port: stale.port };
    let slot = |h: &Harness, addr: [u8; 4]| h.tunnel.port_slots.as_ref().unwrap().get(&pod_port_slot(be(addr)), 0).unwrap();
    for v in [stale, half] {
        h.tunnel.port_slots.as_mut().unwrap().set(pod_port_slot(v.addr_be), v, 0).unwrap();
    }
    let deliver = |h: &Harness, what: &str| {
        let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, POD, 53, 5000, b"answer"));
        let out = h.expect(what, names::PROG_TUNNEL_IN, &pkt, REDIRECT, &[("tunnel_decap", 1)]);
        <[u8; 6]>::try_from(&out[..6]).unwrap()
    };
    assert_eq!(deliver(&h, "a stale slot"), stale.port.pod_mac, "the program does not read the slot");

    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), a)])).unwrap();
    let now = slot(&h, POD);
    assert_eq!((now.addr_be, now.port), (be(POD), a), "{now:?}");
    assert!(now.seq > stale.seq && now.seq & 1 == 0, "{now:?} after {stale:?}");
    let emptied = slot(&h, gone);
    assert!(emptied.addr_be == 0 && emptied.port == PodPort::default() && emptied.seq > half.seq && emptied.seq & 1 == 0, "{emptied:?}");
    assert_eq!(deliver(&h, "the slot put right"), POD_MAC);
    assert_eq!(h.tunnel.slotted_ports(), BTreeSet::from([Ipv4Addr::from(POD)]));

    // The pod's interface replaced (a new ifindex and MAC, the same address).
    let moved = PodPort { ifindex: 9, pod_mac: [0x02, 0, 0, 0, 0, 0x0c], host_mac: HOST_MAC };
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), moved)])).unwrap();
    let again = slot(&h, POD);
    assert_eq!((again.port, again.seq), (moved, now.seq + 4), "emptied (its number up by 2), then written (up by 2 again): {again:?}");
    assert_eq!(deliver(&h, "the pod's new interface"), moved.pod_mac);
}

/// A broadcast or multicast frame to the tunnel port is dropped and counted. One to another
/// host's MAC (a switch flooding it, a promiscuous uplink) is decapsulated but handed to the
/// stack, which drops it unless a bridge or macvlan above the uplink owns the MAC: never
/// redirected to the pod it names, and counted as another host's. A frame of another host's
/// to any other port is not meshnet's, and passes.
#[test]
fn a_tunnel_frame_not_addressed_to_this_host_is_never_redirected() {
    // `delivery: redirect` (the default), with the pod in the port table.
    let mut h = Harness::new();
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), PodPort { ifindex: 7, pod_mac: POD_MAC, host_mac: HOST_MAC })])).unwrap();
    let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, POD, 53, 5000, b"answer"));
    let to = |mac: [u8; 6]| [&mac[..], &pkt[6..]].concat();
    for (what, mac) in [("broadcast", [0xff; 6]), ("multicast", [0x01, 0, 0x5e, 0, 0, 1])] {
        h.expect(what, names::PROG_TUNNEL_IN, &to(mac), SHOT, &[("tunnel_not_for_node", 1)]);
    }
    let out = h.expect("another host's", names::PROG_TUNNEL_IN, &to(HOST_MAC), OK, &[("tunnel_not_for_node", 1)]);
    assert_eq!(out[..6], HOST_MAC, "the frame's destination is left as it came");
    assert_eq!(out.len(), pkt.len() - tunnel::OVERHEAD as usize, "decapsulated for the stack");
    // Refused by a check, it is counted as another host's all the same: flooded frames for
    // other nodes are no attack on this one.
    let spoofed = tunnel_packet(STRANGER, PORT, good_header(), &udp(REMOTE, POD, 53, 5000, b"answer"));
    h.expect("another host's, refused", names::PROG_TUNNEL_IN, &[&HOST_MAC[..], &spoofed[6..]].concat(), SHOT, &[("tunnel_not_for_node", 1)]);
    let other_port = tunnel_packet(PEER_NODE, PORT + 1, good_header(), &udp(REMOTE, POD, 53, 5000, b"answer"));
    let other_port = [&HOST_MAC[..], &other_port[6..]].concat();
    let before = h.counters();
    assert_eq!(h.run(names::PROG_TUNNEL_IN, &other_port), (UNSPEC, other_port.clone()), "another host's frame to another port");
    assert_counter_delta("another port", &before, &h.counters(), &[]);
    h.expect("this host's", names::PROG_TUNNEL_IN, &pkt, REDIRECT, &[("tunnel_decap", 1)]);
}

/// An address on the uplink's subnet other than the node's: the node routes packets to it on.
const BEYOND: [u8; 4] = [192, 0, 2, 50];

/// A packet to the tunnel port that this node routes on to another host (a pod of a routed
/// pod network, a host behind a node that is also a router) is not this node's to refuse:
/// whatever it carries, it passes untouched and uncounted, as without meshnet, also when it
/// exceeds the next link's MTU. The same packet is refused and counted as before when it
/// goes to the node itself, to a destination the node would not route on (a blackhole), to
/// a tunnel peer's node (which would take a forgery in this cluster's name from it), to a
/// multicast or the limited broadcast address, or in through an interface that does not
/// forward (a TEST_RUN's packet comes in on `lo`).
#[test]
fn a_tunnel_port_packet_the_node_routes_on_is_not_its_to_refuse() {
    let h = Harness::new();
    const BLACKHOLE: [u8; 4] = [198, 51, 100, 7];
    h.ns.ip("route add blackhole 198.51.100.0/24");
    let inner = udp(REMOTE, POD, 53, 5000, b"answer");
    let not_meshnets = |dst: [u8; 4]| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(PEER_MAC, RX_MAC).ipv4(PEER_NODE, dst, 64).udp(40_000, PORT).write(&mut out, b"an application's own datagram").unwrap();
        out
    };
    type Make<'a> = Box<dyn Fn([u8; 4]) -> Vec<u8> + 'a>;
    let cases: [(&str, Make, &str); 5] = [
        ("from an unknown node", Box::new(|d| tunnel_packet_to(STRANGER, d, PORT, good_header(), &inner)), "tunnel_unknown_node"),
        ("with a bad magic", Box::new(|d| tunnel_packet_to(PEER_NODE, d, PORT, header(0x5858, tunnel::VERSION, peer_id("cluster2")), &inner)), "tunnel_bad_header"),
        ("naming another cluster", Box::new(|d| tunnel_packet_to(PEER_NODE, d, PORT, header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster3")), &inner)), "tunnel_wrong_cluster"),
        (
            "for another node's pod",
            Box::new(|d| tunnel_packet_to(PEER_NODE, d, PORT, good_header(), &udp(REMOTE, OTHER_NODE_POD, 53, 5000, b"answer"))),
            "tunnel_not_local",
        ),
        ("not meshnet's at all", Box::new(not_meshnets), "tunnel_bad_header"),
    ];
    let passes = |what: &str, pkt: &[u8]| {
        let before = h.counters();
        assert_eq!(h.run(names::PROG_TUNNEL_IN, pkt), (UNSPEC, pkt.to_vec()), "{what}: must pass untouched");
        assert_counter_delta(what, &before, &h.counters(), &[]);
    };
    for (what, make, why) in &cases {
        passes(&format!("{what}, routed on"), &make(BEYOND));
        for (to, dst) in [("the node", NODE), ("a blackhole", BLACKHOLE), ("a peer's node", PEER_NODE2), ("a multicast group", [224, 0, 0, 1]), ("everyone", [255; 4])] {
            h.expect(&format!("{what}, to {to}"), names::PROG_TUNNEL_IN, &make(dst), SHOT, &[(why, 1)]);
        }
    }
    let large = tunnel_packet_to(STRANGER, BEYOND, PORT, good_header(), &udp(REMOTE, POD, 53, 5000, &[0x5a; 1600]));
    passes("larger than the next link's MTU, routed on", &large);
    // A well-formed one is taken whatever its outer destination: every check vouches for it.
    h.expect("well-formed, routed on", names::PROG_TUNNEL_IN, &tunnel_packet_to(PEER_NODE, BEYOND, PORT, good_header(), &inner), OK, &[("tunnel_decap", 1)]);

    h.ns.exec("sysctl -qw net.ipv4.conf.lo.forwarding=0");
    for (what, make, why) in &cases {
        h.expect(&format!("{what}, forwarding off"), names::PROG_TUNNEL_IN, &make(BEYOND), SHOT, &[(why, 1)]);
    }
}

#[test]
fn every_rejected_tunnel_packet_is_dropped_and_counted_by_its_reason() {
    let h = Harness::new();
    let inner = udp(REMOTE, POD, 53, 5000, b"answer");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unknown node", tunnel_packet(STRANGER, PORT, good_header(), &inner), "tunnel_unknown_node"),
        ("unknown node, bad magic", tunnel_packet(STRANGER, PORT, header(0x4d4f, tunnel::VERSION, peer_id("cluster2")), &inner), "tunnel_unknown_node"),
        // The route of the inner source names the sender and its cluster; a sender that
        // matches it with a header of another cluster, or another node of the peer with one,
        // is refused for the header's cluster.
        ("another node of the peer, wrong cluster", tunnel_packet(PEER_NODE2, PORT, header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster3")), &inner), "tunnel_wrong_cluster"),
        ("bad magic", tunnel_packet(PEER_NODE, PORT, header(0x4d4f, tunnel::VERSION, peer_id("cluster2")), &inner), "tunnel_bad_header"),
        ("bad version", tunnel_packet(PEER_NODE, PORT, header(tunnel::MAGIC, 2, peer_id("cluster2")), &inner), "tunnel_bad_header"),
        ("wrong cluster", tunnel_packet(PEER_NODE, PORT, header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster3")), &inner), "tunnel_wrong_cluster"),
        ("own cluster", tunnel_packet(PEER_NODE, PORT, header(tunnel::MAGIC, tunnel::VERSION, peer_id("cluster1")), &inner), "tunnel_wrong_cluster"),
        ("spoofed source", tunnel_packet(PEER_NODE, PORT, good_header(), &udp([10, 99, 0, 1], POD, 53, 5000, b"x")), "tunnel_spoofed_source"),
        ("source of this cluster", tunnel_packet(PEER_NODE, PORT, good_header(), &udp(OTHER_NODE_POD, POD, 53, 5000, b"x")), "tunnel_spoofed_source"),
        ("to another node's pod", tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, OTHER_NODE_POD, 53, 5000, b"x")), "tunnel_not_local"),
        ("to the node itself", tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, NODE, 53, 5000, b"x")), "tunnel_not_local"),
        ("to the node's bridge address", tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, BRIDGE, 53, 5000, b"x")), "tunnel_not_local"),
        ("to the pod CIDR's network address", tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, [10, 244, 0, 0], 53, 5000, b"x")), "tunnel_not_local"),
        ("to the pod CIDR's broadcast address", tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, [10, 244, 0, 255], 53, 5000, b"x")), "tunnel_not_local"),
        ("to a third party", tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, [8, 8, 8, 8], 53, 53, b"x")), "tunnel_not_local"),
    ];
    for (what, pkt, counter) in &cases {
        h.expect(what, names::PROG_TUNNEL_IN, pkt, SHOT, &[(counter, 1)]);
    }
    // Lengths that disagree: a longer outer packet (trailing bytes smuggled after the inner
    // one), and an inner packet claiming more than is there.
    let mut longer = tunnel_packet(PEER_NODE, PORT, good_header(), &inner);
    longer.extend_from_slice(b"junk");
    fix_outer_lengths(&mut longer);
    h.expect("outer longer than inner", names::PROG_TUNNEL_IN, &longer, SHOT, &[("tunnel_bad_header", 1)]);
    let mut claims = tunnel_packet(PEER_NODE, PORT, good_header(), &inner);
    let at = ETH_HLEN + tunnel::OVERHEAD as usize + 2;
    let l = u16::from_be_bytes([claims[at], claims[at + 1]]) + 4;
    claims[at..at + 2].copy_from_slice(&l.to_be_bytes());
    h.expect("inner longer than sent", names::PROG_TUNNEL_IN, &claims, SHOT, &[("tunnel_bad_header", 1)]);
    // An outer header whose checksum is wrong, which `ip_rcv` would drop after the uplink
    // program: the right packet with one bit of its checksum flipped.
    let mut corrupt = tunnel_packet(PEER_NODE, PORT, good_header(), &inner);
    corrupt[ETH_HLEN + 11] ^= 1;
    h.expect("outer checksum wrong", names::PROG_TUNNEL_IN, &corrupt, SHOT, &[("tunnel_bad_header", 1)]);
    assert_eq!(h.peer_stats().rx_packets, 0, "nothing rejected was counted as received");
}

/// Without `tunnel.podCIDRs` or the Node's, the tunnel takes the cluster's podCIDRs, which
/// hold every node's pods and bridge addresses, and a bridge broadcast that is not the wide
/// CIDR's: they are narrowed to the subnets of this node's bridges that hold its pods, so
/// that only its own pods get packets, never another node's pods or hosts through it, nor
/// its own sockets a broadcast. A subnet that holds no pod of the node narrows nothing.
#[test]
fn without_this_nodes_pod_cidrs_the_tunnel_delivers_only_behind_its_bridges() {
    let config = CONFIG.replace("  podCIDRs: [\"10.244.0.0/24\"]\n", "");
    assert!(!config.contains("10.244.0.0/24"));
    let mut h = Harness::with_config(&config);
    let desired = Config::from_yaml(&config).unwrap().desired();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path)]);
    let other_bridge = [10, 244, 1, 1];
    // This node's pod, read from its interface: delivered out of its own port.
    let port = PodPort { ifindex: 7, pod_mac: POD_MAC, host_mac: HOST_MAC };
    h.tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), port)])).unwrap();
    let cases = |h: &Harness, narrowed: bool| {
        let refused = if narrowed { Some("tunnel_not_local") } else { None };
        let pod = udp(REMOTE, POD, 53, 5000, b"x");
        h.expect("this node's pod", names::PROG_TUNNEL_IN, &tunnel_packet(PEER_NODE, PORT, good_header(), &pod), REDIRECT, &[("tunnel_decap", 1)]);
        for (what, dst, refused) in [
            ("another node's pod", OTHER_NODE_POD, refused),
            ("another node's bridge address", other_bridge, refused),
            ("this node's bridge broadcast", [10, 244, 0, 255], refused),
        ] {
            let pkt = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, dst, 53, 5000, b"x"));
            match refused {
                Some(counter) => drop(h.expect(what, names::PROG_TUNNEL_IN, &pkt, SHOT, &[(counter, 1)])),
                None => drop(h.expect(what, names::PROG_TUNNEL_IN, &pkt, OK, &[("tunnel_decap", 1)])),
            }
        }
    };
    // The bridge known only as an address: the whole cluster CIDR is delivered to.
    cases(&h, false);
    // With its subnet, as the node's interfaces give it: only what lies behind the bridge.
    let hosts: [Ipv4Net; 2] = ["10.244.0.1/24".parse().unwrap(), "192.0.2.1/24".parse().unwrap()];
    assert!(h.tunnel.sync(&desired, &paths, MTU, &hosts).unwrap().config_changed);
    cases(&h, true);
    // A subnet inside that holds none of the node's pods (docker0's, a LAN's) narrows nothing,
    // nor does a host route's address (Calico's tunl0 has a /32).
    let hosts: [Ipv4Net; 3] = ["10.244.0.1/32".parse().unwrap(), "10.244.200.1/24".parse().unwrap(), "192.0.2.1/24".parse().unwrap()];
    assert!(h.tunnel.sync(&desired, &paths, MTU, &hosts).unwrap().config_changed);
    cases(&h, false);
}

/// Makes the outer IPv4 and UDP lengths (and the IPv4 checksum) cover the whole frame.
fn fix_outer_lengths(frame: &mut [u8]) {
    let ip_len = (frame.len() - ETH_HLEN) as u16;
    frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&ip_len.to_be_bytes());
    frame[ETH_HLEN + 20 + 4..ETH_HLEN + 20 + 6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    let mut ip = Ipv4HeaderSlice::from_slice(&frame[ETH_HLEN..]).unwrap().to_header();
    ip.header_checksum = ip.calc_header_checksum();
    frame[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ip.to_bytes());
}

#[test]
fn traffic_not_for_the_tunnel_port_passes_untouched() {
    let h = Harness::new();
    let inner = udp(REMOTE, POD, 53, 5000, b"answer");
    for (what, pkt) in [
        ("another UDP port", tunnel_packet(PEER_NODE, PORT + 1, good_header(), &inner)),
        ("the peer's port, not ours", tunnel_packet(PEER_NODE, PEER_PORT, good_header(), &inner)),
        ("plain UDP from the LAN", udp(PEER_NODE, NODE, 40000, 53, b"dns")),
        ("TCP to the tunnel port number", {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(PEER_MAC, HOST_MAC).ipv4(PEER_NODE, NODE, 64).tcp(40000, PORT, 1, 1000).write(&mut out, b"x").unwrap();
            out
        }),
    ] {
        let before = h.counters();
        let (v, out) = h.run(names::PROG_TUNNEL_IN, &pkt);
        assert_eq!(v, UNSPEC, "{what}: {}", verdict_name(v));
        assert_bytes_eq(what, &out, &pkt);
        assert_counter_delta(what, &before, &h.counters(), &[]);
    }
}

/// The uplink program takes UDP only to the port the agent publishes beside the settings
/// (`names::TUN_FAST`), so that the node's other UDP traffic costs no hash lookup. A port
/// change moves it, removing the settings clears it, and while a published port is not the
/// settings' (a change half done) the program takes no packet to the settings' port, and
/// drops, counted, what comes to the published one (meshnet's either way, which the stack
/// would answer from a closed port).
#[test]
fn the_uplink_takes_only_the_port_published_with_the_settings() {
    use meshnet::explain::{explain_decap, Proto, Query, Snapshot, Verdict};
    let mut h = Harness::new();
    assert_eq!(h.tunnel.taken_port(), Some(PORT));
    let explained = |h: &Harness| {
        let snap = Snapshot::of_maps(&h._maps, 65_536, Ipv4Addr::from(POD)).unwrap().with_tunnel(&h.tunnel);
        let q = Query { src: format!("{}:53", Ipv4Addr::from(REMOTE)).parse().unwrap(), dst: format!("{}:5000", Ipv4Addr::from(POD)).parse().unwrap(), proto: Proto::Udp };
        explain_decap(&snap, Ipv4Addr::from(PEER_NODE), &q).verdict
    };
    assert_eq!(explained(&h), Verdict::TunnelDeliver);
    let inner = udp(REMOTE, POD, 53, 5000, b"answer");
    let to = |port| tunnel_packet(PEER_NODE, port, good_header(), &inner);
    let passes = |h: &Harness, what: &str, pkt: &[u8]| {
        let before = h.counters();
        assert_eq!(h.run(names::PROG_TUNNEL_IN, pkt), (UNSPEC, pkt.to_vec()), "{what}");
        assert_counter_delta(what, &before, &h.counters(), &[]);
    };
    h.expect("the tunnel port", names::PROG_TUNNEL_IN, &to(PORT), OK, &[("tunnel_decap", 1)]);

    // The port moves: the old one is any other UDP port now.
    const MOVED: u16 = 31900;
    let mut desired = Config::from_yaml(CONFIG).unwrap().desired();
    desired.tun_config = desired.tun_config.map(|c| meshnet_common::TunnelConfig { port_be: MOVED.to_be(), ..c });
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let paths = BTreeMap::from([(Ipv4Addr::from(PEER_NODE), path), (Ipv4Addr::from(PEER_NODE2), path)]);
    let hosts = [Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))];
    let report = h.tunnel.sync(&desired, &paths, MTU, &hosts).unwrap();
    assert!(report.config_changed && report.fast_written, "{report:?}");
    assert_eq!(h.tunnel.taken_port(), Some(MOVED));
    passes(&h, "the old port", &to(PORT));
    h.expect("the new port", names::PROG_TUNNEL_IN, &to(MOVED), OK, &[("tunnel_decap", 1)]);

    // Published and set ports disagree, or none is published yet (a fresh map, as after an
    // upgrade from pins without it, before the first sync): nothing is taken, and explain
    // says the same; the next sync puts only the port right.
    for published in [PORT, 0] {
        h.tunnel.fast.as_mut().unwrap().set(tun_fast::PORT, u32::from(published.to_be()), 0).unwrap();
        if published == 0 {
            passes(&h, &format!("published {published}: to {PORT}"), &to(PORT));
        } else {
            h.expect(&format!("published {published}: to {PORT}"), names::PROG_TUNNEL_IN, &to(PORT), SHOT, &[("tunnel_port_changing", 1)]);
            let routed_on = tunnel_packet_to(PEER_NODE, BEYOND, PORT, good_header(), &inner);
            passes(&h, &format!("published {published}: to {PORT}, routed on to another host"), &routed_on);
        }
        passes(&h, &format!("published {published}: to the settings' {MOVED}"), &to(MOVED));
        assert_eq!(explained(&h), Verdict::PassNotMeshnet, "published {published}");
        let report = h.tunnel.sync(&desired, &paths, MTU, &hosts).unwrap();
        assert!(!report.config_changed && report.fast_written, "published {published}: only the port is put right: {report:?}");
        assert_eq!(h.tunnel.taken_port(), Some(MOVED));
        h.expect("put right", names::PROG_TUNNEL_IN, &to(MOVED), OK, &[("tunnel_decap", 1)]);
        assert_eq!(explained(&h), Verdict::TunnelDeliver);
    }
    assert!(h.tunnel.sync(&desired, &paths, MTU, &hosts).unwrap().is_noop(), "nothing left to write");

    // No settings: no port taken.
    h.tunnel.sync(&meshnet::config::Desired::default(), &BTreeMap::new(), MTU, &[]).unwrap();
    assert_eq!((h.tunnel.taken_port(), h.tunnel.current_config()), (Some(0), None));
    passes(&h, "no settings", &to(MOVED));
}

#[test]
fn no_truncation_of_a_tunnel_packet_is_delivered_or_crashes_the_program() {
    let h = Harness::new();
    let full = tunnel_packet(PEER_NODE, PORT, good_header(), &udp(REMOTE, POD, 53, 5000, b"answer"));
    let mut ran = 0;
    for len in 0..full.len() {
        let mut pkt = full[..len].to_vec();
        if len >= ETH_HLEN + 28 {
            // Lengths consistent with what is left, so that every check past the first is
            // reached with too little packet.
            fix_outer_lengths(&mut pkt);
        }
        let Ok((v, _)) = h.try_run(names::PROG_TUNNEL_IN, &pkt) else {
            // The kernel refuses frames too short for their Ethernet and IPv4 headers before any
            // program runs.
            assert!(h.try_run(names::PROG_EMPTY, &pkt).is_err(), "{len} bytes refused for meshnet's program only");
            continue;
        };
        ran += 1;
        assert!(v == UNSPEC || v == SHOT, "{len} bytes: {}", verdict_name(v));
    }
    assert!(ran >= full.len() - (ETH_HLEN + 20), "only {ran} of {} truncations ran", full.len());
    assert_eq!(h.counters()["tunnel_decap"], 0, "a truncated packet was delivered");
    assert!(h.counters()["tunnel_bad_header"] > 0, "the truncations reached the header checks");
}

fn be(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}


/// `meshnet explain` against the programs themselves, for tunnel packets both ways: every
/// combination of sender, source, destination and protocol, with the verdict and the
/// counters each side names.
#[test]
fn explain_says_what_the_programs_do() {
    use meshnet::explain::{explain, explain_decap, Proto, Query, Snapshot, Verdict};
    let h = Harness::new();
    let snap = Snapshot::of_maps(&h._maps, 65_536, Ipv4Addr::from(POD)).unwrap().with_tunnel(&h.tunnel);
    let addrs = [POD, OTHER_NODE_POD, REMOTE, REMOTE_NODE2, [10, 245, 9, 9], [10, 99, 0, 1], NODE, BRIDGE, [10, 244, 0, 255]];
    let mut seen = BTreeMap::<String, u32>::new();
    for dst in addrs {
        for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
            let q = Query { src: format!("{}:40000", Ipv4Addr::from(POD)).parse().unwrap(), dst: format!("{}:8080", Ipv4Addr::from(dst)).parse().unwrap(), proto };
            let pkt = match proto {
                Proto::Tcp => tcp_syn(POD, dst, 1200),
                Proto::Udp => udp(POD, dst, 40000, 8080, b"x"),
                Proto::Icmp => ping(POD, dst),
            };
            let ex = explain(&snap, &q);
            if !matches!(ex.verdict, Verdict::TunnelEncap | Verdict::PassNotMeshnet | Verdict::DropUnsupportedProto) {
                continue;
            }
            let counters: Vec<(&str, u64)> = ex.counters.iter().map(|c| (*c, 1)).collect();
            let want = match ex.verdict {
                Verdict::TunnelEncap => REDIRECT,
                _ => UNSPEC,
            };
            h.expect(&format!("from_pod {q:?}: {}", ex.text()), names::PROG_FROM_POD, &pkt, want, &counters);
            *seen.entry(format!("{:?}", ex.verdict)).or_default() += 1;
        }
    }
    for from in [PEER_NODE, PEER_NODE2, STRANGER] {
        for src in addrs {
            for dst in addrs {
                let q = Query { src: format!("{}:53", Ipv4Addr::from(src)).parse().unwrap(), dst: format!("{}:5000", Ipv4Addr::from(dst)).parse().unwrap(), proto: Proto::Udp };
                let ex = explain_decap(&snap, Ipv4Addr::from(from), &q);
                let pkt = tunnel_packet(from, PORT, good_header(), &udp(src, dst, 53, 5000, b"x"));
                let want = if ex.verdict == Verdict::TunnelDeliver { OK } else { SHOT };
                let counters: Vec<(&str, u64)> = ex.counters.iter().map(|c| (*c, 1)).collect();
                h.expect(&format!("tun_in from {from:?} {q:?}: {}", ex.text()), names::PROG_TUNNEL_IN, &pkt, want, &counters);
                *seen.entry(format!("decap {:?} {:?}", ex.verdict, ex.counters)).or_default() += 1;
            }
        }
    }
    // Every outcome was met, so that the comparison covered each.
    for v in ["TunnelEncap", "PassNotMeshnet", "decap TunnelDeliver [\"tunnel_decap\"]", "decap TunnelDrop [\"tunnel_unknown_node\"]", "decap TunnelDrop [\"tunnel_spoofed_source\"]", "decap TunnelDrop [\"tunnel_not_local\"]"] {
        assert!(seen.contains_key(v), "never met {v}: {seen:?}");
    }
}

/// Full tunnel tables are replaced whole, all of their entries different the next time: the
/// routes and nodes that go make room where the new ones do not fit beside them. The tables
/// made smaller than the agent's, the same code at a size a VM fills in seconds.
#[test]
fn full_tunnel_tables_are_replaced_whole() {
    const MAX_TUNNEL_NODES: u32 = 512;
    const MAX_TUNNEL_ROUTES: u32 = 4 * MAX_TUNNEL_NODES;
    let mut h = Harness::sized(CONFIG, &[(names::TUN_NODES, MAX_TUNNEL_NODES), (names::TUN_ROUTES, MAX_TUNNEL_ROUTES)]);
    let template = Config::from_yaml(CONFIG).unwrap().desired();
    let node = *template.tun_routes.values().next().unwrap();
    let path = NodePath { src: Ipv4Addr::from(NODE), ifindex: h.uplink, mtu: MTU };
    let per_node = MAX_TUNNEL_ROUTES / MAX_TUNNEL_NODES;
    let many = |base: u32| {
        let mut d = template.clone();
        d.tun_nodes.clear();
        d.tun_routes.clear();
        let mut paths = BTreeMap::new();
        for n in 0..MAX_TUNNEL_NODES {
            let addr = Ipv4Addr::from(base + n);
            d.tun_nodes.insert(addr, node.peer_id);
            paths.insert(addr, path);
            for c in 0..per_node {
                let net = ipnet::Ipv4Net::new(Ipv4Addr::from(base + 0x0100_0000 + n * per_node + c), 32).unwrap();
                d.tun_routes.insert(net, meshnet_common::TunnelNode { addr_be: u32::from_ne_bytes(addr.octets()), ..node });
            }
        }
        (d, paths)
    };
    let hosts = [Ipv4Net::from(Ipv4Addr::from(BRIDGE)), Ipv4Net::from(Ipv4Addr::from(NODE))];
    let (first, paths) = many(0x6400_0000);
    h.tunnel.sync(&first, &paths, MTU, &hosts).unwrap();
    assert_eq!((h.tunnel.current_nodes().len(), h.tunnel.current_routes().len()), (MAX_TUNNEL_NODES as usize, MAX_TUNNEL_ROUTES as usize));
    let (second, paths) = many(0x6600_0000);
    let report = h.tunnel.sync(&second, &paths, MTU, &hosts).unwrap();
    assert_eq!((report.nodes_removed, report.routes_removed), (MAX_TUNNEL_NODES as usize, MAX_TUNNEL_ROUTES as usize), "{report:?}");
    assert_eq!(h.tunnel.current_nodes(), second.tun_nodes);
    assert_eq!(h.tunnel.current_routes().keys().collect::<Vec<_>>(), second.tun_routes.keys().collect::<Vec<_>>());
    // Every route's value changes (the path's MTU) in the full trie: before Linux 6.14 a full
    // trie refuses even a key it holds.
    let lower: BTreeMap<_, _> = paths.keys().map(|a| (*a, NodePath { mtu: MTU - 100, ..path })).collect();
    let report = h.tunnel.sync(&second, &lower, MTU, &hosts).unwrap();
    assert_eq!(report.routes_written, MAX_TUNNEL_ROUTES as usize, "{report:?}");
    assert!(h.tunnel.current_routes().values().all(|n| n.mtu == MTU - 100));
}
