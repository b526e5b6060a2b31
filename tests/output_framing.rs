//! Confluent-framed outputs: schema ids under TopicNameStrategy subjects,
//! registered or only looked up at start-up, and the start-up errors when the
//! registry refuses or cannot be reached. (`tests/interop.rs` reads the framed
//! outputs with Confluent's own deserializer.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::stack::Stack;
use common::{run_lapse, SchemaRegistryStub};
use lapse::codec::{CodecError, Framing, RegistryClient, SchemaSet};
use lapse::config::{OutputFraming, TopicsConfig};
use lapse::outputs::OutputFramings;

fn schemas() -> SchemaSet {
    SchemaSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")).unwrap()
}

fn client(url: &str) -> RegistryClient {
    RegistryClient::new(url, Duration::from_secs(5)).unwrap()
}

async fn resolve(url: &str, register: bool) -> Result<OutputFramings, CodecError> {
    OutputFramings::resolve(
        OutputFraming::Confluent,
        &TopicsConfig::default(),
        &schemas(),
        Some(&client(url)),
        register,
    )
    .await
}

fn confluent_id(f: Framing) -> u32 {
    match f {
        Framing::Confluent(id) => id,
        other => panic!("not Confluent: {other:?}"),
    }
}

#[tokio::test]
async fn output_schemas_are_registered_under_topic_name_subjects() {
    let registry = SchemaRegistryStub::start();
    let f = resolve(&registry.url(), true).await.unwrap();
    let topics = TopicsConfig::default();
    for (topic, framing) in [
        (&topics.throttle, f.throttle),
        (&topics.triggers, f.trigger),
        (&topics.outcomes, f.outcome),
    ] {
        let subject = format!("{topic}-value");
        assert_eq!(
            registry.subject_ids(&subject),
            vec![confluent_id(framing)],
            "{subject}"
        );
    }
    // Three distinct schemas, three ids; registering again changes nothing.
    let mut ids = [f.throttle, f.trigger, f.outcome]
        .map(confluent_id)
        .to_vec();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert_eq!(resolve(&registry.url(), true).await.unwrap(), f);

    // Single-object framing asks nothing of the registry.
    let before = registry.requests().len();
    let single = OutputFramings::resolve(
        OutputFraming::SingleObject,
        &topics,
        &schemas(),
        Some(&client(&registry.url())),
        true,
    )
    .await
    .unwrap();
    assert_eq!(single, OutputFramings::SINGLE_OBJECT);
    assert_eq!(registry.requests().len(), before);
}

#[tokio::test]
async fn without_the_right_to_register_the_schemas_are_looked_up() {
    let registry = SchemaRegistryStub::start();
    // Nothing registered yet: a clear refusal that says what to do.
    let e = resolve(&registry.url(), false).await.unwrap_err();
    assert!(matches!(e, CodecError::RegistryRefused { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("engagement.throttle-value"), "{msg}");
    assert!(msg.contains("404"), "{msg}");
    assert!(msg.contains("outputs.register_schemas"), "{msg}");

    // An operator registered them (here: lapse with the right to do so).
    let registered = resolve(&registry.url(), true).await.unwrap();
    let requests = registry.requests().len();
    let looked_up = resolve(&registry.url(), false).await.unwrap();
    assert_eq!(looked_up, registered);
    let new: Vec<String> = registry.requests()[requests..].to_vec();
    assert_eq!(new.len(), 3, "{new:?}");
    assert!(
        new.iter()
            .all(|r| r.starts_with("POST /subjects/") && !r.contains("/versions")),
        "lookups only: {new:?}"
    );
}

#[tokio::test]
async fn a_refusing_registry_is_a_clear_error_and_an_absent_one_is_retryable() {
    let registry = SchemaRegistryStub::start();
    registry.refuse_registration(Some((
        409,
        409,
        "Schema being registered is incompatible with an earlier schema",
    )));
    let e = resolve(&registry.url(), true).await.unwrap_err();
    assert!(matches!(e, CodecError::RegistryRefused { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("409") && msg.contains("incompatible"), "{msg}");
    assert!(msg.contains("compatibility"), "the hint: {msg}");

    registry.refuse_registration(None);
    registry.set_available(false);
    let e = resolve(&registry.url(), true).await.unwrap_err();
    assert!(matches!(e, CodecError::RegistryUnreachable { .. }), "{e}");
    registry.set_available(true);
    resolve(&registry.url(), true).await.unwrap();

    let nothing_there = format!("http://127.0.0.1:{}", common::free_port());
    let e = resolve(&nothing_there, true).await.unwrap_err();
    assert!(matches!(e, CodecError::RegistryUnreachable { .. }), "{e}");
}

/// `lapse run` stops at start-up, naming the subject and the keys to check,
/// when the registry refuses its output schemas.
#[tokio::test]
async fn lapse_does_not_start_when_the_registry_refuses_its_output_schemas() {
    let st = Stack::start().await;
    st.registry
        .refuse_registration(Some((403, 40301, "User is denied operation Write")));
    let config = st.config_with("refused", "", "");
    let env = st.env(&common::unique_name("g-refused"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run_lapse(&["run", "--config", &config], &env, Duration::from_secs(60)).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("engagement.throttle-value"), "{stderr}");
    assert!(stderr.contains("403"), "{stderr}");
    assert!(stderr.contains("outputs.register_schemas"), "{stderr}");
}
