// What code output can reach in the page: a cell that prints hostile HTML
// (inline script, an event handler) and SVG with a script must not read the
// key, the page's DOM, or make a request the server would take as ours.
//
// Two walls are checked separately: the page's Content-Security-Policy,
// inherited by the output frames, refuses the inline script; and script
// that does run in an output frame (evaluated there by the test, as an
// attacker who got past the policy would) has an opaque origin that reaches
// nothing of the page.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { cell, KEY, launch, open, runCell, setCode, shot, SLOW, URL, useKey } from './lib.mjs';

let browser;
let page;
const frameConsole = [];

before(async () => {
  browser = await launch();
  page = await open(browser, '/');
  page.on('console', (msg) => {
    if ((msg.location()?.url ?? '').startsWith('about:srcdoc')) frameConsole.push(msg.text());
  });
  await useKey(page, KEY);
});

after(async () => {
  await browser?.close();
});

const T = { timeout: 180_000 };

const HOSTILE = String.raw`from IPython.display import HTML, SVG, display
display(HTML('''<p id="probe">untouched</p>
<img src="/nonexistent.png" onerror="document.getElementById('probe').textContent = 'handler ran'">
<script>
document.getElementById('probe').textContent = 'inline script ran';
let loot = {};
try { loot.key = sessionStorage.getItem('kiln.api_key'); } catch (e) { loot.key = String(e); }
try { loot.dom = parent.document.body.innerHTML; } catch (e) { loot.dom = String(e); }
parent.postMessage({ kiln: 'frame-height', height: 5000, loot: loot }, '*');
</script>'''))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><script>parent.postMessage("svg script ran", "*")</script><circle cx="20" cy="20" r="15" fill="teal"/></svg>'))`;

let frame;

test('hostile HTML output renders in a frame sandboxed without same-origin, its inline script refused', T, async () => {
  await setCode(page, 0, HOSTILE);
  const c = await runCell(page, 0);
  assert.equal(await c.getAttribute('data-state'), 'done');
  const el = c.locator('iframe.html-output');
  await el.waitFor();
  frame = await (await el.elementHandle()).contentFrame();
  assert.equal(await el.getAttribute('sandbox'), 'allow-scripts', 'scripts but no allow-same-origin, forms, popups or top navigation');
  await frame.locator('#probe').waitFor();
  // frame.js (a script of the page's own origin) did run: it sized the frame.
  await page.waitForFunction((f) => f.style.height !== '', await el.elementHandle(), { timeout: SLOW });
  assert.equal(await frame.locator('#probe').textContent(), 'untouched', 'neither the inline script nor the handler ran');
  const height = await el.evaluate((f) => f.getBoundingClientRect().height);
  assert.ok(height < 1000, `a message posing as a height report did not resize the frame (${height}px)`);
  assert.ok(
    frameConsole.some((t) => /inline script/i.test(t) && /Content Security Policy/.test(t)),
    `the policy refused the script: ${JSON.stringify(frameConsole)}`,
  );
  // SVG is shown as an image, where script never runs.
  const svg = c.locator('img[data-mime="image/svg+xml"]');
  assert.match(await svg.getAttribute('src'), /^data:image\/svg\+xml;base64,/);
  assert.equal(await c.locator('svg').count(), 0, 'no inline SVG in the page');
  await shot(page, 'security-hostile-output');
});

test('script running in the output frame reads neither the key nor the page, and sends no authenticated request', T, async () => {
  const reach = await frame.evaluate(async (key) => {
    const attempt = async (f) => {
      try {
        const v = await f();
        return { ok: true, value: typeof v === 'string' ? v.slice(0, 200) : v };
      } catch (e) {
        return { ok: false, error: String(e.name ?? e) };
      }
    };
    return {
      origin: self.origin,
      sessionStorage: await attempt(() => sessionStorage.getItem('kiln.api_key')),
      localStorage: await attempt(() => localStorage.length),
      cookie: await attempt(() => document.cookie),
      parentDom: await attempt(() => parent.document.body.innerHTML),
      topUrl: await attempt(() => top.location.href),
      opener: await attempt(() => String(window.opener)),
      sessions: await attempt(async () => (await fetch('/v1/tci/sessions', { credentials: 'include' })).status),
      execute: await attempt(
        async () =>
          (
            await fetch('/v1/tci/execute', {
              method: 'POST',
              headers: { 'Content-Type': 'application/json' },
              body: JSON.stringify({ code: 'print(1)' }),
            })
          ).status,
      ),
      keyInDocument: document.documentElement.outerHTML.includes(key),
    };
  }, KEY);
  assert.equal(reach.origin, 'null', 'an opaque origin');
  assert.deepEqual(reach.sessionStorage, { ok: false, error: 'SecurityError' });
  assert.deepEqual(reach.localStorage, { ok: false, error: 'SecurityError' });
  assert.deepEqual(reach.cookie, { ok: false, error: 'SecurityError' });
  assert.deepEqual(reach.parentDom, { ok: false, error: 'SecurityError' });
  assert.deepEqual(reach.topUrl, { ok: false, error: 'SecurityError' });
  // Requests from the opaque origin are cross-origin: their answers cannot
  // be read (and they could carry no key, having none).
  assert.equal(reach.sessions.ok, false, JSON.stringify(reach.sessions));
  assert.equal(reach.execute.ok, false, JSON.stringify(reach.execute));
  assert.equal(reach.keyInDocument, false);
  // Of every request the browser made, only the page's own carried the key.
  const fromFrames = browser.requests.filter((r) => r.frame() !== page.mainFrame());
  assert.ok(fromFrames.length > 0, 'the frame did make requests');
  for (const r of fromFrames) {
    assert.equal(r.headers().authorization, undefined, `${r.method()} ${r.url()} from a frame carried a key`);
  }
  const keyed = browser.requests.filter((r) => r.headers().authorization);
  assert.ok(keyed.length > 0);
  for (const r of keyed) {
    assert.equal(r.frame(), page.mainFrame());
    assert.equal(r.headers().authorization, `Bearer ${KEY}`);
    assert.ok(r.url().startsWith(URL) && !r.url().includes(KEY));
  }
});

test('the pages are served with a strict Content-Security-Policy', T, async () => {
  for (const path of ['/', '/console', '/docs']) {
    const resp = await fetch(URL + path);
    assert.equal(resp.status, 200);
    const csp = resp.headers.get('content-security-policy');
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /script-src 'self';/);
    assert.match(csp, /style-src 'self';/);
    assert.match(csp, /frame-ancestors 'none'/);
    assert.doesNotMatch(csp, /unsafe|\*|https?:/);
    assert.equal(resp.headers.get('x-content-type-options'), 'nosniff');
    const html = await resp.text();
    assert.doesNotMatch(html, /<script>|<script [^>]*>[^<]/, `${path} has no inline script`);
    assert.doesNotMatch(html, /https?:\/\//, `${path} loads nothing from elsewhere`);
  }
});

test('the docs page renders the API reference from bundled assets only', T, async () => {
  const docs = await open(browser, '/docs');
  await docs.getByText('/v1/tci/execute').first().waitFor({ timeout: SLOW });
  await docs.locator('.opblock-summary').filter({ hasText: '/v1/tci/execute' }).first().click();
  await docs.getByText('Run code in a new session').first().waitFor();
  await shot(docs, 'docs', { fullPage: false });
  await docs.close();
});

test('no page broke a rule of its policy or asked another origin', T, async () => {
  assert.deepEqual(browser.problems, []);
  // The page ignored the fake height the refused script would have sent,
  // and never answered a message: nothing from the frame reached it.
  assert.equal(await cell(page, 0).locator('iframe.html-output').count(), 1);
});
