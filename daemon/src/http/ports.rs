//! `/api/v2/ports`: the live port map, one port, free ports, and a watch
//! stream of ports becoming taken or free.
use std::{collections::BTreeMap, convert::Infallible, net::IpAddr, ops::RangeInclusive, time::SystemTime};

use axum::{
    extract::{Path, RawQuery, State},
    response::{
        sse::{Event as SseEvent, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::get,
    Json, Router,
};
use futures_util::{Stream, StreamExt as _};
use serde::Serialize;
use serde_json::json;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

use super::{error::ApiError, query::Params, AppState};
use crate::{
    kube::pods::HostPort,
    ports::{
        model::{Family, Proto, SockState, Socket, Source},
        PortTable, Ports,
    },
    time::rfc3339_millis,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v2/ports", get(list))
        .route("/api/v2/ports/free", get(free))
        .route("/api/v2/ports/watch", get(watch))
        .route("/api/v2/ports/{port}", get(one))
}

/// Sockets that share protocol, family, address, port and state, shown once.
#[derive(Serialize)]
struct Entry {
    proto: Proto,
    family: Family,
    address: IpAddr,
    port: u16,
    state: SockState,
    /// Whether these sockets make the port taken (see `Socket::blocks`).
    blocking: bool,
    sockets: usize,
    owners: Vec<OwnerView>,
    source: Source,
    first_seen: String,
}

#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct OwnerView {
    pid: u32,
    comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<String>,
}

struct Filter {
    protos: Vec<Proto>,
    family: Option<Family>,
    state: Option<SockState>,
    range: RangeInclusive<u16>,
}

const PROTO_EXPECTED: &str = "tcp or udp";
const FAMILY_EXPECTED: &str = "ipv4 or ipv6";
const STATE_EXPECTED: &str = "a socket state such as listen, bound, established or time_wait";

impl Filter {
    fn from_params(p: &Params) -> Result<Self, ApiError> {
        let proto: Option<Proto> = p.opt("proto", PROTO_EXPECTED)?;
        let from = p.port("from")?.unwrap_or(1);
        let to = p.port("to")?.unwrap_or(u16::MAX);
        if from > to {
            return Err(ApiError::BadParam {
                param: "to",
                value: to.to_string(),
                reason: format!("must not be below from ({from})"),
            });
        }
        Ok(Self {
            protos: proto.map_or(Proto::ALL.to_vec(), |p| vec![p]),
            family: p.opt("family", FAMILY_EXPECTED)?,
            state: p.opt("state", STATE_EXPECTED)?,
            range: from..=to,
        })
    }

    fn keeps(&self, s: &Socket) -> bool {
        self.family.is_none_or(|f| f == s.family) && self.state.is_none_or(|st| st == s.state)
    }
}

/// What makes sockets one entry: protocol, port, family, address, state, blocking.
type GroupKey = (Proto, u16, Family, IpAddr, SockState, bool);

fn entries<'a>(ports: &Ports, sockets: impl Iterator<Item = &'a Socket>) -> Vec<Entry> {
    let mut groups: BTreeMap<GroupKey, Vec<&Socket>> = BTreeMap::new();
    for s in sockets {
        groups.entry((s.proto, s.port, s.family, s.addr, s.state, s.blocks())).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|((proto, port, family, address, state, blocking), socks)| {
            let mut owners: Vec<OwnerView> = socks
                .iter()
                .filter_map(|s| {
                    let o = s.owner.as_ref()?;
                    let cgroup = if o.cgroup_id != 0 { o.cgroup_id } else { s.sock_cgroup_id };
                    Some(OwnerView { pid: o.pid, comm: o.comm.clone(), container: ports.containers.lookup(cgroup) })
                })
                .collect();
            owners.sort();
            owners.dedup();
            let first_seen = socks.iter().map(|s| s.first_seen).min().unwrap_or(SystemTime::UNIX_EPOCH);
            let source = if socks.iter().any(|s| s.source == Source::Event) { Source::Event } else { Source::Snapshot };
            Entry {
                proto,
                family,
                address,
                port,
                state,
                blocking,
                sockets: socks.len(),
                owners,
                source,
                first_seen: rfc3339_millis(first_seen),
            }
        })
        .collect()
}

/// `complete`: nothing transient (start-up, lost events) keeps the map from
/// being whole; `certain`, per protocol: a port of that protocol the map does
/// not list is free (complete, and no blind spot of this kernel could hide
/// a socket of that protocol).
fn status_json(table: &PortTable) -> serde_json::Value {
    let complete = table.status.certain();
    let certain = |p: Proto| complete && table.status.blind_spot_for(p).is_none();
    json!({
        "complete": complete,
        "certain": {"tcp": certain(Proto::Tcp), "udp": certain(Proto::Udp)},
        "status": table.status,
    })
}

async fn list(State(st): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let params = Params::parse(q.as_deref(), &["proto", "family", "from", "to", "state"])?;
    let filter = Filter::from_params(&params)?;
    let ports = &st.ports;
    let body = {
        let table = ports.read();
        let picked = filter
            .protos
            .iter()
            .flat_map(|p| table.map.sockets_in(*p, filter.range.clone()))
            .filter(|s| filter.keeps(s));
        let mut body = status_json(&table);
        body["ports"] = json!(entries(ports, picked));
        body
    };
    Ok(Json(body).into_response())
}

async fn one(
    State(st): State<AppState>,
    Path(port): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(ApiError::BadParam {
                param: "port",
                value: port,
                reason: "expected a port number from 1 to 65535".into(),
            })
        }
    };
    let params = Params::parse(q.as_deref(), &["proto"])?;
    let protos = params.opt::<Proto>("proto", PROTO_EXPECTED)?.map_or(Proto::ALL.to_vec(), |p| vec![p]);
    let table = st.ports.read();
    let found: Vec<&Socket> = protos.iter().flat_map(|p| table.map.sockets_on((*p, port))).collect();
    let host_ports = host_ports_on(&st, &protos, port);
    let taken = protos.iter().any(|p| table.map.is_taken((*p, port))) || !host_ports.is_empty();
    let complete = table.status.certain() && host_ports_known(&st);
    // A port held by a socket whose release cannot be observed may be free
    // by now; a port no known socket holds may hide in a blind spot.
    let unverifiable = protos.iter().any(|p| table.status.unverifiable.contains(&(*p, port)));
    let blind = protos.iter().find_map(|p| table.status.blind_spot_for(*p)).filter(|_| !taken);
    let certain = complete && !unverifiable && blind.is_none();
    let mut body = json!({
        "port": port,
        // Never say free when unsure: absent but uncertain reads busy.
        "taken": taken || !certain,
        "certain": certain,
        "entries": entries(&st.ports, found.into_iter()),
        "host_ports": host_ports,
    });
    if !complete {
        body["reason"] = json!(
            "the port map is not complete yet (starting, resyncing after lost events, or this node's pods not listed yet)"
        );
    } else if let Some(b) = blind {
        body["reason"] = json!(b.reason());
    } else if unverifiable {
        body["reason"] = json!("held by a bound socket whose close this kernel cannot report (tracking table full)");
    }
    Ok(Json(body).into_response())
}

/// hostPorts of pods on this node on `port` (a source beside sockets: the
/// port is taken though no host socket holds it). Empty when standalone.
fn host_ports_on(st: &AppState, protos: &[Proto], port: u16) -> Vec<HostPort> {
    let Some(c) = &st.cluster else { return Vec::new() };
    let host = c.host_ports.borrow();
    host.ports.iter().filter(|h| h.port == port && protos.contains(&h.proto)).cloned().collect()
}

/// In a cluster, hostPorts are taken ports too: until this node's pods are
/// listed, no port can be promised free.
fn host_ports_known(st: &AppState) -> bool {
    st.cluster.as_ref().is_none_or(|c| c.host_ports.borrow().synced)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FreeProto {
    Tcp,
    Udp,
    Both,
}

impl std::str::FromStr for FreeProto {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "both" => Ok(Self::Both),
            _ => Err(()),
        }
    }
}

async fn free(State(st): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let params = Params::parse(q.as_deref(), &["from", "to", "count", "proto"])?;
    let from = params.port("from")?.ok_or(ApiError::MissingParam("from"))?;
    let to = params.port("to")?.ok_or(ApiError::MissingParam("to"))?;
    if from > to {
        return Err(ApiError::BadParam {
            param: "to",
            value: to.to_string(),
            reason: format!("must not be below from ({from})"),
        });
    }
    let count: usize = params.opt("count", "a number from 1 to 65535")?.unwrap_or(1);
    if !(1..=65535).contains(&count) {
        return Err(ApiError::BadParam {
            param: "count",
            value: count.to_string(),
            reason: "expected a number from 1 to 65535".into(),
        });
    }
    let proto = params.opt::<FreeProto>("proto", "tcp, udp or both")?.unwrap_or(FreeProto::Tcp);
    let protos: &[Proto] = match proto {
        FreeProto::Tcp => &[Proto::Tcp],
        FreeProto::Udp => &[Proto::Udp],
        FreeProto::Both => &Proto::ALL,
    };
    let table = st.ports.read();
    if !table.status.certain() || !host_ports_known(&st) {
        return Err(ApiError::Unavailable(
            "the port map is not complete yet (starting, resyncing after lost events, or this node's pods not listed \
             yet); no port can be promised free"
                .into(),
        ));
    }
    let host = st.cluster.as_ref().map(|c| c.host_ports.borrow().clone()).unwrap_or_default();
    let free: Vec<u16> = (from..=to)
        .filter(|p| protos.iter().all(|proto| !table.map.is_taken((*proto, *p)) && !host.contains(*proto, *p)))
        .take(count)
        .collect();
    // A blind spot of this kernel (not a transient state) leaves the answer
    // useful but not a promise: say so rather than refuse for ever.
    let mut body = json!({ "from": from, "to": to, "ports": free, "certain": true });
    if let Some(b) = protos.iter().find_map(|p| table.status.blind_spot_for(*p)) {
        body["certain"] = json!(false);
        body["reason"] = json!(b.reason());
    }
    Ok(Json(body).into_response())
}

async fn watch(
    State(st): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let params = Params::parse(q.as_deref(), &["proto", "from", "to"])?;
    let filter = Filter::from_params(&params)?;
    let shutdown = st.shutdown.clone();
    let stream = BroadcastStream::new(st.ports.subscribe())
        .filter_map(move |item| {
            let out = match item {
                Ok(c) if filter.protos.contains(&c.proto) && filter.range.contains(&c.port) => Some(
                    SseEvent::default()
                        .event(c.change)
                        .json_data(json!({"proto": c.proto, "port": c.port, "at": rfc3339_millis(c.at)}))
                        .unwrap_or_default(),
                ),
                Ok(_) => None,
                // The client fell behind: say so, so it can re-read the map.
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    Some(SseEvent::default().event("lagged").data(json!({ "missed": n }).to_string()))
                }
            };
            std::future::ready(out.map(Ok))
        })
        // Streams end on shutdown, or graceful shutdown would wait for them.
        .take_until(async move { shutdown.cancelled().await });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
