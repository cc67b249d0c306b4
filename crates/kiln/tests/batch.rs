//! `POST /v1/tci/batch` against a real server: every status an item can
//! have (kiln's own failure only after a retry), tests scored by kiln that
//! hostile candidates cannot fake, NDJSON that does not wait for the
//! slowest item, a whole batch refused before anything runs, and a client
//! that goes away taking its batch with it. Also `memory_limit` on execute.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, start_with_env, KEY};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn batch(s: &common::Server, items: Value) -> Vec<Value> {
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
    assert_eq!(status, 200, "{v}");
    let results = v["data"]["results"].as_array().unwrap().clone();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], json!(i), "results come in item order: {v}");
    }
    results
}

fn passed(r: &Value) -> Vec<bool> {
    r["tests"].as_array().unwrap().iter().map(|t| t["passed"].as_bool().unwrap()).collect()
}

fn statuses(r: &Value) -> Vec<String> {
    r["tests"].as_array().unwrap().iter().map(|t| t["status"].as_str().unwrap().to_string()).collect()
}

async fn live_sessions(s: &common::Server) -> usize {
    s.sessions(KEY).await.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn tests_whose_limits_add_up_past_the_server_s_longest_execution_still_run() {
    // Three program tests of 3 s, and two assertions, on a server whose
    // longest execution is 3 s: their runner cell must not ask for more.
    let s = start(&["--exec-timeout", "3s", "--max-exec-timeout", "3s"]);
    let programs: Vec<Value> = ["a", "b", "c"].iter().map(|x| json!({"stdin": x, "expected_stdout": x})).collect();
    let r = batch(
        &s,
        json!([
            {"code": "print(input())", "tests": programs, "tests_timeout": 3},
            {"code": "x = 1", "tests": [{"code": "assert x == 1"}, {"code": "assert x == 1"}], "tests_timeout": 3},
        ]),
    )
    .await;
    for item in &r {
        assert_eq!((item["status"].as_str(), item["failed"].as_u64()), (Some("success"), Some(0)), "{item}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_status_says_what_the_code_did() {
    let s = start(&[]);
    let r = batch(
        &s,
        json!([
            {"code": "print('ok')"},
            {"code": "1/0"},
            {"code": "import time\ntime.sleep(30)", "timeout": 1},
            {"code": "b = bytearray(400 * 2**20)\nprint(len(b))", "memory_limit": "128MiB"},
            {"code": "x = 1", "keep_session": true},
        ]),
    )
    .await;
    let got: Vec<&str> = r.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(got, ["success", "error", "timeout", "memory_exceeded", "success"], "{r:?}");
    assert_eq!(r[0]["outputs"], json!([{"type": "stdout", "data": "ok\n"}]));
    assert!(r[1]["outputs"][0]["data"].as_str().unwrap().contains("ZeroDivisionError"));
    assert!(r[3]["outputs"][0]["data"].as_str().unwrap().contains("MemoryError"), "{}", r[3]);
    // Fresh sessions end with their item; a kept one lives on, reusable.
    assert!(r[..4].iter().all(|r| r.get("session_id").is_none()));
    let kept = r[4]["session_id"].as_str().unwrap().to_string();
    assert_eq!(s.sessions(KEY).await.iter().map(|v| v["id"].as_str().unwrap()).collect::<Vec<_>>(), [&kept]);
    let again = batch(&s, json!([{"code": "print(x + 1)", "session_id": kept}])).await;
    assert_eq!(again[0]["outputs"], json!([{"type": "stdout", "data": "2\n"}]));
    assert_eq!(again[0]["session_id"], json!(kept));
    // Each item is counted by its status, for an operator's dashboard.
    let items = |status: &str| format!("kiln_batch_items_total{{status=\"{status}\"}}");
    let text = s.metrics().await;
    let counts =
        ["success", "error", "timeout", "memory_exceeded", "infra_error"].map(|st| common::metric(&text, &items(st)));
    assert_eq!(counts, [Some(3.0), Some(1.0), Some(1.0), Some(1.0), None], "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_s_own_failure_is_retried_once_and_never_reported_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("fail-boots");
    let s = start_with_env(&[], &[("KILN_TEST_FAIL_BOOTS", hook.to_str().unwrap())]);
    let item = json!([{"code": "print(6 * 7)", "tests": [{"code": "assert 6 * 7 == 42"}]}]);
    // One failed start: the retry on another kernel runs the item.
    std::fs::write(&hook, "1").unwrap();
    let r = batch(&s, item.clone()).await;
    assert_eq!((r[0]["status"].as_str(), passed(&r[0])), (Some("success"), vec![true]), "{r:?}");
    assert_eq!(std::fs::read_to_string(&hook).unwrap(), "0");
    // Two: the item is kiln's failure, said so, and no test is scored.
    std::fs::write(&hook, "2").unwrap();
    let r = batch(&s, item.clone()).await;
    assert_eq!(r[0]["status"], json!("infra_error"), "{r:?}");
    assert!(r[0]["outputs"][0]["data"].as_str().unwrap().contains("not an error of the code"));
    assert!(r[0].get("tests").is_none() && r[0].get("passed").is_none());
    assert_eq!(std::fs::read_to_string(&hook).unwrap(), "0");
    assert_eq!(live_sessions(&s).await, 0);
    // And the server is fine afterwards.
    assert_eq!(batch(&s, item).await[0]["status"], json!("success"));
    // kiln's failure is counted where an operator can alert on it.
    let text = s.metrics().await;
    let counted = ["kiln_batch_items_total{status=\"infra_error\"}", "kiln_batch_items_total{status=\"success\"}"]
        .map(|m| common::metric(&text, m));
    assert_eq!(counted, [Some(1.0), Some(2.0)], "{text}");
    assert_eq!(common::metric(&text, "kiln_batch_tests_total{result=\"passed\"}"), Some(2.0), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn program_tests_are_scored_by_kiln_and_hostile_candidates_cannot_fake_a_pass() {
    let s = start(&[]);
    let tests = json!([{"stdin": "2\n", "expected_stdout": "4\n"}, {"stdin": "5\n", "expected_stdout": "10"}]);
    let item = |code: &str| json!({"code": code, "tests": tests});
    let r = batch(
        &s,
        json!([
            // Right (trailing whitespace does not matter).
            item("n = int(input())\nprint(n * 2, '  ')\nprint()"),
            // Prints the right answer, then raises.
            item("print(int(input()) * 2)\nraise SystemExit(3)"),
            item("print(int(input()) * 2)\nraise ValueError('after the answer')"),
            // Rewrites sys.stdout: what counts is what reached fd 1.
            item("import sys, io\nreal = int(input()) * 2\nsys.stdout = io.StringIO()\nprint(real)"),
            // Leaves before printing.
            item("import os\nos._exit(0)\nprint(int(input()) * 2)"),
            // Wrong answer.
            item("print(int(input()) + 3)"),
            // Kills the kernel it was forked from: its own test fails, the
            // next one still runs.
            item("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint(int(input()) * 2)"),
            // Cannot reach the parent's memory, descriptors or sockets.
            item(
                "import os\nppid = os.getppid()\nfor p in ['mem', 'environ', 'fd']:\n    try:\n        \
                 os.listdir(f'/proc/{ppid}/fd') if p == 'fd' else open(f'/proc/{ppid}/{p}', 'rb').read(1)\n        \
                 print('READ', p)\n    except OSError:\n        pass\nprint(sorted(os.listdir('/proc/self/fd')))\n\
                 print(int(input()) * 2)",
            ),
            // Kills its kernel on one input only: the next test still runs
            // (in the kernel started in its place) and passes.
            json!({
                "code": "import os, signal\ns = input()\nif s == 'kill':\n    os.kill(os.getppid(), signal.SIGKILL)\n\
                         print(int(s) * 2)",
                "tests": [{"stdin": "kill\n", "expected_stdout": "4"}, {"stdin": "2\n", "expected_stdout": "4"}],
            }),
        ]),
    )
    .await;
    assert_eq!(passed(&r[0]), [true, true], "{}", r[0]);
    assert_eq!(r[0]["status"], json!("success"));
    assert_eq!((r[0]["passed"].as_u64(), r[0]["failed"].as_u64()), (Some(2), Some(0)));
    assert_eq!(r[0]["outputs"], json!([]), "a program-only item runs only as a program");
    for (i, why) in [(1, "SystemExit"), (2, "ValueError"), (3, "stdout"), (4, "_exit"), (5, "wrong")] {
        assert_eq!(passed(&r[i]), [false, false], "{why}: {}", r[i]);
        assert_eq!(r[i]["failed"], json!(2), "{why}");
    }
    assert_eq!(r[1]["status"], json!("error"));
    assert!(r[2]["tests"][0]["stderr"].as_str().unwrap().contains("ValueError: after the answer"));
    assert_eq!(r[2]["tests"][0]["stdout"], json!("4\n"), "what it printed is shown, and does not pass");
    assert_eq!(statuses(&r[6]), ["error", "error"], "{}", r[6]);
    assert_eq!(passed(&r[7]), [false, false], "{}", r[7]);
    assert_eq!(passed(&r[8]), [false, true], "{}", r[8]);
    let out = r[7]["tests"][0]["stdout"].as_str().unwrap();
    assert!(!out.contains("READ"), "a test reached its parent: {out}");
    // 0-2, the listing's own, and the runner's completion pipe: no socket,
    // no descriptor of the kernel's.
    let fds: Vec<u32> = out
        .lines()
        .next()
        .unwrap()
        .trim_matches(['[', ']'])
        .split(", ")
        .map(|f| f.trim_matches('\'').parse().unwrap())
        .collect();
    assert_eq!(fds.len(), 5, "{out}");
    assert!([0, 1, 2].iter().all(|f| fds.contains(f)), "{out}");
    assert_eq!(live_sessions(&s).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_item_s_program_tests_run_in_one_cell_whatever_bytes_they_print() {
    let s = start(&[]);
    // 512 KiB of bytes that are not UTF-8 per run: as text, a replacement
    // character each, six bytes once escaped in JSON. The reports of all
    // five runs still fit in one cell's output (10 MiB by default), so the
    // item costs its session one execution.
    let code = "import sys\nn = int(input())\nsys.stdout.buffer.write(b'\\xff' * (n << 10))\n";
    let expected = "\u{fffd}".repeat(512 << 10);
    let tests: Vec<Value> = (0..5).map(|_| json!({"stdin": "512\n", "expected_stdout": expected})).collect();
    let r = batch(&s, json!([{"code": code, "tests": tests, "keep_session": true}])).await;
    assert_eq!(passed(&r[0]), [true; 5], "{:?}", statuses(&r[0]));
    let id = r[0]["session_id"].as_str().unwrap();
    let sessions = s.sessions(KEY).await;
    let session = sessions.iter().find(|v| v["id"] == json!(id)).unwrap();
    assert_eq!(session["execute_count"], json!(1), "{session}");
}

#[tokio::test(flavor = "multi_thread")]
async fn assertion_tests_start_from_the_state_the_code_left_each_with_its_own_time_limit() {
    let s = start(&[]);
    let code = "def solve(x):\n    return x * x\nseen = []";
    let r = batch(
        &s,
        json!([{
            "code": code,
            "tests_timeout": 4,
            "tests": [
                {"code": "assert solve(3) == 9"},
                {"code": "assert solve(3) == 10"},
                // Side effects stay in their own test.
                {"code": "seen.append(1)\nsolve = None\nimport subprocess\n\
                          subprocess.Popen(['sh', '-c', 'sleep 1; echo late > late.txt'], start_new_session=True)"},
                {"code": "assert seen == [] and solve(2) == 4"},
                {"code": "while True:\n    pass"},
                {"code": "import os\nos._exit(0)"},
                {"code": "import time, os\ntime.sleep(2.5)\nassert not os.path.exists('late.txt')"},
            ],
        }]),
    )
    .await;
    let item = &r[0];
    assert_eq!(item["status"], json!("success"), "{item}");
    assert_eq!(passed(item), [true, false, true, true, false, false, true], "{item}");
    assert_eq!(statuses(item)[1], "error");
    assert!(item["tests"][1]["stderr"].as_str().unwrap().contains("AssertionError"));
    assert_eq!(statuses(item)[4], "timeout");
    assert!(item["tests"][5]["stderr"].as_str().unwrap().contains("before the test completed"), "{item}");
    assert_eq!((item["passed"].as_u64(), item["failed"].as_u64()), (Some(4), Some(3)));
}

#[tokio::test(flavor = "multi_thread")]
async fn ndjson_yields_each_item_when_it_finishes_without_waiting_for_the_slowest() {
    let s = start(&[]);
    let started = Instant::now();
    let mut resp = s
        .http
        .post(format!("{}/v1/tci/batch", s.url))
        .bearer_auth(KEY)
        .header("accept", "application/x-ndjson")
        .json(&json!({"items": [
            {"code": "import time\ntime.sleep(8)\nprint('slow')"},
            {"code": "print('fast')", "tests": [{"code": "assert True"}]},
            {"code": "1/0"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut buf = Vec::new();
    let mut lines: Vec<(Duration, Value)> = Vec::new();
    let mut keep_alives = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        buf.extend_from_slice(&chunk);
        while let Some(at) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=at).collect();
            if line != b"\n" {
                lines.push((started.elapsed(), serde_json::from_slice(&line).unwrap()));
            } else {
                keep_alives += 1;
            }
        }
    }
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(keep_alives >= 2, "empty lines keep a silent stream checked");
    let order: Vec<Value> = lines[..3].iter().map(|(_, l)| l["index"].clone()).collect();
    assert_eq!(order[2], json!(0), "the slow item comes last: {lines:?}");
    assert!(lines[0].1["index"] == json!(1) || lines[0].1["index"] == json!(2), "{lines:?}");
    // The fast items were written well before the slow one ended.
    let slow_at = lines[2].0;
    assert!(lines[1].0 + Duration::from_secs(4) < slow_at, "{lines:?}");
    let totals = &lines[3].1["totals"];
    assert_eq!(
        (totals["items"].as_u64(), totals["success"].as_u64(), totals["error"].as_u64()),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!((totals["tests_passed"].as_u64(), totals["tests_failed"].as_u64()), (Some(1), Some(0)));
}

/// One of the server's gauges (-1 if it has none by that name).
async fn gauge(s: &common::Server, name: &str) -> i64 {
    s.metric(name).await.map_or(-1, |n| n as i64)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_stops_its_batch_and_leaves_nothing_behind() {
    let s = start(&["--pool-size", "2"]);
    let items: Vec<Value> = (0..12).map(|_| json!({"code": "import time\ntime.sleep(60)"})).collect();
    for streamed in [true, false] {
        let mut req = s.http.post(format!("{}/v1/tci/batch", s.url)).bearer_auth(KEY).json(&json!({"items": items}));
        if streamed {
            req = req.header("accept", "application/x-ndjson");
        }
        let client = tokio::spawn(async move {
            let mut resp = req.send().await.unwrap();
            while resp.chunk().await.unwrap().is_some() {}
        });
        let running = async {
            for _ in 0..200 {
                if live_sessions(&s).await > 0 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        };
        assert!(running.await, "items were running");
        // The client gives up mid-batch.
        client.abort();
        let _ = client.await;
        let mut seen = (0, 0, 0, 0);
        for _ in 0..200 {
            let (live, ready) = (gauge(&s, "kiln_sessions_live").await, gauge(&s, "kiln_pool_ready").await);
            seen = (live, live_sessions(&s).await, common::sandboxes(&s.sessions_dir()).len() as i64, ready);
            if seen.0 == 0 && seen.1 == 0 && seen.2 == ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            (seen.0, seen.1, seen.2),
            (0, 0, seen.3),
            "streamed {streamed}: live sessions, listed sessions, sandboxes (vs pooled kernels): {:?}",
            common::sandbox_dirs(&s.sessions_dir())
        );
        // No item starts after the client left.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(live_sessions(&s).await, 0, "streamed: {streamed}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_item_refuses_the_whole_batch_before_anything_runs() {
    let s = start(&[]);
    let ok = json!({"code": "open('ran.txt', 'w').write('1')", "keep_session": true});
    let cases = [
        (json!([ok, {"code": "x", "tests": [{"code": "1"}, {"stdin": "1"}]}]), 400, "items[1].tests[1]"),
        (
            json!([ok, {"code": "x", "tests": [{"code": "1", "stdin": "1", "expected_stdout": "1"}]}]),
            400,
            "items[1].tests[0]",
        ),
        (json!([ok, {"code": "x", "memory_limit": "lots"}]), 400, "items[1].memory_limit"),
        (json!([ok, {"code": "x", "tests_timeout": 1e6}]), 400, "items[1].tests_timeout"),
        (json!([ok, {"code": "x", "timeout": -1}]), 400, "items[1].timeout"),
        (json!([ok, {"code": "x", "timeout": 1e6}]), 400, "items[1].timeout"),
        (json!([ok, {"code": "x", "language": "cobol"}]), 400, "items[1].language"),
        (
            json!([ok, {"code": "x", "files": [{"name": "../x", "encoding": "string", "content": ""}]}]),
            400,
            "items[1].files[0]",
        ),
        (
            json!([ok, {"code": "x", "files": [
                {"name": "a/b", "encoding": "string", "content": ""},
                {"name": "a//b/", "encoding": "string", "content": ""},
            ]}]),
            409,
            "items[1].files[1]",
        ),
        (json!([ok, {"code": "x", "session_id": "ses_nope"}]), 404, "items[1].session_id"),
        (json!([]), 400, "items"),
    ];
    for (items, status, param) in cases {
        let (got, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
        assert_eq!((got, v["error"]["param"].as_str()), (status, Some(param)), "{v}");
    }
    let many: Vec<Value> = (0..1001).map(|_| json!({"code": "1"})).collect();
    let (got, v) = s.post("/tci/batch", Some(KEY), json!({ "items": many })).await;
    assert_eq!((got, v["error"]["param"].as_str()), (400, Some("items")), "{v}");
    assert_eq!(live_sessions(&s).await, 0, "nothing ran");
    let (_, usage) = s.post("/v1/tci/batch", None, json!({"items": [{"code": "1"}]})).await;
    assert_eq!(usage["errors"][0]["code"], json!("unauthorized"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_whose_own_sessions_leave_no_room_for_a_batch_is_refused_before_anything_runs() {
    let s = start(&["--max-sessions-per-key", "2", "--pool-size", "1"]);
    let first = s.exec("x = 1", None).await["session_id"].as_str().unwrap().to_string();
    let refused = |v: &Value, live: usize, needed: usize| {
        assert_eq!(v["error"]["code"], "too_many_sessions", "{v}");
        assert_eq!(v["error"]["param"], "items", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("has {live} live sessions of the 2")), "{v}");
        assert!(message.contains(&format!("needs {needed} more")), "{v}");
    };

    // Two kept items need two places, and so do a kept item and others
    // (items run two at a time here: the kept one may start while another
    // still waits for a place); the key has one.
    let kept = json!({"code": "open('ran.txt', 'w').write('1')", "keep_session": true});
    for items in [json!([kept, kept]), json!([{"code": "1"}, {"code": "2"}, kept])] {
        let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
        assert_eq!(status, 429, "{v}");
        refused(&v, 1, 2);
    }
    assert_eq!(live_sessions(&s).await, 1, "nothing ran");

    // Items that end their sessions need one place at a time: they run.
    let results = batch(&s, json!([{"code": "print(1)"}, {"code": "print(2)"}, {"code": "print(3)"}])).await;
    assert!(results.iter().all(|r| r["status"] == "success"), "{results:?}");
    assert_eq!(live_sessions(&s).await, 1);

    // With both places taken by the caller's own sessions, a fresh item
    // is refused at once rather than waiting for room as kiln's failure;
    // an item in a session the caller holds still runs.
    s.exec("y = 2", None).await;
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": [{"code": "print(1)"}] })).await;
    assert_eq!(status, 429, "{v}");
    refused(&v, 2, 1);
    let results = batch(&s, json!([{"code": "print(x)", "session_id": first}])).await;
    assert_eq!(results[0]["status"], "success", "{results:?}");
    assert_eq!(live_sessions(&s).await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_execute_over_its_memory_limit_is_stopped_and_its_session_survives() {
    let s = start(&[]);
    let (status, v) = s
        .post(
            "/v1/tci/execute",
            Some(KEY),
            json!({"code": "x = 1\nsmall = bytearray(20 * 2**20)\nprint(len(small))", "memory_limit": "256MiB"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["status"], json!("success"), "{v}");
    let id = v["data"]["session_id"].as_str().unwrap().to_string();
    let (_, v) = s
        .post(
            "/v1/tci/execute",
            Some(KEY),
            json!({"code": "big = bytearray(600 * 2**20)\nprint(len(big))", "memory_limit": "256MiB", "session_id": id}),
        )
        .await;
    assert_eq!(v["data"]["status"], json!("error"), "{v}");
    let message = v["data"]["outputs"][0]["data"].as_str().unwrap();
    assert!(message.starts_with("MemoryError") && message.contains("256 MiB"), "{message}");
    // The session lives on, under the server's own limit again: the same
    // allocation without a limit of its own fits.
    let after = s.exec("big = bytearray(600 * 2**20)\nprint(len(big))", Some(&id)).await;
    assert_eq!(after["status"], json!("success"), "{after}");
    let (status, v) = s.post("/v1/tci/execute", Some(KEY), json!({"code": "1", "memory_limit": "256"})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("memory_limit")), "{v}");
}

/// Run `code` with `key` in a fresh session: status, error code, the
/// Retry-After header, and when it answered.
async fn timed_exec(
    s: std::sync::Arc<common::Server>,
    key: &'static str,
    code: &'static str,
    t0: Instant,
) -> (u16, String, Option<String>, Duration) {
    let resp = s
        .http
        .post(format!("{}/v1/tci/execute", s.url))
        .bearer_auth(key)
        .json(&json!({"code": code}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let v: Value = resp.json().await.unwrap();
    let code = v["error"]["code"].as_str().unwrap_or("").to_string();
    (status, code, retry, t0.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn past_its_queue_a_key_is_refused_at_once_with_retry_after() {
    let s = std::sync::Arc::new(start(&["--max-executions-per-key", "1", "--execution-queue-per-key", "2"]));
    let t0 = Instant::now();
    let calls = (0..5).map(|_| timed_exec(s.clone(), KEY, "import time\ntime.sleep(2)", t0));
    // Meanwhile the gauges show one running and two waiting.
    let watched = s.clone();
    let gauges = tokio::spawn(async move {
        let load = |text: &str| {
            ["kiln_executions_running", "kiln_executions_queued"].map(|m| common::metric(text, m).unwrap_or(-1.0))
        };
        let mut seen = Vec::new();
        for _ in 0..600 {
            let now = load(&watched.metrics().await);
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            if now == [1.0, 2.0] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    });
    let mut answers = futures_join(calls).await;
    let seen = gauges.await.unwrap();
    assert_eq!(seen.last(), Some(&[1.0, 2.0]), "running and queued as they changed: {seen:?}");
    let text = s.metrics().await;
    let idle = ["kiln_executions_running", "kiln_executions_queued"].map(|m| common::metric(&text, m));
    assert_eq!(idle, [Some(0.0), Some(0.0)], "{text}");
    answers.sort_by_key(|a| a.3);
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    let ran: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    assert_eq!((ran.len(), refused.len()), (3, 2), "one runs, two wait, the rest are refused: {answers:?}");
    for r in &refused {
        assert_eq!((r.1.as_str(), r.2.as_deref()), ("rate_limited", Some("1")), "{answers:?}");
        // Refused at once, not after waiting for a place.
        assert!(r.3 < ran[0].3, "{answers:?}");
    }
    // The queued ones ran one after another, each after the previous.
    assert!(ran[2].3 >= ran[0].3 + Duration::from_secs(3), "{answers:?}");
}

/// All of `calls`, concurrently.
async fn futures_join<F: std::future::Future + Send + 'static>(calls: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_key_does_not_make_another_key_wait_behind_its_queue() {
    let s = std::sync::Arc::new(start(&["--max-executions", "2", "--max-executions-per-key", "2"]));
    // Key A fills the server: two run, six wait.
    let t0 = Instant::now();
    let a_calls: Vec<_> = (0..8).map(|_| timed_exec(s.clone(), KEY, "import time\ntime.sleep(1.5)", t0)).collect();
    let a = tokio::spawn(futures_join(a_calls.into_iter()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_sessions(&s).await < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Key B asks once: it gets the next free place, ahead of A's queue.
    let b = timed_exec(s.clone(), common::OTHER_KEY, "print(1)", t0).await;
    let mut a = a.await.unwrap();
    a.sort_by_key(|x| x.3);
    assert!(a.iter().all(|x| x.0 == 200) && b.0 == 200, "{a:?} {b:?}");
    // A's third execution was queued before B arrived; B finished first.
    assert!(
        b.3 < a[2].3,
        "B waited behind A's queue: B at {:?}, A at {:?}",
        b.3,
        a.iter().map(|x| x.3).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rl_reward_example_turns_solutions_into_rewards() {
    let s = start(&["--pool-size", "2"]);
    let python = common::clients_dir().join("py2/bin/python");
    let url = s.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(common::repo().join("examples/rl_reward.py"))
            .env("KILN_BASE_URL", url)
            .env("KILN_API_KEY", KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let r = &last["rewards"];
    let expected = [
        ("add/right", 1.0),
        ("add/wrong", 0.0),
        ("add/raises-after-answer", 0.0),
        ("reverse/right", 1.0),
        ("reverse/prints-nothing", 0.0),
        ("primes/right", 1.0),
        ("primes/off-by-one", 2.0 / 3.0),
        ("primes/loops-forever", 0.0),
        ("fib/right", 1.0),
        ("fib/slow", 0.75),
    ];
    for (id, want) in expected {
        let got = r[id].as_f64().unwrap_or(-1.0);
        assert!((got - want).abs() < 1e-9, "{id}: {got} != {want}\n{stdout}");
    }
    assert_eq!(last["unscored"], json!([]));
    assert_eq!(live_sessions(&s).await, 0);
}

/// What a test (or the item) finds in /work: every path below it with its
/// kind and content, as one line of text.
const LIST_WORK: &str = r"import os
def work():
    out = []
    for d, dirs, files in os.walk('/work'):
        for n in sorted(dirs + files):
            p = os.path.join(d, n)
            kind = 'l' if os.path.islink(p) else 'd' if os.path.isdir(p) else 'f'
            body = open(p).read() if kind == 'f' else os.readlink(p) if kind == 'l' else ''
            out.append((p, kind, oct(os.lstat(p).st_mode), body))
    return sorted(out)
";

#[tokio::test(flavor = "multi_thread")]
async fn each_test_starts_from_the_work_dir_the_item_left_whatever_the_tests_before_it_did() {
    each_test_finds_the_item_s_work_dir(&start(&[])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_ipykernel_each_test_also_starts_from_the_item_s_work_dir() {
    each_test_finds_the_item_s_work_dir(&start(&["--kernel", "ipykernel", "--zygote", "off"])).await;
}

async fn each_test_finds_the_item_s_work_dir(s: &common::Server) {
    let files = json!([{"name": "input.txt", "content": "3 4\n"}]);
    // Program tests: each run finds no counter left by the one before, and
    // the input file the one before deleted; and so does the item's code
    // (which runs after them).
    let counter = "import os\nn = int(open('count').read()) if os.path.exists('count') else 0\n\
                   open('count', 'w').write(str(n + 1))\nos.unlink('input.txt')\nprint(n)";
    let mut program_tests: Vec<Value> = (0..3).map(|_| json!({"stdin": "", "expected_stdout": "0"})).collect();
    // (With an assertion the item's code also runs in its session.)
    program_tests.push(json!({"code": "assert n == 0 and open('count').read() == '1'"}));
    // Assertion tests: the state is what the item's code left; one test
    // creates, one changes, one deletes, and each checks the others' marks
    // are gone.
    let code = format!(
        "{LIST_WORK}os.makedirs('out', exist_ok=True)\nopen('out/state.txt', 'w').write('from the item')\n\
         BEFORE = work()"
    );
    let assertion_tests = json!([
        {"code": "open('/work/created.txt', 'w').write('x')\nos.makedirs('/work/made/deep')\nassert work() != BEFORE"},
        {"code": "assert work() == BEFORE, work()\nopen('/work/out/state.txt', 'a').write(' and a test')\n\
                  open('/work/input.txt', 'w').write('changed')"},
        {"code": "assert work() == BEFORE, work()\nimport shutil\nshutil.rmtree('/work/out')\nos.unlink('/work/input.txt')"},
        {"code": "assert work() == BEFORE, work()"},
    ]);
    let r = batch(
        s,
        json!([
            {"code": counter, "files": files, "tests": program_tests},
            {"code": code, "files": files, "tests": assertion_tests, "keep_session": true},
        ]),
    )
    .await;
    assert_eq!(r[0]["status"], json!("success"), "the item's code found a test's changes: {}", r[0]);
    assert_eq!(r[0]["outputs"], json!([{"type": "stdout", "data": "0\n"}]), "{}", r[0]);
    assert_eq!(passed(&r[0]), [true, true, true, true], "{}", r[0]);
    assert_eq!(passed(&r[1]), [true, true, true, true], "{}", r[1]);
    // The kept session is as the item's code left it, not as a test did.
    let kept = r[1]["session_id"].as_str().unwrap().to_string();
    let after = s.exec("assert work() == BEFORE, work()\nprint(len(BEFORE))", Some(&kept)).await;
    assert_eq!(common::text_of(&after, "stdout"), "3\n", "{after}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_test_cannot_change_what_the_next_test_or_the_item_sees() {
    // A small work dir, so that filling it is quick.
    let s = start(&["--disk-limit", "48MiB"]);
    let code = format!(
        "{LIST_WORK}os.makedirs('data/deep')\nopen('data/input.txt', 'w').write('original')\n\
         open('data/deep/blob', 'wb').write(b'1' * (4 << 20))\nos.symlink('data/input.txt', 'link')\n\
         os.chdir('data')\nBEFORE = work()\n\
         # A process the item leaves running, which every test must find as the first did.\n\
         import subprocess\nKEEPER = subprocess.Popen(['sleep', '600'])\n\
         def alive(p):\n    st = open('/proc/%d/stat' % p.pid).read()\n    return st[st.rindex(')') + 2] not in 'ZTtX'\n"
    );
    let hostile = [
        // A child that outlives the test, holding a file open and writing
        // to it and to new files after the test has ended.
        "import subprocess\nsubprocess.Popen(['sh', '-c', 'exec 3>>/work/data/input.txt; \
         while :; do echo late >&3; echo late >> /work/late.txt; sleep 0.01; done'], start_new_session=True)\n\
         import time\ntime.sleep(0.3)",
        // Locked directories, a directory swapped for a link that leads out
        // of /work, a file swapped for a link to the kernel's own files.
        "os.makedirs('/work/locked/in')\nopen('/work/locked/in/f', 'w').write('x')\nos.chmod('/work/locked/in', 0)\n\
         os.chmod('/work/locked', 0)\nos.rename('/work/data/deep', '/work/moved')\nos.symlink('/tmp', '/work/data/deep')\n\
         os.unlink('/work/data/input.txt')\nos.symlink('/proc/self/environ', '/work/data/input.txt')\n\
         os.chmod('/work/data', 0)",
        // A file that fills the work dir.
        "f = open('/work/huge', 'wb')\ntry:\n    while True:\n        f.write(b'0' * (1 << 20))\nexcept OSError:\n    pass",
        // A test that kills (or stops) the kernel it was forked from, which
        // would end the runner before it puts the work dir back.
        r"open('/work/killer.txt', 'w').write('x')
import os, signal
for target in (os.getppid(), -os.getpgid(os.getppid()), -1):
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        try:
            os.kill(target, sig)
        except PermissionError:
            pass
# Then every process and thread of the sandbox older than the test: the
# kernel's threads, whenever they started, and what the item left running.
import glob
for task in glob.glob('/proc/[0-9]*/task/[0-9]*'):
    tid = int(task.rsplit('/', 1)[1])
    if tid < os.getpid():
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(tid, sig)
            except (PermissionError, ProcessLookupError):
                pass",
        // A child that goes on forking children that write, after the test
        // has ended.
        r"import os, time
if os.fork() == 0:
    os.setsid()
    for i in range(400):
        if os.fork() == 0:
            open('/work/data/spawn-%d' % os.getpid(), 'w').write('x')
            time.sleep(60)
            os._exit(0)
        time.sleep(0.005)
    os._exit(0)
time.sleep(0.2)",
    ];
    let mut tests = Vec::new();
    for h in hostile {
        tests.push(json!({"code": h}));
        // After each: everything as the item left it, room to write again,
        // the kernel's cwd still the item's.
        tests.push(json!({"code": "import time\ntime.sleep(0.3)\nassert work() == BEFORE, work()\n\
                                   assert os.getcwd() == '/work/data'\nopen('/work/room', 'wb').write(b'0' * (30 << 20))\n\
                                   assert alive(KEEPER), 'a test signalled what the item left running'"}));
    }
    let r = batch(&s, json!([{"code": code, "tests": tests, "tests_timeout": 10, "keep_session": true}])).await;
    let item = &r[0];
    assert_eq!(item["status"], json!("success"), "{item}");
    let got = passed(item);
    assert!(got.iter().skip(1).step_by(2).all(|&p| p), "a test saw another's leftovers: {item}");
    let kept = item["session_id"].as_str().unwrap().to_string();
    let after = s.exec("assert work() == BEFORE, work()\nassert alive(KEEPER)\nprint('clean')", Some(&kept)).await;
    assert_eq!(common::text_of(&after, "stdout"), "clean\n", "{after}");
}
