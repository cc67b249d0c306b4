"""A batch item's cell and assertions in a lane (``judge.item``): the cell
runs in a fork of the lane's image server through the kernel's own shell,
its outputs recorded (recorder.py), then each assertion in a fork of that.

The kernel's shell is a per-process singleton, so each case runs in a fresh
interpreter that prepares it as kiln's zygote does, plays a kernel of a
lane (its work directory, its image server) and calls the runner.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

SCRIPT = textwrap.dedent(
    """
    import base64, contextlib, io, json, os, sys
    from kiln_kernel import judge, kernel

    kernel.zygote_prepare()
    os.chdir(sys.argv[1])
    judge.WORK_DIR = sys.argv[1]
    # As a lane's kernel: a cell of its own ran before its server forked.
    kernel._prepared.shell.run_cell("pass", store_history=True)
    judge.image_server()
    results = []
    for case in json.loads(sys.argv[2]):
        args = dict(cell_timeout=10.0, output_limit=1 << 20, record_bytes=8 << 20, timeout=10.0, lane=True, codes=[])
        args.update(case)
        out = io.StringIO()
        failed = None
        with contextlib.redirect_stdout(out):
            try:
                judge.item(base64.b64encode(json.dumps(args).encode()).decode())
            except RuntimeError as e:
                failed = str(e)
        res = {"cell": None, "tests": [], "ended": None, "work": sorted(os.listdir(sys.argv[1])), "failed": failed}
        for line in out.getvalue().splitlines():
            if line.startswith(judge.CELL_MARKER):
                res["cell"] = json.loads(base64.b64decode(line[len(judge.CELL_MARKER):]))
            for marker, key in ((judge.MARKER, "tests"), (judge.ITEM_MARKER, "ended")):
                if line.startswith(marker):
                    value = json.loads(line[len(marker):])
                    for name in ("stdout", "stderr"):
                        value[name] = base64.b64decode(value.pop(name + "_b64")).decode()
                    res["tests"].append(value) if key == "tests" else res.update(ended=value)
        results.append(res)
    judge._SERVER.stop()
    print(json.dumps(results))
    """
)


def items(*cases):
    """Each case's record, assertion reports, end and work dir after it."""
    work = tempfile.mkdtemp()
    try:
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run([sys.executable, "-c", SCRIPT, work, json.dumps(cases)], env=env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(out.stderr)
        return json.loads(out.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def shown(cell):
    """The recorded messages as (type, what they show)."""
    out = []
    for kind, content in cell["messages"]:
        if kind == "stream":
            out.append((content["name"], content["text"]))
        elif kind in ("display_data", "execute_result"):
            out.append((kind, content["data"].get("text/plain")))
        elif kind == "error":
            out.append((kind, content["ename"]))
    return out


class ItemTest(unittest.TestCase):
    def test_the_cell_shows_what_a_kernel_would_and_each_assertion_starts_from_its_state(self):
        code = (
            "import os, sys\nfrom IPython.display import display\n"
            "seen = []\ndef solve(x):\n    return x * 2\n"
            "print('out')\nprint('err', file=sys.stderr)\nos.write(1, b'fd\\n')\ndisplay('shown')\n"
            "open('made.txt', 'w').write('x')\nsolve(21)"
        )
        checks = ["seen.append(1)\nassert seen == [1] and open('made.txt').read() == 'x'",
                  "seen.append(2)\nassert seen == [2]", "print('told'); assert solve(2) == 5"]
        (r,) = items({"code": code, "codes": checks})
        self.assertEqual(
            shown(r["cell"]),
            [("stdout", "out\n"), ("stderr", "err\n"), ("stdout", "fd\n"), ("display_data", "'shown'"),
             ("execute_result", "42")],
        )
        self.assertFalse(r["cell"]["timed_out"])
        self.assertEqual([t["completed"] for t in r["tests"]], [True, True, False])
        self.assertEqual(r["tests"][2]["stdout"], "told\n")
        self.assertIn("AssertionError", r["tests"][2]["stderr"])
        self.assertTrue(r["ended"]["completed"], r["ended"])
        # What the cell wrote is gone after the item.
        self.assertEqual(r["work"], [])

    def test_an_error_a_time_limit_and_input_are_as_in_a_session(self):
        raised, looped, asked = items(
            {"code": "print(len(In), repr(_i), _i1[:5])\nx = 1\n1 / 0", "codes": ["assert x == 1"]},
            {"code": "y = 2\nwhile True:\n    pass", "cell_timeout": 0.5, "codes": ["assert y == 2"]},
            {"code": "input('?')"},
        )
        self.assertEqual(shown(raised["cell"]), [("stdout", "2 '' print\n"), ("error", "ZeroDivisionError")])
        # As a session's first cell: In[1], whatever the lane's kernel ran before.
        traceback = re.sub(r"\x1b\[[0-9;]*m", "", "".join(raised["cell"]["messages"][-1][1]["traceback"]))
        self.assertIn("Cell In[1]", traceback)
        self.assertTrue(raised["tests"][0]["completed"])
        self.assertTrue(looped["cell"]["timed_out"])
        self.assertEqual(shown(looped["cell"]), [("error", "KeyboardInterrupt")])
        self.assertTrue(looped["tests"][0]["completed"], "the assertions run on the interrupted state")
        self.assertEqual(shown(asked["cell"]), [("error", "StdinNotImplementedError")])

    def test_the_last_assertion_run_by_the_item_s_process_reports_as_a_forked_one_does(self):
        # The last assertion runs in the item's process itself (one fork
        # fewer): each case twice, the first forked, the second the last.
        cases = [
            "print('p')\nassert False",
            "input()",
            "import os\nos._exit(0)",
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
            "while True:\n    pass",
            "print(open('made.txt').read(), seen)\nopen('made.txt', 'w').write('changed')\nseen.append(1)",
            # A file the cell left open: a test's descriptors are its own.
            "import os\nos.fstat(KEPT.fileno())",
        ]
        cell = "seen = []\nopen('made.txt', 'w').write('x')\nKEPT = open('made.txt')"
        results = items(*({"code": cell, "codes": [c, c], "timeout": 0.5} for c in cases))
        for case, r in zip(cases, results, strict=True):
            forked, last = ({k: v for k, v in t.items() if k != "ms"} for t in r["tests"])
            self.assertEqual(last, forked, case)
            # Its own time, not its process's whole run (the cell, the
            # first assertion).
            self.assertLess(r["tests"][1]["ms"], r["ended"]["ms"], case)
            self.assertTrue(r["ended"]["completed"], (case, r["ended"]))
            self.assertEqual(r["work"], [], case)
        self.assertEqual([r["tests"][0]["completed"] for r in results],
                         [False, False, False, False, False, True, False])
        self.assertTrue(results[4]["tests"][1]["timed_out"])
        self.assertEqual(results[3]["tests"][1]["signal"], 9)
        self.assertEqual(results[5]["tests"][1]["stdout"], "x []\n")

    def test_a_last_assertion_that_disarms_its_alarm_is_still_stopped(self):
        code = "import signal\nsignal.setitimer(signal.ITIMER_REAL, 0)\nwhile True:\n    pass"
        (r,) = items({"code": "x = 1", "codes": [code], "timeout": 0.2, "cell_timeout": 0.2})
        self.assertTrue(r["tests"][0]["timed_out"], r["tests"])
        self.assertFalse(r["tests"][0]["completed"])

    def test_a_cell_that_ends_its_process_leaves_no_record_and_says_how_it_ended(self):
        (r,) = items({"code": "import os\nos._exit(3)", "codes": ["assert True"]})
        self.assertIsNone(r["cell"])
        self.assertEqual(r["tests"], [])
        self.assertEqual((r["ended"]["exit"], r["ended"]["completed"]), (3, False))

    def test_what_a_cell_writes_to_any_descriptor_cannot_end_its_call_or_speak_for_the_next_item(self):
        fake = '{"exit": 0, "signal": null, "timed_out": false, "completed": true, "stdout_b64": "", ' \
               '"stdout_truncated": false, "stderr_b64": "", "ms": 1}'
        forge = (
            "import os\n"
            f"lines = ('\\nKILN_END\\nKILN_JUDGE {fake}\\nKILN_JUDGE {fake}\\nKILN_END\\n"
            "KILN_FAIL [kiln] the tests\\x27 runner ended: forged\\n').encode()\n"
            "for fd in os.listdir('/proc/self/fd'):\n"
            "    try:\n        os.write(int(fd), lines)\n    except OSError:\n        pass\n"
        )
        forger, honest = items({"code": forge, "codes": ["assert False"]},
                               {"code": "x = 1", "codes": ["assert x == 2"]})
        # The forger's own report may be its own lie; it is one report, and
        # the failure it claims is its own, never kiln's.
        self.assertEqual(len(forger["tests"]), 1, forger["tests"])
        self.assertIsNotNone(forger["ended"])
        self.assertIsNotNone(forger["cell"], "the forger's cell ran")
        self.assertTrue(forger["failed"].startswith("[item] ") and "forged" in forger["failed"], forger["failed"])
        self.assertNotIn("[kiln]", forger["failed"])
        # The next item's reports are its own: its assertion failed.
        self.assertEqual([t["completed"] for t in honest["tests"]], [False], honest["tests"])
        self.assertIn("AssertionError", honest["tests"][0]["stderr"])
        self.assertEqual(shown(honest["cell"]), [])

    def test_a_record_too_large_for_the_runner_s_output_keeps_what_fits_and_says_so(self):
        code = "for i in range(200):\n    display(str(i) * 100)"
        small, whole = items({"code": code, "record_bytes": 4000}, {"code": code})
        self.assertTrue(small["cell"]["cut"])
        kept = shown(small["cell"])
        self.assertTrue(0 < len(kept) < 200, len(kept))
        self.assertEqual(kept, shown(whole["cell"])[: len(kept)])
        self.assertFalse(whole["cell"]["cut"])


if __name__ == "__main__":
    unittest.main()
