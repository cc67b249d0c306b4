"""The publisher: signing, parenting, hooks and the per-request budget."""

import unittest

from kiln_kernel.publisher import Publisher, bundle_size, output_limit
from kiln_kernel.wire import Session
from support import KEY, Harness, request, stream_text


class PublisherTest(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.p = self.h.publisher

    def tearDown(self):
        self.h.close()

    def test_every_message_is_signed_and_parented_to_the_current_request(self):
        self.p.send("status", {"execution_state": "busy"}, self.p.topic_status)
        self.p.stream("stdout", "hello\n")
        msgs = self.h.messages()  # Harness.messages verifies each signature
        self.assertEqual([m["msg_type"] for m in msgs], ["status", "stream"])
        for m in msgs:
            self.assertEqual(m["parent_header"], self.h.parent["header"])
        self.assertEqual(msgs[1]["content"], {"name": "stdout", "text": "hello\n"})

    def test_a_message_signed_with_another_key_is_refused_by_the_receiver(self):
        other = Publisher(Session(b"not-the-key"), "k")
        other.socket = self.p.socket
        other.send("status", {"execution_state": "idle"}, b"t")
        frames = self.h.rx.recv_multipart()
        with self.assertLogs("kiln_kernel", "ERROR"):
            self.assertIsNone(Session(KEY.encode()).parse(frames))

    def test_topics_name_the_kernel_and_follow_a_new_identity(self):
        self.assertEqual(self.p.topic_status, b"kernel.test-kernel.status")
        self.p.adopt(self.h.session, "other")
        self.assertEqual(self.p.topic_error, b"kernel.other.error")
        self.p.send("error", {"ename": "E", "evalue": "", "traceback": []}, self.p.topic_error)
        self.assertEqual(self.h.rx.recv_multipart()[0], b"kernel.other.error")

    def test_an_explicit_parent_overrides_the_current_request(self):
        control = request(self.h.session, "kernel_info_request")
        self.p.send("status", {"execution_state": "busy"}, self.p.topic_status, parent=control["_raw_header"])
        (m,) = self.h.messages()
        self.assertEqual(m["parent_header"]["msg_id"], control["header"]["msg_id"])
        self.assertEqual(self.p.parent_header, self.h.parent["header"])

    def test_nothing_is_sent_without_a_socket(self):
        sock, self.p.socket = self.p.socket, None
        self.p.send("status", {"execution_state": "busy"}, b"t")
        self.p.stream("stdout", "lost\n")
        self.p.rich("display", "display_data", {"data": {"text/plain": "x"}, "metadata": {}, "transient": {}},
                    b"display_data")
        self.p.clear_output(False)
        self.p.socket = sock
        self.p.stream("stdout", "kept\n")
        self.assertEqual(stream_text(self.h.messages()), "kept\n")

    def test_hooks_see_change_or_swallow_their_channel_only(self):
        seen = []

        def shout(msg):
            seen.append(msg["msg_type"])
            msg["content"]["text"] = msg["content"]["text"].upper()
            return msg

        self.h.stdout.register_hook(shout)
        self.h.stdout.write("quiet\n")
        self.h.stderr.write("err\n")
        self.p.flush_streams()
        msgs = self.h.messages()
        self.assertEqual(stream_text(msgs, "stdout"), "QUIET\n")
        self.assertEqual(stream_text(msgs, "stderr"), "err\n")
        self.assertEqual(seen, ["stream"])

        self.assertTrue(self.h.stdout.unregister_hook(shout))
        self.assertFalse(self.h.stdout.unregister_hook(shout))
        self.h.stdout.register_hook(lambda msg: None)
        self.h.stdout.write("swallowed\n")
        self.h.stdout.flush()
        self.assertEqual(self.h.messages(), [])

    def test_a_hook_gets_the_message_as_ipykernel_builds_it(self):
        got = []
        self.p.register_hook("display", lambda msg: got.append(msg) or msg)
        self.p.rich("display", "display_data", {"data": {"text/plain": "x"}, "metadata": {}, "transient": {}},
                    b"display_data")
        (msg,) = got
        self.assertEqual(msg["msg_type"], "display_data")
        self.assertEqual(msg["parent_header"], self.h.parent["header"])
        self.assertEqual(msg["header"]["msg_type"], "display_data")
        self.assertEqual(len(self.h.messages()), 1)

    def test_flush_streams_sends_the_text_written_first_first(self):
        self.h.stdout.write("1")
        self.h.stderr.write("2")
        self.p.flush_streams()
        self.assertEqual([m["content"]["name"] for m in self.h.messages()], ["stdout", "stderr"])
        self.h.stderr.write("3")
        self.h.stdout.write("4")
        self.p.flush_streams()
        self.assertEqual([m["content"]["name"] for m in self.h.messages()], ["stderr", "stdout"])

    def test_a_new_request_starts_a_fresh_budget(self):
        self.p.budget.limit = 10
        self.p.stream("stdout", "x" * 50)
        self.assertTrue(self.p.budget.spent)
        self.p.set_parent([b"c"], request(self.h.session, "execute_request", {"code": ""}))
        self.assertFalse(self.p.budget.spent)
        self.assertEqual(self.p.budget.used, 0)


class LimitTest(unittest.TestCase):
    def test_the_cap_comes_from_the_environment_and_nonsense_means_none(self):
        self.assertEqual(output_limit({"KILN_MAX_OUTPUT_BYTES": "1048576"}), 1 << 20)
        for bad in ({}, {"KILN_MAX_OUTPUT_BYTES": ""}, {"KILN_MAX_OUTPUT_BYTES": "lots"},
                    {"KILN_MAX_OUTPUT_BYTES": "0"}, {"KILN_MAX_OUTPUT_BYTES": "-5"}):
            self.assertIsNone(output_limit(bad), bad)

    def test_a_bundle_counts_as_the_server_counts_it_never_more(self):
        self.assertEqual(bundle_size({"text/plain": "abc"}), len("text/plain") + 3)
        self.assertEqual(bundle_size({"text/plain": "é"}), len("text/plain") + 2)
        # Non-strings as compact JSON.
        self.assertEqual(bundle_size({"application/json": {"a": [1, 2]}}), len("application/json") + 11)
        # Python's exponents (1e+16, 1e-06) are a byte longer than the
        # server's (1e16, 1e-6); integers past 64 bits may come back short.
        self.assertEqual(bundle_size({"application/json": [1e16, 1e-06]}), len("application/json") + 11)
        self.assertLessEqual(bundle_size({"application/json": [10**30]}), len("application/json") + 6)
        self.assertEqual(bundle_size(None), 0)


if __name__ == "__main__":
    unittest.main()
