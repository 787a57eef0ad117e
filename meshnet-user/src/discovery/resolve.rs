//! From Kubernetes objects to meshnet peers and Istio `meshNetworks`: the pure part of
//! discovery, tested without an API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use serde::{Deserialize, Serialize};

use crate::config::{RawGateway, RawPeer};

/// Node annotation that overrides the address a gateway on that node is reached at.
pub const ADDRESS_ANNOTATION: &str = "meshnet.io/gateway-address";
/// Remote-secret annotation that overrides a remote cluster's pod CIDRs (comma-separated), for
/// CNIs that do not use node podCIDRs.
pub const POD_CIDRS_ANNOTATION: &str = "meshnet.io/pod-cidrs";
/// Remote-secret annotation that limits the pod CIDRs a remote cluster may claim
/// (comma-separated); a claim outside it refuses the peer.
pub const ALLOWED_CIDRS_ANNOTATION: &str = "meshnet.io/allowed-cidrs";
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
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            gateway_service: "istio-eastwestgateway".into(),
            gateway_port_name: "tls".into(),
            address_type: AddressType::InternalIp,
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

impl From<Node> for NodeInfo {
    fn from(node: Node) -> Self {
        let spec = node.spec.unwrap_or_default();
        let mut pod_cidrs: Vec<Ipv4Net> =
            spec.pod_cidrs.into_iter().flatten().chain(spec.pod_cidr).filter_map(|c| c.parse::<Ipv4Net>().ok()).map(|n| n.trunc()).collect();
        pod_cidrs.sort_unstable();
        pod_cidrs.dedup();
        let addresses = node
            .status
            .and_then(|s| s.addresses)
            .into_iter()
            .flatten()
            .filter_map(|a| {
                let ty = match a.type_.as_str() {
                    "InternalIP" => NodeAddressType::Internal,
                    "ExternalIP" => NodeAddressType::External,
                    _ => NodeAddressType::Other,
                };
                Some((ty, a.address.parse().ok()?))
            })
            .collect();
        let gateway_address = node.metadata.annotations.and_then(|mut a| a.remove(ADDRESS_ANNOTATION)).map(String::into_boxed_str);
        NodeInfo { pod_cidrs: pod_cidrs.into(), addresses, gateway_address }
    }
}

/// What discovery read from one cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Shared with the watch that keeps it (see watch.rs).
    pub nodes: std::sync::Arc<BTreeMap<String, NodeInfo>>,
    pub service: Option<Service>,
    pub endpoints: Option<Endpoints>,
}

/// A cluster's pod CIDRs, gateway NodePort and gateway addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub pod_cidrs: Vec<Ipv4Net>,
    pub port: Option<u16>,
    pub addresses: Vec<Ipv4Addr>,
    /// Why something could not be resolved.
    pub problems: Vec<String>,
    /// Why the cluster must not become a peer at all (it claims what it may not).
    pub refusals: Vec<String>,
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

/// The address a gateway on node `name` is reached at, or why the node's annotation is
/// refused: whoever can annotate a remote Node must not be able to point traffic anywhere,
/// so the annotation may only pick one of the node's own addresses.
fn node_address(name: &str, node: &NodeInfo, ty: AddressType) -> Result<Option<Ipv4Addr>, String> {
    if let Some(a) = &node.gateway_address {
        let own = node_addresses(node);
        let listed = own.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        return match a.trim().parse::<Ipv4Addr>() {
            Ok(addr) if own.contains(&addr) => Ok(Some(addr)),
            Ok(_) => Err(format!("gateways: node {name}'s {ADDRESS_ANNOTATION} {a:?} is not one of its addresses ({listed})")),
            Err(_) => Err(format!("gateways: node {name}'s {ADDRESS_ANNOTATION} {a:?} is not an IPv4 address")),
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
        match view.nodes.get(name).map(|n| node_address(name, n, opts.address_type)) {
            Some(Ok(Some(a))) => r.addresses.push(a),
            Some(Err(why)) => r.refusals.push(why),
            Some(Ok(None)) | None => r.problems.push(format!("node {name} has no {} address", opts.address_type.kube_name())),
        }
    }
    r.addresses.sort_unstable();
    r.addresses.dedup();
    if r.addresses.is_empty() {
        r.problems.push(format!("no ready endpoint of Service {} on a known node", opts.gateway_service));
    }
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

/// Why `peer` claims pod CIDRs outside `allowed` (the remote's allow-list), if it does.
#[must_use]
pub fn outside_allowed(peer: &RawPeer, allowed: &[Ipv4Net], source: &str) -> Option<String> {
    let list = allowed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    peer.pod_cidrs.iter().enumerate().find_map(|(i, c)| {
        let inside = c.parse::<Ipv4Net>().is_ok_and(|n| allowed.iter().any(|a| a.contains(&n)));
        (!inside).then(|| format!("podCIDRs[{i}]: {c:?} is outside the CIDRs this cluster may claim ({list}; {source})"))
    })
}

/// Drops peers whose CIDRs overlap the local ones, an earlier peer's (by name), or cover
/// everything. Returns the kept peers and, for each refused one, why.
#[must_use]
pub fn refuse_overlaps(local: &[Ipv4Net], peers: Vec<RawPeer>) -> (Vec<RawPeer>, BTreeMap<String, String>) {
    let mut claimed: Vec<(Ipv4Net, String)> = local.iter().map(|n| (*n, "the local cluster".to_string())).collect();
    let mut kept = Vec::new();
    let mut refused = BTreeMap::new();
    'peers: for p in peers {
        let nets: Vec<Ipv4Net> = p.pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        for n in &nets {
            if n.prefix_len() == 0 {
                refused.insert(p.name.clone(), format!("claims {n}, all of IPv4"));
                continue 'peers;
            }
            if let Some((o, owner)) = claimed.iter().find(|(o, _)| o.contains(n) || n.contains(o)) {
                refused.insert(p.name.clone(), format!("claims {n}, which overlaps {o} of {owner}"));
                continue 'peers;
            }
        }
        claimed.extend(nets.into_iter().map(|n| (n, format!("peer {}", p.name))));
        kept.push(p);
    }
    (kept, refused)
}

/// Istio's `meshNetworks`, in the shape of the `istio` ConfigMap's key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshNetworks {
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    #[serde(default)]
    pub endpoints: Vec<NetworkEndpoint>,
    #[serde(default)]
    pub gateways: Vec<NetworkGateway>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkGateway {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_service_name: Option<String>,
    pub port: u32,
}

impl MeshNetworks {
    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text)
    }

    /// Parses network by network: one entry of the wrong shape (a string port, a list where
    /// a map belongs) is returned with why, and the others still count.
    pub fn parse_each(text: &str) -> Result<(Self, BTreeMap<String, String>), serde_yaml::Error> {
        #[derive(Deserialize)]
        struct Loose {
            #[serde(default)]
            networks: BTreeMap<String, serde_yaml::Value>,
        }
        if text.trim().is_empty() {
            return Ok((Self::default(), BTreeMap::new()));
        }
        let loose: Loose = serde_yaml::from_str(text)?;
        let mut out = Self::default();
        let mut broken = BTreeMap::new();
        for (name, v) in loose.networks {
            match serde_yaml::from_value::<Network>(v) {
                Ok(n) => {
                    out.networks.insert(name, n);
                }
                Err(e) => {
                    broken.insert(name, e.to_string());
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
                    .map(|a| NetworkGateway { address: Some(a.to_string()), registry_service_name: None, port: u32::from(port) })
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
        assert!(r.refusals.is_empty());
        let ext = ResolveOptions { address_type: AddressType::ExternalIp, ..ResolveOptions::default() };
        let r = resolve(&view(), &ext, None);
        assert!(r.addresses.is_empty());
        assert!(peer("c", &r).unwrap_err().contains("no ExternalIP address"));
    }

    /// Whoever can annotate a remote Node must not be able to point the gateway anywhere.
    #[test]
    fn annotation_outside_the_nodes_addresses_refuses_the_cluster() {
        for (value, why) in [
            ("169.254.169.254", r#"gateways: node n2's meshnet.io/gateway-address "169.254.169.254" is not one of its addresses (10.20.144.165)"#),
            ("10.20.144.166", r#"gateways: node n2's meshnet.io/gateway-address "10.20.144.166" is not one of its addresses (10.20.144.165)"#),
            ("gw.example.com", r#"gateways: node n2's meshnet.io/gateway-address "gw.example.com" is not an IPv4 address"#),
        ] {
            let mut v = view();
            std::sync::Arc::make_mut(&mut v.nodes).get_mut("n2").unwrap().gateway_address = Some(value.into());
            let r = resolve(&v, &ResolveOptions::default(), None);
            assert_eq!(r.refusals, [why], "{value}");
            assert!(r.addresses.is_empty(), "{value}");
        }
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
            &["10.244.0.0/16".parse().unwrap()],
            vec![p("a", "10.245.0.0/16"), p("b", "10.245.1.0/24"), p("c", "10.244.5.0/24"), p("d", "0.0.0.0/0"), p("e", "10.246.0.0/16")],
        );
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "e"]);
        assert_eq!(refused["b"], "claims 10.245.1.0/24, which overlaps 10.245.0.0/16 of peer a");
        assert_eq!(refused["c"], "claims 10.244.5.0/24, which overlaps 10.244.0.0/16 of the local cluster");
        assert_eq!(refused["d"], "claims 0.0.0.0/0, all of IPv4");
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
    }
}
