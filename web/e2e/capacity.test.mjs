// A full server (started with --max-sessions 1): the second tab's run is
// refused with a message that says what to do, and works once the first
// tab's session ended.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { KEY, launch, open, runCell, setCode, shot, useKey } from './lib.mjs';

let browser;

before(async () => {
  browser = await launch();
});

after(async () => {
  await browser?.close();
});

const T = { timeout: 180_000 };

test('no capacity is reported as such, and the run works once a session ended', T, async () => {
  const first = await open(browser, '/');
  await useKey(first, KEY);
  await setCode(first, 0, 'print("first")');
  await runCell(first, 0);
  assert.match(await first.locator('#session-id').textContent(), /^ses_/);

  // Another tab: its own sessionStorage, so the key is pasted again.
  const second = await open(browser, '/');
  await useKey(second, KEY);
  await setCode(second, 0, 'print("second")');
  const c = await runCell(second, 0);
  assert.equal(await c.getAttribute('data-state'), 'failed');
  assert.match(await c.locator('.api-error').textContent(), /no room for another session right now \(503 no_capacity\)/);
  assert.equal(await second.locator('#session-id').textContent(), 'none');
  await shot(second, 'playground-no-capacity');

  await first.getByRole('button', { name: 'End session' }).click();
  await first.locator('#session-id').filter({ hasText: /^none$/ }).waitFor();
  // The freed slot goes back to the pool first; the run may need a moment.
  for (let attempt = 0; ; attempt++) {
    await runCell(second, 0);
    if ((await c.getAttribute('data-state')) === 'done') break;
    assert.ok(attempt < 30, `still refused: ${await c.locator('.api-error').textContent()}`);
    await second.waitForTimeout(1000);
  }
  assert.equal(await c.locator('pre.stdout').textContent(), 'second\n');
  assert.deepEqual(browser.problems, []);
});
