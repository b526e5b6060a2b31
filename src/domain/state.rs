//! Per-customer state and the pure function that folds one event into it.
//!
//! Idempotence lives here, in two layers that together make every update
//! exactly-once in effect with bounded memory:
//! * a per-input-topic watermark `(partition, offset)`: a redelivered record
//!   (crash, rebalance, replay from offset 0) is at or below it and is skipped;
//! * a ring of the last N event-id hashes: the same `event_id` re-sent upstream
//!   at a new offset is skipped.
//!
//! Every field is folded order-independently (sums, min/max, a sorted bounded
//! set), so redelivery order does not change the result.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

use super::allowance::ChannelControl;
use super::engagement::{ChannelEngagement, Horizons, Signal};
use super::event::{Channel, Event, EventBody, EventKind, Purpose, ReplyClass};
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
    pub event_ids_per_customer: usize,
    pub visit_history: usize,
    pub horizons: Horizons,
}

impl Default for StateParams {
    fn default() -> Self {
        StateParams {
            event_ids_per_customer: 16,
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
pub struct Applied {
    /// Highest applied offset per input topic, indexed by `EventKind`.
    pub watermarks: [Option<Watermark>; 5],
    /// Hashes of the most recent event ids, oldest first.
    pub recent_ids: VecDeque<IdHash>,
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
}

/// Notes about an applied event that adapters count but that change no decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notes {
    /// A visit in a currency other than the customer's: counted as a visit, not as spend.
    pub currency_mismatch: bool,
}

/// The low 48 bits of an event id's hash, stored as 6 bytes. A new event is a
/// false "duplicate" with a probability of (ids remembered) × 2⁻⁴⁸ per event:
/// 5.7e-14 with the default 16 ids (1.1e-13 with 32).
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
        *slot = Some(Watermark {
            partition: src.partition,
            offset: src.offset,
        });
        let h = IdHash::from(event_id_hash(ev.kind(), &ev.event_id));
        if self.applied.recent_ids.contains(&h) {
            // The watermark moved (so the skip itself is durable), nothing else did.
            return (Outcome::DuplicateEventId, notes);
        }
        self.applied.recent_ids.push_back(h);
        while self.applied.recent_ids.len() > p.event_ids_per_customer {
            self.applied.recent_ids.pop_front();
        }

        let t = ev.occurred_at;
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
        }
        (Outcome::Applied, notes)
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
            event_ids_per_customer: 8,
            visit_history: 4,
            ..StateParams::default()
        };
        let mut s = CustomerState::default();
        for i in 0..100 {
            s.apply(
                &visit(&format!("v{i}"), i * 1000, 1, None),
                src(EventKind::Visit, i),
                &p,
            );
            s.apply(
                &send(&format!("s{i}"), i * 1000),
                src(EventKind::Send, i),
                &p,
            );
        }
        assert_eq!(s.applied.recent_ids.len(), 8);
        assert_eq!(s.visits.recent.len(), 4);
        assert_eq!(s.visits.count, 100);
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
