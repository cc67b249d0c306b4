//! A key's own limit of executions at once (`kiln keys create
//! --max-executions-per-key`, `"max_executions_per_key"` in
//! `POST /v1/admin/keys`), against a real server: it is stored, listed and
//! applied (below and above the server's default, and by every node that
//! shares the key's database), its queue scales with it, keys on the
//! default are not affected, and bad limits are refused with the field
//! named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, start_in, KEY};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Each execution prints when it started and ended (the kernels share the
/// host's clock), so the test can count how many ran at once.
const SLEEPER: &str = "import time\nt0 = time.time()\ntime.sleep(2.5)\nprint(t0, time.time())";

/// One call's HTTP status, error code, and the (start, end) its code printed.
type Answer = (u16, String, Option<(f64, f64)>);

async fn create_key(s: &common::Server, body: Value) -> (u16, Value) {
    s.post("/v1/admin/keys", Some(KEY), body).await
}

/// One session of `key`, started and ready.
async fn session(s: &common::Server, key: &str) -> String {
    let (status, v) = s.post("/v1/tci/execute", Some(key), json!({"code": "1"})).await;
    assert_eq!(status, 200, "{v}");
    v["data"]["session_id"].as_str().unwrap().to_string()
}

/// `n` sessions of `key`, a key made elsewhere (the CLI, another node):
/// the first once the server has read it from the store (within seconds).
async fn sessions_once_known(s: &common::Server, key: &str, n: usize, what: &str) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..50 {
        let (status, v) = s.post("/v1/tci/execute", Some(key), json!({"code": "1"})).await;
        if status == 200 {
            out.push(v["data"]["session_id"].as_str().unwrap().to_string());
            break;
        }
        assert_eq!(status, 401, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(out.len(), 1, "{what}");
    while out.len() < n {
        out.push(session(s, key).await);
    }
    out
}

/// `SLEEPER` in each of `sessions` at once with `key`: per call, the HTTP
/// status, the error code, and the (start, end) the code printed.
async fn sleep_in(s: &Arc<common::Server>, key: &str, sessions: &[String]) -> Vec<Answer> {
    let calls: Vec<_> = sessions
        .iter()
        .map(|id| {
            let (s, key, id) = (s.clone(), key.to_string(), id.clone());
            tokio::spawn(async move {
                let (status, v) =
                    s.post("/v1/tci/execute", Some(&key), json!({"code": SLEEPER, "session_id": id})).await;
                let code = v["error"]["code"].as_str().unwrap_or("").to_string();
                let span = (status == 200).then(|| {
                    let out = common::text_of(&v["data"], "stdout");
                    let mut t = out.split_whitespace().map(|x| x.parse::<f64>().unwrap());
                    (t.next().unwrap(), t.next().unwrap())
                });
                (status, code, span)
            })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.unwrap());
    }
    out
}

/// The most of `spans` that ran at one moment.
fn most_at_once(spans: &[(f64, f64)]) -> usize {
    spans.iter().map(|&(start, _)| spans.iter().filter(|&&(s, e)| s <= start && start < e).count()).max().unwrap_or(0)
}

fn spans(answers: &[Answer]) -> Vec<(f64, f64)> {
    answers.iter().filter_map(|a| a.2).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_limited_to_one_is_refused_past_its_queue_while_a_key_on_the_default_is_not() {
    // The default: 4 at once, 4 waiting. A key of its own 1 at once may
    // queue 1 (in proportion).
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let s = Arc::new(start_in(
        data,
        &["--max-executions-per-key", "4", "--execution-queue-per-key", "4", "--api-key", KEY],
        false,
    ));
    // Made with the CLI, on the store the running server reads.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["keys", "create", "--label", "one-at-a-time", "--max-executions-per-key", "1"])
        .env("KILN_DATA_DIR", &dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let small = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let small_sessions = sessions_once_known(&s, &small, 4, "the CLI's key reached the server").await;
    let mut default_sessions = Vec::new();
    for _ in 0..4 {
        default_sessions.push(session(&s, KEY).await);
    }
    // Both keys at once: the small key's four, the default key's four.
    let (small_answers, default_answers) =
        tokio::join!(sleep_in(&s, &small, &small_sessions), sleep_in(&s, KEY, &default_sessions));
    let refused: Vec<_> = small_answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!(refused.len(), 2, "one runs, one waits, two are refused: {small_answers:?}");
    assert!(refused.iter().all(|a| a.1 == "rate_limited"), "{small_answers:?}");
    assert_eq!(most_at_once(&spans(&small_answers)), 1, "{small_answers:?}");
    assert!(default_answers.iter().all(|a| a.0 == 200), "the default key is unaffected: {default_answers:?}");
    assert_eq!(most_at_once(&spans(&default_answers)), 4, "{default_answers:?}");
    // The listing shows both: the CLI's limit and the server's default.
    let listed = common::listed_keys(&dir);
    let limits: Vec<Value> = listed.as_array().unwrap().iter().map(|k| k["max_executions_per_key"].clone()).collect();
    assert_eq!(limits, vec![Value::Null, json!(1)], "{listed}");
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["keys", "list"])
        .env("KILN_DATA_DIR", &dir)
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("MAX EXECUTIONS"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_allowed_more_than_the_default_runs_more_at_once() {
    let s = Arc::new(start(&["--max-executions-per-key", "1", "--execution-queue-per-key", "8"]));
    let (status, created) = create_key(&s, json!({"label": "wide", "max_executions_per_key": 3})).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["data"]["record"]["max_executions_per_key"], json!(3));
    let wide = created["data"]["key"].as_str().unwrap().to_string();
    let (_, listed) = s.raw(reqwest::Method::GET, "/v1/admin/keys", Some(KEY), Vec::new()).await;
    let limits: Vec<Value> =
        listed["data"]["keys"].as_array().unwrap().iter().map(|k| k["max_executions_per_key"].clone()).collect();
    assert_eq!(limits, vec![Value::Null, Value::Null, json!(3)], "{listed}");
    let mut wide_sessions = Vec::new();
    let mut default_sessions = Vec::new();
    for _ in 0..3 {
        wide_sessions.push(session(&s, &wide).await);
        default_sessions.push(session(&s, KEY).await);
    }
    let wide_answers = sleep_in(&s, &wide, &wide_sessions).await;
    let default_answers = sleep_in(&s, KEY, &default_sessions).await;
    assert!(wide_answers.iter().chain(&default_answers).all(|a| a.0 == 200), "{wide_answers:?} {default_answers:?}");
    assert_eq!(most_at_once(&spans(&wide_answers)), 3, "{wide_answers:?}");
    assert_eq!(most_at_once(&spans(&default_answers)), 1, "{default_answers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limit_of_zero_or_not_a_whole_number_is_refused_naming_the_field() {
    let s = start(&[]);
    for bad in [json!(0), json!(-1), json!(2.5), json!("4"), json!(true), json!(100_001)] {
        let (status, v) = create_key(&s, json!({"max_executions_per_key": bad})).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["error"]["code"], json!("invalid_request"), "{v}");
        assert_eq!(v["error"]["param"], json!("max_executions_per_key"), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("whole number from 1 to 100000"), "{v}");
    }
    let (_, listed) = s.raw(reqwest::Method::GET, "/v1/admin/keys", Some(KEY), Vec::new()).await;
    assert_eq!(listed["data"]["keys"].as_array().unwrap().len(), 2, "nothing was created: {listed}");
    // null is the server's default.
    let (status, v) = create_key(&s, json!({"max_executions_per_key": null})).await;
    assert_eq!((status, &v["data"]["record"]["max_executions_per_key"]), (200, &Value::Null), "{v}");
    // The OpenAPI document says so.
    let (_, doc) = s.raw(reqwest::Method::GET, "/openapi.json", None, Vec::new()).await;
    let field = &doc["components"]["schemas"]["CreateKey"]["properties"]["max_executions_per_key"];
    assert_eq!((&field["minimum"], &field["maximum"]), (&json!(1), &json!(100_000)), "{field}");
    assert!(doc["components"]["schemas"]["KeyInfo"]["properties"]["max_executions_per_key"].is_object());
    // And the CLI.
    for bad in ["0", "four", "-3"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["keys", "create", &format!("--max-executions-per-key={bad}")])
            .env("KILN_DATA_DIR", s.data.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--max-executions-per-key"), "{bad}: {err}");
        assert!(out.stdout.is_empty(), "no key was printed for {bad}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_s_own_limit_is_applied_by_every_node_sharing_its_database() {
    let pg = kiln_testpg::PgServer::start();
    let url = pg.url();
    let flags = ["--max-executions-per-key", "2", "--execution-queue-per-key", "2"];
    let a = start(&[&["--database", &url, "--node-id", "node-a"][..], &flags].concat());
    let b = Arc::new(start(&[&["--database", &url, "--node-id", "node-b"][..], &flags].concat()));
    // Created on node-a: one at a time, one waiting.
    let (status, created) = create_key(&a, json!({"label": "narrow", "max_executions_per_key": 1})).await;
    assert_eq!(status, 200, "{created}");
    let narrow = created["data"]["key"].as_str().unwrap().to_string();
    // node-b reads the key's row within seconds, and its limit with it.
    let sessions = sessions_once_known(&b, &narrow, 4, "node-b learned the key").await;
    let answers = sleep_in(&b, &narrow, &sessions).await;
    assert_eq!(answers.iter().filter(|a| a.0 == 429).count(), 2, "{answers:?}");
    assert_eq!(most_at_once(&spans(&answers)), 1, "{answers:?}");
    let (_, listed) = b.raw(reqwest::Method::GET, "/v1/admin/keys", Some(KEY), Vec::new()).await;
    let on_b: Vec<Value> =
        listed["data"]["keys"].as_array().unwrap().iter().map(|k| k["max_executions_per_key"].clone()).collect();
    assert!(on_b.contains(&json!(1)), "{listed}");
}
