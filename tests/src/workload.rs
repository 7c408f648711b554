//! A randomized socket workload: the ways real programs come to hold ports.
//! Deterministic for a given seed, so a failure can be replayed.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use rand::{rngs::SmallRng, Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};

use crate::oracle::wildcard;

/// Ports the workload binds explicitly; the namespace's ephemeral range
/// should sit right above, so bind(0) and connects land in the tested band.
pub struct Band {
    pub fixed: std::ops::RangeInclusive<u16>,
}

struct Held {
    sock: Socket,
    tcp: bool,
    v6: bool,
    listening: bool,
    bound: bool,
}

pub struct Workload {
    rng: SmallRng,
    held: Vec<Held>,
    band: Band,
    pub counts: std::collections::BTreeMap<&'static str, usize>,
}

fn loopback(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::from((Ipv6Addr::LOCALHOST, port))
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }
}

impl Workload {
    pub fn new(seed: u64, band: Band) -> Self {
        Self { rng: SmallRng::seed_from_u64(seed), held: Vec::new(), band, counts: Default::default() }
    }

    pub fn open_sockets(&self) -> usize {
        self.held.len()
    }

    /// Each socket the workload holds on `port`, described (for a failure
    /// message: what the kernel refuses a listener for, seen from the owner).
    pub fn held_on(&self, port: u16) -> Vec<String> {
        use std::os::fd::AsRawFd as _;
        self.held
            .iter()
            .filter(|h| h.sock.local_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.port() == port))
            .map(|h| {
                let mut state = 0u8;
                if h.tcp {
                    // tcp_info starts with tcpi_state.
                    let mut info = [0u8; 232];
                    let mut len = info.len() as libc::socklen_t;
                    // SAFETY: a valid fd and a buffer of `len` bytes.
                    let rc = unsafe {
                        libc::getsockopt(
                            h.sock.as_raw_fd(),
                            libc::IPPROTO_TCP,
                            libc::TCP_INFO,
                            info.as_mut_ptr().cast(),
                            &mut len,
                        )
                    };
                    if rc == 0 {
                        state = info[0];
                    }
                }
                format!(
                    "{} {:?} v6only={:?} reuseaddr={:?} reuseport={:?} listening={} bound={} tcp_state={state} peer={:?}",
                    if h.tcp { "tcp" } else { "udp" },
                    h.sock.local_addr().ok().and_then(|a| a.as_socket()),
                    h.v6.then(|| h.sock.only_v6().ok()).flatten(),
                    h.sock.reuse_address().ok(),
                    h.sock.reuse_port().ok(),
                    h.listening,
                    h.bound,
                    h.sock.peer_addr().ok().and_then(|a| a.as_socket()),
                )
            })
            .collect()
    }

    fn new_socket(&mut self, tcp: bool, v6: bool) -> Option<Socket> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let (ty, proto) = if tcp { (Type::STREAM, Protocol::TCP) } else { (Type::DGRAM, Protocol::UDP) };
        let s = Socket::new(domain, ty, Some(proto)).ok()?;
        if self.rng.random_bool(0.5) {
            s.set_reuse_address(true).ok()?;
        }
        if v6 && self.rng.random_bool(0.3) {
            s.set_only_v6(true).ok()?;
        }
        Some(s)
    }

    fn fixed_port(&mut self) -> u16 {
        self.rng.random_range(self.band.fixed.clone())
    }

    fn count(&mut self, op: &'static str) {
        *self.counts.entry(op).or_default() += 1;
    }

    /// Runs `ops` random operations.
    pub fn run(&mut self, ops: usize) {
        for _ in 0..ops {
            let roll = self.rng.random_range(0..100);
            let (tcp, v6) = (self.rng.random_bool(0.6), self.rng.random_bool(0.4));
            match roll {
                0..=14 => self.bind(tcp, v6, true),
                15..=21 => self.bind(tcp, v6, false),
                22..=29 => self.listen_bound(),
                30..=35 => self.listen_unbound(v6),
                36..=45 => self.connect_tcp(),
                46..=49 => self.connect_nowhere(v6),
                50..=55 => self.udp_autobind(v6),
                56..=59 => self.reuseport_pair(v6),
                _ => self.close_one(),
            }
        }
    }

    fn bind(&mut self, tcp: bool, v6: bool, fixed: bool) {
        let Some(s) = self.new_socket(tcp, v6) else {
            return;
        };
        let port = if fixed { self.fixed_port() } else { 0 };
        if s.bind(&wildcard(v6, port).into()).is_ok() {
            self.count(if fixed { "bind_port" } else { "bind_zero" });
            self.held.push(Held { sock: s, tcp, v6, listening: false, bound: true });
        }
    }

    fn listen_bound(&mut self) {
        let candidates: Vec<usize> = (0..self.held.len())
            .filter(|i| self.held[*i].tcp && self.held[*i].bound && !self.held[*i].listening)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[self.rng.random_range(0..candidates.len())];
        if self.held[i].sock.listen(64).is_ok() {
            self.held[i].listening = true;
            self.count("listen_bound");
        }
    }

    fn listen_unbound(&mut self, v6: bool) {
        let Some(s) = self.new_socket(true, v6) else {
            return;
        };
        if s.listen(64).is_ok() {
            self.count("listen_autobind");
            self.held.push(Held { sock: s, tcp: true, v6, listening: true, bound: true });
        }
    }

    fn connect_tcp(&mut self) {
        let listeners: Vec<(bool, u16)> = self
            .held
            .iter()
            .filter(|h| h.listening)
            .filter_map(|h| Some((h.v6, h.sock.local_addr().ok()?.as_socket()?.port())))
            .collect();
        if listeners.is_empty() {
            return;
        }
        let (v6, port) = listeners[self.rng.random_range(0..listeners.len())];
        let Some(c) = self.new_socket(true, v6) else {
            return;
        };
        if c.connect_timeout(&loopback(v6, port).into(), Duration::from_millis(200)).is_ok() {
            self.count("connect");
            self.held.push(Held { sock: c, tcp: true, v6, listening: false, bound: true });
        }
    }

    /// A connect that is refused: the autobound port is held, then freed
    /// without close() (what the tracepoint's CLOSE hint is for).
    fn connect_nowhere(&mut self, v6: bool) {
        let Some(c) = self.new_socket(true, v6) else {
            return;
        };
        let port = self.fixed_port();
        let _ = c.connect_timeout(&loopback(v6, port).into(), Duration::from_millis(200));
        self.count("connect_refused");
        self.held.push(Held { sock: c, tcp: true, v6, listening: false, bound: false });
    }

    /// UDP sendto without bind: an autobind no hook reports.
    fn udp_autobind(&mut self, v6: bool) {
        let Some(s) = self.new_socket(false, v6) else {
            return;
        };
        let dest = loopback(v6, self.fixed_port());
        let ok = if self.rng.random_bool(0.5) {
            s.send_to(b"x", &dest.into()).is_ok()
        } else {
            s.connect(&dest.into()).is_ok()
        };
        if ok {
            self.count("udp_autobind");
            self.held.push(Held { sock: s, tcp: false, v6, listening: false, bound: true });
        }
    }

    fn reuseport_pair(&mut self, v6: bool) {
        let port = self.fixed_port();
        for _ in 0..2 {
            let Some(s) = self.new_socket(true, v6) else {
                return;
            };
            if s.set_reuse_port(true).is_err() || s.bind(&wildcard(v6, port).into()).is_err() || s.listen(16).is_err() {
                return;
            }
            self.count("reuseport");
            self.held.push(Held { sock: s, tcp: true, v6, listening: true, bound: true });
        }
    }

    fn close_one(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.held.len());
        let h = self.held.swap_remove(i);
        if h.tcp && !h.listening && self.rng.random_bool(0.3) {
            // Abortive close: RST, no TIME_WAIT.
            let _ = h.sock.set_linger(Some(Duration::ZERO));
            self.count("close_rst");
        } else {
            self.count("close");
        }
        drop(h);
    }

    /// Opens `n` listeners on consecutive fixed ports as fast as possible
    /// (each bind and listen is an event): a burst for the lost-event test.
    pub fn burst(&mut self, n: usize) -> usize {
        let mut ok = 0;
        for port in self.band.fixed.clone().take(n) {
            let Some(s) = self.new_socket(true, false) else {
                continue;
            };
            if s.bind(&wildcard(false, port).into()).is_ok() && s.listen(1).is_ok() {
                ok += 1;
                self.held.push(Held { sock: s, tcp: true, v6: false, listening: true, bound: true });
            }
        }
        ok
    }

    /// Binds `n` TCP sockets to fixed ports and never listens on them (the
    /// kind sock_diag lists only from Linux 6.5). The caller holds them: the
    /// workload's random closes never touch them.
    pub fn bound_only(&mut self, n: usize) -> Vec<(Socket, u16)> {
        let mut held = Vec::new();
        while held.len() < n {
            let v6 = self.rng.random_bool(0.4);
            let Some(s) = self.new_socket(true, v6) else { continue };
            // Without SO_REUSEADDR: such a socket blocks every listener.
            let _ = s.set_reuse_address(false);
            let port = self.fixed_port();
            if s.bind(&wildcard(v6, port).into()).is_ok() {
                self.count("bind_only_tcp");
                held.push((s, port));
            }
        }
        held
    }

    pub fn close_all(&mut self) {
        self.held.clear();
    }
}
