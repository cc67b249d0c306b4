"""Rich output on iopub: displays, cell results and comms.

IPython hands ``display()``, ``update_display()`` and ``clear_output()`` to
:class:`ZMQDisplayPublisher` and a cell's value (``Out[n]``) to
:class:`ZMQShellDisplayHook`; they publish ``display_data``,
``update_display_data``, ``clear_output`` and ``execute_result`` through the
kernel's :class:`~kiln_kernel.publisher.Publisher`, which the shell hands
them when it builds them. Both flush the standard streams first, so that
text printed before a display arrives before it, and both offer ipykernel's
``register_hook``: a hook sees each message before it is sent and may change
or swallow it.

Neither keeps a parent message of its own (``set_parent`` does nothing): with
one thread and one request at a time, the parent is always the publisher's
current request.

:func:`install_comm` gives the ``comm`` package (ipywidgets, tqdm.auto, ...)
a Comm class that publishes through the same publisher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher

from .publisher import HookChannel

if TYPE_CHECKING:
    from .publisher import Publisher


class ZMQDisplayPublisher(HookChannel, DisplayPublisher):
    """Publishes display_data / update_display_data / clear_output on iopub."""

    topic = b"display_data"
    hook_channel = "display"

    def set_parent(self, parent):
        pass

    @property
    def parent_header(self):
        return self.publisher.parent_header if self.publisher else {}

    def publish(self, data, metadata=None, *, transient=None, update=False, **kwargs):
        p = self.publisher
        p.flush_streams()
        if metadata is None:
            metadata = {}
        if transient is None:
            transient = {}
        self._validate_data(data, metadata)
        content = {"data": data, "metadata": metadata, "transient": transient}
        p.rich("display", "update_display_data" if update else "display_data", content, self.topic)

    def clear_output(self, wait=False):
        p = self.publisher
        p.flush_streams()
        p.clear_output(wait)


class ZMQShellDisplayHook(HookChannel, DisplayHook):
    """Publishes execute_result on iopub."""

    hook_channel = "execute_result"
    msg = None

    def set_parent(self, parent):
        pass

    @property
    def parent_header(self):
        return self.publisher.parent_header if self.publisher else {}

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
        p = self.publisher
        p.flush_streams()
        content = self.msg
        self.msg = None
        if content and content["data"]:
            p.rich("execute_result", "execute_result", content, p.topic_execute_result)


# ---------------------------------------------------------------------------
# comm (ipywidgets, tqdm.auto, ...)
# ---------------------------------------------------------------------------


def install_comm(publisher: Publisher, kernel=None):
    """Make ``comm.create_comm``/``comm.get_comm_manager`` publish through
    ``publisher`` (comms are created before the kernel has a connection in
    kiln's zygote: they send once it has one); returns the comm manager.
    ``kernel`` is what ipykernel's comms expose as ``Comm.kernel``."""
    import comm
    import comm.base_comm

    class Comm(comm.base_comm.BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            data = {} if data is None else data
            metadata = {} if metadata is None else metadata
            content = dict(data=data, comm_id=self.comm_id, **keys)
            publisher.send(msg_type, content, self.topic, metadata=metadata, buffers=buffers)

    Comm.kernel = kernel

    class CommManager(comm.base_comm.CommManager):
        pass

    manager = CommManager()
    comm.create_comm = lambda *a, **kw: Comm(*a, **kw)
    comm.get_comm_manager = lambda *a, **kw: manager
    return manager
