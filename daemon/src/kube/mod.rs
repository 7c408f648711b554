//! The Kubernetes side: cluster inputs (watched ConfigMaps and pods) and the
//! Kubernetes sinks (the port-usage ConfigMap, this Node's conditions).
//!
//! Like HTTP, Kubernetes is a sink: sources and their state never wait on
//! it. With no cluster configured the daemon runs standalone and nothing
//! here starts. With one, nothing here blocks start-up either: an API server
//! that is down, slow or throttling makes the sinks retry with backoff while
//! HTTP keeps serving local state, and the current state is published once
//! it answers.
//!
//! Layout: [`client`] (which cluster, the client, backoff, metrics),
//! [`mirror`] (a watched set of objects), [`settings`] (the three input
//! ConfigMaps), [`ranges`] (port-range annotations), [`pods`] (hostPorts on
//! this node, live instance ids), [`port_usage`] (the ConfigMap sink),
//! [`node_status`] (the node-condition writer), [`engines`] (version
//! ConfigMaps in, availability out, the cluster-wide rescan bus).
pub mod client;
pub mod engines;
pub mod mirror;
pub mod node_status;
pub mod pods;
pub mod port_usage;
pub mod ranges;
pub mod settings;

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::Api;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::client::{Access, ApiMetrics, ClientError};
use self::{
    node_status::{NodeConditions, NodeStatusState},
    pods::{HostPorts, LiveInsIds},
    port_usage::PublishState,
    settings::Settings,
};
use crate::ports::Ports;

/// Everything the daemon reads and writes lives here (COMPAT.md).
pub const NAMESPACE: &str = "kube-system";
/// The field manager of every write, so `managedFields` name this daemon.
pub const FIELD_MANAGER: &str = "polarstack-daemon";
/// A write that takes longer is abandoned and retried.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster mode needs this node's name: set --current-node-name or CURRENT_NODE_NAME (the hostname is never guessed)")]
    NoNodeName,
    #[error("--current-node-name {0:?} is not a valid node name")]
    BadNodeName(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Settings of the Kubernetes side (from flags).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub access: Access,
    pub node: Option<String>,
    pub mpd_controller_cm_name: String,
    pub core_version_cm_labels: String,
    pub heartbeat: Duration,
    pub publish_debounce: Duration,
    pub publish_min_interval: Duration,
}

/// A running cluster connection: read handles for the HTTP sink and the
/// other domains.
#[derive(Clone)]
pub struct Cluster {
    pub node: String,
    /// For the compat endpoints that read the cluster on request.
    pub client: kube::Client,
    pub metrics: Arc<ApiMetrics>,
    pub settings: watch::Receiver<Settings>,
    pub host_ports: watch::Receiver<HostPorts>,
    pub port_usage: watch::Receiver<PublishState>,
    pub node_status: watch::Receiver<NodeStatusState>,
    pub conditions: NodeConditions,
    pub live_instances: Arc<LiveInsIds>,
    pub versions: watch::Receiver<Vec<crate::engines::versions::EngineVersion>>,
    /// The version ConfigMaps have been listed once.
    pub versions_synced: watch::Receiver<bool>,
}

/// What `/api/v2/kubernetes` and `/readyz` show.
#[derive(Serialize)]
pub struct ClusterView {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ports: Option<HostPorts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_usage: Option<PublishState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_status: Option<NodeStatusState>,
}

impl Cluster {
    pub fn view(cluster: Option<&Cluster>) -> ClusterView {
        match cluster {
            None => ClusterView {
                mode: "standalone",
                node: None,
                settings: None,
                host_ports: None,
                port_usage: None,
                node_status: None,
            },
            Some(c) => ClusterView {
                mode: "cluster",
                node: Some(c.node.clone()),
                settings: Some(c.settings.borrow().clone()),
                host_ports: Some(c.host_ports.borrow().clone()),
                port_usage: Some(c.port_usage.borrow().clone()),
                node_status: Some(c.node_status.borrow().clone()),
            },
        }
    }
}

/// A DNS-1123 subdomain, as node, pod and namespace names are: they end up
/// in object names and URL paths.
pub fn is_object_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Starts the cluster side, or returns `None` in standalone mode. Fails only
/// on configuration mistakes; an unreachable API server is not one.
pub async fn start(
    cfg: ClusterConfig,
    ports: Ports,
    shutdown: CancellationToken,
) -> Result<Option<Cluster>, ClusterError> {
    if cfg.access == Access::Standalone {
        return Ok(None);
    }
    let node = cfg.node.clone().filter(|n| !n.trim().is_empty()).ok_or(ClusterError::NoNodeName)?;
    if !is_object_name(&node) {
        return Err(ClusterError::BadNodeName(node));
    }
    let client = client::client(&cfg.access).await?;
    tracing::info!(node = %node, access = ?cfg.access, "cluster mode: publishing to Kubernetes");
    let metrics = Arc::new(ApiMetrics::default());
    let settings =
        settings::spawn(client.clone(), cfg.mpd_controller_cm_name.clone(), metrics.clone(), shutdown.clone());
    let host_ports = pods::spawn_host_ports(client.clone(), &node, metrics.clone(), shutdown.clone());
    let live_instances = LiveInsIds::spawn(client.clone(), metrics.clone(), shutdown.clone());
    let (versions, versions_synced) =
        engines::spawn_versions(client.clone(), &cfg.core_version_cm_labels, metrics.clone(), shutdown.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let (conditions, node_status) = node_status::spawn(
        nodes.clone(),
        node.clone(),
        cfg.heartbeat,
        settings.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    spawn_oob(settings.clone(), conditions.clone());
    let (usage_tx, port_usage) = watch::channel(PublishState::default());
    let publisher = port_usage::Publisher {
        api: Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE),
        nodes,
        node: node.clone(),
        ports,
        settings: settings.clone(),
        host_ports: host_ports.clone(),
        metrics: metrics.clone(),
        state: usage_tx,
        debounce: cfg.publish_debounce,
        min_interval: cfg.publish_min_interval,
    };
    tokio::spawn(publisher.run(shutdown));
    Ok(Some(Cluster {
        node,
        client,
        metrics,
        settings,
        host_ports,
        port_usage,
        node_status,
        conditions,
        live_instances,
        versions,
        versions_synced,
    }))
}

/// Connects the engines domain to the cluster: the availability ConfigMap
/// and the rescan bus (returned for `RequestCheckCoreVersion`).
pub fn start_engines(
    c: &Cluster,
    engines: &crate::engines::Engines,
    shutdown: CancellationToken,
) -> engines::RescanBus {
    let publisher = engines::AvailabilityPublisher {
        api: Api::<ConfigMap>::namespaced(c.client.clone(), NAMESPACE),
        nodes: Api::all(c.client.clone()),
        node: c.node.clone(),
        state: engines.state.clone(),
        versions_synced: c.versions_synced.clone(),
        metrics: c.metrics.clone(),
    };
    tokio::spawn(publisher.run(shutdown.clone()));
    engines::spawn_bus(c.client.clone(), engines.clone(), c.metrics.clone(), shutdown)
}

/// The ownerReference to this Node, so per-node ConfigMaps go with the node
/// (the original left them behind). None while the Node cannot be read: the
/// ConfigMap is then published without it, and the caller asks again later.
pub async fn node_owner(nodes: &Api<Node>, node: &str, metrics: &ApiMetrics) -> Option<serde_json::Value> {
    match client::call(metrics, "get", "nodes", nodes.get(node)).await {
        Ok(n) => {
            let uid = n.metadata.uid?;
            Some(serde_json::json!({"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}))
        }
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot read this Node; publishing without an ownerReference");
            None
        }
    }
}

/// Sets `NodeOobIP` whenever `isCheckOObIP` is (or turns) on.
fn spawn_oob(mut settings: watch::Receiver<Settings>, conditions: NodeConditions) {
    tokio::spawn(async move {
        let mut set = false;
        loop {
            let s = settings.borrow_and_update().clone();
            if s.synced && s.check_oob_ip && !set {
                conditions.set(node_status::oob_ip());
            }
            set = s.synced && s.check_oob_ip;
            if settings.changed().await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["node-1", "a", "ip-10-0-0-1.ec2.internal"] {
            assert!(is_object_name(ok), "{ok}");
        }
        for bad in ["", "Node1", "-a", "a-", "a_b", "a/b", &"x".repeat(254)] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }
}
