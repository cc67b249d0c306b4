"""A cell run in a process forked from the kernel, its outputs recorded.

A batch item in a lane (``judge.item``) runs its code as a cell, not in the
lane's kernel, whose memory holds earlier items, but in a fork of the lane's
image server (itself a fork of the kernel made before any item). There the
cell runs as the kernel would run it, through the same shell, display
publisher, display hook and standard streams (text written at the level of
file descriptors 1 and 2 included, in order), under the same output cap;
but every message the kernel would send on iopub is kept instead, for the
server, which turns them into the item's outputs as it turns iopub messages
(``crates/kernel``, ``collect.rs``).
"""

import builtins
import getpass
import os
import signal
import sys

from .streams import FdCapture, OutStream


class _Recording:
    """Stands in for the kernel's wire session (and its iopub socket):
    keeps the type and content of every message it is given."""

    def __init__(self):
        self.messages = []

    def send(self, sock, msg_type, content, parent=None, idents=(), metadata=None, buffers=None):
        self.messages.append([msg_type, content])

    def header(self, msg_type):
        return {"msg_type": msg_type}


def _as_a_first_cell(shell) -> None:
    """The shell's count and input history as a fresh kernel's before its
    first cell: the lane's kernel ran its own cell before this process was
    forked (``judge.image_server``), which a session's code would otherwise
    see in ``In`` and ``_i1`` and in its tracebacks' ``Cell In[2]``."""
    hm = shell.history_manager
    for n in range(1, max(shell.execution_count, len(hm.input_hist_parsed)) + 1):
        shell.user_ns.pop(f"_i{n}", None)
    hm.input_hist_parsed[:] = [""]
    hm.input_hist_raw[:] = [""]
    hm._i00 = hm._i = hm._ii = hm._iii = ""
    shell.user_ns.update({"_i": "", "_ii": "", "_iii": ""})
    shell.execution_count = 1


def run_cell(shell, code: str, limit: float, output_limit: int) -> dict:
    """Run ``code`` as the kernel's next cell in this process (a fork of
    the kernel, which no other process will publish from): returns
    ``{"messages": [[msg_type, content], ...], "timed_out": bool}``. At
    ``limit`` seconds the cell is interrupted (``KeyboardInterrupt``), as
    kiln interrupts a kernel's cell at its time limit."""
    pub = shell.publisher
    recording = _Recording()
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass
    pub.session = recording
    pub.socket = recording  # "connected": the publisher sends only then
    pub.budget.limit = output_limit
    pub.budget.reset()
    # As the kernel wires its streams (kernel.main): fd-level text too.
    captures = (FdCapture(1, "stdout"), FdCapture(2, "stderr"))
    # A kernel echoes fd-level text to its log; here it goes nowhere: this
    # process's own stdout and stderr report its last assertion (judge.py).
    null = os.open(os.devnull, os.O_WRONLY)
    for capture in captures:
        os.dup2(null, capture.orig, inheritable=False)
    os.close(null)
    out = OutStream(pub, "stdout", captures[0])
    err = OutStream(pub, "stderr", captures[1])
    sys.stdout, sys.stderr = out, err
    pub.streams = (out, err)
    _as_a_first_cell(shell)
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        # input() and getpass() answer as in a batch item's session: the
        # client takes no input requests.
        kernel._allow_stdin = False
        builtins.input = kernel.raw_input
        getpass.getpass = kernel.getpass
    fired = []

    def alarm(signum, frame):
        fired.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(limit, 0.001))
        try:
            shell.run_cell(code, store_history=True, silent=False)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        pass  # the limit came outside the cell's code (the shell shows it inside)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    with pub.lock:
        pub.flush_streams()
    return {"messages": recording.messages, "timed_out": bool(fired)}
