"""A lean process that the tests of a batch's lane fork from, started by the kernel.

A lane is a session that runs the program tests of one batch item after
another (the server's ``lanes``). A fork of its kernel would inherit memory
that held earlier items' code, inputs and outputs, and costs ~8 ms of CPU
a test besides (an image of ~90 MB in over a thousand mappings with the
``full`` preloads, copied and torn down). Its tests fork from this server
instead: an interpreter with nothing but kiln's judge loaded, which the
kernel starts at its first lane call (``posix_spawn``: no copy of the
kernel is made) and keeps for the later ones. A program of another
language (``judge.command``) is exec'd from such a fork as well.

The server itself never holds a call's data. It forks a child for each
call, which reads the call from the kernel (one line on the shared stdin:
the judge function's name and its base64 arguments), runs it (each test a
fork of that child; the report lines go to the shared stdout, as they would
to a cell's), writes :data:`END`, or :data:`FAIL` and why when the call
could not run its tests, and exits. A child that fails in kiln's own code
(not a test's) writes :data:`LOST` and why, and exits with an error: the
server ends with it, and the kernel's call fails saying why. So a test finds in its memory its own
item's code and inputs and nothing of an earlier call's, which matters when
the kernel serves a batch's items one after another (a lane, see the
server's ``lanes``): a candidate cannot dig another's program or outputs out
of freed memory it inherited. The kernel, whose memory does hold earlier
calls, is non-dumpable while a call runs (no ``/proc/<pid>/mem``), and no
test can signal it, the server or the call's child
(``guard.parent(ancestors=True)``); the server dies with the kernel
(``PR_SET_PDEATHSIG``).

A lane for Python programs that import packages has a server of the other
kind: a fork of the kernel itself (``Server(work, fork=True)``), made by a cell
of its own before the lane's first item reaches the kernel. Its tests then
find the zygote's preloaded packages already imported, as a test forked
from a fresh session's kernel does, where a spawned server would import
numpy anew in every test; and its memory holds only what the kernel held
before any item (the zygote's image, the kernel's boot and that cell).
"""

import os
import signal
import sys
import traceback

END = b"KILN_END\n"
FAIL = b"KILN_FAIL "
LOST = b"KILN_LOST "

# Bound at import, before any candidate code runs in the kernel.
_posix_spawn = os.posix_spawn
_pipe = os.pipe
_close = os.close
_kill = os.kill
_waitpid = os.waitpid
_executable = sys.executable
_fork = os.fork


class Server:
    """The kernel's handle on its fork server (one per kernel)."""

    def __init__(self, work_dir: str, fork: bool = False):
        """Start a server in ``work_dir``: a fresh interpreter, or with
        ``fork`` a fork of this process with everything it has imported
        (only for a kernel that holds no item yet, see above: the server
        keeps a copy of all of its memory for the tests to inherit)."""
        # A fork of the kernel (with its shell: judge.item needs one).
        self.forked = fork
        req_r, self._req = _pipe()
        self._resp, resp_w = _pipe()
        try:
            self.pid = _forked(req_r, resp_w, work_dir) if fork else _spawned(req_r, resp_w, work_dir)
        except BaseException:
            for fd in (self._req, self._resp):
                _close(fd)
            raise
        finally:
            _close(req_r)
            _close(resp_w)
        self._out = os.fdopen(self._resp, "rb", buffering=1 << 16)

    def call(self, function: str, b64: str, forward) -> None:
        """Run judge ``function`` with ``b64`` there; each report line is
        passed to ``forward``. Raises ``RuntimeError`` when the call failed
        and ``OSError``/``EOFError`` when the server is gone."""
        data = f"{function} {b64}\n".encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._req, view) :]
        failed = None
        lost = ""
        while True:
            line = self._out.readline()
            if not line.endswith(b"\n"):
                raise EOFError("the tests' fork server ended" + lost)
            if line == END:
                break
            if line.startswith(LOST):
                lost = ": " + line[len(LOST) :].decode("utf-8", "replace").rstrip("\n")
            elif line.startswith(FAIL):
                failed = line[len(FAIL) :].decode("utf-8", "replace").rstrip("\n")
            else:
                forward(line.decode("utf-8", "replace"))
        if failed is not None:
            raise RuntimeError(failed)

    def stop(self) -> None:
        """End it now (a call was interrupted: it may be mid-test)."""
        try:
            _kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            _waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        try:
            self._out.close()
            _close(self._req)
        except OSError:
            pass


def _spawned(req_r: int, resp_w: int, work_dir: str) -> int:
    """A fresh interpreter running :func:`_serve` on the two pipes."""
    env = dict(os.environ)
    env["KILN_WORK_DIR"] = work_dir
    return _posix_spawn(
        _executable,
        [_executable, "-m", "kiln_kernel.forkserver"],
        env,
        file_actions=[(os.POSIX_SPAWN_DUP2, req_r, 0), (os.POSIX_SPAWN_DUP2, resp_w, 1)],
    )


def _forked(req_r: int, resp_w: int, work_dir: str) -> int:
    """A fork of this process running :func:`_serve` on the two pipes."""
    kernel = os.getpid()
    pid = _fork()
    if pid != 0:
        return pid
    try:
        os.dup2(req_r, 0)
        os.dup2(resp_w, 1)
        # The kernel's streams publish to its sockets; the reports go to the
        # pipe, as a spawned server's do.
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        _serve(work_dir, kernel)
    finally:
        # Never the kernel's exit handlers (its sockets' context).
        os._exit(0)


# A call's child exits with this when the kernel has closed its end.
_EOF_STATUS = 3
_PR_SET_PDEATHSIG = 1


def _read_call() -> bytes:
    """The kernel's next call, read from fd 0 up to its newline (the kernel
    writes the next call only after this one's END); b"" at the end."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return b""
        data += chunk
    return bytes(data)


def _one_call(judge) -> int:
    """In a call's child: read one call, run it, report; the exit status."""
    line = _read_call()
    if not line:
        return _EOF_STATUS
    function, _, b64 = line.decode("ascii", "replace").strip().partition(" ")
    failed = None
    try:
        if function not in ("program", "command", "item"):
            raise RuntimeError(f"[kiln] the tests' fork server has no function {function!r}")
        getattr(judge, function)(b64, serving=True)
    except RuntimeError as e:
        failed = str(e).replace("\n", " ")
    except BaseException as e:
        # kiln's own failure, not a test's (a test is a process of its
        # own): this child ends with an error, and so does the server; the
        # kernel's call says why, for the server to report.
        why = traceback.format_exception_only(type(e), e)[-1].strip().replace("\n", " ")
        sys.stdout.flush()
        sys.stdout.buffer.write(LOST + why.encode("utf-8", "replace") + b"\n")
        sys.stdout.flush()
        raise
    sys.stdout.flush()
    out = sys.stdout.buffer
    if failed is not None:
        out.write(FAIL + failed.encode() + b"\n")
    out.write(END)
    out.flush()
    return 0


def _serve(work: str | None, kernel: int | None = None) -> None:
    """The server: a child per call, one after another, until the kernel
    closes its end or a child fails (then the kernel's call sees the end of
    the server's output and starts another)."""
    from . import judge, testrun

    # Whatever the kernel held that was not close-on-exec (a forked
    # server's: all of the kernel's descriptors, its sockets among them).
    os.closerange(3, 1 << 16)
    testrun._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if kernel is not None and os.getppid() != kernel:
        return  # the kernel died before the death signal was set
    if work:
        os.chdir(work)
    testrun.ONLY_TESTS = True
    server = os.getpid()
    while True:
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                # A call's child dies with the server too (the setting is
                # not inherited), so that none is left holding the pipes.
                testrun._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() == server:
                    status = _one_call(judge)
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return


if __name__ == "__main__":
    _serve(os.environ.get("KILN_WORK_DIR"))
