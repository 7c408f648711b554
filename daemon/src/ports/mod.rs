//! Port occupancy: which local ports are taken in the daemon's network
//! namespace, kept live by eBPF events and checked by sock_diag dumps.
//!
//! Shape: sources (the ring buffer, the dumper thread) feed one owner task,
//! the tracker (`tracker.rs`), the only writer of the [`PortTable`]. Readers
//! (HTTP, the Kubernetes sink) hold a [`Ports`] handle: read access to the
//! table and a broadcast of ports becoming taken or free.
//!
//! When the map changes:
//! - an event that shows a port held adds it at once;
//! - an event that may free a port (release, a listener stopping) queues that
//!   port for a targeted dump a few milliseconds later, and only that dump
//!   removes it (see `map.rs` for the rule);
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
//!
//! Kernels differ (`kernel.rs`): each hook is loaded on its own, and what the
//! running kernel hides is stated as a blind spot, never answered as certain.
pub mod cgroup;
mod clock;
#[cfg(feature = "ebpf")]
pub mod ebpf;
mod events;
pub mod kernel;
pub mod map;
pub mod metrics;
pub mod model;
pub mod sockdiag;
mod tracker;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use self::{
    cgroup::ContainerIds,
    events::{KernelCounters, Probes},
    kernel::{BlindSpot, HookStatus, Kernel},
    map::{Change, PortMap, Scope, Tables},
    metrics::PortMetrics,
    model::Proto,
    sockdiag::{DumpError, SockDiag},
    tracker::Tracker,
};

/// Settings of the ports domain (from flags).
#[derive(Clone, Debug)]
pub struct PortsConfig {
    /// Period of dumps of the listener and UDP tables while eBPF events flow.
    pub resync_interval: Duration,
    /// Period of full dumps (with TCP's established hash) while eBPF events flow.
    pub connected_resync_interval: Duration,
    /// Period of full dumps when eBPF is unavailable, or when hooks that see
    /// binds, listens or connects are missing: the only source then.
    pub degraded_resync_interval: Duration,
    /// Wait before a targeted dump after a possible release, so the close
    /// that raised the event has finished in the kernel.
    pub verify_delay: Duration,
    /// How often the kernel's lost-event counter is read.
    pub loss_check_interval: Duration,
    pub ring_bytes: u32,
    /// Capacity of the kernel's table of bound and listening sockets.
    pub tracked_max: u32,
    /// Do not load eBPF even when built with it (an operator's choice).
    pub disable_ebpf: bool,
    /// cgroup v2 mount to attach to; found automatically when None.
    pub cgroup_root: Option<PathBuf>,
}

/// How the map is fed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Mode {
    /// eBPF events plus periodic dumps; `kernel.hooks` says which hooks run.
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
    /// The hooks and dumps this kernel allows.
    pub kernel: Kernel,
    /// Sockets that can hold a port without the map knowing, on this kernel.
    pub blind_spots: Vec<BlindSpot>,
    /// Ports held by bound sockets whose release cannot be observed (the
    /// kernel's tracking table was full, and dumps cannot list them): they
    /// read taken, but may have been freed.
    pub unverifiable: BTreeSet<(Proto, u16)>,
}

impl Status {
    /// True when a port absent from the map is free, as far as transient
    /// conditions go (blind spots aside: see [`Status::blind_spot_for`]).
    pub fn certain(&self) -> bool {
        self.ready && !self.stale
    }

    /// The blind spot that could hide a socket of `proto`, if any.
    pub fn blind_spot_for(&self, proto: Proto) -> Option<&BlindSpot> {
        self.blind_spots.iter().find(|b| b.hides(proto))
    }
}

pub struct PortTable {
    pub map: PortMap,
    pub status: Status,
}

impl PortTable {
    fn refresh_unverifiable(&mut self) {
        let now: BTreeSet<(Proto, u16)> = self.map.unverifiable().map(|s| (s.proto, s.port)).collect();
        if now != self.status.unverifiable {
            self.status.unverifiable = now;
        }
    }

    fn degrade(&mut self, reason: String) {
        self.status.mode = Mode::SnapshotOnly { reason };
        self.status.blind_spots =
            Kernel { hooks: Vec::new(), ..self.status.kernel.clone() }.blind_spots(SystemTime::now());
    }
}

/// A port becoming taken or free, as the watch stream reports it.
#[derive(Clone, Debug, Serialize)]
pub struct PortChange {
    pub change: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub at: SystemTime,
}

impl PortChange {
    fn new(c: Change, at: SystemTime) -> Self {
        let (change, (proto, port)) = match c {
            Change::Taken(k) => ("taken", k),
            Change::Freed(k) => ("freed", k),
        };
        Self { change, proto, port, at }
    }
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
    #[error("sock_diag is unavailable, so ports cannot be observed at all: {0}")]
    SockDiag(#[source] DumpError),
    #[error("starting the dumper thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Starts the ports domain: loads eBPF (or explains why not), starts the
/// dumper and the owner task. Returns at once; `/readyz` tells when the first
/// dump is in.
pub fn start(cfg: PortsConfig, shutdown: CancellationToken) -> Result<Ports, StartError> {
    let started = SystemTime::now();
    let cgroup_root = cfg.cgroup_root.clone().or_else(cgroup::find_root);
    let diag = SockDiag::new().map_err(StartError::SockDiag)?;
    let visible = diag.visible();
    let (probes, mode) = load_probes(&cfg, cgroup_root.as_deref());
    let hooks: Vec<HookStatus> = probes.as_ref().map(|p| p.hooks().to_vec()).unwrap_or_default();
    let kernel = Kernel::new(visible, hooks);
    let blind_spots = kernel.blind_spots(started);
    // Without events for binds, listens and connects, every table is dumped
    // at the degraded period: nothing else would notice them.
    let live =
        matches!(mode, Mode::Ebpf) && ["post_bind4", "post_bind6", "sock_ops"].iter().all(|h| kernel.attached(h));
    let periods = if live {
        (cfg.resync_interval, cfg.connected_resync_interval)
    } else {
        (cfg.degraded_resync_interval, cfg.degraded_resync_interval)
    };
    match &mode {
        Mode::Ebpf => tracing::info!(
            kernel = %kernel.release,
            hooks = ?kernel.hooks.iter().filter(|h| h.attached).map(|h| h.hook).collect::<Vec<_>>(),
            refused = ?kernel.hooks.iter().filter(|h| !h.attached).map(|h| h.hook).collect::<Vec<_>>(),
            cgroup = %cgroup_root.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            "eBPF programs attached; ports tracked live"
        ),
        Mode::SnapshotOnly { reason } => tracing::warn!(
            reason = %reason,
            period = ?cfg.degraded_resync_interval,
            "running on sock_diag snapshots alone (degraded; never bind-probing)"
        ),
    }
    for b in &blind_spots {
        tracing::warn!(blind_spot = ?b, "{}; answers it could change are reported uncertain", b.reason());
    }
    let netns_cookie = probes.as_ref().map_or(0, Probes::netns_cookie);
    let status = Status {
        mode,
        ready: false,
        stale: false,
        last_full_resync: None,
        last_error: None,
        kernel,
        blind_spots,
        unverifiable: BTreeSet::new(),
    };
    let table = Arc::new(RwLock::new(PortTable { map: PortMap::new(visible), status }));
    let (changes, _) = broadcast::channel(4096);
    let ports = Ports {
        table: table.clone(),
        changes: changes.clone(),
        metrics: Arc::new(PortMetrics::default()),
        containers: Arc::new(ContainerIds::new(cgroup_root)),
    };
    let (dump_req_tx, dump_req_rx) = std::sync::mpsc::channel::<(Scope, u64)>();
    let (dump_res_tx, dump_res_rx) = mpsc::channel(4);
    tracker::spawn_dumper(diag, dump_req_rx, dump_res_tx).map_err(StartError::Thread)?;
    let tracker = Tracker {
        table,
        changes,
        metrics: ports.metrics.clone(),
        netns_cookie,
        visible,
        dump_requests: dump_req_tx,
        cfg,
        pending: BTreeSet::new(),
        pending_tables: Tables::NONE,
        verify_at: None,
        full_pending: true,
        fast_pending: false,
        in_flight: false,
        stale_since: None,
        recover_tracked: false,
        counters_seen: KernelCounters::default(),
    };
    tokio::spawn(tracker.run(probes, dump_res_rx, periods, shutdown));
    Ok(ports)
}

#[cfg(feature = "ebpf")]
fn load_probes(cfg: &PortsConfig, cgroup_root: Option<&std::path::Path>) -> (Option<Probes>, Mode) {
    if cfg.disable_ebpf {
        return (None, Mode::SnapshotOnly { reason: "eBPF disabled by --disable-ebpf".into() });
    }
    let Some(root) = cgroup_root else {
        return (None, Mode::SnapshotOnly { reason: "no cgroup v2 mount found to attach to".into() });
    };
    let opts = ebpf::EbpfOptions { cgroup_root: root, ring_bytes: cfg.ring_bytes, tracked_max: cfg.tracked_max };
    match ebpf::Probes::load(&opts) {
        Ok(p) => (Some(p), Mode::Ebpf),
        Err(e) => (None, Mode::SnapshotOnly { reason: format!("eBPF unavailable: {e}") }),
    }
}

#[cfg(not(feature = "ebpf"))]
fn load_probes(_: &PortsConfig, _: Option<&std::path::Path>) -> (Option<Probes>, Mode) {
    (None, Mode::SnapshotOnly { reason: "built without eBPF (--no-default-features)".into() })
}
