//! The agent as an operator runs it: reloads, a bad reload, restarts that keep flows,
//! interface hot-plug, gateway failover, flow expiry and metrics.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use meshnet_tests::{
    peer::{self, IO_TIMEOUT},
    poll,
    topo::{self, app_a, app_b, node1_config, Options, Topology, POD_INTERFACES},
    skip_unless_tcx, Agent,
};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(60);

fn start(t: &Topology, config: &str, extra: &[&str]) -> Agent {
    let cfg = t.write_config(config);
    Agent::start(&t.node1, &cfg, &t.pin_path(), extra)
}

fn routes(t: &Topology) -> Vec<(String, String, Vec<String>)> {
    t.dump_json("routes")["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let gws = r["gateways"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| format!("{}:{}{}", g["address"].as_str().unwrap(), g["port"], if g["up"].as_bool().unwrap() { "" } else { " down" }))
                .collect();
            (r["cidr"].as_str().unwrap().to_string(), r["peer"].as_str().unwrap().to_string(), gws)
        })
        .collect()
}

fn nat(t: &Topology) -> Vec<serde_json::Value> {
    t.dump_json("nat")["nat"].as_array().unwrap().clone()
}

fn request(t: &Topology, target: SocketAddrV4, msg: &str) -> String {
    let m = msg.to_string();
    t.client.run(move || peer::tcp_request(target, &m)).unwrap_or_else(|e| panic!("request to {target}: {e}"))
}

/// A TCP connection from the client pod to a remote pod, held open across agent restarts.
struct Held {
    s: TcpStream,
    target: SocketAddrV4,
}

impl Held {
    fn open(t: &Topology, target: SocketAddrV4) -> Self {
        let s = t.client.run(move || {
            let mut s = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.write_all(format!("TO {target}\n").as_bytes()).unwrap();
            s
        });
        Self { s, target }
    }

    fn exchange(&mut self, msg: &str) -> String {
        // One write: write! issues one per piece, and Nagle holds the second back for the
        // delayed ACK.
        self.s.write_all(format!("{msg}\n").as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            self.s.read_exact(&mut byte).unwrap_or_else(|e| panic!("held connection broke at {msg:?}: {e}"));
            buf.push(byte[0]);
        }
        let line = String::from_utf8(buf).unwrap();
        assert_eq!(line.trim_end(), format!("app {} got {msg}", self.target));
        line
    }
}

fn config_with_cluster3(port2: u16) -> String {
    format!(
        "{}  - name: cluster3\n    podCIDRs: [\"10.246.0.0/16\"]\n    gateways: [{{address: 192.0.2.3, port: 30000}}]\n",
        node1_config(POD_INTERFACES).replace(&format!("port: {}", topo::NODEPORT_TCP), &format!("port: {port2}"))
    )
}

/// A second NodePort on node2 for the same gateway: 31999.
fn second_nodeport(t: &Topology) {
    t.node2.exec(&format!(
        "iptables -t nat -A PREROUTING -d {} -p tcp --dport 31999 -j DNAT --to-destination {}:{}",
        topo::NODE2_LAN,
        topo::GW_IP,
        topo::GW_PORT
    ));
}

#[test]
fn reload_adds_changes_and_removes_peers() {
    let t = Topology::new(Options::default());
    // To move cluster2's gateway to.
    second_nodeport(&t);
    let agent = start(&t, &node1_config(POD_INTERFACES), &[]);
    assert_eq!(request(&t, app_a(), "v1"), "app 10.245.0.20:8080 got v1");
    assert_eq!(nat(&t).len(), 1);

    // Add a peer by rewriting the file: the agent notices the change by itself.
    t.write_config(&config_with_cluster3(topo::NODEPORT_TCP));
    let added = poll(WAIT, || routes(&t).iter().any(|r| r.0 == "10.246.0.0/16" && r.1 == "cluster3").then_some(()));
    assert!(added.is_some(), "cluster3 never appeared: {:?}\n{}", routes(&t), agent.child.output());

    // Change cluster2's NodePort and signal: its old flows are purged, new ones use the new port.
    t.write_config(&config_with_cluster3(31999));
    agent.child.signal(Signal::SIGHUP);
    let changed = poll(WAIT, || routes(&t).iter().any(|r| r.0 == "10.245.0.0/16" && r.2 == ["192.0.2.2:31999"]).then_some(()));
    assert!(changed.is_some(), "gateway port never changed: {:?}", routes(&t));
    // Polled: the peer entries (what `routes` shows) are written before the flows are purged.
    let purged = poll(WAIT, || nat(&t).iter().all(|f| f["gateway"] != "192.0.2.2:31674").then_some(()));
    assert!(purged.is_some(), "flows via the old port survived: {:?}", nat(&t));
    assert_eq!(request(&t, app_b(), "v2"), "app 10.245.0.21:8080 got v2");
    assert!(nat(&t).iter().any(|f| f["gateway"] == "192.0.2.2:31999"));

    // Remove cluster3 again.
    t.write_config(&node1_config(POD_INTERFACES).replace(&format!("port: {}", topo::NODEPORT_TCP), "port: 31999"));
    let removed = poll(WAIT, || routes(&t).iter().all(|r| r.1 != "cluster3").then_some(()));
    assert!(removed.is_some(), "cluster3 still routed: {:?}", routes(&t));
    assert_eq!(routes(&t).len(), 1);
}

/// From 6.1 the kernel hands a hash element the agent replaced or deleted straight to a later
/// insert into that map, while a program on another CPU may still read it: after each such
/// write to the peer map a grace period passes (`meshnet::grace`) before the next write takes
/// an element, and the metrics count them. Before 6.1 the kernel waits by itself and the agent
/// never does.
#[test]
fn replacing_two_peers_lets_a_grace_period_pass_after_each() {
    let t = Topology::new(Options::default());
    // For cluster2's second gateway.
    second_nodeport(&t);
    // No probes: a gateway marked down would replace its peer once more.
    let no_health = "health:\n  enabled: false\n";
    let agent = start(&t, &format!("{}{no_health}", config_with_cluster3(topo::NODEPORT_TCP)), &["--metrics-addr", "127.0.0.1:9464"]);
    let periods = |t: &Topology| -> u64 {
        let m = http_get(t, "/metrics");
        let line = m
            .lines()
            .find(|l| l.starts_with("meshnet_map_reuse_grace_periods_total "))
            .unwrap_or_else(|| panic!("no grace-period counter:\n{m}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let mut held = Held::open(&t, app_a());
    held.exchange("before");
    let before = periods(&t);

    // Both peers gain a gateway: two replacements in the peer map in one sync.
    let two = config_with_cluster3(topo::NODEPORT_TCP)
        .replace(
            &format!("        udpPort: {}\n", topo::NODEPORT_UDP),
            &format!("        udpPort: {}\n      - address: {}\n        port: 31999\n", topo::NODEPORT_UDP, topo::NODE2_LAN),
        )
        .replace("{address: 192.0.2.3, port: 30000}", "{address: 192.0.2.3, port: 30000}, {address: 192.0.2.4, port: 30000}");
    assert_ne!(two, config_with_cluster3(topo::NODEPORT_TCP));
    t.write_config(&format!("{two}{no_health}"));
    agent.child.signal(Signal::SIGHUP);
    let both = poll(WAIT, || {
        let r = routes(&t);
        (r.iter().any(|r| r.1 == "cluster2" && r.2.len() == 2) && r.iter().any(|r| r.1 == "cluster3" && r.2.len() == 2)).then_some(())
    });
    assert!(both.is_some(), "the peers never gained their gateways: {:?}\n{}", routes(&t), agent.child.output());
    if meshnet_tests::kernel_at_least(6, 1) {
        // The start let one pass too: nothing is known of what an earlier agent freed.
        assert!(before >= 1, "{before}");
        let after = poll(WAIT, || (periods(&t) >= before + 2).then_some(()));
        assert!(after.is_some(), "not one grace period per replacement: {before} → {}", periods(&t));
    } else {
        assert_eq!((before, periods(&t)), (0, 0), "kernels before 6.1 defer frees themselves");
    }
    held.exchange("after");
    assert_eq!(request(&t, app_b(), "new"), "app 10.245.0.21:8080 got new");
}

#[test]
fn bad_reload_keeps_serving_the_old_state() {
    let t = Topology::new(Options::default());
    let mut agent = start(&t, &node1_config(POD_INTERFACES), &[]);
    let before = routes(&t);
    t.write_config(&node1_config(POD_INTERFACES).replace("10.245.0.0/16", "10.245.0.0/33"));
    agent.child.signal(Signal::SIGHUP);
    let line = agent.child.wait_for_line("reload refused", WAIT);
    assert!(line.contains("10.245.0.0/33"), "{line}");
    assert_eq!(routes(&t), before);
    assert_eq!(request(&t, app_a(), "still"), "app 10.245.0.20:8080 got still");
    assert!(agent.child.stop(), "the agent died on a bad config:\n{}", agent.child.output());
}

/// Program ids attached to a pod interface on node1 (tcx), to tell program instances apart.
fn tcx_prog_ids(t: &Topology) -> Vec<u32> {
    t.node1.run(|| {
        let (_, progs) =
            aya::programs::SchedClassifier::query_tcx("vethc", aya::programs::TcAttachType::Ingress).unwrap();
        progs.iter().map(aya::programs::ProgramInfo::id).collect()
    })
}

fn held_across_restarts(mode: &str) {
    let t = Topology::new(Options { strict_checksums: true, ..Options::default() });
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &["--attach-mode", mode]);
    let mut held = Held::open(&t, app_a());
    held.exchange("one");
    let ids_before = if mode == "tcx" { tcx_prog_ids(&t) } else { Vec::new() };

    assert!(agent.child.stop());
    held.exchange("agent stopped");

    // A new agent (as after an upgrade) loads new program instances and swaps them in,
    // adopting the pinned flow state.
    let mut agent = start(&t, &cfg, &["--attach-mode", mode]);
    held.exchange("agent restarted");
    if mode == "tcx" {
        let ids_after = tcx_prog_ids(&t);
        assert_eq!(ids_after.len(), 1, "exactly one meshnet program on the interface: {ids_after:?}");
        assert_ne!(ids_before, ids_after, "the restart did not replace the program");
    } else {
        let filters = t.node1.exec("tc filter show dev vethc ingress");
        assert_eq!(filters.matches("meshnet_from_pod").count(), 1, "{filters}");
    }
    // The flow kept its state: still one entry for it, not a new translation.
    let flows: Vec<_> = nat(&t).into_iter().filter(|f| f["remote"] == "10.245.0.20:8080").collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert!(agent.child.stop());
    held.exchange("stopped again");
}

#[test]
fn held_connection_survives_restart_tcx() {
    if !skip_unless_tcx() {
        return;
    }
    held_across_restarts("tcx");
}

#[test]
fn held_connection_survives_restart_netlink() {
    held_across_restarts("netlink");
}

#[test]
fn pods_created_after_start_are_covered() {
    let t = Topology::new(Options::default());
    let mut agent = start(&t, &node1_config(POD_INTERFACES), &["--rescan-seconds", "3600"]);
    // A new pod appears after the agent started; netlink tells the agent at once (the
    // periodic rescan is an hour away here).
    let late = meshnet_tests::NetNs::new("late");
    t.node1.ip(&format!("link add vethlate type veth peer name eth0 netns {}", late.name));
    t.node1.ip("link set vethlate master cni0 up");
    late.ip("addr add 10.244.0.30/24 dev eth0");
    late.ip("link set eth0 up");
    late.ip("route add default via 10.244.0.1");
    agent.child.wait_for_line("iface=\"vethlate\"", WAIT);
    let reply = late.run(|| peer::tcp_request(app_b(), "late pod")).unwrap();
    assert_eq!(reply, "app 10.245.0.21:8080 got late pod");
    let of_late = |t: &Topology| nat(t).iter().filter(|f| f["pod"].as_str().is_some_and(|p| p.starts_with("10.244.0.30:"))).count();
    assert_eq!(of_late(&t), 1, "{:?}", nat(&t));
    let others = nat(&t).len() - 1;
    // And forgotten when it goes, with its flows.
    t.node1.ip("link del vethlate");
    agent.child.wait_for_line("interface gone or re-created", WAIT);
    let purged = poll(WAIT, || (of_late(&t) == 0).then_some(()));
    assert!(purged.is_some(), "the flows of a deleted pod were kept: {:?}", nat(&t));
    assert_eq!(nat(&t).len(), others, "flows of other pods were purged too");
}

/// A gateway that stops accepting new connections (for 10 s and more) is marked down: new
/// flows avoid it, the 100 connections held through it keep working (none is reset or
/// moved) until it has been down longer than `health.downGraceSeconds`, and then its flows
/// are purged. It comes back after `riseThreshold` good probes.
#[test]
fn gateway_failover() {
    raise_open_files_limit();
    let t = Topology::new(Options::default());
    // cluster2 gets a second gateway address on node2, with the same NodePort rules.
    t.node2.ip("addr add 192.0.2.3/24 dev lan0");
    t.node2.exec(&format!(
        "iptables -t nat -A PREROUTING -d 192.0.2.3 -p tcp --dport {} -j DNAT --to-destination {}:{}",
        topo::NODEPORT_TCP,
        topo::GW_IP,
        topo::GW_PORT
    ));
    let base = node1_config(POD_INTERFACES).replace(
        "        udpPort: 31675\n",
        "        udpPort: 31675\n      - address: 192.0.2.3\n        port: 31674\n",
    ) + "health:\n  intervalSeconds: 1\n  timeoutMilliseconds: 300\n  failureThreshold: 1\n  riseThreshold: 2\n";
    let cfg = format!("{base}  downGraceSeconds: 3600\n");
    let agent = start(&t, &cfg, &["--rescan-seconds", "1"]);

    // Connections held through both gateways: 100 at least through the one that will stall
    // (`MESHNET_STALL_HELD` scales it), opened in batches, with one flow dump per batch.
    let want: usize = std::env::var("MESHNET_STALL_HELD").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let on = |held: &[(Held, String)], g: &str| held.iter().filter(|(_, x)| x == g).count();
    let mut held: Vec<(Held, String)> = Vec::new();
    while on(&held, "192.0.2.3:31674") < want || on(&held, "192.0.2.2:31674") < 3 {
        assert!(held.len() < want * 6, "flows did not spread over both gateways: {:?}", nat(&t));
        let batch: Vec<Held> = (0..want).map(|i| Held::open(&t, if i % 2 == 0 { app_a() } else { app_b() })).collect();
        let flows = nat(&t);
        for mut h in batch {
            h.exchange("hello");
            // A local port can serve two connections to different remotes: both name a flow.
            let pod = format!("{}:{}", topo::CLIENT_IP, h.s.local_addr().unwrap().port());
            let gw = flows
                .iter()
                .find(|f| f["pod"] == pod.as_str() && f["remote"] == h.target.to_string().as_str())
                .map(|f| f["gateway"].as_str().unwrap().to_string())
                .unwrap_or_else(|| panic!("no flow for {pod} -> {}: {flows:?}", h.target));
            held.push((h, gw));
        }
    }
    let pinned = |t: &Topology| -> std::collections::BTreeMap<(String, String), String> {
        nat(t)
            .iter()
            .filter_map(|f| Some(((f["pod"].as_str()?.to_string(), f["remote"].as_str()?.to_string()), f["gateway"].as_str()?.to_string())))
            .collect()
    };

    // One connection through 192.0.2.3 stays silent while it is down, and is later left
    // unanswered by it.
    let silent = held.iter().position(|(_, g)| g == "192.0.2.3:31674").unwrap();
    let silent_key = (format!("{}:{}", topo::CLIENT_IP, held[silent].0.s.local_addr().unwrap().port()), held[silent].0.target.to_string());

    // 192.0.2.3 stalls new connections for 10 s and more: its SYNs are dropped; established
    // ones still flow.
    let stalled = std::time::Instant::now();
    t.node2.exec("iptables -t raw -I PREROUTING -d 192.0.2.3 -p tcp --syn -j DROP");
    let down = poll(WAIT, || {
        routes(&t).iter().any(|r| r.2.contains(&"192.0.2.3:31674 down".to_string())).then_some(())
    });
    assert!(down.is_some(), "gateway never marked down: {:?}", routes(&t));
    // Not one held connection is reset or moved, for as long as the stall lasts.
    let mut round = 0;
    while round < 2 || stalled.elapsed() < Duration::from_secs(10) {
        for (i, (h, _)) in held.iter_mut().enumerate().filter(|(i, _)| *i != silent) {
            h.exchange(&format!("while down {round} {i}"));
        }
        let now = pinned(&t);
        for (h, gw) in &held {
            let key = (format!("{}:{}", topo::CLIENT_IP, h.s.local_addr().unwrap().port()), h.target.to_string());
            assert_eq!(now.get(&key), Some(gw), "the held flow {key:?} was moved or purged in round {round}");
        }
        round += 1;
    }
    // New flows avoid it.
    let before: usize = nat(&t).iter().filter(|f| f["gateway"] == "192.0.2.3:31674").count();
    for i in 0..16 {
        let target = if i % 2 == 0 { app_a() } else { app_b() };
        request(&t, target, &format!("new {i}"));
    }
    let after: usize = nat(&t).iter().filter(|f| f["gateway"] == "192.0.2.3:31674").count();
    assert_eq!(after, before, "a new flow went to the down gateway: {:?}", nat(&t));

    // Past its grace period, the down gateway keeps the flows it still answers (and idle
    // ones); a flow it no longer answers goes, and starts again on a live gateway: here the
    // silent connection's packets are dropped at node2 while its pod sends on.
    t.write_config(&format!("{base}  downGraceSeconds: 1\n"));
    let evicted = poll(WAIT, || agent.child.output().contains("gateways down past their grace period").then_some(()));
    assert!(evicted.is_some(), "the gateway was never evicted");
    let flow = nat(&t).into_iter().find(|f| f["pod"] == silent_key.0.as_str() && f["remote"] == silent_key.1.as_str()).unwrap();
    let wire = flow["natPort"].as_u64().unwrap_or_else(|| u64::from(held[silent].0.s.local_addr().unwrap().port()));
    t.node2.exec(&format!("iptables -t raw -I PREROUTING -p tcp -d 192.0.2.3 --sport {wire} -j DROP"));
    // Its pod sends on, unanswered, a segment every 200 ms (retransmissions alone space out
    // past the 1 s grace period here).
    held[silent].0.s.set_nodelay(true).unwrap();
    let mut last_write = std::time::Instant::now() - Duration::from_secs(1);
    let purged = poll(WAIT, || {
        if last_write.elapsed() >= Duration::from_millis(200) {
            let _ = held[silent].0.s.write_all(b"into the void\n");
            last_write = std::time::Instant::now();
        }
        (!pinned(&t).contains_key(&silent_key)).then_some(())
    });
    assert!(purged.is_some(), "a flow its down gateway no longer answers was kept: {:?}", nat(&t));
    let now = pinned(&t);
    for (i, (h, gw)) in held.iter_mut().enumerate().filter(|(i, _)| *i != silent) {
        let key = (format!("{}:{}", topo::CLIENT_IP, h.s.local_addr().unwrap().port()), h.target.to_string());
        assert_eq!(now.get(&key), Some(&*gw), "the answered flow {key:?} was purged or moved past the grace period");
        h.exchange(&format!("after the grace period {i}"));
    }

    // It comes back.
    t.node2.exec("iptables -t raw -D PREROUTING -d 192.0.2.3 -p tcp --syn -j DROP");
    let up = poll(WAIT, || routes(&t).iter().all(|r| r.2.iter().all(|g| !g.ends_with("down"))).then_some(()));
    assert!(up.is_some(), "gateway never came back: {:?}", routes(&t));
}

#[test]
fn idle_and_closed_flows_expire() {
    let t = Topology::new(Options::default());
    // Long timeouts while the flows are made and counted (a 1 s one could expire them before
    // the count on a loaded machine), then short ones by a reload.
    let timeouts = |short: u32| {
        format!("nat:\n  udpTimeoutSeconds: {short}\n  tcpClosedTimeoutSeconds: {short}\n  tcpTimeoutSeconds: 3600\n  gcIntervalSeconds: 1\n")
    };
    let agent = start(&t, &(node1_config(POD_INTERFACES) + &timeouts(3600)), &[]);
    let mut held = Held::open(&t, app_b());
    held.exchange("keep me");
    t.client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        peer::udp_request(&s, app_a(), "expire me").unwrap()
    });
    assert_eq!(request(&t, app_a(), "closed"), "app 10.245.0.20:8080 got closed");
    assert_eq!(nat(&t).len(), 3);
    t.write_config(&(node1_config(POD_INTERFACES) + &timeouts(1)));
    agent.child.signal(Signal::SIGHUP);
    let expired = poll(WAIT, || (nat(&t).len() == 1).then_some(()));
    assert!(expired.is_some(), "idle UDP and closed TCP flows were not expired: {:?}", nat(&t));
    let left = nat(&t);
    assert_eq!(left[0]["remote"], "10.245.0.21:8080", "the open TCP flow must stay: {left:?}");
    assert_eq!(left[0]["state"], "established");
    held.exchange("still here");
}

/// A pod fills the flow table with connection attempts nobody answers (their SYNs are lost
/// past the gateway's node, and the pod closes each socket before it retries): every new
/// remote flow on the node is refused, but only until the junk has been idle for
/// nat.unansweredTimeoutSeconds, not for the day an established flow may idle. Another
/// pod's connection then gets through.
#[test]
fn a_table_full_of_unanswered_flows_frees_itself() {
    const MAX: u16 = 1024;
    const JUNK: u16 = MAX + 100;
    let t = Topology::new(Options::default());
    // By their source ports: the other pod's connection, and the health probes, get through.
    t.node2.exec(&format!("iptables -t raw -A PREROUTING -p tcp --syn --sport 20000:{} -j DROP", 20_000 + JUNK));
    // The junk fills the table under a long timeout (under load, sending it all can take
    // longer than a short one), which a reload then shortens.
    let timeouts = |secs: u32| format!("nat:\n  maxFlows: {MAX}\n  unansweredTimeoutSeconds: {secs}\n  gcIntervalSeconds: 1\n");
    let agent = start(&t, &(node1_config(POD_INTERFACES) + &timeouts(3600)), &[]);
    let before = t.counter("nat_table_full");
    t.client.run(move || {
        use socket2::{Domain, Socket, Type};
        for i in 0..JUNK {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            s.bind(&SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 20_000 + i).into()).unwrap();
            // One SYN, sent by connect() itself; closing in SYN-SENT sends nothing more.
            let _ = s.connect(&app_a().into());
        }
    });
    let full = poll(WAIT, || (t.counter("nat_table_full") >= before + u64::from(JUNK - MAX)).then_some(()));
    assert!(full.is_some(), "the junk never filled the table: nat_table_full {}", t.counter("nat_table_full"));
    t.write_config(&(node1_config(POD_INTERFACES) + &timeouts(2)));
    agent.child.signal(Signal::SIGHUP);
    // Its SYNs are retransmitted until the junk expires and its flow finds room.
    let reply = t.client2.run(|| peer::tcp_request(app_b(), "through"));
    assert_eq!(reply.expect("the other pod's connection never got through"), "app 10.245.0.21:8080 got through");
    let junk = || nat(&t).iter().filter(|f| f["pod"].as_str().unwrap().starts_with("10.244.0.10:")).count();
    assert!(poll(WAIT, || (junk() == 0).then_some(())).is_some(), "{} junk flows still held", junk());
}

fn http_get(t: &Topology, path: &str) -> String {
    meshnet_tests::http_get(&t.node1, "127.0.0.1:9464".parse().unwrap(), path)
}

#[test]
fn metrics_health_and_readiness() {
    let t = Topology::new(Options::default());
    let _agent = start(&t, &node1_config(POD_INTERFACES), &["--metrics-addr", "127.0.0.1:9464"]);
    request(&t, app_a(), "count me");
    assert!(http_get(&t, "/healthz").starts_with("HTTP/1.0 200"));
    assert!(http_get(&t, "/readyz").starts_with("HTTP/1.0 200"));
    let m = http_get(&t, "/metrics");
    for needle in [
        "meshnet_datapath_packets_total{event=\"flow_opened\"}",
        "meshnet_map_entries{map=\"mn_routes_v1\"} 1",
        "meshnet_map_entries{map=\"mn_nat_fwd_v2\"} 1",
        "meshnet_datapath_packets_total{event=\"nat_table_full\"} 0",
        "meshnet_gateway_up{peer=\"cluster2\",address=\"192.0.2.2\",port=\"31674\"} 1",
        "meshnet_last_sync_timestamp_seconds",
        "meshnet_attached_interfaces 2",
        "meshnet_loop_longest_stall_seconds ",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    // One request, one flow: flows are counted, not their packets (five or more from the pod).
    let opened: u64 = m
        .lines()
        .find(|l| l.starts_with("meshnet_datapath_packets_total{event=\"flow_opened\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!((1..3).contains(&opened), "{opened} flows opened for one request:\n{m}");
}

/// Every local client of the agent's loopback port comes from 127.0.0.1, the kubelet's httpGet
/// probes too: a program of the node holding stalled connections past the caps would have them
/// closed unanswered, and liveness would restart the agent. The probes ask the health socket,
/// which those connections do not reach.
#[test]
fn the_probes_are_answered_while_stalled_connections_fill_the_metrics_port() {
    let t = Topology::new(Options::default());
    let socket = t.dir.0.join("health.sock");
    let socket_arg = socket.display().to_string();
    let _agent = start(&t, &node1_config(POD_INTERFACES), &["--metrics-addr", "127.0.0.1:9464", "--health-socket", &socket_arg]);
    assert!(http_get(&t, "/healthz").starts_with("HTTP/1.0 200"));
    // Past the whole cap (64), so also past one client's share (8); and then what an httpGet
    // probe meets: closed unanswered. In one go: the server times stalled headers out (5 s).
    let (held, crowded): (Vec<TcpStream>, String) = t.node1.run(|| {
        let held = (0..70)
            .map(|_| {
                let mut s = TcpStream::connect("127.0.0.1:9464").unwrap();
                // Closed already by the server, for those past the caps.
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
                s
            })
            .collect();
        let mut s = TcpStream::connect("127.0.0.1:9464").unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        (held, got)
    });
    assert_eq!(crowded, "", "the metrics port answered past its caps");
    for (what, body) in [("healthz", "ok\n"), ("readyz", "ready\n")] {
        let out = meshnet_tests::meshnet(&t.node1, &format!("probe {what} --socket {socket_arg}"));
        assert!(out.ok && out.stdout == body, "probe {what} through the health socket: {out:?}");
    }
    drop(held);
}

/// A metrics port someone else holds does not keep the datapath from being attached: the agent
/// says so, translates, and serves the port once it is free.
#[test]
fn an_agent_whose_metrics_port_is_taken_attaches_and_serves_once_it_is_free() {
    let t = Topology::new(Options::default());
    let squatter = t.node1.run(|| std::net::TcpListener::bind("127.0.0.1:9464").unwrap());
    let mut agent = start(&t, &node1_config(POD_INTERFACES), &["--metrics-addr", "127.0.0.1:9464"]);
    let said = poll(WAIT, || agent.child.output().contains("cannot bind; trying again").then_some(()));
    assert!(said.is_some(), "the agent did not say its port is taken:\n{}", agent.child.output());
    assert!(meshnet_on(&t, "vethc"), "the programs are not attached");
    assert_eq!(request(&t, app_a(), "port taken"), "app 10.245.0.20:8080 got port taken");
    drop(squatter);
    assert!(http_get(&t, "/healthz").starts_with("HTTP/1.0 200"), "{}", agent.child.output());
    agent.child.wait_for_line("bound at last", WAIT);
}

/// The uninstall DaemonSet's `detach --then-wait`: it detaches, says so, and then stays up,
/// asleep, until SIGTERM, on which it exits 0. Under a running agent it fails at once.
#[test]
fn detach_then_wait_detaches_then_sleeps_until_sigterm() {
    let t = Topology::new(Options::default());
    let mut agent = start(&t, &node1_config(POD_INTERFACES), &[]);
    let out = t.meshnet("detach --then-wait");
    assert!(!out.ok && out.stderr.contains("stop it first"), "{out:?}");
    assert!(agent.child.stop());
    assert!(meshnet_on(&t, "vethc"));

    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", t.node1.path().display()))
        .arg(meshnet_tests::meshnet_bin())
        .args(["--pin-path", &t.pin_path().display().to_string(), "detach", "--then-wait"]);
    let mut detach = meshnet_tests::ChildGuard::spawn(&mut cmd);
    detach.wait_for_line("detached:", WAIT);
    detach.wait_for_line("waiting for SIGTERM", WAIT);
    // bpffs lets go of an unpinned link after an RCU grace period, not at the unlink.
    let gone = poll(WAIT, || (!meshnet_on(&t, "vethc")).then_some(()));
    assert!(gone.is_some(), "meshnet still attached after detach");
    // Asleep in the kernel, not spinning: its state is S, and it has used no CPU time since.
    let stat = |pid: i32| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<String> = text.rsplit_once(") ").unwrap().1.split(' ').map(str::to_string).collect();
        (fields[0].clone(), fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap())
    };
    let pid = detach.pid();
    let asleep = poll(WAIT, || (stat(pid).0 == "S").then(|| stat(pid).1));
    let ticks = asleep.unwrap_or_else(|| panic!("detach --then-wait is not asleep: {:?}", stat(pid)));
    let stirred = poll(Duration::from_secs(1), || Some(stat(pid)).filter(|s| *s != ("S".to_string(), ticks)));
    assert_eq!(stirred, None, "detach --then-wait woke up or ran");
    assert!(detach.stop(), "detach --then-wait did not exit 0 on SIGTERM:\n{}", detach.output());
}

/// (id, tag) of the program on the client's interface, attached through tcx (kernels >= 6.6,
/// where the agent's `auto` takes tcx) or a netlink filter: the tag hashes the instructions.
fn ingress_prog(t: &Topology) -> (u32, u64) {
    if meshnet_tests::kernel_at_least(6, 6) {
        return t.node1.run(|| {
            let (_, progs) =
                aya::programs::SchedClassifier::query_tcx("vethc", aya::programs::TcAttachType::Ingress).unwrap();
            assert_eq!(progs.len(), 1, "exactly one program on the interface");
            (progs[0].id(), progs[0].tag())
        });
    }
    // "filter ... bpf chain 0 handle 0x1 meshnet_from_pod direct-action not_in_hw id 42 tag 0123456789abcdef"
    let filters = t.node1.exec("tc filter show dev vethc ingress");
    let progs: Vec<(u32, u64)> = filters
        .lines()
        .filter(|l| l.contains("meshnet_from_pod"))
        .map(|l| {
            let word = |key: &str| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == key).and_then(|_| words.next()).unwrap_or_else(|| panic!("no {key} in {l:?}"))
            };
            (word("id").parse().unwrap(), u64::from_str_radix(word("tag"), 16).unwrap())
        })
        .collect();
    assert_eq!(progs.len(), 1, "exactly one meshnet filter on the interface:\n{filters}");
    progs[0]
}

/// An upgrade to a build whose programs differ, and back, under a held connection.
#[test]
fn held_connection_survives_upgrade_and_downgrade() {
    let canary = std::env::var("MESHNET_UPGRADE_OBJECT")
        .expect("MESHNET_UPGRADE_OBJECT is unset: run this test through `cargo xtask test`, which builds the variant object");
    let t = Topology::new(Options { strict_checksums: true, ..Options::default() });
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &[]);
    let mut held = Held::open(&t, app_b());
    held.exchange("on the old build");
    let old = ingress_prog(&t);
    assert!(agent.child.stop());

    let mut agent = start(&t, &cfg, &["--ebpf-object", &canary]);
    let new = ingress_prog(&t);
    assert_ne!(old.1, new.1, "the upgrade did not change the program's instructions");
    held.exchange("on the new build");
    assert!(agent.child.stop());

    let _agent = start(&t, &cfg, &[]);
    assert_eq!(ingress_prog(&t).1, old.1, "the downgrade did not bring the old program back");
    held.exchange("back on the old build");
    let flows: Vec<_> = nat(&t).into_iter().filter(|f| f["remote"] == "10.245.0.21:8080").collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
}

#[test]
fn a_second_agent_on_the_same_pins_waits_and_never_touches_the_maps() {
    let t = Topology::new(Options::default());
    let mut first = start(&t, &node1_config(POD_INTERFACES), &[]);
    let before = routes(&t);
    let mut held = Held::open(&t, app_a());
    held.exchange("one");

    // The second agent's config differs, so any write of its would show in the maps.
    let cfg2 = t.dir.0.join("second.yaml");
    std::fs::write(&cfg2, config_with_cluster3(topo::NODEPORT_TCP)).unwrap();
    let argv = Agent::argv(&t.node1, &cfg2, &t.pin_path(), &["--lock-wait-seconds", "2"]);
    let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second agent ran beside the first:\n{stderr}");
    assert!(stderr.contains("another meshnet agent") && stderr.contains(&t.pin_path().display().to_string()), "{stderr}");
    assert_eq!(routes(&t), before, "the refused agent changed the maps");
    held.exchange("two");

    // `detach` under a running agent is refused too: the agent would attach again.
    let out = t.meshnet("detach");
    assert!(!out.ok && out.stderr.contains("stop it first"), "{out:?}");
    assert_eq!(routes(&t), before);

    // One that may wait takes over as soon as the first stops, with the flow intact.
    let argv = Agent::argv(&t.node1, &cfg2, &t.pin_path(), &["--lock-wait-seconds", "120"]);
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env("MESHNET_LOG", "info");
    let mut second = meshnet_tests::ChildGuard::spawn(&mut cmd);
    second.wait_for_line("holds the pin directory; waiting", WAIT);
    assert_eq!(routes(&t), before);
    assert!(first.child.stop(), "{}", first.child.output());
    second.wait_for_line("meshnet agent ready", WAIT);
    let added = poll(WAIT, || routes(&t).iter().any(|r| r.1 == "cluster3").then_some(()));
    assert!(added.is_some(), "the second agent never applied its config: {:?}", routes(&t));
    held.exchange("three");
}

/// Re-creates the client pod's veth under the same name, as a pod re-created on the node.
fn recreate_client_veth(t: &Topology) {
    t.node1.exec(&format!(
        "ip link del vethc && ip link add vethc type veth peer name eth0 netns {} && ip link set vethc master cni0 up",
        t.client.name
    ));
    t.client.ip(&format!("addr add {}/24 dev eth0", topo::CLIENT_IP));
    t.client.ip("link set eth0 up");
    t.client.ip("route add default via 10.244.0.1");
}

/// Whether any meshnet program is on `iface` in node1, by tcx or a netlink filter.
fn meshnet_on(t: &Topology, iface: &'static str) -> bool {
    use aya::programs::{SchedClassifier, TcAttachType};
    let tcx = t.node1.run(move || {
        [TcAttachType::Ingress, TcAttachType::Egress].into_iter().any(|d| {
            SchedClassifier::query_tcx(iface, d)
                .map(|(_, ps)| ps.iter().any(|p| p.name_as_str().is_some_and(|n| n.starts_with("meshnet"))))
                .unwrap_or(false)
        })
    });
    let nl = ["ingress", "egress"]
        .iter()
        .any(|d| t.node1.exec(&format!("tc filter show dev {iface} {d} 2>/dev/null || true")).contains("meshnet"));
    tcx || nl
}

#[test]
fn interfaces_are_tracked_by_index() {
    let t = Topology::new(Options::default());
    let mut agent = start(&t, &node1_config(POD_INTERFACES), &["--rescan-seconds", "3600"]);
    assert_eq!(request(&t, app_a(), "before"), "app 10.245.0.20:8080 got before");

    // A pod re-created under the same veth name between two of the agent's looks (held
    // still here, so that it sees both changes at once): the new device gets the programs.
    agent.child.signal(Signal::SIGSTOP);
    recreate_client_veth(&t);
    agent.child.signal(Signal::SIGCONT);
    let ok = poll(WAIT, || t.client.run(|| peer::tcp_request(app_a(), "recreated")).ok());
    assert_eq!(ok.as_deref(), Some("app 10.245.0.20:8080 got recreated"), "{}", agent.child.output());

    // The same while no agent runs: the pinned link of the old device is stale.
    assert!(agent.child.stop());
    recreate_client_veth(&t);
    let _agent = start(&t, &node1_config(POD_INTERFACES), &["--rescan-seconds", "3600"]);
    assert_eq!(request(&t, app_a(), "restarted"), "app 10.245.0.20:8080 got restarted");

    // A renamed interface that no longer matches loses its programs for real.
    assert!(meshnet_on(&t, "vethc2"));
    t.node1.exec("ip link set vethc2 down && ip link set vethc2 name other0 && ip link set other0 up");
    let detached = poll(WAIT, || (!meshnet_on(&t, "other0")).then_some(()));
    assert!(detached.is_some(), "meshnet is still on the renamed interface");
}

/// The interface patterns changed so that a pod's device, still there, no longer matches
/// (as when an operator moves them from the bridge to the pods' veths): it is detached only
/// once what matches now is attached, and its flows stay (purged, a held connection's next
/// packet from the far end would reach the pod untranslated, and the pod answer with a
/// reset); matched again, its held connection carries on.
#[test]
fn a_device_that_no_longer_matches_keeps_its_flows() {
    let t = Topology::new(Options::default());
    let agent = start(&t, &node1_config(POD_INTERFACES), &[]);
    let mut held = Held::open(&t, app_a());
    held.exchange("before");
    let before = client_flows(&t);
    assert_eq!(before.len(), 1, "{before:?}");
    t.write_config(&node1_config("\"vethc2\""));
    agent.child.signal(Signal::SIGHUP);
    let moved = poll(WAIT, || (!meshnet_on(&t, "vethc") && meshnet_on(&t, "vethc2")).then_some(()));
    assert!(moved.is_some(), "vethc kept its programs:\n{}", agent.child.output());
    assert_eq!(client_flows(&t), before, "the flows of a device that is still there were purged:\n{}", agent.child.output());
    assert!(agent.child.output().contains("no longer matches; detached, its flows kept"), "{}", agent.child.output());
    t.write_config(&node1_config(POD_INTERFACES));
    agent.child.signal(Signal::SIGHUP);
    assert!(poll(WAIT, || meshnet_on(&t, "vethc").then_some(())).is_some(), "vethc was not attached again");
    held.exchange("matched again");
    assert_eq!(client_flows(&t), before);
}

/// The tcx programs on one hook of `iface` in node1, by id.
fn tcx_ids_on(t: &Topology, iface: &'static str, dir: aya::programs::TcAttachType) -> Vec<u32> {
    t.node1.run(move || {
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(iface, dir).unwrap();
        progs.iter().map(aya::programs::ProgramInfo::id).collect()
    })
}

/// The client pod's flows as `maps dump` shows them, without their idle times.
fn client_flows(t: &Topology) -> Vec<String> {
    let pod = format!("{}:", topo::CLIENT_IP);
    let mut v: Vec<String> = nat(t)
        .iter()
        .filter(|f| f["pod"].as_str().is_some_and(|p| p.starts_with(&pod)))
        .map(|f| format!("{} {} {} {} {}", f["proto"], f["pod"], f["remote"], f["gateway"], f["natPort"]))
        .collect();
    v.sort();
    v
}

/// A pod's interface renamed to a name that still matches is the same device, with the
/// same pod behind it: it keeps its programs and its flows (taken for gone, its flows were
/// purged, and the next packet of a held connection picked a new translation the far end
/// answered with a reset), and a restarted agent swaps its programs into the links the
/// device already carries instead of adding a second pair.
#[test]
fn a_renamed_interface_that_still_matches_keeps_its_programs_and_flows() {
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &["--rescan-seconds", "3600"]);
    let mut held = Held::open(&t, app_a());
    held.exchange("before the rename");
    let before = client_flows(&t);
    assert_eq!(before.len(), 1, "{before:?}");

    t.node1.exec("ip link set vethc down && ip link set vethc name vethc9 && ip link set vethc9 up");
    agent.child.wait_for_line("iface=\"vethc9\"", WAIT);
    assert_eq!(client_flows(&t), before, "the flows of a renamed interface were purged:\n{}", agent.child.output());
    assert!(meshnet_on(&t, "vethc9"), "meshnet is not on the renamed interface");
    held.exchange("after the rename");
    let links = t.pin_path().join("links");
    assert!(!links.join("vethc@ingress").exists(), "the link pins kept the old name");
    let tcx = meshnet_tests::kernel_at_least(6, 6);
    if tcx {
        assert!(links.join("vethc9@ingress").exists() && links.join("vethc9@egress").exists());
    }

    assert!(agent.child.stop());
    let _agent = start(&t, &cfg, &["--rescan-seconds", "3600"]);
    if tcx {
        for dir in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress] {
            let ids = tcx_ids_on(&t, "vethc9", dir);
            assert_eq!(ids.len(), 1, "{dir:?}: one meshnet program after a restart, not another pair: {ids:?}");
        }
    }
    held.exchange("after a restart");
    assert_eq!(client_flows(&t), before);
}

/// meshnet's programs on vethc in node1, by direction, as `mode` attaches them: tcx links'
/// program ids, or the ids of the netlink filters' programs.
fn meshnet_ids(t: &Topology, mode: &str) -> [Vec<u32>; 2] {
    use aya::programs::TcAttachType::{Egress, Ingress};
    if mode == "tcx" {
        return [tcx_ids_on(t, "vethc", Ingress), tcx_ids_on(t, "vethc", Egress)];
    }
    ["ingress", "egress"].map(|d| {
        // "filter ... bpf chain 0 handle 0x1 meshnet_from_pod direct-action not_in_hw id 42 tag ..."
        let filters = t.node1.exec(&format!("tc filter show dev vethc {d}"));
        filters
            .lines()
            .filter(|l| l.contains("meshnet_"))
            .map(|l| l.split_whitespace().skip_while(|w| *w != "id").nth(1).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("no id in {l:?}")))
            .collect()
    })
}

/// An attach that fails halfway (a new agent's egress link cannot be pinned: a directory
/// stands where its pin goes) leaves the interface as it was: the pair the earlier agent
/// attached (`earlier_mode`) keeps translating (detaching both, as before, left the pod
/// without programs until an attach worked, and its connections were reset), the
/// migration to maps of a new `nat.maxFlows` waits with the old maps those programs use,
/// and the first rescan after the obstacle goes swaps both directions and finishes it.
fn a_failed_attach_leaves_the_earlier_programs(earlier_mode: &str) {
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &["--attach-mode", earlier_mode]);
    let mut held = Held::open(&t, app_a());
    held.exchange("before");
    let none: [Vec<u32>; 2] = [vec![], vec![]];
    let before = meshnet_ids(&t, earlier_mode);
    assert!(before.iter().all(|ids| ids.len() == 1), "{before:?}");
    assert!(agent.child.stop());

    let links = t.pin_path().join("links");
    let aside = links.join("vethc-aside@egress");
    if earlier_mode == "tcx" {
        // The earlier agent's egress link, pinned under another name so that it stays.
        std::fs::rename(links.join("vethc@egress"), &aside).unwrap();
    }
    std::fs::create_dir(links.join("vethc@egress")).unwrap();
    let migrating = t.pin_path().join("maps").join(format!("{}_migrating", meshnet_common::names::NAT_FWD));
    let agent = start(&t, &format!("{cfg}nat:\n  maxFlows: 131072\n"), &["--attach-mode", "tcx"]);
    assert!(agent.child.output().contains("attach failed"), "{}", agent.child.output());
    held.exchange("after the failed attach");
    // Polled: the agent retries at every rescan, and a link it unpins leaves its hook in the
    // kernel's deferred work, so one look can fall inside a retry.
    let left_alone = || meshnet_ids(&t, earlier_mode) == before && (earlier_mode == "tcx" || meshnet_ids(&t, "tcx") == none);
    let left = poll(WAIT, || left_alone().then_some(()));
    assert!(left.is_some(), "the earlier programs were not left as they were, or a tcx link was left behind: {:?} {:?}", meshnet_ids(&t, earlier_mode), meshnet_ids(&t, "tcx"));
    assert!(migrating.exists(), "the migration finished while vethc still runs the earlier programs");
    held.exchange("while the attach fails");

    // The obstacle goes, the agent held still meanwhile (a rescan between the two steps
    // would pin a second egress link).
    agent.child.signal(Signal::SIGSTOP);
    std::fs::remove_dir(links.join("vethc@egress")).unwrap();
    if earlier_mode == "tcx" {
        std::fs::rename(&aside, links.join("vethc@egress")).unwrap();
    }
    agent.child.signal(Signal::SIGCONT);
    let finished = poll(WAIT, || (!migrating.exists()).then_some(()));
    assert!(finished.is_some(), "the migration never finished:\n{}", agent.child.output());
    let after = meshnet_ids(&t, "tcx");
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a.len(), 1, "{after:?}");
        assert_ne!(a, b, "the new agent's programs were never swapped in");
    }
    if earlier_mode != "tcx" {
        assert_eq!(meshnet_ids(&t, earlier_mode), none, "the earlier netlink filters stayed beside the tcx links");
    }
    held.exchange("after the retry");
}

#[test]
fn a_failed_attach_leaves_the_earlier_tcx_links_and_the_migration_waits() {
    if !skip_unless_tcx() {
        return;
    }
    a_failed_attach_leaves_the_earlier_programs("tcx");
}

/// The same where the earlier agent attached netlink filters (before a kernel upgrade): the
/// tcx link the new agent made on the direction that worked goes, the filter comes back.
#[test]
fn a_failed_attach_leaves_the_earlier_netlink_filters_and_the_migration_waits() {
    if !skip_unless_tcx() {
        return;
    }
    a_failed_attach_leaves_the_earlier_programs("netlink");
}

// ---------------------------------------------------------------------------------------
// Upgrades across a map layout change
// ---------------------------------------------------------------------------------------

fn open_hash<K: aya::Pod, V: aya::Pod>(path: &std::path::Path) -> aya::maps::HashMap<aya::maps::MapData, K, V> {
    let data = aya::maps::MapData::from_pin(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
}

/// Turns node1's pinned state into what a pre-v2 agent leaves: LRU flow maps under the v1
/// names holding every flow (reverse entries without a peer id), a preallocated peer map
/// under its v1 name, and an 11-slot counter map; this build's flow and peer pins are gone.
/// A planted flow that no packet will ever touch tells whether the flows were migrated.
fn downgrade_pins(t: &Topology, planted: (meshnet_common::FlowKey, meshnet_common::NatFwd)) {
    use meshnet_common::{names, FlowKey, NatFwd, NatRev, PeerGateways};
    let maps = t.pin_path().join("maps");
    let fwd: Vec<(FlowKey, NatFwd)> = open_hash::<FlowKey, NatFwd>(&maps.join(names::NAT_FWD)).iter().map(Result::unwrap).collect();
    let rev: Vec<(FlowKey, NatRev)> = open_hash::<FlowKey, NatRev>(&maps.join(names::NAT_REV)).iter().map(Result::unwrap).collect();
    let peers: Vec<(u32, PeerGateways)> = open_hash::<u32, PeerGateways>(&maps.join(names::PEERS)).iter().map(Result::unwrap).collect();
    assert!(!fwd.is_empty() && !peers.is_empty());
    for n in [names::NAT_FWD, names::NAT_REV, names::PEERS, names::STATS] {
        std::fs::remove_file(maps.join(n)).unwrap();
    }
    let (fwd_v1, rev_v1, peers_v1) = (maps.join(names::NAT_FWD_V1), maps.join(names::NAT_REV_V1), maps.join(names::PEERS_V1));
    meshnet_tests::raw_bpf::create_pinned(&fwd_v1, meshnet_tests::raw_bpf::LRU_HASH, 16, 24, 65_536, 0);
    meshnet_tests::raw_bpf::create_pinned(&rev_v1, meshnet_tests::raw_bpf::LRU_HASH, 16, 24, 65_536, 0);
    meshnet_tests::raw_bpf::create_pinned(&peers_v1, meshnet_tests::raw_bpf::HASH, 4, u32::try_from(size_of::<PeerGateways>()).unwrap(), 1024, 0);
    meshnet_tests::raw_bpf::create_pinned(&maps.join(names::STATS), meshnet_tests::raw_bpf::PERCPU_ARRAY, 4, 8, 11, 0);
    let mut m = open_hash::<FlowKey, meshnet_common::NatFwdV1>(&fwd_v1);
    for (k, v) in fwd.iter().chain([&planted]) {
        let v1 = meshnet_common::NatFwdV1 {
            gw_addr_be: v.gw_addr_be,
            gw_port_be: v.gw_port_be,
            nat_sport_be: v.nat_sport_be,
            peer_id: v.peer_id,
            flags: v.flags,
            last_seen_ns: v.last_seen_ns,
        };
        m.insert(k, v1, 0).unwrap();
    }
    let mut m = open_hash::<FlowKey, NatRev>(&rev_v1);
    let planted_rev = FlowKey::rev_value_of_fwd(&planted.0, &planted.1, planted.1.last_seen_ns);
    for (k, v) in rev.iter().chain([&(FlowKey::rev_of_fwd(&planted.0, &planted.1), planted_rev)]) {
        m.insert(k, NatRev { peer_id: 0, ..*v }, 0).unwrap();
    }
    let mut m = open_hash::<u32, PeerGateways>(&peers_v1);
    for (k, v) in &peers {
        m.insert(k, v, 0).unwrap();
    }
}

/// An agent that finds an older build's maps (other names, LRU type, fewer counters)
/// copies every flow into its own maps before it swaps programs, removes the old pins, and
/// a connection held across the upgrade keeps working.
#[test]
fn an_upgrade_across_the_map_layout_change_keeps_every_flow() {
    use meshnet_common::{names, FlowKey, NatFwd};
    let t = Topology::new(Options { strict_checksums: true, ..Options::default() });
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &[]);
    let mut held = Held::open(&t, app_b());
    held.exchange("before the upgrade");
    assert!(agent.child.stop());

    let f = nat(&t)[0].clone();
    let real = open_hash::<FlowKey, NatFwd>(&t.pin_path().join("maps").join(names::NAT_FWD)).iter().next().unwrap().unwrap();
    let planted_key = FlowKey { sport_be: 1234u16.to_be(), ..real.0 };
    let planted = NatFwd { nat_sport_be: 1234u16.to_be(), ..real.1 };
    downgrade_pins(&t, (planted_key, planted));

    let _agent = start(&t, &cfg, &[]);
    let maps = t.pin_path().join("maps");
    for old in [names::NAT_FWD_V1, names::NAT_REV_V1, names::PEERS_V1] {
        assert!(!maps.join(old).exists(), "{old} still pinned after the migration");
    }
    let flows = nat(&t);
    // The planted flow saw no packet since: only the migration can have put it there, with
    // its reverse entry and the peer id the v1 reverse entry lacked.
    let planted_row: Vec<_> = flows.iter().filter(|r| r["pod"].as_str().is_some_and(|p| p.ends_with(":1234"))).collect();
    assert_eq!(planted_row.len(), 1, "the planted flow was not migrated: {flows:?}");
    let rev = open_hash::<FlowKey, meshnet_common::NatRev>(&maps.join(names::NAT_REV));
    let r = rev.get(&FlowKey::rev_of_fwd(&planted_key, &planted), 0).expect("the planted flow's reverse entry");
    assert_eq!(r.peer_id, planted.peer_id, "the v1 reverse entry's peer id was not filled in");
    assert!(flows.iter().any(|r| r["remote"] == f["remote"] && r["pod"] == f["pod"]), "{flows:?}");
    // The counters grew to this build's set.
    assert!(t.dump_json("stats")["stats"]["nat_table_full"].is_u64());
    held.exchange("after the upgrade");
}

/// From 6.1 the flow maps are preallocated (`datapath::flow_map_flags` says why); an agent
/// that finds them allocated on demand (as earlier releases and kernels before 6.1 have
/// them) moves every flow into preallocated maps at its restart, and back again when told to
/// allocate on demand: a held connection keeps working across both.
#[test]
fn the_flow_maps_allocation_follows_the_kernel_and_a_change_keeps_every_flow() {
    use meshnet_common::names;
    use meshnet::datapath::ON_DEMAND_FLOWS_ENV;
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES);
    let flags = |t: &Topology| {
        [names::NAT_FWD, names::NAT_REV].map(|n| aya::maps::MapInfo::from_pin(t.pin_path().join("maps").join(n)).unwrap().map_flags())
    };
    // What identifies a flow and its translation (the idle time moves on).
    let flows = |t: &Topology| {
        let mut v: Vec<_> = nat(t).iter().map(|r| format!("{} {} {} {} {}", r["proto"], r["pod"], r["remote"], r["gateway"], r["natPort"])).collect();
        v.sort();
        v
    };
    let on_demand = [1, 1];
    // On the matrix's kernels (mainline) the BTF and the version agree: 6.1 and later.
    assert_eq!(meshnet::grace::kernel_reuses_freed_elements(), meshnet_tests::kernel_at_least(6, 1));
    let chosen = if meshnet_tests::kernel_at_least(6, 1) { [0, 0] } else { on_demand };

    let mut agent = t.start_meshnet_with(ON_DEMAND_FLOWS_ENV, &[]);
    let mut held = Held::open(&t, app_a());
    held.exchange("flow maps allocated on demand");
    assert_eq!(flags(&t), on_demand);
    let before = flows(&t);
    assert!(!before.is_empty());
    assert!(agent.child.stop());

    let mut agent = start(&t, &cfg, &[]);
    assert_eq!(flags(&t), chosen, "the flow maps' flags on this kernel");
    assert_eq!(flows(&t), before, "flows lost in the move");
    held.exchange("flow maps as the kernel wants them");
    assert!(!t.pin_path().join("maps").join(format!("{}_migrating", names::NAT_FWD)).exists());
    assert!(agent.child.stop());
    let log = agent.child.output();
    let want = if chosen == on_demand { "allocated on demand" } else { "preallocated" };
    assert!(log.contains(&format!("the flow maps are {want}")), "{log}");

    let _agent = t.start_meshnet_with(ON_DEMAND_FLOWS_ENV, &[]);
    assert_eq!(flags(&t), on_demand);
    assert_eq!(flows(&t), before, "flows lost in the move back");
    held.exchange("allocated on demand again");
}

/// During a migration the old programs still run on the interfaces not swapped yet: a flow
/// they add to the old maps after the first copy must reach the new maps as soon as the next
/// interface is swapped, not only once every interface runs the new build, for its replies
/// may reach an interface already swapped (and pass untranslated there).
#[test]
fn flows_the_old_programs_add_during_a_migration_are_carried_over_at_each_swap() {
    use meshnet::{
        datapath::{AttachMode, Datapath},
        datapath_log::Choice,
        pins::Pins,
    };
    use meshnet_common::{names, FlowKey, NatFwd};
    meshnet_tests::require_root();
    let ns = meshnet_tests::NetNs::new("mg");
    for (a, b) in [("mga", "mgb"), ("mgc", "mgd")] {
        ns.ip(&format!("link add {a} type veth peer name {b}"));
        ns.ip(&format!("link set {a} up"));
    }
    let bpffs = meshnet_tests::Bpffs::new();
    let root = bpffs.pin_path();
    ns.run(move || {
        let pins = Pins::new(root.clone());
        let mut old = Datapath::load(&pins, 65_536, Choice::Default).unwrap();
        for iface in ["mga", "mgc"] {
            old.attach(iface, AttachMode::Auto).unwrap();
        }
        drop(old);
        // A new nat.maxFlows: the flow maps are moved aside and copied into new ones.
        let mut new = Datapath::load(&pins, 131_072, Choice::Default).unwrap();
        let maps = root.join("maps");
        let aside = maps.join(format!("{}_migrating", names::NAT_FWD));
        assert!(aside.exists(), "no migration: {aside:?} missing");
        // What an old program adds after the first copy, on an interface not swapped yet.
        let key = FlowKey { src_be: u32::from_ne_bytes([10, 244, 0, 9]), dst_be: u32::from_ne_bytes([10, 245, 0, 9]), sport_be: 4242u16.to_be(), dport_be: 80u16.to_be(), proto: 6, ..FlowKey::default() };
        open_hash::<FlowKey, NatFwd>(&aside).insert(key, NatFwd { last_seen_ns: 1, ..NatFwd::default() }, 0).unwrap();
        new.attach("mga", AttachMode::Auto).unwrap();
        assert!(
            open_hash::<FlowKey, NatFwd>(&maps.join(names::NAT_FWD)).get(&key, 0).is_ok(),
            "a flow the old programs added during the migration was not carried over at the swap"
        );
        new.attach("mgc", AttachMode::Auto).unwrap();
        new.finish_migration().unwrap();
        assert!(!aside.exists());
        meshnet::datapath::detach_interface(&pins, "mga", None);
        meshnet::datapath::detach_interface(&pins, "mgc", None);
    });
}

/// An agent killed halfway through a migration leaves the map it started from under
/// `<name>_migrating`; when the next one needs yet another layout (here a larger
/// `nat.maxFlows`), it moves the half-migrated map aside as well, carries over the flows of
/// both, and of a flow both hold keeps the entry seen last.
#[test]
fn a_migration_cut_short_is_finished_by_an_agent_that_needs_another_layout() {
    use meshnet_common::{names, FlowKey, NatFwd};
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &[]);
    let mut held = Held::open(&t, app_a());
    held.exchange("before");
    assert!(agent.child.stop());

    // What the cut-short migration started from: a flow map holding a flow no packet will
    // touch, and the real flow as the old programs went on stamping it after the cut-short
    // agent had copied it (seen later), under the name an agent moves a map aside to.
    let maps = t.pin_path().join("maps");
    let real = open_hash::<FlowKey, NatFwd>(&maps.join(names::NAT_FWD)).iter().next().unwrap().unwrap();
    let planted_key = FlowKey { sport_be: 1234u16.to_be(), ..real.0 };
    let aside = maps.join(format!("{}_migrating", names::NAT_FWD));
    let value = u32::try_from(size_of::<NatFwd>()).unwrap();
    meshnet_tests::raw_bpf::create_pinned(&aside, meshnet_tests::raw_bpf::HASH, 16, value, 65_536, 1);
    let mut old = open_hash::<FlowKey, NatFwd>(&aside);
    old.insert(planted_key, NatFwd { nat_sport_be: 1234u16.to_be(), ..real.1 }, 0).unwrap();
    let later = NatFwd { last_seen_ns: real.1.last_seen_ns + 1_000_000, ..real.1 };
    old.insert(real.0, later, 0).unwrap();

    let bigger = format!("{cfg}nat:\n  maxFlows: 131072\n");
    let mut agent = start(&t, &bigger, &[]);
    assert_eq!(aya::maps::MapInfo::from_pin(maps.join(names::NAT_FWD)).unwrap().max_entries(), 131_072);
    let second = meshnet::migrate::migrating_names(names::NAT_FWD)[1].clone();
    let log = agent.child.output();
    assert!(log.contains(&second), "the half-migrated map was not moved aside as {second}:\n{log}");
    let kept = open_hash::<FlowKey, NatFwd>(&maps.join(names::NAT_FWD));
    assert!(kept.get(&planted_key, 0).is_ok(), "the planted flow was lost");
    assert_eq!(kept.get(&real.0, 0).unwrap().last_seen_ns, later.last_seen_ns, "the copy of the flow seen earlier won");
    for n in meshnet::migrate::migrating_names(names::NAT_FWD) {
        assert!(!maps.join(&n).exists(), "{n} still pinned");
    }
    held.exchange("after");
    assert!(agent.child.stop(), "{}", agent.child.output());
}

/// Counters are moved when their map migrates, not copied: an agent killed after its first
/// pass (an older build's map of fewer counters moved aside, its counts added to the new
/// map) leaves nothing there that the agent finishing the job would add a second time.
#[test]
fn a_counter_migration_cut_short_counts_nothing_twice() {
    use aya::maps::{MapData, PerCpuArray, PerCpuValues};
    use meshnet_common::{limits, names, Counter};
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &[]);
    assert!(agent.child.stop());

    let maps = t.pin_path().join("maps");
    let home = maps.join(names::STATS);
    let counters = |path: &std::path::Path| PerCpuArray::<_, u64>::try_from(aya::maps::Map::from_map_data(MapData::from_pin(path).unwrap()).unwrap()).unwrap();
    // An older build's counter map: 17 counters, with counts on two CPUs.
    std::fs::remove_file(&home).unwrap();
    meshnet_tests::raw_bpf::create_pinned(&home, meshnet_tests::raw_bpf::PERCPU_ARRAY, 4, 8, 17, 0);
    let cpus = aya::util::nr_cpus().unwrap();
    let per_cpu = |first: u64, last: u64| {
        let mut v = vec![0u64; cpus];
        v[0] += first;
        v[cpus - 1] += last;
        PerCpuValues::try_from(v).unwrap()
    };
    let mut old = counters(&home);
    // Slot 0: `redirected`, retired when flow events replaced per-packet counts.
    old.set(Counter::RETIRED[0], per_cpu(7, 5), 0).unwrap();
    old.set(Counter::PortRemap as u32, per_cpu(3, 0), 0).unwrap();
    drop(old);

    // The cut-short agent: it moved the map aside, created its own and ran the first pass.
    let pins = meshnet::pins::Pins::new(t.pin_path());
    let migration = meshnet::migrate::Migration::prepare(&pins, limits::DEFAULT_NAT_ENTRIES).unwrap();
    let aside = maps.join(meshnet::migrate::migrating_name(names::STATS));
    assert!(aside.exists() && !home.exists());
    meshnet_tests::raw_bpf::create_pinned(&home, meshnet_tests::raw_bpf::PERCPU_ARRAY, 4, 8, Counter::COUNT, 0);
    migration.copy(&pins, true).unwrap();
    drop(migration);

    let _agent = start(&t, &cfg, &[]);
    assert!(!aside.exists(), "the moved-aside counter map is still pinned");
    let stats = &t.dump_json("stats")["stats"];
    assert_eq!(stats["port_remap"], 3, "{stats}");
    // The retired slot's per-packet total is neither shown nor taken for flows.
    assert_eq!(stats["flow_opened"].as_u64().unwrap_or(0), 0, "{stats}");
    assert!(stats.get("redirected").is_none(), "{stats}");
}

/// Runs an agent that should refuse to start; one that starts instead is killed after a
/// minute (its output then lacks the refusal the caller looks for).
fn refused_start(t: &Topology, cfg_path: &std::path::Path) -> std::process::Output {
    std::process::Command::new("timeout")
        .args(["--signal=KILL", "60", "nsenter"])
        .args(Agent::argv(&t.node1, cfg_path, &t.pin_path(), &[])[1..].iter())
        .output()
        .unwrap()
}

/// Old flow maps that fit in the new one each on its own but not together (a migration cut
/// short, then a smaller table), or a nat.maxFlows lowered below the flows the maps hold: no
/// flow is dropped for want of room, and the agent still starts (without it no GC, clock,
/// probe or new pod's programs): the flow maps get room for every flow and nat.maxFlows
/// more, and the log says to raise nat.maxFlows.
#[test]
fn flow_maps_too_small_for_their_flows_grow_to_hold_them_and_the_agent_starts() {
    use meshnet_common::{names, FlowKey, NatFwd};
    let t = Topology::new(Options::default());
    // No GC while the flows are counted: the planted ones copy a closed flow's state.
    let sized = |n: u32| format!("{}nat:\n  maxFlows: {n}\n  gcIntervalSeconds: 3600\n", node1_config(POD_INTERFACES));
    let mut agent = start(&t, &sized(1024), &[]);
    assert_eq!(request(&t, app_a(), "one"), "app 10.245.0.20:8080 got one");
    assert!(agent.child.stop());

    let maps = t.pin_path().join("maps");
    let mut home = open_hash::<FlowKey, NatFwd>(&maps.join(names::NAT_FWD));
    let real = home.iter().next().unwrap().unwrap();
    for i in 0..600u16 {
        home.insert(FlowKey { sport_be: (10_000 + i).to_be(), ..real.0 }, real.1, 0).unwrap();
    }
    let aside = maps.join(format!("{}_migrating", names::NAT_FWD));
    let value = u32::try_from(size_of::<NatFwd>()).unwrap();
    meshnet_tests::raw_bpf::create_pinned(&aside, meshnet_tests::raw_bpf::HASH, 16, value, 1024, 1);
    let mut old = open_hash::<FlowKey, NatFwd>(&aside);
    for i in 0..600u16 {
        old.insert(FlowKey { sport_be: (20_000 + i).to_be(), ..real.0 }, real.1, 0).unwrap();
    }
    let before = home.keys().count();
    let together = before + 600;
    let max_entries = |t: &Topology| aya::maps::MapInfo::from_pin(t.pin_path().join("maps").join(names::NAT_FWD)).unwrap().max_entries();

    // Another size, so the map at home must move aside too: 1,201 flows for 1,025 entries.
    let mut agent = start(&t, &sized(1025), &[]);
    let said = format!("raise nat.maxFlows to at least {together}");
    let logged = poll(WAIT, || agent.child.output().contains(&said).then_some(()));
    assert!(logged.is_some(), "no word of the too small nat.maxFlows: {}", agent.child.output());
    let finished = poll(WAIT, || (!aside.exists()).then_some(()));
    assert!(finished.is_some(), "the migration cut short was not finished: {}", agent.child.output());
    let size = u32::try_from(together).unwrap() + 1025;
    assert_eq!(max_entries(&t), size);
    let home = open_hash::<FlowKey, NatFwd>(&maps.join(names::NAT_FWD));
    assert_eq!(home.keys().count(), together, "flows were dropped for want of room");
    assert_eq!(request(&t, app_a(), "two"), "app 10.245.0.20:8080 got two");
    assert!(agent.child.stop());

    // Lowered below what the maps hold (the request above added a flow): they are kept as
    // they are.
    let mut agent = start(&t, &sized(1024), &[]);
    let said = format!("they get {size} entries, so that none is dropped");
    let logged = poll(WAIT, || agent.child.output().contains(&said).then_some(()));
    assert!(logged.is_some(), "no word of the too small nat.maxFlows: {}", agent.child.output());
    assert_eq!(max_entries(&t), size, "the flow maps were resized below their flows");
    assert!(open_hash::<FlowKey, NatFwd>(&maps.join(names::NAT_FWD)).keys().count() >= together);
    assert!(agent.child.stop());
}

/// A larger nat.maxFlows takes effect at the next restart, which moves every flow into maps
/// of the new size: no detach, and a held connection keeps working. A pinned flow map this
/// build cannot convert is refused, and left as it is.
#[test]
fn max_flows_grows_without_a_detach_and_an_unknown_map_is_refused() {
    use meshnet_common::{names, FlowKey, NatRev, FLOW_UNANSWERED};
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &[]);
    let mut held = Held::open(&t, app_a());
    held.exchange("small table");
    let before = nat(&t);
    assert!(agent.child.stop());
    // Every flow marked unanswered, as a downgrade leaves one this build opened and an earlier
    // release answered (its replies never clear the mark): carried over, each counts as
    // answered, or the held connection would expire once idle for a minute.
    let mut revs = open_hash::<FlowKey, NatRev>(&t.pin_path().join("maps").join(names::NAT_REV));
    let keys: Vec<FlowKey> = revs.keys().map(Result::unwrap).collect();
    assert!(!keys.is_empty());
    for k in keys {
        let v = revs.get(&k, 0).unwrap();
        revs.insert(k, NatRev { flags: v.flags | FLOW_UNANSWERED, ..v }, 0).unwrap();
    }
    drop(revs);

    let bigger = format!("{cfg}nat:\n  maxFlows: 131072\n");
    let mut agent = start(&t, &bigger, &[]);
    let path = t.pin_path().join("maps").join(names::NAT_FWD);
    let info = aya::maps::MapInfo::from_pin(&path).unwrap();
    assert_eq!(info.max_entries(), 131_072);
    assert!(!t.pin_path().join("maps").join(format!("{}_migrating", names::NAT_FWD)).exists());
    assert_eq!(nat(&t).len(), before.len(), "flows lost in the resize: {:?}", nat(&t));
    assert!(nat(&t).iter().all(|f| f["unanswered"] == false), "a carried-over flow counts as unanswered: {:?}", nat(&t));
    held.exchange("big table");
    assert!(agent.child.stop());

    // A map of an unknown layout where the reverse flow map belongs.
    let rev = t.pin_path().join("maps").join(names::NAT_REV);
    std::fs::remove_file(&rev).unwrap();
    meshnet_tests::raw_bpf::create_pinned(&rev, meshnet_tests::raw_bpf::HASH, 16, 8, 1024, 0);
    let cfg_path = t.write_config(&bigger);
    let out = refused_start(&t, &cfg_path);
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the agent accepted a map it cannot use: {text}");
    assert!(text.contains("cannot be used by this build") && text.contains(names::NAT_REV), "{text}");
    assert_eq!(aya::maps::MapInfo::from_pin(&rev).unwrap().value_size(), 8, "the refused map was replaced");
}

/// The flow table filled to 150 % of `nat.maxFlows` with new flows while 100 TCP
/// connections are held: every held connection keeps working, the new flows past the
/// table's size are refused and counted, and doctor warns.
#[test]
fn a_full_flow_table_refuses_new_flows_and_held_connections_live_on() {
    const MAX: usize = 1024;
    const HELD: usize = 100;
    let t = Topology::new(Options::default());
    // The fill is never answered: a long unanswered timeout keeps the GC from making room
    // while the counts are checked.
    let cfg = format!("{}nat:\n  maxFlows: {MAX}\n  unansweredTimeoutSeconds: 3600\n", node1_config(POD_INTERFACES));
    let _agent = start(&t, &cfg, &[]);
    let mut held: Vec<Held> = (0..HELD).map(|i| Held::open(&t, if i % 2 == 0 { app_a() } else { app_b() })).collect();
    for (i, h) in held.iter_mut().enumerate() {
        h.exchange(&format!("hello {i}"));
    }
    // New UDP flows, one datagram each from its own port, to 150 % of the table.
    let new = MAX * 3 / 2;
    t.client.run(move || {
        for i in 0..new {
            let port = 20_000 + u16::try_from(i).unwrap();
            let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            s.send_to(b"fill", app_a()).unwrap();
        }
    });
    let refused = HELD + new - MAX;
    let counted = poll(WAIT, || (t.counter("nat_table_full") >= refused as u64).then_some(()));
    assert!(counted.is_some(), "nat_table_full is {}, expected {refused}", t.counter("nat_table_full"));
    assert_eq!(t.counter("nat_table_full"), refused as u64);
    assert_eq!(nat(&t).len(), MAX);
    for (i, h) in held.iter_mut().enumerate() {
        h.exchange(&format!("still here {i}"));
    }
    let doctor = t.meshnet("doctor");
    assert!(doctor.stdout.contains("flow table") && doctor.stdout.contains("nat_table_full"), "{}", doctor.stdout);
}

/// A 1 MB transfer from a pod to a remote pod across a LAN whose MTU (1400) is smaller than
/// the pods' (1500), with DF set: node1 answers the first full-size segment with
/// "fragmentation needed" quoting the translated packet, meshnet translates the quote back,
/// and the pod's PMTU discovery shrinks its segments. Without that the transfer stalls.
#[test]
fn pmtu_discovery_works_through_a_smaller_mtu_lan() {
    use std::io::BufRead as _;
    let t = Topology::new(Options::default());
    t.node1.ip("link set lan0 mtu 1400");
    t.node2.ip("link set lan0 mtu 1400");
    let _agent = start(&t, &node1_config(POD_INTERFACES), &[]);
    let target = app_a();
    let before = t.counter("icmp_error_translated");
    let reply = t.client.run(move || {
        let mut s = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        writeln!(s, "TO {target}").unwrap();
        let msg = "x".repeat(1 << 20);
        s.write_all(msg.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line
    });
    assert_eq!(reply.len(), format!("app {target} got \n").len() + (1 << 20), "the 1 MB echo came back short");
    assert!(t.counter("icmp_error_translated") > before, "no ICMP error was translated: PMTU discovery did not run");
}

/// A gateway NodePort that nobody serves: TCP is refused at once (the node's RST is restored
/// like any reply), and UDP gets the node's "port unreachable" translated back, so the pod's
/// connected socket sees ECONNREFUSED instead of waiting for a timeout.
#[test]
fn an_unserved_nodeport_fails_fast_with_the_pod_seeing_the_unreachable() {
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES)
        .replace(&format!("port: {}", topo::NODEPORT_TCP), "port: 31698")
        .replace(&format!("udpPort: {}", topo::NODEPORT_UDP), "udpPort: 31699")
        + "health:\n  enabled: false\n";
    let _agent = start(&t, &cfg, &[]);
    let target = app_a();
    let tcp = t.client.run(move || TcpStream::connect_timeout(&target.into(), IO_TIMEOUT).map(|_| ()));
    assert_eq!(tcp.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
    let before = t.counter("icmp_error_translated");
    let udp = t.client.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.connect(target).unwrap();
        s.send(b"anyone?").unwrap();
        let mut buf = [0u8; 64];
        s.recv(&mut buf).map(|_| ())
    });
    assert_eq!(udp.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(t.counter("icmp_error_translated"), before + 1);
}

/// 8 KB UDP datagrams, fragmented on the way out and on the way back, cross both ways.
#[test]
fn large_udp_datagrams_cross_both_ways_fragmented() {
    let t = Topology::new(Options::default());
    let _agent = start(&t, &node1_config(POD_INTERFACES), &[]);
    let target = app_a();
    let msg = "u".repeat(8192);
    let m = msg.clone();
    let reply = t.client.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.send_to(format!("TO {target}\n{m}").as_bytes(), target).unwrap();
        let mut buf = vec![0u8; 65_536];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        assert_eq!(from, std::net::SocketAddr::V4(target), "the reply's source was not restored");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    });
    assert_eq!(reply, format!("app {target} got {msg}"));
    assert!(t.counter("fragment_translated") >= 10, "the datagrams were not fragmented: {}", t.counter("fragment_translated"));
    assert_eq!(t.counter("fragment_dropped"), 0);
}

/// `MESHNET_SOAK=TCP,UDP,RESTARTS` scales the soak below; the VMs run `100,20,4`.
fn soak_scale() -> (usize, usize, usize) {
    let v: Vec<usize> = std::env::var("MESHNET_SOAK")
        .unwrap_or_else(|_| "1000,200,20".into())
        .split(',')
        .map(|n| n.trim().parse().expect("MESHNET_SOAK is TCP,UDP,RESTARTS"))
        .collect();
    assert_eq!(v.len(), 3, "MESHNET_SOAK is TCP,UDP,RESTARTS");
    (v[0], v[1], v[2])
}

/// Every socket of the soak is an fd here, several times over (client, gateway relay, app).
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

/// Each flow as the datapath holds it: pod, remote, gateway and remapped port.
fn flow_set(t: &Topology) -> std::collections::BTreeSet<String> {
    nat(t).iter().map(|f| format!("{} {} -> {} via {} port {}", f["proto"], f["pod"], f["remote"], f["gateway"], f["natPort"])).collect()
}

/// 1,000 TCP connections and 200 UDP flows held through 20 agent restarts (10 ended by
/// SIGTERM, 10 by SIGKILL) and then an upgrade from an older build's map layout. While the
/// agent is down and after each start, every connection exchanges a line and every UDP flow
/// gets its reply from the remote pod it addressed: 0 resets, 0 lost replies, and each flow
/// keeps its gateway and port throughout.
#[test]
fn held_flows_survive_twenty_restarts_and_an_upgrade() {
    use meshnet_common::{names, FlowKey, NatFwd};
    let (n_tcp, n_udp, restarts) = soak_scale();
    raise_open_files_limit();
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES);
    let target = |i: usize| if i % 2 == 0 { app_a() } else { app_b() };
    let mut agent = start(&t, &cfg, &[]);
    let mut tcp: Vec<Held> = (0..n_tcp).map(|i| Held::open(&t, target(i))).collect();
    let udp: Vec<(UdpSocket, SocketAddrV4)> = t.client.run(move || {
        (0..n_udp).map(|i| (UdpSocket::bind("0.0.0.0:0").unwrap(), target(i))).collect()
    });
    let started = std::time::Instant::now();
    let mut exchange_all = |when: &str| {
        eprintln!("{:>7.1}s: exchanges {when}", started.elapsed().as_secs_f64());
        for (i, h) in tcp.iter_mut().enumerate() {
            h.exchange(&format!("{when} {i}"));
        }
        for (i, (s, to)) in udp.iter().enumerate() {
            let msg = format!("{when} {i}");
            let (reply, from) = peer::udp_request(s, *to, &msg).unwrap_or_else(|e| panic!("UDP flow {i} lost its reply {when}: {e}"));
            assert_eq!((reply, from), (format!("app {to} got {msg}"), std::net::SocketAddr::V4(*to)), "UDP flow {i} {when}");
        }
    };
    exchange_all("at the start");
    let flows = flow_set(&t);
    assert_eq!(flows.len(), n_tcp + n_udp, "{flows:?}");
    for r in 0..restarts {
        if r % 2 == 0 {
            assert!(agent.child.stop(), "the agent did not stop cleanly on SIGTERM");
        } else {
            agent.child.signal(Signal::SIGKILL);
            drop(agent);
        }
        exchange_all(&format!("with the agent down ({r})"));
        agent = start(&t, &cfg, &[]);
        exchange_all(&format!("after restart {r}"));
        assert_eq!(flow_set(&t), flows, "flows changed across restart {r}");
    }

    // An upgrade: the pins as an older build (LRU flow maps of the v1 layout) leaves them,
    // plus a flow no packet touches, which only the migration can carry over.
    assert!(agent.child.stop());
    let real = open_hash::<FlowKey, NatFwd>(&t.pin_path().join("maps").join(names::NAT_FWD)).iter().next().unwrap().unwrap();
    downgrade_pins(&t, (FlowKey { sport_be: 1234u16.to_be(), ..real.0 }, NatFwd { nat_sport_be: 1234u16.to_be(), ..real.1 }));
    let _agent = start(&t, &cfg, &[]);
    exchange_all("after the upgrade");
    let after = flow_set(&t);
    assert!(flows.is_subset(&after) && after.len() == flows.len() + 1, "flows changed across the upgrade");
    for c in ["nat_table_full", "nat_insert_failed", "fwd_restored", "rewrite_failed"] {
        assert_eq!(t.counter(c), 0, "{c}");
    }
}

// ---------------------------------------------------------------------------------------
// Other tools' programs on the same hooks
// ---------------------------------------------------------------------------------------

/// Another tool's program on the client pod's hook, attached before meshnet's and after it
/// (netlink: priorities 1 and 65000 around meshnet's; tcx: first and last). Through
/// meshnet's start, its restart and `meshnet detach`, both stay attached and keep running,
/// and meshnet translates with them there; detach removes only meshnet's own.
fn foreign_programs_keep_working(mode: &str) {
    use aya::programs::{
        tc::{NlOptions, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    };
    let t = Topology::new(Options::default());
    // Run counts are kept only while someone asks for them, which kernels before 5.8 cannot:
    // there the test checks that the programs stay attached around meshnet's, not that they run.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime);
    if stats.is_err() {
        assert!(!meshnet_tests::kernel_at_least(5, 8), "BPF_ENABLE_STATS: {stats:?}");
        println!("note: no run counts before 5.8 (BPF_ENABLE_STATS): the foreign programs' runs are not checked");
    }
    let counted = stats.is_ok();
    // Two instances: tcx refuses the same program twice on one hook.
    let pins = [t.pin_path().with_file_name("foreign_first"), t.pin_path().with_file_name("foreign_last")];
    for pin in &pins {
        meshnet_tests::raw_bpf::load_pinned_pass_program(pin);
    }
    let tcx = mode == "tcx";
    let foreign: Vec<SchedClassifier> = t.node1.run(move || {
        [(1, LinkOrder::first(), &pins[0]), (65000, LinkOrder::last(), &pins[1])]
            .into_iter()
            .map(|(priority, order, pin)| {
                let mut p = SchedClassifier::from_pin(pin).unwrap();
                let opts = if tcx { TcAttachOptions::TcxOrder(order) } else { TcAttachOptions::Netlink(NlOptions { priority, ..Default::default() }) };
                if !tcx {
                    let _ = aya::programs::tc::qdisc_add_clsact("vethc");
                }
                p.attach_with_options("vethc", TcAttachType::Ingress, opts).unwrap();
                p
            })
            .collect()
    });
    let runs = |foreign: &[SchedClassifier]| -> Vec<u64> {
        if counted {
            foreign.iter().map(|p| p.info().unwrap().run_count()).collect()
        } else {
            Vec::new()
        }
    };
    let on_hook = |t: &Topology| -> usize {
        if tcx {
            t.node1.run(|| SchedClassifier::query_tcx("vethc", TcAttachType::Ingress).unwrap().1.iter().filter(|p| p.name_as_str() == Some("foreign_pass")).count())
        } else {
            t.node1.exec("tc filter show dev vethc ingress").lines().filter(|l| l.contains("foreign_pass")).count()
        }
    };
    assert_eq!(on_hook(&t), 2);

    let cfg = node1_config(POD_INTERFACES);
    let mut agent = start(&t, &cfg, &["--attach-mode", mode]);
    let mut held = Held::open(&t, app_a());
    held.exchange("with foreign programs");
    let before = runs(&foreign);
    assert_eq!(request(&t, app_b(), "translated"), "app 10.245.0.21:8080 got translated");
    let after = runs(&foreign);
    assert!(!counted || after[0] > before[0], "the program before meshnet's stopped running: {before:?} -> {after:?}");
    assert!(meshnet_on(&t, "vethc") && on_hook(&t) == 2);

    assert!(agent.child.stop());
    let _agent = start(&t, &cfg, &["--attach-mode", mode]);
    held.exchange("after a restart");
    assert_eq!(on_hook(&t), 2, "a restart touched the other tool's programs");
    drop(_agent);

    let out = t.meshnet("detach");
    assert!(out.ok, "{out:?}");
    assert!(!meshnet_on(&t, "vethc"), "meshnet still attached after detach");
    assert_eq!(on_hook(&t), 2, "detach removed the other tool's programs");
    // Both still run on what the pod sends, with meshnet gone.
    let before = runs(&foreign);
    t.client.run(|| UdpSocket::bind("0.0.0.0:0").unwrap().send_to(b"anyone?", "10.244.0.1:9").unwrap());
    // Polled: the veth hands the packet to a softirq, which a loaded machine defers.
    let ran = poll(WAIT, || (!counted || runs(&foreign).iter().zip(&before).all(|(a, b)| a > b)).then_some(()));
    assert!(ran.is_some(), "a foreign program stopped running after detach: {before:?} -> {:?}", runs(&foreign));
}

#[test]
fn foreign_programs_keep_working_netlink() {
    foreign_programs_keep_working("netlink");
}

#[test]
fn foreign_programs_keep_working_tcx() {
    if !skip_unless_tcx() {
        return;
    }
    foreign_programs_keep_working("tcx");
}

/// `cmd` run as uid 65534 (nobody), as a local user without any of root's rights.
fn as_nobody(cmd: &str) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", cmd]);
    c
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A pin directory another user made before the agent (a bpffs mounted without `mode=` lets
/// anyone create it): theirs, a subdirectory open to everyone's writes, or a symlink to a
/// directory of theirs. The agent refuses each, says why and how to fix it, and pins nothing
/// there. An older agent's (0755, root's), or a root that is root's but open to writes (a
/// bpffs mounted there is 1777), is kept and closed to other users.
#[test]
fn a_pin_directory_another_user_could_change_is_refused() {
    use std::os::unix::fs::{chown, symlink, PermissionsExt as _};
    let t = Topology::new(Options::default());
    let cfg = t.write_config(&node1_config(POD_INTERFACES));
    let root = t.pin_path();
    let theirs = root.with_file_name("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let shown = root.display().to_string();
    let cases: [(&str, &dyn Fn(), String); 3] = [
        (
            "owned by nobody",
            &|| chown(&root, Some(65534), Some(65534)).unwrap(),
            format!("{shown} is owned by uid 65534, not by the agent's (0)"),
        ),
        (
            "maps/ with mode 0777",
            &|| {
                std::fs::create_dir(root.join("maps")).unwrap();
                std::fs::set_permissions(root.join("maps"), std::fs::Permissions::from_mode(0o777)).unwrap();
            },
            format!("{shown}/maps has mode 777"),
        ),
        (
            "a symlink",
            &|| {
                std::fs::remove_dir(&root).unwrap();
                symlink(&theirs, &root).unwrap();
            },
            format!("{shown} is a symlink (to {})", theirs.display()),
        ),
    ];
    for (what, make, says) in cases {
        std::fs::create_dir(&root).unwrap();
        make();
        let out = refused_start(&t, &cfg);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the agent started:\n{stderr}");
        let fixed = stderr.contains("refuses to pin there") && stderr.contains("rm -r ");
        assert!(stderr.contains(&says) && fixed, "{what}:\n{stderr}");
        let inside = std::fs::read_dir(&root).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "maps").count();
        assert_eq!(inside, 0, "{what}: the agent created something in it");
        if root.join("maps").is_dir() {
            assert_eq!(std::fs::read_dir(root.join("maps")).unwrap().count(), 0, "{what}: the agent pinned into it");
            std::fs::remove_dir(root.join("maps")).unwrap();
        }
        let _ = std::fs::remove_file(&root).or_else(|_| std::fs::remove_dir(&root));
    }
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);

    // As an older agent (or the kubelet's DirectoryOrCreate) left it, under a root that is
    // root's but open to writes, as a bpffs mounted there is.
    std::fs::create_dir_all(root.join("maps")).unwrap();
    std::fs::set_permissions(root.join("maps"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let _agent = Agent::start(&t.node1, &cfg, &root, &[]);
    for d in ["", "maps", "links", "lock"] {
        assert_eq!(mode_of(&root.join(d)), 0o700, "{}/{d}", root.display());
    }
    let doctor = t.meshnet("doctor");
    assert!(doctor.stdout.contains(&format!("OK    pin directory: {shown} is closed to other users (mode 700)")), "{doctor:?}");
}

/// The lock agents before this version take (on the pin directory itself) is required: its
/// holder cannot be told from an older agent, which must never run beside this one. A local
/// user who opened the directory while others could (the kubelet creates it 0755) and holds
/// that lock keeps the agent waiting, as an older agent would; once the agent runs, no such
/// user can open the directory, or the lock the agent holds, at all.
#[test]
fn the_old_lock_is_required_and_no_user_can_take_it_once_the_agent_ran() {
    use std::os::unix::fs::PermissionsExt as _;
    let t = Topology::new(Options::default());
    let root = t.pin_path();
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shown = root.display().to_string();
    // The lock stays with the open directory, which `sleep` inherits under the same pid.
    let mut holder =
        meshnet_tests::ChildGuard::spawn(&mut as_nobody(&format!("exec 9<{shown} && flock -n 9 && echo locked && exec sleep 600")));
    holder.wait_for_line("locked", WAIT);

    let cfg = t.write_config(&node1_config(POD_INTERFACES));
    let argv = Agent::argv(&t.node1, &cfg, &root, &["--lock-wait-seconds", "1"]);
    let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("another meshnet agent"), "an agent ran beside the old lock's holder: {stderr}");
    assert!(!meshnet_on(&t, "vethc"), "the refused agent attached");
    drop(holder);

    let _agent = Agent::start(&t.node1, &cfg, &root, &[]);
    let mut held = Held::open(&t, app_a());
    held.exchange("once the old lock was free");
    assert_eq!(mode_of(&root), 0o700);
    for dir in [root.clone(), root.join("lock")] {
        let out = as_nobody(&format!("flock -n {} true", dir.display())).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("Permission denied"), "{}: {stderr}", dir.display());
    }
    // The agent's own lock still keeps a second agent out.
    let argv = Agent::argv(&t.node1, &cfg, &root, &["--lock-wait-seconds", "1"]);
    let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("another meshnet agent"), "{out:?}");
    held.exchange("after the second agent");
}

/// A tcx link pinned among meshnet's whose program is not meshnet's (pinned there by someone
/// who could write to the directory, or another tool): `detach` removes meshnet's links,
/// leaves that one pinned and attached, and says so.
#[test]
fn detach_leaves_a_link_that_is_not_meshnets() {
    use aya::programs::{links::FdLink, tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
    if !skip_unless_tcx() {
        return;
    }
    let t = Topology::new(Options::default());
    let agent = start(&t, &node1_config(POD_INTERFACES), &["--attach-mode", "tcx"]);
    drop(agent);
    assert!(meshnet_on(&t, "vethc"));
    let prog = t.pin_path().with_file_name("foreign_prog");
    meshnet_tests::raw_bpf::load_pinned_pass_program(&prog);
    let link = t.pin_path().join("links/foreign@ingress");
    let pin = link.clone();
    t.node1.run(move || {
        let mut p = SchedClassifier::from_pin(&prog).unwrap();
        let id = p.attach_with_options("vethc", TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default())).unwrap();
        let fd: FdLink = p.take_link(id).unwrap().try_into().unwrap();
        fd.pin(&pin).unwrap();
    });
    let foreign_on = |t: &Topology| {
        t.node1.run(|| {
            let (_, progs) = SchedClassifier::query_tcx("vethc", TcAttachType::Ingress).unwrap();
            progs.iter().any(|p| p.name_as_str() == Some("foreign_pass"))
        })
    };
    assert!(foreign_on(&t));

    let out = t.meshnet("detach");
    assert!(out.ok, "{out:?}");
    assert!(out.stdout.contains(&format!("left {}: a link of program foreign_pass, not meshnet's", link.display())), "{out:?}");
    assert!(link.exists(), "detach unpinned another program's link");
    // bpffs lets go of an unpinned object after an RCU grace period, not at the unlink.
    let gone = poll(WAIT, || (!meshnet_on(&t, "vethc")).then_some(()));
    assert!(gone.is_some(), "meshnet still attached after detach: {out:?}");
    assert!(foreign_on(&t), "detach detached another program's link");
}

/// Publishes cluster2 as the standard config has it, but with the pod CIDRs `cidrs` (a YAML
/// flow list's items), as `meshnet controller` writes `meshnet-peers`, into `api`.
fn publish(api: &meshnet_tests::fakeapi::FakeApi, cidrs: &str) {
    let peers = format!(
        "- name: cluster2\n  podCIDRs: [{cidrs}]\n  gateways: [{{address: {}, port: {}, udpPort: {}}}]\n",
        topo::NODE2_LAN,
        topo::NODEPORT_TCP,
        topo::NODEPORT_UDP
    );
    api.apply(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "meshnet-peers", "namespace": "meshnet"},
        "data": {"peers.yaml": peers, "status.yaml": "{}\n"}
    }));
}

/// An address of the node inside a published peer's pod CIDR (a Service's `externalIPs` entry,
/// which kube-proxy in IPVS mode binds on every node) withdraws nothing the maps already hold
/// for the peer: not at a reload, a publish or a restart, and a connection held through it
/// keeps working with its flow. A new claim over a node address is still refused.
#[test]
fn a_local_address_in_a_published_peers_cidr_breaks_no_flow() {
    let t = Topology::new(Options::default());
    let api = meshnet_tests::fakeapi::FakeApi::start(Some(&t.node1.path()));
    api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "meshnet"}, "status": {"phase": "Active"}}));
    api.apply(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node1"},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": topo::NODE1_LAN}]}
    }));
    publish(&api, "10.245.0.0/16");
    let kubeconfig = t.dir.0.join("kubeconfig.yaml");
    std::fs::write(&kubeconfig, api.kubeconfig("cluster1")).unwrap();
    let kc = kubeconfig.display().to_string();
    let args = ["--kube", "--kubeconfig", &kc, "--node-name", "node1"];
    let cfg = node1_config(POD_INTERFACES);
    let cfg = cfg.split("peers:").next().unwrap().to_string() + "peers: []\n";
    let mut agent = start(&t, &cfg, &args);
    let want = vec![("10.245.0.0/16".to_string(), "cluster2".to_string(), vec![format!("{}:{}", topo::NODE2_LAN, topo::NODEPORT_TCP)])];
    let applied = poll(WAIT, || (routes(&t) == want).then_some(()));
    assert!(applied.is_some(), "the published peer never applied: {:?}\n{}", routes(&t), agent.child.output());
    let mut held = Held::open(&t, app_a());
    held.exchange("before");
    let flows = |t: &Topology| nat(t).into_iter().filter(|f| f["remote"] == "10.245.0.20:8080").count();
    assert_eq!(flows(&t), 1, "{:?}", nat(&t));

    // The address appears on node1 (never the host's namespace), and the agent reloads.
    t.node1.ip("addr add 10.245.0.99/32 dev lo");
    agent.child.signal(Signal::SIGHUP);
    let line = agent.child.wait_for_line("covers 10.245.0.99, an address of this node", WAIT);
    assert!(line.contains("cluster2") && line.contains("10.245.0.0/16"), "{line}");
    agent.child.wait_for_line("config reloaded", WAIT);
    assert_eq!(routes(&t), want, "{}", agent.child.output());
    held.exchange("after the reload");
    assert_eq!(flows(&t), 1, "{:?}", nat(&t));

    // A publish that adds a range and a restart keep it too: what is held comes from the
    // pins. The added range shows when the publish is applied.
    publish(&api, "10.245.0.0/16, 10.247.0.0/16");
    let gw = vec![format!("{}:{}", topo::NODE2_LAN, topo::NODEPORT_TCP)];
    let want = vec![("10.245.0.0/16".to_string(), "cluster2".to_string(), gw.clone()), ("10.247.0.0/16".to_string(), "cluster2".to_string(), gw)];
    let applied = poll(WAIT, || (routes(&t) == want).then_some(()));
    assert!(applied.is_some(), "the publish was not applied whole: {:?}\n{}", routes(&t), agent.child.output());
    held.exchange("after a publish");
    assert!(agent.child.stop(), "{}", agent.child.output());
    held.exchange("agent stopped");
    let mut agent = start(&t, &cfg, &args);
    assert!(agent.child.output().contains("covers 10.245.0.99, an address of this node"), "{}", agent.child.output());
    assert_eq!(routes(&t), want, "{}", agent.child.output());
    held.exchange("agent restarted");
    assert_eq!(flows(&t), 1, "{:?}", nat(&t));

    // A new claim over an address of the node is refused; the peer keeps its last good state.
    t.node1.ip("addr add 10.250.0.1/32 dev lo");
    publish(&api, "10.245.0.0/16, 10.247.0.0/16, 10.250.0.0/16");
    let line = agent.child.wait_for_line("published peers: not applying", WAIT);
    assert!(line.contains("10.250.0.0/16 covers 10.250.0.1, an address of this node"), "{line}");
    assert_eq!(routes(&t), want);
    held.exchange("a new claim refused");
    assert_eq!(flows(&t), 1, "{:?}", nat(&t));
    assert!(agent.child.stop(), "{}", agent.child.output());
}
