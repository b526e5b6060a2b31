//! Firing: the next due stage of an episode and processing it, once.

use serde::Serialize;

use super::attribution::outcome;
use super::channel::{prefer, recommend, ChannelCandidate};
use super::episode::{RecallState, StageRecord};
use super::holdout::arm_for;
use super::ids::{episode_id, trigger_id};
use super::records::{Arm, OutcomeKind, RecallOutcome, RecallTrigger};
use crate::domain::event::CustomerRef;
use crate::domain::lapse::{
    expected_interval, scheduled_due, segment_for, ExpectedInterval, LapsePolicy, Stage, ValueTier,
    DAY_MS,
};
use crate::domain::output::Output;
use crate::domain::visits::Visits;

/// The next stage of the current episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Due {
    /// The episode (its start = the last visit).
    pub episode_start: i64,
    /// Position in the episode's schedule (0 = AT_RISK).
    pub index: usize,
    pub stage: Stage,
    pub attempt: u32,
    /// When it is due, ms: the timer's score.
    pub due_at: i64,
}

/// The next stage not yet processed in the current episode, or None (no visit
/// yet, or the episode reached DORMANT). Schedule the customer's timer at its
/// `due_at`; cancel the timer on None.
pub fn next_due(st: &RecallState, v: &Visits, p: &LapsePolicy) -> Option<Due> {
    let start = v.last_at?;
    let stages: &[StageRecord] = match &st.current {
        Some(e) if e.start == start => &e.stages,
        _ => &[],
    };
    due_at_index(stages, stages.len(), start, &expected_interval(v, p), p)
}

fn due_at_index(
    stages: &[StageRecord],
    index: usize,
    start: i64,
    interval: &ExpectedInterval,
    p: &LapsePolicy,
) -> Option<Due> {
    let (stage, attempt) = p.stage_at(index)?;
    let mut due_at = scheduled_due(index, start, interval, p)?;
    if stage == Stage::Dormant {
        if let Some(last) = stages.iter().rev().find(|r| r.is_trigger()) {
            due_at = due_at.max(last.fired_at.saturating_add(p.attribution_window_ms()));
        }
    }
    Some(Due {
        episode_start: start,
        index,
        stage,
        attempt,
        due_at,
    })
}

/// What [`fire`] needs besides the state.
pub struct FireCtx<'a> {
    pub customer: &'a CustomerRef,
    /// The customer's visits (after every applied visit).
    pub visits: &'a Visits,
    pub policy: &'a LapsePolicy,
    /// Channels and their availability at the firing time; see [`candidates`](super::candidates).
    pub candidates: &'a [ChannelCandidate],
    /// Cost of one send per channel, indexed by `Channel::index()`.
    pub costs: &'a [i64; 5],
}

/// What processing a stage did.
#[derive(Debug, Clone, PartialEq)]
pub enum Fired {
    /// The stage fired. Arm TREATMENT: publish it. Arm HOLDOUT: recorded in the
    /// state only (the would-be trigger); never publish it.
    Trigger(RecallTrigger),
    /// Recorded as skipped: the next stage was already due too. Nothing to publish.
    Skipped { stage: Stage, attempt: u32 },
    /// DORMANT: the episode is closed. Publish the NOT_RECALLED outcome of its
    /// last trigger (None if no trigger fired in it). No trigger is emitted.
    Dormant(Option<RecallOutcome>),
    /// `due` is not the current next stage (already processed, or a visit started
    /// a new episode since): nothing happened. Re-read [`next_due`].
    Stale,
    /// `now` is before `due.due_at`: nothing happened.
    NotDue,
}

impl Fired {
    /// What to put in `CustomerState::outbox` for this result, if anything: a
    /// TREATMENT trigger or a NOT_RECALLED outcome (never a HOLDOUT trigger).
    pub fn output(&self) -> Option<Output> {
        match self {
            Fired::Trigger(t) if t.arm == Arm::Treatment => Some(Output::Trigger(t.clone())),
            Fired::Dormant(Some(o)) => Some(Output::Outcome(o.clone())),
            _ => None,
        }
    }
}

/// Processes the stage `due` (from [`next_due`] on this state) at `now`; see
/// [`Fired`]. Exactly once per stage and episode: a second call with the same
/// `due` returns [`Fired::Stale`].
pub fn fire(st: &mut RecallState, due: &Due, now: i64, ctx: &FireCtx<'_>) -> Fired {
    let p = ctx.policy;
    let v = ctx.visits;
    if next_due(st, v, p).as_ref() != Some(due) {
        return Fired::Stale;
    }
    if now < due.due_at {
        return Fired::NotDue;
    }
    let tier = p.tier(v.lifetime_spend);
    let segment = segment_for(due.stage, tier);
    let interval = expected_interval(v, p);
    let c = ctx.customer;
    let ep = st.episode_at(due.episode_start);
    let arm = *ep.arm.get_or_insert_with(|| arm_for(c, p));
    let experiment = ep
        .experiment
        .get_or_insert_with(|| p.experiment.clone())
        .clone();
    let mut rec = StageRecord {
        stage: due.stage,
        attempt: due.attempt,
        due_at: due.due_at,
        fired_at: now,
        segment,
        skipped: false,
        cost: 0,
        outcome: None,
    };

    if due.stage == Stage::Dormant {
        ep.stages.push(rec);
        let start = ep.start;
        let out = ep
            .stages
            .iter_mut()
            .rev()
            .find(|r| r.is_trigger())
            .and_then(|last| {
                if last.outcome.is_some() {
                    return None;
                }
                last.outcome = Some(OutcomeKind::NotRecalled);
                Some(outcome(
                    c,
                    start,
                    &experiment,
                    arm,
                    last,
                    OutcomeKind::NotRecalled,
                    due.due_at,
                    None,
                    v.currency.clone().unwrap_or_default(),
                ))
            });
        return Fired::Dormant(out);
    }

    // Superseded? The next stage's due time if this one were skipped.
    rec.skipped = true;
    ep.stages.push(rec);
    let next = due_at_index(&ep.stages, due.index + 1, ep.start, &interval, p);
    if next.is_some_and(|n| n.due_at <= now) {
        return Fired::Skipped {
            stage: due.stage,
            attempt: due.attempt,
        };
    }
    let last = ep.stages.last_mut().expect("just pushed");
    last.skipped = false;

    let (recommended, fallbacks) = prefer(
        recommend(ctx.candidates, tier == ValueTier::High, ctx.costs),
        p.channel_preference.for_segment(segment),
    );
    let t = RecallTrigger {
        trigger_id: trigger_id(c, due.episode_start, due.stage, due.attempt),
        tenant_id: c.tenant.clone(),
        customer_id: c.customer.clone(),
        episode_id: episode_id(c, due.episode_start),
        stage: due.stage,
        attempt: due.attempt as i32,
        segment,
        days_since_last_visit: ((now - due.episode_start).div_euclid(DAY_MS))
            .clamp(i32::MIN as i64, i32::MAX as i64) as i32,
        expected_interval_days: interval.days,
        lifetime_value: v.lifetime_spend,
        currency: v.currency.clone().unwrap_or_default(),
        last_treatment: v.last_treatment.clone(),
        recommended_channel: recommended,
        fallback_channels: fallbacks,
        offer_tier: p.offers.for_segment(segment).to_string(),
        experiment,
        arm,
        due_at: due.due_at,
        fired_at: now,
        send_after: None,
    };
    Fired::Trigger(t)
}

/// Processes every stage due at `now`, in order (a convenience over
/// [`next_due`] + [`fire`]). Afterwards, [`next_due`] gives the timer's next score.
pub fn fire_due(st: &mut RecallState, now: i64, ctx: &FireCtx<'_>) -> Vec<Fired> {
    let mut out = Vec::new();
    while let Some(d) = next_due(st, ctx.visits, ctx.policy) {
        if d.due_at > now {
            break;
        }
        match fire(st, &d, now, ctx) {
            Fired::Stale | Fired::NotDue => break,
            f => out.push(f),
        }
    }
    out
}
