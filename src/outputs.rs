//! Decisions out: Avro values for the output schemas, their framing (Confluent
//! schema ids resolved at start-up, or single-object fingerprints), and the
//! producer step of the outbox. Every output carries its deterministic id as
//! key-independent header `lapse.id`, so consumers can de-duplicate exact repeats.

use apache_avro::types::Value;
use futures::future::join_all;

use crate::codec::{
    CodecError, Encoder, Framing, RegistryClient, SchemaSet, RECALL_OUTCOME, RECALL_TRIGGER,
    THROTTLE_EVENT,
};
use crate::config::{OutputFraming, TopicsConfig};
use crate::domain::allowance::ThrottleDecision;
use crate::domain::state::Output;
use crate::error::KafkaError;
use crate::kafka::producer::OutputProducer;

pub const H_ID: &str = "lapse.id";
pub const H_KIND: &str = "lapse.kind";

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    v.map_or(Value::Null, f)
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

pub fn throttle_value(d: &ThrottleDecision) -> Value {
    let scope = if d.customer_id.is_some() {
        Value::Enum(0, "CUSTOMER_CHANNEL".into())
    } else {
        Value::Enum(1, "CAMPAIGN".into())
    };
    record(vec![
        ("decision_id", Value::String(d.decision_id.clone())),
        ("scope", scope),
        ("tenant_id", Value::String(d.tenant_id.clone())),
        ("customer_id", opt(d.customer_id.clone(), Value::String)),
        (
            "channel",
            opt(d.channel, |c| {
                Value::Enum(c.index() as u32, c.as_str().into())
            }),
        ),
        ("campaign_id", opt(d.campaign_id.clone(), Value::String)),
        (
            "state",
            Value::Enum(d.state.index() as u32, d.state.as_str().into()),
        ),
        ("reason", Value::String(d.reason.clone())),
        ("allowed_from", opt(d.allowed_from, Value::TimestampMillis)),
        ("cap", opt(d.cap, |c| Value::Int(c as i32))),
        ("window_ms", opt(d.window_ms, Value::Long)),
        ("short_click_rate", opt(d.short_click_rate, Value::Double)),
        (
            "baseline_click_rate",
            opt(d.baseline_click_rate, Value::Double),
        ),
        ("sends_in_window", Value::Long(d.sends_in_window)),
        ("decided_at", Value::TimestampMillis(d.decided_at)),
        (
            "cause_event_id",
            opt(d.cause_event_id.clone(), Value::String),
        ),
    ])
}

/// An encoded output, ready to produce.
pub struct Encoded {
    pub topic: String,
    pub key: String,
    pub id: String,
    pub kind: &'static str,
    pub bytes: Vec<u8>,
}

/// How each output record is framed on its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputFramings {
    pub throttle: Framing,
    pub trigger: Framing,
    pub outcome: Framing,
}

impl OutputFramings {
    /// Avro single-object encoding for every output.
    pub const SINGLE_OBJECT: OutputFramings = OutputFramings {
        throttle: Framing::SingleObject,
        trigger: Framing::SingleObject,
        outcome: Framing::SingleObject,
    };

    /// Resolves `framing` for the output topics: for Confluent framing, each
    /// output schema's id under its TopicNameStrategy subject `<topic>-value`,
    /// registered first when `register`. Called once at start-up.
    pub async fn resolve(
        framing: OutputFraming,
        topics: &TopicsConfig,
        schemas: &SchemaSet,
        registry: Option<&RegistryClient>,
        register: bool,
    ) -> Result<OutputFramings, CodecError> {
        let registry = match (framing, registry) {
            (OutputFraming::SingleObject, _) => return Ok(Self::SINGLE_OBJECT),
            (OutputFraming::Confluent, Some(r)) => r,
            (OutputFraming::Confluent, None) => {
                return Err(CodecError::RegistryUrl {
                    url: String::new(),
                    detail: "outputs.framing = \"confluent\" needs schema.registry_url".into(),
                })
            }
        };
        let id = |topic: &str, name: &'static str| {
            let subject = format!("{topic}-value");
            async move {
                let text = schemas
                    .text_of(name)
                    .ok_or_else(|| CodecError::UnknownSchema { name: name.into() })?;
                let id = registry.subject_schema_id(&subject, text, register).await?;
                Ok::<_, CodecError>(Framing::Confluent(id))
            }
        };
        Ok(OutputFramings {
            throttle: id(&topics.throttle, THROTTLE_EVENT).await?,
            trigger: id(&topics.triggers, RECALL_TRIGGER).await?,
            outcome: id(&topics.outcomes, RECALL_OUTCOME).await?,
        })
    }
}

#[derive(Clone)]
pub struct OutputWriter {
    pub producer: OutputProducer,
    pub encoder: Encoder,
    pub topics: TopicsConfig,
    pub framings: OutputFramings,
}

impl OutputWriter {
    pub fn encode(&self, o: &Output) -> Result<Encoded, crate::codec::CodecError> {
        match o {
            Output::Throttle(d) => Ok(Encoded {
                topic: self.topics.throttle.clone(),
                key: d.key(),
                id: d.decision_id.clone(),
                kind: "throttle",
                bytes: self.encoder.encode_value(
                    THROTTLE_EVENT,
                    throttle_value(d),
                    self.framings.throttle,
                )?,
            }),
            Output::Trigger(t) => Ok(Encoded {
                topic: self.topics.triggers.clone(),
                key: t.key(),
                id: t.trigger_id.clone(),
                kind: "trigger",
                bytes: self.encoder.encode_value(
                    RECALL_TRIGGER,
                    t.to_avro_value(),
                    self.framings.trigger,
                )?,
            }),
            Output::Outcome(o) => Ok(Encoded {
                topic: self.topics.outcomes.clone(),
                key: o.key(),
                id: o.outcome_id.clone(),
                kind: "outcome",
                bytes: self.encoder.encode_value(
                    RECALL_OUTCOME,
                    o.to_avro_value(),
                    self.framings.outcome,
                )?,
            }),
        }
    }

    /// Produces every output and waits for all acknowledgements.
    pub async fn produce(&self, outputs: &[Encoded]) -> Result<(), KafkaError> {
        let results = join_all(outputs.iter().map(|e| async move {
            let headers = [(H_ID, e.id.as_bytes()), (H_KIND, e.kind.as_bytes())];
            self.producer
                .send(&e.topic, Some(e.key.as_bytes()), Some(&e.bytes), &headers)
                .await
        }))
        .await;
        results.into_iter().collect()
    }
}
