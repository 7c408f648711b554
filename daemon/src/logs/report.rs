//! The sweep report: what went, what stayed and why, what failed.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Which of the three rules (docs/compat.md "Log cleaning") removed an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Rule 1: an instance folder no pod owns, in which nothing (the folder
    /// itself included) changed for N days.
    InstanceFolder,
    /// Rule 2: an overdue `postgresql*.log`.
    PostgresqlLog,
    /// Rule 3: an overdue `rm_data_*` folder.
    RmData,
}

impl Rule {
    pub const ALL: [Rule; 3] = [Rule::InstanceFolder, Rule::PostgresqlLog, Rule::RmData];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::InstanceFolder => "instance_folder",
            Rule::PostgresqlLog => "postgresql_log",
            Rule::RmData => "rm_data",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Rule::InstanceFolder => 0,
            Rule::PostgresqlLog => 1,
            Rule::RmData => 2,
        }
    }
}

/// Why an entry that a rule could have matched was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// A symlink: never followed, never removed on its own (even one named
    /// like an instance: what it points to is not ours to judge).
    Symlink,
    /// A mount point (bind mounts included): never crossed.
    MountPoint,
    /// A top-level name the instance-id pattern does not match (lost+found,
    /// an admin's folder, ...).
    NotInstanceId,
    /// A top-level entry that is not a directory.
    NotADirectory,
    /// A pod carrying this insId exists.
    OwnedByLivePod,
    /// Instance ownership could not be established (the pod list or the
    /// re-check of this one insId right before removal failed, or standalone
    /// mode): rule 1 deletes nothing.
    OwnershipUnknown,
    /// A `*.log` below the folder changed (mtime or ctime) within N days.
    RecentLog,
    /// A recent `*.log` appeared between the decision and the deletion.
    RecentLogAppeared,
    /// The folder holds a mount point, so it cannot be removed safely.
    ContainsMountPoint,
    /// Listing or examining the folder failed: fail closed.
    Unreadable,
    /// The entry changed while being examined (for an instance folder:
    /// something below it changed between the decision and the deletion).
    Changed,
    /// Not yet N days old: an `rm_data_*` folder by its mtime; an instance
    /// folder when it, or any entry of any kind below it, was modified or
    /// changed (mtime or ctime) within N days.
    TooRecent,
    /// The sweep was cancelled (shutdown) before or while this entry was
    /// handled; a removal under way stopped between two entries, so what is
    /// left is a consistent, partly removed tree.
    Cancelled,
}

/// One removed (or, in a dry run, to-be-removed) entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemovedEntry {
    pub path: String,
    pub rule: Rule,
    /// Age in days of what the rule judged (the file or folder mtime; for an
    /// instance folder, the newest change, mtime or ctime, of the folder or
    /// of anything below it).
    pub age_days: f64,
    /// Apparent size of every regular file removed.
    pub bytes: u64,
    /// Number of entries removed (files, symlinks and folders).
    pub entries: u64,
}

/// One entry left alone, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeptEntry {
    pub path: String,
    pub reason: KeepReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One thing that went wrong; it never led to a deletion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepIssue {
    pub path: String,
    pub error: String,
}

/// The outcome of one sweep, served by `GET /api/v2/logs/last-sweep`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepReport {
    pub started_at: String,
    pub finished_at: String,
    pub started_unix: f64,
    pub duration_seconds: f64,
    /// True when nothing was (or would have been) deleted for real.
    pub dry_run: bool,
    /// True when the global `--log-sweep-dry-run` forced the dry run.
    pub forced_dry_run: bool,
    /// The canonical root that was swept (or the flag, if it could not be
    /// resolved).
    pub root: String,
    pub overdue_days: u32,
    /// Set when the sweep stopped before doing anything (missing root, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
    pub removed: Vec<RemovedEntry>,
    pub kept: Vec<KeptEntry>,
    pub errors: Vec<SweepIssue>,
    pub removed_bytes: u64,
}

impl SweepReport {
    /// Sorts every list by path so reports compare equal whatever order the
    /// concurrent workers finished in.
    pub(crate) fn normalise(&mut self) {
        self.removed.sort_by(|a, b| a.path.cmp(&b.path).then(a.rule.cmp(&b.rule)));
        self.kept.sort_by(|a, b| a.path.cmp(&b.path).then(a.reason.cmp(&b.reason)));
        self.errors.sort_by(|a, b| a.path.cmp(&b.path).then(a.error.cmp(&b.error)));
        self.removed_bytes = self.removed.iter().map(|r| r.bytes).sum();
    }

    /// Finds the kept entry for `path`, for tests and callers.
    pub fn kept_reason(&self, path: &str) -> Option<KeepReason> {
        self.kept.iter().find(|k| k.path == path).map(|k| k.reason)
    }
}

pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
