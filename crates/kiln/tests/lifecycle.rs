//! Sessions over time and across restarts: expiry, teardown, first-start
//! key generation, crash recovery, clean shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{eventually, metric, mounts, mounts_under, running, sandboxed_pids, sandboxes, start, start_in, KEY};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;

#[tokio::test(flavor = "multi_thread")]
async fn a_session_expires_after_its_ttl_and_leaves_nothing_behind() {
    let s = start(&["--session-ttl", "4s"]);
    let id = s.exec("x = 1", None).await["session_id"].as_str().unwrap().to_string();
    assert_eq!(s.sessions(KEY).await.len(), 1);
    let dirs_with_session = std::fs::read_dir(s.sessions_dir()).unwrap().count();
    assert!(dirs_with_session >= 2, "pooled kernel + session");
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let (st, v) = s.post("/tci/execute", Some(KEY), json!({"code": "print(x)", "session_id": id})).await;
    assert_eq!(st, 410, "{v}");
    assert_eq!(v["errors"][0]["code"], "session_expired");
    assert!(s.sessions(KEY).await.is_empty());
    // Only the pooled kernel's directory remains, and only its process.
    let dir = s.sessions_dir();
    assert!(eventually(10, || std::fs::read_dir(&dir).unwrap().count() == 1).await);
    assert!(eventually(10, || sandboxes(&dir).len() == 1).await, "{:?}", sandboxes(&dir));
}

#[tokio::test(flavor = "multi_thread")]
async fn many_sessions_come_and_go_without_leaking_processes_or_files() {
    let mut s = start(&["--session-ttl", "12s", "--pool-size", "2"]);
    for i in 0..12 {
        let d = s.exec(&format!("import subprocess\np = subprocess.Popen(['sleep', '300'])\nprint({i})"), None).await;
        assert_eq!(d["status"], "success");
    }
    let dir = s.sessions_dir();
    // The kernels' children (the sleeps) must die with their session too.
    assert!(running(&sandboxed_pids(&dir), "sleep") >= 12);
    // Once the sessions expired, only the warm pool is left (its size
    // adapts to the burst, so ask the server how many it holds).
    let mut settled = false;
    for _ in 0..250 {
        let text = s.metrics().await;
        let live = metric(&text, "kiln_sessions_live");
        let pooled = metric(&text, "kiln_pool_ready").map_or(usize::MAX, |n| n as usize);
        let dirs = s.sessions_dir().read_dir().unwrap().count();
        if live == Some(0.0) && pooled >= 2 && dirs == pooled && sandboxes(&dir).len() == pooled {
            settled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(settled, "leftovers beyond the pool: {:?}", sandboxes(&dir));
    assert_eq!(running(&sandboxed_pids(&dir), "sleep"), 0);
    // The kernel directories came and went on the server's own tmpfs, not
    // on the data directory's disk.
    let all = mounts();
    let sessions = all.iter().find(|(point, _)| *point == s.sessions_dir());
    assert_eq!(sessions.map(|(_, fstype)| fstype.as_str()), Some("tmpfs"), "{all:?}");
    // A clean shutdown takes the pool with it.
    let status = s.stop();
    assert!(status.success(), "{status:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert!(sandboxes(&dir).is_empty(), "{:?}", sandboxes(&dir));
    assert!(mounts_under(&dir).is_empty(), "still mounted: {:?}", mounts_under(&dir));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_start_creates_a_private_key_and_prints_it_once() {
    let data = tempfile::tempdir().unwrap();
    let path = data.path().to_path_buf();
    let s = start_in(data, &[], false);
    let key_file = path.join("api-key");
    let key = std::fs::read_to_string(&key_file).unwrap().trim().to_string();
    assert!(key.starts_with("kiln_") && key.len() >= 40);
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(s.stdout_lines.iter().any(|l| l.contains(&key)), "printed with an example");
    assert!(s.stdout_lines.iter().any(|l| l.contains("curl")));
    let db = std::fs::read(path.join("kiln.db")).unwrap();
    assert!(!db.windows(key.len()).any(|w| w == key.as_bytes()), "only the hash may be stored");
    let (st, v) = s.post("/tci/execute", Some(&key), json!({"code": "print(1)"})).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_servers_kernels_die_with_it_and_a_restart_ends_their_sessions() {
    let data = tempfile::tempdir().unwrap();
    let path = data.path().to_path_buf();
    let mut s = start_in(data, &[], true);
    let id = s.exec("x = 1", None).await["session_id"].as_str().unwrap().to_string();
    let sessions = path.join("sessions");
    let orphans = sandboxed_pids(&sessions);
    assert!(!orphans.is_empty());
    s.crash();
    // No restart needed for the kernels: they go with their server.
    for pid in &orphans {
        assert!(
            eventually(10, || !std::path::Path::new(&format!("/proc/{pid}")).exists()).await,
            "orphan {pid} survived"
        );
    }
    let data = s_take_data(s);
    let s2 = start_in(data, &[], true);
    let (st, v) = s2.post("/tci/execute", Some(KEY), json!({"code": "print(x)", "session_id": id})).await;
    assert_eq!(st, 410, "{v}");
    assert!(s2.sessions(KEY).await.is_empty());
    // Keys and usage survived the crash.
    let (st, v) = s2.raw(reqwest::Method::GET, "/v1/tci/usage", Some(KEY), vec![]).await;
    assert_eq!((st, v["data"]["sessions_started"].clone(), v["data"]["executions"].clone()), (200, json!(1), json!(1)));
}

fn s_take_data(mut s: common::Server) -> tempfile::TempDir {
    let placeholder = tempfile::tempdir().unwrap();
    std::mem::replace(&mut s.data, placeholder)
}

#[test]
fn a_runtime_that_cannot_be_built_stops_the_server_with_a_clear_message() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--listen", "127.0.0.1:0", "--api-key", "k", "--python", "/nonexistent/python3"])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no usable Python") && err.contains("/nonexistent/python3"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_a_config_file_with_flags_taking_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kiln.toml");
    std::fs::write(&cfg, "session_ttl = \"7m\"\nmax_sessions_per_key = 1\napi_keys = [\"from-file\"]\n").unwrap();
    let s = start(&["--config", cfg.to_str().unwrap(), "--max-sessions-per-key", "3"]);
    // --api-key flags (the test keys) win over the file's keys.
    let (st, _) = s.post("/tci/execute", Some("from-file"), json!({"code": "1"})).await;
    assert_eq!(st, 401);
    for _ in 0..3 {
        s.exec("1", None).await;
    }
    let list = s.sessions(KEY).await;
    assert_eq!(list.len(), 3, "the flag's limit of 3 applies, not the file's 1");
    let t = |f: &str| chrono::DateTime::parse_from_rfc3339(list[0][f].as_str().unwrap()).unwrap();
    assert_eq!((t("expires_at") - t("started_at")).num_minutes(), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_sandbox_sessions_still_work_for_trusted_development() {
    let s = start(&["--sandbox", "none"]);
    let d = s.exec("import os\nprint(os.getuid() == 0, os.getcwd().endswith('/data/work'))", None).await;
    assert_eq!(common::text_of(&d, "stdout"), "True True\n");
    assert!(sandboxes(&s.sessions_dir()).is_empty(), "no cgroups without a sandbox");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_running_cells_finish_then_ends_the_rest() {
    let mut s = start(&["--shutdown-grace", "3s", "--pool-size", "2"]);
    let s_url = s.url.clone();
    let http = s.http.clone();
    let send = |code: &'static str| {
        let (http, url) = (http.clone(), s_url.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/tci/execute"))
                .bearer_auth(KEY)
                .json(&json!({"code": code}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        })
    };
    let short = send("import time\ntime.sleep(1.5)\nprint('finished')");
    let long = send("import time\ntime.sleep(120)");
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let t0 = std::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (st, v) = short.await.unwrap();
    assert_eq!((st, common::text_of(&v["data"], "stdout")), (200, "finished\n".to_string()), "{v}");
    let (st, v) = long.await.unwrap();
    assert_eq!((st, v["errors"][0]["code"].clone()), (503, json!("shutting_down")), "{v}");
    let status = s.stop();
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{:?}", t0.elapsed());
    assert!(sandboxes(&s.sessions_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_grows_with_demand_and_never_outgrows_the_session_limit() {
    let s = std::sync::Arc::new(start(&["--pool-size", "1", "--max-sessions", "6"]));
    // A burst: more sessions at once than the pool holds.
    let burst: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.exec("1", None).await })
        })
        .collect();
    for t in burst {
        t.await.unwrap();
    }
    let text = s.metrics().await;
    let target = metric(&text, "kiln_pool_target").unwrap_or(-1.0);
    assert!(target > 1.0, "the target should have grown:\n{text}");
    // It fills up to the target, but the 3 live sessions + the pool stay
    // within the limit of 6.
    let mut ready = 0.0;
    for _ in 0..100 {
        ready = s.metric("kiln_pool_ready").await.unwrap_or(-1.0);
        if ready >= target.min(3.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(ready, target.min(3.0), "pool should fill to its target within the limit");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(sandboxes(&s.sessions_dir()).len() <= 6, "{:?}", sandboxes(&s.sessions_dir()));
}
