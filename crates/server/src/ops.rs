//! Operations endpoints (health, readiness, metrics) and the answers for
//! routes and methods that do not exist.

use crate::error::AppError;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_protocol::{ApiError, ErrorCode};
use kiln_sessions::Readiness;

/// 200 once sessions can be served; 503 while starting, failed or stopping.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "operations", responses(
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
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text exposition", content_type = "text/plain")
))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.manager.render_metrics().await;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Count every error response by its code.
pub(crate) async fn count_errors(
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
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "operations", responses(
    (status = 200, description = "Ready"), (status = 503, description = "Not ready")
))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.manager.readiness() == Readiness::Ready && state.manager.has_capacity();
    // In a cluster: a node that cannot renew its lease, or is draining,
    // takes no new sessions, and says so.
    let cluster = state.cluster.as_ref().map(|c| &c.membership);
    let refusal = match cluster {
        Some(m) if !m.lease_holds() => Some(("lease_lost", "this node cannot renew its lease in the database".into())),
        Some(m) if m.draining() => Some(("draining", "this node is draining before it stops".into())),
        Some(m) => m.taking().err().map(|why| ("not_taking", why)),
        None => None,
    };
    let (status, body) = match refusal {
        Some((status, message)) => {
            (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": status, "message": message}))
        }
        None if ready => (StatusCode::OK, serde_json::json!({"status": "ready"})),
        None => (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "not ready"})),
    };
    (status, Json(body)).into_response()
}

pub(crate) async fn not_found() -> AppError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; kiln serves POST /tci/execute, GET /tci/sessions, GET/DELETE /tci/sessions/{id} and \
         /tci/sessions/{id}/files (also under /v1)",
    )
    .into()
}

pub(crate) async fn method_not_allowed() -> AppError {
    ApiError::new(ErrorCode::MethodNotAllowed, "this endpoint does not accept that HTTP method").into()
}
