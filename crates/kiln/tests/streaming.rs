//! Streamed executions: outputs as Server-Sent Events while the cell runs,
//! and a final event that is exactly the plain answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of, KEY};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt as _;

/// One received event: its name, its data as JSON, and when it arrived.
#[derive(Debug)]
struct Received {
    name: String,
    data: Value,
    at: Instant,
}

/// Parse a `text/event-stream` body as it arrives (the format's rules:
/// `event:` and `data:` lines, a blank line ends an event, `:` starts a
/// comment). Stops after `done` or `failed`, or after `stop_after` events.
async fn events(resp: reqwest::Response, stop_after: usize) -> (Vec<Received>, usize) {
    let mut body = resp.bytes_stream();
    let (mut buf, mut out, mut comments) = (String::new(), Vec::new(), 0);
    let (mut name, mut data) = (String::new(), String::new());
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(i) = buf.find('\n') {
            let line = buf[..i].trim_end_matches('\r').to_string();
            buf.drain(..=i);
            if line.is_empty() {
                if !name.is_empty() || !data.is_empty() {
                    let data_json = serde_json::from_str(&data).unwrap_or(Value::Null);
                    let ev = Received { name: std::mem::take(&mut name), data: data_json, at: Instant::now() };
                    data.clear();
                    let last = ev.name == "done" || ev.name == "failed";
                    out.push(ev);
                    if last || out.len() >= stop_after {
                        return (out, comments);
                    }
                }
            } else if line.starts_with(':') {
                comments += 1;
            } else if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
    }
    (out, comments)
}

async fn post_streamed(s: &common::Server, body: Value) -> reqwest::Response {
    s.http.post(format!("{}/v1/tci/execute", s.url)).bearer_auth(KEY).json(&body).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_arrive_in_order_while_the_cell_runs_and_end_with_the_plain_answer() {
    let s = start(&[]);
    let code = "import sys, time\nprint(1)\nprint('warn', file=sys.stderr)\ntime.sleep(1.5)\nprint(2)\n3";
    let resp = post_streamed(&s, json!({"code": code, "stream": true})).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let (evs, _) = events(resp, usize::MAX).await;
    let names: Vec<&str> = evs.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["session", "stdout", "stderr", "stdout", "execute_result", "done"], "{evs:?}");
    let id = evs[0].data["session_id"].as_str().unwrap();
    assert_eq!(evs[1].data, json!({"type": "stdout", "data": "1\n"}));
    assert_eq!(evs[3].data, json!({"type": "stdout", "data": "2\n"}));
    // The first output came while the cell was still sleeping.
    let gap = evs[3].at.duration_since(evs[1].at);
    assert!(gap >= Duration::from_millis(900), "the first output was held back: {gap:?}");
    // The final event is the envelope a plain call returns.
    let done = &evs[5].data;
    assert_eq!(done["errors"], Value::Null);
    assert_eq!(done["data"]["session_id"], id);
    assert_eq!(done["data"]["status"], "success");
    assert_eq!(
        done["data"]["outputs"],
        json!([
            {"type": "stdout", "data": "1\n"},
            {"type": "stderr", "data": "warn\n"},
            {"type": "stdout", "data": "2\n"},
            {"type": "execute_result", "data": {"text/plain": "3"}},
        ])
    );
    // The session is an ordinary one.
    assert_eq!(text_of(&s.exec("print(40 + 2)", Some(id)).await, "stdout"), "42\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_accept_header_asks_for_a_stream_and_without_it_nothing_changes() {
    let s = start(&[]);
    let resp = s
        .http
        .post(format!("{}/tci/execute", s.url))
        .bearer_auth(KEY)
        .header("accept", "text/event-stream")
        .json(&json!({"code": "print('hi')"}))
        .send()
        .await
        .unwrap();
    let (evs, _) = events(resp, usize::MAX).await;
    assert_eq!(evs.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["session", "stdout", "done"]);
    let plain = s.http.post(format!("{}/tci/execute", s.url)).bearer_auth(KEY).json(&json!({"code": "1"})).send().await;
    let plain = plain.unwrap();
    assert!(plain.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_cannot_start_gets_its_usual_status_and_error() {
    let s = start(&[]);
    let resp = post_streamed(&s, json!({"code": "1", "stream": true, "session_id": "ses_nope"})).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "session_not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_time_limits_and_silence_are_streamed_too() {
    let s = start(&[]);
    let code = "import time\nprint('start')\ntime.sleep(60)";
    let resp = post_streamed(&s, json!({"code": code, "stream": true, "timeout": 12})).await;
    let (evs, comments) = events(resp, usize::MAX).await;
    // Ten seconds of silence carry a keep-alive comment.
    assert!(comments >= 1, "no keep-alive during 12 s of silence");
    let names: Vec<&str> = evs.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"session"));
    assert_eq!(names.last(), Some(&"done"));
    assert!(names.contains(&"error"), "{names:?}");
    let done = &evs.last().unwrap().data["data"];
    assert_eq!(done["status"], "error");
    assert!(text_of(done, "error").contains("time limit"), "{done}");
    // Every output of the final answer was streamed, kiln's own message included.
    let streamed: Vec<&Value> =
        evs.iter().filter(|e| e.name != "session" && e.name != "done").map(|e| &e.data).collect();
    assert_eq!(streamed.len(), done["outputs"].as_array().unwrap().len(), "{evs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_interrupts_its_cell() {
    let s = start(&[]);
    let id = s.exec("done = False", None).await["session_id"].as_str().unwrap().to_string();
    let code = "import time\nfor i in range(600):\n    print(i, flush=True)\n    time.sleep(0.1)\ndone = True";
    let resp = post_streamed(&s, json!({"code": code, "stream": true, "session_id": id})).await;
    let (evs, _) = events(resp, 3).await;
    assert_eq!(evs[0].name, "session");
    // Dropping the response closes the connection.
    drop(evs);
    let after = s.exec("print(done, i < 100)", Some(&id)).await;
    assert_eq!(text_of(&after, "stdout"), "False True\n", "{after}");
}

/// Runs `program args…` and returns each line of its stdout with when it
/// arrived.
fn lines_as_they_come(program: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Vec<(String, Instant)> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let lines: Vec<_> = out.lines().map(|l| (l.unwrap(), Instant::now())).collect();
    assert!(child.wait().unwrap().success(), "{program:?} {args:?}: {lines:?}");
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_python_example_prints_each_output_while_the_cell_runs() {
    let s = start(&[]);
    let python = common::clients_dir().join("sse/bin/python");
    let script = common::repo().join("tests/clients/stream_sse.py");
    let url = s.url.clone();
    let lines = tokio::task::spawn_blocking(move || {
        lines_as_they_come(&python, &[script.to_str().unwrap()], &[("KILN_URL", &url), ("KILN_API_KEY", KEY)])
    })
    .await
    .unwrap();
    let text: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert!(text[0].starts_with("session ses_"), "{text:?}");
    assert_eq!(text[1..], ["stdout: tick 0", "stdout: tick 1", "stdout: tick 2", "status success"], "{text:?}");
    // The cell sleeps a second after each line: the first came long before the last.
    let gap = lines[3].1.duration_since(lines[1].1);
    assert!(gap >= Duration::from_millis(1500), "the outputs were held back: {gap:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_curl_example_streams_events() {
    let s = start(&[]);
    let body = json!({"code": "import time\nprint(1)\ntime.sleep(1.5)\nprint(2)", "stream": true}).to_string();
    let url = format!("{}/v1/tci/execute", s.url);
    let lines = tokio::task::spawn_blocking(move || {
        let auth = format!("Authorization: Bearer {KEY}");
        let args = ["-sN", &url, "-H", &auth, "-H", "Content-Type: application/json", "-d", &body];
        lines_as_they_come(std::path::Path::new("curl"), &args, &[])
    })
    .await
    .unwrap();
    let at = |text: &str| {
        let data = |l: &str| l.strip_prefix("data: ").and_then(|d| serde_json::from_str::<Value>(d).ok());
        let want = json!({"type": "stdout", "data": text});
        lines.iter().position(|(l, _)| data(l) == Some(want.clone())).unwrap_or_else(|| panic!("{text}: {lines:?}"))
    };
    let (first, second) = (at("1\n"), at("2\n"));
    assert_eq!(lines[first - 1].0, "event: stdout");
    assert!(lines[second].1.duration_since(lines[first].1) >= Duration::from_millis(900), "{lines:?}");
    assert!(lines.iter().any(|(l, _)| l == "event: done"), "{lines:?}");
}
