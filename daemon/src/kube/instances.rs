//! Database pods anywhere in the cluster (label `apsara.metric.ins_id`): the
//! live instance ids, which keep their log folders from the sweeper's rule 1.
use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{runtime::watcher, Api};
use tokio_util::sync::CancellationToken;

use super::{client::ApiMetrics, mirror};
use crate::logs::{LiveInstances, LiveInstancesError};

pub const INS_ID_LABEL: &str = "apsara.metric.ins_id";

/// The instance ids that pods carry anywhere in the cluster, for the log
/// sweeper. Unknown (so rule 1 is off) until listed, and again whenever the
/// watch is failing: a stale copy could miss a new instance.
#[derive(Default)]
pub struct LiveInsIds {
    ids: RwLock<Option<BTreeSet<String>>>,
}

impl LiveInsIds {
    pub fn spawn(client: kube::Client, metrics: Arc<ApiMetrics>, shutdown: CancellationToken) -> Arc<Self> {
        let me = Arc::new(Self::default());
        let api: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().labels(INS_ID_LABEL);
        let writer = me.clone();
        tokio::spawn(mirror::run(api, cfg, "pods/instances", metrics, shutdown, move |view| {
            // A late copy could miss a new instance: rule 1 waits.
            let ids = (view.synced && view.healthy).then(|| {
                view.objects.values().filter_map(|p| p.metadata.labels.as_ref()?.get(INS_ID_LABEL).cloned()).collect()
            });
            *writer.ids.write().unwrap_or_else(|p| p.into_inner()) = ids;
        }));
        me
    }
}

impl LiveInstances for LiveInsIds {
    fn live_ins_ids(&self) -> Result<BTreeSet<String>, LiveInstancesError> {
        self.ids.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(LiveInstancesError::NotSynced)
    }
}
