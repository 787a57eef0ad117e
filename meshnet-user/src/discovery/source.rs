//! `meshnet agent --kube`: the agent's side of discovery. It watches only the published
//! `meshnet-peers` ConfigMap and its own Node (for the local pod CIDRs), never a Secret, and
//! hands what it sees to the agent, which merges it with the static config.

use std::path::PathBuf;

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{runtime::watcher, Api};
use tokio::sync::mpsc;
use tracing::warn;

use super::{
    published::{Published, PEERS_CONFIGMAP},
    resolve,
    watch::{snapshots, Update},
};

#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub kubeconfig: Option<PathBuf>,
    /// meshnet's namespace, where the controller publishes.
    pub namespace: String,
    /// This node's name, for its pod CIDRs (the downward API gives it as NODE_NAME).
    pub node_name: Option<String>,
}

#[derive(Debug)]
pub enum ApiUpdate {
    /// The published peers, after the watch synced and whenever the object changes. Only
    /// `Published::Entries` may withdraw a peer: a missing or unreadable object never does.
    Peers(Published),
    /// This node's pod CIDRs.
    NodeCidrs(Vec<Ipv4Net>),
    /// A watch failed; the agent keeps what it has.
    Error(String),
}

/// The annotation on a Node that asks its agent for the datapath's logging build
/// (`--datapath-log`): logging on one node while debugging, without touching the DaemonSet or
/// the config every node shares. Read when the agent starts.
pub const DATAPATH_LOG_ANNOTATION: &str = "meshnet.io/datapath-log";

/// How long the agent's start waits for its Node before it loads the default build.
const NODE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether this node's Node object carries `meshnet.io/datapath-log: "true"`. Read once,
/// before the datapath loads; an API server that cannot say so within a few seconds means
/// no, so that an outage never holds the datapath back.
pub async fn node_asks_for_datapath_log(opts: &SourceOptions) -> bool {
    let Some(node) = opts.node_name.as_deref() else { return false };
    let read = async {
        let client = super::local_client(opts.kubeconfig.as_deref()).await?;
        // The whole object rather than its metadata only: once per start, and the shape
        // every API server (1.18 too) and the tests' fake serve alike.
        let meta = Api::<Node>::all(client).get(node).await?;
        anyhow::Ok(meta.metadata.annotations.and_then(|a| a.get(DATAPATH_LOG_ANNOTATION).cloned()))
    };
    match tokio::time::timeout(NODE_READ_TIMEOUT, read).await {
        Ok(Ok(Some(v))) => datapath_log_asked(&v).unwrap_or_else(|shown| {
            warn!(node, annotation = DATAPATH_LOG_ANNOTATION, value = %shown, "the annotation is not \"true\"; datapath logging stays off");
            false
        }),
        Ok(Ok(None)) => false,
        Ok(Err(e)) => {
            warn!(node, error = %e, "could not read this node's {DATAPATH_LOG_ANNOTATION} annotation; datapath logging stays off unless asked for by flag or config");
            false
        }
        Err(_) => {
            warn!(node, "the API server did not answer within {NODE_READ_TIMEOUT:?}; this node's {DATAPATH_LOG_ANNOTATION} annotation is not read");
            false
        }
    }
}

/// What a Node's [`DATAPATH_LOG_ANNOTATION`] value asks for; `Err` with the value as the
/// log shows it when it is neither "true" nor "false": quoted, escaped and cut, as whoever
/// may annotate a Node writes it (up to 256 KiB, newlines that would forge log lines).
fn datapath_log_asked(value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(resolve::Quoted(other).to_string()),
    }
}

/// Starts the watches; updates arrive on `tx`. Connecting fails only on a bad kubeconfig:
/// an unreachable API server just means no updates (the datapath keeps its state).
pub async fn spawn(opts: SourceOptions, tx: mpsc::Sender<ApiUpdate>) -> anyhow::Result<()> {
    let client = super::local_client(opts.kubeconfig.as_deref()).await?;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &opts.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={PEERS_CONFIGMAP}"));
    let ptx = tx.clone();
    tokio::spawn(async move {
        let mut s = std::pin::pin!(snapshots(cms, cfg));
        while let Some(u) = s.next().await {
            let msg = match u {
                Update::Snapshot(m) => ApiUpdate::Peers(Published::parse(m.values().next())),
                Update::Error(e) | Update::Unfollowed(e) => ApiUpdate::Error(format!("watching {PEERS_CONFIGMAP}: {e}")),
            };
            if ptx.send(msg).await.is_err() {
                break;
            }
        }
    });
    if let Some(node) = opts.node_name {
        let nodes = Api::<Node>::all(client);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        tokio::spawn(async move {
            let mut s = std::pin::pin!(snapshots(nodes, cfg));
            while let Some(u) = s.next().await {
                let msg = match u {
                    Update::Snapshot(m) => ApiUpdate::NodeCidrs(resolve::node_pod_cidrs(m.values())),
                    Update::Error(e) | Update::Unfollowed(e) => ApiUpdate::Error(format!("watching node {node}: {e}")),
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
    } else { warn!("no --node-name (or NODE_NAME): the local pod CIDRs come from the config file only") }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whoever may annotate a Node writes the value (up to 256 KiB): the log shows it quoted,
    /// escaped and cut, so that it forges no line and floods nothing.
    #[test]
    fn an_annotation_value_is_logged_quoted_and_cut() {
        assert_eq!(datapath_log_asked("true"), Ok(true));
        assert_eq!(datapath_log_asked("false"), Ok(false));
        assert_eq!(datapath_log_asked("yes"), Err("\"yes\"".into()));
        let forged = format!("yes\n2026-12-06T00:00:00Z  INFO meshnet: published peers\r\u{1b}[2J{}", "x".repeat(256 * 1024));
        let shown = datapath_log_asked(&forged).unwrap_err();
        assert!(shown.len() < 120, "{} bytes: {}", shown.len(), &shown[..120.min(shown.len())]);
        assert!(shown.starts_with("\"yes\\n2026-12-06") && shown.ends_with("..."), "{shown}");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
    }
}
