"""The kernel's simple requests: every message type but ``execute_request``.

:class:`RequestHandlers` is a base class of :class:`kiln_kernel.kernel.Kernel`.
Its ``handlers`` table maps a message type to a function ``(kernel, socket,
idents, msg)`` that sends the one reply; the kernel's loop wraps each call in
``busy``/``idle`` status messages. Introspection (``complete``, ``inspect``,
``is_complete``, ``history``) asks IPython's shell the way ipykernel's
``IPythonKernel`` does, so the replies match; comm messages go to the comm
manager (:func:`kiln_kernel.display.install_comm`).

``kernel_info_reply`` lists no ``supported_features``: this kernel has
neither the debugger nor subshells.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import ClassVar

from IPython.core import release

from .wire import PROTOCOL_VERSION

HELP_LINKS = [
    {"text": "Python Reference", "url": f"https://docs.python.org/{sys.version_info[0]}.{sys.version_info[1]}"},
    {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
    {"text": "NumPy Reference", "url": "https://docs.scipy.org/doc/numpy/reference/"},
    {"text": "SciPy Reference", "url": "https://docs.scipy.org/doc/scipy/reference/"},
    {"text": "Matplotlib Reference", "url": "https://matplotlib.org/contents.html"},
    {"text": "SymPy Reference", "url": "http://docs.sympy.org/latest/index.html"},
    {"text": "pandas Reference", "url": "https://pandas.pydata.org/pandas-docs/stable/"},
]

LANGUAGE_INFO = {
    "name": "python",
    "version": sys.version.split()[0],
    "mimetype": "text/x-python",
    "codemirror_mode": {"name": "ipython", "version": sys.version_info[0]},
    "pygments_lexer": "ipython3",
    "nbconvert_exporter": "python",
    "file_extension": ".py",
}


class RequestHandlers:
    """Handlers for the requests answered by one reply (see the module docstring)."""

    def kernel_info_request(self, sock, idents, msg):
        content = {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "implementation": "ipython",
            "implementation_version": release.version,
            "language_info": LANGUAGE_INFO,
            "banner": self.shell.banner,
            "help_links": HELP_LINKS,
            "supported_features": [],
        }
        self.reply(sock, idents, msg, "kernel_info_reply", content)

    def connect_request(self, sock, idents, msg):
        content = {k: self.conn[k] for k in
                   ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
        content["status"] = "ok"
        self.reply(sock, idents, msg, "connect_reply", content)

    def shutdown_request(self, sock, idents, msg):
        self.shell.exit_now = True
        content = {"status": "ok", "restart": msg["content"].get("restart", False)}
        self.reply(sock, idents, msg, "shutdown_reply", content)
        p = self.publisher
        p.send("shutdown_reply", content, p.topic_shutdown, parent=msg["_raw_header"])
        self.running = False

    def interrupt_request(self, sock, idents, msg):
        # Only ever handled between cells: a running cell holds the loop (kiln
        # interrupts one by signalling the process group itself). The kernel
        # ignores SIGINT while idle, so, as under ipykernel, this reaches
        # only other processes of its group.
        content = {"status": "ok"}
        try:
            pid = os.getpid()
            pgid = os.getpgid(pid)
            if pgid and pgid == pid:
                os.killpg(pgid, signal.SIGINT)
            else:
                os.kill(pid, signal.SIGINT)
        except OSError as err:
            import traceback

            content = {"status": "error", "traceback": traceback.format_stack(),
                       "ename": type(err).__name__, "evalue": str(err)}
        self.reply(sock, idents, msg, "interrupt_reply", content)

    def is_complete_request(self, sock, idents, msg):
        status, indent = self.shell.input_transformer_manager.check_complete(msg["content"]["code"])
        r = {"status": status}
        if status == "incomplete":
            r["indent"] = " " * indent
        self.reply(sock, idents, msg, "is_complete_reply", r)

    def complete_request(self, sock, idents, msg):
        from IPython.core.completer import provisionalcompleter, rectify_completions

        code = msg["content"]["code"]
        cursor_pos = msg["content"].get("cursor_pos")
        if cursor_pos is None:
            cursor_pos = len(code)
        with provisionalcompleter():
            raw = self.shell.Completer.completions(code, cursor_pos)
            completions = list(rectify_completions(code, raw))
            comps = [dict(start=c.start, end=c.end, text=c.text, type=c.type,
                          signature=c.signature) for c in completions]
        if completions:
            s, e = completions[0].start, completions[0].end
            matches = [c.text for c in completions]
        else:
            s = e = cursor_pos
            matches = []
        content = {"matches": matches, "cursor_end": e, "cursor_start": s,
                   "metadata": {"_jupyter_types_experimental": comps}, "status": "ok"}
        self.reply(sock, idents, msg, "complete_reply", content)

    def inspect_request(self, sock, idents, msg):
        from IPython.utils.tokenutil import token_at_cursor

        c = msg["content"]
        name = token_at_cursor(c["code"], c["cursor_pos"])
        reply = {"status": "ok", "data": {}, "metadata": {}}
        try:
            bundle = self.shell.object_inspect_mime(
                name, detail_level=c.get("detail_level", 0),
                omit_sections=set(c.get("omit_sections", [])))
            reply["data"].update(bundle)
            if not self.shell.enable_html_pager:
                reply["data"].pop("text/html")
            reply["found"] = True
        except KeyError:
            reply["found"] = False
        self.reply(sock, idents, msg, "inspect_reply", reply)

    def history_request(self, sock, idents, msg):
        c = msg["content"]
        hm = self.shell.history_manager
        t = c.get("hist_access_type")
        output, raw = c.get("output", False), c.get("raw", False)
        if t == "tail":
            hist = hm.get_tail(c.get("n"), raw=raw, output=output, include_latest=True)
        elif t == "range":
            hist = hm.get_range(c.get("session", 0), c.get("start", 0), c.get("stop"),
                                raw=raw, output=output)
        elif t == "search":
            hist = hm.search(c.get("pattern"), raw=raw, output=output, n=c.get("n"),
                             unique=c.get("unique", False))
        else:
            hist = []
        self.reply(sock, idents, msg, "history_reply", {"status": "ok", "history": list(hist)})

    def comm_info_request(self, sock, idents, msg):
        target = msg["content"].get("target_name")
        comms = {k: dict(target_name=v.target_name) for k, v in self.comm_manager.comms.items()
                 if target is None or v.target_name == target}
        self.reply(sock, idents, msg, "comm_info_reply", {"comms": comms, "status": "ok"})

    handlers: ClassVar[dict] = {
        "kernel_info_request": kernel_info_request,
        "connect_request": connect_request,
        "shutdown_request": shutdown_request,
        "interrupt_request": interrupt_request,
        "is_complete_request": is_complete_request,
        "complete_request": complete_request,
        "inspect_request": inspect_request,
        "history_request": history_request,
        "comm_info_request": comm_info_request,
        "comm_open": lambda self, s, i, m: self.comm_manager.comm_open(s, i, m),
        "comm_msg": lambda self, s, i, m: self.comm_manager.comm_msg(s, i, m),
        "comm_close": lambda self, s, i, m: self.comm_manager.comm_close(s, i, m),
    }
