//! Native HTTP API of the log sweeper.
//!
//! - `POST /api/v2/logs/sweep?dry_run=true|false`: run a sweep now and return
//!   its report. The port is on the host network, so every sweep needs an
//!   authorized caller (see [`super::access`]): a dry run walks the whole log
//!   tree, a real one deletes. A real one also needs `--log-sweep-http-enable`.
//! - `GET /api/v2/logs/last-sweep`: the last report (404 before the first).
//!
//! Errors are `{"error": "..."}` with a 4xx (5xx only when the sweep itself
//! could not run).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::access::{Access, Action};
use crate::logs::{LogSweepArgs, SweepError, SweepHandle};

/// Whether real (deleting) sweeps may be asked for over HTTP.
#[derive(Debug, Clone, Default)]
pub struct HttpSweepPolicy {
    /// `--log-sweep-http-enable`.
    pub allow_real_sweeps: bool,
}

impl HttpSweepPolicy {
    pub fn from_args(args: &LogSweepArgs) -> Self {
        Self { allow_real_sweeps: args.log_sweep_http_enable }
    }
}

struct AppState {
    handle: SweepHandle,
    policy: HttpSweepPolicy,
    access: Access,
}

/// The log-sweep routes, to be merged into the daemon's router.
pub fn routes(handle: SweepHandle, policy: HttpSweepPolicy, access: Access) -> Router {
    Router::new()
        .route("/api/v2/logs/sweep", post(sweep))
        .route("/api/v2/logs/last-sweep", get(last_sweep))
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed (sweep is POST, last-sweep is GET)")
        })
        .with_state(Arc::new(AppState { handle, policy, access }))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// Parses the query by hand so every mistake gets a JSON 400 naming it.
/// `dry_run` defaults to true: omitting it must never delete.
fn parse_dry_run(query: Option<&str>) -> Result<bool, String> {
    let mut dry_run = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "dry_run" => {
                if dry_run.is_some() {
                    return Err("dry_run given more than once".into());
                }
                dry_run = Some(match value {
                    "true" => true,
                    "false" => false,
                    other => {
                        let shown: String = other.chars().take(32).collect();
                        return Err(format!("dry_run must be true or false, got {shown:?}"));
                    }
                });
            }
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(format!("unknown query parameter {shown:?} (only dry_run)"));
            }
        }
    }
    Ok(dry_run.unwrap_or(true))
}

async fn sweep(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    let dry_run = match parse_dry_run(query.as_deref()) {
        Ok(d) => d,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    if !dry_run && !state.policy.allow_real_sweeps {
        return error(
            StatusCode::FORBIDDEN,
            "real sweeps over HTTP are disabled (--log-sweep-http-enable); dry_run=true is allowed",
        );
    }
    if let Err(refused) = state.access.check(Action::Sweep, &headers).await {
        let mut resp = error(refused.status(), refused.to_string());
        if refused.status() == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return resp;
    }
    match state.handle.sweep(dry_run).await {
        Ok(report) => Json(report).into_response(),
        // The sweep could not run (root missing, shutting down): nothing
        // was deleted and retrying later may work.
        Err(e @ SweepError::Internal { .. }) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn last_sweep(State(state): State<Arc<AppState>>) -> Response {
    match state.handle.last_report() {
        Some(report) => Json(&*report).into_response(),
        None => error(StatusCode::NOT_FOUND, "no sweep has run yet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(parse_dry_run(None), Ok(true));
        assert_eq!(parse_dry_run(Some("")), Ok(true));
        assert_eq!(parse_dry_run(Some("dry_run=true")), Ok(true));
        assert_eq!(parse_dry_run(Some("dry_run=false")), Ok(false));
        for bad in
            ["dry_run=yes", "dry_run", "dry_run=false&dry_run=false", "x=1", "dry_run=%66alse", "dry_run=\u{1F600}"]
        {
            assert!(parse_dry_run(Some(bad)).is_err(), "{bad}");
        }
    }
}
