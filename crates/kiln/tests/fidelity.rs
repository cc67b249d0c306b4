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
//! cells are compared with what they must show, and a settling cell after
//! them keeps ipykernel's late text out of the next compared cell.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::start;
use serde_json::{json, Value};

/// Held by each test here for its whole run: both boot kernels and run
/// cells with time limits, and on a small machine two at once make those
/// limits (and ipykernel's own timing) a race.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One cell of the corpus, and what its outputs are compared with.
struct Cell {
    code: &'static str,
    /// Its time limit, in seconds.
    timeout: u64,
    check: Check,
}

enum Check {
    /// ipykernel's outputs.
    Reference,
    /// These outputs (JSON): the cell writes at the file-descriptor level,
    /// which ipykernel forwards from a watcher thread that races its `idle`
    /// status, so the reference shows that text or not, at random (or in
    /// the next cell); or it interleaves stdout and stderr, which ipykernel
    /// merges or not as its flush timer falls. Its other outputs must
    /// still agree.
    Must(&'static str),
    /// Not compared: gives ipykernel's late fd-level output time to come
    /// out before the next compared cell.
    Settle,
}

const fn same(code: &'static str) -> Cell {
    Cell { code, timeout: 30, check: Check::Reference }
}

const fn must(code: &'static str, outputs: &'static str) -> Cell {
    Cell { code, timeout: 30, check: Check::Must(outputs) }
}

/// Waits until ipykernel's fd watcher threads have read their pipes, then
/// a little more for them to pass the text on; a no-op for the lean kernel.
const SETTLE: &str = "import array, fcntl, sys, termios, time
def _unread(stream):
    fd = getattr(stream, '_fid', None)
    if fd is None:
        return 0
    n = array.array('i', [0])
    fcntl.ioctl(fd, termios.FIONREAD, n)
    return n[0]
_deadline = time.monotonic() + 30
while (_unread(sys.stdout) or _unread(sys.stderr)) and time.monotonic() < _deadline:
    time.sleep(0.01)
time.sleep(0.3)";

/// Cells a notebook user (or an LLM) writes, run in this order in one session.
const CORPUS: &[Cell] = &[
    // ipykernel merges each stream's text within its flush interval, so its
    // answer depends on its timer; kiln keeps the order written.
    must(
        "print('hello')\nimport sys\nprint('to stderr', file=sys.stderr)\nprint('back')",
        r#"[{"type": "stdout", "data": "hello\n"}, {"type": "stderr", "data": "to stderr\n"}, {"type": "stdout", "data": "back\n"}]"#,
    ),
    same("1 + 1"),
    same("'text'"),
    same("[1, 2, {'a': None}]"),
    same("x = 5;"),
    same("_"),
    same("class R:\n    def _repr_html_(self):\n        return '<b>rich</b>'\nR()"),
    same("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})"),
    same(
        "from IPython.display import display, HTML, Markdown, JSON\n\
         display(HTML('<i>h</i>'))\ndisplay(Markdown('# m'))\ndisplay(JSON({'k': 1}))",
    ),
    same("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')"),
    same("1 / 0"),
    same("undefined_name"),
    same("def f():\n    raise ValueError('bad')\nf()"),
    same("x = ("),
    same("!echo shell"),
    same("!ls /nonexistent"),
    must("import os\nrc = os.system('echo from-fd')", r#"[{"type": "stdout", "data": "from-fd\n"}]"#),
    must(
        "import subprocess\nsubprocess.run(['echo', 'sub']).returncode",
        r#"[{"type": "stdout", "data": "sub\n"}, {"type": "execute_result", "data": {"text/plain": "0"}}]"#,
    ),
    Cell { code: SETTLE, timeout: 60, check: Check::Settle },
    same("input('?')"),
    same("import asyncio\nawait asyncio.sleep(0)\n'awaited'"),
    same("%%bash\necho bash-cell"),
    same("print('\\n'.join(str(i) for i in range(200)))"),
    same("from IPython.display import clear_output\nprint('a')\nclear_output()\nprint('b')"),
    Cell { code: "import time\nprint('before')\ntime.sleep(30)", timeout: 2, check: Check::Reference },
    same("print('after the interrupt', x)"),
    // `__main__` is the user's namespace, so what a cell defines pickles
    // by reference and reaches multiprocessing's workers.
    same("import sys\nsys.modules['__main__'].__name__, 'x' in vars(sys.modules['__main__'])"),
    same("import pickle\ndef double(n):\n    return 2 * n\npickle.loads(pickle.dumps(double))(21)"),
    same("import multiprocessing\nwith multiprocessing.Pool(2) as pool:\n    print(pool.map(double, [1, 2, 3]))"),
    same("import sys\nsys.exit(3)"),
    same("Out[2], In[2]"),
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

/// Each cell's status and outputs, in one session.
async fn run_corpus(server: &common::Server) -> Vec<Value> {
    let mut session: Option<String> = None;
    let mut results = Vec::new();
    for Cell { code, timeout, .. } in CORPUS {
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
    for ((cell, w), g) in CORPUS.iter().zip(&want).zip(&got) {
        let code = cell.code;
        match cell.check {
            Check::Reference if w != g => {
                differences.push(format!("cell {code:?}\n  ipykernel: {w}\n  lean:      {g}"));
            }
            Check::Must(outputs) => {
                let must = json!({"status": "success", "outputs": serde_json::from_str::<Value>(outputs).unwrap()});
                // The reference races in its streams only: the rest must agree.
                if g != &must || without_streams(w) != without_streams(g) {
                    differences.push(format!("cell {code:?}\n  must show: {must}\n  ipykernel: {w}\n  lean:      {g}"));
                }
            }
            Check::Reference | Check::Settle => {}
        }
    }
    assert_eq!(got.len(), CORPUS.len());
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

/// Stream outputs merged as a notebook shows them: adjacent text of one
/// stream is one output.
fn merged(outputs: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for o in outputs {
        let stream = o["type"] == "stdout" || o["type"] == "stderr";
        match out.last_mut() {
            Some(last) if stream && last["type"] == o["type"] => {
                let joined = format!("{}{}", last["data"].as_str().unwrap(), o["data"].as_str().unwrap());
                last["data"] = json!(joined);
            }
            _ => out.push(o.clone()),
        }
    }
    out
}

/// The events of a whole `text/event-stream` body: (name, JSON data).
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            Some((name?, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_execute_shows_and_ends_with_exactly_the_plain_answer_for_the_whole_corpus() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let server = start(&[]);
    // Two sessions run the corpus in lockstep: one plainly, one streamed.
    let (mut plain_id, mut streamed_id): (Option<String>, Option<String>) = (None, None);
    let mut differences = Vec::new();
    for Cell { code, timeout, .. } in CORPUS {
        let mut body = json!({"language": "python", "code": code, "timeout": timeout});
        if let Some(s) = &plain_id {
            body["session_id"] = json!(s);
        }
        let (status, plain) = server.post("/v1/tci/execute", Some(common::KEY), body.clone()).await;
        assert_eq!(status, 200, "{code}: {plain}");
        plain_id = plain["data"]["session_id"].as_str().map(str::to_string);

        body["stream"] = json!(true);
        match &streamed_id {
            Some(s) => body["session_id"] = json!(s),
            None => drop(body.as_object_mut().unwrap().remove("session_id")),
        }
        let resp = server
            .http
            .post(format!("{}/v1/tci/execute", server.url))
            .bearer_auth(common::KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{code}");
        let events = sse_events(&resp.text().await.unwrap());
        let (last, data) = events.last().unwrap();
        assert_eq!(last, "done", "{code}: {events:?}");
        streamed_id = data["data"]["session_id"].as_str().map(str::to_string);

        // The final event is the plain answer (but for the session's id).
        let summary = |v: &Value| normalise(&json!({"status": v["data"]["status"], "outputs": v["data"]["outputs"]}));
        if summary(data) != summary(&plain) || data["errors"] != plain["errors"] {
            differences.push(format!("cell {code:?}\n  plain:    {plain}\n  streamed: {data}"));
        }
        // And the output events, in order, show what it holds.
        let mut shown = Vec::new();
        for (name, d) in &events {
            match name.as_str() {
                "clear_output" => shown.clear(),
                "stdout" | "stderr" | "display_data" | "execute_result" | "error" => shown.push(d.clone()),
                _ => {}
            }
        }
        let outputs = data["data"]["outputs"].as_array().unwrap();
        if merged(&shown) != merged(outputs) {
            differences.push(format!("cell {code:?}\n  events showed: {shown:?}\n  answer holds:  {outputs:?}"));
        }
    }
    assert!(differences.is_empty(), "{} differences:\n{}", differences.len(), differences.join("\n"));
}
