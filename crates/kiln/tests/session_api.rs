//! Session endpoints beyond execute: get, delete, and files (list,
//! download, upload), confined to the session's working directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of, KEY, OTHER_KEY};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_session_can_be_read_and_ended_by_its_own_key_only() {
    let s = start(&[]);
    let id = s.exec("x = 1", None).await["session_id"].as_str().unwrap().to_string();
    let (st, v) = s.raw(Method::GET, &format!("/v1/tci/sessions/{id}"), Some(KEY), vec![]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["id"], json!(id));
    assert_eq!(v["data"]["execute_count"], 1);
    for method in [Method::GET, Method::DELETE] {
        let (st, v) = s.raw(method, &format!("/tci/sessions/{id}"), Some(OTHER_KEY), vec![]).await;
        assert_eq!((st, v["errors"][0]["code"].clone()), (404, json!("session_not_found")), "{v}");
    }
    let before = common::sandbox_dirs(&s.sessions_dir());
    let (st, v) = s.raw(Method::DELETE, &format!("/tci/sessions/{id}"), Some(KEY), vec![]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["deleted"], true);
    // Gone at once: its sandbox, its listing, its use.
    // (The pool may add kernels meanwhile; exactly one sandbox went away.)
    let after = common::sandbox_dirs(&s.sessions_dir());
    assert_eq!(before.difference(&after).count(), 1, "{before:?} -> {after:?}");
    assert!(s.sessions(KEY).await.is_empty());
    let (st, v) = s.post("/tci/execute", Some(KEY), json!({"code": "1", "session_id": id})).await;
    assert_eq!((st, v["errors"][0]["code"].clone()), (410, json!("session_expired")));
}

#[tokio::test(flavor = "multi_thread")]
async fn files_can_be_uploaded_listed_and_downloaded_without_running_code() {
    let s = start(&[]);
    let id = s.exec("import os", None).await["session_id"].as_str().unwrap().to_string();
    let upload = json!({"files": [
        {"name": "data/a.csv", "encoding": "string", "content": "x,y\n1,2\n"},
        {"name": "b.bin", "encoding": "base64", "content": "AAEC"}
    ]});
    let (st, v) = s.post(&format!("/v1/tci/sessions/{id}/files"), Some(KEY), upload).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["written"], json!(["data/a.csv", "b.bin"]));
    // The code sees them, and owns them.
    let d = s.exec("print(open('data/a.csv').read().strip(), os.stat('b.bin').st_uid)", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "x,y\n1,2 1000\n");
    s.exec("open('out.txt', 'w').write('made by code')", Some(&id)).await;

    let (st, v) = s.raw(Method::GET, &format!("/tci/sessions/{id}/files"), Some(KEY), vec![]).await;
    assert_eq!(st, 200, "{v}");
    let names: Vec<_> =
        v["data"]["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["b.bin", "data", "out.txt"]);
    let (_, v) = s.raw(Method::GET, &format!("/tci/sessions/{id}/files?path=data"), Some(KEY), vec![]).await;
    assert_eq!(v["data"]["entries"][0], json!({"name": "a.csv", "path": "data/a.csv", "type": "file", "size": 8}));

    let resp = s.http.get(format!("{}/tci/sessions/{id}/files/out.txt", s.url)).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "made by code");
    let resp = s.http.get(format!("{}/v1/tci/sessions/{id}/files/b.bin", s.url)).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &[0u8, 1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn file_endpoints_never_leave_the_working_directory() {
    let s = start(&[]);
    let id = s
        .exec(
            "import os, socket\nos.symlink('/etc/passwd', 'link')\nos.symlink('/etc', 'dirlink')\nos.mkdir('d')\n\
             listener = socket.socket(socket.AF_UNIX)\nlistener.bind('sock')",
            None,
        )
        .await["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let get = |path: String| {
        let s = &s;
        async move { s.raw(Method::GET, &path, Some(KEY), vec![]).await }
    };
    for (path, status, code) in [
        // A link the code planted, or a folder asked for as a file, is a
        // conflict with what is there; a path that escapes is invalid.
        (format!("/tci/sessions/{id}/files/link"), 409, "file_conflict"),
        (format!("/tci/sessions/{id}/files/dirlink/passwd"), 409, "file_conflict"),
        (format!("/tci/sessions/{id}/files?path=dirlink"), 409, "file_conflict"),
        (format!("/tci/sessions/{id}/files?path=../../.."), 400, "invalid_file"),
        (format!("/tci/sessions/{id}/files/d"), 409, "file_conflict"),
        // A socket the code bound is not a file: the user's doing, not kiln's.
        (format!("/tci/sessions/{id}/files/sock"), 409, "file_conflict"),
        (format!("/tci/sessions/{id}/files/missing.txt"), 404, "file_not_found"),
        ("/tci/sessions/ses_nope/files".to_string(), 404, "session_not_found"),
    ] {
        let (st, v) = get(path.clone()).await;
        assert_eq!((st, v["errors"][0]["code"].as_str().unwrap_or("")), (status, code), "{path}: {v}");
    }
    // Encoded traversal in the path segment is refused too.
    let resp = s
        .http
        .get(format!("{}/tci/sessions/{id}/files/..%2F..%2Fetc%2Fpasswd", s.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Uploading through the planted directory link is refused.
    let (st, v) = s
        .post(
            &format!("/tci/sessions/{id}/files"),
            Some(KEY),
            json!({"files": [{"name": "dirlink/x", "encoding": "string", "content": "x"}]}),
        )
        .await;
    assert_eq!((st, v["errors"][0]["code"].clone()), (409, json!("file_conflict")), "{v}");
    let (st, _) = s.raw(Method::GET, &format!("/tci/sessions/{id}/files"), Some(OTHER_KEY), vec![]).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_reports_whether_new_sessions_can_start() {
    let s = start(&["--max-sessions", "1"]);
    assert_eq!(s.raw(Method::GET, "/readyz", None, vec![]).await.0, 200);
    s.exec("1", None).await;
    let (st, v) = s.raw(Method::GET, "/readyz", None, vec![]).await;
    assert_eq!((st, v["status"].clone()), (503, json!("not ready")));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_sessions_executions_limits_and_errors() {
    let s = start(&[]);
    let id = s.exec("1/0", None).await["session_id"].as_str().unwrap().to_string();
    s.exec("print(1)", Some(&id)).await;
    let (st, _) = s
        .post("/tci/execute", Some(KEY), json!({"code": "import time; time.sleep(30)", "session_id": id, "timeout": 1}))
        .await;
    assert_eq!(st, 200);
    let (st, _) = s.post("/tci/execute", Some("wrong"), json!({"code": "1"})).await;
    assert_eq!(st, 401);
    let resp = s.http.get(format!("{}/metrics", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    for line in [
        "kiln_sessions_live 1",
        "kiln_sessions_started_total 1",
        "kiln_executions_total{outcome=\"error\"} 1",
        "kiln_executions_total{outcome=\"success\"} 1",
        "kiln_executions_total{outcome=\"timeout\"} 1",
        "kiln_limits_hit_total{limit=\"time\"} 1",
        "kiln_request_errors_total{code=\"unauthorized\"} 1",
        "kiln_execute_duration_seconds_count 3",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_a_request_id() {
    let s = start(&[]);
    let resp = s.http.get(format!("{}/tci/sessions", s.url)).bearer_auth(KEY).send().await.unwrap();
    let id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id:?}");
    let resp = s
        .http
        .get(format!("{}/tci/sessions", s.url))
        .bearer_auth(KEY)
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers().get("x-request-id").unwrap(), "trace-me-42");
}
