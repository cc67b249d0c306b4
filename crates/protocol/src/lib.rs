//! Wire types of the Together Code Interpreter (TCI) API, as kiln serves it.
//!
//! Everything a client sends or receives is defined here and nowhere else: the
//! execute request and its uploaded files, the outputs a kernel produced, the
//! session listing, and the error envelope with its stable codes. The shapes
//! come from the published clients (PyPI `together` 1.x and 2.x, npm
//! `together-ai`), written down in `docs/API.md`; a field
//! renamed here breaks real users, so the tests pin the JSON.
//!
//! This crate knows nothing of HTTP servers, kernels or storage: the lower
//! layers use [`Output`] as their unit of result, the server maps
//! [`ErrorCode`] to status codes.
#![forbid(unsafe_code)]

mod admin;
mod batch;
mod console;
mod error;
mod files;
mod network;
mod time;

pub use admin::{
    CreateKey, CreatedKey, KeyInfo, KeyList, NodeInfo, NodeList, NodeState, RevokedKey, MAX_KEY_EXECUTIONS,
};
pub use batch::{
    parse_memory, same_stdout, BatchData, BatchEnd, BatchItem, BatchRequest, BatchResult, BatchTotals, ItemStatus,
    TestCase, TestKind, TestResult, MAX_BATCH_ITEMS, MAX_ITEM_TESTS, MEMORY_PATTERN,
};
pub use console::{LanguageList, PoolLevel, ServerStatus, SessionCount};
pub use error::{ApiError, ErrorCode, ErrorEnvelope, ErrorItem, OpenAiStyleError};
pub use files::{decode_files, session_path, FileError, FileUpload, ValidFile, NAME_PATTERN, PATH_PATTERN};
pub use network::{NetworkPolicy, PolicyAboveCeiling, UnknownPolicy};
pub use time::rfc3339;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A language code can be written in (the `language` of a request).
///
/// Which of them a server runs depends on its runtime profile (`full`
/// carries all four, `minimal` only Python); `GET /v1/tci/languages` and
/// the server's OpenAPI document list exactly those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Python 3, in IPython (`!cmd`, `%magic`, top-level `await`).
    Python,
    /// JavaScript, in Deno's Jupyter kernel.
    Javascript,
    /// TypeScript, in Deno's Jupyter kernel (type annotations are stripped,
    /// not checked, as in a Deno notebook).
    Typescript,
    /// bash, in `bash_kernel` (coreutils and the runtime's tools on `PATH`).
    Bash,
}

impl Language {
    /// Every language, the default first.
    pub const ALL: [Language; 4] = [Language::Python, Language::Javascript, Language::Typescript, Language::Bash];

    /// The name `language` takes on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Typescript => "typescript",
            Language::Bash => "bash",
        }
    }

    /// The language of a request's `language` field, if it names one.
    pub fn parse(name: &str) -> Option<Language> {
        Language::ALL.into_iter().find(|l| l.as_str() == name)
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of `POST /tci/execute`.
///
/// Unknown fields are ignored (clients add fields over time); `null` is
/// treated like an absent optional field, because the clients send both.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct ExecuteRequest {
    /// The code to run, as one notebook cell.
    pub code: String,
    /// The language of `code`; absent means python.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Language>)]
    pub language: Option<String>,
    /// Reuse this live session instead of starting a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Files written into the session's working directory before the code runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileUpload>>,
    /// Per-request time limit in seconds (kiln extension; capped by the
    /// server's `--max-exec-timeout`, the `maximum` here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0)]
    pub timeout: Option<f64>,
    /// Stream the outputs as Server-Sent Events while the code runs (kiln
    /// extension; also chosen by `Accept: text/event-stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Memory limit of this execution (kiln extension), e.g. `"256MiB"`; a
    /// limit above the server's `--memory-limit` is the server's.
    /// Exceeding it stops the code with a `MemoryError` message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[1-9][0-9]{0,6}(MiB|GiB|MB|GB)$")]
    pub memory_limit: Option<String>,
}

/// One thing the kernel showed, in the order it showed it.
///
/// Serialises as `{"type": "stdout", "data": "..."}`; rich outputs carry a
/// MIME bundle (`{"text/plain": ..., "image/png": "<base64>"}`) exactly as
/// Jupyter produced it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Output {
    /// Text the code wrote to standard output.
    Stdout(String),
    /// Text the code wrote to standard error.
    Stderr(String),
    /// A traceback (plain text, no ANSI colours) or a message of kiln's
    /// about the execution (time limit hit, kernel died).
    Error(String),
    /// A rich display (`display(...)`, a matplotlib figure).
    DisplayData(Map<String, Value>),
    /// The value of the cell's last expression.
    ExecuteResult(Map<String, Value>),
}

impl Output {
    /// The output's `type` on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Output::Stdout(_) => "stdout",
            Output::Stderr(_) => "stderr",
            Output::Error(_) => "error",
            Output::DisplayData(_) => "display_data",
            Output::ExecuteResult(_) => "execute_result",
        }
    }

    /// Bytes this output adds to a response, for output limits.
    pub fn size_hint(&self) -> usize {
        match self {
            Output::Stdout(s) | Output::Stderr(s) | Output::Error(s) => s.len(),
            Output::DisplayData(m) | Output::ExecuteResult(m) => {
                m.iter().map(|(k, v)| k.len() + v.as_str().map_or_else(|| v.to_string().len(), str::len)).sum()
            }
        }
    }
}

/// One event of a streamed execution (`"stream": true`), in the order the
/// kernel produced them. Served as Server-Sent Events: `event:` is
/// [`ExecEvent::name`], `data:` its JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    /// The session the execution runs in (first, before any output).
    Session {
        /// Pass it back to reuse the session.
        session_id: String,
    },
    /// An output, as it will appear in the final `outputs` (a stream may
    /// arrive in several chunks, which the final answer merges).
    Output(Output),
    /// The cell cleared what it showed so far (`clear_output`); with
    /// `wait`, at its next output.
    Clear {
        /// Clear when the next output arrives rather than now.
        wait: bool,
    },
}

impl ExecEvent {
    /// The SSE event name: `session`, the output's type, or `clear_output`.
    pub fn name(&self) -> &'static str {
        match self {
            ExecEvent::Session { .. } => "session",
            ExecEvent::Output(o) => o.type_name(),
            ExecEvent::Clear { .. } => "clear_output",
        }
    }

    /// The event an SSE `event:` name and `data:` JSON stand for; `None`
    /// for names that are not execution events (`done`, `failed`) or data
    /// that does not fit the name.
    pub fn from_sse(name: &str, data: &str) -> Option<ExecEvent> {
        let v: Value = serde_json::from_str(data).ok()?;
        match name {
            "session" => Some(ExecEvent::Session { session_id: v["session_id"].as_str()?.to_string() }),
            "clear_output" => Some(ExecEvent::Clear { wait: v["wait"].as_bool().unwrap_or(false) }),
            _ => {
                let o: Output = serde_json::from_value(v).ok()?;
                (o.type_name() == name).then_some(ExecEvent::Output(o))
            }
        }
    }

    /// The SSE event's data.
    pub fn data(&self) -> Value {
        match self {
            ExecEvent::Session { session_id } => serde_json::json!({ "session_id": session_id }),
            ExecEvent::Output(o) => serde_json::to_value(o).unwrap_or(Value::Null),
            ExecEvent::Clear { wait } => serde_json::json!({ "wait": wait }),
        }
    }
}

/// A request's `timeout` (seconds) as a duration; `None` when absent.
pub fn timeout_from_seconds(t: Option<f64>) -> Result<Option<std::time::Duration>, ApiError> {
    match t {
        None => Ok(None),
        // At least a nanosecond: a positive limit too small to represent is
        // the smallest one, not none.
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => {
            Ok(Some(std::time::Duration::from_secs_f64(t).max(std::time::Duration::from_nanos(1))))
        }
        Some(_) => Err(ApiError::new(ErrorCode::InvalidRequest, "timeout must be a positive number of seconds")
            .with_param("timeout")),
    }
}

/// How an execution ended, as `data.status`.
///
/// The 1.x client types this as a plain string, the 2.x and npm clients as a
/// string with a default, so any value parses; these are the ones kiln uses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecuteStatus {
    /// The cell ran to its end (it may still have printed to stderr).
    Success,
    /// The cell raised, hit its time limit, or its kernel died: see the
    /// `error` output.
    Error,
}

/// `data` of a successful execute response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ExecuteData {
    /// The session that ran the code; pass it back to reuse the session.
    pub session_id: String,
    /// How the execution ended.
    pub status: ExecuteStatus,
    /// What the kernel produced, in order.
    pub outputs: Vec<Output>,
}

/// One entry of `GET /tci/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SessionInfo {
    /// `ses_...`
    pub id: String,
    /// When the session started (RFC 3339, UTC, `Z`).
    #[serde(with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// How many execute requests the session has run.
    pub execute_count: u64,
    /// When the last execute request started, if any.
    #[serde(with = "rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_execute_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the session will be torn down.
    #[serde(with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The kiln node that runs it (`--node-id`); shown by
    /// `GET /v1/tci/sessions/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// `data` of `GET /tci/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SessionList {
    /// The caller's live sessions, oldest first.
    pub sessions: Vec<SessionInfo>,
}

/// What a key has used (`GET /v1/tci/usage`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageData {
    /// The key's id.
    pub key_id: String,
    /// Sessions started (the billing unit).
    pub sessions_started: u64,
    /// Execute requests run.
    pub executions: u64,
    /// Wall time of the executions, seconds.
    pub execution_seconds: f64,
    /// CPU time of the sessions' processes, seconds.
    pub cpu_seconds: f64,
    /// The largest memory peak of any session, bytes.
    pub peak_memory_bytes: u64,
}

/// `data` of `DELETE /v1/tci/sessions/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Deleted {
    /// The session.
    pub id: String,
    /// Always true.
    pub deleted: bool,
}

/// `data` of an upload without execution.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Uploaded {
    /// The session.
    pub session_id: String,
    /// The files written, relative to the working directory.
    pub written: Vec<String>,
}

/// One entry of a session's directory listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct FileEntry {
    /// The entry's name.
    pub name: String,
    /// Its path relative to the working directory.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other`.
    pub r#type: String,
    /// Size in bytes (files only).
    pub size: u64,
}

/// `data` of a directory listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct FileList {
    /// The listed directory, relative to the working directory.
    pub path: String,
    /// Its entries, sorted by name.
    pub entries: Vec<FileEntry>,
}

/// Body of an upload without execution.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct UploadRequest {
    /// Files, as in an execute request.
    pub files: Vec<FileUpload>,
}

/// The success envelope: `{"data": ..., "errors": null}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Envelope<T> {
    /// The payload.
    pub data: T,
    /// Always `null` on success; present because clients read it.
    pub errors: Option<Vec<ErrorItem>>,
}

impl<T> Envelope<T> {
    /// Wrap a payload.
    pub fn ok(data: T) -> Self {
        Envelope { data, errors: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outputs_serialise_as_type_and_data() {
        let mut bundle = Map::new();
        bundle.insert("text/plain".into(), json!("42"));
        let outs =
            vec![Output::Stdout("hi\n".into()), Output::ExecuteResult(bundle), Output::Error("Traceback".into())];
        assert_eq!(
            serde_json::to_value(&outs).unwrap_or_default(),
            json!([
                {"type": "stdout", "data": "hi\n"},
                {"type": "execute_result", "data": {"text/plain": "42"}},
                {"type": "error", "data": "Traceback"},
            ])
        );
    }

    #[test]
    fn every_output_s_event_name_is_its_wire_type() {
        for o in [
            Output::Stdout("a".into()),
            Output::Stderr("b".into()),
            Output::Error("c".into()),
            Output::DisplayData(Map::new()),
            Output::ExecuteResult(Map::new()),
        ] {
            let event = ExecEvent::Output(o.clone());
            assert_eq!(json!(event.name()), serde_json::to_value(&o).unwrap_or_default()["type"]);
            assert_eq!(event.data(), serde_json::to_value(&o).unwrap_or_default());
        }
        assert_eq!(ExecEvent::Session { session_id: "ses_x".into() }.data(), json!({"session_id": "ses_x"}));
        for e in [
            ExecEvent::Session { session_id: "ses_x".into() },
            ExecEvent::Clear { wait: true },
            ExecEvent::Output(Output::Stderr("w".into())),
        ] {
            assert_eq!(ExecEvent::from_sse(e.name(), &e.data().to_string()), Some(e));
        }
        assert_eq!(ExecEvent::from_sse("stdout", r#"{"type": "stderr", "data": "x"}"#), None);
        assert_eq!(ExecEvent::from_sse("done", "{}"), None);
    }

    #[test]
    fn request_accepts_nulls_and_unknown_fields() {
        let req: ExecuteRequest = serde_json::from_value(json!({
            "code": "1", "language": "python", "session_id": null, "files": null, "extra": 1
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.session_id, None);
        assert_eq!(req.files, None);
    }

    #[test]
    fn session_timestamps_are_rfc3339_utc_with_z() {
        let t = chrono::DateTime::parse_from_rfc3339("2025-03-12T10:34:22.125248Z")
            .unwrap_or_else(|e| panic!("{e}"))
            .with_timezone(&chrono::Utc);
        let info = SessionInfo {
            id: "ses_x".into(),
            started_at: t,
            execute_count: 2,
            last_execute_at: None,
            expires_at: t,
            node: None,
        };
        let v = serde_json::to_value(&info).unwrap_or_default();
        assert_eq!(v["started_at"], json!("2025-03-12T10:34:22.125248Z"));
        assert_eq!(v["last_execute_at"], Value::Null);
    }
}
