//! Crash recovery: a pid file per contained process, and the code that
//! finds and kills what a previous server left running.
//!
//! A pid alone is not an identity (pids are reused), so the file also holds
//! the process's start time from `/proc/<pid>/stat`; a leftover is killed
//! only when both still match.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io;
use std::path::Path;

/// Write `pid start_time` to `path`.
pub fn record(path: &Path, pid: u32) -> io::Result<()> {
    let start = start_time(pid)?;
    std::fs::write(path, format!("{pid} {start}\n"))
}

/// If `path` names a process group that is still alive (same pid, same
/// start time), kill it. Returns whether something was killed.
pub fn kill_recorded(path: &Path) -> io::Result<bool> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut parts = text.split_whitespace();
    let (Some(pid), Some(start)) = (parts.next(), parts.next()) else {
        return Ok(false);
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return Ok(false);
    };
    match start_time(pid) {
        Ok(now) if now == start => {
            let pgid = Pid::from_raw(i32::try_from(pid).unwrap_or(0));
            if pgid.as_raw() > 0 {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after the last ')' are plain numbers.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    rest.split_whitespace().nth(19).and_then(|s| s.parse().ok()).ok_or_else(|| io::Error::other("malformed /proc stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_readable_and_stable() {
        let me = std::process::id();
        let a = start_time(me).unwrap_or(0);
        let b = start_time(me).unwrap_or(1);
        assert!(a > 0);
        assert_eq!(a, b);
    }

    #[test]
    fn a_pid_file_whose_start_time_differs_kills_nothing() {
        let dir = std::env::temp_dir().join(format!("kiln-pidfile-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let f = dir.join("pid");
        // Our own pid with a wrong start time: must not be signalled.
        std::fs::write(&f, format!("{} 1\n", std::process::id())).unwrap_or(());
        assert!(!kill_recorded(&f).unwrap_or(true));
        assert!(!kill_recorded(&dir.join("absent")).unwrap_or(true));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
