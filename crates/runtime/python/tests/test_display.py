"""Displays, results and clear_output, through a real kernel and against
the output cap."""

import unittest

from kiln_kernel.display import ZMQDisplayPublisher
from kiln_kernel.publisher import bundle_size
from support import Harness, live_kernel, stream_text


def outputs(msgs):
    """(msg_type, content) of each message but execute_input."""
    return [(m["msg_type"], m["content"]) for m in msgs if m["msg_type"] != "execute_input"]


class DisplayThroughTheKernelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.k = live_kernel()

    def test_display_sends_the_bundle_after_the_text_printed_before_it(self):
        reply, msgs = self.k.execute(
            "from IPython.display import display, HTML\nprint('before')\ndisplay(HTML('<b>x</b>'))")
        self.assertEqual(reply["content"]["status"], "ok")
        (t1, c1), (t2, c2) = outputs(msgs)
        self.assertEqual((t1, c1), ("stream", {"name": "stdout", "text": "before\n"}))
        self.assertEqual(t2, "display_data")
        self.assertEqual(c2["data"]["text/html"], "<b>x</b>")
        self.assertIn("text/plain", c2["data"])
        self.assertEqual((c2["metadata"], c2["transient"]), ({}, {}))

    def test_a_display_id_is_transient_and_updates_send_update_display_data(self):
        _, msgs = self.k.execute(
            "from IPython.display import display\nh = display('v1', display_id='d1')\nh.update('v2')")
        (t1, c1), (t2, c2) = outputs(msgs)
        self.assertEqual((t1, c1["transient"], c1["data"]), ("display_data", {"display_id": "d1"},
                                                             {"text/plain": "'v1'"}))
        self.assertEqual((t2, c2["transient"], c2["data"]), ("update_display_data", {"display_id": "d1"},
                                                             {"text/plain": "'v2'"}))

    def test_clear_output_follows_the_text_before_it(self):
        _, msgs = self.k.execute(
            "from IPython.display import clear_output\nprint('gone')\nclear_output()\nprint('kept')\n"
            "clear_output(wait=True)")
        self.assertEqual(outputs(msgs), [
            ("stream", {"name": "stdout", "text": "gone\n"}),
            ("clear_output", {"wait": False}),
            ("stream", {"name": "stdout", "text": "kept\n"}),
            ("clear_output", {"wait": True}),
        ])

    def test_a_value_is_an_execute_result_with_its_count(self):
        reply, msgs = self.k.execute("print('p')\n6 * 7")
        count = reply["content"]["execution_count"]
        self.assertEqual(outputs(msgs), [
            ("stream", {"name": "stdout", "text": "p\n"}),
            ("execute_result", {"data": {"text/plain": "42"}, "metadata": {}, "execution_count": count}),
        ])

    def test_a_semicolon_or_none_shows_nothing(self):
        for code in ("42;", "None", "x = 1"):
            _, msgs = self.k.execute(code)
            self.assertEqual(outputs(msgs), [], code)

    def test_output_past_the_cap_stops_until_clear_output(self):
        p = self.k.publisher
        p.budget.limit = 1000
        try:
            _, msgs = self.k.execute(
                "from IPython.display import display, clear_output\n"
                "for i in range(100):\n    print('x' * 99)\n"
                "display('not shown')\n"
                "clear_output()\n"
                "print('shown again')\n"
                "'result'")
        finally:
            p.budget.limit = None
        kinds = [t for t, _ in outputs(msgs)]
        self.assertNotIn("display_data", kinds)
        at = kinds.index("clear_output")
        before = [c for t, c in outputs(msgs)[:at]]
        self.assertEqual(sum(len(c["text"]) for c in before[:-1]), 1000)
        self.assertGreater(sum(len(c["text"]) for c in before), 1000)
        self.assertEqual(outputs(msgs)[at + 1:], [
            ("stream", {"name": "stdout", "text": "shown again\n"}),
            ("execute_result", {"data": {"text/plain": "'result'"}, "metadata": {},
                                "execution_count": msgs[0]["content"]["execution_count"]}),
        ])


class DisplayCapTest(unittest.TestCase):
    LIMIT = 10_000

    def setUp(self):
        self.h = Harness(limit=self.LIMIT)
        self.pub = ZMQDisplayPublisher()
        self.pub.publisher = self.h.publisher

    def tearDown(self):
        self.h.close()

    def show(self, text, **kw):
        self.pub.publish({"text/plain": text}, **kw)

    def test_displays_count_against_the_cap_and_the_one_past_it_is_the_last(self):
        for i in range(5):
            self.show(str(i) * 3000)  # 3010 bytes each as the server counts
        msgs = self.h.messages()
        sizes = [bundle_size(m["content"]["data"]) for m in msgs]
        self.assertEqual(sizes, [3010] * 4)
        self.assertGreater(sum(sizes), self.LIMIT)
        self.assertTrue(self.h.publisher.budget.spent)

    def test_a_display_larger_than_the_cap_is_replaced_by_a_stand_in_just_past_it(self):
        self.h.stdout.write("a" * 4000)
        self.show("B" * (5 << 20))
        msgs = self.h.messages()
        self.assertEqual(stream_text(msgs), "a" * 4000)
        (d,) = [m for m in msgs if m["msg_type"] == "display_data"]
        self.assertEqual(bundle_size(d["content"]["data"]), self.LIMIT - 4000 + 1)
        size = len("text/plain") + (5 << 20)
        self.assertIn(f"a display of {size} bytes", d["content"]["data"]["text/plain"])
        self.assertNotIn("B", d["content"]["data"]["text/plain"])

    def test_updates_are_not_counted_but_never_larger_than_the_cap(self):
        self.show("u" * 100, update=True, transient={"display_id": "d"})
        self.show("U" * (self.LIMIT + 1), update=True, transient={"display_id": "d"})
        msgs = self.h.messages()
        self.assertEqual([m["msg_type"] for m in msgs], ["update_display_data"])
        self.assertEqual(self.h.publisher.budget.used, 0)

    def test_clear_output_is_sent_even_when_the_cap_is_spent_and_restarts_it(self):
        self.show("s" * (self.LIMIT + 1))
        self.pub.clear_output(wait=True)
        self.show("again")
        msgs = self.h.messages()
        self.assertEqual([m["msg_type"] for m in msgs], ["display_data", "clear_output", "display_data"])
        self.assertEqual(msgs[2]["content"]["data"], {"text/plain": "again"})

    def test_a_hook_on_the_display_publisher_sees_displays_and_clears(self):
        seen = []
        self.pub.register_hook(lambda m: seen.append(m["msg_type"]) or m)
        self.show("x")
        self.pub.clear_output()
        self.h.stdout.write("not a display\n")
        self.h.stdout.flush()
        self.assertEqual(seen, ["display_data", "clear_output"])
        self.assertEqual(len(self.h.messages()), 3)


if __name__ == "__main__":
    unittest.main()
