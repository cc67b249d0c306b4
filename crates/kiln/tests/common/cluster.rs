//! The harness of tests/cluster.rs: kiln nodes that share one real
//! PostgreSQL (kiln-testpg), each in its own network namespace on a bridge
//! the test creates, behind Debian's HAProxy; the HTTP calls the tests make
//! through any node or the balancer, the real clients they run through it,
//! and the measurements of the cluster benchmark.

use super::netns::{free_subnet, ip};
use super::{start_via, text_of, Server, KEY};
use kiln_testpg::PgServer;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "cluster-test-secret-0123456789";
/// Sessions each node may run: the cluster holds three times as many.
pub const PER_NODE: usize = 3;

/// A bridge on a free `10.252.<x>.0/24` (the host is `.1`) and one network
/// namespace per node, linked to it by a veth pair; all removed on drop,
/// also when set-up fails half-way. Tests of one binary that run at once
/// pass different `slot`s (0 to 3): names and subnets never collide.
pub struct Net {
    bridge: Option<String>,
    subnet: u8,
    pub namespaces: Vec<String>,
    host_ifs: Vec<String>,
}

impl Net {
    pub fn new(nodes: usize, slot: u8) -> Net {
        let pid = std::process::id();
        let subnet = free_subnet(252, slot);
        let mut net = Net { bridge: None, subnet, namespaces: Vec::new(), host_ifs: Vec::new() };
        let bridge = format!("kb{pid}{slot}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        net.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{}/24", net.host()), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 1..=nodes {
            let ns = format!("kiln-cl-{pid}-{slot}-{i}");
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            let (host_if, ns_if) = (format!("kc{pid}{slot}h{i}"), format!("kc{pid}{slot}n{i}"));
            ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
            net.host_ifs.push(host_if.clone());
            ip(&["link", "set", &host_if, "master", &bridge]);
            ip(&["link", "set", &host_if, "up"]);
            ip(&["link", "set", &ns_if, "netns", &ns]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.node(i)), "dev", &ns_if]);
            ip(&["-n", &ns, "link", "set", &ns_if, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn host(&self) -> String {
        format!("10.252.{}.1", self.subnet)
    }

    pub fn node(&self, i: usize) -> String {
        format!("10.252.{}.{}", self.subnet, 10 + i)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        };
        for h in &self.host_ifs {
            quiet(&["link", "delete", h]);
        }
        for ns in &self.namespaces {
            quiet(&["netns", "delete", ns]);
        }
        // Only a bridge this value made (never another test's).
        if let Some(bridge) = &self.bridge {
            quiet(&["link", "delete", bridge]);
        }
    }
}

/// HAProxy in front of the nodes: round robin, no stickiness, health checks
/// on `/healthz` every 500 ms; stopped on drop.
pub struct Haproxy {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(nodes: &[String]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let servers: String =
            nodes.iter().enumerate().map(|(i, addr)| format!("    server node{} {addr}:8787 check\n", i + 1)).collect();
        let cfg = format!(
            "global\n    maxconn 512\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n    \
             retries 3\n    option redispatch\n\
             frontend api\n    bind 127.0.0.1:{port}\n    default_backend kiln\n\
             backend kiln\n    balance roundrobin\n    option httpchk GET /healthz\n    \
             default-server inter 500ms fall 2 rise 2\n{servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("haproxy").arg("-db").arg("-f").arg(&path).stdout(Stdio::null()).spawn().unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Haproxy { child, url, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["errors"][0]["code"].as_str().unwrap_or_default()
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).no_proxy().build().unwrap()
}

pub async fn send(base: &str, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> Reply {
    let mut req = http().request(method, format!("{base}{path}")).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{base}{path}: {e}"));
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_string());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    Reply { status, retry_after, body }
}

pub async fn exec(base: &str, key: &str, code: &str, session: Option<&str>) -> Reply {
    let mut body = json!({"language": "python", "code": code});
    if let Some(s) = session {
        body["session_id"] = json!(s);
    }
    send(base, reqwest::Method::POST, "/v1/tci/execute", key, Some(body)).await
}

/// Run `code` in `session` through `base`; panics unless it answered 200.
pub async fn stdout(base: &str, code: &str, session: &str) -> String {
    let r = exec(base, KEY, code, Some(session)).await;
    assert_eq!(r.status, 200, "{base}: {r:?}");
    text_of(&r.body["data"], "stdout")
}

pub async fn new_session(base: &str, key: &str, code: &str) -> String {
    let r = exec(base, key, code, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.body["data"]["session_id"].as_str().unwrap().to_string()
}

pub async fn owner(base: &str, session: &str) -> String {
    let r = send(base, reqwest::Method::GET, &format!("/v1/tci/sessions/{session}"), KEY, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.body["data"]["node"].as_str().unwrap().to_string()
}

/// Start node `i` in its namespace (its data directory kept by the caller
/// for a restart).
pub fn node(net: &Net, i: usize, database: &str, data: tempfile::TempDir) -> Server {
    node_with(net, i, database, data, PER_NODE)
}

/// [`node`] with its own session limit.
pub fn node_with(net: &Net, i: usize, database: &str, data: tempfile::TempDir, max: usize) -> Server {
    let ns = format!("--net=/run/netns/{}", net.namespaces[i - 1]);
    let listen = format!("{}:8787", net.node(i));
    let advertise = format!("http://{listen}");
    let node_id = format!("node-{i}");
    let max = max.to_string();
    start_via(
        &["nsenter", &ns, "--"],
        &listen,
        data,
        &[
            "--database",
            database,
            "--node-id",
            &node_id,
            "--advertise",
            &advertise,
            "--cluster-secret",
            SECRET,
            "--network",
            "none",
            "--max-sessions",
            &max,
        ],
        true,
    )
}

/// One cluster node on loopback (its peers would reach it there), with a
/// short lease.
pub fn solo(db: &str, lease: &str) -> Server {
    solo_named(db, lease, "solo")
}

/// [`solo`] under another node id.
pub fn solo_named(db: &str, lease: &str, node_id: &str) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let advertise = format!("http://{listen}");
    start_via(
        &[],
        &listen,
        tempfile::tempdir().unwrap(),
        &[
            "--database",
            db,
            "--node-id",
            node_id,
            "--advertise",
            &advertise,
            "--cluster-secret",
            SECRET,
            "--lease",
            lease,
            "--network",
            "none",
        ],
        true,
    )
}

pub async fn readyz(s: &Server) -> (u16, String) {
    let r = http().get(format!("{}/readyz", s.url)).send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    (status, v["status"].as_str().unwrap_or_default().to_string())
}

/// A new session of `key` owned by `node` (created through it; placement
/// sends it to a peer while its pool is empty, so it is tried again).
pub async fn session_on(s: &Server, node: &str, code: &str) -> String {
    let began = Instant::now();
    loop {
        let id = new_session(&s.url, KEY, code).await;
        if owner(&s.url, &id).await == node {
            return id;
        }
        assert!(began.elapsed() < Duration::from_secs(30), "no session landed on {node}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Latencies as "p50 / p99 ms".
pub fn p50_p99(mut xs: Vec<Duration>) -> (f64, f64) {
    xs.sort();
    let at = |p: f64| xs[((p * (xs.len() - 1) as f64).round() as usize).min(xs.len() - 1)].as_secs_f64() * 1e3;
    (at(0.50), at(0.99))
}

/// One execute on a kept-alive connection; returns the session id.
pub async fn timed_exec(client: &reqwest::Client, base: &str, code: &str, session: Option<&str>) -> (String, Duration) {
    let mut body = json!({"language": "python", "code": code});
    if let Some(s) = session {
        body["session_id"] = json!(s);
    }
    let began = Instant::now();
    let r = client.post(format!("{base}/v1/tci/execute")).bearer_auth(KEY).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let took = began.elapsed();
    (v["data"]["session_id"].as_str().unwrap().to_string(), took)
}

pub async fn end(client: &reqwest::Client, base: &str, id: &str) {
    let r = client.delete(format!("{base}/v1/tci/sessions/{id}")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// New session + `print(1)` (then ended, untimed), `n` times in a row.
pub async fn bench_new(base: &str, n: usize) -> (f64, f64) {
    let client = http();
    let mut xs = Vec::new();
    for _ in 0..n {
        let (id, took) = timed_exec(&client, base, "print(1)", None).await;
        xs.push(took);
        end(&client, base, &id).await;
    }
    p50_p99(xs)
}

/// Fresh sessions per second (create + `print(1)` + end) from `clients`
/// clients for `secs`.
pub async fn bench_sustained(base: &str, clients: usize, secs: u64) -> f64 {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            let client = http();
            let mut n = 0u64;
            while Instant::now() < until {
                let (id, _) = timed_exec(&client, &base, "print(1)", None).await;
                end(&client, &base, &id).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs as f64
}

/// CPU seconds a node's server process used so far.
pub fn process_cpu(s: &Server) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid())).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// CPU seconds a node used so far: the server process and every sandbox
/// of its instance (cpuacct).
pub fn node_cpu(s: &Server) -> f64 {
    let sandboxes = super::instance_cgroup(&s.sessions_dir(), "cpuacct")
        .and_then(|d| std::fs::read_to_string(d.join("cpuacct.usage")).ok())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9);
    process_cpu(s) + sandboxes
}

pub fn sessions_by_node(pg: &PgServer) -> std::collections::BTreeMap<String, u64> {
    pg.psql("SELECT node_id, count(*) FROM sessions GROUP BY node_id")
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(n, c)| (n.to_string(), c.parse().unwrap()))
        .collect()
}

/// Run tests/clients/mcp_cluster.py (the MCP Python SDK) against `url`
/// with `args`; panics unless every check passed; returns its output.
pub async fn mcp(url: &str, args: &[&str]) -> String {
    let python = super::clients_dir().join("mcp/bin/python");
    let script = super::repo().join("tests/clients/mcp_cluster.py");
    let (url, owned): (String, Vec<String>) = (url.to_string(), args.iter().map(|a| a.to_string()).collect());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).arg(script).args(owned).env("KILN_BASE_URL", url).env("KILN_API_KEY", KEY).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "mcp_cluster.py {args:?}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().last().unwrap_or_default().ends_with(" 0 failed"), "{stdout}");
    stdout
}

/// SIGCONT on drop, so that a failed test never leaves a stopped process
/// for the server's own clean-up to wait on.
pub struct Frozen(pub nix::unistd::Pid);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}
