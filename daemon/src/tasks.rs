//! The daemon's long-running tasks and their health.
//!
//! Every subsystem runs as one supervised task, started here by name:
//! - a *core* task holds state nothing can rebuild (the port map's owner,
//!   the HTTP server). If it ends before shutdown, by a panic or otherwise,
//!   the daemon is broken: `/healthz` fails so the kubelet restarts the pod,
//!   and the heartbeats stop telling the operator all is well.
//! - a *restartable* task is rebuilt from its inputs by a factory (a watch,
//!   a publisher, the NIC watcher): when it panics or ends early it is
//!   started again after a capped, jittered backoff, and counted.
//!
//! `/readyz` and `/metrics` show each task: its role, whether it runs, how
//! often it was restarted and why it last ended.
//!
//! A test hook (`--fail-task NAME`, hidden) makes the named task panic once,
//! a second after it starts, so the tests can watch the supervision work on
//! the real binary.
use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use prometheus_client::encoding::DescriptorEncoder;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    retry::Backoff,
    telemetry::{counter_by, gauge_by},
};

/// How a task is treated when it ends before shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Core,
    Restartable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Running,
    /// Ended; waiting for its backoff before it starts again.
    Restarting,
    /// A core task that ended: only a new process brings it back.
    Dead,
}

/// What `/readyz` shows of one task.
#[derive(Clone, Debug, Serialize)]
pub struct TaskHealth {
    pub role: Role,
    pub state: TaskState,
    pub restarts: u64,
    /// Why it last ended (a panic's message, or that it returned).
    pub last_failure: Option<String>,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub last_failure_at: Option<SystemTime>,
}

/// Cheap to clone; every clone is the same supervisor.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    shutdown: CancellationToken,
    table: Mutex<BTreeMap<&'static str, TaskHealth>>,
    /// The test hook: the task to fail once.
    fail: Mutex<Option<String>>,
}

impl fmt::Debug for Tasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.table().iter()).finish()
    }
}

/// How long the test hook lets a task run before failing it.
const FAIL_AFTER: Duration = Duration::from_secs(1);

impl Tasks {
    /// `fail_task` is the test hook (`--fail-task`).
    pub fn new(shutdown: CancellationToken, fail_task: Option<String>) -> Self {
        Self { inner: Arc::new(Inner { shutdown, table: Mutex::new(BTreeMap::new()), fail: Mutex::new(fail_task) }) }
    }

    /// Cancelled at shutdown; every task watches it.
    pub fn shutdown(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Starts a core task: it runs once; if it ends before shutdown the
    /// daemon is unhealthy (see [`Tasks::healthy`]).
    pub fn core<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.register(name, Role::Core);
        let me = self.clone();
        tokio::spawn(async move {
            let ended = tokio::spawn(me.with_hook(name, task)).await;
            if me.inner.shutdown.is_cancelled() {
                return;
            }
            let why = ended_because(ended);
            tracing::error!(task = name, reason = %why, "a core task ended: the daemon is unhealthy and must be restarted");
            me.update(name, |h| {
                h.state = TaskState::Dead;
                h.last_failure = Some(why);
                h.last_failure_at = Some(SystemTime::now());
            });
        });
    }

    /// Starts a restartable task: `make` builds it from its inputs, again
    /// after each end before shutdown, with a backoff of 0.5 s to 30 s (reset
    /// once a run lasted a minute).
    pub fn restartable<M, F>(&self, name: &'static str, mut make: M)
    where
        M: FnMut() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        self.register(name, Role::Restartable);
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new();
            loop {
                let started = tokio::time::Instant::now();
                let ended = tokio::spawn(me.with_hook(name, make())).await;
                if me.inner.shutdown.is_cancelled() {
                    return;
                }
                if started.elapsed() >= Duration::from_secs(60) {
                    backoff.reset();
                }
                let why = ended_because(ended);
                let wait = backoff.next_wait();
                tracing::error!(task = name, reason = %why, restart_in = ?wait, "a task ended; restarting it");
                me.update(name, |h| {
                    h.state = TaskState::Restarting;
                    h.restarts += 1;
                    h.last_failure = Some(why);
                    h.last_failure_at = Some(SystemTime::now());
                });
                tokio::select! {
                    () = me.inner.shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                me.update(name, |h| h.state = TaskState::Running);
            }
        });
    }

    /// False once a core task has ended before shutdown.
    pub fn healthy(&self) -> bool {
        self.dead().is_empty()
    }

    /// The core tasks that ended before shutdown.
    pub fn dead(&self) -> Vec<&'static str> {
        self.table().iter().filter(|(_, h)| h.state == TaskState::Dead).map(|(name, _)| *name).collect()
    }

    /// Every task by name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, TaskHealth> {
        self.table().clone()
    }

    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let table = self.snapshot();
        gauge_by(
            e,
            "polarstack_task_up",
            "1 while the task runs, 0 while it waits to restart or (a core task) is dead.",
            table.iter().map(|(name, h)| ([("task", *name)], i64::from(h.state == TaskState::Running))),
        )?;
        counter_by(
            e,
            "polarstack_task_restarts_total",
            "Restarts of a restartable task after it panicked or ended early.",
            table.iter().map(|(name, h)| ([("task", *name)], h.restarts)),
        )
    }

    fn register(&self, name: &'static str, role: Role) {
        let fresh =
            TaskHealth { role, state: TaskState::Running, restarts: 0, last_failure: None, last_failure_at: None };
        let previous = self.table().insert(name, fresh);
        debug_assert!(previous.is_none(), "task {name} started twice");
    }

    fn update(&self, name: &'static str, f: impl FnOnce(&mut TaskHealth)) {
        if let Some(h) = self.table().get_mut(name) {
            f(h);
        }
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<&'static str, TaskHealth>> {
        // A panic while the table is held leaves it consistent (each update
        // is a plain assignment), so a poisoned lock is still good.
        self.inner.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The task, or (under the test hook, once) the task failing after a second.
    fn with_hook<F>(&self, name: &'static str, task: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let fail = {
            let mut hook = self.inner.fail.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            hook.as_deref() == Some(name) && hook.take().is_some()
        };
        async move {
            if !fail {
                return task.await;
            }
            tokio::select! {
                () = task => {}
                () = tokio::time::sleep(FAIL_AFTER) => panic!("--fail-task {name}: failing the task as asked"),
            }
        }
    }
}

/// Why a task's run ended: its panic message, or that it returned.
fn ended_because(ended: Result<(), tokio::task::JoinError>) -> String {
    match ended {
        Ok(()) => "returned before shutdown".to_owned(),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            format!("panicked: {msg}")
        }
        Err(_) => "cancelled".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_restartable_task_that_panics_is_rebuilt_and_counted() {
        let tasks = Tasks::new(CancellationToken::new(), None);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        tasks.restartable("flaky", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(n >= 2, "run {n} fails");
                std::future::pending::<()>().await;
            }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "two failures, then a run that lasts");
        let h = &tasks.snapshot()["flaky"];
        assert_eq!((h.state, h.restarts), (TaskState::Running, 2));
        assert!(h.last_failure.as_deref().is_some_and(|f| f.contains("run 1 fails")), "{h:?}");
        assert!(tasks.healthy(), "a restartable task never makes the daemon unhealthy");
    }

    #[tokio::test(start_paused = true)]
    async fn a_core_task_that_ends_makes_the_daemon_unhealthy() {
        let tasks = Tasks::new(CancellationToken::new(), None);
        tasks.core("owner", async {});
        tasks.core("server", std::future::pending());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!tasks.healthy());
        let table = tasks.snapshot();
        assert_eq!(table["owner"].state, TaskState::Dead);
        assert_eq!(table["server"].state, TaskState::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn ending_at_shutdown_is_not_a_failure() {
        let shutdown = CancellationToken::new();
        let tasks = Tasks::new(shutdown.clone(), None);
        let s = shutdown.clone();
        tasks.core("owner", async move { s.cancelled().await });
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(tasks.healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn the_test_hook_fails_the_named_task_once() {
        let tasks = Tasks::new(CancellationToken::new(), Some("watched".into()));
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        tasks.restartable("watched", move || {
            r.fetch_add(1, Ordering::SeqCst);
            std::future::pending()
        });
        tasks.restartable("other", std::future::pending);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let table = tasks.snapshot();
        assert_eq!((runs.load(Ordering::SeqCst), table["watched"].restarts), (2, 1));
        assert_eq!(table["other"].restarts, 0);
    }
}
