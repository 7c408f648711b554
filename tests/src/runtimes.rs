//! Real container runtimes for tests: containerd (with its CRI plugin) and
//! dockerd on top of it, on private sockets under a temp dir, so tests never
//! touch the machine's own runtimes. Both are killed on drop.
//!
//! Image fixtures need no registry: [`Runtimes::docker_import`] makes an
//! empty image under a name, [`Runtimes::ctr_import`] loads one into
//! containerd's `k8s.io` namespace (the one CRI serves).
use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{in_ci, run_ok, wait_for};

pub struct Runtimes {
    pub dir: tempdir::Dir,
    pub containerd_sock: PathBuf,
    pub docker_sock: PathBuf,
    containerd: Option<Child>,
    dockerd: Option<Child>,
}

/// A temp dir removed on drop (no extra dependency for one struct).
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> Self {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let p = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).expect("create temp dir");
            Self(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            // dockerd leaves overlay mounts behind only while running; it is
            // stopped before this runs.
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// True when dockerd and containerd are installed; under CI their absence is
/// a failure (`.ci/run` installs docker.io).
pub fn available() -> bool {
    let ok = ["dockerd", "containerd", "ctr", "docker"].iter().all(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok && in_ci() {
        panic!("dockerd/containerd/ctr/docker not installed (apt-get install docker.io): required under CI");
    }
    ok
}

/// GET `path` over a unix socket; true on a 200 answer.
fn http_ok(sock: &Path, path: &str) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.0 200") || buf[..n].starts_with(b"HTTP/1.1 200"))
}

impl Runtimes {
    /// Starts containerd, then dockerd on it; waits until both answer.
    pub fn start() -> Self {
        let dir = tempdir::Dir::new("psd-runtimes");
        let d = dir.path().to_path_buf();
        let mut rt = Self {
            containerd_sock: d.join("containerd.sock"),
            docker_sock: d.join("docker.sock"),
            dir,
            containerd: None,
            dockerd: None,
        };
        rt.start_containerd();
        rt.start_dockerd();
        rt
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(name)).expect("runtime log")
    }

    pub fn start_containerd(&mut self) {
        let d = self.dir.path();
        let child = Command::new("containerd")
            .arg("--address")
            .arg(&self.containerd_sock)
            .arg("--root")
            .arg(d.join("ctrd-root"))
            .arg("--state")
            .arg(d.join("ctrd-state"))
            .stdout(Stdio::null())
            .stderr(self.log("containerd.log"))
            .spawn()
            .expect("start containerd");
        self.containerd = Some(child);
        let up = wait_for(Duration::from_secs(20), || {
            self.ctr(&["version"]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        });
        assert!(up, "containerd did not start: {}", self.log_text("containerd.log"));
    }

    pub fn start_dockerd(&mut self) {
        let d = self.dir.path();
        let child = Command::new("dockerd")
            .arg("--host")
            .arg(format!("unix://{}", self.docker_sock.display()))
            .arg("--containerd")
            .arg(&self.containerd_sock)
            .arg("--data-root")
            .arg(d.join("docker-data"))
            .arg("--exec-root")
            .arg(d.join("docker-exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .stdout(Stdio::null())
            .stderr(self.log("dockerd.log"))
            .spawn()
            .expect("start dockerd");
        self.dockerd = Some(child);
        let up = wait_for(Duration::from_secs(30), || http_ok(&self.docker_sock, "/_ping"));
        assert!(up, "dockerd did not start: {}", self.log_text("dockerd.log"));
    }

    /// Stops dockerd (SIGTERM, then waits), leaving containerd running.
    pub fn stop_dockerd(&mut self) {
        if let Some(mut c) = self.dockerd.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Stops containerd (SIGTERM, then waits); dockerd loses its containerd.
    pub fn stop_containerd(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) both runtimes: their sockets
    /// still accept connections, and nothing answers, as a hung runtime does.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        for c in [&self.containerd, &self.dockerd].into_iter().flatten() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// `unix:///.../docker.sock`, for DOCKER_HOST.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.docker_sock.display())
    }

    /// The docker CLI pointed at this dockerd.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", self.docker_host()).args(args);
        c
    }

    /// ctr pointed at this containerd, in CRI's `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.containerd_sock).args(["--namespace", "k8s.io"]).args(args);
        c
    }

    /// An empty image named `name` in dockerd (`docker import` of an empty tar).
    pub fn docker_import(&self, name: &str) {
        run_ok(&mut self.docker(&["import", "-", name]), Some(&empty_tar()));
    }

    /// The image `name` from dockerd, saved and imported into containerd's
    /// `k8s.io` namespace (containerd names it `docker.io/...`).
    pub fn ctr_import_from_docker(&self, name: &str) {
        let tar = self.dir.path().join(format!("img-{}.tar", name.replace(['/', ':'], "_")));
        run_ok(&mut self.docker(&["save", "-o", tar.to_str().expect("utf-8"), name]), None);
        run_ok(&mut self.ctr(&["images", "import", tar.to_str().expect("utf-8")]), None);
    }
}

/// A tar archive with no members (two zero blocks).
fn empty_tar() -> Vec<u8> {
    vec![0u8; 1024]
}

impl Drop for Runtimes {
    fn drop(&mut self) {
        // A frozen runtime would never act on its SIGTERM.
        self.freeze(false);
        self.stop_dockerd();
        self.stop_containerd();
        // Unmount anything the runtimes left under the dir before it is removed.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.path().display()
            ))
            .status();
    }
}
