//! The port-usage ConfigMap `kube-system/cloud-provider-port-usage-<node>`
//! (COMPAT.md "Outputs" 1): one data key per taken port inside the watched
//! ranges, value `the port already use`, annotation `updateTimestamp`.
//!
//! The operator takes the union of keys over all nodes and treats every key
//! as taken, and falls back to ssh+netstat when the ConfigMap is missing. So:
//! it is created as soon as the port map is first complete (empty or not);
//! it is written only when the key set changes, coalesced over `debounce`;
//! while the port map is unsure (lost events being repaired) keys are only
//! ever added, never dropped; writes are server-side apply with this
//! daemon's field manager, retried with capped, jittered backoff, and an
//! ownerReference to the Node removes the ConfigMap with the node.
use std::{
    collections::BTreeSet,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{
    api::{Patch, PatchParams},
    runtime::watcher,
    Api,
};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast::error::RecvError, watch};
use tokio_util::sync::CancellationToken;

use super::{
    client::{backoff, call, ApiMetrics, CallError},
    mirror,
    pods::HostPorts,
    settings::Settings,
    FIELD_MANAGER, NAMESPACE,
};
use crate::{
    ports::{model::Proto, Ports},
    time::utc_seconds,
};

pub const VALUE: &str = "the port already use";

pub fn configmap_name(node: &str) -> String {
    format!("cloud-provider-port-usage-{node}")
}

/// What the HTTP API shows about this sink.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishState {
    pub configmap: String,
    /// Keys in Kubernetes as of the last successful write.
    pub published: Option<BTreeSet<u16>>,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub last_write: Option<SystemTime>,
    pub pending: bool,
    pub paused: bool,
    pub last_error: Option<String>,
    pub writes: u64,
}

/// The keys that should be in the ConfigMap now: taken ports (TCP or UDP,
/// sockets or hostPorts) inside the watched ranges. `None` while the map has
/// never been complete: publishing then could call busy ports free.
fn desired(
    ports: &Ports,
    settings: &Settings,
    host: &HostPorts,
    published: Option<&BTreeSet<u16>>,
) -> Option<BTreeSet<u16>> {
    let table = ports.read();
    if !table.status.ready {
        return None;
    }
    let mut keys = BTreeSet::new();
    for r in &settings.ranges.watched {
        for proto in Proto::ALL {
            keys.extend(table.map.taken_in(proto, r.range()));
        }
    }
    keys.extend(host.ports.iter().map(|h| h.port).filter(|&p| settings.ranges.contains(p)));
    if table.status.stale {
        // Events were lost: a port missing from the map may still be taken.
        keys.extend(published.into_iter().flatten().copied().filter(|&p| settings.ranges.contains(p)));
    }
    Some(keys)
}

pub struct Publisher {
    pub api: Api<ConfigMap>,
    pub nodes: Api<Node>,
    pub node: String,
    pub ports: Ports,
    pub settings: watch::Receiver<Settings>,
    pub host_ports: watch::Receiver<HostPorts>,
    pub metrics: Arc<ApiMetrics>,
    pub state: watch::Sender<PublishState>,
    pub debounce: Duration,
    /// Least time between two writes: ephemeral ports in the watched ranges
    /// would otherwise rewrite the ConfigMap several times a second.
    pub min_interval: Duration,
}

impl Publisher {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let name = configmap_name(&self.node);
        self.state.send_modify(|s| s.configmap = name.clone());
        let mut changes = self.ports.subscribe();
        let mut exists = self.watch_own(&name, shutdown.clone());
        let mut last_write: Option<tokio::time::Instant> = None;
        let mut owner: Option<Value> = None;
        let mut published: Option<BTreeSet<u16>> = None;
        let mut attempt = 0u32;
        // A slow safety net: the map's status (ready, stale) changes without
        // a port event, and a lagged subscriber may have missed events.
        let mut recheck = tokio::time::interval(Duration::from_secs(5));
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            // Wait for something that may change the key set.
            tokio::select! {
                () = shutdown.cancelled() => return,
                ev = changes.recv() => match ev {
                    Ok(c) if !self.settings.borrow().ranges.contains(c.port) => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                r = self.settings.changed() => if r.is_err() { return },
                r = self.host_ports.changed() => if r.is_err() { return },
                r = exists.changed() => {
                    if r.is_err() { return }
                    // Deleted by hand, or collected with a re-registered
                    // Node: the operator needs it, so write it again (with
                    // the Node's current uid as owner).
                    if *exists.borrow_and_update() == Some(false) && published.is_some() {
                        tracing::warn!(configmap = %name, "the port-usage ConfigMap disappeared; recreating it");
                        published = None;
                        owner = None;
                    }
                }
                _ = recheck.tick() => {}
                () = sleep_until_opt(retry_at) => retry_at = None,
            }
            // Coalesce a burst of binds into one write, and keep writes at
            // least `min_interval` apart.
            let gap = last_write.map_or(Duration::ZERO, |t| self.min_interval.saturating_sub(t.elapsed()));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.debounce.max(gap)) => {}
            }
            let settings = self.settings.borrow().clone();
            if !settings.synced {
                continue; // ranges unknown yet
            }
            if !settings.enable_print_port {
                self.state.send_if_modified(|s| !std::mem::replace(&mut s.paused, true));
                continue;
            }
            self.state.send_if_modified(|s| std::mem::replace(&mut s.paused, false));
            let host = self.host_ports.borrow().clone();
            if !host.synced {
                continue; // hostPorts unknown yet: a key could be missing
            }
            let Some(want) = desired(&self.ports, &settings, &host, published.as_ref()) else { continue };
            if published.as_ref() == Some(&want) {
                // A failed write may have become unnecessary.
                retry_at = None;
                self.metrics.port_usage_pending.store(0, Ordering::Relaxed);
                self.state.send_if_modified(|s| std::mem::replace(&mut s.pending, false));
                continue;
            }
            if retry_at.is_some() {
                continue; // backing off: the timer will bring us back
            }
            self.metrics.port_usage_pending.store(1, Ordering::Relaxed);
            self.state.send_modify(|s| s.pending = true);
            if owner.is_none() {
                owner = super::node_owner(&self.nodes, &self.node, &self.metrics).await;
            }
            let first = published.is_none();
            last_write = Some(tokio::time::Instant::now());
            match self.write(&name, &want, owner.as_ref(), first).await {
                Ok(()) => {
                    attempt = 0;
                    retry_at = None;
                    tracing::info!(configmap = %name, ports = want.len(), "port usage published");
                    published = Some(want.clone());
                    self.metrics.port_usage_pending.store(0, Ordering::Relaxed);
                    self.state.send_modify(|s| {
                        s.published = Some(want);
                        s.last_write = Some(SystemTime::now());
                        s.pending = false;
                        s.last_error = None;
                        s.writes += 1;
                    });
                }
                Err(e) => {
                    let wait = backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    retry_at = Some(tokio::time::Instant::now() + wait);
                    tracing::warn!(configmap = %name, error = %e, retry_in = ?wait, "publishing port usage failed");
                    self.state.send_modify(|s| s.last_error = Some(e.to_string()));
                }
            }
        }
    }

    /// Whether this node's ConfigMap exists (None until the watch has listed).
    fn watch_own(&self, name: &str, shutdown: CancellationToken) -> watch::Receiver<Option<bool>> {
        let (tx, rx) = watch::channel(None);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        tokio::spawn(mirror::run(
            self.api.clone(),
            cfg,
            "configmaps/port-usage",
            self.metrics.clone(),
            shutdown,
            move |view| {
                if view.synced {
                    tx.send_if_modified(|cur| {
                        let next = Some(!view.objects.is_empty());
                        std::mem::replace(cur, next) != next
                    });
                }
            },
        ));
        rx
    }

    async fn write(
        &self,
        name: &str,
        keys: &BTreeSet<u16>,
        owner: Option<&Value>,
        first: bool,
    ) -> Result<(), CallError> {
        let data: Map<String, Value> = keys.iter().map(|p| (p.to_string(), Value::from(VALUE))).collect();
        let mut metadata = json!({
            "name": name,
            "namespace": NAMESPACE,
            "annotations": {"updateTimestamp": utc_seconds(SystemTime::now())},
        });
        if let Some(o) = owner {
            metadata["ownerReferences"] = json!([o]);
        }
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data});
        // force: take over fields another manager (the Go daemon before an
        // upgrade) wrote, instead of failing with a conflict.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let cm =
            call(&self.metrics, "apply", "configmaps", self.api.patch(name, &params, &Patch::Apply(&body))).await?;
        if first {
            self.drop_foreign_keys(name, &cm, keys).await?;
        }
        Ok(())
    }

    /// Server-side apply removes only keys this field manager set. Keys left
    /// by another writer (the Go daemon this one replaces) would stay forever
    /// and make their ports look busy, so on the first write after start
    /// they are removed with a JSON merge patch.
    async fn drop_foreign_keys(&self, name: &str, cm: &ConfigMap, keys: &BTreeSet<u16>) -> Result<(), CallError> {
        let stale: Map<String, Value> = cm
            .data
            .iter()
            .flatten()
            .filter(|(k, _)| k.parse::<u16>().map_or(true, |p| !keys.contains(&p)))
            .map(|(k, _)| (k.clone(), Value::Null))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        tracing::info!(configmap = %name, keys = ?stale.keys().collect::<Vec<_>>(), "removing keys left by another writer");
        let patch = json!({"data": stale});
        let params = PatchParams::default();
        call(&self.metrics, "patch", "configmaps", self.api.patch(name, &params, &Patch::Merge(&patch))).await?;
        Ok(())
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
