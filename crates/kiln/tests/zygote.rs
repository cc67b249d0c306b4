//! Kernels forked from the zygote: each is a clean, independent session.
//!
//! A fork copies the zygote's memory, so these tests look for what a copy
//! could carry over: random state, open files, environment, and whether a
//! dead zygote takes the server down with it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of};
use std::collections::HashSet;

/// Random numbers from every source a program is likely to use.
const RANDOM: &str = r#"
import random, os, uuid, numpy, secrets, tempfile
print(random.random(), random.getrandbits(64), numpy.random.rand(), numpy.random.randint(1 << 30),
      numpy.random.default_rng().random(), os.urandom(8).hex(), uuid.uuid4(), secrets.token_hex(8),
      next(tempfile._get_candidate_names()))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn sessions_forked_from_the_zygote_never_share_random_numbers() {
    let server = start(&["--pool-size", "2"]);
    let mut seen: Vec<Vec<String>> = Vec::new();
    for _ in 0..5 {
        let data = server.exec(RANDOM, None).await;
        let out = text_of(&data, "stdout");
        let values: Vec<String> = out.split_whitespace().map(str::to_string).collect();
        assert_eq!(values.len(), 9, "{data}");
        seen.push(values);
    }
    // Column by column: no source gave two sessions the same value.
    for col in 0..9 {
        let distinct: HashSet<&String> = seen.iter().map(|v| &v[col]).collect();
        assert_eq!(distinct.len(), seen.len(), "source {col} repeated across sessions: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forked_kernel_starts_with_packages_imported_and_nothing_of_the_zygote_open() {
    let server = start(&[]);
    let code = r#"
import os, sys
print("preloaded", all(m in sys.modules for m in ("numpy", "pandas", "matplotlib.pyplot")))
links = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        links[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # the directory's own descriptor, closed by now
        pass
print("pipes", sorted(fd for fd, l in links.items() if l.startswith("pipe:")))
print("stdin", links.get("0"))
print("env", sorted(k for k in os.environ if k.startswith("KILN_") and k not in ("KILN_NETWORK", "KILN_MAX_OUTPUT_BYTES", "KILN_WORK_DIR", "KILN_PRIVATE_TMP")))
print("parent", os.getppid(), "user", os.getuid(), os.geteuid())
"#;
    let data = server.exec(code, None).await;
    let out = text_of(&data, "stdout");
    assert!(out.contains("preloaded True"), "{data}");
    // The zygote talks to kiln over pipes; a child keeps none of them.
    assert!(out.contains("pipes []"), "{data}");
    assert!(out.contains("stdin /dev/null"), "{data}");
    assert!(out.contains("env []"), "{data}");
    // Its parent is the sandbox's init, and it is the session user.
    assert!(out.contains("parent 1 user 1000 1000"), "{data}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_first_plot_imports_only_matplotlib_inline_and_its_figure_is_shown() {
    let server = start(&[]);
    // No `plt.show()`: the figure is shown by the inline backend's hook at
    // the end of the cell, which the backend's import installs; were that
    // module imported in the zygote (before any shell), no kernel would
    // ever get the hook.
    let code = r#"
import sys
before = set(sys.modules)
import matplotlib.pyplot as plt
plt.plot([1, 2, 3]); plt.title("first")
print("new", sorted(set(sys.modules) - before))
"#;
    let data = server.exec(code, None).await;
    let out = text_of(&data, "stdout");
    assert!(
        out.contains("new ['matplotlib_inline', 'matplotlib_inline.backend_inline', 'matplotlib_inline.config']"),
        "{data}"
    );
    let shown = data["outputs"].as_array().unwrap().iter().filter(|o| o["type"] == "display_data").count();
    assert_eq!(shown, 1, "{data}");
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_zygote_dies_its_sessions_restart_and_new_sessions_still_start() {
    let server = start(&[]);
    let first = server.exec("x = 41", None).await;
    let sid = first["session_id"].as_str().unwrap().to_string();
    let zygote = common::zygote_pid(server.data.path()).expect("a running zygote");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote), nix::sys::signal::Signal::SIGKILL).unwrap();

    // The session's kernel died with it: the next cell says so, and runs
    // in a fresh kernel (state gone, session still usable).
    let mut said_so = false;
    for _ in 0..20 {
        let data = server.exec("print(x)", Some(&sid)).await;
        let text = format!("{data}");
        if text.contains("KernelDied") {
            said_so = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(said_so, "the session never noticed its kernel died with the zygote");
    let after = server.exec("print(x if 'x' in dir() else 'fresh')", Some(&sid)).await;
    assert_eq!(text_of(&after, "stdout").trim(), "fresh", "{after}");

    // New sessions come from a new zygote.
    let fresh = server.exec("import sys; print('pandas' in sys.modules)", None).await;
    assert_eq!(text_of(&fresh, "stdout").trim(), "True", "{fresh}");
    let now = common::zygote_pid(server.data.path()).expect("a new zygote");
    assert_ne!(now, zygote);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_zygote_kernels_boot_as_new_interpreters() {
    let server = start(&["--zygote", "off", "--kernel", "ipykernel"]);
    let data = server.exec("import sys; print('pandas' in sys.modules, 'ipykernel' in sys.modules)", None).await;
    assert_eq!(text_of(&data, "stdout").trim(), "False True", "{data}");
    assert!(!server.data.path().join("zygote").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_zygotes_kernels_are_forked_from_each_in_turn() {
    let server = start(&["--zygotes", "2", "--pool-size", "0"]);
    for _ in 0..4 {
        let data = server.exec("import sys; print('pandas' in sys.modules)", None).await;
        assert_eq!(text_of(&data, "stdout").trim(), "True", "{data}");
    }
    let log_of = |pid: i32| std::fs::read_link(format!("/proc/{pid}/fd/1")).ok();
    let zygotes: Vec<(i32, std::path::PathBuf)> = ["zygote/log", "zygote/1/log"]
        .iter()
        .map(|rel| {
            let log = server.data.path().join(rel);
            let pid = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .find(|pid| log_of(*pid).as_ref() == Some(&log))
                .unwrap_or_else(|| panic!("no zygote writes to {}", log.display()));
            (pid, log)
        })
        .collect();
    assert_ne!(zygotes[0].0, zygotes[1].0);
    // Every sandbox's init is a child of one of them, and each has some.
    let parent = |pid: i32| -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or(0)
    };
    let mut forked_by = std::collections::HashMap::new();
    for procs in common::sandboxes(&server.sessions_dir()) {
        for pid in procs {
            let p = parent(pid);
            if let Some((z, _)) = zygotes.iter().find(|(z, _)| *z == p) {
                *forked_by.entry(*z).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(forked_by.len(), 2, "kernels forked by {forked_by:?}, zygotes {zygotes:?}");
}

/// Bytes of `pid`'s private, writable, anonymous mappings that are each
/// too small for a huge page (under 2 MiB).
fn small_anonymous_bytes(pid: i32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (start, end) = f[0].split_once('-').unwrap();
            let len = u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
            (f.len() == 5 && f[1] == "rw-p" && len < 2 << 20).then_some(len)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_zygotes_object_arenas_share_one_mapping_and_a_kernel_gives_freed_ones_back() {
    let server = start(&["--pool-size", "1"]);
    let data = server.exec("print('up')", None).await;
    assert_eq!(text_of(&data, "stdout").trim(), "up", "{data}");
    // CPython maps each 1 MiB arena on its own; the zygote's allocator puts
    // them side by side in one range, which huge pages can back. What is
    // left in mappings under 2 MiB is the few arenas the interpreter made
    // before the switch and the packages' own small mappings: a few MiB
    // (30-40 MiB with CPython's own allocator, after the runtime's imports).
    let zygote = common::zygote_pid(server.data.path()).expect("a running zygote");
    let small = small_anonymous_bytes(zygote) >> 20;
    assert!(small < 16, "{small} MiB of the zygote's memory is in mappings too small for huge pages");

    // In a kernel (a fork, with the allocator and its own copy of the
    // range), arenas come and go as usual: freed ones return their memory,
    // and new ones are handed out again.
    let code = r#"
import gc
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) // 1024
before = rss()
x = [str(i) * 3 for i in range(2_000_000)]
grown = rss()
del x
gc.collect()
after = rss()
y = [str(i) * 3 for i in range(2_000_000)]
print(before, grown, after, len(y), sum(map(len, y[:10])))
"#;
    let data = server.exec(code, None).await;
    let out = text_of(&data, "stdout");
    let n: Vec<i64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
    let (before, grown, after) = (n[0], n[1], n[2]);
    assert!(grown - before > 100, "the objects took {} MB: {out}", grown - before);
    assert!(after - before < 40, "freed arenas kept {} MB: {out}", after - before);
    assert_eq!(&n[3..], &[2_000_000, 30], "{out}");

    // Judging harnesses cap a program's address space (`RLIMIT_AS`): the
    // range past the zygote's arenas went back before any fork, so a
    // session has the room it would have with CPython's own allocator. No
    // inaccessible reservation is left bigger than a thread's malloc heap
    // (64 MiB; unsealed, the range's rest is ~1 GiB).
    let code = r#"
biggest = 0
for line in open("/proc/self/maps"):
    f = line.split()
    if len(f) == 5 and f[1] == "---p":
        start, end = (int(x, 16) for x in f[0].split("-"))
        biggest = max(biggest, end - start)
print(biggest >> 20)
"#;
    let data = server.exec(code, Some(data["session_id"].as_str().unwrap())).await;
    let biggest: u64 = text_of(&data, "stdout").trim().parse().unwrap();
    assert!(biggest <= 64, "a {biggest} MiB reservation is left in the kernel's address space");
}
