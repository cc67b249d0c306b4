//! Per-session cgroups: memory, process count and CPU limits, on either
//! cgroup hierarchy.
//!
//! Hosts differ: this machine kind has the v1 controllers (memory, pids, cpu
//! as separate hierarchies under `/sys/fs/cgroup/<controller>`), most current
//! distributions have the unified v2 hierarchy. [`Cgroup`] hides the
//! difference behind create / join / kill / remove. Every session lives in
//! `kiln/<instance>/<id>` below each controller, where the instance names
//! one server's data directory ([`instance_name`]): leftovers of a crashed
//! server are found by listing its instance, and two servers on one host
//! never touch each other's sessions.

use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup(s) of one session.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    /// One directory per hierarchy the session belongs to.
    pub dirs: Vec<PathBuf>,
    /// Whether this is the v2 hierarchy.
    pub unified: bool,
}

/// A stable name for the server that owns `sessions_dir`.
pub fn instance_name(sessions_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(sessions_dir.as_os_str().as_encoded_bytes());
    h.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Which hierarchy this host offers.
fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").is_file()
}

impl Cgroup {
    /// Create the session's cgroup(s) and apply `limits`.
    pub fn create(id: &str, limits: &crate::Limits) -> io::Result<Cgroup> {
        let period: u64 = 100_000;
        let quota = ((limits.cpus * period as f64) as u64).max(1000);
        if unified() {
            let dir = Path::new(ROOT).join("kiln").join(id);
            std::fs::create_dir_all(&dir)?;
            // Controllers must be enabled on every level above the session.
            let mut level = Path::new(ROOT).to_path_buf();
            let rel = Path::new("kiln").join(id);
            for part in rel.parent().into_iter().flat_map(|p| p.components()) {
                let _ = std::fs::write(level.join("cgroup.subtree_control"), "+memory +pids +cpu");
                level.push(part);
            }
            let _ = std::fs::write(level.join("cgroup.subtree_control"), "+memory +pids +cpu");
            std::fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            std::fs::write(dir.join("pids.max"), limits.pids.to_string())?;
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?;
            return Ok(Cgroup { dirs: vec![dir], unified: true });
        }
        let mut dirs = Vec::new();
        for (controller, files) in [
            ("memory", vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())]),
            ("pids", vec![("pids.max", limits.pids.to_string())]),
            ("cpu", vec![("cpu.cfs_period_us", period.to_string()), ("cpu.cfs_quota_us", quota.to_string())]),
            // Accounting only: CPU time used, for usage reports.
            ("cpuacct", vec![]),
        ] {
            let dir = Path::new(ROOT).join(controller).join("kiln").join(id);
            std::fs::create_dir_all(&dir)?;
            for (file, value) in files {
                std::fs::write(dir.join(file), value)?;
            }
            dirs.push(dir);
        }
        // Without swap limits the memory limit could be dodged by swapping.
        let memsw = Path::new(ROOT).join("memory/kiln").join(id).join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            let _ = std::fs::write(memsw, limits.memory_bytes.to_string());
        }
        Ok(Cgroup { dirs, unified: false })
    }

    /// Move process `pid` into the cgroup(s).
    pub fn join(&self, pid: u32) -> io::Result<()> {
        for dir in &self.dirs {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = self.dirs.first() else {
            return vec![];
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kill every process in the cgroup.
    pub fn kill(&self) {
        if self.unified {
            if let Some(dir) = self.dirs.first() {
                if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                    return;
                }
            }
        }
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Whether the OOM killer acted in this cgroup (the memory limit was
    /// hit and reclaim could not make room).
    pub fn hit_memory_limit(&self) -> bool {
        let killed = |text: String| text.lines().any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"));
        self.dirs.iter().any(|d| {
            ["memory.oom_control", "memory.events"].iter().any(|f| std::fs::read_to_string(d.join(f)).is_ok_and(killed))
        })
    }

    /// Peak memory use in bytes, if the hierarchy reports it.
    pub fn memory_peak(&self) -> Option<u64> {
        self.dirs.iter().find_map(|d| {
            ["memory.max_usage_in_bytes", "memory.peak"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok()?.trim().parse().ok())
        })
    }

    /// CPU time used by the cgroup's processes so far, seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.dirs.iter().find_map(|d| {
            if let Ok(ns) = std::fs::read_to_string(d.join("cpuacct.usage")) {
                return ns.trim().parse::<f64>().ok().map(|n| n / 1e9);
            }
            let stat = std::fs::read_to_string(d.join("cpu.stat")).ok()?;
            let us = stat.lines().find_map(|l| l.strip_prefix("usage_usec "))?;
            us.trim().parse::<f64>().ok().map(|n| n / 1e6)
        })
    }

    /// Kill what is left and remove the cgroup(s).
    pub fn remove(&self) {
        self.kill();
        for dir in &self.dirs {
            for _ in 0..100 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => {
                        self.kill();
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
    }
}

/// The directories of `instance` in each hierarchy, named by controller
/// (`unified` for the v2 hierarchy).
pub fn instance_dirs(instance: &str) -> Vec<(String, PathBuf)> {
    if unified() {
        return vec![("unified".into(), Path::new(ROOT).join("kiln").join(instance))];
    }
    ["memory", "pids", "cpu", "cpuacct"]
        .iter()
        .map(|c| (c.to_string(), Path::new(ROOT).join(c).join("kiln").join(instance)))
        .collect()
}

/// Remove every session cgroup of `instance` (leftovers of a crash).
pub fn remove_all(instance: &str) -> usize {
    let mut n = 0;
    let parents: Vec<(PathBuf, bool)> = if unified() {
        vec![(Path::new(ROOT).join("kiln").join(instance), true)]
    } else {
        ["memory", "pids", "cpu"].iter().map(|c| (Path::new(ROOT).join(c).join("kiln").join(instance), false)).collect()
    };
    for (parent, unified) in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                Cgroup { dirs: vec![e.path()], unified }.remove();
                n += 1;
            }
        }
    }
    n
}
