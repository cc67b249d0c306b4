//! Routes and handlers.

use crate::auth::require_key;
use crate::error::AppError;
use crate::{sessions, AppState};
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kiln_protocol::{
    decode_files, ApiError, Envelope, ErrorCode, ErrorEnvelope, ExecuteData, ExecuteRequest, SessionList, LANGUAGES,
};
use kiln_sessions::Caller;
use kiln_sessions::{Exec, Readiness};

pub(crate) fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/tci/execute", post(execute))
        .route("/v1/tci/execute", post(execute))
        .route("/tci/sessions", get(list_sessions))
        .route("/v1/tci/sessions", get(list_sessions));
    // The same session routes under both prefixes.
    let mut api = api;
    for prefix in ["/tci", "/v1/tci"] {
        api = api
            .route(&format!("{prefix}/sessions/{{id}}"), get(sessions::get).delete(sessions::delete))
            .route(&format!("{prefix}/sessions/{{id}}/files"), get(sessions::list_files).post(sessions::upload))
            .route(&format!("{prefix}/sessions/{{id}}/files/{{*path}}"), get(sessions::download))
            .route(&format!("{prefix}/usage"), get(sessions::usage));
    }
    let api = api.route_layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    // MCP over streamable HTTP, with the same keys: tools act as the caller.
    let mcp = Router::new()
        .nest_service("/mcp", kiln_mcp::http_service(state.manager.clone()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(api)
        .merge(mcp)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::openapi::json))
        .route("/docs", get(crate::openapi::docs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read (and limited) by the handler itself, so that an
        // oversized body gets the API's JSON error, not a plain-text one.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_errors))
        // A request id per request (kept when the client sends one), in
        // every log line of the request and in the response.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(tower_http::request_id::MakeRequestUuid))
        .with_state(state)
}

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
    body: Body,
) -> Result<Json<Envelope<ExecuteData>>, AppError> {
    let bytes = read_body(body, state.max_body_bytes).await?;
    let req = parse(&bytes)?;
    let language = req.language.as_deref().unwrap_or("python");
    if !LANGUAGES.contains(&language) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedLanguage,
            format!("language {language:?} is not supported; this server runs: {}", LANGUAGES.join(", ")),
        )
        .with_param("language")
        .into());
    }
    let files = decode_files(req.files.as_deref().unwrap_or_default()).map_err(|e| {
        ApiError::new(ErrorCode::InvalidFile, format!("{e}; nothing was written"))
            .with_param(format!("files[{}]", e.index()))
    })?;
    let timeout = kiln_protocol::timeout_from_seconds(req.timeout)?;
    let session_id = req.session_id.filter(|s| !s.is_empty());
    let exec =
        Exec { session_id, code: req.code, files, timeout, network: caller.network, max_sessions: caller.max_sessions };
    let data = state.manager.execute(&caller.key_id, exec).await?;
    Ok(Json(Envelope::ok(data)))
}

/// Read at most `limit` bytes of body. Past the limit the rest is read and
/// discarded (up to a bound) before answering 413: a server that answers
/// while the client is still sending makes most HTTP clients report a reset
/// connection instead of the error.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    const DRAIN_MAX: usize = 1 << 30;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "the request body could not be read"));
        };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_MAX {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body ({seen} bytes or more) is larger than this server's limit of {limit} bytes; \
                 send fewer or smaller files"
            ),
        ));
    }
    Ok(buf.freeze())
}

/// Parse the execute body, turning serde's messages into actionable ones.
fn parse(bytes: &[u8]) -> Result<ExecuteRequest, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "the request body is empty: send a JSON object such as {\"language\": \"python\", \"code\": \"print(1)\"}",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let text = e.to_string();
        let param = text
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_string);
        let msg = if e.is_syntax() || e.is_eof() {
            format!("the request body is not valid JSON ({text})")
        } else {
            format!("the request body does not match the execute request ({text}); required: \"code\" (string); optional: \"language\", \"session_id\", \"files\"")
        };
        let err = ApiError::new(ErrorCode::InvalidRequest, msg);
        match param {
            Some(p) => err.with_param(p),
            None => err,
        }
    })
}

/// The caller's live sessions. Also served at `/tci/sessions`.
#[utoipa::path(
    get, path = "/v1/tci/sessions", tag = "sessions",
    responses(
        (status = 200, description = "Live sessions, oldest first", body = Envelope<SessionList>),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Envelope<SessionList>>, AppError> {
    let sessions = state.manager.list(&caller.key_id).await?;
    Ok(Json(Envelope::ok(SessionList { sessions })))
}

/// 200 once sessions can be served; 503 while starting, failed or stopping.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses(
    (status = 200, description = "Serving"), (status = 503, description = "Not serving (yet)")
))]
pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    let (status, body) = match state.manager.readiness() {
        Readiness::Ready => (StatusCode::OK, serde_json::json!({"status": "ok"})),
        Readiness::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "starting", "message": "provisioning the runtime or booting the first kernel"}),
        ),
        Readiness::Failed(m) => {
            (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "failed", "message": m}))
        }
        Readiness::Stopping => (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "stopping"})),
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics (no key: they hold counts, never ids or code).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text exposition", content_type = "text/plain")
))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.manager.render_metrics().await;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Count every error response by its code.
async fn count_errors(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    if let Some(code) = resp.extensions().get::<ErrorCode>() {
        state.manager.metrics().error(code.as_str());
    }
    resp
}

/// Ready for new sessions: serving, and below the session limit.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready"), (status = 503, description = "Not ready")
))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.manager.readiness() == Readiness::Ready && state.manager.has_capacity();
    let (status, body) = if ready {
        (StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "not ready"}))
    };
    (status, Json(body)).into_response()
}

async fn not_found() -> AppError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; kiln serves POST /tci/execute, GET /tci/sessions, GET/DELETE /tci/sessions/{id} and \
         /tci/sessions/{id}/files (also under /v1)",
    )
    .into()
}

async fn method_not_allowed() -> AppError {
    ApiError::new(ErrorCode::MethodNotAllowed, "this endpoint does not accept that HTTP method").into()
}
