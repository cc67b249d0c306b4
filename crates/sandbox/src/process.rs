//! Processes kiln owns, each held by a pidfd.
//!
//! A pid names a process only until the process is reaped; after that the
//! number may belong to anyone. So every process kiln starts or forks (the
//! sandbox helper, the zygote, each child of the zygote) is held by exactly
//! one [`Owned`], through a pidfd taken while the process could not have
//! been reaped yet:
//!
//! - a child of the server: `pidfd_open` right after the spawn (the server
//!   is its parent and the only one that reaps it, here, through the pidfd);
//! - a child of the zygote: the zygote calls `pidfd_open` right after its
//!   fork, before it could reap it, and sends the descriptor over a socket
//!   (`SCM_RIGHTS`; see [`crate::zygote`]).
//!
//! Signals go through `pidfd_send_signal`, which cannot reach another
//! process: once the process is gone it fails with `ESRCH`. The one
//! signal that needs a raw id, to a process group (`--sandbox none`, whose
//! kernels' subprocesses share its group), is sent only while the leader
//! is known not to be reaped: reaping and that signal take the same lock.

use crate::Exit;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// A process held by a pidfd.
#[derive(Debug)]
pub(crate) struct Owned {
    /// For logs and the process-group signal only.
    pid: i32,
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Set, under this lock, when the server reaped the process.
    reaped: Arc<Mutex<bool>>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Owned {
    /// Start `cmd` and hold the child. The server is its parent and reaps it
    /// through the pidfd when it ends; [`Owned::exit_watch`] then says how.
    pub(crate) fn spawn(cmd: &mut std::process::Command) -> io::Result<Owned> {
        let mut child = cmd.spawn()?;
        let pid = child.id();
        // Race-free: until this process waits for it, the child is at worst
        // a zombie, so `pid` is still its own.
        let fd = match pidfd(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // Not reaped yet (std waits only when asked), so the pid is
                // still the child's.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        // Dropping a std Child neither kills nor waits for it: from here on
        // only the pidfd refers to the process.
        drop(child);
        let fd = Arc::new(register(fd)?);
        let reaped = Arc::new(Mutex::new(false));
        let (tx, rx) = watch::channel(None);
        let (task_fd, task_reaped) = (fd.clone(), reaped.clone());
        tokio::spawn(async move {
            let exit = reap(&task_fd, &task_reaped).await;
            let _ = tx.send(Some(exit));
        });
        Ok(Owned { pid: i32::try_from(pid).unwrap_or(i32::MAX), fd, reaped, exit: rx })
    }

    /// Hold a process that another process (the zygote) is the parent of
    /// and reaps, through a pidfd it sent; `exit` is fed from that parent's
    /// report.
    pub(crate) fn adopt(fd: OwnedFd, pid: u32, exit: watch::Receiver<Option<Exit>>) -> io::Result<Owned> {
        let fd = Arc::new(register(fd)?);
        // Never reaped by the server: no group signal may use its pid.
        Ok(Owned { pid: i32::try_from(pid).unwrap_or(i32::MAX), fd, reaped: Arc::new(Mutex::new(true)), exit })
    }

    /// The pid, as the server sees it (for logs).
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// A receiver that turns `Some` when the process has ended.
    pub(crate) fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// Send `sig` to the process; a process that is gone is not an error.
    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        let Some(sig) = rustix::process::Signal::from_named_raw(sig as i32) else { return };
        if let Err(e) = rustix::process::pidfd_send_signal(self.fd.get_ref().as_fd(), sig) {
            if e != rustix::io::Errno::SRCH {
                tracing::debug!(pid = self.pid, ?sig, error = %e, "signal not delivered");
            }
        }
    }

    /// A second descriptor of the process's pidfd (to enter its
    /// namespaces with `setns`).
    pub(crate) fn pidfd(&self) -> io::Result<OwnedFd> {
        self.fd.get_ref().try_clone()
    }

    /// Send `sig` to the process group the process leads (it was started
    /// with `process_group(0)`), if the process has not been reaped: its
    /// zombie keeps the group's id from being reused until then.
    pub(crate) fn signal_group(&self, sig: nix::sys::signal::Signal) {
        let reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if *reaped {
            return;
        }
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), sig);
    }

    /// Wait until the process has ended (its pidfd is readable: for a
    /// child of the server, reaped too).
    pub(crate) async fn ended(&self) {
        let mut rx = self.exit.clone();
        let _ = rx.wait_for(Option::is_some).await;
        let _ = self.fd.readable().await;
    }
}

/// Watch `fd` from the runtime's reactor.
pub(crate) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and is the
    // same descriptor, until it is dropped, which happens only when the
    // `AsyncFd` that now owns it is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// `pidfd_open(pid)`.
fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    let raw = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    let pid = rustix::process::Pid::from_raw(raw).ok_or_else(|| io::Error::other("pid 0"))?;
    Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)?)
}

/// Wait until the child behind `fd` ends, reap it, and say how it ended.
async fn reap(fd: &AsyncFd<OwnedFd>, reaped: &Mutex<bool>) -> Exit {
    use rustix::process::{waitid, WaitId, WaitIdOptions};
    loop {
        let Ok(mut ready) = fd.readable().await else {
            return Exit { code: None, signal: None };
        };
        let mut done = reaped.lock().unwrap_or_else(|p| p.into_inner());
        match waitid(WaitId::PidFd(fd.get_ref().as_fd()), WaitIdOptions::EXITED | WaitIdOptions::NOHANG) {
            Ok(Some(status)) => {
                *done = true;
                return Exit { code: status.exit_status(), signal: status.terminating_signal() };
            }
            // Readable but not yet waitable: wait for the next readiness.
            Ok(None) => ready.clear_ready(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not reap a process");
                *done = true;
                return Exit { code: None, signal: None };
            }
        }
    }
}

/// Make descriptors `first`, `first + 1`, ... copies of `sources`, in
/// order, each close-on-exec unless `inherited(target)`: how a process kiln
/// starts gets what it is given at the numbers it expects. Every source must
/// lie above the last target (copied up first with `F_DUPFD_CLOEXEC`), so
/// that no placement closes a source still to be placed.
///
/// Async-signal-safe (it only calls `dup3` and allocates nothing), so it
/// may run between `fork` and `exec`.
pub(crate) fn place_descriptors(sources: &[i32], first: i32, inherited: fn(i32) -> bool) -> io::Result<()> {
    for (target, &source) in (first..).zip(sources) {
        let flags = if inherited(target) { 0 } else { libc::O_CLOEXEC };
        // SAFETY: dup3 closes whatever `target` was (never a source: they
        // all lie above it) and makes it a copy of an open descriptor; it
        // touches no memory.
        if unsafe { libc::dup3(source, target, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
