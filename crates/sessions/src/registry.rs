//! The live sessions of this server: who owns each, where its files are,
//! how to reach its worker, and the limits on how many there may be.
//!
//! A session counts against the limits from the moment its creation is
//! reserved ([`Registry::reserve`]), not only once its kernel is ready, so
//! that concurrent creates cannot together overshoot a limit. The
//! reservation is given back when it is dropped, whether the session was
//! registered or its creation failed.

use crate::job::Job;
use crate::SessionError;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// One live session.
#[derive(Debug)]
pub(crate) struct Live {
    /// The key that owns it.
    pub(crate) key_id: String,
    /// Its working directory on the host.
    pub(crate) work: PathBuf,
    /// The language its kernel runs (for good: see `language_mismatch`).
    pub(crate) language: kiln_protocol::Language,
    /// When its lifetime ends.
    pub(crate) expires_at: DateTime<Utc>,
    /// Its worker's queue.
    pub(crate) jobs: mpsc::UnboundedSender<Job>,
    /// Tells its worker to end the session.
    pub(crate) stop: watch::Sender<bool>,
    /// Its worker, which tears the session down before it ends.
    pub(crate) worker: JoinHandle<()>,
}

impl Live {
    /// Tell the worker to end the session and wait until it has.
    pub(crate) async fn end(self) {
        let _ = self.stop.send(true);
        let _ = self.worker.await;
    }
}

/// Which limit a new session would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The server's.
    Server(usize),
    /// The key's.
    Key(usize),
}

impl From<Full> for SessionError {
    fn from(f: Full) -> Self {
        match f {
            Full::Server(n) => SessionError::NoCapacity(n),
            Full::Key(n) => SessionError::TooManySessions(n),
        }
    }
}

/// What the registry knows of a session id, for a given key.
#[derive(Debug)]
pub(crate) enum Found {
    /// The caller's live session: its work dir, language and queue.
    Live(PathBuf, kiln_protocol::Language, mpsc::UnboundedSender<Job>),
    /// The caller's session, past its lifetime (its worker is ending it).
    Expired,
    /// Another key's session: to the caller, it does not exist.
    NotYours,
    /// Not live on this server (it may have ended: ask the store).
    Unknown,
}

#[derive(Debug, Default)]
struct Entries {
    live: HashMap<String, Live>,
    /// Sessions being created, per key.
    creating: HashMap<String, usize>,
}

/// The live sessions.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Mutex<Entries>,
}

/// A place for one session of `key_id`, held while it is created.
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    registry: &'a Registry,
    key_id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut e = self.registry.entries();
        if let Some(n) = e.creating.get_mut(&self.key_id) {
            *n -= 1;
            if *n == 0 {
                e.creating.remove(&self.key_id);
            }
        }
    }
}

impl Reservation<'_> {
    /// Register the session created under this reservation.
    pub(crate) fn register(self, id: String, live: Live) {
        self.registry.entries().live.insert(id, live);
        // Dropping `self` now gives the creating slot back: the session
        // counts as live instead.
    }
}

impl Registry {
    fn entries(&self) -> MutexGuard<'_, Entries> {
        // The map stays consistent whatever panicked while holding it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold a place for a new session of `key_id`, if neither the server's
    /// limit (`server_max`, which `pooled` idle kernels also count against)
    /// nor the key's (`key_max`) is reached.
    pub(crate) fn reserve(&self, key_id: &str, server_max: usize, key_max: usize) -> Result<Reservation<'_>, Full> {
        let mut e = self.entries();
        let creating: usize = e.creating.values().sum();
        if e.live.len() + creating >= server_max {
            return Err(Full::Server(server_max));
        }
        let mine =
            e.live.values().filter(|l| l.key_id == key_id).count() + e.creating.get(key_id).copied().unwrap_or(0);
        if mine >= key_max {
            return Err(Full::Key(key_max));
        }
        *e.creating.entry(key_id.to_string()).or_default() += 1;
        Ok(Reservation { registry: self, key_id: key_id.to_string() })
    }

    /// What `key_id` may know of session `id` at `now`.
    pub(crate) fn find(&self, key_id: &str, id: &str, now: DateTime<Utc>) -> Found {
        match self.entries().live.get(id) {
            Some(l) if l.key_id != key_id => Found::NotYours,
            Some(l) if l.expires_at > now => Found::Live(l.work.clone(), l.language, l.jobs.clone()),
            Some(_) => Found::Expired,
            None => Found::Unknown,
        }
    }

    /// Take session `id` out of the registry (to end it).
    pub(crate) fn remove(&self, id: &str) -> Option<Live> {
        self.entries().live.remove(id)
    }

    /// Take out every session whose lifetime is over at `now`.
    pub(crate) fn remove_expired(&self, now: DateTime<Utc>) -> Vec<Live> {
        let mut e = self.entries();
        let ids: Vec<String> = e.live.iter().filter(|(_, l)| l.expires_at <= now).map(|(id, _)| id.clone()).collect();
        ids.iter().filter_map(|id| e.live.remove(id)).collect()
    }

    /// Take out every session.
    pub(crate) fn remove_all(&self) -> Vec<Live> {
        self.entries().live.drain().map(|(_, l)| l).collect()
    }

    /// Live sessions, and sessions being created.
    pub(crate) fn count(&self) -> usize {
        let e = self.entries();
        e.live.len() + e.creating.values().sum::<usize>()
    }

    /// Live sessions.
    pub(crate) fn live(&self) -> usize {
        self.entries().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(key: &str, expires_at: DateTime<Utc>) -> Live {
        let (jobs, _) = mpsc::unbounded_channel();
        let (stop, _) = watch::channel(false);
        Live {
            key_id: key.into(),
            work: "/w".into(),
            language: kiln_protocol::Language::Python,
            expires_at,
            jobs,
            stop,
            worker: tokio::spawn(async {}),
        }
    }

    #[tokio::test]
    async fn sessions_being_created_count_against_both_limits() {
        let r = Registry::default();
        let a = r.reserve("k1", 3, 2);
        let b = r.reserve("k1", 3, 2);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(r.reserve("k1", 3, 2).err(), Some(Full::Key(2)));
        let c = r.reserve("k2", 3, 2);
        assert!(c.is_ok());
        assert_eq!(r.reserve("k3", 3, 2).err(), Some(Full::Server(3)));
        drop(a);
        assert!(r.reserve("k1", 3, 2).is_ok(), "a failed creation gives its place back");
    }

    #[tokio::test]
    async fn a_registered_session_keeps_its_place_and_is_found_only_by_its_key() {
        let r = Registry::default();
        let later = Utc::now() + chrono::Duration::hours(1);
        if let Ok(res) = r.reserve("k1", 2, 2) {
            res.register("ses_a".into(), live("k1", later));
        }
        assert_eq!((r.live(), r.count()), (1, 1));
        assert!(matches!(r.find("k1", "ses_a", Utc::now()), Found::Live(..)));
        assert!(matches!(r.find("k2", "ses_a", Utc::now()), Found::NotYours));
        assert!(matches!(r.find("k1", "ses_b", Utc::now()), Found::Unknown));
        assert!(matches!(r.find("k1", "ses_a", later), Found::Expired));
        assert_eq!(r.remove_expired(Utc::now()).len(), 0);
        assert_eq!(r.remove_expired(later).len(), 1);
        assert_eq!(r.count(), 0);
    }
}
