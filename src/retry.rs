//! Exponential back-off for outages (Redis, broker, schema registry), in the
//! batch path, the timer loop and at start-up.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{error, info, warn};

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

/// Decides which of a stream of repeated failure messages are worth a log
/// line: the first, any that differs from the last one logged, and otherwise
/// one per `every` (so an hour of a wrong password logs a handful of lines, not
/// one per retry).
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<(String, std::time::Instant)>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Some(number of identical messages suppressed since the last line) when
    /// `message` should be logged now.
    pub fn admit(&mut self, message: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let due = match &self.last {
            None => true,
            Some((m, at)) => m != message || now.duration_since(*at) >= self.every,
        };
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.last = Some((message.to_owned(), now));
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// How often an unchanged start-up or connection error is logged again.
pub const REPEAT_LOG_EVERY: Duration = Duration::from_secs(60);

/// The warnings of the retry loops that last as long as an outage does (the
/// batch path's writes, decodes and dead letters, the timer loop): per
/// retrying step, the first failure, one whose error differs from the last
/// logged, then one per [`REPEAT_LOG_EVERY`] saying how many were left out.
/// A retry a second for an hour's outage is noise; the metrics
/// (`lapse_retries_total`, `/readyz`) count every one.
#[derive(Default)]
pub struct RetryLog(std::sync::Mutex<std::collections::HashMap<&'static str, LogLimiter>>);

impl RetryLog {
    /// Warns that `step` failed with `error` and is retried, unless limited.
    pub fn warn(&self, step: &'static str, error: &dyn std::fmt::Display) {
        let text = error.to_string();
        let admitted = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(step)
            .or_insert_with(|| LogLimiter::new(REPEAT_LOG_EVERY))
            .admit(&text);
        if let Some(suppressed) = admitted {
            warn!(error = %text, suppressed, "{step}; retrying");
        }
    }
}

/// Retries a start-up step with back-off until it succeeds, so lapse can start
/// before its dependencies and waits (not ready, HTTP up) while one of them
/// refuses it. Every failure is passed to `failed` (for `/readyz`); the first
/// is logged at error level, later ones only when the message changes or once
/// per [`REPEAT_LOG_EVERY`]. Gives up, with an error, only when `shutdown` is
/// raised.
pub async fn with_startup_retry<T, F, Fut>(
    what: &str,
    retry: &RetryConfig,
    shutdown: &AtomicBool,
    mut failed: impl FnMut(&anyhow::Error),
    mut step: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new(retry);
    let mut limiter = LogLimiter::new(REPEAT_LOG_EVERY);
    let mut attempts = 0u64;
    loop {
        let e = match step().await {
            Ok(v) => {
                if attempts > 0 {
                    info!("{what}: available after {attempts} failed attempt(s)");
                }
                return Ok(v);
            }
            Err(e) => e,
        };
        attempts += 1;
        failed(&e);
        let message = format!("{e:#}");
        if let Some(suppressed) = limiter.admit(&message) {
            if attempts == 1 {
                error!(error = %message, "{what} not available; retrying with back-off (/readyz says why)");
            } else {
                warn!(error = %message, attempts, suppressed, "{what} still not available; retrying with back-off");
            }
        }
        if !backoff.wait(shutdown).await {
            return Err(e.context(format!(
                "{what}: shut down before it became available ({attempts} attempts)"
            )));
        }
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
    async fn start_up_steps_are_retried_until_they_succeed_or_shutdown() {
        let mut calls = 0;
        let mut failures = 0;
        let shutdown = AtomicBool::new(false);
        let v = with_startup_retry(
            "thing",
            &retry(5, 20),
            &shutdown,
            |_| failures += 1,
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        anyhow::bail!("not yet")
                    }
                    Ok(n)
                }
            },
        )
        .await
        .unwrap();
        assert_eq!((v, failures), (3, 2));

        let shutdown = std::sync::Arc::new(AtomicBool::new(false));
        let raise = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            raise.store(true, Ordering::SeqCst);
        });
        let started = std::time::Instant::now();
        let e = with_startup_retry(
            "thing",
            &retry(10, 40),
            &shutdown,
            |_| {},
            || async { anyhow::bail!("down") as anyhow::Result<()> },
        )
        .await
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("thing: shut down before"),
            "{e:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn repeated_messages_are_logged_once_per_period_or_when_they_change() {
        let mut l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.admit("wrong password"), Some(0));
        for _ in 0..100 {
            assert_eq!(l.admit("wrong password"), None);
        }
        assert_eq!(l.admit("connection refused"), Some(100));
        let mut l = LogLimiter::new(Duration::ZERO);
        assert_eq!(l.admit("a"), Some(0));
        assert_eq!(l.admit("a"), Some(0));
    }
}
