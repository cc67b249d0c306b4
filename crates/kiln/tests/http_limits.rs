//! The API port's own limits: connections that send nothing, or half a
//! request, are closed after their timeouts; past the connection cap new
//! connections wait; a long execution is never cut.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, KEY};
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Whether the server has closed `c` (EOF or reset), without waiting.
fn closed(c: &mut TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let closed = match c.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    c.set_nonblocking(false).unwrap();
    closed
}

/// Wait until every connection is closed; the time it took.
async fn until_all_closed(conns: &mut [TcpStream], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let open = conns.iter_mut().map(|c| !closed(c)).filter(|open| *open).count();
        if open == 0 {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{open} connections still open after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_half_sent_connections_are_closed_but_a_long_execution_is_not() {
    let (header, idle) = (Duration::from_secs(2), Duration::from_secs(4));
    let s = start(&["--http-header-timeout", "2s", "--http-idle-timeout", "4s"]);
    let addr = s.url.trim_start_matches("http://").to_string();
    // An execution that outlasts both timeouts, on a connection of its own.
    let long = {
        let (http, url) = (reqwest::Client::new(), format!("{}/tci/execute", s.url));
        tokio::spawn(async move {
            let t = Instant::now();
            let body = json!({"code": "import time; time.sleep(9); print('done')"});
            let r = http.post(url).bearer_auth(KEY).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap(), t.elapsed())
        })
    };
    let connect = || TcpStream::connect(&addr).unwrap();
    let opened = Instant::now();
    let mut idle_conns: Vec<_> = (0..100).map(|_| connect()).collect();
    let mut half_heads: Vec<_> = (0..100)
        .map(|_| {
            let mut c = connect();
            c.write_all(b"POST /tci/execute HTTP/1.1\r\nHost: kiln\r\nContent-Ty").unwrap();
            c
        })
        .collect();
    let mut half_bodies: Vec<_> = (0..20)
        .map(|_| {
            let mut c = connect();
            let head = format!(
                "POST /tci/execute HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {KEY}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"code\": \"pri"
            );
            c.write_all(head.as_bytes()).unwrap();
            c
        })
        .collect();
    // Nothing is closed before its timeout...
    assert!(opened.elapsed() < header, "the set-up took too long to check this");
    assert!(!idle_conns.iter_mut().any(closed), "an idle connection was closed early");
    assert!(!half_heads.iter_mut().any(closed), "a half-sent head was closed early");
    // A keep-alive connection used twice, a second apart, stays usable.
    let mut kept = connect();
    for _ in 0..2 {
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = kept.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // ...and everything is, soon after it.
    let slack = Duration::from_secs(10);
    until_all_closed(&mut half_heads, header + slack).await;
    until_all_closed(&mut half_bodies, header + slack).await;
    until_all_closed(&mut idle_conns, idle + slack).await;
    assert!(opened.elapsed() >= idle, "idle connections closed before the idle timeout");

    let (status, body, took) = long.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("done\\n"), "{body}");
    assert!(took >= Duration::from_secs(9));
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_connection_cap_a_new_connection_waits_for_a_free_slot() {
    let s = start(&["--max-connections", "20", "--http-idle-timeout", "3s"]);
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut held: Vec<_> = (0..20).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let url = format!("{}/healthz", s.url);
    let waiting = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "a 21st connection was served while 20 were open");
    let status = tokio::time::timeout(Duration::from_secs(15), waiting).await.unwrap().unwrap().unwrap();
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    until_all_closed(&mut held, Duration::from_secs(15)).await;
}
