//! Counters of the ports domain, and their encoding for `/metrics` (see
//! [`crate::telemetry`]).
use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use polarstack_ebpf_common::EventKind;

use super::{
    events::KernelCounters,
    kernel::BlindSpot,
    map::{MergeStats, PortMap, Scope, Tables},
    model::Proto,
    Mode, Ports, Status,
};
use crate::telemetry::{counter, counter_by, gauge, gauge_by};

const KINDS: [(EventKind, &str); 5] = [
    (EventKind::Bind, "bind"),
    (EventKind::Release, "release"),
    (EventKind::Listen, "listen"),
    (EventKind::Connect, "connect"),
    (EventKind::Unlisten, "unlisten"),
];

#[derive(Default)]
pub struct PortMetrics {
    events: [AtomicU64; 5],
    undecodable: AtomicU64,
    foreign_daemon: AtomicU64,
    seed_failures: AtomicU64,
    kernel: std::sync::Mutex<KernelCounters>,
    dumps_full: AtomicU64,
    dumps_fast: AtomicU64,
    dumps_ports: AtomicU64,
    dump_errors: AtomicU64,
    repairs_added: AtomicU64,
    repairs_removed: AtomicU64,
    last_full_dump_ns: AtomicU64,
}

impl PortMetrics {
    pub fn count_event(&self, kind: EventKind) {
        if let Some(i) = KINDS.iter().position(|(k, _)| *k == kind) {
            self.events[i].fetch_add(1, Relaxed);
        }
    }

    pub fn count_undecodable(&self, n: usize) {
        self.undecodable.fetch_add(n as u64, Relaxed);
    }

    pub fn count_foreign_in_daemon(&self) {
        self.foreign_daemon.fetch_add(1, Relaxed);
    }

    pub fn count_seed_failure(&self) {
        self.seed_failures.fetch_add(1, Relaxed);
    }

    pub fn count_dump_error(&self) {
        self.dump_errors.fetch_add(1, Relaxed);
    }

    pub fn set_kernel_counters(&self, c: KernelCounters) {
        *self.kernel.lock().unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// Periodic dumps count what they found different from the map as
    /// repairs; targeted dumps are how releases are confirmed, so not.
    pub fn record_dump(&self, scope: &Scope, repair: bool, stats: &MergeStats, took: Duration) {
        if repair {
            self.repairs_added.fetch_add(stats.added.len() as u64, Relaxed);
            self.repairs_removed.fetch_add(stats.removed.len() as u64, Relaxed);
        }
        if scope.ports.is_some() {
            self.dumps_ports.fetch_add(1, Relaxed);
        } else if scope.tables == Tables::ALL {
            self.last_full_dump_ns.store(took.as_nanos() as u64, Relaxed);
            self.dumps_full.fetch_add(1, Relaxed);
        } else {
            self.dumps_fast.fetch_add(1, Relaxed);
        }
    }

    pub fn repairs(&self) -> (u64, u64) {
        (self.repairs_added.load(Relaxed), self.repairs_removed.load(Relaxed))
    }

    /// Copies the counters, and what `map` and `status` say, out for one
    /// scrape.
    pub fn scrape(&self, map: &PortMap, status: &Status) -> PortsScrape {
        let load = |a: &AtomicU64| a.load(Relaxed);
        PortsScrape {
            events: std::array::from_fn(|i| load(&self.events[i])),
            kernel: *self.kernel.lock().unwrap_or_else(|p| p.into_inner()),
            foreign_daemon: load(&self.foreign_daemon),
            seed_failures: load(&self.seed_failures),
            undecodable: load(&self.undecodable),
            dumps: [load(&self.dumps_full), load(&self.dumps_fast), load(&self.dumps_ports)],
            dump_errors: load(&self.dump_errors),
            repairs: self.repairs(),
            last_full_dump_ns: load(&self.last_full_dump_ns),
            sockets: map.len() as u64,
            taken: Proto::ALL.map(|p| (p, map.taken_count(p) as u64)),
            status: status.clone(),
        }
    }
}

impl Ports {
    /// The ports domain's metrics, copied out at scrape time: a collector
    /// for the `/metrics` registry.
    pub fn metrics(&self) -> PortsScrape {
        let t = self.read();
        self.metrics.scrape(&t.map, &t.status)
    }
}

/// The ports domain's metrics at one scrape. Copied out under the table's
/// read lock, like every answer of [`Ports`], so that encoding them does not
/// hold it.
#[derive(Debug)]
pub struct PortsScrape {
    /// In the order of `KINDS`.
    events: [u64; 5],
    kernel: KernelCounters,
    foreign_daemon: u64,
    seed_failures: u64,
    undecodable: u64,
    /// Full, fast, ports.
    dumps: [u64; 3],
    dump_errors: u64,
    /// Added, removed.
    repairs: (u64, u64),
    last_full_dump_ns: u64,
    sockets: u64,
    taken: [(Proto, u64); 2],
    status: Status,
}

impl Collector for PortsScrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let e = &mut encoder;
        let (kernel, status) = (&self.kernel, &self.status);
        let events = KINDS.iter().zip(self.events).map(|((_, kind), n)| ([("kind", *kind)], n));
        counter_by(e, "polarstack_ports_events_total", "eBPF events received, by hook.", events)?;
        counter_by(
            e,
            "polarstack_ports_foreign_netns_events_total",
            "Events from other network namespaces, dropped: in the kernel, or by the daemon (a backstop that should stay 0).",
            [([("where", "kernel")], kernel.foreign), ([("where", "daemon")], self.foreign_daemon)],
        )?;
        counter(
            e,
            "polarstack_ports_netns_unknown_events_total",
            "Events from hooks that cannot read namespace cookies on this kernel, each checked with a dump.",
            kernel.netns_unknown,
        )?;
        counter(
            e,
            "polarstack_ports_lost_events_total",
            "Events the kernel dropped because the ring buffer was full (each forces a resync).",
            kernel.ring_full,
        )?;
        counter_by(
            e,
            "polarstack_ports_untracked_sockets_total",
            "Sockets the kernel's tracking table had no room for (their close is not reported), and sockets found by dumps that could not be entered.",
            [([("where", "kernel")], kernel.track_full), ([("where", "seed")], self.seed_failures)],
        )?;
        counter(
            e,
            "polarstack_ports_undecodable_events_total",
            "Ring-buffer records the daemon could not decode (dropped).",
            self.undecodable,
        )?;
        let [full, fast, ports] = self.dumps;
        counter_by(
            e,
            "polarstack_ports_dumps_total",
            "sock_diag dumps, by scope: full (every table), fast (listeners and UDP), ports (verification).",
            [([("scope", "full")], full), ([("scope", "fast")], fast), ([("scope", "ports")], ports)],
        )?;
        counter(
            e,
            "polarstack_ports_dump_errors_total",
            "sock_diag dumps that failed (the map is kept as it was).",
            self.dump_errors,
        )?;
        let (added, removed) = self.repairs;
        counter_by(
            e,
            "polarstack_ports_resync_repairs_total",
            "Sockets a periodic resync found missing from (added) or stale in (removed) the map.",
            [([("kind", "added")], added), ([("kind", "removed")], removed)],
        )?;
        gauge(
            e,
            "polarstack_ports_last_full_dump_seconds",
            "Duration of the last full sock_diag dump.",
            self.last_full_dump_ns as f64 / 1e9,
        )?;
        gauge(e, "polarstack_ports_sockets", "Sockets holding a port in the watched namespace.", self.sockets)?;
        let taken = self.taken.map(|(p, n)| ([("proto", p.as_str())], n));
        gauge_by(e, "polarstack_ports_taken", "Distinct taken ports.", taken)?;
        let ebpf = matches!(status.mode, Mode::Ebpf);
        gauge_by(
            e,
            "polarstack_ports_mode",
            "How the port map is fed: 1 for the active mode (snapshot-only means degraded).",
            [([("mode", "ebpf")], u64::from(ebpf)), ([("mode", "snapshot-only")], u64::from(!ebpf))],
        )?;
        let hooks = status.kernel.hooks.iter().map(|h| ([("hook", h.hook)], u64::from(h.attached)));
        gauge_by(
            e,
            "polarstack_ports_hook_attached",
            "1 for each eBPF hook this kernel accepted, 0 for each it refused (see /readyz for the reason).",
            hooks,
        )?;
        let blind =
            BlindSpot::KINDS.map(|k| ([("kind", k)], u64::from(status.blind_spots.iter().any(|b| b.kind() == k))));
        gauge_by(
            e,
            "polarstack_ports_blind_spot",
            "1 for each kind of socket this kernel hides from the daemon (answers it could change are uncertain).",
            blind,
        )?;
        gauge(
            e,
            "polarstack_ports_unverifiable_ports",
            "Ports held by bound sockets whose release cannot be observed (tracking table full, dumps blind).",
            status.unverifiable.len() as u64,
        )?;
        gauge(e, "polarstack_ports_ready", "1 once the first full dump is merged.", u64::from(status.ready))?;
        gauge(
            e,
            "polarstack_ports_stale",
            "1 while lost events await a repairing resync (nothing is reported free).",
            u64::from(status.stale),
        )
    }
}
