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
code runs, so it cannot reach the kernel's sockets (testrun.py). While a test runs the
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
* :func:`item` is a batch item's cell and its assertions in a lane: the call's
  child of the lane's image server forks the item's process, which runs the
  code as the kernel's next cell, its iopub messages recorded instead of sent
  (recorder.py), then each assertion as a fork of itself, as :func:`check`
  does from a kernel; the child puts back what the item changed after it.
* :func:`check` runs each of its ``codes`` (an ``assert``) in the kernel's
  namespace as it is after the item's code; one passes when it completes. This parent
  *has* run the candidate's code, which could have changed anything in it:
  see SECURITY.md for what such a test can and cannot prove.
"""

import base64
import builtins
import json
import os
import signal
import sys
import traceback
import types

from . import forkserver as _forkserver, guard as _guard, testrun as _testrun, workdir as _workdir
from .testrun import (
    _b64,
    _close,
    _dumps,
    _flush,
    _memfd_create,
    _monotonic,
    _print_error,
    _private,
    _run,
    _set_dumpable,
    _write,
)

# What the server looks for in the cell's stdout.
MARKER = "KILN_JUDGE "
# A batch item's cell in a lane (:func:`item`): its recorded messages (JSON
# in base64, on one line), and how the process that ran it ended.
CELL_MARKER = "KILN_CELL "
ITEM_MARKER = "KILN_ITEM "
# In an item's report file: the item's process runs its last assertion
# itself from here (:func:`_run_last`), started at the monotonic time this
# line gives; how the process ended is then that assertion's report.
_LAST_MARKER = "KILN_LAST "
# An assertion's stdout is not compared: the server keeps 64 KiB of it
# (scoring.rs), so an item's report of one is no larger.
ASSERTION_STDOUT_CAP = 64 << 10
# Beyond an item's cell's own limit: the time its interrupt may take.
CELL_GRACE = 3.0
# The most one of those reports takes (its stdout and stderr in base64;
# batch.rs's ASSERTION_REPORT_BYTES), and how a call says it failed.
_ASSERTION_REPORT_BYTES = ((64 << 10) + 1 + (64 << 10)) // 3 * 4 + 4 + 1024
_FAIL = _forkserver.FAIL.decode()
# The session's work directory: the kernel's cwd when it started (set by
# kernel.main, before any cell runs). Every test starts from what it held
# when the runner was called; see workdir.py.
WORK_DIR = None
# The kernel's fork server (forkserver.py), started at its first use.
_SERVER = None


def _report(result: dict) -> None:
    print(MARKER + _dumps(result), flush=True)


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


def _snapshots() -> list:
    """Copies of the writable directories (``_writable_dirs``) as they are
    now, to put back (:class:`workdir.Snapshot`)."""
    snapshots = []
    try:
        for d in _writable_dirs():
            snapshots.append(_workdir.Snapshot(d))
    except _workdir.TooLarge as e:
        for snapshot in snapshots:
            snapshot.close()
        raise RuntimeError(f"[kiln] the tests did not run: {e}") from None
    return snapshots


def _put_back(snapshots, after: str) -> None:
    """Every directory of ``snapshots`` as it was copied."""
    for snapshot in snapshots:
        try:
            snapshot.restore()
        except OSError as e:
            raise RuntimeError(f"[kiln] {snapshot.root} could not be put back after {after}: {e}") from None


def _each_from_the_same_work_dir(tests, run_one) -> None:
    """``run_one`` for each of ``tests``, reporting each; the work directory
    (and the other writable directories, ``_writable_dirs``) is put back as
    it was before the first after every one (a test's files never reach the
    next test, the item's code, a kept session or the next item)."""
    snapshots = _snapshots()
    try:
        for test in tests:
            result = run_one(test)
            try:
                _put_back(snapshots, "a test")
            finally:
                # Reported also when the next would not start clean.
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
        # What an item's cell in the lane runs with (item), imported once
        # here rather than from disk in each item's fork: a lean server (a
        # fresh interpreter) never needs it, nor the kernel's wire module.
        from . import recorder  # noqa: F401

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


def _shell():
    """The kernel's IPython shell, or None (outside a kernel)."""
    try:
        from IPython import get_ipython

        return get_ipython()
    except Exception:
        return None


def _assertion(ns: dict, code: str):
    """The body of a test that runs ``code`` in ``ns`` (see :func:`_run`)."""

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


def check(b64: str) -> None:
    """Run each of ``codes`` in the session's namespace, each in its own
    fork of it; report whether each completed, one line each, in order."""
    args = _args(b64)
    shell = _shell()
    ns = shell.user_ns if shell is not None else {"__name__": "__main__"}
    _each_from_the_same_work_dir(args["codes"], lambda code: _run(_assertion(ns, code), b"", float(args["timeout"])))


def item(b64: str, serving: bool = False) -> None:
    """A batch item in a lane: its ``code`` as a cell, then each of its
    ``codes`` (assertions) from the state the cell left, all in a fork of
    the lane's image server, never in the kernel (whose memory holds
    earlier items). Prints the cell's recorded messages
    (:data:`CELL_MARKER`, recorder.py), one report per assertion, then how
    the fork ended (:data:`ITEM_MARKER`, a report like a test's). The
    writable directories, the IPC objects and the processes the item left
    are put back after it, as after any test."""
    args = _args(b64)
    if not serving:
        if not (args.get("lane") and _kernel_work_dir()):
            raise RuntimeError("[kiln] an item's cell runs from a lane's fork server only")
        if _SERVER is None or not _SERVER.forked:
            # Its image server failed to start or has ended, and a spawned
            # one has no kernel shell: kiln's failure (runner.rs reads this
            # beginning), so the item runs again in another lane.
            raise RuntimeError("[kiln] the tests' runner ended: this lane has no image server")
        _in_fork_server("item", b64)
        return
    shell = _shell()
    if shell is None or getattr(shell, "publisher", None) is None:
        raise RuntimeError("[kiln] this fork server has no kernel shell to run the item's cell in")
    # The cell's own limit, its interrupt's grace, and each assertion's
    # limit with a second for its fork and sweep; the fork is killed past it.
    limit = float(args["cell_timeout"]) + CELL_GRACE + len(args["codes"]) * (float(args["timeout"]) + 1.0)
    # The item's process writes its record and reports here, never to this
    # call's output: the candidate's code runs in it, and a line of the
    # call's protocol (forkserver.END) written there would end this call
    # early and leave the rest for the lane's next item to read as its own.
    # Read once the process and all it started are gone, what fits, and
    # only the lines an item reports.
    report_fd = _memfd_create("kiln-item-report")
    snapshots = _snapshots()
    try:
        ended = _run(lambda done_fd: _cell_then_assertions(shell, args, report_fd, done_fd), b"", limit,
                     _guard.parent(ancestors=True), keep=(report_fd,), stdout_cap=ASSERTION_STDOUT_CAP)
        now = _monotonic()
        n = len(args["codes"])
        cap = int(args["record_bytes"]) * 4 // 3 + 4096 + n * _ASSERTION_REPORT_BYTES
        lines = os.pread(report_fd, cap, 0).decode("utf-8", "replace").split("\n")
        cell = [line for line in lines if line.startswith(CELL_MARKER)][:1]
        reports = [line for line in lines if line.startswith(MARKER)][:n]
        last = [line for line in lines if line.startswith(_LAST_MARKER)][:1]
        if n and last and len(reports) == n - 1:
            # The process ran the last assertion itself: its end is that
            # assertion's report, and it got through the cell and the rest.
            reports.append(MARKER + _dumps(_last_report(ended, last[0], now)))
            ended = dict(ended, exit=0, signal=None, timed_out=False, completed=True, stdout_b64="", stderr_b64="")
        # Why the assertions could not all run, in the item's words (the
        # candidate's code ran where they were written): never in kiln's,
        # which would make it kiln's failure and the item's retry.
        failed = [_FAIL + "[item] " + line[len(_FAIL) :].replace("[kiln]", "[item]")
                  for line in lines if line.startswith(_FAIL)][:1]
        sys.stdout.write("".join(line + "\n" for line in cell + reports + failed))
        print(ITEM_MARKER + _dumps(ended), flush=True)
        _put_back(snapshots, "the item")
    finally:
        for snapshot in snapshots:
            snapshot.close()
        _close(report_fd)


def _last_report(ended: dict, line: str, now: float) -> dict:
    """The last assertion's report, from how the item's process that ran
    it ended (``ended``, read at ``now``) and its :data:`_LAST_MARKER`
    ``line`` (written by that process: its time is only believed within
    the process's own run)."""
    try:
        started = float(line[len(_LAST_MARKER) :])
    except ValueError:
        started = now
    ms = min(max((now - started) * 1000.0, 0.0), ended["ms"])
    alarm = ended["signal"] == signal.SIGALRM
    return dict(ended, ms=ms, timed_out=ended["timed_out"] or alarm, signal=None if alarm else ended["signal"])


def _cell_then_assertions(shell, args: dict, report_fd: int, done_fd: int) -> None:
    """In an item's fork (:func:`item`): the cell, its record on
    ``report_fd``, then the assertions, each but the last a fork of this
    process, their reports after it, and the last in this process
    (:func:`_run_last`). Never returns."""
    # Where a failure of this runner's own code is told (its stderr, which
    # the item's report carries), and the stdout the last assertion gets
    # back, before the cell takes fds 1 and 2 over.
    err_fd = os.dup(2)
    out_fd = os.dup(1)
    try:
        last = _record_then_assert(shell, args, report_fd)
        if last is not None:
            _run_last(shell.user_ns, last, float(args["timeout"]), report_fd, (out_fd, err_fd), done_fd)
    except BaseException:
        os.write(err_fd, traceback.format_exc().encode("utf-8", "replace"))
        os._exit(70)
    _write(done_fd, b"done")
    os._exit(0)


def _run_last(ns: dict, code: str, timeout: float, report_fd: int, own: tuple, done_fd: int) -> None:
    """The item's last assertion, run by the item's process itself: one
    fork fewer per item. Nothing runs after it from this state (it is the
    last), so it needs no copy of it; it starts, as each forked one does,
    from the state the cell left and the work directory put back, with the
    descriptors, streams and signals a forked one gets (``testrun._child_io``:
    an empty stdin, and as stdout and stderr this process's own, ``own``,
    whose reading by the item's call gives its report, :func:`_last_report`;
    nothing the cell left open) and its time limit (an alarm that ends the
    process; the call's own limit ends it past that). Never returns."""
    out_fd, err_fd = own
    # err_fd stays open for a failure of this code (_cell_then_assertions).
    _testrun._child_io(_memfd_create("kiln-stdin"), out_fd, err_fd, (report_fd, done_fd, err_fd))
    _write(report_fd, f"{_LAST_MARKER}{_monotonic()!r}\n".encode())
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))
    _assertion(ns, code)(done_fd)


def _record_then_assert(shell, args: dict, report_fd: int):
    """:func:`_cell_then_assertions`' work, but for the last assertion:
    which it returns (``None`` when there is none, or the others could not
    all run)."""
    # Imported by image_server(), before this process was forked from it.
    from . import recorder
    from .wire import json_default

    # The cell may leave processes running, as in a session; a test's sweep
    # kills only what the test started.
    _testrun.ONLY_TESTS = False
    record = recorder.run_cell(shell, args["code"], float(args["cell_timeout"]), int(args["output_limit"]))
    # The record must fit in the runner cell's output beside the reports:
    # the messages that do, in order (text JSON writes six bytes a
    # character, a control character, may not), and whether some did not.
    room = int(args["record_bytes"]) - 64
    kept = []
    for message in record["messages"]:
        encoded = json.dumps(message, default=json_default, ensure_ascii=False)
        room -= len(encoded.encode()) + 1
        if room < 0:
            break
        kept.append(encoded)
    data = f'{{"messages":[{",".join(kept)}],"timed_out":{_dumps(record["timed_out"])},"cut":{_dumps(room < 0)}}}'
    out = open(report_fd, "w", closefd=False)
    out.write(CELL_MARKER + _b64(data.encode()) + "\n")
    out.flush()
    # The assertions' reports (_report) follow it.
    sys.stdout = out
    ns = shell.user_ns
    timeout = float(args["timeout"])
    codes = args["codes"]
    try:
        if len(codes) > 1:
            _each_from_the_same_work_dir(
                codes[:-1],
                lambda code: _run(_assertion(ns, code), b"", timeout, stdout_cap=ASSERTION_STDOUT_CAP),
            )
    except RuntimeError as e:
        out.write(_FAIL + str(e).replace("\n", " ") + "\n")
        out.flush()
        return None
    out.flush()
    return codes[-1] if codes else None


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
