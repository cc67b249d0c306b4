//! The registry of live sessions and the operations the API offers on them.

use crate::pool::Pool;
use crate::worker::{self, Job};
use crate::{Config, Network, SandboxConfig, SessionError};
use chrono::{DateTime, Utc};
use kiln_kernel::{ExecLimits, Kernel, KernelDirs, KernelSpec, SandboxSpec, INSIDE_HOME};
use kiln_protocol::{ExecuteData, SessionInfo, ValidFile};
use kiln_runtime::Runtime;
use kiln_store::{SessionRecord, Store};
use rand::distr::{Alphanumeric, SampleString};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Whether the manager can serve sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The runtime is being provisioned or the first kernel is booting.
    Starting,
    /// Sessions can be served.
    Ready,
    /// Provisioning or the first boot failed; the message says why.
    Failed(String),
    /// Shutting down.
    Stopping,
}

/// Handle to the session manager (cheap to clone).
#[derive(Debug, Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cfg: Config,
    pub(crate) store: Arc<dyn Store>,
    runtime: OnceLock<Runtime>,
    readiness: watch::Sender<Readiness>,
    registry: Mutex<Registry>,
    pub(crate) pool: Pool,
    background: Mutex<Vec<JoinHandle<()>>>,
    egress: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Registry {
    live: HashMap<String, Live>,
    /// Sessions being created (counted against limits before they exist).
    creating: HashMap<String, usize>,
}

#[derive(Debug)]
struct Live {
    key_id: String,
    expires_at: DateTime<Utc>,
    jobs: mpsc::UnboundedSender<Job>,
    stop: watch::Sender<bool>,
    worker: JoinHandle<()>,
}

/// One execute request, validated.
#[derive(Debug, Clone)]
pub struct Exec {
    /// Reuse this session; a new one when `None`.
    pub session_id: Option<String>,
    /// The cell.
    pub code: String,
    /// Files to write first.
    pub files: Vec<ValidFile>,
    /// The request's own time limit.
    pub timeout: Option<Duration>,
}

impl Manager {
    /// A manager that is not ready until [`Manager::start`] succeeds.
    pub fn new(cfg: Config, store: Arc<dyn Store>) -> Self {
        let (readiness, _) = watch::channel(Readiness::Starting);
        let pool = Pool::new(cfg.pool_size);
        Manager {
            inner: Arc::new(Inner {
                cfg,
                store,
                runtime: OnceLock::new(),
                readiness,
                registry: Mutex::new(Registry::default()),
                pool,
                background: Mutex::new(Vec::new()),
                egress: Mutex::new(None),
            }),
        }
    }

    /// Clean up what a previous process left behind: kill its kernels,
    /// remove its session directories, end its sessions in the store.
    pub async fn recover(&self) -> Result<(), SessionError> {
        let dir = self.inner.cfg.sessions_dir.clone();
        let removed = tokio::task::spawn_blocking(move || remove_leftovers(&dir)).await.unwrap_or(0);
        let ended = self.inner.store.end_all_open(Utc::now()).await?;
        if removed > 0 || ended > 0 {
            tracing::info!(removed_dirs = removed, ended_sessions = ended, "cleaned up after a previous run");
        }
        Ok(())
    }

    /// Take the runtime into use: boot the first kernel (proving that
    /// sessions can really be served), then keep the pool filled and expire
    /// sessions in the background.
    pub async fn start(&self, runtime: Runtime) -> Result<(), SessionError> {
        if let Some(sb) = &self.inner.cfg.sandbox {
            self.start_egress(sb, &runtime).await?;
            // The session user must own the shared runtime for its
            // copy-on-write layer to accept writes (the runtime itself is
            // never written: it is read-only or overlaid in every sandbox).
            let (root, owner) = (runtime.root.clone(), kiln_sandbox::jail::host_user_id());
            tokio::task::spawn_blocking(move || own_runtime(&root, owner))
                .await
                .map_err(|e| SessionError::Broken(e.to_string()))?
                .map_err(|e| SessionError::Broken(format!("could not prepare the runtime for sandboxes: {e}")))?;
        }
        let _ = self.inner.runtime.set(runtime);
        match self.inner.boot_new().await {
            Ok(k) => self.inner.pool.put(k).await,
            Err(e) => {
                self.set_readiness(Readiness::Failed(e.to_string()));
                return Err(e);
            }
        }
        let filler = tokio::spawn(crate::pool::fill(self.inner.clone()));
        let reaper = tokio::spawn(reap(self.inner.clone()));
        self.inner.background.lock().unwrap_or_else(|p| p.into_inner()).extend([filler, reaper]);
        self.set_readiness(Readiness::Ready);
        Ok(())
    }

    /// Serve the egress proxy for the configured network policy.
    async fn start_egress(&self, sb: &SandboxConfig, runtime: &Runtime) -> Result<(), SessionError> {
        let (Some(socket), policy) = (sb.egress_socket.clone(), sb.network) else { return Ok(()) };
        let policy = match policy {
            Network::None => return Ok(()),
            Network::Full => kiln_sandbox::egress::Policy::Full,
            Network::Pypi => {
                let rt = runtime.clone();
                let hosts = tokio::task::spawn_blocking(move || rt.index_hosts())
                    .await
                    .map_err(|e| SessionError::Broken(e.to_string()))?
                    .map_err(|e| SessionError::Broken(format!("could not read pip's index configuration: {e}")))?;
                kiln_sandbox::egress::Policy::Hosts(hosts)
            }
        };
        tracing::info!(policy = %policy.describe(), "session network policy");
        let task = tokio::spawn(async move {
            if let Err(e) = kiln_sandbox::egress::serve(&socket, policy).await {
                tracing::error!(error = %e, "the egress proxy stopped");
            }
        });
        *self.inner.egress.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    /// Report a provisioning failure (the server stays up to say so).
    pub fn set_readiness(&self, r: Readiness) {
        self.inner.readiness.send_replace(r);
    }

    /// Current readiness.
    pub fn readiness(&self) -> Readiness {
        self.inner.readiness.borrow().clone()
    }

    /// Run one execute request for `key_id`.
    pub async fn execute(&self, key_id: &str, req: Exec) -> Result<ExecuteData, SessionError> {
        match self.readiness() {
            Readiness::Ready => {}
            Readiness::Starting => return Err(SessionError::NotReady),
            Readiness::Failed(m) => return Err(SessionError::Broken(m)),
            Readiness::Stopping => return Err(SessionError::ShuttingDown),
        }
        let cfg = &self.inner.cfg;
        let max = cfg.max_exec_timeout;
        let timeout = match req.timeout {
            Some(t) if t.is_zero() || t > max => return Err(SessionError::BadTimeout { max: max.as_secs() }),
            Some(t) => t,
            None => cfg.exec_timeout.min(max),
        };
        let limits =
            ExecLimits { timeout, interrupt_grace: cfg.interrupt_grace, max_output_bytes: cfg.max_output_bytes };
        let (reply, answer) = oneshot::channel();
        let job = Job { code: req.code, files: req.files, limits, reply };
        let id = match req.session_id {
            Some(id) => {
                self.enqueue(key_id, &id, job).await?;
                id
            }
            None => {
                let (id, jobs) = self.create(key_id).await?;
                jobs.send(job).map_err(|_| SessionError::Expired(id.clone()))?;
                id
            }
        };
        answer.await.map_err(|_| SessionError::Expired(id))?
    }

    /// The caller's live sessions.
    pub async fn list(&self, key_id: &str) -> Result<Vec<SessionInfo>, SessionError> {
        let rows = self.inner.store.live_sessions(key_id, Utc::now()).await?;
        Ok(rows
            .into_iter()
            .map(|r| SessionInfo {
                id: r.id,
                started_at: r.started_at,
                execute_count: r.execute_count,
                last_execute_at: r.last_execute_at,
                expires_at: r.expires_at,
            })
            .collect())
    }

    /// Number of live sessions.
    pub fn live_count(&self) -> usize {
        self.inner.registry().live.len()
    }

    /// Stop every session and pooled kernel, and wait for their teardown.
    pub async fn shutdown(&self) {
        self.set_readiness(Readiness::Stopping);
        let all: Vec<Live> = self.inner.registry().live.drain().map(|(_, l)| l).collect();
        for l in &all {
            let _ = l.stop.send(true);
        }
        for l in all {
            let _ = l.worker.await;
        }
        // The filler may be booting a kernel: let it finish and discard it,
        // so no process outlives the server.
        self.inner.pool.wake();
        let background: Vec<_> = self.inner.background.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for task in background {
            let _ = task.await;
        }
        self.inner.pool.drain().await;
        if let Some(egress) = self.inner.egress.lock().unwrap_or_else(|p| p.into_inner()).take() {
            egress.abort();
        }
    }

    async fn enqueue(&self, key_id: &str, id: &str, job: Job) -> Result<(), SessionError> {
        {
            let reg = self.inner.registry();
            match reg.live.get(id) {
                Some(l) if l.key_id != key_id => return Err(SessionError::NotFound(id.to_string())),
                Some(l) if l.expires_at > Utc::now() => {
                    return l.jobs.send(job).map_err(|_| SessionError::Expired(id.to_string()));
                }
                Some(_) => return Err(SessionError::Expired(id.to_string())),
                None => {}
            }
        }
        // Not live: the caller's own ended session, or nothing it may know of.
        match self.inner.store.session(id).await? {
            Some(r) if r.key_id == key_id => Err(SessionError::Expired(id.to_string())),
            _ => Err(SessionError::NotFound(id.to_string())),
        }
    }

    async fn create(&self, key_id: &str) -> Result<(String, mpsc::UnboundedSender<Job>), SessionError> {
        let cfg = &self.inner.cfg;
        {
            let mut reg = self.inner.registry();
            let creating: usize = reg.creating.values().sum();
            if reg.live.len() + creating >= cfg.max_sessions {
                return Err(SessionError::NoCapacity(cfg.max_sessions));
            }
            let mine = reg.live.values().filter(|l| l.key_id == key_id).count()
                + reg.creating.get(key_id).copied().unwrap_or(0);
            if mine >= cfg.max_sessions_per_key {
                return Err(SessionError::TooManySessions(cfg.max_sessions_per_key));
            }
            *reg.creating.entry(key_id.to_string()).or_default() += 1;
        }
        let created = self.create_reserved(key_id).await;
        let mut reg = self.inner.registry();
        if let Some(n) = reg.creating.get_mut(key_id) {
            *n -= 1;
            if *n == 0 {
                reg.creating.remove(key_id);
            }
        }
        let (id, live) = created?;
        let jobs = live.jobs.clone();
        reg.live.insert(id.clone(), live);
        Ok((id, jobs))
    }

    async fn create_reserved(&self, key_id: &str) -> Result<(String, Live), SessionError> {
        let kernel = match self.inner.pool.take().await {
            Some(k) => k,
            None => self.inner.boot_new().await?,
        };
        let id = format!("ses_{}", Alphanumeric.sample_string(&mut rand::rng(), 24));
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(self.inner.cfg.ttl).unwrap_or(chrono::Duration::hours(1));
        let record = SessionRecord {
            id: id.clone(),
            key_id: key_id.to_string(),
            started_at: now,
            expires_at: now + ttl,
            execute_count: 0,
            last_execute_at: None,
            ended_at: None,
        };
        if let Err(e) = self.inner.store.insert_session(&record).await {
            kernel.kill().await;
            destroy_dir(kernel.dirs().root.clone()).await;
            return Err(e.into());
        }
        let (jobs, queue) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let worker = tokio::spawn(worker::run(self.inner.clone(), id.clone(), kernel, queue, stopped));
        tracing::info!(session = %id, key = %key_id, "session started");
        Ok((id, Live { key_id: key_id.to_string(), expires_at: record.expires_at, jobs, stop, worker }))
    }
}

impl Inner {
    pub(crate) fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Boot a kernel in a new session directory: its storage (a quota'd
    /// tmpfs when sandboxed) with a work dir and a seeded home.
    pub(crate) async fn boot_new(&self) -> Result<Kernel, SessionError> {
        let runtime = self.runtime.get().ok_or(SessionError::NotReady)?.clone();
        let name = format!("k_{}", Alphanumeric.sample_string(&mut rand::rng(), 16));
        let dirs = KernelDirs::under(self.cfg.sessions_dir.join(name));
        let sandbox = self.cfg.sandbox.clone();
        let prepared = {
            let dirs = dirs.clone();
            tokio::task::spawn_blocking(move || prepare_dirs(&dirs, sandbox.as_ref(), &runtime)).await
        };
        match prepared {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                destroy_dir(dirs.root.clone()).await;
                return Err(SessionError::KernelUnavailable(format!("preparing {}: {e}", dirs.root.display())));
            }
            Err(e) => return Err(SessionError::KernelUnavailable(e.to_string())),
        }
        let booted = self.boot_in(dirs.clone()).await;
        if booted.is_err() {
            destroy_dir(dirs.root).await;
        }
        booted
    }

    /// Boot a kernel in prepared `dirs`.
    pub(crate) async fn boot_in(&self, dirs: KernelDirs) -> Result<Kernel, SessionError> {
        let runtime = self.runtime.get().ok_or(SessionError::NotReady)?;
        let (home, sandbox) = match &self.cfg.sandbox {
            None => (dirs.home.clone(), None),
            Some(sb) => {
                // The runtime is shown copy-on-write (pip installs land in
                // the session's layer); its base interpreter read-only.
                let read_only: Vec<std::path::PathBuf> = runtime.base_prefix().into_iter().collect();
                let spec = SandboxSpec {
                    helper: sb.helper.clone(),
                    read_only,
                    limits: kiln_sandbox::CgroupLimits { memory_bytes: sb.memory_bytes, pids: sb.pids, cpus: sb.cpus },
                    tmp_bytes: sb.tmp_bytes,
                    nofile: sb.nofile,
                    owner: kiln_sandbox::jail::host_user_id(),
                    overlay: Some(runtime.root.clone()),
                    egress_socket: sb.egress_socket.clone(),
                };
                (std::path::PathBuf::from(INSIDE_HOME), Some(spec))
            }
        };
        let mut env = runtime.kernel_env(&home);
        match self.cfg.sandbox.as_ref().map(|s| s.network) {
            Some(Network::None) => {
                // Fail fast and say why, instead of retrying for a minute.
                env.push(("PIP_RETRIES".into(), "0".into()));
                env.push(("PIP_TIMEOUT".into(), "5".into()));
                env.push(("KILN_NETWORK".into(), "none".into()));
            }
            Some(policy) => {
                let proxy = format!("http://127.0.0.1:{}", kiln_sandbox::egress::PROXY_PORT);
                for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
                    env.push((var.into(), proxy.clone().into()));
                }
                for var in ["NO_PROXY", "no_proxy"] {
                    env.push((var.into(), "localhost,127.0.0.1,::1".into()));
                }
                let name = if policy == Network::Full { "full" } else { "pypi" };
                env.push(("KILN_NETWORK".into(), name.into()));
            }
            None => {}
        }
        let spec = KernelSpec { python: runtime.python(), env, boot_timeout: self.cfg.boot_timeout, sandbox };
        Kernel::start(&spec, dirs).await.map_err(|e| {
            tracing::error!(error = %e, "kernel boot failed");
            SessionError::KernelUnavailable(e.to_string())
        })
    }

    /// The host uid that must own files written for sessions.
    pub(crate) fn file_owner(&self) -> Option<u32> {
        self.cfg.sandbox.as_ref().map(|_| kiln_sandbox::jail::host_user_id())
    }

    /// Forget a session whose worker ended on its own.
    pub(crate) fn forget(&self, id: &str) {
        self.registry().live.remove(id);
    }
}

/// End sessions whose lifetime is over.
async fn reap(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if *inner.readiness.borrow() == Readiness::Stopping {
            return;
        }
        let now = Utc::now();
        let expired: Vec<Live> = {
            let mut reg = inner.registry();
            let ids: Vec<String> =
                reg.live.iter().filter(|(_, l)| l.expires_at <= now).map(|(id, _)| id.clone()).collect();
            ids.iter().filter_map(|id| reg.live.remove(id)).collect()
        };
        for l in expired {
            let _ = l.stop.send(true);
        }
    }
}

/// Remove a kernel's directory, unmounting its workspace first.
pub(crate) async fn destroy_dir(dir: std::path::PathBuf) {
    let result = tokio::task::spawn_blocking(move || {
        if let Err(e) = kiln_sandbox::workspace::unmount_workspace(&dir.join("data")) {
            return Err((dir, e));
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((dir, e)),
            _ => Ok(()),
        }
    })
    .await;
    if let Ok(Err((dir, e))) = result {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a session directory");
    }
}

/// Kill recorded kernels under `dir`, remove leftover cgroups and
/// workspaces, and remove every session directory.
fn remove_leftovers(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let entries: Vec<_> = entries.flatten().collect();
    for entry in &entries {
        let _ = kiln_sandbox::kill_recorded(&entry.path().join("pid"));
    }
    kiln_sandbox::cgroup::remove_all(&kiln_sandbox::cgroup::instance_name(dir));
    kiln_sandbox::workspace::unmount_all_under(dir);
    let mut n = 0;
    for entry in entries {
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Create a kernel's directories: root (server only), storage, work, home.
fn prepare_dirs(dirs: &KernelDirs, sandbox: Option<&SandboxConfig>, runtime: &Runtime) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dirs.root)?;
    std::fs::create_dir_all(&dirs.data)?;
    if let Some(sb) = sandbox {
        kiln_sandbox::workspace::mount_workspace(&dirs.data, sb.disk_bytes, kiln_sandbox::jail::host_user_id())?;
    }
    std::fs::create_dir_all(&dirs.work)?;
    std::fs::create_dir_all(&dirs.home)?;
    if sandbox.is_some() {
        std::fs::create_dir_all(dirs.layer_upper())?;
        std::fs::create_dir_all(dirs.layer_work())?;
    }
    runtime.seed_home(&dirs.home)?;
    if sandbox.is_some() {
        let owner = kiln_sandbox::jail::host_user_id();
        chown_tree(&dirs.data, owner)?;
    }
    Ok(())
}

fn chown_tree(dir: &std::path::Path, owner: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(owner), Some(owner))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

/// Give the runtime tree to `owner` unless it already has it.
fn own_runtime(root: &std::path::Path, owner: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let marker = root.join("kiln-runtime.json");
    if std::fs::symlink_metadata(&marker)?.uid() == owner {
        return Ok(());
    }
    // The marker last: a crash in between makes the next start redo it.
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path != marker {
            chown_tree(&path, owner)?;
        }
    }
    std::os::unix::fs::lchown(root, Some(owner), Some(owner))?;
    std::os::unix::fs::lchown(&marker, Some(owner), Some(owner))
}
