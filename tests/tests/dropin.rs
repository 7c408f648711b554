//! Drop-in fidelity: the unchanged operator, with its own shipped settings,
//! reading the daemon's outputs the way its code does (tests/src/operator.rs
//! mirrors PolarDB-Stack-Common), and the original's own DaemonSet running
//! this daemon's image as it is.
use std::{collections::BTreeSet, process::Command, thread, time::Duration};

use polarstack_tests::{
    cluster::{daemon_for, seed, tcp_listen, udp_bind, wait_condition, NODE, NS, SOON},
    fake_api::FakeApi,
    in_new_netns, operator, sh, wait_for, Daemon,
};
use serde_json::json;

fn ccm(api: &FakeApi, nic: &str, mask: &str) {
    api.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ccm-config", "namespace": NS},
        "data": {"NET_CARD_NAME": nic, "NET_MASK": mask}}));
}

fn veth_with(name: &str, cidr: &str) {
    let peer = format!("{name}p");
    sh(&["ip", "link", "add", name, "type", "veth", "peer", "name", &peer]);
    sh(&["ip", "addr", "add", cidr, "dev", name]);
    sh(&["ip", "link", "set", name, "up"]);
    sh(&["ip", "link", "set", &peer, "up"]);
}

/// The operator's chart and the original's deploy/all.yaml ship
/// `NET_MASK: "255.255.0.0"` whatever the client subnet is. With a client
/// address on a /24 the operator must still get it (GetClientIP), or
/// instance registration and switchover fail.
#[test]
fn the_shipped_net_mask_keeps_the_client_ip_and_a_subnet_that_matches_nothing_says_why() {
    in_new_netns(|| {
        veth_with("dc0", "192.0.2.10/24");
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        ccm(&api, "dc0", "255.255.0.0");
        let mut d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        wait_condition(&api, &mut d, "NodeClientIP", "True", "dc0", "192.0.2.10");
        assert_eq!(operator::client_ip(&api, NODE).as_deref(), Some("192.0.2.10"));
        assert_eq!(operator::client_network_unavailable(&api, NODE), Some(false));
        let net = d.get_ok("/api/v2/network");
        assert!(net["client_ip_note"].as_str().is_some_and(|n| n.contains("/16")), "the fallback is explained: {net}");

        // A subnet (CIDR) selects exactly: none of the NIC's addresses is in
        // it, so no client IP, and the API says why.
        ccm(&api, "dc0", "203.0.113.0/24");
        wait_condition(&api, &mut d, "NodeClientIP", "False", "dc0", "0.0.0.0");
        assert_eq!(operator::client_ip(&api, NODE), None, "never 0.0.0.0 as an address");
        let net = d.get_ok("/api/v2/network");
        assert!(
            net["client_ip_error"].as_str().is_some_and(|e| e.contains("203.0.113.0/24")),
            "the reason names the mask: {net}"
        );
    });
}

/// Every valid range is watched whatever its width, in both forms the
/// operator parses (Common `port_range.go`): 20,000 ports as `a-b`, and `a+n`.
#[test]
fn a_range_of_twenty_thousand_ports_and_a_plus_range_are_published() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("polarbox.wide", "20000-39999"), ("polarbox.plus", "40000+10")]);
        let _a = tcp_listen(20005);
        let _b = tcp_listen(39999);
        let _c = udp_bind(40010);
        let _outside = tcp_listen(40011);
        let d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        let want: BTreeSet<u16> = [20005, 39999, 40010].into();
        let ok = wait_for(SOON, || operator::used_ports_of_node(&api, NODE).is_some_and(|p| p.is_superset(&want)));
        assert!(ok, "published {:?}, want {want:?}", operator::used_ports_of_node(&api, NODE));
        let published = operator::used_ports_of_node(&api, NODE).unwrap_or_default();
        assert!(!published.contains(&40011), "outside every range: {published:?}");
        let view = d.get_ok("/api/v2/kubernetes");
        assert_eq!(view["port_usage"]["overflow"], 0, "{view}");
    });
}

/// kube-proxy redirects an allocated nodePort on every node: a database
/// there would get no traffic. It is taken (HTTP, /free, the ConfigMap) for
/// as long as its Service exists.
#[test]
fn an_allocated_node_port_is_taken_until_its_service_goes() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20040")]);
        let d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        assert!(wait_for(SOON, || operator::used_ports_of_node(&api, NODE).is_some()), "no ConfigMap");
        api.put(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "pg-rw", "namespace": "db"},
            "spec": {"type": "NodePort", "ports": [{"port": 5432, "nodePort": 20020, "protocol": "TCP"}]}}));
        let published = || operator::used_ports_of_node(&api, NODE).unwrap_or_default();
        assert!(wait_for(SOON, || published().contains(&20020)), "not published: {:?}", published());
        let one = d.get_ok("/api/v2/ports/20020?proto=tcp");
        assert_eq!(one["verdict"], "taken", "{one}");
        assert_eq!(
            (one["reasons"][0]["kind"].as_str(), one["reasons"][0]["service"].as_str()),
            (Some("node-port"), Some("db/pg-rw")),
            "{one}"
        );
        let free = d.get_ok("/api/v2/ports/free?from=20019&to=20021&count=3");
        assert_eq!(free["ports"], json!([20019, 20021]), "{free}");
        api.delete("services", Some("db"), "pg-rw");
        assert!(wait_for(SOON, || !published().contains(&20020)), "still published: {:?}", published());
        assert_eq!(d.get_ok("/api/v2/ports/20020?proto=tcp")["verdict"], "free");
    });
}

/// The original rewrote the ConfigMap every minute: people read
/// `updateTimestamp` as "the daemon is alive". It moves on a quiet node
/// once a heartbeat period, and only then.
#[test]
fn update_timestamp_moves_on_a_quiet_node_at_the_heartbeat() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        let _d = daemon_for(api.kubeconfig_path(), NODE, &["--node-heartbeat-interval", "2s"]);
        let stamp = || {
            api.get("configmaps", Some(NS), &format!("cloud-provider-port-usage-{NODE}"))
                .and_then(|cm| cm["metadata"]["annotations"]["updateTimestamp"].as_str().map(str::to_owned))
        };
        assert!(wait_for(SOON, || stamp().is_some()), "no ConfigMap");
        let first = stamp();
        api.clear_requests();
        assert!(wait_for(Duration::from_secs(8), || stamp() != first), "updateTimestamp stayed {first:?}");
        thread::sleep(Duration::from_secs(3));
        let writes =
            api.requests().iter().filter(|r| r.is_write() && r.path.contains("cloud-provider-port-usage")).count();
        // About 5 s of a 2 s heartbeat: two or three refreshes, not more.
        assert!((1..=4).contains(&writes), "{writes} writes in about 5 s");
    });
}

/// The original's own DaemonSet (ApsaraDB/PolarDB-Stack-Daemon
/// deploy/all.yaml) with only the image swapped: its flags, its env, no
/// added capabilities (`securityContext: {}` keeps a container runtime's
/// default set), no log mount. The daemon runs in the mode that allows,
/// says which and why, and crashes on nothing.
#[test]
fn the_originals_daemonset_runs_this_image_unchanged() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("polarbox.r", "20000-20010")]);
        let _l = tcp_listen(20004);
        // Docker's default capabilities: what `securityContext: {}` grants.
        let caps = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,+net_bind_service,\
                    +net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";
        let mut setpriv = Command::new("setpriv");
        setpriv.args(["--bounding-set", caps, "--inh-caps", "-all", "--"]);
        setpriv.env("NET_CARD_NAME", "bond1").env("NET_MASK", "255.255.0.0").env("MiniLvs_BackendIf", "bond0");
        setpriv.env("CURRENT_NODE_NAME", NODE);
        let kc = api.kubeconfig_path().to_str().expect("utf-8").to_string();
        let mut d = Daemon::start_with(
            setpriv,
            &[
                "--kubeconfig",
                &kc,
                "--v=5",
                "--logtostderr=false",
                "--log-dir=/kube-log",
                "--log-file=/kube-log/polardb-net.log",
                "--log-flush-frequency=2s",
                "--stderrthreshold=1",
                "--dbcluster-log-dir=/disk1/polardb_ppas/",
                "--ins-folder-overdue-days=7",
                "--events-enable-upload=true",
                "--events-upload-url=http://rds-redline-worker-log-api.rds:8080/",
                "--events-upload-timeout=3",
                "--job-enable-del-fip=true",
                "--job-enable-add-fip=true",
                "--polarstack-daemon-pod-labels=app=polarstack-daemon",
                "--core-version-cm-labels=configtype=minor_version_info,dbClusterMode=WriteReadMore",
                "--mpd-controller-cm-name=polardb4mpd-controller",
                "--service-owner-db-cluster=mpdcluster",
            ],
        );
        d.wait_ready();
        let ready = d.get_ok("/readyz");
        assert_eq!(ready["ports"]["mode"], "snapshot-only", "no CAP_BPF: dumps alone: {ready}");
        assert!(ready["ports"]["reason"].as_str().is_some_and(|r| r.contains("eBPF")), "{ready}");
        assert_eq!(d.metric("polarstack_ports_mode{mode=\"snapshot-only\"}"), 1.0);
        // Still the operator's answer: the port is published.
        assert!(
            wait_for(SOON, || operator::used_ports_of_node(&api, NODE).is_some_and(|p| p.contains(&20004))),
            "{:?}\n{}",
            operator::used_ports_of_node(&api, NODE),
            d.log_text()
        );
        let log = d.log_text();
        assert!(log.contains("degraded"), "the log says the mode: {log}");
        assert!(log.contains("--events-enable-upload"), "ignored legacy flags are named: {log}");
        // No log mount: a sweep deletes nothing and says why.
        let (code, v) = d.post("/api/v2/logs/sweep?dry_run=true").expect("sweep");
        assert!(code >= 400 || v.to_string().contains("polardb_ppas"), "{code} {v}");
        assert_eq!(d.get_ok("/healthz"), json!({"status": "ok"}));
    });
}

/// The original answered RequestCheckCoreVersion as soon as it was queued;
/// callers use short timeouts. A thousand at once answer at once and cost a
/// handful of API writes.
#[test]
fn request_check_core_version_answers_at_once_and_a_storm_costs_a_handful_of_writes() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        let d = daemon_for(api.kubeconfig_path(), NODE, &[]);
        api.clear_requests();
        let port = d.port;
        let started = std::time::Instant::now();
        let workers: Vec<_> = (0..20)
            .map(|_| {
                thread::spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(10)))
                        .build()
                        .into();
                    let mut slowest = Duration::ZERO;
                    for _ in 0..50 {
                        let t = std::time::Instant::now();
                        let mut r = agent
                            .post(&format!("http://127.0.0.1:{port}/api/v1/RequestCheckCoreVersion"))
                            .send_empty()
                            .expect("POST");
                        let body = r.body_mut().read_to_string().expect("body");
                        assert!(body.contains("\"data\":\"done\""), "{body}");
                        slowest = slowest.max(t.elapsed());
                    }
                    slowest
                })
            })
            .collect();
        let slowest = workers.into_iter().map(|w| w.join().expect("worker")).max().unwrap_or_default();
        eprintln!("1,000 requests in {:?}, slowest {slowest:?}", started.elapsed());
        assert!(slowest < Duration::from_secs(2), "an answer waited for the scan: {slowest:?}");
        thread::sleep(Duration::from_secs(2));
        let writes =
            api.requests().iter().filter(|r| r.is_write() && r.path.contains("polarstack-daemon-rescan")).count();
        assert!((1..=3).contains(&writes), "{writes} writes to the rescan bus for 1,000 requests");
    });
}
