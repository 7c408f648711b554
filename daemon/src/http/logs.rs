//! Native HTTP API of the log sweeper.
//!
//! - `POST /api/v2/logs/sweep?dry_run=true|false`: run a sweep now and return
//!   its report. Dry runs are open; a real sweep deletes files on a port that
//!   is on the host network, so it needs `--log-sweep-http-enable` and the
//!   bearer token from `--log-sweep-token-file`.
//! - `GET /api/v2/logs/last-sweep`: the last report (404 before the first).
//!
//! Errors are `{"error": "..."}` with a 4xx (5xx only when the sweep itself
//! could not run).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::logs::{LogSweepArgs, SweepError, SweepHandle};

/// Who may start a real (deleting) sweep over HTTP.
#[derive(Debug, Clone, Default)]
pub struct HttpSweepPolicy {
    /// `--log-sweep-http-enable`.
    pub allow_real_sweeps: bool,
    /// `--log-sweep-token-file`, read on every real-sweep request so a
    /// rotated Secret applies without restart.
    pub token_file: Option<PathBuf>,
}

impl HttpSweepPolicy {
    pub fn from_args(args: &LogSweepArgs) -> Self {
        Self { allow_real_sweeps: args.log_sweep_http_enable, token_file: args.log_sweep_token_file.clone() }
    }
}

struct AppState {
    handle: SweepHandle,
    policy: HttpSweepPolicy,
}

/// The log-sweep routes, to be merged into the daemon's router.
pub fn routes(handle: SweepHandle, policy: HttpSweepPolicy) -> Router {
    Router::new()
        .route("/api/v2/logs/sweep", post(sweep))
        .route("/api/v2/logs/last-sweep", get(last_sweep))
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed (sweep is POST, last-sweep is GET)")
        })
        .with_state(Arc::new(AppState { handle, policy }))
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

/// Compares without an early exit, so the time taken does not reveal how
/// many leading bytes matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

#[allow(clippy::result_large_err, reason = "the error is the response itself, built once per refused request")]
fn authorize(policy: &HttpSweepPolicy, headers: &HeaderMap) -> Result<(), Response> {
    if !policy.allow_real_sweeps {
        return Err(error(
            StatusCode::FORBIDDEN,
            "real sweeps over HTTP are disabled (--log-sweep-http-enable); dry_run=true is allowed",
        ));
    }
    let Some(file) = &policy.token_file else {
        return Err(error(StatusCode::FORBIDDEN, "no --log-sweep-token-file configured"));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented.filter(|p| !p.is_empty()) else {
        let mut resp = error(StatusCode::UNAUTHORIZED, "missing bearer token");
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(resp);
    };
    let expected = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "log sweep token file unreadable");
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "token file unreadable; real sweeps refused"));
        }
    };
    let expected = expected.trim();
    if expected.is_empty() {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "token file is empty; real sweeps refused"));
    }
    if !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        return Err(error(StatusCode::FORBIDDEN, "wrong bearer token"));
    }
    Ok(())
}

async fn sweep(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    let dry_run = match parse_dry_run(query.as_deref()) {
        Ok(d) => d,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    if !dry_run {
        if let Err(resp) = authorize(&state.policy, &headers) {
            return resp;
        }
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

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(!constant_time_eq(b"a\xff", b"a"));
    }
}
