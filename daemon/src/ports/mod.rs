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
#[cfg(feature = "ebpf")]
mod btf;
mod cgroup;
mod clock;
#[cfg(feature = "ebpf")]
mod ebpf;
mod events;
mod iter;
mod kernel;
pub mod map;
mod metrics;
pub mod model;
pub(crate) mod occupancy;
pub mod sockdiag;
mod tracker;

use std::{
    collections::BTreeSet,
    ops::RangeInclusive,
    path::PathBuf,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::{Duration, SystemTime},
};

use self::{
    cgroup::ContainerIds,
    events::{KernelCounters, Probes},
    kernel::{BlindSpot, HookStatus, Kernel},
    map::{PortKey, PortMap, Scope, Tables},
    metrics::PortMetrics,
    model::{Proto, Socket},
    occupancy::{Claim, ClaimSet, ClaimSource, Claims, Unsure, Verdict},
    sockdiag::{DumpError, SockDiag},
    tracker::Tracker,
};
use crate::tasks::Tasks;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

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
    /// List bound TCP sockets with the socket iterator even where sock_diag
    /// can (6.5+): for testing the iterator on such kernels.
    pub force_bound_iter: bool,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

/// The ports domain's state: the sockets, the claims, and the map's status.
/// Written by the tracker alone; read through [`Ports`].
pub(crate) struct PortTable {
    map: PortMap,
    claims: Claims,
    status: Status,
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

    fn verdict(&self, key: PortKey) -> Verdict {
        occupancy::verdict(&self.map, &self.claims, &self.status, key)
    }

    /// Taken by a socket or a claim (what the change stream follows).
    fn is_taken(&self, key: PortKey) -> bool {
        self.map.is_taken(key) || self.claims.any(key)
    }
}

/// A port becoming taken or free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Taken,
    Freed,
}

/// A port becoming taken or free, as the watch stream reports it.
#[derive(Clone, Debug, Serialize)]
pub struct PortChange {
    pub kind: ChangeKind,
    pub proto: Proto,
    pub port: u16,
    pub at: SystemTime,
}

/// One port, as the HTTP API shows it: the verdict and everything behind it.
#[derive(Clone, Debug)]
pub struct PortDetail {
    pub verdict: Verdict,
    pub sockets: Vec<Socket>,
    pub claims: Vec<Claim>,
}

/// The first free ports of a range, and how sure that is.
#[derive(Clone, Debug)]
pub struct FreePorts {
    pub ports: Vec<u16>,
    /// A lasting reason the ports listed may still be taken (a blind spot of
    /// this kernel); None when they are certainly free.
    pub caveat: Option<Unsure>,
}

/// What a socket listing selects.
#[derive(Clone, Debug)]
pub struct SocketFilter {
    pub protos: Vec<Proto>,
    pub family: Option<model::Family>,
    pub state: Option<model::SockState>,
    pub range: RangeInclusive<u16>,
}

/// Read access to the ports domain, for sinks: answers are copied out, never
/// borrowed, so no sink holds the table's lock.
#[derive(Clone)]
pub struct Ports {
    table: Arc<RwLock<PortTable>>,
    changes: broadcast::Sender<PortChange>,
    /// Asks the tracker to apply the events already in the ring.
    settles: mpsc::Sender<oneshot::Sender<()>>,
    status: watch::Receiver<Status>,
    metrics: Arc<PortMetrics>,
    containers: Arc<ContainerIds>,
}

/// How long a reader waits for the tracker to apply pending events before it
/// answers from the map as it is.
const SETTLE_WAIT: Duration = Duration::from_millis(250);

impl Ports {
    /// Waits until every eBPF event already in the ring buffer is applied:
    /// answers given after this include every bind, listen and connect that
    /// completed before it was called. Bounded by `SETTLE_WAIT`; false when
    /// the tracker did not answer in time (the answer may then lag events of
    /// the last moments, which the caller may say).
    pub async fn settle(&self) -> bool {
        let (reply, done) = oneshot::channel();
        let asked = async {
            // Waits for room when many readers settle at once: each one's
            // drain must begin after its own call.
            self.settles.send(reply).await.ok()?;
            done.await.ok()
        };
        tokio::time::timeout(SETTLE_WAIT, asked).await.ok().flatten().is_some()
    }

    fn read(&self) -> RwLockReadGuard<'_, PortTable> {
        // A panicking writer would have taken the daemon down; the data is
        // still consistent (updates are applied whole), so read through poison.
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The verdict on one port of one protocol.
    pub fn verdict(&self, proto: Proto, port: u16) -> Verdict {
        self.read().verdict((proto, port))
    }

    /// One port in every protocol asked for: the strongest verdict (taken
    /// over unsure over free), with the sockets and claims behind it.
    pub fn detail(&self, protos: &[Proto], port: u16) -> PortDetail {
        let t = self.read();
        let mut verdicts: Vec<Verdict> = protos.iter().map(|p| t.verdict((*p, port))).collect();
        verdicts.sort_by_key(|v| match v {
            Verdict::Taken(_) => 0,
            Verdict::Unsure(_) => 1,
            Verdict::Free => 2,
        });
        let mut verdict = verdicts.into_iter().next().unwrap_or(Verdict::Free);
        if let Verdict::Taken(reasons) = &mut verdict {
            // Taken in several protocols: every reason counts.
            let all: Vec<_> = protos
                .iter()
                .filter_map(|p| match t.verdict((*p, port)) {
                    Verdict::Taken(r) => Some(r),
                    _ => None,
                })
                .flatten()
                .collect();
            *reasons = all;
        }
        PortDetail {
            verdict,
            sockets: protos.iter().flat_map(|p| t.map.sockets_on((*p, port))).cloned().collect(),
            claims: protos.iter().flat_map(|p| t.claims.on((*p, port))).cloned().collect(),
        }
    }

    /// Up to `limit` sockets the filter selects, from port `after` (exclusive)
    /// on, whole ports at a time; and the port to continue after, if more.
    pub fn sockets(
        &self,
        f: &SocketFilter,
        after: Option<(Proto, u16)>,
        limit: usize,
    ) -> (Vec<Socket>, Option<(Proto, u16)>) {
        let t = self.read();
        let mut out = Vec::new();
        let mut previous: Option<Proto> = None;
        for proto in &f.protos {
            if let Some(prev) = previous.filter(|_| out.len() >= limit) {
                return (out, Some((prev, u16::MAX))); // the page ended with a protocol
            }
            previous = Some(*proto);
            let start = match after {
                Some((p, _)) if p > *proto => continue,
                Some((p, port)) if p == *proto => match port.checked_add(1) {
                    Some(next) => next.max(*f.range.start()),
                    None => continue,
                },
                _ => *f.range.start(),
            };
            if start > *f.range.end() {
                continue;
            }
            let mut last_port = None;
            for s in t.map.sockets_in(*proto, start..=*f.range.end()) {
                if out.len() >= limit && last_port != Some(s.port) {
                    return (out, last_port.map(|p| (*proto, p)));
                }
                last_port = Some(s.port);
                if f.family.is_none_or(|fa| fa == s.family) && f.state.is_none_or(|st| st == s.state) {
                    out.push(s.clone());
                }
            }
        }
        (out, None)
    }

    /// The first `count` ports of `range` free in every protocol of `protos`,
    /// or why none can be promised (a transient condition: retry).
    pub fn free(&self, protos: &[Proto], range: RangeInclusive<u16>, count: usize) -> Result<FreePorts, Unsure> {
        let t = self.read();
        let mut caveat = None;
        let mut ports = Vec::new();
        for port in range {
            if ports.len() >= count {
                break;
            }
            let mut free = true;
            for p in protos {
                match t.verdict((*p, port)) {
                    Verdict::Free => {}
                    Verdict::Taken(_) | Verdict::Unsure(Unsure::Unverifiable) => free = false,
                    Verdict::Unsure(u) if u.is_transient() => return Err(u),
                    Verdict::Unsure(u) => caveat = Some(u),
                }
            }
            if free {
                ports.push(port);
            }
        }
        Ok(FreePorts { ports, caveat })
    }

    /// Ports of `ranges` taken in TCP or UDP (by sockets or claims): what the
    /// port-usage ConfigMap lists. None while the map has never been complete
    /// or a claim source has not been read: a list then could miss ports.
    pub fn taken_in(&self, ranges: &[RangeInclusive<u16>]) -> Option<BTreeSet<u16>> {
        let t = self.read();
        if !t.status.ready || t.claims.unread().is_some() {
            return None;
        }
        let mut keys = BTreeSet::new();
        for r in ranges {
            for proto in Proto::ALL {
                keys.extend(t.map.taken_in(proto, r.clone()));
                keys.extend(t.claims.claimed_in(proto, r.clone()));
            }
            keys.extend(t.status.unverifiable.iter().map(|(_, p)| *p).filter(|p| r.contains(p)));
        }
        Some(keys)
    }

    /// The map's status, as it changes.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// One claim source's set, as the ports domain last received it.
    pub fn claims(&self, source: ClaimSource) -> Option<ClaimSet> {
        self.read().claims.set(source).cloned()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PortChange> {
        self.changes.subscribe()
    }

    /// The container a cgroup id belongs to, for owners.
    pub fn container_of(&self, cgroup_id: u64) -> Option<String> {
        self.containers.lookup(cgroup_id)
    }
}

/// What else makes ports taken: one watched set per claim source.
pub type ClaimInputs = Vec<(ClaimSource, watch::Receiver<ClaimSet>)>;

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
pub fn start(cfg: PortsConfig, inputs: ClaimInputs, tasks: &Tasks) -> Result<Ports, StartError> {
    let started = SystemTime::now();
    let cgroup_root = cfg.cgroup_root.clone().or_else(cgroup::find_root);
    let mut diag = SockDiag::new().map_err(StartError::SockDiag)?;
    let (mut probes, mode) = load_probes(&cfg, cgroup_root.as_deref(), diag.visible());
    if let Some(iter) = probes.as_mut().and_then(Probes::take_bound_iter) {
        diag.set_bound_iter(iter);
    }
    let visible = diag.visible();
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
    let mut claims = Claims::default();
    for (source, _) in &inputs {
        claims.expect(*source);
    }
    let (status_tx, status_rx) = watch::channel(status.clone());
    let table = Arc::new(RwLock::new(PortTable { map: PortMap::new(visible), claims, status }));
    let (changes, _) = broadcast::channel(4096);
    let (settles_tx, settles_rx) = mpsc::channel(64);
    let ports = Ports {
        table: table.clone(),
        changes: changes.clone(),
        settles: settles_tx,
        status: status_rx,
        metrics: Arc::new(PortMetrics::default()),
        containers: Arc::new(ContainerIds::new(cgroup_root)),
    };
    let (dump_req_tx, dump_req_rx) = std::sync::mpsc::channel::<(Scope, u64)>();
    let (dump_res_tx, dump_res_rx) = mpsc::channel(4);
    tracker::spawn_dumper(diag, dump_req_rx, dump_res_tx).map_err(StartError::Thread)?;
    let tracker = Tracker {
        table,
        changes,
        status: status_tx,
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
    // The map, the probes and the ring buffer live in this one task: nothing
    // could rebuild them, so it is a core task (its end fails /healthz).
    let run = tracker.run(probes, dump_res_rx, tracker::claim_updates(inputs), settles_rx, periods, tasks.shutdown());
    tasks.core("ports", run);
    Ok(ports)
}

#[cfg(feature = "ebpf")]
fn load_probes(cfg: &PortsConfig, cgroup_root: Option<&std::path::Path>, visible: Tables) -> (Option<Probes>, Mode) {
    if cfg.disable_ebpf {
        return (None, Mode::SnapshotOnly { reason: "eBPF disabled by --disable-ebpf".into() });
    }
    let Some(root) = cgroup_root else {
        return (None, Mode::SnapshotOnly { reason: "no cgroup v2 mount found to attach to".into() });
    };
    if !cgroup::is_host_root(root) {
        let reason = format!(
            "{} is not the host's root cgroup (a container's own cgroup namespace?): hooks attached there would \
             see this container's sockets only; mount the host's /sys/fs/cgroup",
            root.display()
        );
        return (None, Mode::SnapshotOnly { reason });
    }
    let opts = ebpf::EbpfOptions {
        cgroup_root: root,
        ring_bytes: cfg.ring_bytes,
        tracked_max: cfg.tracked_max,
        bound_iter: !visible.contains(Tables::BOUND) || cfg.force_bound_iter,
    };
    match ebpf::Probes::load(&opts) {
        Ok(p) => (Some(p), Mode::Ebpf),
        Err(e) => (None, Mode::SnapshotOnly { reason: format!("eBPF unavailable: {e}") }),
    }
}

#[cfg(not(feature = "ebpf"))]
fn load_probes(_: &PortsConfig, _: Option<&std::path::Path>, _: Tables) -> (Option<Probes>, Mode) {
    (None, Mode::SnapshotOnly { reason: "built without eBPF (--no-default-features)".into() })
}
