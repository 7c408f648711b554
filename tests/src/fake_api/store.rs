//! The one owner of API state: every object, the global resourceVersion
//! counter, and the bounded event history watches replay from.
//!
//! Every write goes through here, under the caller's lock, so resourceVersions
//! are handed out in order and watch events are broadcast in that same order.
//! A write that changes nothing is not a write: no new resourceVersion, no
//! event (what the apiserver does, and what tests counting writes rely on).
use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{discovery::ResourceType, status::ApiError};

/// How many events watches can replay before a resourceVersion is "too old".
const HISTORY: usize = 10_000;
/// How far a watcher may fall behind the live events before it is closed.
const BROADCAST: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed write.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub resource: &'static ResourceType,
    pub kind: EventType,
    /// The object after the write (for DELETED: as deleted, with the
    /// deletion's resourceVersion).
    pub object: Value,
    /// The object before a MODIFIED, so selector watches can tell an object
    /// that left the selection from one that never was in it.
    pub prev: Option<Value>,
    /// The stored object before the write (MODIFIED and DELETED; `None` for
    /// ADDED), so a list can be served as of an older resourceVersion.
    undo: Option<Value>,
}

type Key = (&'static str, &'static str, String, String);

fn key(rt: &'static ResourceType, namespace: Option<&str>, name: &str) -> Key {
    let ns = if rt.namespaced { namespace.unwrap_or_default() } else { "" };
    (rt.group, rt.plural, ns.to_string(), name.to_string())
}

pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

pub fn namespace_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/namespace").and_then(Value::as_str)
}

pub fn resource_version_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Now, as Kubernetes writes times: RFC 3339, UTC, whole seconds.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn new_uid() -> String {
    let b: u128 = rand::random();
    let h = format!("{b:032x}");
    format!("{}-{}-4{}-{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[16..20], &h[20..32])
}

/// Objects by (group, plural, namespace, name), the resourceVersion counter,
/// and the event history.
pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<WatchEvent>>,
    /// Every event newer than this is in `history`; a watch from an older
    /// resourceVersion gets 410 Expired.
    horizon: u64,
    events: broadcast::Sender<Arc<WatchEvent>>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            horizon: 0,
            events: broadcast::channel(BROADCAST).0,
        }
    }
}

impl Store {
    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Every write newer than this is still in the history.
    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    pub fn get(&self, rt: &'static ResourceType, namespace: Option<&str>, name: &str) -> Option<&Value> {
        self.objects.get(&key(rt, namespace, name))
    }

    /// Objects of one resource, in one namespace or all, ordered by
    /// namespace and name.
    pub fn list(&self, rt: &'static ResourceType, namespace: Option<&str>) -> Vec<&Value> {
        let lo = (rt.group, rt.plural, String::new(), String::new());
        self.objects
            .range(lo..)
            .take_while(|((g, p, _, _), _)| *g == rt.group && *p == rt.plural)
            .filter(|((_, _, ns, _), _)| !rt.namespaced || namespace.is_none_or(|want| ns == want))
            .map(|(_, v)| v)
            .collect()
    }

    /// Sets what every stored object carries: kind, apiVersion, namespace
    /// only on namespaced resources.
    fn normalize(rt: &'static ResourceType, obj: &mut Value) {
        if !obj.is_object() {
            *obj = json!({});
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        if !rt.namespaced {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
        }
    }

    fn commit(&mut self, rt: &'static ResourceType, kind: EventType, object: Value, prev: Option<Value>) {
        let undo = prev.clone();
        self.commit_with(rt, kind, object, prev, undo);
    }

    fn commit_with(
        &mut self,
        rt: &'static ResourceType,
        kind: EventType,
        object: Value,
        prev: Option<Value>,
        undo: Option<Value>,
    ) {
        let event = Arc::new(WatchEvent { rv: self.rv, resource: rt, kind, object, prev, undo });
        if self.history.len() == HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.horizon = old.rv;
            }
        }
        self.history.push_back(event.clone());
        // No receivers is fine: nobody watches.
        let _ = self.events.send(event);
    }

    /// Stores a new object; `metadata.name` (and `namespace` for namespaced
    /// resources) must be set. Assigns uid, creationTimestamp, resourceVersion.
    pub fn create(&mut self, rt: &'static ResourceType, mut obj: Value) -> Result<Value, ApiError> {
        Self::normalize(rt, &mut obj);
        let k = key(rt, namespace_of(&obj), name_of(&obj));
        if self.objects.contains_key(&k) {
            return Err(ApiError::already_exists(rt, &k.3));
        }
        self.rv += 1;
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(new_uid());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(k, obj.clone());
        self.commit(rt, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// Replaces an existing object, keeping its uid and creationTimestamp.
    /// Preconditions are the caller's. Returns the stored object: the old one
    /// untouched when nothing changed.
    pub fn replace(&mut self, rt: &'static ResourceType, mut obj: Value) -> Result<Value, ApiError> {
        Self::normalize(rt, &mut obj);
        let k = key(rt, namespace_of(&obj), name_of(&obj));
        let Some(old) = self.objects.get(&k) else {
            return Err(ApiError::not_found(rt, &k.3));
        };
        for field in ["uid", "creationTimestamp", "resourceVersion"] {
            obj["metadata"][field] = old["metadata"][field].clone();
        }
        if obj == *old {
            return Ok(obj);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let prev = self.objects.insert(k, obj.clone());
        self.commit(rt, EventType::Modified, obj.clone(), prev);
        Ok(obj)
    }

    /// Creates or replaces, without preconditions: the tests' backdoor.
    pub fn put(&mut self, rt: &'static ResourceType, obj: Value) -> Result<Value, ApiError> {
        if self.get(rt, namespace_of(&obj), name_of(&obj)).is_some() {
            self.replace(rt, obj)
        } else {
            self.create(rt, obj)
        }
    }

    /// Deletes at once (no finalizers, no graceful deletion); returns the
    /// object as deleted, carrying the deletion's resourceVersion.
    pub fn delete(&mut self, rt: &'static ResourceType, namespace: Option<&str>, name: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&key(rt, namespace, name))?;
        let before = obj.clone();
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.commit_with(rt, EventType::Deleted, obj.clone(), None, Some(before));
        Some(obj)
    }

    /// Objects of one resource as they were at resourceVersion `rv` (ordered
    /// as [`Store::list`]), rebuilt by undoing every later write, as etcd
    /// serves a read at a past revision; 410 Expired when some of those
    /// writes were compacted away, and 504 for a version not reached yet
    /// (a real server waits a few seconds for it first).
    pub fn list_at(&self, rt: &'static ResourceType, namespace: Option<&str>, rv: u64) -> Result<Vec<Value>, ApiError> {
        if rv > self.rv {
            return Err(ApiError::too_large_resource_version(rv, self.rv));
        }
        if rv < self.horizon {
            return Err(ApiError::expired(rv, self.horizon));
        }
        let mut objects: BTreeMap<Key, Value> =
            self.list(rt, namespace).into_iter().map(|o| (key(rt, namespace_of(o), name_of(o)), o.clone())).collect();
        for e in self
            .history
            .iter()
            .rev()
            .take_while(|e| e.rv > rv)
            .filter(|e| e.resource.group == rt.group && e.resource.plural == rt.plural)
        {
            let k = key(rt, namespace_of(&e.object), name_of(&e.object));
            if rt.namespaced && namespace.is_some_and(|want| k.2 != want) {
                continue;
            }
            match &e.undo {
                Some(before) => objects.insert(k, before.clone()),
                None => objects.remove(&k),
            };
        }
        Ok(objects.into_values().collect())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.events.subscribe()
    }

    /// Events after `rv`, or 410 Expired when some were compacted away.
    pub fn events_since(&self, rv: u64) -> Result<Vec<Arc<WatchEvent>>, ApiError> {
        if rv < self.horizon {
            return Err(ApiError::expired(rv, self.horizon));
        }
        Ok(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    /// Drops the event history, as etcd compaction does: watches from any
    /// resourceVersion older than the current one get 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.horizon = self.rv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }

    #[test]
    fn writes_bump_versions_no_ops_do_not() {
        let cms = ResourceType::lookup("cm").expect("configmaps");
        let mut s = Store::default();
        let mut rx = s.subscribe();
        let c = s
            .create(cms, json!({ "metadata": { "name": "a", "namespace": "ns" }, "data": { "k": "v" } }))
            .expect("create");
        assert_eq!(c["metadata"]["resourceVersion"], "1");
        assert_eq!(c["kind"], "ConfigMap");
        assert!(s.create(cms, c.clone()).is_err(), "AlreadyExists");
        let same = s.replace(cms, c.clone()).expect("replace");
        assert_eq!((same["metadata"]["resourceVersion"].as_str(), s.resource_version()), (Some("1"), 1));
        let mut changed = c.clone();
        changed["data"]["k"] = json!("w");
        assert_eq!(s.replace(cms, changed).expect("replace")["metadata"]["resourceVersion"], "2");
        assert_eq!(s.delete(cms, Some("ns"), "a").expect("delete")["metadata"]["resourceVersion"], "3");
        let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| (e.rv, e.kind)).collect();
        assert_eq!(kinds, [(1, EventType::Added), (2, EventType::Modified), (3, EventType::Deleted)]);
        assert_eq!(s.events_since(1).expect("history").len(), 2);
        s.compact();
        assert_eq!(s.events_since(2).err().map(|e| e.code), Some(410));
        assert!(s.events_since(3).expect("current").is_empty());
    }
}
