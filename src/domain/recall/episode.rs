//! What recall keeps per customer: the current and previous lapse episodes and
//! their processed stages.

use serde::{Deserialize, Serialize};

use super::records::{Arm, OutcomeKind};
use crate::domain::lapse::{Segment, Stage};

/// One processed stage of an episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: Stage,
    pub attempt: u32,
    /// When it was due and when it was processed, ms.
    pub due_at: i64,
    pub fired_at: i64,
    pub segment: Segment,
    /// Superseded by the next stage, already due when this one was processed: no
    /// trigger was emitted.
    pub skipped: bool,
    /// Cost of the MARKETING sends at or after `fired_at` (minor units).
    pub cost: i64,
    /// Strongest outcome emitted for this trigger so far.
    pub outcome: Option<OutcomeKind>,
}

impl StageRecord {
    /// A trigger was emitted for it (either arm).
    pub fn is_trigger(&self) -> bool {
        !self.skipped && self.stage != Stage::Dormant
    }
}

/// A lapse episode: from one visit to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// Its start: the last visit time, ms. Part of every id.
    pub start: i64,
    /// Arm and experiment, fixed when the first stage is processed (so a change of
    /// `holdout_share` or `experiment` never moves a customer mid-episode).
    pub arm: Option<Arm>,
    pub experiment: Option<String>,
    /// Stages processed, in schedule order (at most `3 + max_follow_ups`).
    pub stages: Vec<StageRecord>,
}

impl Episode {
    pub(super) fn new(start: i64) -> Episode {
        Episode {
            start,
            arm: None,
            experiment: None,
            stages: Vec::new(),
        }
    }

    /// The latest stage that emitted a trigger.
    pub fn last_trigger(&self) -> Option<&StageRecord> {
        self.stages.iter().rev().find(|r| r.is_trigger())
    }
}

/// Everything recall keeps about one customer (stored in `CustomerState`).
/// Bounded: two episodes of at most `3 + max_follow_ups` records each, and
/// one repurchase watch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecallState {
    /// The episode running since the last visit.
    pub current: Option<Episode>,
    /// The one before, kept so a late visit can still be attributed or retract.
    pub previous: Option<Episode>,
    /// The latest `RECALLED` trigger still waiting for its repurchase. Kept by
    /// the compact format only (format 1, postcard, predates it).
    #[serde(skip)]
    pub repurchase: Option<super::repurchase::RepurchaseWatch>,
}

impl RecallState {
    /// The current episode, started afresh at `start` if it is another one (the
    /// old one becomes `previous`).
    pub(super) fn episode_at(&mut self, start: i64) -> &mut Episode {
        if self.current.as_ref().is_none_or(|e| e.start != start) {
            self.previous = self.current.take();
        }
        self.current.get_or_insert_with(|| Episode::new(start))
    }

    /// Adds the cost of a MARKETING send at `sent_at` to every trigger of the
    /// current episode that fired at or before it. Call for every applied
    /// marketing send (not SERVICE), with its cost or the channel default.
    pub fn on_marketing_send(&mut self, sent_at: i64, cost: i64) {
        if let Some(e) = self.current.as_mut() {
            for r in e.stages.iter_mut() {
                if r.is_trigger() && r.fired_at <= sent_at {
                    r.cost = r.cost.saturating_add(cost);
                }
            }
        }
    }
}
