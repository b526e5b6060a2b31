//! What a backtest reports: per channel and week the marketing sends a policy
//! would have allowed or blocked and why, the customers affected and the cost;
//! recall triggers per week, stage and segment with their cost; throttle
//! decisions; and, for two policies, the differences and example customers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{TimeZone, Utc};
use serde::Serialize;

use super::replay::Recorder;
use crate::domain::allowance::{ThrottleDecision, Violation};
use crate::domain::event::{Channel, CustomerRef, Event};
use crate::domain::recall::{RecallOutcome, RecallTrigger};
use crate::domain::state::Outcome;

/// Why a send would have been blocked, in report order.
pub const BLOCKED: [Violation; 7] = [
    Violation::Cap,
    Violation::Throttled,
    Violation::Suppressed,
    Violation::QuietHours,
    Violation::CrossChannelCap,
    Violation::CampaignOnOtherChannel,
    Violation::PlatformRule,
];

fn blocked_index(v: Violation) -> usize {
    BLOCKED.iter().position(|b| *b == v).unwrap_or(0)
}

/// The week of `t`: days since the epoch of its Monday (UTC). 1970-01-01 was a Thursday.
pub fn week_of(t: i64) -> i64 {
    let day = t.div_euclid(86_400_000);
    day - (day + 3).rem_euclid(7)
}

/// A week as its Monday, YYYY-MM-DD.
pub fn week_label(week: i64) -> String {
    Utc.timestamp_millis_opt(week * 86_400_000)
        .single()
        .unwrap_or_default()
        .date_naive()
        .to_string()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SendRow {
    pub allowed: u64,
    /// By reason, in the order of [`BLOCKED`]: cap, throttled, suppressed,
    /// quiet_hours, cross_channel (touch cap), campaign_channel (one campaign,
    /// one channel), platform (a platform rule).
    pub blocked: [u64; 7],
    /// Customers with at least one blocked send.
    pub customers_blocked: u64,
    /// Marketing cost of the allowed sends (minor units).
    pub cost_allowed: i64,
    /// Marketing cost the blocked sends would have saved.
    pub cost_blocked: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TriggerRow {
    pub triggers: u64,
    /// The recommended channel's send cost, summed.
    pub cost: i64,
}

/// Everything one policy decided over the history.
#[derive(Debug, Default)]
pub struct PolicyReport {
    /// (channel, week) → sends.
    pub sends: BTreeMap<(Channel, i64), SendRow>,
    /// (week, stage, segment) → triggers.
    pub triggers: BTreeMap<(i64, &'static str, &'static str), TriggerRow>,
    /// (scope: channel or "campaign", state, reason) → published throttle decisions.
    pub throttle_decisions: BTreeMap<(String, String, String), u64>,
    /// Outcome kind → recall outcomes.
    pub outcomes: BTreeMap<String, u64>,
    /// Records skipped by the dedup rules, by kind.
    pub skipped: BTreeMap<String, u64>,
    pub customers_blocked: HashMap<(Channel, i64), BTreeSet<CustomerRef>>,
    /// Per customer, blocked sends by channel (`Channel::index`), for samples
    /// of differences (keyed by customer alone: looked up without a copy of the id).
    pub blocked_by_customer: HashMap<CustomerRef, [u64; 5]>,
    /// Ids of every published decision, when kept (tests, `--ids`).
    pub ids: Option<Ids>,
}

/// The ids of what was published, as the live pipeline would have.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Ids {
    pub throttle: BTreeSet<String>,
    pub triggers: BTreeSet<String>,
    pub outcomes: BTreeSet<String>,
}

impl PolicyReport {
    pub fn keeping_ids() -> PolicyReport {
        PolicyReport {
            ids: Some(Ids::default()),
            ..PolicyReport::default()
        }
    }

    /// Fills in the distinct-customer counts (call once the replay is over).
    pub fn finish(&mut self) {
        for (key, who) in &self.customers_blocked {
            if let Some(row) = self.sends.get_mut(key) {
                row.customers_blocked = who.len() as u64;
            }
        }
    }

    pub fn totals(&self) -> SendRow {
        let mut t = SendRow::default();
        for r in self.sends.values() {
            t.allowed += r.allowed;
            for (t, r) in t.blocked.iter_mut().zip(r.blocked) {
                *t += r;
            }
            t.cost_allowed += r.cost_allowed;
            t.cost_blocked += r.cost_blocked;
        }
        t.customers_blocked = self.blocked_by_customer.len() as u64;
        t
    }

    /// Sends of customer `c` on channel `ch` that were blocked.
    pub fn blocked_by(&self, c: &CustomerRef, ch: Channel) -> u64 {
        self.blocked_by_customer.get(c).map_or(0, |n| n[ch.index()])
    }
}

/// JSON: the keyed tables as lists of rows (JSON object keys must be strings).
impl Serialize for PolicyReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sends: Vec<_> = self
            .sends
            .iter()
            .map(|((channel, week), r)| {
                serde_json::json!({
                    "channel": channel.as_str(), "week": week_label(*week), "allowed": r.allowed,
                    "blocked_cap": r.blocked[0], "blocked_throttled": r.blocked[1],
                    "blocked_suppressed": r.blocked[2], "blocked_quiet_hours": r.blocked[3],
                    "blocked_cross_channel": r.blocked[4], "blocked_campaign_channel": r.blocked[5],
                    "blocked_platform": r.blocked[6],
                    "customers_blocked": r.customers_blocked,
                    "cost_allowed": r.cost_allowed, "cost_blocked": r.cost_blocked,
                })
            })
            .collect();
        let triggers: Vec<_> = self
            .triggers
            .iter()
            .map(|((week, stage, segment), r)| {
                serde_json::json!({"week": week_label(*week), "stage": stage, "segment": segment, "triggers": r.triggers, "cost": r.cost})
            })
            .collect();
        let decisions: Vec<_> = self
            .throttle_decisions
            .iter()
            .map(|((scope, state, reason), n)| {
                serde_json::json!({"scope": scope, "state": state, "reason": reason, "count": n})
            })
            .collect();
        serde_json::json!({
            "sends": sends,
            "totals": self.totals(),
            "triggers": triggers,
            "throttle_decisions": decisions,
            "outcomes": self.outcomes,
            "skipped": self.skipped,
        })
        .serialize(s)
    }
}

impl Recorder for PolicyReport {
    fn send(&mut self, ev: &Event, channel: Channel, cost: i64, blocked: Option<Violation>) {
        let week = week_of(ev.occurred_at);
        let row = self.sends.entry((channel, week)).or_default();
        match blocked {
            None => {
                row.allowed += 1;
                row.cost_allowed += cost;
            }
            Some(v) => {
                row.blocked[blocked_index(v)] += 1;
                row.cost_blocked += cost;
                // The customer's id is copied only the first time it is seen.
                let who = self.customers_blocked.entry((channel, week)).or_default();
                if !who.contains(&ev.customer) {
                    who.insert(ev.customer.clone());
                }
                match self.blocked_by_customer.get_mut(&ev.customer) {
                    Some(n) => n[channel.index()] += 1,
                    None => {
                        let mut n = [0; 5];
                        n[channel.index()] = 1;
                        self.blocked_by_customer.insert(ev.customer.clone(), n);
                    }
                }
            }
        }
    }

    fn throttle(&mut self, d: &ThrottleDecision) {
        let scope = d.channel.map_or("campaign", Channel::as_str);
        *self
            .throttle_decisions
            .entry((
                scope.to_string(),
                d.state.as_str().to_string(),
                d.reason.clone(),
            ))
            .or_default() += 1;
        if let Some(ids) = &mut self.ids {
            ids.throttle.insert(d.decision_id.clone());
        }
    }

    fn trigger(&mut self, t: &RecallTrigger, cost: i64) {
        let key = (week_of(t.due_at), t.stage.as_str(), t.segment.as_str());
        let row = self.triggers.entry(key).or_default();
        row.triggers += 1;
        row.cost += cost;
        if let Some(ids) = &mut self.ids {
            ids.triggers.insert(t.trigger_id.clone());
        }
    }

    fn outcome(&mut self, o: &RecallOutcome) {
        *self
            .outcomes
            .entry(o.kind.as_str().to_string())
            .or_default() += 1;
        if let Some(ids) = &mut self.ids {
            ids.outcomes.insert(o.outcome_id.clone());
        }
    }

    fn skipped(&mut self, _ev: &Event, why: Outcome) {
        let kind = match why {
            Outcome::Redelivered => "redelivery",
            Outcome::DuplicateEventId => "event_id",
            Outcome::BeyondDedupHorizon => "beyond_dedup_horizon",
            Outcome::Applied => "applied",
        };
        *self.skipped.entry(kind.to_string()).or_default() += 1;
    }
}
