//! A client of a kiln server's HTTP API: the TCI endpoints with typed
//! requests and answers, and streamed executions read as they happen.
//!
//! Used by `kiln exec` and `kiln sessions` (people at a terminal, scripts)
//! and by `kiln mcp` when it serves MCP over stdio for a remote kiln. A
//! failure is either kiln's answer ([`ClientError::Api`], with the API's
//! stable code and message) or the way there ([`ClientError::Unreachable`],
//! [`ClientError::Unexpected`]).
#![forbid(unsafe_code)]

use eventsource_stream::Eventsource as _;
use kiln_protocol::{
    ApiError, ErrorCode, ErrorEnvelope, ExecEvent, ExecuteData, ExecuteRequest, FileUpload, SessionInfo,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio_stream::StreamExt as _;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// kiln answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// kiln could not be reached, or the connection broke.
    #[error("kiln is unreachable at {url}: {reason}")]
    Unreachable {
        /// The server.
        url: String,
        /// What the HTTP client said.
        reason: String,
    },
    /// kiln answered something this client does not understand.
    #[error("kiln answered in an unexpected shape: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The failure as the API would phrase it (transport failures as
    /// `internal_error`).
    pub fn to_api(&self) -> ApiError {
        match self {
            ClientError::Api(e) => e.clone(),
            other => ApiError::new(ErrorCode::InternalError, other.to_string()),
        }
    }
}

/// A kiln server and the key to use.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    /// The server at `url` (its base, without `/v1`), with `key`.
    pub fn new(url: &str, key: &str) -> Self {
        Client { url: url.trim_end_matches('/').to_string(), key: key.to_string(), http: reqwest::Client::new() }
    }

    fn unreachable(&self, e: reqwest::Error) -> ClientError {
        ClientError::Unreachable { url: self.url.clone(), reason: e.to_string() }
    }

    /// Send a request; an error status becomes [`ClientError::Api`].
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req.bearer_auth(&self.key).send().await.map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        Err(error_of(status, &body))
    }

    /// `data` of a JSON answer.
    async fn data<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        data_of(&self.send(req).await?.bytes().await.map_err(|e| self.unreachable(e))?)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Run code and wait for the whole answer.
    pub async fn execute(&self, req: &ExecuteRequest) -> Result<ExecuteData, ClientError> {
        self.data(self.http.post(self.url("/v1/tci/execute")).json(req)).await
    }

    /// Run code streamed: `on_event` sees the session and each output as the
    /// kernel produces it; returns the final answer (the same a plain
    /// [`Client::execute`] returns).
    pub async fn execute_streamed(
        &self,
        req: &ExecuteRequest,
        on_event: impl FnMut(ExecEvent),
    ) -> Result<ExecuteData, ClientError> {
        let mut req = req.clone();
        req.stream = Some(true);
        let resp = self
            .send(self.http.post(self.url("/v1/tci/execute")).header("accept", "text/event-stream").json(&req))
            .await?;
        execution_events(resp.bytes_stream(), on_event).await
    }

    /// The key's live sessions.
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        let v: Value = self.data(self.http.get(self.url("/v1/tci/sessions"))).await?;
        serde_json::from_value(v["sessions"].clone()).map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    /// End a session now.
    pub async fn end(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/tci/sessions/{id}")))).await.map(|_| ())
    }

    /// Write files into a session's working directory.
    pub async fn upload(&self, id: &str, files: &[FileUpload]) -> Result<(), ClientError> {
        let req = self.http.post(self.url(&format!("/v1/tci/sessions/{id}/files"))).json(&json!({ "files": files }));
        self.send(req).await.map(|_| ())
    }

    /// A file of a session's working directory.
    pub async fn download(&self, id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let url = self.url(&format!("/v1/tci/sessions/{id}/files/{}", path.trim_start_matches('/')));
        let resp = self.send(self.http.get(url)).await?;
        resp.bytes().await.map(|b| b.to_vec()).map_err(|e| self.unreachable(e))
    }
}

/// The failure an error answer (`status`, `body`) reports.
pub fn error_of(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(env) => ClientError::Api(ApiError::new(env.error.code, env.error.message)),
        Err(_) => ClientError::Unexpected(format!(
            "{status}: {}",
            String::from_utf8_lossy(body).chars().take(200).collect::<String>()
        )),
    }
}

/// `data` of a successful JSON answer's `body`.
pub fn data_of<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| ClientError::Unexpected(e.to_string()))?;
    serde_json::from_value(v["data"].take()).map_err(|e| ClientError::Unexpected(e.to_string()))
}

/// Read a streamed execution's Server-Sent Events from `body` (the bytes of
/// a successful answer, from any transport): `on_event` sees the session and
/// each output; returns the final answer, or the failure it reports.
pub async fn execution_events<S, B, E>(body: S, mut on_event: impl FnMut(ExecEvent)) -> Result<ExecuteData, ClientError>
where
    S: tokio_stream::Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut events = std::pin::pin!(body.eventsource());
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| ClientError::Unexpected(e.to_string()))?;
        match event.event.as_str() {
            "done" => return data_of(event.data.as_bytes()),
            "failed" => return Err(error_of(200, event.data.as_bytes())),
            name => {
                if let Some(e) = ExecEvent::from_sse(name, &event.data) {
                    on_event(e);
                }
            }
        }
    }
    Err(ClientError::Unexpected("the stream ended before its final event".into()))
}
