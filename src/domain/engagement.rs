//! Exponentially decayed engagement counts per customer×channel.
//!
//! A count at reference time `at` is Σ 2^-((at − tᵢ)/half_life) over past events,
//! so folding in an event is order-independent: an event later than `at` decays the
//! stored counts forward; an earlier (late-arriving) one is added already decayed.

use serde::{Deserialize, Serialize};

/// Decayed counts of the four engagement signals over one horizon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub sends: f32,
    pub opens: f32,
    pub clicks: f32,
    pub replies: f32,
}

/// Which signal an event adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Send,
    Open,
    Click,
    Reply,
}

impl Counts {
    fn scale(&mut self, f: f64) {
        self.sends = (self.sends as f64 * f) as f32;
        self.opens = (self.opens as f64 * f) as f32;
        self.clicks = (self.clicks as f64 * f) as f32;
        self.replies = (self.replies as f64 * f) as f32;
    }

    fn add(&mut self, s: Signal, w: f64) {
        let slot = match s {
            Signal::Send => &mut self.sends,
            Signal::Open => &mut self.opens,
            Signal::Click => &mut self.clicks,
            Signal::Reply => &mut self.replies,
        };
        *slot = (*slot as f64 + w) as f32;
    }
}

/// Decay factor for `dt_ms` at `half_life_ms`.
pub fn decay(dt_ms: i64, half_life_ms: i64) -> f64 {
    if dt_ms <= 0 {
        return 1.0;
    }
    (-(dt_ms as f64) / half_life_ms as f64 * std::f64::consts::LN_2).exp()
}

/// Engagement of one customer on one channel. Decayed `sends` count MARKETING
/// sends only: service messages are neither capped nor part of the click rate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelEngagement {
    /// Reference time of the decayed counts (latest event time seen), ms.
    pub at: i64,
    /// Short-horizon decayed counts.
    pub short: Counts,
    /// Long-horizon (baseline) decayed counts.
    pub long: Counts,
    /// Event time of the latest send, open, click and reply, ms.
    pub last_send: Option<i64>,
    pub last_open: Option<i64>,
    pub last_click: Option<i64>,
    pub last_reply: Option<i64>,
    /// Event time of the latest SERVICE send (these never count in the rates).
    pub last_service_send: Option<i64>,
    /// Event time of the latest unsubscribe and re-subscribe reply, ms.
    pub unsubscribed_at: Option<i64>,
    pub resubscribed_at: Option<i64>,
}

/// Half-lives of the two horizons, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizons {
    pub short_half_life_ms: i64,
    pub long_half_life_ms: i64,
}

impl ChannelEngagement {
    /// Opted out: the latest unsubscribe is newer than the latest re-subscribe.
    pub fn is_unsubscribed(&self) -> bool {
        match (self.unsubscribed_at, self.resubscribed_at) {
            (Some(u), Some(r)) => u > r,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// Folds one signal at event time `t` into the counts.
    pub fn record(&mut self, s: Signal, t: i64, h: Horizons) {
        if self.at == 0 && self.short == Counts::default() && self.long == Counts::default() {
            self.at = t;
        }
        if t >= self.at {
            self.short.scale(decay(t - self.at, h.short_half_life_ms));
            self.long.scale(decay(t - self.at, h.long_half_life_ms));
            self.at = t;
            self.short.add(s, 1.0);
            self.long.add(s, 1.0);
        } else {
            self.short.add(s, decay(self.at - t, h.short_half_life_ms));
            self.long.add(s, decay(self.at - t, h.long_half_life_ms));
        }
        let last = match s {
            Signal::Send => &mut self.last_send,
            Signal::Open => &mut self.last_open,
            Signal::Click => &mut self.last_click,
            Signal::Reply => &mut self.last_reply,
        };
        *last = Some(last.map_or(t, |prev| prev.max(t)));
    }

    /// Counts as of `now` (decayed further, never mutated).
    pub fn counts_at(&self, now: i64, h: Horizons) -> (Counts, Counts) {
        let mut s = self.short;
        let mut l = self.long;
        s.scale(decay(now - self.at, h.short_half_life_ms));
        l.scale(decay(now - self.at, h.long_half_life_ms));
        (s, l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const H: Horizons = Horizons {
        short_half_life_ms: 1000,
        long_half_life_ms: 10_000,
    };

    #[test]
    fn one_half_life_halves() {
        let mut e = ChannelEngagement::default();
        e.record(Signal::Send, 5000, H);
        let (s, l) = e.counts_at(6000, H);
        assert!((s.sends - 0.5).abs() < 1e-6);
        assert!((l.sends - 2f32.powf(-0.1)).abs() < 1e-6);
    }

    #[test]
    fn order_does_not_matter() {
        let events = [
            (Signal::Send, 100),
            (Signal::Click, 2500),
            (Signal::Send, 900),
            (Signal::Open, 4000),
        ];
        let mut a = ChannelEngagement::default();
        for (s, t) in events {
            a.record(s, t, H);
        }
        let mut b = ChannelEngagement::default();
        for (s, t) in events.iter().rev() {
            b.record(*s, *t, H);
        }
        let (sa, la) = a.counts_at(5000, H);
        let (sb, lb) = b.counts_at(5000, H);
        for (x, y) in [
            (sa.sends, sb.sends),
            (sa.clicks, sb.clicks),
            (la.opens, lb.opens),
            (la.sends, lb.sends),
        ] {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        assert_eq!(a.last_send, Some(900));
        assert_eq!(b.last_send, Some(900));
    }
}
