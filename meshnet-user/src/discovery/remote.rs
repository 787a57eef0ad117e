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
    /// A new view is in the remote's [`Latest`]: the event carries none, so that the views a
    /// slow controller has yet to read are never more than one per remote, however many
    /// events wait in the channel.
    View(Arc<Latest>),
    Healthy,
    Failed(String),
    Refused(String),
}

/// A remote's newest view that the controller has not taken yet. Each view holds its own
/// copy of the remote's node set once the watch has changed it, up to some megabytes: sent
/// whole, every queued view would be one, and the channel holds 256.
#[derive(Default)]
pub(super) struct Latest(std::sync::Mutex<Option<ClusterView>>);

impl Latest {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ClusterView>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest view, unless an earlier [`RemoteEvent::View`] took it (then the view that
    /// event announced is already the controller's, or a newer one is).
    pub(super) fn take(&self) -> Option<ClusterView> {
        self.slot().take()
    }
}

/// What the remote's task tells the controller, in order, with at most one view waiting.
#[derive(Default)]
pub(super) struct Outbox {
    latest: Arc<Latest>,
    /// The last event sent was a view (whether the controller took it, the slot says).
    view_sent_last: bool,
}

impl Outbox {
    /// Puts `view` in the slot; the event to send, if one must go out. A view waiting behind
    /// no other event is replaced in place: the controller reads the newer one in its stead.
    /// One that an error or a probe's result followed gets a new event, so that the
    /// controller still sees the view after them and ends where the remote is: it may read
    /// the newer view early (at the first event), never late, and never an older one last.
    pub(super) fn view(&mut self, view: ClusterView) -> Option<RemoteEvent> {
        let was_empty = self.latest.slot().replace(view).is_none();
        let send = was_empty || !self.view_sent_last;
        self.view_sent_last = true;
        send.then(|| RemoteEvent::View(self.latest.clone()))
    }

    /// Any other event, which goes out as it is.
    pub(super) fn other(&mut self, event: RemoteEvent) -> RemoteEvent {
        self.view_sent_last = false;
        event
    }
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
    let mut outbox = Outbox::default();
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
                if !send(outbox.other(event)).await { return; }
                continue;
            }
        };
        let event = match update {
            Some(e) => outbox.other(RemoteEvent::Failed(format!("watch: {}", remote_text(&e)))),
            // An unfollowed node set is stale: no view of it goes out as fresh.
            None if unfollowed.is_some() => continue,
            None if synced.iter().all(|s| *s) => match outbox.view(view.clone()) {
                Some(event) => event,
                None => continue,
            },
            None => continue,
        };
        if !send(event).await {
            return;
        }
    }
}

/// An error text a remote API server had a hand in (its response body becomes part of it), as
/// the status and the log carry it: cut to a few hundred characters, every character that does
/// not print escaped, so that no remote can forge log lines or swell every peer's status. Not
/// only control characters: a terminal or an editor breaks lines at U+2028, and U+202E turns
/// the rest of a line around, so a text could show what it does not hold.
pub(super) fn remote_text(text: &str) -> String {
    const MAX: usize = 300;
    let mut out = String::new();
    for c in text.chars().take(MAX) {
        // `escape_debug` escapes what does not print, and quotes and backslashes, which do.
        if c.is_control() || (c.escape_debug().len() > 1 && !matches!(c, '"' | '\'' | '\\')) {
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
    use super::{remote_text, Arc, ClusterView, Outbox, RemoteEvent};

    /// A controller that reads slowly has at most one view of a remote waiting, however many
    /// the remote's watches make (each its own copy of the node set): the events carry none.
    /// A probe's result or an error between two views gets the later one its own event, so
    /// the controller, reading them in order, ends where the remote is.
    #[test]
    fn a_slow_controller_has_at_most_one_view_of_a_remote_waiting() {
        let view = |n: usize| {
            let nodes = (0..n).map(|i| (format!("n{i}"), super::super::resolve::NodeInfo::default()));
            ClusterView { nodes: Arc::new(nodes.collect()), ..ClusterView::default() }
        };
        let mut outbox = Outbox::default();
        let mut queue: Vec<RemoteEvent> = Vec::new();
        let mut made = Vec::new();
        for n in 1..=1000 {
            let v = view(n);
            made.push(Arc::downgrade(&v.nodes));
            queue.extend(outbox.view(v));
        }
        assert_eq!(queue.len(), 1);
        assert_eq!(made.iter().filter(|w| w.upgrade().is_some()).count(), 1, "views alive");
        queue.push(outbox.other(RemoteEvent::Failed("watch: gone".into())));
        queue.extend(outbox.view(view(1001)));
        queue.extend(outbox.view(view(1002)));
        assert_eq!(queue.len(), 3);
        // The controller's fold of them: its view, whether stale, its error.
        let mut seen: (Option<usize>, bool, Option<String>) = (None, true, None);
        let mut states = Vec::new();
        for event in queue {
            match event {
                RemoteEvent::View(latest) => {
                    if let Some(v) = latest.take() {
                        seen.0 = Some(v.nodes.len());
                    }
                    (seen.1, seen.2) = (seen.0.is_none(), None);
                }
                RemoteEvent::Failed(e) => (seen.1, seen.2) = (true, Some(e)),
                RemoteEvent::Healthy | RemoteEvent::Refused(_) => unreachable!(),
            }
            states.push(seen.clone());
        }
        // The newest view is read at once; the error still marks it stale until the event
        // after it, as it would have marked the older one.
        let failed = Some("watch: gone".to_owned());
        assert_eq!(states, [(Some(1002), false, None), (Some(1002), true, failed), (Some(1002), false, None)]);
        // Taken, the slot is empty: the next view is announced again.
        assert!(outbox.view(view(3)).is_some());
        assert!(outbox.view(view(4)).is_none());
    }

    #[test]
    fn a_remotes_error_text_is_bounded_and_forges_no_lines() {
        assert_eq!(remote_text("ApiError: Unauthorized (401)"), "ApiError: Unauthorized (401)");
        let forged = "denied\n2026-12-06T00:00:00Z  INFO meshnet: published peers\r";
        assert_eq!(remote_text(forged), "denied\\n2026-12-06T00:00:00Z  INFO meshnet: published peers\\r");
        // Line and paragraph separators, and a right-to-left override; what prints stays.
        assert_eq!(remote_text("a\u{2028}b\u{2029}c\u{202e}d"), "a\\u{2028}b\\u{2029}c\\u{202e}d");
        assert_eq!(remote_text(r#"node "n1" \ café 東京"#), r#"node "n1" \ café 東京"#);
        let huge = "x".repeat(5_000_000);
        let out = remote_text(&huge);
        assert!(out.len() < 400 && out.ends_with("... (5000000 characters in all)"), "{}", &out[..80]);
    }
}

