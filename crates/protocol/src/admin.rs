//! Wire types of the admin endpoints: API keys as an admin key sees them
//! (`/v1/admin/keys`), never the keys themselves (only their ids), except
//! once, in the answer that created one; and a cluster's nodes
//! (`/v1/admin/nodes`, and `kiln nodes --json`).

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
    /// Its own limit of executions at once; `null` is the server's
    /// `--max-executions-per-key`.
    pub max_executions_per_key: Option<u64>,
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
    /// A name to recognise it by (default `created`): 1 to 100 characters,
    /// no control character, not `configured` or `generated` (kiln's own).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 100, pattern = r"^(?!(?:configured|generated)$)[^\x00-\x1f\x7f-\x9f]+$")]
    pub label: Option<String>,
    /// Whether the new key may use the admin endpoints (default false).
    #[serde(default)]
    pub admin: bool,
    /// Its sessions' network policy (default: the server's); never wider
    /// than the server's `--network`.
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
    /// Its own live-session limit (default: the server's per-key limit).
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_sessions: Option<u64>,
    /// Its own limit of executions at once (default: the server's
    /// `--max-executions-per-key`); its queue of waiting executions scales
    /// with it as `--execution-queue-per-key` does with the server's.
    #[serde(default, deserialize_with = "executions_limit")]
    #[schema(minimum = 1, maximum = 100_000)]
    pub max_executions_per_key: Option<u64>,
}

/// The largest per-key session limit a key may be given.
pub const MAX_KEY_SESSIONS: u64 = 1_000_000;

/// The largest limit of executions at once a key may be given.
pub const MAX_KEY_EXECUTIONS: u64 = 100_000;

/// An optional whole number as JSON Schema counts one: `3` and `3.0` alike.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(n) if n.fract() == 0.0 && n >= 0.0 && n <= MAX_KEY_SESSIONS as f64 => Ok(Some(n as u64)),
        Some(n) => Err(serde::de::Error::custom(format!(
            "max_sessions must be a whole number from 1 to {MAX_KEY_SESSIONS}, not {n}"
        ))),
    }
}

/// `max_executions_per_key`: absent, `null`, or a whole number from 1 to
/// [`MAX_KEY_EXECUTIONS`]; anything else (`0`, `-1`, `2.5`, `"4"`) is
/// refused with a message naming the field.
fn executions_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    let refuse = |shown: &dyn std::fmt::Display| {
        serde::de::Error::custom(format!(
            "max_executions_per_key must be a whole number from 1 to {MAX_KEY_EXECUTIONS} (or null for the \
             server's --max-executions-per-key), not {shown}"
        ))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f >= 1.0 && f <= MAX_KEY_EXECUTIONS as f64 => Ok(Some(f as u64)),
            _ => Err(refuse(&n)),
        },
        Some(other) => Err(refuse(&other)),
    }
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

/// What a node of a cluster is doing, from its row in the shared database.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Alive and taking new sessions.
    Serving,
    /// Alive, still building its runtime or pool: it offers no places yet.
    Starting,
    /// Alive, serving its sessions but taking no new ones (it was told to
    /// stop).
    Draining,
    /// Its lease ended (it stopped, died or was cut off from the database):
    /// its sessions answer `session_lost`.
    Gone,
}

impl NodeState {
    /// As the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Serving => "serving",
            NodeState::Starting => "starting",
            NodeState::Draining => "draining",
            NodeState::Gone => "gone",
        }
    }
}

/// One node of a cluster, as it last published itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct NodeInfo {
    /// Its `--node-id`.
    pub id: String,
    /// What it is doing.
    pub state: NodeState,
    /// Where its peers reach it (`--advertise`).
    pub advertise: Option<String>,
    /// Random per start of its process: a restarted node is a new one.
    pub incarnation: String,
    /// Its lease holds until then unless renewed (every third of it).
    #[serde(with = "crate::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub lease_expires_at: chrono::DateTime<chrono::Utc>,
    /// Kernels booted and waiting in its warm pool.
    pub ready_kernels: u64,
    /// Sessions it runs.
    pub live_sessions: u64,
    /// Sessions it may run (`--max-sessions`; 0 while starting).
    pub max_sessions: u64,
    /// Memory it could still give to sessions, bytes.
    pub memory_available_bytes: u64,
}

/// `data` of `GET /v1/admin/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct NodeList {
    /// The node that answered (`null` when it is not part of a cluster).
    pub this_node: Option<String>,
    /// Every node the shared database knows, by id; empty when this server
    /// is not part of a cluster.
    pub nodes: Vec<NodeInfo>,
}
