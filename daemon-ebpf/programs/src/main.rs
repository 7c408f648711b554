//! The kernel half of the port map: hooks that report every way a socket of
//! the watched network namespace comes to hold or give up a local port,
//! written to one ring buffer.
//!
//! - cgroup bind4/6 (before the bind) note the socket's SO_REUSEADDR, which
//!   decides whether a bound socket blocks a PostgreSQL-style listener;
//!   post_bind4/6 then report the explicit, successful bind().
//! - sock_ops TCP_LISTEN_CB / TCP_CONNECT_CB: listen() and connect(), which
//!   may pick a port themselves (autobind) without any bind() call. On each
//!   listener the Listen hook switches on sock_ops' state callback, so a
//!   listener that stops listening without a release (shutdown()) is
//!   reported too; accepted connections have it switched off again.
//! - cgroup sock_release: the owner closes a bound or listening socket. Its
//!   context has no port, so those sockets are remembered in `TRACKED` (by
//!   cookie). Connected sockets are not: their close leaves the port held
//!   (FIN_WAIT, TIME_WAIT) and only the daemon's periodic dump sees it end.
//!
//! Kernels differ in which helpers each program type may call (the task
//! helpers in sock_ops, namespace cookies before 5.15, ...). The loader
//! probes the running kernel and sets the `FEAT_*` globals; code behind a
//! cleared bit is dead to the verifier, so one object loads everywhere and a
//! missing helper costs a field (the owner), not the hook.
//!
//! Events of other network namespaces never enter the ring buffer: every hook
//! filters on the namespace cookie the kernel side learned from the daemon's
//! probe socket (see `CONFIG_PROBE_COOKIE`). Where a hook cannot read
//! namespace cookies, the event is flagged and the daemon checks it.
//!
//! The daemon trusts events that add a port and treats the others as hints:
//! a port leaves its map only after a sock_diag dump (or, where dumps are
//! blind, the socket's release) confirms it is gone, so a lost or reordered
//! event can make a port look busy for a while, never free.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext, Global,
};
use polarstack_ebpf_common::{
    EventKind, IterOffsets, IterRecord, PortEvent, TrackedSocket, AF_INET, AF_INET6, CONFIG_LEN, CONFIG_NETNS_COOKIE,
    CONFIG_PROBE_COOKIE, COUNTERS_LEN, COUNTER_FOREIGN, COUNTER_NETNS_UNKNOWN, COUNTER_RING_FULL, COUNTER_TRACK_FULL,
    DEFAULT_RING_BYTES, FEAT_CGROUP, FEAT_COMM, FEAT_GETSOCKOPT, FEAT_NETNS, FEAT_PID, FLAG_NETNS_UNKNOWN,
    FLAG_UNTRACKED, IPPROTO_TCP, REUSE_MAX_ENTRIES, REUSE_OFF, REUSE_ON, REUSE_UNKNOWN, TCP_CLOSE, TCP_LISTEN,
    TRACKED_MAX_ENTRIES,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

// No preallocation: the map is sized for the worst case, and most hosts hold
// a few hundred bound sockets.
#[map]
static TRACKED: HashMap<u64, TrackedSocket> = HashMap::with_max_entries(TRACKED_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map]
static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_LEN, 0);

#[map]
static REUSE: LruHashMap<u64, u8> = LruHashMap::with_max_entries(REUSE_MAX_ENTRIES, 0);

/// Optional helpers per hook (`FEAT_*` bits), set by the loader from probes
/// of the running kernel.
#[unsafe(no_mangle)]
static FEAT_BIND: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FEAT_POST_BIND: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FEAT_SOCK_OPS: Global<u32> = Global::new(0);
/// Field offsets for `bound_sockets`, from the running kernel's BTF.
#[unsafe(no_mangle)]
static ITER_OFFSETS: Global<IterOffsets> = Global::new(IterOffsets::ZERO);

const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;

#[inline(always)]
fn count(counter: u32) {
    if let Some(n) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: a per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *n += 1 };
    }
}

/// Whose namespace a socket is in.
enum Netns {
    /// The watched one (its cookie).
    Watched(u64),
    /// Another one, or the watched one is not known yet: drop the event.
    Other,
    /// This hook cannot read namespace cookies on the running kernel.
    Unknown,
}

/// The socket's namespace as seen through `ctx`, learning the watched
/// namespace's cookie from the daemon's probe socket while it is unknown.
#[inline(always)]
fn netns_of<C: EbpfContext>(ctx: &C, feat: u32, sock_cookie: u64) -> Netns {
    if feat & FEAT_NETNS == 0 {
        return Netns::Unknown;
    }
    // SAFETY: ctx is the program's own context, valid for the helper.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(want) = CONFIG.get_ptr_mut(CONFIG_NETNS_COOKIE) else {
        return Netns::Other;
    };
    // SAFETY: an array slot, valid for the life of the map.
    let known = unsafe { *want };
    if known == 0 {
        let probe = CONFIG.get(CONFIG_PROBE_COOKIE).copied().unwrap_or(0);
        if probe != 0 && probe == sock_cookie {
            // SAFETY: as above; only the probe socket ever writes here.
            unsafe { *want = cookie };
            return Netns::Watched(cookie);
        }
        return Netns::Other;
    }
    if known == cookie {
        Netns::Watched(cookie)
    } else {
        Netns::Other
    }
}

/// SO_REUSEADDR of the socket behind `ctx`, where this hook may call
/// bpf_getsockopt on the running kernel (sock_ops always; cgroup bind4/6
/// from 5.13); unknown otherwise, which counts as blocking.
#[inline(always)]
fn reuse_of<C: EbpfContext>(ctx: &C, feat: u32) -> u8 {
    if feat & FEAT_GETSOCKOPT == 0 {
        return REUSE_UNKNOWN;
    }
    let mut val: i32 = 0;
    // SAFETY: the helper writes at most 4 bytes into `val`.
    let rc = unsafe { bpf_getsockopt(ctx.as_ptr(), SOL_SOCKET, SO_REUSEADDR, (&mut val as *mut i32).cast(), 4) };
    match (rc, val) {
        (0, 0) => REUSE_OFF,
        (0, _) => REUSE_ON,
        _ => REUSE_UNKNOWN,
    }
}

/// Fills the task fields the running kernel lets this hook read.
#[inline(always)]
fn with_task(mut e: PortEvent, feat: u32) -> PortEvent {
    // SAFETY: plain helper calls without pointer arguments.
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    if feat & FEAT_PID != 0 {
        e.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    }
    if feat & FEAT_CGROUP != 0 {
        // SAFETY: plain helper call without arguments.
        e.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    }
    if feat & FEAT_COMM != 0 {
        if let Ok(comm) = bpf_get_current_comm() {
            e.comm = comm;
        }
    }
    e
}

#[inline(always)]
fn submit(e: &PortEvent) {
    if EVENTS.output::<PortEvent>(e, 0).is_err() {
        // The daemon reads this counter and resyncs from sock_diag at once.
        count(COUNTER_RING_FULL);
    }
}

/// Remembers a port-holding socket so its release can be reported; flags the
/// event when the map is full.
#[inline(always)]
fn track(e: &mut PortEvent) {
    let t = TrackedSocket { port: e.port, family: e.family, proto: e.proto, _pad: [0; 4], addr: e.addr };
    if TRACKED.insert(e.sock_cookie, t, 0).is_err() {
        e.flags |= FLAG_UNTRACKED;
        count(COUNTER_TRACK_FULL);
    }
}

/// Before a bind: remember SO_REUSEADDR for post_bind, which cannot ask.
#[inline(always)]
fn pre_bind(ctx: &SockAddrContext) -> i32 {
    let feat = FEAT_BIND.load();
    // SAFETY: ctx is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if !matches!(netns_of(ctx, feat, cookie), Netns::Other) && feat & FEAT_GETSOCKOPT != 0 {
        let _ = REUSE.insert(cookie, reuse_of(ctx, feat), 0);
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

#[inline(always)]
fn post_bind<const V6: bool>(ctx: &SockContext) -> i32 {
    let feat = FEAT_POST_BIND.load();
    let mut e = PortEvent::ZERO;
    // SAFETY: ctx is valid for the helper.
    e.sock_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let watched = match netns_of(ctx, feat, e.sock_cookie) {
        Netns::Watched(ns) => {
            e.netns_cookie = ns;
            true
        }
        Netns::Other => {
            count(COUNTER_FOREIGN);
            return 1;
        }
        Netns::Unknown => {
            e.flags |= FLAG_NETNS_UNKNOWN;
            count(COUNTER_NETNS_UNKNOWN);
            false
        }
    };
    e.kind = EventKind::Bind as u8;
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(r) = unsafe { REUSE.get(e.sock_cookie) } {
        e.reuse = *r;
    }
    let _ = REUSE.remove(e.sock_cookie);
    // SAFETY: the kernel passes a valid bpf_sock for cgroup_sock programs.
    let sk = unsafe { &*ctx.sock };
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
    let mut e = with_task(e, feat);
    // Only sockets known to be the watched namespace's go in TRACKED, so
    // every release it reports is one of ours.
    if watched {
        track(&mut e);
    }
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
    let Some(t) = (unsafe { TRACKED.get(cookie) }).copied() else {
        return 1; // never held a port we reported: nothing to say
    };
    let _ = TRACKED.remove(cookie);
    let mut e = PortEvent::ZERO;
    e.kind = EventKind::Release as u8;
    e.sock_cookie = cookie;
    e.port = t.port;
    e.family = t.family;
    e.proto = t.proto;
    e.addr = t.addr;
    // SAFETY: plain helper call without arguments.
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    submit(&e);
    1
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    let kind = match ctx.op() {
        BPF_SOCK_OPS_TCP_LISTEN_CB => EventKind::Listen,
        BPF_SOCK_OPS_TCP_CONNECT_CB => EventKind::Connect,
        // Only listeners have the state callback on (see below), and only
        // their leaving LISTEN can free a port.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_LISTEN as u32 => EventKind::Unlisten,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // An accepted connection is cloned from its listener, callbacks
            // included: its state changes cannot free a port, so stop them.
            let flags = ctx.cb_flags();
            if flags & BPF_SOCK_OPS_STATE_CB_FLAG != 0 {
                let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
            return 1;
        }
        _ => return 1,
    };
    let feat = FEAT_SOCK_OPS.load();
    let mut e = PortEvent::ZERO;
    e.kind = kind as u8;
    // SAFETY: ctx is valid for the helper.
    e.sock_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    e.port = ctx.local_port() as u16; // host byte order in bpf_sock_ops
    e.family = ctx.family() as u8;
    e.proto = IPPROTO_TCP;
    if e.family == AF_INET {
        e.addr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
    } else if e.family == AF_INET6 {
        for i in 0..4 {
            // One 4-byte load per word: the verifier refuses the 8-byte
            // loads LLVM would merge a copy of the array into.
            // SAFETY: ctx.ops is the kernel's bpf_sock_ops, valid for reads.
            let w = unsafe { core::ptr::read_volatile(&(*ctx.ops).local_ip6[i]) };
            e.addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }
    if kind == EventKind::Unlisten {
        // The callback was switched on by the Listen branch for watched
        // sockets only: no namespace check needed.
        // SAFETY: plain helper call without arguments.
        e.ts_ns = unsafe { bpf_ktime_get_ns() };
        submit(&e);
        return 1;
    }
    let watched = match netns_of(&ctx, feat, e.sock_cookie) {
        Netns::Watched(ns) => {
            e.netns_cookie = ns;
            true
        }
        Netns::Other => {
            count(COUNTER_FOREIGN);
            return 1;
        }
        // A socket post_bind entered in TRACKED is the watched namespace's;
        // any other the daemon must check with a dump.
        Netns::Unknown if TRACKED.get_ptr(e.sock_cookie).is_some() => true,
        Netns::Unknown => {
            e.flags |= FLAG_NETNS_UNKNOWN;
            count(COUNTER_NETNS_UNKNOWN);
            false
        }
    };
    e.reuse = reuse_of(&ctx, feat);
    let mut e = with_task(e, feat);
    if kind == EventKind::Listen && watched {
        track(&mut e);
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    submit(&e);
    1
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const IPPROTO_TCP_U16: u16 = IPPROTO_TCP as u16;

/// Reads a `T` at `base + off` in kernel memory; None when it cannot.
#[inline(always)]
fn kread<T>(base: u64, off: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.ok()
}

/// The socket iterator: for each open file of each task, a TCP socket of the
/// watched namespace that is bound but neither listening nor connected.
/// sock_diag lists those only from Linux 6.5; before, this is how the daemon
/// sees them (the ones bound before it started included), at full resyncs.
/// Everything is read through bpf_probe_read_kernel at offsets the daemon
/// computed from BTF, so the verifier sees plain numbers, the same on every
/// kernel.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn bound_sockets(ctx: *mut core::ffi::c_void) -> i32 {
    let o = ITER_OFFSETS.load();
    let base = ctx as u64;
    // struct bpf_iter__task_file { meta; task; u32 fd; file; } (u64 slots)
    let (Some(task), Some(file)) = (kread::<u64>(base, 8), kread::<u64>(base, 24)) else {
        return 0;
    };
    if task == 0 || file == 0 || o.watched_netns_inum == 0 {
        return 0;
    }
    let Some(inode) = kread::<u64>(file, o.file_inode) else { return 0 };
    let Some(mode) = kread::<u16>(inode, o.inode_mode) else { return 0 };
    if mode & S_IFMT != S_IFSOCK {
        return 0;
    }
    let Some(sock) = kread::<u64>(file, o.file_private_data) else { return 0 };
    let Some(sk) = kread::<u64>(sock, o.socket_sk) else { return 0 };
    if sk == 0 {
        return 0;
    }
    let family = kread::<u16>(sk, o.sk_family).unwrap_or(0) as u8;
    let protocol = kread::<u16>(sk, o.sk_protocol).unwrap_or(0);
    let state = kread::<u8>(sk, o.sk_state).unwrap_or(0);
    let port = kread::<u16>(sk, o.sk_num).unwrap_or(0);
    // CLOSE with a local port: in the bind hash, not listening or connected.
    if !(family == AF_INET || family == AF_INET6) || protocol != IPPROTO_TCP_U16 || state != TCP_CLOSE || port == 0 {
        return 0;
    }
    let Some(net) = kread::<u64>(sk, o.sk_net) else { return 0 };
    if kread::<u32>(net, o.net_ns_inum) != Some(o.watched_netns_inum) {
        return 0;
    }
    let mut r = IterRecord {
        cookie: kread::<u64>(sk, o.sk_cookie).unwrap_or(0),
        ino: kread::<u64>(inode, o.inode_ino).unwrap_or(0),
        tgid: kread::<u32>(task, o.task_tgid).unwrap_or(0),
        port,
        family,
        ..IterRecord::default()
    };
    if family == AF_INET {
        if let Some(a) = kread::<[u8; 4]>(sk, o.sk_rcv_saddr) {
            r.addr[..4].copy_from_slice(&a);
        }
    } else if let Some(a) = kread::<[u8; 16]>(sk, o.sk_v6_rcv_saddr) {
        r.addr = a;
    }
    if let Some(c) = kread::<[u8; 16]>(task, o.task_comm) {
        r.comm = c;
    }
    // SAFETY: ctx->meta (offset 0) and meta->seq (offset 0) are the kernel's
    // typed pointers, loaded as such so the verifier knows the seq_file.
    unsafe {
        let meta = *(ctx as *const *const *mut aya_ebpf::bindings::seq_file);
        let seq = *meta;
        aya_ebpf::helpers::generated::bpf_seq_write(
            seq,
            (&r as *const IterRecord).cast(),
            core::mem::size_of::<IterRecord>() as u32,
        );
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
