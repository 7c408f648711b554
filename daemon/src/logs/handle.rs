//! The sweeper's handle: schedule, on-demand sweeps, last report, metrics.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::DescriptorEncoder;

use super::config::{LogSweepArgs, LogSweepConfigError, SweepConfig};
use super::report::{unix_seconds, Rule, SweepReport};
use super::sweep::{self, Cancel};
use super::{LiveInstances, SweepError};
use crate::telemetry::{counter, counter_by, gauge};

/// Delay of the first scheduled sweep: soon enough to show a report shortly
/// after a rollout, late enough not to compete with start-up.
const FIRST_SWEEP_DELAY: Duration = Duration::from_secs(30);

/// Cheap to clone; every clone drives the same sweeper.
#[derive(Clone)]
pub struct SweepHandle {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SweepConfig,
    owners: Arc<dyn LiveInstances>,
    /// One sweep at a time: concurrent requests queue here.
    running: tokio::sync::Mutex<()>,
    last: Mutex<Option<Arc<SweepReport>>>,
    cancel: Arc<Cancel>,
    metrics: Metrics,
}

/// Plain atomics, encoded by [`SweepHandle::encode_metrics`].
#[derive(Default)]
struct Metrics {
    removed_entries: [AtomicU64; 3],
    removed_bytes: [AtomicU64; 3],
    errors: AtomicU64,
    /// f64 bits of the last sweep's duration in seconds.
    duration_bits: AtomicU64,
    /// f64 bits of the Unix time of the last sweep that ran to completion
    /// (0 = never).
    last_success_bits: AtomicU64,
}

impl std::fmt::Debug for SweepHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SweepHandle").field("cfg", &self.inner.cfg).finish_non_exhaustive()
    }
}

impl SweepHandle {
    /// A sweeper without a schedule (sweeps only on demand). [`spawn`] adds
    /// the schedule.
    pub fn new(args: LogSweepArgs, owners: Arc<dyn LiveInstances>) -> Result<Self, LogSweepConfigError> {
        let cfg = args.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                owners,
                running: tokio::sync::Mutex::new(()),
                last: Mutex::new(None),
                cancel: Arc::new(Cancel::default()),
                metrics: Metrics::default(),
            }),
        })
    }

    /// True when `--log-sweep-dry-run` turns every sweep into a dry run.
    pub fn global_dry_run(&self) -> bool {
        self.inner.cfg.global_dry_run
    }

    /// Runs one sweep (waiting for a running one to finish first). A real
    /// sweep becomes a dry run under the global dry-run flag. `Err` means the
    /// sweep could not start (root missing or unreadable, shutting down):
    /// nothing was deleted, and the failure is also the last report.
    pub async fn sweep(&self, dry_run: bool) -> Result<SweepReport, SweepError> {
        if self.inner.cancel.is_cancelled() {
            return Err(SweepError::ShuttingDown);
        }
        let _one_at_a_time = self.inner.running.lock().await;
        let effective = dry_run || self.inner.cfg.global_dry_run;
        let forced = !dry_run && self.inner.cfg.global_dry_run;
        let (report, err) = sweep::run(
            &self.inner.cfg,
            Arc::clone(&self.inner.owners),
            effective,
            forced,
            Arc::clone(&self.inner.cancel),
        )
        .await;
        self.record(&report, err.is_none());
        tracing::info!(
            dry_run = report.dry_run,
            removed = report.removed.len(),
            removed_bytes = report.removed_bytes,
            kept = report.kept.len(),
            errors = report.errors.len(),
            duration_seconds = report.duration_seconds,
            aborted = report.aborted.as_deref(),
            "log sweep finished"
        );
        if let Ok(mut last) = self.inner.last.lock() {
            *last = Some(Arc::new(report.clone()));
        }
        match err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    fn record(&self, report: &SweepReport, completed: bool) {
        let m = &self.inner.metrics;
        if !report.dry_run {
            for r in &report.removed {
                m.removed_entries[r.rule.index()].fetch_add(r.entries, Ordering::Relaxed);
                m.removed_bytes[r.rule.index()].fetch_add(r.bytes, Ordering::Relaxed);
            }
        }
        let errors = report.errors.len() as u64 + u64::from(!completed);
        m.errors.fetch_add(errors, Ordering::Relaxed);
        m.duration_bits.store(report.duration_seconds.to_bits(), Ordering::Relaxed);
        if completed {
            let now = unix_seconds(SystemTime::now());
            m.last_success_bits.store(now.to_bits(), Ordering::Relaxed);
        }
    }

    /// The report of the last sweep, failed ones included.
    pub fn last_report(&self) -> Option<Arc<SweepReport>> {
        self.inner.last.lock().ok().and_then(|l| l.clone())
    }

    /// Encodes the sweeper's metrics from its atomics, at scrape time.
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let m = &self.inner.metrics;
        fn by_rule(counts: &[AtomicU64; 3]) -> impl Iterator<Item = ([(&str, &str); 1], u64)> + '_ {
            Rule::ALL.into_iter().map(|rule| ([("rule", rule.as_str())], counts[rule.index()].load(Ordering::Relaxed)))
        }
        counter_by(
            e,
            "polarstack_logs_removed_files_total",
            "Entries (files, folders, symlinks) removed by real log sweeps, by rule.",
            by_rule(&m.removed_entries),
        )?;
        counter_by(
            e,
            "polarstack_logs_removed_bytes_total",
            "Bytes (apparent size of regular files) removed by real log sweeps, by rule.",
            by_rule(&m.removed_bytes),
        )?;
        counter(
            e,
            "polarstack_logs_sweep_errors_total",
            "Errors met by log sweeps (each one deleted nothing).",
            m.errors.load(Ordering::Relaxed),
        )?;
        gauge(
            e,
            "polarstack_logs_sweep_duration_seconds",
            "Duration of the last log sweep.",
            f64::from_bits(m.duration_bits.load(Ordering::Relaxed)),
        )?;
        gauge(
            e,
            "polarstack_logs_last_success_timestamp_seconds",
            "Unix time of the last log sweep that ran to completion (0 = never).",
            f64::from_bits(m.last_success_bits.load(Ordering::Relaxed)),
        )
    }
}

/// Starts the sweeper with its schedule: a first sweep shortly after start
/// (30 s, or one interval if shorter), then one every `--log-sweep-interval`.
/// `shutdown` being cancelled stops the schedule and makes a running sweep
/// (scheduled or on demand) stop within milliseconds: between two entries of
/// a removal, or while it waits on the API server. Later on-demand sweeps
/// answer [`SweepError::ShuttingDown`]. Must be called inside a tokio runtime.
pub fn spawn(
    args: LogSweepArgs,
    owners: Arc<dyn LiveInstances>,
    tasks: &crate::tasks::Tasks,
) -> Result<SweepHandle, LogSweepConfigError> {
    let handle = SweepHandle::new(args, owners)?;
    let interval = handle.inner.cfg.interval;
    let shutdown = tasks.shutdown();
    let scheduled = handle.clone();
    // Restartable: a sweep that panics loses that sweep, not the schedule.
    tasks.restartable("logs", move || {
        let (scheduled, shutdown) = (scheduled.clone(), shutdown.clone());
        let cancel = Arc::clone(&scheduled.inner.cancel);
        async move {
            let mut next = tokio::time::Instant::now() + FIRST_SWEEP_DELAY.min(interval);
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = shutdown.cancelled() => {
                        cancel.cancel();
                        break;
                    }
                }
                // The sweep runs inside the select so shutdown can cancel it;
                // the cancel flag makes its blocking workers stop at the next entry.
                let sweep = scheduled.sweep(false);
                tokio::pin!(sweep);
                tokio::select! {
                    res = &mut sweep => {
                        if let Err(e) = res {
                            tracing::warn!(error = %e, "scheduled log sweep did not run");
                        }
                    }
                    () = shutdown.cancelled() => {
                        cancel.cancel();
                        let _ = sweep.await;
                        break;
                    }
                }
                next = tokio::time::Instant::now() + interval;
            }
            tracing::info!("log sweeper stopped");
        }
    });
    Ok(handle)
}
