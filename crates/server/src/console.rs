//! Endpoints the browser pages read without a key: which languages the
//! server runs (the playground's language picker) and the server's status
//! (the console's health and pool panel). They hold what `/healthz` and
//! `/metrics` already show to anyone, in one JSON document.

use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use kiln_protocol::{Envelope, Language, LanguageList, PoolLevel, ServerStatus, SessionCount};
use kiln_sessions::Readiness;

/// The languages this server runs.
///
/// Also served at `/tci/languages`. No key needed.
#[utoipa::path(get, path = "/v1/tci/languages", operation_id = "list_languages", tag = "execute", responses(
    (status = 200, description = "The values `language` accepts; the default first", body = Envelope<LanguageList>),
))]
pub(crate) async fn languages(State(state): State<AppState>) -> Json<Envelope<LanguageList>> {
    Json(Envelope::ok(language_list(&state.manager.languages())))
}

/// What the runtime runs; before it is ready, the default alone.
fn language_list(runs: &[Language]) -> LanguageList {
    let runs = if runs.is_empty() { &[Language::Python][..] } else { runs };
    LanguageList {
        languages: runs.iter().map(|l| l.as_str().to_string()).collect(),
        default: Language::Python.as_str().to_string(),
    }
}

/// The server's health, session count and warm pool, as JSON.
///
/// Always a 200 (it is a report, not a probe: use `/readyz` for that). No
/// key needed.
#[utoipa::path(get, path = "/v1/status", operation_id = "status", tag = "operations", responses(
    (status = 200, description = "Health, sessions and pool", body = Envelope<ServerStatus>),
))]
pub(crate) async fn status(State(state): State<AppState>) -> Json<Envelope<ServerStatus>> {
    let m = &state.manager;
    let (status, message) = match m.readiness() {
        Readiness::Ready => ("ok", None),
        Readiness::Starting => ("starting", Some("provisioning the runtime or booting the first kernel".to_string())),
        Readiness::Failed(msg) => ("failed", Some(msg)),
        Readiness::Stopping => ("stopping", None),
    };
    let (ready, target) = m.pool_level().await;
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    Json(Envelope::ok(ServerStatus {
        status: status.to_string(),
        message,
        version: env!("CARGO_PKG_VERSION").to_string(),
        languages: language_list(&m.languages()).languages,
        sessions: SessionCount { live: count(m.live_count()), max: count(m.max_sessions()) },
        pool: PoolLevel { ready: count(ready), target: count(target) },
    }))
}
