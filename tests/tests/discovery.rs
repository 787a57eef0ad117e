//! Kubernetes discovery end to end, against in-process API servers that speak the list and
//! watch protocol with the objects a 1.18 cluster returns: from the remote cluster's API
//! through `meshnet controller` into the published ConfigMap, and from there through
//! `meshnet agent --kube` into the datapath's maps.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use base64::Engine as _;
use meshnet_tests::{
    fakeapi::{FakeApi, Mode},
    meshnet, poll, require_root,
    topo::TempDir,
    Agent, Bpffs, ChildGuard, NetNs,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_mins(1);

fn namespace(name: &str, network: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"topology.istio.io/network": network}}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn node(name: &str, ip: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "node-role.kubernetes.io/master": ""}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kubeletVersion": "v1.18.2", "kernelVersion": "5.4.225-1.el7.elrepo.x86_64", "osImage": "CentOS Linux 7 (Core)", "containerRuntimeVersion": "docker://19.3.8"}
        }
    })
}

fn gateway_service(node_port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system", "labels": {"istio": "eastwestgateway"}},
        "spec": {
            "type": "NodePort", "externalTrafficPolicy": "Cluster", "clusterIP": "10.96.0.50",
            "selector": {"istio": "eastwestgateway"},
            "ports": [
                {"name": "status-port", "protocol": "TCP", "port": 15021, "targetPort": 15021, "nodePort": 30021},
                {"name": "tls", "protocol": "TCP", "port": 15443, "targetPort": 15443, "nodePort": node_port},
                {"name": "tls-istiod", "protocol": "TCP", "port": 15012, "targetPort": 15012, "nodePort": 30012}
            ]
        },
        "status": {"loadBalancer": {}}
    })
}

fn gateway_endpoints(pod_ip: &str, node_name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system"},
        "subsets": [{
            "addresses": [{"ip": pod_ip, "nodeName": node_name, "targetRef": {"kind": "Pod", "namespace": "istio-system", "name": "istio-eastwestgateway-5b8f7c9d4-x2x7q"}}],
            "ports": [{"name": "tls", "port": 15443, "protocol": "TCP"}, {"name": "status-port", "port": 15021, "protocol": "TCP"}]
        }]
    })
}

fn remote_secret(cluster: &str, kubeconfig: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": format!("istio-remote-secret-{cluster}"), "namespace": "istio-system",
            "labels": {"istio/multiCluster": "true"},
            "annotations": {"networking.istio.io/cluster": cluster}
        },
        "data": {cluster: base64::engine::general_purpose::STANDARD.encode(kubeconfig)}
    })
}

fn istio_configmap(mesh_networks: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system", "labels": {"istio.io/rev": "default"}},
        "data": {
            "mesh": "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  meshId: mesh1\n  proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: \"true\"\n    ISTIO_META_DNS_AUTO_ALLOCATE: \"true\"\ntrustDomain: cluster.local\n",
            "meshNetworks": mesh_networks
        }
    })
}

/// A cluster's objects: the Istio namespace with its network, one node, the gateway.
fn seed_cluster(api: &FakeApi, network: &str, node_name: &str, ip: &str, cidr: &str, node_port: u16, gw_pod: &str) {
    api.apply(namespace("istio-system", network));
    api.apply(namespace("meshnet", ""));
    api.apply(node(node_name, ip, cidr));
    api.apply(gateway_service(node_port));
    api.apply(gateway_endpoints(gw_pod, node_name));
}

/// One namespace that holds the API servers, the controller and an agent with a veth.
struct Mesh {
    ns: NetNs,
    local: FakeApi,
    remote: FakeApi,
    dir: TempDir,
    bpffs: Bpffs,
}

impl Mesh {
    fn new() -> Self {
        require_root();
        let ns = NetNs::new("kd");
        ns.ip("link add vethp type veth peer name vethq");
        ns.ip("link set vethp up");
        let local = FakeApi::start(Some(&ns.path()));
        let remote = FakeApi::start(Some(&ns.path()));
        seed_cluster(&local, "network1", "node1", "10.20.144.83", "10.244.0.0/24", 31674, "10.244.0.5");
        seed_cluster(&remote, "network2", "node2", "10.20.144.165", "10.245.0.0/24", 32361, "10.245.0.5");
        local.apply(istio_configmap(""));
        local.apply(remote_secret("cluster2", &remote.kubeconfig("cluster2")));
        let dir = TempDir::new();
        std::fs::write(dir.0.join("local.yaml"), local.kubeconfig("cluster1")).unwrap();
        // Health probes off: the gateway addresses are the seed's LAN addresses, which no
        // test may send traffic to.
        std::fs::write(
            dir.0.join("agent.yaml"),
            "cluster: cluster1\npodCIDRs: []\ninterfaces: [vethp]\npeers: []\nhealth: {enabled: false}\n",
        )
        .unwrap();
        Self { ns, local, remote, dir, bpffs: Bpffs::new() }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.0.join("local.yaml")
    }

    fn controller(&self, extra: &[&str]) -> ChildGuard {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path().display()))
            .arg(meshnet_tests::meshnet_bin())
            .args(["controller", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(["--probe-interval-seconds", "1", "--probe-timeout-seconds", "1"])
            .args(if extra.contains(&"--metrics-addr") { &[][..] } else { &["--metrics-addr", "127.0.0.1:9465"][..] })
            .args(extra)
            .env("MESHNET_LOG", "info");
        let mut c = ChildGuard::spawn(&mut cmd);
        c.wait_for_line("meshnet controller started", WAIT);
        c
    }

    fn agent(&self) -> Agent {
        self.agent_with(&[])
    }

    fn agent_with(&self, extra: &[&str]) -> Agent {
        let cfg = self.dir.0.join("agent.yaml");
        let kc = self.kubeconfig().display().to_string();
        let mut args = vec!["--kube", "--kubeconfig", &kc, "--node-name", "node1"];
        args.extend_from_slice(extra);
        Agent::start(&self.ns, &cfg, &self.bpffs.pin_path(), &args)
    }

    /// The published object as the controller wrote it into the local API.
    fn published(&self) -> Option<(Value, Value)> {
        let cm = self.local.get("v1", "ConfigMap", Some("meshnet"), "meshnet-peers")?;
        let peers: Value = serde_yaml::from_str(cm["data"]["peers.yaml"].as_str()?).ok()?;
        // The status lives apart, in an object the agents do not watch.
        let st = self.local.get("v1", "ConfigMap", Some("meshnet"), "meshnet-status")?;
        let status: Value = serde_yaml::from_str(st["data"]["status.yaml"].as_str()?).ok()?;
        Some((peers, status))
    }

    /// The agent's routes as `cidr peer gateways` lines.
    fn routes(&self) -> Vec<String> {
        let out = meshnet(&self.ns, &format!("maps dump routes -o json --pin-path {}", self.bpffs.pin_path().display()));
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        v["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let gws: Vec<String> =
                    r["gateways"].as_array().unwrap().iter().map(|g| format!("{}:{}", g["address"].as_str().unwrap(), g["port"])).collect();
                format!("{} {} {}", r["cidr"].as_str().unwrap(), r["peer"].as_str().unwrap(), gws.join(","))
            })
            .collect()
    }

    fn wait_routes(&self, want: &[&str], what: &str) {
        let ok = poll(WAIT, || (self.routes() == want).then_some(()));
        assert!(ok.is_some(), "{what}: routes are {:?}, want {want:?}; published {:?}", self.routes(), self.published());
    }

    /// A metrics port's answer: a port bound in the background after a (re)start is waited
    /// for, and a slow answer is waited for as long as any other I/O of the tests.
    fn http(&self, port: u16, path: &str) -> String {
        meshnet_tests::http_get(&self.ns, SocketAddr::from(([127, 0, 0, 1], port)), path)
    }
}

fn status_of<'a>(status: &'a Value, peer: &str) -> &'a Value {
    &status[peer]
}

#[test]
fn api_changes_reach_the_agents_maps() {
    let m = Mesh::new();
    let _controller = m.controller(&[]);
    let _agent = m.agent();
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "initial discovery");

    // The gateway's NodePort changes.
    m.remote.apply(gateway_service(32999));
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32999"], "NodePort change");

    // The gateway pod moves to a new node.
    m.remote.apply(node("node3", "10.20.144.166", "10.245.1.0/24"));
    m.remote.apply(gateway_endpoints("10.245.1.7", "node3"));
    m.wait_routes(&["10.245.0.0/23 cluster2 10.20.144.166:32999"], "gateway pod moved");

    // History is compacted: the controller's watches get 410 Gone, relist, and still follow.
    m.remote.compact();
    m.remote.apply(gateway_service(31000));
    m.wait_routes(&["10.245.0.0/23 cluster2 10.20.144.166:31000"], "change after a compaction");

    // A peer is added, and removed again.
    let third = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&third, "network3", "node4", "10.20.144.170", "10.246.0.0/24", 30443, "10.246.0.5");
    m.local.apply(remote_secret("cluster3", &third.kubeconfig("cluster3")));
    m.wait_routes(
        &["10.245.0.0/23 cluster2 10.20.144.166:31000", "10.246.0.0/24 cluster3 10.20.144.170:30443"],
        "peer added",
    );
    m.local.delete("v1", "Secret", Some("istio-system"), "istio-remote-secret-cluster3");
    m.wait_routes(&["10.245.0.0/23 cluster2 10.20.144.166:31000"], "peer removed");
}

#[test]
fn remote_outage_keeps_the_last_state_and_marks_it_stale() {
    let m = Mesh::new();
    let _controller = m.controller(&[]);
    let _agent = m.agent();
    let want = ["10.245.0.0/24 cluster2 10.20.144.165:32361"];
    m.wait_routes(&want, "initial discovery");
    let peers_version = || m.local.get("v1", "ConfigMap", Some("meshnet"), "meshnet-peers").unwrap()["metadata"]["resourceVersion"].clone();
    let before = peers_version();
    for mode in [Mode::Error, Mode::Hang] {
        m.remote.set_mode(mode);
        let stale = poll(WAIT, || m.published().filter(|(_, s)| status_of(s, "cluster2")["stale"] == true));
        let (peers, _) = stale.unwrap_or_else(|| panic!("{mode:?}: cluster2 never marked stale: {:?}", m.published()));
        assert_eq!(peers[0]["name"], "cluster2", "{mode:?}: the stale peer must stay published");
        let ready = m.http(9465, "/readyz");
        assert!(ready.starts_with("HTTP/1.0 503") && ready.contains("stale peers: cluster2"), "{ready}");
        let metrics = m.http(9465, "/metrics");
        assert!(metrics.contains("meshnet_controller_peer_stale{peer=\"cluster2\"} 1"), "{metrics}");
        assert_eq!(m.routes(), want, "{mode:?}: the agent's maps changed during a remote outage");
        m.remote.set_mode(Mode::Normal);
        let fresh = poll(WAIT, || m.published().filter(|(_, s)| status_of(s, "cluster2").get("stale").is_none()));
        assert!(fresh.is_some(), "{mode:?}: cluster2 stayed stale after recovery: {:?}", m.published());
    }
    // Health went back and forth in meshnet-status only: the object every agent watches was
    // not written once.
    assert_eq!(peers_version(), before, "status churn rewrote meshnet-peers");
    // The other direction still works after the outages.
    m.remote.apply(gateway_service(32000));
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32000"], "change after recovery");
}

/// The controller's peak memory, from /proc.
fn peak_rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
}

/// A remote run by someone else may answer without end. kube's client would read it all into
/// memory, until the controller is killed, and with it every peer's publish, on every restart.
#[test]
fn a_remote_that_answers_without_end_costs_only_its_own_peer() {
    let m = Mesh::new();
    let endless = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&endless, "network3", "node4", "10.20.144.170", "10.246.0.0/24", 30443, "10.246.0.5");
    endless.set_mode(Mode::Endless);
    let controller = m.controller(&[]);
    let _agent = m.agent();
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "initial discovery");
    m.local.apply(remote_secret("cluster3", &endless.kubeconfig("cluster3")));
    let why = poll(WAIT, || {
        let (_, status) = m.published()?;
        let e = status_of(&status, "cluster3")["error"].as_str()?.to_owned();
        e.contains("more than 8 MiB").then_some(e)
    });
    assert!(why.is_some(), "cluster3's endless answers were never refused: {:?}", m.published());
    // Each answer is cut at its bound, again after every backoff; the rest goes on.
    m.remote.apply(gateway_service(32000));
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32000"], "another remote's change while one answers without end");
    let peak = peak_rss_kb(controller.pid());
    assert!(peak < 256 * 1024, "the controller's peak memory grew to {peak} kB");
}

#[test]
fn overlapping_cidrs_are_refused() {
    let m = Mesh::new();
    let third = FakeApi::start(Some(&m.ns.path()));
    // cluster3 claims a CIDR inside the local cluster's.
    seed_cluster(&third, "network3", "node4", "10.20.144.170", "10.244.0.128/25", 30443, "10.244.0.130");
    m.local.apply(remote_secret("cluster3", &third.kubeconfig("cluster3")));
    let _controller = m.controller(&[]);
    let _agent = m.agent();
    let refused = poll(WAIT, || m.published().filter(|(_, s)| status_of(s, "cluster3")["refused"].is_string()));
    let (peers, status) = refused.unwrap_or_else(|| panic!("cluster3 never refused: {:?}", m.published()));
    assert!(status["cluster3"]["refused"].as_str().unwrap().contains("overlaps 10.244.0.0/24 of the local cluster"), "{status}");
    assert!(peers.as_array().unwrap().iter().all(|p| p["name"] != "cluster3"));
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "only cluster2");
    let metrics = m.http(9465, "/metrics");
    assert!(metrics.contains("meshnet_controller_peer_refused_total{peer=\"cluster3\"} 1"), "{metrics}");
    // Its secret gone, so is its series: names that come and go do not pile up.
    m.local.delete("v1", "Secret", Some("istio-system"), "istio-remote-secret-cluster3");
    let gone = poll(WAIT, || (!m.http(9465, "/metrics").contains("peer=\"cluster3\"")).then_some(()));
    assert!(gone.is_some(), "cluster3's series outlived its secret: {}", m.http(9465, "/metrics"));
}

/// One Node of the local cluster is one object: a typo in its podCIDRs, or a kubelet that
/// lists another cluster's gateway among its addresses, must not withdraw every peer from
/// every node. The published peer stays, and the status says what the Node claims.
#[test]
fn one_local_node_cannot_withdraw_a_published_peer() {
    let m = Mesh::new();
    let _controller = m.controller(&[]);
    let _agent = m.agent();
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "initial discovery");
    m.local.apply(node("rogue", "10.20.144.165", "0.0.0.0/1"));
    let noted = poll(WAIT, || m.published().filter(|(_, s)| status_of(s, "cluster2")["localClash"].is_string()));
    let (peers, status) = noted.unwrap_or_else(|| panic!("the rogue Node's claim was never noted: {:?}", m.published()));
    let clash = status["cluster2"]["localClash"].as_str().unwrap();
    assert!(clash.contains("node rogue lists 10.20.144.165") && clash.contains("0.0.0.0/1 overlaps 10.245.0.0/24"), "{clash}");
    assert!(status_of(&status, "cluster2")["refused"].is_null(), "{status}");
    assert!(peers.as_array().unwrap().iter().any(|p| p["name"] == "cluster2"), "{peers}");
    // Still routed, and a change of the peer still reaches the agent past the Node's claim.
    m.remote.apply(gateway_service(32000));
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32000"], "a change while a local Node claims the peer's range");
    // The Node gone, so is the note.
    m.local.delete("v1", "Node", None, "rogue");
    let cleared = poll(WAIT, || m.published().filter(|(_, s)| status_of(s, "cluster2").is_object() && status_of(s, "cluster2")["localClash"].is_null()));
    assert!(cleared.is_some(), "the note outlived the Node: {:?}", m.published());
}

/// A remote that claims a published peer's CIDR is refused, though its name sorts first, and
/// stays refused across a controller restart: the peer published with it keeps it.
#[test]
fn a_remote_cannot_take_a_published_peers_cidr() {
    let m = Mesh::new();
    let mut controller = m.controller(&[]);
    let _agent = m.agent();
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "cluster2 published");
    let third = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&third, "network3", "node4", "10.20.144.170", "10.245.0.0/25", 30443, "10.245.0.6");
    m.local.apply(remote_secret("aaa", &third.kubeconfig("aaa")));
    let want = "claims 10.245.0.0/25, which overlaps 10.245.0.0/24 of peer cluster2, published with it before";
    assert_eq!(refused_reason(&m, "aaa"), want);
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "cluster2 keeps its CIDR");
    // A restarted controller starts from what it published: the same answer.
    assert!(controller.stop());
    m.local.delete("v1", "ConfigMap", Some("meshnet"), "meshnet-status");
    let _controller = m.controller(&[]);
    assert_eq!(refused_reason(&m, "aaa"), want);
    let (peers, _) = m.published().unwrap();
    let names: Vec<&str> = peers.as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["cluster2"]);
}

/// The peers `meshnet-holds` holds, by name, with their pod CIDRs.
fn holds(m: &Mesh) -> Vec<(String, Value)> {
    let st = m.local.get("v1", "ConfigMap", Some("meshnet"), "meshnet-holds").unwrap_or(Value::Null);
    let holds: Value = st["data"]["holds.yaml"].as_str().and_then(|t| serde_yaml::from_str(t).ok()).unwrap_or(Value::Null);
    holds.as_array().into_iter().flatten().map(|p| (p["name"].as_str().unwrap_or_default().to_owned(), p["podCIDRs"].clone())).collect()
}

fn listed(m: &Mesh, name: &str) -> bool {
    m.published().is_some_and(|(p, _)| p.as_array().is_some_and(|a| a.iter().any(|p| p["name"] == name)))
}

/// Publishes cluster2, then refuses it (its secret turned bad) until it is held; returns its
/// good kubeconfig.
fn hold_cluster2(m: &Mesh) -> String {
    assert!(poll(WAIT, || listed(m, "cluster2").then_some(())).is_some(), "cluster2 never published: {:?}", m.published());
    assert!(holds(m).is_empty(), "{:?}", holds(m));
    let good = m.remote.kubeconfig("cluster2");
    let bad = good.replace("\nusers:", "\n    insecure-skip-tls-verify: true\nusers:");
    assert_ne!(good, bad);
    m.local.apply(remote_secret("cluster2", &bad));
    assert!(refused_reason(m, "cluster2").contains("insecure-skip-tls-verify"));
    let held = poll(WAIT, || Some(holds(m)).filter(|h| !h.is_empty()));
    assert_eq!(held, Some(vec![("cluster2".to_owned(), json!(["10.245.0.0/24"]))]));
    assert!(!listed(m, "cluster2"));
    good
}

/// A remote that claims cluster2's CIDR.
fn claimant(m: &Mesh) -> FakeApi {
    let third = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&third, "network3", "node4", "10.20.144.170", "10.245.0.0/25", 30443, "10.245.0.6");
    third
}

/// A peer refused for a while (here its secret turned bad) keeps what it was published with
/// across a controller restart: the holds are kept in `meshnet-holds`, not in memory only.
#[test]
fn a_refused_peer_keeps_its_cidr_across_a_controller_restart() {
    let m = Mesh::new();
    let mut controller = m.controller(&[]);
    let listed = |name: &str| listed(&m, name);
    let good = hold_cluster2(&m);
    // Deleted by hand, the holds are written again.
    let held = holds(&m);
    m.local.delete("v1", "ConfigMap", Some("meshnet"), "meshnet-holds");
    let again = poll(WAIT, || Some(holds(&m)).filter(|h| !h.is_empty()));
    assert_eq!(again.as_ref(), Some(&held), "the holds were not put right");

    assert!(controller.stop());
    // Declared before the controller, so dropped after it: its watches end first.
    let third = claimant(&m);
    let _controller = m.controller(&[]);
    m.local.apply(remote_secret("aaa", &third.kubeconfig("aaa")));
    let want = "claims 10.245.0.0/25, which overlaps 10.245.0.0/24 of peer cluster2, published with it before";
    assert_eq!(refused_reason(&m, "aaa"), format!("{want} (not published now)"));
    assert!(!listed("aaa"));

    // Its secret put right, the peer is published again with its CIDR, and no longer held.
    m.local.apply(remote_secret("cluster2", &good));
    assert!(poll(WAIT, || listed("cluster2").then_some(())).is_some(), "cluster2 not back: {:?}", m.published());
    let now = poll(WAIT, || m.published().filter(|(_, s)| s["aaa"]["refused"] == want));
    assert!(now.is_some(), "{:?}", m.published());
    assert!(poll(WAIT, || holds(&m).is_empty().then_some(())).is_some(), "{:?}", holds(&m));
}

/// A hold survives a failover too: the new leader knows it from its watches and reads it
/// again when it takes the lease.
#[test]
fn a_refused_peer_keeps_its_cidr_across_a_failover() {
    let m = Mesh::new();
    let holder = || lease_holder(&m);
    let third = claimant(&m);
    let mut a = m.controller(&["--identity", "ctrl-a", "--lease-duration-seconds", "15"]);
    assert_eq!(poll(WAIT, holder).as_deref(), Some("ctrl-a"));
    let _b = m.controller(&["--identity", "ctrl-b", "--lease-duration-seconds", "15", "--metrics-addr", "127.0.0.1:9466"]);
    hold_cluster2(&m);
    assert!(a.stop());
    assert!(poll(WAIT, || (holder().as_deref() == Some("ctrl-b")).then_some(())).is_some(), "ctrl-b never took the lease");
    m.local.apply(remote_secret("aaa", &third.kubeconfig("aaa")));
    let want = "claims 10.245.0.0/25, which overlaps 10.245.0.0/24 of peer cluster2, published with it before (not published now)";
    assert_eq!(refused_reason(&m, "aaa"), want);
    assert!(!listed(&m, "aaa"));
}

/// A second secret with cluster2's key, sorting after Istio's, took cluster2 over: its
/// kubeconfig replaced the first one's, without a word. Now the name is refused from both,
/// naming them, logged once, and cluster2 is back when the second goes.
#[test]
fn a_cluster_two_remote_secrets_hold_keeps_its_last_state_until_one_goes() {
    let m = Mesh::new();
    let mut controller = m.controller(&[]);
    let _agent = m.agent();
    let want = ["10.245.0.0/24 cluster2 10.20.144.165:32361"];
    m.wait_routes(&want, "initial discovery");
    let planted = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&planted, "network9", "rogue", "10.20.144.199", "10.245.0.0/24", 30999, "10.245.0.9");
    let mut second = remote_secret("cluster2", &planted.kubeconfig("cluster2"));
    second["metadata"]["name"] = json!("zz-planted");
    m.local.apply(second.clone());
    let why = "more than one remote secret holds a kubeconfig for this cluster (istio-system/istio-remote-secret-cluster2[cluster2], \
               istio-system/zz-planted[cluster2]); none is followed until only one does";
    // Neither is followed, and cluster2 stays at its last known state: a rotation that adds
    // the new secret first must not withdraw it.
    let kept = poll(WAIT, || m.published().filter(|(_, s)| s["cluster2"]["error"] == why && s["cluster2"]["stale"] == true));
    assert!(kept.is_some(), "cluster2 not kept stale with the reason: {:?}", m.published());
    assert!(kept.unwrap().0.as_array().unwrap().iter().any(|p| p["name"] == "cluster2"));
    m.wait_routes(&want, "cluster2 kept while two secrets hold it");
    // A restart with both secrets there (an upgrade, a failover): the new process never
    // followed cluster2, and keeps it all the same. The status, deleted meanwhile, is written
    // again by its first publish.
    assert!(controller.stop());
    m.local.delete("v1", "ConfigMap", Some("meshnet"), "meshnet-status");
    let controller = m.controller(&[]);
    let kept = poll(WAIT, || m.published().filter(|(_, s)| s["cluster2"]["error"] == why && s["cluster2"]["stale"] == true));
    assert!(kept.is_some(), "the new controller never published: {:?}", m.published());
    assert!(listed(&m, "cluster2"), "cluster2 withdrawn by the restart: {:?}", m.published());
    m.wait_routes(&want, "cluster2 kept across the restart");
    // Another event of the secrets, the same refusal: not logged again.
    second["metadata"]["annotations"]["note"] = json!("touched");
    m.local.apply(second);
    m.local.delete("v1", "Secret", Some("istio-system"), "zz-planted");
    m.wait_routes(&want, "the second secret gone");
    assert!(poll(WAIT, || m.published().filter(|(_, s)| s["cluster2"]["error"].is_null() && s["cluster2"]["stale"].is_null())).is_some(), "{:?}", m.published());
    assert_eq!(controller.output().matches("more than one remote secret holds").count(), 1, "{}", controller.output());
    assert!(planted.requests().is_empty(), "the second secret's kubeconfig was used");
}

/// One remote secret with thousands of keys costs neither a log line, a status entry nor a
/// metrics series for each: past a few, the refused names without a state to keep are
/// counted in one log line, and the cluster already followed goes on as before.
#[test]
fn a_secret_with_thousands_of_keys_costs_one_log_line_not_one_per_key() {
    const KEYS: usize = 5_000;
    let m = Mesh::new();
    let controller = m.controller(&[]);
    let _agent = m.agent();
    let want = ["10.245.0.0/24 cluster2 10.20.144.165:32361"];
    m.wait_routes(&want, "initial discovery");
    let data: serde_json::Map<String, Value> =
        (0..KEYS).map(|i| (format!("bulk{i:05}"), json!(base64::engine::general_purpose::STANDARD.encode("apiVersion: v1\nkind: Config\n")))).collect();
    m.local.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        // A mode no remote can have, too: each name would be a refused peer besides.
        "metadata": {"name": "bulk", "namespace": "istio-system", "labels": {"istio/multiCluster": "true"}, "annotations": {"meshnet.io/mode": "bogus"}},
        "data": data
    }));
    let listed = poll(WAIT, || m.published().filter(|(_, s)| s["bulk00000"]["error"].as_str().is_some_and(|e| e.contains(&format!("holds {KEYS} kubeconfigs")))));
    let (peers, status) = listed.unwrap_or_else(|| panic!("the bulk secret's refusal was never published: {:?}", m.published()));
    let entries = status.as_object().unwrap();
    assert!(entries.len() <= 65 + 1, "{} status entries for one secret", entries.len());
    assert!(entries.contains_key("cluster2") && peers.as_array().unwrap().iter().any(|p| p["name"] == "cluster2"));
    let unlisted = poll(WAIT, || controller.output().contains("more remote clusters refused than are listed one by one").then_some(()));
    assert!(unlisted.is_some(), "{}", controller.output());
    let out = controller.output();
    assert!(out.contains(&format!("count={}", KEYS - 64)), "{out}");
    let bulk_lines = out.lines().filter(|l| l.contains("remote cluster refused") && l.contains("peer=bulk")).count();
    assert!((1..=64).contains(&bulk_lines), "{bulk_lines} refusal lines for the bulk secret");
    let peer_lines = out.lines().filter(|l| l.contains("peer refused") && l.contains("peer=bulk")).count();
    assert!(peer_lines <= 64, "{peer_lines} peer refusal lines for the bulk secret");
    let metrics = m.http(9465, "/metrics");
    assert!(metrics.matches("peer=\"bulk").count() <= 2 * 64, "{} bulk series", metrics.matches("peer=\"bulk").count());
    m.wait_routes(&want, "cluster2 followed beside the bulk secret");

    // Another secret comes: the bound holds across the secrets' later changes too.
    let mut late = remote_secret("zz-late", "apiVersion: v1\nkind: Config\n");
    late["metadata"]["name"] = json!("zz-late");
    m.local.apply(late);
    let seen = poll(WAIT, || m.published().filter(|(_, s)| s.get("zz-late").is_some()));
    let (_, status) = seen.unwrap_or_else(|| panic!("the later secret's cluster never got a status: {:?}", m.published()));
    assert!(status.as_object().unwrap().len() <= 65 + 2, "{} status entries after another secret", status.as_object().unwrap().len());
    let out = controller.output();
    let bulk_lines = out.lines().filter(|l| l.contains("remote cluster refused") && l.contains("peer=bulk")).count();
    assert!(bulk_lines <= 64, "{bulk_lines} refusal lines for the bulk secret after another secret");
    assert_eq!(out.matches("more remote clusters refused than are listed").count(), 1, "the count, unchanged, was logged again");

    // cluster2, held by a second secret too, is refused with a state to keep: though 64
    // names without one come before it, it keeps its status entry and stays published.
    let mut second = remote_secret("cluster2", "apiVersion: v1\nkind: Config\n");
    second["metadata"]["name"] = json!("zz-second");
    m.local.apply(second);
    let kept = poll(WAIT, || {
        m.published().filter(|(_, s)| s["cluster2"]["stale"] == true && s["cluster2"]["error"].as_str().is_some_and(|e| e.contains("more than one remote secret")))
    });
    let (peers, _) = kept.unwrap_or_else(|| panic!("cluster2 not kept stale with its reason: {:?}", m.published()));
    assert!(peers.as_array().unwrap().iter().any(|p| p["name"] == "cluster2"), "cluster2 withdrawn: {peers:?}");
    m.wait_routes(&want, "cluster2 kept while two secrets hold it, beside the bulk secret");
}

/// A second secret for a cluster keeps it at its last known state under the first secret's
/// own annotations: a peer its allow-list refuses is not published again by adding a secret.
#[test]
fn a_second_secret_does_not_lift_the_first_ones_allow_list() {
    let m = Mesh::new();
    let _controller = m.controller(&[]);
    let _agent = m.agent();
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "initial discovery");
    let mut narrowed = remote_secret("cluster2", &m.remote.kubeconfig("cluster2"));
    narrowed["metadata"]["annotations"]["meshnet.io/allowed-cidrs"] = json!("10.99.0.0/16");
    m.local.apply(narrowed);
    assert!(refused_reason(&m, "cluster2").contains("outside the CIDRs this cluster may claim"));
    m.wait_routes(&[], "cluster2 refused by its allow-list");
    let mut second = remote_secret("cluster2", &m.remote.kubeconfig("cluster2"));
    second["metadata"]["name"] = json!("zz-second");
    m.local.apply(second);
    let seen = poll(WAIT, || m.published().filter(|(_, s)| s["cluster2"]["error"].as_str().is_some_and(|e| e.contains("more than one remote secret"))));
    let (peers, status) = seen.unwrap_or_else(|| panic!("the second secret was never noticed: {:?}", m.published()));
    assert!(peers.as_array().unwrap().iter().all(|p| p["name"] != "cluster2"), "published past its allow-list: {peers}");
    assert!(status["cluster2"]["refused"].as_str().is_some_and(|r| r.contains("outside the CIDRs")), "{status}");
}

#[test]
fn exec_plugin_in_a_remote_secret_is_refused_and_never_run() {
    let m = Mesh::new();
    let marker = m.dir.0.join("pwned");
    let evil = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: evil\n  cluster:\n    server: {}\nusers:\n- name: evil\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: /bin/sh\n      args: [\"-c\", \"touch {}\"]\ncontexts:\n- name: evil\n  context: {{cluster: evil, user: evil}}\ncurrent-context: evil\n",
        m.remote.url(),
        marker.display()
    );
    m.local.apply(remote_secret("evil", &evil));
    let mut controller = m.controller(&[]);
    let refused = poll(WAIT, || m.published().filter(|(_, s)| status_of(s, "evil")["refused"].is_string()));
    let (_, status) = refused.unwrap_or_else(|| panic!("the exec kubeconfig was not refused: {:?}", m.published()));
    let why = status["evil"]["refused"].as_str().unwrap();
    assert!(why.contains("`exec`") && why.contains("runs a program"), "{why}");
    assert!(!why.contains(&marker.display().to_string()), "the refusal leaks the secret's content: {why}");
    controller.wait_for_line("remote cluster refused", WAIT);
    assert!(!controller.output().contains("touch"), "the secret's content reached the logs");
    // The legitimate peer is unaffected.
    let ok = poll(WAIT, || m.published().filter(|(p, _)| p.as_array().is_some_and(|a| a.iter().any(|p| p["name"] == "cluster2"))));
    assert!(ok.is_some());
    assert!(!marker.exists(), "the exec plugin ran");
}

/// A string no test and no process has seen before, to look for afterwards.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

/// A one-cluster kubeconfig with `before` at the top, `cluster_extra` in the cluster and
/// `users` (with its `users:` line) for the users.
fn kubeconfig_with(server: &str, before: &str, cluster_extra: &str, users: &str) -> String {
    format!(
        "{before}apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n{cluster_extra}{users}contexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n"
    )
}

/// The `users` list with one user `u` of this body.
fn one_user(body: &str) -> String {
    format!("users:\n- name: u\n  user:\n{body}\n")
}

/// Remote secrets that smuggle an exec plugin or a tokenFile past a check that reads YAML
/// differently from kube (merge keys, anchors, tags, duplicates, several documents, JSON).
/// Returns the peer names, the marker files the exec plugins would create, the token the
/// tokenFile holds and a watch on that file.
fn smuggling_secrets(m: &Mesh) -> (Vec<&'static str>, Vec<PathBuf>, String, OpenWatch) {
    let url = m.remote.url();
    let markers: Vec<PathBuf> = (0..4).map(|i| m.dir.0.join(format!("pwned-{i}"))).collect();
    let exec = |i: usize| {
        format!(
            "{{apiVersion: client.authentication.k8s.io/v1beta1, command: /bin/sh, args: [\"-c\", \"touch {}\"]}}",
            markers[i].display()
        )
    };
    let token = unique("controller-token");
    let token_file = m.dir.0.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let tf = token_file.display().to_string();
    let anchored = |what: &str| format!("preferences:\n  extensions:\n  - name: defaults\n    extension: &evil {{name: u, user: {{{what}}}}}\n");
    let secrets = [
        // The reported bypass: a whole user sits under an anchor elsewhere and is merged into
        // the list, where a check that does not expand merges sees no `user` at all.
        ("evil-anchor", kubeconfig_with(&url, &anchored(&format!("exec: {}", exec(0))), "", "users:\n- <<: *evil\n")),
        // A merge needs no anchor, at the entry or at the top.
        ("evil-merge", kubeconfig_with(&url, "", "", &format!("users:\n- name: u\n  <<: {{user: {{exec: {}}}}}\n", exec(1)))),
        ("evil-top-merge", kubeconfig_with(&url, "", "", &format!("<<: {{users: [{{name: u, user: {{exec: {}}}}}]}}\n", exec(2)))),
        ("evil-multidoc", format!("kind: Config\n---\n{}", kubeconfig_with(&url, "", "", &one_user(&format!("    exec: {}", exec(3)))))),
        ("evil-tokenfile-anchor", kubeconfig_with(&url, &anchored(&format!("tokenFile: {tf}")), "", "users:\n- <<: *evil\n")),
        ("evil-tokenfile-merge", kubeconfig_with(&url, "", "", &format!("users:\n- name: u\n  <<: {{user: {{tokenFile: {tf}}}}}\n"))),
        ("evil-tokenfile-top-merge", kubeconfig_with(&url, "", "", &format!("<<: {{users: [{{name: u, user: {{tokenFile: {tf}}}}}]}}\n"))),
        ("evil-tokenfile-tag", kubeconfig_with(&url, "", "", &format!("users:\n- !!map {{name: u, user: {{tokenFile: {tf}}}}}\n"))),
        ("evil-tokenfile-dup", kubeconfig_with(&url, "", "", &format!("{}{}", one_user("    token: harmless"), one_user(&format!("    tokenFile: {tf}"))))),
        (
            "evil-tokenfile-json",
            format!(
                r#"{{"apiVersion":"v1","kind":"Config","clusters":[{{"name":"c","cluster":{{"server":"{url}"}}}}],"users":[{{"name":"u","<<":{{"user":{{"tokenFile":"{tf}"}}}}}}],"contexts":[{{"name":"x","context":{{"cluster":"c","user":"u"}}}}],"current-context":"x"}}"#
            ),
        ),
    ];
    for (name, text) in &secrets {
        m.local.apply(remote_secret(name, text));
    }
    (secrets.iter().map(|(n, _)| *n).collect(), markers, token, OpenWatch::new(&token_file))
}

/// Notices any open or read of one file, by any process (inotify).
struct OpenWatch(std::os::fd::OwnedFd);

impl OpenWatch {
    fn new(path: &Path) -> Self {
        use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
        // SAFETY: plain syscalls; the fd is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let wd = unsafe { libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&fd), c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) };
        assert!(wd >= 0, "inotify_add_watch: {}", std::io::Error::last_os_error());
        Self(fd)
    }

    /// Whether the file was opened or read since the watch began.
    fn touched(&self) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a buffer of the given length.
        let n = unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&self.0), buf.as_mut_ptr().cast(), buf.len()) };
        n > 0
    }
}

/// True when any request to either API server carried `token`.
fn token_was_sent(m: &Mesh, token: &str) -> bool {
    [&m.local, &m.remote].iter().any(|api| api.requests().iter().any(|r| r.authorization.as_deref().is_some_and(|a| a.contains(token))))
}

#[test]
fn smuggled_exec_and_token_files_are_refused_never_run_and_never_read() {
    let m = Mesh::new();
    let (names, markers, token, token_file) = smuggling_secrets(&m);
    // The watch sees opens on this machine, or its silence below would prove nothing.
    let probe = m.dir.0.join("probe");
    std::fs::write(&probe, "x").unwrap();
    let probe_watch = OpenWatch::new(&probe);
    std::fs::read(&probe).unwrap();
    assert!(probe_watch.touched(), "inotify does not report opens here");
    let controller = m.controller(&[]);
    let all_refused = poll(WAIT, || m.published().filter(|(_, s)| names.iter().all(|n| status_of(s, n)["refused"].is_string())));
    let (peers, status) = all_refused.unwrap_or_else(|| panic!("not all refused: {:?}\n{}", m.published(), controller.output()));
    for n in &names {
        let why = status_of(&status, n)["refused"].as_str().unwrap();
        assert!(!why.contains(&m.dir.0.display().to_string()), "{n}: the refusal quotes the secret: {why}");
    }
    assert!(peers.as_array().unwrap().iter().all(|p| !p["name"].as_str().unwrap().starts_with("evil")), "{peers}");
    // The legitimate peer is unaffected.
    let ok = poll(WAIT, || m.published().filter(|(p, _)| p.as_array().is_some_and(|a| a.iter().any(|p| p["name"] == "cluster2"))));
    assert!(ok.is_some(), "{:?}", m.published());
    for marker in &markers {
        assert!(!marker.exists(), "an exec plugin ran: {}", marker.display());
    }
    assert!(!token_file.touched(), "the controller opened the tokenFile");
    assert!(!token_was_sent(&m, &token), "the controller sent the token from the tokenFile");
    assert!(!controller.output().contains(&token), "the token file's content reached the logs");
}

/// A kubeconfig with a mistake next to its token: the refusal says where, and the token
/// reaches no log line, no metric and no object the controller writes.
#[test]
fn a_malformed_kubeconfig_never_leaks_its_token() {
    let m = Mesh::new();
    let url = m.remote.url();
    let token = unique("leaky-token");
    let user = one_user(&format!("    token: {token}"));
    let secrets = [
        // The token is the wrongly typed value itself.
        ("leaky-colors", kubeconfig_with(&url, &format!("preferences: {{colors: {token}}}\n"), "", &user), "`preferences.colors`"),
        ("leaky-server", kubeconfig_with(&format!("[{url}]"), "", "", &user), "`clusters[0].cluster.server` must be a string"),
        ("leaky-syntax", kubeconfig_with(&url, "", "", &one_user(&format!("    token: \"{token}\n    x: ["))), "not valid YAML"),
        ("leaky-ca", kubeconfig_with(&url, "", &format!("    certificate-authority-data: {token}\n"), &user), "certificate-authority-data is not base64"),
    ];
    for (name, text, _) in &secrets {
        m.local.apply(remote_secret(name, text));
    }
    let mut controller = m.controller(&[]);
    let all_refused =
        poll(WAIT, || m.published().filter(|(_, s)| secrets.iter().all(|(n, _, _)| status_of(s, n)["refused"].is_string())));
    let (_, status) = all_refused.unwrap_or_else(|| panic!("not all refused: {:?}\n{}", m.published(), controller.output()));
    for (name, _, why) in &secrets {
        let got = status_of(&status, name)["refused"].as_str().unwrap();
        assert!(got.contains(why), "{name}: want {why:?} in {got:?}");
    }
    controller.wait_for_line("remote cluster refused", WAIT);
    let metrics = m.http(9465, "/metrics");
    assert!(metrics.contains("meshnet_"), "{metrics}");
    assert!(!controller.output().contains(&token), "the token reached the controller's log:\n{}", controller.output());
    assert!(!metrics.contains(&token), "the token reached the metrics");
    let cm = m.local.get("v1", "ConfigMap", Some("meshnet"), "meshnet-peers").unwrap();
    assert!(!cm.to_string().contains(&token), "the token reached the published ConfigMap");
    // The remote secrets hold it base64-encoded, which a token with `-` never matches.
    assert!(!m.local.dump().contains(&token), "the token reached an object in the API");
    for r in m.local.requests() {
        assert!(!r.body.contains(&token), "{} {} wrote the token", r.method, r.path);
    }
    assert!(!token_was_sent(&m, &token), "a refused kubeconfig was used");
}

/// `meshnet mesh-networks` runs on an operator's machine: the same secrets must neither run
/// anything there, nor read its files, nor print a token.
#[test]
fn mesh_networks_refuses_smuggled_credentials_and_keeps_tokens_out_of_its_output() {
    let m = Mesh::new();
    let (names, markers, token, token_file) = smuggling_secrets(&m);
    let leaky = unique("leaky-token");
    let url = m.remote.url();
    m.local.apply(remote_secret("leaky", &kubeconfig_with(&url, &format!("preferences: {{colors: {leaky}}}\n"), "", &one_user(&format!("    token: {leaky}")))));
    let out = mesh_networks_cmd(&m, "");
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("network2"), "the legitimate cluster is gone:\n{}", out.stdout);
    for marker in &markers {
        assert!(!marker.exists(), "an exec plugin ran: {}", marker.display());
    }
    assert!(!token_file.touched(), "mesh-networks opened the tokenFile");
    assert!(!token_was_sent(&m, &token), "mesh-networks sent the token from the tokenFile");
    assert_eq!(out.stderr.matches("skipping cluster").count(), names.len() + 1, "{}", out.stderr);
    for secret in [&token, &leaky] {
        assert!(!out.stdout.contains(secret.as_str()) && !out.stderr.contains(secret.as_str()), "a token reached the output:\n{}", out.stderr);
    }
}

#[test]
fn local_api_outage_leaves_the_datapath_and_restarts_never_flush() {
    let m = Mesh::new();
    let mut controller = m.controller(&[]);
    let mut agent = m.agent();
    let want = ["10.245.0.0/24 cluster2 10.20.144.165:32361"];
    m.wait_routes(&want, "initial discovery");

    m.local.set_mode(Mode::Error);
    agent.child.wait_for_line("Kubernetes API watch failing", WAIT);
    assert_eq!(m.routes(), want);
    // A restarted agent while the API is down keeps the pinned state, and applies the
    // file's own peers at once: an outage must not hold back what needs no API.
    assert!(agent.child.stop());
    let cfg = m.dir.0.join("agent.yaml");
    let original = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, original.replace("peers: []", "peers: [{name: byhand, podCIDRs: [10.250.0.0/16], gateways: [{address: 10.20.144.170, port: 30443}]}]")).unwrap();
    let mut agent = m.agent();
    let with_file = ["10.245.0.0/24 cluster2 10.20.144.165:32361", "10.250.0.0/16 byhand 10.20.144.170:30443"];
    m.wait_routes(&with_file, "the file's peer during an API outage");
    // So does a file edited while the API is still down; the published peer stays.
    std::fs::write(&cfg, &original).unwrap();
    m.wait_routes(&want, "a file edit during an API outage");
    assert!(agent.child.stop());
    let agent = m.agent();
    assert_eq!(m.routes(), want, "a restart during an API outage flushed the maps");

    // A restarted controller while the remote is down keeps the peer published.
    assert!(controller.stop());
    m.local.set_mode(Mode::Normal);
    m.remote.set_mode(Mode::Error);
    let _controller = m.controller(&[]);
    let stale = poll(WAIT, || m.published().filter(|(_, s)| status_of(s, "cluster2")["stale"] == true));
    let (peers, _) = stale.unwrap_or_else(|| panic!("{:?}", m.published()));
    assert_eq!(peers.as_array().unwrap().len(), 1, "a controller restart withdrew a peer it could not reach");
    assert_eq!(m.routes(), want);
    drop(agent);
}

fn mesh_networks_cmd(m: &Mesh, extra: &str) -> meshnet_tests::CmdOut {
    meshnet(&m.ns, &format!("mesh-networks --kubeconfig {} --cluster cluster1 {extra}", m.kubeconfig().display()))
}

/// `meshnet mesh-networks` reproduces the block the user hand-wrote in every cluster.
#[test]
fn mesh_networks_reproduce_the_seed() {
    let m = Mesh::new();
    let out = mesh_networks_cmd(&m, "");
    assert!(out.ok, "{}", out.stderr);
    let expected = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/seed-mesh-networks.yaml")).unwrap();
    let got: Value = serde_yaml::from_str(&out.stdout).unwrap();
    let want: Value = serde_yaml::from_str(&expected).unwrap();
    assert_eq!(got, want, "got:\n{}", out.stdout);

    let out = mesh_networks_cmd(&m, "--apply");
    assert!(out.ok, "{}", out.stderr);
    let cm = m.local.get("v1", "ConfigMap", Some("istio-system"), "istio").unwrap();
    let applied: Value = serde_yaml::from_str(cm["data"]["meshNetworks"].as_str().unwrap()).unwrap();
    assert_eq!(applied, want);
    assert!(cm["data"]["mesh"].as_str().unwrap().contains("meshId: mesh1"), "--apply dropped the other keys");

    let json = mesh_networks_cmd(&m, "-o json");
    let as_json: Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(as_json, want);
}

/// A remote that labels its namespace with this cluster's network (or another remote's), or
/// a remote secret that names this cluster, cannot replace that network's entry.
#[test]
fn mesh_networks_keep_each_network_its_own_cluster() {
    let m = Mesh::new();
    let expected = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/seed-mesh-networks.yaml")).unwrap();
    let want: Value = serde_yaml::from_str(&expected).unwrap();
    // "aaa" sorts before both and claims network1 (this cluster's); "zzz" claims network2,
    // cluster2's. With the networks applied once, "aaa" claims network2 too: an entry written
    // for cluster2 stays cluster2's, whatever the names.
    assert!(mesh_networks_cmd(&m, "--apply").ok);
    for (name, network) in [("aaa", "network1"), ("zzz", "network2"), ("aaa", "network2")] {
        let rogue = FakeApi::start(Some(&m.ns.path()));
        seed_cluster(&rogue, network, "rogue", "10.20.144.199", "10.250.0.0/24", 30999, "10.250.0.5");
        m.local.apply(remote_secret(name, &rogue.kubeconfig(name)));
        let out = mesh_networks_cmd(&m, "");
        assert!(out.ok, "{}", out.stderr);
        let got: Value = serde_yaml::from_str(&out.stdout).unwrap();
        assert_eq!(got, want, "{name} labelled {network} changed the networks:\n{}", out.stdout);
        assert!(out.stderr.contains("its network label names another cluster's network; skipping it"), "{}", out.stderr);
        m.local.delete("v1", "Secret", Some("istio-system"), &format!("istio-remote-secret-{name}"));
    }
    // A remote secret under this cluster's own name is not read at all.
    let rogue = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&rogue, "network9", "rogue", "10.20.144.199", "10.250.0.0/24", 30999, "10.250.0.5");
    m.local.apply(remote_secret("cluster1", &rogue.kubeconfig("cluster1")));
    let out = mesh_networks_cmd(&m, "");
    let got: Value = serde_yaml::from_str(&out.stdout).unwrap();
    assert_eq!(got, want, "a remote secret named cluster1 changed the networks:\n{}", out.stdout);
    assert!(out.stderr.contains("a remote secret names this cluster; skipping it"), "{}", out.stderr);
}

/// A remote whose gateway node's address is the metadata service's, or a Node's of this
/// cluster, gets no gateway in meshNetworks: the output says which and why.
#[test]
fn mesh_networks_leave_out_a_remotes_gateway_at_a_reserved_or_local_address() {
    let m = Mesh::new();
    for (ip, why) in [
        ("169.254.169.254", "169.254.169.254 is not a unicast address of a remote node (link-local)"),
        ("10.20.144.83", "10.20.144.83 is an address of node node1 of the local cluster"),
    ] {
        m.remote.apply(node("node2", ip, "10.245.0.0/24"));
        let out = mesh_networks_cmd(&m, "--apply");
        assert!(out.ok, "{ip}: {}", out.stderr);
        assert!(out.stdout.contains(&format!("# cluster2: gateway {ip} left out: {why}\n")), "{ip}: {}", out.stdout);
        assert!(out.stdout.contains("# cluster2: network network2 left out: no usable gateway\n"), "{ip}: {}", out.stdout);
        let cm = m.local.get("v1", "ConfigMap", Some("istio-system"), "istio").unwrap();
        let applied: Value = serde_yaml::from_str(cm["data"]["meshNetworks"].as_str().unwrap()).unwrap();
        assert!(applied["networks"].get("network2").is_none(), "{ip}: {applied:?}");
        assert_eq!(applied["networks"]["network1"]["gateways"][0]["address"], "10.20.144.83", "{ip}: {applied:?}");
    }
    // An entry already written for it is not vetted here, and the output does not call it left out.
    m.local.apply(istio_configmap("networks:\n  network2:\n    endpoints: [{fromRegistry: cluster2}]\n    gateways: [{address: 10.20.144.83, port: 32361}]\n"));
    let out = mesh_networks_cmd(&m, "");
    assert!(out.ok, "{}", out.stderr);
    let said = "# cluster2: no usable gateway for network network2; the existing entry network2 stays as it was, unchecked\n";
    assert!(out.stdout.contains(said) && !out.stdout.contains("network network2 left out"), "{}", out.stdout);
}

/// `--apply` is a read-modify-write of the istio ConfigMap: an edit that lands after the
/// read and before the write is not lost; the write is refused instead.
#[test]
fn mesh_networks_apply_never_loses_a_concurrent_edit() {
    use meshnet::discovery::{mesh_networks, resolve};
    let m = Mesh::new();
    let opts = mesh_networks::Options {
        kubeconfig: Some(m.kubeconfig()),
        istio_namespace: "istio-system".into(),
        secrets: resolve::SecretSource { namespace: "istio-system".into(), selector: resolve::REMOTE_SECRET_SELECTOR.into() },
        resolve: resolve::ResolveOptions::default(),
        cluster: "cluster1".into(),
        modes: std::collections::BTreeMap::new(),
        default_mode: meshnet::config::PeerMode::Gateway,
    };
    let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // One client, so one runtime: the read and the write run in a thread of the test
    // namespace, and the hand edit lands between them.
    let (read_tx, read_rx) = std::sync::mpsc::channel();
    let (edited_tx, edited_rx) = std::sync::mpsc::channel::<()>();
    let o = opts.clone();
    let writer = m.ns.spawn(move || {
        rt().block_on(async {
            let generated = mesh_networks::generate(&o).await.unwrap();
            read_tx.send(()).unwrap();
            edited_rx.recv().unwrap();
            mesh_networks::apply("istio-system", &generated).await
        })
    });
    read_rx.recv().unwrap();
    // Someone edits meshNetworks by hand meanwhile.
    let edit = "networks:\n  handmade:\n    endpoints: [{fromCidr: 10.99.0.0/16}]\n    gateways: [{address: 192.0.2.99, port: 15443}]\n";
    m.local.apply(istio_configmap(edit));
    edited_tx.send(()).unwrap();
    let err = writer.join().unwrap().unwrap_err();
    assert!(format!("{err:#}").contains("changed while meshNetworks was being built"), "{err:#}");
    let cm = m.local.get("v1", "ConfigMap", Some("istio-system"), "istio").unwrap();
    assert_eq!(cm["data"]["meshNetworks"], edit, "the hand edit was overwritten");
    // Run again, it keeps the hand-made network and adds the discovered ones.
    let o = opts.clone();
    m.ns.run(move || {
        rt().block_on(async {
            let g = mesh_networks::generate(&o).await?;
            mesh_networks::apply("istio-system", &g).await
        })
    })
    .unwrap();
    let cm = m.local.get("v1", "ConfigMap", Some("istio-system"), "istio").unwrap();
    let applied = cm["data"]["meshNetworks"].as_str().unwrap();
    assert!(applied.contains("handmade") && applied.contains("network2"), "{applied}");
}

#[test]
fn a_second_controller_takes_over_when_the_leader_stops() {
    let m = Mesh::new();
    let holder = || lease_holder(&m);
    let mut a = m.controller(&["--identity", "ctrl-a", "--lease-duration-seconds", "15"]);
    let leader = poll(WAIT, holder).expect("nobody took the lease");
    assert_eq!(leader, "ctrl-a");
    let b = m.controller(&["--identity", "ctrl-b", "--lease-duration-seconds", "15", "--metrics-addr", "127.0.0.1:9466"]);
    let published = poll(WAIT, || m.published().filter(|(p, _)| p[0]["name"] == "cluster2"));
    assert!(published.is_some());
    // b waits while a renews.
    assert!(b.output().lines().all(|l| !l.contains("leader=true")), "two leaders:\n{}", b.output());
    assert!(a.stop());
    let took_over = poll(WAIT, || (holder().as_deref() == Some("ctrl-b")).then_some(()));
    assert!(took_over.is_some(), "ctrl-b never took the lease:\n{}", b.output());
    // The new leader publishes changes.
    m.remote.apply(gateway_service(30999));
    let followed = poll(WAIT, || {
        m.published().filter(|(p, _)| p[0]["gateways"][0]["port"] == 30999)
    });
    assert!(followed.is_some(), "the new leader did not publish: {:?}\n{}", m.published(), b.output());
}

/// meshnet's own read-only remote secrets, apart from Istio's (docs/istio.md).
#[test]
fn remote_secrets_can_live_apart_from_istios() {
    let m = Mesh::new();
    m.local.delete("v1", "Secret", Some("istio-system"), "istio-remote-secret-cluster2");
    let mut own = remote_secret("cluster2", &m.remote.kubeconfig("cluster2"));
    own["metadata"] = json!({"name": "meshnet-remote-cluster2", "namespace": "meshnet", "labels": {"meshnet.io/remote": "true"}});
    m.local.apply(own);
    let _controller =
        m.controller(&["--remote-secret-namespace", "meshnet", "--remote-secret-selector", "meshnet.io/remote=true"]);
    let _agent = m.agent();
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "discovery through meshnet's own secret");
}

fn lease(holder: &str, renew_time: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "meshnet-controller", "namespace": "meshnet"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "acquireTime": renew_time, "renewTime": renew_time}
    })
}

fn lease_holder(m: &Mesh) -> Option<String> {
    m.local
        .get("coordination.k8s.io/v1", "Lease", Some("meshnet"), "meshnet-controller")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

/// Lease decisions never compare clocks across nodes: a live leader whose clock runs far
/// behind keeps its lease, and a dead one whose clock ran far ahead loses it after one lease
/// duration, both by this replica's own clock.
#[test]
fn leader_election_ignores_other_nodes_clocks() {
    let m = Mesh::new();
    // A live leader with a clock 26 years behind: it renews every 300 ms. Leases of 15 s: a
    // stall of the test thread on a loaded machine must not pass for a dead leader.
    m.local.apply(lease("ghost", "2000-01-01T00:00:00.000000Z"));
    let mut c = m.controller(&["--identity", "ctrl", "--lease-duration-seconds", "15"]);
    // 18 s of renewals: past a lease duration, so that a controller that took the lease once it
    // ran out by the leader's clock, ignoring the renewals, would fail here.
    for i in 1..=60 {
        let at = std::time::Instant::now();
        assert_eq!(lease_holder(&m).as_deref(), Some("ghost"), "took the lease of a live leader:\n{}", c.output());
        m.local.apply(lease("ghost", &format!("2000-01-01T00:{:02}:{:02}.000000Z", i / 60, i % 60)));
        // Paced renewals, like a real leader's: this is the live leader, not a wait for a result.
        std::thread::sleep(Duration::from_millis(300).saturating_sub(at.elapsed()));
    }
    assert_eq!(lease_holder(&m).as_deref(), Some("ghost"));
    assert!(m.published().is_none(), "a follower published: {:?}", m.published());
    // It dies with a clock that was 73 years ahead: taken over after a lease duration.
    m.local.apply(lease("ghost", "2099-01-01T00:00:00.000000Z"));
    let took = poll(WAIT, || (lease_holder(&m).as_deref() == Some("ctrl")).then_some(()));
    assert!(took.is_some(), "never took the dead leader's lease:\n{}", c.output());
    let published = poll(WAIT, || m.published().filter(|(p, _)| p[0]["name"] == "cluster2"));
    assert!(published.is_some(), "the new leader did not publish:\n{}", c.output());
    // Stopping hands the lease back at once instead of leaving it to expire.
    assert!(c.stop());
    assert_eq!(lease_holder(&m), None, "the lease was not released on stop");
}

/// The controller owns meshnet-peers: a hand edit or a deletion (or a late write of a replica
/// that lost the lease) is put right without any other change to wait for.
#[test]
fn the_controller_repairs_its_published_object() {
    let m = Mesh::new();
    let _c = m.controller(&[]);
    // Only the peer list is compared: the status lives in its own object and may rightly change
    // meanwhile (a remote watch that restarts under load marks the peer stale for a moment).
    let peers = || m.published().map(|(p, _)| p);
    let good = json!([{"name": "cluster2", "podCIDRs": ["10.245.0.0/24"], "gateways": [{"address": "10.20.144.165", "port": 32361}]}]);
    assert!(poll(WAIT, || peers().filter(|p| *p == good)).is_some(), "never published: {:?}", m.published());
    let mut cm = m.local.get("v1", "ConfigMap", Some("meshnet"), "meshnet-peers").unwrap();
    cm["data"]["peers.yaml"] = json!("- name: evil\n  podCIDRs: [10.99.0.0/16]\n  gateways: [{address: 192.0.2.66, port: 30000}]\n");
    m.local.apply(cm);
    let repaired = poll(WAIT, || peers().filter(|p| *p == good));
    assert!(repaired.is_some(), "hand edit not repaired: {:?}", m.published());
    m.local.delete("v1", "ConfigMap", Some("meshnet"), "meshnet-peers");
    let recreated = poll(WAIT, || peers().filter(|p| *p == good));
    assert!(recreated.is_some(), "deleted object not recreated");
}

/// The published object, written by hand (or by a controller of another version).
fn peers_configmap(peers_yaml: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "meshnet-peers", "namespace": "meshnet"},
        "data": {"peers.yaml": peers_yaml, "status.yaml": "{}\n"}
    })
}

fn refused_reason(m: &Mesh, peer: &str) -> String {
    let refused = poll(WAIT, || m.published().and_then(|(_, s)| s[peer]["refused"].as_str().map(str::to_owned)));
    refused.unwrap_or_else(|| panic!("{peer} never refused: {:?}", m.published()))
}

/// Anyone who can edit a remote cluster's Nodes must not be able to take the node's cloud
/// metadata service, the local Services or a local address, nor point the gateway anywhere.
#[test]
fn remote_claims_on_reserved_ranges_are_refused() {
    let m = Mesh::new();
    let metadata = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&metadata, "network3", "node4", "10.20.144.170", "169.254.169.254/32", 30443, "10.246.0.5");
    m.local.apply(remote_secret("cluster3", &metadata.kubeconfig("cluster3")));
    let services = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&services, "network4", "node5", "10.20.144.171", "10.96.0.0/24", 30444, "10.247.0.5");
    m.local.apply(remote_secret("cluster4", &services.kubeconfig("cluster4")));
    let mut controller = m.controller(&["--service-cidrs", "10.96.0.0/12"]);
    let _agent = m.agent();

    let why = refused_reason(&m, "cluster3");
    assert_eq!(
        why,
        r#"podCIDRs[0]: "169.254.169.254/32" refused: 169.254.169.254/32 overlaps 169.254.0.0/16, link-local, where cloud metadata services answer"#
    );
    let why = refused_reason(&m, "cluster4");
    assert_eq!(why, r#"podCIDRs[0]: "10.96.0.0/24" refused: 10.96.0.0/24 overlaps the local Service CIDR 10.96.0.0/12"#);
    let want = ["10.245.0.0/24 cluster2 10.20.144.165:32361"];
    m.wait_routes(&want, "only cluster2");
    let (peers, _) = m.published().unwrap();
    assert_eq!(peers.as_array().unwrap().len(), 1, "{peers}");
    controller.wait_for_line("peer refused", WAIT);
    let metrics = m.http(9465, "/metrics");
    assert!(metrics.contains("meshnet_controller_peer_refused_total{peer=\"cluster3\"} 1"), "{metrics}");

    // cluster2's only gateway node points its gateway at the local node's address, which is
    // not one of its own: that gateway is left out, and with none left the peer keeps its
    // last good state, stale, with the reason (one Node's annotation withdraws no peer from
    // any node); it is live again when the annotation goes.
    let mut n2 = node("node2", "10.20.144.165", "10.245.0.0/24");
    n2["metadata"]["annotations"] = json!({"meshnet.io/gateway-address": "10.20.144.83"});
    m.remote.apply(n2);
    let spoofed = "node node2: meshnet.io/gateway-address \"10.20.144.83\" is not one of its addresses (10.20.144.165)";
    let (_, st) = m.wait_peer("cluster2", "cluster2 kept, stale", |_, s| s["stale"] == true && s["error"].as_str().is_some_and(|e| e.contains(spoofed)));
    assert!(st["refused"].is_null(), "{st}");
    m.wait_routes(&want, "cluster2 kept");
    m.remote.apply(node("node2", "10.20.144.165", "10.245.0.0/24"));
    m.wait_peer("cluster2", "cluster2 live again", |_, s| s["stale"].is_null() && s["error"].is_null());
    m.wait_routes(&want, "cluster2 back");
    assert!(m.routes().iter().all(|r| !r.starts_with("169.254.") && !r.starts_with("10.96.")), "{:?}", m.routes());
}

/// An allow-list on the remote secret bounds what the remote may claim; the controller's
/// flag wins over it.
#[test]
fn allow_lists_bound_what_a_remote_may_claim() {
    let m = Mesh::new();
    let mut secret = remote_secret("cluster2", &m.remote.kubeconfig("cluster2"));
    secret["metadata"]["annotations"]["meshnet.io/allowed-cidrs"] = json!("10.245.0.0/24");
    m.local.apply(secret);
    let mut controller = m.controller(&[]);
    let _agent = m.agent();
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32361"], "inside the allow-list");

    // A second node widens the claim to 10.245.0.0/23: refused, and withdrawn.
    m.remote.apply(node("node3", "10.20.144.166", "10.245.1.0/24"));
    let why = refused_reason(&m, "cluster2");
    assert_eq!(
        why,
        r#"podCIDRs[0]: "10.245.0.0/23" is outside the CIDRs this cluster may claim (10.245.0.0/24; annotation meshnet.io/allowed-cidrs)"#
    );
    m.wait_routes(&[], "claim outside the allow-list");

    // The operator's flag wins over the annotation.
    assert!(controller.stop());
    let _controller = m.controller(&["--allowed-cidrs", "cluster2=10.245.0.0/16"]);
    m.wait_routes(&["10.245.0.0/23 cluster2 10.20.144.165:32361"], "allowed by --allowed-cidrs");
}

/// Hand-written Istio meshNetworks entries that no agent could apply are refused one by
/// one; the good ones and every later update still reach the agents.
#[test]
fn a_bad_mesh_networks_entry_spoils_only_itself() {
    let m = Mesh::new();
    let networks = "networks:
  network1:
    endpoints: [{fromRegistry: cluster1}]
    gateways: [{address: 10.20.144.83, port: 31674}]
  hostname:
    endpoints: [{fromCidr: 10.250.0.0/16}]
    gateways: [{address: gw.example.com, port: 15443}]
  ipv6:
    endpoints: [{fromCidr: \"fd00:10:250::/64\"}]
    gateways: [{address: 10.20.144.171, port: 30443}]
  bigport:
    endpoints: [{fromCidr: 10.251.0.0/16}]
    gateways: [{address: 10.20.144.172, port: 70000}]
  hostbits:
    endpoints: [{fromCidr: 10.252.0.1/16}]
    gateways: [{address: 10.20.144.173, port: 30443}]
  misshapen:
    endpoints: {fromCidr: 10.253.0.0/16}
    gateways: [{address: 10.20.144.174, port: 30443}]
  good:
    endpoints: [{fromCidr: 10.254.0.0/16}]
    gateways: [{address: 10.20.144.175, port: 30443}]
";
    m.local.apply(istio_configmap(networks));
    let _controller = m.controller(&[]);
    let _agent = m.agent();
    m.wait_routes(
        &["10.245.0.0/24 cluster2 10.20.144.165:32361", "10.254.0.0/16 good 10.20.144.175:30443"],
        "the good network beside the bad ones",
    );
    for (peer, field) in [
        ("hostname", "gateways[0].address: \"gw.example.com\" is not a valid IPv4 address"),
        ("ipv6", "podCIDRs[0]: \"fd00:10:250::/64\" is IPv6"),
        ("bigport", "gateways[0].port: 70000 is not a valid port"),
        ("hostbits", "podCIDRs[0]: \"10.252.0.1/16\" has host bits set"),
        ("misshapen", "meshNetworks: "),
    ] {
        let why = refused_reason(&m, peer);
        assert!(why.contains(field), "{peer}: {why}");
    }
    // Later updates still apply.
    m.remote.apply(gateway_service(32999));
    m.wait_routes(
        &["10.245.0.0/24 cluster2 10.20.144.165:32999", "10.254.0.0/16 good 10.20.144.175:30443"],
        "an update after the bad entries",
    );
}

/// A typo in Istio's meshNetworks, or the istio ConfigMap deleted (an Istio reinstall does
/// it), withdraws no hand-written peer from the agents, nor does a controller restart
/// meanwhile: it stays, stale, with the reason. A controller that starts without the
/// ConfigMap (Istio gone for good) publishes none.
#[test]
fn an_unreadable_or_deleted_mesh_networks_keeps_the_hand_written_peers() {
    let m = Mesh::new();
    m.local.apply(istio_configmap("networks:\n  hand:\n    endpoints: [{fromCidr: 10.254.0.0/16}]\n    gateways: [{address: 10.20.144.175, port: 30443}]\n"));
    let mut controller = m.controller(&[]);
    let _agent = m.agent();
    let both = ["10.245.0.0/24 cluster2 10.20.144.165:32361", "10.254.0.0/16 hand 10.20.144.175:30443"];
    m.wait_routes(&both, "the hand-written network");
    m.local.apply(istio_configmap("networks:\n  hand: {endpoints: [{fromCidr: 10.254.0.0/16}]\n"));
    for (what, said) in [("a typo", "meshNetworks is not valid YAML"), ("the ConfigMap deleted", "the istio ConfigMap is gone")] {
        if what == "the ConfigMap deleted" {
            m.local.delete("v1", "ConfigMap", Some("istio-system"), "istio");
        }
        let seen = poll(WAIT, || m.published().filter(|(_, s)| s["hand"]["error"].as_str().is_some_and(|e| e.contains(said))));
        let (peers, status) = seen.unwrap_or_else(|| panic!("{what}: the status never said so: {:?}", m.published()));
        assert_eq!(status["hand"]["stale"], true, "{what}: {status:?}");
        assert!(peers.as_array().unwrap().iter().any(|p| p["name"] == "hand"), "{what}: withdrawn: {peers:?}");
        assert_eq!(m.routes(), both, "{what}");
        if what == "a typo" {
            // A new controller starts from what was published: its first publish keeps it.
            drop(controller);
            controller = m.controller(&[]);
            let stale = poll(WAIT, || Some(m.http(9465, "/readyz")).filter(|r| r.contains("stale peers: hand")));
            assert!(stale.is_some(), "a restarted controller dropped it: {}", m.http(9465, "/readyz"));
            assert_eq!(m.routes(), both, "after a restart");
            // So does one whose first read of what was published fails: it reads it later.
            drop(controller);
            m.local.set_mode(Mode::Error);
            controller = m.controller(&[]);
            assert!(controller.output().contains("could not read the published peers"), "{}", controller.output());
            m.local.set_mode(Mode::Normal);
            let stale = poll(WAIT, || Some(m.http(9465, "/readyz")).filter(|r| r.contains("stale peers: hand")));
            assert!(stale.is_some(), "a controller whose first read failed dropped it: {}", m.http(9465, "/readyz"));
            assert!(m.published().is_some_and(|(peers, _)| peers.as_array().unwrap().iter().any(|p| p["name"] == "hand")));
            assert_eq!(m.routes(), both, "after a restart whose first read failed");
        }
    }
    drop(controller);
    let _controller = m.controller(&[]);
    m.wait_routes(&both[..1], "a controller started without the ConfigMap");
}

/// The agent follows the published object peer by peer: garbage, a deleted object or one
/// peer it cannot read or accept leave the maps as they were, and /readyz says why.
#[test]
fn a_deleted_or_corrupted_publish_keeps_the_agents_maps() {
    let m = Mesh::new();
    let c2 = |port: u16| format!("- name: cluster2\n  podCIDRs: [10.245.0.0/24]\n  gateways: [{{address: 10.20.144.165, port: {port}}}]\n");
    let c3 = "- name: cluster3\n  podCIDRs: [10.246.0.0/24]\n  gateways: [{address: 10.20.144.170, port: 30443}]\n";
    m.local.apply(peers_configmap(&format!("{}{c3}", c2(32361))));
    let mut agent = m.agent_with(&["--metrics-addr", "127.0.0.1:9470"]);
    let both = ["10.245.0.0/24 cluster2 10.20.144.165:32361", "10.246.0.0/24 cluster3 10.20.144.170:30443"];
    m.wait_routes(&both, "initial publish");
    let ready = poll(WAIT, || Some(m.http(9470, "/readyz")).filter(|r| r.starts_with("HTTP/1.0 200")));
    assert!(ready.is_some(), "{}", m.http(9470, "/readyz"));
    let not_ready = |needle: &str| {
        let r = poll(WAIT, || Some(m.http(9470, "/readyz")).filter(|r| r.starts_with("HTTP/1.0 503") && r.contains(needle)));
        r.unwrap_or_else(|| panic!("/readyz never said {needle:?}: {}", m.http(9470, "/readyz")))
    };

    // Garbage instead of a list.
    m.local.apply(peers_configmap("{{{ not: [yaml"));
    not_ready("meshnet-peers is unreadable");
    assert_eq!(m.routes(), both, "garbage changed the maps");
    assert!(m.http(9470, "/metrics").contains("meshnet_api_peers_unreadable 1"));

    // One peer with a field this agent does not know (a newer controller) and one that claims
    // the metadata service: each keeps its last good state (or stays out), the rest applies.
    let c3_newer = "- name: cluster3\n  podCIDRs: [10.246.0.0/24]\n  gateways: [{address: 10.20.144.171, port: 30443}]\n  weight: 3\n";
    let c4_hijack = "- name: cluster4\n  podCIDRs: [169.254.169.254/32]\n  gateways: [{address: 10.20.144.172, port: 30443}]\n";
    m.local.apply(peers_configmap(&format!("{}{c3_newer}{c4_hijack}", c2(32999))));
    let updated = ["10.245.0.0/24 cluster2 10.20.144.165:32999", "10.246.0.0/24 cluster3 10.20.144.170:30443"];
    m.wait_routes(&updated, "the good peer updated, the unreadable one kept");
    let r = not_ready("cluster3");
    assert!(r.contains("unknown field `weight`") && r.contains("keeping its last good state"), "{r}");
    assert!(r.contains(r#"published peer "cluster4" refused: podCIDRs[0]: "169.254.169.254/32" refused"#), "{r}");
    let metrics = m.http(9470, "/metrics");
    assert!(metrics.contains("meshnet_api_peers_rejected 2"), "{metrics}");
    agent.child.wait_for_line("published peers: not applying", WAIT);

    // A restart meanwhile starts from the pinned state, not from nothing.
    assert!(agent.child.stop());
    let _agent = m.agent_with(&["--metrics-addr", "127.0.0.1:9470"]);
    not_ready("cluster3");
    assert_eq!(m.routes(), updated, "a restart lost the unreadable peer's last good state");

    // The object deleted: nothing is withdrawn.
    m.local.delete("v1", "ConfigMap", Some("meshnet"), "meshnet-peers");
    not_ready("does not exist");
    assert_eq!(m.routes(), updated, "deleting the object withdrew peers");

    // A readable publish that omits cluster3 withdraws it, and the agent is ready again.
    m.local.apply(peers_configmap(&c2(32999)));
    m.wait_routes(&["10.245.0.0/24 cluster2 10.20.144.165:32999"], "a good publish without cluster3");
    let ready = poll(WAIT, || Some(m.http(9470, "/readyz")).filter(|r| r.starts_with("HTTP/1.0 200")));
    assert!(ready.is_some(), "{}", m.http(9470, "/readyz"));
    assert!(m.routes().iter().all(|r| !r.starts_with("169.254.")));
}

/// `meshnet.io/datapath-log: "true"` on its Node makes that node's agent load the logging
/// build (on a kernel with ring buffers), and only that agent: another node's sees nothing.
#[test]
fn a_node_annotation_turns_datapath_logging_on_for_that_node() {
    if !meshnet::datapath_log::ring_buffers_supported() {
        meshnet_tests::skip("BPF ring buffers (5.8)");
        return;
    }
    let m = Mesh::new();
    let mut agent = m.agent();
    assert!(!agent.child.output().contains("datapath logging on"), "{}", agent.child.output());
    assert!(agent.child.stop(), "{}", agent.child.output());
    drop(agent);
    let mut n = m.local.get("v1", "Node", None, "node1").expect("node1");
    n["metadata"]["annotations"] = json!({"meshnet.io/datapath-log": "true"});
    m.local.apply(n);
    let mut agent = m.agent();
    assert!(agent.child.output().contains("datapath logging on"), "{}", agent.child.output());
    assert!(agent.child.stop(), "{}", agent.child.output());
    drop(agent);
    // Any other value is not a yes, and says so.
    let mut n = m.local.get("v1", "Node", None, "node1").expect("node1");
    n["metadata"]["annotations"] = json!({"meshnet.io/datapath-log": "yes"});
    m.local.apply(n);
    let agent = m.agent();
    let out = agent.child.output();
    assert!(!out.contains("datapath logging on") && out.contains("the annotation is not \"true\""), "{out}");
}

/// A cluster's meshnet-tunnel Service (deploy/base/tunnel-service.yaml), as 1.18 returns it.
fn tunnel_service(node_port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "meshnet-tunnel", "namespace": "meshnet", "labels": {"app.kubernetes.io/name": "meshnet", "app.kubernetes.io/component": "tunnel"}},
        "spec": {
            "type": "NodePort", "externalTrafficPolicy": "Local", "clusterIP": "10.96.0.60",
            "selector": {"app.kubernetes.io/name": "meshnet", "app.kubernetes.io/component": "agent"},
            "ports": [{"name": "tunnel", "protocol": "UDP", "port": 31800, "targetPort": 31800, "nodePort": node_port}]
        },
        "status": {"loadBalancer": {}}
    })
}

/// A remote secret whose annotation `meshnet.io/mode` is `mode`.
fn secret_in_mode(cluster: &str, kubeconfig: &str, mode: &str) -> Value {
    let mut s = remote_secret(cluster, kubeconfig);
    s["metadata"]["annotations"]["meshnet.io/mode"] = json!(mode);
    s
}

impl Mesh {
    /// The published entry of `peer`, and its status.
    fn published_peer(&self, peer: &str) -> Option<(Value, Value)> {
        let (peers, status) = self.published()?;
        let p = peers.as_array()?.iter().find(|p| p["name"] == peer)?.clone();
        Some((p, status[peer].clone()))
    }

    /// Waits until the published `peer` satisfies `ok`.
    fn wait_peer(&self, peer: &str, what: &str, ok: impl Fn(&Value, &Value) -> bool) -> (Value, Value) {
        let got = poll(WAIT, || self.published_peer(peer).filter(|(p, s)| ok(p, s)));
        got.unwrap_or_else(|| panic!("{what}: published {:?}", self.published()))
    }

    /// The agent's tunnel routes as `cidr peer node:port` lines.
    fn tunnel_routes(&self) -> Vec<String> {
        let out = meshnet(&self.ns, &format!("maps dump tunnel -o json --pin-path {}", self.bpffs.pin_path().display()));
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        v["tunnel"]["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{} {} {}:{}", r["cidr"].as_str().unwrap(), r["peer"].as_str().unwrap(), r["node"].as_str().unwrap(), r["port"]))
            .collect()
    }

    fn wait_tunnel_routes(&self, want: &[&str], what: &str) {
        let ok = poll(WAIT, || (self.tunnel_routes() == want).then_some(()));
        assert!(ok.is_some(), "{what}: tunnel routes are {:?}, want {want:?}; published {:?}", self.tunnel_routes(), self.published());
    }

    /// An agent whose config has a `tunnel:` section (uplink vethq, on the LAN 10.20.144.0/24
    /// where the remote's nodes are), so that it takes tunnel peers.
    fn tunnel_agent(&self) -> Agent {
        self.ns.ip("addr replace 10.20.144.83/24 dev vethq");
        self.ns.ip("link set vethq up");
        let cfg = self.dir.0.join("tunnel-agent.yaml");
        std::fs::write(
            &cfg,
            "cluster: cluster1\npodCIDRs: []\ninterfaces: [vethp]\ntunnel: {port: 31800, interfaces: [vethq]}\npeers: []\nhealth: {enabled: false}\n",
        )
        .unwrap();
        let kc = self.kubeconfig().display().to_string();
        Agent::start(&self.ns, &cfg, &self.bpffs.pin_path(), &["--kube", "--kubeconfig", &kc, "--node-name", "node1"])
    }
}

/// A remote whose secret says `meshnet.io/mode: tunnel` is published as a tunnel peer: every
/// node with its address and pod CIDRs, and its meshnet-tunnel Service's UDP nodePort. Its
/// east-west gateway is never read (a one-network mesh has none); a bad node is left out with
/// its reason; a lost Service keeps the last good state; `--mode` wins over the annotation,
/// and an annotation naming no mode refuses the peer.
#[test]
fn tunnel_mode_remotes_are_published_with_their_nodes() {
    let m = Mesh::new();
    m.remote.apply(tunnel_service(31800));
    m.remote.apply(node("node3", "10.20.144.166", "10.245.1.0/24"));
    m.local.apply(secret_in_mode("cluster2", &m.remote.kubeconfig("cluster2"), "tunnel"));
    let mut controller = m.controller(&[]);
    // The two objects are written one after the other: wait for the status of this publish.
    let (p, st) = m.wait_peer("cluster2", "initial tunnel discovery", |p, st| p["mode"] == "tunnel" && st.get("stale").is_none());
    assert_eq!(p["podCIDRs"], json!(["10.245.0.0/23"]));
    assert_eq!(p["tunnelPort"], 31800);
    assert_eq!(
        p["nodes"],
        json!([{"address": "10.20.144.165", "podCIDRs": ["10.245.0.0/24"]}, {"address": "10.20.144.166", "podCIDRs": ["10.245.1.0/24"]}])
    );
    assert!(p["gateways"].as_array().is_none_or(Vec::is_empty), "{p}");
    assert_eq!(st, json!({}), "a healthy tunnel peer has nothing to report");
    let asked: Vec<String> = m.remote.requests().into_iter().map(|r| r.path).collect();
    assert!(asked.iter().any(|p| p.starts_with("/api/v1/namespaces/meshnet/services")), "{asked:?}");
    assert!(!asked.iter().any(|p| p.contains("istio-system/services") || p.contains("/endpoints")), "a tunnel remote's gateway was read: {asked:?}");

    // The nodePort changes; a node joins; a node with a loopback address is left out, with why.
    m.remote.apply(tunnel_service(31999));
    m.wait_peer("cluster2", "nodePort change", |p, _| p["tunnelPort"] == 31999);
    m.remote.apply(node("node4", "10.20.144.167", "10.245.2.0/24"));
    m.remote.apply(node("node5", "127.0.0.1", "10.245.3.0/24"));
    let (p, st) = m.wait_peer("cluster2", "nodes change", |p, st| p["nodes"].as_array().unwrap().len() == 3 && st["skipped"].is_string());
    assert_eq!(p["nodes"][2], json!({"address": "10.20.144.167", "podCIDRs": ["10.245.2.0/24"]}));
    assert!(st["skipped"].as_str().unwrap().starts_with("node node5: address refused: 127.0.0.1"), "{st}");

    // Without the Service there is no tunnel port: the last good state stays, with the reason.
    m.remote.delete("v1", "Service", Some("meshnet"), "meshnet-tunnel");
    let (p, st) = m.wait_peer("cluster2", "Service deleted", |_, st| st["error"].is_string());
    assert_eq!((p["tunnelPort"].clone(), st["stale"].clone()), (json!(31999), json!(true)));
    assert!(st["error"].as_str().unwrap().contains("Service meshnet-tunnel not found"), "{st}");
    m.remote.apply(tunnel_service(31800));
    m.wait_peer("cluster2", "Service back", |p, st| p["tunnelPort"] == 31800 && st.get("stale").is_none());

    // The flag wins over the annotation.
    assert!(controller.stop());
    let mut controller = m.controller(&["--mode", "cluster2=gateway"]);
    m.wait_peer("cluster2", "--mode cluster2=gateway", |p, _| p.get("mode").is_none() && p["gateways"][0]["port"] == 32361);
    assert!(controller.stop());

    // An annotation that names no mode refuses the peer, whatever its last state.
    m.local.apply(secret_in_mode("cluster2", &m.remote.kubeconfig("cluster2"), "tunel"));
    let _controller = m.controller(&[]);
    let refused = poll(WAIT, || m.published().filter(|(p, s)| s["cluster2"]["refused"].is_string() && p.as_array().is_some_and(Vec::is_empty)));
    let (_, status) = refused.unwrap_or_else(|| panic!("a mode typo was not refused: {:?}", m.published()));
    assert!(status["cluster2"]["refused"].as_str().unwrap().contains(r#"meshnet.io/mode: "tunel" is neither "gateway" nor "tunnel""#), "{status}");
}

/// An agent with a `tunnel:` section puts a published tunnel peer's nodes into its tunnel
/// maps, and an agent restarted while the API is down serves them as they were: nothing of a
/// tunnel peer is withdrawn before the API answers.
#[test]
fn a_restart_during_an_api_outage_keeps_the_tunnel_peers() {
    let m = Mesh::new();
    m.remote.apply(tunnel_service(31800));
    m.remote.apply(node("node3", "10.20.144.166", "10.245.1.0/24"));
    m.local.apply(secret_in_mode("cluster2", &m.remote.kubeconfig("cluster2"), "tunnel"));
    let _controller = m.controller(&[]);
    let mut agent = m.tunnel_agent();
    let want = ["10.245.0.0/24 cluster2 10.20.144.165:31800", "10.245.1.0/24 cluster2 10.20.144.166:31800"];
    m.wait_tunnel_routes(&want, "initial publish");
    assert!(m.routes().is_empty(), "a tunnel peer got gateway routes: {:?}", m.routes());

    m.local.set_mode(Mode::Error);
    agent.child.wait_for_line("Kubernetes API watch failing", WAIT);
    assert!(agent.child.stop());
    let agent = m.tunnel_agent();
    assert!(agent.child.output().contains("waiting for the published peers"), "{}", agent.child.output());
    // The start's own sync has run (the agent is ready); give a withdrawal time to show.
    for _ in 0..20 {
        assert_eq!(m.tunnel_routes(), want, "a restart during an API outage withdrew tunnel routes:\n{}", agent.child.output());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Once the API answers again, the agent follows it.
    m.local.set_mode(Mode::Normal);
    m.remote.apply(tunnel_service(31900));
    m.wait_tunnel_routes(&["10.245.0.0/24 cluster2 10.20.144.165:31900", "10.245.1.0/24 cluster2 10.20.144.166:31900"], "after the outage");
}

/// `meshnet mesh-networks` writes no entry for a remote in tunnel mode (by flag or by its
/// secret's annotation) and drops the hand-written one: with every remote in tunnel mode no
/// meshNetworks is left, and the comments above the block say so. Beside a remote in gateway
/// mode, that one's network is written as before, and a tunnel remote labelled with its
/// network is warned about.
#[test]
fn mesh_networks_leave_tunnel_remotes_out() {
    let m = Mesh::new();
    let seed = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/seed-mesh-networks.yaml")).unwrap();
    m.local.apply(istio_configmap(&seed));
    let lines = |out: &str| out.lines().filter(|l| l.starts_with("# ")).map(str::to_string).collect::<Vec<_>>();
    let out = mesh_networks_cmd(&m, "--mode cluster2=tunnel");
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(serde_yaml::from_str::<Value>(&out.stdout).unwrap(), json!({"networks": {}}), "{}", out.stdout);
    let notes = lines(&out.stdout);
    assert!(notes[0].starts_with("# every remote is in tunnel mode: run Istio multi-primary as ONE network with cluster1"), "{notes:?}");
    assert!(notes[1].starts_with("# cluster2: tunnel mode: no entry"), "{notes:?}");
    // The gateways are not read: the remote's is never asked for.
    assert!(!m.remote.requests().iter().any(|r| r.path.contains("istio-eastwestgateway")), "a tunnel remote's gateway was read");

    // The annotation does the same; -o json keeps the notes out of the JSON; --apply writes it.
    m.local.apply(secret_in_mode("cluster2", &m.remote.kubeconfig("cluster2"), "tunnel"));
    let json = mesh_networks_cmd(&m, "-o json");
    assert_eq!(serde_json::from_str::<Value>(&json.stdout).unwrap(), json!({"networks": {}}), "{}", json.stdout);
    assert!(json.stderr.contains("cluster2: tunnel mode: no entry"), "{}", json.stderr);
    let out = mesh_networks_cmd(&m, "--apply");
    assert!(out.ok, "{}", out.stderr);
    let cm = m.local.get("v1", "ConfigMap", Some("istio-system"), "istio").unwrap();
    assert_eq!(serde_yaml::from_str::<Value>(cm["data"]["meshNetworks"].as_str().unwrap()).unwrap(), json!({"networks": {}}));
    assert!(!cm["data"]["meshNetworks"].as_str().unwrap().contains('#'), "the notes were written into the ConfigMap");

    // A third cluster in gateway mode keeps its network, and this cluster's; cluster2, labelled
    // with cluster3's network, would be sent through its gateway: warned.
    let third = FakeApi::start(Some(&m.ns.path()));
    seed_cluster(&third, "network3", "node4", "10.20.144.170", "10.246.0.0/24", 30443, "10.246.0.5");
    m.local.apply(remote_secret("cluster3", &third.kubeconfig("cluster3")));
    m.remote.apply(namespace("istio-system", "network3"));
    let out = mesh_networks_cmd(&m, "");
    assert!(out.ok, "{}", out.stderr);
    let got: Value = serde_yaml::from_str(&out.stdout).unwrap();
    let nets = got["networks"].as_object().unwrap();
    assert_eq!(nets.keys().collect::<Vec<_>>(), ["network1", "network3"], "{}", out.stdout);
    assert_eq!(got["networks"]["network3"]["gateways"], json!([{"address": "10.20.144.170", "port": 30443}]));
    let notes = lines(&out.stdout);
    assert!(notes[0].starts_with("# multi-network for the remotes in gateway mode"), "{notes:?}");
    assert!(notes[1].contains(r#"WARNING: its topology.istio.io/network label is "network3""#) && notes[1].contains(r#"label it "network1""#), "{notes:?}");
}
