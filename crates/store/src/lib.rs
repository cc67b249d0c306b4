//! Durable metadata: API keys (as hashes) and sessions.
//!
//! Everything kiln must remember across a restart lives behind the small
//! [`Store`] trait: which keys exist, which sessions each key started, their
//! counters and lifetimes. SQLite in the data directory is the embedded
//! default ([`SqliteStore`]); a Postgres implementation of the same trait is
//! what a multi-node deployment would use. Live state (kernels) never goes
//! here: it stays with the node that owns the session.
#![forbid(unsafe_code)]

mod sqlite;

pub use sqlite::SqliteStore;

use chrono::{DateTime, Utc};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated.
    #[error("could not open the store at {path}: {source}")]
    Open { path: std::path::PathBuf, source: rusqlite::Error },
    /// A query failed.
    #[error("store query failed ({what}): {source}")]
    Query { what: &'static str, source: rusqlite::Error },
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// An API key as stored: never the key itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Stable id (`key_...`), safe to log and show.
    pub id: String,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Where the key came from (`generated`, `configured`) or what the
    /// operator named it (`kiln keys create --label`).
    pub label: String,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// Options the operator set for the key.
    pub options: KeyOptions,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Per-key settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOptions {
    /// Live sessions this key may have (below the server's per-key limit).
    pub max_sessions: Option<u64>,
    /// Network policy of its sessions (`none`, `pypi`, `full`).
    pub network: Option<String>,
    /// Whether it may use the admin endpoints (list, create, revoke keys).
    pub admin: bool,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// `ses_...`
    pub id: String,
    /// The key that started it.
    pub key_id: String,
    /// Start time.
    pub started_at: DateTime<Utc>,
    /// Planned end (start + TTL).
    pub expires_at: DateTime<Utc>,
    /// Execute requests run.
    pub execute_count: u64,
    /// Start of the last execute request.
    pub last_execute_at: Option<DateTime<Utc>>,
    /// When it was torn down, if it was.
    pub ended_at: Option<DateTime<Utc>>,
}

impl SessionRecord {
    /// Whether the session is still serving at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.ended_at.is_none() && self.expires_at > now
    }
}

/// What a key has used, over all its sessions (the billing view).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// The key.
    pub key_id: String,
    /// Sessions started (the billing unit).
    pub sessions_started: u64,
    /// Execute requests run.
    pub executions: u64,
    /// Wall time of those executions, seconds.
    pub execution_seconds: f64,
    /// CPU time the sessions' processes used, seconds.
    pub cpu_seconds: f64,
    /// The largest memory peak of any of its sessions, bytes.
    pub peak_memory_bytes: u64,
}

/// Resources one execution used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExecutionUsage {
    /// Wall time, seconds.
    pub seconds: f64,
    /// CPU time of the session's processes during it, seconds.
    pub cpu_seconds: f64,
    /// The session's memory peak so far, bytes.
    pub peak_memory_bytes: u64,
}

/// Durable metadata behind one small interface.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// All keys.
    async fn keys(&self) -> Result<Vec<KeyRecord>>;
    /// Add a key unless one with the same hash exists; returns the stored
    /// record (the existing one on a duplicate).
    async fn add_key(&self, hash: [u8; 32], label: &str, options: &KeyOptions) -> Result<KeyRecord>;
    /// Revoke a key; false if there is no such key.
    async fn revoke_key(&self, id: &str) -> Result<bool>;
    /// Record a new session.
    async fn insert_session(&self, s: &SessionRecord) -> Result<()>;
    /// Count one execute request that started at `at`.
    async fn record_execute(&self, id: &str, at: DateTime<Utc>) -> Result<()>;
    /// Add one execution's resource use to its session.
    async fn record_usage(&self, id: &str, usage: ExecutionUsage) -> Result<()>;
    /// Usage of one key (all its sessions, ended or not).
    async fn usage(&self, key_id: &str) -> Result<Usage>;
    /// Usage of every key that started a session.
    async fn usage_all(&self) -> Result<Vec<Usage>>;
    /// Mark a session torn down.
    async fn end_session(&self, id: &str, at: DateTime<Utc>) -> Result<()>;
    /// One session by id.
    async fn session(&self, id: &str) -> Result<Option<SessionRecord>>;
    /// A key's live sessions at `now`, oldest first.
    async fn live_sessions(&self, key_id: &str, now: DateTime<Utc>) -> Result<Vec<SessionRecord>>;
    /// Mark every session not yet ended as ended at `at` (a node restarted:
    /// its kernels are gone). Returns how many.
    async fn end_all_open(&self, at: DateTime<Utc>) -> Result<u64>;
}
