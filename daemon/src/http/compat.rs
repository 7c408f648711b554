//! The original daemon's `/api/v1` endpoints that this one serves, in its
//! envelope (docs/compat.md "Outputs" 4): `{"code":"1","data":..,"message":"",
//! "requestId":".."}` on success with HTTP 200; on error a non-2xx status,
//! `code` "0" and the reason in `message`. `code` stays a string.
use axum::{
    extract::{RawQuery, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use serde_json::{json, Value};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{access::Action, AppState};
use crate::kube::{client::call, is_object_name};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/TestConn", get(test_conn))
        .route("/api/v1/GetStandByIp", get(get_standby_ip))
        .route("/api/v1/RequestCheckCoreVersion", post(request_check_core_version))
        .route("/api/v1/InnerCheckCoreVersion", post(inner_check_core_version))
}

fn request_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn envelope(status: StatusCode, code: &str, data: Value, message: &str) -> Response {
    let body = json!({"code": code, "data": data, "message": message, "requestId": request_id()});
    (status, [(header::CONTENT_TYPE, "application/json; charset=utf-8")], body.to_string()).into_response()
}

fn ok(data: Value) -> Response {
    envelope(StatusCode::OK, "1", data, "")
}

fn fail(status: StatusCode, message: &str) -> Response {
    envelope(status, "0", Value::Null, message)
}

/// Rescans here and asks every other daemon to (through the rescan bus),
/// answering as soon as the request is accepted, as the original did: the
/// scans run on. Requests coalesce (a loop of calls costs at most one bus
/// write per interval). Any body is accepted.
async fn request_check_core_version(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&st, Action::RescanCluster, &headers).await {
        return refused;
    }
    st.engines.ask_rescan();
    if let Some((_, publishing)) = &st.kube {
        publishing.rescan_bus.request();
    }
    ok(json!("done"))
}

/// Rescans here only (the body's `HostName`, if any, is not needed: this
/// daemon knows its node).
async fn inner_check_core_version(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&st, Action::RescanNode, &headers).await {
        return refused;
    }
    match st.engines.rescan().await {
        Ok(()) => ok(json!("OK")),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Under `--v1-require-auth`, the caller must be authorized (see
/// [`super::access`]); otherwise these stay open, as the original's were.
async fn authorize(st: &AppState, action: Action, headers: &HeaderMap) -> Result<(), Response> {
    if !st.v1_auth {
        return Ok(());
    }
    st.access.check(action, headers).await.map(drop).map_err(|e| fail(e.status(), &e.to_string()))
}

async fn test_conn() -> Response {
    ok(json!({"message": "connected"}))
}

/// How long a GetStandByIp answer is reused: the operator asks about one pod
/// at a time, and StandbyIP conditions change rarely.
const STANDBY_CACHE_FOR: Duration = Duration::from_secs(5);
/// Lookups that reach the API server (two reads each): at most this many a
/// second on average, in bursts of up to `STANDBY_BURST`.
const STANDBY_PER_SECOND: f64 = 5.0;
const STANDBY_BURST: f64 = 10.0;
const STANDBY_CACHE_MAX: usize = 1024;

/// A GetStandByIp answer: success with the IP, or the status and reason.
type StandbyAnswer = Result<String, (StatusCode, String)>;

/// GetStandByIp's cache and rate limit, shared by all callers.
#[derive(Clone)]
pub struct StandbyLookups {
    inner: Arc<Mutex<Lookups>>,
}

struct Lookups {
    answers: HashMap<(String, String), (StandbyAnswer, Instant)>,
    /// Token bucket: lookups that may reach the API server now.
    tokens: f64,
    refilled: Instant,
}

impl Default for StandbyLookups {
    fn default() -> Self {
        let lookups = Lookups { answers: HashMap::new(), tokens: STANDBY_BURST, refilled: Instant::now() };
        Self { inner: Arc::new(Mutex::new(lookups)) }
    }
}

impl StandbyLookups {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lookups> {
        // Whole values only: a poisoned lock still holds good ones.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A recent answer, or whether a lookup may go to the API server now.
    fn cached_or_admit(&self, key: &(String, String)) -> Result<Option<StandbyAnswer>, ()> {
        let mut l = self.lock();
        if let Some((a, at)) = l.answers.get(key) {
            if at.elapsed() < STANDBY_CACHE_FOR {
                return Ok(Some(a.clone()));
            }
        }
        let now = Instant::now();
        l.tokens = (l.tokens + now.duration_since(l.refilled).as_secs_f64() * STANDBY_PER_SECOND).min(STANDBY_BURST);
        l.refilled = now;
        if l.tokens < 1.0 {
            return Err(());
        }
        l.tokens -= 1.0;
        Ok(None)
    }

    fn remember(&self, key: (String, String), answer: StandbyAnswer) {
        let mut l = self.lock();
        if l.answers.len() >= STANDBY_CACHE_MAX {
            l.answers.retain(|_, (_, at)| at.elapsed() < STANDBY_CACHE_FOR);
            if l.answers.len() >= STANDBY_CACHE_MAX {
                l.answers.clear();
            }
        }
        l.answers.insert(key, (answer, Instant::now()));
    }
}

/// pod -> its node -> the node's `StandbyIP` condition (must exist, not be
/// False, and carry an IP as its message). Answers are reused for a few
/// seconds and lookups are rate limited (429 beyond), since any pod of the
/// node can call this and each lookup is two API reads.
async fn get_standby_ip(State(st): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let mut pod_name = None;
    let mut namespace = None;
    for (k, v) in form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match &*k {
            "podName" => pod_name = Some(v.into_owned()),
            "namespace" => namespace = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(pod_name) = pod_name.filter(|p| !p.is_empty()) else {
        return fail(StatusCode::BAD_REQUEST, "podName is required");
    };
    let namespace = namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    // They go into a URL path: only what Kubernetes allows in names.
    for (what, v) in [("podName", &pod_name), ("namespace", &namespace)] {
        if !is_object_name(v) {
            return fail(StatusCode::BAD_REQUEST, &format!("{what} {v:?} is not a valid Kubernetes name"));
        }
    }
    let Some((cluster, _)) = &st.kube else {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "no cluster configured: running standalone");
    };
    let key = (namespace, pod_name);
    let answer = match st.limits.standby.cached_or_admit(&key) {
        Ok(Some(cached)) => cached,
        Ok(None) => {
            let answer = standby_ip(cluster, &key.0, &key.1).await;
            // An API server that failed is not an answer worth keeping.
            if !matches!(&answer, Err((StatusCode::BAD_GATEWAY, _))) {
                st.limits.standby.remember(key, answer.clone());
            }
            answer
        }
        Err(()) => Err((StatusCode::TOO_MANY_REQUESTS, "too many GetStandByIp lookups; retry in a second".into())),
    };
    match answer {
        Ok(ip) => ok(json!(ip)),
        Err((status, message)) => fail(status, &message),
    }
}

async fn standby_ip(cluster: &crate::kube::Cluster, namespace: &str, pod_name: &str) -> StandbyAnswer {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let metrics = &cluster.metrics;
    let pod = match call(metrics, "get", "pods", pods.get_opt(pod_name)).await {
        Ok(Some(p)) => p,
        Ok(None) => return Err((StatusCode::NOT_FOUND, format!("pod {namespace}/{pod_name} not found"))),
        Err(e) => return Err((StatusCode::BAD_GATEWAY, format!("reading pod {namespace}/{pod_name}: {e}"))),
    };
    let Some(node_name) = pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) else {
        return Err((StatusCode::CONFLICT, format!("pod {namespace}/{pod_name} is not scheduled on a node")));
    };
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let node = match call(metrics, "get", "nodes", nodes.get_opt(&node_name)).await {
        Ok(Some(n)) => n,
        Ok(None) => return Err((StatusCode::NOT_FOUND, format!("node {node_name} not found"))),
        Err(e) => return Err((StatusCode::BAD_GATEWAY, format!("reading node {node_name}: {e}"))),
    };
    let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
    let Some(c) = conditions.into_iter().find(|c| c.type_ == "StandbyIP") else {
        return Err((StatusCode::NOT_FOUND, format!("node {node_name} has no StandbyIP condition")));
    };
    if c.status == "False" {
        return Err((StatusCode::NOT_FOUND, format!("node {node_name}: StandbyIP is False")));
    }
    match c.message.as_deref().map(str::trim).filter(|m| m.parse::<std::net::IpAddr>().is_ok()) {
        Some(ip) => Ok(ip.to_owned()),
        None => Err((StatusCode::NOT_FOUND, format!("node {node_name}: StandbyIP message is not an IP"))),
    }
}
