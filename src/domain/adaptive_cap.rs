//! Engagement-adaptive caps: "打开率较高的用户可以适当增加频次, 而对邮件无反应的用户
//!则应减少频次" (the frequency article on e-mail: customers who open a lot may
//! get more, those who never react fewer). A customer whose short-horizon
//! engagement on a channel is at least `raise_at` × the population rate gets
//! that channel's cap raised by `raise_by`; at most `lower_at` × it, lowered by
//! `lower_by` (never below 1: the click-rate throttle covers the floor). Only
//! with `min_sends` decayed sends on the chosen horizon, so a handful of sends
//! makes no verdict; the rate is smoothed towards the population rate like
//! the throttle's. E-mail looks at the long horizon (90-day half-life): at its
//! cap of 2 a month the short one (14 days) never holds more than ~2.6 decayed
//! sends, too few to judge a customer by.
//!
//! On by default for EMAIL only, as the article says for e-mail alone; other
//! channels have no such advice (and WeChat/SMS caps are already tight).

use serde::{Deserialize, Serialize};

use super::engagement::Counts;
use super::policy::{EngagementSignal, MAX_CAP};

/// Which decayed counts a rate is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Horizon {
    /// 14-day half-life (`state` horizons): channels sent to weekly or more.
    Short,
    /// 90-day half-life: monthly channels.
    Long,
}

/// `[policy.adaptive_caps.CHANNEL]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveCap {
    pub enabled: bool,
    /// What counts as engagement (e-mail: opens, as the article says).
    pub signal: EngagementSignal,
    pub horizon: Horizon,
    /// The population's rate of that signal on the channel (the reference).
    pub population_rate: f64,
    /// Raise at or above this × the population rate ...
    pub raise_at: f64,
    /// ... by this many sends per window (0: never raised).
    pub raise_by: u32,
    /// Lower at or below this × the population rate ...
    pub lower_at: f64,
    /// ... by this many (0: never lowered; never below 1).
    pub lower_by: u32,
    /// Decayed short-horizon sends needed before the rate counts.
    pub min_sends: f64,
    /// Weight of the population rate in the smoothed rate, in sends.
    pub prior_weight: f64,
}

impl Default for AdaptiveCap {
    /// The e-mail default: 2 a month becomes 3 for customers opening at least
    /// twice as often as the population, 1 for those opening at most half as
    /// often, once 3 sends (decayed) back the rate. Not 4: at the lowered cap
    /// of 1 a month the long horizon holds 3.8–4.9 decayed sends, and a bar
    /// above that would let the verdict lapse between sends (2, 1, 2, ...).
    fn default() -> Self {
        AdaptiveCap {
            enabled: true,
            signal: EngagementSignal::OpensAndReplies,
            horizon: Horizon::Long,
            population_rate: 0.20,
            raise_at: 2.0,
            raise_by: 1,
            lower_at: 0.5,
            lower_by: 1,
            min_sends: 3.0,
            prior_weight: 2.0,
        }
    }
}

/// Most a cap can move either way.
pub const MAX_ADJUST: u32 = 10;

impl AdaptiveCap {
    /// Checks the values; `key` names the table in errors.
    pub fn validate(&self, key: &str) -> Result<(), (String, String)> {
        let bad = |field: &str, msg: &str| Err((format!("{key}.{field}"), msg.to_string()));
        if !(self.population_rate > 0.0 && self.population_rate < 1.0) {
            return bad("population_rate", "must be between 0 and 1 (exclusive)");
        }
        if !(self.lower_at >= 0.0 && self.raise_at > self.lower_at) {
            return bad(
                "raise_at",
                "must be greater than lower_at (and lower_at >= 0), or a customer is raised and lowered at once",
            );
        }
        if self.raise_by > MAX_ADJUST || self.lower_by > MAX_ADJUST {
            return bad(
                "raise_by",
                &format!("raise_by and lower_by must be at most {MAX_ADJUST}"),
            );
        }
        if !(self.min_sends >= 1.0 && self.prior_weight >= 0.0) {
            return bad("min_sends", "must be >= 1 (and prior_weight >= 0)");
        }
        Ok(())
    }

    /// How the cap moves for a customer with these (short, long) counts.
    pub fn adjustment(&self, short: &Counts, long: &Counts) -> i32 {
        let c = match self.horizon {
            Horizon::Short => short,
            Horizon::Long => long,
        };
        let sends = f64::from(c.sends);
        if !self.enabled || sends < self.min_sends {
            return 0;
        }
        let engaged = f64::from(match self.signal {
            EngagementSignal::Clicks => c.clicks + c.replies,
            EngagementSignal::OpensAndReplies => c.opens + c.replies,
        });
        let rate =
            (engaged + self.prior_weight * self.population_rate) / (sends + self.prior_weight);
        if rate >= self.raise_at * self.population_rate {
            self.raise_by as i32
        } else if rate <= self.lower_at * self.population_rate {
            -(self.lower_by as i32)
        } else {
            0
        }
    }

    /// The most it can add to a cap (bounds the send memory).
    pub fn max_raise(&self) -> u32 {
        if self.enabled {
            self.raise_by
        } else {
            0
        }
    }
}

/// A cap limit moved by `adjust`, kept within 1..=MAX_CAP.
pub fn adjusted(limit: u32, adjust: i32) -> u32 {
    (i64::from(limit) + i64::from(adjust)).clamp(1, i64::from(MAX_CAP)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(sends: f32, opens: f32) -> Counts {
        Counts {
            sends,
            opens,
            ..Counts::default()
        }
    }

    #[test]
    fn email_customers_are_raised_lowered_or_left_by_their_open_rate() {
        let a = AdaptiveCap::default();
        // (short sends, opens) -> adjustment, with the e-mail default
        // (population 20 %, raise at >= 40 %, lower at <= 10 %, 3 sends, prior 2).
        let table = [
            ((0.0, 0.0), 0),   // no sends: no verdict
            ((2.9, 2.9), 0),   // opens all, but below min_sends
            ((4.0, 4.0), 1),   // (4 + 0.4) / 6 = 73 %
            ((6.0, 3.0), 1),   // (3 + 0.4) / 8 = 42.5 %
            ((6.0, 2.0), 0),   // 30 %: in between
            ((10.0, 1.0), 0),  // (1 + 0.4) / 12 = 11.7 %: not yet lowered
            ((3.0, 0.0), -1),  // 0.4 / 5 = 8 %: a non-responder once 3 sends back it
            ((20.0, 0.0), -1), // 0.4 / 22 = 1.8 %
            ((20.0, 1.0), -1), // 1.4 / 22 = 6.4 %
        ];
        for ((sends, opens), want) in table {
            let got = a.adjustment(&Counts::default(), &counts(sends, opens));
            assert_eq!(got, want, "{sends} sends, {opens} opens");
        }
        // The horizon chosen is the one read.
        let short = AdaptiveCap {
            horizon: Horizon::Short,
            ..a
        };
        assert_eq!(short.adjustment(&counts(4.0, 4.0), &counts(20.0, 0.0)), 1);
        assert_eq!(a.adjustment(&counts(4.0, 4.0), &counts(20.0, 0.0)), -1);
        // Clicks do not count for e-mail's default signal; they do with `clicks`.
        let clicks = Counts {
            sends: 6.0,
            clicks: 6.0,
            ..Counts::default()
        };
        assert_eq!(a.adjustment(&clicks, &clicks), -1);
        let by_clicks = AdaptiveCap {
            signal: EngagementSignal::Clicks,
            ..a
        };
        assert_eq!(by_clicks.adjustment(&clicks, &clicks), 1);
        // Off: nothing moves.
        let off = AdaptiveCap {
            enabled: false,
            ..a
        };
        assert_eq!(off.adjustment(&counts(20.0, 20.0), &counts(20.0, 20.0)), 0);
        assert_eq!(off.max_raise(), 0);
    }

    #[test]
    fn caps_stay_within_one_and_the_maximum() {
        assert_eq!(adjusted(2, 1), 3);
        assert_eq!(adjusted(2, -1), 1);
        assert_eq!(adjusted(1, -1), 1);
        assert_eq!(adjusted(MAX_CAP, 5), MAX_CAP);
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let ok = AdaptiveCap::default();
        assert!(ok.validate("policy.adaptive_caps.EMAIL").is_ok());
        for (bad, field) in [
            (
                AdaptiveCap {
                    population_rate: 0.0,
                    ..ok
                },
                "population_rate",
            ),
            (
                AdaptiveCap {
                    raise_at: 0.5,
                    ..ok
                },
                "raise_at",
            ),
            (
                AdaptiveCap {
                    raise_by: MAX_ADJUST + 1,
                    ..ok
                },
                "raise_by",
            ),
            (
                AdaptiveCap {
                    min_sends: 0.0,
                    ..ok
                },
                "min_sends",
            ),
        ] {
            let (key, _) = bad.validate("policy.adaptive_caps.EMAIL").unwrap_err();
            assert_eq!(key, format!("policy.adaptive_caps.EMAIL.{field}"));
        }
    }
}
