//! A local copy of the objects one watch selects, handed whole to a callback
//! after every change. Every cluster input (the three ConfigMaps, the pods,
//! the Services) is one of these: watched, never polled, resynced by kube's
//! watcher (list, then watch from the list's resourceVersion, relisting on
//! 410 Expired) with its default backoff while the API server is away.
//!
//! A watch error does not make the copy wrong, only late: the watcher
//! resumes from the last resourceVersion it saw (and the server replays
//! every change since, deletions included) or, when that is too old, lists
//! again. So `synced`, once true, stays true, and changes keep flowing to the
//! callback after an error. (Nothing that must not act on a late copy reads
//! a mirror: the live instance ids, which must be fresh, are asked of the API
//! server instead, `instances.rs`.)
use std::{collections::BTreeMap, sync::Arc};

use futures_util::StreamExt as _;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::client::ApiMetrics;
use crate::tasks::Tasks;

/// What the callback sees: the objects by `namespace/name`, whether a full
/// list has arrived, and whether the watch is currently working.
pub struct View<'a, K> {
    pub objects: &'a BTreeMap<String, K>,
    pub synced: bool,
    /// The API server refused the list or watch (RBAC): it will not come by
    /// waiting. The reason, while it lasts.
    pub forbidden: Option<&'a str>,
}

/// The reason, when a watch error is an RBAC refusal.
fn forbidden(e: &watcher::Error) -> Option<String> {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s,
        _ => return None,
    };
    (status.code == 403).then(|| format!("forbidden: {}", status.message))
}

/// Starts [`run`] as a restartable task named `resource`: a restart
/// watches afresh (list, then watch), with a callback `make` builds anew.
pub fn spawn<K, M, C>(
    tasks: &Tasks,
    resource: &'static str,
    api: Api<K>,
    config: watcher::Config,
    metrics: Arc<ApiMetrics>,
    mut make: M,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    M: FnMut() -> C + Send + 'static,
    C: FnMut(View<'_, K>) + Send + 'static,
{
    let shutdown = tasks.shutdown();
    tasks.restartable(resource, move || {
        run(api.clone(), config.clone(), resource, metrics.clone(), shutdown.clone(), make())
    });
}

/// Runs until `shutdown`. `resource` names the watch in logs and metrics.
pub async fn run<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: &'static str,
    metrics: Arc<ApiMetrics>,
    shutdown: CancellationToken,
    mut on_change: impl FnMut(View<'_, K>) + Send,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let key = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
    let stream = watcher(api, config).default_backoff();
    futures_util::pin_mut!(stream);
    let mut objects: BTreeMap<String, K> = BTreeMap::new();
    // Objects of a relist, swapped in whole at InitDone so deletions that
    // happened while the watch was down are noticed.
    let mut relist: Option<BTreeMap<String, K>> = None;
    let mut synced = false;
    let mut healthy = true;
    let mut refused: Option<String> = None;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            ev = stream.next() => match ev {
                Some(ev) => ev,
                None => return,
            },
        };
        match event {
            Ok(watcher::Event::Init) => relist = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(o)) => {
                relist.get_or_insert_with(BTreeMap::new).insert(key(&o), o);
            }
            Ok(watcher::Event::InitDone) => {
                objects = relist.take().unwrap_or_default();
                if !synced {
                    tracing::debug!(resource, objects = objects.len(), "watch synced");
                }
                synced = true;
                healthy = true;
                refused = None;
                on_change(View { objects: &objects, synced, forbidden: None });
            }
            Ok(watcher::Event::Apply(o)) => {
                objects.insert(key(&o), o);
                healthy = true;
                refused = None;
                on_change(View { objects: &objects, synced, forbidden: None });
            }
            Ok(watcher::Event::Delete(o)) => {
                objects.remove(&key(&o));
                healthy = true;
                refused = None;
                on_change(View { objects: &objects, synced, forbidden: None });
            }
            Err(e) => {
                metrics.watch_error(resource);
                tracing::warn!(resource, error = %e, "Kubernetes watch failed; retrying with backoff");
                let now_refused = forbidden(&e);
                if healthy || now_refused != refused {
                    healthy = false;
                    refused = now_refused;
                    on_change(View { objects: &objects, synced, forbidden: refused.as_deref() });
                }
            }
        }
    }
}
