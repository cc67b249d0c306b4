"""System V IPC objects a batch test left behind, removed after it.

A shared memory segment, a semaphore set or a message queue outlives the
process that made it: it belongs to the IPC namespace, which is the
session's (kiln's sandbox makes one per session). A test could leave one for
the next test, or the next item, to find. After each test the runner
removes every object that was not there before it (``IPC_RMID``, which the
test's user may do to what it made). POSIX message queues, which cannot be
listed without a filesystem the sandbox does not mount, cannot be opened by
a test at all (guard.py). Objects that were there before the test (made by
the session's own code) stay.
"""

from .guard import _LIBC  # the C library, loaded once

_IPC_RMID = 0
_TABLES = ("shm", "sem", "msg")


def objects() -> set:
    """The namespace's objects now: (kind, id) pairs, from /proc/sysvipc."""
    out = set()
    for kind in _TABLES:
        try:
            with open(f"/proc/sysvipc/{kind}", "rb") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 1 and fields[1].isdigit():
                out.add((kind, int(fields[1])))
    return out


def remove_new(before: set) -> list:
    """Remove every object that is not in ``before``; those it could not
    remove (not the runner's user's to remove), as (kind, id) pairs."""
    left = []
    if _LIBC is None:
        return left
    for kind, ident in sorted(objects() - before):
        if kind == "shm":
            rc = _LIBC.shmctl(ident, _IPC_RMID, None)
        elif kind == "sem":
            rc = _LIBC.semctl(ident, 0, _IPC_RMID)
        else:
            rc = _LIBC.msgctl(ident, _IPC_RMID, None)
        if rc != 0:
            left.append((kind, ident))
    return left
