//! Which database a store lives in, and opening it.
//!
//! No setting means the embedded SQLite file in the data directory; a
//! `postgres://` (or `postgresql://`) URL means a shared PostgreSQL. The URL
//! may carry a password, so only [`Database::redacted`] is ever shown.

use crate::{PgStore, SqliteStore, Store, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (created on first use).
    Sqlite(PathBuf),
    /// A PostgreSQL server, by its connection URL.
    Postgres(String),
}

// Never print the URL itself: it may hold a password.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Database {
    /// The database a `--database` setting names: `None` (or an empty
    /// value) is SQLite in `data_dir`.
    pub fn from_setting(setting: Option<&str>, data_dir: &Path) -> crate::Result<Database> {
        match setting.map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(Database::Sqlite(data_dir.join("kiln.db"))),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Database::Postgres(url.to_string()))
            }
            Some(other) => {
                let scheme = other.split_once("://").map_or(other, |(s, _)| s);
                Err(StoreError::Config(format!(
                    "--database must be a postgres://user:password@host:port/dbname URL (or unset, for SQLite in \
                     the data directory), not {scheme:?}"
                )))
            }
        }
    }

    /// Whether this is the embedded SQLite file.
    pub fn is_sqlite(&self) -> bool {
        matches!(self, Database::Sqlite(_))
    }

    /// A description safe to log: the SQLite path, or the URL without its
    /// password.
    pub fn redacted(&self) -> String {
        match self {
            Database::Sqlite(p) => format!("sqlite:{}", p.display()),
            Database::Postgres(url) => redact_url(url),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; a
/// `password=` query parameter is hidden too.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (authority_end, _) = rest.char_indices().find(|(_, c)| *c == '/' || *c == '?').unwrap_or((rest.len(), ' '));
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The node whose sessions this store writes (and ends at start-up).
    pub node_id: String,
    /// Upper bound of every store call (a PostgreSQL query, a wait for a
    /// pooled connection, a connect): past it the call fails as
    /// [`StoreError::Unavailable`] instead of holding the request.
    pub timeout: Duration,
    /// Connections a PostgreSQL store keeps at most.
    pub pool_size: usize,
}

impl OpenOptions {
    /// Defaults for `node_id`.
    pub fn new(node_id: impl Into<String>) -> Self {
        OpenOptions { node_id: node_id.into(), timeout: Duration::from_secs(5), pool_size: 16 }
    }
}

/// Open (creating and migrating) the store in `db`.
pub async fn open(db: &Database, opts: &OpenOptions) -> crate::Result<Arc<dyn Store>> {
    Ok(match db {
        Database::Sqlite(path) => Arc::new(SqliteStore::open(path, &opts.node_id)?),
        Database::Postgres(url) => Arc::new(PgStore::connect(url, opts).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_postgres_urls_or_nothing_are_accepted() {
        let dir = Path::new("/data");
        assert_eq!(Database::from_setting(None, dir), Ok(Database::Sqlite(dir.join("kiln.db"))));
        assert_eq!(Database::from_setting(Some("  "), dir), Ok(Database::Sqlite(dir.join("kiln.db"))));
        assert!(matches!(Database::from_setting(Some("postgresql://h/db"), dir), Ok(Database::Postgres(_))));
        let err = Database::from_setting(Some("mysql://u:pw@h/db"), dir).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("\"mysql\"") && !e.contains("pw")), "{err:?}");
    }

    #[test]
    fn passwords_never_appear_in_the_redacted_url() {
        let db = Database::Postgres("postgres://kiln:s3cret@db:5432/kiln?sslmode=disable&password=s3cret".into());
        let shown = format!("{db:?}");
        assert_eq!(shown, "postgres://kiln:***@db:5432/kiln?sslmode=disable&password=***");
        assert_eq!(redact_url("postgres:///kiln?host=/run/pg"), "postgres:///kiln?host=/run/pg");
        assert_eq!(redact_url("postgresql://kiln@db/kiln"), "postgresql://kiln@db/kiln");
    }
}
