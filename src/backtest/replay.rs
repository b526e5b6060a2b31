//! The replay: a history of records, in replay order, through the domain
//! steps the live pipeline runs (`domain::step`), with states, campaigns and
//! timers in memory and the event clock (the latest event time replayed).
//! A timer fires once the clock reaches it, before the record that moved the
//! clock; records that do not move the clock (late ones) fire nothing. Nothing is written anywhere: every decision is handed to a
//! [`Recorder`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::domain::allowance::{ThrottleDecision, Violation};
use crate::domain::campaign::{campaign_of, CampaignSignal, CampaignState};
use crate::domain::event::{Channel, CustomerRef, Event, EventBody, Purpose};
use crate::domain::output::Output;
use crate::domain::policy::Policies;
use crate::domain::recall::{RecallOutcome, RecallTrigger};
use crate::domain::state::{CustomerState, Outcome, Source, StateParams};
use crate::domain::step;

/// What the replay tells its caller, in event-time order.
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

/// The replay of one policy over a history (`'h`). Feed it records in replay order.
pub struct Replay<'p, 'h> {
    policies: &'p Policies,
    params: StateParams,
    /// By customer number (`History::customers`): no hashing per record.
    customers: Vec<(CustomerRef, CustomerState)>,
    history: std::marker::PhantomData<&'h Event>,
    /// tenant → campaign → state (looked up without allocating).
    campaigns: HashMap<String, HashMap<String, CampaignState>>,
    /// (due, customer number); stale entries (the customer's `timer_due` moved) are skipped.
    timers: BinaryHeap<Reverse<(i64, u32)>>,
    /// The event clock: the latest time replayed.
    now: i64,
}

impl<'p, 'h> Replay<'p, 'h> {
    pub fn new(policies: &'p Policies, params: StateParams) -> Replay<'p, 'h> {
        Replay {
            policies,
            params,
            customers: Vec::new(),
            history: std::marker::PhantomData,
            campaigns: HashMap::new(),
            timers: BinaryHeap::new(),
            now: i64::MIN,
        }
    }

    /// Customers with a state.
    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    /// Customer number `who` and its state as it is now.
    pub fn state(&self, who: u32) -> Option<(&CustomerRef, CustomerState)> {
        let (c, s) = self.customers.get(who as usize)?;
        Some((c, s.clone()))
    }

    /// Applies one record of customer number `who` (numbers are dense, from
    /// 0, in order of first appearance). A record later than the clock moves
    /// it, firing every timer due by its time first; an earlier (late) record
    /// is applied at the clock as it is, like records arriving together in one
    /// live batch.
    pub fn record(&mut self, ev: &'h Event, src: Source, who: u32, rec: &mut impl Recorder) {
        if ev.occurred_at > self.now {
            self.advance(ev.occurred_at, rec);
        }
        let policy = self.policies.of(&ev.customer.tenant);
        let i = who as usize;
        while self.customers.len() <= i {
            self.customers
                .push((ev.customer.clone(), CustomerState::default()));
        }
        let state = &mut self.customers[i].1;
        let (out, _, fx) = step::on_record(state, ev, src, policy, &self.params);
        let Some(fx) = fx else {
            rec.skipped(ev, out);
            return;
        };
        if let EventBody::Send {
            channel,
            purpose: Purpose::Marketing,
            cost,
            ..
        } = &ev.body
        {
            let blocked = fx
                .violations
                .iter()
                .find(|(c, _)| c == channel)
                .map(|(_, v)| *v);
            let cost = cost.unwrap_or(policy.costs[channel.index()]);
            rec.send(ev, *channel, cost, blocked);
        }
        if let Some(due) = step::after_records(state, policy) {
            self.timers.push(Reverse((due, who)));
        }
        drain(state, policy.costs, rec);
        if let Some(campaign) = campaign_of(ev) {
            let signal = CampaignSignal {
                kind: src.kind,
                partition: src.partition,
                offset: src.offset,
                at: ev.occurred_at,
                event_id: ev.event_id.clone(),
                violation: !fx.violations.is_empty(),
            };
            let tenant = &ev.customer.tenant;
            if !self.campaigns.contains_key(tenant) {
                self.campaigns.insert(tenant.clone(), HashMap::new());
            }
            let Some(of_tenant) = self.campaigns.get_mut(tenant) else {
                return;
            };
            if !of_tenant.contains_key(campaign) {
                of_tenant.insert(campaign.to_string(), CampaignState::default());
            }
            let Some(st) = of_tenant.get_mut(campaign) else {
                return;
            };
            step::on_campaign_signals(st, &ev.customer.tenant, campaign, &[signal], policy);
            for d in st.outbox.drain(..) {
                rec.throttle(&d);
            }
        }
    }

    /// Moves the clock to `t` (if later) and fires every timer due by the clock,
    /// each at its due time or at the clock before the move, whichever is later.
    pub fn advance(&mut self, t: i64, rec: &mut impl Recorder) {
        let clock = self.now.max(t);
        while let Some(Reverse((due, _))) = self.timers.peek() {
            if *due > clock {
                break;
            }
            let Some(Reverse((due, who))) = self.timers.pop() else {
                break;
            };
            let Some((c, state)) = self.customers.get_mut(who as usize) else {
                continue;
            };
            if state.timer_due != Some(due) {
                continue; // re-scheduled or cancelled since
            }
            let policy = self.policies.of(&c.tenant);
            let now = due.max(self.now);
            let fired = step::on_timer(state, c, policy, &self.params, now);
            drain(state, policy.costs, rec);
            if let Some(next) = fired.next {
                self.timers.push(Reverse((next, who)));
            }
        }
        self.now = clock;
    }
}

/// Hands a state's outbox to the recorder and clears it (what `publish` does live).
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
