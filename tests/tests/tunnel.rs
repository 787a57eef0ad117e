//! Tunnel mode across two simulated clusters whose nodes admit nothing from each other but
//! the tunnel NodePort (see `meshnet_tests::tunnel_topo`): pods reach the other cluster's pods
//! over TCP, UDP and ICMP, both ways, with their own addresses; every remote pod IP reaches
//! that pod; a thousand flows at once and flows held through agent restarts all complete;
//! what arrives on the tunnel port without being a peer node's well-formed packet for a local
//! pod is dropped and counted; the tunnel's 36 bytes are absorbed by MSS clamping,
//! fragmentation and PMTU discovery; and tunnel and gateway peers work side by side. Both
//! deliveries (through the stack, and `bpf_redirect_neigh`) and both attach paths.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use meshnet::config::peer_id;
use nix::sys::signal::Signal;
use meshnet_tests::{
    kernel_at_least,
    peer::IO_TIMEOUT,
    poll,
    topo::{APP_A, APP_B, APP_PORT, CLIENT2_IP, CLIENT_IP, GW_IP, GW_PORT, NODE1_LAN, NODE2_LAN, NODEPORT_TCP},
    tunnel_topo::{
        bulk_echo, pattern, raise_open_files_limit, tcp_line, tcp_request, tunnel_config, udp_request, Agents, Delivery, Node, Options, Pod,
        Side, TunnelTopology, APP_A_POD, APP_B_POD, CLIENT, CLIENT2, OVERHEAD, TUNNEL_PORT,
    },
    NetNs,
};

const WAIT: Duration = Duration::from_mins(1);
/// The MTU of the pods' and the LAN's interfaces (veth's default).
const MTU: u32 = 1500;
/// The largest MSS that fits the tunnel: MTU less the overhead and IPv4 and TCP headers.
const TUNNEL_MSS: u32 = MTU - OVERHEAD - 40;

fn setup(opts: Options) -> (TunnelTopology, Agents) {
    let t = TunnelTopology::new(opts);
    let agents = t.start_agents();
    (t, agents)
}

fn opts(delivery: Delivery) -> Options {
    Options::new(delivery)
}

fn netlink(delivery: Delivery) -> Options {
    Options { attach_mode: Some("netlink"), ..Options::new(delivery) }
}

/// The path of kernels before 5.10, on this one.
fn fib_lookup(delivery: Delivery) -> Options {
    Options { no_redirect_neigh: true, ..Options::new(delivery) }
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A request line from `ns` to `to`; asserts the answer came from that pod and named `src`,
/// the requesting pod's own address, as the peer it saw.
fn tcp_check(ns: &NetNs, src: Ipv4Addr, to: Pod, msg: &str) {
    let m = msg.to_string();
    let (reply, local) =
        ns.run(move || tcp_request(to.app(), &m)).unwrap_or_else(|e| panic!("TCP from {src} to {} ({msg}): {e}", to.app()));
    assert_eq!(local.ip(), IpAddr::V4(src));
    assert_eq!(reply, to.reply(msg, local), "{} must answer, seeing {src} itself", to.name);
}

/// A datagram from `ns` to `to`; asserts the answer came from that pod's address and named
/// `src` as the peer.
fn udp_check(ns: &NetNs, src: Ipv4Addr, to: Pod, msg: &str) {
    let m = msg.to_string();
    let (reply, from, port) = ns
        .run(move || udp_request(to.app(), m.as_bytes()))
        .unwrap_or_else(|e| panic!("UDP from {src} to {} ({msg}): {e}", to.app()));
    assert_eq!(from, SocketAddr::V4(to.app()), "the answer must come from the pod addressed");
    assert_eq!(reply, to.reply(msg, v4(src, port)), "{} must answer, seeing {src} itself", to.name);
}

fn count(c: &serde_json::Map<String, serde_json::Value>, name: &str) -> u64 {
    c.get(name).and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("no counter {name} in {c:?}"))
}

#[test]
fn remote_pods_are_unreachable_without_meshnet() {
    let t = TunnelTopology::new(opts(Delivery::Stack));
    let err = t.client.run(|| tcp_request(APP_A_POD.app(), "x")).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)), "expected unreachable, got {err}");

    // Routed plainly between the nodes, a pod's packet leaves node1 masqueraded and node2's
    // filter drops it: what later gets through is the tunnel's doing.
    t.node1.ns.ip(&format!("route add 10.245.0.0/16 via {NODE2_LAN}"));
    t.node2.ns.ip(&format!("route add 10.244.0.0/16 via {NODE1_LAN}"));
    let before = t.node2.lan_drops("FORWARD");
    let sock = t.client.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    let dropped = poll(WAIT, || {
        sock.send_to(b"routed plainly", APP_A_POD.app()).unwrap();
        (t.node2.lan_drops("FORWARD") > before).then_some(())
    });
    assert!(dropped.is_some(), "node2's FORWARD filter never dropped the plainly routed datagram");
    assert!(!t.server(APP_A_POD).saw(b"routed plainly"), "app-a got a plainly routed datagram past node2's filter");
}

// ---------------------------------------------------------------------------------------
// TCP, UDP and ICMP both ways, pod addresses preserved
// ---------------------------------------------------------------------------------------

fn tcp_both_ways(opts: Options) {
    let (t, _agents) = setup(opts);
    tcp_check(&t.client, CLIENT_IP, APP_A_POD, "hello from cluster1");
    tcp_check(&t.app_a, APP_A, CLIENT, "hello from cluster2");

    for (node, peer) in [(&t.node1, "cluster2"), (&t.node2, "cluster1")] {
        let c = node.counters();
        for name in ["tunnel_encap", "tunnel_decap"] {
            assert!(count(&c, name) > 0, "{}: {name} is 0: {c:?}", node.cluster);
        }
        let row = node.tunnel_peer(peer);
        for field in ["txPackets", "txBytes", "rxPackets", "rxBytes"] {
            assert!(row[field].as_u64().is_some_and(|n| n > 0), "{}: {peer}'s {field}: {row}", node.cluster);
        }
    }

    // Through the stack, decapsulated packets pass each node's FORWARD filter; redirected,
    // they go straight to the pod (without bpf_redirect_neigh, only once the node has the
    // pod's neighbour entry: the stack resolves it for the first packets).
    for node in [&t.node1, &t.node2] {
        let forwarded = node.forwarded_from_remote_pods();
        match opts.delivery {
            Delivery::Stack => assert!(forwarded > 0, "{}: no decapsulated packet went through FORWARD", node.cluster),
            Delivery::Redirect | Delivery::Peer if !opts.no_redirect_neigh => {
                assert_eq!(forwarded, 0, "{}: redirected packets went through FORWARD", node.cluster);
            }
            Delivery::Redirect | Delivery::Peer => {}
        }
    }

    // Without bpf_redirect_neigh, the agents keep each other's neighbour entries resolved
    // with datagrams to the discard port, which each node's filter drops: a sign the agents
    // took that path.
    if opts.no_redirect_neigh {
        for node in [&t.node1, &t.node2] {
            assert!(node.lan_drops("INPUT") > 0, "{}: no neighbour-warming datagram seen", node.cluster);
        }
    }

    // What node1's tables say: its own settings, and cluster2's node behind its pod CIDR.
    let tun = t.node1.dump_json("tunnel")["tunnel"].clone();
    let settings = &tun["settings"];
    assert_eq!(settings["port"], TUNNEL_PORT, "{tun}");
    assert_eq!(settings["delivery"], opts.delivery.as_str(), "{tun}");
    assert_eq!(settings["clusterId"], peer_id("cluster1"), "{tun}");
    assert_eq!(settings["mtu"], MTU, "{tun}");
    // The agent found node1's bridge address in its pod CIDR, which the tunnel never delivers to.
    assert_eq!(settings["nodeAddresses"], serde_json::json!(["10.244.0.1"]), "{tun}");
    let routes = tun["routes"].as_array().unwrap_or_else(|| panic!("no routes: {tun}"));
    assert_eq!(routes.len(), 1, "{tun}");
    let r = &routes[0];
    assert_eq!(r["cidr"], "10.245.0.0/24", "{tun}");
    assert_eq!(r["peer"], "cluster2", "{tun}");
    assert_eq!(r["node"], NODE2_LAN, "{tun}");
    assert_eq!(r["port"], TUNNEL_PORT, "{tun}");
    assert_eq!(r["source"], NODE1_LAN, "the outer source must be node1's address toward node2: {tun}");

    // Each pod's address leads to the host side of its interface, with the pod's MAC as the
    // pod's own namespace has it.
    for (node, pod, ip, host) in [(&t.node1, &t.client, CLIENT_IP, "vethc"), (&t.node1, &t.client2, CLIENT2_IP, "vethc2"), (&t.node2, &t.app_a, APP_A, "vetha")] {
        let mac = pod.exec("cat /sys/class/net/eth0/address").trim().to_string();
        let index: u64 = node.ns.exec(&format!("cat /sys/class/net/{host}/ifindex")).trim().parse().unwrap();
        // Each pod of these /24s has a slot of its own: the decapsulating program finds it
        // by an array read.
        let want = serde_json::json!({ "address": ip.to_string(), "ifindex": index, "podMac": mac, "lookup": "slot" });
        let listed = poll(WAIT, || {
            let ports = node.dump_json("tunnel")["tunnel"]["podPorts"].clone();
            ports.as_array().is_some_and(|p| p.contains(&want)).then_some(())
        });
        assert!(listed.is_some(), "{}: {want} is not among the pod ports: {}", node.cluster, node.dump_json("tunnel")["tunnel"]["podPorts"]);
    }
}

/// The port table holds only veths whose other end is in another namespace: a pod's.
/// `bpf_redirect_peer` hands a packet to that other end, and drops it when the end is in the
/// node's own namespace. Such a veth, matched by `interfaces`, with an address of the node's
/// pod CIDR on its other end, is left out, while a pod that comes after it is listed.
#[test]
fn a_veth_with_both_ends_on_the_node_is_no_pod_port() {
    let (t, _agents) = setup(opts(Delivery::Redirect));
    let node = &t.node1;
    node.ns.ip("link add vethsame type veth peer name samep");
    node.ns.ip("addr add 10.244.0.99/24 dev samep");
    node.ns.ip("link set samep up");
    node.ns.ip("link set vethsame up");
    let late = NetNs::new("late");
    node.ns.ip(&format!("link add vethlate type veth peer name eth0 netns {}", late.name));
    node.ns.ip("link set vethlate master cni0 up");
    late.ip("addr add 10.244.0.77/24 dev eth0");
    late.ip("link set eth0 up");
    let addresses = || -> Vec<String> {
        let ports = node.dump_json("tunnel")["tunnel"]["podPorts"].clone();
        ports.as_array().into_iter().flatten().filter_map(|p| p["address"].as_str().map(str::to_string)).collect()
    };
    let listed = poll(WAIT, || addresses().contains(&"10.244.0.77".to_string()).then_some(()));
    assert!(listed.is_some(), "the pod that came later is not among the pod ports: {:?}", addresses());
    assert!(!addresses().contains(&"10.244.0.99".to_string()), "a veth within the node's namespace is a pod port: {:?}", addresses());
}

/// `delivery: peer` hands a pod of the port table its packets straight into its end of the
/// veth where the kernel has `bpf_redirect_peer` (5.10): the host end transmits none of them.
/// `delivery: redirect`, and `peer` below 5.10 or with the agent held to that path, send each
/// one out of the host end, whose qdisc and tc egress see it.
fn redirect_delivery_path(opts: Options) {
    const DATAGRAMS: u64 = 50;
    let peer = opts.delivery == Delivery::Peer && kernel_at_least(5, 10) && !opts.no_redirect_neigh;
    let (t, _agents) = setup(opts);
    let listed = poll(WAIT, || {
        let ports = t.node2.dump_json("tunnel")["tunnel"]["podPorts"].clone();
        ports.as_array().into_iter().flatten().any(|p| p["address"] == APP_A.to_string() && p["lookup"] == "slot").then_some(())
    });
    assert!(listed.is_some(), "app-a is not among node2's pod ports: {}", t.node2.dump_json("tunnel"));
    // Neighbours resolved and caches warm before counting.
    udp_check(&t.client, CLIENT_IP, APP_A_POD, "warm-up");
    let sent = || -> u64 { t.node2.ns.exec("cat /sys/class/net/vetha/statistics/tx_packets").trim().parse().unwrap() };
    let (before, decap) = (sent(), t.node2.counter("tunnel_decap"));
    for i in 0..DATAGRAMS {
        udp_check(&t.client, CLIENT_IP, APP_A_POD, &format!("datagram {i}"));
    }
    let (host_end, decapsulated) = (sent() - before, t.node2.counter("tunnel_decap") - decap);
    assert!(decapsulated >= DATAGRAMS, "only {decapsulated} of {DATAGRAMS} datagrams were decapsulated");
    if peer {
        // A few may be the bridge's own (IPv6 multicast flooded to its ports).
        assert!(host_end < DATAGRAMS / 2, "vetha transmitted {host_end} packets for {DATAGRAMS} datagrams: not handed to the pod's end");
    } else {
        assert!(host_end >= DATAGRAMS, "vetha transmitted {host_end} packets for {DATAGRAMS} datagrams");
    }
}

#[test]
fn peer_delivery_enters_the_pods_end_where_the_kernel_can() {
    redirect_delivery_path(opts(Delivery::Peer));
}

#[test]
fn peer_delivery_leaves_by_the_host_end_on_the_path_before_5_10() {
    redirect_delivery_path(fib_lookup(Delivery::Peer));
}

#[test]
fn redirect_delivery_leaves_by_the_host_end() {
    redirect_delivery_path(opts(Delivery::Redirect));
}

#[test]
fn tcp_both_ways_with_pod_ips_preserved_stack() {
    tcp_both_ways(opts(Delivery::Stack));
}

#[test]
fn tcp_both_ways_with_pod_ips_preserved_redirect() {
    tcp_both_ways(opts(Delivery::Redirect));
}

#[test]
fn tcp_both_ways_with_pod_ips_preserved_peer() {
    tcp_both_ways(opts(Delivery::Peer));
}

#[test]
fn tcp_both_ways_with_pod_ips_preserved_netlink() {
    tcp_both_ways(netlink(Delivery::Stack));
}

#[test]
fn tcp_both_ways_with_pod_ips_preserved_fib_lookup_stack() {
    tcp_both_ways(fib_lookup(Delivery::Stack));
}

#[test]
fn tcp_both_ways_with_pod_ips_preserved_fib_lookup_redirect() {
    tcp_both_ways(fib_lookup(Delivery::Redirect));
}

fn udp_both_ways(opts: Options) {
    let (t, _agents) = setup(opts);
    udp_check(&t.client, CLIENT_IP, APP_A_POD, "datagram from cluster1");
    udp_check(&t.app_a, APP_A, CLIENT, "datagram from cluster2");
}

#[test]
fn udp_both_ways_stack() {
    udp_both_ways(opts(Delivery::Stack));
}

#[test]
fn udp_both_ways_redirect() {
    udp_both_ways(opts(Delivery::Redirect));
}

fn ping(opts: Options) {
    let (t, _agents) = setup(opts);
    let before = t.node2.counter("tunnel_decap");
    for (ns, dst) in [(&t.client, APP_A), (&t.client, APP_B), (&t.app_a, CLIENT_IP)] {
        let (ok, out) = ns.try_exec(&format!("ping -n -c 3 -i 0.2 -W 10 {dst}"));
        assert!(ok && out.contains("3 packets transmitted, 3 received"), "ping {dst}:\n{out}");
    }
    // Six echo requests and three replies reached node2 through the tunnel.
    let after = t.node2.counter("tunnel_decap");
    assert!(after >= before + 9, "node2 decapsulated {} packets for 9 ICMP messages", after - before);
}

#[test]
fn ping_crosses_stack() {
    ping(opts(Delivery::Stack));
}

#[test]
fn ping_crosses_redirect() {
    ping(opts(Delivery::Redirect));
}

#[test]
fn ping_crosses_fib_lookup_redirect() {
    ping(fib_lookup(Delivery::Redirect));
}

#[test]
fn ping_crosses_redirect_netlink() {
    ping(netlink(Delivery::Redirect));
}

/// Under kube-proxy, whose first FORWARD rule drops what conntrack holds INVALID, with the
/// default delivery (the configs say none): TCP both ways, a 1 MB transfer and ping cross,
/// and kube-proxy's rule drops nothing.
fn under_kube_proxy(opts: Options) {
    let t = TunnelTopology::new(Options { kube_proxy: true, ..opts });
    let config = |side| t.config(side).replace("  delivery: redirect\n", "");
    let _agents =
        Agents { node1: t.start_agent_with(Side::Node1, &config(Side::Node1)), node2: t.start_agent_with(Side::Node2, &config(Side::Node2)) };
    for node in [&t.node1, &t.node2] {
        let tun = node.dump_json("tunnel")["tunnel"].clone();
        assert_eq!(tun["settings"]["delivery"], "redirect", "{}: the default delivery: {tun}", node.cluster);
    }
    tcp_check(&t.client, CLIENT_IP, APP_A_POD, "hello from cluster1");
    tcp_check(&t.app_a, APP_A, CLIENT, "hello from cluster2");
    let data = Arc::new(pattern(1 << 20, 7));
    let d = data.clone();
    let (back, _) = t.client.run(move || bulk_echo(APP_B_POD.bulk(), d)).unwrap_or_else(|e| panic!("1 MB to app-b: {e}"));
    assert!(back == *data, "the 1 MB echo came back different ({} bytes)", back.len());
    for (ns, dst) in [(&t.client, APP_A), (&t.app_b, CLIENT_IP)] {
        let (ok, out) = ns.try_exec(&format!("ping -n -c 3 -i 0.2 -W 10 {dst}"));
        assert!(ok && out.contains("3 packets transmitted, 3 received"), "ping {dst}:\n{out}");
    }
    for node in [&t.node1, &t.node2] {
        assert_eq!(node.invalid_drops(), 0, "{}: kube-proxy's rule dropped tunnelled packets as INVALID", node.cluster);
        let c = node.counters();
        for name in ["tunnel_encap", "tunnel_decap"] {
            assert!(count(&c, name) > 0, "{}: {name} is 0: {c:?}", node.cluster);
        }
        // Without bpf_redirect_neigh the first packets to a pod the node has no neighbour
        // entry for yet go through the stack: a SYN, which conntrack takes as new.
        if !opts.no_redirect_neigh {
            assert_eq!(node.forwarded_from_remote_pods(), 0, "{}: redirected packets went through FORWARD", node.cluster);
        }
        let side = if node.cluster == "cluster1" { Side::Node1 } else { Side::Node2 };
        let doctor = node.meshnet(&format!("doctor --config {}", node.write_config(&config(side)).display()));
        assert!(doctor.stdout.contains("tunnel uplinks"), "{}: doctor checked no tunnel:\n{}", node.cluster, doctor.stdout);
        assert!(!doctor.stdout.contains("tunnel FORWARD rules"), "{}: redirect delivery needs no FORWARD check:\n{}", node.cluster, doctor.stdout);
    }
}

#[test]
fn flows_cross_under_kube_proxy() {
    under_kube_proxy(opts(Delivery::Redirect));
}

#[test]
fn flows_cross_under_kube_proxy_fib_lookup() {
    under_kube_proxy(fib_lookup(Delivery::Redirect));
}

/// Delivered through the stack, a tunnelled flow is seen by the receiving node's conntrack
/// one way only, and kube-proxy's INVALID drop kills it: no connection opens (node1's
/// conntrack holds the SYN-ACK INVALID), and doctor fails the node's config, naming the rule
/// and the fix.
#[test]
fn doctor_fails_stack_delivery_under_kube_proxy() {
    let t = TunnelTopology::new(Options { kube_proxy: true, ..opts(Delivery::Stack) });
    let _agents = t.start_agents();
    let refused = t.client.run(|| TcpStream::connect_timeout(&APP_A_POD.app().into(), Duration::from_secs(3)));
    assert!(refused.is_err(), "a connection opened through stack delivery under kube-proxy's INVALID drop");
    assert!(t.node1.invalid_drops() > 0, "node1's INVALID drop dropped nothing");
    for side in [Side::Node1, Side::Node2] {
        let node = t.node(side);
        let cfg = node.write_config(&t.config(side));
        let doctor = node.meshnet(&format!("doctor --config {}", cfg.display()));
        let line =
            doctor.stdout.lines().find(|l| l.contains("tunnel FORWARD rules")).unwrap_or_else(|| panic!("no FORWARD check:\n{}", doctor.stdout));
        assert!(line.starts_with("FAIL") && line.contains("--ctstate INVALID -j DROP"), "{}: {line}", node.cluster);
        assert!(doctor.stdout.contains("fix: set tunnel.delivery: redirect"), "{}", doctor.stdout);
        assert!(!doctor.ok, "doctor must exit non-zero on a failure");
    }
    // An exemption ahead of kube-proxy's jump (the peers' pods from the uplink, accepted
    // whatever conntrack thinks) lets stack delivery work, and doctor agrees.
    for (node, peer_pods) in [(&t.node1, "10.245.0.0/16"), (&t.node2, "10.244.0.0/16")] {
        node.ns.exec(&format!("iptables -I FORWARD 1 -i lan0 -s {peer_pods} -j ACCEPT"));
    }
    tcp_check(&t.client, CLIENT_IP, APP_A_POD, "exempted from cluster1");
    tcp_check(&t.app_a, APP_A, CLIENT, "exempted from cluster2");
    for side in [Side::Node1, Side::Node2] {
        let node = t.node(side);
        let cfg = node.write_config(&t.config(side));
        let doctor = node.meshnet(&format!("doctor --config {}", cfg.display()));
        let line = doctor.stdout.lines().find(|l| l.contains("tunnel FORWARD rules")).unwrap_or_default().to_string();
        assert!(line.starts_with("OK"), "{}: with the exemption: {line}\n{}", node.cluster, doctor.stdout);
    }
}

/// Every remote pod IP is that pod: with two pods behind one node (as behind one Service),
/// .21 is answered by app-b and .20 by app-a, over and over, from both client pods.
#[test]
fn each_remote_pod_ip_reaches_exactly_that_pod() {
    let (t, _agents) = setup(opts(Delivery::Stack));
    for round in 0..5 {
        for (ns, src) in [(&t.client, CLIENT_IP), (&t.client2, CLIENT2_IP)] {
            for to in [APP_B_POD, APP_A_POD] {
                let msg = format!("round {round} from {src} to {}", to.ip);
                tcp_check(ns, src, to, &msg);
                udp_check(ns, src, to, &msg);
            }
        }
    }
    // The reverse way too: app-b reaches client2, not client.
    tcp_check(&t.app_b, APP_B, CLIENT2, "to client2");
    udp_check(&t.app_b, APP_B, CLIENT2, "to client2");
    let to_b = t.server(APP_B_POD).seen.lock().unwrap().len();
    assert_eq!(to_b, 10, "app-b received {to_b} datagrams for the 10 addressed to it");
}

// ---------------------------------------------------------------------------------------
// Scale and restarts
// ---------------------------------------------------------------------------------------

/// 1,000 TCP connections from one pod to two remote pods: all open at once, then each
/// exchanges a line, then each closes cleanly (the server's end follows ours, no reset).
#[test]
fn a_thousand_concurrent_flows() {
    const FLOWS: usize = 1000;
    raise_open_files_limit();
    let (t, _agents) = setup(opts(Delivery::Redirect));
    let failures = t.client.run(|| {
        let conns: Vec<(usize, Pod, TcpStream)> = (0..FLOWS)
            .map(|i| {
                let to = if i % 2 == 0 { APP_A_POD } else { APP_B_POD };
                let s = TcpStream::connect_timeout(&to.app().into(), IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {i} to {}: {e}", to.app()));
                (i, to, s)
            })
            .collect();
        // All are open; now every one exchanges, at once.
        let exchanged: Vec<_> = conns
            .into_iter()
            .map(|(i, to, s)| {
                std::thread::spawn(move || {
                    let msg = format!("flow {i}");
                    let got = tcp_line(&s, &msg).map_err(|e| e.to_string()).and_then(|r| {
                        let want = to.reply(&msg, s.local_addr().unwrap());
                        if r == want { Ok(()) } else { Err(format!("got {r:?}, want {want:?}")) }
                    });
                    (i, s, got)
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        // All have exchanged; now every one closes, and sees the server close after it.
        let closed: Vec<_> = exchanged
            .into_iter()
            .map(|(i, s, got)| {
                std::thread::spawn(move || {
                    let closed = got.and_then(|()| {
                        s.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
                        let mut rest = Vec::new();
                        match (&s).read_to_end(&mut rest) {
                            Ok(0) => Ok(()),
                            Ok(n) => Err(format!("{n} unexpected bytes before the close")),
                            Err(e) => Err(format!("close: {e}")),
                        }
                    });
                    closed.err().map(|e| format!("flow {i}: {e}"))
                })
            })
            .collect();
        closed.into_iter().filter_map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    assert!(failures.is_empty(), "{} of {FLOWS} flows failed: {:?}", failures.len(), &failures[..failures.len().min(10)]);
    let encap = t.node1.counter("tunnel_encap");
    assert!(encap >= 3 * FLOWS as u64, "node1 encapsulated only {encap} packets for {FLOWS} connections");
}

/// A flow exchanging continuously on its own thread inside a pod until `stop`.
struct Flow {
    name: String,
    done: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<u64, String>>>,
}

impl Flow {
    /// A TCP connection from `ns` (pod address `src`) to `to`, exchanging lines of 16, 1,500
    /// and 6,000 bytes in turn; at `stop` it closes and expects the server's clean close.
    fn tcp(ns: &NetNs, src: Ipv4Addr, to: Pod, stop: &Arc<AtomicBool>) -> Self {
        let (done, stop) = (Arc::new(AtomicU64::new(0)), stop.clone());
        let counter = done.clone();
        let handle = ns.spawn(move || -> Result<u64, String> {
            let conn = TcpStream::connect_timeout(&to.app().into(), IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
            conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let local = conn.local_addr().unwrap();
            if local.ip() != IpAddr::V4(src) {
                return Err(format!("local address {local}"));
            }
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("seq {n} {}", "x".repeat([16, 1500, 6000][usize::try_from(n % 3).unwrap()]));
                (&conn).write_all(format!("{msg}\n").as_bytes()).map_err(|e| format!("write of seq {n}: {e}"))?;
                let mut line = String::new();
                reader.read_line(&mut line).map_err(|e| format!("answer to seq {n}: {e}"))?;
                if line.trim_end() != to.reply(&msg, local) {
                    return Err(format!("answer to seq {n}: {:.100}", line.trim_end()));
                }
                n += 1;
                counter.store(n, Ordering::Relaxed);
                // Paced, to leave the (few) CPUs to the agents starting meanwhile.
                std::thread::sleep(Duration::from_millis(5));
            }
            conn.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
            let mut rest = Vec::new();
            match reader.read_to_end(&mut rest) {
                Ok(0) => Ok(n),
                Ok(k) => Err(format!("{k} unexpected bytes before the close")),
                Err(e) => Err(format!("close: {e}")),
            }
        });
        Self { name: format!("tcp {src} -> {}", to.app()), done, handle: Some(handle) }
    }

    /// Datagrams from one socket in `ns` to `to`, each answered before the next is sent.
    fn udp(ns: &NetNs, src: Ipv4Addr, to: Pod, stop: &Arc<AtomicBool>) -> Self {
        let (done, stop) = (Arc::new(AtomicU64::new(0)), stop.clone());
        let counter = done.clone();
        let handle = ns.spawn(move || -> Result<u64, String> {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let local = v4(src, s.local_addr().unwrap().port());
            let mut buf = vec![0u8; 65_536];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("datagram {n}");
                s.send_to(msg.as_bytes(), to.app()).map_err(|e| format!("send of {n}: {e}"))?;
                let (k, from) = s.recv_from(&mut buf).map_err(|e| format!("answer to datagram {n}: {e}"))?;
                let reply = String::from_utf8_lossy(&buf[..k]);
                if from != SocketAddr::V4(to.app()) || reply != to.reply(&msg, local) {
                    return Err(format!("answer to datagram {n} from {from}: {reply:.100}"));
                }
                n += 1;
                counter.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(n)
        });
        Self { name: format!("udp {src} -> {}", to.app()), done, handle: Some(handle) }
    }

    /// The flow's result, when its thread has ended.
    fn failed(&mut self) -> Option<String> {
        if !self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            return None;
        }
        match self.handle.take().unwrap().join().unwrap() {
            Ok(n) => Some(format!("{} ended by itself after {n} exchanges", self.name)),
            Err(e) => Some(format!("{}: {e}", self.name)),
        }
    }
}

/// Waits until every flow has made two more exchanges; panics with the first failure.
fn progress(flows: &mut [Flow], when: &str) {
    let marks: Vec<u64> = flows.iter().map(|f| f.done.load(Ordering::Relaxed)).collect();
    let moved = poll(WAIT, || {
        for f in flows.iter_mut() {
            if let Some(e) = f.failed() {
                panic!("{when}: {e}");
            }
        }
        flows.iter().zip(&marks).all(|(f, m)| f.done.load(Ordering::Relaxed) >= m + 2).then_some(())
    });
    if moved.is_none() {
        let stuck: Vec<_> = flows.iter().zip(&marks).filter(|(f, m)| f.done.load(Ordering::Relaxed) < *m + 2).map(|(f, _)| &f.name).collect();
        panic!("{when}: no progress within {WAIT:?} on {stuck:?}");
    }
}

/// TCP connections both ways and UDP flows both ways exchange continuously while each node's
/// agent is stopped and started again, ten times (SIGTERM, and every other time SIGKILL, as a
/// crash or an OOM kill would): the datapath carries on while the agent is down and after it
/// is back, no exchange is lost or answered wrongly, no connection is reset, and each closes
/// cleanly at the end. One restart finds the pins of an older release (no `mn_tun_fast_v1`,
/// `mn_tun_cfgs_v1`, `mn_tun_pslots_v1` or `mn_tun_nslots_v1`), another one the per-peer
/// counters of builds before v2, which it unpins, another one pod port slots a crashed agent
/// could have left, another one node slots that say more than the routes, which it puts
/// right. An agent stopped cleanly leaves the node slots empty (an older agent started next
/// would not keep them), one killed leaves them. Each peer's counters only grow: every agent
/// finds its peer's counter slot again.
#[test]
fn no_flow_lost_across_ten_restarts_of_both_agents() {
    const RESTARTS: usize = 10;
    let (t, Agents { node1: mut agent1, node2: mut agent2 }) = setup(opts(Delivery::Stack));
    let stop = Arc::new(AtomicBool::new(false));
    let mut flows = vec![
        Flow::tcp(&t.client, CLIENT_IP, APP_A_POD, &stop),
        Flow::tcp(&t.client, CLIENT_IP, APP_B_POD, &stop),
        Flow::tcp(&t.client2, CLIENT2_IP, APP_A_POD, &stop),
        Flow::tcp(&t.app_a, APP_A, CLIENT, &stop),
        Flow::udp(&t.client, CLIENT_IP, APP_B_POD, &stop),
        Flow::udp(&t.app_b, APP_B, CLIENT2, &stop),
    ];
    progress(&mut flows, "at the start");
    for r in 0..RESTARTS {
        for side in [Side::Node1, Side::Node2] {
            let agent = if side == Side::Node1 { &mut agent1 } else { &mut agent2 };
            if r % 2 == 0 {
                assert!(agent.child.stop(), "{side:?}'s agent did not stop cleanly:\n{}", agent.child.output());
            } else {
                agent.child.signal(Signal::SIGKILL);
                // Dead once a zombie; the guard reaps it when replaced below.
                let stat = format!("/proc/{}/stat", agent.child.pid());
                let dead = poll(WAIT, || std::fs::read_to_string(&stat).ok().filter(|s| s.contains(") Z ")));
                assert!(dead.is_some(), "{side:?}'s agent outlived SIGKILL");
            }
            progress(&mut flows, &format!("with {side:?}'s agent stopped ({r})"));
            let decap = || -> Vec<String> {
                let routes = t.node(side).dump_json("tunnel")["tunnel"]["routes"].clone();
                routes.as_array().unwrap_or_else(|| panic!("{side:?}: no routes: {routes}")).iter().map(|r| r["decap"].as_str().unwrap_or("?").to_owned()).collect()
            };
            let left = if r % 2 == 0 { "trie" } else { "slot" };
            assert!(decap().iter().all(|d| d == left), "{side:?}, restart {r}: the nodes' slots after the agent stopped: {:?}", decap());
            let peer = if side == Side::Node1 { "cluster2" } else { "cluster1" };
            let sent = |what: &str| t.node(side).tunnel_peer(peer)["txPackets"].as_u64().unwrap_or_else(|| panic!("{side:?}, {what}: no txPackets"));
            let before = sent("before the restart");
            // Pins as an older agent left them, without the settings published for the
            // per-packet paths: the agent creates the map and fills it before it attaches.
            let pins = meshnet::pins::Pins::new(t.node(side).pin_path());
            let pin = pins.map(meshnet_common::names::TUN_FAST);
            let copy = pins.map(meshnet_common::names::TUN_CFG_SEQ);
            let port_slots = pins.map(meshnet_common::names::TUN_PORT_SLOTS);
            let node_slots = pins.map(meshnet_common::names::TUN_NODE_SLOTS);
            if r == 3 {
                for p in [&pin, &copy, &port_slots, &node_slots] {
                    std::fs::remove_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                }
            }
            let old_stats = pins.map(meshnet_common::names::TUN_STATS_V1);
            if r == 4 {
                meshnet_tests::raw_bpf::create_pinned(&old_stats, meshnet_tests::raw_bpf::PERCPU_HASH, 4, 32, 1024, 0);
            }
            if r == 5 {
                // Slots as a crashed agent could leave them: every pod's with another port
                // (this delivery goes through the stack and reads none). The agent must put
                // them right: the check of every pod's lookup below fails until it has.
                let mut slots: meshnet::tunnel::TunPortSlots = meshnet::maps::open(&pins, meshnet_common::names::TUN_PORT_SLOTS).unwrap();
                let held: Vec<_> = slots.iter().enumerate().filter_map(|(i, v)| Some((u32::try_from(i).ok()?, v.ok()?))).filter(|(_, v)| v.addr_be != 0).collect();
                assert!(!held.is_empty(), "{side:?}: no pod in its slot before restart {r}");
                for (i, v) in held {
                    let port = meshnet_common::PodPort { ifindex: v.port.ifindex + 1000, ..v.port };
                    slots.set(i, meshnet_common::SeqPodPort { seq: v.seq + 100, port, ..v }, 0).unwrap();
                }
            }
            // Node slots that say more than the routes: each node given a CIDR of addresses no
            // route holds, as a stale slot could. The agent must empty and refill them before
            // it attaches; a read after its start finds none.
            let forged = meshnet_common::LocalNet { addr_be: u32::from_ne_bytes([10, 99, 0, 0]), mask_be: u32::from_ne_bytes([255, 255, 0, 0]) };
            if r == 7 {
                let mut slots: meshnet::tunnel::TunNodeSlots = meshnet::maps::open(&pins, meshnet_common::names::TUN_NODE_SLOTS).unwrap();
                let held: Vec<_> = slots.iter().enumerate().filter_map(|(i, v)| Some((u32::try_from(i).ok()?, v.ok()?))).filter(|(_, v)| v.addr_be != 0).collect();
                assert!(!held.is_empty(), "{side:?}: no node in its slot before restart {r}");
                for (i, v) in held {
                    let mut nets = v.nets;
                    nets[meshnet_common::limits::MAX_NODE_CIDRS - 1] = forged;
                    slots.set(i, meshnet_common::SeqNodeSlot { seq: v.seq + 100, nets, ..v }, 0).unwrap();
                }
            }
            *agent = t.start_agent(side);
            let slots: meshnet::tunnel::TunNodeSlots = meshnet::maps::open(&pins, meshnet_common::names::TUN_NODE_SLOTS).unwrap();
            let stale = slots.iter().filter_map(Result::ok).filter(|v| v.nets.contains(&forged)).count();
            assert_eq!(stale, 0, "{side:?}, restart {r}: node slots still say what no route does");
            let slotted = poll(WAIT, || decap().iter().all(|d| d == "slot").then_some(()));
            assert!(slotted.is_some(), "{side:?}, restart {r}: nodes not in their slots: {:?}", decap());
            for p in [&pin, &copy, &port_slots, &node_slots] {
                assert!(p.exists(), "{side:?}: {} not pinned again", p.display());
            }
            let settings = t.node(side).dump_json("tunnel")["tunnel"]["settings"].clone();
            assert_eq!(settings["decapCopy"], "same", "{side:?}: the decapsulating program does not read these settings: {settings}");
            assert!(!old_stats.exists(), "{side:?}: {} still pinned", old_stats.display());
            // Every pod's port back in its slot, the slots' map new or kept.
            let ports = || t.node(side).dump_json("tunnel")["tunnel"]["podPorts"].clone();
            let slotted = poll(WAIT, || ports().as_array().filter(|p| !p.is_empty() && p.iter().all(|p| p["lookup"] == "slot")).map(|_| ()));
            assert!(slotted.is_some(), "{side:?}, restart {r}: pods not in their slots: {}", ports());
            progress(&mut flows, &format!("after {side:?}'s restart {r}"));
            let after = sent("after the restart");
            assert!(after > before, "{side:?}, restart {r}: {peer}'s packets went from {before} to {after}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for f in &mut flows {
        let n = f.handle.take().unwrap().join().unwrap().unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert!(n >= 4 * RESTARTS as u64 * 2, "{}: only {n} exchanges", f.name);
    }
    for node in [&t.node1, &t.node2] {
        let c = node.counters();
        for name in ["tunnel_encap_failed", "tunnel_decap_failed"] {
            assert_eq!(count(&c, name), 0, "{}: {name}", node.cluster);
        }
    }
}

/// The agents follow their config files: node2 switches from stack to redirect delivery
/// under a held connection, which carries on; node1 drops its tunnel peer and a new
/// connection to cluster2 fails as it does without meshnet; with the peer back, new
/// connections cross again and the held one still answers.
#[test]
fn reloads_switch_the_delivery_and_remove_and_restore_the_peer() {
    let (t, _agents) = setup(opts(Delivery::Stack));
    let held = t.client.run(|| TcpStream::connect_timeout(&APP_A_POD.app().into(), IO_TIMEOUT).unwrap());
    let local = held.local_addr().unwrap();
    let exchange = |msg: &str| {
        let reply = tcp_line(&held, msg).unwrap_or_else(|e| panic!("held connection, {msg}: {e}"));
        assert_eq!(reply, APP_A_POD.reply(msg, local));
    };
    exchange("through the stack");

    t.node2.write_config(&tunnel_config(Delivery::Redirect, Side::Node2));
    let switched = poll(WAIT, || (t.node2.dump_json("tunnel")["tunnel"]["settings"]["delivery"] == "redirect").then_some(()));
    assert!(switched.is_some(), "node2 never switched to redirect: {}", t.node2.dump_json("tunnel"));
    let forwarded = t.node2.forwarded_from_remote_pods();
    exchange("redirected");
    tcp_check(&t.client, CLIENT_IP, APP_B_POD, "a new flow, redirected");
    assert_eq!(t.node2.forwarded_from_remote_pods(), forwarded, "node2 still delivers through the stack");

    let routes = || t.node1.dump_json("tunnel")["tunnel"]["routes"].as_array().map_or(0, Vec::len);
    let config1 = t.config(Side::Node1);
    let without_peer = format!("{}peers: []\n", &config1[..config1.find("peers:").unwrap()]);
    t.node1.write_config(&without_peer);
    assert!(poll(WAIT, || (routes() == 0).then_some(())).is_some(), "cluster2's route stayed on node1");
    let err = t.client.run(|| tcp_request(APP_B_POD.app(), "no peer")).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)), "without the peer: {err}");

    t.node1.write_config(&config1);
    assert!(poll(WAIT, || (routes() == 1).then_some(())).is_some(), "cluster2's route never came back on node1");
    tcp_check(&t.client, CLIENT_IP, APP_B_POD, "the peer is back");
    exchange("the peer is back");
}

/// Whether any meshnet program is on `iface` in `ns`, by tcx or a netlink filter.
fn meshnet_on(ns: &NetNs, iface: &'static str) -> bool {
    use aya::programs::{SchedClassifier, TcAttachType};
    let tcx = ns.run(move || {
        [TcAttachType::Ingress, TcAttachType::Egress].into_iter().any(|d| {
            SchedClassifier::query_tcx(iface, d)
                .is_ok_and(|(_, ps)| ps.iter().any(|p| p.name_as_str().is_some_and(|n| n.starts_with("meshnet"))))
        })
    });
    let nl = ["ingress", "egress"]
        .iter()
        .any(|d| ns.exec(&format!("tc filter show dev {iface} {d} 2>/dev/null || true")).contains("meshnet"));
    tcx || nl
}

/// `meshnet detach` takes the tunnel off a node: no meshnet program stays on its uplink or
/// its pods' interfaces, its pins go, and its pods' packets to the other cluster are no
/// longer encapsulated (without a route they are unreachable, as before meshnet).
fn detach(opts: Options) {
    let (t, Agents { node1: mut agent1, node2: _agent2 }) = setup(opts);
    tcp_check(&t.client, CLIENT_IP, APP_A_POD, "before the detach");
    for iface in ["lan0", "vethc"] {
        assert!(meshnet_on(&t.node1.ns, iface), "no meshnet program on node1's {iface} before the detach");
    }
    assert!(agent1.child.stop());
    let out = t.node1.meshnet("detach");
    assert!(out.ok, "detach: {}{}", out.stdout, out.stderr);
    for iface in ["lan0", "vethc", "vethc2"] {
        assert!(!meshnet_on(&t.node1.ns, iface), "a meshnet program stayed on node1's {iface}");
    }
    let pins = t.node1.pin_path();
    assert!(!pins.exists() || std::fs::read_dir(&pins).unwrap().next().is_none(), "pins left in {}", pins.display());
    let err = t.client.run(|| tcp_request(APP_A_POD.app(), "after the detach")).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)), "after the detach: {err}");
}

#[test]
fn detach_takes_the_tunnel_off_the_node() {
    detach(opts(Delivery::Stack));
}

#[test]
fn detach_takes_the_tunnel_off_the_node_netlink() {
    detach(netlink(Delivery::Redirect));
}

// ---------------------------------------------------------------------------------------
// On the wire
// ---------------------------------------------------------------------------------------

/// Collects the frames of `iface` inside `ns`, both ways, from a packet socket on a thread of
/// its own until the returned flag is set. A packet socket sees a frame arriving before tc
/// ingress (so before decapsulation) and one leaving after tc egress.
fn capture(ns: &NetNs, iface: &'static str) -> (Arc<AtomicBool>, JoinHandle<Vec<Vec<u8>>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let s = stop.clone();
    let handle = ns.spawn(move || {
        let all = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
        let sock = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, Some(i32::from(all).into())).unwrap();
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no {iface}");
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        sa.sll_protocol = all;
        sa.sll_ifindex = i32::try_from(ifindex).unwrap();
        let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap();
        // SAFETY: bind with a sockaddr_ll and its length.
        let rc = unsafe { libc::bind(sock.as_raw_fd(), (&raw const sa).cast(), len) };
        assert_eq!(rc, 0, "bind to {iface}: {}", std::io::Error::last_os_error());
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        ready_tx.send(()).unwrap();
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while !s.load(Ordering::Relaxed) {
            if let Ok(n) = (&sock).read(&mut buf) {
                frames.push(buf[..n].to_vec());
            }
        }
        frames
    });
    ready_rx.recv().unwrap();
    (stop, handle)
}

/// Whether an IPv4 header's checksum is right.
fn ipv4_checksum_ok(h: &etherparse::Ipv4HeaderSlice) -> bool {
    let header = h.to_header();
    header.header_checksum == header.calc_header_checksum()
}

/// The tunnel's packets as node2's `lan0` sees them, both ways: outer IPv4 without options,
/// DF set, TTL 64, between the nodes' addresses, UDP to the tunnel port from a port in
/// 32768..61000 that depends on the inner flow only, checksum 0; meshnet's header (`MN`,
/// version 1, flags 0, the sending cluster's id); then the pod's IPv4 packet, its length 36
/// bytes less than the outer one's. Nothing else between the pods crosses the LAN.
#[test]
fn the_wire_format_on_the_lan() {
    const FLOWS: u16 = 8;
    let (t, _agents) = setup(opts(Delivery::Stack));
    let (stop, frames) = capture(&t.node2.ns, "lan0");
    for i in 0..FLOWS {
        tcp_check(&t.client, CLIENT_IP, APP_A_POD, &format!("wire {i}"));
        udp_check(&t.app_a, APP_A, CLIENT, &format!("wire {i}"));
    }
    stop.store(true, Ordering::Relaxed);
    let frames = frames.join().unwrap();

    let cluster_of = |ip: Ipv4Addr| match ip.to_string() {
        a if a == NODE1_LAN => Some("cluster1"),
        a if a == NODE2_LAN => Some("cluster2"),
        _ => None,
    };
    let pods = [CLIENT_IP, APP_A];
    // Inner flow (addresses, protocol, ports) -> outer source ports seen.
    let mut sports: std::collections::BTreeMap<Vec<u8>, std::collections::BTreeSet<u16>> = std::collections::BTreeMap::new();
    let mut tunnelled = [0usize; 2];
    for f in &frames {
        if f.len() < 14 || f[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &f[14..];
        let outer = etherparse::Ipv4HeaderSlice::from_slice(ip).unwrap_or_else(|e| panic!("{e}: {ip:02x?}"));
        let (src, dst) = (outer.source_addr(), outer.destination_addr());
        assert!(!pods.contains(&src) && !pods.contains(&dst), "a pod's packet crossed the LAN unencapsulated: {src} -> {dst}");
        let (Some(sender), Some(_)) = (cluster_of(src), cluster_of(dst)) else { continue };
        let what = format!("{src} -> {dst}: {:02x?}", &ip[..ip.len().min(64)]);
        assert_eq!(outer.protocol(), etherparse::IpNumber::UDP, "only the tunnel between the nodes: {what}");
        assert_eq!(outer.ihl(), 5, "outer options: {what}");
        assert!(outer.dont_fragment(), "outer DF: {what}");
        assert!(!outer.more_fragments() && outer.fragments_offset().value() == 0, "outer fragment: {what}");
        assert_eq!(outer.ttl(), 64, "outer TTL: {what}");
        assert!(ipv4_checksum_ok(&outer), "outer IPv4 checksum: {what}");
        let total = usize::from(outer.total_len());
        assert!(total <= ip.len(), "outer length {total} past the frame: {what}");
        let ip = &ip[..total];
        let udp = etherparse::UdpHeaderSlice::from_slice(&ip[20..]).unwrap();
        assert_eq!(udp.destination_port(), TUNNEL_PORT, "{what}");
        assert!((32_768..61_000).contains(&udp.source_port()), "outer source port {}: {what}", udp.source_port());
        assert_eq!(udp.checksum(), 0, "outer UDP checksum: {what}");
        assert_eq!(usize::from(udp.length()), total - 20, "outer UDP length: {what}");
        assert_eq!(&ip[28..32], &[b'M', b'N', 1, 0], "meshnet header: {what}");
        assert_eq!(ip[32..36], peer_id(sender).to_be_bytes(), "cluster id of {sender}: {what}");
        let inner = etherparse::Ipv4HeaderSlice::from_slice(&ip[36..]).unwrap_or_else(|e| panic!("inner: {e}: {what}"));
        assert_eq!(usize::from(inner.total_len()) + 36, total, "inner length: {what}");
        assert!(ipv4_checksum_ok(&inner), "inner IPv4 checksum: {what}");
        let want = if sender == "cluster1" { (CLIENT_IP, APP_A) } else { (APP_A, CLIENT_IP) };
        assert_eq!((inner.source_addr(), inner.destination_addr()), want, "inner addresses: {what}");
        let l4 = 36 + usize::from(inner.ihl()) * 4;
        let mut flow = ip[36 + 9..36 + 20].to_vec(); // protocol, checksum, addresses
        flow.drain(1..3);
        flow.extend_from_slice(&ip[l4..l4 + 4]);
        sports.entry(flow).or_default().insert(udp.source_port());
        tunnelled[usize::from(sender == "cluster2")] += 1;
    }
    // Each way: SYN, ACK, request, FIN and ACK at least per TCP connection, one datagram
    // per UDP exchange.
    let each_way = 4 * usize::from(FLOWS);
    assert!(tunnelled.iter().all(|n| *n >= each_way), "tunnel packets each way: {tunnelled:?} of {} frames", frames.len());
    for (flow, ports) in &sports {
        assert_eq!(ports.len(), 1, "one inner flow {flow:02x?} left from several outer ports {ports:?}");
    }
    let distinct: std::collections::BTreeSet<u16> = sports.values().flatten().copied().collect();
    assert!(distinct.len() > 1, "{} inner flows all left from outer port {distinct:?}", sports.len());
}

// ---------------------------------------------------------------------------------------
// What the tunnel port refuses
// ---------------------------------------------------------------------------------------

/// The source port of crafted inner packets, where the client pod listens for the answer.
const CRAFTED_PORT: u16 = 40_000;
/// Each refused case is sent this many times: its counter must rise by exactly that.
const CRAFTED_TIMES: u64 = 3;
const DROP_COUNTERS: [&str; 5] =
    ["tunnel_unknown_node", "tunnel_bad_header", "tunnel_wrong_cluster", "tunnel_spoofed_source", "tunnel_not_local"];

/// meshnet's tunnel header.
fn tunnel_header(magic: u16, version: u8, cluster: u32) -> Vec<u8> {
    [&magic.to_be_bytes()[..], &[version, 0], &cluster.to_be_bytes()].concat()
}


/// One crafted datagram from node1 to node2's tunnel port: its outer source and options,
/// meshnet's header, and an inner IPv4/UDP packet to `APP_PORT` with valid checksums.
#[derive(Clone, Copy, Debug)]
struct Craft {
    what: &'static str,
    /// node2's counter that must count it.
    counter: &'static str,
    from: Ipv4Addr,
    /// Outer IP options: three NOPs and an end.
    options: bool,
    /// Outer DF off and a 3,000-byte payload: the kernel fragments it on the LAN.
    fragment: bool,
    magic: u16,
    version: u8,
    cluster: u32,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// Bytes appended after the inner packet (positive) or cut from its end (negative).
    tail: i32,
}

impl Craft {
    /// Well formed: from node1, cluster1's header, client to app-a.
    fn well_formed() -> Self {
        Self {
            what: "well formed",
            counter: "tunnel_decap",
            from: NODE1_LAN.parse().unwrap(),
            options: false,
            fragment: false,
            magic: 0x4d4e,
            version: 1,
            cluster: peer_id("cluster1"),
            src: CLIENT_IP,
            dst: APP_A,
            tail: 0,
        }
    }

    fn datagram(&self, payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(self.src.octets(), self.dst.octets(), 64).udp(CRAFTED_PORT, APP_PORT);
        let mut d = tunnel_header(self.magic, self.version, self.cluster);
        b.write(&mut d, payload).unwrap();
        match usize::try_from(self.tail) {
            Ok(n) => d.extend(std::iter::repeat_n(0u8, n)),
            Err(_) => d.truncate(d.len() - usize::try_from(self.tail.unsigned_abs()).unwrap()),
        }
        d
    }

    /// Sends it `times` times, each inner payload naming it and its number, with a zero
    /// outer UDP checksum as the tunnel's own packets have; returns the payloads.
    fn send(self, t: &TunnelTopology, times: u64) -> Vec<Vec<u8>> {
        let payloads: Vec<Vec<u8>> = (0..times)
            .map(|i| {
                let mut p = format!("crafted {} #{i}", self.what).into_bytes();
                if self.fragment {
                    p.resize(3000, b'.');
                }
                p
            })
            .collect();
        let datagrams: Vec<Vec<u8>> = payloads.iter().map(|p| self.datagram(p)).collect();
        t.node1.ns.run(move || {
            let s = UdpSocket::bind((self.from, 0)).unwrap_or_else(|e| panic!("bind {}: {e}", self.from));
            let fd = s.as_raw_fd();
            let set = |level: i32, name: i32, value: &[u8]| {
                // SAFETY: setsockopt on a socket this closure owns, with a live buffer and its length.
                let rc = unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), u32::try_from(value.len()).unwrap()) };
                assert_eq!(rc, 0, "setsockopt {level}/{name}: {}", std::io::Error::last_os_error());
            };
            set(libc::SOL_SOCKET, libc::SO_NO_CHECK, &1i32.to_ne_bytes());
            if self.options {
                set(libc::IPPROTO_IP, libc::IP_OPTIONS, &[1, 1, 1, 0]);
            }
            if self.fragment {
                set(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, &libc::IP_PMTUDISC_DONT.to_ne_bytes());
            }
            for d in datagrams {
                s.send_to(&d, (NODE2_LAN, TUNNEL_PORT)).unwrap();
            }
        });
        payloads
    }
}

/// Crafted datagrams to node2's tunnel port, each refused for one reason: its counter rises
/// by exactly what was sent, nothing is decapsulated and app-a sees none. Then a well-formed
/// one, crafted the same way, is delivered and answered through the tunnel: the refusals are
/// the checks' doing, not the crafting's.
fn foreign_and_spoofed(opts: Options) {
    let (t, _agents) = setup(opts);
    t.node1.ns.ip("addr add 192.0.2.99/24 dev lan0");
    let answers = t.client.run(|| UdpSocket::bind((CLIENT_IP, CRAFTED_PORT)).unwrap());
    answers.set_read_timeout(Some(IO_TIMEOUT)).unwrap();

    let ok = Craft::well_formed();
    let refused = [
        Craft { what: "from an unknown node", counter: "tunnel_unknown_node", from: Ipv4Addr::new(192, 0, 2, 99), ..ok },
        Craft { what: "with a bad magic", counter: "tunnel_bad_header", magic: 0x5858, ..ok },
        Craft { what: "of version 2", counter: "tunnel_bad_header", version: 2, ..ok },
        Craft { what: "with bytes after the inner packet", counter: "tunnel_bad_header", tail: 4, ..ok },
        Craft { what: "with the inner packet cut short", counter: "tunnel_bad_header", tail: -4, ..ok },
        Craft { what: "with outer IP options", counter: "tunnel_bad_header", options: true, ..ok },
        Craft { what: "naming cluster3", counter: "tunnel_wrong_cluster", cluster: peer_id("cluster3"), ..ok },
        Craft { what: "naming cluster2, the receiver", counter: "tunnel_wrong_cluster", cluster: peer_id("cluster2"), ..ok },
        Craft { what: "from 10.99.0.1", counter: "tunnel_spoofed_source", src: Ipv4Addr::new(10, 99, 0, 1), ..ok },
        Craft { what: "from app-b, a pod of cluster2", counter: "tunnel_spoofed_source", src: APP_B, ..ok },
        Craft {
            what: "from cluster1's CIDR outside node1's pods",
            counter: "tunnel_spoofed_source",
            src: Ipv4Addr::new(10, 244, 1, 5),
            ..ok
        },
        Craft { what: "to node2's own address", counter: "tunnel_not_local", dst: NODE2_LAN.parse().unwrap(), ..ok },
        Craft { what: "to node2's bridge, in its pod CIDR", counter: "tunnel_not_local", dst: Ipv4Addr::new(10, 245, 0, 1), ..ok },
        Craft { what: "to node2's pod CIDR's broadcast", counter: "tunnel_not_local", dst: Ipv4Addr::new(10, 245, 0, 255), ..ok },
        Craft { what: "to cluster2's CIDR outside node2's pods", counter: "tunnel_not_local", dst: Ipv4Addr::new(10, 245, 1, 5), ..ok },
    ];
    let before = t.node2.counters();
    let payloads: Vec<Vec<u8>> = refused.iter().flat_map(|c| c.send(&t, CRAFTED_TIMES)).collect();
    let want = |name: &str| count(&before, name) + CRAFTED_TIMES * refused.iter().filter(|c| c.counter == name).count() as u64;
    let counted = poll(WAIT, || {
        let c = t.node2.counters();
        DROP_COUNTERS.iter().all(|n| count(&c, n) >= want(n)).then_some(())
    });
    let after = t.node2.counters();
    let show = |c: &serde_json::Map<String, serde_json::Value>| {
        let rise = |n: &str| format!("{n} +{} (want +{})", count(c, n) - count(&before, n), want(n) - count(&before, n));
        DROP_COUNTERS.iter().chain(&["tunnel_decap"]).map(|n| rise(n)).collect::<Vec<_>>()
    };
    assert!(counted.is_some(), "node2 never counted every refused datagram: {:?}", show(&after));
    for n in DROP_COUNTERS {
        assert_eq!(count(&after, n), want(n), "{n} rose by another number than was sent: {:?}", show(&after));
    }
    assert_eq!(count(&after, "tunnel_decap"), count(&before, "tunnel_decap"), "a refused datagram was decapsulated");

    let good = ok.send(&t, 1).pop().unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, from) = answers.recv_from(&mut buf).expect("no answer to the well-formed datagram");
    assert_eq!(from, SocketAddr::V4(APP_A_POD.app()));
    let good_text = String::from_utf8(good.clone()).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]), APP_A_POD.reply(&good_text, v4(CLIENT_IP, CRAFTED_PORT)));
    assert_eq!(t.node2.counter("tunnel_decap"), count(&before, "tunnel_decap") + 1);
    // app-a has answered the well-formed datagram, sent after every refused one.
    let seen = t.server(APP_A_POD).seen.lock().unwrap().clone();
    assert_eq!(seen, [(v4(CLIENT_IP, CRAFTED_PORT), good)], "app-a received refused datagrams");
    assert!(payloads.iter().all(|p| !t.server(APP_A_POD).saw(p)));

    // Fragmented on the LAN, a tunnel packet is refused: its first fragment as a bad header
    // (the rest carry no UDP header to tell the tunnel port by), and no part reaches app-a.
    let fragmented = Craft { what: "fragmented on the LAN", counter: "tunnel_bad_header", fragment: true, ..ok };
    let before = t.node2.counters();
    let payloads = fragmented.send(&t, CRAFTED_TIMES);
    let bad = |c: &serde_json::Map<String, serde_json::Value>| count(c, "tunnel_bad_header") - count(&before, "tunnel_bad_header");
    let counted = poll(WAIT, || (bad(&t.node2.counters()) >= CRAFTED_TIMES).then_some(()));
    let after = t.node2.counters();
    assert!(counted.is_some(), "the fragmented datagrams were not refused: bad headers +{}", bad(&after));
    assert!(bad(&after) <= 2 * CRAFTED_TIMES, "more bad headers than fragments: +{}", bad(&after));
    assert_eq!(count(&after, "tunnel_decap"), count(&before, "tunnel_decap"), "a fragment was decapsulated");
    assert!(payloads.iter().all(|p| !t.server(APP_A_POD).saw(&p[..20])), "app-a received a fragmented tunnel packet");

    // Well-formed tunnel packets in frames sent raw on node1's `lan0`: to the broadcast address,
    // each dropped, and to another host's MAC (what a switch floods, or an uplink in promiscuous
    // mode sees), handed to the stack, which drops them, all counted as other hosts'; then one
    // to node2's own MAC, delivered and answered, so that the drops are the MAC's doing. With
    // redirect delivery, the frames to another host's MAC would reach app-a if the program
    // redirected them.
    let (node1_mac, node2_mac) = (mac_of(&t.node1.ns, "lan0"), mac_of(&t.node2.ns, "lan0"));
    let frames = |what: &'static str, dst: [u8; 6], times: u64| {
        let payloads: Vec<Vec<u8>> = (0..times).map(|i| format!("raw frame {what} #{i}").into_bytes()).collect();
        let frames: Vec<Vec<u8>> = payloads
            .iter()
            .map(|p| {
                let mut f = Vec::new();
                etherparse::PacketBuilder::ethernet2(node1_mac, dst)
                    .ipv4(NODE1_LAN.parse::<Ipv4Addr>().unwrap().octets(), NODE2_LAN.parse::<Ipv4Addr>().unwrap().octets(), 64)
                    .udp(40_000, TUNNEL_PORT)
                    .write(&mut f, &ok.datagram(p))
                    .unwrap();
                f
            })
            .collect();
        (payloads, frames)
    };
    let before = t.node2.counters();
    let (mut payloads, mut raw) = frames("to another host", [0x02, 0, 0, 0, 0x99, 0x99], CRAFTED_TIMES);
    let (p, f) = frames("to everyone", [0xff; 6], CRAFTED_TIMES);
    payloads.extend(p);
    raw.extend(f);
    send_raw(&t.node1.ns, "lan0", raw);
    let not_ours = |c: &serde_json::Map<String, serde_json::Value>| count(c, "tunnel_not_for_node") - count(&before, "tunnel_not_for_node");
    let counted = poll(WAIT, || (not_ours(&t.node2.counters()) >= 2 * CRAFTED_TIMES).then_some(()));
    assert!(counted.is_some(), "the frames for other hosts were not counted: tunnel_not_for_node +{}", not_ours(&t.node2.counters()));
    // Sent after the others on the same link, its answer comes after app-a has seen whatever
    // of them reached it.
    let (mine, raw) = frames("to node2", node2_mac, 1);
    send_raw(&t.node1.ns, "lan0", raw);
    let (n, _) = answers.recv_from(&mut buf).expect("no answer to the frame addressed to node2");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), APP_A_POD.reply(&String::from_utf8(mine[0].clone()).unwrap(), v4(CLIENT_IP, CRAFTED_PORT)));
    assert!(payloads.iter().all(|p| !t.server(APP_A_POD).saw(p)), "app-a received a frame addressed to another host");
    let after = t.node2.counters();
    assert_eq!(not_ours(&after), 2 * CRAFTED_TIMES, "only the frames for other hosts are counted as such");
    assert_eq!(count(&after, "tunnel_decap") - count(&before, "tunnel_decap"), 1, "only the frame to node2 was delivered");
}

/// A datagram to the tunnel port that node2 routes on to one of its pods (every node is a
/// router for its pods; on a routed pod network the LAN sends them there) is no tunnel
/// packet of node2's: the pod's own socket on that port gets it untouched, and no counter of
/// node2's moves. The same datagram to node2 itself is refused, so it is the destination
/// that makes the difference, and so is one that node2 would route on to a peer's node.
fn routed_on(opts: Options) {
    let (t, _agents) = setup(opts);
    let sock = t.app_a.run(|| UdpSocket::bind((APP_A, TUNNEL_PORT)).unwrap());
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (node1_mac, node2_mac) = (mac_of(&t.node1.ns, "lan0"), mac_of(&t.node2.ns, "lan0"));
    // From a cluster1 pod's address, which node2's FORWARD admits from the LAN.
    let frame = |dst: Ipv4Addr, payload: &[u8]| {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(node1_mac, node2_mac)
            .ipv4(CLIENT_IP.octets(), dst.octets(), 64)
            .udp(40_000, TUNNEL_PORT)
            .write(&mut f, payload)
            .unwrap();
        f
    };
    let before = t.node2.counters();
    let payloads: Vec<Vec<u8>> = (0..CRAFTED_TIMES).map(|i| format!("routed through node2 #{i}").into_bytes()).collect();
    send_raw(&t.node1.ns, "lan0", payloads.iter().map(|p| frame(APP_A, p)).collect());
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    while got.len() < payloads.len() {
        let (n, from) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("app-a got {} of {} datagrams routed through node2: {e}", got.len(), payloads.len()));
        assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(CLIENT_IP, 40_000)), "the source is left as it was sent");
        got.push(buf[..n].to_vec());
    }
    got.sort();
    let mut want = payloads.clone();
    want.sort();
    assert_eq!(got, want, "app-a must get each datagram as it was sent");
    let after = t.node2.counters();
    for n in DROP_COUNTERS.iter().chain(&["tunnel_not_for_node", "tunnel_port_changing", "tunnel_decap"]) {
        assert_eq!(count(&after, n), count(&before, n), "{n} moved for datagrams node2 routes on");
    }

    // The same datagram to node2 itself, and through node2 to node1, a node of node2's tunnel
    // peer (a forgery in cluster2's name there), is refused.
    for (to, dst) in [("node2 itself", NODE2_LAN), ("node1, a peer's node, through node2", NODE1_LAN)] {
        let before = t.node2.counter("tunnel_unknown_node");
        send_raw(&t.node1.ns, "lan0", vec![frame(dst.parse().unwrap(), format!("to {to}").as_bytes())]);
        let refused = poll(WAIT, || (t.node2.counter("tunnel_unknown_node") > before).then_some(()));
        assert!(refused.is_some(), "the same datagram to {to} was not refused as from an unknown node");
    }
}

#[test]
fn a_datagram_routed_on_through_a_node_to_the_tunnel_port_passes_redirect() {
    routed_on(opts(Delivery::Redirect));
}

#[test]
fn a_datagram_routed_on_through_a_node_to_the_tunnel_port_passes_netlink() {
    routed_on(netlink(Delivery::Stack));
}

/// UDP GRO on the receiving uplink never merges tunnel packets, which would put one outer
/// header over several and have them refused: meshnet sends them with a UDP checksum of 0,
/// and the kernel's UDP GRO takes only datagrams that have one, forwarding
/// (`rx-udp-gro-forwarding`) and by frag list (`rx-gro-list`) alike. With each feature on
/// node2's uplink, GRO running there (a veth's NAPI queue) and node1 sending wire-sized
/// packets (no TSO), 1 MB crosses both ways with no packet refused.
#[test]
fn udp_gro_on_the_uplink_never_merges_tunnel_packets() {
    // A veth queues its packets for NAPI, where GRO runs, when GRO is turned on while it is up.
    if !meshnet_tests::kernel_at_least(5, 13) {
        meshnet_tests::skip("GRO on a veth without XDP (kernel >= 5.13)");
        return;
    }
    let (t, _agents) = setup(opts(Delivery::Redirect));
    t.node1.ns.exec("ethtool -K lan0 tso off gso off");
    let napi_packets = || {
        let stats = t.node2.ns.exec("ethtool -S lan0");
        let line = stats.lines().find(|l| l.trim().starts_with("rx_queue_0_xdp_packets:")).unwrap_or_else(|| panic!("no NAPI queue counter:\n{stats}"));
        line.split(':').nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    for feature in ["rx-udp-gro-forwarding", "rx-gro-list"] {
        t.node2.ns.exec(&format!("ethtool -K lan0 gro off && ethtool -K lan0 gro on {feature} on"));
        let (before, napi_before) = (t.node2.counters(), napi_packets());
        for (ns, to, seed) in [(&t.client, APP_A_POD, 1), (&t.app_a, CLIENT, 2)] {
            let data = Arc::new(pattern(1 << 20, seed));
            let d = data.clone();
            let (back, _) = ns.run(move || bulk_echo(to.bulk(), d)).unwrap_or_else(|e| panic!("{feature}: 1 MB to {}: {e}", to.bulk()));
            assert!(back == *data, "{feature}: the 1 MB echo from {} did not come back whole", to.name);
        }
        let after = t.node2.counters();
        let through_gro = napi_packets() - napi_before;
        assert!(through_gro >= 1_000, "{feature}: only {through_gro} packets went through node2's GRO");
        for n in DROP_COUNTERS {
            assert_eq!(count(&after, n), count(&before, n), "{feature}: {n} rose: tunnel packets were merged");
        }
        let decap = count(&after, "tunnel_decap") - count(&before, "tunnel_decap");
        assert!(decap + 10 >= through_gro, "{feature}: {through_gro} packets through GRO, {decap} decapsulated: some were merged");
        t.node2.ns.exec(&format!("ethtool -K lan0 {feature} off"));
    }
}

/// The MAC address of `iface` in `ns`.
fn mac_of(ns: &NetNs, iface: &str) -> [u8; 6] {
    let text = ns.exec(&format!("cat /sys/class/net/{iface}/address"));
    let bytes: Vec<u8> = text.trim().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    bytes.try_into().unwrap_or_else(|b| panic!("{iface}: MAC {b:?}"))
}

/// Sends whole Ethernet `frames` out of `iface` in `ns` from a packet socket.
fn send_raw(ns: &NetNs, iface: &'static str, frames: Vec<Vec<u8>>) {
    ns.run(move || {
        let sock = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, None).unwrap();
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no {iface}");
        for f in frames {
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
            sa.sll_ifindex = i32::try_from(ifindex).unwrap();
            sa.sll_halen = 6;
            sa.sll_addr[..6].copy_from_slice(&f[..6]);
            let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap();
            // SAFETY: sendto with a live buffer, its length, and a sockaddr_ll with its length.
            let n = unsafe { libc::sendto(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0, (&raw const sa).cast(), len) };
            assert_eq!(usize::try_from(n).ok(), Some(f.len()), "sendto on {iface}: {}", std::io::Error::last_os_error());
        }
    });
}

/// A pod's own datagram to a peer node's tunnel port, with meshnet's header and a packet in
/// the name of another pod inside. Masqueraded to node1's address, as CNIs do with traffic
/// leaving the pod network, it would come from a node node2 knows and be delivered: node1's
/// `from_pod` drops it (`tunnel_forged`). The same datagram from node1 itself is delivered,
/// which is why operations.md has the node's netfilter drop the rest ("Senders"); with those
/// rules on both nodes, the tunnel still carries everything, since its own packets never
/// cross netfilter.
fn a_pods_own_datagram(opts: Options) {
    let (t, _agents) = setup(opts);
    t.node1.ns.exec("iptables -t nat -A POSTROUTING -s 10.244.0.0/16 -o lan0 -j MASQUERADE");
    let forged = Craft { what: "from the client pod, as 10.244.0.99", src: Ipv4Addr::new(10, 244, 0, 99), ..Craft::well_formed() };
    let payloads: Vec<Vec<u8>> = (0..CRAFTED_TIMES).map(|i| format!("forged #{i}").into_bytes()).collect();
    let datagrams: Vec<Vec<u8>> = payloads.iter().map(|p| forged.datagram(p)).collect();
    let (before1, before2) = (t.node1.counters(), t.node2.counters());
    let sent = datagrams.clone();
    t.client.run(move || {
        let s = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
        for d in sent {
            s.send_to(&d, (NODE2_LAN, TUNNEL_PORT)).unwrap();
        }
    });
    let forged_count = |c: &serde_json::Map<String, serde_json::Value>| count(c, "tunnel_forged") - count(&before1, "tunnel_forged");
    let counted = poll(WAIT, || (forged_count(&t.node1.counters()) >= CRAFTED_TIMES).then_some(()));
    assert!(counted.is_some(), "node1 did not count the pod's datagrams as forged: +{}", forged_count(&t.node1.counters()));
    // Dropped on the pod's interface: nothing of them can still be on its way.
    assert_eq!(forged_count(&t.node1.counters()), CRAFTED_TIMES);
    assert_eq!(t.node2.counter("tunnel_decap"), count(&before2, "tunnel_decap"), "node2 decapsulated a pod's own datagram");
    assert!(payloads.iter().all(|p| !t.server(APP_A_POD).saw(p)), "app-a received a forged packet");

    // The same datagram from node1's own address passes node2's checks: only the sender's
    // side can tell it from tunnel traffic.
    let from_node = forged.send(&t, 1).pop().unwrap();
    assert!(poll(WAIT, || t.server(APP_A_POD).saw(&from_node).then_some(())).is_some(), "the datagram itself is not one node2 takes");

    for node in [&t.node1, &t.node2] {
        node.ns.exec(&format!("iptables -I FORWARD 1 -p udp --dport {TUNNEL_PORT} -j DROP"));
        node.ns.exec(&format!("iptables -I OUTPUT 1 -p udp --dport {TUNNEL_PORT} -j DROP"));
    }
    let refused = t.node1.ns.run(move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.send_to(b"x", (NODE2_LAN, TUNNEL_PORT)).is_err()
    });
    assert!(refused, "node1's OUTPUT rule let a host process send to the tunnel port");
    tcp_check(&t.client, CLIENT_IP, APP_A_POD, "through the tunnel past the rules");
    tcp_check(&t.app_a, APP_A, CLIENT, "back through the tunnel past the rules");
    udp_check(&t.client, CLIENT_IP, APP_B_POD, "a datagram past the rules");
    udp_check(&t.app_b, APP_B, CLIENT, "a datagram back past the rules");
}

#[test]
fn a_pods_own_datagram_to_the_tunnel_port_never_reaches_the_peer_redirect() {
    a_pods_own_datagram(opts(Delivery::Redirect));
}

#[test]
fn a_pods_own_datagram_to_the_tunnel_port_never_reaches_the_peer_fib_lookup_stack() {
    a_pods_own_datagram(fib_lookup(Delivery::Stack));
}

#[test]
fn foreign_and_spoofed_tunnel_packets_are_dropped_and_counted_stack() {
    foreign_and_spoofed(opts(Delivery::Stack));
}

#[test]
fn foreign_and_spoofed_tunnel_packets_are_dropped_and_counted_redirect() {
    foreign_and_spoofed(opts(Delivery::Redirect));
}

#[test]
fn foreign_and_spoofed_tunnel_packets_are_dropped_and_counted_netlink() {
    foreign_and_spoofed(netlink(Delivery::Redirect));
}

// ---------------------------------------------------------------------------------------
// MTU: pods and LAN at 1,500
// ---------------------------------------------------------------------------------------

/// `IP_MTU` of a connected socket: its path MTU.
fn ip_mtu(s: &UdpSocket) -> u32 {
    let mut v: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap();
    // SAFETY: getsockopt into a c_int with its length.
    let rc = unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU, (&raw mut v).cast(), &raw mut len) };
    assert_eq!(rc, 0, "IP_MTU: {}", std::io::Error::last_os_error());
    u32::try_from(v).unwrap()
}

/// A payload of `len` bytes that the pod servers answer with a summary, so that the answer
/// is small whatever the path MTU.
fn summary_request(len: usize) -> Vec<u8> {
    let mut p = format!("?{len} bytes").into_bytes();
    p.resize(len, b'.');
    p
}

/// From `ns` (pod address `src`), a connected UDP socket with `IP_PMTUDISC_DO` sends a
/// 1,472-byte payload to `to`: a 1,500-byte packet with DF, too large for the tunnel. `node`
/// answers "fragmentation needed" with the tunnel's MTU, the socket's path MTU drops to
/// 1,464, and a 1,436-byte payload, which fits, gets through and is answered.
fn path_mtu_discovery(ns: &NetNs, src: Ipv4Addr, to: Pod, node: &Node) {
    let before = node.counter("tunnel_frag_needed");
    let s = ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(to.app()).unwrap();
        let v = libc::IP_PMTUDISC_DO;
        let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap();
        // SAFETY: setsockopt with a c_int and its length.
        let rc = unsafe { libc::setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, (&raw const v).cast(), len) };
        assert_eq!(rc, 0, "IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    });
    assert_eq!(ip_mtu(&s), MTU, "the path MTU from {src} to {} before", to.app());
    let too_big = summary_request(1472);
    // Sent again while the MTU has not dropped: once it has, the kernel refuses it locally.
    let lowered = poll(WAIT, || {
        let _ = s.send(&too_big);
        (ip_mtu(&s) == MTU - OVERHEAD).then_some(())
    });
    assert!(lowered.is_some(), "the path MTU from {src} to {} stayed {}", to.app(), ip_mtu(&s));
    assert!(node.counter("tunnel_frag_needed") > before, "{}: frag_needed not counted", node.cluster);
    // The ICMP error left EMSGSIZE pending on the socket; it would fail the next receive.
    let _ = s.take_error();
    let fits = summary_request(1436);
    s.send(&fits).unwrap_or_else(|e| panic!("a 1,436-byte payload from {src}: {e}"));
    let mut buf = vec![0u8; 65_536];
    let n = s.recv(&mut buf).unwrap_or_else(|e| panic!("no answer to the 1,436-byte payload from {src} to {}: {e}", to.app()));
    assert_eq!(String::from_utf8_lossy(&buf[..n]), to.summary(&fits, s.local_addr().unwrap()));
}

/// A UDP datagram sent without DF (`IP_PMTUDISC_DONT`, as some DNS servers send) that fits
/// the pod's MTU but not the tunnel's, with its checksum left to the device (checksum
/// offload, a veth's default): split in two for the tunnel, it must still carry the checksum
/// of the whole datagram. node1's uplink computes checksums in software (`tx off`), as a NIC
/// without checksum offload for tunnels does: a checksum over the first fragment alone
/// would reach app-a, which verifies it on reassembly and drops the datagram.
fn split_datagram_keeps_its_checksum(opts: Options) {
    let (t, _agents) = setup(opts);
    t.node1.ns.exec("ethtool -K lan0 tx off >/dev/null");
    let before = t.node1.counter("tunnel_fragmented");
    let req = summary_request(1472);
    let r = req.clone();
    let answered = t.client.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let v = libc::IP_PMTUDISC_DONT;
        let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap();
        // SAFETY: setsockopt with a c_int and its length.
        let rc = unsafe { libc::setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, (&raw const v).cast(), len) };
        assert_eq!(rc, 0, "IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = vec![0u8; 65_536];
        // Sent again until answered: one datagram may be lost for other reasons.
        poll(WAIT, || {
            s.send_to(&r, APP_A_POD.app()).unwrap();
            let (n, _) = s.recv_from(&mut buf).ok()?;
            Some((String::from_utf8_lossy(&buf[..n]).into_owned(), s.local_addr().unwrap().port()))
        })
    });
    let (reply, port) = answered.expect("app-a never answered the split datagram: its checksum covered part of it");
    assert_eq!(reply, APP_A_POD.summary(&req, v4(CLIENT_IP, port)));
    assert!(t.node1.counter("tunnel_fragmented") > before, "the datagram was not split for the tunnel");
}

#[test]
fn a_split_datagram_keeps_its_checksum_redirect() {
    split_datagram_keeps_its_checksum(opts(Delivery::Redirect));
}

#[test]
fn a_split_datagram_keeps_its_checksum_fib_lookup_stack() {
    split_datagram_keeps_its_checksum(fib_lookup(Delivery::Stack));
}

fn mtu(opts: Options) {
    let (t, _agents) = setup(opts);
    for ns in [&t.node1.ns, &t.node2.ns] {
        assert!(ns.ip("link show lan0").contains(&format!("mtu {MTU} ")));
    }
    let before = (t.node1.counters(), t.node2.counters());
    let received = |ns: &NetNs| -> (u64, u64) {
        let read = |f: &str| ns.exec(&format!("cat /sys/class/net/eth0/statistics/{f}")).trim().parse::<u64>().unwrap();
        (read("rx_bytes"), read("rx_packets"))
    };
    let pods_before = [received(&t.client), received(&t.app_a)];

    // 1 MB each way, echoed byte for byte. Each SYN and SYN-ACK had its MSS clamped by the
    // node that sent it through the tunnel, so no segment needed fragmenting.
    for (ns, to, seed) in [(&t.client, APP_A_POD, 1), (&t.app_a, CLIENT, 2)] {
        let data = Arc::new(pattern(1 << 20, seed));
        let d = data.clone();
        let (back, mss) = ns.run(move || bulk_echo(to.bulk(), d)).unwrap_or_else(|e| panic!("1 MB to {}: {e}", to.bulk()));
        assert_eq!(back.len(), data.len(), "the 1 MB echo from {} came back short", to.name);
        if let Some(i) = back.iter().zip(data.iter()).position(|(a, b)| a != b) {
            panic!("the 1 MB echo from {} differs from byte {i} on", to.name);
        }
        assert!(mss <= TUNNEL_MSS, "the MSS toward {} is {mss}: the SYN-ACK was not clamped to {TUNNEL_MSS}", to.name);
    }
    // Redirected, a GSO packet reaches the pod whole: it leaves by the pod's own port, not
    // through the bridge, which would cut it into MTU-sized packets in software. So the pods
    // received packets averaging over the MTU, ACKs included, which segmented packets never
    // could (veths pass GSO packets whole; with offload off the pods send no GSO packets to
    // begin with). Not by how much: TCP sizes its GSO packets by its pacing rate, which a
    // slow machine keeps low.
    if opts.delivery == Delivery::Redirect && !opts.strict_checksums {
        for ((name, ns), (bytes0, packets0)) in [("client", &t.client), ("app-a", &t.app_a)].into_iter().zip(pods_before) {
            let (bytes, packets) = received(ns);
            let avg = (bytes - bytes0) / (packets - packets0).max(1);
            assert!(avg > u64::from(MTU), "{name} received {} packets averaging {avg} bytes: GSO packets were segmented on the way", packets - packets0);
        }
    }
    let after = (t.node1.counters(), t.node2.counters());
    for (node, b, a) in [(&t.node1, &before.0, &after.0), (&t.node2, &before.1, &after.1)] {
        let clamped = count(a, "tunnel_mss_clamped") - count(b, "tunnel_mss_clamped");
        assert!(clamped >= 2, "{}: clamped {clamped} of the SYN and SYN-ACK it sent", node.cluster);
        let needed = count(a, "tunnel_frag_needed") - count(b, "tunnel_frag_needed");
        assert_eq!(needed, 0, "{}: {needed} TCP segments did not fit the tunnel", node.cluster);
    }

    // 8 KB datagrams: the pod's kernel fragments them at 1,500 without DF, each fragment too
    // large for the tunnel is split in two, app-a reassembles the datagram and answers it
    // whole, and its answer comes back the same way.
    let (port, exchanged) = t.client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 65_536];
        let exchanged: Vec<_> = (0..20)
            .map(|i| {
                let msg = format!("{i:02} {}", "u".repeat(8189));
                s.send_to(msg.as_bytes(), APP_A_POD.app()).unwrap();
                let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("no answer to 8 KB datagram {i}: {e}"));
                (msg, String::from_utf8_lossy(&buf[..n]).into_owned(), from)
            })
            .collect();
        (s.local_addr().unwrap().port(), exchanged)
    });
    for (msg, reply, from) in exchanged {
        assert_eq!(from, SocketAddr::V4(APP_A_POD.app()));
        assert!(reply == APP_A_POD.reply(&msg, v4(CLIENT_IP, port)), "the answer to {:.2}… is not whole ({} bytes)", msg, reply.len());
    }
    for (node, b) in [(&t.node1, &before.0), (&t.node2, &before.1)] {
        let split = node.counter("tunnel_fragmented") - count(b, "tunnel_fragmented");
        assert!(split >= 20, "{}: only {split} packets fragmented for the tunnel", node.cluster);
    }

    path_mtu_discovery(&t.client, CLIENT_IP, APP_A_POD, &t.node1);
    path_mtu_discovery(&t.app_a, APP_A, CLIENT, &t.node2);
}

#[test]
fn mtu_tcp_mss_clamped_large_udp_fragmented_and_pmtu_discovered_stack() {
    mtu(opts(Delivery::Stack));
}

#[test]
fn mtu_tcp_mss_clamped_large_udp_fragmented_and_pmtu_discovered_redirect() {
    mtu(opts(Delivery::Redirect));
}

#[test]
fn mtu_tcp_mss_clamped_large_udp_fragmented_and_pmtu_discovered_peer() {
    mtu(opts(Delivery::Peer));
}

#[test]
fn mtu_tcp_mss_clamped_large_udp_fragmented_and_pmtu_discovered_fib_lookup_stack() {
    mtu(fib_lookup(Delivery::Stack));
}

#[test]
fn mtu_tcp_mss_clamped_large_udp_fragmented_and_pmtu_discovered_fib_lookup_redirect() {
    mtu(fib_lookup(Delivery::Redirect));
}

#[test]
fn mtu_cases_with_full_checksums_verified_stack() {
    mtu(Options { strict_checksums: true, ..opts(Delivery::Stack) });
}

#[test]
fn mtu_cases_with_full_checksums_verified_redirect() {
    mtu(Options { strict_checksums: true, ..opts(Delivery::Redirect) });
}

// ---------------------------------------------------------------------------------------
// With a gateway peer
// ---------------------------------------------------------------------------------------

/// node1 has cluster2 as a tunnel peer and cluster3 (10.246.0.0/16) as a gateway peer behind
/// node2's east-west gateway NodePort, as in the gateway-mode topology. A connection through
/// each, held open together, exchanges in turn: the gateway's arrives from the gateway pod
/// (its relay), the tunnel's from the client pod itself.
#[test]
fn gateway_and_tunnel_peers_side_by_side() {
    let t = TunnelTopology::new(Options { gateway: true, ..opts(Delivery::Stack) });
    // node2 admits the gateway's NodePort too (kube-proxy DNATs it to the gateway pod).
    t.node2.ns.exec(&format!(
        "iptables -I FORWARD 1 -i lan0 -p tcp -d {GW_IP} --dport {GW_PORT} -m conntrack --ctstate DNAT --ctorigdstport {NODEPORT_TCP} -j ACCEPT"
    ));
    let config1 = format!(
        "{}  - name: cluster3\n    podCIDRs: [\"10.246.0.0/16\"]\n    gateways:\n      - address: {NODE2_LAN}\n        port: {NODEPORT_TCP}\n",
        t.config(Side::Node1)
    );
    let _agent1 = t.start_agent_with(Side::Node1, &config1);
    let _agent2 = t.start_agent(Side::Node2);

    let via_gateway = SocketAddrV4::new(Ipv4Addr::new(10, 246, 0, 21), APP_PORT);
    let (gw_conn, tunnel_conn) = t.client.run(move || {
        let connect = |to: SocketAddrV4| TcpStream::connect_timeout(&to.into(), IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {to}: {e}"));
        (connect(via_gateway), connect(APP_A_POD.app()))
    });
    // The gateway routes by the first line (Istio: by SNI), whatever pod IP was addressed.
    (&gw_conn).write_all(format!("TO {}\n", APP_B_POD.app()).as_bytes()).unwrap();
    let tunnel_local = tunnel_conn.local_addr().unwrap();
    for i in 0..5 {
        let msg = format!("exchange {i}");
        let reply = tcp_line(&gw_conn, &msg).unwrap_or_else(|e| panic!("through the gateway, {msg}: {e}"));
        let (head, seen) = reply.rsplit_once(" from ").unwrap_or_else(|| panic!("{reply}"));
        assert_eq!(head, format!("app-b {} got {msg}", APP_B_POD.app()));
        assert!(seen.starts_with(&format!("{GW_IP}:")), "through the gateway app-b saw {seen}, not the gateway pod");
        let reply = tcp_line(&tunnel_conn, &msg).unwrap_or_else(|e| panic!("through the tunnel, {msg}: {e}"));
        assert_eq!(reply, APP_A_POD.reply(&msg, tunnel_local));
    }
    tcp_check(&t.client2, CLIENT2_IP, APP_B_POD, "a new tunnel flow beside them");
    udp_check(&t.client2, CLIENT2_IP, APP_A_POD, "a new tunnel datagram beside them");

    let nat = t.node1.dump_json("nat")["nat"].as_array().cloned().unwrap_or_default();
    assert!(
        nat.iter().any(|f| f["remote"] == via_gateway.to_string() && f["gateway"] == format!("{NODE2_LAN}:{NODEPORT_TCP}")),
        "no gateway flow in node1's NAT table: {nat:?}"
    );
    assert!(nat.iter().all(|f| !f["remote"].as_str().unwrap_or_default().starts_with("10.245.")), "a tunnel flow was translated: {nat:?}");
    let c = t.node1.counters();
    assert!(count(&c, "flow_opened") >= 1 && count(&c, "tunnel_encap") > 0, "{c:?}");
}
