//! Engine-version availability, end to end: real dockerd and containerd on
//! private sockets, the real daemon binary, the fake API server.
use std::{collections::BTreeMap, thread, time::Duration};

use polarstack_tests::{
    fake_api::FakeApi,
    in_new_netns, run_ok,
    runtimes::{self, Runtimes},
    wait_for, Daemon,
};
use serde_json::{json, Value};

const NS: &str = "kube-system";
const SOON: Duration = Duration::from_secs(20);

fn version_cm(api: &FakeApi, cm: &str, data: &[(&str, &str)]) {
    let data: serde_json::Map<String, Value> = data.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
    api.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": cm, "namespace": NS, "labels": {"configtype": "minor_version_info", "dbClusterMode": "WriteReadMore"}},
        "data": data}));
}

fn seed_nodes(api: &FakeApi, nodes: &[&str]) {
    for n in nodes {
        api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}));
    }
}

fn start(api: &FakeApi, rt: &Runtimes, port: u16, node: &str, extra: &[&str]) -> Daemon {
    let kc = api.kubeconfig_path().to_str().expect("utf-8").to_owned();
    let docker = rt.docker_sock.to_str().expect("utf-8").to_owned();
    let cri = rt.containerd_sock.to_str().expect("utf-8").to_owned();
    let mut args =
        vec!["--kubeconfig", &kc, "--current-node-name", node, "--docker-socket", &docker, "--cri-socket", &cri];
    args.extend_from_slice(extra);
    let mut d = Daemon::start_at(port, &args);
    d.wait_ready();
    d
}

/// `existingVersions` and `checkTime` of a node's availability ConfigMap.
fn availability(api: &FakeApi, node: &str) -> Option<(String, String)> {
    let cm = api.get("configmaps", Some(NS), &format!("polarstack-daemon-version-availability-{node}"))?;
    Some((cm["data"]["existingVersions"].as_str()?.to_owned(), cm["data"]["checkTime"].as_str()?.to_owned()))
}

fn wait_versions(api: &FakeApi, d: &mut Daemon, node: &str, want: &str) {
    let ok = wait_for(SOON, || availability(api, node).is_some_and(|(v, _)| v == want));
    assert!(
        ok,
        "existingVersions {:?}, want {want:?}\n{}\n{}",
        availability(api, node),
        d.get_ok("/api/v2/engines"),
        d.log_text()
    );
}

fn status_of(d: &Daemon, version: &str) -> (String, Value) {
    let st = d.get_ok("/api/v2/engines");
    let v = st["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|v| v["name"] == version)
        .cloned()
        .unwrap_or(Value::Null);
    (v["status"].as_str().unwrap_or_default().to_owned(), v)
}

fn runtimes_or_skip() -> Option<Runtimes> {
    if !runtimes::available() {
        eprintln!("dockerd/containerd not installed: skipped (under CI this fails instead)");
        return None;
    }
    Some(Runtimes::start())
}

#[test]
fn versions_follow_images_across_docker_and_containerd() {
    in_new_netns(|| {
        let Some(rt) = runtimes_or_skip() else { return };
        let api = FakeApi::start();
        seed_nodes(&api, &["node-a"]);
        // v1: both images in docker.
        rt.docker_import("polardb/pg_engine:1");
        rt.docker_import("polardb/pg_manager:1");
        // v2: named as containerd and podman name them; held by containerd
        // (docker.io/ form) and by docker (plain form).
        rt.docker_import("polardb/pg_engine:2");
        rt.ctr_import_from_docker("polardb/pg_engine:2");
        run_ok(&mut rt.docker(&["rmi", "polardb/pg_engine:2"]), None);
        rt.docker_import("polardb/pfsd:2");
        // A same-named image from another registry or with another tag is not it.
        rt.docker_import("reg.example.com/polardb/pg_engine:3");
        rt.docker_import("polardb/pg_engine:3b");
        version_cm(
            &api,
            "v1",
            &[("name", "v1"), ("pgEngineImage", "polardb/pg_engine:1"), ("pgManagerImage", "polardb/pg_manager:1")],
        );
        version_cm(
            &api,
            "v2",
            &[
                ("name", "v2"),
                ("pgEngineImage", "docker.io/polardb/pg_engine:2"),
                ("pfsdImage", "localhost/polardb/pfsd:2"),
            ],
        );
        version_cm(&api, "v3", &[("name", "v3"), ("pgEngineImage", "polardb/pg_engine:3")]);
        version_cm(&api, "no-name", &[("pgEngineImage", "polardb/pg_engine:1")]);
        version_cm(&api, "no-images", &[("name", "v4")]);
        version_cm(&api, "odd", &[("name", "v5"), ("pgEngineImage", "not an image")]);

        let mut d = start(&api, &rt, 8900, "node-a", &["--cri-poll-interval", "1s"]);
        wait_versions(&api, &mut d, "node-a", "v1,v2");
        let (_, check) = availability(&api, "node-a").expect("availability");
        let cm = api.get("configmaps", Some(NS), "polarstack-daemon-version-availability-node-a").expect("cm");
        assert_eq!(cm["metadata"]["ownerReferences"][0]["name"], "node-a", "removed with its Node: {cm}");
        assert!(check.len() == 20 && check.ends_with('Z'), "checkTime UTC YYYY-MM-DDTHH:MM:SSZ: {check}");
        let (st, v3) = status_of(&d, "v3");
        assert_eq!(st, "missing", "{v3}");
        assert_eq!(v3["images"][0]["present"], false);
        let (_, v2) = status_of(&d, "v2");
        let holders: Vec<String> = v2["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| i["runtimes"][0].as_str().unwrap_or("").to_owned())
            .collect();
        assert!(
            holders.iter().any(|h| h.starts_with("cri")) && holders.iter().any(|h| h.starts_with("docker")),
            "{v2}"
        );
        let log = d.log_text();
        assert_eq!(
            log.matches("skipping an engine-version ConfigMap").count(),
            3,
            "one warning each for no name, no images, an odd image:\n{log}"
        );

        // docker rmi: v1 leaves (Docker's events, not a poll); import: it returns.
        run_ok(&mut rt.docker(&["rmi", "polardb/pg_manager:1"]), None);
        wait_versions(&api, &mut d, "node-a", "v2");
        rt.docker_import("polardb/pg_manager:1");
        wait_versions(&api, &mut d, "node-a", "v1,v2");
        // ctr images rm: v2 leaves (CRI is polled); back again.
        run_ok(&mut rt.ctr(&["images", "rm", "docker.io/polardb/pg_engine:2"]), None);
        wait_versions(&api, &mut d, "node-a", "v1");
        rt.ctr_import_from_docker("polardb/pg_engine:1"); // unrelated image: no change
        thread::sleep(Duration::from_millis(1500));
        wait_versions(&api, &mut d, "node-a", "v1");
    });
}

#[test]
fn a_stopped_runtime_makes_versions_unknown_then_recovers() {
    in_new_netns(|| {
        let Some(mut rt) = runtimes_or_skip() else { return };
        let api = FakeApi::start();
        seed_nodes(&api, &["node-a"]);
        rt.docker_import("polardb/pg_engine:1");
        version_cm(&api, "v1", &[("name", "v1"), ("pgEngineImage", "polardb/pg_engine:1")]);
        let mut d = start(&api, &rt, 8900, "node-a", &["--cri-poll-interval", "1s"]);
        wait_versions(&api, &mut d, "node-a", "v1");

        rt.stop_dockerd();
        let unknown = wait_for(SOON, || status_of(&d, "v1").0 == "unknown");
        assert!(unknown, "{}", d.get_ok("/api/v2/engines"));
        let (_, v1) = status_of(&d, "v1");
        assert!(v1["reason"].as_str().is_some_and(|r| r.contains("runtime unavailable")), "{v1}");
        assert_eq!(
            d.metric(&format!(
                "polarstack_engines_runtime_up{{runtime=\"docker\",socket=\"{}\"}}",
                rt.docker_sock.display()
            )),
            0.0
        );
        assert_eq!(availability(&api, "node-a").map(|a| a.0).as_deref(), Some("v1"), "never silently absent");
        assert_eq!(d.get("/healthz").expect("alive").0, 200);

        rt.start_dockerd();
        let back = wait_for(SOON, || status_of(&d, "v1").0 == "available");
        assert!(back, "{}", d.get_ok("/api/v2/engines"));
    });
}

/// Hung runtimes (frozen: their sockets accept, nothing answers), then
/// containerd stopped and restarted: each call gives up after its timeout,
/// versions turn unknown with the reason, the daemon's own answers stay
/// prompt, and everything comes back when the runtimes do.
#[test]
fn hung_and_restarted_runtimes_degrade_and_recover() {
    in_new_netns(|| {
        let Some(mut rt) = runtimes_or_skip() else { return };
        let api = FakeApi::start();
        seed_nodes(&api, &["node-a"]);
        rt.docker_import("polardb/pg_engine:1");
        rt.ctr_import_from_docker("polardb/pg_engine:1");
        version_cm(&api, "v1", &[("name", "v1"), ("pgEngineImage", "polardb/pg_engine:1")]);
        let mut d = start(&api, &rt, 8900, "node-a", &["--cri-poll-interval", "1s"]);
        wait_versions(&api, &mut d, "node-a", "v1");

        rt.freeze(true);
        let (code, _) = d.post("/api/v1/InnerCheckCoreVersion").expect("InnerCheckCoreVersion");
        eprintln!("InnerCheckCoreVersion with hung runtimes: {code}");
        let unknown = wait_for(Duration::from_secs(30), || status_of(&d, "v1").0 == "unknown");
        assert!(unknown, "hung runtimes: {}", d.get_ok("/api/v2/engines"));
        let (_, v1) = status_of(&d, "v1");
        assert!(v1["reason"].as_str().is_some_and(|r| r.contains("no answer within")), "{v1}");
        let asked = std::time::Instant::now();
        for path in ["/api/v2/engines", "/readyz", "/api/v2/ports/5432"] {
            assert!(d.get(path).is_ok_and(|(c, _)| c == 200), "{path} with hung runtimes");
        }
        assert!(asked.elapsed() < Duration::from_secs(2), "answers wait on the runtimes: {:?}", asked.elapsed());
        assert_eq!(availability(&api, "node-a").map(|a| a.0).as_deref(), Some("v1"), "never silently absent");
        rt.freeze(false);
        assert!(wait_for(SOON, || status_of(&d, "v1").0 == "available"), "{}", d.get_ok("/api/v2/engines"));

        // containerd away: dockerd answers on its own; the CRI client does not.
        rt.stop_containerd();
        let cri_down = wait_for(SOON, || {
            d.metrics()
                .lines()
                .any(|l| l.starts_with("polarstack_engines_runtime_up{runtime=\"cri\"") && l.ends_with(" 0"))
        });
        assert!(cri_down, "{}", d.metrics());
        assert_eq!(d.get("/healthz").expect("alive").0, 200);
        rt.start_containerd();
        let cri_up = wait_for(Duration::from_secs(30), || {
            d.metrics()
                .lines()
                .any(|l| l.starts_with("polarstack_engines_runtime_up{runtime=\"cri\"") && l.ends_with(" 1"))
        });
        assert!(cri_up, "{}", d.metrics());
        assert!(wait_for(SOON, || status_of(&d, "v1").0 == "available"), "{}", d.get_ok("/api/v2/engines"));
    });
}

#[test]
fn a_request_on_one_node_rescans_every_node_and_requests_coalesce() {
    in_new_netns(|| {
        let Some(rt) = runtimes_or_skip() else { return };
        let api = FakeApi::start();
        seed_nodes(&api, &["node-a", "node-b"]);
        rt.docker_import("polardb/pg_engine:1");
        version_cm(&api, "v1", &[("name", "v1"), ("pgEngineImage", "polardb/pg_engine:1")]);
        // No polling: every scan below is one somebody asked for.
        let mut a = start(&api, &rt, 8900, "node-a", &["--cri-poll-interval", "1h"]);
        let mut b = start(&api, &rt, 8901, "node-b", &["--cri-poll-interval", "1h"]);
        wait_versions(&api, &mut a, "node-a", "v1");
        wait_versions(&api, &mut b, "node-b", "v1");
        // checkTime has whole seconds: let one pass.
        thread::sleep(Duration::from_millis(1100));
        let before: BTreeMap<&str, String> =
            ["node-a", "node-b"].iter().map(|n| (*n, availability(&api, n).expect("availability").1)).collect();

        let (code, v) = a.post("/api/v1/RequestCheckCoreVersion").expect("request");
        assert_eq!((code, v["code"].clone(), v["data"].clone()), (200, json!("1"), json!("done")), "{v}");
        for n in ["node-a", "node-b"] {
            let moved = wait_for(SOON, || availability(&api, n).is_some_and(|(_, t)| t != before[n]));
            assert!(
                moved,
                "checkTime of {n} did not move\n{}",
                if n == "node-a" { a.log_text() } else { b.log_text() }
            );
        }

        // Fifty concurrent checks: one or two scans, no errors.
        thread::sleep(Duration::from_millis(500));
        let scans = a.metric("polarstack_engines_scans_total");
        let a = std::sync::Arc::new(a);
        let answers: Vec<(u16, Value)> = (0..50)
            .map(|_| {
                let a = a.clone();
                thread::spawn(move || a.post("/api/v1/InnerCheckCoreVersion").expect("inner check"))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert!(answers.iter().all(|(c, v)| *c == 200 && v["data"] == "OK" && v["code"] == "1"), "{answers:?}");
        let delta = a.metric("polarstack_engines_scans_total") - scans;
        eprintln!("50 concurrent InnerCheckCoreVersion calls: {delta} scans");
        assert!((1.0..=2.0).contains(&delta), "{delta} scans for 50 concurrent requests");
    });
}
