//! Lanes: the sessions that a batch's items share.
//!
//! An item whose tests are all program runs (`stdin`, `expected_stdout`)
//! and that keeps no session needs of a session only a place for its tests
//! to run, and never runs its code in the kernel: each test is a fork that
//! starts from the same state. So does a Python item with a cell to run (its
//! assertion tests, or none): its cell runs in a fork of a child of the
//! lane's image server, its outputs recorded, and its assertions in forks
//! of that (`kiln_kernel.judge.item`, `runner::item_cell`). Its files are written into the work
//! directory with its first cell and removed after it. The judge puts the
//! work, home, `/tmp` and `/dev/shm` directories back and removes the IPC
//! objects after every test, and kills whatever the test started
//! (`kiln_kernel.judge`). A session per such item would cost more CPU than
//! its tests (a fresh session is ~30 ms here, a test a few). So a batch
//! keeps at most one session per item it runs at once, a lane, and an
//! item takes an idle lane or starts one.
//!
//! A lane is given back only if the item left it as it found it: every
//! runner cell ended normally (none was cut short, none failed to put a
//! directory back or to remove its files), and the session's layer over
//! the runtime is still empty (nothing installed, nothing written into the
//! runtime's directories, which the judge does not put back). Otherwise the lane is
//! ended and the next item starts another. Lanes are also retired with age,
//! well before their session's lifetime ends, and at the end of the batch.
//! One that an item holds when its batch is dropped (its client went away)
//! is ended by that item's `Ender`, like any fresh session.
//!
//! Tests never fork from a lane's kernel (its memory holds earlier items):
//! they fork from the kernel's fork server, of one of two kinds
//! ([`LaneKind`]). Lanes of the two kinds are kept apart.

use crate::Manager;
use kiln_protocol::Language;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest a lane serves, and never more than half its session's lifetime.
const LANE_AGE: Duration = Duration::from_secs(300);

/// What a lane's tests fork from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LaneKind {
    /// A fresh interpreter with only kiln's judge loaded, which the kernel
    /// spawns at its first call (forking it costs a few milliseconds a
    /// test): for Python programs that import only the standard library,
    /// and for other languages' programs (exec'd from its forks).
    Lean,
    /// A fork of the kernel made by a cell of its own before the lane's
    /// first item: its tests find the zygote's preloaded packages imported,
    /// as tests forked from a fresh session's kernel do, where a lean
    /// server's would import numpy anew each time.
    Image,
}

impl LaneKind {
    /// The kind of lane an item of `language` with `code` runs in.
    pub(crate) fn of(language: Language, code: &str) -> LaneKind {
        if language == Language::Python && !crate::stdlib::imports_only_stdlib(code) {
            LaneKind::Image
        } else {
            LaneKind::Lean
        }
    }
}

/// One batch's idle lanes.
pub(crate) struct Lanes {
    manager: Manager,
    key_id: String,
    /// The idle lanes: session id, when it started, and its kind.
    idle: Mutex<Vec<(String, Instant, LaneKind)>>,
    /// How long a lane may serve.
    age: Duration,
}

/// A lane an item holds.
pub(crate) struct Lane {
    /// Its session, once started (`None`: the item starts it).
    pub(crate) id: Option<String>,
    pub(crate) kind: LaneKind,
    born: Instant,
}

impl Lanes {
    pub(crate) fn new(manager: Manager, key_id: &str) -> Self {
        let age = LANE_AGE.min(manager.ttl() / 2);
        Lanes { manager, key_id: key_id.to_string(), idle: Mutex::new(Vec::new()), age }
    }

    /// An idle lane of `kind`, or an empty one for the item to start.
    pub(crate) fn take(&self, kind: LaneKind) -> Lane {
        let found = self.idle.lock().ok().and_then(|mut idle| {
            let at = idle.iter().rposition(|(_, _, k)| *k == kind)?;
            Some(idle.remove(at))
        });
        match found {
            Some((id, born, _)) => Lane { id: Some(id), kind, born },
            None => Lane { id: None, kind, born: Instant::now() },
        }
    }

    /// Give back `lane`'s session `id` after an item: kept idle when the
    /// item left it `clean` and it is young enough, ended otherwise.
    pub(crate) async fn give_back(&self, lane: Lane, id: String, clean: bool) {
        let young = lane.born.elapsed() < self.age;
        if clean && young && self.manager.runtime_untouched(&self.key_id, &id).await {
            if let Ok(mut idle) = self.idle.lock() {
                idle.push((id, lane.born, lane.kind));
                return;
            }
        }
        let _ = self.manager.end(&self.key_id, &id).await;
    }

    /// End the oldest idle lane, if there is one, and wait until it is gone:
    /// an item of this batch needs its room for a session of its own or a
    /// lane of the other kind (the key's or the server's session limit is
    /// reached), and an idle lane must not keep it waiting.
    pub(crate) async fn end_one(&self) -> bool {
        let oldest = self.idle.lock().ok().and_then(|mut idle| (!idle.is_empty()).then(|| idle.remove(0)));
        let Some((id, ..)) = oldest else { return false };
        let _ = self.manager.end(&self.key_id, &id).await;
        true
    }

    /// End every idle lane (the batch is over) and wait until they are gone.
    pub(crate) async fn close(&self) {
        let idle = self.idle.lock().map(|mut idle| std::mem::take(&mut *idle)).unwrap_or_default();
        for (id, ..) in idle {
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
                for (id, ..) in idle {
                    let _ = manager.end(&key, &id).await;
                }
            });
        }
    }
}
