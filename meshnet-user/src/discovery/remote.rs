//! One task per remote cluster: it vets the kubeconfig, watches the nodes and, in gateway
//! mode, the east-west gateway's Service and Endpoints or, in tunnel mode, the tunnel
//! Service, probes the API server, and tells the controller what it saw. A remote that fails
//! or hangs holds up only its own task.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{runtime::watcher, Api};
use tokio::sync::mpsc;

use super::{
    controller::ControllerOptions,
    kubeconfig,
    resolve::{ClusterView, RemoteNode},
    watch::{snapshots, snapshots_of, Update},
};
use crate::config::PeerMode;

/// What a remote's task reports.
pub(super) enum RemoteEvent {
    View(Box<ClusterView>),
    Healthy,
    Failed(String),
    Refused(String),
}

/// Remotes listing their objects at once. An initial list of a large cluster is its whole
/// node set in memory at one time, several times over while it is decoded; fifty of them at
/// once is what would set the controller's peak memory, not what it keeps.
pub(super) const CONCURRENT_LISTS: usize = 4;
/// How long a remote may hold its turn to list before the next one goes anyway: a remote
/// that hangs must not hold every other back.
const LIST_TURN: Duration = Duration::from_secs(30);
/// Nodes per page of a remote's list: real nodes are up to ~50 KB each (their image lists),
/// so a page stays well inside what one answer may hold (`response_limits::MAX_BODY`).
pub(super) const PAGE_SIZE: u32 = 50;

type Snapshots<K> = Pin<Box<dyn Stream<Item = Update<K>> + Send>>;

/// A watch of the one object `name` in `ns`, or, when `wanted` is false, nothing: only what
/// the remote's mode needs is read, so a gateway remote's credentials need no right to the
/// tunnel Service, nor a tunnel remote's any to a gateway it may not have.
fn one<K>(client: &kube::Client, ns: &str, name: &str, wanted: bool) -> Snapshots<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + super::watch::Relevant<Kept = K>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    if wanted {
        Box::pin(snapshots_of(Api::<K>::namespaced(client.clone(), ns), name))
    } else {
        Box::pin(futures::stream::pending())
    }
}

/// One remote cluster: vet its kubeconfig, then watch its nodes and what its `mode` needs
/// (the gateway Service and Endpoints, or the tunnel Service), and probe its API server.
/// What it sees goes to `tx`, wrapped by `wrap`.
pub(super) async fn remote_task<M: Send + 'static>(
    origin: String,
    text: String,
    mode: PeerMode,
    opts: ControllerOptions,
    tx: mpsc::Sender<M>,
    wrap: impl Fn(RemoteEvent) -> M,
    lists: Arc<tokio::sync::Semaphore>,
) {
    let send = |event: RemoteEvent| {
        let msg = wrap(event);
        let tx = tx.clone();
        async move { tx.send(msg).await.is_ok() }
    };
    let client = match kubeconfig::vet(&text, &origin) {
        Ok(kc) => match kubeconfig::client(kc, &origin).await {
            Ok(c) => c,
            Err(e) => {
                send(RemoteEvent::Refused(e.to_string())).await;
                return;
            }
        },
        Err(e) => {
            send(RemoteEvent::Refused(e.to_string())).await;
            return;
        }
    };
    let (ns, gw) = (opts.istio_namespace.as_str(), opts.resolve.gateway_service.as_str());
    let gateway = mode == PeerMode::Gateway;
    let mut nodes = std::pin::pin!(snapshots(Api::<RemoteNode>::all(client.clone()), watcher::Config::default().page_size(PAGE_SIZE)));
    let mut svcs = one::<Service>(&client, ns, gw, gateway);
    let mut eps = one::<Endpoints>(&client, ns, gw, gateway);
    // In the remote's namespace of meshnet's name here: deploy/ installs both in `meshnet`.
    let mut tunnel_svc = one::<Service>(&client, &opts.namespace, &opts.resolve.tunnel_service, !gateway);
    let mut view = ClusterView::default();
    // Nodes past the bound (`watch::MAX_OBJECTS`): not followed until a list fits, and stale
    // till then, whatever the probes say.
    let mut unfollowed: Option<String> = None;
    // What is not watched counts as synced.
    let mut synced = [false, !gateway, !gateway, gateway];
    let mut probe = tokio::time::interval(opts.probe_interval);
    // The watches list when first polled, below.
    let mut turn = lists.acquire_owned().await.ok();
    let turn_started = tokio::time::Instant::now();
    loop {
        if turn.is_some() && (synced.iter().all(|s| *s) || turn_started.elapsed() > LIST_TURN) {
            turn = None;
        }
        let update = tokio::select! {
            Some(u) = nodes.next() => match u {
                Update::Snapshot(s) => { view.nodes = s; synced[0] = true; unfollowed = None; None }
                Update::Unfollowed(e) => { unfollowed = Some(e.clone()); Some(e) }
                Update::Error(e) => Some(e),
            },
            Some(u) = svcs.next() => match u {
                Update::Snapshot(s) => { view.service = s.values().next().cloned(); synced[1] = true; None }
                Update::Error(e) | Update::Unfollowed(e) => Some(e),
            },
            Some(u) = eps.next() => match u {
                Update::Snapshot(s) => { view.endpoints = s.values().next().cloned(); synced[2] = true; None }
                Update::Error(e) | Update::Unfollowed(e) => Some(e),
            },
            Some(u) = tunnel_svc.next() => match u {
                Update::Snapshot(s) => { view.tunnel_service = s.values().next().cloned(); synced[3] = true; None }
                Update::Error(e) | Update::Unfollowed(e) => Some(e),
            },
            _ = probe.tick() => {
                // A watch can hang without an error; a bounded request cannot.
                let ok = tokio::time::timeout(opts.probe_timeout, client.apiserver_version()).await;
                let event = match ok {
                    Ok(Ok(_)) if unfollowed.is_some() => RemoteEvent::Failed(format!("watch: {}", remote_text(unfollowed.as_deref().unwrap_or_default()))),
                    Ok(Ok(_)) => RemoteEvent::Healthy,
                    Ok(Err(e)) => RemoteEvent::Failed(format!("API server: {}", remote_text(&e.to_string()))),
                    Err(_) => RemoteEvent::Failed(format!("API server did not answer within {:?}", opts.probe_timeout)),
                };
                if !send(event).await { return; }
                continue;
            }
        };
        let event = match update {
            Some(e) => RemoteEvent::Failed(format!("watch: {}", remote_text(&e))),
            // An unfollowed node set is stale: no view of it goes out as fresh.
            None if unfollowed.is_some() => continue,
            None if synced.iter().all(|s| *s) => RemoteEvent::View(Box::new(view.clone())),
            None => continue,
        };
        if !send(event).await {
            return;
        }
    }
}

/// An error text a remote API server had a hand in (its response body becomes part of it), as
/// the status and the log carry it: cut to a few hundred characters, its control characters
/// escaped, so that no remote can forge log lines or swell every peer's status.
pub(super) fn remote_text(text: &str) -> String {
    const MAX: usize = 300;
    let mut out = String::new();
    for c in text.chars().take(MAX) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    let n = text.chars().count();
    if n > MAX {
        out = format!("{out}... ({n} characters in all)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::remote_text;

    #[test]
    fn a_remotes_error_text_is_bounded_and_forges_no_lines() {
        assert_eq!(remote_text("ApiError: Unauthorized (401)"), "ApiError: Unauthorized (401)");
        let forged = "denied\n2026-12-06T00:00:00Z  INFO meshnet: published peers\r";
        assert_eq!(remote_text(forged), "denied\\n2026-12-06T00:00:00Z  INFO meshnet: published peers\\r");
        let huge = "x".repeat(5_000_000);
        let out = remote_text(&huge);
        assert!(out.len() < 400 && out.ends_with("... (5000000 characters in all)"), "{}", &out[..80]);
    }
}

