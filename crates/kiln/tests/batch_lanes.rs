//! The sessions that a batch's program-only items share (lanes), against a
//! real server: one session serves item after item, and nothing an item
//! leaves behind (files in the work, home, `/tmp` and `/dev/shm`
//! directories, IPC objects, processes, in Python or in bash, its own
//! files) reaches the next; an item that wrote into the runtime retires
//! its lane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, KEY};
use serde_json::{json, Value};
use std::time::Duration;

/// What a program test sees of its sandbox, as one JSON line.
const OBSERVER: &str = r#"import importlib.util, json, os
def ls(d):
    try:
        return sorted(os.listdir(d))
    except OSError as e:
        return str(e)
ipc = [open(f"/proc/sysvipc/{k}").read().splitlines()[1:] for k in ("shm", "sem", "msg")]
procs = [p for p in os.listdir("/proc") if p.isdigit()]
init_started = open("/proc/1/stat").read().rsplit(")", 1)[1].split()[19]
# Not an import statement: that would make this a program with packages.
probe = importlib.util.find_spec("kiln_lane_probe") is not None
print(json.dumps({"work": ls("/work"), "tmp": ls("/tmp"), "shm": ls("/dev/shm"), "home": ls(os.environ["HOME"]),
                  "ipc": ipc, "processes": len(procs), "probe": probe, "init": init_started}))
"#;

/// Leaves what it can wherever it can write, and a process that goes on
/// writing after the test.
const HOSTILE_PYTHON: &str = r#"import ctypes, os, subprocess
for d in ("/work", "/tmp", "/dev/shm", os.environ["HOME"]):
    open(os.path.join(d, "left-behind"), "w").write("x")
os.makedirs("/tmp/deep/er")
libc = ctypes.CDLL(None)
assert libc.shmget(0x4B494C4E, 4096, 0o1666) >= 0
assert libc.semget(0x4B494C4F, 1, 0o1666) >= 0
assert libc.msgget(0x4B494C50, 0o1666) >= 0
subprocess.Popen(["sh", "-c", "while :; do echo late >> /tmp/late; sleep 0.01; done"], start_new_session=True)
print("left")
"#;

const HOSTILE_BASH: &str = "echo x > /tmp/bash-left; echo x > \"$HOME/bash-left\"; mkdir -p /dev/shm/d\n\
                            (setsid sh -c 'while :; do date >> /work/late; sleep 0.01; done' &)\necho left";

/// Writes a module into the runtime (the session's layer over it).
const RUNTIME_WRITER: &str = "import sysconfig\n\
                              open(sysconfig.get_paths()['purelib'] + '/kiln_lane_probe.py', 'w').write('x = 1')\n\
                              __import__('kiln_lane_probe')\nprint('wrote')";

fn item(language: &str, code: &str) -> Value {
    json!({"language": language, "code": code, "tests": [{"stdin": "", "expected_stdout": ""}], "tests_timeout": 10})
}

/// The JSON line an observer or a scan printed, in `text` of result `r`.
fn line_in(text: &Value, r: &Value) -> Value {
    let out = text.as_str().unwrap_or_default();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("an observer's line ({e}): {r}"))
}

/// What an item's program printed in its first test.
fn seen(r: &Value) -> Value {
    line_in(&r["tests"][0]["stdout"], r)
}

#[tokio::test(flavor = "multi_thread")]
async fn program_only_items_share_a_session_and_none_leaves_anything_for_the_next() {
    // One session per key: the batch runs one item at a time, so every
    // item after the first finds the lane the one before it used.
    let s = start(&["--profile", "full", "--max-sessions-per-key", "1", "--pool-size", "1"]);
    let started = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    let items = json!([
        item("python", OBSERVER),
        item("python", HOSTILE_PYTHON),
        item("python", OBSERVER),
        item("bash", HOSTILE_BASH),
        item("python", OBSERVER),
        item("python", RUNTIME_WRITER),
        item("python", OBSERVER),
        // With files: its tests find them, the next item does not.
        {"language": "python", "code": "import os\nprint(sorted(os.listdir('.')), open('data/in.txt').read())",
         "files": [{"name": "data/in.txt", "encoding": "string", "content": "A"}, {"name": "b.txt", "encoding": "string", "content": ""}],
         "tests": [{"stdin": "", "expected_stdout": "['b.txt', 'data'] A"}, {"stdin": "", "expected_stdout": "['b.txt', 'data'] A"}]},
        item("python", OBSERVER),
    ]);
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
    assert_eq!(status, 200, "{v}");
    let r = v["data"]["results"].as_array().unwrap();
    for (i, want) in [(1, "left\n"), (3, "left\n"), (5, "wrote\n")] {
        assert_eq!(r[i]["tests"][0]["stdout"], json!(want), "item {i} did what it meant to: {}", r[i]);
    }
    let first = seen(&r[0]);
    assert_eq!(first["probe"], json!(false), "{first}");
    assert!(first["ipc"].as_array().unwrap().iter().all(|t| t.as_array().unwrap().is_empty()), "{first}");
    // The same lane (its init started once), found as the first item found it.
    assert_eq!(seen(&r[2]), first, "after the Python item that left things behind");
    assert_eq!(seen(&r[4]), first, "after the bash item that left things behind");
    // Writing into the runtime retired that lane: a new one, as clean.
    let mut last = seen(&r[6]);
    assert_ne!(last["init"], first["init"], "the lane that wrote into the runtime was not used again: {last}");
    last["init"] = first["init"].clone();
    assert_eq!(last, first);
    assert_eq!(r[7]["passed"], json!(2), "the item's files were there for each test: {}", r[7]);
    let mut after_files = seen(&r[8]);
    assert_eq!(after_files["init"], seen(&r[6])["init"], "the item with files left its lane usable");
    after_files["init"] = first["init"].clone();
    assert_eq!(after_files, first, "and left no file in it");
    let now = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    assert_eq!(now - started, 2.0, "nine items, two lanes");
    // The batch over, its lanes are gone.
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = s.sessions(KEY).await.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the batch's lanes ended with it");
}

/// Python that counts, as `found`, the strings of `KILNLANE` and 16 hex
/// digits its process's whole memory holds (the pattern's own text has
/// none). Read in place (a sandboxed process cannot open its own
/// /proc/self/mem): every readable private anonymous mapping, where an
/// interpreter's objects live.
const FIND_SECRETS: &str = r#"import ctypes, re
found = 0
with open("/proc/self/maps") as maps:
    for line in maps.read().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        name = fields[5] if len(fields) > 5 else ""
        if fields[1][0] != "r" or name not in ("", "[heap]", "[stack]") or hi - lo > 1 << 30:
            continue
        found += len(re.findall(rb"KILN" rb"LANE[0-9a-f]{16}", ctypes.string_at(lo, hi - lo)))
"#;

/// A Python program with a package: which preloaded packages it found
/// imported, the secrets its memory holds (`FIND_SECRETS`), and its lane's
/// init.
fn scan() -> String {
    format!(
        r#"import sys
preloaded = sorted(m for m in ("numpy", "pandas") if m in sys.modules)
import json, numpy
{FIND_SECRETS}init_started = open("/proc/1/stat").read().rsplit(")", 1)[1].split()[19]
print(json.dumps({{"preloaded": preloaded, "found": found, "init": init_started}}))
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn programs_with_packages_share_a_lane_whose_tests_have_them_imported_and_nothing_of_an_earlier_item() {
    // One session per key: each lane that starts must first end the idle
    // lane of the other kind, which no item of the batch can use.
    let s = start(&["--profile", "minimal", "--max-sessions-per-key", "1", "--pool-size", "1"]);
    let started = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    // First: a server forked from the kernel once the item's cell had
    // reached it would hold the secret for every later test.
    let secret = "import numpy, sys\n# KILNLANE0123456789abcdef\nprint(input())\n\
                  print(open('/proc/1/stat').read().rsplit(')', 1)[1].split()[19], file=sys.stderr)";
    let stdin = "KILNLANEfedcba9876543210";
    let items = json!([
        {"language": "python", "code": secret, "tests": [{"stdin": stdin, "expected_stdout": stdin}]},
        item("python", &scan()),
        item("python", OBSERVER),
        // Starts an image lane with files: they are there for its tests.
        {"language": "python", "code": "import numpy\nprint(int(numpy.loadtxt('data/in.txt').sum()))",
         "files": [{"name": "data/in.txt", "encoding": "string", "content": "1 2 3\n"}],
         "tests": [{"stdin": "", "expected_stdout": "6"}]},
        item("python", &format!("# KILNLANE00000000000000ff\n{}", scan())),
    ]);
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
    assert_eq!(status, 200, "{v}");
    let r = v["data"]["results"].as_array().unwrap();
    for (i, result) in r.iter().enumerate() {
        assert_eq!(result["status"], "success", "item {i}: {result}");
    }
    let scan = seen(&r[1]);
    assert_eq!(json!(r[0]["tests"][0]["stderr"].as_str().unwrap().trim()), scan["init"], "one lane: {scan}");
    // Forked from the kernel (whose zygote imported them), not spawned.
    assert_eq!(scan["preloaded"], json!(["numpy", "pandas"]), "{scan}");
    assert_eq!(scan["found"], json!(0), "nothing of the item before it in a test's memory: {scan}");
    // A standard-library item: a lean lane, which the idle image lane made
    // room for (on one session per key).
    assert_eq!(seen(&r[2])["probe"], json!(false));
    // The scan finds what is there (its own item's secret), in a new image lane.
    let last = seen(&r[4]);
    assert!(last["found"].as_u64().unwrap() > 0, "{last}");
    assert_ne!(last["init"], scan["init"], "{last}");
    let now = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    assert_eq!(now - started, 3.0, "five items, three lanes");
}

/// The pids of the lanes' fork servers (spawned ones: `-m kiln_kernel.forkserver`)
/// under `server` (the other tests' servers have theirs).
fn fork_servers(server: u32) -> Vec<i32> {
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
    };
    let under = |mut pid: i32| {
        while pid > 1 {
            if pid == server as i32 {
                return true;
            }
            pid = parent(pid).unwrap_or(0);
        }
        false
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("kiln_kernel.forkserver") && under(pid) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lane_whose_tests_runner_dies_under_an_item_runs_it_again_in_another_and_never_blames_the_candidate() {
    let s = start(&["--profile", "minimal", "--max-sessions-per-key", "1", "--pool-size", "1"]);
    let started = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    let slow = json!({"language": "python", "code": "import time\ntime.sleep(2)\nprint('ok')",
                      "tests": [{"stdin": "", "expected_stdout": "ok"}], "tests_timeout": 20});
    let batch = s.post("/v1/tci/batch", Some(KEY), json!({ "items": [slow] }));
    let killer = async {
        // The lane's server, once its first test runs: killed as the OOM
        // killer or an operator might.
        for _ in 0..200 {
            if let Some(pid) = fork_servers(s.pid()).first() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL).unwrap();
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    let ((status, v), killed) = tokio::join!(batch, killer);
    assert!(killed, "no fork server was seen to kill");
    assert_eq!(status, 200, "{v}");
    let r = &v["data"]["results"][0];
    assert_eq!(r["status"], "success", "kiln's failure was retried, not scored: {r}");
    assert_eq!(r["passed"], 1, "{r}");
    let now = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    assert_eq!(now - started, 2.0, "the lost lane was not used again");
}

/// What an item's cell finds of its sandbox and of earlier items, as one
/// line: the work directory and `/tmp`, the names an earlier item or test
/// defined, the secrets its memory holds (`FIND_SECRETS`), and its lane's
/// init.
fn cell_scan() -> String {
    format!(
        r#"import json, os
{FIND_SECRETS}print(json.dumps({{"work": sorted(os.listdir("/work")), "tmp": sorted(os.listdir("/tmp")),
                  "names": sorted(n for n in dir() if n.startswith("lane_")), "found": found,
                  "init": open("/proc/1/stat").read().rsplit(")", 1)[1].split()[19]}}))
"#
    )
}

/// What a cell shows: every kind of output a notebook shows, in order.
const SHOWS: &str = "import os, sys\nfrom IPython.display import HTML, display\nprint('out')\n\
                     print('err', file=sys.stderr)\nos.write(1, b'fd\\n')\ndisplay(HTML('<b>x</b>'))\n{'a': [1, 2]}";

/// What an item's cell printed first.
fn cell_seen(r: &Value) -> Value {
    line_in(&r["outputs"][0]["data"], r)
}

#[tokio::test(flavor = "multi_thread")]
async fn items_with_a_cell_share_a_lane_show_what_a_session_would_and_leave_nothing_for_the_next() {
    // One session per key: the items run one after another, in one lane
    // while each leaves it usable.
    let s = start(&["--profile", "minimal", "--max-sessions-per-key", "1", "--pool-size", "1"]);
    let started = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    let assert_true = json!([{"code": "assert True"}]);
    let leaves = "lane_secret = 'KILNLANE0123456789abcdef'\nimport subprocess\n\
                  open('/tmp/left', 'w').write('x')\nopen('left.txt', 'w').write('x')\n\
                  subprocess.Popen(['sh', '-c', 'while :; do echo late >> /tmp/late; sleep 0.01; done'])\n\
                  def solve(x):\n    return x * 2\nprint(open('/proc/1/stat').read().rsplit(')', 1)[1].split()[19])";
    let items = json!([
        {"code": leaves, "tests": [{"code": "assert solve(2) == 4"}, {"code": "lane_seen = 1\nassert solve(3) == 7"},
                                   {"code": "assert 'lane_seen' not in dir() and open('left.txt').read() == 'x'"}]},
        {"code": cell_scan()},
        {"code": SHOWS, "tests": assert_true},
        {"code": "lane_x = 1\nraise ValueError('no')", "tests": [{"code": "assert lane_x == 1"}]},
        {"code": "lane_y = 2\nwhile True:\n    pass", "timeout": 1, "tests": [{"code": "assert lane_y == 2"}]},
        {"code": "import os\nos._exit(0)", "tests": assert_true},
        {"code": &format!("# KILNLANE00000000000000ff\n{}", cell_scan())},
        // The same cell in a session of its own, for its outputs.
        {"code": SHOWS, "tests": assert_true, "keep_session": true},
    ]);
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
    assert_eq!(status, 200, "{v}");
    let r = v["data"]["results"].as_array().unwrap();
    assert_eq!((r[0]["status"].as_str(), r[0]["passed"].as_u64()), (Some("success"), Some(2)), "{}", r[0]);
    assert!(!r[0]["tests"][1]["passed"].as_bool().unwrap(), "{}", r[0]);
    // Nothing of the first item, in files, processes, names or memory.
    let scan = cell_seen(&r[1]);
    assert_eq!(json!(r[0]["outputs"][0]["data"].as_str().unwrap().trim()), scan["init"], "one lane: {scan}");
    assert_eq!((&scan["work"], &scan["tmp"], &scan["names"]), (&json!([]), &json!([]), &json!([])), "{scan}");
    assert_eq!(scan["found"], json!(0), "nothing of the item before it in the cell's memory: {scan}");
    // Its outputs are the session's, to the byte.
    assert_eq!(r[2]["status"], "success", "{}", r[2]);
    assert_eq!(r[2]["outputs"], r[7]["outputs"], "in a lane and in a session");
    let kinds: Vec<&str> = r[2]["outputs"].as_array().unwrap().iter().map(|o| o["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["stdout", "stderr", "stdout", "display_data", "execute_result"], "{}", r[2]);
    assert!(r[7]["session_id"].is_string() && r[2]["session_id"].is_null());
    // A raise, a time limit: the assertions start from the state left.
    assert_eq!(r[3]["status"], "error", "{}", r[3]);
    assert!(r[3]["outputs"].to_string().contains("ValueError: no"), "{}", r[3]);
    assert_eq!(r[3]["passed"], json!(1), "{}", r[3]);
    assert_eq!(r[4]["status"], "timeout", "{}", r[4]);
    assert!(r[4]["outputs"].to_string().contains("TimeoutError"), "{}", r[4]);
    assert_eq!(r[4]["passed"], json!(1), "{}", r[4]);
    // A cell that ends its own process: its tests cannot run; the
    // candidate's doing, not kiln's, and its lane is not used again.
    assert_eq!(r[5]["status"], "error", "{}", r[5]);
    assert!(r[5]["tests"][0]["stderr"].as_str().unwrap().contains("ended its process"), "{}", r[5]);
    // The scan finds what is there: its own secret, in a new lane.
    let last = cell_seen(&r[6]);
    assert!(last["found"].as_u64().unwrap() > 0, "{last}");
    assert_ne!(last["init"], scan["init"], "{last}");
    assert_eq!((&last["work"], &last["tmp"], &last["names"]), (&json!([]), &json!([]), &json!([])), "{last}");
    let now = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    assert_eq!(now - started, 3.0, "eight items: two lanes and the kept session");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_kills_itself_is_an_error_and_only_the_memory_limit_is_memory_exceeded() {
    // In lanes, where every test, cell and assertion is a process of its
    // own: a SIGKILL is the memory limit only when the session's OOM killer
    // acted in that runner's cell.
    let s =
        start(&["--profile", "minimal", "--memory-limit", "256MiB", "--max-sessions-per-key", "1", "--pool-size", "1"]);
    let kill_self = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)";
    let too_big = "b = bytearray(400 * 2**20)\nprint(len(b))";
    let program = |code: &str| json!({"code": code, "tests": [{"stdin": "", "expected_stdout": ""}]});
    let items = json!([
        program(kill_self),
        // The first assertion is a fork of the item's process, the last
        // runs in it.
        {"code": "x = 1", "tests": [{"code": kill_self}, {"code": kill_self}]},
        {"code": kill_self, "tests": [{"code": "assert True"}]},
        program(too_big),
        {"code": "x = 1", "tests": [{"code": too_big}, {"code": too_big}]},
    ]);
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
    assert_eq!(status, 200, "{v}");
    let r = v["data"]["results"].as_array().unwrap();
    let own = "not by its memory limit";
    for (i, test) in [(0, 0), (1, 0), (1, 1)] {
        let t = &r[i]["tests"][test];
        assert_eq!(t["status"], "error", "item {i}, test {test}: {}", r[i]);
        assert!(t["stderr"].as_str().unwrap().contains(own), "item {i}, test {test}: {}", r[i]);
    }
    assert_eq!(r[2]["status"], "error", "{}", r[2]);
    assert!(r[2]["outputs"].to_string().contains(own), "{}", r[2]);
    for (i, test) in [(3, 0), (4, 0), (4, 1)] {
        assert_eq!(r[i]["tests"][test]["status"], "memory_exceeded", "item {i}, test {test}: {}", r[i]);
    }
}
