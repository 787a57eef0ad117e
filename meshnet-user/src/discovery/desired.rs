//! What the controller publishes, decided by one pure function of what it watches. The
//! controller applies the result (writes, logs, counters, its memory of each peer's last good
//! state); nothing here has an effect, so every rule is shown by the golden tests below.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;

use super::{
    published::PeerStatus,
    resolve::{self, ClusterView, MeshNetworks, ResolveOptions, ALLOWED_CIDRS_ANNOTATION},
};
use crate::config::{self, RawPeer, Reserved};

/// What the controller knows of one remote cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoteInput<'a> {
    /// Its last complete view; `None` before its watches synced.
    pub view: Option<&'a ClusterView>,
    /// Its API server is failing: its view is not to be trusted now.
    pub stale: bool,
    pub error: Option<&'a str>,
    /// Why the remote is refused as a whole (its kubeconfig, ...).
    pub refused: Option<&'a str>,
    /// Its remote secret's pod CIDR override.
    pub pod_cidrs: Option<&'a [Ipv4Net]>,
    /// Its remote secret's allow-list annotation; `Err` when unreadable, which refuses.
    pub allowed: Option<&'a Result<Vec<Ipv4Net>, String>>,
}

/// Everything the published state depends on.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub remotes: &'a BTreeMap<String, RemoteInput<'a>>,
    pub resolve: &'a ResolveOptions,
    /// `--pod-cidrs`, by peer: wins over the secret's annotation and the nodes.
    pub pod_cidrs: &'a BTreeMap<String, Vec<Ipv4Net>>,
    /// `--allowed-cidrs`, by peer: wins over the secret's annotation.
    pub allowed_cidrs: &'a BTreeMap<String, Vec<Ipv4Net>>,
    pub reserved: &'a Reserved,
    /// This cluster's pod CIDRs: no peer may overlap them.
    pub local_cidrs: &'a [Ipv4Net],
    /// Istio's ConfigMap, for networks written by hand in its `meshNetworks`.
    pub istio: Option<&'a ConfigMap>,
    /// The last good peer of each remote, published while it is stale or unresolvable.
    pub last_good: &'a BTreeMap<String, RawPeer>,
}

/// What to publish, and what the controller remembers and reports about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// `peers.yaml`, sorted by name.
    pub peers: Vec<RawPeer>,
    /// `status.yaml`.
    pub status: BTreeMap<String, PeerStatus>,
    /// The peers resolved from a live view now: each becomes its remote's last good state.
    pub resolved: BTreeMap<String, RawPeer>,
    /// Every refused peer, and why.
    pub refused: BTreeMap<String, String>,
    /// Inputs wrong as a whole, not as one peer (an unreadable `meshNetworks`).
    pub warnings: Vec<String>,
}

/// Why `p` must not be published, if it must not: the agent's own validator (so that no agent
/// ever receives a peer it would refuse), then the cluster's allow-list.
fn vet(
    p: &RawPeer,
    flag: Option<&Vec<Ipv4Net>>,
    annotation: Option<&Result<Vec<Ipv4Net>, String>>,
    reserved: &Reserved,
) -> Option<String> {
    if let Err(errors) = config::validate_peer(p, reserved) {
        return Some(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
    }
    if let Some(list) = flag {
        return resolve::outside_allowed(p, list, "--allowed-cidrs");
    }
    match annotation {
        Some(Ok(list)) => resolve::outside_allowed(p, list, &format!("annotation {ALLOWED_CIDRS_ANNOTATION}")),
        Some(Err(e)) => Some(format!("annotation {ALLOWED_CIDRS_ANNOTATION}: {e}")),
        None => None,
    }
}

/// The published state for `i`.
#[must_use]
pub fn desired(i: &Inputs<'_>) -> Desired {
    let mut d = Desired::default();
    let mut peers = Vec::new();
    for (name, r) in i.remotes {
        let mut st = PeerStatus { stale: r.stale, refused: r.refused.map(str::to_owned), error: r.error.map(str::to_owned) };
        if r.refused.is_some() {
            d.status.insert(name.clone(), st);
            continue;
        }
        let allowed = i.allowed_cidrs.get(name);
        let cidrs = i.pod_cidrs.get(name).map(Vec::as_slice).or(r.pod_cidrs);
        let resolved = r.view.filter(|_| !r.stale).map(|v| resolve::resolve(v, i.resolve, cidrs));
        if let Some(why) = resolved.as_ref().filter(|x| !x.refusals.is_empty()).map(|x| x.refusals.join("; ")) {
            d.refused.insert(name.clone(), why);
            d.status.insert(name.clone(), st);
            continue;
        }
        match resolved.map(|x| resolve::peer(name, &x)) {
            Some(Ok(p)) => {
                if let Some(why) = vet(&p, allowed, r.allowed, i.reserved) {
                    d.refused.insert(name.clone(), why);
                } else {
                    d.resolved.insert(name.clone(), p.clone());
                    peers.push(p);
                }
            }
            other => {
                if let Some(Err(problem)) = other {
                    st.error = Some(problem);
                }
                // A stale or unresolvable peer keeps its last known state, if today's rules
                // still pass it.
                if let Some(p) = i.last_good.get(name) {
                    st.stale = true;
                    match vet(p, allowed, r.allowed, i.reserved) {
                        Some(why) => {
                            d.refused.insert(name.clone(), why);
                        }
                        None => peers.push(p.clone()),
                    }
                }
            }
        }
        d.status.insert(name.clone(), st);
    }
    // Networks written by hand in Istio's meshNetworks, for clusters without a secret.
    if let Some(cm) = i.istio {
        let text = cm.data.as_ref().and_then(|d| d.get("meshNetworks")).cloned().unwrap_or_default();
        let (mn, broken) = MeshNetworks::parse_each(&text).unwrap_or_else(|e| {
            d.warnings.push(format!("istio ConfigMap: meshNetworks is not valid YAML; ignoring it: {e}"));
            (MeshNetworks::default(), BTreeMap::new())
        });
        for (name, why) in broken {
            d.status.entry(name.clone()).or_default();
            d.refused.insert(name, format!("meshNetworks: {why}"));
        }
        for p in mn.peers(None) {
            let discovered = peers.iter().any(|q| q.name == p.name) || i.remotes.contains_key(&p.name);
            let local_network = p
                .pod_cidrs
                .iter()
                .filter_map(|c| c.parse::<Ipv4Net>().ok())
                .any(|n| i.local_cidrs.iter().any(|l| l.contains(&n) || n.contains(l)));
            if discovered || local_network {
                continue;
            }
            d.status.entry(p.name.clone()).or_default();
            match vet(&p, None, None, i.reserved) {
                Some(why) => {
                    d.refused.insert(p.name.clone(), format!("meshNetworks: {why}"));
                }
                None => peers.push(p),
            }
        }
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let (kept, overlapping) = resolve::refuse_overlaps(i.local_cidrs, peers);
    d.refused.extend(overlapping);
    // A peer refused for an overlap is no one's last good state.
    d.resolved.retain(|name, _| !d.refused.contains_key(name));
    for (name, why) in &d.refused {
        d.status.entry(name.clone()).or_default().refused = Some(why.clone());
    }
    d.peers = kept;
    d
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, sync::Arc};

    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, Endpoints, Service, ServicePort, ServiceSpec};

    use super::*;
    use crate::{
        config::RawGateway,
        discovery::resolve::{NodeAddressType, NodeInfo},
    };

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// A remote whose gateway runs on one node of `addr`, NodePort 32361, pods in `cidr`.
    fn view(addr: &str, cidr: &str) -> ClusterView {
        let node = NodeInfo {
            pod_cidrs: [net(cidr)].into(),
            addresses: [(NodeAddressType::Internal, addr.parse().unwrap())].into(),
            gateway_address: None,
        };
        let ports = vec![ServicePort { name: Some("tls".into()), port: 15443, node_port: Some(32361), ..ServicePort::default() }];
        ClusterView {
            nodes: Arc::new([("gw".to_string(), node)].into()),
            service: Some(Service { spec: Some(ServiceSpec { ports: Some(ports), ..ServiceSpec::default() }), ..Service::default() }),
            endpoints: Some(Endpoints {
                subsets: Some(vec![EndpointSubset {
                    addresses: Some(vec![EndpointAddress { ip: "10.0.0.1".into(), node_name: Some("gw".into()), ..EndpointAddress::default() }]),
                    ..EndpointSubset::default()
                }]),
                ..Endpoints::default()
            }),
        }
    }

    fn peer(name: &str, addr: &str, cidr: &str) -> RawPeer {
        RawPeer { name: name.into(), pod_cidrs: vec![cidr.into()], gateways: vec![RawGateway { address: addr.into(), port: 32361, udp_port: None }], ..RawPeer::default() }
    }

    fn istio(mesh_networks: &str) -> ConfigMap {
        ConfigMap { data: Some([("meshNetworks".to_string(), mesh_networks.to_string())].into()), ..ConfigMap::default() }
    }

    /// Runs `desired` on a cluster with pods in 10.244.0.0/16, Services in 10.96.0.0/12 and a
    /// node at 10.20.144.160, and renders the result as the golden files hold it.
    fn render(remotes: &BTreeMap<String, RemoteInput<'_>>, istio: Option<&ConfigMap>, last_good: &[RawPeer], flags: &[(&str, &str)]) -> String {
        let reserved = Reserved {
            service_cidrs: vec![net("10.96.0.0/12")],
            local_addresses: BTreeSet::from(["10.20.144.160".parse().unwrap()]),
        };
        let allowed_cidrs = flags.iter().map(|(n, c)| ((*n).to_string(), vec![net(c)])).collect();
        let last_good = last_good.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let i = Inputs {
            remotes,
            resolve: &ResolveOptions::default(),
            pod_cidrs: &BTreeMap::new(),
            allowed_cidrs: &allowed_cidrs,
            reserved: &reserved,
            local_cidrs: &[net("10.244.0.0/16")],
            istio,
            last_good: &last_good,
        };
        let d = desired(&i);
        assert_eq!(d, desired(&i), "the same inputs gave two answers");
        serde_yaml::to_string(&d).unwrap()
    }

    #[test]
    fn live_remotes_are_published_and_become_last_good() {
        let (a, b) = (view("10.20.144.165", "10.245.0.0/24"), view("10.20.144.175", "10.254.0.0/16"));
        let remotes = [
            ("cluster2".to_string(), RemoteInput { view: Some(&a), ..RemoteInput::default() }),
            ("cluster3".to_string(), RemoteInput { view: Some(&b), ..RemoteInput::default() }),
        ]
        .into();
        crate::golden::check("desired_live.yaml", &render(&remotes, None, &[], &[]));
    }

    /// A failing API server or a remote that cannot resolve now keeps its last good state,
    /// marked stale, and a remote never seen alive publishes nothing.
    #[test]
    fn stale_and_unresolvable_remotes_keep_their_last_good_state() {
        let a = view("10.20.144.165", "10.245.0.0/24");
        let mut broken = view("10.20.144.175", "10.254.0.0/16");
        broken.service = None;
        let remotes = [
            ("failing".to_string(), RemoteInput { view: Some(&a), stale: true, error: Some("connection refused"), ..RemoteInput::default() }),
            ("unresolvable".to_string(), RemoteInput { view: Some(&broken), ..RemoteInput::default() }),
            ("new".to_string(), RemoteInput { stale: true, ..RemoteInput::default() }),
        ]
        .into();
        let last_good = [peer("failing", "10.20.144.165", "10.245.0.0/24"), peer("unresolvable", "10.20.144.175", "10.254.0.0/16")];
        crate::golden::check("desired_stale.yaml", &render(&remotes, None, &last_good, &[]));
    }

    /// Each refusal stops one peer and says why; the others are published.
    #[test]
    fn refusals_stop_one_peer_each() {
        let good = view("10.20.144.165", "10.245.0.0/24");
        let metadata = view("10.20.144.166", "169.254.169.254/32");
        let local = view("10.20.144.167", "10.244.5.0/24");
        let wide = view("10.20.144.168", "10.246.0.0/16");
        let unreadable: Result<Vec<Ipv4Net>, String> = Err("\"x\" is not a CIDR".into());
        let mut spoofed = view("10.20.144.169", "10.247.0.0/16");
        Arc::make_mut(&mut spoofed.nodes).get_mut("gw").unwrap().gateway_address = Some("10.20.144.160".into());
        let remotes = [
            ("good".to_string(), RemoteInput { view: Some(&good), ..RemoteInput::default() }),
            ("kubeconfig".to_string(), RemoteInput { view: Some(&good), refused: Some("users[0].user.exec is not allowed"), ..RemoteInput::default() }),
            ("metadata".to_string(), RemoteInput { view: Some(&metadata), ..RemoteInput::default() }),
            ("overlaps-local".to_string(), RemoteInput { view: Some(&local), ..RemoteInput::default() }),
            ("outside-flag".to_string(), RemoteInput { view: Some(&wide), ..RemoteInput::default() }),
            ("unreadable-allow-list".to_string(), RemoteInput { view: Some(&wide), allowed: Some(&unreadable), ..RemoteInput::default() }),
            ("spoofed-gateway".to_string(), RemoteInput { view: Some(&spoofed), ..RemoteInput::default() }),
        ]
        .into();
        crate::golden::check("desired_refused.yaml", &render(&remotes, None, &[], &[("outside-flag", "10.246.0.0/24")]));
    }

    /// Hand-written meshNetworks entries are published for clusters without a secret, one bad
    /// entry spoils only itself, and a discovered cluster or this cluster's own network wins.
    #[test]
    fn mesh_networks_entries_stand_alone() {
        let a = view("10.20.144.165", "10.245.0.0/24");
        let remotes = [("cluster2".to_string(), RemoteInput { view: Some(&a), ..RemoteInput::default() })].into();
        let cm = istio(
            "networks:\n  \
               cluster2: {endpoints: [{fromCidr: 10.99.0.0/16}], gateways: [{address: 192.0.2.1, port: 31000}]}\n  \
               network1: {endpoints: [{fromCidr: 10.244.0.0/16}], gateways: [{address: 10.20.144.160, port: 31000}]}\n  \
               hand: {endpoints: [{fromCidr: 10.250.0.0/16}], gateways: [{address: 10.20.144.185, port: 30443}]}\n  \
               hostname: {endpoints: [{fromCidr: 10.251.0.0/16}], gateways: [{address: gw.example.com, port: 30443}]}\n",
        );
        crate::golden::check("desired_mesh_networks.yaml", &render(&remotes, Some(&cm), &[], &[]));
        let bad = istio("networks: [");
        let out = render(&remotes, Some(&bad), &[], &[]);
        assert!(out.contains("meshNetworks is not valid YAML"), "{out}");
        assert!(out.contains("name: cluster2"), "an unreadable meshNetworks cost a discovered peer:\n{out}");
    }
}
