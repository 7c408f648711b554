//! TokenReview and SubjectAccessReview, as a real apiserver answers them for
//! a client that delegates authentication and authorization (the kubelet,
//! kube-rbac-proxy, this daemon's mutating endpoints): created, never
//! stored, the answer in `status`.
//!
//! Tests say which tokens belong to whom ([`super::FakeApi::add_user`]) and
//! what each user may do on non-resource URLs ([`super::FakeApi::grant`]).
//! `system:masters` may do everything, as on a real cluster.
use serde_json::{json, Value};

use super::{server::ApiRequest, status::ApiError, Control};

/// A user a token authenticates as.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

/// `post` (or another verb) on one non-resource path, for one user.
#[derive(Debug, Clone)]
pub struct Grant {
    pub user: String,
    pub verb: String,
    pub path: String,
}

/// The created review, with its `status`; `plural` is tokenreviews or
/// subjectaccessreviews.
pub fn answer(control: &Control, plural: &str, req: &ApiRequest) -> Result<(u16, Value), ApiError> {
    let mut review: Value =
        serde_json::from_slice(&req.body).map_err(|e| ApiError::bad_request(format!("decoding the review: {e}")))?;
    let spec = review.get("spec").cloned().unwrap_or(Value::Null);
    let status = match plural {
        "tokenreviews" => token_review(control, &spec),
        "subjectaccessreviews" => access_review(control, &spec)?,
        other => return Err(ApiError::bad_request(format!("{other} is not a review"))),
    };
    review["status"] = status;
    Ok((201, review))
}

fn token_review(control: &Control, spec: &Value) -> Value {
    let token = spec.get("token").and_then(Value::as_str).unwrap_or_default();
    match control.users.get(token) {
        Some(u) => json!({
            "authenticated": true,
            "user": {"username": u.name, "uid": u.uid, "groups": u.groups},
            "audiences": ["https://kubernetes.default.svc"],
        }),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    }
}

fn access_review(control: &Control, spec: &Value) -> Result<Value, ApiError> {
    let user = spec.get("user").and_then(Value::as_str).unwrap_or_default();
    let groups: Vec<&str> =
        spec.get("groups").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    if user.is_empty() && groups.is_empty() {
        return Err(ApiError::invalid(
            super::discovery::ResourceType::lookup("subjectaccessreviews").expect("served"),
            "",
            "spec.user: Invalid value: \"\": at least one of user or group must be specified",
        ));
    }
    if groups.contains(&"system:masters") {
        return Ok(json!({"allowed": true, "reason": "member of system:masters"}));
    }
    let Some(attrs) = spec.get("nonResourceAttributes") else {
        // Resource attributes: nothing in this fake grants them to users.
        return Ok(json!({"allowed": false, "reason": "no RBAC rule for resources in the fake"}));
    };
    let path = attrs.get("path").and_then(Value::as_str).unwrap_or_default();
    let verb = attrs.get("verb").and_then(Value::as_str).unwrap_or_default();
    let allowed = control.grants.iter().any(|g| g.user == user && g.verb == verb && path_matches(&g.path, path));
    Ok(if allowed {
        json!({"allowed": true, "reason": format!("RBAC: allowed {user} to {verb} {path}")})
    } else {
        json!({"allowed": false})
    })
}

/// RBAC's non-resource URL match: exact, or a prefix ending in `*`.
fn path_matches(rule: &str, path: &str) -> bool {
    match rule.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => rule == path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_resource_paths_match_exactly_or_by_star_prefix() {
        assert!(path_matches("/api/v2/logs/sweep", "/api/v2/logs/sweep"));
        assert!(!path_matches("/api/v2/logs/sweep", "/api/v2/logs/sweep/x"));
        assert!(path_matches("/api/*", "/api/v1/x"));
        assert!(path_matches("*", "/anything"));
    }
}
