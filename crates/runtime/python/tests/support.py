"""What the kernel's unit tests share: a real lean kernel in this process,
driven over real zmq sockets by a small client.

:func:`live_kernel` builds one :class:`~kiln_kernel.kernel.Kernel` (IPython's
shell is a per-process singleton) bound on ipc sockets in a temporary
directory, and a client connected to them: a DEALER on the shell socket and
a SUB on iopub. :meth:`LiveKernel.execute` sends an ``execute_request``, has
the kernel handle it (one request, in this thread, exactly as its loop
would), and returns the reply and the iopub messages it parented.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
import uuid

import zmq
from kiln_kernel.kernel import Kernel
from kiln_kernel.publisher import Publisher
from kiln_kernel.shell import adopt_ipykernel_input, register_compat_modules
from kiln_kernel.streams import OutStream
from kiln_kernel.wire import Session

KEY = uuid.uuid4().hex


def pair(ctx: zmq.Context):
    """A connected pair of inproc sockets: (sending, receiving)."""
    addr = "inproc://t-" + uuid.uuid4().hex
    rx = ctx.socket(zmq.PAIR)
    rx.bind(addr)
    tx = ctx.socket(zmq.PAIR)
    tx.connect(addr)
    return tx, rx


def request(session: Session, msg_type: str, content=None) -> dict:
    """A request as the kernel's loop would have parsed it."""
    frames = []

    class Collect:
        def send(self, frame, flags=0):
            frames.append(frame if isinstance(frame, bytes) else bytes(frame))

    session.send(Collect(), msg_type, content or {})
    return session.parse(frames)[1]


def drain(sock, session: Session, timeout: float = 0.2) -> list[dict]:
    """Every message waiting on ``sock`` (verified and decoded)."""
    out = []
    while sock.poll(timeout * 1000):
        parsed = session.parse(sock.recv_multipart())
        assert parsed is not None, "bad signature or malformed message"
        out.append(parsed[1])
    return out


class Harness:
    """A publisher on a real socket pair, with its two output streams (no fd
    capture), for tests below the kernel."""

    def __init__(self, limit=None):
        self.ctx = zmq.Context()
        self.session = Session(KEY.encode())
        self.publisher = Publisher(self.session, "test-kernel", limit)
        self.publisher.socket, self.rx = pair(self.ctx)
        self.stdout = OutStream(self.publisher, "stdout", None)
        self.stderr = OutStream(self.publisher, "stderr", None)
        self.publisher.streams = (self.stdout, self.stderr)
        for s in self.publisher.streams:
            s._last = time.monotonic()  # as at the start of a cell
        self.parent = request(self.session, "execute_request", {"code": ""})
        self.publisher.set_parent([b"client"], self.parent)

    def messages(self, timeout=0.2):
        return drain(self.rx, self.session, timeout)

    def close(self):
        self.publisher.socket.close(0)
        self.rx.close(0)
        self.ctx.term()


def stream_text(msgs, name=None) -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name))


class LiveKernel:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kiln-kernel-test-")
        atexit.register(shutil.rmtree, self.dir, True)
        conn = {"transport": "ipc", "ip": os.path.join(self.dir, "k"), "shell_port": 0, "iopub_port": 0,
                "stdin_port": 0, "control_port": 0, "hb_port": 0, "key": KEY,
                "signature_scheme": "hmac-sha256"}
        self.kernel = k = Kernel(conn)
        k.open_sockets()
        register_compat_modules()
        k.init_shell()
        adopt_ipykernel_input(Kernel)
        p = k.publisher
        self.publisher = p
        self.stdout = OutStream(p, "stdout", None)
        self.stderr = OutStream(p, "stderr", None)
        p.streams = (self.stdout, self.stderr)
        self.session = Session(KEY.encode())
        self.ctx = zmq.Context()
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.connect(f"ipc://{conn['ip']}-{conn['shell_port']}")
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(f"ipc://{conn['ip']}-{conn['iopub_port']}")
        # PUB/SUB joins asynchronously: ask until the kernel's status arrives.
        deadline = time.monotonic() + 30
        while True:
            self.request("kernel_info_request", {}, collect=False)
            if any(m["msg_type"] == "status" for m in drain(self.iopub, self.session, 0.1)):
                break
            assert time.monotonic() < deadline, "iopub never joined"
        drain(self.iopub, self.session, 0.1)

    def request(self, msg_type, content, collect=True):
        """Send one request and have the kernel handle it; returns the reply
        and the iopub messages parented by the request (through idle)."""
        mid = self.session.send(self.shell, msg_type, content)["msg_id"]
        frames = self.kernel.shell_sock.recv_multipart()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.stdout, self.stderr
        try:
            self.kernel.dispatch(self.kernel.shell_sock, frames, "shell")
        finally:
            sys.stdout, sys.stderr = saved
        reply = self.session.parse(self.shell.recv_multipart())[1]
        msgs = []
        if not collect:
            return reply, msgs
        while True:
            if not self.iopub.poll(10_000):
                return reply, msgs
            m = self.session.parse(self.iopub.recv_multipart())[1]
            if m["parent_header"].get("msg_id") != mid:
                continue
            msgs.append(m)
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return reply, msgs

    def execute(self, code, **kw):
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": False}
        content.update(kw)
        reply, msgs = self.request("execute_request", content)
        return reply, [m for m in msgs if m["msg_type"] != "status"]


_live = None


def live_kernel() -> LiveKernel:
    """The process's kernel (built on first use)."""
    global _live
    if _live is None:
        _live = LiveKernel()
    return _live
