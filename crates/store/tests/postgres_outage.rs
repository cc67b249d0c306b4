//! PostgreSQL only: what the store does while its database is restarting or
//! hanging. Calls fail as `Unavailable` (never a hang past the store's time
//! limit, never a "query failed"), and the same store works again once the
//! database is back, without being reopened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use kiln_store::{Database, ExecutionUsage, KeyOptions, KeyOrigin, OpenOptions, SessionRecord, StoreError};
use std::time::{Duration, Instant};

fn opts(timeout: Duration) -> OpenOptions {
    OpenOptions { timeout, ..OpenOptions::new("node-1") }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_is_unavailable_meanwhile_and_the_same_store_recovers() {
    let mut pg = kiln_testpg::PgServer::start();
    eprintln!("postgres started in {:?}", pg.started_in());
    let limit = Duration::from_secs(2);
    let s = kiln_store::open(&Database::Postgres(pg.url()), &opts(limit)).await.unwrap();
    s.add_key([1; 32], KeyOrigin::Created, "", &KeyOptions::default()).await.unwrap();
    pg.stop();
    for _ in 0..3 {
        let began = Instant::now();
        match s.keys().await {
            Err(e @ StoreError::Unavailable { .. }) => assert!(e.is_unavailable()),
            other => panic!("a stopped database must be unavailable, got {other:?}"),
        }
        assert!(began.elapsed() < limit + Duration::from_secs(1), "took {:?}", began.elapsed());
    }
    pg.start_again();
    // The pool drops the dead connections and makes new ones.
    assert_eq!(s.keys().await.unwrap().len(), 1);
    let now = Utc::now();
    let rec = SessionRecord {
        id: "s".into(),
        key_id: "k".into(),
        started_at: now,
        expires_at: now + chrono::Duration::seconds(60),
        execute_count: 0,
        last_execute_at: None,
        ended_at: None,
        incarnation: None,
        lost: false,
    };
    s.insert_session(&rec).await.unwrap();
    s.record_execute("s", now).await.unwrap();
    assert_eq!(s.usage("k").await.unwrap().executions, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_does_not_answer_is_unavailable_within_the_time_limit() {
    let pg = kiln_testpg::PgServer::start();
    let limit = Duration::from_millis(500);
    let s = kiln_store::open(&Database::Postgres(pg.url()), &opts(limit)).await.unwrap();
    // Another client holds the table for 4 s: every write waits behind it.
    let mut hold = pg.psql_command("BEGIN; LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;");
    let holder = std::thread::spawn(move || hold.status());
    // Until the lock is held, writes may still go through.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut i = 0u8;
    let began = loop {
        i += 1;
        let began = Instant::now();
        match s.add_key([i; 32], KeyOrigin::Created, "", &KeyOptions::default()).await {
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(_) => panic!("the lock was never taken"),
            Err(StoreError::Unavailable { detail, .. }) => {
                assert!(detail.contains("within"), "{detail}");
                break began;
            }
            Err(e) => panic!("expected unavailable, got {e}"),
        }
    };
    let took = began.elapsed();
    assert!(took >= limit && took < limit + Duration::from_millis(500), "took {took:?} for a limit of {limit:?}");
    assert!(holder.join().unwrap().unwrap().success());
    // Once the lock is gone the same store works: a write, and a read that
    // finds it (the writes above may all have met the lock, on a host that
    // started the holder before the first of them).
    s.add_key([255; 32], KeyOrigin::Created, "", &KeyOptions::default()).await.unwrap();
    assert!(!s.keys().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn executions_counted_while_the_database_is_down_are_written_when_it_is_back() {
    let mut pg = kiln_testpg::PgServer::start();
    let s = kiln_store::open(&Database::Postgres(pg.url()), &opts(Duration::from_secs(2))).await.unwrap();
    let now = Utc::now();
    let rec = SessionRecord {
        id: "s".into(),
        key_id: "k".into(),
        started_at: now,
        expires_at: now + chrono::Duration::seconds(60),
        execute_count: 0,
        last_execute_at: None,
        ended_at: None,
        incarnation: None,
        lost: false,
    };
    s.insert_session(&rec).await.unwrap();
    s.record_execute("s", now).await.unwrap();
    pg.stop();
    // The code ran and was answered: its usage is kept, not failed.
    for _ in 0..3 {
        s.record_execute("s", Utc::now()).await.unwrap();
        s.record_usage("s", ExecutionUsage { seconds: 1.0, cpu_seconds: 0.5, peak_memory_bytes: 7 }).await.unwrap();
    }
    assert!(s.usage("k").await.is_err_and(|e| e.is_unavailable()));
    pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(10);
    let u = loop {
        let u = s.usage("k").await.unwrap();
        if u.executions == 4 || Instant::now() > deadline {
            break u;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((u.executions, u.peak_memory_bytes), (4, 7), "{u:?}");
    assert!((u.execution_seconds - 3.0).abs() < 1e-9 && (u.cpu_seconds - 1.5).abs() < 1e-9, "{u:?}");
    // Written once: nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.usage("k").await.unwrap().executions, 4);
}

#[tokio::test]
async fn a_url_that_asks_for_tls_is_refused_with_a_clear_message() {
    let url = "postgres://kiln@db.invalid/kiln?sslmode=require";
    match kiln_store::open(&Database::Postgres(url.into()), &opts(Duration::from_secs(1))).await {
        Err(StoreError::Config(msg)) => assert!(msg.contains("TLS") && msg.contains("sslmode"), "{msg}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}
