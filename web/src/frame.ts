// Runs inside every sandboxed HTML output frame (an opaque origin: it can
// reach nothing of the page). It styles tables the way notebooks do (the
// page's CSP refuses the <style> blocks pandas emits) and reports the
// document's height, so the frame fits its content.
//
// Loaded as a classic script (a module script would be fetched with CORS
// from the opaque origin), so this file must not import anything at run
// time; the CSS is inlined at build time.

import css from './frame.css?inline';

const sheet = new CSSStyleSheet();
sheet.replaceSync(css);
document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];

let last = -1;
function report(): void {
  const height = Math.ceil(document.documentElement.getBoundingClientRect().height);
  // A laid-out document is never 0 tall (the body has padding): 0 means
  // Chromium has not laid this frame out yet, as it does not lay out a
  // cross-origin frame below the fold until it scrolls into view. Reporting
  // it would shrink the frame to nothing until then; the ResizeObserver
  // reports the real height once there is one.
  if (height === 0 || height === last) return;
  last = height;
  parent.postMessage({ kiln: 'frame-height', height }, '*');
}

new ResizeObserver(report).observe(document.documentElement);
addEventListener('load', report);
report();
