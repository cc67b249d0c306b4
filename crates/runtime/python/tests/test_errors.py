"""Errors as a notebook shows them: the ``error`` message and the
``execute_reply`` of a failed cell, through a real kernel."""

import os
import re
import unittest

from support import live_kernel

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(traceback):
    return ANSI.sub("", "\n".join(traceback))


class ErrorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.k = live_kernel()

    def run_failing(self, code):
        reply, msgs = self.k.execute(code)
        errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
        self.assertEqual(len(errors), 1, msgs)
        return reply["content"], errors[0], msgs

    def test_an_exception_is_published_and_replied_with_the_same_traceback(self):
        reply, error, _ = self.run_failing("1/0")
        self.assertEqual((error["ename"], error["evalue"]), ("ZeroDivisionError", "division by zero"))
        self.assertEqual(reply["status"], "error")
        for key in ("ename", "evalue", "traceback"):
            self.assertEqual(reply[key], error[key])
        self.assertEqual(reply["engine_info"], {"engine_uuid": self.k.kernel.ident, "engine_id": -1,
                                                "method": "execute"})
        self.assertEqual(reply["user_expressions"], {})
        text = plain(error["traceback"])
        self.assertTrue(text.endswith("ZeroDivisionError: division by zero"), text)
        self.assertIn("Traceback (most recent call last)", text)
        self.assertIn(f"Cell In[{reply['execution_count']}], line 1", text)
        self.assertIn("----> 1 1/0", text)
        self.assertNotEqual(error["traceback"], [plain([line]) for line in error["traceback"]],
                            "tracebacks keep IPython's colours, as ipykernel's do")

    def test_frames_of_functions_name_them_and_the_text_before_arrives_first(self):
        _, error, msgs = self.run_failing(
            "def outer():\n    return inner()\ndef inner():\n    return {}['missing']\nprint('first')\nouter()")
        kinds = [m["msg_type"] for m in msgs]
        self.assertLess(kinds.index("stream"), kinds.index("error"))
        text = plain(error["traceback"])
        self.assertEqual((error["ename"], error["evalue"]), ("KeyError", "'missing'"))
        outer = re.search(r"line 2, in outer\(\)", text)
        inner = re.search(r"line 4, in inner\(\)", text)
        self.assertTrue(outer and inner, text)
        self.assertLess(outer.start(), inner.start())

    def test_a_syntax_error_points_at_the_line(self):
        reply, error, _ = self.run_failing("x = 1\ndef f(:\n    pass")
        self.assertEqual(error["ename"], "SyntaxError")
        self.assertEqual(reply["status"], "error")
        text = plain(error["traceback"])
        self.assertIn("line 2", text)
        self.assertIn("def f(:", text)
        self.assertIn("^", text)

    def test_a_repr_that_raises_fails_the_cell_without_a_result(self):
        reply, error, msgs = self.run_failing(
            "class Bad:\n    def __repr__(self):\n        raise RuntimeError('no repr')\nBad()")
        self.assertEqual(reply["status"], "error")
        self.assertEqual((error["ename"], error["evalue"]), ("RuntimeError", "no repr"))
        self.assertNotIn("execute_result", [m["msg_type"] for m in msgs])

    def test_code_files_are_named_as_under_ipykernel(self):
        _, error, _ = self.run_failing("import traceback\n"
                                       "raise ValueError(traceback.extract_stack()[-1].filename)")
        self.assertRegex(error["evalue"], rf"ipykernel_{os.getpid()}/\d+\.py$")

    def test_errors_go_out_after_the_output_cap_is_spent(self):
        p = self.k.publisher
        p.budget.limit = 100
        try:
            reply, error, _ = self.run_failing("print('y' * 1000)\nraise OSError('still shown')")
        finally:
            p.budget.limit = None
        self.assertTrue(p.budget.spent)
        self.assertEqual((error["ename"], error["evalue"]), ("OSError", "still shown"))
        self.assertEqual(reply["status"], "error")

    def test_the_kernel_goes_on_after_an_error(self):
        self.run_failing("undefined_name")
        reply, msgs = self.k.execute("'alive'")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(msgs[-1]["content"]["data"], {"text/plain": "'alive'"})


if __name__ == "__main__":
    unittest.main()
