//! Where the MCP tools find sessions: the in-process session manager (for
//! `/mcp` on the server), or a kiln server's HTTP API (for `kiln mcp`).
//!
//! Either way a failure is an [`ApiError`]: the session layer's through the
//! same table the HTTP API uses ([`kiln_sessions::SessionError::to_api`]),
//! a remote server's as it reported it. So an MCP client sees the same
//! stable codes and messages as an HTTP client, and never kiln's internals.

use kiln_client::Client;
use kiln_protocol::{
    decode_files, session_path, ApiError, ErrorCode, ExecEvent, ExecuteData, ExecuteRequest, FileUpload, SessionInfo,
};
use kiln_sessions::{Caller, Exec, Manager, SessionError};
use rmcp::service::RequestContext;
use rmcp::RoleServer;
use tokio::sync::mpsc::UnboundedSender;

/// How the tools reach sessions.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The server's own manager, as the key that authenticated the MCP
    /// request (put in the request's extensions by the auth middleware).
    Local(Manager),
    /// A kiln server over HTTP.
    Remote(Client),
    /// A cluster node's own API routes, in-process, as the key that
    /// authenticated the MCP request: sessions are reached wherever in the
    /// cluster they are.
    Routed(crate::routed::Api),
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

fn remote(e: kiln_client::ClientError) -> ApiError {
    e.to_api()
}

fn caller(ctx: &RequestContext<RoleServer>) -> Result<Caller, ApiError> {
    ctx.extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "no API key on this MCP connection"))
}

impl Backend {
    /// Run `req`; with `events`, each output is also sent there as the
    /// kernel produces it. The request is checked where the HTTP API checks
    /// it: here by the session layer's own [`Exec::from_request`], by the
    /// server otherwise.
    pub(crate) async fn execute(
        &self,
        ctx: &RequestContext<RoleServer>,
        req: ExecuteRequest,
        events: Option<UnboundedSender<ExecEvent>>,
    ) -> Result<ExecuteData, ApiError> {
        match self {
            Backend::Local(m) => {
                let who = caller(ctx)?;
                let mut exec = Exec::from_request(req, &who, &m.languages())?;
                exec.events = events;
                m.execute(&who.key_id, exec).await.map_err(api)
            }
            Backend::Remote(c) => match events {
                Some(tx) => c
                    .execute_streamed(&req, |e| {
                        let _ = tx.send(e);
                    })
                    .await
                    .map_err(remote),
                None => c.execute(&req).await.map_err(remote),
            },
            Backend::Routed(api) => api.execute(&caller(ctx)?, req, events).await,
        }
    }

    pub(crate) async fn list(&self, ctx: &RequestContext<RoleServer>) -> Result<Vec<SessionInfo>, ApiError> {
        match self {
            Backend::Local(m) => m.list(&caller(ctx)?.key_id).await.map_err(api),
            Backend::Remote(c) => c.sessions().await.map_err(remote),
            Backend::Routed(api) => api.list(&caller(ctx)?).await,
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
            Backend::Remote(c) => c.upload(id, &files).await.map_err(remote),
            Backend::Routed(api) => {
                // Checked here, as for the others, before anything is sent.
                decode_files(&files)?;
                api.upload(&caller(ctx)?, id, files).await
            }
        }
    }

    pub(crate) async fn read(
        &self,
        ctx: &RequestContext<RoleServer>,
        id: &str,
        path: &str,
    ) -> Result<Vec<u8>, ApiError> {
        // Checked here for both: a URL would resolve `..` before kiln saw it.
        let components = session_path(path)?;
        match self {
            Backend::Local(m) => m.read_file(&caller(ctx)?.key_id, id, components, 100 << 20).await.map_err(api),
            Backend::Remote(c) => c.download(id, path).await.map_err(remote),
            Backend::Routed(api) => api.read(&caller(ctx)?, id, &components).await,
        }
    }

    pub(crate) async fn end(&self, ctx: &RequestContext<RoleServer>, id: &str) -> Result<(), ApiError> {
        match self {
            Backend::Local(m) => m.end(&caller(ctx)?.key_id, id).await.map_err(api),
            Backend::Remote(c) => c.end(id).await.map_err(remote),
            Backend::Routed(api) => api.end(&caller(ctx)?, id).await,
        }
    }
}
