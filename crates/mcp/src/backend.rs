//! Where the MCP tools find sessions: the in-process session manager (for
//! `/mcp` on the server), or a kiln server's HTTP API (for `kiln mcp`).

use kiln_protocol::{decode_files, session_path, ExecuteData, FileUpload, SessionInfo};
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

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| format!("kiln is unreachable at {}: {e}", self.url))?;
        let ok = resp.status().is_success();
        let v: Value = resp.json().await.map_err(|e| format!("kiln answered without JSON: {e}"))?;
        if !ok {
            return Err(format!(
                "{}: {}",
                v["errors"][0]["code"].as_str().unwrap_or("error"),
                v["errors"][0]["message"].as_str().unwrap_or("request failed")
            ));
        }
        Ok(v["data"].clone())
    }

    async fn download(&self, id: &str, path: &str) -> Result<Vec<u8>, String> {
        let resp = self
            .http
            .get(format!("{}/v1/tci/sessions/{id}/files/{}", self.url, path.trim_start_matches('/')))
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            let v: Value = resp.json().await.unwrap_or_default();
            return Err(v["errors"][0]["message"].as_str().unwrap_or("download failed").to_string());
        }
        resp.bytes().await.map(|b| b.to_vec()).map_err(|e| e.to_string())
    }
}

fn caller(ctx: &RequestContext<RoleServer>) -> Result<Caller, String> {
    ctx.extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| "no API key on this MCP connection".to_string())
}

impl Backend {
    pub(crate) async fn execute(
        &self,
        ctx: &RequestContext<RoleServer>,
        code: String,
        session_id: Option<String>,
        files: Vec<FileUpload>,
        timeout: Option<f64>,
    ) -> Result<ExecuteData, String> {
        match self {
            Backend::Local(m) => {
                let who = caller(ctx)?;
                let files = decode_files(&files).map_err(|e| e.to_string())?;
                let timeout = kiln_protocol::timeout_from_seconds(timeout).map_err(|e| e.message)?;
                let exec =
                    Exec { session_id, code, files, timeout, network: who.network, max_sessions: who.max_sessions };
                m.execute(&who.key_id, exec).await.map_err(|e| e.to_string())
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
                serde_json::from_value(data).map_err(|e| e.to_string())
            }
        }
    }

    pub(crate) async fn list(&self, ctx: &RequestContext<RoleServer>) -> Result<Vec<SessionInfo>, String> {
        match self {
            Backend::Local(m) => m.list(&caller(ctx)?.key_id).await.map_err(|e| e.to_string()),
            Backend::Remote(r) => {
                let data = r.call(reqwest::Method::GET, "/v1/tci/sessions", None).await?;
                serde_json::from_value(data["sessions"].clone()).map_err(|e| e.to_string())
            }
        }
    }

    pub(crate) async fn upload(
        &self,
        ctx: &RequestContext<RoleServer>,
        id: &str,
        files: Vec<FileUpload>,
    ) -> Result<(), String> {
        match self {
            Backend::Local(m) => {
                let files = decode_files(&files).map_err(|e| e.to_string())?;
                m.upload(&caller(ctx)?.key_id, id, files).await.map_err(|e| e.to_string())
            }
            Backend::Remote(r) => {
                r.call(reqwest::Method::POST, &format!("/v1/tci/sessions/{id}/files"), Some(json!({"files": files})))
                    .await?;
                Ok(())
            }
        }
    }

    pub(crate) async fn read(&self, ctx: &RequestContext<RoleServer>, id: &str, path: &str) -> Result<Vec<u8>, String> {
        match self {
            Backend::Local(m) => {
                let components = session_path(path).map_err(|e| e.message)?;
                m.read_file(&caller(ctx)?.key_id, id, components, 100 << 20).await.map_err(|e| e.to_string())
            }
            Backend::Remote(r) => r.download(id, path).await,
        }
    }

    pub(crate) async fn end(&self, ctx: &RequestContext<RoleServer>, id: &str) -> Result<(), String> {
        match self {
            Backend::Local(m) => m.end(&caller(ctx)?.key_id, id).await.map_err(|e| e.to_string()),
            Backend::Remote(r) => {
                r.call(reqwest::Method::DELETE, &format!("/v1/tci/sessions/{id}"), None).await.map(|_| ())
            }
        }
    }
}
