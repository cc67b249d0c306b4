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

use crate::boot::Completion;
use crate::collect::Collector;
use crate::Kernel;
use jupyter_protocol::{ExecuteRequest, JupyterMessageContent, StreamContent};
use jupyter_zmq_client::JupyterMessage;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};

/// How long the marker may take: the queue holds only what the cell
/// already printed, so it arrives at once unless the kernel is stuck.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

impl Kernel {
    /// Collect the rest of request `id`'s outputs into `out`, when this
    /// kernel's outputs can trail its `idle` (a no-op otherwise).
    pub(crate) async fn fence(&mut self, out: &mut Collector, id: &str) {
        if self.completion != Completion::DenoFence {
            return;
        }
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
        loop {
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
                            return;
                        }
                        // The fence's own status and input echo.
                        JupyterMessageContent::Status(_) | JupyterMessageContent::ExecuteInput(_) => {}
                        content => out.accept(content),
                    }
                }
                Some(_) = self.shell_replies.recv() => {}
                _ = sleep_until(deadline) => {
                    tracing::warn!("the kernel's output fence did not come back; outputs may be incomplete");
                    return;
                }
            }
        }
    }
}
