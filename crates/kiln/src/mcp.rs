//! `kiln mcp`: MCP over stdio for desktop clients that spawn their servers.
//!
//! With `--url` (and a key) it serves the tools against that kiln. Without,
//! it starts its own kiln (`kiln serve` on a free loopback port, with a key
//! made for this run) and serves against that; the embedded server ends
//! with this process. stdout is the MCP channel: nothing else is printed
//! there.

use anyhow::Context;
use clap::Args;
use rand::distr::{Alphanumeric, SampleString};
use std::io::BufRead;
use std::process::{Command, Stdio};

/// Options of `kiln mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// A running kiln to use; without it, an embedded one is started.
    #[arg(long, env = "KILN_URL")]
    url: Option<String>,
    /// API key for --url [env: KILN_API_KEY]
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Data directory of the embedded kiln [default: <user data dir>/kiln]
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<std::path::PathBuf>,
}

pub async fn run(args: McpArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.url {
        let key = args.api_key.clone().context("--url needs an API key: pass --api-key or set KILN_API_KEY")?;
        let backend = kiln_mcp::Backend::Remote(kiln_mcp::Client::new(url, key.split(',').next().unwrap_or_default()));
        return kiln_mcp::serve_stdio(backend).await.map_err(anyhow::Error::msg);
    }
    // The embedded kiln: our own binary, its output away from stdout.
    let key = format!("kiln_{}", Alphanumeric.sample_string(&mut rand::rng(), 40));
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--api-key", &key])
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(d) = &args.data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    let mut child = cmd.spawn().context("could not start the embedded kiln")?;
    // Held by a pidfd from the start: the signal below can only reach it.
    let pidfd = rustix::process::Pid::from_child(&child);
    let pidfd = rustix::process::pidfd_open(pidfd, rustix::process::PidfdFlags::empty())
        .context("could not open a pidfd for the embedded kiln")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let url = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).find_map(|line| {
            line.strip_prefix("kiln ready on ").and_then(|r| r.split_whitespace().next()).map(str::to_string)
        })
    })
    .await?
    .context("the embedded kiln stopped before it was ready (its log is above)")?;
    tracing::info!(%url, "embedded kiln ready");
    let served = kiln_mcp::serve_stdio(kiln_mcp::Backend::Remote(kiln_mcp::Client::new(&url, &key))).await;
    // End the embedded server cleanly (SIGTERM: its sessions are torn down).
    let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::TERM);
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    served.map_err(anyhow::Error::msg)
}
