//! Where the MCP tools find sessions: the in-process session manager (for
//! `/mcp` on the server), or a kiln server's HTTP API (for `kiln mcp`).
//!
//! Either way a failure is an [`ApiError`]: the session layer's through the
//! same table the HTTP API uses ([`kiln_sessions::SessionError::to_api`]),
//! a remote server's as it reported it. So an MCP client sees the same
//! stable codes and messages as an HTTP client, and never kiln's internals.

use kiln_protocol::{decode_files, session_path, ApiError, ErrorCode, ExecuteData, FileUpload, SessionInfo};
use kiln_sessions::SessionError;
use kiln_sessions::{Caller, Exec, Manager};
use rmcp::service::RequestContext;
use rmcp::RoleServer;
use serde_json::{json, Value};

/// How the tools reach sessions.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The server's own manager, as the key that authenticated the MCP
    /// request (put in the request's extensions by the auth middleware).
    Local(Manager),
    /// A kiln server over HTTP.
    Remote(Remote),
}

/// A kiln server's HTTP API.
#[derive(Debug, Clone)]
pub struct Remote {
    url: String,
    key: String,
    http: reqwest::Client,
}

impl Remote {
    /// The server at `url` (no trailing path), with `key`.
    pub fn new(url: &str, key: &str) -> Self {
        Remote { url: url.trim_end_matches('/').to_string(), key: key.to_string(), http: reqwest::Client::new() }
    }

    fn unreachable(&self, e: reqwest::Error) -> ApiError {
        ApiError::new(ErrorCode::InternalError, format!("kiln is unreachable at {}: {e}", self.url))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let resp = req.bearer_auth(&self.key).send().await.map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        let code = serde_json::from_value(v["errors"][0]["code"].clone()).unwrap_or(ErrorCode::InternalError);
        let message =
            v["errors"][0]["message"].as_str().map_or_else(|| format!("kiln answered {status}"), str::to_string);
        Err(ApiError::new(code, message))
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, ApiError> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = self.send(req).await?.json().await.map_err(|e| self.unreachable(e))?;
        Ok(v["data"].clone())
    }

    async fn download(&self, id: &str, path: &str) -> Result<Vec<u8>, ApiError> {
        let url = format!("{}/v1/tci/sessions/{id}/files/{}", self.url, path.trim_start_matches('/'));
        let resp = self.send(self.http.get(url)).await?;
        resp.bytes().await.map(|b| b.to_vec()).map_err(|e| self.unreachable(e))
    }
}

/// A session failure as the API shows it, logged with its detail when it is
/// kiln's own (as the HTTP API does).
fn api(e: SessionError) -> ApiError {
    let shown = e.to_api();
    if shown.is_server_side() {
        tracing::error!(code = %shown.code, error = %e, "MCP tool call failed");
    }
    shown
}

fn unexpected(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InternalError, format!("kiln answered {what} in an unexpected shape: {e}"))
}

fn caller(ctx: &RequestContext<RoleServer>) -> Result<Caller, ApiError> {
    ctx.extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "no API key on this MCP connection"))
}

impl Backend {
    pub(crate) async fn execute(
        &self,
        ctx: &RequestContext<RoleServer>,
        code: String,
        session_id: Option<String>,
        files: Vec<FileUpload>,
        timeout: Option<f64>,
    ) -> Result<ExecuteData, ApiError> {
        match self {
            Backend::Local(m) => {
                let who = caller(ctx)?;
                let files = decode_files(&files)?;
                let timeout = kiln_protocol::timeout_from_seconds(timeout)?;
                let exec = Exec {
                    session_id,
                    code,
                    files,
                    timeout,
                    network: who.network,
                    max_sessions: who.max_sessions,
                    events: None,
                };
                m.execute(&who.key_id, exec).await.map_err(api)
            }
            Backend::Remote(r) => {
                let mut body = json!({"language": "python", "code": code, "files": files});
                if let Some(s) = session_id {
                    body["session_id"] = json!(s);
                }
                if let Some(t) = timeout {
                    body["timeout"] = json!(t);
                }
                let data = r.call(reqwest::Method::POST, "/v1/tci/execute", Some(body)).await?;
                serde_json::from_value(data).map_err(|e| unexpected("an execution", e))
            }
        }
    }

    pub(crate) async fn list(&self, ctx: &RequestContext<RoleServer>) -> Result<Vec<SessionInfo>, ApiError> {
        match self {
            Backend::Local(m) => m.list(&caller(ctx)?.key_id).await.map_err(api),
            Backend::Remote(r) => {
                let data = r.call(reqwest::Method::GET, "/v1/tci/sessions", None).await?;
                serde_json::from_value(data["sessions"].clone()).map_err(|e| unexpected("the session list", e))
            }
        }
    }

    pub(crate) async fn upload(
        &self,
        ctx: &RequestContext<RoleServer>,
        id: &str,
        files: Vec<FileUpload>,
    ) -> Result<(), ApiError> {
        match self {
            Backend::Local(m) => {
                let files = decode_files(&files)?;
                m.upload(&caller(ctx)?.key_id, id, files).await.map_err(api)
            }
            Backend::Remote(r) => {
                r.call(reqwest::Method::POST, &format!("/v1/tci/sessions/{id}/files"), Some(json!({"files": files})))
                    .await?;
                Ok(())
            }
        }
    }

    pub(crate) async fn read(
        &self,
        ctx: &RequestContext<RoleServer>,
        id: &str,
        path: &str,
    ) -> Result<Vec<u8>, ApiError> {
        match self {
            Backend::Local(m) => {
                let components = session_path(path)?;
                m.read_file(&caller(ctx)?.key_id, id, components, 100 << 20).await.map_err(api)
            }
            Backend::Remote(r) => {
                // Checked here too: a URL would resolve `..` before kiln saw it.
                session_path(path)?;
                r.download(id, path).await
            }
        }
    }

    pub(crate) async fn end(&self, ctx: &RequestContext<RoleServer>, id: &str) -> Result<(), ApiError> {
        match self {
            Backend::Local(m) => m.end(&caller(ctx)?.key_id, id).await.map_err(api),
            Backend::Remote(r) => {
                r.call(reqwest::Method::DELETE, &format!("/v1/tci/sessions/{id}"), None).await.map(|_| ())
            }
        }
    }
}
