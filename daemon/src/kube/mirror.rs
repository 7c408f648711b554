//! A local copy of the objects one watch selects, handed whole to a callback
//! after every change. Every cluster input (the three ConfigMaps, the pods)
//! is one of these: watched, never polled, resynced by kube's watcher (list,
//! then watch from the list's resourceVersion, relisting on 410 Expired) with
//! its default backoff while the API server is away.
use std::{collections::BTreeMap, sync::Arc};

use futures_util::StreamExt as _;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::client::ApiMetrics;

/// What the callback sees: the objects by `namespace/name`, and whether the
/// copy is complete (a full list arrived and no error came after it).
pub struct View<'a, K> {
    pub objects: &'a BTreeMap<String, K>,
    pub synced: bool,
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
                on_change(View { objects: &objects, synced });
            }
            Ok(watcher::Event::Apply(o)) => {
                objects.insert(key(&o), o);
                on_change(View { objects: &objects, synced });
            }
            Ok(watcher::Event::Delete(o)) => {
                objects.remove(&key(&o));
                on_change(View { objects: &objects, synced });
            }
            Err(e) => {
                metrics.watch_error(resource);
                tracing::warn!(resource, error = %e, "Kubernetes watch failed; retrying with backoff");
                if synced {
                    synced = false;
                    on_change(View { objects: &objects, synced });
                }
            }
        }
    }
}
