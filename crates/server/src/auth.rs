//! Bearer API keys.
//!
//! Only SHA-256 hashes of keys are held, here and in the store. A presented
//! key is hashed and compared with every known hash in constant time, with
//! no early exit, so neither the comparison nor the position of a match
//! leaks through timing.

use crate::error::AppError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use kiln_protocol::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};
use std::sync::RwLock;
use subtle::ConstantTimeEq;

/// The id of the key that authenticated a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(pub String);

/// SHA-256 of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The accepted keys, as `(id, hash)`.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: RwLock<Vec<(String, [u8; 32])>>,
}

impl KeyRing {
    /// A ring of these keys.
    pub fn new(keys: Vec<(String, [u8; 32])>) -> Self {
        KeyRing { keys: RwLock::new(keys) }
    }

    /// The id of the key `presented`, if it is accepted.
    pub fn authenticate(&self, presented: &str) -> Option<String> {
        let h = hash_key(presented);
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for (id, known) in keys.iter() {
            if bool::from(known.ct_eq(&h)) {
                found = Some(id.clone());
            }
        }
        found
    }
}

/// Middleware: require `Authorization: Bearer <key>`.
pub(crate) async fn require_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
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
        Some(id) => {
            req.extensions_mut().insert(KeyId(id));
            Ok(next.run(req).await)
        }
        None => Err(unauthorized("invalid API key: check the key kiln printed at its first start (stored in <data-dir>/api-key) or the --api-key you configured")),
    }
}

fn unauthorized(msg: &str) -> AppError {
    AppError::Api(ApiError::new(ErrorCode::Unauthorized, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_known_key_authenticates_and_yields_its_id() {
        let ring = KeyRing::new(vec![("key_a".into(), hash_key("secret-a")), ("key_b".into(), hash_key("secret-b"))]);
        assert_eq!(ring.authenticate("secret-b").as_deref(), Some("key_b"));
        assert_eq!(ring.authenticate("secret-c"), None);
        assert_eq!(ring.authenticate(""), None);
    }
}
