//! The kernel as the judge of "taken" (docs/design.md's definition): TCP port P is
//! taken when a SO_REUSEADDR listener on 0.0.0.0:P or [::]:P fails; UDP P is
//! taken when a UDP bind of 0.0.0.0:P or [::]:P fails. Call it on the thread
//! (namespace) whose ports are judged. It binds for a moment: ask the daemon
//! first, then the oracle.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// The wildcard address of a family: 0.0.0.0:port or [::]:port.
pub fn wildcard(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
    }
}

fn can_listen(v6: bool, port: u16) -> bool {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let Ok(s) = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) else {
        return false;
    };
    s.set_reuse_address(true).is_ok() && s.bind(&wildcard(v6, port).into()).is_ok() && s.listen(16).is_ok()
}

fn can_bind_udp(v6: bool, port: u16) -> bool {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let Ok(s) = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)) else {
        return false;
    };
    s.bind(&wildcard(v6, port).into()).is_ok()
}

pub fn tcp_taken(port: u16) -> bool {
    !can_listen(false, port) || !can_listen(true, port)
}

pub fn udp_taken(port: u16) -> bool {
    !can_bind_udp(false, port) || !can_bind_udp(true, port)
}

/// Compares the daemon's answer with the oracle over `ports`.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Taken by the kernel's word but reported free: must be empty.
    pub false_free: Vec<(&'static str, u16)>,
    /// Reported taken though the kernel would allow it (the goal is none).
    pub false_busy: Vec<(&'static str, u16)>,
    /// Taken by the kernel's word, not listed by the daemon, but inside a
    /// blind spot it declares (answered unsure, never free and certain).
    pub unsure_taken: Vec<(&'static str, u16)>,
    pub taken: usize,
}

/// Like [`judge`], with what the daemon vouches for: a port it does not list
/// counts as answered free only where it is certain for that protocol.
pub fn judge_answers(ports: std::ops::RangeInclusive<u16>, a: &crate::Answers) -> Verdict {
    let mut v = judge(ports, &a.tcp, &a.udp);
    let certain = |proto: &str| if proto == "tcp" { a.tcp_certain } else { a.udp_certain };
    let (unsure, sure): (Vec<_>, Vec<_>) = v.false_free.into_iter().partition(|(proto, _)| !certain(proto));
    v.false_free = sure;
    v.unsure_taken = unsure;
    v
}

pub fn judge(
    ports: std::ops::RangeInclusive<u16>,
    daemon_tcp: &std::collections::BTreeSet<u16>,
    daemon_udp: &std::collections::BTreeSet<u16>,
) -> Verdict {
    let mut v = Verdict::default();
    for p in ports {
        for (proto, kernel, daemon) in
            [("tcp", tcp_taken(p), daemon_tcp.contains(&p)), ("udp", udp_taken(p), daemon_udp.contains(&p))]
        {
            v.taken += usize::from(kernel);
            match (kernel, daemon) {
                (true, false) => v.false_free.push((proto, p)),
                (false, true) => v.false_busy.push((proto, p)),
                _ => {}
            }
        }
    }
    v
}
