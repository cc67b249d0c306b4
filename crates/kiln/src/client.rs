//! `kiln exec` and `kiln sessions`: a client for a running kiln (or any TCI
//! service), for people at a terminal and for scripts.

use crate::table::print_table;
use anyhow::Context;
use base64::Engine as _;
use clap::{Args, Subcommand};
use kiln_client::{Client, ClientError};
use kiln_protocol::{ExecEvent, ExecuteRequest, ExecuteStatus, FileUpload, Output};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

/// Which server, with which key.
#[derive(Debug, Args)]
pub struct Endpoint {
    /// The service's base URL.
    #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8787", global = true)]
    url: String,
    /// API key [default: KILN_API_KEY, else the key file kiln generated in its data dir]
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    #[command(flatten)]
    data: crate::admin::DataDir,
}

impl Endpoint {
    fn key(&self) -> anyhow::Result<String> {
        if let Some(k) = &self.api_key {
            return Ok(k.split(',').next().unwrap_or_default().to_string());
        }
        let file = self.data.path()?.join("api-key");
        std::fs::read_to_string(&file).map(|k| k.trim().to_string()).with_context(|| {
            format!("no API key: pass --api-key or set KILN_API_KEY (no key file at {})", file.display())
        })
    }

    fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(&self.url, &self.key()?))
    }
}

/// A client failure for a person at a terminal.
fn explain(e: ClientError, url: &str) -> anyhow::Error {
    match e {
        ClientError::Api(api) => anyhow::anyhow!("{}: {}", api.code, api.message),
        ClientError::Unreachable { .. } => anyhow::anyhow!("{e}; is kiln running there? (--url {url})"),
        other => anyhow::anyhow!(other),
    }
}

/// `kiln exec`
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Code to run, or `-` to read it from standard input.
    code: String,
    /// Run in this session (keeps its variables and files).
    #[arg(long = "session")]
    session: Option<String>,
    /// The code's language: python, javascript, typescript or bash (what
    /// the server runs: `GET /v1/tci/languages`).
    #[arg(long, default_value = "python")]
    language: String,
    /// Upload a file first: NAME=PATH (NAME relative to the working dir).
    #[arg(long = "file", value_name = "NAME=PATH")]
    files: Vec<String>,
    /// Time limit in seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Memory limit for this run, e.g. 256MiB (at most the server's).
    #[arg(long)]
    memory_limit: Option<String>,
    /// Where images are saved
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Print the raw JSON response.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Run code; print outputs like a terminal notebook as they arrive.
/// Returns the exit code: 0 when the code ran cleanly, 1 when it raised.
pub async fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let code = if args.code == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        args.code.clone()
    };
    let mut files = Vec::new();
    for spec in &args.files {
        let (name, path) = spec.split_once('=').context("--file takes NAME=PATH, e.g. --file data.csv=./data.csv")?;
        let bytes = std::fs::read(path).with_context(|| format!("could not read {path}"))?;
        let content = base64::engine::general_purpose::STANDARD.encode(bytes);
        files.push(FileUpload { name: name.to_string(), encoding: "base64".into(), content });
    }
    let req = ExecuteRequest {
        code,
        language: Some(args.language.clone()),
        session_id: args.session.clone(),
        files: (!files.is_empty()).then_some(files),
        timeout: args.timeout,
        stream: None,
        memory_limit: args.memory_limit.clone(),
    };
    let client = args.endpoint.client()?;
    let data = if args.json {
        let data = client.execute(&req).await.map_err(|e| explain(e, &args.endpoint.url))?;
        println!("{}", serde_json::to_string_pretty(&data)?);
        data
    } else {
        // Printed as the kernel produces it; the final answer repeats it.
        let mut shown = Shown { out_dir: args.out_dir.clone(), session: String::new(), images: 0, failed: None };
        let data = client
            .execute_streamed(&req, |event| match event {
                ExecEvent::Session { session_id } => shown.session = session_id,
                ExecEvent::Output(o) => {
                    if let Err(e) = shown.show(&o) {
                        shown.failed.get_or_insert(e);
                    }
                }
                ExecEvent::Clear { .. } => {}
            })
            .await
            .map_err(|e| explain(e, &args.endpoint.url))?;
        if let Some(e) = shown.failed {
            return Err(e);
        }
        data
    };
    let session = &data.session_id;
    if std::io::stderr().is_terminal() {
        eprintln!("\u{1b}[2msession {session} (reuse with --session {session})\u{1b}[0m");
    } else if !args.json {
        eprintln!("session {session}");
    }
    Ok(if data.status == ExecuteStatus::Error { 1 } else { 0 })
}

/// Prints outputs as they arrive, saving images beside.
struct Shown {
    out_dir: PathBuf,
    session: String,
    images: usize,
    failed: Option<anyhow::Error>,
}

impl Shown {
    fn show(&mut self, o: &Output) -> anyhow::Result<()> {
        let mut out = std::io::stdout();
        match o {
            Output::Stdout(s) => write!(out, "{s}")?,
            Output::Stderr(s) => {
                out.flush()?;
                eprint!("{s}");
            }
            Output::Error(s) => {
                out.flush()?;
                eprintln!("{s}");
            }
            Output::DisplayData(d) | Output::ExecuteResult(d) => {
                let image =
                    [("image/png", "png"), ("image/jpeg", "jpg"), ("image/gif", "gif"), ("image/svg+xml", "svg")]
                        .into_iter()
                        .find_map(|(mime, ext)| d.get(mime).and_then(|v| v.as_str()).map(|t| (mime, ext, t)));
                if let Some((mime, ext, text)) = image {
                    self.images += 1;
                    let name = if self.session.is_empty() { "session" } else { &self.session };
                    let path = self.out_dir.join(format!("{name}-{}.{ext}", self.images));
                    let bytes = if ext == "svg" {
                        text.as_bytes().to_vec()
                    } else {
                        base64::engine::general_purpose::STANDARD.decode(text.trim())?
                    };
                    std::fs::write(&path, bytes).with_context(|| format!("could not save {}", path.display()))?;
                    writeln!(out, "[{mime} saved to {}]", path.display())?;
                } else if let Some(t) = d.get("text/plain").and_then(|v| v.as_str()) {
                    writeln!(out, "{t}")?;
                }
            }
        }
        out.flush()?;
        Ok(())
    }
}

/// `kiln sessions ...`
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// List your live sessions.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// End sessions now.
    Rm {
        /// Session ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub async fn sessions(cmd: SessionsCommand) -> anyhow::Result<()> {
    match cmd {
        SessionsCommand::Ls { json, endpoint } => {
            let sessions = endpoint.client()?.sessions().await.map_err(|e| explain(e, &endpoint.url))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
                return Ok(());
            }
            let t = |v: Option<chrono::DateTime<chrono::Utc>>| {
                v.map_or_else(|| "-".to_string(), |v| v.format("%Y-%m-%d %H:%M:%S").to_string())
            };
            let rows = sessions
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        t(Some(s.started_at)),
                        s.execute_count.to_string(),
                        t(s.last_execute_at),
                        t(Some(s.expires_at)),
                    ]
                })
                .collect();
            print_table(&["ID", "STARTED", "EXECUTIONS", "LAST EXECUTE", "EXPIRES"], rows);
        }
        SessionsCommand::Rm { ids, endpoint } => {
            let client = endpoint.client()?;
            for id in ids {
                client.end(&id).await.map_err(|e| explain(e, &endpoint.url))?;
                eprintln!("ended {id}");
            }
        }
    }
    Ok(())
}
