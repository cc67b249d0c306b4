//! Network policies and `!pip install`: installs land in the session's own
//! layer, `none` means no network, and the egress proxy refuses everything
//! but what the policy allows. "The internet" is stood in for by a listener
//! in a network namespace this test creates (never an outside address).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::netns::{free_subnet, ip};
use common::{start, text_of, KEY};
use serde_json::json;
use std::process::Command;

/// A network namespace with a veth link to the host and an HTTP listener
/// on `10.251.<free>.2:8080`, removed on drop (also when set-up fails
/// half-way).
struct FakeInternet {
    ns: String,
    host_if: String,
    listener: Option<std::process::Child>,
    addr: String,
    log: std::path::PathBuf,
}

impl FakeInternet {
    fn new(slot: u8) -> FakeInternet {
        let pid = std::process::id();
        let x = free_subnet(251, slot);
        let ns = format!("kiln-inet-{pid}-{slot}");
        let (host_if, ns_if) = (format!("kh{pid}{slot}"), format!("kn{pid}{slot}"));
        let log = std::env::temp_dir().join(format!("{ns}.log"));
        let addr = format!("10.251.{x}.2");
        let mut inet = FakeInternet { ns: ns.clone(), host_if: host_if.clone(), listener: None, addr, log };
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns]);
        ip(&["addr", "add", &format!("10.251.{x}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", inet.addr), "dev", &ns_if]);
        ip(&["-n", &ns, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let listener = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["--", "python3", "-u", "-c"])
            .arg(format!(
                "import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('{addr}', 8080)); s.listen()\nwhile True:\n    c, a = s.accept(); open({log:?}, 'a').write(f'{{a}}\\n'); c.close()",
                addr = inet.addr,
                log = inet.log.display().to_string()
            ))
            .spawn()
            .unwrap();
        inet.listener = Some(listener);
        // The host itself reaches it: the stand-in works.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect((inet.addr.as_str(), 8080)).is_err() {
            assert!(std::time::Instant::now() < deadline, "fake internet did not come up");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Our own probe is logged once; count only what comes after it.
        while std::fs::read_to_string(&inet.log).map(|t| t.lines().count()).unwrap_or(0) < 1 {
            assert!(std::time::Instant::now() < deadline, "fake internet does not log");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        inet
    }

    fn connections(&self) -> usize {
        std::fs::read_to_string(&self.log).map(|t| t.lines().count()).unwrap_or(0) - 1
    }
}

impl Drop for FakeInternet {
    fn drop(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = l.kill();
            let _ = l.wait();
        }
        // Deleting either end of the veth deletes both.
        let _ = Command::new("ip").args(["link", "delete", &self.host_if]).stderr(std::process::Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "delete", &self.ns]).status();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Python that tries the target directly and through the session's proxy.
fn probe(addr: &str) -> String {
    format!(
        r#"import socket, os
s = socket.socket(); s.settimeout(3)
try:
    s.connect(('{addr}', 8080)); print('DIRECT-CONNECTED')
except OSError as e:
    print('direct', type(e).__name__)
p = socket.socket(); p.settimeout(5)
try:
    p.connect(('127.0.0.1', 3128))
    p.sendall(b'CONNECT {addr}:8080 HTTP/1.1\r\nHost: {addr}:8080\r\n\r\n')
    print('proxy', p.recv(200).split(b'\r\n')[0].decode())
except OSError as e:
    print('proxy', type(e).__name__)"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pypi_policy_reaches_nothing_but_the_package_index() {
    let inet = FakeInternet::new(0);
    let s = start(&["--network", "pypi"]);
    let d = s.exec(&probe(&inet.addr), None).await;
    let out = text_of(&d, "stdout");
    assert!(!out.contains("CONNECTED") && out.contains("direct OSError"), "{out}");
    assert!(out.contains("proxy HTTP/1.1 403"), "{out}");
    // Neither the host's loopback nor the API port through the proxy.
    let port = s.url.rsplit(':').next().unwrap();
    let d = s.exec(&probe("127.0.0.1").replace("8080", port), None).await;
    assert!(text_of(&d, "stdout").contains("proxy HTTP/1.1 403"), "{d}");
    assert_eq!(inet.connections(), 0, "the stand-in internet was reached");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_full_policy_still_refuses_private_networks_and_this_host() {
    let inet = FakeInternet::new(1);
    let s = start(&["--network", "full"]);
    let d = s.exec(&probe(&inet.addr).replace("8080", "443"), None).await;
    let out = text_of(&d, "stdout");
    assert!(out.contains("direct OSError") && out.contains("proxy HTTP/1.1 403"), "{out}");
    let d = s.exec(&probe("localhost").replace("8080", "443"), None).await;
    assert!(text_of(&d, "stdout").contains("proxy HTTP/1.1 403"), "{d}");
    assert_eq!(inet.connections(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pip_installs_into_the_session_s_own_layer() {
    let s = start(&["--network", "pypi", "--pool-size", "2"]);
    let d = s.exec("!pip install tabulate\nimport tabulate\nprint('imported', tabulate.__name__)", None).await;
    let out = text_of(&d, "stdout");
    assert!(out.contains("Successfully installed tabulate") && out.contains("imported tabulate"), "{d}");
    // Another session does not see it, and the shared runtime is untouched.
    let d = s
        .exec("import importlib.util, sysconfig\nprint(importlib.util.find_spec('tabulate'), sysconfig.get_paths()['purelib'])", None)
        .await;
    let out = text_of(&d, "stdout");
    assert!(out.starts_with("None "), "{out}");
    // The runtime's site-packages, as its interpreter names it (the same
    // path inside and on the host).
    let site_packages = std::path::Path::new(out.trim().split(' ').nth(1).unwrap());
    assert!(site_packages.is_dir(), "{out}");
    assert!(!site_packages.join("tabulate").exists());
    // A package that does not exist fails cleanly, and the session lives on.
    let d = s.exec("!pip install kiln-no-such-package-7f3a9\nprint('still here')", None).await;
    let all = format!("{}{}", text_of(&d, "stdout"), text_of(&d, "stderr"));
    assert!(all.contains("No matching distribution found for kiln-no-such-package-7f3a9"), "{all}");
    assert!(all.contains("still here"));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_network_pip_fails_fast_and_says_so() {
    let s = start(&["--network", "none"]);
    let t0 = std::time::Instant::now();
    let (st, v) = s
        .post(
            "/tci/execute",
            Some(KEY),
            json!({"code": "import os\nprint(os.environ['KILN_NETWORK'])\n!pip install tabulate"}),
        )
        .await;
    assert_eq!(st, 200);
    let out = format!("{}{}", text_of(&v["data"], "stdout"), text_of(&v["data"], "stderr"));
    assert!(out.starts_with("none\n"), "{out}");
    assert!(out.contains("ERROR: No matching distribution found for tabulate"), "{out}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(60), "{:?}", t0.elapsed());
    // No proxy at all: nothing listens inside the session.
    assert_eq!(s.exec(SOCKET_INSIDE, None).await["outputs"][0]["data"], "no proxy\n");
}

/// Python that asks the session's proxy (if it has one) for a private
/// address and prints the first line of the answer: kiln's refusal where
/// there is a proxy, "no proxy" where nothing listens.
const SOCKET_INSIDE: &str = "import socket\ns = socket.socket(); s.settimeout(5)\ntry:\n    s.connect(('127.0.0.1', 3128))\nexcept OSError:\n    print('no proxy')\nelse:\n    s.sendall(b'CONNECT 10.0.0.1:443 HTTP/1.1\\r\\n\\r\\n')\n    print(s.makefile('rb').readline().decode().strip())";

/// How many processes the session has, as `ps` would see them inside, and
/// their names.
const PROCESSES_INSIDE: &str =
    "import os\nnames = sorted(open(f'/proc/{p}/comm').read().strip() for p in os.listdir('/proc') if p.isdigit())\nprint(len(names), names)";

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_NETWORK")
        .env("KILN_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_key_cannot_ask_for_more_network_than_the_server_allows() {
    let data = tempfile::tempdir().unwrap();
    let key = format!("{KEY}:full");
    let args = ["serve", "--listen", "127.0.0.1:0", "--profile", "minimal", "--data-dir"];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args).arg(data.path()).args(["--network", "none", "--api-key", "other", "--api-key", &key]);
    let out = cmd.env_remove("KILN_CONFIG").env_remove("KILN_API_KEY").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kiln started: {err}");
    assert!(err.contains("--api-key number 2 asks for network policy full"), "{err}");
    assert!(err.contains("wider than this server's --network none"), "{err}");
    assert!(!err.contains(KEY), "the key itself was printed: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_keys_create_refuses_more_network_than_the_server_s_and_a_narrowed_server_clamps_stored_keys() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let mut s = common::start_in(data, &["--network", "full"], true);
    let d = dir.to_str().unwrap();
    let created = kiln(&["keys", "create", "--network", "full", "--label", "wide", "--data-dir", d]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let wide = String::from_utf8_lossy(&created.stdout).trim().to_string();
    // A running server takes new keys up within seconds.
    let code = json!({"code": "import os; print(os.environ['KILN_NETWORK'])"});
    let mut answer = s.post("/tci/execute", Some(&wide), code.clone()).await;
    for _ in 0..50 {
        if answer.0 != 401 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        answer = s.post("/tci/execute", Some(&wide), code.clone()).await;
    }
    let (st, v) = answer;
    assert_eq!((st, text_of(&v["data"], "stdout")), (200, "full\n".to_string()), "{v}");
    s.stop();
    let data = std::mem::replace(&mut s.data, tempfile::tempdir().unwrap());
    drop(s);

    // The same data dir under a narrower server: the stored key is clamped.
    let s = common::start_in(data, &["--network", "none"], true);
    let code = format!("import os\nprint(os.environ['KILN_NETWORK'])\n{SOCKET_INSIDE}");
    let (st, v) = s.post("/tci/execute", Some(&wide), json!({ "code": code })).await;
    assert_eq!((st, text_of(&v["data"], "stdout")), (200, "none\nno proxy\n".to_string()), "{v}");
    // And a new key cannot ask for more than this server's policy.
    let refused = kiln(&["keys", "create", "--network", "pypi", "--data-dir", d]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("this key asks for network policy registries") && err.contains("--network none"), "{err}");
    assert!(String::from_utf8_lossy(&refused.stdout).trim().is_empty(), "a key was printed");
    let narrow = kiln(&["keys", "create", "--network", "none", "--data-dir", d]);
    assert!(narrow.status.success(), "{}", String::from_utf8_lossy(&narrow.stderr));
    // Nor through the API (the first configured key is an admin key).
    let (st, v) = s.post("/v1/admin/keys", Some(KEY), json!({"network": "full"})).await;
    assert_eq!((st, v["errors"][0]["code"].as_str()), (400, Some("invalid_request")), "{v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("--network none"), "{v}");
    let (st, v) = s.post("/v1/admin/keys", Some(KEY), json!({"network": "none"})).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_can_have_its_own_network_policy() {
    let other = format!("{}:none", common::OTHER_KEY);
    let s = common::start_in(
        tempfile::tempdir().unwrap(),
        &["--network", "pypi", "--api-key", KEY, "--api-key", &other],
        false,
    );
    let code = "import os, socket\ns = socket.socket(); s.settimeout(3)\ntry:\n    s.connect(('127.0.0.1', 3128)); print(os.environ['KILN_NETWORK'], 'proxy')\nexcept OSError:\n    print(os.environ['KILN_NETWORK'], 'no proxy')";
    let (_, mine) = s.post("/tci/execute", Some(KEY), json!({"code": code})).await;
    assert_eq!(text_of(&mine["data"], "stdout"), "registries proxy\n", "{mine}");
    let (_, theirs) = s.post("/tci/execute", Some(common::OTHER_KEY), json!({"code": code})).await;
    assert_eq!(text_of(&theirs["data"], "stdout"), "none no proxy\n", "{theirs}");
    // The proxy a session with egress reaches is kiln's, which refuses a
    // private address; the `none` key's session has none.
    let mine_id = &mine["data"]["session_id"];
    let (_, mine) = s.post("/tci/execute", Some(KEY), json!({"code": SOCKET_INSIDE, "session_id": mine_id})).await;
    assert_eq!(text_of(&mine["data"], "stdout"), "HTTP/1.1 403 Forbidden\n", "{mine}");
    let theirs_id = &theirs["data"]["session_id"];
    let (_, theirs) =
        s.post("/tci/execute", Some(common::OTHER_KEY), json!({"code": SOCKET_INSIDE, "session_id": theirs_id})).await;
    assert_eq!(text_of(&theirs["data"], "stdout"), "no proxy\n", "{theirs}");
    // The proxy is served from outside: no process of the session's relays
    // for it (with egress or without, a session is its init and its kernel).
    for (key, id) in [(KEY, mine_id), (common::OTHER_KEY, theirs_id)] {
        let (_, ps) = s.post("/tci/execute", Some(key), json!({"code": PROCESSES_INSIDE, "session_id": id})).await;
        let names = text_of(&ps["data"], "stdout");
        assert!(names.starts_with("2 "), "a session with egress runs more than its init and kernel: {names}");
    }
}
