//! Faults, end to end, on the real daemon binary: a task that dies, and what
//! the daemon then tells the kubelet (`/healthz`), readiness (`/readyz`),
//! Prometheus and the operator (its heartbeats).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
use std::time::Duration;

use polarstack_tests::{
    cluster::{condition, daemon_for, seed, tcp_listen, usage_cm, wait_keys, NODE, NS, SOON},
    fake_api::FakeApi,
    in_new_netns, wait_for, Daemon,
};
use serde_json::Value;

fn task(d: &Daemon, name: &str) -> Value {
    // /readyz answers 503 when unready; its body is the same.
    let (_, body) = d.get("/readyz").expect("/readyz");
    body["tasks"][name].clone()
}

#[test]
fn a_failed_task_is_restarted_counted_and_keeps_working() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("polarbox.mpd.port.range", "20000-20010")]);
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &["--fail-task", "port-usage"]);
        let restarted = wait_for(SOON, || {
            let t = task(&d, "port-usage");
            t["restarts"] == 1 && t["state"] == "running"
        });
        assert!(restarted, "port-usage: {}\n{}", task(&d, "port-usage"), d.log_text());
        let t = task(&d, "port-usage");
        assert_eq!(t["role"], "restartable");
        assert!(t["last_failure"].as_str().is_some_and(|f| f.contains("panicked")), "{t}");
        assert_eq!(d.metric("polarstack_task_restarts_total{task=\"port-usage\"}"), 1.0);
        assert_eq!(d.metric("polarstack_task_up{task=\"port-usage\"}"), 1.0);
        let (code, health) = d.get("/healthz").expect("/healthz");
        assert_eq!((code, &health["status"]), (200, &Value::from("ok")), "a restartable task never fails liveness");
        // The restarted sink still does its job.
        let _l = tcp_listen(20003);
        wait_keys(&api, &mut d, NODE, &[20003]);
        for other in ["ports", "settings", "network", "node-status", "services", "pods/this-node"] {
            assert_eq!(task(&d, other)["restarts"], 0, "{other} untouched");
        }
    });
}

#[test]
fn a_dead_core_task_fails_liveness_and_stops_the_heartbeats() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("polarbox.mpd.port.range", "20000-20010")]);
        // Not daemon_for: it waits for readiness, which this daemon loses.
        let kc = api.kubeconfig_path().to_str().expect("utf-8 path").to_owned();
        let mut d = Daemon::start(&[
            "--kubeconfig",
            &kc,
            "--current-node-name",
            NODE,
            "--fail-task",
            "ports",
            "--node-heartbeat-interval",
            "1s",
        ]);
        let dead = wait_for(SOON, || d.get("/healthz").is_ok_and(|(code, _)| code == 503));
        assert!(dead, "/healthz stays 200 after the port map's owner died\n{}", d.log_text());
        let (_, health) = d.get("/healthz").expect("/healthz");
        assert_eq!(health["status"], "failing");
        assert_eq!(health["dead_tasks"], serde_json::json!(["ports"]));
        let (code, ready) = d.get("/readyz").expect("/readyz");
        assert_eq!((code, &ready["ready"]), (503, &Value::from(false)));
        assert_eq!(ready["tasks"]["ports"]["state"], "dead");
        assert_eq!(ready["tasks"]["ports"]["role"], "core");
        assert_eq!(d.metric("polarstack_task_up{task=\"ports\"}"), 0.0);

        // The operator reads the heartbeats as "this node's daemon is fine":
        // they stop. (Give a beat already on its way a moment to land.)
        std::thread::sleep(Duration::from_millis(1500));
        let beat = |api: &FakeApi| condition(api, NODE, "NodeRefreshFlag").map(|c| c["lastHeartbeatTime"].clone());
        let stamp = |api: &FakeApi| {
            api.get("configmaps", Some(NS), &usage_cm(NODE))
                .map(|c| c["metadata"]["annotations"]["updateTimestamp"].clone())
        };
        let (beat_then, stamp_then) = (beat(&api), stamp(&api));
        std::thread::sleep(Duration::from_secs(4));
        assert_eq!(beat(&api), beat_then, "NodeRefreshFlag heartbeat went on with a dead core task");
        assert_eq!(stamp(&api), stamp_then, "updateTimestamp went on with a dead core task");
        assert!(d.log_text().contains("a core task ended"), "the log says why");
    });
}
