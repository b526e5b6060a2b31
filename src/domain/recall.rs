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
//! Each trigger gets at most one outcome of each kind (the outcome id is derived
//! from trigger id + kind, so a repeat is an exact repeat). Precedence for
//! consumers, when one trigger has several: `RETRACTED` > `RECALLED` >
//! `NOT_RECALLED` (a late visit can turn a `NOT_RECALLED` into `RECALLED`, or
//! retract a trigger that already had an outcome).
//!
//! # Publishing
//!
//! Trigger content depends on the firing time (fired_at, channel availability),
//! so a re-fire after a crash would not be an exact repeat. Whatever these
//! functions decide must therefore go into `CustomerState::outbox` in the same
//! state write that records the decision ([`Fired::output`],
//! [`outcome_output`]); the outbox is published after the write is durable.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

use super::engagement::{ChannelEngagement, Horizons};
use super::event::{Channel, CustomerRef};
use super::lapse::{
    expected_interval, schedule, scheduled_due, segment_for, ExpectedInterval, LapsePolicy,
    Segment, Stage, StageDue, ValueTier, DAY_MS,
};
use super::state::{CustomerState, Output, Visits};

// ---------------------------------------------------------------------------
// Enums of the output schemas
// ---------------------------------------------------------------------------

/// Experiment arm, as in the Avro enum `lapse.v1.Arm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Arm {
    Treatment,
    Holdout,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Treatment => "TREATMENT",
            Arm::Holdout => "HOLDOUT",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn label(self) -> &'static str {
        match self {
            Arm::Treatment => "treatment",
            Arm::Holdout => "holdout",
        }
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome kind, as in the Avro enum `lapse.v1.OutcomeKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutcomeKind {
    Recalled,
    NotRecalled,
    Retracted,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Recalled => "RECALLED",
            OutcomeKind::NotRecalled => "NOT_RECALLED",
            OutcomeKind::Retracted => "RETRACTED",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn label(self) -> &'static str {
        match self {
            OutcomeKind::Recalled => "recalled",
            OutcomeKind::NotRecalled => "not_recalled",
            OutcomeKind::Retracted => "retracted",
        }
    }
}

impl fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Deterministic ids and the holdout draw. These are part of the output
// contract: never change the domain strings or the encoding.
// ---------------------------------------------------------------------------

/// SHA-256 of the parts, each prefixed with its length (u64 big-endian), so no
/// two different part lists hash the same input.
fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// First 16 bytes as 32 lower-case hex digits.
fn hex128(d: &[u8; 32]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(32);
    for b in &d[..16] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Id of the episode of `c` that starts at `start` (the last visit time, ms).
pub fn episode_id(c: &CustomerRef, start: i64) -> String {
    hex128(&digest(&[
        b"lapse.episode.v1",
        c.tenant.as_bytes(),
        c.customer.as_bytes(),
        start.to_string().as_bytes(),
    ]))
}

/// Id of a trigger: tenant, customer, episode (its start), stage symbol, attempt.
pub fn trigger_id(c: &CustomerRef, episode_start: i64, stage: Stage, attempt: u32) -> String {
    hex128(&digest(&[
        b"lapse.trigger.v1",
        c.tenant.as_bytes(),
        c.customer.as_bytes(),
        episode_start.to_string().as_bytes(),
        stage.as_str().as_bytes(),
        attempt.to_string().as_bytes(),
    ]))
}

/// Id of an outcome: its trigger id and kind.
pub fn outcome_id(trigger_id: &str, kind: OutcomeKind) -> String {
    hex128(&digest(&[
        b"lapse.outcome.v1",
        trigger_id.as_bytes(),
        kind.as_str().as_bytes(),
    ]))
}

/// Whether a customer is in the holdout of `experiment`: a uniform 64-bit draw
/// from the hash of tenant, customer and experiment, below `share` × 2⁶⁴.
/// Deterministic (same answer on every call, every instance, every restart).
pub fn is_holdout(tenant: &str, customer: &str, experiment: &str, share: f64) -> bool {
    if share.is_nan() || share <= 0.0 {
        return false;
    }
    if share >= 1.0 {
        return true;
    }
    let d = digest(&[
        b"lapse.holdout.v1",
        tenant.as_bytes(),
        customer.as_bytes(),
        experiment.as_bytes(),
    ]);
    let x = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (x as f64) < share * 18_446_744_073_709_551_616.0
}

/// The arm of a customer under `p` (experiment name and holdout share).
pub fn arm_for(c: &CustomerRef, p: &LapsePolicy) -> Arm {
    if is_holdout(&c.tenant, &c.customer, &p.experiment, p.holdout_share) {
        Arm::Holdout
    } else {
        Arm::Treatment
    }
}

// ---------------------------------------------------------------------------
// Channel recommendation
// ---------------------------------------------------------------------------

/// A channel the caller could use for a trigger now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelCandidate {
    pub channel: Channel,
    /// Not capped, throttled, suppressed (unsubscribed) or in quiet hours at the
    /// firing time: decided by the caller.
    pub available: bool,
    /// Higher is better, e.g. [`engagement_score`].
    pub engagement: f64,
}

/// Engagement is compared in steps of this size; within one step the cheaper
/// channel wins (then the lower `Channel::index`).
pub const ENGAGEMENT_TIE_STEP: f64 = 0.01;

/// Recommended channel and ranked fallbacks: the available candidates (PHONE only
/// when `high_value`), best engagement first, the cheaper one on a tie (engagement
/// equal to [`ENGAGEMENT_TIE_STEP`]), then by channel order. `costs` is the cost
/// per send, indexed by `Channel::index()`. Duplicated candidates count once
/// (the first). Deterministic.
pub fn recommend(
    candidates: &[ChannelCandidate],
    high_value: bool,
    costs: &[i64; 5],
) -> (Option<Channel>, Vec<Channel>) {
    let mut seen = [false; 5];
    let mut ranked: Vec<(i64, i64, usize, Channel)> = Vec::with_capacity(5);
    for c in candidates {
        let i = c.channel.index();
        if seen[i] {
            continue;
        }
        seen[i] = true;
        if !c.available || (c.channel == Channel::Phone && !high_value) {
            continue;
        }
        let e = if c.engagement.is_finite() {
            c.engagement
        } else {
            0.0
        };
        let step = (e / ENGAGEMENT_TIE_STEP).round() as i64;
        ranked.push((-step, costs[i], i, c.channel));
    }
    ranked.sort_unstable();
    let mut it = ranked.into_iter().map(|r| r.3);
    let best = it.next();
    (best, it.collect())
}

/// Engagement score of a channel from its long-horizon decayed counts at `now`:
/// `(opens + clicks + replies + prior_rate·prior_sends) / (sends + prior_sends)`.
/// The prior keeps a channel with one lucky send from beating an established
/// one; a channel never used scores `prior_rate`.
pub fn engagement_score(
    e: Option<&ChannelEngagement>,
    now: i64,
    h: Horizons,
    prior_rate: f64,
    prior_sends: f64,
) -> f64 {
    let (sends, signals) = match e {
        None => (0.0, 0.0),
        Some(e) => {
            let (_, long) = e.counts_at(now, h);
            (
                long.sends as f64,
                long.opens as f64 + long.clicks as f64 + long.replies as f64,
            )
        }
    };
    (signals + prior_rate * prior_sends) / (sends + prior_sends)
}

/// Candidates for every channel of a customer: engagement from
/// [`engagement_score`] with the policy's prior; available when `available(c)`
/// (caps, throttles, quiet hours: the caller's) and the customer has not
/// unsubscribed from it.
pub fn candidates(
    s: &CustomerState,
    now: i64,
    h: Horizons,
    p: &LapsePolicy,
    available: impl Fn(Channel) -> bool,
) -> Vec<ChannelCandidate> {
    Channel::ALL
        .into_iter()
        .map(|c| ChannelCandidate {
            channel: c,
            available: !s.is_unsubscribed(c) && available(c),
            engagement: engagement_score(
                s.channel(c),
                now,
                h,
                p.engagement_prior_rate,
                p.engagement_prior_sends,
            ),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Output records
// ---------------------------------------------------------------------------

/// `lapse.v1.RecallTrigger` (schemas/recall_trigger.avsc), field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallTrigger {
    pub trigger_id: String,
    pub tenant_id: String,
    pub customer_id: String,
    pub episode_id: String,
    pub stage: Stage,
    pub attempt: i32,
    pub segment: Segment,
    pub days_since_last_visit: i32,
    pub expected_interval_days: f64,
    pub lifetime_value: i64,
    pub currency: String,
    pub last_treatment: Option<String>,
    pub recommended_channel: Option<Channel>,
    pub fallback_channels: Vec<Channel>,
    pub offer_tier: String,
    pub experiment: String,
    pub arm: Arm,
    pub due_at: i64,
    pub fired_at: i64,
}

/// `lapse.v1.RecallOutcome` (schemas/recall_outcome.avsc), field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallOutcome {
    pub outcome_id: String,
    pub trigger_id: String,
    pub kind: OutcomeKind,
    pub tenant_id: String,
    pub customer_id: String,
    pub episode_id: String,
    pub stage: Stage,
    pub segment: Segment,
    pub experiment: String,
    pub arm: Arm,
    pub days_to_return: Option<f64>,
    pub revenue: i64,
    pub marketing_cost: i64,
    pub currency: String,
    pub cause_event_id: Option<String>,
    pub decided_at: i64,
}

mod avro {
    pub use apache_avro::types::Value;

    pub fn enm(index: usize, symbol: &str) -> Value {
        Value::Enum(index as u32, symbol.to_owned())
    }
    pub fn string(s: &str) -> Value {
        Value::String(s.to_owned())
    }
    pub fn opt_string(s: &Option<String>) -> Value {
        s.as_deref().map_or(Value::Null, string)
    }
    pub fn record(fields: Vec<(&str, Value)>) -> Value {
        Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }
}

impl RecallTrigger {
    /// The Kafka key, `TENANT/CUSTOMER`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant_id, self.customer_id)
    }

    /// The Avro record, for `codec::encode::Encoder::encode_value(RECALL_TRIGGER, ..)`.
    pub fn to_avro_value(&self) -> avro::Value {
        use avro::*;
        let ch = |c: Channel| enm(c.index(), c.as_str());
        record(vec![
            ("trigger_id", string(&self.trigger_id)),
            ("tenant_id", string(&self.tenant_id)),
            ("customer_id", string(&self.customer_id)),
            ("episode_id", string(&self.episode_id)),
            ("stage", enm(self.stage.index(), self.stage.as_str())),
            ("attempt", Value::Int(self.attempt)),
            ("segment", enm(self.segment.index(), self.segment.as_str())),
            (
                "days_since_last_visit",
                Value::Int(self.days_since_last_visit),
            ),
            (
                "expected_interval_days",
                Value::Double(self.expected_interval_days),
            ),
            ("lifetime_value", Value::Long(self.lifetime_value)),
            ("currency", string(&self.currency)),
            ("last_treatment", opt_string(&self.last_treatment)),
            (
                "recommended_channel",
                self.recommended_channel.map_or(Value::Null, ch),
            ),
            (
                "fallback_channels",
                Value::Array(self.fallback_channels.iter().map(|c| ch(*c)).collect()),
            ),
            ("offer_tier", string(&self.offer_tier)),
            ("experiment", string(&self.experiment)),
            ("arm", enm(self.arm.index(), self.arm.as_str())),
            ("due_at", Value::TimestampMillis(self.due_at)),
            ("fired_at", Value::TimestampMillis(self.fired_at)),
        ])
    }
}

impl RecallOutcome {
    /// The Kafka key, `TENANT/CUSTOMER`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant_id, self.customer_id)
    }

    /// The Avro record, for `codec::encode::Encoder::encode_value(RECALL_OUTCOME, ..)`.
    pub fn to_avro_value(&self) -> avro::Value {
        use avro::*;
        record(vec![
            ("outcome_id", string(&self.outcome_id)),
            ("trigger_id", string(&self.trigger_id)),
            ("kind", enm(self.kind.index(), self.kind.as_str())),
            ("tenant_id", string(&self.tenant_id)),
            ("customer_id", string(&self.customer_id)),
            ("episode_id", string(&self.episode_id)),
            ("stage", enm(self.stage.index(), self.stage.as_str())),
            ("segment", enm(self.segment.index(), self.segment.as_str())),
            ("experiment", string(&self.experiment)),
            ("arm", enm(self.arm.index(), self.arm.as_str())),
            (
                "days_to_return",
                self.days_to_return.map_or(Value::Null, Value::Double),
            ),
            ("revenue", Value::Long(self.revenue)),
            ("marketing_cost", Value::Long(self.marketing_cost)),
            ("currency", string(&self.currency)),
            ("cause_event_id", opt_string(&self.cause_event_id)),
            ("decided_at", Value::TimestampMillis(self.decided_at)),
        ])
    }
}

/// The outbox entry of an outcome (outcomes are published for both arms).
pub fn outcome_output(o: RecallOutcome) -> Output {
    Output::Outcome(o)
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

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
    fn new(start: i64) -> Episode {
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
/// Bounded: two episodes of at most `3 + max_follow_ups` records each.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecallState {
    /// The episode running since the last visit.
    pub current: Option<Episode>,
    /// The one before, kept so a late visit can still be attributed or retract.
    pub previous: Option<Episode>,
}

impl RecallState {
    /// The current episode, started afresh at `start` if it is another one (the
    /// old one becomes `previous`).
    fn episode_at(&mut self, start: i64) -> &mut Episode {
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

// ---------------------------------------------------------------------------
// Firing
// ---------------------------------------------------------------------------

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
    /// Channels and their availability at the firing time; see [`candidates`].
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

    let (recommended, fallbacks) = recommend(ctx.candidates, tier == ValueTier::High, ctx.costs);
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

#[allow(clippy::too_many_arguments)]
fn outcome(
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
    let recalled = kind == OutcomeKind::Recalled;
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
    }
}

// ---------------------------------------------------------------------------
// Visits
// ---------------------------------------------------------------------------

/// An applied visit, as [`on_visit`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitInfo {
    /// Event time of the visit, ms.
    pub at: i64,
    /// Spend of the visit, minor units of `currency`.
    pub revenue: i64,
    pub currency: String,
    pub event_id: String,
}

/// A visit: ends the current episode (a new one starts at the visit) and decides
/// the outcomes of the ended episode's triggers (see the module docs). A visit
/// older than the current episode's start is matched against the previous
/// episode instead. Publish every outcome ([`outcome_output`]). Call once per
/// applied visit (never for a redelivered or duplicate one); order relative to
/// `CustomerState::apply` does not matter.
pub fn on_visit(
    st: &mut RecallState,
    visit: &VisitInfo,
    c: &CustomerRef,
    p: &LapsePolicy,
) -> Vec<RecallOutcome> {
    let t = visit.at;
    let out = match st.current.as_ref().map(|e| e.start) {
        None => {
            st.current = Some(Episode::new(t));
            vec![]
        }
        Some(s) if t > s => {
            let mut ended = st.current.take().expect("checked");
            let out = close_by_visit(&mut ended, visit, c, p);
            st.previous = Some(ended);
            st.current = Some(Episode::new(t));
            out
        }
        Some(s) if t == s => vec![],
        Some(_) => match st.previous.as_mut() {
            Some(prev) if t > prev.start => close_by_visit(prev, visit, c, p),
            _ => vec![],
        },
    };
    out
}

fn close_by_visit(
    ep: &mut Episode,
    visit: &VisitInfo,
    c: &CustomerRef,
    p: &LapsePolicy,
) -> Vec<RecallOutcome> {
    let (Some(arm), Some(experiment)) = (ep.arm, ep.experiment.clone()) else {
        return vec![];
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
    if let Some(r) = ep
        .stages
        .iter_mut()
        .rev()
        .find(|r| r.is_trigger() && r.fired_at <= t)
    {
        match r.outcome {
            None | Some(OutcomeKind::NotRecalled) if t - r.fired_at <= window => {
                out.push(mk(r, OutcomeKind::Recalled, t, true));
                r.outcome = Some(OutcomeKind::Recalled);
            }
            None => {
                let end = r.fired_at.saturating_add(window);
                out.push(mk(r, OutcomeKind::NotRecalled, end, false));
                r.outcome = Some(OutcomeKind::NotRecalled);
            }
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Inspect
// ---------------------------------------------------------------------------

/// One processed stage, for `lapse inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct StageView {
    pub stage: Stage,
    pub attempt: u32,
    /// None when skipped or DORMANT (no trigger).
    pub trigger_id: Option<String>,
    pub due_at: i64,
    pub fired_at: i64,
    pub segment: Segment,
    pub skipped: bool,
    pub marketing_cost: i64,
    pub outcome: Option<OutcomeKind>,
}

/// The recall picture of one customer, for `lapse inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct RecallView {
    pub episode_id: Option<String>,
    pub episode_start: Option<i64>,
    pub expected_interval: Option<ExpectedInterval>,
    pub value_tier: ValueTier,
    /// The episode's arm, or the arm the customer would get now.
    pub arm: Arm,
    pub experiment: String,
    pub stages: Vec<StageView>,
    pub next_due: Option<Due>,
    /// The full schedule of the current episode, assuming on-time firing.
    pub schedule: Vec<StageDue>,
}

/// Builds the inspect view.
pub fn view(st: &RecallState, v: &Visits, c: &CustomerRef, p: &LapsePolicy) -> RecallView {
    let start = v.last_at;
    let ep = st.current.as_ref().filter(|e| Some(e.start) == start);
    let interval = start.map(|_| expected_interval(v, p));
    RecallView {
        episode_id: start.map(|s| episode_id(c, s)),
        episode_start: start,
        value_tier: p.tier(v.lifetime_spend),
        arm: ep.and_then(|e| e.arm).unwrap_or_else(|| arm_for(c, p)),
        experiment: ep
            .and_then(|e| e.experiment.clone())
            .unwrap_or_else(|| p.experiment.clone()),
        stages: ep
            .map(|e| {
                e.stages
                    .iter()
                    .map(|r| StageView {
                        stage: r.stage,
                        attempt: r.attempt,
                        trigger_id: r
                            .is_trigger()
                            .then(|| trigger_id(c, e.start, r.stage, r.attempt)),
                        due_at: r.due_at,
                        fired_at: r.fired_at,
                        segment: r.segment,
                        skipped: r.skipped,
                        marketing_cost: r.cost,
                        outcome: r.outcome,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        next_due: next_due(st, v, p),
        schedule: match (start, &interval) {
            (Some(s), Some(i)) => schedule(s, i, p),
            _ => vec![],
        },
        expected_interval: interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::VisitType;

    const D: i64 = DAY_MS;
    const COSTS: [i64; 5] = [1, 5, 300, 1, 0]; // WECHAT SMS PHONE EMAIL SOCIAL

    fn cust(id: &str) -> CustomerRef {
        CustomerRef::new("brandA", id)
    }

    /// A customer whose arm under the default policy is `arm`.
    fn cust_in(arm: Arm) -> CustomerRef {
        let p = LapsePolicy::default();
        (0..)
            .map(|i| cust(&format!("c{i}")))
            .find(|c| arm_for(c, &p) == arm)
            .unwrap()
    }

    /// Visits with a BOTOX default (120 d) and the given spend; last visit at `last`.
    fn visits(last: i64, spend: i64) -> Visits {
        Visits {
            count: 1,
            first_at: Some(last),
            last_at: Some(last),
            lifetime_spend: spend,
            currency: Some("CNY".into()),
            last_treatment: Some("BOTOX".into()),
            last_treatment_at: Some(last),
            last_visit_type: Some(VisitType::Treatment),
            recent: vec![last],
        }
    }

    fn all_available() -> Vec<ChannelCandidate> {
        [
            (Channel::Wechat, 0.5),
            (Channel::Sms, 0.3),
            (Channel::Phone, 0.9),
            (Channel::Email, 0.1),
            (Channel::Social, 0.05),
        ]
        .into_iter()
        .map(|(channel, engagement)| ChannelCandidate {
            channel,
            available: true,
            engagement,
        })
        .collect()
    }

    struct World {
        c: CustomerRef,
        v: Visits,
        p: LapsePolicy,
        cands: Vec<ChannelCandidate>,
        st: RecallState,
    }

    impl World {
        fn new(c: CustomerRef, last: i64, spend: i64) -> World {
            let p = LapsePolicy::default();
            let mut st = RecallState::default();
            let v = visits(last, spend);
            on_visit(&mut st, &visit(last, 100, "v0"), &c, &p);
            World {
                c,
                v,
                p,
                cands: all_available(),
                st,
            }
        }
        fn fire_due(&mut self, now: i64) -> Vec<Fired> {
            let ctx = FireCtx {
                customer: &self.c,
                visits: &self.v,
                policy: &self.p,
                candidates: &self.cands,
                costs: &COSTS,
            };
            fire_due(&mut self.st, now, &ctx)
        }
        fn visit(&mut self, at: i64, revenue: i64, id: &str) -> Vec<RecallOutcome> {
            let out = on_visit(&mut self.st, &visit(at, revenue, id), &self.c, &self.p);
            if self.v.last_at.is_none_or(|l| at > l) {
                self.v.last_at = Some(at);
            }
            let pos = self.v.recent.partition_point(|x| *x <= at);
            self.v.recent.insert(pos, at);
            out
        }
        fn next(&self) -> Option<Due> {
            next_due(&self.st, &self.v, &self.p)
        }
    }

    fn visit(at: i64, revenue: i64, id: &str) -> VisitInfo {
        VisitInfo {
            at,
            revenue,
            currency: "CNY".into(),
            event_id: id.into(),
        }
    }

    fn trig(f: &Fired) -> &RecallTrigger {
        match f {
            Fired::Trigger(t) => t,
            other => panic!("not a trigger: {other:?}"),
        }
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let c = cust("c1");
        // Golden values: these ids are a public contract; they must never change.
        assert_eq!(
            trigger_id(&c, 1_700_000_000_000, Stage::AtRisk, 1),
            trigger_id(&c, 1_700_000_000_000, Stage::AtRisk, 1)
        );
        let golden = [
            trigger_id(&c, 1_700_000_000_000, Stage::AtRisk, 1),
            episode_id(&c, 1_700_000_000_000),
            outcome_id("abc", OutcomeKind::Recalled),
        ];
        assert_eq!(
            golden,
            [
                GOLDEN_TRIGGER.to_string(),
                GOLDEN_EPISODE.to_string(),
                GOLDEN_OUTCOME.to_string()
            ]
        );
        let mut ids = std::collections::HashSet::new();
        for stage in Stage::ALL {
            for attempt in 1..4 {
                for start in [0, 1, 2] {
                    assert!(ids.insert(trigger_id(&c, start, stage, attempt)));
                }
            }
        }
        // Length-prefixed parts: "a/bc" and "ab/c" differ.
        assert_ne!(
            trigger_id(&CustomerRef::new("a", "bc"), 0, Stage::AtRisk, 1),
            trigger_id(&CustomerRef::new("ab", "c"), 0, Stage::AtRisk, 1)
        );
        assert_eq!(golden[0].len(), 32);
    }

    // Independently computed (Python hashlib) for the length-prefixed encoding.
    const GOLDEN_TRIGGER: &str = "b6980547c7c27793ee3220a8c536bac3";
    const GOLDEN_EPISODE: &str = "4b4803618f099d437060174bb2aba825";
    const GOLDEN_OUTCOME: &str = "5c998ae543d54450144dd64731024242";

    #[test]
    fn holdout_share_is_accurate_and_stable() {
        for share in [0.0, 0.05, 0.10, 0.5, 1.0] {
            let n = 10_000;
            let held = (0..n)
                .filter(|i| is_holdout("brandA", &format!("cust-{i}"), "recall-v1", share))
                .count();
            let got = held as f64 / n as f64;
            assert!((got - share).abs() <= 0.02, "share {share}: got {got}");
        }
        for i in 0..1000 {
            let id = format!("cust-{i}");
            let a = is_holdout("brandA", &id, "recall-v1", 0.1);
            assert_eq!(a, is_holdout("brandA", &id, "recall-v1", 0.1));
            // A larger share only adds customers.
            assert!(!a || is_holdout("brandA", &id, "recall-v1", 0.2));
        }
        // Another experiment re-draws.
        let differ = (0..1000)
            .filter(|i| {
                let id = format!("cust-{i}");
                is_holdout("brandA", &id, "recall-v1", 0.5)
                    != is_holdout("brandA", &id, "recall-v2", 0.5)
            })
            .count();
        assert!(differ > 300, "{differ}");
    }

    #[test]
    fn channel_recommendation() {
        let cand = |channel, available, engagement| ChannelCandidate {
            channel,
            available,
            engagement,
        };
        use Channel::*;
        // (candidates, high value, recommended, fallbacks)
        type Case = (Vec<ChannelCandidate>, bool, Option<Channel>, Vec<Channel>);
        let cases: Vec<Case> = vec![
            // Best engaged wins; PHONE excluded for low value.
            (
                all_available(),
                false,
                Some(Wechat),
                vec![Sms, Email, Social],
            ),
            // PHONE allowed for high value.
            (
                all_available(),
                true,
                Some(Phone),
                vec![Wechat, Sms, Email, Social],
            ),
            // Unavailable channels are left out.
            (
                vec![
                    cand(Wechat, false, 0.9),
                    cand(Sms, true, 0.2),
                    cand(Email, true, 0.3),
                ],
                false,
                Some(Email),
                vec![Sms],
            ),
            // Tie on engagement: the cheaper channel first (EMAIL 1 < SMS 5),
            // then channel order (WECHAT 1 = EMAIL 1).
            (
                vec![
                    cand(Sms, true, 0.301),
                    cand(Email, true, 0.3),
                    cand(Wechat, true, 0.299),
                ],
                false,
                Some(Wechat),
                vec![Email, Sms],
            ),
            // Nothing available.
            (
                vec![cand(Wechat, false, 0.9), cand(Phone, true, 0.9)],
                false,
                None,
                vec![],
            ),
            // Duplicates count once; NaN engagement counts as 0.
            (
                vec![
                    cand(Sms, true, f64::NAN),
                    cand(Sms, true, 0.9),
                    cand(Social, true, 0.01),
                ],
                false,
                Some(Social),
                vec![Sms],
            ),
        ];
        for (i, (cands, hv, want, fallbacks)) in cases.into_iter().enumerate() {
            assert_eq!(recommend(&cands, hv, &COSTS), (want, fallbacks), "case {i}");
        }
    }

    #[test]
    fn engagement_score_has_a_prior() {
        use crate::domain::engagement::Signal;
        let h = Horizons {
            short_half_life_ms: 7 * D,
            long_half_life_ms: 90 * D,
        };
        let (rate, w) = (0.2, 5.0);
        assert!((engagement_score(None, 0, h, rate, w) - 0.2).abs() < 1e-9);
        let mut lucky = ChannelEngagement::default();
        lucky.record(Signal::Send, D, h);
        lucky.record(Signal::Click, D, h);
        lucky.record(Signal::Open, D, h);
        let mut steady = ChannelEngagement::default();
        for i in 0..20 {
            steady.record(Signal::Send, i * D, h);
            if i % 2 == 0 {
                steady.record(Signal::Open, i * D, h);
            }
            if i % 5 == 0 {
                steady.record(Signal::Click, i * D, h);
            }
        }
        let now = 21 * D;
        let a = engagement_score(Some(&lucky), now, h, rate, w);
        let b = engagement_score(Some(&steady), now, h, rate, w);
        assert!(b > a, "steady {b} vs lucky {a}");
        let mut dead = ChannelEngagement::default();
        for i in 0..20 {
            dead.record(Signal::Send, i * D, h);
        }
        assert!(engagement_score(Some(&dead), now, h, rate, w) < 0.1);
    }

    #[test]
    fn candidates_respect_unsubscribe_and_availability() {
        let mut s = CustomerState::default();
        s.channels[Channel::Sms.index()] = Some(ChannelEngagement {
            unsubscribed_at: Some(5),
            ..ChannelEngagement::default()
        });
        let h = Horizons {
            short_half_life_ms: 7 * D,
            long_half_life_ms: 90 * D,
        };
        let p = LapsePolicy::default();
        let c = candidates(&s, 10, h, &p, |c| c != Channel::Email);
        let avail: Vec<Channel> = c
            .iter()
            .filter(|c| c.available)
            .map(|c| c.channel)
            .collect();
        assert_eq!(avail, [Channel::Wechat, Channel::Phone, Channel::Social]);
        assert!(c.iter().all(|c| (c.engagement - 0.2).abs() < 1e-9));
    }

    #[test]
    fn stages_fire_once_each_in_order_with_segments() {
        let l = 1000 * D;
        // High value: AT_RISK (segment AT_RISK), then HIGH_VALUE_LAPSED.
        let mut w = World::new(cust_in(Arm::Treatment), l, 3_000_000);
        assert!(w.fire_due(l + 143 * D).is_empty());
        let d = w.next().unwrap();
        assert_eq!(
            (d.stage, d.attempt, d.due_at),
            (Stage::AtRisk, 1, l + 144 * D)
        );
        // (days after the last visit, stage, attempt, segment, offer)
        let steps = [
            (
                144,
                Stage::AtRisk,
                1,
                Segment::AtRisk,
                "reminder-coupon-5pct",
            ),
            (
                180,
                Stage::Lapsed,
                1,
                Segment::HighValueLapsed,
                "vip-care-call",
            ),
            (
                210,
                Stage::FollowUp,
                1,
                Segment::HighValueLapsed,
                "vip-care-call",
            ),
            (
                240,
                Stage::FollowUp,
                2,
                Segment::HighValueLapsed,
                "vip-care-call",
            ),
        ];
        let mut ids = vec![];
        for (day, stage, attempt, segment, offer) in steps {
            let now = l + day * D + 500; // fired half a second late
            let f = w.fire_due(now);
            assert_eq!(f.len(), 1, "day {day}: {f:?}");
            let t = trig(&f[0]);
            assert_eq!(f[0].output(), Some(Output::Trigger(t.clone())));
            assert_eq!(
                (t.stage, t.attempt, t.segment),
                (stage, attempt as i32, segment)
            );
            assert_eq!(t.offer_tier, offer);
            assert_eq!(t.arm, Arm::Treatment);
            assert_eq!(t.recommended_channel, Some(Channel::Phone));
            assert_eq!(t.days_since_last_visit, day as i32);
            assert_eq!(t.due_at, l + day * D);
            assert_eq!(t.fired_at, now);
            assert_eq!(t.expected_interval_days, 120.0);
            assert_eq!(t.lifetime_value, 3_000_000);
            assert_eq!(t.last_treatment.as_deref(), Some("BOTOX"));
            assert_eq!(t.trigger_id, trigger_id(&w.c, l, stage, attempt));
            assert_eq!(t.episode_id, episode_id(&w.c, l));
            ids.push(t.trigger_id.clone());
            // Firing again at the same time does nothing.
            assert!(w.fire_due(now).is_empty());
        }
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), 4);
        // DORMANT: window of the last follow-up (fired at 240 d + 0.5 s) + 60 d.
        let d = w.next().unwrap();
        assert_eq!(d.stage, Stage::Dormant);
        assert_eq!(d.due_at, l + 300 * D + 500);
        // Replaying a stale `due` does nothing.
        let stale = Due {
            index: 0,
            stage: Stage::AtRisk,
            attempt: 1,
            due_at: l + 144 * D,
            episode_start: l,
        };
        let ctx = FireCtx {
            customer: &w.c,
            visits: &w.v,
            policy: &w.p,
            candidates: &w.cands,
            costs: &COSTS,
        };
        assert_eq!(fire(&mut w.st, &stale, l + 400 * D, &ctx), Fired::Stale);
        assert_eq!(fire(&mut w.st, &d, d.due_at - 1, &ctx), Fired::NotDue);
        w.st.on_marketing_send(l + 250 * D, 300);
        let f = w.fire_due(l + 300 * D + 500);
        let Fired::Dormant(Some(o)) = &f[0] else {
            panic!("{f:?}")
        };
        assert_eq!(o.kind, OutcomeKind::NotRecalled);
        assert_eq!(o.trigger_id, ids[3]);
        assert_eq!(o.stage, Stage::FollowUp);
        assert_eq!(o.marketing_cost, 300);
        assert_eq!(o.decided_at, l + 300 * D + 500);
        assert_eq!(o.days_to_return, None);
        assert_eq!(o.cause_event_id, None);
        assert_eq!(w.next(), None);
        assert!(w.fire_due(l + 1000 * D).is_empty());
    }

    #[test]
    fn low_value_customer_gets_no_phone_and_low_value_segment() {
        let l = 0;
        let mut w = World::new(cust_in(Arm::Treatment), l, 10_000);
        let f = w.fire_due(180 * D);
        // AT_RISK (144) was superseded by LAPSED (180): only LAPSED fires.
        assert_eq!(
            f[0],
            Fired::Skipped {
                stage: Stage::AtRisk,
                attempt: 1
            }
        );
        let t = trig(&f[1]);
        assert_eq!(
            (t.stage, t.segment),
            (Stage::Lapsed, Segment::LowValueLapsed)
        );
        assert_eq!(t.offer_tier, "coupon-10pct");
        assert_eq!(t.recommended_channel, Some(Channel::Wechat));
        assert_eq!(
            t.fallback_channels,
            [Channel::Sms, Channel::Email, Channel::Social]
        );
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn an_old_customer_is_caught_up_without_a_burst() {
        // Last visit 2 years ago: everything is due; nothing is sent, the episode
        // is closed as DORMANT without an outcome (no trigger fired).
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        let f = w.fire_due(730 * D);
        assert_eq!(f.len(), 5, "{f:?}");
        assert!(f[..4].iter().all(|f| matches!(f, Fired::Skipped { .. })));
        assert_eq!(f[4], Fired::Dormant(None));
        assert!(f.iter().all(|f| f.output().is_none()));
        assert_eq!(w.next(), None);
        // 200 days ago: only the first follow-up (due 210) is ahead; LAPSED fires.
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        let f = w.fire_due(200 * D);
        assert_eq!(f.len(), 2);
        assert_eq!(trig(&f[1]).stage, Stage::Lapsed);
    }

    #[test]
    fn holdout_is_recorded_not_queued_and_gets_outcomes() {
        let l = 0;
        let mut w = World::new(cust_in(Arm::Holdout), l, 10_000);
        let f = w.fire_due(144 * D);
        let t = trig(&f[0]);
        assert_eq!(t.arm, Arm::Holdout);
        assert_eq!(f[0].output(), None, "holdout triggers are never published");
        let out = w.visit(150 * D, 8_000, "v1");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Recalled);
        assert_eq!(out[0].arm, Arm::Holdout);
        assert_eq!(out[0].trigger_id, t.trigger_id);
    }

    #[test]
    fn arm_is_fixed_for_the_episode() {
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        w.fire_due(144 * D);
        w.p.holdout_share = 1.0;
        w.p.experiment = "recall-v2".into();
        let f = w.fire_due(180 * D);
        let t = trig(&f[0]);
        assert_eq!(
            (t.arm, t.experiment.as_str()),
            (Arm::Treatment, "recall-v1")
        );
        // The next episode takes the new policy.
        w.visit(200 * D, 1, "v1");
        let f = w.fire_due(200 * D + 144 * D);
        assert_eq!(trig(&f[0]).arm, Arm::Holdout);
    }

    #[test]
    fn attribution_table() {
        // Triggers at 144 (AT_RISK) and 180 (LAPSED) after a visit at 0, fired on
        // time; then one visit. (visit day, outcomes as (kind, stage, days_to_return))
        type Row = (i64, Vec<(OutcomeKind, Stage, Option<f64>)>);
        use OutcomeKind::*;
        use Stage::*;
        let rows: Vec<Row> = vec![
            // Between AT_RISK and LAPSED... but the visit arrives after LAPSED fired:
            // LAPSED retracted, AT_RISK recalled.
            (
                170,
                vec![(Retracted, Lapsed, None), (Recalled, AtRisk, Some(26.0))],
            ),
            // After LAPSED: recalled by LAPSED.
            (200, vec![(Recalled, Lapsed, Some(20.0))]),
            // Exactly at the end of the window: still recalled.
            (240, vec![(Recalled, Lapsed, Some(60.0))]),
            // Before any trigger (late visit): both retracted.
            (
                100,
                vec![(Retracted, AtRisk, None), (Retracted, Lapsed, None)],
            ),
        ];
        for (day, want) in rows {
            let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
            w.fire_due(144 * D);
            w.fire_due(180 * D);
            w.st.on_marketing_send(150 * D, 5);
            w.st.on_marketing_send(190 * D, 7);
            let out = w.visit(day * D, 12_345, "v-late");
            let got: Vec<(OutcomeKind, Stage, Option<f64>)> = out
                .iter()
                .map(|o| (o.kind, o.stage, o.days_to_return))
                .collect();
            assert_eq!(got, want, "visit day {day}");
            for o in &out {
                assert_eq!(o.cause_event_id.as_deref(), Some("v-late"));
                assert_eq!(o.decided_at, day * D);
                assert_eq!(o.revenue, if o.kind == Recalled { 12_345 } else { 0 });
                let cost = if o.stage == AtRisk { 12 } else { 7 };
                assert_eq!(o.marketing_cost, cost, "{o:?}");
                assert_eq!(o.outcome_id, outcome_id(&o.trigger_id, o.kind));
            }
            // The new episode starts at the visit.
            let d = w.next().unwrap();
            assert_eq!(
                (d.episode_start, d.stage, d.due_at),
                (day * D, AtRisk, day * D + 144 * D)
            );
        }
    }

    #[test]
    fn a_visit_after_the_window_closes_the_episode_as_not_recalled() {
        // No follow-ups; DORMANT not processed yet (timer lag) when the visit comes.
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        w.p.max_follow_ups = 0;
        w.fire_due(144 * D);
        w.fire_due(180 * D);
        let out = w.visit(300 * D, 1, "v1");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::NotRecalled);
        assert_eq!(out[0].stage, Stage::Lapsed);
        assert_eq!(out[0].decided_at, 240 * D);
        assert_eq!(out[0].revenue, 0);
        assert_eq!(out[0].days_to_return, None);
    }

    #[test]
    fn a_late_visit_into_the_previous_episode_retracts_and_reattributes() {
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        w.fire_due(144 * D); // AT_RISK
        w.fire_due(180 * D); // LAPSED
                             // Visit at 200: LAPSED recalled; new episode at 200.
        let out = w.visit(200 * D, 1, "v200");
        assert_eq!(out[0].kind, OutcomeKind::Recalled);
        assert_eq!(out[0].stage, Stage::Lapsed);
        // A visit at 170 arrives late: older than the current episode (200), it
        // falls in the previous one. LAPSED (fired 180) is retracted; AT_RISK
        // (fired 144) is the one that recalled.
        let out = w.visit(170 * D, 2, "v170");
        let got: Vec<(OutcomeKind, Stage)> = out.iter().map(|o| (o.kind, o.stage)).collect();
        assert_eq!(
            got,
            [
                (OutcomeKind::Retracted, Stage::Lapsed),
                (OutcomeKind::Recalled, Stage::AtRisk)
            ]
        );
        assert_eq!(out[1].days_to_return, Some(26.0));
        assert_eq!(out[1].episode_id, episode_id(&w.c, 0));
        // The current episode is untouched.
        assert_eq!(w.next().unwrap().episode_start, 200 * D);
        // The same late visit again (it would be a duplicate upstream; here as a
        // second distinct visit at the same time) decides nothing new.
        assert!(w.visit(170 * D, 2, "v170b").is_empty());
        // A visit older than the previous episode changes nothing.
        assert!(w.visit(0, 2, "v0b").is_empty());
    }

    #[test]
    fn a_late_visit_in_the_current_episode_retracts_and_corrects_the_schedule() {
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        w.fire_due(144 * D); // AT_RISK fired at 144
                             // A visit at 140 arrives now (at 150): AT_RISK was wrong.
        let out = w.visit(140 * D, 500, "v140");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Retracted);
        assert_eq!(out[0].stage, Stage::AtRisk);
        assert_eq!(out[0].decided_at, 140 * D);
        // The episode now starts at 140; with two visits and a 140-day gap (one
        // gap: default interval still BOTOX 120) AT_RISK is due at 140 + 144.
        let d = w.next().unwrap();
        assert_eq!((d.episode_start, d.stage), (140 * D, Stage::AtRisk));
        assert_eq!(d.due_at, 284 * D);
    }

    #[test]
    fn a_late_visit_after_dormant_upgrades_not_recalled() {
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        w.p.max_follow_ups = 0;
        w.fire_due(144 * D);
        w.fire_due(180 * D);
        let f = w.fire_due(240 * D);
        assert!(matches!(&f[0], Fired::Dormant(Some(o)) if o.kind == OutcomeKind::NotRecalled));
        // A visit at 230 arrives after DORMANT: within the window of LAPSED.
        let out = w.visit(230 * D, 9, "v230");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Recalled);
        assert_eq!(out[0].stage, Stage::Lapsed);
    }

    #[test]
    fn a_same_time_visit_and_the_first_visit_decide_nothing() {
        let c = cust("c1");
        let p = LapsePolicy::default();
        let mut st = RecallState::default();
        assert!(on_visit(&mut st, &visit(5, 1, "a"), &c, &p).is_empty());
        assert!(on_visit(&mut st, &visit(5, 1, "b"), &c, &p).is_empty());
        assert_eq!(st.current.as_ref().unwrap().start, 5);
        assert!(st.previous.is_none());
    }

    #[test]
    fn next_due_without_recall_state_follows_visits() {
        // A customer stored before recall existed: no episode recorded yet.
        let p = LapsePolicy::default();
        let v = visits(10 * D, 0);
        let d = next_due(&RecallState::default(), &v, &p).unwrap();
        assert_eq!(
            (d.episode_start, d.stage, d.due_at),
            (10 * D, Stage::AtRisk, 154 * D)
        );
        assert_eq!(
            next_due(&RecallState::default(), &Visits::default(), &p),
            None
        );
        // Firing it works and records the episode.
        let c = cust_in(Arm::Treatment);
        let mut st = RecallState::default();
        let cands = all_available();
        let ctx = FireCtx {
            customer: &c,
            visits: &v,
            policy: &p,
            candidates: &cands,
            costs: &COSTS,
        };
        let f = fire(&mut st, &d, 154 * D, &ctx);
        assert_eq!(trig(&f).stage, Stage::AtRisk);
        assert_eq!(st.current.as_ref().unwrap().start, 10 * D);
    }

    #[test]
    fn state_is_compact_and_round_trips() {
        let mut w = World::new(cust_in(Arm::Treatment), 1_700_000_000_000, 10_000);
        let l = 1_700_000_000_000;
        for day in [144, 180, 210, 240] {
            w.fire_due(l + day * D);
        }
        let bytes = postcard::to_allocvec(&w.st).unwrap();
        assert!(bytes.len() < 160, "{} bytes", bytes.len());
        let back: RecallState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, w.st);
    }

    #[test]
    fn outputs_encode_with_the_avro_schemas() {
        use crate::codec::encode::Encoder;
        use crate::codec::framing::Framing;
        use crate::codec::schemas::{SchemaSet, RECALL_OUTCOME, RECALL_TRIGGER};
        let enc = Encoder::new(&SchemaSet::builtin().unwrap());
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        let f = w.fire_due(144 * D);
        let t = trig(&f[0]).clone();
        enc.encode_value(RECALL_TRIGGER, t.to_avro_value(), Framing::SingleObject)
            .unwrap();
        let t2 = RecallTrigger {
            recommended_channel: None,
            fallback_channels: vec![],
            last_treatment: None,
            ..t
        };
        enc.encode_value(RECALL_TRIGGER, t2.to_avro_value(), Framing::SingleObject)
            .unwrap();
        let out = w.visit(150 * D, 1, "v");
        enc.encode_value(
            RECALL_OUTCOME,
            out[0].to_avro_value(),
            Framing::SingleObject,
        )
        .unwrap();
        let nr = RecallOutcome {
            days_to_return: None,
            cause_event_id: None,
            kind: OutcomeKind::NotRecalled,
            ..out[0].clone()
        };
        enc.encode_value(RECALL_OUTCOME, nr.to_avro_value(), Framing::SingleObject)
            .unwrap();
    }

    #[test]
    fn inspect_view() {
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        w.fire_due(144 * D);
        let v = view(&w.st, &w.v, &w.c, &w.p);
        assert_eq!(v.stages.len(), 1);
        assert_eq!(v.next_due.unwrap().stage, Stage::Lapsed);
        assert_eq!(v.schedule.len(), 5);
        assert_eq!(v.arm, Arm::Treatment);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["expected_interval"]["source"], "treatment_default");
        assert_eq!(json["stages"][0]["stage"], "AT_RISK");
    }
}
