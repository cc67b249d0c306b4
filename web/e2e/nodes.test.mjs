// The console of a node in a cluster (a kiln serve on a real PostgreSQL,
// with --advertise): an admin key sees the cluster's nodes; another key
// does not.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { KEY, launch, open, OTHER_KEY, shot, SLOW, useKey } from './lib.mjs';

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

test('an admin key sees the nodes of the cluster, this one marked, serving with its room', T, async () => {
  await useKey(page, KEY);
  const row = page.locator('#nodes tr[data-node="solo"]');
  await row.waitFor({ timeout: SLOW });
  assert.ok(await page.locator('#nodes-panel').isVisible());
  const cells = await row.locator('td').allTextContents();
  assert.equal(cells[0], 'solo (this node)');
  assert.equal(cells[1], 'serving');
  assert.match(cells[2], /^http:\/\/127\.0\.0\.1:\d+$/);
  assert.match(cells[4], /^\d+ of \d+$/);
  assert.match(cells[5], /iB$/);
  assert.match(cells[6], / left$/);
  await shot(page, 'console-nodes');
});

test('a key that is not an admin key sees no nodes', T, async () => {
  await useKey(page, OTHER_KEY);
  await page.locator('#keys-note').filter({ hasText: 'not an admin key' }).waitFor();
  assert.ok(await page.locator('#nodes-panel').isHidden());
});

test('the page broke no rule of its Content-Security-Policy and asked no other origin', T, async () => {
  assert.deepEqual(browser.problems, []);
});
