//! Issue 4 end to end, in event-time mode (time follows the event watermark,
//! so months of clinic life pass in seconds): a population with known visit
//! histories yields exactly the expected recall triggers and outcomes; a late
//! visit retracts; a holdout tenant's triggers are recorded, not sent; and with
//! two instances, a kill -9 while timers are due loses no trigger.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use common::stack::*;
use common::*;
use lapse::codec::{Framing, SchemaSet, RECALL_OUTCOME, RECALL_TRIGGER};
use lapse::domain::event::*;
use lapse::domain::lapse::Stage;
use lapse::domain::recall::trigger_id;

const TRIGGERS: &str = "recall.triggers";
const OUTCOMES: &str = "recall.outcomes";

type Rec = BTreeMap<String, Value>;

fn decode(schema_name: &str, payload: &[u8]) -> Rec {
    let schemas = SchemaSet::load(std::path::Path::new(&schemas_dir())).unwrap();
    let schema = schemas.by_name(schema_name).unwrap();
    let body = lapse::codec::parse_frame(payload).expect("framed").body();
    let v = apache_avro::from_avro_datum(schema, &mut &body[..], None).expect("decodes");
    let Value::Record(f) = v else { panic!() };
    f.into_iter().collect()
}

fn txt(r: &Rec, k: &str) -> String {
    match &r[k] {
        Value::String(s) | Value::Enum(_, s) => s.clone(),
        Value::Union(_, b) => match b.as_ref() {
            Value::String(s) | Value::Enum(_, s) => s.clone(),
            Value::Null => "null".into(),
            o => format!("{o:?}"),
        },
        o => format!("{o:?}"),
    }
}

fn num(r: &Rec, k: &str) -> f64 {
    match &r[k] {
        Value::Int(i) => *i as f64,
        Value::Long(i) | Value::TimestampMillis(i) => *i as f64,
        Value::Double(d) => *d,
        Value::Union(_, b) => match b.as_ref() {
            Value::Int(i) => *i as f64,
            Value::Long(i) | Value::TimestampMillis(i) => *i as f64,
            Value::Double(d) => *d,
            _ => f64::NAN,
        },
        _ => f64::NAN,
    }
}

fn visit_with(
    c: &CustomerRef,
    id: &str,
    at: i64,
    amount: i64,
    treatment: &str,
) -> (Event, Option<&'static str>) {
    (visit(c, id, at, amount, Some(treatment)), None)
}

struct Clock<'a> {
    s: &'a Stack,
    p: Producer,
    group: String,
}

impl Clock<'_> {
    /// Advances event time to `at` (a SERVICE send of a dedicated customer) and
    /// waits until it is applied and every timer due by then has fired.
    async fn tick(&mut self, at: i64) {
        self.s.advance_event_time(&self.p, &self.group, at).await;
    }

    async fn run_to(&mut self, from: i64, to: i64, step: i64) {
        let mut d = from;
        while d <= to {
            self.tick(day(d)).await;
            d += step;
        }
    }
}

const EVENT_TIME: &str = "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"20ms\"\n";

#[tokio::test]
async fn a_population_with_known_histories_yields_exactly_the_expected_triggers_and_outcomes() {
    let s = Stack::start().await;
    s.broker.create_topic(TRIGGERS, 3).await;
    s.broker.create_topic(OUTCOMES, 3).await;
    let hv = cust("clinicA", "hv"); // high value, BOTOX every 120 days
    let lv = cust("clinicA", "lv"); // low value, LASER every 30 days
    let back = cust("clinicA", "back"); // one FILLER visit, comes back after AT_RISK
    let late = cust("clinicA", "late"); // a visit reported late: the trigger is retracted
    let held = cust("clinicH", "held"); // a tenant whose customers are all held out
    let history = vec![
        visit_with(&hv, "hv1", day(0), 1_500_000, "BOTOX"),
        visit_with(&hv, "hv2", day(120), 1_500_000, "BOTOX"),
        visit_with(&hv, "hv3", day(240), 1_500_000, "BOTOX"),
        visit_with(&lv, "lv1", day(180), 50_000, "LASER"),
        visit_with(&lv, "lv2", day(210), 50_000, "LASER"),
        visit_with(&lv, "lv3", day(240), 50_000, "LASER"),
        visit_with(&back, "b1", day(230), 300_000, "FILLER"),
        visit_with(&late, "l1", day(240), 80_000, "SKIN_CARE"),
        visit_with(&held, "h1", day(240), 80_000, "SKIN_CARE"),
    ];
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &history, |_| Framing::SingleObject).await;
    let cfg = s.config_with(
        "recall",
        "",
        &format!("{EVENT_TIME}[policy.lapse]\nholdout_share = 0.0\n[policy.tenants.clinicH.lapse]\nholdout_share = 1.0\n"),
    );
    let mut lapse = s.spawn("g-recall", &cfg);
    s.wait_caught_up("g-recall", LONG).await;
    let mut clock = Clock {
        s: &s,
        p: Producer::new(&s.broker.bootstrap()),
        group: "g-recall".into(),
    };

    // late: SKIN_CARE, one visit → 30 d default; AT_RISK at day 276. Let it fire,
    // then report a visit from day 260 (before the trigger): RETRACTED.
    clock.run_to(244, 280, 6).await;
    // Each late visit is applied before the next tick: ticks are sends, on
    // another topic, and a tick applied first could fire a later stage.
    produce_events(
        &p,
        &[visit_with(&late, "l2", day(260), 10_000, "SKIN_CARE")],
        |_| Framing::SingleObject,
    )
    .await;
    s.wait_caught_up("g-recall", LONG).await;
    // back: FILLER default 270 d → AT_RISK at day 230 + 324 = 554; visits on day 570.
    clock.run_to(286, 566, 6).await;
    produce_events(
        &p,
        &[visit_with(&back, "b2", day(570), 420_000, "FILLER")],
        |_| Framing::SingleObject,
    )
    .await;
    s.wait_caught_up("g-recall", LONG).await;
    clock.run_to(572, 620, 6).await;

    let triggers: Vec<Rec> = distinct_by_id(
        consume_to_end(&s.broker.bootstrap(), TRIGGERS, LONG).await,
        |p| txt(&decode(RECALL_TRIGGER, p), "trigger_id"),
    )
    .iter()
    .map(|r| decode(RECALL_TRIGGER, r.payload.as_deref().unwrap()))
    .collect();
    let outcomes: Vec<Rec> = distinct_by_id(
        consume_to_end(&s.broker.bootstrap(), OUTCOMES, LONG).await,
        |p| txt(&decode(RECALL_OUTCOME, p), "outcome_id"),
    )
    .iter()
    .map(|r| decode(RECALL_OUTCOME, r.payload.as_deref().unwrap()))
    .collect();
    let summary: Vec<String> = triggers
        .iter()
        .map(|t| {
            format!(
                "{} {} {} #{}",
                txt(t, "customer_id"),
                txt(t, "stage"),
                txt(t, "segment"),
                num(t, "attempt")
            )
        })
        .collect();

    let of = |c: &str| {
        triggers
            .iter()
            .filter(|t| txt(t, "customer_id") == c)
            .collect::<Vec<_>>()
    };
    // hv: learned 120 d interval, high value: AT_RISK, LAPSED, two follow-ups, all HIGH_VALUE_LAPSED after AT_RISK.
    let hv_t = of("hv");
    let stages: Vec<(String, String, f64)> = hv_t
        .iter()
        .map(|t| (txt(t, "stage"), txt(t, "segment"), num(t, "attempt")))
        .collect();
    assert_eq!(
        stages,
        vec![
            ("AT_RISK".into(), "AT_RISK".into(), 1.0),
            ("LAPSED".into(), "HIGH_VALUE_LAPSED".into(), 1.0),
            ("FOLLOW_UP".into(), "HIGH_VALUE_LAPSED".into(), 1.0),
            ("FOLLOW_UP".into(), "HIGH_VALUE_LAPSED".into(), 2.0),
        ],
        "{summary:#?}"
    );
    let start = day(240);
    for (t, (stage, attempt, due_day)) in hv_t.iter().zip([
        (Stage::AtRisk, 1, 240 + 144),
        (Stage::Lapsed, 1, 240 + 180),
        (Stage::FollowUp, 1, 240 + 210),
        (Stage::FollowUp, 2, 240 + 240),
    ]) {
        assert_eq!(
            txt(t, "trigger_id"),
            trigger_id(&hv, start, stage, attempt),
            "deterministic trigger id"
        );
        assert_eq!(num(t, "due_at") as i64, day(due_day), "{stage:?} due");
        let fired = num(t, "fired_at") as i64;
        assert!(
            fired >= day(due_day) && fired < day(due_day) + 6 * DAY,
            "fired within one tick of due"
        );
        assert_eq!(num(t, "expected_interval_days"), 120.0);
        assert_eq!(num(t, "lifetime_value"), 4_500_000.0);
        assert_eq!(txt(t, "last_treatment"), "BOTOX");
        assert_eq!(txt(t, "arm"), "TREATMENT");
        assert_eq!(txt(t, "recommended_channel"), "WECHAT");
    }
    assert!(
        format!("{:?}", hv_t[1]["fallback_channels"]).contains("PHONE"),
        "phone is offered for high value"
    );
    assert_eq!(txt(hv_t[1], "offer_tier"), "vip-care-call");

    // lv: 30 d interval, standard value: LOW_VALUE_LAPSED, no PHONE anywhere.
    let lv_t = of("lv");
    let stages: Vec<(String, String)> = lv_t
        .iter()
        .map(|t| (txt(t, "stage"), txt(t, "segment")))
        .collect();
    assert_eq!(
        stages,
        vec![
            ("AT_RISK".into(), "AT_RISK".into()),
            ("LAPSED".into(), "LOW_VALUE_LAPSED".into()),
            ("FOLLOW_UP".into(), "LOW_VALUE_LAPSED".into()),
            ("FOLLOW_UP".into(), "LOW_VALUE_LAPSED".into()),
        ],
        "{summary:#?}"
    );
    for t in &lv_t {
        assert!(
            !format!("{:?}", t["fallback_channels"]).contains("PHONE")
                && txt(t, "recommended_channel") != "PHONE"
        );
    }

    // back: AT_RISK fired, then the visit → RECALLED with revenue and time to return.
    let back_t = of("back");
    assert_eq!(back_t.len(), 1, "{summary:#?}");
    assert_eq!(txt(back_t[0], "stage"), "AT_RISK");
    let recalled: Vec<&Rec> = outcomes
        .iter()
        .filter(|o| txt(o, "kind") == "RECALLED")
        .collect();
    assert_eq!(recalled.len(), 1, "{outcomes:#?}");
    assert_eq!(txt(recalled[0], "customer_id"), "back");
    assert_eq!(txt(recalled[0], "trigger_id"), txt(back_t[0], "trigger_id"));
    assert_eq!(num(recalled[0], "revenue"), 420_000.0);
    let ttr = num(recalled[0], "days_to_return");
    assert!(ttr > 0.0 && ttr <= 16.0, "{ttr}");

    // late: its AT_RISK trigger is retracted by the visit that happened before it.
    let late_t = of("late");
    assert!(!late_t.is_empty(), "{summary:#?}");
    let retracted: Vec<&Rec> = outcomes
        .iter()
        .filter(|o| txt(o, "kind") == "RETRACTED")
        .collect();
    assert_eq!(retracted.len(), 1, "{outcomes:#?}");
    assert_eq!(
        txt(retracted[0], "trigger_id"),
        txt(late_t[0], "trigger_id")
    );

    // lv reached DORMANT: NOT_RECALLED for its last trigger.
    let not_recalled: Vec<&Rec> = outcomes
        .iter()
        .filter(|o| txt(o, "kind") == "NOT_RECALLED")
        .collect();
    assert!(
        not_recalled
            .iter()
            .any(|o| txt(o, "customer_id") == "lv"
                && txt(o, "trigger_id") == txt(lv_t[3], "trigger_id")),
        "{outcomes:#?}"
    );

    // The held-out tenant: no trigger sent, but its stages are recorded.
    assert!(
        of("held").is_empty(),
        "holdout triggers are never published"
    );
    assert!(
        metric(
            &lapse,
            "lapse_recall_stage_entries_total",
            &[("tenant", "clinicH"), ("arm", "holdout")]
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            &lapse,
            "lapse_recall_triggers_total",
            &[("arm", "treatment")]
        )
        .await
            >= 10.0
    );

    // Exactly once: no trigger id twice.
    let mut ids: Vec<String> = triggers.iter().map(|t| txt(t, "trigger_id")).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "a stage fires once per episode");
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());

    // Issue 17: `lapse backtest` of the live policy over this history (late
    // visits, retraction, holdout) publishes exactly the same triggers and outcomes.
    let (_, triggers, outcomes) = s.backtest_matches_live(&cfg).await;
    assert!(
        triggers >= 10 && outcomes >= 2,
        "{triggers} triggers, {outcomes} outcomes compared"
    );
}

#[tokio::test]
async fn kill9_of_one_of_two_instances_while_timers_are_due_loses_no_trigger() {
    let s = Stack::start().await;
    s.broker.create_topic(TRIGGERS, 3).await;
    s.broker.create_topic(OUTCOMES, 3).await;
    let n = 300;
    let mut history = Vec::new();
    for i in 0..n {
        let c = cust("clinicK", &format!("k{i:03}"));
        history.push(visit_with(&c, &format!("v{i}"), day(100), 60_000, "LASER"));
    }
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &history, |_| Framing::SingleObject).await;
    // One timer per claim, so firing takes a while and the kill lands in the middle.
    let cfg = s.config_with(
        "pair",
        "",
        "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"20ms\"\nclaim_limit = 1\n[policy.lapse]\nholdout_share = 0.0\n",
    );
    let mut a = s.spawn("g-pair", &cfg);
    let mut b = s.spawn("g-pair", &cfg);
    s.wait_caught_up("g-pair", LONG).await;
    // LASER: 30 d → AT_RISK at day 136. One tick past it makes all of them due at once.
    let clock = cust("clinicK", "zz-clock");
    produce_events(
        &p,
        &[(
            send(&clock, "t1", day(140), Channel::Email, Purpose::Service),
            None,
        )],
        |_| Framing::SingleObject,
    )
    .await;
    // Kill one instance as soon as the first triggers are produced, mid-firing.
    // (Watched through /metrics: a fresh consumer per poll is too slow on a busy machine.)
    let produced =
        async |p: &LapseProcess| metric(p, "lapse_outputs_total", &[("kind", "trigger")]).await;
    wait_until(
        LONG,
        Duration::from_millis(5),
        "the first trigger",
        async || produced(&a).await + produced(&b).await >= 1.0,
    )
    .await;
    let by_a = produced(&a).await;
    a.kill9();
    let at_kill = by_a + produced(&b).await;
    assert!(
        at_kill < n as f64,
        "the kill must land while timers are still due ({at_kill} of {n} fired)"
    );
    // In event time a dead instance's leases expire when event time moves on.
    produce_events(
        &p,
        &[(
            send(&clock, "t2", day(141), Channel::Email, Purpose::Service),
            None,
        )],
        |_| Framing::SingleObject,
    )
    .await;
    // Exact repeats are allowed, so n records need not be n triggers: read
    // until n distinct trigger ids have arrived (or the time is up).
    let deadline = Instant::now() + LONG;
    let mut want = n;
    let by_id = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = consume_up_to(&s.broker.bootstrap(), TRIGGERS, want, left).await;
        let mut by_id: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for r in &got {
            let t = decode(RECALL_TRIGGER, r.payload.as_deref().unwrap());
            by_id
                .entry(txt(&t, "trigger_id"))
                .or_default()
                .push(r.payload.clone().unwrap());
        }
        if by_id.len() >= n || got.len() < want || left.is_zero() {
            break by_id;
        }
        want = got.len() + (n - by_id.len());
    };
    assert_eq!(by_id.len(), n, "every customer's AT_RISK trigger appears");
    for (id, copies) in &by_id {
        assert!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "duplicates of {id} must be exact repeats"
        );
    }
    for i in 0..n {
        let c = cust("clinicK", &format!("k{i:03}"));
        assert!(by_id.contains_key(&trigger_id(&c, day(100), Stage::AtRisk, 1)));
    }
    b.sigterm();
    assert!(b.wait_exit(Duration::from_secs(30)).await.success());
}

/// Issue 13 item 6: states whose timers are missing (written before lapse kept
/// timers, or the timer keys lost) get them back from `lapse sweep-timers`,
/// exactly as the pipeline had scheduled them.
#[tokio::test]
async fn sweep_timers_restores_the_timers_of_existing_states() {
    let s = Stack::start().await;
    let events = population("sweep", 60, 4);
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    let cfg = s.config("one", "");
    let mut lapse = s.spawn("g-sweep-run", &cfg);
    s.wait_caught_up("g-sweep-run", LONG).await;
    s.wait_no_timer_due(LONG).await;
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
    s.sweep_restores_deleted_timers(&cfg, 60).await;
}

/// Issue 16, best contact hours: a customer who opens in the evening gets a
/// trigger whose `send_after` is the next evening hour, not the firing time,
/// and the backtest agrees (the allowance API's side: tests/throttle.rs).
#[tokio::test]
async fn a_trigger_says_when_to_send_from_the_customers_active_hours() {
    use chrono::{TimeZone, Timelike};
    let s = Stack::start().await;
    s.broker.create_topic(TRIGGERS, 3).await;
    s.broker.create_topic(OUTCOMES, 3).await;
    let eve = cust("clinicE", "eve"); // opens WeChat at 20:15 every other evening
    let pop = cust("clinicE", "pop"); // no engagement: the population's hours
    let mut history = vec![
        visit_with(&eve, "e1", day(0), 80_000, "SKIN_CARE"),
        visit_with(&pop, "p1", day(0), 80_000, "SKIN_CARE"),
    ];
    for d in (24..=34).step_by(2) {
        let at = day(d) + 8 * 3_600_000 + 15 * 60_000;
        history.push((open(&eve, &format!("eo{d}"), at, Channel::Wechat), None));
    }
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &history, |_| Framing::SingleObject).await;
    let cfg = s.config_with(
        "hours",
        "",
        &format!("{EVENT_TIME}[policy.lapse]\nholdout_share = 0.0\n"),
    );
    let mut lapse = s.spawn("g-hours", &cfg);
    s.wait_caught_up("g-hours", LONG).await;
    let mut clock = Clock {
        s: &s,
        p: Producer::new(&s.broker.bootstrap()),
        group: "g-hours".into(),
    };
    // SKIN_CARE, one visit: 30 d default, AT_RISK due on day 36 at noon.
    clock.run_to(35, 37, 1).await;

    let triggers: Vec<Rec> =
        consume_up_to(&s.broker.bootstrap(), TRIGGERS, 100, Duration::from_secs(5))
            .await
            .iter()
            .map(|r| decode(RECALL_TRIGGER, r.payload.as_deref().unwrap()))
            .collect();
    let local = |ms: i64| {
        chrono_tz::Asia::Shanghai
            .timestamp_millis_opt(ms)
            .unwrap()
            .naive_local()
    };
    let of = |c: &str| {
        triggers
            .iter()
            .find(|t| txt(t, "customer_id") == c)
            .unwrap_or_else(|| panic!("no trigger for {c}: {triggers:#?}"))
    };
    let t = of("eve");
    assert_eq!(txt(t, "stage"), "AT_RISK");
    assert_eq!(txt(t, "recommended_channel"), "WECHAT");
    let fired = num(t, "fired_at") as i64;
    let after = num(t, "send_after") as i64;
    assert_eq!(local(fired).hour(), 12, "fired at the noon tick");
    // Good hours 19–21 (opens at 20:xx, smoothed): 19:00 the same day.
    assert_eq!(
        local(after),
        local(fired).date().and_hms_opt(19, 0, 0).unwrap(),
        "{t:#?}"
    );
    // No engagement of their own: any waking hour (the default population), so at once.
    let t = of("pop");
    if txt(t, "recommended_channel") != "null" {
        assert_eq!(num(t, "send_after") as i64, num(t, "fired_at") as i64);
    } else {
        assert_eq!(txt(t, "send_after"), "null");
    }

    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
    let (_, triggers, _) = s.backtest_matches_live(&cfg).await;
    assert_eq!(triggers, 2, "the backtest decides the same send_after");
}
