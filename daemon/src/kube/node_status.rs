//! The node-status writer: the one owner of the conditions this daemon sets
//! on its own Node (docs/compat.md "Outputs" 3).
//!
//! The original listed every node and patched 2-4 conditions every 3 s,
//! resetting `lastTransitionTime` each time. This writer patches only this
//! node's `status` subresource, with a strategic merge patch that carries
//! only the conditions that changed (merged by `type`, so other writers'
//! conditions are untouched); `lastTransitionTime` moves only when a
//! condition's status flips; and every `heartbeat` it refreshes
//! `lastHeartbeatTime` of all its conditions in one patch. The conditions
//! are derived here from the domains' published state (the client network,
//! the cluster's settings): no source knows about Node conditions.
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use super::{
    client::{call, ApiMetrics, CallError},
    settings::Settings,
};
use crate::{
    network::{LinkState, NetworkState},
    retry::{self, Backoff},
    tasks::Tasks,
    time::utc_seconds,
};

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

/// The heartbeat condition (docs/compat.md): always True/Refresh/Refresh; its
/// `lastHeartbeatTime` tells the operator the daemon is alive.
pub fn refresh_flag() -> Condition {
    Condition::new("NodeRefreshFlag", true, "Refresh", "Refresh")
}

/// `NodeOobIP` (docs/compat.md): the BMC address when `isCheckOObIP`. Reading it
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

/// The two conditions the client network's state means (docs/compat.md
/// "Outputs" 3): `NodeClientNetworkUnavailable` (True unless the NIC is up)
/// and `NodeClientIP` (True with the address, or False with `0.0.0.0`).
pub fn network_conditions(nic: &str, net: &NetworkState) -> [Condition; 2] {
    let reason = net.state.reason();
    let unavailable =
        Condition::new("NodeClientNetworkUnavailable", net.state != LinkState::Up, reason, &format!("{nic} {reason}"));
    let ip = match net.client_ip {
        Some(ip) => Condition::new("NodeClientIP", true, nic, &ip.to_string()),
        None => Condition::new("NodeClientIP", false, nic, "0.0.0.0"),
    };
    [unavailable, ip]
}

/// Every condition this node should carry now: the heartbeat flag, the
/// client network's two once a NIC is being watched, and `NodeOobIP` while
/// `isCheckOObIP` is on. Conditions set earlier and no longer wanted stay as
/// they were: other components may read them.
fn desired(net: &NetworkState, settings: &Settings) -> Vec<Condition> {
    let mut out = vec![refresh_flag()];
    if let Some(nic) = &net.nic {
        out.extend(network_conditions(nic, net));
    }
    if settings.synced && settings.check_oob_ip {
        out.push(oob_ip());
    }
    out
}

/// What the conditions are made from.
#[derive(Clone)]
pub struct Inputs {
    pub network: watch::Receiver<NetworkState>,
    pub settings: watch::Receiver<Settings>,
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
    inputs: Inputs,
    metrics: Arc<ApiMetrics>,
    tasks: &Tasks,
) -> watch::Receiver<NodeStatusState> {
    let (state_tx, state_rx) = watch::channel(NodeStatusState::default());
    let health = tasks.clone();
    // Restartable: a new writer reads the Node's conditions again before its
    // first write, so transition times survive the restart.
    tasks.restartable("node-status", move || {
        let writer = Writer {
            nodes: nodes.clone(),
            node: node.clone(),
            metrics: metrics.clone(),
            state: state_tx.clone(),
            managed: BTreeMap::new(),
            seeded: None,
            tasks: health.clone(),
        };
        writer.run(inputs.clone(), heartbeat)
    });
    state_rx
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
    /// The heartbeat says the daemon is alive: it stops when it is not.
    tasks: Tasks,
}

impl Writer {
    async fn run(mut self, mut inputs: Inputs, heartbeat: Duration) {
        let shutdown = self.tasks.shutdown();
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::new();
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut beat_due = false;
        loop {
            for c in desired(&inputs.network.borrow_and_update(), &inputs.settings.borrow_and_update()) {
                self.want(c);
            }
            let dirty = self.managed.values().any(|m| !m.written);
            if (dirty || beat_due) && retry_at.is_none() {
                self.metrics.set_pending("node_status", true);
                match self.write(beat_due).await {
                    Ok(()) => {
                        backoff.reset();
                        beat_due = false;
                        self.metrics.set_pending("node_status", false);
                    }
                    Err(e) => {
                        let wait = backoff.next_wait();
                        retry_at = Some(tokio::time::Instant::now() + wait);
                        tracing::warn!(node = %self.node, error = %e, retry_in = ?wait, "patching node conditions failed");
                        self.state.send_modify(|s| {
                            s.pending = true;
                            s.last_error = Some(e.to_string());
                        });
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = inputs.network.changed() => if r.is_err() { return },
                r = inputs.settings.changed() => if r.is_err() { return },
                _ = beat.tick() => {
                    beat_due = self.tasks.healthy();
                    if !beat_due {
                        // A core task died: NodeRefreshFlag must not say the node is fine.
                        tracing::error!(node = %self.node, "skipping the NodeRefreshFlag heartbeat: the daemon is unhealthy");
                    }
                }
                () = retry::sleep_until(retry_at) => retry_at = None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn net(nic: Option<&str>, state: LinkState, ip: Option<&str>) -> NetworkState {
        let cfg = nic.map(|n| crate::network::NicConfig { name: n.into(), net_mask: None });
        let mut st = NetworkState::unknown(cfg.as_ref());
        st.state = state;
        st.client_ip = ip.map(|i| i.parse().expect("ip"));
        st
    }

    #[test]
    fn network_state_becomes_the_operators_two_conditions() {
        let [down, ip] = network_conditions("eth1", &net(Some("eth1"), LinkState::Unknown, None));
        assert_eq!(
            (down.status.as_str(), down.reason.as_str(), down.message.as_str()),
            ("True", "StateUnKnown", "eth1 StateUnKnown")
        );
        assert_eq!((ip.status.as_str(), ip.message.as_str()), ("False", "0.0.0.0"));
        let [up, ip] = network_conditions("eth1", &net(Some("eth1"), LinkState::Up, Some("192.0.2.1")));
        assert_eq!((up.status.as_str(), up.reason.as_str()), ("False", "StateUP"));
        assert_eq!((ip.status.as_str(), ip.reason.as_str(), ip.message.as_str()), ("True", "eth1", "192.0.2.1"));
    }

    #[test]
    fn conditions_wait_for_a_named_nic_and_oob_for_the_settings() {
        let types = |v: Vec<Condition>| v.into_iter().map(|c| c.type_).collect::<Vec<_>>();
        let unread = Settings::default();
        assert_eq!(types(desired(&net(None, LinkState::Unknown, None), &unread)), vec!["NodeRefreshFlag"]);
        let read = Settings { synced: true, ..Settings::default() };
        assert_eq!(
            types(desired(&net(Some("bond1"), LinkState::Up, None), &read)),
            vec!["NodeRefreshFlag", "NodeClientNetworkUnavailable", "NodeClientIP", "NodeOobIP"]
        );
        let no_oob = Settings { synced: true, check_oob_ip: false, ..Settings::default() };
        assert_eq!(types(desired(&net(None, LinkState::Up, None), &no_oob)), vec!["NodeRefreshFlag"]);
    }
}
