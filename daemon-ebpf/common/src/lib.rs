//! The contract between the eBPF programs and the daemon: the event record
//! written to the ring buffer, the per-socket record kept in the kernel, and
//! the names of the maps and programs. Both sides compile this crate, so a
//! layout change cannot leave one side behind.
#![no_std]

/// Ring buffer of [`PortEvent`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// LRU hash: socket cookie -> [`TrackedSocket`]; lets `sock_release` (whose
/// context carries no port) say which port a closing socket held.
pub const MAP_TRACKED: &str = "TRACKED";
/// Per-CPU counter of events dropped because the ring buffer was full.
pub const MAP_LOST: &str = "LOST";
/// Array of settings written by the daemon before attaching (see `CONFIG_*`).
pub const MAP_CONFIG: &str = "CONFIG";
/// LRU hash: socket cookie -> SO_REUSEADDR as seen just before bind(), for
/// post_bind (which cannot call bpf_getsockopt) to report.
pub const MAP_REUSE: &str = "REUSE";

/// `CONFIG[CONFIG_NETNS_COOKIE]`: only sockets of this network namespace are
/// reported (0 reports every namespace).
pub const CONFIG_NETNS_COOKIE: u32 = 0;
pub const CONFIG_LEN: u32 = 1;

/// Default ring buffer size; the daemon may override it at load time.
pub const DEFAULT_RING_BYTES: u32 = 256 * 1024;
/// Sockets remembered for release correlation; the LRU evicts the oldest,
/// which only delays (never loses) that socket's removal until a resync.
pub const TRACKED_MAX_ENTRIES: u32 = 65536;

/// Program names, as the daemon looks them up in the object.
pub const PROG_BIND4: &str = "bind4";
pub const PROG_BIND6: &str = "bind6";
pub const PROG_POST_BIND4: &str = "post_bind4";
pub const PROG_POST_BIND6: &str = "post_bind6";
pub const PROG_SOCK_RELEASE: &str = "sock_release";
pub const PROG_SOCK_OPS: &str = "sock_ops";
pub const PROG_SET_STATE: &str = "inet_sock_set_state";

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
    /// TCP state change into or out of LISTEN (tracepoint
    /// sock/inet_sock_set_state). Carries no cookie or netns.
    State = 5,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Bind,
            2 => Self::Release,
            3 => Self::Listen,
            4 => Self::Connect,
            5 => Self::State,
            _ => return None,
        })
    }
}

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
    /// cgroup v2 id of the task that caused the event (0 in softirq context).
    pub cgroup_id: u64,
    /// tgid of the current task; 0 when there is none.
    pub pid: u32,
    /// Local port, host byte order.
    pub port: u16,
    pub kind: u8,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u8,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub proto: u8,
    /// Kernel TCP states (TCP_ESTABLISHED = 1 ... ) for `State` events.
    pub old_state: u8,
    pub new_state: u8,
    /// SO_REUSEADDR of the socket: one of `REUSE_*`. A socket with it set
    /// that is not listening does not stop a SO_REUSEADDR listener.
    pub reuse: u8,
    pub _pad: [u8; 4],
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Task command name, NUL padded.
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
        old_state: 0,
        new_state: 0,
        reuse: REUSE_UNKNOWN,
        _pad: [0; 4],
        addr: [0; 16],
        comm: [0; 16],
    };
}

const _: () = assert!(core::mem::size_of::<PortEvent>() == 80);

/// What the kernel remembers about a socket that holds a port, keyed by its
/// cookie, so that its release can name the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedSocket {
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<TrackedSocket>() == 8);

pub const REUSE_UNKNOWN: u8 = 0;
pub const REUSE_OFF: u8 = 1;
pub const REUSE_ON: u8 = 2;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const TCP_LISTEN: u8 = 10;

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)], Copy, contain only integers and byte arrays,
    // and have no implicit padding (sizes asserted above), so every bit pattern
    // is valid and they may be copied to and from kernel maps as plain bytes.
    unsafe impl aya::Pod for super::PortEvent {}
    unsafe impl aya::Pod for super::TrackedSocket {}
}
