//! `kiln serve --database postgres://…` against a real PostgreSQL that the
//! test starts (kiln-testpg): a database restart while kiln serves, keys
//! managed from the command line on the shared database, usage that adds
//! up across two nodes, one of them SIGKILLed, and `kiln nodes` showing a
//! cluster's nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, start_in, KEY};
use kiln_testpg::PgServer;
use serde_json::{json, Value};
use std::process::Output;
use std::time::{Duration, Instant};

/// A request whose status, Retry-After header and body the test looks at.
async fn send(s: &common::Server, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> Reply {
    let mut req = s.http.request(method, format!("{}{path}", s.url)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let began = Instant::now();
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_string());
    let body: Value = resp.json().await.expect("JSON body");
    Reply { status, retry_after, body, took: began.elapsed() }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
    took: Duration,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["errors"][0]["code"].as_str().unwrap_or_default()
    }
}

fn execute(code: &str, session: Option<&str>) -> Option<Value> {
    let mut body = json!({"language": "python", "code": code});
    if let Some(id) = session {
        body["session_id"] = json!(id);
    }
    Some(body)
}

/// Run the `kiln` binary (an operator's command).
fn kiln(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_DATA_DIR")
        .output()
        .expect("run kiln")
}

async fn kiln_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_gives_store_unavailable_meanwhile_and_kiln_recovers_by_itself() {
    let mut pg = PgServer::start();
    eprintln!("postgres started in {:?}", pg.started_in());
    let url = pg.url();
    let s = start(&["--database", &url, "--node-id", "node-a"]);
    let before = s.exec("x = 41", None).await["session_id"].as_str().unwrap().to_string();

    pg.stop();
    // Everything that needs the database says so, quickly and retryably.
    let new_session = send(&s, reqwest::Method::POST, "/tci/execute", KEY, execute("1", None)).await;
    let list = send(&s, reqwest::Method::GET, "/v1/tci/sessions", KEY, None).await;
    let usage = send(&s, reqwest::Method::GET, "/v1/tci/usage", KEY, None).await;
    for r in [&new_session, &list, &usage] {
        assert_eq!((r.status, r.code()), (503, "store_unavailable"), "{r:?}");
        assert_eq!(r.retry_after.as_deref(), Some("2"), "{r:?}");
        assert!(r.took < Duration::from_secs(10), "bounded by the store's time limit: {r:?}");
        let msg = r.body["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("not an error of your code"), "{msg}");
    }
    // A live session does not need the database to run code; its usage is
    // written when the database is back.
    let live = send(&s, reqwest::Method::POST, "/tci/execute", KEY, execute("print(x + 1)", Some(&before))).await;
    assert_eq!((live.status, common::text_of(&live.body["data"], "stdout").as_str()), (200, "42\n"), "{live:?}");

    pg.start_again();
    // kiln was not restarted: it reconnects on its own.
    let deadline = Instant::now() + Duration::from_secs(20);
    let recovered = loop {
        let r = send(&s, reqwest::Method::POST, "/tci/execute", KEY, execute("print('back')", None)).await;
        assert!(r.status == 200 || r.code() == "store_unavailable", "only store_unavailable meanwhile: {r:?}");
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(recovered.status, 200, "{recovered:?}");
    assert_eq!(common::text_of(&recovered.body["data"], "stdout"), "back\n");
    let ids: Vec<String> = s.sessions(KEY).await.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    assert!(ids.contains(&before), "the session from before the restart is still listed: {ids:?}");
    assert_eq!(common::text_of(&s.exec("print(x)", Some(&before)).await, "stdout"), "41\n", "and keeps its state");
    // Every execution that was answered is counted, the one during the
    // outage included; the refused ones are not.
    let deadline = Instant::now() + Duration::from_secs(10);
    let executions = loop {
        let u = send(&s, reqwest::Method::GET, "/v1/tci/usage", KEY, None).await;
        let n = u.body["data"]["executions"].as_u64();
        if n == Some(4) || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(executions, Some(4));
}

/// Create a key with the CLI; it works on the running server within 2 s,
/// is listed with its origin, and a revocation applies within 2 s too.
async fn cli_keys_apply_to_a_running_server(s: &common::Server, store_args: Vec<String>) {
    let with = |args: &[&str]| args.iter().map(|a| a.to_string()).chain(store_args.clone()).collect::<Vec<_>>();
    // `configured` is only a name: the key is a created one and works.
    let created = kiln_async(with(&["keys", "create", "--label", "configured", "--network", "none"])).await;
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let key = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let began = Instant::now();
    let accepted = loop {
        let r = send(s, reqwest::Method::GET, "/v1/tci/sessions", &key, None).await;
        if r.status == 200 || began.elapsed() > Duration::from_secs(5) {
            break began.elapsed();
        }
        assert_eq!(r.status, 401, "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(accepted < Duration::from_secs(2), "a new key took {accepted:?} to apply");
    let r = send(
        s,
        reqwest::Method::POST,
        "/tci/execute",
        &key,
        execute("import os; print(os.environ['KILN_NETWORK'])", None),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(common::text_of(&r.body["data"], "stdout"), "none\n", "its typed policy applies");

    let listed = kiln_async(with(&["keys", "list", "--json"])).await;
    let keys: Value = serde_json::from_slice(&listed.stdout).expect("keys list --json");
    // The server's own --api-key keys are listed as configured too; the
    // created one is told apart by its origin, not its label.
    let labelled: Vec<&Value> = keys.as_array().unwrap().iter().filter(|k| k["label"] == "configured").collect();
    let mine = labelled.iter().find(|k| k["origin"] == "created").expect("listed as created").to_owned().clone();
    assert_eq!(mine["network"], json!("none"), "{mine}");
    assert!(labelled.iter().any(|k| k["origin"] == "configured"), "the server's own keys: {labelled:?}");
    let id = mine["id"].as_str().unwrap();
    let revoked = kiln_async(with(&["keys", "revoke", id])).await;
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    let began = Instant::now();
    let refused = loop {
        let r = send(s, reqwest::Method::GET, "/v1/tci/sessions", &key, None).await;
        if r.status == 401 || began.elapsed() > Duration::from_secs(5) {
            break began.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(refused < Duration::from_secs(2), "a revoked key kept working for {refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_made_with_the_cli_on_a_shared_postgres_apply_to_a_running_server() {
    let pg = PgServer::start();
    let url = pg.url();
    let s = start(&["--database", &url]);
    cli_keys_apply_to_a_running_server(&s, vec!["--database".into(), url]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_labelled_configured_is_an_ordinary_key_on_sqlite_too() {
    let s = start(&[]);
    let data = s.data.path().display().to_string();
    cli_keys_apply_to_a_running_server(&s, vec!["--data-dir".into(), data]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_adds_up_across_nodes_and_a_killed_node_loses_nothing_it_answered() {
    let pg = PgServer::start();
    let url = pg.url();
    let mut a = start(&["--database", &url, "--node-id", "node-a"]);
    let b = start(&["--database", &url, "--node-id", "node-b"]);
    let on_a = a.exec("n = 1", None).await["session_id"].as_str().unwrap().to_string();
    a.exec("n += 1", Some(&on_a)).await;
    let on_b = b.exec("m = 10", None).await["session_id"].as_str().unwrap().to_string();
    b.exec("m += 1", Some(&on_b)).await;
    // The last answer node-a gives, then SIGKILL.
    a.exec("n += 1", Some(&on_a)).await;
    a.crash();

    // node-b sees both nodes' usage: 2 sessions, 5 executions.
    let usage = send(&b, reqwest::Method::GET, "/v1/tci/usage", KEY, None).await;
    assert_eq!(usage.status, 200, "{usage:?}");
    let u = &usage.body["data"];
    assert_eq!((u["sessions_started"].clone(), u["executions"].clone()), (json!(2), json!(5)), "{u}");
    assert!(u["execution_seconds"].as_f64().unwrap() > 0.0, "{u}");

    // node-a comes back under its name: it ends its own lost session, not
    // node-b's.
    let data = std::mem::replace(&mut a.data, tempfile::tempdir().unwrap());
    let a2 = start_in(data, &["--database", &url, "--node-id", "node-a"], true);
    let ids: Vec<String> = a2.sessions(KEY).await.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, vec![on_b.clone()], "only node-b's session is live");
    assert_eq!(common::text_of(&b.exec("print(m)", Some(&on_b)).await, "stdout"), "11\n");

    // The operator's view of the shared database adds up the same.
    let out = kiln_async(vec!["usage".into(), "--json".into(), "--database".into(), url.clone()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = all.as_array().unwrap().iter().map(|k| k["executions"].as_u64().unwrap()).sum();
    assert_eq!(total, 6, "{all}");
}

/// `kiln nodes --json --database ...`, parsed.
async fn nodes_json(db: &str) -> Vec<Value> {
    let out = kiln_async(vec!["nodes".into(), "--json".into(), "--database".into(), db.into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn row<'a>(nodes: &'a [Value], id: &str) -> &'a Value {
    nodes.iter().find(|n| n["id"] == id).unwrap_or_else(|| panic!("no {id} in {nodes:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_nodes_shows_each_node_its_sessions_and_a_stopped_one_as_gone() {
    let pg = PgServer::start();
    let db = pg.url();
    let mut a = common::cluster::solo_named(&db, "3s", "node-a");
    let b = common::cluster::solo_named(&db, "3s", "node-b");

    // Both serving once their pools have a kernel, at their addresses.
    let began = Instant::now();
    let nodes = loop {
        let nodes = nodes_json(&db).await;
        if nodes.len() == 2 && nodes.iter().all(|n| n["state"] == "serving" && n["ready_kernels"].as_u64() >= Some(1)) {
            break nodes;
        }
        assert!(began.elapsed() < Duration::from_secs(30), "not both serving: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(nodes[0]["id"], "node-a", "sorted by id: {nodes:?}");
    assert_eq!(row(&nodes, "node-b")["advertise"], b.url.as_str());
    assert!(row(&nodes, "node-a")["max_sessions"].as_u64() > Some(0), "{nodes:?}");
    assert!(row(&nodes, "node-a")["memory_available_bytes"].as_u64() > Some(1 << 20), "{nodes:?}");

    // A session on node-a is in its row (published on change, not at the
    // next renewal), and in the table an operator reads.
    common::cluster::session_on(&a, "node-a", "x = 1").await;
    let began = Instant::now();
    while row(&nodes_json(&db).await, "node-a")["live_sessions"] != 1 {
        assert!(began.elapsed() < Duration::from_secs(10), "the session never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = kiln_async(vec!["nodes".into(), "--database".into(), db.clone()]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NODE") && lines[0].contains("SESSIONS"), "{table}");
    assert!(lines[1].starts_with("node-a") && lines[1].contains(" serving ") && lines[1].contains(" 1 of "), "{table}");
    assert!(lines[2].starts_with("node-b") && lines[2].contains(&b.url), "{table}");

    // The admin API of either node says the same (from its cached table,
    // at most a second old), for admin keys only.
    let began = Instant::now();
    let listed = loop {
        let r = send(&b, reqwest::Method::GET, "/v1/admin/nodes", KEY, None).await;
        assert_eq!(r.status, 200, "{r:?}");
        if r.body["data"]["nodes"].as_array().is_some_and(|n| n.len() == 2 && row(n, "node-a")["live_sessions"] == 1) {
            break r.body["data"].clone();
        }
        assert!(began.elapsed() < Duration::from_secs(10), "node-b never listed both: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(listed["this_node"], "node-b");
    let api: Vec<_> =
        listed["nodes"].as_array().unwrap().iter().map(|n| (n["id"].clone(), n["state"].clone())).collect();
    assert_eq!(api, [(json!("node-a"), json!("serving")), (json!("node-b"), json!("serving"))]);
    assert_eq!(send(&b, reqwest::Method::GET, "/v1/admin/nodes", common::OTHER_KEY, None).await.status, 403);

    // node-a stops: its lease ends with it, and it is gone at once.
    assert!(a.stop().success());
    let nodes = nodes_json(&db).await;
    assert_eq!(row(&nodes, "node-a")["state"], "gone", "{nodes:?}");
    assert_eq!(row(&nodes, "node-b")["state"], "serving", "{nodes:?}");
}

#[test]
fn kiln_nodes_on_a_database_no_node_registered_in_says_so() {
    let pg = PgServer::start();
    let out = kiln(&["nodes", "--database", &pg.url()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no nodes"), "{}", String::from_utf8_lossy(&out.stderr));
}
