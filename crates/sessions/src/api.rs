//! What a session failure looks like to a client: the one table from
//! [`SessionError`] to the API's stable codes and messages, used by the HTTP
//! API and by MCP alike.
//!
//! Failures of kiln itself (a kernel that cannot start, the store) are shown
//! with a message that says they are kiln's and what to do, never with the
//! internal detail (paths, boot logs): that goes to the operator's log, by
//! whoever renders the error (see [`ApiError::is_server_side`]).

use crate::{BrowseError, FileWriteError, SessionError};
use kiln_protocol::{ApiError, ErrorCode};

impl SessionError {
    /// The error as the API shows it.
    pub fn to_api(&self) -> ApiError {
        let msg = self.to_string();
        match self {
            SessionError::NotFound(_) => ApiError::new(ErrorCode::SessionNotFound, msg).with_param("session_id"),
            SessionError::Expired(_) => ApiError::new(ErrorCode::SessionExpired, msg).with_param("session_id"),
            SessionError::TooManySessions(_) => ApiError::new(ErrorCode::TooManySessions, msg),
            SessionError::NoCapacity(_) | SessionError::NotTaking(_) | SessionError::ClusterFull => {
                ApiError::new(ErrorCode::NoCapacity, msg)
            }
            SessionError::Lost { .. } => ApiError::new(ErrorCode::SessionLost, msg).with_param("session_id"),
            SessionError::NodeUnreachable { .. } => ApiError::new(ErrorCode::NodeUnreachable, msg),
            SessionError::RateLimited { .. } => ApiError::new(ErrorCode::RateLimited, msg),
            SessionError::KernelUnavailable(_) | SessionError::Broken(_) => ApiError::new(
                ErrorCode::KernelUnavailable,
                "kiln could not start a kernel for this session; this is a server-side failure, not an \
                 error of your code. The operator's log has the cause.",
            ),
            SessionError::NotReady => ApiError::new(ErrorCode::NotReady, msg),
            SessionError::LanguageMismatch { .. } => {
                ApiError::new(ErrorCode::LanguageMismatch, msg).with_param("language")
            }
            SessionError::UnsupportedLanguage { .. } => {
                ApiError::new(ErrorCode::UnsupportedLanguage, msg).with_param("language")
            }
            SessionError::ShuttingDown => ApiError::new(ErrorCode::ShuttingDown, msg),
            SessionError::Files(f) => {
                let (code, index) = match f {
                    FileWriteError::Collision { index, .. } => (ErrorCode::FileConflict, *index),
                    FileWriteError::Io { index, .. } => (ErrorCode::InvalidFile, *index),
                };
                ApiError::new(code, msg).with_param(format!("files[{index}].name"))
            }
            SessionError::BadTimeout { .. } => ApiError::new(ErrorCode::InvalidRequest, msg).with_param("timeout"),
            SessionError::Browse(b) => match b {
                BrowseError::NotFound(_) => ApiError::new(ErrorCode::FileNotFound, msg),
                BrowseError::TooLarge(..) => ApiError::new(ErrorCode::PayloadTooLarge, msg),
                BrowseError::Io(..) => ApiError::new(
                    ErrorCode::InternalError,
                    "kiln could not read the session's files; this is a server-side failure.",
                ),
                // What is there (a link the code planted, a folder where a
                // file is asked for) conflicts with the request.
                BrowseError::Symlink(_) | BrowseError::WrongKind(..) => {
                    ApiError::new(ErrorCode::FileConflict, msg).with_param("path")
                }
            },
            SessionError::Store(e) if e.is_unavailable() => ApiError::new(
                ErrorCode::StoreUnavailable,
                "kiln's database is unavailable right now (it may be restarting); nothing was done. This is a \
                 server-side condition, not an error of your code: retry after the Retry-After delay.",
            ),
            SessionError::Store(_) => ApiError::new(
                ErrorCode::InternalError,
                "kiln's metadata store failed; this is a server-side failure. Retry later.",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiln_s_own_failures_never_show_their_internals() {
        let e = SessionError::KernelUnavailable("the kernel exited while starting: /srv/kiln/sessions/k_1/log".into());
        let api = e.to_api();
        assert_eq!(api.code, ErrorCode::KernelUnavailable);
        assert!(!api.message.contains("/srv"), "{}", api.message);
        assert!(api.message.contains("not an error of your code"), "{}", api.message);
    }

    #[test]
    fn a_caller_s_mistake_names_the_field_at_fault() {
        assert_eq!(SessionError::NotFound("ses_x".into()).to_api().param.as_deref(), Some("session_id"));
        assert_eq!(SessionError::BadTimeout { max: 60 }.to_api().param.as_deref(), Some("timeout"));
        assert_eq!(SessionError::Expired("ses_x".into()).to_api().code, ErrorCode::SessionExpired);
    }

    #[test]
    fn a_database_that_is_down_is_retryable_and_a_broken_query_is_not() {
        let down = kiln_store::StoreError::Unavailable { what: "list sessions", detail: "connection refused".into() };
        let api = SessionError::Store(down).to_api();
        assert_eq!(api.code, ErrorCode::StoreUnavailable);
        assert!(!api.message.contains("refused"), "{}", api.message);
        let broken = kiln_store::StoreError::Query { what: "usage", detail: "syntax error".into() };
        assert_eq!(SessionError::Store(broken).to_api().code, ErrorCode::InternalError);
    }
}
