//! lapse's decoder against records written by an independent Avro library.
//!
//! `tests/interop/encode_cases.py` (fastavro, no lapse code) writes one record
//! per case with a producer's own writer schema: other namespaces, timestamps
//! in micro- or nanoseconds, unions in another order, decimal amounts, enum
//! symbols lapse does not know, schema references. Each case is decoded here
//! with lapse's library API, in both framings a producer may use:
//!
//! * Confluent: the writer schema is registered with the test schema registry,
//!   and the body framed with the id it answers;
//! * single-object: fastavro's own framing (its Parsing Canonical Form and
//!   CRC-64-AVRO fingerprint), decoded with the writer schema filed under
//!   `history/` of a copy of `schemas/`, as a user would.
//!
//! The expected outcome (event fields, or the dead-letter reason) is asserted
//! per case; see `encode_cases.py` for what each record holds.

mod common;

use lapse::codec::{DecodeError, DecodeLimits, Decoder, RegistryClient, SchemaSet};
use lapse::domain::event::{Channel, Event, EventBody, EventKind, Purpose, ReplyClass, VisitType};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// The consumer's clock in every decode; `encode_cases.py` writes events a
/// minute older.
const NOW: i64 = 1_750_000_000_000;
const OCCURRED_AT: i64 = NOW - 60_000;

struct Case {
    kind: EventKind,
    key: String,
    /// The writer schema as the producer declared it (JSON text).
    schema: String,
    /// The Avro datum.
    body: Vec<u8>,
    /// `C3 01` + fingerprint + body, as fastavro computes it.
    single_object: Option<Vec<u8>>,
    /// Confluent schema references of the schema, if any.
    references: Option<serde_json::Value>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Every case, written once per test process by the Python script.
fn cases() -> &'static HashMap<String, Case> {
    static CASES: OnceLock<HashMap<String, Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        let script = common::interop_dir().join("encode_cases.py");
        let out = std::process::Command::new(common::interop_python())
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let all: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("the script prints JSON");
        all.into_iter()
            .map(|(name, c)| {
                let kind = match c["kind"].as_str().expect("kind") {
                    "send" => EventKind::Send,
                    "open" => EventKind::Open,
                    "click" => EventKind::Click,
                    "reply" => EventKind::Reply,
                    "visit" => EventKind::Visit,
                    other => panic!("case {name}: kind {other}"),
                };
                let case = Case {
                    kind,
                    key: c["key"].as_str().expect("key").to_owned(),
                    schema: c["schema"].as_str().expect("schema").to_owned(),
                    body: hex(c["body"].as_str().expect("body")),
                    single_object: c["single_object"].as_str().map(hex),
                    references: c.get("references").cloned(),
                };
                (name, case)
            })
            .collect()
    })
}

fn case(name: &str) -> &'static Case {
    cases()
        .get(name)
        .unwrap_or_else(|| panic!("encode_cases.py has no case {name}"))
}

#[derive(Debug, Clone, Copy)]
enum Via {
    Confluent,
    SingleObject,
}

/// A copy of the repository's `schemas/` with `readers` replacing top-level
/// files and `writers` filed under `history/`.
fn schemas_dir(
    readers: &[(&str, serde_json::Value)],
    writers: &[(&str, &str)],
) -> tempfile::TempDir {
    let dir = common::scratch_dir("codec-interop");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    for entry in std::fs::read_dir(&shipped).expect("schemas/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "avsc") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).expect("copy");
        }
    }
    for (file, json) in readers {
        std::fs::write(dir.path().join(file), json.to_string()).expect("reader");
    }
    std::fs::create_dir(dir.path().join("history")).expect("history/");
    for (name, text) in writers {
        std::fs::write(dir.path().join(format!("history/{name}.avsc")), text).expect("writer");
    }
    dir
}

/// A shipped schema file as JSON, to derive reader variants from.
fn shipped(file: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(path).expect("schema file")).expect("JSON")
}

/// Decodes case `name` framed `via`, with the shipped reader schemas except `readers`.
async fn decode_with(
    name: &str,
    via: Via,
    readers: &[(&str, serde_json::Value)],
) -> Result<Event, DecodeError> {
    let c = case(name);
    match via {
        Via::SingleObject => {
            let payload = c
                .single_object
                .as_deref()
                .unwrap_or_else(|| panic!("case {name} has no single-object form"));
            let dir = schemas_dir(readers, &[(name, &c.schema)]);
            let set = SchemaSet::load(dir.path()).expect("schemas load");
            let d = Decoder::new(set, None, DecodeLimits::default());
            d.decode(c.kind, Some(c.key.as_bytes()), payload, NOW).await
        }
        Via::Confluent => {
            let stub = common::SchemaRegistryStub::start();
            let id = stub.register(&format!("{name}-value"), &c.schema).await;
            let registry =
                RegistryClient::new(&stub.url(), Duration::from_secs(5)).expect("registry client");
            // Confluent wire format: magic 0, the 4-byte big-endian id, the datum.
            let mut payload = vec![0u8];
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&c.body);
            let dir = schemas_dir(readers, &[]);
            let set = SchemaSet::load(dir.path()).expect("schemas load");
            let d = Decoder::new(set, Some(registry), DecodeLimits::default());
            d.decode(c.kind, Some(c.key.as_bytes()), &payload, NOW)
                .await
        }
    }
}

async fn decode(name: &str, via: Via) -> Result<Event, DecodeError> {
    decode_with(name, via, &[]).await
}

async fn decoded(name: &str, via: Via) -> Event {
    decode(name, via)
        .await
        .unwrap_or_else(|e| panic!("case {name} via {via:?}: {e} ({})", e.reason()))
}

async fn refused(name: &str, via: Via, reason: &str) -> String {
    match decode(name, via).await {
        Ok(e) => panic!("case {name} via {via:?} decoded: {e:?}"),
        Err(e) => {
            assert_eq!(e.reason(), reason, "case {name} via {via:?}: {e}");
            e.to_string()
        }
    }
}

/// The send every send case writes (`send_value()` of the script).
fn send(channel: Channel, campaign_id: Option<&str>, cost: Option<i64>) -> EventBody {
    EventBody::Send {
        channel,
        message_id: "m1".into(),
        campaign_id: campaign_id.map(str::to_owned),
        purpose: Purpose::Marketing,
        cost,
    }
}

fn assert_send(e: &Event, body: EventBody) {
    assert_eq!(e.event_id, "evt-interop-1");
    assert_eq!(e.customer.key(), "glow/cust-42");
    assert_eq!(e.occurred_at, OCCURRED_AT);
    assert_eq!(e.body, body);
}

fn amount(e: &Event) -> (i64, &str) {
    match &e.body {
        EventBody::Visit {
            amount, currency, ..
        } => (*amount, currency),
        other => panic!("not a visit: {other:?}"),
    }
}

// --- 1. timestamps ------------------------------------------------------------

async fn timestamp_micros(via: Via) {
    // Written 999 µs past the millisecond: floored.
    let e = decoded("timestamp_micros", via).await;
    assert_send(&e, send(Channel::Wechat, Some("spring"), Some(12)));
}

async fn timestamp_nanos(via: Via) {
    let e = decoded("timestamp_nanos", via).await;
    assert_send(&e, send(Channel::Wechat, Some("spring"), Some(12)));
}

async fn timestamp_plain_long(via: Via) {
    let e = decoded("timestamp_plain_long", via).await;
    assert_send(&e, send(Channel::Wechat, Some("spring"), Some(12)));
}

async fn local_timestamp_millis(via: Via) {
    let msg = refused("local_timestamp_millis", via, "schema_mismatch").await;
    assert!(
        msg.contains("`occurred_at` is written as local-timestamp-millis"),
        "{msg}"
    );
    assert!(msg.contains("no time zone"), "{msg}");
    assert!(msg.contains("timestamp-millis"), "{msg}");
}

// --- 2. record names ------------------------------------------------------------

async fn no_namespace(via: Via) {
    let e = decoded("no_namespace", via).await;
    assert_send(&e, send(Channel::Wechat, Some("spring"), Some(12)));
}

async fn other_namespace(via: Via) {
    let e = decoded("other_namespace", via).await;
    assert_send(&e, send(Channel::Wechat, Some("spring"), Some(12)));
}

async fn renamed_record_needs_a_reader_alias(via: Via) {
    let msg = refused("renamed", via, "schema_mismatch").await;
    assert!(msg.contains("com.clinic.events.MessageSent"), "{msg}");
    let mut reader = shipped("send.avsc");
    reader["aliases"] = serde_json::json!(["com.clinic.events.MessageSent"]);
    let e = decode_with("renamed", via, &[("send.avsc", reader)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_send(&e, send(Channel::Wechat, Some("spring"), Some(12)));
}

// --- 3. enum symbols lapse does not know ---------------------------------------

async fn unknown_channel(via: Via) {
    let msg = refused("unknown_channel", via, "bad_enum").await;
    assert!(
        msg.contains("field `channel` has symbol \"DOUYIN\""),
        "{msg}"
    );
    assert!(msg.contains("WECHAT, SMS, PHONE, EMAIL, SOCIAL"), "{msg}");
    assert!(msg.contains("`default`"), "{msg}");

    // A reader enum with a default reads unknown symbols as it (Avro spec).
    let mut reader = shipped("send.avsc");
    let channel = reader["fields"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "channel")
        .unwrap();
    channel["type"]["default"] = "SOCIAL".into();
    let e = decode_with("unknown_channel", via, &[("send.avsc", reader)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_send(&e, send(Channel::Social, Some("spring"), Some(12)));
}

async fn unknown_visit_type(via: Via) {
    let msg = refused("unknown_visit_type", via, "bad_enum").await;
    assert!(
        msg.contains("field `visit_type` has symbol \"CHECKUP\""),
        "{msg}"
    );
    assert!(msg.contains("CONSULTATION, TREATMENT, FOLLOW_UP"), "{msg}");
}

// --- 4. union order -------------------------------------------------------------

async fn union_order(via: Via) {
    let e = decoded("union_order", via).await;
    assert_send(&e, send(Channel::Wechat, Some("spring"), Some(12)));
    let e = decoded("union_order_nulls", via).await;
    assert_send(&e, send(Channel::Wechat, None, None));
    let e = decoded("reply_union_order", via).await;
    assert_eq!(
        e.body,
        EventBody::Reply {
            channel: Channel::Sms,
            message_id: Some("m2".into()),
            class: ReplyClass::Unsubscribe,
        }
    );
}

// --- 5. amounts -----------------------------------------------------------------

async fn decimal_amounts(via: Via) {
    let e = decoded("amount_decimal_bytes", via).await;
    assert_eq!(amount(&e), (380_000, "CNY"));
    assert_eq!(e.event_id, "evt-interop-2");
    assert!(matches!(
        e.body,
        EventBody::Visit {
            visit_type: VisitType::Treatment,
            ..
        }
    ));
    let e = decoded("amount_decimal_fixed", via).await;
    assert_eq!(amount(&e), (128_050, "CNY"));
    let e = decoded("amount_decimal_jpy", via).await;
    assert_eq!(amount(&e), (15_000, "JPY"));

    let msg = refused("amount_decimal_fraction", via, "invalid_field").await;
    assert!(msg.contains("`amount`"), "{msg}");
    assert!(msg.contains("does not round"), "{msg}");
    assert!(!msg.contains("3456"), "{msg}");
}

async fn string_amount(via: Via) {
    let msg = refused("amount_string", via, "schema_mismatch").await;
    assert!(msg.contains("`amount` is written as string"), "{msg}");
    assert!(msg.contains("a long in minor units"), "{msg}");
    assert!(!msg.contains("3800"), "{msg}");
}

// --- promotions and evolution ------------------------------------------------------

async fn promotions(via: Via) {
    // int amount, uuid event_id.
    let e = decoded("visit_promotions", via).await;
    assert_eq!(e.event_id, "0f8fad5b-d9cb-469f-a165-70867728950e");
    assert_eq!(amount(&e), (380_000, "CNY"));
    // bytes -> string: the reply text is classified from UTF-8 bytes.
    let e = decoded("reply_bytes", via).await;
    assert_eq!(
        e.body,
        EventBody::Reply {
            channel: Channel::Sms,
            message_id: Some("m2".into()),
            class: ReplyClass::Unsubscribe,
        }
    );
}

async fn extra_and_missing_fields(via: Via) {
    // Reordered fields, two the reader does not have, two optional ones missing.
    let e = decoded("extra_and_missing_fields", via).await;
    assert_send(&e, send(Channel::Wechat, None, None));
}

/// One test per case and framing, so a failure names both.
macro_rules! both_framings {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn confluent() {
                super::$case(super::Via::Confluent).await
            }
            #[tokio::test]
            async fn single_object() {
                super::$case(super::Via::SingleObject).await
            }
        }
    )*};
}

both_framings!(
    timestamp_micros,
    timestamp_nanos,
    timestamp_plain_long,
    local_timestamp_millis,
    no_namespace,
    other_namespace,
    renamed_record_needs_a_reader_alias,
    unknown_channel,
    unknown_visit_type,
    union_order,
    decimal_amounts,
    string_amount,
    promotions,
    extra_and_missing_fields,
);

// --- 6. Confluent schema references -----------------------------------------------

/// A registry answering every id with the case's schema and its references,
/// as Confluent's does for a schema registered with `references`.
async fn registry_with_references(c: &'static Case) -> String {
    use axum::routing::get;
    let answer = serde_json::json!({
        "schema": c.schema,
        "references": c.references.clone().expect("references"),
    })
    .to_string();
    let app = axum::Router::new().route(
        "/schemas/ids/{id}",
        get(move || {
            let answer = answer.clone();
            async move { answer }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn schema_references_are_refused_clearly() {
    let c = case("references");
    let url = registry_with_references(c).await;
    let registry = RegistryClient::new(&url, Duration::from_secs(5)).unwrap();
    let d = Decoder::new(
        SchemaSet::builtin().unwrap(),
        Some(registry),
        DecodeLimits::default(),
    );
    let mut payload = vec![0, 0, 0, 0, 7];
    payload.extend_from_slice(&c.body);
    let e = d
        .decode(c.kind, Some(c.key.as_bytes()), &payload, NOW)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "schema_references", "{e}");
    assert!(!e.is_transient());
    let msg = e.to_string();
    assert!(msg.contains("schema id 7"), "{msg}");
    assert!(
        msg.contains("com.clinic.events.Channel (subject channel, version 1)"),
        "{msg}"
    );
    assert!(msg.contains("self-contained"), "{msg}");
}
