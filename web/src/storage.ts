// Where the API key lives: this tab's sessionStorage (gone when the tab
// closes; never a URL, a cookie or localStorage). Only api.ts reads it, to
// send it as a Bearer header.

const STORAGE = 'kiln.api_key';

export function currentKey(): string | null {
  return sessionStorage.getItem(STORAGE);
}

export function storeKey(key: string | null): void {
  if (key === null) sessionStorage.removeItem(STORAGE);
  else sessionStorage.setItem(STORAGE, key);
}
