//! The recall picture of one customer, for `lapse inspect`.

use serde::Serialize;

use super::episode::RecallState;
use super::fire::{next_due, Due};
use super::holdout::arm_for;
use super::ids::{episode_id, trigger_id};
use super::records::{Arm, OutcomeKind};
use crate::domain::event::CustomerRef;
use crate::domain::lapse::{
    expected_interval, schedule, ExpectedInterval, LapsePolicy, Segment, Stage, StageDue, ValueTier,
};
use crate::domain::visits::Visits;

/// One processed stage, for `lapse inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct StageView {
    pub stage: Stage,
    pub attempt: u32,
    /// None when skipped or DORMANT (no trigger).
    pub trigger_id: Option<String>,
    pub due_at: i64,
    pub fired_at: i64,
    pub segment: Segment,
    pub skipped: bool,
    pub marketing_cost: i64,
    pub outcome: Option<OutcomeKind>,
}

/// The recall picture of one customer, for `lapse inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct RecallView {
    pub episode_id: Option<String>,
    pub episode_start: Option<i64>,
    pub expected_interval: Option<ExpectedInterval>,
    pub value_tier: ValueTier,
    /// The episode's arm, or the arm the customer would get now.
    pub arm: Arm,
    pub experiment: String,
    pub stages: Vec<StageView>,
    pub next_due: Option<Due>,
    /// The full schedule of the current episode, assuming on-time firing.
    pub schedule: Vec<StageDue>,
    /// The recalled trigger waiting for a repurchase, if any.
    pub repurchase: Option<RepurchaseView>,
}

/// A recalled trigger waiting for the customer's repurchase, for `lapse inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct RepurchaseView {
    pub trigger_id: String,
    pub segment: Segment,
    pub arm: Arm,
    /// The recalling visit, ms.
    pub recalled_at: i64,
    /// A visit after `recalled_at` and at or before this is a repurchase, ms.
    pub window_ends_at: i64,
}

/// Builds the inspect view.
pub fn view(st: &RecallState, v: &Visits, c: &CustomerRef, p: &LapsePolicy) -> RecallView {
    let start = v.last_at;
    let ep = st.current.as_ref().filter(|e| Some(e.start) == start);
    let interval = start.map(|_| expected_interval(v, p));
    RecallView {
        episode_id: start.map(|s| episode_id(c, s)),
        episode_start: start,
        value_tier: p.tier(v.lifetime_spend),
        arm: ep.and_then(|e| e.arm).unwrap_or_else(|| arm_for(c, p)),
        experiment: ep
            .and_then(|e| e.experiment.clone())
            .unwrap_or_else(|| p.experiment.clone()),
        stages: ep
            .map(|e| {
                e.stages
                    .iter()
                    .map(|r| StageView {
                        stage: r.stage,
                        attempt: r.attempt,
                        trigger_id: r
                            .is_trigger()
                            .then(|| trigger_id(c, e.start, r.stage, r.attempt)),
                        due_at: r.due_at,
                        fired_at: r.fired_at,
                        segment: r.segment,
                        skipped: r.skipped,
                        marketing_cost: r.cost,
                        outcome: r.outcome,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        next_due: next_due(st, v, p),
        schedule: match (start, &interval) {
            (Some(s), Some(i)) => schedule(s, i, p),
            _ => vec![],
        },
        expected_interval: interval,
        repurchase: st.repurchase.as_ref().map(|w| RepurchaseView {
            trigger_id: w.trigger_id(c),
            segment: w.segment,
            arm: w.arm,
            recalled_at: w.recalled_at,
            window_ends_at: w.recalled_at.saturating_add(w.window_ms),
        }),
    }
}
