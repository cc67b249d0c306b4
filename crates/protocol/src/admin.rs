//! Wire types of the admin endpoints (`/v1/admin/keys`): API keys as an
//! admin key sees them, never the keys themselves (only their ids), except
//! once, in the answer that created one.

use crate::NetworkPolicy;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One API key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct KeyInfo {
    /// `key_...`, stable, safe to show and log.
    pub id: String,
    /// Its label (`generated`, `configured`, or what its creator named it).
    pub label: String,
    /// When it was added.
    #[serde(with = "crate::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Whether it may use the admin endpoints.
    pub admin: bool,
    /// Its sessions' network policy; `null` is the server's.
    pub network: Option<NetworkPolicy>,
    /// Its own live-session limit; `null` is the server's per-key limit.
    pub max_sessions: Option<u64>,
    /// When it was revoked, if it was.
    #[serde(with = "crate::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `data` of `GET /v1/admin/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct KeyList {
    /// Every key, revoked ones included, oldest first.
    pub keys: Vec<KeyInfo>,
}

/// Body of `POST /v1/admin/keys`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A name to recognise it by (default `created`).
    #[serde(default)]
    pub label: Option<String>,
    /// Whether the new key may use the admin endpoints (default false).
    #[serde(default)]
    pub admin: bool,
    /// Its sessions' network policy (default: the server's); never wider
    /// than the server's `--network`.
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
    /// Its own live-session limit (default: the server's per-key limit).
    #[serde(default)]
    pub max_sessions: Option<u64>,
}

/// `data` of `POST /v1/admin/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct CreatedKey {
    /// The key itself, shown this once: kiln keeps only its hash.
    pub key: String,
    /// What was stored.
    pub record: KeyInfo,
}

/// `data` of `DELETE /v1/admin/keys/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct RevokedKey {
    /// The key's id.
    pub id: String,
    /// Always true.
    pub revoked: bool,
}
