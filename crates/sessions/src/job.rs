//! One execution of a session: what was asked ([`Job`]), and the pure
//! decision of what its caller sees ([`judge`]) from how the kernel ended
//! it.
//!
//! Running a job and presenting it are kept apart so that the presentation,
//! the part users depend on (a time limit is an `error` output that says
//! whether the session's state was kept, a dead kernel says that variables
//! were lost and files kept), is a plain function, unit-tested here for every
//! way an execution can end.

use crate::SessionError;
use kiln_kernel::{End, ExecLimits};
use kiln_protocol::{ExecEvent, ExecuteData, ExecuteStatus, Output, ValidFile};
use tokio::sync::{mpsc, oneshot};

/// Whose CPU comes first when the machine is busy: a person's (or an
/// agent's) execute waits on its answer; a batch item is one of many and
/// yields to it (its kernel's boot, when the pool had none, too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// An execute request: the sandbox's default CPU weight.
    #[default]
    Interactive,
    /// A batch item: the least CPU weight, so it runs on what interactive
    /// sessions leave.
    Batch,
}

impl Priority {
    /// The sandbox CPU weight of this priority.
    pub fn cpu_weight(self) -> kiln_sandbox::CpuWeight {
        match self {
            Priority::Interactive => kiln_sandbox::CpuWeight::DEFAULT,
            Priority::Batch => kiln_sandbox::CpuWeight::IDLE,
        }
    }
}

/// One queued execute request.
#[derive(Debug)]
pub(crate) struct Job {
    /// The cell.
    pub(crate) code: String,
    /// Files to write before it runs.
    pub(crate) files: Vec<ValidFile>,
    /// Its limits.
    pub(crate) limits: ExecLimits,
    /// Where the answer goes; closed when the caller has gone away.
    pub(crate) reply: oneshot::Sender<Result<Judged, SessionError>>,
    /// Where each output also goes as it happens, for a streamed execution.
    pub(crate) events: Option<mpsc::UnboundedSender<ExecEvent>>,
    /// Its own memory limit, bytes, when it has one.
    pub(crate) memory_limit: Option<u64>,
    /// Whose CPU comes first.
    pub(crate) priority: Priority,
    /// Count the OOM killer's kills while it runs ([`Judged::oom_kills`]).
    pub(crate) count_oom_kills: bool,
}

/// An execution's answer with how it ended (the batch API reports the
/// outcome as the item's status).
#[derive(Debug, Clone)]
pub struct Judged {
    /// What the caller of execute gets.
    pub data: ExecuteData,
    /// How it ended.
    pub outcome: Outcome,
    /// How many processes the OOM killer killed in the session while it
    /// ran, when that was asked for and could be counted.
    pub oom_kills: Option<u64>,
}

/// How an execution ended, as the user's code is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran to its end without raising.
    Success,
    /// It raised.
    Raised,
    /// It hit its time limit.
    TimedOut,
    /// Its caller went away and it was interrupted.
    Cancelled,
    /// It ran out of the session's memory.
    OutOfMemory,
    /// Its kernel exited under it (`os._exit`, a native crash).
    KernelDied,
    /// It sent one message larger than the server accepts.
    OutputTooLarge,
}

/// What the caller sees of an execution, beyond the kernel's own outputs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    /// How it ended.
    pub(crate) outcome: Outcome,
    /// `data.status`.
    pub(crate) status: ExecuteStatus,
    /// kiln's own message, shown after the kernel's outputs, when the kernel
    /// survived (a time limit whose interrupt worked).
    pub(crate) note: Option<Output>,
    /// Why the kernel had to be replaced, when it did.
    pub(crate) restart: Option<String>,
}

/// Decide what the caller of an execution that ended with `end` sees.
/// `raised`: whether the kernel reported an error; `memory_mib`: the
/// session's memory limit, for the message.
pub(crate) fn judge(end: End, raised: bool, limits: &ExecLimits, memory_mib: u64) -> Verdict {
    let secs = limits.timeout.as_secs_f64();
    let (outcome, note, restart) = match end {
        End::Completed if raised => (Outcome::Raised, None, None),
        End::Completed => (Outcome::Success, None, None),
        End::Cancelled { recovered: true } => (Outcome::Cancelled, None, None),
        End::TimedOut { recovered: true } => (
            Outcome::TimedOut,
            Some(Output::Error(format!(
                "TimeoutError: the execution exceeded its time limit of {secs}s and was interrupted. \
                 The session is still usable and its state is kept."
            ))),
            None,
        ),
        End::TimedOut { recovered: false } => (
            Outcome::TimedOut,
            None,
            Some(format!(
                "TimeoutError: the execution exceeded its time limit of {secs}s and did not stop when \
                 interrupted, so its kernel was killed"
            )),
        ),
        End::Cancelled { recovered: false } => (
            Outcome::Cancelled,
            None,
            Some(
                "the request was abandoned and the cell did not stop when interrupted, so its kernel was killed".into(),
            ),
        ),
        End::Oversized { bytes } => (
            Outcome::OutputTooLarge,
            None,
            Some(format!(
                "OutputLimit: the code sent a single output of {bytes} bytes, more than this server accepts \
                 (its output limit is {} bytes), so its kernel was stopped",
                limits.max_output_bytes
            )),
        ),
        End::Died { out_of_memory: true, .. } => (
            Outcome::OutOfMemory,
            None,
            Some(format!(
                "MemoryError: the session ran out of memory (its limit is {memory_mib} MiB), so its kernel was killed"
            )),
        ),
        End::Died { exit, .. } => (
            Outcome::KernelDied,
            None,
            Some(format!(
                "KernelDied: the Python kernel running this session exited ({}) while running this code \
                 (for example os._exit(), a crash in native code, or running out of memory)",
                exit.map_or_else(|| "unknown reason".to_string(), |e| e.to_string())
            )),
        ),
    };
    let status = match (outcome, &restart) {
        (Outcome::Success, _) => ExecuteStatus::Success,
        (Outcome::Cancelled, None) if !raised => ExecuteStatus::Success,
        _ => ExecuteStatus::Error,
    };
    Verdict { outcome, status, note, restart }
}

/// kiln's message after a kernel was replaced (`Ok`) or could not be
/// (`Err`, with why: the session has ended).
pub(crate) fn restarted(reason: &str, replaced: Result<(), String>) -> Output {
    Output::Error(match replaced {
        Ok(()) => format!(
            "{reason}. A new kernel was started for the session: variables and imports were lost, files in the \
             working directory are kept."
        ),
        Err(e) => format!("{reason}. A new kernel could not be started ({e}), so the session has ended."),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> ExecLimits {
        ExecLimits { timeout: Duration::from_secs(2), interrupt_grace: Duration::from_secs(3), max_output_bytes: 100 }
    }

    #[test]
    fn code_that_ran_or_raised_keeps_its_kernel() {
        let ok = judge(End::Completed, false, &limits(), 2048);
        assert_eq!(
            (ok.outcome, ok.status, ok.note, ok.restart),
            (Outcome::Success, ExecuteStatus::Success, None, None)
        );
        let raised = judge(End::Completed, true, &limits(), 2048);
        assert_eq!((raised.outcome, raised.status, raised.restart), (Outcome::Raised, ExecuteStatus::Error, None));
    }

    #[test]
    fn a_time_limit_says_whether_the_state_was_kept() {
        let kept = judge(End::TimedOut { recovered: true }, true, &limits(), 2048);
        assert_eq!(
            (kept.outcome, kept.status, kept.restart.is_none()),
            (Outcome::TimedOut, ExecuteStatus::Error, true)
        );
        assert!(matches!(&kept.note, Some(Output::Error(m)) if m.contains("2s") && m.contains("state is kept")));
        let lost = judge(End::TimedOut { recovered: false }, false, &limits(), 2048);
        assert_eq!((lost.status, lost.note), (ExecuteStatus::Error, None));
        assert!(lost.restart.is_some_and(|r| r.contains("did not stop when interrupted")));
    }

    #[test]
    fn a_dead_kernel_is_replaced_and_the_cause_is_named() {
        let oom = judge(End::Died { exit: None, out_of_memory: true }, false, &limits(), 512);
        assert_eq!(oom.outcome, Outcome::OutOfMemory);
        assert!(oom.restart.is_some_and(|r| r.starts_with("MemoryError") && r.contains("512 MiB")));
        let died = judge(End::Died { exit: None, out_of_memory: false }, false, &limits(), 512);
        assert_eq!((died.outcome, died.status), (Outcome::KernelDied, ExecuteStatus::Error));
        assert!(died.restart.is_some_and(|r| r.contains("unknown reason")));
        let flood = judge(End::Oversized { bytes: 999 }, false, &limits(), 512);
        assert_eq!(flood.outcome, Outcome::OutputTooLarge);
        assert!(flood.restart.is_some_and(|r| r.contains("999 bytes") && r.contains("100 bytes")));
    }

    #[test]
    fn an_abandoned_cell_is_no_error_of_its_own() {
        let v = judge(End::Cancelled { recovered: true }, false, &limits(), 2048);
        assert_eq!((v.outcome, v.status, v.restart), (Outcome::Cancelled, ExecuteStatus::Success, None));
        let killed = judge(End::Cancelled { recovered: false }, false, &limits(), 2048);
        assert!(killed.restart.is_some());
        assert_eq!(killed.status, ExecuteStatus::Error);
    }

    #[test]
    fn the_restart_message_says_what_was_kept() {
        let ok = restarted("KernelDied: x", Ok(()));
        assert!(matches!(ok, Output::Error(m) if m.contains("files in the working directory are kept")));
        let failed = restarted("KernelDied: x", Err("no kernel".into()));
        assert!(matches!(failed, Output::Error(m) if m.contains("(no kernel)") && m.contains("session has ended")));
    }
}
