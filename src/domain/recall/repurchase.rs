//! Repurchase (复购): after a `RECALLED`, the customer's next paid visit
//! (spend > 0: a free follow-up check buys nothing) within `repurchase_factor ×`
//! their expected interval of the recalling visit is one `REPURCHASED` outcome
//! of the same trigger (both arms, like `RECALLED`, so the repurchase rates of
//! treatment and holdout compare).
//!
//! What is remembered is one [`RepurchaseWatch`] per customer: the latest
//! recalled trigger (enough to rebuild its ids), the recalling visit's time and
//! the window. It ends with its `REPURCHASED`, is replaced by a later
//! `RECALLED`, and is dropped when its trigger is retracted. A visit beyond the
//! window yields nothing and leaves the watch in place, so a late visit inside
//! the window still counts; one that is the recalling visit itself, or older,
//! never does. Duplicate visits never get here (the state's event-id memory);
//! a second visit inside the window finds the watch gone.

use super::attribution::{outcome, VisitInfo};
use super::episode::StageRecord;
use super::ids::trigger_id;
use super::records::{Arm, OutcomeKind, RecallOutcome};
use crate::domain::event::CustomerRef;
use crate::domain::lapse::{Segment, Stage};

/// A recalled trigger waiting for the customer's repurchase.
#[derive(Debug, Clone, PartialEq)]
pub struct RepurchaseWatch {
    /// The trigger: its episode's start, stage and attempt (its id), segment,
    /// experiment and arm (copied onto the outcome).
    pub episode_start: i64,
    pub stage: Stage,
    pub attempt: u32,
    pub segment: Segment,
    pub experiment: String,
    pub arm: Arm,
    /// The recalling visit's time, ms.
    pub recalled_at: i64,
    /// A visit later than `recalled_at` by at most this is a repurchase, ms.
    pub window_ms: i64,
}

impl RepurchaseWatch {
    /// The watch of the trigger `rec` (of the episode starting at
    /// `episode_start`) recalled by `visit`.
    pub(super) fn of(
        episode_start: i64,
        experiment: &str,
        arm: Arm,
        rec: &StageRecord,
        visit: &VisitInfo,
        repurchase_factor: f64,
    ) -> RepurchaseWatch {
        let days = visit.expected_interval_days * repurchase_factor;
        RepurchaseWatch {
            episode_start,
            stage: rec.stage,
            attempt: rec.attempt,
            segment: rec.segment,
            experiment: experiment.to_string(),
            arm,
            recalled_at: visit.at,
            // Whole minutes: a millisecond-precise window would make every
            // stored time of the customer millisecond-precise (compact format).
            window_ms: (days * 1440.0).round() as i64 * 60_000,
        }
    }

    pub fn trigger_id(&self, c: &CustomerRef) -> String {
        trigger_id(c, self.episode_start, self.stage, self.attempt)
    }

    fn covers(&self, t: i64) -> bool {
        t > self.recalled_at && t - self.recalled_at <= self.window_ms
    }
}

/// The `REPURCHASED` outcome `visit` decides, if it is paid and falls into
/// the watch's window (the watch then ends: one per trigger).
pub(super) fn on_visit(
    watch: &mut Option<RepurchaseWatch>,
    visit: &VisitInfo,
    c: &CustomerRef,
) -> Option<RecallOutcome> {
    let w = watch.take_if(|w| visit.revenue > 0 && w.covers(visit.at))?;
    // The recalling visit stands in for the fired trigger: days and revenue
    // are counted from it; the messaging cost was the RECALLED's.
    let rec = StageRecord {
        stage: w.stage,
        attempt: w.attempt,
        due_at: w.recalled_at,
        fired_at: w.recalled_at,
        segment: w.segment,
        skipped: false,
        cost: 0,
        outcome: None,
    };
    Some(outcome(
        c,
        w.episode_start,
        &w.experiment,
        w.arm,
        &rec,
        OutcomeKind::Repurchased,
        visit.at,
        Some(visit),
        visit.currency.clone(),
    ))
}

/// Keeps the watch up to date with a visit's episode outcomes: a `RECALLED`
/// starts `recalled` (unless a later recall is already watched); a
/// `RETRACTED` of the watched trigger ends it.
pub(super) fn after_outcomes(
    watch: &mut Option<RepurchaseWatch>,
    outcomes: &[RecallOutcome],
    recalled: Option<RepurchaseWatch>,
    c: &CustomerRef,
) {
    if let Some(w) = watch.as_ref() {
        let id = w.trigger_id(c);
        if outcomes
            .iter()
            .any(|o| o.kind == OutcomeKind::Retracted && o.trigger_id == id)
        {
            *watch = None;
        }
    }
    if let Some(r) = recalled {
        if watch
            .as_ref()
            .is_none_or(|w| w.recalled_at <= r.recalled_at)
        {
            *watch = Some(r);
        }
    }
}
