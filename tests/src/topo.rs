//! Two simulated single-node clusters on a "LAN", as in the user's setup.
//!
//! ```text
//!  cluster1                                         cluster2
//!  client 10.244.0.10 ─┐                    ┌─ gw 10.245.0.10 (east-west gateway :15443)
//!  client2 10.244.0.11 ┤ cni0 10.244.0.1    │  app-a 10.245.0.20 :8080
//!                  node1 ── lan0 192.0.2.1 ─── lan0 192.0.2.2 ── node2 cni0 10.245.0.1
//!                  masquerade               │  NodePort 31674/tcp, 31675/udp → gw:15443
//!                                           └─ app-b 10.245.0.21 :8080
//! ```
//!
//! node1 has no route to 10.245.0.0/16, so without meshnet a remote pod IP is unreachable.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use crate::{
    peer::{self, Server},
    Bpffs, NetNs,
};

pub const NODE1_LAN: &str = "192.0.2.1";
pub const NODE2_LAN: &str = "192.0.2.2";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
pub const CLIENT2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
pub const GW_IP: &str = "10.245.0.10";
pub const GW_PORT: u16 = 15443;
pub const APP_A: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 20);
pub const APP_B: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 21);
pub const APP_PORT: u16 = 8080;
pub const NODEPORT_TCP: u16 = 31674;
pub const NODEPORT_UDP: u16 = 31675;
/// meshnet attaches to the host side of each pod's veth, not to the bridge: with
/// br_netfilter (which Kubernetes nodes run), conntrack already tracked a pod's packet on
/// the bridge before the bridge device's own tc ingress would see it.
pub const POD_INTERFACES: &str = "\"veth*\"";

#[must_use]
pub fn app_a() -> SocketAddrV4 {
    SocketAddrV4::new(APP_A, APP_PORT)
}

#[must_use]
pub fn app_b() -> SocketAddrV4 {
    SocketAddrV4::new(APP_B, APP_PORT)
}

/// meshnet's config for node1, as the README documents it.
#[must_use]
pub fn node1_config(interfaces: &str) -> String {
    format!(
        "cluster: cluster1
podCIDRs: [\"10.244.0.0/16\"]
interfaces: [{interfaces}]
peers:
  - name: cluster2
    podCIDRs: [\"10.245.0.0/16\"]
    gateways:
      - address: {NODE2_LAN}
        port: {NODEPORT_TCP}
        udpPort: {NODEPORT_UDP}
"
    )
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Turn checksum offload off on every veth, so that every hop computes and every
    /// receiver verifies full checksums: a wrong checksum from meshnet then loses the packet.
    /// With offload on (the default of veth), local TCP sends CHECKSUM_PARTIAL packets.
    pub strict_checksums: bool,
    /// Pods send CHECKSUM_PARTIAL packets (their eth0 keeps tx offload), but the host side
    /// of every pod's veth computes the checksum from the partial sum the packet carries
    /// (tx off: after tc egress, where `to_pod` ran) and every pod verifies what it receives
    /// (rx off), as a NIC and the far end would: a wrong partial sum left by `from_pod` or
    /// `to_pod` then loses the packet. Veth offload alone never computes one.
    pub verify_partial: bool,
}

/// The topology. Field order is drop order: servers stop before their namespaces go.
pub struct Topology {
    _servers: Vec<Server>,
    pub client: NetNs,
    pub client2: NetNs,
    pub gw: NetNs,
    pub app_a: NetNs,
    pub app_b: NetNs,
    pub node1: NetNs,
    pub node2: NetNs,
    pub bpffs: Bpffs,
    pub dir: TempDir,
    opts: Options,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    #[must_use]
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(crate::unique("dir"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl TempDir {
    /// Writes `text` as `meshnet.yaml` here, atomically as a ConfigMap update does, and
    /// returns its path.
    pub fn write_config(&self, text: &str) -> PathBuf {
        let p = self.0.join("meshnet.yaml");
        let tmp = self.0.join(".meshnet.yaml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node: a `cni0` bridge at `cni_ip`, forwarding on, and the CNI's masquerade of its pods.
pub(crate) fn node(tag: &str, cni_ip: &str, pod_cidr: &str) -> NetNs {
    let n = NetNs::new(tag);
    n.ip("link add cni0 type bridge");
    n.ip(&format!("addr add {cni_ip}/24 dev cni0"));
    n.ip("link set cni0 up");
    n.exec("sysctl -qw net.ipv4.ip_forward=1");
    // The CNI's masquerade: pod traffic leaving the node takes the node's address.
    n.exec(&format!("iptables -t nat -A POSTROUTING -s {pod_cidr} ! -d {pod_cidr} -j MASQUERADE"));
    n
}

/// A pod on `node`'s bridge: `eth0` at `ip`/24 in its own namespace, `host_if` on the node.
pub(crate) fn pod(node: &NetNs, tag: &str, host_if: &str, ip: &str, gw: &str) -> NetNs {
    let p = NetNs::new(tag);
    node.ip(&format!("link add {host_if} type veth peer name eth0 netns {}", p.name));
    node.ip(&format!("link set {host_if} master cni0 up"));
    p.ip(&format!("addr add {ip}/24 dev eth0"));
    p.ip("link set eth0 up");
    p.ip(&format!("route add default via {gw}"));
    p
}

/// kube-proxy's NodePort rules on node2 for the east-west gateway, with its masquerade of
/// NodePort traffic (externalTrafficPolicy: Cluster).
pub(crate) fn gateway_nodeports(node2: &NetNs) {
    for (proto, port) in [("tcp", NODEPORT_TCP), ("udp", NODEPORT_UDP)] {
        node2.exec(&format!(
            "iptables -t nat -A PREROUTING -d {NODE2_LAN} -p {proto} --dport {port} -j DNAT --to-destination {GW_IP}:{GW_PORT}"
        ));
    }
    node2.exec(&format!("iptables -t nat -A POSTROUTING -d {GW_IP} -o cni0 -m conntrack --ctstate DNAT -j MASQUERADE"));
}

impl Topology {
    #[must_use]
    pub fn new(opts: Options) -> Self {
        crate::require_root();
        let node1 = node("n1", "10.244.0.1", "10.244.0.0/16");
        let node2 = node("n2", "10.245.0.1", "10.245.0.0/16");
        node1.ip(&format!("link add lan0 type veth peer name lan0 netns {}", node2.name));
        node1.ip(&format!("addr add {NODE1_LAN}/24 dev lan0"));
        node2.ip(&format!("addr add {NODE2_LAN}/24 dev lan0"));
        node1.ip("link set lan0 up");
        node2.ip("link set lan0 up");
        gateway_nodeports(&node2);

        let client = pod(&node1, "c", "vethc", &CLIENT_IP.to_string(), "10.244.0.1");
        let client2 = pod(&node1, "c2", "vethc2", &CLIENT2_IP.to_string(), "10.244.0.1");
        let gw = pod(&node2, "gw", "vethgw", GW_IP, "10.245.0.1");
        let app_a = pod(&node2, "a", "vetha", &APP_A.to_string(), "10.245.0.1");
        let app_b = pod(&node2, "b", "vethb", &APP_B.to_string(), "10.245.0.1");

        if opts.strict_checksums {
            for (ns, ifs) in [
                (&node1, &["lan0", "vethc", "vethc2"][..]),
                (&node2, &["lan0", "vethgw", "vetha", "vethb"][..]),
                (&client, &["eth0"][..]),
                (&client2, &["eth0"][..]),
                (&gw, &["eth0"][..]),
                (&app_a, &["eth0"][..]),
                (&app_b, &["eth0"][..]),
            ] {
                for i in ifs {
                    ns.exec(&format!("ethtool -K {i} rx off tx off >/dev/null"));
                }
            }
        }
        if opts.verify_partial {
            for (ns, ifs) in [(&node1, &["vethc", "vethc2"][..]), (&node2, &["vethgw", "vetha", "vethb"][..])] {
                for i in ifs {
                    ns.exec(&format!("ethtool -K {i} tx off >/dev/null"));
                }
            }
            for ns in [&client, &client2, &gw, &app_a, &app_b] {
                ns.exec("ethtool -K eth0 rx off >/dev/null");
            }
        }

        let servers = vec![
            peer::gateway(&gw, GW_IP, GW_PORT),
            peer::app(&app_a, &APP_A.to_string(), APP_PORT),
            peer::app(&app_b, &APP_B.to_string(), APP_PORT),
        ];
        Self {
            _servers: servers,
            client,
            client2,
            gw,
            app_a,
            app_b,
            node1,
            node2,
            bpffs: Bpffs::new(),
            dir: TempDir::new(),
            opts,
        }
    }

    #[must_use]
    pub fn options(&self) -> Options {
        self.opts
    }

    /// Writes `text` as node1's config file, atomically as a ConfigMap update does, and
    /// returns its path.
    pub fn write_config(&self, text: &str) -> PathBuf {
        self.dir.write_config(text)
    }

    /// The pin path of node1's agent.
    #[must_use]
    pub fn pin_path(&self) -> PathBuf {
        self.bpffs.pin_path()
    }

    /// Starts meshnet's agent on node1 with the standard config.
    #[must_use]
    pub fn start_meshnet(&self, extra: &[&str]) -> crate::Agent {
        let cfg = self.write_config(&node1_config(POD_INTERFACES));
        crate::Agent::start(&self.node1, &cfg, &self.pin_path(), extra)
    }

    /// [`Self::start_meshnet`] with `var=1` in the agent's environment.
    pub fn start_meshnet_with(&self, var: &str, extra: &[&str]) -> crate::Agent {
        let cfg = self.write_config(&node1_config(POD_INTERFACES));
        let mut argv = crate::Agent::argv(&self.node1, &cfg, &self.pin_path(), extra);
        argv.splice(0..0, ["env".to_string(), format!("{var}=1")]);
        crate::Agent::spawn(&argv)
    }

    /// What a user might hand-write instead of meshnet: iptables DNAT on node1 from the
    /// remote pod CIDR to the gateway NodePort.
    pub fn install_iptables_dnat(&self) {
        for (proto, port) in [("tcp", NODEPORT_TCP), ("udp", NODEPORT_UDP)] {
            self.node1.exec(&format!(
                "iptables -t nat -A PREROUTING -i cni0 -d 10.245.0.0/16 -p {proto} -j DNAT --to-destination {NODE2_LAN}:{port}"
            ));
        }
    }

    /// Runs `meshnet ARGS` in node1 with its pin path.
    #[must_use]
    pub fn meshnet(&self, args: &str) -> crate::CmdOut {
        crate::meshnet(&self.node1, &format!("{args} --pin-path {}", self.pin_path().display()))
    }

    /// `meshnet maps dump WHAT -o json`, parsed.
    #[must_use]
    pub fn dump_json(&self, what: &str) -> serde_json::Value {
        let out = self.meshnet(&format!("maps dump {what} -o json"));
        assert!(out.ok, "maps dump {what} failed: {}{}", out.stdout, out.stderr);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
    }

    /// One datapath counter.
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        self.dump_json("stats")["stats"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}"))
    }
}
