//! Usage that could not be written yet, because the database was down.
//!
//! Counting an execution must not depend on the database being up at that
//! moment: the code ran and its caller got its answer. When no connection
//! to PostgreSQL can be had (so the increment certainly did not reach it),
//! the PostgreSQL store adds the increment to this backlog instead, one
//! [`Tally`] per session, and a background task writes the backlog once the
//! database is back. Increments commute (sums and maxima), so writing them
//! late or merged changes nothing. The backlog holds at most one entry per
//! session of this node; it is lost only if the node dies before the
//! database returns.

use crate::ExecutionUsage;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;

/// Increments to one session's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Tally {
    /// Execute requests.
    pub executions: u64,
    /// Start of the latest of them.
    pub last_execute_at: Option<DateTime<Utc>>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// CPU time, seconds.
    pub cpu_seconds: f64,
    /// Memory peak, bytes (a maximum, not a sum).
    pub peak_memory_bytes: u64,
}

impl Tally {
    /// One execute request started at `at`.
    pub fn execute(at: DateTime<Utc>) -> Self {
        Tally { executions: 1, last_execute_at: Some(at), ..Tally::default() }
    }

    /// One execution's resource use.
    pub fn usage(u: ExecutionUsage) -> Self {
        Tally {
            seconds: u.seconds,
            cpu_seconds: u.cpu_seconds,
            peak_memory_bytes: u.peak_memory_bytes,
            ..Tally::default()
        }
    }

    fn merge(&mut self, other: Tally) {
        self.executions += other.executions;
        self.last_execute_at = self.last_execute_at.max(other.last_execute_at);
        self.seconds += other.seconds;
        self.cpu_seconds += other.cpu_seconds;
        self.peak_memory_bytes = self.peak_memory_bytes.max(other.peak_memory_bytes);
    }
}

/// Tallies waiting for the database, by session id.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    tallies: Mutex<HashMap<String, Tally>>,
}

impl Backlog {
    /// Keep `t` for session `id`; returns whether the backlog was empty.
    pub fn add(&self, id: &str, t: Tally) -> bool {
        let mut map = self.lock();
        let was_empty = map.is_empty();
        map.entry(id.to_string()).or_default().merge(t);
        was_empty
    }

    /// Everything kept so far (the backlog is empty afterwards).
    pub fn take(&self) -> HashMap<String, Tally> {
        std::mem::take(&mut *self.lock())
    }

    /// How many sessions have tallies waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tally>> {
        // Merging cannot panic halfway; a poisoned map is still whole.
        self.tallies.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_of_one_session_merge_into_sums_and_maxima() {
        let b = Backlog::default();
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(1);
        assert!(b.add("s", Tally::execute(t1)));
        assert!(!b.add("s", Tally::execute(t0)));
        b.add("s", Tally::usage(ExecutionUsage { seconds: 1.0, cpu_seconds: 0.5, peak_memory_bytes: 9 }));
        b.add("s", Tally::usage(ExecutionUsage { seconds: 2.0, cpu_seconds: 0.5, peak_memory_bytes: 4 }));
        b.add("other", Tally::execute(t0));
        assert_eq!(b.len(), 2);
        let all = b.take();
        assert_eq!(
            all.get("s").copied(),
            Some(Tally {
                executions: 2,
                last_execute_at: Some(t1),
                seconds: 3.0,
                cpu_seconds: 1.0,
                peak_memory_bytes: 9
            })
        );
        assert_eq!(b.len(), 0);
    }
}
