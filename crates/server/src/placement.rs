//! Placement of a new session: which nodes to ask, in order, as a pure
//! function of what each published (`cluster` sends the request to them).
//!
//! A node is eligible when it has a free session place and the memory for
//! one more session ([`SESSION_HEADROOM`]). The receiving node keeps the
//! session when it is eligible and has a ready kernel (no hop, no boot).
//! Otherwise two random eligible peers are compared ("the power of two
//! choices": nearly the balance of asking all, at the cost of two) by ready
//! kernels, then free places, then free memory; peers with a ready kernel
//! are asked before this node, which comes next if it has room; the others
//! only when it has none.

use kiln_store::{Capacity, NodeRecord};
use rand::seq::SliceRandom;

/// Memory a node must have available to take one more session: an idle
/// session is ~12 MB (BENCHMARKS.md) but its kernel's start and first
/// imports take tens more, and its working set grows from there; below
/// this the host is one import away from the OOM killer, which would take
/// sessions that are already running.
pub(crate) const SESSION_HEADROOM: u64 = 256 << 20;

/// A node to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// The node that received the request.
    Here,
    /// A peer.
    Peer(NodeRecord),
}

/// Whether a node with `c` could take one more session. An unknown amount
/// of memory (0: the node could not read it) does not hold it back.
pub(crate) fn fits(c: &Capacity) -> bool {
    let memory = c.memory_available_bytes == 0 || c.memory_available_bytes >= SESSION_HEADROOM;
    c.free_sessions() > 0 && memory
}

/// Which nodes to ask for a new session, in order; empty when none can
/// take it. `here` is this node's capacity now (`None`: it takes no new
/// sessions); `peers` are the live, non-draining peers with an address.
pub(crate) fn plan(here: Option<&Capacity>, mut peers: Vec<NodeRecord>, rng: &mut impl rand::Rng) -> Vec<Target> {
    let here = here.filter(|c| fits(c));
    if here.is_some_and(|c| c.ready_kernels > 0) {
        return vec![Target::Here];
    }
    peers.retain(|n| fits(&n.capacity));
    peers.shuffle(rng);
    peers.truncate(2);
    // Better first: a ready kernel, then free places, then free memory.
    peers.sort_by_key(|n| {
        let c = &n.capacity;
        std::cmp::Reverse((c.ready_kernels > 0, c.free_sessions(), c.memory_available_bytes))
    });
    let (ready, cold): (Vec<_>, Vec<_>) = peers.into_iter().partition(|n| n.capacity.ready_kernels > 0);
    let mut order: Vec<Target> = ready.into_iter().map(Target::Peer).collect();
    if here.is_some() {
        order.push(Target::Here);
    } else {
        order.extend(cold.into_iter().map(Target::Peer));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const GIB: u64 = 1 << 30;

    fn cap(ready: u64, live: u64, max: u64, memory: u64) -> Capacity {
        Capacity { ready_kernels: ready, live_sessions: live, max_sessions: max, memory_available_bytes: memory }
    }

    fn peer(id: &str, c: Capacity) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            tag: id.into(),
            incarnation: "inc000".into(),
            advertise: Some(format!("http://{id}:8787")),
            lease_expires_at: chrono::Utc::now(),
            draining: false,
            capacity: c,
        }
    }

    fn ids(order: &[Target]) -> Vec<&str> {
        order
            .iter()
            .map(|t| match t {
                Target::Here => "here",
                Target::Peer(n) => n.id.as_str(),
            })
            .collect()
    }

    /// The plan for every seed of the two-choice sample.
    fn plans(here: Option<Capacity>, peers: &[NodeRecord]) -> Vec<Vec<String>> {
        (0..64)
            .map(|seed| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                ids(&plan(here.as_ref(), peers.to_vec(), &mut rng)).into_iter().map(String::from).collect()
            })
            .collect()
    }

    #[test]
    fn the_receiving_node_keeps_a_session_when_it_has_a_ready_kernel_a_place_and_memory() {
        let peers = [peer("b", cap(4, 0, 8, 20 * GIB))];
        for p in plans(Some(cap(1, 3, 8, 4 * GIB)), &peers) {
            assert_eq!(p, ["here"]);
        }
    }

    #[test]
    fn a_node_without_memory_for_one_more_session_is_never_asked() {
        let low = SESSION_HEADROOM - 1;
        // Here: a ready kernel and places, but no memory: a peer gets it.
        for p in plans(Some(cap(2, 0, 8, low)), &[peer("b", cap(0, 0, 8, 8 * GIB))]) {
            assert_eq!(p, ["b"]);
        }
        // A peer with ready kernels but no memory is left out, even with
        // nowhere else to go.
        for p in plans(None, &[peer("b", cap(5, 0, 8, low)), peer("c", cap(0, 7, 8, 2 * GIB))]) {
            assert_eq!(p, ["c"]);
        }
        for p in plans(Some(cap(1, 0, 8, low)), &[peer("b", cap(5, 0, 8, low))]) {
            assert!(p.is_empty(), "{p:?}");
        }
        // Exactly the headroom is enough; an unknown amount does not block.
        assert!(fits(&cap(0, 0, 1, SESSION_HEADROOM)));
        assert!(fits(&cap(0, 0, 1, 0)));
        assert!(!fits(&cap(0, 1, 1, 8 * GIB)), "no free place");
    }

    #[test]
    fn between_two_peers_more_free_memory_wins_when_kernels_and_places_tie() {
        let peers = [peer("b", cap(2, 1, 8, GIB)), peer("c", cap(2, 1, 8, 9 * GIB))];
        for p in plans(None, &peers) {
            assert_eq!(p, ["c", "b"]);
        }
        // Ready kernels come first, then places, before memory.
        let peers = [peer("b", cap(1, 1, 8, GIB)), peer("c", cap(0, 0, 8, 9 * GIB))];
        for p in plans(None, &peers) {
            assert_eq!(p, ["b", "c"]);
        }
        let peers = [peer("b", cap(0, 1, 8, 9 * GIB)), peer("c", cap(0, 0, 8, GIB))];
        for p in plans(None, &peers) {
            assert_eq!(p, ["c", "b"]);
        }
    }

    #[test]
    fn peers_with_a_ready_kernel_come_before_this_node_and_cold_peers_only_when_it_has_no_room() {
        let peers = [peer("warm", cap(1, 0, 8, 4 * GIB)), peer("cold", cap(0, 0, 8, 4 * GIB))];
        for p in plans(Some(cap(0, 0, 8, 4 * GIB)), &peers) {
            assert_eq!(p, ["warm", "here"]);
        }
        for p in plans(Some(cap(0, 8, 8, 4 * GIB)), &peers) {
            assert_eq!(p, ["warm", "cold"]);
        }
        for p in plans(None, &peers) {
            assert_eq!(p, ["warm", "cold"]);
        }
    }

    #[test]
    fn only_two_random_eligible_peers_are_compared_and_every_one_gets_its_turn() {
        let peers: Vec<NodeRecord> = (0..5).map(|i| peer(&format!("n{i}"), cap(0, 0, 8, 4 * GIB))).collect();
        let mut seen = std::collections::BTreeSet::new();
        for p in plans(None, &peers) {
            assert_eq!(p.len(), 2, "{p:?}");
            seen.extend(p);
        }
        assert_eq!(seen.len(), 5, "the sample is random: {seen:?}");
        // The sample is drawn among eligible peers only.
        let mut peers = peers;
        for n in &mut peers[..4] {
            n.capacity.memory_available_bytes = 1;
        }
        for p in plans(None, &peers) {
            assert_eq!(p, ["n4"]);
        }
    }
}
