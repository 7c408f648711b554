//! Support for whole-system tests: the real daemon binary, started inside a
//! fresh network namespace, talked to over HTTP, and checked against what the
//! kernel itself says (the oracle).
//!
//! Namespaces: [`in_new_netns`] runs a closure on a new thread that has
//! unshared its network namespace. Sockets that thread creates, threads it
//! spawns and processes it starts (the daemon) all live in that namespace, and
//! the namespace disappears with them. Tests therefore run in parallel without
//! seeing each other's ports.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod aged_fs;
pub mod cluster;
pub mod fake_api;
pub mod operator;
pub mod oracle;
pub mod runtimes;
pub mod workload;

/// True when running under CI, where a missing component is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Runs `f` on a new thread inside a new, empty network namespace with `lo` up.
pub fn in_new_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let handle = thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces; no other
        // thread is touched.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {} (tests must run as root)", std::io::Error::last_os_error());
        let st = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("run `ip` (iproute2)");
        assert!(st.success(), "ip link set lo up");
        f()
    });
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Sets this namespace's ephemeral port range (sysctl files under /proc/sys/net
/// belong to the namespace of the thread that opens them).
pub fn set_ephemeral_range(lo: u16, hi: u16) {
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", format!("{lo} {hi}")).expect("set ip_local_port_range");
}

/// The daemon binary: POLARSTACK_DAEMON_BIN (set by `cargo xtask test`), else
/// the workspace's debug build.
pub fn daemon_bin() -> PathBuf {
    let bin = std::env::var_os("POLARSTACK_DAEMON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/polarstack-daemon"));
    assert!(bin.is_file(), "daemon binary {} not found: run the tests with `cargo xtask test`", bin.display());
    bin
}

/// A running daemon, killed on drop. Start it on an [`in_new_netns`] thread.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    agent: ureq::Agent,
    log: PathBuf,
}

pub const HTTP_PORT: u16 = 8900;

/// How long a start (and the first full dump) may take. Generous because the
/// VM matrix runs under TCG on two shared cores, where the 5.10 verifier alone
/// takes over ten seconds; on real hardware a start takes well under one.
pub const START_TIMEOUT: Duration = Duration::from_secs(90);

impl Daemon {
    /// Starts the daemon with `args` (plus `--port 8900 --listen-address 127.0.0.1`)
    /// and waits for /healthz.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(Command::new(daemon_bin()), args)
    }

    /// Like [`Daemon::start`], with a prepared command (for a wrapper such as
    /// `setpriv` the daemon binary is appended as the last argument).
    pub fn start_with(cmd: Command, args: &[&str]) -> Self {
        Self::start_full(cmd, HTTP_PORT, args)
    }

    /// Like [`Daemon::start`] on another HTTP port (two daemons in one namespace).
    pub fn start_at(port: u16, args: &[&str]) -> Self {
        Self::start_full(Command::new(daemon_bin()), port, args)
    }

    fn start_full(mut cmd: Command, port: u16, args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "polarstack-test-{}-{}.log",
            std::process::id(),
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        ));
        let log_file = std::fs::File::create(&log).expect("create daemon log");
        if cmd.get_program() != daemon_bin().as_os_str() {
            cmd.arg(daemon_bin());
        }
        // POLARSTACK_TEST_DAEMON_ARGS: flags added to every daemon a test
        // starts, e.g. `--force-bound-iter` to run the suite the way kernels
        // before 6.5 list bound sockets.
        let extra: Vec<String> = std::env::var("POLARSTACK_TEST_DAEMON_ARGS")
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let child = cmd
            .args(["--port", &port.to_string(), "--listen-address", "127.0.0.1"])
            .args(args)
            .args(&extra)
            .env("RUST_LOG", "polarstack_daemon=debug,info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start the daemon");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut d = Self { child: Some(child), port, agent, log };
        let up = wait_for(START_TIMEOUT, || d.get("/healthz").is_ok_and(|(s, _)| s == 200));
        if !up {
            panic!("daemon did not answer /healthz:\n{}", d.log_text());
        }
        d
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&mut self) -> String {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return format!("(exited: {st})\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// GET a path; the status and the body parsed as JSON (Null if not JSON).
    pub fn get(&self, path: &str) -> Result<(u16, Value)> {
        let mut resp = self.agent.get(&self.url(path)).call().with_context(|| format!("GET {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().context("read body")?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// POST an empty body; the status and the body parsed as JSON.
    pub fn post(&self, path: &str) -> Result<(u16, Value)> {
        let mut resp = self.agent.post(&self.url(path)).send_empty().with_context(|| format!("POST {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().context("read body")?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// POST an empty body with `Authorization: Bearer <token>` when given.
    pub fn post_as(&self, path: &str, token: Option<&str>) -> Result<(u16, Value)> {
        let mut req = self.agent.post(&self.url(path));
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.send_empty().with_context(|| format!("POST {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().context("read body")?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// The exit status, once the process has exited (it stays reaped here,
    /// so [`Daemon::log_text`] still reads its log).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn get_ok(&self, path: &str) -> Value {
        match self.get(path) {
            Ok((200, v)) => v,
            other => panic!("GET {path}: {other:?}"),
        }
    }

    pub fn metrics(&self) -> String {
        let mut resp = self.agent.get(&self.url("/metrics")).call().expect("GET /metrics");
        resp.body_mut().read_to_string().expect("metrics body")
    }

    /// The value of one sample, e.g. `polarstack_ports_lost_events_total` or
    /// `polarstack_ports_resync_repairs_total{kind="added"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {sample} not found in:\n{text}"))
    }

    pub fn wait_ready(&mut self) {
        let ok = wait_for(START_TIMEOUT, || self.get("/readyz").is_ok_and(|(s, _)| s == 200));
        if !ok {
            panic!("daemon not ready:\n{}", self.log_text());
        }
    }

    /// Waits for a full resync that started after this call, so the map
    /// reflects everything done before it (including what no hook sees).
    pub fn wait_full_resync(&mut self) {
        let before = self.metric("polarstack_ports_dumps_total{scope=\"full\"}");
        // The dump counted next may have started before this call: wait for two.
        let ok = wait_for(Duration::from_secs(30), || {
            self.metric("polarstack_ports_dumps_total{scope=\"full\"}") >= before + 2.0
                && self.get("/readyz").is_ok_and(|(_, v)| v["ports"]["stale"] == false)
        });
        if !ok {
            panic!("no full resync happened:\n{}", self.log_text());
        }
    }

    /// The daemon's answers over [from, to]: the ports it lists as taken,
    /// and whether it vouches, per protocol, that a port it does not list
    /// is free (no blind spot of this kernel could hide one).
    pub fn answers(&self, from: u16, to: u16) -> Answers {
        let v = self.get_ok(&format!("/api/v2/ports?from={from}&to={to}"));
        assert_eq!(v["complete"], true, "map incomplete: {v}");
        let (tcp, udp) = self.taken(from, to);
        Answers {
            tcp,
            udp,
            tcp_certain: v["certain"]["tcp"].as_bool().expect("certain.tcp"),
            udp_certain: v["certain"]["udp"].as_bool().expect("certain.udp"),
        }
    }

    /// Taken ports in [from, to] by protocol, as the daemon reports them
    /// (every page of the listing).
    pub fn taken(&self, from: u16, to: u16) -> (std::collections::BTreeSet<u16>, std::collections::BTreeSet<u16>) {
        let mut tcp = std::collections::BTreeSet::new();
        let mut udp = std::collections::BTreeSet::new();
        let mut after = String::new();
        loop {
            let v = self.get_ok(&format!("/api/v2/ports?from={from}&to={to}{after}"));
            assert_eq!(v["complete"], true, "map incomplete: {v}");
            for e in v["ports"].as_array().expect("ports array") {
                if e["blocking"] == false {
                    continue; // listed, but a SO_REUSEADDR listener could share it
                }
                let port = e["port"].as_u64().expect("port") as u16;
                match e["proto"].as_str() {
                    Some("tcp") => tcp.insert(port),
                    Some("udp") => udp.insert(port),
                    other => panic!("unexpected proto {other:?}"),
                };
            }
            match v["next"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => return (tcp, udp),
            }
        }
    }

    /// Opens the SSE watch stream; lines arrive on the returned channel.
    pub fn watch(&self, query: &str) -> mpsc::Receiver<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect for watch");
        write!(
            stream,
            "GET /api/v2/ports/watch{query} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
        )
        .expect("send watch request");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took.
    pub fn terminate(&mut self) -> Result<(std::process::ExitStatus, Duration)> {
        let Some(mut child) = self.child.take() else { bail!("already stopped") };
        let t = Instant::now();
        // SAFETY: signalling our own child process by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok((st, t.elapsed()));
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("daemon ignored SIGTERM for 30 s");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("daemon log kept at {}", self.log.display());
        }
    }
}

/// What the daemon says of a band of ports (see [`Daemon::answers`]).
#[derive(Debug)]
pub struct Answers {
    pub tcp: std::collections::BTreeSet<u16>,
    pub udp: std::collections::BTreeSet<u16>,
    pub tcp_certain: bool,
    pub udp_certain: bool,
}

/// Waits for an SSE event of `kind` about `port`, reading lines from `rx`.
pub fn wait_event(rx: &mpsc::Receiver<String>, kind: &str, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut last_event = String::new();
    let needle = format!("\"port\":{port}");
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            return false;
        };
        if let Some(ev) = line.strip_prefix("event: ") {
            last_event = ev.trim().to_string();
        } else if line.starts_with("data: ") && last_event == kind && line.contains(&needle) {
            return true;
        }
    }
    false
}

/// Runs a command to completion, feeding `stdin` when given, and panics with
/// its status and output when it fails; returns the output to read.
pub fn run_ok(cmd: &mut Command, stdin: Option<&[u8]>) -> std::process::Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`run_ok`] for a command line given as words: `sh(&["ip", "link", "set", "x", "up"])`.
pub fn sh(args: &[&str]) -> std::process::Output {
    run_ok(Command::new(args[0]).args(&args[1..]), None)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Overflows the daemon's ring buffer (start it with `--ring-buffer-bytes
/// 4096`) with bursts of 1,000 listeners from `w`, and returns how many
/// events it lost. Fails the test if ten bursts never overflow it.
pub fn overflow_the_ring(d: &Daemon, w: &mut workload::Workload) -> f64 {
    for _ in 0..10 {
        w.close_all();
        w.burst(1000);
        if wait_for(Duration::from_secs(2), || d.metric("polarstack_ports_lost_events_total") > 0.0) {
            return d.metric("polarstack_ports_lost_events_total");
        }
    }
    panic!("a 1,000-listener burst never overflowed a 4 KiB ring");
}

/// Reads a whole response from a raw request: for tests of malformed requests.
pub fn raw_http(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
