// The console at `/console`: the server's health and pool, this key's usage
// and live sessions (end any), and, for an admin key, the API keys (create,
// revoke).

import './style.css';
import { admin, ApiError, sessions, status, usage, type KeyInfo, type NodeInfo, type SessionInfo } from './api';
import { describe } from './errors';
import { setupKeyForm } from './key';
import { currentKey } from './storage';
import { $, bytes, h, setupAlert, showAlert, timeLeft, when } from './ui';

let keyId: string | null = null;

function facts(el: HTMLElement, rows: [string, string][]): void {
  el.replaceChildren(...rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

async function loadServer(): Promise<void> {
  try {
    const s = await status();
    facts($('server'), [
      ['Status', s.message ? `${s.status}: ${s.message}` : s.status],
      ['Version', s.version],
      ['Languages', s.languages.join(', ')],
      ['Live sessions', `${s.sessions.live} of ${s.sessions.max}`],
      ['Warm pool', `${s.pool.ready} ready (target ${s.pool.target})`],
    ]);
    $('server').dataset.status = s.status;
  } catch (e) {
    facts($('server'), [['Status', describe(e)]]);
    $('server').dataset.status = 'unreachable';
  }
}

async function loadUsage(): Promise<void> {
  if (!currentKey()) {
    facts($('usage'), [['', 'Paste an API key above to see its usage.']]);
    return;
  }
  try {
    const u = await usage();
    facts($('usage'), [
      ['Key', u.key_id],
      ['Sessions started', String(u.sessions_started)],
      ['Executions', String(u.executions)],
      ['Execution time', `${u.execution_seconds.toFixed(1)} s`],
      ['CPU time', `${u.cpu_seconds.toFixed(1)} s`],
      ['Peak memory', bytes(u.peak_memory_bytes)],
    ]);
  } catch (e) {
    facts($('usage'), [['', describe(e)]]);
  }
}

async function loadSessions(): Promise<void> {
  const body = $('sessions').querySelector('tbody') as HTMLTableSectionElement;
  const empty = $('sessions-empty');
  if (!currentKey()) {
    shownSessions = '';
    body.replaceChildren();
    empty.hidden = false;
    empty.textContent = 'Paste an API key above to see its sessions.';
    return;
  }
  try {
    const list = await sessions.list();
    // Redraw only on a change, so the periodic refresh never takes the
    // keyboard focus away from a row's button.
    const seen = JSON.stringify(list);
    if (seen === shownSessions && body.childElementCount === list.length) return;
    shownSessions = seen;
    body.replaceChildren(...list.map(sessionRow));
    empty.hidden = list.length > 0;
    empty.textContent = 'No live sessions.';
  } catch (e) {
    shownSessions = '';
    body.replaceChildren();
    empty.hidden = false;
    empty.textContent = describe(e);
  }
}

let shownSessions = '';

function sessionRow(s: SessionInfo): HTMLTableRowElement {
  const endButton = h('button', { type: 'button', class: 'small danger', 'aria-label': `End session ${s.id}` }, 'End');
  endButton.addEventListener('click', async () => {
    endButton.disabled = true;
    try {
      await sessions.end(s.id);
    } catch (e) {
      showAlert(describe(e));
    }
    await Promise.all([loadSessions(), loadServer()]);
  });
  return h(
    'tr',
    { 'data-session': s.id },
    h('td', {}, h('code', {}, s.id)),
    h('td', {}, when(s.started_at)),
    h('td', {}, String(s.execute_count)),
    h('td', {}, when(s.last_execute_at)),
    h('td', {}, `${when(s.expires_at)} (${timeLeft(s.expires_at) ?? 'ending'} left)`),
    h('td', {}, endButton),
  );
}

async function loadKeys(): Promise<void> {
  const panel = $('keys-admin');
  const note = $('keys-note');
  if (!currentKey()) {
    panel.hidden = true;
    note.textContent = 'Paste an admin API key above to manage keys.';
    return;
  }
  try {
    const keys = await admin.keys();
    panel.hidden = false;
    note.textContent = 'Every key of this server. New and revoked keys take effect within seconds.';
    ($('keys').querySelector('tbody') as HTMLTableSectionElement).replaceChildren(...keys.map(keyRow));
  } catch (e) {
    panel.hidden = true;
    note.textContent =
      e instanceof ApiError && e.status === 403
        ? `This key is not an admin key, so it cannot manage keys. An operator can make one with \`kiln keys create --admin\`.`
        : describe(e);
  }
}

/** A cluster's nodes, for an admin key of a server that is part of one. */
async function loadNodes(): Promise<void> {
  const panel = $('nodes-panel');
  if (!currentKey()) {
    panel.hidden = true;
    return;
  }
  try {
    const list = await admin.nodes();
    // Alone, a server has no cluster to show; a key that is not an admin
    // key is told why in the keys panel.
    panel.hidden = list.this_node === null;
    const me = list.this_node;
    ($('nodes').querySelector('tbody') as HTMLTableSectionElement).replaceChildren(...list.nodes.map((n) => nodeRow(n, me)));
  } catch {
    panel.hidden = true;
  }
}

function nodeRow(n: NodeInfo, me: string | null): HTMLTableRowElement {
  const left = timeLeft(n.lease_expires_at);
  return h(
    'tr',
    { 'data-node': n.id, 'data-state': n.state },
    h('td', {}, n.id === me ? `${n.id} (this node)` : n.id),
    h('td', {}, n.state),
    h('td', {}, n.advertise ?? '–'),
    h('td', {}, String(n.ready_kernels)),
    h('td', {}, `${n.live_sessions} of ${n.max_sessions}`),
    h('td', {}, bytes(n.memory_available_bytes)),
    h('td', {}, left ? `${left} left` : 'ended'),
  );
}

function keyRow(k: KeyInfo): HTMLTableRowElement {
  let action: Node = document.createTextNode('');
  if (!k.revoked_at && k.id !== keyId) {
    const revoke = h('button', { type: 'button', class: 'small danger', 'aria-label': `Revoke key ${k.id}` }, 'Revoke');
    revoke.addEventListener('click', async () => {
      revoke.disabled = true;
      try {
        await admin.revoke(k.id);
      } catch (e) {
        showAlert(describe(e));
      }
      await loadKeys();
    });
    action = revoke;
  } else if (k.id === keyId) {
    action = h('span', { class: 'muted' }, 'this key');
  }
  return h(
    'tr',
    { 'data-key': k.id },
    h('td', {}, h('code', {}, k.id)),
    h('td', {}, k.label),
    h('td', {}, when(k.created_at)),
    h('td', {}, k.admin ? 'yes' : 'no'),
    h('td', {}, k.network ?? 'server'),
    h('td', {}, k.max_sessions === null ? 'server' : String(k.max_sessions)),
    h('td', {}, k.revoked_at ? `revoked ${when(k.revoked_at)}` : 'active'),
    h('td', {}, action),
  );
}

function setupCreate(): void {
  $('key-create').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const label = $<HTMLInputElement>('new-label').value.trim();
    const network = $<HTMLSelectElement>('new-network').value;
    const max = $<HTMLInputElement>('new-max').value;
    const isAdmin = $<HTMLInputElement>('new-admin').checked;
    try {
      const made = await admin.create({
        label,
        admin: isAdmin,
        network: network || undefined,
        max_sessions: max ? Number(max) : undefined,
      });
      $('new-key-id').textContent = made.record.id;
      $('new-key-value').textContent = made.key;
      $('new-key').hidden = false;
      await loadKeys();
    } catch (e) {
      showAlert(describe(e));
    }
  });
}

function refresh(): void {
  void loadServer();
  void loadUsage();
  void loadSessions();
  void loadKeys();
  void loadNodes();
}

setupAlert();
setupCreate();
setupKeyForm(
  async () => (await usage()).key_id,
  (id) => {
    keyId = id;
    $('new-key').hidden = true;
    refresh();
  },
);
$('sessions-refresh').addEventListener('click', () => {
  void loadSessions();
  void loadServer();
});
// Health and sessions change on their own: keep them current.
setInterval(() => {
  void loadServer();
  void loadSessions();
  void loadNodes();
}, 5000);
