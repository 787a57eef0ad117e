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
use meshnet_common::{limits, Gateway, PeerGateways, GW_UP};
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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPeer {
    pub name: String,
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<RawGateway>,
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
    pub peers: Vec<Peer>,
    pub max_flows: u32,
    pub gc: GcConfig,
    pub health: HealthConfig,
    /// Whether the datapath's logging build is asked for (`datapathLog`).
    pub datapath_log: bool,
    pub tunnel: Option<TunnelSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSettings {
    pub port: u16,
    pub interfaces: Vec<String>,
    pub pod_cidrs: Vec<Ipv4Net>,
    pub delivery: Delivery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Stack,
    Redirect,
}

/// Flow-state expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcConfig {
    pub udp_timeout: Duration,
    pub tcp_closed_timeout: Duration,
    pub tcp_timeout: Duration,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// The id that keys this peer in the datapath: a hash of the name, so that it is the
    /// same across reloads and restarts without any state of its own.
    pub id: u32,
    pub pod_cidrs: Vec<Ipv4Net>,
    pub gateways: Vec<GatewayAddr>,
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

    /// This config with this node's pod CIDRs from its Node object added to the local ones.
    #[must_use]
    pub fn with_node_cidrs(&self, node_cidrs: &[Ipv4Net]) -> RawConfig {
        let mut out = self.clone();
        for c in node_cidrs {
            let covered = out.pod_cidrs.iter().filter_map(|x| x.parse::<Ipv4Net>().ok()).any(|x| x.contains(c));
            if !covered {
                out.pod_cidrs.push(c.to_string());
            }
        }
        out
    }
}

/// A stable 32-bit id for a peer name (FNV-1a).
#[must_use]
pub fn peer_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
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
        if let Some(a) = self.local_addresses.iter().find(|a| cidr.contains(*a)) {
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

struct Checker {
    errors: Vec<FieldError>,
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

/// CIDRs with their owners, for overlap checks in O(log n) each: two CIDRs overlap only if
/// one contains the other, so a CIDR overlaps the set if one of its at most 33 supernets is
/// in it, or if some CIDR in it starts within its range.
#[derive(Default)]
struct CidrSet {
    by_start: BTreeMap<(u32, u8), String>,
}

impl CidrSet {
    fn insert(&mut self, net: Ipv4Net, owner: String) {
        self.by_start.entry((u32::from(net.network()), net.prefix_len())).or_insert(owner);
    }

    /// A CIDR of the set that overlaps `net`, and its owner.
    fn overlap(&self, net: Ipv4Net) -> Option<(Ipv4Net, &str)> {
        for len in 0..=net.prefix_len() {
            let sup = Ipv4Net::new(net.network(), len).ok()?.trunc();
            if let Some(owner) = self.by_start.get(&(u32::from(sup.network()), len)) {
                return Some((sup, owner.as_str()));
            }
        }
        let (start, end) = (u32::from(net.network()), u32::from(net.broadcast()));
        let ((first, len), owner) = self.by_start.range((start, 0)..=(end, 32)).next()?;
        Some((Ipv4Net::new(Ipv4Addr::from(*first), *len).ok()?, owner.as_str()))
    }
}

/// What the peers validated so far hold: names, ids and CIDRs, for uniqueness and overlaps.
struct Claims<'a> {
    cluster: &'a str,
    reserved: &'a Reserved,
    names: BTreeSet<String>,
    ids: BTreeMap<u32, String>,
    /// Every CIDR seen so far with its owner.
    cidrs: CidrSet,
}

impl<'a> Claims<'a> {
    fn new(cluster: &'a str, reserved: &'a Reserved, local: &[Ipv4Net]) -> Self {
        Self {
            cluster,
            reserved,
            names: BTreeSet::new(),
            ids: BTreeMap::new(),
            cidrs: {
                let mut set = CidrSet::default();
                for n in local {
                    set.insert(*n, "the local podCIDRs".to_string());
                }
                set
            },
        }
    }

    /// Checks one peer against the rules and what is claimed; errors go to `c`, with field
    /// paths under `at`. Claims nothing: `commit` does, once the caller accepts the peer.
    fn check(&self, c: &mut Checker, at: &str, raw: &RawPeer) -> Peer {
        let field = |f: &str| if at.is_empty() { f.to_string() } else { format!("{at}.{f}") };
        if raw.name.trim().is_empty() {
            c.err(field("name"), "must not be empty");
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
        let mut cidrs: Vec<Ipv4Net> = Vec::new();
        let mut mine = CidrSet::default();
        let me = format!("peer {:?}", raw.name);
        for (ci, s) in raw.pod_cidrs.iter().enumerate() {
            let f = field(&format!("podCIDRs[{ci}]"));
            let Some(net) = c.cidr(f.clone(), s) else { continue };
            if let Some(why) = self.reserved.refuse_cidr(net) {
                c.err(f, format!("{s:?} refused: {why}"));
                continue;
            }
            if let Some((other, owner)) = self.cidrs.overlap(net).or_else(|| mine.overlap(net)) {
                c.err(f, format!("{s:?} overlaps {other} of {owner}"));
                continue;
            }
            mine.insert(net, me.clone());
            cidrs.push(net);
        }
        if raw.gateways.is_empty() {
            c.err(field("gateways"), "must list at least one gateway");
        }
        if raw.gateways.len() > limits::MAX_GATEWAYS {
            c.err(field("gateways"), format!("{} gateways; at most {} per peer", raw.gateways.len(), limits::MAX_GATEWAYS));
        }
        let mut gateways = Vec::new();
        for (gi, g) in raw.gateways.iter().enumerate() {
            let gat = field(&format!("gateways[{gi}]"));
            let address = if let Ok(a) = g.address.parse::<Ipv4Addr>() {
                if let Some(why) = self.reserved.refuse_gateway(a) {
                    c.err(format!("{gat}.address"), format!("{:?} refused: {why}", g.address));
                    None
                } else {
                    Some(a)
                }
            } else {
                c.err(format!("{gat}.address"), format!("{:?} is not a valid IPv4 address", g.address));
                None
            };
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
        Peer { name: raw.name.clone(), id, pod_cidrs: cidrs, gateways }
    }

    fn commit(&mut self, p: &Peer) {
        self.names.insert(p.name.clone());
        self.ids.insert(p.id, p.name.clone());
        let owner = format!("peer {:?}", p.name);
        for n in &p.pod_cidrs {
            self.cidrs.insert(*n, owner.clone());
        }
    }
}

/// Validates one peer on its own, with the agent's rules: what the controller checks before
/// it publishes a peer. Field paths are relative to the peer (`podCIDRs[0]`). Overlaps with
/// other peers are not checked here.
pub fn validate_peer(raw: &RawPeer, reserved: &Reserved) -> Result<Peer, Vec<FieldError>> {
    let claims = Claims::new("", reserved, &[]);
    let mut c = Checker { errors: Vec::new() };
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
}

impl RawConfig {
    /// Validates everything and returns every problem at once.
    pub fn validate(&self) -> Result<Config, Vec<FieldError>> {
        self.validate_on(&BTreeSet::new())
    }

    /// Validates, also refusing peers that claim one of `local_addresses` (this node's).
    pub fn validate_on(&self, local_addresses: &BTreeSet<Ipv4Addr>) -> Result<Config, Vec<FieldError>> {
        let mut c = Checker { errors: Vec::new() };
        let (mut config, reserved) = self.validate_local(&mut c, local_addresses);
        let mut claims = Claims::new(&self.cluster, &reserved, &config.pod_cidrs);
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
        let mut config = self.validate_on(local_addresses)?;
        let mut c = Checker { errors: Vec::new() };
        let (_, reserved) = self.validate_local(&mut c, local_addresses);
        let mut claims = Claims::new(&self.cluster, &reserved, &config.pod_cidrs);
        for p in &config.peers {
            claims.commit(p);
        }
        let mut merged = Merged { config: config.clone(), applied: BTreeMap::new(), rejected: BTreeMap::new() };
        for (name, versions) in published {
            if self.peers.iter().any(|p| &p.name == name) {
                continue;
            }
            for (i, raw) in versions.iter().enumerate() {
                let mut c = Checker { errors: Vec::new() };
                let p = claims.check(&mut c, "", raw);
                if c.errors.is_empty() {
                    claims.commit(&p);
                    config.peers.push(p);
                    merged.applied.insert(name.clone(), raw.clone());
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
            if pattern.is_empty() || pattern.len() > 15 && !pattern.contains(['*', '?', '[']) {
                c.err(format!("interfaces[{i}]"), format!("{pattern:?} is not a valid interface name"));
            } else if glob::Pattern::new(pattern).is_err() {
                c.err(format!("interfaces[{i}]"), format!("{pattern:?} is not a valid glob"));
            }
        }
        if self.nat.max_flows < 1024 {
            c.err("nat.maxFlows", format!("{} is too small (at least 1024)", self.nat.max_flows));
        }
        for (field, v) in [
            ("nat.udpTimeoutSeconds", self.nat.udp_timeout_seconds),
            ("nat.tcpClosedTimeoutSeconds", self.nat.tcp_closed_timeout_seconds),
            ("nat.tcpTimeoutSeconds", self.nat.tcp_timeout_seconds),
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
            peers: Vec::new(),
            max_flows: self.nat.max_flows,
            gc: GcConfig {
                udp_timeout: Duration::from_secs(self.nat.udp_timeout_seconds),
                tcp_closed_timeout: Duration::from_secs(self.nat.tcp_closed_timeout_seconds),
                tcp_timeout: Duration::from_secs(self.nat.tcp_timeout_seconds),
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
            tunnel: None,
        };
        (config, reserved)
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
    pub tun_routes: BTreeMap<Ipv4Net, meshnet_common::TunnelNode>,
    pub tun_nodes: BTreeMap<Ipv4Addr, u32>,
    pub tun_config: Option<meshnet_common::TunnelConfig>,
}

impl Config {
    #[must_use]
    pub fn desired(&self) -> Desired {
        let mut d = Desired { local: self.pod_cidrs.clone(), ..Desired::default() };
        for p in &self.peers {
            d.peer_names.insert(p.id, p.name.clone());
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
        d
    }
}

impl Desired {
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
}
