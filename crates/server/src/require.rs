//! The key check in front of every authenticated route: a Bearer key is
//! looked up in the server's [`KeyRing`](crate::auth::KeyRing), and the
//! caller it names travels with the request to the handlers.

use crate::error::AppError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use kiln_protocol::{ApiError, ErrorCode};

/// Middleware: require `Authorization: Bearer <key>`.
pub(crate) async fn require_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    // A peer forwarding a request it authenticated (see `cluster`).
    let target = req.uri().path_and_query().map_or_else(|| req.uri().path().to_string(), |pq| pq.as_str().to_string());
    if let Some(caller) = crate::cluster::forwarded_caller(&state, req.headers(), req.method(), &target) {
        req.extensions_mut().insert(caller?);
        req.extensions_mut().insert(crate::cluster::Forwarded);
        return Ok(next.run(req).await);
    }
    let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::trim);
    let token = match header {
        None => {
            return Err(unauthorized("missing Authorization header: send `Authorization: Bearer <your kiln API key>`"))
        }
        Some(h) => match h.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => t.trim(),
            _ => {
                return Err(unauthorized(
                    "malformed Authorization header: use `Authorization: Bearer <your kiln API key>`",
                ))
            }
        },
    };
    match state.keys.authenticate(token) {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            Ok(next.run(req).await)
        }
        None => Err(unauthorized("invalid API key: check the key kiln printed at its first start (stored in <data-dir>/api-key) or the --api-key you configured")),
    }
}

fn unauthorized(msg: &str) -> AppError {
    AppError::Api(ApiError::new(ErrorCode::Unauthorized, msg))
}
