//! Bearer API keys.
//!
//! Only SHA-256 hashes of keys are held, here and in the store. A presented
//! key is hashed and compared with every known hash in constant time, with
//! no early exit, so neither the comparison nor the position of a match
//! leaks through timing.

use crate::error::AppError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use kiln_protocol::{ApiError, ErrorCode};
use kiln_sessions::{Caller, NetworkPolicy};
use sha2::{Digest, Sha256};
use std::sync::RwLock;
use subtle::ConstantTimeEq;

/// SHA-256 of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// One accepted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Its id.
    pub id: String,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Its own network policy, if not the server's.
    pub network: Option<NetworkPolicy>,
    /// Its own live-session limit.
    pub max_sessions: Option<u64>,
}

/// The accepted keys.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: RwLock<Vec<KeyEntry>>,
}

impl KeyRing {
    /// A ring of these keys.
    pub fn new(keys: Vec<KeyEntry>) -> Self {
        KeyRing { keys: RwLock::new(keys) }
    }

    /// Replace the accepted keys (after keys were created or revoked).
    pub fn replace(&self, keys: Vec<KeyEntry>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// Who presented `presented`, if it is an accepted key.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let h = hash_key(presented);
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for k in keys.iter() {
            if bool::from(k.hash.ct_eq(&h)) {
                found = Some(Caller { key_id: k.id.clone(), network: k.network, max_sessions: k.max_sessions });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_known_key_authenticates_and_yields_its_id() {
        let entry =
            |id: &str, key: &str, network| KeyEntry { id: id.into(), hash: hash_key(key), network, max_sessions: None };
        let ring =
            KeyRing::new(vec![entry("key_a", "secret-a", None), entry("key_b", "secret-b", Some(NetworkPolicy::None))]);
        assert_eq!(
            ring.authenticate("secret-b"),
            Some(Caller { key_id: "key_b".into(), network: Some(NetworkPolicy::None), max_sessions: None })
        );
        assert_eq!(ring.authenticate("secret-c"), None);
        assert_eq!(ring.authenticate(""), None);
    }
}
