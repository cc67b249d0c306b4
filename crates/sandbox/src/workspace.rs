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
use std::path::Path;

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
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_string)
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.iter().filter(|p| unmount_workspace(Path::new(p)).is_ok()).count()
}
