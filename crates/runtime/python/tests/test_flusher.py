"""Output published while a cell runs (the flusher thread).

Below the kernel: which pending text a tick sends, and that a tick racing
the writes of the main thread loses, repeats and reorders nothing. Through a
real kernel process: what a cell prints before a blocking call arrives while
it blocks, at the Python and at the file-descriptor level, in the order it
was written; nothing is lost or sent twice at the end of a cell; processes
the cell forks still print; SIGINT still interrupts a cell that waits for
the publisher's lock.
"""

import os
import random
import signal
import threading
import time
import unittest

from kiln_kernel.publisher import PARTIAL_WAIT, TICK
from support import Harness, KernelProcess, stream_text


def streams(outs):
    """The stream outputs as (name, text), in order."""
    return [(o["content"]["name"], o["content"]["text"]) for o in outs if o["msg_type"] == "stream"]


class TickTest(unittest.TestCase):
    """:meth:`Publisher.publish_due`, as the flusher calls it, on a real
    socket pair."""

    def setUp(self):
        self.h = Harness()
        self.p = self.h.publisher

    def tearDown(self):
        self.h.close()

    def tick(self):
        with self.p.lock:
            return self.p.publish_due()

    def test_a_tick_sends_complete_lines_and_holds_a_partial_one_until_it_is_old(self):
        self.h.stdout.write("done\n")
        self.h.stderr.write("half")
        self.h.stderr.since += 60  # as if just written, however slow this machine
        wait = self.tick()
        self.assertAlmostEqual(wait, 60 + PARTIAL_WAIT, delta=30)
        self.assertGreaterEqual(self.tick(), TICK)
        self.assertEqual(streams(self.h.messages()), [("stdout", "done\n")])
        self.h.stderr.since -= 60 + PARTIAL_WAIT  # as if written that long ago
        self.assertIsNone(self.tick())
        self.assertEqual(streams(self.h.messages()), [("stderr", "half")])

    def test_the_two_writes_of_a_print_stay_together(self):
        self.h.stdout.write("1")
        self.tick()
        self.h.stdout.write("\n")
        self.tick()
        self.assertEqual(streams(self.h.messages()), [("stdout", "1\n")])

    def test_a_line_begun_before_a_due_one_goes_out_first(self):
        self.h.stdout.write("partial ")
        self.h.stderr.write("line\n")
        self.assertIsNone(self.tick())
        self.assertEqual(streams(self.h.messages()), [("stdout", "partial "), ("stderr", "line\n")])

    def test_interleaved_prints_keep_their_order_with_or_without_a_tick_between(self):
        for tick_between in (False, True):
            self.h.stdout.write("hello\n")
            if tick_between:
                self.tick()
            self.h.stderr.write("to stderr\n")
            self.h.stdout.write("back\n")
            self.p.flush_streams()
            self.assertEqual(
                streams(self.h.messages()),
                [("stdout", "hello\n"), ("stderr", "to stderr\n"), ("stdout", "back\n")],
                f"tick between: {tick_between}",
            )

    def test_an_explicit_flush_sends_the_other_streams_earlier_text_first(self):
        self.h.stdout.write("out\n")
        self.h.stderr.write("err\n")
        self.h.stderr.flush()
        self.assertEqual(streams(self.h.messages()), [("stdout", "out\n"), ("stderr", "err\n")])
        self.h.stderr.write("later\n")
        self.h.stdout.flush()  # nothing of its own: the other stream's text waits
        self.assertEqual(self.h.messages(), [])

    def test_ticks_racing_the_writes_lose_repeat_and_reorder_nothing(self):
        stop = threading.Event()

        def flusher():
            while not stop.is_set():
                self.tick()
                time.sleep(0)

        t = threading.Thread(target=flusher)
        t.start()
        rng = random.Random(5)
        want = {"stdout": [], "stderr": []}
        try:
            for i in range(20_000):
                s = self.h.stdout if rng.random() < 0.7 else self.h.stderr
                piece = f"{i}" + ("\n" if rng.random() < 0.5 else " ")
                s.write(piece)
                want[s.name].append(piece)
        finally:
            stop.set()
            t.join()
        self.p.flush_streams()
        msgs = self.h.messages()
        self.assertGreater(len(msgs), 2)  # the ticks did send
        for name in want:
            self.assertEqual(stream_text(msgs, name), "".join(want[name]))


class KernelTest(unittest.TestCase):
    """A real kernel process for the class; a test that leaves its cell
    blocked gets the next test a fresh one."""

    k: KernelProcess

    @classmethod
    def setUpClass(cls):
        cls.k = KernelProcess()

    @classmethod
    def tearDownClass(cls):
        cls.k.close()

    def staged(self, code, *stages):
        """Run ``code`` (``gate()`` blocks until released); for each stage
        ``(done, what)``, collect outputs until ``done`` holds, then release
        the gate. Returns the outputs of each stage, and the reply and
        outputs after the last."""
        k = self.k
        mid = k.start(f"def gate():\n    open({k.gate!r}).read()\n{code}")
        seen = []
        try:
            for done, what in stages:
                seen.append(k.outputs_until(mid, done, what))
                k.release()
        except BaseException:
            type(self).k.close()
            type(self).k = KernelProcess()
            raise
        reply, rest = k.finish(mid)
        return seen, reply, rest


class WhileACellRunsTest(KernelTest):
    def test_a_line_printed_before_a_blocking_call_arrives_while_it_blocks(self):
        (early,), reply, rest = self.staged(
            "print('before')\ngate()\nprint('after')",
            (lambda outs: outs, "the line printed before the call"),
        )
        self.assertEqual(streams(early), [("stdout", "before\n")])
        self.assertEqual(reply["status"], "ok", reply)
        self.assertEqual(streams(rest), [("stdout", "after\n")])

    def test_fd_level_output_arrives_while_the_process_that_wrote_it_still_runs(self):
        code = (
            "import os, subprocess, sys\n"
            "print('py')\n"
            "os.system(f'echo fd-out; read x < {GATE}')\n"
            "subprocess.run(['sh', '-c', f'echo fd-err >&2; read x < {GATE}'])\n"
            "print('done')"
        )
        (first, second), reply, rest = self.staged(
            f"GATE = {self.k.gate!r}\n{code}",
            (lambda outs: stream_text(outs) == "py\nfd-out\n", "os.system's output"),
            (lambda outs: stream_text(outs) == "fd-err\n", "a subprocess's stderr"),
        )
        self.assertEqual(stream_text(first, "stdout"), "py\nfd-out\n")
        self.assertEqual(streams(second), [("stderr", "fd-err\n")])
        self.assertEqual(reply["status"], "ok", reply)
        self.assertEqual(streams(rest), [("stdout", "done\n")])

    def test_stdout_and_stderr_arrive_in_the_order_they_were_written(self):
        (a, b, c), _, rest = self.staged(
            "import sys\nprint('o1')\ngate()\nprint('e1', file=sys.stderr)\ngate()\nprint('o2')\ngate()",
            (lambda outs: outs, "o1"),
            (lambda outs: outs, "e1"),
            (lambda outs: outs, "o2"),
        )
        self.assertEqual([streams(a), streams(b), streams(c)],
                         [[("stdout", "o1\n")], [("stderr", "e1\n")], [("stdout", "o2\n")]])
        self.assertEqual(rest, [])

    def test_a_line_begun_on_stdout_goes_out_before_a_later_line_on_stderr(self):
        (early,), _, rest = self.staged(
            "import sys\nsys.stdout.write('partial ')\nprint('err', file=sys.stderr)\ngate()\nprint('end')",
            (lambda outs: len(streams(outs)) == 2, "both streams"),
        )
        self.assertEqual(streams(early), [("stdout", "partial "), ("stderr", "err\n")])
        self.assertEqual(streams(rest), [("stdout", "end\n")])

    def test_an_explicit_flush_of_stderr_sends_the_stdout_printed_before_it_first(self):
        (early,), _, _ = self.staged(
            "import sys\nprint('out')\nprint('err', file=sys.stderr, flush=True)\ngate()",
            (lambda outs: len(streams(outs)) == 2, "both streams"),
        )
        self.assertEqual(streams(early), [("stdout", "out\n"), ("stderr", "err\n")])

    def test_nothing_is_lost_or_sent_twice_at_the_end_of_a_cell(self):
        code = (
            "import os, sys, time\n"
            "for i in range(300):\n"
            "    print(f'o{i}')\n"
            "    if i % 3 == 0:\n"
            "        print(f'e{i}', file=sys.stderr)\n"
            "    if i % 50 == 0:\n"
            "        os.write(1, f'fd{i}\\n'.encode())\n"
            "    time.sleep(0.002)\n"
            "sys.stdout.write('tail')"
        )
        first = self.k.start(code)
        reply, outs = self.k.finish(first)
        self.assertEqual(reply["status"], "ok", reply)
        want = "".join(f"o{i}\n" + (f"fd{i}\n" if i % 50 == 0 else "") for i in range(300)) + "tail"
        self.assertEqual(stream_text(outs, "stdout"), want)
        self.assertEqual(stream_text(outs, "stderr"), "".join(f"e{i}\n" for i in range(0, 300, 3)))
        self.assertGreater(len(outs), 2, "published only at the end")
        # The next cell shows its own output only, and nothing of the first
        # came after the first's idle.
        _, outs = self.k.execute("print('next')")
        self.assertEqual(streams(outs), [("stdout", "next\n")])
        late = [m for m in self.k.strays if m["parent_header"].get("msg_id") == first]
        self.assertEqual(late, [])


class ForkTest(KernelTest):
    def test_a_forked_child_prints_without_flushing(self):
        _, outs = self.k.execute(
            "import os\npid = os.fork()\nif pid == 0:\n    print('from the child')\n    os._exit(0)\n"
            "os.waitpid(pid, 0)\nprint('from the parent')"
        )
        self.assertEqual(stream_text(outs, "stdout"), "from the child\nfrom the parent\n")

    def test_a_multiprocessing_child_prints(self):
        _, outs = self.k.execute(
            "import multiprocessing as mp\n"
            "p = mp.get_context('fork').Process(target=print, args=('from mp',))\n"
            "p.start()\np.join()\nprint('exit', p.exitcode)"
        )
        self.assertEqual(stream_text(outs, "stdout"), "from mp\nexit 0\n")

    def test_a_child_forked_while_another_thread_holds_the_publishers_lock_prints_and_exits(self):
        code = """\
import os, sys, threading, time
from IPython.display import display
p = get_ipython().kernel.publisher
held, done = threading.Event(), threading.Event()
def hold():
    with p.lock:
        held.set()
        done.wait(60)
t = threading.Thread(target=hold)
t.start()
held.wait()
try:
    pid = os.fork()
    if pid == 0:
        print('child')
        sys.stdout.flush()
        display('shown nowhere')
        os._exit(0)
    deadline = time.monotonic() + 20
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not got:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
finally:
    done.set()
    t.join()
print('child exited', os.waitstatus_to_exitcode(status) if got else 'hung')
"""
        reply, outs = self.k.execute(code)
        self.assertEqual(reply["status"], "ok", reply)
        self.assertEqual(stream_text(outs, "stdout"), "child\nchild exited 0\n")
        self.assertEqual([o for o in outs if o["msg_type"] != "stream"], [])


class InterruptTest(KernelTest):
    def test_the_flusher_thread_blocks_every_signal(self):
        _, outs = self.k.execute(
            "import threading\n"
            "(t,) = [t for t in threading.enumerate() if t.name == 'kiln-flusher']\n"
            "status = open(f'/proc/self/task/{t.native_id}/status').read()\n"
            "print(next(line.split()[1] for line in status.splitlines() if line.startswith('SigBlk:')))"
        )
        blocked = int(stream_text(outs, "stdout"), 16)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD):
            self.assertTrue(blocked & (1 << (sig - 1)), f"{sig!r} not blocked: {blocked:x}")

    def test_sigint_interrupts_a_cell_waiting_for_the_publishers_lock(self):
        code = """\
import threading
p = get_ipython().kernel.publisher
held, done = threading.Event(), threading.Event()
def hold():
    with p.lock:
        held.set()
        done.wait(60)
t = threading.Thread(target=hold, daemon=True)
t.start()
held.wait()
try:
    gate()
    print('never shown')
finally:
    done.set()
"""
        k = self.k
        mid = k.start(f"def gate():\n    open({k.gate!r}).read()\n{code}")
        k.release()
        # The main thread waits on the lock's futex: interrupt it there.
        deadline = time.monotonic() + k.DEADLINE
        while True:
            with open(f"/proc/{k.pid}/wchan") as f:
                if "futex" in f.read():
                    break
            self.assertLess(time.monotonic(), deadline, "the cell never waited for the lock")
            time.sleep(0.005)
        os.kill(k.pid, signal.SIGINT)
        reply, outs = k.finish(mid)
        self.assertEqual((reply["status"], reply.get("ename")), ("error", "KeyboardInterrupt"), reply)
        self.assertNotIn("never shown", stream_text(outs))
        # The kernel goes on, and still publishes while a cell blocks.
        (early,), reply, _ = self.staged("print('still here')\ngate()", (lambda outs: outs, "a line"))
        self.assertEqual(streams(early), [("stdout", "still here\n")])
        self.assertEqual(reply["status"], "ok", reply)


if __name__ == "__main__":
    unittest.main()
