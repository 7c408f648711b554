//! The original daemon's `/api/v1` endpoints that this one serves, in its
//! envelope (COMPAT.md "Outputs" 4): `{"code":"1","data":..,"message":"",
//! "requestId":".."}` on success with HTTP 200; on error a non-2xx status,
//! `code` "0" and the reason in `message`. `code` stays a string.
use axum::{
    extract::{RawQuery, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use serde_json::{json, Value};

use super::AppState;
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
async fn request_check_core_version(State(st): State<AppState>) -> Response {
    st.engines.ask_rescan();
    if let Some((_, publishing)) = &st.kube {
        publishing.rescan_bus.request();
    }
    ok(json!("done"))
}

/// Rescans here only (the body's `HostName`, if any, is not needed: this
/// daemon knows its node).
async fn inner_check_core_version(State(st): State<AppState>) -> Response {
    match st.engines.rescan().await {
        Ok(()) => ok(json!("OK")),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn test_conn() -> Response {
    ok(json!({"message": "connected"}))
}

/// pod -> its node -> the node's `StandbyIP` condition (must exist, not be
/// False, and carry an IP as its message).
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
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &namespace);
    let metrics = &cluster.metrics;
    let pod = match call(metrics, "get", "pods", pods.get_opt(&pod_name)).await {
        Ok(Some(p)) => p,
        Ok(None) => return fail(StatusCode::NOT_FOUND, &format!("pod {namespace}/{pod_name} not found")),
        Err(e) => return fail(StatusCode::BAD_GATEWAY, &format!("reading pod {namespace}/{pod_name}: {e}")),
    };
    let Some(node_name) = pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) else {
        return fail(StatusCode::CONFLICT, &format!("pod {namespace}/{pod_name} is not scheduled on a node"));
    };
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let node = match call(metrics, "get", "nodes", nodes.get_opt(&node_name)).await {
        Ok(Some(n)) => n,
        Ok(None) => return fail(StatusCode::NOT_FOUND, &format!("node {node_name} not found")),
        Err(e) => return fail(StatusCode::BAD_GATEWAY, &format!("reading node {node_name}: {e}")),
    };
    let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
    let Some(c) = conditions.into_iter().find(|c| c.type_ == "StandbyIP") else {
        return fail(StatusCode::NOT_FOUND, &format!("node {node_name} has no StandbyIP condition"));
    };
    if c.status == "False" {
        return fail(StatusCode::NOT_FOUND, &format!("node {node_name}: StandbyIP is False"));
    }
    match c.message.as_deref().map(str::trim).filter(|m| m.parse::<std::net::IpAddr>().is_ok()) {
        Some(ip) => ok(json!(ip)),
        None => fail(StatusCode::NOT_FOUND, &format!("node {node_name}: StandbyIP message is not an IP")),
    }
}
