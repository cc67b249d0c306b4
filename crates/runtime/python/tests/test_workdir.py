"""The work directory batch tests start from (kiln_kernel.workdir, and the
runner putting it back after every test), outside any kernel or sandbox:
files created, changed and deleted by one test are undone before the next,
whatever a hostile test leaves behind.
"""

import base64
import contextlib
import io
import json
import os
import stat
import tempfile
import unittest

from kiln_kernel import judge, workdir


def tree(root):
    """Everything under ``root``: path -> (kind, mode, content or target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), f.read())
    return out


def check(codes, timeout=5):
    b64 = base64.b64encode(json.dumps({"codes": codes, "timeout": timeout}).encode()).decode()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        judge.check(b64)
    return [json.loads(line[len(judge.MARKER) :]) for line in out.getvalue().splitlines()]


class WorkDirTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.root = self.dir.name
        os.makedirs(os.path.join(self.root, "data/deep"))
        with open(os.path.join(self.root, "data/input.txt"), "w") as f:
            f.write("original\n")
        with open(os.path.join(self.root, "data/deep/big.bin"), "wb") as f:
            f.write(os.urandom(3 << 20))
        os.chmod(os.path.join(self.root, "data/input.txt"), 0o640)
        os.symlink("data/input.txt", os.path.join(self.root, "link"))
        self.before = tree(self.root)
        self.cwd = os.getcwd()
        os.chdir(os.path.join(self.root, "data"))
        judge.WORK_DIR = self.root

    def tearDown(self):
        judge.WORK_DIR = None
        os.chdir(self.cwd)
        for dirpath, dirs, _ in os.walk(self.root):
            for d in dirs:
                try:
                    os.chmod(os.path.join(dirpath, d), 0o700)
                except OSError:
                    pass
        self.dir.cleanup()

    def test_a_snapshot_puts_back_created_changed_and_deleted_files(self):
        snap = workdir.Snapshot(self.root)
        try:
            with open(os.path.join(self.root, "data/input.txt"), "a") as f:
                f.write("changed\n")
            os.utime(os.path.join(self.root, "data/input.txt"), (0, 0))
            os.unlink(os.path.join(self.root, "data/deep/big.bin"))
            with open(os.path.join(self.root, "new.txt"), "w") as f:
                f.write("new")
            os.makedirs(os.path.join(self.root, "made/in/test"))
            snap.restore()
            self.assertEqual(tree(self.root), self.before)
        finally:
            snap.close()

    def test_hostile_leftovers_are_undone_without_following_links(self):
        outside = tempfile.TemporaryDirectory()
        victim = os.path.join(outside.name, "victim")
        with open(victim, "w") as f:
            f.write("keep me")
        snap = workdir.Snapshot(self.root)
        try:
            # A directory of the snapshot replaced by a link out of the work
            # directory; a link at a file's place; locked directories.
            os.rename(os.path.join(self.root, "data/deep"), os.path.join(self.root, "moved"))
            os.symlink(outside.name, os.path.join(self.root, "data/deep"))
            os.unlink(os.path.join(self.root, "data/input.txt"))
            os.symlink(victim, os.path.join(self.root, "data/input.txt"))
            os.makedirs(os.path.join(self.root, "locked/inner"))
            open(os.path.join(self.root, "locked/inner/f"), "w").close()
            os.chmod(os.path.join(self.root, "locked/inner"), 0)
            os.chmod(os.path.join(self.root, "locked"), 0)
            os.chmod(os.path.join(self.root, "data"), 0)
            os.mkfifo(os.path.join(self.root, "fifo"))
            snap.restore()
            self.assertEqual(tree(self.root), self.before)
            with open(victim) as f:
                self.assertEqual(f.read(), "keep me")
            self.assertEqual(os.listdir(outside.name), ["victim"])
        finally:
            snap.close()
            outside.cleanup()

    def test_a_socket_the_item_left_stays_and_one_a_test_made_goes(self):
        import socket

        kept = socket.socket(socket.AF_UNIX)
        kept.bind(os.path.join(self.root, "server.sock"))
        snap = workdir.Snapshot(self.root)
        made = socket.socket(socket.AF_UNIX)
        try:
            made.bind(os.path.join(self.root, "test.sock"))
            snap.restore()
            self.assertEqual(sorted(os.listdir(self.root)), ["data", "link", "server.sock"])
        finally:
            snap.close()
            kept.close()
            made.close()

    def test_the_snapshot_cannot_be_changed_even_through_proc(self):
        snap = workdir.Snapshot(self.root)
        try:
            with self.assertRaises(PermissionError):
                with open(f"/proc/self/fd/{snap._mem}", "r+b") as f:
                    f.write(b"x")
        finally:
            snap.close()

    def test_a_work_directory_past_the_bound_is_refused_with_a_reason(self):
        old = workdir.MAX_BYTES
        workdir.MAX_BYTES = 1 << 20
        try:
            with self.assertRaises(workdir.TooLarge) as e:
                workdir.Snapshot(self.root)
            self.assertIn("1 MiB", str(e.exception))
        finally:
            workdir.MAX_BYTES = old

    def test_each_test_starts_from_the_same_files_whatever_the_one_before_did(self):
        codes = [
            # Create, change, delete, lock; and a child that goes on writing.
            "open('/'.join([W, 'made.txt']), 'w').write('x')\n"
            "open('input.txt', 'a').write('more')\n"
            "import os, subprocess\nos.unlink('/'.join([W, 'link']))\n"
            "subprocess.Popen(['sh', '-c', 'while :; do echo late >> ' + W + '/late.txt; done'],"
            " start_new_session=True)\n"
            "import time\ntime.sleep(0.2)\nos.chmod(W + '/data', 0)",
            "import os\nassert not os.path.exists(W + '/made.txt')\n"
            "assert open(W + '/data/input.txt').read() == 'original\\n'\n"
            "assert os.path.islink(W + '/link') and not os.path.exists(W + '/late.txt')",
            ]
        reports = check([c.replace("W", repr(self.root)) for c in codes])
        self.assertEqual([r["completed"] for r in reports], [True, True], reports)
        self.assertEqual(tree(self.root), self.before)


class ParentGuardTest(unittest.TestCase):
    def test_the_filter_is_in_place_and_the_parent_unreachable(self):
        from kiln_kernel import guard

        self.assertTrue(guard.program(10, (10, 11), 10, "x86_64"))
        self.assertEqual(guard.program(10, (), 10, "sparc"), [])

    def test_a_test_cannot_signal_the_kernel_it_was_forked_from_but_can_signal_its_own(self):
        reports = check(
            [
                # Signal 0: the check alone, so that nothing stops should the
                # filter be missing.
                "import os, subprocess\n"
                "for target in (os.getppid(), -os.getpgid(os.getppid()), -1):\n"
                "    try:\n"
                "        os.kill(target, 0)\n"
                "    except PermissionError:\n"
                "        pass\n"
                "    else:\n"
                "        raise AssertionError(target)\n"
                "for tid in os.listdir(f'/proc/{os.getppid()}/task'):\n"
                "    try:\n"
                "        os.kill(int(tid), 0)\n"
                "    except PermissionError:\n"
                "        pass\n"
                "    else:\n"
                "        raise AssertionError(tid)\n"
                "p = subprocess.Popen(['sleep', '30'])\n"
                "p.kill()\n"
                "assert p.wait() == -9",
                "assert True",
            ]
        )
        self.assertEqual([r["completed"] for r in reports], [True, True], reports)


if __name__ == "__main__":
    unittest.main()
