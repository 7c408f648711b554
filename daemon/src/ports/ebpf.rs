//! Loading the eBPF programs on whatever kernel this is, one hook at a time.
//!
//! Kernels differ in what each program type may do, and no version number
//! says it reliably (vendors backport). So nothing is assumed:
//! 1. each optional helper is probed per program type against the running
//!    kernel's verifier (aya's `is_helper_supported`, libbpf's method), and
//!    the `FEAT_*` globals tell the programs which ones they may call;
//! 2. each hook is loaded and attached on its own: one the kernel refuses is
//!    reported with the verifier's reason ([`HookStatus`]) and the others
//!    keep working; a refused hook is retried once with no optional helpers
//!    before it is given up;
//! 3. the watched namespace is identified by the kernel side itself, from a
//!    probe socket (see [`learn_netns`]), because getsockopt(SO_NETNS_COOKIE)
//!    needs Linux 5.14.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, ProgramType, SockOps},
    sys::{is_helper_supported, BpfHelper},
    Ebpf, EbpfLoader,
};
use polarstack_ebpf_common::{
    EventKind, PortEvent, TrackedSocket, CONFIG_NETNS_COOKIE, CONFIG_PROBE_COOKIE, COUNTER_FOREIGN,
    COUNTER_NETNS_UNKNOWN, COUNTER_RING_FULL, COUNTER_TRACK_FULL, FEAT_CGROUP, FEAT_COMM, FEAT_GETSOCKOPT, FEAT_NETNS,
    FEAT_PID, FLAG_NETNS_UNKNOWN, FLAG_UNTRACKED, GLOBAL_FEAT_BIND, GLOBAL_FEAT_POST_BIND, GLOBAL_FEAT_SOCK_OPS,
    GLOBAL_ITER_OFFSETS, MAP_CONFIG, MAP_COUNTERS, MAP_EVENTS, MAP_TRACKED, PROG_BIND4, PROG_BIND6, PROG_BOUND_SOCKETS,
    PROG_POST_BIND4, PROG_POST_BIND6, PROG_SOCK_OPS, PROG_SOCK_RELEASE, REUSE_OFF, REUSE_ON,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use super::{
    btf,
    events::{DecodeError, KernelCounters},
    iter::{self, BoundIter},
    map::Event,
    model::{addr_from_bytes, comm_to_string, Family, Owner, Proto},
};

/// The object built by `cargo xtask build-ebpf`, embedded at compile time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("POLARSTACK_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: String, source: io::Error },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("registering the ring buffer with tokio: {0}")]
    Poll(#[source] io::Error),
    #[error("the kernel refused every hook: {0}")]
    NoHook(String),
    #[error("no hook could learn the watched network namespace's cookie, so every event would be dropped")]
    NetnsUnknown,
}

pub struct EbpfOptions<'a> {
    pub cgroup_root: &'a Path,
    /// Ring buffer size: a power of two, a multiple of the page size.
    pub ring_bytes: u32,
    /// Capacity of the kernel's table of bound and listening sockets.
    pub tracked_max: u32,
    /// Load the socket iterator: sock_diag cannot list bound TCP sockets here.
    pub bound_iter: bool,
}

/// What a hook reports, and what is lost without it (for `/readyz` and the
/// kernel table in the docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Bind4,
    Bind6,
    PostBind4,
    PostBind6,
    SockRelease,
    SockOps,
}

impl Hook {
    pub const ALL: [Hook; 6] =
        [Hook::PostBind4, Hook::PostBind6, Hook::SockOps, Hook::SockRelease, Hook::Bind4, Hook::Bind6];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Bind4 => PROG_BIND4,
            Hook::Bind6 => PROG_BIND6,
            Hook::PostBind4 => PROG_POST_BIND4,
            Hook::PostBind6 => PROG_POST_BIND6,
            Hook::SockRelease => PROG_SOCK_RELEASE,
            Hook::SockOps => PROG_SOCK_OPS,
        }
    }

    /// The ways of taking or freeing a port this hook reports live.
    pub fn covers(self) -> &'static str {
        match self {
            Hook::Bind4 | Hook::Bind6 => "SO_REUSEADDR of explicitly bound sockets",
            Hook::PostBind4 => "explicit bind() over IPv4 (TCP and UDP)",
            Hook::PostBind6 => "explicit bind() over IPv6 (TCP and UDP)",
            Hook::SockRelease => "close of bound, listening and UDP sockets",
            Hook::SockOps => "listen() and connect() (autobind included), listeners stopping",
        }
    }

    fn program_type(self) -> ProgramType {
        match self {
            Hook::Bind4 | Hook::Bind6 => ProgramType::CgroupSockAddr,
            Hook::PostBind4 | Hook::PostBind6 | Hook::SockRelease => ProgramType::CgroupSock,
            Hook::SockOps => ProgramType::SockOps,
        }
    }

    /// The global holding this hook's optional helpers; None when it uses none.
    fn feature_global(self) -> Option<&'static str> {
        match self {
            Hook::Bind4 | Hook::Bind6 => Some(GLOBAL_FEAT_BIND),
            Hook::PostBind4 | Hook::PostBind6 => Some(GLOBAL_FEAT_POST_BIND),
            Hook::SockOps => Some(GLOBAL_FEAT_SOCK_OPS),
            Hook::SockRelease => None,
        }
    }

    /// The optional helpers the hook's code can use.
    fn optional(self) -> u32 {
        match self {
            Hook::Bind4 | Hook::Bind6 => FEAT_NETNS | FEAT_GETSOCKOPT,
            Hook::PostBind4 | Hook::PostBind6 => FEAT_PID | FEAT_COMM | FEAT_CGROUP | FEAT_NETNS,
            Hook::SockOps => FEAT_PID | FEAT_COMM | FEAT_CGROUP | FEAT_NETNS | FEAT_GETSOCKOPT,
            Hook::SockRelease => 0,
        }
    }
}

/// One hook as loaded on this kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookStatus {
    pub hook: &'static str,
    pub attached: bool,
    /// What it reports live.
    pub covers: &'static str,
    /// Owner fields its events carry (pid, comm, cgroup); the others are
    /// unknown on this kernel.
    pub owner: Vec<&'static str>,
    /// Where other namespaces' events are dropped: "kernel", or "daemon"
    /// (the hook cannot read namespace cookies here; the daemon checks each
    /// event with a dump).
    pub namespace_filter: &'static str,
    /// Why the kernel refused it (the verifier's last lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    kind: Option<Hook>,
}

impl HookStatus {
    pub fn of(&self) -> Option<Hook> {
        self.kind
    }
}

/// Optional helpers: feature bit, helper, and the owner field it gives
/// (empty for helpers that give none).
const HELPERS: [(u32, BpfHelper, &str); 5] = [
    (FEAT_PID, BpfHelper::BPF_FUNC_get_current_pid_tgid, "pid"),
    (FEAT_COMM, BpfHelper::BPF_FUNC_get_current_comm, "comm"),
    (FEAT_CGROUP, BpfHelper::BPF_FUNC_get_current_cgroup_id, "cgroup"),
    (FEAT_NETNS, BpfHelper::BPF_FUNC_get_netns_cookie, ""),
    (FEAT_GETSOCKOPT, BpfHelper::BPF_FUNC_getsockopt, ""),
];

/// Which of `hook`'s optional helpers the running kernel lets it call.
fn probe_features(hook: Hook) -> u32 {
    let pt = hook.program_type();
    HELPERS
        .iter()
        .filter(|(bit, _, _)| hook.optional() & bit != 0)
        .filter(|(_, helper, _)| is_helper_supported(pt, *helper).unwrap_or(false))
        .fold(0, |acc, (bit, _, _)| acc | bit)
}

/// The loaded and attached programs, and the maps the daemon reads or feeds.
pub struct Probes {
    events: AsyncFd<RingBuf<MapData>>,
    /// The socket iterator, until the dumper takes it.
    bound_iter: Option<BoundIter>,
    counters: PerCpuArray<MapData, u64>,
    tracked: BpfHashMap<MapData, u64, TrackedSocket>,
    netns_cookie: u64,
    hooks: Vec<HookStatus>,
    /// Owns the programs (and so the links) for as long as the daemon runs.
    _ebpf: Ebpf,
}

impl Probes {
    pub fn load(opts: &EbpfOptions<'_>) -> Result<Self, EbpfError> {
        let mut features: Vec<(Hook, u32)> = Hook::ALL.iter().map(|h| (*h, probe_features(*h))).collect();
        let offsets = opts.bound_iter.then(iter_offsets);
        let offsets_ok = offsets.as_ref().and_then(|r| r.as_ref().ok());
        // A hook the verifier refuses with its optional helpers is tried
        // once more without any: a probe can be wrong about an attach type.
        let mut loaded = attach_all(opts, &features, offsets_ok)?;
        let retry: Vec<Hook> = loaded
            .hooks
            .iter()
            .filter(|s| !s.attached && s.kind.is_some_and(|h| features_of(&features, h) != 0))
            .filter_map(|s| s.kind)
            .collect();
        if !retry.is_empty() {
            // Hooks that share a feature global are retried together: the
            // global holds one value for both.
            for (h, f) in features.iter_mut() {
                if retry.iter().any(|r| r.feature_global() == h.feature_global()) {
                    *f = 0;
                }
            }
            tracing::info!(hooks = ?retry.iter().map(|h| h.name()).collect::<Vec<_>>(), "retrying refused hooks without optional helpers");
            drop(loaded);
            loaded = attach_all(opts, &features, offsets_ok)?;
        }
        let Loaded { mut ebpf, mut hooks } = loaded;
        if !hooks.iter().any(|h| h.attached && h.kind.is_some_and(|k| k != Hook::Bind4 && k != Hook::Bind6)) {
            let why: Vec<String> =
                hooks.iter().filter_map(|h| h.error.as_ref().map(|e| format!("{}: {e}", h.hook))).collect();
            return Err(EbpfError::NoHook(why.join("; ")));
        }
        let mut config: Array<MapData, u64> = take_map(&mut ebpf, MAP_CONFIG)?;
        let needs_netns = hooks.iter().any(|h| h.attached && h.namespace_filter == "kernel");
        let netns_cookie = if needs_netns { learn_netns(&mut config).ok_or(EbpfError::NetnsUnknown)? } else { 0 };
        let bound_iter = match offsets {
            Some(offsets) => {
                let (iter, status) = load_bound_iter(&mut ebpf, offsets.map(drop));
                hooks.push(status);
                iter
            }
            None => None,
        };
        let ring: RingBuf<MapData> = take_map(&mut ebpf, MAP_EVENTS)?;
        Ok(Self {
            events: register(ring)?,
            bound_iter,
            counters: take_map(&mut ebpf, MAP_COUNTERS)?,
            tracked: take_map(&mut ebpf, MAP_TRACKED)?,
            netns_cookie,
            hooks,
            _ebpf: ebpf,
        })
    }

    /// Every hook tried, attached or not.
    pub fn hooks(&self) -> &[HookStatus] {
        &self.hooks
    }

    /// The socket iterator, for the dumper (once).
    pub fn take_bound_iter(&mut self) -> Option<BoundIter> {
        self.bound_iter.take()
    }

    /// The watched namespace's cookie, as the kernel side learned it (0 when
    /// no hook filters in the kernel).
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Waits for ring-buffer records and decodes them into `batch`; returns
    /// how many could not be decoded.
    pub async fn next_batch(&mut self, batch: &mut Vec<Event>) -> io::Result<usize> {
        let mut guard = self.events.readable_mut().await?;
        let undecodable = drain_ring(guard.get_inner_mut(), batch);
        guard.clear_ready();
        Ok(undecodable)
    }

    /// Decodes the records in the ring now, without waiting; returns how many
    /// could not be decoded.
    pub fn drain(&mut self, batch: &mut Vec<Event>) -> usize {
        drain_ring(self.events.get_mut(), batch)
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |i: u32| self.counters.get(&i, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0);
        KernelCounters {
            ring_full: sum(COUNTER_RING_FULL),
            track_full: sum(COUNTER_TRACK_FULL),
            foreign: sum(COUNTER_FOREIGN),
            netns_unknown: sum(COUNTER_NETNS_UNKNOWN),
        }
    }

    /// Tells the kernel about a socket the hooks never saw (it predates the
    /// daemon, or its event was lost), so that closing it is reported like
    /// any other. False when the table is full.
    pub fn track(&mut self, cookie: u64, sock: TrackedSocket) -> bool {
        match self.tracked.insert(cookie, sock, 0) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, cookie, "could not enter a socket in TRACKED");
                false
            }
        }
    }

    /// Forgets a socket the map no longer holds (a dump saw it go without a
    /// release event, e.g. one seeded from a dump).
    pub fn untrack(&mut self, cookie: u64) {
        let _ = self.tracked.remove(&cookie);
    }

    /// Every socket the kernel tracks: the kernel's own record of bound and
    /// listening sockets, for recovering ones whose events were lost where
    /// dumps cannot show them.
    pub fn tracked_sockets(&self) -> Vec<(u64, TrackedSocket)> {
        self.tracked.iter().filter_map(Result::ok).collect()
    }
}

struct Loaded {
    ebpf: Ebpf,
    hooks: Vec<HookStatus>,
}

fn features_of(features: &[(Hook, u32)], hook: Hook) -> u32 {
    features.iter().find(|(h, _)| *h == hook).map_or(0, |(_, f)| *f)
}

fn attach_all(
    opts: &EbpfOptions<'_>,
    features: &[(Hook, u32)],
    offsets: Option<&polarstack_ebpf_common::IterOffsets>,
) -> Result<Loaded, EbpfError> {
    let feat = |h: Hook| features_of(features, h);
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(MAP_EVENTS, opts.ring_bytes).map_max_entries(MAP_TRACKED, opts.tracked_max);
    let globals: Vec<(&'static str, u32)> = [Hook::Bind4, Hook::PostBind4, Hook::SockOps]
        .iter()
        .filter_map(|h| Some((h.feature_global()?, feat(*h))))
        .collect();
    for (global, value) in &globals {
        loader.override_global(global, value, true);
    }
    if let Some(o) = offsets {
        loader.override_global(GLOBAL_ITER_OFFSETS, o, true);
    }
    let mut ebpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
    let cgroup_path = opts.cgroup_root.display().to_string();
    let cgroup = File::open(opts.cgroup_root).map_err(|source| EbpfError::Cgroup { path: cgroup_path, source })?;
    let mut hooks = Vec::new();
    for hook in Hook::ALL {
        let result = attach(&mut ebpf, hook, &cgroup);
        let f = feat(hook);
        let owner = HELPERS.iter().filter(|(bit, _, n)| f & bit != 0 && !n.is_empty()).map(|(_, _, n)| *n).collect();
        let namespace_filter = match hook {
            Hook::SockRelease => "kernel", // reports only sockets others entered
            _ if f & FEAT_NETNS != 0 => "kernel",
            _ => "daemon",
        };
        let error = result.err().map(|e| short_error(&e));
        if let Some(e) = &error {
            tracing::warn!(hook = hook.name(), error = %e, lost = hook.covers(), "eBPF hook refused by this kernel");
        }
        hooks.push(HookStatus {
            hook: hook.name(),
            attached: error.is_none(),
            covers: hook.covers(),
            owner,
            namespace_filter,
            error,
            kind: Some(hook),
        });
    }
    Ok(Loaded { ebpf, hooks })
}

fn attach(ebpf: &mut Ebpf, hook: Hook, cgroup: &File) -> Result<(), HookError> {
    let name = hook.name();
    let prog = ebpf.program_mut(name).ok_or(HookError::Missing(name))?;
    // Single: one bpf_link per program; links of other tools coexist.
    match hook.program_type() {
        ProgramType::CgroupSock => {
            let p: &mut CgroupSock = prog.try_into().map_err(|_| HookError::Missing(name))?;
            p.load()?;
            p.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
        }
        ProgramType::CgroupSockAddr => {
            let p: &mut CgroupSockAddr = prog.try_into().map_err(|_| HookError::Missing(name))?;
            p.load()?;
            p.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
        }
        _ => {
            let p: &mut SockOps = prog.try_into().map_err(|_| HookError::Missing(name))?;
            p.load()?;
            p.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum HookError {
    #[error("the eBPF object has no program named {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Program(#[from] ProgramError),
}

/// The verifier's verdict in a line or two: its log ends with the reason
/// ("unknown func ...", "program of this type cannot use helper ...").
fn short_error(e: &HookError) -> String {
    match e {
        HookError::Program(ProgramError::LoadError { io_error, verifier_log }) => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time"))
                .collect();
            let tail = tail[tail.len().saturating_sub(2)..].join(" / ");
            if tail.is_empty() {
                format!("load refused: {io_error}")
            } else {
                format!("verifier: {tail}")
            }
        }
        other => other.to_string(),
    }
}

/// The iterator's offsets for this kernel and this namespace.
fn iter_offsets() -> Result<polarstack_ebpf_common::IterOffsets, String> {
    let inum = iter::own_netns_inum().map_err(|e| format!("reading this network namespace's inode: {e}"))?;
    let btf = btf::Btf::from_sys_fs().map_err(|e| e.to_string())?;
    btf::iter_offsets(&btf, inum).map_err(|e| e.to_string())
}

/// Loads the socket iterator and runs it once, so a kernel that refuses it
/// (or cannot run it) says so now rather than at the first resync.
/// `offsets` is whether its offsets could be read from BTF.
fn load_bound_iter(ebpf: &mut Ebpf, offsets: Result<(), String>) -> (Option<BoundIter>, HookStatus) {
    let mut status = HookStatus {
        hook: PROG_BOUND_SOCKETS,
        attached: false,
        covers: "TCP sockets bound but neither listening nor connected (sock_diag lists them only from 6.5), at full resyncs",
        owner: vec!["pid", "comm"],
        namespace_filter: "kernel",
        error: None,
        kind: None,
    };
    let result = (|| -> Result<BoundIter, String> {
        if !iter::in_host_pid_namespace() {
            return Err("not in the host's PID namespace (hostPID): the iterator would see this container's \
                        tasks only"
                .into());
        }
        offsets?;
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("reading the kernel's BTF: {e}"))?;
        let prog: &mut aya::programs::Iter = ebpf
            .program_mut(PROG_BOUND_SOCKETS)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| format!("the eBPF object has no iterator named {PROG_BOUND_SOCKETS}"))?;
        prog.load("task_file", &btf).map_err(|e| short_error(&HookError::Program(e)))?;
        let fd = prog.fd().map_err(|e| e.to_string())?.as_fd().try_clone_to_owned().map_err(|e| e.to_string())?;
        let iter = BoundIter::new(fd);
        iter.read().map_err(|e| format!("running the iterator: {e}"))?;
        Ok(iter)
    })();
    match result {
        Ok(iter) => {
            status.attached = true;
            (Some(iter), status)
        }
        Err(e) => {
            tracing::warn!(hook = PROG_BOUND_SOCKETS, error = %e, "socket iterator unavailable");
            status.error = Some(e);
            (None, status)
        }
    }
}

/// Makes the kernel side learn the watched namespace's cookie: the daemon
/// writes a probe socket's cookie to `CONFIG_PROBE_COOKIE` and binds it; the
/// first hook that sees it stores its namespace's cookie. The binds are made
/// to fail after the bind hooks ran (an IPv4-mapped address on an IPv6-only
/// socket; a TEST-NET address), so no port is taken, even for a moment;
/// only where the bind hooks are missing does a real bind follow.
fn learn_netns(config: &mut Array<MapData, u64>) -> Option<u64> {
    let known = |c: &Array<MapData, u64>| c.get(&CONFIG_NETNS_COOKIE, 0).ok().filter(|v| *v != 0);
    for attempt in [ProbeBind::MappedOnV6Only, ProbeBind::TestNet, ProbeBind::Loopback] {
        let Ok(sock) = attempt.socket() else { continue };
        let Ok(cookie) = socket_cookie(&sock) else { continue };
        if config.set(CONFIG_PROBE_COOKIE, cookie, 0).is_err() {
            return None;
        }
        attempt.bind(&sock);
        if let Some(c) = known(config) {
            let _ = config.set(CONFIG_PROBE_COOKIE, 0, 0);
            return Some(c);
        }
    }
    None
}

#[derive(Clone, Copy)]
enum ProbeBind {
    /// bind6 runs, then the bind fails with EINVAL (IPV6_V6ONLY and a mapped address).
    MappedOnV6Only,
    /// bind4 runs, then the bind fails with EADDRNOTAVAIL (192.0.2.1 is not
    /// local). On a host that has that address it succeeds and post_bind
    /// learns instead; the socket is closed at once.
    TestNet,
    /// Where the bind hooks did not load or cannot read namespace cookies: a
    /// real bind, for post_bind to see. To 127.0.0.1 on a port the kernel picks, with
    /// SO_REUSEADDR and never listening, so no PostgreSQL-style listener is
    /// stopped from binding that port for the moment it is held.
    Loopback,
}

impl ProbeBind {
    fn socket(self) -> io::Result<OwnedFd> {
        let family = match self {
            ProbeBind::MappedOnV6Only => libc::AF_INET6,
            ProbeBind::TestNet | ProbeBind::Loopback => libc::AF_INET,
        };
        // SAFETY: plain syscall; the descriptor is owned by the OwnedFd.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket() and is not owned elsewhere.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let option = match self {
            ProbeBind::MappedOnV6Only => Some((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)),
            ProbeBind::Loopback => Some((libc::SOL_SOCKET, libc::SO_REUSEADDR)),
            ProbeBind::TestNet => None,
        };
        if let Some((level, name)) = option {
            let one: libc::c_int = 1;
            // SAFETY: the option value is a local int of the length passed.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    level,
                    name,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(sock)
    }

    /// The bind's result does not matter: the hooks ran before it failed.
    fn bind(self, sock: &OwnedFd) {
        // SAFETY: the address structs are locals of the lengths passed.
        unsafe {
            match self {
                ProbeBind::MappedOnV6Only => {
                    let mut a: libc::sockaddr_in6 = std::mem::zeroed();
                    a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                    a.sin6_addr.s6_addr = std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
                    libc::bind(
                        sock.as_raw_fd(),
                        (&a as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    );
                }
                ProbeBind::TestNet | ProbeBind::Loopback => {
                    let ip = if matches!(self, ProbeBind::TestNet) { [192, 0, 2, 1] } else { [127, 0, 0, 1] };
                    let mut a: libc::sockaddr_in = std::mem::zeroed();
                    a.sin_family = libc::AF_INET as libc::sa_family_t;
                    a.sin_addr.s_addr = u32::from_ne_bytes(ip);
                    libc::bind(
                        sock.as_raw_fd(),
                        (&a as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                }
            }
        }
    }
}

/// getsockopt(SO_COOKIE), Linux 4.12+: the value the hooks and sock_diag see.
fn socket_cookie(sock: &OwnedFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the output buffer is a local u64 of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Registers a map's descriptor with tokio's reactor.
fn register<T: AsRawFd>(inner: T) -> Result<AsyncFd<T>, EbpfError> {
    // SAFETY: `inner` owns its descriptor (aya maps close it on drop, never
    // earlier) and always returns the same one; the AsyncFd owns `inner`, so
    // the descriptor outlives the registration.
    unsafe { AsyncFd::register(inner) }.map_err(|e| EbpfError::Poll(e.into_parts().1))
}

fn drain_ring(ring: &mut RingBuf<MapData>, batch: &mut Vec<Event>) -> usize {
    let mut undecodable = 0;
    while let Some(item) = ring.next() {
        match decode(&item) {
            Ok(ev) => batch.push(ev),
            Err(e) => {
                undecodable += 1;
                tracing::debug!(error = %e, "undecodable ring-buffer record");
            }
        }
    }
    undecodable
}

/// Decodes one ring-buffer record.
fn decode(raw: &[u8]) -> Result<Event, DecodeError> {
    if raw.len() < std::mem::size_of::<PortEvent>() {
        return Err(DecodeError::Short(raw.len()));
    }
    // SAFETY: the length was checked; PortEvent is plain old data (every bit
    // pattern is valid) and read_unaligned copes with any alignment.
    let e: PortEvent = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast::<PortEvent>()) };
    let kind = EventKind::from_u8(e.kind).ok_or(DecodeError::Kind(e.kind))?;
    let proto = Proto::from_ipproto(e.proto).ok_or(DecodeError::Proto(e.proto))?;
    let family = Family::from_af(e.family).ok_or(DecodeError::Family(e.family))?;
    let owner = (e.pid != 0 || e.cgroup_id != 0).then(|| Owner {
        pid: e.pid,
        comm: comm_to_string(&e.comm),
        cgroup_id: e.cgroup_id,
    });
    Ok(Event {
        kind,
        ts_ns: e.ts_ns,
        cookie: e.sock_cookie,
        netns_cookie: e.netns_cookie,
        proto,
        family,
        addr: addr_from_bytes(family, &e.addr),
        port: e.port,
        owner,
        untracked: e.flags & FLAG_UNTRACKED != 0,
        netns_unknown: e.flags & FLAG_NETNS_UNKNOWN != 0,
        reuse: match e.reuse {
            REUSE_ON => Some(true),
            REUSE_OFF => Some(false),
            _ => None,
        },
    })
}

#[cfg(test)]
impl HookStatus {
    /// A hook as a test needs it (nothing loaded).
    pub fn refused_for_test(hook: &'static str) -> Self {
        Self {
            hook,
            attached: false,
            covers: "",
            owner: Vec::new(),
            namespace_filter: "kernel",
            error: None,
            kind: None,
        }
    }
}
