//! The session manager: the operations the API offers on sessions, composed
//! from the parts that do the work. It owns the [`Registry`] of live
//! sessions, the kernel factory ([`Kernels`]), the warm [`Pool`] and one
//! worker per session, which a session's start ([`crate::create`]) makes
//! from those parts; none of those knows of the manager.

use crate::boot::Kernels;
use crate::create::Parts;
use crate::job::{Job, Judged};
use crate::pool::Pools;
use crate::registry::{Found, Registry};
use crate::{Config, NetworkPolicy, Readiness, SessionError};
use chrono::Utc;
use kiln_kernel::ExecLimits;
use kiln_protocol::{ExecEvent, ExecuteData, Language, SessionInfo, ValidFile};
use kiln_runtime::Runtime;
use kiln_store::{SessionRecord, Store};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Handle to the session manager (cheap to clone).
#[derive(Debug, Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: Arc<Config>,
    store: Arc<dyn Store>,
    kernels: Arc<Kernels>,
    pool: Arc<Pools>,
    registry: Arc<Registry>,
    readiness: watch::Sender<Readiness>,
    /// Turns true when the background tasks must stop.
    stopping: watch::Sender<bool>,
    background: Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<crate::Metrics>,
    /// The incarnation new session ids name (see [`crate::node`]).
    identity: std::sync::RwLock<crate::Identity>,
    /// Why this node takes no new sessions now, if it does not.
    refusing: std::sync::RwLock<Option<String>>,
    /// Whether this node is one of a cluster: its sessions then live only
    /// as long as its incarnation holds its lease.
    clustered: std::sync::atomic::AtomicBool,
    /// This incarnation's sessions are being ended because the node was
    /// lost to its peers (lease lapsed, replaced, stopping in a cluster):
    /// their waiting requests answer `session_lost`, and their rows, marked
    /// lost as a whole, are not marked ended one by one.
    fenced: Arc<std::sync::atomic::AtomicBool>,
    admission: Arc<crate::admission::Admission>,
}

/// One execute request, validated.
#[derive(Debug, Clone)]
pub struct Exec {
    /// Reuse this session; a new one when `None`.
    pub session_id: Option<String>,
    /// The cell.
    pub code: String,
    /// Its language: a new session's kernel runs it; an existing session
    /// must run it already.
    pub language: Language,
    /// Files to write first.
    pub files: Vec<ValidFile>,
    /// The request's own time limit.
    pub timeout: Option<Duration>,
    /// The caller's network policy when it differs from the server's.
    pub network: Option<NetworkPolicy>,
    /// The caller's own live-session limit, when it has one.
    pub max_sessions: Option<u64>,
    /// The caller's own limit of executions at once, when it has one.
    pub max_executions_per_key: Option<u64>,
    /// Stream the execution here as it runs: the session first, then each
    /// output as the kernel produces it (see [`ExecEvent`]).
    pub events: Option<mpsc::UnboundedSender<ExecEvent>>,
    /// This execution's memory limit, bytes (at most the server's: a larger
    /// one is the server's).
    pub memory_limit: Option<u64>,
    /// Whose CPU comes first (a batch item's yields to executes).
    pub priority: crate::Priority,
    /// Count the OOM killer's kills in the session while it runs
    /// ([`Judged::oom_kills`]): a batch's runner tells a test killed by the
    /// memory limit from one that killed itself. Two more reads of the
    /// cgroup's files, so not for every execute.
    pub count_oom_kills: bool,
}

impl Manager {
    /// A manager that is not ready until [`Manager::start`] succeeds.
    pub fn new(cfg: Config, store: Arc<dyn Store>) -> Self {
        let cfg = Arc::new(cfg);
        let kernels = Arc::new(Kernels::new(cfg.clone()));
        let pool = Arc::new(Pools::new(cfg.pool_size, kernels.clone()));
        Manager {
            inner: Arc::new(Inner {
                kernels,
                pool,
                registry: Arc::new(Registry::default()),
                readiness: watch::channel(Readiness::Starting).0,
                stopping: watch::channel(false).0,
                background: Mutex::new(Vec::new()),
                metrics: Arc::new(crate::Metrics::new()),
                identity: std::sync::RwLock::new(crate::Identity::new(store.node_id())),
                refusing: std::sync::RwLock::new(None),
                clustered: std::sync::atomic::AtomicBool::new(false),
                fenced: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                store,
                admission: Arc::new(crate::admission::Admission::new(cfg.admission)),
                cfg,
            }),
        }
    }

    /// Clean up what a previous process left behind: kill its kernels,
    /// remove its session directories, end its sessions in the store.
    pub async fn recover(&self) -> Result<(), SessionError> {
        let dir = self.inner.cfg.sessions_dir.clone();
        let kernels = self.inner.kernels.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let reaped = kernels.sandboxes().claim()?;
            if reaped > 0 {
                tracing::info!(servers = reaped, "removed what dead kiln servers left on this host");
            }
            Ok::<_, std::io::Error>(remove_leftovers(&dir))
        })
        .await
        .map_err(|e| SessionError::Broken(e.to_string()))?
        .map_err(|e| SessionError::Broken(format!("could not take the server's place on the host: {e}")))?;
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
        let inner = &self.inner;
        let first = match inner.kernels.set_runtime(runtime).await {
            Ok(()) => {
                let network = inner.kernels.default_network();
                inner.kernels.boot_new(network, Language::Python, crate::Priority::Interactive).await
            }
            Err(e) => Err(e),
        };
        match first {
            Ok(k) => {
                if let Some(pool) = inner.pool.of(Language::Python) {
                    pool.put(k).await;
                }
            }
            Err(e) => {
                self.set_readiness(Readiness::Failed(e.to_string()));
                return Err(e);
            }
        }
        let stopping = inner.stopping.subscribe();
        let filler = crate::pool::fill(
            inner.pool.clone(),
            inner.kernels.clone(),
            inner.registry.clone(),
            inner.cfg.max_sessions,
            stopping.clone(),
        );
        let reaper = reap(inner.registry.clone(), stopping);
        inner.background.lock().unwrap_or_else(|p| p.into_inner()).extend([tokio::spawn(filler), tokio::spawn(reaper)]);
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
        self.execute_judged(key_id, req).await.map(|j| j.data)
    }

    /// Run one execute request for `key_id`, and say how it ended.
    pub async fn execute_judged(&self, key_id: &str, req: Exec) -> Result<Judged, SessionError> {
        match self.readiness() {
            Readiness::Ready => {}
            Readiness::Starting => return Err(SessionError::NotReady),
            Readiness::Failed(m) => return Err(SessionError::Broken(m)),
            Readiness::Stopping => return Err(SessionError::ShuttingDown),
        }
        // A place to run (or a wait in the key's queue) before anything
        // else: a refused request has cost nothing.
        let own = req.max_executions_per_key.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
        let _permit = self.inner.admission.admit(key_id, own).await.map_err(|r| {
            self.inner.metrics.limit("executions_per_key");
            SessionError::RateLimited { running: r.running, queued: r.queued }
        })?;
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
        let (id, jobs) = match req.session_id {
            Some(id) => {
                let jobs = self.speaking(key_id, &id, req.language).await?;
                (id, jobs)
            }
            None => {
                if !self.languages().contains(&req.language) {
                    let runs = self.inner.kernels.languages_text();
                    return Err(SessionError::UnsupportedLanguage { asked: req.language, runs });
                }
                let network = req.network.unwrap_or(self.inner.kernels.default_network());
                // To its end even if the caller goes away meanwhile: a
                // kernel dropped mid-boot would be left running, owned by
                // no one; a session is owned by its worker (and its TTL).
                let (me, key, limit, language) = (self.clone(), key_id.to_string(), req.max_sessions, req.language);
                let priority = req.priority;
                tokio::spawn(async move { me.parts().create(&key, network, language, limit, priority).await })
                    .await
                    .map_err(|e| SessionError::KernelUnavailable(format!("starting the session failed: {e}")))??
            }
        };
        if let Some(events) = &req.events {
            let _ = events.send(ExecEvent::Session { session_id: id.clone() });
        }
        let job = Job {
            code: req.code,
            files: req.files,
            limits,
            reply,
            events: req.events,
            memory_limit: req.memory_limit,
            priority: req.priority,
            count_oom_kills: req.count_oom_kills,
        };
        jobs.send(job).map_err(|_| self.ended(&id))?;
        answer.await.map_err(|_| self.ended(&id))?
    }

    /// The parts a session start borrows (see [`crate::create`]).
    fn parts(&self) -> Parts<'_> {
        let inner = &self.inner;
        Parts {
            cfg: &inner.cfg,
            store: &inner.store,
            kernels: &inner.kernels,
            pool: &inner.pool,
            registry: &inner.registry,
            metrics: &inner.metrics,
            readiness: &inner.readiness,
            identity: &inner.identity,
            refusing: &inner.refusing,
            clustered: &inner.clustered,
            fenced: &inner.fenced,
        }
    }

    /// Why session `id` ended under a request (its worker went away).
    fn ended(&self, id: &str) -> SessionError {
        crate::worker::ended_because(
            *self.inner.readiness.borrow() == Readiness::Stopping,
            self.inner.fenced.load(std::sync::atomic::Ordering::SeqCst),
            id,
            self.inner.store.node_id(),
        )
    }

    /// The caller's live sessions.
    pub async fn list(&self, key_id: &str) -> Result<Vec<SessionInfo>, SessionError> {
        let rows = self.inner.store.live_sessions(key_id, Utc::now()).await?;
        Ok(rows.into_iter().map(info).collect())
    }

    /// One of the caller's live sessions.
    pub async fn get(&self, key_id: &str, id: &str) -> Result<SessionInfo, SessionError> {
        self.lookup(key_id, id).await?;
        match self.inner.store.session(id).await? {
            // Served where the session runs: this node is its owner.
            Some(r) => Ok(SessionInfo { node: Some(self.inner.store.node_id().to_string()), ..info(r) }),
            None => Err(SessionError::NotFound(id.to_string())),
        }
    }

    /// Whether the caller may run `language` in its live session `id`: the
    /// session's error when it cannot (not found, ended, another language).
    pub async fn check_session(&self, key_id: &str, id: &str, language: Language) -> Result<(), SessionError> {
        self.speaking(key_id, id, language).await.map(|_| ())
    }

    /// The queue of the caller's live session `id` if it runs `language`.
    async fn speaking(
        &self,
        key_id: &str,
        id: &str,
        language: Language,
    ) -> Result<mpsc::UnboundedSender<Job>, SessionError> {
        let (_, session, jobs) = self.lookup(key_id, id).await?;
        if session != language {
            return Err(SessionError::LanguageMismatch { id: id.to_string(), session, asked: language });
        }
        Ok(jobs)
    }

    /// Whether the caller's session `id` has written nothing into the
    /// runtime (its copy-on-write layer over it is empty): what a batch
    /// lane must hold before another item uses it (see `lanes`).
    pub(crate) async fn runtime_untouched(&self, key_id: &str, id: &str) -> bool {
        let Ok((work, _, _)) = self.lookup(key_id, id).await else { return false };
        // `work` is `<root>/data/work` (`KernelDirs::under`).
        let Some(root) = work.parent().and_then(|data| data.parent()) else { return false };
        let upper = kiln_kernel::KernelDirs::under(root.to_path_buf()).layer_upper();
        // One directory read on the session's tmpfs.
        std::fs::read_dir(&upper).map(|mut d| d.next().is_none()).unwrap_or(false)
    }

    /// How long a session lives from its start.
    pub(crate) fn ttl(&self) -> Duration {
        self.inner.cfg.ttl
    }

    /// End one of the caller's sessions now, and wait until its kernel,
    /// sandbox and files are gone.
    pub async fn end(&self, key_id: &str, id: &str) -> Result<(), SessionError> {
        self.lookup(key_id, id).await?;
        if let Some(live) = self.inner.registry.remove(id) {
            live.end().await;
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
        let (work, _, _) = self.lookup(key_id, id).await?;
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
        let (work, _, _) = self.lookup(key_id, id).await?;
        let read = tokio::task::spawn_blocking(move || crate::browse::read_file(&work, &path, max)).await;
        Ok(read.map_err(|e| SessionError::KernelUnavailable(e.to_string()))??)
    }

    /// Write files into one of the caller's sessions without running code.
    pub async fn upload(&self, key_id: &str, id: &str, files: Vec<ValidFile>) -> Result<(), SessionError> {
        let (work, _, _) = self.lookup(key_id, id).await?;
        let owner = self.inner.kernels.file_owner();
        let written = tokio::task::spawn_blocking(move || crate::write_files(&work, &files, owner)).await;
        Ok(written.map_err(|e| SessionError::KernelUnavailable(e.to_string()))??)
    }

    /// The caller's live session `id` (its work dir and queue), or the error
    /// that says why there is none: the caller's own ended session is
    /// expired, anything else, another key's included, is not found.
    async fn lookup(
        &self,
        key_id: &str,
        id: &str,
    ) -> Result<(std::path::PathBuf, Language, mpsc::UnboundedSender<Job>), SessionError> {
        match self.inner.registry.find(key_id, id, Utc::now()) {
            Found::Live(work, language, jobs) => return Ok((work, language, jobs)),
            Found::Expired => return Err(SessionError::Expired(id.to_string())),
            Found::NotYours => return Err(SessionError::NotFound(id.to_string())),
            Found::Unknown => {}
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
        let (running, queued) = self.inner.admission.load();
        m.executions_running.set(i64::try_from(running).unwrap_or(i64::MAX));
        m.executions_queued.set(i64::try_from(queued).unwrap_or(i64::MAX));
        for (language, ready) in self.inner.pool.levels().await {
            let pool = crate::metrics::PoolOf { language: language.as_str().to_string() };
            m.pool_ready_by_language.get_or_create(&pool).set(i64::try_from(ready).unwrap_or(i64::MAX));
        }
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
        self.inner.registry.live()
    }

    /// The live-session limit of this server (`--max-sessions`).
    pub fn max_sessions(&self) -> usize {
        self.inner.cfg.max_sessions
    }

    /// How many executions a key may run at once (`--max-executions-per-key`).
    pub fn executions_per_key(&self) -> usize {
        self.inner.cfg.admission.per_key
    }

    /// The live-session limit of one key (`--max-sessions-per-key`).
    pub fn max_sessions_per_key(&self) -> usize {
        self.inner.cfg.max_sessions_per_key
    }

    /// The languages this server runs, the default (Python) first; empty
    /// until the runtime is ready.
    pub fn languages(&self) -> Vec<Language> {
        self.inner.kernels.languages().to_vec()
    }

    /// The largest time limit a request may ask for.
    pub fn max_exec_timeout(&self) -> Duration {
        self.inner.cfg.max_exec_timeout
    }

    /// The kernel implementation sessions run.
    pub(crate) fn kernel_kind(&self) -> kiln_kernel::KernelKind {
        self.inner.cfg.kernel
    }

    /// The time limit of an execution that sets none.
    pub fn exec_timeout(&self) -> Duration {
        self.inner.cfg.exec_timeout.min(self.inner.cfg.max_exec_timeout)
    }

    /// The most items one batch may hold (`--max-batch-items`).
    pub fn max_batch_items(&self) -> usize {
        self.inner.cfg.max_batch_items
    }

    /// Note a batch request running (its pool refills yield the CPU too)
    /// until the guard is dropped.
    pub(crate) fn pool_batch_running(&self) -> crate::pool::BatchRunning {
        self.inner.pool.batch_running()
    }

    /// Bytes of output kept per execution (`--max-output-bytes`).
    pub fn max_output_bytes(&self) -> usize {
        self.inner.cfg.max_output_bytes
    }

    /// The server's network policy (`--network`): the ceiling of every
    /// key's own.
    pub fn network(&self) -> NetworkPolicy {
        self.inner.cfg.network
    }

    /// The store this manager records sessions in (the admin endpoints
    /// manage keys in it).
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// Kernels ready in the warm pool, and the pool's current target.
    pub async fn pool_level(&self) -> (usize, usize) {
        (self.inner.pool.len().await, self.inner.pool.target())
    }

    /// The incarnation new sessions belong to.
    pub fn identity(&self) -> crate::Identity {
        self.inner.identity.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serve as `identity`, one node of a cluster: new sessions belong to
    /// this incarnation (called again with a new one after a lost lease).
    pub fn join_cluster(&self, identity: crate::Identity) {
        *self.inner.identity.write().unwrap_or_else(|p| p.into_inner()) = identity;
        self.inner.clustered.store(true, std::sync::atomic::Ordering::Relaxed);
        // A new incarnation's sessions are not the lost ones.
        self.inner.fenced.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// End every session because this node was lost to its peers (its
    /// lease lapsed, or another process took its node id): requests still
    /// waiting for them answer `session_lost`, as the peers do, never
    /// `session_expired`. Their rows are the caller's to mark lost
    /// ([`kiln_store::Store::end_all_open`]); ending them here does not
    /// mark them merely ended, which would read as expired.
    pub async fn lose_all(&self) -> usize {
        self.inner.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
        self.end_all().await
    }

    /// Take no new sessions, saying why (`Some`), or take them again
    /// (`None`). Live sessions are not touched.
    pub fn refuse_new_sessions(&self, why: Option<String>) {
        *self.inner.refusing.write().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Why this node takes no new sessions now, if it does not.
    pub fn refusing(&self) -> Option<String> {
        self.inner.refusing.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// End every live session now and wait for their teardown (the node
    /// lost its lease: its peers already answer `session_lost` for them).
    /// Returns how many.
    pub async fn end_all(&self) -> usize {
        let all = self.inner.registry.remove_all();
        let n = all.len();
        for l in all {
            l.end().await;
        }
        n
    }

    /// Stop every session and pooled kernel, and wait for their teardown.
    pub async fn shutdown(&self) {
        self.set_readiness(Readiness::Stopping);
        self.inner.stopping.send_replace(true);
        // In a cluster the sessions go with this node: peers answer
        // `session_lost` for them once its lease ends. Marked lost before
        // they end, so that no row reads as ended by its caller or its
        // time (a database that does not answer now leaves them open, and
        // the next start marks them). Not when fenced already: its rows
        // were marked then, and a process that took its node id since
        // owns the open ones.
        let clustered = self.inner.clustered.load(std::sync::atomic::Ordering::Relaxed);
        if clustered && !self.inner.fenced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.inner.store.end_all_open(Utc::now()).await {
                tracing::warn!(error = %e, "could not mark this node's sessions lost; its next start will");
            }
        }
        let all = self.inner.registry.remove_all();
        for l in &all {
            let _ = l.stop.send(true);
        }
        for l in all {
            l.end().await;
        }
        // The filler may be booting a kernel: let it finish and discard it,
        // so no process outlives the server.
        self.inner.pool.wake();
        let background: Vec<_> = self.inner.background.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for task in background {
            let _ = task.await;
        }
        // Each session's egress socket closed with its sandbox.
        self.inner.pool.drain().await;
        self.inner.kernels.release().await;
    }
}

fn info(r: SessionRecord) -> SessionInfo {
    SessionInfo {
        id: r.id,
        started_at: r.started_at,
        execute_count: r.execute_count,
        last_execute_at: r.last_execute_at,
        expires_at: r.expires_at,
        node: None,
    }
}

/// End sessions whose lifetime is over, until `stopping`.
async fn reap(registry: Arc<Registry>, mut stopping: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        for l in registry.remove_expired(Utc::now()) {
            let _ = l.stop.send(true);
        }
    }
}

/// Remove every session directory under `dir` (their processes, cgroups
/// and workspaces are gone: see [`kiln_sandbox::Sandboxes::claim`]).
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
