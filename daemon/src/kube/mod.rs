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
//! Two halves, started apart so the wiring reads sources -> state -> sinks:
//! [`connect`] starts the inputs ([`Cluster`]: settings, this node's pods,
//! live instance ids, engine versions), which the domains are given;
//! [`Cluster::publish`] starts the sinks ([`Publishing`]) once the domains
//! run, reading only their published state.
//!
//! Layout: [`client`] (which cluster, the client, metrics), [`mirror`] (a
//! watched set of objects), [`settings`] (the three input ConfigMaps),
//! [`ranges`] (port-range annotations), [`pods`] (hostPorts on this node),
//! [`instances`] (live instance ids), [`services`] (allocated nodePorts), [`owned`]
//! (writing a node-owned ConfigMap),
//! [`port_usage`] (the port-usage ConfigMap), [`node_status`] (the
//! node-condition writer), [`engines`] (version ConfigMaps in, availability
//! out, the cluster-wide rescan bus).
pub mod client;
pub mod engines;
pub mod instances;
pub mod mirror;
pub mod node_status;
pub mod owned;
pub mod pods;
pub mod port_usage;
pub mod ranges;
pub mod services;
pub mod settings;

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use serde::Serialize;
use tokio::sync::watch;

pub use self::client::{Access, ApiMetrics, ClientError};
use self::{
    engines::RescanBus,
    instances::LiveInsIds,
    node_status::NodeStatusState,
    owned::NodeOwned,
    port_usage::{PublishState, Timing},
    settings::Settings,
};
use crate::{
    engines::{versions::EngineVersion, Engines},
    network::{NetworkState, NicConfig},
    ports::{
        occupancy::{ClaimSet, ClaimSource},
        ClaimInputs, Ports,
    },
    tasks::Tasks,
};

/// Everything the daemon reads and writes lives here (docs/compat.md).
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

/// The cluster's inputs, watched: what the sources and domains are told.
#[derive(Clone)]
pub struct Cluster {
    pub node: String,
    /// For the compat endpoints that read the cluster on request.
    pub client: kube::Client,
    pub metrics: Arc<ApiMetrics>,
    pub settings: watch::Receiver<Settings>,
    /// hostPorts of this node's pods (a claim source of the ports domain).
    pub host_ports: watch::Receiver<ClaimSet>,
    /// Allocated nodePorts of the cluster's Services (another).
    pub node_ports: watch::Receiver<ClaimSet>,
    pub live_instances: Arc<LiveInsIds>,
    pub versions: watch::Receiver<Vec<EngineVersion>>,
    /// The version ConfigMaps have been listed once.
    pub versions_synced: watch::Receiver<bool>,
    cfg: ClusterConfig,
}

/// The Kubernetes sinks, running: their state for the HTTP API.
#[derive(Clone)]
pub struct Publishing {
    pub port_usage: watch::Receiver<PublishState>,
    pub node_status: watch::Receiver<NodeStatusState>,
    /// Reaches every daemon (RequestCheckCoreVersion).
    pub rescan_bus: RescanBus,
}

/// What `/api/v2/kubernetes` shows.
#[derive(Serialize)]
pub struct ClusterView {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ports: Option<ClaimSet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ports: Option<ClaimSet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_usage: Option<PublishState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_status: Option<NodeStatusState>,
}

impl ClusterView {
    pub fn of(cluster: Option<(&Cluster, &Publishing)>) -> Self {
        match cluster {
            None => ClusterView {
                mode: "standalone",
                node: None,
                settings: None,
                host_ports: None,
                node_ports: None,
                port_usage: None,
                node_status: None,
            },
            Some((c, p)) => ClusterView {
                mode: "cluster",
                node: Some(c.node.clone()),
                settings: Some(c.settings.borrow().clone()),
                host_ports: Some(c.host_ports.borrow().clone()),
                node_ports: Some(c.node_ports.borrow().clone()),
                port_usage: Some(p.port_usage.borrow().clone()),
                node_status: Some(p.node_status.borrow().clone()),
            },
        }
    }
}

/// Publishes `next` on `tx` unless it equals what is there: receivers wake
/// only for a change.
fn set_if_changed<T: PartialEq>(tx: &watch::Sender<T>, next: T) {
    tx.send_if_modified(|cur| {
        let changed = *cur != next;
        *cur = next;
        changed
    });
}

/// What a claim source finds in its objects, by port.
type Claims = std::collections::BTreeMap<crate::ports::map::PortKey, Vec<crate::ports::occupancy::Claim>>;

/// Watches `api` with `config` as the restartable task `resource`, and
/// keeps the receiver at the claims `claims_of` finds in the objects: its
/// claims once listed; a source the API server refuses (RBAC) before it was
/// ever listed is given up on, with the reason, so it never holds the
/// port-usage ConfigMap back.
fn spawn_claims<K>(
    tasks: &Tasks,
    resource: &'static str,
    api: Api<K>,
    config: kube::runtime::watcher::Config,
    metrics: Arc<ApiMetrics>,
    claims_of: fn(&std::collections::BTreeMap<String, K>) -> Claims,
) -> watch::Receiver<ClaimSet>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (tx, rx) = watch::channel(ClaimSet::default());
    mirror::spawn(tasks, resource, api, config, metrics, move || {
        let tx = tx.clone();
        move |view: mirror::View<'_, K>| {
            let next = match view.forbidden {
                Some(why) if !view.synced => ClaimSet::unavailable(why.to_owned()),
                _ => ClaimSet { synced: view.synced, unavailable: None, claims: claims_of(view.objects) },
            };
            set_if_changed(&tx, next);
        }
    });
    rx
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

/// Connects to the cluster and starts watching its inputs, or returns `None`
/// in standalone mode. Fails only on configuration mistakes; an unreachable
/// API server is not one.
pub async fn connect(cfg: ClusterConfig, tasks: &Tasks) -> Result<Option<Cluster>, ClusterError> {
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
    let settings = settings::spawn(client.clone(), cfg.mpd_controller_cm_name.clone(), metrics.clone(), tasks);
    let host_ports = pods::spawn_host_ports(client.clone(), &node, metrics.clone(), tasks);
    let node_ports = services::spawn_node_ports(client.clone(), metrics.clone(), tasks);
    let live_instances = LiveInsIds::new(client.clone(), metrics.clone());
    let (versions, versions_synced) =
        engines::spawn_versions(client.clone(), &cfg.core_version_cm_labels, metrics.clone(), tasks);
    Ok(Some(Cluster {
        node,
        client,
        metrics,
        settings,
        host_ports,
        node_ports,
        live_instances,
        versions,
        versions_synced,
        cfg,
    }))
}

impl Cluster {
    /// The ports domain's claim sources this cluster feeds.
    pub fn claim_inputs(&self) -> ClaimInputs {
        vec![(ClaimSource::HostPorts, self.host_ports.clone()), (ClaimSource::NodePorts, self.node_ports.clone())]
    }

    /// The client NIC to watch (see [`settings::nic_config`]).
    pub fn nic_config(&self, fallback: NicConfig, tasks: &Tasks) -> watch::Receiver<Option<NicConfig>> {
        settings::nic_config(self.settings.clone(), fallback, tasks)
    }

    /// Starts the sinks: the port-usage ConfigMap from the ports domain, the
    /// Node conditions from the client network and the settings, the
    /// availability ConfigMap and the rescan bus from the engines domain.
    pub fn publish(
        &self,
        ports: &Ports,
        network: watch::Receiver<NetworkState>,
        engines: &Engines,
        tasks: &Tasks,
    ) -> Publishing {
        let (usage_tx, port_usage) = watch::channel(PublishState::default());
        let publisher = port_usage::Publisher {
            object: NodeOwned::new(
                &self.client,
                &self.node,
                port_usage::configmap_name(&self.node),
                "port_usage",
                self.metrics.clone(),
            ),
            ports: ports.clone(),
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            state: usage_tx,
            timing: Timing {
                debounce: self.cfg.publish_debounce,
                min_interval: self.cfg.publish_min_interval,
                heartbeat: self.cfg.heartbeat,
            },
            tasks: tasks.clone(),
        };
        tasks.restartable("port-usage", move || publisher.clone().run());
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node_status = node_status::spawn(
            nodes,
            self.node.clone(),
            self.cfg.heartbeat,
            node_status::Inputs { network, settings: self.settings.clone() },
            self.metrics.clone(),
            tasks,
        );
        let availability = engines::AvailabilityPublisher {
            object: NodeOwned::new(
                &self.client,
                &self.node,
                engines::availability_name(&self.node),
                "availability",
                self.metrics.clone(),
            ),
            state: engines.state.clone(),
            versions_synced: self.versions_synced.clone(),
        };
        let shutdown = tasks.shutdown();
        tasks.restartable("availability", move || availability.clone().run(shutdown.clone()));
        let rescan_bus = engines::spawn_bus(self.client.clone(), engines.clone(), self.metrics.clone(), tasks);
        Publishing { port_usage, node_status, rescan_bus }
    }
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
