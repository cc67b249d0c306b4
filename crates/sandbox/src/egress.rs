//! Network egress for sessions, by policy.
//!
//! A session's network namespace has no interface but loopback, so nothing
//! leaves it directly. When a policy allows some egress, the session gets
//! an HTTP proxy at `127.0.0.1:3128` inside its namespace: a forwarder
//! process there ([`forward`]) relays each connection over a Unix socket
//! that crosses the sandbox boundary to this proxy on the host, which
//! decides ([`Policy::allows`]) and connects on the session's behalf:
//!
//! - `pypi`: `CONNECT` only to the package index hosts this machine's pip is
//!   configured to use, port 443;
//! - `full`: `CONNECT` to any host, ports 80 and 443.
//!
//! Under both, every resolved address is checked and loopback, private,
//! link-local (cloud metadata), carrier-grade NAT, multicast and other
//! non-global addresses are refused, so the API's own port and every host
//! service stay out of reach even if a name resolves to them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The port of the proxy inside each session.
pub const PROXY_PORT: u16 = 3128;

/// What a session may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Nothing.
    None,
    /// Only these hosts (the package index), HTTPS.
    Hosts(Vec<String>),
    /// Any public address, HTTP(S).
    Full,
}

impl Policy {
    /// Whether a tunnel to `host:port` may be opened at all (before
    /// resolution; addresses are checked by [`is_public`]).
    pub fn allows(&self, host: &str, port: u16) -> bool {
        match self {
            Policy::None => false,
            Policy::Hosts(hosts) => port == 443 && hosts.iter().any(|h| h.eq_ignore_ascii_case(host)),
            Policy::Full => port == 443 || port == 80,
        }
    }

    /// How the policy is named in messages.
    pub fn describe(&self) -> String {
        match self {
            Policy::None => "none (no network)".into(),
            Policy::Hosts(h) => format!("pypi (only {} on port 443)", h.join(", ")),
            Policy::Full => "full (public addresses, ports 80 and 443)".into(),
        }
    }
}

/// Whether a session may be connected to `ip`: never this host, a private
/// network, a link-local (cloud metadata) or carrier-grade NAT address,
/// multicast or broadcast. (Documentation and other reserved ranges are not
/// refused: they reach nothing on their own, and some networks route their
/// package mirror through them.)
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || v6 == Ipv6Addr::from([0x64, 0xff9b, 0, 0, 0, 0, 0xa9fe, 0xa9fe]))
            // NAT64 metadata
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)) // carrier-grade NAT
}

/// Serve the proxy on the Unix socket `path` until the task is dropped.
pub async fn serve(path: &Path, policy: Policy) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    // The session user (another uid) must be able to connect.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let policy = Arc::new(policy);
    loop {
        let (conn, _) = listener.accept().await?;
        let policy = policy.clone();
        tokio::spawn(async move {
            if let Err(e) = tunnel(conn, &policy).await {
                tracing::debug!(error = %e, "egress connection ended");
            }
        });
    }
}

async fn tunnel(mut conn: tokio::net::UnixStream, policy: &Policy) -> std::io::Result<()> {
    // Read the request head (bounded).
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf)).await??;
        if n == 0 || head.len() + n > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let refuse = |status: &str, why: String| {
        format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nkiln: {why}\n")
    };
    if method != "CONNECT" {
        let msg = refuse("405 Method Not Allowed", "this proxy only tunnels HTTPS (CONNECT)".into());
        return conn.write_all(msg.as_bytes()).await;
    }
    let (host, port) = match target.rsplit_once(':').map(|(h, p)| (h.trim_matches(['[', ']']), p.parse::<u16>())) {
        Some((h, Ok(p))) if !h.is_empty() => (h.to_string(), p),
        _ => return conn.write_all(refuse("400 Bad Request", "bad CONNECT target".into()).as_bytes()).await,
    };
    if !policy.allows(&host, port) {
        tracing::info!(%host, port, "egress refused by policy");
        let why = format!("the session's network policy is {}; {host}:{port} is not allowed", policy.describe());
        return conn.write_all(refuse("403 Forbidden", why).as_bytes()).await;
    }
    let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
    let Some(addr) = addrs.iter().find(|a| is_public(a.ip())).copied() else {
        tracing::info!(%host, port, "egress refused: no public address");
        let why = format!("{host} does not resolve to a public address");
        return conn.write_all(refuse("403 Forbidden", why).as_bytes()).await;
    };
    let mut upstream = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
    tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
    Ok(())
}

/// Inside the sandbox: accept on `127.0.0.1:PROXY_PORT` and relay every
/// connection to the Unix socket `socket`. Blocking, thread per direction;
/// runs in its own process forked by the sandbox's init. Never returns.
pub fn forward(socket: &Path) -> ! {
    let listener = match std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln sandbox: egress forwarder cannot listen: {e}");
            crate::init::exit(1)
        }
    };
    for conn in listener.incoming().flatten() {
        let Ok(up) = std::os::unix::net::UnixStream::connect(socket) else { continue };
        let (Ok(mut c2), Ok(mut u2)) = (conn.try_clone(), up.try_clone()) else { continue };
        let (mut c1, mut u1) = (conn, up);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c1, &mut u1);
            let _ = u1.shutdown(std::net::Shutdown::Write);
        });
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Write);
        });
    }
    crate::init::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_global_addresses_are_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))), "{ip}");
        }
        for ip in ["1.1.1.1", "151.101.0.223", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))), "{ip}");
        }
    }

    #[test]
    fn the_index_policy_allows_only_its_hosts_over_https() {
        let p = Policy::Hosts(vec!["index.example".into()]);
        assert!(p.allows("index.example", 443));
        assert!(p.allows("INDEX.example", 443));
        assert!(!p.allows("index.example", 80));
        assert!(!p.allows("other.example", 443));
        assert!(!Policy::None.allows("index.example", 443));
        assert!(Policy::Full.allows("anything.example", 443));
        assert!(!Policy::Full.allows("anything.example", 22));
    }
}
