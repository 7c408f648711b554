//! What the benchmarks share: talking to the daemon under test on
//! 127.0.0.1:8900, and reading a process's CPU and memory from /proc.
#![allow(dead_code, reason = "each benchmark uses a part of it")]
use std::{
    io::Write,
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

/// The daemon binary to measure: POLARSTACK_DAEMON_BIN (set by `cargo xtask
/// bench`), else the release build.
pub fn daemon_bin() -> String {
    std::env::var("POLARSTACK_DAEMON_BIN").unwrap_or_else(|_| "target/release/polarstack-daemon".into())
}

/// Starts the daemon on 127.0.0.1:8900, quiet, and waits until it is ready.
pub fn start_daemon(bin: &str) -> Child {
    let child = Command::new(bin)
        .args(["--port", "8900", "--listen-address", "127.0.0.1", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start daemon");
    wait_ready();
    child
}

/// A whole HTTP/1.1 response to `GET path`, or None when the daemon is not there.
pub fn http_get(path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", 8900)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).ok()?;
    Some(out)
}

/// Waits (up to 30 s) for `/readyz` to answer 200.
pub fn wait_ready() {
    for _ in 0..1500 {
        if http_get("/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("daemon not ready");
}

/// User plus system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Clock ticks per second.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// A `kB` field of /proc/<pid>/status (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}
