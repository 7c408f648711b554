//! `cargo xtask vm-test`: the whole-system tests on the Debian kernels people
//! run (5.10, 6.1, 6.12), each booted under QEMU with virtme-ng.
//!
//! The guest shares the host's root filesystem (read-only, with /tmp and
//! target/ writable), so the test binaries and the daemon are built on the
//! host and run unchanged inside. KVM hangs on these machines (docs/testing.md), so
//! the guest runs under TCG: a boot takes 20-60 s on 2 cores.
//!
//! Everything it fetches is cached under target/: the virtme-ng venv in
//! target/tools/vng-venv, each suite's apt state and unpacked kernel in
//! target/vm/<suite>/. The kernel's modules are copied to /lib/modules/<kver>
//! on the host, because that is where the guest (seeing the host's root)
//! loads 9p and virtio from.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{build_ebpf, cargo, check, is_root, on_path, output, python, root, setup, DEPLOY_TOOLS};

/// The test targets (files under tests/tests/) run in every guest: add a
/// name here to run another file on the old kernels.
const VM_TESTS: &[&str] = &["ports", "kernels"];

/// `--kernel` label -> Debian suite whose own kernel it is. The kernel is the
/// one the suite's `linux-image-amd64` metapackage points at (main suite plus
/// its -security updates: what a patched node of that release runs).
const KERNELS: &[(&str, &str)] = &[("5.10", "bullseye"), ("6.1", "bookworm"), ("6.12", "trixie")];

/// virtme-ng, pinned: the version this harness was checked with (its flags
/// and console output are what the parsing below expects).
const VIRTME_NG: &str = "virtme-ng==1.42";
const VNG_VENV: &str = "target/tools/vng-venv";
const VM_DIR: &str = "target/vm";

/// Generous: a TCG boot takes 20-60 s and each port test up to a few minutes.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Lines the guest script prints, so the host can find them in the console
/// output (which also carries the kernel's and virtme-ng's own messages).
const KERNEL_MARKER: &str = "VMTEST-KERNEL ";
const EXIT_MARKER: &str = "VMTEST-EXIT ";
/// Rows tests/tests/kernels.rs prints for the README's kernel table; the
/// runner collects them from every guest into target/vm/kernel-table.md.
const TABLE_MARKER: &str = "KERNEL-TABLE |";

/// A test binary built on the host, and the directory cargo would run it in
/// (its package's root).
struct TestBin {
    name: String,
    exe: PathBuf,
    cwd: PathBuf,
}

/// A Debian kernel unpacked under target/vm/<suite>/K.
struct Kernel {
    package: String,
    version: String,
    kver: String,
    vmlinuz: PathBuf,
    /// Seconds spent on apt and dpkg; None when everything was cached.
    fetch_secs: Option<f64>,
}

enum Verdict {
    Passed,
    Failed(String),
    Timeout,
    /// The harness could not get as far as a result (a fetch or boot error).
    Error(String),
}

/// What one boot gave.
struct Outcome {
    /// Until the guest script started (its first marker line).
    boot_secs: Option<f64>,
    /// Boot and tests, until vng exited or was killed.
    total_secs: Option<f64>,
    verdict: Verdict,
    /// The KERNEL-TABLE rows the guest printed.
    table: Vec<String>,
}

impl Outcome {
    fn error(e: anyhow::Error) -> Self {
        Outcome { boot_secs: None, total_secs: None, verdict: Verdict::Error(format!("{e:#}")), table: Vec::new() }
    }
}

/// One line of the summary table.
struct Row {
    label: &'static str,
    suite: &'static str,
    kernel: Option<Kernel>,
    outcome: Outcome,
}

/// `vm-test [--kernel 5.10|6.1|6.12|all] [--timeout SECS] [-- TEST ARGS]`.
pub fn vm_test(args: &[String]) -> Result<()> {
    let mut which = "all".to_string();
    let mut timeout = DEFAULT_TIMEOUT;
    let mut test_args: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => which = it.next().context("--kernel needs 5.10, 6.1, 6.12 or all")?.clone(),
            s if s.starts_with("--kernel=") => which = s["--kernel=".len()..].to_string(),
            "--timeout" => {
                let s = it.next().context("--timeout needs seconds")?;
                timeout = Duration::from_secs(s.parse().with_context(|| format!("--timeout {s:?}: not seconds"))?);
            }
            "--" => {
                test_args = it.cloned().collect();
                break;
            }
            other => {
                bail!("unknown argument {other:?} (--kernel 5.10|6.1|6.12|all, --timeout SECS, -- TEST ARGS)")
            }
        }
    }
    let kernels: Vec<(&'static str, &'static str)> = match which.as_str() {
        "all" => KERNELS.to_vec(),
        k => match KERNELS.iter().find(|(label, _)| *label == k) {
            Some(&kv) => vec![kv],
            None => bail!(
                "--kernel {k}: expected one of 5.10, 6.1, 6.12, all (the host's own kernel is `cargo xtask test`)"
            ),
        },
    };
    if !is_root() {
        bail!("vm-test installs packages, writes /lib/modules and mounts in the guest as root: run it as root");
    }

    ensure_vm_tools()?;
    // As `cargo xtask test`: the eBPF object, the daemon, then the tests.
    setup()?;
    build_ebpf()?;
    check(cargo().args(["build", "-p", "polarstack-daemon", "--bins"]))?;
    let bins = build_test_bins()?;
    let script = write_guest_script(&bins, &test_args)?;

    let mut rows = Vec::new();
    for (label, suite) in kernels {
        eprintln!("xtask: === kernel {label} (Debian {suite}) ===");
        let row = match fetch_kernel(suite) {
            Ok(k) => {
                let outcome = run_vm(label, suite, &k, &script, timeout).unwrap_or_else(Outcome::error);
                Row { label, suite, kernel: Some(k), outcome }
            }
            Err(e) => Row { label, suite, kernel: None, outcome: Outcome::error(e) },
        };
        rows.push(row);
    }
    print_summary(&rows);
    write_kernel_table(&rows)?;
    let bad = rows.iter().filter(|r| !matches!(r.outcome.verdict, Verdict::Passed)).count();
    if bad > 0 {
        bail!("{bad} of {} kernels did not pass (console logs under {VM_DIR}/<suite>/console.log)", rows.len());
    }
    Ok(())
}

/// QEMU, kmod (depmod indexes the guest kernel's modules), busybox-static
/// and udev from Debian, virtme-ng in its own venv (not packaged for Debian 12).
fn ensure_vm_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !on_path("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !has_depmod() {
        missing.push("kmod");
    }
    // virtme-ng builds an initramfs around a static busybox when the root
    // filesystem's drivers (9p, virtio) are modules, as in Debian's kernels;
    // Debian's plain `busybox` is dynamically linked and refused.
    if !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "busybox-static"]))
        .is_some_and(|s| s.contains("ok installed"))
    {
        missing.push("busybox-static");
    }
    // The guest's init starts the host's udevd so /dev/virtio-ports/ gets
    // its names; without them virtme-ng falls back to running the command on
    // the serial console, where vng shows it only with --verbose and always
    // exits 255 (the command's status is lost).
    if !["/usr/lib/systemd/systemd-udevd", "/lib/systemd/systemd-udevd"].iter().any(|p| Path::new(p).exists()) {
        missing.push("udev");
    }
    if !missing.is_empty() {
        check(Command::new("apt-get").args(["update", "-q"]))?;
        check(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("installing {missing:?}; by hand: apt-get install -y {}", missing.join(" ")))?;
    }
    let venv = root().join(VNG_VENV);
    let vng = venv.join("bin/vng");
    if output(Command::new(&vng).arg("--version")).is_none() {
        // python3-venv comes with setup(); a half-made venv is rebuilt.
        if !crate::python_has_venv() {
            setup()?;
        }
        let _ = std::fs::remove_dir_all(&venv);
        check(Command::new(python()).args(["-m", "venv"]).arg(&venv))
            .context("creating the virtme-ng venv (needs python3-venv: apt-get install -y python3-venv)")?;
        check(Command::new(venv.join("bin/pip")).args(["install", "-q", "--disable-pip-version-check", VIRTME_NG]))
            .with_context(|| {
                format!("installing virtme-ng; by hand: {} install {VIRTME_NG}", venv.join("bin/pip").display())
            })?;
    }
    let version = output(Command::new(&vng).arg("--version")).unwrap_or_default();
    eprintln!("xtask: {} ({})", version.trim(), vng.display());
    Ok(())
}

fn has_depmod() -> bool {
    on_path("depmod") || Path::new("/usr/sbin/depmod").exists() || Path::new("/sbin/depmod").exists()
}

/// Builds the VM_TESTS binaries without running them and reads their paths
/// from cargo's JSON messages (the file names carry a hash).
fn build_test_bins() -> Result<Vec<TestBin>> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "polarstack-tests", "--no-run", "--message-format=json"]);
    for t in VM_TESTS {
        cmd.args(["--test", t]);
    }
    eprintln!("xtask: running {cmd:?}");
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) else { continue };
        if !VM_TESTS.contains(&name) {
            continue;
        }
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        let cwd = manifest.parent().map(Path::to_path_buf).unwrap_or_else(root);
        bins.push(TestBin { name: name.to_string(), exe: PathBuf::from(exe), cwd });
    }
    // In VM_TESTS order, whatever order cargo reported them in.
    bins.sort_by_key(|b| VM_TESTS.iter().position(|t| *t == b.name));
    for t in VM_TESTS {
        if !bins.iter().any(|b| b.name == *t) {
            bail!("cargo built no executable for the test target {t:?} (is tests/tests/{t}.rs there?)");
        }
    }
    Ok(bins)
}

/// Single-quotes a word for bash.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs (target/vm/guest.sh). The arguments are written
/// into it rather than passed on vng's command line, which vng joins into
/// one string for the guest's shell.
fn write_guest_script(bins: &[TestBin], test_args: &[String]) -> Result<PathBuf> {
    let root = root();
    let daemon = root.join("target/debug/polarstack-daemon");
    let args: Vec<String> = test_args.iter().map(|a| sh_quote(a)).collect();
    let mut s = String::from(
        "#!/bin/bash\n\
         # Written by `cargo xtask vm-test`; runs inside the guest (as root).\n\
         # The daemon's cgroup programs attach to the root of cgroup v2;\n\
         # bpffs is for tools (bpftool) that look at what is loaded.\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
         [ \"$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)\" = cgroup2fs ] || mount -t cgroup2 none /sys/fs/cgroup\n\
         echo \"VMTEST-KERNEL $(uname -r)\"\n\
         export CI=true RUST_BACKTRACE=1\n",
    );
    s += &format!("export POLARSTACK_DAEMON_BIN={}\n", sh_quote(&daemon.to_string_lossy()));
    s += &format!("export DEPLOY_TOOLS={}\n", sh_quote(&root.join(DEPLOY_TOOLS).to_string_lossy()));
    if let Ok(extra) = std::env::var("POLARSTACK_TEST_DAEMON_ARGS") {
        s += &format!("export POLARSTACK_TEST_DAEMON_ARGS={}\n", sh_quote(&extra));
    }
    s += "rc=0\n";
    for b in bins {
        // Two vCPUs under TCG: one test at a time keeps timings sane.
        // --show-output: passing tests' stdout too (the KERNEL-TABLE rows).
        s += &format!(
            "echo \"VMTEST-RUN {name}\"\n(cd {cwd} && {exe} --test-threads=1 --show-output {args}) || rc=$?\n",
            name = b.name,
            cwd = sh_quote(&b.cwd.to_string_lossy()),
            exe = sh_quote(&b.exe.to_string_lossy()),
            args = args.join(" "),
        );
    }
    s += &format!("echo \"{EXIT_MARKER}$rc\"\nexit $rc\n");
    let path = root.join(VM_DIR).join("guest.sh");
    std::fs::create_dir_all(root.join(VM_DIR))?;
    std::fs::write(&path, s).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// apt with a private sources list, lists and cache for one suite, so the
/// system's apt configuration is never touched.
fn apt(dir: &Path, tool: &str) -> Command {
    let mut c = Command::new(tool);
    c.arg("-o")
        .arg(format!("Dir::Etc::sourcelist={}", dir.join("sources.list").display()))
        .args(["-o", "Dir::Etc::sourceparts=-"])
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
        .arg("-o")
        .arg(format!("Dir::Cache={}", dir.join("cache").display()))
        // The files land under target/, which apt's _apt user may not reach.
        .args(["-o", "APT::Sandbox::User=root"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Debian's kernel for `suite`, unpacked under target/vm/<suite>/K, its
/// modules installed on the host. Cached: once kernel.json names an unpacked
/// kernel, no network is used (delete target/vm/<suite> for a newer one).
fn fetch_kernel(suite: &str) -> Result<Kernel> {
    let dir = root().join(VM_DIR).join(suite);
    let unpacked = dir.join("K");
    let record = dir.join("kernel.json");
    let cached =
        std::fs::read_to_string(&record).ok().and_then(|s| serde_json::from_str::<Value>(&s).ok()).and_then(|v| {
            Some((
                v["package"].as_str()?.to_string(),
                v["version"].as_str()?.to_string(),
                v["kver"].as_str()?.to_string(),
            ))
        });
    let started = Instant::now();
    let mut fetched = false;
    let (package, version, kver) = match cached {
        Some((p, v, k)) if unpacked.join(format!("boot/vmlinuz-{k}")).is_file() => {
            eprintln!("xtask: {suite}: cached {p} {v} (rm -r {} to pick a newer one)", dir.display());
            (p, v, k)
        }
        _ => {
            fetched = true;
            let (p, v, k) = resolve_kernel(suite, &dir)?;
            download_and_unpack(&dir, &p, &v, &unpacked)?;
            let rec = serde_json::json!({ "package": p, "version": v, "kver": k });
            std::fs::write(&record, format!("{rec:#}\n")).with_context(|| format!("writing {}", record.display()))?;
            (p, v, k)
        }
    };
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{kver}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing after unpacking {package}; rm -r {} and retry", vmlinuz.display(), dir.display());
    }
    install_modules(&unpacked, &kver)?;
    let fetch_secs = fetched.then(|| started.elapsed().as_secs_f64());
    Ok(Kernel { package, version, kver, vmlinuz, fetch_secs })
}

/// Reads which versioned image the suite's `linux-image-amd64` metapackage
/// depends on: the generic -amd64 flavour (the cloud flavour lacks 9p, so the
/// guest could not mount the host's files). Not "the newest image in the
/// suite": bookworm-security also carries 6.12 backports.
fn resolve_kernel(suite: &str, dir: &Path) -> Result<(String, String, String)> {
    for d in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(dir.join(d)).with_context(|| format!("creating {}", dir.join(d).display()))?;
    }
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let sources = format!(
        "deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main\n\
         deb [signed-by={keyring}] http://deb.debian.org/debian-security {suite}-security main\n"
    );
    std::fs::write(dir.join("sources.list"), sources)?;
    check(apt(dir, "apt-get").args(["update", "-q"])).with_context(|| {
        format!("apt-get update for {suite} (needs deb.debian.org and {keyring}: apt-get install -y debian-archive-keyring)")
    })?;
    let deps = output(apt(dir, "apt-cache").args(["depends", "linux-image-amd64"]))
        .with_context(|| format!("apt-cache depends linux-image-amd64 for {suite}"))?;
    let image = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .with_context(|| format!("{suite}'s linux-image-amd64 depends on no linux-image-*-amd64:\n{deps}"))?
        .to_string();
    let kver = image["linux-image-".len()..].to_string();
    // The unsigned package holds the same kernel and modules without the
    // Secure Boot signature; take the signed one where it does not exist.
    let unsigned = format!("{image}-unsigned");
    let package = if package_version(dir, &unsigned).is_some() { unsigned } else { image };
    let version = package_version(dir, &package).with_context(|| format!("no candidate version for {package}"))?;
    eprintln!("xtask: {suite}: linux-image-amd64 -> {package} {version} (kernel {kver})");
    Ok((package, version, kver))
}

fn package_version(dir: &Path, package: &str) -> Option<String> {
    let show = output(apt(dir, "apt-cache").args(["show", "--no-all-versions", package]))?;
    show.lines().find_map(|l| l.strip_prefix("Version: ")).map(|v| v.trim().to_string())
}

fn download_and_unpack(dir: &Path, package: &str, version: &str, unpacked: &Path) -> Result<()> {
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    let find = || -> Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        Ok(std::fs::read_dir(&debs)?.flatten().map(|e| e.path()).find(|p| {
            p.extension().is_some_and(|x| x == "deb")
                && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        }))
    };
    let deb = match find()? {
        Some(d) => d,
        None => {
            check(apt(dir, "apt-get").args(["download", "-q"]).arg(format!("{package}={version}")).current_dir(&debs))
                .with_context(|| format!("downloading {package}"))?;
            find()?.with_context(|| format!("apt-get download wrote no {package}_*.deb into {}", debs.display()))?
        }
    };
    let _ = std::fs::remove_dir_all(unpacked);
    check(Command::new("dpkg").arg("-x").arg(&deb).arg(unpacked))
}

/// The guest sees the host's root, so its modules (9p, virtio, ...) must be
/// under the host's /lib/modules/<kver>, indexed by depmod. Trixie's
/// package keeps them under usr/lib/modules.
fn install_modules(unpacked: &Path, kver: &str) -> Result<()> {
    let dst = Path::new("/lib/modules").join(kver);
    if dst.join("modules.dep").is_file() {
        return Ok(());
    }
    let src = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d).join(kver))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules/{kver} in {}", unpacked.display()))?;
    std::fs::create_dir_all("/lib/modules")?;
    check(Command::new("cp").arg("-a").arg(&src).arg("/lib/modules/"))?;
    check(Command::new(if on_path("depmod") { "depmod" } else { "/usr/sbin/depmod" }).arg(kver))
        .context("depmod (apt-get install -y kmod)")?;
    Ok(())
}

/// Boots `k` and runs the guest script, streaming its output. The verdict
/// comes from the script's exit marker; vng's own exit status is printed
/// beside it (vng propagates it only when the guest's udev named the
/// virtio-serial ports, see ensure_vm_tools).
fn run_vm(label: &str, suite: &str, k: &Kernel, script: &Path, timeout: Duration) -> Result<Outcome> {
    let root = root();
    let venv_bin = root.join(VNG_VENV).join("bin");
    let path = format!("{}:{}", venv_bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new(venv_bin.join("vng"));
    cmd.arg("--run")
        .arg(&k.vmlinuz)
        // KVM hangs on these machines (docs/testing.md): TCG. --verbose sends the
        // kernel's console to stderr, for when a boot goes wrong.
        .args(["--disable-kvm", "--verbose", "--memory", "3G", "--cpus", "2"])
        // Debian 12's QEMU ships the old C virtiofsd, which vng cannot drive:
        // it would try it for every share, wait about 3 s each, then use 9p.
        .arg("--force-9p")
        .args(["--rwdir", "/tmp"])
        .arg("--rwdir")
        .arg(root.join("target"))
        .arg("--exec")
        .arg(format!("bash {}", script.display()))
        .current_dir(&root)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills QEMU too.
        .process_group(0);
    eprintln!("xtask: booting {} {} (TCG, 20-60 s to boot): {cmd:?}", k.package, k.version);
    let log_path = root.join(VM_DIR).join(suite).join("console.log");
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, tx.clone());
    }
    drop(tx);
    let deadline = started + timeout;
    let mut exit_code: Option<i32> = None;
    let mut boot_secs: Option<f64> = None;
    let mut table = Vec::new();
    let mut exited_at: Option<Instant> = None;
    let mut vng_status = None;
    let mut kernel_tail = std::collections::VecDeque::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(raw) => {
                let _ = log.write_all(&raw);
                let line = clean(&raw);
                if is_kernel_line(&line) {
                    // Boot messages: to console.log, and shown if no result comes.
                    kernel_tail.push_back(line.clone());
                    if kernel_tail.len() > 40 {
                        kernel_tail.pop_front();
                    }
                } else {
                    println!("[{label}] {line}");
                }
                if let Some(kver) = line.trim().strip_prefix(KERNEL_MARKER) {
                    boot_secs = Some(started.elapsed().as_secs_f64());
                    if kver.trim() != k.kver {
                        eprintln!("xtask: WARNING: the guest runs {kver}, expected {}", k.kver);
                    }
                }
                if let Some(at) = line.find(TABLE_MARKER) {
                    table.push(line[at..].to_string());
                }
                if let Some(code) = line.trim().strip_prefix(EXIT_MARKER) {
                    exit_code = code.trim().parse().ok();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if vng_status.is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                vng_status = Some(st);
                exited_at = Some(Instant::now());
            }
        }
        // A helper that outlived vng may hold the pipe: stop reading soon
        // after vng itself has gone.
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            break;
        }
        if vng_status.is_none() && Instant::now() > deadline {
            kill_group(&child);
            let _ = child.wait();
            let total_secs = Some(started.elapsed().as_secs_f64());
            if let Some(code) = exit_code {
                // The tests finished; only the guest's power-off hung.
                eprintln!("xtask: kernel {label}: the tests finished but the VM did not stop; killed it");
                return Ok(Outcome { boot_secs, total_secs, verdict: verdict_of(code), table });
            }
            eprintln!(
                "xtask: kernel {label}: TIMEOUT: no result after {}s; killed the VM (--timeout SECS to allow more). \
                 Last kernel messages:",
                timeout.as_secs()
            );
            for l in &kernel_tail {
                eprintln!("[{label}] {l}");
            }
            return Ok(Outcome { boot_secs, total_secs, verdict: Verdict::Timeout, table });
        }
    }
    let st = match vng_status {
        Some(st) => st,
        None => child.wait().context("waiting for vng")?,
    };
    let total_secs = Some(started.elapsed().as_secs_f64());
    eprintln!(
        "xtask: kernel {label}: vng exited with {st}; guest script exit marker {}",
        exit_code.map_or("missing".into(), |c| c.to_string())
    );
    if exit_code.is_none() {
        eprintln!("xtask: the guest's last kernel messages (all in {}):", log_path.display());
        for l in &kernel_tail {
            eprintln!("[{label}] {l}");
        }
    }
    let verdict = match exit_code {
        Some(c) => verdict_of(c),
        None if boot_secs.is_none() => {
            Verdict::Error(format!("the guest never ran the script (vng: {st}); see {}", log_path.display()))
        }
        None => Verdict::Failed(format!("the guest script did not finish (vng: {st}); see {}", log_path.display())),
    };
    Ok(Outcome { boot_secs, total_secs, verdict, table })
}

fn verdict_of(exit_code: i32) -> Verdict {
    if exit_code == 0 {
        Verdict::Passed
    } else {
        Verdict::Failed(format!("tests exited {exit_code}"))
    }
}

/// Sends each line (raw bytes) of `r` to `tx` from a thread of its own.
fn forward_lines(r: impl Read + Send + 'static, tx: mpsc::Sender<Vec<u8>>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        loop {
            let mut buf = Vec::new();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(buf).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

fn kill_group(child: &std::process::Child) {
    let Ok(pid) = i32::try_from(child.id()) else { return };
    // SAFETY: kill has no memory preconditions; -pid is the process group
    // this harness created for vng (process_group(0)), nothing else.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// The kernel's console lines start with its timestamp, `[    4.731134] `.
fn is_kernel_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else { return false };
    let Some((stamp, _)) = rest.split_once(']') else { return false };
    let stamp = stamp.trim_start();
    !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.') && stamp.contains('.')
}

/// A console line without terminal escape sequences and carriage returns.
fn clean(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters, then one final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\r' => {}
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

fn print_summary(rows: &[Row]) {
    let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.0}"));
    eprintln!();
    eprintln!(
        "{:<6} {:<9} {:<42} {:<16} {:>6} {:>6} {:>6}  result",
        "kernel", "suite", "package", "version", "fetch", "boot", "total"
    );
    for r in rows {
        let (package, version, fetch) = match &r.kernel {
            Some(k) => (
                k.package.as_str(),
                k.version.as_str(),
                k.fetch_secs.map_or("cached".to_string(), |s| format!("{s:.0}")),
            ),
            None => ("-", "-", "-".to_string()),
        };
        let result = match &r.outcome.verdict {
            Verdict::Passed => "passed".to_string(),
            Verdict::Failed(why) => format!("failed ({why})"),
            Verdict::Timeout => "timeout".to_string(),
            Verdict::Error(why) => format!("error: {why}"),
        };
        eprintln!(
            "{:<6} {:<9} {:<42} {:<16} {:>6} {:>6} {:>6}  {result}",
            r.label,
            r.suite,
            package,
            version,
            fetch,
            secs(r.outcome.boot_secs),
            secs(r.outcome.total_secs)
        );
    }
    eprintln!("(seconds; boot = until the guest script started, total = boot + tests)");
}

/// The KERNEL-TABLE rows of every guest, in kernel order, for the README.
fn write_kernel_table(rows: &[Row]) -> Result<()> {
    let lines: Vec<&str> = rows.iter().flat_map(|r| r.outcome.table.iter().map(String::as_str)).collect();
    if lines.is_empty() {
        return Ok(());
    }
    let path = root().join(VM_DIR).join("kernel-table.md");
    let mut text = String::new();
    for l in &lines {
        eprintln!("{l}");
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: KERNEL-TABLE rows in {}", path.display());
    Ok(())
}
