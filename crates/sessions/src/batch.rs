//! Batches: many items run concurrently, each scored by its tests, each
//! reported with a status that separates what the code did from what kiln
//! failed to do (see `POST /v1/tci/batch`).
//!
//! An item runs in its own fresh session (ended when it is done, unless
//! kept) or in one it names; one with no session to keep runs in one of
//! the batch's lanes (`lanes`) when it is a program only, or a Python cell
//! with no memory limit of its own (there its cell runs in a fork of the
//! lane's image server, never in the kernel, and its assertions fork from
//! that). Its tests run in forks
//! of that session's kernel, or of the kernel's fork server
//! (`kiln_kernel.judge`), each with its own time limit and the same
//! starting state, and kiln (here, not the candidate's process) decides
//! whether each passed:
//!
//! 1. program tests (`stdin`, `expected_stdout`), first: forked from the
//!    kernel before the item's code has run in it, so for a fresh session
//!    no candidate code has touched the process that reports the run;
//! 2. the item's code as a cell (skipped when every test is a program test:
//!    such an item is a program, and its status sums up its runs);
//! 3. assertion tests, forked from the kernel after the cell.
//!
//! Only kiln's failures are retried: an item whose session could not be
//! started or was lost runs once more on another kernel, and is reported as
//! `infra_error` when that fails too. Nothing kiln causes is an `error`.

use crate::lanes::{LaneKind, Lanes};
use crate::runner::{ItemCell, Tests};
use crate::scoring::{status_of, ItemReport, Report};
use crate::{Exec, Judged, Manager, SessionError};
use kiln_protocol::{BatchResult, ExecEvent, ItemStatus, Language, Output, TestKind, TestResult};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Bytes of outputs kept per item in a result: a batch of 1,000 items must
/// not hold 1,000 full outputs.
const ITEM_OUTPUT_BYTES: usize = 1 << 20;
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
/// The most one test's report line takes in the runner's cell output: its
/// stdout (1 MiB at most) and stderr (64 KiB) in base64, and the rest of
/// the line (see `kiln_kernel.judge`).
const REPORT_BYTES: usize = ((1 << 20) + (64 << 10)) / 3 * 4 + 4 + 1024;
/// The most an assertion's report takes when its item runs in a lane (its
/// stdout is cut at 64 KiB there: only that much is kept), and the report
/// of how the item's process ended.
const ASSERTION_REPORT_BYTES: usize = ((64 << 10) + 1 + (64 << 10)) / 3 * 4 + 4 + 1024;

/// One item, validated.
#[derive(Debug, Clone)]
pub struct BatchJob {
    /// Its position in the batch.
    pub index: usize,
    /// The execution (`events` unused).
    pub exec: Exec,
    /// Its tests, in order.
    pub tests: Vec<TestKind>,
    /// Time limit of each test.
    pub tests_timeout: Duration,
    /// Keep a fresh session after the item.
    pub keep_session: bool,
}

/// Why an attempt at an item failed: kiln's failure, with its message.
#[derive(Debug)]
struct Infra {
    why: String,
    /// Whether another attempt could fare better. A kernel or sandbox that
    /// failed is retried on another kernel; no room for the item's session
    /// (the key's or the server's session limit, or the key's queue, still
    /// full after [`ROOM_WAIT`]) is not: waiting as long again would only
    /// double the item's time before the same answer.
    retry: bool,
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

impl Manager {
    /// Run `items` for `key_id`, at most `concurrency` at a time, sending
    /// each result to `results` as it finishes. Returns early when
    /// `results` closes (the client went away): the items still running are
    /// dropped, which interrupts their cells and ends their sessions.
    pub async fn run_batch(
        &self,
        key_id: &str,
        items: Vec<BatchJob>,
        concurrency: usize,
        results: mpsc::Sender<BatchResult>,
    ) {
        let _batch = self.pool_batch_running();
        let lanes = std::sync::Arc::new(Lanes::new(self.clone(), key_id));
        self.drive_batch(key_id, items, concurrency, &results, &lanes).await;
        // Before the results end (the answer, or its totals line): when its
        // caller hears that the batch is over, its sessions are gone.
        lanes.close().await;
        drop(results);
    }

    async fn drive_batch(
        &self,
        key_id: &str,
        items: Vec<BatchJob>,
        concurrency: usize,
        results: &mpsc::Sender<BatchResult>,
        lanes: &std::sync::Arc<Lanes>,
    ) {
        let mut queue = items.into_iter();
        let mut running = JoinSet::new();
        let mut index_of = std::collections::HashMap::new();
        let spawn =
            |running: &mut JoinSet<BatchResult>, index_of: &mut std::collections::HashMap<_, _>, job: BatchJob| {
                let (manager, key, lanes) = (self.clone(), key_id.to_string(), lanes.clone());
                let index = job.index;
                let handle = running.spawn(async move { manager.run_item(&key, job, &lanes).await });
                index_of.insert(handle.id(), index);
            };
        for job in queue.by_ref().take(concurrency.max(1)) {
            spawn(&mut running, &mut index_of, job);
        }
        loop {
            let done = tokio::select! {
                biased;
                _ = results.closed() => return,
                done = running.join_next_with_id() => done,
            };
            let result = match done {
                None => return,
                Some(Ok((_, r))) => r,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "a batch item's task failed");
                    let index = index_of.get(&e.id()).copied().unwrap_or(0);
                    self.metrics().batch_item(ItemStatus::InfraError.as_str(), 0, 0);
                    infra_result(index, "kiln failed while running this item (an internal error)".into())
                }
            };
            if results.send(result).await.is_err() {
                return;
            }
            if let Some(job) = queue.next() {
                spawn(&mut running, &mut index_of, job);
            }
        }
    }

    /// Run one item: once, and once more on another kernel if kiln failed.
    async fn run_item(&self, key_id: &str, job: BatchJob, lanes: &Lanes) -> BatchResult {
        let started = Instant::now();
        let first = self.attempt(key_id, &job, lanes).await;
        let outcome = match first {
            Err(Infra { why, retry: true }) if job.exec.session_id.is_none() => {
                tracing::warn!(index = job.index, reason = %why, "batch item failed on kiln's side; retrying once");
                self.attempt(key_id, &job, lanes).await
            }
            other => other,
        };
        let mut result = match outcome {
            Ok(r) => r,
            Err(Infra { why, .. }) => infra_result(job.index, why),
        };
        result.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (passed, failed) = (result.passed.unwrap_or(0), result.failed.unwrap_or(0));
        self.metrics().batch_item(result.status.as_str(), passed, failed);
        result
    }

    async fn attempt(&self, key_id: &str, job: &BatchJob, lanes: &Lanes) -> Result<BatchResult, Infra> {
        let program_only = !job.tests.is_empty() && job.tests.iter().all(|t| matches!(t, TestKind::Program { .. }));
        let fresh = job.exec.session_id.is_none() && !job.keep_session;
        // Such an item's tests leave its session as they found it (its
        // files, which its first runner cell writes, go with its call): it
        // shares one with the batch's other such items (`lanes`), of the
        // kind its imports call for.
        let checks: Vec<(usize, &String)> = job
            .tests
            .iter()
            .enumerate()
            .filter_map(|(i, t)| match t {
                TestKind::Assertion { code } => Some((i, code)),
                TestKind::Program { .. } => None,
            })
            .collect();
        // A fresh Python item with a cell to run shares a lane too, an image
        // lane (its cell runs through the lean kernel's shell, in a fork of
        // the lane's server, its assertions in forks of that), unless it has
        // a memory limit of its own or its record would not fit in one
        // runner cell's output.
        let record_bytes = self.lane_record_bytes(checks.len());
        let cell_in_lane = fresh
            && self.kernel_kind() == kiln_kernel::KernelKind::Lean
            && !program_only
            && job.exec.language == Language::Python
            && job.exec.memory_limit.is_none()
            && record_bytes.is_some();
        let lane = if program_only && fresh {
            Some(lanes.take(LaneKind::of(job.exec.language, &job.exec.code)))
        } else {
            cell_in_lane.then(|| lanes.take(LaneKind::Image))
        };
        // A program-only item in a session no one will see runs no cell of
        // its language: its tests run from a Python kernel, forked from the
        // zygote in tens of milliseconds, where a Deno or bash kernel would
        // boot in half a second or more of CPU. The programs still run with
        // their own interpreter (`runner`).
        let in_python = (program_only && fresh && job.exec.language != Language::Python)
            .then(|| Exec { language: Language::Python, ..job.exec.clone() });
        let session = in_python.as_ref().unwrap_or(&job.exec);
        let session_id = lane.as_ref().map_or(job.exec.session_id.clone(), |l| l.id.clone());
        let mut ender = Ender::new(self.clone(), key_id, fresh);
        ender.id = lane.as_ref().and_then(|l| l.id.clone());
        let mut run = Run {
            manager: self,
            key_id,
            exec: session,
            session: session_id,
            files: Some(job.exec.files.clone()),
            ender,
            lane: lane.is_some(),
            lanes,
            clean: true,
        };
        if lane.as_ref().is_some_and(|l| l.kind == LaneKind::Image && l.id.is_none()) {
            run.image_server().await?;
        }
        let mut tests_done: Vec<Option<TestResult>> = vec![None; job.tests.len()];
        // 1. Program runs, from the kernel as it was before the item's code.
        let programs: Vec<(usize, &String, &String)> = job
            .tests
            .iter()
            .enumerate()
            .filter_map(|(i, t)| match t {
                TestKind::Program { stdin, expected_stdout } => Some((i, stdin, expected_stdout)),
                TestKind::Assertion { .. } => None,
            })
            .collect();
        // As many tests to a cell as their reports fit in a cell's output
        // (all of an item's, on the defaults): each cell costs a round trip
        // to the kernel and two store writes.
        let per_cell = (self.max_output_bytes() / REPORT_BYTES).max(1);
        for chunk in programs.chunks(per_cell) {
            let stdins: Vec<&String> = chunk.iter().map(|(_, stdin, _)| *stdin).collect();
            let tests = Tests::Programs { code: &job.exec.code, stdins: &stdins };
            let reports = run.runner(&tests, job.exec.language, job.tests_timeout).await?;
            for ((i, _, expected), report) in chunk.iter().zip(reports) {
                tests_done[*i] = Some(report.score(Some(expected)));
            }
        }
        // 2. The cell, unless the item is a program only; in a lane, with
        //    its assertions (3.), each from the state the cell left.
        let (status, outputs) = if program_only {
            let worst = tests_done.iter().flatten().map(|t| t.status).find(|s| *s != ItemStatus::Success);
            (worst.unwrap_or(ItemStatus::Success), Vec::new())
        } else if let (true, Some(record_bytes)) = (lane.is_some(), record_bytes) {
            let codes: Vec<&String> = checks.iter().map(|(_, code)| *code).collect();
            let item = run.item_in_lane(&job.exec.code, &codes, job.tests_timeout, record_bytes).await?;
            for ((i, _), report) in checks.iter().zip(item.reports) {
                tests_done[*i] = Some(report.score(None));
            }
            (item.status, cap_outputs(item.outputs))
        } else {
            match run.cell(job.exec.code.clone(), job.exec.timeout).await {
                Ok(j) => (status_of(j.outcome), cap_outputs(j.data.outputs)),
                Err(SessionError::Files(e)) => (ItemStatus::Error, vec![Output::Error(e.to_string())]),
                Err(e) => return Err(e.into()),
            }
        };
        // 3. Assertions, each from the state the cell left (in a lane, done).
        let checks = if lane.is_some() { &[][..] } else { &checks[..] };
        for chunk in checks.chunks(per_cell) {
            let codes: Vec<&String> = chunk.iter().map(|(_, code)| *code).collect();
            let reports =
                run.runner(&Tests::Assertions { codes: &codes }, job.exec.language, job.tests_timeout).await?;
            for ((i, _), report) in chunk.iter().zip(reports) {
                tests_done[*i] = Some(report.score(None));
            }
        }
        let tests: Vec<TestResult> = tests_done.into_iter().flatten().collect();
        let kept = if run.ender.armed { None } else { run.session.clone() };
        match lane {
            // Taken from the ender, which would end it on drop.
            Some(lane) => {
                if !job.exec.files.is_empty() && run.session.is_some() {
                    run.empty_work_dir().await;
                }
                if let Some(id) = run.ender.id.take() {
                    lanes.give_back(lane, id, run.clean).await;
                }
            }
            None => run.ender.finish().await,
        }
        let (passed, failed) = (tests.iter().filter(|t| t.passed).count(), tests.iter().filter(|t| !t.passed).count());
        let has_tests = !job.tests.is_empty();
        Ok(BatchResult {
            index: job.index,
            session_id: kept,
            status,
            outputs,
            duration_ms: 0.0,
            passed: has_tests.then_some(passed),
            failed: has_tests.then_some(failed),
            tests: has_tests.then_some(tests),
        })
    }
}

impl Manager {
    /// The output an item's cell may show when it runs in a lane: as in a
    /// session, up to what batch results keep of an item's outputs.
    fn lane_output_limit(&self) -> usize {
        self.max_output_bytes().min(ITEM_OUTPUT_BYTES)
    }

    /// How many bytes of JSON an item's recorded cell may take in its
    /// lane's runner cell, beside the reports of its `assertions` and of its
    /// process's end, all in one cell's output; `None` when that leaves too
    /// little for what the cell may show (such an item gets a session of its
    /// own, where its cell's outputs and its tests' reports come apart).
    fn lane_record_bytes(&self, assertions: usize) -> Option<usize> {
        let reports = (assertions + 1) * ASSERTION_REPORT_BYTES + 4096;
        let room = self.max_output_bytes().checked_sub(reports)? / 4 * 3;
        (room >= 2 * self.lane_output_limit()).then_some(room)
    }
}

/// One attempt's session and what it still has to send.
struct Run<'a> {
    manager: &'a Manager,
    key_id: &'a str,
    exec: &'a Exec,
    session: Option<String>,
    /// The item's files, sent with its first cell.
    files: Option<Vec<kiln_protocol::ValidFile>>,
    ender: Ender,
    /// The session is one of the batch's lanes.
    lane: bool,
    /// The batch's idle lanes.
    lanes: &'a Lanes,
    /// Every runner cell so far ended as it should (a lane may serve on).
    clean: bool,
}

impl Run<'_> {
    /// Run one cell in the item's session (starting it with the first),
    /// waiting for room when the key or the server is full.
    async fn cell(&mut self, code: String, timeout: Option<Duration>) -> Result<Judged, SessionError> {
        let waited = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let exec = Exec {
                session_id: self.session.clone(),
                code: code.clone(),
                files: self.files.clone().unwrap_or_default(),
                timeout,
                events: None,
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
    async fn image_server(&mut self) -> Result<(), Infra> {
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
    async fn item_in_lane(
        &mut self,
        code: &str,
        assertions: &[&String],
        limit: Duration,
        record_bytes: usize,
    ) -> Result<ItemReport, Infra> {
        let timeout = self.exec.timeout.unwrap_or_else(|| self.manager.exec_timeout());
        let output_limit = self.manager.lane_output_limit();
        let item = ItemCell { code, timeout, output_limit, record_bytes, assertions, assertion_timeout: limit };
        let n = u32::try_from(assertions.len()).unwrap_or(u32::MAX);
        // The judge kills the item's process past its cell's limit, the
        // interrupt's grace and its assertions' limits.
        let cell_limit = timeout + ITEM_GRACE + (limit + Duration::from_secs(1)) * n + RUNNER_MARGIN;
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
    async fn empty_work_dir(&mut self) {
        let done = self.cell(crate::runner::EMPTY_WORK_DIR.to_string(), Some(LANE_CELL_LIMIT)).await;
        self.clean &= done.is_ok_and(|j| j.outcome == crate::Outcome::Success);
    }

    /// Run `tests` of an item in `language` through the judge and read
    /// their reports, in order. A test that ends the runner's cell (it
    /// killed or exhausted the kernel) fails, and the tests after it run in
    /// another cell, so that one test never decides another's fate.
    async fn runner(&mut self, tests: &Tests<'_>, language: Language, limit: Duration) -> Result<Vec<Report>, Infra> {
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
            let n = u32::try_from(left).unwrap_or(u32::MAX);
            let cell_limit = (limit + Duration::from_secs(1)) * n + RUNNER_MARGIN;
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
struct Ender {
    manager: Manager,
    key_id: String,
    id: Option<String>,
    armed: bool,
}

impl Ender {
    fn new(manager: Manager, key_id: &str, armed: bool) -> Self {
        Ender { manager, key_id: key_id.to_string(), id: None, armed }
    }

    /// End the session now and wait until it is gone.
    async fn finish(&mut self) {
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

fn infra_result(index: usize, why: String) -> BatchResult {
    BatchResult {
        index,
        session_id: None,
        status: ItemStatus::InfraError,
        outputs: vec![Output::Error(format!(
            "kiln could not run this item, even on a retry with another kernel; this is a server-side failure, \
             not an error of the code: {why}"
        ))],
        duration_ms: 0.0,
        tests: None,
        passed: None,
        failed: None,
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// An item's outputs cut to [`ITEM_OUTPUT_BYTES`] in all.
fn cap_outputs(outputs: Vec<Output>) -> Vec<Output> {
    let mut total = 0;
    let mut kept = Vec::new();
    for o in outputs {
        let size = o.size_hint();
        if total + size > ITEM_OUTPUT_BYTES {
            kept.push(Output::Stderr(format!(
                "\n[kiln] batch results keep {ITEM_OUTPUT_BYTES} bytes of outputs per item: the rest was discarded\n"
            )));
            break;
        }
        total += size;
        kept.push(o);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

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
