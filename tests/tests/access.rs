//! Who may use the daemon, end to end on the real binary: its port is on the
//! host network, so every pod of the node can reach it. Endpoints that change
//! state need an authorized caller; everything a caller can make it do is
//! bounded (connections, watch streams, lookups that reach the API server).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use polarstack_tests::{
    cluster::{seed, NODE},
    fake_api::FakeApi,
    in_new_netns, Daemon, HTTP_PORT,
};
use serde_json::json;

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("polarstack-access-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).expect("log root");
        std::fs::write(dir.join("token"), "s3cret-token\n").expect("token");
        Self { dir }
    }
    fn arg(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("utf-8").to_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SWEEP: &str = "/api/v2/logs/sweep?dry_run=true";

#[test]
fn standalone_the_token_file_opens_the_mutating_endpoints_and_nothing_else_does() {
    in_new_netns(|| {
        let f = Files::new("standalone");
        let (logs, token) = (f.arg("logs"), f.arg("token"));
        let d = Daemon::start(&["--dbcluster-log-dir", &logs, "--api-token-file", &token, "--v1-require-auth"]);
        for (path, code) in [(SWEEP, None), ("/api/v1/RequestCheckCoreVersion", Some("0"))] {
            for bad in [None, Some(""), Some("s3cret"), Some("s3cret-token-and-more")] {
                let (status, body) = d.post_as(path, bad).expect("POST");
                assert_eq!(status, 401, "{path} with {bad:?}: {body}");
                if let Some(code) = code {
                    assert_eq!(body["code"], code, "the original's envelope: {body}");
                } else {
                    assert!(body["error"].is_string(), "{body}");
                }
            }
            let (status, body) = d.post_as(path, Some("s3cret-token")).expect("POST");
            assert_eq!(status, 200, "{path}: {body}");
        }
        let (status, _) = d.get("/api/v2/logs/last-sweep").expect("GET");
        assert_eq!(status, 200, "only the authorized dry run ran, and reading its report is open");
    });
}

#[test]
fn without_the_flag_the_originals_posts_stay_open_for_existing_callers() {
    in_new_netns(|| {
        let f = Files::new("v1open");
        let logs = f.arg("logs");
        let d = Daemon::start(&["--dbcluster-log-dir", &logs]);
        let (status, body) = d.post_as("/api/v1/InnerCheckCoreVersion", None).expect("POST");
        assert_eq!((status, &body["data"]), (200, &json!("OK")), "{body}");
        // The native ones never are.
        let (status, body) = d.post_as(SWEEP, Some("anything")).expect("POST");
        assert_eq!(status, 403, "standalone without --api-token-file no token can work: {body}");
        // A loop on the open one costs at most one scan a second.
        let before = d.get_ok("/api/v2/engines")["scans"].as_u64().expect("scans");
        let started = Instant::now();
        for _ in 0..20 {
            assert_eq!(d.post_as("/api/v1/InnerCheckCoreVersion", None).expect("POST").0, 200);
        }
        let scans = d.get_ok("/api/v2/engines")["scans"].as_u64().expect("scans") - before;
        let secs = started.elapsed().as_secs_f64();
        assert!((scans as f64) <= secs + 2.0, "{scans} scans in {secs:.1} s for 20 requests");
    });
}

#[test]
fn in_a_cluster_callers_are_checked_with_token_and_subject_access_reviews() {
    in_new_netns(|| {
        let f = Files::new("cluster");
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        api.add_user("ops-token", "alice", &["ops"]);
        api.add_user("pod-token", "system:serviceaccount:db:app", &["system:serviceaccounts"]);
        api.grant("alice", "post", "/api/v2/logs/sweep");
        let kc = api.kubeconfig_path().to_str().expect("utf-8").to_owned();
        let logs = f.arg("logs");
        let mut d = Daemon::start(&["--kubeconfig", &kc, "--current-node-name", NODE, "--dbcluster-log-dir", &logs]);
        d.wait_ready();
        api.clear_requests();
        let reviews = |api: &FakeApi, plural: &str| api.requests().iter().filter(|r| r.path.ends_with(plural)).count();

        let (status, body) = d.post_as(SWEEP, Some("ops-token")).expect("POST");
        assert_eq!(status, 200, "alice may post the sweep: {body}\n{}", d.log_text());
        let (status, body) = d.post_as(SWEEP, Some("pod-token")).expect("POST");
        assert_eq!(status, 403, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("system:serviceaccount:db:app")), "{body}");
        let (status, _) = d.post_as(SWEEP, Some("made-up")).expect("POST");
        assert_eq!(status, 401);
        assert_eq!(d.post_as(SWEEP, None).expect("POST").0, 401);
        let asked = |api: &FakeApi| (reviews(api, "tokenreviews"), reviews(api, "subjectaccessreviews"));
        assert_eq!(asked(&api), (3, 2), "one TokenReview per token, a SubjectAccessReview per authenticated user");

        // A loop of calls is answered from the cache.
        for _ in 0..20 {
            d.post_as(SWEEP, Some("ops-token")).expect("POST");
            d.post_as(SWEEP, Some("pod-token")).expect("POST");
            d.post_as(SWEEP, Some("made-up")).expect("POST");
        }
        assert_eq!(asked(&api), (3, 2), "decisions are cached");

        // The API server away: a token never seen cannot be checked (503, closed).
        api.set_down(true);
        let (status, body) = d.post_as(SWEEP, Some("new-token")).expect("POST");
        assert_eq!(status, 503, "{body}");
        api.set_down(false);
    });
}

#[test]
fn connections_watch_streams_and_standby_lookups_are_bounded() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        api.put(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "db-0", "namespace": "default"},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]}}));
        let kc = api.kubeconfig_path().to_str().expect("utf-8").to_owned();
        let mut d = Daemon::start(&["--kubeconfig", &kc, "--current-node-name", NODE]);
        d.wait_ready();

        // Watch streams: 64 at most, the next is told to come back.
        let mut streams: Vec<TcpStream> = (0..64)
            .map(|_| {
                let mut s = TcpStream::connect(("127.0.0.1", HTTP_PORT)).expect("connect");
                s.write_all(b"GET /api/v2/ports/watch HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
                let mut head = [0u8; 12];
                s.read_exact(&mut head).expect("status line");
                assert_eq!(&head, b"HTTP/1.1 200", "a watch within the cap is served");
                s
            })
            .collect();
        let (status, body) = d.get("/api/v2/ports/watch").expect("GET");
        assert_eq!(status, 503, "{body}");
        streams.pop();
        let ok = polarstack_tests::wait_for(Duration::from_secs(5), || {
            let mut s = TcpStream::connect(("127.0.0.1", HTTP_PORT)).expect("connect");
            s.write_all(b"GET /api/v2/ports/watch HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
            let mut head = [0u8; 12];
            s.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 200"
        });
        assert!(ok, "a slot freed by a closed stream is reused");
        drop(streams);

        // Idle connections that never send a request cannot hold every slot:
        // they are closed after the header timeout and the API answers again.
        let idle: Vec<TcpStream> =
            (0..300).map(|_| TcpStream::connect(("127.0.0.1", HTTP_PORT)).expect("connect")).collect();
        let started = Instant::now();
        let (status, _) = d.get("/healthz").expect("GET /healthz behind 300 idle connections");
        assert_eq!(status, 200);
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
        drop(idle);

        // GetStandByIp: a loop on one pod is served from a cache; lookups of
        // many pods are rate limited before they reach the API server.
        api.clear_requests();
        let path = "/api/v1/GetStandByIp?podName=db-0&namespace=default";
        for _ in 0..50 {
            let (status, body) = d.get(path).expect("GET");
            assert_eq!(status, 404, "node-a has no StandbyIP condition: {body}");
        }
        let pod_gets = |api: &FakeApi| api.requests().iter().filter(|r| r.path.contains("/pods/")).count();
        assert!(pod_gets(&api) <= 2, "{} pod reads for 50 calls", pod_gets(&api));
        api.clear_requests();
        let mut limited = 0;
        for i in 0..100 {
            let (status, body) = d.get(&format!("/api/v1/GetStandByIp?podName=p-{i}&namespace=default")).expect("GET");
            if status == 429 {
                assert_eq!(body["code"], "0", "{body}");
                limited += 1;
            }
        }
        assert!(limited > 50, "{limited} of 100 distinct lookups limited");
        assert!(pod_gets(&api) <= 50, "{} pod reads", pod_gets(&api));
    });
}
