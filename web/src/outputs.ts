// Rendering a cell's outputs the way a notebook shows them.
//
// Text is text (ANSI colours become classes and CSSOM styles, never markup);
// images are data: URLs of <img> elements, so an SVG cannot run script;
// HTML runs in an iframe with `sandbox="allow-scripts"` and no
// allow-same-origin: its document has an opaque origin, so nothing in it can
// read this page's storage (the API key), its DOM, or send a request the
// server would take as ours. The frame also inherits the page's
// Content-Security-Policy, which refuses inline script; the only script it
// can load is the page's own frame.js, which reports the frame's height.

import Anser from 'anser';
import type { Output } from './api';
import { h } from './ui';

/** The script every output frame loads (a fixed name: see vite.config.ts). */
const FRAME_SCRIPT = '/assets/frame.js';
/** Frames never grow past this; taller content scrolls inside. */
const MAX_FRAME_HEIGHT = 1600;

const frames = new Set<HTMLIFrameElement>();

window.addEventListener('message', (ev) => {
  // Only a height, from one of our frames; anything else is ignored.
  const data = ev.data as { kiln?: string; height?: unknown };
  if (!data || data.kiln !== 'frame-height' || typeof data.height !== 'number') return;
  for (const f of frames) {
    if (!f.isConnected) {
      frames.delete(f);
      continue;
    }
    if (f.contentWindow === ev.source) {
      f.style.height = `${Math.min(Math.max(Math.ceil(data.height), 24), MAX_FRAME_HEIGHT)}px`;
    }
  }
});

/** Consecutive stdout (or stderr) chunks as one output, as the API merges them. */
export function merge(outputs: Output[]): Output[] {
  const merged: Output[] = [];
  for (const o of outputs) {
    const last = merged[merged.length - 1];
    if (last && (o.type === 'stdout' || o.type === 'stderr') && last.type === o.type) {
      merged[merged.length - 1] = { type: o.type, data: (last.data as string) + (o.data as string) };
    } else {
      merged.push(o);
    }
  }
  return merged;
}

/** The element showing one output. */
export function renderOutput(o: Output): HTMLElement {
  switch (o.type) {
    case 'stdout':
      return h('pre', { class: 'out stdout' }, ansi(o.data));
    case 'stderr':
      return h('pre', { class: 'out stderr' }, ansi(o.data));
    case 'error':
      return h('pre', { class: 'out error', 'data-output': 'error' }, traceback(o.data));
    case 'display_data':
    case 'execute_result':
      return bundle(o.data, o.type);
  }
}

/** Append a streamed chunk to the element `renderOutput` made for its output. */
export function appendText(el: HTMLElement, text: string): void {
  el.append(ansi(text));
}

/** The richest representation of a MIME bundle this page can show safely. */
function bundle(data: Record<string, unknown>, type: string): HTMLElement {
  const wrap = h('div', { class: `out rich ${type}` });
  const str = (k: string) => (typeof data[k] === 'string' ? (data[k] as string) : undefined);
  const html = str('text/html');
  const png = str('image/png');
  const jpeg = str('image/jpeg');
  const gif = str('image/gif');
  const svg = str('image/svg+xml');
  const alt = str('text/plain') ?? 'output image';
  if (html !== undefined) {
    wrap.append(htmlFrame(html));
  } else if (png || jpeg || gif) {
    const [mime, b64] = png ? ['image/png', png] : jpeg ? ['image/jpeg', jpeg] : ['image/gif', gif as string];
    wrap.append(h('img', { src: `data:${mime};base64,${b64.replace(/\s+/g, '')}`, alt, 'data-mime': mime }));
  } else if (svg !== undefined) {
    const b64 = utf8ToBase64(svg);
    wrap.append(h('img', { src: `data:image/svg+xml;base64,${b64}`, alt, 'data-mime': 'image/svg+xml' }));
  } else if (data['application/json'] !== undefined) {
    wrap.append(h('pre', { class: 'json', 'data-mime': 'application/json' }, JSON.stringify(data['application/json'], null, 2)));
  } else if (str('text/markdown') !== undefined) {
    wrap.append(h('pre', { 'data-mime': 'text/markdown' }, str('text/markdown') as string));
  } else if (str('text/latex') !== undefined) {
    wrap.append(h('pre', { 'data-mime': 'text/latex' }, str('text/latex') as string));
  } else if (str('text/plain') !== undefined) {
    wrap.append(h('pre', { 'data-mime': 'text/plain' }, ansi(str('text/plain') as string)));
  } else {
    wrap.append(h('p', { class: 'muted' }, `(an output of type ${Object.keys(data).join(', ') || 'nothing'} this page cannot show)`));
  }
  return wrap;
}

function htmlFrame(html: string): HTMLIFrameElement {
  const frame = h('iframe', {
    // Scripts may run (frame.js reports the height) but never with this
    // page's origin: no allow-same-origin, no forms, popups or navigation
    // of the page.
    sandbox: 'allow-scripts',
    referrerpolicy: 'no-referrer',
    title: 'HTML output',
    class: 'html-output',
    'data-mime': 'text/html',
  });
  frame.srcdoc =
    '<!doctype html><html><head><meta charset="utf-8">' +
    `<script defer src="${FRAME_SCRIPT}"></script></head><body>${html}</body></html>`;
  frames.add(frame);
  return frame;
}

function utf8ToBase64(s: string): string {
  const bytes = new TextEncoder().encode(s);
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

/** Text with ANSI colours as spans (classes for the 16 colours, CSSOM for the rest). */
export function ansi(text: string): DocumentFragment {
  const frag = document.createDocumentFragment();
  if (!text.includes('\x1b')) {
    frag.append(text);
    return frag;
  }
  for (const part of Anser.ansiToJson(text, { use_classes: true, remove_empty: true })) {
    const plain = !part.fg && !part.bg && part.decorations.length === 0;
    if (plain) {
      frag.append(part.content);
      continue;
    }
    const span = h('span', {}, part.content);
    colour(span, part.fg, part.fg_truecolor, 'fg');
    colour(span, part.bg, part.bg_truecolor, 'bg');
    for (const d of part.decorations) span.classList.add(`ansi-${d}`);
    frag.append(span);
  }
  return frag;
}

function colour(span: HTMLElement, cls: string | null, truecolor: string | null, which: 'fg' | 'bg'): void {
  if (!cls) return;
  let rgb: string | null = null;
  if (cls === 'ansi-truecolor' && truecolor) rgb = truecolor;
  else if (cls.startsWith('ansi-palette-')) rgb = palette(Number(cls.slice('ansi-palette-'.length)));
  if (rgb === null) {
    span.classList.add(`${cls}-${which}`);
  } else if (which === 'fg') {
    span.style.color = `rgb(${rgb})`;
  } else {
    span.style.backgroundColor = `rgb(${rgb})`;
  }
}

/** xterm's 256-colour palette above the 16 named colours. */
function palette(n: number): string | null {
  if (!(n >= 16 && n <= 255)) return null;
  if (n >= 232) {
    const v = 8 + (n - 232) * 10;
    return `${v}, ${v}, ${v}`;
  }
  const i = n - 16;
  const level = (x: number) => (x === 0 ? 0 : 55 + x * 40);
  return `${level(Math.floor(i / 36))}, ${level(Math.floor(i / 6) % 6)}, ${level(i % 6)}`;
}

/**
 * A traceback. kiln sends tracebacks without their ANSI colours (as the TCI
 * API does), so the page colours IPython's layout itself: the exception's
 * name, the frames' locations and the arrow at the failing line. A traceback
 * that still carries ANSI codes keeps its own colours.
 */
export function traceback(text: string): DocumentFragment {
  if (text.includes('\x1b')) return ansi(text);
  const frag = document.createDocumentFragment();
  const lines = text.split('\n');
  lines.forEach((line, i) => {
    if (i > 0) frag.append('\n');
    let m: RegExpMatchArray | null;
    if (/^-{20,}$/.test(line)) {
      frag.append(h('span', { class: 'tb-rule' }, line));
    } else if ((m = line.match(/^(\w[\w.]*(?:Error|Exception|Interrupt|Exit|Warning|Iteration))(\s+Traceback \(most recent call last\))$/))) {
      frag.append(h('span', { class: 'tb-exc' }, m[1]), h('span', { class: 'tb-head' }, m[2]));
    } else if ((m = line.match(/^(Cell In\[\d+\], line \d+|File [^,]+(?:, line \d+)?(?:, in .+)?|\s*File ".+", line \d+(?:, in .+)?)(.*)$/))) {
      frag.append(h('span', { class: 'tb-loc' }, m[1]), m[2]);
    } else if ((m = line.match(/^(-+>\s*\d+)(.*)$/))) {
      frag.append(h('span', { class: 'tb-arrow' }, m[1]), m[2]);
    } else if ((m = line.match(/^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning|Iteration)?)(: .*)?$/)) && i === lastNonEmpty(lines)) {
      frag.append(h('span', { class: 'tb-exc' }, m[1]), m[2] ?? '');
    } else {
      frag.append(line);
    }
  });
  return frag;
}

function lastNonEmpty(lines: string[]): number {
  for (let i = lines.length - 1; i >= 0; i--) if (lines[i].trim()) return i;
  return -1;
}
