//! `/api/v2/ports`: the live port map, one port, free ports, and a watch
//! stream of ports becoming taken or free. Every answer comes from the ports
//! domain's occupancy verdict ([`Ports::detail`], [`Ports::free`]); nothing
//! here decides what "taken" means.
use std::{collections::BTreeMap, convert::Infallible, net::IpAddr, time::SystemTime};

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
    ports::{
        model::{Family, Proto, SockState, Socket, Source},
        occupancy::Verdict,
        ChangeKind, Ports, SocketFilter, Status,
    },
    time::rfc3339_millis,
};

/// Sockets a listing page holds at most by default, and at the most.
const PAGE_DEFAULT: usize = 1000;
const PAGE_MAX: usize = 10_000;

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
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<String>,
}

const PROTO_EXPECTED: &str = "tcp or udp";
const FAMILY_EXPECTED: &str = "ipv4 or ipv6";
const STATE_EXPECTED: &str = "a socket state such as listen, bound, established or time_wait";

fn filter(p: &Params) -> Result<SocketFilter, ApiError> {
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
    Ok(SocketFilter {
        protos: proto.map_or(Proto::ALL.to_vec(), |p| vec![p]),
        family: p.opt("family", FAMILY_EXPECTED)?,
        state: p.opt("state", STATE_EXPECTED)?,
        range: from..=to,
    })
}

/// What makes sockets one entry: protocol, port, family, address, state, blocking.
type GroupKey = (Proto, u16, Family, IpAddr, SockState, bool);

fn entries(ports: &Ports, sockets: Vec<Socket>) -> Vec<Entry> {
    let mut groups: BTreeMap<GroupKey, Vec<Socket>> = BTreeMap::new();
    for s in sockets {
        groups.entry((s.proto, s.port, s.family, s.addr, s.state, s.blocks())).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|((proto, port, family, address, state, blocking), socks)| {
            // A socket only a dump saw has no task, but its own cgroup may
            // still name its container.
            let mut owners: Vec<OwnerView> = socks
                .iter()
                .filter_map(|s| {
                    let (pid, comm, cgroup) = match &s.owner {
                        Some(o) => {
                            (o.pid, o.comm.clone(), if o.cgroup_id != 0 { o.cgroup_id } else { s.sock_cgroup_id })
                        }
                        None => (0, String::new(), s.sock_cgroup_id),
                    };
                    let view = OwnerView {
                        pid: (pid != 0).then_some(pid),
                        comm: (!comm.is_empty()).then_some(comm),
                        container: ports.container_of(cgroup),
                    };
                    (view.pid.is_some() || view.comm.is_some() || view.container.is_some()).then_some(view)
                })
                .collect();
            owners.sort();
            owners.dedup();
            let first_seen = socks.iter().map(|s| s.first_seen).min().unwrap_or(SystemTime::UNIX_EPOCH);
            let source = if socks.iter().any(|s| s.source == Source::Event) { Source::Event } else { socks[0].source };
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
/// not list is free (complete, and no blind spot of this kernel could hide a
/// socket of that protocol). Claims (hostPorts, ...) are listed at
/// `/api/v2/ports/{port}` and `/api/v2/kubernetes`.
fn status_json(status: &Status) -> serde_json::Value {
    let complete = status.certain();
    let certain = |p: Proto| complete && status.blind_spot_for(p).is_none();
    json!({
        "complete": complete,
        "certain": {"tcp": certain(Proto::Tcp), "udp": certain(Proto::Udp)},
        "status": status,
    })
}

/// The map, a page at a time: `limit` sockets (whole ports), and `next` to
/// pass as `after` for the following page.
async fn list(State(st): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let params = Params::parse(q.as_deref(), &["proto", "family", "from", "to", "state", "limit", "after"])?;
    let f = filter(&params)?;
    let limit: usize = params.opt("limit", "a number from 1 to 10000")?.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadParam {
            param: "limit",
            value: limit.to_string(),
            reason: format!("expected a number from 1 to {PAGE_MAX}"),
        });
    }
    let after = params.opt::<String>("after", "proto:port, as `next` gave it")?.map(|a| parse_after(&a)).transpose()?;
    st.ports.settle().await;
    let (sockets, next) = st.ports.sockets(&f, after, limit);
    let mut body = status_json(&st.ports.status().borrow());
    body["ports"] = json!(entries(&st.ports, sockets));
    body["next"] = json!(next.map(|(p, port)| format!("{p}:{port}")));
    Ok(Json(body).into_response())
}

fn parse_after(a: &str) -> Result<(Proto, u16), ApiError> {
    let bad = || ApiError::BadParam {
        param: "after",
        value: a.into(),
        reason: "expected proto:port, as `next` gave it".into(),
    };
    let (p, port) = a.split_once(':').ok_or_else(bad)?;
    Ok((p.parse().map_err(|()| bad())?, port.parse().map_err(|_| bad())?))
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
    st.ports.settle().await;
    let d = st.ports.detail(&protos, port);
    let mut body = json!({
        "port": port,
        "verdict": d.verdict.name(),
        // Never say free when unsure: anything but a certain free reads taken.
        "taken": d.verdict.reads_taken(),
        "certain": !matches!(d.verdict, Verdict::Unsure(_)),
        "entries": entries(&st.ports, d.sockets),
        "claims": d.claims,
    });
    match &d.verdict {
        Verdict::Taken(reasons) => body["reasons"] = json!(reasons),
        Verdict::Unsure(u) => {
            body["unsure"] = json!(u);
            body["reason"] = json!(u.reason());
        }
        Verdict::Free => {}
    }
    Ok(Json(body).into_response())
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
    let protos: &[Proto] = match params.opt::<FreeProto>("proto", "tcp, udp or both")?.unwrap_or(FreeProto::Tcp) {
        FreeProto::Tcp => &[Proto::Tcp],
        FreeProto::Udp => &[Proto::Udp],
        FreeProto::Both => &Proto::ALL,
    };
    // A transient condition (start-up, resync, an input not read yet) is a
    // 503 to retry; a blind spot of this kernel is lasting, so the answer
    // comes with `certain: false` and the reason rather than never.
    st.ports.settle().await;
    let found = st
        .ports
        .free(protos, from..=to, count)
        .map_err(|u| ApiError::Unavailable(format!("{}; no port can be promised free", u.reason())))?;
    let mut body = json!({ "from": from, "to": to, "ports": found.ports, "certain": found.caveat.is_none() });
    if let Some(u) = found.caveat {
        body["reason"] = json!(u.reason());
    }
    Ok(Json(body).into_response())
}

async fn watch(
    State(st): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let params = Params::parse(q.as_deref(), &["proto", "from", "to"])?;
    let f = filter(&params)?;
    let Ok(slot) = st.limits.watchers.clone().try_acquire_owned() else {
        return Err(ApiError::Unavailable(format!(
            "too many open watch streams (at most {}); retry later",
            super::MAX_WATCHERS
        )));
    };
    let shutdown = st.shutdown.clone();
    let stream = BroadcastStream::new(st.ports.subscribe())
        .filter_map(move |item| {
            // The slot is held as long as the stream lives.
            let _held = &slot;
            let out = match item {
                Ok(c) if f.protos.contains(&c.proto) && f.range.contains(&c.port) => {
                    let name = match c.kind {
                        ChangeKind::Taken => "taken",
                        ChangeKind::Freed => "freed",
                    };
                    Some(
                        SseEvent::default()
                            .event(name)
                            .json_data(json!({"proto": c.proto, "port": c.port, "at": rfc3339_millis(c.at)}))
                            .unwrap_or_default(),
                    )
                }
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
