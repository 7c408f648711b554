//! Flags of the log sweeper and their validation.

use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

/// Command-line flags of the log sweeper (docs/compat.md keeps the first two).
#[derive(clap::Args, Debug, Clone)]
pub struct LogSweepArgs {
    /// Root of the instance log folders (`<dir>/<insId>/...`). Trailing
    /// slashes and relative paths are normalised before use.
    #[arg(long = "dbcluster-log-dir", default_value = "/flash/polardb_dbcluster/")]
    pub dbcluster_log_dir: PathBuf,

    /// N: files, `rm_data_*` folders and podless instance folders older than
    /// N days are removed.
    #[arg(long = "ins-folder-overdue-days", default_value_t = 3)]
    pub ins_folder_overdue_days: u32,

    /// Time between scheduled sweeps (`6h`, `30m`, `90s`, `1h30m`). The first
    /// sweep runs 30 s after start (or after one interval, if shorter).
    #[arg(long = "log-sweep-interval", default_value = "6h", value_parser = crate::config::parse_duration)]
    pub log_sweep_interval: Duration,

    /// Global dry run: every sweep only reports, for first deployments.
    #[arg(long = "log-sweep-dry-run")]
    pub log_sweep_dry_run: bool,

    /// Allow real (deleting) sweeps over HTTP; they also need the bearer token.
    #[arg(long = "log-sweep-http-enable")]
    pub log_sweep_http_enable: bool,

    /// File holding the bearer token for real HTTP sweeps (a mounted Secret;
    /// re-read on every request so a rotation needs no restart).
    #[arg(long = "log-sweep-token-file")]
    pub log_sweep_token_file: Option<PathBuf>,

    /// Only top-level entries whose names match this are instance folders.
    #[arg(long = "ins-id-pattern", default_value = "^[0-9]+$")]
    pub ins_id_pattern: String,

    /// How many instance folders are swept in parallel on the blocking pool.
    #[arg(long = "log-sweep-concurrency", default_value_t = 4)]
    pub log_sweep_concurrency: usize,

    /// Set by the wiring, not a flag: in a cluster, HTTP callers are checked
    /// with TokenReview and SubjectAccessReview, so no token file is needed.
    #[arg(skip)]
    pub callers_checked_by_cluster: bool,
}

impl Default for LogSweepArgs {
    /// The same values as the clap defaults, for tests and embedding.
    fn default() -> Self {
        Self {
            dbcluster_log_dir: PathBuf::from("/flash/polardb_dbcluster/"),
            ins_folder_overdue_days: 3,
            log_sweep_interval: Duration::from_secs(6 * 3600),
            log_sweep_dry_run: false,
            log_sweep_http_enable: false,
            log_sweep_token_file: None,
            ins_id_pattern: "^[0-9]+$".to_owned(),
            log_sweep_concurrency: 4,
            callers_checked_by_cluster: false,
        }
    }
}

/// A flag value the sweeper cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum LogSweepConfigError {
    #[error("--dbcluster-log-dir must not be empty")]
    EmptyRoot,
    #[error("--ins-id-pattern {pattern:?} is not a valid regex: {source}")]
    BadPattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("--ins-id-pattern {pattern:?} matches {name:?}: it must never match `.`, `..` or an empty name")]
    PatternTooBroad { pattern: String, name: &'static str },
    #[error("--log-sweep-concurrency must be between 1 and 64, got {value}")]
    BadConcurrency { value: usize },
    #[error("--log-sweep-interval must be at least 1s, got {value:?}")]
    IntervalTooShort { value: Duration },
    #[error("--ins-folder-overdue-days must be at least 1")]
    ZeroOverdueDays,
    #[error("--log-sweep-http-enable needs --api-token-file when standalone (in a cluster, callers are checked with TokenReview)")]
    TokenFileMissing,
}

/// Validated settings, derived once from [`LogSweepArgs`].
#[derive(Debug, Clone)]
pub(crate) struct SweepConfig {
    pub root_flag: PathBuf,
    pub overdue_days: u32,
    pub interval: Duration,
    pub global_dry_run: bool,
    pub ins_id: Regex,
    pub concurrency: usize,
}

impl LogSweepArgs {
    /// Checks every flag; the sweeper never starts on a value it would have
    /// to guess about.
    pub(crate) fn validate(&self) -> Result<SweepConfig, LogSweepConfigError> {
        if self.dbcluster_log_dir.as_os_str().is_empty() {
            return Err(LogSweepConfigError::EmptyRoot);
        }
        let ins_id = Regex::new(&self.ins_id_pattern)
            .map_err(|source| LogSweepConfigError::BadPattern { pattern: self.ins_id_pattern.clone(), source })?;
        for name in ["", ".", ".."] {
            if ins_id.is_match(name) {
                return Err(LogSweepConfigError::PatternTooBroad { pattern: self.ins_id_pattern.clone(), name });
            }
        }
        if !(1..=64).contains(&self.log_sweep_concurrency) {
            return Err(LogSweepConfigError::BadConcurrency { value: self.log_sweep_concurrency });
        }
        if self.log_sweep_interval < Duration::from_secs(1) {
            return Err(LogSweepConfigError::IntervalTooShort { value: self.log_sweep_interval });
        }
        if self.ins_folder_overdue_days == 0 {
            return Err(LogSweepConfigError::ZeroOverdueDays);
        }
        if self.log_sweep_http_enable && self.log_sweep_token_file.is_none() && !self.callers_checked_by_cluster {
            return Err(LogSweepConfigError::TokenFileMissing);
        }
        Ok(SweepConfig {
            root_flag: self.dbcluster_log_dir.clone(),
            overdue_days: self.ins_folder_overdue_days,
            interval: self.log_sweep_interval,
            global_dry_run: self.log_sweep_dry_run,
            ins_id,
            concurrency: self.log_sweep_concurrency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_is_typed() {
        let ok = LogSweepArgs::default();
        assert!(ok.validate().is_ok());
        let mut a = ok.clone();
        a.ins_id_pattern = "(".into();
        assert!(matches!(a.validate(), Err(LogSweepConfigError::BadPattern { .. })));
        let mut a = ok.clone();
        a.ins_id_pattern = ".*".into();
        assert!(matches!(a.validate(), Err(LogSweepConfigError::PatternTooBroad { .. })));
        let mut a = ok.clone();
        a.log_sweep_concurrency = 0;
        assert!(matches!(a.validate(), Err(LogSweepConfigError::BadConcurrency { .. })));
        let mut a = ok.clone();
        a.log_sweep_http_enable = true;
        assert!(matches!(a.validate(), Err(LogSweepConfigError::TokenFileMissing)));
        a.callers_checked_by_cluster = true;
        assert!(a.validate().is_ok(), "in a cluster the API server checks callers");
        let mut a = ok;
        a.ins_folder_overdue_days = 0;
        assert!(matches!(a.validate(), Err(LogSweepConfigError::ZeroOverdueDays)));
    }

    #[test]
    fn clap_defaults_match_default() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            logs: LogSweepArgs,
        }
        let cli = Cli::parse_from(["x"]);
        let d = LogSweepArgs::default();
        assert_eq!(cli.logs.dbcluster_log_dir, d.dbcluster_log_dir);
        assert_eq!(cli.logs.log_sweep_interval, d.log_sweep_interval);
        assert_eq!(cli.logs.ins_id_pattern, d.ins_id_pattern);
        let cli = Cli::parse_from(["x", "--log-sweep-interval", "90s"]);
        assert_eq!(cli.logs.log_sweep_interval, Duration::from_secs(90));
        assert!(Cli::try_parse_from(["x", "--log-sweep-interval", "soon"]).is_err());
    }
}
