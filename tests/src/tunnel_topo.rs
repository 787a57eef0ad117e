//! Two single-node clusters joined by meshnet's tunnel mode, on a LAN where each node admits
//! nothing from the other but its tunnel NodePort, as on the user's LAN.
//!
//! ```text
//!  cluster1                                          cluster2
//!  client 10.244.0.10 ─┐                        ┌─ app-a 10.245.0.20
//!  client2 10.244.0.11 ┤ cni0 10.244.0.1/24     │  app-b 10.245.0.21   cni0 10.245.0.1/24
//!                  node1 ── lan0 192.0.2.1 ──── lan0 192.0.2.2 ── node2
//!   from lan0: UDP 31800, replies, and           from lan0: UDP 31800 only, and (FORWARD)
//!   (FORWARD) 10.245/16 → 10.244.0/24            10.244/16 → 10.245.0/24
//! ```
//!
//! Neither node has a route to the other's pods, and both keep the CNI's masquerade of pod
//! traffic leaving the node: only the tunnel carries a pod's packet across with its own
//! address. FORWARD admits the remote pods' packets because decapsulated packets delivered
//! through the stack (`delivery: stack`) come in on `lan0`; a plainly routed pod packet would
//! have been masqueraded on the other node and is dropped.
//!
//! Every pod runs a [`PodServer`] whose answers name the pod and the peer address it saw.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc, Mutex},
};

use crate::{
    peer::{self, Server, IO_TIMEOUT},
    topo::{self, TempDir, APP_A, APP_B, APP_PORT, CLIENT2_IP, CLIENT_IP, GW_IP, GW_PORT, NODE1_LAN, NODE2_LAN, POD_INTERFACES},
    Agent, Bpffs, CmdOut, NetNs,
};

/// The tunnel NodePort of both clusters.
pub const TUNNEL_PORT: u16 = 31800;
/// Each node's own pod CIDR: what its tunnel delivers to.
pub const NODE1_PODS: &str = "10.244.0.0/24";
pub const NODE2_PODS: &str = "10.245.0.0/24";
/// Every pod's byte-for-byte TCP echo, for bulk transfers.
pub const BULK_PORT: u16 = 9000;
/// The comment on the FORWARD rule that admits the remote pods' packets from `lan0`.
const DECAPSULATED: &str = "remote-pods-from-lan0";
/// The outer headers the tunnel adds: IPv4, UDP and meshnet's 8 bytes.
pub const OVERHEAD: u32 = 36;

/// How a node hands a decapsulated packet to its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Through the node's stack: routing and FORWARD see it, as if it arrived unencapsulated.
    Stack,
    /// Straight to the pod's interface: out of its port's host end (`bpf_redirect`), or along
    /// the node's route (`bpf_redirect_neigh`).
    Redirect,
    /// As `Redirect`, into the pod's end of its veth (`bpf_redirect_peer`) from 5.10.
    Peer,
}

impl Delivery {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stack => "stack",
            Self::Redirect => "redirect",
            Self::Peer => "peer",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub delivery: Delivery,
    /// `--attach-mode` for both agents (`None`: the agent's `auto`).
    pub attach_mode: Option<&'static str>,
    /// Also build topo.rs's east-west gateway pod and its NodePorts on node2.
    pub gateway: bool,
    /// Checksum offload off on every veth, so that every receiver verifies full checksums:
    /// a checksum the tunnel got wrong (the MSS clamp rewrites a TCP option, fragmentation
    /// IPv4 headers) then loses the packet. Segmentation offload goes with it, so pods send
    /// MSS-sized segments instead of GSO packets.
    pub strict_checksums: bool,
    /// Agents with `MESHNET_NO_REDIRECT_NEIGH=1`: the datapath takes the path of kernels
    /// before 5.10 (a FIB lookup and `bpf_redirect`, the agent keeping the peer nodes'
    /// neighbour entries resolved), which no kernel of the matrix would take by itself.
    pub no_redirect_neigh: bool,
    /// kube-proxy's first FORWARD rule on both nodes (`KUBE-FORWARD`: `--ctstate INVALID -j
    /// DROP`), ahead of the topology's own filter, as on every node kube-proxy runs on.
    pub kube_proxy: bool,
}

impl Options {
    #[must_use]
    pub fn new(delivery: Delivery) -> Self {
        Self { delivery, attach_mode: None, gateway: false, strict_checksums: false, no_redirect_neigh: false, kube_proxy: false }
    }
}

/// A pod's name (what its server answers with) and address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: &'static str,
    pub ip: Ipv4Addr,
}

pub const CLIENT: Pod = Pod { name: "client", ip: CLIENT_IP };
pub const CLIENT2: Pod = Pod { name: "client2", ip: CLIENT2_IP };
pub const APP_A_POD: Pod = Pod { name: "app-a", ip: APP_A };
pub const APP_B_POD: Pod = Pod { name: "app-b", ip: APP_B };

impl Pod {
    /// Its line and datagram echo.
    #[must_use]
    pub fn app(self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, APP_PORT)
    }

    /// Its byte-for-byte TCP echo.
    #[must_use]
    pub fn bulk(self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, BULK_PORT)
    }

    /// What its server answers to `msg` from `from`, line or datagram.
    #[must_use]
    pub fn reply(self, msg: &str, from: SocketAddr) -> String {
        format!("{} {} got {msg} from {from}", self.name, self.app())
    }

    /// What its server answers to a summary request (a datagram starting with `?`).
    #[must_use]
    pub fn summary(self, data: &[u8], from: SocketAddr) -> String {
        format!("{} {} got {} bytes fnv {:08x} from {from}", self.name, self.app(), data.len(), fnv(data))
    }
}

/// FNV-1a 32 of `data`: a short fingerprint for the summary replies.
#[must_use]
pub fn fnv(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The UDP datagrams a pod's server received, with their sources, in order.
pub type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A pod's servers, stopped on drop:
/// - TCP `APP_PORT`: each line is answered `NAME IP:PORT got LINE from PEER`;
/// - UDP `APP_PORT`: each datagram is recorded and answered the same way, or, when it starts
///   with `?`, with its length and fingerprint only (`NAME IP:PORT got N bytes fnv H from
///   PEER`), so that the answer to a datagram at the path MTU is no larger than it;
/// - TCP `BULK_PORT`: every byte is echoed back until the peer shuts its side.
pub struct PodServer {
    _server: Server,
    pub pod: Pod,
    pub seen: Seen,
}

/// A listener with a backlog for a thousand connections opened at once (std's is 128).
fn listen(addr: SocketAddrV4) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::V4(addr).into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.listen(4096).unwrap();
    s.into()
}

impl PodServer {
    #[must_use]
    pub fn start(ns: &NetNs, pod: Pod) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::default();
        let (lines, bulk, udp) = ns.run(move || (listen(pod.app()), listen(pod.bulk()), UdpSocket::bind(pod.app()).unwrap()));
        let threads = vec![
            {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    peer::serve_tcp(lines, stop, move |s| {
                        let Ok(from) = s.peer_addr() else { return };
                        let mut w = s.try_clone().unwrap();
                        for line in BufReader::new(s).lines().map_while(Result::ok) {
                            // One write per answer: Nagle would hold a second piece back for
                            // the peer's delayed ACK.
                            if w.write_all(format!("{}\n", pod.reply(&line, from)).as_bytes()).is_err() {
                                break;
                            }
                        }
                    });
                })
            },
            {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    peer::serve_tcp(bulk, stop, |mut s| {
                        let mut w = s.try_clone().unwrap();
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = w.shutdown(std::net::Shutdown::Write);
                    });
                })
            },
            {
                let (stop, seen) = (stop.clone(), seen.clone());
                std::thread::spawn(move || {
                    peer::serve_udp(udp, stop, move |sock, data, from| {
                        seen.lock().unwrap().push((from, data.to_vec()));
                        let reply = if data.first() == Some(&b'?') {
                            pod.summary(data, from)
                        } else {
                            pod.reply(&String::from_utf8_lossy(data), from)
                        };
                        let _ = sock.send_to(reply.as_bytes(), from);
                    });
                })
            },
        ];
        Self { _server: Server { stop, threads }, pod, seen }
    }

    /// Whether any datagram received so far holds `needle`.
    #[must_use]
    pub fn saw(&self, needle: &[u8]) -> bool {
        self.seen.lock().unwrap().iter().any(|(_, d)| d.windows(needle.len()).any(|w| w == needle))
    }
}

/// A node: its namespace, its agent's bpffs and its config directory.
pub struct Node {
    pub ns: NetNs,
    pub cluster: &'static str,
    pub bpffs: Bpffs,
    pub dir: TempDir,
}

impl Node {
    fn new(ns: NetNs, cluster: &'static str) -> Self {
        Self { ns, cluster, bpffs: Bpffs::new(), dir: TempDir::new() }
    }

    #[must_use]
    pub fn pin_path(&self) -> PathBuf {
        self.bpffs.pin_path()
    }

    /// Writes `text` as this node's config file, atomically as a ConfigMap update does, and
    /// returns its path. A running agent notices the change by itself.
    #[allow(clippy::must_use_candidate, reason = "rewriting a running agent's config needs no path back")]
    pub fn write_config(&self, text: &str) -> PathBuf {
        self.dir.write_config(text)
    }

    /// `meshnet ARGS` in this node with its pin path.
    #[must_use]
    pub fn meshnet(&self, args: &str) -> CmdOut {
        crate::meshnet(&self.ns, &format!("{args} --pin-path {}", self.pin_path().display()))
    }

    /// `meshnet maps dump WHAT -o json`, parsed.
    #[must_use]
    pub fn dump_json(&self, what: &str) -> serde_json::Value {
        let out = self.meshnet(&format!("maps dump {what} -o json"));
        assert!(out.ok, "{}: maps dump {what} failed: {}{}", self.cluster, out.stdout, out.stderr);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
    }

    /// Every datapath counter.
    #[must_use]
    pub fn counters(&self) -> serde_json::Map<String, serde_json::Value> {
        self.dump_json("stats")["stats"].as_object().cloned().unwrap_or_default()
    }

    /// One datapath counter.
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        self.counters()
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("{}: no counter {name}", self.cluster))
    }

    /// `maps dump tunnel`'s row for `peer`: its nodes and what crossed the tunnel with it.
    #[must_use]
    pub fn tunnel_peer(&self, peer: &str) -> serde_json::Value {
        let t = self.dump_json("tunnel");
        t["tunnel"]["peers"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["peer"] == peer).cloned())
            .unwrap_or_else(|| panic!("{}: no tunnel peer {peer} in {t}", self.cluster))
    }

    /// This node's tunnel filter: from `lan0` it admits UDP to the tunnel port and, in
    /// FORWARD, `remote_pods` to `local_pods` (decapsulated packets delivered through the
    /// stack); with `replies`, also replies to connections this node made or forwarded.
    fn admit_only_the_tunnel(&self, remote_pods: &str, local_pods: &str, replies: bool) {
        if replies {
            for chain in ["INPUT", "FORWARD"] {
                self.ns.exec(&format!("iptables -A {chain} -i lan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"));
            }
        }
        self.ns.exec(&format!("iptables -A INPUT -i lan0 -p udp --dport {TUNNEL_PORT} -j ACCEPT"));
        self.ns.exec("iptables -A INPUT -i lan0 -j DROP");
        self.ns.exec(&format!(
            "iptables -A FORWARD -i lan0 -s {remote_pods} -d {local_pods} -m comment --comment {DECAPSULATED} -j ACCEPT"
        ));
        self.ns.exec("iptables -A FORWARD -i lan0 -j DROP");
    }

    /// kube-proxy's `KUBE-FORWARD` chain, first in FORWARD: it drops what conntrack holds
    /// INVALID, such as a TCP segment of a flow whose other direction it never saw.
    fn drop_invalid_as_kube_proxy(&self) {
        self.ns.exec("iptables -N KUBE-FORWARD");
        self.ns.exec("iptables -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP");
        self.ns.exec("iptables -I FORWARD 1 -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD");
    }

    /// Packets kube-proxy's INVALID rule dropped.
    #[must_use]
    pub fn invalid_drops(&self) -> u64 {
        let out = self.ns.exec("iptables -L KUBE-FORWARD -v -x -n");
        out.lines()
            .filter(|l| l.contains("DROP") && l.contains("INVALID"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Packets FORWARD admitted as the remote cluster's pods' from `lan0`: decapsulated
    /// packets delivered through the stack, which `delivery: redirect` bypasses.
    #[must_use]
    pub fn forwarded_from_remote_pods(&self) -> u64 {
        let out = self.ns.exec("iptables -L FORWARD -v -x -n");
        out.lines()
            .filter(|l| l.contains(DECAPSULATED))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Packets the last rule of `chain` (`-i lan0 -j DROP`) dropped.
    #[must_use]
    pub fn lan_drops(&self, chain: &str) -> u64 {
        let out = self.ns.exec(&format!("iptables -L {chain} -v -x -n"));
        out.lines()
            .filter(|l| l.contains("DROP") && l.contains("lan0"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

/// `cluster`'s tunnel config: its `peer` is a tunnel peer with one node at `peer_node`.
#[must_use]
pub fn tunnel_config(delivery: Delivery, side: Side) -> String {
    let (cluster, pods, node_pods, peer, peer_pods, peer_node, peer_node_pods) = match side {
        Side::Node1 => ("cluster1", "10.244.0.0/16", NODE1_PODS, "cluster2", "10.245.0.0/16", NODE2_LAN, NODE2_PODS),
        Side::Node2 => ("cluster2", "10.245.0.0/16", NODE2_PODS, "cluster1", "10.244.0.0/16", NODE1_LAN, NODE1_PODS),
    };
    format!(
        "cluster: {cluster}
podCIDRs: [\"{pods}\"]
interfaces: [{POD_INTERFACES}]
tunnel:
  port: {TUNNEL_PORT}
  interfaces: [\"lan0\"]
  podCIDRs: [\"{node_pods}\"]
  delivery: {delivery}
peers:
  - name: {peer}
    mode: tunnel
    podCIDRs: [\"{peer_pods}\"]
    tunnelPort: {TUNNEL_PORT}
    nodes:
      - address: {peer_node}
        podCIDRs: [\"{peer_node_pods}\"]
",
        delivery = delivery.as_str()
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Node1,
    Node2,
}

/// Both nodes' agents; they stop (by pid) when dropped.
pub struct Agents {
    pub node1: Agent,
    pub node2: Agent,
}

/// The topology. Field order is drop order: servers stop before their namespaces go.
pub struct TunnelTopology {
    pub servers: Vec<PodServer>,
    _gateway: Option<Server>,
    pub client: NetNs,
    pub client2: NetNs,
    pub app_a: NetNs,
    pub app_b: NetNs,
    pub gw: Option<NetNs>,
    pub node1: Node,
    pub node2: Node,
    opts: Options,
}

impl TunnelTopology {
    #[must_use]
    pub fn new(opts: Options) -> Self {
        crate::require_root();
        let node1 = Node::new(topo::node("t1", "10.244.0.1", "10.244.0.0/16"), "cluster1");
        let node2 = Node::new(topo::node("t2", "10.245.0.1", "10.245.0.0/16"), "cluster2");
        node1.ns.ip(&format!("link add lan0 type veth peer name lan0 netns {}", node2.ns.name));
        node1.ns.ip(&format!("addr add {NODE1_LAN}/24 dev lan0"));
        node2.ns.ip(&format!("addr add {NODE2_LAN}/24 dev lan0"));
        node1.ns.ip("link set lan0 up");
        node2.ns.ip("link set lan0 up");
        node2.admit_only_the_tunnel("10.244.0.0/16", NODE2_PODS, false);
        node1.admit_only_the_tunnel("10.245.0.0/16", NODE1_PODS, true);
        if opts.kube_proxy {
            for node in [&node1, &node2] {
                node.drop_invalid_as_kube_proxy();
            }
        }

        let client = topo::pod(&node1.ns, "c", "vethc", &CLIENT_IP.to_string(), "10.244.0.1");
        let client2 = topo::pod(&node1.ns, "c2", "vethc2", &CLIENT2_IP.to_string(), "10.244.0.1");
        let app_a = topo::pod(&node2.ns, "a", "vetha", &APP_A.to_string(), "10.245.0.1");
        let app_b = topo::pod(&node2.ns, "b", "vethb", &APP_B.to_string(), "10.245.0.1");
        let (gw, gateway) = if opts.gateway {
            topo::gateway_nodeports(&node2.ns);
            let gw = topo::pod(&node2.ns, "gw", "vethgw", GW_IP, "10.245.0.1");
            let server = peer::gateway(&gw, GW_IP, GW_PORT);
            (Some(gw), Some(server))
        } else {
            (None, None)
        };
        if opts.strict_checksums {
            let mut ifs = vec![(&node1.ns, "lan0"), (&node1.ns, "vethc"), (&node1.ns, "vethc2")];
            ifs.extend([(&node2.ns, "lan0"), (&node2.ns, "vetha"), (&node2.ns, "vethb")]);
            ifs.extend([(&client, "eth0"), (&client2, "eth0"), (&app_a, "eth0"), (&app_b, "eth0")]);
            if let Some(gw) = &gw {
                ifs.extend([(&node2.ns, "vethgw"), (gw, "eth0")]);
            }
            for (ns, i) in ifs {
                ns.exec(&format!("ethtool -K {i} rx off tx off >/dev/null"));
            }
        }
        let servers = vec![
            PodServer::start(&client, CLIENT),
            PodServer::start(&client2, CLIENT2),
            PodServer::start(&app_a, APP_A_POD),
            PodServer::start(&app_b, APP_B_POD),
        ];
        Self { servers, _gateway: gateway, client, client2, app_a, app_b, gw, node1, node2, opts }
    }

    #[must_use]
    pub fn options(&self) -> Options {
        self.opts
    }

    #[must_use]
    pub fn node(&self, side: Side) -> &Node {
        match side {
            Side::Node1 => &self.node1,
            Side::Node2 => &self.node2,
        }
    }

    /// A pod's server.
    #[must_use]
    pub fn server(&self, pod: Pod) -> &PodServer {
        self.servers.iter().find(|s| s.pod == pod).unwrap()
    }

    /// The node's config with the topology's delivery.
    #[must_use]
    pub fn config(&self, side: Side) -> String {
        tunnel_config(self.opts.delivery, side)
    }

    /// Starts the node's agent on `config` (with the topology's attach mode) and waits until
    /// it is ready.
    #[must_use]
    pub fn start_agent_with(&self, side: Side, config: &str) -> Agent {
        let node = self.node(side);
        let cfg = node.write_config(config);
        let extra: Vec<&str> = self.opts.attach_mode.map(|m| vec!["--attach-mode", m]).unwrap_or_default();
        let mut argv = Agent::argv(&node.ns, &cfg, &node.pin_path(), &extra);
        if self.opts.no_redirect_neigh {
            argv.splice(0..0, ["env".to_string(), format!("{}=1", meshnet::datapath::NO_REDIRECT_NEIGH_ENV)]);
        }
        Agent::spawn(&argv)
    }

    #[must_use]
    pub fn start_agent(&self, side: Side) -> Agent {
        self.start_agent_with(side, &self.config(side))
    }

    /// Both agents with the standard configs.
    #[must_use]
    pub fn start_agents(&self) -> Agents {
        Agents { node1: self.start_agent(Side::Node1), node2: self.start_agent(Side::Node2) }
    }
}

/// A TCP request from inside a pod: one line to `target`, its answer, and the local address
/// the connection had (what the server should have seen).
pub fn tcp_request(target: SocketAddrV4, msg: &str) -> std::io::Result<(String, SocketAddr)> {
    let s = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)?;
    let local = s.local_addr()?;
    Ok((tcp_line(&s, msg)?, local))
}

/// Sends `msg` as a line on `s` and reads the answer line (the servers answer each line with
/// exactly one line, so nothing is read past it).
pub fn tcp_line(s: &TcpStream, msg: &str) -> std::io::Result<String> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    // One write: Nagle would hold a second piece back for the peer's delayed ACK.
    (&*s).write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before the answer"));
    }
    Ok(line.trim_end().to_string())
}

/// A UDP request from a fresh unconnected socket inside a pod: the answer, where it came
/// from, and the socket's local port. Unconnected, so that an answer from another address
/// than `target` is seen as such rather than filtered out.
pub fn udp_request(target: SocketAddrV4, msg: &[u8]) -> std::io::Result<(String, SocketAddr, u16)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.send_to(msg, target)?;
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from, s.local_addr()?.port()))
}

/// Sends `data` to `target`'s byte-for-byte echo while reading the echo back; returns what
/// came back and the connection's MSS (`TCP_MAXSEG`, what the peer's SYN allowed).
pub fn bulk_echo(target: SocketAddrV4, data: Arc<Vec<u8>>) -> std::io::Result<(Vec<u8>, u32)> {
    let s = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mss = socket2::SockRef::from(&s).mss()?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&data)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::new();
    let read = (&s).read_to_end(&mut back);
    writer.join().unwrap()?;
    read?;
    Ok((back, mss))
}

/// Deterministic bytes to send, different for each `seed`.
#[must_use]
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Every socket of a thousand flows is an fd here twice (the client's and the server's).
pub fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}
