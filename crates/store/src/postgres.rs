//! The PostgreSQL store, shared by every node of a cluster.
//!
//! tokio-postgres with a deadpool pool: plain async SQL with prepared
//! statements cached per connection (the two statements of every execute
//! cost one round trip each), no compile-time database, no ORM. A dead
//! connection (the server restarted) is dropped when the pool next hands it
//! out, and a new one is made, so the store recovers by itself; meanwhile
//! every call fails fast as [`StoreError::Unavailable`], and no call, a
//! connect or a wait for a pooled connection included, outlasts the store's
//! time limit.
//!
//! Counters are updated in place (`execute_count = execute_count + 1`), so
//! nodes that share the database add up instead of overwriting each other.
//! An execution counted while no connection can be had goes to the
//! [`Backlog`] and is written when the database is back.
//! Migrations are numbered in `kiln_migrations`, and each runs in its own
//! transaction under an advisory lock, so nodes that start together apply
//! each exactly once.

use crate::backlog::{Backlog, Tally};
use crate::{
    key_id, parse_hash, parse_network, parse_origin, to_i64, to_u64, Capacity, ExecutionUsage, KeyOptions, KeyOrigin,
    KeyRecord, NodeRecord, OpenOptions, Result, SessionRecord, Store, StoreError, Usage,
};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{NoTls, Row};

/// Schema migrations, applied in order; version N is `MIGRATIONS[N - 1]`.
/// The session table is keyed by node so that node leases and ownership can
/// be added by a later migration without rewriting it.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    hash          BYTEA NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    origin        TEXT NOT NULL CHECK (origin IN ('configured', 'generated', 'created')),
    label         TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    revoked_at    TIMESTAMPTZ,
    max_sessions  BIGINT CHECK (max_sessions >= 0),
    network       TEXT CHECK (network IN ('none', 'pypi', 'full')),
    admin         BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY,
    key_id             TEXT NOT NULL,
    node_id            TEXT,
    started_at         TIMESTAMPTZ NOT NULL,
    expires_at         TIMESTAMPTZ NOT NULL,
    execute_count      BIGINT NOT NULL DEFAULT 0 CHECK (execute_count >= 0),
    last_execute_at    TIMESTAMPTZ,
    ended_at           TIMESTAMPTZ,
    execution_seconds  DOUBLE PRECISION NOT NULL DEFAULT 0,
    cpu_seconds        DOUBLE PRECISION NOT NULL DEFAULT 0,
    peak_memory_bytes  BIGINT NOT NULL DEFAULT 0 CHECK (peak_memory_bytes >= 0)
);
CREATE INDEX sessions_by_key ON sessions (key_id, ended_at);
CREATE INDEX sessions_open_by_node ON sessions (node_id) WHERE ended_at IS NULL;
CREATE TABLE kiln_counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO kiln_counters (name, value) VALUES ('keys', 1);
CREATE FUNCTION kiln_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE kiln_counters SET value = value + 1 WHERE name = 'keys';
    RETURN NULL;
END $$;
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION kiln_keys_changed();
",
    r"
CREATE TABLE nodes (
    id                      TEXT PRIMARY KEY,
    tag                     TEXT NOT NULL UNIQUE,
    incarnation             TEXT NOT NULL,
    advertise               TEXT,
    lease_expires_at        TIMESTAMPTZ NOT NULL,
    draining                BOOLEAN NOT NULL DEFAULT FALSE,
    ready_kernels           BIGINT NOT NULL DEFAULT 0 CHECK (ready_kernels >= 0),
    live_sessions           BIGINT NOT NULL DEFAULT 0 CHECK (live_sessions >= 0),
    max_sessions            BIGINT NOT NULL DEFAULT 0 CHECK (max_sessions >= 0),
    memory_available_bytes  BIGINT NOT NULL DEFAULT 0 CHECK (memory_available_bytes >= 0)
);
ALTER TABLE sessions ADD COLUMN incarnation TEXT;
ALTER TABLE sessions ADD COLUMN lost BOOLEAN NOT NULL DEFAULT FALSE;
",
    // A key's own limit of executions at once (`NULL`: the server's
    // `--max-executions-per-key`). Existing keys keep the server's.
    r"
ALTER TABLE api_keys ADD COLUMN max_executions_per_key BIGINT CHECK (max_executions_per_key >= 1);
",
];

/// The condition under which a session row (`s`) is live at `$2`: not
/// ended, not past its lifetime, and its node's incarnation still holds its
/// lease (rows from before incarnations were recorded are trusted).
const LIVE: &str = "s.ended_at IS NULL AND s.expires_at > $2 AND (s.incarnation IS NULL OR EXISTS (
     SELECT 1 FROM nodes n WHERE n.id = s.node_id AND n.incarnation = s.incarnation AND n.lease_expires_at > $2))";

/// The first half of the per-key advisory lock of session inserts ("ks"):
/// the two-integer lock space never meets the migration lock's.
const KEY_LOCK_SPACE: i32 = 0x6b73;

const INSERT_SESSION: &str = "INSERT INTO sessions (id, key_id, node_id, incarnation, started_at, expires_at,
     execute_count, last_execute_at, ended_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

const NODE_COLS: &str = "id, tag, incarnation, advertise, lease_expires_at, draining, ready_kernels, live_sessions,
     max_sessions, memory_available_bytes";

fn node_row(what: &'static str, r: &Row) -> Result<NodeRecord> {
    let get = |e: tokio_postgres::Error| StoreError::Query { what, detail: e.to_string() };
    Ok(NodeRecord {
        id: r.try_get(0).map_err(get)?,
        tag: r.try_get(1).map_err(get)?,
        incarnation: r.try_get(2).map_err(get)?,
        advertise: r.try_get(3).map_err(get)?,
        lease_expires_at: r.try_get(4).map_err(get)?,
        draining: r.try_get(5).map_err(get)?,
        capacity: Capacity {
            ready_kernels: to_u64(r.try_get(6).map_err(get)?),
            live_sessions: to_u64(r.try_get(7).map_err(get)?),
            max_sessions: to_u64(r.try_get(8).map_err(get)?),
            memory_available_bytes: to_u64(r.try_get(9).map_err(get)?),
        },
    })
}

/// The advisory lock migrations hold (any constant unique to kiln: "kiln"
/// in ASCII).
const MIGRATION_LOCK: i64 = 0x6b69_6c6e;

/// PostgreSQL-backed [`Store`].
#[derive(Debug)]
pub struct PgStore {
    pool: Pool,
    node_id: String,
    timeout: Duration,
    backlog: Arc<Backlog>,
}

/// One statement adds a [`Tally`] to a session: both per-execute writes
/// and the backlog's late ones (sums and maxima, so order does not matter).
const TALLY_SQL: &str = "UPDATE sessions SET execute_count = execute_count + $2,
     last_execute_at = GREATEST(last_execute_at, $3), execution_seconds = execution_seconds + $4,
     cpu_seconds = cpu_seconds + $5, peak_memory_bytes = GREATEST(peak_memory_bytes, $6) WHERE id = $1";

/// Write a tally with a client of the pool.
async fn write_tally(client: &deadpool_postgres::Client, id: &str, t: &Tally) -> Result<()> {
    let what = "record usage";
    let stmt = client.prepare_cached(TALLY_SQL).await.map_err(pg(what))?;
    client
        .execute(
            &stmt,
            &[&id, &to_i64(t.executions), &t.last_execute_at, &t.seconds, &t.cpu_seconds, &to_i64(t.peak_memory_bytes)],
        )
        .await
        .map_err(pg(what))?;
    Ok(())
}

/// Write the backlog every second while there is one; stops when the store
/// is dropped.
async fn flush_backlog(pool: Pool, backlog: std::sync::Weak<Backlog>, timeout: Duration) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(backlog) = backlog.upgrade() else { return };
        if backlog.len() == 0 {
            continue;
        }
        let pending = backlog.take();
        let mut written = 0usize;
        let mut left = pending.into_iter();
        for (id, t) in left.by_ref() {
            // No connection: certainly not written, so kept for the next
            // round. A write that fails once sent may or may not have
            // landed: it is dropped (and logged) rather than risk counting
            // it twice, as a direct write would be.
            let client = match tokio::time::timeout(timeout, pool.get()).await {
                Ok(Ok(c)) => c,
                _ => {
                    backlog.add(&id, t);
                    break;
                }
            };
            match tokio::time::timeout(timeout, write_tally(&client, &id, &t)).await {
                Ok(Ok(())) => written += 1,
                Ok(Err(e)) => tracing::warn!(session = %id, error = %e, "could not write usage kept meanwhile"),
                Err(_) => tracing::warn!(session = %id, "could not write usage kept meanwhile: no answer in time"),
            }
        }
        for (id, t) in left {
            backlog.add(&id, t);
        }
        if written > 0 && backlog.len() == 0 {
            tracing::info!(sessions = written, "the database is back: usage counted meanwhile is written");
        }
    }
}

impl PgStore {
    /// Connect to `url` and bring its schema up to date.
    pub async fn connect(url: &str, opts: &OpenOptions) -> Result<Self> {
        let mut cfg: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Config(format!("--database is not a valid PostgreSQL URL: {e}")))?;
        if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(StoreError::Config(
                "--database asks for sslmode=require, but kiln does not speak TLS to PostgreSQL yet: reach it over a \
                 private network or a Unix socket (sslmode=disable or prefer)"
                    .into(),
            ));
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(opts.timeout);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name(format!("kiln {}", opts.node_id));
        }
        // Notice a peer that vanished without closing the connection.
        cfg.keepalives(true).keepalives_idle(Duration::from_secs(10));
        let manager = Manager::from_config(cfg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(opts.timeout))
            .create_timeout(Some(opts.timeout))
            .recycle_timeout(Some(opts.timeout))
            .build()
            .map_err(|e| StoreError::Config(format!("could not set up the PostgreSQL pool: {e}")))?;
        let backlog = Arc::new(Backlog::default());
        let store = PgStore { pool, node_id: opts.node_id.clone(), timeout: opts.timeout, backlog };
        store.migrate().await?;
        tokio::spawn(flush_backlog(store.pool.clone(), Arc::downgrade(&store.backlog), store.timeout));
        Ok(store)
    }

    /// Apply the migrations the database lacks, each in its own transaction
    /// that first takes the migration lock and then reads the version.
    async fn migrate(&self) -> Result<()> {
        let what = "migrate";
        let mut client = self.bounded(what, async { self.pool.get().await.map_err(pool_err(what)) }).await?;
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
            // Migrations may take longer than one query; the lock wait and
            // the DDL are bounded by a generous multiple of the time limit.
            let step = async {
                let tx = client.transaction().await.map_err(pg(what))?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg(what))?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS kiln_migrations (
                         version     BIGINT PRIMARY KEY,
                         applied_at  TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .await
                .map_err(pg(what))?;
                let newest: Option<i64> =
                    tx.query_one("SELECT max(version) FROM kiln_migrations", &[]).await.map_err(pg(what))?.get(0);
                let newest = newest.unwrap_or(0);
                if usize::try_from(newest).unwrap_or(usize::MAX) > MIGRATIONS.len() {
                    return Err(StoreError::Config(format!(
                        "the database's schema is version {newest}, newer than this kiln knows ({}): upgrade kiln",
                        MIGRATIONS.len()
                    )));
                }
                if newest < version {
                    tx.batch_execute(sql).await.map_err(pg(what))?;
                    tx.execute("INSERT INTO kiln_migrations (version) VALUES ($1)", &[&version])
                        .await
                        .map_err(pg(what))?;
                }
                tx.commit().await.map_err(pg(what))
            };
            match tokio::time::timeout(self.timeout * 12, step).await {
                Ok(r) => r?,
                Err(_) => return Err(timed_out(what, self.timeout * 12)),
            }
        }
        Ok(())
    }

    /// Run one store call within the time limit; past it the call is
    /// abandoned (its connection stays usable: tokio-postgres discards the
    /// late answer) and reported as unavailable.
    async fn bounded<T>(&self, what: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(what, self.timeout)),
        }
    }

    /// Run one statement on a pooled connection, within the time limit.
    async fn execute(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        self.bounded(what, async {
            let client = self.pool.get().await.map_err(pool_err(what))?;
            let stmt = client.prepare_cached(sql).await.map_err(pg(what))?;
            client.execute(&stmt, params).await.map_err(pg(what))
        })
        .await
    }

    /// Run one query on a pooled connection, within the time limit.
    async fn query(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        self.bounded(what, async {
            let client = self.pool.get().await.map_err(pool_err(what))?;
            let stmt = client.prepare_cached(sql).await.map_err(pg(what))?;
            client.query(&stmt, params).await.map_err(pg(what))
        })
        .await
    }
}

impl PgStore {
    /// Add a tally to a session now, or, when no connection can be had
    /// (so nothing reached the database), to the backlog.
    async fn record(&self, id: &str, t: Tally) -> Result<()> {
        let what = "record usage";
        let client = match self.bounded(what, async { self.pool.get().await.map_err(pool_err(what)) }).await {
            Ok(c) => c,
            Err(e) if e.is_unavailable() => {
                if self.backlog.add(id, t) {
                    tracing::warn!(error = %e, "usage is kept in memory until the database is back");
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.bounded(what, write_tally(&client, id, &t)).await
    }
}

fn timed_out(what: &'static str, limit: Duration) -> StoreError {
    StoreError::Unavailable { what, detail: format!("no answer from PostgreSQL within {limit:?}") }
}

/// Classify a PostgreSQL error. Retryable conditions (the server shutting
/// down or starting, a lost connection, too many connections, a standby that
/// refuses writes, a cancelled statement) are "unavailable"; integrity
/// violations are constraints; the rest are failed queries.
fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |e| {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let detail = format!("{code}: {}", db.message());
            return if code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "57014"
                || code == "25006"
            {
                StoreError::Unavailable { what, detail }
            } else if code.starts_with("23") {
                StoreError::Constraint { what, detail }
            } else {
                StoreError::Query { what, detail }
            };
        }
        let mut detail = e.to_string();
        let mut io = false;
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            io |= s.is::<std::io::Error>();
            detail.push_str(&format!(": {s}"));
            source = s.source();
        }
        if e.is_closed() || io {
            StoreError::Unavailable { what, detail }
        } else {
            StoreError::Query { what, detail }
        }
    }
}

fn pool_err(what: &'static str) -> impl Fn(PoolError) -> StoreError {
    move |e| match e {
        PoolError::Backend(e) => match pg(what)(e) {
            // Connecting failed for a reason the server gave (a wrong
            // password, a missing database): not worth retrying, but the
            // request still failed for lack of a database.
            StoreError::Query { detail, .. } => StoreError::Unavailable { what, detail },
            other => other,
        },
        other => StoreError::Unavailable { what, detail: other.to_string() },
    }
}

const KEY_COLS: &str =
    "id, hash, origin, label, created_at, max_sessions, network, revoked_at, admin, max_executions_per_key";

fn key_row(what: &'static str, r: &Row) -> Result<KeyRecord> {
    let get = |e: tokio_postgres::Error| StoreError::Query { what, detail: e.to_string() };
    let id: String = r.try_get(0).map_err(get)?;
    Ok(KeyRecord {
        hash: parse_hash(what, &id, r.try_get(1).map_err(get)?)?,
        origin: parse_origin(what, &id, r.try_get(2).map_err(get)?)?,
        label: r.try_get(3).map_err(get)?,
        created_at: r.try_get(4).map_err(get)?,
        options: KeyOptions {
            max_sessions: r.try_get::<_, Option<i64>>(5).map_err(get)?.map(to_u64),
            max_executions_per_key: r.try_get::<_, Option<i64>>(9).map_err(get)?.map(to_u64),
            network: parse_network(what, &id, r.try_get(6).map_err(get)?)?,
            admin: r.try_get(8).map_err(get)?,
        },
        revoked_at: r.try_get(7).map_err(get)?,
        id,
    })
}

const SESSION_COLS: &str =
    "id, key_id, started_at, expires_at, execute_count, last_execute_at, ended_at, incarnation, lost";

fn session_row(what: &'static str, r: &Row) -> Result<SessionRecord> {
    let get = |e: tokio_postgres::Error| StoreError::Query { what, detail: e.to_string() };
    Ok(SessionRecord {
        id: r.try_get(0).map_err(get)?,
        key_id: r.try_get(1).map_err(get)?,
        started_at: r.try_get(2).map_err(get)?,
        expires_at: r.try_get(3).map_err(get)?,
        execute_count: to_u64(r.try_get(4).map_err(get)?),
        last_execute_at: r.try_get(5).map_err(get)?,
        ended_at: r.try_get(6).map_err(get)?,
        incarnation: r.try_get(7).map_err(get)?,
        lost: r.try_get(8).map_err(get)?,
    })
}

const USAGE_SQL: &str = "SELECT key_id, COUNT(*)::BIGINT, COALESCE(SUM(execute_count), 0)::BIGINT,
     COALESCE(SUM(execution_seconds), 0)::DOUBLE PRECISION, COALESCE(SUM(cpu_seconds), 0)::DOUBLE PRECISION,
     COALESCE(MAX(peak_memory_bytes), 0)::BIGINT FROM sessions";

fn usage_row(what: &'static str, r: &Row) -> Result<Usage> {
    let get = |e: tokio_postgres::Error| StoreError::Query { what, detail: e.to_string() };
    Ok(Usage {
        key_id: r.try_get(0).map_err(get)?,
        sessions_started: to_u64(r.try_get(1).map_err(get)?),
        executions: to_u64(r.try_get(2).map_err(get)?),
        execution_seconds: r.try_get(3).map_err(get)?,
        cpu_seconds: r.try_get(4).map_err(get)?,
        peak_memory_bytes: to_u64(r.try_get(5).map_err(get)?),
    })
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>> {
        let what = "list keys";
        let rows = self.query(what, &format!("SELECT {KEY_COLS} FROM api_keys ORDER BY created_at, id"), &[]).await?;
        rows.iter().map(|r| key_row(what, r)).collect()
    }

    async fn keys_version(&self) -> Result<u64> {
        let what = "keys version";
        let rows = self.query(what, "SELECT value FROM kiln_counters WHERE name = 'keys'", &[]).await?;
        let row = rows.first().ok_or(StoreError::Invalid { what, detail: "no keys counter".into() })?;
        row.try_get::<_, i64>(0).map(to_u64).map_err(|e| StoreError::Query { what, detail: e.to_string() })
    }

    async fn add_key(&self, hash: [u8; 32], origin: KeyOrigin, label: &str, options: &KeyOptions) -> Result<KeyRecord> {
        let what = "add key";
        let id = key_id(&hash);
        let max_sessions = options.max_sessions.map(to_i64);
        let max_executions = options.max_executions_per_key.map(to_i64);
        let network = options.network.map(|n| n.stored_name());
        let hash_bytes = hash.as_slice();
        // Insert-or-keep; a concurrent insert of the same key by another
        // node is the "keep" case, not an error. No conflict target: the
        // key's id and hash are both unique, and a race is caught by
        // whichever index PostgreSQL checks first (with `(hash)` as the
        // only arbiter, nodes starting at once failed on the primary key).
        self.execute(
            what,
            "INSERT INTO api_keys (id, hash, origin, label, created_at, max_sessions, network, admin,
                                   max_executions_per_key)
             VALUES ($1, $2, $3, $4, now(), $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            &[&id, &hash_bytes, &origin.as_str(), &label, &max_sessions, &network, &options.admin, &max_executions],
        )
        .await?;
        let rows =
            self.query(what, &format!("SELECT {KEY_COLS} FROM api_keys WHERE hash = $1"), &[&hash_bytes]).await?;
        let row = rows.first().ok_or(StoreError::Query { what, detail: "the key vanished after its insert".into() })?;
        key_row(what, row)
    }

    async fn revoke_key(&self, id: &str) -> Result<bool> {
        let what = "revoke key";
        let n = self
            .execute(what, "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", &[&id])
            .await?;
        if n > 0 {
            return Ok(true);
        }
        Ok(!self.query(what, "SELECT 1 FROM api_keys WHERE id = $1", &[&id]).await?.is_empty())
    }

    async fn insert_session(&self, s: &SessionRecord) -> Result<()> {
        self.execute(
            "insert session",
            INSERT_SESSION,
            &[
                &s.id,
                &s.key_id,
                &self.node_id,
                &s.incarnation,
                &s.started_at,
                &s.expires_at,
                &to_i64(s.execute_count),
                &s.last_execute_at,
                &s.ended_at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn insert_session_within(&self, s: &SessionRecord, key_limit: u64) -> Result<bool> {
        let what = "insert session";
        self.bounded(what, async {
            let mut client = self.pool.get().await.map_err(pool_err(what))?;
            let tx = client.transaction().await.map_err(pg(what))?;
            // Creates of one key serialize on its lock (held to the commit);
            // other keys' do not wait.
            tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&KEY_LOCK_SPACE, &s.key_id])
                .await
                .map_err(pg(what))?;
            let count = tx
                .prepare_cached(&format!("SELECT COUNT(*) FROM sessions s WHERE s.key_id = $1 AND {LIVE}"))
                .await
                .map_err(pg(what))?;
            let live: i64 = tx.query_one(&count, &[&s.key_id, &Utc::now()]).await.map_err(pg(what))?.get(0);
            if to_u64(live) >= key_limit {
                return Ok(false);
            }
            let insert = tx.prepare_cached(INSERT_SESSION).await.map_err(pg(what))?;
            tx.execute(
                &insert,
                &[
                    &s.id,
                    &s.key_id,
                    &self.node_id,
                    &s.incarnation,
                    &s.started_at,
                    &s.expires_at,
                    &to_i64(s.execute_count),
                    &s.last_execute_at,
                    &s.ended_at,
                ],
            )
            .await
            .map_err(pg(what))?;
            tx.commit().await.map_err(pg(what))?;
            Ok(true)
        })
        .await
    }

    async fn put_node(&self, n: &NodeRecord) -> Result<()> {
        self.execute(
            "register node",
            &format!(
                "INSERT INTO nodes ({NODE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (id) DO UPDATE SET tag = EXCLUDED.tag, incarnation = EXCLUDED.incarnation,
                 advertise = EXCLUDED.advertise, lease_expires_at = EXCLUDED.lease_expires_at,
                 draining = EXCLUDED.draining, ready_kernels = EXCLUDED.ready_kernels,
                 live_sessions = EXCLUDED.live_sessions, max_sessions = EXCLUDED.max_sessions,
                 memory_available_bytes = EXCLUDED.memory_available_bytes"
            ),
            &[
                &n.id,
                &n.tag,
                &n.incarnation,
                &n.advertise,
                &n.lease_expires_at,
                &n.draining,
                &to_i64(n.capacity.ready_kernels),
                &to_i64(n.capacity.live_sessions),
                &to_i64(n.capacity.max_sessions),
                &to_i64(n.capacity.memory_available_bytes),
            ],
        )
        .await?;
        Ok(())
    }

    async fn renew_node(&self, n: &NodeRecord) -> Result<bool> {
        let changed = self
            .execute(
                "renew node lease",
                "UPDATE nodes SET lease_expires_at = $3, draining = $4, ready_kernels = $5, live_sessions = $6,
                 max_sessions = $7, memory_available_bytes = $8, advertise = $9 WHERE id = $1 AND incarnation = $2",
                &[
                    &n.id,
                    &n.incarnation,
                    &n.lease_expires_at,
                    &n.draining,
                    &to_i64(n.capacity.ready_kernels),
                    &to_i64(n.capacity.live_sessions),
                    &to_i64(n.capacity.max_sessions),
                    &to_i64(n.capacity.memory_available_bytes),
                    &n.advertise,
                ],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let what = "list nodes";
        let rows = self.query(what, &format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"), &[]).await?;
        rows.iter().map(|r| node_row(what, r)).collect()
    }

    async fn record_execute(&self, id: &str, at: DateTime<Utc>) -> Result<()> {
        self.record(id, Tally::execute(at)).await
    }

    async fn record_usage(&self, id: &str, u: ExecutionUsage) -> Result<()> {
        self.record(id, Tally::usage(u)).await
    }

    async fn usage(&self, key_id: &str) -> Result<Usage> {
        let what = "usage";
        let rows = self.query(what, &format!("{USAGE_SQL} WHERE key_id = $1 GROUP BY key_id"), &[&key_id]).await?;
        match rows.first() {
            Some(r) => usage_row(what, r),
            None => Ok(Usage { key_id: key_id.to_string(), ..Usage::default() }),
        }
    }

    async fn usage_all(&self) -> Result<Vec<Usage>> {
        let what = "usage";
        let rows = self.query(what, &format!("{USAGE_SQL} GROUP BY key_id ORDER BY key_id"), &[]).await?;
        rows.iter().map(|r| usage_row(what, r)).collect()
    }

    async fn end_session(&self, id: &str, at: DateTime<Utc>) -> Result<()> {
        self.execute(
            "end session",
            "UPDATE sessions SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL",
            &[&id, &at],
        )
        .await?;
        Ok(())
    }

    async fn session(&self, id: &str) -> Result<Option<SessionRecord>> {
        let what = "get session";
        let rows = self.query(what, &format!("SELECT {SESSION_COLS} FROM sessions WHERE id = $1"), &[&id]).await?;
        rows.first().map(|r| session_row(what, r)).transpose()
    }

    async fn live_sessions(&self, key_id: &str, now: DateTime<Utc>) -> Result<Vec<SessionRecord>> {
        let what = "list sessions";
        let rows = self
            .query(
                what,
                &format!(
                    "SELECT {SESSION_COLS} FROM sessions s WHERE s.key_id = $1 AND {LIVE}
                     ORDER BY s.started_at, s.id"
                ),
                &[&key_id, &now],
            )
            .await?;
        rows.iter().map(|r| session_row(what, r)).collect()
    }

    async fn end_all_open(&self, at: DateTime<Utc>) -> Result<u64> {
        self.execute(
            "end open sessions",
            "UPDATE sessions SET ended_at = $1, lost = TRUE WHERE ended_at IS NULL AND (node_id = $2 OR node_id IS NULL)",
            &[&at, &self.node_id],
        )
        .await
    }
}
