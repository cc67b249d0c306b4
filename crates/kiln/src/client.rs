//! `kiln exec` and `kiln sessions`: a client for a running kiln (or any TCI
//! service), for people at a terminal and for scripts.

use crate::table::print_table;
use anyhow::Context;
use base64::Engine as _;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
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

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut req = reqwest::Client::new().request(method, &url).bearer_auth(self.key()?);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp =
            req.send().await.with_context(|| format!("could not reach kiln at {url}; is it running? (--url)"))?;
        let status = resp.status();
        let v: Value = resp.json().await.with_context(|| format!("{url} answered {status} without JSON"))?;
        if !status.is_success() {
            let msg = v["errors"][0]["message"].as_str().unwrap_or("request failed");
            let code = v["errors"][0]["code"].as_str().unwrap_or("error");
            anyhow::bail!("{code} ({status}): {msg}");
        }
        Ok(v["data"].clone())
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
    /// Upload a file first: NAME=PATH (NAME relative to the working dir).
    #[arg(long = "file", value_name = "NAME=PATH")]
    files: Vec<String>,
    /// Time limit in seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Where images are saved
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Print the raw JSON response.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Run code; print outputs like a terminal notebook. Returns the exit code:
/// 0 when the code ran cleanly, 1 when it raised.
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
        files.push(json!({"name": name, "encoding": "base64", "content": content}));
    }
    let mut body = json!({"language": "python", "code": code});
    if let Some(s) = &args.session {
        body["session_id"] = json!(s);
    }
    if !files.is_empty() {
        body["files"] = json!(files);
    }
    if let Some(t) = args.timeout {
        body["timeout"] = json!(t);
    }
    let data = args.endpoint.call(reqwest::Method::POST, "/v1/tci/execute", Some(body)).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
    } else {
        show(&data, &args.out_dir)?;
    }
    let session = data["session_id"].as_str().unwrap_or_default();
    if std::io::stderr().is_terminal() {
        eprintln!("\u{1b}[2msession {session} (reuse with --session {session})\u{1b}[0m");
    } else if !args.json {
        eprintln!("session {session}");
    }
    Ok(if data["status"] == "error" { 1 } else { 0 })
}

fn show(data: &Value, out_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let mut n = 0;
    for o in data["outputs"].as_array().into_iter().flatten() {
        let d = &o["data"];
        match o["type"].as_str().unwrap_or_default() {
            "stdout" => write!(out, "{}", d.as_str().unwrap_or_default())?,
            "stderr" | "error" => {
                out.flush()?;
                eprint!("{}", d.as_str().unwrap_or_default());
                if o["type"] == "error" {
                    eprintln!();
                }
            }
            _ => {
                let image =
                    [("image/png", "png"), ("image/jpeg", "jpg"), ("image/gif", "gif"), ("image/svg+xml", "svg")]
                        .into_iter()
                        .find(|(mime, _)| d[*mime].is_string());
                if let Some((mime, ext)) = image {
                    n += 1;
                    let sid = data["session_id"].as_str().unwrap_or("session");
                    let path = out_dir.join(format!("{sid}-{n}.{ext}"));
                    let text = d[mime].as_str().unwrap_or_default();
                    let bytes = if ext == "svg" {
                        text.as_bytes().to_vec()
                    } else {
                        base64::engine::general_purpose::STANDARD.decode(text.trim())?
                    };
                    std::fs::write(&path, bytes).with_context(|| format!("could not save {}", path.display()))?;
                    writeln!(out, "[{mime} saved to {}]", path.display())?;
                } else if let Some(t) = d["text/plain"].as_str() {
                    writeln!(out, "{t}")?;
                }
            }
        }
    }
    out.flush()?;
    Ok(())
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
            let data = endpoint.call(reqwest::Method::GET, "/v1/tci/sessions", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data["sessions"])?);
                return Ok(());
            }
            let rows = data["sessions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let t = |f: &str| {
                        s[f].as_str().map(|v| v.get(..19).unwrap_or(v).replace('T', " ")).unwrap_or("-".into())
                    };
                    vec![
                        s["id"].as_str().unwrap_or_default().to_string(),
                        t("started_at"),
                        s["execute_count"].to_string(),
                        t("last_execute_at"),
                        t("expires_at"),
                    ]
                })
                .collect();
            print_table(&["ID", "STARTED", "EXECUTIONS", "LAST EXECUTE", "EXPIRES"], rows);
        }
        SessionsCommand::Rm { ids, endpoint } => {
            for id in ids {
                endpoint.call(reqwest::Method::DELETE, &format!("/v1/tci/sessions/{id}"), None).await?;
                eprintln!("ended {id}");
            }
        }
    }
    Ok(())
}
