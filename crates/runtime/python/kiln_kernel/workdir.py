"""The session's work directory as batch tests find it: a copy taken before
the first test of a runner call, put back after every test.

Each test of a batch item runs in a fork of the kernel, so it starts from the
kernel's memory as it was; but the work directory (``/work``) is one
filesystem that every fork shares. :class:`Snapshot` keeps what the directory
held before the tests: the tree (directories, symbolic links, FIFOs, with
their modes and modification times) in this process's memory, and the
regular files' bytes in one sealed memfd (``F_SEAL_WRITE``: no one, not even
a process that reopens it through ``/proc``, can change it). After each test,
and only once the test and every process it started are gone (the runner's
sweep), :meth:`Snapshot.restore` makes the directory match it again:

* every entry the snapshot does not have, or has as another kind, is
  removed, without following symbolic links and after giving back the
  owner's permissions to directories a test locked (``chmod 000``);
* every regular file is written anew from its memfd, as a new file (a test
  that kept a file open or mapped holds an unlinked one), with its mode and
  modification time;
* directories, links, FIFOs and sockets that still match keep their place (so a
  kernel whose cwd is a subdirectory stays in it) and get their mode back.

What is not kept: extended attributes, hard links between snapshot files
(each becomes a file of its own), and a socket file a test removed (one it
left in place stays; it cannot be made again). The copy is bounded: at most
:data:`MAX_BYTES` of file contents (and never more than the work directory's
own size limit) and :data:`MAX_ENTRIES` entries; past that the tests cannot
start from a copy and the runner says so instead of running them.
"""

import fcntl
import os
import stat

# The most file content a snapshot holds (kept in the kernel's memory, which
# the session's memory limit bounds), and the most entries.
MAX_BYTES = 256 << 20
MAX_ENTRIES = 100_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class TooLarge(Exception):
    """The work directory is larger than a snapshot may be."""


class _Budget:
    def __init__(self, max_bytes: int, root: str):
        self.bytes = 0
        self.entries = 0
        self.max_bytes = max_bytes
        self.root = root

    def take(self, size: int) -> None:
        self.bytes += size
        self.entries += 1
        if self.bytes > self.max_bytes:
            raise TooLarge(
                f"{self.root} holds more than {self.max_bytes >> 20} MiB of files; batch tests each "
                "start from a copy of it, which is limited to that size: keep the item's files smaller"
            )
        if self.entries > MAX_ENTRIES:
            raise TooLarge(
                f"{self.root} holds more than {MAX_ENTRIES} entries; batch tests each start from a "
                "copy of it, which is limited to that many: keep the item's files fewer"
            )


def _names(dir_fd: int) -> list:
    """The names in the directory at ``dir_fd``."""
    with os.scandir(dir_fd) as it:
        return [e.name for e in it]


def _unlocked(dir_fd: int, name: str, st: os.stat_result, need: int):
    """Open directory ``name`` (under ``dir_fd``) even when its mode denies
    its owner ``need``; the mode is put back by the caller."""
    if st.st_mode & need != need:
        os.chmod(name, stat.S_IMODE(st.st_mode) | need, dir_fd=dir_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _copy_in(dir_fd: int, name: str, st: os.stat_result, mem: int) -> tuple:
    """Append the bytes of regular file ``name`` (at most its size when it
    was listed) to ``mem``: their (offset, length) there."""
    locked = not st.st_mode & stat.S_IRUSR
    if locked:
        os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IRUSR, dir_fd=dir_fd)
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        if locked:
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    start = os.lseek(mem, 0, os.SEEK_CUR)
    try:
        left = st.st_size
        while left > 0:
            sent = os.sendfile(mem, src, None, min(left, 1 << 20))
            if sent == 0:
                break
            left -= sent
    finally:
        os.close(src)
    return (start, os.lseek(mem, 0, os.SEEK_CUR) - start)


def _take(dir_fd: int, budget: _Budget, mem: int) -> dict:
    """The tree under ``dir_fd``: name -> (kind, mode, mtime_ns, payload)."""
    tree = {}
    for name in _names(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            budget.take(0)
            sub = _unlocked(dir_fd, name, st, stat.S_IRWXU)
            try:
                tree[name] = ("d", mode, st.st_mtime_ns, _take(sub, budget, mem))
            finally:
                os.close(sub)
                os.chmod(name, mode, dir_fd=dir_fd)
        elif stat.S_ISREG(st.st_mode):
            budget.take(st.st_size)
            tree[name] = ("f", mode, st.st_mtime_ns, _copy_in(dir_fd, name, st, mem))
        elif stat.S_ISLNK(st.st_mode):
            budget.take(0)
            tree[name] = ("l", mode, st.st_mtime_ns, os.readlink(name, dir_fd=dir_fd))
        elif stat.S_ISFIFO(st.st_mode):
            budget.take(0)
            tree[name] = ("p", mode, st.st_mtime_ns, None)
        elif stat.S_ISSOCK(st.st_mode):
            # Kept where it is (a socket file cannot be made again).
            budget.take(0)
            tree[name] = ("s", mode, st.st_mtime_ns, None)
    return tree


def _remove(dir_fd: int, name: str, st: os.stat_result) -> None:
    """Remove ``name`` under ``dir_fd`` whatever it is, never following a
    link, unlocking the directories in it first."""
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    sub = _unlocked(dir_fd, name, st, stat.S_IRWXU)
    try:
        for inner in _names(sub):
            _remove(sub, inner, os.stat(inner, dir_fd=sub, follow_symlinks=False))
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dir_fd)


def empty(root: str) -> None:
    """Remove everything in ``root``, never following a link."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for name in _names(fd):
            _remove(fd, name, os.stat(name, dir_fd=fd, follow_symlinks=False))
    finally:
        os.close(fd)


def _write_out(dir_fd: int, name: str, mode: int, mtime: int, mem: int, where: tuple) -> None:
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        offset, size = where
        end = offset + size
        while offset < end:
            sent = os.sendfile(out, mem, offset, end - offset)
            if sent == 0:
                raise OSError(f"the copy of {name} ended early")
            offset += sent
        os.fchmod(out, mode)
        os.utime(out, ns=(mtime, mtime))
    finally:
        os.close(out)


def _restore(dir_fd: int, tree: dict, mem: int) -> None:
    """Make the directory at ``dir_fd`` (already unlocked) match ``tree``."""
    kept = set()
    for name in _names(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        want = tree.get(name)
        kind = want[0] if want else None
        if kind == "d" and stat.S_ISDIR(st.st_mode):
            sub = _unlocked(dir_fd, name, st, stat.S_IRWXU)
            try:
                _restore(sub, want[3], mem)
                os.utime(sub, ns=(want[2], want[2]))
            finally:
                os.close(sub)
            os.chmod(name, want[1], dir_fd=dir_fd)
            kept.add(name)
        elif kind == "l" and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dir_fd) == want[3]:
            kept.add(name)
        elif (kind == "p" and stat.S_ISFIFO(st.st_mode)) or (kind == "s" and stat.S_ISSOCK(st.st_mode)):
            os.chmod(name, want[1], dir_fd=dir_fd)
            kept.add(name)
        else:
            _remove(dir_fd, name, st)
    for name, (kind, mode, mtime, payload) in tree.items():
        if name in kept:
            continue
        if kind == "d":
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _restore(sub, payload, mem)
                os.utime(sub, ns=(mtime, mtime))
            finally:
                os.close(sub)
            os.chmod(name, mode, dir_fd=dir_fd)
        elif kind == "f":
            _write_out(dir_fd, name, mode, mtime, mem, payload)
        elif kind == "l":
            os.symlink(payload, name, dir_fd=dir_fd)
        elif kind == "p":
            os.mkfifo(name, mode, dir_fd=dir_fd)


class Snapshot:
    """The work directory at ``root`` as it is now; see the module's text."""

    def __init__(self, root: str):
        self.root = root
        # Every file's bytes, one after another, sealed once written.
        self._mem = os.memfd_create("kiln-work-snapshot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            fd = os.open(root, _DIR_FLAGS)
            try:
                st = os.fstat(fd)
                self._mode = stat.S_IMODE(st.st_mode)
                self._mtime = st.st_mtime_ns
                # A shared directory (``/tmp``, mode 1777) belongs to someone
                # else: its own mode and time are left as they are.
                self._own = st.st_uid == os.geteuid()
                vfs = os.fstatvfs(fd)
                size_limit = vfs.f_blocks * vfs.f_frsize or MAX_BYTES
                if self._own and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
                    os.fchmod(fd, self._mode | stat.S_IRWXU)
                try:
                    self._tree = _take(fd, _Budget(min(MAX_BYTES, size_limit), root), self._mem)
                finally:
                    if self._own:
                        os.fchmod(fd, self._mode)
            finally:
                os.close(fd)
            fcntl.fcntl(self._mem, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            self.close()
            raise

    def restore(self) -> None:
        """Make the work directory match the snapshot again."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            if self._own:
                os.fchmod(fd, self._mode | stat.S_IRWXU)
            _restore(fd, self._tree, self._mem)
            if self._own:
                os.utime(fd, ns=(self._mtime, self._mtime))
                os.fchmod(fd, self._mode)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
