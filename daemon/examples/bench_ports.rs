//! `cargo xtask bench ports`: how the ways of knowing a host's taken ports
//! compare, in one run, on this machine. Runs as root inside its own network
//! namespace, so the host's sockets do not blur the figures.
//!
//! 1. Snapshot cost with 1k / 10k / 100k established TCP connections:
//!    sock_diag (this daemon), parsing /proc/net/tcp{,6}, `ss -tuan`, and the
//!    Go daemon's bind-probe of the six default PolarDB ranges.
//! 2. bind() -> visible in the HTTP watch stream, p50/p99, daemon running.
//! 3. The daemon's idle CPU and RSS.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark: a failure ends it")]
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::{cpu_ticks, daemon_bin, start_daemon, status_kib, ticks_per_second};
use polarstack_daemon::ports::{
    map::{Scope, Tables},
    model::Proto,
    sockdiag::SockDiag,
};

/// The Go daemon's watched ranges (the shipped `polardb4mpd-controller` defaults).
const POLARDB_RANGES: [(u16, u16); 6] =
    [(5400, 5800), (15400, 15800), (16000, 16400), (30000, 32999), (33000, 35999), (36000, 39999)];

/// Connections one holder process keeps (each is two descriptors; this
/// sandbox caps a process at 20,000 and CAP_SYS_RESOURCE is not granted).
const PER_HOLDER: usize = 9_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--hold") {
        return hold(args[2].parse().expect("count"), args[3].parse().expect("port"));
    }
    // SAFETY: unshare affects only this (main) thread, before any other exists.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!("bench_ports needs root (unshare CLONE_NEWNET): {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    run(&["ip", "link", "set", "lo", "up"]);
    // Listeners on ports outside the PolarDB ranges; clients from 40000 up.
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 65000").expect("port range");

    let bin = daemon_bin();
    let mut daemon = start_daemon(&bin);
    let (cpu, rss) = idle(daemon.id(), Duration::from_secs(10));
    println!("== the daemon ({bin}) ==");
    println!("idle over 10 s in a quiet namespace: {cpu:.2} millicores, RSS {rss} KiB\n");
    // Stopped while the other ways are timed, so it does not compete for CPU.
    let _ = daemon.kill();
    let _ = daemon.wait();

    println!("== cost of one look at the host's ports, median of 5, in ms ==");
    println!("   this daemon (sock_diag)                          | other ways");
    println!(
        "{:>11} | {:>8} {:>12} {:>13} | {:>11} {:>9} {:>14}",
        "established", "full", "periodic", "verify 1 port", "/proc/net/*", "ss -tuan", "bind-probe(Go)"
    );
    let mut holders = Holders::default();
    let mut diag = SockDiag::new().expect("sock_diag");
    for target in [1_000usize, 10_000, 100_000] {
        holders.top_up(target);
        let sockets = diag.dump(&Scope::FULL).expect("dump").sockets.len();
        let t_full = median(5, || {
            diag.dump(&Scope::FULL).expect("dump");
        });
        let t_unconnected = median(5, || {
            diag.dump(&Scope::FAST).expect("dump");
        });
        let one = Scope::ports([(Proto::Tcp, 5432)].into(), Tables::LISTEN);
        let t_one = median(5, || {
            diag.dump(&one).expect("dump");
        });
        let t_proc = median(5, || {
            let n = parse_proc_net();
            assert!(n >= target);
        });
        let t_ss = median(5, || run_quiet(&["ss", "-tuan"]));
        let t_probe = median(3, bind_probe_ranges);
        println!(
            "{:>11} | {:>8.3} {:>12.3} {:>13.3} | {:>11.3} {:>9.3} {:>14.3}   ({sockets} sockets in the namespace)",
            holders.count,
            ms(t_full),
            ms(t_unconnected),
            ms(t_one),
            ms(t_proc),
            ms(t_ss),
            ms(t_probe)
        );
    }
    println!("(full: every table, at start and every --connected-resync-interval; periodic: listeners and UDP,");
    println!(" every --resync-interval; verify 1 port: after a listener closes)");

    println!("\n== the daemon with {} established connections ==", holders.count);
    let mut daemon = start_daemon(&bin);
    let pid = daemon.id();
    let lat = bind_to_api_latency(300);
    println!(
        "bind -> watch stream: n={} p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        lat.len(),
        ms(pct(&lat, 50)),
        ms(pct(&lat, 99)),
        ms(pct(&lat, 100))
    );
    // 30 s: one full resync (every table) and six fast ones, as configured.
    let (cpu, rss) = idle(pid, Duration::from_secs(30));
    println!(
        "idle over 30 s, {} established connections (default resync periods): {cpu:.2} millicores, RSS {rss} KiB",
        holders.count
    );
    drop(holders);
    let _ = daemon.kill();
    let _ = daemon.wait();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(n: usize, mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[n / 2]
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    let i = ((sorted.len() * p).div_ceil(100)).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn run(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().expect("run");
    assert!(st.success(), "{args:?}");
}

fn run_quiet(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).status().expect("run");
    assert!(st.success(), "{args:?}");
}

/// Child processes that each hold up to PER_HOLDER established connections
/// (both ends) in this namespace; they exit when their stdin closes.
#[derive(Default)]
struct Holders {
    children: Vec<std::process::Child>,
    count: usize,
}

impl Holders {
    fn top_up(&mut self, target: usize) {
        let me = std::env::current_exe().expect("current exe");
        while self.count < target {
            let n = (target - self.count).min(PER_HOLDER);
            let port = 2000 + self.children.len();
            let mut child = Command::new(&me)
                .args(["--hold", &n.to_string(), &port.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start holder");
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("holder ready");
            assert_eq!(line.trim(), "ready", "holder failed");
            self.children.push(child);
            self.count += n;
        }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for c in &mut self.children {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

fn hold(n: usize, port: u16) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("listener");
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        conns.push((c, s));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink); // EOF: the parent is done
}

/// What a parser of /proc/net/tcp{,6} must do: read and split every line.
fn parse_proc_net() -> usize {
    let mut n = 0;
    for f in ["/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(f).expect("read /proc/net");
        for line in text.lines().skip(1) {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1).unwrap_or("");
            let port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            let state = cols.nth(1).and_then(|s| u8::from_str_radix(s, 16).ok());
            if port.is_some() && state.is_some() {
                n += 1;
            }
        }
    }
    n
}

/// The Go daemon's method: try to listen on every port of every range.
fn bind_probe_ranges() {
    for (lo, hi) in POLARDB_RANGES {
        for p in lo..=hi {
            let _ = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, p)));
        }
    }
}

/// Time from a listen() returning to the matching `taken` event arriving on
/// the watch stream.
fn bind_to_api_latency(n: u16) -> Vec<Duration> {
    let mut stream = TcpStream::connect(("127.0.0.1", 8900)).expect("watch");
    write!(stream, "GET /api/v2/ports/watch?proto=tcp&from=30000&to=39999 HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if line.starts_with("data: ") && tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    thread::sleep(Duration::from_millis(200));
    let mut out = Vec::new();
    for i in 0..n {
        let port = 30000 + i;
        let t = Instant::now();
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
        let needle = format!("\"port\":{port}");
        loop {
            let (at, line) = rx.recv_timeout(Duration::from_secs(5)).expect("event within 5 s");
            if line.contains(&needle) {
                out.push(at - t);
                break;
            }
        }
        drop(l);
        // Let the freed event pass so the next measurement starts quiet.
        let _ = rx.recv_timeout(Duration::from_millis(50));
    }
    out.sort();
    out
}

/// CPU (millicores) and RSS (KiB) of `pid` over `window`.
fn idle(pid: u32, window: Duration) -> (f64, u64) {
    let before = cpu_ticks(pid);
    thread::sleep(window);
    let used = (cpu_ticks(pid) - before) as f64 / ticks_per_second();
    (used / window.as_secs_f64() * 1000.0, status_kib(pid, "VmRSS:"))
}
