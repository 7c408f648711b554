//! The fake Kubernetes API server, checked from outside: raw HTTP for each
//! behaviour clients rely on, then real kubectl as a cross-check that it
//! speaks Kubernetes. Every test runs its own server.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use polarstack_tests::{
    fake_api::{FakeApi, Fault, RbacRule},
    in_ci, in_new_netns,
};
use serde_json::{json, Value};

/// A small JSON client over ureq that returns status and body for any answer.
struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    fn new(api: &FakeApi) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Self { agent, base: api.url() }
    }

    fn call(&self, method: &str, path: &str, content_type: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let mut req = ureq::http::Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(ct) = content_type {
            req = req.header("Content-Type", ct);
        }
        let resp = match body {
            Some(b) => self.agent.run(req.body(b).expect("request")),
            None => self.agent.run(req.body(()).expect("request")),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None, None)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some("application/json"), Some(&body.to_string()))
    }

    fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("PUT", path, Some("application/json"), Some(&body.to_string()))
    }

    fn patch(&self, path: &str, content_type: &str, body: &str) -> (u16, Value) {
        self.call("PATCH", path, Some(content_type), Some(body))
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        self.call("DELETE", path, None, None)
    }
}

const CMS: &str = "/api/v1/namespaces/kube-system/configmaps";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

fn cm(name: &str, data: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name, "namespace": "kube-system" }, "data": data })
}

fn node(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "labels": labels },
        "spec": { "podCIDR": "10.0.0.0/24" },
        "status": { "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady" }] },
    })
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no rv: {obj}"))
}

fn assert_status(body: &Value, code: u16, reason: &str) {
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["apiVersion"], "v1", "{body}");
    assert_eq!(body["status"], "Failure", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
}

fn condition_types(obj: &Value) -> Vec<String> {
    obj["status"]["conditions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| format!("{}={}", c["type"].as_str().unwrap_or("?"), c["status"].as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn discovery_and_unknown_paths() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    let (code, v) = http.get("/version");
    assert_eq!((code, v["gitVersion"].as_str()), (200, Some("v1.33.0")));
    assert_eq!(http.get("/api").1["versions"], json!(["v1"]));
    let (_, core) = http.get("/api/v1");
    assert_eq!(core["kind"], "APIResourceList");
    let find = |name: &str| core["resources"].as_array().and_then(|r| r.iter().find(|r| r["name"] == name).cloned());
    let cms = find("configmaps").expect("configmaps listed");
    assert_eq!(
        (cms["namespaced"].as_bool(), cms["kind"].as_str(), cms["shortNames"].clone()),
        (Some(true), Some("ConfigMap"), json!(["cm"]))
    );
    assert_eq!(find("nodes").expect("nodes")["namespaced"], false);
    for sub in ["nodes/status", "pods/status", "pods", "events", "namespaces"] {
        assert!(find(sub).is_some(), "{sub} in /api/v1");
    }
    assert_eq!(http.get("/apis").1["kind"], "APIGroupList");
    let (code, body) = http.get("/api/v1/widgets");
    assert_eq!(code, 404);
    assert_status(&body, 404, "NotFound");
    assert_eq!(http.get("/openapi/v2").0, 404);
    let (_, ns) = http.get("/api/v1/namespaces/kube-system");
    assert_eq!((ns["kind"].as_str(), ns["status"]["phase"].as_str()), (Some("Namespace"), Some("Active")));
}

#[test]
fn create_get_update_delete_with_conflicts() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    let (code, created) = http.post(CMS, &cm("a", json!({ "k": "v" })));
    assert_eq!(code, 201, "{created}");
    let meta = &created["metadata"];
    assert!(meta["uid"].as_str().is_some_and(|u| u.len() == 36), "{meta}");
    assert!(meta["creationTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{meta}");
    assert_eq!(rv(&created), api.resource_version());
    assert_eq!(meta["managedFields"][0]["operation"], "Update");
    let (code, got) = http.get(&format!("{CMS}/a"));
    assert_eq!((code, &got), (200, &created));

    let (code, missing) = http.get(&format!("{CMS}/nope"));
    assert_eq!(code, 404);
    assert_status(&missing, 404, "NotFound");
    assert_eq!(missing["details"], json!({ "name": "nope", "kind": "configmaps" }));
    assert_eq!(missing["message"], "configmaps \"nope\" not found");

    let (code, dup) = http.post(CMS, &cm("a", json!({})));
    assert_eq!(code, 409);
    assert_status(&dup, 409, "AlreadyExists");

    let mut stale = created.clone();
    stale["data"]["k"] = json!("w");
    let (code, updated) = http.put(&format!("{CMS}/a"), &stale);
    assert_eq!(code, 200, "{updated}");
    assert!(rv(&updated) > rv(&created));
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
    let (code, conflict) = http.put(&format!("{CMS}/a"), &stale);
    assert_eq!(code, 409, "stale resourceVersion");
    assert_status(&conflict, 409, "Conflict");
    let mut unconditional = stale.clone();
    unconditional["metadata"].as_object_mut().map(|m| m.remove("resourceVersion"));
    unconditional["data"]["k"] = json!("x");
    assert_eq!(http.put(&format!("{CMS}/a"), &unconditional).0, 200, "no resourceVersion: no precondition");
    assert_eq!(http.put(&format!("{CMS}/b"), &cm("b", json!({}))).0, 404);
    assert_eq!(http.put(&format!("{CMS}/a"), &cm("b", json!({}))).0, 400, "name mismatch");
    let other_ns =
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c", "namespace": "default" } });
    assert_eq!(http.post(CMS, &other_ns).0, 400, "namespace mismatch");
    let generated = json!({ "metadata": { "generateName": "gen-" } });
    let (code, g) = http.post(CMS, &generated);
    assert!(
        code == 201 && g["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("gen-") && n.len() == 9),
        "{g}"
    );

    let before = api.resource_version();
    let (code, deleted) = http.delete(&format!("{CMS}/a"));
    assert_eq!((code, deleted["metadata"]["name"].as_str()), (200, Some("a")));
    assert_eq!(rv(&deleted), before + 1);
    assert_eq!(http.get(&format!("{CMS}/a")).0, 404);
    assert_eq!(http.delete(&format!("{CMS}/a")).0, 404);
    assert!(api.get("cm", Some("kube-system"), "a").is_none());
}

#[test]
fn merge_strategic_and_json_patches() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    api.put(cm("a", json!({ "keep": "1", "drop": "2" })));
    let path = format!("{CMS}/a");

    let (code, merged) =
        http.patch(&path, MERGE, r#"{"metadata":{"labels":{"app":"db"}},"data":{"drop":null,"new":"3"}}"#);
    assert_eq!(code, 200, "{merged}");
    assert_eq!(merged["data"], json!({ "keep": "1", "new": "3" }));
    assert_eq!(merged["metadata"]["labels"]["app"], "db");
    assert_eq!(merged["metadata"]["managedFields"][0]["manager"], "ureq", "manager from the User-Agent");

    let before = api.resource_version();
    let (code, same) = http.patch(&path, MERGE, r#"{"data":{"keep":"1"}}"#);
    assert_eq!((code, rv(&same)), (200, before), "a no-op patch is not a write");
    assert_eq!(api.resource_version(), before);

    let (code, stale) = http.patch(&path, MERGE, r#"{"metadata":{"resourceVersion":"1"},"data":{"x":"1"}}"#);
    assert_eq!(code, 409, "a resourceVersion in a patch is a precondition: {stale}");

    let (code, jp) = http.patch(
        &path,
        JSON_PATCH,
        r#"[{"op":"test","path":"/data/keep","value":"1"},{"op":"replace","path":"/data/keep","value":"9"},{"op":"remove","path":"/data/new"}]"#,
    );
    assert_eq!(code, 200, "{jp}");
    assert_eq!(jp["data"], json!({ "keep": "9" }));
    let (code, failed) = http.patch(&path, JSON_PATCH, r#"[{"op":"test","path":"/data/keep","value":"1"}]"#);
    assert_eq!(code, 422, "{failed}");
    assert_status(&failed, 422, "Invalid");
    assert_eq!(http.patch(&path, "text/plain", "{}").0, 415);
    assert_eq!(http.patch(&path, MERGE, "not json").0, 400);
    assert_eq!(http.patch(&format!("{CMS}/missing"), MERGE, "{}").0, 404);

    api.put(node("n1", json!({})));
    let (code, strategic) = http.patch(
        "/api/v1/nodes/n1/status",
        STRATEGIC,
        r#"{"status":{"conditions":[{"type":"Ready","status":"False"},{"type":"PortsFree","status":"True"}]}}"#,
    );
    assert_eq!(code, 200, "{strategic}");
    assert_eq!(condition_types(&strategic), ["Ready=False", "PortsFree=True"]);
    assert_eq!(strategic["status"]["conditions"][0]["reason"], "KubeletReady", "merged by type, not replaced");
    let (_, merge_replaces) =
        http.patch("/api/v1/nodes/n1/status", MERGE, r#"{"status":{"conditions":[{"type":"X","status":"True"}]}}"#);
    assert_eq!(condition_types(&merge_replaces), ["X=True"], "a JSON merge patch replaces lists");
    let owner = |name: &str, uid: &str| {
        format!(
            r#"{{"metadata":{{"ownerReferences":[{{"apiVersion":"v1","kind":"Node","name":"{name}","uid":"{uid}"}}]}}}}"#
        )
    };
    http.patch(&path, STRATEGIC, &owner("n1", "u1"));
    let (_, owners) = http.patch(&path, STRATEGIC, &owner("n2", "u2"));
    assert_eq!(owners["metadata"]["ownerReferences"].as_array().map(Vec::len), Some(2), "ownerReferences merge by uid");
}

#[test]
fn server_side_apply() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    let path = format!("{CMS}/ports");
    let yaml = |keys: &[&str]| {
        let mut s =
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ports\n  namespace: kube-system\ndata:\n".to_string();
        for k in keys {
            s.push_str(&format!("  \"{k}\": taken\n"));
        }
        if keys.is_empty() {
            s.push_str("  {}\n");
        }
        s
    };
    let (code, missing) = http.patch(&path, APPLY, &yaml(&["5432"]));
    assert_eq!(code, 400, "fieldManager is required: {missing}");
    assert_status(&missing, 400, "BadRequest");

    let apply = |keys: &[&str]| http.patch(&format!("{path}?fieldManager=daemon"), APPLY, &yaml(keys));
    let (code, created) = apply(&["5432", "5433", "5434"]);
    assert_eq!(code, 201, "apply creates: {created}");
    assert_eq!(created["data"], json!({ "5432": "taken", "5433": "taken", "5434": "taken" }));
    let mf = &created["metadata"]["managedFields"][0];
    assert_eq!(
        (mf["manager"].as_str(), mf["operation"].as_str(), mf["fieldsType"].as_str()),
        (Some("daemon"), Some("Apply"), Some("FieldsV1"))
    );
    assert!(mf["fieldsV1"]["f:data"]["f:5433"].is_object(), "{mf}");

    let (code, shrunk) = apply(&["5432", "5434"]);
    assert_eq!(code, 200);
    assert_eq!(shrunk["data"], json!({ "5432": "taken", "5434": "taken" }), "a key the manager stops applying goes");

    let writes = api.resource_version();
    let (code, again) = apply(&["5432", "5434"]);
    assert_eq!((code, rv(&again), api.resource_version()), (200, writes, writes), "a no-op apply is not a write");
    assert_eq!(again, shrunk);

    // Another manager's key stays when ours go; its value is its own unless forced.
    assert_eq!(http.patch(&format!("{path}?fieldManager=ops"), MERGE, r#"{"data":{"ops":"x"}}"#).0, 200);
    let (_, mixed) = apply(&[]);
    assert_eq!(mixed["data"], json!({ "ops": "x" }));
    let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ports, namespace: kube-system}\ndata: {ops: y}\n";
    let (code, conflict) = http.patch(&format!("{path}?fieldManager=daemon"), APPLY, other);
    assert_eq!(code, 409, "{conflict}");
    assert_status(&conflict, 409, "Conflict");
    assert!(
        conflict["message"].as_str().is_some_and(|m| m.contains("conflict with \"ops\"") && m.contains(".data.ops")),
        "{conflict}"
    );
    let (code, forced) = http.patch(&format!("{path}?fieldManager=daemon&force=true"), APPLY, other);
    assert_eq!((code, forced["data"]["ops"].as_str()), (200, Some("y")));

    // JSON bodies are YAML too; apply to /status merges conditions by type
    // and ignores the rest.
    api.put(node("n1", json!({ "a": "1" })));
    let status_apply = json!({
        "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n1", "labels": { "ignored": "1" } },
        "status": { "conditions": [{ "type": "PortsFree", "status": "True" }] },
    });
    let (code, n) =
        http.patch("/api/v1/nodes/n1/status?fieldManager=daemon&force=true", APPLY, &status_apply.to_string());
    assert_eq!(code, 200, "{n}");
    assert_eq!(condition_types(&n), ["Ready=True", "PortsFree=True"]);
    assert_eq!(n["metadata"]["labels"], json!({ "a": "1" }), "the status subresource changes only .status");
    assert_eq!(n["metadata"]["managedFields"][0]["subresource"], "status");
    let without =
        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n1" }, "status": { "conditions": [] } });
    let (_, n) = http.patch("/api/v1/nodes/n1/status?fieldManager=daemon", APPLY, &without.to_string());
    assert_eq!(condition_types(&n), ["Ready=True"], "the daemon's own condition goes, the kubelet's stays");
    let n2 = without.to_string().replace("\"n1\"", "\"n2\"");
    let (code, _) = http.patch("/api/v1/nodes/n2/status?fieldManager=daemon", APPLY, &n2);
    assert_eq!(code, 404, "no create through /status");
}

#[test]
fn status_subresource_rules() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    api.put(node("n1", json!({ "role": "db" })));
    let (code, n) = http.patch(
        "/api/v1/nodes/n1/status",
        MERGE,
        r#"{"metadata":{"labels":{"role":"web"}},"spec":{"podCIDR":"x"},"status":{"phase":"Running"}}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(
        (n["metadata"]["labels"]["role"].as_str(), n["spec"]["podCIDR"].as_str()),
        (Some("db"), Some("10.0.0.0/24"))
    );
    assert_eq!(n["status"]["phase"], "Running");

    let (_, n) =
        http.patch("/api/v1/nodes/n1", MERGE, r#"{"metadata":{"labels":{"role":"web"}},"status":{"phase":"Gone"}}"#);
    assert_eq!(
        (n["metadata"]["labels"]["role"].as_str(), n["status"]["phase"].as_str()),
        (Some("web"), Some("Running"))
    );

    let mut whole = n.clone();
    whole["status"] = json!({ "phase": "Put" });
    whole["metadata"]["labels"] = json!({});
    let (code, n) = http.put("/api/v1/nodes/n1/status", &whole);
    assert_eq!(code, 200, "{n}");
    assert_eq!(
        (n["metadata"]["labels"]["role"].as_str(), &n["status"], n["spec"]["podCIDR"].as_str()),
        (Some("web"), &json!({ "phase": "Put" }), Some("10.0.0.0/24"))
    );
    assert_eq!(http.get("/api/v1/namespaces/kube-system/configmaps/x/status").0, 404, "configmaps have no status");
}

#[test]
fn list_with_selectors_and_paging() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    for (name, labels) in
        [("n1", json!({ "role": "db", "zone": "a" })), ("n2", json!({ "role": "web" })), ("n3", json!({}))]
    {
        api.put(node(name, labels));
    }
    let names = |q: &str| -> Vec<String> {
        let (code, list) = http.get(&format!("/api/v1/nodes?{q}"));
        assert_eq!(code, 200, "{q}: {list}");
        assert_eq!(list["kind"], "NodeList");
        list["items"]
            .as_array()
            .map(|i| i.iter().map(|o| o["metadata"]["name"].as_str().unwrap_or("?").to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(names(""), ["n1", "n2", "n3"]);
    assert_eq!(names("labelSelector=role%3Ddb"), ["n1"]);
    assert_eq!(names("labelSelector=role%3D%3Ddb"), ["n1"]);
    assert_eq!(names("labelSelector=role!%3Ddb"), ["n2", "n3"]);
    assert_eq!(names("labelSelector=role%20in%20(db,web)"), ["n1", "n2"]);
    assert_eq!(names("labelSelector=role%20notin%20(db)"), ["n2", "n3"]);
    assert_eq!(names("labelSelector=zone"), ["n1"]);
    assert_eq!(names("labelSelector=!zone,role"), ["n2"]);
    assert_eq!(names("fieldSelector=metadata.name%3Dn2"), ["n2"]);
    assert_eq!(names("fieldSelector=metadata.name!%3Dn2&labelSelector=role"), ["n1"]);
    assert_eq!(http.get("/api/v1/nodes?labelSelector=role%20in%20db").0, 400);
    assert_eq!(http.get("/api/v1/nodes?fieldSelector=spec.nodeName%3Dx").0, 400);

    let (_, page) = http.get("/api/v1/nodes?limit=2");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["metadata"]["remainingItemCount"], 1);
    assert_eq!(page["metadata"]["resourceVersion"], api.resource_version().to_string());
    let token = page["metadata"]["continue"].as_str().expect("continue token");
    assert_eq!(names(&format!("limit=2&continue={token}")), ["n3"]);

    for (ns, name, node) in [("default", "p1", "n1"), ("kube-system", "p2", "n2"), ("kube-system", "p3", "n1")] {
        api.put(json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name, "namespace": ns }, "spec": { "nodeName": node } }));
    }
    let (_, pods) = http.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn1");
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    let got: Vec<(&str, &str)> = items
        .iter()
        .map(|p| (p["metadata"]["namespace"].as_str().unwrap_or("?"), p["metadata"]["name"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(got, [("default", "p1"), ("kube-system", "p3")]);
    assert!(items.iter().all(|p| p["kind"] == "Pod" && p["apiVersion"] == "v1"), "items carry kind and apiVersion");
    let (_, ns_pods) = http.get("/api/v1/namespaces/kube-system/pods?fieldSelector=metadata.namespace%3Dkube-system");
    assert_eq!(ns_pods["items"].as_array().map(Vec::len), Some(2));
}

/// Paginated lists as the apiserver serves them: every page of one list is
/// read at the first page's resourceVersion (what is written meanwhile shows
/// up in no later page), the token carries it, and the parameter rules and
/// errors are the apiserver's.
#[test]
fn paginated_lists_are_consistent_snapshots() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    for i in 0..5 {
        api.put(node(&format!("n{i}"), json!({ "role": "db" })));
    }
    let at = api.resource_version();
    let page = |q: &str| -> (Vec<String>, Value) {
        let (code, list) = http.get(&format!("/api/v1/nodes?{q}"));
        assert_eq!(code, 200, "{q}: {list}");
        let names = list["items"]
            .as_array()
            .map(|i| i.iter().map(|o| o["metadata"]["name"].as_str().unwrap_or("?").to_string()).collect())
            .unwrap_or_default();
        (names, list["metadata"].clone())
    };
    let (first, meta) = page("limit=2&labelSelector=role");
    assert_eq!(first, ["n0", "n1"]);
    assert_eq!(meta["resourceVersion"], at.to_string());
    assert!(meta.get("remainingItemCount").is_none(), "unknown with a selector: {meta}");
    let token = meta["continue"].as_str().expect("continue").to_string();

    // Written after the first page: a new object (sorts into the rest), one
    // changed, one deleted. The rest of the list still shows the snapshot.
    api.put(node("n25", json!({ "role": "db" })));
    api.put(node("n3", json!({ "role": "db", "changed": "yes" })));
    api.delete("nodes", None, "n4");
    let (second, meta) = page(&format!("limit=2&labelSelector=role&continue={token}"));
    assert_eq!(second, ["n2", "n3"]);
    assert_eq!(meta["resourceVersion"], at.to_string(), "every page at the first page's version");
    let token2 = meta["continue"].as_str().expect("continue").to_string();
    let (_, list) = http.get(&format!("/api/v1/nodes?limit=2&labelSelector=role&continue={token}"));
    assert!(list["items"][1]["metadata"]["labels"].get("changed").is_none(), "n3 as it was: {list}");
    let (third, meta) = page(&format!("limit=2&labelSelector=role&continue={token2}"));
    assert_eq!(third, ["n4"], "deleted later, still in the snapshot");
    assert!(meta.get("continue").is_none_or(|c| c.as_str() == Some("")), "last page: {meta}");
    // A new list sees the changes.
    assert_eq!(page("").0, ["n0", "n1", "n2", "n25", "n3"]);
    let (_, meta) = page("limit=4");
    assert_eq!(meta["remainingItemCount"], 1, "known without selectors");
    assert_eq!(
        page(&format!("limit=10&resourceVersion={at}&resourceVersionMatch=Exact")).0,
        ["n0", "n1", "n2", "n3", "n4"]
    );

    // The parameter rules.
    for (q, code, reason) in [
        (format!("limit=2&continue={token}&resourceVersion={at}"), 400, "BadRequest"),
        (format!("limit=2&continue={token}&resourceVersion=0"), 400, "BadRequest"),
        (format!("limit=2&continue={token}&resourceVersionMatch=NotOlderThan"), 422, "Invalid"),
        ("limit=2&continue=not-a-token".to_string(), 400, "BadRequest"),
        ("limit=2&continue=7b7d".to_string(), 400, "BadRequest"),
        ("resourceVersionMatch=NotOlderThan".to_string(), 422, "Invalid"),
        ("resourceVersion=0&resourceVersionMatch=Exact".to_string(), 422, "Invalid"),
        ("resourceVersion=abc".to_string(), 400, "BadRequest"),
        (format!("resourceVersion={}&resourceVersionMatch=NotOlderThan", at + 100), 504, "Timeout"),
    ] {
        let (got, body) = http.get(&format!("/api/v1/nodes?{q}"));
        assert_eq!(got, code, "{q}: {body}");
        assert_status(&body, code, reason);
    }

    // Once the writes since the snapshot are compacted away, its token is
    // too old: 410 Expired, and a new list starts over.
    api.compact();
    let (code, body) = http.get(&format!("/api/v1/nodes?limit=2&labelSelector=role&continue={token}"));
    assert_eq!(code, 410, "{body}");
    assert_status(&body, 410, "Expired");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("continue parameter is too old")), "{body}");
    assert_eq!(page("limit=2&resourceVersion=0&resourceVersionMatch=NotOlderThan").0, ["n0", "n1"]);
}

/// A watch read on its own thread: lines arrive on a channel.
struct Watch {
    lines: mpsc::Receiver<Value>,
    started: Instant,
}

impl Watch {
    fn start(api: &FakeApi, path_and_query: &str) -> Self {
        let url = format!("{}{path_and_query}", api.url());
        let (tx, lines) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        thread::spawn(move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(20))).build().into();
            let resp = agent.get(&url).call().unwrap_or_else(|e| panic!("watch {url}: {e}"));
            let _ = ready_tx.send(());
            for line in BufReader::new(resp.into_body().into_reader()).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(serde_json::from_str::<Value>(&line).expect("a watch line is JSON"));
            }
        });
        ready.recv_timeout(Duration::from_secs(5)).expect("watch answered");
        Self { lines, started: Instant::now() }
    }

    fn next(&self) -> Value {
        self.lines.recv_timeout(Duration::from_secs(5)).expect("a watch event within 5 s")
    }

    /// (type, name, resourceVersion) of the next event.
    fn next_brief(&self) -> (String, String, u64) {
        let e = self.next();
        let o = &e["object"];
        (e["type"].as_str().unwrap_or("?").to_string(), o["metadata"]["name"].as_str().unwrap_or("").to_string(), rv(o))
    }

    /// Waits for the server to end the stream; returns when it did.
    fn ended(&self) -> Duration {
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(extra) => panic!("unexpected watch event {extra}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => self.started.elapsed(),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("watch did not end"),
        }
    }
}

#[test]
fn watch_streams_events_in_order_and_times_out() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    api.put(cm("before", json!({})));
    let (_, list) = http.get(CMS);
    let from = list["metadata"]["resourceVersion"].as_str().expect("list rv").to_string();
    let w = Watch::start(&api, &format!("{CMS}?watch=true&resourceVersion={from}&timeoutSeconds=1"));
    let (_, c) = http.post(CMS, &cm("a", json!({})));
    let (_, m) = http.patch(&format!("{CMS}/a"), MERGE, r#"{"data":{"k":"v"}}"#);
    http.patch(&format!("{CMS}/a"), MERGE, r#"{"data":{"k":"v"}}"#); // no-op: no event
    api.put(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "other-resource" } }));
    let (_, d) = http.delete(&format!("{CMS}/a"));
    assert_eq!(w.next_brief(), ("ADDED".into(), "a".into(), rv(&c)));
    let modified = w.next();
    assert_eq!(
        (modified["type"].as_str(), rv(&modified["object"]), &modified["object"]["data"]),
        (Some("MODIFIED"), rv(&m), &json!({ "k": "v" }))
    );
    assert_eq!(w.next_brief(), ("DELETED".into(), "a".into(), rv(&d)));
    let lasted = w.ended();
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(3),
        "timeoutSeconds=1 ended it after {lasted:?}"
    );

    // No resourceVersion: the current objects as ADDED first. A label selector
    // turns leaving the selection into DELETED.
    let w = Watch::start(&api, &format!("{CMS}?watch=1&labelSelector=app%3Ddb&timeoutSeconds=2"));
    api.put(json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "sel", "namespace": "kube-system", "labels": { "app": "db" } } }));
    http.patch(&format!("{CMS}/sel"), MERGE, r#"{"metadata":{"labels":{"app":"web"}}}"#);
    http.patch(&format!("{CMS}/before"), MERGE, r#"{"metadata":{"labels":{"app":"db"}}}"#);
    assert_eq!(w.next_brief().0.as_str(), "ADDED");
    assert_eq!(w.next_brief().0.as_str(), "DELETED", "left the selection");
    let (kind, name, _) = w.next_brief();
    assert_eq!((kind.as_str(), name.as_str()), ("ADDED", "before"), "entered the selection");

    // Single-object watch, as kube-rs does it: a fieldSelector on the name.
    let w = Watch::start(&api, &format!("{CMS}?watch=true&fieldSelector=metadata.name%3Dbefore&timeoutSeconds=1"));
    assert_eq!(w.next_brief().1, "before");
    w.ended();
}

#[test]
fn watch_replays_history_and_expires_after_compaction() {
    let api = FakeApi::start();
    let first = api.put(cm("a", json!({})));
    api.put(cm("b", json!({})));
    let mut changed = cm("a", json!({ "k": "v" }));
    changed["metadata"]["resourceVersion"] = first["metadata"]["resourceVersion"].clone();
    api.put(changed);
    let w = Watch::start(&api, &format!("{CMS}?watch=true&resourceVersion={}&timeoutSeconds=1", rv(&first)));
    assert_eq!(w.next_brief().0, "ADDED");
    assert_eq!(w.next_brief().0, "MODIFIED");
    w.ended();

    api.compact();
    let w = Watch::start(&api, &format!("{CMS}?watch=true&resourceVersion={}&timeoutSeconds=1", rv(&first)));
    let e = w.next();
    assert_eq!(e["type"], "ERROR");
    assert_status(&e["object"], 410, "Expired");
    assert!(w.ended() < Duration::from_millis(500), "the stream ends after the error");
    let current = api.resource_version();
    let w = Watch::start(&api, &format!("{CMS}?watch=true&resourceVersion={current}&timeoutSeconds=1"));
    api.delete("cm", Some("kube-system"), "b");
    assert_eq!(w.next_brief().0, "DELETED", "the current resourceVersion is still fine");
}

#[test]
fn watch_bookmarks_and_initial_events() {
    let api = FakeApi::start();
    api.set_bookmark_interval(Duration::from_millis(100));
    api.put(cm("a", json!({})));
    let at = api.resource_version();
    let w =
        Watch::start(&api, &format!("{CMS}?watch=true&resourceVersion={at}&allowWatchBookmarks=true&timeoutSeconds=2"));
    let b = w.next();
    assert_eq!((b["type"].as_str(), rv(&b["object"])), (Some("BOOKMARK"), at));
    assert_eq!(b["object"]["kind"], "ConfigMap");
    api.put(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n" } }));
    let b = loop {
        let b = w.next();
        if rv(&b["object"]) > at {
            break b;
        }
    };
    assert_eq!(
        (b["type"].as_str(), rv(&b["object"])),
        (Some("BOOKMARK"), at + 1),
        "bookmarks advance past other resources' writes"
    );

    let w = Watch::start(
        &api,
        &format!("{CMS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"),
    );
    assert_eq!(w.next_brief().0, "ADDED");
    let end = w.next();
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    let (code, _) = Http::new(&api).get(&format!("{CMS}?watch=true&sendInitialEvents=true"));
    assert_eq!(code, 400, "sendInitialEvents needs resourceVersionMatch=NotOlderThan");
}

#[test]
fn faults_statuses_delays_and_dropped_connections() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    api.inject(Fault::internal_error().times(2));
    for _ in 0..2 {
        let (code, body) = http.get("/api/v1/nodes");
        assert_eq!(code, 500);
        assert_status(&body, 500, "InternalError");
    }
    assert_eq!(http.get("/api/v1/nodes").0, 200, "times(2) is spent");

    api.inject(Fault::too_many_requests(7).method("PATCH").path_contains("/nodes/"));
    let resp = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .patch(format!("{}/api/v1/nodes/n1", api.url()))
        .header("Content-Type", MERGE)
        .send("{}")
        .expect("answer");
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers().get("Retry-After").and_then(|v| v.to_str().ok()), Some("7"));
    assert_eq!(http.get("/api/v1/nodes").0, 200, "only PATCH on /nodes/");
    api.clear_faults();
    api.inject(Fault::unavailable().times(1));
    assert_eq!(http.get("/api/v1/nodes").0, 503);

    api.inject(Fault::delay(Duration::from_millis(300)).times(1));
    let t = Instant::now();
    assert_eq!(http.get("/version").0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());

    api.inject(Fault::drop_connection().times(1));
    let mut s = TcpStream::connect(api.addr()).expect("connect");
    s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut got = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let n = s.read_to_end(&mut got).expect("closed, not reset");
    assert_eq!(n, 0, "closed without an answer: {:?}", String::from_utf8_lossy(&got));
    let last = api.requests().last().cloned().expect("logged");
    assert_eq!((last.path.as_str(), last.status), ("/version", 0));

    api.set_down(true);
    assert!(ureq::get(format!("{}/version", api.url())).call().is_err(), "down: no answers");
    api.set_down(false);
    assert_eq!(http.get("/version").0, 200);
}

#[test]
fn rbac_denies_outside_the_rules() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    api.put(cm("a", json!({})));
    api.put(node("n1", json!({})));
    api.set_rbac(Some(vec![
        RbacRule::new(&["get", "list", "watch", "patch"], &["configmaps"]).in_namespaces(&["kube-system"]),
        RbacRule::new(&["patch"], &["nodes/status"]),
    ]));
    api.clear_requests();
    assert_eq!(http.get(&format!("{CMS}/a")).0, 200);
    assert_eq!(http.patch("/api/v1/nodes/n1/status", MERGE, r#"{"status":{"phase":"x"}}"#).0, 200);
    let (code, denied) = http.patch("/api/v1/nodes/n1", MERGE, "{}");
    assert_eq!(code, 403);
    assert_status(&denied, 403, "Forbidden");
    assert!(denied["message"].as_str().is_some_and(|m| m.contains("cannot patch resource \"nodes\"")), "{denied}");
    assert_eq!(http.get("/api/v1/configmaps").0, 403, "all-namespace list");
    assert_eq!(http.delete(&format!("{CMS}/a")).0, 403);
    assert_eq!(http.get("/api/v1").0, 200, "discovery stays open");
    let log: Vec<(String, u16, bool)> = api.requests().into_iter().map(|r| (r.method, r.status, r.denied)).collect();
    assert_eq!(
        log,
        [
            ("GET".into(), 200, false),
            ("PATCH".into(), 200, false),
            ("PATCH".into(), 403, true),
            ("GET".into(), 403, true),
            ("DELETE".into(), 403, true),
            ("GET".into(), 200, false),
        ]
    );
    api.set_rbac(None);
    assert_eq!(http.get("/api/v1/configmaps").0, 200);
}

/// resourceNames as a real apiserver applies them: a list or watch with a
/// `metadata.name` field selector is authorized as that object; a plain
/// create (POST) has no name to match; a server-side apply that creates its
/// object needs `create` on that name as well as `patch`, one that updates
/// needs only `patch`.
#[test]
fn rbac_resource_names_for_selected_lists_and_creating_applies() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    api.put(cm("named", json!({})));
    api.put(cm("other", json!({})));
    let watch = "watch=true&timeoutSeconds=1";
    api.set_rbac(Some(vec![
        RbacRule::new(&["get", "list", "watch", "patch"], &["configmaps"])
            .in_namespaces(&["kube-system"])
            .named(&["named", "fresh"]),
        RbacRule::new(&["create"], &["configmaps"]).in_namespaces(&["kube-system"]).named(&["fresh"]),
    ]));
    let (code, list) = http.get(&format!("{CMS}?fieldSelector=metadata.name%3Dnamed"));
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    for allowed in [
        format!("{CMS}?fieldSelector=metadata.name%3D%3Dnamed"),
        format!("{CMS}?fieldSelector=metadata.namespace%3Dkube-system,metadata.name%3Dnamed"),
        format!("{CMS}?fieldSelector=metadata.name%3Dnamed&{watch}"),
        format!("{CMS}/named"),
    ] {
        assert_eq!(http.get(&allowed).0, 200, "{allowed}");
    }
    for refused in [
        CMS.to_string(),
        format!("{CMS}?fieldSelector=metadata.name%3Dother"),
        format!("{CMS}?fieldSelector=metadata.name!%3Dother"),
        format!("{CMS}?labelSelector=app%3Dx"),
        format!("{CMS}?{watch}"),
        format!("{CMS}/other"),
        "/api/v1/configmaps?fieldSelector=metadata.name%3Dnamed".to_string(),
    ] {
        let (code, body) = http.get(&refused);
        assert_eq!(code, 403, "{refused}: {body}");
    }
    let last = api.requests().pop().expect("logged");
    assert_eq!(last.authorization.len(), 1);
    assert_eq!(
        (last.authorization[0].verb.as_str(), last.authorization[0].name.as_deref()),
        ("list", Some("named")),
        "the selected name is what was authorized"
    );

    // A POST carries no name at authorization: a named create rule never matches it.
    let (code, body) = http.post(CMS, &cm("fresh", json!({})));
    assert_eq!(code, 403, "{body}");
    // Apply creating "other": patch is refused first.
    let apply = |name: &str| {
        http.patch(&format!("{CMS}/{name}?fieldManager=t"), APPLY, &cm(name, json!({"k": "v"})).to_string())
    };
    assert_eq!(apply("other").0, 403);
    // Apply creating "fresh": patch and create both named. Then an update of it needs only patch.
    let (code, body) = apply("fresh");
    assert_eq!(code, 201, "{body}");
    let checks = api.requests().pop().expect("logged").authorization;
    let verbs: Vec<(&str, bool)> = checks.iter().map(|c| (c.verb.as_str(), c.allowed)).collect();
    assert_eq!(verbs, [("patch", true), ("create", true)]);
    assert_eq!(apply("fresh").0, 200);
    let checks = api.requests().pop().expect("logged").authorization;
    assert_eq!(checks.iter().map(|c| c.verb.as_str()).collect::<Vec<_>>(), ["patch"], "an update is not a create");

    // Without create, an apply that would create is refused, and nothing is stored.
    api.set_rbac(Some(vec![RbacRule::new(&["patch"], &["configmaps"]).in_namespaces(&["kube-system"])]));
    let (code, body) = apply("brand-new");
    assert_eq!(code, 403, "{body}");
    assert_status(&body, 403, "Forbidden");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("cannot create resource \"configmaps\"")), "{body}");
    assert!(api.get("configmaps", Some("kube-system"), "brand-new").is_none());
    let last = api.requests().pop().expect("logged");
    assert!(last.denied);
    let verbs: Vec<(&str, bool)> = last.authorization.iter().map(|c| (c.verb.as_str(), c.allowed)).collect();
    assert_eq!(verbs, [("patch", true), ("create", false)]);
    assert_eq!(apply("named").0, 200, "updating an existing object needs no create");
    // A merge patch of a missing object is a 404 (no create), not a 403.
    assert_eq!(http.patch(&format!("{CMS}/missing"), MERGE, "{}").0, 404);
}

#[test]
fn request_log_records_what_clients_sent() {
    let api = FakeApi::start();
    let http = Http::new(&api);
    api.put(cm("a", json!({})));
    http.patch(&format!("{CMS}/a?fieldManager=me"), MERGE, "{}");
    let r = api.requests().pop().expect("logged");
    assert_eq!(
        (r.method.as_str(), r.path.as_str(), r.query.as_str()),
        ("PATCH", "/api/v1/namespaces/kube-system/configmaps/a", "fieldManager=me")
    );
    assert_eq!(
        (r.content_type.as_deref(), r.status, r.param("fieldManager").as_deref(), r.is_write()),
        (Some(MERGE), 200, Some("me"), true)
    );
    assert!(r.user_agent.is_some_and(|ua| ua.starts_with("ureq")));
    api.clear_requests();
    assert!(api.requests().is_empty());
}

#[test]
fn serves_from_the_creating_threads_network_namespace() {
    in_new_netns(|| {
        let api = FakeApi::start();
        assert_eq!(Http::new(&api).get("/version").0, 200);
    });
}

/// Real kubectl against the fake, with its own cache directory. `None` (after
/// a notice) when kubectl is missing outside CI; in CI that is a failure.
fn kubectl(api: &FakeApi, cache: &std::path::Path) -> Option<impl Fn(&[&str]) -> Command> {
    let bin = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("kubectl")).find(|p| p.is_file()))
        .or_else(|| Some(PathBuf::from("/usr/bin/kubectl")).filter(|p| p.is_file()));
    let Some(bin) = bin else {
        assert!(!in_ci(), "kubectl is missing, and CI must run the kubectl cross-check");
        eprintln!("NOTICE: kubectl not found; skipping the kubectl cross-check");
        return None;
    };
    let (kubeconfig, cache) = (api.kubeconfig_path().to_path_buf(), cache.to_path_buf());
    Some(move |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("--kubeconfig").arg(&kubeconfig).arg("--cache-dir").arg(&cache).args(args);
        c.env_remove("KUBECONFIG");
        c
    })
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().expect("run kubectl");
    assert!(
        out.status.success(),
        "{c:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fake-api-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn kubectl_gets_applies_and_patches() {
    let api = FakeApi::start();
    let dir = temp_dir("kubectl");
    let Some(kubectl) = kubectl(&api, &dir.join("cache")) else { return };
    api.put(cm("seeded", json!({ "k": "v" })));
    api.put(node("n1", json!({ "role": "db" })));
    api.put(node("n2", json!({ "role": "web" })));

    let list: Value =
        serde_json::from_str(&run_ok(kubectl(&["get", "cm", "-n", "kube-system", "-o", "json"]))).expect("json");
    assert_eq!(list["items"][0]["metadata"]["name"], "seeded");

    let file = dir.join("cm.yaml");
    std::fs::write(&file, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: kube-system\ndata:\n  port: \"5432\"\n").expect("write");
    let out = run_ok(kubectl(&["apply", "--server-side", "-f", file.to_str().unwrap_or_default()]));
    assert!(out.contains("configmap/applied serverside-applied"), "{out}");
    let got: Value = serde_json::from_str(&run_ok(kubectl(&[
        "get",
        "configmaps",
        "applied",
        "-n",
        "kube-system",
        "-o",
        "json",
        "--show-managed-fields",
    ])))
    .expect("json");
    assert_eq!(got["data"], json!({ "port": "5432" }));
    assert_eq!(got["metadata"]["managedFields"][0]["manager"], "kubectl");
    assert_eq!(got["metadata"]["managedFields"][0]["operation"], "Apply");
    let apply = api.requests().into_iter().find(|r| r.content_type.as_deref() == Some(APPLY)).expect("an apply PATCH");
    assert_eq!(apply.param("fieldManager").as_deref(), Some("kubectl"));

    let out = run_ok(kubectl(&[
        "patch",
        "node",
        "n1",
        "--subresource=status",
        "--type=strategic",
        "-p",
        r#"{"status":{"conditions":[{"type":"PortsFree","status":"True"}]}}"#,
    ]));
    assert!(out.contains("node/n1 patched"), "{out}");
    let n1 = api.get("nodes", None, "n1").expect("n1");
    assert_eq!(condition_types(&n1), ["Ready=True", "PortsFree=True"]);
    run_ok(kubectl(&[
        "patch",
        "node",
        "n2",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"x"}}"#,
    ]));
    assert_eq!(api.get("nodes", None, "n2").expect("n2")["status"]["phase"], "x");

    assert_eq!(run_ok(kubectl(&["get", "nodes", "-l", "role=db", "-o", "name"])).trim(), "node/n1");
    assert_eq!(run_ok(kubectl(&["get", "nodes", "-l", "role notin (db)", "-o", "name"])).trim(), "node/n2");
    let table = run_ok(kubectl(&["get", "cm", "-A"]));
    assert!(table.contains("kube-system") && table.contains("applied") && table.contains("seeded"), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills a child on drop, so a failing test leaves no kubectl behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kubectl_watch_sees_changes() {
    let api = FakeApi::start();
    let dir = temp_dir("kubectl-watch");
    let Some(kubectl) = kubectl(&api, &dir.join("cache")) else { return };
    api.put(cm("first", json!({})));
    let mut cmd = kubectl(&["get", "cm", "-n", "kube-system", "-w", "-o", "name"]);
    let mut child = Reaped(cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn kubectl"));
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = |what| rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("kubectl printed {what}"));
    assert_eq!(line("the initial list"), "configmap/first");
    // The watch request is open once the fake logs it (answered at once, logged then).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.requests().iter().any(|r| r.param("watch").is_some()) {
        assert!(Instant::now() < deadline, "kubectl never watched");
        thread::sleep(Duration::from_millis(20));
    }
    api.put(cm("second", json!({})));
    assert_eq!(line("the change"), "configmap/second");
    let watch = api.requests().into_iter().find(|r| r.param("watch").is_some()).expect("watch request");
    assert!(watch.param("resourceVersion").is_some(), "kubectl watches from its list's resourceVersion: {watch:?}");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
