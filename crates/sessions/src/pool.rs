//! The warm pool: kernels booted ahead of demand.
//!
//! A new session takes a ready kernel instead of waiting half a second for
//! one to boot. Each pooled kernel goes to exactly one session and is never
//! returned (no state can pass between sessions). One background task keeps
//! the pool at its target, booting one kernel at a time so that refilling
//! never takes more than one core from live sessions.
//!
//! The target adapts to demand ([`next_target`]): every session that found
//! the pool empty raises it (up to four times the configured size), and a
//! quiet minute lowers it back. Pooled kernels count against the server's
//! session limit: the pool never fills past what sessions could still use.

use crate::boot::Kernels;
use crate::registry::Registry;
use kiln_kernel::Kernel;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, Notify};
use tokio::time::Instant;

/// How long without a miss before the target shrinks by one.
const QUIET: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct Pool {
    kernels: Arc<Kernels>,
    ready: Mutex<VecDeque<Kernel>>,
    wake: Notify,
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
    pub(crate) fn new(min: usize, kernels: Arc<Kernels>) -> Self {
        Pool {
            kernels,
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            min,
            max: min.saturating_mul(4),
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
        if self.min > 0 {
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
        if self.min == 0 {
            self.kernels.destroy(k).await;
            return;
        }
        self.ready.lock().await.push_back(k);
    }

    /// Wake the filler (to notice a shutdown).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
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

/// Keep the pool at its target until `stopping` turns true. Pooled
/// kernels count against `max_sessions` with the sessions in `registry`.
pub(crate) async fn fill(
    pool: Arc<Pool>,
    registry: Arc<Registry>,
    max_sessions: usize,
    stopping: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *stopping.borrow() {
            pool.drain().await;
            return;
        }
        // A quiet period shrinks the target by one.
        let quiet = {
            let mut last = pool.last_change.lock().unwrap_or_else(|p| p.into_inner());
            let quiet = last.elapsed() >= QUIET;
            if quiet {
                *last = Instant::now();
            }
            quiet
        };
        if quiet {
            let (min, max) = (pool.min, pool.max);
            let _ = pool
                .target
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(next_target(t, min, max, 0, true)));
        }
        let target = pool.target();
        let have = pool.len().await;
        if have > target {
            pool.trim(target).await;
        }
        // Pooled kernels count against the session limit.
        let room = max_sessions.saturating_sub(registry.count());
        if have >= target || have >= room {
            // Wait for a change, or re-evaluate the target now and then.
            let _ = tokio::time::timeout(QUIET, pool.wake.notified()).await;
            continue;
        }
        match pool.kernels.boot_new(pool.kernels.default_network()).await {
            Ok(k) => {
                backoff = Duration::from_millis(500);
                if *stopping.borrow() {
                    pool.kernels.destroy(k).await;
                    return;
                }
                pool.put(k).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "could not refill the kernel pool");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
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
