//! Per-customer state and the pure function that folds one event into it.
//!
//! Idempotence lives here, in two layers that together make every update
//! exactly-once in effect with bounded memory:
//! * a per-input-topic watermark `(partition, offset)` of the last applied
//!   record: a redelivered record (crash, rebalance, replay from offset 0) is at
//!   or below it and is skipped;
//! * remembered event ids (`SeenIds`, per input topic): the same `event_id`
//!   re-sent upstream at a new offset is skipped. Every visit id is kept (up to
//!   `visit_ids_per_customer`); engagement ids are kept for `dedup_window` of
//!   event time behind the topic's latest event. An engagement event older than
//!   that window, or older than an id the per-topic bound had to push out, can
//!   no longer be told apart from a re-sent copy: it is skipped and counted
//!   (`Outcome::BeyondDedupHorizon`) rather than risk counting it twice.
//!
//! Every field is folded order-independently (sums, min/max, a sorted bounded
//! set), so redelivery order does not change the result; everything the dedup
//! memory of a topic decides depends on that topic's records alone, whose order
//! per customer is fixed by the partition.

use serde::{Deserialize, Serialize};

use super::allowance::{ChannelControl, ThrottleDecision};
use super::engagement::{ChannelEngagement, Horizons, Signal};
use super::event::{
    Channel, CustomerRef, Event, EventBody, EventKind, Purpose, ReplyClass, INPUT_KINDS,
};
use super::feedback::{FeedbackNote, LatestFeedback};
use super::output::Output;
use super::recall::RecallState;
use super::visits::Visits;

/// Where a record came from: the input topic (by kind), partition and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub kind: EventKind,
    pub partition: i32,
    pub offset: i64,
}

/// Tunables of the state fold, from `[state]` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateParams {
    pub dedup: DedupParams,
    pub visit_history: usize,
    pub horizons: Horizons,
}

/// How long and how many event ids are remembered (`[state]` dedup keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupParams {
    /// Engagement ids are remembered this long (event time) behind their topic's latest event.
    pub window_ms: i64,
    /// At most this many engagement ids per input topic.
    pub ids_per_topic: usize,
    /// At most this many visit ids (all of them, for any realistic customer).
    pub visit_ids: usize,
}

impl Default for DedupParams {
    fn default() -> Self {
        DedupParams {
            window_ms: 7 * 86_400_000,
            ids_per_topic: 64,
            visit_ids: 256,
        }
    }
}

impl Default for StateParams {
    fn default() -> Self {
        StateParams {
            dedup: DedupParams::default(),
            visit_history: 16,
            horizons: Horizons {
                short_half_life_ms: 14 * 86_400_000,
                long_half_life_ms: 90 * 86_400_000,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub partition: i32,
    pub offset: i64,
}

/// What has been applied already.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "AppliedV1", into = "AppliedV1")]
pub struct Applied {
    /// Highest applied offset per input topic, indexed by `EventKind`.
    pub watermarks: [Option<Watermark>; INPUT_KINDS],
    /// Remembered event ids per input topic, indexed by `EventKind`.
    pub seen: [SeenIds; INPUT_KINDS],
    /// Ids remembered by earlier versions (a ring of hashes without times, all topics
    /// mixed): still consulted, never added to, at most 1024.
    pub legacy_ids: Vec<IdHash>,
}

/// The serde layout of [`Applied`] in format 1 (postcard, read for customer
/// states written by 0.1): a ring of hashes without times. Written only by
/// benchmarks comparing the formats; the times do not survive it.
#[derive(Serialize, Deserialize)]
struct AppliedV1 {
    watermarks: [Option<Watermark>; 5],
    recent_ids: std::collections::VecDeque<IdHash>,
}

impl From<AppliedV1> for Applied {
    fn from(v: AppliedV1) -> Applied {
        let mut watermarks = [None; INPUT_KINDS];
        watermarks[..5].copy_from_slice(&v.watermarks);
        Applied {
            watermarks,
            seen: Default::default(),
            legacy_ids: v.recent_ids.into(),
        }
    }
}

impl From<Applied> for AppliedV1 {
    fn from(a: Applied) -> AppliedV1 {
        let seen = a.seen.iter().flat_map(|t| t.ids.iter().map(|x| x.id));
        // Format 1 predates the feedback topic (benchmarks only write it).
        let mut watermarks = [None; 5];
        watermarks.copy_from_slice(&a.watermarks[..5]);
        AppliedV1 {
            watermarks,
            recent_ids: a.legacy_ids.iter().copied().chain(seen).collect(),
        }
    }
}

/// One remembered event id: its hash and the event's time rounded up to the
/// minute (stored in 1–2 bytes; rounding up only keeps an id a little longer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenId {
    pub id: IdHash,
    pub at: i64,
}

/// The granularity of [`SeenId::at`].
pub const SEEN_AT_UNIT_MS: i64 = 60_000;

impl SeenId {
    pub fn new(id: IdHash, t: i64) -> SeenId {
        let up = t.div_euclid(SEEN_AT_UNIT_MS) + (t.rem_euclid(SEEN_AT_UNIT_MS) != 0) as i64;
        let max = i64::MAX / SEEN_AT_UNIT_MS;
        SeenId {
            id,
            at: up.clamp(-max, max) * SEEN_AT_UNIT_MS,
        }
    }
}

/// The event ids remembered for one input topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeenIds {
    /// Sorted by event time, then hash (so the order of arrival does not matter).
    pub ids: Vec<SeenId>,
    /// The latest event time of an id the bound pushed out: events at or
    /// before it can no longer be told apart from re-sent copies.
    pub evicted_until: Option<i64>,
}

impl SeenIds {
    fn contains(&self, id: IdHash) -> bool {
        self.ids.iter().any(|s| s.id == id)
    }

    /// Remembers `s`, forgets ids older than `keep_from`, then pushes out the
    /// oldest beyond `bound`. Returns how many ids the bound pushed out.
    fn remember(&mut self, s: SeenId, keep_from: Option<i64>, bound: usize) -> usize {
        let at = self.ids.partition_point(|x| (x.at, x.id) < (s.at, s.id));
        self.ids.insert(at, s);
        if let Some(from) = keep_from {
            let old = self.ids.partition_point(|x| x.at < from);
            self.ids.drain(..old);
            // The window alone covers what an older push-out did.
            self.evicted_until = self.evicted_until.filter(|e| *e >= from);
        }
        let over = self.ids.len().saturating_sub(bound);
        if over > 0 {
            let last = self.ids[over - 1].at;
            self.evicted_until = Some(self.evicted_until.map_or(last, |e| e.max(last)));
            self.ids.drain(..over);
        }
        over
    }
}

/// Everything lapse keeps about one customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    pub visits: Visits,
    /// Engagement per channel, indexed by `Channel::index()`; `None` until first seen.
    pub channels: [Option<ChannelEngagement>; 5],
    pub applied: Applied,
    /// Frequency control per channel, indexed by `Channel::index()`.
    pub controls: [Option<ChannelControl>; 5],
    /// Recall episode and attribution memory.
    pub recall: RecallState,
    /// Decisions written with this state and not yet acknowledged by the broker:
    /// produced after the write, then cleared (an outbox, so a crash loses none).
    pub outbox: Vec<Output>,
    /// The due time last scheduled in the timer store (recall stage or allowance release).
    pub timer_due: Option<i64>,
    /// Campaigns' latest sends per channel, for "one campaign, one channel"
    /// (empty unless `policy.cross_channel.campaign_lock` is on). Kept by the
    /// compact format only (format 1, postcard, predates it).
    #[serde(skip)]
    pub campaign_touches: Vec<super::cross_channel::CampaignTouch>,
    /// Engagement by local hour, for best contact hours (`None` until the
    /// first engagement, or with `policy.contact_hours` off). Compact format only.
    #[serde(skip)]
    pub active_hours: Option<super::contact_hours::ActiveHours>,
    /// Experiments whose arm changed a decision for this customer: which arm,
    /// since when (at most `experiment::exposure::MAX_EXPOSURES`). Kept by the
    /// compact format only.
    #[serde(skip)]
    pub exposures: Vec<super::experiment::Exposure>,
    /// The latest satisfaction feedback (`None` until the first). Compact format only.
    #[serde(skip)]
    pub feedback: Option<LatestFeedback>,
}

/// What folding one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed.
    Applied,
    /// The record was at or below the topic watermark: a redelivery.
    Redelivered,
    /// The record is new at this offset but its event id was seen: an upstream duplicate.
    DuplicateEventId,
    /// The event is older than what the dedup memory of its topic still covers
    /// (the dedup window behind the topic's latest event, or an id the bound
    /// pushed out): it cannot be told apart from a re-sent copy, so it is skipped.
    BeyondDedupHorizon,
}

/// Notes about an applied event that adapters count but that change no decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notes {
    /// A visit in a currency other than the customer's: counted as a visit, not as spend.
    pub currency_mismatch: bool,
    /// Ids still inside the dedup window that the per-topic bound pushed out.
    pub evicted_ids: u32,
    /// An applied feedback event, with what its satisfaction is measured under.
    pub feedback: Option<FeedbackNote>,
}

/// The low 48 bits of an event id's hash, stored as 6 bytes. A new event is a
/// false "duplicate" with a probability of (ids remembered for its topic) ×
/// 2⁻⁴⁸ per event: 2.3e-13 with 64 ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdHash([u8; 6]);

impl IdHash {
    /// The 6 stored bytes (the hash's low 48 bits, little-endian).
    pub fn to_bytes(self) -> [u8; 6] {
        self.0
    }

    pub fn from_bytes(b: [u8; 6]) -> IdHash {
        IdHash(b)
    }
}

impl From<u64> for IdHash {
    fn from(h: u64) -> IdHash {
        let b = h.to_le_bytes();
        IdHash([b[0], b[1], b[2], b[3], b[4], b[5]])
    }
}

/// Stable 64-bit FNV-1a hash of the event's kind and id (stored, so it must never change).
pub fn event_id_hash(kind: EventKind, event_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(kind.index() as u8).chain(event_id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl CustomerState {
    pub fn channel(&self, c: Channel) -> Option<&ChannelEngagement> {
        self.channels[c.index()].as_ref()
    }

    /// The last decision published on each channel, as published (channels
    /// whose state keeps it).
    pub fn latest_decisions(&self, who: &CustomerRef) -> Vec<ThrottleDecision> {
        Channel::ALL
            .into_iter()
            .filter_map(|c| self.controls[c.index()].as_ref()?.last_decision(who, c))
            .collect()
    }

    /// True when the latest opt-out reply on `c` is newer than the latest opt-in.
    pub fn is_unsubscribed(&self, c: Channel) -> bool {
        self.channel(c)
            .is_some_and(ChannelEngagement::is_unsubscribed)
    }

    /// Folds one record into the state. Pure: same state + same record = same result.
    pub fn apply(&mut self, ev: &Event, src: Source, p: &StateParams) -> (Outcome, Notes) {
        let mut notes = Notes::default();
        let slot = &mut self.applied.watermarks[src.kind.index()];
        if let Some(w) = slot {
            if w.partition == src.partition && src.offset <= w.offset {
                return (Outcome::Redelivered, notes);
            }
        }
        let t = ev.occurred_at;
        let kind = ev.kind();
        let h = IdHash::from(event_id_hash(kind, &ev.event_id));
        // Visits are few and each one matters (count, spend): all are kept, no window.
        let window = (kind != EventKind::Visit).then_some(p.dedup.window_ms);
        let latest = self.latest(kind);
        let seen = &self.applied.seen[kind.index()];
        // A skip changes nothing, not even the watermark: the state stays a
        // function of the applied events, however the skips were batched (a
        // redelivered copy is judged the same way again).
        if seen.contains(h) || self.applied.legacy_ids.contains(&h) {
            return (Outcome::DuplicateEventId, notes);
        }
        let before_window = window
            .zip(latest)
            .is_some_and(|(w, l)| t < l.saturating_sub(w));
        if before_window || seen.evicted_until.is_some_and(|e| t <= e) {
            return (Outcome::BeyondDedupHorizon, notes);
        }
        self.applied.watermarks[src.kind.index()] = Some(Watermark {
            partition: src.partition,
            offset: src.offset,
        });

        match &ev.body {
            EventBody::Send {
                channel, purpose, ..
            } => {
                if *purpose == Purpose::Marketing {
                    self.engage(*channel, Signal::Send, t, p);
                } else {
                    // Service messages never count: not in the click rate, not against caps.
                    let e = self.channels[channel.index()]
                        .get_or_insert_with(ChannelEngagement::default);
                    e.last_service_send = Some(e.last_service_send.map_or(t, |x| x.max(t)));
                }
            }
            EventBody::Open { channel, .. } => self.engage(*channel, Signal::Open, t, p),
            EventBody::Click { channel, .. } => self.engage(*channel, Signal::Click, t, p),
            EventBody::Reply { channel, class, .. } => {
                self.engage(*channel, Signal::Reply, t, p);
                let ch =
                    self.channels[channel.index()].get_or_insert_with(ChannelEngagement::default);
                // Latest-wins by event time, so the order of arrival does not matter.
                let latest = |slot: &mut Option<i64>| *slot = Some(slot.map_or(t, |x| x.max(t)));
                match class {
                    ReplyClass::Unsubscribe => latest(&mut ch.unsubscribed_at),
                    ReplyClass::Resubscribe => latest(&mut ch.resubscribed_at),
                    ReplyClass::Positive | ReplyClass::Neutral => {}
                }
            }
            EventBody::Visit {
                visit_type,
                treatment,
                amount,
                currency,
                ..
            } => {
                notes.currency_mismatch = self.visits.record(
                    t,
                    *visit_type,
                    treatment.as_deref(),
                    *amount,
                    currency,
                    p.visit_history,
                );
            }
            EventBody::Feedback { kind, score, .. } => {
                let f = LatestFeedback {
                    at: t,
                    kind: *kind,
                    score: *score,
                };
                notes.feedback = Some(FeedbackNote {
                    kind: *kind,
                    score: *score,
                    latest: LatestFeedback::observe(&mut self.feedback, f),
                    segment: super::feedback::segment_label(&self.recall),
                    recall_arm: super::feedback::recall_arm(&self.recall),
                });
            }
        }
        let keep_from = window
            .zip(self.latest(kind))
            .map(|(w, l)| l.saturating_sub(w));
        let bound = match kind {
            EventKind::Visit => p.dedup.visit_ids,
            _ => p.dedup.ids_per_topic,
        };
        let pushed = self.applied.seen[kind.index()].remember(SeenId::new(h, t), keep_from, bound);
        notes.evicted_ids = pushed as u32;
        (Outcome::Applied, notes)
    }

    /// The latest event time applied from the input topic of `kind`, read off
    /// the folded state (no extra bytes stored).
    fn latest(&self, kind: EventKind) -> Option<i64> {
        let channels = self.channels.iter().flatten();
        match kind {
            EventKind::Send => channels
                .flat_map(|c| c.last_send.into_iter().chain(c.last_service_send))
                .max(),
            EventKind::Open => channels.filter_map(|c| c.last_open).max(),
            EventKind::Click => channels.filter_map(|c| c.last_click).max(),
            EventKind::Reply => channels.filter_map(|c| c.last_reply).max(),
            EventKind::Visit => self.visits.last_at,
            EventKind::Feedback => self.feedback.map(|f| f.at),
        }
    }

    fn engage(&mut self, c: Channel, s: Signal, t: i64, p: &StateParams) {
        self.channels[c.index()]
            .get_or_insert_with(ChannelEngagement::default)
            .record(s, t, p.horizons);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::CustomerRef;
    use crate::domain::event::VisitType;

    fn send(id: &str, t: i64) -> Event {
        Event {
            event_id: id.into(),
            customer: CustomerRef::new("t1", "c1"),
            occurred_at: t,
            body: EventBody::Send {
                channel: Channel::Sms,
                message_id: "m".into(),
                campaign_id: None,
                purpose: Purpose::Marketing,
                cost: None,
            },
        }
    }

    fn visit(id: &str, t: i64, amount: i64, tr: Option<&str>) -> Event {
        Event {
            event_id: id.into(),
            customer: CustomerRef::new("t1", "c1"),
            occurred_at: t,
            body: EventBody::Visit {
                visit_type: VisitType::Treatment,
                treatment: tr.map(str::to_string),
                amount,
                currency: "CNY".into(),
                offer_code: None,
                discount: None,
            },
        }
    }

    fn src(kind: EventKind, offset: i64) -> Source {
        Source {
            kind,
            partition: 0,
            offset,
        }
    }

    #[test]
    fn redelivery_and_duplicate_ids_change_nothing() {
        let p = StateParams::default();
        let mut s = CustomerState::default();
        assert_eq!(
            s.apply(&send("e1", 1000), src(EventKind::Send, 5), &p).0,
            Outcome::Applied
        );
        let before = s.clone();
        assert_eq!(
            s.apply(&send("e1", 1000), src(EventKind::Send, 5), &p).0,
            Outcome::Redelivered
        );
        assert_eq!(
            s.apply(&send("e0", 900), src(EventKind::Send, 4), &p).0,
            Outcome::Redelivered
        );
        assert_eq!(s, before);
        assert_eq!(
            s.apply(&send("e1", 1000), src(EventKind::Send, 9), &p).0,
            Outcome::DuplicateEventId
        );
        assert_eq!(s.channels, before.channels);
    }

    #[test]
    fn visits_fold_in_any_order() {
        let p = StateParams::default();
        let day = 86_400_000;
        let evs = [
            visit("v1", 10 * day, 100, Some("BOTOX")),
            visit("v2", 130 * day, 200, Some("FILLER")),
            visit("v3", 70 * day, 50, None),
        ];
        let mut a = CustomerState::default();
        for (i, e) in evs.iter().enumerate() {
            a.apply(e, src(EventKind::Visit, i as i64), &p);
        }
        let mut b = CustomerState::default();
        for (i, e) in evs.iter().rev().enumerate() {
            b.apply(e, src(EventKind::Visit, i as i64), &p);
        }
        assert_eq!(a.visits, b.visits);
        assert_eq!(a.visits.count, 3);
        assert_eq!(a.visits.lifetime_spend, 350);
        assert_eq!(a.visits.first_at, Some(10 * day));
        assert_eq!(a.visits.last_at, Some(130 * day));
        assert_eq!(a.visits.last_treatment.as_deref(), Some("FILLER"));
        let g = a.visits.gap_stats().unwrap();
        assert_eq!(g.gaps, 2);
        assert!((g.mean_days - 60.0).abs() < 1e-9);
    }

    #[test]
    fn memory_is_bounded() {
        let p = StateParams {
            dedup: DedupParams {
                window_ms: 7 * DAY,
                ids_per_topic: 8,
                visit_ids: 16,
            },
            visit_history: 4,
            ..StateParams::default()
        };
        let mut s = CustomerState::default();
        let mut evicted = 0;
        for i in 0..100 {
            s.apply(
                &visit(&format!("v{i}"), i * 60_000, 1, None),
                src(EventKind::Visit, i),
                &p,
            );
            evicted += s
                .apply(
                    &send(&format!("s{i}"), i * 60_000),
                    src(EventKind::Send, i),
                    &p,
                )
                .1
                .evicted_ids;
        }
        assert_eq!(s.applied.seen[EventKind::Send.index()].ids.len(), 8);
        assert_eq!(s.applied.seen[EventKind::Visit.index()].ids.len(), 16);
        assert_eq!(evicted, 92, "every push-out inside the window is reported");
        assert_eq!(s.visits.recent.len(), 4);
        assert_eq!(s.visits.count, 100);
    }

    const DAY: i64 = 86_400_000;

    /// The reported case: 30 visits, then the first 3 re-sent with their
    /// event ids at new offsets (a CRM re-export of history).
    #[test]
    fn a_visit_is_never_counted_twice_however_old_the_copy() {
        let p = StateParams::default();
        let mut s = CustomerState::default();
        for i in 0..30 {
            let v = visit(&format!("v{i}"), i * 30 * DAY, 100, None);
            assert_eq!(
                s.apply(&v, src(EventKind::Visit, i), &p).0,
                Outcome::Applied
            );
        }
        let before = s.clone();
        for i in 0..3 {
            let v = visit(&format!("v{i}"), i * 30 * DAY, 100, None);
            let out = s.apply(&v, src(EventKind::Visit, 100 + i), &p).0;
            assert_eq!(out, Outcome::DuplicateEventId, "visit {i}");
        }
        assert_eq!(s.visits, before.visits);
        assert_eq!(s.visits.count, 30);
        assert_eq!(s.visits.lifetime_spend, 3000);
        // A new visit dated in the past is still a visit.
        let late = visit("v-late", 45 * DAY, 100, None);
        assert_eq!(
            s.apply(&late, src(EventKind::Visit, 200), &p).0,
            Outcome::Applied
        );
        assert_eq!(s.visits.count, 31);
    }

    #[test]
    fn visits_beyond_the_bound_leave_a_horizon_instead_of_counting_twice() {
        let p = StateParams {
            dedup: DedupParams {
                visit_ids: 4,
                ..DedupParams::default()
            },
            ..StateParams::default()
        };
        let mut s = CustomerState::default();
        for i in 0..6 {
            let v = visit(&format!("v{i}"), i * DAY, 1, None);
            s.apply(&v, src(EventKind::Visit, i), &p);
        }
        let seen = &s.applied.seen[EventKind::Visit.index()];
        assert_eq!(seen.ids.len(), 4);
        assert_eq!(seen.evicted_until, Some(DAY), "day 1, a whole minute");
        // The pushed-out visit v1 re-sent: cannot be verified, so not counted again.
        let again = visit("v1", DAY, 1, None);
        assert_eq!(
            s.apply(&again, src(EventKind::Visit, 10), &p).0,
            Outcome::BeyondDedupHorizon
        );
        assert_eq!(s.visits.count, 6);
    }

    #[test]
    fn engagement_ids_are_remembered_for_the_window_behind_their_topic() {
        let p = StateParams::default();
        let mut s = CustomerState::default();
        // A month of daily sends.
        for d in 0..30 {
            let e = send(&format!("s{d}"), d * DAY);
            assert_eq!(s.apply(&e, src(EventKind::Send, d), &p).0, Outcome::Applied);
        }
        let kept = &s.applied.seen[EventKind::Send.index()].ids;
        assert_eq!(kept.len(), 8, "days 22..=29 are inside 7 days of day 29");
        let before = s.clone();
        // The whole month re-sent at new offsets: nothing changes.
        for d in 0..30 {
            let e = send(&format!("s{d}"), d * DAY);
            let out = s.apply(&e, src(EventKind::Send, 100 + d), &p).0;
            let expected = if d >= 22 {
                Outcome::DuplicateEventId
            } else {
                Outcome::BeyondDedupHorizon
            };
            assert_eq!(out, expected, "day {d}");
        }
        assert_eq!(s.channels, before.channels);
        assert_eq!(s.applied.seen, before.applied.seen);
        // A late open is judged against the opens topic, not the sends: applied.
        let open = Event {
            event_id: "o1".into(),
            customer: CustomerRef::new("t1", "c1"),
            occurred_at: 2 * DAY,
            body: EventBody::Open {
                channel: Channel::Sms,
                message_id: "m".into(),
                campaign_id: None,
            },
        };
        assert_eq!(
            s.apply(&open, src(EventKind::Open, 0), &p).0,
            Outcome::Applied
        );
    }

    /// Topics are consumed at different speeds (a backlog of sends can run
    /// weeks ahead of the opens): the result must not depend on it.
    #[test]
    fn dedup_memory_does_not_depend_on_how_topics_interleave() {
        let p = StateParams::default();
        let sends: Vec<Event> = (0..40).map(|d| send(&format!("s{d}"), d * DAY)).collect();
        let opens: Vec<Event> = (0..40)
            .map(|d| Event {
                event_id: format!("o{d}"),
                customer: CustomerRef::new("t1", "c1"),
                occurred_at: d * DAY + 3_600_000,
                body: EventBody::Open {
                    channel: Channel::Sms,
                    message_id: "m".into(),
                    campaign_id: None,
                },
            })
            .collect();
        let mut a = CustomerState::default();
        for (i, e) in sends.iter().enumerate() {
            assert_eq!(
                a.apply(e, src(EventKind::Send, i as i64), &p).0,
                Outcome::Applied
            );
        }
        for (i, e) in opens.iter().enumerate() {
            assert_eq!(
                a.apply(e, src(EventKind::Open, i as i64), &p).0,
                Outcome::Applied
            );
        }
        let mut b = CustomerState::default();
        for (i, (sd, op)) in sends.iter().zip(&opens).enumerate() {
            b.apply(op, src(EventKind::Open, i as i64), &p);
            b.apply(sd, src(EventKind::Send, i as i64), &p);
        }
        assert_eq!(a.applied, b.applied);
        assert_eq!(a.visits, b.visits);
    }

    #[test]
    fn unsubscribe_and_resubscribe() {
        let p = StateParams::default();
        let mut s = CustomerState::default();
        let mut r = Event {
            event_id: "r1".into(),
            customer: CustomerRef::new("t1", "c1"),
            occurred_at: 5,
            body: EventBody::Reply {
                channel: Channel::Sms,
                message_id: None,
                class: ReplyClass::Unsubscribe,
            },
        };
        s.apply(&r, src(EventKind::Reply, 0), &p);
        assert!(s.is_unsubscribed(Channel::Sms));
        assert!(!s.is_unsubscribed(Channel::Wechat));
        r.event_id = "r2".into();
        r.body = EventBody::Reply {
            channel: Channel::Sms,
            message_id: None,
            class: ReplyClass::Resubscribe,
        };
        s.apply(&r, src(EventKind::Reply, 1), &p);
        assert!(!s.is_unsubscribed(Channel::Sms));
    }
}
