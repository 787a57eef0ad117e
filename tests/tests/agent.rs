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
            write!(s, "TO {target}\n").unwrap();
            s
        });
        Self { s, target }
    }

    fn exchange(&mut self, msg: &str) -> String {
        writeln!(self.s, "{msg}").unwrap();
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

#[test]
fn reload_adds_changes_and_removes_peers() {
    let t = Topology::new(Options::default());
    // A second NodePort on node2 for the same gateway, to move cluster2's gateway to.
    t.node2.exec(&format!(
        "iptables -t nat -A PREROUTING -d {} -p tcp --dport 31999 -j DNAT --to-destination {}:{}",
        topo::NODE2_LAN,
        topo::GW_IP,
        topo::GW_PORT
    ));
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
    assert!(nat(&t).iter().all(|f| f["gateway"] != "192.0.2.2:31674"), "flows via the old port survived: {:?}", nat(&t));
    assert_eq!(request(&t, app_b(), "v2"), "app 10.245.0.21:8080 got v2");
    assert!(nat(&t).iter().any(|f| f["gateway"] == "192.0.2.2:31999"));

    // Remove cluster3 again.
    t.write_config(&node1_config(POD_INTERFACES).replace(&format!("port: {}", topo::NODEPORT_TCP), "port: 31999"));
    let removed = poll(WAIT, || routes(&t).iter().all(|r| r.1 != "cluster3").then_some(()));
    assert!(removed.is_some(), "cluster3 still routed: {:?}", routes(&t));
    assert_eq!(routes(&t).len(), 1);
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
    let t = Topology::new(Options { strict_checksums: true });
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
    // And forgotten when it goes.
    t.node1.ip("link del vethlate");
    agent.child.wait_for_line("no longer matching", WAIT);
}

#[test]
fn gateway_failover() {
    let t = Topology::new(Options::default());
    // cluster2 gets a second gateway address on node2, with the same NodePort rules.
    t.node2.ip("addr add 192.0.2.3/24 dev lan0");
    t.node2.exec(&format!(
        "iptables -t nat -A PREROUTING -d 192.0.2.3 -p tcp --dport {} -j DNAT --to-destination {}:{}",
        topo::NODEPORT_TCP,
        topo::GW_IP,
        topo::GW_PORT
    ));
    let cfg = node1_config(POD_INTERFACES).replace(
        "        udpPort: 31675\n",
        "        udpPort: 31675\n      - address: 192.0.2.3\n        port: 31674\n",
    ) + "health:\n  intervalSeconds: 1\n  timeoutMilliseconds: 300\n  failureThreshold: 1\n";
    let _agent = start(&t, &cfg, &[]);
    // Both gateways carry flows.
    for i in 0..16 {
        let target = if i % 2 == 0 { app_a() } else { app_b() };
        request(&t, target, &format!("warm {i}"));
    }
    let via: std::collections::BTreeSet<String> = nat(&t).iter().map(|f| f["gateway"].as_str().unwrap().to_string()).collect();
    assert_eq!(via.len(), 2, "flows did not spread over both gateways: {via:?}");

    // 192.0.2.3 dies.
    t.node2.exec("iptables -t raw -I PREROUTING -d 192.0.2.3 -j DROP");
    let down = poll(WAIT, || {
        routes(&t).iter().any(|r| r.2.contains(&"192.0.2.3:31674 down".to_string())).then_some(())
    });
    assert!(down.is_some(), "gateway never marked down: {:?}", routes(&t));
    assert!(nat(&t).iter().all(|f| f["gateway"] != "192.0.2.3:31674"), "flows pinned to the dead gateway were kept");
    for i in 0..16 {
        let target = if i % 2 == 0 { app_a() } else { app_b() };
        request(&t, target, &format!("after {i}"));
    }
    assert!(nat(&t).iter().all(|f| f["gateway"] == "192.0.2.2:31674"));

    // It comes back.
    t.node2.exec("iptables -t raw -D PREROUTING -d 192.0.2.3 -j DROP");
    let up = poll(WAIT, || routes(&t).iter().all(|r| r.2.iter().all(|g| !g.ends_with("down"))).then_some(()));
    assert!(up.is_some(), "gateway never came back: {:?}", routes(&t));
}

#[test]
fn idle_and_closed_flows_expire() {
    let t = Topology::new(Options::default());
    let cfg = node1_config(POD_INTERFACES)
        + "nat:\n  udpTimeoutSeconds: 1\n  tcpClosedTimeoutSeconds: 1\n  tcpTimeoutSeconds: 3600\n  gcIntervalSeconds: 1\n";
    let _agent = start(&t, &cfg, &[]);
    let mut held = Held::open(&t, app_b());
    held.exchange("keep me");
    t.client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        peer::udp_request(&s, app_a(), "expire me").unwrap()
    });
    assert_eq!(request(&t, app_a(), "closed"), "app 10.245.0.20:8080 got closed");
    assert_eq!(nat(&t).len(), 3);
    let expired = poll(WAIT, || (nat(&t).len() == 1).then_some(()));
    assert!(expired.is_some(), "idle UDP and closed TCP flows were not expired: {:?}", nat(&t));
    let left = nat(&t);
    assert_eq!(left[0]["remote"], "10.245.0.21:8080", "the open TCP flow must stay: {left:?}");
    assert_eq!(left[0]["state"], "established");
    held.exchange("still here");
}

fn http_get(t: &Topology, path: &str) -> String {
    let path = path.to_string();
    t.node1.run(move || {
        // The agent says "ready" once the datapath is; its metrics server binds on a task of
        // its own, which on a slow (emulated) machine can come a moment later.
        let addr = "127.0.0.1:9464".parse().unwrap();
        let mut s = poll(WAIT, || TcpStream::connect_timeout(&addr, IO_TIMEOUT).ok())
            .unwrap_or_else(|| panic!("nothing listens on {addr} within {WAIT:?}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
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
        "meshnet_datapath_packets_total{event=\"redirected\"}",
        "meshnet_map_entries{map=\"mn_routes_v1\"} 1",
        "meshnet_map_entries{map=\"mn_nat_fwd_v1\"} 1",
        "meshnet_gateway_up{peer=\"cluster2\",address=\"192.0.2.2\",port=\"31674\"} 1",
        "meshnet_last_sync_timestamp_seconds",
        "meshnet_attached_interfaces 2",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    let redirected: u64 = m
        .lines()
        .find(|l| l.starts_with("meshnet_datapath_packets_total{event=\"redirected\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(redirected >= 3, "{redirected}");
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
    let t = Topology::new(Options { strict_checksums: true });
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
