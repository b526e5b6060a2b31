//! Interop with an independent client (issue 11): nothing on the client side is
//! lapse code. A Python client (`tests/interop/client.py`: PyPI confluent-kafka
//! and fastavro, the project's `.cache/venv`) produces all five input kinds, in
//! Avro single-object framing (fingerprints computed by fastavro) or through
//! confluent-kafka's `AvroSerializer` and the registry stub, plus a few
//! deliberately bad records. lapse runs in event-time mode; `lapse inspect`
//! shows the state; then the same client reads every output topic and the DLQ
//! and decodes each record with the standard tools (fastavro by fingerprint,
//! or `AvroDeserializer` with the registry). The test asserts that every output
//! record decoded, that the expected throttle events, recall triggers and
//! outcomes are there with the expected content, and that only the bad records
//! were dead-lettered, with the expected reasons.
//!
//! | framing | test |
//! |---|---|
//! | single-object in, single-object out (no registry) | `single_object_clients_interoperate_end_to_end` |
//! | Confluent in (AvroSerializer), Confluent out (AvroDeserializer) | `confluent_clients_interoperate_end_to_end` |

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::stack::*;
use common::*;
use serde_json::{json, Value};

const H: i64 = 3_600_000;
const THROTTLE: &str = "engagement.throttle";
const TRIGGERS: &str = "recall.triggers";
const OUTCOMES: &str = "recall.outcomes";
const DLQ: &str = "lapse.dlq";
const OUTPUTS: [&str; 3] = [THROTTLE, TRIGGERS, OUTCOMES];
const EVENT_TIME: &str = "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"20ms\"\n\
                          [policy.lapse]\nholdout_share = 0.0\n\
                          [[policy.experiments]]\nname = \"interop-tag\"\ntenant = \"clinicA\"\n\
                          start = \"2000-01-01T00:00\"\nend = \"2100-01-01T00:00\"\n\
                          [[policy.experiments.arms]]\nname = \"control\"\nshare = 0.5\n\
                          [[policy.experiments.arms]]\nname = \"same\"\nshare = 0.5\n\
                          quiet_hours.WECHAT = { start = \"22:00\", end = \"08:00\" }\n\
                          recall.at_risk_factor = 1.2\n";
/// The experiment of [`EVENT_TIME`]: its arm overrides WeChat's quiet hours and
/// the AT_RISK offset with their defaults, so it decides nothing differently,
/// but WeChat throttle events and recall triggers carry its arm.
const EXPERIMENT: &str = "interop-tag";

/// The arm lapse draws for `customer` of clinicA in [`EXPERIMENT`].
fn expected_arm(customer: &str) -> &'static str {
    use lapse::domain::experiment::assign;
    let arm = assign::arm_of(
        assign::draw("clinicA", customer, EXPERIMENT),
        &assign::bounds(&[0.5, 0.5]),
    );
    ["control", "same"][arm]
}
/// Filler customers (a realistic background population; a few events each).
const POPULATION: usize = 48;
/// The event-time tick that makes the recall stages fire (day 388), and hv's return.
const TICK_DAY: i64 = 388;
const RETURN_DAY: i64 = 389;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wire {
    SingleObject,
    Confluent,
}

impl Wire {
    fn arg(self) -> &'static str {
        match self {
            Wire::SingleObject => "single-object",
            Wire::Confluent => "confluent",
        }
    }

    /// How the client reports the framing of a record it decoded.
    fn decoded(self) -> &'static str {
        match self {
            Wire::SingleObject => "single_object",
            Wire::Confluent => "confluent",
        }
    }
}

// ---------------------------------------------------------------------------
// Events, as the Python client takes them (plain JSON, no lapse types)
// ---------------------------------------------------------------------------

fn at(d: i64, hours: i64, minutes: i64) -> i64 {
    day(d) + hours * H + minutes * 60_000
}

fn event(kind: &str, key: &str, mut value: Value) -> Value {
    let (tenant, customer) = key.split_once('/').expect("TENANT/CUSTOMER");
    value["tenant_id"] = tenant.into();
    value["customer_id"] = customer.into();
    json!({ "kind": kind, "key": key, "value": value, "corrupt": null })
}

fn send(
    key: &str,
    id: &str,
    t: i64,
    channel: &str,
    purpose: &str,
    campaign: Option<&str>,
) -> Value {
    event(
        "send",
        key,
        json!({ "event_id": id, "occurred_at": t, "channel": channel, "message_id": format!("m-{id}"),
                "campaign_id": campaign, "purpose": purpose, "cost": null }),
    )
}

fn open(key: &str, id: &str, t: i64, channel: &str, message: &str) -> Value {
    event(
        "open",
        key,
        json!({ "event_id": id, "occurred_at": t, "channel": channel, "message_id": message,
                "campaign_id": "spring-glow" }),
    )
}

fn click(key: &str, id: &str, t: i64, channel: &str, message: &str) -> Value {
    event(
        "click",
        key,
        json!({ "event_id": id, "occurred_at": t, "channel": channel, "message_id": message,
                "campaign_id": "spring-glow" }),
    )
}

fn reply(key: &str, id: &str, t: i64, channel: &str, text: &str) -> Value {
    event(
        "reply",
        key,
        json!({ "event_id": id, "occurred_at": t, "channel": channel, "message_id": null, "text": text }),
    )
}

fn visit(
    key: &str,
    id: &str,
    t: i64,
    visit_type: &str,
    treatment: Option<&str>,
    amount: i64,
) -> Value {
    event(
        "visit",
        key,
        json!({ "event_id": id, "occurred_at": t, "visit_type": visit_type, "treatment": treatment,
                "amount": amount, "currency": "CNY" }),
    )
}

/// A visit that redeemed an offer (the optional `offer_code` / `discount`).
fn with_offer(mut e: Value, code: &str, discount: Option<i64>) -> Value {
    e["value"]["offer_code"] = code.into();
    e["value"]["discount"] = discount.into();
    e
}

fn corrupt(mut e: Value, how: &str) -> Value {
    e["corrupt"] = how.into();
    e
}

const AMY: &str = "clinicA/amy";
const HV: &str = "clinicA/hv";
const BOB: &str = "brandB/bob";
const CARL: &str = "brandB/carl";
const DAN: &str = "brandB/dan";
const CLOCK: &str = "clinicA/zz-clock";

/// Months of clinic life up to day 380 (only bob's AT_RISK is due by then), and the
/// deliberately bad records with the DLQ reason each must get.
fn history(wire: Wire) -> (Vec<Value>, Vec<(usize, &'static str)>) {
    let mut e = vec![
        // amy: a skin-care treatment; ten days later, the last events of the
        // history, two WeChat marketing messages within a day (the daily cap of 2
        // is reached: CAPPED until the first + 24 h, after the history), then an
        // open and a click of the first, an appointment reminder by SMS, and an
        // unsubscribe reply on SMS. (Her WeChat engagement comes after the second
        // send: lapse reads the five topics independently, and an open or click
        // with an event time before the send that filled the cap, applied after
        // it, re-publishes the channel as OPEN.)
        visit(
            AMY,
            "amy-v1",
            at(370, 0, 0),
            "TREATMENT",
            Some("SKIN_CARE"),
            80_000,
        ),
        send(
            AMY,
            "amy-w1",
            at(380, 4, 0),
            "WECHAT",
            "MARKETING",
            Some("spring-glow"),
        ),
        send(
            AMY,
            "amy-w2",
            at(380, 6, 0),
            "WECHAT",
            "MARKETING",
            Some("spring-glow"),
        ),
        open(AMY, "amy-o1", at(380, 6, 10), "WECHAT", "m-amy-w1"),
        click(AMY, "amy-c1", at(380, 6, 12), "WECHAT", "m-amy-w1"),
        send(AMY, "amy-s1", at(380, 7, 0), "SMS", "SERVICE", None),
        reply(AMY, "amy-r1", at(380, 8, 0), "SMS", "退订"),
        reply(
            AMY,
            "amy-r2",
            at(380, 9, 0),
            "WECHAT",
            "好的，我想预约下周做皮肤护理",
        ),
        // hv: high value (3 × 15,000 CNY), Botox every 120 days: AT_RISK at day 384.
        visit(
            HV,
            "hv-v1",
            at(0, 0, 0),
            "TREATMENT",
            Some("BOTOX"),
            1_500_000,
        ),
        visit(
            HV,
            "hv-v2",
            at(120, 0, 0),
            "TREATMENT",
            Some("BOTOX"),
            1_500_000,
        ),
        visit(
            HV,
            "hv-v3",
            at(240, 0, 0),
            "TREATMENT",
            Some("BOTOX"),
            1_500_000,
        ),
        send(
            HV,
            "hv-w1",
            at(250, 0, 0),
            "WECHAT",
            "MARKETING",
            Some("botox-care"),
        ),
        open(HV, "hv-o1", at(250, 1, 0), "WECHAT", "m-hv-w1"),
        // bob: one laser treatment (30-day default): AT_RISK at 376, LAPSED at 385.
        visit(
            BOB,
            "bob-v1",
            at(340, 0, 0),
            "TREATMENT",
            Some("LASER"),
            60_000,
        ),
        send(BOB, "bob-e1", at(341, 0, 0), "EMAIL", "SERVICE", None),
        // carl: a consultation, two SMS marketing messages in a week (cap 2 per 7 d).
        visit(CARL, "carl-v1", at(375, 0, 0), "CONSULTATION", None, 0),
        send(
            CARL,
            "carl-s1",
            at(376, 0, 0),
            "SMS",
            "MARKETING",
            Some("summer-laser"),
        ),
        send(
            CARL,
            "carl-s2",
            at(377, 0, 0),
            "SMS",
            "MARKETING",
            Some("summer-laser"),
        ),
        // dan: a filler treatment; two e-mails in 30 days (cap 2 per 30 d, until day 390),
        // an answered phone call and a social message.
        visit(
            DAN,
            "dan-v1",
            at(300, 0, 0),
            "TREATMENT",
            Some("FILLER"),
            900_000,
        ),
        send(
            DAN,
            "dan-e1",
            at(360, 0, 0),
            "EMAIL",
            "MARKETING",
            Some("newsletter"),
        ),
        send(
            DAN,
            "dan-e2",
            at(365, 0, 0),
            "EMAIL",
            "MARKETING",
            Some("newsletter"),
        ),
        send(DAN, "dan-p1", at(366, 0, 0), "PHONE", "SERVICE", None),
        open(DAN, "dan-o1", at(366, 0, 5), "PHONE", "m-dan-p1"),
        send(
            DAN,
            "dan-d1",
            at(366, 2, 0),
            "SOCIAL",
            "MARKETING",
            Some("spring-glow"),
        ),
    ];
    // The background population: a visit, a campaign message, some engagement.
    for i in 0..POPULATION {
        let key = format!("{}/c{i:02}", if i % 2 == 0 { "clinicA" } else { "brandB" });
        let d = 378 + (i as i64 % 3);
        let id = |what: &str| format!("c{i:02}-{what}");
        e.push(if i % 2 == 0 {
            visit(
                &key,
                &id("v"),
                at(d, 0, 0),
                "TREATMENT",
                Some("SKIN_CARE"),
                45_000,
            )
        } else {
            visit(&key, &id("v"), at(d, 0, 0), "CONSULTATION", None, 0)
        });
        e.push(send(
            &key,
            &id("w"),
            at(d, 1, 0),
            "WECHAT",
            "MARKETING",
            Some("spring-glow"),
        ));
        if i % 2 == 0 {
            e.push(open(
                &key,
                &id("o"),
                at(d, 1, 30),
                "WECHAT",
                &format!("m-{}", id("w")),
            ));
        }
        if i % 4 == 0 {
            e.push(click(
                &key,
                &id("c"),
                at(d, 1, 31),
                "WECHAT",
                &format!("m-{}", id("w")),
            ));
        }
        if i % 3 == 0 {
            e.push(send(&key, &id("s"), at(d, 2, 0), "SMS", "SERVICE", None));
        }
        if i % 5 == 0 {
            e.push(reply(&key, &id("r"), at(d, 3, 0), "WECHAT", "收到，谢谢"));
        }
    }
    // Bad records, spread among the good ones.
    let unknown_schema_reason = match wire {
        Wire::SingleObject => "unknown_fingerprint",
        Wire::Confluent => "unknown_schema_id",
    };
    let bad = [
        (
            5,
            corrupt(
                click(AMY, "amy-bad-1", at(380, 6, 13), "WECHAT", "m-amy-w1"),
                "garbage",
            ),
            "unknown_framing",
        ),
        (
            20,
            corrupt(
                open(AMY, "amy-bad-2", at(380, 6, 14), "WECHAT", "m-amy-w1"),
                "empty",
            ),
            "empty_payload",
        ),
        (
            40,
            corrupt(
                click(AMY, "amy-bad-3", at(380, 6, 15), "WECHAT", "m-amy-w1"),
                "unknown_schema",
            ),
            unknown_schema_reason,
        ),
        (
            60,
            {
                // A well-formed visit whose key names another customer.
                let mut v = visit(
                    "clinicA/ghost",
                    "ghost-v1",
                    at(379, 0, 0),
                    "TREATMENT",
                    None,
                    1,
                );
                v["key"] = "clinicA/someone-else".into();
                v
            },
            "key_mismatch",
        ),
    ];
    let mut expected = Vec::new();
    for (index, record, reason) in bad {
        e.insert(index, record);
        expected.push((index, reason));
    }
    (e, expected)
}

// ---------------------------------------------------------------------------
// Driving the client
// ---------------------------------------------------------------------------

struct Client<'a> {
    s: &'a Stack,
    wire: Wire,
    registry: Option<String>,
}

impl Client<'_> {
    async fn run(&self, args: &[String]) -> Value {
        let script = interop_dir().join("client.py");
        let mut cmd = std::process::Command::new(interop_python());
        cmd.arg(&script)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(std::process::Stdio::null());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("client.py {args:?} did not finish within 120 s"))
            .expect("run the interop client");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "client.py {} failed ({}):\n{stderr}",
            args[0],
            out.status
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "client.py {} printed no JSON ({e}):\n{}\n{stderr}",
                args[0],
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn common_args(&self, command: &str) -> Vec<String> {
        let mut args = vec![
            command.to_string(),
            "--bootstrap".into(),
            self.s.broker.bootstrap(),
            "--schemas".into(),
            schemas_dir(),
        ];
        if let Some(url) = &self.registry {
            args.extend(["--registry".into(), url.clone()]);
        }
        args
    }

    /// Produces `events` and returns the client's summary (one entry per event).
    async fn produce(&self, events: &[Value]) -> Vec<Value> {
        let path = self
            .s
            .dir
            .path()
            .join(format!("{}.json", unique_name("events")));
        std::fs::write(&path, serde_json::to_vec(events).unwrap()).expect("write events");
        let mut args = self.common_args("produce");
        args.extend([
            "--framing".into(),
            self.wire.arg().into(),
            "--events".into(),
            path.display().to_string(),
            // One record per produce request batch: tansu 0.6 reports a partition's
            // high watermark as the last batch's base offset + 1, so with batches of
            // several records `Stack::wait_caught_up` would never see the group
            // catch up. (lapse itself reads batched input fine.)
            "--producer-property".into(),
            "batch.num.messages=1".into(),
        ]);
        let summary = self.run(&args).await;
        let produced = summary["produced"].as_array().expect("produced").clone();
        assert_eq!(produced.len(), events.len(), "{summary}");
        produced
    }

    /// Reads and decodes the three output topics and the DLQ.
    async fn consume(&self) -> Value {
        let mut args = self.common_args("consume");
        for t in OUTPUTS {
            args.extend(["--topic".into(), t.into()]);
        }
        args.extend(["--dlq".into(), DLQ.into()]);
        self.run(&args).await
    }
}

/// `lapse inspect KEY` as JSON, or the error it printed.
async fn inspect(s: &Stack, config: &str, key: &str) -> Result<Value, String> {
    let redis = s.redis.url();
    let out = run_lapse(
        &["inspect", key, "--config", config],
        &[
            ("LAPSE_REDIS_URL", &redis),
            ("LAPSE_SCHEMAS_DIR", &schemas_dir()),
        ],
        Duration::from_secs(30),
    )
    .await;
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("inspect prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

// ---------------------------------------------------------------------------
// Reading the client's consume summary
// ---------------------------------------------------------------------------

fn records<'a>(summary: &'a Value, topic: &str) -> &'a [Value] {
    summary["topics"][topic]["records"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}

/// Distinct records of an output topic by their id field (first seen, in
/// partition/offset order); a repeated id must be an exact repeat.
fn distinct(summary: &Value, topic: &str, id_field: &str) -> Vec<Value> {
    let mut seen: BTreeMap<String, Value> = BTreeMap::new();
    let mut out = Vec::new();
    for r in records(summary, topic) {
        let id = r["value"][id_field].as_str().expect("id field").to_string();
        match seen.get(&id) {
            Some(first) => assert_eq!(
                first, &r["value"],
                "{topic}: a repeated {id_field} must be an exact repeat"
            ),
            None => {
                seen.insert(id, r["value"].clone());
                out.push(r.clone());
            }
        }
    }
    out
}

fn failures(summary: &Value) -> &[Value] {
    summary["failures"].as_array().map_or(&[], Vec::as_slice)
}

fn dlq(summary: &Value) -> &[Value] {
    summary["dlq"][DLQ]["records"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}

/// DLQ records by reason, for failure messages.
fn dlq_reasons(summary: &Value) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for r in dlq(summary) {
        let reason = r["headers"]["lapse.error.reason"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        *by.entry(reason).or_default() += 1;
    }
    by
}

/// Only the deliberately bad records are dead-lettered, each with its reason,
/// its source coordinates and (when it had bytes) its original payload.
fn assert_dlq_holds_exactly_the_bad_records(
    summary: &Value,
    produced: &[Value],
    bad: &[(usize, &str)],
) {
    let dead = dlq(summary);
    let first_message = dead
        .iter()
        .find_map(|r| r["headers"]["lapse.error.message"].as_str())
        .unwrap_or("");
    assert_eq!(
        dead.len(),
        bad.len(),
        "only the {} bad records may be dead-lettered; the DLQ holds {} by reason {:?} (e.g. \"{first_message}\")",
        bad.len(),
        dead.len(),
        dlq_reasons(summary)
    );
    for (index, reason) in bad {
        let p = &produced[*index];
        let source = |r: &&Value| {
            r["headers"]["lapse.source.topic"] == p["topic"]
                && r["headers"]["lapse.source.partition"] == p["partition"].to_string().as_str()
                && r["headers"]["lapse.source.offset"] == p["offset"].to_string().as_str()
        };
        let d = dead
            .iter()
            .find(source)
            .unwrap_or_else(|| panic!("bad record {p} is not in the DLQ: {dead:#?}"));
        assert_eq!(d["headers"]["lapse.error.reason"], *reason, "{d:#}");
        assert_eq!(d["key"], p["key"], "the DLQ keeps the original key");
        if p["payload_hex"].as_str().is_some_and(|h| !h.is_empty()) {
            assert_eq!(
                d["payload_hex"], p["payload_hex"],
                "the DLQ keeps the original bytes"
            );
        }
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

fn i(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

// ---------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------

async fn end_to_end(wire: Wire) {
    let st = Stack::start().await;
    st.broker.create_compacted_topic(THROTTLE, PARTITIONS).await;
    st.broker.create_topic(TRIGGERS, PARTITIONS).await;
    st.broker.create_topic(OUTCOMES, PARTITIONS).await;
    let group = unique_name("g-interop");
    let config = st.config_with("interop", "", EVENT_TIME);
    let registry = match wire {
        Wire::SingleObject => None,
        Wire::Confluent => Some(st.registry.url()),
    };
    let mut env = st.env(&group);
    for (k, v) in &mut env {
        if k == "LAPSE_SCHEMA_REGISTRY_URL" {
            // Single-object users run lapse without a registry (outputs single-object too).
            *v = registry.clone().unwrap_or_default();
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut lapse = LapseProcess::spawn(&["run", "--config", &config], &env);
    lapse.wait_ready(LONG).await;
    let client = Client {
        s: &st,
        wire,
        registry,
    };

    // 1. History, with the bad records among it.
    let (events, bad) = history(wire);
    let history_end = events
        .iter()
        .map(|e| i(&e["value"]["occurred_at"]))
        .max()
        .unwrap();
    let mut produced = client.produce(&events).await;
    for (index, p) in produced.iter().enumerate() {
        let expected = match events[index]["corrupt"].as_str() {
            Some("garbage" | "empty") => "none",
            _ => wire.arg(),
        };
        assert_eq!(p["framing"], expected, "{p}");
    }
    if wire == Wire::Confluent {
        // The serializer registered each input schema under `<topic>-value`.
        for kind in ["sends", "opens", "clicks", "replies"] {
            let subject = format!("engagement.{kind}-value");
            assert_eq!(st.registry.subject_ids(&subject).len(), 1, "{subject}");
        }
        for p in produced.iter().filter(|p| p["corrupt"].is_null()) {
            let subject = format!("{}-value", s(&p["topic"]));
            let id = u32::try_from(i(&p["schema_id"])).unwrap();
            assert_eq!(st.registry.subject_ids(&subject), vec![id], "{p}");
        }
    }
    st.wait_caught_up(&group, LONG).await;
    // Every good record applied: the DLQ holds exactly the bad ones. (Checked
    // now, so a decoder that rejects standard records fails fast, with reasons.)
    let summary = client.consume().await;
    assert_dlq_holds_exactly_the_bad_records(&summary, &produced, &bad);

    // 2. Event time moves to day 388 (a service message of a clock customer):
    // hv's AT_RISK (due 384) and bob's LAPSED (due 385) fire (bob's AT_RISK, due
    // 376, fired during the history, whose event time reached day 380),
    // carl's SMS cap (until 383) is released. Then hv comes back: RECALLED.
    let tick = send(
        CLOCK,
        &format!("tick-{TICK_DAY}"),
        at(TICK_DAY, 0, 0),
        "EMAIL",
        "SERVICE",
        None,
    );
    produced.extend(client.produce(&[tick]).await);
    st.wait_applied_and_fired(&group, day(TICK_DAY)).await;
    // hv redeems the AT_RISK offer (no discount given: the tier's configured
    // cost), and comes back again six hours later with a coupon of its own: a
    // repurchase (its offer is no cost of the recall).
    let back = with_offer(
        visit(
            HV,
            "hv-v4",
            at(RETURN_DAY, 0, 0),
            "TREATMENT",
            Some("BOTOX"),
            1_600_000,
        ),
        "reminder-coupon-5pct",
        None,
    );
    let again = with_offer(
        visit(
            HV,
            "hv-v5",
            at(RETURN_DAY, 6, 0),
            "FOLLOW_UP",
            None,
            300_000,
        ),
        "coupon-10pct",
        Some(30_000),
    );
    produced.extend(client.produce(&[back, again]).await);
    st.wait_caught_up(&group, LONG).await;

    // 3. Read everything back with the independent client, once the expected
    // decisions are there (or as soon as a record fails to decode).
    let summary = wait_for(
        LONG,
        Duration::from_millis(500),
        "the expected outputs",
        async || {
            let summary = client.consume().await;
            let done = !failures(&summary).is_empty()
                || (distinct(&summary, THROTTLE, "decision_id").len() >= 6
                    && distinct(&summary, TRIGGERS, "trigger_id").len() >= 3
                    && distinct(&summary, OUTCOMES, "outcome_id").len() >= 2);
            done.then_some(summary)
        },
    )
    .await;
    assert!(
        failures(&summary).is_empty(),
        "every output record must decode with the standard tools; failed: {:#}",
        json!(failures(&summary))
    );
    for topic in OUTPUTS {
        for r in records(&summary, topic) {
            assert_eq!(r["framing"], wire.decoded(), "{topic} framing: {r}");
            let id = match topic {
                THROTTLE => &r["value"]["decision_id"],
                TRIGGERS => &r["value"]["trigger_id"],
                _ => &r["value"]["outcome_id"],
            };
            assert_eq!(&r["headers"]["lapse.id"], id, "header lapse.id: {r}");
            if wire == Wire::Confluent {
                // lapse registered its output schema under `<topic>-value`.
                let id = u32::try_from(i(&r["schema_ref"])).unwrap();
                assert!(
                    st.registry
                        .subject_ids(&format!("{topic}-value"))
                        .contains(&id),
                    "{topic} schema id {id} is registered under {topic}-value"
                );
            }
        }
    }
    assert_dlq_holds_exactly_the_bad_records(&summary, &produced, &bad);

    // Throttle events: exactly these six decisions.
    let throttle = distinct(&summary, THROTTLE, "decision_id");
    let brief: Vec<String> = throttle
        .iter()
        .map(|r| {
            let v = &r["value"];
            format!(
                "{} {} {} (decided at day {:.3}, cause {}, allowed from {})",
                s(&r["key"]),
                s(&v["state"]),
                s(&v["reason"]),
                (i(&v["decided_at"]) - day(0)) as f64 / DAY as f64,
                v["cause_event_id"],
                v["allowed_from"].as_i64().map_or("-".into(), |t| format!(
                    "day {:.3}",
                    (t - day(0)) as f64 / DAY as f64
                )),
            )
        })
        .collect();
    assert_eq!(throttle.len(), 6, "{brief:#?}");
    for r in &throttle {
        assert_eq!(r["schema"], "lapse.v1.ThrottleEvent");
        let v = &r["value"];
        assert_eq!(v["scope"], "CUSTOMER_CHANNEL");
        assert_eq!(
            s(&r["key"]),
            format!(
                "{}/{}/{}",
                s(&v["tenant_id"]),
                s(&v["customer_id"]),
                s(&v["channel"])
            )
        );
    }
    // The experiment arm, read by the independent client (optional fields
    // policy_experiment / policy_arm): on clinicA's WeChat decisions only.
    let in_experiment = |v: &Value| v["tenant_id"] == "clinicA";
    // The arm when `tagged`, else no experiment fields at all.
    let check_arm = |r: &Value, tagged: bool| {
        let v = &r["value"];
        if tagged {
            assert_eq!(v["policy_experiment"], EXPERIMENT, "{r}");
            assert_eq!(v["policy_arm"], expected_arm(s(&v["customer_id"])), "{r}");
        } else {
            assert!(
                v["policy_experiment"].is_null() && v["policy_arm"].is_null(),
                "{r}"
            );
        }
    };
    for r in &throttle {
        check_arm(
            r,
            in_experiment(&r["value"]) && r["value"]["channel"] == "WECHAT",
        );
    }
    assert!(
        throttle
            .iter()
            .any(|r| in_experiment(&r["value"]) && r["value"]["channel"] == "WECHAT"),
        "{brief:#?}"
    );
    let triggers = distinct(&summary, TRIGGERS, "trigger_id");
    for r in &triggers {
        check_arm(r, in_experiment(&r["value"]));
    }
    assert!(triggers.iter().any(|r| in_experiment(&r["value"])));
    let of_key = |key: &str| -> Vec<&Value> {
        throttle
            .iter()
            .filter(|r| r["key"] == key)
            .map(|r| &r["value"])
            .collect()
    };
    let amy_wechat = of_key("clinicA/amy/WECHAT");
    assert_eq!(amy_wechat.len(), 2, "{brief:#?}");
    assert_eq!(amy_wechat[0]["state"], "CAPPED");
    assert_eq!(amy_wechat[0]["reason"], "frequency_cap");
    assert_eq!(amy_wechat[0]["cause_event_id"], "amy-w2");
    assert_eq!(i(&amy_wechat[0]["allowed_from"]), at(381, 4, 0));
    assert_eq!(amy_wechat[0]["cap"], 2);
    assert_eq!(amy_wechat[0]["window_ms"], 24 * H);
    assert_eq!(amy_wechat[0]["sends_in_window"], 2);
    assert_eq!(i(&amy_wechat[0]["decided_at"]), at(380, 6, 0));
    assert_eq!(amy_wechat[1]["state"], "OPEN");
    assert_eq!(amy_wechat[1]["reason"], "cap_window_passed");
    // Released by the timer, which fires once event time passes allowed_from (at the tick).
    let released = i(&amy_wechat[1]["decided_at"]);
    assert!(
        (at(381, 4, 0)..=day(TICK_DAY)).contains(&released),
        "{brief:#?}"
    );
    assert_eq!(amy_wechat[1]["cause_event_id"], Value::Null);
    let amy_sms = of_key("clinicA/amy/SMS");
    assert_eq!(amy_sms.len(), 1, "{brief:#?}");
    assert_eq!(amy_sms[0]["state"], "SUPPRESSED");
    assert_eq!(amy_sms[0]["reason"], "unsubscribe_reply");
    assert_eq!(amy_sms[0]["cause_event_id"], "amy-r1");
    assert_eq!(amy_sms[0]["allowed_from"], Value::Null);
    let carl_sms = of_key("brandB/carl/SMS");
    assert_eq!(carl_sms.len(), 2, "{brief:#?}");
    assert_eq!(carl_sms[0]["state"], "CAPPED");
    assert_eq!(carl_sms[0]["cause_event_id"], "carl-s2");
    assert_eq!(i(&carl_sms[0]["allowed_from"]), day(383));
    assert_eq!(carl_sms[0]["window_ms"], 7 * 24 * H);
    assert_eq!(carl_sms[1]["state"], "OPEN");
    assert_eq!(carl_sms[1]["reason"], "cap_window_passed");
    let dan_email = of_key("brandB/dan/EMAIL");
    assert_eq!(dan_email.len(), 1, "{brief:#?}");
    assert_eq!(dan_email[0]["state"], "CAPPED");
    assert_eq!(dan_email[0]["cause_event_id"], "dan-e2");
    assert_eq!(i(&dan_email[0]["allowed_from"]), day(390));

    // Recall triggers: hv AT_RISK; bob AT_RISK, then LAPSED.
    let triggers = distinct(&summary, TRIGGERS, "trigger_id");
    let brief: Vec<String> = triggers
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                s(&r["key"]),
                s(&r["value"]["stage"]),
                s(&r["value"]["segment"])
            )
        })
        .collect();
    assert_eq!(triggers.len(), 3, "{brief:#?}");
    for r in &triggers {
        assert_eq!(r["schema"], "lapse.v1.RecallTrigger");
        let v = &r["value"];
        assert_eq!(
            s(&r["key"]),
            format!("{}/{}", s(&v["tenant_id"]), s(&v["customer_id"]))
        );
        assert_eq!(v["arm"], "TREATMENT");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["currency"], "CNY");
        let fired = i(&v["fired_at"]);
        assert!(fired >= i(&v["due_at"]) && fired <= day(TICK_DAY), "{v}");
        // Too little engagement for hours of their own: the default population
        // hours (08-22), outside the channel's quiet hours.
        let after = i(&v["send_after"]);
        let local =
            chrono::TimeZone::timestamp_millis_opt(&chrono_tz::Asia::Shanghai, after).unwrap();
        let hour = chrono::Timelike::hour(&local);
        assert!(
            after >= fired && after < fired + 24 * H && (8..22).contains(&hour),
            "send_after: {v}"
        );
    }
    let trigger_of = |key: &str, stage: &str| -> &Value {
        &triggers
            .iter()
            .find(|r| r["key"] == key && r["value"]["stage"] == stage)
            .unwrap_or_else(|| panic!("no {stage} trigger for {key}: {brief:#?}"))["value"]
    };
    let hv_t = trigger_of(HV, "AT_RISK");
    assert_eq!(hv_t["stage"], "AT_RISK");
    assert_eq!(hv_t["segment"], "AT_RISK");
    assert_eq!(i(&hv_t["due_at"]), day(240 + 144));
    assert_eq!(hv_t["expected_interval_days"], 120.0);
    assert_eq!(hv_t["lifetime_value"], 4_500_000);
    assert_eq!(hv_t["last_treatment"], "BOTOX");
    let days = i(&hv_t["days_since_last_visit"]);
    assert!((144..=TICK_DAY - 240).contains(&days), "{hv_t}");
    let bob_at_risk = trigger_of(BOB, "AT_RISK");
    assert_eq!(bob_at_risk["segment"], "AT_RISK");
    assert_eq!(i(&bob_at_risk["due_at"]), day(340 + 36));
    assert!(
        i(&bob_at_risk["fired_at"]) <= history_end,
        "fired during the history: {bob_at_risk}"
    );
    let bob_lapsed = trigger_of(BOB, "LAPSED");
    assert_eq!(bob_lapsed["segment"], "LOW_VALUE_LAPSED");
    assert_eq!(i(&bob_lapsed["due_at"]), day(340 + 45));
    assert_eq!(bob_lapsed["episode_id"], bob_at_risk["episode_id"]);
    for t in [bob_at_risk, bob_lapsed] {
        assert_eq!(t["expected_interval_days"], 30.0);
        assert_eq!(t["lifetime_value"], 60_000);
        assert_eq!(t["last_treatment"], "LASER");
    }

    // Recall outcomes: hv came back after its trigger, and again.
    let outcomes = distinct(&summary, OUTCOMES, "outcome_id");
    assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
    for o in &outcomes {
        assert_eq!(o["schema"], "lapse.v1.RecallOutcome");
        assert_eq!(o["key"], HV);
    }
    let of_kind = |kind: &str| {
        let o = outcomes.iter().find(|o| o["value"]["kind"] == kind);
        &o.unwrap_or_else(|| panic!("no {kind}: {outcomes:#?}"))["value"]
    };
    let o = of_kind("RECALLED");
    assert_eq!(hv_t["offer_tier"], "reminder-coupon-5pct");
    assert_eq!(
        o["incentive_cost"], 15_000,
        "the tier's configured cost: {o}"
    );
    assert_eq!(o["trigger_id"], hv_t["trigger_id"]);
    assert_eq!(o["episode_id"], hv_t["episode_id"]);
    assert_eq!(o["stage"], "AT_RISK");
    assert_eq!(o["arm"], "TREATMENT");
    assert_eq!(o["revenue"], 1_600_000);
    assert_eq!(o["currency"], "CNY");
    assert_eq!(o["cause_event_id"], "hv-v4");
    assert_eq!(i(&o["decided_at"]), day(RETURN_DAY));
    let ttr = o["days_to_return"].as_f64().expect("days_to_return");
    assert!(ttr > 0.0 && ttr <= (RETURN_DAY - 384) as f64, "{o}");
    let r = of_kind("REPURCHASED");
    assert_eq!(r["trigger_id"], hv_t["trigger_id"]);
    assert_eq!(r["episode_id"], hv_t["episode_id"]);
    assert_eq!(
        (&r["stage"], &r["segment"], &r["arm"]),
        (&o["stage"], &o["segment"], &o["arm"])
    );
    assert_eq!(r["revenue"], 300_000);
    assert_eq!(
        (&r["marketing_cost"], &r["incentive_cost"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(
        r["days_to_return"], 0.25,
        "days since the recalling visit: {r}"
    );
    assert_eq!(r["cause_event_id"], "hv-v5");
    assert_eq!(i(&r["decided_at"]), at(RETURN_DAY, 6, 0));

    // 4. The state, as `lapse inspect` shows it.
    let amy = inspect(&st, &config, AMY).await.expect("inspect amy");
    assert_eq!(amy["visits"]["count"], 1, "{amy:#}");
    assert_eq!(amy["visits"]["lifetime_spend"], 80_000);
    assert_eq!(amy["visits"]["last_treatment"], "SKIN_CARE");
    assert_eq!(amy["channels"]["SMS"]["unsubscribed"], true, "{amy:#}");
    assert_eq!(amy["allowance"]["SMS"]["state"], "SUPPRESSED");
    assert_eq!(amy["allowance"]["SMS"]["allowed_now"], false);
    assert!(
        amy["channels"]["WECHAT"]["last_click_at"].is_string(),
        "{amy:#}"
    );
    assert!(
        amy["channels"]["WECHAT"]["last_reply_at"].is_string(),
        "{amy:#}"
    );
    assert_eq!(amy["channels"]["WECHAT"]["unsubscribed"], false);
    let remembered: u64 = amy["idempotence"]["remembered_event_ids"]
        .as_object()
        .expect("remembered ids per topic")
        .values()
        .map(|n| n.as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        remembered, 8,
        "amy's eight good events applied, none of her three bad ones: {amy:#}"
    );
    let hv = inspect(&st, &config, HV).await.expect("inspect hv");
    assert_eq!(hv["visits"]["count"], 5, "{hv:#}");
    assert_eq!(hv["visits"]["lifetime_spend"], 6_400_000);
    assert_eq!(hv["visits"]["last_treatment"], "BOTOX");
    let bob = inspect(&st, &config, BOB).await.expect("inspect bob");
    assert_eq!(bob["visits"]["count"], 1, "{bob:#}");
    let stages = bob["recall"]["stages"].as_array().expect("bob's stages");
    let fired: Vec<(&Value, &Value)> = stages
        .iter()
        .map(|st| (&st["stage"], &st["trigger_id"]))
        .collect();
    assert_eq!(
        fired,
        vec![
            (&json!("AT_RISK"), &bob_at_risk["trigger_id"]),
            (&json!("LAPSED"), &bob_lapsed["trigger_id"])
        ],
        "inspect and the topic agree: {bob:#}"
    );
    let dan = inspect(&st, &config, DAN).await.expect("inspect dan");
    assert_eq!(
        dan["allowance"]["EMAIL"]["state"], "OPEN",
        "capped only until day 390 (wall clock is later)"
    );
    assert!(
        dan["channels"]["PHONE"]["last_open_at"].is_string(),
        "{dan:#}"
    );
    assert!(
        dan["channels"]["SOCIAL"]["last_send_at"].is_string(),
        "{dan:#}"
    );
    for n in [0, POPULATION - 1] {
        let key = format!("{}/c{n:02}", if n % 2 == 0 { "clinicA" } else { "brandB" });
        let c = inspect(&st, &config, &key)
            .await
            .expect("inspect a population customer");
        assert_eq!(c["visits"]["count"], 1, "{key}: {c:#}");
    }
    for key in ["clinicA/ghost", "clinicA/someone-else"] {
        let err = inspect(&st, &config, key)
            .await
            .expect_err("a dead-lettered record changes no state");
        assert!(err.contains("no state"), "{key}: {err}");
    }

    // 5. lapse counted the same: every record read, only the bad ones rejected.
    let total = produced.len() as f64;
    assert_eq!(metric(&lapse, "lapse_records_total", &[]).await, total);
    assert_eq!(
        metric(&lapse, "lapse_records_invalid_total", &[]).await,
        bad.len() as f64
    );
    assert_eq!(
        metric(&lapse, "lapse_duplicates_skipped_total", &[]).await,
        0.0
    );

    if wire == Wire::Confluent {
        eprintln!(
            "schema registry requests:\n{}",
            st.registry.requests().join("\n")
        );
    }
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn single_object_clients_interoperate_end_to_end() {
    end_to_end(Wire::SingleObject).await;
}

#[tokio::test]
async fn confluent_clients_interoperate_end_to_end() {
    end_to_end(Wire::Confluent).await;
}

/// `METHOD url` with an optional JSON body: `(status, JSON answer)`.
async fn registry_call(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let req = match method {
        "GET" => client.get(url),
        "POST" => client.post(url),
        other => panic!("unsupported method {other}"),
    };
    let req = match body {
        Some(b) => req
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/vnd.schemaregistry.v1+json",
            )
            .body(b.to_string()),
        None => req,
    };
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("registry answer");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {url}: not JSON ({e}): {text}"));
    (status, json)
}

/// The stub answers the calls lapse and confluent-kafka make, in Confluent's
/// shapes (the end-to-end test above runs the real client against it).
#[tokio::test]
async fn the_registry_stub_answers_like_a_confluent_registry() {
    let registry = SchemaRegistryStub::start();
    let base = registry.url();
    let a = r#"{"type":"record","name":"A","namespace":"t","fields":[{"name":"n","type":"long"}]}"#;
    let b = r#"{"type":"record","name":"B","namespace":"t","fields":[]}"#;
    let call = async |method: &str, path: &str, body: Option<Value>| {
        registry_call(method, &format!("{base}{path}"), body).await
    };

    // Register, as AvroSerializer does (with its query string): ids are global.
    let (code, v) = call(
        "POST",
        "/subjects/t-value/versions?normalize=False",
        Some(json!({"schema": a, "schemaType": "AVRO", "references": []})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let id_a = v["id"].as_u64().unwrap();
    let (_, v) = call(
        "POST",
        "/subjects/u-value/versions",
        Some(json!({"schema": a.replace(',', ", ")})),
    )
    .await;
    assert_eq!(
        v["id"].as_u64(),
        Some(id_a),
        "the same schema has one id in every subject"
    );
    let (_, v) = call(
        "POST",
        "/subjects/t-value/versions",
        Some(json!({"schema": b})),
    )
    .await;
    let id_b = v["id"].as_u64().unwrap();
    assert_ne!(id_a, id_b);
    let (code, v) = call(
        "POST",
        "/subjects/t-value/versions",
        Some(json!({"schema": "{not json"})),
    )
    .await;
    assert_eq!((code, &v["error_code"]), (422, &json!(42201)), "{v}");

    // Lookup under a subject (lapse's fallback when it may not register).
    let (code, v) = call(
        "POST",
        "/subjects/t-value?normalize=False&deleted=True",
        Some(json!({"schema": a})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v,
        json!({"subject": "t-value", "id": id_a, "version": 1, "schema": a})
    );
    let (code, v) = call("POST", "/subjects/u-value", Some(json!({"schema": b}))).await;
    assert_eq!((code, &v["error_code"]), (404, &json!(40403)), "{v}");
    let (code, v) = call("POST", "/subjects/nope-value", Some(json!({"schema": a}))).await;
    assert_eq!((code, &v["error_code"]), (404, &json!(40401)), "{v}");

    // By id (AvroDeserializer adds ?subject=); AVRO has no schemaType, others do.
    let (code, v) = call("GET", &format!("/schemas/ids/{id_a}?subject=t-value"), None).await;
    assert_eq!((code, v), (200, json!({"schema": a})));
    let (code, v) = call("GET", "/schemas/ids/9999", None).await;
    assert_eq!(
        (code, v),
        (
            404,
            json!({"error_code": 40403, "message": "Schema not found"})
        )
    );
    let proto = "syntax = \"proto3\"; message P {}";
    let (_, v) = call(
        "POST",
        "/subjects/p-value/versions",
        Some(json!({"schema": proto, "schemaType": "PROTOBUF"})),
    )
    .await;
    let (_, v) = call("GET", &format!("/schemas/ids/{}", v["id"]), None).await;
    assert_eq!(v, json!({"schema": proto, "schemaType": "PROTOBUF"}));
    let (_, v) = call("GET", &format!("/schemas/ids/{id_a}/versions"), None).await;
    assert_eq!(
        v,
        json!([{"subject": "t-value", "version": 1}, {"subject": "u-value", "version": 1}])
    );

    // Subjects and versions.
    let (_, v) = call("GET", "/subjects", None).await;
    assert_eq!(v, json!(["p-value", "t-value", "u-value"]));
    let (_, v) = call("GET", "/subjects/t-value/versions", None).await;
    assert_eq!(v, json!([1, 2]));
    for latest in ["latest", "-1", "2"] {
        let (code, v) = call("GET", &format!("/subjects/t-value/versions/{latest}"), None).await;
        assert_eq!(code, 200);
        assert_eq!(
            v,
            json!({"subject": "t-value", "id": id_b, "version": 2, "schema": b})
        );
    }
    let (code, v) = call("GET", "/subjects/t-value/versions/3", None).await;
    assert_eq!((code, &v["error_code"]), (404, &json!(40402)), "{v}");
    let (code, v) = call("GET", "/subjects/t-value/versions/zero", None).await;
    assert_eq!((code, &v["error_code"]), (422, &json!(42202)), "{v}");
    let (code, v) = call("GET", "/subjects/nope-value/versions", None).await;
    assert_eq!((code, &v["error_code"]), (404, &json!(40401)), "{v}");

    // Config, associations, anything else.
    let (code, v) = call("GET", "/config", None).await;
    assert_eq!((code, v), (200, json!({"compatibilityLevel": "BACKWARD"})));
    let (code, v) = call("GET", "/config/t-value", None).await;
    assert_eq!((code, &v["error_code"]), (404, &json!(40408)), "{v}");
    let (code, v) = call(
        "GET",
        "/associations/resources/-/t?resourceType=topic&associationType=value",
        None,
    )
    .await;
    assert_eq!((code, v), (200, json!([])));
    let (code, v) = call("GET", "/mode", None).await;
    assert_eq!((code, &v["error_code"]), (404, &json!(404)), "{v}");

    // Down: every call answers 503; every call was recorded.
    registry.set_available(false);
    let (code, v) = call("GET", "/config", None).await;
    assert_eq!((code, &v["error_code"]), (503, &json!(50003)), "{v}");
    registry.set_available(true);
    assert_eq!(registry.id_lookups(), 3);
    assert_eq!(
        registry.subject_ids("t-value"),
        vec![id_a as u32, id_b as u32]
    );
    let requests = registry.requests();
    assert_eq!(
        requests.last().map(String::as_str),
        Some("GET /config"),
        "refused calls are recorded too"
    );
    assert_eq!(
        requests[0],
        "POST /subjects/t-value/versions?normalize=False"
    );
}

/// README's Python example ("Producing to lapse"), run as a user would: its
/// send is applied (not dead-lettered) and counts against the WeChat cap.
#[tokio::test]
async fn the_readme_python_example_is_applied() {
    let st = Stack::start().await;
    let group = unique_name("g-readme");
    let config = st.config_with("readme", "", "");
    let mut lapse = st.spawn(&group, &config);
    lapse.wait_ready(LONG).await;
    let occurred_at = chrono::Utc::now().timestamp_millis() - 60_000;
    let out = tokio::process::Command::new(interop_python())
        .arg(interop_dir().join("produce_example.py"))
        .args([
            st.broker.bootstrap(),
            schemas_dir(),
            occurred_at.to_string(),
        ])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run produce_example.py");
    assert!(
        out.status.success(),
        "produce_example.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    st.wait_caught_up(&group, LONG).await;
    let c = inspect(&st, &config, "glow-clinics/c-0001")
        .await
        .expect("the example's customer has state");
    let sent_at = chrono::DateTime::from_timestamp_millis(occurred_at)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert_eq!(
        c["channels"]["WECHAT"]["last_send_at"],
        sent_at.as_str(),
        "{c:#}"
    );
    assert_eq!(c["allowance"]["WECHAT"]["sends_in_window"], 1, "{c:#}");
    let summary = Client {
        s: &st,
        wire: Wire::SingleObject,
        registry: None,
    }
    .consume()
    .await;
    assert!(dlq(&summary).is_empty(), "dead-lettered: {summary:#}");
}

fn feedback(key: &str, id: &str, t: i64, kind: &str, score: i64, visit: Option<&str>) -> Value {
    event(
        "feedback",
        key,
        json!({ "event_id": id, "occurred_at": t, "kind": kind, "score": score,
                "visit_event_id": visit, "channel": "WECHAT" }),
    )
}

/// Written by a producer on another version of `feedback.avsc` (schema
/// evolution): "older" has no `visit_event_id` and `channel`, "newer" one more
/// optional field.
fn feedback_by(writer: &str, key: &str, id: &str, t: i64, kind: &str, score: i64) -> Value {
    let mut e = feedback(key, id, t, kind, score, None);
    let v = e["value"].as_object_mut().unwrap();
    match writer {
        "older" => {
            v.remove("visit_event_id");
            v.remove("channel");
        }
        _ => {
            v.insert("survey_id".into(), json!("q3-survey"));
        }
    }
    e["writer"] = writer.into();
    e
}

/// Satisfaction feedback from the independent Python producer (Confluent
/// framing, the registry stub) through the real pipeline: a detractor's score
/// starts exactly one CARE_CALL trigger (also when the producer re-sends it),
/// read back by the independent consumer with the registry's schema; a
/// promoter's none; scores from an older and a newer writer schema are
/// applied; out-of-range scores are dead-lettered; a visit after a care call
/// is no recall.
#[tokio::test]
async fn feedback_from_an_independent_producer_starts_one_care_call() {
    let st = Stack::start().await;
    st.broker.create_compacted_topic(THROTTLE, PARTITIONS).await;
    st.broker.create_topic(TRIGGERS, PARTITIONS).await;
    st.broker.create_topic(OUTCOMES, PARTITIONS).await;
    let group = unique_name("g-feedback");
    let config = st.config_with(
        "feedback",
        "",
        "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"20ms\"\n\
         [policy.lapse]\nholdout_share = 0.0\n",
    );
    let mut lapse = st.spawn(&group, &config);
    lapse.wait_ready(LONG).await;
    let client = Client {
        s: &st,
        wire: Wire::Confluent,
        registry: Some(st.registry.url()),
    };
    const FAY: &str = "clinicA/fay";
    const GUS: &str = "clinicA/gus";
    const HAL: &str = "brandB/hal";
    const IVY: &str = "brandB/ivy";
    // `day(d)` is noon local time: at(d, 14, 0) is 02:00 the next night.
    let fay_nps = feedback(FAY, "fay-f1", at(100, 14, 0), "NPS", 3, Some("fay-v1"));
    // The history first, applied before any feedback is read: a care call is
    // decided from what the state holds when its feedback is applied, and
    // the inputs are separate topics read in no fixed order.
    let history = vec![
        // fay: a treatment, WeChat engagement, SMS opt-out (then an NPS of 3,
        // a detractor, in the middle of the night, re-sent by the producer).
        visit(
            FAY,
            "fay-v1",
            at(99, 0, 0),
            "TREATMENT",
            Some("BOTOX"),
            500_000,
        ),
        send(FAY, "fay-s1", at(99, 1, 0), "WECHAT", "MARKETING", None),
        open(FAY, "fay-o1", at(99, 2, 0), "WECHAT", "m-fay-s1"),
        reply(FAY, "fay-r1", at(99, 3, 0), "SMS", "TD"),
        // gus (a promoter below: no care call).
        visit(
            GUS,
            "gus-v1",
            at(99, 0, 0),
            "TREATMENT",
            Some("LASER"),
            80_000,
        ),
    ];
    let events = vec![
        fay_nps.clone(),
        fay_nps,
        feedback(GUS, "gus-f1", at(100, 0, 0), "NPS", 9, Some("gus-v1")),
        // hal: CSAT 2 (a detractor) from a producer on an older schema, no visit ever.
        feedback_by("older", HAL, "hal-f1", at(100, 13, 0), "CSAT", 2),
        // ivy: CSAT 5 from a producer on a newer schema.
        feedback_by("newer", IVY, "ivy-f1", at(100, 1, 0), "CSAT", 5),
        // Out of range for their scale: dead-lettered.
        feedback(IVY, "ivy-bad-nps", at(100, 2, 0), "NPS", 11, None),
        feedback(IVY, "ivy-bad-csat", at(100, 2, 0), "CSAT", 0, None),
    ];
    // Positions in `produced`: the 5 history records, then the feedback.
    let bad = [(10, "invalid_field"), (11, "invalid_field")];
    let mut produced = client.produce(&history).await;
    st.wait_caught_up(&group, LONG).await;
    produced.extend(client.produce(&events).await);
    st.wait_caught_up(&group, LONG).await;
    // fay comes back after her care call (read after it): not a recall.
    let back = visit(
        FAY,
        "fay-v2",
        at(104, 0, 0),
        "TREATMENT",
        Some("BOTOX"),
        500_000,
    );
    produced.extend(client.produce(&[back]).await);
    // Three writer versions of lapse.v1.Feedback, each registered by the serializer.
    assert_eq!(
        st.registry.subject_ids("clinic.feedback-value").len(),
        3,
        "{produced:#?}"
    );
    st.wait_caught_up(&group, LONG).await;

    let summary = wait_for(
        LONG,
        Duration::from_millis(500),
        "two care calls",
        async || {
            let summary = client.consume().await;
            let care_calls = records(&summary, TRIGGERS)
                .iter()
                .filter(|r| r["value"]["stage"] == "CARE_CALL")
                .count();
            (!failures(&summary).is_empty() || care_calls >= 2).then_some(summary)
        },
    )
    .await;
    assert!(
        failures(&summary).is_empty(),
        "every output decodes with the registry's schema: {:#}",
        json!(failures(&summary))
    );
    assert_dlq_holds_exactly_the_bad_records(&summary, &produced, &bad);
    let messages: Vec<&str> = dlq(&summary)
        .iter()
        .filter_map(|r| r["headers"]["lapse.error.message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("11 is outside the NPS scale (0-10)")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("0 is outside the CSAT scale (1-5)")),
        "{messages:?}"
    );

    let all = records(&summary, TRIGGERS);
    let triggers = distinct(&summary, TRIGGERS, "trigger_id");
    assert_eq!(triggers.len(), 2, "{triggers:#?}");
    let care_call = |key: &str| -> &Value {
        &triggers
            .iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("no care call for {key}: {triggers:#?}"))["value"]
    };
    for (key, feedback_id, at_) in [
        (FAY, "fay-f1", at(100, 14, 0)),
        (HAL, "hal-f1", at(100, 13, 0)),
    ] {
        let t = care_call(key);
        let (tenant, customer) = key.split_once('/').unwrap();
        let id = lapse::domain::recall::care_call_id(
            &lapse::domain::event::CustomerRef::new(tenant, customer),
            feedback_id,
        );
        assert_eq!(t["trigger_id"], id.as_str(), "{t}");
        assert_eq!(
            all.iter()
                .filter(|r| r["value"]["trigger_id"] == id.as_str())
                .count(),
            1,
            "exactly one record, the re-sent feedback included"
        );
        assert_eq!(t["stage"], "CARE_CALL", "{t}");
        assert_eq!(t["purpose"], "SERVICE", "{t}");
        assert_eq!(t["arm"], "TREATMENT", "service is never held out: {t}");
        assert_eq!(t["segment"], "AT_RISK", "{t}");
        assert_eq!(t["offer_tier"], "CARE_CALL", "{t}");
        assert_eq!(i(&t["fired_at"]), at_, "{t}");
        assert_eq!(i(&t["due_at"]), at_, "{t}");
        // Quiet hours (02:00 and 01:00 local are inside every default quiet
        // period) are kept by timing: sent after them, in a good hour.
        let after = i(&t["send_after"]);
        let local =
            chrono::TimeZone::timestamp_millis_opt(&chrono_tz::Asia::Shanghai, after).unwrap();
        assert!(
            after > at_
                && after < at_ + 24 * H
                && (8..22).contains(&chrono::Timelike::hour(&local)),
            "send_after: {t}"
        );
    }
    let fay = care_call(FAY);
    let fay_channels: Vec<&Value> = std::iter::once(&fay["recommended_channel"])
        .chain(fay["fallback_channels"].as_array().unwrap())
        .collect();
    assert_eq!(
        fay["recommended_channel"], "WECHAT",
        "her engaged channel: {fay}"
    );
    assert!(!fay_channels.contains(&&json!("SMS")), "opted out: {fay}");
    assert_eq!(fay["last_treatment"], "BOTOX");
    assert_eq!(fay["lifetime_value"], 500_000);
    assert_eq!(fay["days_since_last_visit"], 1);
    let hal = care_call(HAL);
    assert!(
        hal["fallback_channels"]
            .as_array()
            .unwrap()
            .contains(&json!("PHONE")),
        "a care call may go by phone whatever the value tier: {hal}"
    );
    assert_eq!(hal["lifetime_value"], 0);
    assert!(
        records(&summary, OUTCOMES).is_empty(),
        "fay's visit after her care call is no recall: {:#?}",
        records(&summary, OUTCOMES)
    );

    // The state keeps the latest score; lapse counted every class once.
    let ivy = inspect(&st, &config, IVY).await.expect("inspect ivy");
    assert_eq!(ivy["feedback"]["kind"], "CSAT", "{ivy:#}");
    assert_eq!(
        ivy["feedback"]["score"], 5,
        "the newer writer's record: {ivy:#}"
    );
    let hal = inspect(&st, &config, HAL).await.expect("inspect hal");
    assert_eq!(
        hal["feedback"]["score"], 2,
        "the older writer's record: {hal:#}"
    );
    let fay = inspect(&st, &config, FAY).await.expect("inspect fay");
    assert_eq!(fay["feedback"]["score"], 3, "{fay:#}");
    assert_eq!(fay["idempotence"]["remembered_event_ids"]["feedback"], 1);
    for (tenant, kind, class) in [
        ("clinicA", "nps", "detractor"),
        ("clinicA", "nps", "promoter"),
        ("brandB", "csat", "detractor"),
        ("brandB", "csat", "promoter"),
    ] {
        let labels = [("tenant", tenant), ("kind", kind), ("class", class)];
        let n = metric(&lapse, "lapse_feedback_total", &labels).await;
        assert_eq!(n, 1.0, "{labels:?}");
    }
    assert_eq!(
        metric(
            &lapse,
            "lapse_duplicates_skipped_total",
            &[("event_type", "feedback")]
        )
        .await,
        1.0,
        "the re-sent feedback"
    );
    assert_eq!(
        metric(
            &lapse,
            "lapse_feedback_scores_count",
            &[
                ("kind", "nps"),
                ("segment", "active"),
                ("recall_arm", "none")
            ]
        )
        .await,
        2.0
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}
