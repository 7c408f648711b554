//! Who may call the endpoints that change state or make the cluster work.
//!
//! The port is on the host network: every pod of the node can reach it. So
//! each such endpoint is an [`Action`] with an RBAC attribute, and a caller
//! presents a bearer token that is checked:
//! - against `--api-token-file` (re-read per check, so a rotated Secret
//!   applies without restart), standalone or in a cluster;
//! - in a cluster, the Kubernetes way, as the kubelet and kube-rbac-proxy do:
//!   a TokenReview says who the token belongs to, then a SubjectAccessReview
//!   whether that user may `post` the endpoint's path (a non-resource URL:
//!   grant it with a ClusterRole rule `nonResourceURLs: [<path>]`).
//!
//! Decisions are cached briefly per token and action (allowed 30 s, refused
//! 5 s), so a loop of calls costs the API server at most two reviews per
//! interval, and the cache is bounded. An API server that cannot answer makes
//! the check fail closed with 503.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::{header, HeaderMap, StatusCode};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{api::PostParams, Api};

use crate::kube::{
    client::{call, ApiMetrics},
    Cluster,
};

/// An endpoint that needs a caller's identity, and what RBAC calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `POST /api/v2/logs/sweep` (dry runs too: they walk the whole log tree).
    Sweep,
    /// `POST /api/v1/RequestCheckCoreVersion` (every node rescans).
    RescanCluster,
    /// `POST /api/v1/InnerCheckCoreVersion` (this node rescans).
    RescanNode,
}

impl Action {
    /// The non-resource URL a SubjectAccessReview asks about.
    pub fn path(self) -> &'static str {
        match self {
            Self::Sweep => "/api/v2/logs/sweep",
            Self::RescanCluster => "/api/v1/RequestCheckCoreVersion",
            Self::RescanNode => "/api/v1/InnerCheckCoreVersion",
        }
    }

    /// The RBAC verb: the HTTP method, lowercased, as for every non-resource URL.
    pub const VERB: &'static str = "post";
}

/// Why a caller was refused; each maps to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing bearer token (Authorization: Bearer <token>)")]
    NoToken,
    #[error("the bearer token is not valid here")]
    BadToken,
    #[error("{user} may not post {path}: {reason}")]
    Denied { user: String, path: &'static str, reason: String },
    #[error("no way to check a token: standalone, give --api-token-file")]
    NotConfigured,
    #[error("the token cannot be checked now: {0}")]
    Unverifiable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoToken | Self::BadToken => StatusCode::UNAUTHORIZED,
            Self::Denied { .. } | Self::NotConfigured => StatusCode::FORBIDDEN,
            Self::Unverifiable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Who was let in, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    TokenFile,
    User(String),
}

/// How long a decision is reused.
const ALLOWED_FOR: Duration = Duration::from_secs(30);
const REFUSED_FOR: Duration = Duration::from_secs(5);
/// Cached decisions at most; a full cache is emptied (a flood of made-up
/// tokens cannot grow memory).
const CACHE_MAX: usize = 1024;

/// Decisions by (token, call), with when each was made.
type DecisionCache = HashMap<(String, Action), (Decision, Instant)>;

type Decision = Result<Caller, Refusal>;

/// Cheap to clone; every clone shares the cache.
#[derive(Clone)]
pub struct Access {
    token_file: Option<PathBuf>,
    reviewer: Option<(kube::Client, Arc<ApiMetrics>)>,
    cache: Arc<Mutex<DecisionCache>>,
}

impl Access {
    pub fn new(token_file: Option<PathBuf>, cluster: Option<&Cluster>) -> Self {
        Self {
            token_file,
            reviewer: cluster.map(|c| (c.client.clone(), c.metrics.clone())),
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Checks the request's bearer token for `action`.
    pub async fn check(&self, action: Action, headers: &HeaderMap) -> Decision {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::NoToken)?;
        // The token file is read on every call, so a rotated Secret applies
        // at once; only the API server's answers are cached.
        if self.token_file_matches(token) {
            tracing::info!(caller = "token file", path = action.path(), "authorized request");
            return Ok(Caller::TokenFile);
        }
        let Some((client, metrics)) = &self.reviewer else {
            return Err(if self.token_file.is_some() { Refusal::BadToken } else { Refusal::NotConfigured });
        };
        let key = (token.to_owned(), action);
        if let Some((d, at)) = self.cache().get(&key) {
            let ttl = if d.is_ok() { ALLOWED_FOR } else { REFUSED_FOR };
            if at.elapsed() < ttl {
                return d.clone();
            }
        }
        let decision = review(client, metrics, action, token).await;
        // An API server that could not answer is not a decision about the token.
        if !matches!(decision, Err(Refusal::Unverifiable(_))) {
            let mut cache = self.cache();
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, (decision.clone(), Instant::now()));
        }
        match &decision {
            Ok(caller) => tracing::info!(?caller, path = action.path(), "authorized request"),
            Err(e) => tracing::info!(error = %e, path = action.path(), "refused request"),
        }
        decision
    }

    fn token_file_matches(&self, token: &str) -> bool {
        let Some(file) = &self.token_file else { return false };
        match std::fs::read_to_string(file) {
            Ok(expected) if !expected.trim().is_empty() => {
                constant_time_eq(token.as_bytes(), expected.trim().as_bytes())
            }
            Ok(_) => {
                tracing::warn!(file = %file.display(), "the API token file is empty");
                false
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "the API token file is unreadable");
                false
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DecisionCache> {
        // Entries are whole values: a poisoned lock still holds good ones.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Who the token belongs to (TokenReview), then whether that user may
/// `post` the path (SubjectAccessReview with `nonResourceAttributes`).
async fn review(client: &kube::Client, metrics: &Arc<ApiMetrics>, action: Action, token: &str) -> Decision {
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: None },
        ..TokenReview::default()
    };
    let reviewed = call(metrics, "create", "tokenreviews", reviews.create(&PostParams::default(), &review))
        .await
        .map_err(|e| Refusal::Unverifiable(format!("TokenReview: {e}")))?;
    let status = reviewed.status.unwrap_or_default();
    let user = status.user.filter(|_| status.authenticated == Some(true)).ok_or(Refusal::BadToken)?;
    let username = user.username.clone().unwrap_or_default();
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(action.path().to_owned()),
                verb: Some(Action::VERB.to_owned()),
            }),
            resource_attributes: None,
        },
        ..SubjectAccessReview::default()
    };
    let sars: Api<SubjectAccessReview> = Api::all(client.clone());
    let answered = call(metrics, "create", "subjectaccessreviews", sars.create(&PostParams::default(), &sar))
        .await
        .map_err(|e| Refusal::Unverifiable(format!("SubjectAccessReview: {e}")))?;
    let status = answered.status.unwrap_or_default();
    if status.allowed && status.denied != Some(true) {
        Ok(Caller::User(username))
    } else {
        let reason = status.reason.filter(|r| !r.is_empty()).unwrap_or_else(|| "no RBAC rule allows it".into());
        Err(Refusal::Denied { user: username, path: action.path(), reason })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().expect("header"));
        h
    }

    #[tokio::test]
    async fn standalone_takes_the_token_file_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").expect("token");
        let access = Access::new(Some(file.clone()), None);
        assert_eq!(access.check(Action::Sweep, &bearer("s3cret")).await, Ok(Caller::TokenFile));
        assert_eq!(access.check(Action::Sweep, &bearer("s3cre")).await, Err(Refusal::BadToken));
        assert_eq!(access.check(Action::Sweep, &HeaderMap::new()).await, Err(Refusal::NoToken));
        // Rotated: the new token works and the old one stops, at once, for
        // the same call that was just allowed (nothing is cached here).
        std::fs::write(&file, "rotated").expect("token");
        assert_eq!(access.check(Action::Sweep, &bearer("rotated")).await, Ok(Caller::TokenFile));
        assert_eq!(access.check(Action::Sweep, &bearer("s3cret")).await, Err(Refusal::BadToken));
        let none = Access::new(None, None);
        assert_eq!(none.check(Action::Sweep, &bearer("anything")).await, Err(Refusal::NotConfigured));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn refusals_map_to_statuses() {
        assert_eq!(Refusal::NoToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Refusal::Unverifiable("down".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
        let denied = Refusal::Denied { user: "u".into(), path: Action::Sweep.path(), reason: "no".into() };
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
