//! Discovery at scale, against the in-process API servers of the test suite: a local cluster
//! and N remote clusters of M nodes each (50 × 1,000 in the full run), each remote with its
//! east-west gateway Service and Endpoints, and a remote secret for each in the local one.
//! `meshnet controller` watches them all; one `meshnet agent --kube` follows what it
//! publishes into its pinned maps.
//!
//! - initial sync: from the controller's start until the agent's maps route every remote;
//! - gateway move → maps: a remote's gateway pod moves to another node (its Endpoints
//!   change), and the agent's maps are polled until that peer's gateway is the new node's
//!   address; while node status heartbeats arrive for random nodes of every remote, as
//!   kubelets send them;
//! - the controller's peak RSS (VmHWM) at the end.
//!
//! Every server listens on 127.0.0.1 inside the benchmark's own network namespace, and no
//! address below is ever sent a packet (the agent's health probes are off).

use std::{
    net::Ipv4Addr,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use base64::Engine as _;
use meshnet_tests::{fakeapi::FakeApi, topo::TempDir, Agent, Bpffs, ChildGuard, NetNs};
use serde_json::{json, Value};

use crate::stats::round;

pub struct Params {
    pub clusters: usize,
    pub nodes: usize,
    pub moves: usize,
}

impl Params {
    #[must_use]
    pub fn new(quick: bool) -> Self {
        // The scale is the target's in both modes (it takes seconds to set up); quick mode
        // only measures fewer moves.
        if quick {
            Self { clusters: 50, nodes: 1000, moves: 30 }
        } else {
            Self { clusters: 50, nodes: 1000, moves: 100 }
        }
    }
}

/// Which remote a route's CIDR belongs to: remote `k` has 10.4k.0.0/14, one /24 per node,
/// which the controller aggregates into one or a few routes.
fn cluster_of(cidr: &str) -> Option<usize> {
    let second: usize = cidr.strip_prefix("10.")?.split('.').next()?.parse().ok()?;
    Some(second / 4)
}

/// Whether every route of remote `k` goes to `addr`.
fn all_via(routes: &[(String, String)], k: usize, addr: &str) -> bool {
    let mine: Vec<_> = routes.iter().filter(|(c, _)| cluster_of(c) == Some(k)).collect();
    !mine.is_empty() && mine.iter().all(|(_, a)| a == addr)
}

fn node_pod_cidr(k: usize, i: usize) -> String {
    format!("10.{}.{}.0/24", 4 * k + i / 256, i % 256)
}

/// Node `i` of remote `k`'s address, from 100.64.0.0/10, which nothing here routes.
fn node_ip(k: usize, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64 + u8::try_from(k).unwrap(), u8::try_from(i / 256).unwrap(), u8::try_from(i % 256).unwrap())
}

fn node(name: &str, ip: Ipv4Addr, cidr: &str, heartbeat: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": format!("heartbeat {heartbeat}")}],
            "nodeInfo": {"kubeletVersion": "v1.18.2"}
        }
    })
}

fn gateway(api: &FakeApi, node_port: u16, on_node: &str) {
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system"},
        "spec": {"type": "NodePort", "ports": [{"name": "tls", "protocol": "TCP", "port": 15443, "targetPort": 15443, "nodePort": node_port}]}
    }));
    api.apply(json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system"},
        "subsets": [{"addresses": [{"ip": "10.255.0.5", "nodeName": on_node}], "ports": [{"name": "tls", "port": 15443, "protocol": "TCP"}]}]
    }));
}

fn namespaces(api: &FakeApi, network: &str) {
    for ns in ["istio-system", "meshnet"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"topology.istio.io/network": network}}}));
    }
}

/// The agent's routes as (cidr, first gateway address), from `maps dump`.
fn routes(ns: &NetNs, pin: &std::path::Path) -> Vec<(String, String)> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(meshnet_tests::meshnet_bin())
        .args(["maps", "dump", "routes", "-o", "json", "--pin-path"])
        .arg(pin)
        .output();
    let Ok(out) = out else { return Vec::new() };
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["cidr"].as_str()?.to_string(), r["gateways"][0]["address"].as_str()?.to_string())))
        .collect()
}

/// A memory figure of a process (`VmHWM:` is the peak, `VmRSS:` the current), in MB.
fn mem_mb(pid: i32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix(field)).and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap_or(f64::NAN);
    kb / 1024.0
}

pub fn run(p: &Params) -> anyhow::Result<Value> {
    let ns = NetNs::new("bd");
    ns.ip("link add vethp type veth peer name vethq");
    ns.ip("link set vethp up");
    let bpffs = Bpffs::new();
    let dir = TempDir::new();
    let local = FakeApi::start(Some(&ns.path()));
    namespaces(&local, "network1");
    local.apply(node("local1", Ipv4Addr::new(100, 127, 0, 1), "10.244.0.0/24", 0));
    local.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"}, "data": {"meshNetworks": ""}}));
    let t_fill = Instant::now();
    let mut remotes = Vec::new();
    for k in 0..p.clusters {
        let api = FakeApi::start(Some(&ns.path()));
        namespaces(&api, &format!("network-r{k}"));
        for i in 0..p.nodes {
            api.apply(node(&format!("n{i}"), node_ip(k, i), &node_pod_cidr(k, i), 0));
        }
        gateway(&api, 30000 + u16::try_from(k).unwrap(), "n0");
        let name = format!("r{k}");
        local.apply(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": format!("istio-remote-secret-{name}"), "namespace": "istio-system", "labels": {"istio/multiCluster": "true"}},
            "data": {name.clone(): base64::engine::general_purpose::STANDARD.encode(api.kubeconfig(&name))}
        }));
        remotes.push(api);
    }
    eprintln!("bench: discovery: {} clusters × {} nodes in the fake API servers ({:.1} s)", p.clusters, p.nodes, t_fill.elapsed().as_secs_f64());
    let kubeconfig = dir.0.join("local.yaml");
    std::fs::write(&kubeconfig, local.kubeconfig("local"))?;
    let cfg = dir.0.join("agent.yaml");
    std::fs::write(&cfg, "cluster: local\npodCIDRs: []\ninterfaces: [vethp]\npeers: []\nhealth: {enabled: false}\n")?;

    let t0 = Instant::now();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()))
        .arg(meshnet_tests::meshnet_bin())
        .args(["controller", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--probe-interval-seconds", "5", "--probe-timeout-seconds", "5"])
        .env("MESHNET_LOG", "warn");
    let controller = ChildGuard::spawn(&mut cmd);
    let kc = kubeconfig.display().to_string();
    let agent = Agent::start(&ns, &cfg, &bpffs.pin_path(), &["--kube", "--kubeconfig", &kc, "--node-name", "local1"]);
    let pin = bpffs.pin_path();
    let want = p.clusters;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = routes(&ns, &pin);
        let seen: std::collections::BTreeSet<usize> = r.iter().filter_map(|(c, _)| cluster_of(c)).collect();
        if seen.len() >= want {
            break;
        }
        ensure!(Instant::now() < deadline, "only {} of {want} peers reached the maps in 600 s:\n{}", seen.len(), controller.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    let initial_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: discovery: all {want} peers in the agent's maps after {initial_s:.2} s");

    // Heartbeats: node status updates at random nodes of every remote, as kubelets send them
    // (bounded in rate and in time: they stop with the moves).
    let stop = Arc::new(AtomicBool::new(false));
    let beats = Arc::new(AtomicU64::new(0));
    let remotes = Arc::new(remotes);
    let hb = {
        let (stop, beats, remotes, nodes) = (stop.clone(), beats.clone(), remotes.clone(), p.nodes);
        std::thread::spawn(move || {
            let mut n = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                for (k, api) in remotes.iter().enumerate() {
                    n += 1;
                    // A cheap, deterministic spread over the nodes.
                    let i = usize::try_from(n.wrapping_mul(2_654_435_761) % nodes as u64).unwrap();
                    api.apply(node(&format!("n{i}"), node_ip(k, i), &node_pod_cidr(k, i), n));
                }
                beats.fetch_add(remotes.len() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mut lat_ms = Vec::new();
    for m in 0..p.moves {
        let k = m % p.clusters;
        let to = 1 + m / p.clusters % (p.nodes - 1);
        let addr = node_ip(k, to).to_string();
        let t = Instant::now();
        gateway(&remotes[k], 30000 + u16::try_from(k).unwrap(), &format!("n{to}"));
        let limit = t + Duration::from_secs(30);
        loop {
            if all_via(&routes(&ns, &pin), k, &addr) {
                break;
            }
            ensure!(Instant::now() < limit, "move {m}: remote {k} never went to {addr}");
        }
        lat_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // Back to n0 for the next round, unmeasured.
        gateway(&remotes[k], 30000 + u16::try_from(k).unwrap(), "n0");
        let back = node_ip(k, 0).to_string();
        let limit = Instant::now() + Duration::from_secs(30);
        while !all_via(&routes(&ns, &pin), k, &back) {
            ensure!(Instant::now() < limit, "move {m}: remote {k} never came back to {back}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    hb.join().map_err(|_| anyhow::anyhow!("heartbeat thread panicked"))?;
    let rss = mem_mb(controller.pid(), "VmHWM:");
    let rss_now = mem_mb(controller.pid(), "VmRSS:");
    let mut sorted = lat_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |x: f64| round(crate::stats::quantile_sorted(&sorted, x));
    let seconds = t0.elapsed().as_secs_f64();
    let out = json!({
        "clusters": p.clusters,
        "nodes_per_cluster": p.nodes,
        "initial_sync_s": round(initial_s),
        "move_to_maps": {"n": sorted.len(), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(*sorted.last().context("no moves")?), "samples_ms": sorted.iter().map(|x| round(*x)).collect::<Vec<_>>()},
        "heartbeats": beats.load(Ordering::Relaxed),
        "heartbeats_per_s": round(beats.load(Ordering::Relaxed) as f64 / seconds),
        "controller_peak_rss_mb": round(rss),
        "controller_rss_mb": round(rss_now),
    });
    eprintln!("bench: discovery: {out}");
    // The API servers wait for their open requests before they stop, and the controller's
    // and agent's watches are open until those processes end: end them first.
    drop(agent);
    drop(controller);
    Ok(out)
}
