//! `cargo xtask bench logs`: our sweep against the equivalent `find` pipeline
//! on the same 1M-file tree, in one run.
//!
//! The tree is built twice under a temp dir (once per contender, identical
//! layout and mtimes): 1000 instance folders of 1000 files each; even ids
//! have a live pod, odd ids none (half of those hold a recent log, so rule 1
//! keeps them). Per folder: 400 `postgresql-*.log` (half overdue), 400 data
//! files, an overdue and a recent `rm_data_*` of 100 files each.
//!
//! `find` cannot express rule 1 on its own, so its contender runs one `find`
//! per podless folder looking for anything (the folder included) modified or
//! changed within N days, then `rm -rf`; rules 3 and 2 are single `find`
//! commands. Ages use `-mmin +N*1440` (not `-mtime +N`, which rounds down to
//! whole days and so means "N+1 days").
//!
//! The tree is written just before the run, so every inode's ctime is now
//! (no system call sets it back): rule 1 keeps every podless folder here, in
//! both contenders, and the timing measures its scan, not its removal.
//!
//! Scale with `BENCH_LOGS_FILES` (default 1000000).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark: a failure ends it")]

use std::collections::BTreeSet;
use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use polarstack_daemon::logs::{LiveFuture, LiveInstances, LogSweepArgs, SweepHandle};

const N_DAYS: u32 = 3;
const FILES_PER_FOLDER: usize = 1000;

struct Owners(BTreeSet<String>);
impl LiveInstances for Owners {
    fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
        Box::pin(async { Ok(self.0.clone()) })
    }
    fn is_live<'a>(&'a self, ins_id: &'a str) -> LiveFuture<'a, bool> {
        Box::pin(async { Ok(self.0.contains(ins_id)) })
    }
}

fn ago(days: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(days * 86_400)
}

fn touch(path: &Path, when: SystemTime) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(b"0123456789abcdef0123456789abcdef")?;
    f.set_times(FileTimes::new().set_modified(when).set_accessed(when))
}

fn set_dir_time(path: &Path, when: SystemTime) -> std::io::Result<()> {
    File::open(path)?.set_times(FileTimes::new().set_modified(when).set_accessed(when))
}

/// One instance folder of `FILES_PER_FOLDER` files.
fn build_folder(dir: &Path, id: usize) -> std::io::Result<()> {
    let old = ago(10);
    let new = ago(1);
    let podless = id % 2 == 1;
    let podless_all_old = podless && id % 4 == 1;
    let log = dir.join("log");
    fs::create_dir_all(&log)?;
    for i in 0..400 {
        let when = if i % 2 == 0 || podless_all_old { old } else { new };
        touch(&log.join(format!("postgresql-{i:04}.log")), when)?;
    }
    for sub in 0..4 {
        let d = dir.join("data").join(format!("base{sub}"));
        fs::create_dir_all(&d)?;
        for i in 0..100 {
            touch(&d.join(format!("{}", 16384 + i)), old)?;
        }
    }
    for (name, when) in [("rm_data_20240101000000", old), ("rm_data_20991231000000", new)] {
        let d = dir.join(name);
        fs::create_dir_all(&d)?;
        for i in 0..100 {
            touch(&d.join(format!("f{i}")), when)?;
        }
        set_dir_time(&d, when)?;
    }
    Ok(())
}

fn build_tree(root: &Path, folders: usize) -> std::io::Result<()> {
    fs::create_dir_all(root)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> std::io::Result<()> {
                    for id in (t..folders).step_by(threads) {
                        build_folder(&root.join(format!("{}", 100_000 + id)), id)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| std::io::Error::other("builder thread panicked"))??;
        }
        Ok(())
    })
}

fn count_files(dir: &Path) -> std::io::Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            n += count_files(&e.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

/// Flushes dirty data so the next contender starts from the same state.
fn sync() -> std::io::Result<f64> {
    let t = Instant::now();
    std::process::Command::new("sync").status()?;
    Ok(t.elapsed().as_secs_f64())
}

fn find_script(root: &Path, podless: &[String]) -> String {
    let mmin = u64::from(N_DAYS) * 1440;
    let r = root.display();
    let mut s = String::from("set -e\n");
    // Rule 1, one folder at a time: nothing changed within N days -> remove.
    s.push_str(&format!(
        "for id in {ids}; do\n  if [ -z \"$(find {r}/$id \\( -mmin -{mmin} -o -cmin -{mmin} \\) -print -quit)\" ]; then rm -rf {r}/$id; fi\ndone\n",
        ids = podless.join(" ")
    ));
    // Rule 3.
    s.push_str(&format!(
        "find {r} -mindepth 2 -maxdepth 2 -type d -name 'rm_data_*' -mmin +{mmin} -prune -exec rm -rf {{}} +\n"
    ));
    // Rule 2.
    s.push_str(&format!("find {r} -mindepth 2 -type f -name 'postgresql*.log' -mmin +{mmin} -delete\n"));
    s
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files: usize = std::env::var("BENCH_LOGS_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let folders = (files / FILES_PER_FOLDER).max(1);
    let base = tempfile::Builder::new().prefix("polarstack-bench-logs-").tempdir_in("/tmp")?;
    let live: BTreeSet<String> = (0..folders).filter(|i| i % 2 == 0).map(|i| format!("{}", 100_000 + i)).collect();
    let podless: Vec<String> = (0..folders).filter(|i| i % 2 == 1).map(|i| format!("{}", 100_000 + i)).collect();
    println!(
        "tree: {} files in {folders} instance folders, N = {N_DAYS} days, under {}",
        folders * FILES_PER_FOLDER,
        base.path().display()
    );

    // Both trees first, then `sync`, so neither contender pays for the
    // other's writeback; each one's own writeback is timed by the `sync`
    // that follows it.
    let ours: PathBuf = base.path().join("ours");
    let theirs = base.path().join("find");
    for (n, root) in [(1, &ours), (2, &theirs)] {
        let t = Instant::now();
        build_tree(root, folders)?;
        println!("  built tree {n} in {:.1}s", t.elapsed().as_secs_f64());
    }
    let synced = sync()?;
    println!("  initial sync {synced:.1}s");

    // Contender 1: our sweep.
    let args =
        LogSweepArgs { dbcluster_log_dir: ours.clone(), ins_folder_overdue_days: N_DAYS, ..LogSweepArgs::default() };
    let handle = SweepHandle::new(args, Arc::new(Owners(live.clone())))?;
    let t = Instant::now();
    let report = handle.sweep(false).await?;
    let ours_secs = t.elapsed().as_secs_f64();
    let ours_sync = sync()?;
    let ours_left = count_files(&ours)?;

    // Contender 2: find.
    let script = find_script(&theirs, &podless);
    let t = Instant::now();
    let status = std::process::Command::new("sh").arg("-c").arg(&script).status()?;
    let find_secs = t.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("find pipeline failed: {status}").into());
    }
    let find_sync = sync()?;
    let find_left = count_files(&theirs)?;

    println!(
        "polarstack sweep (concurrency 4): {ours_secs:8.2}s (+{ours_sync:.2}s sync)  removed {} entries / {} bytes, kept {}, errors {}, files left {ours_left}",
        report.removed.iter().map(|r| r.entries).sum::<u64>(),
        report.removed_bytes,
        report.kept.len(),
        report.errors.len()
    );
    println!("find -mmin -delete / rm -rf:      {find_secs:8.2}s (+{find_sync:.2}s sync)  files left {find_left}");
    println!(
        "ratio (find / ours): {:.2}x; same result: {}",
        find_secs / ours_secs,
        if ours_left == find_left { "yes" } else { "NO" }
    );
    // `base` removes both trees on drop.
    Ok(())
}
