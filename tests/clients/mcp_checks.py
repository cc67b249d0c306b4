"""What kiln's MCP test programs (mcp_client.py, mcp_cluster.py) share: one
line per check, then `N passed, M failed`, and an exit status of 1 on a
failure or when nothing was checked."""
import asyncio
import sys


class Checks:
    def __init__(self, prefix):
        self.prefix = prefix
        self.results = []

    def __call__(self, name, ok, detail=""):
        self.results.append(ok)
        line = ("ok - " if ok else "not ok - ") + f"{self.prefix}: {name}" + ("" if ok else f" ({detail})")
        print(line, flush=True)

    def run(self, main, timeout):
        """Run the coroutine `main` within `timeout` seconds, print the totals and exit."""
        asyncio.run(asyncio.wait_for(main, timeout))
        passed = sum(self.results)
        print(f"{passed} passed, {len(self.results) - passed} failed")
        sys.exit(0 if self.results and all(self.results) else 1)


def texts(result):
    """The text parts of a tool call's result, joined."""
    return "".join(c.text for c in result.content if c.type == "text")
