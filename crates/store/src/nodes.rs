//! The nodes of a cluster as the store keeps them: who is alive (a lease),
//! where peers reach it, and how much room it has.
//!
//! Every `kiln serve` registers one row under its node id with a fresh
//! random incarnation, then renews its lease every couple of seconds. The
//! row is the whole of the cluster's membership: a peer is alive while its
//! lease has not expired, and a session belongs to the node *and the
//! incarnation* that created it, so a node that restarts (new incarnation)
//! or stops renewing has lost its sessions, and everybody can tell.

use chrono::{DateTime, Utc};

/// Room a node has for new sessions, as it last published it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Kernels booted and waiting in its warm pool.
    pub ready_kernels: u64,
    /// Sessions it runs.
    pub live_sessions: u64,
    /// Sessions it may run (`--max-sessions`).
    pub max_sessions: u64,
    /// Memory the host has available, bytes.
    pub memory_available_bytes: u64,
}

impl Capacity {
    /// Sessions it could still start.
    pub fn free_sessions(&self) -> u64 {
        self.max_sessions.saturating_sub(self.live_sessions)
    }
}

/// One node's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its name (`--node-id`).
    pub id: String,
    /// The short tag session ids carry to name it.
    pub tag: String,
    /// Random per process start: a restarted node is a new incarnation.
    pub incarnation: String,
    /// Where peers reach its API (`--advertise`), if it takes forwarded
    /// requests.
    pub advertise: Option<String>,
    /// Alive until then, unless renewed.
    pub lease_expires_at: DateTime<Utc>,
    /// Draining: serving its sessions but taking no new ones.
    pub draining: bool,
    /// Its room, as of its last renewal.
    pub capacity: Capacity,
}

impl NodeRecord {
    /// Whether its lease still holds at `now`.
    pub fn is_alive(&self, now: DateTime<Utc>) -> bool {
        self.lease_expires_at > now
    }
}
