//! The vocabulary of the port map: protocols, families, socket states, and a
//! socket as the map records it. Serialised names are the API's names.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::SystemTime,
};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    pub fn from_ipproto(p: u8) -> Option<Self> {
        match p {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn ipproto(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl FromStr for Proto {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn from_af(af: u8) -> Option<Self> {
        match af {
            2 => Some(Self::Ipv4),
            10 => Some(Self::Ipv6),
            _ => None,
        }
    }

    pub fn af(self) -> u8 {
        match self {
            Self::Ipv4 => 2,
            Self::Ipv6 => 10,
        }
    }
}

impl FromStr for Family {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "ipv4" | "inet" | "4" => Ok(Self::Ipv4),
            "ipv6" | "inet6" | "6" => Ok(Self::Ipv6),
            _ => Err(()),
        }
    }
}

/// A socket's state as far as port occupancy goes. TCP states keep the
/// kernel's names; `Bound` is a TCP socket in CLOSE that still holds its port
/// (bound, not listening or connected) or an unconnected UDP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SockState {
    Listen,
    Bound,
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    CloseWait,
    LastAck,
    Closing,
}

impl SockState {
    /// From the kernel's TCP state numbers (include/net/tcp_states.h), which
    /// sock_diag also uses for UDP (CLOSE = unconnected, ESTABLISHED = connected).
    pub fn from_kernel(state: u8) -> Option<Self> {
        Some(match state {
            1 => Self::Established,
            2 => Self::SynSent,
            3 | 12 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Bound,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listen => "listen",
            Self::Bound => "bound",
            Self::Established => "established",
            Self::SynSent => "syn_sent",
            Self::SynRecv => "syn_recv",
            Self::FinWait1 => "fin_wait1",
            Self::FinWait2 => "fin_wait2",
            Self::TimeWait => "time_wait",
            Self::CloseWait => "close_wait",
            Self::LastAck => "last_ack",
            Self::Closing => "closing",
        }
    }
}

impl FromStr for SockState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        (1..=12).filter_map(Self::from_kernel).find(|st| st.as_str() == s).ok_or(())
    }
}

/// Who made the socket hold its port, as the eBPF hook saw it. Each field
/// may be unknown where the running kernel does not let that hook read it
/// (0 or empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    /// cgroup v2 id of the task; resolved to a container id for the API.
    #[serde(skip)]
    pub cgroup_id: u64,
}

impl Owner {
    /// This owner, with the fields it does not know taken from `other`.
    pub fn or(self, other: &Owner) -> Owner {
        Owner {
            pid: if self.pid != 0 { self.pid } else { other.pid },
            comm: if self.comm.is_empty() { other.comm.clone() } else { self.comm },
            cgroup_id: if self.cgroup_id != 0 { self.cgroup_id } else { other.cgroup_id },
        }
    }
}

/// Where the map first learned about a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Event,
    Snapshot,
    /// The kernel's tracking table (bound sockets whose events were lost,
    /// on kernels whose dumps cannot show bound sockets).
    Kernel,
}

/// One socket that holds a local port.
#[derive(Clone, Debug)]
pub struct Socket {
    pub cookie: u64,
    pub proto: Proto,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub state: SockState,
    /// SO_REUSEADDR, when an event told; unknown for sockets only dumps saw.
    pub reuse: Option<bool>,
    pub owner: Option<Owner>,
    /// cgroup id of the socket itself (from sock_diag), when no task owner is known.
    pub sock_cgroup_id: u64,
    pub source: Source,
    pub first_seen: SystemTime,
    /// CLOCK_MONOTONIC ns of the last event about this socket; 0 when none.
    /// A snapshot that started before this instant cannot remove the socket.
    pub last_event_ns: u64,
    /// Its release was reported: the close that follows frees a bound or
    /// listening socket's port, so a dump may remove it even from a table
    /// sock_diag cannot list.
    pub released: bool,
    /// The kernel could not track it: its release will not be reported.
    pub untracked: bool,
}

impl Socket {
    /// Whether this socket makes its port taken by docs/design.md's definition:
    /// a SO_REUSEADDR listener on the wildcard address would fail. The kernel
    /// (inet_bind_conflict) lets such a listener share the port with sockets
    /// that set SO_REUSEADDR themselves and are not listening; every UDP
    /// socket blocks a plain UDP bind. Unknown counts as blocking.
    pub fn blocks(&self) -> bool {
        match self.proto {
            Proto::Udp => true,
            Proto::Tcp => self.state == SockState::Listen || self.reuse != Some(true),
        }
    }
}

/// Decodes the 16-byte address field shared by events and sock_diag replies
/// (network byte order; IPv4 in the first four bytes).
pub fn addr_from_bytes(family: Family, raw: &[u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(*raw)),
    }
}

/// The inverse of [`addr_from_bytes`].
pub fn addr_to_bytes(addr: IpAddr) -> [u8; 16] {
    let mut raw = [0u8; 16];
    match addr {
        IpAddr::V4(a) => raw[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => raw = a.octets(),
    }
    raw
}

/// A kernel `comm` (NUL padded) as text.
pub fn comm_to_string(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for k in 1..=12u8 {
            let st = SockState::from_kernel(k).expect("known state");
            assert_eq!(st.as_str().parse::<SockState>(), Ok(st));
        }
        assert!(SockState::from_kernel(13).is_none());
        assert!("LISTEN".parse::<SockState>().is_err());
    }

    #[test]
    fn addresses_decode_in_network_order() {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&[192, 0, 2, 7]);
        assert_eq!(addr_from_bytes(Family::Ipv4, &raw).to_string(), "192.0.2.7");
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(addr_from_bytes(Family::Ipv6, &v6.octets()), IpAddr::V6(v6));
    }
}
