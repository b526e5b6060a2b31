//! `[[policy.experiments]]`: contact-policy experiments as configured (issue 15).
//!
//! An experiment runs for one tenant between `start` and `end` (local
//! `YYYY-MM-DDTHH:MM` in the tenant's time zone, like boosts) and splits its
//! customers into arms by `share`. One arm is named `control` and has no
//! overrides (it is the tenant's policy); every other arm overrides some of the
//! policy keys below. Experiment and arm names become metric labels and output
//! fields, so they are short identifiers and their number is bounded.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::domain::event::Channel;
use crate::domain::lapse::Segment;
use crate::domain::policy::{CapRule, QuietHours};
use crate::domain::span::Span;

/// At most this many experiments in the whole configuration (labels stay bounded).
pub const MAX_EXPERIMENTS: usize = 16;
/// At most this many arms per experiment, `control` included.
pub const MAX_ARMS: usize = 4;
/// Longest experiment or arm name.
pub const MAX_NAME_LEN: usize = 32;
/// The arm every experiment has: the tenant's policy, unchanged.
pub const CONTROL: &str = "control";

/// One experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Unique, `[a-z0-9_-]`, 1 to 32 characters; part of the assignment hash
    /// (renaming it re-draws the arms).
    pub name: String,
    /// The tenant whose customers take part.
    pub tenant: String,
    /// `YYYY-MM-DDTHH:MM` in the tenant's time zone, inclusive.
    pub start: String,
    /// `YYYY-MM-DDTHH:MM` in the tenant's time zone, exclusive.
    pub end: String,
    pub arms: Vec<ArmConfig>,
    /// Error level of the report's always-valid intervals: the chance that an
    /// interval *ever* misses the true difference, however often it is read.
    /// Default 0.05.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// The difference the experiment looks for, in standard deviations of one
    /// customer's measure: the intervals' mixing scale (τ) and the effect the
    /// sample-size estimate is for. Default 0.1.
    #[serde(default = "default_effect")]
    pub effect: f64,
    /// The measure that names the winner (see `lapse experiment report`).
    /// Default `clicks_per_customer`.
    #[serde(default = "default_primary")]
    pub primary: String,
    /// Increase of the unsubscribe rate over the control's (absolute, e.g.
    /// 0.002 = 0.2 points) tolerated before an arm is flagged. Default 0.
    #[serde(default)]
    pub guardrail_margin: f64,
    /// Stop a flagged arm: from then on its customers get the control's policy,
    /// and each gets a throttle event per channel the arm changed. Default false
    /// (flag only).
    #[serde(default)]
    pub auto_stop: bool,
}

fn default_alpha() -> f64 {
    0.05
}

fn default_effect() -> f64 {
    0.1
}

fn default_primary() -> String {
    "clicks_per_customer".into()
}

/// One arm: its traffic share and the policy keys it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArmConfig {
    /// `control`, or a name like `name` of the experiment.
    pub name: String,
    /// Share of the tenant's customers, in (0, 1]; the shares sum to 1.
    pub share: f64,
    /// Replace the channel's cap (limit and window).
    pub caps: BTreeMap<Channel, CapRule>,
    /// Replace (or add) the channel's quiet hours.
    pub quiet_hours: BTreeMap<Channel, QuietHours>,
    pub throttle: ThrottleOverride,
    pub recall: RecallOverride,
}

/// Click-rate throttle thresholds an arm may change (the rest stays the tenant's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleOverride {
    pub throttle_below: Option<f64>,
    pub floor: Option<f64>,
    pub release_above: Option<f64>,
    pub min_sends: Option<f64>,
    pub cooldown: Option<Span>,
}

/// Recall stage offsets an arm may change (`policy.lapse` keys of the same names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecallOverride {
    pub at_risk_factor: Option<f64>,
    pub lapsed_factor: Option<f64>,
    pub lapsed_min_days: Option<u32>,
    pub follow_up_every_days: Option<u32>,
    pub max_follow_ups: Option<u32>,
    /// Offer tier per segment (`policy.lapse.offers`), e.g.
    /// `recall.offers.LOW_VALUE_LAPSED = "coupon-20pct"`.
    pub offers: BTreeMap<Segment, String>,
    /// Preferred channels per segment (`policy.lapse.channel_preference`).
    pub channel_preference: BTreeMap<Segment, Vec<Channel>>,
}

impl ThrottleOverride {
    fn keys(&self) -> impl Iterator<Item = &'static str> {
        [
            ("throttle_below", self.throttle_below.is_some()),
            ("floor", self.floor.is_some()),
            ("release_above", self.release_above.is_some()),
            ("min_sends", self.min_sends.is_some()),
            ("cooldown", self.cooldown.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
    }
}

impl RecallOverride {
    /// The stage offsets it changes (`recall.KEY`).
    fn offset_keys(&self) -> impl Iterator<Item = &'static str> {
        [
            ("at_risk_factor", self.at_risk_factor.is_some()),
            ("lapsed_factor", self.lapsed_factor.is_some()),
            ("lapsed_min_days", self.lapsed_min_days.is_some()),
            ("follow_up_every_days", self.follow_up_every_days.is_some()),
            ("max_follow_ups", self.max_follow_ups.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
    }
}

/// A policy key an arm changes, e.g. `caps.WECHAT`, `throttle.floor`, `recall.lapsed_factor`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKey {
    Cap(Channel),
    QuietHours(Channel),
    Throttle(&'static str),
    Recall(&'static str),
    /// The offer tier of a segment's triggers.
    Offer(Segment),
    /// The channel preference of a segment's triggers.
    ChannelPreference(Segment),
}

impl PolicyKey {
    /// Whether the key changes decisions on channel `c` (its allowance).
    pub fn touches_channel(&self, c: Channel) -> bool {
        match self {
            PolicyKey::Cap(x) | PolicyKey::QuietHours(x) => *x == c,
            PolicyKey::Throttle(_) => true,
            _ => false,
        }
    }

    /// Whether the key changes recall decisions (stage due times, or what a
    /// trigger says).
    pub fn touches_recall(&self) -> bool {
        matches!(
            self,
            PolicyKey::Recall(_) | PolicyKey::Offer(_) | PolicyKey::ChannelPreference(_)
        )
    }

    /// Whether the key changes what a segment's trigger says (not when it fires).
    pub fn shapes_triggers(&self) -> Option<Segment> {
        match self {
            PolicyKey::Offer(s) | PolicyKey::ChannelPreference(s) => Some(*s),
            _ => None,
        }
    }
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyKey::Cap(c) => write!(f, "caps.{c}"),
            PolicyKey::QuietHours(c) => write!(f, "quiet_hours.{c}"),
            PolicyKey::Throttle(k) => write!(f, "throttle.{k}"),
            PolicyKey::Recall(k) => write!(f, "recall.{k}"),
            PolicyKey::Offer(s) => write!(f, "recall.offers.{}", s.as_str()),
            PolicyKey::ChannelPreference(s) => {
                write!(f, "recall.channel_preference.{}", s.as_str())
            }
        }
    }
}

impl ArmConfig {
    /// The policy keys this arm changes.
    pub fn keys(&self) -> BTreeSet<PolicyKey> {
        let mut k = BTreeSet::new();
        k.extend(self.caps.keys().map(|c| PolicyKey::Cap(*c)));
        k.extend(self.quiet_hours.keys().map(|c| PolicyKey::QuietHours(*c)));
        k.extend(self.throttle.keys().map(PolicyKey::Throttle));
        k.extend(self.recall.offset_keys().map(PolicyKey::Recall));
        k.extend(self.recall.offers.keys().map(|s| PolicyKey::Offer(*s)));
        k.extend(
            self.recall
                .channel_preference
                .keys()
                .map(|s| PolicyKey::ChannelPreference(*s)),
        );
        k
    }

    pub fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }
}

/// Whether `s` may be an experiment or arm name (a bounded metric label).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
