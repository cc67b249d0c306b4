//! The server's handle on the host ([`Sandboxes`]) and on one running
//! kernel ([`Sandbox`]).
//!
//! [`Sandboxes`] holds what every sandbox of one server shares: the
//! [`SandboxSpec`], the server's place in the cgroup hierarchies and its
//! sessions directory. It is the only way in: cgroups, the helper's
//! description and workspaces stay private to this crate.

use crate::cgroup::Cgroup;
use crate::jail::Jail;
use crate::zygote::{Zygote, ZygoteError, ZygoteSpec};
use crate::{Exit, Mounts, Program, SandboxError, SandboxSpec};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use tokio::sync::watch;

/// One server's sandboxes: cheap to clone.
#[derive(Debug, Clone)]
pub struct Sandboxes {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// `None`: kernels run as plain processes, without any isolation.
    spec: Option<SandboxSpec>,
    /// Where the server keeps one directory per kernel.
    sessions_dir: PathBuf,
    /// Names this server's cgroups.
    instance: String,
}

/// The cgroup directories of the server whose kernels live in
/// `sessions_dir`, one per hierarchy, named by controller (`unified` for
/// the v2 hierarchy); each kernel's cgroup is a directory in them. For
/// operators and tests.
pub fn instance_cgroups(sessions_dir: &Path) -> Vec<(String, PathBuf)> {
    crate::cgroup::instance_dirs(&crate::cgroup::instance_name(sessions_dir))
}

/// Remove a session's storage at `dir` (unmount it, if it is a workspace;
/// its directory stays for the caller to delete). Blocking.
pub fn remove_storage(dir: &Path) -> std::io::Result<()> {
    crate::workspace::unmount_workspace(dir)
}

/// One kernel to start.
#[derive(Debug)]
pub struct Spawn<'a> {
    /// A directory only the server can reach (the sandbox's description,
    /// the mount point of its root, its pid file); its name, unique among
    /// the server's kernels, names the kernel's cgroup.
    pub dir: &'a Path,
    /// Where the process's own stdout and stderr go (not the user's
    /// outputs, which travel over the Jupyter protocol).
    pub log: &'a Path,
    /// What runs.
    pub program: Program,
    /// What the sandbox shows of the host (ignored without isolation).
    pub mounts: Mounts,
    /// Fork the kernel from this zygote instead of starting a new
    /// interpreter; `program.path` must then be the zygote's interpreter,
    /// and `program.args` `-m module ...`.
    pub zygote: Option<&'a Zygote>,
}

impl Sandboxes {
    /// The sandboxes of the server whose kernels live in `sessions_dir`;
    /// `spec` `None` runs kernels without any isolation.
    pub fn new(spec: Option<SandboxSpec>, sessions_dir: PathBuf) -> Self {
        let instance = crate::cgroup::instance_name(&sessions_dir);
        Sandboxes { shared: Arc::new(Shared { spec, sessions_dir, instance }) }
    }

    /// How sandboxes are built, when kernels are isolated.
    pub fn spec(&self) -> Option<&SandboxSpec> {
        self.shared.spec.as_ref()
    }

    /// The host uid that must own what the server writes for a session
    /// (its workspace, uploads, the shared runtime), when isolated.
    pub fn file_owner(&self) -> Option<u32> {
        self.shared.spec.as_ref().map(|_| crate::jail::host_user_id())
    }

    /// Kill what a previous server on this sessions directory left running
    /// (kernels, the zygote), remove its cgroups and unmount its
    /// workspaces. Blocking.
    pub fn recover(&self) {
        let dir = &self.shared.sessions_dir;
        // The zygote first: its children die with it.
        let _ = crate::leftovers::kill_recorded(&self.zygote_dir().join("pid"));
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let _ = crate::leftovers::kill_recorded(&entry.path().join("pid"));
            }
        }
        if self.shared.spec.is_some() {
            crate::cgroup::remove_all(&self.shared.instance);
        }
        crate::workspace::unmount_all_under(dir);
    }

    /// Where the zygote's log and pid file live (`<data>/zygote`, beside
    /// the sessions directory, not in it).
    pub fn zygote_dir(&self) -> PathBuf {
        self.shared.sessions_dir.with_file_name("zygote")
    }

    /// Create a session's storage at `dir`: when isolated, a tmpfs of the
    /// disk limit owned by the session user. Blocking.
    pub fn create_storage(&self, dir: &Path) -> std::io::Result<()> {
        match &self.shared.spec {
            Some(spec) => crate::workspace::mount_workspace(dir, spec.limits.disk_bytes, crate::jail::host_user_id()),
            None => std::fs::create_dir_all(dir),
        }
    }

    /// Start a zygote for this server's kernels.
    pub async fn start_zygote(&self, spec: &ZygoteSpec) -> Result<Zygote, ZygoteError> {
        Zygote::start(spec).await
    }

    /// Start the kernel described by `req`.
    pub async fn spawn(&self, req: Spawn<'_>) -> Result<Sandbox, SandboxError> {
        let pid_file = req.dir.join("pid");
        let sandbox = match (&self.shared.spec, req.zygote) {
            (None, _) => self.spawn_plain(&req)?,
            (Some(spec), zygote) => {
                let name = req.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let cgroup = Cgroup::create(&format!("{}/{name}", self.shared.instance), &spec.limits)
                    .map_err(SandboxError::Cgroup)?;
                let root = req.dir.join("rootfs");
                if let Err(source) = std::fs::create_dir_all(&root) {
                    cgroup.remove();
                    return Err(SandboxError::Spec { path: root, source });
                }
                let jail = Jail {
                    cgroup: Some(cgroup.clone()),
                    root,
                    mounts: req.mounts.clone(),
                    limits: spec.limits,
                    seccomp: true,
                    program: req.program.clone(),
                };
                let started = match zygote {
                    Some(z) => fork_from(z, &jail, req.log).await,
                    None => start_helper(spec, &jail, req.dir, req.log),
                };
                match started {
                    Ok((pid, exit)) => Sandbox { pid, exit, cgroup: Some(cgroup) },
                    Err(e) => {
                        cgroup.remove();
                        return Err(e);
                    }
                }
            }
        };
        // Record it for crash recovery, or kill it.
        if let Err(source) = crate::leftovers::record(&pid_file, sandbox.pid()) {
            sandbox.kill();
            return Err(SandboxError::PidFile { path: pid_file, source });
        }
        Ok(sandbox)
    }

    /// A plain process in its own process group, for `--sandbox none`.
    fn spawn_plain(&self, req: &Spawn<'_>) -> Result<Sandbox, SandboxError> {
        let p = &req.program;
        let mut cmd = tokio::process::Command::new(&p.path);
        cmd.env_clear().args(&p.args).envs(p.env.iter().map(|(k, v)| (k, v))).current_dir(&p.cwd);
        let (pid, exit) = run(cmd, req.log, &p.path)?;
        Ok(Sandbox { pid, exit, cgroup: None })
    }
}

type Started = (Pid, watch::Receiver<Option<Exit>>);

/// Start the sandbox helper on `jail`, written to `dir/sandbox.json`.
fn start_helper(spec: &SandboxSpec, jail: &Jail, dir: &Path, log: &Path) -> Result<Started, SandboxError> {
    let spec_file = dir.join("sandbox.json");
    let json = serde_json::to_vec(jail)
        .map_err(|e| SandboxError::Spec { path: spec_file.clone(), source: std::io::Error::other(e) })?;
    std::fs::write(&spec_file, json).map_err(|source| SandboxError::Spec { path: spec_file.clone(), source })?;
    let mut cmd = tokio::process::Command::new(&spec.helper);
    cmd.env_clear().arg("__sandbox-init").arg(&spec_file).current_dir("/");
    run(cmd, log, &spec.helper)
}

/// Run `cmd` (its environment already set) with stdin closed, output to
/// `log`.
fn run(mut cmd: tokio::process::Command, log: &Path, program: &Path) -> Result<Started, SandboxError> {
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| SandboxError::Log { path: log.to_path_buf(), source })
    };
    let (out, err) = (open_log()?, open_log()?);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        // Its own process group: signals for the kernel reach every
        // subprocess it started (`!pip`, `!python`, multiprocessing).
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn { program: program.to_path_buf(), source })?;
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
    Ok((pid, rx))
}

/// Fork the kernel described by `jail` from `zygote`: the same sandbox,
/// built by the same steps, around a process that already has the
/// runtime's packages imported.
async fn fork_from(zygote: &Zygote, jail: &Jail, log: &Path) -> Result<Started, SandboxError> {
    let body = serde_json::json!({ "jail": jail, "log": log });
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    let forked = zygote.fork(&bytes).await;
    bytes.fill(0);
    let (raw, exit) = forked?;
    Ok((Pid::from_raw(i32::try_from(raw).unwrap_or(0)), exit))
}

/// A running contained process and everything it started.
#[derive(Debug)]
pub struct Sandbox {
    pid: Pid,
    exit: watch::Receiver<Option<Exit>>,
    cgroup: Option<Cgroup>,
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
