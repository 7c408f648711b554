//! Running the socket iterator (`bound_sockets`, an iter/task_file program):
//! the way to list TCP sockets that are bound but neither listening nor
//! connected on kernels whose sock_diag cannot (before 6.5).
//!
//! Each run creates a link and an iterator from the loaded program and reads
//! the iterator to its end. The two bpf() calls are made here, not through
//! aya, so the run can happen on the dumper thread with a duplicate of the
//! program's descriptor while the probes stay with the tracker.
use std::{
    fs::File,
    io::{self, Read},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use polarstack_ebpf_common::IterRecord;

/// `enum bpf_cmd` and `enum bpf_attach_type` values (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// The init PID namespace's inode number (PROC_PID_INIT_INO): the iterator
/// walks the tasks of the namespace that creates it, so only there does it
/// see every socket of the host.
#[cfg(feature = "ebpf")]
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// A loaded iterator program, ready to run.
pub struct BoundIter {
    prog: OwnedFd,
}

impl BoundIter {
    pub fn new(prog: OwnedFd) -> Self {
        Self { prog }
    }

    /// Every bound-only TCP socket of the watched namespace in every task's
    /// open files, now (a socket open in several tasks comes once per task).
    pub fn read(&self) -> io::Result<Vec<IterRecord>> {
        let link = bpf_fd(BPF_LINK_CREATE, &link_create_attr(self.prog.as_raw_fd()))?;
        let iter = bpf_fd(BPF_ITER_CREATE, &iter_create_attr(link.as_raw_fd()))?;
        let mut raw = Vec::new();
        File::from(iter).read_to_end(&mut raw)?;
        let size = std::mem::size_of::<IterRecord>();
        Ok(raw
            .chunks_exact(size)
            // SAFETY: IterRecord is plain old data (integers and byte arrays,
            // no padding), so any bytes of its size are a valid value;
            // read_unaligned copes with the Vec's alignment.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<IterRecord>()) })
            .collect())
    }
}

/// Whether this process is in the host's PID namespace (hostPID in a pod).
#[cfg(feature = "ebpf")]
pub fn in_host_pid_namespace() -> bool {
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == INIT_PID_NS_INO)
}

/// The inode number of this process's network namespace (what `net.ns.inum`
/// holds in the kernel).
#[cfg(feature = "ebpf")]
pub fn own_netns_inum() -> io::Result<u32> {
    let m = std::fs::metadata("/proc/thread-self/ns/net")?;
    u32::try_from(std::os::unix::fs::MetadataExt::ino(&m)).map_err(|_| io::Error::other("netns inode above 32 bits"))
}

/// `union bpf_attr` is at most a few hundred bytes; a zeroed buffer of this
/// size with the fields set is accepted by every kernel (the tail must be 0).
type Attr = [u8; 128];

fn link_create_attr(prog_fd: i32) -> Attr {
    // struct { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; ... }
    let mut a = [0u8; 128];
    a[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
    a[8..12].copy_from_slice(&BPF_TRACE_ITER.to_ne_bytes());
    a
}

fn iter_create_attr(link_fd: i32) -> Attr {
    // struct { u32 link_fd; u32 flags; }
    let mut a = [0u8; 128];
    a[0..4].copy_from_slice(&(link_fd as u32).to_ne_bytes());
    a
}

fn bpf_fd(cmd: libc::c_long, attr: &Attr) -> io::Result<OwnedFd> {
    // SAFETY: bpf(2) reads `attr` (a local of the length passed) and returns
    // a new descriptor or -1; the descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len() as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
