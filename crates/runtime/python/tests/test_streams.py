"""Stream output: 64 KiB messages cut on character boundaries, the output
cap (from Python and at fd level), and the memfd capture."""

import os
import random
import unittest

from kiln_kernel.publisher import MAX_STREAM_BYTES, split_utf8, stream_pieces
from kiln_kernel.streams import FdCapture, OutStream
from support import Harness, stream_text

# One character of each UTF-8 length, and text mixing them.
SAMPLES = ["a", "é", "€", "😀"]


def mixed(n, seed=7):
    rng = random.Random(seed)
    return "".join(rng.choice(SAMPLES) for _ in range(n))


def utf8(s):
    return len(s.encode())


class PiecesTest(unittest.TestCase):
    def test_pieces_are_at_most_64_kib_on_character_boundaries_and_lose_nothing(self):
        for text in ["", "short", "a" * (3 * MAX_STREAM_BYTES + 5), "é" * 100_000, "😀" * 50_000,
                     mixed(200_000), mixed(1000) + "a" * MAX_STREAM_BYTES]:
            pieces = stream_pieces(text)
            self.assertEqual("".join(pieces), text)
            for p in pieces:
                self.assertLessEqual(utf8(p), MAX_STREAM_BYTES)
                p.encode()  # a piece never ends inside a character
            if utf8(text) > MAX_STREAM_BYTES:
                # Full pieces: none could have taken the next character.
                for p in pieces[:-1]:
                    self.assertGreater(utf8(p), MAX_STREAM_BYTES - 4)

    def test_split_keeps_the_longest_head_that_fits(self):
        text = mixed(5000, seed=3)
        for limit in (0, 1, 2, 3, 4, 5, 100, 4097, utf8(text), utf8(text) + 10):
            head, tail = split_utf8(text, limit)
            self.assertEqual(head + tail, text)
            self.assertLessEqual(utf8(head), limit)
            if tail:
                self.assertGreater(utf8(head) + utf8(tail[0]), limit)


class StreamTest(unittest.TestCase):
    def setUp(self):
        self.h = Harness()

    def tearDown(self):
        self.h.close()

    def test_a_long_write_goes_out_in_64_kib_messages(self):
        text = mixed(150_000)
        self.h.stdout.write(text)
        self.h.stdout.flush()
        msgs = self.h.messages()
        self.assertGreater(len(msgs), 1)
        self.assertTrue(all(utf8(m["content"]["text"]) <= MAX_STREAM_BYTES for m in msgs))
        self.assertEqual(stream_text(msgs), text)

    def test_without_a_cap_everything_is_sent(self):
        self.h.stdout.write("x" * (1 << 20))
        self.h.stdout.flush()
        msgs = self.h.messages()
        self.assertEqual(len(msgs), (1 << 20) // MAX_STREAM_BYTES)
        self.assertEqual(len(stream_text(msgs)), 1 << 20)

    def test_small_writes_are_buffered_into_one_message(self):
        for i in range(100):
            self.h.stdout.write(f"line {i}\n")
        self.h.stdout.flush()
        msgs = self.h.messages()
        self.assertEqual(len(msgs), 1)
        self.assertEqual(stream_text(msgs), "".join(f"line {i}\n" for i in range(100)))


class CapTest(unittest.TestCase):
    """The server shows output up to the cap, then, when its count passes
    the cap, its marker: the kernel sends exactly the cap, then one message
    that passes it, then nothing."""

    LIMIT = 100_000

    def setUp(self):
        self.h = Harness(limit=self.LIMIT)
        self.p = self.h.publisher

    def tearDown(self):
        self.h.close()

    def assert_capped(self, msgs, shown=None):
        texts = [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"]
        sizes = [utf8(t) for t in texts]
        self.assertTrue(all(s <= MAX_STREAM_BYTES for s in sizes), sizes)
        # All but the last message fit exactly under the cap; the last passes it.
        self.assertEqual(sum(sizes[:-1]), self.LIMIT if shown is None else shown)
        self.assertGreater(sum(sizes), self.LIMIT)
        return "".join(texts[:-1])

    def test_a_huge_write_sends_the_cap_and_one_message_past_it(self):
        n = 50 << 20
        self.assertEqual(self.h.stdout.write("A" * n), n)
        self.assertLessEqual(self.h.stdout._size, self.LIMIT + 1)  # not 50 MB kept
        self.h.stdout.write("more\n")
        print("and more", file=self.h.stderr)
        self.p.flush_streams()
        msgs = self.h.messages()
        self.assertEqual(self.assert_capped(msgs), "A" * self.LIMIT)
        self.assertTrue(self.p.budget.spent)
        self.assertNotIn("more", stream_text(msgs))

    def test_many_small_writes_stop_at_the_cap(self):
        for i in range(20_000):
            self.h.stdout.write(f"{i:09d}\n")
        self.p.flush_streams()
        shown = self.assert_capped(self.h.messages())
        self.assertEqual(shown, "".join(f"{i:09d}\n" for i in range(10_000)))

    def test_the_cap_falls_on_a_character_boundary(self):
        self.h.stdout.write("x" * (self.LIMIT - 1) + "é" * 10)
        self.h.stdout.flush()
        msgs = self.h.messages()
        # 'é' is two bytes: it does not fit in the last byte under the cap.
        shown = self.assert_capped(msgs, shown=self.LIMIT - 1)
        self.assertEqual(shown, "x" * (self.LIMIT - 1))

    def test_stdout_and_stderr_share_one_cap(self):
        self.h.stdout.write("o" * 60_000)
        self.h.stdout.flush()
        self.h.stderr.write("e" * 60_000)
        self.h.stderr.flush()
        msgs = self.h.messages()
        self.assert_capped(msgs)
        self.assertEqual(stream_text(msgs, "stdout"), "o" * 60_000)

    def test_output_exactly_at_the_cap_is_all_shown_without_passing_it(self):
        self.h.stdout.write("z" * self.LIMIT)
        self.h.stdout.flush()
        msgs = self.h.messages()
        self.assertEqual(stream_text(msgs), "z" * self.LIMIT)
        self.assertFalse(self.p.budget.spent)


class FdCaptureTest(unittest.TestCase):
    """fd-level output (os.write, subprocesses) on a spare descriptor
    standing in for fd 1."""

    def setUp(self):
        self.h = Harness(limit=CapTest.LIMIT)
        self.fd = os.open(os.devnull, os.O_WRONLY)
        self.cap = FdCapture(self.fd, "stdout")
        self.out = OutStream(self.h.publisher, "stdout", self.cap)
        self.h.publisher.streams = (self.out,)

    def tearDown(self):
        for fd in (self.fd, self.cap.orig, self.cap.mfd):
            os.close(fd)
        self.h.close()

    def test_fd_output_is_published_at_the_next_flush(self):
        os.write(self.fd, "from fd ☃\n".encode())
        self.out.write("python\n")
        self.out.flush()
        self.assertEqual(stream_text(self.h.messages()), "from fd ☃\npython\n")

    def test_a_character_split_across_writes_is_decoded_whole(self):
        snow = "☃".encode()
        os.write(self.fd, snow[:1])
        self.out.flush()
        os.write(self.fd, snow[1:] + b"\n")
        self.out.flush()
        self.assertEqual(stream_text(self.h.messages()), "☃\n")

    def test_huge_fd_output_is_capped_chunked_and_freed(self):
        block = b"F" * (1 << 20)
        for _ in range(20):
            os.write(self.fd, block)
        self.out.flush()
        msgs = self.h.messages()
        sizes = [utf8(m["content"]["text"]) for m in msgs]
        self.assertTrue(all(s <= MAX_STREAM_BYTES for s in sizes), sizes)
        self.assertEqual(sum(sizes[:-1]), CapTest.LIMIT)
        self.assertGreater(sum(sizes), CapTest.LIMIT)
        self.assertLess(sum(sizes), CapTest.LIMIT + 2 * MAX_STREAM_BYTES)
        # What lies past the cap is dropped from the memfd, and later output
        # of the same request too.
        self.assertEqual(os.fstat(self.cap.mfd).st_size, 0)
        os.write(self.fd, block)
        self.out.write("after\n")
        self.out.flush()
        self.assertEqual(self.h.messages(), [])
        self.assertEqual(os.fstat(self.cap.mfd).st_size, 0)

    def test_reset_frees_what_was_read(self):
        os.write(self.fd, b"x" * 1000)
        self.out.flush()
        self.assertEqual(os.fstat(self.cap.mfd).st_size, 1000)
        self.cap.reset()
        self.assertEqual(os.fstat(self.cap.mfd).st_size, 0)
        os.write(self.fd, b"next\n")  # O_APPEND: at the new start, no hole
        self.out.flush()
        self.assertEqual(stream_text(self.h.messages()), "x" * 1000 + "next\n")


if __name__ == "__main__":
    unittest.main()
