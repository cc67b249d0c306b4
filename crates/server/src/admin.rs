//! Admin endpoints: the server's API keys (list, create, revoke) and a
//! cluster's nodes, for admin keys only. A key is an admin key when it was
//! made with `kiln keys create --admin` (or with `"admin": true` here), or
//! is the first key the server was configured with, or the one it
//! generated at its first start. Any other valid key gets `403 forbidden`.
//!
//! Changes go to the store, where every server reading it picks them up
//! within seconds, and to this server's key ring at once.

use crate::auth::{hash_key, KeyEntry};
use crate::body::BoundedJson;
use crate::error::AppError;
use crate::state::AppState;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::{Extension, Json};
use kiln_protocol::{
    ApiError, CreateKey, CreatedKey, Envelope, ErrorCode, ErrorEnvelope, KeyInfo, KeyList, NodeList, RevokedKey,
};
use kiln_sessions::{Caller, SessionError};
use kiln_store::{KeyOptions, KeyOrigin, KeyRecord};
use rand::distr::{Alphanumeric, SampleString};

/// Labels kiln gives keys itself; the server treats them specially.
const RESERVED_LABELS: [&str; 2] = ["configured", "generated"];
/// A new API key: `kiln_` and 40 random alphanumerics (238 bits).
pub fn generate_key() -> String {
    format!("kiln_{}", Alphanumeric.sample_string(&mut rand::rng(), 40))
}

/// Middleware, after `require_key`: only admin keys pass.
pub(crate) async fn require_admin(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    if state.keys.is_admin(&caller.key_id) {
        return Ok(next.run(req).await);
    }
    Err(ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "key {} is not an admin key: the admin endpoints (keys, nodes) need one (`kiln keys create \
             --admin` on the server, or the key kiln generated at its first start)",
            caller.key_id
        ),
    )
    .into())
}

/// Every API key of this server, revoked ones included.
#[utoipa::path(get, path = "/v1/admin/keys", operation_id = "list_keys", tag = "admin",
    responses(
        (status = 200, description = "The keys, oldest first (ids, never the keys)", body = Envelope<KeyList>),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(State(state): State<AppState>) -> Result<Json<Envelope<KeyList>>, AppError> {
    let records = state.manager.store().keys().await.map_err(SessionError::from)?;
    let keys = records.iter().map(|r| info(&state, r)).collect();
    Ok(Json(Envelope::ok(KeyList { keys })))
}

/// Create an API key. The answer holds the key itself, this once.
#[utoipa::path(post, path = "/v1/admin/keys", operation_id = "create_key", tag = "admin",
    request_body = CreateKey,
    responses(
        (status = 200, description = "Created; it works at once on this server, within seconds on others", body = Envelope<CreatedKey>),
        (status = 400, description = "Bad JSON, label or limit", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    BoundedJson(req): BoundedJson<CreateKey>,
) -> Result<Json<Envelope<CreatedKey>>, AppError> {
    // The rules the OpenAPI document states for `label` (kiln_protocol::LABEL_PATTERN).
    let label = req.label.clone().unwrap_or_else(|| "created".to_string());
    if label.is_empty() || label.chars().count() > 100 || label.chars().any(char::is_control) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "label must be 1 to 100 characters, none a control character",
        )
        .with_param("label")
        .into());
    }
    if RESERVED_LABELS.contains(&label.as_str()) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the labels {RESERVED_LABELS:?} are kiln's own; choose another"),
        )
        .with_param("label")
        .into());
    }
    if req.max_sessions == Some(0) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "max_sessions must be at least 1 (or absent)")
            .with_param("max_sessions")
            .into());
    }
    // The server's --network is the ceiling: a key can only narrow it.
    if let Some(asked) = req.network {
        asked
            .within(state.manager.network())
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.to_string()).with_param("network"))?;
    }
    let key = generate_key();
    let options = KeyOptions {
        max_sessions: req.max_sessions,
        max_executions_per_key: req.max_executions_per_key,
        network: req.network,
        admin: req.admin,
    };
    let record = state
        .manager
        .store()
        .add_key(hash_key(&key), KeyOrigin::Created, &label, &options)
        .await
        .map_err(SessionError::from)?;
    state.keys.insert(KeyEntry {
        id: record.id.clone(),
        hash: record.hash,
        network: req.network,
        max_sessions: req.max_sessions,
        max_executions_per_key: req.max_executions_per_key,
        admin: req.admin,
    });
    tracing::info!(key = %record.id, label = %record.label, admin = req.admin, "API key created");
    Ok(Json(Envelope::ok(CreatedKey { key, record: info(&state, &record) })))
}

/// Revoke an API key: its requests are refused from now on (on other
/// servers of the same store within seconds).
#[utoipa::path(delete, path = "/v1/admin/keys/{id}", operation_id = "revoke_key", tag = "admin",
    params(("id" = String, Path, description = "The key's id (`key_...`)")),
    responses(
        (status = 200, description = "Revoked (or already revoked)", body = Envelope<RevokedKey>),
        (status = 409, description = "The key making the request (revoke it with another admin key)", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No key with this id", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Envelope<RevokedKey>>, AppError> {
    if id == caller.key_id {
        return Err(ApiError::new(
            ErrorCode::KeyInUse,
            "this is the key making the request: revoke it with another admin key, or with `kiln keys revoke`",
        )
        .with_param("id")
        .into());
    }
    let store = state.manager.store();
    if !store.revoke_key(&id).await.map_err(SessionError::from)? {
        return Err(ApiError::new(ErrorCode::KeyNotFound, format!("no key {id}; GET /v1/admin/keys lists them"))
            .with_param("id")
            .into());
    }
    state.keys.remove(&id);
    tracing::info!(key = %id, by = %caller.key_id, "API key revoked");
    Ok(Json(Envelope::ok(RevokedKey { id, revoked: true })))
}

/// A stored key as the API shows it; for an accepted key, with the settings
/// it is served with (a configured key's come from the server's flags).
fn info(state: &AppState, r: &KeyRecord) -> KeyInfo {
    let live = state.keys.get(&r.id);
    KeyInfo {
        id: r.id.clone(),
        label: r.label.clone(),
        created_at: r.created_at,
        admin: live.as_ref().map_or(r.options.admin, |k| k.admin),
        network: match &live {
            Some(k) => k.network,
            None => r.options.network,
        },
        max_sessions: live.as_ref().map_or(r.options.max_sessions, |k| k.max_sessions),
        max_executions_per_key: live.as_ref().map_or(r.options.max_executions_per_key, |k| k.max_executions_per_key),
        revoked_at: r.revoked_at,
    }
}

/// The nodes of this server's cluster, as it last read the shared database
/// (every second): what `kiln nodes` shows. Empty alone.
#[utoipa::path(get, path = "/v1/admin/nodes", operation_id = "list_nodes", tag = "admin",
    responses(
        (status = 200, description = "Every node the database knows, by id (at most a second old)", body = Envelope<NodeList>),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn nodes(State(state): State<AppState>) -> Json<Envelope<NodeList>> {
    let Some(cluster) = &state.cluster else {
        return Json(Envelope::ok(NodeList { this_node: None, nodes: Vec::new() }));
    };
    let now = chrono::Utc::now();
    let nodes = kiln_store::node_infos(&cluster.membership.nodes(), now);
    Json(Envelope::ok(NodeList { this_node: Some(cluster.membership.node_id()), nodes }))
}
