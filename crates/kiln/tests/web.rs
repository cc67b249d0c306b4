//! The browser pages end to end: a real `kiln serve` (with the pages embedded
//! in the binary) and Debian's Chromium driven by Playwright
//! (`playwright-core`, no browser download), running the scripts under
//! `web/e2e/` with node's test runner. Screenshots of the main states land in
//! `target/playwright/`.
//!
//! `scripts/test` installs Chromium (`scripts/system-deps --test`) and builds
//! the pages (`scripts/build-web`) before cargo compiles the binary; these
//! tests refuse to run against a binary without them, or with pages older
//! than `web/dist`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{repo, start, Server, KEY, OTHER_KEY};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One browser at a time: Chromium and a kernel per test would crowd two
/// cores into timeouts.
static BROWSER: Mutex<()> = Mutex::new(());

const CHROMIUM: &str = "/usr/bin/chromium";

fn web() -> PathBuf {
    repo().join("web")
}

/// The pages' npm packages (playwright-core among them) are installed and
/// `web/dist` is built, and the server serves exactly that build.
async fn check_pages(s: &Server) {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: run scripts/system-deps --test (scripts/test does)");
    assert!(
        web().join("node_modules/playwright-core").is_dir() && web().join("dist/index.html").is_file(),
        "the pages are not built: run scripts/build-web (scripts/test and scripts/serve do), then rebuild kiln"
    );
    let served = s.http.get(format!("{}/", s.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        !served.contains("The playground was not built"),
        "this kiln binary was compiled without the pages: run scripts/build-web, then cargo test again"
    );
    let built = std::fs::read_to_string(web().join("dist/index.html")).unwrap();
    assert_eq!(served, built, "this kiln binary embeds other pages than web/dist: rebuild it (cargo build)");
}

/// Run one script of `web/e2e` against `s`; its node:test output is shown
/// when it fails.
async fn browse(s: &Server, script: &str) {
    check_pages(s).await;
    let _one = BROWSER.lock().unwrap_or_else(|p| p.into_inner());
    let artifacts = repo().join("target/playwright");
    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec", "--test-concurrency=1"])
        .arg(format!("e2e/{script}"))
        .current_dir(web())
        .env("KILN_URL", &s.url)
        .env("KILN_KEY", KEY)
        .env("KILN_OTHER_KEY", OTHER_KEY)
        .env("KILN_ARTIFACTS", &artifacts)
        .env("KILN_CHROMIUM", CHROMIUM)
        .env("NO_COLOR", "1")
        .output()
        .expect("run node (scripts/system-deps installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser test {script} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("ℹ fail 0") && !stdout.contains("ℹ pass 0"), "{stdout}");
    println!("{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_playground_runs_cells_shows_every_output_handles_files_and_stops_a_cell() {
    let s = start(&[]);
    browse(&s, "playground.test.mjs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn html_output_cannot_reach_the_key_the_page_or_an_authenticated_request() {
    let s = start(&[]);
    browse(&s, "security.test.mjs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_health_usage_and_sessions_and_ends_them() {
    let s = start(&[]);
    browse(&s, "console.test.mjs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_of_a_cluster_node_shows_the_nodes_to_an_admin_key() {
    let pg = kiln_testpg::PgServer::start();
    let s = common::cluster::solo(&pg.url(), "6s");
    browse(&s, "nodes.test.mjs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_server_is_reported_as_full_in_the_playground() {
    let s = start(&["--max-sessions", "1"]);
    browse(&s, "capacity.test.mjs").await;
}
