//! The two steps that change a customer: a record arriving, and a timer coming
//! due. The batch path (`pipeline.rs`), the timer loop (`timer_loop.rs`) and
//! the backtest (`backtest/`) all run exactly these, so a backtest decides what
//! the live pipeline decides.

use super::allowance::AllowanceState;
use super::campaign::{CampaignSignal, CampaignState};
use super::contact_hours;
use super::decide::{self, allowance_at, Effects};
use super::event::{Channel, CustomerRef, Event};
use super::policy::Policy;
use super::recall::{self, FireCtx, Fired};
use super::state::{CustomerState, Notes, Outcome, Source, StateParams};

/// Folds one record into the customer and decides on it (allowances, recall
/// episode). `Effects` only when the record was applied.
pub fn on_record(
    state: &mut CustomerState,
    ev: &Event,
    src: Source,
    policy: &Policy,
    params: &StateParams,
) -> (Outcome, Notes, Option<Effects>) {
    let before = decide::allowance_before(state, ev, policy, params);
    let (out, notes) = state.apply(ev, src, params);
    if out != Outcome::Applied {
        return (out, notes, None);
    }
    contact_hours::observe(state, ev, policy);
    let fx = decide::on_event(state, ev, before, policy, params);
    decide::recall_on_event(state, ev, policy);
    (out, notes, Some(fx))
}

/// After a customer's records: records its next due time. Returns the time to
/// schedule when it changed (`None` also when it went away).
pub fn after_records(state: &mut CustomerState, policy: &Policy) -> Option<i64> {
    let due = decide::next_timer(state, policy);
    if due == state.timer_due {
        return None;
    }
    state.timer_due = due;
    due
}

/// What a due timer did to a customer.
pub struct TimerStep {
    /// The state changed (write it).
    pub changed: bool,
    pub fired: Vec<Fired>,
    /// Allowance releases decided by time.
    pub effects: Effects,
    /// The customer's next due time (recorded in the state).
    pub next: Option<i64>,
}

/// A customer's timer came due at `now`: releases what ran out, fires the due
/// recall stage (segment, channel, offer, holdout), and records the next due time.
pub fn on_timer(
    state: &mut CustomerState,
    who: &CustomerRef,
    policy: &Policy,
    params: &StateParams,
    now: i64,
) -> TimerStep {
    let before_outbox = state.outbox.len();
    let before_recall = state.recall.clone();
    let mut effects = Effects::default();
    decide::release_due(state, who, policy, params, now, None, &mut effects, None);
    let costs = policy.costs;
    let snapshot = state.clone();
    let available = |c: Channel| {
        let a = allowance_at(&snapshot, c, policy, params, now);
        a.state == AllowanceState::Open && a.allowed_from.is_some_and(|t| t <= now)
    };
    let cands = recall::candidates(&snapshot, now, params.horizons, &policy.lapse, available);
    let ctx = FireCtx {
        customer: who,
        visits: &snapshot.visits,
        policy: &policy.lapse,
        candidates: &cands,
        costs: &costs,
    };
    let mut fired = recall::fire_due(&mut state.recall, now, &ctx);
    for f in &mut fired {
        if let Fired::Trigger(t) = f {
            t.send_after = t.recommended_channel.and_then(|c| {
                let a = allowance_at(&snapshot, c, policy, params, now);
                contact_hours::next_good_time_of(&snapshot, &a, policy, now)
            });
        }
    }
    for f in &fired {
        if let Some(o) = f.output() {
            state.outbox.push(o);
        }
    }
    let next = decide::next_timer(state, policy);
    let changed = state.outbox.len() != before_outbox
        || state.recall != before_recall
        || next != state.timer_due;
    state.timer_due = next;
    TimerStep {
        changed,
        fired,
        effects,
        next,
    }
}

/// Folds a campaign's new signals (in source order) and decides as of the
/// latest one. Returns whether any signal was new.
pub fn on_campaign_signals(
    st: &mut CampaignState,
    tenant: &str,
    campaign: &str,
    signals: &[CampaignSignal],
    policy: &Policy,
) -> bool {
    let mut changed = false;
    let mut last: Option<&CampaignSignal> = None;
    for sg in signals {
        if st.fold(sg, policy) {
            changed = true;
            if last.is_none_or(|l| sg.at >= l.at) {
                last = Some(sg);
            }
        }
    }
    if let Some(l) = last {
        st.decide(tenant, campaign, policy, l.at, &l.event_id);
    }
    changed
}
