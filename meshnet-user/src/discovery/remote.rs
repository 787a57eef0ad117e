//! One task per remote cluster: it vets the kubeconfig, watches the nodes, the east-west
//! gateway's Service and Endpoints, and probes the API server, and tells the controller what
//! it saw. A remote that fails or hangs holds up only its own task.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use kube::{runtime::watcher, Api};
use tokio::sync::mpsc;

use super::{
    controller::ControllerOptions,
    kubeconfig,
    resolve::ClusterView,
    watch::{snapshots, Update},
};

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

/// One remote cluster: vet its kubeconfig, then watch its nodes, gateway Service and
/// Endpoints, and probe its API server. What it sees goes to `tx`, wrapped by `wrap`.
pub(super) async fn remote_task<M: Send + 'static>(
    origin: String,
    text: String,
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
    let ns = opts.istio_namespace.as_str();
    let by_name = format!("metadata.name={}", opts.resolve.gateway_service);
    let mut nodes = std::pin::pin!(snapshots(Api::<Node>::all(client.clone()), watcher::Config::default()));
    let mut svcs = std::pin::pin!(snapshots(Api::<Service>::namespaced(client.clone(), ns), watcher::Config::default().fields(&by_name)));
    let mut eps = std::pin::pin!(snapshots(Api::<Endpoints>::namespaced(client.clone(), ns), watcher::Config::default().fields(&by_name)));
    let mut view = ClusterView::default();
    let mut synced = [false; 3];
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
                Update::Snapshot(s) => { view.nodes = s; synced[0] = true; None }
                Update::Error(e) => Some(e),
            },
            Some(u) = svcs.next() => match u {
                Update::Snapshot(s) => { view.service = s.values().next().cloned(); synced[1] = true; None }
                Update::Error(e) => Some(e),
            },
            Some(u) = eps.next() => match u {
                Update::Snapshot(s) => { view.endpoints = s.values().next().cloned(); synced[2] = true; None }
                Update::Error(e) => Some(e),
            },
            _ = probe.tick() => {
                // A watch can hang without an error; a bounded request cannot.
                let ok = tokio::time::timeout(opts.probe_timeout, client.apiserver_version()).await;
                let event = match ok {
                    Ok(Ok(_)) => RemoteEvent::Healthy,
                    Ok(Err(e)) => RemoteEvent::Failed(format!("API server: {e}")),
                    Err(_) => RemoteEvent::Failed(format!("API server did not answer within {:?}", opts.probe_timeout)),
                };
                if !send(event).await { return; }
                continue;
            }
        };
        let event = match update {
            Some(e) => RemoteEvent::Failed(format!("watch: {e}")),
            None if synced.iter().all(|s| *s) => RemoteEvent::View(Box::new(view.clone())),
            None => continue,
        };
        if !send(event).await {
            return;
        }
    }
}
