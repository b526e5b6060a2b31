//! Marketing allowance per customer×channel: frequency caps over rolling windows,
//! click-rate throttling with hysteresis, unsubscribe suppression and quiet hours,
//! folded into one state (`OPEN`, `CAPPED`, `THROTTLED`, `SUPPRESSED`) with the
//! time sends are allowed again. A decision is emitted only when that state
//! changes (or its `allowed_from` moves later), with an id derived from the
//! customer, channel and the transition's sequence number, so a replay yields
//! the same ids.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::engagement::{ChannelEngagement, Counts};
use super::event::{Channel, CustomerRef};
use super::policy::{CapRule, EngagementSignal, Policy, ThrottleAction, MAX_CAP};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AllowanceState {
    Open,
    Capped,
    Throttled,
    Suppressed,
}

impl AllowanceState {
    pub const ALL: [AllowanceState; 4] = [
        AllowanceState::Open,
        AllowanceState::Capped,
        AllowanceState::Throttled,
        AllowanceState::Suppressed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AllowanceState::Open => "OPEN",
            AllowanceState::Capped => "CAPPED",
            AllowanceState::Throttled => "THROTTLED",
            AllowanceState::Suppressed => "SUPPRESSED",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            AllowanceState::Open => "open",
            AllowanceState::Capped => "capped",
            AllowanceState::Throttled => "throttled",
            AllowanceState::Suppressed => "suppressed",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A period in which a channel is throttled for low engagement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleSpell {
    pub since: i64,
    pub until: i64,
    /// Why it started: below the fraction of baseline, or below the absolute floor.
    pub below_floor: bool,
}

/// The last decision published for a customer×channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub state: AllowanceState,
    pub allowed_from: Option<i64>,
    /// Transitions published so far on this customer×channel (decision ids derive from it).
    pub seq: u32,
    /// When it was decided: a later evaluation never looks at an earlier time,
    /// so an event applied late (stamped before the decision) cannot publish
    /// an allowance older than the one senders already have. Kept in the
    /// compact customer format; `None` in states written before it, and in
    /// campaign records (postcard, whose layout it must not change).
    #[serde(skip)]
    pub decided_at: Option<i64>,
}

/// Frequency-control memory of one customer×channel (bounded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelControl {
    /// Marketing send times, ascending; only those that can still matter, at most `2 × MAX_CAP`.
    pub sends: Vec<i64>,
    pub spell: Option<ThrottleSpell>,
    pub published: Option<Published>,
    /// Marketing sends made while the channel was not allowed (lifetime count).
    pub violations: u32,
    /// What the last decision said beyond `published`: with it, the decision
    /// can be published again as an exact repeat (see `state_write.rs`: a
    /// publisher overtaken by a newer decision re-publishes the newest one).
    /// Not in the legacy postcard layout (format 1), which is only read.
    #[serde(skip)]
    pub last: Option<DecisionDetail>,
}

/// The parts of a published decision that `Published`, the customer and the
/// channel do not already determine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionDetail {
    pub reason: String,
    /// The cap's limit and window (ms).
    pub cap: Option<(u32, i64)>,
    /// Short-horizon and baseline click rates.
    pub rates: Option<(f64, f64)>,
    pub sends_in_window: i64,
    pub cause_event_id: Option<String>,
}

/// Every reason a customer decision gives (the stored layout keeps a code).
pub const REASONS: [&str; 9] = [
    "open",
    "frequency_cap",
    "click_rate_below_floor",
    "click_rate_below_baseline",
    "unsubscribe_reply",
    "cap_window_passed",
    "cooldown_ended",
    "resubscribed",
    "click_rate_recovered",
];

/// Why a marketing send broke the allowance (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    Cap,
    Throttled,
    Suppressed,
    QuietHours,
    /// The cap on marketing touches across all channels was reached.
    CrossChannelCap,
    /// The campaign already went out to the customer on another channel.
    CampaignOnOtherChannel,
    /// A messaging platform's limit (`policy.platform_rules`).
    PlatformRule,
}

impl Violation {
    pub fn label(self) -> &'static str {
        match self {
            Violation::Cap => "cap",
            Violation::Throttled => "throttled",
            Violation::Suppressed => "suppressed",
            Violation::QuietHours => "quiet_hours",
            Violation::CrossChannelCap => "cross_channel_cap",
            Violation::CampaignOnOtherChannel => "campaign_on_other_channel",
            Violation::PlatformRule => "platform_rule",
        }
    }
}

/// The allowance of one channel at one instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Allowance {
    pub channel: Channel,
    pub state: AllowanceState,
    pub reason: &'static str,
    /// When a marketing send is allowed (None: not until a re-subscribe).
    pub allowed_from: Option<i64>,
    pub cap: CapRule,
    pub sends_in_window: u32,
    pub short_click_rate: Option<f64>,
    pub baseline_click_rate: Option<f64>,
}

/// Smoothed short-horizon and baseline engagement rates, and the short decayed send count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub short: f64,
    pub baseline: f64,
    pub short_sends: f64,
    /// How the channel's cap moves for this customer (`adaptive_cap.rs`).
    pub cap_adjust: i32,
}

fn engaged(c: &Counts, signal: EngagementSignal) -> f64 {
    match signal {
        EngagementSignal::Clicks => (c.clicks + c.replies) as f64,
        EngagementSignal::OpensAndReplies => (c.opens + c.replies) as f64,
    }
}

/// Bayesian-smoothed rates: the population rate of the channel is the prior,
/// worth `prior_weight` sends, so a handful of sends cannot make a verdict.
pub fn rates(
    e: &ChannelEngagement,
    c: Channel,
    p: &Policy,
    t: i64,
    h: super::engagement::Horizons,
) -> Rates {
    let th = &p.throttle;
    let prior = th.prior_rate.get(&c).copied().unwrap_or(0.05);
    let signal = th
        .signal
        .get(&c)
        .copied()
        .unwrap_or(EngagementSignal::Clicks);
    let (s, l) = e.counts_at(t, h);
    let smooth = |x: &Counts| {
        let sends = x.sends as f64;
        ((engaged(x, signal) + th.prior_weight * prior) / (sends + th.prior_weight)).min(1.0)
    };
    Rates {
        short: smooth(&s),
        baseline: smooth(&l),
        short_sends: s.sends as f64,
        cap_adjust: p.adaptive_caps[c.index()].map_or(0, |a| a.adjustment(&s, &l)),
    }
}

impl ChannelControl {
    fn in_window(&self, t: i64, window_ms: i64) -> u32 {
        self.sends
            .iter()
            .filter(|s| **s > t - window_ms && **s <= t)
            .count() as u32
    }

    /// The effective cap at `t`: boosted, moved by the customer's engagement
    /// (`adjust`, as of the decision), and reduced while throttled with `reduce`.
    fn cap_at(&self, c: Channel, p: &Policy, t: i64, adjust: i32) -> CapRule {
        let mut cap = p.cap_at(c, t);
        cap.limit = super::adaptive_cap::adjusted(cap.limit, adjust);
        if let Some(s) = self.spell {
            if p.throttle.action == ThrottleAction::Reduce && s.since <= t && t < s.until {
                cap.limit =
                    ((cap.limit as f64 * p.throttle.reduced_cap_factor).floor() as u32).max(1);
            }
        }
        cap
    }

    /// Earliest instant ≥ `t` at which the window holds fewer sends than the cap.
    fn cap_free_at(&self, c: Channel, p: &Policy, t: i64, adjust: i32) -> i64 {
        let window = p.caps[c.index()].window.as_ms();
        let mut candidates: Vec<i64> = std::iter::once(t)
            .chain(self.sends.iter().map(|s| s + window).filter(|x| *x > t))
            .chain(p.cap_changes_after(c, t))
            .chain(self.spell.map(|s| s.until).filter(|x| *x > t))
            .collect();
        candidates.sort_unstable();
        candidates
            .into_iter()
            .find(|x| self.in_window(*x, window) < self.cap_at(c, p, *x, adjust).limit)
            // Unreachable with a finite list of sends; stay safe.
            .unwrap_or(t + window)
    }

    /// Records one marketing send at `t`; returns the violation it was, if any.
    /// `before` is the allowance just before the send.
    pub fn record_send(
        &mut self,
        t: i64,
        before: &Allowance,
        p: &Policy,
        c: Channel,
    ) -> Option<Violation> {
        let violation = match before.state {
            AllowanceState::Suppressed => Some(Violation::Suppressed),
            AllowanceState::Throttled if before.allowed_from.is_none_or(|a| a > t) => {
                Some(Violation::Throttled)
            }
            AllowanceState::Capped if before.allowed_from.is_none_or(|a| a > t) => {
                Some(Violation::Cap)
            }
            _ if p.quiet_until(c, t).is_some() => Some(Violation::QuietHours),
            _ => None,
        };
        if violation.is_some() {
            self.violations = self.violations.saturating_add(1);
        }
        let pos = self.sends.partition_point(|s| *s <= t);
        self.sends.insert(pos, t);
        // Keep what can still matter: the longest window back from the latest send
        // (platform rules included), and never more than twice the largest possible cap.
        let window = p.send_memory_ms(c);
        let latest = *self.sends.last().unwrap_or(&t);
        self.sends.retain(|s| *s > latest - window);
        let keep = (2 * p.max_limit(c).max(1)).min(2 * MAX_CAP) as usize;
        if self.sends.len() > keep {
            let drop = self.sends.len() - keep;
            self.sends.drain(..drop);
        }
        violation
    }

    /// Starts or ends a throttle spell from the engagement at `t` (hysteresis:
    /// start below `throttle_below × baseline` or the floor, end at `release_above × baseline`
    /// or when the cool-down is over).
    pub fn update_spell(&mut self, r: &Rates, p: &Policy, t: i64) -> Option<&'static str> {
        let th = &p.throttle;
        match self.spell {
            Some(s) if t >= s.until => {
                self.spell = None;
                Some("cooldown_ended")
            }
            Some(s)
                if t >= s.since
                    && r.short >= th.release_above * r.baseline
                    && r.short >= th.floor =>
            {
                self.spell = None;
                Some("click_rate_recovered")
            }
            Some(_) => None,
            None => {
                if r.short_sends < th.min_sends {
                    return None;
                }
                let below_floor = r.short < th.floor;
                if below_floor || r.short < th.throttle_below * r.baseline {
                    self.spell = Some(ThrottleSpell {
                        since: t,
                        until: t + th.cooldown.as_ms(),
                        below_floor,
                    });
                }
                None
            }
        }
    }

    /// The allowance at `t`, given engagement and suppression.
    pub fn allowance(
        &self,
        c: Channel,
        p: &Policy,
        t: i64,
        rates: Option<Rates>,
        suppressed: bool,
    ) -> Allowance {
        let adjust = rates.map_or(0, |r| r.cap_adjust);
        let cap = self.cap_at(c, p, t, adjust);
        let window = cap.window.as_ms();
        let sends_in_window = self.in_window(t, window);
        let (short, baseline) = rates.map_or((None, None), |r| (Some(r.short), Some(r.baseline)));
        let mk = |state, reason, allowed_from: Option<i64>| Allowance {
            channel: c,
            state,
            reason,
            allowed_from: allowed_from.map(|a| p.outside_quiet(c, a)),
            cap,
            sends_in_window,
            short_click_rate: short,
            baseline_click_rate: baseline,
        };
        if suppressed {
            return mk(AllowanceState::Suppressed, "unsubscribe_reply", None);
        }
        if let Some(s) = self.spell.filter(|s| s.since <= t && t < s.until) {
            let reason = if s.below_floor {
                "click_rate_below_floor"
            } else {
                "click_rate_below_baseline"
            };
            match p.throttle.action {
                ThrottleAction::Pause => {
                    return mk(AllowanceState::Throttled, reason, Some(s.until))
                }
                ThrottleAction::Reduce if sends_in_window >= cap.limit => {
                    return mk(
                        AllowanceState::Throttled,
                        reason,
                        Some(self.cap_free_at(c, p, t, adjust)),
                    )
                }
                ThrottleAction::Reduce => return mk(AllowanceState::Throttled, reason, Some(t)),
            }
        }
        if sends_in_window >= cap.limit {
            return mk(
                AllowanceState::Capped,
                "frequency_cap",
                Some(self.cap_free_at(c, p, t, adjust)),
            );
        }
        mk(AllowanceState::Open, "open", Some(t))
    }
}

/// A throttle decision, as published on `engagement.throttle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThrottleDecision {
    pub decision_id: String,
    pub tenant_id: String,
    /// `None` for campaign-level decisions.
    pub customer_id: Option<String>,
    pub channel: Option<Channel>,
    pub campaign_id: Option<String>,
    pub state: AllowanceState,
    pub reason: String,
    pub allowed_from: Option<i64>,
    pub cap: Option<u32>,
    pub window_ms: Option<i64>,
    pub short_click_rate: Option<f64>,
    pub baseline_click_rate: Option<f64>,
    pub sends_in_window: i64,
    pub decided_at: i64,
    pub cause_event_id: Option<String>,
    /// The state this decision replaces (for fleet gauges; not published).
    pub previous: Option<AllowanceState>,
}

impl ThrottleDecision {
    /// Kafka key: `TENANT/CUSTOMER/CHANNEL`, or `TENANT/campaign/CAMPAIGN`.
    pub fn key(&self) -> String {
        match (&self.customer_id, self.channel, &self.campaign_id) {
            (Some(c), Some(ch), _) => format!("{}/{}/{}", self.tenant_id, c, ch.as_str()),
            (_, _, Some(camp)) => format!("{}/campaign/{}", self.tenant_id, camp),
            _ => self.tenant_id.clone(),
        }
    }
}

/// Deterministic id: hex of SHA-256 over the parts (NUL-separated), first 16 bytes.
pub fn stable_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The last published allowance (OPEN, never published, before the first).
fn last_published(ctl: &ChannelControl) -> Published {
    ctl.published.unwrap_or(Published {
        state: AllowanceState::Open,
        allowed_from: None,
        seq: 0,
        decided_at: None,
    })
}

/// Publishes the allowance if it changed: the state differs from the last
/// published one, or the same restriction now lasts longer.
pub fn publish_if_changed(
    ctl: &mut ChannelControl,
    who: &CustomerRef,
    a: &Allowance,
    decided_at: i64,
    cause: Option<&str>,
    reason_override: Option<&'static str>,
) -> Option<ThrottleDecision> {
    let prev = last_published(ctl);
    let changed = if a.state != prev.state {
        true
    } else {
        a.state != AllowanceState::Open
            && a.allowed_from.unwrap_or(i64::MAX) > prev.allowed_from.unwrap_or(i64::MAX)
    };
    if !changed {
        return None;
    }
    let reason = if a.state == AllowanceState::Open {
        reason_override.unwrap_or(match prev.state {
            AllowanceState::Capped => "cap_window_passed",
            AllowanceState::Throttled => "cooldown_ended",
            AllowanceState::Suppressed => "resubscribed",
            AllowanceState::Open => "open",
        })
    } else {
        a.reason
    };
    publish(ctl, who, a, decided_at, cause, reason)
}

/// Publishes `a` whether or not it changed, with `reason` (a policy switch
/// the sender must hear of, e.g. an experiment arm stopped).
pub fn publish(
    ctl: &mut ChannelControl,
    who: &CustomerRef,
    a: &Allowance,
    decided_at: i64,
    cause: Option<&str>,
    reason: &str,
) -> Option<ThrottleDecision> {
    let prev = last_published(ctl);
    let published = Published {
        state: a.state,
        allowed_from: a.allowed_from,
        seq: prev.seq + 1,
        decided_at: Some(decided_at),
    };
    // The decision is built from what the state keeps of it, so that the
    // state can publish it again exactly (the two rates come as a pair).
    let detail = DecisionDetail {
        reason: reason.to_string(),
        cap: Some((a.cap.limit, a.cap.window.as_ms())),
        rates: a.short_click_rate.zip(a.baseline_click_rate),
        sends_in_window: a.sends_in_window as i64,
        cause_event_id: cause.map(str::to_string),
    };
    let d = decision(who, a.channel, &published, &detail, Some(prev.state));
    ctl.published = Some(published);
    ctl.last = Some(detail);
    d
}

/// The decision `published` + `detail` describe (`None` without a decision time,
/// in states written before it was kept).
fn decision(
    who: &CustomerRef,
    channel: Channel,
    published: &Published,
    detail: &DecisionDetail,
    previous: Option<AllowanceState>,
) -> Option<ThrottleDecision> {
    Some(ThrottleDecision {
        decision_id: stable_id(&[
            &who.tenant,
            &who.customer,
            channel.as_str(),
            &published.seq.to_string(),
        ]),
        tenant_id: who.tenant.clone(),
        customer_id: Some(who.customer.clone()),
        channel: Some(channel),
        campaign_id: None,
        state: published.state,
        reason: detail.reason.clone(),
        allowed_from: published.allowed_from,
        cap: detail.cap.map(|c| c.0),
        window_ms: detail.cap.map(|c| c.1),
        short_click_rate: detail.rates.map(|r| r.0),
        baseline_click_rate: detail.rates.map(|r| r.1),
        sends_in_window: detail.sends_in_window,
        decided_at: published.decided_at?,
        cause_event_id: detail.cause_event_id.clone(),
        previous,
    })
}

impl ChannelControl {
    /// The last decision published for this customer×channel, exactly as it was
    /// published (`previous` aside: it is not published), when the state keeps it.
    pub fn last_decision(&self, who: &CustomerRef, channel: Channel) -> Option<ThrottleDecision> {
        decision(
            who,
            channel,
            self.published.as_ref()?,
            self.last.as_ref()?,
            None,
        )
    }
}
