//! The tools of a cluster node: each call is made on the node's own HTTP
//! API, in-process, as the caller that authenticated the MCP request.
//!
//! A cluster node serves a session only where the session is, and the API
//! router is what knows where that is: its routing layer serves a request
//! here, forwards it to the owner in one hop, places a new session on a
//! peer with room, and answers `session_lost` for a session of a lost node.
//! Calling that router (a tower service, no socket) gives every tool the
//! same routing, placement and errors as the HTTP API, with no second copy
//! of them. The answers are read as [`kiln_client`] reads them over HTTP.

use http::{Method, Request};
use kiln_client::{data_of, error_of, execution_events, ClientError};
use kiln_protocol::{ApiError, ErrorCode, ExecEvent, ExecuteData, ExecuteRequest, FileUpload, SessionInfo};
use kiln_sessions::Caller;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;
use tower::ServiceExt as _;

/// Largest file `read_file` returns (as the download endpoint).
const MAX_READ: usize = 100 << 20;
/// Largest JSON answer read (session lists, executions with their outputs).
const MAX_ANSWER: usize = 256 << 20;

/// The node's API routes, authenticated already (the caller travels in the
/// request's extensions), with its cluster routing.
#[derive(Debug, Clone)]
pub struct Api(axum::Router);

impl Api {
    /// Call `routes` for the tools. They must trust the [`Caller`] in a
    /// request's extensions: only the tools, which took it from the
    /// authenticated MCP request, can reach them.
    pub fn new(routes: axum::Router) -> Api {
        Api(routes)
    }

    async fn call(
        &self,
        caller: &Caller,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<http::Response<axum::body::Body>, ApiError> {
        let mut req = Request::builder().method(method).uri(path);
        let body = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                axum::body::Body::from(v.to_string())
            }
            None => axum::body::Body::empty(),
        };
        // Every segment is escaped: a request that does not build is a bug.
        let mut req = req.body(body).map_err(|e| ApiError::new(ErrorCode::InternalError, e.to_string()))?;
        req.extensions_mut().insert(caller.clone());
        match self.0.clone().oneshot(req).await {
            Ok(resp) => Ok(resp),
            Err(never) => match never {},
        }
    }

    /// The whole answer's body when it succeeded, the error it reports when
    /// not.
    async fn answer(resp: http::Response<axum::body::Body>, limit: usize) -> Result<axum::body::Bytes, ApiError> {
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), limit)
            .await
            .map_err(|e| ApiError::new(ErrorCode::InternalError, format!("the answer could not be read whole: {e}")))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(error_of(status.as_u16(), &body).to_api())
        }
    }

    pub(crate) async fn execute(
        &self,
        caller: &Caller,
        req: ExecuteRequest,
        events: Option<UnboundedSender<ExecEvent>>,
    ) -> Result<ExecuteData, ApiError> {
        let streamed = events.is_some();
        let mut body =
            serde_json::to_value(&req).map_err(|e| ApiError::new(ErrorCode::InternalError, e.to_string()))?;
        body["stream"] = json!(streamed);
        let resp = self.call(caller, Method::POST, "/v1/tci/execute", Some(body)).await?;
        match events {
            // A stream starts only once the session is known: a failure
            // before that is an ordinary error answer.
            Some(tx) if resp.status().is_success() => {
                let stream = resp.into_body().into_data_stream();
                execution_events(stream, |e| {
                    let _ = tx.send(e);
                })
                .await
                .map_err(|e| e.to_api())
            }
            _ => data_of(&Self::answer(resp, MAX_ANSWER).await?).map_err(|e: ClientError| e.to_api()),
        }
    }

    pub(crate) async fn list(&self, caller: &Caller) -> Result<Vec<SessionInfo>, ApiError> {
        let resp = self.call(caller, Method::GET, "/v1/tci/sessions", None).await?;
        let mut v: Value = data_of(&Self::answer(resp, MAX_ANSWER).await?).map_err(|e| e.to_api())?;
        serde_json::from_value(v["sessions"].take()).map_err(|e| ApiError::new(ErrorCode::InternalError, e.to_string()))
    }

    pub(crate) async fn upload(&self, caller: &Caller, id: &str, files: Vec<FileUpload>) -> Result<(), ApiError> {
        let path = format!("/v1/tci/sessions/{}/files", escape(id));
        let resp = self.call(caller, Method::POST, &path, Some(json!({ "files": files }))).await?;
        Self::answer(resp, MAX_ANSWER).await.map(|_| ())
    }

    /// `components`: the path, checked already ([`kiln_protocol::session_path`]).
    pub(crate) async fn read(&self, caller: &Caller, id: &str, components: &[String]) -> Result<Vec<u8>, ApiError> {
        let file: Vec<String> = components.iter().map(|c| escape(c)).collect();
        let path = format!("/v1/tci/sessions/{}/files/{}", escape(id), file.join("/"));
        let resp = self.call(caller, Method::GET, &path, None).await?;
        Self::answer(resp, MAX_READ).await.map(|b| b.to_vec())
    }

    pub(crate) async fn end(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        let resp = self.call(caller, Method::DELETE, &format!("/v1/tci/sessions/{}", escape(id)), None).await?;
        Self::answer(resp, MAX_ANSWER).await.map(|_| ())
    }
}

/// `s` as one path segment: every byte but the unreserved ones
/// percent-encoded (the router decodes them back).
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn a_path_segment_keeps_unreserved_bytes_and_encodes_the_rest() {
        assert_eq!(escape("ses_Ab9"), "ses_Ab9");
        assert_eq!(escape("a b/c?%"), "a%20b%2Fc%3F%25");
        assert_eq!(escape("é"), "%C3%A9");
    }
}
