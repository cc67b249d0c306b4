"""The Jupyter wire protocol (version 5.3), as the lean kernel speaks it.

A message is a list of zmq frames: the routing identities, the ``<IDS|MSG>``
delimiter, an HMAC signature over the four JSON parts that follow (header,
parent header, metadata, content; the key and ``signature_scheme`` come from
the connection file), then any binary buffers. :class:`Session` signs and
sends such messages and verifies and decodes incoming ones.

JSON is packed the way ``jupyter_client.session.json_packer`` packs it
(compact separators, no ASCII escaping, ISO 8601 dates ending in ``Z``, bytes
as base64), so that a client sees the same messages as from ipykernel.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
from binascii import b2a_base64
from datetime import UTC, date, datetime

import zmq

PROTOCOL_VERSION = "5.3"
DELIM = b"<IDS|MSG>"
_UTC = UTC
log = logging.getLogger("kiln_kernel")

# ---------------------------------------------------------------------------
# JSON (same packer as jupyter_client.session.json_packer)
# ---------------------------------------------------------------------------


def json_default(obj):
    """How values JSON has no type for are packed (dates, bytes, numbers)."""
    import numbers
    from collections.abc import Iterable

    if isinstance(obj, datetime):
        if obj.tzinfo is None:
            obj = obj.replace(tzinfo=_UTC)
        return obj.isoformat().replace("+00:00", "Z")
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return b2a_base64(obj, newline=False).decode("ascii")
    if isinstance(obj, Iterable):
        return list(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise TypeError(f"{obj!r} is not JSON serializable")


_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=json_default
)


def pack(obj) -> bytes:
    """``obj`` as JSON bytes, packed as jupyter_client packs it."""
    try:
        s = _encoder.encode(obj)
    except (TypeError, ValueError):
        # Same fallback as jupyter_client: clean, then serialise (rare path).
        from jupyter_client.jsonutil import json_clean

        s = _encoder.encode(json_clean(obj))
    return s.encode("utf8", errors="surrogateescape")


def now_iso() -> str:
    """The current time as jupyter_client writes it in headers."""
    return datetime.now(_UTC).isoformat().replace("+00:00", "Z")


def uuid4() -> str:
    """A random UUID (version 4) as text: the kernel's identity."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


_SNDMORE = int(zmq.SNDMORE)

class Session:
    """Signs, serialises and sends messages; parses and verifies incoming ones."""

    def __init__(self, key: bytes, scheme: str = "hmac-sha256"):
        if not scheme.startswith("hmac-"):
            raise ValueError("signature_scheme must start with 'hmac-'")
        digest = scheme.split("-", 1)[1]
        self.key = key
        self.auth = hmac.new(key, digestmod=digest) if key else None
        # Ids shaped like jupyter_client's (``new_id()``, ``<session>_<pid>_<n>``).
        self.session = "-".join(os.urandom(16).hex()[i:j] for i, j in ((0, 8), (8, 32)))
        self.username = os.environ.get("USER", "username")
        self.pid = os.getpid()
        # One number per message, also when two threads sign at once (the
        # flusher on iopub, the main thread on shell): next() on a count is
        # atomic.
        self._count = itertools.count()

    def sign(self, parts) -> bytes:
        if self.auth is None:
            return b""
        h = self.auth.copy()
        for p in parts:
            h.update(p)
        return h.hexdigest().encode("ascii")

    def header(self, msg_type: str) -> dict:
        n = next(self._count)
        return {
            "msg_id": f"{self.session}_{self.pid}_{n}",
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": now_iso(),
            "version": PROTOCOL_VERSION,
        }

    def send(self, sock, msg_type, content, parent=b"{}", idents=(), metadata=None, buffers=None):
        """Send one message. ``parent`` is the parent header as dict or raw JSON bytes.

        Replies and iopub messages pass the request's header as it arrived
        (``msg["_raw_header"]``): echoed verbatim, it costs no serialisation
        per message and is exactly what the client sent.
        """
        header = self.header(msg_type)
        h = pack(header)
        p = parent if isinstance(parent, bytes) else pack(parent or {})
        m = pack(metadata or {}) if metadata else b"{}"
        c = content if isinstance(content, bytes) else pack(content)
        parts = [h, p, m, c]
        frames = list(idents)
        frames.append(DELIM)
        frames.append(self.sign(parts))
        frames.extend(parts)
        if buffers:
            frames.extend(buffers)
        # Frame by frame with a plain int flag: pyzmq's send_multipart ORs
        # enum flags per frame, a measurable part of a trivial cell.
        send = sock.send
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            send(frame, _SNDMORE if i < last else 0)
        return header

    def parse(self, frames):
        """Split identities, verify the signature, decode. Returns (idents, msg) or None."""
        try:
            i = frames.index(DELIM)
        except ValueError:
            log.error("message without delimiter")
            return None
        idents = frames[:i]
        rest = frames[i + 1 :]
        if len(rest) < 5:
            log.error("malformed message (%d frames after delimiter)", len(rest))
            return None
        sig, h, p, m, c = rest[:5]
        if self.auth is not None:
            if not hmac.compare_digest(sig, self.sign((h, p, m, c))):
                log.error("invalid message signature")
                return None
        header = json.loads(h)
        msg = {
            "header": header,
            "parent_header": json.loads(p),
            "metadata": json.loads(m),
            "content": json.loads(c),
            "buffers": rest[5:],
            "msg_id": header.get("msg_id"),
            "msg_type": header.get("msg_type"),
            "_raw_header": h,
        }
        return idents, msg

