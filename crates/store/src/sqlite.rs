//! The embedded SQLite store.
//!
//! One connection behind a mutex: every statement is a point query or a
//! one-row update on an indexed table, microseconds long, so a pool would add
//! nothing but contention. WAL mode keeps readers of the file (backups,
//! `sqlite3` by an operator) from blocking the server.

use crate::{ExecutionUsage, KeyOptions, KeyRecord, Result, SessionRecord, Store, StoreError, Usage};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Schema migrations, applied in order; `user_version` counts them.
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
];

/// SQLite-backed [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Open (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let open = |source| StoreError::Open { path: path.to_path_buf(), source };
        let conn = Connection::open(path).map_err(open)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open)?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.execute_batch(sql).map_err(open)?;
            conn.pragma_update(None, "user_version", i + 1).map_err(open)?;
        }
        Ok(SqliteStore { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn q(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: r.get(0)?,
        key_id: r.get(1)?,
        started_at: from_micros(r.get(2)?),
        expires_at: from_micros(r.get(3)?),
        execute_count: r.get::<_, i64>(4)?.try_into().unwrap_or(0),
        last_execute_at: r.get::<_, Option<i64>>(5)?.map(from_micros),
        ended_at: r.get::<_, Option<i64>>(6)?.map(from_micros),
    })
}

const KEY_COLS: &str = "id, hash, label, created_at, max_sessions, network, revoked_at, admin";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let hash: Vec<u8> = r.get(1)?;
    Ok(KeyRecord {
        id: r.get(0)?,
        hash: hash.try_into().unwrap_or([0; 32]),
        label: r.get(2)?,
        created_at: from_micros(r.get(3)?),
        options: KeyOptions {
            max_sessions: r.get::<_, Option<i64>>(4)?.and_then(|n| u64::try_from(n).ok()),
            network: r.get(5)?,
            admin: r.get(7)?,
        },
        revoked_at: r.get::<_, Option<i64>>(6)?.map(from_micros),
    })
}

const USAGE_SQL: &str = "SELECT key_id, COUNT(*), COALESCE(SUM(execute_count), 0), COALESCE(SUM(execution_seconds), 0),
     COALESCE(SUM(cpu_seconds), 0), COALESCE(MAX(peak_memory_bytes), 0) FROM sessions";

fn usage_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Usage> {
    Ok(Usage {
        key_id: r.get(0)?,
        sessions_started: r.get::<_, i64>(1)?.try_into().unwrap_or(0),
        executions: r.get::<_, i64>(2)?.try_into().unwrap_or(0),
        execution_seconds: r.get(3)?,
        cpu_seconds: r.get(4)?,
        peak_memory_bytes: r.get::<_, i64>(5)?.try_into().unwrap_or(0),
    })
}

const SESSION_COLS: &str = "id, key_id, started_at, expires_at, execute_count, last_execute_at, ended_at";

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn keys(&self) -> Result<Vec<KeyRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {KEY_COLS} FROM api_keys ORDER BY created_at"))
            .map_err(q("list keys"))?;
        let rows = stmt.query_map([], key_row).map_err(q("list keys"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(q("list keys"))
    }

    async fn add_key(&self, hash: [u8; 32], label: &str, options: &KeyOptions) -> Result<KeyRecord> {
        let conn = self.conn();
        let existing = conn
            .query_row(&format!("SELECT {KEY_COLS} FROM api_keys WHERE hash = ?1"), params![hash.as_slice()], key_row)
            .optional()
            .map_err(q("find key"))?;
        if let Some(rec) = existing {
            return Ok(rec);
        }
        // The id is derived from the hash: stable, and reveals nothing
        // usable (a prefix of a SHA-256 of a high-entropy secret).
        let id = format!("key_{}", hash.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>());
        let now = Utc::now();
        conn.execute(
            "INSERT INTO api_keys (id, hash, label, created_at, max_sessions, network, admin) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                id,
                hash.as_slice(),
                label,
                micros(now),
                options.max_sessions.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
                options.network,
                options.admin
            ],
        )
        .map_err(q("add key"))?;
        Ok(KeyRecord {
            id,
            hash,
            label: label.to_string(),
            created_at: now,
            options: options.clone(),
            revoked_at: None,
        })
    }

    async fn revoke_key(&self, id: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, micros(Utc::now())],
            )
            .map_err(q("revoke key"))?;
        Ok(n > 0)
    }

    async fn insert_session(&self, s: &SessionRecord) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO sessions (id, key_id, started_at, expires_at, execute_count, last_execute_at, ended_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    s.id,
                    s.key_id,
                    micros(s.started_at),
                    micros(s.expires_at),
                    i64::try_from(s.execute_count).unwrap_or(i64::MAX),
                    s.last_execute_at.map(micros),
                    s.ended_at.map(micros)
                ],
            )
            .map_err(q("insert session"))?;
        Ok(())
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
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    u.seconds,
                    u.cpu_seconds,
                    i64::try_from(u.peak_memory_bytes).unwrap_or(i64::MAX)
                ])
            })
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
            .query_row(&format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"), params![id], session_row)
            .optional()
            .map_err(q("get session"))
    }

    async fn live_sessions(&self, key_id: &str, now: DateTime<Utc>) -> Result<Vec<SessionRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions
                 WHERE key_id = ?1 AND ended_at IS NULL AND expires_at > ?2
                 ORDER BY started_at"
            ))
            .map_err(q("list sessions"))?;
        let rows = stmt.query_map(params![key_id, micros(now)], session_row).map_err(q("list sessions"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(q("list sessions"))
    }

    async fn end_all_open(&self, at: DateTime<Utc>) -> Result<u64> {
        let n = self
            .conn()
            .execute("UPDATE sessions SET ended_at = ?1 WHERE ended_at IS NULL", params![micros(at)])
            .map_err(q("end open sessions"))?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = SqliteStore::open(&dir.path().join("kiln.db")).unwrap_or_else(|e| panic!("{e}"));
        (dir, s)
    }

    #[tokio::test]
    async fn adding_the_same_key_twice_keeps_one_record() {
        let (_d, s) = store();
        let opts = KeyOptions { max_sessions: Some(3), network: Some("none".into()), admin: true };
        let a = s.add_key([7; 32], "flag", &opts).await.unwrap_or_else(|e| panic!("{e}"));
        let b = s.add_key([7; 32], "other", &KeyOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.id, b.id);
        let keys = s.keys().await.unwrap_or_default();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].options, opts);
        assert!(s.revoke_key(&a.id).await.unwrap_or(false));
        assert!(!s.revoke_key("key_nope").await.unwrap_or(true));
        assert!(s.keys().await.unwrap_or_default()[0].revoked_at.is_some());
    }

    #[tokio::test]
    async fn sessions_are_listed_per_key_until_they_end_or_expire() {
        let (_d, s) = store();
        let now = Utc::now();
        let mk = |id: &str, key: &str, ttl: i64| SessionRecord {
            id: id.into(),
            key_id: key.into(),
            started_at: now,
            expires_at: now + Duration::seconds(ttl),
            execute_count: 0,
            last_execute_at: None,
            ended_at: None,
        };
        for r in [mk("a", "k1", 60), mk("b", "k1", 60), mk("c", "k2", 60), mk("d", "k1", -1)] {
            s.insert_session(&r).await.unwrap_or_else(|e| panic!("{e}"));
        }
        s.record_execute("a", now).await.unwrap_or_else(|e| panic!("{e}"));
        s.record_execute("a", now).await.unwrap_or_else(|e| panic!("{e}"));
        s.end_session("b", now).await.unwrap_or_else(|e| panic!("{e}"));
        let live = s.live_sessions("k1", now).await.unwrap_or_default();
        assert_eq!(live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(live[0].execute_count, 2);
        let u = ExecutionUsage { seconds: 1.5, cpu_seconds: 0.5, peak_memory_bytes: 100 };
        s.record_usage("a", u).await.unwrap_or_else(|e| panic!("{e}"));
        s.record_usage("a", ExecutionUsage { peak_memory_bytes: 50, ..u }).await.unwrap_or_else(|e| panic!("{e}"));
        let usage = s.usage("k1").await.unwrap_or_default();
        assert_eq!((usage.sessions_started, usage.executions, usage.peak_memory_bytes), (3, 2, 100));
        assert!((usage.execution_seconds - 3.0).abs() < 1e-9 && (usage.cpu_seconds - 1.0).abs() < 1e-9);
        assert_eq!(s.usage("nobody").await.map(|u| u.sessions_started).unwrap_or(1), 0);
        assert_eq!(s.usage_all().await.map(|u| u.len()).unwrap_or(0), 2);
        // a, c and d (expired but never torn down); b had ended.
        assert_eq!(s.end_all_open(now).await.unwrap_or(0), 3);
    }

    #[tokio::test]
    async fn an_upgraded_database_keeps_its_generated_key_as_the_admin() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("kiln.db");
        {
            // The schema before admin keys, with a generated and a created key.
            let conn = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
            for sql in &MIGRATIONS[..3] {
                conn.execute_batch(sql).unwrap_or_else(|e| panic!("{e}"));
            }
            conn.pragma_update(None, "user_version", 3).unwrap_or_else(|e| panic!("{e}"));
            for (id, hash, label) in [("key_g", [1u8; 32], "generated"), ("key_c", [2u8; 32], "created")] {
                conn.execute(
                    "INSERT INTO api_keys (id, hash, label, created_at) VALUES (?1, ?2, ?3, 0)",
                    params![id, hash.as_slice(), label],
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let s = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let admin: Vec<(String, bool)> =
            s.keys().await.unwrap_or_default().into_iter().map(|k| (k.id, k.options.admin)).collect();
        assert_eq!(admin, vec![("key_g".to_string(), true), ("key_c".to_string(), false)]);
    }
}
