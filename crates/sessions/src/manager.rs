//! The registry of live sessions and the operations the API offers on them.

use crate::pool::Pool;
use crate::worker::{self, Job};
use crate::{Config, NetworkPolicy, SessionError};
use chrono::{DateTime, Utc};
use kiln_kernel::ExecLimits;
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
    pub(crate) runtime: OnceLock<Runtime>,
    readiness: watch::Sender<Readiness>,
    registry: Mutex<Registry>,
    pub(crate) pool: Pool,
    background: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) egress: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) metrics: Arc<crate::Metrics>,
    /// Where kernels run: the server's sandboxes.
    pub(crate) sandboxes: kiln_sandbox::Sandboxes,
    /// The fork server kernels are started from, once started.
    pub(crate) zygote: tokio::sync::Mutex<crate::boot::ZygoteSlot>,
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
    work: std::path::PathBuf,
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
    /// The caller's network policy when it differs from the server's.
    pub network: Option<NetworkPolicy>,
    /// The caller's own live-session limit, when it has one.
    pub max_sessions: Option<u64>,
}

impl Manager {
    /// A manager that is not ready until [`Manager::start`] succeeds.
    pub fn new(cfg: Config, store: Arc<dyn Store>) -> Self {
        let (readiness, _) = watch::channel(Readiness::Starting);
        let pool = Pool::new(cfg.pool_size);
        let sandboxes = kiln_sandbox::Sandboxes::new(cfg.sandbox.clone(), cfg.sessions_dir.clone());
        Manager {
            inner: Arc::new(Inner {
                cfg,
                sandboxes,
                store,
                runtime: OnceLock::new(),
                readiness,
                registry: Mutex::new(Registry::default()),
                pool,
                background: Mutex::new(Vec::new()),
                egress: Mutex::new(Vec::new()),
                metrics: Arc::new(crate::Metrics::new()),
                zygote: tokio::sync::Mutex::new(crate::boot::ZygoteSlot::default()),
            }),
        }
    }

    /// Clean up what a previous process left behind: kill its kernels,
    /// remove its session directories, end its sessions in the store.
    pub async fn recover(&self) -> Result<(), SessionError> {
        let dir = self.inner.cfg.sessions_dir.clone();
        let sandboxes = self.inner.sandboxes.clone();
        let removed = tokio::task::spawn_blocking(move || {
            sandboxes.recover();
            remove_leftovers(&dir)
        })
        .await
        .unwrap_or(0);
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
        if let Some(owner) = self.inner.sandboxes.file_owner() {
            self.inner.start_egress(&runtime).await?;
            // The session user must own the shared runtime for its
            // copy-on-write layer to accept writes (the runtime itself is
            // never written: it is read-only or overlaid in every sandbox).
            let root = runtime.root.clone();
            tokio::task::spawn_blocking(move || crate::boot::own_runtime(&root, owner))
                .await
                .map_err(|e| SessionError::Broken(e.to_string()))?
                .map_err(|e| SessionError::Broken(format!("could not prepare the runtime for sandboxes: {e}")))?;
        }
        let _ = self.inner.runtime.set(runtime);
        match self.inner.boot_new(self.inner.default_network()).await {
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
                let network = req.network.unwrap_or(self.inner.default_network());
                let (id, jobs) = self.create(key_id, network, req.max_sessions).await?;
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

    /// One of the caller's live sessions.
    pub async fn get(&self, key_id: &str, id: &str) -> Result<SessionInfo, SessionError> {
        self.work_dir(key_id, id).await?;
        match self.inner.store.session(id).await? {
            Some(r) => Ok(SessionInfo {
                id: r.id,
                started_at: r.started_at,
                execute_count: r.execute_count,
                last_execute_at: r.last_execute_at,
                expires_at: r.expires_at,
            }),
            None => Err(SessionError::NotFound(id.to_string())),
        }
    }

    /// End one of the caller's sessions now, and wait until its kernel,
    /// sandbox and files are gone.
    pub async fn end(&self, key_id: &str, id: &str) -> Result<(), SessionError> {
        self.work_dir(key_id, id).await?;
        let live = self.inner.registry().live.remove(id);
        if let Some(l) = live {
            let _ = l.stop.send(true);
            let _ = l.worker.await;
        }
        Ok(())
    }

    /// List a directory of one of the caller's sessions.
    pub async fn list_files(
        &self,
        key_id: &str,
        id: &str,
        path: Vec<String>,
    ) -> Result<kiln_protocol::FileList, SessionError> {
        let work = self.work_dir(key_id, id).await?;
        let listed = tokio::task::spawn_blocking(move || crate::browse::list_dir(&work, &path)).await;
        Ok(listed.map_err(|e| SessionError::KernelUnavailable(e.to_string()))??)
    }

    /// Read a file of one of the caller's sessions (at most `max` bytes).
    pub async fn read_file(
        &self,
        key_id: &str,
        id: &str,
        path: Vec<String>,
        max: u64,
    ) -> Result<Vec<u8>, SessionError> {
        let work = self.work_dir(key_id, id).await?;
        let read = tokio::task::spawn_blocking(move || crate::browse::read_file(&work, &path, max)).await;
        Ok(read.map_err(|e| SessionError::KernelUnavailable(e.to_string()))??)
    }

    /// Write files into one of the caller's sessions without running code.
    pub async fn upload(&self, key_id: &str, id: &str, files: Vec<ValidFile>) -> Result<(), SessionError> {
        let work = self.work_dir(key_id, id).await?;
        let owner = self.inner.file_owner();
        let written = tokio::task::spawn_blocking(move || crate::write_files(&work, &files, owner)).await;
        Ok(written.map_err(|e| SessionError::KernelUnavailable(e.to_string()))??)
    }

    /// The work dir of the caller's live session `id`.
    async fn work_dir(&self, key_id: &str, id: &str) -> Result<std::path::PathBuf, SessionError> {
        Ok(self.lookup(key_id, id).await?.0)
    }

    /// The caller's live session `id` (its work dir and queue), or the error
    /// that says why there is none: the caller's own ended session is
    /// expired, anything else, another key's included, is not found.
    async fn lookup(
        &self,
        key_id: &str,
        id: &str,
    ) -> Result<(std::path::PathBuf, mpsc::UnboundedSender<Job>), SessionError> {
        {
            let reg = self.inner.registry();
            match reg.live.get(id) {
                Some(l) if l.key_id != key_id => return Err(SessionError::NotFound(id.to_string())),
                Some(l) if l.expires_at > Utc::now() => return Ok((l.work.clone(), l.jobs.clone())),
                Some(_) => return Err(SessionError::Expired(id.to_string())),
                None => {}
            }
        }
        match self.inner.store.session(id).await? {
            Some(r) if r.key_id == key_id => Err(SessionError::Expired(id.to_string())),
            _ => Err(SessionError::NotFound(id.to_string())),
        }
    }

    /// What `key_id` has used (all its sessions, across restarts).
    pub async fn usage(&self, key_id: &str) -> Result<kiln_store::Usage, SessionError> {
        Ok(self.inner.store.usage(key_id).await?)
    }

    /// The metrics, with gauges brought up to date, as Prometheus text.
    pub async fn render_metrics(&self) -> String {
        let m = &self.inner.metrics;
        m.sessions_live.set(i64::try_from(self.live_count()).unwrap_or(i64::MAX));
        m.pool_ready.set(i64::try_from(self.inner.pool.len().await).unwrap_or(i64::MAX));
        m.pool_target.set(i64::try_from(self.inner.pool.target()).unwrap_or(i64::MAX));
        m.render()
    }

    /// The metrics registry (the HTTP layer counts errors in it).
    pub fn metrics(&self) -> Arc<crate::Metrics> {
        self.inner.metrics.clone()
    }

    /// Whether another session could start now.
    pub fn has_capacity(&self) -> bool {
        self.live_count() < self.inner.cfg.max_sessions
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
        for proxy in self.inner.egress.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            proxy.abort();
        }
    }

    async fn enqueue(&self, key_id: &str, id: &str, job: Job) -> Result<(), SessionError> {
        let (_, jobs) = self.lookup(key_id, id).await?;
        jobs.send(job).map_err(|_| SessionError::Expired(id.to_string()))
    }

    async fn create(
        &self,
        key_id: &str,
        network: NetworkPolicy,
        key_limit: Option<u64>,
    ) -> Result<(String, mpsc::UnboundedSender<Job>), SessionError> {
        let cfg = &self.inner.cfg;
        {
            let mut reg = self.inner.registry();
            let creating: usize = reg.creating.values().sum();
            if reg.live.len() + creating >= cfg.max_sessions {
                self.inner.metrics.limit("sessions");
                return Err(SessionError::NoCapacity(cfg.max_sessions));
            }
            let mine = reg.live.values().filter(|l| l.key_id == key_id).count()
                + reg.creating.get(key_id).copied().unwrap_or(0);
            let limit = key_limit.map_or(cfg.max_sessions_per_key, |l| (l as usize).min(cfg.max_sessions_per_key));
            if mine >= limit {
                self.inner.metrics.limit("sessions_per_key");
                return Err(SessionError::TooManySessions(limit));
            }
            *reg.creating.entry(key_id.to_string()).or_default() += 1;
        }
        let created = self.create_reserved(key_id, network).await;
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

    async fn create_reserved(&self, key_id: &str, network: NetworkPolicy) -> Result<(String, Live), SessionError> {
        // Pooled kernels have the server's policy; another one boots its own.
        let pooled = if network == self.inner.default_network() { self.inner.pool.take().await } else { None };
        let kernel = match pooled {
            Some(k) => k,
            None => self.inner.boot_new(network).await?,
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
        let work = kernel.dirs().work.clone();
        let (jobs, queue) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let worker = tokio::spawn(worker::run(self.inner.clone(), id.clone(), kernel, network, queue, stopped));
        self.inner.metrics.sessions_started.inc();
        tracing::info!(session = %id, key = %key_id, "session started");
        Ok((id, Live { key_id: key_id.to_string(), work, expires_at: record.expires_at, jobs, stop, worker }))
    }
}

impl Inner {
    pub(crate) fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live sessions now.
    pub(crate) fn live_sessions(&self) -> usize {
        self.registry().live.len()
    }

    /// The server's network policy.
    pub(crate) fn default_network(&self) -> NetworkPolicy {
        if self.cfg.sandbox.is_some() {
            self.cfg.network
        } else {
            NetworkPolicy::None
        }
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
        if let Err(e) = kiln_sandbox::remove_storage(&dir.join("data")) {
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

/// Remove every session directory under `dir` (their processes, cgroups
/// and workspaces are gone: see [`kiln_sandbox::Sandboxes::recover`]).
fn remove_leftovers(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            n += 1;
        }
    }
    n
}
