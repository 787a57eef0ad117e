//! A watch that keeps a complete, named set of objects: kube-rs's watcher (list, watch,
//! relist on 410 Gone, with backoff) folded into snapshots. A snapshot is only emitted once
//! the initial list is complete, so a consumer never mistakes a half-listed set for
//! deletions.
//!
//! Objects are kept trimmed to what discovery reads ([`Relevant`]), and a snapshot is only
//! emitted when that part changed. A node's status heartbeat (every 10 s on Kubernetes 1.18,
//! for every node of every remote cluster) then costs one comparison, not a copy of the
//! whole set and a recomputation of every peer: per event the work is O(log n), and the
//! initial list O(n), never O(n²).

use std::{collections::BTreeMap, sync::Arc};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, EndpointAddress, EndpointSubset, Endpoints, Node, Secret, Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;

use super::resolve::NodeInfo;

/// The part of an object discovery reads; the rest (status heartbeats, managed fields,
/// resource versions) is dropped before it is stored or compared.
pub trait Relevant: Sized {
    /// What is kept of the object.
    type Kept: PartialEq + Clone + std::fmt::Debug + Send + Sync + 'static;
    fn relevant(self) -> Self::Kept;
}

/// A remote's Service and Endpoints are read for their name, ports and addresses only: their
/// labels and annotations, which a remote could make as large as it likes, are not kept.
fn meta(m: ObjectMeta) -> ObjectMeta {
    ObjectMeta { name: m.name, namespace: m.namespace, ..ObjectMeta::default() }
}

/// Objects one watch keeps: a real cluster has at most 5,000 nodes, and every other watch
/// follows one object by name (a remote's keeps that one alone: [`snapshots_of`]). A remote
/// that lists more is failed, not followed, so that no remote can grow the controller
/// without bound (each object is bounded by its [`Relevant`] part: a node's addresses, a
/// Service's ports, an Endpoints' addresses).
pub const MAX_OBJECTS: usize = 10_000;
/// A Service's ports and an Endpoints' subsets, ports and addresses kept, each: a gateway
/// has a handful; the rest of a remote's list is not read.
const MAX_LISTED: usize = 64;

/// Nodes are most of what the controller holds (every node of every remote cluster), so they
/// are kept as the compact [`NodeInfo`], about 100 bytes, not as a `Node` of about 2 KB.
impl Relevant for Node {
    type Kept = NodeInfo;
    fn relevant(self) -> NodeInfo {
        NodeInfo::from(self)
    }
}

impl Relevant for super::resolve::RemoteNode {
    type Kept = NodeInfo;
    fn relevant(self) -> NodeInfo {
        NodeInfo::from(self)
    }
}

impl Relevant for Service {
    type Kept = Self;
    fn relevant(self) -> Self {
        let spec = self.spec.unwrap_or_default();
        Service {
            metadata: meta(self.metadata),
            spec: Some(ServiceSpec { ports: spec.ports.map(|p| p.into_iter().take(MAX_LISTED).collect()), type_: spec.type_, ..ServiceSpec::default() }),
            status: None,
        }
    }
}

impl Relevant for Endpoints {
    type Kept = Self;
    fn relevant(self) -> Self {
        // Addresses without their targetRef, whose resourceVersion moves with every update of
        // the gateway pod.
        let subsets = self.subsets.map(|ss| {
            ss.into_iter()
                .take(MAX_LISTED)
                .map(|s| EndpointSubset {
                    addresses: s.addresses.map(|a| {
                        a.into_iter()
                            .take(MAX_LISTED)
                            .map(|a| EndpointAddress { ip: a.ip, node_name: a.node_name, ..EndpointAddress::default() })
                            .collect()
                    }),
                    ports: s.ports.map(|p| p.into_iter().take(MAX_LISTED).collect()),
                    not_ready_addresses: None,
                })
                .collect()
        });
        Endpoints { metadata: meta(self.metadata), subsets }
    }
}

macro_rules! kept_whole {
    ($($t:ty),*) => {$(
        impl Relevant for $t {
            type Kept = Self;
            fn relevant(self) -> Self {
                self
            }
        }
    )*};
}
kept_whole!(ConfigMap, k8s_openapi::api::coordination::v1::Lease);

/// A remote secret is held as what is read of it: each key's value (a kubeconfig) up to one
/// byte past the longest [`kubeconfig::vet`](super::kubeconfig::vet) reads, which still
/// refuses it. Each labelled Secret could otherwise hold a MiB, for as long as it exists.
impl Relevant for Secret {
    type Kept = Self;
    fn relevant(mut self) -> Self {
        for v in self.data.iter_mut().flat_map(|d| d.values_mut()) {
            v.0.truncate(super::kubeconfig::MAX_KUBECONFIG + 1);
            v.0.shrink_to_fit();
        }
        self.string_data = None;
        self
    }
}

/// What a watched set did.
#[derive(Debug)]
pub enum Update<K> {
    /// The complete current set, keyed by name. Shared, not copied: the watch and every
    /// holder of its latest snapshot hold one map between them, and a change copies it once.
    Snapshot(Arc<BTreeMap<String, K>>),
    /// The watch failed; it retries with backoff. The last snapshot still stands.
    Error(String),
    /// The set grew past [`MAX_OBJECTS`]: it is not followed until a list fits, and the last
    /// snapshot is stale meanwhile. Its own variant, not an error text: a remote's own watch
    /// error, whatever it says, must not pass for it, nor it for a recoverable failure.
    Unfollowed(String),
}

/// Whether `name` could be an object's name in a real API server (a DNS subdomain: at most
/// 253 lowercase letters, digits, '-' and '.'). A remote API server answers whatever it
/// likes, and names reach messages, the status and the log: an object no real server could
/// hold is not seen at all.
fn is_object_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Watches `api` with `config` and yields complete snapshots.
pub fn snapshots<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = Update<K::Kept>> + Send
where
    K: Resource + Relevant + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watch(api, config, None)
}

/// Watches the one object `name` of `api` and yields snapshots of it alone. The field
/// selector only asks: a remote API server may ignore it and list up to [`MAX_OBJECTS`]
/// others, each up to an answer's bound. Those are dropped unstored, so the watch holds one
/// object at most, and no other can pass for it.
pub fn snapshots_of<K>(api: Api<K>, name: &str) -> impl Stream<Item = Update<K::Kept>> + Send
where
    K: Resource + Relevant + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watch(api, watcher::Config::default().fields(&format!("metadata.name={name}")), Some(name.to_owned()))
}

fn watch<K>(api: Api<K>, config: watcher::Config, only: Option<String>) -> impl Stream<Item = Update<K::Kept>> + Send
where
    K: Resource + Relevant + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    type Folded<T> = std::pin::Pin<Box<dyn Stream<Item = Update<T>> + Send>>;
    let open = |api: &Api<K>, config: &watcher::Config, only: &Option<String>| -> Folded<K::Kept> {
        Box::pin(fold(watcher(api.clone(), config.clone()).default_backoff(), only.clone()))
    };
    let start = ((api, config, only), None, None);
    futures::stream::unfold(start, move |(what, mut cur, relist_at): (_, Option<Folded<K::Kept>>, Option<tokio::time::Instant>)| async move {
        if let Some(at) = relist_at {
            tokio::time::sleep_until(at).await;
            cur = None;
        }
        let update = cur.get_or_insert_with(|| open(&what.0, &what.1, &what.2)).next().await?;
        // kube's watcher resumes from the last version it saw and lists again only after an
        // error: a set past the bound would never be listed again, though it shrank. The
        // watcher goes at once, and a new one lists after the pause.
        let relist_at = matches!(update, Update::Unfollowed(_)).then(|| tokio::time::Instant::now() + RELIST_AFTER);
        if relist_at.is_some() {
            cur = None;
        }
        Some((update, (what, cur, relist_at)))
    })
}

/// After a list past [`MAX_OBJECTS`], how long until the watch lists again.
const RELIST_AFTER: std::time::Duration = std::time::Duration::from_mins(1);

fn unfollowed<T>() -> Update<T> {
    Update::Unfollowed(format!("the remote lists more than {MAX_OBJECTS} objects; not followed"))
}

/// [`snapshots`] of a watcher's events; of the object named `only` alone, when given.
fn fold<K>(events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send, only: Option<String>) -> impl Stream<Item = Update<K::Kept>> + Send
where
    K: Resource + Relevant + Send + 'static,
{
    let mut current: Arc<BTreeMap<String, K::Kept>> = Arc::default();
    let mut pending: BTreeMap<String, K::Kept> = BTreeMap::new();
    let mut synced = false;
    let mut overflow = false;
    events.filter_map(move |ev| {
        let out = match ev {
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o) | watcher::Event::Delete(o))
                if only.as_deref().is_some_and(|n| o.meta().name.as_deref() != Some(n)) =>
            {
                None
            }
            Ok(watcher::Event::Init) => {
                pending.clear();
                overflow = false;
                None
            }
            // Past the bound the list is failed at once (its pages may never end), and what
            // it lists from then on is not kept.
            Ok(watcher::Event::InitApply(_)) if overflow => None,
            Ok(watcher::Event::InitApply(o)) => {
                let name = o.name_any();
                if !is_object_name(&name) {
                    None
                } else if pending.len() < MAX_OBJECTS || pending.contains_key(&name) {
                    pending.insert(name, o.relevant());
                    None
                } else {
                    overflow = true;
                    pending.clear();
                    Some(unfollowed())
                }
            }
            // No snapshot until a list fits: the last one stands, stale.
            Ok(watcher::Event::InitDone) if std::mem::take(&mut overflow) => {
                current = Arc::default();
                synced = false;
                None
            }
            Ok(watcher::Event::InitDone) => {
                current = Arc::new(std::mem::take(&mut pending));
                synced = true;
                Some(Update::Snapshot(current.clone()))
            }
            // Not synced (a list past the bound): nothing is followed until a list fits.
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) if !synced => None,
            Ok(watcher::Event::Apply(o)) => {
                let name = o.name_any();
                if !is_object_name(&name) {
                    return std::future::ready(None);
                }
                let o = o.relevant();
                if current.get(&name) == Some(&o) {
                    return std::future::ready(None);
                }
                if current.len() >= MAX_OBJECTS && !current.contains_key(&name) {
                    current = Arc::default();
                    synced = false;
                    return std::future::ready(Some(unfollowed()));
                }
                // Copies the map only while a consumer still holds the previous snapshot.
                Arc::make_mut(&mut current).insert(name, o);
                Some(Update::Snapshot(current.clone()))
            }
            Ok(watcher::Event::Delete(o)) => {
                let name = o.name_any();
                if !current.contains_key(&name) {
                    return std::future::ready(None);
                }
                Arc::make_mut(&mut current).remove(&name);
                Some(Update::Snapshot(current.clone()))
            }
            Err(e) => Some(Update::Error(e.to_string())),
        };
        std::future::ready(out)
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus};

    use super::*;

    #[test]
    fn only_names_a_real_api_server_could_hold_are_seen() {
        for ok in ["node1", "ip-10-20-144-165.ec2.internal", &"a".repeat(253)] {
            assert!(is_object_name(ok), "{ok}");
        }
        for bad in ["", "Node1", "node1\nINFO forged line", &"a".repeat(254), "node 1", "nodé"] {
            assert!(!is_object_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_heartbeat_leaves_a_node_as_discovery_sees_it() {
        let node = |heartbeat: &str, rv: &str| Node {
            metadata: ObjectMeta { name: Some("n1".into()), resource_version: Some(rv.into()), ..ObjectMeta::default() },
            spec: Some(NodeSpec { pod_cidr: Some("10.245.0.0/24".into()), ..NodeSpec::default() }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: "10.20.144.165".into() }]),
                conditions: Some(vec![NodeCondition { type_: "Ready".into(), status: "True".into(), reason: Some(heartbeat.into()), ..NodeCondition::default() }]),
                ..NodeStatus::default()
            }),
        };
        assert_eq!(node("a", "1").relevant(), node("b", "2").relevant());
        let mut moved = node("a", "3");
        moved.status.as_mut().unwrap().addresses.as_mut().unwrap()[0].address = "10.20.144.166".into();
        assert_ne!(node("a", "1").relevant(), moved.relevant());
    }

    fn named(name: String) -> Node {
        Node { metadata: ObjectMeta { name: Some(name), ..ObjectMeta::default() }, ..Node::default() }
    }

    fn run(events: Vec<Result<watcher::Event<Node>, watcher::Error>>) -> Vec<Result<usize, String>> {
        let updates = futures::executor::block_on(fold(futures::stream::iter(events), None).collect::<Vec<_>>());
        updates
            .into_iter()
            .map(|u| match u {
                Update::Snapshot(s) => Ok(s.len()),
                Update::Error(e) => Err(format!("error: {e}")),
                Update::Unfollowed(e) => Err(format!("unfollowed: {e}")),
            })
            .collect()
    }

    /// A remote that lists more objects than a real cluster holds is not followed: its
    /// objects would otherwise grow the controller without bound.
    #[test]
    fn a_remote_listing_too_many_objects_is_failed_not_followed() {
        let many = |n: usize| (0..n).map(|i| watcher::Event::InitApply(named(format!("n{i}"))));
        let mut events = vec![watcher::Event::Init];
        events.extend(many(MAX_OBJECTS + 1));
        events.push(watcher::Event::InitDone);
        // A relist that fits is followed again.
        events.push(watcher::Event::Init);
        events.extend(many(MAX_OBJECTS));
        events.push(watcher::Event::InitDone);
        events.push(watcher::Event::Apply(named("n0".into())));
        events.push(watcher::Event::Delete(named("n1".into())));
        events.push(watcher::Event::Apply(named("n1".into())));
        // Past the bound while watching: nothing more is followed, until a list fits.
        events.push(watcher::Event::Apply(named("extra".into())));
        events.push(watcher::Event::Delete(named("n2".into())));
        events.push(watcher::Event::Apply(named("extra2".into())));
        events.push(watcher::Event::Init);
        events.extend(many(3));
        events.push(watcher::Event::InitDone);
        let out = run(events.into_iter().map(Ok).collect());
        let past = |u: &Result<usize, String>| matches!(u, Err(e) if e == "unfollowed: the remote lists more than 10000 objects; not followed");
        assert!(past(&out[0]), "{:?}", out[0]);
        assert_eq!(out[1..4], [Ok(MAX_OBJECTS), Ok(MAX_OBJECTS - 1), Ok(MAX_OBJECTS)]);
        assert!(past(&out[4]), "{:?}", out[4]);
        assert_eq!(out[5..], [Ok(3)]);
    }

    /// A watch of one named object holds that object alone, whatever the remote lists: a
    /// remote that ignores the field selector would otherwise have the controller hold up to
    /// MAX_OBJECTS answers of a megabyte each, and its first by name taken for the gateway.
    #[test]
    fn a_watch_of_one_name_keeps_that_object_alone() {
        let others = |from: usize| (from..=from + MAX_OBJECTS).map(|i| watcher::Event::InitApply(named(format!("a{i}"))));
        let mut events = vec![watcher::Event::Init];
        events.extend(others(0));
        events.push(watcher::Event::InitApply(named("gw".into())));
        events.extend(others(MAX_OBJECTS + 1));
        events.push(watcher::Event::InitDone);
        events.extend((0..=MAX_OBJECTS).map(|i| watcher::Event::Apply(named(format!("b{i}")))));
        events.push(watcher::Event::Delete(named("a0".into())));
        let mut moved = named("gw".into());
        moved.spec = Some(k8s_openapi::api::core::v1::NodeSpec { pod_cidr: Some("10.245.0.0/24".into()), ..Default::default() });
        events.push(watcher::Event::Apply(moved));
        events.push(watcher::Event::Delete(named("gw".into())));
        events.push(watcher::Event::Apply(named("gw".into())));
        let events = futures::stream::iter(events.into_iter().map(Ok));
        let updates = futures::executor::block_on(fold(events, Some("gw".into())).collect::<Vec<_>>());
        let names: Vec<Vec<String>> = updates
            .into_iter()
            .map(|u| match u {
                Update::Snapshot(s) => s.keys().cloned().collect(),
                Update::Error(e) | Update::Unfollowed(e) => panic!("{e}"),
            })
            .collect();
        assert_eq!(names, [vec!["gw".to_owned()], vec!["gw".to_owned()], vec![], vec!["gw".to_owned()]]);
    }

    /// A remote's own watch error is an error, whatever it says: were it taken for an
    /// unfollowed set, the remote would pause its own relist at will.
    #[test]
    fn a_remote_error_that_reads_like_an_unfollowed_set_stays_an_error() {
        let text = format!("the remote lists more than {MAX_OBJECTS} objects; not followed");
        let forged = watcher::Error::WatchError(kube::core::Status { message: text.clone(), reason: "Expired".into(), code: 500, ..kube::core::Status::default() }.boxed());
        let out = run(vec![Ok(watcher::Event::Init), Ok(watcher::Event::InitDone), Err(forged)]);
        assert_eq!(out[0], Ok(0));
        assert!(matches!(&out[1], Err(e) if e.starts_with("error: ") && e.contains(&text)), "{:?}", out[1]);
    }

    /// A labelled Secret is held as what is read of it: each key's value up to one byte past
    /// the longest kubeconfig read, so a MiB of one key is a cut value, still refused as too
    /// long, and a kubeconfig that fits is kept whole.
    #[test]
    fn a_secret_keeps_no_more_of_a_value_than_is_read() {
        use super::super::kubeconfig::{vet, VetError, MAX_KUBECONFIG};
        let value = |text: String| k8s_openapi::ByteString(text.into_bytes());
        let fits = "apiVersion: v1\nkind: Config\n".to_owned();
        let secret = Secret {
            metadata: ObjectMeta { name: Some("remote".into()), annotations: Some([("a".to_owned(), "b".to_owned())].into()), ..ObjectMeta::default() },
            data: Some([("big".to_owned(), value("a, ".repeat(350_000))), ("small".to_owned(), value(fits.clone()))].into()),
            ..Secret::default()
        };
        let kept = secret.clone().relevant();
        let data = kept.data.as_ref().unwrap();
        assert_eq!(data["small"].0, fits.as_bytes());
        assert_eq!(data["big"].0.len(), MAX_KUBECONFIG + 1);
        assert!(data["big"].0.capacity() <= MAX_KUBECONFIG + 1 + 64, "the cut value still holds {} bytes", data["big"].0.capacity());
        assert_eq!(kept.metadata, secret.metadata);
        let text = String::from_utf8_lossy(&data["big"].0);
        assert!(matches!(vet(&text, "s"), Err(VetError::TooLarge { .. })));
    }

    #[test]
    fn endpoints_keep_where_the_gateway_runs_and_nothing_else() {
        let eps = |node: &str, rv: &str| Endpoints {
            metadata: ObjectMeta { name: Some("gw".into()), resource_version: Some(rv.into()), ..ObjectMeta::default() },
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![EndpointAddress {
                    ip: "10.245.0.5".into(),
                    node_name: Some(node.into()),
                    target_ref: Some(k8s_openapi::api::core::v1::ObjectReference { resource_version: Some(rv.into()), ..Default::default() }),
                    ..EndpointAddress::default()
                }]),
                ..EndpointSubset::default()
            }]),
        };
        assert_eq!(eps("n1", "1").relevant(), eps("n1", "2").relevant());
        assert_ne!(eps("n1", "1").relevant(), eps("n2", "1").relevant());
    }
}
