//! The event clock of a replay, known before it starts: the clock is the latest
//! event time replayed, so it moves at the records later than every record
//! before them. From those moves alone follows when a customer's timer fires
//! (before which record, at which time), whatever the other customers do: so
//! each customer can be replayed on its own.
//!
//! The rule is the live timer loop's that keeps up (`mod.rs`): a timer due at
//! `d` fires before the first record that moves the clock to `d` or beyond
//! (not before a record that does not move it), at `d` or at the clock before
//! that record, whichever is later; timers due by the end of the history fire
//! at its end, at the clock.

/// The clock over a history in replay order.
pub struct EventClock {
    /// The clock after each record (its event time, or the clock before it
    /// when that is later): ascending.
    after: Vec<i64>,
    /// Every `BLOCK`th of `after`: searched first, small enough to stay in cache.
    coarse: Vec<i64>,
}

/// Records per entry of `coarse`.
const BLOCK: usize = 64;

/// Where and when a timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    /// Before the record at this position (the history's length: at its end).
    pub before: usize,
    /// The time it fires at.
    pub now: i64,
}

impl EventClock {
    /// The clock over records at these event times, in replay order.
    pub fn new(times: impl Iterator<Item = i64>) -> EventClock {
        let mut clock = i64::MIN;
        let after: Vec<i64> = times
            .map(|t| {
                clock = clock.max(t);
                clock
            })
            .collect();
        let coarse = after.iter().step_by(BLOCK).copied().collect();
        EventClock { after, coarse }
    }

    /// The clock at the end of the history.
    pub fn end(&self) -> i64 {
        self.after.last().copied().unwrap_or(i64::MIN)
    }

    /// The clock before the record at `at`.
    fn before(&self, at: usize) -> i64 {
        at.checked_sub(1)
            .and_then(|i| self.after.get(i))
            .copied()
            .unwrap_or(i64::MIN)
    }

    /// A timer due at `due`, scheduled before the record at position `from`
    /// (after the record before it, or by a timer that fired before it):
    /// where and when it fires, `None` if never within the history.
    pub fn firing(&self, from: usize, due: i64) -> Option<Firing> {
        let clock = self.before(from);
        // The first record from `from` on that moves the clock (beyond `clock`)
        // to `due` or later: the first whose clock after reaches both.
        let reach = due.max(clock.saturating_add(1));
        let at = from.max(self.first_reaching(reach));
        if at < self.after.len() {
            return Some(Firing {
                before: at,
                now: due.max(self.before(at)),
            });
        }
        (due <= self.end()).then(|| Firing {
            before: self.after.len(),
            now: self.end(),
        })
    }

    /// The first position whose clock after is `t` or later (the length if none).
    fn first_reaching(&self, t: i64) -> usize {
        // The block it is in, then the position within it: a few cache lines.
        let block = self.coarse.partition_point(|c| *c < t).saturating_sub(1);
        let start = block * BLOCK;
        let end = (start + BLOCK).min(self.after.len());
        start + self.after[start..end].partition_point(|c| *c < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_fires_before_the_first_record_that_moves_the_clock_to_it() {
        // Positions:               0   1   2   3   4   5
        let c = EventClock::new([10, 20, 15, 20, 40, 30].into_iter());
        assert_eq!(c.end(), 40);
        let f = |before, now| Some(Firing { before, now });
        // Due 18, scheduled after record 0: record 1 moves the clock from 10 to 20.
        assert_eq!(c.firing(1, 18), f(1, 18));
        // Due 12, scheduled after record 1 (clock 20): records 2 and 3 do not
        // move the clock; record 4 does, so it fires there, at the clock before it.
        assert_eq!(c.firing(2, 12), f(4, 20));
        // Due 40 exactly: record 4 moves the clock to it.
        assert_eq!(c.firing(0, 40), f(4, 40));
        // Due by the end, after the last move: at the end, at the clock.
        assert_eq!(c.firing(5, 35), f(6, 40));
        assert_eq!(c.firing(6, 40), f(6, 40));
        // Due after the end: never.
        assert_eq!(c.firing(0, 41), None);
        assert_eq!(EventClock::new(std::iter::empty()).firing(0, 0), None);
    }

    /// Against the rule read literally, over records out of order (blocks of
    /// the coarse index included).
    #[test]
    fn firings_follow_the_rule_over_a_long_history() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        let times: Vec<i64> = (0..1_000)
            .map(|i| i * 10 + rng.random_range(-300..30))
            .collect();
        let c = EventClock::new(times.iter().copied());
        let rule = |from: usize, due: i64| {
            let mut clock = times[..from].iter().copied().max().unwrap_or(i64::MIN);
            for (at, t) in times.iter().enumerate().skip(from) {
                if *t > clock {
                    if *t >= due {
                        return Some(Firing {
                            before: at,
                            now: due.max(clock),
                        });
                    }
                    clock = *t;
                }
            }
            (due <= clock).then_some(Firing {
                before: times.len(),
                now: clock,
            })
        };
        for _ in 0..5_000 {
            let from = rng.random_range(0..=times.len());
            let due = rng.random_range(-400..10_100);
            assert_eq!(
                c.firing(from, due),
                rule(from, due),
                "from {from}, due {due}"
            );
        }
    }
}
