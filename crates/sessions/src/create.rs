//! Starting a session: a place under the server's and the key's limits, a
//! kernel (a pooled one when the session's network policy is the pool's,
//! else a fresh boot), a record in the store (within the key's limit across
//! every node sharing it), and a [`Worker`] that owns the kernel from then
//! on. A start that fails part-way gives its place back and destroys its
//! kernel, except when the store refuses it for the key's limit: that
//! kernel ran nothing and goes back to its pool.
//!
//! It borrows the manager's parts ([`Parts`]) and knows nothing of the
//! manager itself.

use crate::boot::Kernels;
use crate::job::Job;
use crate::pool::Pools;
use crate::registry::{Live, Registry};
use crate::worker::Worker;
use crate::{Config, Identity, Metrics, NetworkPolicy, Priority, Readiness, SessionError};
use chrono::Utc;
use kiln_protocol::Language;
use kiln_store::{SessionRecord, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch};

/// The parts of the manager a session start uses, borrowed from it.
pub(crate) struct Parts<'a> {
    pub cfg: &'a Config,
    pub store: &'a Arc<dyn Store>,
    pub kernels: &'a Arc<Kernels>,
    pub pool: &'a Pools,
    pub registry: &'a Arc<Registry>,
    pub metrics: &'a Arc<Metrics>,
    pub readiness: &'a watch::Sender<Readiness>,
    /// The incarnation new session ids name, read once the kernel is there
    /// (a lost lease may have brought a new one meanwhile).
    pub identity: &'a RwLock<Identity>,
    /// Why this node takes no new sessions now, if it does not.
    pub refusing: &'a RwLock<Option<String>>,
    /// Whether this node is one of a cluster (its records then name the
    /// incarnation).
    pub clustered: &'a AtomicBool,
    /// Whether this incarnation's sessions are being ended as lost.
    pub fenced: &'a Arc<AtomicBool>,
}

/// The most live sessions a key may hold: the server's per-key limit, or
/// the key's own (`kiln keys`) when lower.
pub(crate) fn key_max(server_per_key: usize, key_limit: Option<u64>) -> usize {
    key_limit.map_or(server_per_key, |l| usize::try_from(l).unwrap_or(usize::MAX).min(server_per_key))
}

impl Parts<'_> {
    /// Start a session for `key_id`: a place under the limits, a kernel (a
    /// pooled one when the policy is the pool's), a record in the store, a
    /// worker. Returns its id and queue.
    pub(crate) async fn create(
        &self,
        key_id: &str,
        network: NetworkPolicy,
        language: Language,
        key_limit: Option<u64>,
        priority: Priority,
    ) -> Result<(String, mpsc::UnboundedSender<Job>), SessionError> {
        let cfg = self.cfg;
        if let Some(why) = self.refusing.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(SessionError::NotTaking(why));
        }
        let key_max = key_max(cfg.max_sessions_per_key, key_limit);
        let place = self.registry.reserve(key_id, cfg.max_sessions, key_max).map_err(|full| {
            self.metrics.limit(match full {
                crate::registry::Full::Server(_) => "sessions",
                crate::registry::Full::Key(_) => "sessions_per_key",
            });
            SessionError::from(full)
        })?;
        let pool = self.pool.of(language).filter(|_| network == self.kernels.default_network());
        let pooled = match pool {
            Some(pool) => pool.take().await,
            None => None,
        };
        let kernel = match pooled {
            Some(k) => k,
            None => self.kernels.boot_new(network, language, priority).await?,
        };
        if test_boot_failure() {
            self.kernels.destroy(kernel).await;
            return Err(SessionError::KernelUnavailable("a boot failure made on purpose (test hook)".into()));
        }
        let identity = self.identity.read().unwrap_or_else(|p| p.into_inner()).clone();
        let id = identity.mint();
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(cfg.ttl).unwrap_or(chrono::Duration::hours(1));
        let record = SessionRecord {
            id: id.clone(),
            key_id: key_id.to_string(),
            started_at: now,
            expires_at: now + ttl,
            execute_count: 0,
            last_execute_at: None,
            ended_at: None,
            incarnation: self.clustered.load(Ordering::Relaxed).then_some(identity.incarnation),
            lost: false,
        };
        // The key's limit holds across every node sharing the store.
        match self.store.insert_session_within(&record, key_max as u64).await {
            Ok(true) => {}
            Ok(false) => {
                // The kernel ran nothing: it goes back to the pool, so a key
                // at its limit on other nodes cannot drain this node's pool.
                match self.pool.of(language).filter(|_| network == self.kernels.default_network()) {
                    Some(pool) => pool.put(kernel).await,
                    None => self.kernels.destroy(kernel).await,
                }
                self.metrics.limit("sessions_per_key");
                return Err(SessionError::TooManySessions(key_max));
            }
            Err(e) => {
                self.kernels.destroy(kernel).await;
                return Err(e.into());
            }
        }
        let work = kernel.dirs().work.clone();
        let (jobs, queue) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let worker = Worker {
            id: id.clone(),
            network,
            language,
            kernels: self.kernels.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            registry: self.registry.clone(),
            readiness: self.readiness.subscribe(),
            fenced: self.fenced.clone(),
            memory_bytes: cfg.sandbox.as_ref().map_or(0, |s| s.limits.memory_bytes),
        };
        let worker = tokio::spawn(worker.run(kernel, queue, stopped));
        self.metrics.sessions_started.inc();
        tracing::info!(session = %id, key = %key_id, "session started");
        let live = Live {
            key_id: key_id.to_string(),
            work,
            language,
            expires_at: record.expires_at,
            jobs: jobs.clone(),
            stop,
            worker,
        };
        place.register(id.clone(), live);
        Ok((id, jobs))
    }
}

/// Test-only hook (debug builds only, unreachable from the API): while the
/// file named by `KILN_TEST_FAIL_BOOTS` holds a number above zero, each
/// session start takes one from it and fails as a kernel boot would.
fn test_boot_failure() -> bool {
    #[cfg(debug_assertions)]
    {
        let Some(path) = std::env::var_os("KILN_TEST_FAIL_BOOTS") else {
            return false;
        };
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _held = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let n: u64 = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if n > 0 {
            let _ = std::fs::write(&path, (n - 1).to_string());
            return true;
        }
    }
    false
}
