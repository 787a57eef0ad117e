//! End to end through the two-cluster topology of `meshnet_tests::topo`:
//! client pod → node1 → LAN → node2 (NodePort DNAT) → gateway pod.
//!
//! The servers run in the gateway pod itself, behind the NodePort: iperf3 (NodePort 31690 →
//! gateway:5201) and a request/response server (NodePort 31691 → gateway:7000). So every mode
//! carries the same bytes over the same path to the same socket, and differs only in how
//! node1 gets a pod's packet to the NodePort:
//!
//! - `floor`: the client addresses `192.0.2.2:NodePort` itself; nothing to translate.
//! - `plain`: what a flat pod network gives: node1 routes the remote pod CIDRs to node2 and
//!   node2 routes back, no masquerade of pod-to-pod traffic; the client addresses the gateway
//!   pod by its pod IP and real port. No NodePort, no translation anywhere.
//! - `plain-notrack`: `plain` with conntrack off for traffic between the pod CIDRs on both
//!   nodes (`raw` table `NOTRACK`): what the tunnel's redirect delivery skips besides the
//!   routing, so that a tunnel faster than `plain` can be told from a broken benchmark.
//! - `meshnet`: the client addresses the remote pod (10.245.0.20:7000, 10.246.0.20:5201);
//!   meshnet's programs on the pod's veth rewrite it to the NodePort.
//! - `iptables-N`: meshnet detached; iptables DNAT on node1 (the nf_tables backend,
//!   `iptables-nft`, where it is installed) does the same rewrite, with N non-matching DNAT
//!   rules (other remote CIDRs) ahead of the matching one.
//! - `tunnel-redirect`, `tunnel-peer`, `tunnel-stack`: tunnel mode, an agent on each node;
//!   the client addresses the server pod by its pod IP, as in `plain`, and node1's `from_pod`
//!   encapsulates it to node2's tunnel port, whose uplink program hands it to the pod
//!   (`delivery: redirect`, the default, out of the pod's host-side port; `peer`, into the
//!   pod's own end of the veth; or through node2's stack); the replies the same way back. No route between the pod networks on either node.
//! - `vxlan`: the kernel's VXLAN device on each node (what flannel and Cilium's tunnel mode
//!   use), routing the other node's pod CIDR over it; no masquerade between pod CIDRs, the
//!   client addressing the server pod as in `plain`.
//!
//! A relay in the gateway pod (as Istio's gateway is) would add a user-space copy to every
//! mode alike and make the modes look closer than they are, so there is none.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use meshnet::pins::{Direction, Pins};
use meshnet_tests::{
    poll,
    topo::{Options, TempDir, Topology, NODE1_LAN, NODE2_LAN},
    Agent, Bpffs, ChildGuard, NetNs,
};
use serde_json::{json, Value};

use crate::stats::{quantile_sorted, ratios, round, Stat, SPREAD_LIMIT};

const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 10);
const NP_BULK: u16 = 31690;
const NP_RR: u16 = 31691;
const BULK_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// What the client addresses in the translated modes: pods of two remote CIDRs, one per
/// NodePort (meshnet sends a whole peer to one NodePort, as to an east-west gateway).
const REMOTE_RR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 245, 0, 20), RR_PORT);
const REMOTE_BULK: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 246, 0, 20), BULK_PORT);
/// The remote pod CIDRs the client reaches; routed, not translated, in the plain mode.
const REMOTE_CIDRS: [&str; 2] = ["10.245.0.0/16", "10.246.0.0/16"];
const LOCAL_CIDR: &str = "10.244.0.0/16";
/// cluster2's pod CIDR, where the gateway pod and the servers are.
const NODE2_CIDR: &str = "10.245.0.0/16";
/// Both clusters' tunnel NodePort.
const TUNNEL_PORT: u16 = 31800;
/// The VXLAN device's MTU: the LAN's 1500 less VXLAN's 50 bytes of outer headers (what the
/// kernel gives a VXLAN device on a 1500-byte link, and what flannel configures).
const VXLAN_MTU: u32 = 1450;
const MSG: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Client threads of the connection-rate workload. One: a closed loop's rate is then the
/// inverse of one connection's time, so a cost per new connection (a rule walk, a new flow)
/// shows in full, as in the reference C loop; more threads on two cores overlap it
/// with other connections' work and compete with the server's threads and the softirqs.
/// Measured on the 2-core machine while another build ran (load 2.5–7, quick runs, no stall
/// or SYN retransmit at any concurrency): the per-repeat meshnet ÷ floor ratios ranged
/// 0.91–0.99 with one thread, 1.02–1.27 with two and 0.93–1.10 with four; absolute rates
/// followed the machine's load at every concurrency (at one thread a whole repeat of every
/// mode at half the others' rate). One thread keeps the modes of a repeat comparable.
const CRR_CONCURRENCY: usize = 1;
/// Slices of a repeat in a full run. A whole repeat of every mode in one stretch (as before)
/// made the figures follow the machine: one repeat came out fast or slow in several modes at
/// once, and with 7 repeats one such stretch voided the target. A repeat made of slices taken
/// across the whole run sees the machine's good and bad stretches as every other repeat does.
const SLICES: usize = 3;
/// Caps on the load generators besides their duration.
const MAX_RR: usize = 5_000_000;
const MAX_CONNECTIONS: u64 = 2_000_000;
/// A connection that takes longer than this waited for a retransmit (the first SYN
/// retransmit comes after 1 s, the shortest RTO is 200 ms) or for a CPU it did not get:
/// a stall, counted and reported, never part of a believable connection rate.
const STALL: Duration = Duration::from_millis(200);
/// Connections before the measured window: the threads' first connections (thread start,
/// first route and neighbour lookups, conntrack's first entries) are not the steady state.
const CRR_WARMUP: Duration = Duration::from_millis(300);

/// The warm-up round's workloads: iperf3's (after its 1 s omitted), and the others'.
const WARMUP_BULK_SECS: u32 = 1;
const WARMUP_SECS: f64 = 0.5;
/// Where the load generators run, and where the servers do. Left to the scheduler, a client and
/// its server shared one CPU in some runs and not in others, and the same mode's repeats
/// differed by a quarter; each on a CPU of its own, the softirqs that carry a packet run where
/// its sender does in every repeat.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

pub struct Params {
    pub reps: usize,
    /// Each repeat's workloads are run in this many slices, spread over the whole run (see
    /// [`run`]); `bulk_secs`, `rr_secs` and `crr_secs` are a repeat's totals.
    pub slices: usize,
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
            Self { reps: 3, slices: 1, bulk_secs: 2, rr_secs: 2.0, crr_secs: 2.0, crr_concurrency: CRR_CONCURRENCY, rules: vec![1, 1_000, 10_000] }
        } else {
            Self { reps: 7, slices: SLICES, bulk_secs: 6, rr_secs: 4.5, crr_secs: 4.5, crr_concurrency: CRR_CONCURRENCY, rules: vec![1, 1_000, 10_000] }
        }
        // Development knobs, not for published figures: another concurrency or number of
        // slices, to compare.
        .with_concurrency(std::env::var("MNBENCH_CRR_CONCURRENCY").ok().and_then(|v| v.parse().ok()))
        .with_slices(std::env::var("MNBENCH_SLICES").ok().and_then(|v| v.parse().ok()))
    }

    fn with_slices(mut self, n: Option<usize>) -> Self {
        if let Some(n) = n.filter(|n| *n > 0) {
            self.slices = n;
        }
        self
    }

    /// One slice's share of a repeat's iperf3 run: whole seconds, at least one.
    fn bulk_slice_secs(&self) -> u32 {
        (self.bulk_secs / u32::try_from(self.slices).unwrap_or(u32::MAX)).max(1)
    }

    fn with_concurrency(mut self, c: Option<usize>) -> Self {
        if let Some(c) = c.filter(|c| *c > 0) {
            self.crr_concurrency = c;
        }
        self
    }
}

/// How tunnel mode hands a decapsulated packet to its pod (the config's `tunnel.delivery`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// From the uplink straight out of the pod's own port (the default).
    Redirect,
    /// Through the node's stack.
    Stack,
    /// Into the pod's own end of its veth (`bpf_redirect_peer`, 5.10 and newer).
    Peer,
}

impl Delivery {
    fn as_str(self) -> &'static str {
        match self {
            Delivery::Redirect => "redirect",
            Delivery::Stack => "stack",
            Delivery::Peer => "peer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Floor,
    Plain,
    /// Plain routing with conntrack off between the pod CIDRs on both nodes.
    PlainNoTrack,
    Meshnet,
    Tunnel(Delivery),
    Vxlan,
    Iptables(usize),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Floor => "floor".into(),
            Mode::Plain => "plain".into(),
            Mode::PlainNoTrack => "plain-notrack".into(),
            Mode::Meshnet => "meshnet".into(),
            Mode::Tunnel(d) => format!("tunnel-{}", d.as_str()),
            Mode::Vxlan => "vxlan".into(),
            Mode::Iptables(n) => format!("iptables-{n}"),
        }
    }

    fn targets(self) -> (SocketAddrV4, SocketAddrV4) {
        let node2: Ipv4Addr = NODE2_LAN.parse().unwrap();
        match self {
            Mode::Floor => (SocketAddrV4::new(node2, NP_RR), SocketAddrV4::new(node2, NP_BULK)),
            // The server pod by its own address: routed, tunnelled or VXLAN-encapsulated.
            Mode::Plain | Mode::PlainNoTrack | Mode::Tunnel(_) | Mode::Vxlan => {
                (SocketAddrV4::new(GW_IP, RR_PORT), SocketAddrV4::new(GW_IP, BULK_PORT))
            }
            Mode::Meshnet | Mode::Iptables(_) => (REMOTE_RR, REMOTE_BULK),
        }
    }

    /// What the agents are to do in this mode.
    fn agents(self) -> AgentState {
        match self {
            Mode::Meshnet => AgentState::Gateway,
            Mode::Tunnel(d) => AgentState::Tunnel(d),
            _ => AgentState::Off,
        }
    }
}

/// The agents' configuration: node1's agent is attached to the client's veth in gateway mode
/// and in tunnel mode; node2's only in tunnel mode (to the gateway pod's veth); both
/// attach their uplink `lan0` in tunnel mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentState {
    Off,
    Gateway,
    Tunnel(Delivery),
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

/// A node's tunnel-mode config (the example): node1 is cluster1 and node2 cluster2,
/// each the other's tunnel peer with its one node.
fn tunnel_config(node1: bool, delivery: Delivery) -> String {
    let (cluster, pods, iface, node_pods, peer, peer_pods, peer_node, peer_node_pods) = if node1 {
        ("cluster1", LOCAL_CIDR, "vethc", "10.244.0.0/24", "cluster2", NODE2_CIDR, NODE2_LAN, "10.245.0.0/24")
    } else {
        ("cluster2", NODE2_CIDR, "vethgw", "10.245.0.0/24", "cluster1", LOCAL_CIDR, NODE1_LAN, "10.244.0.0/24")
    };
    format!(
        "cluster: {cluster}
podCIDRs: [\"{pods}\"]
interfaces: [\"{iface}\"]
tunnel:
  port: {TUNNEL_PORT}
  interfaces: [\"lan0\"]
  podCIDRs: [\"{node_pods}\"]
  delivery: {}
peers:
  - name: {peer}
    mode: tunnel
    podCIDRs: [\"{peer_pods}\"]
    tunnelPort: {TUNNEL_PORT}
    nodes:
      - address: {peer_node}
        podCIDRs: [\"{peer_node_pods}\"]
health:
  enabled: false
",
        delivery.as_str()
    )
}

/// node2's config outside tunnel mode: attached nowhere.
fn node2_off_config() -> String {
    format!(
        "cluster: cluster2
podCIDRs: [\"{NODE2_CIDR}\"]
interfaces: [\"mnbench-none\"]
peers:
  - name: cluster1
    podCIDRs: [\"{LOCAL_CIDR}\"]
    gateways:
      - {{address: {NODE1_LAN}, port: {NP_RR}}}
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
                    pin(SERVER_CPU);
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

/// Keeps the calling thread on `cpu` ([`CLIENT_CPU`], [`SERVER_CPU`]) where the machine has
/// more than one. `MNBENCH_NO_PIN` leaves it to the scheduler (a development knob, to compare;
/// not for published figures).
fn pin(cpu: usize) {
    if !pinned() {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        // A refusal (a cpuset without that CPU) leaves the thread where it was: the figures
        // are then only noisier, which the spread check reports.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Whether [`pin`] pins: more than one CPU, and no `MNBENCH_NO_PIN`.
fn pinned() -> bool {
    std::env::var_os("MNBENCH_NO_PIN").is_none() && std::thread::available_parallelism().is_ok_and(|n| n.get() > SERVER_CPU)
}

fn connect(target: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One request/response and its answer, to check that a mode carries traffic at all; returns
/// the connection's MSS (`TCP_MAXSEG`: the payload of a full segment, which the path MTU, the
/// peer's SYN and the TCP options in every segment leave).
fn probe(ns: &NetNs, target: SocketAddrV4) -> anyhow::Result<u32> {
    ns.run(move || -> std::io::Result<u32> {
        let mut s = connect(target)?;
        let req = [b'R'; MSG];
        s.write_all(&req)?;
        let mut buf = [0u8; MSG];
        s.read_exact(&mut buf)?;
        if buf == req {
            socket2::SockRef::from(&s).mss()
        } else {
            Err(std::io::Error::other("wrong answer"))
        }
    })
    .with_context(|| format!("request/response to {target}"))
}

/// Request/response latencies (ns) over one connection for `secs`.
fn rr(ns: &NetNs, target: SocketAddrV4, secs: f64) -> anyhow::Result<(Vec<u32>, f64)> {
    ns.run(move || -> std::io::Result<(Vec<u32>, f64)> {
        pin(CLIENT_CPU);
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
    /// Connections completed inside the window, and the window's length.
    done: u64,
    secs: f64,
    failed: u64,
    /// Connections that took longer than [`STALL`].
    stalls: u64,
    /// Each connection's duration (connect to close), ns, sorted.
    times: Vec<u32>,
}

/// One thread's share of a connection-rate run.
#[derive(Default)]
struct CrrThread {
    done: u64,
    failed: u64,
    stalls: u64,
    times: Vec<u32>,
}

/// Connections per second in a closed loop: connect, request, response, close, from `conc`
/// threads, each starting its next connection when the last one closed.
///
/// The rate counts the connections that completed inside a fixed window and divides by the
/// window. Dividing by the time until the last thread returned instead (as this did) made a
/// connection that straddled the window's end, stalled in a SYN retransmit, stretch the
/// divisor by a second or more: a 2-second run then lost a third of its rate to one packet.
/// Stalls and failures of every connection that overlapped the window are counted.
fn crr(ns: &NetNs, target: SocketAddrV4, secs: f64, conc: usize) -> Crr {
    let start = Instant::now() + CRR_WARMUP;
    let end = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            ns.spawn(move || {
                pin(CLIENT_CPU);
                let req = [b'C'; MSG];
                let mut buf = [0u8; MSG];
                let mut r = CrrThread { times: Vec::with_capacity(65_536), ..CrrThread::default() };
                loop {
                    let t = Instant::now();
                    if t >= end || r.done >= MAX_CONNECTIONS {
                        break;
                    }
                    let ok = one_connection(target, &req, &mut buf).is_ok();
                    let done = Instant::now();
                    if done < start {
                        continue;
                    }
                    let took = done - t;
                    if took > STALL {
                        r.stalls += 1;
                    }
                    if !ok {
                        r.failed += 1;
                        continue;
                    }
                    if done <= end {
                        r.done += 1;
                        r.times.push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
                    }
                }
                r
            })
        })
        .collect();
    let mut all = CrrThread::default();
    for t in threads {
        let r = t.join().unwrap_or_default();
        all.done += r.done;
        all.failed += r.failed;
        all.stalls += r.stalls;
        all.times.extend(r.times);
    }
    all.times.sort_unstable();
    Crr { done: all.done, secs, failed: all.failed, stalls: all.stalls, times: all.times }
}

/// The TCP counters of a namespace that show a connection-rate run losing time to
/// retransmits rather than to the CPU: (name, `Tcp:` or `TcpExt:` field).
const TCP_COUNTERS: [(&str, &str, &str); 4] = [
    ("retrans_segs", "Tcp:", "RetransSegs"),
    ("syn_retrans", "TcpExt:", "TCPSynRetrans"),
    ("out_rsts", "Tcp:", "OutRsts"),
    ("paws_timewait", "TcpExt:", "PAWSTimewait"),
];

/// [`TCP_COUNTERS`] of the calling thread's network namespace.
fn tcp_counters() -> Vec<u64> {
    let mut text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    text.push_str(&std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    TCP_COUNTERS
        .iter()
        .map(|(_, table, field)| {
            // Each table is a line of names followed by a line of values.
            lines
                .windows(2)
                .filter(|w| w[0].starts_with(table) && w[1].starts_with(table))
                .find_map(|w| {
                    let i = w[0].split_whitespace().position(|n| n == *field)?;
                    w[1].split_whitespace().nth(i)?.parse().ok()
                })
                .unwrap_or(0)
        })
        .collect()
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
        .args(if pinned() { vec!["-A".to_string(), CLIENT_CPU.to_string()] } else { Vec::new() })
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

/// The iptables commands of the nf_tables backend (what the issue and current distributions
/// mean by iptables), or the default ones where `iptables-nft` is not installed.
fn iptables_bins() -> (&'static str, &'static str) {
    if meshnet_tests::try_sh("command -v iptables-nft && command -v iptables-nft-restore").0 {
        ("iptables-nft", "iptables-nft-restore")
    } else {
        ("iptables", "iptables-restore")
    }
}

fn iptables_restore(ns: &NetNs, rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, iptables_bins().1, "--noflush"])
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
    let ipt = iptables_bins().0;
    let _ = ns.try_exec(&format!(
        "{ipt} -t nat -D PREROUTING -i cni0 -j MNBENCH; {ipt} -t nat -F MNBENCH; {ipt} -t nat -X MNBENCH"
    ));
}

/// The plain mode's routes and masquerade exemptions, as (node, `ip route` arguments, the
/// match of a nat POSTROUTING rule): node1 routes the remote pod CIDRs over the LAN to node2
/// and node2 routes cluster1's back; the CNI's masquerade is skipped between pod CIDRs, as in
/// a flat pod network.
fn plain_setup(t: &Topology) -> Vec<(&NetNs, String, String)> {
    let mut v: Vec<(&NetNs, String, String)> = REMOTE_CIDRS
        .iter()
        .map(|c| (&t.node1, format!("{c} via {NODE2_LAN} dev lan0"), format!("-s {LOCAL_CIDR} -d {c} -j RETURN")))
        .collect();
    v.push((&t.node2, format!("{LOCAL_CIDR} via {NODE1_LAN} dev lan0"), format!("-s 10.245.0.0/16 -d {LOCAL_CIDR} -j RETURN")));
    v
}

fn plain_enter(t: &Topology) {
    for (ns, route, rule) in plain_setup(t) {
        ns.ip(&format!("route add {route}"));
        // Ahead of the CNI's masquerade rule.
        ns.exec(&format!("iptables -t nat -I POSTROUTING 1 {rule}"));
    }
}

/// Takes the plain mode's routes and rules out again, whether they are there or not, so
/// that the other modes find node1 without a route to the remote pod CIDRs.
fn plain_leave(t: &Topology) {
    for (ns, route, rule) in plain_setup(t) {
        let _ = ns.try_exec(&format!("ip route del {route}"));
        while ns.try_exec(&format!("iptables -t nat -D POSTROUTING {rule}")).0 {}
    }
}

/// The plain-notrack mode's `raw` rules, as (node, match): both directions between the pod
/// CIDRs on both nodes, so that neither node's conntrack sees the pods' traffic.
fn notrack_rules(t: &Topology) -> Vec<(&NetNs, String)> {
    let mut v = Vec::new();
    for node in [&t.node1, &t.node2] {
        for c in REMOTE_CIDRS {
            v.push((node, format!("-s {LOCAL_CIDR} -d {c}")));
            v.push((node, format!("-s {c} -d {LOCAL_CIDR}")));
        }
    }
    v
}

fn notrack_enter(t: &Topology) {
    for (ns, m) in notrack_rules(t) {
        ns.exec(&format!("iptables -t raw -I PREROUTING 1 {m} -j NOTRACK"));
    }
}

fn notrack_leave(t: &Topology) {
    for (ns, m) in notrack_rules(t) {
        while ns.try_exec(&format!("iptables -t raw -D PREROUTING {m} -j NOTRACK")).0 {}
    }
}

/// The VXLAN mode's devices, as flannel's vxlan backend sets them up: on each node a VXLAN
/// device `vx0` (VNI 42, UDP 4789, unicast to the other node over `lan0`, no learning) holding
/// the network address of the node's pod CIDR as a /32, the other node's pod CIDR routed
/// `via` the other device's address `onlink`, and that address's MAC a permanent neighbour
/// entry (flannel writes the same from its lease; no ARP crosses the tunnel). As in `plain`,
/// neither node masquerades traffic between pod CIDRs.
///
/// MTU: the LAN and the pods' interfaces stay at 1500; the device gets 1500 − 50 = 1450, the
/// kernel's own choice on a 1500-byte link; and the pods' routes to the other cluster's pods
/// carry `mtu 1450`, as Cilium sets pod routes in tunnel mode (flannel lowers the pods'
/// interface MTU instead, to the same effect on TCP), so that TCP's MSS fits the tunnel from
/// the SYN on. Without it every connection to a new destination would first lose a full-size
/// segment to an ICMP "fragmentation needed" (path MTU discovery through node1), which
/// neither CNI leaves to chance. meshnet's tunnel clamps the MSS itself and leaves the pods
/// alone.
struct VxlanSide<'a> {
    node: &'a NetNs,
    pod: &'a NetNs,
    local: &'static str,
    remote: &'static str,
    /// The device's address and MAC, and the other node's.
    addr: &'static str,
    mac: &'static str,
    peer_addr: &'static str,
    peer_mac: &'static str,
    /// The pod CIDRs on the other side, and this side's (for the masquerade exemption).
    remote_cidrs: Vec<&'static str>,
    own_cidr: &'static str,
    /// The pod's gateway (its node's bridge address).
    pod_gw: &'static str,
}

fn vxlan_sides(t: &Topology) -> [VxlanSide<'_>; 2] {
    [
        VxlanSide {
            node: &t.node1,
            pod: &t.client,
            local: NODE1_LAN,
            remote: NODE2_LAN,
            addr: "10.244.0.0",
            mac: "02:00:00:00:42:01",
            peer_addr: "10.245.0.0",
            peer_mac: "02:00:00:00:42:02",
            remote_cidrs: REMOTE_CIDRS.to_vec(),
            own_cidr: LOCAL_CIDR,
            pod_gw: "10.244.0.1",
        },
        VxlanSide {
            node: &t.node2,
            pod: &t.gw,
            local: NODE2_LAN,
            remote: NODE1_LAN,
            addr: "10.245.0.0",
            mac: "02:00:00:00:42:02",
            peer_addr: "10.244.0.0",
            peer_mac: "02:00:00:00:42:01",
            remote_cidrs: vec![LOCAL_CIDR],
            own_cidr: NODE2_CIDR,
            pod_gw: "10.245.0.1",
        },
    ]
}

fn vxlan_enter(t: &Topology) {
    for s in vxlan_sides(t) {
        s.node.ip(&format!(
            "link add vx0 address {} type vxlan id 42 local {} remote {} dstport 4789 dev lan0 nolearning",
            s.mac, s.local, s.remote
        ));
        s.node.ip(&format!("link set vx0 mtu {VXLAN_MTU} up"));
        s.node.ip(&format!("addr add {}/32 dev vx0", s.addr));
        s.node.ip(&format!("neigh replace {} lladdr {} dev vx0 nud permanent", s.peer_addr, s.peer_mac));
        for c in &s.remote_cidrs {
            s.node.ip(&format!("route add {c} via {} dev vx0 onlink", s.peer_addr));
            s.node.exec(&format!("iptables -t nat -I POSTROUTING 1 -s {} -d {c} -j RETURN", s.own_cidr));
            s.pod.ip(&format!("route add {c} via {} mtu {VXLAN_MTU}", s.pod_gw));
        }
    }
}

/// Takes the VXLAN mode's devices, routes and rules out again, whether they are there or not.
fn vxlan_leave(t: &Topology) {
    for s in vxlan_sides(t) {
        let _ = s.node.try_exec("ip link del vx0");
        for c in &s.remote_cidrs {
            while s.node.try_exec(&format!("iptables -t nat -D POSTROUTING -s {} -d {c} -j RETURN", s.own_cidr)).0 {}
            let _ = s.pod.try_exec(&format!("ip route del {c}"));
        }
    }
}

/// Bytes and packets node2's `lan0` and the server pod's `eth0` received: their ratios during
/// a bulk run tell whether the sender's 64 KB GSO packets crossed the LAN whole (a veth passes
/// them on unsegmented) and reached the server so, or were cut into MTU-sized packets on the
/// way: `[lan bytes, lan packets, pod bytes, pod packets]`.
fn rx_sizes(t: &Topology) -> [u64; 4] {
    let read = |ns: &NetNs, dev: &str, f: &str| ns.try_exec(&format!("cat /sys/class/net/{dev}/statistics/{f}")).1.trim().parse().unwrap_or(0);
    [read(&t.node2, "lan0", "rx_bytes"), read(&t.node2, "lan0", "rx_packets"), read(&t.gw, "eth0", "rx_bytes"), read(&t.gw, "eth0", "rx_packets")]
}

/// The comment of node2's rule that counts the INVALID packets it forwards.
const INVALID_RULE: &str = "mnbench-invalid";

/// Packets node2 forwarded while its conntrack held them INVALID.
fn forwarded_invalid(t: &Topology) -> u64 {
    let out = t.node2.try_exec("iptables -L FORWARD -v -x -n").1;
    out.lines().filter(|l| l.contains(INVALID_RULE)).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

/// Packets the VXLAN device of node1 sent.
fn vxlan_tx_packets(t: &Topology) -> u64 {
    t.node1.try_exec("cat /sys/class/net/vx0/statistics/tx_packets").1.trim().parse().unwrap_or(0)
}

/// Field order is drop order: the servers and the agents stop before the namespaces go.
struct Bench {
    _echo: EchoServer,
    _iperf: ChildGuard,
    agent: Agent,
    pins: Pins,
    /// node2's agent (tunnel mode), its pins, bpffs and config directory.
    agent2: Agent,
    pins2: Pins,
    bpffs2: Bpffs,
    dir2: TempDir,
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
        // Counts, and lets pass, what node2 forwards while its conntrack holds it INVALID:
        // kube-proxy drops exactly that (`KUBE-FORWARD -m conntrack --ctstate INVALID -j
        // DROP`), and a decapsulated packet delivered through the stack whose flow's other
        // direction never crosses this node's netfilter is such a packet.
        t.node2.exec(&format!("iptables -I FORWARD 1 -m conntrack --ctstate INVALID -m comment --comment {INVALID_RULE}"));
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
        ]).args(if pinned() { vec!["-A".to_string(), SERVER_CPU.to_string()] } else { Vec::new() }));
        poll(Duration::from_secs(10), || {
            t.gw.try_exec(&format!("ss -Hltn sport = :{BULK_PORT}")).1.contains(&BULK_PORT.to_string()).then_some(())
        })
        .context("iperf3 server did not start listening")?;
        let cfg = t.write_config(&config("mnbench-none"));
        let agent = Agent::start(&t.node1, &cfg, &t.pin_path(), &[]);
        let pins = Pins::new(t.pin_path());
        let (bpffs2, dir2) = (Bpffs::new(), TempDir::new());
        let cfg2 = write_atomically(&dir2, &node2_off_config());
        let agent2 = Agent::start(&t.node2, &cfg2, &bpffs2.pin_path(), &[]);
        let pins2 = Pins::new(bpffs2.pin_path());
        Ok(Self { _echo: echo, _iperf: iperf, agent, pins, agent2, pins2, bpffs2, dir2, t })
    }

    /// Whether each agent's programs are where `state` wants them, and no others.
    fn attached_as(&self, state: AgentState) -> bool {
        let pods = [Direction::Ingress, Direction::Egress];
        let tunnel = matches!(state, AgentState::Tunnel(_));
        pods.iter().all(|d| self.pins.link("vethc", *d).exists() == (state != AgentState::Off))
            && self.pins.link("lan0", Direction::Uplink).exists() == tunnel
            && pods.iter().all(|d| self.pins2.link("vethgw", *d).exists() == tunnel)
            && self.pins2.link("lan0", Direction::Uplink).exists() == tunnel
    }

    /// Whether both nodes' tunnel maps hold the route to the other node's pods with the
    /// delivery asked for (a change of delivery alone attaches nothing new).
    fn tunnel_ready(&self, d: Delivery) -> bool {
        [self.dump(false, "tunnel"), self.dump(true, "tunnel")].iter().all(|v| {
            let t = &v["tunnel"];
            t["settings"]["delivery"] == d.as_str() && t["routes"].as_array().is_some_and(|r| !r.is_empty())
        })
    }

    fn set_agents(&self, state: AgentState) -> anyhow::Result<()> {
        let (one, two) = match state {
            AgentState::Off => (config("mnbench-none"), node2_off_config()),
            AgentState::Gateway => (config("vethc"), node2_off_config()),
            AgentState::Tunnel(d) => (tunnel_config(true, d), tunnel_config(false, d)),
        };
        self.t.write_config(&one);
        write_atomically(&self.dir2, &two);
        for a in [&self.agent, &self.agent2] {
            a.child.signal(nix::sys::signal::Signal::SIGHUP);
        }
        poll(Duration::from_secs(10), || self.attached_as(state).then_some(()))
            .with_context(|| format!("the agents did not reach {state:?}: their programs are not where it wants them"))?;
        if let AgentState::Tunnel(d) = state {
            poll(Duration::from_secs(10), || self.tunnel_ready(d).then_some(()))
                .with_context(|| format!("the tunnel maps do not show delivery {} with a route", d.as_str()))?;
        }
        Ok(())
    }

    fn enter(&self, mode: Mode) -> anyhow::Result<()> {
        // The last mode's state goes before meshnet attaches: the agent is not to see a route
        // of the plain mode's to a peer's pod CIDR.
        iptables_clear(&self.t.node1);
        plain_leave(&self.t);
        notrack_leave(&self.t);
        vxlan_leave(&self.t);
        let routed = self.t.node1.ip("route show 10.245.0.0/16");
        ensure!(routed.trim().is_empty(), "node1 still routes the remote pod CIDR: {routed}");
        self.set_agents(mode.agents())?;
        match mode {
            Mode::Iptables(n) => {
                iptables_restore(&self.t.node1, &iptables_rules(n))?;
                let ipt = iptables_bins().0;
                let count = self.t.node1.exec(&format!("{ipt} -t nat -S MNBENCH | grep -c DNAT")).trim().parse::<usize>()?;
                ensure!(count == n + 2, "MNBENCH holds {count} rules, expected {}", n + 2);
            }
            Mode::Plain => plain_enter(&self.t),
            Mode::PlainNoTrack => {
                plain_enter(&self.t);
                notrack_enter(&self.t);
            }
            Mode::Vxlan => vxlan_enter(&self.t),
            Mode::Floor | Mode::Meshnet | Mode::Tunnel(_) => {}
        }
        Ok(())
    }

    /// `meshnet maps dump WHAT -o json` of node1's agent, or node2's.
    fn dump(&self, node2: bool, what: &str) -> Value {
        if !node2 {
            return self.t.dump_json(what);
        }
        let out = meshnet_tests::meshnet(&self.t.node2, &format!("maps dump {what} -o json --pin-path {}", self.bpffs2.pin_path().display()));
        serde_json::from_str(&out.stdout).unwrap_or(Value::Null)
    }

    /// The datapath counters that tell which mode carried the traffic, on both nodes.
    fn counters(&self) -> Counters {
        let one = self.dump(false, "stats");
        let two = self.dump(true, "stats");
        let c = |v: &Value, k: &str| v["stats"][k].as_u64().unwrap_or(0);
        Counters {
            opened: c(&one, "flow_opened"),
            encap: [c(&one, "tunnel_encap"), c(&two, "tunnel_encap")],
            decap: [c(&one, "tunnel_decap"), c(&two, "tunnel_decap")],
            vxlan_tx: vxlan_tx_packets(&self.t),
        }
    }
}

/// What [`Bench::counters`] reads: node1's gateway-mode flows opened, both nodes' tunnel
/// encapsulations and decapsulations (node1, node2), and node1's VXLAN device's sent packets.
#[derive(Clone, Copy, Debug)]
struct Counters {
    opened: u64,
    encap: [u64; 2],
    decap: [u64; 2],
    vxlan_tx: u64,
}

impl Counters {
    /// Checks that the counters moved between `self` and `after` as `mode` carries traffic:
    /// each datapath counts its own mode's packets, and no other mode's.
    fn check(&self, after: &Counters, mode: Mode) -> anyhow::Result<()> {
        let name = mode.name();
        let opened = after.opened - self.opened;
        let encap: Vec<u64> = (0..2).map(|i| after.encap[i] - self.encap[i]).collect();
        let decap: Vec<u64> = (0..2).map(|i| after.decap[i] - self.decap[i]).collect();
        if mode == Mode::Meshnet {
            ensure!(opened > 0, "meshnet mode, but meshnet translated no flow");
        } else {
            ensure!(opened == 0, "{name}: meshnet translated {opened} flows");
        }
        if matches!(mode, Mode::Tunnel(_)) {
            ensure!(
                encap.iter().chain(&decap).all(|n| *n > 0),
                "{name}: the tunnel did not carry both ways (encapsulated {encap:?}, decapsulated {decap:?} on node1, node2)"
            );
        } else {
            ensure!(encap.iter().chain(&decap).all(|n| *n == 0), "{name}: the tunnel carried packets ({encap:?}, {decap:?})");
        }
        if mode == Mode::Vxlan {
            ensure!(after.vxlan_tx > self.vxlan_tx, "vxlan mode, but node1's VXLAN device sent nothing");
        }
        Ok(())
    }
}

/// Writes `text` as `dir`'s meshnet.yaml by an atomic rename, as a ConfigMap update does.
fn write_atomically(dir: &TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.0.join("meshnet.yaml");
    let tmp = dir.0.join(".meshnet.yaml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
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
    crr_stalls: Vec<f64>,
    /// [`TCP_COUNTERS`] of the client and the gateway pod during the connection-rate run.
    crr_tcp: std::collections::BTreeMap<String, Vec<f64>>,
    /// CPU seconds the agent process used while the mode's workloads ran.
    agent_cpu_s: Vec<f64>,
    /// The probe connection's MSS (`TCP_MAXSEG`).
    mss: Vec<f64>,
    /// The average packet node2's `lan0` and the server pod received during the bulk run, bytes.
    bulk_lan_avg_bytes: Vec<f64>,
    bulk_pod_avg_bytes: Vec<f64>,
    /// Packets node2 forwarded while its conntrack held them INVALID, over the mode's
    /// workloads.
    node2_forward_invalid: Vec<f64>,
}

/// One mode's slices of one repeat, summed.
#[derive(Default)]
struct Acc {
    /// Each slice's throughput (the slices run equally long).
    bulk_gbps: Vec<f64>,
    bulk_retrans: u64,
    rr_lat: Vec<u32>,
    rr_secs: f64,
    crr_done: u64,
    crr_secs: f64,
    crr_times: Vec<u32>,
    crr_failed: u64,
    crr_stalls: u64,
    /// [`TCP_COUNTERS`] of the client, then of the gateway pod.
    crr_tcp: Vec<u64>,
    agent_cpu_s: f64,
    mss: u32,
    node2_forward_invalid: u64,
    /// [`rx_sizes`]' bytes and packets of node2's `lan0` and the server pod over the bulk runs.
    rx: [u64; 4],
}

impl Acc {
    /// The repeat's figures, appended to its mode's series.
    fn into_series(mut self, s: &mut Series) {
        self.rr_lat.sort_unstable();
        self.crr_times.sort_unstable();
        s.bulk_gbps.push(self.bulk_gbps.iter().sum::<f64>() / self.bulk_gbps.len().max(1) as f64);
        s.bulk_retrans.push(self.bulk_retrans as f64);
        s.rr_p50_us.push(f64::from(quantile_sorted(&self.rr_lat, 0.50)) / 1e3);
        s.rr_p99_us.push(f64::from(quantile_sorted(&self.rr_lat, 0.99)) / 1e3);
        s.rr_per_s.push(self.rr_lat.len() as f64 / self.rr_secs);
        s.crr_per_s.push(self.crr_done as f64 / self.crr_secs);
        s.crr_p50_us.push(f64::from(quantile_sorted(&self.crr_times, 0.50)) / 1e3);
        s.crr_p99_us.push(f64::from(quantile_sorted(&self.crr_times, 0.99)) / 1e3);
        s.crr_max_ms.push(f64::from(self.crr_times.last().copied().unwrap_or(0)) / 1e6);
        s.crr_failed += self.crr_failed;
        s.crr_stalls.push(self.crr_stalls as f64);
        for (k, n) in self.crr_tcp.iter().enumerate() {
            let name = format!("{}_{}", ["client", "gateway"][k / TCP_COUNTERS.len()], TCP_COUNTERS[k % TCP_COUNTERS.len()].0);
            s.crr_tcp.entry(name).or_default().push(*n as f64);
        }
        s.agent_cpu_s.push(self.agent_cpu_s);
        s.mss.push(f64::from(self.mss));
        s.node2_forward_invalid.push(self.node2_forward_invalid as f64);
        let avg = |i: usize| self.rx[i] as f64 / self.rx[i + 1].max(1) as f64;
        s.bulk_lan_avg_bytes.push(avg(0));
        s.bulk_pod_avg_bytes.push(avg(2));
    }
}

/// Every mode, the floor first (the ratios to the floor use it).
fn all_modes(p: &Params) -> Vec<Mode> {
    let mut modes =
        vec![Mode::Floor, Mode::Plain, Mode::PlainNoTrack, Mode::Meshnet, Mode::Tunnel(Delivery::Redirect), Mode::Tunnel(Delivery::Peer), Mode::Tunnel(Delivery::Stack), Mode::Vxlan];
    modes.extend(p.rules.iter().map(|n| Mode::Iptables(*n)));
    // Development knob, not for published figures: only these modes (and the floor).
    if let Ok(only) = std::env::var("MNBENCH_MODES") {
        let only: Vec<&str> = only.split(',').collect();
        modes.retain(|m| *m == Mode::Floor || only.contains(&m.name().as_str()));
    }
    modes
}

/// Per-repeat ratios of one mode's figures to another's: throughput and connections/s
/// (higher is better) and the request/response p50 (lower is better).
fn versus(a: &Series, b: &Series) -> Value {
    json!({
        "bulk": Stat::of(&ratios(&a.bulk_gbps, &b.bulk_gbps)).json(),
        "crr": Stat::of(&ratios(&a.crr_per_s, &b.crr_per_s)).json(),
        "rr_p50": Stat::of(&ratios(&a.rr_p50_us, &b.rr_p50_us)).json(),
    })
}

pub fn run(p: &Params) -> anyhow::Result<Value> {
    let started = Instant::now();
    let b = Bench::setup()?;
    let modes = all_modes(p);
    let mut series: Vec<Series> = modes.iter().map(|_| Series::default()).collect();
    // A round of every mode that is not counted. Without it the first repeat ran slower than
    // the others in most modes at once (the namespaces just made, the kernel still tearing
    // down the earlier benchmarks' ones), which voided targets for no fault of any mode.
    // Development knob, not for published figures: only the connection-rate workload.
    let crr_only = std::env::var_os("MNBENCH_CRR_ONLY").is_some();
    for &mode in &modes {
        eprintln!("bench: [{:4.0} s] end to end, warm-up round, {}", started.elapsed().as_secs_f64(), mode.name());
        b.enter(mode)?;
        let (rr_target, bulk_target) = mode.targets();
        poll(Duration::from_secs(5), || probe(&b.t.client, rr_target).ok())
            .map_or_else(|| probe(&b.t.client, rr_target), Ok)
            .with_context(|| format!("{}: the warm-up's probe", mode.name()))?;
        if !crr_only {
            bulk(&b.t.client, bulk_target, WARMUP_BULK_SECS)?;
            rr(&b.t.client, rr_target, WARMUP_SECS)?;
        }
        let c = crr(&b.t.client, rr_target, WARMUP_SECS, p.crr_concurrency);
        ensure!(!c.times.is_empty(), "{}: no connection succeeded in the warm-up round", mode.name());
    }
    // Round j measures one slice of repeat j % reps in every mode, so each repeat's slices lie
    // spread evenly over the whole run.
    let mut acc: Vec<Vec<Acc>> = modes.iter().map(|_| (0..p.reps).map(|_| Acc::default()).collect()).collect();
    let rounds = p.reps * p.slices;
    let (bulk_secs, rr_secs, crr_secs) = (p.bulk_slice_secs(), p.rr_secs / p.slices as f64, p.crr_secs / p.slices as f64);
    for round in 0..rounds {
        let rep = round % p.reps;
        // Rotated each round, so that no mode always runs first or last.
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let mode = modes[i];
            eprintln!(
                "bench: [{:4.0} s] end to end, round {}/{rounds} (repeat {}), {}",
                started.elapsed().as_secs_f64(),
                round + 1,
                rep + 1,
                mode.name()
            );
            b.enter(mode)?;
            let (rr_target, bulk_target) = mode.targets();
            let before = b.counters();
            let invalid_before = forwarded_invalid(&b.t);
            let agent_cpu_before = cpu_seconds(b.agent.child.pid());
            // The first connection of a mode may wait for the agents' last map writes.
            let mss = poll(Duration::from_secs(5), || probe(&b.t.client, rr_target).ok())
                .map_or_else(|| probe(&b.t.client, rr_target), Ok)
                .with_context(|| format!("{}: the probe", mode.name()))?;
            let rx_before = rx_sizes(&b.t);
            let (gbps, retrans) = if crr_only { (f64::NAN, 0) } else { bulk(&b.t.client, bulk_target, bulk_secs)? };
            let rx_after = rx_sizes(&b.t);
            let (lat, secs) = if crr_only { (vec![0], 1.0) } else { rr(&b.t.client, rr_target, rr_secs)? };
            let tcp_before = [b.t.client.run(tcp_counters), b.t.gw.run(tcp_counters)];
            let c = crr(&b.t.client, rr_target, crr_secs, p.crr_concurrency);
            let tcp_after = [b.t.client.run(tcp_counters), b.t.gw.run(tcp_counters)];
            ensure!(!c.times.is_empty(), "{}: no connection succeeded", mode.name());
            let agent_cpu = cpu_seconds(b.agent.child.pid()) - agent_cpu_before;
            // Each datapath carried its own mode's traffic, and none of another's.
            before.check(&b.counters(), mode)?;
            let a = &mut acc[i][rep];
            a.bulk_gbps.push(gbps);
            a.bulk_retrans += retrans;
            a.rr_lat.extend(lat);
            a.rr_secs += secs;
            a.crr_done += c.done;
            a.crr_secs += c.secs;
            a.crr_times.extend(c.times);
            a.crr_failed += c.failed;
            a.crr_stalls += c.stalls;
            let deltas = tcp_after.iter().zip(&tcp_before).flat_map(|(after, before)| after.iter().zip(before).map(|(a, b)| a.saturating_sub(*b)));
            a.crr_tcp.resize(2 * TCP_COUNTERS.len(), 0);
            for (sum, d) in a.crr_tcp.iter_mut().zip(deltas) {
                *sum += d;
            }
            a.agent_cpu_s += agent_cpu;
            a.mss = mss;
            a.node2_forward_invalid += forwarded_invalid(&b.t) - invalid_before;
            for (sum, (after, before)) in a.rx.iter_mut().zip(rx_after.iter().zip(&rx_before)) {
                *sum += after - before;
            }
        }
    }
    for (s, reps) in series.iter_mut().zip(acc) {
        for a in reps {
            a.into_series(s);
        }
    }
    b.enter(Mode::Floor)?;

    let floor = &series[0];
    let of = |mode: Mode| modes.iter().position(|m| *m == mode).map(|i| &series[i]);
    let mut per_mode = serde_json::Map::new();
    let mut ratio_to_floor = serde_json::Map::new();
    let mut meshnet_vs = serde_json::Map::new();
    let mut meshnet_vs_plain = serde_json::Map::new();
    for (mode, s) in modes.iter().zip(&series) {
        per_mode.insert(
            mode.name(),
            json!({
                "bulk_gbps": judged(&s.bulk_gbps),
                "bulk_retransmits": Stat::of(&s.bulk_retrans).json(),
                "rr_p50_us": judged(&s.rr_p50_us),
                "rr_p99_us": Stat::of(&s.rr_p99_us).json(),
                "rr_per_s": Stat::of(&s.rr_per_s).json(),
                "crr_per_s": judged(&s.crr_per_s),
                "crr_p50_us": Stat::of(&s.crr_p50_us).json(),
                "crr_p99_us": Stat::of(&s.crr_p99_us).json(),
                "crr_max_ms": Stat::of(&s.crr_max_ms).json(),
                "crr_failed": s.crr_failed,
                "crr_stalls": Stat::of(&s.crr_stalls).json(),
                "crr_tcp": s.crr_tcp.iter().map(|(k, v)| (k.clone(), Stat::of(v).json())).collect::<serde_json::Map<_, _>>(),
                "agent_cpu_s": Stat::of(&s.agent_cpu_s).json(),
                "mss": Stat::of(&s.mss).json(),
                "bulk_lan_avg_bytes": Stat::of(&s.bulk_lan_avg_bytes).json(),
                "bulk_pod_avg_bytes": Stat::of(&s.bulk_pod_avg_bytes).json(),
                "node2_forward_invalid": Stat::of(&s.node2_forward_invalid).json(),
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
        if let (Some(m), true) = (of(Mode::Meshnet), matches!(mode, Mode::Iptables(_) | Mode::Plain)) {
            let to = if *mode == Mode::Plain { &mut meshnet_vs_plain } else { &mut meshnet_vs };
            to.insert(mode.name(), versus(m, s));
        }
    }
    // Tunnel mode against plain routing (the floor of a pod network) and the kernel's VXLAN
    // device, each delivery; and VXLAN against plain routing, for scale.
    let mut tunnel_vs = serde_json::Map::new();
    for (mode, against) in [
        (Mode::Tunnel(Delivery::Redirect), &[Mode::Plain, Mode::PlainNoTrack, Mode::Vxlan, Mode::Tunnel(Delivery::Stack)][..]),
        (Mode::Tunnel(Delivery::Peer), &[Mode::Plain, Mode::PlainNoTrack, Mode::Vxlan, Mode::Tunnel(Delivery::Redirect)]),
        (Mode::Tunnel(Delivery::Stack), &[Mode::Plain, Mode::PlainNoTrack, Mode::Vxlan, Mode::Tunnel(Delivery::Redirect)]),
        (Mode::Vxlan, &[Mode::Plain]),
        (Mode::PlainNoTrack, &[Mode::Plain]),
    ] {
        let Some(a) = of(mode) else { continue };
        let mut v = serde_json::Map::new();
        for other in against {
            if let Some(b) = of(*other) {
                v.insert(other.name(), versus(a, b));
            }
        }
        tunnel_vs.insert(mode.name(), Value::Object(v));
    }
    Ok(json!({
        "params": {
            "reps": p.reps,
            "slices": p.slices,
            "bulk_secs": p.bulk_secs,
            "bulk_slice_secs": p.bulk_slice_secs(),
            "rr_secs": p.rr_secs,
            "crr_secs": p.crr_secs,
            "crr_concurrency": p.crr_concurrency,
            "pinned": pinned().then(|| json!({ "client_cpu": CLIENT_CPU, "server_cpu": SERVER_CPU })),
            "crr_warmup_ms": CRR_WARMUP.as_millis(),
            "warmup_round": { "bulk_secs": WARMUP_BULK_SECS, "rr_secs": WARMUP_SECS, "crr_secs": WARMUP_SECS },
            "stall_ms": STALL.as_millis(),
            "spread_limit": SPREAD_LIMIT,
            "message_bytes": MSG,
            "cores": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        },
        "modes": modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "per_mode": per_mode,
        "ratio_to_floor": ratio_to_floor,
        "meshnet_vs_iptables": meshnet_vs,
        "meshnet_vs_plain": meshnet_vs_plain.remove("plain"),
        "tunnel_vs": tunnel_vs,
        "tunnel": {
            "port": TUNNEL_PORT,
            "overhead_bytes": meshnet_common::tunnel::OVERHEAD,
            "vxlan_mtu": VXLAN_MTU,
            "lan_mtu": 1500,
        },
        "versions": {
            "iperf3": first_line("iperf3 --version"),
            "iptables": first_line(&format!("{} -V", iptables_bins().0)),
            "iptables_command": iptables_bins().0,
        },
        "seconds": round(started.elapsed().as_secs_f64()),
    }))
}

/// A figure a target uses: its summary, marked void when its repeats disagree too much.
fn judged(values: &[f64]) -> Value {
    let s = Stat::of(values);
    let mut j = s.json();
    j["void"] = json!(s.void(SPREAD_LIMIT));
    j
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agent_config_validates_and_tunnels_where_it_should() {
        for d in [Delivery::Redirect, Delivery::Stack, Delivery::Peer] {
            for node1 in [true, false] {
                let c = meshnet::config::Config::from_yaml(&tunnel_config(node1, d)).unwrap();
                let desired = c.desired();
                assert!(desired.routes.is_empty(), "a tunnel peer has no gateway route");
                assert_eq!((desired.tun_routes.len(), desired.tun_nodes.len()), (1, 1));
                let peer: Ipv4Addr = if node1 { NODE2_LAN } else { NODE1_LAN }.parse().unwrap();
                assert!(desired.tun_nodes.contains_key(&peer));
                let gw_pod = desired.tun_routes.keys().any(|n| n.contains(&GW_IP));
                assert_eq!(gw_pod, node1, "node1 tunnels to the gateway pod's node CIDR");
            }
        }
        for text in [config("vethc"), node2_off_config()] {
            let c = meshnet::config::Config::from_yaml(&text).unwrap();
            assert!(c.desired().tun_routes.is_empty());
        }
        assert_eq!(all_modes(&Params::new(true)).iter().filter(|m| matches!(m, Mode::Tunnel(_) | Mode::Vxlan)).count(), 4);
    }
}
