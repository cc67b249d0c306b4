//! Executing code through a real server: outputs, state, files, ordering,
//! kernel death, time limits. Every test starts its own `kiln serve`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine as _;
use common::{start, text_of, types_of, KEY};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn state_persists_across_calls_of_one_session() {
    let s = start(&[]);
    let first = s.exec("x = 42\nimport math", None).await;
    let id = first["session_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ses_") && id.len() >= 4 + 22, "{id}");
    let second = s.exec("print(f'The value of x is {x}', math.pi > 3)", Some(&id)).await;
    assert_eq!(second["session_id"], json!(id));
    assert_eq!(text_of(&second, "stdout"), "The value of x is 42 True\n");
    // A call without session_id gets a fresh session without x.
    let other = s.exec("print('x' in globals())", None).await;
    assert_ne!(other["session_id"], json!(id));
    assert_eq!(text_of(&other, "stdout"), "False\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_arrive_in_order_as_a_notebook_shows_them() {
    let s = start(&[]);
    // ipykernel buffers each stream and flushes them on its own schedule,
    // as in a notebook; flushing makes the interleaving deterministic.
    let code =
        "import sys\nprint('one', flush=True)\nprint('warn', file=sys.stderr, flush=True)\nprint('two', flush=True)\n\
                from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))\n6*7";
    let d = s.exec(code, None).await;
    assert_eq!(d["status"], "success");
    assert_eq!(types_of(&d), ["stdout", "stderr", "stdout", "display_data", "execute_result"]);
    assert_eq!(d["outputs"][0]["data"], "one\n");
    assert_eq!(d["outputs"][1]["data"], "warn\n");
    assert_eq!(d["outputs"][3]["data"]["text/html"], "<b>hi</b>");
    assert_eq!(d["outputs"][4]["data"], json!({"text/plain": "42"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_matplotlib_figure_appears_as_png_without_show() {
    let s = start(&[]);
    let d = s.exec("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);", None).await;
    let shown: Vec<_> = d["outputs"].as_array().unwrap().iter().filter(|o| o["type"] == "display_data").collect();
    assert_eq!(shown.len(), 1, "{d}");
    let png =
        base64::engine::general_purpose::STANDARD.decode(shown[0]["data"]["image/png"].as_str().unwrap()).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(shown[0]["data"]["text/plain"].as_str().unwrap().starts_with("<Figure size"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exception_is_an_error_output_without_colours_and_the_session_lives_on() {
    let s = start(&[]);
    let d = s.exec("y = 5\nprint('before')\n1/0", None).await;
    assert_eq!(d["status"], "error");
    assert_eq!(types_of(&d), ["stdout", "error"]);
    let tb = text_of(&d, "error");
    assert!(tb.contains("ZeroDivisionError: division by zero"), "{tb}");
    assert!(!tb.contains('\u{1b}'), "ANSI escape in {tb:?}");
    let id = d["session_id"].as_str().unwrap();
    assert_eq!(text_of(&s.exec("print(y)", Some(id)).await, "stdout"), "5\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn uploaded_files_land_in_the_working_directory_before_the_code_runs() {
    let s = start(&[]);
    let (status, v) = s
        .post(
            "/tci/execute",
            Some(KEY),
            json!({
                "language": "python",
                "code": "!python myscript.py\nimport pandas as pd\nprint(pd.read_csv('data/raw/t.csv').b.sum())\nprint(open('bin.dat','rb').read())\n\
                         open('data/raw/mine.txt', 'w').write('folders made for the files are the session\\'s')\nprint('wrote')",
                "files": [
                    {"name": "myscript.py", "encoding": "string", "content": "import sys\nprint(f'Hello from inside {sys.argv[0]}!')"},
                    {"name": "data/raw/t.csv", "encoding": "string", "content": "a,b\n1,2\n3,4\n"},
                    {"name": "bin.dat", "encoding": "base64", "content": "AAEC/w=="}
                ]
            }),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let out = text_of(&v["data"], "stdout");
    assert!(out.starts_with("Hello from inside myscript.py!"), "{out}");
    assert!(out.contains("\n6\n"), "{out}");
    assert!(out.contains("b'\\x00\\x01\\x02\\xff'"), "{out}");
    assert!(out.ends_with("wrote\n"), "the code writes into a folder its files came in: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_commands_use_the_runtime_s_own_python_and_pip() {
    let s = start(&[]);
    let d =
        s.exec("import sys\n!python -c 'import sys; print(sys.prefix)'\nprint(sys.prefix)\n!pip --version", None).await;
    let out = text_of(&d, "stdout");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], lines[1], "{out}");
    assert!(lines[0].contains("/runtimes/"), "{out}");
    assert!(lines[2].contains(lines[0]), "pip is not the runtime's: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_to_one_session_run_one_at_a_time_in_arrival_order() {
    let s = std::sync::Arc::new(start(&[]));
    let id = s.exec("import time\nlog = []", None).await["session_id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            s.exec(&format!("log.append(('start', {i}))\ntime.sleep(0.3)\nlog.append(('end', {i}))"), Some(&id)).await
        }));
        // Stagger the sends so their arrival order is known.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap()["status"], "success");
    }
    let d = s.exec("print(log)", Some(&id)).await;
    let want: Vec<String> = (0..4).flat_map(|i| [format!("('start', {i})"), format!("('end', {i})")]).collect();
    assert_eq!(text_of(&d, "stdout"), format!("[{}]\n", want.join(", ")));
}

#[tokio::test(flavor = "multi_thread")]
async fn different_sessions_run_in_parallel() {
    let s = std::sync::Arc::new(start(&["--pool-size", "2"]));
    let a = s.exec("import time", None).await["session_id"].as_str().unwrap().to_string();
    let b = s.exec("import time", None).await["session_id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    let (ra, rb) = tokio::join!(s.exec("time.sleep(2)", Some(&a)), s.exec("time.sleep(2)", Some(&b)));
    assert_eq!((ra["status"].clone(), rb["status"].clone()), (json!("success"), json!("success")));
    // Serial would take at least 4 s.
    assert!(t0.elapsed() < Duration::from_millis(3900), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_that_dies_yields_an_error_output_and_a_fresh_kernel() {
    let s = start(&[]);
    let bystander = s.exec("z = 1", None).await["session_id"].as_str().unwrap().to_string();
    let d = s.exec("x = 1\nopen('kept.txt', 'w').write('still here')", None).await;
    let id = d["session_id"].as_str().unwrap().to_string();
    let d = s.exec("print('going', flush=True)\nimport os; os._exit(1)", Some(&id)).await;
    assert_eq!(d["status"], "error");
    let err = text_of(&d, "error");
    assert!(err.contains("KernelDied") && err.contains("exit code 1"), "{err}");
    assert!(err.contains("variables and imports were lost"), "{err}");
    // The session still works, without its old variables, with its files.
    let d = s.exec("print('x' in globals(), open('kept.txt').read())", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "False still here\n");
    assert_eq!(text_of(&s.exec("print(z)", Some(&bystander)).await, "stdout"), "1\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_time_limit_interrupts_a_cell_and_keeps_the_session() {
    let s = start(&[]);
    let id = s.exec("kept = 7", None).await["session_id"].as_str().unwrap().to_string();
    let (status, v) = s
        .post(
            "/tci/execute",
            Some(KEY),
            json!({"code": "import time\nprint('started', flush=True)\ntime.sleep(60)", "session_id": id, "timeout": 1}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let d = &v["data"];
    assert_eq!(d["status"], "error");
    assert_eq!(text_of(d, "stdout"), "started\n");
    let err = text_of(d, "error");
    assert!(err.contains("KeyboardInterrupt") && err.contains("time limit of 1s"), "{err}");
    assert!(err.contains("state is kept"), "{err}");
    assert_eq!(text_of(&s.exec("print(kept)", Some(&id)).await, "stdout"), "7\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cell_that_ignores_interrupts_is_killed_and_the_session_restarted() {
    let s = start(&[]);
    let id = s.exec("kept = 7", None).await["session_id"].as_str().unwrap().to_string();
    let code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.05)";
    let (status, v) = s.post("/tci/execute", Some(KEY), json!({"code": code, "session_id": id, "timeout": 1})).await;
    assert_eq!(status, 200, "{v}");
    let err = text_of(&v["data"], "error");
    assert!(err.contains("did not stop when interrupted") && err.contains("were lost"), "{err}");
    assert_eq!(text_of(&s.exec("print('kept' in globals())", Some(&id)).await, "stdout"), "False\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_request_is_interrupted_and_does_not_block_the_session() {
    let s = start(&[]);
    let id = s.exec("import time", None).await["session_id"].as_str().unwrap().to_string();
    let slow = s
        .http
        .post(format!("{}/tci/execute", s.url))
        .bearer_auth(KEY)
        .json(&json!({"code": "time.sleep(120)", "session_id": id}))
        .timeout(Duration::from_millis(700))
        .send()
        .await;
    assert!(slow.is_err(), "the slow request should have been cut off by the client");
    let t0 = Instant::now();
    let d = s.exec("print('next')", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "next\n");
    assert!(t0.elapsed() < Duration::from_secs(30), "next caller waited {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn endless_output_is_truncated_at_the_limit() {
    let s = start(&["--max-output-bytes", "100000"]);
    let (status, v) =
        s.post("/tci/execute", Some(KEY), json!({"code": "while True: print('spam' * 100)", "timeout": 3})).await;
    assert_eq!(status, 200);
    let out = text_of(&v["data"], "stdout");
    assert!(out.len() <= 100_000, "{}", out.len());
    assert!(text_of(&v["data"], "stderr").contains("output limit of 100000 bytes"), "{v:.300}");
    assert!(text_of(&v["data"], "error").contains("time limit"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_line_shows_the_output_up_to_the_limit_then_one_marker_and_the_session_lives_on() {
    const LIMIT: usize = 1_000_000;
    let s = start(&["--max-output-bytes", "1000000"]);
    let id = s.exec("import os, subprocess, sys", None).await["session_id"].as_str().unwrap().to_string();
    // From Python, at the file-descriptor level, and from a child process:
    // each writes hundreds of megabytes in one go, then more.
    let cells = [
        ("A", "sys.stdout.write('A' * (600 << 20))\nprint('after')"),
        ("B", "os.write(1, b'B' * (200 << 20))\nprint('after')"),
        ("C", "subprocess.run(\"head -c 200000000 /dev/zero | tr '\\\\0' C\", shell=True)\nprint('after')"),
    ];
    for (letter, code) in cells {
        let (status, v) =
            s.post("/tci/execute", Some(KEY), json!({"code": code, "session_id": id, "timeout": 300})).await;
        assert_eq!(status, 200, "{code}");
        let d = &v["data"];
        assert_eq!(d["status"], "success", "{code}: {:.300}", d.to_string());
        assert_eq!(types_of(d), ["stdout", "stderr"], "{code}: {:.300}", d.to_string());
        let out = text_of(d, "stdout");
        assert!(out.len() == LIMIT && out.bytes().all(|b| b == letter.as_bytes()[0]), "{code}: {} bytes", out.len());
        let marker = text_of(d, "stderr");
        assert!(marker.contains("output limit of 1000000 bytes reached"), "{code}: {marker}");
        assert_eq!(d.to_string().matches("output limit").count(), 1, "{code}");
    }
    // The session goes on, with its output under the limit again.
    let d = s.exec("print('still here', len('A' * 5))", Some(&id)).await;
    assert_eq!(d["outputs"], json!([{"type": "stdout", "data": "still here 5\n"}]));
}

#[tokio::test(flavor = "multi_thread")]
async fn time_limits_hold_for_many_sessions_at_once() {
    let s = std::sync::Arc::new(start(&["--pool-size", "2"]));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let code = if i % 2 == 0 { "import time\ntime.sleep(60)" } else { "while True: pass" };
            s.post("/tci/execute", Some(KEY), json!({"code": code, "timeout": 2})).await
        }));
    }
    for t in tasks {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 200, "{v}");
        assert!(text_of(&v["data"], "error").contains("time limit of 2s"), "{v}");
    }
    // Six cells of 2 s each, cold boots included, end well before any of
    // them could have run to completion (60 s / forever).
    assert!(t0.elapsed() < Duration::from_secs(45), "{:?}", t0.elapsed());
}
