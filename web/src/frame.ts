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
  if (height === last) return;
  last = height;
  parent.postMessage({ kiln: 'frame-height', height }, '*');
}

new ResizeObserver(report).observe(document.documentElement);
addEventListener('load', report);
report();
