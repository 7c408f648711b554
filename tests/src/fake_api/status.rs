//! Errors as the apiserver sends them: a `v1 Status` object with the HTTP code,
//! a machine-readable `reason` and `details` naming the object. Clients branch
//! on `reason` and `code` (kube-rs `ErrorResponse`, client-go `IsNotFound`), so
//! these must match what a real apiserver says, message wording included.
use std::fmt;

use serde_json::{json, Value};

use super::discovery::ResourceType;

/// One failed request, answered as a Status object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` of the Status (`name`, `group`, `kind`, `causes`, `retryAfterSeconds`).
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    fn about(mut self, rt: &ResourceType, name: &str) -> Self {
        let mut d = json!({ "name": name, "kind": rt.plural });
        if !rt.group.is_empty() {
            d["group"] = json!(rt.group);
        }
        self.details = Some(d);
        self
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", rt.qualified())).about(rt, name)
    }

    /// A path the server does not serve at all.
    pub fn no_route(path: &str) -> Self {
        Self::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", rt.qualified())).about(rt, name)
    }

    /// Optimistic concurrency failure: the request's resourceVersion (or uid
    /// precondition) is not the stored one.
    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": {why}", rt.qualified()))
            .about(rt, name)
    }

    /// Server-side apply found fields owned by other managers with other values.
    pub fn apply_conflicts(rt: &ResourceType, name: &str, conflicts: &[(String, String)]) -> Self {
        let n = conflicts.len();
        let mut message = format!("Apply failed with {n} conflict{}:", if n == 1 { "" } else { "s" });
        let mut causes = Vec::new();
        for (manager, field) in conflicts {
            message.push_str(&format!(" conflict with \"{manager}\": {field}"));
            causes.push(json!({ "reason": "FieldManagerConflict", "message": format!("conflict with \"{manager}\""), "field": field }));
        }
        let mut e = Self::new(409, "Conflict", message).about(rt, name);
        if let Some(d) = e.details.as_mut() {
            d["causes"] = Value::Array(causes);
        }
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422: the object itself is malformed (missing name, wrong kind).
    pub fn invalid(rt: &ResourceType, name: &str, message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message).about(rt, name)
    }

    /// 422 on `ListOptions` (a combination of list parameters the apiserver
    /// rejects before reading anything).
    pub fn invalid_list_options(message: impl Into<String>) -> Self {
        let mut e = Self::new(422, "Invalid", message);
        e.details = Some(json!({ "group": "meta.k8s.io", "kind": "ListOptions" }));
        e
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    /// 410 Expired: a watch asked for history that was compacted away.
    pub fn expired(rv: u64, oldest: u64) -> Self {
        Self::new(410, "Expired", format!("too old resource version: {rv} ({oldest})"))
    }

    /// 410 Expired for a `continue` token whose snapshot was compacted away
    /// (the apiserver's wording).
    pub fn continue_expired() -> Self {
        Self::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        )
    }

    /// 504: a list or get at a resourceVersion the server has not reached
    /// (a real one waits up to 3 s for it first).
    pub fn too_large_resource_version(rv: u64, current: u64) -> Self {
        Self::new(504, "Timeout", format!("Too large resource version: {rv}, current: {current}"))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn too_many_requests(retry_after_secs: u32) -> Self {
        let mut e = Self::new(429, "TooManyRequests", "Too many requests, please try again later.");
        e.details = Some(json!({ "retryAfterSeconds": retry_after_secs }));
        e
    }

    pub fn service_unavailable() -> Self {
        Self::new(503, "ServiceUnavailable", "the server is currently unable to handle the request")
    }

    /// Any other injected status code.
    pub fn injected(code: u16) -> Self {
        match code {
            500 => Self::internal("injected failure"),
            503 => Self::service_unavailable(),
            429 => Self::too_many_requests(1),
            403 => Self::forbidden("injected: forbidden"),
            _ => Self::new(code, "Unknown", format!("injected status {code}")),
        }
    }

    /// The `v1 Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}
