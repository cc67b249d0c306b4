//! This node's part in a cluster, as the routing needs it: the lease table
//! ([`Membership`]), the key that signs forwarded requests, and the HTTP
//! client that sends them to peers. The routing itself is in `cluster`.

use axum::http::Method;
use hmac::{Hmac, Mac};
use kiln_sessions::Membership;
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// This node's part in a cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The lease table and this node's place in it.
    pub membership: Arc<Membership>,
    /// HMAC-SHA256 keyed with the cluster secret, cloned for each use.
    keyed: Hmac<Sha256>,
    http: reqwest::Client,
}

impl Cluster {
    /// Route with `membership`, signing forwarded requests with `secret`.
    /// `peer_idle`: how long a peer keeps an unused connection open (its
    /// `--http-idle-timeout`; the nodes of a cluster share their settings).
    pub fn new(membership: Arc<Membership>, secret: &str, peer_idle: Duration) -> Result<Cluster, String> {
        if secret.len() < 16 {
            return Err("the cluster secret must be at least 16 characters".into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // Kept alive (no connection set-up per forward), but dropped
            // well before the peer would close it: a request sent on a
            // connection the peer is closing at that moment fails, and
            // would read as the peer being unreachable.
            .pool_idle_timeout(peer_idle / 2)
            .tcp_nodelay(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("could not set up the peer HTTP client: {e}"))?;
        let keyed = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|e| format!("cluster secret: {e}"))?;
        Ok(Cluster { membership, keyed, http })
    }

    /// The client that forwards to peers (connections kept alive).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub(crate) fn mac(&self, ts: i64, method: &Method, path: &str, caller: &str) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(format!("kiln-forward-v1\n{ts}\n{method}\n{path}\n{caller}").as_bytes());
        mac
    }
}
