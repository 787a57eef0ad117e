//! End to end through the two-cluster topology of `meshnet_tests::topo`:
//! client pod → node1 → LAN → node2 (NodePort DNAT) → gateway pod.
//!
//! The servers run in the gateway pod itself, behind the NodePort: iperf3 (NodePort 31690 →
//! gateway:5201) and a request/response server (NodePort 31691 → gateway:7000). So every mode
//! carries the same bytes over the same path to the same socket, and differs only in how
//! node1 gets a pod's packet to the NodePort:
//!
//! - `floor`: the client addresses `192.0.2.2:NodePort` itself; nothing to translate.
//! - `meshnet`: the client addresses the remote pod (10.245.0.20:7000, 10.246.0.20:5201);
//!   meshnet's programs on the pod's veth rewrite it to the NodePort.
//! - `iptables-N`: meshnet detached; iptables DNAT on node1 does the same rewrite, with N
//!   non-matching DNAT rules (other remote CIDRs) ahead of the matching one.
//!
//! A relay in the gateway pod (as Istio's gateway is) would add a user-space copy to every
//! mode alike and make the modes look closer than they are, so there is none.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use meshnet::pins::{Direction, Pins};
use meshnet_tests::{
    poll,
    topo::{Options, Topology, NODE2_LAN},
    Agent, ChildGuard, NetNs,
};
use serde_json::{json, Value};

use crate::stats::{quantile_sorted, ratios, round, Stat};

const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 10);
const NP_BULK: u16 = 31690;
const NP_RR: u16 = 31691;
const BULK_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// What the client addresses in the translated modes: pods of two remote CIDRs, one per
/// NodePort (meshnet sends a whole peer to one NodePort, as to an east-west gateway).
const REMOTE_RR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 245, 0, 20), RR_PORT);
const REMOTE_BULK: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 246, 0, 20), BULK_PORT);
const MSG: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Caps on the load generators besides their duration.
const MAX_RR: usize = 5_000_000;
const MAX_CONNECTIONS: u64 = 2_000_000;

pub struct Params {
    pub reps: usize,
    pub bulk_secs: u32,
    pub rr_secs: f64,
    pub crr_secs: f64,
    pub crr_concurrency: usize,
    pub rules: Vec<usize>,
}

impl Params {
    #[must_use]
    pub fn new(quick: bool) -> Self {
        if quick {
            Self { reps: 3, bulk_secs: 2, rr_secs: 2.0, crr_secs: 2.0, crr_concurrency: 4, rules: vec![1, 1_000, 10_000] }
        } else {
            Self { reps: 7, bulk_secs: 8, rr_secs: 5.0, crr_secs: 5.0, crr_concurrency: 4, rules: vec![1, 1_000, 10_000] }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Floor,
    Meshnet,
    Iptables(usize),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Floor => "floor".into(),
            Mode::Meshnet => "meshnet".into(),
            Mode::Iptables(n) => format!("iptables-{n}"),
        }
    }

    fn targets(self) -> (SocketAddrV4, SocketAddrV4) {
        let node2: Ipv4Addr = NODE2_LAN.parse().unwrap();
        match self {
            Mode::Floor => (SocketAddrV4::new(node2, NP_RR), SocketAddrV4::new(node2, NP_BULK)),
            _ => (REMOTE_RR, REMOTE_BULK),
        }
    }
}

fn config(interfaces: &str) -> String {
    format!(
        "cluster: cluster1
podCIDRs: [\"10.244.0.0/16\"]
interfaces: [\"{interfaces}\"]
peers:
  - name: cluster2
    podCIDRs: [\"10.245.0.0/16\"]
    gateways:
      - {{address: {NODE2_LAN}, port: {NP_RR}}}
  - name: cluster2-bulk
    podCIDRs: [\"10.246.0.0/16\"]
    gateways:
      - {{address: {NODE2_LAN}, port: {NP_BULK}}}
health:
  enabled: false
"
    )
}

// ---------------------------------------------------------------------------------------
// The request/response server in the gateway pod
// ---------------------------------------------------------------------------------------

/// Answers each `MSG`-byte request with the same bytes; a request starting with `C` gets
/// its answer and then the server closes (the server closes first, so TIME_WAIT stays on
/// the server side and the client's ports are free again at once).
struct EchoServer {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &NetNs, addr: SocketAddr, workers: usize) -> anyhow::Result<Self> {
        let listener: TcpListener = ns
            .run(move || -> std::io::Result<TcpListener> {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&addr.into())?;
                s.listen(4096)?;
                Ok(s.into())
            })
            .context("binding the request/response server")?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..workers)
            .map(|_| {
                let (l, stop) = (listener.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((s, _)) = l.accept() {
                            serve(s);
                        }
                    }
                })
            })
            .collect();
        Ok(Self { stop, listener, threads })
    }
}

fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; MSG];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() || buf[0] == b'C' {
            return;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Shutting the listening socket down wakes every worker blocked in accept().
        let _ = socket2::SockRef::from(&*self.listener).shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Load generators, run in the client pod; bounded by time and count
// ---------------------------------------------------------------------------------------

fn connect(target: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One request/response and its answer, to check that a mode carries traffic at all.
fn probe(ns: &NetNs, target: SocketAddrV4) -> anyhow::Result<()> {
    ns.run(move || -> std::io::Result<()> {
        let mut s = connect(target)?;
        let req = [b'R'; MSG];
        s.write_all(&req)?;
        let mut buf = [0u8; MSG];
        s.read_exact(&mut buf)?;
        if buf == req {
            Ok(())
        } else {
            Err(std::io::Error::other("wrong answer"))
        }
    })
    .with_context(|| format!("request/response to {target}"))
}

/// Request/response latencies (ns) over one connection for `secs`.
fn rr(ns: &NetNs, target: SocketAddrV4, secs: f64) -> anyhow::Result<(Vec<u32>, f64)> {
    ns.run(move || -> std::io::Result<(Vec<u32>, f64)> {
        let mut s = connect(target)?;
        let req = [b'R'; MSG];
        let mut buf = [0u8; MSG];
        let mut lat = Vec::with_capacity(200_000);
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        while lat.len() < MAX_RR {
            let t = Instant::now();
            if t >= end {
                break;
            }
            s.write_all(&req)?;
            s.read_exact(&mut buf)?;
            lat.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
        }
        Ok((lat, start.elapsed().as_secs_f64()))
    })
    .with_context(|| format!("request/response to {target}"))
}

/// What a connection-rate run measured.
struct Crr {
    per_s: f64,
    failed: u64,
    /// Each connection's duration (connect to close), ns, sorted.
    times: Vec<u32>,
}

/// Connections per second: connect, request, response, close, from `conc` threads.
fn crr(ns: &NetNs, target: SocketAddrV4, secs: f64, conc: usize) -> Crr {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            ns.spawn(move || {
                let req = [b'C'; MSG];
                let mut buf = [0u8; MSG];
                let mut times = Vec::new();
                while Instant::now() < end && ok.load(Ordering::Relaxed) < MAX_CONNECTIONS {
                    let t = Instant::now();
                    match one_connection(target, &req, &mut buf) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            times.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in threads {
        times.extend(t.join().unwrap_or_default());
    }
    times.sort_unstable();
    let elapsed = start.elapsed().as_secs_f64();
    Crr { per_s: ok.load(Ordering::Relaxed) as f64 / elapsed, failed: failed.load(Ordering::Relaxed), times }
}

fn one_connection(target: SocketAddrV4, req: &[u8; MSG], buf: &mut [u8; MSG]) -> std::io::Result<()> {
    let mut s = connect(target)?;
    s.write_all(req)?;
    s.read_exact(buf)?;
    // The server closes after its answer: wait for that, then close.
    let mut rest = [0u8; 1];
    if s.read(&mut rest)? != 0 {
        return Err(std::io::Error::other("server did not close"));
    }
    Ok(())
}

/// iperf3 for `secs` (after one omitted second of slow start): received Gbit/s and
/// retransmits.
fn bulk(ns: &NetNs, target: SocketAddrV4, secs: u32) -> anyhow::Result<(f64, u64)> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iperf3", "-c", &target.ip().to_string(), "-p"])
        .arg(target.port().to_string())
        .args(["-t", &secs.to_string(), "-O", "1", "-J", "--connect-timeout", "3000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iperf3 (`cargo xtask setup` installs it)")?;
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs) + 20);
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("iperf3 to {target} overran its time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = reader.join().unwrap();
    let v: Value = serde_json::from_str(&out).with_context(|| format!("iperf3 output: {out}"))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 to {target}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3: no received rate")?;
    let retrans = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, retrans))
}

// ---------------------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------------------

fn iptables_rules(n: usize) -> String {
    let mut s = String::from("*nat\n:MNBENCH - [0:0]\n");
    for i in 0..n {
        // Other remote CIDRs, each sent to its own gateway: never matched here.
        let a = 0xac10_0000u32 + 1 + i as u32; // 172.16.0.1 ...
        let ip = Ipv4Addr::from(a);
        s.push_str(&format!("-A MNBENCH -d {ip}/32 -p tcp -j DNAT --to-destination 192.0.2.200:{NP_RR}\n"));
    }
    s.push_str(&format!("-A MNBENCH -d 10.245.0.0/16 -p tcp -j DNAT --to-destination {NODE2_LAN}:{NP_RR}\n"));
    s.push_str(&format!("-A MNBENCH -d 10.246.0.0/16 -p tcp -j DNAT --to-destination {NODE2_LAN}:{NP_BULK}\n"));
    s.push_str("-I PREROUTING 1 -i cni0 -j MNBENCH\nCOMMIT\n");
    s
}

fn iptables_restore(ns: &NetNs, rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "iptables-restore: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn iptables_clear(ns: &NetNs) {
    let _ = ns.try_exec("iptables -t nat -D PREROUTING -i cni0 -j MNBENCH; iptables -t nat -F MNBENCH; iptables -t nat -X MNBENCH");
}

/// Field order is drop order: the servers and the agent stop before the namespaces go.
struct Bench {
    _echo: EchoServer,
    _iperf: ChildGuard,
    agent: Agent,
    pins: Pins,
    t: Topology,
}

impl Bench {
    fn setup() -> anyhow::Result<Self> {
        let t = Topology::new(Options::default());
        for (np, port) in [(NP_BULK, BULK_PORT), (NP_RR, RR_PORT)] {
            t.node2.exec(&format!(
                "iptables -t nat -A PREROUTING -d {NODE2_LAN} -p tcp --dport {np} -j DNAT --to-destination {GW_IP}:{port}"
            ));
        }
        for node in [&t.node1, &t.node2] {
            // Connection-rate runs open ~10^5 connections; conntrack's TIME_WAIT entries
            // (120 s by default) would pile up across runs. Same setting in every mode.
            let _ = node.try_exec("sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=1");
        }
        t.client.exec("sysctl -qw net.ipv4.ip_local_port_range=\"1024 65000\"");
        // The server closes first, so the gateway pod keeps each connection in TIME_WAIT for
        // 60 s, and client ports come round again within that. A new SYN on such a tuple is
        // only accepted if its TCP timestamp is newer. Linux offsets timestamps by a hash of
        // the address pair, which differs between the floor mode (to 192.0.2.2) and the others
        // (to 10.245.0.20): without this, a mode following another would see a share of its
        // SYNs refused and retried. Timestamps without the per-destination offset keep them
        // monotonic across modes.
        t.client.exec("sysctl -qw net.ipv4.tcp_timestamps=2");
        let echo = EchoServer::start(&t.gw, SocketAddr::from((GW_IP, RR_PORT)), 16)?;
        let iperf = ChildGuard::spawn(Command::new("ip").args([
            "netns",
            "exec",
            &t.gw.name,
            "iperf3",
            "-s",
            "-B",
            &GW_IP.to_string(),
            "-p",
            &BULK_PORT.to_string(),
        ]));
        poll(Duration::from_secs(10), || {
            t.gw.try_exec(&format!("ss -Hltn sport = :{BULK_PORT}")).1.contains(&BULK_PORT.to_string()).then_some(())
        })
        .context("iperf3 server did not start listening")?;
        let cfg = t.write_config(&config("mnbench-none"));
        let agent = Agent::start(&t.node1, &cfg, &t.pin_path(), &[]);
        let pins = Pins::new(t.pin_path());
        Ok(Self { _echo: echo, _iperf: iperf, agent, pins, t })
    }

    fn attached(&self) -> bool {
        [Direction::Ingress, Direction::Egress].iter().all(|d| self.pins.link("vethc", *d).exists())
    }

    fn set_meshnet(&self, on: bool) -> anyhow::Result<()> {
        self.t.write_config(&config(if on { "vethc" } else { "mnbench-none" }));
        self.agent.child.signal(nix::sys::signal::Signal::SIGHUP);
        poll(Duration::from_secs(10), || (self.attached() == on).then_some(()))
            .with_context(|| format!("meshnet did not {} vethc", if on { "attach to" } else { "detach from" }))
    }

    fn enter(&self, mode: Mode) -> anyhow::Result<()> {
        self.set_meshnet(mode == Mode::Meshnet)?;
        iptables_clear(&self.t.node1);
        if let Mode::Iptables(n) = mode {
            iptables_restore(&self.t.node1, &iptables_rules(n))?;
            let count = self.t.node1.exec("iptables -t nat -S MNBENCH | grep -c DNAT").trim().parse::<usize>()?;
            ensure!(count == n + 2, "MNBENCH holds {count} rules, expected {}", n + 2);
        }
        Ok(())
    }

    fn redirected(&self) -> u64 {
        self.t.counter("redirected")
    }
}

#[derive(Default)]
struct Series {
    bulk_gbps: Vec<f64>,
    bulk_retrans: Vec<f64>,
    rr_p50_us: Vec<f64>,
    rr_p99_us: Vec<f64>,
    rr_per_s: Vec<f64>,
    crr_per_s: Vec<f64>,
    crr_p50_us: Vec<f64>,
    crr_p99_us: Vec<f64>,
    crr_max_ms: Vec<f64>,
    crr_failed: u64,
    /// CPU seconds the agent process used while the mode's workloads ran.
    agent_cpu_s: Vec<f64>,
}

pub fn run(p: &Params) -> anyhow::Result<Value> {
    let started = Instant::now();
    let b = Bench::setup()?;
    let mut modes = vec![Mode::Floor, Mode::Meshnet];
    modes.extend(p.rules.iter().map(|n| Mode::Iptables(*n)));
    let mut series: Vec<Series> = modes.iter().map(|_| Series::default()).collect();
    for rep in 0..p.reps {
        // Rotated each repeat, so that no mode always runs first or last.
        for k in 0..modes.len() {
            let i = (k + rep) % modes.len();
            let mode = modes[i];
            eprintln!("bench: [{:4.0} s] end to end, repeat {}/{}, {}", started.elapsed().as_secs_f64(), rep + 1, p.reps, mode.name());
            b.enter(mode)?;
            let (rr_target, bulk_target) = mode.targets();
            let before = b.redirected();
            let agent_cpu_before = cpu_seconds(b.agent.child.pid());
            probe(&b.t.client, rr_target)?;
            // Development knob, not for published figures: only the connection-rate workload.
            let crr_only = std::env::var_os("MNBENCH_CRR_ONLY").is_some();
            let (gbps, retrans) = if crr_only { (f64::NAN, 0) } else { bulk(&b.t.client, bulk_target, p.bulk_secs)? };
            let (mut lat, secs) = if crr_only { (vec![0], 1.0) } else { rr(&b.t.client, rr_target, p.rr_secs)? };
            let c = crr(&b.t.client, rr_target, p.crr_secs, p.crr_concurrency);
            ensure!(!c.times.is_empty(), "{}: no connection succeeded", mode.name());
            let agent_cpu = cpu_seconds(b.agent.child.pid()) - agent_cpu_before;
            let moved = b.redirected() - before;
            // meshnet carried this mode's traffic, or none of it.
            if mode == Mode::Meshnet {
                ensure!(moved > 0, "meshnet mode, but meshnet translated nothing");
            } else {
                ensure!(moved == 0, "{}: meshnet translated {moved} packets", mode.name());
            }
            lat.sort_unstable();
            let s = &mut series[i];
            s.bulk_gbps.push(gbps);
            s.bulk_retrans.push(retrans as f64);
            s.rr_p50_us.push(f64::from(quantile_sorted(&lat, 0.50)) / 1e3);
            s.rr_p99_us.push(f64::from(quantile_sorted(&lat, 0.99)) / 1e3);
            s.rr_per_s.push(lat.len() as f64 / secs);
            s.crr_per_s.push(c.per_s);
            s.crr_p50_us.push(f64::from(quantile_sorted(&c.times, 0.50)) / 1e3);
            s.crr_p99_us.push(f64::from(quantile_sorted(&c.times, 0.99)) / 1e3);
            s.crr_max_ms.push(f64::from(*c.times.last().unwrap()) / 1e6);
            s.crr_failed += c.failed;
            s.agent_cpu_s.push(agent_cpu);
        }
    }
    b.enter(Mode::Floor)?;
    iptables_clear(&b.t.node1);

    let floor = &series[0];
    let mut per_mode = serde_json::Map::new();
    let mut ratio_to_floor = serde_json::Map::new();
    let mut meshnet_vs = serde_json::Map::new();
    for (mode, s) in modes.iter().zip(&series) {
        per_mode.insert(
            mode.name(),
            json!({
                "bulk_gbps": Stat::of(&s.bulk_gbps).json(),
                "bulk_retransmits": Stat::of(&s.bulk_retrans).json(),
                "rr_p50_us": Stat::of(&s.rr_p50_us).json(),
                "rr_p99_us": Stat::of(&s.rr_p99_us).json(),
                "rr_per_s": Stat::of(&s.rr_per_s).json(),
                "crr_per_s": Stat::of(&s.crr_per_s).json(),
                "crr_p50_us": Stat::of(&s.crr_p50_us).json(),
                "crr_p99_us": Stat::of(&s.crr_p99_us).json(),
                "crr_max_ms": Stat::of(&s.crr_max_ms).json(),
                "crr_failed": s.crr_failed,
                "agent_cpu_s": Stat::of(&s.agent_cpu_s).json(),
            }),
        );
        ratio_to_floor.insert(
            mode.name(),
            json!({
                "bulk": Stat::of(&ratios(&s.bulk_gbps, &floor.bulk_gbps)).json(),
                "crr": Stat::of(&ratios(&s.crr_per_s, &floor.crr_per_s)).json(),
                "rr_p50": Stat::of(&ratios(&s.rr_p50_us, &floor.rr_p50_us)).json(),
                "rr_p99": Stat::of(&ratios(&s.rr_p99_us, &floor.rr_p99_us)).json(),
            }),
        );
        if let Mode::Iptables(_) = mode {
            let m = &series[1];
            meshnet_vs.insert(
                mode.name(),
                json!({
                    "bulk": Stat::of(&ratios(&m.bulk_gbps, &s.bulk_gbps)).json(),
                    "crr": Stat::of(&ratios(&m.crr_per_s, &s.crr_per_s)).json(),
                    "rr_p50": Stat::of(&ratios(&m.rr_p50_us, &s.rr_p50_us)).json(),
                }),
            );
        }
    }
    Ok(json!({
        "params": {
            "reps": p.reps,
            "bulk_secs": p.bulk_secs,
            "rr_secs": p.rr_secs,
            "crr_secs": p.crr_secs,
            "crr_concurrency": p.crr_concurrency,
            "message_bytes": MSG,
            "cores": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        },
        "modes": modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "per_mode": per_mode,
        "ratio_to_floor": ratio_to_floor,
        "meshnet_vs_iptables": meshnet_vs,
        "versions": {
            "iperf3": first_line("iperf3 --version"),
            "iptables": first_line("iptables -V"),
        },
        "seconds": round(started.elapsed().as_secs_f64()),
    }))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return f64::NAN };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn first_line(cmd: &str) -> String {
    let (_, out) = meshnet_tests::try_sh(cmd);
    out.lines().next().unwrap_or("").trim().to_string()
}
