//! What a cluster node tells its peers about its memory when it runs in a
//! cgroup with a limit, as in a Kubernetes pod: what the limit leaves, not
//! the host's free memory (placement would send sessions to a full pod).
//!
//! The test makes the cgroup itself (v1 or v2, whichever holds the memory
//! controller here), starts a real `kiln serve` in it, and reads the row
//! the node wrote to its store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// A memory cgroup made for the test, removed (children first) when
/// dropped.
struct Limited {
    dir: PathBuf,
}

impl Limited {
    fn new(limit: u64) -> Limited {
        let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
        let root = if v1 { Path::new("/sys/fs/cgroup/memory") } else { Path::new("/sys/fs/cgroup") };
        if !v1 {
            // The root gives its children the controllers kiln's sandboxes
            // need (a no-op where it does already).
            for c in ["+memory", "+pids", "+cpu"] {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), c);
            }
        }
        let dir = root.join(format!("kiln-test-memory-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let file = if v1 { "memory.limit_in_bytes" } else { "memory.max" };
        std::fs::write(dir.join(file), limit.to_string()).unwrap();
        Limited { dir }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Limited {
    fn drop(&mut self) {
        // After a failed assertion the server was killed, not stopped: its
        // processes may take a moment to leave.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.dir.exists() && Instant::now() < deadline {
            remove_tree(&self.dir);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn host_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb = text.lines().find_map(|l| l.strip_prefix("MemAvailable:")).unwrap();
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// The memory the node published in its store (SQLite, read by Python's
/// sqlite3), once it has a row.
fn published(db: &Path) -> Option<u64> {
    let script = "import sqlite3, sys\n\
        c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True, timeout=5)\n\
        for (m,) in c.execute('SELECT memory_available_bytes FROM nodes'): print(m)";
    let out = std::process::Command::new("python3").args(["-c", script]).arg(db).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_in_a_memory_limited_cgroup_publishes_what_the_limit_leaves_not_the_host_s_free_memory() {
    let limit = 2 * GIB;
    let host = host_available();
    assert!(host > 2 * limit, "the host must have more than twice the limit free for this test to tell ({host})");
    let cgroup = Limited::new(limit);
    let procs = cgroup.dir.join("cgroup.procs");
    // The shell joins the cgroup, then becomes kiln (same pid).
    let join = format!("echo $$ > '{}' && exec \"$@\"", procs.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let advertise = format!("http://{listen}");
    let s = common::start_via(
        &["sh", "-c", &join, "sh"],
        &listen,
        tempfile::tempdir().unwrap(),
        &["--node-id", "limited", "--advertise", &advertise, "--cluster-secret", "a-secret-of-at-least-32-characters!"],
        true,
    );
    let members = std::fs::read_to_string(&procs).unwrap();
    assert!(members.lines().any(|l| l.trim() == s.pid().to_string()), "kiln runs in the test's cgroup: {members}");
    // A session, so that the cgroup holds sandboxes too.
    s.exec("x = 1", None).await;

    let db = s.data.path().join("kiln.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    let memory = loop {
        if let Some(m) = published(&db).filter(|m| *m > 0) {
            break m;
        }
        assert!(Instant::now() < deadline, "the node never published its memory");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(memory <= limit, "published {memory} bytes with a limit of {limit} (host has {host} free)");
    // kiln and its sandboxes use some of the limit, but far from all of it.
    assert!(memory > limit / 4, "published {memory} bytes of {limit}");
    let mut s = s;
    assert!(s.stop().success());
    drop(cgroup);
}
