//! The real TCI clients, unchanged, against a real server: PyPI `together`
//! 1.5.x and 2.x, npm `together-ai`, and the docs' curl commands, each
//! running every example of the documentation (`tests/clients/`).
//!
//! The clients are installed by `scripts/setup-clients` into a cache
//! (`$KILN_TEST_CACHE`, default `~/.cache/kiln-test`); it is idempotent, so
//! the first test to need them installs them and the rest reuse them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{clients_dir, run_client, start};
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread")]
async fn the_together_1_x_python_client_runs_every_documented_example() {
    let dir = clients_dir();
    let s = start(&[]);
    tokio::task::spawn_blocking(move || run_client(dir.join("py1/bin/python"), "seeds_together_v1.py", &s.url))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_together_2_x_python_client_runs_every_documented_example() {
    let dir = clients_dir();
    let s = start(&[]);
    tokio::task::spawn_blocking(move || run_client(dir.join("py2/bin/python"), "seeds_together_v2.py", &s.url))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_together_ai_npm_client_runs_every_documented_example() {
    clients_dir();
    let s = start(&[]);
    tokio::task::spawn_blocking(move || run_client(PathBuf::from("node"), "seeds_together_ai.mjs", &s.url))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_curl_commands_work() {
    let s = start(&[]);
    tokio::task::spawn_blocking(move || run_client(PathBuf::from("bash"), "seeds_curl.sh", &s.url)).await.unwrap();
}
