//! "The internet" and a host with public addresses of its own, for tests of
//! what sessions may reach: kiln runs in a network namespace with
//! public-looking addresses (and a hosts file naming them), "the internet"
//! is another namespace behind a veth, each with listeners that log every
//! connection. Never an outside address.
//!
//! ```text
//! test (host netns) --10.254.X.0/24-- kiln netns --198.51.100.0/24, 2001:db8:1::/64-- internet netns
//!                                     203.0.113.7, 2001:db8::7,                       198.51.100.2, 2001:db8:1::2
//!                                     kiln's API on :443,                             a listener on :80
//!                                     a host-only listener on :80                     (and any added)
//! ```
//!
//! Names: `kiln-self.test`, `kiln-self6.test` (this host), `internet.test`
//! and `npm-registry.test` (the internet listener's address).

use super::netns::{free_subnet, ip};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The namespaces, links, listeners and files of one test; removed on drop.
pub struct Net {
    kiln_ns: String,
    inet_ns: String,
    host_if: String,
    /// The kiln namespace's side of the link to the test.
    kiln_if: String,
    listeners: Vec<Child>,
    dir: tempfile::TempDir,
    /// kiln's API, as the test reaches it.
    pub api: String,
}

/// A TCP listener on `port` of every address of `ns` that greets each
/// connection with `greeting`, echoes what it gets, and logs the peer.
fn listener(ns: &str, port: u16, greeting: &str, log: &std::path::Path, ready: &std::path::Path) -> Child {
    let script = r#"
import socket, sys, threading
log, greeting, ready, port = sys.argv[1], sys.argv[2].encode() + b'\n', sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(('::', port)); s.listen(256)
open(ready, 'w').close()
def serve(c, a):
    with open(log, 'a') as f: f.write(a[0] + '\n')
    try:
        c.sendall(greeting)
        while True:
            d = c.recv(4096)
            if not d: break
            c.sendall(d)
    except OSError: pass
    c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#;
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["--", "python3", "-u", "-c", script])
        .arg(log)
        .arg(greeting)
        .arg(ready)
        .arg(port.to_string())
        .spawn()
        .unwrap()
}

impl Net {
    pub fn new(slot: u8) -> Net {
        let id = std::process::id();
        let x = free_subnet(254, slot);
        let (kiln_ns, inet_ns) = (format!("kiln-egress-{id}-{slot}"), format!("kiln-inet6-{id}-{slot}"));
        let (host_if, kiln_if) = (format!("eh{id}{slot}"), format!("ek{id}{slot}"));
        let (kiln_inet_if, inet_if) = (format!("ei{id}{slot}"), format!("ej{id}{slot}"));
        let dir = tempfile::tempdir().unwrap();
        let mut net = Net {
            kiln_ns: kiln_ns.clone(),
            inet_ns: inet_ns.clone(),
            host_if: host_if.clone(),
            kiln_if: kiln_if.clone(),
            listeners: Vec::new(),
            dir,
            api: format!("http://10.254.{x}.2:443"),
        };
        ip(&["netns", "add", &kiln_ns]);
        ip(&["netns", "add", &inet_ns]);
        // The test's way to the API.
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &kiln_if]);
        ip(&["link", "set", &kiln_if, "netns", &kiln_ns]);
        ip(&["addr", "add", &format!("10.254.{x}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let k = |args: &[&str]| ip(&[&["-n", kiln_ns.as_str()][..], args].concat());
        k(&["link", "set", "lo", "up"]);
        k(&["addr", "add", &format!("10.254.{x}.2/24"), "dev", &kiln_if]);
        // This host's public addresses, as a machine on the internet has.
        k(&["addr", "add", "203.0.113.7/32", "dev", &kiln_if]);
        k(&["addr", "add", "2001:db8::7/128", "dev", &kiln_if, "nodad"]);
        k(&["link", "set", &kiln_if, "up"]);
        // The internet.
        k(&["link", "add", &kiln_inet_if, "type", "veth", "peer", "name", &inet_if]);
        k(&["link", "set", &inet_if, "netns", &inet_ns]);
        k(&["addr", "add", "198.51.100.1/24", "dev", &kiln_inet_if]);
        k(&["addr", "add", "2001:db8:1::1/64", "dev", &kiln_inet_if, "nodad"]);
        k(&["link", "set", &kiln_inet_if, "up"]);
        let i = |args: &[&str]| ip(&[&["-n", inet_ns.as_str()][..], args].concat());
        i(&["link", "set", "lo", "up"]);
        i(&["addr", "add", "198.51.100.2/24", "dev", &inet_if]);
        i(&["addr", "add", "2001:db8:1::2/64", "dev", &inet_if, "nodad"]);
        i(&["link", "set", &inet_if, "up"]);
        let ready: Vec<PathBuf> = ["host.ready", "inet.ready"].iter().map(|f| net.dir.path().join(f)).collect();
        let host = listener(&kiln_ns, 80, "HOST-ONLY", &net.log("host"), &ready[0]);
        let inet = listener(&inet_ns, 80, "INTERNET", &net.log("inet"), &ready[1]);
        net.listeners.extend([host, inet]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.iter().all(|r| r.exists()) {
            assert!(Instant::now() < deadline, "the listeners did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        hosts.push_str(
            "\n203.0.113.7 kiln-self.test\n2001:db8::7 kiln-self6.test\n198.51.100.2 internet.test\n\
             198.51.100.2 npm-registry.test\n",
        );
        std::fs::write(net.dir.path().join("hosts"), hosts).unwrap();
        net
    }

    /// One more listener on "the internet", on `port`, logging as `name`.
    pub fn listen_on_internet(&mut self, name: &str, port: u16) {
        let ready = self.dir.path().join(format!("{name}.ready"));
        let l = listener(&self.inet_ns, port, &name.to_uppercase(), &self.log(name), &ready);
        self.listeners.push(l);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the listener {name} did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Connections the listener `name` has seen.
    pub fn connections(&self, name: &str) -> usize {
        std::fs::read_to_string(self.log(name)).map(|t| t.lines().count()).unwrap_or(0)
    }

    /// kiln, inside the kiln namespace and its own mount namespace (with
    /// the hosts file), its API on port 443 of every address.
    pub fn kiln(&self, extra: &[&str]) -> super::Server {
        self.kiln_with_env(extra, &[])
    }

    /// [`Net::kiln`], with `env` (`NAME=value`) in kiln's environment.
    pub fn kiln_with_env(&self, extra: &[&str], env: &[&str]) -> super::Server {
        let hosts = self.dir.path().join("hosts");
        let net = format!("--net=/run/netns/{}", self.kiln_ns);
        let mut prefix = vec!["nsenter", net.as_str(), "--", "env"];
        prefix.extend_from_slice(env);
        prefix.extend([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
            hosts.to_str().unwrap(),
        ]);
        let mut s = super::start_via(&prefix, "0.0.0.0:443", tempfile::tempdir().unwrap(), extra, true);
        assert_eq!(std::fs::read_to_string(format!("/proc/{}/comm", s.pid())).unwrap().trim(), "kiln");
        s.url = self.api.clone();
        s
    }

    /// Give this host one more address, now.
    pub fn add_address(&self, cidr: &str) {
        ip(&["-n", &self.kiln_ns, "addr", "add", cidr, "dev", &self.kiln_if]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for l in &mut self.listeners {
            let _ = l.kill();
            let _ = l.wait();
        }
        let _ = Command::new("ip").args(["link", "delete", &self.host_if]).status();
        let _ = Command::new("ip").args(["netns", "delete", &self.kiln_ns]).status();
        let _ = Command::new("ip").args(["netns", "delete", &self.inet_ns]).status();
    }
}
