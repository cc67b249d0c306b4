//! The egress wall end to end, with kiln inside a network namespace this
//! test creates, so that "this host" can have public-looking addresses of
//! its own and "the internet" is another namespace behind a veth:
//!
//! ```text
//! test (host netns) --10.254.X.0/24-- kiln netns --198.51.100.0/24, 2001:db8:1::/64-- internet netns
//!                                     203.0.113.7, 2001:db8::7,                       198.51.100.2, 2001:db8:1::2
//!                                     kiln's API on :443,                             a listener on :80
//!                                     a host-only listener on :80
//! ```
//!
//! Nothing here is aimed at an outside address. kiln runs in a private
//! mount namespace too, with a hosts file that names its own addresses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::inet::Net;
use common::{text_of, KEY, OTHER_KEY};
use serde_json::{json, Value};
use std::time::Duration;

/// Python that sends each raw request to the session's proxy and prints,
/// per line, the status line and (when a tunnel opened) the greeting.
fn ask_proxy(requests: &[String]) -> String {
    format!(
        r#"import socket, json
def ask(raw):
    p = socket.create_connection(('127.0.0.1', 3128), timeout=15)
    p.sendall(raw.encode())
    got = b''
    while b'\r\n\r\n' not in got:
        d = p.recv(1)
        if not d: break
        got += d
    status = got.split(b'\r\n')[0].decode(errors='replace')
    greeting = ''
    if ' 200 ' in status:
        greeting = p.recv(100).decode(errors='replace').strip()
    p.close()
    return status + ' | ' + greeting
for raw in json.loads({requests:?}):
    print(ask(raw))"#,
        requests = serde_json::to_string(requests).unwrap()
    )
}

fn connect(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

async fn lines_of(s: &common::Server, key: &str, code: &str) -> Vec<String> {
    let (st, v) = s.post("/tci/execute", Some(key), json!({ "code": code })).await;
    assert_eq!(st, 200, "{v}");
    assert!(text_of(&v["data"], "error").is_empty(), "{v}");
    text_of(&v["data"], "stdout").lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn under_full_egress_every_address_of_this_host_is_refused_and_the_internet_is_reached() {
    let net = Net::new(0);
    let s = net.kiln(&["--network", "full"]);
    // An address that appears after kiln started counts as well.
    net.add_address("203.0.113.8/32");
    let api = net.api.trim_start_matches("http://").to_string();
    let refused = [
        "203.0.113.7:80",
        "[2001:db8::7]:80",
        "kiln-self.test:80",
        "kiln-self6.test:80",
        "203.0.113.7:443", // kiln's own API
        "203.0.113.8:80",
        "198.51.100.1:80", // this host's side of the link to the internet
        "[2001:db8:1::1]:80",
        api.as_str(), // the address the test reaches the API at
    ];
    let reached = ["198.51.100.2:80", "[2001:db8:1::2]:80", "internet.test:80"];
    let requests: Vec<String> = refused.iter().chain(reached.iter()).map(|t| connect(t)).collect();
    let lines = lines_of(&s, KEY, &ask_proxy(&requests)).await;
    assert_eq!(lines.len(), refused.len() + reached.len(), "{lines:?}");
    for (target, line) in refused.iter().zip(&lines) {
        assert!(line.starts_with("HTTP/1.1 403"), "{target}: {line}");
    }
    for (target, line) in reached.iter().zip(&lines[refused.len()..]) {
        assert_eq!(line, "HTTP/1.1 200 Connection established | INTERNET", "{target}");
    }
    assert_eq!(net.connections("host"), 0, "a host-only service was reached");
    assert_eq!(net.connections("inet"), reached.len());

    // Loopback in its many spellings, private ranges, smuggled CRLFs and
    // loose port numbers: refused (400 or 403), never a tunnel. The last
    // ones name the reachable internet, so only the parser refuses them.
    let mut requests: Vec<String> = [
        "2130706433:80",
        "0177.0.0.1:80",
        "0x7f.0.0.1:80",
        "0x7f000001:80",
        "127.1:80",
        "[::ffff:7f00:1]:80",
        "0:80",
        "[::]:80",
        "[fe80::1%lo]:80",
        "[::1]:443",
        "localhost:443",
        "169.254.169.254:80",
        "10.0.0.1:80",
        "172.16.0.1:443",
        "192.168.1.1:443",
        "100.64.0.1:443",
        "198.51.100.2:0080",
        "198.51.100.2:+80",
    ]
    .iter()
    .map(|t| connect(t))
    .collect();
    requests.extend([
        "CONNECT 198.51.100.2:80 HTTP/1.1\r\n\r\n".replace(":80 HTTP", ": 80 HTTP"),
        "CONNECT 198.51.100.2:80\r\nHost: x HTTP/1.1\r\n\r\n".to_string(),
        "CONNECT 198.51.100.2:80 HTTP/1.1\nX-Smuggled: 1\r\n\r\n".to_string(),
        "CONNECT 198.51.100.2:80%0d%0a HTTP/1.1\r\n\r\n".to_string(),
        "GET http://198.51.100.2/ HTTP/1.1\r\nHost: 198.51.100.2\r\n\r\n".to_string(),
    ]);
    let lines = lines_of(&s, KEY, &ask_proxy(&requests)).await;
    assert_eq!(lines.len(), requests.len(), "{lines:?}");
    for (raw, line) in requests.iter().zip(&lines) {
        let refused = ["HTTP/1.1 400", "HTTP/1.1 403", "HTTP/1.1 405"].iter().any(|p| line.starts_with(p));
        assert!(refused, "{raw:?} was not refused: {line}");
    }
    assert_eq!(net.connections("host"), 0, "a host-only service was reached");
    assert_eq!(net.connections("inet"), reached.len(), "a refused request reached the internet");
}

/// The attack: three processes hold as many connections to the session's
/// egress proxy as they can (1,000 each), sending a byte a second, for
/// `secs`; then each writes what it saw to `/work/attack-<n>.json`. Each
/// counts the connections it still holds only once all three have stopped
/// connecting: from then on none is opened, so what they hold between them
/// is at most what was open at one moment, whichever of them ran late (on a
/// loaded host one can start after another's connections have already
/// reached the server's head timeout and freed their slots).
fn attack(secs: u64) -> String {
    format!(
        r#"import subprocess, sys
script = r'''
import json, os, socket, sys, time
held, refused, failed, timed_out, opened_at, closed_after = [], 0, 0, 0, {{}}, []
for i in range(1000):
    c = socket.socket()
    try:
        c.connect(('127.0.0.1', 3128))
    except OSError:
        failed += 1; c.close(); continue
    try:
        c.sendall(b'C')
    except OSError:
        # Refused and closed before its first byte.
        refused += 1; c.close(); continue
    held.append(c); opened_at[c.fileno()] = time.monotonic()
open(f'/work/attack-ready-{{sys.argv[1]}}', 'w').close()
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not all(os.path.exists(f'/work/attack-ready-{{i}}') for i in range(3)):
    time.sleep(0.05)
time.sleep(2)
live = []
for c in held:
    c.setblocking(False)
    try:
        d = c.recv(100)
        if d.startswith(b'HTTP/1.1 429'): refused += 1
        # Let in, then closed by the server when its head did not come in
        # time (connecting 1,000 over TCP can take longer than that).
        elif not d: timed_out += 1
        c.close(); continue
    except BlockingIOError:
        live.append(c)
accepted = len(live)
end = time.monotonic() + {secs}
while live and time.monotonic() < end:
    time.sleep(1)
    still = []
    for c in live:
        try:
            c.send(b'O')
            if c.recv(1) == b'': raise OSError
            closed_after.append(time.monotonic() - opened_at[c.fileno()]); c.close()
        except BlockingIOError:
            still.append(c)
        except OSError:
            closed_after.append(time.monotonic() - opened_at[c.fileno()]); c.close()
    live = still
json.dump({{'accepted': accepted, 'timed_out': timed_out, 'refused': refused, 'failed': failed, 'open_at_end': len(live),
            'longest': max(closed_after, default=0)}}, open(f'/work/attack-{{sys.argv[1]}}.json', 'w'))
'''
for i in range(3):
    subprocess.Popen([sys.executable, '-c', script, str(i)], start_new_session=True)
print('started')"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_session_flooding_its_egress_cannot_take_egress_or_the_api_from_others() {
    let net = Net::new(1);
    let cap = 32;
    let s = net.kiln(&["--network", "full", "--egress-connections", &cap.to_string(), "--egress-idle-timeout", "3s"]);
    let kiln_fds = || std::fs::read_dir(format!("/proc/{}/fd", s.pid())).unwrap().count();
    let kernels = || std::fs::read_dir(s.sessions_dir()).unwrap().count();
    // The victim's session exists before the attack.
    let (_, v) = s.post("/tci/execute", Some(OTHER_KEY), json!({"code": "x = 1"})).await;
    let victim = v["data"]["session_id"].as_str().unwrap().to_string();
    let (before, kernels_before) = (kiln_fds(), kernels());

    let (_, a) = s.post("/tci/execute", Some(KEY), json!({ "code": attack(14) })).await;
    assert_eq!(text_of(&a["data"], "stdout"), "started\n", "{a}");
    let attacker = a["data"]["session_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Meanwhile, the other key: its egress, a new session, an upload, the
    // API.
    let (during, kernels_during) = (kiln_fds(), kernels());
    let tunnel = ask_proxy(&[connect("198.51.100.2:80")]);
    let (st, v) = s.post("/tci/execute", Some(OTHER_KEY), json!({"code": tunnel, "session_id": victim})).await;
    assert_eq!((st, text_of(&v["data"], "stdout")), (200, "HTTP/1.1 200 Connection established | INTERNET\n".into()));
    let fresh = lines_of(&s, OTHER_KEY, &tunnel).await;
    assert_eq!(fresh, ["HTTP/1.1 200 Connection established | INTERNET"]);
    let upload = json!({"files": [{"name": "during.txt", "encoding": "string", "content": "uploaded"}]});
    let (st, v) = s.post(&format!("/v1/tci/sessions/{victim}/files"), Some(OTHER_KEY), upload).await;
    assert!(st < 300, "{st} {v}");
    let (st, v) = s.raw(reqwest::Method::GET, "/healthz", None, Vec::new()).await;
    assert_eq!(st, 200, "{v}");
    // The attacker costs the server its cap in descriptors, no more (and
    // each kernel booted meanwhile its own few).
    let bound = before + 2 + 2 * cap + 16 * kernels_during.saturating_sub(kernels_before) + 20;
    eprintln!(
        "kiln's descriptors: {before} before the attack ({kernels_before} kernels), {during} during it \
         ({kernels_during} kernels; bound {bound})"
    );
    assert!(during <= bound, "kiln held {during} descriptors during the attack ({before} before; bound {bound})");

    // What the attacker saw: never more than its cap at once, the rest
    // told so; and every slow head closed by the server within its head
    // timeout (10 s), not held until the attacker gave up.
    let collect = r#"import json, os, time
for _ in range(60):
    if all(os.path.exists(f'attack-{i}.json') for i in range(3)): break
    time.sleep(1)
print(json.dumps([json.load(open(f'attack-{i}.json')) for i in range(3)]))"#;
    let (st, v) = s.post("/tci/execute", Some(KEY), json!({"code": collect, "session_id": attacker})).await;
    assert_eq!(st, 200, "{v}");
    let results: Vec<Value> =
        serde_json::from_str(&text_of(&v["data"], "stdout")).unwrap_or_else(|e| panic!("{e}: {v}"));
    let sum = |f: &str| results.iter().map(|r| r[f].as_u64().unwrap()).sum::<u64>();
    assert!(sum("accepted") <= cap as u64, "{results:?}");
    // Every connection was either let in (open at the check, or closed
    // by the server for its slow head before it) or told it was over the cap.
    let let_in = sum("accepted") + sum("timed_out");
    assert!(let_in > 0 && let_in + sum("refused") == 3000, "{results:?}");
    assert_eq!(sum("failed"), 0, "{results:?}");
    assert_eq!(sum("open_at_end"), 0, "{results:?}");
    let longest = results.iter().map(|r| r["longest"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(longest < 14.0, "a slow head was held {longest} s: {results:?}");

    // The attacker's own slots are free again, and an idle tunnel closes
    // after the idle timeout (3 s) while a busy one stays.
    let idle = r#"import socket, time
def tunnel():
    p = socket.create_connection(('127.0.0.1', 3128), timeout=20)
    p.sendall(b'CONNECT 198.51.100.2:80 HTTP/1.1\r\n\r\n')
    got = b''
    while not got.endswith(b'\r\n\r\nINTERNET\n'):
        got += p.recv(1)
    return p
busy, quiet = tunnel(), tunnel()
t = time.monotonic()
for i in range(6):
    time.sleep(1); busy.sendall(b'.'); assert busy.recv(1) == b'.'
print('busy open after', time.monotonic() - t >= 6)
print('quiet closed', quiet.recv(1) == b'')"#;
    let (st, v) = s.post("/tci/execute", Some(KEY), json!({"code": idle, "session_id": attacker})).await;
    assert_eq!((st, text_of(&v["data"], "stdout")), (200, "busy open after True\nquiet closed True\n".into()), "{v}");
}
