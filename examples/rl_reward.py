"""Rewards for generated solutions, from kiln's batch API.

An RL loop samples programs from a policy; this turns each into a reward:
the fraction of its problem's tests it passes, run and scored by kiln in
sandboxes (``POST /v1/tci/batch``). Copy it and replace ``PROBLEMS`` and
``generated_solutions()`` with your data set and your policy's samples.

    pip install httpx
    KILN_BASE_URL=http://127.0.0.1:8787 KILN_API_KEY=... python rl_reward.py

What it shows:

* one batch per at most 1,000 candidates, several batches in flight
  (asyncio), each streamed as NDJSON so a reward is known the moment its
  candidate is scored, never after the slowest one;
* ``infra_error`` (kiln's failure, after kiln's own retry) is not a wrong
  answer: such a candidate gets no reward and is sent again, never a 0;
* 429 ``rate_limited`` is waited out (``Retry-After``), not counted as a
  failure.

It prints one line per candidate as it is scored, then one JSON line with
every reward (the suite runs it against a real server and checks that line).
"""

import asyncio
import json
import os
import sys

import httpx

# A small problem set: each problem is a set of tests. Program tests run the
# candidate as a program with `stdin` and compare what it prints; assertion
# tests run after the candidate's code, in its namespace.
PROBLEMS = {
    "add": [
        {"stdin": "1 2\n", "expected_stdout": "3\n"},
        {"stdin": "-5 5\n", "expected_stdout": "0\n"},
        {"stdin": "100 23\n", "expected_stdout": "123\n"},
    ],
    "reverse": [
        {"stdin": "kiln\n", "expected_stdout": "nlik\n"},
        {"stdin": "a\n", "expected_stdout": "a\n"},
    ],
    "primes": [
        {"stdin": "10\n", "expected_stdout": "4\n"},
        {"stdin": "2\n", "expected_stdout": "0\n"},
        {"stdin": "100\n", "expected_stdout": "25\n"},
    ],
    "fib": [
        {"code": "assert fib(0) == 0"},
        {"code": "assert fib(1) == 1"},
        {"code": "assert fib(10) == 55"},
        {"code": "assert fib(60) == 1548008755920"},  # naive recursion: never within the limit
    ],
}


def generated_solutions():
    """Stand-in for a policy's samples: (candidate id, problem, code)."""
    return [
        ("add/right", "add", "a, b = map(int, input().split())\nprint(a + b)"),
        ("add/wrong", "add", "a, b = map(int, input().split())\nprint(a - b)"),
        ("add/raises-after-answer", "add", "a, b = map(int, input().split())\nprint(a + b)\n1/0"),
        ("reverse/right", "reverse", "print(input()[::-1])"),
        ("reverse/prints-nothing", "reverse", "import sys, io\nsys.stdout = io.StringIO()\nprint(input()[::-1])"),
        (
            "primes/right",
            "primes",
            "n = int(input())\nprint(sum(all(k % d for d in range(2, int(k**0.5) + 1)) for k in range(2, n)))",
        ),
        (
            "primes/off-by-one",
            "primes",
            "n = int(input())\nprint(sum(all(k % d for d in range(2, k)) for k in range(2, n + 1)))",
        ),
        ("primes/loops-forever", "primes", "while True:\n    pass"),
        (
            "fib/right",
            "fib",
            "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        ),
        ("fib/slow", "fib", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"),
    ]


BATCH_SIZE = 1000  # the most items one batch may hold
BATCHES_IN_FLIGHT = 2
TEST_TIMEOUT = 2.0  # seconds per test


def item(problem: str, code: str) -> dict:
    return {"code": code, "tests": PROBLEMS[problem], "tests_timeout": TEST_TIMEOUT, "memory_limit": "256MiB"}


def reward(result: dict):
    """The fraction of tests passed; None when kiln failed (do not train on it)."""
    if result["status"] == "infra_error":
        return None
    total = result.get("passed", 0) + result.get("failed", 0)
    return result.get("passed", 0) / total if total else 0.0


async def score_batch(client: httpx.AsyncClient, candidates, on_result):
    """Send one batch, streamed; call ``on_result`` as each item is scored.
    Returns the candidates kiln could not run (to send again)."""
    body = {"items": [item(problem, code) for _, problem, code in candidates]}
    while True:
        async with client.stream(
            "POST", "/v1/tci/batch", json=body, headers={"Accept": "application/x-ndjson"}
        ) as resp:
            if resp.status_code == 429:
                await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                continue
            if resp.status_code != 200:
                await resp.aread()
                raise RuntimeError(f"batch refused ({resp.status_code}): {resp.text}")
            again = []
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue  # a keep-alive
                msg = json.loads(line)
                if "totals" in msg:
                    break
                candidate = candidates[msg["index"]]
                r = reward(msg)
                if r is None:
                    again.append(candidate)
                else:
                    on_result(candidate, msg, r)
            return again


async def main() -> None:
    base = os.environ.get("KILN_BASE_URL", "http://127.0.0.1:8787")
    key = os.environ["KILN_API_KEY"]
    rewards = {}

    def on_result(candidate, result, r):
        cid = candidate[0]
        rewards[cid] = r
        print(f"{cid:28} {result['status']:16} {result.get('passed', 0)}/{len(PROBLEMS[candidate[1]])} reward {r:.2f}")

    pending = generated_solutions()
    limit = asyncio.Semaphore(BATCHES_IN_FLIGHT)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(60.0, read=None)) as client:

        async def run(chunk):
            async with limit:
                return await score_batch(client, chunk, on_result)

        for _ in range(3):
            if not pending:
                break
            chunks = [pending[i : i + BATCH_SIZE] for i in range(0, len(pending), BATCH_SIZE)]
            leftovers = await asyncio.gather(*(run(c) for c in chunks))
            pending = [c for chunk in leftovers for c in chunk]
            if pending:
                print(f"{len(pending)} candidates hit kiln failures; sending them again", file=sys.stderr)
    print(json.dumps({"rewards": rewards, "unscored": [c[0] for c in pending]}))


if __name__ == "__main__":
    asyncio.run(main())
