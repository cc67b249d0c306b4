//! The one error type handlers return, and its HTTP rendering.
//!
//! What a failure means to a client (its stable code and message) is
//! decided in one table, [`kiln_sessions::SessionError::to_api`], shared with
//! MCP; this module renders it as HTTP: status, envelope, retry headers, and
//! one log line (with the internal detail, for kiln's own failures).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_protocol::{ApiError, ErrorCode};
use kiln_sessions::SessionError;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A failure already phrased for the API.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A failure of the session layer.
    #[error(transparent)]
    Session(#[from] SessionError),
}

impl AppError {
    fn to_api(&self) -> ApiError {
        match self {
            AppError::Api(e) => e.clone(),
            AppError::Session(e) => e.to_api(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let api = self.to_api();
        let status = StatusCode::from_u16(api.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // A database that is restarting is a condition, not a failure of
        // this request: one line per request at error level would bury the
        // store's own warning.
        if matches!(api.code, ErrorCode::StoreUnavailable | ErrorCode::NodeUnreachable | ErrorCode::SessionLost) {
            tracing::warn!(code = %api.code, error = %self, "request refused");
        } else if api.is_server_side() {
            tracing::error!(code = %api.code, error = %self, "request failed");
        } else {
            tracing::debug!(code = %api.code, error = %self, "request refused");
        }
        let mut resp = (status, Json(api.envelope())).into_response();
        // For the metrics middleware, which counts errors by code.
        resp.extensions_mut().insert(api.code);
        let headers = resp.headers_mut();
        match api.code {
            // Worth retrying soon: say when.
            ErrorCode::NotReady
            | ErrorCode::NoCapacity
            | ErrorCode::TooManySessions
            | ErrorCode::StoreUnavailable
            | ErrorCode::NodeUnreachable => {
                headers.insert("retry-after", HeaderValue::from_static("2"));
            }
            ErrorCode::RateLimited => {
                headers.insert("retry-after", HeaderValue::from_static("1"));
            }
            // Retrying will not help: tell the clients that retry 5xx.
            ErrorCode::KernelUnavailable | ErrorCode::InternalError | ErrorCode::ShuttingDown => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        resp
    }
}
