//! The live event source of the port map, behind one type whether or not the
//! daemon is built with eBPF, so the owner task has no feature switches:
//! without eBPF, [`Probes`] has no values and every method is unreachable.
#[cfg(feature = "ebpf")]
pub use super::ebpf::Probes;
use super::map::Event;

/// The kernel side's counters (see `COUNTER_*` in the shared crate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events the ring buffer had no room for.
    pub ring_full: u64,
    /// Sockets the tracking table had no room for.
    pub track_full: u64,
    /// Events of other namespaces dropped in the kernel.
    pub foreign: u64,
    /// Events whose namespace the hook could not tell.
    pub netns_unknown: u64,
}

/// A ring-buffer record the daemon could not use.
#[cfg(feature = "ebpf")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event")]
    Short(usize),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown protocol {0}")]
    Proto(u8),
    #[error("unknown address family {0}")]
    Family(u8),
}

/// Waits for ring-buffer records and decodes them into `batch`; returns how
/// many records could not be decoded. Pending forever without probes.
pub async fn next(probes: &mut Option<Probes>, batch: &mut Vec<Event>) -> std::io::Result<usize> {
    match probes.as_mut() {
        Some(p) => p.next_batch(batch).await,
        None => std::future::pending().await,
    }
}

#[cfg(not(feature = "ebpf"))]
pub use self::none::Probes;

#[cfg(not(feature = "ebpf"))]
mod none {
    use polarstack_ebpf_common::TrackedSocket;

    use super::{Event, KernelCounters};
    use crate::ports::kernel::HookStatus;

    /// Built without eBPF: there are never probes.
    pub enum Probes {}

    impl Probes {
        pub async fn next_batch(&mut self, _: &mut Vec<Event>) -> std::io::Result<usize> {
            match *self {}
        }
        pub fn drain(&mut self, _: &mut Vec<Event>) -> usize {
            match *self {}
        }
        pub fn counters(&self) -> KernelCounters {
            match *self {}
        }
        pub fn track(&mut self, _: u64, _: TrackedSocket) -> bool {
            match *self {}
        }
        pub fn untrack(&mut self, _: u64) {
            match *self {}
        }
        pub fn tracked_sockets(&self) -> Vec<(u64, TrackedSocket)> {
            match *self {}
        }
        pub fn hooks(&self) -> &[HookStatus] {
            match *self {}
        }
        pub fn netns_cookie(&self) -> u64 {
            match *self {}
        }
        pub fn take_bound_iter(&mut self) -> Option<crate::ports::iter::BoundIter> {
            match *self {}
        }
    }
}
