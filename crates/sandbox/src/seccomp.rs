//! The seccomp policy for untrusted code, as data.
//!
//! Default deny: a syscall not in [`ALLOWED`] fails with `EPERM` (not a kill:
//! a library probing for an exotic syscall gets an error it can handle, and
//! the session lives on). Each allowed syscall carries the reason it is
//! needed; each notable refusal is listed in [`DENIED`] with the reason it is
//! refused, so a reviewer reads the policy, not the code.
//!
//! The filters are installed in this order:
//! 1. the allowlist (mismatch → `EPERM`), with `clone` allowed only without
//!    namespace flags, and `socket`/`socketpair` only for the families in
//!    [`SOCKET_FAMILIES`] / [`SOCKETPAIR_FAMILIES`], in [`PIECES`] programs
//!    by syscall number, each allowing the numbers outside its range to the
//!    others (installing one long program cost each sandbox ~0.5 ms; see
//!    [`filters_in`]);
//! 2. `clone3` → `ENOSYS`. `clone3` passes its flags in memory, which BPF
//!    cannot inspect, so it is refused; `ENOSYS` (not `EPERM`) makes glibc
//!    fall back to `clone`, whose flags filter 1 can check. For equal-priority
//!    errno results the filter installed last decides.
//!
//! Every number lies in one piece's range, and that piece checks the
//! architecture before it judges the number, as the `clone3` filter does: a
//! syscall made through the 32-bit ABI (`int 0x80`) kills the process,
//! because its numbers mean other syscalls. Numbers with the x32 bit
//! ([`X32_SYSCALL_BIT`]) match no entry of the allowlist, so they get
//! `EPERM` like any other unlisted syscall.
//!
//! [`filters`] is pure: it builds the BPF programs without installing them,
//! so the policy is unit-tested here (by running the programs on sample
//! syscalls) and applied by the sandbox init.

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// Namespace-creating flags `clone` may not use.
pub const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME) as u64;

/// Syscalls untrusted code may make, with the reason.
pub const ALLOWED: &[(i64, &str)] = &[
    // Files and directories: Python, pip, compilers, user code.
    (libc::SYS_read, "file and socket I/O"),
    (libc::SYS_write, "file and socket I/O"),
    (libc::SYS_readv, "vectored I/O"),
    (libc::SYS_writev, "vectored I/O"),
    (libc::SYS_pread64, "positional I/O (sqlite, zip)"),
    (libc::SYS_pwrite64, "positional I/O"),
    (libc::SYS_preadv, "positional vectored I/O"),
    (libc::SYS_pwritev, "positional vectored I/O"),
    (libc::SYS_preadv2, "positional vectored I/O"),
    (libc::SYS_pwritev2, "positional vectored I/O"),
    (libc::SYS_open, "opening files"),
    (libc::SYS_openat, "opening files"),
    (libc::SYS_openat2, "opening files (newer libc)"),
    (libc::SYS_close, "closing descriptors"),
    (libc::SYS_close_range, "closing descriptors before exec"),
    (libc::SYS_creat, "creating files"),
    (libc::SYS_lseek, "seeking"),
    (libc::SYS_stat, "file metadata"),
    (libc::SYS_fstat, "file metadata"),
    (libc::SYS_lstat, "file metadata"),
    (libc::SYS_newfstatat, "file metadata"),
    (libc::SYS_statx, "file metadata"),
    (libc::SYS_statfs, "filesystem metadata (shutil.disk_usage)"),
    (libc::SYS_fstatfs, "filesystem metadata"),
    (libc::SYS_access, "permission checks"),
    (libc::SYS_faccessat, "permission checks"),
    (libc::SYS_faccessat2, "permission checks"),
    (libc::SYS_getdents64, "listing directories"),
    (libc::SYS_getdents, "listing directories"),
    (libc::SYS_getcwd, "current directory"),
    (libc::SYS_chdir, "changing directory"),
    (libc::SYS_fchdir, "changing directory"),
    (libc::SYS_mkdir, "creating directories"),
    (libc::SYS_mkdirat, "creating directories"),
    (libc::SYS_rmdir, "removing directories"),
    (libc::SYS_rename, "renaming"),
    (libc::SYS_renameat, "renaming"),
    (libc::SYS_renameat2, "renaming"),
    (libc::SYS_link, "hard links"),
    (libc::SYS_linkat, "hard links"),
    (libc::SYS_unlink, "removing files"),
    (libc::SYS_unlinkat, "removing files"),
    (libc::SYS_symlink, "symbolic links"),
    (libc::SYS_symlinkat, "symbolic links"),
    (libc::SYS_readlink, "resolving links"),
    (libc::SYS_readlinkat, "resolving links"),
    (libc::SYS_chmod, "file modes"),
    (libc::SYS_fchmod, "file modes"),
    (libc::SYS_fchmodat, "file modes"),
    (libc::SYS_fchmodat2, "file modes"),
    (libc::SYS_chown, "ownership (within the user namespace)"),
    (libc::SYS_fchown, "ownership"),
    (libc::SYS_lchown, "ownership"),
    (libc::SYS_fchownat, "ownership"),
    (libc::SYS_umask, "file creation mask"),
    (libc::SYS_truncate, "truncating files"),
    (libc::SYS_ftruncate, "truncating files"),
    (libc::SYS_fallocate, "preallocating files"),
    (libc::SYS_fsync, "flushing files (sqlite, pip)"),
    (libc::SYS_fdatasync, "flushing files"),
    (libc::SYS_sync_file_range, "flushing files"),
    (libc::SYS_utime, "timestamps"),
    (libc::SYS_utimes, "timestamps"),
    (libc::SYS_utimensat, "timestamps"),
    (libc::SYS_futimesat, "timestamps"),
    (libc::SYS_flock, "advisory locks (pip, sqlite)"),
    (libc::SYS_fcntl, "descriptor flags and locks"),
    (libc::SYS_ioctl, "terminal and socket queries (FIONREAD, TCGETS)"),
    (libc::SYS_dup, "duplicating descriptors"),
    (libc::SYS_dup2, "duplicating descriptors"),
    (libc::SYS_dup3, "duplicating descriptors"),
    (libc::SYS_pipe, "pipes (subprocess)"),
    (libc::SYS_pipe2, "pipes (subprocess)"),
    (libc::SYS_sendfile, "copying files (shutil)"),
    (libc::SYS_copy_file_range, "copying files (shutil)"),
    (libc::SYS_splice, "copying between descriptors"),
    (libc::SYS_tee, "copying between descriptors"),
    (libc::SYS_fadvise64, "access pattern hints"),
    (libc::SYS_readahead, "access pattern hints"),
    (libc::SYS_getxattr, "extended attributes (read; pip, shutil.copystat)"),
    (libc::SYS_lgetxattr, "extended attributes"),
    (libc::SYS_fgetxattr, "extended attributes"),
    (libc::SYS_listxattr, "extended attributes"),
    (libc::SYS_llistxattr, "extended attributes"),
    (libc::SYS_flistxattr, "extended attributes"),
    (libc::SYS_setxattr, "extended attributes (shutil.copystat)"),
    (libc::SYS_lsetxattr, "extended attributes"),
    (libc::SYS_fsetxattr, "extended attributes"),
    (libc::SYS_inotify_init1, "file watching (tornado, watchdog)"),
    (libc::SYS_inotify_add_watch, "file watching"),
    (libc::SYS_inotify_rm_watch, "file watching"),
    (libc::SYS_memfd_create, "anonymous files (numba, shared memory)"),
    // Memory.
    (libc::SYS_brk, "heap"),
    (libc::SYS_mmap, "memory mapping"),
    (libc::SYS_munmap, "memory mapping"),
    (libc::SYS_mremap, "memory mapping"),
    (libc::SYS_mprotect, "memory protection (JITs, loaders)"),
    (libc::SYS_madvise, "memory hints (allocators)"),
    (libc::SYS_msync, "flushing mappings"),
    (libc::SYS_mincore, "residency queries"),
    (libc::SYS_mlock, "pinning memory (bounded by RLIMIT_MEMLOCK)"),
    (libc::SYS_munlock, "pinning memory"),
    (libc::SYS_membarrier, "memory barriers (runtimes)"),
    (libc::SYS_get_mempolicy, "NUMA queries (OpenBLAS)"),
    (libc::SYS_set_mempolicy, "NUMA policy (OpenBLAS)"),
    (libc::SYS_mbind, "NUMA policy"),
    // Processes and threads.
    (libc::SYS_clone, "threads and processes, only without namespace flags (see the rule)"),
    (libc::SYS_fork, "processes"),
    (libc::SYS_vfork, "processes (posix_spawn)"),
    (libc::SYS_execve, "running programs (!cmd, subprocess)"),
    (libc::SYS_execveat, "running programs"),
    (libc::SYS_exit, "thread exit"),
    (libc::SYS_exit_group, "process exit"),
    (libc::SYS_wait4, "reaping children"),
    (libc::SYS_waitid, "reaping children"),
    (libc::SYS_kill, "signals (within the session's pid namespace)"),
    (libc::SYS_tgkill, "signals to threads"),
    (libc::SYS_tkill, "signals to threads"),
    (libc::SYS_getpid, "process identity"),
    (libc::SYS_getppid, "process identity"),
    (libc::SYS_gettid, "thread identity"),
    (libc::SYS_getpgid, "process groups"),
    (libc::SYS_getpgrp, "process groups"),
    (libc::SYS_setpgid, "process groups (subprocess)"),
    (libc::SYS_getsid, "sessions"),
    (libc::SYS_setsid, "sessions (subprocess start_new_session)"),
    (libc::SYS_getuid, "identity"),
    (libc::SYS_geteuid, "identity"),
    (libc::SYS_getgid, "identity"),
    (libc::SYS_getegid, "identity"),
    (libc::SYS_getresuid, "identity"),
    (libc::SYS_getresgid, "identity"),
    (libc::SYS_getgroups, "identity"),
    (libc::SYS_capget, "capability queries (always empty here)"),
    (libc::SYS_set_tid_address, "thread start-up (libc)"),
    (libc::SYS_set_robust_list, "thread start-up (libc)"),
    (libc::SYS_get_robust_list, "thread start-up (libc)"),
    (libc::SYS_rseq, "restartable sequences (libc)"),
    (libc::SYS_arch_prctl, "thread-local storage"),
    (libc::SYS_prctl, "thread names, no_new_privs queries (privileged options need capabilities, which are gone)"),
    (libc::SYS_seccomp, "adding filters, which can only narrow this policy (and installs filter 2)"),
    (libc::SYS_futex, "locks"),
    (libc::SYS_futex_waitv, "locks"),
    (libc::SYS_sched_yield, "scheduling"),
    (libc::SYS_sched_getaffinity, "CPU count (os.cpu_count, OpenBLAS)"),
    (libc::SYS_sched_setaffinity, "thread pinning (OpenMP)"),
    (libc::SYS_sched_getparam, "scheduling queries"),
    (libc::SYS_sched_setparam, "thread scheduling (ZeroMQ; raising priority needs a capability)"),
    (libc::SYS_sched_setscheduler, "thread scheduling (ZeroMQ aborts without it)"),
    (libc::SYS_sched_getattr, "scheduling queries"),
    (libc::SYS_sched_setattr, "thread scheduling (real-time classes need a capability)"),
    (libc::SYS_sched_getscheduler, "scheduling queries"),
    (libc::SYS_sched_get_priority_max, "scheduling queries"),
    (libc::SYS_sched_get_priority_min, "scheduling queries"),
    (libc::SYS_getpriority, "nice values"),
    (libc::SYS_setpriority, "lowering priority (nice)"),
    (libc::SYS_getrlimit, "resource limits (read)"),
    (libc::SYS_setrlimit, "lowering resource limits"),
    (libc::SYS_prlimit64, "resource limits (raising above the hard limit needs a capability)"),
    (libc::SYS_getrusage, "resource usage"),
    (libc::SYS_times, "process times"),
    // Signals.
    (libc::SYS_rt_sigaction, "signal handlers"),
    (libc::SYS_rt_sigprocmask, "signal masks"),
    (libc::SYS_rt_sigreturn, "returning from handlers"),
    (
        libc::SYS_restart_syscall,
        "the kernel resumes an interrupted timed wait (poll, epoll_wait, nanosleep) with it after a stop or a \
         signal another thread took; refusing it aborts ZeroMQ",
    ),
    (libc::SYS_rt_sigsuspend, "waiting for signals"),
    (libc::SYS_rt_sigpending, "pending signals"),
    (libc::SYS_rt_sigtimedwait, "waiting for signals"),
    (libc::SYS_rt_sigqueueinfo, "queued signals to own processes"),
    (libc::SYS_rt_tgsigqueueinfo, "queued signals to own threads"),
    (libc::SYS_sigaltstack, "signal stacks (Python faulthandler)"),
    (libc::SYS_pause, "waiting for signals"),
    (libc::SYS_alarm, "timers (signal.alarm)"),
    (libc::SYS_getitimer, "timers"),
    (libc::SYS_setitimer, "timers (signal.setitimer)"),
    (libc::SYS_signalfd4, "signals as descriptors"),
    (libc::SYS_pidfd_open, "process handles (subprocess)"),
    (libc::SYS_pidfd_send_signal, "signals via process handles"),
    // Time (reading only; setting clocks is denied).
    (libc::SYS_clock_gettime, "time"),
    (libc::SYS_clock_getres, "time"),
    (libc::SYS_clock_nanosleep, "sleeping"),
    (libc::SYS_gettimeofday, "time"),
    (libc::SYS_time, "time"),
    (libc::SYS_nanosleep, "sleeping"),
    (libc::SYS_timer_create, "POSIX timers"),
    (libc::SYS_timer_settime, "POSIX timers"),
    (libc::SYS_timer_gettime, "POSIX timers"),
    (libc::SYS_timer_getoverrun, "POSIX timers"),
    (libc::SYS_timer_delete, "POSIX timers"),
    (libc::SYS_timerfd_create, "timers as descriptors (asyncio)"),
    (libc::SYS_timerfd_settime, "timers as descriptors"),
    (libc::SYS_timerfd_gettime, "timers as descriptors"),
    // Polling and events.
    (libc::SYS_poll, "waiting on descriptors"),
    (libc::SYS_ppoll, "waiting on descriptors"),
    (libc::SYS_select, "waiting on descriptors"),
    (libc::SYS_pselect6, "waiting on descriptors"),
    (libc::SYS_epoll_create, "event loops (ZeroMQ, asyncio)"),
    (libc::SYS_epoll_create1, "event loops"),
    (libc::SYS_epoll_ctl, "event loops"),
    (libc::SYS_epoll_wait, "event loops"),
    (libc::SYS_epoll_pwait, "event loops"),
    (libc::SYS_epoll_pwait2, "event loops"),
    (libc::SYS_eventfd, "event notification (ZeroMQ)"),
    (libc::SYS_eventfd2, "event notification (ZeroMQ)"),
    // Sockets: the kernel's ipc:// sockets, and whatever the network
    // namespace allows (nothing but loopback by default).
    (libc::SYS_socket, "sockets, only of the families in SOCKET_FAMILIES (see the rule)"),
    (libc::SYS_socketpair, "socket pairs (multiprocessing), only AF_UNIX (see the rule)"),
    (libc::SYS_bind, "binding (ZeroMQ ipc sockets)"),
    (libc::SYS_listen, "listening"),
    (libc::SYS_accept, "accepting"),
    (libc::SYS_accept4, "accepting"),
    (libc::SYS_connect, "connecting"),
    (libc::SYS_getsockname, "socket addresses"),
    (libc::SYS_getpeername, "socket addresses"),
    (libc::SYS_sendto, "sending"),
    (libc::SYS_recvfrom, "receiving"),
    (libc::SYS_sendmsg, "sending"),
    (libc::SYS_recvmsg, "receiving"),
    (libc::SYS_sendmmsg, "sending"),
    (libc::SYS_recvmmsg, "receiving"),
    (libc::SYS_shutdown, "closing sockets"),
    (libc::SYS_setsockopt, "socket options"),
    (libc::SYS_getsockopt, "socket options"),
    // System information.
    (libc::SYS_uname, "platform queries"),
    (libc::SYS_sysinfo, "memory size queries"),
    (libc::SYS_getrandom, "randomness"),
    (libc::SYS_getcpu, "CPU queries"),
    // SysV IPC: the session has its own ipc namespace.
    (libc::SYS_shmget, "shared memory (own ipc namespace)"),
    (libc::SYS_shmat, "shared memory"),
    (libc::SYS_shmdt, "shared memory"),
    (libc::SYS_shmctl, "shared memory"),
    (libc::SYS_semget, "semaphores (multiprocessing)"),
    (libc::SYS_semop, "semaphores"),
    (libc::SYS_semtimedop, "semaphores"),
    (libc::SYS_semctl, "semaphores"),
    (libc::SYS_msgget, "message queues"),
    (libc::SYS_msgsnd, "message queues"),
    (libc::SYS_msgrcv, "message queues"),
    (libc::SYS_msgctl, "message queues"),
    (libc::SYS_mq_open, "POSIX message queues"),
    (libc::SYS_mq_unlink, "POSIX message queues"),
    (libc::SYS_mq_timedsend, "POSIX message queues"),
    (libc::SYS_mq_timedreceive, "POSIX message queues"),
    (libc::SYS_mq_getsetattr, "POSIX message queues"),
    (libc::SYS_mq_notify, "POSIX message queues"),
];

/// Notable refusals, with the reason (all are also simply absent from
/// [`ALLOWED`]).
pub const DENIED: &[(i64, &str)] = &[
    (libc::SYS_mount, "mounting could hide or expose filesystems"),
    (libc::SYS_umount2, "unmounting could expose what the sandbox covers"),
    (libc::SYS_pivot_root, "changing the root"),
    (libc::SYS_chroot, "changing the root"),
    (libc::SYS_open_tree, "new mount API"),
    (libc::SYS_move_mount, "new mount API"),
    (libc::SYS_fsopen, "new mount API"),
    (libc::SYS_fsmount, "new mount API"),
    (libc::SYS_fspick, "new mount API"),
    (libc::SYS_mount_setattr, "new mount API"),
    (libc::SYS_unshare, "new namespaces widen the kernel attack surface"),
    (libc::SYS_setns, "entering other namespaces"),
    (libc::SYS_clone3, "flags cannot be inspected (ENOSYS: libc falls back to clone)"),
    (libc::SYS_ptrace, "tracing other processes"),
    (libc::SYS_process_vm_readv, "reading other processes' memory"),
    (libc::SYS_process_vm_writev, "writing other processes' memory"),
    (libc::SYS_kcmp, "comparing other processes' resources"),
    (libc::SYS_pidfd_getfd, "stealing descriptors"),
    (libc::SYS_kexec_load, "loading a new kernel"),
    (libc::SYS_kexec_file_load, "loading a new kernel"),
    (libc::SYS_init_module, "loading kernel modules"),
    (libc::SYS_finit_module, "loading kernel modules"),
    (libc::SYS_delete_module, "unloading kernel modules"),
    (libc::SYS_bpf, "eBPF programs"),
    (libc::SYS_perf_event_open, "performance counters leak host information"),
    (libc::SYS_keyctl, "the kernel keyring is not namespaced"),
    (libc::SYS_add_key, "the kernel keyring is not namespaced"),
    (libc::SYS_request_key, "the kernel keyring is not namespaced"),
    (libc::SYS_settimeofday, "setting the clock"),
    (libc::SYS_clock_settime, "setting the clock"),
    (libc::SYS_clock_adjtime, "adjusting the clock"),
    (libc::SYS_adjtimex, "adjusting the clock"),
    (libc::SYS_reboot, "rebooting"),
    (libc::SYS_swapon, "swap"),
    (libc::SYS_swapoff, "swap"),
    (libc::SYS_acct, "process accounting"),
    (libc::SYS_quotactl, "quotas"),
    (libc::SYS_syslog, "the kernel log"),
    (libc::SYS_userfaultfd, "a common exploitation primitive"),
    (libc::SYS_io_uring_setup, "a large, often exploited kernel surface"),
    (libc::SYS_io_uring_enter, "a large, often exploited kernel surface"),
    (libc::SYS_io_uring_register, "a large, often exploited kernel surface"),
    (libc::SYS_personality, "can disable address space randomisation"),
    (libc::SYS_setuid, "identity changes (no capabilities remain anyway)"),
    (libc::SYS_setgid, "identity changes"),
    (libc::SYS_setreuid, "identity changes"),
    (libc::SYS_setregid, "identity changes"),
    (libc::SYS_setresuid, "identity changes"),
    (libc::SYS_setresgid, "identity changes"),
    (libc::SYS_setgroups, "identity changes"),
    (libc::SYS_capset, "capability changes"),
    (libc::SYS_sethostname, "the host name is fixed"),
    (libc::SYS_setdomainname, "the domain name is fixed"),
    (libc::SYS_name_to_handle_at, "file handles bypass path checks"),
    (libc::SYS_open_by_handle_at, "file handles bypass path checks"),
    (libc::SYS_lookup_dcookie, "kernel internals"),
    (libc::SYS_vhangup, "terminals"),
];

/// A socket family untrusted code may create, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFamily {
    /// `socket()`'s first argument (`AF_*`).
    pub domain: libc::c_int,
    /// `Some(p)`: only protocol `p` of this family (its third argument).
    pub protocol: Option<libc::c_int>,
    /// Why the session needs it.
    pub why: &'static str,
}

/// The socket families `socket()` accepts; every other family fails with
/// `EPERM`. Families are not all isolated by network namespaces (vsock,
/// for one, reaches the host and the hypervisor past both the namespace and
/// the egress proxy), and each one is kernel code an attacker can reach, so
/// only what the runtime needs is open.
pub const SOCKET_FAMILIES: &[SocketFamily] = &[
    SocketFamily {
        domain: libc::AF_UNIX,
        protocol: None,
        why: "the kernel's ZeroMQ ipc sockets, the egress proxy's socket, multiprocessing",
    },
    SocketFamily {
        domain: libc::AF_INET,
        protocol: None,
        why: "TCP/UDP on the session's own loopback, and the egress proxy at 127.0.0.1:3128",
    },
    SocketFamily { domain: libc::AF_INET6, protocol: None, why: "the same over IPv6 (::1)" },
    SocketFamily {
        domain: libc::AF_NETLINK,
        protocol: Some(libc::NETLINK_ROUTE),
        why: "glibc's getifaddrs and if_nameindex, and getaddrinfo's address sorting, read the \
              namespace's interfaces (only lo) over NETLINK_ROUTE; changing them needs CAP_NET_ADMIN \
              over the host-owned namespace",
    },
];

/// The families `socketpair()` accepts (Linux implements it for Unix
/// sockets only; the rule says so rather than trusting that).
pub const SOCKETPAIR_FAMILIES: &[(libc::c_int, &str)] =
    &[(libc::AF_UNIX, "connected pairs for subprocess and multiprocessing")];

/// Notable refused families, with the reason (all are also simply absent
/// from [`SOCKET_FAMILIES`]).
pub const DENIED_FAMILIES: &[(libc::c_int, &str)] = &[
    (libc::AF_VSOCK, "not isolated by network namespaces: shares the host's vsock ports and reaches the hypervisor"),
    (libc::AF_PACKET, "raw link-layer frames"),
    (libc::AF_ALG, "the kernel crypto API: a large, often exploited surface"),
    (libc::AF_XDP, "express data path sockets"),
    (libc::AF_BLUETOOTH, "host radios"),
    (libc::AF_CAN, "host buses"),
    (libc::AF_KEY, "IPsec key management"),
    (libc::AF_RDS, "a protocol with a history of exploits"),
    (libc::AF_TIPC, "cluster messaging, not namespaced by route"),
    (libc::AF_LLC, "link-layer control"),
    (libc::AF_PPPOX, "PPP tunnels"),
    (libc::AF_NFC, "host radios"),
    (libc::AF_IEEE802154, "host radios"),
];

/// Netlink protocols other than `NETLINK_ROUTE` are refused; these with
/// the reason worth stating.
pub const DENIED_NETLINK: &[(libc::c_int, &str)] = &[
    (
        libc::NETLINK_KOBJECT_UEVENT,
        "the host's device events reach every network namespace owned by the host's user namespace",
    ),
    (libc::NETLINK_AUDIT, "the host's audit subsystem"),
    (libc::NETLINK_SOCK_DIAG, "socket enumeration"),
    (libc::NETLINK_NETFILTER, "firewall configuration"),
    (libc::NETLINK_GENERIC, "a gateway to many kernel subsystems"),
    (libc::NETLINK_XFRM, "IPsec configuration"),
    (libc::NETLINK_CONNECTOR, "process events of the whole host"),
];

/// `__X32_SYSCALL_BIT` of the kernel's `asm/unistd.h`: x32-ABI syscall
/// numbers are the x86_64 ones with this bit set (the `libc` crate defines it
/// only for the x32 target).
pub const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// Why the policy could not be compiled.
#[derive(Debug, thiserror::Error)]
#[error("could not compile the seccomp policy: {0}")]
pub struct PolicyError(#[from] seccompiler::BackendError);

/// How many programs the allowlist is split into (see [`filters`]).
pub const PIECES: usize = 4;

/// The filters to install, in order.
pub fn filters() -> Result<Vec<BpfProgram>, PolicyError> {
    filters_in(PIECES)
}

/// The policy as `pieces` allowlist programs and the `clone3` one.
///
/// Why pieces: when a filter is installed, the kernel works out which
/// syscalls it always allows (its action cache) by running the program
/// for every syscall number, ~450 of them. seccompiler emits one check
/// after another, so the allowlist as one program (~1,250 instructions)
/// took ~0.5 ms of every new sandbox's CPU to install. Piece `i` judges
/// only the numbers in its own range and allows all others in its first
/// instructions (another piece judges those), so the kernel's walk is a
/// `1 / pieces` of the list per number. Together the pieces decide
/// exactly what the single list did: the kernel keeps the most
/// restrictive result of all filters.
pub fn filters_in(pieces: usize) -> Result<Vec<BpfProgram>, PolicyError> {
    let arch = seccompiler::TargetArch::x86_64;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _why) in ALLOWED {
        rules.insert(*nr, vec![]);
    }
    // clone: allowed only when (flags & NAMESPACE_FLAGS) == 0.
    let no_namespaces = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS), 0)?;
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![no_namespaces])?]);
    // socket: one rule per allowed family (rules are alternatives). The
    // arguments are C ints, which the kernel truncates to 32 bits: compare
    // exactly those.
    let int_eq = |arg: u8, value: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(value as u32))
    };
    let mut socket = Vec::new();
    for family in SOCKET_FAMILIES {
        let mut conditions = vec![int_eq(0, family.domain)?];
        if let Some(protocol) = family.protocol {
            conditions.push(int_eq(2, protocol)?);
        }
        socket.push(SeccompRule::new(conditions)?);
    }
    rules.insert(libc::SYS_socket, socket);
    let pairs = SOCKETPAIR_FAMILIES.iter().map(|(domain, _)| SeccompRule::new(vec![int_eq(0, *domain)?]));
    rules.insert(libc::SYS_socketpair, pairs.collect::<Result<_, _>>()?);

    // Each piece starts at a listed number; the last takes everything above
    // its start, the x32 numbers included, and refuses what is not listed.
    let per_piece = rules.len().div_ceil(pieces.max(1));
    let starts: Vec<i64> = rules.keys().copied().step_by(per_piece).collect();
    let mut programs = Vec::with_capacity(starts.len() + 1);
    for (i, start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied();
        let rest = end.map(|end| rules.split_off(&end)).unwrap_or_default();
        let piece = std::mem::replace(&mut rules, rest);
        let filter = SeccompFilter::new(piece, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch)?;
        let own: BpfProgram = filter.try_into()?;
        let range = ((i > 0).then_some(*start as u32), end.map(|end| end as u32));
        programs.push(others_allowed(range).into_iter().chain(own).collect());
    }

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    let no_clone3 = SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?;
    programs.push(no_clone3.try_into()?);
    Ok(programs)
}

/// The first instructions of a piece judging the syscall numbers in
/// `[from, to)` (either end open when `None`): load the number, and allow
/// it when it is outside, so that only numbers in range reach the piece's
/// own checks. Only instructions the kernel's action cache can follow
/// (loads of the number, `jge`, `ja`, `ret`).
fn others_allowed((from, to): (Option<u32>, Option<u32>)) -> Vec<sock_filter> {
    let checks = usize::from(from.is_some()) + usize::from(to.is_some());
    if checks == 0 {
        return Vec::new();
    }
    let op = |code: u32, k: u32, jt: u8, jf: u8| sock_filter { code: code as u16, jt, jf, k };
    let jge = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
    // The syscall number is the first field of `struct seccomp_data`.
    let mut program = vec![op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0)];
    // A jump counts the instructions it skips: to reach the `ret` below,
    // the checks after this one and the `ja`.
    if let Some(from) = from {
        program.push(op(jge, from, 0, checks as u8));
    }
    if let Some(to) = to {
        program.push(op(jge, to, 1, 0));
    }
    program.push(op(libc::BPF_JMP | libc::BPF_JA, 1, 0, 0));
    program.push(op(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0));
    program
}

/// [`filters`], compiled once per process: the zygote compiles them before
/// it forks anything ([`crate::ffi::kiln_zygote_prepare`]), so that every
/// sandbox's program process finds them compiled in the memory it shares
/// with the zygote (compiling costs ~1 ms and a few hundred copied pages in
/// each new process). The policy is constant: nothing of a session's goes
/// into it.
pub(crate) fn compiled() -> Result<&'static [BpfProgram], String> {
    static COMPILED: std::sync::OnceLock<Result<Vec<BpfProgram>, String>> = std::sync::OnceLock::new();
    COMPILED.get_or_init(|| filters().map_err(|e| e.to_string())).as_deref().map_err(Clone::clone)
}

#[cfg(test)]
mod tests;
