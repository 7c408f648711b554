//! Server-side apply and `metadata.managedFields`.
//!
//! Each manager owns a set of fields, kept per (manager, operation,
//! subresource) in `managedFields` as `FieldsV1`. An apply makes the
//! manager's set exactly the fields of its configuration: fields it applied
//! before and leaves out now are removed from the object (unless another
//! manager owns them too), so a manager whose ConfigMap `data` shrinks sees the
//! keys go. Setting a field another manager owns, to another value, is a
//! conflict unless `force=true`, which takes the field over. Updates (PUT,
//! the other patches, create) take ownership of the fields they change.
//!
//! Field paths use the `FieldsV1` element syntax: `f:name` (a map key),
//! `k:{"type":"Ready"}` (an item of a keyed list, see
//! [`super::patch::merge_key`]), `v:"x"` (an item of a set list). Other lists
//! are atomic: owned and replaced whole.
use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::patch::{is_set_list, merge_key};

pub type FieldPath = Vec<String>;
pub type FieldSet = BTreeSet<FieldPath>;

/// Metadata the server owns: never in a field set, never taken from an apply.
const SERVER_METADATA: &[&str] =
    &["name", "namespace", "uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "selfLink"];

/// The fields `obj` sets: its leaves and its keyed-list items.
pub fn fields_of(obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(m) = obj {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" || v.is_null() {
                continue;
            }
            let mut path = vec![format!("f:{k}")];
            if k == "metadata" {
                if let Value::Object(meta) = v {
                    for (mk, mv) in meta.iter().filter(|(mk, _)| !SERVER_METADATA.contains(&mk.as_str())) {
                        path.push(format!("f:{mk}"));
                        collect(mv, mk, &mut path, &mut out);
                        path.pop();
                    }
                }
                continue;
            }
            collect(v, k, &mut path, &mut out);
        }
    }
    out
}

fn item_key(field: &str, item: &Value) -> Option<String> {
    let key = merge_key(field)?;
    let id = item.as_object()?.get(key)?;
    Some(format!("k:{}", json!({ key: id })))
}

fn collect(v: &Value, field: &str, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Null => {}
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(format!("f:{k}"));
                collect(child, k, path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() && is_set_list(field) && items.iter().all(|i| !i.is_object()) => {
            for i in items {
                path.push(format!("v:{i}"));
                out.insert(path.clone());
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(|i| item_key(field, i).is_some()) => {
            for i in items {
                path.push(item_key(field, i).unwrap_or_default());
                out.insert(path.clone());
                collect(i, "", path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value a path names in `obj`, if present.
pub fn get_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = obj;
    for el in path {
        v = step(v, el)?;
    }
    Some(v)
}

fn matches_element(item: &Value, el: &str) -> bool {
    if let Some(k) = el.strip_prefix("k:") {
        let Ok(Value::Object(key)) = serde_json::from_str::<Value>(k) else { return false };
        key.iter().all(|(kk, kv)| item.get(kk) == Some(kv))
    } else if let Some(raw) = el.strip_prefix("v:") {
        serde_json::from_str::<Value>(raw).is_ok_and(|want| *item == want)
    } else {
        false
    }
}

fn step<'a>(v: &'a Value, el: &str) -> Option<&'a Value> {
    match (v, el.strip_prefix("f:")) {
        (Value::Object(m), Some(name)) => m.get(name),
        (Value::Array(a), None) => a.iter().find(|i| matches_element(i, el)),
        _ => None,
    }
}

/// Removes what a path names; returns whether it was there.
fn remove_at(obj: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else { return false };
    let mut v = obj;
    for el in parents {
        let next = match (v, el.strip_prefix("f:")) {
            (Value::Object(m), Some(name)) => m.get_mut(name),
            (Value::Array(a), None) => a.iter_mut().find(|i| matches_element(i, el)),
            _ => None,
        };
        match next {
            Some(n) => v = n,
            None => return false,
        }
    }
    match (v, last.strip_prefix("f:")) {
        (Value::Object(m), Some(name)) => m.remove(name).is_some(),
        (Value::Array(a), None) => {
            let before = a.len();
            a.retain(|i| !matches_element(i, last));
            a.len() != before
        }
        _ => false,
    }
}

/// `.data.x`, `.status.conditions[type="Ready"].status`: how conflicts name fields.
fn display(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let inner = serde_json::from_str::<Map<String, Value>>(k).unwrap_or_default();
            let parts: Vec<String> = inner.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[{v}]"));
        }
    }
    s
}

/// `FieldsV1` JSON for a set: nested `{"f:data":{"f:x":{}}}`, with `".":{}`
/// where a path ends at a node that also has children.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    fn node<'a>(root: &'a mut Map<String, Value>, path: &[String]) -> &'a mut Map<String, Value> {
        let mut n = root;
        for el in path {
            let child = n.entry(el.clone()).or_insert_with(|| json!({}));
            if !child.is_object() {
                *child = json!({});
            }
            n = match child {
                Value::Object(m) => m,
                _ => unreachable!("replaced by an object just above"),
            };
        }
        n
    }
    let mut root = Map::new();
    for p in set {
        node(&mut root, p);
    }
    for p in set {
        let n = node(&mut root, p);
        if !n.is_empty() && !n.contains_key(".") {
            n.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
        let Value::Object(m) = v else { return };
        for (k, child) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            path.push(k.clone());
            if child.as_object().is_some_and(Map::is_empty) {
                out.insert(path.clone());
            } else {
                walk(child, path, out);
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: FieldSet,
}

fn read_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj.pointer("/metadata/managedFields").and_then(Value::as_array) else { return Vec::new() };
    list.iter()
        .filter_map(|e| {
            Some(Entry {
                manager: e.get("manager")?.as_str()?.to_string(),
                operation: e.get("operation").and_then(Value::as_str).unwrap_or("Update").to_string(),
                api_version: e.get("apiVersion").and_then(Value::as_str).unwrap_or("v1").to_string(),
                time: e.get("time").and_then(Value::as_str).unwrap_or_default().to_string(),
                subresource: e.get("subresource").and_then(Value::as_str).map(str::to_string),
                fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
            })
        })
        .collect()
}

/// Writes the entries back, dropping those that own nothing that exists.
fn write_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    for e in &mut entries {
        let live = obj.clone();
        e.fields.retain(|p| get_at(&live, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else { return };
    if entries.is_empty() {
        meta.remove("managedFields");
        return;
    }
    let list: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(s) = e.subresource {
                v["subresource"] = json!(s);
            }
            v
        })
        .collect();
    meta.insert("managedFields".into(), Value::Array(list));
}

/// Who writes, and how.
pub struct Manager<'a> {
    pub name: &'a str,
    /// `Some("status")` for writes through the status subresource.
    pub subresource: Option<&'a str>,
    pub api_version: &'a str,
    /// RFC 3339 time stamp for the entry.
    pub now: &'a str,
}

impl Manager<'_> {
    fn is(&self, e: &Entry, operation: &str) -> bool {
        e.manager == self.name && e.operation == operation && e.subresource.as_deref() == self.subresource
    }

    fn entry(&self, operation: &str, fields: FieldSet) -> Entry {
        Entry {
            manager: self.name.to_string(),
            operation: operation.to_string(),
            api_version: self.api_version.to_string(),
            time: self.now.to_string(),
            subresource: self.subresource.map(str::to_string),
            fields,
        }
    }
}

/// Merges an apply configuration into an object: maps recursively, keyed
/// lists item by item, set lists as a union, anything else replaced.
fn merge(live: &mut Value, config: &Value, field: &str) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    l.remove(k);
                } else if let Some(lv) = l.get_mut(k) {
                    merge(lv, v, k);
                } else {
                    l.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(l), Value::Array(c)) if is_set_list(field) => {
            for i in c {
                if !l.contains(i) {
                    l.push(i.clone());
                }
            }
        }
        (Value::Array(l), Value::Array(c))
            if merge_key(field).is_some() && c.iter().all(|i| item_key(field, i).is_some()) =>
        {
            for i in c {
                let key = item_key(field, i).unwrap_or_default();
                match l.iter_mut().find(|li| matches_element(li, &key)) {
                    Some(li) => merge(li, i, ""),
                    None => l.push(i.clone()),
                }
            }
        }
        (l, c) => *l = c.clone(),
    }
}

/// A server-side apply of `config` onto `live` (or onto `skeleton` when the
/// object does not exist yet). Returns the new object, managedFields
/// included, or the conflicting (manager, field) pairs.
pub fn apply(live: &Value, config: &Value, who: &Manager<'_>, force: bool) -> Result<Value, Vec<(String, String)>> {
    let mut entries = read_entries(live);
    let new_set = fields_of(config);
    let mine = entries.iter().position(|e| who.is(e, "Apply"));
    let old_set = mine.map(|i| entries[i].fields.clone()).unwrap_or_default();

    let mut conflicts = Vec::new();
    for (i, e) in entries.iter_mut().enumerate() {
        if Some(i) == mine {
            continue;
        }
        let taken: Vec<FieldPath> = e
            .fields
            .intersection(&new_set)
            .filter(|p| !p.last().is_some_and(|el| el.starts_with("k:")))
            .filter(|p| get_at(live, p) != get_at(config, p))
            .cloned()
            .collect();
        if force {
            taken.iter().for_each(|p| {
                e.fields.remove(p);
            });
        } else {
            conflicts.extend(taken.iter().map(|p| (e.manager.clone(), display(p))));
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }

    let mut result = live.clone();
    let others: FieldSet =
        entries.iter().enumerate().filter(|(i, _)| Some(*i) != mine).flat_map(|(_, e)| e.fields.clone()).collect();
    let dropped: Vec<&FieldPath> = old_set.difference(&new_set).filter(|p| !others.contains(*p)).collect();
    // Removing a list item removes what is under it; removing the fields
    // under it first would lose the key that finds it.
    for p in dropped.iter().filter(|p| !dropped.iter().any(|q| q.len() < p.len() && p.starts_with(q))) {
        remove_at(&mut result, p);
    }
    let mut body = config.clone();
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, _| !SERVER_METADATA.contains(&k.as_str()));
    }
    merge(&mut result, &body, "");

    match mine {
        // The time stamp moves only when the set does: a no-op apply must leave
        // the object byte-identical so the store sees no write.
        Some(i) if entries[i].fields == new_set => {}
        Some(i) => entries[i] = who.entry("Apply", new_set),
        None => entries.push(who.entry("Apply", new_set)),
    }
    write_entries(&mut result, entries);
    Ok(result)
}

/// Records a non-apply write (create, PUT, merge/strategic/JSON patch) of
/// `new` over `old`: the manager takes the fields whose value changed.
pub fn track_update(old: Option<&Value>, new: &mut Value, who: &Manager<'_>) {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let changed: FieldSet =
        fields_of(new).into_iter().filter(|p| old.is_none_or(|o| get_at(o, p) != get_at(new, p))).collect();
    if !changed.is_empty() {
        for e in entries.iter_mut().filter(|e| !who.is(e, "Update")) {
            e.fields.retain(|p| !changed.contains(p));
        }
        match entries.iter_mut().find(|e| who.is(e, "Update")) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = who.now.to_string();
                e.api_version = who.api_version.to_string();
            }
            None => entries.push(who.entry("Update", changed)),
        }
    }
    write_entries(new, entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHO: Manager<'static> = Manager { name: "daemon", subresource: None, api_version: "v1", now: "t1" };

    fn cm(data: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c", "namespace": "ns" }, "data": data })
    }

    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({
            "metadata": { "name": "n", "labels": { "a": "1" }, "finalizers": ["x"] },
            "status": { "conditions": [{ "type": "Ready", "status": "True" }] },
            "spec": { "taints": [{ "key": "k" }], "empty": {} },
        });
        let set = fields_of(&obj);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({
                "f:metadata": { "f:labels": { "f:a": {} }, "f:finalizers": { "v:\"x\"": {} } },
                "f:spec": { "f:empty": {}, "f:taints": {} },
                "f:status": { "f:conditions": { "k:{\"type\":\"Ready\"}": { ".": {}, "f:status": {}, "f:type": {} } } },
            })
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_removes_keys_the_manager_stops_applying() {
        let first = apply(&cm(json!({})), &cm(json!({ "a": "1", "b": "2" })), &WHO, false).expect("apply");
        assert_eq!(first["data"], json!({ "a": "1", "b": "2" }));
        let second = apply(&first, &cm(json!({ "a": "1" })), &WHO, false).expect("apply");
        assert_eq!(second["data"], json!({ "a": "1" }));
        let again = apply(&second, &cm(json!({ "a": "1" })), &Manager { now: "t2", ..WHO }, false).expect("apply");
        assert_eq!(again, second, "a no-op apply changes nothing, time stamp included");
    }

    #[test]
    fn apply_keeps_fields_of_other_managers_and_conflicts() {
        let mut live = cm(json!({ "other": "x" }));
        track_update(None, &mut live, &Manager { name: "kubectl-create", ..WHO });
        let applied = apply(&live, &cm(json!({ "mine": "1" })), &WHO, false).expect("apply");
        assert_eq!(applied["data"], json!({ "other": "x", "mine": "1" }));
        let dropped = apply(&applied, &cm(json!({})), &WHO, false).expect("apply");
        assert_eq!(dropped["data"], json!({ "other": "x" }), "only the manager's own fields go");

        let conflicts = apply(&applied, &cm(json!({ "other": "y" })), &WHO, false).expect_err("conflict");
        assert_eq!(conflicts, [("kubectl-create".to_string(), ".data.other".to_string())]);
        let same = apply(&applied, &cm(json!({ "other": "x", "mine": "1" })), &WHO, false);
        assert!(same.is_ok(), "the same value is shared ownership, not a conflict");
        let forced = apply(&applied, &cm(json!({ "other": "y" })), &WHO, true).expect("force");
        assert_eq!(forced["data"], json!({ "other": "y" }));
        let managers: Vec<&str> = forced["metadata"]["managedFields"]
            .as_array()
            .map_or(vec![], |a| a.iter().filter_map(|e| e["manager"].as_str()).collect());
        assert_eq!(managers, ["daemon"], "force took the field from kubectl-create, which owns nothing now");
    }

    #[test]
    fn apply_merges_conditions_by_type() {
        let node = |conds: Value| json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n" }, "status": { "conditions": conds } });
        let mut live = node(json!([{ "type": "Ready", "status": "True" }]));
        track_update(None, &mut live, &Manager { name: "kubelet", ..WHO });
        let who = Manager { subresource: Some("status"), ..WHO };
        let out = apply(&live, &node(json!([{ "type": "PortsFree", "status": "True" }])), &who, false).expect("apply");
        assert_eq!(
            out["status"]["conditions"],
            json!([{ "type": "Ready", "status": "True" }, { "type": "PortsFree", "status": "True" }])
        );
        let out = apply(&out, &node(json!([])), &who, false).expect("apply");
        assert_eq!(
            out["status"]["conditions"],
            json!([{ "type": "Ready", "status": "True" }]),
            "own condition removed"
        );
    }
}
