//! Scoring a batch item's tests: the runner's report of each test (the
//! lines `kiln_kernel.judge` prints in the runner's cell), and the verdict
//! kiln draws from it, here in the server and not in the candidate's
//! process: a program run passes on exit status 0 and the expected stdout,
//! an assertion when it completed.

use crate::{Judged, Outcome};
use kiln_protocol::{same_stdout, ItemStatus, Output, TestResult};

/// Bytes of stdout and of stderr kept per test in a result.
const TEST_TEXT_BYTES: usize = 64 << 10;
/// The runner's report line in the cell's stdout.
const MARKER: &str = "KILN_JUDGE ";

/// What the runner said about one test (or why it said nothing).
pub(crate) enum Report {
    Ran(RunnerLine),
    Failed { status: ItemStatus, why: String },
}

/// The runner's line, as `kiln_kernel.judge` prints it (its texts in
/// base64, so that a line's size is bounded whatever bytes a test printed).
#[derive(serde::Deserialize)]
#[serde(from = "WireLine")]
pub(crate) struct RunnerLine {
    exit: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    completed: bool,
    stdout: String,
    stdout_truncated: bool,
    stderr: String,
    ms: f64,
    /// The OOM killer's kills in the session during the runner's cell (not
    /// on the wire: the server counts them, [`Judged::oom_kills`]).
    oom_kills: Option<u64>,
}

#[derive(serde::Deserialize)]
struct WireLine {
    exit: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    completed: bool,
    stdout_b64: String,
    stdout_truncated: bool,
    stderr_b64: String,
    ms: f64,
}

impl From<WireLine> for RunnerLine {
    fn from(w: WireLine) -> Self {
        RunnerLine {
            exit: w.exit,
            signal: w.signal,
            timed_out: w.timed_out,
            completed: w.completed,
            stdout: text_of(&w.stdout_b64),
            stdout_truncated: w.stdout_truncated,
            stderr: text_of(&w.stderr_b64),
            ms: w.ms,
            oom_kills: None,
        }
    }
}

/// A test's output as text: its bytes decoded from base64, invalid UTF-8
/// replaced (as a terminal would show it).
fn text_of(b64: &str) -> String {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::from("[kiln] the runner's report of this output could not be read\n"),
    }
}

impl Report {
    /// The reports of the runner's cell for up to `n` tests: one per line
    /// it printed, and, when it stopped short (its kernel died, it was
    /// stopped), the failure of the test it stopped at.
    pub(crate) fn read(j: Judged, n: usize) -> (Vec<Report>, Option<Report>) {
        let ran = Report::all_in(&j, &stdout_of(&j), n);
        if ran.len() == n {
            return (ran, None);
        }
        let status = match status_of(j.outcome) {
            ItemStatus::Success => ItemStatus::Error,
            s => s,
        };
        let why = format!("the test did not report an end: {}", errors_of(&j));
        (ran, Some(Report::Failed { status, why }))
    }

    /// The first `n` report lines of the output `text` of runner cell `j`.
    fn all_in(j: &Judged, text: &str, n: usize) -> Vec<Report> {
        text.lines()
            .filter_map(|l| l.strip_prefix(MARKER))
            .filter_map(|l| serde_json::from_str::<RunnerLine>(l).ok())
            .map(|line| Report::Ran(RunnerLine { oom_kills: j.oom_kills, ..line }))
            .take(n)
            .collect()
    }

    pub(crate) fn all_failed(n: usize, status: ItemStatus, why: &str) -> Vec<Report> {
        (0..n).map(|_| Report::Failed { status, why: why.to_string() }).collect()
    }

    /// Score the report; `expected`: the program's expected stdout.
    pub(crate) fn score(self, expected: Option<&String>) -> TestResult {
        let r = match self {
            Report::Failed { status, why } => {
                return TestResult {
                    passed: false,
                    status,
                    stdout: String::new(),
                    stderr: cap(why, TEST_TEXT_BYTES),
                    duration_ms: 0.0,
                }
            }
            Report::Ran(r) => r,
        };
        let mut stderr = r.stderr;
        let status = if r.timed_out {
            ItemStatus::Timeout
        } else if r.signal == Some(9) && r.oom_kills == Some(0) {
            stderr.push_str(&format!("\n[kiln] the test's process {NOT_THE_MEMORY_LIMIT}\n"));
            ItemStatus::Error
        } else if r.signal == Some(9) {
            stderr.push_str(&format!("\n[kiln] the test's process {THE_MEMORY_LIMIT}\n"));
            ItemStatus::MemoryExceeded
        } else if let Some(sig) = r.signal {
            stderr.push_str(&format!("\n[kiln] the test's process was killed by signal {sig}\n"));
            ItemStatus::Error
        } else if r.exit == Some(0) {
            ItemStatus::Success
        } else {
            ItemStatus::Error
        };
        let passed = match expected {
            Some(expected) => status == ItemStatus::Success && !r.stdout_truncated && same_stdout(&r.stdout, expected),
            None => {
                if status == ItemStatus::Success && !r.completed {
                    stderr.push_str("\n[kiln] the process exited before the test completed\n");
                }
                status == ItemStatus::Success && r.completed
            }
        };
        let status = if expected.is_none() && status == ItemStatus::Success && !r.completed {
            ItemStatus::Error
        } else {
            status
        };
        if r.stdout_truncated {
            stderr.push_str("\n[kiln] the program printed more than 1 MiB; its output cannot match\n");
        }
        TestResult {
            passed,
            status,
            stdout: cap(r.stdout, TEST_TEXT_BYTES),
            stderr: cap(stderr, TEST_TEXT_BYTES),
            duration_ms: r.ms,
        }
    }
}

/// Of a test's or an item's process that died of SIGKILL while the
/// session's OOM killer acted, or when that could not be counted.
const THE_MEMORY_LIMIT: &str = "was killed (SIGKILL), most likely by its memory limit";

/// Of a test's or an item's process that died of SIGKILL while the
/// session's OOM killer killed nothing: the candidate's own doing
/// (`os.kill(os.getpid(), 9)`).
const NOT_THE_MEMORY_LIMIT: &str =
    "was killed by signal 9 (SIGKILL), not by its memory limit: the OOM killer did not act";

/// The line of the runner's cell that records an item's cell in a lane
/// (`judge.item`): its iopub messages, JSON in base64.
const CELL_MARKER: &str = "KILN_CELL ";
/// The line that says how the process that ran that cell ended (a report
/// like a test's).
const ITEM_MARKER: &str = "KILN_ITEM ";

/// An item's cell as the runner recorded it (`kiln_kernel.recorder`).
#[derive(serde::Deserialize)]
struct CellRecord {
    messages: Vec<(String, serde_json::Value)>,
    timed_out: bool,
    /// Messages past what the runner's output could carry were left out.
    #[serde(default)]
    cut: bool,
}

/// What the runner's cell said of an item run in a lane: its own cell's
/// status and outputs, and one report per assertion.
pub(crate) struct ItemReport {
    pub(crate) status: ItemStatus,
    pub(crate) outputs: Vec<Output>,
    pub(crate) reports: Vec<Report>,
    /// Whether everything was reported (the lane may serve on).
    pub(crate) complete: bool,
}

impl ItemReport {
    /// Read the runner's cell `j` for an item with `n` assertions, whose
    /// cell had `timeout` and could show `output_limit` bytes.
    pub(crate) fn read(j: &Judged, n: usize, output_limit: usize, timeout: std::time::Duration) -> ItemReport {
        let text = stdout_of(j);
        let cell = text.lines().find_map(|l| {
            use base64::Engine as _;
            let b64 = l.strip_prefix(CELL_MARKER)?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim_end()).ok()?;
            serde_json::from_slice::<CellRecord>(&bytes).ok()
        });
        let ended = text.lines().find_map(|l| serde_json::from_str::<RunnerLine>(l.strip_prefix(ITEM_MARKER)?).ok());
        let mut reports = Report::all_in(j, &text, n);
        let complete = cell.is_some() && reports.len() == n && ended.as_ref().is_some_and(|e| e.completed);
        // Why what is missing is missing: how the item's process ended.
        let errors = errors_of(j);
        let (missing, why) = match &ended {
            Some(e) if e.timed_out => (
                ItemStatus::Timeout,
                "[kiln] the item's code and tests together exceeded their time limits, and its process was killed"
                    .to_string(),
            ),
            Some(e) if e.signal == Some(9) && j.oom_kills == Some(0) => {
                (ItemStatus::Error, format!("[kiln] the item's process {NOT_THE_MEMORY_LIMIT}"))
            }
            Some(e) if e.signal == Some(9) => {
                (ItemStatus::MemoryExceeded, format!("[kiln] the item's process {THE_MEMORY_LIMIT}"))
            }
            Some(e) if !e.completed => (
                ItemStatus::Error,
                format!(
                    "[kiln] the item's code ended its process (exit status {:?}, signal {:?}) before its tests ran{}",
                    e.exit,
                    e.signal,
                    if e.stderr.is_empty() { String::new() } else { format!(": {}", e.stderr.trim_end()) }
                ),
            ),
            _ => (ItemStatus::Error, format!("the tests did not run: {errors}")),
        };
        let (status, outputs) = match cell {
            Some(record) => {
                let (mut outputs, raised) = kiln_kernel::outputs_of(record.messages, output_limit);
                if record.cut {
                    outputs.push(Output::Stderr(
                        "\n[kiln] output limit reached: the rest of this execution's output was discarded\n".into(),
                    ));
                }
                let status = if record.timed_out {
                    outputs.push(Output::Error(format!(
                        "TimeoutError: the execution exceeded its time limit of {}s and was interrupted.",
                        timeout.as_secs_f64()
                    )));
                    ItemStatus::Timeout
                } else if raised {
                    ItemStatus::Error
                } else {
                    ItemStatus::Success
                };
                (status, outputs)
            }
            None => (missing, vec![Output::Error(why.clone())]),
        };
        if reports.len() < n {
            reports.extend(Report::all_failed(n - reports.len(), missing, &why));
        }
        ItemReport { status, outputs, reports, complete }
    }
}

/// The text of a cell's stdout outputs.
fn stdout_of(j: &Judged) -> String {
    j.data
        .outputs
        .iter()
        .filter_map(|o| match o {
            Output::Stdout(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

/// The text of a cell's error outputs.
fn errors_of(j: &Judged) -> String {
    let errors: Vec<&str> = j
        .data
        .outputs
        .iter()
        .filter_map(|o| match o {
            Output::Error(e) => Some(e.as_str()),
            _ => None,
        })
        .collect();
    errors.join("\n")
}

/// The item status of an execution's outcome.
pub(crate) fn status_of(outcome: Outcome) -> ItemStatus {
    match outcome {
        Outcome::Success | Outcome::Cancelled => ItemStatus::Success,
        Outcome::Raised | Outcome::KernelDied | Outcome::OutputTooLarge => ItemStatus::Error,
        Outcome::TimedOut => ItemStatus::Timeout,
        Outcome::OutOfMemory => ItemStatus::MemoryExceeded,
    }
}

/// `s` cut to at most `max` bytes, on a character boundary, with a marker.
fn cap(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("\n[kiln] cut here: the rest is not kept in batch results\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(exit: Option<i32>, signal: Option<i32>, completed: bool, stdout: &str) -> Report {
        Report::Ran(RunnerLine {
            exit,
            signal,
            timed_out: false,
            completed,
            stdout: stdout.into(),
            stdout_truncated: false,
            stderr: String::new(),
            ms: 1.0,
            oom_kills: None,
        })
    }

    #[test]
    fn a_program_passes_only_with_status_zero_and_the_expected_output() {
        let want = "4\n".to_string();
        assert!(line(Some(0), None, true, "4  \n\n").score(Some(&want)).passed);
        let raised = line(Some(1), None, false, "4\n").score(Some(&want));
        assert_eq!((raised.passed, raised.status), (false, ItemStatus::Error));
        assert!(!line(Some(0), None, false, "5\n").score(Some(&want)).passed);
        let killed = line(None, Some(9), false, "").score(Some(&want));
        assert_eq!(killed.status, ItemStatus::MemoryExceeded);
    }

    #[test]
    fn a_sigkill_is_the_memory_limit_only_when_the_oom_killer_acted_or_could_not_be_counted() {
        let killed = |oom_kills| match line(None, Some(9), false, "") {
            Report::Ran(r) => Report::Ran(RunnerLine { oom_kills, ..r }).score(None),
            failed => failed.score(None),
        };
        let own = killed(Some(0));
        assert_eq!((own.passed, own.status), (false, ItemStatus::Error));
        assert!(own.stderr.contains("not by its memory limit"), "{}", own.stderr);
        assert_eq!(killed(Some(1)).status, ItemStatus::MemoryExceeded);
        assert_eq!(killed(None).status, ItemStatus::MemoryExceeded);
    }

    #[test]
    fn an_assertion_passes_only_when_it_completed() {
        assert!(line(Some(0), None, true, "").score(None).passed);
        let early = line(Some(0), None, false, "").score(None);
        assert_eq!((early.passed, early.status), (false, ItemStatus::Error));
        assert!(early.stderr.contains("before the test completed"));
    }

    #[test]
    fn the_runner_s_texts_arrive_in_base64_whatever_bytes_a_test_printed() -> Result<(), serde_json::Error> {
        let line = r#"{"exit":0,"signal":null,"timed_out":false,"completed":true,"stdout_b64":"NCD/Cg==","stdout_truncated":false,"stderr_b64":"","ms":1.5}"#;
        let r: RunnerLine = serde_json::from_str(line)?;
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("4 \u{fffd}\n", ""));
        let want = "4 \u{fffd}".to_string();
        assert!(Report::Ran(r).score(Some(&want)).passed);
        Ok(())
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let s = cap("é".repeat(10), 5);
        assert!(s.starts_with("éé") && s.contains("cut here"));
    }
}
