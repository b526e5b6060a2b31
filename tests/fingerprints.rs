//! Single-object fingerprints against the Avro project's Java library (Debian's
//! libavro-java, installed by scripts/install-deps): its
//! `SchemaNormalization` and `BinaryMessageEncoder` are the reference the
//! specification's other implementations are checked against. And what lapse
//! does with records framed by lapse 0.1's non-standard fingerprint.

mod common;

use common::java;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lapse::codec::canonical::{canonical_form, legacy_fingerprint};
use lapse::codec::{
    frame_single_object, DecodeLimits, Decoder, Encoder, Framing, SchemaSet, OUTPUT_SCHEMAS,
};
use lapse::domain::event::{Channel, EventBody, EventKind, Purpose};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn schema_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("schemas"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "avsc"))
        .collect();
    files.sort();
    files
}

fn decoder() -> Decoder {
    let schemas = SchemaSet::load(&root().join("schemas")).unwrap();
    Decoder::new(schemas, None, DecodeLimits::default())
}

/// Java's canonical form and fingerprint of every shipped schema, live, equal
/// lapse's (the checked-in fixture pins fastavro's as well).
#[test]
fn every_schema_fingerprint_equals_javas() {
    let files = schema_files();
    assert_eq!(files.len(), 9);
    let args: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    let out = common::java("Fingerprints.java", &args);
    let set = SchemaSet::load(&root().join("schemas")).unwrap();
    let mut seen = 0;
    for line in out.lines() {
        let mut cols = line.splitn(3, '\t');
        let (file, fp, form) = (
            cols.next().unwrap(),
            cols.next().unwrap(),
            cols.next().unwrap(),
        );
        let java_fp = fp.parse::<i64>().unwrap() as u64;
        let text = std::fs::read_to_string(file).unwrap();
        assert_eq!(canonical_form(&text).unwrap(), form, "{file}");
        let name = serde_json::from_str::<serde_json::Value>(&text).unwrap();
        let fullname = format!(
            "{}.{}",
            name["namespace"].as_str().unwrap(),
            name["name"].as_str().unwrap()
        );
        assert_eq!(set.fingerprint_of(&fullname), Some(java_fp), "{file}");
        assert!(set.writer(java_fp).is_some(), "{file}");
        seen += 1;
    }
    assert_eq!(seen, 9);
    // Outputs are framed with the same standard values.
    let enc = Encoder::new(&set);
    for name in OUTPUT_SCHEMAS {
        let fp = set.fingerprint_of(name).unwrap();
        let v = sample_output(name);
        let bytes = enc.encode_value(name, v, Framing::SingleObject).unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(&bytes[2..10], &fp.to_le_bytes(), "{name}");
    }
}

/// The smallest valid value of an output record (its required fields).
fn sample_output(name: &str) -> apache_avro::types::Value {
    use apache_avro::types::Value;
    let set = SchemaSet::builtin().unwrap();
    let apache_avro::Schema::Record(rec) = &**set.by_name(name).unwrap() else {
        panic!("{name} is a record")
    };
    let fields = rec
        .fields
        .iter()
        .map(|f| {
            let v = match &f.schema {
                apache_avro::Schema::String => Value::String("x".into()),
                apache_avro::Schema::Long => Value::Long(1),
                apache_avro::Schema::Int => Value::Int(1),
                apache_avro::Schema::Double => Value::Double(0.5),
                apache_avro::Schema::Boolean => Value::Boolean(false),
                apache_avro::Schema::TimestampMillis => Value::TimestampMillis(1_767_225_600_000),
                apache_avro::Schema::Enum(e) => Value::Enum(0, e.symbols[0].clone()),
                apache_avro::Schema::Union(_) => Value::Null,
                apache_avro::Schema::Array(_) => Value::Array(vec![]),
                apache_avro::Schema::Map(_) => Value::Map(Default::default()),
                other => panic!("{name}.{}: add a sample for {other:?}", f.name),
            };
            (f.name.clone(), v)
        })
        .collect();
    Value::Record(fields)
}

/// README's Java example, run: lapse decodes what BinaryMessageEncoder writes.
#[tokio::test]
async fn a_record_from_javas_binary_message_encoder_is_applied_as_written() {
    let occurred_at = 1_767_225_600_000i64; // 2026-01-01T00:00:00Z
    let out = common::java(
        "ProduceSend.java",
        &["schemas/send.avsc", &occurred_at.to_string()],
    );
    let (key, hex) = out.trim().split_once('\t').expect("key TAB hex");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let event = decoder()
        .decode(
            EventKind::Send,
            Some(key.as_bytes()),
            &bytes,
            occurred_at + 1000,
        )
        .await
        .unwrap_or_else(|e| panic!("Java's single-object record: {e}"));
    assert_eq!(event.event_id, "crm-send-000042");
    assert_eq!(event.customer.tenant, "glow-clinics");
    assert_eq!(event.customer.customer, "c-0001");
    assert_eq!(event.occurred_at, occurred_at);
    match event.body {
        EventBody::Send {
            channel,
            message_id,
            campaign_id,
            purpose,
            cost,
        } => {
            assert_eq!(channel, Channel::Wechat);
            assert_eq!(message_id, "msg-42");
            assert_eq!(campaign_id.as_deref(), Some("spring-botox"));
            assert_eq!(purpose, Purpose::Marketing);
            assert_eq!(cost, Some(1));
        }
        other => panic!("not a send: {other:?}"),
    }
}

/// lapse 0.1 framed with apache-avro's fingerprint. During the deprecation
/// period such records still decode and are counted; with
/// `schema.accept_legacy_fingerprints = false` they are dead-lettered with
/// their own reason. lapse never writes that fingerprint again.
#[tokio::test]
async fn records_with_lapse_0_1s_fingerprint_are_counted_during_the_deprecation_period() {
    let set = SchemaSet::load(&root().join("schemas")).unwrap();
    let enc = Encoder::new(&set);
    let now = 1_767_225_600_000i64;
    let event = lapse::domain::event::Event {
        event_id: "e-1".into(),
        customer: lapse::domain::event::CustomerRef {
            tenant: "t".into(),
            customer: "c".into(),
        },
        occurred_at: now,
        body: EventBody::Click {
            channel: Channel::Sms,
            message_id: "m".into(),
            campaign_id: None,
        },
    };
    let standard = enc
        .encode_event(&event, None, Framing::SingleObject)
        .unwrap();
    let schema = set.reader(EventKind::Click);
    let legacy_fp = legacy_fingerprint(schema);
    assert_ne!(Some(legacy_fp), set.fingerprint_of("lapse.v1.Click"));
    let legacy = frame_single_object(legacy_fp, &standard[10..]);

    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let accepting = decoder().with_legacy_fingerprints(true, move |kind| {
        assert_eq!(kind, EventKind::Click);
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let key = Some(&b"t/c"[..]);
    let a = accepting
        .decode(EventKind::Click, key, &standard, now)
        .await
        .unwrap();
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a standard record is not legacy"
    );
    let b = accepting
        .decode(EventKind::Click, key, &legacy, now)
        .await
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    let refusing = decoder().with_legacy_fingerprints(false, |_| panic!("not accepted"));
    let e = refusing
        .decode(EventKind::Click, key, &legacy, now)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "legacy_fingerprint");
    assert!(e.to_string().contains("accept_legacy_fingerprints"), "{e}");
    // A fingerprint nobody knows stays `unknown_fingerprint`.
    let e = refusing
        .decode(
            EventKind::Click,
            key,
            &frame_single_object(legacy_fp ^ 1, &standard[10..]),
            now,
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "unknown_fingerprint");
}

/// The README's examples are the files the tests run, line for line.
#[test]
fn the_readme_shows_the_tested_examples() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (file, indent) in [
        ("tests/interop/produce_example.py", 0),
        ("tests/interop/java/ProduceSend.java", 8),
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let begin = lines
            .iter()
            .position(|l| l.contains("README-BEGIN"))
            .unwrap();
        let end = lines.iter().position(|l| l.contains("README-END")).unwrap();
        let region: Vec<&str> = lines[begin + 1..end]
            .iter()
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect();
        assert!(region.len() > 10, "{file}");
        assert!(
            readme.contains(&region.join("\n")),
            "README.md's example differs from {file} (between README-BEGIN and README-END)"
        );
    }
}

/// What adding CARE_CALL to `RecallStage` (with a default) and the optional
/// `purpose` to the trigger means for readers, as the Avro project's Java
/// library (the check a Confluent Schema Registry runs) and fastavro say:
/// BACKWARD compatible (this version reads triggers and outcomes written
/// before), not FORWARD (a reader still on the version before cannot read a
/// CARE_CALL: such consumers upgrade first, and a registry subject set to
/// FORWARD or FULL refuses the new version); readers of this version read a
/// stage added later as the enum's default.
#[test]
fn the_care_call_stage_is_backward_compatible_and_later_stages_read_as_the_default() {
    let fixtures = root().join("tests/fixtures/avro");
    for name in ["recall_trigger", "recall_outcome"] {
        let new = root().join(format!("schemas/{name}.avsc"));
        let old = fixtures.join(format!("{name}.before-care-call.avsc"));
        let (new, old) = (new.to_str().unwrap(), old.to_str().unwrap());
        let backward = java("Compatibility.java", &[new, old]);
        assert!(
            backward.trim_end().ends_with("\tCOMPATIBLE"),
            "{name}: {backward}"
        );
        let forward = java("Compatibility.java", &[old, new]);
        assert!(
            forward.trim_end().ends_with("\tINCOMPATIBLE"),
            "{name}: {forward}"
        );
        assert!(forward.contains("CARE_CALL"), "{name}: {forward}");
    }
    // fastavro (enum defaults: Avro 1.9+) reads a trigger written by a later
    // version with one more stage as FOLLOW_UP.
    let script = r#"
import io, json, sys
import fastavro
reader = json.load(open(sys.argv[1]))
writer = json.loads(json.dumps(reader))
stage = next(f for f in writer["fields"] if f["name"] == "stage")
stage["type"]["symbols"].append("LATER_STAGE")
parsed = fastavro.parse_schema(writer)
record = {f["name"]: None for f in writer["fields"]}
record.update(trigger_id="t", tenant_id="t", customer_id="c", episode_id="e",
              stage="LATER_STAGE", attempt=1, segment="AT_RISK", days_since_last_visit=1,
              expected_interval_days=1.0, lifetime_value=0, currency="CNY",
              fallback_channels=[], offer_tier="o", experiment="x", arm="TREATMENT",
              due_at=0, fired_at=0)
buf = io.BytesIO()
fastavro.schemaless_writer(buf, parsed, record)
buf.seek(0)
print(fastavro.schemaless_reader(buf, parsed, fastavro.parse_schema(reader))["stage"])
"#;
    let out = Command::new(common::interop_python())
        .args(["-c", script])
        .arg(root().join("schemas/recall_trigger.avsc"))
        .output()
        .expect("run the interop Python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "FOLLOW_UP");
}
