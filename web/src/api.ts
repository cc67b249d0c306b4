// The kiln HTTP API as the pages use it.
//
// Every authenticated request carries the key as an `Authorization: Bearer`
// header and nowhere else: never in a URL, a cookie or a form. Failures come
// back as `ApiError`s with the API's stable code, so the pages can say what
// to do about a wrong key (401), an ended session (410) or a full server
// (503).

import { createParser, type EventSourceMessage } from 'eventsource-parser';
import { currentKey } from './storage';

/** One output, exactly as the API returns it. */
export type Output =
  | { type: 'stdout' | 'stderr' | 'error'; data: string }
  | { type: 'display_data' | 'execute_result'; data: Record<string, unknown> };

export interface ExecuteData {
  session_id: string;
  status: 'success' | 'error' | string;
  outputs: Output[];
}

export interface SessionInfo {
  id: string;
  started_at: string;
  execute_count: number;
  last_execute_at: string | null;
  expires_at: string;
}

export interface FileEntry {
  name: string;
  path: string;
  type: 'file' | 'directory' | 'symlink' | 'other';
  size: number;
}

export interface Usage {
  key_id: string;
  sessions_started: number;
  executions: number;
  execution_seconds: number;
  cpu_seconds: number;
  peak_memory_bytes: number;
}

export interface UploadFile {
  name: string;
  encoding: 'string' | 'base64';
  content: string;
}

/** A refused or failed request. `status` 0 means kiln did not answer. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

function headers(extra: Record<string, string> = {}): Headers {
  const h = new Headers(extra);
  const key = currentKey();
  if (key) h.set('Authorization', `Bearer ${key}`);
  return h;
}

/** Turn a non-2xx response into an ApiError, from the error envelope. */
async function failure(resp: Response): Promise<ApiError> {
  let code = `http_${resp.status}`;
  let message = `kiln answered ${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    const item = body?.errors?.[0];
    if (item && typeof item.code === 'string') {
      code = item.code;
      message = String(item.message ?? message);
    }
  } catch {
    // Not JSON (a proxy's page, say): keep the status line.
  }
  return new ApiError(resp.status, code, message);
}

async function send(path: string, init: RequestInit): Promise<Response> {
  try {
    return await fetch(path, { ...init, credentials: 'omit', cache: 'no-store', redirect: 'error' });
  } catch (e) {
    if (e instanceof DOMException && e.name === 'AbortError') throw e;
    throw new ApiError(0, 'unreachable', 'kiln did not answer: is the server still running?');
  }
}

/** A JSON request; resolves to the envelope's `data`. */
export async function call<T>(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<T> {
  const init: RequestInit = { method, headers: headers({ Accept: 'application/json' }), signal };
  if (body !== undefined) {
    (init.headers as Headers).set('Content-Type', 'application/json');
    init.body = JSON.stringify(body);
  }
  const resp = await send(path, init);
  if (!resp.ok) throw await failure(resp);
  const envelope = await resp.json();
  return envelope.data as T;
}

/** A file of a session, as bytes. */
export async function download(sessionId: string, path: string): Promise<Blob> {
  const url = `/v1/tci/sessions/${encodeURIComponent(sessionId)}/files/${path.split('/').map(encodeURIComponent).join('/')}`;
  const resp = await send(url, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  return resp.blob();
}

export interface ExecuteRequest {
  code: string;
  language: string;
  session_id?: string;
  files?: UploadFile[];
}

export interface ExecuteHooks {
  /** The session that runs the cell, as soon as it is known. */
  onSession?(id: string): void;
  /** An output, the moment it arrives (streamed responses only). */
  onOutput?(output: Output): void;
  /** The cell cleared what it showed (`clear_output`); with `wait`, at its next output. */
  onClear?(wait: boolean): void;
  signal?: AbortSignal;
}

/**
 * Run a cell. Asks for a Server-Sent Events stream; a server that does not
 * stream answers plain JSON, told apart by its Content-Type. Aborting the
 * signal closes the connection, which interrupts the cell on the server.
 */
export async function execute(req: ExecuteRequest, hooks: ExecuteHooks = {}): Promise<ExecuteData> {
  const resp = await send('/v1/tci/execute', {
    method: 'POST',
    headers: headers({ 'Content-Type': 'application/json', Accept: 'text/event-stream, application/json' }),
    body: JSON.stringify({ ...req, stream: true }),
    signal: hooks.signal,
  });
  if (!resp.ok) throw await failure(resp);
  const type = resp.headers.get('Content-Type') ?? '';
  if (!type.startsWith('text/event-stream')) {
    const data = (await resp.json()).data as ExecuteData;
    hooks.onSession?.(data.session_id);
    return data;
  }
  return readStream(resp, hooks);
}

const OUTPUT_EVENTS = new Set(['stdout', 'stderr', 'display_data', 'execute_result', 'error']);

async function readStream(resp: Response, hooks: ExecuteHooks): Promise<ExecuteData> {
  let result: ExecuteData | undefined;
  let failed: ApiError | undefined;
  const parser = createParser({
    onEvent(ev: EventSourceMessage) {
      const name = ev.event ?? 'message';
      let data: any;
      try {
        data = JSON.parse(ev.data);
      } catch {
        failed = new ApiError(0, 'bad_stream', `kiln sent an event that is not JSON (${name})`);
        return;
      }
      if (name === 'session') hooks.onSession?.(String(data.session_id));
      else if (OUTPUT_EVENTS.has(name)) hooks.onOutput?.(data as Output);
      else if (name === 'clear_output') hooks.onClear?.(Boolean(data.wait));
      else if (name === 'done') result = data.data as ExecuteData;
      else if (name === 'failed') {
        const item = data?.errors?.[0] ?? {};
        failed = new ApiError(resp.status, String(item.code ?? 'internal_error'), String(item.message ?? 'the execution failed'));
      }
    },
  });
  const body = resp.body;
  if (!body) throw new ApiError(0, 'bad_stream', 'kiln sent an empty stream');
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(value);
      if (failed) break;
    }
  } catch (e) {
    if (e instanceof DOMException && e.name === 'AbortError') throw e;
    throw new ApiError(0, 'unreachable', 'the connection to kiln was lost while the cell ran');
  } finally {
    reader.releaseLock();
  }
  if (failed) throw failed;
  if (!result) throw new ApiError(0, 'bad_stream', 'the stream ended before the cell finished');
  hooks.onSession?.(result.session_id);
  return result;
}

export const sessions = {
  list: () => call<{ sessions: SessionInfo[] }>('GET', '/v1/tci/sessions').then((d) => d.sessions),
  get: (id: string) => call<SessionInfo>('GET', `/v1/tci/sessions/${encodeURIComponent(id)}`),
  end: (id: string) => call<unknown>('DELETE', `/v1/tci/sessions/${encodeURIComponent(id)}`),
  files: (id: string, path: string) =>
    call<{ path: string; entries: FileEntry[] }>(
      'GET',
      `/v1/tci/sessions/${encodeURIComponent(id)}/files?path=${encodeURIComponent(path)}`,
    ),
  upload: (id: string, files: UploadFile[]) =>
    call<{ written: string[] }>('POST', `/v1/tci/sessions/${encodeURIComponent(id)}/files`, { files }),
};

export const usage = () => call<Usage>('GET', '/v1/tci/usage');

export interface Languages {
  languages: string[];
  default: string;
}

export const languages = () => call<Languages>('GET', '/v1/tci/languages');

export interface Status {
  status: string;
  message?: string | null;
  version: string;
  languages: string[];
  sessions: { live: number; max: number };
  pool: { ready: number; target: number };
}

export const status = () => call<Status>('GET', '/v1/status');

export interface KeyInfo {
  id: string;
  label: string;
  created_at: string;
  admin: boolean;
  network: string | null;
  max_sessions: number | null;
  revoked_at: string | null;
}

/** One node of a cluster (`GET /v1/admin/nodes`). */
export interface NodeInfo {
  id: string;
  state: 'serving' | 'starting' | 'draining' | 'gone';
  advertise: string | null;
  incarnation: string;
  lease_expires_at: string;
  ready_kernels: number;
  live_sessions: number;
  max_sessions: number;
  memory_available_bytes: number;
}

export const admin = {
  keys: () => call<{ keys: KeyInfo[] }>('GET', '/v1/admin/keys').then((d) => d.keys),
  nodes: () => call<{ this_node: string | null; nodes: NodeInfo[] }>('GET', '/v1/admin/nodes'),
  create: (body: { label: string; admin: boolean; network?: string; max_sessions?: number }) =>
    call<{ key: string; record: KeyInfo }>('POST', '/v1/admin/keys', body),
  revoke: (id: string) => call<unknown>('DELETE', `/v1/admin/keys/${encodeURIComponent(id)}`),
};
