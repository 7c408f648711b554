//! HTTP: the accept loop, the per-request wrapper (faults, RBAC, request
//! log) and the routes. hyper directly rather than a router framework: an
//! injected fault must be able to drop a connection without answering, and
//! Kubernetes paths are easier to take apart by hand than to declare.
use std::{
    convert::Infallible,
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::{
    body::Incoming,
    header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER, USER_AGENT},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot};

use super::{
    discovery::{self, ResourceType},
    faults::{FaultAction, Verdict},
    handlers,
    rbac::{Attributes, AuthzCheck, RbacRule},
    reviews, selector,
    status::ApiError,
    watch, RequestRecord, Shared,
};

type Body = BoxBody<Bytes, Infallible>;

/// Larger bodies are refused; the apiserver's own limit is 3 MiB per object.
const MAX_BODY: usize = 8 << 20;

/// Serves until `stop` fires (or its sender is dropped).
pub(super) async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-apiserver: cannot serve: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if shared.control().down {
                    continue; // dropped: closed without a word
                }
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    // Errors here are clients going away or injected drops.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
}

/// Returned to hyper to close the connection without a response.
#[derive(Debug)]
struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped by an injected fault")
    }
}

impl std::error::Error for DropConnection {}

/// Decoded query parameters.
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A request, read whole (except for what watches stream back).
#[derive(Debug)]
pub struct ApiRequest {
    pub method: Method,
    pub query: Query,
    /// The media type of Content-Type, without parameters.
    pub content_type: String,
    pub user_agent: String,
    /// The Accept header as sent (empty when absent).
    pub accept: String,
    pub body: Bytes,
}

/// A resource URL taken apart.
#[derive(Debug)]
pub struct Target {
    pub rt: &'static ResourceType,
    /// Namespace from the URL (namespaced resources; `None` = all namespaces).
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Only `status`, for resources that have it.
    pub subresource: Option<String>,
}

enum Route {
    Version,
    Health,
    CoreVersions,
    GroupList,
    Group(String),
    ResourceList(String, String),
    OpenApiIndex,
    OpenApi(String, String),
    Resource(Target),
}

fn target(group: &str, version: &str, rest: &[&str]) -> Option<Route> {
    let make = |rt, namespace: Option<&str>, name: Option<&&str>, sub: Option<&&str>| {
        Some(Route::Resource(Target {
            rt,
            namespace: namespace.map(str::to_string),
            name: name.map(|n| n.to_string()),
            subresource: sub.map(|s| s.to_string()),
        }))
    };
    if let ["namespaces", ns, plural, tail @ ..] = rest {
        if let Some(rt) = ResourceType::find(group, version, plural).filter(|r| r.namespaced) {
            return match tail {
                [] => make(rt, Some(ns), None, None),
                [name] => make(rt, Some(ns), Some(name), None),
                [name, sub] if *sub == "status" && rt.status_subresource => make(rt, Some(ns), Some(name), Some(sub)),
                _ => None,
            };
        }
    }
    let [plural, tail @ ..] = rest else { return None };
    let rt = ResourceType::find(group, version, plural)?;
    match tail {
        [] => make(rt, None, None, None),
        [name] if !rt.namespaced => make(rt, None, Some(name), None),
        [name, sub] if !rt.namespaced && *sub == "status" && rt.status_subresource => {
            make(rt, None, Some(name), Some(sub))
        }
        _ => None,
    }
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Some(Route::Version),
        ["healthz" | "livez" | "readyz"] => Some(Route::Health),
        ["api"] => Some(Route::CoreVersions),
        ["api", v] => Some(Route::ResourceList(String::new(), v.to_string())),
        ["api", v, rest @ ..] => target("", v, rest),
        ["apis"] => Some(Route::GroupList),
        ["apis", g] => Some(Route::Group(g.to_string())),
        ["apis", g, v] => Some(Route::ResourceList(g.to_string(), v.to_string())),
        ["apis", g, v, rest @ ..] => target(g, v, rest),
        ["openapi", "v3"] => Some(Route::OpenApiIndex),
        ["openapi", "v3", "api", v] => Some(Route::OpenApi(String::new(), v.to_string())),
        ["openapi", "v3", "apis", g, v] => Some(Route::OpenApi(g.to_string(), v.to_string())),
        _ => None,
    }
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if let Some(secs) = e.details.as_ref().and_then(|d| d.get("retryAfterSeconds")).and_then(Value::as_u64) {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// The RBAC verb of a resource request.
fn verb(method: &Method, t: &Target, watching: bool) -> Option<&'static str> {
    Some(match (method.as_str(), t.name.is_some()) {
        ("GET", _) if watching => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) if t.subresource.is_none() => "deletecollection",
        _ => return None,
    })
}

/// Answers one request: faults first (they stand for the network and an
/// overloaded server), then RBAC, then the API itself.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, DropConnection> {
    let header = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
    let mut record = RequestRecord {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or_default().to_string(),
        content_type: header(CONTENT_TYPE),
        accept: header(ACCEPT),
        user_agent: header(USER_AGENT),
        status: 0,
        denied: false,
        authorization: Vec::new(),
        at: Instant::now(),
    };
    let verdict = {
        let mut control = shared.control();
        if control.down {
            Verdict { delay: Duration::ZERO, action: Some(FaultAction::DropConnection) }
        } else {
            control.faults.decide(&record.method, &record.path, &record.query)
        }
    };
    if !verdict.delay.is_zero() {
        tokio::time::sleep(verdict.delay).await;
    }
    let response = match verdict.action {
        Some(FaultAction::DropConnection) => {
            shared.record(record);
            return Err(DropConnection);
        }
        Some(FaultAction::Status(code)) => error_response(&ApiError::injected(code)),
        Some(FaultAction::TooManyRequests { retry_after_secs }) => {
            error_response(&ApiError::too_many_requests(retry_after_secs))
        }
        Some(FaultAction::Garbage) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"{\"kind\": \x00<html>not json")).boxed());
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Some(FaultAction::Delay(_)) | None => {
            let (parts, body) = req.into_parts();
            let body = match Limited::new(body, MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    shared.record(record);
                    return Err(DropConnection);
                }
            };
            let query = Query(form_urlencoded::parse(record.query.as_bytes()).into_owned().collect());
            let content_type = record.content_type.as_deref().unwrap_or_default();
            let api_req = ApiRequest {
                method: parts.method,
                query,
                content_type: content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase(),
                user_agent: record.user_agent.clone().unwrap_or_default(),
                accept: record.accept.clone().unwrap_or_default(),
                body,
            };
            let (response, checks) = answer(&shared, &record.path, &api_req);
            record.denied = checks.iter().any(|c| !c.allowed);
            record.authorization = checks;
            response
        }
    };
    record.status = response.status().as_u16();
    shared.record(record);
    Ok(response)
}

/// The 403 of a refused request.
fn forbidden(attrs: &Attributes<'_>) -> Response<Body> {
    let mut e = ApiError::forbidden(attrs.denial());
    e.details = Some(serde_json::json!({ "name": attrs.name.unwrap_or_default(), "kind": attrs.resource.plural }));
    error_response(&e)
}

/// RBAC, as the apiserver applies it: the request's verb on the object the
/// URL names (for list and watch, the one a `metadata.name` field selector
/// names), and for a server-side apply that would create its object, `create`
/// on that name as well (the patch handler's create-on-update check). The
/// response when refused, and the decisions made.
fn authorize(
    shared: &Shared,
    rules: &[RbacRule],
    t: &Target,
    verb: &'static str,
    req: &ApiRequest,
) -> (Option<Response<Body>>, Vec<AuthzCheck>) {
    let selected = match verb {
        "list" | "watch" => req.query.get("fieldSelector").and_then(selector::exact_name),
        _ => None,
    };
    let attrs = Attributes {
        verb,
        resource: t.rt,
        subresource: t.subresource.as_deref(),
        namespace: t.namespace.as_deref(),
        name: t.name.as_deref().or(selected.as_deref()),
    };
    let check = attrs.check(rules);
    if !check.allowed {
        return (Some(forbidden(&attrs)), vec![check]);
    }
    let mut checks = vec![check];
    let creates = verb == "patch"
        && req.content_type == "application/apply-patch+yaml"
        && t.subresource.is_none()
        && t.name.as_deref().is_some_and(|n| shared.store().get(t.rt, t.namespace.as_deref(), n).is_none());
    if creates {
        // The apiserver's message here carries only the authorizer's reason
        // (empty for RBAC); this one says what was refused.
        let create = Attributes { verb: "create", ..attrs };
        let check = create.check(rules);
        let refused = !check.allowed;
        checks.push(check);
        if refused {
            return (Some(forbidden(&create)), checks);
        }
    }
    (None, checks)
}

/// The API proper, and the authorization decisions it made.
fn answer(shared: &Arc<Shared>, path: &str, req: &ApiRequest) -> (Response<Body>, Vec<AuthzCheck>) {
    let doc = |d: Option<Value>| match d {
        Some(d) => json_response(200, &d),
        None => error_response(&ApiError::no_route(path)),
    };
    let get_only = |r: Response<Body>| {
        if req.method == Method::GET {
            r
        } else {
            error_response(&ApiError::method_not_allowed(req.method.as_str()))
        }
    };
    let none = Vec::new;
    let t = match route(path) {
        None => return (error_response(&ApiError::no_route(path)), none()),
        Some(Route::Version) => return (get_only(doc(Some(discovery::version()))), none()),
        Some(Route::Health) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return (r, none());
        }
        Some(Route::CoreVersions) => return (get_only(doc(Some(discovery::core_versions()))), none()),
        Some(Route::GroupList) => return (get_only(doc(Some(discovery::group_list()))), none()),
        Some(Route::Group(g)) => return (get_only(doc(discovery::group(&g))), none()),
        Some(Route::ResourceList(g, v)) => return (get_only(doc(discovery::resource_list(&g, &v))), none()),
        Some(Route::OpenApiIndex) => return (get_only(doc(Some(discovery::openapi_index()))), none()),
        Some(Route::OpenApi(g, v)) => return (get_only(doc(discovery::openapi_group_version(&g, &v))), none()),
        Some(Route::Resource(t)) => t,
    };
    let watching = req.method == Method::GET && watch::requested(req);
    let Some(verb) = verb(&req.method, &t, watching) else {
        return (error_response(&ApiError::method_not_allowed(req.method.as_str())), none());
    };
    let rules = shared.control().rbac.clone();
    let mut checks = Vec::new();
    if let Some(rules) = rules {
        let (refused, made) = authorize(shared, &rules, &t, verb, req);
        checks = made;
        if let Some(r) = refused {
            return (r, checks);
        }
    }
    if t.rt.review {
        if verb != "create" {
            return (error_response(&ApiError::method_not_allowed(req.method.as_str())), checks);
        }
        return match reviews::answer(&shared.control(), t.rt.plural, req) {
            Ok((code, body)) => (json_response(code, &body), checks),
            Err(e) => (error_response(&e), checks),
        };
    }
    if watching {
        return match watch::start(shared, &t, req) {
            Ok(body) => {
                let mut r = Response::new(body.boxed());
                r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                (r, checks)
            }
            Err(e) => (error_response(&e), checks),
        };
    }
    let result = handlers::handle(&mut shared.store(), &t, verb, req);
    match result {
        Ok((code, body)) => (json_response(code, &body), checks),
        Err(e) => (error_response(&e), checks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (plural, namespace, name, subresource) of a resource path.
    type Parts = (&'static str, Option<String>, Option<String>, Option<String>);

    fn resource(path: &str) -> Option<Parts> {
        match route(path)? {
            Route::Resource(t) => Some((t.rt.plural, t.namespace, t.name, t.subresource)),
            _ => None,
        }
    }

    #[test]
    fn paths() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(resource("/api/v1/namespaces/ns/configmaps"), Some(("configmaps", s("ns"), None, None)));
        assert_eq!(resource("/api/v1/namespaces/ns/configmaps/a"), Some(("configmaps", s("ns"), s("a"), None)));
        assert_eq!(resource("/api/v1/configmaps"), Some(("configmaps", None, None, None)));
        assert_eq!(resource("/api/v1/nodes/n1/status"), Some(("nodes", None, s("n1"), s("status"))));
        assert_eq!(resource("/api/v1/namespaces/kube-system"), Some(("namespaces", None, s("kube-system"), None)));
        assert_eq!(resource("/api/v1/namespaces/ns/pods/p/status"), Some(("pods", s("ns"), s("p"), s("status"))));
        assert_eq!(resource("/apis/events.k8s.io/v1/namespaces/ns/events"), Some(("events", s("ns"), None, None)));
        for missing in [
            "/api/v1/configmaps/a",
            "/api/v1/namespaces/ns/configmaps/a/status",
            "/api/v1/namespaces/ns/nodes",
            "/api/v1/widgets",
            "/api/v2/nodes",
            "/openapi/v2",
        ] {
            assert!(resource(missing).is_none(), "{missing}");
        }
    }
}
