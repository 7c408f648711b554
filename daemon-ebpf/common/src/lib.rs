//! The contract between the eBPF programs and the daemon: the event record
//! written to the ring buffer, the per-socket record kept in the kernel, the
//! names of maps, programs and globals, and the feature bits the loader sets.
//! Both sides compile this crate, so a layout change cannot leave one side
//! behind.
#![no_std]

/// Ring buffer of [`PortEvent`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Hash: socket cookie -> [`TrackedSocket`], for every socket of the watched
/// namespace whose close frees its port at once (bound, listening, UDP). It
/// lets `sock_release` (whose context carries no port) name the port, and it
/// is the kernel's own record of bound TCP sockets on kernels whose sock_diag
/// cannot list them (before 6.5). Not an LRU: an entry leaves only when its
/// socket is released, so absence means released; a full map is counted
/// ([`COUNTER_TRACK_FULL`]) and flagged on the event ([`FLAG_UNTRACKED`]).
pub const MAP_TRACKED: &str = "TRACKED";
/// Per-CPU counters, indexed by `COUNTER_*`.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Array of settings shared with the daemon, indexed by `CONFIG_*`.
pub const MAP_CONFIG: &str = "CONFIG";
/// LRU hash: socket cookie -> SO_REUSEADDR as seen just before bind(), for
/// post_bind (which cannot call bpf_getsockopt) to report.
pub const MAP_REUSE: &str = "REUSE";

/// `CONFIG[CONFIG_NETNS_COOKIE]`: the cookie of the watched network
/// namespace. The kernel side learns it (see [`CONFIG_PROBE_COOKIE`]); until
/// then it is 0 and nothing is reported, so no event of another namespace
/// can slip through while the filter is being set up.
pub const CONFIG_NETNS_COOKIE: u32 = 0;
/// `CONFIG[CONFIG_PROBE_COOKIE]`: the socket cookie of a probe socket the
/// daemon binds in its own namespace right after attaching. The first hook
/// that sees that socket (and can read namespace cookies) stores its
/// namespace's cookie in [`CONFIG_NETNS_COOKIE`]. This works on every kernel
/// where the hooks can read namespace cookies (5.7+), unlike
/// getsockopt(SO_NETNS_COOKIE), which needs 5.14.
pub const CONFIG_PROBE_COOKIE: u32 = 1;
pub const CONFIG_LEN: u32 = 2;

/// Events the ring buffer had no room for (each forces a resync).
pub const COUNTER_RING_FULL: u32 = 0;
/// Sockets that could not be entered in `TRACKED` (map full): their close
/// will not be reported.
pub const COUNTER_TRACK_FULL: u32 = 1;
/// Events of other network namespaces dropped in the kernel.
pub const COUNTER_FOREIGN: u32 = 2;
/// Events whose namespace the hook could not tell (sock_ops before 5.15):
/// sent with [`FLAG_NETNS_UNKNOWN`] for the daemon to check with a dump.
pub const COUNTER_NETNS_UNKNOWN: u32 = 3;
pub const COUNTERS_LEN: u32 = 4;

/// Default ring buffer size; the daemon may override it at load time.
pub const DEFAULT_RING_BYTES: u32 = 256 * 1024;
/// Default capacity of `TRACKED` (the daemon may override it at load time).
pub const TRACKED_MAX_ENTRIES: u32 = 65536;
/// Capacity of `REUSE`: an entry lives from a bind attempt to its post_bind.
pub const REUSE_MAX_ENTRIES: u32 = 16384;

/// Program names, as the daemon looks them up in the object.
pub const PROG_BIND4: &str = "bind4";
pub const PROG_BIND6: &str = "bind6";
pub const PROG_POST_BIND4: &str = "post_bind4";
pub const PROG_POST_BIND6: &str = "post_bind6";
pub const PROG_SOCK_RELEASE: &str = "sock_release";
pub const PROG_SOCK_OPS: &str = "sock_ops";
pub const PROG_BOUND_SOCKETS: &str = "bound_sockets";

/// Globals (read-only data) the loader sets before the programs are
/// verified: which optional helpers each program may call on the running
/// kernel, as `FEAT_*` bits. The verifier sees them as constants and never
/// checks the code behind a cleared bit, so one object loads on every kernel.
pub const GLOBAL_FEAT_BIND: &str = "FEAT_BIND";
pub const GLOBAL_FEAT_POST_BIND: &str = "FEAT_POST_BIND";
pub const GLOBAL_FEAT_SOCK_OPS: &str = "FEAT_SOCK_OPS";
/// [`IterOffsets`] for the socket iterator, from the running kernel's BTF.
pub const GLOBAL_ITER_OFFSETS: &str = "ITER_OFFSETS";

/// bpf_get_current_pid_tgid: the owner's pid.
pub const FEAT_PID: u32 = 1;
/// bpf_get_current_comm: the owner's command name.
pub const FEAT_COMM: u32 = 2;
/// bpf_get_current_cgroup_id: the owner's cgroup (its container).
pub const FEAT_CGROUP: u32 = 4;
/// bpf_get_netns_cookie: the socket's network namespace.
pub const FEAT_NETNS: u32 = 8;
/// bpf_getsockopt: the socket's SO_REUSEADDR (cgroup bind hooks: 5.13+).
pub const FEAT_GETSOCKOPT: u32 = 16;

/// What happened to a socket. Values are stable: they cross the ring buffer.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Explicit successful bind() (cgroup post_bind4/6). The port is held.
    Bind = 1,
    /// A tracked socket is being closed by its owner (cgroup sock_release).
    /// The port may outlive it (TIME_WAIT), so this is a hint to verify.
    Release = 2,
    /// listen() succeeded (sock_ops TCP_LISTEN_CB), including an autobind.
    Listen = 3,
    /// connect() assigned a local port (sock_ops TCP_CONNECT_CB).
    Connect = 4,
    /// A listener left LISTEN without being released (close, shutdown):
    /// sock_ops STATE_CB, which the Listen hook enables on each listener.
    Unlisten = 5,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Bind,
            2 => Self::Release,
            3 => Self::Listen,
            4 => Self::Connect,
            5 => Self::Unlisten,
            _ => return None,
        })
    }
}

/// [`PortEvent::flags`]: the socket could not be entered in `TRACKED`, so
/// its release will not be reported.
pub const FLAG_UNTRACKED: u8 = 1;
/// [`PortEvent::flags`]: the hook could not tell the socket's namespace;
/// the daemon must check the socket is its own before using the event.
pub const FLAG_NETNS_UNKNOWN: u8 = 2;

/// One ring-buffer record (80 bytes, no implicit padding).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PortEvent {
    /// bpf_ktime_get_ns(): CLOCK_MONOTONIC, comparable with userspace.
    pub ts_ns: u64,
    /// Socket cookie (the same value sock_diag reports); 0 when unknown.
    pub sock_cookie: u64,
    /// Network namespace cookie; 0 when the hook cannot tell.
    pub netns_cookie: u64,
    /// cgroup v2 id of the task that caused the event (0 when unknown).
    pub cgroup_id: u64,
    /// tgid of the current task; 0 when unknown.
    pub pid: u32,
    /// Local port, host byte order.
    pub port: u16,
    pub kind: u8,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u8,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub proto: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// SO_REUSEADDR of the socket: one of `REUSE_*`. A socket with it set
    /// that is not listening does not stop a SO_REUSEADDR listener.
    pub reuse: u8,
    pub _pad: [u8; 5],
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Task command name, NUL padded; empty when unknown.
    pub comm: [u8; 16],
}

impl PortEvent {
    pub const ZERO: Self = Self {
        ts_ns: 0,
        sock_cookie: 0,
        netns_cookie: 0,
        cgroup_id: 0,
        pid: 0,
        port: 0,
        kind: 0,
        family: 0,
        proto: 0,
        flags: 0,
        reuse: REUSE_UNKNOWN,
        _pad: [0; 5],
        addr: [0; 16],
        comm: [0; 16],
    };
}

const _: () = assert!(core::mem::size_of::<PortEvent>() == 80);

/// What the kernel remembers about a socket that holds a port, keyed by its
/// cookie, so that its release can name the port and so that the daemon can
/// recover bound sockets whose events were lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedSocket {
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 4],
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<TrackedSocket>() == 24);

/// Where the socket iterator (`bound_sockets`, an iter/task_file program)
/// finds what it reads in kernel memory: byte offsets of fields, computed
/// by the daemon from the running kernel's BTF (what CO-RE relocations do for
/// C programs), and the inode number of the watched network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IterOffsets {
    pub file_inode: u32,
    pub file_private_data: u32,
    pub inode_mode: u32,
    pub inode_ino: u32,
    pub socket_sk: u32,
    pub sk_family: u32,
    pub sk_state: u32,
    pub sk_num: u32,
    pub sk_rcv_saddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_net: u32,
    pub sk_cookie: u32,
    pub sk_protocol: u32,
    pub net_ns_inum: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    /// Not an offset: the watched namespace's inode number (0: iterator off).
    pub watched_netns_inum: u32,
    pub _pad: u32,
}

impl IterOffsets {
    pub const ZERO: Self = Self {
        file_inode: 0,
        file_private_data: 0,
        inode_mode: 0,
        inode_ino: 0,
        socket_sk: 0,
        sk_family: 0,
        sk_state: 0,
        sk_num: 0,
        sk_rcv_saddr: 0,
        sk_v6_rcv_saddr: 0,
        sk_net: 0,
        sk_cookie: 0,
        sk_protocol: 0,
        net_ns_inum: 0,
        task_tgid: 0,
        task_comm: 0,
        watched_netns_inum: 0,
        _pad: 0,
    };
}

/// One TCP socket of the watched namespace that is bound but neither
/// listening nor connected, as the iterator found it in a task's files.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IterRecord {
    /// The socket cookie, or 0 when none was ever asked for.
    pub cookie: u64,
    /// The socket's inode number (as sock_diag reports it).
    pub ino: u64,
    /// The task holding it.
    pub tgid: u32,
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<IterRecord>() == 56);
const _: () = assert!(core::mem::size_of::<IterOffsets>() == 72);

pub const REUSE_UNKNOWN: u8 = 0;
pub const REUSE_OFF: u8 = 1;
pub const REUSE_ON: u8 = 2;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const TCP_LISTEN: u8 = 10;
pub const TCP_CLOSE: u8 = 7;

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)], Copy, contain only integers and byte arrays,
    // and have no implicit padding (sizes asserted above), so every bit pattern
    // is valid and they may be copied to and from kernel maps as plain bytes.
    unsafe impl aya::Pod for super::PortEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrackedSocket {}
    // SAFETY: as above (u32 fields only, size asserted).
    unsafe impl aya::Pod for super::IterOffsets {}
}
