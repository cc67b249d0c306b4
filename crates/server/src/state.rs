//! What every handler can reach.

use crate::auth::KeyRing;
use kiln_sessions::Manager;
use std::sync::Arc;

/// The server's shared state.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The sessions.
    pub manager: Manager,
    /// Accepted API keys.
    pub keys: Arc<KeyRing>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// This node's part in a cluster (`--advertise`); `None` alone.
    pub cluster: Option<Arc<crate::peers::Cluster>>,
}
