//! kiln's own limit on open files, sized at start for its session limit.
//!
//! Every session costs the server descriptors (its kernel's sockets, its
//! egress socket and up to two per tunnel), and so does every API
//! connection. If the limit were smaller than what the configured maxima
//! add up to, sessions could run the server out of descriptors and fail
//! everyone else's requests; so kiln raises its soft limit to the sum (and,
//! with `CAP_SYS_RESOURCE`, the hard limit when it must). When neither is
//! possible it raises the soft limit as far as it may and warns, saying
//! what it needs and what to change; each session's own caps still keep
//! any one session to its share.

use crate::config::Settings;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors of the server itself: database, logs, runtime builds, the
/// zygote, listeners, the async runtime.
const BASE: u64 = 256;

/// Descriptors one live kernel costs the server beyond its egress tunnels:
/// its ZeroMQ `ipc://` sockets, the frame-size guard's listeners and relays,
/// its egress socket, process handles. Measured with the lean kernel and the
/// zygote: about 9 (44 live kernels held 387 more than none did); the rest
/// is headroom.
const PER_KERNEL: u64 = 16;

/// What the configured limits add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Live sessions (pooled kernels count against the same limit).
    pub sessions: u64,
    /// Descriptors per session: its kernel, and its egress at most.
    pub per_session: u64,
    /// API connections.
    pub connections: u64,
}

impl Budget {
    pub fn of(s: &Settings) -> Budget {
        let egress = if s.sessions.sandbox.is_some() && s.sessions.network.allows_egress() {
            s.sessions.egress.fds_per_session()
        } else {
            0
        };
        Budget {
            sessions: s.sessions.max_sessions as u64,
            per_session: PER_KERNEL + egress,
            connections: s.http.max_connections as u64,
        }
    }

    /// The whole need.
    pub fn total(&self) -> u64 {
        BASE + self.connections + self.sessions * self.per_session
    }

    fn explain(&self) -> String {
        format!(
            "{} = {BASE} for the server + {} API connections (--max-connections) + {} sessions (--max-sessions) \
             x {} each (its kernel, and its egress: --egress-connections)",
            self.total(),
            self.connections,
            self.sessions,
            self.per_session
        )
    }
}

/// Raise this process's open-file limit to `budget`, or as far as allowed
/// and warn.
pub fn ensure(budget: &Budget) -> anyhow::Result<()> {
    let need = budget.total();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= need {
        tracing::debug!(limit = soft, need, "open-file limit suffices");
        return Ok(());
    }
    let raised = if hard >= need {
        setrlimit(Resource::RLIMIT_NOFILE, need, hard)
    } else {
        // Raising the hard limit needs CAP_SYS_RESOURCE (root), and stays
        // below fs.nr_open.
        setrlimit(Resource::RLIMIT_NOFILE, need, need)
    };
    match raised {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = need,
                "raised the open-file limit for the configured limits: {}",
                budget.explain()
            );
        }
        Err(e) => {
            // Still as high as allowed: everything below the need is
            // headroom the sessions' caps may not get to use up.
            if soft < hard {
                setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
            }
            tracing::warn!(
                limit = hard,
                need,
                error = %e,
                "kiln needs {} open files for its limits, and cannot raise its limit above {hard}: at full load, \
                 sessions could use up the descriptors the server needs. Raise the hard limit (ulimit -Hn, \
                 systemd LimitNOFILE=, docker --ulimit nofile=), or lower --max-sessions, --egress-connections \
                 or --max-connections",
                budget.explain()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_adds_up_sessions_their_egress_and_connections() {
        let b = Budget { sessions: 256, per_session: 16 + 130, connections: 1024 };
        assert_eq!(b.total(), 256 + 1024 + 256 * 146);
        assert!(b.explain().starts_with(&format!("{} = 256 for the server", b.total())));
    }
}
