"""The batch tests' runner (kiln_kernel.judge), outside any kernel or sandbox:
what it reports for a run, that it holds the time limit, that it kills what a
test leaves behind, and that it touches nothing else (with ``--sandbox none``
it shares the host's processes).
"""

import base64
import contextlib
import io
import json
import os
import subprocess
import time
import unittest

from kiln_kernel import judge


def run(function, **args):
    """Call the runner; its report lines, parsed, with the texts decoded."""
    b64 = base64.b64encode(json.dumps(args).encode()).decode()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        getattr(judge, function)(b64)
    reports = [json.loads(line[len(judge.MARKER) :]) for line in out.getvalue().splitlines()]
    for r in reports:
        for name in ("stdout", "stderr"):
            r[name] = base64.b64decode(r.pop(name + "_b64")).decode("utf-8", "replace")
    return reports


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


class ProgramTest(unittest.TestCase):
    def test_each_input_is_one_run_with_its_exit_status_and_output(self):
        reports = run(
            "program", code="n = int(input())\nprint(n * 2)\nraise SystemExit(n > 3)", stdins=["2\n", "5\n"], timeout=10
        )
        self.assertEqual(
            [(r["exit"], r["stdout"], r["completed"]) for r in reports], [(0, "4\n", True), (1, "10\n", False)]
        )

    def test_a_raise_after_the_answer_is_a_failure_status_with_its_traceback(self):
        (r,) = run("program", code="print(1)\n1/0", stdins=[""], timeout=10)
        self.assertEqual((r["exit"], r["stdout"]), (1, "1\n"))
        self.assertIn("ZeroDivisionError", r["stderr"])
        self.assertNotIn("judge.py", r["stderr"], "the runner's own frames are not shown")

    def test_a_report_is_one_short_line_whatever_bytes_the_program_printed(self):
        code = "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 8)\nprint('\\n' * 3)"
        b64 = base64.b64encode(json.dumps({"code": code, "stdins": [""], "timeout": 10}).encode()).decode()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            judge.program(b64)
        (line,) = out.getvalue().splitlines()
        r = json.loads(line[len(judge.MARKER) :])
        self.assertEqual(base64.b64decode(r["stdout_b64"]), bytes(range(256)) * 8 + b"\n" * 4)
        self.assertLess(len(line), 2048 * 4 / 3 + 1024, "a report is its texts in base64 and a few fields")

    def test_the_time_limit_holds(self):
        started = time.monotonic()
        (r,) = run("program", code="while True:\n    pass", stdins=[""], timeout=0.5)
        self.assertTrue(r["timed_out"])
        self.assertLess(time.monotonic() - started, 5)

    def test_what_a_test_leaves_behind_is_killed_and_nothing_else_is(self):
        # Not a descendant of ours: started through a shell that exits.
        other = subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        outsider = int(other.stdout)
        # Ours, from before the test.
        mine = subprocess.Popen(["sleep", "30"])
        try:
            code = (
                "import subprocess\n"
                "p = subprocess.Popen(['sh', '-c', 'sleep 30 >/dev/null 2>&1 & echo $!'], stdout=subprocess.PIPE,"
                " start_new_session=True)\n"
                "print(p.stdout.readline().decode().strip(), flush=True)"
            )
            (r,) = run("program", code=code, stdins=[""], timeout=10)
            left = int(r["stdout"])
            deadline = time.monotonic() + 5
            while alive(left) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertFalse(alive(left), "the test's orphaned grandchild outlived it")
            self.assertTrue(alive(outsider), "a process that is not the test's was killed")
            self.assertIsNone(mine.poll(), "a process started before the test was killed")
        finally:
            mine.kill()
            mine.wait()
            os.kill(outsider, 9)


class CommandTest(unittest.TestCase):
    """Program runs of another language: the judge in a process of its own,
    each run an exec of the language's interpreter on the test's own copy
    of the program."""

    def test_each_input_is_one_run_of_the_interpreter(self):
        reports = run(
            "command",
            code='read n\necho $((n * 2))\nexit $((n > 3))',
            argv=["bash", "{program}"],
            stdins=["2\n", "5\n"],
            timeout=10,
        )
        self.assertEqual([(r["exit"], r["stdout"]) for r in reports], [(0, "4\n"), (1, "10\n")])

    def test_a_run_cannot_change_the_program_the_next_run_gets(self):
        code = 'echo run\necho "echo changed" > "$0"; cat "$0" >&2'
        reports = run("command", code=code, argv=["bash", "{program}"], stdins=["", ""], timeout=10)
        self.assertEqual([r["stdout"] for r in reports], ["run\n", "run\n"], reports)

    def test_a_program_gets_the_default_sigpipe_and_a_missing_interpreter_is_its_failure(self):
        # With SIGPIPE ignored, `yes` would see EPIPE and complain.
        (r,) = run("command", code="yes | head -1", argv=["bash", "{program}"], stdins=[""], timeout=10)
        self.assertEqual((r["exit"], r["stdout"], r["stderr"]), (0, "y\n", ""), r)
        (r,) = run("command", code="", argv=["no-such-interpreter", "{program}"], stdins=[""], timeout=10)
        self.assertEqual(r["exit"], 127)
        self.assertIn("cannot start no-such-interpreter", r["stderr"])

    def test_a_run_cannot_signal_the_judge_or_its_ancestors(self):
        from kiln_kernel import guard

        # This process plays the kernel that started the judge: the judge's
        # parent. A run that tries to kill it is refused.
        prepared = guard.parent(ancestors=True)
        self.assertIsNotNone(prepared)
        code = f"kill -0 $PPID && echo judge; kill -0 {os.getppid()} && echo ancestor; echo done"
        (r,) = run("command", code=code, argv=["bash", "{program}"], stdins=[""], timeout=10)
        self.assertEqual(r["stdout"], "done\n", r)
        self.assertIn("Operation not permitted", r["stderr"])


class CheckTest(unittest.TestCase):
    def test_an_assertion_passes_only_when_it_completes(self):
        reports = run("check", codes=["assert 1 + 1 == 2", "assert 1 + 1 == 3", "import os\nos._exit(0)"], timeout=10)
        self.assertEqual([(r["exit"], r["completed"]) for r in reports], [(0, True), (1, False), (0, False)])


if __name__ == "__main__":
    unittest.main()
