#!/usr/bin/env bash
# Run the documented TCI curl examples (same method, path, headers and JSON bodies as the
# docs, with $KILN_API_KEY for $TOGETHER_API_KEY and kiln's URL for api.together.ai) and
# check the raw JSON responses. Needs only curl and python3 (for JSON parsing).
#
#   KILN_BASE_URL=http://127.0.0.1:8787 KILN_API_KEY=... bash tests/clients/seeds_curl.sh
#
# Prints one line per check and ends with "N passed, M failed"; exits 1 on any failure.
# KILN_CURL_MAX_TIME (seconds, default 180) bounds each request.
set -uo pipefail

NAME=curl
BASE="${KILN_BASE_URL:-}"
BASE="${BASE%/}"
KEY="${KILN_API_KEY:-}"
if [[ -z "$BASE" || -z "$KEY" ]]; then
  echo "$NAME: set KILN_BASE_URL (e.g. http://127.0.0.1:8787) and KILN_API_KEY" >&2
  exit 2
fi
MAXT="${KILN_CURL_MAX_TIME:-180}"
PY="${KILN_PYTHON:-python3}"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PASSED=0
FAILED=0

# ---------------------------------------------------------------- helpers
# JSON checks run in python3: `d` is the parsed body (None if not JSON), `raw` the text,
# `status` the HTTP status; helpers outs()/stdout()/errs(); a failing `assert` fails the check.
cat > "$TMP/h.py" <<'PY'
import base64, datetime, json, re, sys
body_file, status, code = sys.argv[1], int(sys.argv[2]), sys.argv[3]
raw = open(body_file, encoding="utf-8", errors="replace").read()
try:
    d = json.loads(raw)
except Exception:
    d = None
def data():
    assert isinstance(d, dict) and isinstance(d.get("data"), dict), f"no data object; HTTP {status}, body={raw[:1500]!r}"
    return d["data"]
def outs():
    o = data().get("outputs")
    assert isinstance(o, list), f"data.outputs is not a list: {o!r}"
    return o
def has(t, s):
    return any(x.get("type") == t and x.get("data") == s for x in outs())
def stdout():
    return "".join(x["data"] for x in outs() if x.get("type") == "stdout" and isinstance(x.get("data"), str))
def errs():
    return [x.get("data") for x in outs() if x.get("type") == "error"]
def ok200():
    assert status == 200, f"HTTP {status}, body={raw[:1500]!r}"
    assert isinstance(d, dict) and "errors" in d and d["errors"] is None, f"errors is not null: {raw[:1500]!r}"
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
def ts(s):
    assert isinstance(s, str) and RFC3339_Z.match(s), f"not RFC 3339 UTC with Z: {s!r}"
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
try:
    exec(code)
except AssertionError as e:
    sys.exit(f"mismatch: {e}")
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}; HTTP {status}, body={raw[:1500]!r}")
PY

# req NAME METHOD PATH [curl args...]: response body -> $TMP/NAME.body, status -> $TMP/NAME.code
req() {
  local n=$1 m=$2 p=$3
  shift 3
  local code
  code=$(curl -sS --max-time "$MAXT" -o "$TMP/$n.body" -w '%{http_code}' -X "$m" "$BASE$p" "$@" 2>"$TMP/$n.err") || true
  [[ -f "$TMP/$n.body" ]] || : > "$TMP/$n.body"
  [[ "$code" =~ ^[0-9]{3}$ ]] || code=000
  if [[ $code == 000 ]]; then echo "# $NAME: $m $p: curl failed: $(cat "$TMP/$n.err")"; fi
  echo "$code" > "$TMP/$n.code"
}

# check DESC NAME PYCODE: run PYCODE against response NAME
check() {
  local desc=$1 n=$2 code=$3 out
  if out=$("$PY" "$TMP/h.py" "$TMP/$n.body" "$(cat "$TMP/$n.code")" "$code" 2>&1); then
    PASSED=$((PASSED + 1))
    echo "ok - $NAME: $desc"
  else
    FAILED=$((FAILED + 1))
    echo "not ok - $NAME: $desc"
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/    /'
  fi
}

# get NAME PYEXPR: print a value from response NAME (empty if absent)
get() {
  "$PY" - "$TMP/$1.body" "$2" <<'PY' 2>/dev/null || true
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    v = eval(sys.argv[2])
    print("" if v is None else v)
except Exception:
    print("")
PY
}

echo "# $NAME: against $BASE"

# ---------------------------------------------------------------- 1. first query (docs, verbatim)
req welcome POST "/tci/execute" \
-H "Authorization: Bearer $KILN_API_KEY" \
-H "Content-Type: application/json" \
-d '{
"language": "python",
"code": "print(\"Welcome to Together Code Interpreter!\")"
}'
check "welcome: 200, errors null" welcome 'ok200()'
check "welcome: stdout exact" welcome 'assert has("stdout", "Welcome to Together Code Interpreter!\n"), outs()'
check "welcome: data.status non-empty string" welcome 's = data().get("status"); assert isinstance(s, str) and s, repr(s)'
check "welcome: session_id ses_..." welcome 's = data().get("session_id"); assert isinstance(s, str) and s.startswith("ses_"), repr(s)'
check "welcome: no error outputs" welcome 'assert not errs(), outs()'
SID_WELCOME=$(get welcome 'd["data"]["session_id"]')

# ---------------------------------------------------------------- 2. session reuse (docs, verbatim)
req reuse1 POST "/tci/execute" \
-H "Authorization: Bearer $KILN_API_KEY" \
-H "Content-Type: application/json" \
-d '{
"language": "python",
"code": "x = 42"
}'
check "reuse: x = 42 -> 200" reuse1 'ok200(); assert data()["session_id"]'
SID_REUSE=$(get reuse1 'd["data"]["session_id"]')
req reuse2 POST "/tci/execute" \
-H "Authorization: Bearer $KILN_API_KEY" \
-H "Content-Type: application/json" \
-d '{
"language": "python",
"code": "print(f\"The value of x is {x}\")",
"session_id": "'"$SID_REUSE"'"
}'
check "reuse: stdout exact" reuse2 'ok200(); assert has("stdout", "The value of x is 42\n"), outs()'
check "reuse: same session_id" reuse2 "assert data()['session_id'] == '$SID_REUSE', data()['session_id']"

# ---------------------------------------------------------------- 3. data analysis (docs, verbatim)
req analysis POST "/tci/execute" \
-H "Authorization: Bearer $KILN_API_KEY" \
-H "Content-Type: application/json" \
-d '{
"language": "python",
"code": "!pip install numpy\nimport numpy as np\n# Create a random matrix\nmatrix = np.random.rand(3, 3)\nprint(\"Random matrix:\")\nprint(matrix)\n# Calculate eigenvalues\neigenvalues = np.linalg.eigvals(matrix)\nprint(\"\\nEigenvalues:\")\nprint(eigenvalues)"
}'
check "data analysis: 200" analysis 'ok200()'
check "data analysis: Random matrix: / Eigenvalues: in stdout" analysis 'o = stdout(); assert "Random matrix:" in o and "Eigenvalues:" in o, outs()'
check "data analysis: no error outputs" analysis 'assert not errs(), errs()'
SID_ANALYSIS=$(get analysis 'd["data"]["session_id"]')

# ---------------------------------------------------------------- 4. file upload (docs, verbatim)
req upload POST "/tci/execute" \
-H "Authorization: Bearer $KILN_API_KEY" \
-H "Content-Type: application/json" \
-d '{
"language": "python",
"files": [
{
"name": "myscript.py",
"encoding": "string",
"content": "import sys\nprint(f'\''Hello from inside {sys.argv[0]}!'\'')"
}
],
"code": "!python myscript.py"
}'
check "file upload: 200" upload 'ok200()'
check "file upload: stdout Hello from inside myscript.py!" upload 'o = stdout().replace("\r\n", "\n").rstrip("\n"); assert o == "Hello from inside myscript.py!", outs()'
check "file upload: no error outputs" upload 'assert not errs(), errs()'
SID_UPLOAD=$(get upload 'd["data"]["session_id"]')

# ---------------------------------------------------------------- 5. list sessions (docs, verbatim)
req sessions GET "/tci/sessions" \
-H "Authorization: Bearer $KILN_API_KEY" \
-H "Content-Type: application/json"
check "sessions: 200, errors null, data.sessions list" sessions 'ok200(); assert isinstance(data().get("sessions"), list), raw[:500]'
for pair in "welcome:$SID_WELCOME" "reuse:$SID_REUSE" "data analysis:$SID_ANALYSIS" "file upload:$SID_UPLOAD"; do
  label=${pair%%:*}
  sid=${pair#*:}
  [[ -n "$sid" ]] || continue
  check "sessions: $label session listed with id/started_at/execute_count/last_execute_at/expires_at" sessions "
S = {s.get('id'): s for s in data()['sessions']}
assert '$sid' in S, f'$sid not in {list(S)}'
s = S['$sid']
for f in ('id', 'started_at', 'execute_count', 'last_execute_at', 'expires_at'):
    assert f in s and s[f] is not None, f'missing {f}: {s}'
assert isinstance(s['execute_count'], int) and not isinstance(s['execute_count'], bool), s
a, b, c = ts(s['started_at']), ts(s['last_execute_at']), ts(s['expires_at'])
assert a <= b < c, s
"
done
if [[ -n "$SID_REUSE" ]]; then
  check "sessions: reuse session execute_count 2" sessions "
S = {s.get('id'): s for s in data()['sessions']}
assert S['$SID_REUSE']['execute_count'] == 2, S.get('$SID_REUSE')
"
fi

# ---------------------------------------------------------------- 6. exception, figure, unknown session
req zerodiv POST "/tci/execute" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"language": "python", "code": "1/0"}'
check "exception: 200 with error output" zerodiv 'ok200(); assert len(errs()) >= 1, outs()'
check "exception: error is a str with ZeroDivisionError, no ANSI" zerodiv '
e = errs()[0]
assert isinstance(e, str), repr(e)
assert "ZeroDivisionError" in e, repr(e)
assert "\x1b[" not in e, repr(e)'

req figure POST "/tci/execute" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"language": "python", "code": "import matplotlib.pyplot as plt\nplt.plot([1,2,3])"}'
check "matplotlib: display_data with base64 PNG and text/plain" figure '
ok200()
disp = [x["data"] for x in outs() if x.get("type") == "display_data"]
assert disp, [x.get("type") for x in outs()]
b = disp[0]
assert isinstance(b, dict), repr(b)[:200]
assert base64.b64decode(b.get("image/png", ""), validate=True).startswith(b"\x89PNG\r\n\x1a\n"), str(b.get("image/png"))[:60]
assert isinstance(b.get("text/plain"), str) and b["text/plain"], b.get("text/plain")'

req unknown POST "/tci/execute" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"language": "python", "code": "print(1)", "session_id": "ses_doesnotexist123"}'
check "unknown session: 404" unknown 'assert status == 404, (status, raw[:500])'
check "unknown session: body {data:null, errors:[...], error:{message,type,code,param}}" unknown '
assert isinstance(d, dict), raw[:500]
assert "data" in d and d["data"] is None, raw[:500]
assert isinstance(d.get("errors"), list) and d["errors"], raw[:500]
e = d.get("error")
assert isinstance(e, dict), "no error object (1.x client needs it): " + raw[:500]
assert isinstance(e.get("message"), str) and "session" in e["message"].lower(), e
for k in ("type", "code", "param"):
    assert e.get(k) is None or isinstance(e[k], str), f"error.{k} must be a string or null: {e}"'

# ---------------------------------------------------------------- 7. the other path forms clients use
req v1exec POST "/v1/tci/execute" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"language": "python", "code": "print(\"v1 path\")"}'
check "POST /v1/tci/execute" v1exec 'ok200(); assert has("stdout", "v1 path\n"), outs()'

req v1sessions GET "/v1/tci/sessions" -H "Authorization: Bearer $KEY"
check "GET /v1/tci/sessions" v1sessions 'ok200(); assert isinstance(data().get("sessions"), list), raw[:500]'

req dblslash POST "/v1//tci/execute" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"language": "python", "code": "print(\"double slash\")"}'
check "POST /v1//tci/execute (together 1.x path)" dblslash 'ok200(); assert has("stdout", "double slash\n"), outs()'

req dblslash2 POST "//tci/execute" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"language": "python", "code": "print(\"leading double slash\")"}'
check "POST //tci/execute (together 1.x with a bare-host base_url)" dblslash2 'ok200(); assert has("stdout", "leading double slash\n"), outs()'

req noauth POST "/tci/execute" -H "Content-Type: application/json" \
  -d '{"language": "python", "code": "print(1)"}'
check "no Authorization: 401 with JSON error" noauth '
assert status == 401, (status, raw[:500])
assert isinstance(d, dict) and isinstance(d.get("error"), dict) and d.get("data") is None, raw[:500]'

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
