//! Admission: how many executions run at once, per key and in all, and
//! who goes next when they cannot all run.
//!
//! Each key may run a number of executions at once (the server's
//! `--max-executions-per-key`, or the key's own limit when it has one) and
//! queue a bounded number more: `--execution-queue-per-key` for a key on the
//! server's limit, and in proportion for a key with its own (a key allowed
//! a quarter as many at once may queue a quarter as many, rounded up); past the queue a request is refused at once (429
//! `rate_limited` with `Retry-After`), never left hanging. The server as a
//! whole runs at most its own number at once. When a place frees up, it
//! goes to the waiting key that has the fewest executions running (ties in
//! turn), so a key with ten thousand queued items cannot make another key's
//! single request wait behind them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The limits of admission.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Executions running at once on this server.
    pub total: usize,
    /// Executions one key may run at once.
    pub per_key: usize,
    /// Executions one key may have waiting.
    pub queue_per_key: usize,
}

/// The gate every execution passes.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    keys: HashMap<String, Key>,
    /// Keys in the order their turn comes among equals.
    turn: u64,
}

#[derive(Debug, Default)]
struct Key {
    running: usize,
    limit: usize,
    waiting: VecDeque<oneshot::Sender<Permit>>,
    /// When this key last got a place (for turns among equals).
    last_turn: u64,
}

/// A place to run one execution; given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    /// `None` once given back.
    admission: Option<Arc<Admission>>,
    key: String,
}

/// Why an execution was not admitted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused {
    /// The key's limit of executions at once.
    pub(crate) running: usize,
    /// And of waiting ones.
    pub(crate) queued: usize,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Admission { limits, state: Mutex::new(State::default()) }
    }

    /// The limits of `key` at once and waiting: the server's, or the key's
    /// own `own` limit with the queue scaled in proportion.
    fn key_limits(&self, own: Option<usize>) -> (usize, usize) {
        let per_key = self.limits.per_key.max(1);
        match own {
            None => (per_key, self.limits.queue_per_key),
            Some(own) => {
                let own = own.max(1);
                let queue = (self.limits.queue_per_key as u128 * own as u128).div_ceil(per_key as u128);
                (own, usize::try_from(queue).unwrap_or(usize::MAX))
            }
        }
    }

    /// A place for one execution of `key`, now or after waiting in the
    /// key's queue; refused when that queue is full. `own` is the key's own
    /// limit of executions at once, if it has one.
    pub(crate) async fn admit(self: &Arc<Self>, key: &str, own: Option<usize>) -> Result<Permit, Refused> {
        let (limit, queue) = self.key_limits(own);
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let total = self.limits.total.max(1);
            let free = st.running < total;
            let turn = st.turn;
            let k = st.keys.entry(key.to_string()).or_default();
            k.limit = limit;
            if free && k.running < limit && k.waiting.is_empty() {
                k.running += 1;
                k.last_turn = turn;
                st.running += 1;
                st.turn += 1;
                return Ok(Permit { admission: Some(self.clone()), key: key.to_string() });
            }
            // Waiters whose callers left hold no place in the queue.
            k.waiting.retain(|w| !w.is_closed());
            if k.waiting.len() >= queue {
                return Err(Refused { running: limit, queued: queue });
            }
            let (tx, rx) = oneshot::channel();
            k.waiting.push_back(tx);
            rx
        };
        // Dropped while waiting (the client left): the sender fails and
        // the place goes to the next in line.
        wait.await.map_err(|_| Refused { running: limit, queued: queue })
    }

    /// Executions running now, and waiting for a place (callers that left
    /// are not counted).
    pub(crate) fn load(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = st.keys.values().map(|k| k.waiting.iter().filter(|w| !w.is_closed()).count()).sum();
        (st.running, waiting)
    }

    /// Give back one place of `key`, and hand out every place that is free.
    fn release(self: &Arc<Self>, key: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.running = st.running.saturating_sub(1);
        if let Some(k) = st.keys.get_mut(key) {
            k.running = k.running.saturating_sub(1);
        }
        self.dispatch(&mut st);
    }

    /// While places are free: the waiting key (below its own limit) with
    /// the fewest running, the one whose turn is oldest among equals, gets
    /// its first waiter in.
    fn dispatch(self: &Arc<Self>, st: &mut State) {
        while st.running < self.limits.total.max(1) {
            let next = st
                .keys
                .iter()
                .filter(|(_, k)| !k.waiting.is_empty() && k.running < k.limit)
                .min_by_key(|(_, k)| (k.running, k.last_turn))
                .map(|(id, _)| id.clone());
            let Some(id) = next else { break };
            let turn = st.turn;
            let Some(k) = st.keys.get_mut(&id) else { break };
            let Some(tx) = k.waiting.pop_front() else { continue };
            k.running += 1;
            k.last_turn = turn;
            st.running += 1;
            st.turn += 1;
            // The permit is made before it is sent: if the waiter is gone,
            // dropping it comes back here (after this lock is released).
            let permit = Permit { admission: Some(self.clone()), key: id.clone() };
            if let Err(mut unsent) = tx.send(permit) {
                // Undo by hand: the lock is held, so the permit's drop must
                // not run `release`.
                unsent.admission = None;
                st.running -= 1;
                if let Some(k) = st.keys.get_mut(&id) {
                    k.running -= 1;
                }
            }
        }
        st.keys.retain(|_, k| k.running > 0 || !k.waiting.is_empty());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            a.release(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(total: usize, per_key: usize, queue_per_key: usize) -> Arc<Admission> {
        Arc::new(Admission::new(Limits { total, per_key, queue_per_key }))
    }

    #[tokio::test]
    async fn a_key_past_its_queue_is_refused_at_once() {
        let g = gate(10, 1, 1);
        let _running = g.admit("a", None).await.unwrap_or_else(|_| panic!("first"));
        let g2 = g.clone();
        let queued = tokio::spawn(async move { g2.admit("a", None).await.map(|_| ()) });
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(g.admit("a", None).await.is_err(), "the queue holds one");
        drop(_running);
        assert!(queued.await.unwrap_or(Err(Refused { running: 0, queued: 0 })).is_ok());
    }

    #[tokio::test]
    async fn a_key_with_its_own_limit_runs_that_many_and_queues_in_proportion() {
        // The server: 4 at once per key, 8 waiting; a key of its own 1 at
        // once may queue 2, one of 8 at once may queue 16.
        let g = gate(100, 4, 8);
        assert_eq!(g.key_limits(None), (4, 8));
        assert_eq!(g.key_limits(Some(1)), (1, 2));
        assert_eq!(g.key_limits(Some(8)), (8, 16));
        assert_eq!(g.key_limits(Some(3)), (3, 6));
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(g.admit("big", Some(8)).await.unwrap_or_else(|_| panic!("big runs 8 at once")));
        }
        let _one = g.admit("small", Some(1)).await.unwrap_or_else(|_| panic!("small runs 1"));
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let g = g.clone();
            waiting.push(tokio::spawn(async move { g.admit("small", Some(1)).await.map(|_| ()) }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let refused = g.admit("small", Some(1)).await.err().unwrap_or_else(|| panic!("past small's queue"));
        assert_eq!((refused.running, refused.queued), (1, 2));
        for w in &waiting {
            assert!(!w.is_finished(), "small runs one at a time");
        }
    }

    #[tokio::test]
    async fn a_freed_place_goes_to_the_key_with_the_fewest_running() {
        let g = gate(2, 2, 100);
        let a1 = g.admit("a", None).await.unwrap_or_else(|_| panic!());
        let _a2 = g.admit("a", None).await.unwrap_or_else(|_| panic!());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for who in ["a", "a", "b"] {
            let (g, tx) = (g.clone(), tx.clone());
            tokio::spawn(async move {
                let p = g.admit(who, None).await;
                let _ = tx.send((who, p.is_ok()));
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                drop(p);
            });
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(a1);
        assert_eq!(rx.recv().await, Some(("b", true)), "b waited less than a's queue");
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_gives_its_place_to_the_next() {
        let g = gate(1, 1, 10);
        let first = g.admit("a", None).await.unwrap_or_else(|_| panic!());
        let g2 = g.clone();
        let leaving = tokio::spawn(async move { g2.admit("a", None).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        leaving.abort();
        let g3 = g.clone();
        let next = tokio::spawn(async move { g3.admit("a", None).await.is_ok() });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        drop(first);
        assert!(next.await.unwrap_or(false));
    }
}
