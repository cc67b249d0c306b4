//! The output fence of kernels whose outputs can trail their `idle` status
//! ([`Completion::DenoFence`]).
//!
//! Deno's kernel evaluates cells on one thread and publishes what they print
//! (and their displays and results) from a queue drained by another task,
//! which races the `idle` status of the request; the drained messages carry
//! whichever request is current when they are sent. So after `idle`, kiln
//! runs a silent cell that prints a fresh marker: it travels the same queue
//! behind everything the cell produced, so what arrives before it, under the
//! cell's id or the fence's, is the cell's, in order, and the marker ends it.
//!
//! Deno's kernel also reports some failures (a syntax error) only in its
//! `execute_reply`, with no `error` on iopub: the fence waits for the
//! cell's reply too, and such an error becomes the cell's `error` output,
//! so the caller sees that the cell failed.

use crate::boot::Completion;
use crate::collect::Collector;
use crate::Kernel;
use jupyter_protocol::{ExecuteRequest, JupyterMessageContent, ReplyStatus, StreamContent};
use jupyter_zmq_client::JupyterMessage;
use kiln_protocol::Output;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};

/// How long the marker may take: the queue holds only what the cell
/// already printed, so it arrives at once unless the kernel is stuck.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the kernel's `execute_reply` to request `id` said, if `msg` is it.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    /// The reply arrived.
    pub(crate) seen: bool,
    /// It reported an error: `ename: evalue`.
    pub(crate) error: Option<String>,
}

impl Reply {
    /// Take in a shell message, if it is the reply to `id`.
    pub(crate) fn take(&mut self, msg: &JupyterMessage, id: &str) {
        if msg.parent_header.as_ref().is_none_or(|h| h.msg_id != id) {
            return;
        }
        if let JupyterMessageContent::ExecuteReply(r) = &msg.content {
            self.seen = true;
            if r.status == ReplyStatus::Error {
                self.error = Some(match &r.error {
                    Some(e) => format!("{}: {}", e.ename, e.evalue),
                    None => "Error: the kernel reported a failure without details".to_string(),
                });
            }
        }
    }
}

impl Kernel {
    /// Collect the rest of request `id`'s outputs into `out`, when this
    /// kernel's outputs can trail its `idle` (a no-op otherwise); with
    /// `completed` (the cell was not interrupted), an error its reply
    /// reported and iopub did not becomes an `error` output.
    pub(crate) async fn fence(&mut self, out: &mut Collector, id: &str, reply: &mut Reply, completed: bool) {
        if self.completion != Completion::DenoFence {
            return;
        }
        self.fence_outputs(out, id, reply).await;
        if let (true, false, Some(e)) = (completed, out.saw_error, reply.error.take()) {
            out.push(Output::Error(e));
        }
    }

    async fn fence_outputs(&mut self, out: &mut Collector, id: &str, reply: &mut Reply) {
        let marker = format!("kiln-fence-{}", uuid::Uuid::new_v4().simple());
        let request: JupyterMessage = ExecuteRequest {
            code: format!("console.log({marker:?});"),
            silent: true,
            store_history: false,
            user_expressions: None,
            allow_stdin: false,
            stop_on_error: false,
        }
        .into();
        let fence_id = request.header.msg_id.clone();
        if self.send_shell(request).await.is_err() {
            return;
        }
        let deadline = Instant::now() + FENCE_TIMEOUT;
        let mut marked = false;
        while !(marked && reply.seen) {
            tokio::select! {
                msg = self.iopub.recv() => {
                    let Some(msg) = msg else { return };
                    let parent = msg.parent_header.as_ref().map(|h| h.msg_id.as_str());
                    if parent != Some(id) && parent != Some(fence_id.as_str()) {
                        continue;
                    }
                    match &msg.content {
                        JupyterMessageContent::StreamContent(s) if s.text.contains(&marker) => {
                            let before = s.text.split(&marker).next().unwrap_or_default();
                            if !before.is_empty() {
                                let rest = StreamContent { name: s.name.clone(), text: before.to_string() };
                                out.accept(&JupyterMessageContent::StreamContent(rest));
                            }
                            marked = true;
                        }
                        // Past the marker: nothing is the cell's any more.
                        _ if marked => {}
                        // The fence's own status and input echo.
                        JupyterMessageContent::Status(_) | JupyterMessageContent::ExecuteInput(_) => {}
                        content => out.accept(content),
                    }
                }
                Some(r) = self.shell_replies.recv() => reply.take(&r, id),
                _ = sleep_until(deadline) => {
                    tracing::warn!("the kernel's output fence did not come back; outputs may be incomplete");
                    return;
                }
            }
        }
    }
}
