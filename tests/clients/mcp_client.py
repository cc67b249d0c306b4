"""kiln's MCP server through the official MCP Python SDK (PyPI `mcp`).

    python mcp_client.py http     # streamable HTTP at $KILN_BASE_URL/mcp, Bearer $KILN_API_KEY
    python mcp_client.py stdio    # spawns `$KILN_BIN mcp --url $KILN_BASE_URL --api-key $KILN_API_KEY`
    python mcp_client.py embedded # spawns `$KILN_BIN mcp` (its own kiln; $KILN_DATA_DIR)

Prints one line per check and `N passed, M failed`; exits 1 on a failure.
"""
import base64
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client
from mcp_checks import Checks, texts

MODE = sys.argv[1]
BASE = os.environ.get("KILN_BASE_URL", "")
KEY = os.environ.get("KILN_API_KEY", "")
BIN = os.environ.get("KILN_BIN", "kiln")
check = Checks(f"mcp-{MODE}")


async def exercise(s: ClientSession):
    await s.initialize()
    tools = {t.name: t for t in (await s.list_tools()).tools}
    expected = {"run_code", "list_sessions", "upload_file", "read_file", "end_session"}
    check("lists the tools", expected <= set(tools), list(tools))
    check("run_code has a schema with code", "code" in tools["run_code"].inputSchema.get("properties", {}))

    r = await s.call_tool("run_code", {"code": "x = 40\nprint('hello from kiln')\nx + 2"})
    t = texts(r)
    check("run_code prints", "hello from kiln" in t and not r.isError, t)
    check("run_code returns the last value", "42" in t, t)
    sid = t.split("session_id: ")[1].split()[0]
    check("run_code says its session", sid.startswith("ses_"), t)

    r = await s.call_tool("run_code", {"code": "print(x)", "session_id": sid})
    check("state persists in the session", texts(r).startswith("40"), texts(r))

    progress = []

    async def on_progress(done, total, message):
        progress.append((done, message))

    code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')"
    r = await s.call_tool("run_code", {"code": code, "session_id": sid}, progress_callback=on_progress)
    messages = "".join(m or "" for _, m in progress)
    check("run_code reports outputs as progress while it runs", "first" in messages and "second" in messages, progress)
    check("progress counts up", [d for d, _ in progress] == sorted(d for d, _ in progress), progress)

    plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);"
    r = await s.call_tool("run_code", {"code": plot, "session_id": sid})
    images = [c for c in r.content if c.type == "image"]
    check("a plot comes back as an image", len(images) == 1 and images[0].mimeType == "image/png"
          and base64.b64decode(images[0].data)[:4] == b"\x89PNG", r.content)

    r = await s.call_tool("run_code", {"code": "1/0", "session_id": sid})
    check("an exception is a readable tool error", r.isError and "ZeroDivisionError" in texts(r), texts(r))

    upload = {"name": "notes/a.txt", "content": "uploaded text"}
    r = await s.call_tool("upload_file", {"session_id": sid, "file": upload})
    check("upload_file", not r.isError, texts(r))
    r = await s.call_tool("read_file", {"session_id": sid, "path": "notes/a.txt"})
    check("read_file", texts(r) == "uploaded text", texts(r))
    r = await s.call_tool("run_code", {"code": "print(open('notes/a.txt').read())", "session_id": sid})
    check("the code sees the upload", "uploaded text" in texts(r), texts(r))

    r = await s.call_tool("list_sessions", {})
    check("list_sessions includes it", sid in texts(r), texts(r))
    r = await s.call_tool("end_session", {"session_id": sid})
    check("end_session", not r.isError, texts(r))
    r = await s.call_tool("run_code", {"code": "1", "session_id": sid})
    check("an ended session is a readable error", r.isError and "expired" in texts(r), texts(r))
    check("errors carry the API's stable code", texts(r).startswith("session_expired: "), texts(r))
    r = await s.call_tool("read_file", {"session_id": "ses_nope", "path": "../etc/passwd"})
    check("a path that escapes is refused with its code", texts(r).startswith("invalid_file: "), texts(r))


async def main():
    if MODE == "http":
        headers = {"Authorization": f"Bearer {KEY}"}
        async with streamablehttp_client(BASE + "/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as s:
                await exercise(s)
    else:
        args = ["mcp", "--url", BASE, "--api-key", KEY] if MODE == "stdio" else ["mcp"]
        params = StdioServerParameters(command=BIN, args=args, env=dict(os.environ))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as s:
                await exercise(s)


check.run(main(), 300)
