//! One session's way out: a TCP listener of its own at `127.0.0.1:3128`
//! inside its sandbox's network namespace (made there and held by the
//! server, see `Sandbox::listen_inside`), with its own cap on open
//! connections.
//!
//! The accept loop never gives up: running out of descriptors (`EMFILE`,
//! `ENFILE`) or kernel memory is waited out with a growing pause, and any
//! other error is one failed connection. Should the loop end anyway (a
//! panic is a bug, but one session's bug must not end its egress), it is
//! started again on the same listener: it is the only one the sandbox's
//! network has.

use super::policy::Policy;
use super::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

/// A session's egress listener and the task serving it. Dropping it stops
/// the listener and every tunnel it opened.
#[derive(Debug)]
pub struct Port {
    task: AbortHandle,
}

impl Port {
    pub(super) fn open(
        listener: std::net::TcpListener,
        policy: Arc<Policy>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Port> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let task = tokio::spawn(supervise(Arc::new(listener), policy, shared)).abort_handle();
        Ok(Port { task })
    }

    /// Keep the port open until `exit` turns `Some` (the sandbox using it
    /// has ended), then close it.
    pub fn close_on_exit<T: Send + Sync + 'static>(self, mut exit: watch::Receiver<Option<T>>) {
        tokio::spawn(async move {
            let _ = exit.wait_for(Option::is_some).await;
            drop(self);
        });
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Aborts a task when dropped (the supervisor's child dies with it).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run the accept loop, and run it again if it ever ends.
async fn supervise(listener: Arc<TcpListener>, policy: Arc<Policy>, shared: Arc<Shared>) {
    loop {
        let run = tokio::spawn(accept_loop(listener.clone(), policy.clone(), shared.clone()));
        let _guard = AbortOnDrop(run.abort_handle());
        let ended = run.await;
        tracing::error!(?ended, "an egress accept loop ended; starting it again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Accept connections forever; serve each within the session's cap.
pub(super) async fn accept_loop(listener: Arc<TcpListener>, policy: Arc<Policy>, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.limits.connections));
    // Dropped with the loop: every tunnel ends with its port.
    let mut tunnels = JoinSet::new();
    let mut pause = MIN_PAUSE;
    loop {
        while tunnels.try_join_next().is_some() {}
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                if resource_exhausted(&e) {
                    shared.warn_exhausted(&e);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                continue;
            }
        };
        pause = MIN_PAUSE;
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let (policy, shared) = (policy.clone(), shared.clone());
                tunnels.spawn(async move {
                    super::tunnel::serve(conn, &policy, &shared).await;
                    drop(slot);
                });
            }
            Err(_) => refuse_over_cap(conn, shared.limits.connections),
        }
    }
}

const MIN_PAUSE: Duration = Duration::from_millis(20);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Errors that say the process or the system is out of something, and that
/// only waiting fixes.
fn resource_exhausted(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Say why, without waiting for the session to read it, and close: the
/// descriptor is held for no longer than this call.
fn refuse_over_cap(conn: TcpStream, cap: usize) {
    let why = format!(
        "this session already has {cap} connections open through the egress proxy, the most it may have; \
         close some first\n"
    );
    let msg = format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: {}\r\n\r\nkiln: {why}",
        why.len() + 6
    );
    // Written on the descriptor itself: a fresh socket's buffer is empty,
    // so a non-blocking write takes it all (tokio's `try_write` would wait
    // for the reactor to have seen the socket writable).
    if let Ok(std_conn) = conn.into_std() {
        use std::io::Write;
        let _ = (&std_conn).write(msg.as_bytes());
    }
    tracing::debug!(cap, "egress connection refused: the session is at its cap");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn ask(addr: std::net::SocketAddr, head: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect: {e}"));
        c.write_all(head.as_bytes()).await.unwrap_or_default();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_past_its_connection_cap_is_told_so_and_its_slots_free_up() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let limits = super::super::Limits {
            connections: 8,
            head_timeout: Duration::from_millis(700),
            ..super::super::Limits::default()
        };
        let egress = super::super::Egress::new(limits);
        let _port = egress.open(listener, Arc::new(Policy::Full)).unwrap_or_else(|e| panic!("{e}"));
        // Eight slow connections (a byte, then nothing) take every slot.
        let mut slow = Vec::new();
        for _ in 0..8 {
            let mut c = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
            c.write_all(b"C").await.unwrap_or_else(|e| panic!("{e}"));
            slow.push(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let over = ask(addr, "CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n").await;
        assert!(over.starts_with("HTTP/1.1 429") && over.contains("8 connections"), "{over}");
        // The head timeout closes the slow ones, and their slots are free again.
        let started = std::time::Instant::now();
        for c in &mut slow {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
            assert!(matches!(n, Ok(Ok(0))), "a slow head was not closed: {n:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = ask(addr, "CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n").await;
        assert!(after.starts_with("HTTP/1.1 403"), "{after}");
    }
}
