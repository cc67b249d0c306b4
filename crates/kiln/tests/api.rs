//! The API contract through a real server: paths, keys, listing, and every
//! kind of bad input getting a clear 4xx in the documented shape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of, KEY, OTHER_KEY};
use reqwest::Method;
use serde_json::{json, Value};

fn assert_error(status: u16, v: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["data"], Value::Null, "{v}");
    assert_eq!(v["errors"][0]["code"], code, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(msg.len() > 15, "message should say what to do: {v}");
    assert_eq!(v["error"]["message"], msg);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_under_both_prefixes_and_with_doubled_slashes() {
    let s = start(&[]);
    for path in ["/tci/execute", "/v1/tci/execute", "/v1//tci/execute", "//tci/execute"] {
        let (status, v) = s.post(path, Some(KEY), json!({"language": "python", "code": "print('hi')"})).await;
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(v["errors"], Value::Null);
        assert_eq!(text_of(&v["data"], "stdout"), "hi\n", "{path}");
    }
    for path in ["/tci/sessions", "/v1/tci/sessions", "/v1//tci//sessions"] {
        let (status, v) = s.raw(Method::GET, path, Some(KEY), vec![]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(v["data"]["sessions"].as_array().map(Vec::len), Some(4), "{path}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_listed_per_key_with_their_counters() {
    let s = start(&[]);
    let id = s.exec("a = 1", None).await["session_id"].as_str().unwrap().to_string();
    s.exec("a += 1", Some(&id)).await;
    let mine = s.sessions(KEY).await;
    assert_eq!(mine.len(), 1);
    let entry = &mine[0];
    assert_eq!(entry["id"], json!(id));
    assert_eq!(entry["execute_count"], 2);
    for field in ["started_at", "last_execute_at", "expires_at"] {
        let t = entry[field].as_str().unwrap();
        assert!(t.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(t).is_ok(), "{field}: {t}");
    }
    let started = chrono::DateTime::parse_from_rfc3339(entry["started_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(entry["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - started).num_minutes(), 60);
    assert!(s.sessions(OTHER_KEY).await.is_empty(), "another key must not see it");
}

#[tokio::test(flavor = "multi_thread")]
async fn another_key_s_session_is_indistinguishable_from_an_unknown_one() {
    let s = start(&[]);
    let id = s.exec("secret = 1", None).await["session_id"].as_str().unwrap().to_string();
    let (st1, foreign) =
        s.post("/tci/execute", Some(OTHER_KEY), json!({"code": "print(secret)", "session_id": id})).await;
    let (st2, unknown) = s
        .post("/tci/execute", Some(OTHER_KEY), json!({"code": "1", "session_id": "ses_doesnotexist000000000000"}))
        .await;
    assert_error(st1, &foreign, 404, "session_not_found");
    assert_error(st2, &unknown, 404, "session_not_found");
    let strip = |v: &Value| {
        v["errors"][0]["message"].as_str().unwrap().replace(&id, "X").replace("ses_doesnotexist000000000000", "X")
    };
    assert_eq!(strip(&foreign), strip(&unknown));
    assert_eq!(foreign["error"]["param"], "session_id");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_wrong_keys_get_401() {
    let s = start(&[]);
    let (st, v) = s.post("/tci/execute", None, json!({"code": "1"})).await;
    assert_error(st, &v, 401, "unauthorized");
    let (st, v) = s.post("/tci/execute", Some("not-a-key"), json!({"code": "1"})).await;
    assert_error(st, &v, 401, "unauthorized");
    let (st, v) = s.raw(Method::GET, "/v1/tci/sessions", Some("nope"), vec![]).await;
    assert_error(st, &v, 401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let s = start(&["--max-body-bytes", "100000"]);
    let cases: Vec<(Vec<u8>, u16, &str, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_request", "not valid JSON"),
        (b"".to_vec(), 400, "invalid_request", "empty"),
        (br#"{"language": "python"}"#.to_vec(), 400, "invalid_request", "missing field `code`"),
        (br#"{"code": 5}"#.to_vec(), 400, "invalid_request", "invalid type"),
        (br#"{"code": "1", "files": "x"}"#.to_vec(), 400, "invalid_request", "invalid type"),
        (br#"[1, 2]"#.to_vec(), 400, "invalid_request", "execute request"),
        (br#"{"code": "1", "language": "cobol"}"#.to_vec(), 400, "unsupported_language", "python"),
        (br#"{"code": "1", "timeout": -3}"#.to_vec(), 400, "invalid_request", "timeout"),
        (vec![b'x'; 200_000], 413, "payload_too_large", "100000 bytes"),
    ];
    for (body, status, code, needle) in cases {
        let (st, v) = s.raw(Method::POST, "/tci/execute", Some(KEY), body).await;
        assert_error(st, &v, status, code);
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
    assert_eq!(
        s.post("/tci/execute", Some(KEY), json!({"code": "1", "language": "cobol"})).await.1["error"]["param"],
        "language"
    );
    let (st, v) = s.raw(Method::GET, "/tci/nothing-here", Some(KEY), vec![]).await;
    assert_error(st, &v, 404, "not_found");
    let (st, v) = s.raw(Method::DELETE, "/tci/execute", Some(KEY), vec![]).await;
    assert_error(st, &v, 405, "method_not_allowed");
    // Still serving.
    assert_eq!(text_of(&s.exec("print(1)", None).await, "stdout"), "1\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn unsafe_or_broken_files_are_refused_and_nothing_is_written() {
    let s = start(&[]);
    let id = s.exec("import os\nos.makedirs('adir')", None).await["session_id"].as_str().unwrap().to_string();
    let good = json!({"name": "good.txt", "encoding": "string", "content": "fine"});
    let bad_files = [
        (json!({"name": "/etc/evil", "encoding": "string", "content": "x"}), "absolute"),
        (json!({"name": "../evil", "encoding": "string", "content": "x"}), ".."),
        (json!({"name": "a/../../evil", "encoding": "string", "content": "x"}), ".."),
        (json!({"name": "nul\u{0}byte", "encoding": "string", "content": "x"}), "NUL"),
        (json!({"name": "b64", "encoding": "base64", "content": "!!!not base64"}), "base64"),
        (json!({"name": "enc", "encoding": "rot13", "content": "x"}), "encoding"),
        (json!({"name": "adir", "encoding": "string", "content": "x"}), "folder"),
        (json!({"name": "good.txt/x", "encoding": "string", "content": "x"}), "good.txt"),
    ];
    for (bad, needle) in bad_files {
        let (st, v) = s
            .post("/tci/execute", Some(KEY), json!({"code": "print('ran')", "session_id": id, "files": [good, bad]}))
            .await;
        // A name that collides (with another entry, or with what is in the
        // working directory) is a conflict; any other bad entry is invalid.
        if needle == "folder" || needle == "good.txt" {
            assert_error(st, &v, 409, "file_conflict");
        } else {
            assert_error(st, &v, 400, "invalid_file");
        }
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        assert_eq!(v["error"]["param"].as_str().map(|p| p.starts_with("files[1]")), Some(true), "{v}");
    }
    let d = s.exec("import os\nprint(sorted(os.listdir('.')))", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "['adir']\n", "nothing may have been written");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_never_follows_a_symlink_planted_by_code() {
    let s = start(&[]);
    let outside = tempfile::tempdir().unwrap();
    let code = format!(
        "import os\nos.symlink({:?}, 'escape')\nos.symlink({:?}, 'victim')",
        outside.path(),
        outside.path().join("f")
    );
    let id = s.exec(&code, None).await["session_id"].as_str().unwrap().to_string();
    for name in ["escape/pwned.txt", "victim"] {
        let (st, v) = s
            .post(
                "/tci/execute",
                Some(KEY),
                json!({"code": "1", "session_id": id, "files": [{"name": name, "encoding": "string", "content": "x"}]}),
            )
            .await;
        assert_error(st, &v, 409, "file_conflict");
        assert!(v["errors"][0]["message"].as_str().unwrap().contains("symbolic link"), "{v}");
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_over_its_session_limit_gets_429() {
    let s = start(&["--max-sessions-per-key", "2"]);
    s.exec("1", None).await;
    s.exec("1", None).await;
    let (st, v) = s.post("/tci/execute", Some(KEY), json!({"code": "1"})).await;
    assert_error(st, &v, 429, "too_many_sessions");
    // Another key is not affected.
    let (st, _) = s.post("/tci/execute", Some(OTHER_KEY), json!({"code": "1"})).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_at_its_session_limit_answers_503_and_recovers() {
    let s = start(&["--max-sessions", "2", "--session-ttl", "3s"]);
    s.exec("1", None).await;
    s.exec("1", None).await;
    let (st, v) = s.post("/tci/execute", Some(OTHER_KEY), json!({"code": "1"})).await;
    assert_error(st, &v, 503, "no_capacity");
    // Once the sessions expire there is room again.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let (st, v) = s.post("/tci/execute", Some(OTHER_KEY), json!({"code": "1"})).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_without_a_key_once_sessions_can_be_served() {
    let s = start(&[]);
    let (st, v) = s.raw(Method::GET, "/healthz", None, vec![]).await;
    assert_eq!(st, 200);
    assert_eq!(v, json!({"status": "ok"}));
}
