//! The owner of the port map: the one task that writes it. It applies eBPF
//! events as they come, schedules sock_diag dumps (targeted, periodic, full)
//! on the dumper thread and merges their results, and watches the kernel's
//! counters for lost events.
use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
    thread,
    time::{Duration, SystemTime},
};

use polarstack_ebpf_common::TrackedSocket;
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::{self, Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use super::{
    clock::monotonic_ns,
    events::{self, KernelCounters, Probes},
    map::{self, Change, EventEffect, MergeStats, PortKey, Scope, Snapshot, Tables},
    metrics::PortMetrics,
    occupancy::{ClaimSet, ClaimSource},
    sockdiag::{Dump, DumpError, SockDiag, MAX_FILTERED_PORTS},
    ChangeKind, ClaimInputs, PortChange, PortTable, PortsConfig, Status,
};
use crate::retry;

/// Forwards every claim source's changes into one channel the tracker reads.
pub(super) fn claim_updates(inputs: ClaimInputs) -> mpsc::UnboundedReceiver<(ClaimSource, ClaimSet)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (source, mut set) in inputs {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let current = set.borrow_and_update().clone();
                if tx.send((source, current)).is_err() {
                    return; // the tracker stopped
                }
                if set.changed().await.is_err() {
                    return; // the source stopped; its last set stays
                }
            }
        });
    }
    rx
}

pub(super) type DumpResult = (Scope, u64, Result<Dump, DumpError>, Duration);

/// sock_diag dumps are blocking syscalls: one thread does them all, reusing
/// its netlink socket and buffer. It lives in the daemon's network namespace
/// (threads inherit it), which is what makes the dumps the right ones.
pub(super) fn spawn_dumper(
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
pub(super) struct Tracker {
    pub table: Arc<RwLock<PortTable>>,
    pub changes: broadcast::Sender<PortChange>,
    /// A copy of the table's status for sinks that follow it.
    pub status: watch::Sender<Status>,
    pub metrics: Arc<PortMetrics>,
    /// The watched namespace's cookie (0 when unknown: no backstop filter).
    pub netns_cookie: u64,
    /// The tables dumps can list on this kernel.
    pub visible: Tables,
    pub dump_requests: std::sync::mpsc::Sender<(Scope, u64)>,
    pub cfg: PortsConfig,
    /// Ports that may have been freed, awaiting a targeted dump of
    /// `pending_tables`.
    pub pending: BTreeSet<PortKey>,
    pub pending_tables: Tables,
    pub verify_at: Option<Instant>,
    /// A dump of every table is due.
    pub full_pending: bool,
    /// A dump of the listener and UDP tables is due.
    pub fast_pending: bool,
    pub in_flight: bool,
    /// Monotonic ns when lost events were noticed; cleared by a full dump
    /// that started after it.
    pub stale_since: Option<u64>,
    /// Bound sockets must be recovered from the kernel's tracking table with
    /// the next full dump: events were lost on a kernel whose dumps cannot
    /// list bound TCP sockets.
    pub recover_tracked: bool,
    pub counters_seen: KernelCounters,
}

impl Tracker {
    pub async fn run(
        mut self,
        mut probes: Option<Probes>,
        mut dumps: mpsc::Receiver<DumpResult>,
        mut claims: mpsc::UnboundedReceiver<(ClaimSource, ClaimSet)>,
        mut settles: mpsc::Receiver<oneshot::Sender<()>>,
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
                raw = events::next(&mut probes, &mut batch) => {
                    match raw {
                        Ok(undecodable) => self.metrics.count_undecodable(undecodable),
                        Err(e) => {
                            tracing::error!(error = %e, "ring buffer unreadable; continuing on dumps alone");
                            self.degrade(&mut probes, format!("ring buffer unreadable: {e}"));
                            fast_tick = ticker(self.cfg.degraded_resync_interval);
                            full_tick = ticker(self.cfg.degraded_resync_interval);
                        }
                    }
                    self.apply_events(&batch);
                    batch.clear();
                    self.check_counters(&probes);
                }
                Some(done) = dumps.recv() => {
                    self.in_flight = false;
                    // Losses first: a dump must not remove what a lost event
                    // would have kept.
                    self.check_counters(&probes);
                    self.apply_dump(done, &mut probes);
                }
                Some((source, set)) = claims.recv() => self.apply_claims(source, set),
                Some(reply) = settles.recv() => {
                    // A reader is about to answer: apply every event already in
                    // the ring first, so a bind() that returned before its
                    // question is in the answer.
                    if let Some(p) = probes.as_mut() {
                        let undecodable = p.drain(&mut batch);
                        self.metrics.count_undecodable(undecodable);
                        self.apply_events(&batch);
                        batch.clear();
                    }
                    let _ = reply.send(());
                }
                _ = fast_tick.tick() => self.fast_pending = true,
                _ = full_tick.tick() => self.full_pending = true,
                _ = loss_tick.tick(), if probes.is_some() => self.check_counters(&probes),
                () = retry::sleep_until(verify_at), if verify_at.is_some() => {}
            }
            self.kick();
            self.publish_status();
        }
        tracing::debug!("port tracker stopped; eBPF links detach as the probes drop");
    }

    /// A claim source's new set: the ports whose occupancy it changes are
    /// reported like socket changes.
    fn apply_claims(&mut self, source: ClaimSource, set: ClaimSet) {
        let now = SystemTime::now();
        let changes = {
            let mut table = write(&self.table);
            let mut keys: Vec<PortKey> = set.claims.keys().copied().collect();
            keys.extend(table.claims.set(source).into_iter().flat_map(|s| s.claims.keys().copied()));
            keys.sort_unstable();
            keys.dedup();
            let before: Vec<bool> = keys.iter().map(|k| table.is_taken(*k)).collect();
            table.claims.replace(source, set);
            keys.into_iter()
                .zip(before)
                .filter_map(|(k, was)| {
                    let now_taken = table.is_taken(k);
                    (now_taken != was).then_some(if now_taken { Change::Taken(k) } else { Change::Freed(k) })
                })
                .collect()
        };
        self.publish(changes, now);
    }

    fn apply_events(&mut self, batch: &[map::Event]) {
        if batch.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let mut changes = Vec::new();
        {
            let mut table = write(&self.table);
            for ev in batch {
                self.metrics.count_event(ev.kind);
                if self.netns_cookie != 0 && ev.netns_cookie != 0 && ev.netns_cookie != self.netns_cookie {
                    // The kernel filters by namespace already; this is the
                    // backstop (and what a misconfigured filter would show).
                    self.metrics.count_foreign_in_daemon();
                    continue;
                }
                if let EventEffect::Verify(key, tables) = table.map.apply_event(ev, now, &mut changes) {
                    self.pending.insert(key);
                    self.pending_tables = self.pending_tables.union(tables);
                }
            }
            table.refresh_unverifiable();
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
            Ok(Dump { sockets, covered }) => Snapshot { started_ns, scope, covered, sockets },
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
                write(&self.table).status.last_error = Some(e.to_string());
                return;
            }
        };
        let now = SystemTime::now();
        let mut changes = Vec::new();
        let mut seeds: Vec<(u64, TrackedSocket)> = Vec::new();
        let mut forget: Vec<u64> = Vec::new();
        // Recovering bound sockets from the kernel's own table, where dumps
        // cannot list them, when events were lost since the last recovery.
        let recovering = full && self.recover_tracked && self.stale_since.is_some_and(|t| started_ns > t);
        // A full dump whose socket iterator listed the bound sockets has
        // recovered them already, and the kernel's table must not overrule
        // it: that table holds only the sockets bound since the daemon
        // started, so it would drop the older ones the iterator just found.
        let iterated = snap.covered.contains(Tables::BOUND) && !self.visible.contains(Tables::BOUND);
        let tracked = match (recovering && !iterated, probes.as_ref()) {
            (true, Some(p)) => {
                let read_ns = monotonic_ns();
                Some((p.tracked_sockets(), read_ns))
            }
            _ => None,
        };
        {
            let mut table = write(&self.table);
            let mut stats = table.map.apply_snapshot(&snap, now, &mut changes);
            if let Some((tracked, read_ns)) = &tracked {
                let more = table.map.apply_tracked(tracked, *read_ns, now, &mut changes);
                tracing::info!(
                    added = more.added.len(),
                    removed = more.removed.len(),
                    "bound sockets recovered from the kernel's tracking table"
                );
                stats.merge(more);
            }
            if recovering {
                self.recover_tracked = false;
            }
            // The first full dump seeds the map: nothing in it is a repair.
            let repair = periodic && table.status.ready;
            self.metrics.record_dump(&snap.scope, repair, &stats, took);
            if probes.is_some() {
                seeds.extend(stats.added.iter().filter_map(|c| table.map.tracking_record(*c).map(|t| (*c, t))));
                forget = stats.untrack;
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
            table.refresh_unverifiable();
        }
        if let Some(p) = probes.as_mut() {
            for (cookie, t) in seeds {
                if !p.track(cookie, t) {
                    self.metrics.count_seed_failure();
                }
            }
            for cookie in forget {
                p.untrack(cookie);
            }
        }
        self.publish(changes, now);
    }

    /// Reads the kernel's counters; lost events mark the map stale and ask
    /// for a full dump now.
    fn check_counters(&mut self, probes: &Option<Probes>) {
        let Some(c) = probes.as_ref().map(Probes::counters) else {
            return;
        };
        if c == self.counters_seen {
            return;
        }
        self.metrics.set_kernel_counters(c);
        if c.ring_full > self.counters_seen.ring_full {
            tracing::warn!(
                lost = c.ring_full - self.counters_seen.ring_full,
                "eBPF events lost (ring buffer full); resyncing now"
            );
            self.stale_since = Some(monotonic_ns());
            self.full_pending = true;
            self.recover_tracked = !self.visible.contains(Tables::BOUND);
            write(&self.table).status.stale = true;
        }
        if c.track_full > self.counters_seen.track_full {
            tracing::warn!(
                sockets = c.track_full - self.counters_seen.track_full,
                "the kernel's socket tracking table is full: those sockets' close will not be reported"
            );
        }
        self.counters_seen = c;
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
        write(&self.table).degrade(reason);
        self.full_pending = true;
    }

    /// Streams occupancy changes. Changes of the socket map on a port a
    /// claim also holds change nothing a reader sees, and are dropped.
    fn publish(&self, changes: Vec<Change>, at: SystemTime) {
        if changes.is_empty() {
            return;
        }
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        for c in changes {
            let (kind, key) = match c {
                Change::Taken(k) => (ChangeKind::Taken, k),
                Change::Freed(k) => (ChangeKind::Freed, k),
            };
            if (kind == ChangeKind::Taken) != table.is_taken(key) {
                continue; // masked by a claim, or undone since
            }
            // No receivers is fine: nobody is watching.
            let _ = self.changes.send(PortChange { kind, proto: key.0, port: key.1, at });
        }
    }

    /// Mirrors the table's status to the sinks that follow it.
    fn publish_status(&self) {
        let current = self.table.read().unwrap_or_else(|p| p.into_inner()).status.clone();
        self.status.send_if_modified(|s| {
            let changed = *s != current;
            if changed {
                *s = current;
            }
            changed
        });
    }
}

impl MergeStats {
    fn merge(&mut self, other: MergeStats) {
        self.added.extend(other.added);
        self.removed.extend(other.removed);
        self.untrack.extend(other.untrack);
    }
}

fn write(table: &RwLock<PortTable>) -> std::sync::RwLockWriteGuard<'_, PortTable> {
    // Updates are applied whole, so the data behind a poisoned lock is still
    // consistent.
    table.write().unwrap_or_else(|p| p.into_inner())
}
