"""The fork server a batch lane's tests run from (kiln_kernel.forkserver),
and what the runner puts back after each test besides the work directory
(IPC objects, and a directory that is not the runner's own, like ``/tmp``).

This process plays the kernel: with ``judge.WORK_DIR`` set, as kiln's
kernel sets it, a lane's program tests go to a fork server it starts.
"""

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import unittest
from unittest import mock

import test_judge
from kiln_kernel import guard, ipc, judge, workdir


def run(function, **args):
    """The runner's reports (test_judge.run), in a lane unless told."""
    args.setdefault("lane", True)
    return test_judge.run(function, **args)


class ForkServerTest(unittest.TestCase):
    def setUp(self):
        self.work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.work, True)
        judge.WORK_DIR = self.work
        self.addCleanup(self._stop)

    def _stop(self):
        if judge._SERVER is not None:
            judge._SERVER.stop()
            judge._SERVER = None
        judge.WORK_DIR = None

    @staticmethod
    def _spawned_sees(code):
        """``code``'s reports from a spawned server of its own."""
        saved, judge._SERVER = judge._SERVER, None
        try:
            return run("program", code=code, stdins=["1\n"], timeout=10)
        finally:
            if judge._SERVER is not None:
                judge._SERVER.stop()
            judge._SERVER = saved

    def test_a_standard_library_program_runs_in_forks_of_one_server_that_survives_the_calls(self):
        code = (
            "import os\nn = int(input())\nstat = open(f'/proc/{os.getppid()}/stat').read()\n"
            "print(n * 2, os.getppid(), stat.rsplit(')', 1)[1].split()[1])"
        )
        first = run("program", code=code, stdins=["2\n", "5\n"], timeout=10)
        server = judge._SERVER
        self.assertIsNotNone(server)
        second = run("program", code=code, stdins=["7\n"], timeout=10)
        self.assertIs(judge._SERVER, server, "one server serves the kernel's later calls")
        outs = [r["stdout"].split() for r in first + second]
        self.assertEqual([o[0] for o in outs], ["4", "10", "14"])
        # Each test is a fork of its call's own child of the server.
        self.assertEqual({o[2] for o in outs}, {str(server.pid)})
        self.assertEqual(outs[0][1], outs[1][1])
        self.assertNotEqual(outs[0][1], outs[2][1])

    def test_a_test_finds_nothing_of_an_earlier_call_in_the_memory_it_inherited(self):
        # Secrets the scan's own text cannot match: its pattern is a regex.
        code = "# KILNSECRET0123456789abcdef\nprint(input())"
        run("program", code=code, stdins=["KILNSECRETfedcba9876543210\n"], timeout=10)
        program = scan("KILNSECRET")
        (r,) = run("program", code=program, stdins=[""], timeout=60)
        self.assertEqual(r["stdout"], "0\n", r)
        # The scan finds what is there: a secret of its own call.
        (r,) = run("program", code="# KILNSECRET00000000000000ff\n" + program, stdins=[""], timeout=60)
        self.assertGreater(int(r["stdout"]), 0, r)

    def test_a_test_cannot_signal_the_server_or_the_kernel_and_the_work_dir_comes_back(self):
        code = (
            "import os, signal\n"
            "open('left.txt', 'w').write('x')\n"
            "for pid in (os.getppid(), int(input())):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except PermissionError:\n"
            "        print('refused')\n"
        )
        reports = run("program", code=code, stdins=[f"{os.getpid()}\n"] * 2, timeout=10)
        self.assertEqual([r["stdout"] for r in reports], ["refused\nrefused\n"] * 2, reports)
        self.assertEqual(os.listdir(self.work), [])

    def test_a_server_that_died_is_the_call_s_failure_and_the_next_call_starts_another(self):
        run("program", code="print(1)", stdins=[""], timeout=10)
        old = judge._SERVER
        os.kill(old.pid, 9)
        with self.assertRaisesRegex(RuntimeError, "the tests' runner ended"):
            run("program", code="print(1)", stdins=[""], timeout=10)
        (r,) = run("program", code="print(2)", stdins=[""], timeout=10)
        self.assertEqual(r["stdout"], "2\n")
        self.assertNotEqual(judge._SERVER.pid, old.pid)

    def test_a_call_that_fails_outside_its_tests_ends_the_server_and_says_why(self):
        run("program", code="print(1)", stdins=[""], timeout=10)
        old = judge._SERVER
        # Arguments the call's child cannot decode: kiln's failure, not a test's.
        with self.assertRaisesRegex(RuntimeError, r"the tests' runner ended: .*fork server ended: .*Error"):
            judge._in_fork_server("program", "not base64!")
        self.assertIsNone(judge._SERVER)
        (r,) = run("program", code="print(2)", stdins=[""], timeout=10)
        self.assertEqual(r["stdout"], "2\n")
        self.assertNotEqual(judge._SERVER.pid, old.pid)

    def test_an_item_s_cell_needs_an_image_server_and_without_one_the_runner_counts_as_ended(self):
        args = {"code": "x = 1", "codes": [], "cell_timeout": 5, "output_limit": 1000, "record_bytes": 10000,
                "timeout": 5, "lane": True}
        with self.assertRaisesRegex(RuntimeError, "the tests' runner ended: this lane has no image server"):
            run("item", **args)
        # Nor does a spawned (lean) server do: it has no kernel shell.
        run("program", code="print(1)", stdins=[""], timeout=10)
        self.assertFalse(judge._SERVER.forked)
        with self.assertRaisesRegex(RuntimeError, "the tests' runner ended: this lane has no image server"):
            run("item", **args)

    def test_after_an_item_with_files_its_work_dir_is_emptied_without_following_links(self):
        outside = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, outside, True)
        with open(os.path.join(outside, "kept"), "w") as f:
            f.write("x")
        os.makedirs(os.path.join(self.work, "data", "raw"))
        with open(os.path.join(self.work, "data", "raw", "t.csv"), "w") as f:
            f.write("a,b\n")
        with open(os.path.join(self.work, "b.txt"), "w") as f:
            f.write("")
        os.symlink(outside, os.path.join(self.work, "link"))
        judge.empty_work_dir()
        self.assertEqual(os.listdir(self.work), [])
        self.assertEqual(os.listdir(outside), ["kept"])

    def test_other_languages_run_from_the_server_too(self):
        (r,) = run("command", code="read n; echo $((n + 1))", argv=["bash", "{program}"], stdins=["4\n"], timeout=10)
        self.assertEqual(r["stdout"], "5\n")
        self.assertIsNotNone(judge._SERVER)

    def test_a_work_dir_too_large_to_copy_fails_the_call_and_the_server_serves_on(self):
        with open(os.path.join(self.work, "big"), "wb") as f:
            f.truncate(workdir.MAX_BYTES + 1)
        with self.assertRaisesRegex(RuntimeError, "the tests did not run"):
            run("program", code="print(1)", stdins=[""], timeout=10)
        os.unlink(os.path.join(self.work, "big"))
        (r,) = run("program", code="print(3)", stdins=[""], timeout=10)
        self.assertEqual(r["stdout"], "3\n")


SCAN = (
    "import re\nfound = 0\nmem = open('/proc/self/mem', 'rb', 0)\n"
    "for line in open('/proc/self/maps'):\n"
    "    lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
    "    if line.split()[1][0] != 'r' or hi - lo > 1 << 28:\n"
    "        continue\n"
    "    try:\n"
    "        mem.seek(lo)\n"
    "        found += len(re.findall(rb'{prefix}[0-9a-f]{{16}}', mem.read(hi - lo)))\n"
    "    except (OSError, ValueError, OverflowError):\n"
    "        pass\n"
    "print(found)"
)


def scan(prefix):
    """A program that counts the strings of ``prefix`` and 16 hex digits in
    its whole memory (a pattern: its own text has none)."""
    return SCAN.replace("{prefix}", prefix).replace("{{16}}", "{16}")


class ImageServerTest(unittest.TestCase):
    """A server forked from the kernel (judge.image_server), as a lane for
    programs that import packages has: this process plays that kernel."""

    setUp = ForkServerTest.setUp
    _stop = ForkServerTest._stop

    def test_its_tests_find_what_the_kernel_had_imported_and_fork_from_one_child_per_call(self):
        judge.image_server()
        server = judge._SERVER
        with open(f"/proc/{server.pid}/stat") as f:
            self.assertEqual(int(f.read().rsplit(")", 1)[1].split()[1]), os.getpid(), "a child of the kernel")
        code = "import sys\nprint('test_judge' in sys.modules, int(input()) + 1)"
        first = run("program", code=code, stdins=["1\n", "2\n"], timeout=10)
        second = run("program", code=code, stdins=["3\n"], timeout=10)
        self.assertIs(judge._SERVER, server, "the server serves the later calls")
        # Imported by this process (the kernel) before the fork: a spawned
        # server would not have it.
        self.assertEqual([r["stdout"] for r in first + second], ["True 2\n", "True 3\n", "True 4\n"])
        (spawned,) = ForkServerTest._spawned_sees(code)
        self.assertEqual(spawned["stdout"], "False 2\n")

    def test_the_server_holds_none_of_the_kernel_s_descriptors(self):
        kept = os.open(os.devnull, os.O_RDONLY)  # inheritable or not, a fork copies it
        self.addCleanup(os.close, kept)
        judge.image_server()
        run("program", code="print(1)", stdins=[""], timeout=10)  # it serves: it has closed them
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{judge._SERVER.pid}/fd"))
        self.assertEqual(fds, [0, 1, 2])

    def test_a_test_finds_nothing_of_an_earlier_call_in_the_memory_it_inherited(self):
        judge.image_server()
        # Made after the fork, and of a prefix nothing in this module has
        # (the server has this process's memory, with this module's text,
        # as a lane's has the kernel's boot).
        prefix = "KILN" + "IMAGE"
        code, stdin, own = (prefix + os.urandom(8).hex() for _ in range(3))
        run("program", code=f"# {code}\nprint(input())", stdins=[stdin + "\n"], timeout=10)
        (r,) = run("program", code=scan(prefix), stdins=[""], timeout=60)
        self.assertEqual(r["stdout"], "0\n", r)
        (r,) = run("program", code=f"# {own}\n" + scan(prefix), stdins=[""], timeout=60)
        self.assertGreater(int(r["stdout"]), 0, r)

    def test_a_test_cannot_signal_the_server_or_the_kernel(self):
        judge.image_server()
        code = (
            "import os, signal\n"
            "for pid in (os.getppid(), int(input())):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except PermissionError:\n"
            "        print('refused')\n"
        )
        for pid in (judge._SERVER.pid, os.getpid()):
            (r,) = run("program", code=code, stdins=[f"{pid}\n"], timeout=10)
            self.assertEqual(r["stdout"], "refused\nrefused\n", r)

    def test_when_it_dies_the_call_fails_and_the_next_call_gets_a_spawned_server(self):
        judge.image_server()
        old = judge._SERVER
        os.kill(old.pid, 9)
        with self.assertRaisesRegex(RuntimeError, "the tests' runner ended"):
            run("program", code="print(1)", stdins=[""], timeout=10)
        (r,) = run("program", code="import sys\nprint('test_judge' in sys.modules)", stdins=[""], timeout=10)
        self.assertEqual(r["stdout"], "False\n", "a spawned server: correct, without the kernel's imports")


class PutBackTest(unittest.TestCase):
    def test_ipc_objects_made_since_are_removed_and_older_ones_stay(self):
        libc = ctypes.CDLL(None, use_errno=True)
        old = libc.shmget(0, 4096, 0o1600)  # IPC_PRIVATE, IPC_CREAT
        self.assertGreaterEqual(old, 0)
        self.addCleanup(libc.shmctl, old, 0, None)
        before = ipc.objects()
        new_shm = libc.shmget(0, 4096, 0o1600)
        new_sem = libc.semget(0, 1, 0o1600)
        self.assertIn(("shm", new_shm), ipc.objects())
        self.assertEqual(ipc.remove_new(before), [])
        after = ipc.objects()
        self.assertIn(("shm", old), after)
        self.assertNotIn(("shm", new_shm), after)
        self.assertNotIn(("sem", new_sem), after)

    def test_a_shared_directory_someone_else_owns_is_put_back_without_touching_its_own_mode(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        os.chmod(root, 0o1777)
        with open(os.path.join(root, "kept"), "w") as f:
            f.write("before")
        owned_by_other = os.geteuid() == 0
        if owned_by_other:
            os.chown(root, 65534, 65534)
        snap = workdir.Snapshot(root)
        self.addCleanup(snap.close)
        self.assertEqual(snap._own, not owned_by_other)
        with open(os.path.join(root, "kept"), "w") as f:
            f.write("changed")
        os.mkdir(os.path.join(root, "made"))
        snap.restore()
        self.assertEqual(sorted(os.listdir(root)), ["kept"])
        with open(os.path.join(root, "kept")) as f:
            self.assertEqual(f.read(), "before")
        self.assertEqual(os.stat(root).st_mode & 0o7777, 0o1777)

    def test_a_test_cannot_signal_a_thread_its_parent_started_after_the_filter_was_built(self):
        # As a Deno kernel starts threads when it needs them: one that
        # appears after the filter was built has a pid of the namespace
        # below the test's own. So has a process the item's code left
        # running, which the next tests must find as this one did.
        os.environ["KILN_PRIVATE_TMP"] = "1"  # as in kiln's sandbox
        self.addCleanup(os.environ.pop, "KILN_PRIVATE_TMP", None)
        # This runs on the host's pids, which may be near their wrap
        # (near_wrap is checked below); a wrap in between runs it again.
        near = mock.patch.object(guard, "_counter_near_wrap", lambda: False)
        near.start()
        self.addCleanup(near.stop)
        for _ in range(3):
            status = self._signal_what_is_older(guard.parent())
            if status is not None:
                break
        self.assertEqual(status, 0, "a thread or process older than the test was reachable")
        # On the host's pids (no sandbox) the bound is not set, nor near a
        # wrap of the namespace's pids.
        os.environ.pop("KILN_PRIVATE_TMP")
        self.assertIsNone(guard.parent()[2])
        self.assertEqual([guard.near_wrap(last, 32768) for last in (300, 24000, 30000)], [False, False, True])
        self.assertFalse(guard.near_wrap(5, 4194304))

    def _signal_what_is_older(self, prepared):
        """A thread and a process started after ``prepared``, then a test
        forked: its exit status (0: it could signal neither, but its own
        child and group), or None when the host's pids wrapped in between
        (this test runs on the host's pid namespace) and it must run again."""
        stop = threading.Event()
        late = threading.Thread(target=stop.wait)
        late.start()
        left = subprocess.Popen(["sleep", "60"])
        try:
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    guard.protect(prepared)
                    refused = []
                    for target in (late.native_id, left.pid):
                        try:
                            os.kill(target, 0)
                            refused.append(False)
                        except PermissionError:
                            refused.append(True)
                    # Its own processes and its own group it still reaches.
                    child = subprocess.Popen(["sleep", "60"])
                    child.kill()
                    child.wait()
                    os.kill(0, 0)
                    code = 0 if refused == [True, True] else 1
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            return None if pid < max(late.native_id, left.pid) else os.waitstatus_to_exitcode(status)
        finally:
            left.kill()
            left.wait()
            stop.set()
            late.join()

    def test_a_test_cannot_open_a_posix_message_queue(self):
        prepared = guard.parent()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                guard.protect(prepared)
                libc = ctypes.CDLL(None, use_errno=True)
                rt = ctypes.CDLL("librt.so.1", use_errno=True) if not hasattr(libc, "mq_open") else libc
                fd = rt.mq_open(b"/kiln-test-queue", os.O_CREAT | os.O_RDWR, 0o600, None)
                code = 0 if fd == -1 and ctypes.get_errno() == 1 else 1
                if fd != -1:
                    rt.mq_unlink(b"/kiln-test-queue")
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0, "mq_open must fail with EPERM")


if __name__ == "__main__":
    unittest.main()
