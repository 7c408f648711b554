//! One sweep: the three rules applied under the root, fd-relative.
//!
//! Layout of the work: the root is resolved and opened once; its listing is
//! classified (only directories named like an instance id, on the root's own
//! mount, are candidates); if there are any, the live instance ids are asked
//! once; then each candidate folder is handled by one task, at most
//! `concurrency` at a time. The filesystem work of a task runs on the
//! blocking pool, its one API question (rule 1's re-check) stays async in
//! between, so no blocking thread ever waits on the network.
//!
//! Within a folder, rule 1 (the whole folder) is decided first: no pod in the
//! listing, nothing below changed for N days, then (async) no pod now, then
//! nothing changed since the first look, then removal. If it does not apply,
//! one walk applies rules 3 (`rm_data_*` children) and 2 (`postgresql*.log`
//! anywhere below).

use std::collections::{BTreeSet, HashMap};
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
use tokio_util::sync::CancellationToken;

use super::config::SweepConfig;
use super::fsx::{self, Kind, Meta, MountIdentity, OpenDirError, MAX_DEPTH};
use super::report::{unix_seconds, KeepReason, KeptEntry, RemovedEntry, Rule, SweepIssue, SweepReport};
use super::{LiveFuture, LiveInstances, SweepError};

const NS_PER_DAY: i128 = 86_400 * 1_000_000_000;

/// A stop request for running sweeps (shutdown). The blocking workers poll
/// the flag between any two entries they look at or remove, the async parts
/// (API questions) wait on the token; both are set together.
#[derive(Default)]
pub(crate) struct Cancel {
    flag: AtomicBool,
    token: CancellationToken,
}

impl Cancel {
    pub(crate) fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.token.cancel();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Waits for an ownership answer, unless the sweep is cancelled first.
    async fn ask<T>(&self, question: LiveFuture<'_, T>) -> Result<T, Asked> {
        tokio::select! {
            biased;
            () = self.token.cancelled() => Err(Asked::Cancelled),
            answer = question => answer.map_err(|e| Asked::Failed(e.to_string())),
        }
    }
}

/// Why an ownership question has no answer.
enum Asked {
    Cancelled,
    Failed(String),
}

/// Everything a worker needs, shared by all of them.
struct Ctx {
    root_fd: OwnedFd,
    root_path: PathBuf,
    root_mount: MountIdentity,
    now_ns: i128,
    cutoff_ns: i128,
    dry_run: bool,
    cancel: Arc<Cancel>,
    owners: Arc<dyn LiveInstances>,
    /// The live ids listed at the start of the sweep, or why not.
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
    /// The outcome of a task that failed outright (nothing was decided).
    fn failed(path: String, what: String) -> Self {
        let mut out = Outcome::default();
        out.error(path, what);
        out
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
    cancel: Arc<Cancel>,
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
    let (root, candidates, mut outcome) = match blocking(move || prepare(&root_flag, &ins_id)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return finish(report, clock, Some(e)),
        Err(what) => return finish(report, clock, Some(SweepError::Internal { what })),
    };
    report.root = root.path.to_string_lossy().into_owned();

    // Ownership, asked only when some folder could depend on it. A failed
    // list disables rule 1 for this sweep; the next sweep asks again.
    let live = if candidates.is_empty() {
        Ok(BTreeSet::new())
    } else {
        match cancel.ask(owners.live_ins_ids()).await {
            Ok(ids) => Ok(ids),
            // Every folder is then kept as cancelled, below.
            Err(Asked::Cancelled) => Err("sweep cancelled".to_owned()),
            Err(Asked::Failed(why)) => {
                outcome.error(report.root.clone(), format!("rule 1 (instance folders) skipped: {why}"));
                Err(why)
            }
        }
    };
    let ctx = Arc::new(Ctx {
        root_fd: root.fd,
        root_path: root.path,
        root_mount: root.mount,
        now_ns,
        cutoff_ns,
        dry_run,
        cancel,
        owners,
        live,
    });

    let permits = Arc::new(Semaphore::new(cfg.concurrency));
    let mut workers = JoinSet::new();
    for cand in candidates {
        let path = display(&ctx.root_path, Path::new(&cand.name));
        if ctx.cancel.is_cancelled() {
            outcome.keep(path, KeepReason::Cancelled, None);
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            outcome.error(path, "worker pool closed".into());
            continue;
        };
        let ctx = Arc::clone(&ctx);
        workers.spawn(async move {
            let _permit = permit;
            sweep_folder(ctx, cand).await
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

/// Runs filesystem work on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work).await.map_err(|join| format!("sweep task failed: {join}"))
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

/// The opened root.
struct Root {
    fd: OwnedFd,
    path: PathBuf,
    mount: MountIdentity,
}

type Prepared = (Root, Vec<Candidate>, Outcome);

/// Opens the root and classifies the top level. Any failure here deletes
/// nothing.
fn prepare(root_flag: &Path, ins_id: &regex::Regex) -> Result<Prepared, SweepError> {
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
    let root = Root { fd: root_fd, path: root_path, mount: root_meta.mount() };
    let mut candidates = Vec::new();
    for cname in names {
        let rel = rel_path(Path::new(""), &cname);
        let path = display(&root.path, &rel);
        let meta = match fsx::stat_at(root.fd.as_fd(), &cname) {
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
        if root.mount.differs(&meta) {
            outcome.keep(path, KeepReason::MountPoint, None);
            continue;
        }
        candidates.push(Candidate { name: name.to_owned(), meta });
    }
    Ok((root, candidates, outcome))
}

fn rel_path(parent: &Path, name: &CStr) -> PathBuf {
    parent.join(OsStr::from_bytes(name.to_bytes()))
}

fn display(root: &Path, rel: &Path) -> String {
    root.join(rel).to_string_lossy().into_owned()
}

fn age_days(ctx: &Ctx, ns: i128) -> f64 {
    let days = (ctx.now_ns - ns) as f64 / NS_PER_DAY as f64;
    (days * 100.0).round() / 100.0
}

/// Older than N days (`ns` an mtime, or a change time).
fn is_overdue(ctx: &Ctx, ns: i128) -> bool {
    ns < ctx.cutoff_ns
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
async fn sweep_folder(ctx: Arc<Ctx>, cand: Candidate) -> Outcome {
    let path = display(&ctx.root_path, Path::new(&cand.name));
    let c = Arc::clone(&ctx);
    let pending = match blocking(move || examine(&c, cand)).await {
        Ok(Step::Done(out)) => return out,
        Ok(Step::Ask(pending)) => pending,
        Err(what) => return Outcome::failed(path, what),
    };
    // Fresh, for this one id: a pod may have been created since the list.
    let verdict = ctx.cancel.ask(ctx.owners.is_live(&pending.cand.name)).await;
    let c = Arc::clone(&ctx);
    match blocking(move || finish_rule1(&c, pending, verdict)).await {
        Ok(out) => out,
        Err(what) => Outcome::failed(path, what),
    }
}

/// What the first look at a folder decided.
enum Step {
    /// Rule 1 does not apply (and rules 3 and 2 ran), or the folder cannot
    /// be handled.
    Done(Outcome),
    /// Rule 1 may apply: ask whether a pod carries the id now.
    Ask(Pending),
}

/// A folder rule 1 may remove, held open across the API question.
struct Pending {
    cand: Candidate,
    fd: OwnedFd,
    out: Outcome,
}

/// First look: the listing's ownership, then the folder's age.
fn examine(ctx: &Ctx, cand: Candidate) -> Step {
    let mut out = Outcome::default();
    let rel = PathBuf::from(&cand.name);
    let path = display(&ctx.root_path, &rel);
    let Ok(cname) = CString::new(cand.name.as_bytes()) else {
        out.keep(path, KeepReason::NotInstanceId, None);
        return Step::Done(out);
    };
    let Some(fd) = open_dir_keep(&mut out, ctx.root_fd.as_fd(), &cname, &path, ctx.root_mount, &cand.meta) else {
        return Step::Done(out);
    };
    match &ctx.live {
        Err(_) if ctx.cancel.is_cancelled() => {
            out.keep(path, KeepReason::Cancelled, None);
            return Step::Done(out);
        }
        Err(why) => out.keep(path.clone(), KeepReason::OwnershipUnknown, Some(why.clone())),
        Ok(live) if live.contains(&cand.name) => out.keep(path.clone(), KeepReason::OwnedByLivePod, None),
        Ok(_) => {
            if scan(ctx, fd.as_fd(), &rel, true).decide(ctx, &mut out, &path, false) {
                return Step::Ask(Pending { cand, fd, out });
            }
        }
    }
    if !ctx.cancel.is_cancelled() {
        walk_rules(ctx, &mut out, fd.as_fd(), &rel, 1);
    }
    Step::Done(out)
}

/// After the API answered (or failed): remove the folder, or keep it and
/// apply rules 3 and 2 inside.
fn finish_rule1(ctx: &Ctx, pending: Pending, verdict: Result<bool, Asked>) -> Outcome {
    let Pending { cand, fd, mut out } = pending;
    let rel = PathBuf::from(&cand.name);
    let path = display(&ctx.root_path, &rel);
    match verdict {
        Err(Asked::Cancelled) => {
            out.keep(path, KeepReason::Cancelled, None);
            return out;
        }
        Err(Asked::Failed(why)) => {
            out.error(path.clone(), format!("rule 1: could not ask whether a pod carries {}: {why}", cand.name));
            out.keep(path.clone(), KeepReason::OwnershipUnknown, Some(format!("re-check before removal: {why}")));
        }
        Ok(true) => {
            out.keep(path.clone(), KeepReason::OwnedByLivePod, Some("pod appeared during the sweep".into()));
        }
        Ok(false) => {
            let Ok(cname) = CString::new(cand.name.as_bytes()) else {
                out.keep(path, KeepReason::NotInstanceId, None);
                return out;
            };
            if remove_instance(ctx, &mut out, &cname, &rel, &path, fd.as_fd()) {
                return out;
            }
        }
    }
    if !ctx.cancel.is_cancelled() {
        walk_rules(ctx, &mut out, fd.as_fd(), &rel, 1);
    }
    out
}

/// Rule 1's last steps: recency again (something may have been written
/// while the API answered), then the removal. Returns true when the folder
/// was removed (or would be, in a dry run), i.e. when rules 2 and 3 have
/// nothing left to do.
fn remove_instance(ctx: &Ctx, out: &mut Outcome, cname: &CStr, rel: &Path, path: &str, fd: BorrowedFd<'_>) -> bool {
    let second = scan(ctx, fd, rel, true);
    if !second.decide(ctx, out, path, true) {
        return false;
    }
    let age = age_days(ctx, second.newest_ns);
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
            let reason = match e {
                RemoveError::Recent { log: true, .. } => KeepReason::RecentLogAppeared,
                RemoveError::Recent { log: false, .. } | RemoveError::Io(_, Errno::NOTEMPTY) => KeepReason::Changed,
                RemoveError::Open(_, OpenDirError::MountPoint) => KeepReason::ContainsMountPoint,
                RemoveError::Cancelled => KeepReason::Cancelled,
                _ => KeepReason::Changed,
            };
            stopped(out, path, &stats, &e, reason);
            false
        }
    }
}

/// Reports a removal that stopped part way: what went, why it stopped, and
/// that the rest is kept as it is.
fn stopped(out: &mut Outcome, path: &str, stats: &Removal, e: &RemoveError, reason: KeepReason) {
    let what = format!("partially removed ({} entries, {} bytes): {e}", stats.entries, stats.bytes);
    if matches!(e, RemoveError::Cancelled) {
        // Not an error: shutdown stopped it between two entries.
        tracing::warn!(
            path,
            entries = stats.entries,
            bytes = stats.bytes,
            "log sweep: removal stopped by shutdown; the rest is kept"
        );
        out.keep(path.to_owned(), reason, Some(format!("{what}; the rest is kept")));
    } else {
        out.error(path.to_owned(), what);
        out.keep(path.to_owned(), reason, Some("deletion stopped; the rest is kept".into()));
    }
}

fn removed(ctx: &Ctx, out: &mut Outcome, path: &str, rule: Rule, age_days: f64, bytes: u64, entries: u64) {
    tracing::info!(path, rule = rule.as_str(), age_days, bytes, entries, dry_run = ctx.dry_run, "log sweep: removed");
    out.removed.push(RemovedEntry { path: path.to_owned(), rule, age_days, bytes, entries });
}

/// What a read-only walk of a subtree found.
#[derive(Default)]
struct Scan {
    /// Newest change (mtime or ctime) of the subtree's root and of every
    /// entry walked below it (only when judging age).
    newest_ns: i128,
    bytes: u64,
    entries: u64,
    /// Set when the subtree must not be removed (mount point inside, listing
    /// error, too deep, cancelled).
    blocked: Option<(KeepReason, String)>,
    /// The first entry found that changed within N days; the walk stops there.
    recent: Option<Recent>,
}

/// An entry that changed within N days.
struct Recent {
    path: String,
    log: bool,
    meta: Meta,
}

impl Scan {
    /// Records why the subtree is kept, if it is; true when it may go.
    /// `again`: this is the re-check right before deleting.
    fn decide(&self, ctx: &Ctx, out: &mut Outcome, path: &str, again: bool) -> bool {
        if let Some((reason, detail)) = &self.blocked {
            if *reason == KeepReason::Unreadable {
                out.error(path.to_owned(), detail.clone());
            }
            out.keep(path.to_owned(), *reason, Some(detail.clone()));
            return false;
        }
        let Some(recent) = &self.recent else { return true };
        let reason = match (again, recent.log) {
            (false, true) => KeepReason::RecentLog,
            (false, false) => KeepReason::TooRecent,
            (true, true) => KeepReason::RecentLogAppeared,
            (true, false) => KeepReason::Changed,
        };
        let who = if recent.path == path { "the folder itself".to_owned() } else { recent.path.clone() };
        let m = &recent.meta;
        let mut detail = format!("{who} changed {} days ago", age_days(ctx, m.changed_ns()));
        if is_overdue(ctx, m.mtime_ns) {
            // Old content, fresh status change: a copy or restore that kept
            // mtimes (`cp -p`, `tar x`), a chmod or chown, a rename.
            detail.push_str(&format!(" (ctime; its mtime is {} days old)", age_days(ctx, m.mtime_ns)));
        }
        out.keep(path.to_owned(), reason, Some(detail));
        false
    }
}

/// Walks a subtree read-only. With `judge_age`, looks at the change times
/// (mtime and ctime) of the subtree's root and of every entry of any kind
/// below it, and stops at the first that is within N days (the folder is
/// kept anyway).
fn scan(ctx: &Ctx, dir: BorrowedFd<'_>, rel: &Path, judge_age: bool) -> Scan {
    let mut s = Scan::default();
    if judge_age {
        match fsx::stat_fd(dir) {
            Ok(own) => {
                s.newest_ns = own.changed_ns();
                if !is_overdue(ctx, own.changed_ns()) {
                    let own = Recent { path: display(&ctx.root_path, rel), log: false, meta: own };
                    s.recent = Some(explain(ctx, dir, rel, 1).unwrap_or(own));
                    return s;
                }
            }
            Err(e) => {
                let detail = format!("{}: stat: {e}", display(&ctx.root_path, rel));
                s.blocked = Some((KeepReason::Unreadable, detail));
                return s;
            }
        }
    }
    scan_into(ctx, dir, rel, 1, judge_age, &mut s);
    s
}

/// For a directory that changed within N days: the first entry below it
/// that did too, the deepest along the way (a directory changes when an
/// entry is added or removed, so this usually names the file that did it).
fn explain(ctx: &Ctx, dir: BorrowedFd<'_>, rel: &Path, depth: usize) -> Option<Recent> {
    let mut inner = Scan::default();
    scan_into(ctx, dir, rel, depth, true, &mut inner);
    inner.recent
}

fn scan_into(ctx: &Ctx, dir: BorrowedFd<'_>, rel: &Path, depth: usize, judge_age: bool, s: &mut Scan) {
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
        if ctx.cancel.is_cancelled() {
            s.blocked = Some((KeepReason::Cancelled, "sweep cancelled".into()));
            return;
        }
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
        if meta.kind == Kind::File {
            s.bytes += meta.size;
        }
        let recent = judge_age && !is_overdue(ctx, meta.changed_ns());
        if judge_age {
            s.newest_ns = s.newest_ns.max(meta.changed_ns());
        }
        if recent && meta.kind != Kind::Dir {
            let log = meta.kind == Kind::File && is_log(&name);
            s.recent = Some(Recent { path: display(&ctx.root_path, &child), log, meta });
            return;
        }
        if meta.kind != Kind::Dir {
            continue;
        }
        match fsx::open_child_dir(dir, &name, ctx.root_mount, Some(&meta)) {
            Ok((fd, _)) if recent => {
                let own = Recent { path: display(&ctx.root_path, &child), log: false, meta };
                s.recent = Some(explain(ctx, fd.as_fd(), &child, depth + 1).unwrap_or(own));
                return;
            }
            Ok((fd, _)) => {
                scan_into(ctx, fd.as_fd(), &child, depth + 1, judge_age, s);
                if s.blocked.is_some() || s.recent.is_some() {
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
        }
    }
}

/// Why a deletion stopped.
#[derive(Debug)]
enum RemoveError {
    /// An entry changed within N days (rule 1 only); `log`: a `*.log`.
    Recent {
        path: String,
        log: bool,
    },
    Open(String, OpenDirError),
    Io(String, Errno),
    TooDeep(String),
    /// The sweep was cancelled; stopped between two entries.
    Cancelled,
}

impl std::fmt::Display for RemoveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Recent { path, .. } => write!(f, "{path} changed within the last days, during the sweep"),
            Self::Open(p, e) => write!(f, "{p}: {e}"),
            Self::Io(p, e) => write!(f, "{p}: {e}"),
            Self::TooDeep(p) => write!(f, "{p}: deeper than {MAX_DEPTH} levels"),
            Self::Cancelled => f.write_str("sweep cancelled"),
        }
    }
}

#[derive(Default)]
struct Removal {
    bytes: u64,
    entries: u64,
    /// Change time, before we unlinked one of its names, of every inode with
    /// more than one hard link: unlinking a name changes the inode's ctime,
    /// which must not make its other names look recent.
    links: HashMap<(u32, u32, u64), i128>,
}

/// Empties a directory, fd-relative and post-order. Every subdirectory is
/// opened with the same no-symlink, no-mount-crossing rules as the scan, so a
/// symlink or mount that appears mid-deletion stops it instead of being
/// followed. With `protect_recent` (rule 1), an entry that changed within N
/// days stops it too. Cancellation is checked before every entry: each
/// unlink is whole, so a stop leaves a consistent, partly emptied tree.
fn remove_contents(
    ctx: &Ctx,
    dir: BorrowedFd<'_>,
    rel: &Path,
    depth: usize,
    protect_recent: bool,
    stats: &mut Removal,
) -> Result<(), RemoveError> {
    if depth > MAX_DEPTH {
        return Err(RemoveError::TooDeep(display(&ctx.root_path, rel)));
    }
    let names = fsx::list(dir).map_err(|e| RemoveError::Io(display(&ctx.root_path, rel), e))?;
    for name in names {
        if ctx.cancel.is_cancelled() {
            return Err(RemoveError::Cancelled);
        }
        let child = rel_path(rel, &name);
        let meta = match fsx::stat_at(dir, &name) {
            Ok(m) => m,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(RemoveError::Io(display(&ctx.root_path, &child), e)),
        };
        let inode = (meta.dev.0, meta.dev.1, meta.ino);
        if protect_recent {
            let changed = stats.links.get(&inode).copied().unwrap_or(meta.changed_ns());
            if !is_overdue(ctx, changed) {
                let log = meta.kind == Kind::File && is_log(&name);
                return Err(RemoveError::Recent { path: display(&ctx.root_path, &child), log });
            }
        }
        match meta.kind {
            Kind::Dir => {
                let (fd, _) = fsx::open_child_dir(dir, &name, ctx.root_mount, Some(&meta))
                    .map_err(|e| RemoveError::Open(display(&ctx.root_path, &child), e))?;
                remove_contents(ctx, fd.as_fd(), &child, depth + 1, protect_recent, stats)?;
                drop(fd);
                fsx::remove_empty_dir(dir, &name).map_err(|e| RemoveError::Io(display(&ctx.root_path, &child), e))?;
            }
            Kind::File => {
                fsx::unlink_file(dir, &name).map_err(|e| RemoveError::Io(display(&ctx.root_path, &child), e))?;
                stats.bytes += meta.size;
                if meta.nlink > 1 {
                    stats.links.entry(inode).or_insert(meta.changed_ns());
                }
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
        if ctx.cancel.is_cancelled() {
            out.keep(here, KeepReason::Cancelled, Some("not walked further: sweep cancelled".into()));
            return;
        }
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
    if !s.decide(ctx, out, path, false) {
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
            let reason = if matches!(e, RemoveError::Cancelled) { KeepReason::Cancelled } else { KeepReason::Changed };
            stopped(out, path, &stats, &e, reason);
        }
    }
}
