#!/usr/bin/env python3
"""Run the documented TCI examples through the real PyPI `together` 2.x client.

Run with the py2 venv made by scripts/setup-clients:

    scripts/setup-clients                      # once; fast when already done
    KILN_BASE_URL=http://127.0.0.1:8787 KILN_API_KEY=... \
        ~/.cache/kiln-test/clients/py2/bin/python tests/clients/seeds_together_v2.py

The client is built as a user would: Together(api_key=..., base_url=BASE + "/v1"); it
requests POST /v1/tci/execute and GET /v1/tci/sessions. The docs' examples call the 1.x
method name `run`; 2.x calls it `execute` (same arguments).

Prints one line per check and ends with "N passed, M failed"; exits 1 on any failure.
KILN_TEST_TIMEOUT (seconds, default 600) bounds the whole run.
"""
from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import sys
import traceback

import together
from together import Together

NAME = "together-v2"
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
    """[(type, data)] with MIME-bundle models turned back into plain dicts."""
    res = []
    for o in resp.data.outputs:
        d = o.data
        if not isinstance(d, str) and hasattr(d, "to_dict"):
            d = d.to_dict()  # keys are the wire names, e.g. "image/png"
        res.append((o.type, d))
    return res


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
    info(f"together {together.__version__} against {BASE}")
    client = Together(api_key=KEY, base_url=BASE + "/v1")
    ci = client.code_interpreter
    created: dict[str, str] = {}  # label -> session id

    # 1. first query
    try:
        r = ci.execute(code='print("Welcome to Together Code Interpreter!")', language="python")
        ok("welcome: parsed as SuccessfulExecution (errors is None)", r.errors is None and r.data is not None,
           f"response={r!r}")
        ok("welcome: stdout exact", ("stdout", "Welcome to Together Code Interpreter!\n") in outs(r),
           f"outputs={outs(r)!r}")
        ok("welcome: status is a non-empty str", isinstance(r.data.status, str) and r.data.status != "",
           f"status={r.data.status!r}")
        ok("welcome: session_id looks like ses_...", isinstance(r.data.session_id, str)
           and r.data.session_id.startswith("ses_"), f"session_id={r.data.session_id!r}")
        ok("welcome: no error outputs", not errors_of(r), f"outputs={outs(r)!r}")
        created["welcome"] = r.data.session_id
    except Exception as e:
        crashed("welcome: execute()", e)

    # 2. session reuse
    try:
        r1 = ci.execute(code="x = 42", language="python")
        sid = r1.data.session_id
        ok("reuse: first call gives a session_id", bool(sid), f"data={r1.data!r}")
        r2 = ci.execute(code='print(f"The value of x is {x}")', language="python", session_id=sid)
        ok("reuse: stdout exact", ("stdout", "The value of x is 42\n") in outs(r2), f"outputs={outs(r2)!r}")
        ok("reuse: same session_id returned", r2.data.session_id == sid, f"{r2.data.session_id!r} != {sid!r}")
        created["reuse"] = sid
    except Exception as e:
        crashed("reuse: execute()", e)

    # 3. data analysis
    try:
        r = ci.execute(code=DATA_ANALYSIS, language="python")
        out = stdout_text(r)
        ok("data analysis: 'Random matrix:' in stdout", "Random matrix:" in out, f"outputs={outs(r)!r}")
        ok("data analysis: 'Eigenvalues:' in stdout", "Eigenvalues:" in out, f"outputs={outs(r)!r}")
        ok("data analysis: no error outputs", not errors_of(r), f"errors={errors_of(r)!r}")
        created["data analysis"] = r.data.session_id
    except Exception as e:
        crashed("data analysis: execute()", e)

    # 4. file upload
    try:
        script_file = {
            "name": "myscript.py",
            "encoding": "string",
            "content": "import sys\nprint(f'Hello from inside {sys.argv[0]}!')",
        }
        r = ci.execute(code="!python myscript.py", language="python", files=[script_file])
        ok("file upload: stdout 'Hello from inside myscript.py!'",
           norm(stdout_text(r)) == "Hello from inside myscript.py!", f"outputs={outs(r)!r}")
        ok("file upload: no error outputs", not errors_of(r), f"errors={errors_of(r)!r}")
        created["file upload"] = r.data.session_id
    except Exception as e:
        crashed("file upload: execute()", e)

    # 5. list sessions
    try:
        lst = ci.sessions.list()
        sessions = lst.data.sessions if lst.data is not None else []
        by_id = {s.id: s for s in sessions}
        info(f"sessions.list() returned {len(sessions)} session(s)")
        for label, sid in created.items():
            s = by_id.get(sid)
            if not ok(f"sessions: {label} session listed", s is not None, f"{sid} not in {list(by_id)}"):
                continue
            fields = ("id", "started_at", "execute_count", "last_execute_at", "expires_at")
            ok(f"sessions: {label} has all fields", all(getattr(s, f, None) is not None for f in fields),
               f"session={s!r}")
            # the client turns RFC 3339 strings into datetimes; a bad timestamp stays a str
            ts_ok = all(isinstance(getattr(s, f, None), dt.datetime) and getattr(s, f).tzinfo is not None
                        for f in ("started_at", "last_execute_at", "expires_at"))
            ok(f"sessions: {label} timestamps are tz-aware datetimes", ts_ok, f"session={s!r}")
            if ts_ok:
                ok(f"sessions: {label} started <= last_execute < expires",
                   s.started_at <= s.last_execute_at < s.expires_at, f"session={s!r}")
        if "reuse" in created and created["reuse"] in by_id:
            s = by_id[created["reuse"]]
            ok("sessions: reuse session has execute_count 2", s.execute_count == 2,
               f"execute_count={s.execute_count!r}")
    except Exception as e:
        crashed("sessions: list()", e)

    # 6a. exception cell
    try:
        r = ci.execute(code="1/0", language="python")
        errs = errors_of(r)
        ok("exception: one `error` output", len(errs) >= 1, f"outputs={outs(r)!r}")
        text = errs[0] if errs else ""
        ok("exception: error data is a str", isinstance(text, str), f"data={text!r}")
        ok("exception: mentions ZeroDivisionError", "ZeroDivisionError" in str(text), f"data={text!r}")
        ok("exception: no ANSI escapes", "\x1b[" not in str(text), f"data={text!r}")
        r2 = ci.execute(code='print("still alive")', language="python", session_id=r.data.session_id)
        ok("exception: session still usable", ("stdout", "still alive\n") in outs(r2), f"outputs={outs(r2)!r}")
    except Exception as e:
        crashed("exception: execute()", e)

    # 6b. matplotlib figure
    try:
        r = ci.execute(code="import matplotlib.pyplot as plt\nplt.plot([1,2,3])", language="python")
        disp = [o for o in r.data.outputs if o.type == "display_data"]
        ok("matplotlib: a display_data output", len(disp) >= 1, f"types={[o.type for o in r.data.outputs]!r}")
        if disp:
            d = disp[0].data
            png = getattr(d, "image_png", None)  # typed attribute for "image/png"
            try:
                raw = base64.b64decode(png or "", validate=True)
            except Exception:
                raw = b""
            ok("matplotlib: data.image_png is base64 PNG", raw.startswith(PNG_MAGIC), f"image/png={str(png)[:60]!r}")
            tp = getattr(d, "text_plain", None)
            ok("matplotlib: data.text_plain present", isinstance(tp, str) and tp != "", f"text/plain={tp!r}")
        ok("matplotlib: no error outputs", not errors_of(r), f"errors={errors_of(r)!r}")
    except Exception as e:
        crashed("matplotlib: execute()", e)

    # 6c. unknown session
    try:
        r = ci.execute(code="print(1)", language="python", session_id="ses_doesnotexist123")
        ok("unknown session: raises", False, f"returned {r!r}")
    except together.APIStatusError as e:
        info(f"unknown session raised {type(e).__module__}.{type(e).__name__}: {e}")
        ok("unknown session: raises together.NotFoundError", isinstance(e, together.NotFoundError),
           f"got {type(e).__name__}")
        ok("unknown session: status_code 404", e.status_code == 404, f"status_code={e.status_code!r}")
        ok("unknown session: message mentions the session", "session" in str(e).lower(), f"message={e}")
        ok("unknown session: body is JSON with errors", isinstance(e.body, dict) and bool(e.body.get("errors")),
           f"body={e.body!r}")
    except Exception as e:
        crashed("unknown session: raises together.APIStatusError", e)

    # wrong key
    try:
        Together(api_key=KEY + "-wrong", base_url=BASE + "/v1").code_interpreter.execute(
            code="print(1)", language="python")
        ok("wrong key: raises", False, "no exception")
    except together.APIStatusError as e:
        info(f"wrong key raised {type(e).__name__}: {e}")
        ok("wrong key: AuthenticationError 401", isinstance(e, together.AuthenticationError)
           and e.status_code == 401, f"{type(e).__name__} status={e.status_code}")
    except Exception as e:
        crashed("wrong key: AuthenticationError 401", e)

    print(f"{PASSED} passed, {FAILED} failed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
