//! The benchmark's synthetic input: a deterministic stream (given the seed and
//! the time anchor) of events of all five kinds, spread over `customers`
//! customers of `tenants` tenants, in the proportions a clinic chain's
//! engagement traffic has: mostly sends, then opens, clicks, visits and a few
//! replies (some of them unsubscribes).
//!
//! This is a load generator, not the population simulator (`lapse-tools simulate`,
//! issue 6): customers are picked uniformly, there is no fatigue model, and
//! opens and clicks reference plausible but not necessarily produced messages.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use lapse::domain::event::{
    Channel, CustomerRef, Event, EventBody, EventKind, FeedbackKind, Purpose, ReplyClass,
    VisitType, INPUT_KINDS,
};

/// Share of each kind, in per mille, in `EventKind::ALL` order
/// (send, open, click, reply, visit, feedback: none, so the figures stay
/// comparable with those measured before the feedback input).
pub const MIX_PER_MILLE: [u32; INPUT_KINDS] = [450, 250, 110, 40, 150, 0];

const TREATMENTS: &[&str] = &["BOTOX", "FILLER", "LASER", "SKIN_CARE", "HYDRAFACIAL"];
/// Reply texts: positive, neutral, unsubscribe and re-subscribe wordings.
const REPLIES: &[&str] = &[
    "好的，想预约下周",
    "谢谢",
    "多少钱？",
    "收到",
    "TD",
    "退订",
    "STOP",
    "OK see you Saturday",
];
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub events: u64,
    pub customers: u64,
    pub tenants: u64,
    pub seed: u64,
    /// Event times are spread over `days` days before `now_ms` (never after it).
    pub days: i64,
    pub now_ms: i64,
}

/// A generated event, with its reply text for replies (text exists only until encoded).
#[derive(Debug, Clone)]
pub struct Generated {
    pub event: Event,
    pub text: Option<&'static str>,
}

/// Iterator over the `spec.events` events of a workload.
pub struct Workload {
    spec: WorkloadSpec,
    rng: StdRng,
    next: u64,
}

impl Workload {
    pub fn new(spec: WorkloadSpec) -> Workload {
        assert!(spec.customers > 0 && spec.tenants > 0 && spec.days > 0);
        Workload {
            rng: StdRng::seed_from_u64(spec.seed),
            spec,
            next: 0,
        }
    }

    /// Customer `i` (0-based): tenants interleaved, so every tenant has ~customers/tenants.
    pub fn customer(&self, i: u64) -> CustomerRef {
        let tenant = i % self.spec.tenants + 1;
        CustomerRef::new(format!("clinic-{tenant}"), format!("cust-{i:07}"))
    }

    fn kind(&mut self) -> EventKind {
        let total: u32 = MIX_PER_MILLE.iter().sum();
        let mut x = self.rng.random_range(0..total);
        for (k, w) in EventKind::ALL.into_iter().zip(MIX_PER_MILLE) {
            if x < w {
                return k;
            }
            x -= w;
        }
        EventKind::Send
    }

    /// A customer's usual channel is stable (derived from the id), 75% of the time.
    fn channel(&mut self, customer: u64) -> Channel {
        if self.rng.random_bool(0.75) {
            let h = customer.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59;
            Channel::ALL[(h % 5) as usize]
        } else {
            Channel::ALL[self.rng.random_range(0..Channel::ALL.len())]
        }
    }
}

impl Iterator for Workload {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        if self.next >= self.spec.events {
            return None;
        }
        let n = self.next;
        self.next += 1;
        let ci = self.rng.random_range(0..self.spec.customers);
        let customer = self.customer(ci);
        let occurred_at =
            self.spec.now_ms - 60_000 - self.rng.random_range(0..self.spec.days * DAY_MS);
        let kind = self.kind();
        let message = self.rng.random_range(0..12u32);
        let message_id = format!("msg-{ci}-{message}");
        let campaign_id = Some(format!("camp-{}", message % 6));
        let mut text = None;
        let body = match kind {
            EventKind::Send => EventBody::Send {
                channel: self.channel(ci),
                message_id,
                campaign_id,
                purpose: if self.rng.random_bool(0.8) {
                    Purpose::Marketing
                } else {
                    Purpose::Service
                },
                cost: self
                    .rng
                    .random_bool(0.3)
                    .then(|| self.rng.random_range(5..500)),
            },
            EventKind::Open => EventBody::Open {
                channel: self.channel(ci),
                message_id,
                campaign_id,
            },
            EventKind::Click => EventBody::Click {
                channel: self.channel(ci),
                message_id,
                campaign_id,
            },
            EventKind::Reply => {
                text = Some(REPLIES[self.rng.random_range(0..REPLIES.len())]);
                EventBody::Reply {
                    channel: self.channel(ci),
                    message_id: self.rng.random_bool(0.9).then_some(message_id),
                    // The class is decided by the decoder from the text.
                    class: ReplyClass::Neutral,
                }
            }
            EventKind::Feedback => EventBody::Feedback {
                kind: FeedbackKind::Nps,
                score: self.rng.random_range(0..=10),
                visit_event_id: None,
                channel: None,
            },
            EventKind::Visit => {
                let visit_type = match self.rng.random_range(0..100) {
                    0..20 => VisitType::Consultation,
                    20..85 => VisitType::Treatment,
                    _ => VisitType::FollowUp,
                };
                EventBody::Visit {
                    visit_type,
                    treatment: (visit_type != VisitType::Consultation)
                        .then(|| TREATMENTS[self.rng.random_range(0..TREATMENTS.len())].into()),
                    amount: match visit_type {
                        VisitType::Treatment => self.rng.random_range(50_000..1_500_000),
                        _ => self.rng.random_range(0..20_000),
                    },
                    currency: "CNY".into(),
                    offer_code: None,
                    discount: None,
                }
            }
        };
        Some(Generated {
            event: Event {
                event_id: format!("bench-{}-{n}", self.spec.seed),
                customer,
                occurred_at,
                body,
            },
            text,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.spec.events - self.next).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spec(events: u64) -> WorkloadSpec {
        WorkloadSpec {
            events,
            customers: 500,
            tenants: 3,
            seed: 7,
            days: 180,
            now_ms: 1_750_000_000_000,
        }
    }

    #[test]
    fn deterministic_unique_ids_in_the_past_and_every_kind() {
        let a: Vec<_> = Workload::new(spec(20_000)).collect();
        let b: Vec<_> = Workload::new(spec(20_000)).collect();
        assert_eq!(a.len(), 20_000);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.event == y.event && x.text == y.text));
        let ids: HashSet<_> = a.iter().map(|g| &g.event.event_id).collect();
        assert_eq!(ids.len(), a.len(), "event ids are unique");
        assert!(a.iter().all(|g| g.event.occurred_at < 1_750_000_000_000));
        let mut per_kind = [0u32; INPUT_KINDS];
        for g in &a {
            per_kind[g.event.kind().index()] += 1;
            assert_eq!(g.text.is_some(), g.event.kind() == EventKind::Reply);
        }
        for (k, n) in per_kind.iter().enumerate() {
            let expected = 20_000 * MIX_PER_MILLE[k] / 1000;
            assert!(
                n.abs_diff(expected) < expected / 5 + 20,
                "kind {k}: {n} vs {expected}"
            );
        }
        let customers: HashSet<_> = a.iter().map(|g| &g.event.customer).collect();
        assert_eq!(customers.len(), 500);
        let tenants: HashSet<_> = a.iter().map(|g| &g.event.customer.tenant).collect();
        assert_eq!(tenants.len(), 3);
    }
}
