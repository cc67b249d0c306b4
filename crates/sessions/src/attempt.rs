//! One attempt at a batch item: the session it runs in (its own, one it
//! names, or one of its batch's lanes), the cells it sends there (the
//! item's, the judge's runner cells, a lane's own), and what counts as
//! kiln's failure rather than the item's ([`Infra`]). A fresh session is
//! ended when the attempt is done or dropped ([`Ender`]).
//!
//! `batch` decides what an item needs and scores it; this module only
//! runs cells and reads what the runner said (`runner`, `scoring`).

use crate::lanes::Lanes;
use crate::runner::{ItemCell, Tests};
use crate::scoring::{ItemReport, Report};
use crate::{Exec, Judged, Manager, SessionError};
use kiln_protocol::{ExecEvent, ItemStatus, Language, Output};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the test runner's cell may take beyond the test's own limit (the
/// runner enforces that one; this bounds the runner itself).
const RUNNER_MARGIN: Duration = Duration::from_secs(10);

/// Beyond an item's cell's time limit in a lane: the time its interrupt
/// may take to land (`judge.CELL_GRACE`).
const ITEM_GRACE: Duration = Duration::from_secs(3);

/// How long a lane's own cells (forking its image server, emptying its
/// work directory) may take.
const LANE_CELL_LIMIT: Duration = Duration::from_secs(30);

/// How long an item waits for room (a session place) before kiln gives up
/// on it as its own failure.
const ROOM_WAIT: Duration = Duration::from_secs(120);

/// Why an attempt at an item failed: kiln's failure, with its message.
#[derive(Debug)]
pub(crate) struct Infra {
    pub(crate) why: String,
    /// Whether another attempt could fare better. A kernel or sandbox that
    /// failed is retried on another kernel; no room for the item's session
    /// (the key's or the server's session limit, or the key's queue, still
    /// full after [`ROOM_WAIT`]) is not: waiting as long again would only
    /// double the item's time before the same answer.
    pub(crate) retry: bool,
}

impl From<SessionError> for Infra {
    fn from(e: SessionError) -> Self {
        let message = e.to_api().message;
        match e {
            SessionError::TooManySessions(_) | SessionError::NoCapacity(_) | SessionError::RateLimited { .. } => {
                Infra {
                    why: format!("no room for this item within {} s: {message}", ROOM_WAIT.as_secs()),
                    retry: false,
                }
            }
            _ => Infra { why: message, retry: true },
        }
    }
}

/// The time limit of the runner cell that runs an item's cell (limit
/// `timeout`) and its `assertions` (limit `each`) in a lane: the judge
/// kills the item's process past the cell's limit, the interrupt's grace
/// and the assertions' limits (a second each for its fork and sweep);
/// this bounds the runner itself.
pub(crate) fn lane_item_limit(timeout: Duration, each: Duration, assertions: usize) -> Duration {
    let n = u32::try_from(assertions).unwrap_or(u32::MAX);
    let tests = (each + Duration::from_secs(1)).checked_mul(n).unwrap_or(Duration::MAX);
    timeout.saturating_add(ITEM_GRACE).saturating_add(tests).saturating_add(RUNNER_MARGIN)
}

/// One attempt's session and what it still has to send.
pub(crate) struct Run<'a> {
    pub(crate) manager: &'a Manager,
    pub(crate) key_id: &'a str,
    pub(crate) exec: &'a Exec,
    pub(crate) session: Option<String>,
    /// The item's files, sent with its first cell.
    pub(crate) files: Option<Vec<kiln_protocol::ValidFile>>,
    pub(crate) ender: Ender,
    /// The session is one of the batch's lanes.
    pub(crate) lane: bool,
    /// The batch's idle lanes.
    pub(crate) lanes: &'a Lanes,
    /// Every runner cell so far ended as it should (a lane may serve on).
    pub(crate) clean: bool,
}

impl Run<'_> {
    /// Run one cell in the item's session (starting it with the first),
    /// waiting for room when the key or the server is full.
    pub(crate) async fn cell(&mut self, code: String, timeout: Option<Duration>) -> Result<Judged, SessionError> {
        let waited = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let exec = Exec {
                session_id: self.session.clone(),
                code: code.clone(),
                files: self.files.clone().unwrap_or_default(),
                timeout,
                events: None,
                count_oom_kills: true,
                ..self.exec.clone()
            };
            let answer = match self.session {
                Some(_) => self.manager.execute_judged(self.key_id, exec).await,
                None => self.start(exec).await,
            };
            match answer {
                Ok(j) => {
                    self.files = None;
                    if self.session.is_none() {
                        self.session = Some(j.data.session_id.clone());
                        self.ender.id = self.session.clone();
                    }
                    return Ok(j);
                }
                // A full key or server is a wait, never the item's failure;
                // so is a full queue of executions (the batch's own items
                // fill it as well as the key's other requests).
                Err(SessionError::RateLimited { .. }) if waited.elapsed() < ROOM_WAIT => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(SessionError::TooManySessions(_) | SessionError::NoCapacity(_))
                    if self.session.is_none() && waited.elapsed() < ROOM_WAIT =>
                {
                    // The batch's own idle lanes give way first.
                    if self.lanes.end_one().await {
                        continue;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Run the cell that starts the item's session, in a task of its own
    /// that learns the session's id as soon as it exists: when this item is
    /// dropped (its client went away), the cell is interrupted and the
    /// session ended there, never left to its TTL.
    async fn start(&mut self, mut exec: Exec) -> Result<Judged, SessionError> {
        let (events, mut session_events) = mpsc::unbounded_channel();
        exec.events = Some(events);
        // Dropped with this future: the task's sign that no one waits.
        let (waiting, gone) = oneshot::channel::<()>();
        let (manager, key, end) = (self.manager.clone(), self.key_id.to_string(), self.ender.armed);
        let task = tokio::spawn(async move {
            let run = manager.execute_judged(&key, exec);
            tokio::pin!(run, gone);
            let mut id = None;
            let answer = loop {
                tokio::select! {
                    biased;
                    answer = &mut run => break Some(answer),
                    Some(e) = session_events.recv() => {
                        if let ExecEvent::Session { session_id } = e {
                            id.get_or_insert(session_id);
                        }
                    }
                    _ = &mut gone, if id.is_some() => break None,
                }
            };
            let abandoned = answer.is_none() || matches!(gone.try_recv(), Err(oneshot::error::TryRecvError::Closed));
            if abandoned {
                // Dropping `run` (when it has not answered) interrupts the
                // cell; then the session goes, unless it was to be kept.
                if let (true, Some(id)) = (end, &id) {
                    let _ = manager.end(&key, id).await;
                }
            }
            answer
        });
        let answer = task.await.map_err(|e| SessionError::KernelUnavailable(format!("the item's task failed: {e}")))?;
        drop(waiting);
        answer.unwrap_or_else(|| Err(SessionError::KernelUnavailable("abandoned".into())))
    }

    /// Start a new image lane's session with the cell that forks its tests'
    /// server from the kernel (`lanes::LaneKind::Image`): before the item's
    /// first cell, so that the server holds nothing of any item. Should it
    /// fail, the item's calls start a lean server (slower, as correct) and
    /// the lane is not used again.
    pub(crate) async fn image_server(&mut self) -> Result<(), Infra> {
        // The item's files go with its first runner cell, where a file that
        // cannot be written fails its tests, as in any session.
        let files = self.files.take();
        let done = self.cell(crate::runner::IMAGE_SERVER.to_string(), Some(LANE_CELL_LIMIT)).await;
        self.files = files;
        self.clean &= done?.outcome == crate::Outcome::Success;
        Ok(())
    }

    /// Run an item's cell and then its assertions in its lane
    /// (`runner::item_cell`): the cell's status and outputs, and one report
    /// per assertion.
    /// `limits`: the cell's time limit and each assertion's.
    pub(crate) async fn item_in_lane(
        &mut self,
        code: &str,
        assertions: &[&String],
        (timeout, limit): (Duration, Duration),
        record_bytes: usize,
    ) -> Result<ItemReport, Infra> {
        let output_limit = self.manager.lane_output_limit();
        let item = ItemCell { code, timeout, output_limit, record_bytes, assertions, assertion_timeout: limit };
        let cell_limit = lane_item_limit(timeout, limit, assertions.len());
        match self.cell(crate::runner::item_cell(&item), Some(cell_limit)).await {
            Ok(j) => {
                if let Some(why) = crate::runner::lost_its_server(&j) {
                    let why = format!("the lane's tests' runner ended under the item ({why})");
                    return Err(Infra { why, retry: true });
                }
                // The judge enforces every limit below the cell's: a cell
                // that hit its own is the runner's failure.
                if j.outcome == crate::Outcome::TimedOut {
                    return Err(Infra { why: "the lane's runner did not end in time".into(), retry: true });
                }
                let report = ItemReport::read(&j, assertions.len(), output_limit, timeout);
                self.clean &= j.outcome == crate::Outcome::Success && report.complete;
                Ok(report)
            }
            Err(SessionError::Expired(e)) => {
                Err(Infra { why: format!("the batch's session {e} ended under the item"), retry: true })
            }
            Err(SessionError::Files(e)) => Ok(ItemReport {
                status: ItemStatus::Error,
                outputs: vec![Output::Error(e.to_string())],
                reports: Report::all_failed(assertions.len(), ItemStatus::Error, &e.to_string()),
                complete: true,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Remove the item's files from its lane's work directory (the next
    /// item finds it empty, as every item does); the lane is not used
    /// again if that fails.
    pub(crate) async fn empty_work_dir(&mut self) {
        let done = self.cell(crate::runner::EMPTY_WORK_DIR.to_string(), Some(LANE_CELL_LIMIT)).await;
        self.clean &= done.is_ok_and(|j| j.outcome == crate::Outcome::Success);
    }

    /// Run `tests` of an item in `language` through the judge and read
    /// their reports, in order. A test that ends the runner's cell (it
    /// killed or exhausted the kernel) fails, and the tests after it run in
    /// another cell, so that one test never decides another's fate.
    pub(crate) async fn runner(
        &mut self,
        tests: &Tests<'_>,
        language: Language,
        limit: Duration,
    ) -> Result<Vec<Report>, Infra> {
        let total = tests.len();
        let mut reports = Vec::with_capacity(total);
        while reports.len() < total {
            let rest = tests.after(reports.len());
            let left = rest.len();
            let Some(code) = crate::runner::cell(self.exec.language, language, &rest, secs(limit), self.lane) else {
                // Refused before anything ran (the batch checks items first).
                let why = "these tests cannot run in this session's language";
                reports.extend(Report::all_failed(left, ItemStatus::Error, why));
                break;
            };
            // Each test's own limit, and a second each for its fork and sweep.
            // No longer than the server's longest execution, which the
            // cell could not be given: past it the cell is cut as a time
            // limit, and the tests it did not report run in another.
            let n = u32::try_from(left).unwrap_or(u32::MAX);
            let tests = (limit + Duration::from_secs(1)).checked_mul(n).unwrap_or(Duration::MAX);
            let cell_limit = tests.saturating_add(RUNNER_MARGIN).min(self.manager.max_exec_timeout());
            match self.cell(code, Some(cell_limit)).await {
                // A lane's kernel runs only the judge, and no test can end
                // its fork server or a call's child (the guard): losing
                // them is kiln's failure, never the item's. The item runs
                // again in another lane; this one ends with its ender.
                Ok(j) => {
                    if let Some(why) = crate::runner::lost_its_server(&j).filter(|_| self.lane) {
                        let why = format!("the lane's tests' runner ended under the item ({why})");
                        return Err(Infra { why, retry: true });
                    }
                    self.clean &= j.outcome == crate::Outcome::Success;
                    let (ran, culprit) = Report::read(j, left);
                    self.clean &= culprit.is_none();
                    reports.extend(ran);
                    reports.extend(culprit);
                }
                // A lane's kernel runs no code of the item's, and its tests
                // cannot end it: its end is kiln's (its lifetime, a lost
                // kernel), and the item runs again in another.
                Err(SessionError::Expired(e)) if self.lane => {
                    return Err(Infra { why: format!("the batch's session {e} ended under the tests"), retry: true })
                }
                // The session ended under the tests: the previous cell
                // killed its kernel and no new one could be started for it.
                Err(SessionError::Expired(_)) => {
                    let why = "the session ended before this test could run (the item's code ended its kernel)";
                    reports.extend(Report::all_failed(left, ItemStatus::Error, why));
                }
                Err(SessionError::Files(e)) => {
                    reports.extend(Report::all_failed(left, ItemStatus::Error, &e.to_string()))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(reports)
    }
}

/// Ends an item's fresh session when the item is done, or when it is
/// dropped unfinished (its client went away): a batch leaves no session
/// behind that its caller did not ask to keep.
pub(crate) struct Ender {
    pub(crate) manager: Manager,
    pub(crate) key_id: String,
    pub(crate) id: Option<String>,
    pub(crate) armed: bool,
}

impl Ender {
    pub(crate) fn new(manager: Manager, key_id: &str, armed: bool) -> Self {
        Ender { manager, key_id: key_id.to_string(), id: None, armed }
    }

    /// End the session now and wait until it is gone.
    pub(crate) async fn finish(&mut self) {
        if let (true, Some(id)) = (self.armed, self.id.take()) {
            let _ = self.manager.end(&self.key_id, &id).await;
        }
    }
}

impl Drop for Ender {
    fn drop(&mut self) {
        if let (true, Some(id)) = (self.armed, self.id.take()) {
            let (manager, key) = (self.manager.clone(), std::mem::take(&mut self.key_id));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = manager.end(&key, &id).await;
                });
            }
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_item_s_runner_outlasts_its_cell_and_assertions_and_never_overflows() {
        let s = Duration::from_secs;
        assert_eq!(lane_item_limit(s(600), s(10), 5), s(600 + 3 + 11 * 5 + 10));
        assert_eq!(lane_item_limit(s(1), s(1), 0), s(1 + 3 + 10));
        assert_eq!(lane_item_limit(Duration::MAX, s(1), 1), Duration::MAX);
        assert_eq!(lane_item_limit(s(1), s(u64::MAX / 2), usize::MAX), Duration::MAX);
    }

    #[test]
    fn a_failed_kernel_is_retried_but_no_room_after_the_wait_is_not() {
        let kernel = Infra::from(SessionError::KernelUnavailable("the sandbox's init exited".into()));
        assert!(kernel.retry, "{kernel:?}");
        for full in [
            SessionError::TooManySessions(64),
            SessionError::NoCapacity(256),
            SessionError::RateLimited { running: 8, queued: 64 },
        ] {
            let infra = Infra::from(full);
            assert!(!infra.retry, "{infra:?}");
            assert!(infra.why.starts_with("no room for this item within 120 s: "), "{infra:?}");
        }
    }
}
