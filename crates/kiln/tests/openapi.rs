//! The OpenAPI document: generated from the code, covering every endpoint,
//! and true to the server (schemathesis fuzzes the running server from it
//! and finds no 5xx and no response that breaks the schema).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, KEY};

#[tokio::test(flavor = "multi_thread")]
async fn the_document_covers_every_endpoint_and_the_docs_page_renders_it() {
    let s = start(&[]);
    let doc: serde_json::Value =
        s.http.get(format!("{}/openapi.json", s.url)).send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    for p in [
        "/v1/tci/execute",
        "/v1/tci/sessions",
        "/v1/tci/sessions/{id}",
        "/v1/tci/sessions/{id}/files",
        "/v1/tci/sessions/{id}/files/{path}",
        "/v1/tci/usage",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/v1/tci/languages",
        "/v1/status",
        "/v1/admin/keys",
        "/v1/admin/keys/{id}",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    assert!(doc["components"]["schemas"]["ErrorEnvelope"].is_object());
    // Every operation has an id of its own (OpenAPI requires it; client
    // generators name their methods by it).
    let mut ids: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|ops| ops.as_object().unwrap().values())
        .map(|op| op["operationId"].as_str().unwrap_or_default())
        .collect();
    let operations = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((ids.len(), ids.contains(&"")), (operations, false), "{ids:?}");
    // An upload's answer leads to the download of what it wrote.
    let link = &doc["paths"]["/v1/tci/sessions/{id}/files"]["post"]["responses"]["200"]["links"]["DownloadFile"];
    assert_eq!(link["operationId"], "download_file", "{link}");
    // The server's own limits are stated: the default --network is registries,
    // the ceiling of what a created key may ask for.
    let network = &doc["components"]["schemas"]["CreateKey"]["properties"]["network"]["oneOf"][1]["enum"];
    assert_eq!(network, &serde_json::json!(["none", "registries"]), "{doc}");
    assert_eq!(doc["components"]["schemas"]["BatchRequest"]["properties"]["items"]["maxItems"], 1000);
    let page = s.http.get(format!("{}/docs", s.url)).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/openapi.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let dir = common::clients_dir();
    // A batch's largest size is this server's --max-batch-items, which the
    // document states: schemathesis sends batches of 20, not of 1,000 fresh
    // sessions (minutes each on a small machine; the limit itself is
    // checked by the batch tests).
    let s = start(&["--pool-size", "2", "--max-batch-items", "20"]);
    let url = format!("{}/openapi.json", s.url);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(dir.join("schemathesis/bin/schemathesis"))
            .arg("--config-file")
            .arg(common::repo().join("tests/schemathesis.toml"))
            .args(["run", &url, "-H", &format!("Authorization: Bearer {KEY}")])
            .args(["--checks", "all"])
            // Request timeouts are in the config file (a batch gets longer).
            .args(["--max-examples", "30", "--seed", "1"])
            // No example database: a run replays nothing an earlier run on
            // this machine saved, so it is the same here as on a clean clone.
            .args(["--generation-database", "none"])
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed") && !stdout.contains(" failed"), "{stdout}");
    drop(s);
}
