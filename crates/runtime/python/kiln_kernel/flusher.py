"""Output published while a cell runs: the kernel's one helper thread.

The kernel runs cells on its main thread, and text a cell writes waits in
its :class:`~kiln_kernel.streams.OutStream` buffers (and what is written at
file-descriptor level, in the memfd captures) until someone sends it. Until
the end of the cell, that someone is the :class:`Flusher`: a daemon thread,
started by the kernel after it is forked (never in the zygote), that wakes
every :data:`~kiln_kernel.publisher.TICK` seconds while a cell runs and has
the publisher send what is due
(:meth:`~kiln_kernel.publisher.Publisher.publish_due`: complete lines at
once, a partial line after :data:`~kiln_kernel.publisher.PARTIAL_WAIT`). So ``print(1);
time.sleep(3)`` shows ``1`` within a tick, and ``os.system`` output during a
long call shows up while it runs, as under ipykernel's IOPub thread.

What keeps the fast path fast: the thread sleeps on a timerfd, which the main
thread arms when a cell starts and disarms when it ends, each a system call
that wakes no one. A cell shorter than a tick (most of them, ~0.5 ms) never
wakes the thread: its output leaves at the end of the cell, from the main
thread, as before. Between cells, a write that leaves text pending (a
thread of the user's printing) arms a single tick instead.

Every send on the iopub socket holds the publisher's lock, so the thread and
the main thread never use the socket at once (a zmq socket is not
thread-safe), and buffers are taken and sent in one step (nothing overtakes
text written before it). The thread blocks every signal: SIGINT goes to the
main thread, where it interrupts a cell even in a blocking call.

A process forked from the kernel (``os.fork``, ``multiprocessing``) has no
flusher and must not touch the kernel's zmq sockets: after the fork, the
child's publisher gets a fresh lock (another thread may have held the old one
at the moment of the fork) and no socket, and its streams write straight to
file descriptors 1 and 2, which the kernel captures (see
:meth:`~kiln_kernel.publisher.Publisher.after_fork_in_child`).
"""

from __future__ import annotations

import _signal
import ctypes
import logging
import os
import threading

from .publisher import TICK, Publisher

__all__ = ["Flusher"]

log = logging.getLogger("kiln_kernel")

# Every signal this system has (a set of numbers), which the flusher's
# thread starts with blocked.
_ALL_SIGNALS = _signal.valid_signals()

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = os.O_CLOEXEC

# Timer states (:attr:`Flusher.mode`).
OFF, ONCE, PERIODIC = 0, 1, 2


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _timespec(seconds: float) -> _Timespec:
    ns = max(1, round(seconds * 1e9))  # 0 would disarm the timer
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd (``os.timerfd_*`` only exist from Python
    3.13). The calls keep the GIL (``PyDLL``): each is one short system
    call, and releasing the GIL would invite a thread switch. They pass
    only ints and ready-made pointers, without ``argtypes`` (whose
    conversions cost more than the call on every cell)."""

    def __init__(self):
        libc = ctypes.PyDLL(None, use_errno=True)
        create = libc.timerfd_create
        self._settime = libc.timerfd_settime  # int (int, int, itimerspec *, itimerspec *)
        fd = create(_CLOCK_MONOTONIC, _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "timerfd_create")
        self.fd = fd
        tick = _timespec(TICK)
        self._periodic = ctypes.pointer(_Itimerspec(tick, tick))
        self._off = ctypes.pointer(_Itimerspec())

    def _set(self, spec):
        if self._settime(self.fd, 0, spec, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "timerfd_settime")

    def periodic(self):
        self._set(self._periodic)

    def once(self, delay: float):
        self._set(ctypes.pointer(_Itimerspec(_Timespec(0, 0), _timespec(delay))))

    def off(self):
        self._set(self._off)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Flusher:
    """The thread that publishes pending output (see the module docstring).

    ``mode`` says what the timer does: nothing (:data:`OFF`), one tick to
    come (:data:`ONCE`) or a tick every :data:`TICK` while a cell runs
    (:data:`PERIODIC`). It is read and changed under the publisher's lock
    only, so the main thread and this one never arm the timer over each
    other.
    """

    def __init__(self, publisher: Publisher):
        self.publisher = publisher
        self.mode = OFF
        self.timer: _TimerFd | None = None
        self.thread: threading.Thread | None = None
        self._stopped = False

    def start(self):
        """Create the timer and start the thread; hand the publisher this
        flusher. Without a thread (none can be started: the session's pids
        limit), output leaves at the flush points only."""
        try:
            self.timer = _TimerFd()
        except OSError:
            log.warning("no timerfd: output is sent at flush points only", exc_info=True)
            return
        thread = threading.Thread(target=self._run, name="kiln-flusher", daemon=True)
        # Started with every signal blocked, so that it never takes one
        # meant for the main thread (a signal caught here would not
        # interrupt the main thread's blocking call).
        # `_signal`'s plain numbers, not `signal`'s wrappers: those make an
        # enum member of each of the ~65 signals, going and coming back.
        old = _signal.pthread_sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)
        try:
            thread.start()
        except RuntimeError:
            log.warning("no flusher thread: output is sent at flush points only", exc_info=True)
            self.timer.close()
            self.timer = None
            return
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old)
        self.thread = thread
        self.publisher.flusher = self

    # -- called with the publisher's lock held --------------------------
    def watch(self):
        """A cell starts: tick every :data:`TICK` until :meth:`unwatch`."""
        self.mode = PERIODIC
        self.timer.periodic()

    def unwatch(self):
        """The cell has ended (its output is sent by the main thread)."""
        self.mode = OFF
        self.timer.off()

    def poke(self, delay: float = TICK):
        """Text is pending and no tick is coming: have one in ``delay``."""
        if self.mode == OFF and not self._stopped:
            self.mode = ONCE
            self.timer.once(delay)

    # -- the thread -------------------------------------------------------
    def _run(self):
        fd = self.timer.fd
        publisher = self.publisher
        while True:
            try:
                os.read(fd, 8)  # blocks (without the GIL) until a tick
            except OSError:
                return  # closed: the kernel is shutting down
            if self._stopped:
                return
            try:
                self._tick(publisher)
            except Exception:
                log.error("publishing pending output failed", exc_info=True)

    def _tick(self, publisher):
        with publisher.lock:
            if self.mode == ONCE:
                self.mode = OFF
            wait = publisher.publish_due()
            if wait is not None:
                self.poke(wait)  # between cells: a partial line, later

    def stop(self):
        """No more ticks (the kernel is closing its sockets)."""
        with self.publisher.lock:
            self._stopped = True
            if self.timer is not None:
                self.mode = OFF
                self.timer.off()
            self.publisher.flusher = None

    def forget(self):
        """In a forked child: the thread is gone, and its timer descriptor
        is not the child's to keep."""
        self._stopped = True
        if self.timer is not None:
            try:
                self.timer.close()
            except OSError:
                pass
