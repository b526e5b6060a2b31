//! Synthetic customer histories with every bounded part of the state at its
//! cap, folded through the domain as the pipeline would: what the state-size
//! tests (`store::blob`) bound and the memory benchmark (`lapse-tools bench
//! memory`) writes to Redis.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::domain::event::{
    Channel, CustomerRef, Event, EventBody, Purpose, ReplyClass, VisitType,
};
use crate::domain::policy::Policy;
use crate::domain::state::{CustomerState, Source, StateParams};
use crate::domain::{decide, step};

/// A customer's state after `rounds` rounds of history on every channel, as the
/// pipeline would have folded it (outbox published and cleared).
pub fn full_history(
    customer: &CustomerRef,
    rounds: i64,
    params: &StateParams,
    policy: &Policy,
) -> CustomerState {
    let mut s = CustomerState::default();
    let mut off = 0;
    for i in 0..rounds {
        let t = 1_700_000_000_000 + i * 3_600_000;
        let ch = Channel::ALL[(i % 5) as usize];
        let bodies = [
            EventBody::Send {
                channel: ch,
                message_id: format!("m{i}"),
                campaign_id: Some("c".into()),
                purpose: Purpose::Marketing,
                cost: None,
            },
            EventBody::Open {
                channel: ch,
                message_id: format!("m{i}"),
                campaign_id: None,
            },
            EventBody::Click {
                channel: ch,
                message_id: format!("m{i}"),
                campaign_id: None,
            },
            EventBody::Reply {
                channel: ch,
                message_id: None,
                class: if i % 50 == 0 {
                    ReplyClass::Unsubscribe
                } else {
                    ReplyClass::Positive
                },
            },
            EventBody::Visit {
                visit_type: VisitType::Treatment,
                treatment: Some("BOTOX".into()),
                amount: 100_000,
                currency: "CNY".into(),
                offer_code: None,
                discount: None,
            },
        ];
        for body in bodies {
            off += 1;
            let ev = Event {
                event_id: format!("e{off}"),
                customer: customer.clone(),
                occurred_at: t,
                body,
            };
            let src = Source {
                kind: ev.kind(),
                partition: 0,
                offset: off,
            };
            step::on_record(&mut s, &ev, src, policy, params);
        }
        s.outbox.clear();
    }
    watch_last_visit(&mut s, customer, policy);
    s.timer_due = decide::next_timer(&s, policy);
    s
}

/// The repurchase watch of a customer whose last visit recalled them (the
/// bounded part a visit every hour never leaves in place: the next visit is the
/// repurchase). Set, not folded: a recall needs weeks without a visit, which
/// would move every other time of this history away from its base.
fn watch_last_visit(s: &mut CustomerState, customer: &CustomerRef, policy: &Policy) {
    let Some(at) = s.visits.last_at else {
        return;
    };
    s.recall.repurchase = Some(crate::domain::recall::RepurchaseWatch {
        episode_start: s.visits.first_at.unwrap_or(at),
        stage: crate::domain::lapse::Stage::FollowUp,
        attempt: policy.lapse.max_follow_ups,
        segment: crate::domain::lapse::Segment::HighValueLapsed,
        experiment: policy.lapse.experiment.clone(),
        arm: crate::domain::recall::arm_for(customer, &policy.lapse),
        recalled_at: at,
        window_ms: 1_095 * crate::domain::lapse::DAY_MS,
    });
}

/// The benchmark's history is regular: whole hours apart, and a channel's
/// send, open, click and reply at the same instant (so their decayed counts
/// are bit-identical). This one has the same bounded parts full, at
/// millisecond times, with opens, clicks and replies minutes to hours after
/// some of the sends: the size a busy real customer has.
pub fn irregular_history(
    customer: &CustomerRef,
    sends: i64,
    seed: u64,
    params: &StateParams,
    policy: &Policy,
) -> CustomerState {
    let mut r = StdRng::seed_from_u64(seed);
    let mut bodies = Vec::new();
    let mut t = 1_700_000_000_000 + r.random_range(0..1_000);
    for i in 0..sends {
        t += r.random_range(2 * 3_600_000..30 * 3_600_000);
        let channel = Channel::ALL[r.random_range(0..5)];
        let m = format!("m{i}");
        bodies.push((
            t,
            EventBody::Send {
                channel,
                message_id: m.clone(),
                campaign_id: Some("c".into()),
                purpose: Purpose::Marketing,
                cost: None,
            },
        ));
        let later = |r: &mut StdRng| t + r.random_range(60_000..6 * 3_600_000);
        if r.random_bool(0.5) {
            let open = EventBody::Open {
                channel,
                message_id: m.clone(),
                campaign_id: None,
            };
            bodies.push((later(&mut r), open));
        }
        if r.random_bool(0.15) {
            let click = EventBody::Click {
                channel,
                message_id: m.clone(),
                campaign_id: None,
            };
            bodies.push((later(&mut r), click));
        }
        if r.random_bool(0.05) {
            let class = if r.random_bool(0.2) {
                ReplyClass::Unsubscribe
            } else {
                ReplyClass::Positive
            };
            let reply = EventBody::Reply {
                channel,
                message_id: None,
                class,
            };
            bodies.push((later(&mut r), reply));
        }
        if i % 30 == 0 {
            let visit = EventBody::Visit {
                visit_type: VisitType::Treatment,
                treatment: Some("BOTOX".into()),
                amount: r.random_range(50_000..300_000),
                currency: "CNY".into(),
                offer_code: None,
                discount: None,
            };
            bodies.push((later(&mut r), visit));
        }
    }
    bodies.sort_by_key(|(t, _)| *t);
    let mut s = CustomerState::default();
    for (off, (t, body)) in bodies.into_iter().enumerate() {
        let ev = Event {
            event_id: format!("e{off}"),
            customer: customer.clone(),
            occurred_at: t,
            body,
        };
        let src = Source {
            kind: ev.kind(),
            partition: 3,
            offset: 1_000_000 + off as i64,
        };
        step::on_record(&mut s, &ev, src, policy, params);
        s.outbox.clear();
    }
    s.timer_due = decide::next_timer(&s, policy);
    s
}

/// Stored size of each part of the state (what dominates the blob), as laid
/// out by the compact format (`store::compact`).
pub fn blob_parts(s: &CustomerState) -> Vec<(String, usize)> {
    let sizes = crate::store::compact::encode_parts(s, &mut Vec::new());
    crate::store::compact::SECTIONS
        .iter()
        .zip(sizes)
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::PolicyConfig;

    #[test]
    fn a_full_history_fills_every_bounded_part() {
        let p = StateParams::default();
        let policy = PolicyConfig::default().resolve(None).unwrap();
        let s = full_history(&CustomerRef::new("b", "c"), 300, &p, &policy);
        assert!(
            s.channels.iter().all(Option::is_some),
            "all five channels have engagement"
        );
        assert!(
            s.controls.iter().all(Option::is_some),
            "all five channels have a control"
        );
        assert_eq!(
            s.visits.recent.len(),
            p.visit_history,
            "visit history is full"
        );
        assert!(s.outbox.is_empty());
        let parts = blob_parts(&s);
        assert!(parts.iter().all(|(_, n)| *n > 0), "{parts:?}");
    }
}
