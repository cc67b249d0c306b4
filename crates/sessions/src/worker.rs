//! The worker that owns one session's kernel.
//!
//! Requests arrive on an unbounded queue in arrival order and run one at a
//! time. A request whose caller has gone away is skipped before it starts,
//! and interrupted if it is running. When the kernel dies or ignores an
//! interrupt, the worker boots a fresh one in the same working directory and
//! says so in the response (see [`crate::job::judge`]). Teardown happens here
//! and only here.

use crate::boot::Kernels;
use crate::job::{judge, restarted, Job, Judged, Outcome};
use crate::registry::Registry;
use crate::{write_files, NetworkPolicy, Readiness, SessionError};
use chrono::Utc;
use kiln_kernel::Kernel;
use kiln_protocol::{ExecEvent, ExecuteData};
use kiln_store::Store;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Everything a session's worker uses; none of it knows of the worker.
#[derive(Debug, Clone)]
pub(crate) struct Worker {
    pub(crate) id: String,
    pub(crate) network: NetworkPolicy,
    /// The language of the session's kernel (a restarted kernel runs it too).
    pub(crate) language: kiln_protocol::Language,
    pub(crate) kernels: Arc<Kernels>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Arc<crate::Metrics>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) readiness: watch::Receiver<Readiness>,
    /// Set when the node's sessions end because it was lost (see
    /// `Manager::lose_all`).
    pub(crate) fenced: Arc<std::sync::atomic::AtomicBool>,
    /// The session's memory limit, bytes (0: none).
    pub(crate) memory_bytes: u64,
}

/// Whether the session goes on after a job.
enum After {
    Next,
    End,
}

impl Worker {
    /// Serve the session's jobs until it is stopped or its kernel is lost,
    /// then tear it down.
    pub(crate) async fn run(
        self,
        mut kernel: Kernel,
        mut jobs: mpsc::UnboundedReceiver<Job>,
        mut stop: watch::Receiver<bool>,
    ) {
        // The kernel's CPU counter is cumulative since its boot.
        let mut cpu_seen = 0.0;
        // The priority whose CPU weight the sandbox has (unknown at first:
        // a pooled kernel booted with the least).
        let mut weighed = None;
        loop {
            let job = tokio::select! {
                biased;
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                job = jobs.recv() => match job { Some(j) => j, None => break },
            };
            if let After::End = self.serve(&mut kernel, job, &mut stop, &mut cpu_seen, &mut weighed).await {
                break;
            }
        }
        self.teardown(kernel, jobs).await;
    }

    /// Run one job and answer it.
    async fn serve(
        &self,
        kernel: &mut Kernel,
        job: Job,
        stop: &mut watch::Receiver<bool>,
        cpu_seen: &mut f64,
        weighed: &mut Option<crate::Priority>,
    ) -> After {
        let Job { code, files, limits, mut reply, events, memory_limit, priority, count_oom_kills } = job;
        if reply.is_closed() {
            return After::Next;
        }
        let (work, owner) = (kernel.dirs().work.clone(), self.kernels.file_owner());
        match tokio::task::spawn_blocking(move || write_files(&work, &files, owner)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = reply.send(Err(e.into()));
                return After::Next;
            }
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "file writer panicked");
                let _ = reply.send(Err(SessionError::KernelUnavailable("internal error writing files".into())));
                return After::Next;
            }
        }
        if *weighed != Some(priority) {
            if let Err(e) = kernel.sandbox().set_cpu_weight(priority.cpu_weight()) {
                tracing::warn!(session = %self.id, error = %e, "could not set the session's CPU weight");
            }
            *weighed = Some(priority);
        }
        if let Err(e) = self.store.record_execute(&self.id, Utc::now()).await {
            tracing::warn!(session = %self.id, error = %e, "could not count an execution");
        }

        // A limit of the execution's own, below the session's: set for the
        // cell, and the session's put back after it (below).
        let own_limit = memory_limit.filter(|m| self.memory_bytes > 0 && *m < self.memory_bytes);
        let limit_bytes = own_limit.unwrap_or(self.memory_bytes);
        if let Some(m) = own_limit {
            if let Err(e) = kernel.sandbox().set_memory_limit(m) {
                tracing::info!(session = %self.id, error = %e, "could not lower the memory limit");
                let _ = kernel.sandbox().set_memory_limit(self.memory_bytes);
                let message = format!(
                    "MemoryError: the session already uses more memory than this execution's memory_limit of {} \
                     MiB, so the code was not run. The session is still usable and its state is kept.",
                    m >> 20
                );
                let data = ExecuteData {
                    session_id: self.id.clone(),
                    status: kiln_protocol::ExecuteStatus::Error,
                    outputs: vec![kiln_protocol::Output::Error(message)],
                };
                let _ = reply.send(Ok(Judged { data, outcome: Outcome::OutOfMemory, oom_kills: None }));
                return After::Next;
            }
        }
        let oom_before = if count_oom_kills { kernel.sandbox().oom_kills() } else { None };
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
            kernel.execute(&code, &limits, cancelled, events.clone()).await
        };
        if *stop.borrow() {
            let _ = reply.send(Err(self.ended()));
            return After::End;
        }
        let took = started.elapsed();
        // Before a restart below replaces the sandbox (a killed kernel's is
        // still there to read).
        let oom_kills = oom_before.and_then(|before| Some(kernel.sandbox().oom_kills()?.saturating_sub(before)));
        if own_limit.is_some() && kernel.is_alive() {
            if let Err(e) = kernel.sandbox().set_memory_limit(self.memory_bytes) {
                tracing::warn!(session = %self.id, error = %e, "could not restore the session's memory limit");
            }
        }
        let verdict = judge(exec.end, exec.raised, &limits, limit_bytes >> 20);
        record(&self.metrics, verdict.outcome, &exec, took);
        let (cpu_now, peak_memory_bytes) = kernel.sandbox().usage();
        let usage = kiln_store::ExecutionUsage {
            seconds: took.as_secs_f64(),
            cpu_seconds: (cpu_now - *cpu_seen).max(0.0),
            peak_memory_bytes,
        };
        *cpu_seen = cpu_now;
        // Recorded before the answer: a node killed after answering has
        // lost nothing of what it reported.
        if let Err(e) = self.store.record_usage(&self.id, usage).await {
            tracing::warn!(session = %self.id, error = %e, "could not record usage");
        }
        let mut outputs = exec.outputs;
        let first_own = outputs.len();
        outputs.extend(verdict.note);
        let mut after = After::Next;
        if let Some(reason) = verdict.restart {
            tracing::info!(session = %self.id, %reason, "restarting kernel");
            let old_run = kernel.dirs().run.clone();
            kernel.kill().await;
            let new_run = kernel.dirs().with_new_run();
            let replaced = match self.kernels.boot_in(new_run, self.network, self.language, priority).await {
                Ok(k) => {
                    *kernel = k;
                    *cpu_seen = 0.0;
                    crate::boot::destroy_dir(old_run).await;
                    Ok(())
                }
                Err(e) => {
                    after = After::End;
                    Err(e.to_string())
                }
            };
            outputs.push(restarted(&reason, replaced));
        }
        // kiln's own messages reach a streaming caller too.
        if let Some(events) = &events {
            for o in &outputs[first_own..] {
                let _ = events.send(ExecEvent::Output(o.clone()));
            }
        }
        let data = ExecuteData { session_id: self.id.clone(), status: verdict.status, outputs };
        let _ = reply.send(Ok(Judged { data, outcome: verdict.outcome, oom_kills }));
        after
    }

    async fn teardown(&self, kernel: Kernel, mut jobs: mpsc::UnboundedReceiver<Job>) {
        self.registry.remove(&self.id);
        jobs.close();
        while let Ok(job) = jobs.try_recv() {
            let _ = job.reply.send(Err(self.ended()));
        }
        self.kernels.destroy(kernel).await;
        // A lost node's rows are marked lost together (and until that
        // succeeds, an open row of a lost node reads as lost too); ended
        // alone it would read as expired.
        if !self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.store.end_session(&self.id, Utc::now()).await {
                tracing::warn!(session = %self.id, error = %e, "could not mark the session ended");
            }
        }
        tracing::info!(session = %self.id, "session ended");
    }

    /// Why a session ended under a request.
    fn ended(&self) -> SessionError {
        ended_because(
            *self.readiness.borrow() == Readiness::Stopping,
            self.fenced.load(std::sync::atomic::Ordering::SeqCst),
            &self.id,
            self.store.node_id(),
        )
    }
}

/// Why session `id` ended under a request: the server stopping, its node
/// lost to the cluster (`fenced`), or else its time or its caller.
pub(crate) fn ended_because(stopping: bool, fenced: bool, id: &str, node: &str) -> SessionError {
    if stopping {
        SessionError::ShuttingDown
    } else if fenced {
        SessionError::Lost { id: id.to_string(), node: node.to_string() }
    } else {
        SessionError::Expired(id.to_string())
    }
}

/// Count one execution in the metrics.
fn record(m: &crate::Metrics, outcome: Outcome, exec: &kiln_kernel::Execution, took: std::time::Duration) {
    m.execute_seconds.observe(took.as_secs_f64());
    m.outcome(match outcome {
        Outcome::Success => "success",
        Outcome::Raised => "error",
        Outcome::TimedOut => "timeout",
        Outcome::Cancelled => "cancelled",
        Outcome::OutOfMemory | Outcome::KernelDied => "died",
        Outcome::OutputTooLarge => "oversized",
    });
    match outcome {
        Outcome::TimedOut => m.limit("time"),
        Outcome::OutOfMemory => {
            m.kernel_deaths.inc();
            m.limit("memory");
        }
        Outcome::KernelDied => {
            m.kernel_deaths.inc();
        }
        _ => {}
    }
    if exec.truncated || outcome == Outcome::OutputTooLarge {
        m.limit("output");
    }
}
