//! The sandbox helper: builds a session's sandbox, then becomes its PID 1.
//!
//! The server never forks itself to set up namespaces (a multi-threaded
//! process must not do complex work between fork and exec). It starts its own
//! binary as `kiln __sandbox-init <jail.json>`, a fresh single-threaded
//! process that runs the steps below, as runc, bubblewrap and codex's
//! linux-sandbox do:
//!
//! 1. join the session's cgroup(s);
//! 2. unshare mount, pid, network, ipc, uts and cgroup namespaces, still as
//!    root of the host: these namespaces are owned by the host's user
//!    namespace, so nothing inside can ever mount, unmount or reconfigure
//!    the network, whatever capabilities it gains in its own user namespace;
//! 3. fork the namespace's PID 1 ("init"); this outer process stays in the
//!    host's namespaces, writes init's id maps (step 5), then waits for it,
//!    forwarding SIGINT/SIGTERM;
//! 4. init builds the minimal root filesystem (see [`crate::rootfs`]),
//!    pivots into it, brings up loopback, sets rlimits;
//! 5. init enters a new user namespace; the outer process (still root of
//!    the host) maps root inside to `UID_BASE` and the session user to
//!    `UID_BASE + 1000` on the host;
//! 6. init forks the program: new session, unprivileged user, no
//!    capabilities, `no_new_privs`, landlock, seccomp, `execve`;
//! 7. init reaps every orphan, forwards interrupts to the program's process
//!    group, and exits with the program's status, which kills everything
//!    left in the pid namespace.
//!
//! A sandbox never outlives its server, by three independent means. init
//! holds the read end of the server's *lifeline*, a pipe whose write end
//! only the server holds: when the server dies, however it dies, the pipe
//! reaches end of file, init exits, and the kernel kills the whole pid
//! namespace (the outer process watches it too). init also has a
//! parent-death signal, re-armed after every change of credentials (which
//! clears it), and, after each arming, checks through a pidfd that its
//! parent (the outer process or the zygote) is still alive, since the
//! parent may have died just before: `getppid()` cannot tell, as the parent
//! lies outside init's pid namespace. The program re-arms its own after it
//! changes identity and checks that init is still its parent.
//!
//! Every step that fails exits with its own code (the table in
//! [`crate::step`]) and a message on stderr (the kernel's log), which the
//! server reports.

use crate::jail::{Jail, UID_BASE, USER_ID};
use crate::step::Step;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

pub(crate) fn fail(step: Step, what: impl std::fmt::Display) -> ! {
    let _ = writeln!(std::io::stderr(), "kiln sandbox: step {step:?} ({}) failed: {what}", step.describe());
    exit(step.code())
}

/// What ties init to the living: the server's lifeline (read end) and a
/// pidfd of init's parent. Either becoming readable means init must go.
#[derive(Debug)]
pub(crate) struct Tethers {
    /// The read end of the server's lifeline; end of file when the server
    /// has gone (nothing is ever written to it).
    pub lifeline: OwnedFd,
    /// A pidfd of init's parent (the outer process, or the zygote),
    /// readable once the parent has exited.
    pub parent: OwnedFd,
}

/// Whether `fd` is readable (or hung up) right now.
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// init: arm the parent-death signal (again: a change of credentials
/// clears it), then make sure that neither the parent nor the server died
/// before it was armed.
fn stay_tethered(tethers: &Tethers) {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        fail(Step::Orphaned, format!("parent-death signal: {e}"));
    }
    if readable_now(tethers.parent.as_fd()) {
        fail(Step::Orphaned, "the sandbox's parent has gone");
    }
    if readable_now(tethers.lifeline.as_fd()) {
        fail(Step::Orphaned, "the server has gone");
    }
}

/// A child of init (the program), after it changed
/// its identity (which clears the parent-death signal): arm it again, and
/// make sure init, PID 1 of its namespace, is still its parent.
fn stay_child_of_init() {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        fail(Step::Orphaned, format!("parent-death signal: {e}"));
    }
    if nix::unistd::getppid() != Pid::from_raw(1) {
        fail(Step::Orphaned, "init has gone");
    }
}

/// End this process now. `_exit`, not `exit`: these processes may be forks
/// of the zygote, whose C and Python exit handlers belong to the zygote
/// (flushing its buffers, removing its files) and must not run here.
pub(crate) fn exit(code: i32) -> ! {
    // SAFETY: `_exit` ends the process without touching memory; nothing
    // after it runs.
    unsafe { libc::_exit(code) }
}

/// Run the helper (`kiln __sandbox-init <jail.json> <lifeline fd>`, the
/// arguments after `__sandbox-init`), then execute the program. Never
/// returns.
pub fn main(mut args: impl Iterator<Item = std::ffi::OsString>) -> ! {
    let path = std::path::PathBuf::from(args.next().unwrap_or_default());
    let jail: Jail = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(j) => j,
        Err(e) => fail(Step::ReadPolicy, format!("{}: {e}", path.display())),
    };
    let fd = args.next().and_then(|a| a.to_str()?.parse::<i32>().ok()).filter(|fd| *fd > 2);
    let Some(fd) = fd.filter(|fd| nix::fcntl::fcntl(unsafe_borrow(*fd), nix::fcntl::FcntlArg::F_GETFD).is_ok()) else {
        fail(Step::ReadPolicy, "no lifeline descriptor (usage: kiln __sandbox-init <jail.json> <fd>)")
    };
    // SAFETY: the server placed its lifeline's read end at this descriptor
    // for this process (see `Sandboxes`); it is open (checked above) and
    // nothing else in this fresh process owns it.
    let lifeline = unsafe { OwnedFd::from_raw_fd(fd) };
    enter(&jail, lifeline);
    exec(&jail)
}

/// A descriptor number as a borrowed descriptor, for `fcntl(F_GETFD)`.
fn unsafe_borrow(fd: i32) -> BorrowedFd<'static> {
    // SAFETY: only used to ask the kernel whether `fd` is open; a closed
    // number makes that call fail with EBADF and nothing else.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Build the sandbox described by `jail` around the calling process's
/// future: returns only in the confined program process (step 6, just
/// before `execve`), as the unprivileged session user under every
/// restriction. The other processes of the sandbox (the outer supervisor
/// and init) are forks that never return.
///
/// The caller must be single-threaded: the freshly exec'd helper of
/// `--zygote off` (a child of the zygote takes [`enter_as_init`] instead).
pub(crate) fn enter(jail: &Jail, lifeline: OwnedFd) {
    let handled = join_and_unshare(jail, CloneFlags::CLONE_NEWPID);
    // The outer process maps init's ids (step 5): only a process in the
    // host's user namespace with CAP_SETUID may map ids other than its own.
    // Doing it here rather than in a mapper forked for the purpose saves a
    // fork, which for a zygote's child copies a large address space.
    let (unshared_r, unshared_w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => fail(Step::Pipe, e),
    };
    let (mapped_r, mapped_w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => fail(Step::Pipe, e),
    };
    // The host's /proc, opened now: once init has pivoted into the new root
    // (in the mount namespace this process shares), "/proc" here names the
    // new pid namespace's, where init is not known by the pid fork returns.
    let host_proc = match std::fs::File::open("/proc") {
        Ok(f) => f,
        Err(e) => fail(Step::Pipe, format!("/proc: {e}")),
    };
    // Opened before the fork, so init can tell whether this process is
    // alive (it cannot name it: its parent lies outside its pid namespace).
    let me = rustix::process::getpid();
    let parent = match rustix::process::pidfd_open(me, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => fail(Step::ForkInit, format!("pidfd_open: {e}")),
    };
    // SAFETY: this process is single-threaded (a freshly exec'd helper), so
    // the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop((unshared_r, mapped_w, host_proc));
            let ids = IdMapping { unshared: unshared_w, mapped: mapped_r };
            init(jail, &handled, ids, Tethers { lifeline, parent })
        }
        Ok(ForkResult::Parent { child }) => {
            drop((unshared_w, mapped_r, parent));
            map_ids(&host_proc, child, &unshared_r, mapped_w);
            drop((unshared_r, host_proc));
            supervise(child, &handled, Forward::ToPid, &[lifeline.as_fd()])
        }
        Err(e) => fail(Step::ForkInit, e),
    }
}

/// Steps 1 to 3 up to the fork: join the cgroup, unshare the namespaces
/// (`extra` plus mount, network, ipc, uts and cgroup), block the signals
/// the sandbox's processes handle synchronously. Returns that signal set.
fn join_and_unshare(jail: &Jail, extra: CloneFlags) -> SigSet {
    // 1. Join the cgroup: everything forked from here on is accounted and limited.
    if let Some(cg) = &jail.cgroup {
        if let Err(e) = cg.join(std::process::id()) {
            fail(Step::JoinCgroup, e);
        }
    }

    // 2. New namespaces, owned by the host's user namespace.
    let flags = extra
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    if let Err(e) = unshare(flags) {
        fail(Step::Unshare, e);
    }

    // 3. Signals are handled synchronously (sigwait) by the outer process
    //    and init; the program gets the default mask back before exec.
    let mut handled = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        handled.add(s);
    }
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled), None) {
        fail(Step::ForkInit, e);
    }
    handled
}

/// The zygote's variant of [`enter`]: the calling process is already PID 1
/// of a new pid namespace (the zygote unshared it before forking, see
/// [`crate::zygote`]), and the zygote itself, still root of the host, plays
/// the outer process: it writes the id maps ([`map_ids`]) and reaps init.
/// One process fewer per sandbox, and one fewer copy of the zygote's
/// address space. Returns only in the confined program process.
pub(crate) fn enter_as_init(jail: &Jail, ids: IdMapping, tethers: Tethers) {
    let handled = join_and_unshare(jail, CloneFlags::empty());
    init(jail, &handled, ids, tethers);
}

/// init's ends of the id-mapping handshake with the outer process.
#[derive(Debug)]
pub(crate) struct IdMapping {
    /// init writes a byte once it is in its new user namespace.
    pub unshared: OwnedFd,
    /// The outer process writes a byte once the maps are written; end of
    /// file means they could not be.
    pub mapped: OwnedFd,
}

/// In the outer process: wait until init has entered its user namespace,
/// write its maps, and say so. If anything fails, init is told nothing and
/// fails its step (its read sees end of file); this process then reports
/// init's exit as usual.
pub(crate) fn map_ids(host_proc: &std::fs::File, target: Pid, unshared: &OwnedFd, mapped: OwnedFd) {
    // Bounded for the helper (`enter`), which watches nothing else while
    // it waits here (not even the lifeline): an init stuck before entering
    // its user namespace must not hold it (init's read then sees end of
    // file). The zygote calls this only once init's pipe is readable, and
    // bounds that wait in its own loop (`MAP_TIMEOUT` in zygote.py): for it
    // the poll returns at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(unshared.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(1) => break,
            // The zygote's other children end meanwhile (SIGCHLD).
            Err(nix::errno::Errno::EINTR) if !left.is_zero() => continue,
            _ => {
                let _ = writeln!(std::io::stderr(), "kiln sandbox: init did not enter its user namespace in time");
                return;
            }
        }
    }
    let mut buf = [0u8; 1];
    let read = loop {
        match nix::unistd::read(unshared, &mut buf) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    if !matches!(read, Ok(1)) {
        return; // init ended before it got there
    }
    let maps = format!("0 {UID_BASE} 1\n{USER_ID} {} 1\n", UID_BASE + USER_ID);
    let write = |name: &str, text: &str| -> std::io::Result<()> {
        use rustix::fs::{openat, Mode, OFlags};
        let fd = openat(host_proc, format!("{target}/{name}"), OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
        rustix::io::write(&fd, text.as_bytes())?;
        Ok(())
    };
    // setgroups must be denied before a gid_map is written; it also keeps
    // the session from dropping supplementary groups to dodge deny-ACLs.
    let result =
        write("setgroups", "deny").and_then(|()| write("uid_map", &maps)).and_then(|()| write("gid_map", &maps));
    match result {
        Ok(()) => {
            let _ = nix::unistd::write(&mapped, b"1");
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "kiln sandbox: writing id maps failed: {e}");
        }
    }
}

#[derive(Clone, Copy)]
enum Forward {
    /// Forward to one process (the outer helper forwarding to init).
    ToPid,
    /// Forward to a process group (init forwarding to the program).
    ToGroup,
}

/// Wait for `child` while forwarding interrupts; exit with its status.
/// If any of `tethers` becomes readable (the server's lifeline reached end
/// of file, the parent exited), kill `child` and exit at once: for init,
/// that ends the whole pid namespace.
///
/// `child` is this process's own child and is reaped only here, so its pid
/// cannot have been reused when it is signalled.
fn supervise(child: Pid, handled: &SigSet, forward: Forward, tethers: &[BorrowedFd<'_>]) -> ! {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let target = match forward {
        Forward::ToPid => child,
        Forward::ToGroup => Pid::from_raw(-child.as_raw()),
    };
    let signals = match SignalFd::with_flags(handled, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(e) => fail(Step::ForkInit, format!("signalfd: {e}")),
    };
    loop {
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        fds.extend(tethers.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => fail(Step::Orphaned, format!("poll: {e}")),
        }
        if fds[1..].iter().any(|f| f.revents().is_some_and(|r| !r.is_empty())) {
            let _ = kill(child, Signal::SIGKILL);
            exit(Step::Orphaned.code());
        }
        while let Ok(Some(info)) = signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGINT) => {
                    let _ = kill(target, Signal::SIGINT);
                }
                Ok(Signal::SIGTERM | Signal::SIGHUP) => {
                    let _ = kill(target, Signal::SIGKILL);
                }
                _ => {}
            }
        }
        // Reap everything that ended (init adopts every orphan of the
        // namespace); leave when the main child did.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => exit(code),
                Ok(WaitStatus::Signaled(pid, s, _)) if pid == child => exit(128 + s as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

/// PID 1 of the session's pid namespace. Returns only in the program.
fn init(jail: &Jail, handled: &SigSet, ids: IdMapping, tethers: Tethers) {
    // If the outer helper or the zygote dies, so does init, and with init
    // the whole pid namespace.
    stay_tethered(&tethers);
    let _ = nix::unistd::setsid();
    // Its own host name, not the host's (the uts namespace is new).
    if let Err(e) = nix::unistd::sethostname("kiln") {
        fail(Step::Rootfs, format!("hostname: {e}"));
    }

    // 4. The filesystem, the network, the limits.
    if let Err(e) = crate::rootfs::build(jail) {
        fail(Step::Rootfs, e);
    }
    if let Err(e) = crate::rootfs::loopback_up() {
        fail(Step::Rootfs, format!("loopback: {e}"));
    }
    use nix::sys::resource::{setrlimit, Resource};
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, jail.limits.nofile, jail.limits.nofile)
        .and_then(|()| setrlimit(Resource::RLIMIT_CORE, 0, 0))
    {
        fail(Step::Limits, e);
    }

    // 5. The user namespace; the outer process writes its maps.
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
        fail(Step::Unshare, format!("user namespace: {e}"));
    }
    // New credentials: the parent-death signal was cleared.
    stay_tethered(&tethers);
    if let Err(e) = nix::unistd::write(&ids.unshared, b"1") {
        fail(Step::MapIds, e);
    }
    let mut buf = [0u8; 1];
    if !matches!(nix::unistd::read(&ids.mapped, &mut buf), Ok(1)) {
        fail(Step::MapIds, "the outer process could not write the id maps (see above)");
    }
    drop(ids);
    // Become root of the new namespace (host uid UID_BASE): from here on
    // init holds no identity of the host's, and the program's switch to the
    // session user clears every capability.
    if let Err(e) = nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .and_then(|()| nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)))
    {
        fail(Step::MapIds, e);
    }
    stay_tethered(&tethers);

    // 6. The program.
    // SAFETY: init is single-threaded.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // The program holds neither tether: nothing of the server's.
            drop(tethers);
            program(jail)
        }
        Ok(ForkResult::Parent { child }) => {
            supervise(child, handled, Forward::ToGroup, &[tethers.lifeline.as_fd(), tethers.parent.as_fd()])
        }
        Err(e) => fail(Step::ForkProgram, e),
    }
}

/// The program's process, up to (not including) its `execve`.
fn program(jail: &Jail) {
    if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        fail(Step::ForkProgram, e);
    }
    // Its own process group, so init can interrupt it and all its children.
    let _ = nix::unistd::setsid();
    if let Err(e) = nix::unistd::chdir(&jail.program.cwd) {
        fail(Step::ForkProgram, format!("chdir {}: {e}", jail.program.cwd.display()));
    }
    confine(jail);
}

/// Replace the confined program process with the program.
fn exec(jail: &Jail) -> ! {
    let program = &jail.program;
    let cstr = |s: &str| CString::new(s).unwrap_or_default();
    let prog = CString::new(program.path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let mut argv = vec![prog.clone()];
    argv.extend(program.args.iter().map(|a| cstr(a)));
    let envp: Vec<CString> = program.env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect();
    let err = nix::unistd::execve(&prog, &argv, &envp).err();
    fail(Step::Exec, format!("{}: {err:?}", program.path.display()))
}

/// The last steps before running untrusted code: the session user, no
/// privileges, landlock, seccomp.
fn confine(jail: &Jail) {
    if let Err(e) = drop_privileges() {
        fail(Step::DropPrivileges, e);
    }
    // New credentials: the parent-death signal was cleared.
    stay_child_of_init();
    if let Err(e) = crate::rootfs::landlock(jail) {
        fail(Step::Landlock, e);
    }
    if jail.seccomp {
        let filters = match crate::seccomp::compiled() {
            Ok(f) => f,
            Err(e) => fail(Step::Seccomp, e),
        };
        for f in filters {
            if let Err(e) = seccompiler::apply_filter(f) {
                fail(Step::Seccomp, e);
            }
        }
    }
}

/// Become the unprivileged session user with no capabilities at all, and
/// forbid gaining any through exec (setuid binaries, file capabilities).
fn drop_privileges() -> Result<(), String> {
    // Empty the bounding set first (needs CAP_SETPCAP, still held).
    for cap in 0..=63 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no
        // memory; numbers the kernel does not know fail with EINVAL, which
        // is ignored.
        unsafe {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
    }
    let uid = Uid::from_raw(USER_ID);
    let gid = Gid::from_raw(USER_ID);
    // Changing all uids from 0 to non-zero clears the permitted, effective
    // and ambient capability sets (no PR_SET_KEEPCAPS).
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    // Verify rather than trust: the kernel reports what is left.
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    for field in ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        let value = status.lines().find_map(|l| l.strip_prefix(field)).map(str::trim);
        if value.is_some_and(|v| !v.trim_start_matches('0').is_empty()) {
            return Err(format!("{field} {value:?} after dropping privileges"));
        }
    }
    Ok(())
}
