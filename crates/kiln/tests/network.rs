//! Network policies and `!pip install`: installs land in the session's own
//! layer, `none` means no network, and the egress proxy refuses everything
//! but what the policy allows. "The internet" is stood in for by a listener
//! in a network namespace this test creates (never an outside address).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of, KEY};
use serde_json::json;
use std::process::Command;

/// A network namespace with a veth link to the host and an HTTP listener
/// on 10.251.<n>.2:8080, removed on drop.
struct FakeInternet {
    ns: String,
    listener: std::process::Child,
    addr: String,
    log: std::path::PathBuf,
}

impl FakeInternet {
    fn new(n: u8) -> FakeInternet {
        let ns = format!("kiln-inet-{}-{n}", std::process::id());
        let (host_if, ns_if) =
            (format!("kh{}{n}", std::process::id() % 10000), format!("kn{}{n}", std::process::id() % 10000));
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns]);
        ip(&["addr", "add", &format!("10.251.{n}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["netns", "exec", &ns, "ip", "addr", "add", &format!("10.251.{n}.2/24"), "dev", &ns_if]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        let log = std::env::temp_dir().join(format!("{ns}.log"));
        let addr = format!("10.251.{n}.2");
        let listener = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-u", "-c"])
            .arg(format!(
                "import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('{addr}', 8080)); s.listen()\nwhile True:\n    c, a = s.accept(); open({log:?}, 'a').write(f'{{a}}\\n'); c.close()",
                log = log.display().to_string()
            ))
            .spawn()
            .unwrap();
        // The host itself reaches it: the stand-in works.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect((addr.as_str(), 8080)).is_err() {
            assert!(std::time::Instant::now() < deadline, "fake internet did not come up");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Our own probe is logged once; count only what comes after it.
        while std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0) < 1 {
            assert!(std::time::Instant::now() < deadline, "fake internet does not log");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        FakeInternet { ns, listener, addr, log }
    }

    fn connections(&self) -> usize {
        std::fs::read_to_string(&self.log).map(|t| t.lines().count()).unwrap_or(0) - 1
    }
}

impl Drop for FakeInternet {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
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
    let inet = FakeInternet::new(71);
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
    let inet = FakeInternet::new(72);
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
    assert!(!s.data.path().join("egress.sock").exists(), "no proxy under the none policy");
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
    assert_eq!(text_of(&mine["data"], "stdout"), "pypi proxy\n", "{mine}");
    let (_, theirs) = s.post("/tci/execute", Some(common::OTHER_KEY), json!({"code": code})).await;
    assert_eq!(text_of(&theirs["data"], "stdout"), "none no proxy\n", "{theirs}");
}
