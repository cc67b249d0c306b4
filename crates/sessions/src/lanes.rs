//! Lanes: the sessions that a batch's program-only items share.
//!
//! An item whose tests are all program runs (`stdin`, `expected_stdout`),
//! that sends no files and keeps no session, needs of a session only a
//! place for its tests to run, and never runs its code in the kernel: each
//! test is a fork that starts from the same state. The judge puts the
//! work, home, `/tmp` and `/dev/shm` directories back and removes the IPC
//! objects after every test, and kills whatever the test started
//! (`kiln_kernel.judge`). A session per such item would cost more CPU than
//! its tests (a fresh session is ~30 ms here, a test a few). So a batch
//! keeps at most one session per item it runs at once, a lane, and an
//! item takes an idle lane or starts one.
//!
//! A lane is given back only if the item left it as it found it: every
//! runner cell ended normally (none was cut short, none failed to put a
//! directory back), and the session's layer over the runtime is still
//! empty (nothing installed, nothing written into the runtime's
//! directories, which the judge does not put back). Otherwise the lane is
//! ended and the next item starts another. Lanes are also retired with age,
//! well before their session's lifetime ends, and at the end of the batch.
//! One that an item holds when its batch is dropped (its client went away)
//! is ended by that item's `Ender`, like any fresh session.

use crate::Manager;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest a lane serves, and never more than half its session's lifetime.
const LANE_AGE: Duration = Duration::from_secs(300);

/// One batch's idle lanes.
pub(crate) struct Lanes {
    manager: Manager,
    key_id: String,
    /// The idle lanes: session id and when it started.
    idle: Mutex<Vec<(String, Instant)>>,
    /// How long a lane may serve.
    age: Duration,
}

/// A lane an item holds.
pub(crate) struct Lane {
    /// Its session, once started (`None`: the item starts it).
    pub(crate) id: Option<String>,
    born: Instant,
}

impl Lanes {
    pub(crate) fn new(manager: Manager, key_id: &str) -> Self {
        let age = LANE_AGE.min(manager.ttl() / 2);
        Lanes { manager, key_id: key_id.to_string(), idle: Mutex::new(Vec::new()), age }
    }

    /// An idle lane, or an empty one for the item to start.
    pub(crate) fn take(&self) -> Lane {
        match self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            Some((id, born)) => Lane { id: Some(id), born },
            None => Lane { id: None, born: Instant::now() },
        }
    }

    /// Give back `lane`'s session `id` after an item: kept idle when the
    /// item left it `clean` and it is young enough, ended otherwise.
    pub(crate) async fn give_back(&self, lane: Lane, id: String, clean: bool) {
        let young = lane.born.elapsed() < self.age;
        if clean && young && self.manager.runtime_untouched(&self.key_id, &id).await {
            if let Ok(mut idle) = self.idle.lock() {
                idle.push((id, lane.born));
                return;
            }
        }
        let _ = self.manager.end(&self.key_id, &id).await;
    }

    /// End every idle lane (the batch is over) and wait until they are gone.
    pub(crate) async fn close(&self) {
        let idle = self.idle.lock().map(|mut idle| std::mem::take(&mut *idle)).unwrap_or_default();
        for (id, _) in idle {
            let _ = self.manager.end(&self.key_id, &id).await;
        }
    }
}

impl Drop for Lanes {
    /// A batch dropped before [`Lanes::close`] (its client went away):
    /// its idle lanes end in the background.
    fn drop(&mut self) {
        let idle = self.idle.get_mut().map(std::mem::take).unwrap_or_default();
        if idle.is_empty() {
            return;
        }
        let (manager, key) = (self.manager.clone(), std::mem::take(&mut self.key_id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for (id, _) in idle {
                    let _ = manager.end(&key, &id).await;
                }
            });
        }
    }
}
