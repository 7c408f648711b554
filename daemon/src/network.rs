//! The client network: is the client NIC up, and which address is the
//! client IP. The original polled `ip a` over root ssh every 3 s; here
//! rtnetlink multicast events (links, IPv4 and IPv6 addresses) in the
//! daemon's network namespace trigger a dump of that one NIC, which is the
//! state. A dump also runs at start, when the NIC's name changes, and every
//! `RESYNC` as a safety net for events lost in a full socket buffer.
//!
//! One task owns [`NetworkState`] and publishes it on a watch channel; the
//! sinks read it (HTTP shows it, and in cluster mode the node-status writer
//! turns it into `NodeClientIP` and `NodeClientNetworkUnavailable`).
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    new_multicast_connection,
    packet_core::NetlinkPayload,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags, State},
        RouteNetlinkMessage,
    },
    Handle, MulticastGroup,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{retry::Backoff, tasks::Tasks};

/// Safety net against lost multicast events: a dump of one NIC costs microseconds.
const RESYNC: Duration = Duration::from_secs(30);
/// Events arrive in bursts (a link flap brings link and address messages):
/// one dump after the burst.
const SETTLE: Duration = Duration::from_millis(20);

/// Which NIC to watch and how to pick its client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    pub name: String,
    /// `NET_MASK`: a subnet (`192.0.2.0/24`) or a dotted mask (`255.255.255.0`).
    pub net_mask: Option<String>,
}

/// The three states the operator knows (docs/compat.md: reason of
/// `NodeClientNetworkUnavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LinkState {
    #[serde(rename = "StateUP")]
    Up,
    #[serde(rename = "StateDown")]
    Down,
    #[serde(rename = "StateUnKnown")]
    Unknown,
}

impl LinkState {
    pub fn reason(self) -> &'static str {
        match self {
            LinkState::Up => "StateUP",
            LinkState::Down => "StateDown",
            LinkState::Unknown => "StateUnKnown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Address {
    pub ip: IpAddr,
    pub prefix: u8,
}

/// What `/api/v2/network` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkState {
    /// The client NIC; None until the cluster's settings name it.
    pub nic: Option<String>,
    pub net_mask: Option<String>,
    pub present: bool,
    pub state: LinkState,
    /// The kernel's operational state, as `ip link` prints it.
    pub oper_state: Option<String>,
    pub addresses: Vec<Address>,
    pub client_ip: Option<IpAddr>,
    /// Why there is no client IP, when there is none.
    pub client_ip_error: Option<String>,
    /// Why the client IP is not the one `NET_MASK` asked for (a mask that
    /// matches no address, or one that does not parse), when so.
    pub client_ip_note: Option<String>,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub last_change: Option<SystemTime>,
    pub last_error: Option<String>,
}

impl NetworkState {
    pub(crate) fn unknown(cfg: Option<&NicConfig>) -> Self {
        Self {
            nic: cfg.map(|c| c.name.clone()),
            net_mask: cfg.and_then(|c| c.net_mask.clone()),
            present: false,
            state: LinkState::Unknown,
            oper_state: None,
            addresses: Vec::new(),
            client_ip: None,
            client_ip_error: Some(
                if cfg.is_some() { "not read yet" } else { "waiting for the cluster's settings to name the NIC" }
                    .into(),
            ),
            client_ip_note: None,
            last_change: None,
            last_error: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("NET_MASK {0:?} is neither a subnet like 192.0.2.0/24 nor a mask like 255.255.255.0")]
    Invalid(String),
}

/// A parsed `NET_MASK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mask {
    Subnet {
        net: IpAddr,
        prefix: u8,
    },
    /// A dotted mask alone names no subnet: it picks the address whose own
    /// prefix length it equals.
    PrefixLen(u8),
}

fn parse_mask(s: &str) -> Result<Mask, MaskError> {
    let bad = || MaskError::Invalid(s.to_owned());
    if let Some((net, len)) = s.split_once('/') {
        let net: IpAddr = net.trim().parse().map_err(|_| bad())?;
        let prefix: u8 = len.trim().parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        return Ok(Mask::Subnet { net, prefix });
    }
    let m: Ipv4Addr = s.trim().parse().map_err(|_| bad())?;
    let bits = u32::from(m);
    // A mask is ones then zeros.
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(bad());
    }
    Ok(Mask::PrefixLen(bits.leading_ones() as u8))
}

fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false, // never an address of the other family by accident
    }
}

/// The client IP, and why it is not what `NET_MASK` asked for when so.
#[derive(Debug, PartialEq, Eq)]
struct Choice {
    ip: Result<IpAddr, String>,
    note: Option<String>,
}

/// The client IP among the NIC's addresses (IPv4 first, never link-local).
///
/// `NET_MASK` never makes the answer worse than the original daemon's, which
/// ignored it and published the NIC's first IPv4 (and the operator's chart
/// ships `255.255.0.0` whatever the real subnet is):
/// - a subnet (`192.0.2.0/24`) selects exactly: an address inside it, or none;
/// - a bare mask (`255.255.0.0`) names no subnet, only a prefix length: an
///   address of that length is preferred, else the first IPv4, with a note;
/// - a value that parses as neither is ignored, with a note.
fn choose(addresses: &[Address], mask: Option<&str>) -> Choice {
    let usable =
        |a: &&Address| !a.ip.is_loopback() && !matches!(a.ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    let mut candidates: Vec<&Address> = addresses.iter().filter(usable).collect();
    candidates.sort_by_key(|a| !a.ip.is_ipv4()); // IPv4 first, order kept otherwise
    let first_v4 = || candidates.iter().find(|a| a.ip.is_ipv4()).map(|a| a.ip).ok_or("the NIC has no IPv4 address");
    let original = "the NIC's first IPv4 is used, as the original daemon did";
    let Some(m) = mask else {
        return Choice { ip: first_v4().map_err(str::to_owned), note: None };
    };
    match parse_mask(m) {
        Err(e) => Choice { ip: first_v4().map_err(str::to_owned), note: Some(format!("{e}: ignored; {original}")) },
        Ok(Mask::Subnet { net, prefix }) => Choice {
            ip: candidates
                .iter()
                .find(|a| in_subnet(a.ip, net, prefix))
                .map(|a| a.ip)
                .ok_or_else(|| format!("no address of the NIC is inside NET_MASK {m}")),
            note: None,
        },
        Ok(Mask::PrefixLen(p)) => match candidates.iter().find(|a| a.ip.is_ipv4() && a.prefix == p) {
            Some(a) => Choice { ip: Ok(a.ip), note: None },
            None => Choice {
                ip: first_v4().map_err(str::to_owned),
                note: Some(format!(
                    "no IPv4 address of the NIC has the prefix length /{p} of NET_MASK {m}; {original}"
                )),
            },
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
}

/// Starts the owner task. `nic` may change at any time (ccm-config); while
/// it is None (the cluster's settings not read yet) no NIC is watched. The
/// task is restartable: its state is the kernel's, dumped again on start.
pub fn spawn(
    nic: watch::Receiver<Option<NicConfig>>,
    tasks: &Tasks,
) -> Result<watch::Receiver<NetworkState>, NetworkError> {
    // The first connection is opened here, so a daemon that cannot open
    // rtnetlink at all says so at start.
    let mut first = Some(connect().map_err(NetworkError::Socket)?);
    let (tx, rx) = watch::channel(NetworkState::unknown(nic.borrow().as_ref()));
    let shutdown = tasks.shutdown();
    tasks.restartable("network", move || follow(first.take(), nic.clone(), tx.clone(), shutdown.clone()));
    Ok(rx)
}

/// Follows the NIC until shutdown: a dump at start, on every link or address
/// event (a burst costs one), on every change of `nic`, and every `RESYNC`.
async fn follow(
    conn: Option<(Handle, Events)>,
    mut nic: watch::Receiver<Option<NicConfig>>,
    tx: watch::Sender<NetworkState>,
    shutdown: CancellationToken,
) {
    let mut reconnect = Backoff::with(Duration::from_millis(500), RESYNC);
    let (mut handle, mut events) = match conn {
        Some(c) => c,
        None => loop {
            match connect() {
                Ok(c) => break c,
                Err(e) => {
                    let wait = reconnect.next_wait();
                    tracing::warn!(error = %e, retry_in = ?wait, "opening rtnetlink failed");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        },
    };
    let mut cfg = nic.borrow_and_update().clone();
    let mut resync = tokio::time::interval(RESYNC);
    // Standalone, the NIC comes from flags and never changes.
    let mut nic_open = true;
    loop {
        let state = match &cfg {
            Some(c) => dump(&handle, c).await,
            None => NetworkState::unknown(None),
        };
        tx.send_if_modified(|cur| {
            let same = NetworkState { last_change: cur.last_change, ..state.clone() } == *cur;
            if !same {
                if state.client_ip_note.is_some() && state.client_ip_note != cur.client_ip_note {
                    tracing::warn!(nic = ?state.nic, note = ?state.client_ip_note, "client IP not chosen by NET_MASK");
                }
                *cur = NetworkState { last_change: Some(SystemTime::now()), ..state.clone() };
                tracing::info!(nic = ?cur.nic, state = cur.state.reason(), client_ip = ?cur.client_ip, "client network changed");
            }
            !same
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = resync.tick() => {}
            r = nic.changed(), if nic_open => match r {
                Ok(()) => cfg = nic.borrow_and_update().clone(),
                Err(_) => nic_open = false,
            },
            ev = events.next() => match ev {
                None => {
                    // The netlink connection failed: open a new one (the
                    // resync timer keeps the state honest meanwhile).
                    let wait = reconnect.next_wait();
                    tracing::warn!(retry_in = ?wait, "rtnetlink event stream ended; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    match connect() {
                        Ok((h, e)) => {
                            (handle, events) = (h, e);
                            reconnect.reset();
                        }
                        Err(e) => tracing::warn!(error = %e, "rtnetlink reconnect failed"),
                    }
                }
                Some((msg, _)) if !is_link_or_address(&msg.payload) => continue,
                Some(_) => {
                    // Let the burst finish, then drain it: one dump serves all.
                    tokio::time::sleep(SETTLE).await;
                    while events.try_recv().is_ok() {}
                }
            },
        }
    }
}

type Events = futures_channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::proto::sys::SocketAddr,
)>;

/// A route-netlink connection subscribed to link and address events; the
/// handle issues dumps over the same socket.
fn connect() -> std::io::Result<(Handle, Events)> {
    let groups = [MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr];
    let (conn, handle, events) = new_multicast_connection(&groups)?;
    tokio::spawn(conn);
    Ok((handle, events))
}

fn is_link_or_address(payload: &NetlinkPayload<RouteNetlinkMessage>) -> bool {
    matches!(
        payload,
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(_)
                | RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_)
        )
    )
}

/// The NIC's link and addresses, now.
async fn dump(handle: &Handle, cfg: &NicConfig) -> NetworkState {
    let mut st = NetworkState::unknown(Some(cfg));
    st.client_ip_error = None;
    let link = handle.link().get().match_name(cfg.name.clone()).execute().try_next().await;
    let link = match link {
        Ok(Some(l)) => l,
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => {
            st.client_ip_error = Some(format!("NIC {} not found", cfg.name));
            return st; // missing NIC: StateUnKnown, no client IP
        }
        Err(e) => {
            st.last_error = Some(e.to_string());
            st.client_ip_error = Some(format!("reading NIC {}: {e}", cfg.name));
            return st;
        }
    };
    st.present = true;
    let oper = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::OperState(s) => Some(*s),
        _ => None,
    });
    st.oper_state = oper.map(|s| format!("{s:?}").to_uppercase());
    let flags = link.header.flags;
    st.state = match oper {
        Some(State::Up) => LinkState::Up,
        // Some drivers never report an operational state: trust the flags.
        Some(State::Unknown) | None if flags.contains(LinkFlags::Up | LinkFlags::LowerUp) => LinkState::Up,
        _ => LinkState::Down,
    };
    let index = link.header.index;
    let addrs: Result<Vec<_>, _> = handle.address().get().set_link_index_filter(index).execute().try_collect().await;
    match addrs {
        Ok(msgs) => {
            for m in msgs.into_iter().filter(|m| m.header.index == index) {
                // IFA_LOCAL is the interface's own address on point-to-point links.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = local.or(addr) {
                    st.addresses.push(Address { ip, prefix: m.header.prefix_len });
                }
            }
        }
        Err(e) => st.last_error = Some(e.to_string()),
    }
    let choice = choose(&st.addresses, cfg.net_mask.as_deref());
    st.client_ip_note = choice.note;
    match choice.ip {
        Ok(ip) => st.client_ip = Some(ip),
        Err(why) => st.client_ip_error = Some(why),
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str, prefix: u8) -> Address {
        Address { ip: s.parse().expect("ip"), prefix }
    }

    #[test]
    fn choosing_the_client_ip() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let addrs = [a("fe80::1", 64), a("2001:db8::5", 64), a("198.51.100.7", 24), a("192.0.2.9", 26)];
        let pick = |mask| choose(&addrs, mask);
        assert_eq!(pick(None), Choice { ip: Ok(ip("198.51.100.7")), note: None }, "IPv4 first");
        assert_eq!(pick(Some("192.0.2.0/24")).ip, Ok(ip("192.0.2.9")), "a subnet selects exactly");
        assert_eq!(pick(Some("2001:db8::/32")).ip, Ok(ip("2001:db8::5")));
        assert!(pick(Some("203.0.113.0/24")).ip.is_err(), "a subnet that matches nothing gives none");
        assert_eq!(pick(Some("255.255.255.192")), Choice { ip: Ok(ip("192.0.2.9")), note: None });
        assert!(choose(&[a("2001:db8::5", 64)], None).ip.is_err(), "never IPv6 for the IPv4 condition by accident");
    }

    /// The operator's chart and the original's deploy/all.yaml ship
    /// `NET_MASK: 255.255.0.0` whatever the client subnet is: the answer
    /// must never be worse than the original's (the NIC's first IPv4).
    #[test]
    fn the_shipped_mask_never_loses_the_client_ip() {
        let on_24 = [a("192.0.2.10", 24)];
        let c = choose(&on_24, Some("255.255.0.0"));
        assert_eq!(c.ip, Ok("192.0.2.10".parse().expect("ip")));
        assert!(c.note.as_deref().is_some_and(|n| n.contains("/16")), "{c:?}");
        for bad in ["255.0.255.0", "banana", "192.0.2.0/99"] {
            let c = choose(&on_24, Some(bad));
            assert_eq!(c.ip, Ok("192.0.2.10".parse().expect("ip")), "{bad}");
            assert!(c.note.as_deref().is_some_and(|n| n.contains("ignored")), "{bad}: {c:?}");
        }
    }
}
