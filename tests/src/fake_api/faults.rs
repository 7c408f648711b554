//! Failure injection: what a flaky or overloaded apiserver, or a broken
//! network in front of it, does to a client.
use std::time::Duration;

/// What a fault does to a request it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this status (500, 503, ...) and a Status body.
    Status(u16),
    /// 429 with a `Retry-After` header, as API priority and fairness sends.
    TooManyRequests { retry_after_secs: u32 },
    /// Close the connection without answering.
    DropConnection,
    /// Answer normally, this much later.
    Delay(Duration),
    /// 200 with a body that is not JSON, as a broken proxy in front of the
    /// apiserver might send.
    Garbage,
}

/// A fault: an action, which requests it applies to, and how many times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub action: FaultAction,
    /// Only requests with this method (`GET`, `PATCH`, ...).
    pub method: Option<String>,
    /// Only requests whose path contains this.
    pub path_contains: Option<String>,
    /// Only requests with these query parameters (decoded, exact values):
    /// tells apart lists of one path by their selectors or `limit`.
    pub params: Vec<(String, String)>,
    /// How many more requests it applies to; `None`: until cleared.
    pub remaining: Option<u32>,
}

impl Fault {
    pub fn new(action: FaultAction) -> Self {
        Self { action, method: None, path_contains: None, params: Vec::new(), remaining: None }
    }

    /// Any status; 500 and 503 get their Kubernetes reasons.
    pub fn status(code: u16) -> Self {
        Self::new(FaultAction::Status(code))
    }

    pub fn internal_error() -> Self {
        Self::status(500)
    }

    pub fn unavailable() -> Self {
        Self::status(503)
    }

    pub fn too_many_requests(retry_after_secs: u32) -> Self {
        Self::new(FaultAction::TooManyRequests { retry_after_secs })
    }

    pub fn drop_connection() -> Self {
        Self::new(FaultAction::DropConnection)
    }

    pub fn garbage() -> Self {
        Self::new(FaultAction::Garbage)
    }

    pub fn delay(by: Duration) -> Self {
        Self::new(FaultAction::Delay(by))
    }

    /// Applies to the next `n` matching requests only.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    pub fn path_contains(mut self, fragment: &str) -> Self {
        self.path_contains = Some(fragment.to_string());
        self
    }

    /// Only requests whose query has `name=value` (decoded), e.g.
    /// `.param("labelSelector", "app=db")`; several calls must all match.
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.params.push((name.to_string(), value.to_string()));
        self
    }

    fn matches(&self, method: &str, path: &str, query: &str) -> bool {
        self.remaining != Some(0)
            && self.method.as_deref().is_none_or(|m| m == method)
            && self.path_contains.as_deref().is_none_or(|p| path.contains(p))
            && self.params.iter().all(|(name, value)| {
                form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == name.as_str() && v == value.as_str())
            })
    }
}

/// What the faults decided for one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The sum of the matching delays.
    pub delay: Duration,
    /// The first matching non-delay fault's action.
    pub action: Option<FaultAction>,
}

/// The active faults, in the order injected.
#[derive(Debug, Default)]
pub struct Faults(Vec<Fault>);

impl Faults {
    pub fn inject(&mut self, fault: Fault) {
        self.0.push(fault);
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Decides for one request (`query` raw, without `?`), counting it
    /// against the faults that apply.
    pub fn decide(&mut self, method: &str, path: &str, query: &str) -> Verdict {
        let mut verdict = Verdict::default();
        for f in self.0.iter_mut().filter(|f| f.matches(method, path, query)) {
            match &f.action {
                FaultAction::Delay(d) => verdict.delay += *d,
                _ if verdict.action.is_some() => continue,
                action => verdict.action = Some(action.clone()),
            }
            if let Some(n) = f.remaining.as_mut() {
                *n -= 1;
            }
        }
        self.0.retain(|f| f.remaining != Some(0));
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_filters() {
        let mut f = Faults::default();
        f.inject(Fault::internal_error().times(2).method("patch").path_contains("/nodes/"));
        f.inject(Fault::delay(Duration::from_millis(5)));
        f.inject(Fault::unavailable().times(1));
        let d = Duration::from_millis(5);
        assert_eq!(
            f.decide("GET", "/api/v1/nodes/n1", ""),
            Verdict { delay: d, action: Some(FaultAction::Status(503)) }
        );
        assert_eq!(f.decide("GET", "/api/v1/nodes/n1", ""), Verdict { delay: d, action: None });
        assert_eq!(f.decide("PATCH", "/api/v1/nodes/n1", "").action, Some(FaultAction::Status(500)));
        assert_eq!(f.decide("PATCH", "/api/v1/configmaps", "").action, None);
        assert_eq!(f.decide("PATCH", "/api/v1/nodes/n1", "").action, Some(FaultAction::Status(500)));
        assert_eq!(f.decide("PATCH", "/api/v1/nodes/n1", ""), Verdict { delay: d, action: None });
        f.clear();
        assert_eq!(f.decide("PATCH", "/api/v1/nodes/n1", ""), Verdict::default());
    }

    #[test]
    fn query_parameters_tell_lists_apart() {
        let mut f = Faults::default();
        f.inject(Fault::internal_error().param("labelSelector", "app=x").param("limit", "1"));
        let hit = Some(FaultAction::Status(500));
        assert_eq!(f.decide("GET", "/api/v1/pods", "labelSelector=app%3Dx&limit=1").action, hit);
        assert_eq!(f.decide("GET", "/api/v1/pods", "limit=1&labelSelector=app%3Dx").action, hit);
        assert_eq!(f.decide("GET", "/api/v1/pods", "labelSelector=app%3Dx&limit=10").action, None);
        assert_eq!(f.decide("GET", "/api/v1/pods", "labelSelector=app%3Dxy&limit=1").action, None);
        assert_eq!(f.decide("GET", "/api/v1/pods", "").action, None);
    }
}
