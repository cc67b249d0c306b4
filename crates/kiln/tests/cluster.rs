//! Three `kiln serve` nodes, each in its own network namespace with its own
//! address on a bridge the test creates, sharing one real PostgreSQL
//! (kiln-testpg), behind Debian's HAProxy in round robin without
//! stickiness. Sessions are reached through any node, a lost node's
//! sessions answer `session_lost` within the lease (and stay lost after it
//! restarts), key changes reach every node, and a full cluster says
//! `no_capacity`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cluster::{
    bench_new, bench_sustained, exec, http, mcp, new_session, node, node_cpu, node_with, owner, p50_p99, process_cpu,
    readyz, send, session_on, sessions_by_node, solo, solo_named, stdout, timed_exec, Frozen, Haproxy, Net, PER_NODE,
    SECRET,
};
use common::{run_client, start_via, text_of, KEY};
use kiln_testpg::{PgOptions, PgServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_behind_haproxy_share_sessions_lose_a_node_cleanly_and_fill_up() {
    let net = Net::new(3, 0);
    let pg = PgServer::start_with(PgOptions { listen: Some(net.host().parse().unwrap()) });
    let db = pg.url();
    let mut nodes: Vec<common::Server> = std::thread::scope(|s| {
        let (net, db) = (&net, &db);
        let started: Vec<_> =
            (1..=3).map(|i| s.spawn(move || node(net, i, db, tempfile::tempdir().unwrap()))).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let lb = Haproxy::start(&(1..=3).map(|i| net.node(i)).collect::<Vec<_>>());
    let lb = lb.url.clone();

    // A session keeps its variables whichever node a request lands on:
    // through the balancer (round robin), and through each node directly.
    let a = new_session(&lb, KEY, "x = 42").await;
    for _ in 0..3 {
        stdout(&lb, "x += 1", &a).await;
    }
    for url in &urls {
        assert_eq!(stdout(url, "print(x)", &a).await, "45\n", "through {url}");
    }
    let a_owner = owner(&urls[0], &a).await;
    for url in &urls[1..] {
        assert_eq!(owner(url, &a).await, a_owner, "every node names the same owner");
    }

    // A streamed execute passes through a forwarding node unchanged.
    let owner_index: usize = a_owner.trim_start_matches("node-").parse().unwrap();
    let other = &urls[owner_index % 3];
    let sse = http()
        .post(format!("{other}/v1/tci/execute"))
        .bearer_auth(KEY)
        .json(&json!({"language": "python", "code": "print(x)", "session_id": a, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let events = sse.text().await.unwrap();
    assert!(events.contains("event: stdout") && events.contains("45") && events.contains("event: done"), "{events}");

    // A file uploaded through one node is downloaded through another.
    let content: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    use base64::Engine as _;
    let upload = json!({"files": [{"name": "data.bin", "encoding": "base64",
        "content": base64::engine::general_purpose::STANDARD.encode(&content)}]});
    let up = send(&urls[0], reqwest::Method::POST, &format!("/v1/tci/sessions/{a}/files"), KEY, Some(upload)).await;
    assert_eq!(up.status, 200, "{up:?}");
    for url in &urls[1..] {
        let got =
            http().get(format!("{url}/v1/tci/sessions/{a}/files/data.bin")).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(got.status(), 200);
        assert_eq!(got.bytes().await.unwrap().as_ref(), content.as_slice(), "through {url}");
    }

    // MCP through the balancer: a session made with run_code keeps its
    // variables, files and progress whichever node each call lands on.
    let mcp_session = mcp(&lb, &["keep"]).await;
    let m = mcp_session.lines().find_map(|l| l.strip_prefix("session_id: ")).unwrap().to_string();
    assert_eq!(stdout(&lb, "print(x)", &m).await, "46\n", "the MCP session is an API session too");

    // A forwarded-caller header a client makes up is refused.
    let forged = http()
        .get(format!("{}/v1/tci/sessions/{a}", urls[1]))
        .header("x-kiln-forwarded-caller", "key_0000000000000000;-;-")
        .header("x-kiln-forwarded-auth", format!("{}:00", chrono::Utc::now().timestamp()))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    // The header that names a forwarded execute's session is a peer's
    // alone: from a client it is dropped, and the body decides.
    let r = http()
        .post(format!("{}/v1/tci/execute", urls[1]))
        .bearer_auth(KEY)
        .header("x-kiln-forwarded-session", &a)
        .json(&json!({"language": "python", "code": "print('fresh')"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let fresh = v["data"]["session_id"].as_str().unwrap().to_string();
    assert_ne!(fresh, a, "{v}");
    let r = send(&lb, reqwest::Method::DELETE, &format!("/v1/tci/sessions/{fresh}"), KEY, None).await;
    assert_eq!(r.status, 200, "{r:?}");

    // A key's session limit holds across the cluster; a key revoked on one
    // node is refused by all of them within 2 s.
    let made = send(&urls[0], reqwest::Method::POST, "/v1/admin/keys", KEY, Some(json!({"max_sessions": 2}))).await;
    assert_eq!(made.status, 200, "{made:?}");
    let limited = made.body["data"]["key"].as_str().unwrap().to_string();
    let limited_id =
        made.body["data"]["id"].as_str().or(made.body["data"]["record"]["id"].as_str()).unwrap().to_string();
    let began = Instant::now();
    for url in &urls {
        while send(url, reqwest::Method::GET, "/v1/tci/sessions", &limited, None).await.status != 200 {
            assert!(began.elapsed() < Duration::from_secs(2), "a new key took over 2 s to reach {url}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    new_session(&urls[0], &limited, "1").await;
    new_session(&urls[1], &limited, "1").await;
    let third = exec(&urls[2], &limited, "1", None).await;
    assert_eq!((third.status, third.code()), (429, "too_many_sessions"), "{third:?}");
    let revoked = send(&urls[1], reqwest::Method::DELETE, &format!("/v1/admin/keys/{limited_id}"), KEY, None).await;
    assert_eq!(revoked.status, 200, "{revoked:?}");
    let began = Instant::now();
    for url in &urls {
        while send(url, reqwest::Method::GET, "/v1/tci/sessions", &limited, None).await.status != 401 {
            assert!(began.elapsed() < Duration::from_secs(2), "a revoked key still worked on {url} after 2 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // A session on another node than a's, to outlive a's node.
    let b = loop {
        let s = new_session(&lb, KEY, "y = 7").await;
        if owner(&lb, &s).await != a_owner {
            break s;
        }
    };

    // SIGKILL a's node: within the lease its session answers session_lost
    // through the others (node_unreachable at most, meanwhile), the other
    // session still works, and new sessions succeed.
    let dead = owner_index - 1;
    nodes[dead].crash();
    let killed = Instant::now();
    let living: Vec<&String> = urls.iter().enumerate().filter(|(i, _)| *i != dead).map(|(_, u)| u).collect();
    for url in living.iter().copied().chain([&lb]) {
        loop {
            let r = exec(url, KEY, "print(x)", Some(&a)).await;
            if r.status == 410 {
                assert_eq!(r.code(), "session_lost", "{r:?}");
                let msg = r.body["errors"][0]["message"].as_str().unwrap();
                assert!(msg.contains("node") && msg.contains("lost") && msg.contains(&a_owner), "{msg}");
                break;
            }
            assert_eq!((r.status, r.code()), (503, "node_unreachable"), "only node_unreachable meanwhile: {r:?}");
            assert!(r.retry_after.is_some(), "{r:?}");
            assert!(killed.elapsed() < Duration::from_secs(10), "still not lost after 10 s: {r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(killed.elapsed() < Duration::from_secs(10));
    // Every MCP tool naming the lost node's session says session_lost.
    mcp(&lb, &["lost", &a]).await;
    assert_eq!(stdout(&lb, "print(y)", &b).await, "7\n");
    for _ in 0..2 {
        let s = new_session(&lb, KEY, "print('fresh')").await;
        assert_ne!(owner(&lb, &s).await, a_owner, "no session goes to the lost node");
    }

    // It comes back (same node id, same data): a new incarnation, and the
    // old ids stay lost, on it too.
    let data = std::mem::replace(&mut nodes[dead].data, tempfile::tempdir().unwrap());
    nodes[dead] = node(&net, dead + 1, &db, data);
    for url in urls.iter().chain([&lb]) {
        let r = exec(url, KEY, "print(x)", Some(&a)).await;
        assert_eq!((r.status, r.code()), (410, "session_lost"), "through {url}: {r:?}");
    }

    // The restarted node offers places once it is ready and has said so
    // in its lease (a renewal, then its peers' next read).
    let began = Instant::now();
    while pg.psql("SELECT count(*) FROM nodes WHERE max_sessions > 0 AND lease_expires_at > now()") != "3" {
        assert!(began.elapsed() < Duration::from_secs(10), "the restarted node never offered places");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Fill the cluster: sessions go to every node until none has room, then
    // 503 no_capacity with Retry-After. Published capacity lags by up to a
    // renewal, so a refusal is trusted only once it persists.
    let mut created = 0;
    let full = loop {
        let r = exec(&lb, KEY, "1", None).await;
        if r.status == 200 {
            created += 1;
            assert!(created <= 3 * PER_NODE, "more sessions than the cluster has places");
            continue;
        }
        assert_eq!((r.status, r.code()), (503, "no_capacity"), "{r:?}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let again = exec(&lb, KEY, "1", None).await;
        if again.status == 200 {
            created += 1;
            continue;
        }
        break again;
    };
    assert_eq!((full.status, full.code()), (503, "no_capacity"), "{full:?}");
    assert_eq!(full.retry_after.as_deref(), Some("2"));
    // Every key's live sessions on living incarnations fill every place.
    let live = pg.psql(
        "SELECT count(*) FROM sessions s JOIN nodes n ON n.id = s.node_id AND n.incarnation = s.incarnation \
         WHERE s.ended_at IS NULL AND n.lease_expires_at > now()",
    );
    assert_eq!(live, (3 * PER_NODE).to_string(), "every place of every node is used");

    // SIGTERM drains a node: its lease says draining and ends.
    nodes[0].stop();
    let row = pg.psql("SELECT draining, lease_expires_at <= now() FROM nodes WHERE id = 'node-1'");
    assert!(row.contains('t') && !row.contains('f'), "{row}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_from_the_database_stops_taking_sessions_and_comes_back_as_a_new_incarnation() {
    let mut pg = PgServer::start();
    let s = solo(&pg.url(), "3s");
    let before = new_session(&s.url, KEY, "v = 1").await;
    assert_eq!(readyz(&s).await, (200, "ready".to_string()));

    pg.stop();
    // Within the lease (3 s) and a renewal, /readyz says why it is out.
    let began = Instant::now();
    while readyz(&s).await != (503, "lease_lost".to_string()) {
        assert!(began.elapsed() < Duration::from_secs(8), "still {:?} after 8 s", readyz(&s).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = exec(&s.url, KEY, "1", None).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.retry_after.is_some(), "{refused:?}");
    let msg = refused.body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("lease") || refused.code() == "store_unavailable", "{refused:?}");

    pg.start_again();
    // It registers again by itself, as a new incarnation: ready, taking
    // sessions, and the session from before is lost (its peers said so).
    let began = Instant::now();
    while readyz(&s).await != (200, "ready".to_string()) {
        assert!(began.elapsed() < Duration::from_secs(20), "not ready again: {:?}", readyz(&s).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = exec(&s.url, KEY, "print(v)", Some(&before)).await;
    assert_eq!((r.status, r.code()), (410, "session_lost"), "{r:?}");
    let after = new_session(&s.url, KEY, "print('new')").await;
    assert_ne!(after[4..14], before[4..14], "a new incarnation names the new session");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_session_shows_in_the_nodes_row_before_its_next_lease_renewal() {
    let pg = PgServer::start();
    // A 10 s lease is renewed every 3.3 s.
    let s = solo(&pg.url(), "10s");
    let row = |cols: &str| pg.psql(&format!("SELECT {cols} FROM nodes WHERE id = 'solo'"));
    let began = Instant::now();
    while row("ready_kernels > 0 AND live_sessions = 0") != "t" {
        assert!(began.elapsed() < Duration::from_secs(30), "never ready and idle: {}", row("*"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Right after a write of the row (its lease moved on) ...
    let lease = || row("extract(epoch FROM lease_expires_at)");
    let first = lease();
    let began = Instant::now();
    let written = loop {
        let now = lease();
        if now != first {
            break now.parse::<f64>().unwrap();
        }
        assert!(began.elapsed() < Duration::from_secs(10), "the lease was never renewed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // ... a new session takes the node's ready kernel ...
    new_session(&s.url, KEY, "x = 1").await;
    // ... and the row says so in a write well before the renewal due 3.3 s
    // after the last one: peers place by it, so it must not wait for that.
    let began = Instant::now();
    let published = loop {
        let r = row("live_sessions, extract(epoch FROM lease_expires_at)");
        if let Some(("1", at)) = r.split_once('|') {
            break at.parse::<f64>().unwrap();
        }
        assert!(began.elapsed() < Duration::from_secs(10), "the session never showed: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("published {:.2} s after the write before it", published - written);
    assert!(
        published - written < 3.0,
        "the new session was published {:.2} s after the write before it: with the renewal, not at once",
        published - written
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_lease_says_so_and_a_running_cell_finishes() {
    let pg = PgServer::start();
    let mut s = solo(&pg.url(), "6s");
    let id = new_session(&s.url, KEY, "import time").await;
    let url = s.url.clone();
    let id2 = id.clone();
    let cell = tokio::spawn(async move { exec(&url, KEY, "time.sleep(4); print('finished')", Some(&id2)).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pid = nix::unistd::Pid::from_raw(s.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let began = Instant::now();
    while pg.psql("SELECT draining FROM nodes WHERE id = 'solo'") != "t" {
        assert!(began.elapsed() < Duration::from_secs(2), "the lease does not say draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!cell.is_finished(), "the cell was still running while the node drained");
    let done = cell.await.unwrap();
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(text_of(&done.body["data"], "stdout"), "finished\n");
    assert!(s.stop().success());
    // Gone: its lease ended at exit, not a lease later.
    assert_eq!(pg.psql("SELECT lease_expires_at <= now() FROM nodes WHERE id = 'solo'"), "t");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_nodes_sessions_answer_session_lost_through_its_peers_and_a_deleted_one_stays_expired() {
    let pg = PgServer::start();
    let mut a = solo_named(&pg.url(), "3s", "node-a");
    let b = solo_named(&pg.url(), "3s", "node-b");
    let live = session_on(&a, "node-a", "v = 1").await;
    let deleted = session_on(&a, "node-a", "w = 2").await;
    let r = send(&b.url, reqwest::Method::DELETE, &format!("/v1/tci/sessions/{deleted}"), KEY, None).await;
    assert_eq!(r.status, 200, "{r:?}");

    // SIGTERM: node-a drains, ends its sessions and its lease, and exits.
    // Its sessions did not run out their time: they were lost with it.
    assert!(a.stop().success());
    for _ in 0..3 {
        let r = exec(&b.url, KEY, "print(v)", Some(&live)).await;
        assert_eq!((r.status, r.code()), (410, "session_lost"), "{r:?}");
        let r = send(&b.url, reqwest::Method::GET, &format!("/v1/tci/sessions/{live}"), KEY, None).await;
        assert_eq!((r.status, r.code()), (410, "session_lost"), "{r:?}");
        // The one its caller ended before stays ended, not lost.
        let r = exec(&b.url, KEY, "print(w)", Some(&deleted)).await;
        assert_eq!((r.status, r.code()), (410, "session_expired"), "{r:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_waiting_in_a_session_whose_node_lapsed_answer_session_lost_not_session_expired() {
    let pg = PgServer::start();
    let a = solo_named(&pg.url(), "3s", "node-a");
    let _b = solo_named(&pg.url(), "3s", "node-b");
    let s = session_on(&a, "node-a", "import time").await;
    // On node-a itself: one cell running, one queued behind it.
    let (url, id) = (a.url.clone(), s.clone());
    let running = tokio::spawn(async move { exec(&url, KEY, "time.sleep(60)", Some(&id)).await });
    // Running: the session counts an execute when it starts one.
    let began = Instant::now();
    loop {
        let r = send(&a.url, reqwest::Method::GET, &format!("/v1/tci/sessions/{s}"), KEY, None).await;
        if r.body["data"]["execute_count"] == 2 {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(30), "the cell never started: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (url, id) = (a.url.clone(), s.clone());
    let queued = tokio::spawn(async move { exec(&url, KEY, "print('after')", Some(&id)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Frozen past its lease: on waking it finds its lease lapsed, and ends
    // its sessions (its peers already call them lost).
    let pid = nix::unistd::Pid::from_raw(a.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let frozen = Frozen(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(frozen);
    for (what, cell) in [("the running cell", running), ("the queued cell", queued)] {
        let r = tokio::time::timeout(Duration::from_secs(30), cell).await.expect("no answer").unwrap();
        assert_eq!((r.status, r.code()), (410, "session_lost"), "{what}: {r:?}");
    }
    let r = exec(&a.url, KEY, "print(1)", Some(&s)).await;
    assert_eq!((r.status, r.code()), (410, "session_lost"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: KILN_BENCH_BIN=$PWD/target/release/kiln cargo test -p kiln --test cluster bench -- --ignored --nocapture"]
async fn bench_one_node_direct_against_three_behind_haproxy() {
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let (n_new, n_warm, secs) = if quick { (20, 100, 5) } else { (200, 1000, 20) };
    let net = Net::new(3, 2);
    let pg = PgServer::start_with(PgOptions { listen: Some(net.host().parse().unwrap()) });
    let db = pg.url();
    let flags = ["--pool-size", "8", "--max-sessions", "64"];
    let start = |i: usize, cluster: bool| {
        let ns = format!("--net=/run/netns/{}", net.namespaces[i - 1]);
        let listen = format!("{}:8787", net.node(i));
        let advertise = format!("http://{listen}");
        let node_id = format!("node-{i}");
        let mut args = vec!["--database", &db, "--node-id", &node_id, "--network", "none"];
        args.extend(flags);
        if cluster {
            args.extend(["--advertise", &advertise, "--cluster-secret", SECRET]);
        }
        start_via(&["nsenter", &ns, "--"], &listen, tempfile::tempdir().unwrap(), &args, true)
    };

    // One node, direct.
    let mut one = start(1, false);
    tokio::time::sleep(Duration::from_secs(3)).await; // the pool fills
    let (one_new50, one_new99) = bench_new(&one.url, n_new).await;
    let client = http();
    let (s, _) = timed_exec(&client, &one.url, "x = 0", None).await;
    let mut warm = Vec::new();
    for _ in 0..n_warm {
        warm.push(timed_exec(&client, &one.url, "x = 1", Some(&s)).await.1);
    }
    let (one_warm50, _) = p50_p99(warm);
    let cpu0 = node_cpu(&one);
    let before = sessions_by_node(&pg).values().sum::<u64>();
    let one_rate = bench_sustained(&one.url, 4, secs).await;
    let one_cpu = (node_cpu(&one) - cpu0) / (sessions_by_node(&pg).values().sum::<u64>() - before) as f64;
    one.stop();
    pg.psql("DELETE FROM sessions; DELETE FROM nodes;");

    // Three nodes behind HAProxy.
    let nodes: Vec<common::Server> = std::thread::scope(|sc| {
        let start = &start;
        let started: Vec<_> = (1..=3).map(|i| sc.spawn(move || start(i, true))).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let proxy = Haproxy::start(&(1..=3).map(|i| net.node(i)).collect::<Vec<_>>());
    let lb = proxy.url.clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (lb_new50, lb_new99) = bench_new(&lb, n_new).await;
    // Warm executes on one session: on its owner, and through a peer that
    // forwards (interleaved, so both see the same load).
    let (s, _) = timed_exec(&client, &nodes[0].url, "x = 0", None).await;
    let home = owner(&nodes[0].url, &s).await;
    let owner_i: usize = home.trim_start_matches("node-").parse().unwrap();
    let (direct_url, hop_url) = (nodes[owner_i - 1].url.clone(), nodes[owner_i % 3].url.clone());
    let (mut direct, mut hop, mut via_lb) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n_warm {
        direct.push(timed_exec(&client, &direct_url, "x = 1", Some(&s)).await.1);
        hop.push(timed_exec(&client, &hop_url, "x = 1", Some(&s)).await.1);
        via_lb.push(timed_exec(&client, &lb, "x = 1", Some(&s)).await.1);
    }
    let ((direct50, _), (hop50, _), (lb50, _)) = (p50_p99(direct), p50_p99(hop), p50_p99(via_lb));
    // What a hop costs the forwarding node: its server process's CPU per
    // forwarded warm execute (robust to the machine's load, unlike time).
    let forwarder = &nodes[owner_i % 3];
    let cpu0 = process_cpu(forwarder);
    for _ in 0..n_warm {
        timed_exec(&client, &hop_url, "x = 1", Some(&s)).await;
    }
    let forward_cpu = (process_cpu(forwarder) - cpu0) / n_warm as f64;
    let cpu0: Vec<f64> = nodes.iter().map(node_cpu).collect();
    let before = sessions_by_node(&pg);
    let lb_rate = bench_sustained(&lb, 4, secs).await;
    let after = sessions_by_node(&pg);
    let per_node: Vec<String> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let id = format!("node-{}", i + 1);
            let made = after.get(&id).copied().unwrap_or(0) - before.get(&id).copied().unwrap_or(0);
            let cpu = node_cpu(n) - cpu0[i];
            format!("{id}: {made} sessions, {:.1} ms CPU each", cpu / made.max(1) as f64 * 1e3)
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("| scenario | 1 node, direct | 3 nodes behind HAProxy |");
    println!("|---|---|---|");
    println!("| new session + `print(1)`, p50 / p99 of {n_new} | {one_new50:.1} / {one_new99:.1} ms | {lb_new50:.1} / {lb_new99:.1} ms |");
    println!("| warm execute `x = 1`, p50 of {n_warm} | {one_warm50:.2} ms | owner {direct50:.2} ms, through a forwarding peer {hop50:.2} ms (hop {:.2} ms), through HAProxy {lb50:.2} ms |", hop50 - direct50);
    println!("| forwarding node's CPU per forwarded warm execute, {n_warm} | | {:.3} ms |", forward_cpu * 1e3);
    println!("| sustained fresh sessions (create + `print(1)` + end), 4 clients, {secs} s | {one_rate:.1}/s | {lb_rate:.1}/s |");
    println!("| CPU per fresh session (server + its sandboxes) | {:.1} ms | {} |", one_cpu * 1e3, per_node.join("; "));
    println!(
        "cores on this machine: {cores}; one node's ceiling = {cores} cores / CPU per session = {:.0}/s",
        cores as f64 / one_cpu
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_clients_run_the_seed_examples_through_haproxy_and_a_database_restart_is_ridden_out() {
    let dir = common::clients_dir();
    let net = Net::new(3, 1);
    let mut pg = PgServer::start_with(PgOptions { listen: Some(net.host().parse().unwrap()) });
    let db = pg.url();
    let _nodes: Vec<common::Server> = std::thread::scope(|s| {
        let (net, db) = (&net, &db);
        let started: Vec<_> =
            (1..=3).map(|i| s.spawn(move || node_with(net, i, db, tempfile::tempdir().unwrap(), 64))).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let proxy = Haproxy::start(&(1..=3).map(|i| net.node(i)).collect::<Vec<_>>());
    let lb = proxy.url.clone();
    let url = lb.clone();
    tokio::task::spawn_blocking(move || {
        run_client(dir.join("py1/bin/python"), "seeds_together_v1.py", &url);
        run_client(dir.join("py2/bin/python"), "seeds_together_v2.py", &url);
        run_client(std::path::PathBuf::from("node"), "seeds_together_ai.mjs", &url);
    })
    .await
    .unwrap();

    // PostgreSQL restarts (shorter than the lease): meanwhile no 5xx but
    // store_unavailable, running sessions keep working, and everything
    // resumes without restarting kiln.
    let kept = new_session(&lb, KEY, "k = 5").await;
    pg.stop();
    for _ in 0..3 {
        let fresh = exec(&lb, KEY, "1", None).await;
        assert_eq!((fresh.status, fresh.code()), (503, "store_unavailable"), "{fresh:?}");
        assert_eq!(fresh.retry_after.as_deref(), Some("2"));
        assert_eq!(stdout(&lb, "k += 1; print(k)", &kept).await.trim().parse::<i32>().map(|k| k > 5), Ok(true));
    }
    pg.start_again();
    let began = Instant::now();
    loop {
        let r = exec(&lb, KEY, "print('back')", None).await;
        if r.status == 200 {
            break;
        }
        assert_eq!((r.status, r.code()), (503, "store_unavailable"), "only store_unavailable meanwhile: {r:?}");
        assert!(began.elapsed() < Duration::from_secs(20), "no recovery: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stdout(&lb, "print(k)", &kept).await, "8\n", "the session lived through the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_owner_does_not_hold_requests_and_its_sessions_stay_lost_when_it_wakes() {
    let pg = PgServer::start();
    let a = solo_named(&pg.url(), "3s", "node-a");
    let b = solo_named(&pg.url(), "3s", "node-b");
    // node-a has a ready kernel: the session stays there.
    let s = new_session(&a.url, KEY, "z = 3").await;
    assert_eq!(owner(&b.url, &s).await, "node-a");
    assert_eq!(stdout(&b.url, "print(z)", &s).await, "3\n");

    let pid = nix::unistd::Pid::from_raw(a.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let frozen = Frozen(pid);
    // node-a accepts connections (the kernel does) but answers nothing: the
    // request through node-b is given up once node-a's lease runs out.
    let began = Instant::now();
    let r = exec(&b.url, KEY, "z += 1", Some(&s)).await;
    assert_eq!((r.status, r.code()), (410, "session_lost"), "{r:?}");
    assert!(began.elapsed() < Duration::from_secs(8), "held for {:?}", began.elapsed());

    // It wakes: past its lease, it serves none of its old sessions (the
    // peers said they were lost), and comes back as a new incarnation.
    drop(frozen);
    for url in [&a.url, &b.url] {
        let r = exec(url, KEY, "print(z)", Some(&s)).await;
        assert_eq!((r.status, r.code()), (410, "session_lost"), "through {url}: {r:?}");
    }
    let began = Instant::now();
    while readyz(&a).await.0 != 200 {
        assert!(began.elapsed() < Duration::from_secs(10), "node-a did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Placement keeps a session on the receiving node when it has a ready
    // kernel: wait for node-a's pool to refill after its restart of sessions.
    let began = Instant::now();
    loop {
        let text = a.metrics().await;
        let ready = common::metric(&text, "kiln_pool_ready");
        if ready.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(30), "node-a's pool did not refill: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = new_session(&a.url, KEY, "print('again')").await;
    assert_eq!(owner(&b.url, &fresh).await, "node-a");
}
