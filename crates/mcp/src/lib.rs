//! kiln as an MCP server: code execution, sessions and files as tools any
//! MCP client (Claude Desktop, Cursor, a custom agent) can use.
//!
//! One tool implementation, three ways to reach sessions:
//! - [`Backend::Local`]: inside the HTTP server, at `/mcp` (streamable HTTP),
//!   calling the session manager directly as the API key that authenticated
//!   the request;
//! - [`Backend::Routed`]: the same on a cluster node, through the node's own
//!   API routes in-process, so a session is reached on whichever node holds
//!   it (see `routed`);
//! - [`Backend::Remote`]: for `kiln mcp` over stdio, calling a kiln server's
//!   HTTP API with a URL and key.
//!
//! Errors of the user's code come back as tool results the model can read
//! (with `isError`), never as protocol errors.
#![forbid(unsafe_code)]

mod backend;
mod routed;

pub use backend::Backend;
pub use kiln_client::Client;
pub use routed::Api;

use base64::Engine as _;
use kiln_protocol::{ExecuteData, ExecuteRequest, FileUpload, Output};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock as Content, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;

/// The MCP server.
#[derive(Debug, Clone)]
pub struct KilnMcp {
    backend: Backend,
    tool_router: ToolRouter<Self>,
}

/// A file to write into the session's working directory.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct FileArg {
    /// Path relative to the working directory, e.g. "data/input.csv".
    pub name: String,
    /// The content: text, or base64 when `encoding` is "base64".
    pub content: String,
    /// "string" (default) or "base64".
    #[serde(default)]
    pub encoding: Option<String>,
}

/// Arguments of `run_code`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RunCode {
    /// The code, run as one notebook cell. In Python, `!cmd` runs a shell
    /// command (e.g. `!pip install requests`), the value of the last
    /// expression is returned, and matplotlib figures come back as images.
    pub code: String,
    /// "python" (the default), "javascript", "typescript" or "bash", as far
    /// as the server runs them (an error lists the ones it does). A session
    /// keeps the language it started with.
    #[serde(default)]
    pub language: Option<String>,
    /// Reuse this session (its variables, imports, files and installed
    /// packages). Omit to start a new one; every result says its session_id.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Files written into the working directory before the code runs.
    #[serde(default)]
    pub files: Option<Vec<FileArg>>,
    /// Time limit in seconds (the server's default when omitted).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Memory limit for this run, e.g. "256MiB" (at most the server's; the
    /// server's when omitted). Going over it stops the run with a
    /// MemoryError; the session lives on.
    #[serde(default)]
    pub memory_limit: Option<String>,
}

/// Arguments naming a session.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionArg {
    /// The session's id (`ses_...`).
    pub session_id: String,
}

/// Arguments of `upload_file`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct UploadArg {
    /// The session's id.
    pub session_id: String,
    /// The file to write.
    pub file: FileArg,
}

/// Arguments of `read_file`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ReadArg {
    /// The session's id.
    pub session_id: String,
    /// Path relative to the working directory.
    pub path: String,
}

fn uploads(files: Option<Vec<FileArg>>) -> Vec<FileUpload> {
    files
        .unwrap_or_default()
        .into_iter()
        .map(|f| FileUpload {
            name: f.name,
            encoding: f.encoding.unwrap_or_else(|| "string".into()),
            content: f.content,
        })
        .collect()
}

/// A failure the model should read (not a protocol error): the API's stable
/// code and message, as an HTTP client would see them.
fn failed(e: kiln_protocol::ApiError) -> CallToolResult {
    CallToolResult::error(vec![Content::text(e.to_string())])
}

#[tool_router]
impl KilnMcp {
    /// A server over `backend`.
    pub fn new(backend: Backend) -> Self {
        KilnMcp { backend, tool_router: Self::tool_router() }
    }

    #[tool(description = "Run code in a stateful, sandboxed Jupyter session and return what a notebook would \
        show: printed text, the last expression's value, errors with tracebacks, and plots as images. Python \
        by default; set language to \"javascript\", \"typescript\" or \"bash\" where the server runs them. \
        Pass session_id from an earlier result to keep variables, files and installed packages; omit it to \
        start a fresh session. A session lasts the server's session lifetime from its start (an hour unless \
        its operator set another).")]
    async fn run_code(
        &self,
        Parameters(args): Parameters<RunCode>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let req = ExecuteRequest {
            code: args.code,
            language: args.language,
            session_id: args.session_id,
            files: Some(uploads(args.files)),
            timeout: args.timeout,
            stream: None,
            memory_limit: args.memory_limit,
        };
        // A client that asked for progress gets each output as it happens.
        let (events, progress) = match ctx.meta.get_progress_token() {
            Some(token) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(tokio::spawn(report_progress(ctx.peer.clone(), token, rx))))
            }
            None => (None, None),
        };
        let run = self.backend.execute(&ctx, req, events);
        // A cancelled call drops the execution, which interrupts the cell.
        let result = tokio::select! {
            result = run => result,
            _ = ctx.ct.cancelled() => Err(kiln_protocol::ApiError::new(
                kiln_protocol::ErrorCode::InvalidRequest,
                "the call was cancelled; its cell was interrupted",
            )),
        };
        if let Some(p) = progress {
            let _ = p.await;
        }
        match result {
            Ok(data) => Ok(render(&data)),
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "List your live code-interpreter sessions with their start, last use and expiry times.")]
    async fn list_sessions(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
        match self.backend.list(&ctx).await {
            Ok(list) => Ok(CallToolResult::success(vec![Content::text(
                serde_json::to_string_pretty(&list).unwrap_or_default(),
            )])),
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "Write a file into a session's working directory without running code.")]
    async fn upload_file(
        &self,
        Parameters(args): Parameters<UploadArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let name = args.file.name.clone();
        match self.backend.upload(&ctx, &args.session_id, uploads(Some(vec![args.file]))).await {
            Ok(()) => Ok(CallToolResult::success(vec![Content::text(format!("wrote {name}"))])),
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "Read a file from a session's working directory (text as text, other files as base64).")]
    async fn read_file(
        &self,
        Parameters(args): Parameters<ReadArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        match self.backend.read(&ctx, &args.session_id, &args.path).await {
            Ok(bytes) => Ok(CallToolResult::success(vec![Content::text(match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    format!("(binary, base64) {}", base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
                }
            })])),
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "End a session now, freeing its resources. Its variables and files are gone.")]
    async fn end_session(
        &self,
        Parameters(args): Parameters<SessionArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        match self.backend.end(&ctx, &args.session_id).await {
            Ok(()) => Ok(CallToolResult::success(vec![Content::text(format!("ended {}", args.session_id))])),
            Err(e) => Ok(failed(e)),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for KilnMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("kiln", env!("CARGO_PKG_VERSION")).with_title("kiln code interpreter"),
            )
            .with_instructions(
                "A code interpreter with stateful, sandboxed sessions: Python by default, and JavaScript, \
                 TypeScript or bash where the server runs them. Use run_code; keep the session_id it returns \
                 to continue in the same session.",
            )
    }
}

/// Send each output of a running cell as a progress notification (its text,
/// or what kind of rich output it is), until the execution drops its sender.
async fn report_progress(
    peer: rmcp::Peer<RoleServer>,
    token: rmcp::model::ProgressToken,
    mut events: tokio::sync::mpsc::UnboundedReceiver<kiln_protocol::ExecEvent>,
) {
    let mut n = 0.0;
    while let Some(event) = events.recv().await {
        let kiln_protocol::ExecEvent::Output(o) = event else { continue };
        let message = match &o {
            Output::Stdout(s) => s.clone(),
            Output::Stderr(s) => format!("[stderr] {s}"),
            Output::Error(s) => format!("[error] {s}"),
            Output::DisplayData(b) | Output::ExecuteResult(b) => match b.get("text/plain").and_then(|v| v.as_str()) {
                Some(t) => t.to_string(),
                None => format!("[{}: {}]", o.type_name(), b.keys().cloned().collect::<Vec<_>>().join(", ")),
            },
        };
        n += 1.0;
        let note = rmcp::model::ProgressNotificationParam::new(token.clone(), n).with_message(message);
        if peer.notify_progress(note).await.is_err() {
            return;
        }
    }
}

/// Outputs as MCP content: text as text, images as images, then a line
/// with the session id to reuse.
fn render(data: &ExecuteData) -> CallToolResult {
    let mut content = Vec::new();
    for o in &data.outputs {
        match o {
            Output::Stdout(s) => content.push(Content::text(s.clone())),
            Output::Stderr(s) => content.push(Content::text(format!("[stderr]\n{s}"))),
            Output::Error(s) => content.push(Content::text(format!("[error]\n{s}"))),
            Output::DisplayData(b) | Output::ExecuteResult(b) => {
                let image = ["image/png", "image/jpeg", "image/gif"]
                    .into_iter()
                    .find_map(|m| b.get(m).and_then(|v| v.as_str()).map(|d| (m, d)));
                if let Some((mime, data)) = image {
                    content.push(Content::image(data.trim().to_string(), mime));
                } else if let Some(text) = b.get("text/plain").and_then(|v| v.as_str()) {
                    content.push(Content::text(text.to_string()));
                } else if let Some(html) = b.get("text/html").and_then(|v| v.as_str()) {
                    content.push(Content::text(html.to_string()));
                }
            }
        }
    }
    let status = if data.status == kiln_protocol::ExecuteStatus::Error { "error" } else { "success" };
    content.push(Content::text(format!(
        "session_id: {} (pass it as session_id to continue in this session); status: {status}",
        data.session_id
    )));
    if status == "error" {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    }
}

/// The streamable-HTTP MCP service for the server's `/mcp` route (wrap it in
/// the API-key middleware: tools act as the key in the request).
///
/// Every request carries the API key, so the `Host` check against DNS
/// rebinding (meant for unauthenticated local servers) is off: the server
/// is reached by whatever name its deployment gives it. With
/// `stateless`, no MCP session is kept between requests (no
/// `Mcp-Session-Id`): each request is served whole by the node it reaches,
/// as a cluster behind a load balancer without stickiness needs; a call
/// is then cancelled by closing its request.
pub fn http_service(
    backend: Backend,
    stateless: bool,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    KilnMcp,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    let config = rmcp::transport::streamable_http_server::StreamableHttpServerConfig::default()
        .disable_allowed_hosts()
        .with_legacy_session_mode(!stateless);
    rmcp::transport::streamable_http_server::StreamableHttpService::new(
        move || Ok(KilnMcp::new(backend.clone())),
        Default::default(),
        config,
    )
}

/// Serve MCP over stdin/stdout with `backend` until the client leaves.
pub async fn serve_stdio(backend: Backend) -> Result<(), String> {
    use rmcp::ServiceExt as _;
    let running = KilnMcp::new(backend).serve(rmcp::transport::stdio()).await.map_err(|e| e.to_string())?;
    running.waiting().await.map_err(|e| e.to_string())?;
    Ok(())
}
