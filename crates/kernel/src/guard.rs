//! A size guard between a kernel's sockets and kiln's client of them.
//!
//! The kernel runs the session's code, so it can send anything on its
//! sockets: one `sys.stdout.write('A' * (600 << 20))`, or a message written
//! straight to the iopub socket, is one ZeroMQ frame of 600 MB. The ZeroMQ
//! client buffers a whole frame before it hands over a message, and parsing
//! and collecting copy it again, so such a frame cost the server about three
//! times its size in memory, per session, before any output limit applied.
//!
//! So kiln's client never connects to the kernel's sockets directly. For
//! each channel it reads (shell and iopub), it connects to a Unix socket of
//! this guard, in the kernel's server-only directory; the guard connects to
//! the kernel's socket and copies bytes both ways. On the way from the
//! kernel it follows the ZMTP 3 framing ([`FrameScanner`]: a 64-byte
//! greeting, then frames that each declare their length before their body)
//! and stops at the first frame that declares more than the limit, before
//! reading any of it: both connections are closed, the guard accepts no
//! more connections (so the client cannot reconnect and read on), and the
//! executor learns that the kernel has to be replaced ([`Guard::tripped`]).
//! The guard never buffers more than one read of 64 KiB.
//!
//! The lean kernel splits its output into messages of at most 64 KiB and
//! stops at the output limit itself, so only code that bypasses it (or the
//! reference ipykernel printing one huge string) ever meets this wall.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// ZMTP 3's greeting: signature, version, mechanism, as-server, filler.
const GREETING: u64 = 64;

/// A frame declared more than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversize {
    /// The size the frame declared, in bytes.
    pub declared: u64,
}

/// Follows the framing of a ZMTP 3 byte stream, one read at a time, and
/// says when a frame declares more than `limit` bytes. Pure: it looks only
/// at the bytes it is given.
#[derive(Debug)]
pub struct FrameScanner {
    limit: u64,
    state: Scan,
}

#[derive(Debug, Clone, Copy)]
enum Scan {
    /// Bytes of the greeting still to come.
    Greeting(u64),
    /// The next byte is a frame's flags.
    Flags,
    /// Reading a length: a short (1-byte) or long (8-byte, big-endian) one,
    /// with what has been read of it so far.
    Length { long: bool, got: u8, value: u64 },
    /// Bytes of a frame's body still to come.
    Body(u64),
}

impl FrameScanner {
    /// A scanner for a stream from its first byte.
    pub fn new(limit: u64) -> Self {
        FrameScanner { limit, state: Scan::Greeting(GREETING) }
    }

    /// Take in the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Oversize> {
        while !bytes.is_empty() {
            match self.state {
                Scan::Greeting(left) | Scan::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if left == n { Scan::Flags } else { self.rest(left - n) };
                }
                Scan::Flags => {
                    let flags = bytes[0];
                    bytes = &bytes[1..];
                    self.state = Scan::Length { long: flags & 0b10 != 0, got: 0, value: 0 };
                }
                Scan::Length { long, got, value } => {
                    let value = (value << 8) | u64::from(bytes[0]);
                    bytes = &bytes[1..];
                    let got = got + 1;
                    if got < if long { 8 } else { 1 } {
                        self.state = Scan::Length { long, got, value };
                        continue;
                    }
                    if value > self.limit {
                        return Err(Oversize { declared: value });
                    }
                    self.state = if value == 0 { Scan::Flags } else { Scan::Body(value) };
                }
            }
        }
        Ok(())
    }

    /// The same state with `left` bytes still to come.
    fn rest(&self, left: u64) -> Scan {
        match self.state {
            Scan::Greeting(_) => Scan::Greeting(left),
            _ => Scan::Body(left),
        }
    }
}

/// The guards of one kernel's channels.
#[derive(Debug)]
pub(crate) struct Guard {
    /// One accept loop per channel; each owns its relays (a `JoinSet`), so
    /// aborting it ends them too.
    tasks: Vec<tokio::task::AbortHandle>,
    tripped: watch::Receiver<Option<Oversize>>,
}

impl Guard {
    /// Serve a guard socket at `<front>-<port>` for each of `ports`, relaying
    /// to the kernel's `<back>-<port>`, with frames of at most `limit` bytes
    /// from the kernel.
    pub(crate) fn start(front: &Path, back: &Path, ports: &[u16], limit: u64) -> std::io::Result<Guard> {
        let (trip, tripped) = watch::channel(None);
        let trip = Arc::new(trip);
        let mut tasks = Vec::new();
        for port in ports {
            let path = PathBuf::from(format!("{}-{port}", front.display()));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)?;
            let target = PathBuf::from(format!("{}-{port}", back.display()));
            tasks.push(tokio::spawn(serve(listener, target, limit, trip.clone())).abort_handle());
        }
        Ok(Guard { tasks, tripped })
    }

    /// Resolves when a frame over the limit has cut the kernel off (never
    /// otherwise), with the size it declared.
    pub(crate) fn tripped(&self) -> watch::Receiver<Option<Oversize>> {
        self.tripped.clone()
    }

    /// Stop relaying.
    pub(crate) fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accept the client's connections (ZeroMQ reconnects after a drop) until
/// the guard trips.
async fn serve(listener: UnixListener, target: PathBuf, limit: u64, trip: Arc<watch::Sender<Option<Oversize>>>) {
    let mut relays = JoinSet::new();
    let mut tripped = trip.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let Ok(kernel) = UnixStream::connect(&target).await else { continue };
                relays.spawn(relay(client, kernel, limit, trip.clone()));
            }
            _ = async { let _ = tripped.wait_for(Option::is_some).await; } => return,
        }
    }
}

/// Copy bytes both ways until either side closes or a frame from the
/// kernel is over the limit.
async fn relay(client: UnixStream, kernel: UnixStream, limit: u64, trip: Arc<watch::Sender<Option<Oversize>>>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut kernel_read, mut kernel_write) = kernel.into_split();
    let upstream = tokio::io::copy(&mut client_read, &mut kernel_write);
    let downstream = async {
        let mut scanner = FrameScanner::new(limit);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = kernel_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            if let Err(oversize) = scanner.feed(&buf[..n]) {
                tracing::warn!(declared = oversize.declared, limit, "a kernel sent a frame over the limit");
                trip.send_replace(Some(oversize));
                return Ok(());
            }
            client_write.write_all(&buf[..n]).await?;
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flags: u8, body_len: usize) -> Vec<u8> {
        let mut f = Vec::new();
        if body_len > 255 {
            f.push(flags | 0b10);
            f.extend_from_slice(&(body_len as u64).to_be_bytes());
        } else {
            f.push(flags);
            f.push(body_len as u8);
        }
        f.extend(std::iter::repeat_n(b'x', body_len));
        f
    }

    fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut s = vec![0xff; GREETING as usize];
        for f in frames {
            s.extend_from_slice(f);
        }
        s
    }

    #[test]
    fn frames_within_the_limit_pass_in_any_split_of_reads() {
        let s = stream(&[frame(0b100, 25), frame(0b1, 0), frame(0b1, 300), frame(0, 1000)]);
        for chunk in [1, 2, 7, 64, 65, 4096] {
            let mut scanner = FrameScanner::new(1000);
            for piece in s.chunks(chunk) {
                assert_eq!(scanner.feed(piece), Ok(()), "chunk size {chunk}");
            }
            assert!(matches!(scanner.state, Scan::Flags), "ends between frames (chunk size {chunk})");
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_caught_at_its_header_before_its_body() {
        let mut s = stream(&[frame(0b1, 10)]);
        s.push(0b10);
        s.extend_from_slice(&(600u64 << 20).to_be_bytes());
        for chunk in [1, 3, 64] {
            let mut scanner = FrameScanner::new(1 << 20);
            let caught = s.chunks(chunk).map(|p| scanner.feed(p)).find(Result::is_err);
            assert_eq!(caught, Some(Err(Oversize { declared: 600 << 20 })), "chunk size {chunk}");
        }
    }

    #[test]
    fn the_greeting_is_not_mistaken_for_a_frame() {
        // A greeting full of bytes that would read as a huge long frame.
        let mut scanner = FrameScanner::new(10);
        assert_eq!(scanner.feed(&[0xff; GREETING as usize]), Ok(()));
        assert_eq!(scanner.feed(&frame(0, 10)), Ok(()));
        assert_eq!(scanner.feed(&frame(0, 11)[..2]), Err(Oversize { declared: 11 }));
    }
}
