//! Input decoding: framing → writer schema → bounded Avro decode → resolution to
//! the reader schema → validated [`Event`].
//!
//! Reply text is classified here and dropped: it never leaves this module, and
//! no error built here contains it (or a customer id).

use super::error::{truncate, DecodeError};
use super::framing::{parse_frame, Frame};
use super::prescan::check_datum;
use super::registry::RegistryClient;
use super::resolve::{resolve_record, FieldError, Problem};
use super::schemas::{reader_accepts, record_fullname, SchemaSet};
use crate::domain::event::{Channel, CustomerRef, Event, EventBody, EventKind, Purpose, VisitType};
use crate::domain::replies;
use apache_avro::headers::HeaderBuilder;
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value;
use apache_avro::{GenericSingleObjectReader, Schema};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// 2000-01-01T00:00:00Z: anything earlier is a unit mistake (seconds, not ms).
pub const MIN_OCCURRED_AT_MS: i64 = 946_684_800_000;

const MAX_EVENT_ID: usize = 256;
const MAX_TENANT_ID: usize = 64;
const MAX_CUSTOMER_ID: usize = 128;
const MAX_MESSAGE_ID: usize = 256;
const MAX_CAMPAIGN_ID: usize = 128;
const MAX_TREATMENT: usize = 64;

/// Per-record limits; invalid config is the caller's to reject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Larger records are rejected before any decoding.
    pub max_payload_bytes: usize,
    /// How far `occurred_at` may be ahead of the consumer's clock.
    pub max_future_skew_ms: i64,
    /// Earliest accepted `occurred_at`.
    pub min_occurred_at_ms: i64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_payload_bytes: 1 << 20,
            max_future_skew_ms: 3_600_000,
            min_occurred_at_ms: MIN_OCCURRED_AT_MS,
        }
    }
}

/// Caps any single allocation apache-avro makes while decoding. The setting is
/// process-global and set once: the first call wins, and apache-avro fixes it
/// at its default (512 MiB) on first use, so call this at start-up before
/// anything is decoded. Returns the limit actually in force.
///
/// The decoder does not rely on it: lengths are checked against the payload
/// first. It is a second line of defence.
pub fn set_allocation_limit(bytes: usize) -> usize {
    apache_avro::util::max_allocation_bytes(bytes)
}

/// Turns input records into validated events. Cheap to share (`Arc`) across
/// tasks; `decode` takes `&self`.
#[derive(Debug, Clone)]
pub struct Decoder {
    schemas: SchemaSet,
    registry: Option<RegistryClient>,
    limits: DecodeLimits,
    plans: Plans,
}

/// Writer plans seen so far; more than this many (registry churn) starts afresh.
const MAX_PLANS: usize = 1024;

/// What decoding with one writer schema for one input kind needs, built once:
/// apache-avro's free functions rebuild the writer's name table for every
/// record, and resolution is a no-op when the writer is the reader schema.
struct WriterPlan {
    /// Keeps the schema alive, so its address (the cache key) is not reused.
    _writer: Arc<Schema>,
    fullname: String,
    names: HashMap<Name, Schema>,
    /// Decodes a bare datum with the prebuilt name table (no header).
    datum: GenericSingleObjectReader,
    /// Writer and reader are the same schema (defaults and logical types
    /// included): the decoded record needs no resolution.
    is_reader: bool,
}

/// (writer schema address, input kind index)
type PlanKey = (usize, usize);

/// Plans by writer and kind.
#[derive(Clone, Default)]
struct Plans(Arc<Mutex<HashMap<PlanKey, Arc<WriterPlan>>>>);

impl std::fmt::Debug for Plans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "Plans({n})")
    }
}

/// The datum has no header: the framing was parsed already.
struct NoHeader;

impl HeaderBuilder for NoHeader {
    fn build_header(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl Decoder {
    /// `registry` is needed only for Confluent-framed records; without it they
    /// fail with `registry_not_configured`.
    pub fn new(
        schemas: SchemaSet,
        registry: Option<RegistryClient>,
        limits: DecodeLimits,
    ) -> Decoder {
        Decoder {
            schemas,
            registry,
            limits,
            plans: Plans::default(),
        }
    }

    /// The plan for `writer` read as `kind`, built on first use.
    fn plan(&self, writer: &Arc<Schema>, kind: EventKind) -> Result<Arc<WriterPlan>, DecodeError> {
        let key = (Arc::as_ptr(writer) as usize, kind.index());
        // A poisoned lock only means another decode panicked; the map is intact.
        if let Some(p) = self
            .plans
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(p.clone());
        }
        let reader = self.schemas.reader(kind);
        let mismatch = |found: String| DecodeError::SchemaMismatch {
            expected: kind.schema_name().to_owned(),
            found,
        };
        let fullname =
            record_fullname(writer).ok_or_else(|| mismatch("a non-record schema".to_owned()))?;
        let bad = |e: apache_avro::Error| DecodeError::BadWriterSchema {
            source_desc: truncate(&fullname, 100),
            detail: truncate(&e.to_string(), 200),
        };
        let names = ResolvedSchema::try_from(&**writer)
            .map_err(bad)?
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        let datum =
            GenericSingleObjectReader::new_with_header_builder((**writer).clone(), NoHeader)
                .map_err(bad)?;
        let is_reader = Arc::ptr_eq(writer, reader)
            || serde_json::to_value(&**writer).ok() == serde_json::to_value(&**reader).ok();
        let plan = Arc::new(WriterPlan {
            _writer: writer.clone(),
            fullname,
            names,
            datum,
            is_reader,
        });
        let mut plans = self.plans.0.lock().unwrap_or_else(|e| e.into_inner());
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(key, plan.clone());
        Ok(plan)
    }

    pub fn schemas(&self) -> &SchemaSet {
        &self.schemas
    }

    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// Decodes and validates one record from the topic of `kind`. `key` is the
    /// Kafka key, which must be `tenant_id/customer_id`. `now_ms` bounds
    /// `occurred_at`. Only [`DecodeError::is_transient`] errors are worth a retry.
    pub async fn decode(
        &self,
        kind: EventKind,
        key: Option<&[u8]>,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Event, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::EmptyPayload);
        }
        if payload.len() > self.limits.max_payload_bytes {
            return Err(DecodeError::PayloadTooLarge {
                len: payload.len(),
                max: self.limits.max_payload_bytes,
            });
        }
        let (writer, body) = match parse_frame(payload)? {
            Frame::SingleObject { fingerprint, body } => {
                let writer = self
                    .schemas
                    .writer(fingerprint)
                    .cloned()
                    .ok_or(DecodeError::UnknownFingerprint { fingerprint })?;
                (writer, body)
            }
            Frame::Confluent { schema_id, body } => {
                let registry = self
                    .registry
                    .as_ref()
                    .ok_or(DecodeError::RegistryNotConfigured { id: schema_id })?;
                (registry.schema(schema_id).await?, body)
            }
        };
        let reader = self.schemas.reader(kind);
        let plan = self.plan(&writer, kind)?;
        let fields = read_record(&writer, &plan, reader, kind, body)?;
        let event = build_event(kind, Fields(fields), &self.limits, now_ms)?;
        check_key(key, &event.customer)?;
        Ok(event)
    }
}

/// Checks the record type, bounds-checks the body, decodes with the writer
/// schema and resolves to the reader schema.
fn read_record(
    writer: &Schema,
    plan: &WriterPlan,
    reader: &Schema,
    kind: EventKind,
    body: &[u8],
) -> Result<Vec<(String, Value)>, DecodeError> {
    if !reader_accepts(reader, &plan.fullname) {
        return Err(DecodeError::SchemaMismatch {
            expected: kind.schema_name().to_owned(),
            found: truncate(&plan.fullname, 100),
        });
    }
    check_datum(writer, &plan.names, body).map_err(|detail| DecodeError::AvroDecode { detail })?;
    let mut rest = body;
    let value = plan.datum.read_value(&mut rest).map_err(|e| {
        // Byte-level decode errors describe positions and types, not values.
        DecodeError::AvroDecode {
            detail: truncate(&e.to_string(), 200),
        }
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::AvroDecode {
            detail: format!("{} trailing bytes after the record", rest.len()),
        });
    }
    match value {
        Value::Record(fields) if plan.is_reader => Ok(fields),
        value => resolve_record(value, reader).map_err(field_error),
    }
}

fn field_error(e: FieldError) -> DecodeError {
    match e.problem {
        Problem::Missing => DecodeError::MissingField { field: e.field },
        Problem::UnknownSymbol(symbol) => DecodeError::BadEnum {
            field: e.field,
            symbol: truncate(&symbol, 64),
        },
        Problem::Incompatible => DecodeError::IncompatibleField { field: e.field },
    }
}

/// Resolved fields in reader order, taken out by name.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn take(&mut self, name: &str) -> Result<Value, DecodeError> {
        self.0
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::mem::replace(v, Value::Null))
            .ok_or_else(|| DecodeError::MissingField {
                field: name.to_owned(),
            })
    }

    fn string(&mut self, name: &str) -> Result<String, DecodeError> {
        match unwrap_union(self.take(name)?) {
            Value::String(s) => Ok(s),
            Value::Null => Err(DecodeError::invalid(name, "is null; it is required")),
            _ => Err(wrong_type(name)),
        }
    }

    fn opt_string(&mut self, name: &str) -> Result<Option<String>, DecodeError> {
        match unwrap_union(self.take(name)?) {
            Value::String(s) => Ok(Some(s)),
            Value::Null => Ok(None),
            _ => Err(wrong_type(name)),
        }
    }

    fn opt_long(&mut self, name: &str) -> Result<Option<i64>, DecodeError> {
        match unwrap_union(self.take(name)?) {
            Value::Long(n) | Value::TimestampMillis(n) => Ok(Some(n)),
            Value::Int(n) => Ok(Some(i64::from(n))),
            Value::Null => Ok(None),
            _ => Err(wrong_type(name)),
        }
    }

    fn long(&mut self, name: &str) -> Result<i64, DecodeError> {
        self.opt_long(name)?
            .ok_or_else(|| DecodeError::invalid(name, "is null; it is required"))
    }

    fn symbol(&mut self, name: &str) -> Result<String, DecodeError> {
        match unwrap_union(self.take(name)?) {
            Value::Enum(_, s) | Value::String(s) => Ok(s),
            _ => Err(wrong_type(name)),
        }
    }

    fn channel(&mut self) -> Result<Channel, DecodeError> {
        let s = self.symbol("channel")?;
        Channel::parse(&s).ok_or_else(|| bad_enum("channel", &s))
    }
}

fn unwrap_union(v: Value) -> Value {
    match v {
        Value::Union(_, inner) => *inner,
        v => v,
    }
}

/// The reader schema was edited to a type the code does not read.
fn wrong_type(field: &str) -> DecodeError {
    DecodeError::invalid(
        field,
        "has an unexpected type in the reader schema; restore schemas/ from the lapse release",
    )
}

fn bad_enum(field: &str, symbol: &str) -> DecodeError {
    DecodeError::BadEnum {
        field: field.to_owned(),
        symbol: truncate(symbol, 64),
    }
}

fn build_event(
    kind: EventKind,
    mut f: Fields,
    limits: &DecodeLimits,
    now_ms: i64,
) -> Result<Event, DecodeError> {
    let event_id = f.string("event_id")?;
    check_len("event_id", &event_id, MAX_EVENT_ID)?;
    if event_id.is_empty() {
        return Err(DecodeError::invalid(
            "event_id",
            "is empty; producers must set a unique id",
        ));
    }
    let tenant = f.string("tenant_id")?;
    check_tenant(&tenant)?;
    let customer = f.string("customer_id")?;
    check_customer(&customer)?;
    let occurred_at = f.long("occurred_at")?;
    if occurred_at < limits.min_occurred_at_ms {
        return Err(DecodeError::TimestampOutOfRange {
            occurred_at,
            min: limits.min_occurred_at_ms,
        });
    }
    let limit = now_ms.saturating_add(limits.max_future_skew_ms);
    if occurred_at > limit {
        return Err(DecodeError::TimestampInFuture { occurred_at, limit });
    }

    let body = match kind {
        EventKind::Send => {
            let channel = f.channel()?;
            let message_id = message_id(&mut f)?;
            let campaign_id = campaign_id(&mut f)?;
            let purpose = f.symbol("purpose")?;
            let purpose = Purpose::parse(&purpose).ok_or_else(|| bad_enum("purpose", &purpose))?;
            let cost = f.opt_long("cost")?;
            if cost.is_some_and(|c| c < 0) {
                return Err(DecodeError::invalid("cost", "is negative"));
            }
            EventBody::Send {
                channel,
                message_id,
                campaign_id,
                purpose,
                cost,
            }
        }
        EventKind::Open | EventKind::Click => {
            let channel = f.channel()?;
            let message_id = message_id(&mut f)?;
            let campaign_id = campaign_id(&mut f)?;
            if kind == EventKind::Open {
                EventBody::Open {
                    channel,
                    message_id,
                    campaign_id,
                }
            } else {
                EventBody::Click {
                    channel,
                    message_id,
                    campaign_id,
                }
            }
        }
        EventKind::Reply => {
            let channel = f.channel()?;
            let message_id = f.opt_string("message_id")?.filter(|m| !m.is_empty());
            if let Some(m) = &message_id {
                check_len("message_id", m, MAX_MESSAGE_ID)?;
            }
            // Classified and dropped here; only the class goes on.
            let class = replies::classify(&f.string("text")?);
            EventBody::Reply {
                channel,
                message_id,
                class,
            }
        }
        EventKind::Visit => {
            let visit_type = f.symbol("visit_type")?;
            let visit_type =
                VisitType::parse(&visit_type).ok_or_else(|| bad_enum("visit_type", &visit_type))?;
            let treatment = match f.opt_string("treatment")? {
                None => None,
                Some(t) => {
                    let t = t.trim();
                    check_len("treatment", t, MAX_TREATMENT)?;
                    check_no_control("treatment", t)?;
                    (!t.is_empty()).then(|| t.to_uppercase())
                }
            };
            let amount = f.long("amount")?;
            if amount < 0 {
                return Err(DecodeError::invalid("amount", "is negative"));
            }
            let currency = f.string("currency")?;
            if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(DecodeError::invalid(
                    "currency",
                    format!(
                        "{:?} is not an ISO 4217 code (three upper-case letters, e.g. CNY)",
                        truncate(&currency, 8)
                    ),
                ));
            }
            EventBody::Visit {
                visit_type,
                treatment,
                amount,
                currency,
            }
        }
    };
    Ok(Event {
        event_id,
        customer: CustomerRef { tenant, customer },
        occurred_at,
        body,
    })
}

fn message_id(f: &mut Fields) -> Result<String, DecodeError> {
    let m = f.string("message_id")?;
    check_len("message_id", &m, MAX_MESSAGE_ID)?;
    Ok(m)
}

/// Empty means "no campaign": some producers cannot write null.
fn campaign_id(f: &mut Fields) -> Result<Option<String>, DecodeError> {
    match f.opt_string("campaign_id")? {
        Some(c) if !c.is_empty() => {
            check_len("campaign_id", &c, MAX_CAMPAIGN_ID)?;
            check_no_control("campaign_id", &c)?;
            Ok(Some(c))
        }
        _ => Ok(None),
    }
}

fn check_len(field: &str, s: &str, max: usize) -> Result<(), DecodeError> {
    if s.len() > max {
        return Err(DecodeError::invalid(
            field,
            format!("is {} bytes long, at most {max} allowed", s.len()),
        ));
    }
    Ok(())
}

fn check_no_control(field: &str, s: &str) -> Result<(), DecodeError> {
    if s.chars().any(char::is_control) {
        return Err(DecodeError::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Tenant ids become Kafka key prefixes and Redis hash tags: no `/`, `{`, `}`.
fn check_tenant(t: &str) -> Result<(), DecodeError> {
    const F: &str = "tenant_id";
    if t.is_empty() {
        return Err(DecodeError::invalid(F, "is empty"));
    }
    check_len(F, t, MAX_TENANT_ID)?;
    if t.contains(['/', '{', '}']) {
        return Err(DecodeError::invalid(F, "contains '/', '{' or '}'"));
    }
    check_no_control(F, t)
}

fn check_customer(c: &str) -> Result<(), DecodeError> {
    const F: &str = "customer_id";
    if c.is_empty() {
        return Err(DecodeError::invalid(F, "is empty"));
    }
    check_len(F, c, MAX_CUSTOMER_ID)?;
    check_no_control(F, c)
}

/// The key must be exactly `tenant/customer`, so a customer's events share a
/// partition and a producer bug cannot write one customer's events into another's state.
fn check_key(key: Option<&[u8]>, who: &CustomerRef) -> Result<(), DecodeError> {
    let Some(key) = key else {
        return Err(DecodeError::KeyMismatch {
            detail: "is missing",
        });
    };
    let (t, c) = (who.tenant.as_bytes(), who.customer.as_bytes());
    let tenant_ok = key.len() > t.len() && key.starts_with(t) && key[t.len()] == b'/';
    if !tenant_ok {
        return Err(DecodeError::KeyMismatch {
            detail: "does not start with the value's tenant_id followed by '/'",
        });
    }
    if &key[t.len() + 1..] != c {
        return Err(DecodeError::KeyMismatch {
            detail: "names another customer than the value's customer_id",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode::{encode_with_schema, event_value, Encoder};
    use crate::codec::framing::{frame_confluent, frame_single_object, Framing};
    use crate::codec::registry::stub::{self, Answer};
    use crate::codec::schemas::fingerprint;
    use crate::domain::event::ReplyClass;
    use std::collections::HashMap;
    use std::time::Duration;

    const NOW: i64 = 1_750_000_000_000;

    fn schemas() -> SchemaSet {
        SchemaSet::builtin().unwrap()
    }

    fn decoder(registry: Option<RegistryClient>) -> Decoder {
        Decoder::new(schemas(), registry, DecodeLimits::default())
    }

    fn key(e: &Event) -> Vec<u8> {
        e.customer.key().into_bytes()
    }

    fn base(body: EventBody) -> Event {
        Event {
            event_id: "evt-1".into(),
            customer: CustomerRef::new("glow", "cust/42"),
            occurred_at: NOW - 60_000,
            body,
        }
    }

    /// One event of every kind, with the reply text that classifies as its class.
    fn samples() -> Vec<(Event, Option<&'static str>)> {
        vec![
            (
                base(EventBody::Send {
                    channel: Channel::Wechat,
                    message_id: "m1".into(),
                    campaign_id: Some("spring".into()),
                    purpose: Purpose::Marketing,
                    cost: Some(12),
                }),
                None,
            ),
            (
                base(EventBody::Send {
                    channel: Channel::Sms,
                    message_id: "m2".into(),
                    campaign_id: None,
                    purpose: Purpose::Service,
                    cost: None,
                }),
                None,
            ),
            (
                base(EventBody::Open {
                    channel: Channel::Email,
                    message_id: "m1".into(),
                    campaign_id: None,
                }),
                None,
            ),
            (
                base(EventBody::Click {
                    channel: Channel::Social,
                    message_id: "m1".into(),
                    campaign_id: Some("spring".into()),
                }),
                None,
            ),
            (
                base(EventBody::Reply {
                    channel: Channel::Sms,
                    message_id: Some("m2".into()),
                    class: ReplyClass::Unsubscribe,
                }),
                Some("退订"),
            ),
            (
                base(EventBody::Reply {
                    channel: Channel::Phone,
                    message_id: None,
                    class: ReplyClass::Neutral,
                }),
                Some("hello there"),
            ),
            (
                base(EventBody::Visit {
                    visit_type: VisitType::Treatment,
                    treatment: Some("BOTOX".into()),
                    amount: 380_000,
                    currency: "CNY".into(),
                }),
                None,
            ),
            (
                base(EventBody::Visit {
                    visit_type: VisitType::Consultation,
                    treatment: None,
                    amount: 0,
                    currency: "CNY".into(),
                }),
                None,
            ),
        ]
    }

    async fn decode(d: &Decoder, e: &Event, bytes: &[u8]) -> Result<Event, DecodeError> {
        d.decode(e.kind(), Some(&key(e)), bytes, NOW).await
    }

    #[tokio::test]
    async fn round_trip_single_object() {
        let d = decoder(None);
        let enc = Encoder::new(d.schemas());
        for (event, text) in samples() {
            let bytes = enc
                .encode_event(&event, text, Framing::SingleObject)
                .unwrap();
            assert_eq!(decode(&d, &event, &bytes).await.unwrap(), event);
        }
    }

    #[tokio::test]
    async fn round_trip_confluent() {
        let set = schemas();
        let answers: HashMap<u32, Answer> = EventKind::ALL
            .iter()
            .map(|k| {
                let canonical = set.reader(*k).canonical_form();
                (100 + k.index() as u32, Answer::Avro(canonical))
            })
            .collect();
        let stub = stub::start(answers).await;
        let registry = RegistryClient::new(&stub.base, Duration::from_secs(2)).unwrap();
        let d = decoder(Some(registry));
        let enc = Encoder::new(d.schemas());
        for (event, text) in samples() {
            let id = 100 + event.kind().index() as u32;
            let bytes = enc
                .encode_event(&event, text, Framing::Confluent(id))
                .unwrap();
            assert_eq!(decode(&d, &event, &bytes).await.unwrap(), event);
        }
        // Five ids, each fetched once.
        assert_eq!(stub.hits(), 5);

        let (event, _) = &samples()[0];
        let bytes = enc
            .encode_event(event, None, Framing::Confluent(7))
            .unwrap();
        let e = decode(&d, event, &bytes).await.unwrap_err();
        assert_eq!(e.reason(), "unknown_schema_id");
        assert!(!e.is_transient());

        let e = decode(&decoder(None), event, &bytes).await.unwrap_err();
        assert_eq!(e.reason(), "registry_not_configured");
    }

    #[tokio::test]
    async fn registry_outage_is_transient() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let registry =
            RegistryClient::new(&format!("http://{addr}"), Duration::from_millis(500)).unwrap();
        let d = decoder(Some(registry));
        let (event, _) = &samples()[0];
        let bytes = Encoder::new(d.schemas())
            .encode_event(event, None, Framing::Confluent(1))
            .unwrap();
        let e = decode(&d, event, &bytes).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
    }

    fn send_schema_json() -> serde_json::Value {
        serde_json::from_str(include_str!("../../schemas/send.avsc")).unwrap()
    }

    #[tokio::test]
    async fn newer_writer_with_an_added_optional_field_decodes() {
        let mut json = send_schema_json();
        json["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "name": "template_id", "type": ["null", "string"], "default": null, "doc": "new"
            }));
        let newer = Schema::parse_str(&json.to_string()).unwrap();
        let (event, _) = samples().remove(0);
        let Value::Record(mut fields) = event_value(&event, None) else {
            unreachable!()
        };
        fields.push((
            "template_id".into(),
            Value::Union(1, Box::new(Value::String("tpl-9".into()))),
        ));
        let value = Value::Record(fields);

        // Confluent: the registry serves the newer schema.
        let stub = stub::start([(3, Answer::Avro(newer.canonical_form()))].into()).await;
        let registry = RegistryClient::new(&stub.base, Duration::from_secs(2)).unwrap();
        let d = decoder(Some(registry));
        let bytes = encode_with_schema(&newer, value.clone(), Framing::Confluent(3)).unwrap();
        assert_eq!(decode(&d, &event, &bytes).await.unwrap(), event);

        // Single-object: unknown until the version is in the schemas directory.
        let bytes = encode_with_schema(&newer, value, Framing::SingleObject).unwrap();
        let e = decode(&d, &event, &bytes).await.unwrap_err();
        assert_eq!(e.reason(), "unknown_fingerprint");
        let tmp = tempfile::tempdir().unwrap();
        for (name, text) in dir_files() {
            std::fs::write(tmp.path().join(name), text).unwrap();
        }
        std::fs::create_dir(tmp.path().join("history")).unwrap();
        std::fs::write(tmp.path().join("history/send_v2.avsc"), json.to_string()).unwrap();
        let d = Decoder::new(
            SchemaSet::load(tmp.path()).unwrap(),
            None,
            DecodeLimits::default(),
        );
        assert_eq!(decode(&d, &event, &bytes).await.unwrap(), event);
    }

    fn dir_files() -> Vec<(String, String)> {
        let dir = crate::codec::schemas::tests::schemas_dir();
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "avsc"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn older_writer_without_campaign_id_decodes() {
        let mut json = send_schema_json();
        json["fields"]
            .as_array_mut()
            .unwrap()
            .retain(|f| f["name"] != "campaign_id");
        let older = Schema::parse_str(&json.to_string()).unwrap();
        let stub = stub::start([(5, Answer::Avro(older.canonical_form()))].into()).await;
        let registry = RegistryClient::new(&stub.base, Duration::from_secs(2)).unwrap();
        let d = decoder(Some(registry));
        let (mut event, _) = samples().remove(0);
        let bytes =
            encode_with_schema(&older, event_value(&event, None), Framing::Confluent(5)).unwrap();
        let decoded = decode(&d, &event, &bytes).await.unwrap();
        if let EventBody::Send { campaign_id, .. } = &mut event.body {
            *campaign_id = None;
        }
        assert_eq!(decoded, event);
    }

    /// Single-object record with an ad-hoc writer schema, decoded by a decoder
    /// that knows that schema as a history version.
    async fn decode_with_writer(
        writer_json: &serde_json::Value,
        value: Value,
        kind: EventKind,
        key: &[u8],
    ) -> Result<Event, DecodeError> {
        let writer = Schema::parse_str(&writer_json.to_string()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for (name, text) in dir_files() {
            std::fs::write(tmp.path().join(name), text).unwrap();
        }
        std::fs::create_dir(tmp.path().join("history")).unwrap();
        std::fs::write(tmp.path().join("history/w.avsc"), writer_json.to_string()).unwrap();
        let d = Decoder::new(
            SchemaSet::load(tmp.path()).unwrap(),
            None,
            DecodeLimits::default(),
        );
        let bytes = encode_with_schema(&writer, value, Framing::SingleObject).unwrap();
        assert_eq!(&bytes[2..10], &fingerprint(&writer).to_le_bytes());
        d.decode(kind, Some(key), &bytes, NOW).await
    }

    #[tokio::test]
    async fn missing_required_field() {
        let mut json = send_schema_json();
        json["fields"]
            .as_array_mut()
            .unwrap()
            .retain(|f| f["name"] != "event_id");
        let (event, _) = samples().remove(0);
        let e = decode_with_writer(
            &json,
            event_value(&event, None),
            EventKind::Send,
            &key(&event),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e,
            DecodeError::MissingField {
                field: "event_id".into()
            }
        );
        assert_eq!(e.reason(), "missing_field");
    }

    #[tokio::test]
    async fn unknown_enum_symbol() {
        let mut json = send_schema_json();
        json["fields"][4]["type"]["symbols"]
            .as_array_mut()
            .unwrap()
            .push("TELEGRAM".into());
        let (event, _) = samples().remove(0);
        let Value::Record(mut fields) = event_value(&event, None) else {
            unreachable!()
        };
        fields[4].1 = Value::Enum(5, "TELEGRAM".into());
        let e = decode_with_writer(
            &json,
            Value::Record(fields.clone()),
            EventKind::Send,
            &key(&event),
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason(), "bad_enum");
        assert!(e.to_string().contains("TELEGRAM"), "{e}");
        // A known symbol from the wider writer enum still decodes.
        fields[4].1 = Value::Enum(0, "WECHAT".into());
        decode_with_writer(&json, Value::Record(fields), EventKind::Send, &key(&event))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn incompatible_field_type() {
        let mut json = send_schema_json();
        json["fields"][8]["type"] = serde_json::json!(["null", "string"]);
        let (event, _) = samples().remove(0);
        let Value::Record(mut fields) = event_value(&event, None) else {
            unreachable!()
        };
        fields[8].1 = Value::String("twelve".into());
        let e = decode_with_writer(&json, Value::Record(fields), EventKind::Send, &key(&event))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            DecodeError::IncompatibleField {
                field: "cost".into()
            }
        );
        assert_eq!(e.reason(), "schema_mismatch");
    }

    #[tokio::test]
    async fn wrong_record_type_on_a_topic() {
        let d = decoder(None);
        let enc = Encoder::new(d.schemas());
        let (click, _) = samples().remove(3);
        let bytes = enc
            .encode_event(&click, None, Framing::SingleObject)
            .unwrap();
        let e = d
            .decode(EventKind::Send, Some(&key(&click)), &bytes, NOW)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "schema_mismatch");
        assert!(e.to_string().contains("lapse.v1.Click"), "{e}");
    }

    #[tokio::test]
    async fn garbage_truncated_and_unknown_fingerprint() {
        let d = decoder(None);
        let (event, _) = samples().remove(0);
        let garbage: [&[u8]; 3] = [b"hello world", b"\xff\xfe\xfd", b"{\"event_id\":1}"];
        for garbage in garbage {
            let e = decode(&d, &event, garbage).await.unwrap_err();
            assert_eq!(e.reason(), "unknown_framing");
        }
        assert_eq!(
            decode(&d, &event, b"").await.unwrap_err().reason(),
            "empty_payload"
        );

        let bytes = Encoder::new(d.schemas())
            .encode_event(&event, None, Framing::SingleObject)
            .unwrap();
        for cut in 10..bytes.len() {
            let e = decode(&d, &event, &bytes[..cut]).await.unwrap_err();
            assert_eq!(e.reason(), "avro_decode", "cut at {cut}: {e}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&d, &event, &longer).await.unwrap_err().reason(),
            "avro_decode"
        );

        let e = decode(&d, &event, &frame_single_object(0xDEAD_BEEF, &bytes[10..]))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "unknown_fingerprint");
        assert!(e.to_string().contains("00000000deadbeef"), "{e}");

        // Random bodies behind a valid header never panic.
        let mut seed = 0x1234_5678_u64;
        for len in 0..200 {
            let mut body = Vec::with_capacity(len);
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                body.push((seed >> 56) as u8);
            }
            let framed =
                frame_single_object(u64::from_le_bytes(bytes[2..10].try_into().unwrap()), &body);
            assert!(decode(&d, &event, &framed).await.is_err());
        }
    }

    #[tokio::test]
    async fn huge_length_claims_fail_fast() {
        let d = decoder(None);
        let (event, _) = samples().remove(0);
        let fp = d.schemas().fingerprint_of("lapse.v1.Send").unwrap();
        // event_id claims 2^40 bytes, then 8 GiB; neither may be allocated.
        for claim in [1u64 << 40, 1 << 33, i64::MAX as u64 >> 1] {
            let mut body = Vec::new();
            let mut v = claim << 1; // zig-zag of a positive number
            loop {
                let b = (v & 0x7F) as u8;
                v >>= 7;
                if v == 0 {
                    body.push(b);
                    break;
                }
                body.push(b | 0x80);
            }
            body.extend_from_slice(b"abc");
            let started = std::time::Instant::now();
            let e = decode(&d, &event, &frame_single_object(fp, &body))
                .await
                .unwrap_err();
            assert_eq!(e.reason(), "avro_decode", "{e}");
            assert!(started.elapsed() < Duration::from_millis(100));
        }
        let big = vec![0u8; (1 << 20) + 1];
        assert_eq!(
            decode(&d, &event, &big).await.unwrap_err().reason(),
            "payload_too_large"
        );
    }

    async fn encode_and_decode(
        event: &Event,
        text: Option<&str>,
        key: Option<&[u8]>,
    ) -> Result<Event, DecodeError> {
        let d = decoder(None);
        let bytes = Encoder::new(d.schemas())
            .encode_event(event, text, Framing::SingleObject)
            .unwrap();
        d.decode(event.kind(), key, &bytes, NOW).await
    }

    async fn reason_of(event: &Event) -> &'static str {
        encode_and_decode(event, Some("x"), Some(&key(event)))
            .await
            .unwrap_err()
            .reason()
    }

    #[tokio::test]
    async fn timestamps() {
        let (mut event, _) = samples().remove(0);
        event.occurred_at = NOW + 3_600_000;
        assert!(encode_and_decode(&event, None, Some(&key(&event)))
            .await
            .is_ok());
        event.occurred_at = NOW + 3_600_001;
        assert_eq!(reason_of(&event).await, "timestamp_in_future");
        event.occurred_at = 1_750_000_000; // seconds, not milliseconds
        assert_eq!(reason_of(&event).await, "timestamp_out_of_range");
        event.occurred_at = MIN_OCCURRED_AT_MS;
        assert!(encode_and_decode(&event, None, Some(&key(&event)))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn key_must_be_tenant_slash_customer() {
        let (event, _) = samples().remove(0);
        let keys: [&[u8]; 7] = [
            b"",
            b"glow",
            b"glow/",
            b"glow/cust",
            b"glow/cust/42/x",
            b"other/cust/42",
            b"glo/wcust/42",
        ];
        for bad in std::iter::once(None).chain(keys.map(Some)) {
            let e = encode_and_decode(&event, None, bad).await.unwrap_err();
            assert_eq!(e.reason(), "key_mismatch", "{bad:?}");
            assert!(!e.to_string().contains("cust/42"), "{e}");
        }
    }

    #[tokio::test]
    async fn field_validation() {
        let (send, _) = samples().remove(0);
        let with = |f: &dyn Fn(&mut Event)| {
            let mut e = send.clone();
            f(&mut e);
            e
        };
        let cases: Vec<(Event, &str)> = vec![
            (with(&|e| e.event_id.clear()), "invalid_field"),
            (with(&|e| e.event_id = "x".repeat(257)), "invalid_field"),
            (
                with(&|e| e.customer.tenant = "a{b}".into()),
                "invalid_field",
            ),
            (
                with(&|e| e.customer.tenant = "x".repeat(65)),
                "invalid_field",
            ),
            (with(&|e| e.customer.tenant = "t\n".into()), "invalid_field"),
            (with(&|e| e.customer.customer.clear()), "invalid_field"),
            (
                with(&|e| e.customer.customer = "c\u{0}".into()),
                "invalid_field",
            ),
            (
                with(&|e| e.customer.customer = "c".repeat(129)),
                "invalid_field",
            ),
            (
                with(&|e| {
                    if let EventBody::Send { cost, .. } = &mut e.body {
                        *cost = Some(-1)
                    }
                }),
                "invalid_field",
            ),
            (
                with(&|e| {
                    if let EventBody::Send { campaign_id, .. } = &mut e.body {
                        *campaign_id = Some("x".repeat(129))
                    }
                }),
                "invalid_field",
            ),
        ];
        for (event, reason) in cases {
            assert_eq!(reason_of(&event).await, reason, "{event:?}");
        }
        // Longest allowed ids pass; a '/' in customer ids is fine.
        let ok = with(&|e| {
            e.event_id = "x".repeat(256);
            e.customer = CustomerRef::new("t".repeat(64), format!("a/{}", "c".repeat(126)));
        });
        assert_eq!(
            encode_and_decode(&ok, None, Some(&key(&ok))).await.unwrap(),
            ok
        );
    }

    #[tokio::test]
    async fn visit_normalisation_and_validation() {
        let visit = |treatment: Option<&str>, amount: i64, currency: &str| {
            base(EventBody::Visit {
                visit_type: VisitType::FollowUp,
                treatment: treatment.map(str::to_owned),
                amount,
                currency: currency.into(),
            })
        };
        let decoded = encode_and_decode(
            &visit(Some("  skin_care "), 1, "CNY"),
            None,
            Some(&b"glow/cust/42"[..]),
        )
        .await
        .unwrap();
        let EventBody::Visit { treatment, .. } = decoded.body else {
            panic!()
        };
        assert_eq!(treatment.as_deref(), Some("SKIN_CARE"));
        let decoded = encode_and_decode(
            &visit(Some("   "), 1, "CNY"),
            None,
            Some(&b"glow/cust/42"[..]),
        )
        .await
        .unwrap();
        assert!(matches!(
            decoded.body,
            EventBody::Visit {
                treatment: None,
                ..
            }
        ));

        assert_eq!(reason_of(&visit(None, -1, "CNY")).await, "invalid_field");
        for cur in ["cny", "CN", "CNYY", "C1Y", "人民币"] {
            assert_eq!(
                reason_of(&visit(None, 1, cur)).await,
                "invalid_field",
                "{cur}"
            );
        }
        assert_eq!(
            reason_of(&visit(Some(&"A".repeat(65)), 1, "CNY")).await,
            "invalid_field"
        );
    }

    #[tokio::test]
    async fn reply_text_is_classified_and_never_in_errors() {
        let secret = "退订 my phone is 13800000000";
        let reply = base(EventBody::Reply {
            channel: Channel::Sms,
            message_id: None,
            class: ReplyClass::Neutral,
        });
        let decoded = encode_and_decode(&reply, Some(secret), Some(&key(&reply)))
            .await
            .unwrap();
        let EventBody::Reply { class, .. } = decoded.body else {
            panic!()
        };
        assert_eq!(class, replies::classify(secret));
        assert!(!format!("{decoded:?}").contains("13800000000"));

        let mut bad = reply.clone();
        bad.occurred_at = NOW * 2;
        let e = encode_and_decode(&bad, Some(secret), Some(&key(&bad)))
            .await
            .unwrap_err();
        let e2 = encode_and_decode(&reply, Some(secret), Some(&b"x/y"[..]))
            .await
            .unwrap_err();
        for e in [e, e2] {
            assert!(!e.to_string().contains("13800000000"), "{e}");
            assert!(!format!("{e:?}").contains("13800000000"), "{e:?}");
        }
    }

    /// The consumer runs decoding inside spawned tasks.
    #[test]
    fn decode_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let d = decoder(None);
        let fut = d.decode(EventKind::Send, None, b"", NOW);
        assert_send(&fut);
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<Decoder>();
    }

    #[test]
    fn confluent_and_single_object_share_the_body() {
        let set = schemas();
        let (event, _) = samples().remove(0);
        let enc = Encoder::new(&set);
        let so = enc
            .encode_event(&event, None, Framing::SingleObject)
            .unwrap();
        let cf = enc
            .encode_event(&event, None, Framing::Confluent(9))
            .unwrap();
        assert_eq!(&so[10..], &cf[5..]);
        assert_eq!(frame_confluent(9, &so[10..]), cf);
    }
}
