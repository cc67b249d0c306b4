//! Building a runtime: find Python, create the venv, install the lock,
//! warm caches, verify, and only then mark it complete.

use crate::{mpl_config_dir, Profile, Progress, Runtime, RuntimeConfig, RuntimeError};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MARKER: &str = "kiln-runtime.json";
const STAGES: usize = 4;

/// Return the runtime for `cfg`, building it first if it is missing or
/// incomplete, with kiln's current `kiln_kernel` package in it. Blocking:
/// call from a blocking thread.
pub fn ensure(cfg: &RuntimeConfig, progress: &mut Progress) -> Result<Runtime, RuntimeError> {
    let runtime = ensure_packages(cfg, progress)?;
    runtime.install_kernel_package()?;
    Ok(runtime)
}

fn ensure_packages(cfg: &RuntimeConfig, progress: &mut Progress) -> Result<Runtime, RuntimeError> {
    let (python, version) = base_python(cfg.python.as_deref())?;
    let lock = cfg.profile.lock();
    let mut h = Sha256::new();
    h.update(lock.as_bytes());
    h.update(python.as_os_str().as_encoded_bytes());
    h.update(version.as_bytes());
    let key: String = h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
    let runtimes = cfg.cache_dir.join("runtimes");
    std::fs::create_dir_all(&runtimes).map_err(io("create", &runtimes))?;
    let root = runtimes.join(format!("{}-py{}-{key}", cfg.profile.name(), version));
    let runtime = Runtime { root: root.clone(), profile: cfg.profile };

    if is_complete(&root) {
        return Ok(runtime);
    }
    // Serialise builds of this runtime across processes; the lock is
    // released when the file closes (also if this process dies).
    let lock_path = root.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("open", &lock_path))?;
    if rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        progress.note("waiting for another build of this runtime to finish");
        rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| RuntimeError::Io {
            what: "lock",
            path: lock_path.clone(),
            source: e.into(),
        })?;
    }
    if is_complete(&root) {
        return Ok(runtime);
    }
    let started = Instant::now();
    build(cfg.profile, &python, &root, progress)?;
    progress.done();
    tracing::info!(
        runtime = %root.display(),
        seconds = started.elapsed().as_secs_f64(),
        "runtime ready"
    );
    drop(lock_file);
    Ok(runtime)
}

fn is_complete(root: &Path) -> bool {
    root.join(MARKER).is_file()
}

fn build(profile: Profile, base: &Path, root: &Path, p: &mut Progress) -> Result<(), RuntimeError> {
    // A directory without the marker is a half-done build: start over.
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(io("remove the incomplete runtime", root))?;
    }

    p.stage(1, STAGES, "creating the virtual environment", 0);
    run("python -m venv", Command::new(base).arg("-m").arg("venv").arg(root))?;

    let lock_path = root.join("kiln-lock.txt");
    std::fs::write(&lock_path, profile.lock()).map_err(io("write", &lock_path))?;
    let total = profile.lock().lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).count();
    p.stage(2, STAGES, "downloading packages", total as u64);
    pip_install(root, &lock_path, p)?;

    p.stage(3, STAGES, "warming caches (matplotlib fonts)", 0);
    let mpl = mpl_config_dir(root);
    std::fs::create_dir_all(&mpl).map_err(io("create", &mpl))?;
    run(
        "building the matplotlib font cache",
        Command::new(root.join("bin/python"))
            .args(["-c", "import matplotlib.pyplot"])
            .env("MPLCONFIGDIR", &mpl)
            .env("MPLBACKEND", "agg"),
    )?;

    p.stage(4, STAGES, "verifying imports", 0);
    let imports = format!("import {}", profile.smoke_imports().join(", "));
    run(
        "the import check",
        Command::new(root.join("bin/python")).args(["-c", &imports]).env("MPLCONFIGDIR", &mpl).env("MPLBACKEND", "agg"),
    )?;

    if profile.languages().contains(&kiln_protocol::Language::Javascript) {
        run("the Deno check", Command::new(root.join("bin/deno")).arg("--version"))?;
    }

    // Last: the marker, written atomically.
    let marker = serde_json::json!({
        "profile": profile.name(),
        "python": base,
        "built_at_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let mut tmp = tempfile::NamedTempFile::new_in(root).map_err(io("write the marker in", root))?;
    tmp.write_all(marker.to_string().as_bytes()).map_err(io("write the marker in", root))?;
    tmp.persist(root.join(MARKER)).map_err(|e| RuntimeError::Io {
        what: "write",
        path: root.join(MARKER),
        source: e.error,
    })?;
    Ok(())
}

/// `pip install --no-deps -r lock`, turning its output into progress.
fn pip_install(root: &Path, lock: &Path, p: &mut Progress) -> Result<(), RuntimeError> {
    let mut child = Command::new(root.join("bin/python"))
        .args(["-m", "pip", "install", "--no-deps", "--no-input", "--progress-bar", "off"])
        .args(["--disable-pip-version-check", "-r"])
        .arg(lock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("run pip from", root))?;
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
    let mut log = Vec::new();
    if let Some(out) = child.stdout.take() {
        let mut installing = false;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let t = line.trim();
            if let Some(pkg) = t.strip_prefix("Collecting ").or_else(|| t.strip_prefix("Processing ")) {
                p.step(pkg);
            } else if let Some(d) = t.strip_prefix("Downloading ") {
                p.note(d);
            } else if t.starts_with("Installing collected packages") && !installing {
                installing = true;
                p.stage(2, STAGES, "installing packages", 0);
            }
            log.push(line);
        }
    }
    let status = child.wait().map_err(io("wait for pip in", root))?;
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        log.extend(stderr.lines().map(str::to_string));
        return Err(RuntimeError::Step {
            step: "pip install",
            status: status.to_string(),
            output: last_lines(&log.join("\n"), 25),
        });
    }
    Ok(())
}

/// The base interpreter and its `major.minor` version.
fn base_python(explicit: Option<&Path>) -> Result<(PathBuf, String), RuntimeError> {
    let candidate = explicit.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("python3"));
    let tried = candidate.display().to_string();
    let out = Command::new(&candidate)
        .args([
            "-c",
            "import sys; print(sys._base_executable); print('%d.%d' % sys.version_info[:2]); \
             import venv, ensurepip",
        ])
        .output()
        .map_err(|e| RuntimeError::NoPython { tried: tried.clone(), reason: e.to_string() })?;
    if !out.status.success() {
        return Err(RuntimeError::NoPython {
            tried,
            reason: format!(
                "it cannot create virtual environments: {}",
                last_lines(&String::from_utf8_lossy(&out.stderr), 3)
            ),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let exe = lines.next().unwrap_or_default().trim().to_string();
    let version = lines.next().unwrap_or_default().trim().to_string();
    let minor: u32 = version.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0);
    if !version.starts_with("3.") || minor < 10 {
        return Err(RuntimeError::NoPython { tried, reason: format!("version {version} is below 3.10") });
    }
    Ok((PathBuf::from(exe), version))
}

fn run(step: &'static str, cmd: &mut Command) -> Result<(), RuntimeError> {
    let out = cmd.output().map_err(|e| RuntimeError::Step {
        step,
        status: "could not start".into(),
        output: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(RuntimeError::Step { step, status: out.status.to_string(), output: last_lines(&text, 25) })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.to_path_buf();
    move |source| RuntimeError::Io { what, path, source }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
