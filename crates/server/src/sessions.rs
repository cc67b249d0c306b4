//! Session endpoints beyond execute: get and end one session, and its files
//! (list, download, upload without running code).

use crate::error::AppError;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_protocol::{
    decode_files, session_path, ApiError, Deleted, Envelope, ErrorCode, ErrorEnvelope, FileList, SessionInfo,
    UploadRequest, Uploaded, UsageData,
};
use kiln_sessions::Caller;
use serde::Deserialize;

/// Largest file the download endpoint returns.
const MAX_DOWNLOAD: u64 = 100 << 20;

/// One of the caller's live sessions.
#[utoipa::path(get, path = "/v1/tci/sessions/{id}", tag = "sessions",
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
#[utoipa::path(delete, path = "/v1/tci/sessions/{id}", tag = "sessions",
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
#[utoipa::path(get, path = "/v1/tci/usage", tag = "usage",
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

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    path: String,
}

/// List a directory of the session's working directory.
#[utoipa::path(get, path = "/v1/tci/sessions/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Session id"),
           ("path" = Option<String>, Query, description = "Directory, relative to the working directory")),
    responses(
        (status = 200, description = "The entries", body = Envelope<FileList>),
        (status = 400, description = "Path escapes, goes through a link, or is not a directory", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 410, description = "The session has ended", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_files(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Envelope<FileList>>, AppError> {
    let path = session_path(&q.path)?;
    Ok(Json(Envelope::ok(state.manager.list_files(&caller.key_id, &id, path).await?)))
}

/// Download a file of the session's working directory.
#[utoipa::path(get, path = "/v1/tci/sessions/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "Session id"),
           ("path" = String, Path, description = "File, relative to the working directory")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
        (status = 400, description = "Path escapes, goes through a link, or is a directory", body = ErrorEnvelope),
        (status = 413, description = "Larger than the download limit", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 410, description = "The session has ended", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn download(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let components = session_path(&path)?;
    let name = components.last().cloned().unwrap_or_default();
    let bytes = state.manager.read_file(&caller.key_id, &id, components, MAX_DOWNLOAD).await?;
    let disposition = content_disposition(&name);
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_DISPOSITION, disposition)],
        Body::from(bytes),
    )
        .into_response())
}

/// `Content-Disposition` for a download named `name` (RFC 6266): a plain
/// ASCII `filename` with anything else replaced by `_` (control characters
/// would make the header invalid), and the exact name as UTF-8 in
/// `filename*`.
fn content_disposition(name: &str) -> String {
    let plain: String =
        name.chars().map(|c| if (' '..='~').contains(&c) && c != '"' && c != '\\' { c } else { '_' }).collect();
    let exact: String = name
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("attachment; filename=\"{plain}\"; filename*=UTF-8''{exact}")
}

/// Write files into the session's working directory without running code.
#[utoipa::path(post, path = "/v1/tci/sessions/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Session id")),
    request_body = UploadRequest,
    responses(
        (status = 200, description = "Written", body = Envelope<Uploaded>),
        (status = 400, description = "Bad body or unsafe file names; nothing was written", body = ErrorEnvelope),
        (status = 413, description = "Body over the limit", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 410, description = "The session has ended", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Envelope<Uploaded>>, AppError> {
    let bytes = crate::routes::read_body(body, state.max_body_bytes).await?;
    let req: UploadRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the body must be {{\"files\": [{{\"name\", \"encoding\", \"content\"}}]}} ({e})"),
        )
    })?;
    let files = decode_files(&req.files).map_err(|e| {
        ApiError::new(ErrorCode::InvalidFile, format!("{e}; nothing was written"))
            .with_param(format!("files[{}]", e.index()))
    })?;
    let names: Vec<String> = files.iter().map(kiln_protocol::ValidFile::display_name).collect();
    state.manager.upload(&caller.key_id, &id, files).await?;
    Ok(Json(Envelope::ok(Uploaded { session_id: id, written: names })))
}

#[cfg(test)]
mod tests {
    use super::content_disposition;

    #[test]
    fn a_download_name_always_makes_a_valid_header() {
        for name in ["report.csv", "a\"b\\c.txt", "\u{11}ctl\r\n.bin", "Übersicht 2026.xlsx", "日本.txt"] {
            let value = content_disposition(name);
            assert!(axum::http::HeaderValue::from_str(&value).is_ok(), "{value:?}");
        }
        assert_eq!(
            content_disposition("Über \u{11}x.txt"),
            "attachment; filename=\"_ber _x.txt\"; filename*=UTF-8''%C3%9Cber%20%11x.txt"
        );
    }
}
