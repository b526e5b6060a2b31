//! Avro encoding for producers, tests, the demo and the benchmark: input events
//! with the current reader schemas, and output records (throttle events, recall
//! triggers and outcomes) built by the caller as Avro `Value`s.
//!
//! Values are resolved against the schema before writing, so callers may give
//! record fields in any order and leave out fields that have a default.

use super::error::CodecError;
use super::framing::{frame, Framing};
use super::resolve::{resolve_record, Problem};
use super::schemas::{fingerprint, SchemaSet};
use crate::domain::event::{Event, EventBody, Purpose, VisitType};
use apache_avro::types::Value;
use apache_avro::{GenericSingleObjectWriter, Schema};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Encodes with the schemas of a [`SchemaSet`] (the current top-level versions).
#[derive(Clone)]
pub struct Encoder {
    schemas: SchemaSet,
    /// One writer per schema, holding its name table: apache-avro's
    /// `to_avro_datum` rebuilds that table for every record.
    writers: Arc<Mutex<HashMap<String, GenericSingleObjectWriter>>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("schemas", &self.schemas)
            .finish()
    }
}

/// The single-object header `GenericSingleObjectWriter` writes (C3 01 + 8-byte fingerprint).
const SINGLE_OBJECT_HEADER: usize = 10;

impl Encoder {
    pub fn new(schemas: &SchemaSet) -> Encoder {
        Encoder {
            schemas: schemas.clone(),
            writers: Arc::default(),
        }
    }

    /// Encodes an input event with its kind's schema. `Event` carries only the
    /// class of a reply, so for replies the caller passes the text (`None`
    /// writes an empty text); it is ignored for other kinds.
    pub fn encode_event(
        &self,
        event: &Event,
        text_for_reply: Option<&str>,
        framing: Framing,
    ) -> Result<Vec<u8>, CodecError> {
        self.encode_value(
            event.kind().schema_name(),
            event_value(event, text_for_reply),
            framing,
        )
    }

    /// Encodes `value` with the current schema named `schema_name` (a record
    /// fullname such as [`super::schemas::RECALL_TRIGGER`]).
    pub fn encode_value(
        &self,
        schema_name: &str,
        value: Value,
        framing: Framing,
    ) -> Result<Vec<u8>, CodecError> {
        let unknown = || CodecError::UnknownSchema {
            name: schema_name.to_owned(),
        };
        let schema = self.schemas.by_name(schema_name).ok_or_else(unknown)?;
        let fp = self
            .schemas
            .fingerprint_of(schema_name)
            .ok_or_else(unknown)?;
        let value = resolve(schema, value)?;
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let writer = match writers.entry(schema_name.to_owned()) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(
                GenericSingleObjectWriter::new_with_capacity(schema, 512)
                    .map_err(|_| mismatch(schema_name))?,
            ),
        };
        let mut bytes = Vec::with_capacity(256);
        writer
            .write_value(value, &mut bytes)
            .map_err(|_| mismatch(schema_name))?;
        Ok(frame(framing, fp, &bytes[SINGLE_OBJECT_HEADER..]))
    }
}

fn mismatch(schema_name: &str) -> CodecError {
    CodecError::Encode {
        schema: schema_name.to_owned(),
        detail: "the value does not match the schema".to_owned(),
    }
}

/// Encodes `value` with an arbitrary writer schema (e.g. an older or newer
/// version, to test schema evolution end to end). The single-object
/// fingerprint is computed from `schema`.
pub fn encode_with_schema(
    schema: &Schema,
    value: Value,
    framing: Framing,
) -> Result<Vec<u8>, CodecError> {
    let body = datum(schema, value)?;
    Ok(frame(framing, fingerprint(schema), &body))
}

/// The Avro record of an input event, with the field names of `schemas/`.
pub fn event_value(event: &Event, text_for_reply: Option<&str>) -> Value {
    let mut f: Vec<(String, Value)> = Vec::with_capacity(9);
    let mut put = |name: &str, v: Value| f.push((name.to_owned(), v));
    put("event_id", Value::String(event.event_id.clone()));
    put("tenant_id", Value::String(event.customer.tenant.clone()));
    put(
        "customer_id",
        Value::String(event.customer.customer.clone()),
    );
    put("occurred_at", Value::TimestampMillis(event.occurred_at));
    let opt_string = |s: &Option<String>| s.clone().map_or(Value::Null, Value::String);
    match &event.body {
        EventBody::Send {
            channel,
            message_id,
            campaign_id,
            purpose,
            cost,
        } => {
            put("channel", enum_value(channel.index(), channel.as_str()));
            put("message_id", Value::String(message_id.clone()));
            put("campaign_id", opt_string(campaign_id));
            let (i, sym) = match purpose {
                Purpose::Marketing => (0, "MARKETING"),
                Purpose::Service => (1, "SERVICE"),
            };
            put("purpose", enum_value(i, sym));
            put("cost", cost.map_or(Value::Null, Value::Long));
        }
        EventBody::Open {
            channel,
            message_id,
            campaign_id,
        }
        | EventBody::Click {
            channel,
            message_id,
            campaign_id,
        } => {
            put("channel", enum_value(channel.index(), channel.as_str()));
            put("message_id", Value::String(message_id.clone()));
            put("campaign_id", opt_string(campaign_id));
        }
        EventBody::Reply {
            channel,
            message_id,
            class: _,
        } => {
            put("channel", enum_value(channel.index(), channel.as_str()));
            put("message_id", opt_string(message_id));
            put(
                "text",
                Value::String(text_for_reply.unwrap_or_default().to_owned()),
            );
        }
        EventBody::Visit {
            visit_type,
            treatment,
            amount,
            currency,
            offer_code,
            discount,
        } => {
            let (i, sym) = match visit_type {
                VisitType::Consultation => (0, "CONSULTATION"),
                VisitType::Treatment => (1, "TREATMENT"),
                VisitType::FollowUp => (2, "FOLLOW_UP"),
            };
            put("visit_type", enum_value(i, sym));
            put("treatment", opt_string(treatment));
            put("amount", Value::Long(*amount));
            put("currency", Value::String(currency.clone()));
            put("offer_code", opt_string(offer_code));
            put("discount", discount.map_or(Value::Null, Value::Long));
        }
        EventBody::Feedback {
            kind,
            score,
            visit_event_id,
            channel,
        } => {
            put("kind", enum_value(kind.index(), kind.as_str()));
            put("score", Value::Int(i32::from(*score)));
            put("visit_event_id", opt_string(visit_event_id));
            put(
                "channel",
                channel.map_or(Value::Null, |c| enum_value(c.index(), c.as_str())),
            );
        }
    }
    Value::Record(f)
}

/// Resolution re-indexes enums by symbol, so the index is only a hint.
fn enum_value(index: usize, symbol: &str) -> Value {
    Value::Enum(index as u32, symbol.to_owned())
}

/// Resolves and writes one datum. Errors name the field, never the value
/// (which may be reply text).
fn datum(schema: &Schema, value: Value) -> Result<Vec<u8>, CodecError> {
    let name = super::schemas::record_fullname(schema).unwrap_or_else(|| "schema".to_owned());
    let resolved = resolve(schema, value)?;
    apache_avro::to_avro_datum(schema, resolved).map_err(|_| CodecError::Encode {
        schema: name,
        detail: "the value does not match the schema".to_owned(),
    })
}

/// Resolves `value` to `schema` (field order, defaults, union branches).
fn resolve(schema: &Schema, value: Value) -> Result<Value, CodecError> {
    let name = super::schemas::record_fullname(schema).unwrap_or_else(|| "schema".to_owned());
    let resolved = match schema {
        Schema::Record(_) => {
            let fields = resolve_record(value, schema).map_err(|e| CodecError::Encode {
                schema: name.clone(),
                detail: match e.problem {
                    Problem::Missing => {
                        format!("field `{}` is missing and has no default", e.field)
                    }
                    Problem::UnknownSymbol(s) => {
                        format!("field `{}`: symbol {s:?} is not in the schema", e.field)
                    }
                    Problem::Incompatible => {
                        format!("field `{}` has a value of the wrong type", e.field)
                    }
                },
            })?;
            Value::Record(fields)
        }
        _ => value.resolve(schema).map_err(|_| CodecError::Encode {
            schema: name.clone(),
            detail: "the value does not match the schema".to_owned(),
        })?,
    };
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::framing::{parse_frame, Frame};
    use crate::codec::schemas::{RECALL_TRIGGER, THROTTLE_EVENT};
    use crate::domain::event::{Channel, CustomerRef, EventKind, ReplyClass};

    fn encoder() -> Encoder {
        Encoder::new(&SchemaSet::builtin().unwrap())
    }

    fn send() -> Event {
        Event {
            event_id: "e1".into(),
            customer: CustomerRef::new("t", "c"),
            occurred_at: 1_700_000_000_000,
            body: EventBody::Send {
                channel: Channel::Sms,
                message_id: "m".into(),
                campaign_id: None,
                purpose: Purpose::Service,
                cost: Some(5),
            },
        }
    }

    /// The cached writer writes the bytes apache-avro's free function writes,
    /// again and again (its buffer is reused between records).
    #[test]
    fn cached_writers_write_what_to_avro_datum_writes() {
        let enc = encoder();
        let mut sends = vec![send()];
        let mut other = send();
        other.event_id = "a-longer-event-id-0123456789".into();
        sends.push(other);
        for _ in 0..2 {
            for e in &sends {
                let schema = enc.schemas.by_name(e.kind().schema_name()).unwrap();
                for framing in [Framing::SingleObject, Framing::Confluent(4)] {
                    let cached = enc.encode_event(e, None, framing).unwrap();
                    let direct = encode_with_schema(schema, event_value(e, None), framing).unwrap();
                    assert_eq!(cached, direct);
                }
            }
        }
    }

    #[test]
    fn single_object_carries_the_current_fingerprint() {
        let enc = encoder();
        let bytes = enc
            .encode_event(&send(), None, Framing::SingleObject)
            .unwrap();
        let Frame::SingleObject {
            fingerprint: fp, ..
        } = parse_frame(&bytes).unwrap()
        else {
            panic!("not single-object");
        };
        assert_eq!(
            Some(fp),
            enc.schemas.fingerprint_of(EventKind::Send.schema_name())
        );
        let bytes = enc
            .encode_event(&send(), None, Framing::Confluent(42))
            .unwrap();
        assert!(matches!(
            parse_frame(&bytes).unwrap(),
            Frame::Confluent { schema_id: 42, .. }
        ));
    }

    #[test]
    fn encode_errors_do_not_contain_reply_text() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"Reply","namespace":"lapse.v1","fields":[{"name":"text","type":"long"}]}"#,
        )
        .unwrap();
        let reply = Event {
            body: EventBody::Reply {
                channel: Channel::Sms,
                message_id: None,
                class: ReplyClass::Neutral,
            },
            ..send()
        };
        let e = encode_with_schema(
            &schema,
            event_value(&reply, Some("my secret reply")),
            Framing::SingleObject,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`text`"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn outputs_encode_with_defaults_and_any_field_order() {
        let enc = encoder();
        let trigger = Value::Record(
            [
                ("fired_at", Value::TimestampMillis(2)),
                ("due_at", Value::TimestampMillis(1)),
                ("arm", Value::Enum(0, "TREATMENT".into())),
                ("experiment", Value::String("x".into())),
                ("offer_tier", Value::String("PREMIUM".into())),
                (
                    "fallback_channels",
                    Value::Array(vec![Value::Enum(0, "SMS".into())]),
                ),
                ("recommended_channel", Value::Enum(0, "WECHAT".into())),
                ("currency", Value::String("CNY".into())),
                ("lifetime_value", Value::Long(100)),
                ("expected_interval_days", Value::Double(120.0)),
                ("days_since_last_visit", Value::Int(150)),
                ("segment", Value::Enum(0, "HIGH_VALUE_LAPSED".into())),
                ("attempt", Value::Int(1)),
                ("stage", Value::Enum(0, "LAPSED".into())),
                ("episode_id", Value::String("ep".into())),
                ("customer_id", Value::String("c".into())),
                ("tenant_id", Value::String("t".into())),
                ("trigger_id", Value::String("tr".into())),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        );
        enc.encode_value(RECALL_TRIGGER, trigger, Framing::SingleObject)
            .unwrap();
        let e = enc
            .encode_value(THROTTLE_EVENT, Value::Record(vec![]), Framing::SingleObject)
            .unwrap_err();
        assert!(e.to_string().contains("decision_id"), "{e}");
        let e = enc
            .encode_value("lapse.v1.Nope", Value::Null, Framing::SingleObject)
            .unwrap_err();
        assert!(matches!(e, CodecError::UnknownSchema { .. }));
    }
}
