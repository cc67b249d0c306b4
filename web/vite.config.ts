// Three pages (playground, console, API docs) and one classic script for
// the sandboxed output frames. Everything lands in dist/, which the kiln
// binary embeds (crates/web).
import { defineConfig } from 'vite';

export default defineConfig({
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    // Nothing is inlined as a data: URL: every asset is a file of 'self'.
    assetsInlineLimit: 0,
    // Chromium, Firefox and Safari all support modulepreload.
    modulePreload: { polyfill: false },
    sourcemap: false,
    chunkSizeWarningLimit: 2500,
    rolldownOptions: {
      // The per-plugin timing report is noise in the scripts' output.
      checks: { pluginTimings: false },
      input: {
        index: 'index.html',
        console: 'console.html',
        docs: 'docs.html',
        frame: 'src/frame.ts',
      },
      output: {
        // The output frames load this by a fixed name (see outputs.ts).
        entryFileNames: (chunk) => (chunk.name === 'frame' ? 'assets/frame.js' : 'assets/[name]-[hash].js'),
      },
    },
  },
});
