//! The egress accept loop outlives running out of descriptors: the attack
//! that once stopped every session's egress until a restart. Its own test
//! binary, because it lowers the whole process's descriptor limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_sandbox::egress::{Egress, Limits, Policy};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

async fn ask(addr: std::net::SocketAddr, head: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_accept_loop_outlives_running_out_of_descriptors() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits { connections: 100_000, head_timeout: Duration::from_secs(1), ..Limits::default() };
    let egress = Egress::new(limits);
    let port = egress.open(listener, Arc::new(Policy::Full)).unwrap();
    let refused = ask(addr, "CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() + 64, hard).unwrap();
    // Fill the process's descriptors with connections, then free one and
    // connect again: that connection waits in the backlog while the
    // server has no descriptor to accept it with.
    let mut held = Vec::new();
    let emfile = |e: &std::io::Error| e.raw_os_error() == Some(libc::EMFILE);
    loop {
        match TcpStream::connect(addr).await {
            Ok(c) => held.push(c),
            Err(e) if emfile(&e) => break,
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(held.len() < 10_000, "the descriptor limit did not apply");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while egress.accept_pauses() == 0 {
        held.pop();
        match TcpStream::connect(addr).await {
            Ok(c) => held.push(c),
            Err(e) if emfile(&e) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(std::time::Instant::now() < deadline, "the server never ran out of descriptors");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();

    // The same listener answers again, without a restart.
    let again = ask(addr, "CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n").await;
    assert!(again.starts_with("HTTP/1.1 403"), "{again}");
    drop(port);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(std::net::TcpStream::connect(addr).is_err(), "a closed port closes its listener");
}
