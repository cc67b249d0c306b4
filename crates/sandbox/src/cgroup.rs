//! Per-session cgroups: memory, process count and CPU limits, on either
//! cgroup hierarchy, beneath kiln's own cgroup.
//!
//! Hosts differ: this machine kind has the v1 controllers (memory, pids, cpu
//! as separate hierarchies), most current distributions have the unified v2
//! hierarchy, and under systemd, a container runtime or Kubernetes kiln runs
//! in a cgroup of its own whose limits and teardown must cover its
//! sandboxes. So kiln reads where it is (`/proc/self/cgroup`), where each
//! hierarchy is mounted (`/proc/self/mountinfo`), and puts every sandbox at
//! `<own cgroup>/kiln/<instance>/<kernel>` ([`plan`], pure and unit-tested):
//!
//! - v1: in each of the memory, pids, cpu and cpuacct hierarchies;
//! - v2: a cgroup with processes cannot also give controllers to children
//!   (the "no internal processes" rule), so, as a systemd-delegated service
//!   does, kiln first moves itself (and whatever else is in its cgroup) into
//!   the leaf `<own>/server`, then enables memory, pids and cpu in
//!   `<own>/cgroup.subtree_control`. A second kiln started from that leaf
//!   shares the same base rather than nesting deeper.
//!
//! [`Cgroup`] hides the difference behind create / join / kill / remove.

use std::io;
use std::path::{Path, PathBuf};

/// The v1 controllers a sandbox is placed in (cpuacct for accounting).
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "cpuacct"];
/// The v2 controllers a sandbox needs.
const V2_CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];
/// The leaf kiln moves itself into on v2.
pub(crate) const SERVER_LEAF: &str = "server";

/// One line of `/proc/self/cgroup`: `id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    /// Hierarchy id (0 for v2).
    pub id: u32,
    /// The v1 controllers of the hierarchy (empty for v2).
    pub controllers: Vec<String>,
    /// The cgroup, relative to the hierarchy's root.
    pub path: PathBuf,
}

/// Parse `/proc/self/cgroup` (v1, v2 or hybrid).
pub(crate) fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?.parse().ok()?;
            let controllers = parts.next()?.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
            let path = PathBuf::from(parts.next()?);
            Some(Membership { id, controllers, path })
        })
        .collect()
}

/// A mounted cgroup hierarchy, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// The cgroup the mount shows (its root within the hierarchy).
    pub root: PathBuf,
    /// Where it is mounted.
    pub point: PathBuf,
    /// v2.
    pub unified: bool,
    /// The v1 controllers it carries (from its super options).
    pub controllers: Vec<String>,
}

/// The cgroup mounts listed in `/proc/self/mountinfo`.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root point options [optional...] - fstype source super
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let (root, point) = (fields.get(3)?, fields.get(4)?);
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next();
            let super_opts = right.next().unwrap_or_default();
            let unified = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let controllers = if unified {
                vec![]
            } else {
                super_opts.split(',').filter(|o| V1_CONTROLLERS.contains(o)).map(str::to_string).collect()
            };
            Some(Mount { root: unescape(root).into(), point: unescape(point).into(), unified, controllers })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(char::from(b)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where a server's cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// v1: the instance's directory in each controller's hierarchy.
    Legacy { dirs: Vec<(String, PathBuf)> },
    /// v2.
    Unified {
        /// The cgroup whose children the sandboxes' cgroups are: kiln's own,
        /// or, when kiln already runs in a `server` leaf made by an earlier
        /// kiln, that leaf's parent.
        base: PathBuf,
        /// Move kiln (and what shares its cgroup) into this leaf first, when
        /// it still runs in `base` itself.
        leaf: Option<PathBuf>,
        /// `base/kiln/<instance>`.
        instance: PathBuf,
    },
}

/// Where the cgroups of `instance` go, given this process's memberships,
/// the cgroup mounts, and (v2) the `cgroup.subtree_control` of the parent
/// of kiln's own cgroup. v1 is used wherever the controllers are on v1
/// hierarchies (a hybrid host's v2 mount then has none of them).
pub(crate) fn plan(
    members: &[Membership],
    mounts: &[Mount],
    parent_subtree_control: Option<&str>,
    instance: &str,
) -> Result<Plan, String> {
    let resolve = |mount: &Mount, path: &Path| -> Result<PathBuf, String> {
        // The mount shows `mount.root` of the hierarchy at `mount.point`
        // (a container sees its own cgroup as the root).
        let rel = path.strip_prefix(&mount.root).map_err(|_| {
            format!(
                "kiln's cgroup {} is outside the mounted part {} of its hierarchy",
                path.display(),
                mount.root.display()
            )
        })?;
        Ok(mount.point.join(rel))
    };
    let v1 = |c: &str| {
        let member = members.iter().find(|m| m.id != 0 && m.controllers.iter().any(|x| x == c))?;
        let mount = mounts.iter().find(|m| !m.unified && m.controllers.iter().any(|x| x == c))?;
        Some((member, mount))
    };
    if V2_CONTROLLERS.iter().all(|c| v1(c).is_some()) {
        let mut dirs = Vec::new();
        for c in V1_CONTROLLERS {
            if let Some((member, mount)) = v1(c) {
                dirs.push((c.to_string(), resolve(mount, &member.path)?.join("kiln").join(instance)));
            }
        }
        return Ok(Plan::Legacy { dirs });
    }
    let member = members.iter().find(|m| m.id == 0).ok_or("no cgroup v2 membership and no v1 controllers")?;
    let mount = mounts.iter().find(|m| m.unified).ok_or("the cgroup v2 hierarchy is not mounted")?;
    let own = resolve(mount, &member.path)?;
    let enabled =
        |text: Option<&str>| text.is_some_and(|t| V2_CONTROLLERS.iter().all(|c| t.split_whitespace().any(|x| x == *c)));
    // A leaf an earlier kiln made: its parent already delegates the
    // controllers, and more kilns belong beside that one, not below it.
    let in_leaf = own.file_name().is_some_and(|n| n == SERVER_LEAF) && enabled(parent_subtree_control);
    let (base, leaf) = match own.parent() {
        Some(parent) if in_leaf => (parent.to_path_buf(), None),
        _ => (own.clone(), Some(own.join(SERVER_LEAF))),
    };
    let instance = base.join("kiln").join(instance);
    Ok(Plan::Unified { base, leaf, instance })
}

impl Plan {
    /// The instance's directories, named by controller (`unified` on v2).
    pub(crate) fn instance_dirs(&self) -> Vec<(String, PathBuf)> {
        match self {
            Plan::Legacy { dirs } => dirs.clone(),
            Plan::Unified { instance, .. } => vec![("unified".into(), instance.clone())],
        }
    }
}

/// Limits applied to a session's cgroup(s), as files to write.
fn limit_files(limits: &crate::Limits, unified: bool) -> Vec<(&'static str, &'static str, String)> {
    let period: u64 = 100_000;
    let quota = ((limits.cpus * period as f64) as u64).max(1000);
    if unified {
        return vec![
            ("", "memory.max", limits.memory_bytes.to_string()),
            ("", "pids.max", limits.pids.to_string()),
            ("", "cpu.max", format!("{quota} {period}")),
        ];
    }
    vec![
        ("memory", "memory.limit_in_bytes", limits.memory_bytes.to_string()),
        ("pids", "pids.max", limits.pids.to_string()),
        ("cpu", "cpu.cfs_period_us", period.to_string()),
        ("cpu", "cpu.cfs_quota_us", quota.to_string()),
    ]
}

/// A CPU weight in cgroup v2's terms: 1 to 10000, 100 being every
/// sandbox's default share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuWeight(u16);

impl CpuWeight {
    /// The weight every sandbox starts with.
    pub const DEFAULT: CpuWeight = CpuWeight(100);
    /// The least weight: CPU only when nothing weightier wants it.
    pub const IDLE: CpuWeight = CpuWeight(1);

    /// A weight, clamped to 1..=10000.
    pub fn new(weight: u16) -> CpuWeight {
        CpuWeight(weight.clamp(1, 10_000))
    }
}

/// The cgroup(s) of one session.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Cgroup {
    /// One directory per hierarchy the session belongs to.
    pub dirs: Vec<PathBuf>,
    /// Whether this is the v2 hierarchy.
    pub unified: bool,
}

impl Cgroup {
    /// Create the cgroup(s) `name` in the instance directories of `plan`
    /// and apply `limits`.
    pub(crate) fn create(plan: &Plan, name: &str, limits: &crate::Limits) -> io::Result<Cgroup> {
        let (parents, unified): (Vec<(String, PathBuf)>, bool) = match plan {
            Plan::Legacy { dirs } => (dirs.clone(), false),
            Plan::Unified { instance, .. } => (vec![(String::new(), instance.clone())], true),
        };
        let mut dirs = Vec::new();
        for (controller, parent) in &parents {
            let dir = parent.join(name);
            std::fs::create_dir_all(&dir)?;
            for (_, file, value) in limit_files(limits, unified).iter().filter(|(c, _, _)| c == controller) {
                std::fs::write(dir.join(file), value)?;
            }
            // Without swap limits the memory limit could be dodged by
            // swapping (where swap accounting exists).
            for file in ["memory.memsw.limit_in_bytes", "memory.swap.max"] {
                if dir.join(file).exists() {
                    let value = if unified { "0".to_string() } else { limits.memory_bytes.to_string() };
                    let _ = std::fs::write(dir.join(file), value);
                }
            }
            dirs.push(dir);
        }
        let cgroup = Cgroup { dirs, unified };
        Ok(cgroup)
    }

    /// Move process `pid` into the cgroup(s).
    pub(crate) fn join(&self, pid: u32) -> io::Result<()> {
        for dir in &self.dirs {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Signal every process in the cgroup once, without waiting for them
    /// to go (see [`remove_tree`] for that).
    pub(crate) fn kill(&self) {
        for dir in &self.dirs {
            kill_once(dir, self.unified);
        }
    }

    /// Whether the OOM killer acted in this cgroup (the memory limit was
    /// hit and reclaim could not make room).
    pub(crate) fn hit_memory_limit(&self) -> bool {
        self.oom_kills().is_some_and(|n| n > 0)
    }

    /// How many processes the OOM killer has killed in this cgroup so far
    /// (`oom_kill` of v1's `memory.oom_control`, v2's `memory.events`);
    /// `None` when neither can be read (the cgroup was removed).
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        let count = |text: String| {
            text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse::<u64>().ok())
        };
        self.dirs
            .iter()
            .flat_map(|d| ["memory.oom_control", "memory.events"].map(|f| d.join(f)))
            .filter_map(|f| std::fs::read_to_string(f).ok().and_then(count))
            .max()
    }

    /// Set the CPU weight: how much CPU the sandbox gets against the others
    /// when the machine is busy (`cpu.weight` on v2, 1 to 10000, 100 by
    /// default; `cpu.shares` on v1, the same proportion of 1024).
    pub(crate) fn set_cpu_weight(&self, weight: CpuWeight) -> io::Result<()> {
        for dir in &self.dirs {
            let (file, value) = if self.unified {
                ("cpu.weight", weight.0.to_string())
            } else {
                ("cpu.shares", (u64::from(weight.0) * 1024 / 100).max(2).to_string())
            };
            if dir.join(file).exists() {
                std::fs::write(dir.join(file), value)?;
            }
        }
        Ok(())
    }

    /// Change the memory limit (and, on v1, the memory+swap limit with it,
    /// in the order the kernel accepts: the smaller one first when
    /// lowering). Fails with `EBUSY` on v1 when the cgroup already uses
    /// more than `bytes` and reclaim cannot make room.
    pub(crate) fn set_memory_limit(&self, bytes: u64) -> io::Result<()> {
        for dir in &self.dirs {
            if self.unified {
                if dir.join("memory.max").exists() {
                    std::fs::write(dir.join("memory.max"), bytes.to_string())?;
                }
                continue;
            }
            let limit = dir.join("memory.limit_in_bytes");
            if !limit.exists() {
                continue;
            }
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            let current: u64 = std::fs::read_to_string(&limit)?.trim().parse().unwrap_or(u64::MAX);
            let files = if bytes < current { [&limit, &memsw] } else { [&memsw, &limit] };
            for f in files {
                if f.exists() {
                    std::fs::write(f, bytes.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Peak memory use in bytes, if the hierarchy reports it.
    pub(crate) fn memory_peak(&self) -> Option<u64> {
        self.dirs.iter().find_map(|d| {
            ["memory.max_usage_in_bytes", "memory.peak"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok()?.trim().parse().ok())
        })
    }

    /// CPU time used by the cgroup's processes so far, seconds.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
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
    pub(crate) fn remove(&self) {
        for dir in &self.dirs {
            remove_tree(dir, self.unified);
        }
    }
}

/// SIGKILL every process listed in the cgroup `dir` now (on v2 with
/// `cgroup.kill`, all at once).
fn kill_once(dir: &Path, unified: bool) {
    if unified && std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for pid in pids {
        signal_if_member(pid, dir);
    }
}

/// SIGKILL `pid` if it is (still) a member of the cgroup `dir`: the pid is
/// pinned with a pidfd first, so that a pid reused after being listed is
/// never signalled (a reused pid is in another cgroup, and the pidfd of an
/// exited process refuses signals).
fn signal_if_member(pid: i32, dir: &Path) {
    let Some(p) = rustix::process::Pid::from_raw(pid) else { return };
    let Ok(fd) = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) else { return };
    let member = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        parse_proc_cgroup(&text).iter().any(|m| {
            let rel = m.path.strip_prefix("/").unwrap_or(&m.path);
            !rel.as_os_str().is_empty() && dir.ends_with(rel)
        })
    });
    if member {
        let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
    }
}

/// Kill everything in the cgroup tree at `dir` and remove it, children
/// first. Removal of a cgroup whose last process is still exiting fails
/// with EBUSY for a moment: retried.
pub(crate) fn remove_tree(dir: &Path, unified: bool) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path(), unified);
            }
        }
    }
    // Ten seconds at most: a teardown takes milliseconds, but a loaded host
    // can stretch it far, and giving up leaves a cgroup behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) if std::time::Instant::now() >= deadline => break,
            // Busy: its processes are still exiting (a killed sandbox's
            // address spaces take a moment to tear down), or something is
            // left that the pid namespace did not take with it.
            Err(_) => {
                kill_once(dir, unified);
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
        }
    }
    tracing::warn!(dir = %dir.display(), "could not remove a cgroup");
}

/// This process's plan for `instance`, read from the host.
pub(crate) fn host_plan(instance: &str) -> Result<Plan, String> {
    let members = parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?);
    let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?);
    // For v2, whether an earlier kiln's leaf is what we run in.
    let parent_control = members.iter().find(|m| m.id == 0).and_then(|m| {
        let mount = mounts.iter().find(|x| x.unified)?;
        let own = mount.point.join(m.path.strip_prefix(&mount.root).ok()?);
        std::fs::read_to_string(own.parent()?.join("cgroup.subtree_control")).ok()
    });
    plan(&members, &mounts, parent_control.as_deref(), instance)
}

/// Make the plan's cgroups usable: on v2, move kiln out of its base into
/// the leaf and give the base's children the controllers. Blocking.
pub(crate) fn prepare(plan: &Plan) -> io::Result<()> {
    let Plan::Unified { base, leaf, instance } = plan else {
        return Ok(());
    };
    let enable = || std::fs::write(base.join("cgroup.subtree_control"), "+memory +pids +cpu");
    if let Some(leaf) = leaf {
        std::fs::create_dir_all(leaf)?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
        if let Err(first) = enable() {
            // Others share kiln's cgroup (a wrapper script, a test
            // harness): they move too, or no controller can be enabled.
            let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
                let _ = std::fs::write(leaf.join("cgroup.procs"), pid.trim());
            }
            enable().map_err(|e| io::Error::new(e.kind(), format!("{first}; after moving every process: {e}")))?;
        }
    }
    std::fs::create_dir_all(instance)
}

/// Remove the instance's directories (and the shared `kiln` parent, once
/// empty). Blocking.
pub(crate) fn remove_instance(plan: &Plan) {
    let (dirs, unified): (Vec<PathBuf>, bool) = match plan {
        Plan::Legacy { dirs } => (dirs.iter().map(|(_, d)| d.clone()).collect(), false),
        Plan::Unified { instance, .. } => (vec![instance.clone()], true),
    };
    for dir in dirs {
        remove_tree(&dir, unified);
        // Another kiln may be using it: then it is not empty, and stays.
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_weight_is_written_in_each_hierarchy_s_own_terms() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v1.join("cpu.shares"), "1024").unwrap();
        std::fs::write(v2.join("cpu.weight"), "100").unwrap();
        let legacy = Cgroup { dirs: vec![v1.clone()], unified: false };
        let unified = Cgroup { dirs: vec![v2.clone()], unified: true };
        legacy.set_cpu_weight(CpuWeight::IDLE).unwrap();
        unified.set_cpu_weight(CpuWeight::IDLE).unwrap();
        assert_eq!(std::fs::read_to_string(v1.join("cpu.shares")).unwrap(), "10");
        assert_eq!(std::fs::read_to_string(v2.join("cpu.weight")).unwrap(), "1");
        legacy.set_cpu_weight(CpuWeight::DEFAULT).unwrap();
        unified.set_cpu_weight(CpuWeight::new(50_000)).unwrap();
        assert_eq!(std::fs::read_to_string(v1.join("cpu.shares")).unwrap(), "1024");
        assert_eq!(std::fs::read_to_string(v2.join("cpu.weight")).unwrap(), "10000", "clamped");
        // A hierarchy without the file (cpu not delegated) is left alone.
        let bare = Cgroup { dirs: vec![dir.path().to_path_buf()], unified: true };
        bare.set_cpu_weight(CpuWeight::IDLE).unwrap();
        assert!(!dir.path().join("cpu.weight").exists());
    }

    #[test]
    fn oom_kills_are_read_from_either_hierarchy_s_file_and_unknown_once_the_cgroup_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (pids, memory, v2) = (dir.path().join("pids"), dir.path().join("memory"), dir.path().join("v2"));
        for d in [&pids, &memory, &v2] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(memory.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        std::fs::write(v2.join("memory.events"), "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 7\n")
            .unwrap();
        let legacy = Cgroup { dirs: vec![pids.clone(), memory.clone()], unified: false };
        let unified = Cgroup { dirs: vec![v2.clone()], unified: true };
        assert_eq!((legacy.oom_kills(), unified.oom_kills()), (Some(3), Some(2)));
        assert!(legacy.hit_memory_limit());
        std::fs::remove_dir_all(&memory).unwrap();
        assert_eq!(legacy.oom_kills(), None, "no memory hierarchy left to read");
        assert!(!legacy.hit_memory_limit());
    }

    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/6f00\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    const V1_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
32 25 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V2: &str = "0::/system.slice/kiln.service\n";
    const V2_MOUNTS: &str =
        "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn proc_self_cgroup_parses_on_v1_v2_and_hybrid_hosts() {
        let m = parse_proc_cgroup(HYBRID);
        assert_eq!(m.len(), 6);
        assert_eq!(m[2], Membership { id: 4, controllers: vec!["memory".into()], path: "/process_api/6f00".into() });
        assert_eq!(m[5], Membership { id: 0, controllers: vec![], path: "/".into() });
        assert_eq!(
            parse_proc_cgroup(V2),
            vec![Membership { id: 0, controllers: vec![], path: "/system.slice/kiln.service".into() }]
        );
        let combined = parse_proc_cgroup("3:cpu,cpuacct:/user.slice\n");
        assert_eq!(combined[0].controllers, vec!["cpu".to_string(), "cpuacct".to_string()]);
        assert!(parse_proc_cgroup("garbage\n\n").is_empty());
    }

    #[test]
    fn mountinfo_yields_the_cgroup_mounts_with_their_controllers() {
        let m = parse_mountinfo(V1_MOUNTS);
        assert_eq!(m.len(), 5);
        assert_eq!(m[2].point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m[2].controllers, vec!["memory".to_string()]);
        assert!(m[4].unified && m[4].controllers.is_empty());
        let other = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n40 25 0:31 /docker/ab /sys/fs/cgroup/cpu\\040x rw - cgroup cgroup rw,cpu,cpuacct\n";
        let m = parse_mountinfo(other);
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].root.as_path(), m[0].point.as_path()),
            (Path::new("/docker/ab"), Path::new("/sys/fs/cgroup/cpu x"))
        );
        assert_eq!(m[0].controllers, vec!["cpu".to_string(), "cpuacct".to_string()]);
    }

    #[test]
    fn on_v1_sandboxes_go_beneath_kilns_own_cgroup_in_each_hierarchy() {
        let plan = plan(&parse_proc_cgroup(HYBRID), &parse_mountinfo(V1_MOUNTS), None, "i1").unwrap();
        let Plan::Legacy { dirs } = plan else { panic!("{plan:?}") };
        let dir = |c: &str| dirs.iter().find(|(x, _)| x == c).map(|(_, d)| d.clone()).unwrap();
        assert_eq!(dir("memory"), PathBuf::from("/sys/fs/cgroup/memory/process_api/6f00/kiln/i1"));
        assert_eq!(dir("pids"), PathBuf::from("/sys/fs/cgroup/pids/kiln/i1"));
        assert_eq!(dir("cpuacct"), PathBuf::from("/sys/fs/cgroup/cpuacct/kiln/i1"));
    }

    #[test]
    fn in_a_container_the_mount_root_is_stripped_from_kilns_cgroup() {
        let members = parse_proc_cgroup("5:memory:/docker/ab\n4:pids:/docker/ab\n3:cpu,cpuacct:/docker/ab\n");
        let mounts = parse_mountinfo(
            "1 0 0:1 /docker/ab /sys/fs/cgroup/memory rw - cgroup c rw,memory\n\
             2 0 0:2 /docker/ab /sys/fs/cgroup/pids rw - cgroup c rw,pids\n\
             3 0 0:3 /docker/ab /sys/fs/cgroup/cpu,cpuacct rw - cgroup c rw,cpu,cpuacct\n",
        );
        let Ok(Plan::Legacy { dirs }) = plan(&members, &mounts, None, "i") else { panic!() };
        assert!(dirs.contains(&("memory".into(), "/sys/fs/cgroup/memory/kiln/i".into())));
        assert!(dirs.contains(&("cpuacct".into(), "/sys/fs/cgroup/cpu,cpuacct/kiln/i".into())));
        assert_eq!(dirs.len(), 4);
    }

    #[test]
    fn on_v2_kiln_moves_into_a_server_leaf_and_sandboxes_go_beside_it() {
        let plan = plan(&parse_proc_cgroup(V2), &parse_mountinfo(V2_MOUNTS), Some("cpu memory pids"), "i2").unwrap();
        assert_eq!(
            plan,
            Plan::Unified {
                base: "/sys/fs/cgroup/system.slice/kiln.service".into(),
                leaf: Some("/sys/fs/cgroup/system.slice/kiln.service/server".into()),
                instance: "/sys/fs/cgroup/system.slice/kiln.service/kiln/i2".into(),
            }
        );
    }

    #[test]
    fn on_v2_a_second_kiln_in_the_leaf_shares_the_base_instead_of_nesting() {
        let members = parse_proc_cgroup("0::/system.slice/kiln.service/server\n");
        let mounts = parse_mountinfo(V2_MOUNTS);
        let plan_with = |parent: Option<&str>| plan(&members, &mounts, parent, "i3").unwrap();
        assert_eq!(
            plan_with(Some("memory pids cpu io")),
            Plan::Unified {
                base: "/sys/fs/cgroup/system.slice/kiln.service".into(),
                leaf: None,
                instance: "/sys/fs/cgroup/system.slice/kiln.service/kiln/i3".into(),
            }
        );
        // A leaf named `server` whose parent delegates nothing is just kiln's
        // own cgroup.
        let Plan::Unified { leaf, .. } = plan_with(Some("io")) else { panic!() };
        assert_eq!(leaf, Some("/sys/fs/cgroup/system.slice/kiln.service/server/server".into()));
    }

    #[test]
    fn a_v2_container_with_its_own_cgroup_namespace_uses_its_root() {
        let plan = plan(&parse_proc_cgroup("0::/\n"), &parse_mountinfo(V2_MOUNTS), None, "i").unwrap();
        let Plan::Unified { base, leaf, .. } = plan else { panic!() };
        assert_eq!((base, leaf), ("/sys/fs/cgroup".into(), Some("/sys/fs/cgroup/server".into())));
    }

    #[test]
    fn a_host_without_usable_cgroups_is_an_error() {
        assert!(plan(&parse_proc_cgroup("0::/\n"), &[], None, "i").is_err());
        assert!(plan(&[], &parse_mountinfo(V1_MOUNTS), None, "i").is_err());
    }

    #[test]
    fn limits_become_the_files_of_each_hierarchy() {
        let limits =
            crate::Limits { memory_bytes: 1 << 30, pids: 64, cpus: 1.5, disk_bytes: 0, tmp_bytes: 0, nofile: 0 };
        let v2 = limit_files(&limits, true);
        assert!(v2.contains(&("", "cpu.max", "150000 100000".into())));
        assert!(v2.contains(&("", "memory.max", (1u64 << 30).to_string())));
        let v1 = limit_files(&limits, false);
        assert!(v1.contains(&("cpu", "cpu.cfs_quota_us", "150000".into())));
        assert!(v1.contains(&("pids", "pids.max", "64".into())));
    }
}
