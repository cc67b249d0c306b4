//! `kiln nodes`: the nodes of a cluster as the shared store knows them,
//! for an operator (`kubectl exec kiln-0 -- kiln nodes` in a pod, which
//! has `KILN_DATABASE_URL`). Each node's row is what it last published: its
//! lease, its address, and the capacity placement decides on (ready kernels
//! and live sessions within half a second of a change, free memory at each
//! lease renewal).

use crate::admin::DataDir;
use crate::table::print_table;
use chrono::{DateTime, Utc};
use kiln_store::NodeRecord;

/// What a node is doing, from its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Alive and taking new sessions.
    Serving,
    /// Alive, still building its runtime or pool: it offers no places yet.
    Starting,
    /// Alive, serving its sessions but taking no new ones (SIGTERM).
    Draining,
    /// Its lease ended (it stopped, died or was cut off): its sessions
    /// answer `session_lost`.
    Gone,
}

impl State {
    fn of(n: &NodeRecord, now: DateTime<Utc>) -> State {
        if !n.is_alive(now) {
            State::Gone
        } else if n.draining {
            State::Draining
        } else if n.capacity.max_sessions == 0 {
            State::Starting
        } else {
            State::Serving
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            State::Serving => "serving",
            State::Starting => "starting",
            State::Draining => "draining",
            State::Gone => "gone",
        }
    }
}

/// Seconds from `now` to `at`, said the way a person reads it.
fn lease_text(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (at - now).num_milliseconds() as f64 / 1000.0;
    if secs >= 0.0 {
        format!("{secs:.1} s left")
    } else {
        format!("ended {:.0} s ago", -secs)
    }
}

pub async fn nodes(json: bool, data: DataDir) -> anyhow::Result<()> {
    let mut nodes = data.store().await?.nodes().await?;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let now = Utc::now();
    if json {
        let rows: Vec<_> = nodes
            .iter()
            .map(|n| {
                let c = &n.capacity;
                serde_json::json!({
                    "id": n.id, "state": State::of(n, now).as_str(), "advertise": n.advertise,
                    "incarnation": n.incarnation, "lease_expires_at": n.lease_expires_at.to_rfc3339(),
                    "ready_kernels": c.ready_kernels, "live_sessions": c.live_sessions,
                    "max_sessions": c.max_sessions, "memory_available_bytes": c.memory_available_bytes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if nodes.is_empty() {
        eprintln!(
            "no nodes: no kiln serve has registered in this database (nodes register when they share one: \
             kiln serve --database postgres://... --advertise URL)"
        );
        return Ok(());
    }
    let rows = nodes
        .iter()
        .map(|n| {
            let c = &n.capacity;
            vec![
                n.id.clone(),
                State::of(n, now).as_str().to_string(),
                n.advertise.clone().unwrap_or_else(|| "-".into()),
                c.ready_kernels.to_string(),
                format!("{} of {}", c.live_sessions, c.max_sessions),
                format!("{} MiB", c.memory_available_bytes >> 20),
                lease_text(n.lease_expires_at, now),
                n.incarnation.clone(),
            ]
        })
        .collect();
    print_table(&["NODE", "STATE", "ADVERTISE", "READY", "SESSIONS", "MEMORY FREE", "LEASE", "INCARNATION"], rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_store::Capacity;

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
        assert_eq!(State::of(&node(-1, false, 8, now), now), State::Gone);
        assert_eq!(State::of(&node(-1, true, 8, now), now), State::Gone);
        assert_eq!(State::of(&node(0, false, 8, now), now), State::Gone);
    }

    #[test]
    fn a_live_node_is_draining_starting_or_serving() {
        let now = Utc::now();
        assert_eq!(State::of(&node(5, true, 8, now), now), State::Draining);
        assert_eq!(State::of(&node(5, false, 0, now), now), State::Starting);
        assert_eq!(State::of(&node(5, false, 8, now), now), State::Serving);
    }

    #[test]
    fn the_lease_reads_as_time_left_or_time_since_it_ended() {
        let now = Utc::now();
        assert_eq!(lease_text(now + chrono::Duration::milliseconds(4_340), now), "4.3 s left");
        assert_eq!(lease_text(now - chrono::Duration::seconds(12), now), "ended 12 s ago");
    }
}
