//! The three classic PATCH flavours: JSON merge patch (RFC 7386), strategic
//! merge patch (Kubernetes' own) and JSON patch (RFC 6902). Server-side apply
//! lives in `apply.rs`.
//!
//! Strategic merge needs each list's patch strategy, which the real server
//! takes from the Go types. The fake knows the lists by field name
//! ([`merge_key`], [`is_set_list`]) and treats every other list as atomic
//! (replaced whole), which is what the Go types say for the lists they do not tag.
use std::fmt;

use serde_json::{Map, Value};

/// A patch that cannot be applied: a 422 (invalid patch) or, for JSON patch
/// `test` failures, also 422 as the apiserver answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchError(pub String);

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PatchError {}

/// The merge key of a list of objects, by the list's field name (the
/// `patchMergeKey` of the Go types; SSA's `listMapKeys`). Lists not named here
/// are atomic.
pub fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env" | "imagePullSecrets" => "name",
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "hostAliases" => "ip",
        _ => return None,
    })
}

/// Lists of scalars merged as sets (`patchStrategy: merge` on a `[]string`).
pub fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else
/// (lists included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Kubernetes strategic merge patch: like a merge patch, but lists named by
/// [`merge_key`] merge item by item (`$patch: delete` in an item removes it),
/// set lists take the union (`$deleteFromPrimitiveList/<field>` removes), a
/// map with `$patch: replace` replaces and `$patch: delete` deletes.
/// `$setElementOrder/*` and `$retainKeys` are accepted and ignored.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        return Err(PatchError("a strategic merge patch must be a JSON object".into()));
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = p.clone();
            p.remove("$patch");
            strip_directives(&mut p);
            *target = Value::Object(p);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(PatchError(format!("unknown patch type: {other}"))),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return Ok(()) };
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(inner) if inner.get("$patch").and_then(Value::as_str) == Some("delete") => {
                t.remove(k);
            }
            Value::Object(_) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(slot, v)?;
            }
            Value::Array(items) => {
                let merged = merge_list(k, t.get(k), items)?;
                t.insert(k.clone(), merged);
            }
            scalar => {
                t.insert(k.clone(), scalar.clone());
            }
        }
    }
    // Deletions from set lists apply after the merges of the same level.
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(gone)) = (t.get_mut(field), v) {
                items.retain(|i| !gone.contains(i));
            }
        }
    }
    Ok(())
}

/// Removes `$`-directives left in a value that replaces whole.
fn strip_directives(m: &mut Map<String, Value>) {
    m.retain(|k, _| !k.starts_with('$'));
    for v in m.values_mut() {
        match v {
            Value::Object(o) => strip_directives(o),
            Value::Array(a) => a.iter_mut().filter_map(Value::as_object_mut).for_each(strip_directives),
            _ => {}
        }
    }
}

fn merge_list(field: &str, live: Option<&Value>, patch: &[Value]) -> Result<Value, PatchError> {
    let replace = patch.iter().any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let items: Vec<Value> = patch
        .iter()
        .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("replace"))
        .cloned()
        .map(|mut i| {
            if let Value::Object(o) = &mut i {
                if o.get("$patch").is_none() {
                    strip_directives(o);
                }
            }
            i
        })
        .collect();
    let live = live.and_then(Value::as_array).filter(|_| !replace);
    if is_set_list(field) {
        let mut out = live.cloned().unwrap_or_default();
        for i in items {
            if !out.contains(&i) {
                out.push(i);
            }
        }
        return Ok(Value::Array(out));
    }
    let Some(key) = merge_key(field) else {
        return Ok(Value::Array(items));
    };
    let mut out = live.cloned().unwrap_or_default();
    for item in items {
        let Some(id) = item.get(key).cloned() else {
            return Err(PatchError(format!("map: {item} does not contain declared merge key: {key}")));
        };
        let pos = out.iter().position(|o| o.get(key) == Some(&id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(p), true) => {
                out.remove(p);
            }
            (None, true) => {}
            (Some(p), false) => strategic_merge(&mut out[p], &item)?,
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge(&mut fresh, &item)?;
                out.push(fresh);
            }
        }
    }
    Ok(Value::Array(out))
}

/// The parent of a JSON pointer's target, and the last token, unescaped.
fn split_pointer(path: &str) -> Result<(Vec<String>, String), PatchError> {
    if path.is_empty() {
        return Err(PatchError("cannot patch the whole document".into()));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PatchError(format!("invalid JSON pointer {path:?}")));
    };
    let mut tokens: Vec<String> = rest.split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect();
    let last = tokens.pop().unwrap_or_default();
    Ok((tokens, last))
}

fn walk_mut<'a>(mut v: &'a mut Value, tokens: &[String], path: &str) -> Result<&'a mut Value, PatchError> {
    let missing = || PatchError(format!("doc is missing path: {path:?}"));
    for t in tokens {
        v = match v {
            Value::Object(m) => m.get_mut(t).ok_or_else(missing)?,
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)).ok_or_else(missing)?,
            _ => return Err(missing()),
        };
    }
    Ok(v)
}

fn pointer_get(doc: &Value, path: &str) -> Result<Value, PatchError> {
    let (parents, last) = split_pointer(path)?;
    let mut doc = doc.clone();
    let parent = walk_mut(&mut doc, &parents, path)?;
    match parent {
        Value::Object(m) => m.get(&last).cloned(),
        Value::Array(a) => last.parse::<usize>().ok().and_then(|i| a.get(i)).cloned(),
        _ => None,
    }
    .ok_or_else(|| PatchError(format!("doc is missing path: {path:?}")))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    let (parents, last) = split_pointer(path)?;
    match walk_mut(doc, &parents, path)? {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) if last == "-" => a.push(value),
        Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i <= a.len() => a.insert(i, value),
            _ => return Err(PatchError(format!("add operation does not apply: index out of range: {path:?}"))),
        },
        _ => return Err(PatchError(format!("doc is missing path: {path:?}"))),
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (parents, last) = split_pointer(path)?;
    let missing = || PatchError(format!("remove operation does not apply: doc is missing path: {path:?}"));
    match walk_mut(doc, &parents, path)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => Ok(a.remove(i)),
            _ => Err(missing()),
        },
        _ => Err(missing()),
    }
}

/// RFC 6902: `add`, `remove`, `replace`, `move`, `copy`, `test`; the first
/// failing operation fails the whole patch.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let Some(ops) = ops.as_array() else {
        return Err(PatchError("a JSON patch must be an array of operations".into()));
    };
    let mut doc = target.clone();
    for op in ops {
        let field = |name: &str| {
            op.get(name).and_then(Value::as_str).ok_or_else(|| PatchError(format!("operation missing {name:?}: {op}")))
        };
        let value = || op.get("value").cloned().ok_or_else(|| PatchError(format!("operation missing \"value\": {op}")));
        let path = field("path")?;
        match field("op")? {
            "add" => pointer_add(&mut doc, path, value()?)?,
            "remove" => {
                pointer_remove(&mut doc, path)?;
            }
            "replace" => {
                pointer_remove(&mut doc, path)
                    .map_err(|_| PatchError(format!("replace operation does not apply: doc is missing key: {path}")))?;
                pointer_add(&mut doc, path, value()?)?;
            }
            "move" => {
                let v = pointer_remove(&mut doc, field("from")?)?;
                pointer_add(&mut doc, path, v)?;
            }
            "copy" => {
                let v = pointer_get(&doc, field("from")?)?;
                pointer_add(&mut doc, path, v)?;
            }
            "test" => {
                if pointer_get(&doc, path)? != value()? {
                    return Err(PatchError(format!("testing value {path} failed: test failed")));
                }
            }
            other => return Err(PatchError(format!("Unexpected kind: {other}"))),
        }
    }
    *target = doc;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({ "a": "b", "c": { "d": "e", "f": "g" }, "l": [1, 2] });
        merge_patch(&mut t, &json!({ "a": "z", "c": { "f": null }, "l": [3], "n": { "x": 1 } }));
        assert_eq!(t, json!({ "a": "z", "c": { "d": "e" }, "l": [3], "n": { "x": 1 } }));
        let mut t = json!({ "status": { "conditions": [{ "type": "A" }, { "type": "B" }] } });
        merge_patch(&mut t, &json!({ "status": { "conditions": [{ "type": "C" }] } }));
        assert_eq!(t, json!({ "status": { "conditions": [{ "type": "C" }] } }), "lists replace whole");
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let mut t = json!({ "status": { "conditions": [
            { "type": "Ready", "status": "True", "reason": "KubeletReady" },
            { "type": "DiskPressure", "status": "False" },
        ] } });
        let p = json!({ "status": { "conditions": [
            { "type": "Ready", "status": "False" },
            { "type": "PortsFree", "status": "True" },
        ] } });
        strategic_merge(&mut t, &p).expect("patch");
        assert_eq!(
            t["status"]["conditions"],
            json!([
                { "type": "Ready", "status": "False", "reason": "KubeletReady" },
                { "type": "DiskPressure", "status": "False" },
                { "type": "PortsFree", "status": "True" },
            ])
        );
        strategic_merge(
            &mut t,
            &json!({ "status": { "conditions": [{ "type": "DiskPressure", "$patch": "delete" }] } }),
        )
        .expect("delete item");
        let types: Vec<&str> = t["status"]["conditions"]
            .as_array()
            .map_or(vec![], |a| a.iter().filter_map(|c| c["type"].as_str()).collect());
        assert_eq!(types, ["Ready", "PortsFree"]);
    }

    #[test]
    fn strategic_owner_references_finalizers_and_directives() {
        let mut t = json!({ "metadata": {
            "ownerReferences": [{ "uid": "1", "name": "a" }],
            "finalizers": ["x"],
            "labels": { "keep": "1", "drop": "2" },
        }, "data": { "k": "v" }, "list": [1, 2] });
        let p = json!({
            "$setElementOrder/ownerReferences": [{ "uid": "1" }, { "uid": "2" }],
            "metadata": {
                "ownerReferences": [{ "uid": "2", "name": "b" }],
                "finalizers": ["y", "x"],
                "$deleteFromPrimitiveList/finalizers": ["x"],
                "labels": { "drop": null },
            },
            "data": { "$patch": "replace", "new": "1" },
            "list": [3],
        });
        strategic_merge(&mut t, &p).expect("patch");
        assert_eq!(
            t,
            json!({ "metadata": {
                "ownerReferences": [{ "uid": "1", "name": "a" }, { "uid": "2", "name": "b" }],
                "finalizers": ["y"],
                "labels": { "keep": "1" },
            }, "data": { "new": "1" }, "list": [3] })
        );
        let err = strategic_merge(&mut t, &json!({ "status": { "conditions": [{ "status": "True" }] } }));
        assert!(err.is_err(), "list items need their merge key");
    }

    #[test]
    fn json_patch_rfc6902() {
        let mut t = json!({ "metadata": { "labels": { "a/b": "1" } }, "l": [1, 2] });
        json_patch(
            &mut t,
            &json!([
                { "op": "test", "path": "/metadata/labels/a~1b", "value": "1" },
                { "op": "add", "path": "/metadata/labels/c", "value": "2" },
                { "op": "remove", "path": "/metadata/labels/a~1b" },
                { "op": "replace", "path": "/l/0", "value": 9 },
                { "op": "add", "path": "/l/-", "value": 3 },
                { "op": "copy", "from": "/l/0", "path": "/copied" },
                { "op": "move", "from": "/copied", "path": "/moved" },
            ]),
        )
        .expect("patch");
        assert_eq!(t, json!({ "metadata": { "labels": { "c": "2" } }, "l": [9, 2, 3], "moved": 9 }));
        let before = t.clone();
        let failed = json_patch(
            &mut t,
            &json!([{ "op": "add", "path": "/x", "value": 1 }, { "op": "test", "path": "/l/0", "value": 1 }]),
        );
        assert!(failed.is_err());
        assert_eq!(t, before, "a failed patch changes nothing");
        assert!(json_patch(&mut t, &json!([{ "op": "replace", "path": "/nope", "value": 1 }])).is_err());
        assert!(json_patch(&mut t, &json!([{ "op": "remove", "path": "/a/b" }])).is_err());
    }
}
