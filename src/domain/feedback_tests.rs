//! The care-call decision through `step::on_record`, as the pipeline drives it.

use chrono::TimeZone;

use super::decide_tests::{record, Sim};
use super::event::*;
use super::feedback::FeedbackPolicy;
use super::lapse::{Segment, Stage};
use super::output::Output;
use super::policy::{PolicyConfig, TenantOverride};
use super::recall::{self, Arm, RecallTrigger};
use super::state::Outcome;
use super::step;

/// Local (Asia/Shanghai) time on day `d` of March 2026.
fn sh(d: u32, h: u32) -> i64 {
    chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(2026, 3, d, h, 0, 0)
        .unwrap()
        .timestamp_millis()
}

fn score(kind: FeedbackKind, score: u8) -> EventBody {
    EventBody::Feedback {
        kind,
        score,
        visit_event_id: None,
        channel: Some(Channel::Wechat),
    }
}

fn visit(amount: i64) -> EventBody {
    EventBody::Visit {
        visit_type: VisitType::Treatment,
        treatment: Some("BOTOX".into()),
        amount,
        currency: "CNY".into(),
        offer_code: None,
        discount: None,
    }
}

fn care_calls(s: &Sim) -> Vec<&RecallTrigger> {
    s.state
        .outbox
        .iter()
        .filter_map(|o| match o {
            Output::Trigger(t) if t.stage == Stage::CareCall => Some(t),
            _ => None,
        })
        .collect()
}

#[test]
fn a_detractor_gets_one_care_call_and_nobody_else_gets_any() {
    let mut s = Sim::new(PolicyConfig::default().resolve(None).unwrap());
    s.apply(visit(50_000), sh(1, 10));
    for (kind, value) in [
        (FeedbackKind::Nps, 7),
        (FeedbackKind::Nps, 10),
        (FeedbackKind::Csat, 3),
        (FeedbackKind::Csat, 5),
    ] {
        let fx = s.apply(score(kind, value), sh(2, 10));
        assert_eq!(fx.care_call, None, "{kind:?} {value}");
    }
    assert!(care_calls(&s).is_empty());
    let fx = s.apply(score(FeedbackKind::Nps, 6), sh(3, 10));
    assert_eq!(fx.care_call, Some((Segment::AtRisk, Some(Channel::Wechat))));
    let fx = s.apply(score(FeedbackKind::Csat, 2), sh(4, 10));
    assert!(fx.care_call.is_some());
    let calls = care_calls(&s);
    assert_eq!(calls.len(), 2);
    let t = calls[0];
    assert_eq!(t.trigger_id, recall::care_call_id(&s.who, "e6"));
    assert_eq!(t.purpose(), Purpose::Service);
    assert_eq!((t.arm, t.attempt), (Arm::Treatment, 1));
    assert_eq!((t.due_at, t.fired_at), (sh(3, 10), sh(3, 10)));
    assert_eq!(t.days_since_last_visit, 2);
    assert_eq!(t.lifetime_value, 50_000);
    assert_eq!(t.offer_tier, "CARE_CALL");
}

#[test]
fn a_re_sent_or_late_detractor_score_calls_nobody_again() {
    let mut s = Sim::new(PolicyConfig::default().resolve(None).unwrap());
    s.apply(score(FeedbackKind::Nps, 2), sh(5, 10));
    assert_eq!(care_calls(&s).len(), 1);
    // The same event id again, at a new offset: an upstream duplicate.
    let (mut ev, mut src) = record(&s.who, 1, score(FeedbackKind::Nps, 2), sh(5, 10));
    src.offset = 50;
    let before = s.state.clone();
    let (out, _, fx) = step::on_record(&mut s.state, &ev, src, &s.policy, &s.sp);
    assert_eq!((out, fx), (Outcome::DuplicateEventId, None));
    assert_eq!(s.state, before);
    // An older detractor's score read late: superseded by the latest, no call.
    ev.event_id = "older".into();
    ev.occurred_at = sh(4, 10);
    src.offset = 51;
    let (out, notes, fx) = step::on_record(&mut s.state, &ev, src, &s.policy, &s.sp);
    assert_eq!(out, Outcome::Applied);
    assert!(!notes.feedback.unwrap().latest);
    assert_eq!(fx.unwrap().care_call, None);
    assert_eq!(care_calls(&s).len(), 1);
    assert_eq!(s.state.feedback.unwrap().at, sh(5, 10));
}

#[test]
fn a_care_call_leaves_the_lapse_episode_alone() {
    let mut s = Sim::new(PolicyConfig::default().resolve(None).unwrap());
    s.apply(visit(50_000), sh(1, 10));
    let recall_before = s.state.recall.clone();
    let due_before = recall::next_due(&s.state.recall, &s.state.visits, &s.policy.lapse);
    s.apply(score(FeedbackKind::Nps, 0), sh(2, 10));
    assert_eq!(care_calls(&s).len(), 1);
    assert_eq!(
        s.state.recall, recall_before,
        "no stage consumed or advanced"
    );
    assert_eq!(
        recall::next_due(&s.state.recall, &s.state.visits, &s.policy.lapse),
        due_before
    );
    // The visit after it ends nothing and recalls nothing: no outcome.
    s.state.outbox.clear();
    s.apply(visit(50_000), sh(9, 10));
    assert!(s.state.outbox.is_empty(), "{:?}", s.state.outbox);
}

#[test]
fn a_care_call_goes_by_any_channel_not_opted_out_after_quiet_hours() {
    let mut s = Sim::new(PolicyConfig::default().resolve(None).unwrap());
    // No engagement: every channel scores the prior; a standard-value
    // customer may still be called (PHONE is never offered to them for marketing).
    s.apply(
        EventBody::Reply {
            channel: Channel::Wechat,
            message_id: None,
            class: ReplyClass::Unsubscribe,
        },
        sh(1, 12),
    );
    // 23:00 local: inside SMS's and PHONE's quiet hours (21:00-09:00).
    s.apply(score(FeedbackKind::Nps, 1), sh(2, 23));
    let t = care_calls(&s)[0];
    let mut all: Vec<Channel> = t.recommended_channel.into_iter().collect();
    all.extend(&t.fallback_channels);
    assert!(!all.contains(&Channel::Wechat), "opted out: {all:?}");
    assert!(all.contains(&Channel::Phone), "{all:?}");
    assert_eq!(all.len(), 4);
    let c = t.recommended_channel.unwrap();
    let after = t.send_after.expect("a time to send");
    assert!(after > sh(2, 23), "not at night");
    assert_eq!(s.policy.quiet_until(c, after), None, "{c} at {after}");
}

#[test]
fn thresholds_and_the_care_call_switch_are_per_tenant() {
    let mut cfg = PolicyConfig::default();
    cfg.tenants.insert(
        "brandA".into(),
        TenantOverride {
            feedback: Some(FeedbackPolicy {
                nps_detractor_max: 3,
                ..FeedbackPolicy::default()
            }),
            ..TenantOverride::default()
        },
    );
    cfg.tenants.insert(
        "quiet".into(),
        TenantOverride {
            feedback: Some(FeedbackPolicy {
                care_call: false,
                ..FeedbackPolicy::default()
            }),
            ..TenantOverride::default()
        },
    );
    let mut a = Sim::new(cfg.resolve(Some("brandA")).unwrap());
    assert_eq!(
        a.apply(score(FeedbackKind::Nps, 5), sh(1, 10)).care_call,
        None
    );
    assert!(a
        .apply(score(FeedbackKind::Nps, 3), sh(2, 10))
        .care_call
        .is_some());
    let mut q = Sim::new(cfg.resolve(Some("quiet")).unwrap());
    assert_eq!(
        q.apply(score(FeedbackKind::Nps, 0), sh(1, 10)).care_call,
        None
    );
    assert!(care_calls(&q).is_empty());
    cfg.feedback.csat_detractor_max = 5;
    let e = cfg.validate().unwrap_err();
    assert_eq!(e.0, "policy.feedback.csat_detractor_max", "{e:?}");
}
