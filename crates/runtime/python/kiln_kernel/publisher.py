"""The kernel's one way out to iopub.

Everything a kernel shows leaves through one :class:`Publisher`: status,
``execute_input``, stream text (:mod:`kiln_kernel.streams`), displays and
results (:mod:`kiln_kernel.display`), errors (:mod:`kiln_kernel.shell`) and
comm messages. It is made with the kernel and handed to each of them, and it
holds what they need and nothing else:

* the :class:`~kiln_kernel.wire.Session` that signs messages, and the iopub
  socket (``None`` until the kernel has a connection: kiln's zygote builds
  the shell before any exists; and again after shutdown: then nothing is
  sent);
* the request being handled, whose header parents every message (kept as
  the bytes that arrived, echoed without re-serialising), and its routing
  identities (for input requests);
* the hooks registered on each output channel (ipykernel's
  ``register_hook``: a hook sees a message before it is sent and may change
  or swallow it);
* the kernel's standard streams, flushed before anything that must come
  after the text printed so far, and while a cell runs by the kernel's
  :class:`~kiln_kernel.flusher.Flusher` thread (:meth:`Publisher.publish_due`);
* the :class:`OutputBudget` of the request;
* the lock that every send on the iopub socket holds (:attr:`Publisher.lock`).

Two threads publish: the kernel's main thread and the flusher. A zmq socket
is not thread-safe, and text must leave in the order it was written, so the
iopub socket is used, and the streams' buffers are changed, only under the
publisher's one lock (re-entrant: a hook may print). Stream text leaves
oldest first: before one stream's text is sent, the other stream's text that
began before it is (``print(1); print(2, file=sys.stderr)`` shows 1 then 2,
even when stderr is flushed first). As under ipykernel, the writes of one
stream between two flushes go out as one message.

Output size. No stream message holds more than :data:`MAX_STREAM_BYTES` of
text: longer text is split on UTF-8 character boundaries. And a request's
output stops at the execution output cap (``KILN_MAX_OUTPUT_BYTES``, set by
kiln from ``--max-output-bytes``), counted as kiln's server counts it (the
UTF-8 bytes of stream text; for each MIME type of a display or result, its
name plus its value). Output up to the cap is sent; then one message that
takes the count past the cap, which the server drops and replaces with its
"output limit reached" marker (so the user sees the output up to the cap and
exactly one marker); then nothing more of that request, until
``clear_output`` empties what is shown. Errors always go out: the server
keeps them past the cap too. A single write of 600 MB thus costs one
cap-sized slice, not 600 MB on the socket and in the server.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time

from .wire import json_default

__all__ = ["MAX_STREAM_BYTES", "PARTIAL_WAIT", "TICK", "HookChannel", "OutputBudget", "Publisher",
           "output_limit"]

#: The most text one ``stream`` message carries, in UTF-8 bytes.
MAX_STREAM_BYTES = 1 << 16

#: How often, while a cell runs, the flusher has pending output sent (seconds).
TICK = 0.01
#: How long a line still being written (no newline yet) may wait for its end
#: before the flusher sends it anyway (ipykernel's flush interval): the ``1``
#: and the ``\n`` that ``print(1)`` writes one after the other stay together.
PARTIAL_WAIT = 0.2

_UNLIMITED = sys.maxsize


def output_limit(environ) -> int | None:
    """The output cap from ``KILN_MAX_OUTPUT_BYTES``; ``None`` if unset or invalid."""
    try:
        limit = int(environ.get("KILN_MAX_OUTPUT_BYTES", ""))
    except ValueError:
        return None
    return limit if limit > 0 else None


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (what the server counts)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def split_utf8(text: str, limit: int) -> tuple[str, str]:
    """``text`` cut into the longest head of at most ``limit`` UTF-8 bytes
    that ends on a character boundary, and the rest."""
    if text.isascii():
        return text[:limit], text[limit:]
    b = text.encode("utf-8", "surrogatepass")
    if len(b) <= limit:
        return text, ""
    end = max(limit, 0)
    while end > 0 and (b[end] & 0xC0) == 0x80:  # a continuation byte: back to its start
        end -= 1
    return b[:end].decode("utf-8", "surrogatepass"), b[end:].decode("utf-8", "surrogatepass")


def stream_pieces(text: str, size: int = MAX_STREAM_BYTES) -> list[str]:
    """``text`` in pieces of at most ``size`` UTF-8 bytes, each ending on a
    character boundary."""
    n = len(text)
    if n * 4 <= size or (n <= size and text.isascii()):
        return [text]  # the common case, without encoding
    if text.isascii():
        return [text[i : i + size] for i in range(0, n, size)]
    b = text.encode("utf-8", "surrogatepass")
    pieces = []
    start = 0
    while start < len(b):
        end = start + size
        if end < len(b):
            while (b[end] & 0xC0) == 0x80:
                end -= 1
        pieces.append(b[start:end].decode("utf-8", "surrogatepass"))
        start = end
    return pieces


# Where the server's JSON of a value may be shorter than Python's: it writes
# exponents as ``e16``/``e-6`` (Python ``e+16``/``e-06``), and integers too
# large for 64 bits as floats (``1e20``).
_EXPONENT = re.compile(r"\de(?:\+|-0)\d")
_LONG_DIGITS = re.compile(r"\d{17,}")


def bundle_size(data) -> int:
    """A MIME bundle's size as the server counts it (never more): each
    type's name plus its value's length, the value as JSON unless it is a
    string."""
    if not isinstance(data, dict):
        return 0
    total = 0
    for key, value in data.items():
        total += utf8_len(str(key))
        if isinstance(value, str):
            total += utf8_len(value)
        else:
            try:
                s = json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                               default=json_default)
            except (TypeError, ValueError):
                continue
            short = len(_EXPONENT.findall(s)) + sum(map(len, _LONG_DIGITS.findall(s)))
            total += max(0, utf8_len(s) - short)
    return total


class OutputBudget:
    """What one request may still show (see the module docstring).

    ``limit`` is ``None`` for no cap. ``spent`` once a message has taken the
    count past the cap: from then on nothing more is shown.
    """

    __slots__ = ("limit", "spent", "used")

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.used = 0
        self.spent = False

    def reset(self):
        self.used = 0
        self.spent = False

    @property
    def remaining(self) -> int:
        return _UNLIMITED if self.limit is None else max(0, self.limit - self.used)

    def room(self) -> int:
        """Characters (or bytes) worth keeping for later sending: enough to
        reach and then pass the cap; 0 once spent."""
        if self.spent:
            return 0
        if self.limit is None:
            return _UNLIMITED
        return self.limit - self.used + 1

    def take(self, n: int) -> bool:
        """Count ``n`` bytes if they fit under the cap."""
        if self.limit is None:
            return True
        if self.used + n <= self.limit:
            self.used += n
            return True
        return False


class HookChannel:
    """ipykernel's ``register_hook``/``unregister_hook`` on an output channel
    object (a stream, the display publisher, the display hook). The hooks
    are kept by the channel's publisher under ``hook_channel``."""

    publisher: Publisher | None = None
    hook_channel = ""

    def register_hook(self, hook):
        self.publisher.register_hook(self.hook_channel, hook)

    def unregister_hook(self, hook):
        return self.publisher.unregister_hook(self.hook_channel, hook)


class Publisher:
    """Sends the kernel's iopub messages (see the module docstring)."""

    def __init__(self, session, ident: str, limit: int | None = None):
        self.socket = None
        self.parent = {}
        self.parent_header = {}
        self.parent_raw = b"{}"
        self.parent_ident = []
        self.streams = ()
        self.budget = OutputBudget(limit)
        self._hooks: dict[str, list] = {}
        self.lock = threading.RLock()
        # The kernel's Flusher once its thread runs; None without one.
        self.flusher = None
        self.adopt(session, ident)

    def adopt(self, session, ident: str):
        """Sign with ``session`` and name topics after the kernel ``ident``
        (a kernel built before its connection takes these from it)."""
        self.session = session
        base = f"kernel.{ident}."
        self.topic_status = (base + "status").encode()
        self.topic_execute_input = (base + "execute_input").encode()
        self.topic_error = (base + "error").encode()
        self.topic_execute_result = (base + "execute_result").encode()
        self.topic_shutdown = (base + "shutdown").encode()

    # -- the current request ------------------------------------------
    def set_parent(self, idents, msg):
        """Parent what follows to ``msg``; its output starts a fresh budget."""
        with self.lock:
            self.parent = msg
            self.parent_header = msg["header"]
            self.parent_raw = msg["_raw_header"]
            self.parent_ident = idents
            self.budget.reset()

    # -- hooks ---------------------------------------------------------
    def register_hook(self, channel: str, hook):
        self._hooks.setdefault(channel, []).append(hook)

    def unregister_hook(self, channel: str, hook) -> bool:
        try:
            self._hooks.get(channel, []).remove(hook)
            return True
        except ValueError:
            return False

    def run_hooks(self, channel: str, msg_type: str, content: dict):
        """The content to send after ``channel``'s hooks, or ``None`` if one
        swallowed the message."""
        hooks = self._hooks.get(channel)
        if not hooks:
            return content
        msg = {"msg_type": msg_type, "content": content, "parent_header": self.parent_header,
               "header": self.session.header(msg_type), "metadata": {}}
        for hook in list(hooks):
            msg = hook(msg)
            if msg is None:
                return None
        return msg["content"]

    # -- sending -------------------------------------------------------
    def send(self, msg_type, content, topic, parent=None, metadata=None, buffers=None):
        """Send one message as is (no hooks, no budget), parented to the
        current request unless ``parent`` (raw header bytes) says otherwise."""
        with self.lock:
            sock = self.socket
            if sock is None:
                return
            self.session.send(sock, msg_type, content, self.parent_raw if parent is None else parent,
                              idents=(topic,), metadata=metadata, buffers=buffers)

    # -- the standard streams -----------------------------------------
    def flush_streams(self):
        """Publish what the kernel's stdout and stderr hold, the text
        written first first."""
        with self.lock:
            self.flush_through(None)

    def flush_through(self, last):
        """Publish the pending text of stream ``last`` (an
        :class:`~kiln_kernel.streams.OutStream`), after the other streams'
        text that began before it; of every stream if ``last`` is None.
        Called with the lock held."""
        streams = self.streams
        for s in streams:
            s.collect()
        if last is None:
            for s in _oldest_first(streams):
                if s.pending:
                    s.send_pending()
            return
        if not last.pending:
            return
        for s in _oldest_first(streams):
            if s is last:
                break
            if s.pending and s.since <= last.since:
                s.send_pending()
        last.send_pending()

    def publish_due(self) -> float | None:
        """Publish the streams' text that is due: complete lines, and a
        line begun :data:`PARTIAL_WAIT` ago (with any text that began before
        it). The flusher's tick; called with the lock held. Returns the
        seconds until what is still pending is due, or None if nothing is."""
        if self.socket is None:
            return None
        streams = self.streams
        for s in streams:
            s.collect()
        now = time.monotonic()
        due = None
        for s in _oldest_first(streams):
            if s.pending and (s.line_done() or now - s.since >= PARTIAL_WAIT):
                due = s
        if due is not None:
            self.flush_through(due)
        wait = None
        for s in streams:
            if s.pending:
                w = max(TICK, s.since + PARTIAL_WAIT - now)
                wait = w if wait is None else min(wait, w)
        return wait

    def after_fork_in_child(self):
        """In a process forked from the kernel (``os.fork``,
        ``multiprocessing``): a fresh lock (the flusher may have held this
        one at the fork), no socket (the kernel's zmq sockets are the
        kernel's), no flusher (its thread is not in the child), and streams
        that write to file descriptors 1 and 2, which the kernel captures."""
        self.lock = threading.RLock()
        self.socket = None
        flusher, self.flusher = self.flusher, None
        if flusher is not None:
            flusher.forget()
        for s in self.streams:
            s.detach()

    def stream(self, name: str, text: str):
        """Publish ``text`` written to stream ``name``, in pieces of at most
        :data:`MAX_STREAM_BYTES`, up to the budget."""
        with self.lock:
            self._stream(name, text)

    def _stream(self, name: str, text: str):
        budget = self.budget
        if self.socket is None or budget.spent:
            return
        topic = b"stream." + name.encode()
        hooks = name in self._hooks
        send = self.session.send
        for piece in stream_pieces(text):
            content = {"name": name, "text": piece}
            if hooks:
                content = self.run_hooks(name, "stream", content)
                if content is None:
                    continue
                piece = content.get("text", "")
            if budget.take(utf8_len(piece)):
                send(self.socket, "stream", content, self.parent_raw, idents=(topic,))
                continue
            # The piece passes the cap: what fits, then the rest, which takes
            # the server's count past the cap (it shows its marker instead).
            head, tail = split_utf8(piece, budget.remaining)
            if head:
                send(self.socket, "stream", dict(content, text=head), self.parent_raw, idents=(topic,))
            send(self.socket, "stream", dict(content, text=tail), self.parent_raw, idents=(topic,))
            budget.spent = True
            return

    def rich(self, channel: str, msg_type: str, content: dict, topic: bytes):
        """Publish a ``display_data``, ``update_display_data`` or
        ``execute_result`` after ``channel``'s hooks, within the budget."""
        with self.lock:
            self._rich(channel, msg_type, content, topic)

    def _rich(self, channel: str, msg_type: str, content: dict, topic: bytes):
        if self.socket is None:
            return
        content = self.run_hooks(channel, msg_type, content)
        if content is None:
            return
        budget = self.budget
        if budget.limit is not None:
            if budget.spent:
                return
            size = bundle_size(content.get("data"))
            if msg_type == "update_display_data":
                # The server keeps no updates (nothing to count), but no
                # message is larger than the cap.
                if size > budget.limit:
                    return
            elif not budget.take(size):
                # This one passes the cap: the server drops it and shows its
                # marker. One larger than any request may show is replaced
                # by a stand-in just large enough to do the same.
                if size > budget.limit:
                    content = _stand_in(content, size, budget.remaining + 1)
                budget.spent = True
        self.session.send(self.socket, msg_type, content, self.parent_raw, idents=(topic,))

    def clear_output(self, wait: bool):
        """Publish ``clear_output``; what is shown is emptied, and so the
        budget starts again."""
        with self.lock:
            if self.socket is None:
                return
            content = self.run_hooks("display", "clear_output", {"wait": wait})
            if content is None:
                return
            self.session.send(self.socket, "clear_output", content, self.parent_raw,
                              idents=(b"display_data",))
            self.budget.reset()


def _oldest_first(streams):
    """The streams in the order their pending text began (stdout first on
    a tie, and when none is pending: as ipykernel flushes at a cell's end)."""
    if len(streams) == 2:
        a, b = streams
        if b.pending and (not a.pending or b.since < a.since):
            return (b, a)
    return streams


def _stand_in(content: dict, size: int, counted: int) -> dict:
    """A display of at least ``counted`` bytes as the server counts them,
    saying that one of ``size`` bytes was not shown."""
    key = "text/plain"
    note = f"[a display of {size} bytes, past the output limit]"
    text = note + " " * max(0, counted - len(key) - len(note))
    out = {k: v for k, v in content.items() if k not in ("data", "metadata", "transient")}
    out.update(data={key: text}, metadata={}, transient={})
    return out
