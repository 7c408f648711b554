//! `cargo xtask bench churn`: what the daemon costs while the node opens and
//! closes connections, side by side with its idle figure, in one run.
//!
//! The daemon runs in its own network namespace (this process's); a second
//! namespace is joined to it by a veth pair. Outbound: a client here connects
//! to a server there. Inbound: a client there connects to a server here. Each
//! connection is closed with RST (no TIME_WAIT), as the measurements in issue
//! 14 did. For every rate the table shows the daemon's CPU (millicores over
//! the window), its RSS at the end and its peak, and the eBPF events that
//! reached userspace per second.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark: a failure ends it")]
mod common;

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{cpu_ticks, daemon_bin, http_get, start_daemon, status_kib, ticks_per_second};

const RATES: [u64; 3] = [200, 2_000, 20_000];
const WINDOW: Duration = Duration::from_secs(10);
const HERE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const THERE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PORT: u16 = 45_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--serve") => return serve(args[2].parse().expect("addr"), None),
        Some("--connect") => {
            let stop = Arc::new(AtomicBool::new(false));
            let n = connect_at(args[2].parse().expect("addr"), args[3].parse().expect("rate"), WINDOW, &stop);
            println!("{n}");
            return;
        }
        _ => {}
    }
    // SAFETY: unshare affects only this (main) thread, before any other exists.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!("bench_churn needs root (unshare CLONE_NEWNET): {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    run(&["ip", "link", "set", "lo", "up"]);
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000").expect("port range");
    let mut peer = Command::new("unshare").args(["--net", "sleep", "3600"]).spawn().expect("peer namespace");
    thread::sleep(Duration::from_millis(300));
    let p = peer.id().to_string();
    run(&["ip", "link", "add", "churn0", "type", "veth", "peer", "name", "churn1", "netns", &p]);
    run(&["ip", "addr", "add", &format!("{HERE}/24"), "dev", "churn0"]);
    run(&["ip", "link", "set", "churn0", "up"]);
    for cmd in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", "10.77.0.2/24", "dev", "churn1"],
        vec!["ip", "link", "set", "churn1", "up"],
        vec!["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000"],
    ] {
        let mut full = vec!["nsenter", "-t", &p, "-n"];
        full.extend(cmd);
        run(&full);
    }

    let bin = daemon_bin();
    let mut daemon = start_daemon(&bin);
    let pid = daemon.id();
    let mode = http_get("/readyz").unwrap_or_default();
    let mode = if mode.contains("\"mode\":\"ebpf\"") { "ebpf" } else { "snapshot-only" };
    println!("== the daemon ({bin}, mode {mode}) under connection churn, {}-second windows ==", WINDOW.as_secs());
    println!(
        "{:<10} {:>10} {:>12} {:>12} {:>9} {:>10} {:>14} {:>16}",
        "direction", "target/s", "achieved/s", "millicores", "RSS MiB", "peak MiB", "events/s seen", "verify dumps/s"
    );
    let m = measure(pid, || thread::sleep(WINDOW));
    print_row("idle", 0, 0, &m);
    let me = std::env::current_exe().expect("own path");
    for rate in RATES {
        // Outbound: the client is here, the server in the peer namespace.
        let mut server = Command::new("nsenter")
            .args(["-t", &p, "-n"])
            .arg(&me)
            .args(["--serve", &SocketAddr::from((THERE, PORT)).to_string()])
            .spawn()
            .expect("peer server");
        thread::sleep(Duration::from_millis(300));
        let stop = Arc::new(AtomicBool::new(false));
        let made = AtomicU64::new(0);
        let m = measure(pid, || {
            made.store(connect_at(SocketAddr::from((THERE, PORT)), rate, WINDOW, &stop), Ordering::Relaxed);
        });
        print_row("outbound", rate, made.load(Ordering::Relaxed), &m);
        kill(&mut server);

        // Inbound: the server is here, the client in the peer namespace.
        let stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind((HERE, PORT + 1)).expect("listen");
        let server = {
            let stop = stop.clone();
            thread::spawn(move || serve_on(listener, Some(stop)))
        };
        let mut client = None;
        let m = measure(pid, || {
            let out = Command::new("nsenter")
                .args(["-t", &p, "-n"])
                .arg(&me)
                .args(["--connect", &SocketAddr::from((HERE, PORT + 1)).to_string(), &rate.to_string()])
                .stderr(Stdio::inherit())
                .output()
                .expect("peer client");
            client = String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().ok();
        });
        stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect((HERE, PORT + 1));
        let _ = server.join();
        print_row("inbound", rate, client.unwrap_or(0), &m);
    }
    kill(&mut daemon);
    kill(&mut peer);
}

struct Measured {
    millicores: f64,
    rss_kib: u64,
    peak_kib: u64,
    events_per_s: f64,
    verify_dumps_per_s: f64,
}

fn measure(pid: u32, work: impl FnOnce()) -> Measured {
    let events = || metric_sum("polarstack_ports_events_total");
    let verifies = || metric_sum("polarstack_ports_dumps_total{scope=\"ports\"}");
    let (e0, v0, c0, t0) = (events(), verifies(), cpu_ticks(pid), Instant::now());
    work();
    let secs = t0.elapsed().as_secs_f64();
    let (c1, e1, v1) = (cpu_ticks(pid), events(), verifies());
    let hz = ticks_per_second();
    Measured {
        millicores: (c1 - c0) as f64 / hz / secs * 1000.0,
        rss_kib: status_kib(pid, "VmRSS:"),
        peak_kib: status_kib(pid, "VmHWM:"),
        events_per_s: (e1 - e0) / secs,
        verify_dumps_per_s: (v1 - v0) / secs,
    }
}

fn print_row(direction: &str, target: u64, made: u64, m: &Measured) {
    let achieved = made as f64 / WINDOW.as_secs_f64();
    println!(
        "{direction:<10} {target:>10} {achieved:>12.0} {:>12.1} {:>9.1} {:>10.1} {:>14.0} {:>16.1}",
        m.millicores,
        m.rss_kib as f64 / 1024.0,
        m.peak_kib as f64 / 1024.0,
        m.events_per_s,
        m.verify_dumps_per_s
    );
}

/// Connects to `to` at `rate` per second for `window`, each connection
/// closed with RST at once; returns how many were made.
fn connect_at(to: SocketAddr, rate: u64, window: Duration, stop: &AtomicBool) -> u64 {
    let start = Instant::now();
    let mut made = 0u64;
    while start.elapsed() < window && !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if made >= due {
            thread::sleep(Duration::from_micros(200));
            continue;
        }
        if let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: a valid socket and a linger struct of the right size.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            made += 1;
        }
    }
    made
}

fn serve(addr: SocketAddr, stop: Option<Arc<AtomicBool>>) {
    serve_on(TcpListener::bind(addr).expect("listen"), stop);
}

/// Accepts and drops every connection until `stop`.
fn serve_on(listener: TcpListener, stop: Option<Arc<AtomicBool>>) {
    // std listens with a backlog of 128: at 20,000/s a short stall would
    // drop SYNs and cost the client a one-second retransmit.
    // SAFETY: a valid listening socket; listen() again only resizes the backlog.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    for c in listener.incoming() {
        if stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            return;
        }
        drop(c);
    }
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// The sum of a family's samples, or of the one sample `family` names when
/// it carries labels.
fn metric_sum(family: &str) -> f64 {
    let text = http_get("/metrics").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(family) && (family.ends_with('}') || l[family.len()..].starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn run(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().expect(args[0]);
    assert!(st.success(), "{args:?}");
}
