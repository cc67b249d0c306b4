// What a failed request means for the person in front of the page, by the
// API's stable error codes.

import { ApiError } from './api';

export function describe(e: unknown): string {
  if (!(e instanceof ApiError)) return `Something went wrong in the page: ${String(e)}`;
  switch (e.code) {
    case 'unauthorized':
      return `The server refused this API key (401 unauthorized): ${e.message}`;
    case 'forbidden':
      return `This key may not do that (403 forbidden): ${e.message}`;
    case 'session_expired':
      return 'This session has ended (410 session_expired): its time ran out, it was ended, or the server restarted. The next run starts a new session.';
    case 'session_not_found':
      return 'This session does not exist for this key (404 session_not_found). The next run starts a new session.';
    case 'no_capacity':
      return `The server has no room for another session right now (503 no_capacity). Retry in a few seconds, or end a session on the Console. (${e.message})`;
    case 'too_many_sessions':
      return `This key has as many live sessions as it may (429 too_many_sessions). End one on the Console. (${e.message})`;
    case 'not_ready':
      return `kiln is still starting (503 not_ready): ${e.message}`;
    case 'unreachable':
      return `Could not reach kiln: ${e.message}`;
    default:
      return e.status ? `${e.message} (${e.status} ${e.code})` : e.message;
  }
}

/** Whether the error means the session is gone and a new one should start. */
export function sessionGone(e: unknown): boolean {
  return e instanceof ApiError && (e.code === 'session_expired' || e.code === 'session_not_found');
}
