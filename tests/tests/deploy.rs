//! deploy/: the manifests and the chart validate against Kubernetes schemas,
//! their RBAC is exactly what the daemon needs (the real binary against the
//! fake API server with authorization on), their capability set runs eBPF
//! and the log sweeper, the offline image runs in a real dockerd and
//! containerd, and the Prometheus rules, live /metrics and the Grafana
//! dashboard agree with each other.
//!
//! Tools: helm and kubernetes-validate from `cargo xtask setup` (under
//! DEPLOY_TOOLS, default target/tools), promtool, docker.io, setpriv. Without
//! one, a test is skipped with a note, except under CI, where it fails.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, SystemTime},
};

use polarstack_tests::{
    fake_api::{FakeApi, RbacRule},
    in_ci, in_new_netns, run_ok,
    runtimes::{self, Runtimes},
    wait_for, Daemon,
};
use serde::Deserialize;
use serde_json::{json, Value};

const NODE: &str = "node-a";
const NS: &str = "kube-system";
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

/// The Role and ClusterRole rules of `docs`, as the fake API server's rules:
/// a Role's rules hold in its namespace only.
fn rbac_rules(docs: &[Value]) -> Vec<RbacRule> {
    let mut rules = Vec::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if kind != "Role" && kind != "ClusterRole" {
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
    assert!(!rules.is_empty(), "no Role or ClusterRole found");
    rules
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
    let mut cmd = Command::new(helm);
    cmd.args(["template", "psd"]).arg(deploy("helm/polarstack-daemon")).args(["--namespace", NS]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    String::from_utf8(run(&mut cmd).stdout).expect("utf-8")
}

#[test]
fn manifests_and_chart_validate_strictly() {
    let (Some(validate), Some(helm)) = (tool("kubernetes-validate"), tool("helm")) else { return };
    // Every plain manifest, against the newest and the oldest schemas it supports.
    let files: Vec<PathBuf> =
        std::fs::read_dir(deploy("manifests")).expect("manifests").flatten().map(|e| e.path()).collect();
    for k in ["1.37.0", "1.25.0"] {
        let out = run(Command::new(&validate).args(["--strict", "-k", k]).args(&files));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("ERROR") && !text.contains("WARN"), "{text}");
    }
    run(Command::new(&helm).args(["lint", "--strict"]).arg(deploy("helm/polarstack-daemon")));
    let dir = std::env::temp_dir().join(format!("deploy-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let variants: [&[&str]; 3] = [
        &[],
        &["securityContext.privileged=true", "ccmConfig.create=true", "runtimeSockets.crio.enabled=true"],
        &["serviceMonitor.enabled=true", "extraArgs={--log-format=json}", "cgroupRoot=/sys/fs/cgroup/unified"],
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
    }
    let _ = std::fs::remove_dir_all(&dir);

    // The chart and the plain manifests grant the same and run alike.
    let plain = manifest_docs();
    let chart = yaml_docs(&helm_template(&helm, &[]));
    let sorted = |docs: &[Value]| -> BTreeSet<String> { rbac_rules(docs).iter().map(|r| format!("{r:?}")).collect() };
    assert_eq!(sorted(&chart), sorted(&plain), "chart RBAC == deploy/manifests RBAC");
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
        assert_eq!(pod["serviceAccountName"], "cloud-controller-manager");
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
    // The fallback switch: privileged, no capability list.
    let fallback = yaml_docs(&helm_template(&helm, &["securityContext.privileged=true"]));
    let sc = &container(&fallback)["securityContext"];
    assert_eq!((&sc["privileged"], &sc["capabilities"]), (&json!(true), &Value::Null));
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
/// without one of the rules, its requests are refused.
#[test]
fn rbac_of_the_manifests_is_what_the_daemon_needs() {
    let rules = rbac_rules(&manifest_docs());
    in_new_netns(move || {
        let api = FakeApi::start();
        seed(&api);
        api.set_rbac(Some(rules.clone()));
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
