//! The C entry points of the sandbox, for the zygote.
//!
//! The zygote (see [`crate::zygote`]) is a Python process that has already
//! imported the kernel and the heavy packages. It loads this crate as a
//! shared library (`libkiln_sandbox.so`, built beside the `kiln` binary).
//! For each sandbox it unshares a pid namespace for its next child
//! ([`kiln_zygote_unshare_pid`]), forks through [`kiln_zygote_fork`], and
//! restores its own ([`kiln_zygote_restore_pid`]). The child, PID 1 of the
//! new namespace, runs only this crate's code: the same steps as the
//! `kiln __sandbox-init` helper (see [`crate::init`]) while the zygote
//! writes its id maps ([`kiln_zygote_map_ids`]). The fork returns a second
//! time only in the confined program process, which goes on to run the
//! kernel in memory it shares, copy-on-write, with the zygote.
//!
//! The functions that take descriptors over are `unsafe`: the caller
//! promises that each descriptor is open, is its own to give, and is not
//! used or closed by it afterwards.

use crate::init::{IdMapping, Tethers};
use crate::jail::ForkRequest;
use crate::step::Step;
use nix::sched::{setns, unshare, CloneFlags};
use std::io::Write;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// In the zygote, once, before its first fork: build what every sandbox's
/// program needs and no session changes (the compiled seccomp filters), so
/// that each fork inherits it instead of building it. Returns 0, or the
/// seccomp step's code after writing why on stderr (every program would
/// then fail that step with the same message).
#[no_mangle]
pub extern "C" fn kiln_zygote_prepare() -> i32 {
    match crate::seccomp::compiled() {
        Ok(_) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "kiln sandbox: {e}");
            Step::Seccomp.code()
        }
    }
}

/// In the zygote, first thing after loading this library: reserve the
/// range its Python arenas will come from (see [`crate::arenas`]). Returns
/// 0 or an errno; on failure the zygote keeps CPython's own allocator.
#[no_mangle]
pub extern "C" fn kiln_arenas_reserve() -> i32 {
    match crate::arenas::reserve() {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
    }
}

/// In the zygote, once its imports are done: give back the arena range
/// past its last arena (see [`crate::arenas`]). Returns the chunks kept.
/// Called with the interpreter's lock held, so that no arena is handed out
/// meanwhile.
#[no_mangle]
pub extern "C" fn kiln_arenas_seal() -> usize {
    crate::arenas::seal()
}

/// CPython's arena allocator's `alloc` (`PyObjectArenaAllocator`).
#[no_mangle]
pub extern "C" fn kiln_arena_alloc(_ctx: *mut std::ffi::c_void, size: usize) -> *mut std::ffi::c_void {
    crate::arenas::alloc(size)
}

/// CPython's arena allocator's `free` (`PyObjectArenaAllocator`).
///
/// # Safety
/// Only CPython's object allocator calls it, with an arena it got from
/// [`kiln_arena_alloc`] (or mapped before that was installed) and no longer
/// uses.
#[no_mangle]
pub unsafe extern "C" fn kiln_arena_free(_ctx: *mut std::ffi::c_void, ptr: *mut std::ffi::c_void, size: usize) {
    // SAFETY: the caller's promise is crate::arenas::free's.
    unsafe { crate::arenas::free(ptr, size) }
}

/// In the zygote, before it forks a sandbox's init: the next child becomes
/// PID 1 of a new pid namespace. Returns 0 or an errno.
#[no_mangle]
pub extern "C" fn kiln_zygote_unshare_pid() -> i32 {
    match unshare(CloneFlags::CLONE_NEWPID) {
        Ok(()) => 0,
        Err(e) => e as i32,
    }
}

/// In the zygote, right after that fork: its next children are in its own
/// pid namespace again (`own_pid_ns`: its `/proc/self/ns/pid`, opened at
/// start). Returns 0 or an errno.
///
/// # Safety
/// `own_pid_ns` must be an open descriptor of a pid namespace that stays
/// open for the whole call; it is only borrowed.
#[no_mangle]
pub unsafe extern "C" fn kiln_zygote_restore_pid(own_pid_ns: i32) -> i32 {
    // SAFETY: the caller guarantees the descriptor is open for this call.
    let fd = unsafe { BorrowedFd::borrow_raw(own_pid_ns) };
    match setns(fd, CloneFlags::CLONE_NEWPID) {
        Ok(()) => 0,
        Err(e) => e as i32,
    }
}

/// In the zygote: write the id maps of the init it forked (`pid`), once
/// init says it has entered its user namespace (see [`crate::init`], step
/// 5). Takes ownership of both pipe ends. Returns 0 or an errno.
///
/// # Safety
/// `unshared` and `mapped` must be open descriptors (the caller's ends of
/// the two pipes shared with init) that the caller hands over: it must not
/// use or close them afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_zygote_map_ids(pid: i32, unshared: i32, mapped: i32) -> i32 {
    // SAFETY: the caller hands these descriptors over (see above).
    let (unshared, mapped) = unsafe { (OwnedFd::from_raw_fd(unshared), OwnedFd::from_raw_fd(mapped)) };
    let host_proc = match std::fs::File::open("/proc") {
        Ok(f) => f,
        Err(e) => return e.raw_os_error().unwrap_or(libc::EIO),
    };
    crate::init::map_ids(&host_proc, nix::unistd::Pid::from_raw(pid), &unshared, mapped);
    0
}

/// In the zygote, between [`kiln_zygote_unshare_pid`] and
/// [`kiln_zygote_restore_pid`]: fork the sandbox's init, PID 1 of the new
/// pid namespace, which builds the sandbox that `request[..len]` (a JSON
/// [`ForkRequest`]) describes around itself and forks the program into it.
///
/// Returns, like `fork`: the child's pid in the zygote (or minus an errno
/// if there is no child), and 0 in the confined program process, which then
/// runs the kernel. init never returns: it runs only this crate's code from
/// the fork on, never the interpreter's, so the one process of the sandbox
/// that copies the zygote's pages as it runs Python is the program. (The
/// zygote calls `PyOS_BeforeFork` before this and `PyOS_AfterFork_Parent`
/// after it; the program calls `PyOS_AfterFork_Child` when this returns 0.)
///
/// In init, `unshared` and `mapped` are its ends of the id-mapping pipes
/// (written, read: see [`crate::init::map_ids`]), `lifeline` the server's
/// lifeline (read end) and `parent` a pidfd of the zygote; init takes them
/// over, and every other descriptor it inherited is closed. The zygote
/// keeps all four; it closes its copies of `unshared` and `mapped`.
///
/// # Safety
/// `request` must point to `len` readable bytes; the four descriptors must
/// be open for the whole call. The caller must be single-threaded, and no
/// other thread may hold a lock the child could need (the zygote is
/// single-threaded and holds the interpreter's locks through
/// `PyOS_BeforeFork`).
#[no_mangle]
pub unsafe extern "C" fn kiln_zygote_fork(
    request: *const u8,
    len: usize,
    unshared: i32,
    mapped: i32,
    lifeline: i32,
    parent: i32,
) -> i32 {
    if request.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: the caller guarantees `len` readable bytes at `request`; they
    // are only read, and not kept beyond this call (the child parses them
    // before anything else).
    let request = unsafe { std::slice::from_raw_parts(request, len) };
    // SAFETY: the caller is single-threaded (see above), so the child may
    // run arbitrary code after the fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => child.as_raw(),
        Err(e) => -(e as i32),
        Ok(nix::unistd::ForkResult::Child) => {
            become_init(request, [unshared, mapped, lifeline, parent]);
            0
        }
    }
}

/// In the zygote's fresh child: read the request, point standard input at
/// `/dev/null` and standard output and error at the kernel's log, keep
/// exactly the four descriptors `fds` (at 3, 4, 5 and 6), then build the
/// sandbox as its init. Returns only in the program process.
fn become_init(request: &[u8], fds: [i32; 4]) {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // The zygote's interpreter catches SIGCHLD (its handler would run here,
    // in a process the interpreter no longer owns, and write to the
    // zygote's wake-up pipe) and ignores SIGINT; init waits for these
    // synchronously (see crate::init), the program sets its own.
    for s in [Signal::SIGCHLD, Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: SIG_DFL installs no handler, so no code of ours can run
        // in signal context.
        if let Err(e) = unsafe { signal(s, SigHandler::SigDfl) } {
            crate::init::fail(Step::ForkInit, format!("resetting {s}: {e}"));
        }
    }
    let request: ForkRequest = match serde_json::from_slice(request) {
        Ok(r) => r,
        Err(e) => crate::init::fail(Step::ReadPolicy, e),
    };
    if let Err(e) = plumb(&request.log, fds) {
        crate::init::fail(Step::Pipe, e);
    }
    // SAFETY: `plumb` placed the caller's four descriptors at 3..=6, and
    // nothing else in this process owns them.
    let (ids, tethers) = unsafe {
        (
            IdMapping { unshared: OwnedFd::from_raw_fd(3), mapped: OwnedFd::from_raw_fd(4) },
            Tethers { lifeline: OwnedFd::from_raw_fd(5), parent: OwnedFd::from_raw_fd(6) },
        )
    };
    crate::init::enter_as_init(&request.jail, ids, tethers);
}

/// Standard input from `/dev/null`, output and error appended to `log`,
/// `fds` moved to 3, 4, 5 and 6 (close-on-exec), every other descriptor
/// closed: nothing of the zygote's stays open (its socket, its selector,
/// its wake-up pipe, the server's other requests).
fn plumb(log: &std::path::Path, fds: [i32; 4]) -> Result<(), String> {
    use std::os::fd::IntoRawFd;
    let open = |path: &std::path::Path, write: bool| -> Result<i32, String> {
        let file = if write {
            std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)
        } else {
            std::fs::File::open(path)
        };
        file.map(IntoRawFd::into_raw_fd).map_err(|e| format!("{}: {e}", path.display()))
    };
    let log = open(log, true)?;
    let null = open(std::path::Path::new("/dev/null"), false)?;
    // First every source out of the way (above every target: wherever the
    // zygote's descriptors or these two opens landed, no move below can
    // close a source it still needs), then each into its place.
    let sources = [null, log, log, fds[0], fds[1], fds[2], fds[3]];
    let mut high = [0; 7];
    for (slot, fd) in high.iter_mut().zip(sources) {
        // SAFETY: F_DUPFD_CLOEXEC duplicates an open descriptor (ours, or
        // the caller's) and touches no memory.
        *slot = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) }, "duplicating a descriptor")?;
    }
    // Standard input, output and error without close-on-exec: the kernel's
    // own children inherit them.
    crate::process::place_descriptors(&high, 0, |target| target <= 2)
        .map_err(|e| format!("placing a descriptor: {e}"))?;
    // SAFETY: closes descriptors only; everything this process still needs
    // is at 0..=6.
    check(unsafe { libc::syscall(libc::SYS_close_range, 7u32, u32::MAX, 0u32) } as i32, "closing descriptors")?;
    Ok(())
}

/// A libc return value, or the error it stands for.
fn check(rc: i32, what: &str) -> Result<i32, String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}
