//! Counters of the ports domain, rendered in the Prometheus text format.
use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use polarstack_ebpf_common::EventKind;

use super::{
    events::KernelCounters,
    kernel::BlindSpot,
    map::{MergeStats, PortMap, Scope, Tables},
    model::Proto,
    Mode, Status,
};
use crate::telemetry::{write_metric, MetricKind};

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

    pub fn render(&self, map: &PortMap, status: &Status, out: &mut String) {
        use MetricKind::{Counter, Gauge};
        let events: Vec<_> = KINDS
            .iter()
            .enumerate()
            .map(|(i, (_, name))| (format!("kind=\"{name}\""), self.events[i].load(Relaxed) as f64))
            .collect();
        write_metric(out, "polarstack_ports_events_total", "eBPF events received, by hook.", Counter, &events);
        let one = |v: u64| [(String::new(), v as f64)];
        let kernel = *self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        write_metric(
            out,
            "polarstack_ports_foreign_netns_events_total",
            "Events from other network namespaces, dropped: in the kernel, or by the daemon (a backstop that should stay 0).",
            Counter,
            &[
                ("where=\"kernel\"".into(), kernel.foreign as f64),
                ("where=\"daemon\"".into(), self.foreign_daemon.load(Relaxed) as f64),
            ],
        );
        write_metric(
            out,
            "polarstack_ports_netns_unknown_events_total",
            "Events from hooks that cannot read namespace cookies on this kernel, each checked with a dump.",
            Counter,
            &one(kernel.netns_unknown),
        );
        write_metric(
            out,
            "polarstack_ports_lost_events_total",
            "Events the kernel dropped because the ring buffer was full (each forces a resync).",
            Counter,
            &one(kernel.ring_full),
        );
        write_metric(
            out,
            "polarstack_ports_untracked_sockets_total",
            "Sockets the kernel's tracking table had no room for (their close is not reported), and sockets found by dumps that could not be entered.",
            Counter,
            &[
                ("where=\"kernel\"".into(), kernel.track_full as f64),
                ("where=\"seed\"".into(), self.seed_failures.load(Relaxed) as f64),
            ],
        );
        write_metric(
            out,
            "polarstack_ports_undecodable_events_total",
            "Ring-buffer records the daemon could not decode (dropped).",
            Counter,
            &one(self.undecodable.load(Relaxed)),
        );
        write_metric(
            out,
            "polarstack_ports_dumps_total",
            "sock_diag dumps, by scope: full (every table), fast (listeners and UDP), ports (verification).",
            Counter,
            &[
                ("scope=\"full\"".into(), self.dumps_full.load(Relaxed) as f64),
                ("scope=\"fast\"".into(), self.dumps_fast.load(Relaxed) as f64),
                ("scope=\"ports\"".into(), self.dumps_ports.load(Relaxed) as f64),
            ],
        );
        write_metric(
            out,
            "polarstack_ports_dump_errors_total",
            "sock_diag dumps that failed (the map is kept as it was).",
            Counter,
            &one(self.dump_errors.load(Relaxed)),
        );
        let (added, removed) = self.repairs();
        write_metric(
            out,
            "polarstack_ports_resync_repairs_total",
            "Sockets a periodic resync found missing from (added) or stale in (removed) the map.",
            Counter,
            &[("kind=\"added\"".into(), added as f64), ("kind=\"removed\"".into(), removed as f64)],
        );
        write_metric(
            out,
            "polarstack_ports_last_full_dump_seconds",
            "Duration of the last full sock_diag dump.",
            Gauge,
            &[(String::new(), self.last_full_dump_ns.load(Relaxed) as f64 / 1e9)],
        );
        write_metric(
            out,
            "polarstack_ports_sockets",
            "Sockets holding a port in the watched namespace.",
            Gauge,
            &one(map.len() as u64),
        );
        let taken: Vec<_> = Proto::ALL.iter().map(|p| (format!("proto=\"{p}\""), map.taken_count(*p) as f64)).collect();
        write_metric(out, "polarstack_ports_taken", "Distinct taken ports.", Gauge, &taken);
        let (ebpf, snapshot) = match status.mode {
            Mode::Ebpf => (1.0, 0.0),
            Mode::SnapshotOnly { .. } => (0.0, 1.0),
        };
        write_metric(
            out,
            "polarstack_ports_mode",
            "How the port map is fed: 1 for the active mode (snapshot-only means degraded).",
            Gauge,
            &[("mode=\"ebpf\"".into(), ebpf), ("mode=\"snapshot-only\"".into(), snapshot)],
        );
        let hooks: Vec<_> = status
            .kernel
            .hooks
            .iter()
            .map(|h| (format!("hook=\"{}\"", h.hook), f64::from(u8::from(h.attached))))
            .collect();
        write_metric(
            out,
            "polarstack_ports_hook_attached",
            "1 for each eBPF hook this kernel accepted, 0 for each it refused (see /readyz for the reason).",
            Gauge,
            &hooks,
        );
        let blind: Vec<_> = BlindSpot::KINDS
            .iter()
            .map(|k| {
                let on = status.blind_spots.iter().any(|b| b.kind() == *k);
                (format!("kind=\"{k}\""), f64::from(u8::from(on)))
            })
            .collect();
        write_metric(
            out,
            "polarstack_ports_blind_spot",
            "1 for each kind of socket this kernel hides from the daemon (answers it could change are uncertain).",
            Gauge,
            &blind,
        );
        write_metric(
            out,
            "polarstack_ports_unverifiable_ports",
            "Ports held by bound sockets whose release cannot be observed (tracking table full, dumps blind).",
            Gauge,
            &one(status.unverifiable.len() as u64),
        );
        write_metric(
            out,
            "polarstack_ports_ready",
            "1 once the first full dump is merged.",
            Gauge,
            &one(status.ready as u64),
        );
        write_metric(
            out,
            "polarstack_ports_stale",
            "1 while lost events await a repairing resync (nothing is reported free).",
            Gauge,
            &one(status.stale as u64),
        );
    }
}
