// Run the documented TCI examples through the real npm `together-ai` 0.x client.
//
// How to run (ESM ignores NODE_PATH and resolves bare imports relative to this file, so
// the package is loaded from the directory that scripts/setup-clients installed it in):
//
//   scripts/setup-clients                      # once; fast when already done
//   KILN_BASE_URL=http://127.0.0.1:8787 KILN_API_KEY=... \
//     node tests/clients/seeds_together_ai.mjs
//
// The client directory is $KILN_NODE_CLIENT_DIR, else
// ${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}/clients/node; the package's own ESM entry
// (node_modules/together-ai/index.mjs, what `import Together from 'together-ai'` loads)
// is imported from there.
//
// The client is built as a user would: new Together({ apiKey, baseURL: BASE + '/v1' });
// it requests POST /v1/tci/execute and GET /v1/tci/sessions. (The docs' file-upload JS
// example calls `codeInterpreter.run`, which does not exist in together-ai; `execute` does.)
//
// Prints one line per check and ends with "N passed, M failed"; exits 1 on any failure.
// KILN_TEST_TIMEOUT (seconds, default 600) bounds the whole run.
import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const NAME = 'together-ai';
const BASE = (process.env.KILN_BASE_URL || '').replace(/\/+$/, '');
const KEY = process.env.KILN_API_KEY || '';
if (!BASE || !KEY) {
  console.error(`${NAME}: set KILN_BASE_URL (e.g. http://127.0.0.1:8787) and KILN_API_KEY`);
  process.exit(2);
}

const clientDir =
  process.env.KILN_NODE_CLIENT_DIR ||
  join(process.env.KILN_TEST_CACHE || join(homedir(), '.cache', 'kiln-test'), 'clients', 'node');
const pkgDir = join(clientDir, 'node_modules', 'together-ai');
if (!existsSync(join(pkgDir, 'index.mjs'))) {
  console.error(`${NAME}: together-ai not found in ${clientDir}; run scripts/setup-clients first`);
  process.exit(2);
}
const pkgVersion = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8')).version;
const mod = await import(pathToFileURL(join(pkgDir, 'index.mjs')).href);
const Together = mod.default;
const { APIError, NotFoundError, AuthenticationError } = mod;

let passed = 0;
let failed = 0;

const watchdog = setTimeout(() => {
  console.log(`not ok - ${NAME}: whole run exceeded KILN_TEST_TIMEOUT; server hung?`);
  console.log(`${passed} passed, ${failed + 1} failed`);
  process.exit(1);
}, 1000 * Number(process.env.KILN_TEST_TIMEOUT || 600));
watchdog.unref();

function ok(name, cond, detail = '') {
  if (cond) {
    passed++;
    console.log(`ok - ${NAME}: ${name}`);
  } else {
    failed++;
    console.log(`not ok - ${NAME}: ${name}` + (detail ? `\n    ${detail}` : ''));
  }
  return cond;
}
const info = (msg) => console.log(`# ${NAME}: ${msg}`);
const crashed = (name, e) =>
  ok(name, false, `threw ${e?.constructor?.name}: ${e?.message ?? e}`);
const show = (v) => JSON.stringify(v)?.slice(0, 2000);

const outs = (r) => r.data.outputs.map((o) => [o.type, o.data]);
const has = (r, type, data) => r.data.outputs.some((o) => o.type === type && o.data === data);
const stdoutText = (r) =>
  r.data.outputs.filter((o) => o.type === 'stdout' && typeof o.data === 'string').map((o) => o.data).join('');
const errorsOf = (r) => r.data.outputs.filter((o) => o.type === 'error').map((o) => o.data);
const norm = (s) => s.replace(/\r\n/g, '\n').replace(/\n+$/, '');

const DATA_ANALYSIS = `
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
`;

info(`together-ai ${pkgVersion} against ${BASE}`);
const client = new Together({ apiKey: KEY, baseURL: BASE + '/v1' });
const ci = client.codeInterpreter;
const created = {};

// 1. first query
try {
  const r = await ci.execute({ code: 'print("Welcome to Together Code Interpreter!")', language: 'python' });
  ok('welcome: errors is null', r.errors === null || r.errors === undefined, `errors=${show(r.errors)}`);
  ok('welcome: stdout exact', has(r, 'stdout', 'Welcome to Together Code Interpreter!\n'), `outputs=${show(outs(r))}`);
  ok('welcome: status is a non-empty string', typeof r.data.status === 'string' && r.data.status !== '',
    `status=${show(r.data.status)}`);
  ok('welcome: session_id looks like ses_...', typeof r.data.session_id === 'string' && r.data.session_id.startsWith('ses_'),
    `session_id=${show(r.data.session_id)}`);
  ok('welcome: no error outputs', errorsOf(r).length === 0, `outputs=${show(outs(r))}`);
  created.welcome = r.data.session_id;
} catch (e) {
  crashed('welcome: execute()', e);
}

// 2. session reuse
try {
  const r1 = await ci.execute({ code: 'x = 42', language: 'python' });
  const sid = r1.data.session_id;
  ok('reuse: first call gives a session_id', !!sid, `data=${show(r1.data)}`);
  const r2 = await ci.execute({ code: 'print(f"The value of x is {x}")', language: 'python', session_id: sid });
  ok('reuse: stdout exact', has(r2, 'stdout', 'The value of x is 42\n'), `outputs=${show(outs(r2))}`);
  ok('reuse: same session_id returned', r2.data.session_id === sid, `${r2.data.session_id} != ${sid}`);
  created.reuse = sid;
} catch (e) {
  crashed('reuse: execute()', e);
}

// 3. data analysis
try {
  const r = await ci.execute({ code: DATA_ANALYSIS, language: 'python' });
  const out = stdoutText(r);
  ok("data analysis: 'Random matrix:' in stdout", out.includes('Random matrix:'), `outputs=${show(outs(r))}`);
  ok("data analysis: 'Eigenvalues:' in stdout", out.includes('Eigenvalues:'), `outputs=${show(outs(r))}`);
  ok('data analysis: no error outputs', errorsOf(r).length === 0, `errors=${show(errorsOf(r))}`);
  created['data analysis'] = r.data.session_id;
} catch (e) {
  crashed('data analysis: execute()', e);
}

// 4. file upload
try {
  const scriptFile = {
    name: 'myscript.py',
    encoding: 'string',
    content: "import sys\nprint(f'Hello from inside {sys.argv[0]}!')",
  };
  const r = await ci.execute({ code: '!python myscript.py', language: 'python', files: [scriptFile] });
  ok("file upload: stdout 'Hello from inside myscript.py!'", norm(stdoutText(r)) === 'Hello from inside myscript.py!',
    `outputs=${show(outs(r))}`);
  ok('file upload: no error outputs', errorsOf(r).length === 0, `errors=${show(errorsOf(r))}`);
  created['file upload'] = r.data.session_id;
} catch (e) {
  crashed('file upload: execute()', e);
}

// 5. list sessions (together-ai has codeInterpreter.sessions.list())
const RFC3339_Z = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;
try {
  const lst = await ci.sessions.list();
  const sessions = lst.data?.sessions ?? [];
  const byId = Object.fromEntries(sessions.map((s) => [s.id, s]));
  info(`sessions.list() returned ${sessions.length} session(s)`);
  for (const [label, sid] of Object.entries(created)) {
    const s = byId[sid];
    if (!ok(`sessions: ${label} session listed`, !!s, `${sid} not in ${show(Object.keys(byId))}`)) continue;
    const fields = ['id', 'started_at', 'execute_count', 'last_execute_at', 'expires_at'];
    ok(`sessions: ${label} has all fields`, fields.every((f) => s[f] !== undefined && s[f] !== null), `session=${show(s)}`);
    const tsOk = ['started_at', 'last_execute_at', 'expires_at'].every((f) => typeof s[f] === 'string' && RFC3339_Z.test(s[f]));
    ok(`sessions: ${label} timestamps are RFC 3339 UTC with Z`, tsOk, `session=${show(s)}`);
    if (tsOk) {
      const [a, b, c] = [s.started_at, s.last_execute_at, s.expires_at].map((t) => Date.parse(t));
      ok(`sessions: ${label} started <= last_execute < expires`, a <= b && b < c, `session=${show(s)}`);
    }
    ok(`sessions: ${label} execute_count is a number`, typeof s.execute_count === 'number', `session=${show(s)}`);
  }
  if (created.reuse && byId[created.reuse]) {
    ok('sessions: reuse session has execute_count 2', byId[created.reuse].execute_count === 2,
      `execute_count=${show(byId[created.reuse].execute_count)}`);
  }
} catch (e) {
  crashed('sessions: list()', e);
}

// 6a. exception cell
try {
  const r = await ci.execute({ code: '1/0', language: 'python' });
  const errs = errorsOf(r);
  ok('exception: one `error` output', errs.length >= 1, `outputs=${show(outs(r))}`);
  const text = errs[0] ?? '';
  ok('exception: error data is a string', typeof text === 'string', `data=${show(text)}`);
  ok('exception: mentions ZeroDivisionError', String(text).includes('ZeroDivisionError'), `data=${show(text)}`);
  ok('exception: no ANSI escapes', !String(text).includes('\x1b['), `data=${show(text)}`);
  const r2 = await ci.execute({ code: 'print("still alive")', language: 'python', session_id: r.data.session_id });
  ok('exception: session still usable', has(r2, 'stdout', 'still alive\n'), `outputs=${show(outs(r2))}`);
} catch (e) {
  crashed('exception: execute()', e);
}

// 6b. matplotlib figure
try {
  const r = await ci.execute({ code: 'import matplotlib.pyplot as plt\nplt.plot([1,2,3])', language: 'python' });
  const disp = r.data.outputs.filter((o) => o.type === 'display_data');
  ok('matplotlib: a display_data output', disp.length >= 1, `types=${show(r.data.outputs.map((o) => o.type))}`);
  if (disp.length) {
    const d = disp[0].data;
    ok('matplotlib: display_data data is an object', d !== null && typeof d === 'object', `data=${show(d)}`);
    const png = d?.['image/png'];
    const raw = typeof png === 'string' ? Buffer.from(png, 'base64') : Buffer.alloc(0);
    const magic = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    ok('matplotlib: image/png is base64 PNG', raw.subarray(0, 8).equals(magic), `image/png=${show(String(png).slice(0, 60))}`);
    ok('matplotlib: text/plain present', typeof d?.['text/plain'] === 'string' && d['text/plain'] !== '',
      `text/plain=${show(d?.['text/plain'])}`);
  }
  ok('matplotlib: no error outputs', errorsOf(r).length === 0, `errors=${show(errorsOf(r))}`);
} catch (e) {
  crashed('matplotlib: execute()', e);
}

// 6c. unknown session
try {
  const r = await ci.execute({ code: 'print(1)', language: 'python', session_id: 'ses_doesnotexist123' });
  ok('unknown session: throws', false, `returned ${show(r)}`);
} catch (e) {
  if (e instanceof APIError) {
    info(`unknown session threw ${e.constructor.name}: ${e.message}`);
    ok('unknown session: throws NotFoundError', e instanceof NotFoundError, `got ${e.constructor.name}`);
    ok('unknown session: status 404', e.status === 404, `status=${e.status}`);
    ok('unknown session: message mentions the session', e.message.toLowerCase().includes('session'), `message=${e.message}`);
    ok('unknown session: error body has errors', Array.isArray(e.error?.errors) && e.error.errors.length > 0,
      `error=${show(e.error)}`);
  } else {
    crashed('unknown session: throws APIError', e);
  }
}

// wrong key
try {
  const bad = new Together({ apiKey: KEY + '-wrong', baseURL: BASE + '/v1' });
  await bad.codeInterpreter.execute({ code: 'print(1)', language: 'python' });
  ok('wrong key: throws', false, 'no exception');
} catch (e) {
  if (e instanceof APIError) info(`wrong key threw ${e.constructor.name}: ${e.message}`);
  ok('wrong key: AuthenticationError 401', e instanceof AuthenticationError && e.status === 401,
    `${e?.constructor?.name} status=${e?.status}`);
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
