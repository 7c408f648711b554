//! The port-usage ConfigMap `kube-system/cloud-provider-port-usage-<node>`
//! (docs/compat.md "Outputs" 1): one data key per taken port inside the
//! watched ranges, value `the port already use`, annotation `updateTimestamp`.
//!
//! The operator takes the union of keys over all nodes and treats every key
//! as taken, and falls back to ssh+netstat when the ConfigMap is missing. So:
//! it is created as soon as the port map is first complete (empty or not);
//! it is written when the key set changes, coalesced over `debounce`, and
//! its `updateTimestamp` is refreshed every `heartbeat` even when nothing
//! changed (the original rewrote it every minute, so people read it as "the
//! daemon is alive"); while the port map is resyncing after lost events keys
//! are only ever added, never dropped; a key set too large for a ConfigMap
//! is published as far as it fits and reported loudly, never cut silently.
//!
//! The keys come from the ports domain's one occupancy answer
//! ([`Ports::taken_in`]): sockets, hostPorts, nodePorts and leases alike.
use std::{
    collections::BTreeSet,
    ops::RangeInclusive,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::{
    sync::{broadcast::error::RecvError, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{client::ApiMetrics, mirror, owned::NodeOwned, settings::Settings};
use crate::{
    ports::Ports,
    retry::{self, Backoff},
    tasks::Tasks,
    time::utc_seconds,
};

pub const VALUE: &str = "the port already use";

/// A ConfigMap may hold 1 MiB; this leaves room for metadata and
/// managedFields.
pub const MAX_DATA_BYTES: usize = 900 * 1024;

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
    /// Taken ports that did not fit in the ConfigMap (the highest ones):
    /// the operator could hand them out. 0 in any sane setup.
    pub overflow: usize,
    pub last_error: Option<String>,
    pub writes: u64,
}

/// Settings of the sink (from flags).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub debounce: Duration,
    /// Least time between two writes: ephemeral ports in the watched ranges
    /// would otherwise rewrite the ConfigMap several times a second.
    pub min_interval: Duration,
    /// `updateTimestamp` is refreshed at least this often.
    pub heartbeat: Duration,
}

/// The sink's inputs: a restart (it is a restartable task) starts from
/// these, and writes once more as after a start.
#[derive(Clone)]
pub struct Publisher {
    pub object: NodeOwned,
    pub ports: Ports,
    pub settings: watch::Receiver<Settings>,
    pub metrics: Arc<ApiMetrics>,
    pub state: watch::Sender<PublishState>,
    pub timing: Timing,
    /// The heartbeat says the daemon is alive: it stops when it is not.
    pub tasks: Tasks,
}

/// The bytes a data map of these keys takes.
fn data_bytes(keys: &BTreeSet<u16>) -> usize {
    // "port": "value", plus quotes, colon and comma.
    keys.iter().map(|p| p.to_string().len() + VALUE.len() + 6).sum()
}

/// The keys to publish: `want`, or its lowest ports that fit.
fn fit(want: BTreeSet<u16>) -> (BTreeSet<u16>, usize) {
    if data_bytes(&want) <= MAX_DATA_BYTES {
        return (want, 0);
    }
    let mut kept = BTreeSet::new();
    let mut bytes = 0;
    for p in &want {
        let b = p.to_string().len() + VALUE.len() + 6;
        if bytes + b > MAX_DATA_BYTES {
            break;
        }
        bytes += b;
        kept.insert(*p);
    }
    let dropped = want.len() - kept.len();
    (kept, dropped)
}

impl Publisher {
    pub async fn run(mut self) {
        let shutdown = self.tasks.shutdown();
        let name = self.object.name().to_owned();
        self.state.send_modify(|s| s.configmap = name.clone());
        let mut changes = self.ports.subscribe();
        let mut status = self.ports.status();
        let (mut exists, own_watch) = self.watch_own(shutdown.clone());
        tokio::pin!(own_watch);
        let mut last_write: Option<Instant> = None;
        let mut published: Option<BTreeSet<u16>> = None;
        let mut backoff = Backoff::new();
        let mut retry_at: Option<Instant> = None;
        loop {
            let heartbeat_at = last_write.map(|t| t + self.timing.heartbeat);
            // Wait for something that may change the key set, or for the
            // heartbeat.
            let mut beat = false;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut own_watch => return, // ends only at shutdown
                ev = changes.recv() => match ev {
                    Ok(c) if !self.settings.borrow().ranges.contains(c.port) => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    // The port map's owner is gone: the daemon is unhealthy
                    // and will be restarted; nothing more to publish.
                    Err(RecvError::Closed) => return shutdown.cancelled().await,
                },
                r = status.changed() => if r.is_err() { return shutdown.cancelled().await },
                r = self.settings.changed() => if r.is_err() { return },
                r = exists.changed() => {
                    if r.is_err() { return }
                    // Deleted by hand, or collected with a re-registered
                    // Node: the operator needs it, so write it again (with
                    // the Node's current uid as owner).
                    if *exists.borrow_and_update() == Some(false) && published.is_some() {
                        tracing::warn!(configmap = %name, "the port-usage ConfigMap disappeared; recreating it");
                        published = None;
                        self.object.forget_owner();
                    }
                }
                () = retry::sleep_until(heartbeat_at), if retry_at.is_none() => beat = true,
                () = retry::sleep_until(retry_at) => retry_at = None,
            }
            // Coalesce a burst of binds into one write, and keep writes at
            // least `min_interval` apart.
            let gap = last_write.map_or(Duration::ZERO, |t| self.timing.min_interval.saturating_sub(t.elapsed()));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.timing.debounce.max(gap)) => {}
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
            let ranges: Vec<RangeInclusive<u16>> = settings.ranges.watched.iter().map(|r| r.range()).collect();
            // None until the map is complete and every claim source is read:
            // publishing then could call taken ports free.
            let Some(mut want) = self.ports.taken_in(&ranges) else { continue };
            if self.ports.status().borrow().stale {
                // Events were lost: a port missing from the map may still be taken.
                want.extend(published.iter().flatten().copied().filter(|&p| settings.ranges.contains(p)));
            }
            let (want, overflow) = fit(want);
            self.metrics.set_port_usage_overflow(overflow);
            if overflow > 0 {
                tracing::error!(
                    configmap = %name,
                    overflow,
                    "taken ports in the watched ranges do not fit in one ConfigMap; the highest are not published"
                );
            }
            let unchanged = published.as_ref() == Some(&want);
            if !self.tasks.healthy() {
                // A core task died: a write (even a refreshed updateTimestamp)
                // would tell the operator this node's map is live. Let it go stale.
                tracing::error!(configmap = %name, "not publishing port usage: the daemon is unhealthy");
                return shutdown.cancelled().await;
            }
            if unchanged && !beat {
                // A failed write may have become unnecessary.
                retry_at = None;
                self.object.set_pending(false);
                self.state.send_if_modified(|s| std::mem::replace(&mut s.pending, false));
                continue;
            }
            if retry_at.is_some() {
                continue; // backing off: the timer will bring us back
            }
            self.object.set_pending(true);
            self.state.send_modify(|s| {
                s.pending = true;
                s.overflow = overflow;
            });
            let first = published.is_none();
            last_write = Some(Instant::now());
            match self.write(&want, first).await {
                Ok(()) => {
                    backoff.reset();
                    retry_at = None;
                    if !unchanged {
                        tracing::info!(configmap = %name, ports = want.len(), "port usage published");
                    }
                    published = Some(want.clone());
                    self.object.set_pending(false);
                    self.state.send_modify(|s| {
                        s.published = Some(want);
                        s.last_write = Some(SystemTime::now());
                        s.pending = false;
                        s.last_error = None;
                        s.writes += 1;
                    });
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    retry_at = Some(Instant::now() + wait);
                    tracing::warn!(configmap = %name, error = %e, retry_in = ?wait, "publishing port usage failed");
                    self.state.send_modify(|s| s.last_error = Some(e.to_string()));
                }
            }
        }
    }

    /// Whether this node's ConfigMap exists (None until the watch has
    /// listed), and the watch that tells, to run beside the publisher.
    fn watch_own(
        &self,
        shutdown: CancellationToken,
    ) -> (watch::Receiver<Option<bool>>, impl std::future::Future<Output = ()> + Send + 'static) {
        let (tx, rx) = watch::channel(None);
        let cfg = super::client::watch_config().fields(&format!("metadata.name={}", self.object.name()));
        let watch = mirror::run(
            self.object.api().clone(),
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
        );
        (rx, watch)
    }

    async fn write(&mut self, keys: &BTreeSet<u16>, first: bool) -> Result<(), super::client::CallError> {
        let data: Map<String, Value> = keys.iter().map(|p| (p.to_string(), Value::from(VALUE))).collect();
        let mut annotations = Map::new();
        annotations.insert("updateTimestamp".into(), Value::from(utc_seconds(SystemTime::now())));
        let cm = self.object.apply(data, annotations).await?;
        if first {
            self.drop_foreign_keys(&cm, keys).await?;
        }
        Ok(())
    }

    /// Server-side apply removes only keys this field manager set. Keys left
    /// by another writer (the Go daemon this one replaces) would stay forever
    /// and make their ports look busy, so on the first write after start
    /// they are removed.
    async fn drop_foreign_keys(&self, cm: &ConfigMap, keys: &BTreeSet<u16>) -> Result<(), super::client::CallError> {
        let stale: Vec<String> = cm
            .data
            .iter()
            .flatten()
            .filter(|(k, _)| k.parse::<u16>().map_or(true, |p| !keys.contains(&p)))
            .map(|(k, _)| k.clone())
            .collect();
        if !stale.is_empty() {
            tracing::info!(configmap = %self.object.name(), keys = ?stale, "removing keys left by another writer");
        }
        self.object.remove_keys(stale).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_set_too_large_for_a_configmap_keeps_its_lowest_ports_and_says_how_many_not() {
        let small: BTreeSet<u16> = (30000..30100).collect();
        assert_eq!(fit(small.clone()), (small, 0));
        let all: BTreeSet<u16> = (1..=65535).collect();
        let (kept, dropped) = fit(all);
        assert!(data_bytes(&kept) <= MAX_DATA_BYTES);
        assert_eq!(kept.len() + dropped, 65535);
        assert!(dropped > 0 && kept.contains(&1) && !kept.contains(&65535));
    }
}
