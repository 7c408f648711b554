//! Developer tasks. Every task installs what it needs first, so the README's
//! two commands work on a fresh Debian 12 machine:
//!
//!   cargo xtask run [-- DAEMON FLAGS]   set up, build, run the daemon standalone
//!   cargo xtask test [-- TEST ARGS]     set up, build, run every test
//!   cargo xtask build-ebpf              build the eBPF object only
//!   cargo xtask setup                   install the toolchain and mounts only
//!   cargo xtask bench ports             port benchmarks (see daemon/examples)
//!   cargo xtask bench logs              log sweep vs `find -delete` on a 1M-file tree
//!   cargo xtask fake-apiserver [-- ARGS] the tests' fake Kubernetes API server, by hand
use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command, ExitStatus},
};

use anyhow::{bail, Context, Result};

/// Debian packages behind the eBPF build (EBPF.md): rustc-web (LLVM 22) with a
/// prebuilt core for bpfel-unknown-none, and LLVM 22 for building bpf-linker.
const EBPF_APT: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
/// What the tests use from the system: `ip netns` and `ss` (bench comparison).
const TEST_APT: &[&str] = &["iproute2"];
const BPF_LINKER_VERSION: &str = "0.13.0";
const OBJECT: &str = "target/bpf/polarstack.bpf.o";

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r),
        None => ("help", &[][..]),
    };
    let passthrough: Vec<String> = rest.iter().skip_while(|a| *a != "--").skip(1).cloned().collect();
    let res = match task {
        "setup" => setup(),
        "build-ebpf" => build_ebpf(),
        "run" => run(&passthrough),
        "test" => test(&passthrough),
        "bench" => bench(rest.first().map(String::as_str).unwrap_or("ports")),
        "fake-apiserver" => fake_apiserver(&passthrough),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n  run [-- FLAGS]    set up, build and run the daemon standalone on this host\n  \
                 test [-- ARGS]    set up, build and run every test\n  build-ebpf        build {OBJECT}\n  \
                 setup             install the eBPF toolchain and mount tracefs\n  bench ports|logs  benchmarks\n  fake-apiserver    serve the tests' fake Kubernetes API server (-- --help)"
            );
            exit(2);
        }
    };
    if let Err(e) = res {
        eprintln!("xtask {task}: {e:#}");
        exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("xtask: running {cmd:?}");
    cmd.status().with_context(|| format!("starting {cmd:?}"))
}

fn check(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs what is missing (idempotent: a second run does nothing).
fn setup() -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    let have_system_route =
        Path::new("/usr/bin/rustc").exists() && Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").exists();
    let have_linker = output(Command::new("bpf-linker").arg("--version")).is_some();
    if !have_system_route && nightly_rust_src().is_none() {
        missing.extend(EBPF_APT);
    }
    if !have_linker && !Path::new("/usr/lib/llvm-22/bin/llvm-config").exists() {
        missing.push("llvm-22-dev");
    }
    if output(Command::new("ip").arg("-V")).is_none() {
        missing.extend(TEST_APT);
    }
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run as root or: apt-get install -y {}", missing.join(" "));
        }
        check(Command::new("apt-get").args(["update", "-q"]))?;
        check(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !have_linker {
        // bpf-linker's default LLVM (23) is not in Debian 12: build it for 22.
        let path = format!("/usr/lib/llvm-22/bin:{}", env::var("PATH").unwrap_or_default());
        check(
            Command::new("cargo")
                .args(["install", "--locked", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", path),
        )?;
    }
    if is_root() {
        mount_if_missing("tracefs", "/sys/kernel/tracing", "/sys/kernel/tracing/events")?;
        mount_if_missing("bpf", "/sys/fs/bpf", "/sys/fs/bpf/.")?;
    }
    Ok(())
}

/// The tracepoint needs tracefs; bpffs is for tools that pin (bpftool).
fn mount_if_missing(fstype: &str, dir: &str, probe: &str) -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(dir)))
        .unwrap_or(false);
    if mounted || (fstype == "tracefs" && Path::new(probe).exists()) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).ok();
    check(Command::new("mount").args(["-t", fstype, fstype, dir]))
}

fn nightly_rust_src() -> Option<PathBuf> {
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let core = PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    core.exists().then_some(core)
}

fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv.lines().find_map(|l| l.strip_prefix("LLVM version: "))?.split('.').next()?.parse().ok()
}

/// Builds daemon-ebpf/ for bpfel-unknown-none and copies the object to
/// target/bpf/, where daemon/build.rs embeds it.
///
/// Two routes (EBPF.md); EBPF_TOOLCHAIN=system|nightly forces one:
/// - system: Debian's rustc-web ships core for the BPF target, so no
///   build-std; RUSTC_BOOTSTRAP=aya_ebpf unlocks aya-ebpf's #![feature]s for
///   that crate alone.
/// - nightly: a rustup nightly with rust-src, `-Z build-std=core`.
fn build_ebpf() -> Result<()> {
    let system_ok =
        Path::new("/usr/bin/rustc").exists() && Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").exists();
    let mode = match env::var("EBPF_TOOLCHAIN") {
        Ok(m) => m,
        Err(_) if system_ok => "system".into(),
        Err(_) if nightly_rust_src().is_some() => "nightly".into(),
        Err(_) => bail!(
            "no Rust toolchain can build eBPF here. Either (Debian 12):\n  \
             apt-get install -y {}\nor: rustup toolchain install nightly --component rust-src\n\
             (or run `cargo xtask setup`, which installs the first)",
            EBPF_APT.join(" ")
        ),
    };
    let (mut cmd, rustc_vv) = match mode.as_str() {
        "system" => {
            let mut c = Command::new("/usr/bin/cargo");
            c.arg("build").env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "aya_ebpf");
            (c, output(Command::new("/usr/bin/rustc").arg("-vV")))
        }
        "nightly" => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
            (c, output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"])))
        }
        other => bail!("EBPF_TOOLCHAIN={other}: expected system or nightly"),
    };
    let rustc_major = rustc_vv.as_deref().and_then(llvm_major);
    let linker = output(Command::new("bpf-linker").arg("--version")).map(|s| s.trim().to_string());
    // bpf-linker 0.13 was built here for LLVM 22 (`--features llvm-22`); its
    // version line does not print the LLVM it links, so the major is read
    // from the llvm-config it was built with.
    let linker_major = output(Command::new("/usr/lib/llvm-22/bin/llvm-config").arg("--version"))
        .and_then(|v| v.split('.').next().and_then(|m| m.trim().parse::<u32>().ok()));
    eprintln!("xtask: eBPF toolchain={mode}; rustc LLVM major {rustc_major:?}; bpf-linker LLVM major {linker_major:?}");
    let Some(linker) = linker else {
        bail!(
            "bpf-linker is not on PATH. Install it for LLVM {m} (needs llvm-{m}-dev):\n  \
             PATH=/usr/lib/llvm-{m}/bin:$PATH cargo install --locked bpf-linker --version {BPF_LINKER_VERSION} \
             --no-default-features --features llvm-{m}",
            m = rustc_major.unwrap_or(22)
        );
    };
    eprintln!("xtask: {linker}");
    if let (Some(r), Some(l)) = (rustc_major, linker_major) {
        if r != l {
            bail!("rustc uses LLVM {r} but bpf-linker was built for LLVM {l}: they must match");
        }
    }
    let root = root();
    let target_dir = root.join("daemon-ebpf/target");
    cmd.current_dir(root.join("daemon-ebpf"))
        .args(["--release", "-p", "polarstack-ebpf", "--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir)
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR");
    check(&mut cmd)?;
    let built = target_dir.join("bpfel-unknown-none/release/polarstack");
    let dst = root.join(OBJECT);
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Copy only when changed, so cargo does not rebuild the daemon needlessly.
    let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if std::fs::read(&dst).ok().as_deref() != Some(&new[..]) {
        std::fs::write(&dst, &new).with_context(|| format!("writing {}", dst.display()))?;
    }
    eprintln!("xtask: eBPF object at {}", dst.display());
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(flags: &[String]) -> Result<()> {
    setup()?;
    build_ebpf()?;
    check(cargo().args(["build", "--release", "-p", "polarstack-daemon"]))?;
    let bin = root().join("target/release/polarstack-daemon");
    eprintln!("xtask: starting {} (standalone unless a cluster is configured); Ctrl-C stops it", bin.display());
    let st = status(Command::new(bin).args(flags))?;
    exit(st.code().unwrap_or(0));
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    build_ebpf()?;
    // The whole-system tests start the real binary: build it first and tell
    // them where it is.
    check(cargo().args(["build", "-p", "polarstack-daemon", "--bins"]))?;
    let bin = root().join("target/debug/polarstack-daemon");
    check(cargo().args(["test", "--workspace"]).arg("--").args(args).env("POLARSTACK_DAEMON_BIN", bin))
}

fn bench(which: &str) -> Result<()> {
    let example = match which {
        "ports" => "bench_ports",
        "logs" => "bench_logs",
        other => bail!("unknown benchmark {other:?}; available: ports, logs"),
    };
    setup()?;
    build_ebpf()?;
    check(cargo().args(["build", "--release", "-p", "polarstack-daemon", "--bins", "--examples"]))?;
    let root = root();
    check(
        Command::new(root.join("target/release/examples").join(example))
            .env("POLARSTACK_DAEMON_BIN", root.join("target/release/polarstack-daemon")),
    )
}

/// The test suite's fake API server, for trying the daemon's cluster mode by
/// hand: it prints a kubeconfig to pass as `--kubeconfig`.
fn fake_apiserver(args: &[String]) -> Result<()> {
    check(cargo().args(["run", "--quiet", "-p", "polarstack-tests", "--bin", "fake-apiserver", "--"]).args(args))
}
