// The key form of the page header: a key is checked against the server
// before it is kept (storage.ts), and a refused one is never kept.

import { ApiError } from './api';
import { describe } from './errors';
import { currentKey, storeKey } from './storage';
import { $, clearAlert, showAlert } from './ui';

type Listener = (keyId: string | null) => void;

/**
 * Wire the key form of the page header. `check` proves a key works (it is
 * called with the key already stored) and returns the key's id; `onChange`
 * runs when a key was accepted or forgotten, and once at start.
 */
export function setupKeyForm(check: () => Promise<string>, onChange: Listener): void {
  const form = $<HTMLFormElement>('key-form');
  const input = $<HTMLInputElement>('key-input');
  const forget = $<HTMLButtonElement>('key-forget');
  const status = $('key-status');

  const show = (keyId: string | null) => {
    forget.hidden = keyId === null;
    input.value = '';
    input.placeholder = keyId ? 'key stored for this tab' : 'kiln_…';
    status.textContent = keyId ? `Using ${keyId}` : 'No key';
  };

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) {
      input.focus();
      showAlert('Paste an API key first: kiln printed one at its first start (also in <data-dir>/api-key).');
      return;
    }
    const previous = currentKey();
    storeKey(key);
    try {
      const keyId = await check();
      clearAlert();
      show(keyId);
      onChange(keyId);
    } catch (e) {
      // A refused key is never kept.
      storeKey(previous);
      input.select();
      showAlert(describe(e));
    }
  });

  forget.addEventListener('click', () => {
    storeKey(null);
    show(null);
    onChange(null);
    input.focus();
  });

  if (currentKey()) {
    check()
      .then((keyId) => {
        show(keyId);
        onChange(keyId);
      })
      .catch((e) => {
        // A key revoked since it was stored is dropped; a server that did
        // not answer says nothing about the key.
        if (e instanceof ApiError && e.status === 401) storeKey(null);
        show(null);
        showAlert(describe(e));
        onChange(null);
      });
  } else {
    show(null);
    onChange(null);
  }
}
