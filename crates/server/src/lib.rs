//! The HTTP API: routes, authentication, errors.
//!
//! [`app`] builds the whole service as one axum `Router` from an
//! [`AppState`]; the binary only binds it to a socket, and tests drive it
//! with `oneshot`. Every route is served under both `/tci/...` (curl
//! examples, the 1.x Python client) and `/v1/tci/...` (the 2.x Python and
//! npm clients), and runs of slashes collapse first, because the 1.x client
//! requests `/v1//tci/execute`.
//!
//! Errors leave through one type, [`AppError`], which maps every failure to a
//! status, a stable code and a message, hides internals, and logs once.
#![forbid(unsafe_code)]

mod admin;
mod auth;
mod batch;
mod body;
mod cluster;
mod console;
mod error;
mod execute;
mod files;
pub mod openapi;
mod ops;
mod peers;
mod placement;
mod require;
mod router;
mod sessions;
mod state;

pub use admin::generate_key;
pub use auth::{hash_key, KeyEntry, KeyRing};
pub use error::AppError;
pub use kiln_sessions::Caller;
pub use peers::Cluster;
pub use state::AppState;

use axum::extract::Request;
use axum::Router;

/// The whole API as a router.
pub fn app(state: AppState) -> Router {
    router::router(state)
}

/// Collapse runs of `/` in the request path (`/v1//tci/execute` →
/// `/v1/tci/execute`), keeping the query. Apply before routing.
pub fn normalize_path(mut req: Request) -> Request {
    let uri = req.uri();
    let path = uri.path();
    if !path.contains("//") {
        return req;
    }
    let mut clean = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && clean.ends_with('/')) {
            clean.push(c);
        }
    }
    if let Some(q) = uri.query() {
        clean.push('?');
        clean.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = clean.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(new) = axum::http::Uri::from_parts(parts) {
            *req.uri_mut() = new;
        }
    }
    req
}
