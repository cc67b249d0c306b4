//! Starts a session's kernel as a contained process and tears it down.
//!
//! The API is deliberately small so that other kernels and other isolation
//! backends (namespaces, a microVM) fit behind it: describe the process with
//! a [`Policy`], [`spawn`] it, and get a [`Sandbox`] handle to signal, wait
//! for, or kill the whole group of processes it started.
//!
//! Every process starts with exactly the environment the policy names
//! (nothing of the server's leaks), in its own process group, with stdin
//! closed and its own output going to a log file, and is recorded in a pid
//! file so a server restarted after a crash can find and kill what the
//! previous one left behind.
//!
//! With an [`Isolation`] (the default for sessions), the process is started
//! through the sandbox helper ([`helper_main`], see [`init`] for its steps):
//! own user, pid, mount, network, ipc, uts and cgroup namespaces, a minimal
//! read-only root, cgroup limits on memory, processes and CPU, no
//! capabilities, `no_new_privs`, landlock and a default-deny seccomp filter.
//!
//! This is the only crate with `unsafe` code: each block names the invariant
//! it relies on.
// The workspace denies unsafe code; this crate is the one exception.
#![allow(unsafe_code)]

pub mod cgroup;
pub mod egress;
mod ffi;
pub mod init;
pub mod jail;
mod leftovers;
mod rootfs;
pub mod seccomp;
pub mod workspace;
pub mod zygote;

pub use cgroup::{Cgroup, CgroupLimits};
pub use init::main as helper_main;
pub use jail::{Bind, Jail, Overlay};
pub use leftovers::{kill_recorded, record};
pub use zygote::{Zygote, ZygoteError, ZygoteSpec};

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
    /// Pid file written after the spawn, for crash recovery (in a directory
    /// the sandboxed code cannot reach, or it could aim the recovery at
    /// another process).
    pub pid_file: PathBuf,
    /// Isolate the process; `None` runs it as a plain process group.
    pub isolation: Option<Isolation>,
}

/// How to isolate a process.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// The kiln binary, re-executed as the sandbox helper.
    pub helper: PathBuf,
    /// Names the cgroup (`kiln/<id>`).
    pub id: String,
    /// Where the helper's instructions are written (server-only directory).
    pub spec_file: PathBuf,
    /// An empty directory the new root is assembled on.
    pub root: PathBuf,
    /// A shared directory shown copy-on-write (the runtime).
    pub overlay: Option<jail::Overlay>,
    /// The egress proxy's socket, when the network policy allows egress.
    pub egress_socket: Option<PathBuf>,
    /// Extra paths shown inside (runtime, work dir, sockets, ...).
    pub binds: Vec<Bind>,
    /// Memory, processes, CPU.
    pub limits: CgroupLimits,
    /// Size of `/tmp`, bytes.
    pub tmp_bytes: u64,
    /// Open files per process.
    pub nofile: u64,
    /// Install the seccomp filter.
    pub seccomp: bool,
}

/// Errors of sandbox set-up, one per step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The log file could not be created.
    #[error("could not create the process log {path}: {source}")]
    Log { path: PathBuf, source: std::io::Error },
    /// The program could not be started.
    #[error("could not start {program}: {source}")]
    Spawn { program: PathBuf, source: std::io::Error },
    /// The zygote could not fork the kernel.
    #[error(transparent)]
    Zygote(#[from] zygote::ZygoteError),
    /// The pid file could not be written.
    #[error("could not record the process in {path}: {source}")]
    PidFile { path: PathBuf, source: std::io::Error },
    /// The session's cgroup could not be created.
    #[error("could not create the session's cgroup (is kiln running as root?): {0}")]
    Cgroup(std::io::Error),
    /// The helper's instructions could not be written.
    #[error("could not write the sandbox description {path}: {source}")]
    Spec { path: PathBuf, source: std::io::Error },
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
        Exit { code: s.code(), signal: s.signal() }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sandbox helper reports a program killed by signal N as 128+N.
        let signal = self.signal.or(self.code.filter(|c| (129..=159).contains(c)).map(|c| c - 128));
        match (self.code, signal) {
            (_, Some(9)) => write!(f, "killed (SIGKILL, e.g. out of memory)"),
            (_, Some(s)) => write!(f, "killed by signal {s}"),
            (Some(c), _) => write!(f, "exit code {c}"),
            _ => write!(f, "unknown exit"),
        }
    }
}

/// A running contained process and everything it started.
#[derive(Debug)]
pub struct Sandbox {
    pid: Pid,
    exit: watch::Receiver<Option<Exit>>,
    cgroup: Option<Cgroup>,
}

/// Start the process described by `policy`.
pub fn spawn(policy: &Policy) -> Result<Sandbox, SandboxError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&policy.log)
        .map_err(|source| SandboxError::Log { path: policy.log.clone(), source })?;
    let log2 = log.try_clone().map_err(|source| SandboxError::Log { path: policy.log.clone(), source })?;
    let (mut cmd, cgroup) = match &policy.isolation {
        None => {
            let mut cmd = tokio::process::Command::new(&policy.program);
            cmd.args(&policy.args).envs(policy.env.iter().map(|(k, v)| (k, v))).current_dir(&policy.cwd);
            (cmd, None)
        }
        Some(iso) => {
            let cgroup = Cgroup::create(&iso.id, &iso.limits).map_err(SandboxError::Cgroup)?;
            let jail = jail_for(policy, iso, &cgroup);
            let json = serde_json::to_vec(&jail).unwrap_or_default();
            if let Err(source) = std::fs::write(&iso.spec_file, json) {
                cgroup.remove();
                return Err(SandboxError::Spec { path: iso.spec_file.clone(), source });
            }
            if let Err(source) = std::fs::create_dir_all(&iso.root) {
                cgroup.remove();
                return Err(SandboxError::Spec { path: iso.root.clone(), source });
            }
            let mut cmd = tokio::process::Command::new(&iso.helper);
            cmd.arg("__sandbox-init").arg(&iso.spec_file).current_dir("/");
            (cmd, Some(cgroup))
        }
    };
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        // Its own process group: signals for the kernel reach every
        // subprocess it started (`!pip`, `!python`, multiprocessing).
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn { program: policy.program.clone(), source })?;
    let raw = child.id().unwrap_or(0);
    let pid = Pid::from_raw(i32::try_from(raw).unwrap_or(0));
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(status) => Exit::from(status),
            Err(_) => Exit { code: None, signal: None },
        };
        let _ = tx.send(Some(exit));
    });
    recorded(Sandbox { pid, exit: rx, cgroup }, policy)
}

/// Record `sandbox` in the policy's pid file (crash recovery), or kill it.
fn recorded(sandbox: Sandbox, policy: &Policy) -> Result<Sandbox, SandboxError> {
    if let Err(source) = record(&policy.pid_file, sandbox.pid()) {
        sandbox.kill();
        return Err(SandboxError::PidFile { path: policy.pid_file.clone(), source });
    }
    Ok(sandbox)
}

/// What the helper is told to build for `policy`.
fn jail_for(policy: &Policy, iso: &Isolation, cgroup: &Cgroup) -> Jail {
    Jail {
        cgroup: Some(cgroup.clone()),
        root: iso.root.clone(),
        binds: iso.binds.clone(),
        overlay: iso.overlay.clone(),
        egress_socket: iso.egress_socket.clone(),
        tmp_bytes: iso.tmp_bytes,
        nofile: iso.nofile,
        seccomp: iso.seccomp,
        cwd: policy.cwd.clone(),
        program: policy.program.clone(),
        args: policy.args.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
        env: policy.env.iter().map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())).collect(),
    }
}

/// Start the isolated process described by `policy` as a fork of `zygote`
/// instead of a new program: the same sandbox, built by the same steps,
/// around a process that already has the runtime's packages imported.
/// `policy.program` must be the zygote's interpreter; the zygote runs
/// `policy.args` (`-m module ...`) as that interpreter would.
pub async fn spawn_in(zygote: &Zygote, policy: &Policy) -> Result<Sandbox, SandboxError> {
    let Some(iso) = &policy.isolation else {
        return Err(SandboxError::Zygote(zygote::ZygoteError::Fork("the zygote only starts sandboxed kernels".into())));
    };
    let cgroup = Cgroup::create(&iso.id, &iso.limits).map_err(SandboxError::Cgroup)?;
    if let Err(source) = std::fs::create_dir_all(&iso.root) {
        cgroup.remove();
        return Err(SandboxError::Spec { path: iso.root.clone(), source });
    }
    let body = serde_json::json!({ "jail": jail_for(policy, iso, &cgroup), "log": policy.log });
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    let forked = zygote.fork(&bytes).await;
    bytes.fill(0);
    let (raw, exit) = match forked {
        Ok(f) => f,
        Err(e) => {
            cgroup.remove();
            return Err(e.into());
        }
    };
    let pid = Pid::from_raw(i32::try_from(raw).unwrap_or(0));
    recorded(Sandbox { pid, exit, cgroup: Some(cgroup) }, policy)
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

    /// Deliver SIGINT to the program and everything it started (a Jupyter
    /// interrupt). Isolated: to the helper, which forwards it to init, which
    /// forwards it to the program's process group.
    pub fn interrupt(&self) {
        if self.cgroup.is_some() {
            if self.pid.as_raw() > 0 {
                let _ = nix::sys::signal::kill(self.pid, Signal::SIGINT);
            }
        } else {
            self.signal(Signal::SIGINT);
        }
    }

    /// Kill every process of the sandbox now.
    pub fn kill(&self) {
        self.signal(Signal::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }

    /// CPU seconds and peak memory bytes of the sandbox so far (zero
    /// without a cgroup).
    pub fn usage(&self) -> (f64, u64) {
        match &self.cgroup {
            Some(cg) => (cg.cpu_seconds().unwrap_or(0.0), cg.memory_peak().unwrap_or(0)),
            None => (0.0, 0),
        }
    }

    /// Whether the sandbox's memory limit was hit.
    pub fn hit_memory_limit(&self) -> bool {
        self.cgroup.as_ref().is_some_and(Cgroup::hit_memory_limit)
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
        // Processes that left the group (setsid) die with the pid
        // namespace's init, or are killed through the cgroup.
        self.kill();
        if let Some(cg) = self.cgroup.clone() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
    }
}
