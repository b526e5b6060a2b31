//! Contact policy: frequency caps, boost windows, quiet hours and click-rate
//! throttling, with the defaults prescribed by the source articles, and
//! per-tenant overrides. Pure data plus the time arithmetic on it.
//!
//! Seed defaults (每日推送次数控制在1-2次, 每周发送频次不超过2次, 每月1-2次, 每日发帖1-3次):
//! WECHAT 2/1d, SMS 2/7d, PHONE 2/30d, EMAIL 2/30d, SOCIAL 3/1d; caps may be raised
//! in boost windows (在重要营销节点可适当增加频次); phone and SMS never at night.

use std::collections::BTreeMap;

use chrono::{NaiveDateTime, NaiveTime, TimeZone, Timelike};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::adaptive_cap::AdaptiveCap;
use super::contact_hours::ContactHoursPolicy;
use super::cross_channel::CrossChannelPolicy;
use super::event::{Channel, CustomerRef};
use super::experiment::{Effective, Experiments};
use super::platform::PlatformRule;
use super::span::Span;

/// At most this many marketing sends are remembered per customer×channel.
pub const MAX_CAP: u32 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapRule {
    /// Marketing sends allowed per rolling window.
    pub limit: u32,
    /// Length of the rolling window.
    pub window: Span,
}

/// A daily quiet period in the customer's time zone, e.g. 21:00 → 09:00 (may wrap midnight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// `HH:MM`, start of the quiet period.
    pub start: String,
    /// `HH:MM`, end of the quiet period (exclusive).
    pub end: String,
}

/// A period (local date-times in the tenant's time zone) in which a channel's cap is raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boost {
    pub channel: Channel,
    /// `YYYY-MM-DDTHH:MM` local time, inclusive.
    pub from: String,
    /// `YYYY-MM-DDTHH:MM` local time, exclusive.
    pub until: String,
    /// The raised limit in force during the boost (same window as the channel's cap).
    pub limit: u32,
    /// Free text for operators, e.g. "member day".
    #[serde(default)]
    pub name: String,
}

/// What counts as engagement on a channel when computing its click rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngagementSignal {
    /// Clicks plus replies (channels with links).
    Clicks,
    /// Opens (e.g. answered calls) plus replies: channels without clicks.
    OpensAndReplies,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThrottleAction {
    /// No marketing sends on the channel until the cool-down ends.
    Pause,
    /// The cap is multiplied by `reduced_cap_factor` (at least 1) during the cool-down.
    Reduce,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottlePolicy {
    /// Throttle when the short-horizon rate falls below this fraction of the baseline.
    pub throttle_below: f64,
    /// ... or below this absolute rate.
    pub floor: f64,
    /// Release only when the rate is back above this fraction of the baseline (> throttle_below: hysteresis).
    pub release_above: f64,
    /// Minimum decayed short-horizon sends before any verdict.
    pub min_sends: f64,
    /// Weight, in sends, of the population prior in the smoothed rates.
    pub prior_weight: f64,
    /// Population click rate per channel: the prior, so three sends do not make a verdict.
    pub prior_rate: BTreeMap<Channel, f64>,
    /// What counts as engagement per channel.
    pub signal: BTreeMap<Channel, EngagementSignal>,
    pub action: ThrottleAction,
    pub reduced_cap_factor: f64,
    /// How long a throttle lasts at least; the channel re-opens when it ends or the rate recovers.
    pub cooldown: Span,
    /// Campaign level: baseline period after a campaign's first send.
    pub campaign_baseline: Span,
    /// Campaign level: half-life of the recent click rate.
    pub campaign_half_life: Span,
    /// Campaign level: minimum decayed recent sends before a verdict.
    pub campaign_min_sends: f64,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        use Channel::*;
        ThrottlePolicy {
            throttle_below: 0.5,
            floor: 0.01,
            release_above: 0.8,
            min_sends: 4.0,
            prior_weight: 5.0,
            prior_rate: [
                (Wechat, 0.08),
                (Sms, 0.03),
                (Phone, 0.30),
                (Email, 0.02),
                (Social, 0.05),
            ]
            .into_iter()
            .collect(),
            signal: [
                (Wechat, EngagementSignal::Clicks),
                (Sms, EngagementSignal::Clicks),
                (Phone, EngagementSignal::OpensAndReplies),
                (Email, EngagementSignal::Clicks),
                (Social, EngagementSignal::Clicks),
            ]
            .into_iter()
            .collect(),
            action: ThrottleAction::Pause,
            reduced_cap_factor: 0.5,
            cooldown: Span::days(7),
            campaign_baseline: Span::secs(6 * 3600),
            campaign_half_life: Span::secs(6 * 3600),
            campaign_min_sends: 200.0,
        }
    }
}

/// The `[policy]` section: global defaults plus `[policy.tenants.ID]` overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// IANA time zone of customers (quiet hours, boost windows).
    pub timezone: String,
    pub caps: BTreeMap<Channel, CapRule>,
    pub quiet_hours: BTreeMap<Channel, QuietHours>,
    pub boosts: Vec<Boost>,
    pub throttle: ThrottlePolicy,
    /// Rules across channels (touch cap, one campaign one channel); off by default.
    pub cross_channel: CrossChannelPolicy,
    /// Messaging platforms' hard limits (`[[policy.platform_rules]]`); none by default.
    pub platform_rules: Vec<PlatformRule>,
    /// Engagement-adaptive caps per channel (EMAIL on by default; a channel
    /// left out keeps its default: turn EMAIL off with `enabled = false`).
    pub adaptive_caps: BTreeMap<Channel, AdaptiveCap>,
    /// Best contact hours per customer (on by default: it restricts nothing).
    pub contact_hours: ContactHoursPolicy,
    pub lapse: super::lapse::LapsePolicy,
    /// Satisfaction feedback: detractor thresholds and the care call.
    pub feedback: super::feedback::FeedbackPolicy,
    /// Cost of one marketing send per channel, minor currency units (used when a
    /// send carries no `cost`, and to break ties between channels).
    pub costs: BTreeMap<Channel, i64>,
    pub tenants: BTreeMap<String, TenantOverride>,
    /// Contact-policy experiments (`[[policy.experiments]]`); none by default.
    pub experiments: Vec<super::experiment::ExperimentConfig>,
}

/// Per-tenant overrides: every key replaces the global one; `caps`,
/// `quiet_hours` and `prior_rate` replace per channel; `boosts` add to the global ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantOverride {
    pub timezone: Option<String>,
    pub caps: BTreeMap<Channel, CapRule>,
    pub quiet_hours: BTreeMap<Channel, QuietHours>,
    pub boosts: Vec<Boost>,
    pub throttle: Option<ThrottlePolicy>,
    pub cross_channel: Option<CrossChannelPolicy>,
    /// Replaces the global platform rules as a whole (an empty list: none).
    pub platform_rules: Option<Vec<PlatformRule>>,
    /// Per channel.
    pub adaptive_caps: BTreeMap<Channel, AdaptiveCap>,
    /// Replaces the global section as a whole (e.g. the tenant's own population histogram).
    pub contact_hours: Option<ContactHoursPolicy>,
    pub lapse: Option<super::lapse::LapsePolicy>,
    /// Replaces the global section as a whole.
    pub feedback: Option<super::feedback::FeedbackPolicy>,
    pub costs: BTreeMap<Channel, i64>,
}

/// Adaptive caps by default: e-mail only (the article's advice is for e-mail).
pub fn seed_adaptive_caps() -> BTreeMap<Channel, AdaptiveCap> {
    [(Channel::Email, AdaptiveCap::default())]
        .into_iter()
        .collect()
}

pub fn seed_caps() -> BTreeMap<Channel, CapRule> {
    use Channel::*;
    [
        (Wechat, 2, 1),
        (Sms, 2, 7),
        (Phone, 2, 30),
        (Email, 2, 30),
        (Social, 3, 1),
    ]
    .into_iter()
    .map(|(c, limit, days)| {
        (
            c,
            CapRule {
                limit,
                window: Span::days(days),
            },
        )
    })
    .collect()
}

/// Default per-send costs in fen: WeChat template messages and e-mail are nearly
/// free, SMS a few fen, a call a few yuan of staff time.
pub fn seed_costs() -> BTreeMap<Channel, i64> {
    use Channel::*;
    [(Wechat, 1), (Sms, 5), (Phone, 300), (Email, 1), (Social, 1)]
        .into_iter()
        .collect()
}

fn seed_quiet_hours() -> BTreeMap<Channel, QuietHours> {
    let q = |s: &str, e: &str| QuietHours {
        start: s.into(),
        end: e.into(),
    };
    [
        (Channel::Sms, q("21:00", "09:00")),
        (Channel::Phone, q("20:00", "09:00")),
        (Channel::Wechat, q("22:00", "08:00")),
    ]
    .into_iter()
    .collect()
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            timezone: "Asia/Shanghai".into(),
            caps: seed_caps(),
            quiet_hours: seed_quiet_hours(),
            boosts: vec![],
            throttle: ThrottlePolicy::default(),
            cross_channel: CrossChannelPolicy::default(),
            platform_rules: Vec::new(),
            adaptive_caps: seed_adaptive_caps(),
            contact_hours: ContactHoursPolicy::default(),
            lapse: Default::default(),
            feedback: Default::default(),
            costs: seed_costs(),
            tenants: BTreeMap::new(),
            experiments: Vec::new(),
        }
    }
}

/// A validated, resolved boost window in UTC milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoostWindow {
    pub channel: Channel,
    pub from_ms: i64,
    pub until_ms: i64,
    pub limit: u32,
}

/// Quiet hours as minutes after local midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietSpan {
    pub start_min: u32,
    pub end_min: u32,
}

/// The policy in force for one tenant, resolved and validated.
#[derive(Debug, Clone)]
pub struct Policy {
    pub tz: Tz,
    pub caps: [CapRule; 5],
    pub quiet: [Option<QuietSpan>; 5],
    pub boosts: Vec<BoostWindow>,
    pub throttle: ThrottlePolicy,
    pub cross_channel: CrossChannelPolicy,
    pub platform_rules: Vec<PlatformRule>,
    /// Enabled adaptive caps, indexed by `Channel::index()`.
    pub adaptive_caps: [Option<AdaptiveCap>; 5],
    pub contact_hours: ContactHoursPolicy,
    pub lapse: super::lapse::LapsePolicy,
    pub feedback: super::feedback::FeedbackPolicy,
    /// Cost of one send per channel, minor units, indexed by `Channel::index()`.
    pub costs: [i64; 5],
}

pub(crate) fn parse_hhmm(s: &str) -> Option<u32> {
    let t = NaiveTime::parse_from_str(s.trim(), "%H:%M").ok()?;
    Some(t.hour() * 60 + t.minute())
}

pub(crate) fn parse_local(tz: &Tz, s: &str) -> Option<i64> {
    let naive = NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M").ok()?;
    tz.from_local_datetime(&naive)
        .earliest()
        .map(|d| d.timestamp_millis())
}

type Invalid = (String, String);

fn bad(key: String, msg: impl Into<String>) -> Invalid {
    (key, msg.into())
}

impl PolicyConfig {
    /// Resolves the policy of `tenant` (global when `None`), validating every value.
    pub fn resolve(&self, tenant: Option<&str>) -> Result<Policy, Invalid> {
        let empty = TenantOverride::default();
        let (o, prefix) = match tenant {
            Some(t) => (
                self.tenants.get(t).unwrap_or(&empty),
                format!("policy.tenants.{t}"),
            ),
            None => (&empty, "policy".to_string()),
        };
        let tz_name = o.timezone.clone().unwrap_or_else(|| self.timezone.clone());
        let tz: Tz = tz_name.parse().map_err(|_| {
            bad(
                format!("{prefix}.timezone"),
                format!("`{tz_name}` is not an IANA time zone (e.g. Asia/Shanghai)"),
            )
        })?;
        let mut caps = [CapRule {
            limit: 0,
            window: Span::days(1),
        }; 5];
        for c in Channel::ALL {
            let rule = o
                .caps
                .get(&c)
                .or_else(|| self.caps.get(&c))
                .copied()
                .unwrap_or_else(|| seed_caps()[&c]);
            if rule.limit == 0 || rule.limit > MAX_CAP {
                return Err(bad(
                    format!("{prefix}.caps.{c}.limit"),
                    format!("must be between 1 and {MAX_CAP}"),
                ));
            }
            if rule.window < Span::secs(60) || rule.window > Span::days(366) {
                return Err(bad(
                    format!("{prefix}.caps.{c}.window"),
                    "must be between 1m and 366d",
                ));
            }
            caps[c.index()] = rule;
        }
        let mut quiet = [None; 5];
        for c in Channel::ALL {
            if let Some(q) = o.quiet_hours.get(&c).or_else(|| self.quiet_hours.get(&c)) {
                let key = format!("{prefix}.quiet_hours.{c}");
                let s = parse_hhmm(&q.start)
                    .ok_or_else(|| bad(format!("{key}.start"), "must be HH:MM"))?;
                let e =
                    parse_hhmm(&q.end).ok_or_else(|| bad(format!("{key}.end"), "must be HH:MM"))?;
                if s == e {
                    return Err(bad(
                        key,
                        "start and end are equal: remove the entry for no quiet hours",
                    ));
                }
                quiet[c.index()] = Some(QuietSpan {
                    start_min: s,
                    end_min: e,
                });
            }
        }
        let mut boosts = Vec::new();
        for (i, b) in self.boosts.iter().chain(o.boosts.iter()).enumerate() {
            let key = format!("{prefix}.boosts[{i}]");
            let from = parse_local(&tz, &b.from)
                .ok_or_else(|| bad(format!("{key}.from"), "must be YYYY-MM-DDTHH:MM"))?;
            let until = parse_local(&tz, &b.until)
                .ok_or_else(|| bad(format!("{key}.until"), "must be YYYY-MM-DDTHH:MM"))?;
            if until <= from {
                return Err(bad(format!("{key}.until"), "must be after `from`"));
            }
            if b.limit == 0 || b.limit > MAX_CAP {
                return Err(bad(
                    format!("{key}.limit"),
                    format!("must be between 1 and {MAX_CAP}"),
                ));
            }
            boosts.push(BoostWindow {
                channel: b.channel,
                from_ms: from,
                until_ms: until,
                limit: b.limit,
            });
        }
        let throttle = o.throttle.clone().unwrap_or_else(|| self.throttle.clone());
        let tk = format!("{prefix}.throttle");
        let frac = |v: f64| (0.0..=1.0).contains(&v);
        if !frac(throttle.throttle_below) || !frac(throttle.floor) || !frac(throttle.release_above)
        {
            return Err(bad(
                tk,
                "throttle_below, floor and release_above must be between 0 and 1",
            ));
        }
        if throttle.release_above <= throttle.throttle_below {
            return Err(bad(
                format!("{tk}.release_above"),
                "must be greater than throttle_below (hysteresis), or customers flap",
            ));
        }
        let at_least = |v: f64, min: f64| v >= min; // false for NaN too
        if !at_least(throttle.min_sends, 1.0)
            || !at_least(throttle.prior_weight, 0.0)
            || !at_least(throttle.campaign_min_sends, 1.0)
        {
            return Err(bad(
                tk,
                "min_sends and campaign_min_sends must be >= 1, prior_weight >= 0",
            ));
        }
        if !(throttle.reduced_cap_factor > 0.0 && throttle.reduced_cap_factor <= 1.0) {
            return Err(bad(format!("{tk}.reduced_cap_factor"), "must be in (0, 1]"));
        }
        if throttle.cooldown.is_zero() || throttle.campaign_half_life.is_zero() {
            return Err(bad(tk, "cooldown and campaign_half_life must be positive"));
        }
        for (c, r) in &throttle.prior_rate {
            if !(*r > 0.0 && *r < 1.0) {
                return Err(bad(
                    format!("{tk}.prior_rate.{c}"),
                    "must be between 0 and 1 (exclusive)",
                ));
            }
        }
        let mut costs = [0i64; 5];
        for c in Channel::ALL {
            let v = o
                .costs
                .get(&c)
                .or_else(|| self.costs.get(&c))
                .copied()
                .unwrap_or_else(|| seed_costs()[&c]);
            if v < 0 {
                return Err(bad(format!("{prefix}.costs.{c}"), "must not be negative"));
            }
            costs[c.index()] = v;
        }
        let cross_channel = o.cross_channel.unwrap_or(self.cross_channel);
        cross_channel.validate(&format!("{prefix}.cross_channel"), &caps)?;
        let platform_rules = o
            .platform_rules
            .clone()
            .unwrap_or_else(|| self.platform_rules.clone());
        for (i, r) in platform_rules.iter().enumerate() {
            r.validate(&format!("{prefix}.platform_rules[{i}]"))?;
        }
        let mut adaptive_caps = [None; 5];
        let seed = seed_adaptive_caps();
        for c in Channel::ALL {
            if let Some(a) = o
                .adaptive_caps
                .get(&c)
                .or_else(|| self.adaptive_caps.get(&c))
                .or_else(|| seed.get(&c))
            {
                a.validate(&format!("{prefix}.adaptive_caps.{c}"))?;
                adaptive_caps[c.index()] = a.enabled.then_some(*a);
            }
        }
        let contact_hours = o
            .contact_hours
            .clone()
            .unwrap_or_else(|| self.contact_hours.clone());
        contact_hours
            .validate(&format!("{prefix}.contact_hours"))
            .map_err(|(k, m)| bad(k, m))?;
        let lapse = o.lapse.clone().unwrap_or_else(|| self.lapse.clone());
        lapse
            .validate(&format!("{prefix}.lapse"))
            .map_err(|(k, m)| bad(k, m))?;
        let feedback = o.feedback.clone().unwrap_or_else(|| self.feedback.clone());
        feedback
            .validate(&format!("{prefix}.feedback"))
            .map_err(|(k, m)| bad(k, m))?;
        Ok(Policy {
            tz,
            caps,
            quiet,
            boosts,
            throttle,
            cross_channel,
            platform_rules,
            adaptive_caps,
            contact_hours,
            lapse,
            feedback,
            costs,
        })
    }

    /// Validates the global policy, every tenant override and the experiments.
    pub fn validate(&self) -> Result<(), Invalid> {
        Policies::new(self).map(|_| ())
    }
}

impl Policy {
    /// The cap in force on `c` at `t`: the boosted limit inside a boost window.
    pub fn cap_at(&self, c: Channel, t: i64) -> CapRule {
        let base = self.caps[c.index()];
        let boosted = self
            .boosts
            .iter()
            .filter(|b| b.channel == c && b.from_ms <= t && t < b.until_ms)
            .map(|b| b.limit)
            .max();
        CapRule {
            limit: boosted.unwrap_or(base.limit),
            window: base.window,
        }
    }

    /// The largest limit `c` can ever have, platform rules included (sizes the
    /// remembered send times).
    pub fn max_limit(&self, c: Channel) -> u32 {
        self.boosts
            .iter()
            .filter(|b| b.channel == c)
            .map(|b| b.limit)
            .chain(
                self.platform_rules
                    .iter()
                    .filter(|r| r.channel == c)
                    .map(|r| r.limit),
            )
            .chain(std::iter::once(self.caps[c.index()].limit))
            .max()
            .map(|m| m + self.adaptive_caps[c.index()].map_or(0, |a| a.max_raise()))
            .unwrap_or(1)
    }

    /// How long `c`'s marketing send times are remembered: its cap window, or
    /// longer when a platform rule looks further back.
    pub fn send_memory_ms(&self, c: Channel) -> i64 {
        self.platform_rules
            .iter()
            .filter(|r| r.channel == c)
            .map(PlatformRule::memory_ms)
            .chain(std::iter::once(self.caps[c.index()].window.as_ms()))
            .max()
            .unwrap_or(0)
    }

    /// Times at which the cap of `c` changes, after `t` (boost starts and ends).
    pub fn cap_changes_after(&self, c: Channel, t: i64) -> impl Iterator<Item = i64> + '_ {
        self.boosts
            .iter()
            .filter(move |b| b.channel == c)
            .flat_map(|b| [b.from_ms, b.until_ms])
            .filter(move |x| *x > t)
    }

    /// If `t` falls in `c`'s quiet hours, the end of that quiet period; else `None`.
    pub fn quiet_until(&self, c: Channel, t: i64) -> Option<i64> {
        let q = self.quiet[c.index()]?;
        let local = self.tz.timestamp_millis_opt(t).single()?;
        let minute = local.hour() * 60 + local.minute();
        let inside = if q.start_min < q.end_min {
            q.start_min <= minute && minute < q.end_min
        } else {
            minute >= q.start_min || minute < q.end_min
        };
        if !inside {
            return None;
        }
        // Minutes until the end, counted on the local wall clock.
        let to_end = (q.end_min + 24 * 60 - minute) % (24 * 60);
        let to_end = if to_end == 0 { 24 * 60 } else { to_end };
        let secs_into_minute = local.second() as i64 * 1000 + (t.rem_euclid(1000));
        Some(t + to_end as i64 * 60_000 - secs_into_minute)
    }

    /// `t` moved out of quiet hours (unchanged when not quiet).
    pub fn outside_quiet(&self, c: Channel, t: i64) -> i64 {
        self.quiet_until(c, t).unwrap_or(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        parse_local(&chrono_tz::Asia::Shanghai, s).unwrap()
    }

    #[test]
    fn seed_defaults_resolve() {
        let p = PolicyConfig::default().resolve(None).unwrap();
        assert_eq!(p.caps[Channel::Wechat.index()].limit, 2);
        assert_eq!(p.caps[Channel::Sms.index()].window, Span::days(7));
        assert_eq!(p.caps[Channel::Phone.index()].window, Span::days(30));
        assert_eq!(p.caps[Channel::Social.index()].limit, 3);
    }

    #[test]
    fn quiet_hours_wrap_midnight_in_local_time() {
        let p = PolicyConfig::default().resolve(None).unwrap();
        // SMS quiet 21:00-09:00 Shanghai.
        assert_eq!(
            p.quiet_until(Channel::Sms, at("2026-03-01T22:30")),
            Some(at("2026-03-02T09:00"))
        );
        assert_eq!(
            p.quiet_until(Channel::Sms, at("2026-03-02T08:59")),
            Some(at("2026-03-02T09:00"))
        );
        assert_eq!(p.quiet_until(Channel::Sms, at("2026-03-02T09:00")), None);
        assert_eq!(p.quiet_until(Channel::Sms, at("2026-03-02T20:59")), None);
        assert_eq!(p.quiet_until(Channel::Email, at("2026-03-02T03:00")), None);
    }

    #[test]
    fn boosts_raise_the_cap_inside_the_window_only() {
        let mut cfg = PolicyConfig::default();
        cfg.tenants.insert(
            "brandA".into(),
            TenantOverride {
                boosts: vec![Boost {
                    channel: Channel::Wechat,
                    from: "2026-11-11T00:00".into(),
                    until: "2026-11-12T00:00".into(),
                    limit: 4,
                    name: "双11".into(),
                }],
                ..Default::default()
            },
        );
        let a = cfg.resolve(Some("brandA")).unwrap();
        assert_eq!(a.cap_at(Channel::Wechat, at("2026-11-11T10:00")).limit, 4);
        assert_eq!(a.cap_at(Channel::Wechat, at("2026-11-12T10:00")).limit, 2);
        assert_eq!(a.cap_at(Channel::Sms, at("2026-11-11T10:00")).limit, 2);
        let other = cfg.resolve(Some("brandB")).unwrap();
        assert_eq!(
            other.cap_at(Channel::Wechat, at("2026-11-11T10:00")).limit,
            2
        );
    }

    #[test]
    fn invalid_values_name_their_key() {
        let mut cfg = PolicyConfig::default();
        cfg.caps.insert(
            Channel::Sms,
            CapRule {
                limit: 0,
                window: Span::days(7),
            },
        );
        assert_eq!(cfg.validate().unwrap_err().0, "policy.caps.SMS.limit");
        let mut cfg = PolicyConfig::default();
        cfg.throttle.release_above = 0.4;
        assert_eq!(
            cfg.validate().unwrap_err().0,
            "policy.throttle.release_above"
        );
        let mut cfg = PolicyConfig::default();
        cfg.tenants.insert(
            "x".into(),
            TenantOverride {
                timezone: Some("Mars/Olympus".into()),
                ..Default::default()
            },
        );
        assert_eq!(cfg.validate().unwrap_err().0, "policy.tenants.x.timezone");
    }
}

/// Every tenant's resolved policy and the experiments, built once at start-up.
#[derive(Debug, Clone)]
pub struct Policies {
    default: std::sync::Arc<Policy>,
    tenants: std::collections::HashMap<String, std::sync::Arc<Policy>>,
    experiments: std::sync::Arc<Experiments>,
}

impl Policies {
    pub fn new(cfg: &PolicyConfig) -> Result<Policies, Invalid> {
        let default = std::sync::Arc::new(cfg.resolve(None)?);
        let mut tenants = std::collections::HashMap::new();
        for t in cfg.tenants.keys() {
            tenants.insert(t.clone(), std::sync::Arc::new(cfg.resolve(Some(t))?));
        }
        let experiments = std::sync::Arc::new(Experiments::new(&cfg.experiments, |t| {
            tenants.get(t).unwrap_or(&default)
        })?);
        Ok(Policies {
            default,
            tenants,
            experiments,
        })
    }

    /// The policy of `tenant` (the global one when it has no overrides): the
    /// control of its experiments.
    pub fn of(&self, tenant: &str) -> &Policy {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// The policy of customer `c` at `t`: their tenant's, with the overrides
    /// of their arms in the experiments active at `t`.
    pub fn effective(&self, c: &CustomerRef, t: i64) -> Effective<'_> {
        self.experiments.effective(self.of(&c.tenant), c, t)
    }

    pub fn experiments(&self) -> &std::sync::Arc<Experiments> {
        &self.experiments
    }
}
