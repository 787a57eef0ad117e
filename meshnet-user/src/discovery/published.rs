//! What the controller publishes and the agents read: the one interface between the two
//! roles. The agent imports this module, never the controller.
//!
//! Two ConfigMaps in meshnet's namespace:
//! - [`PEERS_CONFIGMAP`] (`peers.yaml`): the peers, in the config file's peer format. Every
//!   agent watches it, so it changes only when a peer does.
//! - [`STATUS_CONFIGMAP`] (`status.yaml`): each peer's stale, refused or error state, for
//!   operators. It churns with remote API servers' health, and no agent watches it (their RBAC
//!   cannot even read it), so that churn never wakes every node.
//! - [`HOLDS_CONFIGMAP`] (`holds.yaml`): what each configured peer that `peers.yaml` does not
//!   list now (refused, left out) was last published with, so that a restarted or newly
//!   elected controller still knows who holds which CIDR. The controller's alone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use serde::{Deserialize, Serialize};

use crate::config::RawPeer;

pub const PEERS_CONFIGMAP: &str = "meshnet-peers";
pub const PEERS_KEY: &str = "peers.yaml";
pub const STATUS_CONFIGMAP: &str = "meshnet-status";
pub const STATUS_KEY: &str = "status.yaml";
pub const HOLDS_CONFIGMAP: &str = "meshnet-holds";
pub const HOLDS_KEY: &str = "holds.yaml";

/// A peer's health as published beside it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// The remote API server is unreachable or failing: the peer is its last known state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
    /// Why the peer is refused (overlapping CIDRs, a refused kubeconfig, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The last problem seen, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A peer's remote nodes left out of what is published (a tunnel peer's nodes or node pod
    /// CIDRs, a gateway peer's gateway nodes), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// What this cluster's own Nodes now claim of what the peer was published with (a pod
    /// CIDR, an address): the peer keeps it, and traffic there still goes to the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_clash: Option<String>,
}

/// One entry of the published peer list, parsed on its own so that one entry the reader
/// cannot understand (a field from a newer controller, a hand edit) spoils nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishedEntry {
    Peer(RawPeer),
    /// Not a peer this reader understands; `name` when the entry has a readable one.
    Bad { index: usize, name: Option<String>, error: String },
}

/// What the published ConfigMap says about the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// There is no such ConfigMap (not published yet, or deleted).
    Missing,
    /// The ConfigMap exists but its peer list cannot be read at all.
    Unreadable(String),
    /// The list, entry by entry.
    Entries(Vec<PublishedEntry>),
}

impl Published {
    /// Parses the published peers: a YAML list whose entries are parsed one by one.
    #[must_use]
    pub fn parse(cm: Option<&ConfigMap>) -> Self {
        Self::parse_key(cm, PEERS_KEY)
    }

    fn parse_key(cm: Option<&ConfigMap>, key: &str) -> Self {
        let Some(cm) = cm else { return Self::Missing };
        let Some(text) = cm.data.as_ref().and_then(|d| d.get(key)) else {
            return Self::Unreadable(format!("the ConfigMap has no key {key}"));
        };
        if text.trim().is_empty() {
            return Self::Unreadable(format!("{key} is empty (an empty publish is written as [])"));
        }
        if let Err(e) = crate::yaml::bound_aliases(text) {
            return Self::Unreadable(format!("{key}: {e}"));
        }
        let values: Vec<serde_yaml::Value> = match serde_yaml::from_str(text) {
            Ok(v) => v,
            Err(e) => return Self::Unreadable(format!("{key} is not a YAML list: {e}")),
        };
        let mut seen = BTreeSet::new();
        let entries = values
            .into_iter()
            .enumerate()
            .map(|(index, v)| {
                let name = v.get("name").and_then(serde_yaml::Value::as_str).map(str::to_owned);
                match serde_yaml::from_value::<RawPeer>(v) {
                    Ok(p) if !seen.insert(p.name.clone()) => {
                        PublishedEntry::Bad { index, name: Some(p.name), error: "listed twice; the first entry counts".into() }
                    }
                    Ok(p) => PublishedEntry::Peer(p),
                    Err(e) => PublishedEntry::Bad { index, name, error: e.to_string() },
                }
            })
            .collect();
        Self::Entries(entries)
    }
}

/// The readable entries of the published peers.
#[must_use]
pub fn readable_peers(cm: &ConfigMap) -> Vec<RawPeer> {
    readable(cm, PEERS_KEY)
}

/// The holds in [`HOLDS_CONFIGMAP`], entry by entry.
#[must_use]
pub fn parse_holds(cm: Option<&ConfigMap>) -> Published {
    Published::parse_key(cm, HOLDS_KEY)
}

/// The readable entries of the holds.
#[must_use]
pub fn readable_holds(cm: &ConfigMap) -> Vec<RawPeer> {
    readable(cm, HOLDS_KEY)
}

fn readable(cm: &ConfigMap, key: &str) -> Vec<RawPeer> {
    match Published::parse_key(Some(cm), key) {
        Published::Entries(e) => e
            .into_iter()
            .filter_map(|e| match e {
                PublishedEntry::Peer(p) => Some(p),
                PublishedEntry::Bad { .. } => None,
            })
            .collect(),
        Published::Missing | Published::Unreadable(_) => Vec::new(),
    }
}

/// The peers' status as published in [`STATUS_CONFIGMAP`].
#[must_use]
pub fn parse_status(cm: &ConfigMap) -> BTreeMap<String, PeerStatus> {
    cm.data
        .as_ref()
        .and_then(|d| d.get(STATUS_KEY))
        .filter(|t| crate::yaml::bound_aliases(t).is_ok())
        .and_then(|t| serde_yaml::from_str(t).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(peers: Option<&str>) -> ConfigMap {
        ConfigMap { data: peers.map(|p| [(PEERS_KEY.to_string(), p.to_string())].into()), ..ConfigMap::default() }
    }

    #[test]
    fn published_peers_are_parsed_one_by_one() {
        let text = "- name: c2\n  podCIDRs: [10.245.0.0/16]\n  gateways: [{address: 10.20.144.165, port: 32361}]\n\
                    - name: c3\n  podCIDRs: [10.246.0.0/16]\n  gateways: [{address: 10.20.144.170, port: 30443}]\n  weight: 3\n\
                    - podCIDRs: oops\n\
                    - name: c2\n  podCIDRs: [10.247.0.0/16]\n  gateways: [{address: 10.20.144.171, port: 30443}]\n";
        let Published::Entries(e) = Published::parse(Some(&cm(Some(text)))) else { panic!("not parsed") };
        assert_eq!(e.len(), 4);
        assert!(matches!(&e[0], PublishedEntry::Peer(p) if p.name == "c2" && p.pod_cidrs == ["10.245.0.0/16"]));
        assert!(matches!(&e[1], PublishedEntry::Bad { index: 1, name: Some(n), error } if n == "c3" && error.contains("unknown field `weight`")), "{:?}", e[1]);
        assert!(matches!(&e[2], PublishedEntry::Bad { index: 2, name: None, .. }), "{:?}", e[2]);
        assert!(matches!(&e[3], PublishedEntry::Bad { index: 3, name: Some(n), error } if n == "c2" && error.contains("listed twice")));
        assert_eq!(readable_peers(&cm(Some(text))).len(), 1);
    }

    #[test]
    fn missing_or_garbage_is_never_an_empty_list() {
        assert_eq!(Published::parse(None), Published::Missing);
        for bad in [None, Some(""), Some("{{{ not yaml"), Some("name: c2\n"), Some("42")] {
            assert!(matches!(Published::parse(Some(&cm(bad))), Published::Unreadable(_)), "{bad:?}");
        }
        assert_eq!(Published::parse(Some(&cm(Some("[]\n")))), Published::Entries(vec![]));
    }

    /// Anyone who may edit the ConfigMaps could otherwise make every agent and the controller
    /// expand a few kilobytes of aliases into gigabytes (see `crate::yaml`).
    #[test]
    fn an_alias_bomb_makes_the_objects_unreadable() {
        let text = crate::yaml::alias_bomb();
        let Published::Unreadable(why) = Published::parse(Some(&cm(Some(&text)))) else { panic!("read") };
        assert!(why.contains("YAML aliases"), "{why}");
        assert!(readable_holds(&ConfigMap { data: Some([(HOLDS_KEY.to_string(), text.clone())].into()), ..ConfigMap::default() }).is_empty());
        let status = format!("c1: {{stale: true}}\nlist:\n{}", text.replace("- ", "  - "));
        assert!(parse_status(&ConfigMap { data: Some([(STATUS_KEY.to_string(), status)].into()), ..ConfigMap::default() }).is_empty());
        // An anchor used once more is no bomb.
        let small = "- &a {name: c2, podCIDRs: [10.245.0.0/16], gateways: [{address: 10.20.144.165, port: 32361}]}\n- *a\n";
        assert!(matches!(Published::parse(Some(&cm(Some(small)))), Published::Entries(e) if e.len() == 2));
    }

    #[test]
    fn holds_are_read_entry_by_entry_and_garbage_holds_nothing() {
        let holds = |text: &str| ConfigMap { data: Some([(HOLDS_KEY.to_string(), text.to_string())].into()), ..ConfigMap::default() };
        let text = "- name: c2\n  podCIDRs: [10.245.0.0/16]\n  gateways: [{address: 10.20.144.165, port: 32361}]\n- podCIDRs: oops\n";
        assert_eq!(readable_holds(&holds(text)).iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["c2"]);
        for bad in ["{{{ not yaml", "name: c2\n", "42", ""] {
            assert!(readable_holds(&holds(bad)).is_empty(), "{bad:?}");
        }
        // The peers' key is not the holds' one.
        assert!(readable_holds(&cm(Some(text))).is_empty());
        assert_eq!(parse_holds(None), Published::Missing);
    }
}
