//! The replay: a history of records, in replay order, through the domain
//! steps the live pipeline runs (`domain::step`), on the event clock (the
//! latest event time replayed), with nothing written anywhere: every decision
//! is handed to a [`Recorder`].
//!
//! Customers do not depend on each other, only on the clock, whose moves are
//! known before the replay starts (`clock.rs`). So the replay runs customer by
//! customer: one state in memory at a time (no store of every customer's
//! state, none encoded or decoded), each customer's records in replay order
//! with its timers fired where the clock would have fired them. Campaigns do
//! span customers: their signals (and whether each send broke its customer's
//! allowance) are folded afterwards, in replay order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::domain::allowance::{ThrottleDecision, Violation};
use crate::domain::campaign::{campaign_of, CampaignSignal, CampaignState};
use crate::domain::decide::Effects;
use crate::domain::event::{Channel, CustomerRef, Event};
use crate::domain::experiment::Effective;
use crate::domain::output::Output;
use crate::domain::policy::{Policies, Policy};
use crate::domain::recall::{RecallOutcome, RecallTrigger};
use crate::domain::state::{CustomerState, Outcome, Source, StateParams};
use crate::domain::step;
use crate::store::compact;

use super::clock::{EventClock, Firing};
use super::source::History;

/// What the replay tells its caller: each customer's decisions in its own
/// event order, customer after customer, then the campaigns' decisions.
pub trait Recorder {
    /// A marketing send of the history, and whether the policy allowed it at
    /// its time (`None`) or why not. Called before the send is applied.
    fn send(&mut self, ev: &Event, channel: Channel, cost: i64, blocked: Option<Violation>);
    fn throttle(&mut self, d: &ThrottleDecision);
    fn trigger(&mut self, t: &RecallTrigger, cost: i64);
    fn outcome(&mut self, o: &RecallOutcome);
    /// A record the dedup rules skipped (a redelivery or a re-sent copy).
    fn skipped(&mut self, _ev: &Event, _why: Outcome) {}
}

/// What a record means to its campaign (filled in by the customers' pass).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CampaignMark {
    /// Not a campaign signal, skipped by the dedup rules, or not replayed.
    None,
    Applied,
    /// A marketing send its customer's allowance did not allow.
    Violation,
}

/// A customer and its final state, compact-encoded (what Redis would hold).
type Kept<'h> = (&'h CustomerRef, Box<[u8]>);

/// The replay of one policy.
pub struct Replay<'p, 'h> {
    policies: &'p Policies,
    params: StateParams,
    /// Each customer's final state, compact-encoded (what Redis would hold),
    /// when asked for (the benchmark measures them; `lapse backtest` does not keep them).
    kept: Option<Vec<Kept<'h>>>,
}

impl<'p, 'h> Replay<'p, 'h> {
    pub fn new(policies: &'p Policies, params: StateParams) -> Replay<'p, 'h> {
        Replay {
            policies,
            params,
            kept: None,
        }
    }

    /// Keeps every customer's final state (compact-encoded).
    pub fn keeping_states(mut self) -> Replay<'p, 'h> {
        self.kept = Some(Vec::new());
        self
    }

    /// Customers whose final state is kept.
    pub fn customers(&self) -> usize {
        self.kept.as_ref().map_or(0, Vec::len)
    }

    /// Customer number `who` and its final state, when kept.
    pub fn state(&self, who: u32) -> Option<(&'h CustomerRef, CustomerState)> {
        let (c, body) = self.kept.as_ref()?.get(who as usize)?;
        // Bodies are written by `compact::encode` just above: they decode.
        Some((*c, compact::decode(body).ok()?))
    }

    /// Replays `history`. Returns whether `stop` interrupted it (then only the
    /// customers replayed so far are reported, and the campaigns' signals
    /// among their records); `progress` gets (records replayed, records)
    /// about once a second.
    pub fn run(
        &mut self,
        history: &'h History,
        rec: &mut impl Recorder,
        stop: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> bool {
        let events = &history.events;
        let clock = EventClock::new(events.iter().map(|(ev, _, _)| ev.occurred_at));
        let (starts, order) = by_customer(&history.customers);
        let mut marks = vec![CampaignMark::None; events.len()];
        let mut interrupted = false;
        let mut last = Instant::now();
        let mut done = 0;
        for who in 0..starts.len().saturating_sub(1) {
            let own = &order[starts[who] as usize..starts[who + 1] as usize];
            let Some(first) = own.first() else {
                continue;
            };
            if stop.load(Ordering::Relaxed) {
                interrupted = true;
                break;
            }
            let customer = &events[*first as usize].0.customer;
            let state = self.customer(history, &clock, customer, own, &mut marks, rec);
            if let Some(kept) = &mut self.kept {
                let mut body = Vec::new();
                compact::encode(&state, &mut body);
                kept.push((customer, body.into_boxed_slice()));
            }
            done += own.len();
            if last.elapsed().as_secs() >= 1 {
                progress(done, events.len());
                last = Instant::now();
            }
        }
        self.campaigns(history, &marks, rec);
        interrupted
    }

    /// Replays one customer's records (positions in the history, ascending),
    /// firing its timers where the clock fires them. Returns its final state.
    fn customer(
        &self,
        history: &History,
        clock: &EventClock,
        customer: &CustomerRef,
        own: &[u32],
        marks: &mut [CampaignMark],
        rec: &mut impl Recorder,
    ) -> CustomerState {
        let policy = self.policies.of(&customer.tenant);
        let mut state = CustomerState::default();
        // Where and when the pending timer (`state.timer_due`) fires: found
        // again only when a record changes it.
        let mut pending = None;
        for &at in own {
            let at = at as usize;
            self.fire(&mut state, customer, policy, clock, &mut pending, at, rec);
            let (ev, src, _) = &history.events[at];
            // Under the customer's experiment arms at the record's time, as live.
            let eff = self.policies.effective(customer, ev.occurred_at);
            let Some(fx) = record(&mut state, ev, *src, &eff, &self.params, rec) else {
                continue;
            };
            let due_before = state.timer_due;
            step::after_records(&mut state, &eff.policy);
            if state.timer_due != due_before {
                pending = state.timer_due.and_then(|due| clock.firing(at + 1, due));
            }
            drain(&mut state, policy.costs, rec);
            if campaign_of(ev).is_some() {
                marks[at] = if fx.violations.is_empty() {
                    CampaignMark::Applied
                } else {
                    CampaignMark::Violation
                };
            }
        }
        // Timers due by the end of the history fire: the event clock has reached it.
        self.fire(
            &mut state,
            customer,
            policy,
            clock,
            &mut pending,
            usize::MAX,
            rec,
        );
        state
    }

    /// Fires the customer's timers that fire before the record at `until`
    /// (`usize::MAX`: by the end of the history), from the `pending` one on.
    #[allow(clippy::too_many_arguments)]
    fn fire(
        &self,
        state: &mut CustomerState,
        customer: &CustomerRef,
        policy: &Policy,
        clock: &EventClock,
        pending: &mut Option<Firing>,
        until: usize,
        rec: &mut impl Recorder,
    ) {
        while let Some(f) = *pending {
            if f.before > until {
                break;
            }
            // Sets `state.timer_due` to the next due time, which may fire before the same record.
            let eff = self.policies.effective(customer, f.now);
            step::on_timer_under(state, customer, &eff, &self.params, f.now);
            drain(state, policy.costs, rec);
            *pending = state.timer_due.and_then(|due| clock.firing(f.before, due));
        }
    }

    /// Folds the campaigns' signals in replay order, as the live pipeline does.
    fn campaigns(&self, history: &History, marks: &[CampaignMark], rec: &mut impl Recorder) {
        // tenant → campaign → state (looked up without allocating).
        let mut campaigns: HashMap<&str, HashMap<&str, CampaignState>> = HashMap::new();
        for ((ev, src, _), mark) in history.events.iter().zip(marks) {
            if *mark == CampaignMark::None {
                continue;
            }
            let Some(campaign) = campaign_of(ev) else {
                continue;
            };
            let policy = self.policies.of(&ev.customer.tenant);
            let signal = CampaignSignal::of(ev, src, *mark == CampaignMark::Violation);
            let tenant = &ev.customer.tenant;
            let st = campaigns
                .entry(tenant)
                .or_default()
                .entry(campaign)
                .or_default();
            step::on_campaign_signals(st, tenant, campaign, &[signal], policy);
            for d in st.outbox.drain(..) {
                rec.throttle(&d);
            }
        }
    }
}

/// Record positions grouped by customer number: customer `n`'s are
/// `order[starts[n]..starts[n + 1]]`, ascending (a counting sort).
fn by_customer(customers: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let n = customers.iter().max().map_or(0, |m| *m as usize + 1);
    let mut starts = vec![0u32; n + 1];
    for c in customers {
        starts[*c as usize + 1] += 1;
    }
    for i in 0..n {
        starts[i + 1] += starts[i];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; customers.len()];
    for (at, c) in customers.iter().enumerate() {
        let slot = &mut next[*c as usize];
        order[*slot as usize] = at as u32;
        *slot += 1;
    }
    (starts, order)
}

/// Hands a state's outbox to the recorder and clears it (what `publish` does live).
/// Folds one record and reports it: a skip, or a marketing send (allowed, or
/// blocked and why). `None` when it was skipped.
fn record(
    state: &mut CustomerState,
    ev: &Event,
    src: Source,
    eff: &Effective<'_>,
    params: &StateParams,
    rec: &mut impl Recorder,
) -> Option<Effects> {
    let policy = eff.control;
    let (out, _, fx, _) = step::on_record_under(state, ev, src, eff, params);
    let Some(fx) = fx else {
        rec.skipped(ev, out);
        return None;
    };
    if let Some((channel, cost)) = ev.marketing_send(&policy.costs) {
        let blocked = fx
            .violations
            .iter()
            .find(|(c, _)| *c == channel)
            .map(|(_, v)| *v);
        rec.send(ev, channel, cost, blocked);
    }
    Some(fx)
}

fn drain(state: &mut CustomerState, costs: [i64; 5], rec: &mut impl Recorder) {
    for o in state.outbox.drain(..) {
        match o {
            Output::Throttle(d) => rec.throttle(&d),
            Output::Trigger(t) => {
                let cost = t.recommended_channel.map_or(0, |c| costs[c.index()]);
                rec.trigger(&t, cost);
            }
            Output::Outcome(o) => rec.outcome(&o),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::report::PolicyReport;
    use super::*;
    use crate::domain::event::{EventBody, EventKind, Purpose, ReplyClass, VisitType};
    use crate::domain::policy::PolicyConfig;
    use crate::domain::state::Source;

    const DAY: i64 = 86_400_000;

    /// Months of sends, opens, clicks, replies and treatment visits of a few
    /// customers, arriving out of event-time order, a few re-sent: caps,
    /// throttles, recall stages and skipped copies all happen.
    fn history() -> History {
        let mut rng = StdRng::seed_from_u64(17);
        let mut h = History::default();
        for n in 0..4_000 {
            let who = rng.random_range(0..60);
            let channel = Channel::ALL[rng.random_range(0..5)];
            let campaign_id = Some(format!("camp-{}", rng.random_range(0..3)));
            let message_id = format!("m-{who}-{}", rng.random_range(0..20));
            let body = match rng.random_range(0..100) {
                0..45 => EventBody::Send {
                    channel,
                    message_id,
                    campaign_id,
                    purpose: Purpose::Marketing,
                    cost: None,
                },
                45..65 => EventBody::Open {
                    channel,
                    message_id,
                    campaign_id,
                },
                65..75 => EventBody::Click {
                    channel,
                    message_id,
                    campaign_id,
                },
                75..78 => EventBody::Reply {
                    channel,
                    message_id: None,
                    class: if rng.random_bool(0.3) {
                        ReplyClass::Unsubscribe
                    } else {
                        ReplyClass::Positive
                    },
                },
                _ => EventBody::Visit {
                    visit_type: VisitType::Treatment,
                    treatment: Some("LASER".into()),
                    amount: rng.random_range(10_000..900_000),
                    currency: "CNY".into(),
                    offer_code: None,
                    discount: None,
                },
            };
            let ev = Event {
                event_id: format!("e{n}"),
                customer: CustomerRef::new(format!("brand{}", who % 2), format!("c{who}")),
                occurred_at: 1_750_000_000_000 + rng.random_range(0..300 * DAY),
                body,
            };
            let src = Source {
                kind: ev.kind(),
                partition: 0,
                offset: n,
            };
            // Arrival up to two days late: some records do not move the clock.
            let arrival = ev.occurred_at + rng.random_range(0..2 * DAY);
            if n % 50 == 0 {
                // Re-sent upstream at another offset: skipped as a duplicate.
                let copy = Source {
                    offset: n + 1_000_000,
                    ..src
                };
                h.events.push((ev.clone(), copy, arrival + 1));
            }
            h.events.push((ev, src, arrival));
        }
        h.sort();
        h
    }

    /// Every call, in full (times, channels, costs, reasons), in a sorted list.
    #[derive(Default)]
    struct Everything(Vec<String>);

    impl Recorder for Everything {
        fn send(&mut self, ev: &Event, channel: Channel, cost: i64, blocked: Option<Violation>) {
            let id = &ev.event_id;
            self.0
                .push(format!("send {id} {channel:?} {cost} {blocked:?}"));
        }
        fn throttle(&mut self, d: &ThrottleDecision) {
            self.0.push(format!("{d:?}"));
        }
        fn trigger(&mut self, t: &RecallTrigger, cost: i64) {
            self.0.push(format!("{t:?} {cost}"));
        }
        fn outcome(&mut self, o: &RecallOutcome) {
            self.0.push(format!("{o:?}"));
        }
        fn skipped(&mut self, ev: &Event, why: Outcome) {
            self.0.push(format!("skipped {} {why:?}", ev.event_id));
        }
    }

    /// The replay as the live pipeline runs it, record after record in replay
    /// order, every customer's state in memory, a timer heap moved by the
    /// clock (what this module did before it replayed customer by customer).
    fn in_replay_order(h: &History, policies: &Policies, rec: &mut impl Recorder) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let params = StateParams::default();
        let mut states: Vec<CustomerState> = Vec::new();
        let mut timers: BinaryHeap<Reverse<(i64, u32)>> = BinaryHeap::new();
        let mut campaigns: HashMap<(String, String), CampaignState> = HashMap::new();
        let mut now = i64::MIN;
        let refs: Vec<&CustomerRef> = {
            let mut r = Vec::new();
            for ((ev, _, _), who) in h.events.iter().zip(&h.customers) {
                if *who as usize == r.len() {
                    r.push(&ev.customer);
                }
            }
            r
        };
        #[allow(clippy::too_many_arguments)]
        fn advance(
            t: i64,
            now: &mut i64,
            states: &mut [CustomerState],
            timers: &mut BinaryHeap<Reverse<(i64, u32)>>,
            refs: &[&CustomerRef],
            policies: &Policies,
            params: &StateParams,
            rec: &mut impl Recorder,
        ) {
            let clock = (*now).max(t);
            while let Some(Reverse((due, who))) = timers.peek().copied() {
                if due > clock {
                    break;
                }
                timers.pop();
                let state = &mut states[who as usize];
                if state.timer_due != Some(due) {
                    continue;
                }
                let c = refs[who as usize];
                let eff = policies.effective(c, due.max(*now));
                let (fired, _) = step::on_timer_under(state, c, &eff, params, due.max(*now));
                drain(state, eff.control.costs, rec);
                if let Some(next) = fired.next {
                    timers.push(Reverse((next, who)));
                }
            }
            *now = clock;
        }
        for ((ev, src, _), who) in h.events.iter().zip(&h.customers) {
            if ev.occurred_at > now {
                let (refs, params) = (&refs, &params);
                advance(
                    ev.occurred_at,
                    &mut now,
                    &mut states,
                    &mut timers,
                    refs,
                    policies,
                    params,
                    rec,
                );
            }
            if states.len() <= *who as usize {
                states.resize(*who as usize + 1, CustomerState::default());
            }
            let state = &mut states[*who as usize];
            let policy = policies.of(&ev.customer.tenant);
            let eff = policies.effective(&ev.customer, ev.occurred_at);
            let Some(fx) = record(state, ev, *src, &eff, &params, rec) else {
                continue;
            };
            if let Some(due) = step::after_records(state, &eff.policy) {
                timers.push(Reverse((due, *who)));
            }
            drain(state, policy.costs, rec);
            if let Some(campaign) = campaign_of(ev) {
                let signal = CampaignSignal::of(ev, src, !fx.violations.is_empty());
                let key = (ev.customer.tenant.clone(), campaign.to_string());
                let st = campaigns.entry(key).or_default();
                step::on_campaign_signals(st, &ev.customer.tenant, campaign, &[signal], policy);
                for d in st.outbox.drain(..) {
                    rec.throttle(&d);
                }
            }
        }
        advance(
            i64::MIN,
            &mut now,
            &mut states,
            &mut timers,
            &refs,
            policies,
            &params,
            rec,
        );
    }

    /// Replaying customer by customer on the precomputed clock decides exactly
    /// what replaying record after record does: the same decisions in full
    /// (ids, times, states, channels, costs), the same sends blocked and why,
    /// the same skips; and the report's tables are the same.
    #[test]
    fn customer_by_customer_decides_exactly_as_record_after_record() {
        let h = history();
        assert!(h
            .events
            .iter()
            .any(|(e, _, _)| e.kind() == EventKind::Visit));
        let policies = Policies::new(&PolicyConfig::default()).expect("the default policy");
        let mut reference = PolicyReport::keeping_ids();
        in_replay_order(&h, &policies, &mut reference);
        reference.finish();
        let (mut everything, mut expected) = (Everything::default(), Everything::default());
        in_replay_order(&h, &policies, &mut expected);
        assert!(!Replay::new(&policies, StateParams::default()).run(
            &h,
            &mut everything,
            &AtomicBool::new(false),
            &mut |_, _| {}
        ));
        expected.0.sort();
        everything.0.sort();
        assert_eq!(everything.0.len(), expected.0.len());
        for (got, want) in everything.0.iter().zip(&expected.0) {
            assert_eq!(got, want);
        }
        let mut replay = Replay::new(&policies, StateParams::default()).keeping_states();
        let stop = AtomicBool::new(false);
        let (report, interrupted) =
            super::super::replay_into(&mut replay, &h, true, &stop, &mut |_, _| {});
        assert!(!interrupted);
        let ids = reference.ids.clone().unwrap_or_default();
        assert!(
            !ids.triggers.is_empty() && !ids.throttle.is_empty() && !ids.outcomes.is_empty(),
            "{ids:?}"
        );
        assert_eq!(report.ids, reference.ids);
        assert_eq!(report.sends, reference.sends);
        assert_eq!(report.triggers, reference.triggers);
        assert_eq!(report.throttle_decisions, reference.throttle_decisions);
        assert_eq!(report.outcomes, reference.outcomes);
        assert_eq!(report.skipped, reference.skipped);
        assert_eq!(replay.customers(), 60);
        assert!(!report.skipped.is_empty(), "re-sent copies are skipped");
        let first = h
            .customers
            .iter()
            .position(|c| *c == 7)
            .expect("customer 7");
        let (c, s) = replay.state(7).expect("kept");
        assert_eq!(*c, h.events[first].0.customer);
        assert!(s.channels.iter().any(Option::is_some));
    }
}
