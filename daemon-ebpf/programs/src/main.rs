//! The kernel half of the port map: hooks that report every way a socket comes
//! to hold or give up a local port, written to one ring buffer.
//!
//! - cgroup bind4/6 (before the bind) note the socket's SO_REUSEADDR, which
//!   decides whether a bound socket blocks a PostgreSQL-style listener;
//!   post_bind4/6 then report the explicit, successful bind().
//! - sock_ops TCP_LISTEN_CB / TCP_CONNECT_CB: listen() and connect(), which
//!   may pick a port themselves (autobind) without any bind() call.
//! - cgroup sock_release: the owner closes a bound or listening socket. Its
//!   context has no port, so those sockets are remembered in `TRACKED` (by
//!   cookie). Connected sockets are not: their close leaves the port held
//!   (FIN_WAIT, TIME_WAIT) and only the daemon's periodic dump sees it end.
//! - tracepoint sock/inet_sock_set_state: TCP sockets entering or leaving
//!   LISTEN (also for sockets that predate the daemon).
//!
//! The daemon trusts events that add a port and treats the others as hints:
//! a port leaves its map only after a sock_diag dump confirms it is gone, so a
//! lost or reordered event can make a port look busy for a while, never free.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext, SockOpsContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use polarstack_ebpf_common::{
    EventKind, PortEvent, TrackedSocket, AF_INET, AF_INET6, CONFIG_LEN, CONFIG_NETNS_COOKIE, DEFAULT_RING_BYTES,
    IPPROTO_TCP, REUSE_OFF, REUSE_ON, REUSE_UNKNOWN, TCP_LISTEN, TRACKED_MAX_ENTRIES,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map]
static TRACKED: LruHashMap<u64, TrackedSocket> = LruHashMap::with_max_entries(TRACKED_MAX_ENTRIES, 0);

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_LEN, 0);

#[map]
static REUSE: LruHashMap<u64, u8> = LruHashMap::with_max_entries(TRACKED_MAX_ENTRIES, 0);

const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;

/// SO_REUSEADDR of the socket behind `ctx`, for program types that may call
/// bpf_getsockopt (sock_ops, and cgroup bind4/6).
#[inline(always)]
fn reuse_of<C: EbpfContext>(ctx: &C) -> u8 {
    let mut val: i32 = 0;
    // SAFETY: the helper writes at most 4 bytes into `val`.
    let rc = unsafe { bpf_getsockopt(ctx.as_ptr(), SOL_SOCKET, SO_REUSEADDR, (&mut val as *mut i32).cast(), 4) };
    match (rc, val) {
        (0, 0) => REUSE_OFF,
        (0, _) => REUSE_ON,
        _ => REUSE_UNKNOWN,
    }
}

/// Before a bind: remember SO_REUSEADDR for post_bind, which cannot ask.
#[inline(always)]
fn pre_bind(ctx: &SockAddrContext) -> i32 {
    let (watched, _) = in_watched_netns(ctx);
    if watched {
        // SAFETY: ctx is valid for the helper.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = REUSE.insert(cookie, reuse_of(ctx), 0);
    }
    1 // allow: we observe, never enforce
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    pre_bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    pre_bind(&ctx)
}

/// True when the socket behind `ctx` belongs to the namespace the daemon
/// watches (or when no namespace was configured).
#[inline(always)]
fn in_watched_netns<C: EbpfContext>(ctx: &C) -> (bool, u64) {
    // SAFETY: ctx is the program's own context, valid for the helper.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let want = CONFIG.get(CONFIG_NETNS_COOKIE).copied().unwrap_or(0);
    (want == 0 || want == cookie, cookie)
}

/// Fills the task fields (pid, comm, cgroup) from the current task.
#[inline(always)]
fn with_task(mut e: PortEvent) -> PortEvent {
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: plain helper call without arguments.
    e.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if let Ok(comm) = bpf_get_current_comm() {
        e.comm = comm;
    }
    e
}

#[inline(always)]
fn submit(e: &PortEvent) {
    if EVENTS.output::<PortEvent>(e, 0).is_err() {
        // The daemon reads this counter and resyncs from sock_diag at once.
        if let Some(n) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *n += 1 };
        }
    }
}

/// Remembers a port-holding socket so its release can be reported.
#[inline(always)]
fn track<C: EbpfContext>(ctx: &C, e: &PortEvent) {
    let t = TrackedSocket { port: e.port, family: e.family, proto: e.proto, _pad: [0; 4] };
    if let Err(err) = TRACKED.insert(e.sock_cookie, t, 0) {
        debug!(ctx, "TRACKED insert failed: {}", err);
    }
}

#[inline(always)]
fn post_bind<const V6: bool>(ctx: &SockContext) -> i32 {
    let (watched, netns) = in_watched_netns(ctx);
    if !watched {
        return 1;
    }
    // SAFETY: the kernel passes a valid bpf_sock for cgroup_sock programs.
    let sk = unsafe { &*ctx.sock };
    let mut e = PortEvent::ZERO;
    e.kind = EventKind::Bind as u8;
    e.netns_cookie = netns;
    // SAFETY: ctx is valid for the helper.
    e.sock_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(r) = unsafe { REUSE.get(&e.sock_cookie) } {
        e.reuse = *r;
    }
    let _ = REUSE.remove(&e.sock_cookie);
    e.port = sk.src_port as u16; // host byte order in bpf_sock
    e.family = sk.family as u8;
    e.proto = sk.protocol as u8;
    // The verifier lets post_bind4 read only src_ip4 and post_bind6 only
    // src_ip6, hence the compile-time split.
    if V6 {
        let a = sk.src_ip6;
        for (i, w) in a.iter().enumerate() {
            e.addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    } else {
        e.addr[..4].copy_from_slice(&sk.src_ip4.to_ne_bytes());
    }
    let e = with_task(e);
    track(ctx, &e);
    submit(&e);
    1 // allow the bind: we observe, never enforce
}

#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    post_bind::<false>(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    post_bind::<true>(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: ctx is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(t) = (unsafe { TRACKED.get(&cookie) }).copied() else {
        return 1; // never held a port we reported: nothing to say
    };
    let _ = TRACKED.remove(&cookie);
    let (watched, netns) = in_watched_netns(&ctx);
    if !watched {
        return 1;
    }
    let mut e = PortEvent::ZERO;
    e.kind = EventKind::Release as u8;
    e.netns_cookie = netns;
    e.sock_cookie = cookie;
    e.port = t.port;
    e.family = t.family;
    e.proto = t.proto;
    submit(&with_task(e));
    1
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let kind = match op {
        BPF_SOCK_OPS_TCP_LISTEN_CB => EventKind::Listen,
        BPF_SOCK_OPS_TCP_CONNECT_CB => EventKind::Connect,
        _ => return 1,
    };
    let (watched, netns) = in_watched_netns(&ctx);
    if !watched {
        return 1;
    }
    let mut e = PortEvent::ZERO;
    e.kind = kind as u8;
    e.netns_cookie = netns;
    // SAFETY: ctx is valid for the helper.
    e.sock_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    e.port = ctx.local_port() as u16; // host byte order in bpf_sock_ops
    e.family = ctx.family() as u8;
    e.proto = IPPROTO_TCP;
    e.reuse = reuse_of(&ctx);
    if e.family == AF_INET {
        e.addr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
    } else if e.family == AF_INET6 {
        let a = ctx.local_ip6();
        for (i, w) in a.iter().enumerate() {
            e.addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }
    let e = with_task(e);
    if kind == EventKind::Listen {
        track(&ctx, &e);
    }
    submit(&e);
    1
}

// Field offsets from /sys/kernel/tracing/events/sock/inet_sock_set_state/format,
// a stable tracepoint ABI.
const TP_OLDSTATE: usize = 16;
const TP_NEWSTATE: usize = 20;
const TP_SPORT: usize = 24;
const TP_FAMILY: usize = 28;
const TP_PROTOCOL: usize = 30;
const TP_SADDR: usize = 32;
const TP_SADDR_V6: usize = 40;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets and sizes match the tracepoint's published format.
    unsafe {
        let (Ok(old), Ok(new), Ok(proto)) =
            (ctx.read_at::<i32>(TP_OLDSTATE), ctx.read_at::<i32>(TP_NEWSTATE), ctx.read_at::<u16>(TP_PROTOCOL))
        else {
            return 0;
        };
        let (old, new) = (old as u8, new as u8);
        if proto != IPPROTO_TCP as u16 || !(old == TCP_LISTEN || new == TCP_LISTEN) {
            return 0;
        }
        let mut e = PortEvent::ZERO;
        e.kind = EventKind::State as u8;
        e.old_state = old;
        e.new_state = new;
        e.proto = IPPROTO_TCP;
        e.port = ctx.read_at::<u16>(TP_SPORT).unwrap_or(0);
        e.family = ctx.read_at::<u16>(TP_FAMILY).unwrap_or(0) as u8;
        // Separate reads per family: a merged memcpy becomes a modified ctx
        // pointer, which the verifier rejects.
        if e.family == AF_INET {
            if let Ok(a) = ctx.read_at::<[u8; 4]>(TP_SADDR) {
                e.addr[..4].copy_from_slice(&a);
            }
        } else if let Ok(a) = ctx.read_at::<[u8; 16]>(TP_SADDR_V6) {
            e.addr = a;
        }
        e.ts_ns = bpf_ktime_get_ns();
        // State changes often run in softirq context: no meaningful task, so
        // pid/comm/cgroup stay 0 and the daemon keeps what bind/listen said.
        submit(&e);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
