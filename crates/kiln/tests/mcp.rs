//! kiln as an MCP server, driven by the official MCP Python SDK (PyPI
//! `mcp`, installed by `scripts/setup-clients`) over streamable HTTP at
//! `/mcp`, over stdio against a running kiln, and over stdio with its own
//! embedded kiln (`tests/clients/mcp_client.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{repo, start, KEY};
use std::path::PathBuf;

fn python() -> PathBuf {
    common::clients_dir().join("mcp/bin/python")
}

/// Run `tests/clients/mcp_client.py MODE`, which must pass all its
/// `checks`.
fn run(mode: &str, url: &str, envs: &[(&str, &str)], checks: usize) {
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/clients/mcp_client.py"))
        .arg(mode)
        .env("KILN_BASE_URL", url)
        .env("KILN_API_KEY", KEY)
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mcp {mode}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let totals = format!("{checks} passed, 0 failed");
    assert!(stdout.lines().last().unwrap_or_default().starts_with(&totals), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_over_streamable_http_and_stdio() {
    let s = start(&["--pool-size", "2"]);
    let (st, _) = s.post("/mcp", None, serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).await;
    assert_eq!(st, 401, "MCP needs an API key like the rest of the API");
    let url = s.url.clone();
    tokio::task::spawn_blocking(move || {
        run("http", &url, &[], 23);
        run("stdio", &url, &[], 23);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_over_stdio_with_an_embedded_kiln() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        run("embedded", "", &[("KILN_DATA_DIR", &dir), ("KILN_PROFILE", "minimal"), ("KILN_POOL_SIZE", "1")], 23);
    })
    .await
    .unwrap();
    // The embedded kiln ended with the MCP process: its sessions are gone.
    let sessions = data.path().join("sessions");
    assert_eq!(std::fs::read_dir(&sessions).map(|d| d.count()).unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mcp_client_runs_javascript_typescript_and_bash_where_the_server_does() {
    let s = start(&["--profile", "full"]);
    let url = s.url.clone();
    tokio::task::spawn_blocking(move || run("languages", &url, &[], 6)).await.unwrap();
}
