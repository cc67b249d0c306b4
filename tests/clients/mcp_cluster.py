"""kiln's MCP tools through a load balancer in front of a cluster, with the
official MCP Python SDK (PyPI `mcp`) over streamable HTTP.

    python mcp_cluster.py keep            # a session made with run_code keeps its state across calls
    python mcp_cluster.py lost SESSION_ID # every tool naming SESSION_ID answers session_lost

Round robin sends consecutive requests to different nodes, so the calls of
`keep` reach the session through every node. `keep` prints
`session_id: <id>` for the caller; both print one line per check and
`N passed, M failed`, and exit 1 on a failure.
"""
import os
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp_checks import Checks, texts

MODE = sys.argv[1]
BASE = os.environ["KILN_BASE_URL"]
KEY = os.environ["KILN_API_KEY"]
check = Checks("mcp-cluster")


async def keep(s: ClientSession):
    r = await s.call_tool("run_code", {"code": "x = 40\nx"})
    t = texts(r)
    check("run_code starts a session", not r.isError and "40" in t, t)
    sid = t.split("session_id: ")[1].split()[0]
    # Six calls: round robin over three nodes reaches each one twice.
    for n in range(41, 47):
        r = await s.call_tool("run_code", {"code": "x += 1\nprint(x)", "session_id": sid})
        check(f"the session keeps x (call {n - 40})", not r.isError and texts(r).startswith(f"{n}\n"), texts(r))
    for i in range(3):
        r = await s.call_tool("upload_file", {"session_id": sid, "file": {"name": f"f{i}.txt", "content": f"c{i}"}})
        check(f"upload_file {i}", not r.isError, texts(r))
    for i in range(3):
        r = await s.call_tool("read_file", {"session_id": sid, "path": f"f{i}.txt"})
        check(f"read_file {i}", not r.isError and texts(r) == f"c{i}", texts(r))
    progress = []

    async def on_progress(done, total, message):
        progress.append(message or "")

    for _ in range(3):
        progress.clear()
        code = "print('first', flush=True)\nimport time; time.sleep(0.3)\nprint(x)"
        r = await s.call_tool("run_code", {"code": code, "session_id": sid}, progress_callback=on_progress)
        check("progress is streamed from the session's node", "first" in "".join(progress) and "46" in texts(r),
              (progress, texts(r)))
    r = await s.call_tool("list_sessions", {})
    check("list_sessions includes it", sid in texts(r), texts(r))
    print(f"session_id: {sid}", flush=True)


async def lost(s: ClientSession, sid: str):
    calls = [
        ("run_code", {"code": "print(1)", "session_id": sid}),
        ("upload_file", {"session_id": sid, "file": {"name": "a.txt", "content": "a"}}),
        ("read_file", {"session_id": sid, "path": "a.txt"}),
        ("end_session", {"session_id": sid}),
    ]
    # Twice each: every node the balancer picks says the same.
    for name, args in calls * 2:
        r = await s.call_tool(name, args)
        check(f"{name} answers session_lost", r.isError and texts(r).startswith("session_lost: "), texts(r))


async def main():
    headers = {"Authorization": f"Bearer {KEY}"}
    async with streamablehttp_client(BASE + "/mcp", headers=headers) as (read, write, _):
        async with ClientSession(read, write) as s:
            await s.initialize()
            if MODE == "keep":
                await keep(s)
            else:
                await lost(s, sys.argv[2])


check.run(main(), 120)
