//! Attribution: a visit ends the episode and decides the outcomes of its
//! triggers (recalled, not recalled, retracted; repurchased: `repurchase.rs`).

use super::episode::{Episode, RecallState, StageRecord};
use super::ids::{episode_id, outcome_id, trigger_id};
use super::incentive::incentive_cost;
use super::records::{Arm, OutcomeKind, RecallOutcome};
use super::repurchase::{self, RepurchaseWatch};
use crate::domain::event::CustomerRef;
use crate::domain::lapse::{LapsePolicy, DAY_MS};

/// An applied visit, as [`on_visit`] needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct VisitInfo {
    /// Event time of the visit, ms.
    pub at: i64,
    /// Spend of the visit, minor units of `currency`.
    pub revenue: i64,
    pub currency: String,
    pub event_id: String,
    /// The offer redeemed on the visit, if any (its tier, and what it took off).
    pub offer_code: Option<String>,
    pub discount: Option<i64>,
    /// The customer's expected revisit interval as of this visit (the visit
    /// applied), days: the repurchase window after a recall is this ×
    /// `repurchase_factor`.
    pub expected_interval_days: f64,
}

/// A visit: ends the current episode (a new one starts at the visit) and decides
/// the outcomes of the ended episode's triggers (see the module docs), and the
/// repurchase of an earlier recall. A visit older than the current episode's
/// start is matched against the previous episode instead. Publish every outcome
/// ([`outcome_output`](super::outcome_output)). Call once per applied visit
/// (never for a redelivered or duplicate one), after `CustomerState::apply`
/// (`expected_interval_days` is the interval with the visit).
pub fn on_visit(
    st: &mut RecallState,
    visit: &VisitInfo,
    c: &CustomerRef,
    p: &LapsePolicy,
) -> Vec<RecallOutcome> {
    let t = visit.at;
    let repurchased = repurchase::on_visit(&mut st.repurchase, visit, c);
    let (mut out, recalled) = match st.current.as_ref().map(|e| e.start) {
        None => {
            st.current = Some(Episode::new(t));
            (vec![], None)
        }
        Some(s) if t > s => {
            let mut ended = st.current.take().expect("checked");
            let out = close_by_visit(&mut ended, visit, c, p);
            st.previous = Some(ended);
            st.current = Some(Episode::new(t));
            out
        }
        Some(s) if t == s => (vec![], None),
        Some(_) => match st.previous.as_mut() {
            Some(prev) if t > prev.start => close_by_visit(prev, visit, c, p),
            _ => (vec![], None),
        },
    };
    repurchase::after_outcomes(&mut st.repurchase, &out, recalled, c);
    out.extend(repurchased);
    out
}

fn close_by_visit(
    ep: &mut Episode,
    visit: &VisitInfo,
    c: &CustomerRef,
    p: &LapsePolicy,
) -> (Vec<RecallOutcome>, Option<RepurchaseWatch>) {
    let (Some(arm), Some(experiment)) = (ep.arm, ep.experiment.clone()) else {
        return (vec![], None);
    };
    let t = visit.at;
    let start = ep.start;
    let mut out = Vec::new();
    let mk = |r: &StageRecord, kind, decided_at, with_visit: bool| {
        outcome(
            c,
            start,
            &experiment,
            arm,
            r,
            kind,
            decided_at,
            with_visit.then_some(visit),
            visit.currency.clone(),
        )
    };
    for r in ep.stages.iter_mut().filter(|r| r.is_trigger()) {
        if r.fired_at > t && r.outcome != Some(OutcomeKind::Retracted) {
            out.push(mk(r, OutcomeKind::Retracted, t, true));
            r.outcome = Some(OutcomeKind::Retracted);
        }
    }
    let window = p.attribution_window_ms();
    let mut recalled = None;
    if let Some(r) = ep
        .stages
        .iter_mut()
        .rev()
        .find(|r| r.is_trigger() && r.fired_at <= t)
    {
        match r.outcome {
            None | Some(OutcomeKind::NotRecalled) if t - r.fired_at <= window => {
                let mut o = mk(r, OutcomeKind::Recalled, t, true);
                o.incentive_cost = incentive_cost(visit, p);
                out.push(o);
                r.outcome = Some(OutcomeKind::Recalled);
                recalled = Some(RepurchaseWatch::of(
                    start,
                    &experiment,
                    arm,
                    r,
                    visit,
                    p.repurchase_factor,
                ));
            }
            None => {
                let end = r.fired_at.saturating_add(window);
                out.push(mk(r, OutcomeKind::NotRecalled, end, false));
                r.outcome = Some(OutcomeKind::NotRecalled);
            }
            _ => {}
        }
    }
    (out, recalled)
}

/// The outcome `kind` of the trigger `rec` of the episode starting at
/// `episode_start` (a NOT_RECALLED from firing DORMANT has no visit).
#[allow(clippy::too_many_arguments)]
pub(super) fn outcome(
    c: &CustomerRef,
    episode_start: i64,
    experiment: &str,
    arm: Arm,
    rec: &StageRecord,
    kind: OutcomeKind,
    decided_at: i64,
    visit: Option<&VisitInfo>,
    currency: String,
) -> RecallOutcome {
    let tid = trigger_id(c, episode_start, rec.stage, rec.attempt);
    // Days and revenue of the visit that recalled, or repurchased.
    let recalled = matches!(kind, OutcomeKind::Recalled | OutcomeKind::Repurchased);
    RecallOutcome {
        outcome_id: outcome_id(&tid, kind),
        trigger_id: tid,
        kind,
        tenant_id: c.tenant.clone(),
        customer_id: c.customer.clone(),
        episode_id: episode_id(c, episode_start),
        stage: rec.stage,
        segment: rec.segment,
        experiment: experiment.to_string(),
        arm,
        days_to_return: visit
            .filter(|_| recalled)
            .map(|v| (v.at - rec.fired_at) as f64 / DAY_MS as f64),
        revenue: visit.filter(|_| recalled).map_or(0, |v| v.revenue),
        marketing_cost: rec.cost,
        currency,
        cause_event_id: visit.map(|v| v.event_id.clone()),
        decided_at,
        incentive_cost: 0,
    }
}
