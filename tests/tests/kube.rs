//! The Kubernetes sink, end to end: the real daemon binary with its eBPF
//! programs, in a fresh network namespace, against the fake API server
//! (tests/src/fake_api), which is the one stand-in these machines need.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use polarstack_tests::{
    cluster::{
        condition, daemon_for, keys, seed, set_print_port, set_ranges, tcp_listen, udp_bind, usage_cm, wait_condition,
        wait_keys, NODE, NS, SOON,
    },
    fake_api::{FakeApi, Fault},
    in_new_netns, sh, wait_for,
};
use serde_json::{json, Value};

#[test]
fn ports_inside_the_watched_ranges_are_published_and_withdrawn() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("polarbox.mpd.port.range", "20000-20010"), ("polarbox.single", "20020")]);
        // A key left by the Go daemon before the upgrade, for a port nobody holds.
        api.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": usage_cm(NODE), "namespace": NS},
            "data": {"20005": "the port already use"}}));
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        // Created (and the stale key dropped) while nothing is bound.
        wait_keys(&api, &mut d, NODE, &[]);
        let cm = api.get("configmaps", Some(NS), &usage_cm(NODE)).expect("usage ConfigMap");
        let ts = cm["metadata"]["annotations"]["updateTimestamp"].as_str().expect("updateTimestamp");
        assert!(ts.len() == 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "UTC YYYY-MM-DDTHH:MM:SSZ: {ts}");
        let node_uid = api.get("nodes", None, NODE).expect("node")["metadata"]["uid"].clone();
        assert_eq!(cm["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], node_uid, "owned by this Node: removed with it");

        // The upper bound of a range and a single-port range count (the
        // original missed both); UDP counts; a port outside every range never appears.
        let upper = tcp_listen(20010);
        let single = udp_bind(20020);
        let outside = tcp_listen(20500);
        let lower = tcp_listen(20000);
        wait_keys(&api, &mut d, NODE, &[20000, 20010, 20020]);
        drop(upper);
        wait_keys(&api, &mut d, NODE, &[20000, 20020]);
        // Deleted by hand: the operator needs it, so it comes back as it should be.
        api.delete("configmaps", Some(NS), &usage_cm(NODE)).expect("delete");
        wait_keys(&api, &mut d, NODE, &[20000, 20020]);
        drop((single, lower));
        wait_keys(&api, &mut d, NODE, &[]);
        drop(outside);

        // Writes go through server-side apply under the daemon's field manager.
        let writes: Vec<_> =
            api.requests().into_iter().filter(|r| r.is_write() && r.path.contains(&usage_cm(NODE))).collect();
        assert!(writes.iter().any(|r| r.param("fieldManager").as_deref() == Some("polarstack-daemon")
            && r.content_type.as_deref().is_some_and(|c| c.starts_with("application/apply-patch"))));
        assert!(writes.iter().all(|r| r.method == "PATCH"), "never a blind full update: {writes:?}");
    });
}

#[test]
fn host_ports_and_live_settings_apply_without_restart() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("polarbox.mpd.port.range", "20000-20010")]);
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        wait_keys(&api, &mut d, NODE, &[]);

        // A hostPort of a pod on this node is taken; one on another node is not.
        for (name, node, port) in [("db-here", NODE, 20003), ("db-there", "node-b", 20004)] {
            api.put(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": node, "containers": [{"name": "pg", "image": "pg",
                    "ports": [{"containerPort": 5432, "hostPort": port}]}]},
                "status": {"phase": "Running"}}));
        }
        wait_keys(&api, &mut d, NODE, &[20003]);
        let view = d.get_ok("/api/v2/kubernetes");
        assert_eq!(view["host_ports"]["claims"][0]["port"], 20003, "{view}");
        // The HTTP API agrees: taken though no socket holds it, never offered free.
        let one = d.get_ok("/api/v2/ports/20003");
        assert_eq!(
            (one["taken"].clone(), one["reasons"][0]["kind"].clone(), one["reasons"][0]["pod"].clone()),
            (json!(true), json!("host-port"), json!("default/db-here")),
            "{one}"
        );
        assert_eq!(one["claims"][0]["pod"], "default/db-here", "{one}");
        assert_eq!(d.get_ok("/api/v2/ports/free?from=20003&to=20004")["ports"], json!([20004]));

        // New ranges apply live: 20041 becomes watched, 20000-20010 does not.
        let _held = tcp_listen(20041);
        set_ranges(&api, &[("polarbox.new", "20040-20041")]);
        wait_keys(&api, &mut d, NODE, &[20041]);

        // enablePrintPort=false stops publishing; true resumes it.
        set_print_port(&api, false);
        assert!(wait_for(SOON, || d.get_ok("/api/v2/kubernetes")["settings"]["enable_print_port"] == false));
        let _later = tcp_listen(20040);
        thread::sleep(Duration::from_millis(500));
        assert_eq!(keys(&api, NODE), Some(BTreeSet::from([20041])), "publishing is paused");
        set_print_port(&api, true);
        wait_keys(&api, &mut d, NODE, &[20040, 20041]);

        // Bad range values are skipped with a warning; the good ones still apply.
        set_ranges(&api, &[("bad", "20045-20040"), ("worse", "0-99999"), ("good", "20040")]);
        wait_keys(&api, &mut d, NODE, &[20040]);
        assert!(d.log_text().contains("skipping this port range"), "{}", d.log_text());

        // A value that is not a boolean means the default, said once however
        // often the ConfigMap changes.
        for n in 0..3 {
            api.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "controller-config", "namespace": NS},
                "data": {"enablePrintPort": "maybe", "isCheckOObIP": "false", "unrelated": n.to_string()}}));
            thread::sleep(Duration::from_millis(300));
        }
        assert!(wait_for(SOON, || d.log_text().contains("not a boolean")), "{}", d.log_text());
        assert_eq!(d.log_text().matches("not a boolean").count(), 1, "one warning per bad value");
        assert_eq!(d.get_ok("/api/v2/kubernetes")["settings"]["enable_print_port"], true);
    });
}

#[test]
fn an_api_outage_and_throttling_degrade_but_never_crash() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        wait_keys(&api, &mut d, NODE, &[]);

        api.set_down(true);
        let _a = tcp_listen(20001);
        // HTTP keeps answering from local state while the API server is away.
        assert!(wait_for(SOON, || d.metric("polarstack_kube_publish_pending{object=\"port_usage\"}") == 1.0));
        assert_eq!(d.get_ok("/api/v2/ports/20001")["taken"], true);
        assert_eq!(d.get("/healthz").expect("healthz").0, 200);
        assert_eq!(keys(&api, NODE), Some(BTreeSet::new()), "nothing could be written");
        api.set_down(false);
        wait_keys(&api, &mut d, NODE, &[20001]);

        // A burst of 429s on writes: retried with backoff, then published.
        api.inject(Fault::too_many_requests(1).method("PATCH").times(3));
        let _b = tcp_listen(20002);
        wait_keys(&api, &mut d, NODE, &[20001, 20002]);
        let throttled = api.requests().iter().filter(|r| r.method == "PATCH" && r.status == 429).count();
        assert_eq!(throttled, 3, "each 429 was retried");
        // kube's client retries a 429 itself after its Retry-After; the
        // daemon's own backoff covers the outage, which it counted.
        let sample = "polarstack_kube_requests_total{verb=\"apply\",resource=\"configmaps\",result=\"unreachable\"}";
        assert!(d.metric(sample) >= 1.0);
        assert_eq!(d.get("/healthz").expect("daemon alive").0, 200);
    });
}

#[test]
fn a_quiet_node_makes_no_writes_and_lists_no_nodes() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        let _held = tcp_listen(20005);
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        wait_keys(&api, &mut d, NODE, &[20005]);
        // Let the start-up writes (conditions) settle, then watch a quiet period.
        assert!(wait_for(SOON, || d.get_ok("/api/v2/kubernetes")["node_status"]["writes"].as_u64() >= Some(1)));
        thread::sleep(Duration::from_secs(1));
        api.clear_requests();
        let quiet = Duration::from_secs(10);
        thread::sleep(quiet);
        let reqs = api.requests();
        let writes: Vec<_> = reqs.iter().filter(|r| r.is_write()).collect();
        let node_lists: Vec<_> = reqs.iter().filter(|r| r.method == "GET" && r.path == "/api/v1/nodes").collect();
        eprintln!("quiet {quiet:?}: {} requests in all: {reqs:?}", reqs.len());
        assert!(writes.is_empty(), "writes while nothing changed: {writes:?}");
        assert!(node_lists.is_empty(), "cluster-wide node lists: {node_lists:?}");
    });
}

#[test]
fn node_heartbeat_keeps_transition_time_and_other_conditions() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &["--node-heartbeat-interval", "1s"]);
        let cond = |api: &FakeApi, t: &str| -> Option<Value> {
            let node = api.get("nodes", None, NODE)?;
            node["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == t).cloned()
        };
        assert!(wait_for(SOON, || cond(&api, "NodeRefreshFlag").is_some()), "{}", d.log_text());
        let first = cond(&api, "NodeRefreshFlag").expect("NodeRefreshFlag");
        assert_eq!(
            (&first["status"], &first["reason"], &first["message"]),
            (&json!("True"), &json!("Refresh"), &json!("Refresh"))
        );
        // Heartbeat times are whole seconds: wait until one has moved on.
        let moved = wait_for(SOON, || {
            cond(&api, "NodeRefreshFlag").is_some_and(|c| c["lastHeartbeatTime"] != first["lastHeartbeatTime"])
        });
        assert!(moved, "no heartbeat\n{}", d.log_text());
        let later = cond(&api, "NodeRefreshFlag").expect("NodeRefreshFlag");
        assert_eq!(later["lastTransitionTime"], first["lastTransitionTime"], "no flip, no transition");
        let ready = cond(&api, "Ready").expect("kubelet's condition kept");
        assert_eq!(ready["lastHeartbeatTime"], "2026-01-01T00:00:00Z", "other conditions untouched");
        // Only this node's status subresource is written.
        for r in api.requests().iter().filter(|r| r.is_write() && r.path.contains("/nodes")) {
            assert_eq!(r.path, format!("/api/v1/nodes/{NODE}/status"), "{r:?}");
        }
        let _ = d.terminate();
    });
}

#[test]
fn cluster_mode_without_a_node_name_is_a_clear_error() {
    in_new_netns(|| {
        let api = FakeApi::start();
        let out = Command::new(polarstack_tests::daemon_bin())
            .args(["--kubeconfig", api.kubeconfig_path().to_str().expect("path"), "--port", "8900"])
            .env_remove("CURRENT_NODE_NAME")
            .output()
            .expect("run the daemon");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--current-node-name"), "{err}");
        let reqs = api.requests();
        assert!(reqs.iter().all(|r| !r.is_write()), "nothing written: {reqs:?}");
    });
}

/// The operator's reading (docs/compat.md): the union of keys over all nodes'
/// ConfigMaps is the set of ports taken on any node. Two daemons in two
/// network namespaces (two hosts) joined by a veth, one fake API server.
#[test]
fn the_union_over_two_nodes_is_every_port_taken_on_either() {
    in_new_netns(|| {
        // Host A: this namespace; the API server listens on its veth address too.
        let api = FakeApi::start_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).expect("fake API");
        seed(&api, "node-a", &[("r", "20000-20020")]);
        api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}}));
        let kc_b = std::env::temp_dir().join(format!("kube-test-b-{}.kubeconfig", std::process::id()));
        let text = std::fs::read_to_string(api.kubeconfig_path()).expect("kubeconfig");
        std::fs::write(&kc_b, text.replace("0.0.0.0", "198.51.100.1")).expect("write kubeconfig");

        // Host B: a thread in its own namespace, pinned by a child process so
        // the veth end can be moved there by pid.
        let (to_a, from_b) = mpsc::channel::<u32>();
        let (to_b, from_a) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let kc_b2 = kc_b.clone();
        let host_b = thread::spawn(move || {
            // SAFETY: unshare affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let mut pin = Command::new("sleep").arg("600").spawn().expect("sleep");
            to_a.send(pin.id()).expect("send pid");
            from_a.recv().expect("veth moved");
            sh(&["ip", "link", "set", "lo", "up"]);
            sh(&["ip", "addr", "add", "198.51.100.2/24", "dev", "vb"]);
            sh(&["ip", "link", "set", "vb", "up"]);
            let held_b = [tcp_listen(20002), tcp_listen(20003)];
            let mut d = daemon_for(&kc_b2, "node-b", &[]);
            // Wait until told to stop, keeping the sockets and the daemon.
            let _ = done_rx.recv_timeout(Duration::from_secs(120));
            drop((held_b, d.terminate()));
            let _ = pin.kill();
            let _ = pin.wait();
        });
        let pid = from_b.recv().expect("host B started");
        sh(&["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"]);
        sh(&["ip", "link", "set", "vb", "netns", &pid.to_string()]);
        sh(&["ip", "addr", "add", "198.51.100.1/24", "dev", "va"]);
        sh(&["ip", "link", "set", "va", "up"]);
        to_b.send(()).expect("tell host B");

        let held_a = [tcp_listen(20001), tcp_listen(20003), tcp_listen(20030)];
        let mut d = daemon_for(api.kubeconfig_path(), "node-a", &[]);
        let want: BTreeSet<u16> = [20001, 20002, 20003].into();
        let deadline = Instant::now() + SOON * 2;
        let union = || -> BTreeSet<u16> {
            ["node-a", "node-b"].iter().flat_map(|n| keys(&api, n).unwrap_or_default()).collect()
        };
        while union() != want && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(union(), want, "a: {:?} b: {:?}\n{}", keys(&api, "node-a"), keys(&api, "node-b"), d.log_text());
        assert_eq!(keys(&api, "node-a"), Some([20001, 20003].into()));
        assert_eq!(keys(&api, "node-b"), Some([20002, 20003].into()));
        let _ = done_tx.send(());
        host_b.join().expect("host B");
        drop(held_a);
        let _ = std::fs::remove_file(&kc_b);
    });
}

/// The client NIC (a veth whose peer a test flips) drives NodeClientIP and
/// NodeClientNetworkUnavailable through rtnetlink events; ccm-config picks
/// the NIC and the subnet, live.
#[test]
fn client_network_conditions_follow_the_nic() {
    in_new_netns(|| {
        sh(&["ip", "link", "add", "cn0", "type", "veth", "peer", "name", "cn0p"]);
        sh(&["ip", "addr", "add", "192.0.2.10/24", "dev", "cn0"]);
        sh(&["ip", "addr", "add", "198.51.100.10/24", "dev", "cn0"]);
        sh(&["ip", "link", "set", "cn0", "up"]);
        sh(&["ip", "link", "set", "cn0p", "up"]);
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        let ccm = |nic: &str| {
            api.put(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ccm-config", "namespace": NS},
                "data": {"NET_CARD_NAME": nic, "NET_MASK": "198.51.100.0/24"}}),
            );
        };
        ccm("cn0");
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        let up = wait_condition(&api, &mut d, "NodeClientNetworkUnavailable", "False", "StateUP", "cn0 StateUP");
        wait_condition(&api, &mut d, "NodeClientIP", "True", "cn0", "198.51.100.10");
        let net = d.get_ok("/api/v2/network");
        assert_eq!((net["nic"].clone(), net["client_ip"].clone()), (json!("cn0"), json!("198.51.100.10")), "{net}");

        // The peer goes down: carrier lost, the NIC is down.
        sh(&["ip", "link", "set", "cn0p", "down"]);
        let down = wait_condition(&api, &mut d, "NodeClientNetworkUnavailable", "True", "StateDown", "cn0 StateDown");
        assert_ne!(down["lastTransitionTime"], Value::Null);
        sh(&["ip", "link", "set", "cn0p", "up"]);
        wait_condition(&api, &mut d, "NodeClientNetworkUnavailable", "False", "StateUP", "cn0 StateUP");
        let _ = up;

        // The client address changes.
        sh(&["ip", "addr", "del", "198.51.100.10/24", "dev", "cn0"]);
        sh(&["ip", "addr", "add", "198.51.100.11/24", "dev", "cn0"]);
        let ip = wait_condition(&api, &mut d, "NodeClientIP", "True", "cn0", "198.51.100.11");
        // The address changed, not the status: no transition.
        let before = ip["lastTransitionTime"].clone();

        // ccm-config names a NIC that does not exist: unknown, no client IP.
        ccm("missing0");
        wait_condition(&api, &mut d, "NodeClientNetworkUnavailable", "True", "StateUnKnown", "missing0 StateUnKnown");
        wait_condition(&api, &mut d, "NodeClientIP", "False", "missing0", "0.0.0.0");
        // Condition times are whole seconds: let one pass so a transition shows.
        thread::sleep(Duration::from_millis(1100));
        ccm("cn0");
        let back = wait_condition(&api, &mut d, "NodeClientIP", "True", "cn0", "198.51.100.11");
        assert_ne!(back["lastTransitionTime"], before, "False then True again is a transition");

        // isCheckOObIP is false in the seed: no NodeOobIP written.
        assert!(condition(&api, NODE, "NodeOobIP").is_none());
        // The kubelet's condition is untouched throughout.
        assert_eq!(condition(&api, NODE, "Ready").expect("Ready")["lastHeartbeatTime"], "2026-01-01T00:00:00Z");
    });
}

#[test]
fn compat_v1_endpoints_answer_in_the_original_envelope() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-s"},
            "status": {"conditions": [{"type": "StandbyIP", "status": "True", "reason": "x", "message": "192.0.2.77"}]}}));
        api.put(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pg-1", "namespace": "db"},
            "spec": {"nodeName": "node-s", "containers": [{"name": "pg", "image": "pg"}]}}));
        let d = daemon_for(api.kubeconfig_path(), NODE, &[]);

        let (code, v) = d.get("/api/v1/TestConn").expect("TestConn");
        assert_eq!((code, v["code"].clone(), v["data"].clone()), (200, json!("1"), json!({"message": "connected"})));
        assert!(v["requestId"].as_str().is_some_and(|r| !r.is_empty()), "{v}");

        let (code, v) = d.get("/api/v1/GetStandByIp?podName=pg-1&namespace=db").expect("GetStandByIp");
        assert_eq!((code, v["code"].clone(), v["data"].clone()), (200, json!("1"), json!("192.0.2.77")), "{v}");

        let (code, v) = d.get("/api/v1/GetStandByIp").expect("GetStandByIp");
        assert_eq!((code, v["code"].clone()), (400, json!("0")), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| m.contains("podName")), "{v}");

        let (code, v) = d.get("/api/v1/GetStandByIp?podName=..%2Fnodes").expect("GetStandByIp");
        assert_eq!((code, v["code"].clone()), (400, json!("0")), "names only: {v}");

        let (code, v) = d.get("/api/v1/GetStandByIp?podName=nobody").expect("GetStandByIp");
        assert!(
            code >= 400 && v["code"] == "0" && v["message"].as_str().is_some_and(|m| m.contains("not found")),
            "{code} {v}"
        );
    });
}
