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

use crate::attempt::{lane_item_limit, Ender, Infra, Run};
use crate::lanes::{LaneKind, Lanes};
use crate::runner::Tests;
use crate::scoring::status_of;
use crate::{Exec, Manager, SessionError};
use kiln_protocol::{BatchResult, ItemStatus, Language, Output, TestKind, TestResult};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Bytes of outputs kept per item in a result: a batch of 1,000 items must
/// not hold 1,000 full outputs.
const ITEM_OUTPUT_BYTES: usize = 1 << 20;
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

/// A key's sessions, against its limit, when a batch is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRoom {
    /// Its live sessions, on every node sharing the store.
    pub live: usize,
    /// The most it may hold.
    pub most: usize,
}

impl Manager {
    /// How many sessions `key_id` holds and may hold (`key_limit`: the
    /// key's own limit, if any). A batch checks this before it runs: its
    /// fresh items need places, and when the caller's own sessions already
    /// hold them all, each item would wait for room in vain and end as
    /// kiln's failure, which it is not.
    pub async fn session_room(&self, key_id: &str, key_limit: Option<u64>) -> Result<SessionRoom, SessionError> {
        let live = self.store().live_sessions(key_id, chrono::Utc::now()).await?.len();
        Ok(SessionRoom { live, most: self.key_max(key_limit) })
    }

    /// The most live sessions a key with its own limit `key_limit` (if
    /// any) may hold here.
    pub fn key_max(&self, key_limit: Option<u64>) -> usize {
        crate::create::key_max(self.max_sessions_per_key(), key_limit)
    }

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
        let cell_timeout = job.exec.timeout.unwrap_or_else(|| self.exec_timeout());
        let cell_in_lane = fresh
            && self.kernel_kind() == kiln_kernel::KernelKind::Lean
            && !program_only
            && job.exec.language == Language::Python
            && job.exec.memory_limit.is_none()
            && record_bytes.is_some()
            && lane_item_limit(cell_timeout, job.tests_timeout, checks.len()) <= self.max_exec_timeout();
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
            let limits = (cell_timeout, job.tests_timeout);
            let item = run.item_in_lane(&job.exec.code, &codes, limits, record_bytes).await?;
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
    pub(crate) fn lane_output_limit(&self) -> usize {
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
