// The file panel: upload into the session's working directory, browse it,
// download a file (fetched with the Bearer header, then saved from a blob:
// URL, so the key never appears in a link).

import { download, sessions, type UploadFile } from './api';
import { describe, sessionGone } from './errors';
import { ensure, forget, onSessionChange, sessionId } from './session';
import { $, bytes, h, showAlert } from './ui';

let dir = '';

export function setupFiles(): void {
  const input = $<HTMLInputElement>('upload');
  input.addEventListener('change', async () => {
    const picked = Array.from(input.files ?? []);
    input.value = '';
    if (picked.length === 0) return;
    try {
      const files = await Promise.all(picked.map(toUpload));
      const id = await ensure();
      await sessions.upload(id, files);
      await refreshFiles();
      $('files-list').dataset.uploaded = files.map((f) => f.name).join(',');
    } catch (e) {
      if (sessionGone(e)) forget();
      showAlert(`Upload failed. ${describe(e)}`);
    }
  });
  $('files-refresh').addEventListener('click', () => void refreshFiles());
  onSessionChange(() => {
    dir = '';
    void refreshFiles();
  });
  void refreshFiles();
}

async function toUpload(file: File): Promise<UploadFile> {
  const buf = new Uint8Array(await file.arrayBuffer());
  let bin = '';
  for (let i = 0; i < buf.length; i += 0x8000) bin += String.fromCharCode(...buf.subarray(i, i + 0x8000));
  const prefix = dir ? `${dir}/` : '';
  return { name: prefix + file.name, encoding: 'base64', content: btoa(bin) };
}

export async function refreshFiles(): Promise<void> {
  const list = $('files-list');
  const empty = $('files-empty');
  const id = sessionId();
  renderPath();
  if (id === null) {
    list.replaceChildren();
    empty.hidden = false;
    empty.textContent = 'Run a cell or upload a file to start a session.';
    return;
  }
  try {
    const listing = await sessions.files(id, dir);
    if (sessionId() !== id) return;
    list.replaceChildren(...listing.entries.map(entry));
    empty.hidden = listing.entries.length > 0;
    empty.textContent = 'This folder is empty.';
  } catch (e) {
    if (sessionGone(e)) {
      forget();
      return;
    }
    if (dir !== '') {
      dir = '';
      return refreshFiles();
    }
    list.replaceChildren();
    empty.hidden = false;
    empty.textContent = describe(e);
  }
}

function entry(e: { name: string; path: string; type: string; size: number }): HTMLElement {
  if (e.type === 'directory') {
    const open = h('button', { type: 'button', class: 'link' }, `${e.name}/`);
    open.addEventListener('click', () => {
      dir = e.path;
      void refreshFiles();
    });
    return h('li', { class: 'dir' }, open);
  }
  if (e.type !== 'file') return h('li', { class: 'muted' }, `${e.name} (${e.type})`);
  const get = h('button', { type: 'button', class: 'small', 'aria-label': `Download ${e.path}` }, 'Download');
  get.addEventListener('click', () => void save(e.path, e.name));
  return h('li', { class: 'file' }, h('span', { class: 'name' }, e.name), h('span', { class: 'size' }, bytes(e.size)), get);
}

async function save(path: string, name: string): Promise<void> {
  const id = sessionId();
  if (id === null) return;
  try {
    const blob = await download(id, path);
    const url = URL.createObjectURL(blob);
    const a = h('a', { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (e) {
    if (sessionGone(e)) forget();
    showAlert(`Download failed. ${describe(e)}`);
  }
}

function renderPath(): void {
  const nav = $('files-path');
  const parts = dir ? dir.split('/') : [];
  const crumbs: Node[] = [];
  const root = h('button', { type: 'button', class: 'link' }, '/work');
  root.addEventListener('click', () => {
    dir = '';
    void refreshFiles();
  });
  crumbs.push(root);
  parts.forEach((p, i) => {
    const to = parts.slice(0, i + 1).join('/');
    const b = h('button', { type: 'button', class: 'link' }, p);
    b.addEventListener('click', () => {
      dir = to;
      void refreshFiles();
    });
    crumbs.push(document.createTextNode(' / '), b);
  });
  nav.replaceChildren(...crumbs);
}
