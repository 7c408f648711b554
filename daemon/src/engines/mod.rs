//! Engine-version availability: which engine versions have every image on
//! this node, in any of its container runtimes.
//!
//! One owner task holds the image lists of the runtimes and the versions to
//! check, and publishes [`EngineState`]. It rescans a runtime when Docker
//! reports an image event (pull, tag, untag, delete, load, import), every
//! `cri_poll` for CRI (which has no image events), and on request. Requests
//! coalesce: every request queued when a scan starts is answered by that
//! scan, so fifty concurrent requests cost one or two scans, and no state is
//! shared without its owner (the original crashed on an unlocked map).
//!
//! A runtime that is down or slow makes the versions it could decide
//! `unknown` with a reason, never silently absent; it recovers by itself.
pub mod image_ref;
pub mod runtime;
pub mod versions;

use std::{
    collections::BTreeSet,
    fmt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::StreamExt as _;
use prometheus_client::encoding::DescriptorEncoder;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::{
    image_ref::ImageKey,
    runtime::{CriRuntime, DockerEndpoint, DockerRuntime, ImageRuntime, RuntimeError},
    versions::EngineVersion,
};
use crate::{
    tasks::Tasks,
    telemetry::{counter, gauge_by},
};

/// How long a scan request waits for others to join it.
const GATHER: Duration = Duration::from_millis(50);
/// Least time between two requested scans: a caller that loops on a rescan
/// endpoint gets its answers, at most one scan per interval.
const REQUESTED_SCAN_GAP: Duration = Duration::from_secs(1);

/// Settings of the engines domain (from flags).
#[derive(Debug, Clone)]
pub struct EnginesConfig {
    /// The Docker Engine API: `--docker-socket`, else DOCKER_HOST, else
    /// /var/run/docker.sock.
    pub docker: DockerEndpoint,
    pub cri_sockets: Vec<PathBuf>,
    pub cri_poll: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Available,
    Missing,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageView {
    pub key: String,
    pub reference: String,
    /// None when no runtime that could hold it answered.
    pub present: Option<bool>,
    /// The runtimes (by socket) that hold it.
    pub runtimes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionView {
    pub name: String,
    pub source: String,
    pub status: Availability,
    pub reason: Option<String>,
    pub images: Vec<ImageView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeView {
    pub kind: &'static str,
    pub socket: String,
    /// Whether its last listing worked.
    pub up: bool,
    pub images: usize,
    pub error: Option<String>,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub last_list: Option<SystemTime>,
}

/// What `/api/v2/engines` shows and the Kubernetes sink publishes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineState {
    pub versions: Vec<VersionView>,
    pub runtimes: Vec<RuntimeView>,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub last_check: Option<SystemTime>,
    /// Scans done so far.
    pub scans: u64,
    /// Scans done because someone asked (HTTP or a cluster-wide request).
    pub requested_scans: u64,
}

impl EngineState {
    pub fn available(&self) -> impl Iterator<Item = &str> {
        self.versions.iter().filter(|v| v.status == Availability::Available).map(|v| v.name.as_str())
    }

    /// Encodes this state's metrics, at scrape time.
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let up = self.runtimes.iter().map(|r| ([("runtime", r.kind), ("socket", r.socket.as_str())], u64::from(r.up)));
        gauge_by(e, "polarstack_engines_runtime_up", "1 when the container runtime's last image listing worked.", up)?;
        let count = |s| self.versions.iter().filter(|v| v.status == s).count() as u64;
        gauge_by(
            e,
            "polarstack_engines_versions",
            "Engine versions by availability on this node.",
            [
                ([("status", "available")], count(Availability::Available)),
                ([("status", "missing")], count(Availability::Missing)),
                ([("status", "unknown")], count(Availability::Unknown)),
            ],
        )?;
        counter(e, "polarstack_engines_scans_total", "Image scans of the container runtimes.", self.scans)
    }
}

/// Why a requested scan could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScanError {
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

struct ScanRequest {
    done: oneshot::Sender<()>,
}

/// Cheap to clone: read the state, ask for scans, feed the versions.
#[derive(Clone)]
pub struct Engines {
    pub state: watch::Receiver<EngineState>,
    requests: mpsc::UnboundedSender<ScanRequest>,
}

impl Engines {
    /// Asks for a rescan without waiting for it (requests coalesce).
    pub fn ask_rescan(&self) {
        let (done, _) = oneshot::channel();
        let _ = self.requests.send(ScanRequest { done });
    }

    /// Rescans every runtime and returns when a scan that started after this
    /// call has finished.
    pub async fn rescan(&self) -> Result<(), ScanError> {
        let (done, wait) = oneshot::channel();
        self.requests.send(ScanRequest { done }).map_err(|_| ScanError::ShuttingDown)?;
        wait.await.map_err(|_| ScanError::ShuttingDown)
    }
}

/// A runtime and what it last said.
struct Runtime {
    rt: Box<dyn ImageRuntime>,
    images: Result<BTreeSet<ImageKey>, RuntimeError>,
    last_list: Option<SystemTime>,
    /// It has answered once since start.
    ever_up: bool,
}

impl Runtime {
    /// Not listed yet: absent, as a runtime whose socket is missing.
    fn unlisted(rt: Box<dyn ImageRuntime>) -> Self {
        let images = Err(RuntimeError::NoSocket(rt.socket().clone()));
        Self { rt, images, last_list: None, ever_up: false }
    }
}

/// Starts the owner task. `versions` is fed by the cluster side (empty when
/// standalone). The task is restartable: a new owner lists every runtime
/// again, continuing the published counters.
pub fn spawn(cfg: EnginesConfig, versions: watch::Receiver<Vec<EngineVersion>>, tasks: &Tasks) -> Engines {
    let (tx, state) = watch::channel(EngineState::default());
    let (requests, rx) = mpsc::unbounded_channel();
    // Requests outlive an owner that ends: the next one answers them.
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let shutdown = tasks.shutdown();
    tasks.restartable("engines", move || {
        let owner = Owner::new(&cfg, versions.clone(), tx.clone());
        owner.run(rx.clone(), cfg.clone(), shutdown.clone())
    });
    Engines { state, requests }
}

struct Owner {
    runtimes: Vec<Runtime>,
    versions: watch::Receiver<Vec<EngineVersion>>,
    state: watch::Sender<EngineState>,
    scans: u64,
    requested: u64,
    last_check: Option<SystemTime>,
}

impl Owner {
    fn new(
        cfg: &EnginesConfig,
        versions: watch::Receiver<Vec<EngineVersion>>,
        state: watch::Sender<EngineState>,
    ) -> Self {
        let mut runtimes = vec![Runtime::unlisted(Box::new(DockerRuntime::new(cfg.docker.clone())))];
        runtimes.extend(cfg.cri_sockets.iter().map(|s| Runtime::unlisted(Box::new(CriRuntime::new(s.clone())))));
        let (scans, requested, last_check) = {
            let st = state.borrow();
            (st.scans, st.requested_scans, st.last_check)
        };
        Self { runtimes, versions, state, scans, requested, last_check }
    }

    async fn run(
        mut self,
        requests: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ScanRequest>>>,
        cfg: EnginesConfig,
        shutdown: CancellationToken,
    ) {
        let mut requests = requests.lock().await;
        let (docker_events_tx, mut docker_events) = mpsc::channel::<()>(1);
        let events_task = docker_events_task(cfg.docker.clone(), docker_events_tx, shutdown.clone());
        tokio::pin!(events_task);
        let mut poll = tokio::time::interval(cfg.cri_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Standalone, no versions ever come: the sender is gone from the start.
        let mut versions_open = true;
        let mut last_requested: Option<tokio::time::Instant> = None;
        loop {
            let mut answered = Vec::new();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut events_task => return, // ends only at shutdown
                _ = poll.tick() => {}
                Some(()) = docker_events.recv() => {}
                r = self.versions.changed(), if versions_open => {
                    if r.is_err() {
                        versions_open = false;
                    }
                    self.publish(false); // same image lists, new versions
                    continue;
                }
                req = requests.recv() => match req {
                    Some(r) => answered.push(r),
                    None => return,
                },
            }
            if !answered.is_empty() {
                // Requests come in bursts (a cluster-wide rescan, an operator
                // retrying): gather the burst so it costs one scan, and keep
                // requested scans an interval apart.
                let gap = last_requested.map_or(Duration::ZERO, |t| REQUESTED_SCAN_GAP.saturating_sub(t.elapsed()));
                tokio::time::sleep(GATHER.max(gap)).await;
                last_requested = Some(tokio::time::Instant::now());
            }
            // Every request queued now is answered by this one scan.
            while let Ok(r) = requests.try_recv() {
                answered.push(r);
            }
            // Docker's events wait in their stream meanwhile.
            self.scan().await;
            self.publish(!answered.is_empty());
            for r in answered {
                let _ = r.done.send(());
            }
        }
    }

    async fn scan(&mut self) {
        let lists = futures_util::future::join_all(self.runtimes.iter().map(|r| r.rt.list())).await;
        let now = SystemTime::now();
        for (r, mut res) in self.runtimes.iter_mut().zip(lists) {
            // dockerd and containerd remove their socket when they stop: a
            // socket that was there and is gone is a stopped runtime, not an
            // absent one, and its images are unknown rather than missing.
            if let Err(RuntimeError::NoSocket(p)) = &res {
                if r.ever_up {
                    res = Err(RuntimeError::Call(format!("socket {} is gone: the runtime stopped", p.display())));
                }
            }
            r.ever_up |= res.is_ok();
            if let (Ok(_), Err(e)) = (&r.images, &res) {
                tracing::warn!(runtime = r.rt.kind(), socket = %r.rt.socket().display(), error = %e, "container runtime unavailable: its images are unknown");
            }
            if let (Err(_), Ok(_)) = (&r.images, &res) {
                tracing::info!(runtime = r.rt.kind(), socket = %r.rt.socket().display(), "container runtime available");
            }
            r.images = res;
            r.last_list = Some(now);
        }
        self.scans += 1;
        self.last_check = Some(now);
    }

    fn publish(&mut self, requested: bool) {
        if requested {
            self.requested += 1;
        }
        let versions = self.versions.borrow().clone();
        let views = versions.iter().map(|v| evaluate(v, &self.runtimes)).collect();
        let runtimes = self
            .runtimes
            .iter()
            .map(|r| RuntimeView {
                kind: r.rt.kind(),
                socket: r.rt.socket().display().to_string(),
                up: r.images.is_ok(),
                images: r.images.as_ref().map_or(0, BTreeSet::len),
                error: r.images.as_ref().err().map(ToString::to_string),
                last_list: r.last_list,
            })
            .collect();
        let next = EngineState {
            versions: views,
            runtimes,
            last_check: self.last_check,
            scans: self.scans,
            requested_scans: self.requested,
        };
        self.state.send_replace(next);
    }
}

/// Which runtimes hold the image, and whether the answer is certain.
fn evaluate(v: &EngineVersion, runtimes: &[Runtime]) -> VersionView {
    // A runtime whose socket is absent is not installed: it cannot hold
    // images, so it makes nothing unknown. One that exists but fails does.
    let down: Vec<String> = runtimes
        .iter()
        .filter_map(|r| match &r.images {
            Err(RuntimeError::NoSocket(_)) | Ok(_) => None,
            Err(e) => Some(format!("{} {}: {e}", r.rt.kind(), r.rt.socket().display())),
        })
        .collect();
    let none_up = runtimes.iter().all(|r| r.images.is_err());
    let images: Vec<ImageView> = v
        .images
        .iter()
        .map(|img| {
            let holders: Vec<String> = runtimes
                .iter()
                .filter(|r| r.images.as_ref().is_ok_and(|set| set.contains(&img.canonical)))
                .map(|r| format!("{} {}", r.rt.kind(), r.rt.socket().display()))
                .collect();
            let present = if !holders.is_empty() {
                Some(true)
            } else if down.is_empty() && !none_up {
                Some(false)
            } else {
                None
            };
            ImageView { key: img.key.clone(), reference: img.reference.clone(), present, runtimes: holders }
        })
        .collect();
    let (status, reason) = if images.iter().all(|i| i.present == Some(true)) {
        (Availability::Available, None)
    } else if images.iter().any(|i| i.present == Some(false)) {
        let missing: Vec<&str> =
            images.iter().filter(|i| i.present == Some(false)).map(|i| i.reference.as_str()).collect();
        (Availability::Missing, Some(format!("not on this node: {}", missing.join(", "))))
    } else if none_up && down.is_empty() {
        (Availability::Unknown, Some("no container runtime found on this node".to_owned()))
    } else {
        (Availability::Unknown, Some(format!("runtime unavailable: {}", down.join("; "))))
    };
    VersionView { name: v.name.clone(), source: v.source.clone(), status, reason, images }
}

/// Docker's image events (pull, tag, untag, delete, load, import) trigger a
/// rescan; the stream is re-opened with backoff while dockerd is away.
async fn docker_events_task(endpoint: DockerEndpoint, tx: mpsc::Sender<()>, shutdown: CancellationToken) {
    let rt = DockerRuntime::new(endpoint);
    let mut backoff = crate::retry::Backoff::with(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        if let Ok(docker) = rt.client().await {
            let filters = std::collections::HashMap::from([("type".to_owned(), vec!["image".to_owned()])]);
            let opts = bollard::query_parameters::EventsOptions { filters: Some(filters), ..Default::default() };
            let mut events = docker.events(Some(opts));
            backoff.reset();
            // A (re)connected stream may have missed events: rescan once.
            let _ = tx.try_send(());
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    ev = events.next() => match ev {
                        Some(Ok(_)) => { let _ = tx.try_send(()); }
                        Some(Err(_)) | None => break,
                    },
                }
            }
            // The stream ended: dockerd went away. Rescan so it shows.
            let _ = tx.try_send(());
        }
        let wait = backoff.next_wait();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::versions::VersionImage;

    struct Fixed(&'static str, PathBuf);
    impl ImageRuntime for Fixed {
        fn kind(&self) -> &'static str {
            self.0
        }
        fn socket(&self) -> &PathBuf {
            &self.1
        }
        fn list(&self) -> runtime::ListFuture<'_> {
            Box::pin(async { Ok(BTreeSet::new()) })
        }
    }

    fn rt(kind: &'static str, images: Result<&[&str], RuntimeError>) -> Runtime {
        Runtime {
            rt: Box::new(Fixed(kind, PathBuf::from(format!("/{kind}.sock")))),
            images: images.map(|l| l.iter().map(|i| image_ref::normalize(i).expect("ref")).collect()),
            last_list: None,
            ever_up: true,
        }
    }

    fn version(images: &[&str]) -> EngineVersion {
        EngineVersion {
            name: "v".into(),
            source: "s".into(),
            images: images
                .iter()
                .map(|i| VersionImage {
                    key: "pgEngineImage".into(),
                    reference: i.to_string(),
                    canonical: image_ref::normalize(i).expect("ref"),
                })
                .collect(),
        }
    }

    #[test]
    fn available_across_runtimes_missing_and_unknown() {
        let v = version(&["polardb/a:1", "polardb/b:1"]);
        let both = [rt("docker", Ok(&["polardb/a:1"])), rt("cri", Ok(&["docker.io/polardb/b:1"]))];
        assert_eq!(evaluate(&v, &both).status, Availability::Available);
        let one = [rt("docker", Ok(&["polardb/a:1"])), rt("cri", Ok(&[]))];
        assert_eq!(evaluate(&v, &one).status, Availability::Missing);
        let down = [rt("docker", Ok(&["polardb/a:1"])), rt("cri", Err(RuntimeError::Timeout))];
        let e = evaluate(&v, &down);
        assert_eq!(e.status, Availability::Unknown, "never silently absent");
        assert!(e.reason.as_deref().is_some_and(|r| r.contains("runtime unavailable")), "{e:?}");
        let absent = [rt("docker", Ok(&["polardb/a:1"])), rt("cri", Err(RuntimeError::NoSocket("/x".into())))];
        assert_eq!(evaluate(&v, &absent).status, Availability::Missing, "an absent runtime holds nothing");
        let nothing = [rt("docker", Err(RuntimeError::NoSocket("/x".into())))];
        assert_eq!(evaluate(&v, &nothing).status, Availability::Unknown);
    }
}
