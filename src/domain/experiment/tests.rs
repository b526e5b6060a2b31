//! Experiments in config (validation), the policy under an arm, and exposure,
//! through the same `step::on_record_under` the pipeline calls.

use chrono::TimeZone;

use super::measure::Measures;
use super::*;
use crate::domain::allowance::AllowanceState;
use crate::domain::decide::allowance_at;
use crate::domain::event::*;
use crate::domain::policy::{Policies, PolicyConfig};
use crate::domain::state::{CustomerState, StateParams};
use crate::domain::step;

const DAY: i64 = 86_400_000;

fn sh(y: i32, m: u32, d: u32, h: u32) -> i64 {
    chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(y, m, d, h, 0, 0)
        .unwrap()
        .timestamp_millis()
}

/// WeChat 1 a day against the seed's 2 a day, all of December 2026 for brandA.
const WECHAT: &str = r#"
[[experiments]]
name = "wechat-1-vs-2"
tenant = "brandA"
start = "2026-12-01T00:00"
end = "2027-01-01T00:00"
[[experiments.arms]]
name = "control"
share = 0.5
[[experiments.arms]]
name = "one-a-day"
share = 0.5
caps.WECHAT = { limit = 1, window = "1d" }
"#;

fn config(toml_text: &str) -> PolicyConfig {
    toml::from_str(toml_text).expect("test config parses")
}

fn policies(toml_text: &str) -> Policies {
    Policies::new(&config(toml_text)).expect("valid")
}

fn error(toml_text: &str) -> (String, String) {
    Policies::new(&config(toml_text)).expect_err("invalid")
}

/// The first customers drawn into each arm of `experiment` (by id `c0`, `c1`, …).
fn customer_in(p: &Policies, experiment: &str, arm: &str) -> CustomerRef {
    let e = p
        .experiments()
        .all()
        .find(|e| e.name == experiment)
        .unwrap();
    (0..)
        .map(|i| CustomerRef::new("brandA", format!("c{i}")))
        .find(|c| e.arms[e.arm_of(c)].name == arm)
        .unwrap()
}

#[test]
fn a_valid_experiment_resolves() {
    let p = policies(WECHAT);
    let e: Vec<&Experiment> = p.experiments().all().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].start_ms, sh(2026, 12, 1, 0));
    assert_eq!(e[0].end_ms, sh(2027, 1, 1, 0));
    assert_eq!(
        e[0].keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        ["caps.WECHAT"]
    );
    assert!(PolicyConfig::default().validate().is_ok());
}

#[test]
fn shares_must_sum_to_one() {
    let (key, msg) = error(&WECHAT.replace("share = 0.5\ncaps", "share = 0.4\ncaps"));
    assert_eq!(key, "policy.experiments.wechat-1-vs-2.arms");
    assert!(msg.contains("sum to 1"), "{msg}");
}

#[test]
fn names_are_unique_and_bounded() {
    let twice = format!("{WECHAT}{}", WECHAT.replace("brandA", "brandB"));
    let (key, msg) = error(&twice);
    assert_eq!(key, "policy.experiments[1].name");
    assert!(msg.contains("unique"), "{msg}");
    let (key, msg) = error(&WECHAT.replace("wechat-1-vs-2", "WeChat 1 vs 2"));
    assert_eq!(key, "policy.experiments[0].name");
    assert!(msg.contains("a-z"), "{msg}");
    let (key, _) = error(&WECHAT.replace("one-a-day", &"x".repeat(33)));
    assert_eq!(key, "policy.experiments.wechat-1-vs-2.arms");
    // A limit on the number of experiments (their names are metric labels).
    let many: String = (0..=spec::MAX_EXPERIMENTS)
        .map(|i| {
            WECHAT
                .replace("wechat-1-vs-2", &format!("e{i}"))
                .replace("brandA", &format!("brand{i}"))
        })
        .collect();
    let (key, msg) = error(&many);
    assert_eq!(key, "policy.experiments");
    assert!(msg.contains("at most 16"), "{msg}");
    // … and of arms.
    let arm = "[[experiments.arms]]\nname = \"NAME\"\nshare = 0.125\ncaps.SMS = { limit = 1, window = \"7d\" }\n";
    let five = WECHAT
        .replace("share = 0.5\ncaps", "share = 0.25\ncaps")
        .replace("share = 0.5\n[[", "share = 0.25\n[[")
        + &arm.replace("NAME", "a")
        + &arm.replace("NAME", "b")
        + &arm.replace("NAME", "c")
        + &arm.replace("NAME", "d");
    let (key, msg) = error(&five);
    assert_eq!(key, "policy.experiments.wechat-1-vs-2.arms");
    assert!(msg.contains("2 to 4 arms"), "{msg}");
}

#[test]
fn the_control_arm_is_required_and_changes_nothing() {
    let (_, msg) = error(&WECHAT.replace(
        "name = \"control\"\nshare = 0.5\n",
        "name = \"base\"\nshare = 0.5\ncaps.SMS = { limit = 1, window = \"7d\" }\n",
    ));
    assert!(msg.contains("no arm is named `control`"), "{msg}");
    let (key, msg) = error(&WECHAT.replace(
        "name = \"control\"\nshare = 0.5\n",
        "name = \"control\"\nshare = 0.5\ncaps.SMS = { limit = 1, window = \"7d\" }\n",
    ));
    assert_eq!(key, "policy.experiments.wechat-1-vs-2.arms.control");
    assert!(msg.contains("another arm"), "{msg}");
    let (key, msg) = error(&WECHAT.replace("caps.WECHAT = { limit = 1, window = \"1d\" }\n", ""));
    assert_eq!(key, "policy.experiments.wechat-1-vs-2.arms.one-a-day");
    assert!(msg.contains("changes nothing"), "{msg}");
}

#[test]
fn an_arm_policy_is_validated_like_a_tenant_policy() {
    let (key, _) = error(&WECHAT.replace("limit = 1", "limit = 0"));
    assert_eq!(
        key,
        "policy.experiments.wechat-1-vs-2.arms.one-a-day.caps.WECHAT.limit"
    );
    let bad_throttle = WECHAT.replace(
        "caps.WECHAT = { limit = 1, window = \"1d\" }",
        "throttle.release_above = 0.3",
    );
    let (key, msg) = error(&bad_throttle);
    assert_eq!(
        key,
        "policy.experiments.wechat-1-vs-2.arms.one-a-day.throttle.release_above"
    );
    assert!(msg.contains("throttle_below"), "{msg}");
    let (key, _) = error(&WECHAT.replace("2027-01-01T00:00", "2026-11-01T00:00"));
    assert_eq!(key, "policy.experiments.wechat-1-vs-2.end");
    // Unknown keys are refused (a typo must not silently test nothing).
    assert!(toml::from_str::<PolicyConfig>(&WECHAT.replace("caps.WECHAT", "cap.WECHAT")).is_err());
}

#[test]
fn overlapping_experiments_on_the_same_key_are_refused() {
    let second = WECHAT
        .replace("wechat-1-vs-2", "wechat-3")
        .replace("one-a-day", "three")
        .replace("limit = 1", "limit = 3")
        .replace("2026-12-01", "2026-12-20")
        .replace("2027-01-01", "2027-02-01");
    let (key, msg) = error(&format!("{WECHAT}{second}"));
    assert_eq!(key, "policy.experiments.wechat-3.arms");
    assert!(
        msg.contains("`wechat-1-vs-2` and `wechat-3`")
            && msg.contains("`caps.WECHAT`")
            && msg.contains("brandA"),
        "{msg}"
    );
    // After the first ends: fine. Another tenant: fine. Another key: fine.
    let later = second.replace("2026-12-20", "2027-01-01");
    assert!(Policies::new(&config(&format!("{WECHAT}{later}"))).is_ok());
    let other_tenant = second.replace("brandA", "brandB");
    assert!(Policies::new(&config(&format!("{WECHAT}{other_tenant}"))).is_ok());
    let other_key = second.replace(
        "caps.WECHAT = { limit = 3, window = \"1d\" }",
        "caps.SMS = { limit = 1, window = \"7d\" }",
    );
    assert!(Policies::new(&config(&format!("{WECHAT}{other_key}"))).is_ok());
}

#[test]
fn the_policy_under_an_arm_has_its_overrides_while_the_experiment_runs() {
    let p = policies(WECHAT);
    let treated = customer_in(&p, "wechat-1-vs-2", "one-a-day");
    let control = customer_in(&p, "wechat-1-vs-2", "control");
    let during = sh(2026, 12, 10, 12);
    let w = Channel::Wechat.index();
    assert_eq!(p.effective(&treated, during).policy.caps[w].limit, 1);
    assert_eq!(p.effective(&control, during).policy.caps[w].limit, 2);
    assert_eq!(
        p.effective(&treated, sh(2026, 11, 30, 23)).policy.caps[w].limit,
        2
    );
    assert_eq!(
        p.effective(&treated, sh(2027, 1, 1, 0)).policy.caps[w].limit,
        2
    );
    // Another tenant is never in it.
    let other = CustomerRef::new("brandB", treated.customer.clone());
    assert!(p.effective(&other, during).assignments.is_empty());
    // The tag an output carries: the channel the experiment changes, not others.
    let tag = p
        .experiments()
        .tag_channel(&treated, Channel::Wechat, during)
        .unwrap();
    assert_eq!(
        (tag.experiment.as_str(), tag.arm.as_str()),
        ("wechat-1-vs-2", "one-a-day")
    );
    assert_eq!(
        p.experiments().tag_channel(&treated, Channel::Sms, during),
        None
    );
    assert_eq!(p.experiments().tag_recall(&treated, during), None);
}

/// A customer driven as the pipeline drives one: the effective policy at each
/// event's time, `step::on_record_under`.
struct Driven<'p> {
    p: &'p Policies,
    who: CustomerRef,
    state: CustomerState,
    sp: StateParams,
    n: i64,
    exposed: Vec<ArmTag>,
}

impl<'p> Driven<'p> {
    fn new(p: &'p Policies, who: CustomerRef) -> Self {
        Driven {
            p,
            who,
            state: CustomerState::default(),
            sp: StateParams::default(),
            n: 0,
            exposed: Vec::new(),
        }
    }

    fn apply(&mut self, body: EventBody, t: i64) {
        self.n += 1;
        let (ev, src) = crate::domain::decide_tests::record(&self.who, self.n, body, t);
        let eff = self.p.effective(&self.who, t);
        let (.., exposed) = step::on_record_under(&mut self.state, &ev, src, &eff, &self.sp);
        self.exposed.extend(exposed);
    }

    /// The customer's timer at `now`: the triggers it fired.
    fn timer(&mut self, now: i64) -> Vec<crate::domain::recall::RecallTrigger> {
        let eff = self.p.effective(&self.who, now);
        let (step, exposed) = step::on_timer_under(&mut self.state, &self.who, &eff, &self.sp, now);
        self.exposed.extend(exposed);
        step.fired
            .into_iter()
            .filter_map(|f| match f {
                crate::domain::recall::Fired::Trigger(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    fn send(&mut self, c: Channel, t: i64) {
        self.apply(
            EventBody::Send {
                channel: c,
                message_id: format!("m{}", self.n),
                campaign_id: None,
                purpose: Purpose::Marketing,
                cost: None,
            },
            t,
        );
    }

    fn open(&mut self, c: Channel, t: i64) {
        let message_id = format!("m{}", self.n);
        let campaign_id = None;
        self.apply(
            EventBody::Open {
                channel: c,
                message_id,
                campaign_id,
            },
            t,
        );
    }

    fn click(&mut self, c: Channel, t: i64) {
        let message_id = format!("m{}", self.n);
        let campaign_id = None;
        self.apply(
            EventBody::Click {
                channel: c,
                message_id,
                campaign_id,
            },
            t,
        );
    }

    fn reply(&mut self, c: Channel, class: ReplyClass, t: i64) {
        let body = EventBody::Reply {
            channel: c,
            message_id: None,
            class,
        };
        self.apply(body, t);
    }

    fn visit(&mut self, t: i64) {
        self.apply(
            EventBody::Visit {
                visit_type: VisitType::Treatment,
                treatment: Some("BOTOX".into()),
                amount: 100_000,
                currency: "CNY".into(),
                offer_code: None,
                discount: None,
            },
            t,
        );
    }
}

#[test]
fn a_customer_is_exposed_when_the_arm_first_changes_a_decision() {
    let p = policies(WECHAT);
    let t = sh(2026, 12, 10, 12);
    for arm in ["one-a-day", "control"] {
        let mut d = Driven::new(&p, customer_in(&p, "wechat-1-vs-2", arm));
        // An SMS send changes nothing the experiment touches.
        d.send(Channel::Sms, t);
        assert!(d.state.exposures.is_empty(), "{arm}");
        // The first WeChat send: 1 a day is full, 2 a day is not.
        d.send(Channel::Wechat, t + 60_000);
        let eff = p.effective(&d.who, t + 60_000);
        let a = allowance_at(&d.state, Channel::Wechat, &eff.policy, &d.sp, t + 60_000);
        let expected = if arm == "control" {
            AllowanceState::Open
        } else {
            AllowanceState::Capped
        };
        assert_eq!(a.state, expected, "{arm}");
        // Both arms are exposed at that moment (the control by the
        // counterfactual), and the exposing send is the first one measured
        // (the SMS send before it is not).
        let wechat_cost = p.of("brandA").costs[Channel::Wechat.index()];
        assert_eq!(
            d.state.exposures,
            vec![Exposure {
                experiment: "wechat-1-vs-2".into(),
                arm: arm.into(),
                at: t + 60_000,
                measures: Measures {
                    sends: [1, 0, 0, 0, 0],
                    marketing_cost: wechat_cost,
                    ..Default::default()
                },
            }]
        );
        assert_eq!(d.exposed.len(), 1);
        // Once only; later sends are measured.
        d.send(Channel::Wechat, t + 2 * 60_000);
        d.send(Channel::Wechat, t + DAY);
        assert_eq!(d.state.exposures.len(), 1);
        assert_eq!(d.exposed.len(), 1);
        assert_eq!(d.state.exposures[0].measures.sends, [3, 0, 0, 0, 0]);
    }
}

/// Measures count what an exposed customer does from the exposure to the
/// experiment's end, each applied record once.
#[test]
fn measures_count_from_exposure_to_the_end() {
    let p = policies(WECHAT);
    let t = sh(2026, 12, 10, 12);
    let mut d = Driven::new(&p, customer_in(&p, "wechat-1-vs-2", "one-a-day"));
    d.open(Channel::Wechat, t - DAY); // before exposure: not counted
    d.send(Channel::Wechat, t);
    d.open(Channel::Wechat, t + 60_000);
    d.click(Channel::Wechat, t + 120_000);
    d.reply(Channel::Sms, ReplyClass::Unsubscribe, t + 180_000);
    d.visit(t + DAY);
    // A detractor's answer: NPS 3 is 30 points of 100.
    d.apply(
        EventBody::Feedback {
            kind: FeedbackKind::Nps,
            score: 3,
            visit_event_id: None,
            channel: None,
        },
        t + 2 * DAY,
    );
    // A redelivered record is not applied again, so not counted again.
    let n = d.n;
    d.n = 0;
    d.open(Channel::Wechat, t - DAY);
    d.n = n;
    d.visit(sh(2027, 1, 2, 12)); // after the end: not counted
    let m = &d.state.exposures[0].measures;
    assert_eq!(
        *m,
        Measures {
            sends: [1, 0, 0, 0, 0],
            opens: 1,
            clicks: 1,
            unsubscribes: 1,
            visits: 1,
            revenue: 100_000,
            marketing_cost: p.of("brandA").costs[Channel::Wechat.index()],
            feedback: 1,
            satisfaction: 30,
            detractors: 1,
            ..Default::default()
        }
    );
}

/// A stopped arm: its exposed customer gets the control's policy from the
/// stop on, announced once per channel the experiment changes; a customer of
/// the arm not yet exposed is not exposed any more.
#[test]
fn a_stopped_arm_switches_its_customers_to_the_control() {
    let p = policies(WECHAT);
    let e = p.experiments().all().next().unwrap();
    let t = sh(2026, 12, 10, 12);
    let mut d = Driven::new(&p, customer_in(&p, "wechat-1-vs-2", "one-a-day"));
    d.send(Channel::Wechat, t);
    assert_eq!(d.state.exposures.len(), 1);
    let capped = |d: &Driven, at| {
        let eff = p.effective(&d.who, at);
        allowance_at(&d.state, Channel::Wechat, &eff.policy, &d.sp, at).state
    };
    assert_eq!(capped(&d, t + 60_000), AllowanceState::Capped);

    let stop = t + 3_600_000;
    e.stop(e.arm_index("one-a-day").unwrap(), stop);
    // Before the stop the arm still applies; from it on, the control's 2 a day.
    assert_eq!(capped(&d, stop - 1), AllowanceState::Capped);
    assert_eq!(capped(&d, stop), AllowanceState::Open);
    let outbox = d.state.outbox.len();
    d.open(Channel::Sms, stop + 60_000);
    let announced: Vec<_> = d.state.outbox[outbox..]
        .iter()
        .filter_map(|o| match o {
            crate::domain::output::Output::Throttle(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert_eq!(announced[0].channel, Some(Channel::Wechat));
    assert_eq!(announced[0].state, AllowanceState::Open);
    assert_eq!(announced[0].reason, super::switch::SWITCH_REASON);
    assert_eq!(
        d.state.exposures[0].measures.switched_at,
        Some(stop + 60_000)
    );
    // Once.
    let outbox = d.state.outbox.len();
    d.open(Channel::Sms, stop + 120_000);
    assert_eq!(d.state.outbox.len(), outbox);

    // Another customer of the arm, never exposed before the stop, is not now.
    let mut other = Driven::new(&p, {
        let first = d.who.clone();
        (0..)
            .map(|i| CustomerRef::new("brandA", format!("x{i}")))
            .find(|c| *c != first && e.arms[e.arm_of(c)].name == "one-a-day")
            .unwrap()
    });
    other.send(Channel::Wechat, stop + DAY);
    other.send(Channel::Wechat, stop + DAY + 60_000);
    assert!(other.state.exposures.is_empty());
}

#[test]
fn nobody_is_exposed_outside_the_experiment() {
    let p = policies(WECHAT);
    let mut d = Driven::new(&p, customer_in(&p, "wechat-1-vs-2", "one-a-day"));
    d.send(Channel::Wechat, sh(2026, 11, 20, 12));
    d.send(Channel::Wechat, sh(2027, 1, 2, 12));
    assert!(d.state.exposures.is_empty());
}

const RECALL: &str = r#"
[[experiments]]
name = "early-at-risk"
tenant = "brandA"
start = "2026-01-01T00:00"
end = "2028-01-01T00:00"
[[experiments.arms]]
name = "control"
share = 0.8
[[experiments.arms]]
name = "early"
share = 0.2
recall.at_risk_factor = 1.1
"#;

#[test]
fn recall_offsets_expose_at_the_earlier_due_time() {
    let p = policies(RECALL);
    let mut d = Driven::new(&p, customer_in(&p, "early-at-risk", "early"));
    let visit = sh(2026, 3, 1, 10);
    d.visit(visit);
    // BOTOX: 120 days; AT_RISK at 1.1 × (arm) or 1.2 × (control).
    let arm_due = visit + 132 * DAY;
    let eff = p.effective(&d.who, visit);
    let due = crate::domain::recall::next_due(&d.state.recall, &d.state.visits, &eff.policy.lapse);
    assert_eq!(due.unwrap().due_at, arm_due);
    assert!(
        d.state.exposures.is_empty(),
        "the schedules differ only from day 132"
    );
    d.send(Channel::Sms, visit + 100 * DAY);
    assert!(d.state.exposures.is_empty());
    d.send(Channel::Sms, visit + 140 * DAY);
    assert_eq!(d.state.exposures[0].at, arm_due);
    assert_eq!(d.state.exposures[0].arm, "early");
    let tag = p.experiments().tag_recall(&d.who, visit).unwrap();
    assert_eq!(tag.arm, "early");
}

const OFFERS: &str = r#"
[lapse]
holdout_share = 0.0
[[experiments]]
name = "richer-coupon"
tenant = "brandA"
start = "2026-01-01T00:00"
end = "2028-01-01T00:00"
[[experiments.arms]]
name = "control"
share = 0.5
[[experiments.arms]]
name = "coupon-20"
share = 0.5
recall.offers.AT_RISK = "coupon-20pct"
recall.channel_preference.AT_RISK = ["EMAIL", "SMS"]
"#;

/// An arm's offer and channel preference for a segment: its triggers say
/// them, and both arms are exposed when such a trigger fires (the control by
/// the counterfactual), not before.
#[test]
fn an_offer_arm_shapes_its_segments_triggers_and_exposes_when_one_fires() {
    let p = policies(OFFERS);
    let visit = sh(2026, 3, 1, 10);
    let due = visit + 144 * DAY; // BOTOX 120 days × 1.2: AT_RISK
    for (arm, offer, channel) in [
        ("coupon-20", "coupon-20pct", Channel::Email),
        ("control", "reminder-coupon-5pct", Channel::Wechat),
    ] {
        let mut d = Driven::new(&p, customer_in(&p, "richer-coupon", arm));
        d.visit(visit);
        // WeChat is the best-engaged channel: an open there.
        d.open(Channel::Wechat, visit + DAY);
        assert!(d.state.exposures.is_empty(), "{arm}");
        let fired = d.timer(due);
        assert_eq!(fired.len(), 1, "{arm}");
        let t = &fired[0];
        assert_eq!(t.segment, crate::domain::lapse::Segment::AtRisk);
        assert_eq!(t.offer_tier, offer, "{arm}");
        assert_eq!(t.recommended_channel, Some(channel), "{arm}: {t:?}");
        assert_eq!(d.state.exposures.len(), 1, "{arm}");
        assert_eq!(d.state.exposures[0].at, due);
        assert_eq!(d.state.exposures[0].arm, arm);
        // The trigger is counted in the arm's measures.
        assert_eq!(d.state.exposures[0].measures.triggers, 1);
    }
    // The preference only reorders: SMS second, the engaged WeChat after.
    let mut d = Driven::new(&p, customer_in(&p, "richer-coupon", "coupon-20"));
    d.visit(visit);
    d.open(Channel::Wechat, visit + DAY);
    let t = d.timer(due).remove(0);
    assert_eq!(t.fallback_channels[0], Channel::Sms, "{t:?}");
    // The customer comes back with the coupon (RECALLED, its incentive), then
    // again, paying (REPURCHASED): both in the arm's measures.
    let redeem = |discount| EventBody::Visit {
        visit_type: VisitType::Treatment,
        treatment: Some("BOTOX".into()),
        amount: 100_000,
        currency: "CNY".into(),
        offer_code: Some("coupon-20pct".into()),
        discount,
    };
    d.apply(redeem(Some(20_000)), due + 3 * DAY);
    d.apply(redeem(None), due + 60 * DAY);
    let m = &d.state.exposures[0].measures;
    assert_eq!(
        (m.recalled, m.incentive_cost, m.repurchased),
        (1, 20_000, 1)
    );
    assert_eq!((m.visits, m.revenue), (2, 200_000));
}

/// An outcome belongs to a recall experiment while it runs and for its
/// outcome tail after (the longer of attribution window and dormant delay).
#[test]
fn outcomes_carry_the_recall_experiment_until_its_tail_ends() {
    let p = policies(RECALL);
    let x = p.experiments();
    let who = customer_in(&p, "early-at-risk", "early");
    let end = sh(2028, 1, 1, 0);
    assert_eq!(x.tag_outcome(&who, sh(2025, 12, 31, 12)), None);
    assert_eq!(x.tag_outcome(&who, end - 1).unwrap().arm, "early");
    assert_eq!(x.tag_outcome(&who, end + 59 * DAY).unwrap().arm, "early");
    assert_eq!(x.tag_outcome(&who, end + 60 * DAY), None);
}
