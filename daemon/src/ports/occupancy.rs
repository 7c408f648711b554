//! Occupancy: the one answer to "is this port taken?", for every sink.
//!
//! A port is taken when a socket of this namespace holds it (the map), or when
//! something else claims it though no host socket may exist: a hostPort of a
//! pod on this node (the kubelet redirects its traffic), an allocated
//! nodePort (kube-proxy redirects it on every node), a lease. Claims are
//! inputs of the ports domain, each from one source that owns it; this module
//! combines them with the map into a [`Verdict`], and the HTTP API, `/free`,
//! the watch stream and the port-usage ConfigMap all ask it.
//!
//! Never false-free: a port nobody is known to hold is `Free` only when the
//! map is complete, every claim source has been read, and no blind spot of
//! the kernel could hide a socket of its protocol; otherwise `Unsure`.
use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    kernel::BlindSpot,
    map::{PortKey, PortMap},
    model::Proto,
    Status,
};

/// Where claims come from; each source owns its set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClaimSource {
    /// hostPorts of pods on this node.
    HostPorts,
    /// nodePorts of Services (NodePort and LoadBalancer).
    NodePorts,
    /// Ports leased through the API.
    Leases,
}

/// Something other than a socket that makes a port taken.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Claim {
    /// A container port with a hostPort, of this pod (`namespace/name`).
    HostPort { pod: String },
    /// An allocated nodePort of this Service (`namespace/name`).
    NodePort { service: String },
    /// A lease (its id and holder).
    Lease { id: String, holder: String },
}

/// One source's claims and whether it has been read in full.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimSet {
    /// The source has been read once: until then any port may be claimed.
    pub synced: bool,
    /// The source cannot be read (the API server refuses it): it is not
    /// waited for, and every port it could claim is answered unsure, with
    /// this reason.
    pub unavailable: Option<String>,
    pub claims: BTreeMap<PortKey, Vec<Claim>>,
}

/// As JSON: `{"synced": .., "claims": [{"proto", "port", "kind", ..}]}`.
impl Serialize for ClaimSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Entry<'a> {
            proto: Proto,
            port: u16,
            #[serde(flatten)]
            claim: &'a Claim,
        }
        #[derive(Serialize)]
        struct View<'a> {
            synced: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            unavailable: Option<&'a str>,
            claims: Vec<Entry<'a>>,
        }
        let claims = self
            .claims
            .iter()
            .flat_map(|((proto, port), cs)| cs.iter().map(|claim| Entry { proto: *proto, port: *port, claim }))
            .collect();
        View { synced: self.synced, unavailable: self.unavailable.as_deref(), claims }.serialize(s)
    }
}

impl ClaimSet {
    /// A source with nothing to claim (standalone: no pods, no Services).
    pub fn empty_synced() -> Self {
        Self { synced: true, unavailable: None, claims: BTreeMap::new() }
    }

    /// A source the API server refuses to show: not waited for.
    pub fn unavailable(reason: String) -> Self {
        Self { synced: true, unavailable: Some(reason), claims: BTreeMap::new() }
    }
}

/// Why a port is taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reason {
    /// Sockets of this namespace hold it (see the port's entries).
    Sockets { count: usize },
    #[serde(untagged)]
    Claim(Claim),
}

/// Why a port cannot be promised free.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Unsure {
    /// The first full dump has not been merged yet.
    Starting,
    /// Events were lost and the repairing dump has not finished.
    Resyncing,
    /// A claim source has not been read yet.
    Unread { source: ClaimSource },
    /// A claim source cannot be read (the API server refuses it).
    Unavailable { source: ClaimSource, why: String },
    /// Held by a bound socket whose release this kernel cannot report: it
    /// may have been freed.
    Unverifiable,
    /// A kind of socket this kernel hides could hold it.
    BlindSpot { blind_spot: BlindSpot },
}

impl Unsure {
    /// Passes by itself (start-up, resync, an input being read): a caller may
    /// retry shortly. The others last as long as the kernel or its table.
    pub fn is_transient(&self) -> bool {
        matches!(self, Unsure::Starting | Unsure::Resyncing | Unsure::Unread { .. })
    }

    pub fn reason(&self) -> String {
        match self {
            Unsure::Starting => "the port map is not complete yet (starting)".into(),
            Unsure::Resyncing => "the port map is resyncing after lost events".into(),
            Unsure::Unread { source } => format!("the {} input has not been read yet", source_name(*source)),
            Unsure::Unavailable { source, why } => {
                format!(
                    "the {} input cannot be read ({why}): a port it claims would not be known",
                    source_name(*source)
                )
            }
            Unsure::Unverifiable => {
                "held by a bound socket whose close this kernel cannot report (tracking table full)".into()
            }
            Unsure::BlindSpot { blind_spot } => blind_spot.reason().into(),
        }
    }
}

fn source_name(s: ClaimSource) -> &'static str {
    match s {
        ClaimSource::HostPorts => "hostPorts (this node's pods)",
        ClaimSource::NodePorts => "nodePorts (Services)",
        ClaimSource::Leases => "leases",
    }
}

/// The answer about one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Taken(Vec<Reason>),
    Free,
    Unsure(Unsure),
}

impl Verdict {
    /// What a reader that knows only "taken or not" must be told: anything
    /// but a certain `Free` reads taken.
    pub fn reads_taken(&self) -> bool {
        !matches!(self, Verdict::Free)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Taken(_) => "taken",
            Verdict::Free => "free",
            Verdict::Unsure(_) => "unsure",
        }
    }
}

/// Every source's claims, as last received.
#[derive(Clone, Debug, Default)]
pub struct Claims {
    sets: BTreeMap<ClaimSource, ClaimSet>,
}

impl Claims {
    /// Claims on one port, from every source.
    pub fn on(&self, key: PortKey) -> impl Iterator<Item = &Claim> + '_ {
        self.sets.values().filter_map(move |s| s.claims.get(&key)).flatten()
    }

    pub fn any(&self, key: PortKey) -> bool {
        self.sets.values().any(|s| s.claims.contains_key(&key))
    }

    /// Claimed ports of `proto` within `range`, ascending, each once.
    pub fn claimed_in(&self, proto: Proto, range: std::ops::RangeInclusive<u16>) -> impl Iterator<Item = u16> + '_ {
        let mut ports: Vec<u16> = self
            .sets
            .values()
            .flat_map(|s| s.claims.range((proto, *range.start())..=(proto, *range.end())).map(|((_, p), _)| *p))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports.into_iter()
    }

    /// A source registered but not read yet.
    pub fn unread(&self) -> Option<ClaimSource> {
        self.sets.iter().find(|(_, s)| !s.synced).map(|(src, _)| *src)
    }

    /// A source that cannot be read, and why.
    fn unavailable(&self) -> Option<(ClaimSource, &str)> {
        self.sets.iter().find_map(|(src, s)| s.unavailable.as_deref().map(|why| (*src, why)))
    }

    /// Replaces one source's set; returns the ports it claimed before or
    /// claims now (whose occupancy may have changed).
    pub fn replace(&mut self, source: ClaimSource, set: ClaimSet) -> Vec<PortKey> {
        let mut touched: Vec<PortKey> = set.claims.keys().copied().collect();
        if let Some(old) = self.sets.insert(source, set) {
            touched.extend(old.claims.into_keys());
        }
        touched.sort_unstable();
        touched.dedup();
        touched
    }

    /// Registers a source that will be read later (it makes answers unsure
    /// until its first set arrives).
    pub fn expect(&mut self, source: ClaimSource) {
        self.sets.entry(source).or_default();
    }

    pub fn set(&self, source: ClaimSource) -> Option<&ClaimSet> {
        self.sets.get(&source)
    }
}

/// The verdict on `key` from the map, the claims and the map's status.
pub fn verdict(map: &PortMap, claims: &Claims, status: &Status, key: PortKey) -> Verdict {
    // Sockets whose release cannot be observed may be gone: they alone do
    // not make the port certainly taken, but any other socket does.
    let (certain, unverifiable) = map.sockets_on(key).filter(|s| s.blocks()).fold((0, false), |(n, u), s| {
        if map.is_unverifiable(s) {
            (n, true)
        } else {
            (n + 1, u)
        }
    });
    let mut reasons: Vec<Reason> = claims.on(key).cloned().map(Reason::Claim).collect();
    if certain > 0 {
        reasons.insert(0, Reason::Sockets { count: certain });
    }
    if !reasons.is_empty() {
        return Verdict::Taken(reasons);
    }
    let unsure = if unverifiable {
        Some(Unsure::Unverifiable)
    } else if !status.ready {
        Some(Unsure::Starting)
    } else if status.stale {
        Some(Unsure::Resyncing)
    } else if let Some(source) = claims.unread() {
        Some(Unsure::Unread { source })
    } else if let Some((source, why)) = claims.unavailable() {
        Some(Unsure::Unavailable { source, why: why.to_owned() })
    } else {
        status.blind_spot_for(key.0).map(|b| Unsure::BlindSpot { blind_spot: b.clone() })
    };
    unsure.map_or(Verdict::Free, Verdict::Unsure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{kernel::Kernel, map::Tables, Mode};

    fn status() -> Status {
        Status {
            mode: Mode::Ebpf,
            ready: true,
            stale: false,
            last_full_resync: None,
            last_error: None,
            kernel: Kernel::new(Tables::ALL, Vec::new()),
            blind_spots: Vec::new(),
            unverifiable: Default::default(),
        }
    }

    fn host_port(port: u16) -> ClaimSet {
        let mut s = ClaimSet::empty_synced();
        s.claims.insert((Proto::Tcp, port), vec![Claim::HostPort { pod: "db/pg-0".into() }]);
        s
    }

    #[test]
    fn claims_make_ports_taken_and_only_a_complete_picture_makes_them_free() {
        let map = PortMap::default();
        let mut claims = Claims::default();
        let key = (Proto::Tcp, 5432);
        let mut st = status();
        assert_eq!(verdict(&map, &claims, &st, key), Verdict::Free);
        claims.expect(ClaimSource::HostPorts);
        assert_eq!(
            verdict(&map, &claims, &st, key),
            Verdict::Unsure(Unsure::Unread { source: ClaimSource::HostPorts })
        );
        assert_eq!(claims.replace(ClaimSource::HostPorts, host_port(5432)), vec![key]);
        assert_eq!(
            verdict(&map, &claims, &st, key),
            Verdict::Taken(vec![Reason::Claim(Claim::HostPort { pod: "db/pg-0".into() })])
        );
        assert_eq!(verdict(&map, &claims, &st, (Proto::Udp, 5432)), Verdict::Free, "a claim is per protocol");
        st.stale = true;
        assert!(verdict(&map, &claims, &st, key).reads_taken(), "taken stays taken while resyncing");
        assert_eq!(verdict(&map, &claims, &st, (Proto::Tcp, 1)), Verdict::Unsure(Unsure::Resyncing));
        st.stale = false;
        st.blind_spots = vec![BlindSpot::BoundInactive];
        assert!(matches!(verdict(&map, &claims, &st, (Proto::Tcp, 1)), Verdict::Unsure(Unsure::BlindSpot { .. })));
        assert_eq!(verdict(&map, &claims, &st, (Proto::Udp, 1)), Verdict::Free, "the blind spot hides TCP only");
        assert_eq!(claims.replace(ClaimSource::HostPorts, ClaimSet::empty_synced()), vec![key]);
    }

    #[test]
    fn claimed_ports_in_a_range_are_listed_once() {
        let mut claims = Claims::default();
        claims.replace(ClaimSource::HostPorts, host_port(30001));
        let mut node = ClaimSet::empty_synced();
        node.claims.insert((Proto::Tcp, 30001), vec![Claim::NodePort { service: "a/b".into() }]);
        node.claims.insert((Proto::Tcp, 30002), vec![Claim::NodePort { service: "a/b".into() }]);
        claims.replace(ClaimSource::NodePorts, node);
        assert_eq!(claims.claimed_in(Proto::Tcp, 30000..=30010).collect::<Vec<_>>(), vec![30001, 30002]);
        assert_eq!(claims.on((Proto::Tcp, 30001)).count(), 2);
    }
}
