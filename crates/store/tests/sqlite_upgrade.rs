//! SQLite only: a data directory written by an older kiln is migrated in
//! place, its keys keep working with a typed origin, and its open sessions
//! (from before sessions named their node) are ended by the next start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use kiln_store::{KeyOrigin, NetworkPolicy, SqliteStore, Store};

/// The schema as the last release left it (user_version 3).
const OLD_SCHEMA: &str = r"
CREATE TABLE api_keys (id TEXT PRIMARY KEY, hash BLOB NOT NULL UNIQUE, label TEXT NOT NULL, created_at INTEGER NOT NULL,
    revoked_at INTEGER, max_sessions INTEGER, network TEXT);
CREATE TABLE sessions (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, started_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    execute_count INTEGER NOT NULL DEFAULT 0, last_execute_at INTEGER, ended_at INTEGER,
    execution_seconds REAL NOT NULL DEFAULT 0, cpu_seconds REAL NOT NULL DEFAULT 0,
    peak_memory_bytes INTEGER NOT NULL DEFAULT 0);
CREATE INDEX sessions_by_key ON sessions (key_id, ended_at);
PRAGMA user_version = 3;
";

#[tokio::test]
async fn a_database_from_the_previous_release_keeps_its_keys_with_typed_origins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(OLD_SCHEMA).unwrap();
        let far = Utc::now().timestamp_micros() + 3_600_000_000;
        for (i, (label, network)) in
            [("configured", None), ("generated", None), ("ci", Some("none")), ("bulk", Some("full"))].iter().enumerate()
        {
            old.execute(
                "INSERT INTO api_keys (id, hash, label, created_at, network) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![format!("key_{i}"), vec![i as u8; 32], label, i as i64, network],
            )
            .unwrap();
        }
        old.execute(
            "INSERT INTO sessions (id, key_id, started_at, expires_at, execute_count) VALUES ('ses_old', 'key_2', 0, ?1, 5)",
            [far],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path, "node-a").unwrap();
    let keys = s.keys().await.unwrap();
    let seen: Vec<_> =
        keys.iter().map(|k| (k.id.as_str(), k.origin, k.label.as_str(), k.options.network, k.options.admin)).collect();
    // The generated key was the operator's: it stays the admin.
    assert_eq!(
        seen,
        vec![
            ("key_0", KeyOrigin::Configured, "configured", None, false),
            ("key_1", KeyOrigin::Generated, "generated", None, true),
            ("key_2", KeyOrigin::Created, "ci", Some(NetworkPolicy::None), false),
            ("key_3", KeyOrigin::Created, "bulk", Some(NetworkPolicy::Full), false),
        ]
    );
    assert_eq!(s.usage("key_2").await.unwrap().executions, 5, "usage is kept");
    assert_eq!(s.end_all_open(Utc::now()).await.unwrap(), 1, "a session without a node is this node's");
    drop(s);
    // Opening again applies nothing twice.
    let again = SqliteStore::open(&path, "node-a").unwrap();
    assert_eq!(again.keys().await.unwrap().len(), 4);
}

#[tokio::test]
async fn a_database_from_a_newer_kiln_is_refused_not_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    drop(SqliteStore::open(&path, "n").unwrap());
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let err = SqliteStore::open(&path, "n").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("version 99") && err.contains("upgrade kiln"), "{err}");
}
