//! Authoritative socket dumps over NETLINK_SOCK_DIAG, in the daemon's own
//! network namespace.
//!
//! The request and reply layouts (`inet_diag_req_v2`, `inet_diag_msg`) are
//! written out here rather than taken from netlink-packet-sock-diag, because
//! that crate has neither the bytecode filter (needed to dump a handful of
//! ports cheaply on a host with 100k connections) nor the bound-inactive state
//! (bit 13), and it allocates per socket. The socket itself is netlink-sys's.
//! Layouts: include/uapi/linux/inet_diag.h, sock_diag.h, netlink.h.
use std::{
    collections::BTreeSet,
    io,
    os::fd::{FromRawFd, OwnedFd},
};

use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use super::{
    iter::BoundIter,
    map::{DumpedSocket, Scope, Tables},
    model::{addr_from_bytes, comm_to_string, Family, Owner, Proto, SockState},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_CGROUP_ID: u16 = 21;

const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;

const TCP_SYN_RECV: u32 = 3;
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;
const TCP_BOUND_INACTIVE: u32 = 13;

/// The TCP state bits that make the kernel walk `tables`: without any
/// established-state bit it skips the established hash, and without bit 13
/// the bind hash (both cost in proportion to the connections on the host).
fn tcp_states(tables: Tables) -> u32 {
    let mut states = 0;
    if tables.contains(Tables::LISTEN) {
        states |= 1 << TCP_LISTEN;
    }
    if tables.contains(Tables::BOUND) {
        states |= 1 << TCP_BOUND_INACTIVE;
    }
    if tables.contains(Tables::CONNECTED) {
        states |= TCP_PORT_STATES & !((1 << TCP_LISTEN) | (1 << TCP_BOUND_INACTIVE));
    }
    states
}
/// TCP states that hold a port: all of them (including bit 13, bound but
/// inactive, kernel 6.5+), except request sockets, which ride on their
/// listener's port and would only inflate the dump.
const TCP_PORT_STATES: u32 = !((1 << TCP_SYN_RECV) | (1 << TCP_NEW_SYN_RECV));
/// UDP sockets are CLOSE (unconnected) or ESTABLISHED (connected).
const UDP_STATES: u32 = !0;

/// Above this many ports a verification dumps everything instead: the
/// bytecode's jumps are 16-bit.
pub const MAX_FILTERED_PORTS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("opening a NETLINK_SOCK_DIAG socket: {0}")]
    Open(#[source] io::Error),
    #[error("binding the probe socket that tells whether bound TCP sockets can be listed: {0}")]
    Probe(#[source] io::Error),
    #[error("running the socket iterator: {0}")]
    Iterator(#[source] io::Error),
    #[error("sending a sock_diag request for {proto}/{family:?}: {source}")]
    Send { proto: Proto, family: Family, source: io::Error },
    #[error("reading sock_diag replies for {proto}/{family:?}: {source}")]
    Recv { proto: Proto, family: Family, source: io::Error },
    #[error("the kernel refused a sock_diag dump for {proto}/{family:?}: errno {errno}")]
    Kernel { proto: Proto, family: Family, errno: i32 },
    #[error("malformed sock_diag reply for {proto}/{family:?}: {what}")]
    Malformed { proto: Proto, family: Family, what: &'static str },
}

/// A reusable dumper: one netlink socket and one receive buffer, and where
/// sock_diag cannot list bound TCP sockets, the socket iterator.
pub struct SockDiag {
    sock: Socket,
    buf: Vec<u8>,
    seq: u32,
    /// The tables sock_diag can list on this kernel (see [`SockDiag::probe_visible`]).
    diag_visible: Tables,
    bound_iter: Option<BoundIter>,
}

/// What a dump found, and which tables it really listed (a table the kernel
/// cannot list proves nothing about the sockets that would be in it).
pub struct Dump {
    pub sockets: Vec<DumpedSocket>,
    pub covered: Tables,
}

/// Cookies of iterator-found sockets whose cookie was never generated: their
/// inode with the top bit set, which no kernel cookie reaches.
const PSEUDO_COOKIE: u64 = 1 << 63;

impl SockDiag {
    pub fn new() -> Result<Self, DumpError> {
        let mut sock = Socket::new(NETLINK_SOCK_DIAG).map_err(DumpError::Open)?;
        sock.bind_auto().map_err(DumpError::Open)?;
        // Large reads: the kernel fills up to the buffer per recv.
        let mut diag = Self { sock, buf: vec![0; 1 << 20], seq: 0, diag_visible: Tables::ALL, bound_iter: None };
        diag.diag_visible = diag.probe_visible()?;
        Ok(diag)
    }

    /// The tables a dump can list on this kernel: sock_diag's, and the bound
    /// table through the iterator where it runs.
    pub fn visible(&self) -> Tables {
        match self.bound_iter {
            Some(_) => self.diag_visible.union(Tables::BOUND),
            None => self.diag_visible,
        }
    }

    /// Lists bound TCP sockets with the socket iterator from now on (full
    /// dumps only: it walks every task's open files), instead of sock_diag
    /// (which can list them only from 6.5; on newer kernels this is for
    /// testing the older kernels' path).
    pub fn set_bound_iter(&mut self, iter: BoundIter) {
        self.diag_visible = self.diag_visible.intersection(Tables::BOUND.complement());
        self.bound_iter = Some(iter);
    }

    /// Whether sock_diag lists TCP sockets that are bound but neither
    /// listening nor connected (state bit 13, Linux 6.5+; vendors backport,
    /// so it is tried rather than read from the version). The probe socket
    /// sets SO_REUSEADDR and never listens: it cannot stop a PostgreSQL-style
    /// listener from binding the port it holds for that moment.
    fn probe_visible(&mut self) -> Result<Tables, DumpError> {
        let (sock, port) = bound_probe().map_err(DumpError::Probe)?;
        let mut out = Vec::new();
        self.dump_one(
            Proto::Tcp,
            Family::Ipv4,
            1 << TCP_BOUND_INACTIVE,
            Some(&port_filter(&[port].into_iter().collect())),
            &mut out,
        )?;
        drop(sock);
        let all_but_bound = Tables::LISTEN.union(Tables::UDP).union(Tables::CONNECTED);
        Ok(if out.iter().any(|s| s.port == port) { Tables::ALL } else { all_but_bound })
    }

    /// Dumps the sockets in `scope` (TCP and UDP, IPv4 and IPv6).
    pub fn dump(&mut self, scope: &Scope) -> Result<Dump, DumpError> {
        let mut out = Vec::new();
        let mut covered = scope.tables.intersection(self.diag_visible);
        for proto in Proto::ALL {
            let filter = match &scope.ports {
                None => None,
                Some(keys) => {
                    let ports: BTreeSet<u16> =
                        keys.iter().filter(|(p, _)| *p == proto).map(|(_, port)| *port).collect();
                    if ports.is_empty() {
                        continue;
                    }
                    Some(port_filter(&ports))
                }
            };
            // Only what this kernel can list: an unknown state bit would make
            // an older kernel walk the established hash for nothing.
            let tables = scope.tables.intersection(self.diag_visible);
            let states = match proto {
                Proto::Udp if tables.contains(Tables::UDP) => UDP_STATES,
                Proto::Tcp => tcp_states(tables),
                Proto::Udp => 0,
            };
            if states == 0 {
                continue;
            }
            for family in [Family::Ipv4, Family::Ipv6] {
                self.dump_one(proto, family, states, filter.as_deref(), &mut out)?;
            }
        }
        // The iterator walks every task's files: full dumps only. Targeted
        // checks of bound sockets rely on their release events instead.
        let iterate = scope.ports.is_none() && scope.tables.contains(Tables::BOUND) && !covered.contains(Tables::BOUND);
        if let (true, Some(iter)) = (iterate, &self.bound_iter) {
            let records = iter.read().map_err(DumpError::Iterator)?;
            let mut seen = BTreeSet::new();
            for r in records {
                let cookie = if r.cookie != 0 { r.cookie } else { PSEUDO_COOKIE | r.ino };
                let Some(family) = Family::from_af(r.family) else { continue };
                if !seen.insert(cookie) {
                    continue; // the same socket open in another task
                }
                out.push(DumpedSocket {
                    cookie,
                    proto: Proto::Tcp,
                    family,
                    addr: addr_from_bytes(family, &r.addr),
                    port: r.port,
                    state: SockState::Bound,
                    cgroup_id: 0,
                    owner: Some(Owner { pid: r.tgid, comm: comm_to_string(&r.comm), cgroup_id: 0 }),
                });
            }
            covered = covered.union(Tables::BOUND);
        }
        Ok(Dump { sockets: out, covered })
    }

    fn dump_one(
        &mut self,
        proto: Proto,
        family: Family,
        states: u32,
        bytecode: Option<&[u8]>,
        out: &mut Vec<DumpedSocket>,
    ) -> Result<(), DumpError> {
        self.seq = self.seq.wrapping_add(1);
        let req = request(self.seq, family, proto, states, bytecode);
        self.sock.send(&req, 0).map_err(|source| DumpError::Send { proto, family, source })?;
        loop {
            let mut window = &mut self.buf[..];
            let n = self.sock.recv(&mut window, 0).map_err(|source| DumpError::Recv { proto, family, source })?;
            if parse_replies(&self.buf[..n.min(self.buf.len())], self.seq, proto, family, out)? {
                return Ok(());
            }
        }
    }
}

/// Builds an `inet_diag_req_v2` dump request, with an optional bytecode filter.
fn request(seq: u32, family: Family, proto: Proto, states: u32, bytecode: Option<&[u8]>) -> Vec<u8> {
    let attr_len = bytecode.map_or(0, |bc| 4 + bc.len());
    let total = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN + attr_len;
    let mut b = Vec::with_capacity(total);
    // nlmsghdr
    b.extend_from_slice(&(total as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed sockid
    b.extend_from_slice(&[family.af(), proto.ipproto(), 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(&[0u8; 48]);
    if let Some(bc) = bytecode {
        b.extend_from_slice(&((4 + bc.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        b.extend_from_slice(bc);
    }
    b
}

/// Bytecode accepting sockets whose local port is one of `ports`.
///
/// The kernel's audit walks the "yes" branches in a line, so each test falls
/// through on a match into a JMP whose 16-bit "no" offset reaches the end
/// (accept), and skips over that JMP otherwise; a last JMP past the end rejects.
/// Block per port: [S_EQ yes=8 no=12][port][JMP yes=4 no=to-end].
fn port_filter(ports: &BTreeSet<u16>) -> Vec<u8> {
    let total = ports.len() * 12 + 4;
    let mut bc = Vec::with_capacity(total);
    let op = |bc: &mut Vec<u8>, code: u8, yes: u8, no: u16| {
        bc.push(code);
        bc.push(yes);
        bc.extend_from_slice(&no.to_ne_bytes());
    };
    for (i, &port) in ports.iter().enumerate() {
        let at = i * 12;
        op(&mut bc, INET_DIAG_BC_S_EQ, 8, 12);
        op(&mut bc, 0, 0, port);
        op(&mut bc, INET_DIAG_BC_JMP, 4, (total - (at + 8)) as u16);
    }
    op(&mut bc, INET_DIAG_BC_JMP, 4, 8); // remaining length 4: jump past the end
    bc
}

/// Parses one recv's worth of netlink messages; true once NLMSG_DONE is seen.
fn parse_replies(
    mut data: &[u8],
    seq: u32,
    proto: Proto,
    family: Family,
    out: &mut Vec<DumpedSocket>,
) -> Result<bool, DumpError> {
    let malformed = |what| DumpError::Malformed { proto, family, what };
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().map_err(|_| malformed("header"))?) as usize;
        let ty = u16::from_ne_bytes([data[4], data[5]]);
        let msg_seq = u32::from_ne_bytes(data[8..12].try_into().map_err(|_| malformed("header"))?);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(malformed("message length"));
        }
        let body = &data[NLMSG_HDRLEN..len];
        data = &data[align4(len).min(data.len())..];
        if msg_seq != seq {
            continue; // a reply to an earlier, abandoned request
        }
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or(malformed("error message"))?;
                if errno == 0 {
                    continue; // an ACK
                }
                return Err(DumpError::Kernel { proto, family, errno: -errno });
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = parse_socket(body, proto) {
                    out.push(s);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

fn parse_socket(body: &[u8], proto: Proto) -> Option<DumpedSocket> {
    if body.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let family = Family::from_af(body[0])?;
    let state = SockState::from_kernel(body[1])?;
    // UDP reports CLOSE for unconnected sockets: that is "bound" as well.
    let port = u16::from_be_bytes([body[4], body[5]]);
    let addr: [u8; 16] = body[8..24].try_into().ok()?;
    let lo = u32::from_ne_bytes(body[44..48].try_into().ok()?) as u64;
    let hi = u32::from_ne_bytes(body[48..52].try_into().ok()?) as u64;
    let mut cgroup_id = 0;
    let mut attrs = &body[INET_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let aty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if alen < 4 || alen > attrs.len() {
            break;
        }
        if aty == INET_DIAG_CGROUP_ID && alen >= 12 {
            cgroup_id = u64::from_ne_bytes(attrs[4..12].try_into().ok()?);
        }
        attrs = &attrs[align4(alen).min(attrs.len())..];
    }
    Some(DumpedSocket {
        cookie: lo | (hi << 32),
        proto,
        family,
        addr: addr_from_bytes(family, &addr),
        port,
        state,
        cgroup_id,
        owner: None,
    })
}

/// A TCP socket with SO_REUSEADDR bound to 127.0.0.1 on a port the kernel
/// picks, never listening; and that port.
fn bound_probe() -> io::Result<(OwnedFd, u16)> {
    // SAFETY: plain socket syscalls on a descriptor owned by the OwnedFd; the
    // option and address buffers are locals of the lengths passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&one as *const libc::c_int).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let mut alen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), alen) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getsockname(fd, (&mut a as *mut libc::sockaddr_in).cast(), &mut alen) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((sock, u16::from_be(a.sin_port)))
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter the way the kernel's inet_diag_bc_run does.
    fn run(bc: &[u8], sport: u16) -> bool {
        let mut off = 0i64;
        let mut len = bc.len() as i64;
        while len > 0 {
            let o = off as usize;
            let (code, yes, no) = (bc[o], bc[o + 1] as i64, u16::from_ne_bytes([bc[o + 2], bc[o + 3]]) as i64);
            let cond = match code {
                INET_DIAG_BC_JMP => false,
                INET_DIAG_BC_S_EQ => sport == u16::from_ne_bytes([bc[o + 6], bc[o + 7]]),
                _ => panic!("unexpected op {code}"),
            };
            let step = if cond { yes } else { no };
            off += step;
            len -= step;
        }
        len == 0
    }

    /// The kernel's inet_diag_bc_audit: yes-branches in a line, jumps aligned,
    /// at most 4 bytes past the end.
    fn audit(bc: &[u8]) -> bool {
        let mut off = 0usize;
        let mut len = bc.len() as i64;
        while len > 0 {
            let (code, yes, no) = (bc[off], bc[off + 1] as i64, u16::from_ne_bytes([bc[off + 2], bc[off + 3]]) as i64);
            let min_len = if code == INET_DIAG_BC_S_EQ { 8 } else { 4 };
            if no < min_len || no > len + 4 || no & 3 != 0 {
                return false;
            }
            if yes < min_len || yes > len + 4 || yes & 3 != 0 {
                return false;
            }
            off += yes as usize;
            len -= yes;
        }
        len == 0
    }

    #[test]
    fn port_filter_accepts_exactly_its_ports_and_passes_the_audit() {
        for set in [vec![5432u16], vec![1, 80, 5432, 65535], (1000..1700).collect::<Vec<_>>()] {
            let ports: BTreeSet<u16> = set.iter().copied().collect();
            let bc = port_filter(&ports);
            assert!(audit(&bc), "audit failed for {} ports", ports.len());
            for p in [0u16, 1, 2, 79, 80, 81, 999, 1000, 1699, 1700, 5432, 65534, 65535] {
                assert_eq!(run(&bc, p), ports.contains(&p), "port {p} in a set of {}", ports.len());
            }
        }
    }

    #[test]
    fn request_layout_matches_the_kernel_header() {
        let req = request(7, Family::Ipv6, Proto::Udp, 0xffff_ffff, None);
        assert_eq!(req.len(), 72);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 72);
        assert_eq!(req[16], 10, "AF_INET6");
        assert_eq!(req[17], 17, "IPPROTO_UDP");
        let with_bc = request(7, Family::Ipv4, Proto::Tcp, 1, Some(&[0u8; 16]));
        assert_eq!(with_bc.len(), 72 + 20);
        assert_eq!(u16::from_ne_bytes([with_bc[72], with_bc[73]]), 20);
    }

    #[test]
    fn truncated_or_garbage_replies_are_errors_not_panics() {
        let mut out = vec![];
        let mut msg = vec![0u8; 16];
        msg[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_replies(&msg, 1, Proto::Tcp, Family::Ipv4, &mut out).is_err());
        assert_eq!(parse_replies(&[1, 2, 3], 1, Proto::Tcp, Family::Ipv4, &mut out).ok(), Some(false));
        assert!(parse_socket(&[0u8; 10], Proto::Tcp).is_none());
    }
}
