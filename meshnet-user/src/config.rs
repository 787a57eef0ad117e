//! The agent's configuration: parsing, full validation, and the desired datapath state it
//! describes.
//!
//! Validation is complete before anything touches the datapath, and every error names the
//! field and the value, e.g. `peers[0].podCIDRs[0]: "10.245.0.0/33" is not a valid CIDR`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    path::Path,
    time::Duration,
};

use ipnet::Ipv4Net;
use meshnet_common::{limits, Gateway, LocalNet, PeerGateways, TunnelConfig, TunnelNode, GW_UP, TUN_DELIVER_PEER, TUN_DELIVER_REDIRECT};
use serde::{Deserialize, Serialize};

/// The config file as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConfig {
    pub cluster: String,
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<String>,
    /// This cluster's Service CIDRs, which no peer may claim (kube-apiserver's
    /// `--service-cluster-ip-range`).
    #[serde(rename = "serviceCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    pub service_cidrs: Vec<String>,
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// This node's side of tunnel mode; required when any peer is `mode: tunnel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<RawTunnel>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    #[serde(default)]
    pub nat: RawNat,
    #[serde(default)]
    pub health: RawHealth,
    /// Load the datapath build that logs its decisions (as `meshnet agent --datapath-log`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub datapath_log: bool,
}

/// This node's tunnel side as written (`tunnel:`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTunnel {
    /// This cluster's tunnel NodePort (UDP).
    pub port: u32,
    /// The uplinks where tunnel packets arrive: names or globs, as the top-level `interfaces`.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// This node's own pod CIDRs, the only destinations delivered to. Empty: the Node
    /// object's (see [`RawConfig::with_node_cidrs`]), else the cluster's `podCIDRs`.
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Delivery::is_redirect")]
    pub delivery: Delivery,
}

/// How decapsulated packets reach the local pod.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Through the node's stack (routing, FORWARD, NetworkPolicy), as if they had arrived
    /// unencapsulated. The node's conntrack then sees a flow one way only (its pod's packets
    /// leave encapsulated before netfilter), holds the TCP flows and ping replies INVALID,
    /// and kube-proxy's INVALID drop kills them: only for nodes without that rule.
    Stack,
    /// Redirected straight to the pod's interface, past the node's netfilter: conntrack sees
    /// neither way. Out of the host end of the pod's veth, whose qdisc and tc egress see it.
    #[default]
    Redirect,
    /// As `Redirect`, but from 5.10 straight into the pod's end of its veth
    /// (`bpf_redirect_peer`): the fastest, and past the host end's qdisc and tc egress too (a
    /// bandwidth limit, a CNI's eBPF policy there). Below 5.10 as `Redirect`.
    Peer,
}

impl Delivery {
    #[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
    fn is_redirect(&self) -> bool {
        *self == Delivery::Redirect
    }
}

/// How a peer's pod CIDRs are reached.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeerMode {
    /// DNAT to the peer's east-west gateway NodePorts.
    #[default]
    Gateway,
    /// Encapsulated in UDP to the peer node that hosts the destination pod.
    Tunnel,
}

impl PeerMode {
    #[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
    fn is_gateway(&self) -> bool {
        *self == PeerMode::Gateway
    }
}

// Every field added since gateway peers is skipped when empty: the controller publishes
// peers to other clusters, whose older agents refuse unknown fields, and a gateway peer must
// read the same to them as before.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPeer {
    pub name: String,
    /// `gateway` when absent, which is what every peer published before tunnel mode means.
    #[serde(default, skip_serializing_if = "PeerMode::is_gateway")]
    pub mode: PeerMode,
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<RawGateway>,
    /// The peer's tunnel NodePort (UDP); `mode: tunnel` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u32>,
    /// The peer's nodes and the pod CIDRs each hosts; `mode: tunnel` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<RawTunnelNode>,
}

/// One node of a tunnel peer as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTunnelNode {
    pub address: String,
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawGateway {
    pub address: String,
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_port: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RawNat {
    /// Size of each flow-state map (forward and reverse).
    pub max_flows: u32,
    /// A UDP flow idle this long is expired.
    pub udp_timeout_seconds: u64,
    /// A TCP flow that saw FINs from both sides or a RST, idle this long, is expired.
    pub tcp_closed_timeout_seconds: u64,
    /// An established TCP flow idle this long is expired. Long, since an idle but open
    /// connection must keep working.
    pub tcp_timeout_seconds: u64,
    /// A flow that never got a reply, idle this long, is expired, whatever its protocol: it
    /// holds table room that nothing will ever free otherwise (see `FLOW_UNANSWERED`).
    pub unanswered_timeout_seconds: u64,
    /// How often the garbage collector walks the flow state.
    pub gc_interval_seconds: u64,
}

impl Default for RawNat {
    fn default() -> Self {
        Self {
            max_flows: limits::DEFAULT_NAT_ENTRIES,
            udp_timeout_seconds: 120,
            tcp_closed_timeout_seconds: 10,
            tcp_timeout_seconds: 86_400,
            unanswered_timeout_seconds: 60,
            gc_interval_seconds: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RawHealth {
    /// Probe gateways (a TCP connect to nodeIP:NodePort) and mark them down or up.
    pub enabled: bool,
    pub interval_seconds: u64,
    pub timeout_milliseconds: u64,
    /// Consecutive failed probes before a gateway is marked down.
    pub failure_threshold: u32,
    /// Consecutive successful probes before a down gateway is marked up again.
    pub rise_threshold: u32,
    /// How long flows pinned to a down gateway are kept (a down gateway only stops taking
    /// new flows); past it they are purged and start again on a live gateway.
    pub down_grace_seconds: u64,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 2,
            timeout_milliseconds: 1000,
            failure_threshold: 2,
            rise_threshold: 2,
            down_grace_seconds: 60,
        }
    }
}

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cluster: String,
    pub pod_cidrs: Vec<Ipv4Net>,
    pub service_cidrs: Vec<Ipv4Net>,
    /// Interface names or globs (`cni0`, `cali*`).
    pub interfaces: Vec<String>,
    /// This node's tunnel side, when the config has one.
    pub tunnel: Option<TunnelSettings>,
    pub peers: Vec<Peer>,
    pub max_flows: u32,
    pub gc: GcConfig,
    pub health: HealthConfig,
    /// Whether the datapath's logging build is asked for (`datapathLog`).
    pub datapath_log: bool,
}

/// Flow-state expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcConfig {
    pub udp_timeout: Duration,
    pub tcp_closed_timeout: Duration,
    pub tcp_timeout: Duration,
    pub unanswered_timeout: Duration,
    pub interval: Duration,
}

/// Gateway health probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub rise_threshold: u32,
    pub down_grace: Duration,
}

/// This node's tunnel side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSettings {
    /// This cluster's tunnel NodePort (UDP), the only port decapsulated.
    pub port: u16,
    /// Uplink names or globs, where tunnel packets arrive.
    pub interfaces: Vec<String>,
    /// This node's own pod CIDRs as configured; empty means the cluster's `pod_cidrs`.
    pub pod_cidrs: Vec<Ipv4Net>,
    pub delivery: Delivery,
}

impl TunnelSettings {
    /// The pod CIDRs the tunnel delivers to on this node.
    #[must_use]
    pub fn delivered<'a>(&'a self, config: &'a Config) -> &'a [Ipv4Net] {
        if self.pod_cidrs.is_empty() {
            &config.pod_cidrs
        } else {
            &self.pod_cidrs
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// The id that keys this peer in the datapath: a hash of the name, so that it is the
    /// same across reloads and restarts without any state of its own.
    pub id: u32,
    pub pod_cidrs: Vec<Ipv4Net>,
    /// Empty for a tunnel peer.
    pub gateways: Vec<GatewayAddr>,
    /// `Some` exactly for a `mode: tunnel` peer.
    pub tunnel: Option<PeerTunnel>,
}

impl Peer {
    #[must_use]
    pub fn is_tunnel(&self) -> bool {
        self.tunnel.is_some()
    }
}

/// A tunnel peer's side: its tunnel NodePort and its nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTunnel {
    pub port: u16,
    pub nodes: Vec<TunnelNodeAddr>,
}

/// One node of a tunnel peer: where its pods' CIDRs are sent encapsulated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelNodeAddr {
    pub address: Ipv4Addr,
    pub pod_cidrs: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GatewayAddr {
    pub address: Ipv4Addr,
    pub port: u16,
    pub udp_port: Option<u16>,
}

/// One validation failure: the field path and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Refused {
        path: String,
        #[source]
        source: crate::yaml::Refused,
    },
    #[error("{path}: not valid YAML for a meshnet config: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    // One line, so that a log line holds the whole reason.
    #[error("{path}: invalid config: {}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid { path: String, errors: Vec<FieldError> },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        RawConfig::load(path)?.0.validated(&path.display().to_string())
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        RawConfig::from_yaml(text, "<config>")?.validated("<config>")
    }
}

impl RawConfig {
    /// Reads and parses a config file, without validating it; also returns its text.
    pub fn load(path: &Path) -> Result<(Self, String), ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        Ok((Self::from_yaml(&text, &shown)?, text))
    }

    pub fn from_yaml(text: &str, shown: &str) -> Result<Self, ConfigError> {
        crate::yaml::bound_aliases(text).map_err(|source| ConfigError::Refused { path: shown.into(), source })?;
        serde_yaml::from_str(text).map_err(|source| ConfigError::Parse { path: shown.into(), source })
    }

    /// Validates, naming `shown` (a path) in the error.
    pub fn validated(&self, shown: &str) -> Result<Config, ConfigError> {
        self.validated_on(shown, &BTreeSet::new())
    }

    /// Validates on a node with `local_addresses`, naming `shown` (a path) in the error.
    pub fn validated_on(&self, shown: &str, local_addresses: &BTreeSet<Ipv4Addr>) -> Result<Config, ConfigError> {
        self.validate_on(local_addresses).map_err(|errors| ConfigError::Invalid { path: shown.into(), errors })
    }

    /// This config with this node's pod CIDRs from its Node object added to the local ones,
    /// and taken as the tunnel's when `tunnel.podCIDRs` is not given.
    #[must_use]
    pub fn with_node_cidrs(&self, node_cidrs: &[Ipv4Net]) -> RawConfig {
        let mut out = self.clone();
        for c in node_cidrs {
            let covered = out.pod_cidrs.iter().filter_map(|x| x.parse::<Ipv4Net>().ok()).any(|x| x.contains(c));
            if !covered {
                out.pod_cidrs.push(c.to_string());
            }
        }
        // The node's own CIDRs, not the cluster's: the tunnel then delivers only to pods that
        // are here, instead of forwarding inner packets on to other nodes.
        if let Some(t) = out.tunnel.as_mut().filter(|t| t.pod_cidrs.is_empty()) {
            t.pod_cidrs = node_cidrs.iter().map(ToString::to_string).collect();
        }
        out
    }
}

/// A stable 32-bit id for a peer name (FNV-1a).
#[must_use]
pub fn peer_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// Two peer names of one id, the first by name order: found among `c0`, `c1`, ... in some
/// 80,000 names (the birthday bound of 32-bit ids), as anyone choosing a name can.
#[cfg(test)]
pub(crate) fn colliding_names() -> (String, String) {
    let mut seen: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    for i in 0u32.. {
        let name = format!("c{i}");
        if let Some(other) = seen.insert(peer_id(&name), name.clone()) {
            return if other < name { (other, name) } else { (name, other) };
        }
    }
    unreachable!()
}

/// Address ranges that no peer may claim as pod CIDRs, with what they are. Routing any of
/// them to a remote gateway would hand that cluster traffic the node never meant to send
/// it: the cloud metadata service (and the node credentials it serves), loopback services,
/// multicast.
pub const RESERVED_RANGES: [(Ipv4Net, &str); 5] = [
    (net(0, 0, 0, 0, 8), "\"this network\" (0.0.0.0/8)"),
    (net(127, 0, 0, 0, 8), "loopback"),
    (net(169, 254, 0, 0, 16), "link-local, where cloud metadata services answer"),
    (net(224, 0, 0, 0, 4), "multicast"),
    (net(240, 0, 0, 0, 4), "reserved (240.0.0.0/4, with broadcast)"),
];

const fn net(o1: u8, o2: u8, o3: u8, o4: u8, len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(o1, o2, o3, o4), len) {
        Ok(net) => net,
        Err(_) => panic!("bad reserved range"),
    }
}

/// What the reserved-range rules know about the local side: the one place that decides
/// which remote pod CIDRs and gateway addresses are dangerous. The agent's validator and the
/// controller both use it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reserved {
    /// The local cluster's Service CIDRs.
    pub service_cidrs: Vec<Ipv4Net>,
    /// The node's own addresses (the agent), or every local node's (the controller).
    pub local_addresses: BTreeSet<Ipv4Addr>,
}

impl Reserved {
    /// Why `cidr` must not be routed to a peer, or `None` if it may.
    #[must_use]
    pub fn refuse_cidr(&self, cidr: Ipv4Net) -> Option<String> {
        self.refuse_cidr_sparing(cidr, |_| false)
    }

    /// [`Reserved::refuse_cidr`], but a local address that `spared` says the peer keeps (see
    /// [`Held`]) refuses nothing.
    #[must_use]
    pub fn refuse_cidr_sparing(&self, cidr: Ipv4Net, spared: impl Fn(Ipv4Addr) -> bool) -> Option<String> {
        let overlaps = |o: &Ipv4Net| o.contains(&cidr) || cidr.contains(o);
        if cidr.prefix_len() == 0 {
            return Some(format!("{cidr} would send all traffic to the peer; refusing a default route"));
        }
        if let Some((r, what)) = RESERVED_RANGES.iter().find(|(r, _)| overlaps(r)) {
            return Some(format!("{cidr} overlaps {r}, {what}"));
        }
        if let Some(s) = self.service_cidrs.iter().find(|s| overlaps(s)) {
            return Some(format!("{cidr} overlaps the local Service CIDR {s}"));
        }
        if let Some(a) = self.local_addresses.iter().find(|a| cidr.contains(*a) && !spared(**a)) {
            return Some(format!("{cidr} covers {a}, an address of this node"));
        }
        None
    }

    /// Why `a` must not be a gateway address, or `None` if it may.
    #[must_use]
    pub fn refuse_gateway(&self, a: Ipv4Addr) -> Option<String> {
        let what = if a.is_unspecified() {
            "unspecified"
        } else if a.is_broadcast() {
            "broadcast"
        } else if a.is_multicast() {
            "multicast"
        } else if a.is_loopback() {
            "loopback"
        } else if a.is_link_local() {
            "link-local"
        } else if let Some((_, what)) = RESERVED_RANGES.iter().find(|(r, _)| r.contains(&a)) {
            what
        } else if self.local_addresses.contains(&a) {
            return Some(format!("{a} is an address of this node; the peer's traffic would stay here"));
        } else {
            return None;
        };
        Some(format!("{a} is not a unicast address of a remote node ({what})"))
    }
}

/// What the datapath's maps hold for one peer, as `ControlMaps::held_claims` reads them: the
/// addresses they route to it (its gateway routes, its tunnel nodes' pod CIDRs). The pins
/// outlive the agent, so this holds across its restarts.
///
/// A published peer keeps what it holds though an address of this node comes to lie in it:
/// anyone allowed to create a Service can have an `externalIP` bound on every node
/// (kube-proxy's IPVS mode does), and were the peer refused for it, every agent would
/// withdraw the peer and break its flows at the next publish, reload or restart. What the
/// peer does not hold yet (a new or wider CIDR, a new node) is refused as before, so a
/// remote still cannot newly claim this node's addresses. The controller has the same rule
/// for what a peer was published with (`resolve::unheld_addresses`). A gateway or tunnel node
/// at an address of this node is never kept: packets for the peer would go to whatever
/// listens there (a Service's externalIP, its backends), and a peer withdrawn is better than a
/// peer intercepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// The addresses the maps route to the peer.
    pub cidrs: Vec<Ipv4Net>,
}

impl Held {
    /// What `p` holds, a peer as the maps serve it (see `ControlMaps::pinned_peers`).
    #[must_use]
    pub fn of(p: &RawPeer) -> Self {
        let cidrs = p.pod_cidrs.iter().chain(p.nodes.iter().flat_map(|n| &n.pod_cidrs)).filter_map(|c| c.parse().ok());
        Self { cidrs: cidrs.collect() }
    }

    /// Whether the maps route all of `net` to the peer.
    #[must_use]
    pub fn routes(&self, net: Ipv4Net) -> bool {
        self.cidrs.iter().any(|h| h.contains(&net))
    }
}

/// An address of this node that a published peer keeps, since the maps held it for the peer
/// (see [`Held`]): in `claim`, one of its pod CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeptLocal {
    pub peer: String,
    pub claim: String,
    pub address: Ipv4Addr,
}

impl fmt::Display for KeptLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of published peer {:?} covers {}, an address of this node", self.claim, self.peer, self.address)
    }
}

#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
    /// The local addresses that the peer checked keeps (see [`Held`]).
    kept: Vec<KeptLocal>,
}

impl Checker {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.into(), message: message.into() });
    }

    fn cidr(&mut self, field: String, value: &str) -> Option<Ipv4Net> {
        let Ok(net) = value.parse::<Ipv4Net>() else {
            if value.contains(':') {
                self.err(field, format!("{value:?} is IPv6, which meshnet does not support yet"));
            } else {
                self.err(field, format!("{value:?} is not a valid CIDR"));
            }
            return None;
        };
        if net.trunc() != net {
            self.err(field, format!("{value:?} has host bits set; did you mean \"{}\"?", net.trunc()));
            return None;
        }
        Some(net)
    }

    /// An interface name or glob, as `interfaces` and `tunnel.interfaces` take them.
    fn interface(&mut self, field: String, pattern: &str) {
        if pattern.is_empty() || pattern.len() > 15 && !pattern.contains(['*', '?', '[']) {
            self.err(field, format!("{pattern:?} is not a valid interface name"));
        } else if glob::Pattern::new(pattern).is_err() {
            self.err(field, format!("{pattern:?} is not a valid glob"));
        }
    }

    fn port(&mut self, field: String, value: u32) -> Option<u16> {
        match u16::try_from(value) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                self.err(field, format!("{value} is not a valid port (1-65535)"));
                None
            }
        }
    }
}

/// CIDRs with their owners, for overlap and containment checks in O(log n) each: two CIDRs
/// overlap only if one contains the other, so a CIDR overlaps the set if one of its at most
/// 33 supernets is in it, or if some CIDR in it starts within its range. A remote's peer
/// lists thousands of CIDRs (a tunnel peer's nodes, each with its own), and a scan of every
/// one for each would make one validation millions of comparisons.
pub(crate) struct CidrSet<O = String> {
    by_start: BTreeMap<(u32, u8), O>,
    /// Bit `n` set: some member is a /n. A supernet of a length no member has is not looked
    /// up, so a set of /32s finds one in a single lookup, not 33.
    lens: u64,
}

impl<O> Default for CidrSet<O> {
    fn default() -> Self {
        Self { by_start: BTreeMap::new(), lens: 0 }
    }
}

impl<O> FromIterator<(Ipv4Net, O)> for CidrSet<O> {
    fn from_iter<I: IntoIterator<Item = (Ipv4Net, O)>>(iter: I) -> Self {
        let mut set = Self::default();
        for (net, owner) in iter {
            set.insert(net, owner);
        }
        set
    }
}

impl<O> CidrSet<O> {
    /// Adds `net`, unless it is in already (its first owner stays).
    pub(crate) fn insert(&mut self, net: Ipv4Net, owner: O) {
        self.by_start.entry((u32::from(net.network()), net.prefix_len())).or_insert(owner);
        self.lens |= 1 << net.prefix_len();
    }

    /// The widest CIDR of the set that contains `net` (or is it), and its owner.
    pub(crate) fn covering(&self, net: Ipv4Net) -> Option<(Ipv4Net, &O)> {
        for len in (0..=net.prefix_len()).filter(|len| self.lens & 1 << len != 0) {
            let sup = Ipv4Net::new(net.network(), len).ok()?.trunc();
            if let Some(owner) = self.by_start.get(&(u32::from(sup.network()), len)) {
                return Some((sup, owner));
            }
        }
        None
    }

    /// A CIDR of the set that overlaps `net`, and its owner.
    pub(crate) fn overlap(&self, net: Ipv4Net) -> Option<(Ipv4Net, &O)> {
        if let Some(found) = self.covering(net) {
            return Some(found);
        }
        let (start, end) = (u32::from(net.network()), u32::from(net.broadcast()));
        let ((first, len), owner) = self.by_start.range((start, 0)..=(end, 32)).next()?;
        Some((Ipv4Net::new(Ipv4Addr::from(*first), *len).ok()?, owner))
    }
}

/// What the peers validated so far hold: names, ids, CIDRs and tunnel nodes, for uniqueness,
/// overlaps and the datapath's limits.
struct Claims<'a> {
    cluster: &'a str,
    reserved: &'a Reserved,
    /// Whether tunnel peers may be taken: this node has a `tunnel:` section.
    tunnel: bool,
    names: BTreeSet<String>,
    ids: BTreeMap<u32, String>,
    /// Every CIDR seen so far with its owner.
    cidrs: CidrSet,
    /// Every tunnel node so far with its peer's name.
    tun_nodes: BTreeMap<Ipv4Addr, String>,
    /// The tunnel nodes' pod CIDRs so far, each a `mn_tun_routes_v1` entry.
    tun_routes: usize,
    /// Peers so far, each a `mn_names_v1` entry (and a gateway peer's a `mn_peers_v2` one).
    peers: usize,
    /// This cluster's pod CIDRs.
    local: Vec<Ipv4Net>,
    /// Gateway peers' pod CIDRs so far, each a `mn_routes_v1` entry.
    routes: usize,
    /// Whether the peers committed now are the config file's: their gateways' and nodes'
    /// addresses, and a tunnel peer's pod CIDRs, are then fixed.
    fixing: bool,
    /// The file's peers' node addresses (gateways, tunnel nodes), with their peer's name. No
    /// tunnel peer's CIDR may cover one: that peer could send packets from the gateway, which
    /// `to_pod` takes for the gateway's replies, into the flows with it. (Between published
    /// peers the controller settles this, by who was published with what: refused here in
    /// the order of names, a remote could get any peer refused by claiming its gateway's.)
    fixed_nodes: Vec<(Ipv4Addr, String)>,
    /// The file's tunnel peers' pod CIDRs, with their peer's name: no gateway or node of
    /// another peer may lie in one, for the same reason.
    fixed_tunnel_cidrs: Vec<(Ipv4Net, String)>,
    /// What the maps hold for each published peer, by name: see [`Held`].
    held: Option<&'a BTreeMap<String, Held>>,
}

/// `f` under the field path `at` (empty for a peer checked on its own).
fn under(at: &str, f: &str) -> String {
    if at.is_empty() {
        f.to_string()
    } else {
        format!("{at}.{f}")
    }
}

/// Whether `n` entries exceed the map limit `max`.
fn over(n: usize, max: u32) -> bool {
    u32::try_from(n).map_or(true, |n| n > max)
}

impl<'a> Claims<'a> {
    fn new(cluster: &'a str, reserved: &'a Reserved, local: &[Ipv4Net], tunnel: bool) -> Self {
        Self {
            cluster,
            reserved,
            tunnel,
            names: BTreeSet::new(),
            ids: BTreeMap::new(),
            cidrs: {
                let mut set = CidrSet::default();
                for n in local {
                    set.insert(*n, "the local podCIDRs".to_string());
                }
                set
            },
            tun_nodes: BTreeMap::new(),
            tun_routes: 0,
            peers: 0,
            routes: 0,
            local: local.to_vec(),
            fixing: true,
            fixed_nodes: Vec::new(),
            fixed_tunnel_cidrs: Vec::new(),
            held: None,
        }
    }

    /// What the maps hold for published peer `name`. Nothing for the file's peers: an
    /// operator's error there is reported as it always was.
    fn held(&self, name: &str) -> Option<&'a Held> {
        self.held.filter(|_| !self.fixing).and_then(|h| h.get(name))
    }

    /// Checks one peer against the rules and what is claimed; errors go to `c`, with field
    /// paths under `at`. Claims nothing: `commit` does, once the caller accepts the peer.
    fn check(&self, c: &mut Checker, at: &str, raw: &RawPeer) -> Peer {
        let field = |f: &str| under(at, f);
        // The names map holds 64 bytes: a longer name would come back cut from the pins (after
        // a restart during an API outage) under another id, and two names alike in their first
        // 64 bytes would be one. Names reach the log and the metrics: no control characters.
        let max = std::mem::size_of::<meshnet_common::PeerName>();
        if raw.name.trim().is_empty() {
            c.err(field("name"), "must not be empty");
        } else if raw.name.len() > max {
            c.err(field("name"), format!("is {} bytes long; at most {max}", raw.name.len()));
        } else if raw.name.chars().any(char::is_control) {
            c.err(field("name"), format!("{:?} holds a control character", raw.name));
        } else if self.names.contains(&raw.name) {
            c.err(field("name"), format!("{:?} is not unique", raw.name));
        } else if raw.name == self.cluster {
            c.err(field("name"), format!("{:?} is this cluster's own name", raw.name));
        }
        let id = peer_id(&raw.name);
        if let Some(other) = self.ids.get(&id).filter(|o| **o != raw.name) {
            c.err(field("name"), format!("{:?} hashes to the same id as {other:?}; rename one", raw.name));
        }
        if raw.pod_cidrs.is_empty() {
            c.err(field("podCIDRs"), "must list at least one CIDR");
        }
        // The datapath's maps hold so many: a peer past them is refused on its own, never left
        // to fail the whole apply at the map write.
        if over(self.peers + 1, limits::MAX_PEERS) {
            c.err(field("name"), format!("one peer more than the datapath holds (at most {})", limits::MAX_PEERS));
        }
        let routes = self.routes + raw.pod_cidrs.len();
        if raw.mode == PeerMode::Gateway && over(routes, limits::MAX_ROUTES) {
            let n = raw.pod_cidrs.len();
            c.err(field("podCIDRs"), format!("{n} CIDRs make {routes} across the peers; at most {}", limits::MAX_ROUTES));
        }
        let mut cidrs: Vec<Ipv4Net> = Vec::new();
        // Every CIDR that parses, refused or not: a node's CIDR inside a refused one has
        // already cost the peer an error, and needs no second.
        let mut parsed: Vec<Ipv4Net> = Vec::new();
        let mut mine = CidrSet::default();
        let me = format!("peer {:?}", raw.name);
        let held = self.held(&raw.name);
        let node_cidrs: Vec<Ipv4Net> = raw.nodes.iter().flat_map(|n| &n.pod_cidrs).filter_map(|s| s.parse().ok()).collect();
        for (ci, s) in raw.pod_cidrs.iter().enumerate() {
            let f = field(&format!("podCIDRs[{ci}]"));
            let Some(net) = c.cidr(f.clone(), s) else { continue };
            parsed.push(net);
            // A local address in it is kept where the maps already route it to this peer as
            // this version would: a gateway peer's route inside one they hold, a tunnel
            // peer's (which routes by its nodes' CIDRs) with every node CIDR over the address
            // inside one they hold, or where no node CIDR covers it (a tunnel peer's pod CIDRs
            // route nothing themselves). Anything wider or new is refused.
            let spared = |a: Ipv4Addr| {
                held.is_some_and(|h| match raw.mode {
                    PeerMode::Gateway => h.routes(net),
                    PeerMode::Tunnel => {
                        let mut over = node_cidrs.iter().filter(|n| n.contains(&a)).peekable();
                        over.peek().is_none() || (h.routes(Ipv4Net::from(a)) && over.all(|n| h.routes(*n)))
                    }
                })
            };
            if let Some(why) = self.reserved.refuse_cidr_sparing(net, spared) {
                c.err(f, format!("{s:?} refused: {why}"));
                continue;
            }
            let kept = self.reserved.local_addresses.iter().filter(|a| net.contains(*a));
            c.kept.extend(kept.map(|a| KeptLocal { peer: raw.name.clone(), claim: net.to_string(), address: *a }));
            if let Some((other, owner)) = self.cidrs.overlap(net).or_else(|| mine.overlap(net)) {
                c.err(f, format!("{s:?} overlaps {other} of {owner}"));
                continue;
            }
            let fixed = self.fixed_nodes.iter().find(|(a, owner)| *owner != raw.name && net.contains(a));
            if let Some((a, owner)) = fixed.filter(|_| raw.mode == PeerMode::Tunnel) {
                c.err(f, format!("{s:?} covers {a}, a node address of peer {owner:?} of the config file, and a tunnel peer's CIDR may not"));
                continue;
            }
            mine.insert(net, me.clone());
            cidrs.push(net);
        }
        let (gateways, tunnel) = match raw.mode {
            PeerMode::Gateway => {
                if let Some(p) = raw.tunnel_port {
                    c.err(field("tunnelPort"), format!("{p} given, but it is only for mode: tunnel"));
                }
                if !raw.nodes.is_empty() {
                    c.err(field("nodes"), format!("{} nodes given, but they are only for mode: tunnel", raw.nodes.len()));
                }
                (self.check_gateways(c, at, raw), None)
            }
            PeerMode::Tunnel => (Vec::new(), Some(self.check_tunnel(c, at, raw, &parsed))),
        };
        Peer { name: raw.name.clone(), id, pod_cidrs: cidrs, gateways, tunnel }
    }

    fn check_gateways(&self, c: &mut Checker, at: &str, raw: &RawPeer) -> Vec<GatewayAddr> {
        if raw.gateways.is_empty() {
            c.err(under(at, "gateways"), "must list at least one gateway");
        }
        if raw.gateways.len() > limits::MAX_GATEWAYS {
            c.err(under(at, "gateways"), format!("{} gateways; at most {} per peer", raw.gateways.len(), limits::MAX_GATEWAYS));
        }
        let mut gateways = Vec::new();
        for (gi, g) in raw.gateways.iter().enumerate() {
            let gat = under(at, &format!("gateways[{gi}]"));
            let address = self.remote_node(c, format!("{gat}.address"), &g.address, &raw.name);
            let port = c.port(format!("{gat}.port"), g.port);
            let udp_port = match g.udp_port {
                Some(p) => c.port(format!("{gat}.udpPort"), p).map(Some),
                None => Some(None),
            };
            if let (Some(address), Some(port), Some(udp_port)) = (address, port, udp_port) {
                let gw = GatewayAddr { address, port, udp_port };
                if gateways.contains(&gw) {
                    c.err(gat, format!("{address}:{port} is listed twice"));
                } else {
                    gateways.push(gw);
                }
            }
        }
        gateways
    }

    /// A tunnel peer's port and nodes. `parsed` are the peer's pod CIDRs that parse: each
    /// node's CIDRs must lie inside them, so that the peer's CIDRs stay the only ones it
    /// claims and the overlap checks between peers cover its nodes too.
    fn check_tunnel(&self, c: &mut Checker, at: &str, raw: &RawPeer, parsed: &[Ipv4Net]) -> PeerTunnel {
        let field = |f: &str| under(at, f);
        if !self.tunnel {
            c.err(field("mode"), "\"tunnel\" needs this node's tunnel: section (port, interfaces), which the config lacks");
        }
        if !raw.gateways.is_empty() {
            c.err(
                field("gateways"),
                format!("{} gateways given; a mode: tunnel peer has none (its nodes take the traffic)", raw.gateways.len()),
            );
        }
        let port = if let Some(p) = raw.tunnel_port {
            c.port(field("tunnelPort"), p)
        } else {
            c.err(field("tunnelPort"), "required for mode: tunnel (the peer's tunnel NodePort, UDP)");
            None
        };
        if raw.nodes.is_empty() {
            c.err(field("nodes"), "must list at least one node for mode: tunnel");
        }
        let total = self.tun_nodes.len() + raw.nodes.len();
        if over(total, limits::MAX_TUNNEL_NODES) {
            let n = raw.nodes.len();
            c.err(field("nodes"), format!("{n} nodes make {total} across the tunnel peers; at most {}", limits::MAX_TUNNEL_NODES));
        }
        let routes: usize = raw.nodes.iter().map(|n| n.pod_cidrs.len()).sum();
        let total = self.tun_routes + routes;
        if over(total, limits::MAX_TUNNEL_ROUTES) {
            c.err(
                field("nodes"),
                format!("{routes} node podCIDRs make {total} across the tunnel peers; at most {}", limits::MAX_TUNNEL_ROUTES),
            );
        }
        let mut nodes: Vec<TunnelNodeAddr> = Vec::new();
        // Looked up, not scanned: a remote's peer may list 4,096 nodes with four CIDRs each,
        // and a scan for each would cost every agent's apply (and the controller's vetting)
        // hundreds of millions of comparisons.
        let mut addresses: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let peer_cidrs: CidrSet<()> = parsed.iter().map(|p| (*p, ())).collect();
        let mut node_cidrs = CidrSet::default();
        for (ni, n) in raw.nodes.iter().enumerate() {
            let nat = field(&format!("nodes[{ni}]"));
            let mut address = self.remote_node(c, format!("{nat}.address"), &n.address, &raw.name);
            // One node, one peer: the decapsulating side knows a peer by its node's address.
            if let Some(a) = address {
                if addresses.contains(&a) {
                    c.err(format!("{nat}.address"), format!("{:?} is listed twice", n.address));
                    address = None;
                } else if let Some(owner) = self.tun_nodes.get(&a) {
                    c.err(format!("{nat}.address"), format!("{:?} is already a node of peer {owner:?}", n.address));
                    address = None;
                }
            }
            if n.pod_cidrs.is_empty() {
                c.err(format!("{nat}.podCIDRs"), "must list at least one CIDR");
            }
            let mut pod_cidrs = Vec::new();
            for (ci, s) in n.pod_cidrs.iter().enumerate() {
                let f = format!("{nat}.podCIDRs[{ci}]");
                let Some(net) = c.cidr(f.clone(), s) else { continue };
                if peer_cidrs.covering(net).is_none() {
                    c.err(f, format!("{s:?} is not inside any of the peer's podCIDRs"));
                    continue;
                }
                if let Some((other, owner)) = node_cidrs.overlap(net) {
                    c.err(f, format!("{s:?} overlaps {other} of {owner}"));
                    continue;
                }
                node_cidrs.insert(net, format!("node {:?}", n.address));
                pod_cidrs.push(net);
            }
            if let Some(address) = address {
                addresses.insert(address);
                nodes.push(TunnelNodeAddr { address, pod_cidrs });
            }
        }
        PeerTunnel { port: port.unwrap_or(0), nodes }
    }

    /// A remote node's address (a gateway's or a tunnel node's), or `None` with the reason
    /// in `c`.
    fn remote_node(&self, c: &mut Checker, field: String, value: &str, name: &str) -> Option<Ipv4Addr> {
        let Ok(a) = value.parse::<Ipv4Addr>() else {
            c.err(field, format!("{value:?} is not a valid IPv4 address"));
            return None;
        };
        // Never kept, held or not (see [`Held`]): the peer's packets would go to what listens
        // at the address here.
        if let Some(why) = self.reserved.refuse_gateway(a) {
            c.err(field, format!("{value:?} refused: {why}"));
            return None;
        }
        // A pod's address of this cluster is no node's: traffic for the peer would go to that
        // pod. (Another peer's pod CIDR over the address is the controller's to settle, by
        // who was published with it: refused here, in the order of names, a remote could get
        // any peer refused by claiming its gateway's address.)
        if let Some(net) = self.local.iter().find(|n| n.contains(&a)) {
            c.err(field, format!("{value:?} refused: {a} lies in {net}, this cluster's pods' CIDR, a pod's address, not a node's"));
            return None;
        }
        if let Some((net, owner)) = self.fixed_tunnel_cidrs.iter().find(|(n, owner)| owner != name && n.contains(&a)) {
            c.err(field, format!("{value:?} refused: {a} lies in {net}, pods of tunnel peer {owner:?} of the config file"));
            return None;
        }
        Some(a)
    }

    fn commit(&mut self, p: &Peer) {
        self.peers += 1;
        if p.tunnel.is_none() {
            self.routes += p.pod_cidrs.len();
        }
        self.names.insert(p.name.clone());
        self.ids.insert(p.id, p.name.clone());
        let owner = format!("peer {:?}", p.name);
        for n in &p.pod_cidrs {
            self.cidrs.insert(*n, owner.clone());
        }
        for n in p.tunnel.iter().flat_map(|t| &t.nodes) {
            self.tun_nodes.insert(n.address, p.name.clone());
            self.tun_routes += n.pod_cidrs.len();
        }
        if self.fixing {
            let addresses = p.gateways.iter().map(|g| g.address).chain(p.tunnel.iter().flat_map(|t| t.nodes.iter().map(|n| n.address)));
            self.fixed_nodes.extend(addresses.map(|a| (a, p.name.clone())));
            if p.tunnel.is_some() {
                self.fixed_tunnel_cidrs.extend(p.pod_cidrs.iter().map(|n| (*n, p.name.clone())));
            }
        }
    }
}

/// Validates one peer on its own, with the agent's rules: what the controller checks before
/// it publishes a peer. Field paths are relative to the peer (`podCIDRs[0]`). Overlaps with
/// other peers are not checked here.
pub fn validate_peer(raw: &RawPeer, reserved: &Reserved) -> Result<Peer, Vec<FieldError>> {
    // Whether this node can take a tunnel peer is each agent's to say, from its own config.
    let claims = Claims::new("", reserved, &[], true);
    let mut c = Checker::default();
    let p = claims.check(&mut c, "", raw);
    if c.errors.is_empty() {
        Ok(p)
    } else {
        Err(c.errors)
    }
}

/// A config with published peers merged in one by one: see [`RawConfig::merge_api`].
#[derive(Debug, Clone)]
pub struct Merged {
    pub config: Config,
    /// The version of each published peer that is in `config`.
    pub applied: BTreeMap<String, RawPeer>,
    /// Published peers whose newest version was refused, with every problem.
    pub rejected: BTreeMap<String, Vec<FieldError>>,
    /// The addresses of this node that the applied published peers keep (see [`Held`]).
    pub kept: Vec<KeptLocal>,
}

impl RawConfig {
    /// Validates everything and returns every problem at once.
    pub fn validate(&self) -> Result<Config, Vec<FieldError>> {
        self.validate_on(&BTreeSet::new())
    }

    /// Validates, also refusing peers that claim one of `local_addresses` (this node's).
    pub fn validate_on(&self, local_addresses: &BTreeSet<Ipv4Addr>) -> Result<Config, Vec<FieldError>> {
        let mut c = Checker::default();
        let (mut config, reserved) = self.validate_local(&mut c, local_addresses);
        let mut claims = Claims::new(&self.cluster, &reserved, &config.pod_cidrs, self.tunnel.is_some());
        for (pi, raw) in self.peers.iter().enumerate() {
            let p = claims.check(&mut c, &format!("peers[{pi}]"), raw);
            claims.commit(&p);
            config.peers.push(p);
        }
        if c.errors.is_empty() {
            Ok(config)
        } else {
            Err(c.errors)
        }
    }

    /// Validates this (file) config as a whole, then adds published peers one at a time, so
    /// that one bad peer costs only itself. `published` lists, by name, the versions of each
    /// peer in order of preference (the newest, then the last one that was applied): the
    /// first that passes is taken. A peer of the file wins over a published one of the same
    /// name. Fails only when the file itself is invalid.
    pub fn merge_api(
        &self,
        local_addresses: &BTreeSet<Ipv4Addr>,
        published: &BTreeMap<String, Vec<RawPeer>>,
    ) -> Result<Merged, Vec<FieldError>> {
        self.merge_api_with(local_addresses, &BTreeMap::new(), published, &BTreeSet::new())
    }

    /// [`Self::merge_api`], where the published peers named in `applied` (those in force
    /// now) keep their ids against newcomers. Peers are taken in name order, and of two
    /// with one id the later is refused: whoever may add a remote cluster could otherwise
    /// pick a name of a peer's id that sorts first, and have that peer withdrawn here. (The
    /// controller publishes no such pair; this holds against one that did.)
    pub fn merge_api_keeping(
        &self,
        local_addresses: &BTreeSet<Ipv4Addr>,
        published: &BTreeMap<String, Vec<RawPeer>>,
        applied: &BTreeSet<String>,
    ) -> Result<Merged, Vec<FieldError>> {
        self.merge_api_with(local_addresses, &BTreeMap::new(), published, applied)
    }

    /// [`RawConfig::merge_api`], where a published peer keeps what `held` (by peer name: what
    /// the datapath's maps hold) says it holds, though one of `local_addresses` lies in it.
    pub fn merge_api_held(
        &self,
        local_addresses: &BTreeSet<Ipv4Addr>,
        held: &BTreeMap<String, Held>,
        published: &BTreeMap<String, Vec<RawPeer>>,
    ) -> Result<Merged, Vec<FieldError>> {
        self.merge_api_with(local_addresses, held, published, &BTreeSet::new())
    }

    /// [`Self::merge_api_keeping`] and [`Self::merge_api_held`] at once, as the agent merges.
    pub fn merge_api_with(
        &self,
        local_addresses: &BTreeSet<Ipv4Addr>,
        held: &BTreeMap<String, Held>,
        published: &BTreeMap<String, Vec<RawPeer>>,
        applied: &BTreeSet<String>,
    ) -> Result<Merged, Vec<FieldError>> {
        let mut config = self.validate_on(local_addresses)?;
        let mut c = Checker::default();
        let (_, reserved) = self.validate_local(&mut c, local_addresses);
        let mut claims = Claims::new(&self.cluster, &reserved, &config.pod_cidrs, self.tunnel.is_some());
        for p in &config.peers {
            claims.commit(p);
        }
        claims.fixing = false;
        // Held even if no version of it passes now: a newcomer must not take the id of a
        // peer that is only refused for the moment. The file's peers hold theirs first.
        for name in applied.iter().filter(|n| published.contains_key(*n) && !self.peers.iter().any(|p| &p.name == *n)) {
            claims.ids.entry(peer_id(name)).or_insert_with(|| name.clone());
        }
        claims.held = Some(held);
        let mut merged = Merged { config: config.clone(), applied: BTreeMap::new(), rejected: BTreeMap::new(), kept: Vec::new() };
        for (name, versions) in published {
            if self.peers.iter().any(|p| &p.name == name) {
                continue;
            }
            for (i, raw) in versions.iter().enumerate() {
                let mut c = Checker::default();
                let p = claims.check(&mut c, "", raw);
                if c.errors.is_empty() {
                    claims.commit(&p);
                    config.peers.push(p);
                    merged.applied.insert(name.clone(), raw.clone());
                    merged.kept.extend(c.kept);
                    break;
                }
                if i == 0 {
                    merged.rejected.insert(name.clone(), c.errors);
                }
            }
        }
        merged.config = config;
        Ok(merged)
    }

    /// Everything but the peers: a config with no peers, and the reserved ranges it implies.
    fn validate_local(&self, c: &mut Checker, local_addresses: &BTreeSet<Ipv4Addr>) -> (Config, Reserved) {
        if self.cluster.trim().is_empty() {
            c.err("cluster", "must not be empty");
        }
        let pod_cidrs: Vec<Ipv4Net> = self
            .pod_cidrs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| c.cidr(format!("podCIDRs[{i}]"), s))
            .collect();
        let service_cidrs: Vec<Ipv4Net> = self
            .service_cidrs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| c.cidr(format!("serviceCIDRs[{i}]"), s))
            .collect();
        if self.interfaces.is_empty() {
            c.err("interfaces", "must name at least one interface or glob (e.g. cni0, cali*)");
        }
        for (i, pattern) in self.interfaces.iter().enumerate() {
            c.interface(format!("interfaces[{i}]"), pattern);
        }
        let tunnel = self.tunnel.as_ref().map(|t| t.validate(c, &pod_cidrs));
        if self.nat.max_flows < 1024 {
            c.err("nat.maxFlows", format!("{} is too small (at least 1024)", self.nat.max_flows));
        }
        for (field, v) in [
            ("nat.udpTimeoutSeconds", self.nat.udp_timeout_seconds),
            ("nat.tcpClosedTimeoutSeconds", self.nat.tcp_closed_timeout_seconds),
            ("nat.tcpTimeoutSeconds", self.nat.tcp_timeout_seconds),
            ("nat.unansweredTimeoutSeconds", self.nat.unanswered_timeout_seconds),
            ("nat.gcIntervalSeconds", self.nat.gc_interval_seconds),
            ("health.intervalSeconds", self.health.interval_seconds),
            ("health.timeoutMilliseconds", self.health.timeout_milliseconds),
        ] {
            if v == 0 {
                c.err(field, "must be at least 1");
            }
        }
        if self.health.failure_threshold == 0 {
            c.err("health.failureThreshold", "must be at least 1");
        }
        if self.health.rise_threshold == 0 {
            c.err("health.riseThreshold", "must be at least 1");
        }
        // A day: beyond it a dead gateway's flows would outlive any TCP timeout anyway.
        if self.health.down_grace_seconds > 86_400 {
            c.err("health.downGraceSeconds", format!("{} is more than a day (86400)", self.health.down_grace_seconds));
        }
        let reserved = Reserved { service_cidrs: service_cidrs.clone(), local_addresses: local_addresses.clone() };
        let config = Config {
            cluster: self.cluster.clone(),
            pod_cidrs,
            service_cidrs,
            interfaces: self.interfaces.clone(),
            tunnel,
            peers: Vec::new(),
            max_flows: self.nat.max_flows,
            gc: GcConfig {
                udp_timeout: Duration::from_secs(self.nat.udp_timeout_seconds),
                tcp_closed_timeout: Duration::from_secs(self.nat.tcp_closed_timeout_seconds),
                tcp_timeout: Duration::from_secs(self.nat.tcp_timeout_seconds),
                unanswered_timeout: Duration::from_secs(self.nat.unanswered_timeout_seconds),
                interval: Duration::from_secs(self.nat.gc_interval_seconds),
            },
            health: HealthConfig {
                enabled: self.health.enabled,
                interval: Duration::from_secs(self.health.interval_seconds),
                timeout: Duration::from_millis(self.health.timeout_milliseconds),
                failure_threshold: self.health.failure_threshold,
                rise_threshold: self.health.rise_threshold,
                down_grace: Duration::from_secs(self.health.down_grace_seconds),
            },
            datapath_log: self.datapath_log,
        };
        (config, reserved)
    }
}

impl RawTunnel {
    /// The `tunnel:` section against the cluster's (valid) pod CIDRs.
    fn validate(&self, c: &mut Checker, cluster_cidrs: &[Ipv4Net]) -> TunnelSettings {
        let port = c.port("tunnel.port".into(), self.port).unwrap_or(0);
        if self.interfaces.is_empty() {
            c.err("tunnel.interfaces", "must name at least one uplink interface or glob (e.g. eth0, ens*)");
        }
        for (i, pattern) in self.interfaces.iter().enumerate() {
            c.interface(format!("tunnel.interfaces[{i}]"), pattern);
        }
        if self.pod_cidrs.len() > limits::MAX_NODE_CIDRS {
            c.err("tunnel.podCIDRs", format!("{} CIDRs; at most {} per node", self.pod_cidrs.len(), limits::MAX_NODE_CIDRS));
        } else if self.pod_cidrs.is_empty() && cluster_cidrs.len() > limits::MAX_NODE_CIDRS {
            c.err(
                "tunnel.podCIDRs",
                format!(
                    "not given, so the cluster's {} podCIDRs would be delivered to; at most {}: list this node's own",
                    cluster_cidrs.len(),
                    limits::MAX_NODE_CIDRS
                ),
            );
        }
        let mut pod_cidrs = Vec::new();
        for (i, s) in self.pod_cidrs.iter().enumerate() {
            let f = format!("tunnel.podCIDRs[{i}]");
            let Some(net) = c.cidr(f.clone(), s) else { continue };
            // Anything else would have the tunnel deliver into another cluster's addresses.
            if !cluster_cidrs.is_empty() && !cluster_cidrs.iter().any(|o| o.contains(&net)) {
                c.err(f, format!("{s:?} is not inside any of the cluster's podCIDRs"));
                continue;
            }
            pod_cidrs.push(net);
        }
        TunnelSettings { port, interfaces: self.interfaces.clone(), pod_cidrs, delivery: self.delivery }
    }
}

/// What the datapath maps should hold for a config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeMap<Ipv4Net, u32>,
    pub peers: BTreeMap<u32, PeerGateways>,
    /// Peer names by id, for dumps and logs.
    pub peer_names: BTreeMap<u32, String>,
    /// This cluster's pod CIDRs, whose traffic the datapath passes without lookups.
    pub local: Vec<Ipv4Net>,
    /// Tunnel peers' node pod CIDRs → their node (`mn_tun_routes_v1`). Only the peer's side
    /// is filled; `src_be`, `ifindex` and `mtu` are 0 for the agent to fill from the
    /// kernel's route to each node.
    pub tun_routes: BTreeMap<Ipv4Net, TunnelNode>,
    /// Tunnel peers' node addresses → peer id (`mn_tun_nodes_v1`).
    pub tun_nodes: BTreeMap<Ipv4Addr, u32>,
    /// This node's tunnel settings (`mn_tun_cfg_v1`) when the config has a `tunnel:`
    /// section; `mtu` is 0 for the agent to fill from the uplinks.
    pub tun_config: Option<TunnelConfig>,
    /// Tunnel peers' ports (`mn_tun_pports_v1`), host order: pods may send no UDP of their
    /// own there.
    pub tun_peer_ports: BTreeSet<u16>,
}

impl Config {
    #[must_use]
    pub fn desired(&self) -> Desired {
        let mut d = Desired { local: self.pod_cidrs.clone(), ..Desired::default() };
        for p in &self.peers {
            d.peer_names.insert(p.id, p.name.clone());
            // A tunnel peer is none of the gateway datapath's: a route to it there would
            // send its traffic to a gateway it does not have.
            if let Some(t) = &p.tunnel {
                d.tun_peer_ports.insert(t.port);
                for n in &t.nodes {
                    d.tun_nodes.insert(n.address, p.id);
                    let node = TunnelNode {
                        addr_be: u32::from_ne_bytes(n.address.octets()),
                        port_be: t.port.to_be(),
                        peer_id: p.id,
                        ..TunnelNode::default()
                    };
                    for net in &n.pod_cidrs {
                        d.tun_routes.insert(*net, node);
                    }
                }
                continue;
            }
            for net in &p.pod_cidrs {
                d.routes.insert(*net, p.id);
            }
            let mut value = PeerGateways::default();
            for (slot, g) in value.gateways.iter_mut().zip(&p.gateways) {
                *slot = gateway_value(g, true);
            }
            value.count = u32::try_from(p.gateways.len().min(limits::MAX_GATEWAYS)).unwrap_or(0);
            d.peers.insert(p.id, value);
        }
        d.tun_config = self.tunnel.as_ref().map(|t| self.tunnel_config(t));
        d
    }

    fn tunnel_config(&self, t: &TunnelSettings) -> TunnelConfig {
        let mut value = TunnelConfig {
            cluster_id: peer_id(&self.cluster),
            port_be: t.port.to_be(),
            flags: match t.delivery {
                Delivery::Stack => 0,
                Delivery::Redirect => TUN_DELIVER_REDIRECT,
                Delivery::Peer => TUN_DELIVER_REDIRECT | TUN_DELIVER_PEER,
            },
            nets: [LocalNet::NONE; limits::MAX_NODE_CIDRS],
            ..TunnelConfig::default()
        };
        // Validation keeps the list within the slots; were it longer, the rest would only
        // not be delivered to.
        for (slot, n) in value.nets.iter_mut().zip(t.delivered(self)) {
            *slot = LocalNet { addr_be: u32::from_ne_bytes(n.network().octets()), mask_be: u32::from_ne_bytes(n.netmask().octets()) };
        }
        value
    }
}

impl Desired {
    /// The ids of the tunnel peers: every one has at least one node.
    #[must_use]
    pub fn tunnel_peers(&self) -> BTreeSet<u32> {
        self.tun_nodes.values().copied().collect()
    }

    /// Marks the gateways in `down` (by address and TCP port) as down.
    pub fn apply_health(&mut self, down: &BTreeSet<(Ipv4Addr, u16)>) {
        for pg in self.peers.values_mut() {
            for g in pg.live_mut() {
                let key = (Ipv4Addr::from(g.addr_be.to_ne_bytes()), u16::from_be(g.tcp_port_be));
                g.flags = if down.contains(&key) { g.flags & !GW_UP } else { g.flags | GW_UP };
            }
        }
    }
}

#[must_use]
pub fn gateway_value(g: &GatewayAddr, up: bool) -> Gateway {
    Gateway {
        addr_be: u32::from_ne_bytes(g.address.octets()),
        tcp_port_be: g.port.to_be(),
        udp_port_be: g.udp_port.unwrap_or(0).to_be(),
        flags: if up { GW_UP } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: [cni0, "cali*"]
peers:
  - name: cluster2
    podCIDRs: ["10.245.0.0/16"]
    gateways:
      - address: 192.0.2.2
        port: 31674
        udpPort: 31675
"#;

    fn errors(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml) {
            Err(ConfigError::Invalid { errors, .. }) => errors.iter().map(ToString::to_string).collect(),
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    #[test]
    fn health_hysteresis_and_grace_default_and_are_checked() {
        let c = Config::from_yaml(GOOD).unwrap();
        assert_eq!((c.health.failure_threshold, c.health.rise_threshold), (2, 2));
        assert_eq!(c.health.down_grace, Duration::from_mins(1));
        let c = Config::from_yaml(&format!("{GOOD}health:\n  riseThreshold: 3\n  downGraceSeconds: 0\n")).unwrap();
        assert_eq!((c.health.rise_threshold, c.health.down_grace), (3, Duration::ZERO));
        let e = errors(&format!("{GOOD}health:\n  riseThreshold: 0\n  downGraceSeconds: 86401\n"));
        assert!(e.iter().any(|m| m.contains("health.riseThreshold")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("health.downGraceSeconds")), "{e:?}");
    }

    /// A minute unless set; a zero would expire every new flow before its reply came.
    #[test]
    fn the_unanswered_timeout_defaults_to_a_minute_and_is_checked() {
        assert_eq!(Config::from_yaml(GOOD).unwrap().gc.unanswered_timeout, Duration::from_mins(1));
        let c = Config::from_yaml(&format!("{GOOD}nat:\n  unansweredTimeoutSeconds: 2\n")).unwrap();
        assert_eq!(c.gc.unanswered_timeout, Duration::from_secs(2));
        let e = errors(&format!("{GOOD}nat:\n  unansweredTimeoutSeconds: 0\n"));
        assert!(e.iter().any(|m| m.contains("nat.unansweredTimeoutSeconds")), "{e:?}");
    }

    #[test]
    fn parses_the_documented_example() {
        let c = Config::from_yaml(GOOD).unwrap();
        assert_eq!(c.cluster, "cluster1");
        assert_eq!(c.interfaces, ["cni0", "cali*"]);
        assert_eq!(c.peers[0].gateways[0].udp_port, Some(31675));
        assert_eq!(c.max_flows, limits::DEFAULT_NAT_ENTRIES);
        let d = c.desired();
        let id = peer_id("cluster2");
        assert_eq!(d.routes[&"10.245.0.0/16".parse().unwrap()], id);
        let pg = d.peers[&id];
        assert_eq!(pg.count, 1);
        assert_eq!(pg.gateways[0].addr_be.to_ne_bytes(), [192, 0, 2, 2]);
        assert_eq!(u16::from_be(pg.gateways[0].tcp_port_be), 31674);
        assert_eq!(u16::from_be(pg.gateways[0].udp_port_be), 31675);
        assert_eq!(pg.gateways[0].flags, GW_UP);
    }

    #[test]
    fn peer_names_fit_the_names_map_and_hold_no_control_character() {
        let long = "c".repeat(65);
        assert_eq!(errors(&GOOD.replace("name: cluster2", &format!("name: {long}"))), ["peers[0].name: is 65 bytes long; at most 64"]);
        assert!(Config::from_yaml(&GOOD.replace("name: cluster2", &format!("name: {}", "c".repeat(64)))).is_ok());
        assert_eq!(errors(&GOOD.replace("name: cluster2", r#"name: "c2\nINFO forged""#)), [r#"peers[0].name: "c2\nINFO forged" holds a control character"#]);
    }

    #[test]
    fn anchors_reused_pass_and_an_alias_bomb_is_refused_with_where() {
        let y = GOOD.replacen(r#"podCIDRs: ["10.244.0.0/16"]"#, r#"podCIDRs: &mine ["10.244.0.0/16"]"#, 1) + "serviceCIDRs: *mine\n";
        assert_eq!(Config::from_yaml(&y).unwrap().service_cidrs, Config::from_yaml(GOOD).unwrap().pod_cidrs);
        let bomb = format!("{GOOD}x:\n{}", crate::yaml::alias_bomb().replace("- ", "  - "));
        let e = Config::from_yaml(&bomb).unwrap_err();
        assert!(matches!(&e, ConfigError::Refused { .. }) && e.to_string().contains("YAML aliases"), "{e}");
    }

    #[test]
    fn bad_cidr_names_field_and_value() {
        let y = GOOD.replace("10.245.0.0/16", "10.245.0.0/33");
        assert_eq!(errors(&y), [r#"peers[0].podCIDRs[0]: "10.245.0.0/33" is not a valid CIDR"#]);
    }

    #[test]
    fn host_bits_and_ipv6_are_refused() {
        let y = GOOD.replace("10.245.0.0/16", "10.245.0.1/16");
        assert!(errors(&y)[0].contains("did you mean \"10.245.0.0/16\""));
        let y = GOOD.replace("\"10.245.0.0/16\"", "\"fd00::/64\"");
        assert!(errors(&y)[0].contains("IPv6"));
    }

    #[test]
    fn overlaps_are_refused() {
        let y = GOOD.replace("10.245.0.0/16", "10.244.1.0/24");
        assert_eq!(
            errors(&y),
            [r#"peers[0].podCIDRs[0]: "10.244.1.0/24" overlaps 10.244.0.0/16 of the local podCIDRs"#]
        );
        let y = format!(
            "{GOOD}  - name: cluster3\n    podCIDRs: [\"10.0.0.0/8\"]\n    gateways: [{{address: 192.0.2.3, port: 30000}}]\n"
        );
        let e = errors(&y);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("peers[1].podCIDRs[0]: \"10.0.0.0/8\" overlaps"), "{e:?}");
        let y = GOOD.replace("10.245.0.0/16", "0.0.0.0/0");
        assert!(errors(&y)[0].contains("refusing a default route"));
    }

    #[test]
    fn duplicate_peer_names_and_bad_gateways() {
        let y = format!(
            "{GOOD}  - name: cluster2\n    podCIDRs: [\"10.246.0.0/16\"]\n    gateways: [{{address: 192.0.2.300, port: 0, udpPort: 70000}}]\n"
        );
        assert_eq!(
            errors(&y),
            [
                r#"peers[1].name: "cluster2" is not unique"#,
                r#"peers[1].gateways[0].address: "192.0.2.300" is not a valid IPv4 address"#,
                "peers[1].gateways[0].port: 0 is not a valid port (1-65535)",
                "peers[1].gateways[0].udpPort: 70000 is not a valid port (1-65535)",
            ]
        );
    }

    #[test]
    fn unknown_fields_and_missing_interfaces() {
        let y = GOOD.replace("udpPort", "udp_port");
        assert!(matches!(Config::from_yaml(&y), Err(ConfigError::Parse { .. })));
        let y = GOOD.replace("interfaces: [cni0, \"cali*\"]", "interfaces: []");
        assert!(errors(&y)[0].starts_with("interfaces: must name at least one"));
    }

    #[test]
    fn peer_ids_are_stable() {
        // Pinned state outlives the agent, so the id of a name must never change.
        // FNV-1a("cluster2"), computed independently.
        assert_eq!(peer_id("cluster2"), 0x5c43_8ced);
        assert_ne!(peer_id("cluster2"), peer_id("cluster3"));
    }

    fn peer(name: &str, cidr: &str, gw: &str) -> RawPeer {
        RawPeer {
            name: name.into(),
            pod_cidrs: vec![cidr.into()],
            gateways: vec![RawGateway { address: gw.into(), port: 31674, udp_port: None }],
            ..RawPeer::default()
        }
    }

    fn node() -> Reserved {
        Reserved {
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            local_addresses: ["10.20.144.83".parse().unwrap()].into(),
        }
    }

    /// Each dangerous claim and the exact words that refuse it.
    #[test]
    fn reserved_ranges_are_refused_with_why() {
        let cases = [
            ("169.254.169.254/32", "169.254.169.254/32 overlaps 169.254.0.0/16, link-local, where cloud metadata services answer"),
            ("169.0.0.0/8", "169.0.0.0/8 overlaps 169.254.0.0/16, link-local, where cloud metadata services answer"),
            ("127.0.0.0/24", "127.0.0.0/24 overlaps 127.0.0.0/8, loopback"),
            ("224.0.0.0/8", "224.0.0.0/8 overlaps 224.0.0.0/4, multicast"),
            ("255.255.255.255/32", "255.255.255.255/32 overlaps 240.0.0.0/4, reserved (240.0.0.0/4, with broadcast)"),
            ("0.0.0.0/8", "0.0.0.0/8 overlaps 0.0.0.0/8, \"this network\" (0.0.0.0/8)"),
            ("128.0.0.0/1", "128.0.0.0/1 overlaps 169.254.0.0/16, link-local, where cloud metadata services answer"),
            ("10.96.0.0/24", "10.96.0.0/24 overlaps the local Service CIDR 10.96.0.0/12"),
            ("10.0.0.0/8", "10.0.0.0/8 overlaps the local Service CIDR 10.96.0.0/12"),
            ("10.20.144.0/24", "10.20.144.0/24 covers 10.20.144.83, an address of this node"),
            ("0.0.0.0/0", "0.0.0.0/0 would send all traffic to the peer; refusing a default route"),
        ];
        for (cidr, want) in cases {
            assert_eq!(node().refuse_cidr(cidr.parse().unwrap()).as_deref(), Some(want), "{cidr}");
        }
        for ok in ["10.245.0.0/16", "192.168.0.0/16", "100.64.0.0/10", "172.16.0.0/12"] {
            assert_eq!(node().refuse_cidr(ok.parse().unwrap()), None, "{ok}");
        }
        let gw = |a: &str| node().refuse_gateway(a.parse().unwrap());
        for (a, what) in [
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("239.1.1.1", "multicast"),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("0.1.2.3", "\"this network\" (0.0.0.0/8)"),
            ("240.0.0.1", "reserved (240.0.0.0/4, with broadcast)"),
        ] {
            assert_eq!(gw(a), Some(format!("{a} is not a unicast address of a remote node ({what})")));
        }
        assert_eq!(gw("10.20.144.83").as_deref(), Some("10.20.144.83 is an address of this node; the peer's traffic would stay here"));
        assert_eq!(gw("10.20.144.165"), None);
        // A LAN may share addresses with the Service CIDR's unused part: a node there is reached.
        assert_eq!(gw("10.100.0.10"), None);
    }

    /// A gateway or a tunnel node at one of this cluster's pods' addresses is refused: the
    /// peer's traffic would go to that pod. Inside a published peer's pod CIDR it is not
    /// refused here, where the order of names would decide: the controller settles that
    /// contest (inside a tunnel peer's of the file, it is: `no_tunnel_peer_can_claim_a_file_peers_gateway`).
    #[test]
    fn a_gateway_at_a_local_pods_address_is_refused() {
        let y = GOOD.replace("192.0.2.2", "10.244.3.7");
        assert_eq!(
            errors(&y),
            [r#"peers[0].gateways[0].address: "10.244.3.7" refused: 10.244.3.7 lies in 10.244.0.0/16, this cluster's pods' CIDR, a pod's address, not a node's"#]
        );
        let file = RawConfig::from_yaml(GOOD, "f").unwrap();
        let (a, b) = (peer("c3", "10.246.0.0/16", "10.20.144.170"), peer("c4", "10.247.0.0/16", "10.246.0.9"));
        let published: BTreeMap<String, Vec<RawPeer>> = [("c3".to_string(), vec![a]), ("c4".to_string(), vec![b])].into();
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
    }

    #[test]
    fn the_config_validator_applies_the_reserved_rules() {
        let y = GOOD.replace("10.245.0.0/16", "169.254.169.254/32");
        assert_eq!(
            errors(&y),
            [r#"peers[0].podCIDRs[0]: "169.254.169.254/32" refused: 169.254.169.254/32 overlaps 169.254.0.0/16, link-local, where cloud metadata services answer"#]
        );
        let y = GOOD.replace("interfaces:", "serviceCIDRs: [\"10.245.0.0/16\"]\ninterfaces:");
        assert_eq!(
            errors(&y),
            [r#"peers[0].podCIDRs[0]: "10.245.0.0/16" refused: 10.245.0.0/16 overlaps the local Service CIDR 10.245.0.0/16"#]
        );
        let y = GOOD.replace("interfaces:", "serviceCIDRs: [\"10.96.0.1/12\"]\ninterfaces:");
        assert!(errors(&y)[0].starts_with("serviceCIDRs[0]: \"10.96.0.1/12\" has host bits set"));
        let y = GOOD.replace("192.0.2.2", "127.0.0.1");
        assert!(errors(&y)[0].starts_with("peers[0].gateways[0].address: \"127.0.0.1\" refused:"), "{:?}", errors(&y));
        // The node's own addresses are known to the agent, not to `meshnet check`.
        let raw = RawConfig::from_yaml(GOOD, "x").unwrap();
        let local: BTreeSet<Ipv4Addr> = ["192.0.2.2".parse().unwrap()].into();
        let e = raw.validate_on(&local).unwrap_err();
        assert_eq!(e[0].to_string(), r#"peers[0].gateways[0].address: "192.0.2.2" refused: 192.0.2.2 is an address of this node; the peer's traffic would stay here"#);
        let c = Config::from_yaml(&GOOD.replace("interfaces:", "serviceCIDRs: [\"10.96.0.0/12\"]\ninterfaces:")).unwrap();
        assert_eq!(c.service_cidrs, ["10.96.0.0/12".parse::<Ipv4Net>().unwrap()]);
    }

    #[test]
    fn a_single_peer_is_validated_with_relative_fields() {
        assert!(validate_peer(&peer("c2", "10.245.0.0/16", "10.20.144.165"), &node()).is_ok());
        let mut bad = peer("c3", "fd00::/64", "gw.example.com");
        bad.gateways[0].port = 70000;
        bad.gateways.extend((0..8).map(|i| RawGateway { address: format!("10.20.144.{}", 170 + i), port: 30000, udp_port: None }));
        let e: Vec<String> = validate_peer(&bad, &node()).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(
            e,
            [
                r#"podCIDRs[0]: "fd00::/64" is IPv6, which meshnet does not support yet"#,
                "gateways: 9 gateways; at most 8 per peer",
                r#"gateways[0].address: "gw.example.com" is not a valid IPv4 address"#,
                "gateways[0].port: 70000 is not a valid port (1-65535)",
            ]
        );
    }

    /// Published peers are added one at a time: a bad one falls back to its last good
    /// version or is left out, and the others apply.
    #[test]
    fn published_peers_merge_one_by_one() {
        let file = RawConfig::from_yaml(&GOOD.replace("podCIDRs: [\"10.244.0.0/16\"]", "podCIDRs: [\"10.244.0.0/16\"]\nserviceCIDRs: [\"10.96.0.0/12\"]"), "f").unwrap();
        let good = peer("c3", "10.246.0.0/16", "10.20.144.170");
        let old = peer("c4", "10.247.0.0/16", "10.20.144.171");
        let hijack = peer("c4", "169.254.169.254/32", "10.20.144.171");
        let new_only_bad = peer("c5", "10.96.0.0/24", "10.20.144.172");
        let shadowed = peer("cluster2", "10.248.0.0/16", "10.20.144.173");
        let overlapping = peer("c6", "10.246.1.0/24", "10.20.144.174");
        let published: BTreeMap<String, Vec<RawPeer>> = [
            ("c3".to_string(), vec![good.clone()]),
            ("c4".to_string(), vec![hijack, old.clone()]),
            ("c5".to_string(), vec![new_only_bad]),
            ("c6".to_string(), vec![overlapping]),
            ("cluster2".to_string(), vec![shadowed]),
        ]
        .into();
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        let names: Vec<&str> = m.config.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["cluster2", "c3", "c4"]);
        assert_eq!(m.config.peers[0].pod_cidrs, ["10.245.0.0/16".parse::<Ipv4Net>().unwrap()], "the file's peer wins");
        assert_eq!(m.applied, [("c3".to_string(), good), ("c4".to_string(), old)].into());
        let rejected: Vec<String> =
            m.rejected.iter().map(|(n, e)| format!("{n}: {}", e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))).collect();
        assert_eq!(
            rejected,
            [
                r#"c4: podCIDRs[0]: "169.254.169.254/32" refused: 169.254.169.254/32 overlaps 169.254.0.0/16, link-local, where cloud metadata services answer"#,
                r#"c5: podCIDRs[0]: "10.96.0.0/24" refused: 10.96.0.0/24 overlaps the local Service CIDR 10.96.0.0/12"#,
                r#"c6: podCIDRs[0]: "10.246.1.0/24" overlaps 10.246.0.0/16 of peer "c3""#,
            ]
        );
        // An invalid file is refused whole, whatever was published.
        let broken = RawConfig { interfaces: vec![], ..file };
        assert!(broken.merge_api(&BTreeSet::new(), &published).is_err());
    }

    /// No tunnel peer may claim the address of a gateway (or tunnel node) of a peer of the
    /// config file, nor may any peer put its own inside a tunnel peer's pods of the file:
    /// the tunnel peer could then send packets from that gateway, which `to_pod` takes for
    /// its replies and translates into the flows with it. A gateway peer's CIDR over a node
    /// (pods and nodes in one VPC range, as with AWS's CNI) sends no packet from it: allowed.
    /// Between published peers, who was published first settles it (the controller's rule):
    /// the agent does not refuse them in the order of their names.
    #[test]
    fn no_tunnel_peer_can_claim_a_file_peers_gateway() {
        let file = RawConfig::from_yaml(TUNNEL, "f").unwrap();
        let covers = tunnel_peer("c5", "192.0.2.0/24", &[("10.20.144.170", &["192.0.2.0/25"])]);
        let inside = peer("c6", "10.250.0.0/16", "10.245.7.7");
        let a = peer("c7", "10.251.0.0/16", "10.20.144.180");
        let b = peer("c8", "10.20.144.0/24", "10.20.144.181");
        let vpc = peer("c9", "192.0.2.0/24", "10.20.144.182");
        let published: BTreeMap<String, Vec<RawPeer>> = [
            ("c5".to_string(), vec![covers]),
            ("c6".to_string(), vec![inside]),
            ("c7".to_string(), vec![a.clone()]),
            ("c8".to_string(), vec![b.clone()]),
            ("c9".to_string(), vec![vpc.clone()]),
        ]
        .into();
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        assert_eq!(
            strings(&m.rejected["c5"]),
            [r#"podCIDRs[0]: "192.0.2.0/24" covers 192.0.2.2, a node address of peer "cluster2" of the config file, and a tunnel peer's CIDR may not"#]
        );
        assert_eq!(
            strings(&m.rejected["c6"]),
            [r#"gateways[0].address: "10.245.7.7" refused: 10.245.7.7 lies in 10.245.0.0/16, pods of tunnel peer "cluster2" of the config file"#]
        );
        assert_eq!(m.applied, [("c7".to_string(), a), ("c8".to_string(), b), ("c9".to_string(), vpc)].into());
        // In the file itself, either order is refused; a gateway peer over a node is not.
        let over = "  - name: cluster4\n    mode: tunnel\n    podCIDRs: [\"192.0.2.0/24\"]\n    tunnelPort: 31801\n    nodes: [{address: 10.20.144.190, podCIDRs: [\"192.0.2.0/25\"]}]\n";
        let e = errors(&format!("{TUNNEL}{over}"));
        assert!(e.iter().any(|e| e.contains(r#"podCIDRs[0]: "192.0.2.0/24" covers 192.0.2.2, a node address of peer "cluster2""#)), "{e:?}");
        let e = errors(&TUNNEL.replace("peers:\n", &format!("peers:\n{over}")));
        assert!(e.iter().any(|e| e.contains(r#"address: "192.0.2.2" refused: 192.0.2.2 lies in 192.0.2.0/24, pods of tunnel peer "cluster4""#)), "{e:?}");
        let yaml = format!("{GOOD}  - name: cluster3\n    podCIDRs: [\"192.0.2.0/24\"]\n    gateways: [{{address: 10.20.144.190, port: 30000}}]\n");
        assert!(Config::from_yaml(&yaml).is_ok());
    }

    /// Published peers past what the datapath's maps hold are refused one by one, each with
    /// its reason: no peer can make the whole apply fail at a map write on every node.
    #[test]
    fn published_peers_past_the_maps_limits_are_refused_one_by_one() {
        let file = RawConfig::from_yaml(GOOD, "f").unwrap();
        let limit = limits::MAX_PEERS as usize;
        // The file's cluster2, then 1,024 more: one too many.
        let published: BTreeMap<String, Vec<RawPeer>> = (0..limit)
            .map(|i| {
                let cidr = format!("11.{}.{}.0/24", i / 256, i % 256);
                (format!("p{i:04}"), vec![peer(&format!("p{i:04}"), &cidr, "10.20.144.170")])
            })
            .collect();
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        assert_eq!(m.config.peers.len(), limit);
        assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected.keys().collect::<Vec<_>>());
        let why: Vec<String> = m.rejected["p1023"].iter().map(ToString::to_string).collect();
        assert_eq!(why, ["name: one peer more than the datapath holds (at most 1024)"]);
        // One peer with more CIDRs than the route map holds: refused alone.
        let mut huge = peer("huge", "12.0.0.0/32", "10.20.144.171");
        huge.pod_cidrs = (0..=limits::MAX_ROUTES).map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0c00_0000 + i * 2))).collect();
        let published: BTreeMap<String, Vec<RawPeer>> =
            [("huge".to_string(), vec![huge]), ("small".to_string(), vec![peer("small", "10.246.0.0/16", "10.20.144.172")])].into();
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        assert_eq!(m.config.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["cluster2", "small"]);
        let why: Vec<String> = m.rejected["huge"].iter().map(ToString::to_string).collect();
        assert_eq!(why, [format!("podCIDRs: 131073 CIDRs make 131074 across the peers; at most {}", limits::MAX_ROUTES)]);
    }

    /// The overlap index finds an overlap exactly when a scan of every claimed CIDR does, and
    /// names a CIDR that really overlaps.
    #[test]
    fn cidr_overlaps_match_a_full_scan() {
        let mut rng = 0x2545_f491_u32;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            rng
        };
        let mut set = CidrSet::default();
        let mut all: Vec<Ipv4Net> = Vec::new();
        for _ in 0..3000 {
            let len = u8::try_from(4 + next() % 29).unwrap();
            let cidr = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 ^ (next() & 0x0fff_ffff)), len).unwrap().trunc();
            let scan = all.iter().any(|o| o.contains(&cidr) || cidr.contains(o));
            let found = set.overlap(cidr);
            assert_eq!(found.is_some(), scan, "{cidr}");
            let covered = all.iter().any(|o| o.contains(&cidr));
            assert_eq!(set.covering(cidr).is_some(), covered, "{cidr}");
            assert!(set.covering(cidr).is_none_or(|(o, _)| o.contains(&cidr)), "{cidr}");
            if let Some((other, _)) = found {
                assert!(other.contains(&cidr) || cidr.contains(&other), "{cidr} does not overlap {other}");
            }
            // Keep claims overlapping now and then, as a config's local CIDRs may.
            if !scan || next() % 8 == 0 {
                set.insert(cidr, String::new());
                all.push(cidr);
            }
        }
    }

    /// The tunnel example of the docs: a tunnel peer beside a gateway peer.
    const TUNNEL: &str = r#"
cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["veth*"]
tunnel:
  port: 31800
  interfaces: ["lan0", "eth*"]
  podCIDRs: ["10.244.0.0/24"]
  delivery: redirect
peers:
  - name: cluster2
    mode: tunnel
    podCIDRs: ["10.245.0.0/16"]
    tunnelPort: 31801
    nodes:
      - address: 192.0.2.2
        podCIDRs: ["10.245.0.0/24", "10.245.7.0/24"]
      - address: 192.0.2.4
        podCIDRs: ["10.245.1.0/24"]
  - name: cluster3
    podCIDRs: ["10.246.0.0/16"]
    gateways: [{address: 192.0.2.3, port: 31674}]
"#;

    fn strings(e: &[FieldError]) -> Vec<String> {
        e.iter().map(ToString::to_string).collect()
    }

    fn tunnel_peer(name: &str, cidr: &str, nodes: &[(&str, &[&str])]) -> RawPeer {
        RawPeer {
            name: name.into(),
            mode: PeerMode::Tunnel,
            pod_cidrs: vec![cidr.into()],
            tunnel_port: Some(31800),
            nodes: nodes
                .iter()
                .map(|(a, c)| RawTunnelNode { address: (*a).into(), pod_cidrs: c.iter().map(|c| (*c).to_string()).collect() })
                .collect(),
            ..RawPeer::default()
        }
    }

    /// `n` tunnel nodes 172.16.0.0 + i, each with a /32 of 100.64.0.0/10.
    fn numbered_nodes(n: u32) -> Vec<RawTunnelNode> {
        (0..n)
            .map(|i| RawTunnelNode {
                address: Ipv4Addr::from(0xac10_0000 + i).to_string(),
                pod_cidrs: vec![format!("{}/32", Ipv4Addr::from(0x6440_0000 + i))],
            })
            .collect()
    }

    #[test]
    fn parses_the_documented_tunnel_example() {
        let c = Config::from_yaml(TUNNEL).unwrap();
        let t = c.tunnel.as_ref().unwrap();
        assert_eq!((t.port, t.delivery), (31800, Delivery::Redirect));
        assert_eq!(t.interfaces, ["lan0", "eth*"]);
        assert_eq!(t.pod_cidrs, ["10.244.0.0/24".parse::<Ipv4Net>().unwrap()]);
        let pt = c.peers[0].tunnel.as_ref().unwrap();
        assert!(c.peers[0].gateways.is_empty());
        assert_eq!(pt.port, 31801);
        assert_eq!(pt.nodes[1], TunnelNodeAddr { address: Ipv4Addr::new(192, 0, 2, 4), pod_cidrs: vec!["10.245.1.0/24".parse().unwrap()] });
        assert!(!c.peers[1].is_tunnel());
        assert_eq!(c.peers[1].gateways[0].port, 31674);
        // Defaults: no podCIDRs, and redirect delivery (kube-proxy's INVALID drop would kill
        // what the stack delivers).
        let y = TUNNEL.replace("  podCIDRs: [\"10.244.0.0/24\"]\n  delivery: redirect\n", "");
        let t = Config::from_yaml(&y).unwrap().tunnel.unwrap();
        assert_eq!((t.pod_cidrs.len(), t.delivery), (0, Delivery::Redirect));
        let y = TUNNEL.replace("delivery: redirect", "delivery: stack");
        assert_eq!(Config::from_yaml(&y).unwrap().tunnel.unwrap().delivery, Delivery::Stack);
        let y = TUNNEL.replace("delivery: redirect", "delivery: peer");
        let c = Config::from_yaml(&y).unwrap();
        assert_eq!(c.tunnel.as_ref().unwrap().delivery, Delivery::Peer);
        assert_eq!(c.desired().tun_config.unwrap().flags, TUN_DELIVER_REDIRECT | TUN_DELIVER_PEER);
    }

    /// The tunnel peer fills only the tunnel maps, the gateway peer only the gateway ones.
    #[test]
    fn desired_state_of_mixed_peers() {
        let d = Config::from_yaml(TUNNEL).unwrap().desired();
        let (c2, c3) = (peer_id("cluster2"), peer_id("cluster3"));
        assert_eq!(d.routes, [("10.246.0.0/16".parse().unwrap(), c3)].into());
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), [c3]);
        assert_eq!(d.peer_names, [(c2, "cluster2".to_string()), (c3, "cluster3".to_string())].into());
        assert_eq!(d.tunnel_peers(), [c2].into());
        let node = |o4: u8| TunnelNode {
            addr_be: u32::from_ne_bytes([192, 0, 2, o4]),
            src_be: 0,
            port_be: 31801_u16.to_be(),
            stats_slot: 0,
            peer_id: c2,
            ifindex: 0,
            mtu: 0,
        };
        let want: BTreeMap<Ipv4Net, TunnelNode> = [
            ("10.245.0.0/24".parse().unwrap(), node(2)),
            ("10.245.1.0/24".parse().unwrap(), node(4)),
            ("10.245.7.0/24".parse().unwrap(), node(2)),
        ]
        .into();
        assert_eq!(d.tun_routes, want);
        assert_eq!(d.tun_nodes, [(Ipv4Addr::new(192, 0, 2, 2), c2), (Ipv4Addr::new(192, 0, 2, 4), c2)].into());
        let tc = d.tun_config.unwrap();
        assert_eq!((tc.cluster_id, u16::from_be(tc.port_be), tc.flags, tc.mtu), (peer_id("cluster1"), 31800, TUN_DELIVER_REDIRECT, 0));
        assert_eq!(tc.nets[0], LocalNet { addr_be: u32::from_ne_bytes([10, 244, 0, 0]), mask_be: u32::from_ne_bytes([255, 255, 255, 0]) });
        assert_eq!(tc.nets[1..], [LocalNet::NONE; limits::MAX_NODE_CIDRS - 1]);

        // Without tunnel.podCIDRs the cluster's are delivered to; stack delivery sets no flag.
        let y = TUNNEL.replace("  podCIDRs: [\"10.244.0.0/24\"]\n  delivery: redirect\n", "  delivery: stack\n");
        let tc = Config::from_yaml(&y).unwrap().desired().tun_config.unwrap();
        assert_eq!(tc.flags, 0);
        assert_eq!(tc.nets[0], LocalNet { addr_be: u32::from_ne_bytes([10, 244, 0, 0]), mask_be: u32::from_ne_bytes([255, 255, 0, 0]) });
        assert_eq!(tc.nets[1], LocalNet::NONE);
        // A config without a tunnel section has nothing of the tunnel.
        let d = Config::from_yaml(GOOD).unwrap().desired();
        assert_eq!((d.tun_routes.len(), d.tun_nodes.len(), d.tun_config), (0, 0, None));
    }

    /// The agent takes the Node object's CIDRs as the tunnel's when none are configured.
    #[test]
    fn node_cidrs_fill_an_empty_tunnel_pod_cidrs() {
        let y = TUNNEL.replace("  podCIDRs: [\"10.244.0.0/24\"]\n", "");
        let raw = RawConfig::from_yaml(&y, "x").unwrap();
        let node: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(raw.with_node_cidrs(&[node]).tunnel.unwrap().pod_cidrs, ["10.244.3.0/24"]);
        let raw = RawConfig::from_yaml(TUNNEL, "x").unwrap();
        assert_eq!(raw.with_node_cidrs(&[node]).tunnel.unwrap().pod_cidrs, ["10.244.0.0/24"], "configured ones stay");
    }

    /// Gateway peers, in the file and as the controller publishes them, serialize exactly as
    /// before tunnel mode, and a peer published before it reads as a gateway peer.
    #[test]
    fn gateway_peers_serialize_as_before() {
        let raw = RawConfig::from_yaml(GOOD, "x").unwrap();
        assert_eq!(
            serde_yaml::to_string(&raw).unwrap(),
            "cluster: cluster1\npodCIDRs:\n- 10.244.0.0/16\ninterfaces:\n- cni0\n- cali*\npeers:\n- name: cluster2\n  podCIDRs:\n  \
             - 10.245.0.0/16\n  gateways:\n  - address: 192.0.2.2\n    port: 31674\n    udpPort: 31675\nnat:\n  maxFlows: 65536\n  \
             udpTimeoutSeconds: 120\n  tcpClosedTimeoutSeconds: 10\n  tcpTimeoutSeconds: 86400\n  unansweredTimeoutSeconds: 60\n  gcIntervalSeconds: 5\nhealth:\n  \
             enabled: true\n  intervalSeconds: 2\n  timeoutMilliseconds: 1000\n  failureThreshold: 2\n  riseThreshold: 2\n  downGraceSeconds: 60\n"
        );
        let json = r#"{"name":"cluster2","podCIDRs":["10.245.0.0/16"],"gateways":[{"address":"192.0.2.2","port":31674,"udpPort":31675}]}"#;
        assert_eq!(serde_json::to_string(&raw.peers[0]).unwrap(), json);
        let old: RawPeer = serde_json::from_str(json).unwrap();
        assert_eq!((old.mode, old.tunnel_port, old.nodes.len()), (PeerMode::Gateway, None, 0));
        // Written out explicitly it means the same.
        let explicit: RawPeer = serde_yaml::from_str("name: c2\nmode: gateway\npodCIDRs: [10.245.0.0/16]\ngateways: []\n").unwrap();
        assert_eq!(explicit.mode, PeerMode::Gateway);
        assert_eq!(serde_yaml::to_string(&explicit).unwrap(), "name: c2\npodCIDRs:\n- 10.245.0.0/16\ngateways: []\n");
        // A tunnel peer round-trips.
        let raw = RawConfig::from_yaml(TUNNEL, "x").unwrap();
        let text = serde_yaml::to_string(&raw.peers[0]).unwrap();
        assert!(text.contains("mode: tunnel\n") && text.contains("tunnelPort: 31801\n"), "{text}");
        assert_eq!(serde_yaml::from_str::<RawPeer>(&text).unwrap(), raw.peers[0]);
        assert_eq!(RawConfig::from_yaml(&serde_yaml::to_string(&raw).unwrap(), "x").unwrap(), raw);
    }

    #[test]
    fn unknown_mode_or_delivery_names_field_and_value() {
        for (from, to, field) in
            [("mode: tunnel", "mode: tunel", "peers[0].mode"), ("delivery: redirect", "delivery: xdp", "tunnel.delivery")]
        {
            let e = Config::from_yaml(&TUNNEL.replace(from, to)).unwrap_err().to_string();
            let value = to.split(' ').nth(1).unwrap();
            assert!(e.contains(&format!("{field}: unknown variant `{value}`")), "{e}");
        }
    }

    #[test]
    fn gateway_and_tunnel_fields_stay_apart() {
        let y = format!(
            "{GOOD}    tunnelPort: 31800\n    nodes: [{{address: 192.0.2.9, podCIDRs: [10.245.0.0/24]}}]\n\
             tunnel: {{port: 31800, interfaces: [eth0]}}\n"
        );
        assert_eq!(
            errors(&y),
            [
                "peers[0].tunnelPort: 31800 given, but it is only for mode: tunnel",
                "peers[0].nodes: 1 nodes given, but they are only for mode: tunnel",
            ]
        );
        let y = TUNNEL
            .replace("    tunnelPort: 31801\n", "    gateways: [{address: 192.0.2.3, port: 31674}]\n")
            .replace("    nodes:\n      - address: 192.0.2.2\n        podCIDRs: [\"10.245.0.0/24\", \"10.245.7.0/24\"]\n      - address: 192.0.2.4\n        podCIDRs: [\"10.245.1.0/24\"]\n", "");
        assert_eq!(
            errors(&y),
            [
                "peers[0].gateways: 1 gateways given; a mode: tunnel peer has none (its nodes take the traffic)",
                "peers[0].tunnelPort: required for mode: tunnel (the peer's tunnel NodePort, UDP)",
                "peers[0].nodes: must list at least one node for mode: tunnel",
            ]
        );
        let e = errors(&TUNNEL.replace("tunnelPort: 31801", "tunnelPort: 65536"));
        assert_eq!(e, ["peers[0].tunnelPort: 65536 is not a valid port (1-65535)"]);
    }

    #[test]
    fn tunnel_nodes_are_checked() {
        let y = TUNNEL
            .replace("192.0.2.4", "127.0.0.1")
            .replace("[\"10.245.0.0/24\", \"10.245.7.0/24\"]", "[\"10.245.0.0/24\", \"10.247.0.0/24\", \"10.245.0.128/25\", \"10.245.9.1/24\"]")
            .replace(
                "[\"10.245.1.0/24\"]\n",
                "[\"10.245.1.0/24\"]\n      - address: 192.0.2.2\n        podCIDRs: []\n      - address: node-a\n        podCIDRs: [\"10.245.2.0/24\"]\n",
            );
        assert_eq!(
            errors(&y),
            [
                r#"peers[0].nodes[0].podCIDRs[1]: "10.247.0.0/24" is not inside any of the peer's podCIDRs"#,
                r#"peers[0].nodes[0].podCIDRs[2]: "10.245.0.128/25" overlaps 10.245.0.0/24 of node "192.0.2.2""#,
                r#"peers[0].nodes[0].podCIDRs[3]: "10.245.9.1/24" has host bits set; did you mean "10.245.9.0/24"?"#,
                r#"peers[0].nodes[1].address: "127.0.0.1" refused: 127.0.0.1 is not a unicast address of a remote node (loopback)"#,
                r#"peers[0].nodes[2].address: "192.0.2.2" is listed twice"#,
                "peers[0].nodes[2].podCIDRs: must list at least one CIDR",
                r#"peers[0].nodes[3].address: "node-a" is not a valid IPv4 address"#,
            ]
        );
        // Two nodes of one peer never share pod CIDRs.
        let y = TUNNEL.replace("[\"10.245.1.0/24\"]", "[\"10.245.0.0/23\"]");
        assert_eq!(errors(&y), [r#"peers[0].nodes[1].podCIDRs[0]: "10.245.0.0/23" overlaps 10.245.0.0/24 of node "192.0.2.2""#]);
        // This node's own address is refused as a tunnel node, as it is as a gateway.
        let raw = RawConfig::from_yaml(TUNNEL, "x").unwrap();
        let e = raw.validate_on(&["192.0.2.4".parse().unwrap()].into()).unwrap_err();
        assert_eq!(
            strings(&e),
            [r#"peers[0].nodes[1].address: "192.0.2.4" refused: 192.0.2.4 is an address of this node; the peer's traffic would stay here"#]
        );
    }

    /// A node belongs to one peer, and peers' CIDRs are claimed as gateway peers' are.
    #[test]
    fn tunnel_peers_claim_like_gateway_peers() {
        let y = format!(
            "{TUNNEL}  - name: cluster4\n    mode: tunnel\n    podCIDRs: [\"10.245.128.0/17\", \"10.248.0.0/16\"]\n    tunnelPort: 31800\n    \
             nodes: [{{address: 192.0.2.4, podCIDRs: [\"10.248.0.0/24\"]}}]\n"
        );
        assert_eq!(
            errors(&y),
            [
                r#"peers[2].podCIDRs[0]: "10.245.128.0/17" overlaps 10.245.0.0/16 of peer "cluster2""#,
                r#"peers[2].nodes[0].address: "192.0.2.4" is already a node of peer "cluster2""#,
            ]
        );
        let e = errors(&TUNNEL.replace("10.245.0.0/16", "10.244.128.0/17"));
        assert!(e[0].starts_with(r#"peers[0].podCIDRs[0]: "10.244.128.0/17" overlaps 10.244.0.0/16 of the local podCIDRs"#), "{e:?}");
    }

    #[test]
    fn a_tunnel_peer_needs_the_tunnel_section() {
        let y = TUNNEL.replace(
            "tunnel:\n  port: 31800\n  interfaces: [\"lan0\", \"eth*\"]\n  podCIDRs: [\"10.244.0.0/24\"]\n  delivery: redirect\n",
            "",
        );
        assert_eq!(errors(&y), [r#"peers[0].mode: "tunnel" needs this node's tunnel: section (port, interfaces), which the config lacks"#]);
        // Published, it is the peer's problem only.
        let file = RawConfig::from_yaml(GOOD, "f").unwrap();
        let t = tunnel_peer("c5", "10.247.0.0/16", &[("10.20.144.170", &["10.247.0.0/24"])]);
        let published: BTreeMap<String, Vec<RawPeer>> = [("c5".to_string(), vec![t.clone()])].into();
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        assert_eq!(m.config.peers.len(), 1);
        assert_eq!(
            strings(&m.rejected["c5"]),
            [r#"mode: "tunnel" needs this node's tunnel: section (port, interfaces), which the config lacks"#]
        );
        // With the section it applies, and its nodes count against the file's.
        let file = RawConfig::from_yaml(TUNNEL, "f").unwrap();
        let taken = tunnel_peer("c6", "10.249.0.0/16", &[("192.0.2.2", &["10.249.0.0/24"])]);
        let published: BTreeMap<String, Vec<RawPeer>> = [("c5".to_string(), vec![t.clone()]), ("c6".to_string(), vec![taken])].into();
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        assert_eq!(m.applied, [("c5".to_string(), t)].into());
        assert_eq!(strings(&m.rejected["c6"]), [r#"nodes[0].address: "192.0.2.2" is already a node of peer "cluster2""#]);
        assert_eq!(m.config.desired().tun_nodes[&"10.20.144.170".parse().unwrap()], peer_id("c5"));
    }

    #[test]
    fn the_tunnel_section_is_checked() {
        let y = TUNNEL
            .replace("port: 31800", "port: 0")
            .replace("interfaces: [\"lan0\", \"eth*\"]", "interfaces: [\"a-very-long-interface\", \"eth[\"]")
            .replace("podCIDRs: [\"10.244.0.0/24\"]", "podCIDRs: [\"10.244.0.0/24\", \"10.9.0.0/24\", \"10.244.1.1/24\"]");
        assert_eq!(
            errors(&y),
            [
                "tunnel.port: 0 is not a valid port (1-65535)",
                r#"tunnel.interfaces[0]: "a-very-long-interface" is not a valid interface name"#,
                r#"tunnel.interfaces[1]: "eth[" is not a valid glob"#,
                r#"tunnel.podCIDRs[1]: "10.9.0.0/24" is not inside any of the cluster's podCIDRs"#,
                r#"tunnel.podCIDRs[2]: "10.244.1.1/24" has host bits set; did you mean "10.244.1.0/24"?"#,
            ]
        );
        let y = TUNNEL.replace("interfaces: [\"lan0\", \"eth*\"]", "interfaces: []");
        assert_eq!(errors(&y), ["tunnel.interfaces: must name at least one uplink interface or glob (e.g. eth0, ens*)"]);
        let y = TUNNEL.replace("[\"10.244.0.0/24\"]", "[10.244.0.0/24, 10.244.1.0/24, 10.244.2.0/24, 10.244.3.0/24, 10.244.4.0/24]");
        assert_eq!(errors(&y), ["tunnel.podCIDRs: 5 CIDRs; at most 4 per node"]);
        // Left to default, the cluster's podCIDRs must fit the slots.
        let y = TUNNEL.replace("  podCIDRs: [\"10.244.0.0/24\"]\n", "").replace(
            "podCIDRs: [\"10.244.0.0/16\"]",
            "podCIDRs: [10.240.0.0/16, 10.241.0.0/16, 10.242.0.0/16, 10.243.0.0/16, 10.244.0.0/16]",
        );
        assert_eq!(
            errors(&y),
            ["tunnel.podCIDRs: not given, so the cluster's 5 podCIDRs would be delivered to; at most 4: list this node's own"]
        );
        // Without cluster podCIDRs (the agent adds the Node's), any valid CIDR is taken.
        let y = TUNNEL.replace("podCIDRs: [\"10.244.0.0/16\"]\n", "");
        assert!(Config::from_yaml(&y).is_ok());
    }

    /// The controller's check of one peer applies the tunnel rules, limits included.
    #[test]
    fn a_single_tunnel_peer_is_validated() {
        let ok = tunnel_peer("c2", "10.245.0.0/16", &[("10.20.144.165", &["10.245.0.0/24"])]);
        let p = validate_peer(&ok, &node()).unwrap();
        assert_eq!(p.tunnel.unwrap().nodes[0].pod_cidrs, ["10.245.0.0/24".parse::<Ipv4Net>().unwrap()]);
        let bad = tunnel_peer("c2", "10.245.0.0/16", &[("10.20.144.83", &["10.246.0.0/24"])]);
        assert_eq!(
            strings(&validate_peer(&bad, &node()).unwrap_err()),
            [
                r#"nodes[0].address: "10.20.144.83" refused: 10.20.144.83 is an address of this node; the peer's traffic would stay here"#,
                r#"nodes[0].podCIDRs[0]: "10.246.0.0/24" is not inside any of the peer's podCIDRs"#,
            ]
        );
        // One more node than the map holds.
        let mut many = tunnel_peer("c2", "100.64.0.0/10", &[]);
        many.nodes = numbered_nodes(limits::MAX_TUNNEL_NODES + 1);
        let e = strings(&validate_peer(&many, &node()).unwrap_err());
        assert_eq!(e, ["nodes: 4097 nodes make 4097 across the tunnel peers; at most 4096"]);
        // The limit is across peers: with the file's two nodes, a published peer may add 4094.
        let file = RawConfig::from_yaml(TUNNEL, "f").unwrap();
        let mut fits = tunnel_peer("c4", "100.64.0.0/10", &[]);
        fits.nodes = numbered_nodes(limits::MAX_TUNNEL_NODES - 2);
        let mut over = fits.clone();
        over.nodes = numbered_nodes(limits::MAX_TUNNEL_NODES - 1);
        assert!(file.merge_api(&BTreeSet::new(), &[("c4".to_string(), vec![fits])].into()).unwrap().rejected.is_empty());
        let m = file.merge_api(&BTreeSet::new(), &[("c4".to_string(), vec![over])].into()).unwrap();
        assert_eq!(strings(&m.rejected["c4"]), ["nodes: 4095 nodes make 4097 across the tunnel peers; at most 4096"]);
        // One more pod CIDR than the route map holds, on one node.
        let mut wide = tunnel_peer("c2", "100.64.0.0/10", &[("172.16.0.1", &[])]);
        wide.nodes[0].pod_cidrs = (0..=limits::MAX_TUNNEL_ROUTES).map(|i| format!("{}/32", Ipv4Addr::from(0x6440_0000 + i))).collect();
        let e = strings(&validate_peer(&wide, &node()).unwrap_err());
        assert_eq!(e, ["nodes: 16385 node podCIDRs make 16385 across the tunnel peers; at most 16384"]);
    }

    /// Of two published peers with one id, the one applied before keeps it, though the
    /// newcomer sorts first; with nothing applied, the first by name is taken, as before.
    #[test]
    fn a_newcomer_cannot_take_an_applied_peers_id() {
        let file = RawConfig::from_yaml(GOOD, "f").unwrap();
        let (first, second) = colliding_names();
        let published: BTreeMap<String, Vec<RawPeer>> = [
            (first.clone(), vec![peer(&first, "10.250.0.0/16", "10.20.144.170")]),
            (second.clone(), vec![peer(&second, "10.251.0.0/16", "10.20.144.171")]),
        ]
        .into();
        let m = file.merge_api_keeping(&BTreeSet::new(), &published, &[second.clone()].into()).unwrap();
        assert_eq!(m.applied.keys().collect::<Vec<_>>(), [&second]);
        let why = format!("name: {first:?} hashes to the same id as {second:?}; rename one");
        assert_eq!(strings(&m.rejected[&first]), [why]);
        let m = file.merge_api(&BTreeSet::new(), &published).unwrap();
        assert_eq!(m.applied.keys().collect::<Vec<_>>(), [&first]);
    }

    /// A remote's tunnel peer at the datapath's limits, 4,096 nodes with four CIDRs each, all
    /// apart (16,384 peer CIDRs), costs a lookup per node address and CIDR, not a scan of
    /// the others: every agent validates it on each apply, and the controller before it
    /// publishes. In a debug build here the scans took 20 s, the lookups 0.4 s (the rest of
    /// the checks); tests assert no timings, `cargo test` shows a regression as a slow test.
    #[test]
    fn a_tunnel_peer_at_the_limits_is_validated_without_a_scan_per_node() {
        let mut p = tunnel_peer("c2", "100.64.0.0/10", &[]);
        p.nodes = (0..limits::MAX_TUNNEL_NODES)
            .map(|i| RawTunnelNode {
                address: Ipv4Addr::from(0xac10_0000 + i).to_string(),
                pod_cidrs: (0..4).map(|k| format!("{}/32", Ipv4Addr::from(0x6440_0000 + (i * 4 + k) * 2))).collect(),
            })
            .collect();
        p.pod_cidrs = p.nodes.iter().flat_map(|n| n.pod_cidrs.clone()).collect();
        let v = validate_peer(&p, &node()).unwrap();
        assert_eq!(v.tunnel.unwrap().nodes.len(), 4096);
        // The lookups refuse what the scans did, in the same words.
        p.nodes[1].address = p.nodes[0].address.clone();
        p.nodes[2].pod_cidrs[3] = "100.65.0.1/32".into();
        assert_eq!(
            strings(&validate_peer(&p, &node()).unwrap_err()),
            [
                r#"nodes[1].address: "172.16.0.0" is listed twice"#,
                r#"nodes[2].podCIDRs[3]: "100.65.0.1/32" is not inside any of the peer's podCIDRs"#,
            ]
        );
    }

    /// deploy/config.example.yaml is valid as shipped, and with its tunnel part uncommented
    /// (the lines whose comment is YAML: `tunnel:`, a list item or an indented line).
    #[test]
    fn the_example_config_is_valid_with_its_tunnel_part() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config.example.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let plain = Config::from_yaml(&text).unwrap();
        assert!(plain.tunnel.is_none() && plain.peers.iter().all(|p| !p.is_tunnel()));
        let uncommented: String = text
            .lines()
            .map(|l| {
                let indent = &l[..l.len() - l.trim_start().len()];
                match l.trim_start().strip_prefix("# ") {
                    Some(rest) if rest.starts_with("tunnel:") || rest.starts_with("- ") || rest.starts_with(' ') => {
                        format!("{indent}{rest}\n")
                    }
                    _ => format!("{l}\n"),
                }
            })
            .collect();
        let c = Config::from_yaml(&uncommented).unwrap();
        assert_eq!(c.tunnel.unwrap().port, 31800);
        assert_eq!(c.peers.iter().filter(|p| p.is_tunnel()).count(), 1);
    }

    fn locals(addresses: &[&str]) -> BTreeSet<Ipv4Addr> {
        addresses.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn held(name: &str, cidrs: &[&str]) -> BTreeMap<String, Held> {
        [(name.to_string(), Held { cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect() })].into()
    }

    /// A local address (a Service's externalIP that kube-proxy binds on every node, say) in
    /// what the maps already route to a published peer leaves the peer as it is: were it
    /// refused, every node would withdraw it. What the peer does not hold yet is refused.
    #[test]
    fn a_published_peer_keeps_what_the_maps_hold_over_a_local_address() {
        let mut file = RawConfig::from_yaml(GOOD, "f").unwrap();
        file.peers.clear();
        let local = locals(&["10.245.0.20", "10.20.144.83", "10.250.0.5"]);
        let c2 = peer("c2", "10.245.0.0/16", "10.20.144.165");
        let one = |p: &RawPeer| -> BTreeMap<String, Vec<RawPeer>> { [("c2".to_string(), vec![p.clone()])].into() };
        let held_c2 = held("c2", &["10.245.0.0/16"]);
        let m = file.merge_api_held(&local, &held_c2, &one(&c2)).unwrap();
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        assert_eq!(m.config.peers[0].pod_cidrs, ["10.245.0.0/16".parse::<Ipv4Net>().unwrap()]);
        let kept = KeptLocal { peer: "c2".into(), claim: "10.245.0.0/16".into(), address: "10.245.0.20".parse().unwrap() };
        assert_eq!(m.kept, std::slice::from_ref(&kept));
        assert_eq!(kept.to_string(), r#"10.245.0.0/16 of published peer "c2" covers 10.245.0.20, an address of this node"#);
        // Not held (nothing, or only for another peer): refused as before.
        let refused = [r#"podCIDRs[0]: "10.245.0.0/16" refused: 10.245.0.0/16 covers 10.245.0.20, an address of this node"#];
        for h in [BTreeMap::new(), held("c3", &["10.245.0.0/16"])] {
            let m = file.merge_api_held(&local, &h, &one(&c2)).unwrap();
            assert_eq!(strings(&m.rejected["c2"]), refused);
            assert!(m.config.peers.is_empty() && m.applied.is_empty() && m.kept.is_empty());
        }
        assert_eq!(strings(&file.merge_api(&local, &one(&c2)).unwrap().rejected["c2"]), refused);
        // A narrower route inside what is held claims nothing new.
        let narrower = peer("c2", "10.245.0.0/24", "10.20.144.165");
        assert!(file.merge_api_held(&local, &held_c2, &one(&narrower)).unwrap().rejected.is_empty());
        // A wider CIDR, or another one, over a local address is a new claim: refused, and the
        // last good version (held) stays.
        let held_narrow = held("c2", &["10.245.0.0/24"]);
        let m = file.merge_api_held(&local, &held_narrow, &[("c2".to_string(), vec![c2.clone(), narrower.clone()])].into()).unwrap();
        assert_eq!(strings(&m.rejected["c2"]), refused);
        assert_eq!(m.applied["c2"], narrower);
        let mut other = c2.clone();
        other.pod_cidrs.push("10.250.0.0/16".into());
        let m = file.merge_api_held(&local, &held_c2, &[("c2".to_string(), vec![other, c2.clone()])].into()).unwrap();
        assert_eq!(
            strings(&m.rejected["c2"]),
            [r#"podCIDRs[1]: "10.250.0.0/16" refused: 10.250.0.0/16 covers 10.250.0.5, an address of this node"#]
        );
        assert_eq!(m.applied["c2"], c2);
        // A gateway at a local address is refused, held or not: the peer's packets would go to
        // whatever listens there (a Service's externalIP at the remote gateway's address).
        let mut at_local = c2.clone();
        at_local.gateways.push(RawGateway { address: "10.20.144.83".into(), port: 31674, udp_port: None });
        let m = file.merge_api_held(&local, &held_c2, &one(&at_local)).unwrap();
        assert_eq!(
            strings(&m.rejected["c2"]),
            [r#"gateways[1].address: "10.20.144.83" refused: 10.20.144.83 is an address of this node; the peer's traffic would stay here"#]
        );
        // The file's own peers are the operator's: held or not, their errors are reported.
        let file = RawConfig::from_yaml(GOOD, "f").unwrap();
        let e = file.merge_api_held(&local, &held("cluster2", &["10.245.0.0/16"]), &BTreeMap::new()).unwrap_err();
        assert_eq!(strings(&e), [r#"peers[0].podCIDRs[0]: "10.245.0.0/16" refused: 10.245.0.0/16 covers 10.245.0.20, an address of this node"#]);
    }

    /// A tunnel peer routes by its nodes' CIDRs: a local address in its pod CIDR is kept where
    /// the maps route it to the peer, and this version's node CIDRs over it are held too.
    #[test]
    fn a_published_tunnel_peer_keeps_what_the_maps_route_to_it() {
        let mut file = RawConfig::from_yaml(TUNNEL, "f").unwrap();
        file.peers.clear();
        let local = locals(&["10.245.0.20", "10.245.9.9", "192.0.2.9"]);
        let c2 = tunnel_peer("c2", "10.245.0.0/16", &[("192.0.2.2", &["10.245.0.0/24"]), ("192.0.2.4", &["10.245.1.0/24"])]);
        let one = |p: &RawPeer| -> BTreeMap<String, Vec<RawPeer>> { [("c2".to_string(), vec![p.clone()])].into() };
        // As the maps hold it: its nodes' routes, not its pod CIDR.
        let held_c2 = held("c2", &["10.245.0.0/24", "10.245.1.0/24"]);
        let refused = |a: &str| format!(r#"podCIDRs[0]: "10.245.0.0/16" refused: 10.245.0.0/16 covers {a}, an address of this node"#);
        // 10.245.9.9 is in the pod CIDR but in no node's CIDR: nothing routes it to the peer,
        // which keeps it, as it keeps 10.245.0.20, which the maps route to it.
        let m = file.merge_api_held(&local, &held_c2, &one(&c2)).unwrap();
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        assert_eq!(m.kept.iter().map(ToString::to_string).collect::<Vec<_>>(), [
            r#"10.245.0.0/16 of published peer "c2" covers 10.245.0.20, an address of this node"#,
            r#"10.245.0.0/16 of published peer "c2" covers 10.245.9.9, an address of this node"#,
        ]);
        // Not held: refused at the first address.
        assert_eq!(strings(&file.merge_api(&local, &one(&c2)).unwrap().rejected["c2"]), [refused("10.245.0.20")]);
        // A node CIDR over an address, wider than the route held, is a new route: refused.
        let wider = tunnel_peer("c2", "10.245.0.0/16", &[("192.0.2.2", &["10.245.0.0/23"])]);
        assert_eq!(strings(&file.merge_api_held(&local, &held_c2, &one(&wider)).unwrap().rejected["c2"]), [refused("10.245.0.20")]);
        let mut routed = c2.clone();
        routed.nodes[1].pod_cidrs.push("10.245.9.0/24".into());
        assert_eq!(strings(&file.merge_api_held(&local, &held_c2, &one(&routed)).unwrap().rejected["c2"]), [refused("10.245.9.9")]);
        // A node at a local address is refused, held or not: the peer's tunnel packets would go
        // to whatever listens there.
        let mut at_local = c2.clone();
        at_local.nodes.push(RawTunnelNode { address: "192.0.2.9".into(), pod_cidrs: vec!["10.245.2.0/24".into()] });
        let held_node = held("c2", &["10.245.0.0/24", "10.245.1.0/24", "10.245.2.0/24"]);
        for h in [&held_c2, &held_node] {
            let m = file.merge_api_held(&local, h, &one(&at_local)).unwrap();
            assert_eq!(
                strings(&m.rejected["c2"]),
                [r#"nodes[2].address: "192.0.2.9" refused: 192.0.2.9 is an address of this node; the peer's traffic would stay here"#]
            );
        }
    }

    /// What a peer holds, read back from a peer as the maps serve it.
    #[test]
    fn held_claims_are_read_from_a_pinned_peer() {
        let t = tunnel_peer("c2", "10.245.0.0/23", &[("192.0.2.2", &["10.245.0.0/24"]), ("192.0.2.4", &["10.245.1.0/24"])]);
        let h = Held::of(&t);
        assert!(h.routes("10.245.1.0/24".parse().unwrap()) && h.routes("10.245.0.20/32".parse().unwrap()));
        assert!(!h.routes("10.245.0.0/22".parse().unwrap()));
        assert_eq!(Held::of(&peer("c3", "10.246.0.0/16", "192.0.2.3")), held("c3", &["10.246.0.0/16"])["c3"]);
    }
}
