//! The HTTP sink: health, readiness, metrics and the native v2 API, served by
//! axum on `--port`. Handlers only read domain state; they never write it.
pub mod access;
mod compat;
mod error;
pub mod logs;
mod ports;
mod query;
mod server;

use std::net::SocketAddr;

use axum::{
    extract::State,
    http::{header, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::error::ApiError;
use crate::{
    engines::{EngineState, Engines},
    kube::{Cluster, ClusterView, Publishing},
    logs::SweepHandle,
    network::NetworkState,
    ports::Ports,
    tasks::Tasks,
};

#[derive(Clone)]
pub struct AppState {
    pub ports: Ports,
    pub network: watch::Receiver<NetworkState>,
    pub engines: Engines,
    /// The cluster's inputs and the Kubernetes sinks; None in standalone mode.
    pub kube: Option<(Cluster, Publishing)>,
    pub logs: SweepHandle,
    pub sweep_policy: logs::HttpSweepPolicy,
    /// Checks callers of the endpoints that change state.
    pub access: access::Access,
    /// `--v1-require-auth`: the original's POSTs need a caller too.
    pub v1_auth: bool,
    /// Every supervised task's health.
    pub tasks: Tasks,
    /// What the handlers hold back for everyone (watch slots, lookups).
    pub limits: Limits,
    pub shutdown: CancellationToken,
}

/// Open watch streams at most; more get a 503 until one ends.
pub const MAX_WATCHERS: usize = 64;

/// Shared bounds of the handlers: any pod of the node can call them.
#[derive(Clone)]
pub struct Limits {
    watchers: std::sync::Arc<tokio::sync::Semaphore>,
    standby: compat::StandbyLookups,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            watchers: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_WATCHERS)),
            standby: compat::StandbyLookups::default(),
        }
    }
}

pub fn router(state: AppState) -> Router {
    let sweeps = logs::routes(state.logs.clone(), state.sweep_policy.clone(), state.access.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v2/kubernetes", get(kubernetes))
        .route("/api/v2/network", get(network))
        .route("/api/v2/engines", get(engines))
        .merge(compat::routes())
        .merge(ports::routes())
        .with_state(state)
        .merge(sweeps)
        .fallback(not_found)
}

/// Binds `addr` and serves until `shutdown` fires.
pub async fn serve(addr: SocketAddr, state: AppState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "HTTP API listening");
    let shutdown = state.shutdown.clone();
    server::serve(listener, router(state), shutdown).await
}

/// Alive: `{"status":"ok"}` (the original's body) while every core task
/// runs; 503 naming the dead ones otherwise, so the kubelet restarts the pod.
async fn healthz(State(st): State<AppState>) -> Response {
    let dead = st.tasks.dead();
    if dead.is_empty() {
        return Json(json!({ "status": "ok" })).into_response();
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "failing", "dead_tasks": dead }))).into_response()
}

/// Ready once the first full dump is merged (and eBPF attached, or its
/// absence explained in `mode`/`reason`). The API server being away does not
/// make the daemon unready: it still serves local state; the body says how
/// publishing fares.
async fn readyz(State(st): State<AppState>) -> Response {
    let status = st.ports.status().borrow().clone();
    let kubernetes = st.kube.as_ref().map_or_else(
        || json!({"mode": "standalone"}),
        |(c, p)| {
            let usage = p.port_usage.borrow();
            json!({"mode": "cluster", "node": c.node, "settings_synced": c.settings.borrow().synced,
                   "port_usage_pending": usage.pending, "last_error": usage.last_error})
        },
    );
    let ready = status.ready && st.tasks.healthy();
    let body = json!({ "ready": ready, "ports": status, "kubernetes": kubernetes, "tasks": st.tasks.snapshot() });
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

/// Prometheus metrics: one registry per scrape, one collector per domain,
/// each encoding from the domain's own state (see [`crate::telemetry`]).
async fn metrics(State(st): State<AppState>) -> Response {
    use crate::telemetry::{self, collector};
    let AppState { ports, logs, engines, kube, tasks, .. } = st;
    let mut domains = vec![
        collector("build", telemetry::encode_build_info),
        collector("tasks", move |e| tasks.encode_metrics(e)),
        Box::new(ports.metrics()),
        collector("logs", move |e| logs.encode_metrics(e)),
        collector("engines", move |e| engines.state.borrow().encode_metrics(e)),
    ];
    if let Some((cluster, _)) = kube {
        domains.push(collector("kube", move |e| cluster.metrics.encode(e)));
    }
    match telemetry::encode(domains) {
        Ok(text) => ([(header::CONTENT_TYPE, telemetry::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding /metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n").into_response()
        }
    }
}

/// The cluster side: mode, settings read from the cluster, this node's
/// hostPorts, and how publishing fares.
async fn kubernetes(State(st): State<AppState>) -> Json<ClusterView> {
    Json(ClusterView::of(st.kube.as_ref().map(|(c, p)| (c, p))))
}

/// The client NIC: state, addresses, the chosen client IP, last change.
async fn network(State(st): State<AppState>) -> Json<NetworkState> {
    Json(st.network.borrow().clone())
}

/// Each engine version, each image, present or not and where, the runtimes,
/// the last check.
async fn engines(State(st): State<AppState>) -> Json<EngineState> {
    Json(st.engines.state.borrow().clone())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}
