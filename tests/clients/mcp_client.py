"""kiln's MCP server through the official MCP Python SDK (PyPI `mcp`).

    python mcp_client.py http     # streamable HTTP at $KILN_BASE_URL/mcp, Bearer $KILN_API_KEY
    python mcp_client.py stdio    # spawns `$KILN_BIN mcp --url $KILN_BASE_URL --api-key $KILN_API_KEY`
    python mcp_client.py embedded # spawns `$KILN_BIN mcp` (its own kiln; $KILN_DATA_DIR)
    python mcp_client.py languages # streamable HTTP, against a kiln that runs all four languages

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
    init = await s.initialize()
    info = init.serverInfo
    check("the server says it is kiln", info.name == "kiln" and bool(info.version), info)
    tools = {t.name: t for t in (await s.list_tools()).tools}
    expected = {"run_code", "list_sessions", "upload_file", "read_file", "end_session"}
    check("lists the tools", expected <= set(tools), list(tools))
    properties = tools["run_code"].inputSchema.get("properties", {})
    check("run_code has a schema with code, language and memory_limit",
          {"code", "language", "memory_limit"} <= set(properties), properties)

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

    big = {"code": "big = bytearray(400 * 2**20)", "session_id": sid, "memory_limit": "128MiB"}
    r = await s.call_tool("run_code", big)
    check("a run over its memory_limit is stopped with a MemoryError that says what was lost",
          r.isError and "MemoryError" in texts(r) and "128 MiB" in texts(r)
          and "variables and imports were lost" in texts(r), texts(r))
    r = await s.call_tool("run_code", {"code": "x = 40\nprint('alive')", "session_id": sid})
    check("the session lives on after its memory_limit", texts(r).startswith("alive") and not r.isError, texts(r))
    r = await s.call_tool("run_code", {"code": "1", "session_id": sid, "memory_limit": "lots"})
    check("a memory_limit that does not parse is refused as the API refuses it",
          r.isError and texts(r).startswith("invalid_request: memory_limit: "), texts(r))
    r = await s.call_tool("run_code", {"code": "1", "language": "javascript"})
    check("a language this server does not run is refused, naming the ones it does",
          r.isError and texts(r).startswith("unsupported_language: ") and "runs: python" in texts(r), texts(r))

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


async def languages(s: ClientSession):
    """Against a `full` kiln: each language runs, keeps its state, and keeps
    its session to itself."""
    await s.initialize()
    r = await s.call_tool("run_code", {"code": "let y = 40;\nconsole.log('from deno')", "language": "javascript"})
    t = texts(r)
    check("javascript runs", "from deno" in t and not r.isError, t)
    sid = t.split("session_id: ")[1].split()[0]
    r = await s.call_tool("run_code", {"code": "y + 2", "session_id": sid, "language": "javascript"})
    check("a javascript session keeps its state", texts(r).startswith("42"), texts(r))
    r = await s.call_tool("run_code", {"code": "y", "session_id": sid})
    check("python code in a javascript session is refused with its code",
          r.isError and texts(r).startswith("language_mismatch: "), texts(r))
    r = await s.call_tool("run_code", {"code": "const n: number = 21;\nn * 2", "language": "typescript"})
    check("typescript runs", texts(r).startswith("42") and not r.isError, texts(r))
    r = await s.call_tool("run_code", {"code": "echo from-bash; pwd", "language": "bash"})
    check("bash runs", "from-bash" in texts(r) and not r.isError, texts(r))
    r = await s.call_tool("run_code", {"code": "1", "language": "ruby"})
    four = "python, javascript, typescript, bash"
    check("an unknown language is refused, naming the four",
          texts(r).startswith("unsupported_language: ") and four in texts(r), texts(r))


async def main():
    if MODE == "languages":
        headers = {"Authorization": f"Bearer {KEY}"}
        async with streamablehttp_client(BASE + "/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as s:
                await languages(s)
    elif MODE == "http":
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
