//! The agent's control plane, measured from outside on the agent process this benchmark
//! started (the release `meshnet` binary in node1 of the test topology):
//!
//! - config change → map: the config file is replaced by an atomic rename (as a ConfigMap
//!   update does) with one route changed, and the pinned route map is polled (every 50 µs)
//!   until the new route shows; with the agent finding the change by itself (it checks the
//!   file every `--rescan-seconds`) and with a SIGHUP sent right after the rename;
//! - applying 10,000 routes, and withdrawing them again (SIGHUP);
//! - RSS and CPU from /proc/PID/status and /proc/PID/stat, idle and under churn (a config
//!   reload every 100 ms alternating between two 1,000-route configs, and a pod interface
//!   appearing or disappearing every 200 ms).

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use aya::maps::lpm_trie::Key;
use meshnet::{
    maps::{self, addr_be, Routes},
    pins::Pins,
};
use meshnet_common::names;
use meshnet_tests::{
    topo::{node1_config, Options, Topology, POD_INTERFACES},
    Agent,
};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::stats::{quantile_sorted, round, Stat};

pub struct Params {
    pub changes: usize,
    pub bulk_reps: usize,
    pub idle_secs: f64,
    pub churn_secs: f64,
}

impl Params {
    #[must_use]
    pub fn new(quick: bool) -> Self {
        if quick {
            Self { changes: 20, bulk_reps: 3, idle_secs: 5.0, churn_secs: 5.0 }
        } else {
            Self { changes: 100, bulk_reps: 7, idle_secs: 20.0, churn_secs: 20.0 }
        }
    }
}

/// node1's standard config plus a peer `cluster3` with `cidrs`.
fn config_with(cidrs: &[String]) -> String {
    let mut c = node1_config(POD_INTERFACES);
    if !cidrs.is_empty() {
        c.push_str("  - name: cluster3\n    podCIDRs:\n");
        for n in cidrs {
            c.push_str(&format!("      - \"{n}\"\n"));
        }
        c.push_str("    gateways:\n      - address: 192.0.2.3\n        port: 30000\n");
    }
    c
}

/// `count` consecutive /24s from 11.0.0.0, starting at the `first`-th.
fn bulk_cidrs(first: usize, count: usize) -> Vec<String> {
    (first..first + count).map(|i| format!("{}/24", Ipv4Addr::from(0x0b00_0000u32 + ((i as u32) << 8)))).collect()
}

fn has_route(routes: &Routes, cidr: &str) -> bool {
    let (addr, len) = cidr.split_once('/').expect("a CIDR");
    let addr: Ipv4Addr = addr.parse().expect("an address");
    routes.get(&Key::new(len.parse().expect("a prefix length"), addr_be(addr)), 0).is_ok()
}

/// Polls the pinned route map every 50 µs until `cidr` is present (or absent); the time
/// since `t0`.
fn wait_route(routes: &Routes, cidr: &str, present: bool, t0: Instant) -> anyhow::Result<Duration> {
    let deadline = t0 + Duration::from_secs(30);
    loop {
        if has_route(routes, cidr) == present {
            return Ok(t0.elapsed());
        }
        ensure!(Instant::now() < deadline, "{cidr} did not {} the route map within 30 s", if present { "reach" } else { "leave" });
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// A cheap deterministic generator for the pauses between changes.
struct Lcg(u64);

impl Lcg {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn latency_summary(samples_ms: &[f64]) -> Value {
    let mut v = samples_ms.to_vec();
    v.sort_by(f64::total_cmp);
    json!({
        "n": v.len(),
        "p50_ms": round(quantile_sorted(&v, 0.50)),
        "p99_ms": round(quantile_sorted(&v, 0.99)),
        "min_ms": round(v[0]),
        "max_ms": round(v[v.len() - 1]),
        "samples_ms": v.iter().map(|x| round(*x)).collect::<Vec<_>>(),
    })
}

/// Resident set and CPU time of a process, from /proc.
#[derive(Clone, Copy, Debug)]
struct Usage {
    rss_kb: u64,
    hwm_kb: u64,
    cpu_ticks: u64,
    at: Instant,
}

fn usage(pid: i32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').context("odd /proc/PID/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let cpu_ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Usage { rss_kb: kb("VmRSS:"), hwm_kb: kb("VmHWM:"), cpu_ticks, at: Instant::now() })
}

fn usage_between(a: Usage, b: Usage) -> Value {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let secs = (b.at - a.at).as_secs_f64();
    json!({
        "seconds": round(secs),
        "cpu_percent": round((b.cpu_ticks - a.cpu_ticks) as f64 / hz / secs * 100.0),
        "rss_mb": round(b.rss_kb as f64 / 1024.0),
        "peak_rss_mb": round(b.hwm_kb as f64 / 1024.0),
    })
}

fn start_agent(t: &Topology, cfg: &Path, extra: &[&str]) -> anyhow::Result<Agent> {
    let agent = Agent::start(&t.node1, cfg, &t.pin_path(), extra);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", agent.child.pid()))?;
    ensure!(comm.trim() == "meshnet", "the agent's pid runs {comm:?}, not meshnet");
    Ok(agent)
}

/// One change at a time: a new cluster3 CIDR replaces the previous one.
fn change_latencies(
    t: &Topology,
    agent: &Agent,
    routes: &Routes,
    p: &Params,
    base: u8,
    sighup: bool,
    period: f64,
) -> anyhow::Result<Vec<f64>> {
    let mut rng = Lcg(u64::from(base));
    let mut out = Vec::with_capacity(p.changes);
    for i in 0..p.changes {
        let cidr = format!("10.{base}.{i}.0/24");
        // A pause of random length, so that changes land at random points of the agent's
        // file-check period.
        std::thread::sleep(Duration::from_secs_f64(0.02 + rng.next_f64() * period));
        t.write_config(&config_with(std::slice::from_ref(&cidr)));
        let t0 = Instant::now();
        if sighup {
            agent.child.signal(Signal::SIGHUP);
        }
        out.push(wait_route(routes, &cidr, true, t0)?.as_secs_f64() * 1e3);
    }
    Ok(out)
}

pub fn run(p: &Params) -> anyhow::Result<Value> {
    let started = Instant::now();
    let t = Topology::new(Options::default());
    let cfg = t.write_config(&config_with(&[]));
    let pins = Pins::new(t.pin_path());
    let mut agent = start_agent(&t, &cfg, &[])?;
    let routes: Routes = maps::open(&pins, names::ROUTES)?;

    // Idle: the standard config, health probes and GC running, nothing changing.
    eprintln!("bench: control plane, idle");
    std::thread::sleep(Duration::from_secs(2));
    let a = usage(agent.child.pid())?;
    std::thread::sleep(Duration::from_secs_f64(p.idle_secs));
    let idle = usage_between(a, usage(agent.child.pid())?);

    eprintln!("bench: control plane, config change → map");
    let file_1s = change_latencies(&t, &agent, &routes, p, 250, false, 1.0)?;
    let sighup = change_latencies(&t, &agent, &routes, p, 251, true, 0.05)?;

    eprintln!("bench: control plane, 10,000 routes");
    let big = bulk_cidrs(0, 10_000);
    let last = big.last().unwrap().clone();
    let (mut apply, mut withdraw) = (Vec::new(), Vec::new());
    let mut idle_10k = Value::Null;
    for rep in 0..p.bulk_reps {
        t.write_config(&config_with(&big));
        let t0 = Instant::now();
        agent.child.signal(Signal::SIGHUP);
        apply.push(wait_route(&routes, &last, true, t0)?.as_secs_f64() * 1e3);
        let n = routes.iter().count();
        ensure!(n == 10_001, "after applying 10,000 routes the map holds {n}");
        if rep == 0 {
            std::thread::sleep(Duration::from_secs(2));
            let a = usage(agent.child.pid())?;
            std::thread::sleep(Duration::from_secs_f64(p.idle_secs));
            idle_10k = usage_between(a, usage(agent.child.pid())?);
        }
        t.write_config(&config_with(&[]));
        let t0 = Instant::now();
        agent.child.signal(Signal::SIGHUP);
        withdraw.push(wait_route(&routes, &last, false, t0)?.as_secs_f64() * 1e3);
        let n = routes.iter().count();
        ensure!(n == 1, "after withdrawing them the map holds {n}");
    }

    eprintln!("bench: control plane, churn");
    let configs = [config_with(&bulk_cidrs(0, 1_000)), config_with(&bulk_cidrs(100, 1_000))];
    t.write_config(&configs[0]);
    agent.child.signal(Signal::SIGHUP);
    wait_route(&routes, &bulk_cidrs(999, 1)[0], true, Instant::now())?;
    // The agent logs a reload after its maps are written: let that line arrive first.
    std::thread::sleep(Duration::from_millis(300));
    let reloads_before = agent.child.output().matches("config reloaded").count();
    let a = usage(agent.child.pid())?;
    let end = Instant::now() + Duration::from_secs_f64(p.churn_secs);
    let (mut changes, mut iface_events, mut k) = (0u64, 0u64, 0usize);
    while Instant::now() < end {
        k += 1;
        t.write_config(&configs[k % 2]);
        agent.child.signal(Signal::SIGHUP);
        changes += 1;
        if k % 2 == 0 {
            if (k / 2) % 2 == 1 {
                t.node1.ip("link add vethchurn0 type veth peer name vethchurn1");
            } else {
                t.node1.ip("link del vethchurn0");
            }
            iface_events += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = usage(agent.child.pid())?;
    let _ = t.node1.try_exec("ip link del vethchurn0 2>/dev/null");
    std::thread::sleep(Duration::from_millis(500));
    let reloads = agent.child.output().matches("config reloaded").count() - reloads_before;
    let mut churn = usage_between(a, b);
    churn["config_changes"] = json!(changes);
    churn["reloads_logged"] = json!(reloads);
    churn["interface_events"] = json!(iface_events);

    // The file path once more with a short check period.
    eprintln!("bench: control plane, config change → map with --rescan-seconds 0.1");
    t.write_config(&config_with(&[]));
    agent.child.stop();
    let agent = start_agent(&t, &cfg, &["--rescan-seconds", "0.1"])?;
    let file_100ms = change_latencies(&t, &agent, &routes, p, 252, false, 0.1)?;

    Ok(json!({
        "change_to_map": {
            "file_rescan_1s": latency_summary(&file_1s),
            "sighup": latency_summary(&sighup),
            "file_rescan_100ms": latency_summary(&file_100ms),
        },
        "routes_10k": {
            "apply_ms": Stat::of(&apply).json(),
            "withdraw_ms": Stat::of(&withdraw).json(),
        },
        "resources": {
            "idle": idle,
            "idle_10k_routes": idle_10k,
            "churn": churn,
        },
        "seconds": round(started.elapsed().as_secs_f64()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_validate() {
        for cidrs in [vec![], vec!["10.250.3.0/24".to_string()], bulk_cidrs(0, 10_000)] {
            let c = meshnet::config::Config::from_yaml(&config_with(&cidrs)).unwrap();
            assert_eq!(c.desired().routes.len(), 1 + cidrs.len());
        }
        assert_eq!(bulk_cidrs(9_999, 1), vec!["11.39.15.0/24".to_string()]);
    }
}
