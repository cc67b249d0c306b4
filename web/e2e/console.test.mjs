// The console at `/console`: the server's health and pool, the key's usage,
// its live sessions (ended from the page), and key management for an admin
// key only.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { KEY, launch, open, OTHER_KEY, shot, SLOW, URL, useKey } from './lib.mjs';

let browser;
let page;

before(async () => {
  browser = await launch();
  page = await open(browser, '/console');
});

after(async () => {
  await browser?.close();
});

const T = { timeout: 180_000 };

async function api(method, path, key = KEY, body) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body) headers['Content-Type'] = 'application/json';
  const resp = await fetch(URL + path, { method, headers, body: body && JSON.stringify(body) });
  return { status: resp.status, body: await resp.json() };
}

async function newSession(key = KEY) {
  const r = await api('POST', '/v1/tci/execute', key, { code: 'x = 1', language: 'python' });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body.data.session_id;
}

const fact = (section, name) => page.locator(`#${section} dt`).filter({ hasText: new RegExp(`^${name}$`) }).locator('xpath=following-sibling::dd[1]');

test('without a key the console shows the server health and its warm pool', T, async () => {
  await page.locator('#server[data-status="ok"]').waitFor();
  assert.equal(await fact('server', 'Status').textContent(), 'ok');
  assert.match(await fact('server', 'Warm pool').textContent(), /^\d+ ready \(target \d+\)$/);
  assert.match(await fact('server', 'Live sessions').textContent(), /^\d+ of \d+$/);
  assert.equal(await fact('server', 'Languages').textContent(), 'python');
  assert.match(await page.locator('#sessions-empty').textContent(), /Paste an API key/);
});

test('with a key it shows that key usage and live sessions, and ends one', T, async () => {
  const a = await newSession();
  const b = await newSession();
  const others = await newSession(OTHER_KEY);
  await useKey(page, KEY);
  await fact('usage', 'Key').filter({ hasText: /^key_/ }).waitFor();
  const usage = (await api('GET', '/v1/tci/usage')).body.data;
  assert.equal(await fact('usage', 'Sessions started').textContent(), String(usage.sessions_started));
  assert.equal(await fact('usage', 'Executions').textContent(), String(usage.executions));
  assert.match(await fact('usage', 'CPU time').textContent(), /^\d+\.\d s$/);
  assert.match(await fact('usage', 'Peak memory').textContent(), /iB$/);
  const rowA = page.locator(`tr[data-session="${a}"]`);
  await rowA.waitFor();
  await page.locator(`tr[data-session="${b}"]`).waitFor();
  assert.equal(await page.locator(`tr[data-session="${others}"]`).count(), 0, "another key's session is not listed");
  await shot(page, 'console-sessions');
  await rowA.getByRole('button', { name: `End session ${a}` }).click();
  await rowA.waitFor({ state: 'detached', timeout: SLOW });
  assert.equal((await api('GET', `/v1/tci/sessions/${a}`)).status, 410, 'ended on the server');
  assert.equal((await api('GET', `/v1/tci/sessions/${b}`)).status, 200, 'the other one lives on');
  assert.equal((await api('GET', `/v1/tci/sessions/${others}`, OTHER_KEY)).status, 200);
  // Ended elsewhere: gone from the list at the next refresh, and the
  // health panel's count follows the server's.
  await api('DELETE', `/v1/tci/sessions/${b}`);
  await api('DELETE', `/v1/tci/sessions/${others}`, OTHER_KEY);
  await page.getByRole('button', { name: 'Refresh' }).click();
  await page.locator(`tr[data-session="${b}"]`).waitFor({ state: 'detached' });
  const live = (await (await fetch(`${URL}/v1/status`)).json()).data.sessions;
  await fact('server', 'Live sessions').filter({ hasText: `${live.live} of ${live.max}` }).waitFor();
});

test('an admin key lists the keys, creates one (shown once) and revokes it', T, async () => {
  const table = page.locator('#keys tbody');
  await table.locator('tr').first().waitFor();
  const me = (await api('GET', '/v1/tci/usage')).body.data.key_id;
  assert.equal(await table.locator(`tr[data-key="${me}"] td`).nth(3).textContent(), 'yes');
  assert.match(await table.locator(`tr[data-key="${me}"]`).textContent(), /this key/);
  await page.getByLabel('Label').fill('e2e team');
  await page.getByLabel('Network').selectOption('none');
  await page.getByLabel('Max sessions').fill('2');
  await page.getByRole('button', { name: 'Create key' }).click();
  const value = page.locator('#new-key-value');
  await value.filter({ hasText: /^kiln_/ }).waitFor();
  const created = await value.textContent();
  const id = await page.locator('#new-key-id').textContent();
  const row = table.locator(`tr[data-key="${id}"]`);
  await row.waitFor();
  assert.deepEqual(
    (await row.locator('td').allTextContents()).filter((_, i) => [1, 3, 4, 5, 6].includes(i)),
    ['e2e team', 'no', 'none', '2', 'active'],
  );
  assert.equal((await api('GET', '/v1/tci/usage', created)).status, 200, 'the new key works at once');
  await shot(page, 'console-keys');
  await row.getByRole('button', { name: `Revoke key ${id}` }).click();
  await row.locator('td').nth(6).filter({ hasText: /^revoked/ }).waitFor();
  assert.equal((await api('GET', '/v1/tci/usage', created)).status, 401, 'refused at once');
  // Alone, this server is no cluster: no nodes to show.
  assert.ok(await page.locator('#nodes-panel').isHidden());
});

test('a key that is not an admin key sees why it cannot manage keys', T, async () => {
  await useKey(page, OTHER_KEY);
  const note = page.locator('#keys-note');
  await note.filter({ hasText: 'not an admin key' }).waitFor();
  assert.match(await note.textContent(), /kiln keys create --admin/);
  assert.ok(await page.locator('#keys-admin').isHidden());
});

test('the page broke no rule of its Content-Security-Policy and asked no other origin', T, async () => {
  assert.deepEqual(browser.problems, []);
});
