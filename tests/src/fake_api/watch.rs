//! Watches: `?watch=true` on a collection, answered as a chunked stream of
//! JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`.
//!
//! Where a watch starts:
//! - no `resourceVersion`, or `"0"`: ADDED for every current object, then live;
//! - `resourceVersion=N`: the events after N from the history, then live; if
//!   N was compacted away, a single ERROR event with a 410 Expired Status
//!   (what the apiserver's watch cache sends), then the stream ends;
//! - `sendInitialEvents=true` (with `resourceVersionMatch=NotOlderThan` and
//!   `allowWatchBookmarks=true`, as the apiserver demands): ADDED for every
//!   current object, a BOOKMARK annotated `k8s.io/initial-events-end`, then live.
//!
//! With a label or field selector, an object that stops matching is sent as
//! DELETED (its previous state) and one that starts matching as ADDED, as the
//! apiserver's watch cache does. The stream ends at `timeoutSeconds` (default
//! 1800), when the client goes away, or on [`super::FakeApi::end_watches`].
use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::{
    discovery::ResourceType,
    handlers::Selection,
    server::{ApiRequest, Target},
    status::ApiError,
    store::{name_of, namespace_of, EventType, WatchEvent},
    Shared,
};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// A response body fed line by line from the watch task.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().0.poll_recv(cx).map(|line| line.map(|b| Ok(Frame::data(b))))
    }
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_events_end: bool) -> Bytes {
    let mut meta = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
    if initial_events_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    line("BOOKMARK", &json!({ "kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta }))
}

/// Which events one watch sees.
struct Filter {
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    selection: Selection,
}

impl Filter {
    fn in_scope(&self, obj: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| namespace_of(obj) == Some(ns))
            && self.name.as_deref().is_none_or(|n| name_of(obj) == n)
    }

    fn matches(&self, obj: &Value) -> bool {
        self.in_scope(obj) && self.selection.matches(obj)
    }

    /// The line this watch sends for an event, if any.
    fn render(&self, ev: &WatchEvent) -> Option<Bytes> {
        if !std::ptr::eq(ev.resource, self.rt) {
            return None;
        }
        let now = self.matches(&ev.object);
        match ev.kind {
            EventType::Added | EventType::Deleted => now.then(|| line(ev.kind.as_str(), &ev.object)),
            EventType::Modified => {
                let before = ev.prev.as_ref().map_or(now, |p| self.matches(p));
                match (before, now) {
                    (true, true) => Some(line("MODIFIED", &ev.object)),
                    (false, true) => Some(line("ADDED", &ev.object)),
                    (true, false) => {
                        // Left the selection: DELETED, with its last matching
                        // state at this event's resourceVersion.
                        let mut gone = ev.prev.clone().unwrap_or_else(|| ev.object.clone());
                        gone["metadata"]["resourceVersion"] = json!(ev.rv.to_string());
                        Some(line("DELETED", &gone))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

fn flag(req: &ApiRequest, name: &str) -> bool {
    matches!(req.query.get(name), Some("true" | "1"))
}

/// Whether a GET asks for a watch.
pub fn requested(req: &ApiRequest) -> bool {
    flag(req, "watch")
}

/// Starts a watch; the returned body streams until the watch ends.
pub fn start(shared: &Arc<Shared>, t: &Target, req: &ApiRequest) -> Result<ChannelBody, ApiError> {
    let since = match req.query.get("resourceVersion") {
        None | Some("" | "0") => None,
        Some(rv) => {
            Some(rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?)
        }
    };
    let timeout = match req.query.get("timeoutSeconds") {
        Some(s) => {
            Duration::from_secs(s.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?)
        }
        None => DEFAULT_TIMEOUT,
    };
    let bookmarks = flag(req, "allowWatchBookmarks");
    let initial_events = flag(req, "sendInitialEvents");
    if initial_events && (req.query.get("resourceVersionMatch") != Some("NotOlderThan") || !bookmarks) {
        return Err(ApiError::bad_request(
            "sendInitialEvents requires resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true",
        ));
    }
    let filter = Filter {
        rt: t.rt,
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        selection: Selection::from_request(t.rt, req)?,
    };

    // Under one lock: the starting state and the subscription to what
    // follows it, so no event falls between the two.
    let mut first = Vec::new();
    let (events, current) = {
        let store = shared.store();
        let current = store.resource_version();
        match since.filter(|_| !initial_events).map(|rv| store.events_since(rv)) {
            Some(Err(expired)) => {
                first.push(line("ERROR", &expired.to_status()));
                (None, current)
            }
            Some(Ok(replay)) => {
                first.extend(replay.iter().filter_map(|ev| filter.render(ev)));
                (Some(store.subscribe()), current)
            }
            None => {
                let objects = store.list(t.rt, t.namespace.as_deref());
                first.extend(objects.into_iter().filter(|o| filter.matches(o)).map(|o| line("ADDED", o)));
                (Some(store.subscribe()), current)
            }
        }
    };
    if initial_events {
        first.push(bookmark(t.rt, current, true));
    }
    let (tx, rx) = mpsc::channel(64);
    let (interval, error_after) = {
        let c = shared.control();
        (c.bookmark_interval, c.watch_error_after)
    };
    let end = shared.end_watches.subscribe();
    tokio::spawn(async move {
        for l in first {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if let Some(events) = events {
            let bookmarks = bookmarks.then_some(interval);
            let ends = Ends { timeout, error_after, all: end };
            follow(tx, events, filter, current, bookmarks, ends).await;
        }
    });
    Ok(ChannelBody(rx))
}

/// What ends a watch, besides the client leaving.
struct Ends {
    /// The client's `timeoutSeconds`: the stream just ends.
    timeout: Duration,
    /// An injected failure: an ERROR event, then the end.
    error_after: Option<Duration>,
    /// [`FakeApi::end_watches`](super::FakeApi::end_watches).
    all: tokio::sync::watch::Receiver<u64>,
}

/// Sends live events (and bookmarks) until the timeout, the client leaving,
/// an injected error, or the end of all watches.
async fn follow(
    tx: mpsc::Sender<Bytes>,
    mut events: broadcast::Receiver<Arc<WatchEvent>>,
    filter: Filter,
    mut seen: u64,
    bookmarks: Option<Duration>,
    ends: Ends,
) {
    let Ends { timeout, error_after, all: mut end } = ends;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let failing = error_after.is_some();
    let fail_at = tokio::time::sleep(error_after.unwrap_or(timeout));
    tokio::pin!(fail_at);
    let period = bookmarks.unwrap_or(Duration::from_secs(3600));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        let out = tokio::select! {
            _ = &mut deadline => return,
            _ = &mut fail_at, if failing => {
                let _ = tx.send(line("ERROR", &ApiError::internal("watch failed (injected)").to_status())).await;
                return;
            }
            _ = end.changed() => return,
            _ = tx.closed() => return,
            _ = tick.tick(), if bookmarks.is_some() => bookmark(filter.rt, seen, false),
            ev = events.recv() => match ev {
                Ok(ev) if ev.rv > seen => {
                    // Every event up to here has been seen, matching or not:
                    // what a bookmark may claim.
                    seen = ev.rv;
                    match filter.render(&ev) {
                        Some(l) => l,
                        None => continue,
                    }
                }
                Ok(_) => continue,
                // Fell too far behind, or the store is gone: end the watch,
                // as the apiserver does; the client re-lists or re-watches.
                Err(_) => return,
            },
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}
