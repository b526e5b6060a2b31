//! Per-arm measures: what an exposed customer did while the experiment ran,
//! from their exposure on. Kept beside the exposure in the customer's state, so
//! the report can compare arms customer by customer (the unit the arms are
//! drawn by), with each customer's own variance, and any instance, restart or
//! replay counts an event once (it is counted in the same state write that
//! applies it, and a duplicate is never applied).
//!
//! Counted, for each exposure whose experiment is active at the event's time
//! and at or after the exposure:
//! * marketing sends by channel and their cost (the send's, or the channel's
//!   configured cost), opens, clicks, replies, unsubscribe replies;
//! * visits and their spend;
//! * recall triggers fired (both recall arms), RECALLED outcomes and their
//!   incentive cost, REPURCHASED outcomes;
//! * satisfaction answers, their scores and the detractors among them.

use serde::{Deserialize, Serialize};

use super::active::Effective;
use crate::domain::event::{Event, EventBody, ReplyClass};
use crate::domain::feedback::{self, FeedbackClass};
use crate::domain::output::Output;
use crate::domain::policy::Policy;
use crate::domain::recall::{Fired, OutcomeKind};
use crate::domain::state::CustomerState;

/// One exposed customer's counts in one experiment. Counts saturate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Measures {
    /// Marketing sends by channel (`Channel::index`).
    pub sends: [u32; 5],
    pub opens: u32,
    pub clicks: u32,
    /// Replies other than unsubscribes.
    pub replies: u32,
    /// Unsubscribe replies (any channel).
    pub unsubscribes: u32,
    pub visits: u32,
    /// Spend of those visits, minor units.
    pub revenue: i64,
    /// Recall triggers fired (treatment and holdout alike).
    pub triggers: u32,
    /// RECALLED outcomes.
    pub recalled: u32,
    /// Cost of the marketing sends, minor units.
    pub marketing_cost: i64,
    /// When the customer's arm was stopped by the guardrail and they were
    /// switched to the control's policy (announced by throttle events).
    pub switched_at: Option<i64>,
    /// Incentive cost of the RECALLED outcomes (the redeemed offers), minor units.
    pub incentive_cost: i64,
    /// REPURCHASED outcomes.
    pub repurchased: u32,
    /// Satisfaction answers (NPS or CSAT).
    pub feedback: u32,
    /// Their scores on a common 0–100 scale (`feedback::normalized` × 100), summed.
    pub satisfaction: u32,
    /// Of them, detractors (`policy.feedback` thresholds).
    pub detractors: u32,
}

impl Measures {
    /// The fields in a fixed order (the compact format's and the report's).
    pub fn to_fields(&self) -> [i64; FIELDS] {
        let s = |v: u32| i64::from(v);
        [
            s(self.sends[0]),
            s(self.sends[1]),
            s(self.sends[2]),
            s(self.sends[3]),
            s(self.sends[4]),
            s(self.opens),
            s(self.clicks),
            s(self.replies),
            s(self.unsubscribes),
            s(self.visits),
            self.revenue,
            s(self.triggers),
            s(self.recalled),
            self.marketing_cost,
            self.switched_at.unwrap_or(0),
            self.incentive_cost,
            s(self.repurchased),
            s(self.feedback),
            s(self.satisfaction),
            s(self.detractors),
        ]
    }

    /// The inverse of [`Measures::to_fields`]; `None` when a count does not fit.
    pub fn from_fields(f: &[i64; FIELDS]) -> Option<Measures> {
        let c = |v: i64| u32::try_from(v).ok();
        Some(Measures {
            sends: [c(f[0])?, c(f[1])?, c(f[2])?, c(f[3])?, c(f[4])?],
            opens: c(f[5])?,
            clicks: c(f[6])?,
            replies: c(f[7])?,
            unsubscribes: c(f[8])?,
            visits: c(f[9])?,
            revenue: f[10],
            triggers: c(f[11])?,
            recalled: c(f[12])?,
            marketing_cost: f[13],
            switched_at: (f[14] != 0).then_some(f[14]),
            incentive_cost: f[15],
            repurchased: c(f[16])?,
            feedback: c(f[17])?,
            satisfaction: c(f[18])?,
            detractors: c(f[19])?,
        })
    }

    pub fn marketing_sends(&self) -> u32 {
        self.sends.iter().fold(0u32, |a, b| a.saturating_add(*b))
    }

    fn event(&mut self, ev: &Event, p: &Policy) {
        let inc = |v: &mut u32| *v = v.saturating_add(1);
        if let Some((channel, cost)) = ev.marketing_send(&p.costs) {
            inc(&mut self.sends[channel.index()]);
            self.marketing_cost = self.marketing_cost.saturating_add(cost.max(0));
        }
        match &ev.body {
            EventBody::Send { .. } => {}
            EventBody::Open { .. } => inc(&mut self.opens),
            EventBody::Click { .. } => inc(&mut self.clicks),
            // An opt-out is not engagement: counted apart.
            EventBody::Reply {
                class: ReplyClass::Unsubscribe,
                ..
            } => inc(&mut self.unsubscribes),
            EventBody::Reply { .. } => inc(&mut self.replies),
            EventBody::Visit { amount, .. } => {
                inc(&mut self.visits);
                self.revenue = self.revenue.saturating_add((*amount).max(0));
            }
            EventBody::Feedback { kind, score, .. } => {
                inc(&mut self.feedback);
                let points = (feedback::normalized(*kind, *score) * 100.0).round() as u32;
                self.satisfaction = self.satisfaction.saturating_add(points);
                if feedback::class(*kind, *score, &p.feedback) == FeedbackClass::Detractor {
                    inc(&mut self.detractors);
                }
            }
        }
    }

    fn output(&mut self, o: &Output) {
        if let Output::Outcome(o) = o {
            match o.kind {
                OutcomeKind::Recalled => {
                    self.recalled = self.recalled.saturating_add(1);
                    self.incentive_cost = self.incentive_cost.saturating_add(o.incentive_cost);
                }
                OutcomeKind::Repurchased => self.repurchased = self.repurchased.saturating_add(1),
                _ => {}
            }
        }
    }

    fn add_outcomes(&mut self, o: &Measures) {
        self.recalled = self.recalled.saturating_add(o.recalled);
        self.incentive_cost = self.incentive_cost.saturating_add(o.incentive_cost);
        self.repurchased = self.repurchased.saturating_add(o.repurchased);
    }

    fn fired(&mut self, f: &Fired) {
        if let Fired::Trigger(_) = f {
            self.triggers = self.triggers.saturating_add(1);
        }
    }
}

/// The number of fields of [`Measures`] (in the compact format).
pub const FIELDS: usize = 20;

/// Applies `count` to every exposure of `state` whose experiment is running
/// under `eff` and that happened at or before `t`.
fn each_running(
    state: &mut CustomerState,
    eff: &Effective<'_>,
    t: i64,
    mut count: impl FnMut(&mut Measures),
) {
    for x in state.exposures.iter_mut().filter(|x| x.at <= t) {
        let running = eff
            .assignments
            .iter()
            .any(|a| a.experiment.name == x.experiment);
        if running {
            count(&mut x.measures);
        }
    }
}

/// Counts an applied record at its time, and the outputs it added to the
/// outbox (`new_outputs`: the outbox entries from the record's step on).
pub fn on_record(state: &mut CustomerState, eff: &Effective<'_>, ev: &Event, outbox_before: usize) {
    if state.exposures.is_empty() {
        return;
    }
    let mut outcomes = Measures::default();
    for o in state.outbox.get(outbox_before..).unwrap_or(&[]) {
        outcomes.output(o);
    }
    let policy = &eff.policy;
    each_running(state, eff, ev.occurred_at, |m| {
        m.event(ev, policy);
        m.add_outcomes(&outcomes);
    });
}

/// Counts the recall triggers a timer at `now` fired (both recall arms; a
/// DORMANT stage's outcome is NOT_RECALLED, which is not counted).
pub fn on_timer(state: &mut CustomerState, eff: &Effective<'_>, fired: &[Fired], now: i64) {
    if state.exposures.is_empty() {
        return;
    }
    each_running(state, eff, now, |m| {
        fired.iter().for_each(|f| m.fired(f));
    });
}
