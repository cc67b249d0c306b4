// The playground at `/`: a notebook of cells run in one kiln session.
//
// Cells run one at a time, in the order they were asked to (a queue here,
// as the server has one per session). A running cell's outputs appear as
// they stream in; Stop aborts its request, and the server interrupts a cell
// whose client went away.

import './style.css';
import type { EditorView } from '@codemirror/view';
import { execute, languages, usage, type Output } from './api';
import { createEditor } from './editor';
import { describe, sessionGone } from './errors';
import { setupFiles, refreshFiles } from './files';
import { setupKeyForm } from './key';
import { appendText, merge, renderOutput } from './outputs';
import { adopt, currentLanguage, end, ensure, forget, sessionId, setLanguage, setupSessionBar } from './session';
import { currentKey } from './storage';
import { $, h, setupAlert, showAlert } from './ui';

const EXAMPLE = `import numpy as np
import matplotlib.pyplot as plt

x = np.linspace(0, 2 * np.pi, 200)
plt.plot(x, np.sin(x))
plt.title("Hello from kiln")
plt.show()`;

let runs = 0;
/** The tail of the run queue: each run waits for the one before it. */
let queue: Promise<void> = Promise.resolve();
const cells: Cell[] = [];

class Cell {
  readonly el: HTMLElement;
  readonly editor: EditorView;
  private readonly outputs: HTMLElement;
  private readonly prompt: HTMLElement;
  private readonly status: HTMLElement;
  private readonly runButton: HTMLButtonElement;
  private readonly stopButton: HTMLButtonElement;
  private controller: AbortController | null = null;

  constructor(code: string) {
    const n = cells.length + 1;
    this.prompt = h('span', { class: 'prompt', 'aria-hidden': 'true' }, '[ ]');
    this.runButton = h('button', { type: 'button', class: 'run', title: 'Run (Shift+Enter)' }, 'Run');
    this.stopButton = h('button', { type: 'button', class: 'stop', hidden: true, title: 'Interrupt this cell' }, 'Stop');
    const remove = h('button', { type: 'button', class: 'remove', 'aria-label': 'Delete this cell' }, 'Delete');
    this.status = h('span', { class: 'cell-status', role: 'status' });
    const editorEl = h('div', { class: 'editor' });
    this.outputs = h('div', { class: 'outputs', 'aria-live': 'polite' });
    this.el = h(
      'article',
      { class: 'cell', 'aria-label': `Cell ${n}` },
      h('div', { class: 'cell-head' }, this.prompt, this.runButton, this.stopButton, remove, this.status),
      editorEl,
      this.outputs,
    );
    this.editor = createEditor(editorEl, code, `Code of cell ${n}`, () => void this.run());
    this.runButton.addEventListener('click', () => void this.run());
    this.stopButton.addEventListener('click', () => this.stop());
    remove.addEventListener('click', () => this.remove());
  }

  clear(): void {
    this.outputs.replaceChildren();
    this.prompt.textContent = '[ ]';
    this.status.textContent = '';
    delete this.el.dataset.state;
  }

  stop(): void {
    this.controller?.abort();
  }

  remove(): void {
    this.stop();
    this.editor.destroy();
    this.el.remove();
    cells.splice(cells.indexOf(this), 1);
    if (cells.length === 0) addCell('');
  }

  private setState(state: 'queued' | 'running' | 'done' | 'error' | 'stopped' | 'failed', text: string): void {
    this.el.dataset.state = state;
    this.status.textContent = text;
    const busy = state === 'queued' || state === 'running';
    this.runButton.hidden = busy;
    this.stopButton.hidden = !busy;
  }

  async run(): Promise<void> {
    if (this.controller) return;
    if (!currentKey()) {
      showAlert('Paste your API key above first (kiln printed one at its first start).');
      $('key-input').focus();
      return;
    }
    const controller = new AbortController();
    this.controller = controller;
    this.setState('queued', 'Waiting for the cell before it…');
    const before = queue;
    let release = () => {};
    queue = new Promise<void>((r) => (release = r));
    const focusWasHere = this.el.contains(document.activeElement);
    if (focusWasHere) this.stopButton.focus({ preventScroll: true });
    try {
      await before;
      if (controller.signal.aborted) {
        this.setState('stopped', 'Stopped before it ran');
        return;
      }
      this.setState('running', 'Running…');
      const started = performance.now();
      const session = await ensure();
      this.outputs.replaceChildren();
      let streamed: Output[] = [];
      let tail: { type: string; el: HTMLElement } | null = null;
      let clearAtNext = false;
      const clear = () => {
        this.outputs.replaceChildren();
        streamed = [];
        tail = null;
        clearAtNext = false;
      };
      const data = await execute(
        { code: this.editor.state.doc.toString(), language: currentLanguage(), session_id: session },
        {
          signal: controller.signal,
          onSession: adopt,
          onClear: (wait) => (wait ? (clearAtNext = true) : clear()),
          onOutput: (o) => {
            if (clearAtNext) clear();
            streamed.push(o);
            if (tail && (o.type === 'stdout' || o.type === 'stderr') && tail.type === o.type) {
              appendText(tail.el, o.data);
            } else {
              const el = renderOutput(o);
              this.outputs.append(el);
              tail = { type: o.type, el };
            }
          },
        },
      );
      // The final answer is the truth (chunks merged); redraw only if the
      // streamed view differs from it.
      if (JSON.stringify(merge(streamed)) !== JSON.stringify(data.outputs)) {
        this.outputs.replaceChildren(...data.outputs.map(renderOutput));
      }
      runs += 1;
      this.prompt.textContent = `[${runs}]`;
      const secs = ((performance.now() - started) / 1000).toFixed(2);
      if (data.status === 'success') this.setState('done', `Done in ${secs} s`);
      else this.setState('error', `Raised an error (${secs} s)`);
    } catch (e) {
      if (controller.signal.aborted) {
        this.setState('stopped', 'Stopped: the cell was interrupted');
        this.outputs.append(h('p', { class: 'note' }, 'Interrupted. The session keeps the state it had when the cell stopped.'));
      } else {
        if (sessionGone(e)) forget();
        this.setState('failed', 'Not run');
        this.outputs.append(h('p', { class: 'api-error', role: 'alert' }, describe(e)));
      }
    } finally {
      this.controller = null;
      release();
      if (focusWasHere && document.activeElement === document.body) this.editor.focus();
      void refreshFiles();
    }
  }
}

function addCell(code: string, after?: Cell): Cell {
  const cell = new Cell(code);
  const container = $('cells');
  if (after) {
    after.el.after(cell.el);
    cells.splice(cells.indexOf(after) + 1, 0, cell);
  } else {
    container.append(cell.el);
    cells.push(cell);
  }
  return cell;
}

async function setupLanguages(): Promise<void> {
  const select = $<HTMLSelectElement>('language');
  try {
    const l = await languages();
    select.replaceChildren(...l.languages.map((name) => h('option', { value: name }, name)));
    select.value = l.default;
    setLanguage(l.default);
  } catch (e) {
    select.replaceChildren(h('option', { value: 'python' }, 'python'));
    showAlert(`Could not ask the server which languages it runs. ${describe(e)}`);
  }
  select.addEventListener('change', async () => {
    // A session keeps the language it started with: a new language needs a
    // new session.
    setLanguage(select.value);
    if (sessionId() !== null) {
      try {
        await end();
      } catch (e) {
        showAlert(describe(e));
      }
    }
  });
}

setupAlert();
setupKeyForm(
  async () => (await usage()).key_id,
  () => {},
);
setupSessionBar(() => {
  runs = 0;
  cells.forEach((c) => {
    c.stop();
    c.clear();
  });
});
setupFiles();
void setupLanguages();
$('add-cell').addEventListener('click', () => {
  const cell = addCell('');
  cell.editor.focus();
});
addCell(EXAMPLE);
