"""kiln_kernel: a lean, single-threaded Jupyter kernel for Python.

It runs IPython's InteractiveShell behind a synchronous Jupyter-protocol loop
on pyzmq, producing the same messages as ipykernel for the features kiln uses
while answering trivial cells several times faster. See ``kernel.py``.

Nothing heavy is imported here: ``import kiln_kernel`` is free.
"""
