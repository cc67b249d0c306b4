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
        let text: String = j
            .data
            .outputs
            .iter()
            .filter_map(|o| match o {
                Output::Stdout(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        let ran: Vec<Report> = text
            .lines()
            .filter_map(|l| l.strip_prefix(MARKER))
            .filter_map(|l| serde_json::from_str::<RunnerLine>(l).ok())
            .map(Report::Ran)
            .take(n)
            .collect();
        if ran.len() == n {
            return (ran, None);
        }
        let errors: Vec<&str> = j
            .data
            .outputs
            .iter()
            .filter_map(|o| match o {
                Output::Error(e) => Some(e.as_str()),
                _ => None,
            })
            .collect();
        let status = match status_of(j.outcome) {
            ItemStatus::Success => ItemStatus::Error,
            s => s,
        };
        let why = format!("the test did not report an end: {}", errors.join("\n"));
        (ran, Some(Report::Failed { status, why }))
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
        } else if r.signal == Some(9) {
            stderr.push_str("\n[kiln] the test's process was killed (SIGKILL), most likely by its memory limit\n");
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
