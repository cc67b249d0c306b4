//! Network egress for sessions, by policy.
//!
//! A session's network namespace has no interface but loopback, so nothing
//! leaves it directly. When its policy allows some egress, the session gets
//! an HTTP proxy address inside (`127.0.0.1:3128`): a listener of its own
//! ([`Port`]) that the server made in the sandbox's network namespace and
//! holds, so no process of the sandbox's relays for it (an earlier design
//! forked a forwarder per session: another copy of the kernel's address
//! space, a third of a fresh session's cost). kiln answers each
//! connection: it reads a
//! `CONNECT host:port` ([`request`], strict), asks the session's [`Policy`]
//! whether the name and port may be reached at all, resolves the name, and
//! connects only to addresses that are public by range and not this host's
//! own ([`policy`]), then relays bytes both ways ([`tunnel`]):
//!
//! - `registries` (once `pypi`): only the package index hosts this
//!   machine's pip is configured to use and its npm's registry, port 443;
//! - `full`: any host, ports 80 and 443.
//!
//! One session cannot take egress from another, nor descriptors from the
//! server: each has its own socket and at most [`Limits::connections`] open
//! connections (one more is accepted only to be told so, and closed); a
//! request head must arrive within [`Limits::head_timeout`], and a tunnel
//! closes when idle for [`Limits::idle_timeout`] or after
//! [`Limits::max_duration`]. Name lookups are bounded for the whole server.
//! The accept loop outlives running out of descriptors (see [`port`]).

pub mod policy;
mod port;
pub mod request;
mod tunnel;

/// The port of the proxy inside each session.
pub const PROXY_PORT: u16 = 3128;

pub use policy::{is_public, Policy};
pub use port::Port;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Name lookups in flight at once, for the whole server (each holds a
/// thread of the blocking pool).
const MAX_LOOKUPS: usize = 64;

/// Bounds on one session's egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections a session may have open through its proxy at once.
    pub connections: usize,
    /// Time for a connection to send its whole `CONNECT` head.
    pub head_timeout: Duration,
    /// Time to resolve and connect upstream.
    pub connect_timeout: Duration,
    /// A tunnel with no byte moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// A tunnel is closed after this long, busy or not.
    pub max_duration: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 64,
            head_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_duration: Duration::from_secs(3600),
        }
    }
}

impl Limits {
    /// Descriptors the server may hold for one session's egress at most:
    /// the listener, two per open tunnel (the session's end and upstream),
    /// and the one connection past the cap being refused.
    pub fn fds_per_session(&self) -> u64 {
        2 + 2 * self.connections as u64
    }
}

/// The host side of every session's egress (cheap to clone).
#[derive(Debug, Clone)]
pub struct Egress {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) lookups: Arc<Semaphore>,
    /// When the last "out of descriptors" warning was logged (ms since
    /// the epoch): at most one every ten seconds for the whole server.
    warned_at: AtomicU64,
    /// Times an accept loop paused for lack of descriptors or memory.
    pauses: AtomicU64,
}

impl Shared {
    pub(crate) fn warn_exhausted(&self, e: &std::io::Error) {
        self.pauses.fetch_add(1, Ordering::Relaxed);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let last = self.warned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self.warned_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(error = %e, "egress: cannot accept connections for now; retrying");
        }
    }
}

impl Egress {
    /// Egress with these limits.
    pub fn new(limits: Limits) -> Egress {
        Egress {
            shared: Arc::new(Shared {
                limits,
                lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
                warned_at: AtomicU64::new(0),
                pauses: AtomicU64::new(0),
            }),
        }
    }

    /// The limits every port gets.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// How many times an accept loop has had to pause because the server
    /// was out of descriptors or memory (each pause is logged, at most one
    /// line per ten seconds).
    pub fn accept_pauses(&self) -> u64 {
        self.shared.pauses.load(Ordering::Relaxed)
    }

    /// Serve a session's `listener` (see `Sandbox::listen_inside`) under
    /// `policy` until the [`Port`] is dropped. Must be called within the
    /// tokio runtime.
    pub fn open(&self, listener: std::net::TcpListener, policy: Arc<Policy>) -> std::io::Result<Port> {
        Port::open(listener, policy, self.shared.clone())
    }
}
