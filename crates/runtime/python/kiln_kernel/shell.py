"""IPython's shell, adapted to this kernel and dressed as ipykernel's.

:class:`ZMQInteractiveShell` is IPython's ``InteractiveShell`` with the
kernel's display publisher and display hook (:mod:`kiln_kernel.display`),
errors published as ``error`` messages, the pager and ``set_next_input``
turned into reply payloads, and ipykernel's kernel magics. Everything it
shows goes out through the :class:`~kiln_kernel.publisher.Publisher` given
as its ``publisher`` trait, which it hands on to its display publisher and
display hook; its ``kernel`` trait is only for code that looks for
``get_ipython().kernel`` as under ipykernel.

The rest makes the kernel indistinguishable from ipykernel to code that
looks:

* :class:`XCachingCompiler` gives each cell's code the file name ipykernel
  gives it (``<tmp>/ipykernel_<pid>/<murmur2 hash>.py``), which tracebacks
  show;
* :func:`register_compat_modules` exposes the shell class as
  ``ipykernel.zmqshell.ZMQInteractiveShell`` without importing ipykernel
  (tqdm.auto and plotly detect notebooks that way);
* :func:`adopt_ipykernel_input` compiles ipykernel's own ``raw_input`` and
  ``getpass`` source under its file name when ipykernel is installed, so the
  ``input()`` traceback is identical.
"""

from __future__ import annotations

import logging
import os
import sys

from IPython.core import page
from IPython.core.autocall import ZMQExitAutocall
from IPython.core.compilerop import CachingCompiler
from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.interactiveshell import InteractiveShell, InteractiveShellABC
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.utils import openpy

from .display import ZMQDisplayPublisher, ZMQShellDisplayHook

log = logging.getLogger("kiln_kernel")

# ---------------------------------------------------------------------------
# Compiler: same cell file names as ipykernel's XCachingCompiler
# ---------------------------------------------------------------------------


def murmur2_x86(data, seed):
    """MurmurHash2 (x86, 32 bits) of ``data``, as ``ipykernel.compiler`` computes it."""
    m = 0x5BD1E995
    data = data.encode("utf8")
    length = len(data)
    h = seed ^ length
    rounded_end = length & 0xFFFFFFFC
    for i in range(0, rounded_end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    val = length & 0x03
    k = 0
    if val == 3:
        k = data[rounded_end + 2] << 16
    if val in (2, 3):
        k |= data[rounded_end + 1] << 8
    if val in (1, 2, 3):
        k |= data[rounded_end]
        h ^= k
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


class XCachingCompiler(CachingCompiler):
    """Names each cell's code ``<tmp>/ipykernel_<pid>/<hash>.py`` (or
    ``$IPYKERNEL_CELL_NAME``) as ipykernel does: tracebacks show the name."""

    def get_code_name(self, raw_code, code, number):
        cell_name = os.environ.get("IPYKERNEL_CELL_NAME")
        if cell_name is None:
            import tempfile

            d = tempfile.gettempdir() + os.sep + "ipykernel_" + str(os.getpid())
            cell_name = d + os.sep + str(murmur2_x86(raw_code, 0xC70F6907)) + ".py"
        return cell_name


# ---------------------------------------------------------------------------
# Shell
# ---------------------------------------------------------------------------


@magics_class
class KernelMagics(Magics):
    """The subset of ipykernel's KernelMagics that makes sense here."""

    @line_magic
    def clear(self, arg_s):
        """Clear the terminal."""
        self.shell.system("clear")

    @line_magic
    def less(self, arg_s):
        """Show a file through the pager.

        Files ending in .py are syntax-highlighted."""
        if not arg_s:
            raise UsageError("Missing filename.")
        if arg_s.endswith(".py"):
            cont = self.shell.pycolorize(openpy.read_py_file(arg_s, skip_encoding_cookie=False))
        else:
            with open(arg_s) as fid:
                cont = fid.read()
        page.page(cont)

    more = line_magic("more")(less)

    @line_magic
    def man(self, arg_s):
        """Find the man page for the given command and display in pager."""
        page.page(self.shell.getoutput(f"man {arg_s} | col -b", split=False))


def _default_banner():
    from IPython.core.usage import default_banner

    return default_banner


class ZMQInteractiveShell(InteractiveShell):
    """InteractiveShell publishing over the kernel's iopub socket.

    Named like ipykernel's class on purpose, and registered under the module
    name ``ipykernel.zmqshell`` (see :func:`register_compat_modules`):
    libraries detect notebooks by the shell's class name (many), its module
    (plotly) or ``'ipykernel.zmqshell' in sys.modules`` (tqdm.auto).
    """

    from traitlets import Any as _Any, CBool as _CBool, Instance as _Instance, Type as _Type, default as _default

    displayhook_class = _Type(ZMQShellDisplayHook)
    display_pub_class = _Type(ZMQDisplayPublisher)
    kernel = _Any()
    publisher = _Any()
    readline_use = _CBool(False)
    autoindent = _CBool(False)
    exiter = _Instance(ZMQExitAutocall)
    keepkernel_on_exit = None

    @_default("exiter")
    def _default_exiter(self):
        return ZMQExitAutocall(self)

    @_default("banner1")
    def _default_banner1(self):
        return _default_banner()

    del _Any, _CBool, _Instance, _Type, _default

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Same tqdm workaround as ipykernel (tqdm checks for IPKernelApp).
        if "IPKernelApp" not in self.config:
            self.config.IPKernelApp.tqdm = "dummy value for https://github.com/tqdm/tqdm/pull/1628"
        self._last_traceback = None
        self._last_traceback_during_displayhook = False

    def enable_gui(self, gui=None):
        # A GUI event loop needs a loop to integrate with; this kernel's is
        # a blocking zmq poll. Only inline backends (matplotlib-inline) work.
        if gui in (None, "inline"):
            self.active_eventloop = gui
            return
        raise UsageError(f"GUI event loop {gui!r} is not supported by this kernel")

    def init_environment(self):
        env = os.environ
        env["TERM"] = "xterm-color"
        env["CLICOLOR"] = "1"
        env["FORCE_COLOR"] = "1"
        env["CLICOLOR_FORCE"] = "1"
        env["PAGER"] = "cat"
        env["GIT_PAGER"] = "cat"

    def payloadpage_page(self, strg, start=0, screen_lines=0, pager_cmd=None):
        start = max(0, start)
        data = strg if isinstance(strg, dict) else {"text/plain": strg}
        self.payload_manager.write_payload(dict(source="page", data=data, start=start))

    def init_display_pub(self):
        super().init_display_pub()
        self.display_pub.publisher = self.publisher

    def init_displayhook(self):
        super().init_displayhook()
        self.displayhook.publisher = self.publisher

    def init_hooks(self):
        super().init_hooks()
        self.set_hook("show_in_pager", page.as_hook(self.payloadpage_page), 99)

    def init_data_pub(self):
        pass  # the data publisher, deprecated outside IPython parallel: not offered

    def init_virtualenv(self):
        pass  # as ipykernel: the kernel's own interpreter, not a $VIRTUAL_ENV

    def init_magics(self):
        super().init_magics()
        self.register_magics(KernelMagics)
        self.magics_manager.register_alias("ed", "edit")

    def ask_exit(self):
        self.exit_now = not self.keepkernel_on_exit
        self.payload_manager.write_payload(dict(source="ask_exit", keepkernel=self.keepkernel_on_exit))

    def run_cell(self, *args, **kwargs):
        self._last_traceback = None
        self._last_traceback_during_displayhook = False
        return super().run_cell(*args, **kwargs)

    def _showtraceback(self, etype, evalue, stb):
        # An error raised while the display hook formats a result fails the
        # cell although run_cell reports success: execute_request checks
        # _last_traceback_during_displayhook, as ipykernel does.
        p = self.publisher
        p.flush_streams()
        content = {"traceback": stb, "ename": str(etype.__name__), "evalue": str(evalue)}
        dh = self.displayhook
        if getattr(dh, "msg", None) is not None:
            self._last_traceback_during_displayhook = True
        p.send("error", content, p.topic_error)
        self._last_traceback = stb

    def set_next_input(self, text, replace=False):
        self.payload_manager.write_payload(dict(source="set_next_input", text=text, replace=replace))

    @property
    def parent_header(self):
        return self.publisher.parent_header if self.publisher else {}

    def set_parent(self, parent):
        pass

    def get_parent(self):
        return self.publisher.parent if self.publisher else {}

    def system_piped(self, cmd):
        if cmd.rstrip().endswith("&"):
            raise OSError("Background processes not supported.")
        from IPython.utils._process_posix import system

        exit_code = system(self.var_expand(cmd, depth=1))
        self.user_ns["_exit_code"] = exit_code
        if getattr(self, "system_raise_on_error", False) and exit_code != 0:
            from subprocess import CalledProcessError

            raise CalledProcessError(exit_code, cmd)

    system = system_piped


InteractiveShellABC.register(ZMQInteractiveShell)


# ---------------------------------------------------------------------------
# Compatibility with ipykernel
# ---------------------------------------------------------------------------


def register_compat_modules():
    """Expose our shell as ``ipykernel.zmqshell.ZMQInteractiveShell`` (without
    importing ipykernel) so notebook detection in third-party code sees a
    Jupyter kernel: tqdm.auto checks ``'ipykernel.zmqshell' in sys.modules``,
    plotly checks ``type(get_ipython()).__module__.startswith('ipykernel.')``.
    """
    import types

    if "ipykernel.zmqshell" in sys.modules:
        return
    mod = types.ModuleType("ipykernel.zmqshell", "kiln_kernel compatibility alias")
    mod.ZMQInteractiveShell = ZMQInteractiveShell
    mod.ZMQDisplayPublisher = ZMQDisplayPublisher
    mod.KernelMagics = KernelMagics
    sys.modules["ipykernel.zmqshell"] = mod
    ZMQInteractiveShell.__module__ = "ipykernel.zmqshell"


def adopt_ipykernel_input(kernel_class):
    """Use ipykernel's own ``Kernel.raw_input``/``Kernel.getpass`` source, compiled
    under ipykernel's file name and line numbers, when ipykernel is installed.

    ``input()`` with allow_stdin=False raises from inside these methods, so the
    traceback a user sees shows that frame; compiling the very same source at
    the very same location makes the traceback byte-identical to ipykernel's
    (IPython reads the displayed lines from that file). ipykernel is not
    imported. Falls back silently to our equivalent methods.

    The adopted functions replace the methods of ``kernel_class``
    (:class:`kiln_kernel.kernel.Kernel`), which provides the names their
    bodies use (``_input_request``, ``_shell_parent_ident``, ...).
    """
    try:
        import importlib.util

        spec = importlib.util.find_spec("ipykernel")
        if spec is None or not spec.submodule_search_locations:
            return
        path = os.path.join(next(iter(spec.submodule_search_locations)), "kernelbase.py")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        ns = {"StdinNotImplementedError": StdinNotImplementedError, "t": __import__("typing")}
        for name in ("raw_input", "getpass"):
            start = next(i for i, line in enumerate(lines) if line.startswith(f"    def {name}("))
            end = start + 1
            while end < len(lines) and not (
                lines[end].startswith("    def ") or lines[end].startswith("    @")
                or (lines[end] and not lines[end].startswith(" "))
            ):
                end += 1
            # Blank lines first, so that every line compiles at its line
            # number in kernelbase.py (the class line takes the one before).
            src = "\n" * (start - 1) + "class Kernel:\n" + "\n".join(lines[start:end]) + "\n"
            code = compile(src, path, "exec")
            exec(code, ns)
            fn = ns["Kernel"].__dict__[name]
            # Only a body that asks through _input_request, as ours does: a
            # future ipykernel may do it otherwise, then we keep our method.
            if "_input_request" not in fn.__code__.co_names:
                continue
            setattr(kernel_class, name, fn)
    except Exception:
        log.debug("could not adopt ipykernel's raw_input", exc_info=True)
