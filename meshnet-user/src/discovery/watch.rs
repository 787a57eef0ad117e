//! A watch that keeps a complete, named set of objects: kube-rs's watcher (list, watch,
//! relist on 410 Gone, with backoff) folded into snapshots. A snapshot is only emitted once
//! the initial list is complete, so a consumer never mistakes a half-listed set for
//! deletions.
//!
//! Objects are kept trimmed to what discovery reads ([`Relevant`]), and a snapshot is only
//! emitted when that part changed. A node's status heartbeat (every 10 s on Kubernetes 1.18,
//! for every node of every remote cluster) then costs one comparison, not a copy of the
//! whole set and a recomputation of every peer: per event the work is O(log n), and the
//! initial list O(n), never O(n²). Changes are snapshot together, at most every
//! [`SNAPSHOT_EVERY`]: each snapshot taken while the last is still held copies the set.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

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
    /// holder of its latest snapshot hold one map between them, and the changes folded into
    /// the next snapshot copy it once.
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
        Box::pin(fold_paced(watcher(api.clone(), config.clone()).default_backoff(), only.clone(), SNAPSHOT_EVERY))
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

/// One watched set, folded in one event at a time. What goes out is decided here; when a
/// snapshot goes out is its driver's (`fold`, [`fold_paced`]).
struct Folder<K: Relevant> {
    only: Option<String>,
    current: Arc<BTreeMap<String, K::Kept>>,
    pending: BTreeMap<String, K::Kept>,
    synced: bool,
    overflow: bool,
    /// `current` changed since the last snapshot went out.
    dirty: bool,
}

impl<K: Resource + Relevant> Folder<K> {
    fn new(only: Option<String>) -> Self {
        Self { only, current: Arc::default(), pending: BTreeMap::new(), synced: false, overflow: false, dirty: false }
    }

    /// The snapshot owed, if the set changed since the last one.
    fn flush(&mut self, out: &mut VecDeque<Update<K::Kept>>) {
        if std::mem::take(&mut self.dirty) {
            out.push_back(Update::Snapshot(self.current.clone()));
        }
    }

    /// An error or an unfollowed set goes out after the snapshot owed: a consumer sees them
    /// in the order they happened.
    fn emit(&mut self, out: &mut VecDeque<Update<K::Kept>>, update: Update<K::Kept>) {
        self.flush(out);
        out.push_back(update);
    }

    fn apply(&mut self, ev: Result<watcher::Event<K>, watcher::Error>, out: &mut VecDeque<Update<K::Kept>>) {
        match ev {
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o) | watcher::Event::Delete(o))
                if self.only.as_deref().is_some_and(|n| o.meta().name.as_deref() != Some(n)) => {}
            Ok(watcher::Event::Init) => {
                self.pending.clear();
                self.overflow = false;
            }
            // Past the bound the list is failed at once (its pages may never end), and what
            // it lists from then on is not kept.
            Ok(watcher::Event::InitApply(_)) if self.overflow => {}
            Ok(watcher::Event::InitApply(o)) => {
                let name = o.name_any();
                if !is_object_name(&name) {
                    return;
                }
                if self.pending.len() < MAX_OBJECTS || self.pending.contains_key(&name) {
                    self.pending.insert(name, o.relevant());
                } else {
                    self.overflow = true;
                    self.pending.clear();
                    self.emit(out, unfollowed());
                }
            }
            // No snapshot until a list fits: the last one stands, stale.
            Ok(watcher::Event::InitDone) if std::mem::take(&mut self.overflow) => {
                self.flush(out);
                self.current = Arc::default();
                self.synced = false;
            }
            Ok(watcher::Event::InitDone) => {
                self.current = Arc::new(std::mem::take(&mut self.pending));
                self.synced = true;
                self.dirty = true;
            }
            // Not synced (a list past the bound): nothing is followed until a list fits.
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) if !self.synced => {}
            Ok(watcher::Event::Apply(o)) => {
                let name = o.name_any();
                if !is_object_name(&name) {
                    return;
                }
                let o = o.relevant();
                if self.current.get(&name) == Some(&o) {
                    return;
                }
                if self.current.len() >= MAX_OBJECTS && !self.current.contains_key(&name) {
                    self.flush(out);
                    self.current = Arc::default();
                    self.synced = false;
                    out.push_back(unfollowed());
                    return;
                }
                // Copies the map only while a consumer still holds the previous snapshot:
                // once per snapshot taken, however many events are folded in before it.
                Arc::make_mut(&mut self.current).insert(name, o);
                self.dirty = true;
            }
            Ok(watcher::Event::Delete(o)) => {
                let name = o.name_any();
                if self.current.contains_key(&name) {
                    Arc::make_mut(&mut self.current).remove(&name);
                    self.dirty = true;
                }
            }
            Err(e) => self.emit(out, Update::Error(e.to_string())),
        }
    }
}

/// [`snapshots`] of a watcher's events, one for each event that changes the set; of the
/// object named `only` alone, when given.
#[cfg(test)]
fn fold<K>(events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send, only: Option<String>) -> impl Stream<Item = Update<K::Kept>> + Send
where
    K: Resource + Relevant + Send + 'static,
{
    let mut folder = Folder::<K>::new(only);
    events.flat_map(move |ev| {
        let mut out = VecDeque::new();
        folder.apply(ev, &mut out);
        folder.flush(&mut out);
        futures::stream::iter(out)
    })
}

/// How often a watched set that keeps changing is snapshot at most. Each snapshot taken
/// while the last is still held (by the remote's task, the controller, a queued view) costs
/// a copy of the whole set: a remote streaming small changes to each of 10,000 nodes would
/// otherwise cost one copy of some megabytes per event. The controller waits 50 ms for
/// changes to settle before it publishes anyway.
pub const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// [`snapshots`] of a watcher's events, as `fold` makes them but coalesced: every event
/// already at hand is folded in before a snapshot is taken, and a snapshot is taken at most
/// every `every`, and at the latest `every` after the set changed, however fast events
/// come. Errors and unfollowed sets go out at once, after the snapshot they follow.
fn fold_paced<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    only: Option<String>,
    every: std::time::Duration,
) -> impl Stream<Item = Update<K::Kept>> + Send
where
    K: Resource + Relevant + Send + 'static,
{
    use futures::FutureExt as _;
    use tokio::time::Instant;
    struct Paced<S, K: Relevant> {
        events: std::pin::Pin<Box<S>>,
        folder: Folder<K>,
        out: VecDeque<Update<K::Kept>>,
        /// When the last snapshot went out, and when the set first changed since.
        last: Option<Instant>,
        since: Option<Instant>,
        ended: bool,
    }
    let start = Paced { events: Box::pin(events), folder: Folder::<K>::new(only), out: VecDeque::new(), last: None, since: None, ended: false };
    futures::stream::unfold(start, move |mut p| async move {
        loop {
            if let Some(u) = p.out.pop_front() {
                if matches!(u, Update::Snapshot(_)) {
                    (p.last, p.since) = (Some(Instant::now()), None);
                }
                return Some((u, p));
            }
            if p.ended {
                return None;
            }
            let ev = match p.since.filter(|_| p.folder.dirty) {
                None => p.events.next().await,
                Some(since) => {
                    let now = Instant::now();
                    let (quiet_at, latest) = (p.last.map_or(now, |l| l + every), since + every);
                    if now >= latest {
                        p.folder.flush(&mut p.out);
                        continue;
                    }
                    match p.events.next().now_or_never() {
                        Some(ev) => ev,
                        None if now >= quiet_at => {
                            p.folder.flush(&mut p.out);
                            continue;
                        }
                        None => tokio::select! {
                            biased;
                            ev = p.events.next() => ev,
                            () = tokio::time::sleep_until(quiet_at.min(latest)) => {
                                p.folder.flush(&mut p.out);
                                continue;
                            }
                        },
                    }
                }
            };
            if let Some(ev) = ev {
                p.folder.apply(ev, &mut p.out);
                if p.folder.dirty && p.since.is_none() {
                    p.since = Some(Instant::now());
                }
            } else {
                p.folder.flush(&mut p.out);
                p.ended = true;
            }
        }
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

    /// Node `name` with pod CIDR number `cidr`.
    fn node_in(name: &str, cidr: u32) -> Node {
        let mut n = named(name.into());
        n.spec = Some(NodeSpec { pod_cidr: Some(format!("{}/24", std::net::Ipv4Addr::from(0x0a00_0000 + (cidr << 8)))), ..NodeSpec::default() });
        n
    }

    /// A list of 10,000 nodes, then `changes` events that each move a node's pod CIDR.
    fn listed_then_changed(changes: u32) -> Vec<Result<watcher::Event<Node>, watcher::Error>> {
        let mut events = vec![watcher::Event::Init];
        events.extend((0..10_000).map(|i| watcher::Event::InitApply(node_in(&format!("n{i}"), i))));
        events.push(watcher::Event::InitDone);
        events.extend((0..changes).map(|i| watcher::Event::Apply(node_in(&format!("n{}", i * 7 % 10_000), 20_000 + i))));
        events.into_iter().map(Ok).collect()
    }

    fn sets(updates: Vec<Update<NodeInfo>>) -> Vec<Arc<BTreeMap<String, NodeInfo>>> {
        updates
            .into_iter()
            .map(|u| match u {
                Update::Snapshot(s) => s,
                Update::Error(e) | Update::Unfollowed(e) => panic!("{e}"),
            })
            .collect()
    }

    /// A burst of events at hand is folded in whole before a snapshot is taken: each snapshot
    /// still held costs the next change a copy of the whole set, some megabytes for 10,000
    /// nodes, and a remote could stream changes as fast as it likes. One snapshot a change
    /// (1,001 here, 1,000 copies) becomes one in all, the same set.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_snapshot_not_one_each() {
        let each = sets(fold(futures::stream::iter(listed_then_changed(1000)), None).collect().await);
        assert_eq!(each.len(), 1001);
        let paced = sets(fold_paced(futures::stream::iter(listed_then_changed(1000)), None, SNAPSHOT_EVERY).collect().await);
        assert_eq!(paced.len(), 1);
        assert_eq!(paced.last(), each.last());
    }

    /// Changes that keep coming, one a millisecond for a second, are snapshot once every
    /// SNAPSHOT_EVERY at most (so copied as often), and the last snapshot is the whole state.
    #[tokio::test(start_paused = true)]
    async fn changes_that_keep_coming_are_snapshot_at_a_bounded_rate() {
        let all = listed_then_changed(1000);
        let events = futures::stream::iter(all.into_iter().enumerate()).then(|(i, e)| async move {
            if i > 10_002 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            e
        });
        let started = tokio::time::Instant::now();
        let paced = sets(fold_paced(events, None, SNAPSHOT_EVERY).collect().await);
        let most = started.elapsed().as_millis() / SNAPSHOT_EVERY.as_millis() + 2;
        assert!(u128::try_from(paced.len()).unwrap() <= most && paced.len() > 1, "{} snapshots over {:?}", paced.len(), started.elapsed());
        let each = sets(fold(futures::stream::iter(listed_then_changed(1000)), None).collect().await);
        assert_eq!(paced.last(), each.last());
    }

    /// An error goes out after the snapshot of the changes before it, and before those after.
    #[tokio::test(start_paused = true)]
    async fn coalesced_snapshots_keep_their_place_around_errors() {
        let error = || watcher::Error::WatchError(kube::core::Status { message: "gone".into(), code: 500, ..kube::core::Status::default() }.boxed());
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(node_in("a", 1))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(node_in("b", 2))),
            Err(error()),
            Ok(watcher::Event::Apply(node_in("c", 3))),
            Ok(watcher::Event::Delete(node_in("a", 1))),
        ];
        let out: Vec<Result<Vec<String>, String>> = fold_paced(futures::stream::iter(events), None, SNAPSHOT_EVERY)
            .map(|u| match u {
                Update::Snapshot(s) => Ok(s.keys().cloned().collect()),
                Update::Error(e) | Update::Unfollowed(e) => Err(e),
            })
            .collect()
            .await;
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0], Ok(vec!["a".to_owned(), "b".to_owned()]));
        assert!(out[1].is_err());
        assert_eq!(out[2], Ok(vec!["b".to_owned(), "c".to_owned()]));
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
