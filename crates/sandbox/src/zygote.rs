//! The client side of the zygote: a fork server that starts kernels in
//! milliseconds instead of booting a Python interpreter for each.
//!
//! The zygote is a Python process of the runtime (`kiln_kernel.zygote`,
//! shipped with kiln and installed into the runtime) that has imported the
//! kernel and the heavy packages once. For each kernel it forks; the child
//! calls this crate's C entry point ([`crate::ffi`]), which runs every step
//! of the sandbox helper ([`crate::init`]) and returns in the confined
//! program process, which then runs the kernel module. The child shares the
//! zygote's memory copy-on-write, so it starts with numpy, pandas and
//! matplotlib already imported, in a few megabytes of its own.
//!
//! The zygote holds no secret: it is started with exactly a kernel's
//! environment, and every request it receives (paths, environment) is
//! zeroed in its memory after the fork, so no session inherits another's.
//!
//! Protocol, over the zygote's stdin and stdout:
//! - request: a 16-byte header (request id, body length; little-endian
//!   u64s), then the body: JSON `{"jail": Jail, "log": path}`;
//! - reply, one JSON line: `{"id": n, "pid": p}` or `{"id": n, "error": s}`;
//! - event, one JSON line: `{"exit": p, "code": c, "signal": s}` when a
//!   child it forked has ended (the zygote is its parent and reaps it).
//!
//! The first line, `{"ready": true}`, says the imports are done.

use crate::Exit;
use serde::Deserialize;
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::ChildStdin;
use tokio::sync::{oneshot, watch};

/// How to start a zygote.
#[derive(Debug, Clone)]
pub struct ZygoteSpec {
    /// The runtime's Python interpreter.
    pub python: PathBuf,
    /// Its complete environment (a kernel's base environment).
    pub env: Vec<(OsString, OsString)>,
    /// `libkiln_sandbox.so`.
    pub library: PathBuf,
    /// Modules imported before the first fork.
    pub preload: Vec<String>,
    /// The zygote's own log.
    pub log: PathBuf,
    /// Pid file, for crash recovery.
    pub pid_file: PathBuf,
    /// How long the imports may take.
    pub ready_timeout: Duration,
}

/// Why the zygote could not start or fork.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The process could not be started.
    #[error("could not start the zygote {python}: {source}")]
    Spawn { python: PathBuf, source: std::io::Error },
    /// Its pid file could not be written.
    #[error("could not record the zygote in {path}: {source}")]
    PidFile { path: PathBuf, source: std::io::Error },
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
    pid: i32,
    writer: tokio::sync::Mutex<ChildStdin>,
    next_id: AtomicU64,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote").field("pid", &self.pid).finish_non_exhaustive()
    }
}

type Forked = Result<(u32, watch::Receiver<Option<Exit>>), ZygoteError>;

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Forked>>,
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
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
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
    /// Start a zygote and wait until its imports are done.
    pub async fn start(spec: &ZygoteSpec) -> Result<Zygote, ZygoteError> {
        let spawn_err = |source| ZygoteError::Spawn { python: spec.python.clone(), source };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&spec.log).map_err(spawn_err)?;
        let mut child = tokio::process::Command::new(&spec.python)
            .args(["-m", "kiln_kernel.zygote", "--library"])
            .arg(&spec.library)
            .arg("--preload")
            .arg(spec.preload.join(","))
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            // Its own group: kiln's terminal's Ctrl-C is not for it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        if let Some(p) = child.id() {
            if let Err(source) = crate::leftovers::record(&spec.pid_file, p) {
                let _ = child.start_kill();
                return Err(ZygoteError::PidFile { path: spec.pid_file.clone(), source });
            }
        }
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(ZygoteError::NotReady("no pipes".into()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(spec.ready_timeout, lines.next_line()).await;
        match first {
            Ok(Ok(Some(l))) if serde_json::from_str::<Line>(&l).ok().and_then(|l| l.ready) == Some(true) => {}
            Ok(Ok(other)) => {
                let _ = child.start_kill();
                return Err(ZygoteError::NotReady(format!("{other:?}; see {}", spec.log.display())));
            }
            Ok(Err(e)) => return Err(ZygoteError::NotReady(e.to_string())),
            Err(_) => {
                let _ = child.start_kill();
                return Err(ZygoteError::NotReady(format!("no answer within {:?}", spec.ready_timeout)));
            }
        }
        let state = Arc::new(Mutex::new(State::default()));
        let reader_state = state.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(line) = serde_json::from_str::<Line>(&line) else {
                    tracing::warn!(%line, "unreadable line from the zygote");
                    continue;
                };
                let Ok(mut st) = reader_state.lock() else { break };
                if let Some(pid) = line.exit {
                    if let Some(tx) = st.children.remove(&pid) {
                        let _ = tx.send(Some(Exit { code: line.code, signal: line.signal }));
                    }
                } else if let Some(id) = line.id {
                    let result = match (line.pid, line.error) {
                        (Some(pid), _) => {
                            // Registered before any later line is read, so
                            // its exit event cannot be missed.
                            let (tx, rx) = watch::channel(None);
                            st.children.insert(pid, tx);
                            Ok((pid, rx))
                        }
                        (None, e) => Err(ZygoteError::Fork(e.unwrap_or_else(|| "no pid".into()))),
                    };
                    if let Some(tx) = st.pending.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
            }
            let status = child.wait().await;
            tracing::warn!(?status, "the zygote exited");
            if let Ok(mut st) = reader_state.lock() {
                st.close();
            }
        });
        let inner = Inner { pid, writer: tokio::sync::Mutex::new(stdin), next_id: AtomicU64::new(1), state };
        Ok(Zygote { inner: Arc::new(inner) })
    }

    /// Whether the zygote is still running.
    pub fn is_alive(&self) -> bool {
        self.inner.state.lock().map(|s| !s.gone).unwrap_or(false)
    }

    /// Ask for a child built from `body` (`{"jail": .., "log": ..}`); returns
    /// its pid and a watch that turns `Some` when it has ended.
    pub async fn fork(&self, body: &[u8]) -> Result<(u32, watch::Receiver<Option<Exit>>), ZygoteError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.state.lock().map_err(|_| ZygoteError::Gone)?;
            if st.gone {
                return Err(ZygoteError::Gone);
            }
            st.pending.insert(id, tx);
        }
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u64).to_le_bytes());
        msg.extend_from_slice(body);
        {
            let mut w = self.inner.writer.lock().await;
            if w.write_all(&msg).await.is_err() || w.flush().await.is_err() {
                if let Ok(mut st) = self.inner.state.lock() {
                    st.pending.remove(&id);
                }
                return Err(ZygoteError::Gone);
            }
        }
        // The same bytes must not linger in kiln's memory either.
        msg.fill(0);
        // A dropped sender means the reader ended: the zygote is gone.
        rx.await.unwrap_or(Err(ZygoteError::Gone))
    }
}
