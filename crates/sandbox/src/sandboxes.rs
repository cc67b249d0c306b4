//! The server's handle on the host ([`Sandboxes`]) and on one running
//! kernel ([`Sandbox`]).
//!
//! [`Sandboxes`] holds what every sandbox of one server shares: the
//! [`SandboxSpec`], the server's place in the cgroup hierarchies (beneath
//! its own cgroup, see [`crate::cgroup`]), its registration among the live
//! servers of the host (see [`crate::registry`]), its lifeline, and its
//! sessions directory. It is the only way in: cgroups, the helper's
//! description and workspaces stay private to this crate.

use crate::cgroup::{Cgroup, Plan};
use crate::jail::{ForkRequest, Jail};
use crate::process::Owned;
use crate::registry::{Record, Registration};
use crate::zygote::{Zygote, ZygoteError, ZygoteSpec};
use crate::{Exit, Mounts, Program, SandboxError, SandboxSpec};
use nix::sys::signal::Signal;
use std::borrow::Cow;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
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
    /// Names this server's cgroups and registration: random, per start.
    instance: String,
    /// Set by [`Sandboxes::claim`].
    lifeline: OnceLock<Lifeline>,
    /// Where the cgroups go; set by [`Sandboxes::claim`] (isolated only).
    plan: OnceLock<Plan>,
    /// This server's registration, held until a clean stop.
    registration: Mutex<Option<Registration>>,
}

/// A pipe whose write end only this process holds (close-on-exec, so no
/// child ever inherits it): when the server dies, however it dies, every
/// holder of the read end sees end of file. Each sandbox's init, the
/// helper's outer process and the zygote hold the read end and exit on it.
#[derive(Debug)]
struct Lifeline {
    read: OwnedFd,
    /// Never written, never handed out: only its closing matters.
    _write: OwnedFd,
}

/// The cgroup directories of the server whose kernels live in
/// `sessions_dir` (alive, or dead and not reaped yet), one per hierarchy,
/// named by controller (`unified` for the v2 hierarchy); each kernel's
/// cgroup is a directory in them. Empty when no such server is
/// registered. For operators and tests.
pub fn instance_cgroups(sessions_dir: &Path) -> Vec<(String, PathBuf)> {
    crate::registry::find(sessions_dir).map(|r| r.cgroups).unwrap_or_default()
}

/// Remove a session's storage at `dir` (unmount it, if it is a workspace;
/// its directory stays for the caller to delete). Blocking.
pub fn remove_storage(dir: &Path) -> std::io::Result<()> {
    crate::workspace::unmount_workspace(dir)
}

/// Size of an isolated kernel's run directory: its sockets, connection
/// file and log (the lean kernel echoes fd-level output there).
pub const RUN_DIR_BYTES: u64 = 8 << 20;

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
    /// Its CPU weight from the start (its boot is work too).
    pub cpu_weight: crate::CpuWeight,
}

impl Sandboxes {
    /// The sandboxes of the server whose kernels live in `sessions_dir`;
    /// `spec` `None` runs kernels without any isolation. Nothing is
    /// touched until [`Sandboxes::claim`].
    pub fn new(spec: Option<SandboxSpec>, sessions_dir: PathBuf) -> Self {
        let mut bytes = [0u8; 8];
        let random =
            std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        if let Err(e) = random {
            tracing::warn!(error = %e, "no random instance name; using the pid");
            bytes = u64::from(std::process::id()).to_le_bytes();
        }
        let instance = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let shared = Shared {
            spec,
            sessions_dir,
            instance,
            lifeline: OnceLock::new(),
            plan: OnceLock::new(),
            registration: Mutex::new(None),
        };
        Sandboxes { shared: Arc::new(shared) }
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

    /// Take this server's place on the host, before the first spawn: make
    /// the lifeline; when isolated, refuse a sessions directory that a live
    /// server uses, make this server's cgroups beneath its own cgroup,
    /// register it among the live servers, reap every dead server's
    /// leftovers (the processes in its cgroups, the cgroups, its
    /// workspaces and kernel directories), never a live one's, and mount a
    /// tmpfs for this server's kernel directories. Returns how many dead
    /// servers were reaped. Blocking.
    pub fn claim(&self) -> std::io::Result<usize> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let _ = self.shared.lifeline.set(Lifeline { read, _write: write });
        if self.shared.spec.is_none() {
            return Ok(0);
        }
        let dir = Path::new(crate::registry::DIR);
        let reaped = crate::registry::exclusively(dir, || {
            let records = crate::registry::scan(dir)?;
            let live: Vec<&Record> = records.iter().filter(|(_, _, dead)| dead.is_none()).map(|(_, r, _)| r).collect();
            if let Some(other) = live.iter().find(|r| r.sessions_dir == self.shared.sessions_dir) {
                return Err(std::io::Error::other(format!(
                    "another kiln (pid {}) is serving {}; stop it or use another --data-dir",
                    other.pid,
                    self.shared.sessions_dir.display()
                )));
            }
            let plan = crate::cgroup::host_plan(&self.shared.instance).map_err(std::io::Error::other)?;
            crate::cgroup::prepare(&plan)
                .map_err(|e| std::io::Error::new(e.kind(), format!("preparing kiln's cgroups ({plan:?}): {e}")))?;
            let record = Record {
                pid: std::process::id(),
                sessions_dir: self.shared.sessions_dir.clone(),
                cgroups: plan.instance_dirs(),
                unified: matches!(plan, Plan::Unified { .. }),
            };
            let registration = crate::registry::register(dir, &self.shared.instance, &record)?;
            *self.shared.registration.lock().unwrap_or_else(|p| p.into_inner()) = Some(registration);
            let _ = self.shared.plan.set(plan);
            let mut reaped = 0;
            for (path, dead, lock) in &records {
                if lock.is_none() {
                    continue;
                }
                reap(dead, live.iter().any(|r| r.sessions_dir == dead.sessions_dir));
                let _ = std::fs::remove_file(path);
                reaped += 1;
            }
            Ok(reaped)
        })?;
        // Workspaces of a server that predates the registry.
        crate::workspace::unmount_all_under(&self.shared.sessions_dir);
        crate::workspace::mount_sessions_dir(&self.shared.sessions_dir).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("mounting a tmpfs for kernel directories at {}: {e}", self.shared.sessions_dir.display()),
            )
        })?;
        Ok(reaped)
    }

    /// Remove this server's cgroups, the tmpfs of its kernel directories
    /// and its registration: a clean stop, once every sandbox has been torn
    /// down. Blocking.
    pub fn release(&self) {
        if let Some(plan) = self.shared.plan.get() {
            crate::cgroup::remove_instance(plan);
            if let Err(e) = crate::workspace::unmount_workspace(&self.shared.sessions_dir) {
                tracing::warn!(error = %e, dir = %self.shared.sessions_dir.display(), "could not unmount the kernel directories");
            }
        }
        if let Some(r) = self.shared.registration.lock().unwrap_or_else(|p| p.into_inner()).take() {
            r.remove();
        }
    }

    fn lifeline(&self) -> Result<&OwnedFd, SandboxError> {
        self.shared.lifeline.get().map(|l| &l.read).ok_or(SandboxError::Unclaimed)
    }

    /// Where the zygote's log lives (`<data>/zygote`, beside the sessions
    /// directory, not in it).
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

    /// Create a kernel's run directory at `dir` (its sockets, connection
    /// file and log), mode 0700: when isolated, a tmpfs of
    /// [`RUN_DIR_BYTES`] owned by the session user, so that what the kernel
    /// writes there is bounded and never reaches the host's disk. Removed
    /// with [`remove_storage`]. Blocking.
    pub fn create_run_dir(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        if self.shared.spec.is_some() {
            crate::workspace::mount_workspace(dir, RUN_DIR_BYTES, crate::jail::host_user_id())?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// Start a zygote for this server's kernels (isolated, with a zygote
    /// library, only).
    pub async fn start_zygote(&self, spec: &ZygoteSpec) -> Result<Zygote, ZygoteError> {
        let library = self.spec().and_then(|s| s.zygote_library.as_ref()).ok_or(ZygoteError::Disabled)?;
        let lifeline = self.lifeline().map_err(|e| ZygoteError::NotReady(e.to_string()))?;
        Zygote::start(spec, library, lifeline).await
    }

    /// Start the kernel described by `req`.
    pub async fn spawn(&self, req: Spawn<'_>) -> Result<Sandbox, SandboxError> {
        let Some(spec) = &self.shared.spec else { return self.spawn_plain(&req) };
        let lifeline = self.lifeline()?;
        let name = req.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let plan = self.shared.plan.get().ok_or(SandboxError::Unclaimed)?;
        let cgroup = Cgroup::create(plan, &name, &spec.limits).map_err(SandboxError::Cgroup)?;
        if req.cpu_weight != crate::CpuWeight::DEFAULT {
            if let Err(e) = cgroup.set_cpu_weight(req.cpu_weight) {
                cgroup.remove();
                return Err(SandboxError::Cgroup(e));
            }
        }
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
        let started = match req.zygote {
            Some(z) => fork_from(z, &jail, req.log).await,
            None => start_helper(spec, &jail, req.dir, req.log, lifeline),
        };
        match started {
            Ok(process) => Ok(Sandbox { process, cgroup: Some(cgroup) }),
            Err(e) => {
                cgroup.remove();
                Err(e)
            }
        }
    }

    /// A plain process in its own process group, for `--sandbox none`.
    fn spawn_plain(&self, req: &Spawn<'_>) -> Result<Sandbox, SandboxError> {
        let p = &req.program;
        let mut cmd = std::process::Command::new(&p.path);
        cmd.env_clear().args(&p.args).envs(p.env.iter().map(|(k, v)| (k, v))).current_dir(&p.cwd);
        let log_err = |source| SandboxError::Log { path: req.log.to_path_buf(), source };
        plumb(&mut cmd, req.log, &[]).map_err(log_err)?;
        let process =
            Owned::spawn(&mut cmd).map_err(|source| SandboxError::Spawn { program: p.path.clone(), source })?;
        Ok(Sandbox { process, cgroup: None })
    }
}

/// Remove what the dead server of `record` left: kill the processes in its
/// cgroups and remove them; unless `shared` (a live server uses the same
/// sessions directory, and has cleaned it up itself), unmount its
/// workspaces and delete its kernels' directories.
fn reap(record: &Record, shared: bool) {
    tracing::info!(pid = record.pid, sessions = %record.sessions_dir.display(), "reaping a dead kiln's leftovers");
    for (_, dir) in &record.cgroups {
        crate::cgroup::remove_tree(dir, record.unified);
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    if shared {
        return;
    }
    crate::workspace::unmount_all_under(&record.sessions_dir);
    if let Ok(entries) = std::fs::read_dir(&record.sessions_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Set `cmd` up as every process kiln starts: stdin from `/dev/null`,
/// stdout and stderr appended to `log`, its own process group (a Ctrl-C at
/// kiln's terminal is not for it; for `--sandbox none`, signals for the
/// kernel reach every subprocess it started), and `pass` placed at
/// descriptors 3, 4, ... (everything else of the server's is close-on-exec).
pub(crate) fn plumb(cmd: &mut std::process::Command, log: &Path, pass: &[&OwnedFd]) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err)).process_group(0);
    if pass.is_empty() {
        return Ok(());
    }
    // Copies above the targets first, so that no dup2 below overwrites
    // another's source; they are close-on-exec, and owned by the closure,
    // which lives until the command is dropped (after the spawn).
    let high = pass
        .iter()
        .map(|fd| Ok(rustix::io::fcntl_dupfd_cloexec(fd, 10)?))
        .collect::<std::io::Result<Vec<OwnedFd>>>()?;
    let sources: Vec<i32> = high.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: `place_descriptors` is, on
    // descriptors that `high` keeps open (the closure owns it), and the
    // closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let _open = &high;
            crate::process::place_descriptors(&sources, 3, |_| true)
        });
    }
    Ok(())
}

/// Start the sandbox helper on `jail`, written to `dir/sandbox.json`, with
/// the server's lifeline at descriptor 3.
fn start_helper(
    spec: &SandboxSpec,
    jail: &Jail,
    dir: &Path,
    log: &Path,
    lifeline: &OwnedFd,
) -> Result<Owned, SandboxError> {
    let spec_file = dir.join("sandbox.json");
    let json = serde_json::to_vec(jail)
        .map_err(|e| SandboxError::Spec { path: spec_file.clone(), source: std::io::Error::other(e) })?;
    std::fs::write(&spec_file, json).map_err(|source| SandboxError::Spec { path: spec_file.clone(), source })?;
    let mut cmd = std::process::Command::new(&spec.helper);
    cmd.env_clear().arg("__sandbox-init").arg(&spec_file).arg("3").current_dir("/");
    plumb(&mut cmd, log, &[lifeline]).map_err(|source| SandboxError::Log { path: log.to_path_buf(), source })?;
    Owned::spawn(&mut cmd).map_err(|source| SandboxError::Spawn { program: spec.helper.clone(), source })
}

/// Fork the kernel described by `jail` from `zygote`: the same sandbox,
/// built by the same steps, around a process that already has the
/// runtime's packages imported.
async fn fork_from(zygote: &Zygote, jail: &Jail, log: &Path) -> Result<Owned, SandboxError> {
    let request = ForkRequest { jail: Cow::Borrowed(jail), log: Cow::Borrowed(log) };
    let mut bytes = serde_json::to_vec(&request).unwrap_or_default();
    let forked = zygote.fork(&bytes).await;
    bytes.fill(0);
    let (fd, pid, exit) = forked?;
    Owned::adopt(fd, pid, exit).map_err(|source| SandboxError::Spawn { program: "the zygote's child".into(), source })
}

/// A running contained process and everything it started.
#[derive(Debug)]
pub struct Sandbox {
    /// The helper (`--zygote off`), init (forked by the zygote), or the
    /// kernel itself (`--sandbox none`).
    process: Owned,
    cgroup: Option<Cgroup>,
}

impl Sandbox {
    /// A receiver that turns `Some` when the main process has ended.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.process.exit_watch()
    }

    /// How the main process ended, if it has.
    pub fn exit(&self) -> Option<Exit> {
        *self.process.exit_watch().borrow()
    }

    /// Deliver SIGINT to the program and everything it started (a Jupyter
    /// interrupt). Isolated: to the helper, which forwards it to init, or
    /// to init, which forwards it to the program's process group.
    pub fn interrupt(&self) {
        match self.cgroup {
            Some(_) => self.process.signal(Signal::SIGINT),
            None => self.process.signal_group(Signal::SIGINT),
        }
    }

    /// A TCP listener on `127.0.0.1:port` inside the sandbox's network
    /// namespace, held by the server: how the egress proxy is reached from
    /// inside without a process of the sandbox's relaying to it (each such
    /// process is another copy of a forked kernel's address space). The
    /// socket belongs to the namespace it was made in, wherever it is held.
    /// It is made on a thread of its own that enters the namespace and then
    /// ends, so no thread of the server ever runs in a sandbox's network.
    /// Bound as the server (host root): nothing inside can take the port
    /// from it, nor share it (`SO_REUSEPORT` needs the same owner).
    pub fn listen_inside(&self, port: u16) -> std::io::Result<std::net::TcpListener> {
        if self.cgroup.is_none() {
            return Err(std::io::Error::other("a kernel without a sandbox has no network of its own"));
        }
        let pidfd = self.process.pidfd()?;
        let made = std::thread::Builder::new().name("kiln-netns".into()).spawn(move || {
            nix::sched::setns(&pidfd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        made.join().map_err(|_| std::io::Error::other("the thread entering the sandbox's network panicked"))?
    }

    /// Kill every process of the sandbox now.
    pub fn kill(&self) {
        match &self.cgroup {
            // init's death ends its pid namespace; the cgroup holds
            // anything that could have escaped it.
            Some(cg) => {
                self.process.signal(Signal::SIGKILL);
                cg.kill();
            }
            None => {
                self.process.signal_group(Signal::SIGKILL);
                self.process.signal(Signal::SIGKILL);
            }
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

    /// Set the sandbox's memory limit to `bytes` (a per-execution limit, or
    /// back to the server's). Without a cgroup there is no limit to set.
    pub fn set_memory_limit(&self, bytes: u64) -> std::io::Result<()> {
        match &self.cgroup {
            Some(cg) => cg.set_memory_limit(bytes),
            None => Ok(()),
        }
    }

    /// Set the sandbox's CPU weight (see [`CpuWeight`]): batch work yields
    /// to interactive sessions this way. Without a cgroup there is nothing
    /// to weigh.
    pub fn set_cpu_weight(&self, weight: crate::CpuWeight) -> std::io::Result<()> {
        match &self.cgroup {
            Some(cg) => cg.set_cpu_weight(weight),
            None => Ok(()),
        }
    }

    /// Whether the sandbox's memory limit was hit.
    pub fn hit_memory_limit(&self) -> bool {
        self.cgroup.as_ref().is_some_and(Cgroup::hit_memory_limit)
    }

    /// How many processes the OOM killer has killed in the sandbox so far;
    /// `None` without a cgroup, or once it is gone (nothing to count).
    pub fn oom_kills(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(Cgroup::oom_kills)
    }

    /// Kill everything and wait until the main process has ended, and its
    /// cgroup is empty and removed.
    pub async fn kill_and_wait(&self) {
        self.kill();
        self.process.ended().await;
        if let Some(cg) = self.cgroup.clone() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
    }
}
