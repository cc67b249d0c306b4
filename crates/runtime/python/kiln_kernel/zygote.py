"""kiln's fork server ("zygote") for one runtime.

Booting a Python kernel costs a third of a second of CPU, and importing
pandas and matplotlib as much again. The zygote pays that once: it imports
the kernel and the heavy packages, then forks one sandbox per kernel
through kiln's own sandbox code (``libkiln_sandbox.so``): the child, the
sandbox's init, builds it (the same steps as ``kiln __sandbox-init``)
running none of this interpreter's code, and forks the program process,
which reseeds its random state and runs the kernel module, sharing the
zygote's memory copy-on-write.

Protocol (see ``crates/sandbox/src/zygote.rs``), over a SOCK_SEQPACKET
socket at fd 3, one message per datagram: a request is an 8-byte id
(little-endian) and a JSON body ``{"jail": ..., "log": path}``; the reply to
a fork carries, as SCM_RIGHTS, a pidfd of the child, opened right after the
fork, before this process could reap it; exit events are JSON messages.
Standard output and error are the log.

At fd 4 the zygote holds the server's lifeline: the read end of a pipe whose
write end only the server holds. It exits when the lifeline or the socket
reaches end of file (the server has gone), and passes the lifeline, and a
pidfd of itself, on to every child, whose init exits on either.

The zygote never runs session code, holds no secret (its environment is a
kernel's), and zeroes each request in its memory after the fork, so no
child inherits another session's paths or environment.
"""

import argparse
import ctypes
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback

# The largest request the server sends (see MAX_MESSAGE in zygote.rs).
MAX_MESSAGE = 1 << 20
# How long an init may take to build its root and enter its user namespace.
MAP_TIMEOUT = 30.0
# The interpreter's own fork hooks (os.fork's), called around the sandbox
# library's fork.
_python = ctypes.pythonapi
for _f in (_python.PyOS_BeforeFork, _python.PyOS_AfterFork_Parent, _python.PyOS_AfterFork_Child):
    _f.argtypes, _f.restype = [], None


def _log(msg):
    print(f"kiln zygote: {msg}", file=sys.stderr, flush=True)


class Zygote:
    def __init__(self, library, control, lifeline):
        # PyDLL: the calls keep the GIL (the child's must: it forks).
        lib = self.lib = ctypes.PyDLL(library)
        lib.kiln_zygote_fork.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 4
        lib.kiln_zygote_restore_pid.argtypes = [ctypes.c_int]
        lib.kiln_zygote_map_ids.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        for f in (lib.kiln_zygote_fork, lib.kiln_zygote_unshare_pid, lib.kiln_zygote_restore_pid,
                  lib.kiln_zygote_map_ids, lib.kiln_zygote_prepare, lib.kiln_arenas_reserve):
            f.restype = ctypes.c_int
        lib.kiln_arenas_seal.restype = ctypes.c_size_t
        # Before anything heavy is imported: the interpreter's arenas from
        # one range, which the huge-page step can collapse (arenas.rs).
        _arenas_in_one_range(lib)
        # What every sandbox needs and no session changes (the compiled
        # seccomp filters), built once here and inherited by every fork.
        if lib.kiln_zygote_prepare() != 0:
            _log("preparing the sandbox library failed (see above)")
        # To come back to after each fork into a new pid namespace.
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        # Each child's init watches it: readable once this process is gone.
        self.own_pidfd = os.pidfd_open(os.getpid())
        self.sock = socket.socket(fileno=control)
        self.sock.setblocking(True)
        self.lifeline = lifeline
        self.buf = bytearray(MAX_MESSAGE)
        self.children = set()
        self.sel = selectors.DefaultSelector()
        # Children whose id maps are still to be written, by the read end
        # of their "unshared" pipe: (request id, pid, pidfd or None, error,
        # write end of their "mapped" pipe, deadline). Each init builds its
        # root while this loop serves the next fork: the zygote's own,
        # serial, share of a sandbox is the fork and the two map writes.
        self.mapping = {}
        # Exit events of children whose fork reply is not sent yet: the
        # server must see the reply (with the pidfd) first.
        self.deferred = {}

    def send(self, obj, fds=()):
        data = json.dumps(obj).encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def serve(self):
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = self.sel
        sel.register(self.sock.fileno(), selectors.EVENT_READ, "request")
        sel.register(wake_r, selectors.EVENT_READ, "child")
        sel.register(self.lifeline, selectors.EVENT_READ, "lifeline")
        self.send({"ready": True, "pid": os.getpid()})
        while True:
            timeout = None
            if self.mapping:
                timeout = max(0.0, min(m[5] for m in self.mapping.values()) - time.monotonic())
            for key, _ in sel.select(timeout):
                if key.data == "lifeline":
                    return  # the server has gone: end, and the children with us
                if key.data == "child":
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                elif key.data == "mapping":
                    self.map_ids(key.fd)
                elif not self.handle_request():
                    return
            self.expire_mappings()
            self.reap()

    def reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            if os.WIFSIGNALED(status):
                event = {"exit": pid, "signal": os.WTERMSIG(status)}
            else:
                event = {"exit": pid, "code": os.waitstatus_to_exitcode(status)}
            if any(m[1] == pid for m in self.mapping.values()):
                self.deferred[pid] = event
            else:
                self.send(event)

    def map_ids(self, unshared_r):
        """init has entered its user namespace (or ended): write its maps,
        then answer the fork request."""
        rid, pid, pidfd, error, mapped_w, _ = self.mapping.pop(unshared_r)
        self.sel.unregister(unshared_r)
        # Takes both ends; returns at once (the pipe is readable).
        self.lib.kiln_zygote_map_ids(pid, unshared_r, mapped_w)
        self.answer(rid, pid, pidfd, error)

    def expire_mappings(self):
        """init did not enter its user namespace in time: closing both ends
        makes it fail that step; the server hears of it as of any exit."""
        now = time.monotonic()
        for unshared_r in [fd for fd, m in self.mapping.items() if m[5] <= now]:
            rid, pid, pidfd, error, mapped_w, _ = self.mapping.pop(unshared_r)
            self.sel.unregister(unshared_r)
            os.close(unshared_r)
            os.close(mapped_w)
            _log(f"init {pid} did not enter its user namespace in time")
            self.answer(rid, pid, pidfd, error)

    def answer(self, rid, pid, pidfd, error):
        if pidfd is None:
            self.send({"id": rid, "error": error})
        else:
            try:
                self.send({"id": rid, "pid": pid}, [pidfd])
            finally:
                os.close(pidfd)
        event = self.deferred.pop(pid, None)
        if event is not None:
            self.send(event)

    def handle_request(self):
        buf = self.buf
        n = self.sock.recv_into(buf)
        if n == 0:
            return False  # kiln has gone: end, and the children with us
        rid = int.from_bytes(buf[:8], "little")
        try:
            return self.fork(rid, memoryview(buf)[8:n])
        finally:
            buf[:n] = bytes(n)

    def fork(self, rid, body):
        # The child is the sandbox's init: PID 1 of a new pid namespace,
        # which this process unshares for it and then leaves again. This
        # process also plays the sandbox's outer process: it writes init's
        # id maps (over two pipes) and reaps it. The fork is the sandbox
        # library's: init runs none of this interpreter's code, and the
        # interpreter's own fork handling (os.fork's) happens around it:
        # here before and after, in the program when it returns there.
        unshared_r, unshared_w = os.pipe()
        mapped_r, mapped_w = os.pipe()
        # The library reads the request where it is, in the buffer the
        # caller zeroes after the fork: no copy of a session's paths or
        # environment stays in this process's memory for a later fork to
        # inherit.
        size = len(body)
        request = (ctypes.c_char * size).from_buffer(body)
        pid = -1
        try:
            err = self.lib.kiln_zygote_unshare_pid()
            if err:
                raise OSError(err, os.strerror(err), "unshare(CLONE_NEWPID)")
            try:
                _python.PyOS_BeforeFork()
                try:
                    pid = self.lib.kiln_zygote_fork(ctypes.addressof(request), size, unshared_w, mapped_r,
                                                    self.lifeline, self.own_pidfd)
                finally:
                    if pid != 0:
                        _python.PyOS_AfterFork_Parent()
            finally:
                if pid != 0:
                    err = self.lib.kiln_zygote_restore_pid(self.own_pid_ns)
                    if err:  # every later child would land in that namespace
                        _log(f"cannot return to the zygote's pid namespace: {os.strerror(err)}")
                        os._exit(70)
            if pid < 0:
                raise OSError(-pid, os.strerror(-pid))
        except OSError as e:
            del request  # the buffer's export, before the caller zeroes it
            for fd in (unshared_r, unshared_w, mapped_r, mapped_w):
                os.close(fd)
            self.send({"id": rid, "error": f"fork: {e}"})
            return True
        if pid == 0:
            _program(bytes(body))  # this process's own copy of the buffer
        del request
        # The child's pidfd, before anything here could reap it (only
        # reap() does, from the loop), so it names this child and no other.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            os.kill(pid, signal.SIGKILL)  # not reaped yet: still our child's pid
            pidfd = None
            error = f"pidfd_open: {e}"
        os.close(unshared_w)
        os.close(mapped_r)
        self.children.add(pid)
        # The maps are written when init asks (see map_ids); meanwhile this
        # loop serves other forks.
        self.mapping[unshared_r] = (rid, pid, pidfd, None if pidfd is not None else error, mapped_w,
                                    time.monotonic() + MAP_TIMEOUT)
        self.sel.register(unshared_r, selectors.EVENT_READ, "mapping")
        return True


def _program(request):
    """Run the kernel in the sandbox's program process, where the library's
    fork returned a second time: confined already (the session user, no
    capabilities, seccomp), with the log at standard output and error.
    Never returns to the zygote's loop."""
    code = 120
    try:
        # What os.fork does in its child, which the library's fork did not:
        # the interpreter's locks and threads, and the at-fork hooks.
        _python.PyOS_AfterFork_Child()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        program = json.loads(request)["jail"]["program"]
        request = None
        os.environ.clear()
        for name, value in program["env"]:
            os.environ[name] = value
        _reseed()
        args = program["args"]
        if len(args) < 2 or args[0] != "-m":
            print(f"kiln zygote: cannot run {args!r}: only `-m module` is supported", file=sys.stderr)
            os._exit(code)
        sys.argv = [program["path"], *args[2:]]
        # A preloaded module may offer its `-m` entry point as a function
        # (the lean kernel does); anything else runs as `python -m` would.
        run = getattr(sys.modules.get(args[1]), "zygote_run", None)
        if callable(run):
            run()
        else:
            import runpy

            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        # Never the zygote's exit handlers.
        os._exit(code)


def _reseed():
    """Give this session random state of its own: every fork starts with a
    copy of the zygote's. The `random` module reseeds itself in a forked
    child (its at-fork hook, which ``PyOS_AfterFork_Child`` ran); numpy's
    global generator (``numpy.random.rand`` and the like) does not.

    Its whole state (624 words) comes straight from the system's entropy:
    ``numpy.random.seed()`` would draw 128 bits and stretch them through a
    ``SeedSequence``, whose first use in a fork costs ~1 ms and ~150 copied
    pages; this costs a third of that, and no state is more random."""
    np = sys.modules.get("numpy")
    if np is None:
        return
    try:
        key = np.frombuffer(os.urandom(624 * 4), dtype=np.uint32)
        np.random.set_state(("MT19937", key, 624))
    except Exception:  # numpy's legacy API changed: its own way
        np.random.seed()


def _warm_shell():
    """Run one silent cell in a shell built ahead of the fork, so that what
    IPython builds lazily on its first cell (compiler and transformer state,
    caches, ``bdb``) is built once here and shared, rather than in every
    kernel. No execution count, no history, no output.

    A silent cell skips the transcript logger (``%logstart``'s), which
    IPython builds on the first cell that is not: importing
    ``IPython.core.logger`` from disk, in the sandbox, during every
    session's first request. It is built here too, as the kernel would
    build it (from the shell's home directory, which the zygote fixed
    already); it writes nothing until ``%logstart``."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            shell.run_cell("print(end='')", store_history=False, silent=True)
            _ = shell.logger
    except Exception as e:  # an optimisation only
        _log(f"warming the shell failed: {e!r}")


class _ArenaAllocator(ctypes.Structure):
    """CPython's ``PyObjectArenaAllocator``."""

    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


def _arenas_in_one_range(lib):
    """Make the interpreter take its object arenas (1 MiB each) from one
    range the sandbox library reserved, side by side, instead of one
    ``mmap`` each: a hundred separate 1 MiB mappings cannot be backed by
    2 MiB pages, one range can (see :func:`_collapse_into_huge_pages`).
    Every fork inherits the allocator with its own copy of the range."""
    try:
        err = lib.kiln_arenas_reserve()
        if err != 0:
            _log(f"reserving the arena range failed: {os.strerror(err)}")
            return
        allocator = _ArenaAllocator(
            None,
            ctypes.cast(lib.kiln_arena_alloc, ctypes.c_void_p),
            ctypes.cast(lib.kiln_arena_free, ctypes.c_void_p),
        )
        set_allocator = ctypes.pythonapi.PyObject_SetArenaAllocator
        set_allocator.argtypes = [ctypes.c_void_p]
        set_allocator.restype = None
        # CPython copies the structure.
        set_allocator(ctypes.byref(allocator))
    except (AttributeError, OSError) as e:  # an optimisation only
        _log(f"installing the arena allocator failed: {e!r}")


def _collapse_into_huge_pages():
    """Back the zygote's heap with transparent huge pages where the kernel
    can (``MADV_COLLAPSE``, Linux 6.1+; a no-op elsewhere).

    Every kernel is a fork of this process, and a fork copies one page-table
    entry per 4 KiB page of private memory, then tears them all down at exit:
    with ~80 MB of imported packages that is most of the CPU a new session
    costs. A 2 MiB page is one entry. A child that writes into one still
    copies only the 4 KiB it touched (the kernel splits the mapping).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    huge, madv_hugepage, madv_collapse = 2 << 20, 14, 25
    collapsed = 0
    for line in maps:
        fields = line.split()
        perms, name = fields[1], (fields[5] if len(fields) > 5 else "")
        # Private, writable, anonymous: the interpreter's heap and arenas.
        if not perms.startswith("rw") or perms[3] != "p" or name not in ("", "[heap]"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        start, end = (start + huge - 1) // huge * huge, end // huge * huge
        if end - start < huge:
            continue
        libc.madvise(start, end - start, madv_hugepage)
        if libc.madvise(start, end - start, madv_collapse) == 0:
            collapsed += end - start
    _log(f"{collapsed >> 20} MiB of the heap in huge pages")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kiln_kernel.zygote")
    parser.add_argument("--library", required=True, help="libkiln_sandbox.so")
    parser.add_argument("--control", type=int, required=True, help="the server's socket (SOCK_SEQPACKET)")
    parser.add_argument("--lifeline", type=int, required=True, help="the server's lifeline (read end)")
    parser.add_argument("--preload", default="", help="comma-separated modules to import before forking")
    args = parser.parse_args(argv)
    # Nothing the preloaded packages start may inherit the server's socket
    # or lifeline.
    os.set_inheritable(args.control, False)
    os.set_inheritable(args.lifeline, False)
    # kiln interrupts kernels, never the zygote.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    build(Zygote(args.library, args.control, args.lifeline), args.preload.split(",")).serve()


def build(zygote, preload):
    """Build the image every kernel is forked from, in this process: import
    the modules of ``preload``, let them build what they build ahead of the
    fork, then settle the heap (frozen for the collector, arenas sealed,
    huge pages). Returns ``zygote``, ready to serve. ``scripts/bench-floor``
    builds the same image to measure what forking it costs."""
    modules = []
    for name in filter(None, preload):
        try:
            modules.append(importlib.import_module(name))
        except Exception as e:  # a missing optional package is not fatal
            _log(f"preloading {name} failed: {e!r}")
    # A module may build more ahead of the fork, once everything is imported
    # (the lean kernel builds its shell).
    for module in modules:
        prepare = getattr(module, "zygote_prepare", None)
        if callable(prepare):
            prepare()
    _warm_shell()
    # Move everything imported so far out of the collector's reach, so that
    # a child's garbage collections do not write to (and so copy) the pages
    # it shares with the zygote.
    gc.collect()
    gc.freeze()
    # The arena range past the last arena goes back (arenas.rs): a kernel's
    # address space is then no larger than with CPython's allocator.
    _log(f"{zygote.lib.kiln_arenas_seal()} MiB of arenas in one range")
    _collapse_into_huge_pages()
    return zygote


if __name__ == "__main__":
    main()
