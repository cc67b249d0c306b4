//! Wire types of kiln's own endpoints beside the TCI API: the languages the
//! server runs and its status, which the browser pages (and anyone without a
//! key) can read.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `data` of `GET /v1/tci/languages`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct LanguageList {
    /// The values `language` accepts, the default first.
    pub languages: Vec<String>,
    /// What an execute request without `language` runs.
    pub default: String,
}

/// `data` of `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ServerStatus {
    /// `ok`, `starting`, `failed` or `stopping` (as `/healthz` says).
    pub status: String,
    /// Why it is not `ok`, when it is not.
    pub message: Option<String>,
    /// kiln's version.
    pub version: String,
    /// The languages it runs.
    pub languages: Vec<String>,
    /// Live sessions and the server's limit.
    pub sessions: SessionCount,
    /// The warm pool of ready kernels.
    pub pool: PoolLevel,
}

/// Live sessions against the limit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct SessionCount {
    /// Live sessions now.
    pub live: u64,
    /// `--max-sessions`.
    pub max: u64,
}

/// The warm pool's level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct PoolLevel {
    /// Kernels ready to be handed to a new session.
    pub ready: u64,
    /// How many it is filling towards (it adapts to demand).
    pub target: u64,
}
