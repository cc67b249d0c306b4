"""Serve a TCP-only Jupyter kernel (Deno's) on kiln's ipc sockets.

Usage: ``python -m kiln_kernel.relay CONNECTION_FILE -- KERNEL ARGV...``

kiln's kernels live in network namespaces the server cannot reach, and
speak Jupyter over ``ipc://`` sockets in their run directory. Deno's kernel
(``deno jupyter --kernel --conn FILE``) listens on TCP only. This relay runs
inside the same sandbox: it gives the kernel a TCP connection file on five
free loopback ports (its own namespace's loopback, reachable by nothing
outside), waits until the kernel listens on all of them, then binds the
ipc sockets kiln expects and passes each connection's bytes through
unchanged (ZMTP does not care which stream it runs on; the messages stay
signed with the session's key end to end).

Interrupts: kiln interrupts a kernel with SIGINT, which would end Deno. The
kernel is started with SIGINT ignored, and the relay turns the signal into
the ``interrupt_request`` Deno's kernel implements (on its control
channel), which stops the running cell and keeps the session's variables.

The relay ends with the kernel (and the kernel with the relay: it gets
SIGKILL if the relay dies first), with the kernel's exit status.
"""

import asyncio
import datetime
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import uuid

CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
PR_SET_PDEATHSIG = 1


def free_ports(n):
    """``n`` distinct loopback ports nobody listens on now (the namespace
    is the session's own, so nothing else can take them in between)."""
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def child_setup():
    """In the kernel, before exec: ignore SIGINT (interrupts arrive as
    messages), and die with the relay."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class Interrupter:
    """Sends ``interrupt_request`` to the kernel's control channel."""

    def __init__(self, info, port):
        self.key = info["key"].encode()
        self.port = port
        self.session = uuid.uuid4().hex
        self.socket = None

    def send(self):
        import zmq

        if self.socket is None:
            self.socket = zmq.Context.instance().socket(zmq.DEALER)
            self.socket.linger = 0
            self.socket.connect(f"tcp://127.0.0.1:{self.port}")
        # Replies are not needed: drop what came back for earlier requests.
        while True:
            try:
                self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        header = {
            "msg_id": uuid.uuid4().hex,
            "session": self.session,
            "username": "kiln",
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "msg_type": "interrupt_request",
            "version": "5.3",
        }
        parts = [json.dumps(header).encode(), b"{}", b"{}", b"{}"]
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for p in parts:
            mac.update(p)
        self.socket.send_multipart([b"<IDS|MSG>", mac.hexdigest().encode(), *parts])


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def forwarder(port):
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return handle


async def listening(port):
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    w.close()
    return True


async def run(conn_file, argv):
    with open(conn_file) as f:
        info = json.load(f)
    ports = dict(zip(CHANNELS, free_ports(len(CHANNELS)), strict=True))
    tcp = dict(info, transport="tcp", ip="127.0.0.1", **ports)
    tcp_file = os.path.join(os.path.dirname(conn_file), "tcp-kernel.json")
    fd = os.open(tcp_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tcp, f)
    kernel = await asyncio.create_subprocess_exec(*argv, tcp_file, preexec_fn=child_setup)
    loop = asyncio.get_running_loop()
    interrupter = Interrupter(info, ports["control_port"])
    loop.add_signal_handler(signal.SIGINT, interrupter.send)
    # Bind kiln's sockets only once the kernel listens: kiln takes their
    # existence as the kernel being up.
    while kernel.returncode is None:
        if all([await listening(p) for p in ports.values()]):
            break
        await asyncio.sleep(0.01)
    servers = []
    if kernel.returncode is None:
        for name in CHANNELS:
            path = f"{info['ip']}-{info[name]}"
            servers.append(await asyncio.start_unix_server(forwarder(ports[name]), path=path))
    return await kernel.wait()


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: python -m kiln_kernel.relay CONNECTION_FILE -- KERNEL ARGV...")
    code = asyncio.run(run(sys.argv[1], sys.argv[3:]))
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
