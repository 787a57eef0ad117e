//! From Kubernetes objects to meshnet peers and Istio `meshNetworks`: the pure part of
//! discovery, tested without an API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use meshnet_common::limits;
use serde::{Deserialize, Serialize};

use crate::config::{CidrSet, PeerMode, RawGateway, RawPeer, RawTunnelNode, Reserved};

/// Node annotation that overrides the address a gateway on that node is reached at.
pub const ADDRESS_ANNOTATION: &str = "meshnet.io/gateway-address";
/// Remote-secret annotation that overrides a remote cluster's pod CIDRs (comma-separated), for
/// CNIs that do not use node podCIDRs.
pub const POD_CIDRS_ANNOTATION: &str = "meshnet.io/pod-cidrs";
/// Remote-secret annotation that limits the pod CIDRs a remote cluster may claim
/// (comma-separated); a claim outside it refuses the peer.
pub const ALLOWED_CIDRS_ANNOTATION: &str = "meshnet.io/allowed-cidrs";
/// Remote-secret annotation that says how a remote cluster's pods are reached: `gateway`
/// (through its east-west gateway) or `tunnel` (encapsulated to the node that hosts the pod).
pub const MODE_ANNOTATION: &str = "meshnet.io/mode";
/// The Service that reserves a cluster's tunnel NodePort (UDP), in meshnet's namespace.
pub const TUNNEL_SERVICE: &str = "meshnet-tunnel";
/// Namespace label Istio reads a cluster's network name from.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Label selector of Istio's remote secrets, the default source of remote credentials.
pub const REMOTE_SECRET_SELECTOR: &str = "istio/multiCluster=true";

/// Where remote-cluster credentials are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSource {
    pub namespace: String,
    /// A label selector, e.g. `istio/multiCluster=true`.
    pub selector: String,
}

/// Which node address a gateway is reached at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum AddressType {
    #[default]
    #[value(name = "InternalIP")]
    InternalIp,
    #[value(name = "ExternalIP")]
    ExternalIp,
}

impl AddressType {
    fn kube_name(self) -> &'static str {
        match self {
            AddressType::InternalIp => "InternalIP",
            AddressType::ExternalIp => "ExternalIP",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOptions {
    /// The east-west gateway Service, in the Istio namespace.
    pub gateway_service: String,
    /// The Service port whose nodePort carries the mesh traffic (Istio's `tls`, 15443).
    pub gateway_port_name: String,
    pub address_type: AddressType,
    /// The Service whose UDP nodePort is a cluster's tunnel port, in meshnet's namespace.
    pub tunnel_service: String,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            gateway_service: "istio-eastwestgateway".into(),
            gateway_port_name: "tls".into(),
            address_type: AddressType::InternalIp,
            tunnel_service: TUNNEL_SERVICE.into(),
        }
    }
}

/// What discovery reads of a Node, and nothing else. Every node of every remote cluster is
/// held for as long as the controller runs, so this is kept small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its IPv4 pod CIDRs (`podCIDRs`, and `podCIDR` of clusters that set only that).
    pub pod_cidrs: Box<[Ipv4Net]>,
    /// Its IPv4 addresses in the order its status lists them, and of which type each is.
    pub addresses: Box<[(NodeAddressType, Ipv4Addr)]>,
    /// Its [`ADDRESS_ANNOTATION`], as written.
    pub gateway_address: Option<Box<str>>,
}

/// A node address's `type`, of the ones discovery tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAddressType {
    Internal,
    External,
    Other,
}

/// A node's pod CIDRs and addresses kept, each: a real node has one or two of the first and a
/// few of the others, and a remote's node must not cost the controller what it likes.
const MAX_PER_NODE: usize = 16;
/// The longest address annotation kept as written; a longer one (never an address) is kept
/// cut, with a mark that no address parse accepts.
const MAX_ANNOTATION: usize = 64;

impl From<Node> for NodeInfo {
    fn from(node: Node) -> Self {
        let spec = node.spec.unwrap_or_default();
        let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
        let annotation = node.metadata.annotations.and_then(|mut a| a.remove(ADDRESS_ANNOTATION));
        Self::from_parts(spec.pod_cidrs.into_iter().flatten().chain(spec.pod_cidr), addresses, annotation)
    }
}

impl NodeInfo {
    fn from_parts(cidrs: impl IntoIterator<Item = String>, addresses: Vec<k8s_openapi::api::core::v1::NodeAddress>, annotation: Option<String>) -> Self {
        let mut pod_cidrs: Vec<Ipv4Net> = cidrs
            .into_iter()
            .take(MAX_PER_NODE)
            .filter_map(|c| c.parse::<Ipv4Net>().ok())
            .map(|n| n.trunc())
            .collect();
        pod_cidrs.sort_unstable();
        pod_cidrs.dedup();
        let addresses = addresses
            .into_iter()
            .filter_map(|a| {
                let ty = match a.type_.as_str() {
                    "InternalIP" => NodeAddressType::Internal,
                    "ExternalIP" => NodeAddressType::External,
                    _ => NodeAddressType::Other,
                };
                Some((ty, a.address.parse().ok()?))
            })
            .take(MAX_PER_NODE)
            .collect();
        let gateway_address = annotation.map(|mut v| {
            if v.len() > MAX_ANNOTATION {
                let cut = (0..=MAX_ANNOTATION).rev().find(|&i| v.is_char_boundary(i)).unwrap_or(0);
                v.truncate(cut);
                v.push('…');
            }
            v.into_boxed_str()
        });
        NodeInfo { pod_cidrs: pod_cidrs.into(), addresses, gateway_address }
    }
}

/// A remote's Node as it comes off the wire, with only what discovery reads parsed: the
/// name, resource version and address annotation, the first pod CIDRs and addresses. The
/// rest (images, conditions, managed fields, the other annotations) is skipped without being
/// stored, so that what a remote sends costs no more memory than its own length, where a
/// whole `Node` could cost ten times its JSON (`"images":[{},{},...]`).
/// Each is kept as its metadata (name and resource version, which the watcher reads) and its
/// [`NodeInfo`], some 400 bytes, and a node without a name is no node: the list fails.
#[derive(Debug, Clone)]
pub struct RemoteNode {
    meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub info: NodeInfo,
}

impl<'de> Deserialize<'de> for RemoteNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use k8s_openapi::{api::core::v1::NodeAddress, apimachinery::pkg::apis::meta::v1::ObjectMeta};
        #[derive(Deserialize, Default)]
        #[serde(default, rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            resource_version: Option<String>,
            #[serde(deserialize_with = "only_address_annotation")]
            annotations: Option<BTreeMap<String, String>>,
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Spec {
            #[serde(rename = "podCIDR")]
            pod_cidr: Option<String>,
            #[serde(rename = "podCIDRs", deserialize_with = "first_few::<_, _, MAX_PER_NODE>")]
            pod_cidrs: Vec<String>,
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Status {
            // More read than kept: IPv6 and host names come first on some nodes.
            #[serde(deserialize_with = "first_few::<_, _, { 4 * MAX_PER_NODE }>")]
            addresses: Vec<NodeAddress>,
        }
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            metadata: Option<Meta>,
            #[serde(default)]
            spec: Option<Spec>,
            #[serde(default)]
            status: Option<Status>,
        }
        let w = Wire::deserialize(d)?;
        let (m, spec, status) = (w.metadata.unwrap_or_default(), w.spec.unwrap_or_default(), w.status.unwrap_or_default());
        if m.name.as_deref().is_none_or(str::is_empty) {
            return Err(serde::de::Error::custom("a node without a name"));
        }
        let annotation = m.annotations.and_then(|mut a| a.remove(ADDRESS_ANNOTATION));
        Ok(Self {
            meta: ObjectMeta { name: m.name, resource_version: m.resource_version, ..ObjectMeta::default() },
            info: NodeInfo::from_parts(spec.pod_cidrs.into_iter().chain(spec.pod_cidr), status.addresses, annotation),
        })
    }
}

/// The first `N` items of a list (or none for `null`); the rest are skipped.
fn first_few<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>, const N: usize>(d: D) -> Result<Vec<T>, D::Error> {
    struct FirstFew<T, const N: usize>(Vec<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for FirstFew<T, N> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T, const N: usize>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for V<T, N> {
                type Value = FirstFew<T, N>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a list")
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::new();
                    while out.len() < N {
                        match seq.next_element()? {
                            Some(x) => out.push(x),
                            None => return Ok(FirstFew(out)),
                        }
                    }
                    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                    Ok(FirstFew(out))
                }
            }
            d.deserialize_seq(V(std::marker::PhantomData))
        }
    }
    Ok(Option::<FirstFew<T, N>>::deserialize(d)?.map(|f| f.0).unwrap_or_default())
}

/// Of a node's annotations, the [`ADDRESS_ANNOTATION`] alone; the others are skipped.
fn only_address_annotation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Only(BTreeMap<String, String>);
    impl<'de> Deserialize<'de> for Only {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Only;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a map of strings")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut out = BTreeMap::new();
                    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        if key == ADDRESS_ANNOTATION {
                            out.insert(key.into_owned(), map.next_value::<String>()?);
                        } else {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    Ok(Only(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    Ok(Option::<Only>::deserialize(d)?.map(|o| o.0))
}

impl kube::Resource for RemoteNode {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;
    fn kind((): &()) -> std::borrow::Cow<'_, str> {
        "Node".into()
    }
    fn group((): &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version((): &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural((): &()) -> std::borrow::Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.meta
    }
}

impl From<RemoteNode> for NodeInfo {
    fn from(node: RemoteNode) -> Self {
        node.info
    }
}

/// What discovery read from one cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Shared with the watch that keeps it (see watch.rs).
    pub nodes: std::sync::Arc<BTreeMap<String, NodeInfo>>,
    pub service: Option<Service>,
    pub endpoints: Option<Endpoints>,
    /// The [`TUNNEL_SERVICE`]; watched only for a remote in tunnel mode.
    pub tunnel_service: Option<Service>,
}

/// A cluster's pod CIDRs, gateway NodePort and gateway addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub pod_cidrs: Vec<Ipv4Net>,
    pub port: Option<u16>,
    pub addresses: Vec<Ipv4Addr>,
    /// Why something could not be resolved.
    pub problems: Vec<String>,
    /// Gateway nodes left out, and why (the first [`MAX_REASONS`]): one node's annotation
    /// costs that gateway alone.
    pub skipped: Vec<String>,
}

/// The IPv4 pod CIDRs of all nodes, aggregated.
#[must_use]
pub fn node_pod_cidrs<'a>(nodes: impl IntoIterator<Item = &'a NodeInfo>) -> Vec<Ipv4Net> {
    let nets: Vec<Ipv4Net> = nodes.into_iter().flat_map(|n| n.pod_cidrs.iter().copied()).collect();
    Ipv4Net::aggregate(&nets)
}

/// Every IPv4 address a node's status lists.
#[must_use]
pub fn node_addresses(node: &NodeInfo) -> BTreeSet<Ipv4Addr> {
    node.addresses.iter().map(|(_, a)| *a).collect()
}

/// The address a gateway on a node is reached at, or why the node's annotation is refused:
/// whoever can annotate a remote Node must not be able to point traffic anywhere, so the
/// annotation may only pick one of the node's own addresses. A refused annotation costs
/// that node alone (left out, with the reason): anyone who can patch one Node (its own
/// kubelet can) must not withdraw the whole peer from every node.
fn node_address(node: &NodeInfo, ty: AddressType) -> Result<Option<Ipv4Addr>, String> {
    if let Some(a) = &node.gateway_address {
        let own = node_addresses(node);
        let listed = own.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let a = Quoted(a);
        return match a.0.trim().parse::<Ipv4Addr>() {
            Ok(addr) if own.contains(&addr) => Ok(Some(addr)),
            Ok(_) => Err(format!("{ADDRESS_ANNOTATION} {a} is not one of its addresses ({listed})")),
            Err(_) => Err(format!("{ADDRESS_ANNOTATION} {a} is not an IPv4 address")),
        };
    }
    let want = match ty {
        AddressType::InternalIp => NodeAddressType::Internal,
        AddressType::ExternalIp => NodeAddressType::External,
    };
    Ok(node.addresses.iter().find(|(t, _)| *t == want).map(|(_, a)| *a))
}

/// Resolves a cluster's gateway and pod CIDRs. `pod_cidrs` overrides the nodes' podCIDRs.
#[must_use]
pub fn resolve(view: &ClusterView, opts: &ResolveOptions, pod_cidrs: Option<&[Ipv4Net]>) -> Resolved {
    let mut r = Resolved {
        pod_cidrs: pod_cidrs.map_or_else(|| node_pod_cidrs(view.nodes.values()), <[Ipv4Net]>::to_vec),
        ..Resolved::default()
    };
    if r.pod_cidrs.is_empty() {
        r.problems.push(format!("no node has an IPv4 podCIDR; set the {POD_CIDRS_ANNOTATION} annotation on the remote secret"));
    }
    let Some(svc) = &view.service else {
        r.problems.push(format!("Service {} not found", opts.gateway_service));
        return r;
    };
    let spec = svc.spec.clone().unwrap_or_default();
    r.port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(opts.gateway_port_name.as_str()))
        .and_then(|p| p.node_port)
        .and_then(|p| u16::try_from(p).ok());
    if r.port.is_none() {
        r.problems.push(format!(
            "Service {} has no nodePort for port {:?} (is it type NodePort?)",
            opts.gateway_service, opts.gateway_port_name
        ));
    }
    // Nodes where a ready gateway pod runs. With externalTrafficPolicy: Local only those
    // answer on the NodePort; with Cluster any node would, but a node running the gateway
    // saves a hop, so meshnet uses those in both cases.
    let gateway_nodes: BTreeSet<&str> = view
        .endpoints
        .iter()
        .flat_map(|e| e.subsets.iter().flatten())
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| a.node_name.as_deref())
        .collect();
    for name in gateway_nodes {
        match view.nodes.get(name).map(|n| node_address(n, opts.address_type)) {
            Some(Ok(Some(a))) => r.addresses.push(a),
            // That gateway is left out, the others stay; with none left, the reason is the
            // peer's problem, and it keeps its last good state.
            Some(Err(why)) => {
                let why = format!("node {name}: {why}");
                r.skipped.push(why.clone());
                r.problems.push(why);
            }
            Some(Ok(None)) | None => r.problems.push(format!("node {} has no {} address", Quoted(name), opts.address_type.kube_name())),
        }
    }
    r.addresses.sort_unstable();
    r.addresses.dedup();
    if r.addresses.is_empty() {
        // First, before the per-node ones that a cap may cut.
        let svc = &opts.gateway_service;
        let why = if r.skipped.is_empty() { format!("no ready endpoint of Service {svc} on a known node") } else { format!("no usable gateway node for Service {svc}") };
        r.problems.insert(0, why);
    }
    cap_reasons(&mut r.skipped);
    cap_reasons(&mut r.problems);
    r
}

/// The peer a resolved cluster becomes, or why it cannot be one.
pub fn peer(name: &str, r: &Resolved) -> Result<RawPeer, String> {
    let (Some(port), false, false) = (r.port, r.addresses.is_empty(), r.pod_cidrs.is_empty()) else {
        return Err(r.problems.join("; "));
    };
    Ok(RawPeer {
        name: name.to_string(),
        pod_cidrs: r.pod_cidrs.iter().map(ToString::to_string).collect(),
        gateways: r
            .addresses
            .iter()
            .take(meshnet_common::limits::MAX_GATEWAYS)
            .map(|a| RawGateway { address: a.to_string(), port: u32::from(port), udp_port: None })
            .collect(),
        ..RawPeer::default()
    })
}

/// A value taken from a remote object, quoted for a message and cut at 64 characters: an
/// annotation can be 256 KiB, and messages end up in `status.yaml` and the log.
pub struct Quoted<'a>(pub &'a str);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MAX: usize = 64;
        match self.0.char_indices().nth(MAX) {
            Some((end, _)) => write!(f, "{:?}...", &self.0[..end]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

/// How remote `name` is reached: `--mode NAME=MODE` (`flag`) wins over its secret's
/// [`MODE_ANNOTATION`], which wins over `--default-mode`. The operator of this cluster sets
/// the flags, whoever writes the secret sets the annotation, as with the allow-lists. An
/// annotation that names no mode refuses the remote rather than guess.
pub fn remote_mode(flag: Option<PeerMode>, annotation: Option<&str>, default: PeerMode) -> Result<PeerMode, String> {
    if let Some(m) = flag {
        return Ok(m);
    }
    match annotation.map(str::trim) {
        None => Ok(default),
        Some("gateway") => Ok(PeerMode::Gateway),
        Some("tunnel") => Ok(PeerMode::Tunnel),
        Some(other) => Err(format!(
            "annotation {MODE_ANNOTATION}: {} is neither \"gateway\" nor \"tunnel\"; refusing the peer until it is fixed",
            Quoted(other)
        )),
    }
}

/// A remote cluster resolved for tunnel mode: its pod CIDRs, its tunnel NodePort, and each
/// usable node with the pod CIDRs it hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedTunnel {
    pub pod_cidrs: Vec<Ipv4Net>,
    pub port: Option<u16>,
    /// By address.
    pub nodes: BTreeMap<Ipv4Addr, Vec<Ipv4Net>>,
    /// Nodes, or pod CIDRs of a node, left out, and why (the first [`MAX_REASONS`]).
    pub skipped: Vec<String>,
    /// How many were left out in all.
    pub skipped_count: usize,
    /// Why the peer cannot be built now.
    pub problems: Vec<String>,
}

/// Reasons kept for skipped nodes: a cluster of 5,000 nodes without podCIDRs must not write
/// 5,000 lines into `status.yaml`.
pub const MAX_REASONS: usize = 16;

impl ResolvedTunnel {
    fn skip(&mut self, why: String) {
        self.skipped_count += 1;
        if self.skipped.len() < MAX_REASONS {
            self.skipped.push(why);
        }
    }

    /// The skipped nodes in one line, for the peer's status.
    #[must_use]
    pub fn skipped_summary(&self) -> Option<String> {
        let more = self.skipped_count.saturating_sub(self.skipped.len());
        let tail = if more > 0 { format!("; and {more} more") } else { String::new() };
        (self.skipped_count > 0).then(|| format!("{}{tail}", self.skipped.join("; ")))
    }
}

/// Pod CIDRs a Kubernetes node may hold: `spec.podCIDRs` has one per address family, so
/// more than this is not a node the API server validated.
const MAX_CIDRS_PER_NODE: usize = limits::MAX_NODE_CIDRS;

/// Resolves a cluster for tunnel mode: its tunnel Service's UDP nodePort and its nodes.
///
/// The remote's objects cross a trust boundary, so a node is left out (with the reason) when
/// it has no usable address (none of `opts.address_type`, or one `reserved` refuses: loopback,
/// link-local, this cluster's own nodes), no IPv4 podCIDR, more podCIDRs than a node can
/// have, pod CIDRs outside `pod_cidrs` (when given), an address another node also claims, or
/// pod CIDRs that overlap another node's (both lose them: which one is lying cannot be
/// told), or an address annotation that points elsewhere than the node's own addresses (a
/// gateway is left out for it in gateway mode). More usable nodes than the datapath holds
/// is a problem, and the peer keeps its last good state.
#[must_use]
pub fn resolve_tunnel(view: &ClusterView, opts: &ResolveOptions, pod_cidrs: Option<&[Ipv4Net]>, reserved: &Reserved) -> ResolvedTunnel {
    let mut r = resolve_tunnel_nodes(view, opts, pod_cidrs, reserved);
    cap_reasons(&mut r.problems);
    r
}

/// Keeps the first [`MAX_REASONS`] of `reasons` and says how many more there were: one
/// reason a node, and a remote's thousands of nodes, must not fill `status.yaml` or the log.
fn cap_reasons(reasons: &mut Vec<String>) {
    if reasons.len() > MAX_REASONS {
        let more = reasons.len() - MAX_REASONS;
        reasons.truncate(MAX_REASONS);
        reasons.push(format!("and {more} more"));
    }
}

fn resolve_tunnel_nodes(view: &ClusterView, opts: &ResolveOptions, pod_cidrs: Option<&[Ipv4Net]>, reserved: &Reserved) -> ResolvedTunnel {
    let mut r = ResolvedTunnel {
        pod_cidrs: pod_cidrs.map_or_else(|| node_pod_cidrs(view.nodes.values()), <[Ipv4Net]>::to_vec),
        ..ResolvedTunnel::default()
    };
    if r.pod_cidrs.is_empty() {
        r.problems.push(format!("no node has an IPv4 podCIDR; set the {POD_CIDRS_ANNOTATION} annotation on the remote secret"));
    }
    r.port = tunnel_port(view.tunnel_service.as_ref(), &opts.tunnel_service).map_err(|e| r.problems.push(e)).ok();
    let max_nodes = usize::try_from(limits::MAX_TUNNEL_NODES).unwrap_or(usize::MAX);
    // Looked up, not scanned: aggregated from the nodes' own, the cluster's CIDRs are as
    // many as its nodes' when those are apart, and a scan for every node's would cost
    // 16,000 × 16,000 comparisons for a remote of 4,096 nodes with four each.
    let cluster_cidrs: CidrSet<()> = r.pod_cidrs.iter().map(|p| (*p, ())).collect();
    // Usable nodes: name, address, pod CIDRs.
    let mut usable: Vec<(&str, Ipv4Addr, Vec<Ipv4Net>)> = Vec::new();
    for (name, node) in view.nodes.as_ref() {
        let address = match node_address(node, opts.address_type) {
            Ok(Some(a)) => a,
            Ok(None) => {
                r.skip(format!("node {name}: no {} address", opts.address_type.kube_name()));
                continue;
            }
            Err(why) => {
                r.skip(format!("node {name}: {why}"));
                continue;
            }
        };
        if let Some(why) = reserved.refuse_gateway(address) {
            r.skip(format!("node {name}: address refused: {why}"));
            continue;
        }
        if node.pod_cidrs.is_empty() {
            r.skip(format!("node {name}: no IPv4 podCIDR"));
            continue;
        }
        if node.pod_cidrs.len() > MAX_CIDRS_PER_NODE {
            r.skip(format!("node {name}: {} podCIDRs, where a node has one per address family", node.pod_cidrs.len()));
            continue;
        }
        let mut cidrs = Vec::new();
        for c in &node.pod_cidrs {
            if cluster_cidrs.covering(*c).is_some() {
                cidrs.push(*c);
            } else {
                r.skip(format!("node {name}: podCIDR {c} is outside the cluster's podCIDRs"));
            }
        }
        if cidrs.is_empty() {
            continue;
        }
        if usable.len() == max_nodes {
            r.problems.push(format!("more than {max_nodes} usable nodes: a tunnel peer may have at most {max_nodes}"));
            return r;
        }
        usable.push((name.as_str(), address, cidrs));
    }
    // An address claimed twice: packets from it could be either node's, so neither is used.
    let mut by_address: BTreeMap<Ipv4Addr, Vec<&str>> = BTreeMap::new();
    for (name, a, _) in &usable {
        by_address.entry(*a).or_default().push(name);
    }
    usable.retain(|(name, a, _)| {
        let names = &by_address[a];
        if names.len() > 1 {
            let others: Vec<&str> = names.iter().filter(|n| *n != name).copied().collect();
            let more = if others.len() > 3 { format!(" and {} more", others.len() - 3) } else { String::new() };
            r.skip(format!("node {name}: address {a} is also node {}'s{more}", others[..others.len().min(3)].join(", ")));
        }
        names.len() == 1
    });
    // Overlapping pod CIDRs: a pod address routed to two nodes.
    let names: Vec<&str> = usable.iter().map(|(name, _, _)| *name).collect();
    let lost = overlapping(&names, usable.iter().map(|(_, _, cs)| cs.as_slice()), |why| r.skip(why));
    for (i, (_, a, cs)) in usable.into_iter().enumerate() {
        let kept: Vec<Ipv4Net> = cs.into_iter().filter(|c| !lost.contains(&(i, *c))).collect();
        if !kept.is_empty() {
            r.nodes.insert(a, kept);
        }
    }
    if r.nodes.is_empty() {
        r.problems.push(match r.skipped_summary() {
            Some(why) => format!("no node is usable for the tunnel: {why}"),
            None => "the cluster has no node".to_string(),
        });
    }
    r
}

/// A pair of overlapping pod CIDRs, as (node, CIDR) twice: the first one found open, in a
/// sweep by start, when the second came.
type Pair = ((usize, Ipv4Net), (usize, Ipv4Net));

/// Every (node, pod CIDR) of `cidrs` (by node) that overlaps another, and, through `skip`,
/// why, one line each: against the least pair it is in (the first found open, in a sweep
/// by start, then the other), in the order of those pairs.
///
/// Sorted by start, a CIDR overlaps an earlier one exactly when one still open contains it
/// (CIDRs nest or are apart), so the open ones are a stack, each inside the one below. The
/// pairs themselves are never listed: a remote whose 4,096 nodes all claim one CIDR makes 8
/// million, some hundreds of megabytes as a set. Each CIDR's least pair is found instead:
/// with a CIDR found open, the least of those that came while it was (each passes its own
/// least up the stack as it closes); with one that came, the least of those open below it.
fn overlapping<'a>(names: &[&str], cidrs: impl Iterator<Item = &'a [Ipv4Net]>, mut skip: impl FnMut(String)) -> BTreeSet<(usize, Ipv4Net)> {
    struct Open {
        me: (usize, Ipv4Net),
        /// The least of those below it, and of those that came while it was open.
        below: Option<(usize, Ipv4Net)>,
        came: Option<(usize, Ipv4Net)>,
    }
    /// Each CIDR's least pair, and whether it is the pair's second.
    type Least = BTreeMap<(usize, Ipv4Net), (Pair, bool)>;
    fn note(least: &mut Least, me: (usize, Ipv4Net), pair: Pair, second: bool) {
        let e = least.entry(me).or_insert((pair, second));
        *e = (*e).min((pair, second));
    }
    fn close(open: &mut Vec<Open>, least: &mut Least) {
        let Some(o) = open.pop() else { return };
        if let Some(came) = o.came {
            note(least, o.me, (o.me, came), false);
        }
        if let Some(parent) = open.last_mut() {
            let up = o.came.map_or(o.me, |c| c.min(o.me));
            parent.came = Some(parent.came.map_or(up, |c| c.min(up)));
        }
    }
    let mut all: Vec<(Ipv4Net, usize)> = cidrs.enumerate().flat_map(|(i, cs)| cs.iter().map(move |c| (*c, i))).collect();
    all.sort_unstable_by_key(|(c, _)| (c.network(), c.prefix_len()));
    let mut least = Least::new();
    let mut open: Vec<Open> = Vec::new();
    for (c, i) in all {
        while open.last().is_some_and(|o| !o.me.1.contains(&c.network())) {
            close(&mut open, &mut least);
        }
        let below = open.last().map(|o| o.below.map_or(o.me, |b| b.min(o.me)));
        if let Some(b) = below {
            note(&mut least, (i, c), (b, (i, c)), true);
        }
        open.push(Open { me: (i, c), below, came: None });
    }
    while !open.is_empty() {
        close(&mut open, &mut least);
    }
    let mut order: Vec<(Pair, bool, (usize, Ipv4Net))> = least.into_iter().map(|(me, (pair, second))| (pair, second, me)).collect();
    order.sort_unstable();
    for (((j, o), (i, c)), second, _) in &order {
        if *second {
            skip(format!("node {}: podCIDR {c} overlaps node {}'s {o}", names[*i], names[*j]));
        } else {
            skip(format!("node {}: podCIDR {o} overlaps node {}'s {c}", names[*j], names[*i]));
        }
    }
    order.into_iter().map(|(_, _, me)| me).collect()
}

/// The tunnel port a cluster's tunnel Service reserves: the nodePort of its UDP port (of the
/// one named `tunnel` when it has several).
fn tunnel_port(svc: Option<&Service>, name: &str) -> Result<u16, String> {
    let svc = svc.ok_or_else(|| format!("Service {name} not found (deploy/base/tunnel-service.yaml creates it)"))?;
    let udp: Vec<_> = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref() == Some("UDP"))
        .filter_map(|p| Some((p.name.as_deref(), u16::try_from(p.node_port?).ok().filter(|p| *p != 0)?)))
        .collect();
    match udp.as_slice() {
        [] => Err(format!("Service {name} has no UDP nodePort (is it type NodePort, with protocol UDP?)")),
        [(_, port)] => Ok(*port),
        many => many
            .iter()
            .find(|(n, _)| *n == Some("tunnel"))
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("Service {name} has {} UDP nodePorts and none is named \"tunnel\"", many.len())),
    }
}

/// The tunnel peer a resolved cluster becomes, or why it cannot be one.
pub fn tunnel_peer(name: &str, r: &ResolvedTunnel) -> Result<RawPeer, String> {
    let (Some(port), false, false) = (r.port, r.nodes.is_empty(), r.pod_cidrs.is_empty()) else {
        return Err(r.problems.join("; "));
    };
    Ok(RawPeer {
        name: name.to_string(),
        mode: PeerMode::Tunnel,
        pod_cidrs: r.pod_cidrs.iter().map(ToString::to_string).collect(),
        tunnel_port: Some(u32::from(port)),
        nodes: r
            .nodes
            .iter()
            .map(|(a, cs)| RawTunnelNode { address: a.to_string(), pod_cidrs: cs.iter().map(ToString::to_string).collect() })
            .collect(),
        ..RawPeer::default()
    })
}

/// Why `peer` claims pod CIDRs outside `allowed` (the remote's allow-list), if it does.
#[must_use]
pub fn outside_allowed(peer: &RawPeer, allowed: &[Ipv4Net], source: &str) -> Option<String> {
    let list = allowed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    peer.pod_cidrs.iter().enumerate().find_map(|(i, c)| {
        let inside = c.parse::<Ipv4Net>().is_ok_and(|n| allowed.iter().any(|a| a.contains(&n)));
        (!inside).then(|| format!("podCIDRs[{i}]: {c:?} is outside the CIDRs this cluster may claim ({list}; {source})"))
    })
}

/// Whether two CIDRs share an address: one holds the other.
fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b) || b.contains(&a)
}

/// Who keeps an address or range that two peers claim: the one of them that was published
/// with it, if only one; else neither. A remote's objects cross a trust boundary, so no
/// order of names may let a newcomer take what another peer holds, nor a peer widen its
/// claim over another's.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Contest {
    First,
    Second,
    Neither,
}

pub(crate) fn contest(first: bool, second: bool) -> Contest {
    match (first, second) {
        (true, false) => Contest::First,
        (false, true) => Contest::Second,
        _ => Contest::Neither,
    }
}

/// What a peer claims: its pod CIDRs, and the addresses of its gateways and tunnel nodes
/// (as /32s), which no other peer's pod CIDR may cover: that peer's traffic would go to
/// whoever claims the CIDR.
#[derive(Clone, Copy)]
enum Claim {
    Cidr(Ipv4Net),
    Node(Ipv4Addr),
}

impl Claim {
    fn net(self) -> Ipv4Net {
        match self {
            Claim::Cidr(n) => n,
            Claim::Node(a) => Ipv4Net::from(a),
        }
    }

    /// Whether two peers' claims collide: CIDRs that overlap, or a CIDR over a node's
    /// address. Two peers with one node address are `desired::refuse_tunnel_clashes`'s.
    fn collides(self, other: Claim) -> bool {
        !matches!((self, other), (Claim::Node(_), Claim::Node(_))) && overlap(self.net(), other.net())
    }

    /// The refusal's words for `self`, a claim of the refused peer, against `other`'s.
    fn against(self, other: Claim, owner: &str) -> String {
        match (self, other) {
            (Claim::Cidr(n), Claim::Node(a)) => format!("claims {n}, which holds {a}, a node address of peer {owner}"),
            (Claim::Node(a), Claim::Cidr(n)) => format!("node address {a} lies in {n} of peer {owner}"),
            (mine, theirs) => format!("claims {}, which overlaps {} of peer {owner}", mine.net(), theirs.net()),
        }
    }
}

fn claims_of(p: &RawPeer) -> Vec<Claim> {
    let cidrs = p.pod_cidrs.iter().filter_map(|c| c.parse().ok()).map(Claim::Cidr);
    let nodes = p.gateways.iter().map(|g| g.address.as_str()).chain(p.nodes.iter().map(|n| n.address.as_str()));
    cidrs.chain(nodes.filter_map(|a| a.parse().ok()).map(Claim::Node)).collect()
}

/// The first collision between each two of `sets` (by index, the lower first, its claim
/// first), found in one sweep: CIDRs (and a node's /32) either nest or are apart, so in
/// order of start, wider first, the ranges still open at a range's start all hold it. A
/// thousand-node peer beside fifty others costs a sort, not a million comparisons a pair.
fn first_collisions(sets: &[&[Claim]]) -> BTreeMap<(usize, usize), (Claim, Claim)> {
    let mut all: Vec<(usize, Claim)> = sets.iter().enumerate().flat_map(|(i, cs)| cs.iter().map(move |c| (i, *c))).collect();
    all.sort_by_key(|(_, c)| (u32::from(c.net().network()), c.net().prefix_len()));
    let mut open: Vec<(usize, Claim)> = Vec::new();
    let mut found = BTreeMap::new();
    for (i, c) in all {
        while open.last().is_some_and(|(_, o)| u32::from(o.net().broadcast()) < u32::from(c.net().network())) {
            open.pop();
        }
        for &(j, o) in open.iter().filter(|(j, o)| *j != i && o.collides(c)) {
            let key = (j.min(i), j.max(i));
            found.entry(key).or_insert(if j < i { (o, c) } else { (c, o) });
        }
        open.push((i, c));
    }
    found
}

/// One Node of this cluster, as the overlap rules see it: what it claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub pod_cidrs: Vec<Ipv4Net>,
    pub addresses: BTreeSet<Ipv4Addr>,
}

impl LocalNode {
    #[must_use]
    pub fn of(name: &str, node: &NodeInfo) -> Self {
        Self { name: name.to_owned(), pod_cidrs: node.pod_cidrs.to_vec(), addresses: node_addresses(node) }
    }
}

/// Whether `held` (a peer's record, of what it was published with) holds `claim`'s `region`
/// (the addresses a local Node's claim shares with it) as the same kind of claim: a pod
/// CIDR's region inside a CIDR it was published with, a node address it was published with
/// as one. A record of a pod CIDR excuses no gateway moved into a Node's pods, nor one of
/// part of a Node's CIDR a wider claim over all of it.
fn holds_as(held: &[Claim], claim: Claim, region: Ipv4Net) -> bool {
    held.iter().any(|h| match (h, claim) {
        (Claim::Cidr(h), Claim::Cidr(_)) => h.contains(&region),
        (Claim::Node(h), Claim::Node(a)) => *h == a,
        _ => false,
    })
}

/// The addresses of this cluster's Nodes that no peer may claim, as they stand against a
/// peer whose record is `held`: every Node's, less those inside what the peer was published
/// with. A Node is one object that one kubelet writes (its addresses) or one typo makes
/// (its podCIDRs): were every peer it overlaps refused, one Node would withdraw every peer
/// from every node. A peer keeps what it was published with; [`against_local`] notes it.
#[must_use]
pub fn unheld_addresses(local: &[LocalNode], held: Option<&RawPeer>) -> BTreeSet<Ipv4Addr> {
    let held = held.map(claims_of).unwrap_or_default();
    local.iter().flat_map(|n| n.addresses.iter().copied()).filter(|a| !holds_as(&held, Claim::Node(*a), Ipv4Net::from(*a))).collect()
}

/// How `p`'s claims stand against this cluster's Nodes: refused (why) when one overlaps a
/// Node's pod CIDR, or holds a Node's address, that `held` (what `p` was published with)
/// does not; else each clash it keeps, published with it before, for the status.
pub fn against_local(p: &RawPeer, local: &[LocalNode], held: Option<&RawPeer>) -> Result<Vec<String>, String> {
    let held = held.map(claims_of).unwrap_or_default();
    let mut kept = Vec::new();
    for c in claims_of(p) {
        for n in local {
            let node = &n.name;
            for o in n.pod_cidrs.iter().filter(|o| overlap(**o, c.net())) {
                let both = if o.prefix_len() >= c.net().prefix_len() { *o } else { c.net() };
                match c {
                    _ if holds_as(&held, c, both) => kept.push(format!("node {node}'s pod CIDR {o} overlaps {}", c.net())),
                    Claim::Cidr(c) => return Err(format!("claims {c}, which overlaps {o} of the local cluster (node {node})")),
                    Claim::Node(a) => return Err(format!("node address {a} lies in {o}, the local cluster's pods (node {node})")),
                }
            }
            for a in n.addresses.iter().filter(|a| c.net().contains(*a)) {
                match c {
                    _ if holds_as(&held, c, Ipv4Net::from(*a)) => kept.push(format!("node {node} lists {a} among its addresses")),
                    Claim::Cidr(c) => return Err(format!("claims {c}, which covers {a}, an address of node {node}")),
                    Claim::Node(a) => return Err(format!("{a} is an address of node {node} of the local cluster")),
                }
            }
        }
    }
    kept.sort();
    kept.dedup();
    Ok(kept)
}

/// Drops peers whose CIDRs cover everything, and settles what two peers both claim
/// (overlapping pod CIDRs, or a pod CIDR over another's gateway or node): the one that
/// `held` says was published with it, as the same kind of claim, keeps it and the other is
/// refused; when neither was
/// (or both), both are refused, for no rule could tell the rightful one. `held` is what
/// each configured peer was last published with, kept while it stays configured: a peer
/// refused or unpublished now still holds it against every other. Returns the kept peers
/// (in their order) and, for each refused one, why. What this cluster's own Nodes claim is
/// [`against_local`]'s.
#[must_use]
pub fn refuse_overlaps(peers: Vec<RawPeer>, held: &[&RawPeer]) -> (Vec<RawPeer>, BTreeMap<String, String>) {
    let held_claims: BTreeMap<&str, Vec<Claim>> = held.iter().map(|p| (p.name.as_str(), claims_of(p))).collect();
    // Held as the same kind of claim: a pod CIDR by a held CIDR over any of it (a peer that
    // widened keeps what it had), a node address by that address held as a node. A record's
    // node address holds no CIDR over it: two peers may hold one node address, and the copy
    // could then contest the other's node with a /32 and have both refused.
    let holds = |name: &str, claim: Claim, region: Ipv4Net| {
        held_claims.get(name).is_some_and(|cs| {
            cs.iter().any(|h| match (*h, claim) {
                (Claim::Cidr(h), Claim::Cidr(_)) => overlap(h, region),
                (Claim::Node(h), Claim::Node(a)) => h == a,
                _ => false,
            })
        })
    };
    let claims: Vec<Vec<Claim>> = peers.iter().map(claims_of).collect();
    let mut refused = BTreeMap::new();
    for (p, cs) in peers.iter().zip(&claims) {
        let why = cs.iter().find_map(|c| match *c {
            Claim::Cidr(n) if n.prefix_len() == 0 => Some(format!("claims {n}, all of IPv4")),
            _ => None,
        });
        if let Some(why) = why {
            refused.insert(p.name.clone(), why);
        }
    }
    // A peer refused on its own (all of IPv4) contests nothing: its claim
    // would otherwise refuse every peer it overlaps.
    let alone: BTreeSet<String> = refused.keys().cloned().collect();
    let contesting: Vec<(&RawPeer, &Vec<Claim>)> = peers.iter().zip(&claims).filter(|(p, _)| !alone.contains(&p.name)).collect();
    // Who collides with whom: the candidates, then the records of configured peers that do
    // not contest now (not candidates, or refused on their own): those hold what they held.
    let absent: Vec<(&str, &Vec<Claim>)> =
        held_claims.iter().filter(|(n, _)| !contesting.iter().any(|(q, _)| q.name == **n)).map(|(n, c)| (*n, c)).collect();
    let sets: Vec<&[Claim]> = contesting.iter().map(|(_, c)| c.as_slice()).chain(absent.iter().map(|(_, c)| c.as_slice())).collect();
    for ((a, b), (x, y)) in first_collisions(&sets) {
        // The addresses both claim: the narrower of the two.
        let both = if x.net().prefix_len() >= y.net().prefix_len() { x.net() } else { y.net() };
        // Two records of absent peers hold what they held; nothing to settle.
        let Some(&(p, _)) = contesting.get(a) else {
            continue;
        };
        let mut refuse = |who: &RawPeer, why: String| {
            refused.entry(who.name.clone()).or_insert(why);
        };
        let Some(&(q, _)) = contesting.get(b) else {
            // What a configured peer that is not among these holds stays its own.
            let owner = absent[b - contesting.len()].0;
            if !holds(&p.name, x, both) {
                refuse(p, format!("{}, published with it before (not published now)", x.against(y, owner)));
            }
            continue;
        };
        let (p_held, q_held) = (holds(&p.name, x, both), holds(&q.name, y, both));
        match contest(p_held, q_held) {
            Contest::First => refuse(q, format!("{}, published with it before", y.against(x, &p.name))),
            Contest::Second => refuse(p, format!("{}, published with it before", x.against(y, &q.name))),
            Contest::Neither => {
                let why = if p_held { ", both published with it before" } else { "; neither was published with it before, so neither is" };
                refuse(p, format!("{}{why}", x.against(y, &q.name)));
                refuse(q, format!("{}{why}", y.against(x, &p.name)));
            }
        }
    }
    (peers.into_iter().filter(|p| !refused.contains_key(&p.name)).collect(), refused)
}

/// Istio's `meshNetworks`, in the shape of the `istio` ConfigMap's key. Exactly the fields of
/// istiod's `MeshNetworks` are read, and any other is refused: a misspelt key read as absent
/// would withdraw a hand-written network, or part of it, without a word.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshNetworks {
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default)]
    pub endpoints: Vec<NetworkEndpoint>,
    #[serde(default)]
    pub gateways: Vec<NetworkGateway>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkGateway {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_service_name: Option<String>,
    pub port: u32,
    /// Kept so that rewriting an entry keeps it; meshnet does not use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

impl Network {
    /// Why this network, written by hand (a `fromCidr` endpoint), gives no peer or only part
    /// of what it says. A network of `fromRegistry` endpoints alone is istiod's, not
    /// meshnet's, and never misshapen here.
    fn misshapen(&self) -> Option<String> {
        let hand = self.endpoints.iter().any(|e| e.from_cidr.is_some() || e.from_registry.is_none());
        if !hand {
            return None;
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            match (&e.from_cidr, &e.from_registry) {
                (None, None) => return Some(format!("endpoints[{i}]: neither fromCidr nor fromRegistry")),
                (Some(_), Some(_)) => return Some(format!("endpoints[{i}]: both fromCidr and fromRegistry; Istio takes one")),
                _ => {}
            }
        }
        for (i, g) in self.gateways.iter().enumerate() {
            match (&g.address, &g.registry_service_name) {
                (None, None) => return Some(format!("gateways[{i}]: neither address nor registryServiceName")),
                (Some(_), Some(_)) => return Some(format!("gateways[{i}]: both address and registryServiceName; Istio takes one")),
                _ => {}
            }
        }
        if !self.gateways.iter().any(|g| g.address.is_some()) {
            return Some("a fromCidr network needs a gateway with an address (meshnet cannot look up registryServiceName)".to_owned());
        }
        None
    }
}

/// Whether a network's entry, as written, lists only `fromRegistry` endpoints: istiod's to
/// read, so that no typo of it is meshnet's to report.
fn registry_only(v: &serde_yaml::Value) -> bool {
    v.get("endpoints").and_then(serde_yaml::Value::as_sequence).is_some_and(|s| {
        !s.is_empty()
            && s.iter().all(|e| e.as_mapping().is_some_and(|m| m.len() == 1 && m.contains_key("fromRegistry")))
    })
}

/// Why a meshNetworks text could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum MeshNetworksError {
    #[error(transparent)]
    Refused(#[from] crate::yaml::Refused),
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
}

impl MeshNetworks {
    pub fn parse(text: &str) -> Result<Self, MeshNetworksError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        crate::yaml::bound_aliases(text)?;
        Ok(serde_yaml::from_str(text)?)
    }

    /// Parses network by network: one hand-written entry of the wrong shape (a string port, a
    /// list where a map belongs, a misspelt key, no gateway address) is returned with why, and
    /// the others still count.
    pub fn parse_each(text: &str) -> Result<(Self, BTreeMap<String, String>), MeshNetworksError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Loose {
            #[serde(default)]
            networks: BTreeMap<String, serde_yaml::Value>,
        }
        if text.trim().is_empty() {
            return Ok((Self::default(), BTreeMap::new()));
        }
        crate::yaml::bound_aliases(text)?;
        let loose: Loose = serde_yaml::from_str(text)?;
        let mut out = Self::default();
        let mut broken = BTreeMap::new();
        for (name, v) in loose.networks {
            let registry_only = registry_only(&v);
            match serde_yaml::from_value::<Network>(v).map_err(|e| e.to_string()).and_then(|n| n.misshapen().map_or(Ok(n), Err)) {
                Ok(n) => {
                    out.networks.insert(name, n);
                }
                Err(_) if registry_only => {}
                Err(e) => {
                    broken.insert(name, e);
                }
            }
        }
        Ok((out, broken))
    }

    /// Peers described by hand-written networks with `fromCidr` endpoints and gateway
    /// addresses, except `local_network`.
    #[must_use]
    pub fn peers(&self, local_network: Option<&str>) -> Vec<RawPeer> {
        self.networks
            .iter()
            .filter(|(name, _)| Some(name.as_str()) != local_network)
            .filter_map(|(name, net)| {
                let cidrs: Vec<String> = net.endpoints.iter().filter_map(|e| e.from_cidr.clone()).collect();
                let gateways: Vec<RawGateway> = net
                    .gateways
                    .iter()
                    .filter_map(|g| Some(RawGateway { address: g.address.clone()?, port: g.port, udp_port: None }))
                    .collect();
                (!cidrs.is_empty() && !gateways.is_empty()).then(|| RawPeer {
                    name: name.clone(),
                    pod_cidrs: cidrs,
                    gateways,
                    ..RawPeer::default()
                })
            })
            .collect()
    }

    /// Adds or replaces the network of one cluster with its gateways.
    pub fn set_cluster(&mut self, network: &str, cluster: &str, addresses: &[Ipv4Addr], port: u16) {
        self.networks.insert(
            network.to_string(),
            Network {
                endpoints: vec![NetworkEndpoint { from_registry: Some(cluster.to_string()), from_cidr: None }],
                gateways: addresses
                    .iter()
                    .map(|a| NetworkGateway { address: Some(a.to_string()), registry_service_name: None, port: u32::from(port), locality: None })
                    .collect(),
            },
        );
    }

    /// The YAML under the `meshNetworks` key, as the seed writes it.
    #[must_use]
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, NodeAddress, NodeSpec, NodeStatus, ServicePort, ServiceSpec};

    use super::*;

    fn node(name: &str, ip: &str, cidr: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.spec = Some(NodeSpec { pod_cidr: Some(cidr.into()), pod_cidrs: Some(vec![cidr.into()]), ..NodeSpec::default() });
        n.status = Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress { type_: "InternalIP".into(), address: ip.into() },
                NodeAddress { type_: "Hostname".into(), address: name.into() },
            ]),
            ..NodeStatus::default()
        });
        n
    }

    fn view() -> ClusterView {
        let svc = Service {
            spec: Some(ServiceSpec {
                ports: Some(vec![
                    ServicePort { name: Some("status-port".into()), port: 15021, node_port: Some(30021), ..ServicePort::default() },
                    ServicePort { name: Some("tls".into()), port: 15443, node_port: Some(32361), ..ServicePort::default() },
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let ep = Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![EndpointAddress { ip: "10.245.0.10".into(), node_name: Some("n2".into()), ..EndpointAddress::default() }]),
                ..EndpointSubset::default()
            }]),
            ..Endpoints::default()
        };
        ClusterView {
            nodes: std::sync::Arc::new(
                [("n2".into(), node("n2", "10.20.144.165", "10.245.0.0/24").into()), ("n3".into(), node("n3", "10.20.144.166", "10.245.1.0/24").into())]
                    .into(),
            ),
            service: Some(svc),
            endpoints: Some(ep),
            tunnel_service: None,
        }
    }

    /// A node is kept as what discovery reads of it: a heartbeat, a label or another
    /// annotation leaves it equal, and what it does read survives the projection.
    #[test]
    fn a_node_is_kept_as_what_discovery_reads() {
        let mut n = node("n2", "10.20.144.165", "10.245.0.7/24");
        n.spec.as_mut().unwrap().pod_cidrs.as_mut().unwrap().push("fd00::/64".into());
        n.status.as_mut().unwrap().addresses.as_mut().unwrap().push(NodeAddress { type_: "ExternalIP".into(), address: "192.0.2.99".into() });
        n.metadata.annotations = Some([(ADDRESS_ANNOTATION.into(), "192.0.2.99".into()), ("other".into(), "x".into())].into());
        let info = NodeInfo::from(n.clone());
        assert_eq!(*info.pod_cidrs, ["10.245.0.0/24".parse::<Ipv4Net>().unwrap()]);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(*info.addresses, [(NodeAddressType::Internal, ip("10.20.144.165")), (NodeAddressType::External, ip("192.0.2.99"))]);
        assert_eq!(info.gateway_address.as_deref(), Some("192.0.2.99"));
        n.metadata.labels = Some([("kubernetes.io/hostname".into(), "n2".into())].into());
        n.metadata.resource_version = Some("42".into());
        n.status.as_mut().unwrap().conditions = Some(vec![k8s_openapi::api::core::v1::NodeCondition { type_: "Ready".into(), status: "True".into(), ..Default::default() }]);
        assert_eq!(NodeInfo::from(n), info);
    }

    /// A remote's Node is parsed for what discovery reads, and nothing else is stored: it
    /// makes the same NodeInfo as the whole Node, whatever else it carries.
    #[test]
    fn a_remote_node_is_parsed_for_what_discovery_reads() {
        let mut n = node("n2", "10.20.144.165", "10.245.0.7/24");
        n.metadata.annotations = Some([(ADDRESS_ANNOTATION.into(), "10.20.144.165".into()), ("other".into(), "x".repeat(1000))].into());
        n.metadata.resource_version = Some("42".into());
        let mut json = serde_json::to_value(&n).unwrap();
        json["status"]["images"] = serde_json::Value::Array(vec![serde_json::json!({}); 100_000]);
        json["metadata"]["managedFields"] = serde_json::Value::Array(vec![serde_json::json!({"manager": "x"}); 1000]);
        json["status"]["addresses"] = serde_json::Value::Array(
            (0..1000u32).map(|i| serde_json::json!({"type": "InternalIP", "address": Ipv4Addr::from(0x0a14_9000 + i).to_string()})).collect(),
        );
        let remote: RemoteNode = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(remote.meta.resource_version.as_deref(), Some("42"));
        // Addresses that are no IPv4 address may come first: more are read than kept.
        let mut v6_first = json;
        v6_first["status"]["addresses"] = serde_json::Value::Array(
            (0..20).map(|i| serde_json::json!({"type": "InternalIP", "address": format!("fd00::{i}")}))
                .chain([serde_json::json!({"type": "InternalIP", "address": "10.20.144.165"})])
                .collect(),
        );
        let info = NodeInfo::from(serde_json::from_value::<RemoteNode>(v6_first).unwrap());
        assert_eq!(*info.addresses, [(NodeAddressType::Internal, "10.20.144.165".parse().unwrap())]);
        assert_eq!(remote.meta.name.as_deref(), Some("n2"));
        let info = NodeInfo::from(remote);
        assert_eq!(info.addresses.len(), MAX_PER_NODE);
        assert_eq!(info.gateway_address.as_deref(), Some("10.20.144.165"));
        // A plain node: the same as the whole Node makes; nulls and missing parts are empty.
        let plain = node("n2", "10.20.144.165", "10.245.0.7/24");
        assert_eq!(NodeInfo::from(serde_json::from_value::<RemoteNode>(serde_json::to_value(&plain).unwrap()).unwrap()), NodeInfo::from(plain));
        let bare: RemoteNode = serde_json::from_str(r#"{"metadata": {"name": "n3", "annotations": null}, "spec": {"podCIDRs": null}, "status": null}"#).unwrap();
        assert_eq!(NodeInfo::from(bare), NodeInfo { pod_cidrs: [].into(), addresses: [].into(), gateway_address: None });
        // No name, no node: a list of such fails whole.
        for nameless in ["{}", r#"{"metadata": {"name": ""}}"#] {
            assert!(serde_json::from_str::<RemoteNode>(nameless).is_err(), "{nameless}");
        }
        assert!(size_of::<RemoteNode>() < 512, "{}", size_of::<RemoteNode>());
    }

    /// A remote's node costs the controller what a real node does, whatever it lists.
    #[test]
    fn a_node_is_kept_within_bounds() {
        let mut n = node("n2", "10.20.144.165", "10.245.0.7/24");
        let st = n.status.as_mut().unwrap().addresses.as_mut().unwrap();
        st.extend((0..100_000u32).map(|i| NodeAddress { type_: "InternalIP".into(), address: Ipv4Addr::from(0x0a00_0000 + i).to_string() }));
        n.spec.as_mut().unwrap().pod_cidrs.as_mut().unwrap().extend((0..1000u32).map(|i| format!("{}/32", Ipv4Addr::from(0x0b00_0000 + i))));
        let long = format!("192.0.2.1{}", "é".repeat(100_000));
        n.metadata.annotations = Some([(ADDRESS_ANNOTATION.into(), long)].into());
        let info = NodeInfo::from(n);
        assert_eq!((info.addresses.len(), info.pod_cidrs.len()), (MAX_PER_NODE, MAX_PER_NODE));
        assert_eq!(info.addresses[0].1, "10.20.144.165".parse::<Ipv4Addr>().unwrap());
        let annotation = info.gateway_address.unwrap();
        assert!(annotation.len() <= MAX_ANNOTATION + '…'.len_utf8() && annotation.starts_with("192.0.2.1") && annotation.ends_with('…'), "{annotation}");
        assert!(annotation.parse::<Ipv4Addr>().is_err());
    }

    #[test]
    fn resolves_gateway_node_nodeport_and_aggregated_cidrs() {
        let r = resolve(&view(), &ResolveOptions::default(), None);
        assert_eq!(r.port, Some(32361));
        assert_eq!(r.addresses, ["10.20.144.165".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(r.pod_cidrs, ["10.245.0.0/23".parse::<Ipv4Net>().unwrap()]);
        let p = peer("cluster2", &r).unwrap();
        assert_eq!(p.gateways, [RawGateway { address: "10.20.144.165".into(), port: 32361, udp_port: None }]);
    }

    #[test]
    fn annotation_picks_one_of_the_nodes_own_addresses() {
        let mut v = view();
        let mut n2 = node("n2", "10.20.144.165", "10.245.0.0/24");
        n2.status.as_mut().unwrap().addresses.as_mut().unwrap().push(NodeAddress { type_: "ExternalIP".into(), address: "192.0.2.99".into() });
        n2.metadata.annotations = Some([(ADDRESS_ANNOTATION.to_string(), "192.0.2.99".to_string())].into());
        std::sync::Arc::make_mut(&mut v.nodes).insert("n2".into(), n2.into());
        let r = resolve(&v, &ResolveOptions::default(), None);
        assert_eq!(r.addresses, ["192.0.2.99".parse::<Ipv4Addr>().unwrap()]);
        assert!(r.skipped.is_empty());
        let ext = ResolveOptions { address_type: AddressType::ExternalIp, ..ResolveOptions::default() };
        let r = resolve(&view(), &ext, None);
        assert!(r.addresses.is_empty());
        assert!(peer("c", &r).unwrap_err().contains("no ExternalIP address"));
    }

    /// Whoever can annotate a remote Node must not be able to point the gateway anywhere, nor
    /// withdraw the peer: that gateway is left out, with the reason; with no gateway left,
    /// the reason is the peer's problem (it keeps its last good state).
    #[test]
    fn annotation_outside_the_nodes_addresses_leaves_that_gateway_out() {
        for (value, why) in [
            ("169.254.169.254", r#"node n2: meshnet.io/gateway-address "169.254.169.254" is not one of its addresses (10.20.144.165)"#),
            ("10.20.144.166", r#"node n2: meshnet.io/gateway-address "10.20.144.166" is not one of its addresses (10.20.144.165)"#),
            ("gw.example.com", r#"node n2: meshnet.io/gateway-address "gw.example.com" is not an IPv4 address"#),
        ] {
            let mut v = view();
            std::sync::Arc::make_mut(&mut v.nodes).get_mut("n2").unwrap().gateway_address = Some(value.into());
            let r = resolve(&v, &ResolveOptions::default(), None);
            assert_eq!(r.skipped, [why], "{value}");
            assert!(r.addresses.is_empty(), "{value}");
            let e = peer("c", &r).unwrap_err();
            assert_eq!(e, format!("no usable gateway node for Service istio-eastwestgateway; {why}"), "{value}");
        }
    }

    fn info(addresses: &[(NodeAddressType, &str)], cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            pod_cidrs: cidrs.iter().map(|c| c.parse::<Ipv4Net>().unwrap()).collect(),
            addresses: addresses.iter().map(|(t, a)| (*t, a.parse().unwrap())).collect(),
            gateway_address: None,
        }
    }

    fn internal(ip: &str, cidrs: &[&str]) -> NodeInfo {
        info(&[(NodeAddressType::Internal, ip)], cidrs)
    }

    fn tunnel_service(ports: &[(Option<&str>, &str, Option<i32>)]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some("NodePort".into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, proto, node_port)| ServicePort {
                            name: name.map(Into::into),
                            protocol: Some((*proto).into()),
                            port: 31800,
                            node_port: *node_port,
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// A tunnel-mode remote: two nodes and the tunnel Service on 31800, no gateway at all.
    fn tunnel_view(nodes: Vec<(&str, NodeInfo)>) -> ClusterView {
        ClusterView {
            nodes: std::sync::Arc::new(nodes.into_iter().map(|(n, i)| (n.to_string(), i)).collect()),
            tunnel_service: Some(tunnel_service(&[(Some("tunnel"), "UDP", Some(31800))])),
            ..ClusterView::default()
        }
    }

    /// This cluster: node 10.20.144.83, Services in 10.96.0.0/12.
    fn local() -> Reserved {
        Reserved { service_cidrs: vec!["10.96.0.0/12".parse().unwrap()], local_addresses: ["10.20.144.83".parse().unwrap()].into() }
    }

    fn nodes_of(p: &RawPeer) -> Vec<(String, Vec<String>)> {
        p.nodes.iter().map(|n| (n.address.clone(), n.pod_cidrs.clone())).collect()
    }

    #[test]
    fn a_tunnel_peer_has_every_node_and_the_services_nodeport() {
        let v = tunnel_view(vec![("n3", internal("10.20.144.166", &["10.245.1.0/24"])), ("n2", internal("10.20.144.165", &["10.245.0.0/24"]))]);
        let r = resolve_tunnel(&v, &ResolveOptions::default(), None, &local());
        assert_eq!((r.port, r.skipped_count), (Some(31800), 0), "{r:?}");
        let p = tunnel_peer("cluster2", &r).unwrap();
        assert_eq!((p.mode, p.tunnel_port, p.pod_cidrs.as_slice()), (PeerMode::Tunnel, Some(31800), &["10.245.0.0/23".to_string()][..]));
        assert_eq!(nodes_of(&p), [("10.20.144.165".into(), vec!["10.245.0.0/24".into()]), ("10.20.144.166".into(), vec!["10.245.1.0/24".into()])]);
        assert!(p.gateways.is_empty());
        crate::config::validate_peer(&p, &local()).unwrap();
        // The east-west gateway plays no part: a one-network mesh has none.
        assert!(v.service.is_none() && v.endpoints.is_none());
    }

    /// A remote of 4,096 nodes with four pod CIDRs each, all apart, makes 16,384 cluster
    /// CIDRs: each node's is looked up among them, not compared with every one. In a debug
    /// build here the scans took 21 s, the lookups 0.2 s (the rest of the resolving).
    #[test]
    fn a_remote_of_many_nodes_apart_is_resolved_without_a_scan_per_node() {
        let nodes = (0..limits::MAX_TUNNEL_NODES).map(|i| {
            let pod_cidrs = (0..4).map(|k| Ipv4Net::from(Ipv4Addr::from(0x6440_0000 + (i * 4 + k) * 2))).collect();
            let addresses = [(NodeAddressType::Internal, Ipv4Addr::from(0xac10_0000 + i))].into();
            (format!("n{i}"), NodeInfo { pod_cidrs, addresses, gateway_address: None })
        });
        let v = ClusterView { nodes: std::sync::Arc::new(nodes.collect()), ..tunnel_view(Vec::new()) };
        let r = resolve_tunnel(&v, &ResolveOptions::default(), None, &local());
        assert_eq!((r.nodes.len(), r.pod_cidrs.len(), r.skipped_count), (4096, 16_384, 0), "{:?}", r.problems);
    }

    /// The overlaps between nodes' pod CIDRs are found, and worded, in the order they were
    /// when every overlapping pair was listed first (the reference below), on random nodes
    /// with CIDRs nested, equal and apart.
    #[test]
    fn node_overlaps_are_found_as_a_list_of_every_pair_found_them() {
        fn by_pairs(names: &[&str], cidrs: &[Vec<Ipv4Net>]) -> (BTreeSet<(usize, Ipv4Net)>, Vec<String>) {
            let mut all: Vec<(Ipv4Net, usize)> = cidrs.iter().enumerate().flat_map(|(i, cs)| cs.iter().map(move |c| (*c, i))).collect();
            all.sort_unstable_by_key(|(c, _)| (c.network(), c.prefix_len()));
            let mut open: Vec<(Ipv4Net, usize)> = Vec::new();
            let mut conflicts: BTreeSet<(usize, Ipv4Net, usize, Ipv4Net)> = BTreeSet::new();
            for (c, i) in all {
                open.retain(|(o, _)| o.contains(&c.network()));
                for (o, j) in &open {
                    conflicts.insert((*j, *o, i, c));
                }
                open.push((c, i));
            }
            let (mut lost, mut why) = (BTreeSet::new(), Vec::new());
            for (j, o, i, c) in conflicts {
                if lost.insert((j, o)) {
                    why.push(format!("node {}: podCIDR {o} overlaps node {}'s {c}", names[j], names[i]));
                }
                if lost.insert((i, c)) {
                    why.push(format!("node {}: podCIDR {c} overlaps node {}'s {o}", names[i], names[j]));
                }
            }
            (lost, why)
        }
        let mut rng = 0x9e37_79b9_u32;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            rng
        };
        let names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for round in 0..300 {
            let n = 1 + next() as usize % 40;
            let cidrs: Vec<Vec<Ipv4Net>> = (0..n)
                .map(|_| {
                    let mut cs: Vec<Ipv4Net> = (0..=next() % 4)
                        .map(|_| Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (next() & 0x0000_0f00)), 20 + u8::try_from(next() % 5).unwrap()).unwrap().trunc())
                        .collect();
                    cs.sort_unstable();
                    cs.dedup();
                    cs
                })
                .collect();
            let mut why = Vec::new();
            let lost = overlapping(&names[..n], cidrs.iter().map(Vec::as_slice), |w| why.push(w));
            assert_eq!((lost, why), by_pairs(&names[..n], &cidrs), "round {round}: {cidrs:?}");
        }
    }

    /// A remote whose 4,096 nodes all claim one pod CIDR loses it on every node, each said
    /// once, without the 8 million pairs ever being listed: listed, they took 45 s and 660 MB
    /// here in a debug build, the sweep 0.07 s.
    #[test]
    fn nodes_that_all_claim_one_cidr_all_lose_it_at_a_bounded_cost() {
        let nodes = (0..limits::MAX_TUNNEL_NODES).map(|i| {
            let addresses = [(NodeAddressType::Internal, Ipv4Addr::from(0xac10_0000 + i))].into();
            (format!("n{i:04}"), NodeInfo { pod_cidrs: ["10.245.0.0/24".parse().unwrap()].into(), addresses, gateway_address: None })
        });
        let v = ClusterView { nodes: std::sync::Arc::new(nodes.collect()), ..tunnel_view(Vec::new()) };
        let r = resolve_tunnel(&v, &ResolveOptions::default(), None, &local());
        assert_eq!((r.nodes.len(), r.skipped_count), (0, 4096));
        assert!(r.skipped[0].starts_with("node n000") && r.skipped[0].contains(": podCIDR 10.245.0.0/24 overlaps node n"), "{:?}", r.skipped);
    }

    #[test]
    fn the_tunnel_port_is_the_services_udp_nodeport() {
        let port = |svc: Option<Service>| {
            let mut v = tunnel_view(vec![("n2", internal("10.20.144.165", &["10.245.0.0/24"]))]);
            v.tunnel_service = svc;
            let r = resolve_tunnel(&v, &ResolveOptions::default(), None, &local());
            r.port.ok_or_else(|| r.problems.join("; "))
        };
        assert_eq!(port(Some(tunnel_service(&[(None, "UDP", Some(31999))]))), Ok(31999));
        let two = tunnel_service(&[(Some("other"), "UDP", Some(31001)), (Some("tunnel"), "UDP", Some(31002)), (Some("x"), "TCP", Some(31003))]);
        assert_eq!(port(Some(two)), Ok(31002));
        for (svc, why) in [
            (None, "Service meshnet-tunnel not found"),
            (Some(tunnel_service(&[(Some("tunnel"), "TCP", Some(31800))])), "has no UDP nodePort"),
            (Some(tunnel_service(&[(Some("tunnel"), "UDP", None)])), "has no UDP nodePort"),
            (Some(tunnel_service(&[(Some("tunnel"), "UDP", Some(70000))])), "has no UDP nodePort"),
            (Some(tunnel_service(&[(Some("tunnel"), "UDP", Some(0))])), "has no UDP nodePort"),
            (Some(tunnel_service(&[(Some("a"), "UDP", Some(31001)), (Some("b"), "UDP", Some(31002))])), "2 UDP nodePorts and none is named \"tunnel\""),
        ] {
            let e = port(svc).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        // No port, no peer: the controller keeps the peer's last good state.
        let mut v = tunnel_view(vec![("n2", internal("10.20.144.165", &["10.245.0.0/24"]))]);
        v.tunnel_service = None;
        assert!(tunnel_peer("c", &resolve_tunnel(&v, &ResolveOptions::default(), None, &local())).unwrap_err().contains("not found"));
    }

    /// Each bad node costs only itself, with a reason; the rest make a peer the agents take.
    #[test]
    fn bad_nodes_are_left_out_one_by_one() {
        let ext = |ip: &str, cidrs: &[&str]| info(&[(NodeAddressType::External, ip)], cidrs);
        let v = tunnel_view(vec![
            ("good", internal("10.20.144.165", &["10.245.0.0/24"])),
            ("no-internal-ip", ext("192.0.2.9", &["10.245.1.0/24"])),
            ("loopback", internal("127.0.0.1", &["10.245.2.0/24"])),
            ("metadata", internal("169.254.169.254", &["10.245.3.0/24"])),
            ("multicast", internal("224.0.0.5", &["10.245.4.0/24"])),
            ("ours", internal("10.20.144.83", &["10.245.5.0/24"])),
            ("no-podcidr", internal("10.20.144.170", &[])),
            ("greedy", internal("10.20.144.171", &["10.245.6.0/24", "10.245.7.0/24", "10.245.8.0/24", "10.245.9.0/24", "10.245.10.0/24"])),
            ("twin-a", internal("10.20.144.172", &["10.245.11.0/24"])),
            ("twin-b", internal("10.20.144.172", &["10.245.12.0/24"])),
            ("thief", internal("10.20.144.173", &["10.245.0.128/25", "10.245.13.0/24"])),
        ]);
        let r = resolve_tunnel(&v, &ResolveOptions::default(), None, &local());
        assert_eq!(
            r.skipped,
            [
                "node greedy: 5 podCIDRs, where a node has one per address family",
                "node loopback: address refused: 127.0.0.1 is not a unicast address of a remote node (loopback)",
                "node metadata: address refused: 169.254.169.254 is not a unicast address of a remote node (link-local)",
                "node multicast: address refused: 224.0.0.5 is not a unicast address of a remote node (multicast)",
                "node no-internal-ip: no InternalIP address",
                "node no-podcidr: no IPv4 podCIDR",
                "node ours: address refused: 10.20.144.83 is an address of this node; the peer's traffic would stay here",
                "node twin-a: address 10.20.144.172 is also node twin-b's",
                "node twin-b: address 10.20.144.172 is also node twin-a's",
                "node good: podCIDR 10.245.0.0/24 overlaps node thief's 10.245.0.128/25",
                "node thief: podCIDR 10.245.0.128/25 overlaps node good's 10.245.0.0/24",
            ]
        );
        assert!(r.problems.is_empty(), "{r:?}");
        let p = tunnel_peer("cluster2", &r).unwrap();
        // Neither claimant keeps the contested range; the thief keeps what is its own.
        assert_eq!(nodes_of(&p), [("10.20.144.173".into(), vec!["10.245.13.0/24".into()])]);
        crate::config::validate_peer(&p, &local()).unwrap();
        assert!(r.skipped_summary().unwrap().starts_with("node greedy: 5 podCIDRs"));
    }

    /// With the pod CIDRs given (flag or annotation), a node's claim outside them is left
    /// out: the nodes cannot widen what the operator said the cluster holds.
    #[test]
    fn a_node_cannot_claim_outside_the_given_pod_cidrs() {
        let v = tunnel_view(vec![
            ("n2", internal("10.20.144.165", &["10.245.0.0/24", "10.99.0.0/24"])),
            ("n3", internal("10.20.144.166", &["169.254.0.0/24"])),
        ]);
        let given: Vec<Ipv4Net> = vec!["10.245.0.0/16".parse().unwrap()];
        let r = resolve_tunnel(&v, &ResolveOptions::default(), Some(&given), &local());
        assert_eq!(
            r.skipped,
            ["node n2: podCIDR 10.99.0.0/24 is outside the cluster's podCIDRs", "node n3: podCIDR 169.254.0.0/24 is outside the cluster's podCIDRs"]
        );
        let p = tunnel_peer("c", &r).unwrap();
        assert_eq!((p.pod_cidrs.as_slice(), nodes_of(&p)), (&["10.245.0.0/16".to_string()][..], vec![("10.20.144.165".into(), vec!["10.245.0.0/24".into()])]));
        crate::config::validate_peer(&p, &local()).unwrap();
        // Without them, a node's claim is the cluster's: a reserved one refuses the whole peer
        // (in the controller's vetting, as in gateway mode), it is never quietly routed.
        let r = resolve_tunnel(&v, &ResolveOptions::default(), None, &local());
        let e = crate::config::validate_peer(&tunnel_peer("c", &r).unwrap(), &local()).unwrap_err();
        assert!(e.iter().any(|e| e.field.starts_with("podCIDRs") && e.message.contains("169.254.0.0/16")), "{e:?}");
    }

    #[test]
    fn the_address_annotation_works_as_in_gateway_mode() {
        let mut n2 = info(&[(NodeAddressType::Internal, "10.20.144.165"), (NodeAddressType::External, "192.0.2.99")], &["10.245.0.0/24"]);
        n2.gateway_address = Some("192.0.2.99".into());
        let r = resolve_tunnel(&tunnel_view(vec![("n2", n2.clone())]), &ResolveOptions::default(), None, &local());
        assert_eq!(nodes_of(&tunnel_peer("c", &r).unwrap())[0].0, "192.0.2.99");
        let ext = ResolveOptions { address_type: AddressType::ExternalIp, ..ResolveOptions::default() };
        n2.gateway_address = None;
        let r = resolve_tunnel(&tunnel_view(vec![("n2", n2.clone())]), &ext, None, &local());
        assert_eq!(nodes_of(&tunnel_peer("c", &r).unwrap())[0].0, "192.0.2.99");
        // Pointing elsewhere than the node's own addresses leaves that node out, and it alone.
        let n3 = internal("10.20.144.166", &["10.245.1.0/24"]);
        for spoof in ["10.20.144.83", "10.20.144.200", "not an address", &"9".repeat(10_000)] {
            n2.gateway_address = Some(spoof.into());
            let r = resolve_tunnel(&tunnel_view(vec![("n2", n2.clone()), ("n3", n3.clone())]), &ResolveOptions::default(), None, &local());
            assert_eq!(r.skipped.len(), 1, "{spoof}");
            assert!(r.skipped[0].starts_with("node n2: meshnet.io/gateway-address"), "{}", r.skipped[0]);
            assert!(r.skipped[0].len() < 200, "the reason quotes the whole annotation: {}", r.skipped[0].len());
            assert_eq!(nodes_of(&tunnel_peer("c", &r).unwrap()), [("10.20.144.166".into(), vec!["10.245.1.0/24".into()])], "{spoof}");
        }
    }

    #[test]
    fn a_cluster_without_usable_nodes_is_no_peer() {
        let r = resolve_tunnel(&tunnel_view(vec![("n2", internal("127.0.0.2", &["10.245.0.0/24"]))]), &ResolveOptions::default(), None, &local());
        let e = tunnel_peer("c", &r).unwrap_err();
        assert!(e.starts_with("no node is usable for the tunnel: node n2: address refused"), "{e}");
        let r = resolve_tunnel(&tunnel_view(vec![]), &ResolveOptions::default(), None, &local());
        assert!(tunnel_peer("c", &r).unwrap_err().contains("no node has an IPv4 podCIDR"));
    }

    /// `n` nodes 172.16.x.y with a /24 each of 10.64.0.0/10, plus `bad` without a podCIDR.
    fn many(n: u32, bad: u32) -> ClusterView {
        let nodes = (0..n + bad)
            .map(|i| {
                let ip = Ipv4Addr::from(0xac10_0000 + i + 1).to_string();
                let cidr = Ipv4Net::new(Ipv4Addr::from(0x0a40_0000 + (i << 8)), 24).unwrap().to_string();
                let cidrs: &[&str] = if i < n { &[&cidr] } else { &[] };
                (format!("node-{i:05}"), internal(&ip, cidrs))
            })
            .collect::<BTreeMap<_, _>>();
        ClusterView { nodes: std::sync::Arc::new(nodes), ..tunnel_view(vec![]) }
    }

    /// The datapath holds 4,096 tunnel nodes: a cluster with more usable nodes is a problem
    /// (its last good state stays), found without building the whole list; reasons for
    /// skipped nodes stay a handful, however many.
    #[test]
    fn a_huge_node_list_is_bounded() {
        let max = limits::MAX_TUNNEL_NODES;
        let r = resolve_tunnel(&many(max, 0), &ResolveOptions::default(), None, &local());
        let p = tunnel_peer("c", &r).unwrap();
        assert_eq!(p.nodes.len(), max as usize);
        crate::config::validate_peer(&p, &local()).unwrap();
        let r = resolve_tunnel(&many(max + 1, 0), &ResolveOptions::default(), None, &local());
        assert!(tunnel_peer("c", &r).unwrap_err().contains("more than 4096 usable nodes"), "{:?}", r.problems);
        let r = resolve_tunnel(&many(10, 5000), &ResolveOptions::default(), None, &local());
        assert_eq!((r.nodes.len(), r.skipped.len(), r.skipped_count), (10, MAX_REASONS, 5000));
        assert!(r.skipped_summary().unwrap().ends_with("; and 4984 more"));
        // So are 5,000 nodes annotated with an address not their own.
        let mut view = many(5000, 0);
        for n in std::sync::Arc::make_mut(&mut view.nodes).values_mut() {
            n.gateway_address = Some("192.0.2.7".into());
        }
        let r = resolve_tunnel(&view, &ResolveOptions::default(), None, &local());
        assert_eq!((r.nodes.len(), r.skipped.len(), r.skipped_count), (0, MAX_REASONS, 5000));
        let e = tunnel_peer("c", &r).unwrap_err();
        assert!(e.starts_with("no node is usable for the tunnel: node node-00000: meshnet.io/gateway-address") && e.ends_with("; and 4984 more"), "{e}");
        // One address claimed by all of them names a few, not all.
        let mut view = many(5000, 0);
        for n in std::sync::Arc::make_mut(&mut view.nodes).values_mut() {
            n.addresses = vec![(NodeAddressType::Internal, Ipv4Addr::new(172, 16, 0, 1))].into();
        }
        let r = resolve_tunnel(&view, &ResolveOptions::default(), None, &local());
        assert!(r.skipped.iter().all(|s| s.len() < 200 && s.ends_with("and 4996 more")), "{:?}", &r.skipped[..1]);
    }

    /// A remote whose nodes all claim one range, or ranges nested in it, has each of them
    /// refused in one pass: a pair recorded per two claimants, as before, made 134 million
    /// pairs of 4,096 nodes with four nested CIDRs each (gigabytes, a controller OOM-killed at
    /// every publish).
    #[test]
    fn nodes_that_all_claim_one_range_are_refused_in_a_pass() {
        let max = limits::MAX_TUNNEL_NODES;
        let nested: Vec<Ipv4Net> = ["10.64.0.0/16", "10.64.0.0/17", "10.64.0.0/18", "10.64.0.0/19"].iter().map(|c| c.parse().unwrap()).collect();
        let mut view = many(max, 0);
        for (i, n) in std::sync::Arc::make_mut(&mut view.nodes).values_mut().enumerate() {
            n.pod_cidrs = if i % 2 == 0 { nested[..1].into() } else { nested.clone().into() };
        }
        let r = resolve_tunnel(&view, &ResolveOptions::default(), None, &local());
        assert!(r.nodes.is_empty(), "{:?}", r.nodes.iter().next());
        assert_eq!(r.skipped_count, (max as usize / 2) * (1 + nested.len()));
        assert_eq!(r.skipped.len(), MAX_REASONS);
        assert!(r.skipped[0].starts_with("node node-00000: podCIDR 10.64.0.0/16 overlaps node node-00001's 10.64.0.0/"), "{}", r.skipped[0]);
        // One node among others that claim nothing of its range keeps it.
        let mut view = many(max, 0);
        for (i, n) in std::sync::Arc::make_mut(&mut view.nodes).values_mut().enumerate() {
            if i > 0 {
                n.pod_cidrs = ["10.65.0.0/16".parse().unwrap()].into();
            }
        }
        let r = resolve_tunnel(&view, &ResolveOptions::default(), None, &local());
        assert_eq!(r.nodes.len(), 1, "node-00000's own 10.64.0.0/24 stays");
        assert_eq!(r.skipped_count, max as usize - 1);
    }

    /// Whatever the remote's nodes say, what resolve_tunnel makes of them never costs the
    /// peer a node error in the agents' validator: only the cluster-wide pod CIDRs can be
    /// refused (reserved ranges), and the controller's vetting says so.
    #[test]
    fn random_remote_nodes_never_make_an_invalid_node_list() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            u32::try_from(seed % u64::from(n)).unwrap()
        };
        let addrs = ["10.20.144.1", "10.20.144.2", "10.20.144.3", "10.20.144.83", "127.0.0.1", "169.254.1.1", "0.0.0.0", "255.255.255.255", "224.1.1.1", "192.0.2.7"];
        let cidrs = ["10.245.0.0/24", "10.245.0.0/25", "10.245.0.128/25", "10.245.1.0/24", "10.245.0.0/16", "10.0.0.0/8", "10.96.0.0/24", "127.0.0.0/8", "10.245.2.0/30", "10.245.1.7/32"];
        for round in 0..2000 {
            let nodes: Vec<(String, NodeInfo)> = (0..=next(6))
                .map(|i| {
                    let mut cs: Vec<Ipv4Net> = (0..next(4)).map(|_| cidrs[next(10) as usize].parse().unwrap()).collect();
                    cs.sort_unstable();
                    cs.dedup();
                    let node = NodeInfo { pod_cidrs: cs.into(), addresses: [(NodeAddressType::Internal, addrs[next(10) as usize].parse().unwrap())].into(), gateway_address: None };
                    (format!("n{i}"), node)
                })
                .collect();
            let v = ClusterView { nodes: std::sync::Arc::new(nodes.into_iter().collect()), ..tunnel_view(vec![]) };
            let given: Vec<Ipv4Net> = vec!["10.245.0.0/16".parse().unwrap()];
            for pod_cidrs in [None, Some(given.as_slice())] {
                let r = resolve_tunnel(&v, &ResolveOptions::default(), pod_cidrs, &local());
                let Ok(p) = tunnel_peer("c", &r) else { continue };
                if let Err(errors) = crate::config::validate_peer(&p, &local()) {
                    assert!(errors.iter().all(|e| e.field.starts_with("podCIDRs[")), "round {round}: {errors:?}\n{p:?}");
                }
            }
        }
    }

    #[test]
    fn the_mode_flag_wins_over_the_annotation_which_wins_over_the_default() {
        use PeerMode::{Gateway, Tunnel};
        assert_eq!(remote_mode(None, None, Gateway), Ok(Gateway));
        assert_eq!(remote_mode(None, None, Tunnel), Ok(Tunnel));
        assert_eq!(remote_mode(None, Some("tunnel"), Gateway), Ok(Tunnel));
        assert_eq!(remote_mode(None, Some(" gateway "), Tunnel), Ok(Gateway));
        assert_eq!(remote_mode(Some(Gateway), Some("tunnel"), Tunnel), Ok(Gateway));
        // A flag for the remote makes its annotation irrelevant, even a wrong one.
        assert_eq!(remote_mode(Some(Tunnel), Some("bogus"), Gateway), Ok(Tunnel));
        for bad in ["Tunnel", "", "vxlan", "tunnel,gateway"] {
            let e = remote_mode(None, Some(bad), Gateway).unwrap_err();
            assert!(e.starts_with("annotation meshnet.io/mode: ") && e.contains("is neither \"gateway\" nor \"tunnel\""), "{e}");
        }
        let e = remote_mode(None, Some(&"x".repeat(100_000)), Gateway).unwrap_err();
        assert!(e.len() < 200, "{}", e.len());
    }

    #[test]
    fn allow_lists_bound_the_claims() {
        let p = RawPeer { name: "c2".into(), pod_cidrs: vec!["10.245.0.0/24".into(), "10.246.0.0/16".into()], ..RawPeer::default() };
        let allowed: Vec<Ipv4Net> = vec!["10.245.0.0/16".parse().unwrap()];
        assert_eq!(
            outside_allowed(&p, &allowed, "--allowed-cidrs").as_deref(),
            Some(r#"podCIDRs[1]: "10.246.0.0/16" is outside the CIDRs this cluster may claim (10.245.0.0/16; --allowed-cidrs)"#)
        );
        let wide: Vec<Ipv4Net> = vec!["10.244.0.0/14".parse().unwrap()];
        assert_eq!(outside_allowed(&p, &wide, "x"), None);
        assert!(outside_allowed(&p, &[], "x").is_some(), "an empty allow-list allows nothing");
    }

    #[test]
    fn missing_service_or_port_is_explained() {
        let mut v = view();
        v.service = None;
        assert!(peer("c", &resolve(&v, &ResolveOptions::default(), None)).unwrap_err().contains("Service istio-eastwestgateway not found"));
        let other = ResolveOptions { gateway_port_name: "mtls".into(), ..ResolveOptions::default() };
        assert!(peer("c", &resolve(&view(), &other, None)).unwrap_err().contains("no nodePort for port \"mtls\""));
    }

    #[test]
    fn overlapping_and_default_routes_are_refused() {
        let p = |name: &str, cidr: &str| RawPeer { name: name.into(), pod_cidrs: vec![cidr.into()], ..RawPeer::default() };
        let (kept, refused) = refuse_overlaps(
            vec![p("a", "10.245.0.0/16"), p("b", "10.245.1.0/24"), p("d", "0.0.0.0/0"), p("e", "10.246.0.0/16")],
            &[&p("b", "10.245.1.0/24")],
        );
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["b", "e"]);
        assert_eq!(refused["a"], "claims 10.245.0.0/16, which overlaps 10.245.1.0/24 of peer b, published with it before");
        assert_eq!(refused["d"], "claims 0.0.0.0/0, all of IPv4");
    }

    /// One local Node is one object: a kubelet writes its addresses, a typo makes its
    /// podCIDRs. Whatever it claims, a peer keeps what it was published with (the clash is
    /// noted); what no record holds is refused, naming the Node; and a peer cannot widen its
    /// claim over a real Node's pods because some other Node claims everything.
    #[test]
    fn a_local_node_cannot_take_what_a_published_peer_holds() {
        let peer = |cidr: &str, gw: &str| RawPeer {
            name: "west".into(),
            pod_cidrs: vec![cidr.into()],
            gateways: vec![RawGateway { address: gw.into(), port: 31674, udp_port: None }],
            ..RawPeer::default()
        };
        let node = |name: &str, cidrs: &[&str], addrs: &[&str]| LocalNode {
            name: name.into(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        };
        let record = peer("10.245.0.0/16", "10.20.144.165");
        let real = node("node1", &["10.244.0.0/24"], &["10.20.144.160"]);
        // Half of IPv4 as pod CIDRs, and the peer's gateway and a pod address as its own.
        let rogue = node("rogue", &["0.0.0.0/1"], &["10.20.144.165", "10.245.3.3"]);
        let local = [real.clone(), rogue.clone()];
        let kept = against_local(&record, &local, Some(&record)).unwrap();
        assert_eq!(
            kept,
            [
                "node rogue lists 10.20.144.165 among its addresses",
                "node rogue lists 10.245.3.3 among its addresses",
                "node rogue's pod CIDR 0.0.0.0/1 overlaps 10.20.144.165/32",
                "node rogue's pod CIDR 0.0.0.0/1 overlaps 10.245.0.0/16",
            ]
        );
        // Only what the record held as a node address is excused as one: a pod address of the
        // peer that a local Node lists is no node of the peer's.
        let unheld = unheld_addresses(&local, Some(&record));
        assert!(unheld == BTreeSet::from(["10.20.144.160".parse().unwrap(), "10.245.3.3".parse().unwrap()]), "{unheld:?}");
        // Never published: refused, naming the Node.
        assert_eq!(against_local(&record, &local, None).unwrap_err(), "claims 10.245.0.0/16, which overlaps 0.0.0.0/1 of the local cluster (node rogue)");
        assert_eq!(unheld_addresses(&local, None).len(), 3);
        // Widened over the real Node's pods: refused, though the rogue Node's claim is excused.
        let wider = peer("10.244.0.0/15", "10.20.144.165");
        assert_eq!(against_local(&wider, &local, Some(&record)).unwrap_err(), "claims 10.244.0.0/15, which overlaps 10.244.0.0/24 of the local cluster (node node1)");
        // A new gateway at a real Node's address: refused.
        let moved = peer("10.245.0.0/16", "10.20.144.160");
        assert_eq!(against_local(&moved, &[real], Some(&record)).unwrap_err(), "10.20.144.160 is an address of node node1 of the local cluster");
        // A gateway moved to the address a local Node lists inside the peer's held pods: the
        // record held a CIDR there, not that node, so it is refused.
        let into = peer("10.245.0.0/16", "10.245.3.3");
        assert_eq!(against_local(&into, &[rogue], Some(&record)).unwrap_err(), "node address 10.245.3.3 lies in 0.0.0.0/1, the local cluster's pods (node rogue)");
        // Having held a part of a Node's CIDR, a claim over the whole of it is refused.
        let part = peer("10.246.0.0/25", "10.20.144.165");
        let wide = peer("10.246.0.0/23", "10.20.144.165");
        let late = [node("late", &["10.246.0.0/24"], &[])];
        assert!(against_local(&part, &late, Some(&part)).is_ok());
        assert_eq!(against_local(&wide, &late, Some(&part)).unwrap_err(), "claims 10.246.0.0/23, which overlaps 10.246.0.0/24 of the local cluster (node late)");
        // Without a clash, nothing to note.
        assert_eq!(against_local(&record, &[], Some(&record)), Ok(vec![]));
    }

    /// The sweep finds exactly the pairs of sets that a comparison of every two claims finds,
    /// and each pair's claims collide.
    #[test]
    fn the_sweep_finds_every_colliding_pair() {
        let mut seed: u32 = 0x1234_5678;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..200 {
            let sets: Vec<Vec<Claim>> = (0..6)
                .map(|_| {
                    (0..(next() % 6))
                        .map(|_| {
                            // Addresses in a small space, so that collisions are common.
                            let a = Ipv4Addr::from(0x0a00_0000 | (next() & 0xffff));
                            if next() % 3 == 0 { Claim::Node(a) } else { Claim::Cidr(Ipv4Net::new(a, 16 + (next() % 17) as u8).unwrap().trunc()) }
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[Claim]> = sets.iter().map(Vec::as_slice).collect();
            let found = first_collisions(&refs);
            let mut naive = BTreeSet::new();
            for i in 0..sets.len() {
                for j in i + 1..sets.len() {
                    if sets[i].iter().any(|x| sets[j].iter().any(|y| x.collides(*y))) {
                        naive.insert((i, j));
                    }
                }
            }
            assert_eq!(found.keys().copied().collect::<BTreeSet<_>>(), naive);
            for ((i, j), (x, y)) in &found {
                assert!(x.collides(*y) && sets[*i].iter().any(|c| c.net() == x.net()) && sets[*j].iter().any(|c| c.net() == y.net()));
            }
        }
    }

    /// A remote's claims cannot take what another peer was published with, whatever the names:
    /// not by sorting first, not by widening its own claim over the other's. Two newcomers
    /// that claim the same addresses are both refused: nothing tells which one is right.
    #[test]
    fn a_published_peer_keeps_its_cidrs_against_any_claim() {
        let p = |name: &str, cidrs: &[&str]| RawPeer { name: name.into(), pod_cidrs: cidrs.iter().map(|c| (*c).into()).collect(), ..RawPeer::default() };
        let records = [p("prod-west", &["10.246.0.0/16", "10.249.0.0/16"]), p("edge", &["10.250.0.0/16"])];
        let published: Vec<&RawPeer> = records.iter().collect();
        // "aaa" sorts first and claims part of prod-west's CIDRs; "edge" widens over another.
        let west = p("prod-west", &["10.246.0.0/16", "10.249.0.0/16"]);
        let (kept, refused) =
            refuse_overlaps(vec![p("aaa", &["10.249.5.0/24"]), p("edge", &["10.250.0.0/16", "10.246.0.0/15"]), west.clone()], &published);
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["prod-west"]);
        assert_eq!(refused["aaa"], "claims 10.249.5.0/24, which overlaps 10.249.0.0/16 of peer prod-west, published with it before");
        assert_eq!(refused["edge"], "claims 10.246.0.0/15, which overlaps 10.246.0.0/16 of peer prod-west, published with it before");
        // Two newcomers with the same CIDR: both refused, and a third peer is untouched.
        let (kept, refused) = refuse_overlaps(vec![p("new-a", &["10.247.0.0/16"]), p("new-b", &["10.247.0.0/24"]), west], &published);
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["prod-west"]);
        assert!(refused["new-a"].contains("of peer new-b; neither was published with it before"), "{refused:?}");
        assert!(refused["new-b"].contains("of peer new-a; neither was published with it before"), "{refused:?}");
    }

    /// A peer's record holds each claim as what it was: a gateway published at another peer's
    /// gateway address (two node addresses never collide) holds that node, not a pod CIDR
    /// over it. Else the copy, then a /32 pod CIDR on it, would refuse both and withdraw the
    /// rightful peer from every node.
    #[test]
    fn a_node_address_held_in_common_holds_no_cidr_over_it() {
        let peer = |name: &str, cidrs: &[&str], gw: &str| RawPeer {
            name: name.into(),
            pod_cidrs: cidrs.iter().map(|c| (*c).into()).collect(),
            gateways: vec![RawGateway { address: gw.into(), port: 31674, udp_port: None }],
            ..RawPeer::default()
        };
        let west = peer("west", &["10.245.0.0/16"], "10.20.144.165");
        // Sorts first, and copies west's gateway address: nothing collides, both are published.
        let copy = peer("aaa", &["10.250.0.0/16"], "10.20.144.165");
        let (kept, refused) = refuse_overlaps(vec![copy.clone(), west.clone()], &[&west]);
        assert_eq!(kept.len(), 2, "{refused:?}");
        // Then claims that address as a pod CIDR too, its record holding the node address.
        let over = peer("aaa", &["10.250.0.0/16", "10.20.144.165/32"], "10.20.144.165");
        let (kept, refused) = refuse_overlaps(vec![over.clone(), west.clone()], &[&copy, &west]);
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["west"], "{refused:?}");
        assert_eq!(refused["aaa"], "claims 10.20.144.165/32, which holds 10.20.144.165, a node address of peer west, published with it before");
        // The same against west's record while west is not a candidate.
        let (kept, refused) = refuse_overlaps(vec![over], &[&copy, &west]);
        assert!(kept.is_empty());
        assert_eq!(
            refused["aaa"],
            "claims 10.20.144.165/32, which holds 10.20.144.165, a node address of peer west, published with it before (not published now)"
        );
        // A pod CIDR is still held by a held CIDR over any of it: widened, aaa keeps its claim
        // against a newcomer's yet wider one.
        let wide = peer("aaa", &["10.250.0.0/15"], "10.20.144.170");
        let (kept, refused) = refuse_overlaps(vec![wide, peer("zzz", &["10.248.0.0/14"], "10.20.144.171")], &[&copy]);
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["aaa"]);
        assert_eq!(refused["zzz"], "claims 10.248.0.0/14, which overlaps 10.250.0.0/15 of peer aaa, published with it before");
        // A node address is held only as itself, not by a pod CIDR the record held around it.
        let moved = peer("west", &["10.246.0.0/16"], "10.245.3.3");
        let (kept, refused) = refuse_overlaps(vec![moved, peer("new", &["10.245.3.0/24"], "10.20.144.172")], &[&west]);
        assert!(kept.is_empty(), "{refused:?}");
        assert_eq!(refused["west"], "node address 10.245.3.3 lies in 10.245.3.0/24 of peer new; neither was published with it before, so neither is");
    }

    #[test]
    fn mesh_networks_round_trip_and_peers() {
        let seed = "networks:\n  network1:\n    endpoints:\n      - fromRegistry: cluster1\n    gateways:\n      - address: 10.20.144.83\n        port: 31674\n  network3:\n    endpoints:\n      - fromCidr: 10.250.0.0/16\n    gateways:\n      - address: 10.20.144.170\n        port: 30443\n";
        let m = MeshNetworks::parse(seed).unwrap();
        assert_eq!(MeshNetworks::parse(&m.to_yaml()).unwrap(), m);
        let peers = m.peers(Some("network1"));
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].name, "network3");
        assert_eq!(peers[0].pod_cidrs, ["10.250.0.0/16"]);
    }

    #[test]
    fn one_malformed_network_spoils_only_itself() {
        let text = "networks:\n  bad:\n    endpoints: {fromCidr: 10.1.0.0/16}\n    gateways: [{address: 10.20.144.1, port: high}]\n  good:\n    endpoints: [{fromCidr: 10.250.0.0/16}]\n    gateways: [{address: 10.20.144.170, port: 30443}]\n  hostname:\n    endpoints: [{fromCidr: 10.251.0.0/16}]\n    gateways: [{address: gw.example.com, port: 70000}]\n";
        let (m, broken) = MeshNetworks::parse_each(text).unwrap();
        assert_eq!(broken.keys().collect::<Vec<_>>(), ["bad"]);
        // The hostname network parses; the validator refuses it (see the controller).
        let names: Vec<String> = m.peers(None).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["good", "hostname"]);
        assert!(MeshNetworks::parse_each("networks: [1, 2]").is_err());
        // Anchors as Istio accepts them pass; an alias bomb does not.
        let aliased = "networks:\n  a: &n {endpoints: [{fromRegistry: a}], gateways: [{address: 192.0.2.1, port: 15443}]}\n  b: *n\n";
        assert_eq!(MeshNetworks::parse_each(aliased).unwrap().0.networks.len(), 2);
        let bomb = format!("networks: {{}}\nx:\n{}", crate::yaml::alias_bomb().replace("- ", "  - "));
        assert!(matches!(MeshNetworks::parse_each(&bomb), Err(MeshNetworksError::Refused(_))));
        assert!(matches!(MeshNetworks::parse(&bomb), Err(MeshNetworksError::Refused(_))));
    }
}
