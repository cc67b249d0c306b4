//! Provisioning the runtime: built from the lock, reused when complete,
//! rebuilt when a previous build was interrupted. Uses its own cache dir,
//! so it really builds (pip's download cache keeps it to ~20 s).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

fn build(cache: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["runtime", "build", "--profile", "minimal", "--cache-dir"])
        .arg(cache)
        .output()
        .unwrap()
}

fn runtime_dirs(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cache.join("runtimes")).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()
}

#[test]
fn an_interrupted_build_is_never_used_and_the_next_one_completes() {
    let cache = tempfile::tempdir().unwrap();
    // Start a build and kill it in the middle.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["runtime", "build", "--profile", "minimal", "--cache-dir"])
        .arg(cache.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let started = cache.path().join("runtimes").is_dir()
            && runtime_dirs(cache.path()).iter().any(|d| d.join("bin/python").exists());
        if started {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let dirs = runtime_dirs(cache.path());
    assert_eq!(dirs.len(), 1);
    assert!(!dirs[0].join("kiln-runtime.json").exists(), "an interrupted build must not be marked complete");

    // The next builds notice, start over and complete: two at once, which
    // must not corrupt each other (one builds, the other waits for it).
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["runtime", "build", "--profile", "minimal", "--cache-dir"])
            .arg(cache.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (out, other) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    assert_eq!(out.stdout, other.stdout, "both builds must report the same runtime");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let root = stdout.lines().find_map(|l| l.strip_prefix("runtime ready: ")).unwrap().to_string();
    assert!(std::path::Path::new(&root).join("kiln-runtime.json").is_file());
    let imports = Command::new(std::path::Path::new(&root).join("bin/python"))
        .args(["-c", "import ipykernel, matplotlib, numpy, pandas; print('ok')"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&imports.stdout), "ok\n");

    // A complete runtime is reused as it is.
    let t0 = std::time::Instant::now();
    let again = build(cache.path());
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
    assert!(t0.elapsed() < Duration::from_secs(10), "reuse should not rebuild: {:?}", t0.elapsed());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("installing"));
}
