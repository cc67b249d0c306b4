//! Turning iopub messages into the outputs a notebook would show.
//!
//! Consecutive chunks of the same stream are merged (a notebook shows one
//! block for a loop of `print`s), `clear_output` clears what came before
//! (with `wait=True`, at the next output), tracebacks become plain text
//! without ANSI colours, and the total size is capped: past the limit the
//! rest of the execution's output is dropped and one marker says so, so an
//! endless `print` loop cannot grow the server's memory.

use jupyter_protocol::{JupyterMessageContent, Stdio};
use kiln_protocol::{ExecEvent, Output};
use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedSender;

/// Collects one execution's outputs.
#[derive(Debug)]
pub(crate) struct Collector {
    outputs: Vec<Output>,
    bytes: usize,
    limit: usize,
    truncated: bool,
    clear_pending: bool,
    pub(crate) saw_error: bool,
    /// Where each output is also sent the moment it is taken in (a
    /// streamed execution). Bounded by the output limit like the outputs.
    events: Option<UnboundedSender<ExecEvent>>,
}

impl Collector {
    pub(crate) fn new(limit: usize, events: Option<UnboundedSender<ExecEvent>>) -> Self {
        Collector {
            outputs: Vec::new(),
            bytes: 0,
            limit,
            truncated: false,
            clear_pending: false,
            saw_error: false,
            events,
        }
    }

    fn emit(&self, event: ExecEvent) {
        if let Some(tx) = &self.events {
            // A receiver gone is a client gone: the execution is being
            // cancelled through its own path.
            let _ = tx.send(event);
        }
    }

    /// Take in one iopub message already known to belong to this execution.
    pub(crate) fn accept(&mut self, content: &JupyterMessageContent) {
        let out = match content {
            JupyterMessageContent::StreamContent(s) => match s.name {
                Stdio::Stdout => Output::Stdout(s.text.clone()),
                Stdio::Stderr => Output::Stderr(s.text.clone()),
            },
            JupyterMessageContent::DisplayData(d) => Output::DisplayData(bundle(&d.data)),
            JupyterMessageContent::ExecuteResult(r) => Output::ExecuteResult(bundle(&r.data)),
            JupyterMessageContent::ErrorOutput(e) => {
                self.saw_error = true;
                Output::Error(traceback_text(&e.ename, &e.evalue, &e.traceback))
            }
            JupyterMessageContent::ClearOutput(c) => {
                if c.wait {
                    self.clear_pending = true;
                } else {
                    self.clear();
                }
                self.emit(ExecEvent::Clear { wait: c.wait });
                return;
            }
            _ => return,
        };
        self.push(out);
    }

    /// Add an output of kiln's own (time limit, kernel death).
    pub(crate) fn push(&mut self, out: Output) {
        if self.clear_pending {
            self.clear();
        }
        if matches!(out, Output::Error(_)) {
            self.saw_error = true;
        }
        let size = out.size_hint();
        if self.bytes + size > self.limit {
            // Errors of kiln's own always get through; user output stops.
            if !self.truncated {
                self.truncated = true;
                let marker = Output::Stderr(format!(
                    "\n[kiln] output limit of {} bytes reached: the rest of this execution's output was discarded\n",
                    self.limit
                ));
                self.emit(ExecEvent::Output(marker.clone()));
                self.outputs.push(marker);
            }
            if !matches!(out, Output::Error(_)) {
                return;
            }
        }
        self.bytes += size;
        self.emit(ExecEvent::Output(out.clone()));
        match (self.outputs.last_mut(), out) {
            (Some(Output::Stdout(prev)), Output::Stdout(s)) if !self.truncated => prev.push_str(&s),
            (Some(Output::Stderr(prev)), Output::Stderr(s)) if !self.truncated => prev.push_str(&s),
            (_, out) => self.outputs.push(out),
        }
    }

    fn clear(&mut self) {
        self.outputs.clear();
        self.bytes = 0;
        self.clear_pending = false;
        self.saw_error = false;
        // What is cleared no longer counts: output may fill the limit anew
        // (the kernel counts the same way), and a second overflow gets its
        // own marker.
        self.truncated = false;
    }

    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }

    pub(crate) fn finish(self) -> Vec<Output> {
        self.outputs
    }
}

/// The outputs a notebook would show for `messages` (iopub message types
/// and contents, in the order they were sent), collected as one
/// execution's under the output limit `limit`; and whether one was an
/// error. For messages a kernel recorded instead of sending (a batch item's
/// cell in a lane, `kiln_kernel.recorder`); a message of a type or shape
/// that shows nothing is skipped, as on iopub.
pub fn outputs_of(messages: impl IntoIterator<Item = (String, Value)>, limit: usize) -> (Vec<Output>, bool) {
    let mut collector = Collector::new(limit, None);
    for (msg_type, content) in messages {
        if let Ok(content) = JupyterMessageContent::from_type_and_content(&msg_type, content) {
            collector.accept(&content);
        }
    }
    let raised = collector.saw_error;
    (collector.finish(), raised)
}

fn bundle(media: &jupyter_protocol::Media) -> Map<String, Value> {
    match serde_json::to_value(media) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn traceback_text(ename: &str, evalue: &str, traceback: &[String]) -> String {
    if traceback.is_empty() {
        return format!("{ename}: {evalue}");
    }
    strip_ansi(&traceback.join("\n"))
}

/// Remove ANSI escape sequences (IPython colours its tracebacks).
pub fn strip_ansi(s: &str) -> String {
    String::from_utf8_lossy(&strip_ansi_escapes::strip(s)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jupyter_protocol::{ClearOutput, ErrorOutput, StreamContent};

    fn stdout(t: &str) -> JupyterMessageContent {
        JupyterMessageContent::StreamContent(StreamContent::stdout(t))
    }

    #[test]
    fn recorded_messages_become_the_outputs_iopub_would_have_given() {
        let messages = vec![
            ("stream".to_string(), serde_json::json!({"name": "stdout", "text": "a"})),
            ("stream".to_string(), serde_json::json!({"name": "stdout", "text": "b\n"})),
            ("comm_open".to_string(), serde_json::json!({"comm_id": "x", "target_name": "t", "data": {}})),
            (
                "execute_result".to_string(),
                serde_json::json!({"data": {"text/plain": "3"}, "metadata": {}, "execution_count": 1}),
            ),
            ("stream".to_string(), serde_json::json!({"nonsense": true})),
            (
                "error".to_string(),
                serde_json::json!({"ename": "ValueError", "evalue": "no", "traceback": ["\u{1b}[31mValueError\u{1b}[0m: no"]}),
            ),
        ];
        let (outputs, raised) = outputs_of(messages, 1 << 20);
        assert!(raised);
        assert_eq!(outputs.len(), 3, "{outputs:?}");
        assert!(matches!(&outputs[0], Output::Stdout(s) if s == "ab\n"));
        assert!(matches!(&outputs[1], Output::ExecuteResult(d) if d["text/plain"] == "3"));
        assert!(matches!(&outputs[2], Output::Error(e) if e.contains("ValueError: no") && !e.contains('\u{1b}')));
        let (capped, _) =
            outputs_of([("stream".to_string(), serde_json::json!({"name": "stderr", "text": "x".repeat(50)}))], 10);
        assert!(matches!(&capped[..], [Output::Stderr(m)] if m.contains("output limit of 10 bytes")), "{capped:?}");
    }

    #[test]
    fn consecutive_chunks_of_a_stream_merge() {
        let mut c = Collector::new(1 << 20, None);
        c.accept(&stdout("a\n"));
        c.accept(&stdout("b\n"));
        c.push(Output::Stderr("w\n".into()));
        c.accept(&stdout("c\n"));
        assert_eq!(
            c.finish(),
            vec![Output::Stdout("a\nb\n".into()), Output::Stderr("w\n".into()), Output::Stdout("c\n".into())]
        );
    }

    #[test]
    fn tracebacks_lose_their_colours() {
        let mut c = Collector::new(1 << 20, None);
        c.accept(&JupyterMessageContent::ErrorOutput(ErrorOutput {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec![
                "\u{1b}[0;31m---------\u{1b}[0m".into(),
                "\u{1b}[0;31mZeroDivisionError\u{1b}[0m: division by zero".into(),
            ],
        }));
        assert!(c.saw_error);
        assert_eq!(c.finish(), vec![Output::Error("---------\nZeroDivisionError: division by zero".into())]);
    }

    #[test]
    fn clear_output_with_wait_clears_at_the_next_output() {
        let mut c = Collector::new(1 << 20, None);
        c.accept(&stdout("frame 1\n"));
        c.accept(&JupyterMessageContent::ClearOutput(ClearOutput { wait: true }));
        c.accept(&stdout("frame 2\n"));
        assert_eq!(c.finish(), vec![Output::Stdout("frame 2\n".into())]);
    }

    #[test]
    fn output_after_a_clear_counts_afresh_and_overflows_with_its_own_marker() {
        let mut c = Collector::new(10, None);
        for _ in 0..3 {
            c.accept(&stdout("123456"));
        }
        c.accept(&JupyterMessageContent::ClearOutput(ClearOutput { wait: false }));
        for _ in 0..3 {
            c.accept(&stdout("abcdef"));
        }
        let outs = c.finish();
        assert_eq!(outs[0], Output::Stdout("abcdef".into()));
        assert!(matches!(&outs[1], Output::Stderr(m) if m.contains("output limit")));
        assert_eq!(outs.len(), 2);
    }

    #[test]
    fn a_streamed_execution_sends_each_output_as_it_is_taken_in() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut c = Collector::new(11, Some(tx));
        c.accept(&stdout("a\n"));
        c.accept(&JupyterMessageContent::ClearOutput(ClearOutput { wait: true }));
        c.accept(&stdout("b\n"));
        c.accept(&stdout("0123456789"));
        c.push(Output::Error("TimeoutError".into()));
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        assert_eq!(events[0], ExecEvent::Output(Output::Stdout("a\n".into())));
        assert_eq!(events[1], ExecEvent::Clear { wait: true });
        assert_eq!(events[2], ExecEvent::Output(Output::Stdout("b\n".into())));
        assert!(matches!(&events[3], ExecEvent::Output(Output::Stderr(m)) if m.contains("output limit")));
        assert_eq!(events[4], ExecEvent::Output(Output::Error("TimeoutError".into())));
        assert_eq!(events.len(), 5, "nothing past the limit is streamed");
        // The final outputs are what the events add up to.
        assert_eq!(c.finish().len(), 3);
    }

    #[test]
    fn output_past_the_limit_is_dropped_with_one_marker() {
        let mut c = Collector::new(10, None);
        for _ in 0..100 {
            c.accept(&stdout("123456"));
        }
        c.push(Output::Error("TimeoutError".into()));
        let outs = c.finish();
        assert_eq!(outs[0], Output::Stdout("123456".into()));
        assert!(matches!(&outs[1], Output::Stderr(m) if m.contains("output limit")));
        assert_eq!(outs[2], Output::Error("TimeoutError".into()));
        assert_eq!(outs.len(), 3);
    }
}
