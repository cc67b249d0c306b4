//! The lean kernel against the reference, ipykernel: the same cells must
//! show the same outputs.
//!
//! Two checks. Through kiln's API, a corpus of cells runs in one session of
//! a server running plain ipykernel booted as a new interpreter (a
//! notebook's kernel), then in one of a server with the lean kernel forked
//! from the zygote (the default), one server after the other, and every
//! output must be equal. Below the API, `kiln_kernel.fidelity` compares the
//! raw Jupyter messages of both kernels (message types, contents, execution
//! counts, replies).
//!
//! Output written to file descriptors 1 and 2 (`os.system`, subprocesses)
//! is the exception: ipykernel forwards it from a watcher thread that races
//! its `idle` status, so the reference shows it or not, at random. Those
//! cells are compared with what they must show.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::start;
use serde_json::{json, Value};

/// Held by each test here for its whole run: both boot kernels and run
/// cells with time limits, and on a small machine two at once make those
/// limits (and ipykernel's own timing) a race.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Cells a notebook user (or an LLM) writes, each with its own time limit.
const CORPUS: &[(&str, u64)] = &[
    ("print('hello')\nimport sys\nprint('to stderr', file=sys.stderr)\nprint('back')", 30),
    ("1 + 1", 30),
    ("'text'", 30),
    ("[1, 2, {'a': None}]", 30),
    ("x = 5;", 30),
    ("_", 30),
    ("class R:\n    def _repr_html_(self):\n        return '<b>rich</b>'\nR()", 30),
    ("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})", 30),
    (
        "from IPython.display import display, HTML, Markdown, JSON\n\
         display(HTML('<i>h</i>'))\ndisplay(Markdown('# m'))\ndisplay(JSON({'k': 1}))",
        30,
    ),
    ("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')", 30),
    ("1 / 0", 30),
    ("undefined_name", 30),
    ("def f():\n    raise ValueError('bad')\nf()", 30),
    ("x = (", 30),
    ("!echo shell", 30),
    ("!ls /nonexistent", 30),
    ("input('?')", 30),
    ("import asyncio\nawait asyncio.sleep(0)\n'awaited'", 30),
    ("%%bash\necho bash-cell", 30),
    ("print('\\n'.join(str(i) for i in range(200)))", 30),
    ("from IPython.display import clear_output\nprint('a')\nclear_output()\nprint('b')", 30),
    ("import time\nprint('before')\ntime.sleep(30)", 2),
    ("print('after the interrupt', x)", 30),
    ("import sys\nsys.exit(3)", 30),
    ("Out[2], In[2]", 30),
];

/// Cells that write at the file-descriptor level, with the outputs they
/// must show. They run last, after [`CORPUS`] in the same session, so that
/// ipykernel's late output cannot land in a cell compared with it.
const FD_CELLS: &[(&str, &str)] = &[
    ("import os\nrc = os.system('echo from-fd')", r#"[{"type": "stdout", "data": "from-fd\n"}]"#),
    (
        "import subprocess\nsubprocess.run(['echo', 'sub']).returncode",
        r#"[{"type": "stdout", "data": "sub\n"}, {"type": "execute_result", "data": {"text/plain": "0"}}]"#,
    ),
];

/// What may differ between two correct runs: object addresses.
fn normalise(v: &Value) -> Value {
    match v {
        Value::String(s) => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(i) = rest.find("0x") {
                out.push_str(&rest[..i]);
                let tail = &rest[i + 2..];
                let n = tail.chars().take_while(char::is_ascii_hexdigit).count();
                out.push_str(if n >= 6 { "0xADDR" } else { &rest[i..i + 2 + n] });
                rest = &tail[n..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), normalise(v))).collect()),
        other => other.clone(),
    }
}

/// Each cell's status and outputs, [`CORPUS`] then [`FD_CELLS`], in one session.
async fn run_corpus(server: &common::Server) -> Vec<Value> {
    let mut session: Option<String> = None;
    let mut results = Vec::new();
    let cells = CORPUS.iter().copied().chain(FD_CELLS.iter().map(|(code, _)| (*code, 30)));
    for (code, timeout) in cells {
        let mut body = json!({"language": "python", "code": code, "timeout": timeout});
        if let Some(s) = &session {
            body["session_id"] = json!(s);
        }
        let (status, v) = server.post("/v1/tci/execute", Some(common::KEY), body).await;
        assert_eq!(status, 200, "{code}: {v}");
        session = v["data"]["session_id"].as_str().map(str::to_string);
        results.push(normalise(&json!({"status": v["data"]["status"], "outputs": v["data"]["outputs"]})));
    }
    results
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lean_kernel_shows_what_ipykernel_shows() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // One server at a time: the cells have time limits, and two servers
    // booting at once on a small machine make those limits a race.
    let want = run_corpus(&start(&["--kernel", "ipykernel", "--zygote", "off"])).await;
    let got = run_corpus(&start(&[])).await;
    let mut differences = Vec::new();
    for (((code, _), w), g) in CORPUS.iter().zip(&want).zip(&got) {
        if w != g {
            differences.push(format!("cell {code:?}\n  ipykernel: {w}\n  lean:      {g}"));
        }
    }
    for (((code, outputs), w), g) in FD_CELLS.iter().zip(&want[CORPUS.len()..]).zip(&got[CORPUS.len()..]) {
        let must = json!({"status": "success", "outputs": serde_json::from_str::<Value>(outputs).unwrap()});
        // The reference is racy in its streams only: the rest must agree.
        if g != &must || without_streams(w) != without_streams(g) {
            differences.push(format!("cell {code:?}\n  must show: {must}\n  ipykernel: {w}\n  lean:      {g}"));
        }
    }
    assert_eq!(got.len(), CORPUS.len() + FD_CELLS.len());
    assert!(differences.is_empty(), "{} of {} cells differ:\n{}", differences.len(), got.len(), differences.join("\n"));
    // The corpus really exercised what it claims to.
    let all = serde_json::to_string(&got).unwrap();
    for needle in ["image/png", "text/html", "ZeroDivisionError", "KeyboardInterrupt", "from-fd", "bash-cell"] {
        assert!(all.contains(needle), "no {needle} in the outputs: {all}");
    }
}

/// A cell's result without its stdout and stderr outputs.
fn without_streams(result: &Value) -> Value {
    let mut r = result.clone();
    if let Some(outputs) = r["outputs"].as_array_mut() {
        outputs.retain(|o| o["type"] != "stdout" && o["type"] != "stderr");
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn the_raw_messages_of_both_kernels_match() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // A server provisions the runtime and installs kiln_kernel into it.
    let server = start(&[]);
    let ready = server.stdout_lines.iter().find(|l| l.starts_with("kiln ready on ")).unwrap();
    let runtime = ready.split("(runtime ").nth(1).unwrap().trim_end_matches(')').to_string();
    let python = std::path::Path::new(&runtime).join("bin/python");
    // This kiln's kernel package (its directory in the runtime is versioned).
    let built = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["runtime", "build", "--profile", "minimal"])
        .output()
        .unwrap();
    let built = String::from_utf8_lossy(&built.stdout).to_string();
    let package = built.lines().find_map(|l| l.strip_prefix("kernel package: ")).unwrap().to_string();
    let out = tokio::process::Command::new(&python)
        .args(["-m", "kiln_kernel.fidelity"])
        .env_clear()
        .env("PATH", format!("{runtime}/bin:/usr/bin:/bin"))
        .env("PYTHONPATH", package)
        .env("HOME", server.data.path())
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the kernels differ:\n{text}");
}
