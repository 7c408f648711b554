//! deploy/: the manifests and the chart validate against Kubernetes schemas,
//! their RBAC is exactly what the daemon needs (the real binary against the
//! fake API server with authorization on), their capability set runs eBPF
//! and the log sweeper, the offline image runs in a real dockerd and
//! containerd, and the Prometheus rules, live /metrics and the Grafana
//! dashboard agree with each other.
//!
//! The admission policy's CEL is evaluated with a real CEL implementation
//! (cel-expr-python, Google's cel-cpp, through tests/cel/admission.py).
//!
//! Tools: helm, kubernetes-validate and cel-expr-python from `cargo xtask
//! setup` (under DEPLOY_TOOLS, default target/tools), promtool, docker.io,
//! setpriv. Without one, a test is skipped with a note, except under CI,
//! where it fails.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, SystemTime},
};

use polarstack_tests::{
    fake_api::{AuthzCheck, FakeApi, RbacRule},
    in_ci, in_new_netns, run_ok,
    runtimes::{self, Runtimes},
    wait_for, Daemon,
};
use serde::Deserialize;
use serde_json::{json, Value};

const NODE: &str = "node-a";
const NS: &str = "kube-system";
/// The daemon's ServiceAccount in deploy/manifests and the chart's default.
const SERVICE_ACCOUNT: &str = "polarstack-daemon";
const SOON: Duration = Duration::from_secs(15);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn tools() -> PathBuf {
    std::env::var_os("DEPLOY_TOOLS").map(PathBuf::from).unwrap_or_else(|| repo().join("target/tools"))
}

/// A tool's path, or None (skip) when it is missing outside CI.
fn tool(name: &str) -> Option<PathBuf> {
    let path = match name {
        "helm" => tools().join("helm/helm"),
        "kubernetes-validate" => tools().join("venv/bin/kubernetes-validate"),
        other => std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join(other)).find(|p| p.is_file()))
            .unwrap_or_else(|| PathBuf::from(other)),
    };
    if path.is_file() {
        return Some(path);
    }
    assert!(!in_ci(), "{name} is missing ({}): `cargo xtask setup` installs it; required under CI", path.display());
    eprintln!("SKIP: {name} not installed (run `cargo xtask setup`)");
    None
}

fn run(cmd: &mut Command) -> Output {
    run_ok(cmd, None)
}

fn run_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    run_ok(cmd, Some(input))
}

/// Every document of a multi-document YAML stream, as JSON.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn manifest_docs() -> Vec<Value> {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(deploy("manifests"))
        .expect("deploy/manifests")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        docs.extend(yaml_docs(&std::fs::read_to_string(&f).expect("read manifest")));
    }
    docs
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// What a RoleBinding or ClusterRoleBinding binds: (kind, name, namespace
/// of a Role).
fn role_refs(docs: &[Value]) -> BTreeSet<(String, String, Option<String>)> {
    docs.iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
        .map(|b| {
            let kind = b["roleRef"]["kind"].as_str().expect("roleRef kind").to_owned();
            let ns = (kind == "Role").then(|| b["metadata"]["namespace"].as_str().expect("namespace").to_owned());
            (kind, b["roleRef"]["name"].as_str().expect("roleRef name").to_owned(), ns)
        })
        .collect()
}

/// The rules of the Roles and ClusterRoles of `docs` that a binding of `docs`
/// binds (to the daemon's account: [`assert_service_account`]), as the fake
/// API server's rules: a Role's rules hold in its namespace only. A role that
/// nothing binds (the example caller role) is not the daemon's; a bound role
/// that `docs` do not define (the built-in system:auth-delegator) is checked
/// by [`assert_bound_built_ins`].
fn rbac_rules(docs: &[Value]) -> Vec<RbacRule> {
    let bound = role_refs(docs);
    let mut rules = Vec::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if kind != "Role" && kind != "ClusterRole" {
            continue;
        }
        let ns = d["metadata"]["namespace"].as_str().map(str::to_owned);
        let key =
            (kind.to_owned(), d["metadata"]["name"].as_str().expect("name").to_owned(), ns.filter(|_| kind == "Role"));
        if !bound.contains(&key) {
            continue;
        }
        for r in d["rules"].as_array().expect("rules") {
            assert_eq!(strs(&r["apiGroups"]), vec![String::new()], "only the core group is used: {r}");
            let verbs = strs(&r["verbs"]);
            let resources = strs(&r["resources"]);
            let v: Vec<&str> = verbs.iter().map(String::as_str).collect();
            let res: Vec<&str> = resources.iter().map(String::as_str).collect();
            let mut rule = RbacRule::new(&v, &res);
            if kind == "Role" {
                rule = rule.in_namespaces(&[d["metadata"]["namespace"].as_str().expect("Role namespace")]);
            }
            if let Some(names) = r.get("resourceNames") {
                let n = strs(names);
                rule = rule.named(&n.iter().map(String::as_str).collect::<Vec<_>>());
            }
            rules.push(rule);
        }
    }
    assert!(!rules.is_empty(), "no bound Role or ClusterRole found");
    rules
}

/// The only role bound that `docs` do not define is the built-in
/// system:auth-delegator (TokenReviews and SubjectAccessReviews, to check the
/// callers of the daemon's endpoints that change state).
fn assert_bound_built_ins(docs: &[Value]) {
    let defined: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let outside: Vec<(String, String, Option<String>)> =
        role_refs(docs).into_iter().filter(|(k, n, _)| !defined.contains(&(k.clone(), n.clone()))).collect();
    assert_eq!(outside, [("ClusterRole".to_owned(), "system:auth-delegator".to_owned(), None)]);
}

/// The POST routes of the daemon's HTTP router, from its source: the
/// endpoints that change state, which callers need a grant for.
fn daemon_post_routes() -> BTreeSet<String> {
    let mut routes = BTreeSet::new();
    for e in std::fs::read_dir(repo().join("daemon/src/http")).expect("daemon/src/http").flatten() {
        let text = std::fs::read_to_string(e.path()).expect("read");
        for part in text.split(".route(\"").skip(1) {
            let Some((path, rest)) = part.split_once('"') else { continue };
            if rest.trim_start_matches([',', ' ']).starts_with("post(") {
                routes.insert(path.to_owned());
            }
        }
    }
    routes
}

/// The example caller ClusterRole of `docs` (`name`): post on exactly the
/// daemon's POST routes, non-resource URLs only, and bound to nobody.
fn assert_api_caller_role(docs: &[Value], name: &str) {
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no ClusterRole {name}"));
    let rules = role["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "{role}");
    assert_eq!(strs(&rules[0]["verbs"]), ["post"]);
    assert!(rules[0].get("resources").is_none() && rules[0].get("apiGroups").is_none(), "{role}");
    let urls: BTreeSet<String> = strs(&rules[0]["nonResourceURLs"]).into_iter().collect();
    let routes = daemon_post_routes();
    assert_eq!(routes.len(), 3, "the daemon's POST routes changed: update the caller role and this count: {routes:?}");
    assert_eq!(urls, routes, "the caller role grants post on the daemon's POST routes");
    assert!(!role_refs(docs).iter().any(|(_, n, _)| n == name), "{name} is for operators to bind, not bound here");
}

fn daemonset(docs: &[Value]) -> &Value {
    docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet")
}

fn container(docs: &[Value]) -> &Value {
    &daemonset(docs)["spec"]["template"]["spec"]["containers"][0]
}

/// The capabilities the DaemonSet adds, lowercase without CAP_ (setpriv's spelling).
fn capabilities(docs: &[Value]) -> BTreeSet<String> {
    let sc = &container(docs)["securityContext"];
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL".to_string()], "everything else dropped");
    strs(&sc["capabilities"]["add"]).iter().map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase()).collect()
}

fn helm_template(helm: &Path, sets: &[&str]) -> String {
    helm_template_in(helm, NS, sets)
}

fn helm_template_in(helm: &Path, namespace: &str, sets: &[&str]) -> String {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "psd"]).arg(deploy("helm/polarstack-daemon")).args(["--namespace", namespace]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    String::from_utf8(run(&mut cmd).stdout).expect("utf-8")
}

#[test]
fn manifests_and_chart_validate_strictly() {
    let (Some(validate), Some(helm)) = (tool("kubernetes-validate"), tool("helm")) else { return };
    // Every plain manifest, against the newest and the oldest schemas it
    // supports: 1.25 for all but the admission policy, which needs 1.30 (and
    // is in a file of its own for that reason: 1.29 does not know it).
    let files: Vec<PathBuf> =
        std::fs::read_dir(deploy("manifests")).expect("manifests").flatten().map(|e| e.path()).collect();
    let policy_file = deploy("manifests/admission-policy.yaml");
    assert!(files.contains(&policy_file), "{files:?}");
    let older: Vec<&PathBuf> = files.iter().filter(|f| **f != policy_file).collect();
    for (k, files) in [("1.37.0", files.iter().collect()), ("1.30.0", files.iter().collect()), ("1.25.0", older)] {
        let out = run(Command::new(&validate).args(["--strict", "-k", k]).args(&files));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("ERROR") && !text.contains("WARN"), "{k}: {text}");
    }
    let out = Command::new(&validate).args(["--strict", "-k", "1.29.0"]).arg(&policy_file).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let unknown =
        "Couldn't find schema for kind ValidatingAdmissionPolicy with api version admissionregistration.k8s.io/v1";
    assert!(text.contains(unknown), "1.29 should not know admissionregistration.k8s.io/v1 policies: {text}");
    run(Command::new(&helm).args(["lint", "--strict"]).arg(deploy("helm/polarstack-daemon")));
    let dir = std::env::temp_dir().join(format!("deploy-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let variants: [&[&str]; 4] = [
        &[],
        &["securityContext.privileged=true", "ccmConfig.create=true", "runtimeSockets.crio.enabled=true"],
        &["serviceMonitor.enabled=true", "extraArgs={--log-format=json}", "cgroupRoot=/sys/fs/cgroup/unified"],
        &["admissionPolicy.enabled=false", "serviceAccount.name=cloud-controller-manager", "rbac.apiCallerRole=false"],
    ];
    for (i, sets) in variants.iter().enumerate() {
        let rendered = helm_template(&helm, sets);
        let file = dir.join(format!("render-{i}.yaml"));
        std::fs::write(&file, &rendered).expect("write render");
        let out = run(Command::new(&validate).arg("--strict").arg(&file));
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            // The one kind without a built-in schema is the operator's CRD.
            let ok = line.starts_with("INFO") || line.contains("kind ServiceMonitor");
            assert!(ok, "render {sets:?}: {line}");
        }
        let docs = yaml_docs(&rendered);
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert!(kinds.contains("DaemonSet") && kinds.contains("ClusterRole") && kinds.contains("Role"), "{kinds:?}");
        if sets.contains(&"serviceMonitor.enabled=true") {
            assert!(kinds.contains("ServiceMonitor") && kinds.contains("Service"), "{kinds:?}");
        }
        let policy = kinds.contains("ValidatingAdmissionPolicy") && kinds.contains("ValidatingAdmissionPolicyBinding");
        assert_eq!(policy, !sets.contains(&"admissionPolicy.enabled=false"), "{sets:?}: {kinds:?}");
        let caller = docs.iter().any(|d| d["metadata"]["name"] == "psd-api-caller");
        assert_eq!(caller, !sets.contains(&"rbac.apiCallerRole=false"), "{sets:?}");
    }
    // Before 1.30 the chart stops with a message instead of a resource the cluster cannot take.
    let old = Command::new(&helm)
        .args(["template", "psd"])
        .arg(deploy("helm/polarstack-daemon"))
        .args(["--namespace", NS, "--kube-version", "1.29.0"])
        .output()
        .expect("helm");
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(!old.status.success() && err.contains("admissionPolicy.enabled=false"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);

    // The chart and the plain manifests grant the same and run alike.
    let plain = manifest_docs();
    let chart = yaml_docs(&helm_template(&helm, &[]));
    let sorted = |docs: &[Value]| -> BTreeSet<String> { rbac_rules(docs).iter().map(|r| format!("{r:?}")).collect() };
    assert_eq!(sorted(&chart), sorted(&plain), "chart RBAC == deploy/manifests RBAC");
    for docs in [&plain, &chart] {
        assert_bound_built_ins(docs);
    }
    assert_api_caller_role(&plain, "polarstack-daemon-api-caller");
    assert_api_caller_role(&chart, "psd-api-caller");
    assert_eq!(capabilities(&chart), capabilities(&plain));
    for docs in [&plain, &chart] {
        let ds = daemonset(docs);
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(ds["metadata"]["name"], "polarstack-daemon");
        assert_eq!(ds["metadata"]["namespace"], NS);
        assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], "10%");
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        // Its own ServiceAccount, which both roles bind and nothing else does.
        assert_eq!(pod["serviceAccountName"], SERVICE_ACCOUNT);
        assert_service_account(docs, SERVICE_ACCOUNT, NS);
        assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
        // The socket iterator walks the tasks of its PID namespace: only the
        // host's has every socket (kernels before 6.5).
        assert_eq!(pod["hostPID"], true);
        let c = container(docs);
        let sc = &c["securityContext"];
        assert_eq!((&sc["privileged"], &sc["readOnlyRootFilesystem"]), (&json!(false), &json!(true)));
        assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": 8900}));
        assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": 8900}));
        assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        let args = strs(&c["args"]);
        assert!(args.contains(&"--dbcluster-log-dir=/disk1/polardb/".into()), "{args:?}");
        assert!(args.contains(&"--ins-folder-overdue-days=7".into()), "{args:?}");
        let mounts: BTreeMap<String, bool> = c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .map(|m| (m["mountPath"].as_str().unwrap_or_default().to_owned(), m["readOnly"] == true))
            .collect();
        assert_eq!(mounts.get("/sys/fs/cgroup"), Some(&true), "{mounts:?}");
        assert_eq!(mounts.get("/disk1/polardb"), Some(&false), "{mounts:?}");
        assert_eq!(mounts.get("/var/run/docker.sock"), Some(&true), "{mounts:?}");
        assert_eq!(mounts.get("/run/containerd/containerd.sock"), Some(&true), "{mounts:?}");
    }
    // The same admission policy in both (the chart's names follow the release).
    let spec_of = |docs: &[Value], kind: &str| -> Value {
        docs.iter().find(|d| d["kind"] == kind).map(|d| d["spec"].clone()).unwrap_or_else(|| panic!("no {kind}"))
    };
    assert_eq!(spec_of(&chart, "ValidatingAdmissionPolicy"), spec_of(&plain, "ValidatingAdmissionPolicy"));
    let binding = |docs: &[Value]| {
        let mut b = spec_of(docs, "ValidatingAdmissionPolicyBinding");
        b["policyName"] = Value::Null;
        b
    };
    assert_eq!(binding(&chart), binding(&plain));
    // The ServiceAccount's name can be set (the Go daemon's, to keep it): the
    // DaemonSet, the bindings and the policy follow it and the namespace.
    let renamed = yaml_docs(&helm_template_in(&helm, "polar", &["serviceAccount.name=psd-sa"]));
    assert_eq!(daemonset(&renamed)["spec"]["template"]["spec"]["serviceAccountName"], "psd-sa");
    assert_service_account(&renamed, "psd-sa", "polar");
    let cond = &spec_of(&renamed, "ValidatingAdmissionPolicy")["matchConditions"][0]["expression"];
    assert!(cond.as_str().is_some_and(|c| c.contains("'system:serviceaccount:polar:psd-sa'")), "{cond}");

    // The fallback switch: privileged, no capability list.
    let fallback = yaml_docs(&helm_template(&helm, &["securityContext.privileged=true"]));
    let sc = &container(&fallback)["securityContext"];
    assert_eq!((&sc["privileged"], &sc["capabilities"]), (&json!(true), &Value::Null));
}

/// `docs` create ServiceAccount `name` in `namespace`, and every RoleBinding
/// and ClusterRoleBinding binds exactly it.
fn assert_service_account(docs: &[Value], name: &str, namespace: &str) {
    let sa = docs.iter().find(|d| d["kind"] == "ServiceAccount").expect("a ServiceAccount");
    assert_eq!((&sa["metadata"]["name"], &sa["metadata"]["namespace"]), (&json!(name), &json!(namespace)));
    let bindings: Vec<&Value> =
        docs.iter().filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding").collect();
    assert_eq!(bindings.len(), 3, "one binding per role of the daemon, and system:auth-delegator");
    for b in bindings {
        let want = json!([{"kind": "ServiceAccount", "name": name, "namespace": namespace}]);
        assert_eq!(b["subjects"], want, "{}", b["metadata"]["name"]);
    }
}

fn seed(api: &FakeApi) {
    api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}));
    api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-s"},
        "status": {"conditions": [{"type": "StandbyIP", "status": "True", "reason": "x", "message": "192.0.2.77"}]}}));
    api.put(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pg-1", "namespace": "db",
            "labels": {"apsara.metric.ins_id": "1001"}},
        "spec": {"nodeName": "node-s", "containers": [{"name": "pg", "image": "pg"}]}}));
    api.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "polardb4mpd-controller", "namespace": NS, "annotations": {"r": "20000-20010"}}}));
    api.put(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "controller-config", "namespace": NS},
        "data": {"enablePrintPort": "true", "isCheckOObIP": "true"}}),
    );
    api.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ccm-config", "namespace": NS},
        "data": {"NET_CARD_NAME": "lo"}}));
}

fn condition(api: &FakeApi, t: &str) -> Option<Value> {
    let n = api.get("nodes", None, NODE)?;
    n["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == t).cloned()
}

fn cluster_daemon(api: &FakeApi) -> Daemon {
    let kc = api.kubeconfig_path().to_str().expect("utf-8").to_owned();
    let logs = std::env::temp_dir().join(format!("deploy-rbac-logs-{}", std::process::id()));
    std::fs::create_dir_all(&logs).expect("log root");
    let mut d = Daemon::start(&[
        "--kubeconfig",
        &kc,
        "--current-node-name",
        NODE,
        "--publish-debounce",
        "50ms",
        "--dbcluster-log-dir",
        logs.to_str().expect("utf-8"),
        "--log-sweep-interval",
        "1s",
    ]);
    d.wait_ready();
    d
}

/// The daemon does everything it does in a cluster with exactly the RBAC of
/// deploy/ (parsed from the manifests), and none of its requests is refused;
/// every verb of every rule is the only grant for some request it made (so
/// none could go); without the nodes/status rule, its requests are refused.
/// The fake API server authorizes as a real one: a watch by name as that
/// name, a server-side apply that creates as `create` too.
#[test]
fn rbac_of_the_manifests_is_what_the_daemon_needs() {
    let rules = rbac_rules(&manifest_docs());
    in_new_netns(move || {
        let api = FakeApi::start();
        seed(&api);
        // system:auth-delegator, the built-in role the manifests bind, as
        // kube-apiserver defines it.
        let delegator =
            [RbacRule::new(&["create"], &["tokenreviews"]), RbacRule::new(&["create"], &["subjectaccessreviews"])];
        api.set_rbac(Some(rules.iter().cloned().chain(delegator).collect()));
        api.add_user("ops-token", "ops@example.com", &["ops"]);
        api.grant("ops@example.com", "post", "/api/v2/logs/sweep");
        api.add_user("other-token", "other@example.com", &[]);
        let mut d = cluster_daemon(&api);
        let usage = format!("cloud-provider-port-usage-{NODE}");
        let ok = wait_for(SOON, || {
            api.get("configmaps", Some(NS), &usage).is_some()
                && condition(&api, "NodeRefreshFlag").is_some_and(|c| c["status"] == "True")
                && condition(&api, "NodeOobIP").is_some()
        });
        assert!(ok, "port usage ConfigMap / NodeRefreshFlag not written\n{}", d.log_text());
        // GetStandByIp: a pod in another namespace, then its node.
        let (code, v) = d.get("/api/v1/GetStandByIp?podName=pg-1&namespace=db").expect("GetStandByIp");
        assert_eq!((code, v["data"].clone()), (200, json!("192.0.2.77")), "{v}");
        // The log sweep's live-instance pod list ran (rule 1 needs it).
        assert!(wait_for(SOON, || d.get("/api/v2/logs/last-sweep").is_ok_and(|(s, _)| s == 200)), "{}", d.log_text());
        // A cluster-wide rescan: the rescan ConfigMap is created by server-side apply.
        let (code, v) = d.post("/api/v1/RequestCheckCoreVersion").expect("RequestCheckCoreVersion");
        assert_eq!(code, 200, "{v}");
        let bus = wait_for(SOON, || api.get("configmaps", Some(NS), "polarstack-daemon-rescan").is_some());
        assert!(bus, "rescan ConfigMap not written\n{}", d.log_text());
        let availability = format!("polarstack-daemon-version-availability-{NODE}");
        let published = wait_for(SOON, || api.get("configmaps", Some(NS), &availability).is_some());
        assert!(published, "availability ConfigMap not written\n{}", d.log_text());
        // A caller the cluster grants the sweep gets one; another is refused:
        // the daemon's own identity may ask the API server about both.
        let (code, v) = d.post_as("/api/v2/logs/sweep?dry_run=true", Some("ops-token")).expect("sweep");
        assert_eq!(code, 200, "{v}\n{}", d.log_text());
        let (code, v) = d.post_as("/api/v2/logs/sweep?dry_run=true", Some("other-token")).expect("sweep");
        assert_eq!(code, 403, "{v}");
        let reqs = api.requests();
        let denied: Vec<_> = reqs.iter().filter(|r| r.denied).collect();
        assert!(denied.is_empty(), "requests outside deploy/'s RBAC: {denied:#?}\n{}", d.log_text());
        let kinds: BTreeSet<(String, String)> = reqs
            .iter()
            .map(|r| {
                (r.method.clone(), r.path.split('/').filter(|s| !s.is_empty()).take(4).collect::<Vec<_>>().join("/"))
            })
            .collect();
        eprintln!("requests made with deploy/'s RBAC: {kinds:?}");
        let checks: Vec<AuthzCheck> = reqs.iter().flat_map(|r| r.authorization.clone()).collect();
        assert_every_verb_used(&rules, &checks);
        let _ = d.terminate();

        // Negative: the same daemon without the nodes/status rule is refused.
        let api2 = FakeApi::start();
        seed(&api2);
        let fewer: Vec<RbacRule> =
            rules.iter().filter(|r| !r.resources.iter().any(|x| x == "nodes/status")).cloned().collect();
        assert_eq!(fewer.len() + 1, rules.len(), "exactly one rule removed");
        api2.set_rbac(Some(fewer));
        let d2 = cluster_daemon(&api2);
        let refused = wait_for(SOON, || api2.requests().iter().any(|r| r.denied && r.path.ends_with("/status")));
        assert!(refused, "no request refused without the nodes/status rule");
        assert!(condition(&api2, "NodeRefreshFlag").is_none(), "nothing written without the rule");
        let denied_metric = d2.metrics().lines().any(|l| {
            l.starts_with("polarstack_kube_requests_total{") && l.contains("result=\"denied\"") && !l.ends_with(" 0")
        });
        assert!(denied_metric, "denials counted in /metrics:\n{}", d2.metrics());
    });
}

/// Each verb of each rule allows some decision in `checks` that no other
/// (rule, verb) allows: taking it away would refuse a request the daemon made.
fn assert_every_verb_used(rules: &[RbacRule], checks: &[AuthzCheck]) {
    let single = |r: &RbacRule, v: &str| RbacRule { verbs: vec![v.to_owned()], ..r.clone() };
    let grants: Vec<(usize, RbacRule)> =
        rules.iter().enumerate().flat_map(|(i, r)| r.verbs.iter().map(move |v| (i, single(r, v)))).collect();
    for (i, grant) in &grants {
        let needed = checks.iter().find(|c| {
            c.allowed
                && grant.allows_check(c)
                && !grants.iter().any(|(j, g)| (j, &g.verbs) != (i, &grant.verbs) && g.allows_check(c))
        });
        match needed {
            Some(c) => eprintln!(
                "{} {:?}: needed for {} {:?}/{:?}",
                grant.verbs[0], grant.resources, c.verb, c.namespace, c.name
            ),
            None => panic!(
                "verb {:?} of rule {:?} allows no request that another rule does not: drop it\n{checks:#?}",
                grant.verbs, rules[*i]
            ),
        }
    }
}

/// Sets a file's mtime `days` in the past.
fn age(path: &Path, days: u64) {
    let t = SystemTime::now() - Duration::from_secs(days * 86_400);
    let f = std::fs::File::options().write(true).open(path).or_else(|_| std::fs::File::open(path)).expect("open");
    f.set_modified(t).expect("set mtime");
}

/// A log root with one instance whose old engine log belongs to another user
/// in directories only that user may write, as a database's are.
fn foreign_log_tree(name: &str) -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let log_dir = root.join("1001/log");
    std::fs::create_dir_all(&log_dir).expect("tree");
    let old = log_dir.join("postgresql-2020-01-01.log");
    std::fs::write(&old, "old\n").expect("log");
    age(&old, 30);
    for p in [&old, &log_dir, &root.join("1001")] {
        std::os::unix::fs::chown(p, Some(1000), Some(1000)).expect("chown");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    (root, old)
}

fn setpriv_with(caps: &BTreeSet<String>) -> Command {
    let list: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let mut c = Command::new("setpriv");
    c.arg("--bounding-set").arg(format!("-all,{}", list.join(","))).args(["--inh-caps", "-all", "--"]);
    c
}

/// The manifest's capability set (and nothing else) is enough for eBPF and
/// for the log sweeper to remove another user's files; without
/// DAC_OVERRIDE the sweeper cannot.
#[test]
fn the_manifest_capabilities_run_ebpf_and_the_sweeper() {
    let Some(_) = tool("setpriv") else { return };
    let caps = capabilities(&manifest_docs());
    in_new_netns(move || {
        let (root, old) = foreign_log_tree("deploy-caps");
        let root_s = root.to_str().expect("utf-8").to_owned();
        let args = ["--dbcluster-log-dir", &root_s, "--ins-folder-overdue-days", "7", "--log-sweep-interval", "1s"];
        let mut d = Daemon::start_with(setpriv_with(&caps), &args);
        d.wait_ready();
        let (_, ready) = d.get("/readyz").expect("readyz");
        assert_eq!(
            ready["ports"]["mode"],
            "ebpf",
            "the manifest's capabilities {caps:?} must load eBPF: {ready}\n{}",
            d.log_text()
        );
        assert!(wait_for(SOON, || !old.exists()), "old log of another user kept:\n{}", d.log_text());
        let _ = d.terminate();

        // Without DAC_OVERRIDE: the same tree is left alone, with errors.
        let (root2, old2) = foreign_log_tree("deploy-caps-nodac");
        let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != "dac_override").cloned().collect();
        let root2_s = root2.to_str().expect("utf-8").to_owned();
        let args2 = ["--dbcluster-log-dir", &root2_s, "--ins-folder-overdue-days", "7", "--log-sweep-interval", "1s"];
        let d2 = Daemon::start_with(setpriv_with(&fewer), &args2);
        assert!(wait_for(SOON, || d2.get("/api/v2/logs/last-sweep").is_ok_and(|(s, _)| s == 200)));
        assert!(old2.exists(), "removed without DAC_OVERRIDE: then the capability would not be needed");
        drop(d2);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&root2);
    });
}

fn xtask_bin() -> PathBuf {
    std::env::var_os("XTASK_BIN").map(PathBuf::from).unwrap_or_else(|| repo().join("target/debug/xtask"))
}

/// Docker's default capabilities (what `ctr run` starts from).
const RUNTIME_DEFAULT_CAPS: &[&str] = &[
    "chown",
    "dac_override",
    "fsetid",
    "fowner",
    "mknod",
    "net_raw",
    "setgid",
    "setuid",
    "setfcap",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "kill",
    "audit_write",
];

fn cap_names(mask: u64) -> BTreeSet<String> {
    const NAMES: [&str; 41] = [
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "kill",
        "setgid",
        "setuid",
        "setpcap",
        "linux_immutable",
        "net_bind_service",
        "net_broadcast",
        "net_admin",
        "net_raw",
        "ipc_lock",
        "ipc_owner",
        "sys_module",
        "sys_rawio",
        "sys_chroot",
        "sys_ptrace",
        "sys_pacct",
        "sys_admin",
        "sys_boot",
        "sys_nice",
        "sys_resource",
        "sys_time",
        "sys_tty_config",
        "mknod",
        "lease",
        "audit_write",
        "audit_control",
        "setfcap",
        "mac_override",
        "mac_admin",
        "syslog",
        "wake_alarm",
        "block_suspend",
        "audit_read",
        "perfmon",
        "bpf",
        "checkpoint_restore",
    ];
    NAMES.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, n)| n.to_string()).collect()
}

/// `cargo xtask image` builds the offline image into a private dockerd; it
/// prints its version and serves /healthz under docker (standalone), and
/// under containerd (what kubelet drives) it runs eBPF with exactly the
/// manifest's capabilities, mounts and a read-only root.
#[test]
fn the_offline_image_runs_in_dockerd_and_containerd() {
    if !runtimes::available() {
        eprintln!("SKIP: docker.io not installed");
        return;
    }
    let xtask = xtask_bin();
    assert!(xtask.is_file(), "{} not built: run the tests with `cargo xtask test`", xtask.display());
    let caps = capabilities(&manifest_docs());
    in_new_netns(move || {
        let rt = Runtimes::start();
        let tag = "polardb/polarstack-daemon:deploy-test";
        let bin = polarstack_tests::daemon_bin();
        run(Command::new(&xtask)
            .args(["image", "--binary"])
            .arg(&bin)
            .args(["--tag", tag, "--no-save"])
            .env("DOCKER_HOST", rt.docker_host()));

        let out = run(&mut rt.docker(&["run", "--rm", "--network", "host", tag, "--version"]));
        let version = String::from_utf8_lossy(&out.stdout);
        assert_eq!(version.trim(), format!("polarstack-daemon {}", env!("CARGO_PKG_VERSION")));

        // Standalone under docker: a read-only root, the host network (this
        // test's namespace), no eBPF.
        let port = "18911";
        let id = run(&mut rt.docker(&[
            "run",
            "-d",
            "--network",
            "host",
            "--read-only",
            tag,
            "--disable-ebpf",
            "--port",
            port,
            "--listen-address",
            "127.0.0.1",
        ]));
        let id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
        let healthy = wait_for(SOON, || http_status(port, "/healthz") == Some(200));
        let logs = rt.docker(&["logs", &id]).output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
        assert!(healthy, "/healthz of the container: {logs:?}");
        run(&mut rt.docker(&["rm", "-f", &id]));

        // Under containerd, as kubelet runs it: the manifest's capabilities
        // (dockerd 20.10 does not know CAP_BPF/CAP_PERFMON; containerd does),
        // its cgroup and tracefs mounts, a read-only root.
        rt.ctr_import_from_docker(tag);
        let image = format!("docker.io/{tag}");
        let mut ctr = rt.ctr(&["run", "--rm", "--net-host", "--read-only"]);
        for c in RUNTIME_DEFAULT_CAPS.iter().filter(|c| !caps.contains(**c)) {
            ctr.args(["--cap-drop", &format!("CAP_{}", c.to_ascii_uppercase())]);
        }
        for c in &caps {
            ctr.args(["--cap-add", &format!("CAP_{}", c.to_ascii_uppercase())]);
        }
        ctr.args(["--mount", "type=bind,src=/sys/fs/cgroup,dst=/sys/fs/cgroup,options=rbind:ro"]);
        if Path::new("/sys/kernel/tracing/events").exists() {
            ctr.args(["--mount", "type=bind,src=/sys/kernel/tracing,dst=/sys/kernel/tracing,options=rbind:ro"]);
        }
        let port = "18912";
        ctr.args([
            &image,
            "deploy-test",
            "/usr/local/bin/polarstack-daemon",
            "--port",
            port,
            "--listen-address",
            "127.0.0.1",
        ]);
        let log = rt.dir.path().join("ctr-run.log");
        let mut child =
            ctr.stdout(Stdio::null()).stderr(std::fs::File::create(&log).expect("log")).spawn().expect("ctr run");
        let ready = wait_for(Duration::from_secs(30), || http_status(port, "/readyz") == Some(200));
        let body = http_body(port, "/readyz");
        let pid = String::from_utf8_lossy(&run(&mut rt.ctr(&["task", "ls"])).stdout)
            .lines()
            .find(|l| l.starts_with("deploy-test"))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned));
        let eff = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok()).and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:").and_then(|h| u64::from_str_radix(h.trim(), 16).ok()))
        });
        let _ = rt.ctr(&["task", "kill", "-s", "SIGKILL", "deploy-test"]).status();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(ready, "container not ready: {body}\n{log}");
        assert_eq!(eff.map(cap_names), Some(caps.clone()), "the container's effective capabilities");
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(v["ports"]["mode"], "ebpf", "eBPF in the container with {caps:?}: {body}\n{log}");
    });
}

fn http_get(port: &str, path: &str) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let mut r = agent.get(&format!("http://127.0.0.1:{port}{path}")).call().ok()?;
    let status = r.status().as_u16();
    Some((status, r.body_mut().read_to_string().unwrap_or_default()))
}

fn http_status(port: &str, path: &str) -> Option<u16> {
    http_get(port, path).map(|(s, _)| s)
}

fn http_body(port: &str, path: &str) -> String {
    http_get(port, path).map(|(_, b)| b).unwrap_or_default()
}

/// Metric family names in a Prometheus text exposition (from `# TYPE`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Metric names that PromQL `expr` refers to (identifiers starting with
/// polarstack_ or named `up`), with histogram/summary suffixes folded.
fn metric_refs(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if expr[i..].starts_with("polarstack_")
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let end = expr[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(expr.len(), |n| i + n);
            out.insert(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The engine metric the engines work exports (not in this scrape).
const KNOWN_ELSEWHERE: &[&str] = &["polarstack_engines_runtime_up"];

fn known(name: &str, live: &BTreeSet<String>) -> bool {
    let base = ["_sum", "_count", "_bucket"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    live.contains(name) || live.contains(base) || KNOWN_ELSEWHERE.contains(&name)
}

/// Live /metrics, standalone and in cluster mode, pass `promtool check
/// metrics`; the rules pass `promtool check rules` and their unit tests; every
/// metric the rules and the dashboard use exists.
#[test]
fn rules_metrics_and_dashboard_agree() {
    let Some(promtool) = tool("promtool") else { return };
    let scrapes = in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api);
        let standalone = {
            let mut d =
                Daemon::start(&["--dbcluster-log-dir", "/nonexistent-deploy-test", "--log-sweep-interval", "1s"]);
            d.wait_ready();
            assert!(wait_for(SOON, || d.get("/api/v2/logs/last-sweep").is_ok_and(|(s, _)| s == 200)));
            let m = d.metrics();
            let _ = d.terminate();
            m
        };
        let d = cluster_daemon(&api);
        let wrote = wait_for(SOON, || {
            d.metrics()
                .lines()
                .any(|l| l.starts_with("polarstack_kube_write_duration_seconds_count ") && !l.ends_with(" 0"))
        });
        assert!(wrote, "no Kubernetes write counted:\n{}", d.metrics());
        (standalone, d.metrics())
    });
    let mut live = BTreeSet::new();
    for text in [&scrapes.0, &scrapes.1] {
        let out = run_stdin(Command::new(&promtool).args(["check", "metrics"]), text.as_bytes());
        let lint = String::from_utf8_lossy(&out.stderr);
        assert!(lint.trim().is_empty(), "promtool check metrics: {lint}\n{text}");
        live.extend(families(text));
    }
    assert!(live.contains("polarstack_kube_write_duration_seconds"), "{live:?}");

    let rules = deploy("prometheus/rules.yaml");
    run(Command::new(&promtool).arg("check").arg("rules").arg(&rules));
    run(Command::new(&promtool).args(["test", "rules"]).arg(deploy("prometheus/rules.test.yaml")));
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&rules).expect("rules")).expect("rules YAML");
    let mut alerts = BTreeSet::new();
    for g in doc["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            alerts.insert(r["alert"].as_str().unwrap_or_default().to_owned());
            for m in metric_refs(r["expr"].as_str().expect("expr")) {
                assert!(known(&m, &live), "rule {} uses {m}, which /metrics does not have", r["alert"]);
            }
        }
    }
    for a in [
        "PolarstackDaemonDown",
        "PolarstackDaemonEbpfDegraded",
        "PolarstackDaemonLostEvents",
        "PolarstackDaemonPublishPending",
        "PolarstackDaemonApiErrors",
        "PolarstackDaemonLogSweepErrors",
        "PolarstackDaemonLogSweepStale",
        "PolarstackDaemonRuntimeUnreachable",
    ] {
        assert!(alerts.contains(a), "alert {a} missing: {alerts:?}");
    }

    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/polarstack-daemon.json")).expect("dashboard"))
            .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "dashboard panels: {exprs:?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let refs = metric_refs(e);
        assert!(!refs.is_empty() || e.contains("up{"), "a query with no metric: {e}");
        for m in refs {
            assert!(known(&m, &live), "dashboard query {e:?} uses {m}, which /metrics does not have");
            used.insert(m);
        }
    }
    for must in [
        "polarstack_ports_mode",
        "polarstack_ports_lost_events_total",
        "polarstack_kube_requests_total",
        "polarstack_kube_publish_pending",
        "polarstack_logs_sweep_errors_total",
        "polarstack_engines_runtime_up",
    ] {
        assert!(used.contains(must), "the dashboard shows no {must}");
    }
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    out.extend(x.as_str().map(str::to_owned));
                } else {
                    collect_exprs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// The tools venv's python when it has cel-expr-python, or None (skip) outside CI.
fn cel_python() -> Option<PathBuf> {
    let python = tools().join("venv/bin/python");
    let ok = Command::new(&python).args(["-c", "import cel_expr_python"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        !in_ci(),
        "cel-expr-python is missing ({}): `cargo xtask setup` installs it; required under CI",
        python.display()
    );
    eprintln!("SKIP: cel-expr-python not installed (run `cargo xtask setup`)");
    None
}

/// What the admission chain makes of one request under a policy.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// The policy does not apply (another user, another resource).
    NotMatched,
    Allowed,
    /// Refused, with a message containing this.
    Denied(&'static str),
}

/// Evaluates policies (each with its binding) against cases, with the real
/// CEL of tests/cel/admission.py; one entry per run, an Err where the run
/// failed (a compile error, something unsupported).
fn evaluate_policies(python: &Path, runs: &[(&Value, &Value, &[Value])]) -> (String, Vec<Result<Vec<Value>, String>>) {
    let input = json!({"runs": runs.iter().map(|(p, b, c)| json!({"policy": p, "binding": b, "cases": c})).collect::<Vec<_>>()});
    let script = repo().join("tests/cel/admission.py");
    let out = run_stdin(Command::new(python).arg(script), input.to_string().as_bytes());
    let doc: Value = serde_json::from_slice(&out.stdout).expect("the evaluator prints JSON");
    let results = doc["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| match r.as_array() {
            Some(a) => Ok(a.clone()),
            None => Err(r["error"].as_str().unwrap_or("no result").to_owned()),
        })
        .collect();
    (doc["implementation"].as_str().unwrap_or_default().to_owned(), results)
}

/// The user info a pod-bound service-account token gives (Kubernetes 1.30+),
/// with the node claim when `node` is set.
fn sa_user(username: &str, node: Option<&str>) -> Value {
    let mut extra = json!({
        "authentication.kubernetes.io/credential-id": ["JTI=6c1f2e0a-0d7b-4c43-9f0e-3b1b7d9f4a11"],
        "authentication.kubernetes.io/pod-name": ["polarstack-daemon-x7k2q"],
        "authentication.kubernetes.io/pod-uid": ["0b7f8c2e-5a9d-4f61-8e3a-2c4d6e8f0a1b"],
    });
    if let Some(n) = node {
        extra["authentication.kubernetes.io/node-name"] = json!([n]);
        extra["authentication.kubernetes.io/node-uid"] = json!(["5d3c1a9e-7b2f-4e08-a6c4-9f1e3d5b7a20"]);
    }
    let ns = username.split(':').nth(2).unwrap_or_default();
    json!({
        "username": username,
        "uid": "9a4e6c2b-1f3d-4b5a-8c7e-0d2f4a6b8c9e",
        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
        "extra": extra,
    })
}

/// An admission request as kube-apiserver hands it to a policy: the
/// AdmissionRequest through its JSON form, so empty fields are absent
/// (`namespace` of a Node, `extra` of a user without any), plus `object` and
/// `oldObject` for the operation (a PATCH is an UPDATE, or a CREATE when a
/// server-side apply creates).
fn admission(op: &str, resource: &str, namespace: Option<&str>, name: &str, user: Value) -> Value {
    let (plural, sub) = resource.split_once('/').map_or((resource, None), |(p, s)| (p, Some(s)));
    let kind = match plural {
        "configmaps" => "ConfigMap",
        "secrets" => "Secret",
        _ => "Node",
    };
    let mut meta = json!({"name": name, "uid": "7e1d3b5f-9a2c-4e6b-8d0f-1a3c5e7b9d2f", "resourceVersion": "41"});
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    let old = json!({"apiVersion": "v1", "kind": kind, "metadata": meta});
    let mut new = old.clone();
    new["metadata"]["resourceVersion"] = json!("42");
    if kind == "ConfigMap" {
        new["data"] = json!({"30001": "the port already use"});
    } else {
        new["status"] = json!({"conditions": [{"type": "NodeRefreshFlag", "status": "True", "reason": "Refresh", "message": "Refresh"}]});
    }
    let options = match op {
        "CREATE" => {
            json!({"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "polarstack-daemon"})
        }
        "UPDATE" => {
            json!({"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "polarstack-daemon"})
        }
        _ => json!({"kind": "DeleteOptions", "apiVersion": "meta.k8s.io/v1"}),
    };
    let gvk = json!({"group": "", "version": "v1", "kind": kind});
    let gvr = json!({"group": "", "version": "v1", "resource": plural});
    let mut user = user;
    if user["extra"].as_object().is_some_and(|m| m.is_empty()) {
        user.as_object_mut().map(|u| u.remove("extra"));
    }
    let mut request = json!({
        "uid": "3f2a1c4e-6b8d-4a0f-9e1c-5d7b9f1a3c5e",
        "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
        "name": name, "operation": op, "userInfo": user, "dryRun": false, "options": options,
    });
    if let Some(ns) = namespace {
        request["namespace"] = json!(ns);
    }
    if let Some(s) = sub {
        request["subResource"] = json!(s);
        request["requestSubResource"] = json!(s);
    }
    let (object, old_object) = match op {
        "CREATE" => (new, Value::Null),
        "UPDATE" => (new, old),
        _ => (Value::Null, old),
    };
    json!({"request": request, "object": object, "oldObject": old_object})
}

const OWN_CONFIGMAPS: &str = "may write only these ConfigMaps";
const OWN_NODE: &str = "may write only its own Node";
const NO_NODE: &str = "carries no node name";

/// One admission case: its name, the request (with `object` and
/// `oldObject`), and what the policy must make of it.
type Case = (String, Value, Verdict);

/// The requests the policy is judged on, with what it must make of each, for
/// a daemon whose ServiceAccount user is `daemon`.
fn policy_cases(daemon: &str) -> Vec<Case> {
    use Verdict::{Allowed, Denied, NotMatched};
    let on = |node: &str| sa_user(daemon, Some(node));
    let usage = |n: &str| format!("cloud-provider-port-usage-{n}");
    let avail = |n: &str| format!("polarstack-daemon-version-availability-{n}");
    let bus = "polarstack-daemon-rescan".to_string();
    let cm = |op: &str, ns: &str, name: &str, user: Value| admission(op, "configmaps", Some(ns), name, user);
    let status = |name: &str, user: Value| admission("UPDATE", "nodes/status", None, name, user);
    let without = |f: &dyn Fn(&mut Value)| {
        let mut u = sa_user(daemon, None);
        f(&mut u);
        u
    };
    let two_nodes = without(&|u| u["extra"]["authentication.kubernetes.io/node-name"] = json!(["node-a", "node-b"]));
    let empty_nodes = without(&|u| u["extra"]["authentication.kubernetes.io/node-name"] = json!([]));
    let no_extra = without(&|u| u["extra"] = json!({}));
    let other = |user: &str| json!({"username": user, "groups": ["system:authenticated"]});
    let cases: Vec<(&str, Value, Verdict)> = vec![
        // Its own objects, as the daemon writes them.
        ("apply creates own port usage", cm("CREATE", NS, &usage("node-a"), on("node-a")), Allowed),
        ("apply/merge patch of own port usage", cm("UPDATE", NS, &usage("node-a"), on("node-a")), Allowed),
        ("apply creates own availability", cm("CREATE", NS, &avail("node-a"), on("node-a")), Allowed),
        ("apply of own availability", cm("UPDATE", NS, &avail("node-a"), on("node-a")), Allowed),
        ("apply creates the rescan bus", cm("CREATE", NS, &bus, on("node-a")), Allowed),
        ("apply of the rescan bus", cm("UPDATE", NS, &bus, on("node-b")), Allowed),
        ("patch of own Node status", status("node-a", on("node-a")), Allowed),
        ("own availability, node name lowercased", cm("UPDATE", NS, &avail("node-c"), on("Node-C")), Allowed),
        ("own port usage, node name as is", cm("UPDATE", NS, &usage("Node-C"), on("Node-C")), Allowed),
        // Anything else.
        ("another node's port usage", cm("UPDATE", NS, &usage("node-b"), on("node-a")), Denied(OWN_CONFIGMAPS)),
        (
            "creating another node's availability",
            cm("CREATE", NS, &avail("node-b"), on("node-a")),
            Denied(OWN_CONFIGMAPS),
        ),
        (
            "a name that only starts like its own",
            cm("UPDATE", NS, &usage("node-ab"), on("node-a")),
            Denied(OWN_CONFIGMAPS),
        ),
        ("availability without lowercasing", cm("UPDATE", NS, &avail("Node-C"), on("Node-C")), Denied(OWN_CONFIGMAPS)),
        ("ccm-config (read, never written)", cm("UPDATE", NS, "ccm-config", on("node-a")), Denied(OWN_CONFIGMAPS)),
        ("controller-config", cm("UPDATE", NS, "controller-config", on("node-a")), Denied(OWN_CONFIGMAPS)),
        (
            "creating polardb4mpd-controller",
            cm("CREATE", NS, "polardb4mpd-controller", on("node-a")),
            Denied(OWN_CONFIGMAPS),
        ),
        (
            "own port usage in another namespace",
            cm("CREATE", "default", &usage("node-a"), on("node-a")),
            Denied(OWN_CONFIGMAPS),
        ),
        (
            "deleting another node's port usage",
            cm("DELETE", NS, &usage("node-b"), on("node-a")),
            Denied(OWN_CONFIGMAPS),
        ),
        ("another Node's status", status("node-b", on("node-a")), Denied(OWN_NODE)),
        ("this Node's status from another node", status("node-a", on("node-b")), Denied(OWN_NODE)),
        ("another Node itself", admission("UPDATE", "nodes", None, "node-b", on("node-a")), Denied(OWN_NODE)),
        // No node in the token: refused, whatever the object.
        ("no extra at all", cm("UPDATE", NS, &usage("node-a"), no_extra.clone()), Denied(NO_NODE)),
        ("no extra, the rescan bus", cm("CREATE", NS, &bus, no_extra), Denied(NO_NODE)),
        ("extra without node-name", status("node-a", sa_user(daemon, None)), Denied(NO_NODE)),
        ("an empty node-name", cm("UPDATE", NS, &bus, empty_nodes), Denied(NO_NODE)),
        ("two node names", cm("UPDATE", NS, &usage("node-a"), two_nodes), Denied(NO_NODE)),
        // Other users and other resources are not the policy's business.
        ("kubelet on its Node", status("node-b", other("system:node:node-b")), NotMatched),
        (
            "the cloud controller's account",
            cm(
                "UPDATE",
                NS,
                &usage("node-b"),
                sa_user("system:serviceaccount:kube-system:cloud-controller-manager", Some("node-a")),
            ),
            NotMatched,
        ),
        ("an administrator", cm("UPDATE", NS, "ccm-config", other("kubernetes-admin")), NotMatched),
        (
            "a longer account name",
            cm("UPDATE", NS, &usage("node-b"), sa_user(&format!("{daemon}-x"), Some("node-a"))),
            NotMatched,
        ),
        ("a daemon's secret (not matched)", admission("UPDATE", "secrets", Some(NS), "x", on("node-a")), NotMatched),
    ];
    cases.into_iter().map(|(n, c, v)| (n.to_owned(), c, v)).collect()
}

/// The cases whose outcome differs from the expected one, described.
fn mismatches(cases: &[Case], results: &[Value]) -> Vec<String> {
    assert_eq!(cases.len(), results.len());
    let mut out = Vec::new();
    for ((name, _, want), got) in cases.iter().zip(results) {
        let message = got["message"].as_str().unwrap_or_default();
        let ok = match want {
            Verdict::NotMatched => got["matched"] == false && got["allowed"] == true,
            Verdict::Allowed => got["matched"] == true && got["allowed"] == true,
            Verdict::Denied(part) => got["allowed"] == false && message.contains(part),
        };
        if !ok {
            out.push(format!("{name}: expected {want:?}, got {got}"));
        }
    }
    out
}

/// The policy with `from` replaced by `to` in every string in it (an
/// expression, a resource, an operation, the failure policy); panics if
/// nothing changed, so a variant cannot silently stop being broken.
fn mutated(policy: &Value, from: &str, to: &str) -> Value {
    fn walk(v: &mut Value, from: &str, to: &str, hits: &mut usize) {
        match v {
            Value::String(s) if s.contains(from) => {
                *s = s.replace(from, to);
                *hits += 1;
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, from, to, hits)),
            Value::Object(m) => m.values_mut().for_each(|x| walk(x, from, to, hits)),
            _ => {}
        }
    }
    let mut out = policy.clone();
    let mut hits = 0;
    walk(&mut out, from, to, &mut hits);
    assert!(hits > 0, "the variant {from:?} -> {to:?} no longer applies to the policy: update the test");
    out
}

/// The admission policy of deploy/manifests and of the chart, evaluated with a
/// real CEL implementation: each daemon may write its own node's port-usage
/// and availability ConfigMaps, the rescan ConfigMap and its own Node status,
/// nothing else; without a node name in its token it may write nothing; other
/// users and resources are untouched. Each of a set of broken variants of the
/// policy fails some case, so the cases can tell.
#[test]
fn admission_policy_keeps_each_daemon_to_its_own_node() {
    let (Some(python), Some(helm)) = (cel_python(), tool("helm")) else { return };
    let find = |docs: &[Value], kind: &str| docs.iter().find(|d| d["kind"] == kind).cloned().expect(kind);
    let plain = manifest_docs();
    let chart = yaml_docs(&helm_template(&helm, &[]));
    let renamed = yaml_docs(&helm_template_in(&helm, "polar", &["serviceAccount.name=psd-sa"]));
    let daemon = format!("system:serviceaccount:{NS}:{SERVICE_ACCOUNT}");
    let cases = policy_cases(&daemon);
    let renamed_cases = policy_cases("system:serviceaccount:polar:psd-sa");
    // The default account's requests are none of the renamed policy's business.
    let not_theirs: Vec<Case> = cases
        .iter()
        .filter(|(_, c, _)| c["request"]["userInfo"]["username"] == daemon.as_str())
        .map(|(n, c, _)| (format!("default account under the renamed policy: {n}"), c.clone(), Verdict::NotMatched))
        .collect();
    let sources: Vec<(&str, Value, Value, &[Case])> = vec![
        (
            "deploy/manifests",
            find(&plain, "ValidatingAdmissionPolicy"),
            find(&plain, "ValidatingAdmissionPolicyBinding"),
            cases.as_slice(),
        ),
        (
            "helm template",
            find(&chart, "ValidatingAdmissionPolicy"),
            find(&chart, "ValidatingAdmissionPolicyBinding"),
            cases.as_slice(),
        ),
        (
            "helm template, renamed account",
            find(&renamed, "ValidatingAdmissionPolicy"),
            find(&renamed, "ValidatingAdmissionPolicyBinding"),
            renamed_cases.as_slice(),
        ),
        (
            "helm template, renamed account",
            find(&renamed, "ValidatingAdmissionPolicy"),
            find(&renamed, "ValidatingAdmissionPolicyBinding"),
            not_theirs.as_slice(),
        ),
    ];
    let case_values: Vec<Vec<Value>> = sources.iter().map(|s| s.3.iter().map(|c| c.1.clone()).collect()).collect();
    let runs: Vec<(&Value, &Value, &[Value])> =
        sources.iter().zip(&case_values).map(|(s, c)| (&s.1, &s.2, c.as_slice())).collect();
    let (implementation, results) = evaluate_policies(&python, &runs);
    assert!(implementation.starts_with("cel-expr-python "), "{implementation}");
    for ((label, _, _, cases), result) in sources.iter().zip(&results) {
        let result = result.as_ref().unwrap_or_else(|e| panic!("{label}: the policy did not evaluate: {e}"));
        let wrong = mismatches(cases, result);
        assert!(wrong.is_empty(), "{label}:\n{}", wrong.join("\n"));
    }
    let count = |v: fn(&Verdict) -> bool| cases.iter().filter(|c| v(&c.2)).count();
    eprintln!(
        "{implementation}: {} allowed, {} denied, {} not matched per policy; {} sources, {} evaluations",
        count(|v| *v == Verdict::Allowed),
        count(|v| matches!(v, Verdict::Denied(_))),
        count(|v| *v == Verdict::NotMatched),
        sources.len(),
        case_values.iter().map(Vec::len).sum::<usize>()
    );

    // Broken variants: each must fail at least one case.
    let (policy, binding) = (&sources[0].1, &sources[0].2);
    let broken = [
        ("no lowercasing", mutated(policy, "variables.node.lowerAscii()", "variables.node")),
        ("any Node", mutated(policy, "variables.name == variables.node", "variables.name != ''")),
        ("any namespace", mutated(policy, "request.namespace == 'kube-system'", "request.namespace != ''")),
        (
            "prefix match",
            mutated(
                policy,
                "variables.name in variables.ownConfigMaps",
                "variables.ownConfigMaps.exists(n, variables.name.startsWith(n))",
            ),
        ),
        ("no node needed", mutated(policy, "variables.node != ''", "true")),
        ("unguarded extra", mutated(policy, "has(request.userInfo.extra) &&", "")),
        ("first of several node names", mutated(policy, "== 1", ">= 1")),
        (
            "every service account",
            mutated(
                policy,
                "request.userInfo.username == ",
                "request.userInfo.username.startsWith('system:serviceaccount:') || '' == ",
            ),
        ),
        ("status not matched", mutated(policy, "nodes/status", "nodes/proxy")),
        ("deletes not matched", mutated(policy, "DELETE", "CONNECT")),
        ("fail open", mutated(&mutated(policy, "has(request.userInfo.extra) &&", ""), "Fail", "Ignore")),
        ("does not compile", mutated(policy, "variables.node != ''", "variables.node !=")),
    ];
    let runs: Vec<(&Value, &Value, &[Value])> =
        broken.iter().map(|(_, p)| (p, binding, case_values[0].as_slice())).collect();
    let (_, results) = evaluate_policies(&python, &runs);
    for ((what, _), result) in broken.iter().zip(&results) {
        match result {
            Err(e) => eprintln!("broken variant {what:?}: does not evaluate ({e})"),
            Ok(r) => {
                let wrong = mismatches(&cases, r);
                assert!(!wrong.is_empty(), "the broken variant {what:?} passes every case: the cases cannot tell");
                eprintln!("broken variant {what:?}: {} case(s) fail, e.g. {}", wrong.len(), wrong[0]);
            }
        }
    }
}
