//! Safe log-cleanup sweeps of `--dbcluster-log-dir` (DESIGN.md "Log cleaning").
//!
//! The original cleaned instance logs every 6 hours with `find` and `rm -fr`
//! over ssh and failed open: a missing trailing slash or a failed command
//! deleted every podless folder, unrelated ones included. This module keeps
//! its three rules (COMPAT.md) and makes the wrong deletion impossible:
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
//! - rule 1 re-checks ownership and recency immediately before deleting, and
//!   the deletion itself stops at a recent `*.log`;
//! - sweeps run on the blocking pool, one folder per task, bounded by a
//!   semaphore, one sweep at a time.
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
use std::path::PathBuf;

pub use config::{LogSweepArgs, LogSweepConfigError};
pub use handle::{spawn, SweepHandle};
pub use report::{KeepReason, KeptEntry, RemovedEntry, Rule, SweepIssue, SweepReport};

/// Who currently owns which instance: the insIds carried by pods (label
/// `apsara.metric.ins_id`). Rule 1 removes a folder only when this answers
/// and the folder's insId is absent.
///
/// Called from the blocking pool, once at the start of a sweep and again
/// right before each folder deletion, so it should answer from a cache (the
/// pod watch) rather than query the API server each time.
pub trait LiveInstances: Send + Sync + 'static {
    fn live_ins_ids(&self) -> Result<BTreeSet<String>, LiveInstancesError>;
}

/// Why instance ownership is unknown. Every variant disables rule 1 for the
/// sweep (fail closed).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LiveInstancesError {
    #[error("no cluster: instance ownership unknown")]
    NoCluster,
    #[error("pod cache not synced yet")]
    NotSynced,
    #[error("pod list failed: {reason}")]
    ListFailed { reason: String },
}

/// Ownership source for a daemon running without a cluster: ownership is
/// unknown, so instance folders are never removed (rules 2 and 3 still run).
#[derive(Debug, Clone, Copy, Default)]
pub struct Standalone;

impl LiveInstances for Standalone {
    fn live_ins_ids(&self) -> Result<BTreeSet<String>, LiveInstancesError> {
        Err(LiveInstancesError::NoCluster)
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
