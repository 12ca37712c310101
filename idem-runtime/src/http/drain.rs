//! Keeping count of the keyed requests a layer started, so that a server shutting down can wait
//! for their handlers to finish ([`IdempotencyLayer::drain`](super::IdempotencyLayer::drain)).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The keyed requests of one layer (and every layer and service cloned from it) that have not
/// finished.
#[derive(Default)]
pub(crate) struct Tracker {
    running: AtomicUsize,
    idle: Notify,
}

impl Tracker {
    /// Counts one keyed request until the returned guard is dropped.
    pub(super) fn enter(self: &Arc<Self>) -> Tracked {
        self.running.fetch_add(1, Ordering::SeqCst);
        Tracked {
            tracker: Arc::clone(self),
        }
    }

    /// How many keyed requests have not finished.
    pub(super) fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Resolves when no keyed request is left.
    pub(super) async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the count is read, so that the last request's end is never
            // missed between the two.
            idle.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One keyed request, counted while it lives.
pub(super) struct Tracked {
    tracker: Arc<Tracker>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.tracker.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drained_waits_for_every_request() {
        let tracker = Arc::new(Tracker::default());
        tracker.drained().await; // nothing to wait for
        let a = tracker.enter();
        let b = tracker.enter();
        let waiting = tokio::spawn({
            let tracker = Arc::clone(&tracker);
            async move { tracker.drained().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(b);
        let done = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(done, Ok(Ok(()))));
        assert_eq!(tracker.running(), 0);
    }
}
