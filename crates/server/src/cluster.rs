//! Routing in a cluster: any node accepts any request, authenticates it,
//! and serves it itself or forwards it, in one hop, to the node that holds
//! the session.
//!
//! A session id names its node and that node's incarnation
//! ([`kiln_sessions::node`]), and every node keeps the cluster's lease table
//! in memory ([`Membership`]), so routing costs no lookup. A request for a
//! session on a lost node (lease run out, or restarted since) answers 410
//! `session_lost`; a live owner that does not answer, 503
//! `node_unreachable` with `Retry-After`. A new session stays here when this
//! node has a ready kernel, else goes to the better of two random live,
//! non-draining peers by free capacity (`placement`: ready kernels, free
//! places, free memory; a node without memory for one more session is not
//! asked); 503 `no_capacity` when none has room.
//!
//! A forwarded request carries the caller the first node authenticated
//! (key id and the key's settings) in `x-kiln-forwarded-caller`, signed with
//! the cluster secret (HMAC-SHA256 over a timestamp, the method, the path
//! with its query, and the caller, valid for 30 s): the owner trusts it instead of asking
//! for the key, and a client cannot forge it. A forwarded request is always
//! served where it lands, never forwarded again. Streams (SSE executes,
//! downloads, uploads) pass through as they come.

use crate::body::read_body;
use crate::error::AppError;
use crate::peers::Cluster;
use crate::placement::{self, Target};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use hmac::Mac;
use kiln_protocol::{ApiError, ErrorCode};
use kiln_sessions::{Caller, NetworkPolicy, Owner, Readiness, SessionError};
use kiln_store::{Capacity, NodeRecord};
use std::time::Duration;

/// The authenticated caller, as the forwarding node saw it.
const CALLER: &str = "x-kiln-forwarded-caller";
/// `<unix seconds>:<hex HMAC>` of the forwarded request.
const SIGNATURE: &str = "x-kiln-forwarded-auth";
/// The node that forwarded it (for logs).
const BY: &str = "x-kiln-forwarded-by";
/// The session a forwarded execute names (`-`: none), read by the owner
/// instead of parsing the body a second time. Trusted only on a request
/// whose signature verified; a client's own `x-kiln-forwarded-*` headers
/// never travel (see [`forward`]).
const SESSION: &str = "x-kiln-forwarded-session";
/// Answers up to this size with a length are passed on whole, not as a
/// stream (one write to the client instead of a header and body chunks).
const WHOLE_ANSWER_MAX: u64 = 256 << 10;
/// Request bodies up to this size with a length are sent whole.
const WHOLE_BODY_MAX: u64 = 64 << 10;
/// How old (or how far ahead) a signature may be.
const MAX_SKEW_SECS: i64 = 30;

/// Headers that belong to one connection, not to the request.
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

/// Marks a request that arrived forwarded from a peer: it is served here.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forwarded;

fn encode_caller(c: &Caller) -> String {
    let network = c.network.map_or("-", |n| n.as_str());
    let max = c.max_sessions.map_or("-".to_string(), |m| m.to_string());
    // The fourth part only when the key has its own limit: a peer of the
    // release before per-key execution limits reads three.
    match c.max_executions_per_key {
        Some(executions) => format!("{};{network};{max};{executions}", c.key_id),
        None => format!("{};{network};{max}", c.key_id),
    }
}

fn decode_caller(s: &str) -> Option<Caller> {
    let mut parts = s.split(';');
    let key_id = parts.next().filter(|k| !k.is_empty())?.to_string();
    let network = match parts.next()? {
        "-" => None,
        n => Some(n.parse::<NetworkPolicy>().ok()?),
    };
    let max_sessions = match parts.next()? {
        "-" => None,
        m => Some(m.parse().ok()?),
    };
    // Absent for a key without its own limit (and from a peer of the
    // release before per-key execution limits).
    let max_executions_per_key = match parts.next() {
        None => None,
        Some(m) => Some(m.parse().ok().filter(|&m: &u64| m >= 1)?),
    };
    parts.next().is_none().then_some(Caller { key_id, network, max_sessions, max_executions_per_key })
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn forged(msg: &str) -> AppError {
    AppError::Api(ApiError::new(ErrorCode::Unauthorized, msg))
}

/// The caller of a request forwarded by a peer, if it claims to be one:
/// `None` for an ordinary request, an error for a claim that does not
/// verify (no cluster, a bad or stale signature).
pub(crate) fn forwarded_caller(
    state: &AppState,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
) -> Option<Result<Caller, AppError>> {
    let caller = headers.get(CALLER)?;
    let Some(cluster) = &state.cluster else {
        return Some(Err(forged("this kiln is not part of a cluster: it accepts no forwarded requests")));
    };
    let verify = || {
        let caller_s = caller.to_str().ok()?;
        let (ts, sig) = headers.get(SIGNATURE)?.to_str().ok()?.split_once(':')?;
        let ts: i64 = ts.parse().ok()?;
        if (chrono::Utc::now().timestamp() - ts).abs() > MAX_SKEW_SECS {
            return None;
        }
        cluster.mac(ts, method, path, caller_s).verify_slice(&unhex(sig)?).ok()?;
        decode_caller(caller_s)
    };
    Some(verify().ok_or_else(|| {
        forged(
            "a forwarded request whose signature does not verify (wrong cluster secret, \
        or a clock more than 30 s off)",
        )
    }))
}

/// Where a path names a session: `/tci/sessions/{id}` and what is under it.
fn session_in_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/tci/sessions/").or_else(|| path.strip_prefix("/tci/sessions/"))?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

fn is_execute(path: &str) -> bool {
    path == "/v1/tci/execute" || path == "/tci/execute"
}

#[derive(serde::Deserialize)]
struct SessionRef {
    #[serde(default)]
    session_id: Option<String>,
}

/// Middleware on the API routes, after authentication: serve here or
/// forward to the owner.
pub(crate) async fn route(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, AppError> {
    let Some(cluster) = state.cluster.clone() else {
        return Ok(next.run(req).await);
    };
    let forwarded = req.extensions().get::<Forwarded>().is_some();
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return Ok(next.run(req).await);
    };
    let path = req.uri().path().to_string();
    let (req, session) = if let Some(id) = session_in_path(&path) {
        let id = id.to_string();
        (req, Some(id))
    } else if is_execute(&path) && req.method() == Method::POST {
        // The forwarding peer read the session from the body already.
        if let Some(named) = req.headers().get(SESSION).filter(|_| forwarded) {
            let session = named.to_str().ok().filter(|s| *s != "-").map(str::to_string);
            return served_forwarded(&state, &cluster, &caller, session, req, next).await;
        }
        let (parts, body) = req.into_parts();
        let bytes = read_body(body, state.max_body_bytes).await?;
        // A body that does not parse is the handler's to refuse.
        let session = serde_json::from_slice::<SessionRef>(&bytes).ok().and_then(|r| r.session_id);
        (Request::from_parts(parts, Body::from(bytes)), session)
    } else {
        return Ok(next.run(req).await);
    };
    if forwarded {
        return served_forwarded(&state, &cluster, &caller, session, req, next).await;
    }
    let execute = is_execute(&path);
    match session {
        Some(id) => to_owner(&state, &cluster, &caller, &id, execute, req, next).await,
        None if execute => place(&state, &cluster, &caller, req, next).await,
        None => Ok(next.run(req).await),
    }
}

/// A peer sent it here as the owner: serve it, unless this node's lease
/// ran out meanwhile (it was frozen, or cut off), when its sessions are
/// lost and it must not run code in them.
async fn served_forwarded(
    state: &AppState,
    cluster: &Cluster,
    caller: &Caller,
    session: Option<String>,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    match session {
        Some(id) if matches!(cluster.membership.owner(&id), Owner::Lost { .. }) => {
            Err(lost(state, caller, &id, cluster.membership.node_id()).await)
        }
        _ => Ok(next.run(req).await),
    }
}

/// Serve a request for session `id` where the session is.
async fn to_owner(
    state: &AppState,
    cluster: &Cluster,
    caller: &Caller,
    id: &str,
    execute: bool,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let owner = match cluster.membership.owner(id) {
        // The cached table may predate the owner's new incarnation (it
        // re-registered within the last second): read it again before
        // calling a session lost.
        Owner::Lost { .. } | Owner::Unknown => cluster.membership.owner_fresh(id).await,
        known => known,
    };
    match owner {
        // An id of no known node is looked up here like any other: the
        // answer is not found, or expired for the caller's own old one.
        Owner::Local | Owner::Unknown => Ok(next.run(req).await),
        Owner::Lost { node } => Err(lost(state, caller, id, node).await),
        Owner::Peer(peer) => match forward_while_alive(cluster, &peer, caller, id, execute, req).await {
            Ok(resp) => Ok(resp),
            Err(Gone::Lost(node)) => Err(lost(state, caller, id, node).await),
            Err(Gone::Failed(e)) => {
                tracing::warn!(peer = %peer.id, error = %e, "the owner of a session did not answer");
                match cluster.membership.owner_fresh(id).await {
                    Owner::Lost { node } => Err(lost(state, caller, id, node).await),
                    _ => Err(SessionError::NodeUnreachable { id: id.to_string(), node: peer.id }.into()),
                }
            }
        },
    }
}

/// Why a forward gave no answer.
enum Gone {
    /// The owner's lease ran out while it was asked (it froze or died).
    Lost(String),
    /// The connection failed.
    Failed(String),
}

/// [`forward`], given up as soon as the owner is known lost: a frozen
/// owner accepts connections but never answers, and must not hold the
/// request past its lease.
async fn forward_while_alive(
    cluster: &Cluster,
    peer: &NodeRecord,
    caller: &Caller,
    id: &str,
    execute: bool,
    req: Request,
) -> Result<Response, Gone> {
    let lost = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Owner::Lost { node } = cluster.membership.owner(id) {
                return node;
            }
        }
    };
    tokio::select! {
        answer = forward(cluster, peer, caller, execute.then_some(id), req) => answer.map_err(Gone::Failed),
        node = lost => Err(Gone::Lost(node)),
    }
}

/// The answer for session `id` of a lost node: lost if it was the
/// caller's and still running when its node was lost, expired if it had
/// ended before, not found if it was never the caller's.
async fn lost(state: &AppState, caller: &Caller, id: &str, node: String) -> AppError {
    match state.manager.store().session(id).await {
        Ok(Some(r)) if r.key_id == caller.key_id => {
            if r.lost || (r.ended_at.is_none() && r.expires_at > chrono::Utc::now()) {
                SessionError::Lost { id: id.to_string(), node }.into()
            } else {
                SessionError::Expired(id.to_string()).into()
            }
        }
        Ok(_) => SessionError::NotFound(id.to_string()).into(),
        Err(e) => SessionError::Store(e).into(),
    }
}

/// A new session: on the nodes [`placement::plan`] names, in turn (here
/// when a kernel is ready here, else the better of two random peers with
/// room and memory).
async fn place(
    state: &AppState,
    cluster: &Cluster,
    caller: &Caller,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let manager = &state.manager;
    let here = match cluster.membership.taking().is_ok() && manager.readiness() == Readiness::Ready {
        true => Some(Capacity {
            ready_kernels: manager.pool_level().await.0 as u64,
            live_sessions: manager.live_count() as u64,
            max_sessions: manager.max_sessions() as u64,
            memory_available_bytes: kiln_sessions::memory_available(),
        }),
        false => None,
    };
    let peers = cluster.membership.candidates();
    let alone = peers.is_empty();
    let order = placement::plan(here.as_ref(), peers, &mut rand::rng());
    if order.is_empty() {
        return match cluster.membership.taking() {
            // Alone and refusing (draining, lease lost): say why.
            Err(why) if alone => Err(SessionError::NotTaking(why).into()),
            _ => Err(SessionError::ClusterFull.into()),
        };
    }
    if order == [Target::Here] {
        return Ok(next.run(req).await);
    }
    let (parts, body) = req.into_parts();
    // The body was read already (an execute's): kept to ask the next node
    // if one is full by now (capacity is published every few seconds) or
    // does not answer.
    let bytes = read_body(body, state.max_body_bytes).await?;
    for target in order {
        let peer = match target {
            // Here comes last: it has room.
            Target::Here => return Ok(next.run(Request::from_parts(parts, Body::from(bytes))).await),
            Target::Peer(peer) => peer,
        };
        let req = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
        match forward(cluster, &peer, caller, Some("-"), req).await {
            Ok(resp) => match unless_full(resp).await {
                Some(resp) => return Ok(resp),
                None => tracing::debug!(peer = %peer.id, "a peer was full by now; asking the next"),
            },
            Err(e) => tracing::warn!(peer = %peer.id, error = %e, "a peer did not take a new session"),
        }
    }
    Err(SessionError::ClusterFull.into())
}

/// The peer's answer, unless it is 503 `no_capacity` (then `None`: ask
/// another node).
async fn unless_full(resp: Response) -> Option<Response> {
    if resp.status() != axum::http::StatusCode::SERVICE_UNAVAILABLE {
        return Some(resp);
    }
    let (parts, body) = resp.into_parts();
    // An error envelope is small; anything larger is passed on as it is.
    let bytes = match axum::body::to_bytes(body, 64 << 10).await {
        Ok(b) => b,
        Err(_) => return Some(Response::from_parts(parts, Body::from("{}"))),
    };
    let full = serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v["errors"][0]["code"] == ErrorCode::NoCapacity.as_str());
    (!full).then(|| Response::from_parts(parts, Body::from(bytes)))
}

/// Send `req` to `peer` as `caller`, and its answer back. `session`: the
/// session an execute's body names (`-`: none), for the owner.
///
/// Per request this costs what it must: one HMAC (the keyed state is set
/// up once, in [`Cluster`]), a kept-alive connection from the pool, and no
/// copy or parse of the body. A body or an answer already whole (an
/// execute's JSON, most answers) goes as one piece, so that it leaves in
/// one write with its headers; uploads, downloads and SSE stream through.
async fn forward(
    cluster: &Cluster,
    peer: &NodeRecord,
    caller: &Caller,
    session: Option<&str>,
    req: Request,
) -> Result<Response, String> {
    use axum::body::HttpBody as _;
    let Some(base) = &peer.advertise else {
        return Err("the peer advertises no address".into());
    };
    let (parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let url = format!("{}{pq}", base.trim_end_matches('/'));
    let caller_s = encode_caller(caller);
    let ts = chrono::Utc::now().timestamp();
    let sig = hex(&cluster.mac(ts, &parts.method, pq, &caller_s).finalize().into_bytes());
    let mut out = cluster.http().request(parts.method.clone(), url);
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "authorization" || n.starts_with("x-kiln-forwarded-") {
            continue;
        }
        out = out.header(name, value);
    }
    out =
        out.header(CALLER, caller_s).header(SIGNATURE, format!("{ts}:{sig}")).header(BY, cluster.membership.node_id());
    if let Some(session) = session {
        out = out.header(SESSION, session);
    }
    out = match body.size_hint().exact() {
        Some(0) if body.is_end_stream() => out,
        // Whole already (a body the routing read), or small: one piece.
        Some(n) if n <= WHOLE_BODY_MAX => match axum::body::to_bytes(body, n as usize).await {
            Ok(bytes) => out.body(bytes),
            Err(e) => return Err(format!("the request body could not be read: {e}")),
        },
        _ => out.body(reqwest::Body::wrap_stream(body.into_data_stream())),
    };
    let resp = out.send().await.map_err(|e| format!("{e:#}"))?;
    let mut answer = Response::builder().status(resp.status());
    if let Some(headers) = answer.headers_mut() {
        for (name, value) in resp.headers() {
            if !HOP_BY_HOP.contains(&name.as_str()) {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(&peer.id) {
            headers.insert(HeaderName::from_static("x-kiln-node"), v);
        }
    }
    let whole = resp.content_length().is_some_and(|n| n <= WHOLE_ANSWER_MAX);
    let body = if whole {
        match resp.bytes().await {
            Ok(bytes) => Body::from(bytes),
            // Cut off after its headers (the owner died mid-answer): the
            // client's answer breaks off too, as a stream's would.
            Err(e) => Body::from_stream(tokio_stream::once(Err::<bytes::Bytes, _>(e))),
        }
    } else {
        Body::from_stream(resp.bytes_stream())
    };
    answer.body(body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_round_trips_through_its_header_and_nothing_else_parses() {
        for c in [
            Caller { key_id: "key_0123".into(), network: None, max_sessions: None, max_executions_per_key: None },
            Caller {
                key_id: "key_0123".into(),
                network: Some(NetworkPolicy::None),
                max_sessions: Some(3),
                max_executions_per_key: Some(2),
            },
        ] {
            assert_eq!(decode_caller(&encode_caller(&c)), Some(c));
        }
        assert_eq!(
            decode_caller("key_old;-;4"),
            Some(Caller {
                key_id: "key_old".into(),
                network: None,
                max_sessions: Some(4),
                max_executions_per_key: None
            }),
            "a key without its own limit, or a peer of the previous release"
        );
        let plain = Caller { key_id: "key_p".into(), network: None, max_sessions: None, max_executions_per_key: None };
        assert_eq!(encode_caller(&plain), "key_p;-;-", "what a peer of the previous release reads");
        for bad in
            ["", ";-;-", "key;bogus;-", "key;-;x", "key;-;-;extra", "key;-", "key;-;-;0", "key;-;-;-", "key;-;-;1;1"]
        {
            assert_eq!(decode_caller(bad), None, "{bad}");
        }
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])), Some(vec![0, 1, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(session_in_path("/v1/tci/sessions/ses_x/files/a/b"), Some("ses_x"));
        assert_eq!(session_in_path("/tci/sessions/ses_y"), Some("ses_y"));
        assert_eq!(session_in_path("/v1/tci/sessions"), None);
    }
}
