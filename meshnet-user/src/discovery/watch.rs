//! A watch that keeps a complete, named set of objects: kube-rs's watcher (list, watch,
//! relist on 410 Gone, with backoff) folded into snapshots. A snapshot is only emitted once
//! the initial list is complete, so a consumer never mistakes a half-listed set for
//! deletions.

use std::collections::BTreeMap;

use futures::{Stream, StreamExt as _};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;

/// What a watched set did.
#[derive(Debug)]
pub enum Update<K> {
    /// The complete current set, keyed by name.
    Snapshot(BTreeMap<String, K>),
    /// The watch failed; it retries with backoff. The last snapshot still stands.
    Error(String),
}

/// Watches `api` with `config` and yields complete snapshots.
pub fn snapshots<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = Update<K>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let mut current: BTreeMap<String, K> = BTreeMap::new();
    let mut pending: BTreeMap<String, K> = BTreeMap::new();
    let mut synced = false;
    watcher(api, config).default_backoff().filter_map(move |ev| {
        let out = match ev {
            Ok(watcher::Event::Init) => {
                pending.clear();
                None
            }
            Ok(watcher::Event::InitApply(o)) => {
                pending.insert(o.name_any(), o);
                None
            }
            Ok(watcher::Event::InitDone) => {
                current = std::mem::take(&mut pending);
                synced = true;
                Some(Update::Snapshot(current.clone()))
            }
            Ok(watcher::Event::Apply(o)) => {
                current.insert(o.name_any(), o);
                synced.then(|| Update::Snapshot(current.clone()))
            }
            Ok(watcher::Event::Delete(o)) => {
                current.remove(&o.name_any());
                synced.then(|| Update::Snapshot(current.clone()))
            }
            Err(e) => Some(Update::Error(e.to_string())),
        };
        std::future::ready(out)
    })
}
