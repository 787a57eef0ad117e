//! `meshnet mesh-networks`: Istio's `meshNetworks` for the whole mesh, from discovery, so
//! that nobody hand-edits gateway node IPs and NodePorts in every cluster again.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Namespace, Node, Secret, Service};
use kube::{
    api::{ListParams, PostParams},
    Api, Client, ResourceExt as _,
};
use tracing::warn;

use super::{
    kubeconfig,
    resolve::{self, ClusterView, MeshNetworks, ResolveOptions, SecretSource, NETWORK_LABEL},
};

#[derive(Debug, Clone)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    pub istio_namespace: String,
    pub secrets: SecretSource,
    pub resolve: ResolveOptions,
    /// This cluster's name in the mesh (Istio's `multiCluster.clusterName`).
    pub cluster: String,
}

/// Reads one cluster's gateway and network name.
async fn read_cluster(client: &Client, opts: &Options, name: &str) -> anyhow::Result<(String, resolve::Resolved)> {
    let ns = opts.istio_namespace.as_str();
    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.context("listing nodes")?;
    let svcs = Api::<Service>::namespaced(client.clone(), ns);
    let eps = Api::<Endpoints>::namespaced(client.clone(), ns);
    let view = ClusterView {
        nodes: std::sync::Arc::new(nodes.items.into_iter().map(|n| (n.name_any(), n.into())).collect()),
        service: svcs.get_opt(&opts.resolve.gateway_service).await.context("reading the gateway Service")?,
        endpoints: eps.get_opt(&opts.resolve.gateway_service).await.context("reading the gateway Endpoints")?,
    };
    let network = Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await
        .context("reading the Istio namespace")?
        .and_then(|n| n.labels().get(NETWORK_LABEL).cloned())
        .with_context(|| format!("cluster {name}: namespace {ns} has no {NETWORK_LABEL} label, so its network is unknown"))?;
    Ok((network, resolve::resolve(&view, &opts.resolve, Some(&[]))))
}

/// Builds `meshNetworks` from the local cluster and every remote secret's cluster. Networks
/// already in the `istio` ConfigMap that discovery does not produce are kept.
/// What `generate` made, and from which version of the `istio` ConfigMap: `apply` writes
/// only over that very version.
pub struct Generated {
    pub networks: MeshNetworks,
    pub client: Client,
    /// The resourceVersion of the `istio` ConfigMap the kept networks were read from.
    pub based_on: Option<String>,
}

pub async fn generate(opts: &Options) -> anyhow::Result<Generated> {
    let client = super::local_client(opts.kubeconfig.as_deref()).await?;
    let mut clusters: BTreeMap<String, Client> = BTreeMap::new();
    clusters.insert(opts.cluster.clone(), client.clone());
    let secrets = Api::<Secret>::namespaced(client.clone(), &opts.secrets.namespace)
        .list(&ListParams::default().labels(&opts.secrets.selector))
        .await
        .context("listing the remote secrets")?;
    for s in &secrets.items {
        for (cluster, data) in s.data.iter().flatten() {
            let origin = format!("{}/{}[{cluster}]", opts.secrets.namespace, s.name_any());
            let text = String::from_utf8_lossy(&data.0);
            match kubeconfig::vet(&text, &origin) {
                Ok(kc) => match kubeconfig::client(kc, &origin).await {
                    Ok(c) => {
                        clusters.insert(cluster.clone(), c);
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
    let mut out = MeshNetworks::default();
    let mut discovered_registries = Vec::new();
    for (name, c) in &clusters {
        match read_cluster(c, opts, name).await {
            Ok((_, r)) if !r.refusals.is_empty() => {
                warn!(cluster = %name, refused = %r.refusals.join("; "), "cluster refused");
            }
            Ok((network, r)) => match r.port {
                Some(port) if !r.addresses.is_empty() => {
                    out.set_cluster(&network, name, &r.addresses, port);
                    discovered_registries.push(name.clone());
                }
                _ => warn!(cluster = %name, problems = %r.problems.join("; "), "no gateway found"),
            },
            Err(e) if name == &opts.cluster => return Err(e),
            Err(e) => warn!(cluster = %name, error = %format!("{e:#}"), "skipping cluster"),
        }
    }
    if out.networks.is_empty() {
        bail!("discovery found no gateway in any cluster");
    }
    // Hand-written networks that discovery does not cover (fromCidr, other registries) stay.
    for (name, net) in existing.networks {
        let covered = out.networks.contains_key(&name)
            || net.endpoints.iter().any(|e| e.from_registry.as_ref().is_some_and(|r| discovered_registries.contains(r)));
        if !covered {
            out.networks.insert(name, net);
        }
    }
    Ok(Generated { networks: out, client, based_on })
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
