//! The embedded SQLite store.
//!
//! One connection behind a mutex: every statement is a point query or a
//! one-row update on an indexed table, microseconds long, so a pool would add
//! nothing but contention. WAL mode keeps readers of the file (backups,
//! `sqlite3` by an operator, `kiln keys` while the server runs) from blocking
//! the server; the busy timeout bounds how long a statement waits for
//! another process's write lock.

use crate::{
    key_id, parse_hash, parse_network, parse_origin, to_i64, to_u64, Capacity, ExecutionUsage, KeyOptions, KeyOrigin,
    KeyRecord, NodeRecord, Result, SessionRecord, Store, StoreError, Usage,
};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Schema migrations, applied in order, each once and in its own
/// transaction; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    hash        BLOB NOT NULL UNIQUE,
    label       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    key_id           TEXT NOT NULL,
    started_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    execute_count    INTEGER NOT NULL DEFAULT 0,
    last_execute_at  INTEGER,
    ended_at         INTEGER
);
CREATE INDEX sessions_by_key ON sessions (key_id, ended_at);
",
    r"
ALTER TABLE sessions ADD COLUMN execution_seconds REAL NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN cpu_seconds REAL NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN peak_memory_bytes INTEGER NOT NULL DEFAULT 0;
",
    r"
ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;
ALTER TABLE api_keys ADD COLUMN max_sessions INTEGER;
ALTER TABLE api_keys ADD COLUMN network TEXT;
",
    // Admin keys. The key kiln generated at its first start was its
    // operator's, so it stays the admin after an upgrade.
    r"
ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;
UPDATE api_keys SET admin = 1 WHERE label = 'generated';
",
    // Typed key columns (SQLite adds a CHECK only by rebuilding the table):
    // the origin gets its own column instead of the magic labels
    // `configured`/`generated`; sessions name their node; a counter that
    // triggers bump whenever a key changes lets servers reload keys only
    // when needed.
    r"
CREATE TABLE api_keys_v4 (
    id            TEXT PRIMARY KEY,
    hash          BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    origin        TEXT NOT NULL CHECK (origin IN ('configured', 'generated', 'created')),
    label         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    max_sessions  INTEGER CHECK (max_sessions >= 0),
    network       TEXT CHECK (network IN ('none', 'pypi', 'full')),
    admin         INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1))
);
INSERT INTO api_keys_v4 (id, hash, origin, label, created_at, revoked_at, max_sessions, network, admin)
    SELECT id, hash,
           CASE label WHEN 'configured' THEN 'configured' WHEN 'generated' THEN 'generated' ELSE 'created' END,
           label,
           created_at, revoked_at, max_sessions, network, admin
    FROM api_keys;
DROP TABLE api_keys;
ALTER TABLE api_keys_v4 RENAME TO api_keys;
ALTER TABLE sessions ADD COLUMN node_id TEXT;
CREATE INDEX sessions_open_by_node ON sessions (node_id) WHERE ended_at IS NULL;
CREATE TABLE kiln_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO kiln_counters (name, value) VALUES ('keys', 1);
CREATE TRIGGER api_keys_inserted AFTER INSERT ON api_keys
    BEGIN UPDATE kiln_counters SET value = value + 1 WHERE name = 'keys'; END;
CREATE TRIGGER api_keys_updated AFTER UPDATE ON api_keys
    BEGIN UPDATE kiln_counters SET value = value + 1 WHERE name = 'keys'; END;
CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys
    BEGIN UPDATE kiln_counters SET value = value + 1 WHERE name = 'keys'; END;
",
    // Nodes and their leases; a session names the incarnation of its node
    // that created it (see `NodeRecord`).
    r"
CREATE TABLE nodes (
    id                      TEXT PRIMARY KEY,
    tag                     TEXT NOT NULL UNIQUE,
    incarnation             TEXT NOT NULL,
    advertise               TEXT,
    lease_expires_at        INTEGER NOT NULL,
    draining                INTEGER NOT NULL DEFAULT 0 CHECK (draining IN (0, 1)),
    ready_kernels           INTEGER NOT NULL DEFAULT 0 CHECK (ready_kernels >= 0),
    live_sessions           INTEGER NOT NULL DEFAULT 0 CHECK (live_sessions >= 0),
    max_sessions            INTEGER NOT NULL DEFAULT 0 CHECK (max_sessions >= 0),
    memory_available_bytes  INTEGER NOT NULL DEFAULT 0 CHECK (memory_available_bytes >= 0)
);
ALTER TABLE sessions ADD COLUMN incarnation TEXT;
ALTER TABLE sessions ADD COLUMN lost INTEGER NOT NULL DEFAULT 0 CHECK (lost IN (0, 1));
",
    // A key's own limit of executions at once (`NULL`: the server's
    // `--max-executions-per-key`). Existing keys keep the server's.
    r"
ALTER TABLE api_keys ADD COLUMN max_executions_per_key INTEGER CHECK (max_executions_per_key >= 1);
",
];

/// The condition under which a session row (`s`) is live at `?2`: not
/// ended, not past its lifetime, and its node's incarnation still holds its
/// lease (rows from before incarnations were recorded are trusted).
const LIVE: &str = "s.ended_at IS NULL AND s.expires_at > ?2 AND (s.incarnation IS NULL OR EXISTS (
     SELECT 1 FROM nodes n WHERE n.id = s.node_id AND n.incarnation = s.incarnation AND n.lease_expires_at > ?2))";

const NODE_COLS: &str = "id, tag, incarnation, advertise, lease_expires_at, draining, ready_kernels, live_sessions,
     max_sessions, memory_available_bytes";

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    Ok(NodeRecord {
        id: r.get(0)?,
        tag: r.get(1)?,
        incarnation: r.get(2)?,
        advertise: r.get(3)?,
        lease_expires_at: from_micros(r.get(4)?),
        draining: r.get(5)?,
        capacity: Capacity {
            ready_kernels: to_u64(r.get(6)?),
            live_sessions: to_u64(r.get(7)?),
            max_sessions: to_u64(r.get(8)?),
            memory_available_bytes: to_u64(r.get(9)?),
        },
    })
}

/// SQLite-backed [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    node_id: String,
}

impl SqliteStore {
    /// Open (creating and migrating) the database at `path`, for the node
    /// `node_id`.
    pub fn open(path: &Path, node_id: &str) -> Result<Self> {
        let mut conn = Connection::open(path).map_err(q("open"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(q("open"))?;
        let deadline = Instant::now() + BUSY_TIMEOUT;
        // Switching a new file to WAL takes its exclusive lock; a process
        // opening the same file at that moment is refused at once, without
        // the busy handler, so the switch is retried here.
        when_not_busy(deadline, || conn.pragma_update(None, "journal_mode", "WAL")).map_err(q("open"))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(q("open"))?;
        migrate(&mut conn, deadline)?;
        Ok(SqliteStore { conn: Mutex::new(conn), node_id: node_id.to_string() })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long opening waits for another process's lock, and how long any
/// statement does.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Apply the migrations the file at `conn` lacks. Each runs in an IMMEDIATE
/// transaction (the write lock first, then the version read), so processes
/// opening the same file at once apply each exactly once.
fn migrate(conn: &mut Connection, deadline: Instant) -> Result<()> {
    loop {
        let version = when_not_busy(deadline, || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let version: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if let Some(sql) = MIGRATIONS.get(version) {
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", version + 1)?;
                tx.commit()?;
            }
            Ok(version)
        })
        .map_err(q("migrate"))?;
        if version > MIGRATIONS.len() {
            return Err(StoreError::Config(format!(
                "the database's schema is version {version}, newer than this kiln knows ({}): upgrade kiln",
                MIGRATIONS.len()
            )));
        }
        if version == MIGRATIONS.len() {
            return Ok(());
        }
    }
}

/// Run `step` again while SQLite answers "busy" or "locked" and `deadline`
/// has not passed. Only for set-up: SQLite refuses some lock upgrades at
/// once rather than wait (waiting could deadlock), and a rolled-back step
/// can simply be run again.
fn when_not_busy<T>(deadline: Instant, mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let mut pause = Duration::from_millis(2);
    loop {
        match step() {
            Err(e)
                if matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Classify an SQLite error: a locked or busy file is "try again", a broken
/// rule a constraint, anything else a failed query.
fn q(what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| {
        let detail = e.to_string();
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::CannotOpen) => {
                StoreError::Unavailable { what, detail }
            }
            Some(ErrorCode::ConstraintViolation) => StoreError::Constraint { what, detail },
            _ => StoreError::Query { what, detail },
        }
    }
}

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: r.get(0)?,
        key_id: r.get(1)?,
        started_at: from_micros(r.get(2)?),
        expires_at: from_micros(r.get(3)?),
        execute_count: to_u64(r.get(4)?),
        last_execute_at: r.get::<_, Option<i64>>(5)?.map(from_micros),
        ended_at: r.get::<_, Option<i64>>(6)?.map(from_micros),
        incarnation: r.get(7)?,
        lost: r.get(8)?,
    })
}

const KEY_COLS: &str =
    "id, hash, origin, label, created_at, max_sessions, network, revoked_at, admin, max_executions_per_key";

/// A key row as stored, before its typed columns are checked.
struct RawKey {
    id: String,
    hash: Vec<u8>,
    origin: String,
    label: String,
    created_at: i64,
    max_sessions: Option<i64>,
    network: Option<String>,
    revoked_at: Option<i64>,
    admin: bool,
    max_executions_per_key: Option<i64>,
}

fn raw_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawKey> {
    Ok(RawKey {
        id: r.get(0)?,
        hash: r.get(1)?,
        origin: r.get(2)?,
        label: r.get(3)?,
        created_at: r.get(4)?,
        max_sessions: r.get(5)?,
        network: r.get(6)?,
        revoked_at: r.get(7)?,
        admin: r.get(8)?,
        max_executions_per_key: r.get(9)?,
    })
}

impl RawKey {
    fn typed(self, what: &'static str) -> Result<KeyRecord> {
        Ok(KeyRecord {
            hash: parse_hash(what, &self.id, self.hash)?,
            origin: parse_origin(what, &self.id, &self.origin)?,
            options: KeyOptions {
                max_sessions: self.max_sessions.map(to_u64),
                max_executions_per_key: self.max_executions_per_key.map(to_u64),
                network: parse_network(what, &self.id, self.network)?,
                admin: self.admin,
            },
            label: self.label,
            created_at: from_micros(self.created_at),
            revoked_at: self.revoked_at.map(from_micros),
            id: self.id,
        })
    }
}

const USAGE_SQL: &str = "SELECT key_id, COUNT(*), COALESCE(SUM(execute_count), 0), COALESCE(SUM(execution_seconds), 0),
     COALESCE(SUM(cpu_seconds), 0), COALESCE(MAX(peak_memory_bytes), 0) FROM sessions";

fn usage_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Usage> {
    Ok(Usage {
        key_id: r.get(0)?,
        sessions_started: to_u64(r.get(1)?),
        executions: to_u64(r.get(2)?),
        execution_seconds: r.get(3)?,
        cpu_seconds: r.get(4)?,
        peak_memory_bytes: to_u64(r.get(5)?),
    })
}

const SESSION_COLS: &str =
    "id, key_id, started_at, expires_at, execute_count, last_execute_at, ended_at, incarnation, lost";

/// Insert a session row of `node`'s `incarnation`.
fn insert(conn: &Connection, node: &str, s: &SessionRecord) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO sessions (id, key_id, node_id, incarnation, started_at, expires_at, execute_count,
         last_execute_at, ended_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut st| {
        st.execute(params![
            s.id,
            s.key_id,
            node,
            s.incarnation,
            micros(s.started_at),
            micros(s.expires_at),
            to_i64(s.execute_count),
            s.last_execute_at.map(micros),
            s.ended_at.map(micros)
        ])
    })
    .map_err(q("insert session"))?;
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {KEY_COLS} FROM api_keys ORDER BY created_at, id"))
            .map_err(q("list keys"))?;
        let rows = stmt.query_map([], raw_key).map_err(q("list keys"))?;
        let raw = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(q("list keys"))?;
        raw.into_iter().map(|k| k.typed("list keys")).collect()
    }

    async fn keys_version(&self) -> Result<u64> {
        self.conn()
            .prepare_cached("SELECT value FROM kiln_counters WHERE name = 'keys'")
            .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(q("keys version"))
    }

    async fn add_key(&self, hash: [u8; 32], origin: KeyOrigin, label: &str, options: &KeyOptions) -> Result<KeyRecord> {
        let id = key_id(&hash);
        let now = Utc::now();
        let conn = self.conn();
        // Insert-or-keep in one statement (whichever of the key's unique
        // columns, id or hash, conflicts); the row read back is the stored
        // one either way.
        conn.execute(
            "INSERT INTO api_keys (id, hash, origin, label, created_at, max_sessions, network, admin,
                                   max_executions_per_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
            params![
                id,
                hash.as_slice(),
                origin.as_str(),
                label,
                micros(now),
                options.max_sessions.map(to_i64),
                options.network.map(|n| n.stored_name()),
                options.admin,
                options.max_executions_per_key.map(to_i64)
            ],
        )
        .map_err(q("add key"))?;
        let raw = conn
            .query_row(&format!("SELECT {KEY_COLS} FROM api_keys WHERE hash = ?1"), params![hash.as_slice()], raw_key)
            .map_err(q("add key"))?;
        raw.typed("add key")
    }

    async fn revoke_key(&self, id: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, micros(Utc::now())],
            )
            .map_err(q("revoke key"))?;
        if n > 0 {
            return Ok(true);
        }
        // Already revoked still counts as "there is such a key".
        let exists = self
            .conn()
            .query_row("SELECT 1 FROM api_keys WHERE id = ?1", params![id], |_| Ok(()))
            .optional()
            .map_err(q("revoke key"))?;
        Ok(exists.is_some())
    }

    async fn insert_session(&self, s: &SessionRecord) -> Result<()> {
        insert(&self.conn(), &self.node_id, s)
    }

    async fn insert_session_within(&self, s: &SessionRecord, key_limit: u64) -> Result<bool> {
        // One connection behind one lock: the count and the insert cannot
        // interleave with another create of this process, and the
        // IMMEDIATE transaction keeps other processes out.
        let what = "insert session";
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(q(what))?;
        let live: i64 = tx
            .prepare_cached(&format!("SELECT COUNT(*) FROM sessions s WHERE s.key_id = ?1 AND {LIVE}"))
            .and_then(|mut st| st.query_row(params![s.key_id, micros(Utc::now())], |r| r.get(0)))
            .map_err(q(what))?;
        if to_u64(live) >= key_limit {
            return Ok(false);
        }
        insert(&tx, &self.node_id, s)?;
        tx.commit().map_err(q(what))?;
        Ok(true)
    }

    async fn put_node(&self, n: &NodeRecord) -> Result<()> {
        self.conn()
            .execute(
                &format!(
                    "INSERT INTO nodes ({NODE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (id) DO UPDATE SET tag = excluded.tag, incarnation = excluded.incarnation,
                     advertise = excluded.advertise, lease_expires_at = excluded.lease_expires_at,
                     draining = excluded.draining, ready_kernels = excluded.ready_kernels,
                     live_sessions = excluded.live_sessions, max_sessions = excluded.max_sessions,
                     memory_available_bytes = excluded.memory_available_bytes"
                ),
                params![
                    n.id,
                    n.tag,
                    n.incarnation,
                    n.advertise,
                    micros(n.lease_expires_at),
                    n.draining,
                    to_i64(n.capacity.ready_kernels),
                    to_i64(n.capacity.live_sessions),
                    to_i64(n.capacity.max_sessions),
                    to_i64(n.capacity.memory_available_bytes)
                ],
            )
            .map_err(q("register node"))?;
        Ok(())
    }

    async fn renew_node(&self, n: &NodeRecord) -> Result<bool> {
        let changed = self
            .conn()
            .prepare_cached(
                "UPDATE nodes SET lease_expires_at = ?3, draining = ?4, ready_kernels = ?5, live_sessions = ?6,
                 max_sessions = ?7, memory_available_bytes = ?8, advertise = ?9 WHERE id = ?1 AND incarnation = ?2",
            )
            .and_then(|mut st| {
                st.execute(params![
                    n.id,
                    n.incarnation,
                    micros(n.lease_expires_at),
                    n.draining,
                    to_i64(n.capacity.ready_kernels),
                    to_i64(n.capacity.live_sessions),
                    to_i64(n.capacity.max_sessions),
                    to_i64(n.capacity.memory_available_bytes),
                    n.advertise
                ])
            })
            .map_err(q("renew node lease"))?;
        Ok(changed == 1)
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY id")).map_err(q("list nodes"))?;
        let rows = stmt.query_map([], node_row).map_err(q("list nodes"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(q("list nodes"))
    }

    // The two statements of every execution: prepared once per connection
    // (parsing them was a measurable part of a warm execute).
    async fn record_execute(&self, id: &str, at: DateTime<Utc>) -> Result<()> {
        self.conn()
            .prepare_cached("UPDATE sessions SET execute_count = execute_count + 1, last_execute_at = ?2 WHERE id = ?1")
            .and_then(|mut st| st.execute(params![id, micros(at)]))
            .map_err(q("record execute"))?;
        Ok(())
    }

    async fn record_usage(&self, id: &str, u: ExecutionUsage) -> Result<()> {
        self.conn()
            .prepare_cached(
                "UPDATE sessions SET execution_seconds = execution_seconds + ?2, cpu_seconds = cpu_seconds + ?3,
                 peak_memory_bytes = MAX(peak_memory_bytes, ?4) WHERE id = ?1",
            )
            .and_then(|mut st| st.execute(params![id, u.seconds, u.cpu_seconds, to_i64(u.peak_memory_bytes)]))
            .map_err(q("record usage"))?;
        Ok(())
    }

    async fn usage(&self, key_id: &str) -> Result<Usage> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("{USAGE_SQL} WHERE key_id = ?1 GROUP BY key_id")).map_err(q("usage"))?;
        let found = stmt.query_row(params![key_id], usage_row).optional().map_err(q("usage"))?;
        Ok(found.unwrap_or(Usage { key_id: key_id.to_string(), ..Usage::default() }))
    }

    async fn usage_all(&self) -> Result<Vec<Usage>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("{USAGE_SQL} GROUP BY key_id ORDER BY key_id")).map_err(q("usage"))?;
        let rows = stmt.query_map([], usage_row).map_err(q("usage"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(q("usage"))
    }

    async fn end_session(&self, id: &str, at: DateTime<Utc>) -> Result<()> {
        self.conn()
            .execute("UPDATE sessions SET ended_at = ?2 WHERE id = ?1 AND ended_at IS NULL", params![id, micros(at)])
            .map_err(q("end session"))?;
        Ok(())
    }

    async fn session(&self, id: &str) -> Result<Option<SessionRecord>> {
        self.conn()
            .prepare_cached(&format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"))
            .and_then(|mut st| st.query_row(params![id], session_row).optional())
            .map_err(q("get session"))
    }

    async fn live_sessions(&self, key_id: &str, now: DateTime<Utc>) -> Result<Vec<SessionRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions s WHERE s.key_id = ?1 AND {LIVE} ORDER BY s.started_at, s.id"
            ))
            .map_err(q("list sessions"))?;
        let rows = stmt.query_map(params![key_id, micros(now)], session_row).map_err(q("list sessions"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(q("list sessions"))
    }

    async fn end_all_open(&self, at: DateTime<Utc>) -> Result<u64> {
        let n = self
            .conn()
            .execute(
                "UPDATE sessions SET ended_at = ?1, lost = 1 WHERE ended_at IS NULL AND (node_id = ?2 OR node_id IS NULL)",
                params![micros(at), self.node_id],
            )
            .map_err(q("end open sessions"))?;
        Ok(n as u64)
    }
}
