//! Database pods anywhere in the cluster (label `apsara.metric.ins_id`): the
//! live instance ids, which keep their log folders from the sweeper's rule 1.
//!
//! Asked on demand, when a sweep runs, instead of watched: a cluster-wide
//! watch of pods would cost every node an event for every pod change in the
//! cluster, around the clock, for an answer needed every few hours. A sweep
//! with K candidate folders costs one list (metadata only, paginated, from
//! the API server's watch cache) and at most K one-id lists.
use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{ListParams, ObjectList, PartialObjectMeta},
    Api, Resource as _,
};

use super::client::{call, ApiMetrics, CallError};
use crate::logs::{LiveFuture, LiveInstances, LiveInstancesError};

pub const INS_ID_LABEL: &str = "apsara.metric.ins_id";

/// Pods per page of the listing (as kube's watcher pages).
const PAGE_SIZE: u32 = 500;
/// A listing longer than this (a million pods) is treated as failed rather
/// than followed forever.
const MAX_PAGES: usize = 2_000;
/// What a metadata-only list is asked for; a server that cannot convert
/// sends whole pods (`application/json`), which parse as well.
const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json";
/// The metrics label of these requests.
const RESOURCE: &str = "pods/instances";

/// Who carries which instance id, asked of the API server each time.
pub struct LiveInsIds {
    client: kube::Client,
    metrics: Arc<ApiMetrics>,
}

impl LiveInsIds {
    /// Nothing is started: every question is one request (or a few pages).
    pub fn new(client: kube::Client, metrics: Arc<ApiMetrics>) -> Arc<Self> {
        Arc::new(Self { client, metrics })
    }

    /// Every insId on a pod, in pages. The first page asks for
    /// `resourceVersion=0` ("any version", `NotOlderThan`), which an API
    /// server answers from its watch cache instead of a quorum read of etcd.
    /// kube's `ListParams` leaves `resourceVersion=0` out whenever `limit`
    /// is set (a real server ignores `limit` at version 0 and returns the
    /// whole list in one page; kubernetes#118394), so the request is built
    /// here, as client-go's reflector sends it. Should a server page anyway,
    /// the `continue` pages follow (without a version, as the token carries
    /// it). A stale answer is safe: an id it misses is asked about again,
    /// freshly, before its folder goes.
    async fn list_all(&self) -> Result<BTreeSet<String>, LiveInstancesError> {
        let mut ids = BTreeSet::new();
        let mut next: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page: ObjectList<PartialObjectMeta<Pod>> =
                call(&self.metrics, "list", RESOURCE, self.client.request(list_request(next.as_deref())?))
                    .await
                    .map_err(failed)?;
            ids.extend(page.items.iter().filter_map(|p| p.metadata.labels.as_ref()?.get(INS_ID_LABEL).cloned()));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => next = Some(token),
                None => return Ok(ids),
            }
        }
        Err(LiveInstancesError::ListFailed { reason: format!("more than {MAX_PAGES} pages of pods") })
    }

    /// Whether a pod carries `ins_id` now: `labelSelector=<label>=<id>`,
    /// `limit=1`, no `resourceVersion`, so the server answers with the most
    /// recent state (a consistent read), never a cache that may lag.
    async fn one(&self, ins_id: &str) -> Result<bool, LiveInstancesError> {
        if !is_label_value(ins_id) {
            // The selector could not say what we mean: fail closed.
            return Err(LiveInstancesError::NotALabelValue { ins_id: ins_id.to_owned() });
        }
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{INS_ID_LABEL}={ins_id}")).limit(1);
        let page = call(&self.metrics, "list", RESOURCE, api.list_metadata(&lp)).await.map_err(failed)?;
        Ok(!page.items.is_empty())
    }
}

impl LiveInstances for LiveInsIds {
    fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
        Box::pin(self.list_all())
    }

    fn is_live<'a>(&'a self, ins_id: &'a str) -> LiveFuture<'a, bool> {
        Box::pin(self.one(ins_id))
    }
}

/// One page of the listing (see [`LiveInsIds::list_all`]).
fn list_request(continue_token: Option<&str>) -> Result<http::Request<Vec<u8>>, LiveInstancesError> {
    let path = format!("{}?", Pod::url_path(&(), None));
    let start = path.len();
    let mut query = form_urlencoded::Serializer::for_suffix(path, start);
    query.append_pair("labelSelector", INS_ID_LABEL).append_pair("limit", &PAGE_SIZE.to_string());
    match continue_token {
        Some(token) => query.append_pair("continue", token),
        None => query.append_pair("resourceVersion", "0").append_pair("resourceVersionMatch", "NotOlderThan"),
    };
    http::Request::get(query.finish())
        .header(http::header::ACCEPT, METADATA_LIST)
        .body(Vec::new())
        .map_err(|e| LiveInstancesError::ListFailed { reason: format!("building the request: {e}") })
}

fn failed(e: CallError) -> LiveInstancesError {
    let reason = match &e {
        CallError::Api(kube::Error::Api(status)) => {
            format!("the API server answered {} {}: {}", status.code, status.reason, status.message)
        }
        other => other.to_string(),
    };
    LiveInstancesError::ListFailed { reason }
}

/// A Kubernetes label value: at most 63 characters, alphanumerics, `-`,
/// `_` and `.`, starting and ending with an alphanumeric (empty is a valid
/// value, but no folder is named that).
fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values() {
        for ok in ["1", "1001", "pi-123", "a.b_c", &"9".repeat(63)] {
            assert!(is_label_value(ok), "{ok}");
        }
        for bad in ["", "-1", "1-", "1,2", "1=2", "a b", "x!", &"9".repeat(64), "١٢٣"] {
            assert!(!is_label_value(bad), "{bad}");
        }
    }

    #[test]
    fn the_first_page_asks_the_watch_cache_and_later_pages_follow_the_token() {
        let first = list_request(None).expect("request");
        let q = first.uri().query().expect("query");
        assert_eq!(first.uri().path(), "/api/v1/pods");
        assert_eq!(
            q,
            "labelSelector=apsara.metric.ins_id&limit=500&resourceVersion=0&resourceVersionMatch=NotOlderThan"
        );
        assert!(first.headers()[http::header::ACCEPT].to_str().expect("ascii").contains("PartialObjectMetadataList"));
        let next = list_request(Some("tok/en")).expect("request");
        assert_eq!(next.uri().query(), Some("labelSelector=apsara.metric.ins_id&limit=500&continue=tok%2Fen"));
    }
}
