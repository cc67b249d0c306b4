// Shared set-up of the browser tests: Debian's Chromium driven by
// playwright-core (no browser download), against a kiln the Rust test
// started (KILN_URL, with its keys in KILN_KEY and KILN_OTHER_KEY).
// Screenshots go to KILN_ARTIFACTS (target/playwright by default).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

export const URL = need('KILN_URL');
export const KEY = need('KILN_KEY');
export const OTHER_KEY = process.env.KILN_OTHER_KEY ?? '';
export const ARTIFACTS = process.env.KILN_ARTIFACTS ?? path.resolve('../target/playwright');
/** Long enough for a cell on a loaded 2-core machine; a hang still fails. */
export const SLOW = 90_000;

function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run the browser tests through cargo test (crates/kiln/tests/web.rs)`);
  return v;
}

/**
 * A fresh Chromium with a fresh profile. The flags keep it off the network
 * (no background requests: this machine reaches only package registries).
 */
export async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'kiln-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.KILN_CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 900 },
    acceptDownloads: true,
  });
  context.setDefaultTimeout(30_000);
  const problems = [];
  const requests = [];
  context.on('request', (r) => requests.push(r));
  const close = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { context, problems, requests, close };
}

/**
 * A page that records what must never happen on kiln's own documents: a
 * Content-Security-Policy violation (something the page itself tried and
 * was refused), an uncaught error, or a request to another origin.
 * Messages from the sandboxed output frames are theirs, not the page's.
 */
export async function open(browser, pathname) {
  const page = await browser.context.newPage();
  page.on('console', (msg) => {
    const where = msg.location()?.url ?? '';
    if (where.startsWith('about:srcdoc')) return;
    if (msg.type() === 'error' && /Content Security Policy/i.test(msg.text())) {
      browser.problems.push(`CSP violation on ${pathname} (${where}:${msg.location()?.lineNumber}): ${msg.text()}`);
    }
  });
  page.on('pageerror', (e) => browser.problems.push(`uncaught error on ${pathname}: ${e.message}`));
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith(URL) && !u.startsWith('data:') && !u.startsWith('blob:') && !u.startsWith('about:')) {
      browser.problems.push(`request to another origin from ${pathname}: ${u}`);
    }
  });
  await page.goto(URL + pathname);
  return page;
}

/** Paste a key into the header form and wait until the page accepted it. */
export async function useKey(page, key) {
  await page.getByRole('textbox', { name: 'API key', exact: true }).fill(key);
  await page.getByRole('button', { name: 'Use key' }).click();
  await page.locator('#key-status').filter({ hasText: /^Using key_/ }).waitFor();
}

export function shot(page, name, { fullPage = true } = {}) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  return page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage });
}

/** The nth cell (0-based) of the playground. */
export function cell(page, n) {
  return page.locator('article.cell').nth(n);
}

/** Replace a cell's code (typed through CodeMirror, as a person would). */
export async function setCode(page, n, code) {
  const editor = cell(page, n).locator('.cm-content');
  await editor.click();
  await page.keyboard.press('Control+A');
  await page.keyboard.press('Delete');
  // insertText: CodeMirror's auto-indent would re-indent typed newlines.
  await page.keyboard.insertText(code);
}

/** Run a cell with Shift+Enter and wait until it finished (any way). */
export async function runCell(page, n) {
  const c = cell(page, n);
  await c.locator('.cm-content').focus();
  // The cell is queued synchronously by the key press, so a finished state
  // seen after it is this run's.
  await page.keyboard.press('Shift+Enter');
  await page.waitForFunction(
    (i) => {
      const el = document.querySelectorAll('article.cell')[i];
      const s = el?.getAttribute('data-state');
      return s === 'done' || s === 'error' || s === 'failed' || s === 'stopped';
    },
    n,
    { timeout: SLOW },
  );
  return c;
}
