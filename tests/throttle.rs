//! Issue 3 end to end: frequency caps, click-rate throttling and reply
//! suppression published to `engagement.throttle`, on a real Redis and broker.
//! (The policy arithmetic itself is covered table-driven and by property tests
//! in `src/domain/decide_tests.rs`.)

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::types::Value;
use chrono::{Datelike, TimeZone, Timelike};
use common::stack::*;
use common::*;
use lapse::codec::{Framing, SchemaSet, THROTTLE_EVENT};
use lapse::domain::event::*;

const H: i64 = 3_600_000;
const THROTTLE: &str = "engagement.throttle";

fn shanghai(y: i32, m: u32, d: u32, h: u32) -> i64 {
    chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(y, m, d, h, 0, 0)
        .unwrap()
        .timestamp_millis()
}

/// A decoded throttle event: field name → value.
type Decision = BTreeMap<String, Value>;

fn decode(payload: &[u8]) -> Decision {
    let schemas = SchemaSet::load(std::path::Path::new(&schemas_dir())).unwrap();
    let schema = schemas.by_name(THROTTLE_EVENT).unwrap();
    // Confluent framing: the harness runs lapse with a schema registry.
    let frame = lapse::codec::parse_frame(payload).expect("a framed record");
    assert!(
        matches!(frame, lapse::codec::Frame::Confluent { .. }),
        "{frame:?}"
    );
    let v = apache_avro::from_avro_datum(schema, &mut frame.body(), None)
        .expect("decodes as ThrottleEvent");
    let Value::Record(fields) = v else {
        panic!("not a record")
    };
    fields.into_iter().collect()
}

fn text(d: &Decision, k: &str) -> String {
    match &d[k] {
        Value::String(s) => s.clone(),
        Value::Enum(_, s) => s.clone(),
        Value::Union(_, b) => match b.as_ref() {
            Value::String(s) | Value::Enum(_, s) => s.clone(),
            Value::Null => String::new(),
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}

fn millis(d: &Decision, k: &str) -> Option<i64> {
    match &d[k] {
        Value::TimestampMillis(t) | Value::Long(t) => Some(*t),
        Value::Union(_, b) => match b.as_ref() {
            Value::TimestampMillis(t) | Value::Long(t) => Some(*t),
            _ => None,
        },
        _ => None,
    }
}

/// Distinct throttle decisions (by decision id, in first-seen order), once at
/// least `at_least` of them are on the topic. The contract allows a decision to
/// be published more than once only as an exact repeat: checked here.
/// The latest instant at or before `at` between 10:00 and 14:00 in the
/// tenants' time zone (Asia/Shanghai, UTC+8, no daylight saving), to the
/// second: at least 4 hours of quiet-hours-free day before and after it for
/// every channel, and at most 20 hours back, so a one-day cap from it is
/// still in force. (`now - 2h` made a test's decisions depend on the time of
/// day it ran: a cap's allowed_from inside PHONE's quiet hours is moved past
/// them, and a later touch then moves nothing.)
fn midday_before(at: i64) -> i64 {
    const DAY: i64 = 24 * H;
    let local = at + 8 * H;
    let of_day = local.rem_euclid(DAY);
    let t = if of_day < 10 * H {
        at - of_day - 10 * H - 1000
    } else if of_day >= 14 * H {
        at - (of_day - 14 * H) - 1000
    } else {
        at
    };
    t / 1000 * 1000
}

async fn throttle_events(s: &Stack, at_least: usize) -> Vec<(String, Decision)> {
    let bootstrap = s.broker.bootstrap();
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        &format!("{at_least} distinct throttle decisions"),
        async || {
            let got = consume_up_to(&bootstrap, THROTTLE, 10_000, Duration::from_secs(3)).await;
            let out: Vec<(String, Decision)> =
                distinct_by_id(got, |p| text(&decode(p), "decision_id"))
                    .into_iter()
                    .map(|r| {
                        let d = decode(r.payload.as_deref().unwrap());
                        (r.key_str().unwrap_or_default().to_string(), d)
                    })
                    .collect();
            (out.len() >= at_least).then_some(out)
        },
    )
    .await
}

async fn start(s: &Stack, group: &str) -> LapseProcess {
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    let cfg = s.config(group, "");
    s.spawn(group, &cfg)
}

#[tokio::test]
async fn caps_suppression_and_the_allowance_api_end_to_end() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandA", "amy");
    let t1 = shanghai(2026, 3, 2, 10);
    let events: Vec<(Event, Option<&str>)> = vec![
        // Two WeChat marketing sends within a day: CAPPED until the first + 24 h.
        (
            send(&c, "w1", t1, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(&c, "w2", t1 + 2 * H, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        // A third one: a sender ignoring the cap, counted as a violation.
        (
            send(&c, "w3", t1 + 3 * H, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        // A service message never counts and never changes the allowance.
        (
            send(&c, "svc", t1 + 4 * H, Channel::Sms, Purpose::Service),
            None,
        ),
        // Unsubscribe on SMS: SUPPRESSED on SMS only.
        (reply(&c, "r1", t1 + 5 * H, Channel::Sms), Some("退订")),
    ];
    // A night owl: opens at 22:30 on each of the last six days.
    let owl = cust("brandA", "owl");
    let today = chrono::Utc::now()
        .with_timezone(&chrono_tz::Asia::Shanghai)
        .date_naive();
    let mut events = events;
    for k in 1..=6u64 {
        let d = today - chrono::Days::new(k);
        let at = shanghai(d.year(), d.month(), d.day(), 22) + 30 * 60_000;
        events.push((open(&owl, &format!("owl{k}"), at, Channel::Email), None));
    }
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    let mut lapse = start(&s, "g-caps").await;
    s.wait_caught_up("g-caps", LONG).await;

    let got = throttle_events(&s, 3).await;
    // (Being March events, the WeChat cap has long expired by the wall clock, so
    // its timer may already have published an OPEN too: look at the CAPPED ones.)
    let wechat: Vec<_> = got
        .iter()
        .filter(|(k, d)| k == "brandA/amy/WECHAT" && text(d, "state") == "CAPPED")
        .collect();
    assert_eq!(
        wechat.len(),
        2,
        "CAPPED, then CAPPED with a later allowed_from after the violation: {got:?}"
    );
    let first = &wechat[0].1;
    assert_eq!(text(first, "state"), "CAPPED");
    assert_eq!(text(first, "reason"), "frequency_cap");
    assert_eq!(millis(first, "allowed_from"), Some(t1 + 24 * H));
    assert_eq!(text(first, "cause_event_id"), "w2");
    assert_eq!(text(first, "tenant_id"), "brandA");
    assert_eq!(text(first, "scope"), "CUSTOMER_CHANNEL");
    assert_eq!(text(first, "rule_scope"), "CHANNEL");
    assert_eq!(millis(&wechat[1].1, "allowed_from"), Some(t1 + 26 * H));
    let sms: Vec<_> = got.iter().filter(|(k, _)| k == "brandA/amy/SMS").collect();
    assert_eq!(sms.len(), 1, "{got:?}");
    assert_eq!(text(&sms[0].1, "state"), "SUPPRESSED");
    assert_eq!(text(&sms[0].1, "reason"), "unsubscribe_reply");
    assert!(
        got.iter()
            .all(|(k, _)| k.ends_with("/WECHAT") || k.ends_with("/SMS")),
        "no other channel touched"
    );

    let violations = metric(
        &lapse,
        "lapse_cap_violations_total",
        &[("channel", "wechat"), ("kind", "cap")],
    )
    .await;
    assert_eq!(violations, 1.0);
    assert_eq!(
        metric(&lapse, "lapse_cap_hits_total", &[("channel", "wechat")]).await,
        1.0
    );

    // The synchronous check agrees (evaluated now: long after these March events,
    // so WeChat is open again, SMS still suppressed).
    let (code, body) = lapse.http_get("/v1/allowance/brandA/amy").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["channels"]["SMS"]["state"], "SUPPRESSED");
    assert_eq!(v["channels"]["SMS"]["allowed_now"], false);
    assert_eq!(v["channels"]["WECHAT"]["state"], "OPEN");
    assert_eq!(v["channels"]["EMAIL"]["cap"], 2);
    // Violations are counted per campaign too (every send here is campaign "spring").
    let (code, body) = lapse.http_get("/v1/campaigns/brandA/spring").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["violations"], 1, "{v}");
    assert_eq!(v["sends"], 3, "marketing sends only: {v}");
    let (_, body) = lapse.http_get("/v1/allowance/brandA/nobody").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["known"], false);
    assert_eq!(v["channels"]["PHONE"]["state"], "OPEN");
    assert_eq!(v["good_hours_source"], "population");
    assert_eq!(
        v["good_hours"],
        serde_json::json!((8..22).collect::<Vec<_>>())
    );

    // Best contact hours (issue 16): the night owl's hours are 21-23, so each
    // channel's next good time is the first of them outside its quiet hours.
    let (_, body) = lapse.http_get("/v1/allowance/brandA/owl").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["good_hours"], serde_json::json!([21, 22, 23]), "{v:#}");
    assert_eq!(v["good_hours_source"], "customer");
    let hour = |ch: &str| {
        let ms = v["channels"][ch]["next_good_time_ms"].as_i64()?;
        let now = v["channels"][ch]["allowed_from_ms"].as_i64().unwrap();
        assert!(ms >= now && ms < now + 24 * H, "{ch}: {v:#}");
        Some(
            chrono::Utc
                .timestamp_millis_opt(ms)
                .unwrap()
                .with_timezone(&chrono_tz::Asia::Shanghai)
                .hour(),
        )
    };
    // WeChat is quiet from 22:00: 21:xx only. SMS from 21:00: never.
    assert_eq!(hour("WECHAT"), Some(21), "{v:#}");
    assert_eq!(hour("SMS"), None, "{v:#}");
    assert!(matches!(hour("EMAIL"), Some(21..=23)), "{v:#}");

    // The fleet gauge: one customer suppressed on SMS (exported from Redis every 15 s).
    wait_until(
        LONG,
        Duration::from_millis(500),
        "the suppressed gauge",
        async || {
            metric(
                &lapse,
                "lapse_customers_restricted",
                &[("channel", "sms"), ("state", "suppressed")],
            )
            .await
                == 1.0
        },
    )
    .await;

    // Re-subscribe: OPEN again, with the reason.
    produce_events(
        &p,
        &[(reply(&c, "r2", t1 + 30 * H, Channel::Sms), Some("订阅"))],
        |_| Framing::SingleObject,
    )
    .await;
    s.wait_caught_up("g-caps", LONG).await;
    let got = throttle_events(&s, 4).await;
    let last_sms = got
        .iter()
        .rev()
        .find(|(k, _)| k == "brandA/amy/SMS")
        .unwrap();
    assert_eq!(text(&last_sms.1, "state"), "OPEN");
    assert_eq!(text(&last_sms.1, "reason"), "resubscribed");
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());

    // Replaying every input from offset 0 (a new group) publishes nothing new.
    let before = consume_up_to(&s.broker.bootstrap(), THROTTLE, 100, Duration::from_secs(5))
        .await
        .len();
    assert!(
        before >= 5,
        "CAPPED ×2, SUPPRESSED, OPEN (SMS), OPEN (WeChat, released lazily)"
    );
    let cfg = s.config("replay", "");
    let mut replay = s.spawn("g-caps-replay", &cfg);
    s.wait_caught_up("g-caps-replay", LONG).await;
    replay.sigterm();
    assert!(replay.wait_exit(Duration::from_secs(30)).await.success());
    let after = consume_up_to(&s.broker.bootstrap(), THROTTLE, 100, Duration::from_secs(5))
        .await
        .len();
    assert_eq!(
        after, before,
        "a replay from offset 0 publishes no new throttle event"
    );
}

/// A marketing send of `campaign` (the harness' `send` always says "spring").
fn campaign_send(c: &CustomerRef, id: &str, at: i64, ch: Channel, campaign: &str) -> Event {
    let mut e = send(c, id, at, ch, Purpose::Marketing);
    if let EventBody::Send { campaign_id, .. } = &mut e.body {
        *campaign_id = Some(campaign.into());
    }
    e
}

/// Issue 16: the touch cap across channels closes every channel (rule scope
/// CROSS_CHANNEL on the throttle topic), and one campaign, one channel is
/// answered by `?campaign=`. Events are stamped just before the wall clock so
/// the allowance API, evaluated now, still sees both rules in force.
#[tokio::test]
async fn the_cross_channel_touch_cap_and_the_campaign_lock_end_to_end() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandC", "cara");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = midday_before(now - 5 * 60_000);
    const M: i64 = 60_000;
    // EMAIL and SOCIAL have no quiet hours: their allowed_from is exact.
    let events: Vec<(Event, Option<&str>)> = vec![
        (campaign_send(&c, "x1", t0, Channel::Email, "spring"), None),
        (
            campaign_send(&c, "x2", t0 + M, Channel::Social, "summer"),
            None,
        ),
        // The third touch of the day fills the cap of 3: every channel closes.
        (
            campaign_send(&c, "x3", t0 + 2 * M, Channel::Wechat, "autumn"),
            None,
        ),
        // A sender ignoring it: a violation of kind cross_channel_cap.
        (
            campaign_send(&c, "x4", t0 + 3 * M, Channel::Social, "winter"),
            None,
        ),
    ];
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    let cfg = s.config_with(
        "g-cross",
        "",
        "[policy.cross_channel]\nlimit = 3\nwindow = \"1d\"\ncampaign_lock = \"7d\"\n",
    );
    let mut lapse = s.spawn("g-cross", &cfg);
    s.wait_caught_up("g-cross", LONG).await;
    // "拒收请回复R": a lone R is an opt-out, and outranks the touch cap. Replies
    // are another topic, so it is sent once the sends are applied: applied
    // first, it would make the cap news to 4 channels, not 5 (the domain test
    // `an_opt_out_applied_before_earlier_sends_ends_on_the_same_allowances`).
    produce_events(
        &p,
        &[(reply(&c, "x5", t0 + 4 * M, Channel::Sms), Some("R"))],
        |_| Framing::SingleObject,
    )
    .await;
    s.wait_caught_up("g-cross", LONG).await;

    // x3 closes all 5 channels; x4 moves every allowed_from later (5 more); x5 suppresses SMS.
    let got = throttle_events(&s, 11).await;
    let sms = &got
        .iter()
        .rev()
        .find(|(k, _)| k == "brandC/cara/SMS")
        .unwrap()
        .1;
    assert_eq!(text(sms, "state"), "SUPPRESSED", "{got:?}");
    assert_eq!(text(sms, "reason"), "unsubscribe_reply");
    assert_eq!(text(sms, "rule_scope"), "CHANNEL");
    let first_per_channel: BTreeMap<&str, &Decision> =
        got.iter().rev().map(|(k, d)| (k.as_str(), d)).collect();
    assert_eq!(first_per_channel.len(), 5, "every channel is told: {got:?}");
    for (key, d) in &first_per_channel {
        assert!(key.starts_with("brandC/cara/"), "{key}");
        assert_eq!(text(d, "state"), "CAPPED", "{key}: {d:?}");
        assert_eq!(text(d, "reason"), "cross_channel_cap", "{key}");
        assert_eq!(text(d, "rule_scope"), "CROSS_CHANNEL", "{key}");
        assert_eq!(text(d, "scope"), "CUSTOMER_CHANNEL", "{key}");
    }
    let email = first_per_channel["brandC/cara/EMAIL"];
    assert_eq!(millis(email, "allowed_from"), Some(t0 + 24 * H));
    assert_eq!(text(email, "cause_event_id"), "x3");
    assert_eq!(
        metric(
            &lapse,
            "lapse_cap_violations_total",
            &[("channel", "social"), ("kind", "cross_channel_cap")],
        )
        .await,
        1.0
    );

    // The synchronous check names the rule that binds.
    let (code, body) = lapse.http_get("/v1/allowance/brandC/cara").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let social = &v["channels"]["SOCIAL"];
    assert_eq!(social["state"], "CAPPED", "{v}");
    assert_eq!(social["rule"], "CROSS_CHANNEL", "{v}");
    assert_eq!(social["allowed_now"], false);
    // Four touches: free again when the second leaves the day.
    assert_eq!(social["allowed_from_ms"], t0 + M + 24 * H, "{v}");
    // For campaign "spring" (sent by EMAIL), SOCIAL stays closed for the lock: 7 days.
    let (code, body) = lapse
        .http_get("/v1/allowance/brandC/cara?campaign=spring")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["campaign_id"], "spring");
    let social = &v["channels"]["SOCIAL"];
    assert_eq!(social["reason"], "campaign_on_other_channel", "{v}");
    assert_eq!(social["rule"], "CAMPAIGN_CHANNEL", "{v}");
    assert_eq!(social["allowed_from_ms"], t0 + 7 * 24 * H, "{v}");
    // EMAIL carried "spring": only the touch cap binds there.
    assert_eq!(v["channels"]["EMAIL"]["rule"], "CROSS_CHANNEL", "{v}");
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

/// Issue 16: platform rules through the throttle topic. A calendar-month
/// limit on WECHAT binds (rule_scope PLATFORM), a send ignoring it is a
/// violation, its timer releases it at the next month; the allowance API names
/// the rule that binds (an inbound window on SOCIAL for a customer who never
/// wrote).
#[tokio::test]
async fn platform_rules_end_to_end() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandD", "dora");
    let events: Vec<(Event, Option<&str>)> = vec![
        (
            send(
                &c,
                "p1",
                shanghai(2026, 3, 2, 10),
                Channel::Wechat,
                Purpose::Marketing,
            ),
            None,
        ),
        (
            send(
                &c,
                "p2",
                shanghai(2026, 3, 10, 10),
                Channel::Wechat,
                Purpose::Marketing,
            ),
            None,
        ),
        (
            send(
                &c,
                "p3",
                shanghai(2026, 3, 12, 10),
                Channel::Wechat,
                Purpose::Marketing,
            ),
            None,
        ),
    ];
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    let rules = "[[policy.platform_rules]]\nname = \"monthly_broadcast\"\nchannel = \"WECHAT\"\nkind = \"calendar_month\"\nlimit = 2\n\
                 [[policy.platform_rules]]\nname = \"social_inbound\"\nchannel = \"SOCIAL\"\nkind = \"inbound_window\"\nwindow = \"48h\"\nlimit = 5\n";
    let cfg = s.config_with("g-platform", "", rules);
    let mut lapse = s.spawn("g-platform", &cfg);
    s.wait_caught_up("g-platform", LONG).await;

    // CAPPED on the second send, CAPPED again (nothing later to move: the same
    // month end) is not republished; the timer's OPEN after April 1st.
    let got = throttle_events(&s, 2).await;
    let wechat: Vec<_> = got
        .iter()
        .filter(|(k, _)| k == "brandD/dora/WECHAT")
        .map(|(_, d)| d)
        .collect();
    let capped = wechat[0];
    assert_eq!(text(capped, "state"), "CAPPED", "{got:?}");
    assert_eq!(text(capped, "reason"), "platform_calendar_month");
    assert_eq!(text(capped, "rule_scope"), "PLATFORM");
    assert_eq!(text(capped, "cause_event_id"), "p2");
    // Midnight is in WeChat's quiet hours (22:00-08:00).
    assert_eq!(
        millis(capped, "allowed_from"),
        Some(shanghai(2026, 4, 1, 8))
    );
    assert_eq!(text(wechat[1], "state"), "OPEN", "{got:?}");
    assert_eq!(
        metric(
            &lapse,
            "lapse_cap_violations_total",
            &[("channel", "wechat"), ("kind", "platform_rule")],
        )
        .await,
        1.0
    );

    let (code, body) = lapse.http_get("/v1/allowance/brandD/dora").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let social = &v["channels"]["SOCIAL"];
    assert_eq!(social["state"], "CAPPED", "{v}");
    assert_eq!(social["reason"], "platform_inbound_window", "{v}");
    assert_eq!(social["rule"], "PLATFORM", "{v}");
    assert_eq!(social["platform_rule"], "social_inbound", "{v}");
    assert_eq!(social["allowed_from"], serde_json::Value::Null, "{v}");
    assert_eq!(v["channels"]["WECHAT"]["rule"], "CHANNEL", "{v}");
    assert_eq!(
        v["channels"]["WECHAT"]["platform_rule"],
        serde_json::Value::Null
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn a_customer_who_stops_clicking_is_throttled_then_released() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandB", "bea");
    let mut t = shanghai(2026, 1, 5, 11);
    let mut events = Vec::new();
    let mut n = 0;
    let mut id = |p: &str| {
        n += 1;
        format!("{p}{n}")
    };
    // Three months clicking every message, then six sends without a click, then clicks again.
    for _ in 0..30 {
        events.push((
            send(&c, &id("s"), t, Channel::Wechat, Purpose::Marketing),
            None,
        ));
        events.push((click(&c, &id("c"), t + H, Channel::Wechat), None));
        t += 3 * 24 * H;
    }
    for _ in 0..6 {
        events.push((
            send(&c, &id("s"), t, Channel::Wechat, Purpose::Marketing),
            None,
        ));
        t += 3 * 24 * H;
    }
    for i in 0..20 {
        events.push((click(&c, &id("c"), t + i * H, Channel::Wechat), None));
    }
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    let mut lapse = start(&s, "g-click").await;
    s.wait_caught_up("g-click", LONG).await;
    let got = throttle_events(&s, 2).await;
    let states: Vec<(String, String)> = got
        .iter()
        .map(|(_, d)| (text(d, "state"), text(d, "reason")))
        .collect();
    let throttled = states
        .iter()
        .position(|(s, _)| s == "THROTTLED")
        .unwrap_or_else(|| panic!("{states:?}"));
    assert_eq!(states[throttled].1, "click_rate_below_baseline");
    assert!(
        states[throttled..].iter().any(|(s, _)| s == "OPEN"),
        "released once clicks resume: {states:?}"
    );
    assert!(
        metric(
            &lapse,
            "lapse_throttle_transitions_total",
            &[("state", "throttled")]
        )
        .await
            >= 1.0
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn a_crash_between_state_write_and_produce_loses_no_decision() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandC", "cai");
    let t1 = shanghai(2026, 3, 2, 10);
    produce_events(
        &p,
        &[
            (send(&c, "a", t1, Channel::Wechat, Purpose::Marketing), None),
            (
                send(&c, "b", t1 + H, Channel::Wechat, Purpose::Marketing),
                None,
            ),
        ],
        |_| Framing::SingleObject,
    )
    .await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    let cfg = s.config("crash", "");
    let mut env = s.env("g-crash");
    env.push(("LAPSE_CRASH_POINT".into(), "after_state_write".into()));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut doomed = LapseProcess::spawn(&["run", "--config", &cfg], &env_ref);
    let status = doomed.wait_exit(LONG).await;
    assert!(!status.success(), "the crash point must abort the process");
    // The state (with the pending decision) is in Redis, nothing was published.
    let st = state(&s.store().await, &c).await;
    assert_eq!(st.outbox.len(), 1, "the decision waits in the outbox");
    assert!(
        consume_up_to(&s.broker.bootstrap(), THROTTLE, 1, Duration::from_secs(3))
            .await
            .is_empty()
    );

    // Restart without the crash point: the redelivered records are recognised as
    // applied, and the outbox is published.
    let mut lapse = s.spawn("g-crash", &cfg);
    s.wait_caught_up("g-crash", LONG).await;
    let got = throttle_events(&s, 1).await;
    let capped: Vec<_> = got
        .iter()
        .filter(|(_, d)| text(d, "state") == "CAPPED")
        .collect();
    assert_eq!(capped.len(), 1, "exactly one CAPPED decision: {got:?}");
    wait_until(LONG, POLL, "the outbox to be cleared", async || {
        s.store()
            .await
            .load(&c)
            .await
            .unwrap()
            .unwrap()
            .state
            .outbox
            .is_empty()
    })
    .await;
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn a_campaign_whose_click_rate_collapses_gets_a_campaign_throttle_event() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let t0 = shanghai(2026, 4, 1, 10);
    let min = 60_000;
    let mut events = Vec::new();
    // First hour (the baseline): 60 customers get the campaign, half click.
    for i in 0..60 {
        let c = cust("brandA", &format!("k{i:03}"));
        let at = t0 + i * min;
        let mut e = send(
            &c,
            &format!("s{i}"),
            at,
            Channel::Social,
            Purpose::Marketing,
        );
        if let EventBody::Send { campaign_id, .. } = &mut e.body {
            *campaign_id = Some("flash".into());
        }
        events.push((e, None));
        if i % 2 == 0 {
            let mut k = click(&c, &format!("c{i}"), at + min / 2, Channel::Social);
            if let EventBody::Click { campaign_id, .. } = &mut k.body {
                *campaign_id = Some("flash".into());
            }
            events.push((k, None));
        }
    }
    // Then 80 more customers, nobody clicks.
    for i in 60..140 {
        let c = cust("brandA", &format!("k{i:03}"));
        let mut e = send(
            &c,
            &format!("s{i}"),
            t0 + 2 * H + i * min,
            Channel::Social,
            Purpose::Marketing,
        );
        if let EventBody::Send { campaign_id, .. } = &mut e.body {
            *campaign_id = Some("flash".into());
        }
        events.push((e, None));
    }
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    let cfg = s.config_with(
        "campaign",
        "",
        "[policy.throttle]\ncampaign_baseline = \"1h\"\ncampaign_half_life = \"1h\"\ncampaign_min_sends = 20\n",
    );
    let mut lapse = s.spawn("g-campaign", &cfg);
    s.wait_caught_up("g-campaign", LONG).await;
    let got = throttle_events(&s, 1).await;
    let campaign: Vec<_> = got
        .iter()
        .filter(|(k, _)| k == "brandA/campaign/flash")
        .collect();
    assert_eq!(campaign.len(), 1, "one campaign-level event: {got:?}");
    let d = &campaign[0].1;
    assert_eq!(text(d, "scope"), "CAMPAIGN");
    assert_eq!(text(d, "state"), "THROTTLED");
    assert_eq!(text(d, "reason"), "campaign_click_rate_collapse");
    assert_eq!(text(d, "campaign_id"), "flash");
    assert!(matches!(&d["customer_id"], Value::Union(_, b) if **b == Value::Null));
    let (_, body) = lapse.http_get("/v1/campaigns/brandA/flash").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            v["state"].as_str(),
            v["sends"].as_u64(),
            v["clicks"].as_u64()
        ),
        (Some("THROTTLED"), Some(140), Some(30)),
        "{v}"
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
    // Issue 17: the backtest decides the campaign throttle (and the customers'
    // decisions) the same, with the same ids.
    let (throttle, _, _) = s.backtest_matches_live(&cfg).await;
    assert!(throttle >= 1);
}

#[tokio::test]
async fn a_cap_is_released_by_its_timer_without_any_event_of_that_customer() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandD", "dan");
    let t1 = shanghai(2026, 3, 2, 10);
    produce_events(
        &p,
        &[
            (
                send(&c, "d1", t1, Channel::Wechat, Purpose::Marketing),
                None,
            ),
            (
                send(&c, "d2", t1 + H, Channel::Wechat, Purpose::Marketing),
                None,
            ),
        ],
        |_| Framing::SingleObject,
    )
    .await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    // Event time: the release fires when the watermark passes allowed_from.
    let cfg = s.config_with(
        "release",
        "",
        "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"20ms\"\n",
    );
    let mut lapse = s.spawn("g-release", &cfg);
    s.wait_caught_up("g-release", LONG).await;
    let got = throttle_events(&s, 1).await;
    assert_eq!(text(&got[0].1, "state"), "CAPPED");
    // Another customer's event moves event time past dan's allowed_from (t1 + 24 h).
    let other = cust("brandD", "someone-else");
    produce_events(
        &p,
        &[(
            send(&other, "o1", t1 + 30 * H, Channel::Email, Purpose::Service),
            None,
        )],
        |_| Framing::SingleObject,
    )
    .await;
    let got = throttle_events(&s, 2).await;
    let open = &got[1].1;
    assert_eq!(got[1].0, "brandD/dan/WECHAT");
    assert_eq!(text(open, "state"), "OPEN");
    assert_eq!(text(open, "reason"), "cap_window_passed");
    assert_eq!(
        text(open, "cause_event_id"),
        "",
        "released by time, not by an event"
    );
    assert!(millis(open, "decided_at").unwrap() >= t1 + 24 * H);
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
    // Issue 17: the backtest of this policy decides the same (CAPPED, then the
    // release by its timer).
    let (throttle, _, _) = s.backtest_matches_live(&cfg).await;
    assert_eq!(throttle, 2);
}

#[tokio::test]
async fn lapse_creates_the_throttle_topic_compacted_when_missing() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let s = Stack::start().await;
    let cfg = s.config("create", "");
    let mut lapse = s.spawn("g-create", &cfg);
    lapse.wait_http_ok("/readyz", LONG).await;
    let bootstrap = s.broker.bootstrap();
    wait_until(LONG, POLL, "engagement.throttle to exist", async || {
        partition_count(&bootstrap, THROTTLE).await.is_some()
    })
    .await;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let res = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(THROTTLE)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("describe configs");
    let cfgs = res.into_iter().next().unwrap().expect("topic config");
    let policy = cfgs.get("cleanup.policy").and_then(|e| e.value.clone());
    assert_eq!(policy.as_deref(), Some("compact"));
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

/// Engagement-adaptive e-mail caps (on by default): a customer who opened and
/// clicked every e-mail for months may get 3 a month instead of 2; the raised
/// cap travels with the CAPPED decision, and the third e-mail is no violation.
#[tokio::test]
async fn an_engaged_customers_e_mail_cap_is_raised_end_to_end() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandE", "erin");
    let mut history: Vec<(Event, Option<&str>)> = Vec::new();
    for (m, d) in (1..=4).flat_map(|m| [(m, 1), (m, 15)]) {
        let t = shanghai(2026, m, d, 10);
        let id = format!("e{m}-{d}");
        history.push((send(&c, &id, t, Channel::Email, Purpose::Marketing), None));
        history.push((
            open(&c, &format!("{id}-o"), t + 3_600_000, Channel::Email),
            None,
        ));
        history.push((
            click(&c, &format!("{id}-c"), t + 3_700_000, Channel::Email),
            None,
        ));
    }
    produce_events(&p, &history, |_| Framing::SingleObject).await;
    let mut lapse = start(&s, "g-adaptive").await;
    s.wait_caught_up("g-adaptive", LONG).await;

    // Three e-mails in one day, long after the history's last one.
    let violations = async |lapse: &LapseProcess| {
        metric(
            lapse,
            "lapse_cap_violations_total",
            &[("channel", "email"), ("kind", "cap")],
        )
        .await
    };
    let before = violations(&lapse).await;
    let day: Vec<(Event, Option<&str>)> = (0..3)
        .map(|k| {
            let t = shanghai(2026, 5, 20, 10 + k);
            (
                send(
                    &c,
                    &format!("may-{k}"),
                    t,
                    Channel::Email,
                    Purpose::Marketing,
                ),
                None,
            )
        })
        .collect();
    produce_events(&p, &day, |_| Framing::SingleObject).await;
    s.wait_caught_up("g-adaptive", LONG).await;

    // CAPPED by the third e-mail at the raised cap (the timer then reopens it:
    // this harness's clock is the wall clock, months later).
    let got = throttle_events(&s, 1).await;
    let capped = got
        .iter()
        .filter(|(k, _)| k == "brandE/erin/EMAIL")
        .map(|(_, d)| d)
        .find(|d| text(d, "cause_event_id") == "may-2")
        .unwrap_or_else(|| panic!("a decision caused by the third e-mail: {got:?}"));
    assert_eq!(text(capped, "state"), "CAPPED", "{capped:?}");
    assert_eq!(
        capped["cap"],
        Value::Union(1, Box::new(Value::Int(3))),
        "{capped:?}"
    );
    assert_eq!(capped["sends_in_window"], Value::Long(3), "{capped:?}");
    assert_eq!(
        violations(&lapse).await,
        before,
        "the third e-mail was allowed"
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

/// A processor writes the next part while its publisher still publishes the
/// last one. A customer whose decision is still unpublished must wait: loaded
/// before the decision was published and cleared, it would carry it into its
/// own outbox and publish it twice (and make the clear conflict). One record
/// per batch, one customer, a decision on nearly every record: each batch
/// meets the previous one's unpublished outbox.
#[tokio::test]
async fn consecutive_batches_of_one_customer_publish_each_decision_once() {
    let s = Stack::start().await;
    let p = Producer::new(&s.broker.bootstrap());
    let c = cust("brandA", "busy");
    // Recent sends, so that no cap expires (and no timer publishes) during the test.
    let t0 = midday_before(chrono::Utc::now().timestamp_millis() - 2 * H) - 30 * 60_000;
    let sends = 30;
    let events: Vec<(Event, Option<&str>)> = (0..sends)
        .map(|k| {
            let at = t0 + k * 60_000;
            (
                send(
                    &c,
                    &format!("s{k}"),
                    at,
                    Channel::Wechat,
                    Purpose::Marketing,
                ),
                None,
            )
        })
        .collect();
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    let cfg = s.config("one-per-batch", "max_records = 1");
    let mut lapse = s.spawn("g-one-per-batch", &cfg);
    s.wait_caught_up("g-one-per-batch", LONG).await;

    // The second send caps WeChat; every later one is a violation that moves
    // allowed_from, so nearly every batch publishes a decision.
    let distinct = throttle_events(&s, (sends - 1) as usize).await;
    assert_eq!(distinct.len(), (sends - 1) as usize, "{distinct:?}");
    let raw = consume_up_to(
        &s.broker.bootstrap(),
        THROTTLE,
        10_000,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        raw.len(),
        distinct.len(),
        "every decision published exactly once, none carried into the next batch's outbox"
    );
    assert_eq!(
        metric(&lapse, "lapse_decisions_republished_total", &[]).await,
        0.0
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}
