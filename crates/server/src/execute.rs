//! `POST /v1/tci/execute`: run code in a new or existing session.

use crate::body::BoundedJson;
use crate::error::AppError;
use crate::state::AppState;
use axum::extract::State;
use axum::{Extension, Json};
use kiln_protocol::{
    decode_files, ApiError, Envelope, ErrorCode, ErrorEnvelope, ExecuteData, ExecuteRequest, LANGUAGES,
};
use kiln_sessions::{Caller, Exec};

/// Run code in a new session, or in `session_id`'s.
///
/// Also served at `/tci/execute`. An exception in the code is a 200 with an
/// `error` output, not a failed request.
#[utoipa::path(
    post, path = "/v1/tci/execute", tag = "execute",
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "The code ran (it may have raised: see `status` and the `error` outputs)", body = Envelope<ExecuteData>),
        (status = 400, description = "Bad JSON, fields, language, files or timeout", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 410, description = "The session has ended: start a new one", body = ErrorEnvelope),
        (status = 413, description = "Body over the limit", body = ErrorEnvelope),
        (status = 429, description = "This key is at its session limit", body = ErrorEnvelope),
        (status = 503, description = "No capacity, not ready, shutting down, or no kernel could start", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn execute(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    BoundedJson(req): BoundedJson<ExecuteRequest>,
) -> Result<Json<Envelope<ExecuteData>>, AppError> {
    let exec = validate(req, &caller)?;
    let data = state.manager.execute(&caller.key_id, exec).await?;
    Ok(Json(Envelope::ok(data)))
}

/// Check an execute request and turn it into the session layer's job.
fn validate(req: ExecuteRequest, caller: &Caller) -> Result<Exec, ApiError> {
    let language = req.language.as_deref().unwrap_or("python");
    if !LANGUAGES.contains(&language) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedLanguage,
            format!("language {language:?} is not supported; this server runs: {}", LANGUAGES.join(", ")),
        )
        .with_param("language"));
    }
    let files = decode_files(req.files.as_deref().unwrap_or_default())?;
    let timeout = kiln_protocol::timeout_from_seconds(req.timeout)?;
    let session_id = req.session_id.filter(|s| !s.is_empty());
    Ok(Exec { session_id, code: req.code, files, timeout, network: caller.network, max_sessions: caller.max_sessions })
}
