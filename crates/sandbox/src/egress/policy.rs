//! What a session's proxy may connect to: the policy decides on the name and
//! port a session asks for, then every address the name resolves to must be
//! public by range and none of this host's own.
//!
//! "This host" is every address of every interface of the proxy's network
//! namespace, read again for every tunnel ([`local_addresses`]), so an
//! address added after start (a new public IP, a VPN coming up) is refused
//! from the next `CONNECT` on. Ranges alone cannot know that 203.0.113.7 is
//! this machine's public address, and the API and every host service listen
//! on it.

use super::request::Host;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What a session may reach through its proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Only these host names (the package registries), on port 443.
    Hosts(Vec<String>),
    /// Any public address, ports 80 and 443.
    Full,
}

impl Policy {
    /// Whether a tunnel to `host:port` may be opened at all, before
    /// resolution (the addresses are checked by [`refusal`]).
    pub fn allows(&self, host: &Host, port: u16) -> bool {
        match self {
            Policy::Hosts(hosts) => {
                port == 443 && matches!(host, Host::Name(name) if hosts.iter().any(|h| same_name(h, name)))
            }
            Policy::Full => port == 443 || port == 80,
        }
    }

    /// How the policy is named in messages.
    pub fn describe(&self) -> String {
        match self {
            Policy::Hosts(h) => format!("registries (only {} on port 443)", h.join(", ")),
            Policy::Full => "full (public addresses, ports 80 and 443)".into(),
        }
    }
}

/// Host names compare without case and without a trailing dot.
fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.').eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// Why an address may not be connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Loopback, private, link-local (cloud metadata), carrier-grade NAT,
    /// multicast, reserved: not somewhere on the internet.
    NotPublic,
    /// One of this host's own addresses.
    ThisHost,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::NotPublic => "not a public address",
            Refusal::ThisHost => "an address of this host",
        })
    }
}

/// Why a session may not be connected to `ip`, given this host's `local`
/// addresses; `None` when it may.
pub fn refusal(ip: IpAddr, local: &[IpAddr]) -> Option<Refusal> {
    let ip = ip.to_canonical();
    if !is_public(ip) {
        Some(Refusal::NotPublic)
    } else if local.iter().any(|l| l.to_canonical() == ip) {
        Some(Refusal::ThisHost)
    } else {
        None
    }
}

/// The addresses of every interface of this network namespace, now.
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

/// Whether `ip` is somewhere on the internet by its range: never loopback,
/// a private network, link-local (cloud metadata), carrier-grade NAT,
/// multicast, broadcast or "this network", and, for IPv6, never an address
/// that embeds a non-public IPv4 one (mapped, compatible, NAT64, 6to4).
/// Documentation and benchmarking ranges are not refused: they reach
/// nothing on their own, and some networks route their package mirror
/// through them (fake-IP DNS resolvers answer from 198.18.0.0/15).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
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
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || o[0] >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d) and the deprecated IPv4-compatible
    // (::a.b.c.d) forms; `::` and `::1` land in 0.0.0.0/8 and are refused.
    if let Some(v4) = ip.to_ipv4() {
        return is_public_v4(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4 address
    // inside them.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return is_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return is_public_v4(embedded(s[1], s[2]));
    }
    !(ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link local
        || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
        || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // discard-only
        || (s[0] == 0x2001 && s[1] == 0)) // Teredo: an IPv4 address in disguise
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("bad test address {s}"))
    }

    #[test]
    fn loopback_private_link_local_and_reserved_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.170",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "100::1",
        ] {
            assert!(!is_public(ip(a)), "{a} must not be public");
        }
    }

    #[test]
    fn global_and_documentation_addresses_are_public() {
        for a in [
            "1.1.1.1",
            "151.101.0.223",
            "198.18.0.1",
            "198.51.100.2",
            "203.0.113.7",
            "2606:4700::1111",
            "2001:db8::7",
            "64:ff9b::101:101",
            "2002:101:101::1",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(ip(a)), "{a} must be public");
        }
    }

    #[test]
    fn this_host_s_own_public_addresses_are_refused_in_every_spelling() {
        let local = [ip("203.0.113.7"), ip("2001:db8::7"), ip("127.0.0.1")];
        assert_eq!(refusal(ip("203.0.113.7"), &local), Some(Refusal::ThisHost));
        assert_eq!(refusal(ip("::ffff:203.0.113.7"), &local), Some(Refusal::ThisHost));
        assert_eq!(refusal(ip("2001:db8::7"), &local), Some(Refusal::ThisHost));
        assert_eq!(refusal(ip("2001:db8:0:0::7"), &local), Some(Refusal::ThisHost));
        assert_eq!(refusal(ip("127.0.0.1"), &local), Some(Refusal::NotPublic));
        assert_eq!(refusal(ip("203.0.113.8"), &local), None);
        assert_eq!(refusal(ip("2001:db8::8"), &local), None);
    }

    #[test]
    fn this_host_s_addresses_can_be_read() {
        let local = local_addresses().unwrap_or_default();
        assert!(local.iter().any(IpAddr::is_loopback), "{local:?}");
    }

    #[test]
    fn the_index_policy_allows_only_its_hosts_over_https() {
        let name = |n: &str| Host::Name(n.into());
        let p = Policy::Hosts(vec!["index.example".into()]);
        assert!(p.allows(&name("index.example"), 443));
        assert!(p.allows(&name("index.example."), 443));
        assert!(!p.allows(&name("index.example"), 80));
        assert!(!p.allows(&name("other.example"), 443));
        assert!(!p.allows(&name("index.example.evil"), 443));
        assert!(!p.allows(&Host::Ip(ip("151.101.0.223")), 443), "the index by address is not the index");
        assert!(Policy::Full.allows(&name("anything.example"), 443));
        assert!(Policy::Full.allows(&Host::Ip(ip("1.1.1.1")), 80));
        assert!(!Policy::Full.allows(&name("anything.example"), 22));
        assert!(!Policy::Full.allows(&name("anything.example"), 8080));
    }
}
