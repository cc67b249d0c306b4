//! An execute request as the session layer's job: the one check of its
//! fields, used by the HTTP API, batch items and MCP's `run_code` alike, so
//! a language, a memory limit or a file is refused with the same code,
//! message and `param` whichever way it came.

use crate::{Caller, Exec, Priority};
use kiln_protocol::{decode_files, ApiError, ErrorCode, ExecuteRequest, Language};

/// A request's `language` (Python when absent), if this server runs it
/// (`runs` is empty until the runtime is ready: any known language then).
fn language(name: Option<&str>, runs: &[Language]) -> Result<Language, ApiError> {
    let name = name.unwrap_or(Language::Python.as_str());
    Language::parse(name).filter(|l| runs.is_empty() || runs.contains(l)).ok_or_else(|| {
        let runs: Vec<&str> = runs.iter().map(|l| l.as_str()).collect();
        ApiError::new(
            ErrorCode::UnsupportedLanguage,
            format!("language {name:?} is not supported; this server runs: {}", runs.join(", ")),
        )
        .with_param("language")
    })
}

/// A request's `memory_limit` (`"256MiB"`), in bytes.
fn memory_limit(text: Option<&str>) -> Result<Option<u64>, ApiError> {
    text.map(kiln_protocol::parse_memory)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("memory_limit: {e}")).with_param("memory_limit"))
}

impl Exec {
    /// Check `req` and make it `caller`'s job on a server that runs `runs`.
    /// Nothing streams yet ([`Exec::events`] is for the caller to set).
    pub fn from_request(req: ExecuteRequest, caller: &Caller, runs: &[Language]) -> Result<Exec, ApiError> {
        let language = language(req.language.as_deref(), runs)?;
        let files = decode_files(req.files.as_deref().unwrap_or_default())?;
        let timeout = kiln_protocol::timeout_from_seconds(req.timeout)?;
        let session_id = req.session_id.filter(|s| !s.is_empty());
        let memory_limit = memory_limit(req.memory_limit.as_deref())?;
        Ok(Exec {
            session_id,
            code: req.code,
            language,
            files,
            timeout,
            network: caller.network,
            max_sessions: caller.max_sessions,
            max_executions_per_key: caller.max_executions_per_key,
            events: None,
            memory_limit,
            priority: Priority::Interactive,
            count_oom_kills: false,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller { key_id: "key_1".into(), network: None, max_sessions: Some(3), max_executions_per_key: None }
    }

    fn request(language: Option<&str>, memory_limit: Option<&str>) -> ExecuteRequest {
        ExecuteRequest {
            code: "1".into(),
            language: language.map(Into::into),
            session_id: Some(String::new()),
            files: None,
            timeout: None,
            stream: None,
            memory_limit: memory_limit.map(Into::into),
        }
    }

    #[test]
    fn a_request_without_a_language_is_python_and_carries_the_callers_limits() {
        let exec = Exec::from_request(request(None, Some("256MiB")), &caller(), &Language::ALL).unwrap();
        assert_eq!(exec.language, Language::Python);
        assert_eq!(exec.memory_limit, Some(256 << 20));
        assert_eq!(exec.max_sessions, Some(3));
        assert_eq!(exec.session_id, None, "an empty session id starts a new session");
        assert!(exec.events.is_none());
    }

    #[test]
    fn a_language_the_server_does_not_run_is_refused_with_the_ones_it_does() {
        let e = Exec::from_request(request(Some("javascript"), None), &caller(), &[Language::Python]).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedLanguage);
        assert_eq!(e.param.as_deref(), Some("language"));
        assert!(e.message.ends_with("this server runs: python"), "{}", e.message);
        let e = Exec::from_request(request(Some("cobol"), None), &caller(), &[]).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedLanguage);
    }

    #[test]
    fn a_memory_limit_that_does_not_parse_names_its_field() {
        let e = Exec::from_request(request(None, Some("lots")), &caller(), &Language::ALL).unwrap_err();
        assert_eq!((e.code, e.param.as_deref()), (ErrorCode::InvalidRequest, Some("memory_limit")));
        assert!(e.message.starts_with("memory_limit: "), "{}", e.message);
    }
}
