// Small DOM helpers. Text goes in through textContent and attributes
// through setAttribute, never through HTML strings: nothing a server or a
// cell sends can become markup in the page.

export function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`the page has no #${id}`);
  return el as T;
}

type Child = Node | string | null | undefined | false;

/** `h('button', {type: 'button', class: 'x'}, 'Run')` */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | undefined> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    el.setAttribute(name, value === true ? '' : value);
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c);
  }
  return el;
}

/** The page's alert line (role=alert: screen readers announce it). */
export function showAlert(message: string): void {
  $('alert-text').textContent = message;
  $('alert').hidden = false;
}

export function clearAlert(): void {
  $('alert').hidden = true;
  $('alert-text').textContent = '';
}

export function setupAlert(): void {
  $('alert-close').addEventListener('click', clearAlert);
}

/** "12:04" or "1 h 02 min" until `iso`, or null once it has passed. */
export function timeLeft(iso: string, now = Date.now()): string | null {
  const ms = Date.parse(iso) - now;
  if (!(ms > 0)) return null;
  const s = Math.floor(ms / 1000);
  const m = Math.floor(s / 60);
  if (m >= 60) return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
  return `${m}:${String(s % 60).padStart(2, '0')}`;
}

export function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

export function when(iso: string | null): string {
  if (!iso) return '–';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}
