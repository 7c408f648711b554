//! The clock the kernel stamps events with.

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns(), so event
/// times and dump start times can be compared.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec passed.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
