//! The node-status writer: the one owner of the conditions this daemon sets
//! on its own Node (COMPAT.md "Outputs" 3).
//!
//! The original listed every node and patched 2-4 conditions every 3 s,
//! resetting `lastTransitionTime` each time. This writer patches only this
//! node's `status` subresource, with a strategic merge patch that carries
//! only the conditions that changed (merged by `type`, so other writers'
//! conditions are untouched); `lastTransitionTime` moves only when a
//! condition's status flips; and every `heartbeat` it refreshes
//! `lastHeartbeatTime` of all its conditions in one patch. Other domains set
//! conditions through a cheap [`NodeConditions`] handle.
use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    client::{backoff, call, ApiMetrics, CallError},
    settings::Settings,
};
use crate::time::utc_seconds;

/// The longest the first write waits for the cluster's settings.
const SETTINGS_WAIT: Duration = Duration::from_secs(10);

/// A condition as this daemon wants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl Condition {
    pub fn new(type_: &str, status: bool, reason: &str, message: &str) -> Self {
        let status = if status { "True" } else { "False" };
        Self { type_: type_.into(), status: status.into(), reason: reason.into(), message: message.into() }
    }
}

/// The heartbeat condition (COMPAT.md): always True/Refresh/Refresh; its
/// `lastHeartbeatTime` tells the operator the daemon is alive.
pub fn refresh_flag() -> Condition {
    Condition::new("NodeRefreshFlag", true, "Refresh", "Refresh")
}

/// `NodeOobIP` (COMPAT.md): the BMC address when `isCheckOObIP`. Reading it
/// needs the IPMI device; until that is implemented, and on hosts without
/// one, the condition says so (False with a reason), never an empty success.
pub fn oob_ip() -> Condition {
    if std::path::Path::new("/dev/ipmi0").exists() {
        Condition::new(
            "NodeOobIP",
            false,
            "BMCAddressUnsupported",
            "reading the BMC address over /dev/ipmi0 is not implemented yet",
        )
    } else {
        Condition::new("NodeOobIP", false, "NoIPMIDevice", "no IPMI device (/dev/ipmi0): the BMC address is unknown")
    }
}

/// Sets conditions on this node; cheap to clone. Without a cluster it is a
/// no-op sink, so domains need not know the mode.
#[derive(Clone)]
pub struct NodeConditions {
    tx: Option<mpsc::UnboundedSender<Condition>>,
}

impl NodeConditions {
    pub fn standalone() -> Self {
        Self { tx: None }
    }

    pub fn set(&self, c: Condition) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(c);
        }
    }
}

/// What the HTTP API shows about this sink.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatusState {
    pub conditions: Vec<Condition>,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub last_write: Option<SystemTime>,
    pub pending: bool,
    pub last_error: Option<String>,
    pub writes: u64,
}

/// A managed condition and the transition time Kubernetes has for it.
struct Managed {
    want: Condition,
    /// Status as last written (None: not yet written by this process).
    written_status: Option<String>,
    written: bool,
    transition: String,
}

pub fn spawn(
    nodes: Api<Node>,
    node: String,
    heartbeat: Duration,
    settings: watch::Receiver<Settings>,
    metrics: Arc<ApiMetrics>,
    shutdown: CancellationToken,
) -> (NodeConditions, watch::Receiver<NodeStatusState>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (state_tx, state_rx) = watch::channel(NodeStatusState::default());
    let writer = Writer { nodes, node, metrics, state: state_tx, managed: BTreeMap::new(), seeded: None };
    tokio::spawn(writer.run(rx, heartbeat, settings, shutdown));
    let handle = NodeConditions { tx: Some(tx) };
    handle.set(refresh_flag());
    (handle, state_rx)
}

struct Writer {
    nodes: Api<Node>,
    node: String,
    metrics: Arc<ApiMetrics>,
    state: watch::Sender<NodeStatusState>,
    managed: BTreeMap<String, Managed>,
    /// The node's conditions as they were when this process started (type
    /// -> status, lastTransitionTime), read once before the first write, so
    /// a restart keeps the transition time of every condition whose status
    /// did not change, including ones a domain sets only later.
    seeded: Option<BTreeMap<String, (String, String)>>,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Condition>,
        heartbeat: Duration,
        mut settings: watch::Receiver<Settings>,
        shutdown: CancellationToken,
    ) {
        // The cluster's settings decide some conditions (ccm-config names the
        // client NIC): hold the first write until they are read, so it is not
        // about the flags' NIC. Bounded, so conditions still go out when only
        // the ConfigMaps cannot be read; queued conditions replace each other.
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tokio::time::timeout(SETTINGS_WAIT, settings.wait_for(|s| s.synced)) => {}
        }
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attempt = 0u32;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut beat_due = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                c = rx.recv() => match c {
                    Some(c) => self.want(c),
                    None => return,
                },
                _ = beat.tick() => beat_due = true,
                () = async { match retry_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => retry_at = None,
            }
            // Take whatever else is queued, so a burst is one patch.
            while let Ok(c) = rx.try_recv() {
                self.want(c);
            }
            let dirty = self.managed.values().any(|m| !m.written);
            if !(dirty || beat_due) || retry_at.is_some() {
                continue;
            }
            self.metrics.node_status_pending.store(1, Ordering::Relaxed);
            match self.write(beat_due).await {
                Ok(()) => {
                    attempt = 0;
                    beat_due = false;
                    self.metrics.node_status_pending.store(0, Ordering::Relaxed);
                }
                Err(e) => {
                    let wait = backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    retry_at = Some(tokio::time::Instant::now() + wait);
                    tracing::warn!(node = %self.node, error = %e, retry_in = ?wait, "patching node conditions failed");
                    self.state.send_modify(|s| {
                        s.pending = true;
                        s.last_error = Some(e.to_string());
                    });
                }
            }
        }
    }

    fn want(&mut self, c: Condition) {
        match self.managed.get_mut(&c.type_) {
            Some(m) if m.want == c => {}
            Some(m) => {
                m.want = c;
                m.written = false;
            }
            None => {
                let (written_status, transition) = self
                    .seeded
                    .as_ref()
                    .and_then(|seen| seen.get(&c.type_).cloned())
                    .map_or((None, String::new()), |(status, t)| (Some(status), t));
                self.managed.insert(c.type_.clone(), Managed { want: c, written_status, written: false, transition });
            }
        }
    }

    /// Reads the node's current conditions once, so a restart keeps the
    /// transition times of conditions whose status did not change.
    async fn seed(&mut self) -> Result<(), CallError> {
        let node = match call(&self.metrics, "get", "nodes", self.nodes.get(&self.node)).await {
            Ok(n) => n,
            // Without read access the conditions are still written; only
            // their transition times start afresh.
            Err(CallError::Api(kube::Error::Api(e))) if e.code == 403 => {
                tracing::warn!(node = %self.node, "cannot read this Node (RBAC): condition transition times restart now");
                self.seeded = Some(BTreeMap::new());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut seen = BTreeMap::new();
        for c in node.status.and_then(|s| s.conditions).unwrap_or_default() {
            let t = c.last_transition_time.map(|t| t.0.to_string()).unwrap_or_default();
            seen.insert(c.type_, (c.status, t));
        }
        for (type_, m) in &mut self.managed {
            if let Some((status, t)) = seen.get(type_) {
                m.written_status = Some(status.clone());
                m.transition = t.clone();
            }
        }
        self.seeded = Some(seen);
        Ok(())
    }

    async fn write(&mut self, heartbeat: bool) -> Result<(), CallError> {
        if self.seeded.is_none() {
            self.seed().await?;
        }
        let now = utc_seconds(SystemTime::now());
        let mut conditions = Vec::new();
        for m in self.managed.values_mut() {
            if m.written && !heartbeat {
                continue;
            }
            if m.written_status.as_deref() != Some(m.want.status.as_str()) || m.transition.is_empty() {
                m.transition = now.clone();
            }
            conditions.push(json!({
                "type": m.want.type_,
                "status": m.want.status,
                "reason": m.want.reason,
                "message": m.want.message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": m.transition,
            }));
        }
        if conditions.is_empty() {
            return Ok(());
        }
        let patch = json!({"status": {"conditions": conditions}});
        let params = PatchParams::default();
        let patch = Patch::Strategic(&patch);
        call(&self.metrics, "patch", "nodes/status", self.nodes.patch_status(&self.node, &params, &patch)).await?;
        for m in self.managed.values_mut() {
            m.written = true;
            m.written_status = Some(m.want.status.clone());
        }
        let conditions = self.managed.values().map(|m| m.want.clone()).collect();
        self.state.send_modify(|s| {
            s.conditions = conditions;
            s.last_write = Some(SystemTime::now());
            s.pending = false;
            s.last_error = None;
            s.writes += 1;
        });
        Ok(())
    }
}
