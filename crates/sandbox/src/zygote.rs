//! The client side of the zygote: a fork server that starts kernels in
//! milliseconds instead of booting a Python interpreter for each.
//!
//! The zygote is a Python process of the runtime (`kiln_kernel.zygote`,
//! shipped with kiln and installed into the runtime) that has imported the
//! kernel and the heavy packages once. For each kernel it forks through
//! this crate's C entry point ([`crate::ffi::kiln_zygote_fork`]): the
//! child, the sandbox's init, runs every step of the sandbox helper
//! ([`crate::init`]) and none of the zygote's Python, and the fork returns
//! a second time in the confined program process, which then runs the
//! kernel module. The program shares the zygote's memory copy-on-write, so
//! it starts with numpy, pandas and matplotlib already imported, in a few
//! megabytes of its own.
//!
//! The zygote holds no secret: it is started with exactly a kernel's
//! environment, and every request it receives (paths, environment) is
//! zeroed in its memory after the fork, so no session inherits another's.
//!
//! It talks to the server over one `SOCK_SEQPACKET` socket pair (its end at
//! fd 3), one message per datagram:
//! - request: an 8-byte request id (little-endian), then the body: JSON
//!   `{"jail": Jail, "log": path}`;
//! - reply: JSON `{"id": n, "pid": p}` carrying, as `SCM_RIGHTS`, a pidfd of
//!   the child, which the zygote opened right after the fork, before it
//!   could reap it; or `{"id": n, "error": s}`;
//! - event: JSON `{"exit": p, "code": c, "signal": s}` when a child it forked
//!   has ended (the zygote is its parent and reaps it).
//!
//! The first message, `{"ready": true}`, says the imports are done. At fd 4
//! the zygote holds the server's lifeline (see [`crate::Sandboxes`]), which
//! it passes on to every child; it exits when the lifeline or its socket
//! reaches end of file, that is when the server has gone.

use crate::process::Owned;
use crate::Exit;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};
use serde::Deserialize;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

/// The largest message either side sends.
const MAX_MESSAGE: usize = 1 << 20;

/// How to start a zygote.
#[derive(Debug, Clone)]
pub struct ZygoteSpec {
    /// The runtime's Python interpreter.
    pub python: PathBuf,
    /// Its complete environment (a kernel's base environment).
    pub env: Vec<(OsString, OsString)>,
    /// Modules imported before the first fork.
    pub preload: Vec<String>,
    /// The zygote's own log.
    pub log: PathBuf,
    /// How long the imports may take.
    pub ready_timeout: Duration,
}

/// Why the zygote could not start or fork.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The process could not be started.
    #[error("could not start the zygote {python}: {source}")]
    Spawn { python: PathBuf, source: std::io::Error },
    /// The server does not fork kernels from a zygote (`--zygote off`, or
    /// no sandbox).
    #[error("kernels are not forked from a zygote on this server")]
    Disabled,
    /// It ended or said nothing sensible before becoming ready.
    #[error("the zygote did not become ready: {0}")]
    NotReady(String),
    /// It has ended; a new one must be started.
    #[error("the zygote has exited")]
    Gone,
    /// It could not fork this kernel.
    #[error("the zygote could not fork a kernel: {0}")]
    Fork(String),
}

/// A running zygote. Cheap to clone; the process is killed when the last
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct Zygote {
    inner: Arc<Inner>,
}

struct Inner {
    process: Owned,
    socket: Arc<AsyncFd<OwnedFd>>,
    /// One request at a time on the socket.
    sending: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote").field("pid", &self.process.pid()).finish_non_exhaustive()
    }
}

/// A forked child: its pidfd, pid, and a watch fed by the zygote's report.
pub(crate) type Forked = (OwnedFd, u32, watch::Receiver<Option<Exit>>);

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Result<Forked, ZygoteError>>>,
    children: HashMap<u32, watch::Sender<Option<Exit>>>,
    gone: bool,
}

impl State {
    /// The zygote ended: its children were killed with it (their death
    /// signal), and nothing pending will be answered.
    fn close(&mut self) {
        self.gone = true;
        for (_, tx) in self.pending.drain() {
            let _ = tx.send(Err(ZygoteError::Gone));
        }
        for (_, tx) in self.children.drain() {
            let _ = tx.send(Some(Exit { code: None, signal: Some(9) }));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Its children die with it (their parent-death signal).
        self.process.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

#[derive(Deserialize)]
struct Line {
    ready: Option<bool>,
    id: Option<u64>,
    pid: Option<u32>,
    error: Option<String>,
    exit: Option<u32>,
    code: Option<i32>,
    signal: Option<i32>,
}

impl Zygote {
    /// Start a zygote with `library` (`libkiln_sandbox.so`), handing it the
    /// server's `lifeline`, and wait until its imports are done.
    pub(crate) async fn start(
        spec: &ZygoteSpec,
        library: &std::path::Path,
        lifeline: &OwnedFd,
    ) -> Result<Zygote, ZygoteError> {
        let spawn_err = |source| ZygoteError::Spawn { python: spec.python.clone(), source };
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| spawn_err(e.into()))?;
        let mut cmd = std::process::Command::new(&spec.python);
        cmd.args(["-m", "kiln_kernel.zygote", "--control", "3", "--lifeline", "4", "--library"])
            .arg(library)
            .arg("--preload")
            .arg(spec.preload.join(","))
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/");
        crate::sandboxes::plumb(&mut cmd, &spec.log, &[&theirs, lifeline]).map_err(spawn_err)?;
        let process = Owned::spawn(&mut cmd).map_err(spawn_err)?;
        drop(theirs);
        let socket = nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
            .map_err(|e| spawn_err(e.into()))
            .and_then(|_| crate::process::register(ours).map_err(spawn_err))?;
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; MAX_MESSAGE];
        let first = tokio::time::timeout(spec.ready_timeout, receive(&socket, &mut buf)).await;
        match first {
            Ok(Ok((n, _))) if serde_json::from_slice::<Line>(&buf[..n]).ok().and_then(|l| l.ready) == Some(true) => {}
            Ok(Ok((n, _))) => {
                process.signal(nix::sys::signal::Signal::SIGKILL);
                let what = String::from_utf8_lossy(&buf[..n]).into_owned();
                return Err(ZygoteError::NotReady(format!("{what:?}; see {}", spec.log.display())));
            }
            Ok(Err(e)) => {
                process.signal(nix::sys::signal::Signal::SIGKILL);
                return Err(ZygoteError::NotReady(format!("{e}; see {}", spec.log.display())));
            }
            Err(_) => {
                process.signal(nix::sys::signal::Signal::SIGKILL);
                return Err(ZygoteError::NotReady(format!("no answer within {:?}", spec.ready_timeout)));
            }
        }
        let state = Arc::new(Mutex::new(State::default()));
        tokio::spawn(read_replies(socket.clone(), state.clone(), process.exit_watch()));
        let inner = Inner { process, socket, sending: tokio::sync::Mutex::new(()), next_id: AtomicU64::new(1), state };
        Ok(Zygote { inner: Arc::new(inner) })
    }

    /// The zygote's pid, as the server sees it (for logs and tests).
    pub fn pid(&self) -> i32 {
        self.inner.process.pid()
    }

    /// Kill the zygote (its children die with it) and wait until it has
    /// ended.
    pub async fn stop(&self) {
        self.inner.process.signal(nix::sys::signal::Signal::SIGKILL);
        self.inner.process.ended().await;
    }

    /// Whether the zygote is still running.
    pub fn is_alive(&self) -> bool {
        self.inner.state.lock().map(|s| !s.gone).unwrap_or(false)
    }

    /// Ask for a child built from `body` (`{"jail": .., "log": ..}`); returns
    /// its pidfd, its pid and a watch that turns `Some` when it has ended.
    pub(crate) async fn fork(&self, body: &[u8]) -> Result<Forked, ZygoteError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.state.lock().map_err(|_| ZygoteError::Gone)?;
            if st.gone {
                return Err(ZygoteError::Gone);
            }
            st.pending.insert(id, tx);
        }
        let mut msg = Vec::with_capacity(8 + body.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(body);
        let sent = {
            let _one = self.inner.sending.lock().await;
            send(&self.inner.socket, &msg).await
        };
        // The same bytes must not linger in kiln's memory either.
        msg.fill(0);
        if sent.is_err() {
            if let Ok(mut st) = self.inner.state.lock() {
                st.pending.remove(&id);
            }
            return Err(ZygoteError::Gone);
        }
        // A dropped sender means the reader ended: the zygote is gone.
        rx.await.unwrap_or(Err(ZygoteError::Gone))
    }
}

/// Read the zygote's replies and events until it ends.
async fn read_replies(
    socket: Arc<AsyncFd<OwnedFd>>,
    state: Arc<Mutex<State>>,
    mut exited: watch::Receiver<Option<Exit>>,
) {
    // One buffer for every message: the largest a message may be, and
    // zeroed once rather than for each of the two a session costs.
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, fd) = tokio::select! {
            got = receive(&socket, &mut buf) => match got {
                Ok(m) => m,
                Err(_) => break,
            },
            _ = exited.wait_for(Option::is_some) => break,
        };
        let bytes = &buf[..n];
        let Ok(line) = serde_json::from_slice::<Line>(bytes) else {
            tracing::warn!(line = %String::from_utf8_lossy(bytes), "unreadable message from the zygote");
            continue;
        };
        let Ok(mut st) = state.lock() else { break };
        if let Some(pid) = line.exit {
            if let Some(tx) = st.children.remove(&pid) {
                let _ = tx.send(Some(Exit { code: line.code, signal: line.signal }));
            }
        } else if let Some(id) = line.id {
            let result = match (line.pid, fd, line.error) {
                (Some(pid), Some(fd), _) => {
                    // Registered before any later message is read, so its
                    // exit event cannot be missed.
                    let (tx, rx) = watch::channel(None);
                    st.children.insert(pid, tx);
                    Ok((fd, pid, rx))
                }
                (Some(_), None, _) => Err(ZygoteError::Fork("the zygote sent no pidfd".into())),
                (None, _, e) => Err(ZygoteError::Fork(e.unwrap_or_else(|| "no pid".into()))),
            };
            if let Some(tx) = st.pending.remove(&id) {
                let _ = tx.send(result);
            }
        }
    }
    tracing::warn!(status = ?*exited.borrow(), "the zygote exited");
    if let Ok(mut st) = state.lock() {
        st.close();
    }
}

/// Send one datagram.
async fn send(socket: &AsyncFd<OwnedFd>, msg: &[u8]) -> std::io::Result<()> {
    loop {
        let mut ready = socket.writable().await?;
        let sent = ready.try_io(|s| {
            sendmsg::<()>(s.get_ref().as_raw_fd(), &[IoSlice::new(msg)], &[], MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Receive one datagram into `buf` and the descriptor it carries, if any;
/// returns the datagram's length. End of file (the zygote has gone) is an
/// error.
async fn receive(socket: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    loop {
        let mut ready = socket.readable().await?;
        let got = ready.try_io(|s| {
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<()>(s.get_ref().as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            let mut fd = None;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just installed this descriptor
                        // in this process for us (SCM_RIGHTS); nothing else
                        // knows of it, so it is ours to own and close.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
            Ok((msg.bytes, fd))
        });
        match got {
            Ok(Ok((0, _))) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok((n, fd))) => return Ok((n, fd)),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}
