//! The host kernel's surface a session can reach: socket families, netlink
//! protocols, the syscalls refused by seccomp, other syscall ABIs, and the
//! `/proc` entries container runtimes hide.
//!
//! A refused syscall is recognised by seccomp's answer (`EPERM`); each
//! attempt is built so that without the filter the kernel would answer
//! otherwise (succeed, or fail with another errno), so every assertion
//! fails if its wall is missing. Syscall numbers come from `libc`.

use super::stdout_of;
use crate::common::start;

/// Python that defines `attempt(name, nr, *args)`: make the raw syscall
/// and print `name REACHED <result>` or `name <errno name>`.
const ATTEMPT: &str = r#"import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def attempt(name, nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    print(name, f'REACHED {r}' if r >= 0 else errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
"#;

/// Lines of `out` that do not say `EPERM`.
fn not_refused(out: &str) -> Vec<&str> {
    out.lines().filter(|l| !l.ends_with(" EPERM")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_families_beyond_unix_and_ip_are_refused() {
    // vsock is not isolated by network namespaces: a session could bind
    // the host's ports and reach the hypervisor. Nothing is bound or
    // connected here; creating the socket is what must fail.
    let s = start(&[]);
    let allowed = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];
    let code = format!(
        "{ATTEMPT}for family in range(64):\n    if family in {allowed:?}:\n        continue\n    \
         for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_RAW):\n        \
         attempt(f'socket {{family}} {{kind}}', {socket}, family, kind, 0)\n\
         attempt('socketpair vsock', {socketpair}, {vsock}, socket.SOCK_STREAM, 0, ctypes.byref((ctypes.c_int * 2)()))\n\
         print(socket.socket(socket.AF_UNIX).family.name, socket.socket().family.name, \
         socket.socket(socket.AF_INET6).family.name, len(socket.socketpair()))",
        socket = libc::SYS_socket,
        socketpair = libc::SYS_socketpair,
        vsock = libc::AF_VSOCK,
    );
    let out = stdout_of(&s, &code).await;
    let lines: Vec<&str> = out.lines().collect();
    let (refusals, last) = lines.split_at(lines.len() - 1);
    assert_eq!(refusals.len(), (64 - allowed.len()) * 4 + 1, "{out}");
    assert!(not_refused(&refusals.join("\n")).is_empty(), "{out}");
    assert_eq!(last, ["AF_UNIX AF_INET AF_INET6 2"], "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_device_events_and_other_netlink_protocols_are_out_of_reach() {
    // NETLINK_KOBJECT_UEVENT delivered the host's device events to
    // sessions; only NETLINK_ROUTE (the session's own interfaces, which
    // glibc reads) remains.
    let s = start(&[]);
    let code = format!(
        "{ATTEMPT}for proto in range(32):\n    if proto != {route}:\n        \
         attempt(f'netlink {{proto}}', {socket}, {netlink}, socket.SOCK_DGRAM, proto)\n\
         print('interfaces', socket.if_nameindex())",
        route = libc::NETLINK_ROUTE,
        socket = libc::SYS_socket,
        netlink = libc::AF_NETLINK,
    );
    let out = stdout_of(&s, &code).await;
    let uevent = format!("netlink {} EPERM", libc::NETLINK_KOBJECT_UEVENT);
    assert!(out.lines().any(|l| l == uevent), "{out}");
    let (refusals, last) = out.trim_end().rsplit_once('\n').unwrap();
    assert_eq!(refusals.lines().count(), 31, "{out}");
    assert!(not_refused(refusals).is_empty(), "{out}");
    assert_eq!(last, "interfaces [(1, 'lo')]");
}

#[tokio::test(flavor = "multi_thread")]
async fn exploit_primitives_stay_refused() {
    // Each call is one a session could make successfully without seccomp
    // (on this kernel's defaults): an io_uring, a user-mode userfaultfd, a
    // user-only perf counter on itself, a read of its own memory, a file
    // handle, a descriptor copied out of a process. open_by_handle_at gets
    // a bad descriptor, which the kernel itself would answer with EBADF.
    let s = start(&[]);
    let code = format!(
        r#"{ATTEMPT}params = ctypes.create_string_buffer(120)
attempt('io_uring_setup', {io_uring}, 8, params)
UFFD_USER_MODE_ONLY = 1
attempt('userfaultfd', {userfaultfd}, os.O_CLOEXEC | UFFD_USER_MODE_ONLY)
attr = ctypes.create_string_buffer(64)
PERF_TYPE_SOFTWARE, DISABLED, EXCLUDE_KERNEL, EXCLUDE_HV = 1, 1, 1 << 5, 1 << 6
ctypes.memmove(attr, (ctypes.c_uint32 * 2)(PERF_TYPE_SOFTWARE, 64), 8)
ctypes.memmove(ctypes.addressof(attr) + 40, (ctypes.c_uint64 * 1)(DISABLED | EXCLUDE_KERNEL | EXCLUDE_HV), 8)
attempt('perf_event_open', {perf}, attr, 0, -1, -1, 0)
secret = ctypes.create_string_buffer(b'secret')
local = ctypes.create_string_buffer(8)
class Iov(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
attempt('process_vm_readv', {vm_readv}, os.getpid(), ctypes.byref(Iov(ctypes.addressof(local), 6)), 1,
        ctypes.byref(Iov(ctypes.addressof(secret), 6)), 1, 0)
handle = ctypes.create_string_buffer(136)
ctypes.memmove(handle, (ctypes.c_uint32 * 1)(128), 4)
mount_id = ctypes.c_int()
attempt('name_to_handle_at', {name_to_handle}, -100, b'/etc/hostname', handle, ctypes.byref(mount_id), 0)
attempt('open_by_handle_at', {open_by_handle}, -1, handle, os.O_RDONLY)
pidfd = os.pidfd_open(os.getpid())
attempt('pidfd_getfd', {pidfd_getfd}, pidfd, 0, 0)
print(local.raw[:6])"#,
        io_uring = libc::SYS_io_uring_setup,
        userfaultfd = libc::SYS_userfaultfd,
        perf = libc::SYS_perf_event_open,
        vm_readv = libc::SYS_process_vm_readv,
        name_to_handle = libc::SYS_name_to_handle_at,
        open_by_handle = libc::SYS_open_by_handle_at,
        pidfd_getfd = libc::SYS_pidfd_getfd,
    );
    let out = stdout_of(&s, &code).await;
    let (calls, copied) = out.trim_end().rsplit_once('\n').unwrap();
    assert_eq!(calls.lines().count(), 7, "{out}");
    assert!(not_refused(calls).is_empty(), "{out}");
    assert_eq!(copied, r"b'\x00\x00\x00\x00\x00\x00'", "another process's memory was read: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_x32_abi_is_no_way_around_the_filter() {
    // x32 numbers are the x86_64 ones plus a bit. Without the filter a
    // kernel built with x32 would create the user namespace (and one
    // without it would answer ENOSYS); the filter answers EPERM.
    let s = start(&[]);
    let x32 = kiln_sandbox::seccomp::X32_SYSCALL_BIT;
    let code = format!(
        "{ATTEMPT}before = os.readlink('/proc/self/ns/user')\n\
         attempt('x32 unshare', {unshare}, {newuser})\n\
         attempt('x32 getpid', {getpid})\n\
         attempt('x32 socket vsock', {socket}, {vsock}, socket.SOCK_STREAM, 0)\n\
         print('same namespace', os.readlink('/proc/self/ns/user') == before)",
        unshare = x32 | libc::SYS_unshare,
        newuser = libc::CLONE_NEWUSER,
        getpid = x32 | libc::SYS_getpid,
        socket = x32 | libc::SYS_socket,
        vsock = libc::AF_VSOCK,
    );
    let out = stdout_of(&s, &code).await;
    assert_eq!(out, "x32 unshare EPERM\nx32 getpid EPERM\nx32 socket vsock EPERM\nsame namespace True\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_wait_is_resumed_not_refused() {
    // Not an attack: the filter must not break what the kernel does on the
    // program's behalf. A timed poll stopped and continued is resumed
    // through restart_syscall; refusing it made poll fail with EPERM, and
    // ZeroMQ abort the kernel, whenever a signal woke one of its threads.
    let s = start(&[]);
    let out = stdout_of(
        &s,
        r#"import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import select; select.poll().poll(1500); print("resumed")'],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
time.sleep(0.5)
os.kill(child.pid, signal.SIGSTOP); time.sleep(0.1); os.kill(child.pid, signal.SIGCONT)
out, _ = child.communicate()
print(out.strip().splitlines()[-1], child.returncode)"#,
    )
    .await;
    assert_eq!(out, "resumed 0\n");
}

/// What container runtimes mask (runc, containerd, Docker, Kubernetes)
/// and what kiln adds (SECURITY.md lists both).
const MASKED: &[&str] = &[
    "acpi",
    "asound",
    "interrupts",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
    "config.gz",
    "kallsyms",
    "modules",
    "iomem",
    "ioports",
    "mtrr",
    "softirqs",
    "cmdline",
    "kmsg",
    "key-users",
    "buddyinfo",
    "pagetypeinfo",
    "zoneinfo",
    "slabinfo",
    "vmallocinfo",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
];
const READ_ONLY: &[&str] = &["sys", "sysrq-trigger", "bus", "fs", "irq"];

#[tokio::test(flavor = "multi_thread")]
async fn proc_hides_what_container_runtimes_hide() {
    let s = start(&[]);
    // Only what this host's kernel has (the test runs as root on the host).
    let present = |names: &[&str]| -> Vec<String> {
        names.iter().filter(|n| std::path::Path::new("/proc").join(n).exists()).map(|n| n.to_string()).collect()
    };
    let (masked, read_only) = (present(MASKED), present(READ_ONLY));
    assert!(masked.iter().any(|m| m == "interrupts"), "{masked:?}");
    let code = format!(
        r#"import os
points = {{l.split()[4]: l.split()[5] for l in open('/proc/self/mountinfo')}}
def read(p):
    try:
        if os.path.isdir(p):
            return 'entries' if os.listdir(p) else 'empty'
        return 'content' if open(p, 'rb').read(1) else 'empty'
    except PermissionError:
        return 'denied'
for name in {masked:?}:
    p = '/proc/' + name
    print(p, read(p), 'mounted' if p in points else 'NOT-MOUNTED')
for name in {read_only:?}:
    p = '/proc/' + name
    print(p, 'ro' if points.get(p, '').split(',')[0] == 'ro' else 'WRITABLE')
try:
    open('/proc/sys/kernel/hostname', 'w').write('x')
except OSError as e:
    print('sysctl', e.strerror)
print('still readable', bool(open('/proc/meminfo').read()), bool(open('/proc/cpuinfo').read()))"#
    );
    let out = stdout_of(&s, &code).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), masked.len() + read_only.len() + 2, "{out}");
    for line in &lines[..masked.len()] {
        assert!(line.ends_with(" empty mounted") || line.ends_with(" denied mounted"), "{line}\n{out}");
    }
    for line in &lines[masked.len()..masked.len() + read_only.len()] {
        assert!(line.ends_with(" ro"), "{line}\n{out}");
    }
    assert!(out.contains("sysctl Read-only file system"), "{out}");
    assert!(out.ends_with("still readable True True\n"), "{out}");
}
