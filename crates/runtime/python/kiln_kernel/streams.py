"""The kernel's standard output and error.

While a kernel runs, ``sys.stdout`` and ``sys.stderr`` are :class:`OutStream`
objects: buffered text streams that hand what a cell writes to the kernel's
:class:`~kiln_kernel.publisher.Publisher` (which sends it as ``stream``
messages of at most 64 KiB): while a cell runs, within a tick of the
kernel's :class:`~kiln_kernel.flusher.Flusher` thread (a complete line at
once, a partial one after a while); every 64 Ki characters; at each flush
point: before a display, a result, an error or an input request, and at the
end of every request; and when the cell calls ``flush()``. A write only
appends to a buffer, under the publisher's lock; it sends nothing itself
(but past 64 Ki characters).

Writes that bypass Python (``os.system``, subprocesses, C code) go to file
descriptors 1 and 2. :class:`FdCapture` redirects each of them to a memfd,
which never blocks a writer (a pipe blocks once full, and is one more thing
to drain); an :class:`OutStream` reads the new bytes at each of its writes
(so that they come before the text written after them), and at each flush
and tick. Output written at fd level during a long blocking call thus shows
up within a tick or two.

In a process forked from the kernel, an :class:`OutStream` writes straight
to file descriptor 1 or 2 (:meth:`OutStream.detach`): the child's text comes
out through the kernel's capture, and nothing is buffered that ``os._exit``
would lose.

Neither keeps more than the request's output budget still allows (see
:class:`~kiln_kernel.publisher.OutputBudget`): the rest of a huge write, from
Python or at fd level, is dropped where it arrives, not buffered and sent.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import time
from io import TextIOBase, UnsupportedOperation
from typing import TYPE_CHECKING

from .publisher import HookChannel

if TYPE_CHECKING:
    from .publisher import Publisher

_CHUNK = 1 << 16
# Bytes read from a capture beyond the budget's room: the decoder may hold
# back the start of a character (up to 3 bytes), and what is read must still
# be enough to pass the cap.
_SLACK = 4


class FdCapture:
    """fd 1 or 2 redirected to a memfd (O_APPEND): writers never block; the
    kernel reads new bytes at flush points.

    O_APPEND because every writer (this process, its children) shares the
    file description: after :meth:`reset` truncates the file they write at
    its new end, not at their old offset past a hole of zeros.
    """

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.orig = os.dup(fd)  # the real stdout/stderr (log), kept for echo
        os.set_inheritable(self.orig, False)
        self.mfd = os.memfd_create("kiln-" + name, os.MFD_CLOEXEC)
        fl = fcntl.fcntl(self.mfd, fcntl.F_GETFL)
        fcntl.fcntl(self.mfd, fcntl.F_SETFL, fl | os.O_APPEND)
        os.dup2(self.mfd, fd)  # fd (1/2) inherits the open file description
        self.pos = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, limit: int | None = None) -> str:
        """The text written since the last read, from at most ``limit``
        bytes; bytes past the limit are dropped (and with ``limit <= 0``
        all of them, freeing the memfd's memory)."""
        pos = self.pos
        if limit is not None and limit <= 0:
            if os.fstat(self.mfd).st_size > pos:
                self._drop()
            return ""
        want = -1 if limit is None else limit
        chunks = []
        got = 0
        while got != want:
            b = os.pread(self.mfd, _CHUNK if want < 0 else min(_CHUNK, want - got), pos)
            if not b:
                break
            pos += len(b)
            got += len(b)
            chunks.append(b)
        if not chunks:
            return ""
        self.pos = pos
        data = b"".join(chunks)
        try:  # echo to the real stream, like ipykernel's fd watcher does
            os.write(self.orig, data)
        except OSError:
            pass
        text = self.decoder.decode(data)
        if got == want and os.fstat(self.mfd).st_size > pos:
            self._drop()  # past the budget
        return text

    def _drop(self):
        """Forget everything written so far (writers go on at the new end)."""
        os.ftruncate(self.mfd, 0)
        self.pos = 0
        self.decoder.reset()

    def reset(self):
        """Drop consumed bytes (at the end of a cell, after the last read)
        to free memory."""
        if self.pos:
            self._drop()


class OutStream(HookChannel, TextIOBase):
    """sys.stdout / sys.stderr replacement publishing ``stream`` messages.

    Its buffer is changed only under the publisher's lock: the flusher
    thread takes it from there (:meth:`collect`, :meth:`send_pending`)."""

    max_buffer = 1 << 16
    encoding = "UTF-8"

    def __init__(self, publisher: Publisher, name: str, capture: FdCapture | None):
        self.publisher = publisher
        self.name = name
        self.hook_channel = name
        self._capture = capture
        # What fileno() answers: the real stream (the log), as ipykernel's
        # OutStream answers its copy of the original descriptor.
        self._fileno = None if capture is None else capture.orig
        self._buf: list[str] = []
        self._size = 0
        self.since = 0.0  # when the pending text began (time.monotonic)
        self._closed = False
        self._direct = -1  # in a forked child: the descriptor written to

    # file-like API
    def fileno(self):
        if self._fileno is not None:
            return self._fileno
        raise UnsupportedOperation("fileno")

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def seekable(self):
        return False

    @property
    def closed(self):
        return self._closed

    def close(self):
        self._closed = True

    def set_parent(self, parent):
        pass  # the publisher parents every message to the current request

    @property
    def parent_header(self):
        return self.publisher.parent_header

    def write(self, string):
        if not isinstance(string, str):
            raise TypeError(f"write() argument must be str, not {type(string)}")
        if self._closed:
            raise ValueError("I/O operation on closed file")
        if self._direct >= 0:
            return self._write_direct(string)
        n = len(string)
        publisher = self.publisher
        with publisher.lock:
            # The other stream's waiting text was written before this: it is
            # sent first, so interleaved prints keep their order whenever the
            # flusher's ticks fall (ipykernel shows them interleaved too).
            for other in publisher.streams:
                if other is not self and other.pending:
                    publisher.flush_through(other)
            idle = not self._buf
            # fd-level text written before this write comes before it.
            self.collect()
            # Keep no more than can still be shown (what passes the cap included).
            room = publisher.budget.room() - self._size
            if string and room > 0:
                self._append(string if n <= room else string[:room])
            if idle and self._buf:
                flusher = publisher.flusher
                if flusher is not None:
                    flusher.poke()  # between cells; a cell has its ticks already
            if self._size >= self.max_buffer:
                publisher.flush_through(self)
        return n

    def writelines(self, sequence):
        for s in sequence:
            self.write(s)

    def _append(self, s):
        if not self._buf:
            self.since = time.monotonic()
        self._buf.append(s)
        self._size += len(s)

    # -- under the publisher's lock -----------------------------------
    @property
    def pending(self) -> bool:
        """Whether text waits to be sent."""
        return bool(self._buf)

    def line_done(self) -> bool:
        """Whether the pending text ends with a complete line."""
        return self._buf[-1][-1] == "\n"

    def collect(self):
        """Take in the text written at fd level since the last time, as
        much as the budget still allows."""
        cap = self._capture
        if cap is not None:
            room = self.publisher.budget.room() - self._size
            fdtext = cap.read(room + _SLACK if room > 0 else 0)
            if fdtext:
                self._append(fdtext)

    def send_pending(self):
        """Publish the pending text."""
        data = "".join(self._buf)
        self._buf = []
        self._size = 0
        self.publisher.stream(self.name, data)

    # -- public -------------------------------------------------------
    def flush(self):
        """Publish the pending text now, after the other stream's text that
        began before it."""
        if self._direct >= 0:
            return
        publisher = self.publisher
        with publisher.lock:
            publisher.flush_through(self)

    # -- in a forked child --------------------------------------------
    def detach(self):
        """Write straight to file descriptor 1 or 2 from now on (in a
        process forked from the kernel); the parent's pending text is the
        parent's to send."""
        self._buf = []
        self._size = 0
        cap, self._capture = self._capture, None  # the parent reads it, not this process
        self._direct = cap.fd if cap is not None else (2 if self.name == "stderr" else 1)

    def _write_direct(self, string):
        data = memoryview(string.encode("utf-8", "replace"))
        while data:
            data = data[os.write(self._direct, data):]
        return len(string)


def patch_faulthandler(stderr_file):
    """Make ``stderr_file`` faulthandler's default file.

    faulthandler writes from a signal handler straight to the file
    descriptor of the file it was given, so by default it gets
    ``sys.__stderr__`` (fd 2, captured like any fd-level output) rather than
    ``sys.stderr`` (an :class:`OutStream`), as under ipykernel, which patches
    faulthandler the same way (``IPKernelApp.patch_io``).
    """
    import faulthandler

    enable = faulthandler.enable

    def _enable(file=stderr_file, all_threads=True, **kwargs):
        return enable(file=file, all_threads=all_threads, **kwargs)

    faulthandler.enable = _enable
    if hasattr(faulthandler, "register"):
        register = faulthandler.register

        def _register(signum, file=stderr_file, all_threads=True, chain=False, **kwargs):
            return register(signum, file=file, all_threads=all_threads, chain=chain, **kwargs)

        faulthandler.register = _register
