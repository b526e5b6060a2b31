//! Exposure: a customer is exposed to an experiment when the arm first changes
//! a decision for them. Until then arms cannot differ in outcome, so analyses
//! compare exposed customers only (a triggered analysis).
//!
//! The decision under the customer's arm is compared with the decision under
//! another arm on the same state: for a treatment arm, the control; for the
//! control, each other arm (the counterfactual: "would the treatment have
//! decided otherwise?"), so control customers are exposed at the same moments
//! treatment customers would be, and the comparison stays balanced.
//!
//! Decisions compared, for the keys the experiment changes:
//! * a channel's allowance (state and `allowed_from`) at `t` (caps, quiet hours);
//! * a channel's throttle verdict at `t` (would a spell start or end);
//! * the recall schedule: the next stage's due time; exposed at the earlier of
//!   the two due times, once `t` has reached it.
//!
//! Checked at each applied record and each timer; the exposure time is `t` (or
//! the earlier due time). Pure; the state keeps each exposure once.

use serde::{Deserialize, Serialize};

use super::active::{policy_under, ArmTag, Effective, Experiment};
use super::measure::Measures;
use super::spec::{PolicyKey, MAX_EXPERIMENTS};
use crate::domain::allowance::rates;
use crate::domain::decide::allowance_at;
use crate::domain::event::Channel;
use crate::domain::lapse::Segment;
use crate::domain::policy::Policy;
use crate::domain::recall::{next_due, Arm};
use crate::domain::state::{CustomerState, StateParams};

/// At most this many exposures are kept per customer (the oldest go first).
pub const MAX_EXPOSURES: usize = MAX_EXPERIMENTS;

/// A recorded exposure: experiment, arm, when the arm first mattered, and
/// what the customer did from then on while the experiment ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposure {
    pub experiment: String,
    pub arm: String,
    pub at: i64,
    #[serde(default)]
    pub measures: Measures,
}

/// Records the exposures that happen at `t` under `eff` in `state` and returns
/// them (to count). Each experiment exposes a customer once.
pub fn observe(
    state: &mut CustomerState,
    eff: &Effective<'_>,
    params: &StateParams,
    t: i64,
) -> Vec<ArmTag> {
    let mut new = Vec::new();
    for (i, a) in eff.assignments.iter().enumerate() {
        let e = a.experiment;
        // A stopped arm changes nothing any more: its customers are not
        // exposed from then on, nor the control's by it.
        if a.stopped || state.exposures.iter().any(|x| x.experiment == e.name) {
            continue;
        }
        let alternatives: Vec<usize> = if a.is_control() {
            (0..e.arms.len())
                .filter(|k| *k != e.control && !e.is_stopped(*k, t))
                .collect()
        } else {
            vec![e.control]
        };
        let at = alternatives.into_iter().find_map(|alt| {
            let other = policy_under(eff.control, &eff.assignments, Some((i, alt)));
            first_difference(state, e, &eff.policy, &other, params, t)
        });
        if let Some(at) = at {
            if state.exposures.len() >= MAX_EXPOSURES {
                let oldest = (0..state.exposures.len())
                    .min_by_key(|k| state.exposures[*k].at)
                    .unwrap_or(0);
                state.exposures.remove(oldest);
            }
            state.exposures.push(Exposure {
                experiment: e.name.clone(),
                arm: a.arm_name().to_string(),
                at,
                measures: Measures::default(),
            });
            new.push(ArmTag {
                experiment: e.name.clone(),
                arm: a.arm_name().to_string(),
            });
        }
    }
    new
}

/// When the decisions under `p` and `q` on `state` first differ, if they do by `t`.
fn first_difference(
    state: &CustomerState,
    e: &Experiment,
    p: &Policy,
    q: &Policy,
    params: &StateParams,
    t: i64,
) -> Option<i64> {
    for c in Channel::ALL.into_iter().filter(|c| e.touches_channel(*c)) {
        let x = allowance_at(state, c, p, params, t);
        let y = allowance_at(state, c, q, params, t);
        if (x.state, x.allowed_from) != (y.state, y.allowed_from) {
            return Some(t);
        }
        if would_throttle(state, c, p, params, t) != would_throttle(state, c, q, params, t) {
            return Some(t);
        }
    }
    // A segment's offer or channel preference: exposed when a trigger of an
    // overridden segment fires in the experiment (to a contacted customer:
    // a holdout trigger says nothing to anyone) and the two policies differ
    // for its segment.
    let shaped: Vec<Segment> = e
        .keys
        .iter()
        .filter_map(PolicyKey::shapes_triggers)
        .collect();
    if let Some(ep) = state
        .recall
        .current
        .as_ref()
        .filter(|ep| ep.arm == Some(Arm::Treatment))
    {
        let fired = ep.stages.iter().rev().find(|s| !s.skipped);
        if let Some(s) = fired.filter(|s| s.fired_at >= e.start_ms && s.fired_at <= t) {
            let differs = |seg: Segment| {
                p.lapse.offers.for_segment(seg) != q.lapse.offers.for_segment(seg)
                    || p.lapse.channel_preference.for_segment(seg)
                        != q.lapse.channel_preference.for_segment(seg)
            };
            if shaped.contains(&s.segment) && differs(s.segment) {
                return Some(s.fired_at);
            }
        }
    }
    if e.touches_recall() {
        let due = |p: &Policy| {
            next_due(&state.recall, &state.visits, &p.lapse).map(|d| (d.stage, d.attempt, d.due_at))
        };
        let (dp, dq) = (due(p), due(q));
        if dp != dq {
            let earliest = [dp, dq].into_iter().flatten().map(|d| d.2).min();
            if let Some(at) = earliest.filter(|at| *at <= t) {
                return Some(at);
            }
        }
    }
    None
}

/// Whether channel `c` would be in a throttle spell after judging its rates at `t` under `p`.
fn would_throttle(
    state: &CustomerState,
    c: Channel,
    p: &Policy,
    params: &StateParams,
    t: i64,
) -> bool {
    let Some(en) = state.channel(c) else {
        return false;
    };
    let r = rates(en, c, p, t, params.horizons);
    let mut ctl = state.controls[c.index()].clone().unwrap_or_default();
    ctl.update_spell(&r, p, t);
    ctl.spell.is_some()
}
