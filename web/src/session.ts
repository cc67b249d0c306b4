// The playground's one session: which it is, how long it has left, and
// starting, ending and restarting it. Cells and the file panel share it.

import { execute, sessions } from './api';
import { describe, sessionGone } from './errors';
import { $, showAlert, timeLeft } from './ui';

type Listener = (id: string | null) => void;

let id: string | null = null;
let expiresAt: string | null = null;
let language = 'python';
const listeners: Listener[] = [];

export function sessionId(): string | null {
  return id;
}

export function currentLanguage(): string {
  return language;
}

export function setLanguage(l: string): void {
  language = l;
}

export function onSessionChange(l: Listener): void {
  listeners.push(l);
}

/** The server says the cell ran in `newId`. */
export function adopt(newId: string): void {
  if (newId === id) return;
  id = newId;
  expiresAt = null;
  render();
  listeners.forEach((l) => l(id));
  sessions
    .get(newId)
    .then((info) => {
      if (id === newId) {
        expiresAt = info.expires_at;
        render();
      }
    })
    .catch(() => {
      // The time left stays unknown; the next run will tell more.
    });
}

/** Forget the session (it ended, or the server says it is gone). */
export function forget(): void {
  if (id === null) return;
  id = null;
  expiresAt = null;
  render();
  listeners.forEach((l) => l(null));
}

let starting: Promise<string> | null = null;

/**
 * The current session, starting one when there is none. Starting it before
 * the first cell runs means the page always knows the session a running
 * cell is in, so Stop never leaves one behind; concurrent callers share one
 * start.
 */
export function ensure(): Promise<string> {
  if (id !== null) return Promise.resolve(id);
  if (starting === null) {
    starting = execute({ code: '', language })
      .then((data) => {
        adopt(data.session_id);
        return data.session_id;
      })
      .finally(() => {
        starting = null;
      });
  }
  return starting;
}

export async function end(): Promise<void> {
  const current = id;
  if (current === null) return;
  try {
    await sessions.end(current);
  } catch (e) {
    // Already gone is what we wanted.
    if (!sessionGone(e)) throw e;
  }
  if (id === current) forget();
}

function render(): void {
  $('session-id').textContent = id ?? 'none';
  $<HTMLButtonElement>('end-session').disabled = id === null;
  tick();
}

function tick(): void {
  const el = $('time-left');
  if (id === null) {
    el.textContent = '';
    return;
  }
  if (expiresAt === null) {
    el.textContent = '';
    return;
  }
  const left = timeLeft(expiresAt);
  if (left === null) {
    el.textContent = '';
    showAlert('The session reached the end of its lifetime; the next run starts a new one.');
    forget();
    return;
  }
  el.textContent = `${left} left`;
}

export function setupSessionBar(onRestart: () => void): void {
  render();
  setInterval(tick, 1000);
  $('end-session').addEventListener('click', () => {
    end().catch((e) => showAlert(describe(e)));
  });
  $('restart').addEventListener('click', async () => {
    try {
      await end();
      onRestart();
      await ensure();
    } catch (e) {
      showAlert(describe(e));
      if (sessionGone(e)) forget();
    }
  });
}
