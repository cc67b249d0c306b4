//! Session lifecycle: creation, a queue per session, expiry, the warm pool.
//!
//! A session is a kernel owned by one worker task. Requests for it are sent
//! to the worker's queue in arrival order and run one at a time, so two
//! requests to one session never interleave, while different sessions run
//! in parallel. The worker writes uploaded files, runs the cell, counts it in
//! the store, restarts the kernel if it died, and tears everything down when
//! the session expires or the server stops.
//!
//! New sessions take a ready kernel from the [`pool`] when one is there, so
//! a create costs a queue pop instead of a kernel boot.
//!
//! The parts point one way: the [`manager`] composes the [`registry`] of
//! live sessions, the kernel factory ([`boot`]), the [`pool`] and one
//! [`worker`] per session, which runs [`job`]s (a session's start, in
//! [`create`], borrows those parts); the factory knows nothing of sessions,
//! and no part knows of the manager.
//!
//! Every execution first passes [`admission`] (per-key places and queues,
//! fair between keys). A [`batch`] runs many items through the manager's
//! own operations, runs their tests in the session's language ([`runner`])
//! and scores them ([`scoring`]). What a request may
//! ask is checked once, in [`request`], for every way it arrives.
#![forbid(unsafe_code)]

mod admission;
mod api;
mod attempt;
mod batch;
mod boot;
mod browse;
mod create;
mod files;
mod job;
mod lanes;
mod manager;
pub mod membership;
pub mod metrics;
pub mod node;
mod pool;
mod registry;
mod request;
mod runner;
mod scoring;
mod stdlib;
mod worker;

pub use admission::Limits as AdmissionLimits;
pub use batch::{BatchJob, SessionRoom};
pub use browse::BrowseError;
pub use files::{write_files, FileWriteError};
pub use job::{Judged, Outcome, Priority};
pub use kiln_protocol::NetworkPolicy;
pub use manager::{Exec, Manager};
pub use membership::{memory_available, Membership, Owner};
pub use metrics::Metrics;
pub use node::Identity;

use std::path::PathBuf;
use std::time::Duration;

/// How sessions behave; every field is a server setting.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where session directories live (`<data-dir>/sessions`).
    pub sessions_dir: PathBuf,
    /// Lifetime of a session from its start.
    pub ttl: Duration,
    /// Time limit of an execution when the request names none.
    pub exec_timeout: Duration,
    /// Largest time limit a request may ask for.
    pub max_exec_timeout: Duration,
    /// Most items one batch may hold (at most `MAX_BATCH_ITEMS`).
    pub max_batch_items: usize,
    /// How long an interrupted cell has before its kernel is killed.
    pub interrupt_grace: Duration,
    /// Bytes of output kept per execution.
    pub max_output_bytes: usize,
    /// Ready kernels kept waiting for new sessions.
    pub pool_size: usize,
    /// Zygotes of the runtime, forked from in turn (at least one).
    pub zygotes: usize,
    /// Live sessions on this server.
    pub max_sessions: usize,
    /// Live sessions per API key.
    pub max_sessions_per_key: usize,
    /// Executions at once, per key and in all, and the per-key queue.
    pub admission: admission::Limits,
    /// How long a kernel may take to boot.
    pub boot_timeout: Duration,
    /// The kernel implementation.
    pub kernel: kiln_kernel::KernelKind,
    /// Sandbox every kernel (`None`: plain processes, for development only).
    pub sandbox: Option<kiln_sandbox::SandboxSpec>,
    /// What sessions may reach on the network (with a sandbox): the
    /// ceiling of every key's own policy.
    pub network: NetworkPolicy,
    /// Bounds on each session's egress (connections, timeouts).
    pub egress: kiln_sandbox::egress::Limits,
}

/// Whether the manager can serve sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The runtime is being provisioned or the first kernel is booting.
    Starting,
    /// Sessions can be served.
    Ready,
    /// Provisioning or the first boot failed; the message says why.
    Failed(String),
    /// Shutting down.
    Stopping,
}

/// Who is calling: the API key that authenticated a request, with the
/// settings that key carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id.
    pub key_id: String,
    /// Overrides the server's network policy for this key's sessions.
    pub network: Option<NetworkPolicy>,
    /// This key's own live-session limit.
    pub max_sessions: Option<u64>,
    /// This key's own limit of executions at once (`None`: the server's
    /// `--max-executions-per-key`).
    pub max_executions_per_key: Option<u64>,
}

/// Why a session request failed. None of these is an error of the user's
/// code: those are outputs of a successful execution.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Unknown id, or another key's session.
    #[error("session {0} does not exist or belongs to another API key")]
    NotFound(String),
    /// The caller's session has ended.
    #[error("session {0} has expired or was ended; start a new session by omitting session_id")]
    Expired(String),
    /// The key is at its session limit.
    #[error("this API key already has {0} live sessions, the most it may have; reuse one or wait for one to expire")]
    TooManySessions(usize),
    /// The server is at its session limit.
    #[error("the server is running its maximum of {0} sessions; retry shortly")]
    NoCapacity(usize),
    /// A kernel could not be started.
    #[error("could not start a kernel for the session: {0}")]
    KernelUnavailable(String),
    /// The runtime is still being provisioned.
    #[error("kiln is still preparing its Python runtime; retry in a few seconds")]
    NotReady,
    /// Provisioning failed; the server cannot run sessions.
    #[error("kiln cannot run sessions: {0}")]
    Broken(String),
    /// The server is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// An upload could not be written.
    #[error(transparent)]
    Files(#[from] FileWriteError),
    /// A requested time limit is out of range.
    #[error("timeout must be a positive number of seconds, at most {max}")]
    BadTimeout { max: u64 },
    /// A file endpoint could not read what was asked.
    #[error(transparent)]
    Browse(#[from] BrowseError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    /// The caller's session lived on a node that was lost.
    #[error(
        "session {id} was lost with the kiln node that held it ({node}): that node stopped, crashed, restarted or \
         was cut off, and the session's state is gone. This is an infrastructure failure, not an error of your \
         code: start a new session by omitting session_id"
    )]
    Lost {
        /// The session.
        id: String,
        /// The node it was on.
        node: String,
    },
    /// The node holding the session is alive by its lease but does not
    /// answer.
    #[error(
        "the kiln node holding session {id} ({node}) cannot be reached right now; nothing was done. This is a \
         server-side condition, not an error of your code: retry after the Retry-After delay"
    )]
    NodeUnreachable {
        /// The session.
        id: String,
        /// The node it is on.
        node: String,
    },
    /// This node takes no new sessions now (draining, or cut off from the
    /// store); existing sessions still run.
    #[error("this kiln node takes no new sessions right now ({0}); retry shortly (another node may take it)")]
    NotTaking(String),
    /// No node of the cluster has room for a new session.
    #[error("every kiln node of the cluster is full or draining; retry shortly")]
    ClusterFull,
    /// The key has as many executions running and waiting as it may.
    #[error(
        "this API key already has {running} executions running and {queued} waiting, the most it may; retry after \
         the Retry-After delay"
    )]
    RateLimited { running: usize, queued: usize },
    /// A session runs one language: its kernel's.
    #[error(
        "session {id} runs {session}, not {asked}: a session keeps the language it started with; \
         omit session_id to start a {asked} session"
    )]
    LanguageMismatch { id: String, session: kiln_protocol::Language, asked: kiln_protocol::Language },
    /// The server's runtime has no kernel for the language.
    #[error("language {asked} is not run by this server; it runs: {runs}")]
    UnsupportedLanguage { asked: kiln_protocol::Language, runs: String },
}
