//! The warm pool: kernels booted ahead of demand.
//!
//! A new session takes a ready kernel instead of waiting half a second for
//! one to boot. Each pooled kernel goes to exactly one session and is never
//! returned (no state can pass between sessions). One background task keeps
//! the pool at its target, booting one kernel at a time so that refilling
//! never takes more than one core from live sessions.

use crate::manager::{destroy_dir, Inner, Readiness};
use kiln_kernel::Kernel;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify};

#[derive(Debug)]
pub(crate) struct Pool {
    ready: Mutex<VecDeque<Kernel>>,
    wake: Notify,
    target: usize,
}

impl Pool {
    pub(crate) fn new(target: usize) -> Self {
        Pool { ready: Mutex::new(VecDeque::new()), wake: Notify::new(), target }
    }

    /// A ready kernel, if the pool has a live one.
    pub(crate) async fn take(&self) -> Option<Kernel> {
        let mut ready = self.ready.lock().await;
        while let Some(k) = ready.pop_front() {
            self.wake.notify_one();
            if k.is_alive() {
                return Some(k);
            }
            k.kill().await;
            destroy_dir(k.dirs().root.clone()).await;
        }
        self.wake.notify_one();
        None
    }

    /// Add a kernel (or discard it when the pool is off).
    pub(crate) async fn put(&self, k: Kernel) {
        if self.target == 0 {
            k.kill().await;
            destroy_dir(k.dirs().root.clone()).await;
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

    /// Kill every pooled kernel.
    pub(crate) async fn drain(&self) {
        let all: Vec<Kernel> = self.ready.lock().await.drain(..).collect();
        for k in all {
            k.kill().await;
            destroy_dir(k.dirs().root.clone()).await;
        }
        self.wake.notify_one();
    }
}

/// Keep the pool at its target until the server stops.
pub(crate) async fn fill(inner: Arc<Inner>) {
    let pool = &inner.pool;
    let mut backoff = Duration::from_millis(500);
    loop {
        if inner.readiness() == Readiness::Stopping {
            pool.drain().await;
            return;
        }
        if pool.len().await >= pool.target {
            pool.wake.notified().await;
            continue;
        }
        match inner.boot_new(inner.default_network()).await {
            Ok(k) => {
                backoff = Duration::from_millis(500);
                if inner.readiness() == Readiness::Stopping {
                    k.kill().await;
                    destroy_dir(k.dirs().root.clone()).await;
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
