// A cell's code editor: CodeMirror 6 with Python highlighting, Tab
// indentation (Esc then Tab moves focus on, so the keyboard is never
// trapped) and Shift+Enter (or Ctrl/Cmd+Enter) to run.
//
// CodeMirror injects its styles as constructed stylesheets, which the
// page's Content-Security-Policy allows: no inline <style> is needed.

import { defaultKeymap, history, historyKeymap, indentWithTab } from '@codemirror/commands';
import { python } from '@codemirror/lang-python';
import { bracketMatching, defaultHighlightStyle, indentOnInput, indentUnit, syntaxHighlighting } from '@codemirror/language';
import { EditorState } from '@codemirror/state';
import { drawSelection, EditorView, highlightActiveLine, keymap, lineNumbers } from '@codemirror/view';

export function createEditor(parent: HTMLElement, doc: string, label: string, run: () => void): EditorView {
  const runKey = () => {
    run();
    return true;
  };
  return new EditorView({
    parent,
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
        EditorView.contentAttributes.of({ 'aria-label': label }),
      ],
    }),
  });
}
