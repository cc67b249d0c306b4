#!/usr/bin/env python3
"""Run the documented TCI examples through the real PyPI `together` 1.5.x client.

Run with the py1 venv made by scripts/setup-clients:

    scripts/setup-clients                      # once; fast when already done
    KILN_BASE_URL=http://127.0.0.1:8787 KILN_API_KEY=... \
        ~/.cache/kiln-test/clients/py1/bin/python tests/clients/seeds_together_v1.py

The client is built exactly as a user would: Together(api_key=..., base_url=BASE + "/v1").
1.x appends a slash to base_url and then joins "/tci/execute", so it requests
POST /v1//tci/execute (and POST //tci/execute with a bare-host base_url, also checked).
1.x has no sessions-list method (its CodeInterpreter only has run()), so the
"list sessions" step is not run here (see seeds_together_v2.py / seeds_curl.sh).

Prints one line per check and ends with "N passed, M failed"; exits 1 on any failure.
KILN_TEST_TIMEOUT (seconds, default 600) bounds the whole run.
"""
from __future__ import annotations

import base64
import os
import signal
import sys
import traceback

os.environ.setdefault("TOGETHER_NO_BANNER", "1")  # 1.5.x prints a 'new SDK' banner on import

import together
from together import Together

NAME = "together-v1"
BASE = os.environ.get("KILN_BASE_URL", "").rstrip("/")
KEY = os.environ.get("KILN_API_KEY", "")
if not BASE or not KEY:
    sys.exit(f"{NAME}: set KILN_BASE_URL (e.g. http://127.0.0.1:8787) and KILN_API_KEY")

PASSED = 0
FAILED = 0


def _on_alarm(signum, frame):
    print(f"not ok - {NAME}: whole run exceeded KILN_TEST_TIMEOUT; server hung?", flush=True)
    print(f"{PASSED} passed, {FAILED + 1} failed", flush=True)
    os._exit(1)


signal.signal(signal.SIGALRM, _on_alarm)
signal.alarm(int(os.environ.get("KILN_TEST_TIMEOUT", "600")))


def ok(name: str, cond: bool, detail: str = "") -> bool:
    global PASSED, FAILED
    if cond:
        PASSED += 1
        print(f"ok - {NAME}: {name}", flush=True)
    else:
        FAILED += 1
        print(f"not ok - {NAME}: {name}" + (f"\n    {detail}" if detail else ""), flush=True)
    return cond


def info(msg: str) -> None:
    print(f"# {NAME}: {msg}", flush=True)


def crashed(name: str, e: BaseException) -> None:
    tb = "".join(traceback.format_exception_only(type(e), e)).strip()
    ok(name, False, f"raised {type(e).__module__}.{type(e).__name__}: {tb}")


def outs(resp):
    return [(o.type, o.data) for o in resp.data.outputs]


def stdout_text(resp) -> str:
    return "".join(d for t, d in outs(resp) if t == "stdout" and isinstance(d, str))


def errors_of(resp):
    return [d for t, d in outs(resp) if t == "error"]


def norm(s: str) -> str:
    return s.replace("\r\n", "\n").rstrip("\n")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

DATA_ANALYSIS = '''
!pip install numpy
import numpy as np
# Create a random matrix
matrix = np.random.rand(3, 3)
print("Random matrix:")
print(matrix)
# Calculate eigenvalues
eigenvalues = np.linalg.eigvals(matrix)
print("\\nEigenvalues:")
print(eigenvalues)
'''


def main() -> int:
    info(f"together {together.version} against {BASE}")
    # As a user would: base URL of the API, ending in /v1. The client adds a trailing
    # slash and then requests base_url + "/tci/execute" = /v1//tci/execute.
    client = Together(api_key=KEY, base_url=BASE + "/v1")
    ci = client.code_interpreter

    # 1. first query
    try:
        r = ci.run(code='print("Welcome to Together Code Interpreter!")', language="python")
        ok("welcome: stdout exact", ("stdout", "Welcome to Together Code Interpreter!\n") in outs(r),
           f"outputs={outs(r)!r}")
        ok("welcome: status is a non-empty str", isinstance(r.data.status, str) and r.data.status != "",
           f"status={r.data.status!r}")
        ok("welcome: session_id looks like ses_...", isinstance(r.data.session_id, str)
           and r.data.session_id.startswith("ses_"), f"session_id={r.data.session_id!r}")
        ok("welcome: no error outputs", not errors_of(r), f"outputs={outs(r)!r}")
        info(f"printed by the docs' example: 'Status: {r.data.status}'")
    except Exception as e:
        crashed("welcome: run()", e)

    # 2. session reuse
    try:
        r1 = ci.run(code="x = 42", language="python")
        sid = r1.data.session_id
        ok("reuse: first call gives a session_id", bool(sid), f"data={r1.data!r}")
        r2 = ci.run(code='print(f"The value of x is {x}")', language="python", session_id=sid)
        ok("reuse: stdout exact", ("stdout", "The value of x is 42\n") in outs(r2), f"outputs={outs(r2)!r}")
        ok("reuse: same session_id returned", r2.data.session_id == sid,
           f"{r2.data.session_id!r} != {sid!r}")
    except Exception as e:
        crashed("reuse: run()", e)

    # 3. data analysis
    try:
        r = ci.run(code=DATA_ANALYSIS, language="python")
        out = stdout_text(r)
        ok("data analysis: 'Random matrix:' in stdout", "Random matrix:" in out, f"outputs={outs(r)!r}")
        ok("data analysis: 'Eigenvalues:' in stdout", "Eigenvalues:" in out, f"outputs={outs(r)!r}")
        ok("data analysis: no error outputs", not errors_of(r), f"errors={errors_of(r)!r}")
    except Exception as e:
        crashed("data analysis: run()", e)

    # 4. file upload
    try:
        script_file = {
            "name": "myscript.py",
            "encoding": "string",
            "content": "import sys\nprint(f'Hello from inside {sys.argv[0]}!')",
        }
        r = ci.run(code="!python myscript.py", language="python", files=[script_file])
        ok("file upload: stdout 'Hello from inside myscript.py!'",
           norm(stdout_text(r)) == "Hello from inside myscript.py!", f"outputs={outs(r)!r}")
        ok("file upload: no error outputs", not errors_of(r), f"errors={errors_of(r)!r}")
    except Exception as e:
        crashed("file upload: run()", e)

    # 5. list sessions: together 1.x has no sessions API (CodeInterpreter has only run()).
    info("skip - list sessions: together 1.x has no sessions list method")

    # 6a. exception cell: a 200 with an `error` output, session stays alive
    try:
        r = ci.run(code="1/0", language="python")
        errs = errors_of(r)
        ok("exception: one `error` output", len(errs) >= 1, f"outputs={outs(r)!r}")
        text = errs[0] if errs else ""
        ok("exception: error data is a str", isinstance(text, str), f"data={text!r}")
        ok("exception: mentions ZeroDivisionError", "ZeroDivisionError" in str(text), f"data={text!r}")
        ok("exception: no ANSI escapes", "\x1b[" not in str(text), f"data={text!r}")
        r2 = ci.run(code='print("still alive")', language="python", session_id=r.data.session_id)
        ok("exception: session still usable", ("stdout", "still alive\n") in outs(r2), f"outputs={outs(r2)!r}")
    except Exception as e:
        crashed("exception: run()", e)

    # 6b. matplotlib figure -> display_data with image/png + text/plain
    try:
        r = ci.run(code="import matplotlib.pyplot as plt\nplt.plot([1,2,3])", language="python")
        disp = [d for t, d in outs(r) if t == "display_data"]
        kinds = [(t, type(d).__name__) for t, d in outs(r)]
        ok("matplotlib: a display_data output", len(disp) >= 1, f"outputs={kinds!r}")
        d = disp[0] if disp else {}
        ok("matplotlib: display_data data is a dict", isinstance(d, dict), f"data type={type(d).__name__}")
        png = d.get("image/png") if isinstance(d, dict) else None
        try:
            raw = base64.b64decode(png or "", validate=True)
        except Exception:
            raw = b""
        ok("matplotlib: image/png is base64 PNG", raw.startswith(PNG_MAGIC), f"image/png={str(png)[:60]!r}")
        tp = d.get("text/plain") if isinstance(d, dict) else None
        ok("matplotlib: text/plain present", isinstance(tp, str) and tp != "", f"text/plain={tp!r}")
        ok("matplotlib: no error outputs", not errors_of(r), f"errors={errors_of(r)!r}")
    except Exception as e:
        crashed("matplotlib: run()", e)

    # 6c. unknown session -> client's API error with status 404
    try:
        r = ci.run(code="print(1)", language="python", session_id="ses_doesnotexist123")
        ok("unknown session: raises", False, f"returned {r!r}")
    except together.error.TogetherException as e:
        info(f"unknown session raised {type(e).__module__}.{type(e).__name__}: {e}")
        ok("unknown session: raises together.error.InvalidRequestError",
           isinstance(e, together.error.InvalidRequestError), f"got {type(e).__name__}")
        ok("unknown session: http_status 404", e.http_status == 404, f"http_status={e.http_status!r}")
        ok("unknown session: message mentions the session", "session" in str(e).lower(), f"message={e}")
    except AssertionError as e:
        # api_requestor.handle_error_response asserts body["error"] is a dict
        ok("unknown session: raises a together error", False,
           f"AssertionError ({e}): the error body lacks an `error` object")
    except Exception as e:
        crashed("unknown session: raises a together error", e)

    # the bare-host form (base_url=BASE) makes the client request //tci/execute
    try:
        bare = Together(api_key=KEY, base_url=BASE)
        r = bare.code_interpreter.run(code='print("bare")', language="python")
        ok("bare-host base_url (//tci/execute): stdout", ("stdout", "bare\n") in outs(r), f"outputs={outs(r)!r}")
    except Exception as e:
        crashed("bare-host base_url (//tci/execute)", e)

    # wrong key -> AuthenticationError 401
    try:
        bad = Together(api_key=KEY + "-wrong", base_url=BASE + "/v1")
        bad.code_interpreter.run(code="print(1)", language="python")
        ok("wrong key: raises", False, "no exception")
    except together.error.AuthenticationError as e:
        info(f"wrong key raised {type(e).__name__}: {e}")
        ok("wrong key: AuthenticationError 401", e.http_status == 401, f"http_status={e.http_status!r}")
    except Exception as e:
        crashed("wrong key: AuthenticationError 401", e)

    print(f"{PASSED} passed, {FAILED} failed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
