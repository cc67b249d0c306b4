//! One store test suite, run against both backends: the embedded SQLite
//! file and a real PostgreSQL server that each test starts for itself
//! (kiln-testpg). Each test is written once against `&dyn Store` and
//! instantiated twice by `suite!`; what differs (raw SQL access to break a
//! rule on purpose) sits behind the small `Backend` trait.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{Duration, Utc};
use kiln_store::{
    Capacity, Database, ExecutionUsage, KeyOptions, KeyOrigin, NetworkPolicy, NodeRecord, OpenOptions, SessionRecord,
    Store, StoreError,
};
use std::sync::Arc;

/// What a test needs from a backend beyond the `Store` trait.
#[async_trait::async_trait]
trait Backend: Send + Sync {
    /// The database.
    fn database(&self) -> Database;
    /// Open a store on it for `node`.
    async fn open(&self, node: &str) -> Arc<dyn Store> {
        kiln_store::open(&self.database(), &OpenOptions::new(node)).await.unwrap_or_else(|e| panic!("open: {e}"))
    }
    /// Run SQL directly (as an operator or another program would).
    fn sql(&self, sql: &str) -> Result<(), String>;
    /// Run SQL with the CHECK constraints of `api_keys` out of the way.
    fn sql_unchecked(&self, sql: &str);
    /// Take the schema back to before keys had their own execution limit
    /// (undo the newest migration), as the previous release left it.
    fn to_schema_before_execution_limits(&self);
}

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Sqlite { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("kiln.db")
    }
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    fn database(&self) -> Database {
        Database::Sqlite(self.path())
    }
    fn sql(&self, sql: &str) -> Result<(), String> {
        let conn = rusqlite::Connection::open(self.path()).unwrap();
        conn.execute_batch(sql).map_err(|e| e.to_string())
    }
    fn sql_unchecked(&self, sql: &str) {
        let conn = rusqlite::Connection::open(self.path()).unwrap();
        conn.pragma_update(None, "ignore_check_constraints", true).unwrap();
        conn.execute_batch(sql).unwrap();
    }
    fn to_schema_before_execution_limits(&self) {
        self.sql("ALTER TABLE api_keys DROP COLUMN max_executions_per_key; PRAGMA user_version = 6;").unwrap();
    }
}

struct Postgres {
    pg: kiln_testpg::PgServer,
}

impl Postgres {
    fn new() -> Self {
        Postgres { pg: kiln_testpg::PgServer::start() }
    }
}

#[async_trait::async_trait]
impl Backend for Postgres {
    fn database(&self) -> Database {
        Database::Postgres(self.pg.url())
    }
    fn sql(&self, sql: &str) -> Result<(), String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.pg.psql(sql)))
            .map(drop)
            .map_err(|e| e.downcast_ref::<String>().cloned().unwrap_or_else(|| "psql failed".into()))
    }
    fn sql_unchecked(&self, sql: &str) {
        self.pg.psql(&format!(
            "ALTER TABLE api_keys DROP CONSTRAINT api_keys_network_check, DROP CONSTRAINT api_keys_origin_check; {sql}"
        ));
    }
    fn to_schema_before_execution_limits(&self) {
        self.sql(
            "ALTER TABLE api_keys DROP COLUMN max_executions_per_key; DELETE FROM kiln_migrations WHERE version = 3;",
        )
        .unwrap();
    }
}

fn session(id: &str, key: &str, ttl_secs: i64) -> SessionRecord {
    let now = Utc::now();
    SessionRecord {
        id: id.into(),
        key_id: key.into(),
        started_at: now,
        expires_at: now + Duration::seconds(ttl_secs),
        execute_count: 0,
        last_execute_at: None,
        ended_at: None,
        incarnation: None,
        lost: false,
    }
}

async fn adding_the_same_key_twice_keeps_one_record(b: &dyn Backend) {
    let s = b.open("n1").await;
    let opts = KeyOptions {
        max_sessions: Some(3),
        max_executions_per_key: Some(2),
        network: Some(NetworkPolicy::None),
        admin: true,
    };
    let a = s.add_key([7; 32], KeyOrigin::Created, "flag", &opts).await.unwrap();
    let again = s.add_key([7; 32], KeyOrigin::Configured, "other", &KeyOptions::default()).await.unwrap();
    assert_eq!(a, again, "the first record stays");
    let keys = s.keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!((keys[0].origin, keys[0].label.as_str(), &keys[0].options), (KeyOrigin::Created, "flag", &opts));
    assert!(s.revoke_key(&a.id).await.unwrap());
    assert!(s.revoke_key(&a.id).await.unwrap(), "revoking twice still finds the key");
    assert!(!s.revoke_key("key_nope").await.unwrap());
    assert!(s.keys().await.unwrap()[0].revoked_at.is_some());
}

/// Nodes starting at once with the same configured key (a DaemonSet's
/// pods, one bootstrap Secret) each add it: every add succeeds and one
/// record stays, whichever of the key's unique columns the race hits.
async fn the_same_key_added_by_nodes_at_once_keeps_one_record(b: &dyn Backend) {
    let mut stores = Vec::new();
    for i in 0..8 {
        stores.push(b.open(&format!("n{i}")).await);
    }
    for round in 0..100u8 {
        let barrier = Arc::new(tokio::sync::Barrier::new(stores.len()));
        let adds: Vec<_> = stores
            .iter()
            .map(|s| {
                let (s, barrier) = (s.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.add_key([round; 32], KeyOrigin::Configured, "configured", &KeyOptions::default()).await
                })
            })
            .collect();
        let mut ids = Vec::new();
        for a in adds {
            ids.push(a.await.unwrap().unwrap_or_else(|e| panic!("round {round}: a concurrent add failed: {e}")).id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "round {round}: one record for one key");
    }
    assert_eq!(stores[0].keys().await.unwrap().len(), 100);
}

async fn every_network_policy_and_origin_round_trips_typed(b: &dyn Backend) {
    let s = b.open("n1").await;
    for (i, (origin, network)) in KeyOrigin::ALL
        .into_iter()
        .flat_map(|o| {
            [None, Some(NetworkPolicy::None), Some(NetworkPolicy::Registries), Some(NetworkPolicy::Full)]
                .map(|n| (o, n))
        })
        .enumerate()
    {
        // A label that looks like an origin is only a name.
        let opts = KeyOptions { max_sessions: None, max_executions_per_key: None, network, admin: i % 2 == 0 };
        let rec = s.add_key([i as u8; 32], origin, "configured", &opts).await.unwrap();
        assert_eq!((rec.origin, rec.options.network, rec.options.admin), (origin, network, i % 2 == 0));
    }
    let keys = s.keys().await.unwrap();
    assert_eq!(keys.len(), 12);
    let created_as_configured = keys.iter().filter(|k| k.origin == KeyOrigin::Created).count();
    assert_eq!(created_as_configured, 4, "the label `configured` did not make a key configured");
}

async fn a_policy_the_store_cannot_read_is_an_error_not_the_server_default(b: &dyn Backend) {
    let s = b.open("n1").await;
    let rec = s.add_key([1; 32], KeyOrigin::Created, "k", &KeyOptions::default()).await.unwrap();
    let id = &rec.id;
    let refused = b.sql(&format!("UPDATE api_keys SET network = 'everything' WHERE id = '{id}'"));
    assert!(refused.is_err_and(|e| e.contains("check") || e.contains("CHECK")), "the CHECK constraint holds");
    let refused = b.sql(&format!("UPDATE api_keys SET origin = 'magic' WHERE id = '{id}'"));
    assert!(refused.is_err(), "origins are checked too");
    // Past the constraint (an old schema, a manual edit): reading fails.
    b.sql_unchecked(&format!("UPDATE api_keys SET network = 'everything' WHERE id = '{id}'"));
    match s.keys().await {
        Err(StoreError::Invalid { detail, .. }) => assert!(detail.contains("everything"), "{detail}"),
        other => panic!("an unreadable policy must be an error, got {other:?}"),
    }
}

async fn a_key_s_own_execution_limit_is_kept_and_keys_from_before_it_existed_have_none(b: &dyn Backend) {
    let s = b.open("n1").await;
    let limited = KeyOptions { max_executions_per_key: Some(7), ..KeyOptions::default() };
    let rec = s.add_key([1; 32], KeyOrigin::Created, "limited", &limited).await.unwrap();
    assert_eq!(rec.options.max_executions_per_key, Some(7));
    assert_eq!(s.keys().await.unwrap()[0].options, limited);
    // The store refuses a limit of 0 from any writer.
    let zero = "UPDATE api_keys SET max_executions_per_key = 0";
    assert!(b.sql(zero).is_err(), "a limit of 0 was stored");
    for i in 2..5u8 {
        let opts = KeyOptions { max_sessions: Some(u64::from(i)), ..KeyOptions::default() };
        s.add_key([i; 32], KeyOrigin::Created, "older", &opts).await.unwrap();
    }
    drop(s);
    // As the previous release would have left it: no column, so no key
    // has a limit of its own (the first key's is gone with the column).
    b.to_schema_before_execution_limits();
    // Opened by this release: migrated, every key kept, none with a limit
    // of its own; new keys get theirs.
    let s = b.open("n2").await;
    let keys = s.keys().await.unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(keys.iter().all(|k| k.options.max_executions_per_key.is_none()), "{keys:?}");
    assert_eq!(keys.iter().filter_map(|k| k.options.max_sessions).collect::<Vec<_>>(), vec![2, 3, 4]);
    let new = s.add_key([9; 32], KeyOrigin::Created, "new", &limited).await.unwrap();
    assert_eq!(new.options.max_executions_per_key, Some(7));
    drop(s);
    // Opening again applies nothing twice.
    assert_eq!(b.open("n3").await.keys().await.unwrap().len(), 5);
}

async fn sessions_are_listed_per_key_until_they_end_or_expire(b: &dyn Backend) {
    let s = b.open("n1").await;
    // Both backends keep microseconds.
    let now = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    for r in [session("a", "k1", 60), session("b", "k1", 60), session("c", "k2", 60), session("d", "k1", -1)] {
        s.insert_session(&r).await.unwrap();
    }
    s.record_execute("a", now).await.unwrap();
    s.record_execute("a", now).await.unwrap();
    s.end_session("b", now).await.unwrap();
    let live = s.live_sessions("k1", Utc::now()).await.unwrap();
    assert_eq!(live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["a"]);
    assert_eq!(live[0].execute_count, 2);
    assert_eq!(live[0].last_execute_at, Some(now));
    let u = ExecutionUsage { seconds: 1.5, cpu_seconds: 0.5, peak_memory_bytes: 100 };
    s.record_usage("a", u).await.unwrap();
    s.record_usage("a", ExecutionUsage { peak_memory_bytes: 50, ..u }).await.unwrap();
    let usage = s.usage("k1").await.unwrap();
    assert_eq!((usage.sessions_started, usage.executions, usage.peak_memory_bytes), (3, 2, 100));
    assert!((usage.execution_seconds - 3.0).abs() < 1e-9 && (usage.cpu_seconds - 1.0).abs() < 1e-9);
    assert_eq!(s.usage("nobody").await.unwrap().sessions_started, 0);
    assert_eq!(s.usage_all().await.unwrap().len(), 2);
    let b_rec = s.session("b").await.unwrap().unwrap();
    assert!(b_rec.ended_at.is_some() && !b_rec.is_live(Utc::now()));
    assert_eq!(s.session("zzz").await.unwrap(), None);
    // a, c and d (expired but never torn down); b had ended.
    assert_eq!(s.end_all_open(now).await.unwrap(), 3);
}

async fn a_restarting_node_ends_only_its_own_sessions(b: &dyn Backend) {
    let (n1, n2) = (b.open("node-1").await, b.open("node-2").await);
    assert_eq!((n1.node_id(), n2.node_id()), ("node-1", "node-2"));
    n1.insert_session(&session("one", "k", 60)).await.unwrap();
    n2.insert_session(&session("two", "k", 60)).await.unwrap();
    // node-1 restarts.
    let n1 = b.open("node-1").await;
    assert_eq!(n1.end_all_open(Utc::now()).await.unwrap(), 1);
    let live = n2.live_sessions("k", Utc::now()).await.unwrap();
    assert_eq!(live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["two"], "node-2's session lives on");
    // The ended one is marked lost, unlike one that was ended normally.
    assert!(n1.session("one").await.unwrap().unwrap().lost);
    n2.end_session("two", Utc::now()).await.unwrap();
    assert!(!n2.session("two").await.unwrap().unwrap().lost);
}

async fn usage_adds_up_across_nodes_writing_at_once(b: &dyn Backend) {
    let nodes = [b.open("node-1").await, b.open("node-2").await, b.open("node-3").await];
    nodes[0].insert_session(&session("shared", "k", 60)).await.unwrap();
    nodes[1].insert_session(&session("other", "k", 60)).await.unwrap();
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for _ in 0..50 {
            let node = node.clone();
            let id = if i == 1 { "other" } else { "shared" };
            tasks.push(tokio::spawn(async move {
                node.record_execute(id, Utc::now()).await.unwrap();
                let u = ExecutionUsage { seconds: 0.25, cpu_seconds: 0.125, peak_memory_bytes: 10 * (i as u64 + 1) };
                node.record_usage(id, u).await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let u = nodes[2].usage("k").await.unwrap();
    assert_eq!((u.sessions_started, u.executions, u.peak_memory_bytes), (2, 150, 30));
    assert!((u.execution_seconds - 37.5).abs() < 1e-9 && (u.cpu_seconds - 18.75).abs() < 1e-9, "{u:?}");
    assert_eq!(nodes[0].session("shared").await.unwrap().unwrap().execute_count, 100);
}

async fn the_keys_version_changes_with_keys_and_only_with_keys(b: &dyn Backend) {
    let (s, other) = (b.open("n1").await, b.open("n2").await);
    let v0 = s.keys_version().await.unwrap();
    s.insert_session(&session("a", "k", 60)).await.unwrap();
    s.record_execute("a", Utc::now()).await.unwrap();
    assert_eq!(s.keys_version().await.unwrap(), v0, "sessions do not touch it");
    let rec = other.add_key([2; 32], KeyOrigin::Created, "", &KeyOptions::default()).await.unwrap();
    let v1 = s.keys_version().await.unwrap();
    assert!(v1 > v0, "another node's new key shows");
    other.add_key([2; 32], KeyOrigin::Created, "", &KeyOptions::default()).await.unwrap();
    assert_eq!(s.keys_version().await.unwrap(), v1, "an existing key added again changes nothing");
    other.revoke_key(&rec.id).await.unwrap();
    assert!(s.keys_version().await.unwrap() > v1, "a revocation shows");
}

async fn a_duplicate_session_is_a_constraint_error(b: &dyn Backend) {
    let s = b.open("n1").await;
    s.insert_session(&session("a", "k", 60)).await.unwrap();
    match s.insert_session(&session("a", "k", 60)).await {
        Err(e @ StoreError::Constraint { .. }) => assert!(!e.is_unavailable()),
        other => panic!("expected a constraint error, got {other:?}"),
    }
}

async fn nodes_opening_a_new_database_at_once_migrate_it_once(b: &dyn Backend) {
    let db = b.database();
    let opens: Vec<_> = (0..8)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move { kiln_store::open(&db, &OpenOptions::new(format!("node-{i}"))).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().unwrap_or_else(|e| panic!("a concurrent open failed: {e}")));
    }
    stores[0].add_key([3; 32], KeyOrigin::Generated, "", &KeyOptions::default()).await.unwrap();
    assert_eq!(stores[7].keys().await.unwrap().len(), 1);
    // And again, on the migrated database.
    assert_eq!(b.open("late").await.keys().await.unwrap().len(), 1);
}

fn node(id: &str, tag: &str, incarnation: &str, lease_secs: i64) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        tag: tag.into(),
        incarnation: incarnation.into(),
        advertise: Some(format!("http://{id}:8787")),
        // Both backends keep microseconds.
        lease_expires_at: chrono::DateTime::from_timestamp_micros(
            (Utc::now() + Duration::seconds(lease_secs)).timestamp_micros(),
        )
        .unwrap(),
        draining: false,
        capacity: Capacity { ready_kernels: 2, live_sessions: 1, max_sessions: 8, memory_available_bytes: 1 << 30 },
    }
}

async fn a_lease_is_renewed_only_by_its_own_incarnation(b: &dyn Backend) {
    let s = b.open("node-a").await;
    let first = node("node-a", "aaaa", "inc001", 6);
    s.put_node(&first).await.unwrap();
    let mut renewed = first.clone();
    renewed.draining = true;
    renewed.capacity.live_sessions = 5;
    assert!(s.renew_node(&renewed).await.unwrap());
    assert_eq!(s.nodes().await.unwrap(), vec![renewed.clone()]);
    // The node restarts: a new incarnation takes the row; the old one can
    // no longer renew it.
    let second = node("node-a", "aaaa", "inc002", 6);
    s.put_node(&second).await.unwrap();
    assert!(!s.renew_node(&renewed).await.unwrap());
    assert_eq!(s.nodes().await.unwrap(), vec![second]);
    // Another node may not take a tag that is in use.
    let clash = s.put_node(&node("node-b", "aaaa", "inc003", 6)).await;
    assert!(matches!(clash, Err(StoreError::Constraint { .. })), "{clash:?}");
}

async fn sessions_of_a_lost_incarnation_are_not_live_and_do_not_count(b: &dyn Backend) {
    let a = b.open("node-a").await;
    let nb = b.open("node-b").await;
    a.put_node(&node("node-a", "aaaa", "a1", 6)).await.unwrap();
    nb.put_node(&node("node-b", "bbbb", "b1", 6)).await.unwrap();
    let mine = |id: &str, inc: &str| SessionRecord { incarnation: Some(inc.into()), ..session(id, "key_1", 60) };
    assert!(a.insert_session_within(&mine("ses_a1", "a1"), 2).await.unwrap());
    assert!(nb.insert_session_within(&mine("ses_b1", "b1"), 2).await.unwrap());
    // The limit counts both nodes' sessions.
    assert!(!a.insert_session_within(&mine("ses_a2", "a1"), 2).await.unwrap());
    assert!(a.session("ses_a2").await.unwrap().is_none(), "nothing inserted at the limit");
    // node-b restarts (new incarnation): its old session is lost, not live,
    // and no longer counts.
    nb.put_node(&node("node-b", "bbbb", "b2", 6)).await.unwrap();
    let live: Vec<String> = a.live_sessions("key_1", Utc::now()).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(live, vec!["ses_a1".to_string()]);
    assert!(a.insert_session_within(&mine("ses_a2", "a1"), 2).await.unwrap());
    // node-a's lease runs out: its sessions are lost too.
    let mut expired = node("node-a", "aaaa", "a1", -1);
    expired.capacity = Capacity::default();
    assert!(a.renew_node(&expired).await.unwrap());
    assert!(a.live_sessions("key_1", Utc::now()).await.unwrap().is_empty());
    // A concurrent burst of creates on two nodes never overshoots.
    a.put_node(&node("node-a", "aaaa", "a3", 6)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (store, inc) = if i % 2 == 0 { (a.clone(), "a3") } else { (nb.clone(), "b2") };
        let rec = mine(&format!("ses_burst{i}"), inc);
        tasks.push(tokio::spawn(async move { store.insert_session_within(&rec, 3).await.unwrap() }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 3);
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                super::$name(&super::Sqlite::new()).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                super::$name(&super::Postgres::new()).await
            })*
        }
    };
}

suite!(
    adding_the_same_key_twice_keeps_one_record,
    the_same_key_added_by_nodes_at_once_keeps_one_record,
    every_network_policy_and_origin_round_trips_typed,
    a_key_s_own_execution_limit_is_kept_and_keys_from_before_it_existed_have_none,
    a_policy_the_store_cannot_read_is_an_error_not_the_server_default,
    sessions_are_listed_per_key_until_they_end_or_expire,
    a_restarting_node_ends_only_its_own_sessions,
    usage_adds_up_across_nodes_writing_at_once,
    the_keys_version_changes_with_keys_and_only_with_keys,
    a_duplicate_session_is_a_constraint_error,
    nodes_opening_a_new_database_at_once_migrate_it_once,
    a_lease_is_renewed_only_by_its_own_incarnation,
    sessions_of_a_lost_incarnation_are_not_live_and_do_not_count,
);
