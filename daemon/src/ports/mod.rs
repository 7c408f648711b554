//! Port occupancy: which local ports are taken in the daemon's network
//! namespace, kept live by eBPF events and checked by sock_diag dumps.
//!
//! Shape: sources (the ring buffer, the dumper thread) feed one owner task,
//! [`Tracker`], the only writer of the [`PortTable`]. Readers (HTTP, and later
//! the Kubernetes sink) hold a [`Ports`] handle: read access to the table and
//! a broadcast of ports becoming taken or free.
//!
//! When the map changes:
//! - an event that shows a port held adds it at once;
//! - an event that may free a port (release, a socket leaving LISTEN or
//!   reaching CLOSE) queues that port for a targeted dump a few milliseconds
//!   later, and only that dump removes it (see `map.rs` for the rule);
//! - a port that may have been freed is verified by a dump of only the table
//!   its socket lived in (listeners, bound, or UDP); closing a connection
//!   needs none, since its port lingers in FIN_WAIT or TIME_WAIT anyway;
//! - periodic dumps catch what no hook sees and count what they repair: the
//!   listener and UDP tables every `resync_interval` (UDP autobind; well under
//!   a millisecond however busy the host), and every table every
//!   `connected_resync_interval` (TIME_WAIT expiry, connections; the bind and
//!   established hashes cost about a microsecond per connection to walk);
//! - events lost in a full ring buffer mark the map stale and force a full
//!   dump at once; while stale, nothing is reported free.
pub mod cgroup;
#[cfg(feature = "ebpf")]
pub mod ebpf;
pub mod map;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod sockdiag;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, RwLock, RwLockReadGuard},
    thread,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::{
    sync::{broadcast, mpsc},
    time::{self, Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use self::{
    cgroup::ContainerIds,
    map::{Change, EventEffect, PortKey, PortMap, Scope, Snapshot, Tables},
    metrics::PortMetrics,
    model::Proto,
    netns::monotonic_ns,
    sockdiag::{DumpError, SockDiag, MAX_FILTERED_PORTS},
};

/// Settings of the ports domain (from flags).
#[derive(Clone, Debug)]
pub struct PortsConfig {
    /// Period of dumps of the listener, bound and UDP tables while eBPF
    /// events flow.
    pub resync_interval: Duration,
    /// Period of full dumps (with TCP's established hash) while eBPF events flow.
    pub connected_resync_interval: Duration,
    /// Period of full dumps when eBPF is unavailable: the only source then.
    pub degraded_resync_interval: Duration,
    /// Wait before a targeted dump after a possible release, so the close
    /// that raised the event has finished in the kernel.
    pub verify_delay: Duration,
    /// How often the kernel's lost-event counter is read.
    pub loss_check_interval: Duration,
    pub ring_bytes: u32,
    /// Do not load eBPF even when built with it (an operator's choice).
    pub disable_ebpf: bool,
    /// cgroup v2 mount to attach to; found automatically when None.
    pub cgroup_root: Option<PathBuf>,
}

/// How the map is fed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Mode {
    /// eBPF events plus periodic dumps.
    Ebpf,
    /// Dumps alone, at the degraded period; `reason` says why.
    SnapshotOnly { reason: String },
}

/// What readers need to know about how far to trust the map.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub mode: Mode,
    /// The first full dump has been merged.
    pub ready: bool,
    /// Events were lost and the repairing dump has not finished: the map may
    /// miss ports, so nothing may be reported free.
    pub stale: bool,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub last_full_resync: Option<SystemTime>,
    pub last_error: Option<String>,
}

impl Status {
    /// True when a port absent from the map really is free.
    pub fn certain(&self) -> bool {
        self.ready && !self.stale
    }
}

pub struct PortTable {
    pub map: PortMap,
    pub status: Status,
}

/// A port becoming taken or free, as the watch stream reports it.
#[derive(Clone, Debug, Serialize)]
pub struct PortChange {
    pub change: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub at: SystemTime,
}

/// Read access to the port map, for sinks.
#[derive(Clone)]
pub struct Ports {
    table: Arc<RwLock<PortTable>>,
    changes: broadcast::Sender<PortChange>,
    pub metrics: Arc<PortMetrics>,
    pub containers: Arc<ContainerIds>,
}

impl Ports {
    pub fn read(&self) -> RwLockReadGuard<'_, PortTable> {
        // A panicking writer would have taken the daemon down; the data is
        // still consistent (updates are applied whole), so read through poison.
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PortChange> {
        self.changes.subscribe()
    }

    pub fn render_metrics(&self, out: &mut String) {
        let table = self.read();
        self.metrics.render(&table, out);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    NetnsCookie(#[source] std::io::Error),
    #[error("sock_diag is unavailable, so ports cannot be observed at all: {0}")]
    SockDiag(#[source] DumpError),
    #[error("starting the dumper thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Starts the ports domain: loads eBPF (or explains why not), starts the
/// dumper and the owner task. Returns at once; `/readyz` tells when the first
/// dump is in.
pub fn start(cfg: PortsConfig, shutdown: CancellationToken) -> Result<Ports, StartError> {
    let netns_cookie = netns::own_netns_cookie().map_err(StartError::NetnsCookie)?;
    let cgroup_root = cfg.cgroup_root.clone().or_else(cgroup::find_root);
    let diag = SockDiag::new().map_err(StartError::SockDiag)?;
    let (probes, mode) = load_probes(&cfg, cgroup_root.as_deref(), netns_cookie);
    match &mode {
        Mode::Ebpf => tracing::info!(
            netns_cookie,
            cgroup = %cgroup_root.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            "eBPF programs attached; ports tracked live"
        ),
        Mode::SnapshotOnly { reason } => tracing::warn!(
            reason = %reason,
            period = ?cfg.degraded_resync_interval,
            "running on sock_diag snapshots alone (degraded; never bind-probing)"
        ),
    }
    let table = Arc::new(RwLock::new(PortTable {
        map: PortMap::new(),
        status: Status { mode: mode.clone(), ready: false, stale: false, last_full_resync: None, last_error: None },
    }));
    let (changes, _) = broadcast::channel(4096);
    let ports = Ports {
        table: table.clone(),
        changes: changes.clone(),
        metrics: Arc::new(PortMetrics::default()),
        containers: Arc::new(ContainerIds::new(cgroup_root)),
    };
    let (dump_req_tx, dump_req_rx) = std::sync::mpsc::channel::<(Scope, u64)>();
    let (dump_res_tx, dump_res_rx) = mpsc::channel(4);
    spawn_dumper(diag, dump_req_rx, dump_res_tx).map_err(StartError::Thread)?;
    // Without events, every table is dumped at the degraded period: nothing
    // else would notice new connections.
    let periods = match mode {
        Mode::Ebpf => (cfg.resync_interval, cfg.connected_resync_interval),
        Mode::SnapshotOnly { .. } => (cfg.degraded_resync_interval, cfg.degraded_resync_interval),
    };
    let tracker = Tracker {
        table,
        changes,
        metrics: ports.metrics.clone(),
        netns_cookie,
        pending: BTreeSet::new(),
        pending_tables: Tables::NONE,
        verify_at: None,
        full_pending: true,
        fast_pending: false,
        in_flight: false,
        stale_since: None,
        lost_seen: 0,
        dump_requests: dump_req_tx,
        cfg,
    };
    tokio::spawn(tracker.run(probes, dump_res_rx, periods, shutdown));
    Ok(ports)
}

#[cfg(feature = "ebpf")]
type Probes = ebpf::Probes;
#[cfg(not(feature = "ebpf"))]
enum Probes {}

#[cfg(feature = "ebpf")]
fn load_probes(cfg: &PortsConfig, cgroup_root: Option<&std::path::Path>, netns_cookie: u64) -> (Option<Probes>, Mode) {
    if cfg.disable_ebpf {
        return (None, Mode::SnapshotOnly { reason: "eBPF disabled by --disable-ebpf".into() });
    }
    let Some(root) = cgroup_root else {
        return (None, Mode::SnapshotOnly { reason: "no cgroup v2 mount found to attach to".into() });
    };
    let opts = ebpf::EbpfOptions { cgroup_root: root, netns_cookie, ring_bytes: cfg.ring_bytes };
    match ebpf::Probes::load(&opts) {
        Ok(p) => (Some(p), Mode::Ebpf),
        Err(e) => (None, Mode::SnapshotOnly { reason: format!("eBPF unavailable: {e}") }),
    }
}

#[cfg(not(feature = "ebpf"))]
fn load_probes(_: &PortsConfig, _: Option<&std::path::Path>, _: u64) -> (Option<Probes>, Mode) {
    (None, Mode::SnapshotOnly { reason: "built without eBPF (--no-default-features)".into() })
}

type DumpResult = (Scope, u64, Result<Vec<map::DumpedSocket>, DumpError>, Duration);

/// sock_diag dumps are blocking syscalls: one thread does them all, reusing
/// its netlink socket and buffer. It lives in the daemon's network namespace
/// (threads inherit it), which is what makes the dumps the right ones.
fn spawn_dumper(
    mut diag: SockDiag,
    requests: std::sync::mpsc::Receiver<(Scope, u64)>,
    results: mpsc::Sender<DumpResult>,
) -> std::io::Result<()> {
    thread::Builder::new().name("sock-diag".into()).spawn(move || {
        while let Ok((scope, started_ns)) = requests.recv() {
            let t = std::time::Instant::now();
            let res = diag.dump(&scope);
            if results.blocking_send((scope, started_ns, res, t.elapsed())).is_err() {
                break; // the owner is gone: shutting down
            }
        }
    })?;
    Ok(())
}

/// The owner of the port map.
struct Tracker {
    table: Arc<RwLock<PortTable>>,
    changes: broadcast::Sender<PortChange>,
    metrics: Arc<PortMetrics>,
    netns_cookie: u64,
    /// Ports that may have been freed, awaiting a targeted dump of
    /// `pending_tables`.
    pending: BTreeSet<PortKey>,
    pending_tables: Tables,
    verify_at: Option<Instant>,
    /// A dump of every table is due.
    full_pending: bool,
    /// A dump of the listener, bound and UDP tables is due.
    fast_pending: bool,
    in_flight: bool,
    /// Monotonic ns when lost events were noticed; cleared by a full dump
    /// that started after it.
    stale_since: Option<u64>,
    lost_seen: u64,
    dump_requests: std::sync::mpsc::Sender<(Scope, u64)>,
    cfg: PortsConfig,
}

impl Tracker {
    async fn run(
        mut self,
        mut probes: Option<Probes>,
        mut dumps: mpsc::Receiver<DumpResult>,
        (fast_period, full_period): (Duration, Duration),
        shutdown: CancellationToken,
    ) {
        let ticker = |period: Duration| {
            let mut t = time::interval_at(Instant::now() + period, period);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        };
        let mut fast_tick = ticker(fast_period);
        let mut full_tick = ticker(full_period);
        let mut loss_tick = time::interval(self.cfg.loss_check_interval);
        loss_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        self.kick();
        loop {
            let verify_at = self.verify_at;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                raw = next_events(&mut probes, &mut batch) => {
                    if let Err(e) = raw {
                        tracing::error!(error = %e, "ring buffer unreadable; continuing on dumps alone");
                        self.degrade(&mut probes, format!("ring buffer unreadable: {e}"));
                    }
                    self.apply_events(&batch);
                    batch.clear();
                    self.check_lost(&probes);
                }
                Some(done) = dumps.recv() => {
                    self.in_flight = false;
                    // Losses first: a dump must not remove what a lost event
                    // would have kept.
                    self.check_lost(&probes);
                    self.apply_dump(done, &mut probes);
                }
                _ = fast_tick.tick() => self.fast_pending = true,
                _ = full_tick.tick() => self.full_pending = true,
                _ = loss_tick.tick(), if probes.is_some() => self.check_lost(&probes),
                _ = sleep_until(verify_at), if verify_at.is_some() => {}
            }
            self.kick();
        }
        tracing::debug!("port tracker stopped; eBPF links detach as the probes drop");
    }

    fn apply_events(&mut self, batch: &[map::Event]) {
        if batch.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let mut changes = Vec::new();
        {
            let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
            for ev in batch {
                self.metrics.count_event(ev.kind);
                if ev.netns_cookie != 0 && ev.netns_cookie != self.netns_cookie {
                    // The kernel filters by namespace already; this is the
                    // backstop (and what a misconfigured filter would show).
                    self.metrics.count_foreign();
                    continue;
                }
                if let EventEffect::Verify(key, tables) = table.map.apply_event(ev, now, &mut changes) {
                    self.pending.insert(key);
                    self.pending_tables = self.pending_tables.union(tables);
                }
            }
        }
        if !self.pending.is_empty() && self.verify_at.is_none() {
            self.verify_at = Some(Instant::now() + self.cfg.verify_delay);
        }
        self.publish(changes, now);
    }

    fn apply_dump(&mut self, (scope, started_ns, res, took): DumpResult, probes: &mut Option<Probes>) {
        let full = scope == Scope::FULL;
        let periodic = scope.ports.is_none();
        let snap = match res {
            Ok(sockets) => Snapshot { started_ns, scope, sockets },
            Err(e) => {
                // Fail safe: the map keeps what it has (busy stays busy), and
                // the dump is retried at the next tick.
                tracing::warn!(error = %e, "sock_diag dump failed; keeping the map as it is");
                self.metrics.count_dump_error();
                match scope.ports {
                    Some(keys) => {
                        self.pending.extend(keys);
                        self.pending_tables = self.pending_tables.union(scope.tables);
                        self.verify_at.get_or_insert(Instant::now() + self.cfg.verify_delay);
                    }
                    None if scope.tables == Tables::ALL => self.full_pending = true,
                    None => self.fast_pending = true,
                }
                self.table.write().unwrap_or_else(|p| p.into_inner()).status.last_error = Some(e.to_string());
                return;
            }
        };
        let now = SystemTime::now();
        let mut changes = Vec::new();
        let mut seeds = Vec::new();
        {
            let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
            let stats = table.map.apply_snapshot(&snap, now, &mut changes);
            // The first full dump seeds the map: nothing in it is a repair.
            let repair = periodic && table.status.ready;
            self.metrics.record_dump(&snap.scope, repair, &stats, took);
            if probes.is_some() {
                seeds.extend(stats.added.iter().filter_map(|c| table.map.tracking_record(*c).map(|t| (*c, t))));
            }
            if full {
                table.status.ready = true;
                table.status.last_full_resync = Some(now);
                if self.stale_since.is_some_and(|t| started_ns > t) {
                    self.stale_since = None;
                }
                table.status.stale = self.stale_since.is_some();
                table.status.last_error = None;
            }
        }
        seed_tracked(probes, &seeds);
        self.publish(changes, now);
    }

    /// Reads the kernel's lost-event counter; any increase marks the map
    /// stale and asks for a full dump now.
    fn check_lost(&mut self, probes: &Option<Probes>) {
        let Some(lost) = lost_events(probes) else {
            return;
        };
        if lost > self.lost_seen {
            let newly = lost - self.lost_seen;
            self.lost_seen = lost;
            self.metrics.set_lost(lost);
            tracing::warn!(lost = newly, "eBPF events lost (ring buffer full); resyncing now");
            self.stale_since = Some(monotonic_ns());
            self.full_pending = true;
            self.table.write().unwrap_or_else(|p| p.into_inner()).status.stale = true;
        }
    }

    /// Starts the next dump if one is due and none is running. A wider dump
    /// started now also answers every narrower one that is waiting.
    fn kick(&mut self) {
        if self.in_flight {
            return;
        }
        let verify_due = self.verify_at.is_some_and(|t| t <= Instant::now());
        let scope = if self.full_pending || self.pending.len() > MAX_FILTERED_PORTS {
            self.full_pending = false;
            self.fast_pending = false;
            self.clear_pending();
            Scope::FULL
        } else if self.fast_pending {
            self.fast_pending = false;
            // Verifications of listeners and UDP ports are answered too.
            if Scope::FAST.tables.contains(self.pending_tables) {
                self.clear_pending();
            }
            Scope::FAST
        } else if verify_due && !self.pending.is_empty() {
            self.verify_at = None;
            let tables = std::mem::replace(&mut self.pending_tables, Tables::NONE);
            Scope::ports(std::mem::take(&mut self.pending), tables)
        } else {
            return;
        };
        // The start time is taken before the request is sent: anything the
        // dump may have missed happened after it, and stays protected.
        if self.dump_requests.send((scope, monotonic_ns())).is_ok() {
            self.in_flight = true;
        }
    }

    fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_tables = Tables::NONE;
        self.verify_at = None;
    }

    fn degrade(&mut self, probes: &mut Option<Probes>, reason: String) {
        *probes = None;
        self.table.write().unwrap_or_else(|p| p.into_inner()).status.mode = Mode::SnapshotOnly { reason };
        self.full_pending = true;
    }

    fn publish(&self, changes: Vec<Change>, at: SystemTime) {
        for c in changes {
            let (change, (proto, port)) = match c {
                Change::Taken(k) => ("taken", k),
                Change::Freed(k) => ("freed", k),
            };
            // No receivers is fine: nobody is watching.
            let _ = self.changes.send(PortChange { change, proto, port, at });
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Waits for ring-buffer records and decodes them into `batch`.
#[cfg(feature = "ebpf")]
async fn next_events(probes: &mut Option<Probes>, batch: &mut Vec<map::Event>) -> std::io::Result<()> {
    let Some(p) = probes.as_mut() else {
        return std::future::pending().await;
    };
    let mut guard = p.events.readable_mut().await?;
    let ring = guard.get_inner_mut();
    while let Some(item) = ring.next() {
        if let Some(ev) = ebpf::decode(&item) {
            batch.push(ev);
        }
    }
    guard.clear_ready();
    Ok(())
}

#[cfg(not(feature = "ebpf"))]
async fn next_events(_: &mut Option<Probes>, _: &mut Vec<map::Event>) -> std::io::Result<()> {
    std::future::pending().await
}

#[cfg(feature = "ebpf")]
fn lost_events(probes: &Option<Probes>) -> Option<u64> {
    probes.as_ref().map(|p| p.lost_events())
}

#[cfg(not(feature = "ebpf"))]
fn lost_events(_: &Option<Probes>) -> Option<u64> {
    None
}

#[cfg(feature = "ebpf")]
fn seed_tracked(probes: &mut Option<Probes>, seeds: &[(u64, polarstack_ebpf_common::TrackedSocket)]) {
    if let Some(p) = probes.as_mut() {
        for (cookie, t) in seeds {
            p.track(*cookie, *t);
        }
    }
}

#[cfg(not(feature = "ebpf"))]
fn seed_tracked(_: &mut Option<Probes>, _: &[(u64, polarstack_ebpf_common::TrackedSocket)]) {}
