//! This node's membership of a cluster: its lease, and what it knows of its
//! peers.
//!
//! At start the node registers a fresh incarnation under its node id with a
//! lease ([`Membership::join`]); a background task renews the lease every
//! third of its length, publishing the node's capacity and draining flag,
//! and reads the peers' rows every second. Routing decisions read that
//! cached table ([`Membership::owner`]), so a request costs no store lookup.
//! What placement decides on (ready kernels, live and maximum sessions) is
//! published within half a second of a change, not only at the next
//! renewal: once a burst empties a node's pool, its peers see it at their
//! next read of the table. Free memory, which moves all the time, waits
//! for the renewal.
//!
//! The lease fences the node: if it cannot renew before its lease runs out
//! (cut off from the store), its peers already answer `session_lost` for
//! its sessions, so it stops taking new sessions, ends the ones it has (so
//! they can never come back after being reported lost), and once the store
//! answers again registers as a new incarnation. A node that finds its row
//! taken by another incarnation (a second process started under the same
//! node id) stands down for good.

use crate::node::{owner_of, Identity};
use crate::{Manager, Readiness};
use chrono::{DateTime, Utc};
use kiln_store::{Capacity, NodeRecord, Store, StoreError};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// Who holds a session, by its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node, this incarnation.
    Local,
    /// A live peer.
    Peer(NodeRecord),
    /// A node that was lost (its lease ran out, or it restarted since).
    Lost {
        /// The node's id.
        node: String,
    },
    /// The id names no node known here (an older id, or not an id of this
    /// cluster).
    Unknown,
}

/// This node in the cluster.
#[derive(Debug)]
pub struct Membership {
    manager: Manager,
    store: Arc<dyn Store>,
    advertise: Option<String>,
    lease: Duration,
    state: RwLock<State>,
    stop: watch::Sender<bool>,
}

#[derive(Debug)]
struct State {
    /// Until when the lease this node last wrote holds.
    valid_until: DateTime<Utc>,
    /// Every node's row, as last read.
    nodes: Vec<NodeRecord>,
    draining: bool,
    /// Another process took this node id: this one stands down for good.
    replaced: bool,
    /// The lease ran out unrenewed; sessions were ended, a new incarnation
    /// is registered when the store answers.
    lapsed: bool,
    /// What placement reads of this node, as last written to the store.
    published: Option<Offer>,
}

/// The part of a node's capacity that placement decides on: a change in it
/// is published at once (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Offer {
    ready_kernels: u64,
    live_sessions: u64,
    max_sessions: u64,
}

impl From<&Capacity> for Offer {
    fn from(c: &Capacity) -> Offer {
        Offer { ready_kernels: c.ready_kernels, live_sessions: c.live_sessions, max_sessions: c.max_sessions }
    }
}

/// Memory this node could still give to sessions: the host's, or less
/// where kiln's cgroup (its pod's) has a limit (see
/// [`kiln_sandbox::memory_available`]).
pub use kiln_sandbox::memory_available;

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::seconds(6))
}

impl Membership {
    /// Register this node (a fresh incarnation) with a lease of `lease`,
    /// reachable by its peers at `advertise`, and keep the lease renewed
    /// until [`Membership::leave`].
    pub async fn join(
        manager: Manager,
        store: Arc<dyn Store>,
        advertise: Option<String>,
        lease: Duration,
    ) -> Result<Arc<Membership>, StoreError> {
        let identity = Identity::new(store.node_id());
        manager.join_cluster(identity);
        let m = Arc::new(Membership {
            manager,
            store,
            advertise,
            lease,
            state: RwLock::new(State {
                valid_until: Utc::now(),
                nodes: Vec::new(),
                draining: false,
                replaced: false,
                lapsed: false,
                published: None,
            }),
            stop: watch::channel(false).0,
        });
        let rec = m.record().await;
        m.store.put_node(&rec).await?;
        {
            let mut st = m.write();
            st.valid_until = rec.lease_expires_at;
            st.published = Some(Offer::from(&rec.capacity));
        }
        m.refresh().await;
        tracing::info!(node = %rec.id, tag = %rec.tag, incarnation = %rec.incarnation, advertise = ?rec.advertise,
            lease = ?lease, "joined the cluster");
        tokio::spawn(run(Arc::downgrade(&m), m.stop.subscribe()));
        Ok(m)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's row as it would write it now.
    async fn record(&self) -> NodeRecord {
        let me = self.manager.identity();
        let offer = self.offer().await;
        let draining = self.read().draining;
        NodeRecord {
            id: me.node_id,
            tag: me.tag,
            incarnation: me.incarnation,
            advertise: self.advertise.clone(),
            lease_expires_at: Utc::now() + chrono(self.lease),
            draining,
            capacity: Capacity {
                ready_kernels: offer.ready_kernels,
                live_sessions: offer.live_sessions,
                max_sessions: offer.max_sessions,
                memory_available_bytes: memory_available(),
            },
        }
    }

    /// What placement would read of this node now.
    async fn offer(&self) -> Offer {
        let (ready, _) = self.manager.pool_level().await;
        // A node still provisioning has nothing to offer yet.
        let serving = self.manager.readiness() == Readiness::Ready;
        Offer {
            ready_kernels: if serving { ready as u64 } else { 0 },
            live_sessions: self.manager.live_count() as u64,
            max_sessions: if serving { self.manager.max_sessions() as u64 } else { 0 },
        }
    }

    /// Whether placement would now read something other than what this
    /// node last published.
    async fn offer_changed(&self) -> bool {
        let offer = self.offer().await;
        self.read().published != Some(offer)
    }

    /// Read every node's row again (kept as it was if the store fails).
    pub async fn refresh(&self) {
        match self.store.nodes().await {
            Ok(nodes) => self.write().nodes = nodes,
            Err(e) => tracing::debug!(error = %e, "could not read the cluster's nodes; using the last list"),
        }
    }

    /// Who holds session `id`, from the cached table.
    pub fn owner(&self, id: &str) -> Owner {
        let Some((tag, incarnation)) = owner_of(id) else {
            return Owner::Unknown;
        };
        let me = self.manager.identity();
        if tag == me.tag {
            // Past its own lease this node's sessions are lost, even before
            // the renewal task notices (the process may have been frozen).
            return if incarnation == me.incarnation && self.lease_holds() {
                Owner::Local
            } else {
                Owner::Lost { node: me.node_id }
            };
        }
        let now = Utc::now();
        match self.read().nodes.iter().find(|n| n.tag == tag) {
            None => Owner::Unknown,
            Some(n) if n.incarnation != incarnation || !n.is_alive(now) => Owner::Lost { node: n.id.clone() },
            Some(n) => Owner::Peer(n.clone()),
        }
    }

    /// Like [`Membership::owner`], after reading the table again (a peer
    /// did not answer: is it lost, or only slow?).
    pub async fn owner_fresh(&self, id: &str) -> Owner {
        self.refresh().await;
        self.owner(id)
    }

    /// Live peers that take new sessions, with an address, and room.
    pub fn candidates(&self) -> Vec<NodeRecord> {
        let me = self.manager.identity();
        let now = Utc::now();
        self.read()
            .nodes
            .iter()
            .filter(|n| {
                n.id != me.node_id
                    && n.is_alive(now)
                    && !n.draining
                    && n.advertise.is_some()
                    && n.capacity.free_sessions() > 0
            })
            .cloned()
            .collect()
    }

    /// Whether this node takes new sessions, and if not, why.
    pub fn taking(&self) -> Result<(), String> {
        match self.manager.refusing() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> String {
        self.manager.identity().node_id
    }

    /// Whether this node is draining.
    pub fn draining(&self) -> bool {
        self.read().draining
    }

    /// Every node's row, as last read.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.read().nodes.clone()
    }

    /// Stop taking new sessions (SIGTERM): say so in the lease at once, so
    /// that peers place new sessions elsewhere. Live sessions keep running.
    pub async fn drain(&self) {
        self.write().draining = true;
        self.manager.refuse_new_sessions(Some("the node is draining before it stops".into()));
        self.renew().await;
    }

    /// Leave the cluster (the node stops): the lease ends now, so peers
    /// answer `session_lost` for its sessions at once instead of after the
    /// lease.
    pub async fn leave(&self) {
        self.stop.send_replace(true);
        let mut rec = self.record().await;
        rec.draining = true;
        rec.lease_expires_at = Utc::now();
        if let Err(e) = self.store.renew_node(&rec).await {
            tracing::warn!(error = %e, "could not end this node's lease; peers will see it lapse");
        }
    }

    /// One renewal; handles a lapsed lease and a taken node id.
    async fn renew(&self) {
        let (lapsed, replaced) = {
            let st = self.read();
            (st.lapsed || Utc::now() >= st.valid_until, st.replaced)
        };
        if replaced {
            return;
        }
        if lapsed {
            return self.rejoin().await;
        }
        let rec = self.record().await;
        match self.store.renew_node(&rec).await {
            Ok(true) => {
                let mut st = self.write();
                st.valid_until = rec.lease_expires_at;
                st.published = Some(Offer::from(&rec.capacity));
            }
            Ok(false) => {
                self.write().replaced = true;
                tracing::error!(node = %rec.id, "another kiln process registered under this node id: this one takes \
                    no more sessions and ends its own (give every node its own --node-id)");
                self.manager.refuse_new_sessions(Some(format!(
                    "another kiln process registered as node {}; this one stands down",
                    rec.id
                )));
                // The process that took the node id marked this one's rows
                // lost when it started.
                self.manager.lose_all().await;
            }
            Err(e) => {
                let left = self.read().valid_until - Utc::now();
                tracing::warn!(error = %e, lease_left_ms = left.num_milliseconds(), "could not renew this node's lease");
            }
        }
    }

    /// The lease ran out unrenewed: the peers report this node's sessions
    /// lost, so end them here too, and once the store answers, register a
    /// new incarnation.
    async fn rejoin(&self) {
        let first = !std::mem::replace(&mut self.write().lapsed, true);
        if first {
            tracing::error!(
                "this node's lease ran out before it could be renewed (is the database reachable?): it \
                takes no new sessions, and its sessions are lost"
            );
            self.manager.refuse_new_sessions(Some("this node cannot renew its lease in the database".into()));
            let _ = self.store.end_all_open(Utc::now()).await;
            let ended = self.manager.lose_all().await;
            tracing::warn!(sessions = ended, "ended the sessions of the lapsed lease");
        }
        // Sessions whose end could not be written are marked lost now.
        if self.store.end_all_open(Utc::now()).await.is_err() {
            return;
        }
        let identity = Identity::new(self.store.node_id());
        self.manager.join_cluster(identity);
        let rec = self.record().await;
        match self.store.put_node(&rec).await {
            Ok(()) => {
                let draining = {
                    let mut st = self.write();
                    st.valid_until = rec.lease_expires_at;
                    st.published = Some(Offer::from(&rec.capacity));
                    st.lapsed = false;
                    st.draining
                };
                if !draining {
                    self.manager.refuse_new_sessions(None);
                }
                tracing::info!(incarnation = %rec.incarnation, "registered again as a new incarnation");
            }
            Err(e) => tracing::warn!(error = %e, "could not register a new incarnation yet"),
        }
    }

    /// Whether this node's lease holds now (for `/readyz`).
    pub fn lease_holds(&self) -> bool {
        let st = self.read();
        !st.lapsed && !st.replaced && Utc::now() < st.valid_until
    }
}

/// Renew every third of the lease, or sooner when what placement reads of
/// this node changed, and read the peers every second, until told to stop
/// or the membership is dropped.
async fn run(m: std::sync::Weak<Membership>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renew = tokio::time::Instant::now();
    let mut last_read = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(m) = m.upgrade() else { return };
        if last_renew.elapsed() >= m.lease / 3 || !m.lease_holds() || m.offer_changed().await {
            last_renew = tokio::time::Instant::now();
            m.renew().await;
        }
        if last_read.elapsed() >= Duration::from_secs(1) {
            last_read = tokio::time::Instant::now();
            m.refresh().await;
        }
    }
}
