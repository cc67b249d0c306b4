//! The sessions that a batch's program-only items share (lanes), against a
//! real server: one session serves item after item, and nothing an item
//! leaves behind (files in the work, home, `/tmp` and `/dev/shm`
//! directories, IPC objects, processes, in Python or in bash) reaches the
//! next; an item that wrote into the runtime retires its lane.
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

fn seen(r: &Value) -> Value {
    let out = r["tests"][0]["stdout"].as_str().unwrap_or_default();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("an observer's line ({e}): {r}"))
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
    let now = s.metric("kiln_sessions_started_total").await.unwrap_or(0.0);
    assert_eq!(now - started, 2.0, "seven items, two lanes");
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
