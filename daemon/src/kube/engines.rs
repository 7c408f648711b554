//! The engines domain's cluster side:
//! - input: the engine-version ConfigMaps (`--core-version-cm-labels`), watched;
//! - sink: `polarstack-daemon-version-availability-<node lowercased>` with
//!   `existingVersions` and `checkTime` (docs/compat.md "Outputs" 2), written when
//!   the available set changes and when a requested check completes;
//! - the rescan bus: `RequestCheckCoreVersion` must make every node rescan.
//!   The original called its peers one by one (over https, on a wrong path,
//!   so none ever rescanned). Here the request is an annotation on one
//!   ConfigMap that every daemon watches: one write reaches all nodes.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::{
    client::{call, ApiMetrics, CallError},
    mirror,
    owned::NodeOwned,
    FIELD_MANAGER, NAMESPACE,
};
use crate::{
    engines::{
        versions::{self, EngineVersion},
        Availability, EngineState, Engines,
    },
    retry::Backoff,
    tasks::Tasks,
    time::utc_seconds,
};

/// The ConfigMap whose annotation carries rescan requests to every daemon.
pub const RESCAN_CONFIGMAP: &str = "polarstack-daemon-rescan";
pub const RESCAN_ANNOTATION: &str = "polarstack.io/rescan-request";

pub fn availability_name(node: &str) -> String {
    format!("polarstack-daemon-version-availability-{}", node.to_lowercase())
}

/// Watches the version ConfigMaps; the receiver holds the parsed versions,
/// sorted by name. A ConfigMap that cannot be used is skipped with one
/// warning (per ConfigMap and content), and the others still count.
pub fn spawn_versions(
    client: kube::Client,
    labels: &str,
    metrics: Arc<ApiMetrics>,
    tasks: &Tasks,
) -> (watch::Receiver<Vec<EngineVersion>>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(Vec::new());
    let (synced_tx, synced) = watch::channel(false);
    let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let cfg = super::client::watch_config().labels(labels);
    mirror::spawn(tasks, "configmaps/engine-versions", api, cfg, metrics, move || {
        let (tx, synced_tx) = (tx.clone(), synced_tx.clone());
        let mut warned: BTreeSet<(String, String)> = BTreeSet::new();
        move |view| {
            if !view.synced {
                return; // a restarted watch: the versions stay as they were until it has listed
            }
            let mut by_name: BTreeMap<String, EngineVersion> = BTreeMap::new();
            for (key, cm) in view.objects {
                let empty = BTreeMap::new();
                match versions::parse(key, cm.data.as_ref().unwrap_or(&empty)) {
                    Ok(v) => match by_name.get(&v.name) {
                        Some(first) => {
                            if warned.insert((key.clone(), format!("duplicate {}", v.name))) {
                                tracing::warn!(configmap = %key, version = %v.name, kept = %first.source, "engine version defined twice; keeping the first");
                            }
                        }
                        None => {
                            by_name.insert(v.name.clone(), v);
                        }
                    },
                    Err(e) => {
                        if warned.insert((key.clone(), e.to_string())) {
                            tracing::warn!(configmap = %key, error = %e, "skipping an engine-version ConfigMap");
                        }
                    }
                }
            }
            let next: Vec<EngineVersion> = by_name.into_values().collect();
            super::set_if_changed(&tx, next);
            synced_tx.send_if_modified(|s| !std::mem::replace(s, true));
        }
    });
    (rx, synced)
}

/// Least time between two writes to the rescan bus: a caller that loops on
/// RequestCheckCoreVersion costs at most one write (and one rescan on every
/// node) per interval, however fast it asks.
pub const RESCAN_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The cluster-wide rescan bus: asking is cheap and never waits; requests
/// coalesce into at most one write per [`RESCAN_MIN_INTERVAL`].
#[derive(Clone)]
pub struct RescanBus {
    /// One stored permit: asks while a write is due ride along with it.
    ask: Arc<Notify>,
    /// Writes made, for the HTTP API and tests.
    pub writes: watch::Receiver<u64>,
}

impl RescanBus {
    /// Asks every daemon to rescan (soon: the write is coalesced).
    pub fn request(&self) {
        self.ask.notify_one();
    }
}

/// Writes one rescan request to the bus ConfigMap.
async fn write_request(
    api: &Api<ConfigMap>,
    metrics: &ApiMetrics,
    own: &Mutex<Option<String>>,
) -> Result<(), CallError> {
    let id = format!("{}-{:08x}", utc_seconds(SystemTime::now()), fastrand::u32(..));
    *own.lock().await = Some(id.clone());
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": RESCAN_CONFIGMAP, "namespace": NAMESPACE, "annotations": {RESCAN_ANNOTATION: id}}});
    let params = PatchParams::apply(FIELD_MANAGER).force();
    call(metrics, "apply", "configmaps", api.patch(RESCAN_CONFIGMAP, &params, &Patch::Apply(&body))).await?;
    Ok(())
}

/// The bus's two tasks: one writes this daemon's requests, coalesced; one
/// watches the bus and rescans here when another daemon asks.
pub fn spawn_bus(client: kube::Client, engines: Engines, metrics: Arc<ApiMetrics>, tasks: &Tasks) -> RescanBus {
    let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let own: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let ask = Arc::new(Notify::new());
    let (writes_tx, writes) = watch::channel(0u64);
    let shutdown = tasks.shutdown();
    {
        let (api, metrics, own, ask, shutdown) =
            (api.clone(), metrics.clone(), own.clone(), ask.clone(), shutdown.clone());
        tasks.restartable("rescan-bus/writer", move || {
            write_requests(api.clone(), metrics.clone(), own.clone(), ask.clone(), writes_tx.clone(), shutdown.clone())
        });
    }
    tasks.restartable("rescan-bus/watch", move || {
        follow_requests(api.clone(), metrics.clone(), own.clone(), engines.clone(), shutdown.clone())
    });
    RescanBus { ask, writes }
}

async fn write_requests(
    api: Api<ConfigMap>,
    metrics: Arc<ApiMetrics>,
    own: Arc<Mutex<Option<String>>>,
    ask: Arc<Notify>,
    writes: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = ask.notified() => {}
        }
        loop {
            match write_request(&api, &metrics, &own).await {
                Ok(()) => {
                    backoff.reset();
                    writes.send_modify(|n| *n += 1);
                    break;
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %e, retry_in = ?wait, "writing the rescan request failed");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        // Requests that come meanwhile wait for the next write.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RESCAN_MIN_INTERVAL) => {}
        }
    }
}

async fn follow_requests(
    api: Api<ConfigMap>,
    metrics: Arc<ApiMetrics>,
    own: Arc<Mutex<Option<String>>>,
    engines: Engines,
    shutdown: CancellationToken,
) {
    let (seen_tx, mut seen) = watch::channel::<Option<Option<String>>>(None);
    let cfg = super::client::watch_config().fields(&format!("metadata.name={RESCAN_CONFIGMAP}"));
    let watch = mirror::run(api, cfg, "configmaps/rescan", metrics, shutdown.clone(), move |view| {
        if !view.synced {
            return;
        }
        let id = view
            .objects
            .values()
            .next()
            .and_then(|cm| cm.metadata.annotations.as_ref()?.get(RESCAN_ANNOTATION).cloned());
        super::set_if_changed(&seen_tx, Some(id));
    });
    let follow = async move {
        // The value present at (re)start is history, not a request.
        let mut last: Option<Option<String>> = None;
        loop {
            if seen.changed().await.is_err() {
                return;
            }
            let now = seen.borrow_and_update().clone();
            let Some(id) = now.clone() else { continue };
            let first = last.is_none();
            last = Some(id.clone());
            if first || id.is_none() || *own.lock().await == id {
                continue;
            }
            tracing::info!(request = ?id, "cluster-wide engine rescan requested");
            let _ = engines.rescan().await;
        }
    };
    tokio::select! {
        () = watch => {}
        () = follow => {}
        () = shutdown.cancelled() => {}
    }
}

/// Publishes the availability ConfigMap.
#[derive(Clone)]
pub struct AvailabilityPublisher {
    pub object: NodeOwned,
    pub state: watch::Receiver<EngineState>,
    pub versions_synced: watch::Receiver<bool>,
}

impl AvailabilityPublisher {
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Nothing is written before the version ConfigMaps are listed and a
        // scan has run: an early write would say "no versions" after every
        // restart.
        loop {
            let ready = *self.versions_synced.borrow() && self.state.borrow().scans > 0;
            if ready {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.versions_synced.changed() => if r.is_err() { return },
                r = self.state.changed() => if r.is_err() { return },
            }
        }
        // What the ConfigMap said before this process: versions whose runtime
        // is down right now stay listed as they were.
        let mut kept: BTreeSet<String> = self
            .object
            .current_data()
            .await
            .and_then(|d| d.get("existingVersions").cloned())
            .map(|v| v.split(',').filter(|n| !n.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let mut published: Option<BTreeSet<String>> = None;
        let mut published_requests = 0u64;
        let mut backoff = Backoff::new();
        loop {
            let (want, requested) = {
                let st = self.state.borrow_and_update();
                let mut want: BTreeSet<String> = st.available().map(str::to_owned).collect();
                // A version whose runtime is down stays as last published: the
                // operator must not see it vanish because dockerd restarted.
                let before = published.as_ref().unwrap_or(&kept);
                for v in st.versions.iter().filter(|v| v.status == Availability::Unknown) {
                    if before.contains(&v.name) {
                        want.insert(v.name.clone());
                    }
                }
                (want, st.requested_scans)
            };
            if published.as_ref() != Some(&want) || requested != published_requests {
                self.object.set_pending(true);
                let mut data = Map::new();
                data.insert("existingVersions".into(), Value::from(want.iter().cloned().collect::<Vec<_>>().join(",")));
                data.insert("checkTime".into(), Value::from(utc_seconds(SystemTime::now())));
                match self.object.apply(data, Map::new()).await {
                    Ok(_) => {
                        tracing::info!(configmap = %self.object.name(), versions = ?want, "engine availability published");
                        self.object.set_pending(false);
                        kept = want.clone();
                        published = Some(want);
                        published_requests = requested;
                        backoff.reset();
                    }
                    Err(e) => {
                        tracing::warn!(configmap = %self.object.name(), error = %e, "publishing engine availability failed");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(backoff.next_wait()) => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.state.changed() => if r.is_err() { return },
            }
        }
    }
}
