//! What an applied event (or a due timer) means for a customer's allowances:
//! the pure step between the state fold and the outbox.

use super::allowance::{
    rates, Allowance, AllowanceState, ChannelControl, ThrottleDecision, Violation,
};
use super::cross_channel;
use super::event::{Channel, CustomerRef, Event, EventBody, Purpose};
use super::feedback::{self, FeedbackClass};
use super::lapse::expected_interval;
use super::lapse::Segment;
use super::output::Output;
use super::platform;
use super::policy::Policy;
use super::recall;
use super::state::{CustomerState, StateParams};

/// A published change of one customer×channel's allowance (for metrics and gauges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub channel: Channel,
    pub from: AllowanceState,
    pub to: AllowanceState,
}

/// Side effects of one step, for the adapters to count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    pub violations: Vec<(Channel, Violation)>,
    /// Marketing sends that filled the window (the channel became CAPPED).
    pub cap_hits: Vec<Channel>,
    pub transitions: Vec<(Transition, String)>,
    /// Recalling visits whose `offer_code` has no configured cost (incentive 0).
    pub unknown_offer_codes: u32,
    /// The care call a detractor's feedback started: its segment and channel.
    pub care_call: Option<(Segment, Option<Channel>)>,
}

impl Effects {
    fn published(&mut self, state: &mut CustomerState, prev: AllowanceState, d: ThrottleDecision) {
        if let Some(ch) = d.channel {
            if d.state == AllowanceState::Capped && prev != AllowanceState::Capped {
                self.cap_hits.push(ch);
            }
            if d.state != prev {
                self.transitions.push((
                    Transition {
                        channel: ch,
                        from: prev,
                        to: d.state,
                    },
                    d.reason.clone(),
                ));
            }
        }
        state.outbox.push(Output::Throttle(Box::new(d)));
    }
}

fn published_state(ctl: &ChannelControl) -> AllowanceState {
    ctl.published.map_or(AllowanceState::Open, |p| p.state)
}

/// The allowance of channel `c` at `t`, computed from the state (read-only).
pub fn allowance_at(
    state: &CustomerState,
    c: Channel,
    p: &Policy,
    sp: &StateParams,
    t: i64,
) -> Allowance {
    let empty = ChannelControl::default();
    let ctl = state.controls[c.index()].as_ref().unwrap_or(&empty);
    let e = state.channel(c).cloned().unwrap_or_default();
    let r = rates(&e, c, p, t, sp.horizons);
    let own = ctl.allowance(c, p, t, Some(r), state.is_unsubscribed(c));
    let own = platform::bind(own, platform::binding(state, c, p, t).as_ref(), p);
    let cap = cross_channel::touch_cap_free_at(&state.controls, p, t);
    cross_channel::bind_touch_cap(own, cap, p)
}

/// The allowance of channel `c` at `t` for one campaign: also closed while
/// the campaign is locked to another channel (one campaign, one channel).
pub fn campaign_allowance_at(
    state: &CustomerState,
    c: Channel,
    campaign_id: &str,
    p: &Policy,
    sp: &StateParams,
    t: i64,
) -> Allowance {
    let a = allowance_at(state, c, p, sp, t);
    let campaign = cross_channel::campaign_hash(campaign_id);
    let locked = cross_channel::campaign_locked_until(&state.campaign_touches, campaign, c, p, t);
    cross_channel::bind_campaign_lock(a, locked, p)
}

/// Re-evaluates channel `c` at `t` and publishes a decision if its allowance changed.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    state: &mut CustomerState,
    who: &CustomerRef,
    c: Channel,
    p: &Policy,
    sp: &StateParams,
    t: i64,
    cause: Option<&str>,
    fx: &mut Effects,
) {
    publish_channel(state, who, c, p, sp, t, cause, None, fx);
}

/// Channel `c`'s allowance at `t` under `p`, published if it changed, or
/// whatever it is with `announce` as the reason.
#[allow(clippy::too_many_arguments)]
fn publish_channel(
    state: &mut CustomerState,
    who: &CustomerRef,
    c: Channel,
    p: &Policy,
    sp: &StateParams,
    t: i64,
    cause: Option<&str>,
    announce: Option<&str>,
    fx: &mut Effects,
) {
    // Never before the last decision: a late event must not publish an
    // allowance older than the one already published (see `Published::decided_at`).
    let t = state.controls[c.index()]
        .as_ref()
        .and_then(|ctl| ctl.published)
        .and_then(|pb| pb.decided_at)
        .map_or(t, |d| t.max(d));
    let (a, released) = allowance_now(state, c, p, sp, t);
    let ctl = state.controls[c.index()].get_or_insert_with(ChannelControl::default);
    let prev = published_state(ctl);
    let d = match announce {
        None => super::allowance::publish_if_changed(ctl, who, &a, t, cause, released),
        Some(reason) => super::allowance::publish(ctl, who, &a, t, cause, reason),
    };
    if let Some(d) = d {
        fx.published(state, prev, d);
    }
}

/// Publishes channel `c`'s allowance at `t` under `p` whether or not it
/// changed, with `reason`: the customer's policy changed under them (an
/// experiment arm stopped) and the sender must hear of it.
#[allow(clippy::too_many_arguments)]
pub fn announce(
    state: &mut CustomerState,
    who: &CustomerRef,
    c: Channel,
    p: &Policy,
    sp: &StateParams,
    t: i64,
    reason: &str,
    fx: &mut Effects,
) {
    publish_channel(state, who, c, p, sp, t, None, Some(reason), fx);
}

/// Channel `c`'s allowance at `t` (judging its rates, which may start or end
/// a throttle spell: the released reason is returned).
fn allowance_now(
    state: &mut CustomerState,
    c: Channel,
    p: &Policy,
    sp: &StateParams,
    t: i64,
) -> (Allowance, Option<&'static str>) {
    let e = state.channel(c).cloned().unwrap_or_default();
    let r = Some(rates(&e, c, p, t, sp.horizons));
    let suppressed = state.is_unsubscribed(c);
    let touch_cap = cross_channel::touch_cap_free_at(&state.controls, p, t);
    let platform_rule = platform::binding(state, c, p, t);
    let ctl = state.controls[c.index()].get_or_insert_with(ChannelControl::default);
    let released = r.and_then(|r| ctl.update_spell(&r, p, t));
    let own = platform::bind(
        ctl.allowance(c, p, t, r, suppressed),
        platform_rule.as_ref(),
        p,
    );
    (cross_channel::bind_touch_cap(own, touch_cap, p), released)
}

/// What a sender asking just before `ev` was told: the allowance of a
/// marketing send's channel at its time, computed *before* the state folds the
/// send (its engagement counts move an adaptive cap; the send is judged by the
/// cap in force when it was made). `None` for every other event.
pub fn allowance_before(
    state: &CustomerState,
    ev: &Event,
    p: &Policy,
    sp: &StateParams,
) -> Option<Allowance> {
    match &ev.body {
        EventBody::Send {
            channel,
            purpose: Purpose::Marketing,
            ..
        } => Some(allowance_at(state, *channel, p, sp, ev.occurred_at)),
        _ => None,
    }
}

/// Effects of one applied event at its event time; `before` is
/// [`allowance_before`] of the event, taken before the state folded it.
pub fn on_event(
    state: &mut CustomerState,
    ev: &Event,
    before: Option<Allowance>,
    p: &Policy,
    sp: &StateParams,
) -> Effects {
    let mut fx = Effects::default();
    let t = ev.occurred_at;
    if let EventBody::Send {
        purpose: Purpose::Service,
        ..
    } = &ev.body
    {
        // Service messages are never capped and never change an allowance.
        return fx;
    }
    let mut marketing_send = false;
    if let EventBody::Send {
        channel,
        campaign_id,
        purpose: Purpose::Marketing,
        ..
    } = &ev.body
    {
        marketing_send = true;
        let before = before.unwrap_or_else(|| allowance_at(state, *channel, p, sp, t));
        let campaign = campaign_id.as_deref().map(cross_channel::campaign_hash);
        let locked = campaign.and_then(|k| {
            cross_channel::campaign_locked_until(&state.campaign_touches, k, *channel, p, t)
        });
        let ctl = state.controls[channel.index()].get_or_insert_with(ChannelControl::default);
        let own = ctl.record_send(t, &before, p, *channel);
        let v = match own {
            Some(Violation::Cap) if before.reason == cross_channel::CROSS_CHANNEL_CAP => {
                Some(Violation::CrossChannelCap)
            }
            Some(Violation::Cap) if platform::is_platform_reason(before.reason) => {
                Some(Violation::PlatformRule)
            }
            None if locked.is_some() => Some(Violation::CampaignOnOtherChannel),
            v => v,
        };
        if let Some(v) = v {
            fx.violations.push((*channel, v));
        }
        if let Some(k) = campaign {
            cross_channel::record_campaign_touch(&mut state.campaign_touches, k, *channel, p, t);
        }
    }
    // The event's channel; and when a send filled the touch cap, every other
    // channel too (the cap closes them all).
    let touch_cap_filled =
        marketing_send && cross_channel::touch_cap_free_at(&state.controls, p, t).is_some();
    let others = Channel::ALL
        .into_iter()
        .filter(|c| touch_cap_filled && Some(*c) != ev.channel());
    for c in ev.channel().into_iter().chain(others) {
        evaluate(
            state,
            &ev.customer,
            c,
            p,
            sp,
            t,
            Some(&ev.event_id),
            &mut fx,
        );
    }
    // Lazily release other channels whose restriction has run out by now.
    release_due(
        state,
        &ev.customer,
        p,
        sp,
        t,
        Some(&ev.event_id),
        &mut fx,
        ev.channel(),
    );
    fx
}

/// Publishes OPEN for restrictions that have run out by `t` (timer path and lazy release).
#[allow(clippy::too_many_arguments)]
pub fn release_due(
    state: &mut CustomerState,
    who: &CustomerRef,
    p: &Policy,
    sp: &StateParams,
    t: i64,
    cause: Option<&str>,
    fx: &mut Effects,
    skip: Option<Channel>,
) {
    for c in Channel::ALL {
        if Some(c) == skip {
            continue;
        }
        let published = state.controls[c.index()]
            .as_ref()
            .and_then(|ctl| ctl.published);
        let due = published.is_some_and(|pb| {
            matches!(pb.state, AllowanceState::Capped | AllowanceState::Throttled)
                && pb.allowed_from.is_some_and(|a| a <= t)
        }) || platform::inbound_window_closed(state, c, p, t);
        if due {
            evaluate(state, who, c, p, sp, t, cause, fx);
        }
    }
}

/// The earliest future time a published restriction runs out (for the timer store).
pub fn next_release(state: &CustomerState) -> Option<i64> {
    state
        .controls
        .iter()
        .flatten()
        .filter_map(|ctl| ctl.published)
        .filter(|pb| matches!(pb.state, AllowanceState::Capped | AllowanceState::Throttled))
        .filter_map(|pb| pb.allowed_from)
        .min()
}

/// Recall bookkeeping of one applied event: marketing cost since a trigger, and
/// the outcomes a visit decides (recalled, retracted, not recalled, repurchased).
/// A recalling visit whose offer code has no configured cost is noted in `fx`.
pub fn recall_on_event(state: &mut CustomerState, ev: &Event, p: &Policy, fx: &mut Effects) {
    if let Some((_, cost)) = ev.marketing_send(&p.costs) {
        state.recall.on_marketing_send(ev.occurred_at, cost);
    }
    if let EventBody::Visit {
        amount,
        currency,
        offer_code,
        discount,
        ..
    } = &ev.body
    {
        let info = recall::VisitInfo {
            at: ev.occurred_at,
            revenue: *amount,
            currency: currency.clone(),
            event_id: ev.event_id.clone(),
            offer_code: offer_code.clone(),
            discount: *discount,
            expected_interval_days: expected_interval(&state.visits, &p.lapse).days,
        };
        let outcomes = recall::on_visit(&mut state.recall, &info, &ev.customer, &p.lapse);
        if outcomes
            .iter()
            .any(|o| o.kind == recall::OutcomeKind::Recalled)
            && recall::incentive(&info, &p.lapse).source == recall::IncentiveSource::UnknownCode
        {
            fx.unknown_offer_codes += 1;
        }
        for o in outcomes {
            state.outbox.push(recall::outcome_output(o));
        }
    }
}

/// The care call of an applied feedback event, into the outbox: when the
/// feedback is a detractor's, is the customer's latest (`latest`: a late,
/// superseded score calls nobody) and `policy.feedback.care_call` is on.
/// Decided at the feedback's event time. Returns its segment and channel.
pub fn care_call_on_event(
    state: &mut CustomerState,
    ev: &Event,
    latest: bool,
    p: &Policy,
    sp: &StateParams,
) -> Option<(Segment, Option<Channel>)> {
    let EventBody::Feedback { kind, score, .. } = &ev.body else {
        return None;
    };
    let detractor = feedback::class(*kind, *score, &p.feedback) == FeedbackClass::Detractor;
    if !latest || !detractor || !p.feedback.care_call {
        return None;
    }
    let at = ev.occurred_at;
    // Service ignores caps and throttles: only opt-outs rule a channel out.
    let cands = super::recall::candidates(state, at, sp.horizons, &p.lapse, |_| true);
    let ctx = super::recall::CareCallCtx {
        customer: &ev.customer,
        visits: &state.visits,
        policy: &p.lapse,
        candidates: &cands,
        costs: &p.costs,
        offer: &p.feedback.care_call_offer,
    };
    let mut t = super::recall::care_call(&state.recall, &ev.event_id, at, &ctx);
    // Quiet hours are kept by timing: the first good hour outside them, or
    // (contact hours off) the end of the quiet period it fell in.
    let good = super::contact_hours::customer_good_hours(state, p, at);
    t.send_after = t.recommended_channel.and_then(|c| match &good {
        Some(g) => super::contact_hours::next_good_time(g, c, p, at),
        None => p.quiet_until(c, at),
    });
    let counted = (t.segment, t.recommended_channel);
    state.outbox.push(Output::Trigger(t));
    Some(counted)
}

/// When this customer's timer must next fire: the next recall stage or the
/// earliest allowance release, whichever comes first.
pub fn next_timer(state: &CustomerState, p: &Policy) -> Option<i64> {
    let recall = super::recall::next_due(&state.recall, &state.visits, &p.lapse).map(|d| d.due_at);
    let release = next_release(state)
        .into_iter()
        .chain(
            Channel::ALL
                .into_iter()
                .filter_map(|c| platform::inbound_window_closes(state, c, p)),
        )
        .min();
    match (recall, release) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
