"""One test in a fork of this process (``judge``'s runs): the fork, its
standard streams, its time limit and its report.

The parent, before forking, makes itself non-dumpable (no ``/proc/<pid>/mem``
for a child of the same user) and a child subreaper; the child takes its
own descriptors 0-2 (every other inherited one closed, but those it is told
to keep), its own session and default signals, and a seccomp filter that
keeps it from signalling this process (guard.py). After the child ends,
every descendant that appeared since the fork is killed, and the IPC
objects it made are removed (ipc.py): nothing a test started lives on into
the next. See ``judge`` for why tests are forks.
"""

import base64
import builtins
import json
import os
import selectors
import signal
import sys
import time
import traceback
import types

from . import guard as _guard, ipc as _ipc

# Bound now, at import (before any candidate code runs in this process).
_fork = os.fork
_waitpid = os.waitpid
_kill = os.kill
_pipe = os.pipe
_read = os.read
_write = os.write
_close = os.close
_dup2 = os.dup2
_listdir = os.listdir
_getpid = os.getpid
_memfd_create = os.memfd_create
_monotonic = time.monotonic
_dumps = json.dumps
_b64encode = base64.b64encode
# The interpreter's own input(): a cell runs with the kernel's in its place.
_input = builtins.input if isinstance(builtins.input, types.BuiltinFunctionType) else None

# At most this much of a test's stdout is kept (a program printing more
# fails its test: the comparison needs all of it) and of its stderr.
STDOUT_CAP = 1 << 20
STDERR_CAP = 64 << 10
# Set in a child of the fork server, whose only children are its tests: it
# need not list its descendants before a test to know which are new.
ONLY_TESTS = False



def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None


# Resolved once, at import: loading the C library is most of a call's cost
# (four calls a test).
_PRCTL = _libc_prctl()


def _prctl(option: int, value: int):
    """prctl's result, or None without the C library."""
    if _PRCTL is not None:
        try:
            return _PRCTL(option, value, 0, 0, 0)
        except Exception:
            pass
    return None


def _set_dumpable(value: int) -> int:
    """PR_SET_DUMPABLE: while 0, processes of the same user cannot open this
    one's /proc/<pid>/mem, fd/ or environ. Returns what it was
    (PR_GET_DUMPABLE), to be put back: in kiln's sandbox a kernel is not
    dumpable to begin with (it changed its credentials)."""
    was = _prctl(3, 0)
    _prctl(4, value)
    return 1 if was is None else was


def _set_subreaper(on: bool) -> None:
    """PR_SET_CHILD_SUBREAPER: while set, a test's orphaned descendants are
    reparented to this process rather than to init, so they stay findable
    as its descendants (and nothing else is ever swept)."""
    _prctl(36, 1 if on else 0)


def _descendants() -> dict:
    """This process's descendants: pid -> state letter (``Z``: a zombie)."""
    me = _getpid()
    children = {}
    states = {}
    for name in _listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        pid = int(name)
        children.setdefault(int(fields[1]), []).append(pid)
        states[pid] = fields[0].decode()
    out = {}
    stack = [me]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in out:
                out[child] = states.get(child, "?")
                stack.append(child)
    return out


def _sweep(before) -> None:
    """Kill (and reap) every descendant that was not there before the test,
    until none is left: a process cannot fork once it is killed, so a few
    rounds end even a fork loop. Only descendants: with ``--sandbox none``
    the kernel shares the host's /proc, and nothing else may be touched."""
    for _ in range(200):
        extra = {p: st for p, st in _descendants().items() if p not in before}
        if not extra:
            return
        for p, st in extra.items():
            if st != "Z":
                try:
                    _kill(p, signal.SIGKILL)
                except OSError:
                    pass
            try:
                _waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.001)


def _child_io(stdin_fd: int, out_w: int, err_w: int, keep: tuple) -> None:
    """In the child: fds 0, 1, 2 become the test's, every other inherited
    descriptor but those in ``keep`` (all above 2) is closed, Python's
    streams are rebuilt on them, and signals are back to their defaults."""
    _dup2(stdin_fd, 0)
    _dup2(out_w, 1)
    _dup2(err_w, 2)
    for fd in (stdin_fd, out_w, err_w):
        if fd > 2 and fd not in keep:
            _close(fd)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)
    try:
        signal.set_wakeup_fd(-1)
    except Exception:
        pass
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2):
        try:
            signal.signal(sig, signal.SIG_DFL)
        except Exception:
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    builtins.input = _input or _read_line
    try:
        os.setsid()
    except OSError:
        pass
    # Should a test exhaust the session's memory, it is the one the OOM
    # killer picks, not the kernel that runs the next tests.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _read_line(prompt=""):
    """input() as the interpreter has it, should its own be unreachable."""
    if prompt:
        sys.stdout.write(str(prompt))
        sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError("EOF when reading a line")
    return line[:-1] if line.endswith("\n") else line


def _print_error(e: BaseException) -> None:
    """The traceback as the program's own: the runner's frame left out."""
    traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)


def _flush() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass


def _run(body, stdin: bytes, timeout: float, guard=None, keep: tuple = (), stdout_cap: int = STDOUT_CAP) -> dict:
    """Fork; in the child call ``body(done_fd)`` (which must not return);
    in the parent collect the child's output until it ends or ``timeout``.
    ``guard``: the filter the child installs (by default, one that keeps it
    from signalling this process); ``keep``: descriptors the child keeps
    open besides its own; ``stdout_cap``: the stdout kept (more is
    reported as cut)."""
    stdin_fd = _memfd_create("kiln-stdin")
    _write(stdin_fd, stdin)
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = _pipe()
    err_r, err_w = _pipe()
    done_r, done_w = _pipe()
    before = set() if ONLY_TESTS else set(_descendants())
    ipc_before = _ipc.objects() if _private() else None
    parent = guard if guard is not None else _guard.parent()
    dumpable = _set_dumpable(0)
    _set_subreaper(True)
    started = _monotonic()
    pid = _fork()
    if pid == 0:
        try:
            for fd in (out_r, err_r, done_r):
                _close(fd)
            _child_io(stdin_fd, out_w, err_w, (done_w, *keep))
            # The test cannot signal this kernel (so it cannot end the runner
            # before the work directory is put back).
            _guard.protect(parent)
            body(done_w)
        finally:
            os._exit(70)
    for fd in (stdin_fd, out_w, err_w, done_w):
        _close(fd)
    bufs = {out_r: bytearray(), err_r: bytearray(), done_r: bytearray()}
    caps = {out_r: stdout_cap + 1, err_r: STDERR_CAP, done_r: 16}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(pid)
    sel.register(pidfd, selectors.EVENT_READ)
    deadline = started + timeout
    timed_out = False
    status = None
    # Whether the child was reaped and everything it left was killed: then
    # no process of the test is left to start another, and no second sweep
    # is needed.
    swept = False
    try:
        while True:
            left = deadline - _monotonic()
            if status is not None and len(sel.get_map()) == 0:
                break
            if left <= 0:
                timed_out = status is None
                break
            for key, _ in sel.select(left):
                fd = key.fd
                if fd == pidfd:
                    _, status = _waitpid(pid, 0)
                    sel.unregister(pidfd)
                    # The child is gone: whatever still holds its pipes
                    # (a grandchild) is killed, so they reach their end.
                    _sweep(before)
                    swept = True
                    continue
                try:
                    data = _read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    continue
                room = caps[fd] - len(bufs[fd])
                if room > 0:
                    bufs[fd] += data[:room]
    finally:
        elapsed = _monotonic() - started
        if status is None:
            try:
                _kill(pid, signal.SIGKILL)
            except OSError:
                pass
            _, status = _waitpid(pid, 0)
        if not swept:
            _sweep(before)
        if ipc_before is not None:
            _ipc.remove_new(ipc_before)
        for fd in [*list(bufs), pidfd]:
            try:
                _close(fd)
            except OSError:
                pass
        sel.close()
        _set_subreaper(False)
        _set_dumpable(dumpable)
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    term = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    out = bytes(bufs[out_r])
    # The texts in base64: a report's size is then bounded by the caps
    # (4/3 of them), whatever bytes the test printed, so the server knows
    # how many reports fit in one cell's output.
    return {
        "exit": exit_code,
        "signal": None if timed_out else term,
        "timed_out": timed_out,
        "completed": bytes(bufs[done_r]) == b"done",
        "stdout_b64": _b64(out[:stdout_cap]),
        "stdout_truncated": len(out) > stdout_cap,
        "stderr_b64": _b64(bytes(bufs[err_r])),
        "ms": elapsed * 1000.0,
    }


def _b64(data: bytes) -> str:
    return _b64encode(data).decode("ascii")


# Whether ``/tmp``, ``/dev/shm`` and the IPC objects are the session's own,
# so that the runner may put them back.
_private = _guard.own_namespaces
