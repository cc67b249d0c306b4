"""kiln_kernel: a lean, single-threaded Jupyter kernel for Python.

It runs IPython's InteractiveShell behind a synchronous Jupyter-protocol loop
on pyzmq, producing the same messages as ipykernel for the features kiln uses
while answering trivial cells several times faster. See ``kernel.py``.

Nothing heavy is imported here: ``import kiln_kernel`` is free.
"""


def zygote_run():
    """``python -m kiln_kernel`` in a process forked by kiln's zygote, which
    imported the kernel (and this package's ``__main__``, as a plain module)
    before forking: the same as running the package, without runpy looking
    the module up again, reading its code and building a fresh module (a
    millisecond and a half of copied pages in every new kernel)."""
    from .__main__ import run

    run()
