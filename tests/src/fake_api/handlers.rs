//! The verbs on objects: get, list, create, update, patch (four flavours),
//! delete, deletecollection. Each runs under the store lock from start to
//! finish, so a read-modify-write is atomic, as the apiserver's optimistic
//! concurrency makes it look.
use serde_json::{json, Value};

use super::{
    apply::{self, Manager},
    discovery::ResourceType,
    patch::{self, PatchError},
    selector::{FieldSelector, LabelSelector},
    server::{ApiRequest, Target},
    status::ApiError,
    store::{name_of, namespace_of, now_rfc3339, resource_version_of, Store},
};

/// The answer to a successful request: HTTP status and JSON body.
pub type Answer = (u16, Value);

/// Runs a non-watch verb on a resource target.
pub fn handle(store: &mut Store, t: &Target, verb: &str, req: &ApiRequest) -> Result<Answer, ApiError> {
    match verb {
        "get" => get(store, t).map(|o| (200, o)),
        "list" => list(store, t, req),
        "create" => create(store, t, req),
        "update" => update(store, t, req),
        "patch" => patch(store, t, req),
        "delete" => delete(store, t, req),
        "deletecollection" => delete_collection(store, t, req),
        other => Err(ApiError::method_not_allowed(other)),
    }
}

/// Name from the URL; the verbs that reach here with none have no route.
fn url_name<'a>(t: &'a Target, req: &ApiRequest) -> Result<&'a str, ApiError> {
    t.name.as_deref().ok_or_else(|| ApiError::method_not_allowed(req.method.as_str()))
}

fn get(store: &Store, t: &Target) -> Result<Value, ApiError> {
    let name = t.name.as_deref().unwrap_or_default();
    store.get(t.rt, t.namespace.as_deref(), name).cloned().ok_or_else(|| ApiError::not_found(t.rt, name))
}

/// Whether an object matches a request's `labelSelector` and `fieldSelector`.
pub struct Selection {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Selection {
    pub fn from_request(rt: &ResourceType, req: &ApiRequest) -> Result<Self, ApiError> {
        Ok(Self {
            labels: LabelSelector::parse(req.query.get("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(req.query.get("fieldSelector").unwrap_or_default(), rt)?,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

/// `{kind: XList, apiVersion, metadata: {resourceVersion}, items}`.
pub fn list_object(rt: &ResourceType, rv: u64, items: Vec<Value>) -> Value {
    json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": { "resourceVersion": rv.to_string() },
        "items": items,
    })
}

/// `namespace/name` of an object: the order lists are served in.
fn list_key(obj: &Value) -> String {
    format!("{}/{}", namespace_of(obj).unwrap_or_default(), name_of(obj))
}

/// Where the next page starts, and at which resourceVersion the list is
/// read: opaque to clients (hex of a small JSON document, as the apiserver's
/// is base64 of one).
fn encode_continue(rv: u64, after: &str) -> String {
    let doc = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": after}).to_string();
    doc.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let invalid = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return Err(invalid());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| invalid())?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    match (doc["rv"].as_u64(), doc["start"].as_str()) {
        (Some(rv), Some(start)) => Ok((rv, start.to_owned())),
        _ => Err(invalid()),
    }
}

/// How a list request is to be read.
enum ReadAt {
    /// The latest state.
    Latest,
    /// The state at this resourceVersion (a snapshot).
    Exact(u64),
}

/// The apiserver's rules for `resourceVersion`, `resourceVersionMatch` and
/// `continue` (apimachinery's `ValidateListOptions` and the storage layer):
/// which state a list is read at, and where it starts.
fn read_at(store: &Store, req: &ApiRequest, limit: usize) -> Result<(ReadAt, Option<String>), ApiError> {
    let rv = req.query.get("resourceVersion").filter(|v| !v.is_empty());
    let rv_match = req.query.get("resourceVersionMatch").filter(|v| !v.is_empty());
    let token = req.query.get("continue").filter(|c| !c.is_empty());
    if let Some(token) = token {
        if rv_match.is_some() {
            return Err(ApiError::invalid_list_options("resourceVersionMatch is forbidden when continue is provided"));
        }
        if rv.is_some() {
            return Err(ApiError::bad_request("specifying resource version is not allowed when using continue"));
        }
        // The rest of a paginated list is read at the first page's version.
        let (at, after) = decode_continue(token)?;
        if at < store.horizon() {
            return Err(ApiError::continue_expired());
        }
        return Ok((ReadAt::Exact(at), Some(after)));
    }
    let parsed = match rv {
        Some(v) => {
            Some(v.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))?)
        }
        None => None,
    };
    let at = match (rv_match, parsed) {
        (Some(_), None) => {
            return Err(ApiError::invalid_list_options(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ))
        }
        (Some("Exact"), Some(0)) => {
            return Err(ApiError::invalid_list_options(
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ))
        }
        (Some("Exact"), Some(v)) => ReadAt::Exact(v),
        // Legacy: a version with a limit is an exact read.
        (None, Some(v)) if v > 0 && limit > 0 => ReadAt::Exact(v),
        (Some("NotOlderThan") | None, Some(v)) if v > store.resource_version() => {
            return Err(ApiError::too_large_resource_version(v, store.resource_version()))
        }
        (Some("NotOlderThan") | None, _) => ReadAt::Latest,
        (Some(other), Some(_)) => {
            return Err(ApiError::invalid_list_options(format!("unsupported resourceVersionMatch {other:?}")))
        }
    };
    Ok((at, None))
}

/// List. Reads the latest state, or the state at a resourceVersion (exact
/// reads, and every page after the first of a paginated list, are served as
/// of that version, from the event history; 410 Expired once it was
/// compacted, as etcd's compaction does). `limit` pages, and the `continue`
/// token carries the version and where the next page starts, so every page
/// of one list reports the first page's `resourceVersion` and objects
/// written meanwhile show up in none of the later pages. `remainingItemCount`
/// only without selectors, as the apiserver. `limit` is honoured at
/// `resourceVersion=0` too (the apiserver's watch cache may ignore it and
/// answer in one page; clients handle both). Metadata only when the Accept
/// header asks for it.
fn list(store: &Store, t: &Target, req: &ApiRequest) -> Result<Answer, ApiError> {
    let selection = Selection::from_request(t.rt, req)?;
    let limit = match req.query.get("limit") {
        Some(l) => l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    let (at, after) = read_at(store, req, limit)?;
    let (rv, objects) = match at {
        ReadAt::Latest => {
            (store.resource_version(), store.list(t.rt, t.namespace.as_deref()).into_iter().cloned().collect())
        }
        ReadAt::Exact(rv) => (rv, store.list_at(t.rt, t.namespace.as_deref(), rv)?),
    };
    let mut items: Vec<Value> = objects
        .into_iter()
        .filter(|o| after.as_deref().is_none_or(|a| list_key(o).as_str() > a))
        .filter(|o| selection.matches(o))
        .collect();
    let mut doc_more = None;
    if limit > 0 && items.len() > limit {
        let rest = items.split_off(limit);
        doc_more = items.last().map(|last| (encode_continue(rv, &list_key(last)), rest.len()));
    }
    let mut doc = list_object(t.rt, rv, items);
    if let Some((token, remaining)) = doc_more {
        doc["metadata"]["continue"] = json!(token);
        let selectors =
            ["labelSelector", "fieldSelector"].iter().any(|q| req.query.get(q).is_some_and(|v| !v.is_empty()));
        if !selectors {
            doc["metadata"]["remainingItemCount"] = json!(remaining);
        }
    }
    if req.accept.contains("as=PartialObjectMetadataList") {
        doc = metadata_list(doc);
    }
    Ok((200, doc))
}

/// A list as `PartialObjectMetadataList`: the same list metadata, and of
/// each item only its `metadata`.
fn metadata_list(mut doc: Value) -> Value {
    const META: &str = "meta.k8s.io/v1";
    let items: Vec<Value> = doc["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(
                    |o| json!({"apiVersion": META, "kind": "PartialObjectMetadata", "metadata": o["metadata"].clone()}),
                )
                .collect()
        })
        .unwrap_or_default();
    doc["kind"] = json!("PartialObjectMetadataList");
    doc["apiVersion"] = json!(META);
    doc["items"] = json!(items);
    doc
}

/// The body: JSON, or YAML for the YAML media types (apply patches among them).
fn parse_body(req: &ApiRequest) -> Result<Value, ApiError> {
    if req.body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    // Protobuf (what kubectl create sends for built-in kinds) is not spoken:
    // 415, on which clients fall back to JSON.
    if req.content_type.contains("protobuf") || req.content_type.contains("cbor") {
        return Err(ApiError::unsupported_media_type(&req.content_type, &["application/json", "application/yaml"]));
    }
    let decoded = if req.content_type.contains("yaml") {
        // kube-rs and kubectl send apply patches as JSON under the YAML type.
        serde_json::from_slice(&req.body).or_else(|_| serde_yaml::from_slice(&req.body)).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&req.body).map_err(|e| e.to_string())
    };
    decoded.map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded: {e}")))
}

/// Checks a body's kind, apiVersion, name and namespace against the URL, and
/// fills in what it leaves out.
fn check_identity(t: &Target, obj: &mut Value, name: Option<&str>) -> Result<(), ApiError> {
    let rt = t.rt;
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    if let Some(v) = obj.get("apiVersion").and_then(Value::as_str) {
        if v != rt.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str) {
        if k != rt.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
    }
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    if let Some(url_name) = name {
        match obj.pointer("/metadata/name").and_then(Value::as_str) {
            Some(n) if n != url_name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({url_name})"
                )))
            }
            _ => obj["metadata"]["name"] = json!(url_name),
        }
    }
    if rt.namespaced {
        let Some(ns) = t.namespace.as_deref() else {
            return Err(ApiError::no_route(&format!("{} without a namespace", rt.plural)));
        };
        match namespace_of(obj) {
            Some(n) if !n.is_empty() && n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            _ => obj["metadata"]["namespace"] = json!(ns),
        }
    }
    Ok(())
}

/// The field manager: `?fieldManager=`, else the User-Agent up to its first
/// `/` (the apiserver's default).
fn manager_name(req: &ApiRequest) -> String {
    match req.query.get("fieldManager") {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => req.user_agent.split('/').next().filter(|s| !s.is_empty()).unwrap_or("unknown").to_string(),
    }
}

fn dry_run(req: &ApiRequest) -> bool {
    req.query.get("dryRun") == Some("All")
}

/// 409 unless `want` (a precondition from the request) is the stored version.
fn check_resource_version(t: &Target, old: &Value, want: Option<&str>) -> Result<(), ApiError> {
    match want {
        Some(w) if Some(w) != resource_version_of(old) => Err(ApiError::conflict(
            t.rt,
            name_of(old),
            "the object has been modified; please apply your changes to the latest version and try again",
        )),
        _ => Ok(()),
    }
}

/// Status-subresource rules: a write to `/status` changes only `.status`; a
/// write to the main resource of a type with a status subresource leaves
/// `.status` alone.
fn restrict_to_subresource(t: &Target, old: &Value, mut new: Value) -> Value {
    if t.subresource.is_some() {
        let mut out = old.clone();
        match new.get_mut("status").map(Value::take) {
            Some(s) => out["status"] = s,
            None => {
                if let Some(m) = out.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        out
    } else {
        if t.rt.status_subresource {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        new
    }
}

fn random_suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| CHARS[rand::random_range(0..CHARS.len())] as char).collect()
}

/// POST to a collection. Status is kept as sent (a real apiserver resets
/// pod status on create).
fn create(store: &mut Store, t: &Target, req: &ApiRequest) -> Result<Answer, ApiError> {
    if t.name.is_some() {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let mut obj = parse_body(req)?;
    check_identity(t, &mut obj, None)?;
    if name_of(&obj).is_empty() {
        match obj.pointer("/metadata/generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => {
                obj["metadata"]["name"] = json!(format!("{prefix}{}", random_suffix()))
            }
            _ => {
                return Err(ApiError::invalid(
                    t.rt,
                    "",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        t.rt.kind
                    ),
                ))
            }
        }
    }
    if let Some(meta) = obj["metadata"].as_object_mut() {
        for server_owned in ["uid", "resourceVersion", "creationTimestamp", "managedFields"] {
            meta.remove(server_owned);
        }
    }
    let (manager, api_version, now) = (manager_name(req), t.rt.api_version(), now_rfc3339());
    let who = Manager { name: &manager, subresource: None, api_version: &api_version, now: &now };
    apply::track_update(None, &mut obj, &who);
    if dry_run(req) {
        if store.get(t.rt, namespace_of(&obj), name_of(&obj)).is_some() {
            return Err(ApiError::already_exists(t.rt, name_of(&obj)));
        }
        return Ok((201, obj));
    }
    store.create(t.rt, obj).map(|o| (201, o))
}

fn commit(store: &mut Store, t: &Target, req: &ApiRequest, old: &Value, mut new: Value) -> Result<Value, ApiError> {
    let (manager, api_version, now) = (manager_name(req), t.rt.api_version(), now_rfc3339());
    let who = Manager { name: &manager, subresource: t.subresource.as_deref(), api_version: &api_version, now: &now };
    apply::track_update(Some(old), &mut new, &who);
    if dry_run(req) {
        return Ok(new);
    }
    store.replace(t.rt, new)
}

/// PUT: replaces the object; `metadata.resourceVersion` in the body, if set,
/// must be the stored one (optimistic concurrency), as must `metadata.uid`.
fn update(store: &mut Store, t: &Target, req: &ApiRequest) -> Result<Answer, ApiError> {
    let name = url_name(t, req)?;
    let mut obj = parse_body(req)?;
    check_identity(t, &mut obj, Some(name))?;
    let old = get(store, t)?;
    check_resource_version(t, &old, resource_version_of(&obj))?;
    if let Some(uid) = obj.pointer("/metadata/uid").and_then(Value::as_str).filter(|u| !u.is_empty()) {
        if Some(uid) != old.pointer("/metadata/uid").and_then(Value::as_str) {
            return Err(ApiError::conflict(t.rt, name, &format!("Precondition failed: UID in precondition: {uid}")));
        }
    }
    let new = restrict_to_subresource(t, &old, obj);
    commit(store, t, req, &old, new).map(|o| (200, o))
}

fn patch_error(t: &Target, name: &str, e: PatchError) -> ApiError {
    ApiError::invalid(t.rt, name, format!("the server rejected our request due to an error in our request: {e}"))
}

const PATCH_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];

/// PATCH, by Content-Type.
fn patch(store: &mut Store, t: &Target, req: &ApiRequest) -> Result<Answer, ApiError> {
    let name = url_name(t, req)?;
    if req.content_type == "application/apply-patch+yaml" {
        return server_side_apply(store, t, req, name);
    }
    let body = parse_body(req)?;
    let old = get(store, t)?;
    let mut new = old.clone();
    match req.content_type.as_str() {
        "application/merge-patch+json" => patch::merge_patch(&mut new, &body),
        "application/strategic-merge-patch+json" => {
            patch::strategic_merge(&mut new, &body).map_err(|e| patch_error(t, name, e))?
        }
        "application/json-patch+json" => patch::json_patch(&mut new, &body).map_err(|e| patch_error(t, name, e))?,
        other => return Err(ApiError::unsupported_media_type(other, PATCH_TYPES)),
    }
    if !new.is_object() {
        return Err(patch_error(t, name, PatchError("the patched object is not a JSON object".into())));
    }
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    // A resourceVersion the patch sets is a precondition, as in the apiserver.
    check_resource_version(t, &old, resource_version_of(&new))?;
    for identity in ["name", "namespace", "uid", "creationTimestamp", "managedFields"] {
        new["metadata"][identity] = old["metadata"][identity].clone();
    }
    if let Some(meta) = new["metadata"].as_object_mut() {
        meta.retain(|_, v| !v.is_null());
    }
    let new = restrict_to_subresource(t, &old, new);
    commit(store, t, req, &old, new).map(|o| (200, o))
}

/// PATCH with `application/apply-patch+yaml`: see `apply.rs`. Creates the
/// object when missing (201), except through `/status`.
fn server_side_apply(store: &mut Store, t: &Target, req: &ApiRequest, name: &str) -> Result<Answer, ApiError> {
    let Some(manager) = req.query.get("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    };
    let mut config = parse_body(req)?;
    if config.get("apiVersion").is_none() || config.get("kind").is_none() {
        return Err(ApiError::bad_request("apiVersion and kind must be set in an apply configuration"));
    }
    check_identity(t, &mut config, Some(name))?;
    let old = store.get(t.rt, t.namespace.as_deref(), name).cloned();
    if let Some(old) = &old {
        check_resource_version(t, old, resource_version_of(&config))?;
    }
    let skeleton = || {
        let mut s = json!({ "apiVersion": t.rt.api_version(), "kind": t.rt.kind, "metadata": { "name": name } });
        if let Some(ns) = &t.namespace {
            s["metadata"]["namespace"] = json!(ns);
        }
        s
    };
    // Only what the target may change counts as applied.
    let config = match (&t.subresource, t.rt.status_subresource) {
        (Some(_), _) => {
            let mut c = skeleton();
            if let Some(s) = config.get("status") {
                c["status"] = s.clone();
            }
            c
        }
        (None, true) => {
            if let Some(m) = config.as_object_mut() {
                m.remove("status");
            }
            config
        }
        (None, false) => config,
    };
    let live = match (&old, &t.subresource) {
        (Some(o), _) => o.clone(),
        (None, Some(_)) => return Err(ApiError::not_found(t.rt, name)),
        (None, None) => skeleton(),
    };
    let force = req.query.get("force") == Some("true");
    let (api_version, now) = (t.rt.api_version(), now_rfc3339());
    let who = Manager { name: manager, subresource: t.subresource.as_deref(), api_version: &api_version, now: &now };
    let new = apply::apply(&live, &config, &who, force).map_err(|c| ApiError::apply_conflicts(t.rt, name, &c))?;
    if dry_run(req) {
        return Ok((if old.is_some() { 200 } else { 201 }, new));
    }
    match old {
        Some(_) => store.replace(t.rt, new).map(|o| (200, o)),
        None => store.create(t.rt, new).map(|o| (201, o)),
    }
}

/// `DeleteOptions.preconditions` from a DELETE body, if any.
fn preconditions(req: &ApiRequest) -> (Option<String>, Option<String>) {
    let opts: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let get = |f: &str| opts.pointer(&format!("/preconditions/{f}")).and_then(Value::as_str).map(str::to_string);
    (get("uid"), get("resourceVersion"))
}

/// DELETE: immediate (no finalizers, no grace period); answers with the
/// deleted object.
fn delete(store: &mut Store, t: &Target, req: &ApiRequest) -> Result<Answer, ApiError> {
    let name = url_name(t, req)?;
    if t.subresource.is_some() {
        return Err(ApiError::method_not_allowed("DELETE"));
    }
    let old = get(store, t)?;
    let (uid, rv) = preconditions(req);
    if uid.is_some() && uid.as_deref() != old.pointer("/metadata/uid").and_then(Value::as_str) {
        return Err(ApiError::conflict(t.rt, name, "Precondition failed: UID in precondition does not match"));
    }
    check_resource_version(t, &old, rv.as_deref())?;
    if dry_run(req) {
        return Ok((200, old));
    }
    let gone = store.delete(t.rt, t.namespace.as_deref(), name).ok_or_else(|| ApiError::not_found(t.rt, name))?;
    Ok((200, gone))
}

fn delete_collection(store: &mut Store, t: &Target, req: &ApiRequest) -> Result<Answer, ApiError> {
    let selection = Selection::from_request(t.rt, req)?;
    let doomed: Vec<(Option<String>, String)> = store
        .list(t.rt, t.namespace.as_deref())
        .into_iter()
        .filter(|o| selection.matches(o))
        .map(|o| (namespace_of(o).map(str::to_string), name_of(o).to_string()))
        .collect();
    let mut gone = Vec::new();
    for (ns, name) in doomed {
        if dry_run(req) {
            gone.extend(store.get(t.rt, ns.as_deref(), &name).cloned());
        } else {
            gone.extend(store.delete(t.rt, ns.as_deref(), &name));
        }
    }
    Ok((200, list_object(t.rt, store.resource_version(), gone)))
}
