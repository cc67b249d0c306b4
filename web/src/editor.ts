// A cell's code editor: CodeMirror 6 with Python highlighting, Tab
// indentation (Esc then Tab moves focus on, so the keyboard is never
// trapped) and Shift+Enter (or Ctrl/Cmd+Enter) to run.
//
// Each editor lives in a shadow root. CodeMirror styles a document with a
// <style> element, which the page's Content-Security-Policy refuses (no
// inline style, no nonce); in a shadow root it uses a constructed
// stylesheet (adoptedStyleSheets), which the policy does not govern. Its
// look is therefore set here, as a CodeMirror theme, not in style.css.

import { defaultKeymap, history, historyKeymap, indentWithTab } from '@codemirror/commands';
import { python } from '@codemirror/lang-python';
import { bracketMatching, defaultHighlightStyle, indentOnInput, indentUnit, syntaxHighlighting } from '@codemirror/language';
import { EditorState } from '@codemirror/state';
import { drawSelection, EditorView, highlightActiveLine, keymap, lineNumbers } from '@codemirror/view';

const theme = EditorView.theme({
  '&': { fontSize: '0.9rem', maxHeight: '60vh', backgroundColor: '#fff' },
  '&.cm-focused': { outline: 'none' },
  '.cm-scroller': {
    overflow: 'auto',
    fontFamily: "ui-monospace, 'SFMono-Regular', Menlo, Consolas, 'Liberation Mono', monospace",
    lineHeight: '1.5',
  },
  '.cm-content': { padding: '6px 0' },
  '.cm-gutters': { backgroundColor: '#fbfbfc', borderRight: '1px solid #eceef2', color: '#8a8f98' },
  '.cm-activeLine': { backgroundColor: '#f4f7fc' },
  '.cm-activeLineGutter': { backgroundColor: '#eef2f9' },
});

export function createEditor(host: HTMLElement, doc: string, label: string, run: () => void): EditorView {
  const runKey = () => {
    run();
    return true;
  };
  const root = host.attachShadow({ mode: 'open' });
  return new EditorView({
    parent: root,
    root,
    state: EditorState.create({
      doc,
      extensions: [
        keymap.of([
          { key: 'Shift-Enter', run: runKey },
          { key: 'Mod-Enter', run: runKey },
          indentWithTab,
          ...defaultKeymap,
          ...historyKeymap,
        ]),
        lineNumbers(),
        history(),
        drawSelection(),
        highlightActiveLine(),
        indentOnInput(),
        indentUnit.of('    '),
        bracketMatching(),
        syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
        python(),
        EditorView.lineWrapping,
        theme,
        EditorView.contentAttributes.of({ 'aria-label': label }),
      ],
    }),
  });
}
