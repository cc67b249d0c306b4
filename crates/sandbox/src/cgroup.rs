//! Per-session cgroups: memory, process count and CPU limits, on either
//! cgroup hierarchy.
//!
//! Hosts differ: this machine kind has the v1 controllers (memory, pids, cpu
//! as separate hierarchies under `/sys/fs/cgroup/<controller>`), most current
//! distributions have the unified v2 hierarchy. [`Cgroup`] hides the
//! difference behind create / join / kill / remove. Every session lives in
//! `kiln/<id>` below each controller, so leftovers of a crashed server are
//! found and removed by listing `kiln/`.

use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// Limits applied to a session's cgroup.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct CgroupLimits {
    /// Memory (RSS + page cache + tmpfs pages) in bytes.
    pub memory_bytes: u64,
    /// Maximum number of processes and threads.
    pub pids: u64,
    /// CPU time as a number of cores (e.g. 1.0).
    pub cpus: f64,
}

/// The cgroup(s) of one session.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    /// One directory per hierarchy the session belongs to.
    pub dirs: Vec<PathBuf>,
    /// Whether this is the v2 hierarchy.
    pub unified: bool,
}

/// Which hierarchy this host offers.
fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").is_file()
}

impl Cgroup {
    /// Create the session's cgroup(s) and apply `limits`.
    pub fn create(id: &str, limits: &CgroupLimits) -> io::Result<Cgroup> {
        let period: u64 = 100_000;
        let quota = ((limits.cpus * period as f64) as u64).max(1000);
        if unified() {
            let parent = Path::new(ROOT).join("kiln");
            std::fs::create_dir_all(&parent)?;
            // Controllers must be enabled for the children of `kiln/`.
            let _ = std::fs::write(
                Path::new(ROOT).join("cgroup.subtree_control"),
                "+memory +pids +cpu",
            );
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids +cpu");
            let dir = parent.join(id);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            std::fs::write(dir.join("pids.max"), limits.pids.to_string())?;
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?;
            return Ok(Cgroup {
                dirs: vec![dir],
                unified: true,
            });
        }
        let mut dirs = Vec::new();
        for (controller, files) in [
            (
                "memory",
                vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())],
            ),
            ("pids", vec![("pids.max", limits.pids.to_string())]),
            (
                "cpu",
                vec![
                    ("cpu.cfs_period_us", period.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            ),
        ] {
            let dir = Path::new(ROOT).join(controller).join("kiln").join(id);
            std::fs::create_dir_all(&dir)?;
            for (file, value) in files {
                std::fs::write(dir.join(file), value)?;
            }
            dirs.push(dir);
        }
        // Without swap limits the memory limit could be dodged by swapping.
        let memsw = Path::new(ROOT)
            .join("memory/kiln")
            .join(id)
            .join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            let _ = std::fs::write(memsw, limits.memory_bytes.to_string());
        }
        Ok(Cgroup {
            dirs,
            unified: false,
        })
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
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Whether the OOM killer acted in this cgroup (the memory limit was
    /// hit and reclaim could not make room).
    pub fn hit_memory_limit(&self) -> bool {
        let killed = |text: String| {
            text.lines()
                .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
        };
        self.dirs.iter().any(|d| {
            ["memory.oom_control", "memory.events"]
                .iter()
                .any(|f| std::fs::read_to_string(d.join(f)).is_ok_and(killed))
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

/// Remove every session cgroup under `kiln/` (leftovers of a crash).
pub fn remove_all() -> usize {
    let mut n = 0;
    let parents: Vec<(PathBuf, bool)> = if unified() {
        vec![(Path::new(ROOT).join("kiln"), true)]
    } else {
        ["memory", "pids", "cpu"]
            .iter()
            .map(|c| (Path::new(ROOT).join(c).join("kiln"), false))
            .collect()
    };
    for (parent, unified) in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                Cgroup {
                    dirs: vec![e.path()],
                    unified,
                }
                .remove();
                n += 1;
            }
        }
    }
    n
}
