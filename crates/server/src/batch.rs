//! `POST /v1/tci/batch` (a kiln extension): many executions in one
//! request, each optionally scored by tests.
//!
//! The whole batch is checked before anything runs: a bad item fails the
//! request with the usual error envelope, `param` naming the item's field
//! (`items[17].tests[2]`). Then the items run concurrently (each in its own
//! session unless it names one), and the answer is either one document with
//! the results in item order, or, with `Accept: application/x-ndjson`, one
//! line per item the moment it finishes (completion order) and a last line
//! with the totals. A client that goes away stops its batch: running cells
//! are interrupted and the batch's sessions ended.

use crate::body::BoundedJson;
use crate::error::AppError;
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_protocol::{
    ApiError, BatchData, BatchEnd, BatchItem, BatchRequest, BatchResult, BatchTotals, Envelope, ErrorCode,
    ErrorEnvelope, ExecuteRequest, Language, TestKind, MAX_BATCH_ITEMS, MAX_ITEM_TESTS,
};
use kiln_sessions::{BatchJob, Caller, Exec, Manager};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often a silent stream carries an empty line.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Time limit of a test when the item names none.
const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Run many executions, each optionally scored by tests.
///
/// Also served at `/tci/batch`. Each item is an execute request with
/// optional `tests`, `tests_timeout`, `memory_limit` and `keep_session`.
/// Results come in item order, or with `Accept: application/x-ndjson` as
/// one JSON line per item in completion order, then `{"totals": ...}`.
#[utoipa::path(
    post, path = "/v1/tci/batch", operation_id = "batch", tag = "execute",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Every item ran (see each result's `status`: `infra_error` is kiln's \
            failure, never the code's). With `Accept: application/x-ndjson`: one `BatchResult` per line as \
            items finish, then one `BatchEnd` line; empty lines (keep-alives, every second while nothing \
            finishes) are to be skipped.",
            content(
                (Envelope<BatchData> = "application/json"),
                (String = "application/x-ndjson"),
            )),
        (status = 400, description = "A bad item (`param` names it, e.g. `items[3].tests[1]`); nothing ran",
            body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "An item names a session this key does not have", body = ErrorEnvelope),
        (status = 409, description = "Two of an item's files have the same name (`param` names the second, \
            e.g. `items[2].files[3]`), or an item's language is not its named session's (`language_mismatch`, \
            e.g. `items[3].language`); nothing ran", body = ErrorEnvelope),
        (status = 410, description = "An item names a session that has ended", body = ErrorEnvelope),
        (status = 413, description = "Body over the limit", body = ErrorEnvelope),
        (status = 429, description = "This key's live sessions leave no room for the sessions the batch must \
            hold at once (`too_many_sessions`): one per fresh item kept with `keep_session` (held to the end), \
            and one more for its other fresh items; nothing ran", body = ErrorEnvelope),
        (status = 503, description = "Not ready or shutting down", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    BoundedJson(req): BoundedJson<BatchRequest>,
) -> Result<Response, AppError> {
    let manager = state.manager;
    let jobs = validate(&manager, &caller, req).await?;
    let concurrency = concurrency(&manager, &caller);
    check_room(&manager, &caller, &jobs, concurrency).await?;
    if accepts_ndjson(&headers) {
        return Ok(stream(manager, caller.key_id, jobs, concurrency));
    }
    let (tx, mut rx) = mpsc::channel(64);
    let n = jobs.len();
    let run = manager.run_batch(&caller.key_id, jobs, concurrency, tx);
    let collect = async {
        let mut results: Vec<BatchResult> = Vec::with_capacity(n);
        while let Some(r) = rx.recv().await {
            results.push(r);
        }
        results
    };
    let ((), mut results) = tokio::join!(run, collect);
    results.sort_by_key(|r| r.index);
    Ok(Json(Envelope::ok(BatchData { results })).into_response())
}

/// Items of one batch run at once: enough to keep the machine's cores busy
/// while cells wait on their kernels, never more than the key may hold
/// sessions.
fn concurrency(manager: &Manager, caller: &Caller) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let executions = caller
        .max_executions_per_key
        .map_or(manager.executions_per_key(), |l| usize::try_from(l).unwrap_or(usize::MAX));
    (cores * 2).min(manager.key_max(caller.max_sessions)).min(executions).min(manager.max_sessions()).max(1)
}

fn accepts_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("application/x-ndjson")))
}

/// The streamed answer: a line per finished item, then the totals.
fn stream(manager: Manager, key_id: String, jobs: Vec<BatchJob>, concurrency: usize) -> Response {
    let (lines, body) = mpsc::channel::<Result<bytes::Bytes, std::convert::Infallible>>(16);
    tokio::spawn(async move {
        let started = Instant::now();
        let (tx, mut rx) = mpsc::channel(16);
        let run = manager.run_batch(&key_id, jobs, concurrency, tx);
        let write = async move {
            let mut totals = BatchTotals::default();
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let r = tokio::select! {
                    biased;
                    // The client is gone: dropping `rx` stops the batch.
                    _ = lines.closed() => return,
                    r = rx.recv() => r,
                    // An empty line while nothing finishes: a write is how
                    // a closed connection is noticed (and proxies keep an
                    // active stream open).
                    _ = beat.tick() => {
                        if lines.send(Ok(bytes::Bytes::from_static(b"\n"))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                beat.reset();
                let Some(r) = r else { break };
                totals.add(&r);
                if lines.send(Ok(line(&r))).await.is_err() {
                    return;
                }
            }
            totals.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            let _ = lines.send(Ok(line(&BatchEnd { totals }))).await;
        };
        tokio::join!(run, write);
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn line<T: serde::Serialize>(v: &T) -> bytes::Bytes {
    let mut s = serde_json::to_vec(v).unwrap_or_default();
    s.push(b'\n');
    s.into()
}

/// Check every item, and every session the items name, before anything
/// runs.
async fn validate(manager: &Manager, caller: &Caller, req: BatchRequest) -> Result<Vec<BatchJob>, ApiError> {
    let most = manager.max_batch_items().min(MAX_BATCH_ITEMS);
    if req.items.is_empty() || req.items.len() > most {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("a batch holds 1 to {most} items on this server, not {}", req.items.len()),
        )
        .with_param("items"));
    }
    let max = manager.max_exec_timeout();
    let runs = manager.languages();
    let mut jobs = Vec::with_capacity(req.items.len());
    let mut checked = std::collections::HashSet::new();
    for (index, item) in req.items.into_iter().enumerate() {
        let at = |field: &str| format!("items[{index}].{field}");
        let job = item_job(index, item, caller, max, &runs).map_err(|mut e| {
            e.param = Some(at(e.param.as_deref().unwrap_or("")).trim_end_matches('.').to_string());
            e
        })?;
        // A named session must be live and run the item's language: a
        // request's error now, not an item's failure later.
        if let Some(id) = &job.exec.session_id {
            if checked.insert((id.clone(), job.exec.language)) {
                manager.check_session(&caller.key_id, id, job.exec.language).await.map_err(|e| {
                    let api = e.to_api();
                    let field = at(api.param.as_deref().unwrap_or("session_id"));
                    api.with_param(field)
                })?;
            }
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// Whether the caller's key has room for the sessions `jobs` must hold at
/// once, `concurrency` items running at a time (the last check before
/// anything runs). A fresh item with `keep_session` holds its place from
/// its start to the end; the other fresh items end theirs as they go. One
/// at a time, each of those needs one place more than the kept items
/// before it; several at a time, a kept item may take the place an
/// earlier item is still waiting for, so they need one more than all the
/// kept items. A key whose own sessions leave less than that hears so now,
/// as an execute would (429 `too_many_sessions`), rather than after each
/// item has waited for room that only the caller can make.
async fn check_room(manager: &Manager, caller: &Caller, jobs: &[BatchJob], concurrency: usize) -> Result<(), ApiError> {
    let (mut kept, mut needed, mut others) = (0, 0, false);
    for job in jobs.iter().filter(|j| j.exec.session_id.is_none()) {
        if job.keep_session {
            kept += 1;
            needed = needed.max(kept);
        } else {
            others = true;
            needed = needed.max(kept + 1);
        }
    }
    if concurrency > 1 {
        needed = kept + usize::from(others);
    }
    if needed == 0 {
        return Ok(());
    }
    let room = manager.session_room(&caller.key_id, caller.max_sessions).await.map_err(|e| e.to_api())?;
    if room.live + needed <= room.most {
        return Ok(());
    }
    let (live, most) = (room.live, room.most);
    let why = if kept == 0 {
        "one for its items, which end their sessions as they go".to_string()
    } else if kept == needed {
        format!("one for each of its {kept} items with `keep_session`, held to the end")
    } else {
        "one for each item with `keep_session`, held to the end, and one for its other items".to_string()
    };
    Err(ApiError::new(
        ErrorCode::TooManySessions,
        format!(
            "this API key has {live} live sessions of the {most} it may hold, and this batch needs {needed} more at \
             once ({why}); end sessions you no longer need (DELETE /v1/tci/sessions/{{id}}) or keep fewer; nothing ran"
        ),
    )
    .with_param("items"))
}

/// One item as the session layer's job; errors name the field within the
/// item (the caller prefixes `items[i].`).
fn item_job(
    index: usize,
    item: BatchItem,
    caller: &Caller,
    max: Duration,
    runs: &[Language],
) -> Result<BatchJob, ApiError> {
    let request = ExecuteRequest {
        code: item.code,
        language: item.language,
        session_id: item.session_id,
        files: item.files,
        timeout: item.timeout,
        stream: None,
        memory_limit: item.memory_limit,
    };
    let mut exec = Exec::from_request(request, caller, runs)?;
    // One item among many: it yields the CPU to executes.
    exec.priority = kiln_sessions::Priority::Batch;
    let limit = |t: Option<f64>, field: &str| -> Result<Option<Duration>, ApiError> {
        match kiln_protocol::timeout_from_seconds(t).map_err(|e| e.with_param(field))? {
            Some(d) if d > max => Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("{field} must be a positive number of seconds, at most {}", max.as_secs_f64()),
            )
            .with_param(field)),
            d => Ok(d),
        }
    };
    limit(item.timeout, "timeout")?;
    let tests_timeout = limit(item.tests_timeout, "tests_timeout")?.unwrap_or(DEFAULT_TEST_TIMEOUT.min(max));
    let tests = item.tests.unwrap_or_default();
    if tests.len() > MAX_ITEM_TESTS {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("an item holds at most {MAX_ITEM_TESTS} tests, not {}", tests.len()),
        )
        .with_param("tests"));
    }
    let tests = tests
        .iter()
        .enumerate()
        .map(|(j, t)| {
            let kind =
                t.kind().map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e).with_param(format!("tests[{j}]")))?;
            // An assertion runs in the item's Python namespace; a program
            // runs in any language.
            if matches!(kind, TestKind::Assertion { .. }) && exec.language != Language::Python {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "an assertion test (code) runs on Python items only, and this item's language is {}; \
                         a program test (stdin, expected_stdout) runs in every language",
                        exec.language.as_str()
                    ),
                )
                .with_param(format!("tests[{j}]")));
            }
            Ok(kind)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BatchJob { index, exec, tests, tests_timeout, keep_session: item.keep_session.unwrap_or(false) })
}
