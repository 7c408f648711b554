//! Loads the embedded eBPF object, attaches its programs to the cgroup v2 root
//! and reads their ring buffer. Everything stays attached only while `Probes`
//! lives: aya detaches the links on drop, so nothing outlives the daemon.
use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps, TracePoint},
    Ebpf, EbpfLoader,
};
use polarstack_ebpf_common::{
    EventKind, PortEvent, TrackedSocket, CONFIG_NETNS_COOKIE, MAP_CONFIG, MAP_EVENTS, MAP_LOST, MAP_TRACKED,
    PROG_BIND4, PROG_BIND6, PROG_POST_BIND4, PROG_POST_BIND6, PROG_SET_STATE, PROG_SOCK_OPS, PROG_SOCK_RELEASE,
    REUSE_OFF, REUSE_ON,
};
use tokio::io::unix::AsyncFd;

use super::{
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
    #[error("loading program {name} into the kernel: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("attaching {name} to {target}: {source}")]
    Attach { name: &'static str, target: String, source: aya::programs::ProgramError },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("registering the ring buffer with tokio: {0}")]
    Poll(#[source] std::io::Error),
}

pub struct EbpfOptions<'a> {
    pub cgroup_root: &'a Path,
    /// Report only this namespace's sockets (0: every namespace).
    pub netns_cookie: u64,
    /// Ring buffer size: a power of two, a multiple of the page size.
    pub ring_bytes: u32,
}

/// The loaded and attached programs, and the maps the daemon reads or feeds.
pub struct Probes {
    pub events: AsyncFd<RingBuf<MapData>>,
    lost: PerCpuArray<MapData, u64>,
    tracked: BpfHashMap<MapData, u64, TrackedSocket>,
    /// Owns the programs (and so the links) for as long as the daemon runs.
    _ebpf: Ebpf,
}

impl Probes {
    pub fn load(opts: &EbpfOptions<'_>) -> Result<Self, EbpfError> {
        let mut ebpf =
            EbpfLoader::new().map_max_entries(MAP_EVENTS, opts.ring_bytes).load(OBJECT).map_err(EbpfError::Load)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => tracing::debug!(error = %e, "eBPF program logs unavailable"),
        }
        // The namespace filter must be in place before the first event fires.
        let mut config: Array<_, u64> = take_map(&mut ebpf, MAP_CONFIG)?;
        config
            .set(CONFIG_NETNS_COOKIE, opts.netns_cookie, 0)
            .map_err(|source| EbpfError::Map { name: MAP_CONFIG, source })?;

        let cgroup_path = opts.cgroup_root.display().to_string();
        let cgroup =
            File::open(opts.cgroup_root).map_err(|source| EbpfError::Cgroup { path: cgroup_path.clone(), source })?;
        for name in [PROG_POST_BIND4, PROG_POST_BIND6, PROG_SOCK_RELEASE] {
            let prog: &mut CgroupSock = program(&mut ebpf, name)?;
            prog.load().map_err(|source| EbpfError::Program { name, source })?;
            // Single: one bpf_link per program; links of other tools coexist.
            prog.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(|source| EbpfError::Attach {
                name,
                target: cgroup_path.clone(),
                source,
            })?;
        }
        // bind4/6 only learn SO_REUSEADDR before a bind; without them binds
        // are still reported, with the flag unknown (treated as blocking).
        for name in [PROG_BIND4, PROG_BIND6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            let attached = prog.load().and_then(|()| prog.attach(cgroup.as_fd(), CgroupAttachMode::Single).map(drop));
            if let Err(e) = attached {
                tracing::warn!(program = name, error = %e, "not attached; SO_REUSEADDR of bound sockets stays unknown");
            }
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
        sock_ops.load().map_err(|source| EbpfError::Program { name: PROG_SOCK_OPS, source })?;
        sock_ops.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(|source| EbpfError::Attach {
            name: PROG_SOCK_OPS,
            target: cgroup_path.clone(),
            source,
        })?;
        // The tracepoint only adds hints (a failed connect freeing its port
        // early); without tracefs the resync still catches those, so it is
        // optional rather than a reason to drop eBPF altogether.
        let tp: &mut TracePoint = program(&mut ebpf, PROG_SET_STATE)?;
        let attached = tp.load().and_then(|()| tp.attach("sock", "inet_sock_set_state").map(drop));
        if let Err(e) = attached {
            tracing::warn!(
                error = %e,
                "tracepoint sock/inet_sock_set_state not attached (is tracefs mounted at /sys/kernel/tracing?); \
                 ports freed by failed connects are caught by the periodic resync instead"
            );
        }

        let ring: RingBuf<MapData> = take_map(&mut ebpf, MAP_EVENTS)?;
        Ok(Self {
            events: register(ring)?,
            lost: take_map(&mut ebpf, MAP_LOST)?,
            tracked: take_map(&mut ebpf, MAP_TRACKED)?,
            _ebpf: ebpf,
        })
    }

    /// Events the kernel could not queue since load (ring buffer full).
    pub fn lost_events(&self) -> u64 {
        self.lost.get(&0, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// Tells the kernel about a socket the hooks never saw (it predates the
    /// daemon), so that closing it is reported like any other.
    pub fn track(&mut self, cookie: u64, sock: TrackedSocket) {
        if let Err(e) = self.tracked.insert(cookie, sock, 0) {
            tracing::debug!(error = %e, cookie, "could not seed TRACKED");
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(EbpfError::Missing { kind: "program", name })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Registers a map's descriptor with tokio's reactor.
fn register<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>, EbpfError> {
    // SAFETY: `inner` owns its descriptor (aya maps and the logger close it
    // on drop, never earlier) and always returns the same one; the AsyncFd
    // owns `inner`, so the descriptor outlives the registration.
    unsafe { AsyncFd::register(inner) }.map_err(|e| EbpfError::Poll(e.into_parts().1))
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    match register(logger) {
        Ok(mut fd) => {
            tokio::spawn(async move {
                while let Ok(mut guard) = fd.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => tracing::debug!(error = %e, "eBPF program logs unavailable"),
    }
}

/// Decodes one ring-buffer record; `None` for records this daemon cannot use
/// (short, unknown kind, protocol or family), which are counted by the caller.
pub fn decode(raw: &[u8]) -> Option<Event> {
    if raw.len() < std::mem::size_of::<PortEvent>() {
        return None;
    }
    // SAFETY: the length was checked; PortEvent is plain old data (every bit
    // pattern is valid) and read_unaligned copes with any alignment.
    let e: PortEvent = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast::<PortEvent>()) };
    let kind = EventKind::from_u8(e.kind)?;
    let proto = Proto::from_ipproto(e.proto)?;
    let family = Family::from_af(e.family)?;
    let owner = (e.pid != 0).then(|| Owner { pid: e.pid, comm: comm_to_string(&e.comm), cgroup_id: e.cgroup_id });
    Some(Event {
        kind,
        ts_ns: e.ts_ns,
        cookie: e.sock_cookie,
        netns_cookie: e.netns_cookie,
        proto,
        family,
        addr: addr_from_bytes(family, &e.addr),
        port: e.port,
        owner,
        old_state: e.old_state,
        new_state: e.new_state,
        reuse: match e.reuse {
            REUSE_ON => Some(true),
            REUSE_OFF => Some(false),
            _ => None,
        },
    })
}
