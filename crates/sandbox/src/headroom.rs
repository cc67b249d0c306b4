//! How much memory this server could still give to sessions.
//!
//! On a bare host that is what the kernel calls available (`MemAvailable`).
//! But kiln usually runs in a cgroup with a memory limit of its own: a
//! Kubernetes pod, a container, a systemd unit with `MemoryMax`. Its
//! sandboxes live beneath that cgroup (see [`crate::cgroup`]), so the limit
//! covers them, and a node whose pod is nearly full would otherwise tell
//! its peers it has the whole host's memory free. So the headroom is the
//! least of what the host has and what each limited cgroup from kiln's own
//! up to its hierarchy's root leaves ([`headroom`], pure and unit-tested).
//!
//! A cgroup's use counts its page cache; the part of it that reclaim takes
//! back first (`inactive_file`) is counted as free, as the kubelet does for
//! a pod's working set.

use crate::cgroup::{parse_mountinfo, parse_proc_cgroup};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A v1 limit at or above this is "no limit" (the kernel writes
/// `PAGE_COUNTER_MAX` pages, about 2^63 bytes).
const V1_UNLIMITED: u64 = 1 << 62;

/// One cgroup on the way from kiln's own to its hierarchy's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Level {
    /// Its memory limit; `None` when it has none.
    pub limit: Option<u64>,
    /// What its processes use, page cache included, bytes.
    pub usage: u64,
    /// Page cache that reclaim takes back first, bytes.
    pub inactive_file: u64,
}

/// The least of `host` (what the host has available) and what each limited
/// level leaves; `None` when nothing is known.
pub(crate) fn headroom(host: Option<u64>, levels: &[Level]) -> Option<u64> {
    levels
        .iter()
        .filter_map(|l| Some(l.limit?.saturating_sub(l.usage.saturating_sub(l.inactive_file))))
        .chain(host)
        .min()
}

/// Memory this server could still give to sessions, bytes; 0 if unknown.
pub fn memory_available() -> u64 {
    let levels: Vec<Level> = own_dirs().iter().filter_map(|d| read_level(&d.path, d.unified)).collect();
    headroom(host_available(), &levels).unwrap_or(0)
}

/// `MemAvailable` from `/proc/meminfo`, bytes.
fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    Some(kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
}

/// A memory cgroup directory, and which hierarchy it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dir {
    path: PathBuf,
    unified: bool,
}

/// The memory cgroups from kiln's own up to its hierarchy's root (as far
/// as this process can see it), found once: a process's cgroup moves only
/// when kiln moves itself into its v2 leaf at start, whose parent is its
/// old cgroup, so the walk from either covers the same limits.
fn own_dirs() -> &'static [Dir] {
    static DIRS: OnceLock<Vec<Dir>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let (Ok(cgroup), Ok(mountinfo)) =
            (std::fs::read_to_string("/proc/self/cgroup"), std::fs::read_to_string("/proc/self/mountinfo"))
        else {
            return Vec::new();
        };
        own_memory_cgroup(&cgroup, &mountinfo).map_or_else(Vec::new, |(own, top, unified)| {
            own.ancestors()
                .take_while(|p| p.starts_with(&top))
                .map(|p| Dir { path: p.to_path_buf(), unified })
                .collect()
        })
    })
}

/// kiln's own memory cgroup directory, its hierarchy's mount point, and
/// whether that is v2: the v1 memory hierarchy where there is one (a
/// hybrid host's v2 mount then has no memory controller), else v2.
fn own_memory_cgroup(cgroup: &str, mountinfo: &str) -> Option<(PathBuf, PathBuf, bool)> {
    let members = parse_proc_cgroup(cgroup);
    let mounts = parse_mountinfo(mountinfo);
    let memory = |c: &Vec<String>| c.iter().any(|c| c == "memory");
    let (member, mount) = match members.iter().find(|m| memory(&m.controllers)) {
        Some(m) => (m, mounts.iter().find(|x| !x.unified && memory(&x.controllers))?),
        None => (members.iter().find(|m| m.id == 0)?, mounts.iter().find(|x| x.unified)?),
    };
    let rel = member.path.strip_prefix(&mount.root).ok()?;
    Some((mount.point.join(rel), mount.point.clone(), mount.unified))
}

/// One level's limit, use and inactive page cache; `None` where the files
/// are missing (the real root cgroup of v2 has none).
fn read_level(dir: &Path, unified: bool) -> Option<Level> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let number = |name: &str| read(name)?.trim().parse::<u64>().ok();
    let (limit, usage, inactive_key) = if unified {
        let limit = read("memory.max")?;
        let limit = limit.trim();
        (if limit == "max" { None } else { Some(limit.parse().ok()?) }, number("memory.current")?, "inactive_file")
    } else {
        let limit = number("memory.limit_in_bytes")?;
        (Some(limit).filter(|l| *l < V1_UNLIMITED), number("memory.usage_in_bytes")?, "total_inactive_file")
    };
    let inactive_file = read("memory.stat")
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(inactive_key)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some(Level { limit, usage, inactive_file })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn level(limit: Option<u64>, usage: u64, inactive_file: u64) -> Level {
        Level { limit, usage, inactive_file }
    }

    #[test]
    fn a_limited_cgroup_leaves_less_than_the_host_has() {
        let pod = level(Some(4 * GIB), 3 * GIB, 0);
        assert_eq!(headroom(Some(20 * GIB), &[pod]), Some(GIB));
    }

    #[test]
    fn the_tightest_level_decides_and_unlimited_ones_do_not_count() {
        let own = level(None, 3 * GIB, 0);
        let container = level(Some(8 * GIB), 3 * GIB, 0);
        let pod = level(Some(5 * GIB), 4 * GIB, 0);
        assert_eq!(headroom(Some(20 * GIB), &[own, container, pod]), Some(GIB));
        assert_eq!(headroom(Some(GIB / 2), &[own, container, pod]), Some(GIB / 2), "the host can be tighter");
    }

    #[test]
    fn inactive_page_cache_counts_as_free_and_nothing_goes_below_zero() {
        assert_eq!(headroom(None, &[level(Some(4 * GIB), 3 * GIB, 2 * GIB)]), Some(3 * GIB));
        assert_eq!(headroom(None, &[level(Some(GIB), 2 * GIB, 0)]), Some(0), "over its limit: nothing left");
        assert_eq!(headroom(None, &[level(Some(GIB), GIB, 2 * GIB)]), Some(GIB), "odd counters never exceed the limit");
    }

    #[test]
    fn without_limits_the_host_decides_and_without_anything_nothing_is_known() {
        assert_eq!(headroom(Some(7 * GIB), &[level(None, GIB, 0)]), Some(7 * GIB));
        assert_eq!(headroom(None, &[]), None);
    }

    #[test]
    fn the_memory_hierarchy_is_found_on_v1_v2_and_hybrid_hosts() {
        let v1_mounts = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                         31 25 0:27 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids\n";
        let v1 = "5:pids:/kubepods/pod1\n4:memory:/kubepods/pod1/c1\n";
        assert_eq!(
            own_memory_cgroup(v1, v1_mounts),
            Some(("/sys/fs/cgroup/memory/kubepods/pod1/c1".into(), "/sys/fs/cgroup/memory".into(), false))
        );
        let v2_mounts = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_memory_cgroup("0::/kubepods.slice/pod1/c1\n", v2_mounts),
            Some(("/sys/fs/cgroup/kubepods.slice/pod1/c1".into(), "/sys/fs/cgroup".into(), true))
        );
        // A container with its own cgroup namespace sees its cgroup as "/".
        assert_eq!(
            own_memory_cgroup("0::/\n", v2_mounts),
            Some(("/sys/fs/cgroup/".into(), "/sys/fs/cgroup".into(), true))
        );
        let hybrid_mounts = format!("{v1_mounts}32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
        let hybrid = format!("{v1}0::/kubepods/pod1/c1\n");
        assert_eq!(own_memory_cgroup(&hybrid, &hybrid_mounts).map(|(_, _, unified)| unified), Some(false));
        assert_eq!(own_memory_cgroup("4:memory:/a\n", v2_mounts), None, "no mount of its hierarchy: unknown");
    }

    #[test]
    fn this_host_s_headroom_is_known_and_at_most_what_the_host_has() {
        let host = host_available().expect("MemAvailable");
        let available = memory_available();
        assert!(available > 0 && available <= host, "{available} of {host}");
        assert!(!own_dirs().is_empty(), "this process's memory cgroup was found");
    }
}
