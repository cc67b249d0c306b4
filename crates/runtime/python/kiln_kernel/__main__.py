"""``python -m kiln_kernel -f /path/kernel.json``

Accepts (and ignores) ipykernel-style ``--Foo.bar=baz`` options so that the
command line can be swapped for ``-m ipykernel_launcher`` one for one.
"""

import sys


def _connection_file(argv):
    for i, arg in enumerate(argv):
        if arg == "-f" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--f="):
            return arg[4:]
        if arg.startswith("-f="):
            return arg[3:]
    return None


def run():
    path = _connection_file(sys.argv[1:])
    if path is None:
        sys.stderr.write("usage: python -m kiln_kernel -f CONNECTION_FILE\n")
        raise SystemExit(2)
    from kiln_kernel.kernel import main

    main(path)


if __name__ == "__main__":
    run()
