//! A session's writable storage on the host: a size-limited tmpfs that the
//! server mounts (and the sandbox binds inside), so a disk-filling session
//! gets ENOSPC in its own space and nobody else's.
//!
//! It is mounted in the server's mount namespace on purpose: the server
//! writes uploads into it directly, and it outlives kernel restarts within
//! the session. It is owned by the session's host user, so the unprivileged
//! user inside can write to it and nothing else on the host can be written
//! through it.
//!
//! The same kind of mount, bounded and private to the server, holds the
//! server's kernel directories ([`mount_sessions_dir`]).

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::io;
use std::path::{Path, PathBuf};

/// Mount a tmpfs of `bytes` at `dir` (created if needed), owned by `uid`.
pub fn mount_workspace(dir: &Path, bytes: u64, uid: u32) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    mount_tmpfs(dir, MsFlags::empty(), &format!("size={bytes},mode=0755,uid={uid},gid={uid}"))
}

/// Size of the tmpfs that holds a server's kernel directories (see
/// [`mount_sessions_dir`]): their own files are a few small ones each (a
/// description, sockets, mount points); what sessions write lives in their
/// own tmpfs mounts below it, which this bound does not count.
pub const SESSIONS_DIR_BYTES: u64 = 64 << 20;

/// Mount a tmpfs of [`SESSIONS_DIR_BYTES`] at the server's sessions
/// directory `dir`, mode 0700, owned by the server. Every session creates
/// and removes a handful of directories and sockets there; on a disk
/// filesystem that is journaled metadata churn (ext4 searches its inode
/// bitmap past recently deleted inodes on every create), on a tmpfs it is
/// memory. Nothing there needs to outlive the server: the next start reaps
/// whatever a dead one left.
pub fn mount_sessions_dir(dir: &Path) -> io::Result<()> {
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getegid();
    mount_tmpfs(dir, MsFlags::MS_NOEXEC, &format!("size={SESSIONS_DIR_BYTES},mode=0700,uid={uid},gid={gid}"))
}

/// Mount a tmpfs with `options` at `dir`: never set-uid programs or device
/// files, whatever `flags` add.
fn mount_tmpfs(dir: &Path, flags: MsFlags, options: &str) -> io::Result<()> {
    let flags = flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some(options)).map_err(io::Error::from)
}

/// Unmount the workspace at `dir` (lazily: a process still holding a file
/// there cannot keep it alive for anyone else).
pub fn unmount_workspace(dir: &Path) -> io::Result<()> {
    match umount2(dir, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unmount every mount below `dir` (leftovers of a crashed server).
pub fn unmount_all_under(dir: &Path) -> usize {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    let mut points: Vec<PathBuf> = mount_points(&info).into_iter().filter(|p| p.starts_with(dir)).collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.iter().filter(|p| unmount_workspace(p).is_ok()).count()
}

/// The mount points listed in `mountinfo` (the text of
/// `/proc/self/mountinfo`), unescaped: a data directory whose path holds a
/// space is listed with `\040` in its place.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(crate::cgroup::unescape(p))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_unescaped_from_mountinfo() {
        let info = "36 25 0:31 / /tmp/data\\040dir/sessions rw,nosuid - tmpfs tmpfs rw,size=65536k\n\
                    37 36 0:32 / /tmp/data\\040dir/sessions/k1/data rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(info),
            [PathBuf::from("/tmp/data dir/sessions"), PathBuf::from("/tmp/data dir/sessions/k1/data")]
        );
    }
}
