//! When is a customer overdue: the expected revisit interval, the value tier,
//! and the stage schedule of a lapse episode.
//!
//! Pure: no IO, no clock. Every time is an argument (ms since the Unix epoch).
//!
//! # The model
//!
//! * **Expected interval.** With at least `min_gaps_for_learning` gaps between the
//!   customer's recent visits (gaps under one day are ignored: a consultation and
//!   the treatment on the same day are one visit), it is learnt from those gaps: the
//!   recency-weighted mean of the gaps that lie within a factor
//!   [`TRIM_FACTOR`] of their median (the median makes it robust to one long break;
//!   the weights, halving every `gap_half_life` gaps back in time, make it follow a
//!   change of habit). Otherwise it is a default: `consultation_follow_up_days` when
//!   the last visit was a consultation at which no treatment was done, else the
//!   `interval_days` entry of the last treatment (upper-cased), else
//!   `other_interval_days`. Either way it is clamped to
//!   `[min_interval_days, max_interval_days]`.
//! * **Value tier.** `High` when lifetime spend ≥ `high_value_threshold`.
//! * **Schedule.** An episode starts at the last visit `L` with interval `I` days:
//!   `AT_RISK` at `L + at_risk_factor·I`; `LAPSED` at
//!   `L + max(lapsed_factor·I, lapsed_min_days)`; `FOLLOW_UP` #k at
//!   `LAPSED + k·follow_up_every_days` for k in 1..=`max_follow_ups`; `DORMANT` at the
//!   last touch + `max(dormant_after_days, attribution_window_days)` — never before
//!   the attribution window of the last touch has run out, so that a NOT_RECALLED
//!   outcome is final (the recall module moves it later still if the last touch
//!   fired late).
//! * **Segment.** The `AT_RISK` stage is segment `AT_RISK`; `LAPSED`, `FOLLOW_UP`
//!   and `DORMANT` are `HIGH_VALUE_LAPSED` or `LOW_VALUE_LAPSED` by tier.

use serde::{Deserialize, Serialize};

use crate::domain::event::Channel;
use std::collections::BTreeMap;
use std::fmt;

use super::event::VisitType;
use super::visits::Visits;

/// One day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// Gaps farther than this factor from the median gap are left out of the learnt
/// interval (e.g. a one-year break in a 3-monthly habit).
pub const TRIM_FACTOR: f64 = 2.5;

/// Gaps shorter than this are not gaps (same-day consultation + treatment).
pub const MIN_GAP_MS: i64 = DAY_MS;

/// Upper bound of `max_follow_ups` (keeps the per-episode state bounded).
pub const MAX_FOLLOW_UPS_LIMIT: u32 = 10;

/// Longest offer tier (in `offers`, `offer_costs`) and `Visit.offer_code`, bytes.
pub const MAX_OFFER_CODE: usize = 100;

/// Stage of a trigger, as in the Avro enum `lapse.v1.RecallStage`: the four
/// stages of a lapse episode, and `CareCall`, a service follow-up of a
/// detractor's feedback that is no part of any episode (`domain::feedback`).
/// Appended last: postcard stores the variant index in outboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Stage {
    AtRisk,
    Lapsed,
    FollowUp,
    Dormant,
    CareCall,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::AtRisk,
        Stage::Lapsed,
        Stage::FollowUp,
        Stage::Dormant,
        Stage::CareCall,
    ];

    /// Symbol as written in the Avro enum (also part of the stable trigger id).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::AtRisk => "AT_RISK",
            Stage::Lapsed => "LAPSED",
            Stage::FollowUp => "FOLLOW_UP",
            Stage::Dormant => "DORMANT",
            Stage::CareCall => "CARE_CALL",
        }
    }

    /// Index of the symbol in the Avro enum.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Metric label value (lower case, bounded set).
    pub fn label(self) -> &'static str {
        match self {
            Stage::AtRisk => "at_risk",
            Stage::Lapsed => "lapsed",
            Stage::FollowUp => "follow_up",
            Stage::Dormant => "dormant",
            Stage::CareCall => "care_call",
        }
    }

    pub fn parse(symbol: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == symbol)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Win-back segment, as in the Avro enum `lapse.v1.Segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Segment {
    HighValueLapsed,
    AtRisk,
    LowValueLapsed,
}

impl Segment {
    pub const ALL: [Segment; 3] = [
        Segment::HighValueLapsed,
        Segment::AtRisk,
        Segment::LowValueLapsed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Segment::HighValueLapsed => "HIGH_VALUE_LAPSED",
            Segment::AtRisk => "AT_RISK",
            Segment::LowValueLapsed => "LOW_VALUE_LAPSED",
        }
    }

    /// Index of the symbol in the Avro enum.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Segment::HighValueLapsed => "high_value_lapsed",
            Segment::AtRisk => "at_risk",
            Segment::LowValueLapsed => "low_value_lapsed",
        }
    }

    pub fn parse(symbol: &str) -> Option<Segment> {
        Segment::ALL.into_iter().find(|s| s.as_str() == symbol)
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Value tier from lifetime spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueTier {
    /// Lifetime spend ≥ `high_value_threshold`.
    High,
    Standard,
}

/// Offer tier per segment (free-form strings the senders understand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Offers {
    /// Default `vip-care-call`.
    pub high_value_lapsed: String,
    /// Default `reminder-coupon-5pct`.
    pub at_risk: String,
    /// Default `coupon-10pct`.
    pub low_value_lapsed: String,
}

impl Default for Offers {
    fn default() -> Self {
        Offers {
            high_value_lapsed: "vip-care-call".into(),
            at_risk: "reminder-coupon-5pct".into(),
            low_value_lapsed: "coupon-10pct".into(),
        }
    }
}

impl Offers {
    pub fn for_segment(&self, s: Segment) -> &str {
        match s {
            Segment::HighValueLapsed => &self.high_value_lapsed,
            Segment::AtRisk => &self.at_risk,
            Segment::LowValueLapsed => &self.low_value_lapsed,
        }
    }

    pub fn for_segment_mut(&mut self, s: Segment) -> &mut String {
        match s {
            Segment::HighValueLapsed => &mut self.high_value_lapsed,
            Segment::AtRisk => &mut self.at_risk,
            Segment::LowValueLapsed => &mut self.low_value_lapsed,
        }
    }
}

/// Channels a segment's triggers prefer, best first (`[policy.lapse.channel_preference]`):
/// a listed channel that is available is recommended before any unlisted one,
/// in the order listed; unlisted channels follow by engagement. Empty (the
/// default): engagement alone decides. Never makes an unavailable channel
/// (capped, quiet, unsubscribed, PHONE below high value) recommendable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelPreference {
    pub high_value_lapsed: Vec<Channel>,
    pub at_risk: Vec<Channel>,
    pub low_value_lapsed: Vec<Channel>,
}

impl ChannelPreference {
    pub fn for_segment(&self, s: Segment) -> &[Channel] {
        match s {
            Segment::HighValueLapsed => &self.high_value_lapsed,
            Segment::AtRisk => &self.at_risk,
            Segment::LowValueLapsed => &self.low_value_lapsed,
        }
    }

    pub fn for_segment_mut(&mut self, s: Segment) -> &mut Vec<Channel> {
        match s {
            Segment::HighValueLapsed => &mut self.high_value_lapsed,
            Segment::AtRisk => &mut self.at_risk,
            Segment::LowValueLapsed => &mut self.low_value_lapsed,
        }
    }
}

/// Lapse and recall policy (`[policy.lapse]`, overridable per tenant).
///
/// Days are whole days. Defaults are those of the product brief (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LapsePolicy {
    /// Default interval by treatment, keys upper case. Default BOTOX 120, FILLER
    /// 270, LASER 30, SKIN_CARE 30. A table given in the config replaces this one
    /// as a whole.
    pub interval_days: BTreeMap<String, u32>,
    /// Default interval of a treatment not in `interval_days` (or of a visit that
    /// named none). Default 90.
    pub other_interval_days: u32,
    /// Default interval after a consultation at which no treatment was done (a
    /// short follow-up). Default 14.
    pub consultation_follow_up_days: u32,
    /// Visit gaps needed before the interval is learnt from them. Default 2.
    pub min_gaps_for_learning: u32,
    /// Recency weighting of learnt gaps: a gap's weight halves every this many
    /// gaps back in time. Default 4.
    pub gap_half_life: f64,
    /// Clamp of the expected interval. Defaults 7 and 730.
    pub min_interval_days: u32,
    pub max_interval_days: u32,
    /// `AT_RISK` fires at this × the interval after the last visit. Default 1.2.
    pub at_risk_factor: f64,
    /// `LAPSED` fires at this × the interval after the last visit... Default 1.5.
    pub lapsed_factor: f64,
    /// ...but not before this many days after it. Default 30.
    pub lapsed_min_days: u32,
    /// Days between `LAPSED` and the first follow-up, and between follow-ups. Default 30.
    pub follow_up_every_days: u32,
    /// Number of `FOLLOW_UP` touches (0..=10). Default 2.
    pub max_follow_ups: u32,
    /// Days after the last touch before the episode is given up (`DORMANT`);
    /// never less than `attribution_window_days`. Default 60.
    pub dormant_after_days: u32,
    /// Lifetime spend (minor units) from which a customer is high value. Default
    /// 2_000_000 (20,000.00 CNY).
    pub high_value_threshold: i64,
    /// A visit this many days or fewer after a trigger is a recall. Default 60.
    pub attribution_window_days: u32,
    /// Share of customers held out (never contacted), in [0, 1]. Default 0.10.
    pub holdout_share: f64,
    /// Experiment name: part of the holdout hash and of every trigger and
    /// outcome. Renaming it re-draws the arms. Default `recall-v1`.
    pub experiment: String,
    /// Offer tier per segment.
    pub offers: Offers,
    /// Preferred channels per segment (default none: by engagement).
    pub channel_preference: ChannelPreference,
    /// What redeeming an offer tier costs the clinic, minor units: the
    /// incentive of a recalling visit whose `offer_code` names the tier and
    /// that carries no `discount` of its own. Defaults (assumptions, the
    /// articles name no amounts): `vip-care-call` 5_000 (staff time of a care
    /// call), `reminder-coupon-5pct` 15_000 and `coupon-10pct` 30_000 (5 % and
    /// 10 % of a typical 3,000 CNY treatment). A table given in the config
    /// replaces this one as a whole; a tier missing from it costs 0 and is
    /// counted (`lapse_offer_codes_unknown_total`).
    pub offer_costs: BTreeMap<String, i64>,
    /// A paid visit after a `RECALLED` within this × the customer's expected
    /// interval (as of the recalling visit) of the recalling visit is a
    /// repurchase (one `REPURCHASED` outcome). Default 1.5 (the `LAPSED` factor:
    /// later than that, the customer would be lapsing again).
    pub repurchase_factor: f64,
    /// Channel engagement prior: a channel with no history scores this rate... Default 0.2.
    pub engagement_prior_rate: f64,
    /// ...with the weight of this many sends. Default 5.
    pub engagement_prior_sends: f64,
}

impl Default for LapsePolicy {
    fn default() -> Self {
        LapsePolicy {
            interval_days: [
                ("BOTOX", 120),
                ("FILLER", 270),
                ("LASER", 30),
                ("SKIN_CARE", 30),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            other_interval_days: 90,
            consultation_follow_up_days: 14,
            min_gaps_for_learning: 2,
            gap_half_life: 4.0,
            min_interval_days: 7,
            max_interval_days: 730,
            at_risk_factor: 1.2,
            lapsed_factor: 1.5,
            lapsed_min_days: 30,
            follow_up_every_days: 30,
            max_follow_ups: 2,
            dormant_after_days: 60,
            high_value_threshold: 2_000_000,
            attribution_window_days: 60,
            holdout_share: 0.10,
            experiment: "recall-v1".into(),
            offers: Offers::default(),
            channel_preference: ChannelPreference::default(),
            offer_costs: [
                ("vip-care-call", 5_000),
                ("reminder-coupon-5pct", 15_000),
                ("coupon-10pct", 30_000),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            repurchase_factor: 1.5,
            engagement_prior_rate: 0.2,
            engagement_prior_sends: 5.0,
        }
    }
}

impl LapsePolicy {
    /// Checks every value. The error is `(key, message)`, the key prefixed with
    /// `prefix` (e.g. `policy.lapse` or `policy.tenants.brandA.lapse`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        let bad = |field: &str, msg: String| Err((format!("{prefix}.{field}"), msg));
        let days = |field: &str, v: u32| -> Result<(), (String, String)> {
            if !(1..=3650).contains(&v) {
                return bad(field, "must be between 1 and 3650 days".into());
            }
            Ok(())
        };
        for (k, v) in &self.interval_days {
            let key = format!("interval_days.{k}");
            if k.is_empty() || *k != k.to_ascii_uppercase() {
                return bad(
                    &key,
                    "treatment names must be upper case, e.g. BOTOX".into(),
                );
            }
            days(&key, *v)?;
        }
        days("other_interval_days", self.other_interval_days)?;
        days(
            "consultation_follow_up_days",
            self.consultation_follow_up_days,
        )?;
        days("min_interval_days", self.min_interval_days)?;
        days("max_interval_days", self.max_interval_days)?;
        if self.min_interval_days > self.max_interval_days {
            return bad(
                "min_interval_days",
                format!(
                    "must not exceed max_interval_days ({})",
                    self.max_interval_days
                ),
            );
        }
        if !(1..=15).contains(&self.min_gaps_for_learning) {
            return bad(
                "min_gaps_for_learning",
                "must be between 1 and 15 (and below state.visit_history)".into(),
            );
        }
        if !(self.gap_half_life.is_finite() && self.gap_half_life > 0.0) {
            return bad("gap_half_life", "must be a positive number of gaps".into());
        }
        if !(self.at_risk_factor.is_finite() && (1.0..=10.0).contains(&self.at_risk_factor)) {
            return bad("at_risk_factor", "must be between 1.0 and 10.0".into());
        }
        if !(self.lapsed_factor.is_finite()
            && self.lapsed_factor > self.at_risk_factor
            && self.lapsed_factor <= 20.0)
        {
            return bad(
                "lapsed_factor",
                format!(
                    "must be greater than at_risk_factor ({}) and at most 20.0",
                    self.at_risk_factor
                ),
            );
        }
        days("lapsed_min_days", self.lapsed_min_days)?;
        days("follow_up_every_days", self.follow_up_every_days)?;
        if self.max_follow_ups > MAX_FOLLOW_UPS_LIMIT {
            return bad(
                "max_follow_ups",
                format!("must be between 0 and {MAX_FOLLOW_UPS_LIMIT}"),
            );
        }
        days("dormant_after_days", self.dormant_after_days)?;
        if self.high_value_threshold < 0 {
            return bad(
                "high_value_threshold",
                "must be zero or more (minor currency units)".into(),
            );
        }
        days("attribution_window_days", self.attribution_window_days)?;
        if !(self.holdout_share.is_finite() && (0.0..=1.0).contains(&self.holdout_share)) {
            return bad(
                "holdout_share",
                "must be between 0.0 and 1.0 (e.g. 0.10 for 10%)".into(),
            );
        }
        if self.experiment.trim().is_empty() || self.experiment.len() > 100 {
            return bad("experiment", "must be 1 to 100 characters".into());
        }
        for s in Segment::ALL {
            let offer = self.offers.for_segment(s);
            if offer.trim().is_empty() || offer.len() > MAX_OFFER_CODE {
                return bad(
                    &format!("offers.{}", s.label()),
                    "must be 1 to 100 characters".into(),
                );
            }
            let pref = self.channel_preference.for_segment(s);
            if (1..pref.len()).any(|i| pref[..i].contains(&pref[i])) {
                return bad(
                    &format!("channel_preference.{}", s.label()),
                    "lists a channel twice: list each at most once, best first".into(),
                );
            }
        }
        for (tier, cost) in &self.offer_costs {
            let key = format!("offer_costs.{tier}");
            if tier.trim().is_empty() || tier.len() > MAX_OFFER_CODE {
                return bad(
                    &key,
                    format!("offer tiers must be 1 to {MAX_OFFER_CODE} characters"),
                );
            }
            if *cost < 0 {
                return bad(&key, "must be zero or more (minor currency units)".into());
            }
        }
        if !(self.repurchase_factor.is_finite() && (0.1..=10.0).contains(&self.repurchase_factor)) {
            return bad(
                "repurchase_factor",
                "must be between 0.1 and 10.0 (× the expected interval)".into(),
            );
        }
        if !(self.engagement_prior_rate.is_finite()
            && (0.0..=10.0).contains(&self.engagement_prior_rate))
        {
            return bad(
                "engagement_prior_rate",
                "must be between 0.0 and 10.0".into(),
            );
        }
        if !(self.engagement_prior_sends.is_finite()
            && self.engagement_prior_sends > 0.0
            && self.engagement_prior_sends <= 1000.0)
        {
            return bad(
                "engagement_prior_sends",
                "must be greater than 0 and at most 1000".into(),
            );
        }
        Ok(())
    }

    /// Number of stages in an episode: AT_RISK, LAPSED, the follow-ups, DORMANT.
    pub fn stages_per_episode(&self) -> usize {
        3 + self.max_follow_ups as usize
    }

    /// Stage and attempt of the `index`-th stage of an episode (0-based), or None
    /// past DORMANT.
    pub fn stage_at(&self, index: usize) -> Option<(Stage, u32)> {
        let n = self.max_follow_ups as usize;
        match index {
            0 => Some((Stage::AtRisk, 1)),
            1 => Some((Stage::Lapsed, 1)),
            i if i < 2 + n => Some((Stage::FollowUp, (i - 1) as u32)),
            i if i == 2 + n => Some((Stage::Dormant, 1)),
            _ => None,
        }
    }

    /// Value tier of a lifetime spend.
    pub fn tier(&self, lifetime_spend: i64) -> ValueTier {
        if lifetime_spend >= self.high_value_threshold {
            ValueTier::High
        } else {
            ValueTier::Standard
        }
    }

    /// Attribution window in ms.
    pub fn attribution_window_ms(&self) -> i64 {
        self.attribution_window_days as i64 * DAY_MS
    }
}

/// Segment of a stage for a customer of `tier`.
pub fn segment_for(stage: Stage, tier: ValueTier) -> Segment {
    match (stage, tier) {
        (Stage::AtRisk, _) => Segment::AtRisk,
        (_, ValueTier::High) => Segment::HighValueLapsed,
        (_, ValueTier::Standard) => Segment::LowValueLapsed,
    }
}

/// Where an expected interval came from (shown by `lapse inspect`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum IntervalSource {
    /// Learnt from this many gaps (those used after trimming).
    Learned { gaps: usize, trimmed: usize },
    /// The default of this treatment (an `interval_days` key).
    TreatmentDefault { treatment: String },
    /// `other_interval_days`: unknown treatment, or none named.
    OtherDefault,
    /// `consultation_follow_up_days`: the last visit was a consultation only.
    ConsultationDefault,
}

/// A customer's expected revisit interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpectedInterval {
    /// Days, after clamping.
    pub days: f64,
    /// Before clamping.
    pub raw_days: f64,
    pub clamped: bool,
    #[serde(flatten)]
    pub source: IntervalSource,
}

impl ExpectedInterval {
    /// `factor ×` the interval, in ms (rounded to the millisecond).
    pub fn scaled_ms(&self, factor: f64) -> i64 {
        (factor * self.days * DAY_MS as f64).round() as i64
    }
}

/// Gaps between the recent visits in days, oldest first, same-day ones left out.
fn gaps_days(recent: &[i64]) -> Vec<f64> {
    recent
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|g| *g >= MIN_GAP_MS)
        .map(|g| g as f64 / DAY_MS as f64)
        .collect()
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The learnt interval: recency-weighted mean of the gaps within [`TRIM_FACTOR`]
/// of the median. `gaps` oldest first. Returns (days, gaps used, gaps trimmed).
pub fn learn_interval(gaps: &[f64], gap_half_life: f64) -> Option<(f64, usize, usize)> {
    if gaps.is_empty() {
        return None;
    }
    let mut sorted = gaps.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let m = median(&sorted);
    let (lo, hi) = (m / TRIM_FACTOR, m * TRIM_FACTOR);
    let n = gaps.len();
    let (mut sum, mut wsum, mut used) = (0.0, 0.0, 0usize);
    for (i, g) in gaps.iter().enumerate() {
        if *g < lo || *g > hi {
            continue;
        }
        let age = (n - 1 - i) as f64;
        let w = (-age / gap_half_life * std::f64::consts::LN_2).exp();
        sum += w * g;
        wsum += w;
        used += 1;
    }
    // The median itself is always within the band, so `used` ≥ 1.
    Some((sum / wsum, used, n - used))
}

/// The customer's expected revisit interval (see the module docs).
pub fn expected_interval(v: &Visits, p: &LapsePolicy) -> ExpectedInterval {
    let gaps = gaps_days(&v.recent);
    let (raw, source) = match learn_interval(&gaps, p.gap_half_life) {
        Some((days, used, trimmed))
            if gaps.len() >= p.min_gaps_for_learning as usize && days.is_finite() =>
        {
            (
                days,
                IntervalSource::Learned {
                    gaps: used,
                    trimmed,
                },
            )
        }
        _ => default_interval(v, p),
    };
    let (min, max) = (p.min_interval_days as f64, p.max_interval_days as f64);
    let days = raw.clamp(min, max);
    ExpectedInterval {
        days,
        raw_days: raw,
        clamped: days != raw,
        source,
    }
}

fn default_interval(v: &Visits, p: &LapsePolicy) -> (f64, IntervalSource) {
    let consultation_only = v.last_visit_type == Some(VisitType::Consultation)
        && (v.last_treatment_at.is_none() || v.last_treatment_at != v.last_at);
    if consultation_only {
        return (
            p.consultation_follow_up_days as f64,
            IntervalSource::ConsultationDefault,
        );
    }
    if let Some(t) = &v.last_treatment {
        let key = t.trim().to_ascii_uppercase();
        if let Some(d) = p.interval_days.get(&key) {
            return (
                *d as f64,
                IntervalSource::TreatmentDefault { treatment: key },
            );
        }
    }
    (p.other_interval_days as f64, IntervalSource::OtherDefault)
}

/// One planned stage of an episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StageDue {
    pub stage: Stage,
    pub attempt: u32,
    /// When it becomes due, ms.
    pub due_at: i64,
}

/// Due time of the `index`-th stage of an episode starting at `start` (the last
/// visit), assuming every earlier touch fired on time. None past DORMANT.
pub fn scheduled_due(
    index: usize,
    start: i64,
    interval: &ExpectedInterval,
    p: &LapsePolicy,
) -> Option<i64> {
    let (stage, attempt) = p.stage_at(index)?;
    let lapsed = || {
        start.saturating_add(
            interval
                .scaled_ms(p.lapsed_factor)
                .max(p.lapsed_min_days as i64 * DAY_MS),
        )
    };
    let every = p.follow_up_every_days as i64 * DAY_MS;
    Some(match stage {
        Stage::AtRisk => start.saturating_add(interval.scaled_ms(p.at_risk_factor)),
        Stage::Lapsed => lapsed(),
        Stage::FollowUp => lapsed().saturating_add(attempt as i64 * every),
        Stage::Dormant => {
            let last_touch = lapsed().saturating_add(p.max_follow_ups as i64 * every);
            let after = p.dormant_after_days.max(p.attribution_window_days) as i64 * DAY_MS;
            last_touch.saturating_add(after)
        }
        // Not scheduled: fired by a detractor's feedback.
        Stage::CareCall => return None,
    })
}

/// The whole schedule of an episode starting at `start` (for inspect and tests).
pub fn schedule(start: i64, interval: &ExpectedInterval, p: &LapsePolicy) -> Vec<StageDue> {
    (0..p.stages_per_episode())
        .filter_map(|i| {
            let (stage, attempt) = p.stage_at(i)?;
            Some(StageDue {
                stage,
                attempt,
                due_at: scheduled_due(i, start, interval, p)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: i64 = DAY_MS;

    fn visits(times_days: &[i64], last_type: VisitType, treatment: Option<&str>) -> Visits {
        let recent: Vec<i64> = times_days.iter().map(|d| d * D).collect();
        let last = recent.last().copied();
        Visits {
            count: recent.len() as u32,
            first_at: recent.first().copied(),
            last_at: last,
            lifetime_spend: 0,
            currency: Some("CNY".into()),
            last_treatment: treatment.map(str::to_string),
            last_treatment_at: treatment.and(last),
            last_visit_type: Some(last_type),
            recent,
        }
    }

    #[test]
    fn default_policy_is_valid_and_round_trips() {
        let p = LapsePolicy::default();
        p.validate("policy.lapse").unwrap();
        let text = toml::to_string(&p).unwrap();
        let back: LapsePolicy = toml::from_str(&text).unwrap();
        assert_eq!(back, p);
        let partial: LapsePolicy = toml::from_str("holdout_share = 0.2\n").unwrap();
        assert_eq!(partial.holdout_share, 0.2);
        assert_eq!(partial.interval_days, p.interval_days);
        assert!(toml::from_str::<LapsePolicy>("holdout = 0.2\n").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        type Edit = fn(&mut LapsePolicy);
        let cases: &[(Edit, &str)] = &[
            (|p| p.holdout_share = 1.5, "holdout_share"),
            (|p| p.holdout_share = f64::NAN, "holdout_share"),
            (|p| p.lapsed_factor = 1.1, "lapsed_factor"),
            (|p| p.at_risk_factor = 0.5, "at_risk_factor"),
            (|p| p.max_follow_ups = 11, "max_follow_ups"),
            (|p| p.min_interval_days = 800, "min_interval_days"),
            (|p| p.experiment = " ".into(), "experiment"),
            (|p| p.offers.at_risk = "".into(), "offers.at_risk"),
            (
                |p| p.channel_preference.at_risk = vec![Channel::Sms, Channel::Sms],
                "channel_preference.at_risk",
            ),
            (
                |p| {
                    p.interval_days.insert("botox".into(), 10);
                },
                "interval_days.botox",
            ),
            (
                |p| {
                    p.interval_days.insert("PEEL".into(), 0);
                },
                "interval_days.PEEL",
            ),
            (|p| p.attribution_window_days = 0, "attribution_window_days"),
            (|p| p.high_value_threshold = -1, "high_value_threshold"),
            (|p| p.gap_half_life = 0.0, "gap_half_life"),
            (|p| p.engagement_prior_sends = 0.0, "engagement_prior_sends"),
            (
                |p| {
                    p.offer_costs.insert("coupon-10pct".into(), -1);
                },
                "offer_costs.coupon-10pct",
            ),
            (
                |p| {
                    p.offer_costs.insert(" ".into(), 1);
                },
                "offer_costs. ",
            ),
            (|p| p.repurchase_factor = 0.0, "repurchase_factor"),
            (|p| p.repurchase_factor = f64::INFINITY, "repurchase_factor"),
        ];
        for (edit, key) in cases {
            let mut p = LapsePolicy::default();
            edit(&mut p);
            let (k, msg) = p.validate("policy.lapse").unwrap_err();
            assert_eq!(k, format!("policy.lapse.{key}"), "{msg}");
            assert!(!msg.is_empty());
        }
    }

    #[test]
    fn interval_learning_and_defaults() {
        let p = LapsePolicy::default();
        use IntervalSource as S;
        use VisitType::*;
        // (visit days, last visit type, last treatment, expected days, source)
        type Case<'a> = (&'a [i64], VisitType, Option<&'a str>, f64, S);
        let cases: Vec<Case> = vec![
            // No history: by last treatment.
            (
                &[0],
                Treatment,
                Some("BOTOX"),
                120.0,
                S::TreatmentDefault {
                    treatment: "BOTOX".into(),
                },
            ),
            (
                &[0],
                Treatment,
                Some("filler"),
                270.0,
                S::TreatmentDefault {
                    treatment: "FILLER".into(),
                },
            ),
            (&[0], Treatment, Some("PEEL"), 90.0, S::OtherDefault),
            (&[0], Treatment, None, 90.0, S::OtherDefault),
            (&[0], Consultation, None, 14.0, S::ConsultationDefault),
            // One gap is not enough (min 2): default.
            (
                &[0, 60],
                Treatment,
                Some("LASER"),
                30.0,
                S::TreatmentDefault {
                    treatment: "LASER".into(),
                },
            ),
            // Same-day visits are one visit: still one gap.
            (
                &[0, 60, 60],
                Treatment,
                Some("LASER"),
                30.0,
                S::TreatmentDefault {
                    treatment: "LASER".into(),
                },
            ),
            // Regular habit: learnt exactly.
            (
                &[0, 100, 200, 300],
                Treatment,
                Some("FILLER"),
                100.0,
                S::Learned {
                    gaps: 3,
                    trimmed: 0,
                },
            ),
            // One long break is trimmed.
            (
                &[0, 90, 180, 270, 700, 790],
                Treatment,
                Some("BOTOX"),
                90.0,
                S::Learned {
                    gaps: 4,
                    trimmed: 1,
                },
            ),
            // Learnt below the clamp.
            (
                &[0, 2, 4, 6],
                Treatment,
                None,
                7.0,
                S::Learned {
                    gaps: 3,
                    trimmed: 0,
                },
            ),
        ];
        for (days, vt, tr, want, src) in cases {
            let v = visits(days, vt, tr);
            let e = expected_interval(&v, &p);
            assert!(
                (e.days - want).abs() < 1e-9,
                "{days:?}: {} != {want}",
                e.days
            );
            assert_eq!(e.source, src, "{days:?}");
        }
        let mut big = LapsePolicy::default();
        big.interval_days.insert("IMPLANT".into(), 1000);
        let e = expected_interval(&visits(&[0], Treatment, Some("IMPLANT")), &big);
        assert_eq!((e.days, e.raw_days, e.clamped), (730.0, 1000.0, true));
        // A consultation after an earlier treatment: short follow-up.
        let mut v = visits(&[0, 50], Consultation, None);
        v.last_treatment = Some("BOTOX".into());
        v.last_treatment_at = Some(0);
        assert_eq!(expected_interval(&v, &p).source, S::ConsultationDefault);
    }

    #[test]
    fn learning_weights_recent_gaps_more() {
        // Habit changed from 60 to 120 days: the estimate leans to 120.
        let gaps = [60.0, 60.0, 60.0, 120.0, 120.0, 120.0];
        let (d, used, trimmed) = learn_interval(&gaps, 4.0).unwrap();
        assert_eq!((used, trimmed), (6, 0));
        assert!(d > 90.0 && d < 120.0, "{d}");
        // With equal weights (huge half-life) it is the plain mean.
        let (d, _, _) = learn_interval(&gaps, 1e12).unwrap();
        assert!((d - 90.0).abs() < 1e-6, "{d}");
        // Two gaps: the recent one counts more, both count.
        let (d, _, _) = learn_interval(&[30.0, 60.0], 4.0).unwrap();
        assert!(d > 45.0 && d < 60.0, "{d}");
    }

    #[test]
    fn tiers_and_segments() {
        let p = LapsePolicy::default();
        let cases = [
            (0, Stage::AtRisk, Segment::AtRisk),
            (1_999_999, Stage::Lapsed, Segment::LowValueLapsed),
            (2_000_000, Stage::Lapsed, Segment::HighValueLapsed),
            (5_000_000, Stage::AtRisk, Segment::AtRisk),
            (5_000_000, Stage::FollowUp, Segment::HighValueLapsed),
            (10, Stage::FollowUp, Segment::LowValueLapsed),
            (10, Stage::Dormant, Segment::LowValueLapsed),
            (3_000_000, Stage::Dormant, Segment::HighValueLapsed),
        ];
        for (spend, stage, want) in cases {
            assert_eq!(segment_for(stage, p.tier(spend)), want, "{spend} {stage}");
        }
    }

    #[test]
    fn stage_timing() {
        let p = LapsePolicy::default();
        let e = |days: f64| ExpectedInterval {
            days,
            raw_days: days,
            clamped: false,
            source: IntervalSource::OtherDefault,
        };
        let s = 1_000 * D;
        // (interval days, expected due days after the last visit per stage)
        let cases: [(f64, [f64; 5]); 3] = [
            // BOTOX 120: AT_RISK 144, LAPSED 180, FU 210, 240, DORMANT 300.
            (120.0, [144.0, 180.0, 210.0, 240.0, 300.0]),
            // LASER 30: AT_RISK 36, LAPSED 45, FU 75, 105, DORMANT 165.
            (30.0, [36.0, 45.0, 75.0, 105.0, 165.0]),
            // Consultation 14: LAPSED at the 30-day minimum.
            (14.0, [16.8, 30.0, 60.0, 90.0, 150.0]),
        ];
        for (days, want) in cases {
            let sched = schedule(s, &e(days), &p);
            let got: Vec<(Stage, u32)> = sched.iter().map(|d| (d.stage, d.attempt)).collect();
            assert_eq!(
                got,
                [
                    (Stage::AtRisk, 1),
                    (Stage::Lapsed, 1),
                    (Stage::FollowUp, 1),
                    (Stage::FollowUp, 2),
                    (Stage::Dormant, 1)
                ]
            );
            for (d, w) in sched.iter().zip(want) {
                assert_eq!(d.due_at, s + (w * D as f64).round() as i64, "{days} {d:?}");
            }
        }
        // No follow-ups; DORMANT after max(dormant_after, window).
        let p = LapsePolicy {
            max_follow_ups: 0,
            dormant_after_days: 90,
            ..LapsePolicy::default()
        };
        let sched = schedule(0, &e(100.0), &p);
        assert_eq!(sched.len(), 3);
        assert_eq!(sched[1].due_at, 150 * D);
        assert_eq!(sched[2].stage, Stage::Dormant);
        assert_eq!(sched[2].due_at, 240 * D);
        assert_eq!(p.stage_at(3), None);
    }
}
