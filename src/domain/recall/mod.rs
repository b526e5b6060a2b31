//! Lapse episodes, recall triggers, holdout and attribution.
//!
//! Pure: no IO, no clock; every time is an argument (ms since the Unix epoch).
//! The schedule itself (interval, tier, stage due times) is in [`super::lapse`].
//!
//! # Episodes
//!
//! An episode starts at the customer's last visit (`Visits::last_at`) and ends at
//! the next visit. Its stages (`AT_RISK`, `LAPSED`, `FOLLOW_UP` × n, `DORMANT`)
//! are processed in order, each **once**: [`next_due`] names the next one,
//! [`fire`] processes it and records it in [`RecallState`], so a second `fire`
//! of the same stage is [`Fired::Stale`] and emits nothing.
//!
//! Processing a stage yields one of:
//! * a [`RecallTrigger`] (arm TREATMENT → to `recall.triggers`; arm HOLDOUT →
//!   recorded in the state only, never published);
//! * [`Fired::Skipped`]: when the stage fires so late that the following stage is
//!   already due too (a customer imported with an old last visit, a long outage),
//!   it is recorded as skipped and emits nothing, so a customer never receives
//!   AT_RISK, LAPSED and a follow-up in one burst — only the latest due stage;
//! * for `DORMANT`: no trigger (nothing to send), but a `NOT_RECALLED` outcome for
//!   the episode's last trigger. `DORMANT` is due no earlier than the attribution
//!   window after the last trigger *actually fired*, so a `NOT_RECALLED` is final
//!   unless a late visit contradicts it (below).
//!
//! # Outcomes
//!
//! [`on_visit`] ends the episode and decides, for the triggers of the episode the
//! visit falls into (the current one, or — for a visit older than the current
//! episode's start that arrives late — the previous one):
//! * `RETRACTED` for every trigger that fired **after** the visit's time (the
//!   customer was not lapsed when it fired; senders should cancel it);
//! * `RECALLED` for the latest trigger that fired at or before the visit, if the
//!   visit is within `attribution_window_days` of it (both arms: that is how uplift
//!   is measured), with days to return, the visit's revenue and the marketing cost
//!   since that trigger;
//! * `NOT_RECALLED` (decided at the end of that trigger's window) if the visit
//!   comes after the window and `DORMANT` has not been processed yet.
//!
//! A `RECALLED` carries the visit's `incentive_cost` (the redeemed offer:
//! [`incentive_cost`]); cost per recall = `marketing_cost + incentive_cost`.
//! An offer redeemed on a visit that recalls nothing counts nowhere (it is no
//! cost of a recall).
//!
//! After a `RECALLED`, the customer's next paid visit within `repurchase_factor ×`
//! the expected interval of the recalling visit is a `REPURCHASED` of the same
//! trigger, with that visit's revenue and the days since the recalling visit
//! (`repurchase.rs`; its marketing and incentive cost are 0: they belong to
//! the recall).
//!
//! Each trigger gets at most one outcome of each kind (the outcome id is derived
//! from trigger id + kind, so a repeat is an exact repeat). Precedence for
//! consumers, when one trigger has several: `RETRACTED` > `RECALLED` >
//! `NOT_RECALLED` (a late visit can turn a `NOT_RECALLED` into `RECALLED`, or
//! retract a trigger that already had an outcome); `REPURCHASED` comes on top
//! of a `RECALLED` and means nothing once the trigger is `RETRACTED`.
//!
//! # Publishing
//!
//! Trigger content depends on the firing time (fired_at, channel availability),
//! so a re-fire after a crash would not be an exact repeat. Whatever these
//! functions decide must therefore go into `CustomerState::outbox` in the same
//! state write that records the decision ([`Fired::output`],
//! [`outcome_output`]); the outbox is published after the write is durable.

mod attribution;
mod care_call;
mod channel;
mod episode;
mod fire;
mod holdout;
mod ids;
mod incentive;
mod records;
mod repurchase;
mod view;

pub use attribution::{on_visit, VisitInfo};
pub use care_call::{care_call, CareCallCtx};
pub use channel::{
    candidates, engagement_score, prefer, recommend, ChannelCandidate, ENGAGEMENT_TIE_STEP,
};
pub use episode::{Episode, RecallState, StageRecord};
pub use fire::{fire, fire_due, next_due, Due, FireCtx, Fired};
pub use holdout::{arm_for, is_holdout};
pub use ids::{care_call_id, episode_id, outcome_id, trigger_id};
pub use incentive::{incentive, incentive_cost, Incentive, IncentiveSource};
pub use records::{outcome_output, Arm, OutcomeKind, RecallOutcome, RecallTrigger};
pub use repurchase::RepurchaseWatch;
pub use view::{view, RecallView, RepurchaseView, StageView};

#[cfg(test)]
mod tests;
