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
use kiln_protocol::{NodeInfo, NodeState};

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

    /// What it is doing at `now`, from what it last published.
    pub fn state(&self, now: DateTime<Utc>) -> NodeState {
        if !self.is_alive(now) {
            NodeState::Gone
        } else if self.draining {
            NodeState::Draining
        } else if self.capacity.max_sessions == 0 {
            NodeState::Starting
        } else {
            NodeState::Serving
        }
    }

    /// As the admin API and `kiln nodes` show it at `now`.
    pub fn info(&self, now: DateTime<Utc>) -> NodeInfo {
        let c = &self.capacity;
        NodeInfo {
            id: self.id.clone(),
            state: self.state(now),
            advertise: self.advertise.clone(),
            incarnation: self.incarnation.clone(),
            lease_expires_at: self.lease_expires_at,
            ready_kernels: c.ready_kernels,
            live_sessions: c.live_sessions,
            max_sessions: c.max_sessions,
            memory_available_bytes: c.memory_available_bytes,
        }
    }
}

/// Every node of `nodes` as the admin API and `kiln nodes` show them at
/// `now`, in the order of their ids.
pub fn node_infos(nodes: &[NodeRecord], now: DateTime<Utc>) -> Vec<NodeInfo> {
    let mut infos: Vec<NodeInfo> = nodes.iter().map(|n| n.info(now)).collect();
    infos.sort_by(|a, b| a.id.cmp(&b.id));
    infos
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(expires_in_secs: i64, draining: bool, max_sessions: u64, now: DateTime<Utc>) -> NodeRecord {
        NodeRecord {
            id: "n".into(),
            tag: "abcd".into(),
            incarnation: "xyz123".into(),
            advertise: None,
            lease_expires_at: now + chrono::Duration::seconds(expires_in_secs),
            draining,
            capacity: Capacity { max_sessions, ..Capacity::default() },
        }
    }

    #[test]
    fn a_node_is_gone_once_its_lease_ended_whatever_it_said_before() {
        let now = Utc::now();
        assert_eq!(node(-1, false, 8, now).state(now), NodeState::Gone);
        assert_eq!(node(-1, true, 8, now).state(now), NodeState::Gone);
        assert_eq!(node(0, false, 8, now).state(now), NodeState::Gone);
    }

    #[test]
    fn a_live_node_is_draining_starting_or_serving() {
        let now = Utc::now();
        assert_eq!(node(5, true, 8, now).state(now), NodeState::Draining);
        assert_eq!(node(5, false, 0, now).state(now), NodeState::Starting);
        assert_eq!(node(5, false, 8, now).state(now), NodeState::Serving);
    }

    #[test]
    fn node_infos_lists_every_node_by_id_with_its_state() {
        let now = Utc::now();
        let named =
            |id: &str, expires_in_secs: i64| NodeRecord { id: id.into(), ..node(expires_in_secs, false, 8, now) };
        let infos = node_infos(&[named("node-b", 10), named("node-a", -1), named("node-c", 10)], now);
        let ids: Vec<&str> = infos.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["node-a", "node-b", "node-c"]);
        assert_eq!(infos[0].state, NodeState::Gone);
        assert_eq!(infos[1].state, NodeState::Serving);
    }
}
