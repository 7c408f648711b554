//! Safe log-cleanup sweeps of `--dbcluster-log-dir` (docs/design.md "Log sweeps").
//!
//! The original cleaned instance logs every 6 hours with `find` and `rm -fr`
//! over ssh and failed open: a missing trailing slash or a failed command
//! deleted every podless folder, unrelated ones included. This module keeps
//! its three rules (docs/compat.md "Log cleaning") and makes the wrong deletion impossible:
//!
//! - only top-level directories whose names match `--ins-id-pattern` are ever
//!   candidates (`lost+found`, an admin's folder, stray files: kept);
//! - the root is canonicalised, opened once, and everything below is reached
//!   with `openat`/`statx`/`unlinkat` relative to held directory fds, one
//!   component at a time, never following a symlink (a symlink is reported and
//!   left, or unlinked as a link inside a folder being removed) and never
//!   crossing a mount point (device and mount id compared with the root's);
//! - a missing or unreadable root deletes nothing, and a failed ownership
//!   query disables rule 1 (rules 2 and 3 do not depend on ownership);
//! - rule 1 never removes a folder younger than N days: the folder itself
//!   and every entry below it, of any kind, must be unmodified (mtime) and
//!   unchanged (ctime) for N days, so a folder created before its pod, one
//!   that logs to `.csv`, or one restored with old mtimes (`cp -p`, `tar x`,
//!   whose ctime is the restore) stays;
//! - ownership is asked of the API server when a sweep runs (every live id
//!   once, then the one id again right before its folder is removed), never
//!   answered from a copy; right before deleting, recency is re-checked too,
//!   and the deletion itself stops at an entry that turned recent;
//! - sweeps run on the blocking pool, one folder per task, bounded by a
//!   semaphore, one sweep at a time; cancellation (shutdown) is seen between
//!   any two entries, so even a large removal stops within milliseconds and
//!   leaves a consistent, partly removed tree.
//!
//! Layout: [`config`] (flags), [`fsx`] (fd-relative primitives), `sweep` (the
//! rules), [`report`] (what the API serves), `handle` (schedule, on-demand
//! sweeps, metrics).

pub mod config;
pub(crate) mod fsx;
mod handle;
pub mod report;
mod sweep;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub use config::{LogSweepArgs, LogSweepConfigError};
pub use handle::{spawn, SweepHandle};
pub use report::{KeepReason, KeptEntry, RemovedEntry, Rule, SweepIssue, SweepReport};

/// What a [`LiveInstances`] question returns: a boxed future, so the trait
/// can be used as `dyn` (the sweeper holds an `Arc<dyn LiveInstances>`).
pub type LiveFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LiveInstancesError>> + Send + 'a>>;

/// Who currently owns which instance: the insIds carried by pods (label
/// `apsara.metric.ins_id`). Rule 1 removes a folder only when both questions
/// were answered and both said "nobody".
///
/// Both are asked when a sweep runs, from async code (the blocking workers
/// never wait on the network), and must be answered by the source of truth
/// rather than a copy kept up to date in between: a sweep runs every few
/// hours, so a copy would cost far more than it saves.
pub trait LiveInstances: Send + Sync + 'static {
    /// Every insId a pod carries now. Asked once per sweep, and only when
    /// the root holds candidate folders. A slightly stale answer is safe: an
    /// id it misses is asked about again ([`Self::is_live`]) before anything
    /// goes.
    fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>>;

    /// Whether a pod carries `ins_id` now. Asked right before the folder of
    /// an id [`Self::live_ins_ids`] did not list is removed, so it must be a
    /// fresh read.
    fn is_live<'a>(&'a self, ins_id: &'a str) -> LiveFuture<'a, bool>;
}

/// Why instance ownership is unknown. Every variant keeps the folders it
/// concerns (fail closed): a failed [`LiveInstances::live_ins_ids`] disables
/// rule 1 for the sweep, a failed [`LiveInstances::is_live`] keeps that
/// folder.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LiveInstancesError {
    #[error("no cluster: instance ownership unknown")]
    NoCluster,
    #[error("pod list failed: {reason}")]
    ListFailed { reason: String },
    #[error("cannot ask about {ins_id:?}: not a valid label value")]
    NotALabelValue { ins_id: String },
}

/// Ownership source for a daemon running without a cluster: ownership is
/// unknown, so instance folders are never removed (rules 2 and 3 still run).
#[derive(Debug, Clone, Copy, Default)]
pub struct Standalone;

impl LiveInstances for Standalone {
    fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
        Box::pin(async { Err(LiveInstancesError::NoCluster) })
    }

    fn is_live<'a>(&'a self, _ins_id: &'a str) -> LiveFuture<'a, bool> {
        Box::pin(async { Err(LiveInstancesError::NoCluster) })
    }
}

/// Why a sweep did not run at all. Nothing is deleted in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("log root {root:?} is unavailable: {source}")]
    RootUnavailable {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log root {root:?} cannot be listed: {source}")]
    RootUnreadable {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to sweep `/` as the log root")]
    RootIsSlash,
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("internal error: {what}")]
    Internal { what: String },
}

#[cfg(test)]
mod tests;
