//! The experiment arm on outputs (`policy_experiment`, `policy_arm`: optional,
//! default null), read by an independent reader: fastavro (no lapse code)
//! decodes lapse's single-object throttle events, recall triggers and outcomes with the
//! shipped schemas (the new fields are there), with the schema of before
//! these fields (a reader that has not upgraded: it skips them), and reads a
//! record written with the earlier schema under the new one (null).

mod common;

use common::hex;

use std::path::Path;

use lapse::codec::{Encoder, Framing, SchemaSet, RECALL_OUTCOME, RECALL_TRIGGER, THROTTLE_EVENT};
use lapse::domain::allowance::{AllowanceState, ThrottleDecision};
use lapse::domain::event::Channel;
use lapse::domain::experiment::ArmTag;
use lapse::domain::lapse::{Segment, Stage};
use lapse::domain::recall::{Arm, OutcomeKind, RecallOutcome, RecallTrigger};
use lapse::outputs::{outcome_value, throttle_value, trigger_value};
use serde_json::{json, Value};

const READER: &str = r#"
import io, json, sys
import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

cases = json.load(sys.stdin)
out = []
for c in cases:
    new = json.load(open(c["schema"], encoding="utf-8"))
    old = dict(new, fields=[f for f in new["fields"] if not f["name"].startswith("policy_")])
    data = bytes.fromhex(c["hex"])
    header = "c301" + fingerprint(to_parsing_canonical_form(new), "CRC-64-AVRO")
    body = data[10:]
    as_new = fastavro.schemaless_reader(io.BytesIO(body), fastavro.parse_schema(new))
    as_old = fastavro.schemaless_reader(
        io.BytesIO(body), fastavro.parse_schema(new), fastavro.parse_schema(old)
    )
    # A record written with the earlier schema, read with the new one.
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old), as_old)
    buf.seek(0)
    old_as_new = fastavro.schemaless_reader(buf, fastavro.parse_schema(old), fastavro.parse_schema(new))
    out.append({
        "header_ok": data[:10].hex() == header,
        "new": {k: as_new.get(k) for k in ("policy_experiment", "policy_arm")},
        "old_has_fields": any(k.startswith("policy_") for k in as_old),
        "old_record_as_new": {k: old_as_new.get(k) for k in ("policy_experiment", "policy_arm")},
    })
json.dump(out, sys.stdout)
"#;

fn fastavro(cases: &Value) -> Value {
    common::python_json(READER, cases)
}

#[test]
fn fastavro_reads_the_experiment_arm_and_old_readers_skip_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let enc = Encoder::new(&SchemaSet::load(&root.join("schemas")).unwrap());
    let tag = ArmTag {
        experiment: "wechat-1-vs-2".into(),
        arm: "one-a-day".into(),
    };
    let d = ThrottleDecision {
        decision_id: "d1".into(),
        tenant_id: "brandA".into(),
        customer_id: Some("c1".into()),
        channel: Some(Channel::Wechat),
        campaign_id: None,
        state: AllowanceState::Capped,
        reason: "frequency_cap".into(),
        allowed_from: Some(1_800_000_000_000),
        cap: Some(1),
        window_ms: Some(86_400_000),
        short_click_rate: None,
        baseline_click_rate: None,
        sends_in_window: 1,
        decided_at: 1_799_990_000_000,
        cause_event_id: Some("e1".into()),
        previous: None,
    };
    let t = RecallTrigger {
        trigger_id: "t1".into(),
        tenant_id: "brandA".into(),
        customer_id: "c1".into(),
        episode_id: "ep".into(),
        stage: Stage::AtRisk,
        attempt: 1,
        segment: Segment::AtRisk,
        days_since_last_visit: 144,
        expected_interval_days: 120.0,
        lifetime_value: 100_000,
        currency: "CNY".into(),
        last_treatment: Some("BOTOX".into()),
        recommended_channel: Some(Channel::Wechat),
        fallback_channels: vec![Channel::Sms],
        offer_tier: "reminder-coupon-5pct".into(),
        experiment: "recall-v1".into(),
        arm: Arm::Treatment,
        due_at: 1_799_990_000_000,
        fired_at: 1_799_990_000_000,
        send_after: Some(1_800_000_000_000),
    };
    let o = RecallOutcome {
        outcome_id: "o1".into(),
        trigger_id: "t1".into(),
        kind: OutcomeKind::Recalled,
        tenant_id: "brandA".into(),
        customer_id: "c1".into(),
        episode_id: "ep".into(),
        stage: Stage::AtRisk,
        segment: Segment::AtRisk,
        experiment: "recall-v1".into(),
        arm: Arm::Treatment,
        days_to_return: Some(3.5),
        revenue: 120_000,
        marketing_cost: 10,
        incentive_cost: 30_000,
        currency: "CNY".into(),
        cause_event_id: Some("v9".into()),
        decided_at: 1_800_000_000_000,
    };
    let case = |schema: &str, bytes: Vec<u8>| json!({"schema": root.join("schemas").join(schema), "hex": hex(&bytes)});
    let single = Framing::SingleObject;
    let cases = json!([
        case(
            "throttle_event.avsc",
            enc.encode_value(THROTTLE_EVENT, throttle_value(&d, Some(&tag)), single)
                .unwrap()
        ),
        case(
            "recall_trigger.avsc",
            enc.encode_value(RECALL_TRIGGER, trigger_value(&t, Some(&tag)), single)
                .unwrap()
        ),
        case(
            "throttle_event.avsc",
            enc.encode_value(THROTTLE_EVENT, throttle_value(&d, None), single)
                .unwrap()
        ),
        case(
            "recall_outcome.avsc",
            enc.encode_value(RECALL_OUTCOME, outcome_value(&o, Some(&tag)), single)
                .unwrap()
        ),
    ]);
    let out = fastavro(&cases);
    let tagged = json!({"policy_experiment": "wechat-1-vs-2", "policy_arm": "one-a-day"});
    let none = json!({"policy_experiment": null, "policy_arm": null});
    for (i, expected) in [&tagged, &tagged, &none, &tagged].into_iter().enumerate() {
        let r = &out[i];
        assert_eq!(r["header_ok"], true, "case {i}: {r}");
        assert_eq!(&r["new"], expected, "case {i}: {r}");
        assert_eq!(r["old_has_fields"], false, "case {i}: {r}");
        assert_eq!(r["old_record_as_new"], none, "case {i}: {r}");
    }
}
