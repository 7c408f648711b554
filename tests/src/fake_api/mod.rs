//! The project's fake Kubernetes API server: what kube-rs and kubectl need of
//! an apiserver, in-process, over plain HTTP on 127.0.0.1, with failure
//! injection and a request log for tests. No real apiserver can run here (see
//! docs/testing.md), so this one has to be faithful where clients can tell.
//!
//! ```no_run
//! use polarstack_tests::fake_api::{FakeApi, Fault};
//! use serde_json::json;
//!
//! let api = FakeApi::start();
//! api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
//! api.inject(Fault::internal_error().times(2).method("PATCH"));
//! // run the daemon with `--kubeconfig api.kubeconfig_path()` ...
//! let patches = api.requests().iter().filter(|r| r.method == "PATCH").count();
//! # let _ = patches;
//! ```
//!
//! It serves core/v1 configmaps, events, namespaces, nodes and pods and
//! events.k8s.io/v1 events (`discovery.rs`), with get, list, watch, create,
//! update, patch (JSON merge, strategic merge, JSON patch, server-side apply),
//! delete and deletecollection, the `/status` subresource, label and field
//! selectors, resourceVersion semantics and `managedFields`, and lists of
//! metadata only (`Accept: application/json;as=PartialObjectMetadataList;
//! g=meta.k8s.io;v=v1`, what kube's `list_metadata` asks for).
//!
//! TokenReviews and SubjectAccessReviews answer from what tests set
//! (`reviews.rs`): which tokens are whose, what users may post.
//!
//! Deliberately left out: authentication of the client itself (any token is
//! accepted), admission,
//! defaulting and validation of object contents (`fieldValidation` is
//! accepted and ignored), finalizers and graceful deletion, `generation`,
//! Table output (kubectl prints its own NAME/AGE columns), protobuf (415, so
//! kubectl's typed generators such as `kubectl create configmap` fail: use
//! `kubectl create -f` or `apply`), aggregated discovery (clients fall back to
//! the plain documents), OpenAPI beyond the stub `/openapi/v3` kubectl reads
//! before `apply` (`/openapi/v2` is 404), lists at an older resourceVersion
//! (lists answer the latest state), namespace existence checks, `$retainKeys`,
//! core and events.k8s.io events sharing storage, ownership of fields under
//! atomic lists. Lists are keyed by field name (`patch::merge_key`), not by
//! the Go types' schema.
mod apply;
mod discovery;
mod faults;
mod handlers;
mod kubeconfig;
mod patch;
mod rbac;
mod reviews;
mod selector;
mod server;
mod status;
mod store;
mod watch;

use std::{
    io,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use discovery::ResourceType;
pub use faults::{Fault, FaultAction};
pub use kubeconfig::TOKEN;
pub use rbac::{AuthzCheck, RbacRule};
use serde_json::{json, Value};
pub use status::ApiError;
use store::Store;
use tokio::sync::oneshot;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub user_agent: Option<String>,
    /// The status answered; 0 when the connection was dropped instead.
    pub status: u16,
    /// Refused by the RBAC rules ([`FakeApi::set_rbac`]).
    pub denied: bool,
    /// The authorization decisions made for it, while RBAC is on.
    pub authorization: Vec<AuthzCheck>,
    pub at: Instant,
}

impl RequestRecord {
    /// A query parameter, decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }

    /// Whether this request could change state (POST, PUT, PATCH, DELETE).
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}

/// Knobs tests turn while the server runs.
struct Control {
    faults: faults::Faults,
    down: bool,
    rbac: Option<Vec<RbacRule>>,
    bookmark_interval: Duration,
    /// Every watch ends this long after it started with an ERROR event (a
    /// 500 InternalError Status), as a failing apiserver or proxy does.
    watch_error_after: Option<Duration>,
    /// Token -> user, for TokenReviews.
    users: std::collections::BTreeMap<String, reviews::User>,
    /// Non-resource permissions of users, for SubjectAccessReviews.
    grants: Vec<reviews::Grant>,
}

/// State shared by the server thread and the test's handle.
struct Shared {
    store: Mutex<Store>,
    control: Mutex<Control>,
    log: Mutex<Vec<RequestRecord>>,
    /// Bumped to end every open watch.
    end_watches: tokio::sync::watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the server down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    fn record(&self, r: RequestRecord) {
        lock(&self.log).push(r);
    }
}

/// A running fake apiserver. Stopped, with its kubeconfig file removed, on drop.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn resource(name: &str) -> &'static ResourceType {
    ResourceType::lookup(name).unwrap_or_else(|| panic!("the fake API server does not serve {name:?}"))
}

impl FakeApi {
    /// Starts on 127.0.0.1 and a free port, in the calling thread's network
    /// namespace (the socket is bound here, before the server thread starts).
    pub fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).expect("start the fake API server on 127.0.0.1:0")
    }

    /// Starts on a given address (the `fake-apiserver` binary's `--port`).
    pub fn start_on(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            control: Mutex::new(Control {
                faults: faults::Faults::default(),
                down: false,
                rbac: None,
                bookmark_interval: Duration::from_secs(5),
                watch_error_after: None,
                users: std::collections::BTreeMap::new(),
                grants: Vec::new(),
            }),
            log: Mutex::new(Vec::new()),
            end_watches: tokio::sync::watch::Sender::new(0),
        });
        let kubeconfig =
            std::env::temp_dir().join(format!("fake-apiserver-{}-{}.kubeconfig", std::process::id(), addr.port()));
        std::fs::write(&kubeconfig, kubeconfig::render(addr))?;
        let (shutdown, stopped) = oneshot::channel();
        let server_shared = shared.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new()
            .name(format!("fake-apiserver-{}", addr.port()))
            .spawn(move || runtime.block_on(server::serve(listener, server_shared, stopped)))?;
        let api = Self { shared, addr, kubeconfig, shutdown: Some(shutdown), thread: Some(thread) };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            api.put(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns }, "status": { "phase": "Active" } }));
        }
        Ok(api)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server, written at start.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for this server to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, kubeconfig::render(self.addr))
    }

    /// Creates or replaces an object, by its apiVersion and kind, as a write
    /// through the API would (new resourceVersion unless nothing changed,
    /// watch event; uid and creationTimestamp on create). No preconditions, no
    /// managedFields. Panics on what the server does not serve.
    pub fn put(&self, obj: Value) -> Value {
        self.try_put(obj).unwrap_or_else(|e| panic!("put: {e}"))
    }

    /// [`Self::put`], with an error for an unserved kind or a missing name
    /// or namespace.
    pub fn try_put(&self, obj: Value) -> Result<Value, ApiError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let Some(rt) = ResourceType::for_object(api_version, kind) else {
            return Err(ApiError::bad_request(format!("the fake API server does not serve {api_version:?} {kind:?}")));
        };
        let name = store::name_of(&obj);
        if name.is_empty() || (rt.namespaced && store::namespace_of(&obj).is_none_or(str::is_empty)) {
            return Err(ApiError::invalid(rt, name, format!("{kind} {name:?} needs metadata.name (and namespace)")));
        }
        self.shared.store().put(rt, obj)
    }

    /// One object; `resource` is a plural, singular, short name or kind
    /// (`"configmaps"`, `"cm"`, `"ConfigMap"`); `namespace` is ignored for
    /// cluster-scoped resources.
    pub fn get(&self, resource_name: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.shared.store().get(resource(resource_name), namespace, name).cloned()
    }

    /// All objects of a resource, in one namespace or (`None`) all.
    pub fn list(&self, resource_name: &str, namespace: Option<&str>) -> Vec<Value> {
        self.shared.store().list(resource(resource_name), namespace).into_iter().cloned().collect()
    }

    /// Deletes an object (a DELETED watch event), returning it as deleted.
    pub fn delete(&self, resource_name: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.shared.store().delete(resource(resource_name), namespace, name)
    }

    /// The latest resourceVersion, which every write bumps by one.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Drops the watch history: watches from an older resourceVersion get a
    /// 410 Expired ERROR event.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Every request so far, in arrival order (logged when answered).
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.control().faults.inject(fault);
    }

    pub fn clear_faults(&self) {
        self.shared.control().faults.clear();
    }

    /// Down: every connection is closed without an answer (requests on open
    /// keep-alive connections are logged with status 0; new connections are
    /// closed before a request is read, and not logged), open watches end.
    pub fn set_down(&self, down: bool) {
        self.shared.control().down = down;
        if down {
            self.end_watches();
        }
    }

    /// Ends every open watch stream (as an apiserver restart would).
    pub fn end_watches(&self) {
        self.shared.end_watches.send_modify(|n| *n += 1);
    }

    /// `Some(rules)`: resource requests outside the rules get a 403 Forbidden
    /// Status (and `denied` in the log). As in the apiserver, a list or watch
    /// with a `metadata.name=X` field selector is authorized as object X (so
    /// `resourceNames` can allow it), and a server-side apply that creates its
    /// object needs `create` on that name besides `patch`. Discovery and
    /// `/version` stay open, as they are for every authenticated user.
    /// `None`: everything allowed.
    pub fn set_rbac(&self, rules: Option<Vec<RbacRule>>) {
        self.shared.control().rbac = rules;
    }

    /// Makes TokenReviews of `token` authenticate as `user` in `groups`.
    pub fn add_user(&self, token: &str, user: &str, groups: &[&str]) {
        let u = reviews::User {
            name: user.to_owned(),
            uid: format!("uid-{user}"),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        };
        self.shared.control().users.insert(token.to_owned(), u);
    }

    /// Lets `user` do `verb` on the non-resource URL `path` (RBAC's
    /// `nonResourceURLs`, `*` suffix allowed), as SubjectAccessReviews answer.
    pub fn grant(&self, user: &str, verb: &str, path: &str) {
        let g = reviews::Grant { user: user.to_owned(), verb: verb.to_owned(), path: path.to_owned() };
        self.shared.control().grants.push(g);
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK
    /// (default 5 s); applies to watches started afterwards.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.control().bookmark_interval = every;
    }

    /// `Some(d)`: every watch started from now on ends after `d` with an
    /// ERROR event carrying a 500 Status (the client must re-watch); open
    /// watches are ended at once so they all get it. `None`: no such end.
    pub fn fail_watches_after(&self, after: Option<Duration>) {
        self.shared.control().watch_error_after = after;
        self.end_watches();
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}
