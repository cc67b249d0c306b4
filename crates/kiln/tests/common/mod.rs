//! A real `kiln serve` process for the integration tests.
//!
//! Each [`Server`] runs the built binary on a free loopback port (`:0`; the
//! port is read back from the ready line), with its own temporary data dir
//! and the shared runtime cache, and is stopped with SIGTERM when dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod inet;
pub mod netns;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY: &str = "test-key-one";
pub const OTHER_KEY: &str = "test-key-two";

pub struct Server {
    pub child: Option<Child>,
    pub url: String,
    pub data: tempfile::TempDir,
    pub stdout_lines: Vec<String>,
    pub http: reqwest::Client,
}

/// Options beyond the defaults every test server gets.
pub fn start(extra: &[&str]) -> Server {
    start_in(tempfile::tempdir().expect("tempdir"), extra, true)
}

pub fn start_in(data: tempfile::TempDir, extra: &[&str], with_keys: bool) -> Server {
    start_via(&[], "127.0.0.1:0", data, extra, with_keys)
}

/// Like [`start_in`], listening on `listen`, started through `prefix`: a
/// command that ends by exec'ing the rest of its arguments (such as
/// `nsenter --net=... --`), so that the child is still kiln itself.
pub fn start_via(prefix: &[&str], listen: &str, data: tempfile::TempDir, extra: &[&str], with_keys: bool) -> Server {
    start_full(prefix, listen, data, extra, with_keys, &[])
}

/// Like [`start`], with extra environment variables (test-only hooks).
pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
    start_full(&[], "127.0.0.1:0", tempfile::tempdir().expect("tempdir"), extra, true, env)
}

fn start_full(
    prefix: &[&str],
    listen: &str,
    data: tempfile::TempDir,
    extra: &[&str],
    with_keys: bool,
    env: &[(&str, &str)],
) -> Server {
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(kiln_bin());
            cmd
        }
        None => Command::new(kiln_bin()),
    };
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data.path())
        .args(extra)
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_CONFIG")
        .env("KILN_LOG", "info,zeromq=warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // Tests run on the small runtime unless they ask for another.
    if !extra.contains(&"--profile") {
        cmd.args(["--profile", "minimal"]);
    }
    if !extra.contains(&"--pool-size") {
        cmd.args(["--pool-size", "1"]);
    }
    if with_keys {
        cmd.args(["--api-key", KEY, "--api-key", OTHER_KEY]);
    }
    let mut child = cmd.spawn().expect("spawn kiln");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first run of the suite may build the runtime (~1 min).
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut lines = Vec::new();
    let url = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("kiln ready on ") {
                    let url = rest.split_whitespace().next().unwrap().to_string();
                    lines.push(line);
                    break url;
                }
                lines.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("kiln did not become ready: {status:?}; stdout so far: {lines:?}");
            }
        }
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
    Server { child: Some(child), url, data, stdout_lines: lines, http }
}

impl Server {
    pub async fn post(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        self.raw(reqwest::Method::POST, path, key, serde_json::to_vec(&body).unwrap()).await
    }

    pub async fn raw(&self, method: reqwest::Method, path: &str, key: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.url, path)).body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON body ({status}): {text}"));
        (status, v)
    }

    /// Execute with the main key; panics unless the request itself succeeded.
    pub async fn exec(&self, code: &str, session: Option<&str>) -> Value {
        let mut body = json!({"language": "python", "code": code});
        if let Some(s) = session {
            body["session_id"] = json!(s);
        }
        let (status, v) = self.post("/tci/execute", Some(KEY), body).await;
        assert_eq!(status, 200, "{v}");
        v["data"].clone()
    }

    /// The server's `/metrics` page (Prometheus text).
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(format!("{}/metrics", self.url)).send().await.expect("scrape /metrics");
        resp.text().await.expect("/metrics body")
    }

    /// One value from a fresh scrape of `/metrics`; see [`metric`].
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric(&self.metrics().await, name)
    }

    pub async fn sessions(&self, key: &str) -> Vec<Value> {
        let resp = self.http.get(format!("{}/v1/tci/sessions", self.url)).bearer_auth(key).send().await.expect("list");
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = resp.json().await.expect("json");
        v["data"]["sessions"].as_array().cloned().unwrap_or_default()
    }

    pub fn sessions_dir(&self) -> PathBuf {
        self.data.path().join("sessions")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kiln did not stop within 60s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, like a crash.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // After a failed assertion, a second panic here would abort the
        // whole test binary (and leak what other tests' drops clean up).
        if std::thread::panicking() {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        } else if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// The kiln binary the servers run: the one cargo built for the tests, or
/// `KILN_BENCH_BIN` (benchmarks run a release build).
pub fn kiln_bin() -> PathBuf {
    std::env::var_os("KILN_BENCH_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kiln")), PathBuf::from)
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The real clients and tools the suite drives kiln with, installed (once,
/// idempotently) by `scripts/setup-clients` into the test cache.
pub fn clients_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let cache = std::env::var_os("KILN_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kiln-test"));
        let dir = cache.join("clients");
        let st = Command::new(repo().join("scripts/setup-clients")).arg(&dir).status().unwrap();
        assert!(st.success(), "scripts/setup-clients failed");
        dir
    })
    .clone()
}

/// The value of the sample `name` in Prometheus text: a whole name, with its
/// labels if it has any (`kiln_pool_ready`, or
/// `kiln_pool_ready_by_language{language="python"}`), so that one name is
/// never read as the start of a longer one.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Run one of the real clients' seed examples (`tests/clients/<script>`,
/// with `program`) against the server at `url`: it must exit cleanly and
/// report at least one passed example and none failed.
pub fn run_client(program: PathBuf, script: &str, url: &str) {
    let out = Command::new(&program)
        .arg(repo().join("tests/clients").join(script))
        .env("KILN_BASE_URL", url)
        .env("KILN_API_KEY", KEY)
        .env("KILN_NODE_CLIENT_DIR", clients_dir().join("node"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed against {url}:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" 0 failed") && !last.starts_with("0 passed"), "{script}: {last}");
}

/// Text of all outputs of one type, concatenated.
pub fn text_of(data: &Value, kind: &str) -> String {
    data["outputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["type"] == kind)
        .map(|o| o["data"].as_str().unwrap_or_default().to_string())
        .collect()
}

pub fn types_of(data: &Value) -> Vec<String> {
    data["outputs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| o["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The cgroup directory of the server whose sessions live in `dir`, in the
/// hierarchy of `controller` (v1), or in the unified one (v2).
pub fn instance_cgroup(dir: &Path, controller: &str) -> Option<PathBuf> {
    let dirs = kiln_sandbox::instance_cgroups(dir);
    let pick = |name: &str| dirs.iter().find(|(c, _)| c == name).map(|(_, d)| d.clone());
    pick(controller).or_else(|| pick("unified"))
}

/// The cgroup directories of the server's live sandboxes.
pub fn sandbox_dirs(dir: &Path) -> std::collections::BTreeSet<PathBuf> {
    instance_cgroup(dir, "pids")
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flat_map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()))
        .collect()
}

/// The live sandboxes of the server whose sessions live in `dir`: one entry
/// per session cgroup, with the pids in it.
pub fn sandboxes(dir: &Path) -> Vec<Vec<i32>> {
    sandbox_dirs(dir)
        .iter()
        .map(|d| {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            procs.lines().filter_map(|l| l.trim().parse().ok()).collect()
        })
        .collect()
}

/// The pid of the zygote of the server whose data dir is `data`: the
/// process whose output goes to `<data>/zygote/log`.
pub fn zygote_pid(data: &Path) -> Option<i32> {
    let log = data.join("zygote").join("log");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|l| l == log))
}

/// The host's mounts, as (mount point, filesystem type) from this
/// process's `/proc/self/mountinfo`, the mount points unescaped.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // Optional fields end at a lone "-"; the type follows it.
            let fstype = f.iter().position(|x| *x == "-").map(|i| f[i + 1]).unwrap_or_default();
            (PathBuf::from(std::ffi::OsString::from_vec(unescape_octal(f[4]))), fstype.to_string())
        })
        .collect()
}

/// mountinfo writes a space, tab, newline or backslash in a path as `\ooo`
/// (octal): the path's bytes back.
fn unescape_octal(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).filter(|_| bytes[i] == b'\\');
        match code.and_then(|d| u8::from_str_radix(d, 8).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// The mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts().into_iter().map(|(point, _)| point).filter(|p| p.starts_with(dir)).collect()
}

/// All pids in the server's sandboxes.
pub fn sandboxed_pids(dir: &Path) -> Vec<i32> {
    sandboxes(dir).into_iter().flatten().collect()
}

/// Pids among `pids` running the program `comm`.
pub fn running(pids: &[i32], comm: &str) -> usize {
    pids.iter().filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)).count()
}

/// `kiln keys list --json` for the server whose data dir is `data`.
pub fn listed_keys(data: &Path) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["keys", "list", "--json"])
        .env("KILN_DATA_DIR", data)
        .output()
        .unwrap();
    assert!(out.status.success(), "kiln keys list: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Poll `f` until it holds or `secs` pass.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::metric;

    const TEXT: &str = "\
# HELP kiln_pool_ready Ready kernels in the warm pool.
# TYPE kiln_pool_ready gauge
kiln_pool_ready_by_language{language=\"python\"} 4
kiln_pool_ready 2
kiln_pool_target 3.5 1700000000
";

    #[test]
    fn a_metric_is_read_by_its_whole_name_and_never_by_a_prefix() {
        assert_eq!(metric(TEXT, "kiln_pool_ready"), Some(2.0));
        assert_eq!(metric(TEXT, "kiln_pool_ready_by_language{language=\"python\"}"), Some(4.0));
        assert_eq!(metric(TEXT, "kiln_pool_target"), Some(3.5));
        assert_eq!(metric(TEXT, "kiln_pool"), None);
        assert_eq!(metric(TEXT, "kiln_pool_ready_by_language"), None);
        assert_eq!(metric(TEXT, "kiln_sessions_live"), None);
    }
}
