//! The care call: a SERVICE trigger (stage `CARE_CALL`) a detractor's
//! feedback starts, since an unhappy customer is the likeliest to drift away.
//!
//! It is no part of the lapse episode: it neither consumes nor advances the
//! AT_RISK / LAPSED / FOLLOW_UP stages (the episode's state is not touched),
//! so a visit after it is not a recall (attribution only looks at episode
//! stages), and a lapsing customer still gets their win-back stages. It is
//! never held out (service is not withheld: arm TREATMENT) and not subject to
//! marketing caps. Its id derives from the feedback's event id, so a
//! duplicate is an exact repeat.

use super::channel::{recommend, ChannelCandidate};
use super::episode::RecallState;
use super::ids::{care_call_id, episode_id};
use super::records::{Arm, RecallTrigger};
use crate::domain::event::CustomerRef;
use crate::domain::lapse::{expected_interval, LapsePolicy, Segment, Stage, DAY_MS};
use crate::domain::visits::Visits;

/// What [`care_call`] needs besides the recall state.
pub struct CareCallCtx<'a> {
    pub customer: &'a CustomerRef,
    pub visits: &'a Visits,
    pub policy: &'a LapsePolicy,
    /// Every channel, available unless the customer opted out (caps do not
    /// apply to service; quiet hours are kept by `send_after`, the caller's).
    pub candidates: &'a [ChannelCandidate],
    /// Cost of one send per channel, indexed by `Channel::index()` (ties).
    pub costs: &'a [i64; 5],
    /// `offer_tier` of a care call (`policy.feedback.care_call_offer`).
    pub offer: &'a str,
}

/// The care call of the feedback event `feedback_event_id` at `at` (its event
/// time: due and fired then, so a re-fold decides the same trigger).
/// `send_after` is left `None` for the caller.
pub fn care_call(
    r: &RecallState,
    feedback_event_id: &str,
    at: i64,
    ctx: &CareCallCtx<'_>,
) -> RecallTrigger {
    let c = ctx.customer;
    let v = ctx.visits;
    let p = ctx.policy;
    // The segment of the episode's latest trigger; a detractor not (yet)
    // lapsing is at risk (潜在流失) by what they said.
    let segment = r
        .current
        .as_ref()
        .filter(|e| Some(e.start) == v.last_at)
        .and_then(|e| e.last_trigger())
        .map_or(Segment::AtRisk, |s| s.segment);
    // PHONE allowed whatever the value tier: a care call is what phone is for.
    let (recommended, fallbacks) = recommend(ctx.candidates, true, ctx.costs);
    let since_visit = v.last_at.map_or(0, |l| (at - l).div_euclid(DAY_MS));
    RecallTrigger {
        trigger_id: care_call_id(c, feedback_event_id),
        tenant_id: c.tenant.clone(),
        customer_id: c.customer.clone(),
        // The episode since the last visit; without a visit, one named by the
        // feedback's time (no lapse episode exists).
        episode_id: episode_id(c, v.last_at.unwrap_or(at)),
        stage: Stage::CareCall,
        attempt: 1,
        segment,
        days_since_last_visit: since_visit.clamp(0, i32::MAX as i64) as i32,
        expected_interval_days: expected_interval(v, p).days,
        lifetime_value: v.lifetime_spend,
        currency: v.currency.clone().unwrap_or_default(),
        last_treatment: v.last_treatment.clone(),
        recommended_channel: recommended,
        fallback_channels: fallbacks,
        offer_tier: ctx.offer.to_string(),
        experiment: p.experiment.clone(),
        arm: Arm::Treatment,
        due_at: at,
        fired_at: at,
        send_after: None,
    }
}
