//! End to end across two simulated clusters (see `meshnet_tests::topo`): without meshnet a
//! remote pod IP is unreachable; with it, TCP and UDP to remote pod IPs get the right
//! replies, from the address the client addressed, also when two flows collide on one
//! translated tuple, and exactly as hand-written iptables DNAT would answer.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
};

use meshnet_tests::{
    peer::{self, IO_TIMEOUT},
    topo::{self, app_a, app_b, Options, Topology},
};
use socket2::{Domain, Protocol, Socket, Type};

/// How the client's node reaches the remote pod CIDR.
#[derive(Clone, Copy, Debug)]
enum Via {
    Meshnet,
    Iptables,
}

fn setup(via: Via, opts: Options) -> (Topology, Option<meshnet_tests::Agent>) {
    let t = Topology::new(opts);
    let agent = match via {
        Via::Meshnet => Some(t.start_meshnet(&[])),
        Via::Iptables => {
            t.install_iptables_dnat();
            None
        }
    };
    (t, agent)
}

fn tcp(t: &Topology, target: SocketAddrV4, msg: &str) -> String {
    let msg = msg.to_string();
    t.client.run(move || peer::tcp_request(target, &msg)).unwrap_or_else(|e| panic!("TCP to {target}: {e}"))
}

fn udp(t: &Topology, target: SocketAddrV4, msg: &str) -> (String, SocketAddr) {
    let msg = msg.to_string();
    t.client
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            peer::udp_request(&s, target, &msg)
        })
        .unwrap_or_else(|e| panic!("UDP to {target}: {e}"))
}

/// Two UDP requests from one unconnected socket on one port, to two remote pods, both in
/// flight at once: without remapping both would become one tuple towards the gateway.
fn udp_collision(t: &Topology) -> BTreeMap<String, String> {
    t.client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:5300").unwrap();
            peer::udp_fanout(&s, &[app_a(), app_b()], "same source port")
        })
        .unwrap()
        .into_iter()
        .map(|(from, reply)| (from.to_string(), reply))
        .collect()
}

/// Two TCP connections from one source port (SO_REUSEADDR) to two remote pods, open at once.
fn tcp_collision(t: &Topology) -> BTreeMap<String, String> {
    t.client.run(|| {
        let local: SocketAddr = SocketAddrV4::new(topo::CLIENT_IP, 40_100).into();
        let conns: Vec<(SocketAddrV4, TcpStream)> = [app_a(), app_b()]
            .into_iter()
            .map(|target| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
                s.set_reuse_address(true).unwrap();
                s.bind(&local.into()).unwrap();
                s.connect_timeout(&SocketAddr::from(target).into(), IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect {target} from {local}: {e}"));
                (target, s.into())
            })
            .collect();
        // Both connections are established before either sends.
        conns
            .into_iter()
            .map(|(target, s)| (target.to_string(), peer::tcp_exchange(s, target, "same source port").unwrap()))
            .collect()
    })
}

#[test]
fn remote_pod_unreachable_without_meshnet() {
    let t = Topology::new(Options::default());
    let err = t.client.run(|| peer::tcp_request(app_a(), "x")).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)),
        "expected unreachable, got {err}"
    );
}

fn basic(opts: Options) {
    let (t, _agent) = setup(Via::Meshnet, opts);
    exchange(&t);
}

/// TCP to both remote pods and UDP to one, answered by the pods addressed.
fn exchange(t: &Topology) {
    assert_eq!(tcp(t, app_a(), "hi a"), "app 10.245.0.20:8080 got hi a");
    assert_eq!(tcp(t, app_b(), "hi b"), "app 10.245.0.21:8080 got hi b");
    let (reply, from) = udp(t, app_b(), "udp b");
    assert_eq!(reply, "app 10.245.0.21:8080 got udp b");
    assert_eq!(from, SocketAddr::from(app_b()), "the reply must come from the remote pod the client addressed");
    assert!(t.counter("flow_opened") >= 3);
    assert!(t.counter("flow_answered") >= 3);
    assert_eq!(t.counter("rewrite_failed"), 0);

    // The flows are in the NAT dump with their original and translated tuples.
    let nat = t.dump_json("nat")["nat"].as_array().unwrap().clone();
    let row = nat
        .iter()
        .find(|r| r["remote"] == "10.245.0.21:8080" && r["proto"] == "udp")
        .unwrap_or_else(|| panic!("no UDP flow to app-b in {nat:?}"));
    assert_eq!(row["gateway"], format!("{}:{}", topo::NODE2_LAN, topo::NODEPORT_UDP));
    assert!(row["pod"].as_str().unwrap().starts_with("10.244.0.10:"));
}

/// Full checksums everywhere, verified by every receiver: a wrong checksum loses packets.
#[test]
fn tcp_and_udp_reach_remote_pods_strict_checksums() {
    basic(Options { strict_checksums: true, ..Options::default() });
}

/// veth's default offload: pods send CHECKSUM_PARTIAL packets.
#[test]
fn tcp_and_udp_reach_remote_pods_with_offload() {
    basic(Options::default());
}

/// CHECKSUM_PARTIAL packets whose checksums are computed after meshnet and verified by the
/// receiving pods: the partial sums meshnet leaves must be right.
#[test]
fn tcp_and_udp_reach_remote_pods_with_partial_checksums_verified() {
    let (t, agent) = setup(Via::Meshnet, Options { verify_partial: true, ..Options::default() });
    let read = meshnet::datapath::skb_layout().is_some();
    let agent = agent.expect("meshnet's agent");
    let out = agent.child.output();
    assert_eq!(out.contains("the datapath reads the skb's checksum state"), read, "{out}");
    exchange(&t);
}

/// The same, with the datapath every kernel before 6.2 runs (the checksum helper tells the
/// skb's checksum state), on whichever kernel the suite runs.
#[test]
fn tcp_and_udp_reach_remote_pods_with_partial_checksums_verified_through_the_checksum_helper() {
    let t = Topology::new(Options { verify_partial: true, ..Options::default() });
    let agent = t.start_meshnet_with(meshnet::ip_summed::NO_KFUNC_ENV, &[]);
    let out = agent.child.output();
    assert!(out.contains("the datapath asks the checksum helper"), "{out}");
    exchange(&t);
}

#[test]
fn udp_port_collision_is_remapped() {
    let (t, _agent) = setup(Via::Meshnet, Options { strict_checksums: true, ..Options::default() });
    let replies = udp_collision(&t);
    assert_eq!(replies["10.245.0.20:8080"], "app 10.245.0.20:8080 got same source port");
    assert_eq!(replies["10.245.0.21:8080"], "app 10.245.0.21:8080 got same source port");
    assert!(t.counter("port_remap") >= 1, "no remap counted");
    let nat = t.dump_json("nat")["nat"].as_array().unwrap().clone();
    let remapped: Vec<_> = nat.iter().filter(|r| r["pod"] == "10.244.0.10:5300" && !r["natPort"].is_null()).collect();
    assert_eq!(remapped.len(), 1, "exactly one of the two flows gets another port: {nat:?}");
}

#[test]
fn tcp_port_collision_is_remapped() {
    let (t, _agent) = setup(Via::Meshnet, Options { strict_checksums: true, ..Options::default() });
    let replies = tcp_collision(&t);
    assert_eq!(replies["10.245.0.20:8080"], "app 10.245.0.20:8080 got same source port");
    assert_eq!(replies["10.245.0.21:8080"], "app 10.245.0.21:8080 got same source port");
    assert!(t.counter("port_remap") >= 1, "no remap counted");
}

#[test]
fn two_hundred_concurrent_flows() {
    let (t, _agent) = setup(Via::Meshnet, Options::default());
    let replies = t.client.run(|| {
        let conns: Vec<(SocketAddrV4, TcpStream)> = (0..200)
            .map(|i| {
                let target = if i % 2 == 0 { app_a() } else { app_b() };
                (target, TcpStream::connect_timeout(&target.into(), IO_TIMEOUT).unwrap())
            })
            .collect();
        // All 200 are open at once; now each does its exchange. A second handle of each keeps
        // it open until the flows are counted: closed flows may expire first on a slow machine.
        let kept: Vec<TcpStream> = conns.iter().map(|(_, s)| s.try_clone().unwrap()).collect();
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, (target, s))| std::thread::spawn(move || (i, target, peer::tcp_exchange(s, target, &format!("flow {i}")))))
            .collect();
        (handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), kept)
    });
    let (replies, _kept) = replies;
    assert_eq!(replies.len(), 200);
    for (i, target, reply) in replies {
        assert_eq!(reply.unwrap(), format!("app {target} got flow {i}"));
    }
    let flows = t.dump_json("nat")["nat"].as_array().unwrap().len();
    assert!(flows >= 200, "only {flows} flows in the NAT map");
}

/// The same workload through meshnet and through hand-written iptables DNAT on the node:
/// every answer is the same, collisions included.
#[test]
fn answers_match_handwritten_iptables_dnat() {
    let run = |via: Via| {
        let (t, _agent) = setup(via, Options { strict_checksums: true, ..Options::default() });
        let mut answers = BTreeMap::new();
        answers.insert("tcp a".to_string(), tcp(&t, app_a(), "q1"));
        answers.insert("tcp b".to_string(), tcp(&t, app_b(), "q2"));
        let (r, from) = udp(&t, app_a(), "q3");
        answers.insert("udp a".to_string(), format!("{r} from {from}"));
        for (k, v) in udp_collision(&t) {
            answers.insert(format!("udp collision {k}"), v);
        }
        for (k, v) in tcp_collision(&t) {
            answers.insert(format!("tcp collision {k}"), v);
        }
        answers
    };
    let iptables = run(Via::Iptables);
    let meshnet = run(Via::Meshnet);
    assert_eq!(meshnet, iptables);
    assert_eq!(meshnet.len(), 7);
}

#[test]
fn detach_restores_the_node() {
    let (t, agent) = setup(Via::Meshnet, Options::default());
    assert_eq!(tcp(&t, app_a(), "before"), "app 10.245.0.20:8080 got before");
    let mut agent = agent.unwrap();
    assert!(agent.child.stop());
    // The datapath outlives the agent.
    assert_eq!(tcp(&t, app_a(), "agent stopped"), "app 10.245.0.20:8080 got agent stopped");
    let out = t.meshnet("detach");
    assert!(out.ok, "{}", out.stderr);
    assert!(!t.pin_path().exists() || std::fs::read_dir(t.pin_path()).unwrap().next().is_none());
    for iface in ["vethc", "vethc2"] {
        assert!(!t.node1.exec(&format!("tc filter show dev {iface} ingress")).contains("meshnet"));
    }
    let err = t.client.run(|| peer::tcp_request(app_a(), "after")).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)), "{err}");
}

/// 10,000 flows from random source ports to both remote pods, TCP and UDP (`MESHNET_TUPLES`
/// scales it; the VMs run 1,000). Offload stays on at the pods, so meshnet rewrites
/// CHECKSUM_PARTIAL packets, and is off on the LAN: the kernel completes each checksum in
/// software before the packet leaves node1, node2 verifies it, and one wrong
/// pseudo-header update loses that flow's packet. Every flow must get its reply.
#[test]
fn random_tuples_with_partial_checksums_arrive_intact() {
    let n: usize = std::env::var("MESHNET_TUPLES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let t = Topology::new(Options::default());
    t.node1.exec("ethtool -K lan0 rx off tx off >/dev/null");
    t.node2.exec("ethtool -K lan0 rx off tx off >/dev/null");
    let _agent = t.start_meshnet(&[]);
    let seed: u64 = std::env::var("MESHNET_SWEEP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x7475_706c_6573);
    let failures = t.client.run(move || {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut ports = std::collections::HashSet::new();
        let mut failures = Vec::new();
        for i in 0..n {
            let port = loop {
                let p = rng.u16(20_000..60_000);
                if ports.insert(p) {
                    break p;
                }
            };
            let target = if rng.bool() { app_a() } else { app_b() };
            let msg = format!("tuple {i}");
            let want = format!("app {target} got {msg}");
            let got = if rng.bool() {
                UdpSocket::bind(("0.0.0.0", port)).and_then(|s| peer::udp_request(&s, target, &msg)).map(|(r, from)| {
                    if from == SocketAddr::V4(target) { r } else { format!("{r} (from {from})") }
                })
            } else {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
                s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                    .and_then(|()| s.connect_timeout(&SocketAddr::V4(target).into(), IO_TIMEOUT))
                    .and_then(|()| peer::tcp_exchange(s.into(), target, &msg))
            };
            match got {
                Ok(r) if r == want => {}
                other => failures.push(format!("seed {seed}, port {port} -> {target}: {other:?}")),
            }
        }
        failures
    });
    assert!(failures.is_empty(), "{} of {n} flows failed: {:?}", failures.len(), &failures[..failures.len().min(10)]);
    assert!(t.counter("flow_opened") >= n as u64);
}
