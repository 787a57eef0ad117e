//! Kubernetes discovery: the controller that resolves peers from the local and remote API
//! servers and publishes them, the agent's source that follows what was published, and the
//! `meshNetworks` generator.

pub mod controller;
pub mod desired;
pub mod kubeconfig;
pub mod leader;
pub mod mesh_networks;
mod probes;
pub mod published;
mod remote;
pub mod resolve;
mod response_limits;
pub mod source;
pub mod watch;

use std::{future::Future, path::Path, time::Duration};

use anyhow::Context as _;

/// The longest any single request to an API server may take. kube-rs bounds none of its
/// one-shot calls by default (its read timeout is sized for watches), and a hung call in the
/// controller's loop would stall leadership and publishing alike.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// `call`, failing with `what` if it errs or takes longer than [`API_TIMEOUT`].
pub async fn bounded<T>(what: &str, call: impl Future<Output = kube::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => anyhow::bail!("{what}: no answer within {API_TIMEOUT:?}"),
    }
}

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
