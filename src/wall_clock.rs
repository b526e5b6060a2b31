//! Production time: the system clock behind the domain's injected `Clock`.
//! It lives outside `domain/`, which never reads a clock itself.

use crate::domain::clock::Clock;

/// Milliseconds since the Unix epoch, read from the system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct WallClock;

impl Clock for WallClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}
