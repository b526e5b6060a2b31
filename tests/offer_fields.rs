//! Schema evolution of issue 15's offer fields, against independent
//! implementations (no lapse code on the other side):
//! * `Visit.offer_code` / `discount` (optional, default null): the Avro
//!   project's Java `SchemaCompatibility` finds the new and the earlier visit
//!   schema compatible both ways; visits that fastavro writes with either
//!   (single-object) decode, the earlier one with no offer; a negative
//!   discount or an oversized code is invalid.
//! * `RecallOutcome.incentive_cost` (long, default 0) and the `REPURCHASED`
//!   symbol: BACKWARD compatible (what a registry checks by default: the new
//!   schema reads every earlier record, `incentive_cost` 0), not FORWARD: a
//!   reader pinned to the earlier schema cannot read a `REPURCHASED` (it reads
//!   `RECALLED` and skips `incentive_cost`), so such consumers upgrade first.

mod common;

use common::hex;

use std::path::{Path, PathBuf};

use lapse::codec::{DecodeLimits, Decoder, Encoder, Framing, SchemaSet, RECALL_OUTCOME};
use lapse::domain::event::{EventBody, EventKind};
use lapse::domain::lapse::{Segment, Stage};
use lapse::domain::recall::{Arm, OutcomeKind, RecallOutcome};
use lapse::outputs::outcome_value;
use serde_json::{json, Value};

const PY: &str = r#"
import io, json, sys
import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

req = json.load(sys.stdin)
def load(p):
    return json.load(open(p, encoding="utf-8"))

def single_object(schema, record):
    header = bytes.fromhex("c301" + fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return (header + buf.getvalue()).hex()

visits = [single_object(load(v["schema"]), v["record"]) for v in req["visits"]]

new, old = load(req["outcome_new"]), load(req["outcome_old"])
outcomes = []
for h in req["outcomes"]:
    body = io.BytesIO(bytes.fromhex(h)[10:])
    r = {"new": fastavro.schemaless_reader(body, fastavro.parse_schema(new))}
    body.seek(0)
    try:
        r["old"] = fastavro.schemaless_reader(body, fastavro.parse_schema(new), fastavro.parse_schema(old))
    except Exception as e:
        r["old_error"] = type(e).__name__
    outcomes.append(r)
# A record written with the earlier schema, read with the new one.
buf = io.BytesIO()
fastavro.schemaless_writer(buf, fastavro.parse_schema(old), outcomes[0]["old"])
buf.seek(0)
old_as_new = fastavro.schemaless_reader(buf, fastavro.parse_schema(old), fastavro.parse_schema(new))
json.dump({"visits": visits, "outcomes": outcomes, "old_as_new": old_as_new}, sys.stdout, default=str)
"#;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn path(p: &str) -> PathBuf {
    root().join(p)
}

fn fastavro(req: &Value) -> Value {
    common::python_json(PY, req)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const NOW: i64 = 1_800_000_000_000;

fn visit(extra: Value) -> Value {
    let mut v = json!({
        "event_id": "v1", "tenant_id": "brandA", "customer_id": "c1",
        "occurred_at": NOW - 60_000, "visit_type": "TREATMENT", "treatment": "BOTOX",
        "amount": 380000, "currency": "CNY",
    });
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

fn outcome(kind: OutcomeKind, incentive_cost: i64) -> RecallOutcome {
    RecallOutcome {
        outcome_id: "o1".into(),
        trigger_id: "t1".into(),
        kind,
        tenant_id: "brandA".into(),
        customer_id: "c1".into(),
        episode_id: "e1".into(),
        stage: Stage::Lapsed,
        segment: Segment::LowValueLapsed,
        experiment: "recall-v1".into(),
        arm: Arm::Treatment,
        days_to_return: Some(12.0),
        revenue: 380_000,
        marketing_cost: 6,
        currency: "CNY".into(),
        cause_event_id: Some("v1".into()),
        decided_at: NOW,
        incentive_cost,
    }
}

#[test]
fn java_finds_the_new_visit_and_outcome_schemas_backward_compatible() {
    let (visit_new, visit_old) = ("schemas/visit.avsc", "schemas/history/v1/visit.avsc");
    let (out_new, out_old) = (
        "schemas/recall_outcome.avsc",
        "tests/fixtures/avro/recall_outcome.v1.avsc",
    );
    let out = common::java(
        "Compatibility.java",
        &[
            visit_new, visit_old, visit_old, visit_new, out_new, out_old, out_old, out_new,
        ],
    );
    let got: Vec<&str> = out
        .lines()
        .map(|l| l.rsplit('\t').next().unwrap())
        .collect();
    assert_eq!(
        got,
        ["COMPATIBLE", "COMPATIBLE", "COMPATIBLE", "INCOMPATIBLE"],
        "{out}"
    );
}

#[tokio::test]
async fn fastavro_visits_with_and_without_offers_decode_and_outcomes_read_back() {
    let set = SchemaSet::load(&path("schemas")).unwrap();
    let enc = Encoder::new(&set);
    let single = Framing::SingleObject;
    let recalled = outcome(OutcomeKind::Recalled, 15_000);
    let repurchased = RecallOutcome {
        incentive_cost: 0,
        ..outcome(OutcomeKind::Repurchased, 0)
    };
    let new = path("schemas/visit.avsc");
    let old = path("schemas/history/v1/visit.avsc");
    let req = json!({
        "visits": [
            {"schema": old, "record": visit(json!({}))},
            {"schema": new, "record": visit(json!({"offer_code": " coupon-10pct ", "discount": 38000}))},
            {"schema": new, "record": visit(json!({"offer_code": "vip-care-call"}))},
            {"schema": new, "record": visit(json!({"offer_code": "", "discount": null}))},
            {"schema": new, "record": visit(json!({"discount": -1}))},
            {"schema": new, "record": visit(json!({"offer_code": "x".repeat(101)}))},
        ],
        "outcome_new": path("schemas/recall_outcome.avsc"),
        "outcome_old": path("tests/fixtures/avro/recall_outcome.v1.avsc"),
        "outcomes": [
            hex(&enc.encode_value(RECALL_OUTCOME, outcome_value(&recalled, None), single).unwrap()),
            hex(&enc.encode_value(RECALL_OUTCOME, outcome_value(&repurchased, None), single).unwrap()),
        ],
    });
    let out = fastavro(&req);

    let d = Decoder::new(set, None, DecodeLimits::default());
    let mut decoded = Vec::new();
    for h in out["visits"].as_array().unwrap() {
        let bytes = unhex(h.as_str().unwrap());
        decoded.push(
            d.decode(EventKind::Visit, Some(b"brandA/c1"), &bytes, NOW)
                .await
                .map(|e| match e.body {
                    EventBody::Visit {
                        offer_code,
                        discount,
                        ..
                    } => (offer_code, discount),
                    other => panic!("not a visit: {other:?}"),
                })
                .map_err(|e| e.to_string()),
        );
    }
    let ok = |c: Option<&str>, d: Option<i64>| Ok((c.map(str::to_string), d));
    assert_eq!(decoded[0], ok(None, None), "an earlier producer's visit");
    assert_eq!(decoded[1], ok(Some("coupon-10pct"), Some(38_000)));
    assert_eq!(decoded[2], ok(Some("vip-care-call"), None));
    assert_eq!(decoded[3], ok(None, None), "empty is no offer");
    let e = decoded[4].as_ref().unwrap_err();
    assert!(e.contains("discount") && e.contains("negative"), "{e}");
    let e = decoded[5].as_ref().unwrap_err();
    assert!(e.contains("offer_code") && e.contains("at most 100"), "{e}");

    let [r, p] = [&out["outcomes"][0], &out["outcomes"][1]];
    assert_eq!(r["new"]["kind"], "RECALLED");
    assert_eq!(r["new"]["incentive_cost"], 15_000);
    assert_eq!(r["new"]["marketing_cost"], 6);
    assert_eq!(p["new"]["kind"], "REPURCHASED");
    assert_eq!(p["new"]["revenue"], 380_000);
    // A reader on the earlier schema: RECALLED without the new field; no
    // REPURCHASED (unknown symbol, and that schema has no enum default).
    assert_eq!(r["old"]["kind"], "RECALLED");
    assert!(r["old"].get("incentive_cost").is_none(), "{r}");
    assert!(p.get("old").is_none() && p["old_error"].is_string(), "{p}");
    // An earlier record read with the new schema: incentive_cost 0.
    assert_eq!(out["old_as_new"]["incentive_cost"], 0);
    assert_eq!(out["old_as_new"]["kind"], "RECALLED");
}
