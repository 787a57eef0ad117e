//! Packet-level tests of meshnet's tc programs through `BPF_PROG_TEST_RUN`.
//!
//! Every test loads its own copy of the embedded object (maps belong to one load), fills
//! the control maps from a config exactly as the agent does, and runs hand-built Ethernet
//! frames through `meshnet_from_pod` (what a pod sends) and `meshnet_to_pod` (what it
//! receives).
//!
//! Expected outputs are built independently with etherparse, which computes its own IPv4
//! header and TCP/UDP checksums: a translated frame must equal, byte for byte, the frame a
//! correct sender would have built with the translated addresses and ports. On top of that,
//! every translated frame's checksums are verified against etherparse's calculation, and
//! every run checks exactly which counters moved (all others must stay put).
//!
//! Needs root (loading eBPF): `cargo test -p meshnet-tests --test packets`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::{
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions},
    sys::SyscallError,
    util::KernelVersion,
    Ebpf,
};
use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv4HeaderSlice, PacketBuilder, TcpHeader,
    TcpHeaderSlice, TcpOptionElement, UdpHeaderSlice,
};
use meshnet_tests::testrun::{assert_bytes_eq, assert_counter_delta, verdict_name, REDIRECT};
use meshnet::{
    config::{peer_id, Config},
    datapath::{self, Datapath, EBPF_OBJECT},
    maps::{self, ControlMaps, Stats},
};
use meshnet_common::{
    gateway_start,
    limits::{REMAP_PORT_MIN, REMAP_PORT_SPAN},
    names, remap_port, FlowKey, NatFwd, NatRev, FLOW_FIN_PEER, FLOW_FIN_POD, FLOW_REMAPPED, FLOW_RST, FLOW_UNANSWERED,
    GW_UP, IPPROTO_TCP, IPPROTO_UDP,
};

// ---------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------

/// `TC_ACT_OK`: meshnet translated the packet.
const OK: u32 = 0;
/// `TC_ACT_SHOT`: meshnet dropped the packet.
const SHOT: u32 = 2;
/// `TC_ACT_UNSPEC` (-1): not meshnet's; the packet goes on unchanged.
const UNSPEC: u32 = u32::MAX;

const FROM_POD: &str = names::PROG_FROM_POD;
const TO_POD: &str = names::PROG_TO_POD;

const ETH_HLEN: usize = 14;
const POD_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0a];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// A pod of this cluster (10.244.0.0/16).
const POD: [u8; 4] = [10, 244, 0, 10];
/// Another pod of this cluster.
const LOCAL_POD: [u8; 4] = [10, 244, 0, 20];
/// Pods of cluster2 (10.245.0.0/16).
const REMOTE: [u8; 4] = [10, 245, 0, 20];
const REMOTE2: [u8; 4] = [10, 245, 0, 21];
/// In no configured CIDR at all.
const ELSEWHERE: [u8; 4] = [198, 51, 100, 7];
/// cluster2's east-west gateway nodes and their `NodePort`s.
const GW: [u8; 4] = [192, 0, 2, 2];
const GW2: [u8; 4] = [192, 0, 2, 3];
const GW_TCP: u16 = 31674;
const GW_UDP: u16 = 31675;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n";

const CONFIG: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
peers:
  - name: cluster2
    podCIDRs: ["10.245.0.0/16"]
    gateways:
      - address: 192.0.2.2
        port: 31674
        udpPort: 31675
"#;

/// [`CONFIG`] with a second gateway (appended to the last list in the file).
fn two_gateways() -> String {
    format!("{CONFIG}      - address: 192.0.2.3\n        port: 31674\n        udpPort: 31675\n")
}

/// [`CONFIG`] without a UDP `NodePort`.
fn without_udp_port() -> String {
    let c = CONFIG.replace("        udpPort: 31675\n", "");
    assert!(!c.contains("udpPort"));
    c
}

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// Which way the programs fix L4 checksums (see `meshnet::ip_summed`).
#[derive(Debug, Clone, Copy)]
enum Csum {
    AsTheAgent,
    Helper,
}

/// Tests of checksum arithmetic run both ways: the kernel the suite runs on decides what
/// `AsTheAgent` is, and the helper path must stay right on every kernel that has the read.
const BOTH: [Csum; 2] = [Csum::AsTheAgent, Csum::Helper];

/// One freshly loaded object with its control maps filled from a config.
struct Harness {
    ebpf: Ebpf,
    maps: ControlMaps,
    stats: Stats,
}

impl Harness {
    fn new(yaml: &str) -> Self {
        Self::build(yaml, None, Csum::AsTheAgent)
    }

    /// With some maps sized as given (see `Datapath::load_unpinned_resized`).
    fn resized(yaml: &str, sizes: &[(&str, u32)]) -> Self {
        Self::build_sized(yaml, None, Csum::AsTheAgent, sizes)
    }

    /// With flow maps of `max_flows` entries (below what the config allows), to fill them.
    fn with_max_flows(yaml: &str, max_flows: Option<u32>) -> Self {
        Self::build(yaml, max_flows, Csum::AsTheAgent)
    }

    /// With the object the agent would load here (reading the skb's checksum state where
    /// the kernel allows it, and then failing should the kernel refuse it: the agent's
    /// fallback would hide that), or with the one every kernel before 6.2 runs.
    fn build(yaml: &str, max_flows: Option<u32>, csum: Csum) -> Self {
        Self::build_sized(yaml, max_flows, csum, &[])
    }

    fn build_sized(yaml: &str, max_flows: Option<u32>, csum: Csum, sizes: &[(&str, u32)]) -> Self {
        meshnet_tests::require_root();
        let config = Config::from_yaml(yaml).unwrap();
        let layout = match csum {
            Csum::AsTheAgent => datapath::skb_layout(),
            Csum::Helper => None,
        };
        let (object, _) = datapath::prepare_object(EBPF_OBJECT, layout.as_ref()).unwrap();
        let mut ebpf = Datapath::load_unpinned_resized(max_flows.unwrap_or(config.max_flows), &object, sizes).unwrap();
        let mut maps = ControlMaps::from_ebpf(&mut ebpf).unwrap();
        maps.sync(&config.desired()).unwrap();
        let stats = maps::take_stats(&mut ebpf).unwrap();
        Self { ebpf, maps, stats }
    }

    /// Runs `prog` once on `pkt`: the verdict and the packet as the program left it.
    fn try_run(&self, prog: &str, pkt: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        // Room to spare: a program that grew the packet must not fail with ENOSPC here.
        let mut out = vec![0u8; pkt.len() + 256];
        let r = p.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn run(&self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(prog, pkt).unwrap()
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        maps::sum_stats(&self.stats).unwrap()
    }

    fn counter(&self, name: &str) -> u64 {
        *self.counters().get(name).unwrap_or_else(|| panic!("no counter named {name:?}"))
    }

    /// Runs `pkt`, asserts the verdict and that exactly the counters in `moved` grew by the
    /// given amounts (every other counter unchanged), and returns the output packet.
    #[track_caller]
    fn expect(&self, what: &str, prog: &str, pkt: &[u8], verdict: u32, moved: &[(&str, u64)]) -> Vec<u8> {
        let before = self.counters();
        let (v, out) = self.run(prog, pkt);
        assert_eq!(v, verdict, "{what}: {prog} returned {} instead of {}", verdict_name(v), verdict_name(verdict));
        assert_counter_delta(what, &before, &self.counters(), moved);
        out
    }

    /// Like [`Harness::expect`] for packets that must pass untouched: verdict UNSPEC and the
    /// output byte-identical to the input.
    #[track_caller]
    fn expect_unchanged(&self, what: &str, prog: &str, pkt: &[u8], moved: &[(&str, u64)]) {
        let out = self.expect(what, prog, pkt, UNSPEC, moved);
        assert_bytes_eq(what, &out, pkt);
    }

    fn nat_fwd(&self) -> Vec<(FlowKey, NatFwd)> {
        let mut v: Vec<_> = self.maps.nat_fwd.iter().map(Result::unwrap).collect();
        v.sort_by_key(|(k, _)| (k.src_be, k.dst_be, k.sport_be, k.dport_be, k.proto));
        v
    }

    fn nat_rev(&self) -> Vec<(FlowKey, NatRev)> {
        let mut v: Vec<_> = self.maps.nat_rev.iter().map(Result::unwrap).collect();
        v.sort_by_key(|(k, _)| (k.src_be, k.dst_be, k.sport_be, k.dport_be, k.proto));
        v
    }

    /// Number of forward and reverse flow entries.
    fn flow_counts(&self) -> (usize, usize) {
        (self.maps.nat_fwd.keys().count(), self.maps.nat_rev.keys().count())
    }

    fn fwd_of(&self, key: &FlowKey) -> NatFwd {
        self.maps.nat_fwd.get(key, 0).unwrap()
    }

    fn rev_of(&self, key: &FlowKey) -> NatRev {
        self.maps.nat_rev.get(key, 0).unwrap()
    }

    /// Sets when each half of the TCP flow from `pod` to `remote` through `gw` was last
    /// seen: the pod's packets (`sent`) and the gateway's replies (`replied`).
    fn stamp(&mut self, pod: Ep, remote: Ep, gw: Ep, sent: u64, replied: u64) {
        let (fk, rk) = (flow_key(pod, remote, IPPROTO_TCP), flow_key(gw, pod, IPPROTO_TCP));
        let (fwd, rev) = (self.fwd_of(&fk), self.rev_of(&rk));
        self.maps.nat_fwd.insert(fk, NatFwd { last_seen_ns: sent, ..fwd }, 0).unwrap();
        self.maps.nat_rev.insert(rk, NatRev { last_seen_ns: replied, ..rev }, 0).unwrap();
    }

    /// Sets the up flag of cluster2's gateway at `addr`, the way the agent's health checks do:
    /// by rewriting the peer's whole gateway set.
    fn set_gateway_up(&mut self, addr: [u8; 4], up: bool) {
        let id = peer_id("cluster2");
        let mut pg = self.maps.peers.get(&id, 0).unwrap();
        let n = pg.count as usize;
        let gw = pg.gateways[..n]
            .iter_mut()
            .find(|g| g.addr_be.to_ne_bytes() == addr)
            .unwrap_or_else(|| panic!("no gateway {addr:?}"));
        gw.flags = if up { GW_UP } else { 0 };
        self.maps.peers.insert(id, pg, 0).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Building packets
// ---------------------------------------------------------------------------------------

type Ep = ([u8; 4], u16);

#[derive(Clone, Copy, Debug)]
enum L4 {
    /// TCP with these flag bits.
    Tcp(u8),
    Udp,
    /// ICMP echo request; the "ports" are the echo id and sequence number.
    Icmp,
}

fn ip_header(src: [u8; 4], dst: [u8; 4]) -> Ipv4Header {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, src, dst).unwrap();
    ip.identification = 0x4d4e;
    ip
}

fn tcp_header(sport: u16, dport: u16, flags: u8) -> TcpHeader {
    let mut h = TcpHeader::new(sport, dport, 0x1000_0000, 64240);
    h.fin = flags & FIN != 0;
    h.syn = flags & SYN != 0;
    h.rst = flags & RST != 0;
    h.psh = flags & PSH != 0;
    h.ack = flags & ACK != 0;
    if h.ack {
        h.acknowledgment_number = 0x2000_0001;
    }
    if h.syn {
        // A realistic SYN: TCP options make the TCP header longer than its minimum.
        h.set_options(&[TcpOptionElement::MaximumSegmentSize(1460), TcpOptionElement::WindowScale(7)]).unwrap();
    }
    h
}

/// An Ethernet + IPv4 frame as a correct sender builds it: lengths and checksums filled in
/// by etherparse.
fn frame(ip: Ipv4Header, sport: u16, dport: u16, l4: L4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(POD_MAC, HOST_MAC).ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()));
    let mut out = Vec::new();
    match l4 {
        L4::Tcp(flags) => b.tcp_header(tcp_header(sport, dport, flags)).write(&mut out, payload),
        L4::Udp => b.udp(sport, dport).write(&mut out, payload),
        L4::Icmp => b.icmpv4_echo_request(sport, dport).write(&mut out, payload),
    }
    .unwrap();
    out
}

fn pkt(src: Ep, dst: Ep, l4: L4, payload: &[u8]) -> Vec<u8> {
    frame(ip_header(src.0, dst.0), src.1, dst.1, l4, payload)
}

/// An IPv4 fragment without an L4 header (fragment offset > 0), carrying `payload`.
fn later_fragment(
    src: [u8; 4],
    dst: [u8; 4],
    proto: IpNumber,
    offset_units: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut ip = ip_header(src, dst);
    ip.dont_fragment = false;
    ip.more_fragments = more;
    ip.fragment_offset = IpFragOffset::try_new(offset_units).unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()))
        .write(&mut out, proto, payload)
        .unwrap();
    out
}

/// The first fragment (offset 0, MF set) of a datagram: carries the L4 header.
fn first_fragment(src: Ep, dst: Ep, l4: L4, payload: &[u8]) -> Vec<u8> {
    let mut ip = ip_header(src.0, dst.0);
    ip.dont_fragment = false;
    ip.more_fragments = true;
    frame(ip, src.1, dst.1, l4, payload)
}

fn ipv6_tcp() -> Vec<u8> {
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 244, 0, 10];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 245, 0, 20];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ipv6(src, dst, 64)
        .tcp_header(tcp_header(40000, 8080, SYN))
        .write(&mut out, b"")
        .unwrap();
    out
}

/// An ARP request "who has 10.245.0.20? tell 10.244.0.10".
fn arp_request() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&POD_MAC);
    out.extend_from_slice(&[0x08, 0x06]);
    out.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    out.extend_from_slice(&POD_MAC);
    out.extend_from_slice(&POD);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&REMOTE);
    out
}

/// Rewrites the IPv4 header of `frame` through `edit`, with a correct header checksum.
fn edit_ip_header(frame: &mut [u8], edit: impl FnOnce(&mut Ipv4Header)) {
    let mut ip = Ipv4HeaderSlice::from_slice(&frame[ETH_HLEN..]).unwrap().to_header();
    edit(&mut ip);
    ip.header_checksum = ip.calc_header_checksum();
    let bytes = ip.to_bytes();
    frame[ETH_HLEN..ETH_HLEN + bytes.len()].copy_from_slice(&bytes);
}

fn ep(addr: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr), port)
}

fn flow_key(src: Ep, dst: Ep, proto: u8) -> FlowKey {
    FlowKey {
        src_be: u32::from_ne_bytes(src.0),
        dst_be: u32::from_ne_bytes(dst.0),
        sport_be: src.1.to_be(),
        dport_be: dst.1.to_be(),
        proto,
        _pad: [0; 3],
    }
}

// ---------------------------------------------------------------------------------------
// Checking packets
// ---------------------------------------------------------------------------------------

/// What a packet says, read back with etherparse after checking its checksums.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: IpNumber,
    ip_options: Vec<u8>,
    l4_checksum: u16,
    payload: Vec<u8>,
}

/// Parses an Ethernet + IPv4 + TCP/UDP frame and asserts that the IPv4 header checksum and
/// the L4 checksum (over the pseudo-header) are what etherparse computes. A UDP checksum of
/// zero ("none") is accepted here; callers assert whether zero is what they expect.
fn checked(frame: &[u8]) -> Seen {
    let ip = Ipv4HeaderSlice::from_slice(&frame[ETH_HLEN..]).unwrap();
    let hdr = ip.to_header();
    assert_eq!(hdr.header_checksum, hdr.calc_header_checksum(), "IPv4 header checksum of {frame:02x?}");
    let l4 = ETH_HLEN + hdr.header_len();
    let end = ETH_HLEN + usize::from(hdr.total_len);
    let seg = &frame[l4..end];
    let (sport, dport, l4_checksum, payload) = match hdr.protocol {
        IpNumber::TCP => {
            let tcp = TcpHeaderSlice::from_slice(seg).unwrap();
            let payload = &seg[tcp.slice().len()..];
            let want = tcp.calc_checksum_ipv4(&ip, payload).unwrap();
            assert_eq!(tcp.checksum(), want, "TCP checksum of {frame:02x?}");
            (tcp.source_port(), tcp.destination_port(), tcp.checksum(), payload)
        }
        IpNumber::UDP => {
            let udp = UdpHeaderSlice::from_slice(seg).unwrap();
            assert_eq!(usize::from(udp.length()), seg.len(), "UDP length");
            let payload = &seg[8..];
            if udp.checksum() != 0 {
                let want = udp.to_header().calc_checksum_ipv4(&hdr, payload).unwrap();
                assert_eq!(udp.checksum(), want, "UDP checksum of {frame:02x?}");
            }
            (udp.source_port(), udp.destination_port(), udp.checksum(), payload)
        }
        other => panic!("not TCP or UDP: {other:?}"),
    };
    Seen {
        src: ep(hdr.source, sport),
        dst: ep(hdr.destination, dport),
        proto: hdr.protocol,
        ip_options: hdr.options.to_vec(),
        l4_checksum,
        payload: payload.to_vec(),
    }
}

/// Asserts a translated packet: the verdict was OK (checked by the caller), the output is
/// exactly `want` (built independently), its checksums are valid, and it goes `src` → `dst`.
fn assert_translated(what: &str, out: &[u8], want: &[u8], src: Ep, dst: Ep) {
    assert_bytes_eq(what, out, want);
    let s = checked(out);
    assert_eq!((s.src, s.dst), (ep(src.0, src.1), ep(dst.0, dst.1)), "{what}: addresses");
}

// ---------------------------------------------------------------------------------------
// 1, 2: the basic forward and reverse translation
// ---------------------------------------------------------------------------------------

#[test]
fn syn_to_remote_pod_is_redirected_to_the_gateway() {
    let h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));

    let syn = pkt(pod, remote, L4::Tcp(SYN), b"");
    let out = h.expect("SYN", FROM_POD, &syn, OK, &[("flow_opened", 1)]);
    assert_translated("SYN", &out, &pkt(pod, gw, L4::Tcp(SYN), b""), pod, gw);
    assert_eq!(h.flow_counts(), (1, 1));
    assert_eq!(h.counter("flow_opened"), 1);

    // A second packet of the flow, with data: the same translation, no new state.
    let state_before = h.nat_fwd();
    let data = pkt(pod, remote, L4::Tcp(ACK | PSH), PAYLOAD);
    let out = h.expect("data", FROM_POD, &data, OK, &[]);
    assert_translated("data", &out, &pkt(pod, gw, L4::Tcp(ACK | PSH), PAYLOAD), pod, gw);
    assert_eq!(checked(&out).payload, PAYLOAD);
    assert_eq!(h.flow_counts(), (1, 1));
    let strip = |v: Vec<(FlowKey, NatFwd)>| {
        v.into_iter().map(|(k, f)| (k, NatFwd { last_seen_ns: 0, ..f })).collect::<Vec<_>>()
    };
    assert_eq!(strip(h.nat_fwd()), strip(state_before));
    // Flow events are counted, not packets.
    assert_eq!(h.counter("flow_opened"), 1);
}

#[test]
fn reply_from_gateway_is_restored_to_the_remote_pod() {
    let h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);

    let cases: [(&str, L4, &[u8]); 3] = [
        ("SYN-ACK", L4::Tcp(SYN | ACK), b""),
        ("data", L4::Tcp(ACK | PSH), b"HTTP/1.1 200 OK\r\n\r\nhello"),
        ("bare ACK", L4::Tcp(ACK), b""),
    ];
    for (i, (what, l4, payload)) in cases.into_iter().enumerate() {
        let reply = pkt(gw, pod, l4, payload);
        // The first reply answers the flow; the flow's later packets count nothing.
        let out = h.expect(what, TO_POD, &reply, OK, if i == 0 { &[("flow_answered", 1)] } else { &[] });
        assert_translated(what, &out, &pkt(remote, pod, l4, payload), remote, pod);
        assert_eq!(checked(&out).payload, payload);
        assert_eq!(h.counter("flow_answered"), 1);
    }
    // Replies create no state.
    assert_eq!(h.flow_counts(), (1, 1));
}

/// The datapath fixes the ports' part of the L4 checksum inline once it has told the skb's
/// checksum state from what the kernel's helper did with the address change. A gateway
/// whose address sums (one's complement) to the same as the remote pod's leaves nothing to
/// tell it by: the kernel is asked again, and both directions must still come out exact.
#[test]
fn addresses_with_equal_checksum_sums_are_translated_exactly() {
    // 0xc000 + 0x4b08 folds to 0x0b09, as 0x0af5 + 0x0014 (10.245.0.20) does.
    const TWIN: [u8; 4] = [192, 0, 75, 8];
    let sum = |a: [u8; 4]| {
        let s = u32::from(u16::from_be_bytes([a[0], a[1]])) + u32::from(u16::from_be_bytes([a[2], a[3]]));
        (s & 0xffff) + (s >> 16)
    };
    assert_eq!(sum(TWIN), sum(REMOTE), "the test's addresses must sum alike");
    for csum in BOTH {
        let h = Harness::build(&CONFIG.replace("192.0.2.2", "192.0.75.8"), None, csum);
        for (l4, reply_l4, gw_port, sport) in [(L4::Tcp(SYN), L4::Tcp(SYN | ACK), GW_TCP, 40001), (L4::Udp, L4::Udp, GW_UDP, 5002)] {
            let (pod, remote, gw) = ((POD, sport), (REMOTE, 8080), (TWIN, gw_port));
            let what = format!("{csum:?}: to the gateway");
            let out = h.expect(&what, FROM_POD, &pkt(pod, remote, l4, PAYLOAD), OK, &[("flow_opened", 1)]);
            assert_translated(&what, &out, &pkt(pod, gw, l4, PAYLOAD), pod, gw);
            let what = format!("{csum:?}: reply");
            let out = h.expect(&what, TO_POD, &pkt(gw, pod, reply_l4, PAYLOAD), OK, &[("flow_answered", 1)]);
            assert_translated(&what, &out, &pkt(remote, pod, reply_l4, PAYLOAD), remote, pod);
        }
    }
}

/// Where the kernel has `bpf_cast_to_kern_ctx` (6.2) and its BTF, the agent's object reads
/// the skb's checksum state instead of asking the checksum helper (a helper call fewer per
/// translated packet), and the kernel takes it: every other test here loads that object
/// without the agent's fallback. A kernel that refuses the read (here a kfunc id that names
/// no kfunc) still gets a datapath, the helper's.
#[test]
fn the_checksum_state_is_read_where_the_kernel_has_the_kfunc() {
    meshnet_tests::require_root();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let has = KernelVersion::current().unwrap() >= KernelVersion::new(6, 2, 0) && btf;
    let layout = datapath::skb_layout();
    if std::env::var_os(meshnet::ip_summed::NO_KFUNC_ENV).is_none() {
        // A kernel before 6.2 may have the kfunc backported: then it is read there too.
        assert!(layout.is_some() || !has, "no layout on a kernel with the kfunc and BTF");
    }
    assert!(layout.is_none() || btf);
    let (_, reads) = datapath::prepare_object(EBPF_OBJECT, layout.as_ref()).unwrap();
    assert_eq!(reads, layout.is_some());
    let (_, reads) = datapath::prepare_object(EBPF_OBJECT, None).unwrap();
    assert!(!reads);
    if let Some(layout) = layout {
        let bogus = meshnet::ip_summed::Layout { kfunc: 0x7fff_fff0, ..layout };
        let load = |o: &[u8]| Datapath::load_unpinned_as_is(1024, o);
        let (_, reads) = datapath::with_checksum_variant(EBPF_OBJECT, Some(&bogus), load).unwrap();
        assert!(!reads, "a kfunc id that names nothing must not load");
    }
}

/// Ethernet pads short frames to 60 bytes; the padding is not part of the IP datagram, so it
/// must be neither checksummed nor touched.
#[test]
fn ethernet_padding_is_preserved_and_not_checksummed() {
    let h = Harness::new(CONFIG);
    let pad = |mut f: Vec<u8>| {
        f.resize(60.max(f.len()), 0);
        f
    };
    let cases = [
        ("TCP ACK", (POD, 40000), (REMOTE, 8080), (GW, GW_TCP), L4::Tcp(ACK)),
        ("UDP", (POD, 5000), (REMOTE, 53), (GW, GW_UDP), L4::Udp),
    ];
    for (what, pod, remote, gw, l4) in cases {
        let input = pad(pkt(pod, remote, l4, b"x"));
        assert_eq!(input.len(), 60, "{what}: the test frame must be padded");
        let out = h.expect(what, FROM_POD, &input, OK, &[("flow_opened", 1)]);
        assert_translated(what, &out, &pad(pkt(pod, gw, l4, b"x")), pod, gw);
        let reply = pad(pkt(gw, pod, l4, b"y"));
        let out = h.expect(what, TO_POD, &reply, OK, &[("flow_answered", 1)]);
        assert_translated(what, &out, &pad(pkt(remote, pod, l4, b"y")), remote, pod);
    }
}

// ---------------------------------------------------------------------------------------
// 3: misses
// ---------------------------------------------------------------------------------------

#[test]
fn traffic_meshnet_does_not_own_passes_unchanged() {
    let h = Harness::new(CONFIG);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("same-cluster TCP", FROM_POD, pkt((POD, 40000), (LOCAL_POD, 8080), L4::Tcp(SYN), b"")),
        ("same-cluster UDP", FROM_POD, pkt((POD, 5000), (LOCAL_POD, 53), L4::Udp, b"q")),
        ("TCP to an unrelated address", FROM_POD, pkt((POD, 40000), (ELSEWHERE, 443), L4::Tcp(SYN), b"")),
        ("TCP straight to the gateway node", FROM_POD, pkt((POD, 40000), (GW, GW_TCP), L4::Tcp(SYN), b"")),
        ("UDP to an unrelated address", FROM_POD, pkt((POD, 5000), (ELSEWHERE, 53), L4::Udp, b"q")),
        ("IPv6 TCP", FROM_POD, ipv6_tcp()),
        ("ARP request for a remote pod", FROM_POD, arp_request()),
        (
            "to_pod: reply-shaped packet without a flow",
            TO_POD,
            pkt((GW, GW_TCP), (POD, 40000), L4::Tcp(SYN | ACK), b""),
        ),
        ("to_pod: UDP without a flow", TO_POD, pkt((GW, GW_UDP), (POD, 5000), L4::Udp, b"a")),
        ("to_pod: same-cluster TCP", TO_POD, pkt((LOCAL_POD, 8080), (POD, 40000), L4::Tcp(ACK), b"")),
        ("to_pod: IPv6", TO_POD, ipv6_tcp()),
        ("to_pod: ARP", TO_POD, arp_request()),
    ];
    for (what, prog, input) in &cases {
        h.expect_unchanged(what, prog, input, &[]);
    }
    assert_eq!(h.flow_counts(), (0, 0), "misses must create no flow state");

    // With a flow in place, replies that differ from its reply tuple in any one field are
    // still not meshnet's.
    h.expect("SYN", FROM_POD, &pkt((POD, 40000), (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let near_misses: Vec<(&str, Vec<u8>)> = vec![
        ("other gateway port", pkt((GW, GW_UDP), (POD, 40000), L4::Tcp(ACK), b"")),
        ("other protocol", pkt((GW, GW_TCP), (POD, 40000), L4::Udp, b"")),
        ("other pod port", pkt((GW, GW_TCP), (POD, 40001), L4::Tcp(ACK), b"")),
        ("other pod", pkt((GW, GW_TCP), (LOCAL_POD, 40000), L4::Tcp(ACK), b"")),
        ("other gateway", pkt((GW2, GW_TCP), (POD, 40000), L4::Tcp(ACK), b"")),
        ("from the remote pod itself", pkt((REMOTE, 8080), (POD, 40000), L4::Tcp(ACK), b"")),
    ];
    for (what, input) in &near_misses {
        h.expect_unchanged(what, TO_POD, input, &[]);
    }
    assert_eq!(h.flow_counts(), (1, 1));
}

/// A ping to a remote pod cannot be translated (no ports): dropped and counted, never sent
/// out untranslated.
#[test]
fn icmp_to_remote_pod_is_counted_unsupported_and_dropped() {
    let h = Harness::new(CONFIG);
    let echo = pkt((POD, 0x1234), (REMOTE, 1), L4::Icmp, b"ping");
    h.expect("ICMP echo to a remote pod", FROM_POD, &echo, SHOT, &[("unsupported_proto", 1)]);
    h.expect("again", FROM_POD, &echo, SHOT, &[("unsupported_proto", 1)]);
    assert_eq!(h.counter("unsupported_proto"), 2);
    // Not remote: not counted.
    let local = pkt((POD, 0x1234), (LOCAL_POD, 1), L4::Icmp, b"ping");
    h.expect_unchanged("ICMP echo to a local pod", FROM_POD, &local, &[]);
    let inbound = pkt((REMOTE, 0x1234), (POD, 1), L4::Icmp, b"ping");
    h.expect_unchanged("ICMP to a pod", TO_POD, &inbound, &[]);
    assert_eq!(h.flow_counts(), (0, 0));
}

// ---------------------------------------------------------------------------------------
// 4: collisions
// ---------------------------------------------------------------------------------------

/// Two flows from one pod port to two remote pods would become one tuple towards the
/// gateway; the second one gets another source port, and replies to each are restored to
/// their own remote pod.
fn colliding_flows(l4: L4, proto: u8, sport: u16, dport: u16, gw_port: u16, reply_l4: L4) {
    let h = Harness::new(CONFIG);
    let pod = (POD, sport);
    let gw = (GW, gw_port);
    let (a, b) = ((REMOTE, dport), (REMOTE2, dport));

    let out = h.expect("flow A", FROM_POD, &pkt(pod, a, l4, b"a"), OK, &[("flow_opened", 1)]);
    assert_translated("flow A", &out, &pkt(pod, gw, l4, b"a"), pod, gw);

    let out = h.expect("flow B", FROM_POD, &pkt(pod, b, l4, b"b"), OK, &[("flow_opened", 1), ("port_remap", 1)]);
    let s = checked(&out);
    let wire = s.src.port();
    assert_ne!(wire, sport, "flow B kept the colliding source port");
    assert!(
        (REMAP_PORT_MIN..REMAP_PORT_MIN + REMAP_PORT_SPAN).contains(&wire),
        "remapped port {wire} outside [{REMAP_PORT_MIN}, {})",
        REMAP_PORT_MIN + REMAP_PORT_SPAN
    );
    // The first alternative is free, so it is the one the shared hash predicts.
    assert_eq!(wire, remap_port(&flow_key(pod, b, proto), 0));
    let b_wire = (POD, wire);
    assert_translated("flow B", &out, &pkt(b_wire, gw, l4, b"b"), b_wire, gw);

    // State: two forward entries, two distinct reply tuples; only B is marked remapped.
    assert_eq!(h.flow_counts(), (2, 2));
    let fwd_a = h.fwd_of(&flow_key(pod, a, proto));
    let fwd_b = h.fwd_of(&flow_key(pod, b, proto));
    assert_eq!((u16::from_be(fwd_a.nat_sport_be), fwd_a.flags & FLOW_REMAPPED), (sport, 0));
    assert_eq!((u16::from_be(fwd_b.nat_sport_be), fwd_b.flags & FLOW_REMAPPED), (wire, FLOW_REMAPPED));

    // Later packets of both flows keep their translations without remapping again.
    let out = h.expect("flow A again", FROM_POD, &pkt(pod, a, l4, b"a2"), OK, &[]);
    assert_translated("flow A again", &out, &pkt(pod, gw, l4, b"a2"), pod, gw);
    let out = h.expect("flow B again", FROM_POD, &pkt(pod, b, l4, b"b2"), OK, &[]);
    assert_translated("flow B again", &out, &pkt(b_wire, gw, l4, b"b2"), b_wire, gw);

    // Replies.
    let out = h.expect("reply A", TO_POD, &pkt(gw, pod, reply_l4, b"ra"), OK, &[("flow_answered", 1)]);
    assert_translated("reply A", &out, &pkt(a, pod, reply_l4, b"ra"), a, pod);
    let out = h.expect("reply B", TO_POD, &pkt(gw, b_wire, reply_l4, b"rb"), OK, &[("flow_answered", 1)]);
    assert_translated("reply B", &out, &pkt(b, pod, reply_l4, b"rb"), b, pod);
    assert_eq!(h.flow_counts(), (2, 2));
}

#[test]
fn colliding_udp_flows_get_a_remapped_source_port() {
    colliding_flows(L4::Udp, IPPROTO_UDP, 5000, 53, GW_UDP, L4::Udp);
}

#[test]
fn colliding_tcp_flows_get_a_remapped_source_port() {
    colliding_flows(L4::Tcp(SYN), IPPROTO_TCP, 40000, 8080, GW_TCP, L4::Tcp(SYN | ACK));
}

// ---------------------------------------------------------------------------------------
// 5: UDP checksums
// ---------------------------------------------------------------------------------------

const UDP_CSUM_OFF: usize = ETH_HLEN + 20 + 6;

fn without_udp_checksum(mut f: Vec<u8>) -> Vec<u8> {
    f[UDP_CSUM_OFF..UDP_CSUM_OFF + 2].copy_from_slice(&[0, 0]);
    f
}

#[test]
fn udp_without_checksum_stays_without_checksum() {
    let h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 5000), (REMOTE, 53), (GW, GW_UDP));
    let query = without_udp_checksum(pkt(pod, remote, L4::Udp, b"query"));
    let out = h.expect("query", FROM_POD, &query, OK, &[("flow_opened", 1)]);
    assert_translated("query", &out, &without_udp_checksum(pkt(pod, gw, L4::Udp, b"query")), pod, gw);
    assert_eq!(checked(&out).l4_checksum, 0);

    let answer = without_udp_checksum(pkt(gw, pod, L4::Udp, b"answer"));
    let out = h.expect("answer", TO_POD, &answer, OK, &[("flow_answered", 1)]);
    assert_translated("answer", &out, &without_udp_checksum(pkt(remote, pod, L4::Udp, b"answer")), remote, pod);
    assert_eq!(checked(&out).l4_checksum, 0);
}

#[test]
fn udp_with_checksum_gets_a_valid_one() {
    let h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 5000), (REMOTE, 53), (GW, GW_UDP));
    let query = pkt(pod, remote, L4::Udp, b"query");
    assert_ne!(checked(&query).l4_checksum, 0);
    let out = h.expect("query", FROM_POD, &query, OK, &[("flow_opened", 1)]);
    assert_translated("query", &out, &pkt(pod, gw, L4::Udp, b"query"), pod, gw);
    assert_ne!(checked(&out).l4_checksum, 0);

    let answer = pkt(gw, pod, L4::Udp, b"answer");
    let out = h.expect("answer", TO_POD, &answer, OK, &[("flow_answered", 1)]);
    assert_translated("answer", &out, &pkt(remote, pod, L4::Udp, b"answer"), remote, pod);
    assert_ne!(checked(&out).l4_checksum, 0);
}

/// A translated UDP datagram whose checksum computes to zero must carry 0xffff (RFC 768):
/// zero on the wire would mean "no checksum".
#[test]
fn udp_checksum_that_computes_to_zero_is_sent_as_ffff() {
    let (pod, remote, gw) = ((POD, 5001), (REMOTE, 53), (GW, GW_UDP));
    // Pick the last payload word so that the translated datagram sums to zero: with that word
    // zero, the checksum is c; adding c to the sum makes it 0xffff, i.e. a checksum of zero.
    let c = checked(&pkt(pod, gw, L4::Udp, &[0x55, 0x66, 0, 0])).l4_checksum;
    assert_ne!(c, 0xffff, "pick another payload");
    let payload = [0x55, 0x66, c.to_be_bytes()[0], c.to_be_bytes()[1]];
    let want = pkt(pod, gw, L4::Udp, &payload);
    assert_eq!(checked(&want).l4_checksum, 0xffff, "the test payload does not produce a zero checksum");

    for csum in BOTH {
        let h = Harness::build(CONFIG, None, csum);
        let what = format!("{csum:?}: query");
        let out = h.expect(&what, FROM_POD, &pkt(pod, remote, L4::Udp, &payload), OK, &[("flow_opened", 1)]);
        assert_translated(&what, &out, &want, pod, gw);
        assert_eq!(checked(&out).l4_checksum, 0xffff, "{what}");
    }
}

// ---------------------------------------------------------------------------------------
// 6: IP options and bad headers
// ---------------------------------------------------------------------------------------

#[test]
fn ip_options_are_skipped_and_preserved() {
    let h = Harness::new(CONFIG);
    // Record route with room for nine addresses: the longest header there is (IHL 15).
    let mut rr_full = vec![7, 39, 4];
    rr_full.resize(40, 0);
    let options: [(&str, Vec<u8>); 4] = [
        ("NOP NOP NOP EOL (IHL 6)", vec![1, 1, 1, 0]),
        ("router alert (IHL 6)", vec![148, 4, 0, 0]),
        ("record route, one slot + EOL (IHL 7)", vec![7, 7, 4, 0, 0, 0, 0, 0]),
        ("record route, nine slots (IHL 15)", rr_full),
    ];
    let with = |opts: &[u8], src: [u8; 4], dst: [u8; 4]| {
        let mut ip = ip_header(src, dst);
        ip.options = opts.try_into().unwrap();
        ip
    };
    for (i, (what, opts)) in options.iter().enumerate() {
        let sport = 40000 + u16::try_from(i).unwrap();
        for (l4, remote, gw) in [(L4::Tcp(SYN), (REMOTE, 8080), (GW, GW_TCP)), (L4::Udp, (REMOTE, 53), (GW, GW_UDP))] {
            let what = format!("{what}, {l4:?}");
            let pod = (POD, sport);
            let input = frame(with(opts, POD, remote.0), sport, remote.1, l4, PAYLOAD);
            assert_eq!(usize::from(input[ETH_HLEN] & 0x0f) * 4, 20 + opts.len(), "{what}: IHL of the test packet");
            let out = h.expect(&what, FROM_POD, &input, OK, &[("flow_opened", 1)]);
            let want = frame(with(opts, POD, gw.0), sport, gw.1, l4, PAYLOAD);
            assert_translated(&what, &out, &want, pod, gw);
            let s = checked(&out);
            assert_eq!(s.ip_options, *opts, "{what}: options");
            assert_eq!(s.payload, PAYLOAD, "{what}: payload");

            let reply_l4 = if let L4::Tcp(_) = l4 { L4::Tcp(SYN | ACK) } else { l4 };
            let reply = frame(with(opts, gw.0, POD), gw.1, sport, reply_l4, b"r");
            let out = h.expect(&what, TO_POD, &reply, OK, &[("flow_answered", 1)]);
            let want = frame(with(opts, remote.0, POD), remote.1, sport, reply_l4, b"r");
            assert_translated(&what, &out, &want, remote, pod);
            assert_eq!(checked(&out).ip_options, *opts, "{what}: reply options");
        }
    }
}

/// Malformed IPv4 headers are counted. Bound for a remote CIDR from a pod they are dropped
/// (sent on, they would leave untranslated, still addressed to a remote pod); anything else
/// passes unchanged.
#[test]
fn malformed_ipv4_headers_are_counted_and_dropped_when_bound_for_a_remote_pod() {
    let h = Harness::new(CONFIG);
    let good = pkt((POD, 40000), (REMOTE, 8080), L4::Tcp(SYN), b"");
    let cases = malformed_variants(&good);
    for (what, input) in &cases {
        h.expect(&format!("from_pod: {what}"), FROM_POD, input, SHOT, &[("malformed", 1), ("remote_parse_error", 1)]);
        h.expect_unchanged(&format!("to_pod: {what}"), TO_POD, input, &[("malformed", 1)]);
    }
    let local = pkt((POD, 40000), (LOCAL_POD, 8080), L4::Tcp(SYN), b"");
    for (what, input) in &malformed_variants(&local) {
        h.expect_unchanged(&format!("from_pod, local destination: {what}"), FROM_POD, input, &[("malformed", 1)]);
    }
    assert_eq!(h.counter("malformed"), 3 * cases.len() as u64);
    assert_eq!(h.counter("remote_parse_error"), cases.len() as u64);
    assert_eq!(h.flow_counts(), (0, 0));
}

fn malformed_variants(good: &[u8]) -> Vec<(String, Vec<u8>)> {
    let good = good.to_vec();
    let mut cases: Vec<(String, Vec<u8>)> = (0..5u8)
        .map(|ihl| {
            let mut f = good.clone();
            f[ETH_HLEN] = 0x40 | ihl;
            (format!("IHL {ihl}"), f)
        })
        .collect();
    let mut v6_in_v4 = good.clone();
    v6_in_v4[ETH_HLEN] = 0x65;
    cases.push(("version 6 behind an IPv4 ethertype".into(), v6_in_v4));
    let mut short_total = good.clone();
    edit_ip_header(&mut short_total, |ip| ip.total_len = 19);
    cases.push(("total length 19, shorter than the header".into(), short_total));
    let mut ihl_beyond_total = good.clone();
    edit_ip_header(&mut ihl_beyond_total, |ip| {
        ip.options = [1, 1, 1, 0].into();
        ip.total_len = 20;
    });
    // The options overwrote the first 4 TCP bytes; what matters is that tot_len < IHL*4.
    cases.push(("total length 20 with IHL 6".into(), ihl_beyond_total));
    cases
}

// ---------------------------------------------------------------------------------------
// 7: fragments
// ---------------------------------------------------------------------------------------

/// A fragmented datagram to a remote pod is translated fragment by fragment: the first one
/// (with the ports) like any packet of its flow, the later ones by the ports their first
/// fragment carried (tracked by source, destination, IP id and protocol). A later fragment
/// whose first fragment was not seen is dropped and counted; replies come back the same way.
/// A pod may not act on another pod's flows nor open flows in its name (a pod with
/// `CAP_NET_RAW` writes any source): a forged RST would get the victim's idle connection
/// expired, and flows opened in its name would take the reply tuples its own connections
/// need. TEST_RUN runs every packet on the loopback (index 1): the victim's interface is
/// made another one (7) in the flow map and the port table.
#[test]
fn a_pod_cannot_act_on_another_pods_flows_nor_open_flows_in_its_name() {
    let mut h = Harness::new(CONFIG);
    let (remote, gw) = ((REMOTE, 8080), (GW, GW_TCP));
    let victim = (POD, 42001);
    h.expect("the victim's SYN", FROM_POD, &pkt(victim, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let (fk, rk) = (flow_key(victim, remote, IPPROTO_TCP), flow_key(gw, victim, IPPROTO_TCP));
    assert_eq!(h.fwd_of(&fk).ifindex, 1, "the flow is its interface's");
    let fwd = NatFwd { ifindex: 7, ..h.fwd_of(&fk) };
    h.maps.nat_fwd.insert(fk, fwd, 0).unwrap();
    let rev = h.rev_of(&rk);
    for (what, l4) in [("a forged RST", L4::Tcp(RST | ACK)), ("a forged FIN", L4::Tcp(FIN | ACK)), ("forged data", L4::Tcp(PSH | ACK))] {
        let out = h.expect(what, FROM_POD, &pkt(victim, remote, l4, PAYLOAD), SHOT, &[("spoofed_source", 1)]);
        assert_bytes_eq(what, &out, &pkt(victim, remote, l4, PAYLOAD));
        assert_eq!((h.fwd_of(&fk), h.rev_of(&rk)), (fwd, rev), "{what}: the flow is untouched");
    }
    let first = first_fragment(victim, remote, L4::Tcp(ACK), &[0xab; 64]);
    h.expect("a forged first fragment", FROM_POD, &first, SHOT, &[("spoofed_source", 1)]);
    // The victim's own packets, on its interface, would still pass: its flow is as it was.
    assert_eq!(h.fwd_of(&fk).flags & FLOW_RST, 0);

    // New flows in the victim's name: refused while its address is another interface's pod.
    let mut tunnel = meshnet::tunnel::TunnelMaps::from_ebpf(&mut h.ebpf).unwrap();
    let port = |ifindex| meshnet_common::PodPort { ifindex, pod_mac: POD_MAC, host_mac: HOST_MAC };
    tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), port(7))])).unwrap();
    let flows = h.flow_counts();
    for sport in [42002, 42003] {
        h.expect("a SYN in the victim's name", FROM_POD, &pkt((POD, sport), remote, L4::Tcp(SYN), b""), SHOT, &[("spoofed_source", 1)]);
    }
    h.expect("UDP in the victim's name", FROM_POD, &pkt((POD, 5353), (REMOTE, 53), L4::Udp, b"q"), SHOT, &[("spoofed_source", 1)]);
    assert_eq!(h.flow_counts(), flows, "no flow was opened in the victim's name");
    // An address no pod interface holds may be a pod the agent has not read yet.
    h.expect("an address no interface holds", FROM_POD, &pkt((LOCAL_POD, 42004), remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    // Traffic meshnet does not own is not its to judge.
    h.expect_unchanged("to a pod of this cluster", FROM_POD, &pkt((POD, 42005), (LOCAL_POD, 80), L4::Tcp(SYN), b""), &[]);
    // On its own interface the address opens flows again, and takes over a flow another
    // interface made in its name (as a pod re-created with its address, on a new interface,
    // may reopen a tuple the old flow still holds).
    tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), port(1))])).unwrap();
    h.expect("the pod itself", FROM_POD, &pkt((POD, 42006), remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    h.expect("the pod itself, on the old flow", FROM_POD, &pkt(victim, remote, L4::Tcp(ACK), PAYLOAD), OK, &[]);
    assert_eq!(h.fwd_of(&fk).ifindex, 1, "the flow is its interface's now");
}

/// Flows of a release that recorded no interface (0, as migrated from the v1 layout) go to
/// the first interface that sends on them, but only one that may send as their source: a pod
/// posing as another could otherwise take an idle connection over and reset it.
#[test]
fn a_flow_of_no_interface_goes_only_to_one_that_may_send_as_its_source() {
    let (mut h, tick) = clocked();
    let remote = (REMOTE, 8080);
    let victim = (POD, 42001);
    h.expect("the victim's SYN", FROM_POD, &pkt(victim, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let fk = flow_key(victim, remote, IPPROTO_TCP);
    let fwd = NatFwd { ifindex: 0, ..h.fwd_of(&fk) };
    h.maps.nat_fwd.insert(fk, fwd, 0).unwrap();
    let mut tunnel = meshnet::tunnel::TunnelMaps::from_ebpf(&mut h.ebpf).unwrap();
    let port = |ifindex| meshnet_common::PodPort { ifindex, pod_mac: POD_MAC, host_mac: HOST_MAC };
    tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), port(7))])).unwrap();
    h.expect("a forged RST", FROM_POD, &pkt(victim, remote, L4::Tcp(RST | ACK), b""), SHOT, &[("spoofed_source", 1)]);
    assert_eq!(h.fwd_of(&fk), fwd, "the flow is untouched");
    assert_eq!(h.maps.expire(tick + 11 * SEC, &gc_config(10)).flows, 0);
    // Its own pod's interface takes it.
    tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(POD), port(1))])).unwrap();
    h.expect("the pod itself", FROM_POD, &pkt(victim, remote, L4::Tcp(ACK), PAYLOAD), OK, &[]);
    assert_eq!(h.fwd_of(&fk).ifindex, 1);
}

/// A pod can send from an address no pod holds yet (the agent may not have read its pod),
/// and its flows stay with its interface. Once the address is a pod's, the agent removes
/// the flows another interface made in its name, so that they cannot hold the new pod's
/// reply tuples: flows opened from `V:p` to other remote pods take the reply tuple the new
/// pod's `V:p` needs, and those of the fallback ports too.
#[test]
fn flows_made_in_the_name_of_an_address_that_becomes_a_pod_go() {
    let mut h = Harness::new(CONFIG);
    let (remote, gw) = ((REMOTE, 8080), (GW, GW_TCP));
    let sport = 42001;
    // The poser, on interface 1 (TEST_RUN's), takes the reply tuple (gw, V:p) and every
    // fallback port of the flow the pod is about to open.
    let victim_key = flow_key((LOCAL_POD, sport), remote, IPPROTO_TCP);
    let mut posers = vec![sport];
    posers.extend((0..meshnet_common::limits::REMAP_ATTEMPTS).map(|i| remap_port(&victim_key, i)));
    for (n, p) in posers.iter().enumerate() {
        let other = (Ipv4Addr::new(10, 245, 1, u8::try_from(n + 1).unwrap()).octets(), 9000);
        h.expect("a flow in the coming pod's name", FROM_POD, &pkt((LOCAL_POD, *p), other, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    }
    // A flow of the poser's own address stays.
    h.expect("the poser's own flow", FROM_POD, &pkt((POD, 42002), remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let mut tunnel = meshnet::tunnel::TunnelMaps::from_ebpf(&mut h.ebpf).unwrap();
    let port = |ifindex| meshnet_common::PodPort { ifindex, pod_mac: POD_MAC, host_mac: HOST_MAC };
    // Where the new pod's SYN would go today: its interface (7) is not TEST_RUN's, so the
    // claim is shown on the flow map itself.
    tunnel.sync_ports(&BTreeMap::from([(Ipv4Addr::from(LOCAL_POD), port(7)), (Ipv4Addr::from(POD), port(1))])).unwrap();
    let owners = BTreeMap::from([(u32::from_ne_bytes(LOCAL_POD), 7), (u32::from_ne_bytes(POD), 1)]);
    assert_eq!(h.maps.purge_posers(&owners), posers.len(), "the flows made in the pod's name");
    assert_eq!(h.flow_counts(), (1, 1), "the poser's own flow stays, whole");
    assert!(h.maps.nat_rev.get(&flow_key(gw, (LOCAL_POD, sport), IPPROTO_TCP), 0).is_err(), "the pod's reply tuple is free");
    // Its own interface's flows stay.
    assert_eq!(h.maps.purge_posers(&BTreeMap::from([(u32::from_ne_bytes(POD), 1)])), 0);
}

#[test]
fn fragments_to_remote_pods_are_translated() {
    let h = Harness::new(CONFIG);
    let big = [0xab_u8; 64];
    let (pod, remote, gw) = ((POD, 5000), (REMOTE, 53), (GW, GW_UDP));

    // A later fragment before its first: dropped, and it creates no state.
    let early = later_fragment(POD, REMOTE, IpNumber::UDP, 9, false, &big);
    h.expect("later fragment before the first", FROM_POD, &early, SHOT, &[("fragment_dropped", 1)]);
    assert_eq!(h.flow_counts(), (0, 0));

    let first = first_fragment(pod, remote, L4::Udp, &big);
    let out = h.expect("first UDP fragment", FROM_POD, &first, OK, &[("flow_opened", 1)]);
    assert_bytes_eq("first UDP fragment", &out, &first_fragment(pod, gw, L4::Udp, &big));
    for (what, offset, more) in [("middle UDP fragment", 9, true), ("last UDP fragment", 18, false)] {
        let input = later_fragment(POD, REMOTE, IpNumber::UDP, offset, more, &big);
        let out = h.expect(what, FROM_POD, &input, OK, &[("fragment_translated", 1)]);
        assert_bytes_eq(what, &out, &later_fragment(POD, GW, IpNumber::UDP, offset, more, &big));
        checked_ip(&out);
    }
    assert_eq!(h.flow_counts(), (1, 1));

    // The reply, fragmented too.
    let reply_first = first_fragment(gw, pod, L4::Udp, &big);
    let out = h.expect("first reply fragment", TO_POD, &reply_first, OK, &[("flow_answered", 1)]);
    assert_bytes_eq("first reply fragment", &out, &first_fragment(remote, pod, L4::Udp, &big));
    let reply_last = later_fragment(GW, POD, IpNumber::UDP, 9, false, &big);
    let out = h.expect("last reply fragment", TO_POD, &reply_last, OK, &[("fragment_translated", 1)]);
    assert_bytes_eq("last reply fragment", &out, &later_fragment(REMOTE, POD, IpNumber::UDP, 9, false, &big));

    let other_cases: Vec<(&str, Vec<u8>)> = vec![
        ("first fragment to a local pod", first_fragment((POD, 5000), (LOCAL_POD, 53), L4::Udp, &big)),
        ("later fragment to a local pod", later_fragment(POD, LOCAL_POD, IpNumber::UDP, 9, false, &big)),
        ("later fragment to an unrelated address", later_fragment(POD, ELSEWHERE, IpNumber::UDP, 9, true, &big)),
        ("to_pod: later fragment of an unknown datagram", later_fragment(GW2, POD, IpNumber::UDP, 9, false, &big)),
    ];
    for (what, input) in &other_cases {
        let prog = if what.starts_with("to_pod") { TO_POD } else { FROM_POD };
        h.expect_unchanged(what, prog, input, &[]);
    }

    // DF alone is not a fragment: translated.
    let df = pkt((POD, 5001), (REMOTE, 53), L4::Udp, &big);
    assert!(Ipv4HeaderSlice::from_slice(&df[ETH_HLEN..]).unwrap().dont_fragment());
    let out = h.expect("DF set", FROM_POD, &df, OK, &[("flow_opened", 1)]);
    assert_translated("DF set", &out, &pkt((POD, 5001), (GW, GW_UDP), L4::Udp, &big), (POD, 5001), (GW, GW_UDP));
}

/// The IPv4 header checksum of a frame is valid.
fn checked_ip(frame: &[u8]) {
    let ip = Ipv4HeaderSlice::from_slice(&frame[ETH_HLEN..]).unwrap();
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum(), "IPv4 header checksum");
}

// ---------------------------------------------------------------------------------------
// 8: truncation
// ---------------------------------------------------------------------------------------

fn is_einval(r: &Result<(u32, Vec<u8>), ProgramError>) -> bool {
    matches!(r, Err(ProgramError::SyscallError(SyscallError { io_error, .. })) if io_error.raw_os_error() == Some(libc::EINVAL))
}

/// Runs every prefix of `full` (each shorter than the headers it claims) through `prog`.
///
/// Prefixes under `ETH_HLEN` are refused by the kernel (EINVAL) before any program runs.
/// Newer kernels (6.18 here) also refuse IPv4-ethertype frames too short for an IPv4 header
/// (under 34 bytes); whether this kernel does is found out with the empty program, and our
/// programs must then be refused the same way. Every prefix the kernel runs must pass
/// unchanged with verdict UNSPEC and count exactly one of truncated/malformed; with
/// `remote_drop` (a pod's packet to a remote CIDR), a prefix holding the whole IPv4 header
/// (so its destination is known) is dropped instead and also counts `remote_parse_error`.
fn every_prefix_is_passed_or_dropped(h: &Harness, prog: &str, full: &[u8], remote_drop: bool) {
    let mut ran = 0;
    for len in 0..full.len() {
        let input = &full[..len];
        let what = format!("{prog}: first {len} of {} bytes", full.len());
        let before = h.counters();
        let result = h.try_run(prog, input);
        let kernel_refuses = is_einval(&h.try_run(names::PROG_EMPTY, input));
        if len < ETH_HLEN || kernel_refuses {
            assert!(len < ETH_HLEN + 20, "{what}: the kernel refused a frame with a whole IPv4 header");
            assert!(kernel_refuses, "{what}: the kernel ran the empty program on a frame shorter than ETH_HLEN");
            assert!(is_einval(&result), "{what}: expected EINVAL, got {result:?}");
            assert_counter_delta(&what, &before, &h.counters(), &[]);
            continue;
        }
        let (verdict, out) = result.unwrap_or_else(|e| panic!("{what}: {e:?}"));
        ran += 1;
        let after = h.counters();
        let dropped = remote_drop && len >= ETH_HLEN + 20;
        if dropped {
            assert_eq!(verdict, SHOT, "{what}: verdict {}", verdict_name(verdict));
            assert_eq!(after["remote_parse_error"] - before["remote_parse_error"], 1, "{what}: remote_parse_error");
        } else {
            assert_eq!(verdict, UNSPEC, "{what}: verdict {}", verdict_name(verdict));
            assert_bytes_eq(&what, &out, input);
        }
        let bad = |c: &BTreeMap<&str, u64>| c["truncated"] + c["malformed"];
        assert_eq!(bad(&after) - bad(&before), 1, "{what}: truncated+malformed");
        let others: Vec<_> = after
            .iter()
            .filter(|(n, v)| !["truncated", "malformed", "remote_parse_error"].contains(n) && before[*n] != **v)
            .collect();
        assert!(others.is_empty(), "{what}: unexpected counters moved: {others:?}");
    }
    // At least every prefix that holds a whole IPv4 header went through the program.
    assert!(ran >= full.len() - (ETH_HLEN + 20), "only {ran} prefixes of {} bytes ran", full.len());
}

#[test]
fn truncated_tcp_to_a_remote_pod_is_dropped_and_counted() {
    let h = Harness::new(CONFIG);
    let mut ip = ip_header(POD, REMOTE);
    ip.identification = 7;
    let mut full = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()))
        .tcp(40000, 8080, 1, 64240)
        .syn()
        .write(&mut full, b"")
        .unwrap();
    assert_eq!(full.len(), 54);
    every_prefix_is_passed_or_dropped(&h, FROM_POD, &full, true);
    assert_eq!(h.flow_counts(), (0, 0));
    // The whole packet is translated: the prefixes failed for being short, nothing else.
    h.expect("whole SYN", FROM_POD, &full, OK, &[("flow_opened", 1)]);
}

#[test]
fn truncated_udp_to_a_remote_pod_is_dropped_and_counted() {
    let h = Harness::new(CONFIG);
    let full = pkt((POD, 5000), (REMOTE, 53), L4::Udp, b"");
    assert_eq!(full.len(), 42);
    every_prefix_is_passed_or_dropped(&h, FROM_POD, &full, true);
    assert_eq!(h.flow_counts(), (0, 0));
    h.expect("whole datagram", FROM_POD, &full, OK, &[("flow_opened", 1)]);
}

/// Not meshnet's to drop: truncated packets to a local pod pass unchanged.
#[test]
fn truncated_packets_to_a_local_pod_pass_unchanged() {
    let h = Harness::new(CONFIG);
    every_prefix_is_passed_or_dropped(&h, FROM_POD, &pkt((POD, 5000), (LOCAL_POD, 53), L4::Udp, b""), false);
    every_prefix_is_passed_or_dropped(&h, FROM_POD, &pkt((POD, 40000), (LOCAL_POD, 80), L4::Tcp(SYN), b""), false);
    assert_eq!(h.counter("remote_parse_error"), 0);
}

/// Replies of existing flows, cut short, are not rewritten either.
#[test]
fn truncated_replies_pass_unchanged() {
    let h = Harness::new(CONFIG);
    h.expect("SYN", FROM_POD, &pkt((POD, 40000), (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    h.expect("UDP", FROM_POD, &pkt((POD, 5000), (REMOTE, 53), L4::Udp, b""), OK, &[("flow_opened", 1)]);
    let tcp_reply = pkt((GW, GW_TCP), (POD, 40000), L4::Tcp(ACK), b"");
    let udp_reply = pkt((GW, GW_UDP), (POD, 5000), L4::Udp, b"");
    every_prefix_is_passed_or_dropped(&h, TO_POD, &tcp_reply, false);
    every_prefix_is_passed_or_dropped(&h, TO_POD, &udp_reply, false);
    h.expect("whole TCP reply", TO_POD, &tcp_reply, OK, &[("flow_answered", 1)]);
    h.expect("whole UDP reply", TO_POD, &udp_reply, OK, &[("flow_answered", 1)]);
}

/// An IP datagram whose total length ends inside the L4 header it claims, in a frame long
/// enough to hold that header (e.g. Ethernet padding behind it): the L4 checksum field is not
/// part of the datagram, so it cannot be fixed and the packet must not be rewritten; bound
/// for a remote pod it is dropped rather than sent untranslated.
#[test]
fn l4_header_beyond_ip_total_length_is_not_rewritten_but_dropped() {
    let h = Harness::new(CONFIG);
    let cases = [
        ("TCP, 8 of 20 header bytes in the datagram", pkt((POD, 40000), (REMOTE, 8080), L4::Tcp(ACK), b""), 28),
        (
            "UDP, 4 of 8 header bytes in the datagram",
            pkt((POD, 5000), (REMOTE, 53), L4::Udp, b"padpadpadpadpadpad"),
            24,
        ),
    ];
    for (what, mut input, total_len) in cases {
        edit_ip_header(&mut input, |ip| ip.total_len = total_len);
        let before = h.counters();
        let (verdict, _) = h.run(FROM_POD, &input);
        assert_eq!(verdict, SHOT, "{what}: verdict {}", verdict_name(verdict));
        let after = h.counters();
        assert_eq!(after["remote_parse_error"] - before["remote_parse_error"], 1, "{what}");
        assert_eq!(
            after["truncated"] + after["malformed"] - before["truncated"] - before["malformed"],
            1,
            "{what}: truncated+malformed"
        );
        assert_eq!(after["flow_opened"], before["flow_opened"], "{what}");
    }
    assert_eq!(h.flow_counts(), (0, 0));
}

// ---------------------------------------------------------------------------------------
// 9: a peer without UDP
// ---------------------------------------------------------------------------------------

#[test]
fn udp_to_a_peer_without_udp_nodeport_passes() {
    let h = Harness::new(&without_udp_port());
    let udp = pkt((POD, 5000), (REMOTE, 53), L4::Udp, b"q");
    h.expect_unchanged("UDP", FROM_POD, &udp, &[("no_gateway_for_proto", 1)]);
    h.expect_unchanged("UDP again", FROM_POD, &udp, &[("no_gateway_for_proto", 1)]);
    assert_eq!(h.flow_counts(), (0, 0));

    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    let out = h.expect("TCP", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    assert_translated("TCP", &out, &pkt(pod, gw, L4::Tcp(SYN), b""), pod, gw);
}

#[test]
fn udp_only_uses_gateways_with_a_udp_nodeport() {
    // 192.0.2.2 takes TCP only; 192.0.2.3 takes both.
    let yaml =
        format!("{}      - address: 192.0.2.3\n        port: 31674\n        udpPort: 31675\n", without_udp_port());
    let h = Harness::new(&yaml);
    let mut tcp_gateways = [0; 2];
    for i in 0..32u16 {
        let pod = (POD, 5000 + i);
        let out = h.expect("UDP", FROM_POD, &pkt(pod, (REMOTE, 53), L4::Udp, b"q"), OK, &[("flow_opened", 1)]);
        assert_translated("UDP", &out, &pkt(pod, (GW2, GW_UDP), L4::Udp, b"q"), pod, (GW2, GW_UDP));

        let pod = (POD, 40000 + i);
        let out = h.expect("TCP", FROM_POD, &pkt(pod, (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
        let dst = checked(&out).dst;
        tcp_gateways[usize::from(*dst.ip() == Ipv4Addr::from(GW2))] += 1;
        assert_eq!(dst.port(), GW_TCP);
    }
    assert!(tcp_gateways.iter().all(|n| *n > 0), "TCP should use both gateways: {tcp_gateways:?}");
}

// ---------------------------------------------------------------------------------------
// 10: gateways
// ---------------------------------------------------------------------------------------

#[test]
fn flows_spread_over_live_gateways_and_stick_to_theirs() {
    let mut h = Harness::new(&two_gateways());
    let id = peer_id("cluster2");
    let pg = h.maps.peers.get(&id, 0).unwrap();
    assert_eq!(pg.count, 2);
    assert!(pg.gateways[..2].iter().all(|g| g.flags & GW_UP != 0), "both gateways start up");
    let gateways = [GW, GW2];

    // 64 flows: the gateway each gets is the one the shared hash predicts, and both are used.
    let flow = |i: u16| ((POD, 40000 + i), ([10, 245, 0, 20 + (i % 8) as u8], 8080));
    let predicted = |src: Ep, dst: Ep| gateways[gateway_start(&flow_key(src, dst, IPPROTO_TCP), 2) as usize];
    let mut pinned = Vec::new();
    for i in 0..64 {
        let (src, dst) = flow(i);
        let out = h.expect("new flow", FROM_POD, &pkt(src, dst, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
        let gw = (predicted(src, dst), GW_TCP);
        assert_translated("new flow", &out, &pkt(src, gw, L4::Tcp(SYN), b""), src, gw);
        pinned.push((src, dst, gw));
    }
    let on_second = pinned.iter().filter(|(_, _, gw)| gw.0 == GW2).count();
    assert!(on_second > 0 && on_second < 64, "64 flows should use both gateways ({on_second} on 192.0.2.3)");

    // Every later packet of every flow goes to the same gateway.
    let all_stick = |h: &Harness, what: &str| {
        for (src, dst, gw) in &pinned {
            let out = h.expect(what, FROM_POD, &pkt(*src, *dst, L4::Tcp(ACK), PAYLOAD), OK, &[]);
            assert_translated(what, &out, &pkt(*src, *gw, L4::Tcp(ACK), PAYLOAD), *src, *gw);
        }
    };
    all_stick(&h, "established flow");
    all_stick(&h, "established flow, again");
    assert_eq!(h.flow_counts(), (64, 64));

    // 192.0.2.3 goes down: new flows all go to 192.0.2.2, including those whose hash starts
    // at 192.0.2.3. The datapath itself never moves an established flow: its state pins the
    // gateway, and only the agent (by purging that state) sends it elsewhere.
    h.set_gateway_up(GW2, false);
    let mut would_have_been_second = 0;
    for i in 0..64 {
        let src = (POD, 50000 + i);
        let dst = ([10, 245, 1, 20 + (i % 8) as u8], 8080);
        if predicted(src, dst) == GW2 {
            would_have_been_second += 1;
        }
        let out = h.expect(
            "new flow, one gateway down",
            FROM_POD,
            &pkt(src, dst, L4::Tcp(SYN), b""),
            OK,
            &[("flow_opened", 1)],
        );
        assert_translated(
            "new flow, one gateway down",
            &out,
            &pkt(src, (GW, GW_TCP), L4::Tcp(SYN), b""),
            src,
            (GW, GW_TCP),
        );
    }
    assert!(would_have_been_second > 0, "no new flow would have started at 192.0.2.3; the test proves nothing");
    all_stick(&h, "established flow after a gateway went down");

    // Both down: a new flow is dropped, without state.
    h.set_gateway_up(GW, false);
    let counts = h.flow_counts();
    let new = pkt((POD, 60000), (REMOTE, 8080), L4::Tcp(SYN), b"");
    h.expect("new flow, all gateways down", FROM_POD, &new, SHOT, &[("no_live_gateway", 1)]);
    let udp = pkt((POD, 60000), (REMOTE, 53), L4::Udp, b"q");
    h.expect("new UDP flow, all gateways down", FROM_POD, &udp, SHOT, &[("no_live_gateway", 1)]);
    assert_eq!(h.flow_counts(), counts);

    // 192.0.2.3 back up: a new flow whose hash starts there goes there again.
    h.set_gateway_up(GW2, true);
    let (src, dst) =
        (0..1000).map(|i: u16| ((POD, 1024 + i), (REMOTE, 8080))).find(|(s, d)| predicted(*s, *d) == GW2).unwrap();
    let out =
        h.expect("new flow, 192.0.2.3 back", FROM_POD, &pkt(src, dst, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    assert_translated(
        "new flow, 192.0.2.3 back",
        &out,
        &pkt(src, (GW2, GW_TCP), L4::Tcp(SYN), b""),
        src,
        (GW2, GW_TCP),
    );
}

// ---------------------------------------------------------------------------------------
// 11: flow state
// ---------------------------------------------------------------------------------------

#[test]
fn a_new_flow_records_forward_and_reverse_state() {
    let h = Harness::new(CONFIG);
    assert_eq!(h.flow_counts(), (0, 0));
    h.expect("SYN", FROM_POD, &pkt((POD, 40000), (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);

    let fwd = h.nat_fwd();
    assert_eq!(fwd.len(), 1);
    let (k, f) = fwd[0];
    // Keys and values hold network byte order: the bytes in memory are the wire bytes.
    assert_eq!(k.src_be.to_ne_bytes(), POD);
    assert_eq!(k.dst_be.to_ne_bytes(), REMOTE);
    assert_eq!(k.sport_be.to_ne_bytes(), 40000u16.to_be_bytes());
    assert_eq!(k.dport_be.to_ne_bytes(), 8080u16.to_be_bytes());
    assert_eq!((k.proto, k._pad), (IPPROTO_TCP, [0; 3]));
    assert_eq!(f.gw_addr_be.to_ne_bytes(), GW);
    assert_eq!(f.gw_port_be.to_ne_bytes(), GW_TCP.to_be_bytes());
    assert_eq!(f.nat_sport_be.to_ne_bytes(), 40000u16.to_be_bytes());
    assert_eq!(f.peer_id, peer_id("cluster2"));
    assert_eq!(f.flags, 0);
    assert_ne!(f.ifindex, 0, "the pod's interface is recorded");
    assert_ne!(f.last_seen_ns, 0);

    let rev = h.nat_rev();
    assert_eq!(rev.len(), 1);
    let (rk, r) = rev[0];
    assert_eq!(rk.src_be.to_ne_bytes(), GW);
    assert_eq!(rk.dst_be.to_ne_bytes(), POD);
    assert_eq!(rk.sport_be.to_ne_bytes(), GW_TCP.to_be_bytes());
    assert_eq!(rk.dport_be.to_ne_bytes(), 40000u16.to_be_bytes());
    assert_eq!((rk.proto, rk._pad), (IPPROTO_TCP, [0; 3]));
    assert_eq!(r.remote_addr_be.to_ne_bytes(), REMOTE);
    assert_eq!(r.remote_port_be.to_ne_bytes(), 8080u16.to_be_bytes());
    assert_eq!(r.pod_port_be.to_ne_bytes(), 40000u16.to_be_bytes());
    assert_eq!((r.flags, r.peer_id), (FLOW_UNANSWERED, peer_id("cluster2")), "no reply yet");
    assert_ne!(r.last_seen_ns, 0);

    // The two entries point at each other as meshnet-common says.
    assert_eq!(FlowKey::rev_of_fwd(&k, &f), rk);
    assert_eq!(FlowKey::fwd_of_rev(&rk, &r), k);
    assert_eq!(k, flow_key((POD, 40000), (REMOTE, 8080), IPPROTO_TCP));

    // A UDP flow gets its own pair of entries with the UDP NodePort.
    h.expect("UDP", FROM_POD, &pkt((POD, 5000), (REMOTE, 53), L4::Udp, b"q"), OK, &[("flow_opened", 1)]);
    assert_eq!(h.flow_counts(), (2, 2));
    let uk = flow_key((POD, 5000), (REMOTE, 53), IPPROTO_UDP);
    let uf = h.fwd_of(&uk);
    assert_eq!(uf.gw_port_be.to_ne_bytes(), GW_UDP.to_be_bytes());
    let ur = h.rev_of(&FlowKey::rev_of_fwd(&uk, &uf));
    assert_eq!(FlowKey::fwd_of_rev(&FlowKey::rev_of_fwd(&uk, &uf), &ur), uk);
}

/// FIN and RST are recorded per direction; a new SYN on a reused tuple clears the old close.
#[test]
fn tcp_close_flags_are_recorded_per_direction() {
    let h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    let fk = flow_key(pod, remote, IPPROTO_TCP);
    let rk = flow_key(gw, pod, IPPROTO_TCP);
    let flags = |h: &Harness| (h.fwd_of(&fk).flags, h.rev_of(&rk).flags);
    // Only flow events count: the flow's opening, and each answer to the pod's (re)opening.
    let from_pod = |h: &Harness, f: u8, moved: &[(&str, u64)]| {
        h.expect("from pod", FROM_POD, &pkt(pod, remote, L4::Tcp(f), b""), OK, moved);
    };
    let from_gw = |h: &Harness, f: u8, moved: &[(&str, u64)]| {
        h.expect("from gateway", TO_POD, &pkt(gw, pod, L4::Tcp(f), b""), OK, moved);
    };
    let answered: &[(&str, u64)] = &[("flow_answered", 1)];

    from_pod(&h, SYN, &[("flow_opened", 1)]);
    from_gw(&h, SYN | ACK, answered);
    from_pod(&h, ACK, &[]);
    assert_eq!(flags(&h), (0, 0));
    from_pod(&h, FIN | ACK, &[]);
    assert_eq!(flags(&h), (FLOW_FIN_POD, 0));
    from_gw(&h, FIN | ACK, &[]);
    assert_eq!(flags(&h), (FLOW_FIN_POD, FLOW_FIN_PEER));

    // The tuple is reused for a new connection, which the peer resets.
    from_pod(&h, SYN, &[]);
    assert_eq!(flags(&h).0, 0, "a new SYN clears the pod side's close");
    from_gw(&h, RST | ACK, answered);
    assert_eq!(flags(&h).1 & FLOW_RST, FLOW_RST);

    // And reused once more: after the handshake neither side may still say closed or reset.
    from_pod(&h, SYN, &[]);
    from_gw(&h, SYN | ACK, answered);
    from_pod(&h, ACK, &[]);
    let (f, r) = flags(&h);
    assert_eq!(f | r, 0, "flags after a fresh handshake on a reused tuple: fwd {f:#x}, rev {r:#x}");
    assert_eq!(h.flow_counts(), (1, 1));
}

// ---------------------------------------------------------------------------------------
// Flow state under pressure
// ---------------------------------------------------------------------------------------

/// A full flow table refuses new flows (counted `nat_table_full`) and never evicts an
/// established one for them, whether the new flow's reply tuple is free or collides.
#[test]
fn a_full_flow_table_refuses_new_flows_and_keeps_every_established_one() {
    const MAX: u16 = 16;
    let mut h = Harness::with_max_flows(CONFIG, Some(u32::from(MAX)));
    for i in 0..MAX {
        let pod = (POD, 20000 + i);
        h.expect("established", FROM_POD, &pkt(pod, (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    }
    assert_eq!(h.flow_counts(), (usize::from(MAX), usize::from(MAX)));
    let before_fwd = h.nat_fwd();
    let before_rev = h.nat_rev();

    // 150 %: as many new flows again and half as many more, among them ones whose reply
    // tuple collides with an established flow's (same pod port, another remote pod).
    for i in 0..MAX + MAX / 2 {
        let (what, input) = if i % 2 == 0 {
            ("new flow", pkt((POD, 30000 + i), (REMOTE, 8080), L4::Tcp(SYN), b""))
        } else {
            ("colliding new flow", pkt((POD, 20000 + i % MAX), (REMOTE2, 8080), L4::Tcp(SYN), b""))
        };
        h.expect(what, FROM_POD, &input, SHOT, &[("nat_table_full", 1)]);
        let udp = pkt((POD, 40000 + i), (REMOTE, 53), L4::Udp, b"q");
        h.expect("new UDP flow", FROM_POD, &udp, SHOT, &[("nat_table_full", 1)]);
    }
    assert_eq!(h.counter("nat_table_full"), 3 * u64::from(MAX));
    let strip_f = |v: Vec<(FlowKey, NatFwd)>| v.into_iter().map(|(k, f)| (k, NatFwd { last_seen_ns: 0, ..f })).collect::<Vec<_>>();
    let strip_r = |v: Vec<(FlowKey, NatRev)>| v.into_iter().map(|(k, r)| (k, NatRev { last_seen_ns: 0, ..r })).collect::<Vec<_>>();
    assert_eq!(strip_f(h.nat_fwd()), strip_f(before_fwd), "established forward entries changed");
    assert_eq!(strip_r(h.nat_rev()), strip_r(before_rev), "established reverse entries changed");

    // Every established flow still works both ways.
    for i in 0..MAX {
        let pod = (POD, 20000 + i);
        let out = h.expect("data", FROM_POD, &pkt(pod, (REMOTE, 8080), L4::Tcp(ACK), PAYLOAD), OK, &[]);
        assert_translated("data", &out, &pkt(pod, (GW, GW_TCP), L4::Tcp(ACK), PAYLOAD), pod, (GW, GW_TCP));
        let reply = pkt((GW, GW_TCP), pod, L4::Tcp(ACK), b"ok");
        let out = h.expect("reply", TO_POD, &reply, OK, &[("flow_answered", 1)]);
        assert_translated("reply", &out, &pkt((REMOTE, 8080), pod, L4::Tcp(ACK), b"ok"), (REMOTE, 8080), pod);
    }

    // Room again (the agent's GC expired one): new flows are taken.
    h.maps.nat_fwd.remove(&flow_key((POD, 20000), (REMOTE, 8080), IPPROTO_TCP)).unwrap();
    h.maps.nat_rev.remove(&flow_key((GW, GW_TCP), (POD, 20000), IPPROTO_TCP)).unwrap();
    h.expect("new flow with room", FROM_POD, &pkt((POD, 30001), (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
}

/// Makes a flow's entry look idle for longer than the half check interval.
fn age_fwd(h: &mut Harness, key: &FlowKey) {
    let f = h.fwd_of(key);
    h.maps.nat_fwd.insert(key, NatFwd { last_seen_ns: 0, ..f }, 0).unwrap();
}

fn age_rev(h: &mut Harness, key: &FlowKey) {
    let r = h.rev_of(key);
    h.maps.nat_rev.insert(key, NatRev { last_seen_ns: 0, ..r }, 0).unwrap();
}

/// A forward entry whose reverse half was lost (a race with GC) gets it back from the next
/// packet after an idle spell, so replies are restored again.
#[test]
fn a_lost_reverse_entry_is_recreated_from_the_forward_path() {
    let mut h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let (fk, rk) = (flow_key(pod, remote, IPPROTO_TCP), flow_key(gw, pod, IPPROTO_TCP));
    let rev_before = h.rev_of(&rk);
    h.maps.nat_rev.remove(&rk).unwrap();

    // A busy flow is not checked on every packet.
    h.expect("busy", FROM_POD, &pkt(pod, remote, L4::Tcp(ACK), PAYLOAD), OK, &[]);
    assert_eq!(h.flow_counts(), (1, 0));
    // After an idle spell it is.
    age_fwd(&mut h, &fk);
    h.expect("after idle", FROM_POD, &pkt(pod, remote, L4::Tcp(ACK), PAYLOAD), OK, &[("rev_restored", 1)]);
    assert_eq!(h.flow_counts(), (1, 1));
    // Re-created as answered: the forward path cannot tell whether a reply ever came.
    let answered = NatRev { last_seen_ns: 0, flags: rev_before.flags & !FLOW_UNANSWERED, ..rev_before };
    assert_eq!(NatRev { last_seen_ns: 0, ..h.rev_of(&rk) }, answered);
    let out = h.expect("reply", TO_POD, &pkt(gw, pod, L4::Tcp(ACK), b"ok"), OK, &[]);
    assert_translated("reply", &out, &pkt(remote, pod, L4::Tcp(ACK), b"ok"), remote, pod);
}

/// A reverse entry whose forward half was lost re-creates it, so the flow keeps its gateway
/// and port even when that gateway no longer takes new flows.
#[test]
fn a_lost_forward_entry_is_recreated_and_the_flow_keeps_its_tuple() {
    let mut h = Harness::new(&two_gateways());
    // Two flows from one pod port to two remote pods: the second is remapped.
    let (a, b) = (flow_key((POD, 40000), (REMOTE, 8080), IPPROTO_TCP), flow_key((POD, 40000), (REMOTE2, 8080), IPPROTO_TCP));
    h.expect("a", FROM_POD, &pkt((POD, 40000), (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let fa = h.fwd_of(&a);
    // Find a second flow pinned to the same gateway so that it collides and is remapped.
    let _ = b;
    let mut other = None;
    for dport in 8080..8200 {
        let k = flow_key((POD, 40000), (REMOTE2, dport), IPPROTO_TCP);
        let start = gateway_start(&k, 2);
        if [GW, GW2][start as usize] == fa.gw_addr_be.to_ne_bytes() {
            other = Some((dport, k));
            break;
        }
    }
    let (dport, kb) = other.expect("a tuple on the same gateway");
    let moved: &[(&str, u64)] = &[("flow_opened", 1), ("port_remap", 1)];
    h.expect("b", FROM_POD, &pkt((POD, 40000), (REMOTE2, dport), L4::Tcp(SYN), b""), OK, moved);
    let fb = h.fwd_of(&kb);
    assert_ne!(fb.flags & FLOW_REMAPPED, 0);
    let gw_addr = fb.gw_addr_be.to_ne_bytes();
    let rkb = FlowKey::rev_of_fwd(&kb, &fb);

    // Its gateway stops taking new flows, and its forward entry is lost.
    h.set_gateway_up(gw_addr, false);
    h.maps.nat_fwd.remove(&kb).unwrap();
    age_rev(&mut h, &rkb);
    let nat_port = u16::from_be(fb.nat_sport_be);
    let reply = pkt((gw_addr, GW_TCP), (POD, nat_port), L4::Tcp(ACK), b"ok");
    let out = h.expect("reply", TO_POD, &reply, OK, &[("flow_answered", 1), ("fwd_restored", 1)]);
    assert_translated("reply", &out, &pkt((REMOTE2, dport), (POD, 40000), L4::Tcp(ACK), b"ok"), (REMOTE2, dport), (POD, 40000));
    assert_eq!(NatFwd { last_seen_ns: 0, ..h.fwd_of(&kb) }, NatFwd { last_seen_ns: 0, ..fb });

    // The pod's next packet leaves on the same tuple: same (down) gateway, same port.
    let out = h.expect("data", FROM_POD, &pkt((POD, 40000), (REMOTE2, dport), L4::Tcp(ACK), PAYLOAD), OK, &[]);
    assert_translated("data", &out, &pkt((POD, nat_port), (gw_addr, GW_TCP), L4::Tcp(ACK), PAYLOAD), (POD, nat_port), (gw_addr, GW_TCP));
}

/// A gateway down past its grace period loses the flows it no longer answers (their pod has
/// sent on, unanswered, for longer than the grace period), and keeps the others: health
/// probes open new connections, and a gateway that refuses those (a full backlog, a SYN
/// filter) may still carry the ones it has. An idle flow stays; one whose pod speaks after a
/// long silence has the grace period for its answer.
#[test]
fn an_evicted_gateway_keeps_the_flows_it_still_answers() {
    let mut h = Harness::new(CONFIG);
    let (remote, gw) = ((REMOTE, 8080), (GW, GW_TCP));
    let (answered, unanswered, idle) = ((POD, 40001), (POD, 40002), (POD, 40003));
    for (what, pod) in [("answered", answered), ("unanswered", unanswered), ("idle", idle)] {
        h.expect(what, FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    }
    const SEC: u64 = 1_000_000_000;
    let grace = 60 * SEC;
    let t0 = meshnet::dump::monotonic_ns();
    let stamp = |h: &mut Harness, pod: Ep, sent: u64, replied: u64| h.stamp(pod, remote, gw, sent, replied);
    stamp(&mut h, answered, t0 + 100 * SEC, t0 + 100 * SEC);
    stamp(&mut h, unanswered, t0 + 100 * SEC, t0 + 30 * SEC);
    stamp(&mut h, idle, t0, t0);
    h.set_gateway_up(GW, false);
    let mut desired = Config::from_yaml(CONFIG).unwrap().desired();
    let gw_id = (std::net::Ipv4Addr::from(GW), GW_TCP);
    desired.apply_health(&BTreeSet::from([gw_id]));
    let evict = BTreeSet::from([gw_id]);
    let kept = |h: &Harness, pod: Ep| h.maps.nat_fwd.get(&flow_key(pod, remote, IPPROTO_TCP), 0).is_ok();
    // The first look: the unanswered flow's pod may have just spoken after a silence; it gets
    // the grace period for its answer, and every flow stays.
    let look = |h: &mut Harness, at: u64| {
        let e = meshnet::maps::Evicting { evict: evict.clone(), grace_ns: grace, now_ns: at, ..Default::default() };
        h.maps.sync_evicting(&desired, &e).unwrap().flows_purged
    };
    assert_eq!(look(&mut h, t0 + 101 * SEC), 0);
    // Its pod sends on, unanswered: the grace period runs from the look that sees it.
    stamp(&mut h, unanswered, t0 + 140 * SEC, t0 + 30 * SEC);
    assert_eq!(look(&mut h, t0 + 150 * SEC), 0);
    stamp(&mut h, unanswered, t0 + 200 * SEC, t0 + 30 * SEC);
    assert_eq!(look(&mut h, t0 + 205 * SEC), 0, "purged before the grace period passed unanswered");
    stamp(&mut h, unanswered, t0 + 210 * SEC, t0 + 30 * SEC);
    assert_eq!(look(&mut h, t0 + 212 * SEC), 1);
    assert!(kept(&h, answered) && kept(&h, idle), "a flow still answered, or idle, was purged");
    assert!(!kept(&h, unanswered), "a flow unanswered for longer than the grace period was kept");
    // The kept flow goes on through its gateway, both ways.
    h.expect("data", FROM_POD, &pkt(answered, remote, L4::Tcp(ACK), PAYLOAD), OK, &[]);
    h.expect("reply", TO_POD, &pkt(gw, answered, L4::Tcp(ACK), PAYLOAD), OK, &[("flow_answered", 1)]);
    // Its pod sends again after a silence: answered within the grace period, it stays.
    stamp(&mut h, answered, t0 + 300 * SEC, t0 + 100 * SEC);
    assert_eq!(look(&mut h, t0 + 300 * SEC), 0);
    stamp(&mut h, answered, t0 + 300 * SEC, t0 + 301 * SEC);
    assert_eq!(look(&mut h, t0 + 400 * SEC), 0);
    // The pod's ACK of that reply, stamped a clock tick after it, and nothing since: idle,
    // not unanswered, however long it stays so.
    stamp(&mut h, answered, t0 + 302 * SEC, t0 + 301 * SEC);
    assert_eq!(look(&mut h, t0 + 303 * SEC), 0);
    // And a window update seconds later, on the other side of a look: silent again after it.
    stamp(&mut h, answered, t0 + 310 * SEC, t0 + 301 * SEC);
    assert_eq!(look(&mut h, t0 + 311 * SEC), 0);
    assert_eq!(look(&mut h, t0 + 900 * SEC), 0, "an idle flow whose last packets were the pod's was purged");
    // Then the gateway stops answering it, and the idle one's pod sends unanswered too:
    // both go once the grace period has passed so, their pods sending on.
    stamp(&mut h, answered, t0 + 1000 * SEC, t0 + 301 * SEC);
    stamp(&mut h, idle, t0 + 1000 * SEC, t0);
    assert_eq!(look(&mut h, t0 + 1000 * SEC), 0);
    stamp(&mut h, answered, t0 + 1030 * SEC, t0 + 301 * SEC);
    stamp(&mut h, idle, t0 + 1030 * SEC, t0);
    assert_eq!(look(&mut h, t0 + 1061 * SEC), 1, "the flow unanswered since 1000 s");
    stamp(&mut h, idle, t0 + 1100 * SEC, t0);
    assert_eq!(look(&mut h, t0 + 1122 * SEC), 0, "one more unanswered packet is a round trip's wait");
    stamp(&mut h, idle, t0 + 1150 * SEC, t0);
    assert_eq!(look(&mut h, t0 + 1183 * SEC), 1, "the flow unanswered since 1061 s");
    assert_eq!(h.flow_counts(), (0, 0));
}

/// A gateway that leaves a published peer's list (its pod not Ready for a moment, a rollout,
/// a NodePort change) may still carry the flows it has: they stay through the grace period
/// from when the agent first saw it gone, then go only as an evicted gateway's do, once
/// unanswered. A gateway back in the list keeps its flows, whatever time has passed.
#[test]
fn a_gateway_gone_from_the_list_keeps_its_flows_through_the_grace_period() {
    let mut h = Harness::new(CONFIG);
    let (remote, gw) = ((REMOTE, 8080), (GW, GW_TCP));
    let (answered, unanswered) = ((POD, 41001), (POD, 41002));
    for (what, pod) in [("answered", answered), ("unanswered", unanswered)] {
        h.expect(what, FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    }
    const SEC: u64 = 1_000_000_000;
    let grace = 60 * SEC;
    let t0 = meshnet::dump::monotonic_ns();
    let stamp = |h: &mut Harness, pod: Ep, sent: u64, replied: u64| h.stamp(pod, remote, gw, sent, replied);
    let kept = |h: &Harness, pod: Ep| h.maps.nat_fwd.get(&flow_key(pod, remote, IPPROTO_TCP), 0).is_ok();
    // The peer's list now names another gateway only.
    let moved = Config::from_yaml(&CONFIG.replace("192.0.2.2", "192.0.2.3")).unwrap().desired();
    let with_gw = Config::from_yaml(CONFIG).unwrap().desired();
    let look = |h: &mut Harness, desired: &meshnet::config::Desired, at: u64| {
        h.maps.sync_evicting(desired, &meshnet::maps::Evicting { grace_ns: grace, now_ns: at, ..Default::default() }).unwrap().flows_purged
    };
    stamp(&mut h, answered, t0 + 10 * SEC, t0 + 10 * SEC);
    stamp(&mut h, unanswered, t0 + 10 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 10 * SEC), 0, "a gateway's flows were purged as it left the list");
    assert!(h.maps.retiring());
    // Within the grace period, both stay, and the kept flows still go through their gateway.
    stamp(&mut h, unanswered, t0 + 40 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 50 * SEC), 0);
    h.expect("data", FROM_POD, &pkt(answered, remote, L4::Tcp(ACK), PAYLOAD), OK, &[]);
    h.expect("reply", TO_POD, &pkt(gw, answered, L4::Tcp(ACK), PAYLOAD), OK, &[("flow_answered", 1)]);
    assert_eq!(h.fwd_of(&flow_key(answered, remote, IPPROTO_TCP)).gw_addr_be, u32::from_be_bytes(GW).to_be());
    // Back in the list a moment, then gone again: its flows are its own again, and the
    // grace period counts from the new departure.
    assert_eq!(look(&mut h, &with_gw, t0 + 55 * SEC), 0);
    assert!(!h.maps.retiring());
    stamp(&mut h, answered, t0 + 100 * SEC, t0 + 100 * SEC);
    stamp(&mut h, unanswered, t0 + 100 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 100 * SEC), 0, "purged at once on leaving the list again");
    stamp(&mut h, unanswered, t0 + 150 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 155 * SEC), 0, "purged within the grace period");
    // Past it: the answered flow stays; the unanswered one goes once its pod has sent on,
    // unanswered, past the grace period (as an evicted gateway's flows do).
    stamp(&mut h, unanswered, t0 + 170 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 170 * SEC), 0);
    stamp(&mut h, unanswered, t0 + 200 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 200 * SEC), 0);
    stamp(&mut h, unanswered, t0 + 240 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 240 * SEC), 0, "purged before two looks saw it sent on");
    stamp(&mut h, unanswered, t0 + 280 * SEC, t0 + 5 * SEC);
    assert_eq!(look(&mut h, &moved, t0 + 280 * SEC), 1);
    assert!(kept(&h, answered) && !kept(&h, unanswered));
    assert!(h.maps.retiring(), "the answered flow still uses the gone gateway");
    // A gateway an operator took out of the config file is to be left now: its flows go at
    // once, answered or not (as they do without a grace period).
    let file = meshnet::maps::Evicting { grace_ns: grace, now_ns: t0 + 300 * SEC, file_peers: BTreeSet::from([meshnet::config::peer_id("cluster2")]), ..Default::default() };
    assert_eq!(h.maps.sync_evicting(&moved, &file).unwrap().flows_purged, 1);
    assert!(!kept(&h, answered) && !h.maps.retiring());
}

/// An RST marks the flow closing, but later segments in either direction clear it: TCP
/// ignores an out-of-window RST, and so must the flow's expiry.
#[test]
fn an_rst_followed_by_traffic_does_not_doom_the_flow() {
    let h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    let (fk, rk) = (flow_key(pod, remote, IPPROTO_TCP), flow_key(gw, pod, IPPROTO_TCP));
    let flags = |h: &Harness| (h.fwd_of(&fk).flags & FLOW_RST, h.rev_of(&rk).flags & FLOW_RST);
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    h.expect("SYN-ACK", TO_POD, &pkt(gw, pod, L4::Tcp(SYN | ACK), b""), OK, &[("flow_answered", 1)]);

    // A stray RST from the peer side marks both halves...
    h.expect("stray RST", TO_POD, &pkt(gw, pod, L4::Tcp(RST), b""), OK, &[]);
    assert_eq!(flags(&h), (FLOW_RST, FLOW_RST));
    // ...and the pod's next segment clears both.
    h.expect("data", FROM_POD, &pkt(pod, remote, L4::Tcp(ACK | PSH), PAYLOAD), OK, &[]);
    assert_eq!(flags(&h), (0, 0));

    // The same the other way round: an RST from the pod, then a segment from the peer.
    h.expect("pod RST", FROM_POD, &pkt(pod, remote, L4::Tcp(RST), b""), OK, &[]);
    assert_eq!(flags(&h), (FLOW_RST, FLOW_RST));
    h.expect("peer ACK", TO_POD, &pkt(gw, pod, L4::Tcp(ACK), b""), OK, &[("flow_answered", 1)]);
    assert_eq!(flags(&h), (0, 0));

    // An RST that is the last word stays.
    h.expect("final RST", TO_POD, &pkt(gw, pod, L4::Tcp(RST | ACK), b""), OK, &[]);
    assert_eq!(flags(&h), (FLOW_RST, FLOW_RST));
}

// ---------------------------------------------------------------------------------------
// ICMP errors about translated flows
// ---------------------------------------------------------------------------------------

/// A router between the nodes (a VPN hop with a smaller MTU, say).
const ROUTER: [u8; 4] = [192, 0, 2, 254];

/// An ICMP error from `ROUTER` to the pod quoting the first 28 bytes (IPv4 header and 8 L4
/// bytes) of `quoted`, a whole frame.
fn icmp_error(icmp: etherparse::Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(HOST_MAC, POD_MAC)
        .ipv4(ROUTER, POD, 64)
        .icmpv4(icmp)
        .write(&mut out, &quoted[ETH_HLEN..ETH_HLEN + 28])
        .unwrap();
    out
}

/// "Fragmentation needed", port unreachable and time exceeded about translated flows reach
/// the pod quoting the packet as the pod sent it (remote pod address and ports, the pod's
/// own port even when remapped), with valid quoted IP and ICMP checksums; the result must
/// equal, byte for byte, what etherparse builds from the untranslated quote.
#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    use etherparse::{icmpv4, Icmpv4Type};
    let h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    // A colliding UDP flow, so that one quote carries a remapped port.
    let (upod, ua, ub) = ((POD, 5000), (REMOTE, 53), (REMOTE2, 53));
    h.expect("UDP a", FROM_POD, &pkt(upod, ua, L4::Udp, b"q"), OK, &[("flow_opened", 1)]);
    h.expect("UDP b", FROM_POD, &pkt(upod, ub, L4::Udp, b"q"), OK, &[("flow_opened", 1), ("port_remap", 1)]);
    let fb = h.fwd_of(&flow_key(upod, ub, IPPROTO_UDP));
    let wire = u16::from_be(fb.nat_sport_be);
    assert_ne!(wire, 5000);

    let frag_needed = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let port_unreach = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
    let ttl = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
    let tcp_sent = pkt(pod, gw, L4::Tcp(ACK | PSH), PAYLOAD);
    let tcp_pod = pkt(pod, remote, L4::Tcp(ACK | PSH), PAYLOAD);
    for (what, icmp) in [("fragmentation needed", frag_needed.clone()), ("time exceeded", ttl)] {
        let out = h.expect(what, TO_POD, &icmp_error(icmp.clone(), &tcp_sent), OK, &[("icmp_error_translated", 1)]);
        assert_bytes_eq(what, &out, &icmp_error(icmp, &tcp_pod));
    }

    // UDP: the quoted UDP checksum is left as it was (nothing checks it), so the expected
    // quote carries the original one.
    let udp_sent = pkt((POD, wire), (GW, GW_UDP), L4::Udp, b"q");
    let mut udp_pod = pkt(upod, ub, L4::Udp, b"q");
    let csum = ETH_HLEN + 20 + 6;
    udp_pod[csum..csum + 2].copy_from_slice(&udp_sent[csum..csum + 2]);
    let out = h.expect("port unreachable", TO_POD, &icmp_error(port_unreach.clone(), &udp_sent), OK, &[("icmp_error_translated", 1)]);
    assert_bytes_eq("port unreachable", &out, &icmp_error(port_unreach, &udp_pod));

    // Not about a translated flow, or not an error: unchanged.
    let others = [
        ("about a flow meshnet does not know", icmp_error(frag_needed.clone(), &pkt((POD, 40001), gw, L4::Tcp(ACK), b""))),
        ("about a local flow", icmp_error(frag_needed, &pkt(pod, (LOCAL_POD, 80), L4::Tcp(ACK), b""))),
        ("an echo reply", pkt((REMOTE, 1), (POD, 1), L4::Icmp, b"pong")),
    ];
    for (what, input) in &others {
        h.expect_unchanged(what, TO_POD, input, &[]);
    }
    // Cut short before the quoted ports: not translated.
    let cut = icmp_error(Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port), &tcp_sent);
    let mut short = cut[..cut.len() - 4].to_vec();
    edit_ip_header(&mut short, |ip| ip.total_len -= 4);
    h.expect_unchanged("truncated quote", TO_POD, &short, &[]);
}

// ---------------------------------------------------------------------------------------
// The agent's GC against the real maps
// ---------------------------------------------------------------------------------------

fn gc_config(closed_secs: u64) -> meshnet::config::GcConfig {
    use std::time::Duration;
    meshnet::config::GcConfig {
        udp_timeout: Duration::from_secs(120),
        tcp_closed_timeout: Duration::from_secs(closed_secs),
        tcp_timeout: Duration::from_secs(86_400),
        unanswered_timeout: Duration::from_secs(60),
        interval: Duration::from_secs(5),
    }
}

/// With a published flow clock the datapath stamps flows with it, not the kernel's clock,
/// and writes an established flow's entries only when it has moved on: between two ticks a
/// flow's packets write nothing. A tick a second later counts as an idle spell, which is when
/// the forward path looks at its reverse half.
#[test]
fn established_flows_are_stamped_with_the_published_clock_and_written_only_when_it_ticks() {
    let mut h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    let (fk, rk) = (flow_key(pod, remote, IPPROTO_TCP), flow_key(gw, pod, IPPROTO_TCP));
    // Far from the kernel's clock, so that a stamp from it cannot pass for the tick.
    let tick = meshnet::dump::monotonic_ns() + 1_000 * 1_000_000_000;
    h.maps.publish_clock(tick).unwrap();
    assert_eq!(h.maps.published_clock(), Some(tick));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    assert_eq!((h.fwd_of(&fk).last_seen_ns, h.rev_of(&rk).last_seen_ns), (tick, tick));

    // Entries stamped ahead of the clock: a packet that wrote them would set them back.
    let f = h.fwd_of(&fk);
    h.maps.nat_fwd.insert(fk, NatFwd { last_seen_ns: tick + 1, ..f }, 0).unwrap();
    let r = h.rev_of(&rk);
    h.maps.nat_rev.insert(rk, NatRev { last_seen_ns: tick + 1, ..r }, 0).unwrap();
    h.expect("data", FROM_POD, &pkt(pod, remote, L4::Tcp(ACK), PAYLOAD), OK, &[]);
    h.expect("reply", TO_POD, &pkt(gw, pod, L4::Tcp(ACK), b"ok"), OK, &[("flow_answered", 1)]);
    assert_eq!((h.fwd_of(&fk).last_seen_ns, h.rev_of(&rk).last_seen_ns), (tick + 1, tick + 1));
    // A flag change is written at once, whatever the clock.
    h.expect("FIN", FROM_POD, &pkt(pod, remote, L4::Tcp(FIN | ACK), b""), OK, &[]);
    assert_eq!(h.fwd_of(&fk).flags & FLOW_FIN_POD, FLOW_FIN_POD);
    assert_eq!(h.fwd_of(&fk).last_seen_ns, tick + 1);

    // The clock ticks two seconds on: the next packets stamp the new tick, and the first
    // one, after what is an idle spell by the tick, finds the reverse half gone and
    // restores it.
    h.maps.nat_rev.remove(&rk).unwrap();
    h.maps.publish_clock(tick + 2_000_000_000).unwrap();
    h.expect("after a tick", FROM_POD, &pkt(pod, remote, L4::Tcp(ACK), PAYLOAD), OK, &[("rev_restored", 1)]);
    assert_eq!(h.fwd_of(&fk).last_seen_ns, tick + 2_000_000_000);
    assert_eq!(h.rev_of(&rk).last_seen_ns, tick + 2_000_000_000);

    // The clock stands still for 200 s (the agent's loop stalled, or it was away): a UDP
    // flow stamped with the last tick may have been busy all along, and is not expired by
    // the first GC after the clock moves on, whatever its 120 s timeout; a flow idle since
    // before the stall is.
    let t1 = tick + 3_000_000_000;
    h.maps.publish_clock(t1).unwrap();
    let (upod, uremote) = ((POD, 5000), (REMOTE, 53));
    h.expect("UDP", FROM_POD, &pkt(upod, uremote, L4::Udp, b"q"), OK, &[("flow_opened", 1)]);
    let uk = flow_key(upod, uremote, IPPROTO_UDP);
    assert_eq!(h.fwd_of(&uk).last_seen_ns, t1);
    let (opod, oremote) = ((POD, 5001), (REMOTE, 53));
    h.expect("old UDP", FROM_POD, &pkt(opod, oremote, L4::Udp, b"q"), OK, &[("flow_opened", 1)]);
    let ok = flow_key(opod, oremote, IPPROTO_UDP);
    let old = h.fwd_of(&ok);
    h.maps.nat_fwd.insert(ok, NatFwd { last_seen_ns: t1 - 1, ..old }, 0).unwrap();
    let orev = FlowKey::rev_of_fwd(&ok, &old);
    let r = h.rev_of(&orev);
    h.maps.nat_rev.insert(orev, NatRev { last_seen_ns: t1 - 1, ..r }, 0).unwrap();
    let t2 = t1 + 200_000_000_000;
    h.maps.publish_clock(t2).unwrap();
    let report = h.maps.expire(t2, &gc_config(10));
    assert_eq!(report.flows, 1, "only the flow idle since before the stall expires");
    assert!(h.maps.nat_fwd.get(&uk, 0).is_ok(), "a flow stamped during the stall was expired");
    assert!(h.maps.nat_fwd.get(&ok, 0).is_err());
}

const SEC: u64 = 1_000_000_000;

/// A harness whose flow clock stands at a tick far from the kernel's clock, and that tick.
fn clocked() -> (Harness, u64) {
    let mut h = Harness::new(CONFIG);
    let tick = meshnet::dump::monotonic_ns() + 1_000 * SEC;
    h.maps.publish_clock(tick).unwrap();
    (h, tick)
}

/// A flow no reply ever reached (a SYN to a port nobody answers, junk a pod sends) goes
/// after `unansweredTimeoutSeconds` of idleness, where a TCP flow would otherwise hold its
/// table room for the established timeout (a day). A flow that got one reply and then fell
/// silent is an idle connection, and keeps the established timeout.
#[test]
fn an_unanswered_flow_expires_after_the_unanswered_timeout_and_an_answered_one_lives_on() {
    let (mut h, tick) = clocked();
    let (remote, gw) = ((REMOTE, 8080), (GW, GW_TCP));
    let (junk, answered) = ((POD, 40001), (POD, 40002));
    h.expect("SYN, never answered", FROM_POD, &pkt(junk, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    h.expect("SYN", FROM_POD, &pkt(answered, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    h.expect("SYN-ACK", TO_POD, &pkt(gw, answered, L4::Tcp(SYN | ACK), b""), OK, &[("flow_answered", 1)]);
    let (jk, ak) = (flow_key(junk, remote, IPPROTO_TCP), flow_key(answered, remote, IPPROTO_TCP));
    // UDP too: a datagram nobody answers.
    let (upod, uremote) = ((POD, 5000), (REMOTE, 53));
    h.expect("UDP, never answered", FROM_POD, &pkt(upod, uremote, L4::Udp, b"q"), OK, &[("flow_opened", 1)]);
    let uk = flow_key(upod, uremote, IPPROTO_UDP);

    assert_eq!(h.maps.expire(tick + 59 * SEC, &gc_config(10)).flows, 0, "expired before the unanswered timeout");
    assert_eq!(h.maps.expire(tick + 61 * SEC, &gc_config(10)).flows, 2);
    assert!(h.maps.nat_fwd.get(&jk, 0).is_err(), "the unanswered TCP flow outlived the unanswered timeout");
    assert!(h.maps.nat_fwd.get(&uk, 0).is_err(), "the unanswered UDP flow outlived the unanswered timeout");
    assert!(h.maps.nat_fwd.get(&ak, 0).is_ok(), "an answered, idle flow was expired");
    assert_eq!(h.maps.expire(tick + 3_600 * SEC, &gc_config(10)).flows, 0);
    assert_eq!(h.flow_counts(), (1, 1), "both halves of the unanswered flows go, and the answered one stays whole");
}

/// A pod with raw sockets cannot make a flow answered once and then hold it for the
/// established timeout: any listener behind a NodePort answers a SYN, the pod's kernel resets
/// the half-open connection, and one more segment the peer never sees (TTL 1) would clear the
/// RST. The pod's RST, or a SYN it sends again, makes the flow unanswered until the peer
/// answers again; a live connection's next reply does so.
#[test]
fn a_pods_reset_or_new_syn_leaves_its_flow_unanswered_until_the_peer_answers_again() {
    let (mut h, tick) = clocked();
    let (remote, gw) = ((REMOTE, 8080), (GW, GW_TCP));
    let (after_rst, after_syn, live) = ((POD, 40001), (POD, 40002), (POD, 40003));
    for pod in [after_rst, after_syn, live] {
        h.expect("raw SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
        h.expect("the gateway's SYN-ACK", TO_POD, &pkt(gw, pod, L4::Tcp(SYN | ACK), b""), OK, &[("flow_answered", 1)]);
        assert_eq!(h.rev_of(&flow_key(gw, pod, IPPROTO_TCP)).flags & FLOW_UNANSWERED, 0, "answered");
    }
    h.expect("the kernel's RST", FROM_POD, &pkt(after_rst, remote, L4::Tcp(RST), b""), OK, &[]);
    h.expect("an ACK that clears the RST", FROM_POD, &pkt(after_rst, remote, L4::Tcp(ACK), b""), OK, &[]);
    h.expect("a SYN again", FROM_POD, &pkt(after_syn, remote, L4::Tcp(SYN), b""), OK, &[]);
    h.expect("an ACK", FROM_POD, &pkt(after_syn, remote, L4::Tcp(ACK), b""), OK, &[]);
    // The live connection: a RST the peer ignored (out of window), then the peer speaks on.
    h.expect("a stray RST", FROM_POD, &pkt(live, remote, L4::Tcp(RST | ACK), b""), OK, &[]);
    h.expect("data", FROM_POD, &pkt(live, remote, L4::Tcp(PSH | ACK), PAYLOAD), OK, &[]);
    h.expect("the peer's answer", TO_POD, &pkt(gw, live, L4::Tcp(ACK), b"ok"), OK, &[("flow_answered", 1)]);
    for (what, pod, flags) in [("after its RST", after_rst, FLOW_UNANSWERED), ("after its SYN", after_syn, FLOW_UNANSWERED), ("live", live, 0)] {
        let f = h.rev_of(&flow_key(gw, pod, IPPROTO_TCP)).flags;
        assert_eq!(f & (FLOW_UNANSWERED | FLOW_RST), flags, "{what}: reverse flags {f:#x}");
    }
    assert_eq!(h.maps.expire(tick + 59 * SEC, &gc_config(10)).flows, 0, "expired before the unanswered timeout");
    assert_eq!(h.maps.expire(tick + 61 * SEC, &gc_config(10)).flows, 2, "the two flows no peer answers were held");
    assert!(h.maps.nat_fwd.get(&flow_key(live, remote, IPPROTO_TCP), 0).is_ok(), "the live connection was expired");
}

/// A flow marked unanswered at the agent's start is pardoned (see
/// `flows_of_before_the_start_count_as_answered`) only until a GC pass sees it answered: a mark
/// its pod gets after that is this release's own.
#[test]
fn a_pardoned_flow_seen_answered_counts_its_later_marks() {
    let (mut h, tick) = clocked();
    let (pod, remote, gw) = ((POD, 40001), (REMOTE, 8080), (GW, GW_TCP));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    assert_eq!(h.maps.note_unanswered_at_start(), 1);
    assert_eq!(h.maps.expire(tick + 61 * SEC, &gc_config(10)).flows, 0, "pardoned");
    h.expect("SYN-ACK", TO_POD, &pkt(gw, pod, L4::Tcp(SYN | ACK), b""), OK, &[("flow_answered", 1)]);
    assert_eq!(h.maps.expire(tick + 61 * SEC, &gc_config(10)).flows, 0, "answered");
    h.expect("the kernel's RST", FROM_POD, &pkt(pod, remote, L4::Tcp(RST), b""), OK, &[]);
    h.expect("an ACK that clears the RST", FROM_POD, &pkt(pod, remote, L4::Tcp(ACK), b""), OK, &[]);
    assert_eq!(h.maps.expire(tick + 61 * SEC, &gc_config(10)).flows, 1, "the flow's new mark was pardoned too");
}

/// The pardon leaves with its flow: a later flow on the same reply tuple (the pod's port,
/// the same gateway, another remote pod) is judged as its own.
#[test]
fn a_pardon_does_not_pass_to_a_later_flow_on_its_reply_tuple() {
    let (mut h, tick) = clocked();
    let pod = (POD, 40001);
    h.expect("SYN", FROM_POD, &pkt(pod, (REMOTE, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    assert_eq!(h.maps.note_unanswered_at_start(), 1);
    h.expect("RST", FROM_POD, &pkt(pod, (REMOTE, 8080), L4::Tcp(RST), b""), OK, &[]);
    assert_eq!(h.maps.expire(tick + 11 * SEC, &gc_config(10)).flows, 1, "the reset flow goes after the closed timeout");
    h.expect("SYN to another pod", FROM_POD, &pkt(pod, (REMOTE2, 8080), L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    assert_eq!(h.maps.expire(tick + 61 * SEC, &gc_config(10)).flows, 1, "the new flow kept the old one's pardon");
}

/// The first packet's TCP flags are the flow's: one opened by a RST (or a FIN) is closing
/// from the start, and a RST-opened one goes after the closed timeout.
#[test]
fn a_flow_opened_by_a_rst_or_a_fin_records_it() {
    let (mut h, tick) = clocked();
    let remote = (REMOTE, 8080);
    let (rst, fin, syn) = ((POD, 40001), (POD, 40002), (POD, 40003));
    h.expect("opening RST", FROM_POD, &pkt(rst, remote, L4::Tcp(RST | ACK), b""), OK, &[("flow_opened", 1)]);
    h.expect("opening FIN", FROM_POD, &pkt(fin, remote, L4::Tcp(FIN | ACK), b""), OK, &[("flow_opened", 1)]);
    h.expect("opening SYN", FROM_POD, &pkt(syn, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let key = |pod| flow_key(pod, remote, IPPROTO_TCP);
    assert_eq!(h.fwd_of(&key(rst)).flags & FLOW_RST, FLOW_RST);
    assert_eq!(h.fwd_of(&key(fin)).flags & (FLOW_FIN_POD | FLOW_RST), FLOW_FIN_POD);
    assert_eq!(h.fwd_of(&key(syn)).flags, 0);
    // Past the closed timeout, well before the unanswered one.
    assert_eq!(h.maps.expire(tick + 11 * SEC, &gc_config(10)).flows, 1);
    assert!(h.maps.nat_fwd.get(&key(rst), 0).is_err(), "the RST-opened flow outlived the closed timeout");
}

/// The first reply clears the mark, written at once even between two ticks of the clock
/// (the flow would otherwise expire as unanswered); later replies of that tick write
/// nothing.
#[test]
fn the_first_reply_clears_unanswered_and_later_replies_write_nothing() {
    let (mut h, tick) = clocked();
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    let rk = flow_key(gw, pod, IPPROTO_TCP);
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    // Stamped ahead of the clock: a reply that wrote the entry whole would set the stamp back.
    let r = h.rev_of(&rk);
    assert_eq!(r.flags, FLOW_UNANSWERED);
    h.maps.nat_rev.insert(rk, NatRev { last_seen_ns: tick + 1, ..r }, 0).unwrap();
    h.expect("SYN-ACK", TO_POD, &pkt(gw, pod, L4::Tcp(SYN | ACK), b""), OK, &[("flow_answered", 1)]);
    let answered = h.rev_of(&rk);
    assert_eq!(answered.flags, 0, "the first reply left the flow unanswered");
    assert_eq!(answered.last_seen_ns, tick + 1);
    // A peer id no packet writes: a store of the whole entry would take it back.
    h.maps.nat_rev.insert(rk, NatRev { peer_id: 0xdead, ..answered }, 0).unwrap();
    for i in 0..3 {
        h.expect("data", TO_POD, &pkt(gw, pod, L4::Tcp(ACK), b"ok"), OK, &[]);
        assert_eq!(h.rev_of(&rk), NatRev { peer_id: 0xdead, ..answered }, "reply {i} wrote the reverse entry");
    }
}

/// At its start the agent takes every flow it finds for answered: a flow these programs
/// opened before a downgrade and that was answered under an earlier release (whose replies
/// never clear the mark) must not expire as unanswered after the upgrade back. Nothing is
/// written; flows opened after the start are unanswered again, and a forward half's copy
/// of the mark (an earlier release re-created forward halves with every flag) counts for
/// nothing.
#[test]
fn flows_of_before_the_start_count_as_answered() {
    let (mut h, tick) = clocked();
    let (remote, gw) = ((REMOTE, 8080), (GW, GW_TCP));
    let (old, answered, copied) = ((POD, 40001), (POD, 40002), (POD, 40004));
    for (what, pod) in [("SYN", old), ("SYN, answered", answered), ("SYN, copied", copied)] {
        h.expect(what, FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    }
    h.expect("SYN-ACK", TO_POD, &pkt(gw, answered, L4::Tcp(SYN | ACK), b""), OK, &[("flow_answered", 1)]);
    h.expect("SYN-ACK", TO_POD, &pkt(gw, copied, L4::Tcp(SYN | ACK), b""), OK, &[("flow_answered", 1)]);
    // An earlier release's replies: the stamp moves, the mark stays.
    let rk = flow_key(gw, old, IPPROTO_TCP);
    let r = h.rev_of(&rk);
    h.maps.nat_rev.insert(rk, NatRev { last_seen_ns: tick + 10 * SEC, ..r }, 0).unwrap();
    // An earlier release's forward half, re-created from its reverse one with the mark.
    let ck = flow_key(copied, remote, IPPROTO_TCP);
    let c = h.fwd_of(&ck);
    h.maps.nat_fwd.insert(ck, NatFwd { flags: c.flags | FLOW_UNANSWERED, ..c }, 0).unwrap();
    let (fwd_before, rev_before) = (h.nat_fwd(), h.nat_rev());

    assert_eq!(h.maps.note_unanswered_at_start(), 1);
    assert_eq!((h.nat_fwd(), h.nat_rev()), (fwd_before, rev_before), "the note wrote to the flow maps");
    let expired = h.maps.expire(tick + 3_600 * SEC, &gc_config(10)).flows;
    assert_eq!(expired, 0, "a flow of before the start was expired as unanswered");
    assert_eq!(h.flow_counts(), (3, 3));

    let new = (POD, 40003);
    h.expect("SYN after the start", FROM_POD, &pkt(new, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    assert_eq!(h.rev_of(&flow_key(gw, new, IPPROTO_TCP)).flags, FLOW_UNANSWERED);
}

/// Traffic to this cluster's own pod CIDRs passes before any lookup: even a route over a
/// local pod's address (which validation never lets in) is not consulted. While the local
/// CIDR map is mid-write (an odd seqlock count, or the count changing under the read), the
/// datapath does not trust it and takes the lookups as before.
#[test]
fn traffic_to_local_pods_passes_without_lookups_unless_the_local_map_is_mid_write() {
    let mut h = Harness::new(CONFIG);
    let local = h.maps.local.as_ref().unwrap().get(&0, 0).unwrap();
    assert_eq!((local.seq % 2, local.count), (0, 1), "the config's podCIDRs are published");
    let route = aya::maps::lpm_trie::Key::new(32, maps::addr_be(LOCAL_POD.into()));
    h.maps.routes.insert(&route, meshnet_common::RouteValue { peer_id: peer_id("cluster2") }, 0).unwrap();
    let syn = pkt((POD, 40000), (LOCAL_POD, 8080), L4::Tcp(SYN), b"");
    h.expect_unchanged("to a local pod", FROM_POD, &syn, &[]);
    assert_eq!(h.flow_counts(), (0, 0));

    let map = h.maps.local.as_mut().unwrap();
    map.set(0, meshnet_common::LocalCidrs { seq: local.seq + 1, ..local }, 0).unwrap();
    h.expect("mid-write", FROM_POD, &syn, OK, &[("flow_opened", 1)]);
    assert_eq!(h.flow_counts(), (1, 1));

    // Publishing again completes the write; an unchanged set writes nothing.
    let nets: Vec<ipnet::Ipv4Net> = vec!["10.244.0.0/16".parse().unwrap(), "10.246.0.0/24".parse().unwrap()];
    h.maps.publish_local(&nets).unwrap();
    let after = h.maps.local.as_ref().unwrap().get(&0, 0).unwrap();
    assert_eq!((after.seq % 2, after.count), (0, 2));
    assert_eq!(after.nets[1].addr_be, maps::addr_be([10, 246, 0, 0].into()));
    assert_eq!(after.nets[1].mask_be, maps::addr_be([255, 255, 255, 0].into()));
    h.maps.publish_local(&nets).unwrap();
    assert_eq!(h.maps.local.as_ref().unwrap().get(&0, 0).unwrap().seq, after.seq);
    let other = pkt((POD, 40001), ([10, 246, 0, 9], 8080), L4::Tcp(SYN), b"");
    h.expect_unchanged("to the second local CIDR", FROM_POD, &other, &[]);
}

/// `to_pod` looks up only packets from a port some gateway has had: a reverse entry keyed
/// by any other source port (which no flow of the datapath's making has) is never consulted.
/// Until the bitmap is in use (its bit 0 clear), every packet is looked up. Marking is
/// additive: a gateway removed from the config keeps its port's bit.
#[test]
fn replies_are_looked_up_only_from_gateway_ports() {
    let mut h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    h.expect("reply", TO_POD, &pkt(gw, pod, L4::Tcp(ACK), b""), OK, &[("flow_answered", 1)]);
    // A reverse entry planted under a port no gateway has.
    let rev = h.rev_of(&flow_key(gw, pod, IPPROTO_TCP));
    let odd = flow_key((GW, 12345), pod, IPPROTO_TCP);
    h.maps.nat_rev.insert(odd, rev, 0).unwrap();
    let from_odd = pkt((GW, 12345), pod, L4::Tcp(ACK), b"");
    h.expect_unchanged("from another port", TO_POD, &from_odd, &[]);

    let bits = h.maps.gw_ports.as_mut().unwrap();
    let w0 = bits.get(&0, 0).unwrap();
    assert_eq!(w0 & 1, 1, "the bitmap is in use");
    let word = bits.get(&u32::from(GW_TCP >> 6), 0).unwrap();
    assert_ne!(word & (1 << (GW_TCP & 63)), 0, "the gateway's port is marked");
    bits.set(0, w0 & !1, 0).unwrap();
    h.expect("bitmap not in use", TO_POD, &from_odd, OK, &[]);

    // A flow whose gateway port is no peer's (left by an earlier release, say) gets its
    // port marked by the next sync before anything else happens, so its replies are looked
    // up until the same sync purges it (its gateway is not in the config).
    let stray = NatFwd { gw_port_be: 40404u16.to_be(), nat_sport_be: 40002u16.to_be(), ..h.fwd_of(&flow_key(pod, remote, IPPROTO_TCP)) };
    let stray_key = flow_key((POD, 40002), remote, IPPROTO_TCP);
    h.maps.nat_fwd.insert(stray_key, stray, 0).unwrap();
    h.maps.nat_rev.insert(FlowKey::rev_of_fwd(&stray_key, &stray), NatRev { pod_port_be: 40002u16.to_be(), ..rev }, 0).unwrap();
    h.maps.sync(&Config::from_yaml(CONFIG).unwrap().desired()).unwrap();
    let bits = h.maps.gw_ports.as_ref().unwrap();
    assert_eq!(bits.get(&0, 0).unwrap() & 1, 1);
    assert_ne!(bits.get(&(40404 >> 6), 0).unwrap() & (1 << (40404 & 63)), 0, "the stray flow's port is marked");
    assert!(h.maps.nat_fwd.get(&stray_key, 0).is_err(), "the flow of a gateway not in the config is purged");

    // A sync without the gateway keeps its port marked, and marks the bitmap in use again.
    h.maps.sync(&Config::from_yaml(&without_udp_port()).unwrap().desired()).unwrap();
    h.maps.sync(&meshnet::config::Desired::default()).unwrap();
    let bits = h.maps.gw_ports.as_ref().unwrap();
    assert_eq!(bits.get(&0, 0).unwrap() & 1, 1);
    assert_ne!(bits.get(&u32::from(GW_UDP >> 6), 0).unwrap() & (1 << (GW_UDP & 63)), 0);
}

/// GC never leaves a forward entry without its reverse one: a live flow found without its
/// reverse half gets it back, and expiring a flow removes both halves.
#[test]
fn gc_restores_a_missing_reverse_half_and_expires_whole_flows() {
    let mut h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    let rk = flow_key(gw, pod, IPPROTO_TCP);
    let rev = h.rev_of(&rk);
    h.maps.nat_rev.remove(&rk).unwrap();
    let now = meshnet::dump::monotonic_ns();
    let report = h.maps.expire(now, &gc_config(10));
    assert_eq!((report.flows, report.revs_restored), (0, 1));
    assert_eq!(h.flow_counts(), (1, 1));
    // Restored as answered, as the GC cannot tell whether a reply ever came.
    let answered = NatRev { last_seen_ns: 0, flags: rev.flags & !FLOW_UNANSWERED, ..rev };
    assert_eq!(NatRev { last_seen_ns: 0, ..h.rev_of(&rk) }, answered);

    // A stray RST followed by traffic: the flow is not closed, so the closed timeout does not
    // apply to it.
    h.expect("stray RST", TO_POD, &pkt(gw, pod, L4::Tcp(RST), b""), OK, &[]);
    h.expect("data", FROM_POD, &pkt(pod, remote, L4::Tcp(ACK), PAYLOAD), OK, &[]);
    let later = meshnet::dump::monotonic_ns() + 5_000_000_000;
    assert_eq!(h.maps.expire(later, &gc_config(1)).flows, 0, "a flow with traffic after a stray RST was expired");
    // A RST that is the last word: expired after the closed timeout, both halves at once.
    h.expect("final RST", TO_POD, &pkt(gw, pod, L4::Tcp(RST), b""), OK, &[]);
    // Taken after the RST: a stall before it must not bring its stamp within the timeout.
    let later = meshnet::dump::monotonic_ns() + 5_000_000_000;
    assert_eq!(h.maps.expire(later, &gc_config(1)).flows, 1);
    assert_eq!(h.flow_counts(), (0, 0));
}

/// The GC reads the tables whole, then deletes what looked idle: a packet that uses a flow in
/// between must keep it, or the flow's next reply passes untranslated (for TCP, the pod then
/// answers the gateway with a RST).
#[test]
fn a_flow_used_while_the_gc_scans_is_kept() {
    let mut h = Harness::new(CONFIG);
    let (pod, remote, gw) = ((POD, 5000), (REMOTE, 53), (GW, GW_UDP));
    h.expect("query", FROM_POD, &pkt(pod, remote, L4::Udp, PAYLOAD), OK, &[("flow_opened", 1)]);
    let later = meshnet::dump::monotonic_ns() + 200_000_000_000;
    let scan = h.maps.expiry_scan(later, &gc_config(10));
    assert_eq!(scan.doomed(), 1, "the UDP flow idle for 200 s did not look expired");
    // A packet of the flow stamps it meanwhile (at `later`, as the datapath's clock reads then).
    let fk = flow_key(pod, remote, IPPROTO_UDP);
    let fwd = h.fwd_of(&fk);
    h.maps.nat_fwd.insert(fk, NatFwd { last_seen_ns: later, ..fwd }, 0).unwrap();
    assert_eq!(h.maps.expire_scanned(scan, later, &gc_config(10)).flows, 0, "a flow stamped during the scan was expired");
    assert_eq!(h.flow_counts(), (1, 1));
    h.expect("answer", TO_POD, &pkt(gw, pod, L4::Udp, PAYLOAD), OK, &[("flow_answered", 1)]);
    // Idle from then on, it goes at a later pass, both halves at once.
    assert_eq!(h.maps.expire(later + 200_000_000_000, &gc_config(10)).flows, 1);
    assert_eq!(h.flow_counts(), (0, 0));
}

// ---------------------------------------------------------------------------------------
// Sweeps: random tuples, every truncation, random mutations
// ---------------------------------------------------------------------------------------

/// The seed of a sweep: `MESHNET_SWEEP_SEED` replays a failure, else a fixed one.
fn sweep_seed() -> u64 {
    std::env::var("MESHNET_SWEEP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6d65_7368_6e65_7421)
}

/// 10,000 random flows (random pods, remote pods, ports, protocol and payload) are
/// translated with checksums that etherparse recomputes to the same value, both ways: the
/// request to the gateway and the reply back to the pod (`CHECKSUM_NONE`: TEST_RUN's skbs
/// carry no offload state). The object that asks the checksum helper runs alongside and
/// must leave every packet byte-identical.
#[test]
fn random_tuples_translate_with_valid_checksums_both_ways() {
    let h = Harness::new(CONFIG);
    let helper = Harness::build(CONFIG, None, Csum::Helper);
    let run = |prog: &str, what: &str, input: &[u8]| {
        let (v, out) = h.run(prog, input);
        let (hv, hout) = helper.run(prog, input);
        assert_eq!(v, hv, "{what}: the helper path's verdict differs");
        assert_bytes_eq(&format!("{what}: the helper path's packet"), &hout, &out);
        (v, out)
    };
    let seed = sweep_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut flows = std::collections::HashSet::new();
    let mut done = 0;
    while done < 10_000 {
        let pod = [10, 244, rng.u8(..), rng.u8(1..255)];
        let remote = [10, 245, rng.u8(..), rng.u8(1..255)];
        let (sport, dport) = (rng.u16(1024..), rng.u16(1..));
        let udp = rng.bool();
        if !flows.insert((pod, sport, remote, dport, udp)) {
            continue;
        }
        done += 1;
        let payload: Vec<u8> = (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect();
        let what = format!("seed {seed}, flow {done}: {pod:?}:{sport} -> {remote:?}:{dport} udp={udp}");
        let (l4, reply_l4, gw_port) = if udp { (L4::Udp, L4::Udp, GW_UDP) } else { (L4::Tcp(SYN), L4::Tcp(SYN | ACK), GW_TCP) };
        let first = pkt((pod, sport), (remote, dport), l4, if udp { &payload } else { b"" });
        let (v, out) = run(FROM_POD, &what, &first);
        assert_eq!(v, OK, "{what}: {}", verdict_name(v));
        let sent = checked(&out);
        assert_eq!(*sent.dst.ip(), Ipv4Addr::from(GW), "{what}");
        assert_eq!(sent.dst.port(), gw_port, "{what}");
        assert_eq!(*sent.src.ip(), Ipv4Addr::from(pod), "{what}");
        let wire_sport = sent.src.port();
        if !udp {
            let data = pkt((pod, sport), (remote, dport), L4::Tcp(ACK | PSH), &payload);
            let (v, out) = run(FROM_POD, &what, &data);
            assert_eq!(v, OK, "{what}: data: {}", verdict_name(v));
            let s = checked(&out);
            assert_eq!((s.src.port(), s.dst, s.payload.as_slice()), (wire_sport, sent.dst, payload.as_slice()), "{what}: data");
        }
        let reply = pkt((GW, gw_port), (pod, wire_sport), reply_l4, &payload);
        let (v, back) = run(TO_POD, &what, &reply);
        assert_eq!(v, OK, "{what}: reply: {}", verdict_name(v));
        let r = checked(&back);
        assert_eq!((r.src, r.dst), (ep(remote, dport), ep(pod, sport)), "{what}: reply");
        assert_eq!(r.payload, payload, "{what}: reply payload");
    }
}

/// Ones' complement sum of `bytes` (an odd tail padded with zero), not yet folded.
fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The layout of an Ethernet + IPv4 frame as far as it can be read, for the sweeps' oracle
/// (independent of meshnet's parser).
#[derive(Clone, Copy)]
struct Layout {
    /// Offset of the L4 header.
    l4: usize,
    /// End of the datagram.
    end: usize,
    proto: u8,
    /// No fragment offset and no MF: the datagram is whole.
    whole: bool,
}

fn layout(f: &[u8]) -> Option<Layout> {
    if f.len() < ETH_HLEN + 20 || f[12..14] != [0x08, 0x00] || f[ETH_HLEN] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
    let end = ETH_HLEN + usize::from(u16::from_be_bytes([f[16], f[17]]));
    if ihl < 20 || end < ETH_HLEN + ihl || end > f.len() {
        return None;
    }
    let whole = u16::from_be_bytes([f[20], f[21]]) & 0x3fff == 0;
    Some(Layout { l4: ETH_HLEN + ihl, end, proto: f[ETH_HLEN + 9], whole })
}

/// Each checksum the frame carries, as `(name, valid)`: the IPv4 header's, the TCP/UDP one
/// of a whole datagram (a UDP checksum of zero is "none" and left out), the ICMP one, and
/// the IPv4 header quoted by an ICMP error.
fn checksums(f: &[u8]) -> Vec<(&'static str, bool)> {
    let mut out = Vec::new();
    if f.len() >= ETH_HLEN + 20 && f[12..14] == [0x08, 0x00] && f[ETH_HLEN] >> 4 == 4 {
        let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
        if ihl >= 20 && f.len() >= ETH_HLEN + ihl {
            out.push(("ip", csum_fold(csum_add(0, &f[ETH_HLEN..ETH_HLEN + ihl])) == 0));
        }
    }
    let Some(l) = layout(f) else { return out };
    let seg = &f[l.l4..l.end];
    let pseudo = |len: usize| {
        let mut s = csum_add(0, &f[ETH_HLEN + 12..ETH_HLEN + 20]);
        s += u32::from(l.proto);
        s + u32::try_from(len).unwrap()
    };
    match l.proto {
        6 if l.whole && seg.len() >= 20 => out.push(("tcp", csum_fold(csum_add(pseudo(seg.len()), seg)) == 0)),
        17 if l.whole && seg.len() >= 8 && seg[6..8] != [0, 0] => {
            out.push(("udp", csum_fold(csum_add(pseudo(seg.len()), seg)) == 0));
        }
        1 if l.whole && seg.len() >= 8 => {
            out.push(("icmp", csum_fold(csum_add(0, seg)) == 0));
            if seg.len() >= 28 && seg[8] == 0x45 {
                out.push(("quoted ip", csum_fold(csum_add(0, &seg[8..28])) == 0));
            }
        }
        _ => {}
    }
    out
}

/// Recomputes every checksum of `f` that [`checksums`] finds, so that a mutated frame
/// reaches the program as a sender that means it would have built it.
fn fix_checksums(f: &mut [u8]) {
    if f.len() >= ETH_HLEN + 20 && f[12..14] == [0x08, 0x00] && f[ETH_HLEN] >> 4 == 4 {
        let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
        if ihl >= 20 && f.len() >= ETH_HLEN + ihl {
            f[24..26].fill(0);
            let c = csum_fold(csum_add(0, &f[ETH_HLEN..ETH_HLEN + ihl]));
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
    }
    let Some(l) = layout(f) else { return };
    if !l.whole {
        return;
    }
    let len = l.end - l.l4;
    let field = match l.proto {
        6 if len >= 20 => l.l4 + 16,
        17 if len >= 8 && f[l.l4 + 6..l.l4 + 8] != [0, 0] => l.l4 + 6,
        1 if len >= 8 => {
            if len >= 28 && f[l.l4 + 8] == 0x45 {
                let q = l.l4 + 8;
                f[q + 10..q + 12].fill(0);
                let c = csum_fold(csum_add(0, &f[q..q + 20]));
                f[q + 10..q + 12].copy_from_slice(&c.to_be_bytes());
            }
            f[l.l4 + 2..l.l4 + 4].fill(0);
            let c = csum_fold(csum_add(0, &f[l.l4..l.end]));
            f[l.l4 + 2..l.l4 + 4].copy_from_slice(&c.to_be_bytes());
            return;
        }
        _ => return,
    };
    f[field..field + 2].fill(0);
    let mut sum = csum_add(0, &f[ETH_HLEN + 12..ETH_HLEN + 20]);
    sum += u32::from(l.proto) + u32::try_from(len).unwrap();
    let mut c = csum_fold(csum_add(sum, &f[l.l4..l.end]));
    if l.proto == 17 && c == 0 {
        c = 0xffff;
    }
    f[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

/// The bytes a translation may change: the IPv4 checksum and addresses, the ports and the
/// L4 checksum; for an ICMP error, its checksum and the quoted header's checksum, addresses
/// and ports.
fn rewritable(input: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut r = vec![24..34];
    if let Some(l) = layout(input) {
        match l.proto {
            6 => r.extend([l.l4..l.l4 + 4, l.l4 + 16..l.l4 + 18]),
            17 => r.extend([l.l4..l.l4 + 4, l.l4 + 6..l.l4 + 8]),
            1 => r.extend([l.l4 + 2..l.l4 + 4, l.l4 + 18..l.l4 + 28, l.l4 + 28..l.l4 + 32, l.l4 + 34..l.l4 + 36]),
            _ => {}
        }
    } else if input.len() >= ETH_HLEN + 20 {
        // A later fragment or a datagram cut short: the ports of a first fragment.
        let l4 = ETH_HLEN + usize::from(input[ETH_HLEN] & 0x0f) * 4;
        r.extend([l4..l4 + 4, l4 + 6..l4 + 8, l4 + 16..l4 + 18]);
    }
    r
}

/// The counters that a dropped packet moves, one of them per drop.
const DROP_COUNTERS: [&str; 7] = [
    "no_live_gateway",
    "nat_insert_failed",
    "fragment_dropped",
    "unsupported_proto",
    "rewrite_failed",
    "nat_table_full",
    "remote_parse_error",
];

fn drops(c: &BTreeMap<&'static str, u64>) -> u64 {
    DROP_COUNTERS.iter().map(|n| c[n]).sum()
}

/// What the oracle saw of a sweep.
#[derive(Default, Debug)]
struct Outcomes {
    unchanged: u64,
    translated: u64,
    dropped: u64,
    refused_by_kernel: u64,
}

/// Runs `input` through `prog` and holds the result to the only three outcomes allowed:
/// passed byte-exact (UNSPEC), translated (OK: only rewritable bytes changed, every
/// checksum that was valid still valid, and the destination a gateway or the source a
/// remote pod), or dropped (SHOT, counted: checked by the caller in batches). The kernel
/// may refuse a frame too short for it, exactly when it refuses it for the empty program.
fn hold_to_oracle(h: &Harness, prog: &str, input: &[u8], what: &dyn Fn() -> String, seen: &mut Outcomes) {
    let result = h.try_run(prog, input);
    if is_einval(&result) {
        assert!(is_einval(&h.try_run(names::PROG_EMPTY, input)), "{}: EINVAL for our program only", what());
        seen.refused_by_kernel += 1;
        return;
    }
    let (verdict, out) = result.unwrap_or_else(|e| panic!("{}: {e:?}", what()));
    match verdict {
        UNSPEC => {
            if out != input {
                assert_bytes_eq(&format!("{}: passed (UNSPEC) but changed", what()), &out, input);
            }
            seen.unchanged += 1;
        }
        SHOT => seen.dropped += 1,
        OK => {
            assert_eq!(out.len(), input.len(), "{}: translated to another length", what());
            let allowed = rewritable(input);
            for (i, (a, b)) in input.iter().zip(&out).enumerate() {
                assert!(a == b || allowed.iter().any(|r| r.contains(&i)), "{}: byte {i} changed: {input:02x?} -> {out:02x?}", what());
            }
            let after = checksums(&out);
            for (name, valid) in checksums(input) {
                if valid {
                    assert!(after.contains(&(name, true)), "{}: {name} checksum broken: {input:02x?} -> {out:02x?}", what());
                }
            }
            if prog == FROM_POD {
                assert!([GW, GW2].contains(&out[30..34].try_into().unwrap()), "{}: translated to {:?}", what(), &out[30..34]);
            } else if layout(&out).is_some_and(|l| l.proto == 1) {
                // An ICMP error: the quote now names a remote pod.
                let q = layout(&out).unwrap().l4 + 8;
                assert_eq!(&out[q + 16..q + 18], &[10, 245], "{}: quote not restored", what());
            } else {
                assert_eq!(&out[26..28], &[10, 245], "{}: reply not from a remote pod", what());
            }
            seen.translated += 1;
        }
        other => panic!("{}: verdict {other}", what()),
    }
}

/// The valid packets the sweeps start from, each with the program it goes through. The
/// flows they belong to are set up first, so that replies and ICMP errors are translated.
fn sweep_fixtures(h: &Harness) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use etherparse::{icmpv4, Icmpv4Type};
    let (pod, remote, gw) = ((POD, 40000), (REMOTE, 8080), (GW, GW_TCP));
    h.expect("SYN", FROM_POD, &pkt(pod, remote, L4::Tcp(SYN), b""), OK, &[("flow_opened", 1)]);
    h.expect("UDP", FROM_POD, &pkt((POD, 5000), (REMOTE, 53), L4::Udp, b"q"), OK, &[("flow_opened", 1)]);
    let mut with_options = ip_header(POD, REMOTE);
    with_options.options = [0x94, 0x04, 0x00, 0x00][..].try_into().unwrap();
    let frag_needed = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let big = vec![0x5a; 64];
    vec![
        ("TCP SYN", FROM_POD, pkt((POD, 40001), remote, L4::Tcp(SYN), b"")),
        ("TCP data", FROM_POD, pkt(pod, remote, L4::Tcp(ACK | PSH), PAYLOAD)),
        ("TCP with IP options", FROM_POD, frame(with_options, 40002, 8080, L4::Tcp(SYN), b"")),
        ("UDP", FROM_POD, pkt((POD, 5000), (REMOTE, 53), L4::Udp, PAYLOAD)),
        ("UDP to a local pod", FROM_POD, pkt((POD, 5000), (LOCAL_POD, 53), L4::Udp, PAYLOAD)),
        ("ping to a remote pod", FROM_POD, pkt((POD, 7), (REMOTE, 1), L4::Icmp, b"ping")),
        ("first fragment", FROM_POD, first_fragment((POD, 5001), (REMOTE, 53), L4::Udp, &big)),
        ("later fragment", FROM_POD, later_fragment(POD, REMOTE, IpNumber::UDP, 9, false, &big)),
        ("TCP reply", TO_POD, pkt(gw, pod, L4::Tcp(ACK), PAYLOAD)),
        ("UDP reply", TO_POD, pkt((GW, GW_UDP), (POD, 5000), L4::Udp, PAYLOAD)),
        ("fragmentation needed", TO_POD, icmp_error(frag_needed, &pkt(pod, gw, L4::Tcp(ACK | PSH), PAYLOAD))),
        ("local reply", TO_POD, pkt((LOCAL_POD, 80), (POD, 40000), L4::Tcp(ACK), PAYLOAD)),
    ]
}

/// Asserts that the drops seen since `before` were each counted by one drop counter.
fn assert_drops_counted(h: &Harness, what: &str, before: &BTreeMap<&'static str, u64>, dropped: u64) {
    let counted = drops(&h.counters()) - drops(before);
    assert_eq!(counted, dropped, "{what}: {dropped} packets dropped, {counted} drops counted");
}

/// Every fixture at every length from 0 to its own: passed byte-exact, translated with
/// valid checksums, or dropped and counted; nothing else.
#[test]
fn every_fixture_at_every_truncation_length() {
    let h = Harness::new(CONFIG);
    let mut seen = Outcomes::default();
    for (name, prog, full) in sweep_fixtures(&h) {
        let before = h.counters();
        let dropped = seen.dropped;
        for len in 0..=full.len() {
            hold_to_oracle(&h, prog, &full[..len], &|| format!("{name}: first {len} of {} bytes", full.len()), &mut seen);
        }
        assert_drops_counted(&h, name, &before, seen.dropped - dropped);
    }
    eprintln!("truncations: {seen:?}");
    assert!(seen.unchanged > 0 && seen.translated > 0 && seen.dropped > 0, "{seen:?}");
}

/// Random mutations of the fixtures (bit flips, random bytes anywhere or in the headers,
/// cuts, extensions; half of them with their checksums made valid again): 1,000,000 on the
/// host, `MESHNET_MUTATIONS` where emulation makes that too slow. Each result is one of the
/// three outcomes of [`hold_to_oracle`]; drops are checked against their counters every
/// 1,000 packets.
#[test]
fn random_mutations_are_passed_translated_or_counted() {
    let h = Harness::new(CONFIG);
    let fixtures = sweep_fixtures(&h);
    let total: u64 = std::env::var("MESHNET_MUTATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let seed = sweep_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seen = Outcomes::default();
    let mut before = h.counters();
    let mut dropped_before = 0;
    for i in 0..total {
        let (name, prog, base) = &fixtures[rng.usize(..fixtures.len())];
        let mut f = base.clone();
        match rng.u8(0..6) {
            0 => {
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..f.len());
                    f[at] ^= 1 << rng.u8(0..8);
                }
            }
            1 => {
                for _ in 0..rng.usize(1..5) {
                    let at = rng.usize(..f.len());
                    f[at] = rng.u8(..);
                }
            }
            2 => f[rng.usize(ETH_HLEN..ETH_HLEN + 20)] = rng.u8(..),
            3 => {
                let at = rng.usize(ETH_HLEN + 20..(ETH_HLEN + 40).min(f.len()));
                f[at] = rng.u8(..);
            }
            4 => f.truncate(rng.usize(..f.len())),
            _ => f.extend((0..rng.usize(1..40)).map(|_| rng.u8(..))),
        }
        if rng.bool() {
            fix_checksums(&mut f);
        }
        hold_to_oracle(&h, prog, &f, &|| format!("seed {seed}, mutation {i} of {name}"), &mut seen);
        if i % 1000 == 999 || i + 1 == total {
            assert_drops_counted(&h, &format!("seed {seed}, mutations up to {i}"), &before, seen.dropped - dropped_before);
            before = h.counters();
            dropped_before = seen.dropped;
        }
    }
    eprintln!("{total} mutations: {seen:?}");
    assert!(seen.unchanged > 0 && seen.translated > 0 && seen.dropped > 0, "{seen:?}");
}

// ---------------------------------------------------------------------------------------
// explain, held to the program
// ---------------------------------------------------------------------------------------

/// Two peers: cluster2 with three gateways (one without a UDP `NodePort`), cluster3 with
/// one gateway and no UDP at all.
const DIFF_CONFIG: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
peers:
  - name: cluster2
    podCIDRs: ["10.245.0.0/16"]
    gateways:
      - address: 192.0.2.2
        port: 31674
        udpPort: 31675
      - address: 192.0.2.3
        port: 31674
        udpPort: 31675
      - address: 192.0.2.4
        port: 31680
  - name: cluster3
    podCIDRs: ["10.246.0.0/16", "10.247.0.0/24"]
    gateways:
      - address: 192.0.2.9
        port: 30001
"#;

/// `explain` re-implements `meshnet_from_pod`'s decision in user space; here both see the
/// same random packets and the same maps (read back from the program's own, through
/// [`meshnet::explain::Snapshot::of_maps`]), and must agree on each verdict, on the gateway
/// and source port of a translation, and on exactly which counters the packet moves.
/// Gateways go up and down, flow halves get lost, and small tables fill up as it runs: 16
/// rounds of 200 packets, `MESHNET_DIFF_ROUNDS` where emulation makes that slow.
#[test]
fn explain_agrees_with_the_program_on_random_packets() {
    use meshnet::explain::{explain, Proto, Query, Snapshot, Source, Verdict};
    let seed = sweep_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    const CAP: u32 = 128;
    let mut verdicts: BTreeMap<String, u64> = BTreeMap::new();
    let rounds: usize = std::env::var("MESHNET_DIFF_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    for round in 0..rounds {
        let mut h = Harness::with_max_flows(DIFF_CONFIG, Some(CAP));
        let gateways = [[192, 0, 2, 2], [192, 0, 2, 3], [192, 0, 2, 4]];
        // A quarter of the rounds start with a table one flow short of full.
        if round % 4 == 3 {
            for port in 0..CAP - 1 {
                let p = pkt(([10, 244, 9, 9], 10_000 + u16::try_from(port).unwrap()), (REMOTE, 9), L4::Udp, b"");
                assert_eq!(h.run(FROM_POD, &p).0, OK);
            }
        }
        for i in 0..200 {
            if rng.u8(..) < 16 {
                let gw = gateways[rng.usize(..gateways.len())];
                h.set_gateway_up(gw, rng.bool());
            }
            if rng.u8(..) < 12 {
                // Lose one half of a random flow.
                let fwd: Vec<_> = h.nat_fwd();
                if let Some((k, _)) = fwd.get(rng.usize(..fwd.len().max(1))) {
                    if rng.bool() {
                        let _ = h.maps.nat_fwd.remove(k);
                    } else {
                        let rev: Vec<_> = h.nat_rev();
                        if let Some((rk, _)) = rev.iter().find(|(_, r)| r.remote_addr_be == k.dst_be && r.pod_port_be == k.sport_be) {
                            let _ = h.maps.nat_rev.remove(rk);
                        }
                    }
                }
            }
            let pod = [10, 244, 0, rng.u8(10..13)];
            let dst = match rng.u8(0..10) {
                0 => LOCAL_POD,
                1 => ELSEWHERE,
                2 => [10, 247, 0, rng.u8(1..5)],
                3 => [10, 246, 0, rng.u8(1..5)],
                _ => [10, 245, 0, rng.u8(1..5)],
            };
            let proto = match rng.u8(0..10) {
                0 => Proto::Icmp,
                1..=4 => Proto::Udp,
                _ => Proto::Tcp,
            };
            let (sport, dport) = (rng.u16(40_000..40_016), [53, 80, 8080][rng.usize(..3)]);
            let l4 = match proto {
                Proto::Tcp => L4::Tcp(if rng.bool() { SYN } else { ACK | PSH }),
                Proto::Udp => L4::Udp,
                Proto::Icmp => L4::Icmp,
            };
            let input = pkt((pod, sport), (dst, dport), l4, b"x");
            let q = Query {
                src: Source { addr: Ipv4Addr::from(pod), port: (proto != Proto::Icmp).then_some(sport) },
                dst: ep(dst, dport),
                proto,
            };
            let snap = Snapshot::of_maps(&h.maps, CAP, Ipv4Addr::from(pod)).unwrap();
            let ex = explain(&snap, &q);
            let what = format!("seed {seed}, round {round}, packet {i}: {}\n{}", ex.action, ex.text());
            let before = h.counters();
            let (verdict, out) = h.run(FROM_POD, &input);
            let after = h.counters();
            let mut moved: Vec<&str> = after.iter().filter(|(n, v)| before[*n] != **v).map(|(n, _)| *n).collect();
            let mut said: Vec<&str> = ex.counters.clone();
            moved.sort_unstable();
            said.sort_unstable();
            *verdicts.entry(format!("{:?}", ex.verdict)).or_default() += 1;
            let want = match ex.verdict {
                Verdict::ExistingFlow | Verdict::Redirect => OK,
                Verdict::PassNotMeshnet | Verdict::PassNoGatewayForProto => UNSPEC,
                Verdict::DropNoLiveGateway | Verdict::DropNoFreePort | Verdict::DropTableFull | Verdict::DropUnsupportedProto => {
                    SHOT
                }
                Verdict::TunnelEncap => REDIRECT,
                Verdict::Unknown | Verdict::TunnelDeliver | Verdict::TunnelDrop => panic!("{what}: explain could not tell"),
            };
            assert_eq!(verdict_name(verdict), verdict_name(want), "{what}\ncounters moved: {moved:?}; flows {:?}", h.flow_counts());
            // Restoring a lost half is the program's own business, which explain names in
            // its steps rather than its counters.
            moved.retain(|n| !["fwd_restored", "rev_restored"].contains(n));
            assert_eq!(moved, said, "{what}: counters; flows {:?}", h.flow_counts());
            if verdict == OK {
                let s = checked(&out);
                if let Some(gw) = &ex.gateway {
                    assert_eq!(s.dst.to_string(), *gw, "{what}: gateway");
                }
                if let Some(flow) = &ex.flow {
                    assert_eq!(s.dst.to_string(), flow.gateway, "{what}: the flow's gateway");
                }
                let port = ex.reply.as_ref().and_then(|r| r.nat_port).or(ex.flow.as_ref().and_then(|f| f.nat_port)).unwrap_or(sport);
                assert_eq!(s.src.port(), port, "{what}: source port");
            } else if verdict == UNSPEC {
                assert_bytes_eq(&what, &out, &input);
            }
        }
    }
    eprintln!("explain vs program: {verdicts:?}");
    for v in ["ExistingFlow", "Redirect", "PassNotMeshnet", "PassNoGatewayForProto", "DropNoLiveGateway", "DropTableFull", "DropUnsupportedProto"] {
        assert!(verdicts.contains_key(v), "no packet got {v}: {verdicts:?}");
    }
}

/// Garbage collection, purges and metrics read the flow tables whole with
/// `BPF_MAP_LOOKUP_BATCH` (5.6+): on a table of 20,000 entries the batch read returns exactly
/// what an entry-by-entry walk does. (Where the kernel has no batch lookup, on 5.4, the read
/// says `Unsupported` and the caller walks the table entry by entry.)
#[test]
fn batch_reads_match_entry_by_entry_walks() {
    use std::os::fd::AsFd as _;
    meshnet_tests::require_root();
    const N: u32 = 20_000;
    let fs = meshnet_tests::Bpffs::new();
    let path = fs.dir.join("flows");
    meshnet_tests::raw_bpf::create_pinned(&path, meshnet_tests::raw_bpf::HASH, 16, u32::try_from(size_of::<NatFwd>()).unwrap(), N, 0);
    let data = aya::maps::MapData::from_pin(&path).unwrap();
    let mut map: aya::maps::HashMap<_, FlowKey, NatFwd> = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&path).unwrap()).unwrap().try_into().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x6d65_7368);
    for i in 0..N {
        let key = FlowKey { src_be: rng.u32(..), dst_be: rng.u32(..), sport_be: rng.u16(..), dport_be: rng.u16(..), proto: 6, ..FlowKey::default() };
        let fwd = NatFwd { gw_addr_be: rng.u32(..), peer_id: i, last_seen_ns: rng.u64(..), ..NatFwd::default() };
        map.insert(key, fwd, 0).unwrap();
    }
    let walked: std::collections::HashMap<FlowKey, NatFwd> = map.iter().map(Result::unwrap).collect();
    let batch = match meshnet::batch::lookup_all::<FlowKey, NatFwd>(data.fd().as_fd()) {
        Ok(b) => b,
        // Before 5.6 the kernel has no batch operations, the agent walks, and so does the GC.
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported && !meshnet_tests::kernel_at_least(5, 6) => {
            meshnet_tests::skip("batch map operations (kernel >= 5.6)");
            return;
        }
        Err(e) => panic!("every kernel from 5.6 on has batch lookups: {e}"),
    };
    assert_eq!(batch.len(), walked.len(), "the batch read a different number of entries");
    let batched: std::collections::HashMap<FlowKey, NatFwd> = batch.into_iter().collect();
    assert_eq!(batched, walked);
    assert_eq!(walked.len(), N as usize);

    // An empty table reads as empty, not as an error.
    let empty = fs.dir.join("empty");
    meshnet_tests::raw_bpf::create_pinned(&empty, meshnet_tests::raw_bpf::HASH, 16, u32::try_from(size_of::<NatFwd>()).unwrap(), 16, 0);
    let empty = aya::maps::MapData::from_pin(&empty).unwrap();
    assert!(meshnet::batch::lookup_all::<FlowKey, NatFwd>(empty.fd().as_fd()).unwrap().is_empty());

    // The datapath's own flow maps go through the batch path too, and agree with a walk.
    let mut h = Harness::new(CONFIG);
    for _ in 0..1000 {
        let key = FlowKey { src_be: rng.u32(..), dst_be: rng.u32(..), sport_be: rng.u16(..), dport_be: rng.u16(..), proto: 17, ..FlowKey::default() };
        h.maps.nat_fwd.insert(key, NatFwd { peer_id: 1, ..NatFwd::default() }, 0).unwrap();
        h.maps.nat_rev.insert(key, NatRev { peer_id: 1, ..NatRev::default() }, 0).unwrap();
    }
    let fwd: std::collections::HashMap<_, _> = h.maps.forward_flows().into_iter().collect();
    assert_eq!(fwd, h.maps.nat_fwd.iter().map(Result::unwrap).collect());
    let rev: std::collections::HashMap<_, _> = h.maps.reverse_flows().into_iter().collect();
    assert_eq!(rev, h.maps.nat_rev.iter().map(Result::unwrap).collect());
    assert_eq!((fwd.len(), rev.len()), (1000, 1000));
}

/// What the agent would make of `peers` peers named `{prefix}{i}`, each with `cidrs` /32s of
/// its own taken from `base` on (`peers × cidrs` routes) and [`CONFIG`]'s gateway.
fn many_routes(prefix: &str, peers: u32, cidrs: u32, base: u32) -> meshnet::config::Desired {
    let template = Config::from_yaml(CONFIG).unwrap().desired();
    let gateways = *template.peers.values().next().unwrap();
    let mut d = meshnet::config::Desired { local: template.local, ..Default::default() };
    for p in 0..peers {
        let name = format!("{prefix}{p}");
        let id = peer_id(&name);
        d.peer_names.insert(id, name);
        d.peers.insert(id, gateways);
        for c in 0..cidrs {
            d.routes.insert(ipnet::Ipv4Net::new(Ipv4Addr::from(base + p * cidrs + c), 32).unwrap(), id);
        }
    }
    assert_eq!(d.peers.len(), peers as usize, "two names hash alike");
    d
}

/// Full maps are replaced whole by as many other entries: the removals make room where the
/// new entries do not fit beside the old ones, where failing would leave every change out
/// until the agent restarts. The peer maps as a config may fill them; the route trie made
/// smaller than the agent's, the same code at a size a VM fills in seconds.
#[test]
fn a_full_route_map_or_peer_map_is_replaced_whole() {
    use meshnet_common::limits::MAX_PEERS;
    const MAX_ROUTES: u32 = 4 * MAX_PEERS;
    let routes = MAX_ROUTES / MAX_PEERS;
    let mut h = Harness::resized(CONFIG, &[(names::ROUTES, MAX_ROUTES)]);
    h.maps.sync(&many_routes("a", MAX_PEERS, routes, 0x0c00_0000)).unwrap();
    assert_eq!(h.maps.current().unwrap().routes.len(), MAX_ROUTES as usize);
    // Other peers, other routes: not one entry of either map carries over.
    let report = h.maps.sync(&many_routes("b", MAX_PEERS, routes, 0x0d00_0000)).unwrap();
    assert_eq!((report.routes_removed, report.peers_removed), (MAX_ROUTES as usize, MAX_PEERS as usize), "{report:?}");
    let now = h.maps.current().unwrap();
    assert_eq!((now.routes.len(), now.peers.len()), (MAX_ROUTES as usize, MAX_PEERS as usize));
    assert!(now.routes.keys().all(|net| u32::from(net.addr()) >> 24 == 0x0d), "an old route is left");
    // And half of them back: a partial swap makes room the same way.
    let mut mixed = many_routes("a", MAX_PEERS / 2, routes, 0x0c00_0000);
    let other = many_routes("b", MAX_PEERS / 2, routes, 0x0d00_0000);
    mixed.routes.extend(other.routes);
    mixed.peers.extend(other.peers);
    mixed.peer_names.extend(other.peer_names);
    h.maps.sync(&mixed).unwrap();
    assert_eq!(h.maps.current().unwrap().routes, mixed.routes);
    // A route that moves to another peer in the full trie: before Linux 6.14 a full trie
    // refuses even a key it holds.
    let mut moved = mixed.clone();
    let first = *moved.routes.keys().next().unwrap();
    let other = *moved.peers.keys().find(|id| Some(*id) != moved.routes.get(&first)).unwrap();
    moved.routes.insert(first, other);
    h.maps.sync(&moved).unwrap();
    assert_eq!(h.maps.current().unwrap().routes, moved.routes);
    // Peers with a name and no gateways (tunnel peers) fill the name map while the peer map
    // has room: the names are replaced all the same.
    let names_only = |prefix: &str, base: u32| {
        let mut d = many_routes(prefix, MAX_PEERS / 2, 1, base);
        for i in 0..MAX_PEERS / 2 {
            let name = format!("{prefix}-tunnel{i}");
            d.peer_names.insert(peer_id(&name), name);
        }
        assert_eq!(d.peer_names.len(), MAX_PEERS as usize, "two names hash alike");
        d
    };
    h.maps.sync(&names_only("c", 0x0e00_0000)).unwrap();
    let last = names_only("d", 0x0f00_0000);
    h.maps.sync(&last).unwrap();
    assert_eq!(h.maps.current().unwrap().names, last.peer_names);
}
