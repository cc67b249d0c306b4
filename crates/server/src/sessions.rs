//! Session endpoints beyond execute: the caller's sessions, one session
//! (read, end), and the caller's usage.

use crate::error::AppError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use kiln_protocol::{Deleted, Envelope, ErrorEnvelope, SessionInfo, SessionList, UsageData};
use kiln_sessions::Caller;

/// The caller's live sessions. Also served at `/tci/sessions`.
#[utoipa::path(
    get, path = "/v1/tci/sessions", operation_id = "list_sessions", tag = "sessions",
    responses(
        (status = 200, description = "Live sessions, oldest first", body = Envelope<SessionList>),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Envelope<SessionList>>, AppError> {
    let sessions = state.manager.list(&caller.key_id).await?;
    Ok(Json(Envelope::ok(SessionList { sessions })))
}

/// One of the caller's live sessions.
#[utoipa::path(get, path = "/v1/tci/sessions/{id}", operation_id = "get_session", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session", body = Envelope<SessionInfo>),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 410, description = "The session has ended", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Envelope<SessionInfo>>, AppError> {
    Ok(Json(Envelope::ok(state.manager.get(&caller.key_id, &id).await?)))
}

/// End a session now: its kernel, sandbox and files are gone when this answers.
#[utoipa::path(delete, path = "/v1/tci/sessions/{id}", operation_id = "end_session", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "Ended", body = Envelope<Deleted>),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 410, description = "The session has ended", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Deleted>>, AppError> {
    state.manager.end(&caller.key_id, &id).await?;
    Ok(Json(Envelope::ok(Deleted { id, deleted: true })))
}

/// The caller's usage: sessions started (the billing unit), executions,
/// execution and CPU seconds, peak memory.
#[utoipa::path(get, path = "/v1/tci/usage", operation_id = "usage", tag = "usage",
    responses(
        (status = 200, description = "The caller's usage", body = Envelope<UsageData>),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Envelope<UsageData>>, AppError> {
    let u = state.manager.usage(&caller.key_id).await?;
    Ok(Json(Envelope::ok(UsageData {
        key_id: u.key_id,
        sessions_started: u.sessions_started,
        executions: u.executions,
        execution_seconds: u.execution_seconds,
        cpu_seconds: u.cpu_seconds,
        peak_memory_bytes: u.peak_memory_bytes,
    })))
}
