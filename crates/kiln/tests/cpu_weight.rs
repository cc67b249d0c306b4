//! Whose CPU comes first: a batch item's sandbox runs at the least CPU
//! weight, so that executes, which someone waits on, get the machine first
//! when it is busy, and so does a pooled kernel booted while a batch runs;
//! an execute's session runs at the default weight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, KEY};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The CPU weight of the sandbox named `kernel` (its directory's name), in
/// v2's terms: `cpu.weight`, or v1's `cpu.shares` scaled from 1024 to 100 (rounded).
fn weight_of(sessions: &Path, kernel: &str) -> u64 {
    let dir = common::instance_cgroup(sessions, "cpu").expect("the server's cpu cgroup").join(kernel);
    if let Ok(w) = std::fs::read_to_string(dir.join("cpu.weight")) {
        return w.trim().parse().unwrap();
    }
    let shares: u64 = std::fs::read_to_string(dir.join("cpu.shares")).unwrap().trim().parse().unwrap();
    (shares * 100 + 512) / 1024
}

/// The kernel directory whose work dir holds `marker`.
fn kernel_with(sessions: &Path, marker: &str) -> Option<String> {
    std::fs::read_dir(sessions).ok()?.flatten().find_map(|e| {
        let work: PathBuf = e.path().join("data").join("work").join(marker);
        work.exists().then(|| e.file_name().to_string_lossy().into_owned())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_item_yields_the_cpu_to_an_execute_s_session() {
    let s = start(&["--pool-size", "1"]);
    let sessions = s.sessions_dir();
    // An execute's session: the default weight, though its kernel came
    // from the pool.
    let v = s.exec("open('interactive-marker', 'w').close()", None).await;
    let interactive = kernel_with(&sessions, "interactive-marker").unwrap_or_else(|| panic!("no marker: {v}"));
    assert_eq!(weight_of(&sessions, &interactive), 100);

    // A batch item, while it runs: the least weight. (The pool is full
    // first, so that the item takes the pooled kernel and the refill
    // happens during the batch.)
    pool_ready(&s).await;
    let code = "import time\nopen('batch-marker', 'w').close()\ntime.sleep(4)\nprint('done')";
    let batch = s.post("/v1/tci/batch", Some(KEY), json!({"items": [{"code": code}]}));
    let watch = async {
        let mut item = None;
        for _ in 0..100 {
            item = kernel_with(&sessions, "batch-marker");
            if item.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let item = item?;
        let seen = (weight_of(&sessions, &item), weight_of(&sessions, &interactive));
        let item_kernel = item.clone();
        // The pool refills while the batch runs (the item took its kernel):
        // that kernel is booted at the batch's weight too.
        for _ in 0..60 {
            let refill = live_kernels(&sessions).into_iter().find(|k| *k != item && *k != interactive);
            if let Some(k) = refill {
                return Some((item_kernel, seen, Some(weight_of(&sessions, &k))));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some((item_kernel, seen, None))
    };
    let ((st, v), seen) = tokio::join!(batch, watch);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["results"][0]["status"], "success", "{v}");
    let (item_kernel, (item, session), refill) = seen.expect("the batch item's sandbox");
    assert_eq!(item, 1, "the batch item runs at the least weight");
    assert_eq!(session, 100, "the execute's session keeps the default");
    assert_eq!(refill, Some(1), "the pool's refill during a batch boots at the batch's weight");

    // With no batch running, the pool refills at the default weight
    // (interactive sessions wait on it).
    pool_ready(&s).await;
    let (_, v) = s.post("/v1/tci/execute", Some(KEY), json!({"code": "open('second', 'w').close()"})).await;
    assert_eq!(v["data"]["status"], "success", "{v}");
    let second = kernel_with(&sessions, "second").expect("the second session's kernel");
    let mut refill = None;
    for _ in 0..200 {
        refill = live_kernels(&sessions).into_iter().find(|k| ![&interactive, &second, &item_kernel].contains(&k));
        if refill.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refill = refill.expect("the pool refilled");
    assert_eq!(weight_of(&sessions, &refill), 100, "a refill with no batch running");
}

/// Wait until the server's Python pool holds a ready kernel.
async fn pool_ready(s: &common::Server) {
    for _ in 0..600 {
        if s.metric("kiln_pool_ready").await.is_some_and(|r| r >= 1.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the pool never refilled");
}

/// The kernels whose sandboxes are live (their cgroup exists).
fn live_kernels(sessions: &Path) -> Vec<String> {
    let cpu = common::instance_cgroup(sessions, "cpu").expect("the server's cpu cgroup");
    std::fs::read_dir(&cpu)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|k| k.starts_with("k_"))
                .collect()
        })
        .unwrap_or_default()
}
