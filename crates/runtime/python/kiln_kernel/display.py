"""Rich output on iopub: displays, cell results and comms.

IPython hands ``display()``, ``update_display()`` and ``clear_output()`` to
:class:`ZMQDisplayPublisher` and a cell's value (``Out[n]``) to
:class:`ZMQShellDisplayHook`; they publish ``display_data``,
``update_display_data``, ``clear_output`` and ``execute_result``. Both flush
the standard streams first, so that text printed before a display arrives
before it, and both offer ipykernel's ``register_hook``: a hook sees each
message before it is sent and may change or swallow it.

Neither keeps a parent message of its own (``set_parent`` does nothing): with
one thread and one request at a time, the parent is always the kernel's
current request.

:func:`install_comm` gives the ``comm`` package (ipywidgets, tqdm.auto, ...)
a Comm class that publishes through the running kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher

from .streams import flush_std
from .wire import MessageHooks

if TYPE_CHECKING:
    from .kernel import Kernel


class ZMQDisplayPublisher(MessageHooks, DisplayPublisher):
    """Publishes display_data / update_display_data / clear_output on iopub."""

    topic = b"display_data"
    kernel = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hooks = []

    def set_parent(self, parent):
        pass

    @property
    def parent_header(self):
        return self.kernel.parent_header if self.kernel else {}

    def _send(self, msg_type, content):
        k = self.kernel
        content = self._run_hooks(k.session, msg_type, content, k.parent_header)
        if content is None:
            return
        k.session.send(k.iopub, msg_type, content, k.parent_raw, idents=(self.topic,))

    def publish(self, data, metadata=None, *, transient=None, update=False, **kwargs):
        flush_std()
        if metadata is None:
            metadata = {}
        if transient is None:
            transient = {}
        self._validate_data(data, metadata)
        content = {"data": data, "metadata": metadata, "transient": transient}
        self._send("update_display_data" if update else "display_data", content)

    def clear_output(self, wait=False):
        flush_std()
        self._send("clear_output", {"wait": wait})


class ZMQShellDisplayHook(MessageHooks, DisplayHook):
    """Publishes execute_result on iopub."""

    kernel = None
    topic = None
    msg = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hooks = []

    def set_parent(self, parent):
        pass

    @property
    def parent_header(self):
        return self.kernel.parent_header if self.kernel else {}

    def start_displayhook(self):
        self.msg = {"data": {}, "metadata": {}}

    def write_output_prompt(self):
        if self.msg is not None:
            self.msg["execution_count"] = self.prompt_count

    def write_format_data(self, format_dict, md_dict=None):
        if self.msg is not None:
            self.msg["data"] = format_dict
            self.msg["metadata"] = md_dict

    def finish_displayhook(self):
        flush_std()
        content = self.msg
        self.msg = None
        if content and content["data"] and self.kernel is not None:
            k = self.kernel
            content = self._run_hooks(k.session, "execute_result", content, k.parent_header)
            if content is None:
                return
            k.session.send(k.iopub, "execute_result", content, k.parent_raw, idents=(self.topic,))


# ---------------------------------------------------------------------------
# comm (ipywidgets, tqdm.auto, ...)
# ---------------------------------------------------------------------------

# The kernel whose main() is running, set and cleared by kiln_kernel.kernel.main.
# Comms publish only through it: the comm manager is installed when the shell
# is built, which in kiln's zygote is before the kernel has a connection.
_kernel: "Kernel | None" = None


def install_comm(kernel):
    """Make ``comm.create_comm``/``comm.get_comm_manager`` use this kernel;
    returns the comm manager."""
    import comm
    import comm.base_comm

    class Comm(comm.base_comm.BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            k = _kernel
            if k is None or k.iopub is None:
                return
            data = {} if data is None else data
            metadata = {} if metadata is None else metadata
            content = dict(data=data, comm_id=self.comm_id, **keys)
            k.session.send(k.iopub, msg_type, content, k.parent_raw, idents=(self.topic,),
                           metadata=metadata, buffers=buffers)

    Comm.kernel = kernel

    class CommManager(comm.base_comm.CommManager):
        pass

    manager = CommManager()
    comm.create_comm = lambda *a, **kw: Comm(*a, **kw)
    comm.get_comm_manager = lambda *a, **kw: manager
    return manager
