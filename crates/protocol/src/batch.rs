//! Wire types of `POST /v1/tci/batch` (a kiln extension): many executions
//! in one request, each optionally scored by tests, answered in item order
//! or streamed as NDJSON in completion order.
//!
//! An item's `status` separates what the code did (`success`, `error`,
//! `timeout`, `memory_exceeded`) from what kiln failed to do
//! (`infra_error`), so that an RL trainer never scores kiln's failure as a
//! wrong answer.

use crate::{FileUpload, Language, Output};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most items one batch may hold.
pub const MAX_BATCH_ITEMS: usize = 1000;
/// The most tests one item may hold.
pub const MAX_ITEM_TESTS: usize = 100;
/// The pattern of a `memory_limit`: a whole number of mebibytes,
/// gibibytes, megabytes or gigabytes.
pub const MEMORY_PATTERN: &str = r"^[1-9][0-9]{0,6}(MiB|GiB|MB|GB)$";

/// Body of `POST /v1/tci/batch`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct BatchRequest {
    /// The items, run concurrently (each in its own session unless it names
    /// one); results come back in this order.
    #[schema(min_items = 1, max_items = 1000)]
    pub items: Vec<BatchItem>,
}

/// One item of a batch: an execute request with tests and limits.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct BatchItem {
    /// The code, run as one notebook cell (and, for stdin tests, as a
    /// program).
    pub code: String,
    /// The language of `code`; absent means python.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Language>)]
    pub language: Option<String>,
    /// Run in this live session instead of a fresh one (which is ended when
    /// the item is done, unless `keep_session`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Files written into the working directory before anything runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileUpload>>,
    /// Time limit of the cell, seconds (capped by the server's
    /// `--max-exec-timeout`, the `maximum` here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0)]
    pub timeout: Option<f64>,
    /// Memory limit of the item's executions, e.g. `"256MiB"`; a limit
    /// above the server's `--memory-limit` is the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[1-9][0-9]{0,6}(MiB|GiB|MB|GB)$")]
    pub memory_limit: Option<String>,
    /// Tests that score the code: program runs in every language,
    /// assertions in Python items only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 100)]
    pub tests: Option<Vec<TestCase>>,
    /// Time limit of each test, seconds (default: 10, capped like
    /// `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0)]
    pub tests_timeout: Option<f64>,
    /// Keep the fresh session after the item (its id is in the result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_session: Option<bool>,
}

/// A test: either a program run (`stdin` and `expected_stdout`) or an
/// assertion (`code`), never both. A program run passes when the item's
/// code, run as a program with `stdin` as its standard input, exits with
/// status 0 and prints `expected_stdout` (trailing whitespace of each line
/// and of the whole ignored). An assertion runs after the item's code, in
/// the session's namespace, and passes when it completes without raising.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct TestCase {
    /// Standard input of the program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// What the program must print.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_stdout: Option<String>,
    /// E.g. `assert solve(2) == 4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// What a [`TestCase`] asks for, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestKind {
    /// Run the item's code as a program.
    Program {
        /// Its standard input.
        stdin: String,
        /// What it must print.
        expected_stdout: String,
    },
    /// Run this code after the item's.
    Assertion {
        /// The assertion.
        code: String,
    },
}

impl TestCase {
    /// The test's kind, or why it has none.
    pub fn kind(&self) -> Result<TestKind, &'static str> {
        match (&self.stdin, &self.expected_stdout, &self.code) {
            (Some(stdin), Some(expected), None) => {
                Ok(TestKind::Program { stdin: stdin.clone(), expected_stdout: expected.clone() })
            }
            (None, None, Some(code)) => Ok(TestKind::Assertion { code: code.clone() }),
            (_, _, Some(_)) => Err("a test has either \"code\" (an assertion) or \"stdin\" and \"expected_stdout\" \
                                    (a program run), not both"),
            _ => Err("a program test needs both \"stdin\" and \"expected_stdout\" (or give \"code\" for an \
                      assertion)"),
        }
    }
}

/// How an item, or one of its tests, ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// It ran to its end.
    Success,
    /// The code raised (or exited with a failure status, or killed its
    /// kernel).
    Error,
    /// It hit its time limit.
    Timeout,
    /// It hit its memory limit.
    MemoryExceeded,
    /// kiln failed (no kernel could start, even on a retry); not the code's
    /// fault.
    InfraError,
}

impl ItemStatus {
    /// The status on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Success => "success",
            ItemStatus::Error => "error",
            ItemStatus::Timeout => "timeout",
            ItemStatus::MemoryExceeded => "memory_exceeded",
            ItemStatus::InfraError => "infra_error",
        }
    }
}

/// How one test went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TestResult {
    /// Whether it passed.
    pub passed: bool,
    /// How its run ended (a program that printed the wrong answer and
    /// exited 0 is `success` and not `passed`).
    pub status: ItemStatus,
    /// What it printed (cut at 64 KiB here).
    pub stdout: String,
    /// What it wrote to stderr (a traceback, kiln's reason), cut at 64 KiB.
    pub stderr: String,
    /// How long it ran, milliseconds.
    pub duration_ms: f64,
}

/// The result of one item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchResult {
    /// The item's position in the request.
    pub index: usize,
    /// The item's session, when it lives on (`keep_session`, or the item
    /// named it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// How the item's code ended.
    pub status: ItemStatus,
    /// What the cell showed, as `execute` returns it.
    pub outputs: Vec<Output>,
    /// Wall time of the whole item (cell and tests), milliseconds.
    pub duration_ms: f64,
    /// One entry per test, in the item's order (when it had tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<Vec<TestResult>>,
    /// Tests passed (when it had tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed: Option<usize>,
    /// Tests failed (when it had tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<usize>,
}

/// `data` of a batch answered as one document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchData {
    /// One result per item, in item order.
    pub results: Vec<BatchResult>,
}

/// The last line of a streamed batch: `{"totals": {...}}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchTotals {
    /// Items run.
    pub items: usize,
    /// Items per status.
    pub success: usize,
    /// Items whose code raised.
    pub error: usize,
    /// Items that hit their time limit.
    pub timeout: usize,
    /// Items that hit their memory limit.
    pub memory_exceeded: usize,
    /// Items kiln failed to run.
    pub infra_error: usize,
    /// Tests passed, all items together.
    pub tests_passed: usize,
    /// Tests failed, all items together.
    pub tests_failed: usize,
    /// Wall time of the batch, milliseconds.
    pub duration_ms: f64,
}

impl BatchTotals {
    /// Count one result.
    pub fn add(&mut self, r: &BatchResult) {
        self.items += 1;
        match r.status {
            ItemStatus::Success => self.success += 1,
            ItemStatus::Error => self.error += 1,
            ItemStatus::Timeout => self.timeout += 1,
            ItemStatus::MemoryExceeded => self.memory_exceeded += 1,
            ItemStatus::InfraError => self.infra_error += 1,
        }
        self.tests_passed += r.passed.unwrap_or(0);
        self.tests_failed += r.failed.unwrap_or(0);
    }
}

/// The final NDJSON line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchEnd {
    /// The counts of the whole batch.
    pub totals: BatchTotals,
}

/// A `memory_limit` in bytes, or why it is not one.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let n: u64 = match n.parse() {
        Ok(n) if n > 0 && digits <= 7 && !n_has_leading_zero(s) => n,
        _ => return Err(format!("{s:?} is not a size; write a whole number and a unit, e.g. \"256MiB\"")),
    };
    let scale: u64 = match unit {
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{s:?} has an unknown unit; use MiB, GiB, MB or GB (e.g. \"256MiB\")")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s:?} is too large"))
}

fn n_has_leading_zero(s: &str) -> bool {
    s.starts_with('0')
}

/// Whether two program outputs match: trailing whitespace of every line and
/// of the whole output is ignored, nothing else.
pub fn same_stdout(got: &str, expected: &str) -> bool {
    fn norm(s: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = s.trim_end().split('\n').map(str::trim_end).collect();
        while lines.last().is_some_and(|l| l.is_empty()) && lines.len() > 1 {
            lines.pop();
        }
        lines
    }
    norm(got) == norm(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The pattern as the schema states it, checked by hand (no regex crate
    /// here): digits without a leading zero, at most 7, then a unit.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        assert_eq!(pattern, r"^[1-9][0-9]{0,6}(MiB|GiB|MB|GB)$");
        |s: &str| {
            let d = s.bytes().take_while(u8::is_ascii_digit).count();
            (1..=7).contains(&d) && !s.starts_with('0') && ["MiB", "GiB", "MB", "GB"].contains(&&s[d..])
        }
    }

    #[test]
    fn tests_are_told_apart_by_their_fields() {
        let kinds = |v| serde_json::from_value::<TestCase>(v).unwrap_or_default().kind();
        assert_eq!(
            kinds(json!({"stdin": "1\n", "expected_stdout": "2\n", "code": null})),
            Ok(TestKind::Program { stdin: "1\n".into(), expected_stdout: "2\n".into() })
        );
        assert_eq!(
            kinds(json!({"code": "assert f(1) == 2"})),
            Ok(TestKind::Assertion { code: "assert f(1) == 2".into() })
        );
        assert!(kinds(json!({"stdin": "1"})).is_err());
        assert!(kinds(json!({"stdin": "1", "expected_stdout": "1", "code": "x"})).is_err());
        assert!(kinds(json!({})).is_err());
    }

    #[test]
    fn outputs_match_up_to_trailing_whitespace_only() {
        assert!(same_stdout("1 2  \n3\n\n\n", "1 2\n3"));
        assert!(same_stdout("a\r\nb\r\n", "a\nb"));
        assert!(!same_stdout(" 1\n", "1\n"));
        assert!(!same_stdout("1\n\n2\n", "1\n2\n"));
        assert!(!same_stdout("", "0"));
        assert!(same_stdout("", "\n"));
    }

    #[test]
    fn memory_limits_take_binary_and_decimal_units() {
        assert_eq!(parse_memory("256MiB"), Ok(256 << 20));
        assert_eq!(parse_memory("1GB"), Ok(1_000_000_000));
        for bad in ["4096", "12 MiB", "MiB", "0MiB", "012MiB", "99999999GiB", "1KiB"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        let pattern = regex_lite(MEMORY_PATTERN);
        for s in ["1MiB", "256MiB", "9999999GB"] {
            assert!(pattern(s) && parse_memory(s).is_ok(), "{s}");
        }
    }
}
