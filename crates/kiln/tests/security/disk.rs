//! Every place a session can write, filled past its limit: the write must
//! fail in that session (ENOSPC on a size-limited filesystem of its own,
//! EACCES or EROFS where it may not write at all), its neighbour must still
//! write, and the host's disk must not grow.
//!
//! "The host's disk" is measured where a session's host-side state lives:
//! the server's data directory, counting only files on the data
//! directory's own filesystem (the sessions' tmpfs are other filesystems).
//! The attack these tests were written for wrote 1.8 GiB there, through the
//! socket directory bound into the sandbox.

use super::stdout_of;
use crate::common::{start, text_of, Server};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The servers of these tests: small limits, so filling is quick.
const DISK_MIB: u64 = 64;
const TMP_MIB: u64 = 32;
/// What each attack tries to write: more than any limit above.
const ATTEMPT_MIB: u64 = 96;
/// Growth of the data directory a test tolerates (database pages, logs).
const HOST_SLACK_MIB: u64 = 8;

fn limited_server() -> Server {
    start(&["--disk-limit", &format!("{DISK_MIB}MiB"), "--tmp-limit", &format!("{TMP_MIB}MiB")])
}

/// Bytes stored under `dir` on `dir`'s own filesystem (mount points of
/// other filesystems are not entered).
fn host_disk_bytes(dir: &Path) -> u64 {
    fn walk(path: &Path, dev: u64) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
        if meta.dev() != dev {
            return 0;
        }
        let mut total = meta.blocks() * 512;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                total += walk(&entry.path(), dev);
            }
        }
        total
    }
    let dev = std::fs::metadata(dir).unwrap().dev();
    walk(dir, dev)
}

/// Python that defines `fill(fd)`: write 1 MiB at a time, up to
/// ATTEMPT_MIB, and print how it ended (`WROTE` or the errno's name) and
/// the MiB written.
fn filler() -> String {
    format!(
        r#"import errno, os
def fill(open_fd):
    written = 0
    try:
        fd = open_fd()
        while written < {ATTEMPT_MIB}:
            os.write(fd, b'x' * (1 << 20))
            written += 1
        print('WROTE', written)
    except OSError as e:
        print(errno.errorcode[e.errno], written)
"#
    )
}

/// Run `fill` on what `opener` (a Python expression giving a descriptor)
/// opens, in a new session; check the neighbour and the host; return how
/// the write ended and the MiB written.
async fn fill_past_limit(s: &Server, opener: &str) -> (String, u64) {
    let (end, mib, _) = fill_in_new_session(s, opener).await;
    (end, mib)
}

/// [`fill_past_limit`], also returning the session.
async fn fill_in_new_session(s: &Server, opener: &str) -> (String, u64, String) {
    let neighbour = s.exec("n = 1", None).await["session_id"].as_str().unwrap().to_string();
    let before = host_disk_bytes(s.data.path());
    let code = format!("{}fill(lambda: {opener})", filler());
    let d = s.exec(&code, None).await;
    assert_eq!(text_of(&d, "error"), "", "unexpected error output");
    let (out, id) = (text_of(&d, "stdout"), d["session_id"].as_str().unwrap().to_string());
    let grown = host_disk_bytes(s.data.path()).saturating_sub(before);
    assert!(grown < HOST_SLACK_MIB << 20, "the host's disk grew by {} MiB: {out}", grown >> 20);
    let d = s.exec("open('small.txt', 'w').write('fine')\nprint(open('small.txt').read(), n)", Some(&neighbour)).await;
    assert_eq!(text_of(&d, "stdout"), "fine 1\n", "the neighbour was harmed: {d}");
    let mut words = out.split_whitespace();
    let end = words.next().unwrap_or_default().to_string();
    (end, words.next().and_then(|w| w.parse().ok()).unwrap_or(u64::MAX), id)
}

fn create(path: &str) -> String {
    format!("os.open({path}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_directory_cannot_fill_the_host_s_disk() {
    let s = limited_server();
    let (end, _) = fill_past_limit(&s, &create("'/run/kiln/big'")).await;
    assert_eq!(end, "EACCES");
    // Nor can its sockets be swapped for links the server would follow.
    let out = stdout_of(
        &s,
        "import os\ntry:\n    os.listdir('/run/kiln'); print('LISTED')\nexcept OSError as e:\n    print(e.strerror)",
    )
    .await;
    assert_eq!(out, "Permission denied\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_s_own_log_is_bounded() {
    // The kernel keeps its real stdout/stderr (the log) open; session code
    // can find it among its descriptors and write there. It lives in the
    // run directory's small tmpfs, charged to the session's memory.
    let s = limited_server();
    let opener = "[int(f) for f in os.listdir('/proc/self/fd') \
                  if (lambda l: l.endswith('kernel.log'))(os.path.realpath('/proc/self/fd/' + f))][0]";
    let (end, mib, id) = fill_in_new_session(&s, opener).await;
    assert_eq!(end, "ENOSPC");
    assert!(mib <= kiln_sandbox::RUN_DIR_BYTES >> 20, "{mib} MiB");
    // It does not take the session's own disk, and the kernel lives on.
    let d = s.exec("import shutil\nprint(shutil.disk_usage('/work').used < (1 << 20))", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "True\n", "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn filling_the_work_dir_gets_enospc_in_that_session_only() {
    let s = limited_server();
    let (end, mib) = fill_past_limit(&s, &create("'/work/big'")).await;
    assert_eq!(end, "ENOSPC");
    assert!(mib <= DISK_MIB, "{mib} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn filling_the_home_directory_gets_enospc_in_that_session_only() {
    let s = limited_server();
    let (end, mib) = fill_past_limit(&s, &create("'/home/user/big'")).await;
    assert_eq!(end, "ENOSPC");
    assert!(mib <= DISK_MIB, "{mib} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn filling_the_runtime_s_layer_gets_enospc_in_that_session_only() {
    // Writes into the shared runtime land in the session's overlay layer.
    let s = limited_server();
    let (end, mib) = fill_past_limit(&s, &create("__import__('sys').prefix + '/big'")).await;
    assert_eq!(end, "ENOSPC");
    assert!(mib <= DISK_MIB, "{mib} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn filling_tmp_gets_enospc_in_that_session_only() {
    let s = limited_server();
    let (end, mib) = fill_past_limit(&s, &create("'/tmp/big'")).await;
    assert_eq!(end, "ENOSPC");
    assert!(mib <= TMP_MIB, "{mib} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn filling_shared_memory_gets_enospc_in_that_session_only() {
    let s = limited_server();
    let (end, mib) = fill_past_limit(&s, &create("'/dev/shm/big'")).await;
    assert_eq!(end, "ENOSPC");
    assert!(mib <= TMP_MIB, "{mib} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_cannot_take_every_pseudo_terminal() {
    // The kernel's pty limit is shared by every devpts instance; each
    // session's has its own bound (64), so the others keep theirs.
    let s = start(&["--pool-size", "2"]);
    let neighbour = s.exec("n = 1", None).await["session_id"].as_str().unwrap().to_string();
    let d = s
        .exec(
            "import os, errno\nheld = []\ntry:\n    while len(held) < 200:\n        held.append(os.openpty())\n\
             except OSError as e:\n    print(errno.errorcode[e.errno], len(held))\nelse:\n    print('OPENED', len(held))",
            None,
        )
        .await;
    let out = text_of(&d, "stdout");
    let mut words = out.split_whitespace();
    assert_eq!(words.next(), Some("ENOSPC"), "{out}");
    let held: usize = words.next().unwrap().parse().unwrap();
    assert!(held <= 64, "{out}");
    // While that session holds all of its own, the neighbour gets one.
    let d = s.exec("import os\nm, t = os.openpty()\nprint(os.ttyname(t))", Some(&neighbour)).await;
    assert!(text_of(&d, "stdout").starts_with("/dev/pts/"), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_place_a_session_can_write_is_size_limited() {
    // The audit behind the tests above, so that a writable place added
    // later cannot be forgotten: every mount the session user can write to
    // is a size-limited tmpfs, the overlay whose upper layer is on one
    // (checked on the host), a devpts (bounded above) or a device node.
    let s = start(&[]);
    let out = stdout_of(
        &s,
        r#"import os
for line in open('/proc/self/mountinfo'):
    f = line.split()
    point, opts = f[4], f[5].split(',')
    fstype, super_opts = f[f.index('-') + 1], f[f.index('-') + 3]
    if 'rw' in opts and os.access(point, os.W_OK):
        print(point, fstype, os.stat(point).st_rdev, super_opts)"#,
    )
    .await;
    let devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"];
    // Masked /proc files are /dev/null bound over them.
    let null = std::fs::metadata("/dev/null").unwrap().rdev().to_string();
    let mut seen = Vec::new();
    for line in out.lines() {
        let mut f = line.split_whitespace();
        let (point, fstype, rdev) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let opts = f.next().unwrap_or_default();
        seen.push(point.to_string());
        match fstype {
            "tmpfs" => assert!(opts.split(',').any(|o| o.starts_with("size=")), "{line}"),
            "devpts" => assert!(opts.contains("max=64"), "{line}"),
            "devtmpfs" => assert!(devices.contains(&point) || (point.starts_with("/proc/") && rdev == null), "{line}"),
            "overlay" => {
                let upper = opts.split(',').find_map(|o| o.strip_prefix("upperdir=")).unwrap();
                let st = nix::sys::statfs::statfs(upper).unwrap();
                assert_eq!(st.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC, "{line}");
            }
            _ => panic!("writable and not size-limited: {line}"),
        }
    }
    for place in ["/work", "/home/user", "/tmp", "/dev/shm"] {
        assert!(seen.iter().any(|p| p == place), "{place} is not writable: {out}");
    }
    assert!(!seen.iter().any(|p| p.starts_with("/run")), "{out}");
}
