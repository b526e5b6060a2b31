use super::*;
use crate::domain::engagement::{ChannelEngagement, Horizons};
use crate::domain::event::{Channel, CustomerRef, VisitType};
use crate::domain::lapse::{LapsePolicy, Segment, Stage, DAY_MS};
use crate::domain::output::Output;
use crate::domain::state::CustomerState;
use crate::domain::visits::Visits;
use serde_json::json;

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
        offer_code: None,
        discount: None,
        expected_interval_days: 120.0,
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
    assert!(json["repurchase"].is_null());
    // Recalled: the trigger waits for its repurchase until 1.5 × 120 days on.
    let out = w.visit(150 * D, 1, "v150");
    let v = serde_json::to_value(view(&w.st, &w.v, &w.c, &w.p)).unwrap();
    assert_eq!(v["repurchase"]["trigger_id"], json!(out[0].trigger_id));
    assert_eq!(v["repurchase"]["recalled_at"], 150 * D);
    assert_eq!(v["repurchase"]["window_ends_at"], 330 * D);
    assert_eq!(v["repurchase"]["arm"], "TREATMENT");
}

/// A visit redeeming `offer_code` / `discount`.
fn visit_with(
    at: i64,
    revenue: i64,
    id: &str,
    code: Option<&str>,
    discount: Option<i64>,
) -> VisitInfo {
    VisitInfo {
        offer_code: code.map(str::to_string),
        discount,
        ..visit(at, revenue, id)
    }
}

/// A BOTOX customer (120 d) of `arm` with AT_RISK fired at 144 and LAPSED at
/// 180, recalled (by LAPSED) by a visit at day 200.
fn recalled_at_200(arm: Arm) -> (World, RecallOutcome) {
    let mut w = World::new(cust_in(arm), 0, 10_000);
    w.fire_due(144 * D);
    w.fire_due(180 * D);
    let out = w.visit(200 * D, 50_000, "v200");
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].kind, out[0].stage),
        (OutcomeKind::Recalled, Stage::Lapsed)
    );
    (w, out[0].clone())
}

#[test]
fn repurchase_table() {
    // Recalled at 200 with an expected interval of 120 d: the window is 1.5 ×
    // 120 = 180 d, to day 380. (next visit day, days since the recall visit)
    let rows: [(i64, Option<f64>); 6] = [
        (201, Some(1.0)),
        (250, Some(50.0)),
        (380, Some(180.0)),
        (381, None),
        // The recalling visit's time again (another visit id): not a repurchase.
        (200, None),
        // Older than the recall (a late visit): not a repurchase either.
        (190, None),
    ];
    for arm in [Arm::Treatment, Arm::Holdout] {
        for (day, days) in rows {
            let (mut w, recalled) = recalled_at_200(arm);
            let out = w.visit(day * D, 70_000, "v2");
            let rep: Vec<&RecallOutcome> = out
                .iter()
                .filter(|o| o.kind == OutcomeKind::Repurchased)
                .collect();
            let Some(want) = days else {
                assert!(rep.is_empty(), "day {day}: {out:?}");
                continue;
            };
            assert_eq!(rep.len(), 1, "day {day}: {out:?}");
            let o = rep[0];
            assert_eq!(o.trigger_id, recalled.trigger_id);
            assert_eq!(o.episode_id, recalled.episode_id);
            assert_eq!(
                o.outcome_id,
                outcome_id(&recalled.trigger_id, OutcomeKind::Repurchased)
            );
            assert_eq!(
                (o.stage, o.segment, o.arm),
                (recalled.stage, recalled.segment, arm)
            );
            assert_eq!(o.days_to_return, Some(want));
            assert_eq!(
                (o.revenue, o.marketing_cost, o.incentive_cost),
                (70_000, 0, 0)
            );
            assert_eq!(o.cause_event_id.as_deref(), Some("v2"));
            assert_eq!(o.decided_at, day * D);
            // One per trigger: a later visit inside the window adds nothing.
            let again = w.visit(day * D + D / 2, 1, "v3");
            assert!(
                again.iter().all(|o| o.kind != OutcomeKind::Repurchased),
                "{again:?}"
            );
            // The lapse episode goes on as before: a new one at the visit.
            assert_eq!(w.next().unwrap().episode_start, day * D + D / 2);
        }
    }
}

#[test]
fn a_free_visit_is_no_repurchase_and_leaves_the_watch() {
    let (mut w, recalled) = recalled_at_200(Arm::Treatment);
    // A free follow-up check: nothing bought.
    assert!(w.visit(215 * D, 0, "check").is_empty());
    let out = w.visit(260 * D, 90_000, "paid");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        (out[0].kind, &out[0].trigger_id),
        (OutcomeKind::Repurchased, &recalled.trigger_id)
    );
    assert_eq!(out[0].days_to_return, Some(60.0));
}

#[test]
fn the_repurchase_window_follows_the_expected_interval_and_factor() {
    let (mut w, _) = recalled_at_200(Arm::Treatment);
    w.p.repurchase_factor = 1.0;
    // The factor is read when the recall is decided: 1.5 here.
    assert_eq!(w.st.repurchase.as_ref().unwrap().window_ms, 180 * D);
    let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
    w.p.repurchase_factor = 0.5;
    w.fire_due(144 * D);
    let mut v = visit(150 * D, 1, "v150");
    v.expected_interval_days = 30.0;
    on_visit(&mut w.st, &v, &w.c, &w.p);
    let watch = w.st.repurchase.clone().unwrap();
    assert_eq!((watch.recalled_at, watch.window_ms), (150 * D, 15 * D));
    assert!(w.visit(166 * D, 1, "late-for-it").is_empty());
}

#[test]
fn a_late_repurchase_still_counts_and_a_retracted_recall_is_not_watched() {
    // A visit past the window, then a late one inside it: the late one counts.
    let (mut w, recalled) = recalled_at_200(Arm::Treatment);
    assert!(w.visit(400 * D, 1, "v400").is_empty());
    let out = w.visit(300 * D, 2, "v300");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        (out[0].kind, &out[0].trigger_id),
        (OutcomeKind::Repurchased, &recalled.trigger_id)
    );
    assert_eq!(out[0].days_to_return, Some(100.0));

    // A late visit at 170 retracts LAPSED (the watched trigger) and recalls
    // AT_RISK instead: the repurchase is now AT_RISK's, from day 170.
    let (mut w, _) = recalled_at_200(Arm::Treatment);
    let out = w.visit(170 * D, 3, "v170");
    let kinds: Vec<_> = out.iter().map(|o| (o.kind, o.stage)).collect();
    assert_eq!(
        kinds,
        [
            (OutcomeKind::Retracted, Stage::Lapsed),
            (OutcomeKind::Recalled, Stage::AtRisk)
        ]
    );
    let out = w.visit(260 * D, 4, "v260");
    let rep: Vec<_> = out
        .iter()
        .filter(|o| o.kind == OutcomeKind::Repurchased)
        .collect();
    assert_eq!(rep.len(), 1, "{out:?}");
    assert_eq!(
        (rep[0].stage, rep[0].days_to_return),
        (Stage::AtRisk, Some(90.0))
    );
}

#[test]
fn a_recalling_visit_carries_its_incentive_and_other_visits_none() {
    // (offer_code, discount, incentive_cost on the RECALLED)
    let rows = [
        (None, None, 0),
        (Some("reminder-coupon-5pct"), None, 15_000),
        (Some("reminder-coupon-5pct"), Some(4_200), 4_200),
        (Some("not-a-tier"), None, 0),
    ];
    for (code, discount, cost) in rows {
        let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
        w.fire_due(144 * D);
        let out = on_visit(
            &mut w.st,
            &visit_with(150 * D, 380_000, "v", code, discount),
            &w.c,
            &w.p,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Recalled);
        assert_eq!(out[0].incentive_cost, cost, "{code:?} {discount:?}");
        // The repurchasing visit's own offer is no cost of the recall.
        let out = on_visit(
            &mut w.st,
            &visit_with(170 * D, 1, "v2", code, Some(999)),
            &w.c,
            &w.p,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].kind, out[0].incentive_cost),
            (OutcomeKind::Repurchased, 0)
        );
    }
    // An offer redeemed on a visit that recalls nothing: no outcome at all.
    let mut w = World::new(cust_in(Arm::Treatment), 0, 10_000);
    let out = on_visit(
        &mut w.st,
        &visit_with(50 * D, 1, "v", Some("coupon-10pct"), Some(5)),
        &w.c,
        &w.p,
    );
    assert!(out.is_empty());
}
