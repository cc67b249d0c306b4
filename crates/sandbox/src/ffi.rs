//! The C entry points of the sandbox, for the zygote.
//!
//! The zygote (see [`crate::zygote`]) is a Python process that has already
//! imported the kernel and the heavy packages. It loads this crate as a
//! shared library (`libkiln_sandbox.so`, built beside the `kiln` binary).
//! For each sandbox it unshares a pid namespace for its next child
//! ([`kiln_zygote_unshare_pid`]), forks, and restores its own
//! ([`kiln_zygote_restore_pid`]); the child, PID 1 of the new namespace,
//! calls [`kiln_sandbox_enter_init`], which runs the same steps as the
//! `kiln __sandbox-init` helper (see [`crate::init`]) while the zygote
//! writes its id maps ([`kiln_zygote_map_ids`]). It returns only in the
//! confined program process, which goes on to run the kernel in memory it
//! shares, copy-on-write, with the zygote.
//!
//! The functions that take descriptors over are `unsafe`: the caller
//! promises that each descriptor is open, is its own to give, and is not
//! used or closed by it afterwards.

use crate::init::{IdMapping, Tethers};
use crate::jail::Jail;
use crate::step::Step;
use nix::sched::{setns, unshare, CloneFlags};
use std::io::Write;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

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

/// In the zygote's child, PID 1 of its new pid namespace: build the sandbox
/// described by the JSON [`Jail`] in `jail[..len]` around it, with the
/// zygote writing the id maps over the pipe ends `unshared` (written) and
/// `mapped` (read); `lifeline` is the server's lifeline (read end) and
/// `parent` a pidfd of the zygote (see [`crate::init`] for what init does
/// with them). Returns 0 in the confined program process; init never
/// returns. Returns the failed step's code (see [`crate::step`]) if the
/// description cannot be read; later failures end the process with that
/// code.
///
/// # Safety
/// `jail` must point to `len` readable bytes; the four descriptors must be
/// open and the caller's to give (it must not use or close them
/// afterwards); the caller must be single-threaded (a child just forked).
#[no_mangle]
pub unsafe extern "C" fn kiln_sandbox_enter_init(
    jail: *const u8,
    len: usize,
    unshared: i32,
    mapped: i32,
    lifeline: i32,
    parent: i32,
) -> i32 {
    if jail.is_null() {
        return Step::ReadPolicy.code();
    }
    // SAFETY: the caller guarantees `len` readable bytes at `jail`; they are
    // only read, and not kept beyond this call.
    let bytes = unsafe { std::slice::from_raw_parts(jail, len) };
    // SAFETY: the caller hands these descriptors over (see above).
    let (ids, tethers) = unsafe {
        (
            IdMapping { unshared: OwnedFd::from_raw_fd(unshared), mapped: OwnedFd::from_raw_fd(mapped) },
            Tethers { lifeline: OwnedFd::from_raw_fd(lifeline), parent: OwnedFd::from_raw_fd(parent) },
        )
    };
    let jail: Jail = match serde_json::from_slice(bytes) {
        Ok(j) => j,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "kiln sandbox: step ReadPolicy failed: {e}");
            return Step::ReadPolicy.code();
        }
    };
    crate::init::enter_as_init(&jail, ids, tethers);
    0
}
