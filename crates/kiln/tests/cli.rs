//! The `kiln` command line against a real server: exec, sessions, keys,
//! usage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, KEY};
use serde_json::{json, Value};
use std::process::{Command, Output, Stdio};

fn kiln(args: &[&str], url: &str, data: &std::path::Path, stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .env("KILN_URL", url)
        .env("KILN_API_KEY", KEY)
        .env("KILN_DATA_DIR", data)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_prints_like_a_notebook_saves_images_and_fails_when_code_raises() {
    let s = start(&[]);
    let (url, data) = (s.url.clone(), s.data.path().to_path_buf());
    let out_dir = tempfile::tempdir().unwrap();
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "print('from a file')").unwrap();
    let out_path = out_dir.path().to_str().unwrap().to_string();
    let file_arg = format!("s.py={}", script.path().display());
    let out = tokio::task::spawn_blocking(move || {
        let first = kiln(
            &[
                "exec",
                "--file",
                &file_arg,
                "--out-dir",
                &out_path,
                "!python s.py\nimport matplotlib.pyplot as plt\nplt.plot([1, 2]);\nx = 41",
            ],
            &url,
            &data,
            None,
        );
        let session = text(&first.stderr).split_whitespace().nth(1).unwrap_or_default().to_string();
        let second = kiln(&["exec", "--session", &session, "-"], &url, &data, Some("x + 1"));
        let failing = kiln(&["exec", "--session", &session, "1/0"], &url, &data, None);
        let bad = kiln(&["exec", "--session", "ses_nope", "1"], &url, &data, None);
        let big = "big = bytearray(400 * 2**20)";
        let limited = kiln(&["exec", "--session", &session, "--memory-limit", "128MiB", big], &url, &data, None);
        let unlimited = kiln(&["exec", "--session", &session, big], &url, &data, None);
        (first, second, failing, bad, limited, unlimited)
    })
    .await
    .unwrap();
    let (first, second, failing, bad, limited, unlimited) = out;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let stdout = text(&first.stdout);
    assert!(stdout.contains("from a file") && stdout.contains("[image/png saved to "), "{stdout}");
    let png = std::fs::read_dir(out_dir.path()).unwrap().flatten().next().unwrap().path();
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    assert_eq!(text(&second.stdout), "42\n");
    assert_eq!(failing.status.code(), Some(1));
    assert!(text(&failing.stderr).contains("ZeroDivisionError"));
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("session_not_found"), "{}", text(&bad.stderr));
    assert_eq!(limited.status.code(), Some(1));
    assert!(text(&limited.stderr).contains("MemoryError") && text(&limited.stderr).contains("128 MiB"));
    assert!(unlimited.status.success(), "{}", text(&unlimited.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_listed_and_ended_from_the_command_line() {
    let s = start(&[]);
    let id = s.exec("1", None).await["session_id"].as_str().unwrap().to_string();
    let (url, data) = (s.url.clone(), s.data.path().to_path_buf());
    let id2 = id.clone();
    let (ls, table, rm) = tokio::task::spawn_blocking(move || {
        (
            kiln(&["sessions", "ls", "--json"], &url, &data, None),
            kiln(&["sessions", "ls"], &url, &data, None),
            kiln(&["sessions", "rm", &id2], &url, &data, None),
        )
    })
    .await
    .unwrap();
    let listed: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(listed[0]["id"], json!(id));
    assert!(text(&table.stdout).starts_with("ID") && text(&table.stdout).contains(&id));
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(s.sessions(KEY).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_made_with_the_cli_work_at_once_with_their_limits_and_can_be_revoked() {
    let s = start(&[]);
    let (url, data) = (s.url.clone(), s.data.path().to_path_buf());
    let (u, d) = (url.clone(), data.clone());
    let created = tokio::task::spawn_blocking(move || {
        kiln(&["keys", "create", "--label", "ci", "--max-sessions", "1", "--network", "none"], &u, &d, None)
    })
    .await
    .unwrap();
    assert!(created.status.success(), "{}", text(&created.stderr));
    let new_key = text(&created.stdout).trim().to_string();
    assert!(new_key.starts_with("kiln_"));
    // Picked up by the running server within seconds.
    let mut status = 0;
    for _ in 0..50 {
        status = s
            .post("/tci/execute", Some(&new_key), json!({"code": "import os; print(os.environ['KILN_NETWORK'])"}))
            .await
            .0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(s.sessions(&new_key).await.len(), 1);
    let (st, v) = s.post("/tci/execute", Some(&new_key), json!({"code": "1"})).await;
    assert_eq!((st, v["errors"][0]["code"].clone()), (429, json!("too_many_sessions")), "its own limit of 1");
    let d2 = data.clone();
    let list = tokio::task::spawn_blocking(move || kiln(&["keys", "list", "--json"], &url, &d2, None)).await.unwrap();
    let keys: Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = keys.as_array().unwrap().iter().find(|k| k["label"] == "ci").unwrap()["id"].as_str().unwrap().to_string();
    let u = s.url.clone();
    let revoked = tokio::task::spawn_blocking(move || kiln(&["keys", "revoke", &id], &u, &data, None)).await.unwrap();
    assert!(revoked.status.success());
    let mut refused = false;
    for _ in 0..50 {
        if s.raw(reqwest::Method::GET, "/tci/sessions", Some(&new_key), vec![]).await.0 == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(refused, "a revoked key kept working");
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_is_accounted_per_key_and_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut s = common::start_in(data, &["--api-key", KEY, "--api-key", common::OTHER_KEY], false);
    // 32 MiB written: the peak memory recorded must see it.
    let cell = "x = sum(i * i for i in range(4_000_000)); b = bytes(range(256)) * (1 << 17)";
    let id = s.exec(cell, None).await["session_id"].as_str().unwrap().to_string();
    s.exec("print(x)", Some(&id)).await;
    s.exec("1", None).await;
    let (st, v) = s.raw(reqwest::Method::GET, "/v1/tci/usage", Some(KEY), vec![]).await;
    assert_eq!(st, 200, "{v}");
    let u = &v["data"];
    assert_eq!((u["sessions_started"].clone(), u["executions"].clone()), (json!(2), json!(3)), "{v}");
    assert!(u["cpu_seconds"].as_f64().unwrap() > 0.1, "{v}");
    assert!(u["execution_seconds"].as_f64().unwrap() > 0.1, "{v}");
    assert!(u["peak_memory_bytes"].as_u64().unwrap() > 32 << 20, "{v}");
    let (_, other) = s.raw(reqwest::Method::GET, "/v1/tci/usage", Some(common::OTHER_KEY), vec![]).await;
    assert_eq!(other["data"]["sessions_started"], 0);
    assert!(s.stop().success());
    let path = s.data.path().to_path_buf();
    let out =
        tokio::task::spawn_blocking(move || kiln(&["usage", "--json"], "http://unused", &path, None)).await.unwrap();
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["sessions_started"], 2);
    assert_eq!(all[0]["executions"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_prints_outputs_as_they_arrive() {
    let s = start(&[]);
    let (url, data) = (s.url.clone(), s.data.path().to_path_buf());
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["exec", "import time\nprint('first')\ntime.sleep(2)\nprint('second')"])
            .env("KILN_URL", url)
            .env("KILN_API_KEY", KEY)
            .env("KILN_DATA_DIR", data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let lines: Vec<(String, std::time::Instant)> =
            out.lines().map(|l| (l.unwrap(), std::time::Instant::now())).collect();
        assert!(child.wait().unwrap().success());
        lines
    })
    .await
    .unwrap();
    assert_eq!(lines.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(), ["first", "second"]);
    let gap = lines[1].1.duration_since(lines[0].1);
    assert!(gap >= std::time::Duration::from_secs(1), "'first' was printed only with 'second' ({gap:?} apart)");
}

#[test]
fn a_value_outside_a_flags_choices_is_refused_with_the_choices_named() {
    let data = tempfile::tempdir().unwrap();
    for (flag, bad, valid) in [
        ("--sandbox", "bogus", "namespaces"),
        ("--kernel", "jupyter", "ipykernel"),
        ("--zygote", "maybe", "off"),
        ("--profile", "huge", "minimal"),
        ("--log-format", "xml", "json"),
        ("--network", "everything", "pypi"),
    ] {
        let out = kiln(&["serve", flag, bad], "http://127.0.0.1:9", data.path(), None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {bad}: {err}");
        assert!(err.contains(bad) && err.contains(valid), "{flag} {bad}: {err}");
    }
    // The config file is held to the same names.
    let config = data.path().join("config.toml");
    std::fs::write(&config, "sandbox = \"bogus\"\n").unwrap();
    let out = kiln(&["serve", "--config", config.to_str().unwrap()], "http://127.0.0.1:9", data.path(), None);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("bogus") && err.contains("namespaces"), "{err}");
}

#[test]
fn warnings_found_while_reading_the_configuration_reach_the_log() {
    // A kiln binary with no sandbox library beside it warns that kernels
    // start without the zygote; the start then fails on purpose, early
    // (a database URL asking for TLS), once logging is set up.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &bin).unwrap();
    let out = Command::new(&bin)
        .args(["serve", "--sandbox", "none", "--database", "postgres://kiln@127.0.0.1:9/kiln?sslmode=require"])
        .env("KILN_DATA_DIR", dir.path().join("data"))
        .env_remove("KILN_API_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("WARN") && err.contains("no sandbox library beside the kiln binary"), "{err}");
}
