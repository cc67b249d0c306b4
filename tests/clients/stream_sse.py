"""Stream an execution's outputs as the kernel produces them.

The README's example of kiln's streamed execute (Server-Sent Events), with
a common SSE client (httpx-sse). Usage:

    KILN_URL=http://127.0.0.1:8787 KILN_API_KEY=... python stream_sse.py
"""

import json
import os

import httpx
from httpx_sse import connect_sse

url = os.environ.get("KILN_URL", "http://127.0.0.1:8787")
key = os.environ["KILN_API_KEY"]
code = "import time\nfor i in range(3):\n    print('tick', i)\n    time.sleep(1)\n'done'"

with httpx.Client(timeout=None) as client:
    with connect_sse(
        client,
        "POST",
        f"{url}/v1/tci/execute",
        headers={"Authorization": f"Bearer {key}"},
        json={"language": "python", "code": code, "stream": True},
    ) as events:
        for sse in events.iter_sse():
            data = json.loads(sse.data)
            if sse.event == "session":
                print("session", data["session_id"], flush=True)
            elif sse.event in ("stdout", "stderr"):
                print(f"{sse.event}: {data['data']}", end="", flush=True)
            elif sse.event == "done":  # exactly what a plain call returns
                print("status", data["data"]["status"], flush=True)
            elif sse.event == "failed":  # kiln could not run it (not the code's error)
                raise SystemExit(f"failed: {data['errors'][0]['message']}")
