//! Exponential back-off for outages (Redis, broker, schema registry), in the
//! batch path, the timer loop and at start-up.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::warn;

use crate::config::RetryConfig;

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `retry.initial_backoff`, doubles up to `retry.max_backoff`.
    pub fn new(cfg: &RetryConfig) -> Backoff {
        Backoff {
            next: cfg.initial_backoff.0,
            max: cfg.max_backoff.0,
        }
    }

    /// The delay to wait now; the one after is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Sleeps for the current delay, then doubles it (capped). Returns early,
    /// with false, if `give_up` is raised meanwhile (checked every 20 ms).
    pub async fn wait(&mut self, give_up: &AtomicBool) -> bool {
        let delay = self.next_delay();
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

/// Retries a start-up step with back-off for up to `total`, so lapse can start
/// before its dependencies. The error names `what` once `total` has run out.
pub async fn with_startup_retry<T, F, Fut>(
    what: &str,
    total: Duration,
    retry: &RetryConfig,
    mut step: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + total;
    let mut backoff = Backoff::new(retry);
    loop {
        let e = match step().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        if tokio::time::Instant::now() + delay >= deadline {
            return Err(e.context(format!(
                "{what} still unavailable after {}s",
                total.as_secs()
            )));
        }
        warn!(error = %e, "{what} not available yet; retrying");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn retry(initial_ms: u64, max_ms: u64) -> RetryConfig {
        RetryConfig {
            initial_backoff: Dur::ms(initial_ms),
            max_backoff: Dur::ms(max_ms),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut b = Backoff::new(&retry(100, 350));
        let ms: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 350, 350]);
    }

    #[tokio::test]
    async fn a_wait_ends_early_when_told_to_give_up() {
        let mut b = Backoff::new(&retry(60_000, 60_000));
        let give_up = AtomicBool::new(true);
        let started = std::time::Instant::now();
        assert!(!b.wait(&give_up).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn start_up_steps_are_retried_until_they_succeed_or_time_runs_out() {
        let mut calls = 0;
        let v = with_startup_retry("thing", Duration::from_secs(5), &retry(5, 20), || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    anyhow::bail!("not yet")
                }
                Ok(n)
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        let started = std::time::Instant::now();
        let e = with_startup_retry(
            "thing",
            Duration::from_millis(100),
            &retry(10, 40),
            || async { anyhow::bail!("down") as anyhow::Result<()> },
        )
        .await
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("thing still unavailable"),
            "{e:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
