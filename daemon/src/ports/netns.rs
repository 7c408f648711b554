//! The identity of the network namespace the daemon watches: its own.
use std::io;

/// SO_NETNS_COOKIE (Linux 5.14+); libc does not name it on every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of this process's network namespace, the same value the eBPF
/// programs read with bpf_get_netns_cookie(). In production that is the host's
/// namespace (hostNetwork); in tests, the test's namespace.
pub fn own_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket syscalls on a descriptor this function owns and
    // closes; the output buffer is a local u64 of the length passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns(), so event
/// times and dump start times can be compared.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec passed.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn cookie_is_stable_and_nonzero() {
        let a = super::own_netns_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0);
        assert_eq!(super::own_netns_cookie().ok(), Some(a));
    }
}
