//! The worker that owns one session's kernel.
//!
//! Requests arrive on an unbounded queue in arrival order and run one at a
//! time. A request whose caller has gone away is skipped before it starts,
//! and interrupted if it is running. When the kernel dies or ignores an
//! interrupt, the worker boots a fresh one in the same working directory and
//! says so in the response. Teardown happens here and only here.

use crate::manager::{destroy_dir, Inner};
use crate::{write_files, SessionError};
use chrono::Utc;
use kiln_kernel::{End, ExecLimits, Kernel};
use kiln_protocol::{ExecuteData, ExecuteStatus, Output, ValidFile};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// One queued execute request.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) code: String,
    pub(crate) files: Vec<ValidFile>,
    pub(crate) limits: ExecLimits,
    pub(crate) reply: oneshot::Sender<Result<ExecuteData, SessionError>>,
}

pub(crate) async fn run(
    inner: Arc<Inner>,
    id: String,
    mut kernel: Kernel,
    network: crate::NetworkPolicy,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut stop: watch::Receiver<bool>,
) {
    let mut cpu_seen = 0.0;
    loop {
        let job = tokio::select! {
            biased;
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            job = jobs.recv() => match job { Some(j) => j, None => break },
        };
        let Job { code, files, limits, mut reply } = job;
        if reply.is_closed() {
            continue;
        }
        let work = kernel.dirs().work.clone();
        let owner = inner.file_owner();
        let written = tokio::task::spawn_blocking(move || write_files(&work, &files, owner)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = reply.send(Err(e.into()));
                continue;
            }
            Err(e) => {
                tracing::error!(session = %id, error = %e, "file writer panicked");
                let _ = reply.send(Err(SessionError::KernelUnavailable("internal error writing files".into())));
                continue;
            }
        }
        if let Err(e) = inner.store.record_execute(&id, Utc::now()).await {
            tracing::warn!(session = %id, error = %e, "could not count an execution");
        }

        let started = std::time::Instant::now();
        let exec = {
            let mut stopping = stop.clone();
            let reply = &mut reply;
            let cancelled = async move {
                tokio::select! {
                    _ = reply.closed() => {}
                    _ = async { let _ = stopping.wait_for(|s| *s).await; } => {}
                }
            };
            kernel.execute(&code, &limits, cancelled).await
        };
        if *stop.borrow() {
            let _ = reply.send(Err(ended(&inner, &id)));
            break;
        }
        let took = started.elapsed();
        record(&inner.metrics, &exec, took);
        // Usage: this kernel's CPU counter is cumulative (since its boot).
        let (cpu_now, peak_memory_bytes) = kernel.sandbox().usage();
        let usage = kiln_store::ExecutionUsage {
            seconds: took.as_secs_f64(),
            cpu_seconds: (cpu_now - cpu_seen).max(0.0),
            peak_memory_bytes,
        };
        cpu_seen = cpu_now;
        if let Err(e) = inner.store.record_usage(&id, usage).await {
            tracing::warn!(session = %id, error = %e, "could not record usage");
        }
        let mut outputs = exec.outputs;
        let mut status = if exec.raised { ExecuteStatus::Error } else { ExecuteStatus::Success };
        let secs = limits.timeout.as_secs_f64();
        let restart_reason = match exec.end {
            End::Completed | End::Cancelled { recovered: true } => None,
            End::TimedOut { recovered: true } => {
                status = ExecuteStatus::Error;
                outputs.push(Output::Error(format!(
                    "TimeoutError: the execution exceeded its time limit of {secs}s and was interrupted. \
                     The session is still usable and its state is kept."
                )));
                None
            }
            End::TimedOut { recovered: false } => Some(format!(
                "TimeoutError: the execution exceeded its time limit of {secs}s and did not stop when \
                 interrupted, so its kernel was killed"
            )),
            End::Cancelled { recovered: false } => Some(
                "the request was abandoned and the cell did not stop when interrupted, so its kernel was killed"
                    .to_string(),
            ),
            End::Oversized { bytes } => Some(format!(
                "OutputLimit: the code sent a single output of {bytes} bytes, more than this server accepts \
                 (its output limit is {} bytes), so its kernel was stopped",
                limits.max_output_bytes
            )),
            End::Died { out_of_memory: true, .. } => Some(format!(
                "MemoryError: the session ran out of memory (its limit is {} MiB), so its kernel was killed",
                inner.cfg.sandbox.as_ref().map_or(0, |s| s.limits.memory_bytes >> 20)
            )),
            End::Died { exit, .. } => Some(format!(
                "KernelDied: the Python kernel running this session exited ({}) while running this code \
                 (for example os._exit(), a crash in native code, or running out of memory)",
                exit.map_or_else(|| "unknown reason".to_string(), |e| e.to_string())
            )),
        };
        let mut ended = false;
        if let Some(reason) = restart_reason {
            status = ExecuteStatus::Error;
            tracing::info!(session = %id, %reason, "restarting kernel");
            let old_run = kernel.dirs().run.clone();
            kernel.kill().await;
            match inner.boot_in(kernel.dirs().with_new_run(), network).await {
                Ok(k) => {
                    kernel = k;
                    cpu_seen = 0.0;
                    destroy_dir(old_run).await;
                    outputs.push(Output::Error(format!(
                        "{reason}. A new kernel was started for the session: variables and imports were \
                         lost, files in the working directory are kept."
                    )));
                }
                Err(e) => {
                    outputs.push(Output::Error(format!(
                        "{reason}. A new kernel could not be started ({e}), so the session has ended."
                    )));
                    ended = true;
                }
            }
        }
        let _ = reply.send(Ok(ExecuteData { session_id: id.clone(), status, outputs }));
        if ended {
            break;
        }
    }
    teardown(&inner, &id, kernel, jobs).await;
}

async fn teardown(inner: &Inner, id: &str, kernel: Kernel, mut jobs: mpsc::UnboundedReceiver<Job>) {
    inner.forget(id);
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        let _ = job.reply.send(Err(ended(inner, id)));
    }
    kernel.kill().await;
    destroy_dir(kernel.dirs().root.clone()).await;
    if let Err(e) = inner.store.end_session(id, Utc::now()).await {
        tracing::warn!(session = %id, error = %e, "could not mark the session ended");
    }
    tracing::info!(session = %id, "session ended");
}

/// Why a session ended under a request: the server stopping, or expiry.
fn ended(inner: &Inner, id: &str) -> SessionError {
    if inner.readiness() == crate::Readiness::Stopping {
        SessionError::ShuttingDown
    } else {
        SessionError::Expired(id.to_string())
    }
}

/// Count one execution in the metrics.
fn record(m: &crate::Metrics, exec: &kiln_kernel::Execution, took: std::time::Duration) {
    m.execute_seconds.observe(took.as_secs_f64());
    let outcome = match exec.end {
        End::Completed if exec.raised => "error",
        End::Completed => "success",
        End::TimedOut { .. } => "timeout",
        End::Cancelled { .. } => "cancelled",
        End::Died { .. } => "died",
        End::Oversized { .. } => "oversized",
    };
    m.outcome(outcome);
    match exec.end {
        End::TimedOut { .. } => m.limit("time"),
        End::Died { out_of_memory, .. } => {
            m.kernel_deaths.inc();
            if out_of_memory {
                m.limit("memory");
            }
        }
        _ => {}
    }
    if exec.truncated || matches!(exec.end, End::Oversized { .. }) {
        m.limit("output");
    }
}
