//! `POST /v1/tci/execute`: run code in a new or existing session, answered
//! as one JSON document, or streamed as Server-Sent Events while it runs
//! (`"stream": true` or `Accept: text/event-stream`).
//!
//! A stream starts once the session is known, so a request that fails
//! before running (bad session, no capacity) still gets its usual status
//! and error envelope. Then: `event: session`, one event per output as the
//! kernel produces it (`stdout`, `stderr`, `display_data`, `execute_result`,
//! `error`, and `clear_output`), `: keep-alive` comments during silence, and
//! last `event: done` carrying exactly the envelope a plain call returns (or
//! `event: failed` with an error envelope: `error` is the name of an error
//! output, a traceback). A client that disconnects
//! interrupts its cell, as with a plain call.

use crate::body::BoundedJson;
use crate::error::AppError;
use crate::state::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_protocol::{ApiError, Envelope, ErrorCode, ErrorEnvelope, ExecEvent, ExecuteData, ExecuteRequest};
use kiln_sessions::{Caller, Exec, Manager, SessionError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

/// How often a silent stream carries a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Run code in a new session, or in `session_id`'s.
///
/// Also served at `/tci/execute`. An exception in the code is a 200 with an
/// `error` output, not a failed request. With `"stream": true` (or
/// `Accept: text/event-stream`) the answer is a stream of Server-Sent
/// Events: `session`, then one event per output (`stdout`, `stderr`,
/// `display_data`, `execute_result`, `error`, `clear_output`) as it is
/// produced, and finally `done` with the same envelope a plain call returns
/// (or `failed` with an error envelope).
#[utoipa::path(
    post, path = "/v1/tci/execute", operation_id = "execute", tag = "execute",
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "The code ran (it may have raised: see `status` and the `error` outputs). \
            Streamed: `text/event-stream`, each event's `data` a JSON object: `session` {session_id}; an output \
            event (`stdout`, `stderr`, `display_data`, `execute_result`, `error`) {type, data} as in `outputs`; \
            `clear_output` {wait}; last `done` with the complete envelope, or `failed` with an error envelope.",
            content(
                (Envelope<ExecuteData> = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "Bad JSON, fields, language (`unsupported_language`), files, timeout or \
            memory_limit", body = ErrorEnvelope),
        (status = 401, description = "Missing or unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such session for this key", body = ErrorEnvelope),
        (status = 409, description = "A file name collides with another entry or with what is in the working \
            directory (`file_conflict`), or the session runs another language (`language_mismatch`); nothing was \
            written or run", body = ErrorEnvelope),
        (status = 410, description = "The session has ended: start a new one", body = ErrorEnvelope),
        (status = 413, description = "Body over the limit", body = ErrorEnvelope),
        (status = 429, description = "This key is at its session limit (`too_many_sessions`), or has as many executions running and waiting as it may (`rate_limited`, with `Retry-After`)", body = ErrorEnvelope),
        (status = 503, description = "No capacity, not ready, shutting down, or no kernel could start", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn execute(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    BoundedJson(req): BoundedJson<ExecuteRequest>,
) -> Result<Response, AppError> {
    let streamed = req.stream.unwrap_or(false) || accepts_event_stream(&headers);
    let exec = Exec::from_request(req, &caller, &state.manager.languages())?;
    if streamed {
        return stream(state.manager, caller.key_id, exec).await;
    }
    let data = state.manager.execute(&caller.key_id, exec).await?;
    Ok(Json(Envelope::ok(data)).into_response())
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("text/event-stream")))
}

/// What the pump hands the response: an event, or a failure.
enum Pumped {
    Event(Event),
    Failed(SessionError),
}

/// Run `exec` streamed. Answers with the request's error if it fails before
/// its session is known, with the event stream otherwise.
async fn stream(manager: Manager, key_id: String, mut exec: Exec) -> Result<Response, AppError> {
    let (events_tx, events) = mpsc::unbounded_channel();
    exec.events = Some(events_tx);
    // Bounded: a client that reads slowly holds the pump, not memory.
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(pump(manager, key_id, exec, events, tx));
    match rx.recv().await {
        Some(Pumped::Event(first)) => {
            let rest = tokio_stream::wrappers::ReceiverStream::new(rx).map(|p| match p {
                Pumped::Event(e) => e,
                Pumped::Failed(e) => failure(&e),
            });
            let all = tokio_stream::once(first).chain(rest).map(Ok::<_, std::convert::Infallible>);
            Ok(Sse::new(all).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive")).into_response())
        }
        Some(Pumped::Failed(e)) => Err(e.into()),
        None => Err(ApiError::new(ErrorCode::InternalError, "the execution ended without an answer").into()),
    }
}

/// Run the execution and turn what it produces into events for `tx`, until
/// it ends or the client goes away (then dropping the execution cancels
/// it, which interrupts the cell).
async fn pump(
    manager: Manager,
    key_id: String,
    exec: Exec,
    mut events: mpsc::UnboundedReceiver<ExecEvent>,
    tx: mpsc::Sender<Pumped>,
) {
    let run = manager.execute(&key_id, exec);
    tokio::pin!(run);
    let mut open = true;
    let result = loop {
        tokio::select! {
            biased;
            _ = tx.closed() => return,
            event = events.recv(), if open => match event {
                Some(e) => {
                    if tx.send(Pumped::Event(sse(&e))).await.is_err() {
                        return;
                    }
                }
                None => open = false,
            },
            result = &mut run => break result,
        }
    };
    while let Ok(e) = events.try_recv() {
        if tx.send(Pumped::Event(sse(&e))).await.is_err() {
            return;
        }
    }
    let last = match result {
        Ok(data) => {
            let envelope = serde_json::to_string(&Envelope::ok(data)).unwrap_or_default();
            Pumped::Event(Event::default().event("done").data(envelope))
        }
        Err(e) => Pumped::Failed(e),
    };
    let _ = tx.send(last).await;
}

fn sse(e: &ExecEvent) -> Event {
    Event::default().event(e.name()).data(e.data().to_string())
}

/// A failure after the stream began, as a `failed` event.
fn failure(e: &SessionError) -> Event {
    let api = e.to_api();
    if api.is_server_side() {
        tracing::error!(code = %api.code, error = %e, "streamed request failed");
    }
    Event::default().event("failed").data(serde_json::to_string(&api.envelope()).unwrap_or_default())
}
