//! Exponential back-off for outages (Redis, broker, schema registry).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::RetryConfig;

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(cfg: &RetryConfig) -> Backoff {
        Backoff {
            next: cfg.initial_backoff.0,
            max: cfg.max_backoff.0,
        }
    }

    /// Sleeps for the current delay, then doubles it (capped). Returns early,
    /// with false, if `give_up` is raised meanwhile.
    pub async fn wait(&mut self, give_up: &AtomicBool) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        let step = Duration::from_millis(20);
        let mut waited = Duration::ZERO;
        while waited < delay {
            if give_up.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(step.min(delay - waited)).await;
            waited += step;
        }
        !give_up.load(Ordering::Relaxed)
    }
}
