//! The live port map, end to end: the real daemon binary with its eBPF
//! programs in the real kernel, inside a fresh network namespace per test,
//! checked against the kernel's own verdict.
use std::{process::Command, time::Duration};

use polarstack_tests::{
    in_new_netns, oracle, set_ephemeral_range, wait_event, wait_for,
    workload::{Band, Workload},
    Daemon,
};
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

const FIXED: std::ops::RangeInclusive<u16> = 20000..=20999;
const EPHEMERAL: (u16, u16) = (21000, 21999);
const TESTED: std::ops::RangeInclusive<u16> = 20000..=21999;

fn tcp_listener(port: u16) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into()).expect("bind");
    s.listen(16).expect("listen");
    s
}

fn udp_bound(port: u16) -> Socket {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    s.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into()).expect("bind");
    s
}

fn ebpf_mode(d: &Daemon) -> Value {
    d.get_ok("/readyz")["ports"]["mode"].clone()
}

#[test]
fn randomized_workload_matches_the_kernel_oracle() {
    in_new_netns(|| {
        set_ephemeral_range(EPHEMERAL.0, EPHEMERAL.1);
        let mut d = Daemon::start(&["--resync-interval", "1s", "--connected-resync-interval", "1s"]);
        d.wait_ready();
        assert_eq!(ebpf_mode(&d), "ebpf", "{}", d.log_text());
        let seed = std::env::var("WORKLOAD_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand_seed);
        eprintln!("workload seed {seed} (replay with WORKLOAD_SEED={seed})");
        let mut w = Workload::new(seed, Band { fixed: FIXED });
        let mut total_false_busy = 0;
        // Three rounds: the map must match after each, not just at the end.
        for round in 0..3 {
            w.run(1000);
            d.wait_full_resync();
            let (tcp, udp) = d.taken(*TESTED.start(), *TESTED.end());
            let verdict = oracle::judge(TESTED, &tcp, &udp);
            eprintln!(
                "round {round}: {} open sockets, {} taken (proto, port) pairs, false busy {} {:?}",
                w.open_sockets(),
                verdict.taken,
                verdict.false_busy.len(),
                &verdict.false_busy[..verdict.false_busy.len().min(10)]
            );
            assert!(verdict.false_free.is_empty(), "taken ports reported free (seed {seed}): {:?}", verdict.false_free);
            assert!(verdict.taken > 50, "the workload should hold many ports, held {}", verdict.taken);
            total_false_busy += verdict.false_busy.len();
            let mut states = std::collections::BTreeMap::<String, usize>::new();
            for (proto, port) in &verdict.false_busy {
                let one = d.get_ok(&format!("/api/v2/ports/{port}?proto={proto}"));
                let mut st: Vec<String> =
                    one["entries"].as_array().into_iter().flatten().map(|e| e["state"].to_string()).collect();
                st.sort();
                *states.entry(format!("{proto} {}", st.join("+"))).or_default() += 1;
            }
            eprintln!("round {round}: false busy by the daemon's states: {states:?}");
        }
        eprintln!("ops: {:?}; false busy over 3 rounds: {total_false_busy}", w.counts);
        assert!(w.counts.values().sum::<usize>() >= 2000, "at least 2,000 operations: {:?}", w.counts);
        // Closing everything: after a resync the band is free again, except
        // what TIME_WAIT still holds (the oracle agrees on those).
        w.close_all();
        d.wait_full_resync();
        let (tcp, udp) = d.taken(*TESTED.start(), *TESTED.end());
        let verdict = oracle::judge(TESTED, &tcp, &udp);
        assert!(verdict.false_free.is_empty(), "after close: {:?}", verdict.false_free);
        assert!(udp.is_empty(), "no UDP socket is left: {udp:?}");
    });
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

#[test]
fn sockets_from_before_the_start_are_in_the_map() {
    in_new_netns(|| {
        let _l = tcp_listener(20001);
        let _u = udp_bound(20002);
        // Bound, never listening: only sock_diag's bound-inactive state shows it.
        let bound = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        bound.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 20003)).into()).expect("bind");
        let mut d = Daemon::start(&[]);
        d.wait_ready();
        let tcp = d.get_ok("/api/v2/ports/20001?proto=tcp");
        assert_eq!(tcp["taken"], true, "{tcp}");
        assert_eq!(tcp["entries"][0]["state"], "listen");
        assert_eq!(tcp["entries"][0]["source"], "snapshot");
        assert_eq!(d.get_ok("/api/v2/ports/20002?proto=udp")["taken"], true);
        let b = d.get_ok("/api/v2/ports/20003");
        assert_eq!(b["entries"][0]["state"], "bound", "{b}");
        assert_eq!(d.get_ok("/api/v2/ports/20004")["taken"], false);
        // A pre-existing listener's close is reported like any other: the
        // daemon seeded the kernel's table with it.
        drop(_l);
        assert!(wait_for(Duration::from_secs(10), || d.get_ok("/api/v2/ports/20001?proto=tcp")["taken"] == false));
    });
}

#[test]
fn a_new_port_shows_up_in_the_api_and_the_watch_stream_and_leaves_both() {
    in_new_netns(|| {
        // A long resync period: what happens here is the events' doing.
        let mut d = Daemon::start(&["--resync-interval", "1h", "--connected-resync-interval", "1h"]);
        d.wait_ready();
        let events = d.watch("?proto=tcp&from=20000&to=20999");
        std::thread::sleep(Duration::from_millis(200)); // the stream is subscribed
        let l = tcp_listener(20500);
        assert!(wait_event(&events, "taken", 20500, Duration::from_secs(10)), "no `taken` event");
        let one = d.get_ok("/api/v2/ports/20500");
        assert_eq!(one["taken"], true, "{one}");
        assert_eq!(one["entries"][0]["source"], "event");
        let owner = &one["entries"][0]["owners"][0];
        assert_eq!(owner["pid"], std::process::id(), "owner is this test process: {one}");
        drop(l);
        assert!(wait_event(&events, "freed", 20500, Duration::from_secs(10)), "no `freed` event");
        assert_eq!(d.get_ok("/api/v2/ports/20500")["taken"], false);
        // Ports outside the watch filter are not streamed.
        let _other = tcp_listener(30500);
        let _in = tcp_listener(20501);
        assert!(wait_event(&events, "taken", 20501, Duration::from_secs(10)));
        assert_eq!(d.metric("polarstack_ports_dumps_total{scope=\"full\"}"), 1.0, "no resync was needed");
    });
}

#[test]
fn lost_events_are_detected_and_repaired() {
    in_new_netns(|| {
        set_ephemeral_range(EPHEMERAL.0, EPHEMERAL.1);
        // The smallest ring (about 50 events) and no periodic resync: only
        // the loss detector can bring the map back.
        let mut d = Daemon::start(&[
            "--ring-buffer-bytes",
            "4096",
            "--resync-interval",
            "1h",
            "--connected-resync-interval",
            "1h",
        ]);
        d.wait_ready();
        let mut w = Workload::new(7, Band { fixed: FIXED });
        let lost = polarstack_tests::overflow_the_ring(&d, &mut w);
        assert!(
            wait_for(Duration::from_secs(10), || d.get_ok("/readyz")["ports"]["stale"] == false),
            "the map stayed stale"
        );
        let repaired = d.metric("polarstack_ports_resync_repairs_total{kind=\"added\"}");
        assert!(repaired > 0.0, "the resync should have added the ports whose events were lost");
        let (tcp, udp) = d.taken(*TESTED.start(), *TESTED.end());
        let verdict = oracle::judge(TESTED, &tcp, &udp);
        assert!(verdict.false_free.is_empty(), "{:?}", verdict.false_free);
        let burst_ports = tcp.range(FIXED).count();
        assert_eq!(burst_ports, 1000, "every listener of the burst is in the map");
        eprintln!("lost {lost} events, resync added {repaired} sockets");
    });
}

#[test]
fn binds_in_another_namespace_never_appear() {
    in_new_netns(|| {
        let mut d = Daemon::start(&["--resync-interval", "1s", "--connected-resync-interval", "1s"]);
        d.wait_ready();
        // Another namespace, another thread: hold 100 listeners there.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            in_new_netns(move || {
                let held: Vec<Socket> = (20100..20200).map(tcp_listener).collect();
                let _u = udp_bound(20200);
                ready_tx.send(()).ok();
                rx.recv().ok();
                drop(held);
            })
        });
        ready_rx.recv().expect("other namespace ready");
        let mine = tcp_listener(20300);
        d.wait_full_resync();
        let (tcp, udp) = d.taken(20000, 20999);
        assert_eq!(tcp.into_iter().collect::<Vec<_>>(), vec![20300], "only this namespace's port");
        assert!(udp.is_empty());
        assert_eq!(
            d.metric("polarstack_ports_foreign_netns_events_total{where=\"daemon\"}"),
            0.0,
            "the kernel filters namespaces: none reach the daemon"
        );
        assert!(
            d.metric("polarstack_ports_foreign_netns_events_total{where=\"kernel\"}") >= 100.0,
            "the other namespace's binds were seen and dropped in the kernel"
        );
        tx.send(()).ok();
        other.join().expect("other namespace thread");
        drop(mine);
    });
}

#[test]
fn bad_requests_get_json_errors_and_change_nothing() {
    in_new_netns(|| {
        let mut d = Daemon::start(&[]);
        d.wait_ready();
        let _l = tcp_listener(20010);
        assert!(wait_for(Duration::from_secs(10), || d.get_ok("/api/v2/ports/20010")["taken"] == true));
        for (path, status, needle) in [
            ("/api/v2/ports?proto=sctp", 400, "proto"),
            ("/api/v2/ports?from=0", 400, "from"),
            ("/api/v2/ports?from=30000&to=20000", 400, "to"),
            ("/api/v2/ports?family=ipx", 400, "family"),
            ("/api/v2/ports?state=LISTENING", 400, "state"),
            ("/api/v2/ports?bogus=1", 400, "bogus"),
            ("/api/v2/ports?proto=tcp&proto=udp", 400, "proto"),
            ("/api/v2/ports/70000", 400, "port"),
            ("/api/v2/ports/-1", 400, "port"),
            ("/api/v2/ports/abc", 400, "port"),
            ("/api/v2/ports/free?from=1", 400, "to"),
            ("/api/v2/ports/free?from=1&to=10&count=0", 400, "count"),
            ("/api/v2/ports/free?from=1&to=10&proto=icmp", 400, "proto"),
            ("/api/v2/ports/watch?to=99999", 400, "to"),
            ("/api/v2/nothing", 404, "/api/v2/nothing"),
            ("/api/v2/ports?from=%ZZ", 400, "from"),
        ] {
            let (got, body) = d.get(path).expect("request");
            assert_eq!(got, status, "{path}: {body}");
            let err = body["error"].as_str().unwrap_or_else(|| panic!("{path}: no JSON error in {body}"));
            assert!(err.contains(needle), "{path}: error {err:?} should name {needle:?}");
        }
        // A request that is not HTTP at all does not take the server down.
        let garbage = polarstack_tests::raw_http(d.port, "\x16\x03\x01 not http\r\n\r\n");
        assert!(garbage.is_empty() || garbage.starts_with("HTTP/1.1 4"), "{garbage}");
        assert_eq!(d.get_ok("/healthz"), serde_json::json!({"status": "ok"}));
        assert_eq!(d.get_ok("/api/v2/ports/20010")["taken"], true, "state unchanged");
    });
}

#[test]
fn free_ports_skip_taken_ones_in_both_protocols() {
    in_new_netns(|| {
        let mut d = Daemon::start(&[]);
        d.wait_ready();
        let _t = tcp_listener(20021);
        let _u = udp_bound(20022);
        assert!(wait_for(Duration::from_secs(10), || {
            d.get_ok("/api/v2/ports/20021")["taken"] == true && d.get_ok("/api/v2/ports/20022")["taken"] == true
        }));
        let tcp = d.get_ok("/api/v2/ports/free?from=20020&to=20030&count=3");
        assert_eq!(tcp["ports"], serde_json::json!([20020, 20022, 20023]));
        let both = d.get_ok("/api/v2/ports/free?from=20020&to=20030&count=3&proto=both");
        assert_eq!(both["ports"], serde_json::json!([20020, 20023, 20024]));
        // The range's upper bound counts (the original never checked it).
        let last = d.get_ok("/api/v2/ports/free?from=20021&to=20021");
        assert_eq!(last["ports"], serde_json::json!([]));
    });
}

#[test]
fn without_ebpf_it_degrades_to_snapshots_and_says_so() {
    in_new_netns(|| {
        // A real missing capability: the bounding set drops CAP_BPF,
        // CAP_PERFMON and CAP_SYS_ADMIN, so the kernel refuses the programs.
        let mut setpriv = Command::new("setpriv");
        setpriv.args(["--bounding-set", "-bpf,-perfmon,-sys_admin", "--inh-caps", "-bpf,-perfmon,-sys_admin", "--"]);
        let mut d = Daemon::start_with(setpriv, &["--degraded-resync-interval", "200ms"]);
        d.wait_ready();
        let ready = d.get_ok("/readyz");
        assert_eq!(ready["ports"]["mode"], "snapshot-only", "{ready}");
        let reason = ready["ports"]["reason"].as_str().unwrap_or_default().to_string();
        assert!(reason.contains("eBPF"), "the reason names eBPF: {reason}");
        assert_eq!(d.metric("polarstack_ports_mode{mode=\"snapshot-only\"}"), 1.0);
        assert!(d.log_text().contains("degraded"), "the log says so");
        // Still correct, just slower.
        let _l = tcp_listener(20040);
        assert!(wait_for(Duration::from_secs(10), || d.get_ok("/api/v2/ports/20040")["taken"] == true));
    });
}

#[test]
fn sigterm_stops_the_daemon_promptly_and_detaches() {
    in_new_netns(|| {
        let mut d = Daemon::start(&[]);
        d.wait_ready();
        // Keep a watch stream open: it must not hold the shutdown up.
        let _events = d.watch("");
        std::thread::sleep(Duration::from_millis(100));
        let (status, took) = d.terminate().expect("terminate");
        assert!(status.success(), "exit status {status}");
        eprintln!("SIGTERM to exit: {took:?}");
        assert!(took < Duration::from_secs(5), "took {took:?}; the original waited out the grace period");
    });
}

/// A cgroup named the way container runtimes name theirs, removed on drop.
struct ContainerCgroup {
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn owners_name_the_container_their_cgroup_belongs_to() {
    in_new_netns(|| {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
            .expect("a cgroup v2 mount");
        let id = format!("{:016x}", rand_seed()).repeat(4);
        let dir = root.join(format!("cri-containerd-{id}.scope"));
        std::fs::create_dir(&dir).expect("create a cgroup (root, cgroup v2)");
        let mut guard = ContainerCgroup { dir: dir.clone(), child: None };
        let mut d = Daemon::start(&[]);
        d.wait_ready();
        // A process that joins the cgroup, then listens, like a containerized database.
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec python3 -c 'import socket,time; s=socket.socket(); \
             s.bind((\"0.0.0.0\",20600)); s.listen(); time.sleep(60)'",
            dir.display()
        );
        guard.child = Some(Command::new("sh").args(["-c", &script]).spawn().expect("start a listener"));
        assert!(
            wait_for(Duration::from_secs(10), || d.get_ok("/api/v2/ports/20600")["taken"] == true),
            "the containerized listener never showed up"
        );
        let one = d.get_ok("/api/v2/ports/20600");
        let owner = &one["entries"][0]["owners"][0];
        assert_eq!(owner["comm"], "python3", "{one}");
        assert_eq!(owner["container"], id.as_str(), "{one}");
    });
}
