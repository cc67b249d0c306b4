"""A batch test cannot signal the kernel it was forked from.

The runner (judge.py) forks the kernel for each test; the kernel then puts
the work directory back after the test and runs the next. A test runs as the
same user as its parent, so it could ``kill`` it (or stop it) and so end the
runner before the work directory is put back: the next tests would then
start, in a new runner, from whatever the killer left. :func:`protect`, in
the child before any test code runs, adds a seccomp filter (filters only
ever narrow the sandbox's policy) under which every signal aimed at the
parent fails with ``EPERM``: ``kill``, ``tkill``, ``tgkill``,
``rt_sigqueueinfo`` and ``rt_tgsigqueueinfo`` to the parent's pid, any of its
threads, its process group or everyone (``-1``), ``pidfd_open`` of them, and
``pidfd_send_signal`` altogether (its target is a descriptor, which could be
a ``/proc/<pid>`` directory, so it cannot be checked by number). In kiln's
sandbox, whose pid namespace is the session's own, the same calls are
refused for every pid below the test's own: the pids of a namespace are
handed out in rising order, so those are processes and threads that were
there before the test (its ancestors' threads among them, also those
started after the filter was built, as a Deno kernel starts threads when
it needs them, and what the item's code left running, which the next tests
must find as this one did). Not on the host's pids (``--sandbox none``),
whose counter wraps at the host's ``pid_max`` as every process there
starts: a test's own child could then get a lower pid than the test; nor
for a test forked within :data:`WRAP_MARGIN` pids of its namespace's
wrap, for the same reason.
Signals to the test's own processes work as before. The same filter refuses
``mq_open``: a POSIX message queue would outlive the test, for the next one
to find, and cannot be listed to be removed (ipc.py). A runner that is a process of its
own (``judge.command``, which a Deno or bash session's kernel starts) is
guarded with its ancestors: the kernel, and the shell between them.
"""

import ctypes
import os
import platform

# (AUDIT_ARCH, syscall numbers) per machine.
_ARCHES = {
    "x86_64": (0xC000003E, {"kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
                            "rt_tgsigqueueinfo": 297, "pidfd_open": 434, "pidfd_send_signal": 424, "mq_open": 240}),
    "aarch64": (0xC00000B7, {"kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
                             "rt_tgsigqueueinfo": 240, "pidfd_open": 434, "pidfd_send_signal": 424, "mq_open": 180}),
}
_TARGETED = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open")
# Denied whatever their arguments: pidfd_send_signal (see above), and
# mq_open, whose queues outlive the test in the session's IPC namespace and
# cannot be listed to be removed after it (ipc.py).
_ALWAYS = ("pidfd_send_signal", "mq_open")

_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_ALLOW = 0x7FFF0000
_EPERM = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
# Offsets in struct seccomp_data: nr, arch, the low half of args[0].
_NR, _ARCH, _ARG0 = 0, 4, 16


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# Resolved once, at import (in the zygote): a test's fork only calls prctl.
_LIBC = _libc()
_MACHINE = platform.machine()


# Extra numbers (pids, thread ids, negated groups) a filter can hold: its
# jumps are 8 bits wide.
MAX_EXTRA = 200


def _ancestors() -> list:
    """This process's ancestors within its pid namespace, nearest first
    (never PID 1, which the kernel shields from its namespace's signals)."""
    out = []
    pid = os.getppid()
    while pid > 1 and len(out) < 8:
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        pid = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return out


def _tids(pid) -> tuple:
    try:
        return tuple(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return ()


def parent(ancestors=False):
    """In the parent, before the fork: the filter that keeps the child from
    reaching this process (built here, so the child only installs it). With
    ``ancestors``, nor any process this one descends from (the runner of a
    Deno or bash session is a process its kernel starts: a test must reach
    neither)."""
    processes, threads = [], []
    if ancestors:
        for pid in _ancestors():
            processes.append(pid)
            threads.extend(_tids(pid))
            try:
                processes.append(-os.getpgid(pid))
            except OSError:
                pass
    # At most what a filter's 8-bit jumps can skip: the processes and their
    # groups first, then as many of their threads as fit.
    extra = (processes + threads)[:MAX_EXTRA]
    # The lowest pid the test may signal is its own, known only once it is
    # forked: protect() sets it, in a pid namespace of the session's own.
    prog = program(os.getpid(), _tids("self"), os.getpgid(0), _MACHINE, tuple(extra), below=0)
    if not prog or _LIBC is None:
        return None
    filters = (_Filter * len(prog))(*[_Filter(*f) for f in prog])
    bounded = own_namespaces() and not _counter_near_wrap()
    return _Prog(len(prog), filters), filters, below_index(prog) if bounded else None


# A test forked this close to its pid namespace's wrap gets no bound below
# its pid: a child it starts could get a lower pid than its own.
WRAP_MARGIN = 8192


def near_wrap(last: int, pid_max: int) -> bool:
    """Whether a namespace that last handed out pid ``last`` is within
    :data:`WRAP_MARGIN` pids of wrapping at ``pid_max``."""
    return last > pid_max - WRAP_MARGIN


def _counter_near_wrap() -> bool:
    """:func:`near_wrap` for this process's pid namespace (its own
    ``pid_max`` from Linux 6.14; the host's before). False when it cannot
    be read."""
    try:
        with open("/proc/sys/kernel/ns_last_pid", "rb") as f:
            last = int(f.read())
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            top = int(f.read())
    except (OSError, ValueError):
        return False
    return near_wrap(last, top)


def own_namespaces() -> bool:
    """Whether this runs in kiln's sandbox, whose pid namespace, ``/tmp``,
    ``/dev/shm`` and IPC namespace are the session's own (kiln says so in
    the kernel's environment); with ``--sandbox none`` they are the
    host's."""
    return os.environ.get("KILN_PRIVATE_TMP") == "1"


def below_index(prog: list) -> int:
    """Where ``program`` keeps its ``below`` bound: the fifth instruction
    from its end (see its layout)."""
    i = len(prog) - 5
    assert prog[i][0] == _JGE
    return i


def program(pid: int, tids: tuple, pgid: int, machine: str, extra: tuple = (), below: int = 0) -> list:
    """The filter as (code, jt, jf, k) tuples; empty for an unknown machine.
    Besides ``pid``, its threads, its group, ``extra`` and -1, every pid
    from 1 to ``below`` (excluded) is refused."""
    if machine not in _ARCHES:
        return []
    arch, nrs = _ARCHES[machine]
    protected = sorted(
        {pid & 0xFFFFFFFF, *(t & 0xFFFFFFFF for t in (*tids, *extra)), 0xFFFFFFFF, (-pgid) & 0xFFFFFFFF}
    )
    checked = [nrs[n] for n in _TARGETED]
    always = [nrs[n] for n in _ALWAYS]
    # Layout: [arch check] [nr: always denied] [nr: checked] allow
    #   | ld arg0, [arg0 == protected ...], arg0 >= below, arg0 >= 1 | allow | deny | allow
    head = 3 + len(always) + len(checked)  # ld arch, jeq arch, ld nr, jeq denied..., jeq checked...
    allow1 = head
    check = allow1 + 1
    allow2 = check + 1 + len(protected) + 2
    deny = allow2 + 1
    allow = deny + 1
    prog = [(_LD_ABS, 0, 0, _ARCH), (_JEQ, 0, allow - 2, arch), (_LD_ABS, 0, 0, _NR)]
    for nr in always:
        prog.append((_JEQ, deny - (len(prog) + 1), 0, nr))
    for nr in checked:
        prog.append((_JEQ, check - (len(prog) + 1), 0, nr))
    prog.append((_RET, 0, 0, _ALLOW))
    prog.append((_LD_ABS, 0, 0, _ARG0))
    for value in protected:
        prog.append((_JEQ, deny - (len(prog) + 1), 0, value))
    # Unsigned: a group (-pgid) or -1 is above any pid, and 0 (the test's
    # own group) below 1.
    prog.append((_JGE, allow2 - (len(prog) + 1), 0, below & 0xFFFFFFFF))
    prog.append((_JGE, deny - (len(prog) + 1), 0, 1))
    prog.append((_RET, 0, 0, _ALLOW))
    prog.append((_RET, 0, 0, _EPERM))
    prog.append((_RET, 0, 0, _ALLOW))
    assert len(prog) == allow + 1 and all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in prog)
    return prog


def protect(prepared) -> bool:
    """In the child: install the filter ``parent`` built; whether it is in
    place."""
    if prepared is None:
        return False
    fprog, filters, below = prepared
    if below is not None:
        filters[below].k = os.getpid()
    # PR_SET_NO_NEW_PRIVS (already set by the sandbox; needed without one).
    _LIBC.prctl(38, 1, 0, 0, 0)
    # PR_SET_SECCOMP, SECCOMP_MODE_FILTER.
    return _LIBC.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0
