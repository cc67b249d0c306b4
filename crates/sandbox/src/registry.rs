//! Which kiln servers are alive on this host, and what each one owns.
//!
//! Every server with sandboxes registers itself in `/run/kiln/instances/`:
//! a file `<instance>.json` saying where its cgroups and session storage
//! are, on which it holds an exclusive `flock` for as long as it lives. The
//! lock is the liveness token: the kernel drops it when the process ends,
//! however it ends, and it cannot be inherited by mistake (the descriptor
//! is close-on-exec, and kiln never forks without exec). A file that
//! anyone can lock belongs to a dead server.
//!
//! At start, under a lock of the whole directory (so that two starting
//! servers never reap each other's fresh registrations), a server reaps
//! every dead server's leftovers (kills the processes in its cgroups,
//! removes them, unmounts its workspaces and deletes its kernels'
//! directories), and never touches what a live server owns. A clean stop
//! removes its own cgroups and its file.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Where live servers register.
pub(crate) const DIR: &str = "/run/kiln/instances";

/// What a server owns, as written in its file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The server's pid (for people; the lock says whether it lives).
    pub pid: u32,
    /// Its sessions directory: the kernels' directories and workspace
    /// mounts are below it.
    pub sessions_dir: PathBuf,
    /// Its cgroup directory in each hierarchy, named by controller
    /// (`unified` for v2); each kernel's cgroup is a directory in them.
    pub cgroups: Vec<(String, PathBuf)>,
    /// Whether the cgroups are on the v2 hierarchy.
    pub unified: bool,
}

/// A live registration: the locked file. Dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct Registration {
    path: PathBuf,
    _lock: File,
}

impl Registration {
    /// Remove the file (a clean stop).
    pub(crate) fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn try_lock(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn open_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Hold the lock of the whole registry while `f` runs.
pub(crate) fn exclusively<T>(dir: &Path, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    open_dir(dir)?;
    let lock = File::options().create(true).truncate(false).write(true).open(dir.join(".lock"))?;
    rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive)?;
    let out = f();
    drop(lock);
    out
}

/// The registry's records: `(file, record, alive)`. Each dead one comes
/// with its file locked by this process, so no other reaper takes it too.
pub(crate) fn scan(dir: &Path) -> io::Result<Vec<(PathBuf, Record, Option<File>)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(file) = File::open(&path) else { continue };
        let dead = try_lock(&file)?;
        let Ok(record) = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
        else {
            if dead {
                // Not ours to read, and nobody holds it: garbage.
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        out.push((path, record, dead.then_some(file)));
    }
    Ok(out)
}

/// Register `record` as `instance`: the file is written and locked under a
/// temporary name first, then renamed, so no reaper ever sees it unlocked.
pub(crate) fn register(dir: &Path, instance: &str, record: &Record) -> io::Result<Registration> {
    use std::io::Write;
    open_dir(dir)?;
    let tmp = dir.join(format!(".{instance}.tmp"));
    let mut file = File::options().create_new(true).write(true).open(&tmp)?;
    if !try_lock(&file)? {
        return Err(io::Error::other("could not lock a fresh registration"));
    }
    file.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
    file.sync_all()?;
    let path = dir.join(format!("{instance}.json"));
    std::fs::rename(&tmp, &path)?;
    Ok(Registration { path, _lock: file })
}

/// The record of the server (alive, or dead and not reaped yet) whose
/// sessions live in `sessions_dir`; the live one if there are several.
pub fn find(sessions_dir: &Path) -> Option<Record> {
    // Under the registry's lock: scanning briefly locks dead servers' files,
    // which must not make a starting server take them for alive.
    let dir = Path::new(DIR);
    let mut found: Vec<(Record, bool)> = exclusively(dir, || scan(dir))
        .ok()?
        .into_iter()
        .filter(|(_, r, _)| r.sessions_dir == sessions_dir)
        .map(|(_, r, dead)| (r, dead.is_none()))
        .collect();
    found.sort_by_key(|(_, alive)| !alive);
    found.into_iter().next().map(|(r, _)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &str) -> Record {
        Record { pid: 1, sessions_dir: dir.into(), cgroups: vec![("pids".into(), "/x".into())], unified: false }
    }

    #[test]
    fn a_registration_is_alive_while_held_and_dead_once_dropped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let reg = register(dir.path(), "a", &record("/s/a")).unwrap_or_else(|e| panic!("{e}"));
        // flock is per open file: this process's second open sees it locked.
        let seen = scan(dir.path()).unwrap_or_default();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].2.is_none(), "a held registration is alive");
        assert_eq!(seen[0].1, record("/s/a"));
        drop(reg);
        let seen = scan(dir.path()).unwrap_or_default();
        assert!(seen[0].2.is_some(), "a released registration is dead");
    }

    #[test]
    fn a_clean_stop_removes_the_registration() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let reg = register(dir.path(), "b", &record("/s/b")).unwrap_or_else(|e| panic!("{e}"));
        reg.remove();
        assert!(scan(dir.path()).unwrap_or_default().is_empty());
    }

    #[test]
    fn unreadable_files_of_nobody_are_removed_and_others_are_ignored() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("junk.json"), "{").unwrap_or_default();
        std::fs::write(dir.path().join("notes.txt"), "hi").unwrap_or_default();
        assert!(scan(dir.path()).unwrap_or_default().is_empty());
        assert!(!dir.path().join("junk.json").exists());
        assert!(dir.path().join("notes.txt").exists());
    }
}
