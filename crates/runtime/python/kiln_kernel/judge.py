"""Running a batch item's tests in forks of the kernel (``POST /v1/tci/batch``).

kiln scores tests; this module only runs them and reports what happened.
The server sends a cell that calls :func:`program` or :func:`check` with a
few tests; for each, the call forks the kernel, runs the test in the child
with its own time limit, and prints one line, ``KILN_JUDGE <json>``, that
the server parses: the child's exit status, whether it timed out or was killed,
whether it completed, and its stdout and stderr (cut at a cap, in base64).

Why a fork: the child starts from the kernel's state at that moment (the
runtime's imports already done, so a test costs a fork instead of an
interpreter start), every test starts from the same state (the parent is
never changed by a child), and the time limit is enforced from outside the
child. The parent, before forking, makes itself non-dumpable, so a child
running as the same user can neither read nor write its memory through
``/proc`` (``ptrace`` is denied by the sandbox's seccomp policy), and the
child closes every inherited descriptor but its own three before any test
code runs, so it cannot reach the kernel's sockets. While a test runs the
parent is a child subreaper, so whatever the test starts stays its
descendant even when orphaned; after the child ends, every descendant that
appeared since the fork (a grandchild that left its process group
included) is killed, so nothing a test started lives on into the next one,
and nothing that is not the test's is touched. The work directory, which
forks share, is copied before the first test and put back after each
(workdir.py), and a test cannot signal the kernel it was forked from
(guard.py), so none can end the runner before that.

* :func:`program` runs ``code`` as a program (``__name__ == "__main__"``,
  fresh globals) once per standard input it is given; the server compares
  the stdout each run reports with the expectation. The server calls it before the
  item's code runs in the kernel, so for a fresh session the parent is a
  kernel no candidate code has touched.
* :func:`command` is :func:`program` for the other languages: a process of
  its own (``python3 -m kiln_kernel.judge``), which the kernel of a Deno or
  bash session starts, runs ``code`` with that language's interpreter
  (``argv``) once per standard input, each in a fork of itself that execs
  the interpreter on the program (a copy in memory of the test's own). It is
  started before the item's code runs, so for a fresh session the kernel
  that starts it is one no candidate code has touched, and a test can signal
  neither the runner nor the kernel (guard.py).
* In a batch's lane (``"lane": true``), a session that runs one item's
  tests after another's, :func:`program` and :func:`command` hand the call
  to the kernel's fork server (forkserver.py): no test forks from the
  kernel, whose memory held earlier items. A lane for programs that import
  packages made its server a fork of the kernel before its first item
  (:func:`image_server`); another starts a fresh interpreter at its first
  call. Every call also puts back the
  home directory, ``/tmp`` and ``/dev/shm`` (in kiln's sandbox, where they
  are the session's own) and removes the IPC objects a test made (ipc.py).
* :func:`check` runs each of its ``codes`` (an ``assert``) in the kernel's
  namespace as it is after the item's code; one passes when it completes. This parent
  *has* run the candidate's code, which could have changed anything in it:
  see SECURITY.md for what such a test can and cannot prove.
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

from . import forkserver as _forkserver, guard as _guard, ipc as _ipc, workdir as _workdir

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
# What the server looks for in the cell's stdout.
MARKER = "KILN_JUDGE "
# The session's work directory: the kernel's cwd when it started (set by
# kernel.main, before any cell runs). Every test starts from what it held
# when the runner was called; see workdir.py.
WORK_DIR = None
# The kernel's fork server (forkserver.py), started at its first use.
_SERVER = None
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


def _child_io(stdin_fd: int, out_w: int, err_w: int, keep: int) -> None:
    """In the child: fds 0, 1, 2 become the test's, every other inherited
    descriptor but ``keep`` is closed, Python's streams are rebuilt on them,
    and signals are back to their defaults."""
    _dup2(stdin_fd, 0)
    _dup2(out_w, 1)
    _dup2(err_w, 2)
    for fd in (stdin_fd, out_w, err_w):
        if fd > 2 and fd != keep:
            _close(fd)
    if keep > 2:
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 16)
    else:
        os.closerange(3, 1 << 16)
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


def _run(body, stdin: bytes, timeout: float, guard=None) -> dict:
    """Fork; in the child call ``body(done_fd)`` (which must not return);
    in the parent collect the child's output until it ends or ``timeout``.
    ``guard``: the filter the child installs (by default, one that keeps it
    from signalling this process)."""
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
            _child_io(stdin_fd, out_w, err_w, done_w)
            # The test cannot signal this kernel (so it cannot end the runner
            # before the work directory is put back).
            _guard.protect(parent)
            body(done_w)
        finally:
            os._exit(70)
    for fd in (stdin_fd, out_w, err_w, done_w):
        _close(fd)
    bufs = {out_r: bytearray(), err_r: bytearray(), done_r: bytearray()}
    caps = {out_r: STDOUT_CAP + 1, err_r: STDERR_CAP, done_r: 16}
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
        "stdout_b64": _b64(out[:STDOUT_CAP]),
        "stdout_truncated": len(out) > STDOUT_CAP,
        "stderr_b64": _b64(bytes(bufs[err_r])),
        "ms": elapsed * 1000.0,
    }


def _b64(data: bytes) -> str:
    return _b64encode(data).decode("ascii")


def _report(result: dict) -> None:
    print(MARKER + _dumps(result), flush=True)


def _private() -> bool:
    """Whether ``/tmp``, ``/dev/shm`` and the IPC objects are the session's
    own (kiln's sandbox says so in the kernel's environment), so that the
    runner may put them back; with ``--sandbox none`` they are the host's."""
    return os.environ.get("KILN_PRIVATE_TMP") == "1"


def _writable_dirs() -> list:
    """The directories a test can write that every test must find as the
    first found them: the work directory, the home directory, and in kiln's
    sandbox its private ``/tmp`` and ``/dev/shm``."""
    work = _kernel_work_dir()
    if not work:
        return []
    dirs = [work]
    if _private():
        dirs.extend(d for d in (os.environ.get("HOME"), "/tmp", "/dev/shm") if d and os.path.isdir(d))
    return dirs


def _each_from_the_same_work_dir(tests, run_one) -> None:
    """``run_one`` for each of ``tests``, reporting each; the work directory
    (and the other writable directories, ``_writable_dirs``) is put back as
    it was before the first after every one (a test's files never reach the
    next test, the item's code, a kept session or the next item)."""
    snapshots = []
    try:
        for d in _writable_dirs():
            snapshots.append(_workdir.Snapshot(d))
    except _workdir.TooLarge as e:
        for snapshot in snapshots:
            snapshot.close()
        raise RuntimeError(f"[kiln] the tests did not run: {e}") from None
    try:
        for test in tests:
            result = run_one(test)
            for snapshot in snapshots:
                try:
                    snapshot.restore()
                except OSError as e:
                    # Reported with this test; the next would not start clean.
                    _report(result)
                    raise RuntimeError(
                        f"[kiln] {snapshot.root} could not be put back after a test: {e}"
                    ) from None
            _report(result)
    finally:
        for snapshot in snapshots:
            snapshot.close()


def _kernel_work_dir():
    """The work directory of the kernel this runs in: kiln's kernel records
    its starting cwd; another (ipykernel) has it from the environment kiln
    started it with. ``None`` outside a kernel (a test of this module)."""
    return WORK_DIR or os.environ.get("KILN_WORK_DIR")


def image_server() -> None:
    """Make the kernel's fork server a fork of the kernel itself, with the
    packages it has imported (forkserver.py): the cell a lane for programs
    that import packages runs before its first item. Never in a kernel
    that has run or read an item: the server, and every test forked from
    it, keeps a copy of its memory."""
    global _SERVER
    if _SERVER is None:
        _SERVER = _forkserver.Server(_kernel_work_dir(), fork=True)


def _in_fork_server(function: str, b64: str) -> None:
    """Run judge ``function`` in the kernel's fork server (forkserver.py),
    starting it first if needed; its report lines become this cell's."""
    global _SERVER
    if _SERVER is None:
        _SERVER = _forkserver.Server(_kernel_work_dir())
    # This kernel's memory holds what earlier cells sent and printed: no
    # test may read it through /proc while the call runs.
    dumpable = _set_dumpable(0)
    # The reports go out together, as one stream message (the server reads
    # them when the cell ends), and those that came also when the call fails.
    lines = []
    try:
        _SERVER.call(function, b64, lines.append)
    except RuntimeError:
        raise
    except BaseException as e:
        server, _SERVER = _SERVER, None
        server.stop()
        if isinstance(e, (OSError, EOFError)):
            # The server reads this beginning (runner.rs, SERVER_ENDED).
            raise RuntimeError(f"[kiln] the tests' runner ended: {e}") from None
        raise
    finally:
        _set_dumpable(dumpable)
        if lines:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()


def empty_work_dir() -> None:
    """After a lane's item that came with files: the work directory as
    every item finds it, empty. The server wrote the item's files there for
    its tests (each test had its changes put back); nothing else writes
    there between items, as a lane's kernel runs no item's code. Should this
    fail, the cell does, and the server ends the lane."""
    _workdir.empty(_kernel_work_dir())


def _args(b64: str) -> dict:
    return json.loads(base64.b64decode(b64))


def program(b64: str, serving: bool = False) -> None:
    """Run ``code`` as a program once per entry of ``stdins``, each with that
    standard input; report how each run ended, one line each, in order.
    In a batch's lane (``lane``: the kernel serves other items too, and a
    fork of it would inherit what they sent) the runs are forks of the
    kernel's fork server instead (``serving``: this is that server's
    child)."""
    args = _args(b64)
    code = args["code"]
    if not serving and args.get("lane") and _kernel_work_dir():
        _in_fork_server("program", b64)
        return
    compiled = None
    try:
        compiled = compile(code, "main.py", "exec")
    except BaseException:
        compiled = None  # each run reports the error as the program's own

    def body(done_fd):
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        main.__file__ = "main.py"
        sys.modules["__main__"] = main
        sys.argv = ["main.py"]
        status = 0
        try:
            exec(compiled if compiled is not None else compile(code, "main.py", "exec"), main.__dict__)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException as e:
            _print_error(e)
            status = 1
        _flush()
        if status == 0:
            _write(done_fd, b"done")
        os._exit(status & 0xFF)

    # A child of the fork server guards the server and the kernel above it
    # too; they keep their threads for the call: one filter serves all its
    # tests.
    guard = _guard.parent(ancestors=True) if serving else None
    _each_from_the_same_work_dir(
        args["stdins"], lambda stdin: _run(body, stdin.encode(), float(args["timeout"]), guard)
    )


def check(b64: str) -> None:
    """Run each of ``codes`` in the session's namespace, each in its own
    fork of it; report whether each completed, one line each, in order."""
    args = _args(b64)
    shell = None
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:
        pass
    ns = shell.user_ns if shell is not None else {"__name__": "__main__"}

    def body_for(code):
        def body(done_fd):
            try:
                exec(compile(code, "<test>", "exec"), ns)
            except BaseException as e:
                _print_error(e)
                _flush()
                os._exit(1)
            _flush()
            _write(done_fd, b"done")
            os._exit(0)

        return body

    _each_from_the_same_work_dir(args["codes"], lambda code: _run(body_for(code), b"", float(args["timeout"])))


def command(b64: str, serving: bool = False) -> None:
    """Run ``code`` as a program of another language once per entry of
    ``stdins``: ``argv`` with ``{program}`` replaced by the path of the
    program, with ``env`` added to this process's environment, each in a
    fork of this process that execs the interpreter; report how each run
    ended, one line each, in order. This process is a judge of its own (in
    a Deno or bash session), a child of a Python kernel's fork server
    (``serving``), or a Python kernel, which in a batch's lane (``lane``)
    hands the call to its fork server."""
    args = _args(b64)
    if not serving and args.get("lane") and _kernel_work_dir():
        _in_fork_server("command", b64)
        return
    code = args["code"].encode()
    argv = [str(a) for a in args["argv"]]
    env = {**os.environ, **{str(k): str(v) for k, v in args.get("env", {}).items()}}
    guard = _guard.parent(ancestors=True)
    work = os.environ.get("KILN_WORK_DIR")

    def body(done_fd):
        # The test's own copy of the program, in memory: nothing a test
        # does to it reaches the next.
        fd = _memfd_create("main", 0)
        _write(fd, code)
        os.lseek(fd, 0, os.SEEK_SET)
        # This interpreter ignores SIGPIPE and SIGXFSZ; a program starts with
        # the defaults.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if work:
            os.chdir(work)
        path = f"/proc/self/fd/{fd}"
        try:
            os.execvpe(argv[0], [a.replace("{program}", path) for a in argv], env)
        except OSError as e:
            print(f"[kiln] cannot start {argv[0]}: {e}", file=sys.stderr, flush=True)
        os._exit(127)

    _each_from_the_same_work_dir(
        args["stdins"], lambda stdin: _run(body, stdin.encode(), float(args["timeout"]), guard)
    )


if __name__ == "__main__":
    # The arguments come on stdin: a program can be larger than one
    # command-line argument may be (128 KiB on Linux).
    command(sys.stdin.read(), serving=True)
