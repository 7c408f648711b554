//! One sweep: the three rules applied under the root, fd-relative.
//!
//! Layout of the work: the root is resolved and opened once; its listing is
//! classified (only directories named like an instance id, on the root's own
//! mount, are candidates); each candidate folder is then handled by one
//! blocking task, at most `concurrency` at a time. Within a folder, rule 1
//! (the whole folder) is decided first; if it does not apply, one walk applies
//! rules 3 (`rm_data_*` children) and 2 (`postgresql*.log` anywhere below).

use std::collections::BTreeSet;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustix::io::Errno;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::config::SweepConfig;
use super::fsx::{self, Kind, Meta, MountIdentity, OpenDirError, MAX_DEPTH};
use super::report::{unix_seconds, KeepReason, KeptEntry, RemovedEntry, Rule, SweepIssue, SweepReport};
use super::{LiveInstances, SweepError};

const NS_PER_DAY: i128 = 86_400 * 1_000_000_000;

/// Everything a blocking worker needs, shared by all of them.
struct Ctx {
    root_fd: OwnedFd,
    root_path: PathBuf,
    root_mount: MountIdentity,
    now_ns: i128,
    cutoff_ns: i128,
    dry_run: bool,
    cancel: Arc<AtomicBool>,
    owners: Arc<dyn LiveInstances>,
    live: Result<BTreeSet<String>, String>,
}

/// What one worker found; merged into the report.
#[derive(Default)]
struct Outcome {
    removed: Vec<RemovedEntry>,
    kept: Vec<KeptEntry>,
    errors: Vec<SweepIssue>,
}

impl Outcome {
    fn keep(&mut self, path: String, reason: KeepReason, detail: Option<String>) {
        tracing::debug!(path, ?reason, detail, "log sweep: kept");
        self.kept.push(KeptEntry { path, reason, detail });
    }
    fn error(&mut self, path: String, error: String) {
        tracing::warn!(path, error, "log sweep: error (nothing deleted for it)");
        self.errors.push(SweepIssue { path, error });
    }
    fn merge(&mut self, other: Outcome) {
        self.removed.extend(other.removed);
        self.kept.extend(other.kept);
        self.errors.extend(other.errors);
    }
}

/// A top-level entry that passed every check and gets a worker.
struct Candidate {
    name: String,
    meta: Meta,
}

/// Runs one sweep. Always returns a report; the error, when present, says why
/// the sweep stopped before looking at any folder (nothing was deleted then).
pub(crate) async fn run(
    cfg: &SweepConfig,
    owners: Arc<dyn LiveInstances>,
    dry_run: bool,
    forced_dry_run: bool,
    cancel: Arc<AtomicBool>,
) -> (SweepReport, Option<SweepError>) {
    let started = SystemTime::now();
    let clock = Instant::now();
    let mut report = SweepReport {
        started_at: crate::time::rfc3339_millis(started),
        finished_at: String::new(),
        started_unix: unix_seconds(started),
        duration_seconds: 0.0,
        dry_run,
        forced_dry_run,
        root: cfg.root_flag.to_string_lossy().into_owned(),
        overdue_days: cfg.overdue_days,
        aborted: None,
        removed: Vec::new(),
        kept: Vec::new(),
        errors: Vec::new(),
        removed_bytes: 0,
    };
    let now_ns = started.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    let cutoff_ns = now_ns - i128::from(cfg.overdue_days) * NS_PER_DAY;

    let root_flag = cfg.root_flag.clone();
    let ins_id = cfg.ins_id.clone();
    let prepared =
        tokio::task::spawn_blocking(move || prepare(&root_flag, &ins_id, owners, now_ns, cutoff_ns, dry_run, cancel))
            .await;
    let (ctx, candidates, mut outcome) = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return finish(report, clock, Some(e)),
        Err(join) => {
            let e = SweepError::Internal { what: format!("sweep task failed: {join}") };
            return finish(report, clock, Some(e));
        }
    };
    report.root = ctx.root_path.to_string_lossy().into_owned();
    let ctx = Arc::new(ctx);

    let permits = Arc::new(Semaphore::new(cfg.concurrency));
    let mut workers = JoinSet::new();
    for cand in candidates {
        let path = display(&ctx.root_path, Path::new(&cand.name));
        if ctx.cancel.load(Ordering::Relaxed) {
            outcome.keep(path, KeepReason::Cancelled, None);
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            outcome.error(path, "worker pool closed".into());
            continue;
        };
        let ctx = Arc::clone(&ctx);
        workers.spawn_blocking(move || {
            let _permit = permit;
            sweep_instance(&ctx, &cand)
        });
    }
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(o) => outcome.merge(o),
            Err(join) => outcome.error(report.root.clone(), format!("worker failed: {join}")),
        }
    }
    report.removed = outcome.removed;
    report.kept = outcome.kept;
    report.errors = outcome.errors;
    finish(report, clock, None)
}

fn finish(mut report: SweepReport, clock: Instant, err: Option<SweepError>) -> (SweepReport, Option<SweepError>) {
    if let Some(e) = &err {
        report.aborted = Some(e.to_string());
    }
    report.normalise();
    report.duration_seconds = clock.elapsed().as_secs_f64();
    report.finished_at = crate::time::rfc3339_millis(SystemTime::now());
    (report, err)
}

/// Resolves the root flag: relative paths are taken from the working
/// directory and the result is canonical, so `dir`, `dir/` and `./x/../dir`
/// all name the same directory (the original built shell commands by string
/// concatenation, and a missing trailing slash changed what `find` matched).
pub(crate) fn resolve_root(flag: &Path) -> std::io::Result<PathBuf> {
    let abs = if flag.is_absolute() { flag.to_path_buf() } else { std::env::current_dir()?.join(flag) };
    abs.canonicalize()
}

type Prepared = (Ctx, Vec<Candidate>, Outcome);

/// Opens the root, asks who owns instances and classifies the top level. Any
/// failure here deletes nothing.
fn prepare(
    root_flag: &Path,
    ins_id: &regex::Regex,
    owners: Arc<dyn LiveInstances>,
    now_ns: i128,
    cutoff_ns: i128,
    dry_run: bool,
    cancel: Arc<AtomicBool>,
) -> Result<Prepared, SweepError> {
    let root_path = resolve_root(root_flag)
        .map_err(|source| SweepError::RootUnavailable { root: root_flag.to_path_buf(), source })?;
    if root_path.parent().is_none() {
        return Err(SweepError::RootIsSlash);
    }
    let (root_fd, root_meta) = fsx::open_root(&root_path)
        .map_err(|e| SweepError::RootUnavailable { root: root_path.clone(), source: e.into() })?;
    let names = fsx::list(root_fd.as_fd())
        .map_err(|e| SweepError::RootUnreadable { root: root_path.clone(), source: e.into() })?;
    let mut outcome = Outcome::default();
    let live = owners.live_ins_ids().map_err(|e| e.to_string());
    if let Err(why) = &live {
        outcome.error(root_path.to_string_lossy().into_owned(), format!("rule 1 (instance folders) skipped: {why}"));
    }
    let ctx =
        Ctx { root_fd, root_path, root_mount: root_meta.mount(), now_ns, cutoff_ns, dry_run, cancel, owners, live };
    let mut candidates = Vec::new();
    for cname in names {
        let rel = rel_path(Path::new(""), &cname);
        let path = display(&ctx.root_path, &rel);
        let meta = match fsx::stat_at(ctx.root_fd.as_fd(), &cname) {
            Ok(m) => m,
            Err(Errno::NOENT) => continue,
            Err(e) => {
                outcome.error(path.clone(), format!("stat: {e}"));
                outcome.keep(path, KeepReason::Unreadable, Some(e.to_string()));
                continue;
            }
        };
        if meta.kind == Kind::Symlink {
            outcome.keep(
                path,
                KeepReason::Symlink,
                Some("symlinks are never followed or removed at the top level".into()),
            );
            continue;
        }
        let Some(name) = cname.to_str().ok().filter(|n| ins_id.is_match(n)) else {
            outcome.keep(path, KeepReason::NotInstanceId, None);
            continue;
        };
        if meta.kind != Kind::Dir {
            outcome.keep(path, KeepReason::NotADirectory, None);
            continue;
        }
        if ctx.root_mount.differs(&meta) {
            outcome.keep(path, KeepReason::MountPoint, None);
            continue;
        }
        candidates.push(Candidate { name: name.to_owned(), meta });
    }
    Ok((ctx, candidates, outcome))
}

fn rel_path(parent: &Path, name: &CStr) -> PathBuf {
    parent.join(OsStr::from_bytes(name.to_bytes()))
}

fn display(root: &Path, rel: &Path) -> String {
    root.join(rel).to_string_lossy().into_owned()
}

fn age_days(ctx: &Ctx, mtime_ns: i128) -> f64 {
    let days = (ctx.now_ns - mtime_ns) as f64 / NS_PER_DAY as f64;
    (days * 100.0).round() / 100.0
}

fn is_overdue(ctx: &Ctx, mtime_ns: i128) -> bool {
    mtime_ns < ctx.cutoff_ns
}

fn is_log(name: &CStr) -> bool {
    name.to_bytes().ends_with(b".log")
}

fn is_postgresql_log(name: &CStr) -> bool {
    let b = name.to_bytes();
    b.starts_with(b"postgresql") && b.ends_with(b".log")
}

fn open_dir_keep(
    out: &mut Outcome,
    parent: BorrowedFd<'_>,
    name: &CStr,
    path: &str,
    root: MountIdentity,
    meta: &Meta,
) -> Option<OwnedFd> {
    match fsx::open_child_dir(parent, name, root, Some(meta)) {
        Ok((fd, _)) => Some(fd),
        Err(OpenDirError::Symlink) => {
            out.keep(path.to_owned(), KeepReason::Symlink, Some("not followed".into()));
            None
        }
        Err(OpenDirError::MountPoint) => {
            out.keep(path.to_owned(), KeepReason::MountPoint, Some("not crossed".into()));
            None
        }
        Err(OpenDirError::Changed) => {
            out.keep(path.to_owned(), KeepReason::Changed, None);
            None
        }
        Err(OpenDirError::Io(e)) => {
            out.error(path.to_owned(), format!("open: {e}"));
            out.keep(path.to_owned(), KeepReason::Unreadable, Some(e.to_string()));
            None
        }
    }
}

/// Handles one instance folder: rule 1, else rules 3 and 2 inside it.
fn sweep_instance(ctx: &Ctx, cand: &Candidate) -> Outcome {
    let mut out = Outcome::default();
    let rel = PathBuf::from(&cand.name);
    let path = display(&ctx.root_path, &rel);
    let Ok(cname) = CString::new(cand.name.as_bytes()) else {
        out.keep(path, KeepReason::NotInstanceId, None);
        return out;
    };
    let root = ctx.root_fd.as_fd();
    let Some(fd) = open_dir_keep(&mut out, root, &cname, &path, ctx.root_mount, &cand.meta) else {
        return out;
    };

    match &ctx.live {
        Err(why) => out.keep(path.clone(), KeepReason::OwnershipUnknown, Some(why.clone())),
        Ok(live) if live.contains(&cand.name) => out.keep(path.clone(), KeepReason::OwnedByLivePod, None),
        Ok(_) => {
            if rule1(ctx, &mut out, &cname, &rel, &path, fd.as_fd(), &cand.meta) {
                return out;
            }
        }
    }
    walk_rules(ctx, &mut out, fd.as_fd(), &rel, 1);
    out
}

/// Rule 1. Returns true when the folder was removed (or would be, in a dry
/// run), i.e. when rules 2 and 3 have nothing left to do.
fn rule1(ctx: &Ctx, out: &mut Outcome, cname: &CStr, rel: &Path, path: &str, fd: BorrowedFd<'_>, meta: &Meta) -> bool {
    let first = scan(ctx, fd, rel, true);
    if !first.decide(ctx, out, path, KeepReason::RecentLog) {
        return false;
    }
    // Re-check ownership and recency immediately before deleting: a pod may
    // have been scheduled, or a log written, since the sweep started.
    match ctx.owners.live_ins_ids() {
        Err(e) => {
            out.keep(path.to_owned(), KeepReason::OwnershipUnknown, Some(e.to_string()));
            return false;
        }
        Ok(live) if rel.to_str().is_some_and(|n| live.contains(n)) => {
            out.keep(path.to_owned(), KeepReason::OwnedByLivePod, Some("pod appeared during the sweep".into()));
            return false;
        }
        Ok(_) => {}
    }
    let second = scan(ctx, fd, rel, true);
    if !second.decide(ctx, out, path, KeepReason::RecentLogAppeared) {
        return false;
    }
    let age = age_days(ctx, second.newest_log_ns.unwrap_or(meta.mtime_ns));
    if ctx.dry_run {
        removed(ctx, out, path, Rule::InstanceFolder, age, second.bytes, second.entries + 1);
        return true;
    }
    let mut stats = Removal::default();
    let result = remove_contents(ctx, fd, rel, 1, true, &mut stats).and_then(|()| {
        fsx::remove_empty_dir(ctx.root_fd.as_fd(), cname).map_err(|e| RemoveError::Io(path.to_owned(), e))
    });
    match result {
        Ok(()) => {
            removed(ctx, out, path, Rule::InstanceFolder, age, stats.bytes, stats.entries + 1);
            true
        }
        Err(e) => {
            out.error(
                path.to_owned(),
                format!("partially removed ({} entries, {} bytes): {e}", stats.entries, stats.bytes),
            );
            let reason = match e {
                RemoveError::RecentLog(_) | RemoveError::Io(_, Errno::NOTEMPTY) => KeepReason::RecentLogAppeared,
                RemoveError::Open(_, OpenDirError::MountPoint) => KeepReason::ContainsMountPoint,
                _ => KeepReason::Changed,
            };
            out.keep(path.to_owned(), reason, Some("deletion stopped; the rest is kept".into()));
            false
        }
    }
}

fn removed(ctx: &Ctx, out: &mut Outcome, path: &str, rule: Rule, age_days: f64, bytes: u64, entries: u64) {
    tracing::info!(path, rule = rule.as_str(), age_days, bytes, entries, dry_run = ctx.dry_run, "log sweep: removed");
    out.removed.push(RemovedEntry { path: path.to_owned(), rule, age_days, bytes, entries });
}

/// What a read-only walk of a subtree found.
#[derive(Default)]
struct Scan {
    newest_log_ns: Option<i128>,
    bytes: u64,
    entries: u64,
    /// Set when the subtree must not be removed (mount point inside, listing
    /// error, too deep, cancelled).
    blocked: Option<(KeepReason, String)>,
    recent_log: Option<String>,
}

impl Scan {
    /// Records why the subtree is kept, if it is; true when it may go.
    fn decide(&self, ctx: &Ctx, out: &mut Outcome, path: &str, recent: KeepReason) -> bool {
        if let Some((reason, detail)) = &self.blocked {
            if *reason == KeepReason::Unreadable {
                out.error(path.to_owned(), detail.clone());
            }
            out.keep(path.to_owned(), *reason, Some(detail.clone()));
            return false;
        }
        if let (Some(log), Some(ns)) = (&self.recent_log, self.newest_log_ns) {
            let detail = format!("{log} is {} days old", age_days(ctx, ns));
            out.keep(path.to_owned(), recent, Some(detail));
            return false;
        }
        true
    }
}

/// Walks a subtree read-only. With `logs`, notes the newest `*.log` and stops
/// at the first recent one (the folder is kept anyway).
fn scan(ctx: &Ctx, dir: BorrowedFd<'_>, rel: &Path, logs: bool) -> Scan {
    let mut s = Scan::default();
    scan_into(ctx, dir, rel, 1, logs, &mut s);
    s
}

fn scan_into(ctx: &Ctx, dir: BorrowedFd<'_>, rel: &Path, depth: usize, logs: bool, s: &mut Scan) {
    if ctx.cancel.load(Ordering::Relaxed) {
        s.blocked = Some((KeepReason::Cancelled, "sweep cancelled".into()));
        return;
    }
    if depth > MAX_DEPTH {
        s.blocked =
            Some((KeepReason::Unreadable, format!("{}: deeper than {MAX_DEPTH} levels", display(&ctx.root_path, rel))));
        return;
    }
    let names = match fsx::list(dir) {
        Ok(n) => n,
        Err(e) => {
            s.blocked = Some((KeepReason::Unreadable, format!("{}: list: {e}", display(&ctx.root_path, rel))));
            return;
        }
    };
    for name in names {
        let child = rel_path(rel, &name);
        let meta = match fsx::stat_at(dir, &name) {
            Ok(m) => m,
            Err(Errno::NOENT) => continue,
            Err(e) => {
                s.blocked = Some((KeepReason::Unreadable, format!("{}: stat: {e}", display(&ctx.root_path, &child))));
                return;
            }
        };
        s.entries += 1;
        match meta.kind {
            Kind::File => {
                s.bytes += meta.size;
                if logs && is_log(&name) {
                    s.newest_log_ns = Some(s.newest_log_ns.map_or(meta.mtime_ns, |n| n.max(meta.mtime_ns)));
                    if !is_overdue(ctx, meta.mtime_ns) {
                        s.newest_log_ns = Some(meta.mtime_ns);
                        s.recent_log = Some(display(&ctx.root_path, &child));
                        return;
                    }
                }
            }
            Kind::Dir => match fsx::open_child_dir(dir, &name, ctx.root_mount, Some(&meta)) {
                Ok((fd, _)) => {
                    scan_into(ctx, fd.as_fd(), &child, depth + 1, logs, s);
                    if s.blocked.is_some() || s.recent_log.is_some() {
                        return;
                    }
                }
                Err(OpenDirError::MountPoint) => {
                    s.blocked = Some((
                        KeepReason::ContainsMountPoint,
                        format!("{} is a mount point", display(&ctx.root_path, &child)),
                    ));
                    return;
                }
                Err(e) => {
                    let reason = match e {
                        OpenDirError::Io(_) => KeepReason::Unreadable,
                        _ => KeepReason::Changed,
                    };
                    s.blocked = Some((reason, format!("{}: {e}", display(&ctx.root_path, &child))));
                    return;
                }
            },
            Kind::Symlink | Kind::Other => {}
        }
    }
}

/// Why a deletion stopped.
#[derive(Debug)]
enum RemoveError {
    RecentLog(String),
    Open(String, OpenDirError),
    Io(String, Errno),
    TooDeep(String),
}

impl std::fmt::Display for RemoveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RecentLog(p) => write!(f, "{p} is a recent log that appeared during deletion"),
            Self::Open(p, e) => write!(f, "{p}: {e}"),
            Self::Io(p, e) => write!(f, "{p}: {e}"),
            Self::TooDeep(p) => write!(f, "{p}: deeper than {MAX_DEPTH} levels"),
        }
    }
}

#[derive(Default)]
struct Removal {
    bytes: u64,
    entries: u64,
}

/// Empties a directory, fd-relative and post-order. Every subdirectory is
/// opened with the same no-symlink, no-mount-crossing rules as the scan, so a
/// symlink or mount that appears mid-deletion stops it instead of being
/// followed. With `protect_logs`, a recent `*.log` stops it too.
fn remove_contents(
    ctx: &Ctx,
    dir: BorrowedFd<'_>,
    rel: &Path,
    depth: usize,
    protect_logs: bool,
    stats: &mut Removal,
) -> Result<(), RemoveError> {
    if depth > MAX_DEPTH {
        return Err(RemoveError::TooDeep(display(&ctx.root_path, rel)));
    }
    let names = fsx::list(dir).map_err(|e| RemoveError::Io(display(&ctx.root_path, rel), e))?;
    for name in names {
        let child = rel_path(rel, &name);
        let meta = match fsx::stat_at(dir, &name) {
            Ok(m) => m,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(RemoveError::Io(display(&ctx.root_path, &child), e)),
        };
        match meta.kind {
            Kind::Dir => {
                let (fd, _) = fsx::open_child_dir(dir, &name, ctx.root_mount, Some(&meta))
                    .map_err(|e| RemoveError::Open(display(&ctx.root_path, &child), e))?;
                remove_contents(ctx, fd.as_fd(), &child, depth + 1, protect_logs, stats)?;
                drop(fd);
                fsx::remove_empty_dir(dir, &name).map_err(|e| RemoveError::Io(display(&ctx.root_path, &child), e))?;
            }
            Kind::File => {
                if protect_logs && is_log(&name) && !is_overdue(ctx, meta.mtime_ns) {
                    return Err(RemoveError::RecentLog(display(&ctx.root_path, &child)));
                }
                fsx::unlink_file(dir, &name).map_err(|e| RemoveError::Io(display(&ctx.root_path, &child), e))?;
                stats.bytes += meta.size;
            }
            // unlinkat on a symlink removes the link, never its target.
            Kind::Symlink | Kind::Other => {
                fsx::unlink_file(dir, &name).map_err(|e| RemoveError::Io(display(&ctx.root_path, &child), e))?
            }
        }
        stats.entries += 1;
    }
    Ok(())
}

/// Rules 3 and 2 below an instance folder that stays.
fn walk_rules(ctx: &Ctx, out: &mut Outcome, dir: BorrowedFd<'_>, rel: &Path, depth: usize) {
    let here = display(&ctx.root_path, rel);
    if ctx.cancel.load(Ordering::Relaxed) {
        out.keep(here, KeepReason::Cancelled, Some("not walked: sweep cancelled".into()));
        return;
    }
    if depth > MAX_DEPTH {
        out.error(here, format!("deeper than {MAX_DEPTH} levels; not walked further"));
        return;
    }
    let names = match fsx::list(dir) {
        Ok(n) => n,
        Err(e) => {
            out.error(here.clone(), format!("list: {e}"));
            out.keep(here, KeepReason::Unreadable, Some(e.to_string()));
            return;
        }
    };
    for name in names {
        let child = rel_path(rel, &name);
        let path = display(&ctx.root_path, &child);
        let meta = match fsx::stat_at(dir, &name) {
            Ok(m) => m,
            Err(Errno::NOENT) => continue,
            Err(e) => {
                out.error(path, format!("stat: {e}"));
                continue;
            }
        };
        match meta.kind {
            Kind::Symlink => out.keep(path, KeepReason::Symlink, Some("not followed".into())),
            Kind::Dir => {
                let rm_data = depth == 1 && name.to_bytes().starts_with(b"rm_data_");
                if rm_data && is_overdue(ctx, meta.mtime_ns) {
                    rule3(ctx, out, dir, &name, &child, &path, &meta);
                    continue;
                }
                if rm_data {
                    let detail = format!("{} days old", age_days(ctx, meta.mtime_ns));
                    out.keep(path.clone(), KeepReason::TooRecent, Some(detail));
                }
                if let Some(fd) = open_dir_keep(out, dir, &name, &path, ctx.root_mount, &meta) {
                    walk_rules(ctx, out, fd.as_fd(), &child, depth + 1);
                }
            }
            Kind::File if is_postgresql_log(&name) && is_overdue(ctx, meta.mtime_ns) => {
                let age = age_days(ctx, meta.mtime_ns);
                if !ctx.dry_run {
                    match fsx::unlink_file(dir, &name) {
                        Ok(()) => {}
                        Err(Errno::NOENT) => continue,
                        Err(e) => {
                            out.error(path, format!("unlink: {e}"));
                            continue;
                        }
                    }
                }
                removed(ctx, out, &path, Rule::PostgresqlLog, age, meta.size, 1);
            }
            Kind::File | Kind::Other => {}
        }
    }
}

/// Rule 3 for one overdue `rm_data_*` folder.
fn rule3(ctx: &Ctx, out: &mut Outcome, parent: BorrowedFd<'_>, name: &CStr, rel: &Path, path: &str, meta: &Meta) {
    let Some(fd) = open_dir_keep(out, parent, name, path, ctx.root_mount, meta) else {
        return;
    };
    let s = scan(ctx, fd.as_fd(), rel, false);
    if !s.decide(ctx, out, path, KeepReason::RecentLog) {
        return;
    }
    // Fresh metadata from the open fd: the folder must still be overdue.
    match fsx::stat_fd(fd.as_fd()) {
        Ok(now) if is_overdue(ctx, now.mtime_ns) => {}
        Ok(now) => {
            let detail = format!("modified during the sweep ({} days old)", age_days(ctx, now.mtime_ns));
            out.keep(path.to_owned(), KeepReason::TooRecent, Some(detail));
            return;
        }
        Err(e) => {
            out.error(path.to_owned(), format!("stat: {e}"));
            return;
        }
    }
    let age = age_days(ctx, meta.mtime_ns);
    if ctx.dry_run {
        removed(ctx, out, path, Rule::RmData, age, s.bytes, s.entries + 1);
        return;
    }
    let mut stats = Removal::default();
    let result = remove_contents(ctx, fd.as_fd(), rel, 2, false, &mut stats)
        .and_then(|()| fsx::remove_empty_dir(parent, name).map_err(|e| RemoveError::Io(path.to_owned(), e)));
    match result {
        Ok(()) => removed(ctx, out, path, Rule::RmData, age, stats.bytes, stats.entries + 1),
        Err(e) => {
            out.error(
                path.to_owned(),
                format!("partially removed ({} entries, {} bytes): {e}", stats.entries, stats.bytes),
            );
            out.keep(path.to_owned(), KeepReason::Changed, Some("deletion stopped; the rest is kept".into()));
        }
    }
}
