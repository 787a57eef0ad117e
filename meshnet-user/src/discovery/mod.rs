//! Kubernetes discovery: the controller that resolves peers from the local and remote API
//! servers and publishes them, the agent's source that follows what was published, and the
//! `meshNetworks` generator.

pub mod controller;
pub mod kubeconfig;
pub mod mesh_networks;
pub mod resolve;
pub mod source;
pub mod watch;

use std::path::Path;

use anyhow::Context as _;

/// A client for the local cluster: in-cluster config by default, or `kubeconfig`. This is the
/// operator's own kubeconfig, so it is not vetted like the remote secrets are.
pub async fn local_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => kube::Config::incluster().context("no --kubeconfig and not running in a pod (in-cluster config)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}
