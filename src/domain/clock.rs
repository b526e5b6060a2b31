//! Time is injected: the domain never reads a clock itself (production time,
//! `WallClock`, is on the service side).

use std::sync::atomic::{AtomicI64, Ordering};

pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// A clock tests and replays move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(ms))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Event time: the highest event timestamp applied so far (a watermark). Replays
/// of history and tests run months of timers in seconds.
#[derive(Debug, Default)]
pub struct EventClock(AtomicI64);

impl EventClock {
    pub fn new() -> EventClock {
        EventClock(AtomicI64::new(0))
    }

    /// Moves the watermark forward to `t` (never backward).
    pub fn advance(&self, t: i64) {
        self.0.fetch_max(t, Ordering::SeqCst);
    }
}

impl Clock for EventClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}
