"""What the kernel's unit tests share: a real lean kernel in this process,
driven over real zmq sockets by a small client; and a real kernel in a
process of its own (:class:`KernelProcess`), for what needs its own file
descriptors 1 and 2, its flusher thread and its signals.

:func:`live_kernel` builds one :class:`~kiln_kernel.kernel.Kernel` (IPython's
shell is a per-process singleton) bound on ipc sockets in a temporary
directory, and a client connected to them: a DEALER on the shell socket and
a SUB on iopub. :meth:`LiveKernel.execute` sends an ``execute_request``, has
the kernel handle it (one request, in this thread, exactly as its loop
would), and returns the reply and the iopub messages it parented.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import sys
import tempfile
import time
import uuid

import zmq
from kiln_kernel.fidelity import KILN_CMD, Client
from kiln_kernel.kernel import Kernel
from kiln_kernel.publisher import Publisher
from kiln_kernel.shell import adopt_ipykernel_input, register_compat_modules
from kiln_kernel.streams import OutStream
from kiln_kernel.wire import Session

KEY = uuid.uuid4().hex


def pair(ctx: zmq.Context):
    """A connected pair of inproc sockets: (sending, receiving)."""
    addr = "inproc://t-" + uuid.uuid4().hex
    # No high-water mark: a test reads what was sent only at its end (a
    # PAIR socket at its mark blocks the sender, where the kernel's PUB
    # socket would drop).
    rx = ctx.socket(zmq.PAIR)
    rx.setsockopt(zmq.RCVHWM, 0)
    rx.bind(addr)
    tx = ctx.socket(zmq.PAIR)
    tx.setsockopt(zmq.SNDHWM, 0)
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


def _output(msg: dict) -> dict:
    return {"msg_type": msg["header"]["msg_type"], "content": msg["content"]}


class KernelProcess:
    """``python -m kiln_kernel`` in a process of its own, as kiln runs it
    (its fd captures, its flusher thread, SIGINT for interrupts), driven
    over ipc by the fidelity harness's client.

    A cell can wait at a *gate* (a FIFO: ``open(GATE).read()`` blocks in one
    system call) until the test lets it go (:meth:`release`), so a test can
    look at what the kernel published while the cell was still blocked, with no
    bound on time but a generous deadline for failures.
    """

    #: How long a test waits for what must come (only a failing kernel waits this long).
    DEADLINE = 20.0

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kiln-kernel-proc-")
        self.gate = os.path.join(self.dir, "gate")
        os.mkfifo(self.gate)
        self.client = Client("kiln", KILN_CMD, self.dir)
        self.client.connect()
        self.pid = self.client.proc.pid
        # Messages parented by an earlier request, seen while waiting for a later one.
        self.strays: list[dict] = []

    def close(self):
        self.client.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, code: str) -> str:
        """Send an execute_request; its msg_id."""
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": False}
        return self.client.send(self.client.shell, "execute_request", content)

    def _next(self, mid: str, deadline: float):
        """The next iopub message of request ``mid`` (None past the deadline)."""
        c = self.client
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not c.iopub.poll(left * 1000):
                return None
            msg = c.parse(c.iopub.recv_multipart())
            if msg["parent_header"].get("msg_id") == mid:
                return msg
            self.strays.append(msg)

    def outputs_until(self, mid: str, done, what: str) -> list[dict]:
        """Outputs of ``mid`` (``msg_type`` and ``content``) as they arrive,
        until ``done(outputs)`` holds; fails if the request goes idle first
        (what had to come came only at the end) or nothing more comes."""
        outs: list[dict] = []
        deadline = time.monotonic() + self.DEADLINE
        while not done(outs):
            msg = self._next(mid, deadline)
            if msg is None:
                raise AssertionError(f"{what}: not published while the cell ran; got {outs}")
            t = msg["header"]["msg_type"]
            if t == "status" and msg["content"]["execution_state"] == "idle":
                raise AssertionError(f"{what}: the cell ended first; got {outs}")
            if t not in ("status", "execute_input"):
                outs.append(_output(msg))
        return outs

    def finish(self, mid: str) -> tuple[dict, list[dict]]:
        """The reply to ``mid`` and its remaining outputs, through idle."""
        c = self.client
        reply = c.recv_reply(c.shell, mid, timeout=self.DEADLINE)
        outs: list[dict] = []
        deadline = time.monotonic() + self.DEADLINE
        while True:
            msg = self._next(mid, deadline)
            if msg is None:
                raise AssertionError(f"no idle for {mid}; got {outs}")
            t = msg["header"]["msg_type"]
            if t == "status" and msg["content"]["execution_state"] == "idle":
                return reply["content"], outs
            if t not in ("status", "execute_input"):
                outs.append(_output(msg))

    def execute(self, code: str) -> tuple[dict, list[dict]]:
        return self.finish(self.start(code))

    def release(self):
        """Let a cell waiting at the gate go on (nothing happens if none
        comes to it within the deadline)."""
        deadline = time.monotonic() + self.DEADLINE
        while True:
            try:
                fd = os.open(self.gate, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    return
                time.sleep(0.005)  # no reader yet
                continue
            os.write(fd, b"go")
            os.close(fd)
            return
