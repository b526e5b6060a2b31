//! Campaign-level throttling: a campaign whose click rate collapses against its
//! own first hours is throttled for every customer. Campaign state is folded
//! from many customers' events, so it keeps its own idempotence: per source
//! partition, the highest offset folded.

use serde::{Deserialize, Serialize};

use super::allowance::{stable_id, AllowanceState, Published, ThrottleDecision};
use super::engagement::decay;
use super::event::{Event, EventBody, EventKind, Purpose};
use super::policy::Policy;
use super::state::Source;

/// The campaign an event counts for: marketing sends and clicks naming one.
pub fn campaign_of(ev: &Event) -> Option<&str> {
    match &ev.body {
        EventBody::Send {
            purpose: Purpose::Marketing,
            campaign_id: Some(c),
            ..
        }
        | EventBody::Click {
            campaign_id: Some(c),
            ..
        } => Some(c),
        _ => None,
    }
}

/// One send or click of a campaign, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignSignal {
    pub kind: EventKind,
    pub partition: i32,
    pub offset: i64,
    pub at: i64,
    pub event_id: String,
    /// A marketing send made while the customer's channel was not allowed.
    pub violation: bool,
}

impl CampaignSignal {
    /// The signal of record `ev` (read from `src`) of a campaign.
    pub fn of(ev: &Event, src: &Source, violation: bool) -> CampaignSignal {
        CampaignSignal {
            kind: src.kind,
            partition: src.partition,
            offset: src.offset,
            at: ev.occurred_at,
            event_id: ev.event_id.clone(),
            violation,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub sends: f64,
    pub clicks: f64,
}

/// Everything kept about one campaign (bounded: one watermark per source partition).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CampaignState {
    pub first_send_at: Option<i64>,
    /// Sends and clicks in the baseline period after the first send.
    pub baseline: Tally,
    /// Decayed sends and clicks at `at`.
    pub recent: Tally,
    pub at: i64,
    /// Highest folded offset per (input kind, partition).
    pub watermarks: Vec<(u8, i32, i64)>,
    pub spell_until: Option<i64>,
    pub published: Option<Published>,
    /// Decisions not yet acknowledged by the broker (see `CustomerState::outbox`).
    pub outbox: Vec<ThrottleDecision>,
    /// Sends of this campaign that ignored a customer's allowance, and all sends.
    pub violations: u64,
    pub total_sends: u64,
    pub total_clicks: u64,
    /// The last decision, as published (re-published by a publisher a newer
    /// decision overtook, see `state_write.rs`). Stored after the postcard
    /// body (`store::record`), so that older records still decode.
    #[serde(skip)]
    pub last: Option<ThrottleDecision>,
}

impl CampaignState {
    /// Folds a signal unless its source offset was folded already. Returns whether it was new.
    pub fn fold(&mut self, s: &CampaignSignal, p: &Policy) -> bool {
        let k = s.kind.index() as u8;
        match self
            .watermarks
            .iter_mut()
            .find(|(kk, part, _)| *kk == k && *part == s.partition)
        {
            Some((_, _, off)) if s.offset <= *off => return false,
            Some((_, _, off)) => *off = s.offset,
            None => self.watermarks.push((k, s.partition, s.offset)),
        }
        let hl = p.throttle.campaign_half_life.as_ms();
        let is_send = s.kind == EventKind::Send;
        if is_send {
            self.first_send_at = Some(self.first_send_at.map_or(s.at, |f| f.min(s.at)));
            self.total_sends += 1;
            self.violations += s.violation as u64;
        } else {
            self.total_clicks += 1;
        }
        let baseline_end = self
            .first_send_at
            .map(|f| f + p.throttle.campaign_baseline.as_ms());
        if baseline_end.is_some_and(|e| s.at < e) {
            if is_send {
                self.baseline.sends += 1.0;
            } else {
                self.baseline.clicks += 1.0;
            }
        }
        // Order-independent decay, as for customers: a late signal is added already decayed.
        let w = if s.at >= self.at {
            let f = decay(s.at - self.at, hl);
            self.recent.sends *= f;
            self.recent.clicks *= f;
            self.at = s.at;
            1.0
        } else {
            decay(self.at - s.at, hl)
        };
        if is_send {
            self.recent.sends += w;
        } else {
            self.recent.clicks += w;
        }
        true
    }

    /// Smoothed recent and baseline click rates.
    pub fn rates(&self, p: &Policy) -> (f64, f64) {
        let th = &p.throttle;
        let prior = 0.05;
        let r = |t: &Tally| (t.clicks + th.prior_weight * prior) / (t.sends + th.prior_weight);
        (r(&self.recent), r(&self.baseline))
    }

    /// Decides at `t` (the latest signal's time); publishes on change.
    pub fn decide(
        &mut self,
        tenant: &str,
        campaign: &str,
        p: &Policy,
        t: i64,
        cause: &str,
    ) -> Option<ThrottleDecision> {
        let th = &p.throttle;
        let (recent, baseline) = self.rates(p);
        let baseline_over = self
            .first_send_at
            .is_some_and(|f| t >= f + th.campaign_baseline.as_ms());
        let mut reason = None;
        match self.spell_until {
            Some(u) if t >= u => {
                self.spell_until = None;
                reason = Some("cooldown_ended");
            }
            Some(_) if recent >= th.release_above * baseline => {
                self.spell_until = None;
                reason = Some("click_rate_recovered");
            }
            Some(_) => {}
            None => {
                if baseline_over
                    && self.recent.sends >= th.campaign_min_sends
                    && recent < th.throttle_below * baseline
                {
                    self.spell_until = Some(t + th.cooldown.as_ms());
                }
            }
        }
        let state = if self.spell_until.is_some() {
            AllowanceState::Throttled
        } else {
            AllowanceState::Open
        };
        let prev = self.published.unwrap_or(Published {
            state: AllowanceState::Open,
            allowed_from: None,
            seq: 0,
            decided_at: None,
        });
        if prev.state == state {
            return None;
        }
        let seq = prev.seq + 1;
        self.published = Some(Published {
            state,
            allowed_from: self.spell_until,
            seq,
            // Campaign records do not keep it (see `Published::decided_at`).
            decided_at: None,
        });
        let d = ThrottleDecision {
            decision_id: stable_id(&[tenant, "campaign", campaign, &seq.to_string()]),
            tenant_id: tenant.to_string(),
            customer_id: None,
            channel: None,
            campaign_id: Some(campaign.to_string()),
            state,
            reason: if state == AllowanceState::Throttled {
                "campaign_click_rate_collapse".into()
            } else {
                reason.unwrap_or("click_rate_recovered").into()
            },
            allowed_from: self.spell_until,
            cap: None,
            window_ms: None,
            short_click_rate: Some(recent),
            baseline_click_rate: Some(baseline),
            sends_in_window: self.recent.sends.round() as i64,
            decided_at: t,
            cause_event_id: Some(cause.to_string()),
            previous: None,
        };
        self.outbox.push(d.clone());
        self.last = Some(d.clone());
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::PolicyConfig;

    const MIN: i64 = 60_000;

    fn sig(kind: EventKind, offset: i64, at: i64) -> CampaignSignal {
        CampaignSignal {
            kind,
            partition: 0,
            offset,
            at,
            event_id: format!("e{offset}"),
            violation: false,
        }
    }

    #[test]
    fn a_collapsing_campaign_is_throttled_once_and_refolds_nothing() {
        let p = PolicyConfig::default().resolve(None).unwrap();
        let mut c = CampaignState::default();
        let mut off = 0;
        let mut t = 1_700_000_000_000;
        // First hours: 400 sends, 1 click in 10.
        for i in 0..400 {
            off += 1;
            c.fold(&sig(EventKind::Send, off, t), &p);
            if i % 10 == 0 {
                off += 1;
                c.fold(&sig(EventKind::Click, off, t + MIN), &p);
            }
            t += MIN / 2;
        }
        assert!(
            c.decide("t", "spring", &p, t, "x").is_none(),
            "healthy campaign"
        );
        // After the baseline: sends keep coming, clicks stop.
        t += 6 * 60 * MIN;
        let mut throttled = None;
        for _ in 0..600 {
            off += 1;
            c.fold(&sig(EventKind::Send, off, t), &p);
            t += MIN / 2;
            if let Some(d) = c.decide("t", "spring", &p, t, "x") {
                throttled = Some(d);
                break;
            }
        }
        let d = throttled.expect("throttled after the collapse");
        assert_eq!(d.state, AllowanceState::Throttled);
        assert_eq!(d.key(), "t/campaign/spring");
        assert_eq!(d.reason, "campaign_click_rate_collapse");
        // Re-folding an already folded offset changes nothing.
        let before = c.clone();
        assert!(!c.fold(&sig(EventKind::Send, off, t), &p));
        assert_eq!(c, before);
    }
}
