//! Output that is too large for the server: it must cost the server a
//! bounded amount of memory, whatever the kernel sends, and never take the
//! session down with it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of, KEY};
use serde_json::json;

/// The peak resident memory of process `pid` so far, bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// ipykernel (the reference kernel) sends one write as one message, however
/// large: the case of any kernel, or code, that bypasses kiln's own kernel
/// and its 64 KiB chunks. Three sessions at once each send a single 200 MB
/// message; before kiln read frames through its size guard, that cost the
/// server about three times their size.
#[tokio::test(flavor = "multi_thread")]
async fn single_huge_messages_from_several_kernels_keep_the_server_s_memory_flat() {
    let s = std::sync::Arc::new(start(&["--kernel", "ipykernel", "--max-output-bytes", "1000000", "--pool-size", "3"]));
    // A baseline in the same run: the server after it has served sessions.
    let warm = s.exec("print('warm')", None).await;
    assert_eq!(text_of(&warm, "stdout"), "warm\n");
    let before = peak_rss(s.pid());

    let mut tasks = Vec::new();
    for _ in 0..3 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let first = s.exec("x = 41", None).await;
            let id = first["session_id"].as_str().unwrap().to_string();
            let code = "import sys\nsys.stdout.write('A' * (200 << 20))\nsys.stdout.flush()";
            let (status, v) =
                s.post("/tci/execute", Some(KEY), json!({"code": code, "session_id": id, "timeout": 120})).await;
            (id, status, v)
        }));
    }
    for t in tasks {
        let (id, status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v:.500}");
        let data = &v["data"];
        assert_eq!(data["status"], "error", "{data:.500}");
        let error = text_of(data, "error");
        assert!(error.contains("OutputLimit") && error.contains("1000000 bytes"), "{error}");
        assert!(error.contains("A new kernel was started"), "{error}");
        assert!(text_of(data, "stdout").len() <= 1_000_000);
        // The session lives on, on a fresh kernel, and says so.
        let after = s.exec("print(1 + 1)", Some(&id)).await;
        assert_eq!(text_of(&after, "stdout"), "2\n", "{after}");
    }
    let grew = peak_rss(s.pid()).saturating_sub(before);
    assert!(grew < 100 << 20, "the server's peak memory grew by {} MiB for 600 MB of refused output", grew >> 20);
}
