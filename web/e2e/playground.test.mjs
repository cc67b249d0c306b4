// The playground at `/`, driven as a person would: a key pasted in, cells
// typed and run from the keyboard, every kind of output, files, Stop,
// restart and end, a narrow screen.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { cell, KEY, launch, open, runCell, setCode, shot, SLOW, URL, useKey } from './lib.mjs';

let browser;
let page;

before(async () => {
  browser = await launch();
  page = await open(browser, '/');
});

after(async () => {
  await browser?.close();
});

const T = { timeout: 180_000 };

async function api(method, path, key = KEY) {
  const resp = await fetch(URL + path, { method, headers: { Authorization: `Bearer ${key}` } });
  return { status: resp.status, body: await resp.json() };
}

async function addCell(code) {
  await page.getByRole('button', { name: 'Add cell' }).click();
  const n = await page.locator('article.cell').count();
  await setCode(page, n - 1, code);
  return n - 1;
}

const sessionId = () => page.locator('#session-id').textContent();

test('a wrong key is refused with a message that says so, and is not kept', T, async () => {
  await page.getByRole('textbox', { name: 'API key', exact: true }).fill('kiln_not-a-key');
  await page.getByRole('button', { name: 'Use key' }).click();
  const alert = page.getByRole('alert');
  await alert.filter({ hasText: '401 unauthorized' }).waitFor();
  assert.match(await alert.textContent(), /refused this API key/);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('kiln.api_key')), null);
  assert.equal(await page.locator('#key-status').textContent(), 'No key');
  await shot(page, 'playground-wrong-key');
});

test('a key is checked, then kept in this tab only and never put in the URL', T, async () => {
  await useKey(page, KEY);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('kiln.api_key')), KEY);
  assert.equal(await page.evaluate(() => localStorage.length), 0);
  assert.deepEqual(await browser.context.cookies(), []);
  assert.ok(!page.url().includes(KEY));
  assert.ok(await page.getByRole('alert').isHidden(), 'the earlier error was cleared');
});

test('print(1) shows its output, in a session whose id and time left are shown', T, async () => {
  await setCode(page, 0, 'print(1)');
  const c = await runCell(page, 0);
  assert.equal(await c.getAttribute('data-state'), 'done');
  assert.equal(await c.locator('pre.stdout').textContent(), '1\n');
  assert.equal(await c.locator('.prompt').textContent(), '[1]');
  assert.match(await sessionId(), /^ses_\w+$/);
  await page.locator('#time-left').filter({ hasText: /^(59|60):\d\d left$/ }).waitFor();
});

test('a matplotlib cell shows its figure as an image', T, async () => {
  const n = await addCell('import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title("kiln")\nplt.show()');
  const c = await runCell(page, n);
  const img = c.locator('img[data-mime="image/png"]');
  await img.waitFor();
  const size = await img.evaluate((el) => [el.naturalWidth, el.naturalHeight, el.complete]);
  assert.ok(size[2] && size[0] > 200 && size[1] > 100, `a decoded figure, got ${size}`);
  await shot(page, 'playground-plot');
});

test('1/0 shows the traceback with its exception coloured', T, async () => {
  const n = await addCell('def f():\n    return 1 / 0\n\nf()');
  const c = await runCell(page, n);
  assert.equal(await c.getAttribute('data-state'), 'error');
  const tb = c.locator('pre.error');
  assert.match(await tb.textContent(), /ZeroDivisionError: division by zero/);
  const exc = tb.locator('.tb-exc').last();
  assert.equal(await exc.textContent(), 'ZeroDivisionError');
  const colour = await exc.evaluate((el) => getComputedStyle(el).color);
  assert.equal(colour, 'rgb(179, 38, 30)');
  assert.ok((await tb.locator('.tb-loc').count()) >= 2, 'the frames are marked');
  await c.locator('pre.error').scrollIntoViewIfNeeded();
  await shot(page, 'playground-traceback');
});

test('a pandas table renders as a table, in a sandboxed frame sized to it', T, async () => {
  const n = await addCell('import pandas as pd\npd.DataFrame({"city": ["Oslo", "Lima", "Pune"], "temp": [3.5, 19.0, 31.2]})');
  const c = await runCell(page, n);
  const frame = c.locator('iframe.html-output');
  await frame.waitFor();
  assert.equal(await frame.getAttribute('sandbox'), 'allow-scripts');
  const rows = frame.contentFrame().locator('table.dataframe tbody tr');
  await rows.first().waitFor();
  assert.equal(await rows.count(), 3);
  assert.equal(await rows.nth(1).locator('td').first().textContent(), 'Lima');
  // frame.js reports the document's height and the frame takes it. Chromium
  // lays out a cross-origin frame below the fold only once it scrolls into
  // view, as a reader's would.
  await frame.scrollIntoViewIfNeeded();
  const table = await frame.contentFrame().locator('html').evaluate((el) => Math.ceil(el.getBoundingClientRect().height));
  assert.ok(table > 60 && table < 400, `the table's document is ${table}px tall`);
  await page.waitForFunction(([el, h]) => el.getBoundingClientRect().height === h, [await frame.elementHandle(), table], { timeout: SLOW });
  await shot(page, 'playground-table');
});

test('an uploaded file lands in the working directory, code reads it, and it downloads back', T, async () => {
  const content = 'name,score\nada,3\ngrace,5\n';
  await page.locator('#upload').setInputFiles({ name: 'scores.csv', mimeType: 'text/csv', buffer: Buffer.from(content) });
  const item = page.locator('#files-list li.file').filter({ hasText: 'scores.csv' });
  await item.waitFor();
  const n = await addCell('import pandas as pd\nprint(pd.read_csv("scores.csv")["score"].sum())\nopen("made.txt", "w").write("made by code")');
  const c = await runCell(page, n);
  assert.equal(await c.locator('pre.stdout').textContent(), '8\n');
  // The cell's own file shows up after the run, and downloads intact.
  const made = page.locator('#files-list li.file').filter({ hasText: 'made.txt' });
  await made.waitFor();
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    made.getByRole('button', { name: 'Download made.txt' }).click(),
  ]);
  assert.equal(download.suggestedFilename(), 'made.txt');
  const stream = await download.createReadStream();
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.equal(Buffer.concat(chunks).toString(), 'made by code');
  assert.ok(!download.url().includes(KEY), 'the download URL is a blob: URL, without the key');
  await shot(page, 'playground-files');
});

test('Tab indents and Shift+Enter runs, from the keyboard alone; Esc then Tab leaves the editor', T, async () => {
  const n = await addCell('');
  const editor = cell(page, n).locator('.cm-content');
  await editor.focus();
  await page.keyboard.type('for i in range(2):');
  await page.keyboard.press('Enter');
  await page.keyboard.press('Shift+Tab');
  await page.keyboard.press('Tab');
  await page.keyboard.type('print("row", i)');
  const code = await cell(page, n).evaluate((el) => el.querySelector('.editor').shadowRoot.querySelector('.cm-content').innerText);
  assert.equal(code.replace(/\u00a0/g, ' '), 'for i in range(2):\n    print("row", i)');
  await page.keyboard.press('Shift+Enter');
  await cell(page, n).locator('pre.stdout').filter({ hasText: 'row 1' }).waitFor({ timeout: SLOW });
  assert.equal(await cell(page, n).locator('pre.stdout').textContent(), 'row 0\nrow 1\n');
  await editor.focus();
  await page.keyboard.press('Escape');
  await page.keyboard.press('Tab');
  const inEditor = await cell(page, n).evaluate((el) => el.querySelector('.editor').shadowRoot.activeElement !== null);
  assert.equal(inEditor, false, 'focus moved out of the editor');
});

test('output streams in while the cell still runs', T, async () => {
  const n = await addCell("import time\nprint('first')\ntime.sleep(4)\nprint('second')");
  const c = cell(page, n);
  await c.locator('.cm-content').focus();
  await page.keyboard.press('Shift+Enter');
  // 'first' shows while the cell sleeps: the cell is still running then.
  await c.locator('pre.stdout').filter({ hasText: 'first' }).waitFor({ timeout: SLOW });
  assert.equal(await c.getAttribute('data-state'), 'running');
  assert.equal(await c.locator('pre.stdout').textContent(), 'first\n');
  await shot(page, 'playground-streaming');
  await page.waitForFunction((i) => document.querySelectorAll('article.cell')[i].dataset.state === 'done', n, { timeout: SLOW });
  assert.equal(await c.locator('pre.stdout').allTextContents().then((t) => t.join('')), 'first\nsecond\n');
});

test('Stop interrupts `while True: pass`, and the session lives on with its state', T, async () => {
  const before = await sessionId();
  const n = await addCell('x_before_stop = 41\nwhile True: pass');
  const c = cell(page, n);
  await c.locator('.cm-content').focus();
  await page.keyboard.press('Shift+Enter');
  await page.waitForFunction((i) => document.querySelectorAll('article.cell')[i].dataset.state === 'running', n, { timeout: SLOW });
  await page.waitForTimeout(1500);
  await c.getByRole('button', { name: 'Stop' }).click();
  await page.waitForFunction((i) => document.querySelectorAll('article.cell')[i].dataset.state === 'stopped', n, { timeout: SLOW });
  assert.match(await c.locator('.cell-status').textContent(), /interrupted/);
  const m = await addCell('print(x_before_stop + 1)');
  const next = await runCell(page, m);
  assert.equal(await next.locator('pre.stdout').textContent(), '42\n');
  assert.equal(await sessionId(), before);
  await shot(page, 'playground-stopped');
});

test('a session ended elsewhere is reported as ended, and the next run starts a new one', T, async () => {
  const old = await sessionId();
  const ended = await api('DELETE', `/v1/tci/sessions/${old}`);
  assert.equal(ended.status, 200);
  const n = await addCell('print("again")');
  const c = await runCell(page, n);
  assert.equal(await c.getAttribute('data-state'), 'failed');
  assert.match(await c.locator('.api-error').textContent(), /This session has ended \(410 session_expired\)/);
  assert.equal(await sessionId(), 'none');
  await shot(page, 'playground-session-ended');
  await runCell(page, n);
  assert.equal(await c.locator('pre.stdout').textContent(), 'again\n');
  const fresh = await sessionId();
  assert.match(fresh, /^ses_/);
  assert.notEqual(fresh, old);
});

test('Restart gives a fresh session; End session ends it on the server', T, async () => {
  const n = await addCell('kept = 1');
  await runCell(page, n);
  const old = await sessionId();
  await page.getByRole('button', { name: 'Restart' }).click();
  await page.waitForFunction((o) => !['none', o].includes(document.getElementById('session-id').textContent), old);
  assert.equal(await page.locator('.outputs > *').count(), 0, 'outputs were cleared');
  assert.equal((await api('GET', `/v1/tci/sessions/${old}`)).status, 410);
  await setCode(page, n, 'print("kept" in globals())');
  await runCell(page, n);
  assert.equal(await cell(page, n).locator('pre.stdout').textContent(), 'False\n');
  const current = await sessionId();
  await page.getByRole('button', { name: 'End session' }).click();
  await page.locator('#session-id').filter({ hasText: /^none$/ }).waitFor();
  assert.equal((await api('GET', `/v1/tci/sessions/${current}`)).status, 410);
});

test('the language picker offers what the server runs', T, async () => {
  const offered = await page.locator('#language option').allTextContents();
  const served = (await (await fetch(`${URL}/v1/tci/languages`)).json()).data.languages;
  assert.deepEqual(offered, served);
  assert.ok(offered.includes('python'));
});

test('at a phone width nothing overflows sideways', T, async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(URL + '/');
  await page.locator('#key-status').filter({ hasText: /^Using key_/ }).waitFor();
  await setCode(page, 0, 'import pandas as pd\npd.DataFrame({"a": range(3)})');
  await runCell(page, 0);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than the screen`);
  await shot(page, 'playground-narrow');
  await page.setViewportSize({ width: 1280, height: 900 });
});

test('the page broke no rule of its Content-Security-Policy and asked no other origin', T, async () => {
  assert.deepEqual(browser.problems, []);
});
