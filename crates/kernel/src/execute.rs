//! Running one cell: send `execute_request`, collect iopub until `idle`, and
//! enforce the time limit and cancellation with an interrupt, then a kill.

use crate::collect::Collector;
use crate::Kernel;
use jupyter_protocol::{ExecuteRequest, ExecutionState, JupyterMessageContent};
use jupyter_zmq_client::JupyterMessage;
use kiln_protocol::{ExecEvent, Output};
use kiln_sandbox::Exit;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{sleep_until, Instant};

/// Limits of one execution.
#[derive(Debug, Clone, Copy)]
pub struct ExecLimits {
    /// Wall-clock time the cell may run before it is interrupted.
    pub timeout: Duration,
    /// How long an interrupted cell has to stop before the kernel is killed.
    pub interrupt_grace: Duration,
    /// Bytes of output kept; the rest is dropped with a marker.
    pub max_output_bytes: usize,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The kernel finished the cell (which may have raised: see
    /// [`Execution::raised`]).
    Completed,
    /// The time limit was hit. `recovered`: the interrupt stopped the cell
    /// and the kernel is usable; otherwise it was killed.
    TimedOut {
        /// Whether the kernel survived.
        recovered: bool,
    },
    /// The caller went away and the cell was interrupted.
    Cancelled {
        /// Whether the kernel survived.
        recovered: bool,
    },
    /// The kernel sent a single message larger than kiln reads (see
    /// [`crate::guard`]); it was cut off and killed.
    Oversized {
        /// The size its frame declared, bytes.
        bytes: u64,
    },
    /// The kernel process ended during the cell.
    Died {
        /// How it ended, if known.
        exit: Option<Exit>,
        /// Whether its sandbox's memory limit was hit (the OOM killer acted).
        out_of_memory: bool,
    },
}

/// The result of one cell.
#[derive(Debug, Clone)]
pub struct Execution {
    /// What the cell showed, in order.
    pub outputs: Vec<Output>,
    /// Whether an `error` output was produced.
    pub raised: bool,
    /// Whether output was cut at the output limit.
    pub truncated: bool,
    /// How it ended.
    pub end: End,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    Timeout,
    Cancel,
}

impl Kernel {
    /// Run `code` as one cell. `cancelled` resolves when the requester no
    /// longer wants the answer (its connection closed). With `events`, each
    /// output is also sent there the moment it arrives.
    pub async fn execute(
        &mut self,
        code: &str,
        limits: &ExecLimits,
        cancelled: impl Future<Output = ()>,
        events: Option<UnboundedSender<ExecEvent>>,
    ) -> Execution {
        let mut out = Collector::new(limits.max_output_bytes, events);
        let request: JupyterMessage = ExecuteRequest {
            code: code.to_string(),
            silent: false,
            store_history: true,
            user_expressions: None,
            allow_stdin: false,
            stop_on_error: true,
        }
        .into();
        let id = request.header.msg_id.clone();
        if let Err(e) = self.send_shell(request).await {
            tracing::warn!(error = %e, "could not send execute_request");
            return self.died(out, &id).await;
        }

        tokio::pin!(cancelled);
        let mut exit = self.sandbox.exit_watch();
        let mut oversized = self.guard.tripped();
        let deadline = Instant::now() + limits.timeout;
        // Set once the cell has been interrupted: why, and when to give up.
        let mut interrupted: Option<(Why, Instant)> = None;
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut reply = crate::fence::Reply::default();
        let end = loop {
            let kill_at = interrupted.map_or(far, |(_, t)| t);
            tokio::select! {
                biased;
                msg = self.iopub.recv() => {
                    let Some(msg) = msg else { return self.died(out, &id).await };
                    if msg.parent_header.as_ref().is_none_or(|h| h.msg_id != id) {
                        continue;
                    }
                    if let JupyterMessageContent::Status(s) = &msg.content {
                        if s.execution_state == ExecutionState::Idle {
                            break match interrupted {
                                None => End::Completed,
                                Some((Why::Timeout, _)) => End::TimedOut { recovered: true },
                                Some((Why::Cancel, _)) => End::Cancelled { recovered: true },
                            };
                        }
                        continue;
                    }
                    out.accept(&msg.content);
                }
                // Replies carry nothing iopub does not (but for Deno's
                // kernel: see `fence`); drain them.
                Some(r) = self.shell_replies.recv() => reply.take(&r, &id),
                _ = async { let _ = exit.wait_for(Option::is_some).await; } => return self.died(out, &id).await,
                Some(o) = async { oversized.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                    let bytes = o.declared;
                    self.kill().await;
                    break End::Oversized { bytes };
                }
                _ = sleep_until(deadline), if interrupted.is_none() => {
                    self.sandbox.interrupt();
                    interrupted = Some((Why::Timeout, Instant::now() + limits.interrupt_grace));
                }
                _ = &mut cancelled, if interrupted.is_none() => {
                    self.sandbox.interrupt();
                    interrupted = Some((Why::Cancel, Instant::now() + limits.interrupt_grace));
                }
                _ = sleep_until(kill_at), if interrupted.is_some() => {
                    // The cell ignored KeyboardInterrupt (a C loop, a
                    // handler that swallows it): the limit must still hold.
                    self.kill().await;
                    break match interrupted {
                        Some((Why::Cancel, _)) => End::Cancelled { recovered: false },
                        _ => End::TimedOut { recovered: false },
                    };
                }
            }
        };
        if matches!(end, End::Completed | End::TimedOut { recovered: true } | End::Cancelled { recovered: true }) {
            self.fence(&mut out, &id, &mut reply, end == End::Completed).await;
        }
        let (raised, truncated) = (out.saw_error, out.truncated());
        Execution { outputs: out.finish(), raised, truncated, end }
    }

    /// The kernel is gone: keep what already arrived, report how it ended.
    async fn died(&mut self, mut out: Collector, id: &str) -> Execution {
        // Before the kill: tearing the sandbox down removes the evidence.
        let out_of_memory = self.sandbox.hit_memory_limit();
        while let Ok(msg) = self.iopub.try_recv() {
            if msg.parent_header.as_ref().is_some_and(|h| h.msg_id == id) {
                out.accept(&msg.content);
            }
        }
        self.kill().await;
        let exit = self.sandbox.exit();
        let (raised, truncated) = (out.saw_error, out.truncated());
        Execution { outputs: out.finish(), raised, truncated, end: End::Died { exit, out_of_memory } }
    }
}
