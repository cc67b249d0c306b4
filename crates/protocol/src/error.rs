//! The error envelope and its stable codes.
//!
//! A failed request answers with a non-200 status and
//! `{"data": null, "errors": [{"code", "message"}], "error": {...}}`. The
//! `errors` list is what the TCI clients read; the `error` object is the
//! general API error shape the 1.x Python client parses for its exception
//! message (without it, it raises "Unexpected error response None").
//!
//! Codes are part of the API: agents branch on them (`session_expired` means
//! "start a new session"), RL trainers use them to tell an infrastructure
//! failure from a wrong answer. Add codes; never rename one.

use serde::{Deserialize, Serialize};

/// Every reason kiln refuses or fails a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON, or a field has the wrong type.
    InvalidRequest,
    /// `language` names a language this server does not run.
    UnsupportedLanguage,
    /// A `files` entry is unsafe or undecodable; nothing was written.
    InvalidFile,
    /// The body is larger than the server accepts.
    PayloadTooLarge,
    /// No API key, or one this server does not know.
    Unauthorized,
    /// No such session for this key (never existed, or another key's).
    SessionNotFound,
    /// The caller's own session has ended (TTL or teardown): start a new one.
    SessionExpired,
    /// This key already has as many live sessions as it may.
    TooManySessions,
    /// The server has no room for another session right now.
    NoCapacity,
    /// kiln could not start a kernel for the session (an infrastructure
    /// failure, never the user's code).
    KernelUnavailable,
    /// The server is still provisioning its runtime; retry shortly.
    NotReady,
    /// No such file or directory in the session's working directory.
    FileNotFound,
    /// No such route.
    NotFound,
    /// The route exists but not for this HTTP method.
    MethodNotAllowed,
    /// The server is shutting down.
    ShuttingDown,
    /// kiln's database is unreachable for now (restarting, failing over,
    /// overloaded); nothing was done. Retry after `Retry-After` seconds.
    StoreUnavailable,
    /// A bug or an unexpected failure inside kiln.
    InternalError,
    /// The key is valid but may not do this (an admin endpoint called with a
    /// key that is not an admin key).
    Forbidden,
    /// No API key with that id (admin endpoints).
    KeyNotFound,
    /// An uploaded file's name collides with another entry of the request or
    /// with what is in the working directory (a folder, a link, a file where
    /// a folder is needed); nothing was written.
    FileConflict,
    /// The key cannot be revoked: it is the one making the request.
    KeyInUse,
    /// The session lived on a kiln node that was lost (it stopped, crashed,
    /// restarted or was cut off): its state is gone. Start a new session.
    /// An infrastructure failure, never the user's code.
    SessionLost,
    /// The node that holds the session cannot be reached right now, though
    /// it is not known to be lost; nothing was done. Retry after
    /// `Retry-After` seconds.
    NodeUnreachable,
    /// The key has as many executions running and queued as it may: retry
    /// after `Retry-After` seconds.
    RateLimited,
    /// `language` differs from the language the session was started with
    /// (a session keeps its kernel): start a new session for the other one.
    /// A 409, not a 400: the request is well formed, and is refused for the
    /// state of the session it names, as a file conflict is.
    LanguageMismatch,
}

impl ErrorCode {
    /// The HTTP status this code is served with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::UnsupportedLanguage | ErrorCode::InvalidFile => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::SessionNotFound | ErrorCode::NotFound | ErrorCode::FileNotFound | ErrorCode::KeyNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::FileConflict | ErrorCode::KeyInUse | ErrorCode::LanguageMismatch => 409,
            ErrorCode::SessionExpired | ErrorCode::SessionLost => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::TooManySessions | ErrorCode::RateLimited => 429,
            ErrorCode::InternalError => 500,
            ErrorCode::NoCapacity
            | ErrorCode::KernelUnavailable
            | ErrorCode::NotReady
            | ErrorCode::ShuttingDown
            | ErrorCode::StoreUnavailable
            | ErrorCode::NodeUnreachable => 503,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnsupportedLanguage => "unsupported_language",
            ErrorCode::InvalidFile => "invalid_file",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::SessionExpired => "session_expired",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::KernelUnavailable => "kernel_unavailable",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::FileNotFound => "file_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::KeyNotFound => "key_not_found",
            ErrorCode::FileConflict => "file_conflict",
            ErrorCode::KeyInUse => "key_in_use",
            ErrorCode::SessionLost => "session_lost",
            ErrorCode::NodeUnreachable => "node_unreachable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::LanguageMismatch => "language_mismatch",
        }
    }

    /// The `error.type` of the general API error shape.
    fn error_type(self) -> &'static str {
        match self.http_status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 | 410 => "invalid_request_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the API reports it: a code, a message a person can act on,
/// and optionally the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong and what to do about it.
    pub message: String,
    /// The request field at fault (`session_id`, `files[2].name`, ...).
    pub param: Option<String>,
}

impl ApiError {
    /// An error without a field.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), param: None }
    }

    /// Name the request field at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Whether this is kiln's own failure (a 5xx), to be logged with its
    /// detail by whoever reports it, rather than the caller's mistake.
    pub fn is_server_side(&self) -> bool {
        self.code.http_status() >= 500
    }

    /// The JSON body for this error.
    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            data: None,
            errors: vec![ErrorItem { code: self.code, message: self.message.clone() }],
            error: OpenAiStyleError {
                message: self.message.clone(),
                r#type: self.code.error_type().to_string(),
                code: self.code,
                param: self.param.clone(),
            },
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// One entry of `errors`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorItem {
    /// The stable code.
    pub code: ErrorCode,
    /// The message.
    pub message: String,
}

/// The general API error object (`error`), read by the 1.x Python client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct OpenAiStyleError {
    /// The message.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub r#type: String,
    /// The stable code, same as in `errors`.
    pub code: ErrorCode,
    /// The request field at fault.
    pub param: Option<String>,
}

/// The whole body of a failed request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    /// Always `null`.
    #[schema(value_type = Option<Object>)]
    pub data: Option<()>,
    /// One entry per problem.
    pub errors: Vec<ErrorItem>,
    /// The same problem in the general API error shape.
    pub error: OpenAiStyleError,
    /// The message again, at the top (the npm client builds its exception
    /// message from it).
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelope_carries_both_error_shapes() {
        let e = ApiError::new(ErrorCode::SessionNotFound, "session ses_x does not exist").with_param("session_id");
        assert_eq!(
            serde_json::to_value(e.envelope()).unwrap_or_default(),
            json!({
                "data": null,
                "errors": [{"code": "session_not_found", "message": "session ses_x does not exist"}],
                "error": {"message": "session ses_x does not exist", "type": "invalid_request_error",
                          "code": "session_not_found", "param": "session_id"},
                "message": "session ses_x does not exist"
            })
        );
    }

    #[test]
    fn no_error_is_served_with_status_200() {
        for code in [
            ErrorCode::InvalidRequest,
            ErrorCode::UnsupportedLanguage,
            ErrorCode::InvalidFile,
            ErrorCode::PayloadTooLarge,
            ErrorCode::Unauthorized,
            ErrorCode::SessionNotFound,
            ErrorCode::SessionExpired,
            ErrorCode::TooManySessions,
            ErrorCode::NoCapacity,
            ErrorCode::KernelUnavailable,
            ErrorCode::NotReady,
            ErrorCode::NotFound,
            ErrorCode::FileNotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::ShuttingDown,
            ErrorCode::StoreUnavailable,
            ErrorCode::InternalError,
            ErrorCode::Forbidden,
            ErrorCode::KeyNotFound,
            ErrorCode::FileConflict,
            ErrorCode::KeyInUse,
            ErrorCode::SessionLost,
            ErrorCode::NodeUnreachable,
            ErrorCode::LanguageMismatch,
        ] {
            assert!(code.http_status() >= 400, "{code}");
            let wire = serde_json::to_value(code).unwrap_or_default();
            assert_eq!(wire, json!(code.as_str()));
        }
    }
}
