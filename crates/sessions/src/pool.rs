//! The warm pools: kernels booted ahead of demand, one pool per kind of
//! kernel (Python; Deno for JavaScript and TypeScript; bash).
//!
//! A new session takes a ready kernel instead of waiting half a second for
//! one to boot. Each pooled kernel goes to exactly one session; only one
//! that ran nothing comes back (a start refused by the store, see
//! `create`), so no state can pass between sessions. One background task keeps
//! every pool at its target, booting one kernel at a time so that refilling
//! never takes more than one core from live sessions.
//!
//! Targets adapt to demand ([`next_target`]): every session that found its
//! pool empty raises that pool's (up to four times the configured size), and
//! a quiet minute lowers it back. Python's never goes below the configured
//! size; the other languages' start at zero, so a server whose sessions are
//! all Python keeps no Deno or bash kernel warm, and one that is asked for
//! JavaScript keeps as many ready as its demand needs. Pooled kernels count
//! against the server's session limit: the pools never fill past what
//! sessions could still use.

use crate::boot::Kernels;
use crate::registry::Registry;
use kiln_kernel::Kernel;
use kiln_protocol::Language;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, Notify};
use tokio::time::Instant;

/// How long without a miss before the target shrinks by one.
const QUIET: Duration = Duration::from_secs(60);

/// The pool a session of `language` takes its kernel from: JavaScript and
/// TypeScript run the same kernel (Deno's), so they share one.
pub(crate) fn pool_language(language: Language) -> Language {
    match language {
        Language::Typescript => Language::Javascript,
        other => other,
    }
}

/// Every language's pool, and the one filler's wake-up call.
#[derive(Debug)]
pub(crate) struct Pools {
    pools: Vec<Pool>,
    wake: Arc<Notify>,
    /// Batch requests running now: while any does, refills are batch work
    /// too (mostly for its items), and boot at the batch's CPU weight.
    batches: Arc<AtomicUsize>,
}

/// Counts a running batch request until dropped.
#[derive(Debug)]
pub(crate) struct BatchRunning(Arc<AtomicUsize>);

impl Drop for BatchRunning {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pools {
    /// A pool for each kind of kernel: Python's at least `size`, the
    /// others' grown from zero by demand; each up to four times `size`
    /// (no pool at all when `size` is 0).
    pub(crate) fn new(size: usize, kernels: Arc<Kernels>) -> Self {
        let wake = Arc::new(Notify::new());
        let pools = [Language::Python, Language::Javascript, Language::Bash]
            .into_iter()
            .map(|language| {
                let min = if language == Language::Python { size } else { 0 };
                Pool::new(language, min, size.saturating_mul(4), kernels.clone(), wake.clone())
            })
            .collect();
        Pools { pools, wake, batches: Arc::new(AtomicUsize::new(0)) }
    }

    /// Note a batch request running until the guard is dropped.
    pub(crate) fn batch_running(&self) -> BatchRunning {
        self.batches.fetch_add(1, Ordering::Relaxed);
        BatchRunning(self.batches.clone())
    }

    /// The priority of the next refill: a batch's while one runs
    /// (interactive sessions then still come first), else an execute's
    /// (interactive sessions wait on the pool).
    fn refill_priority(&self) -> crate::Priority {
        if self.batches.load(Ordering::Relaxed) > 0 {
            crate::Priority::Batch
        } else {
            crate::Priority::Interactive
        }
    }

    /// The pool of `language`'s kernels.
    pub(crate) fn of(&self, language: Language) -> Option<&Pool> {
        let language = pool_language(language);
        self.pools.iter().find(|p| p.language == language)
    }

    /// Wake the filler (to notice a shutdown).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Kernels ready, in all pools.
    pub(crate) async fn len(&self) -> usize {
        let mut n = 0;
        for p in &self.pools {
            n += p.len().await;
        }
        n
    }

    /// Kernels ready in each pool, by the pool's language.
    pub(crate) async fn levels(&self) -> Vec<(Language, usize)> {
        let mut out = Vec::new();
        for p in &self.pools {
            out.push((p.language, p.len().await));
        }
        out
    }

    /// The sum of the pools' targets.
    pub(crate) fn target(&self) -> usize {
        self.pools.iter().map(Pool::target).sum()
    }

    /// Kill every pooled kernel.
    pub(crate) async fn drain(&self) {
        for p in &self.pools {
            p.drain().await;
        }
    }
}

#[derive(Debug)]
pub(crate) struct Pool {
    /// The language its kernels run (see [`pool_language`]).
    language: Language,
    kernels: Arc<Kernels>,
    ready: Mutex<VecDeque<Kernel>>,
    wake: Arc<Notify>,
    /// The configured size: the target never goes below it.
    min: usize,
    /// The largest the target may grow to.
    max: usize,
    /// The current target.
    target: AtomicUsize,
    /// When a session last found the pool empty (or the target last shrank).
    last_change: std::sync::Mutex<Instant>,
}

/// The pool's next target: one more per miss (a session that had to boot
/// its own kernel), one less after a quiet period, within `[min, max]`.
pub(crate) fn next_target(current: usize, min: usize, max: usize, misses: usize, quiet: bool) -> usize {
    let grown = current.saturating_add(misses);
    let shrunk = if misses == 0 && quiet { grown.saturating_sub(1) } else { grown };
    shrunk.clamp(min, max.max(min))
}

impl Pool {
    fn new(language: Language, min: usize, max: usize, kernels: Arc<Kernels>, wake: Arc<Notify>) -> Self {
        Pool {
            language,
            kernels,
            ready: Mutex::new(VecDeque::new()),
            wake,
            min,
            max,
            target: AtomicUsize::new(min),
            last_change: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// A ready kernel, if the pool has a live one.
    pub(crate) async fn take(&self) -> Option<Kernel> {
        let mut ready = self.ready.lock().await;
        while let Some(k) = ready.pop_front() {
            self.wake.notify_one();
            if k.is_alive() {
                return Some(k);
            }
            self.kernels.destroy(k).await;
        }
        if self.max > 0 {
            // A miss: this session boots its own kernel; grow at once.
            let (min, max) = (self.min, self.max);
            let _ = self
                .target
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(next_target(t, min, max, 1, false)));
            *self.last_change.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        self.wake.notify_one();
        None
    }

    /// Add a kernel (or discard it when the pool is off).
    pub(crate) async fn put(&self, k: Kernel) {
        if self.max == 0 {
            self.kernels.destroy(k).await;
            return;
        }
        self.ready.lock().await.push_back(k);
    }

    pub(crate) async fn len(&self) -> usize {
        self.ready.lock().await.len()
    }

    /// The current target size.
    pub(crate) fn target(&self) -> usize {
        self.target.load(Ordering::Relaxed)
    }

    /// Kill every pooled kernel.
    pub(crate) async fn drain(&self) {
        let all: Vec<Kernel> = self.ready.lock().await.drain(..).collect();
        for k in all {
            self.kernels.destroy(k).await;
        }
        self.wake.notify_one();
    }

    /// Drop kernels beyond `keep` (the target shrank).
    async fn trim(&self, keep: usize) {
        let extra: Vec<Kernel> = {
            let mut ready = self.ready.lock().await;
            let n = ready.len().saturating_sub(keep);
            ready.drain(..n).collect()
        };
        for k in extra {
            self.kernels.destroy(k).await;
        }
    }
}

/// Keep every pool at its target until `stopping` turns true, booting one
/// kernel at a time (Python's pool first). Pooled kernels count against
/// `max_sessions` with the sessions in `registry`.
pub(crate) async fn fill(
    pools: Arc<Pools>,
    kernels: Arc<Kernels>,
    registry: Arc<Registry>,
    max_sessions: usize,
    stopping: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *stopping.borrow() {
            pools.drain().await;
            return;
        }
        let mut have = 0;
        let mut below = None;
        for pool in &pools.pools {
            let target = pool.retarget();
            let n = pool.len().await;
            if n > target {
                pool.trim(target).await;
            }
            have += n.min(target);
            if below.is_none() && n < target && kernels.languages().contains(&pool.language) {
                below = Some(pool);
            }
        }
        // Pooled kernels count against the session limit.
        let room = max_sessions.saturating_sub(registry.count());
        let Some(pool) = below.filter(|_| have < room) else {
            // Wait for a change, or re-evaluate the targets now and then.
            let _ = tokio::time::timeout(QUIET, pools.wake.notified()).await;
            continue;
        };
        // The session that takes a kernel sets its own weight.
        match kernels.boot_new(kernels.default_network(), pool.language, pools.refill_priority()).await {
            Ok(k) => {
                backoff = Duration::from_millis(500);
                if *stopping.borrow() {
                    kernels.destroy(k).await;
                    return;
                }
                pool.put(k).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, language = %pool.language, retry_in = ?backoff, "could not refill a kernel pool");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

impl Pool {
    /// The target after a quiet period's shrink, if one is due.
    fn retarget(&self) -> usize {
        let quiet = {
            let mut last = self.last_change.lock().unwrap_or_else(|p| p.into_inner());
            let quiet = last.elapsed() >= QUIET;
            if quiet {
                *last = Instant::now();
            }
            quiet
        };
        if quiet {
            let (min, max) = (self.min, self.max);
            let _ = self
                .target
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(next_target(t, min, max, 0, true)));
        }
        self.target()
    }
}

#[cfg(test)]
mod tests {
    use super::next_target;

    #[test]
    fn the_target_grows_with_misses_and_shrinks_when_quiet_within_bounds() {
        assert_eq!(next_target(2, 2, 8, 0, false), 2);
        assert_eq!(next_target(2, 2, 8, 3, false), 5);
        assert_eq!(next_target(7, 2, 8, 5, false), 8, "capped at max");
        assert_eq!(next_target(5, 2, 8, 0, true), 4, "a quiet period lowers it by one");
        assert_eq!(next_target(2, 2, 8, 0, true), 2, "never below the configured size");
        assert_eq!(next_target(5, 2, 8, 1, true), 6, "a miss wins over quiet");
        assert_eq!(next_target(0, 0, 0, 4, false), 0, "a disabled pool stays off");
    }
}
