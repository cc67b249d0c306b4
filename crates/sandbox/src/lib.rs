//! Starts a session's kernel as a contained process and tears it down.
//!
//! The API is deliberately small so that other kernels and other isolation
//! backends (namespaces, a microVM) fit behind it: describe the process with
//! a [`Policy`], [`spawn`] it, and get a [`Sandbox`] handle to signal, wait
//! for, or kill the whole group of processes it started.
//!
//! What this level guarantees today: the process starts with exactly the
//! environment the policy names (nothing of the server's leaks), in its own
//! process group (so `!pip`, `!python` and any subprocess die with it), with
//! stdin closed and its own output going to a log file, and it is recorded in
//! a pid file so a server restarted after a crash can find and kill what the
//! previous one left behind. Namespace, cgroup and seccomp isolation are
//! layered onto [`spawn`] without changing this interface.
#![deny(unsafe_code)]

mod leftovers;

pub use leftovers::{kill_recorded, record};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use tokio::sync::watch;

/// Everything needed to start one contained process.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The complete environment; nothing else is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Where the process's own stdout/stderr go (not the user's outputs,
    /// which travel over the Jupyter protocol).
    pub log: PathBuf,
    /// Pid file written after the spawn, for crash recovery.
    pub pid_file: PathBuf,
}

/// Errors of sandbox set-up, one per step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The log file could not be created.
    #[error("could not create the process log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("could not start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// The pid file could not be written.
    #[error("could not record the process in {path}: {source}")]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a contained process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if it was killed by one.
    pub signal: Option<i32>,
}

impl From<ExitStatus> for Exit {
    fn from(s: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Exit {
            code: s.code(),
            signal: s.signal(),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (_, Some(9)) => write!(f, "killed (SIGKILL, e.g. out of memory)"),
            (_, Some(s)) => write!(f, "killed by signal {s}"),
            _ => write!(f, "unknown exit"),
        }
    }
}

/// A running contained process and everything it started.
#[derive(Debug)]
pub struct Sandbox {
    pid: Pid,
    exit: watch::Receiver<Option<Exit>>,
}

/// Start the process described by `policy`.
pub fn spawn(policy: &Policy) -> Result<Sandbox, SandboxError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&policy.log)
        .map_err(|source| SandboxError::Log {
            path: policy.log.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| SandboxError::Log {
        path: policy.log.clone(),
        source,
    })?;
    let mut cmd = tokio::process::Command::new(&policy.program);
    cmd.args(&policy.args)
        .env_clear()
        .envs(policy.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&policy.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        // Its own process group: signals for the kernel reach every
        // subprocess it started (`!pip`, `!python`, multiprocessing).
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn {
        program: policy.program.clone(),
        source,
    })?;
    let raw = child.id().unwrap_or(0);
    let pid = Pid::from_raw(i32::try_from(raw).unwrap_or(0));
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(status) => Exit::from(status),
            Err(_) => Exit {
                code: None,
                signal: None,
            },
        };
        let _ = tx.send(Some(exit));
    });
    let sandbox = Sandbox { pid, exit: rx };
    if let Err(source) = record(&policy.pid_file, raw) {
        sandbox.kill();
        return Err(SandboxError::PidFile {
            path: policy.pid_file.clone(),
            source,
        });
    }
    Ok(sandbox)
}

impl Sandbox {
    /// The main process's pid (as seen by the server).
    pub fn pid(&self) -> u32 {
        u32::try_from(self.pid.as_raw()).unwrap_or(0)
    }

    /// A receiver that turns `Some` when the main process has ended.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// How the main process ended, if it has.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Deliver SIGINT to every process of the sandbox (a Jupyter interrupt).
    pub fn interrupt(&self) {
        self.signal(Signal::SIGINT);
    }

    /// Kill every process of the sandbox now.
    pub fn kill(&self) {
        self.signal(Signal::SIGKILL);
    }

    fn signal(&self, sig: Signal) {
        if self.pid.as_raw() <= 0 {
            return;
        }
        // The group may already be gone (ESRCH); nothing else can fail here.
        if let Err(e) = killpg(self.pid, sig) {
            tracing::debug!(pid = self.pid.as_raw(), ?sig, error = %e, "signal not delivered");
        }
    }

    /// Kill everything and wait until the main process is reaped.
    pub async fn kill_and_wait(&self) {
        self.kill();
        let mut rx = self.exit.clone();
        let _ = rx.wait_for(Option::is_some).await;
        // Processes that left the group on purpose (setsid) would survive
        // this; the namespace backend closes that gap by killing the pid
        // namespace's init.
        self.kill();
    }
}
