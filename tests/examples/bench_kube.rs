//! `cargo xtask bench kube`: what the cluster sees and how fast, with the
//! real daemon (release build, eBPF) in its own network namespace against the
//! fake API server:
//! - bind() -> key in the port-usage ConfigMap, p50/p99, for an isolated
//!   change (includes the default 200 ms `--publish-debounce`; changes in a
//!   burst are written at most once per `--publish-min-interval`, 1 s);
//! - NIC carrier change -> `NodeClientNetworkUnavailable` flipped, p50/p99;
//! - steady-state API requests over a quiet window, per hour, next to the
//!   original's (about 2,400 patches and 1,200 node lists per node per hour).
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use polarstack_tests::{fake_api::FakeApi, in_new_netns, sh, wait_for, Daemon};
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

const NODE: &str = "bench-node";
const NS: &str = "kube-system";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{what:<48} n={:<3} p50 {:>8.1} ms   p99 {:>8.1} ms   max {:>8.1} ms",
        v.len(),
        percentile(&v, 0.5).as_secs_f64() * 1e3,
        percentile(&v, 0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    );
}

fn condition_status(api: &FakeApi, t: &str) -> Option<String> {
    let n = api.get("nodes", None, NODE)?;
    n["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == t)?["status"].as_str().map(str::to_owned)
}

fn main() {
    let quiet: u64 = std::env::var("BENCH_KUBE_QUIET_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    in_new_netns(move || {
        sh(&["ip", "link", "add", "bn0", "type", "veth", "peer", "name", "bn0p"]);
        sh(&["ip", "addr", "add", "192.0.2.10/24", "dev", "bn0"]);
        sh(&["ip", "link", "set", "bn0", "up"]);
        sh(&["ip", "link", "set", "bn0p", "up"]);
        let api = FakeApi::start();
        api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}));
        api.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "polardb4mpd-controller", "namespace": NS,
            "annotations": {"r": "30000-39999"}}}));
        api.put(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "controller-config", "namespace": NS},
            "data": {"enablePrintPort": "true", "isCheckOObIP": "false"}}),
        );
        api.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ccm-config", "namespace": NS},
            "data": {"NET_CARD_NAME": "bn0"}}));
        let kc = api.kubeconfig_path().to_str().expect("utf-8").to_owned();
        let mut d = Daemon::start(&["--kubeconfig", &kc, "--current-node-name", NODE]);
        d.wait_ready();
        let cm = format!("cloud-provider-port-usage-{NODE}");
        let has_key =
            |port: u16| api.get("configmaps", Some(NS), &cm).is_some_and(|c| c["data"].get(port.to_string()).is_some());
        assert!(
            wait_for(Duration::from_secs(20), || api.get("configmaps", Some(NS), &cm).is_some()),
            "{}",
            d.log_text()
        );

        let mut bind_lat = Vec::new();
        for i in 0..40u16 {
            let port = 31000 + i;
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            s.set_reuse_address(true).expect("reuse");
            let t = Instant::now();
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).expect("bind");
            s.listen(1).expect("listen");
            while !has_key(port) {
                assert!(t.elapsed() < Duration::from_secs(10), "port {port} never published");
                std::thread::sleep(Duration::from_micros(200));
            }
            bind_lat.push(t.elapsed());
            drop(s);
            assert!(wait_for(Duration::from_secs(10), || !has_key(port)));
            // Writes are at least `--publish-min-interval` (1 s) apart: measure
            // an isolated change, not the rate limit.
            std::thread::sleep(Duration::from_millis(1100));
        }
        report("bind() -> port-usage ConfigMap key", bind_lat);

        let mut link_lat = Vec::new();
        assert!(wait_for(Duration::from_secs(10), || condition_status(&api, "NodeClientNetworkUnavailable")
            .as_deref()
            == Some("False")));
        for i in 0..20 {
            let (action, want) = if i % 2 == 0 { ("down", "True") } else { ("up", "False") };
            let t = Instant::now();
            sh(&["ip", "link", "set", "bn0p", action]);
            while condition_status(&api, "NodeClientNetworkUnavailable").as_deref() != Some(want) {
                assert!(t.elapsed() < Duration::from_secs(10), "condition never became {want}");
                std::thread::sleep(Duration::from_micros(200));
            }
            link_lat.push(t.elapsed());
        }
        report("carrier change -> NodeClientNetworkUnavailable", link_lat);

        std::thread::sleep(Duration::from_secs(1));
        api.clear_requests();
        std::thread::sleep(Duration::from_secs(quiet));
        let reqs = api.requests();
        let per_hour = |n: usize| n as f64 * 3600.0 / quiet as f64;
        let writes = reqs.iter().filter(|r| r.is_write()).count();
        let node_lists = reqs.iter().filter(|r| r.method == "GET" && r.path == "/api/v1/nodes").count();
        println!(
            "steady state over {quiet} s: {} requests ({:.0}/h), {writes} writes ({:.0}/h), {node_lists} node lists; \
             the Go daemon: ~2400 patches + ~1200 node lists per node per hour",
            reqs.len(),
            per_hour(reqs.len()),
            per_hour(writes)
        );
        println!("(watches re-connect every ~290 s, the NodeRefreshFlag heartbeat is every 5 min: eight watches, about 99 + 12 requests per hour)");
    });
}
