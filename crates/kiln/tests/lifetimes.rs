//! How long sandboxes live: never longer than their server, however it
//! ends, and never leaving anything behind.
//!
//! Each test runs real `kiln serve` processes with real sandboxes, kills or
//! stops them, and then looks at the host: processes, cgroup directories,
//! mounts, files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{mounts_under, sandbox_dirs, sandboxed_pids, start, start_in, zygote_pid, Server, KEY};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every `kiln serve` reaps, as it starts, what any dead server on the host
/// left behind. The tests here run at once, so each start takes this lock,
/// and a test that looks at what its killed server left holds it from the
/// kill until it has looked: no other test's start can reap in between.
static STARTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Run `start` (a server's start) under [`STARTS`].
async fn locked<T>(start: impl FnOnce() -> T) -> T {
    let _starting = STARTS.lock().await;
    start()
}

/// A process, identified by pid and start time (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: i32,
    start: u64,
}

impl Proc {
    fn of(pid: i32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        let start = rest.split_whitespace().nth(19)?.parse().ok()?;
        Some(Proc { pid, start })
    }

    /// Still running: same process, not a zombie.
    fn running(self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else { return false };
        let Some((_, rest)) = stat.rsplit_once(')') else { return false };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let start: u64 = fields.nth(18).and_then(|s| s.parse().ok()).unwrap_or(0);
        start == self.start && state != "Z"
    }
}

/// Every process of the server's sandboxes, and its zygote.
fn sandbox_processes(s: &Server) -> Vec<Proc> {
    let mut pids = sandboxed_pids(&s.sessions_dir());
    pids.extend(zygote_pid(s.data.path()));
    pids.into_iter().filter_map(Proc::of).collect()
}

/// Sessions in each state a killed server may leave them in: idle, running
/// a busy loop, and holding children, one of them in its own session and
/// one daemonized (double fork, setsid).
async fn busy_sessions(s: &std::sync::Arc<Server>) {
    s.exec("x = 1", None).await;
    let children = "import subprocess, os\n\
        subprocess.Popen(['sleep', '600'])\n\
        subprocess.Popen(['sleep', '601'], start_new_session=True)\n\
        os.system('setsid sh -c \"sleep 602 & sleep 603\" < /dev/null > /dev/null 2>&1 &')\n\
        print('spawned')";
    let d = s.exec(children, None).await;
    assert_eq!(common::text_of(&d, "stdout"), "spawned\n", "{d}");
    let (http, url) = (s.http.clone(), s.url.clone());
    tokio::spawn(async move {
        let body = json!({"code": "while True: pass"});
        let _ = http.post(format!("{url}/tci/execute")).bearer_auth(KEY).json(&body).send().await;
    });
    // The spinner's session exists once it shows in the listing.
    let mut spinning = false;
    for _ in 0..300 {
        if s.sessions(KEY).await.len() == 3 {
            spinning = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(spinning, "the busy session never started");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// SIGKILL the server; return how long its last sandbox process took to go.
async fn kill_and_time(s: &mut Server, procs: &[Proc]) -> Duration {
    assert!(procs.iter().all(|p| p.running()), "{procs:?}");
    let t0 = Instant::now();
    s.crash();
    loop {
        let left: Vec<Proc> = procs.iter().copied().filter(|p| p.running()).collect();
        if left.is_empty() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "still running 2 s after SIGKILL of the server: {left:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_sigkilled_server_leaves_no_sandbox_process(extra: &[&str]) {
    let s = std::sync::Arc::new(locked(|| start(&[&["--pool-size", "1"], extra].concat())).await);
    busy_sessions(&s).await;
    // pool + 3 sessions, each with init and kernel, plus the children (on a
    // loaded host the pool refills, and the daemonized children appear, a
    // while after the cells that caused them answered).
    assert!(common::eventually(60, || sandbox_processes(&s).len() >= 4 * 2 + 4).await, "{:?}", sandbox_processes(&s));
    let procs = sandbox_processes(&s);
    let mut s = std::sync::Arc::into_inner(s).expect("no other handle");
    let cgroups = sandbox_dirs(&s.sessions_dir());
    let took = kill_and_time(&mut s, &procs).await;
    eprintln!("{extra:?}: the last of {} sandbox processes was gone {took:?} after SIGKILL", procs.len());
    // The next start on the host takes away its (empty) cgroups.
    drop(locked(|| start(extra)).await);
    assert!(cgroups.iter().all(|d| !d.exists()), "{cgroups:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_server_leaves_no_sandbox_process_within_two_seconds() {
    a_sigkilled_server_leaves_no_sandbox_process(&[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_server_without_the_zygote_leaves_no_sandbox_process_within_two_seconds() {
    a_sigkilled_server_leaves_no_sandbox_process(&["--zygote", "off"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_start_with_another_data_dir_removes_a_killed_servers_cgroups_and_mounts() {
    // A live neighbour, whose sandboxes must survive everything below.
    let neighbour = locked(|| start(&[])).await;
    let kept = neighbour.exec("kept = 41", None).await["session_id"].as_str().unwrap().to_string();

    let mut dead = locked(|| start(&[])).await;
    dead.exec("x = 1", None).await;
    let dead_sessions = dead.sessions_dir();
    // The session's kernel, and the pool's once it has refilled (on a
    // loaded host that takes a while after the session took the first).
    let both = || sandbox_dirs(&dead_sessions).len() >= 2 && mounts_under(&dead_sessions).len() >= 2;
    assert!(common::eventually(60, both).await, "{:?}", sandbox_dirs(&dead_sessions));
    let cgroups = sandbox_dirs(&dead_sessions);
    let starting = STARTS.lock().await;
    dead.crash();
    // Its processes die with it, but cgroups and mounts stay until someone
    // reaps them.
    assert!(common::eventually(5, || sandboxed_pids(&dead_sessions).is_empty()).await);
    assert!(cgroups.iter().all(|d| d.exists()));

    let next = start(&[]);
    drop(starting);
    assert!(cgroups.iter().all(|d| !d.exists()), "{cgroups:?}");
    assert!(mounts_under(&dead_sessions).is_empty(), "{:?}", mounts_under(&dead_sessions));
    assert!(common::instance_cgroup(&dead_sessions, "pids").is_none(), "its registration is gone too");
    next.exec("1", None).await;

    // The neighbour noticed nothing.
    let d = neighbour.exec("print(kept + 1)", Some(&kept)).await;
    assert_eq!(common::text_of(&d, "stdout"), "42\n", "{d}");
    assert!(!mounts_under(&neighbour.sessions_dir()).is_empty());
}

/// Everything the server's sandboxes hold on the host, for comparison.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    dirs: usize,
    cgroups: usize,
    mounts: usize,
}

fn footprint(s: &Server) -> Footprint {
    let dir = s.sessions_dir();
    Footprint {
        dirs: std::fs::read_dir(&dir).unwrap().count(),
        cgroups: sandbox_dirs(&dir).len(),
        mounts: mounts_under(&dir).len(),
    }
}

async fn pooled(s: &Server) -> usize {
    s.metric("kiln_pool_ready").await.map_or(usize::MAX, |n| n as usize)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_thousand_sessions_from_four_clients_leave_nothing_beyond_the_pool_and_a_clean_stop_leaves_nothing() {
    const CLIENTS: usize = 4;
    const EACH: usize = 750;
    let data = tempfile::tempdir().unwrap();
    let data_path = data.path().to_path_buf();
    let s = std::sync::Arc::new(locked(|| start_in(data, &["--pool-size", "2", "--max-sessions", "16"], true)).await);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let d = s.exec(&format!("print({c} * {EACH} + {i})"), None).await;
                    assert_eq!(common::text_of(&d, "stdout"), format!("{}\n", c * EACH + i), "{d}");
                    let id = d["session_id"].as_str().unwrap();
                    let url = format!("{}/v1/tci/sessions/{id}", s.url);
                    let r = s.http.delete(url).bearer_auth(KEY).send().await.unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    eprintln!("{} sessions created and deleted in {:?}", CLIENTS * EACH, t0.elapsed());
    assert!(s.sessions(KEY).await.is_empty());
    // Nothing beyond the pool: as many directories and cgroups as pooled
    // kernels, two mounts each (its workspace and its run directory), and
    // the tmpfs that holds their directories.
    let mut settled = None;
    for _ in 0..300 {
        let n = pooled(&s).await;
        let f = footprint(&s);
        if f == (Footprint { dirs: n, cgroups: n, mounts: 2 * n + 1 }) {
            settled = Some(n);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled.is_some(), "leftovers beyond the pool: {:?}", footprint(&s));

    // A clean stop leaves nothing at all.
    let sessions = s.sessions_dir();
    let cgroups: Vec<PathBuf> =
        ["memory", "pids", "cpu", "cpuacct"].iter().filter_map(|c| common::instance_cgroup(&sessions, c)).collect();
    assert!(!cgroups.is_empty());
    let procs = sandbox_processes(&s);
    let mut s = std::sync::Arc::into_inner(s).expect("no other handle");
    assert!(s.stop().success());
    assert!(procs.iter().all(|p| !p.running()), "{procs:?}");
    assert!(cgroups.iter().all(|d| !d.exists()), "{cgroups:?}");
    assert!(mounts_under(&data_path).is_empty(), "{:?}", mounts_under(&data_path));
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 0);
    assert!(common::instance_cgroup(&sessions, "pids").is_none(), "the server's registration is gone");
}

#[test]
fn a_cache_dir_the_sandbox_would_hide_is_refused_at_start_with_a_clear_error() {
    let _starting = STARTS.blocking_lock();
    let data = tempfile::tempdir().unwrap();
    for (flag, env) in [(true, false), (false, true)] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--api-key", "k"]).arg("--data-dir").arg(data.path());
        if flag {
            cmd.args(["--cache-dir", "/tmp/kiln-cache-test"]);
        }
        if env {
            cmd.env("KILN_CACHE_DIR", "/tmp/./kiln-cache-test");
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("/tmp") && err.contains("cache"), "{err}");
        assert!(!Path::new("/tmp/kiln-cache-test").exists(), "nothing is built there");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_cannot_listen_says_why_and_gives_back_its_place_on_the_host() {
    // The port is taken; the server has claimed its place on the host
    // (registration, cgroups, the tmpfs of its kernel directories) by then.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let sessions = data.path().join("sessions");
    let out = locked(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--listen", &addr, "--api-key", KEY])
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .unwrap()
    })
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not listen on") && err.contains(&addr), "{err}");
    assert!(mounts_under(data.path()).is_empty(), "{:?}", mounts_under(data.path()));
    assert!(common::instance_cgroup(&sessions, "pids").is_none(), "its registration and cgroups are gone");
    std::fs::remove_dir(&sessions).expect("an empty directory, no mount point");
}
