//! The one error type handlers return, and its HTTP rendering.
//!
//! Errors of kiln itself (store failures, kernels that cannot start) are
//! logged here, once, with their detail; the client gets a stable code and a
//! message that says what to do, never an internal path or a backtrace.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_protocol::{ApiError, ErrorCode};
use kiln_sessions::{FileWriteError, SessionError};

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
            AppError::Session(e) => {
                let msg = e.to_string();
                match e {
                    SessionError::NotFound(_) => {
                        ApiError::new(ErrorCode::SessionNotFound, msg).with_param("session_id")
                    }
                    SessionError::Expired(_) => ApiError::new(ErrorCode::SessionExpired, msg).with_param("session_id"),
                    SessionError::TooManySessions(_) => ApiError::new(ErrorCode::TooManySessions, msg),
                    SessionError::NoCapacity(_) => ApiError::new(ErrorCode::NoCapacity, msg),
                    SessionError::KernelUnavailable(_) | SessionError::Broken(_) => ApiError::new(
                        ErrorCode::KernelUnavailable,
                        "kiln could not start a Python kernel for this session; this is a server-side \
                         failure, not an error of your code. The operator's log has the cause.",
                    ),
                    SessionError::NotReady => ApiError::new(ErrorCode::NotReady, msg),
                    SessionError::ShuttingDown => ApiError::new(ErrorCode::ShuttingDown, msg),
                    SessionError::Files(f) => {
                        let index = match f {
                            FileWriteError::Collision { index, .. } | FileWriteError::Io { index, .. } => *index,
                        };
                        ApiError::new(ErrorCode::InvalidFile, msg).with_param(format!("files[{index}].name"))
                    }
                    SessionError::BadTimeout { .. } => {
                        ApiError::new(ErrorCode::InvalidRequest, msg).with_param("timeout")
                    }
                    SessionError::Browse(b) => match b {
                        kiln_sessions::BrowseError::NotFound(_) => ApiError::new(ErrorCode::FileNotFound, msg),
                        kiln_sessions::BrowseError::TooLarge(..) => ApiError::new(ErrorCode::PayloadTooLarge, msg),
                        kiln_sessions::BrowseError::Io(..) => ApiError::new(
                            ErrorCode::InternalError,
                            "kiln could not read the session's files; this is a server-side failure.",
                        ),
                        _ => ApiError::new(ErrorCode::InvalidFile, msg).with_param("path"),
                    },
                    SessionError::Store(_) => ApiError::new(
                        ErrorCode::InternalError,
                        "kiln's metadata store failed; this is a server-side failure. Retry later.",
                    ),
                }
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let api = self.to_api();
        let status = StatusCode::from_u16(api.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
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
            ErrorCode::NotReady | ErrorCode::NoCapacity | ErrorCode::TooManySessions => {
                headers.insert("retry-after", HeaderValue::from_static("2"));
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
