//! `meshnet mesh-networks`: Istio's `meshNetworks` for the whole mesh, from discovery, so
//! that nobody hand-edits gateway node IPs and NodePorts in every cluster again. Remote
//! clusters in tunnel mode get no entry: with them Istio runs as one network.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Namespace, Secret, Service};
use kube::{
    api::{ListParams, PostParams},
    Api, Client, ResourceExt as _,
};
use tracing::warn;

use super::{
    bounded, kubeconfig,
    remote::remote_text,
    resolve::{self, ClusterView, LocalNode, MeshNetworks, ResolveOptions, SecretSource, MODE_ANNOTATION, NETWORK_LABEL},
};
use crate::config::{PeerMode, RawGateway, RawPeer, Reserved};

#[derive(Debug, Clone)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    pub istio_namespace: String,
    pub secrets: SecretSource,
    pub resolve: ResolveOptions,
    /// This cluster's name in the mesh (Istio's `multiCluster.clusterName`).
    pub cluster: String,
    /// `--mode`, by cluster: wins over the remote secret's annotation.
    pub modes: BTreeMap<String, PeerMode>,
    /// `--default-mode`.
    pub default_mode: PeerMode,
}

/// A cluster's network: the label of its Istio namespace, if it has one.
async fn network_of(client: &Client, opts: &Options) -> anyhow::Result<Option<String>> {
    let ns = opts.istio_namespace.as_str();
    Ok(bounded("reading the Istio namespace", Api::<Namespace>::all(client.clone()).get_opt(ns))
        .await?
        .and_then(|n| n.labels().get(NETWORK_LABEL).cloned()))
}

/// A cluster's nodes, a page at a time (each page within what a remote's answer may hold,
/// and within [`API_TIMEOUT`](super::API_TIMEOUT)), as discovery keeps them.
async fn list_nodes(client: &Client) -> anyhow::Result<BTreeMap<String, resolve::NodeInfo>> {
    let api = Api::<resolve::RemoteNode>::all(client.clone());
    let mut nodes = BTreeMap::new();
    let mut params = ListParams::default().limit(super::remote::PAGE_SIZE);
    // As many pages as the most nodes followed fill, and a few more: a remote may answer
    // every page with another continue token and nothing new.
    let most = super::watch::MAX_OBJECTS / super::remote::PAGE_SIZE as usize + 10;
    for _ in 0..most {
        let page = bounded("listing nodes", api.list(&params)).await?;
        for n in page.items {
            if nodes.len() >= super::watch::MAX_OBJECTS {
                anyhow::bail!("listing nodes: more than {} nodes", super::watch::MAX_OBJECTS);
            }
            nodes.insert(n.name_any(), n.into());
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(nodes),
        }
    }
    anyhow::bail!("listing nodes: more than {most} pages")
}

/// Reads one cluster's gateway and network name.
async fn read_cluster(client: &Client, opts: &Options, name: &str) -> anyhow::Result<(String, resolve::Resolved)> {
    let ns = opts.istio_namespace.as_str();
    let svcs = Api::<Service>::namespaced(client.clone(), ns);
    let eps = Api::<Endpoints>::namespaced(client.clone(), ns);
    let view = ClusterView {
        nodes: std::sync::Arc::new(list_nodes(client).await?),
        service: bounded("reading the gateway Service", svcs.get_opt(&opts.resolve.gateway_service)).await?,
        endpoints: bounded("reading the gateway Endpoints", eps.get_opt(&opts.resolve.gateway_service)).await?,
        tunnel_service: None,
    };
    let network = network_of(client, opts)
        .await?
        .with_context(|| format!("cluster {name}: namespace {ns} has no {NETWORK_LABEL} label, so its network is unknown"))?;
    Ok((network, resolve::resolve(&view, &opts.resolve, Some(&[]))))
}

/// The gateway addresses of remote `name` that istiod may be given, at most
/// [`MAX_GATEWAYS`](meshnet_common::limits::MAX_GATEWAYS), and each one left out with why. A
/// remote's API server writes its Nodes' addresses: one at 169.254.169.254, at loopback or at
/// a Node of this cluster would send this cluster's traffic for that network there, so the
/// rules the controller applies to a peer's gateways apply here too (the agent's reserved
/// ranges, then this cluster's Nodes).
fn usable_gateways(name: &str, addresses: &[Ipv4Addr], port: u16, local: &[LocalNode]) -> (Vec<Ipv4Addr>, Vec<String>) {
    let max = meshnet_common::limits::MAX_GATEWAYS;
    let (mut kept, mut left_out) = (Vec::new(), Vec::new());
    for a in addresses {
        let gateways = vec![RawGateway { address: a.to_string(), port: u32::from(port), udp_port: None }];
        let as_peer = RawPeer { name: name.to_owned(), gateways, ..RawPeer::default() };
        let why = Reserved::default().refuse_gateway(*a).or_else(|| resolve::against_local(&as_peer, local, None).err());
        match why {
            Some(why) => left_out.push(format!("{name}: gateway {a} left out: {why}")),
            None if kept.len() == max => left_out.push(format!("{name}: gateway {a} left out: more than {max} gateways")),
            None => kept.push(*a),
        }
    }
    (kept, left_out)
}

/// What `generate` made, and from which version of the `istio` ConfigMap: `apply` writes
/// only over that very version.
pub struct Generated {
    pub networks: MeshNetworks,
    pub client: Client,
    /// The resourceVersion of the `istio` ConfigMap the kept networks were read from.
    pub based_on: Option<String>,
    /// Which Istio setup applies, one line each, for the operator: `-o yaml` prints them as
    /// comments above the block, `-o json` on stderr.
    pub notes: Vec<String>,
}

/// Builds `meshNetworks` from the local cluster and every remote secret's cluster in gateway
/// mode. Networks already in the `istio` ConfigMap that discovery does not produce are kept,
/// except those of remote clusters in tunnel mode: istiod must know no gateway for those, so
/// that it hands out their pod IPs, which meshnet's tunnel carries.
pub async fn generate(opts: &Options) -> anyhow::Result<Generated> {
    let client = super::local_client(opts.kubeconfig.as_deref()).await?;
    let mut clusters: BTreeMap<String, (Client, PeerMode)> = BTreeMap::new();
    clusters.insert(opts.cluster.clone(), (client.clone(), PeerMode::Gateway));
    let secrets = Api::<Secret>::namespaced(client.clone(), &opts.secrets.namespace)
        .list(&ListParams::default().labels(&opts.secrets.selector))
        .await
        .context("listing the remote secrets")?;
    let twice = super::controller::held_twice(&opts.secrets.namespace, secrets.items.iter().map(|s| (s.metadata.name.as_deref().unwrap_or_default(), s)));
    for (cluster, why) in &twice {
        warn!(cluster = %cluster, error = %why, "skipping cluster");
    }
    for s in &secrets.items {
        let annotation = s.annotations().get(MODE_ANNOTATION).map(String::as_str);
        for (cluster, data) in s.data.iter().flatten() {
            if twice.contains_key(cluster) {
                continue;
            }
            if cluster == &opts.cluster {
                warn!(cluster = %cluster, secret = %s.name_any(), "a remote secret names this cluster; skipping it");
                continue;
            }
            let origin = format!("{}/{}[{cluster}]", opts.secrets.namespace, s.name_any());
            let mode = match resolve::remote_mode(opts.modes.get(cluster).copied(), annotation, opts.default_mode) {
                Ok(m) => m,
                Err(e) => {
                    warn!(cluster = %cluster, error = %e, "skipping cluster");
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&data.0);
            match kubeconfig::vet(&text, &origin) {
                Ok(kc) => match kubeconfig::client(kc, &origin).await {
                    Ok(c) => {
                        clusters.insert(cluster.clone(), (c, mode));
                    }
                    Err(e) => warn!(error = %e, "skipping cluster"),
                },
                Err(e) => warn!(error = %e, "skipping cluster"),
            }
        }
    }
    let istio = Api::<ConfigMap>::namespaced(client.clone(), &opts.istio_namespace)
        .get_opt("istio")
        .await
        .context("reading the istio ConfigMap")?;
    let based_on = istio.as_ref().and_then(|cm| cm.metadata.resource_version.clone());
    let existing = istio
        .and_then(|cm| cm.data?.get("meshNetworks").cloned())
        .map(|t| MeshNetworks::parse(&t))
        .transpose()
        .context("the istio ConfigMap's meshNetworks is not valid YAML")?
        .unwrap_or_default();
    // This cluster's own entry serves the remotes that reach it through its gateway; with
    // every remote in tunnel mode none does, and neither its gateway nor its label is needed.
    let remotes_by_gateway = clusters.iter().any(|(n, (_, m))| n != &opts.cluster && *m == PeerMode::Gateway);
    let local: Vec<LocalNode> = if remotes_by_gateway {
        list_nodes(&client).await.context("listing this cluster's nodes")?.iter().map(|(n, info)| LocalNode::of(n, info)).collect()
    } else {
        Vec::new()
    };
    let mut left_out = Vec::new();
    let tunnel_only = !remotes_by_gateway && clusters.values().any(|(_, m)| *m == PeerMode::Tunnel);
    let mut out = MeshNetworks::default();
    let mut discovered_registries = Vec::new();
    let mut tunnel: Vec<(String, Option<String>)> = Vec::new();
    let mut local_network = None;
    // Each cluster's network and gateway, decided once all are read: a remote's namespace
    // label is its own to write, and must not take this cluster's network or another's.
    let mut found: Vec<(&String, String, resolve::Resolved)> = Vec::new();
    for (name, (c, mode)) in &clusters {
        if *mode == PeerMode::Tunnel {
            let network = network_of(c, opts).await.unwrap_or_else(|e| {
                warn!(cluster = %name, error = %remote_text(&format!("{e:#}")), "could not read its network label");
                None
            });
            tunnel.push((name.clone(), network));
            discovered_registries.push(name.clone());
            continue;
        }
        if tunnel_only {
            // Nothing here reaches this cluster through its gateway: a hand-written entry of
            // its own has nothing left to say either.
            local_network = network_of(c, opts).await.ok().flatten();
            discovered_registries.push(name.clone());
            continue;
        }
        match read_cluster(c, opts, name).await {
            Ok((network, r)) => {
                if name == &opts.cluster {
                    local_network = Some(network.clone());
                }
                found.push((name, network, r));
            }
            Err(e) if name == &opts.cluster => return Err(e),
            // A remote's answer, cut and escaped: it must not write lines of its own here.
            Err(e) => warn!(cluster = %name, error = %remote_text(&format!("{e:#}")), "skipping cluster"),
        }
    }
    // This cluster's network is its own; a network that two remotes name is neither's, for
    // nothing tells which label is true (clusters sharing a network are not generated); and
    // an entry already written for other registries or CIDRs stays theirs.
    let written_for_others = |network: &str, name: &str| {
        existing.networks.get(network).is_some_and(|n| !n.endpoints.iter().any(|e| e.from_registry.as_deref() == Some(name)))
    };
    let others = |name: &str, network: &str| name != opts.cluster && (local_network.as_deref() == Some(network) || written_for_others(network, name));
    let claimants = |network: &str| found.iter().filter(|(m, n, _)| n == network && !others(m, n)).count();
    let mut no_gateway: Vec<(String, String)> = Vec::new();
    for (name, network, r) in &found {
        let taken = *name != &opts.cluster && (others(name, network) || claimants(network) > 1);
        if taken {
            warn!(cluster = %name, network = %network, "its network label names another cluster's network; skipping it");
            continue;
        }
        // A gateway node whose address annotation is refused costs that gateway alone.
        left_out.extend(r.skipped.iter().map(|why| format!("{name}: gateway left out: {why}")));
        match r.port {
            Some(0) => left_out.push(format!("{name}: network {network} left out: nodePort 0 is not a valid port")),
            Some(port) if !r.addresses.is_empty() => {
                let (addresses, why) = if *name == &opts.cluster {
                    (r.addresses.clone(), Vec::new())
                } else {
                    usable_gateways(name, &r.addresses, port, &local)
                };
                left_out.extend(why);
                if addresses.is_empty() {
                    no_gateway.push(((*name).clone(), network.clone()));
                    continue;
                }
                out.set_cluster(network, name, &addresses, port);
                discovered_registries.push((*name).clone());
            }
            _ => warn!(cluster = %name, problems = %r.problems.join("; "), "no gateway found"),
        }
    }
    if out.networks.is_empty() && tunnel.is_empty() {
        bail!("discovery found no gateway in any cluster");
    }
    // Hand-written networks that discovery does not cover (fromCidr, other registries) stay.
    for (name, net) in existing.networks {
        let covered = out.networks.contains_key(&name)
            || net.endpoints.iter().any(|e| e.from_registry.as_ref().is_some_and(|r| discovered_registries.contains(r)));
        if !covered {
            // What it lists is not vetted here: the output says so rather than "left out".
            no_gateway.retain(|(cluster, network)| {
                let same = &name == network || net.endpoints.iter().any(|e| e.from_registry.as_deref() == Some(cluster.as_str()));
                if same {
                    left_out.push(format!("{cluster}: no usable gateway for network {network}; the existing entry {name} stays as it was, unchecked"));
                }
                !same
            });
            out.networks.insert(name, net);
        }
    }
    left_out.extend(no_gateway.iter().map(|(cluster, network)| format!("{cluster}: network {network} left out: no usable gateway")));
    for why in &left_out {
        warn!("{why}");
    }
    let mut notes = setup_notes(&opts.cluster, local_network.as_deref(), &tunnel, &out);
    notes.extend(left_out);
    Ok(Generated { networks: out, client, based_on, notes })
}

/// Which Istio setup applies, given the remotes in tunnel mode (with their network labels)
/// and the networks to be written.
fn setup_notes(local: &str, local_network: Option<&str>, tunnel: &[(String, Option<String>)], out: &MeshNetworks) -> Vec<String> {
    let mut notes = Vec::new();
    if tunnel.is_empty() {
        return notes;
    }
    let through_gateway = out.networks.values().any(|n| !n.gateways.is_empty() && n.endpoints.iter().any(|e| e.from_registry.as_deref() != Some(local)));
    if through_gateway {
        notes.push(format!(
            "multi-network for the remotes in gateway mode (the networks below); one network with {local} for those in tunnel mode"
        ));
    } else {
        notes.push(format!(
            "every remote is in tunnel mode: run Istio multi-primary as ONE network with {local}: no east-west gateway and no meshNetworks entry are needed"
        ));
    }
    for (name, network) in tunnel {
        let mut note = format!(
            "{name}: tunnel mode: no entry, so that istiod knows no gateway for it and hands out its pod IPs, which meshnet's tunnel carries"
        );
        let _ = match network {
            Some(n) if Some(n.as_str()) == local_network => Ok(()),
            Some(n) if out.networks.get(n).is_some_and(|net| !net.gateways.is_empty()) => write!(
                note,
                "; WARNING: its {NETWORK_LABEL} label is {n:?}, a network with gateways here, so istiod would send its traffic through them: label it {}",
                local_network.map_or_else(|| "like this cluster's".to_string(), |l| format!("{l:?} like this cluster's"))
            ),
            Some(n) => write!(
                note,
                "; its network {n:?} is not this cluster's: istiod reaches it directly only while it knows no gateway for {n:?}; \
                 the same {NETWORK_LABEL} label on both makes them one network"
            ),
            None => Ok(()),
        };
        notes.push(note);
    }
    notes
}

/// Writes `meshNetworks` into the `istio` ConfigMap, keeping every other key, but only over
/// the version `generate` read: the networks kept from it must not have changed meanwhile.
pub async fn apply(istio_namespace: &str, g: &Generated) -> anyhow::Result<()> {
    let api = Api::<ConfigMap>::namespaced(g.client.clone(), istio_namespace);
    let mut cm = api.get("istio").await.context("reading the istio ConfigMap")?;
    cm.data.get_or_insert_with(BTreeMap::new).insert("meshNetworks".into(), g.networks.to_yaml());
    // The version the kept networks came from, not the one just read: an edit in between
    // makes the API server refuse this write (409) instead of it being lost.
    cm.metadata.resource_version.clone_from(&g.based_on);
    match api.replace("istio", &PostParams::default(), &cm).await {
        Err(kube::Error::Api(e)) if e.code == 409 => anyhow::bail!(
            "the istio ConfigMap changed while meshNetworks was being built; nothing was written. Run the command again"
        ),
        r => r.map(drop).context("updating the istio ConfigMap"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn networks(yaml: &str) -> MeshNetworks {
        MeshNetworks::parse(yaml).unwrap()
    }

    /// A remote's gateway node at the metadata service, at loopback, at a Node of this cluster
    /// or inside its pods is left out of what istiod is given, with why; past the eight
    /// gateways the datapath takes, the rest are left out too.
    #[test]
    fn a_remotes_gateway_at_a_reserved_or_local_address_is_left_out() {
        let local = [LocalNode { name: "node1".into(), pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()], addresses: ["10.20.144.83".parse().unwrap()].into() }];
        let addresses: Vec<Ipv4Addr> = ["169.254.169.254", "127.0.0.1", "10.20.144.83", "10.244.3.3", "10.20.144.165"].iter().map(|a| a.parse().unwrap()).collect();
        let (kept, left_out) = usable_gateways("cluster2", &addresses, 32361, &local);
        assert_eq!(kept, ["10.20.144.165".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(
            left_out,
            [
                "cluster2: gateway 169.254.169.254 left out: 169.254.169.254 is not a unicast address of a remote node (link-local)",
                "cluster2: gateway 127.0.0.1 left out: 127.0.0.1 is not a unicast address of a remote node (loopback)",
                "cluster2: gateway 10.20.144.83 left out: 10.20.144.83 is an address of node node1 of the local cluster",
                "cluster2: gateway 10.244.3.3 left out: node address 10.244.3.3 lies in 10.244.0.0/16, the local cluster's pods (node node1)",
            ]
        );
        let many: Vec<Ipv4Addr> = (1..=10).map(|i| Ipv4Addr::new(10, 20, 145, i)).collect();
        let (kept, left_out) = usable_gateways("cluster3", &many, 30443, &local);
        assert_eq!(kept, many[..8]);
        assert_eq!(left_out, ["cluster3: gateway 10.20.145.9 left out: more than 8 gateways", "cluster3: gateway 10.20.145.10 left out: more than 8 gateways"]);
    }

    #[test]
    fn the_notes_say_which_setup_applies() {
        let none = MeshNetworks::default();
        assert!(setup_notes("cluster1", Some("network1"), &[], &none).is_empty(), "gateway mode alone needs no note");

        let t = |name: &str, net: Option<&str>| (name.to_string(), net.map(str::to_string));
        let notes = setup_notes("cluster1", Some("network1"), &[t("cluster2", Some("network1"))], &none);
        assert_eq!(
            notes,
            [
                "every remote is in tunnel mode: run Istio multi-primary as ONE network with cluster1: no east-west gateway and no meshNetworks entry are needed",
                "cluster2: tunnel mode: no entry, so that istiod knows no gateway for it and hands out its pod IPs, which meshnet's tunnel carries",
            ]
        );

        // Beside a gateway-mode remote, whose network keeps its gateways: a tunnel remote
        // labelled with that network would be sent through them.
        let out = networks(
            "networks:\n  network1: {endpoints: [{fromRegistry: cluster1}], gateways: [{address: 10.20.144.83, port: 31674}]}\n  \
             network3: {endpoints: [{fromRegistry: cluster3}], gateways: [{address: 10.20.144.170, port: 30443}]}\n",
        );
        let notes = setup_notes("cluster1", Some("network1"), &[t("cluster2", Some("network3")), t("cluster4", Some("network4"))], &out);
        assert!(notes[0].starts_with("multi-network for the remotes in gateway mode"), "{notes:?}");
        assert!(notes[1].contains(r#"WARNING: its topology.istio.io/network label is "network3", a network with gateways here"#), "{notes:?}");
        assert!(notes[1].ends_with(r#"label it "network1" like this cluster's"#), "{notes:?}");
        assert!(notes[2].contains(r#"its network "network4" is not this cluster's"#), "{notes:?}");
        // This cluster's own entry alone is no gateway remote.
        let own = networks("networks:\n  network1: {endpoints: [{fromRegistry: cluster1}], gateways: [{address: 10.20.144.83, port: 31674}]}\n");
        assert!(setup_notes("cluster1", Some("network1"), &[t("cluster2", None)], &own)[0].starts_with("every remote is in tunnel mode"));
    }
}
