//! The port map: every socket that holds a local port in the watched network
//! namespace, indexed by port. Pure data and merge rules, no I/O, so the
//! rules that keep it safe are unit-tested here.
//!
//! The safety rule is asymmetric:
//! - an event that shows a socket holding a port adds it at once;
//! - nothing removes a socket except a sock_diag dump that *started after*
//!   the socket's last event and does not contain it.
//!
//! So a lost, late or reordered event can make a port look busy for a while
//! (until the next dump), but it can never make a taken port look free.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    ops::RangeInclusive,
    time::SystemTime,
};

use polarstack_ebpf_common::{EventKind, TrackedSocket};

use super::model::{addr_from_bytes, addr_to_bytes, Family, Owner, Proto, SockState, Socket, Source};

/// A port of one protocol: the unit of "taken".
pub type PortKey = (Proto, u16);

/// One event from the eBPF programs, decoded and validated.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventKind,
    pub ts_ns: u64,
    pub cookie: u64,
    pub netns_cookie: u64,
    pub proto: Proto,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub owner: Option<Owner>,
    /// The kernel could not enter the socket in its tracking table: its
    /// release will not be reported.
    pub untracked: bool,
    /// The hook could not tell the socket's namespace: only a dump (which
    /// sees this namespace alone) may add it.
    pub netns_unknown: bool,
    pub reuse: Option<bool>,
}

/// One socket as a sock_diag dump reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedSocket {
    pub cookie: u64,
    pub proto: Proto,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub state: SockState,
    pub cgroup_id: u64,
    /// The task holding it, where the dump can tell (the socket iterator).
    pub owner: Option<Owner>,
}

/// A set of the kernel's socket tables, as a dump walks them. What each
/// costs on a host with N connections (measured, `cargo xtask bench ports`):
/// the TCP listening hash and the UDP tables well under a millisecond; TCP's
/// bound-but-inactive walk and its established hash grow with N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables(u8);

impl Tables {
    pub const NONE: Tables = Tables(0);
    /// TCP listeners.
    pub const LISTEN: Tables = Tables(1);
    /// TCP sockets bound but neither listening nor connected (kernel 6.5+).
    pub const BOUND: Tables = Tables(2);
    /// UDP sockets.
    pub const UDP: Tables = Tables(4);
    /// TCP's established hash: connected, closing and TIME_WAIT sockets.
    pub const CONNECTED: Tables = Tables(8);
    pub const ALL: Tables = Tables(15);

    pub fn union(self, other: Tables) -> Tables {
        Tables(self.0 | other.0)
    }

    pub fn intersection(self, other: Tables) -> Tables {
        Tables(self.0 & other.0)
    }

    pub fn complement(self) -> Tables {
        Tables(Tables::ALL.0 & !self.0)
    }

    pub fn contains(self, other: Tables) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersects(self, other: Tables) -> bool {
        self.0 & other.0 != 0
    }

    /// The table a socket in this protocol and state lives in.
    pub fn of(proto: Proto, state: SockState) -> Tables {
        match (proto, state) {
            (Proto::Udp, _) => Tables::UDP,
            (Proto::Tcp, SockState::Listen) => Tables::LISTEN,
            (Proto::Tcp, SockState::Bound) => Tables::BOUND,
            (Proto::Tcp, _) => Tables::CONNECTED,
        }
    }
}

/// What a dump covered: some tables, for every port or for some.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub tables: Tables,
    pub ports: Option<BTreeSet<PortKey>>,
}

impl Scope {
    /// Every socket: start-up, lost events, the slow periodic resync.
    pub const FULL: Scope = Scope { tables: Tables::ALL, ports: None };
    /// Listeners and UDP sockets, the cheap tables: the fast periodic resync.
    pub const FAST: Scope = Scope { tables: Tables(Tables::LISTEN.0 | Tables::UDP.0), ports: None };

    /// Verification of possibly freed ports in the tables their sockets were in.
    pub fn ports(keys: BTreeSet<PortKey>, tables: Tables) -> Self {
        Scope { tables, ports: Some(keys) }
    }

    pub fn has_port(&self, key: &PortKey) -> bool {
        self.ports.as_ref().is_none_or(|set| set.contains(key))
    }

    /// Whether the dump would have shown this socket if it still existed.
    pub fn covers(&self, s: &Socket) -> bool {
        self.has_port(&(s.proto, s.port)) && self.tables.contains(Tables::of(s.proto, s.state))
    }
}

/// A finished dump: what it saw, and when it started (CLOCK_MONOTONIC ns).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub started_ns: u64,
    /// What was asked for.
    pub scope: Scope,
    /// The tables of `scope` the kernel could really list.
    pub covered: Tables,
    pub sockets: Vec<DumpedSocket>,
}

/// A port becoming taken or free; what the watch stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Taken(PortKey),
    Freed(PortKey),
}

/// What an event asks of the map's owner besides the update itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventEffect {
    /// Nothing more to do.
    Applied,
    /// The port may have been freed: verify it with a dump of these tables.
    Verify(PortKey, Tables),
    /// The event did not describe a usable socket (e.g. port 0 before an
    /// IP_BIND_ADDRESS_NO_PORT connect); the later event will.
    Ignored,
}

/// How a dump changed the map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Sockets the dump showed that the map did not have.
    pub added: Vec<u64>,
    /// Sockets removed because the dump no longer showed them.
    pub removed: Vec<u64>,
    /// Those of them the kernel may still track (bound, listening, UDP):
    /// their entries can go.
    pub untrack: Vec<u64>,
}

#[derive(Debug)]
pub struct PortMap {
    sockets: HashMap<u64, Socket>,
    /// Every socket holding each port.
    by_port: BTreeMap<PortKey, BTreeSet<u64>>,
    /// How many of them make the port taken ([`Socket::blocks`]); a port is
    /// taken exactly when it has an entry here.
    blocking: BTreeMap<PortKey, usize>,
    /// The sockets whose release the kernel cannot report (`untracked`):
    /// few, and asked about after every batch, so kept apart rather than
    /// found by walking every socket (connected ones included) each time.
    untracked: BTreeSet<u64>,
    /// The tables sock_diag can list on this kernel: a dump proves a socket
    /// gone only from these (before 6.5 it cannot list bound TCP sockets).
    visible: Tables,
}

impl Default for PortMap {
    fn default() -> Self {
        Self::new(Tables::ALL)
    }
}

impl PortMap {
    /// An empty map for a kernel whose dumps can list `visible`.
    pub fn new(visible: Tables) -> Self {
        Self {
            sockets: HashMap::new(),
            by_port: BTreeMap::new(),
            blocking: BTreeMap::new(),
            untracked: BTreeSet::new(),
            visible,
        }
    }

    /// Bound TCP sockets whose release the kernel cannot report (its
    /// tracking table was full) on a kernel whose dumps cannot show them
    /// either: they stay in the map until a dump shows them in another
    /// state, so their ports may read taken after they are free.
    pub fn unverifiable(&self) -> impl Iterator<Item = &Socket> + '_ {
        self.untracked.iter().filter_map(|c| self.sockets.get(c)).filter(|s| self.is_unverifiable(s))
    }

    /// See [`PortMap::unverifiable`].
    pub fn is_unverifiable(&self, s: &Socket) -> bool {
        s.untracked && !self.visible.contains(Tables::of(s.proto, s.state))
    }

    /// Whether a dump that missed `s` proves it gone: it was asked for the
    /// socket's port and table, and either it could list that table or the
    /// socket's release was seen (the close that follows a release frees a
    /// bound port at once).
    fn proves_gone(snap: &Snapshot, s: &Socket) -> bool {
        let table = Tables::of(s.proto, s.state);
        snap.scope.covers(s) && (snap.covered.contains(table) || s.released)
    }

    /// Number of sockets held.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Number of distinct taken ports of `proto`.
    pub fn taken_count(&self, proto: Proto) -> usize {
        self.blocking.range((proto, 0)..=(proto, u16::MAX)).count()
    }

    pub fn is_taken(&self, key: PortKey) -> bool {
        self.blocking.contains_key(&key)
    }

    /// Taken ports of `proto` within `range`, ascending.
    pub fn taken_in(&self, proto: Proto, range: RangeInclusive<u16>) -> impl Iterator<Item = u16> + '_ {
        self.blocking.range((proto, *range.start())..=(proto, *range.end())).map(|((_, port), _)| *port)
    }

    /// The sockets on one port.
    pub fn sockets_on(&self, key: PortKey) -> impl Iterator<Item = &Socket> + '_ {
        self.by_port.get(&key).into_iter().flatten().filter_map(|c| self.sockets.get(c))
    }

    /// Sockets of `proto` with ports in `range`, by port.
    pub fn sockets_in(&self, proto: Proto, range: RangeInclusive<u16>) -> impl Iterator<Item = &Socket> + '_ {
        self.by_port
            .range((proto, *range.start())..=(proto, *range.end()))
            .flat_map(|(_, cookies)| cookies.iter())
            .filter_map(|c| self.sockets.get(c))
    }

    pub fn get(&self, cookie: u64) -> Option<&Socket> {
        self.sockets.get(&cookie)
    }

    /// What the kernel should remember for this socket so its release can be
    /// reported; only for sockets whose close frees the port at once.
    pub fn tracking_record(&self, cookie: u64) -> Option<TrackedSocket> {
        let s = self.sockets.get(&cookie)?;
        let frees_on_close = s.proto == Proto::Udp || matches!(s.state, SockState::Listen | SockState::Bound);
        frees_on_close.then(|| TrackedSocket {
            port: s.port,
            family: s.family.af(),
            proto: s.proto.ipproto(),
            _pad: [0; 4],
            addr: addr_to_bytes(s.addr),
        })
    }

    pub fn apply_event(&mut self, ev: &Event, now: SystemTime, changes: &mut Vec<Change>) -> EventEffect {
        let key = (ev.proto, ev.port);
        match ev.kind {
            EventKind::Bind | EventKind::Listen | EventKind::Connect => {
                if ev.cookie == 0 || ev.port == 0 {
                    return EventEffect::Ignored;
                }
                let state = match (ev.kind, ev.proto) {
                    (EventKind::Listen, _) => SockState::Listen,
                    (EventKind::Connect, _) => SockState::SynSent,
                    _ => SockState::Bound,
                };
                if ev.netns_unknown {
                    // Possibly another namespace's: a dump of this one
                    // adds it if it is ours.
                    return EventEffect::Verify(key, Tables::of(ev.proto, state));
                }
                self.upsert(
                    Socket {
                        cookie: ev.cookie,
                        proto: ev.proto,
                        family: ev.family,
                        addr: ev.addr,
                        port: ev.port,
                        state,
                        reuse: ev.reuse,
                        owner: ev.owner.clone(),
                        sock_cgroup_id: 0,
                        source: Source::Event,
                        first_seen: now,
                        last_event_ns: ev.ts_ns,
                        released: false,
                        untracked: ev.untracked,
                    },
                    changes,
                );
                EventEffect::Applied
            }
            EventKind::Release => {
                // The hook runs as close() begins: the port may still be held,
                // so only a later dump may drop it. A connected socket's port
                // outlives the close (FIN_WAIT, TIME_WAIT): the slow resync
                // of the established hash sees it go; no dump now.
                if let Some(s) = self.sockets.get_mut(&ev.cookie) {
                    s.last_event_ns = s.last_event_ns.max(ev.ts_ns);
                    let table = Tables::of(s.proto, s.state);
                    if table == Tables::CONNECTED {
                        return EventEffect::Applied;
                    }
                    s.released = true;
                    return EventEffect::Verify((s.proto, s.port), table);
                }
                let tables = match ev.proto {
                    Proto::Tcp => Tables::LISTEN.union(Tables::BOUND),
                    Proto::Udp => Tables::UDP,
                };
                EventEffect::Verify(key, tables)
            }
            EventKind::Unlisten => {
                // A listener stopped listening (shutdown(), or the close
                // before its release). An explicitly bound one is back in
                // the bind hash, still holding the port: it is bound now, and
                // only a dump that lists bound sockets (or its release) may
                // remove it. One that autobound let the port go, which that
                // dump shows too.
                let Some(s) = self.sockets.get(&ev.cookie).filter(|s| s.state == SockState::Listen) else {
                    return if self.by_port.contains_key(&key) {
                        EventEffect::Verify(key, Tables::LISTEN.union(Tables::BOUND))
                    } else {
                        EventEffect::Ignored
                    };
                };
                let bound =
                    Socket { state: SockState::Bound, last_event_ns: ev.ts_ns.max(s.last_event_ns), ..s.clone() };
                let key = (bound.proto, bound.port);
                self.upsert(bound, changes);
                EventEffect::Verify(key, Tables::BOUND)
            }
        }
    }

    /// The kernel's record of the sockets it tracks, read after lost events
    /// on a kernel whose dumps cannot list bound TCP sockets: tracked TCP
    /// sockets the map lacks are added as bound (a dump corrects the state
    /// of those that listen or connect), and bound ones the kernel no longer
    /// tracks were released. `started_ns` is when the read began.
    pub fn apply_tracked(
        &mut self,
        tracked: &[(u64, TrackedSocket)],
        started_ns: u64,
        now: SystemTime,
        changes: &mut Vec<Change>,
    ) -> MergeStats {
        let mut stats = MergeStats::default();
        if self.visible.contains(Tables::BOUND) {
            return stats; // dumps show bound sockets themselves
        }
        let mut seen = HashSet::with_capacity(tracked.len());
        for (cookie, t) in tracked {
            let (Some(proto), Some(family)) = (Proto::from_ipproto(t.proto), Family::from_af(t.family)) else {
                continue;
            };
            if proto != Proto::Tcp || t.port == 0 {
                continue;
            }
            seen.insert(*cookie);
            if self.sockets.contains_key(cookie) {
                continue;
            }
            stats.added.push(*cookie);
            self.upsert(
                Socket {
                    cookie: *cookie,
                    proto,
                    family,
                    addr: addr_from_bytes(family, &t.addr),
                    port: t.port,
                    state: SockState::Bound,
                    reuse: None,
                    owner: None,
                    sock_cgroup_id: 0,
                    source: Source::Kernel,
                    first_seen: now,
                    last_event_ns: 0,
                    released: false,
                    untracked: false,
                },
                changes,
            );
        }
        let gone: Vec<u64> = self
            .sockets
            .values()
            .filter(|s| {
                s.proto == Proto::Tcp
                    && s.state == SockState::Bound
                    && !s.untracked
                    && s.last_event_ns < started_ns
                    && !seen.contains(&s.cookie)
            })
            .map(|s| s.cookie)
            .collect();
        for cookie in gone {
            self.remove_counted(cookie, &mut stats, changes);
        }
        stats
    }

    /// Merges a dump: it is the truth for everything that happened before it
    /// started; sockets touched by events since then are left as they are.
    pub fn apply_snapshot(&mut self, snap: &Snapshot, now: SystemTime, changes: &mut Vec<Change>) -> MergeStats {
        let mut stats = MergeStats::default();
        let mut seen = HashSet::with_capacity(snap.sockets.len());
        for d in &snap.sockets {
            if !snap.scope.has_port(&(d.proto, d.port)) || d.port == 0 {
                continue;
            }
            seen.insert(d.cookie);
            match self.sockets.get_mut(&d.cookie) {
                Some(s) => {
                    s.sock_cgroup_id = d.cgroup_id;
                    if let Some(o) = &d.owner {
                        s.owner = Some(s.owner.take().map_or_else(|| o.clone(), |mine| mine.or(o)));
                    }
                    if s.last_event_ns < snap.started_ns {
                        // The dump is newer than anything the events said.
                        let updated =
                            Socket { state: d.state, addr: d.addr, port: d.port, family: d.family, ..s.clone() };
                        self.upsert(updated, changes);
                    }
                }
                None => {
                    stats.added.push(d.cookie);
                    self.upsert(
                        Socket {
                            cookie: d.cookie,
                            proto: d.proto,
                            family: d.family,
                            addr: d.addr,
                            port: d.port,
                            state: d.state,
                            reuse: None,
                            owner: d.owner.clone(),
                            sock_cgroup_id: d.cgroup_id,
                            source: Source::Snapshot,
                            first_seen: now,
                            last_event_ns: 0,
                            released: false,
                            untracked: false,
                        },
                        changes,
                    );
                }
            }
        }
        let candidates: Vec<u64> = match &snap.scope.ports {
            None => self.sockets.keys().copied().collect(),
            Some(keys) => keys.iter().filter_map(|k| self.by_port.get(k)).flatten().copied().collect(),
        };
        for cookie in candidates {
            let stale = self.sockets.get(&cookie).is_some_and(|s| {
                s.last_event_ns < snap.started_ns && !seen.contains(&cookie) && Self::proves_gone(snap, s)
            });
            if stale {
                self.remove_counted(cookie, &mut stats, changes);
            }
        }
        stats
    }

    fn upsert(&mut self, mut sock: Socket, changes: &mut Vec<Change>) {
        let key = (sock.proto, sock.port);
        let old = self.sockets.remove(&sock.cookie);
        let mut touched = vec![key];
        if let Some(old) = &old {
            // Keep what earlier sources knew and this one does not.
            sock.first_seen = old.first_seen;
            sock.source = old.source;
            sock.last_event_ns = sock.last_event_ns.max(old.last_event_ns);
            sock.reuse = sock.reuse.or(old.reuse);
            // Field by field: a hook that cannot read the comm (sock_ops on
            // some kernels) must not erase what post_bind said.
            sock.owner = match (sock.owner.take(), &old.owner) {
                (Some(new), Some(prev)) => Some(new.or(prev)),
                (new, prev) => new.or_else(|| prev.clone()),
            };
            if sock.sock_cgroup_id == 0 {
                sock.sock_cgroup_id = old.sock_cgroup_id;
            }
            touched.push((old.proto, old.port));
        }
        let before = self.taken_states(&touched);
        if let Some(old) = &old {
            self.unindex(old);
        }
        self.index(&sock);
        self.sockets.insert(sock.cookie, sock);
        self.report(&touched, &before, changes);
    }

    fn remove_counted(&mut self, cookie: u64, stats: &mut MergeStats, changes: &mut Vec<Change>) {
        let tracked_kind = self.tracking_record(cookie).is_some();
        if let Some(s) = self.sockets.remove(&cookie) {
            let touched = [(s.proto, s.port)];
            let before = self.taken_states(&touched);
            self.unindex(&s);
            self.report(&touched, &before, changes);
            stats.removed.push(cookie);
            if tracked_kind {
                stats.untrack.push(cookie);
            }
        }
    }

    fn taken_states(&self, keys: &[PortKey]) -> Vec<bool> {
        keys.iter().map(|k| self.is_taken(*k)).collect()
    }

    /// Reports the ports whose taken-ness differs from `before`, once each.
    fn report(&self, keys: &[PortKey], before: &[bool], changes: &mut Vec<Change>) {
        for (i, (key, was)) in keys.iter().zip(before).enumerate() {
            if keys[..i].contains(key) {
                continue;
            }
            match (*was, self.is_taken(*key)) {
                (false, true) => changes.push(Change::Taken(*key)),
                (true, false) => changes.push(Change::Freed(*key)),
                _ => {}
            }
        }
    }

    fn index(&mut self, s: &Socket) {
        let key = (s.proto, s.port);
        self.by_port.entry(key).or_default().insert(s.cookie);
        if s.blocks() {
            *self.blocking.entry(key).or_default() += 1;
        }
        if s.untracked {
            self.untracked.insert(s.cookie);
        }
    }

    fn unindex(&mut self, s: &Socket) {
        let key = (s.proto, s.port);
        self.untracked.remove(&s.cookie);
        if let Some(set) = self.by_port.get_mut(&key) {
            set.remove(&s.cookie);
            if set.is_empty() {
                self.by_port.remove(&key);
            }
        }
        if s.blocks() {
            if let Some(n) = self.blocking.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.blocking.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

    fn ev(kind: EventKind, cookie: u64, port: u16, ts: u64) -> Event {
        Event {
            kind,
            ts_ns: ts,
            cookie,
            netns_cookie: 1,
            proto: Proto::Tcp,
            family: Family::Ipv4,
            addr: ANY4,
            port,
            owner: Some(Owner { pid: 42, comm: "postgres".into(), cgroup_id: 7 }),
            untracked: false,
            netns_unknown: false,
            reuse: None,
        }
    }

    fn dumped(cookie: u64, port: u16, state: SockState) -> DumpedSocket {
        DumpedSocket {
            cookie,
            proto: Proto::Tcp,
            family: Family::Ipv4,
            addr: ANY4,
            port,
            state,
            cgroup_id: 0,
            owner: None,
        }
    }

    /// A dump of `scope` on a kernel that lists every table.
    fn snap(started_ns: u64, scope: Scope, sockets: Vec<DumpedSocket>) -> Snapshot {
        let covered = scope.tables;
        Snapshot { started_ns, scope, covered, sockets }
    }

    /// A dump of `scope` on a kernel whose sock_diag cannot list bound TCP
    /// sockets (before 6.5), without the socket iterator.
    fn blind_snap(started_ns: u64, scope: Scope, sockets: Vec<DumpedSocket>) -> Snapshot {
        let covered = scope.tables.intersection(Tables::BOUND.complement());
        Snapshot { started_ns, scope, covered, sockets }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    #[test]
    fn bind_takes_port_and_release_only_asks_for_verification() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        assert_eq!(m.apply_event(&ev(EventKind::Bind, 1, 5432, 10), now(), &mut ch), EventEffect::Applied);
        assert_eq!(ch, vec![Change::Taken((Proto::Tcp, 5432))]);
        ch.clear();
        let eff = m.apply_event(&ev(EventKind::Release, 1, 5432, 20), now(), &mut ch);
        assert_eq!(eff, EventEffect::Verify((Proto::Tcp, 5432), Tables::BOUND));
        assert!(m.is_taken((Proto::Tcp, 5432)), "release alone must not free the port");
        assert!(ch.is_empty());
    }

    #[test]
    fn a_dump_started_after_the_release_frees_the_port() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        m.apply_event(&ev(EventKind::Bind, 1, 5432, 10), now(), &mut ch);
        m.apply_event(&ev(EventKind::Release, 1, 5432, 20), now(), &mut ch);
        ch.clear();
        let key = (Proto::Tcp, 5432);
        let stats = m.apply_snapshot(&snap(30, Scope::ports([key].into(), Tables::BOUND), vec![]), now(), &mut ch);
        assert_eq!(stats.removed.len(), 1);
        assert!(!m.is_taken(key));
        assert_eq!(ch, vec![Change::Freed(key)]);
    }

    #[test]
    fn a_dump_older_than_an_event_cannot_remove_that_socket() {
        // Dump started at 5, the bind happened at 10 and was applied before
        // the dump finished: the dump did not see it, yet it must stay.
        let mut m = PortMap::default();
        let mut ch = vec![];
        m.apply_event(&ev(EventKind::Bind, 1, 5432, 10), now(), &mut ch);
        let stats = m.apply_snapshot(&snap(5, Scope::FULL, vec![]), now(), &mut ch);
        assert!(stats.removed.is_empty());
        let stats = m.apply_snapshot(&snap(5, Scope::FAST, vec![]), now(), &mut ch);
        assert!(stats.removed.is_empty());
        assert!(m.is_taken((Proto::Tcp, 5432)));
    }

    #[test]
    fn a_dump_older_than_a_release_keeps_the_socket_until_a_newer_one() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        m.apply_event(&ev(EventKind::Bind, 1, 5432, 10), now(), &mut ch);
        m.apply_event(&ev(EventKind::Release, 1, 5432, 20), now(), &mut ch);
        m.apply_snapshot(&snap(15, Scope::FULL, vec![]), now(), &mut ch);
        assert!(m.is_taken((Proto::Tcp, 5432)));
        m.apply_snapshot(&snap(25, Scope::FULL, vec![]), now(), &mut ch);
        assert!(!m.is_taken((Proto::Tcp, 5432)));
    }

    #[test]
    fn time_wait_after_close_keeps_the_port() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        m.apply_event(&ev(EventKind::Connect, 9, 40000, 10), now(), &mut ch);
        m.apply_event(&ev(EventKind::Release, 9, 40000, 20), now(), &mut ch);
        let key = (Proto::Tcp, 40000);
        m.apply_snapshot(
            &snap(30, Scope::ports([key].into(), Tables::ALL), vec![dumped(9, 40000, SockState::TimeWait)]),
            now(),
            &mut ch,
        );
        assert!(m.is_taken(key));
        assert_eq!(m.sockets_on(key).next().map(|s| s.state), Some(SockState::TimeWait));
        // The owner learned from the connect event survives the dump.
        assert_eq!(m.sockets_on(key).next().and_then(|s| s.owner.as_ref()).map(|o| o.pid), Some(42));
    }

    #[test]
    fn snapshot_adds_unknown_sockets_and_reports_them() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        let stats = m.apply_snapshot(
            &snap(1, Scope::FULL, vec![dumped(3, 22, SockState::Listen), dumped(4, 22, SockState::Established)]),
            now(),
            &mut ch,
        );
        assert_eq!(stats.added, vec![3, 4]);
        assert_eq!(ch, vec![Change::Taken((Proto::Tcp, 22))], "one port, one change");
        assert_eq!(m.get(3).map(|s| s.source), Some(Source::Snapshot));
        assert!(m.tracking_record(3).is_some(), "a listener's close frees its port: track it");
        assert!(m.tracking_record(4).is_none(), "a connection's close leaves TIME_WAIT: no need");
    }

    #[test]
    fn verification_scope_leaves_other_ports_alone() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        m.apply_snapshot(
            &snap(1, Scope::FULL, vec![dumped(3, 22, SockState::Listen), dumped(5, 80, SockState::Listen)]),
            now(),
            &mut ch,
        );
        let key = (Proto::Tcp, 80);
        let stats = m.apply_snapshot(&snap(2, Scope::ports([key].into(), Tables::LISTEN), vec![]), now(), &mut ch);
        assert_eq!(stats.removed.len(), 1);
        assert!(m.is_taken((Proto::Tcp, 22)));
        assert!(!m.is_taken(key));
    }

    #[test]
    fn reuseport_pair_keeps_port_until_both_are_gone() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        m.apply_event(&ev(EventKind::Listen, 1, 6000, 10), now(), &mut ch);
        m.apply_event(&ev(EventKind::Listen, 2, 6000, 11), now(), &mut ch);
        let key = (Proto::Tcp, 6000);
        m.apply_snapshot(
            &snap(20, Scope::ports([key].into(), Tables::LISTEN), vec![dumped(2, 6000, SockState::Listen)]),
            now(),
            &mut ch,
        );
        assert!(m.is_taken(key));
        assert_eq!(m.sockets_on(key).count(), 1);
    }

    #[test]
    fn port_zero_binds_are_ignored_until_a_port_is_known() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        assert_eq!(m.apply_event(&ev(EventKind::Bind, 1, 0, 10), now(), &mut ch), EventEffect::Ignored);
        assert!(m.is_empty());
    }

    #[test]
    fn unlisten_hints_only_matter_for_ports_we_hold() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        let hint = ev(EventKind::Unlisten, 1, 7000, 10);
        assert_eq!(m.apply_event(&hint, now(), &mut ch), EventEffect::Ignored);
        m.apply_event(&ev(EventKind::Listen, 2, 7000, 5), now(), &mut ch);
        assert_eq!(
            m.apply_event(&hint, now(), &mut ch),
            EventEffect::Verify((Proto::Tcp, 7000), Tables::LISTEN.union(Tables::BOUND)),
            "another socket's hint on a port we hold"
        );
    }

    #[test]
    fn a_listener_that_stops_listening_is_bound_until_a_bound_table_dump_says_otherwise() {
        let mut m = blind_to_bound();
        let mut ch = vec![];
        let key = (Proto::Tcp, 7001);
        m.apply_event(&ev(EventKind::Bind, 1, 7001, 5), now(), &mut ch);
        m.apply_event(&ev(EventKind::Listen, 1, 7001, 6), now(), &mut ch);
        assert_eq!(
            m.apply_event(&ev(EventKind::Unlisten, 1, 7001, 10), now(), &mut ch),
            EventEffect::Verify(key, Tables::BOUND)
        );
        assert_eq!(m.get(1).map(|s| s.state), Some(SockState::Bound));
        // shutdown() left it in the bind hash: a dump blind to that table,
        // however recent, must not free the port.
        m.apply_snapshot(
            &blind_snap(20, Scope::ports([key].into(), Tables::LISTEN.union(Tables::BOUND)), vec![]),
            now(),
            &mut ch,
        );
        assert!(m.is_taken(key));
        // A dump that lists bound sockets (6.5+, or the socket iterator) may.
        m.apply_snapshot(&snap(30, Scope::FULL, vec![]), now(), &mut ch);
        assert!(!m.is_taken(key));
    }

    /// Before Linux 6.5 sock_diag cannot list bound TCP sockets.
    fn blind_to_bound() -> PortMap {
        PortMap::new(Tables::LISTEN.union(Tables::UDP).union(Tables::CONNECTED))
    }

    #[test]
    fn where_dumps_cannot_see_bound_sockets_only_their_release_removes_them() {
        let mut m = blind_to_bound();
        let mut ch = vec![];
        let key = (Proto::Tcp, 31000);
        m.apply_event(&ev(EventKind::Bind, 1, 31000, 10), now(), &mut ch);
        // Dumps that cannot show it prove nothing, however recent.
        for scope in [Scope::FULL, Scope::FAST, Scope::ports([key].into(), Tables::ALL)] {
            let stats = m.apply_snapshot(&blind_snap(50, scope, vec![]), now(), &mut ch);
            assert!(stats.removed.is_empty());
            assert!(m.is_taken(key), "a bound socket missing from a blind dump must stay taken");
        }
        // Its release does, through the next dump that started after it.
        assert_eq!(
            m.apply_event(&ev(EventKind::Release, 1, 31000, 60), now(), &mut ch),
            EventEffect::Verify(key, Tables::BOUND)
        );
        m.apply_snapshot(&blind_snap(55, Scope::ports([key].into(), Tables::BOUND), vec![]), now(), &mut ch);
        assert!(m.is_taken(key), "a dump that started before the release proves nothing");
        m.apply_snapshot(&blind_snap(70, Scope::ports([key].into(), Tables::BOUND), vec![]), now(), &mut ch);
        assert!(!m.is_taken(key));
        // Where the socket iterator lists them, a full dump is proof enough.
        m.apply_event(&ev(EventKind::Bind, 2, 31001, 80), now(), &mut ch);
        m.apply_snapshot(&snap(90, Scope::FULL, vec![]), now(), &mut ch);
        assert!(!m.is_taken((Proto::Tcp, 31001)));
    }

    #[test]
    fn where_dumps_cannot_see_bound_sockets_the_kernels_table_recovers_lost_events() {
        let mut m = blind_to_bound();
        let mut ch = vec![];
        let t = |port| TrackedSocket { port, family: 2, proto: 6, _pad: [0; 4], addr: [0; 16] };
        // Bind events for 31001 were lost; 31002 was bound and released, both
        // events lost; 31003 could not be tracked and must stay.
        m.apply_event(&ev(EventKind::Bind, 2, 31002, 10), now(), &mut ch);
        let mut untracked = ev(EventKind::Bind, 3, 31003, 10);
        untracked.untracked = true;
        m.apply_event(&untracked, now(), &mut ch);
        let stats = m.apply_tracked(&[(1, t(31001))], 20, now(), &mut ch);
        assert_eq!(stats.added, vec![1]);
        assert_eq!(stats.removed, vec![2]);
        assert!(m.is_taken((Proto::Tcp, 31001)));
        assert!(!m.is_taken((Proto::Tcp, 31002)));
        assert!(m.is_taken((Proto::Tcp, 31003)));
        assert_eq!(m.unverifiable().count(), 1);
        // A socket bound after the read began is kept whatever the read said.
        m.apply_event(&ev(EventKind::Bind, 4, 31004, 30), now(), &mut ch);
        m.apply_tracked(&[], 25, now(), &mut ch);
        assert!(m.is_taken((Proto::Tcp, 31004)));
        // Where dumps do show bound sockets, the table is not needed.
        let mut full = PortMap::default();
        assert_eq!(full.apply_tracked(&[(1, t(31001))], 20, now(), &mut ch), MergeStats::default());
    }

    #[test]
    fn events_of_an_unknown_namespace_are_checked_not_applied() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        let mut e = ev(EventKind::Listen, 1, 7001, 10);
        e.netns_unknown = true;
        assert_eq!(m.apply_event(&e, now(), &mut ch), EventEffect::Verify((Proto::Tcp, 7001), Tables::LISTEN));
        assert!(m.is_empty());
    }

    #[test]
    fn closing_a_connection_waits_for_the_established_table() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        let key = (Proto::Tcp, 40001);
        m.apply_event(&ev(EventKind::Connect, 5, 40001, 10), now(), &mut ch);
        assert_eq!(m.apply_event(&ev(EventKind::Release, 5, 40001, 20), now(), &mut ch), EventEffect::Applied);
        // Dumps of the cheap tables cannot see connected sockets: they keep them.
        m.apply_snapshot(&snap(30, Scope::FAST, vec![]), now(), &mut ch);
        m.apply_snapshot(
            &snap(30, Scope::ports([key].into(), Tables::LISTEN.union(Tables::BOUND)), vec![]),
            now(),
            &mut ch,
        );
        assert!(m.is_taken(key));
        // The established table's dump does.
        m.apply_snapshot(&snap(40, Scope::FULL, vec![]), now(), &mut ch);
        assert!(!m.is_taken(key));
    }

    #[test]
    fn reuseaddr_sockets_that_do_not_listen_leave_the_port_free() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        let key = (Proto::Tcp, 8000);
        let mut bind = ev(EventKind::Bind, 1, 8000, 10);
        bind.reuse = Some(true);
        m.apply_event(&bind, now(), &mut ch);
        assert!(!m.is_taken(key), "a SO_REUSEADDR listener could still bind here");
        assert_eq!(m.sockets_on(key).count(), 1, "but the socket is listed");
        assert!(ch.is_empty());
        // It starts listening: now it blocks.
        let mut listen = ev(EventKind::Listen, 1, 8000, 20);
        listen.reuse = Some(true);
        m.apply_event(&listen, now(), &mut ch);
        assert!(m.is_taken(key));
        assert_eq!(ch, vec![Change::Taken(key)]);
        // A dump that cannot tell the flag keeps what the event said.
        ch.clear();
        m.apply_snapshot(&snap(30, Scope::FULL, vec![dumped(1, 8000, SockState::Established)]), now(), &mut ch);
        assert_eq!(m.get(1).and_then(|s| s.reuse), Some(true));
        assert!(!m.is_taken(key), "established with SO_REUSEADDR: not blocking");
        assert_eq!(ch, vec![Change::Freed(key)]);
        // Unknown flag (a socket only a dump saw) counts as blocking.
        m.apply_snapshot(&snap(40, Scope::FULL, vec![dumped(2, 8001, SockState::Bound)]), now(), &mut ch);
        assert!(m.is_taken((Proto::Tcp, 8001)));
    }

    #[test]
    fn an_event_that_cannot_read_the_comm_keeps_the_one_post_bind_read() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        m.apply_event(&ev(EventKind::Bind, 1, 5432, 10), now(), &mut ch);
        let mut listen = ev(EventKind::Listen, 1, 5432, 20);
        listen.owner = Some(Owner { pid: 42, comm: String::new(), cgroup_id: 0 });
        m.apply_event(&listen, now(), &mut ch);
        let owner = m.get(1).and_then(|s| s.owner.clone()).expect("owner");
        assert_eq!((owner.pid, owner.comm.as_str(), owner.cgroup_id), (42, "postgres", 7));
    }

    #[test]
    fn tcp_and_udp_are_separate_ports() {
        let mut m = PortMap::default();
        let mut ch = vec![];
        let mut udp = ev(EventKind::Bind, 1, 53, 10);
        udp.proto = Proto::Udp;
        m.apply_event(&udp, now(), &mut ch);
        assert!(m.is_taken((Proto::Udp, 53)));
        assert!(!m.is_taken((Proto::Tcp, 53)));
        assert_eq!(m.taken_in(Proto::Udp, 1..=100).collect::<Vec<_>>(), vec![53]);
    }
}
