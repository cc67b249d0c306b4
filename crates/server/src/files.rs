//! A session's files: list a directory, download a file, upload files
//! without running code. Paths resolve beneath the working directory only.

use crate::body::BoundedJson;
use crate::error::AppError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_protocol::{decode_files, session_path, Envelope, ErrorEnvelope, FileList, UploadRequest, Uploaded};
use kiln_sessions::Caller;
use serde::Deserialize;

/// Largest file the download endpoint returns.
const MAX_DOWNLOAD: u64 = 100 << 20;

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    path: String,
}

/// List a directory of the session's working directory.
#[utoipa::path(get, path = "/v1/tci/sessions/{id}/files", operation_id = "list_files", tag = "files",
    params(("id" = String, Path, description = "Session id"),
           ("path" = Option<String>, Query,
            description = "Directory, relative to the working directory (no `..`)")),
    responses(
        (status = 200, description = "The entries", body = Envelope<FileList>),
        (status = 400, description = "The path escapes the working directory", body = ErrorEnvelope),
        (status = 409, description = "The path goes through a link, or is not a directory", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 410, description = "The session has ended", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Envelope<FileList>>, AppError> {
    let path = session_path(&q.path)?;
    Ok(Json(Envelope::ok(state.manager.list_files(&caller.key_id, &id, path).await?)))
}

/// Download a file of the session's working directory.
#[utoipa::path(get, path = "/v1/tci/sessions/{id}/files/{path}", operation_id = "download_file", tag = "files",
    params(("id" = String, Path, description = "Session id"),
           ("path" = String, Path,
            description = "File, relative to the working directory (no `..`)")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
        (status = 400, description = "The path escapes the working directory", body = ErrorEnvelope),
        (status = 409, description = "The path goes through a link, or is a directory", body = ErrorEnvelope),
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
#[utoipa::path(post, path = "/v1/tci/sessions/{id}/files", operation_id = "upload_files", tag = "files",
    params(("id" = String, Path, description = "Session id")),
    request_body = UploadRequest,
    responses(
        (status = 200, description = "Written", body = Envelope<Uploaded>),
        (status = 400, description = "Bad body or unsafe file names; nothing was written", body = ErrorEnvelope),
        (status = 409, description = "A file name collides with another entry or with what is in the working directory; nothing was written", body = ErrorEnvelope),
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
    BoundedJson(req): BoundedJson<UploadRequest>,
) -> Result<Json<Envelope<Uploaded>>, AppError> {
    let files = decode_files(&req.files).map_err(kiln_protocol::ApiError::from)?;
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
