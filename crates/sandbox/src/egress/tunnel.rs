//! One connection through the proxy: read the head (bounded in size and
//! time), decide, resolve (bounded in concurrency and time), connect, then
//! relay bytes both ways until both sides are done, nothing has moved for
//! the idle timeout, or the tunnel has lived its maximum.

use super::policy::{local_addresses, refusal, Policy, Refusal};
use super::request::{head_end, parse_head, BadHead, Host, Target, MAX_HEAD};
use super::Shared;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long writing a refusal may take (a session that never reads its
/// answer must not hold the connection).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Serve one accepted connection.
pub(super) async fn serve(mut conn: TcpStream, policy: &Policy, shared: &Shared) {
    let limits = &shared.limits;
    let (target, early) = match read_head(&mut conn, limits.head_timeout).await {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => {
            let status = if e == BadHead::NotConnect { "405 Method Not Allowed" } else { "400 Bad Request" };
            return answer(&mut conn, status, &e.to_string()).await;
        }
    };
    if !policy.allows(&target.host, target.port) {
        tracing::debug!(%target, "egress refused by policy");
        let why = format!("the session's network policy is {}; {target} is not allowed", policy.describe());
        return answer(&mut conn, "403 Forbidden", &why).await;
    }
    let addrs = match resolve(&target, shared).await {
        Ok(a) => a,
        Err(Resolve::Refused(r)) => {
            tracing::debug!(%target, reason = %r, "egress refused");
            let why = format!("{} is {r}; sessions may only reach the internet", target.host);
            return answer(&mut conn, "403 Forbidden", &why).await;
        }
        Err(Resolve::Failed(why)) => return answer(&mut conn, "502 Bad Gateway", &why).await,
    };
    let mut upstream = match connect(&addrs, limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => return answer(&mut conn, "502 Bad Gateway", &format!("could not connect to {target}: {e}")).await,
    };
    let opened = async {
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
        // What the client sent right behind its head (a TLS hello) goes on.
        upstream.write_all(&early).await
    };
    if tokio::time::timeout(ANSWER_TIMEOUT, opened).await.map_or(true, |r| r.is_err()) {
        return;
    }
    match relay(conn, upstream, limits.idle_timeout, limits.max_duration).await {
        Ended::Done => {}
        Ended::Idle => tracing::debug!(%target, "egress tunnel closed: idle"),
        Ended::Expired => tracing::debug!(%target, "egress tunnel closed: reached its maximum duration"),
    }
}

/// The parsed head and the bytes that followed it, `None` if the client
/// went away or was too slow (nothing to answer), or why it is refused.
async fn read_head(conn: &mut TcpStream, within: Duration) -> Result<Option<(Target, Vec<u8>)>, BadHead> {
    let deadline = Instant::now() + within;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(BadHead::Malformed("the request head is longer than 8 KiB"));
        }
        match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                tracing::debug!(secs = within.as_secs_f64(), "egress connection closed: no complete head in time");
                return Ok(None);
            }
        }
    };
    let early = buf.split_off(end);
    Ok(Some((parse_head(&buf)?, early)))
}

/// Write a short refusal and close.
async fn answer(conn: &mut TcpStream, status: &str, why: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: {}\r\n\r\nkiln: {why}\n",
        why.len() + 7
    );
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, conn.write_all(msg.as_bytes())).await;
}

enum Resolve {
    Refused(Refusal),
    Failed(String),
}

/// The addresses of `target` a session may be connected to, in the
/// resolver's order. A name whose every address is refused is refused
/// with the first reason. Lookups run on the blocking pool (the C resolver
/// reads `/etc/hosts` and `nsswitch.conf` as everything else on the host
/// does), at most `MAX_LOOKUPS` at once for the whole server and each
/// bounded in time, so a flood of slow names cannot hold the pool.
async fn resolve(target: &Target, shared: &Shared) -> Result<Vec<SocketAddr>, Resolve> {
    let permit = match tokio::time::timeout(shared.limits.connect_timeout, shared.lookups.clone().acquire_owned()).await
    {
        Ok(Ok(p)) => p,
        _ => return Err(Resolve::Failed("the proxy is busy resolving names; retry".into())),
    };
    let (host, port) = (target.host.clone(), target.port);
    let job = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let resolved: std::io::Result<Vec<IpAddr>> = match &host {
            Host::Ip(ip) => Ok(vec![*ip]),
            Host::Name(name) => {
                use std::net::ToSocketAddrs;
                (name.as_str(), port).to_socket_addrs().map(|it| it.map(|a| a.ip()).collect())
            }
        };
        (resolved, local_addresses())
    });
    let (resolved, local) = match tokio::time::timeout(shared.limits.connect_timeout, job).await {
        Ok(Ok(r)) => r,
        _ => return Err(Resolve::Failed(format!("resolving {} took too long", target.host))),
    };
    let resolved = resolved.map_err(|e| Resolve::Failed(format!("could not resolve {}: {e}", target.host)))?;
    let local = local.map_err(|e| Resolve::Failed(format!("could not read this host's addresses: {e}")))?;
    let mut first_refusal = None;
    let mut allowed = Vec::new();
    for ip in resolved {
        match refusal(ip, &local) {
            None => allowed.push(SocketAddr::new(ip, port)),
            Some(r) => {
                first_refusal.get_or_insert(r);
            }
        }
    }
    match (allowed.is_empty(), first_refusal) {
        (false, _) => Ok(allowed),
        (true, Some(r)) => Err(Resolve::Refused(r)),
        (true, None) => Err(Resolve::Failed(format!("{} has no address", target.host))),
    }
}

/// Connect to the first address that answers, within `within` overall.
async fn connect(addrs: &[SocketAddr], within: Duration) -> std::io::Result<TcpStream> {
    let attempt = async {
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")))
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both sides closed.
    Done,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The tunnel reached its maximum duration.
    Expired,
}

/// Copy bytes both ways until both directions are closed, nothing has
/// moved for `idle`, or `max` has passed. A direction that reaches EOF
/// shuts the other side's writing half, as a TCP proxy should.
pub(crate) async fn relay<A, B>(a: A, b: B, idle: Duration, max: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, either way.
    let last = AtomicU64::new(0);
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let copying = async {
        tokio::join!(pump(&mut ar, &mut bw, &touch), pump(&mut br, &mut aw, &touch));
    };
    let watch = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let idle_at = start + since + idle;
            let end = idle_at.min(start + max);
            tokio::time::sleep_until(end).await;
            let now = Instant::now();
            if now >= start + max {
                return Ended::Expired;
            }
            if now.duration_since(start) >= Duration::from_millis(last.load(Ordering::Relaxed)) + idle {
                return Ended::Idle;
            }
        }
    };
    tokio::select! {
        () = copying => Ended::Done,
        ended = watch => ended,
    }
}

async fn pump<R, W>(from: &mut R, to: &mut W, touch: &impl Fn())
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        touch();
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        touch();
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair over real loopback TCP.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap_or_else(|e| panic!("connect: {e}")), s.unwrap_or_else(|e| panic!("accept: {e}")).0)
    }

    #[tokio::test]
    async fn a_relay_carries_bytes_both_ways_and_ends_when_both_sides_close() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(relay(a, b, Duration::from_secs(30), Duration::from_secs(60)));
        client.write_all(b"ping").await.unwrap_or_default();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap_or_default();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap_or_default();
        client.read_exact(&mut buf).await.unwrap_or_default();
        assert_eq!(&buf, b"pong");
        // Half-close one way: the other way still works.
        client.shutdown().await.unwrap_or_default();
        assert_eq!(server.read(&mut buf).await.ok(), Some(0));
        server.write_all(b"late").await.unwrap_or_default();
        client.read_exact(&mut buf).await.unwrap_or_default();
        assert_eq!(&buf, b"late");
        drop(server);
        let ended = tokio::time::timeout(Duration::from_secs(10), relay).await;
        assert!(matches!(ended, Ok(Ok(Ended::Done))), "{ended:?}");
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_closed_but_a_busy_one_is_not() {
        let idle = Duration::from_millis(400);
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let started = Instant::now();
        let relay = tokio::spawn(relay(a, b, idle, Duration::from_secs(60)));
        // Traffic every 100 ms for 1.2 s (three idle periods) keeps it open.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"x").await.unwrap_or_default();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap_or_default();
        }
        assert!(!relay.is_finished(), "a busy tunnel was closed");
        let ended = tokio::time::timeout(Duration::from_secs(10), relay).await;
        assert!(matches!(ended, Ok(Ok(Ended::Idle))), "{ended:?}");
        assert!(started.elapsed() >= Duration::from_millis(1200) + idle);
        // Both ends see the close.
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
        assert_eq!(server.read(&mut buf).await.unwrap_or(0), 0);
    }

    #[tokio::test]
    async fn a_tunnel_ends_at_its_maximum_duration_even_when_busy() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let max = Duration::from_millis(500);
        let relay = tokio::spawn(relay(a, b, Duration::from_secs(30), max));
        let busy = tokio::spawn(async move {
            let mut one = [0u8; 1];
            while client.write_all(b"x").await.is_ok() && server.read_exact(&mut one).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let ended = tokio::time::timeout(Duration::from_secs(10), relay).await;
        assert!(matches!(ended, Ok(Ok(Ended::Expired))), "{ended:?}");
        let _ = tokio::time::timeout(Duration::from_secs(10), busy).await;
    }
}
