//! The one request the proxy understands, parsed strictly:
//! `CONNECT host:port HTTP/1.1`, then header lines, then an empty line.
//!
//! Strict because the parser stands between hostile code and the resolver:
//! a target is a DNS name, a dotted-quad IPv4 address in its one canonical
//! spelling, or a bracketed IPv6 address without a zone; a port is 1 to
//! 65535 in plain decimal. Everything the C resolver would also accept
//! (`127.1`, `2130706433`, `0177.0.0.1`, `0x7f.0.0.1`, `0`, `fe80::1%lo`,
//! `0080`, `+80`) is a 400, never a lookup. Control characters anywhere in
//! the head (a CR or LF smuggled into the target) are refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8192;

/// Where a session wants a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host, as named.
    pub host: Host,
    /// The port.
    pub port: u16,
}

/// A tunnel's host: a name to resolve or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lower case, without a trailing dot.
    Name(String),
    /// An address literal.
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Why a request head is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHead {
    /// Another method than `CONNECT`.
    #[error("this proxy only opens tunnels (CONNECT host:port); plain HTTP through it is not supported")]
    NotConnect,
    /// The head is not well-formed HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The target is not `host:port` as described above.
    #[error("bad CONNECT target: {0}")]
    Target(&'static str),
}

/// The end of the head (the index just past its empty line), if `buf` holds
/// one.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parse a complete head (up to and including its empty line).
pub fn parse_head(head: &[u8]) -> Result<Target, BadHead> {
    let body = head.strip_suffix(b"\r\n\r\n").ok_or(BadHead::Malformed("the head does not end with an empty line"))?;
    let text = std::str::from_utf8(body).map_err(|_| BadHead::Malformed("the head is not text"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    // CR, LF (bare ones: the CRLF pairs were split on), NUL, DEL and the
    // other control characters have no place in a head.
    if text.split("\r\n").any(|l| l.chars().any(|c| c.is_ascii_control() && c != '\t')) {
        return Err(BadHead::Malformed("control characters in the head"));
    }
    for line in lines {
        if !line.contains(':') || line.starts_with([' ', '\t']) {
            return Err(BadHead::Malformed("a header line is not `Name: value`"));
        }
    }
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(BadHead::Malformed("the request line is not `METHOD target HTTP/1.1`"));
    };
    if method != "CONNECT" {
        return Err(BadHead::NotConnect);
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(BadHead::Malformed("only HTTP/1.0 and HTTP/1.1 are spoken"));
    }
    parse_target(target)
}

/// Parse `host:port`.
pub fn parse_target(target: &str) -> Result<Target, BadHead> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(BadHead::Target("unclosed `[`"))?;
        let port = after.strip_prefix(':').ok_or(BadHead::Target("no port after the address"))?;
        let v6: Ipv6Addr =
            inside.parse().map_err(|_| BadHead::Target("not an IPv6 address (zones are not allowed)"))?;
        (Host::Ip(IpAddr::V6(v6)), port)
    } else {
        let (host, port) = target.rsplit_once(':').ok_or(BadHead::Target("no port"))?;
        (parse_host(host)?, port)
    };
    Ok(Target { host, port: parse_port(port)? })
}

/// 1 to 65535, written in plain decimal: no sign, space or leading zero.
pub fn parse_port(s: &str) -> Result<u16, BadHead> {
    let plain = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    match s.parse::<u16>() {
        Ok(p) if plain => Ok(p),
        _ => Err(BadHead::Target("the port must be a number from 1 to 65535 without leading zeros")),
    }
}

/// A DNS name or a canonical dotted-quad address.
fn parse_host(host: &str) -> Result<Host, BadHead> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(BadHead::Target("the host name is empty or too long"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    // As browsers do: a name whose last label is a number is an IPv4
    // address, and the only spelling taken is four plain decimal bytes.
    let last = labels.last().copied().unwrap_or_default();
    let numeric = last.bytes().all(|b| b.is_ascii_digit()) || last.to_ascii_lowercase().starts_with("0x");
    if numeric {
        return canonical_ipv4(&labels)
            .map(|v4| Host::Ip(IpAddr::V4(v4)))
            .ok_or(BadHead::Target("write an IPv4 address as four decimal numbers (a.b.c.d)"));
    }
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(BadHead::Target("not a valid host name"));
        }
    }
    Ok(Host::Name(name.to_ascii_lowercase()))
}

fn canonical_ipv4(labels: &[&str]) -> Option<Ipv4Addr> {
    let [a, b, c, d] = labels else { return None };
    let byte = |s: &str| -> Option<u8> {
        let plain = !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
        if !plain || (s.len() > 1 && s.starts_with('0')) {
            return None;
        }
        s.parse().ok()
    };
    Some(Ipv4Addr::new(byte(a)?, byte(b)?, byte(c)?, byte(d)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(target: &str) -> Vec<u8> {
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
    }

    fn target(s: &str) -> Result<Target, BadHead> {
        parse_head(&head(s))
    }

    #[test]
    fn names_and_canonical_addresses_are_accepted() {
        let t = target("PyPI.org.:443").ok();
        assert_eq!(t, Some(Target { host: Host::Name("pypi.org".into()), port: 443 }));
        let t = target("1.1.1.1:80").ok();
        assert_eq!(
            t,
            Some(Target { host: Host::Ip("1.1.1.1".parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))), port: 80 })
        );
        let t = target("[2606:4700::1111]:443").ok().map(|t| t.to_string());
        assert_eq!(t.as_deref(), Some("[2606:4700::1111]:443"));
        assert!(target("files.pythonhosted.org:443").is_ok());
        assert!(target("my_host-1.example:443").is_ok());
        assert!(parse_head(b"CONNECT a.example:443 HTTP/1.0\r\n\r\n").is_ok());
    }

    #[test]
    fn loopback_in_its_many_spellings_never_reaches_the_resolver() {
        // Each is refused as a bad target (400) before any lookup; those
        // that are well-formed addresses are refused by range instead.
        for t in [
            "2130706433:443",
            "0177.0.0.1:443",
            "0x7f.0.0.1:443",
            "0x7f000001:443",
            "127.1:443",
            "127.0.1:443",
            "0:443",
            "00:443",
            "127.0.0.01:443",
            "127.000.000.001:443",
            "1.2.3.0x4:443",
            "[fe80::1%lo]:443",
            "[fe80::1%25lo]:443",
            "[::1:443",
            "::1:443",
            "[127.0.0.1]:443",
        ] {
            assert!(matches!(target(t), Err(BadHead::Target(_))), "{t} must be refused as a target");
        }
        for (t, ip) in [
            ("[::ffff:7f00:1]:443", "::ffff:7f00:1"),
            ("[::]:443", "::"),
            ("127.0.0.1:443", "127.0.0.1"),
            ("169.254.169.254:80", "169.254.169.254"),
            ("10.0.0.1:443", "10.0.0.1"),
            ("192.168.0.1:443", "192.168.0.1"),
        ] {
            let parsed = target(t).ok().map(|t| t.host);
            let ip: IpAddr = ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            assert_eq!(parsed, Some(Host::Ip(ip)), "{t}");
            assert!(!super::super::policy::is_public(ip), "{t} must be refused by range");
        }
    }

    #[test]
    fn ports_are_plain_decimal_numbers() {
        for p in ["0080", "+80", " 80", "80 ", "-80", "0", "65536", "99999", "", "8O", "0x50", "443443"] {
            assert!(parse_port(p).is_err(), "{p:?} must be refused");
        }
        assert_eq!(parse_port("80"), Ok(80));
        assert_eq!(parse_port("65535"), Ok(65535));
        assert!(matches!(target("example.com:0080"), Err(BadHead::Target(_))));
        assert!(target("example.com: 80").is_err());
    }

    #[test]
    fn crlf_and_control_characters_smuggled_into_the_head_are_refused() {
        for h in [
            &b"CONNECT example.com:443\r\nHost: 127.0.0.1:22 HTTP/1.1\r\n\r\n"[..],
            b"CONNECT example.com:443 HTTP/1.1\nHost: x\r\n\r\n",
            b"CONNECT example.com:443\rX HTTP/1.1\r\n\r\n",
            b"CONNECT example.com\r\n:443 HTTP/1.1\r\n\r\n",
            b"CONNECT exa\0mple.com:443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"CONNECT  example.com:443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1 \r\n\r\n",
            b"CONNECT example.com:443 HTTP/2\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n continued\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
        ] {
            assert!(parse_head(h).is_err(), "{:?} must be refused", String::from_utf8_lossy(h));
        }
        assert_eq!(parse_head(b"GET http://example.com/ HTTP/1.1\r\n\r\n"), Err(BadHead::NotConnect));
    }

    #[test]
    fn the_end_of_a_head_is_found_and_what_follows_is_kept() {
        let buf = b"CONNECT a.example:443 HTTP/1.1\r\n\r\n\x16\x03\x01";
        let end = head_end(buf);
        assert_eq!(end, Some(buf.len() - 3));
        assert_eq!(head_end(b"CONNECT a.example:443 HTTP/1.1\r\n"), None);
    }
}
