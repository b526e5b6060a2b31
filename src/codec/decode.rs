//! Input decoding: framing → writer schema → bounded Avro decode → resolution to
//! the reader schema → validated [`Event`].
//!
//! Reply text is classified here and dropped: it never leaves this module, and
//! no error built here contains it (or a customer id).

use super::error::{truncate, DecodeError};
use super::framing::{parse_frame, Frame};
use super::prescan::check_datum;
use super::registry::RegistryClient;
use super::resolve::{resolve_written, FieldError, Problem, Resolved, WriterSchema};
use super::schemas::{reader_accepts, record_fullname, SchemaSet};
use crate::domain::event::{
    Channel, CustomerRef, Event, EventBody, EventKind, FeedbackKind, Purpose, VisitType,
};
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
use crate::domain::lapse::MAX_OFFER_CODE;

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
#[derive(Clone)]
pub struct Decoder {
    schemas: SchemaSet,
    registry: Option<RegistryClient>,
    limits: DecodeLimits,
    plans: Plans,
    legacy: LegacyFingerprints,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("schemas", &self.schemas)
            .field("registry", &self.registry)
            .field("limits", &self.limits)
            .field("plans", &self.plans)
            .field("accept_legacy_fingerprints", &self.legacy.accept)
            .finish()
    }
}

/// Records framed with lapse 0.1's non-standard fingerprint: accepted during
/// the deprecation period (each one reported to `observe`, for a metric), or
/// refused as unknown.
#[derive(Clone)]
struct LegacyFingerprints {
    accept: bool,
    observe: Option<Arc<dyn Fn(EventKind) + Send + Sync>>,
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
            legacy: LegacyFingerprints {
                accept: true,
                observe: None,
            },
        }
    }

    /// Whether single-object records framed with lapse 0.1's non-standard
    /// fingerprint are still decoded (default: yes, during the deprecation
    /// period); `observe` is told of each one, by input kind.
    pub fn with_legacy_fingerprints(
        mut self,
        accept: bool,
        observe: impl Fn(EventKind) + Send + Sync + 'static,
    ) -> Decoder {
        self.legacy = LegacyFingerprints {
            accept,
            observe: Some(Arc::new(observe)),
        };
        self
    }

    /// The writer schema of a single-object record: by the standard
    /// fingerprint, else (when accepted) by lapse 0.1's.
    fn single_object_writer(
        &self,
        kind: EventKind,
        fingerprint: u64,
    ) -> Result<Arc<Schema>, DecodeError> {
        if let Some(w) = self.schemas.writer(fingerprint) {
            return Ok(w.clone());
        }
        match self.schemas.legacy_writer(fingerprint) {
            Some(w) if self.legacy.accept => {
                if let Some(observe) = &self.legacy.observe {
                    observe(kind);
                }
                Ok(w.clone())
            }
            Some(_) => Err(DecodeError::LegacyFingerprint { fingerprint }),
            None => Err(DecodeError::UnknownFingerprint { fingerprint }),
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

    /// The schema registry client, when one is configured.
    pub fn registry(&self) -> Option<&RegistryClient> {
        self.registry.as_ref()
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
                (self.single_object_writer(kind, fingerprint)?, body)
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
        let resolved = read_record(&writer, &plan, reader, kind, body)?;
        let fields = Fields {
            values: resolved.fields,
            decimal_scales: resolved.decimal_scales,
        };
        let event = build_event(kind, fields, &self.limits, now_ms)?;
        check_key(key, &event.customer)?;
        Ok(event)
    }
}

/// An event from a record already resolved to lapse's reader schema of `kind`
/// (the records of export files read by `lapse backtest`): the same checks and
/// reply classification as a decoded record (reply text is dropped here too).
pub fn event_from_record(
    kind: EventKind,
    record: Value,
    limits: &DecodeLimits,
    now_ms: i64,
) -> Result<Event, DecodeError> {
    let Value::Record(values) = record else {
        return Err(DecodeError::SchemaMismatch {
            expected: kind.schema_name().to_owned(),
            found: "a non-record value".to_owned(),
        });
    };
    let fields = Fields {
        values,
        decimal_scales: Vec::new(),
    };
    build_event(kind, fields, limits, now_ms)
}

/// Checks the record type, bounds-checks the body, decodes with the writer
/// schema and resolves to the reader schema.
fn read_record(
    writer: &Schema,
    plan: &WriterPlan,
    reader: &Schema,
    kind: EventKind,
    body: &[u8],
) -> Result<Resolved, DecodeError> {
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
    match (value, writer) {
        (Value::Record(fields), _) if plan.is_reader => Ok(Resolved {
            fields,
            decimal_scales: Vec::new(),
        }),
        (value, Schema::Record(record)) => {
            let writer = WriterSchema {
                record,
                names: &plan.names,
            };
            resolve_written(value, reader, &writer).map_err(field_error)
        }
        // `plan` refused non-record writers already.
        _ => Err(DecodeError::SchemaMismatch {
            expected: kind.schema_name().to_owned(),
            found: "a non-record schema".to_owned(),
        }),
    }
}

fn field_error(e: FieldError) -> DecodeError {
    match e.problem {
        Problem::Missing => DecodeError::MissingField { field: e.field },
        Problem::UnknownSymbol(symbol) => bad_enum(&e.field, &symbol),
        Problem::Incompatible => match e.written {
            // A nullable writer field (union with null) that lapse requires.
            Some("null") => DecodeError::invalid(
                &e.field,
                "is null; lapse requires it: the producer must set it (and should not declare it nullable)",
            ),
            written => incompatible(&e.field, written.unwrap_or("another type")),
        },
    }
}

fn incompatible(field: &str, written: &str) -> DecodeError {
    DecodeError::IncompatibleField {
        field: field.to_owned(),
        written: written.to_owned(),
        expected: expected_type(field, written),
    }
}

/// What a producer must write for an input field lapse reads (see schemas/).
fn expected_type(field: &str, written: &str) -> String {
    let expected = match field {
        "occurred_at" if written.starts_with("local-timestamp") => {
            "a UTC instant, a long with logicalType timestamp-millis (timestamp-micros and \
             timestamp-nanos are converted); a local-timestamp has no time zone, so the \
             instant it means is unknown"
        }
        "occurred_at" => {
            "a long with logicalType timestamp-millis, UTC milliseconds since the Unix epoch \
             (timestamp-micros and timestamp-nanos are converted)"
        }
        "amount" => {
            "a long in minor units of currency (e.g. fen for CNY), or a decimal logical type \
             (bytes or fixed) in major units with no more decimal places than the currency has"
        }
        "cost" => {
            "a long in minor units of the tenant's currency (e.g. fen for CNY), or null for \
             the channel's default cost"
        }
        "channel" => return format!("an enum with the symbols {CHANNEL_SYMBOLS}"),
        "purpose" => return format!("an enum with the symbols {PURPOSE_SYMBOLS}"),
        "visit_type" => return format!("an enum with the symbols {VISIT_TYPE_SYMBOLS}"),
        "event_id" | "tenant_id" | "customer_id" | "message_id" | "campaign_id" | "text"
        | "treatment" | "currency" => {
            "a string (or bytes holding UTF-8; null only where the field is optional)"
        }
        _ => "the type that field has in lapse's reader schema",
    };
    expected.to_owned()
}

/// Symbols lapse's code understands, for error messages.
const CHANNEL_SYMBOLS: &str = "WECHAT, SMS, PHONE, EMAIL, SOCIAL";
const PURPOSE_SYMBOLS: &str = "MARKETING, SERVICE";
const VISIT_TYPE_SYMBOLS: &str = "CONSULTATION, TREATMENT, FOLLOW_UP";

/// Resolved fields in reader order, taken out by name.
struct Fields {
    values: Vec<(String, Value)>,
    /// Reader `long` fields written as decimals, with the writer's scale.
    decimal_scales: Vec<(String, usize)>,
}

impl Fields {
    fn take(&mut self, name: &str) -> Result<Value, DecodeError> {
        self.values
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

    /// A field a reader schema of an earlier version lacks: null then.
    fn take_or_null(&mut self, name: &str) -> Value {
        self.take(name).unwrap_or(Value::Null)
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
            Value::Decimal(_) => Err(incompatible(name, "decimal")),
            _ => Err(wrong_type(name)),
        }
    }

    /// `amount`: a long in minor units, or a decimal (major units, scale from
    /// the writer schema) converted exactly to minor units of `currency`.
    fn amount(&mut self, currency: &str) -> Result<i64, DecodeError> {
        const F: &str = "amount";
        let amount = match unwrap_union(self.take(F)?) {
            Value::Decimal(d) => {
                let scale = self
                    .decimal_scales
                    .iter()
                    .find(|(n, _)| n == F)
                    .map(|(_, s)| *s)
                    .ok_or_else(|| incompatible(F, "decimal"))?;
                decimal_minor_units(&d, scale, currency)?
            }
            Value::Long(n) => n,
            Value::Int(n) => i64::from(n),
            Value::Null => return Err(DecodeError::invalid(F, "is null; it is required")),
            _ => return Err(wrong_type(F)),
        };
        if amount < 0 {
            return Err(DecodeError::invalid(F, "is negative"));
        }
        Ok(amount)
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

    fn opt_symbol(&mut self, name: &str) -> Result<Option<String>, DecodeError> {
        match unwrap_union(self.take(name)?) {
            Value::Enum(_, s) | Value::String(s) => Ok(Some(s)),
            Value::Null => Ok(None),
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
    let known = match field {
        "channel" => CHANNEL_SYMBOLS,
        "purpose" => PURPOSE_SYMBOLS,
        "visit_type" => VISIT_TYPE_SYMBOLS,
        _ => "the symbols of lapse's reader schema",
    };
    DecodeError::BadEnum {
        field: field.to_owned(),
        symbol: shown_symbol(symbol),
        known: known.to_owned(),
    }
}

/// A symbol as it may appear in an error: quoted if it is a valid Avro enum
/// symbol (`[A-Za-z_][A-Za-z0-9_]*`, at most 64 bytes). Anything else came from
/// a string written for the enum and could be any text, so it is not shown.
fn shown_symbol(symbol: &str) -> String {
    let valid = !symbol.is_empty()
        && symbol.len() <= 64
        && symbol
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
    if valid {
        format!("{symbol:?}")
    } else {
        "(a string that is not an Avro enum symbol)".to_owned()
    }
}

/// A decimal amount (unscaled value, `scale` decimal places, major units of
/// `currency`) in minor units of `currency`, exactly: lapse does not round money.
fn decimal_minor_units(
    d: &apache_avro::Decimal,
    scale: usize,
    currency: &str,
) -> Result<i64, DecodeError> {
    const F: &str = "amount";
    let places = minor_unit_exponent(currency).ok_or_else(|| {
        DecodeError::invalid(
            F,
            format!(
                "is a decimal, but lapse does not know how many decimal places {currency} has \
                 (not an active ISO 4217 currency); send amount as a long in minor units"
            ),
        )
    })?;
    let too_large = || DecodeError::invalid(F, "is too large for a long in minor units");
    let bytes = Vec::<u8>::try_from(d).map_err(|_| {
        DecodeError::invalid(F, "is a malformed decimal; send a long in minor units")
    })?;
    let unscaled = i128_from_be(&bytes).ok_or_else(too_large)?;
    if unscaled < 0 {
        return Err(DecodeError::invalid(F, "is negative"));
    }
    let minor = if scale <= places {
        // `places` is at most 4.
        unscaled
            .checked_mul(10i128.pow((places - scale) as u32))
            .ok_or_else(too_large)?
    } else {
        let divisor = u32::try_from(scale - places)
            .ok()
            .and_then(|p| 10i128.checked_pow(p));
        match divisor {
            Some(f) if unscaled % f == 0 => unscaled / f,
            None if unscaled == 0 => 0,
            _ => {
                return Err(DecodeError::invalid(
                    F,
                    format!(
                        "is a decimal with {scale} decimal places that is not a whole number of \
                         {currency} minor units ({places} decimal places); lapse does not round \
                         money: send whole minor units (a long, e.g. fen for CNY)"
                    ),
                ))
            }
        }
    };
    i64::try_from(minor).map_err(|_| too_large())
}

/// A big-endian two's-complement integer; `None` if it does not fit an `i128`.
fn i128_from_be(bytes: &[u8]) -> Option<i128> {
    let Some(&first) = bytes.first() else {
        return Some(0);
    };
    let sign = if first & 0x80 != 0 { 0xFF } else { 0x00 };
    let cut = bytes.len().saturating_sub(16);
    let (high, low) = bytes.split_at(cut);
    if high.iter().any(|&b| b != sign) || (!high.is_empty() && (low[0] ^ sign) & 0x80 != 0) {
        return None;
    }
    let mut buf = [sign; 16];
    buf[16 - low.len()..].copy_from_slice(low);
    Some(i128::from_be_bytes(buf))
}

/// Decimal places of the minor unit of an active ISO 4217 currency (0 for JPY,
/// 2 for CNY, 3 for KWD); `None` for other codes (funds, metals, unknown).
fn minor_unit_exponent(code: &str) -> Option<usize> {
    const ZERO: &str = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF";
    const THREE: &str = "BHD IQD JOD KWD LYD OMR TND";
    const FOUR: &str = "CLF UYW";
    const TWO: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV \
        BRL BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP \
        DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR \
        IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU \
        MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON \
        RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT \
        TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG ZWL";
    let listed = |list: &str| list.split_ascii_whitespace().any(|c| c == code);
    [(ZERO, 0), (TWO, 2), (THREE, 3), (FOUR, 4)]
        .into_iter()
        .find(|(list, _)| listed(list))
        .map(|(_, places)| places)
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
            // After the currency: a decimal amount needs its minor unit.
            let amount = f.amount(&currency)?;
            let (offer_code, discount) = redeemed_offer(&mut f)?;
            EventBody::Visit {
                visit_type,
                treatment,
                amount,
                currency,
                offer_code,
                discount,
            }
        }
        EventKind::Feedback => {
            let kind = f.symbol("kind")?;
            let kind = FeedbackKind::parse(&kind).ok_or_else(|| bad_enum("kind", &kind))?;
            let score = f.long("score")?;
            let range = kind.range();
            let score = u8::try_from(score)
                .ok()
                .filter(|s| range.contains(&i32::from(*s)))
                .ok_or_else(|| {
                    DecodeError::invalid(
                        "score",
                        format!(
                            "{score} is outside the {} scale ({}-{})",
                            kind.as_str(),
                            range.start(),
                            range.end()
                        ),
                    )
                })?;
            let visit_event_id = f.opt_string("visit_event_id")?.filter(|v| !v.is_empty());
            if let Some(v) = &visit_event_id {
                check_len("visit_event_id", v, MAX_EVENT_ID)?;
            }
            let channel = match f.opt_symbol("channel")? {
                None => None,
                Some(c) => Some(Channel::parse(&c).ok_or_else(|| bad_enum("channel", &c))?),
            };
            EventBody::Feedback {
                kind,
                score,
                visit_event_id,
                channel,
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

/// A visit's `offer_code` (trimmed, bounded; empty is none) and `discount` (not
/// negative). Both optional: absent from records of an earlier writer schema.
fn redeemed_offer(f: &mut Fields) -> Result<(Option<String>, Option<i64>), DecodeError> {
    let code = match unwrap_union(f.take_or_null("offer_code")) {
        Value::String(c) => {
            let c = c.trim();
            check_len("offer_code", c, MAX_OFFER_CODE)?;
            check_no_control("offer_code", c)?;
            (!c.is_empty()).then(|| c.to_owned())
        }
        Value::Null => None,
        _ => return Err(wrong_type("offer_code")),
    };
    let discount = match unwrap_union(f.take_or_null("discount")) {
        Value::Long(n) => Some(n),
        Value::Int(n) => Some(i64::from(n)),
        Value::Null => None,
        _ => return Err(wrong_type("discount")),
    };
    if discount.is_some_and(|d| d < 0) {
        return Err(DecodeError::invalid("discount", "is negative"));
    }
    Ok((code, discount))
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
                    offer_code: None,
                    discount: None,
                }),
                None,
            ),
            (
                base(EventBody::Visit {
                    visit_type: VisitType::Consultation,
                    treatment: None,
                    amount: 0,
                    currency: "CNY".into(),
                    offer_code: None,
                    discount: None,
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
                field: "cost".into(),
                written: "string".into(),
                expected: expected_type("cost", "string"),
            }
        );
        assert_eq!(e.reason(), "schema_mismatch");
        assert!(!e.to_string().contains("twelve"), "{e}");
    }

    // --- Interop: writer schemas as other producers write them -------------
    //
    // Records are encoded with apache-avro straight from a hand-written writer
    // schema and served by a registry stub (Confluent framing), so these tests
    // do not depend on fingerprints. tests/codec_interop.rs does the same with
    // bytes written by fastavro, in both framings.

    /// `samples()[0]` (a MARKETING send on WECHAT) as written with send.avsc.
    fn send_fields() -> Vec<(String, Value)> {
        let s = |v: &str| Value::String(v.to_owned());
        vec![
            ("event_id".into(), s("evt-1")),
            ("tenant_id".into(), s("glow")),
            ("customer_id".into(), s("cust/42")),
            ("occurred_at".into(), Value::TimestampMillis(NOW - 60_000)),
            ("channel".into(), Value::Enum(0, "WECHAT".into())),
            ("message_id".into(), s("m1")),
            ("campaign_id".into(), Value::Union(1, Box::new(s("spring")))),
            ("purpose".into(), Value::Enum(0, "MARKETING".into())),
            ("cost".into(), Value::Union(1, Box::new(Value::Long(12)))),
        ]
    }

    /// `samples()[6]` (a BOTOX treatment, 3,800.00 CNY) as written with visit.avsc.
    fn visit_fields() -> Vec<(String, Value)> {
        let s = |v: &str| Value::String(v.to_owned());
        vec![
            ("event_id".into(), s("evt-1")),
            ("tenant_id".into(), s("glow")),
            ("customer_id".into(), s("cust/42")),
            ("occurred_at".into(), Value::TimestampMillis(NOW - 60_000)),
            ("visit_type".into(), Value::Enum(1, "TREATMENT".into())),
            ("treatment".into(), Value::Union(1, Box::new(s("BOTOX")))),
            ("amount".into(), Value::Long(380_000)),
            ("currency".into(), s("CNY")),
            ("offer_code".into(), Value::Union(0, Box::new(Value::Null))),
            ("discount".into(), Value::Union(0, Box::new(Value::Null))),
        ]
    }

    fn visit_schema_json() -> serde_json::Value {
        serde_json::from_str(include_str!("../../schemas/visit.avsc")).unwrap()
    }

    fn set(fields: &mut [(String, Value)], name: &str, value: Value) {
        fields.iter_mut().find(|(n, _)| n == name).unwrap().1 = value;
    }

    /// Gives field `name` of a schema JSON another type (and no default: a
    /// writer's defaults play no part in decoding).
    fn retype(json: &mut serde_json::Value, name: &str, ty: serde_json::Value) {
        let fields = json["fields"].as_array_mut().unwrap();
        let field = fields.iter_mut().find(|f| f["name"] == name).unwrap();
        field["type"] = ty;
        field.as_object_mut().unwrap().remove("default");
    }

    /// Decodes `fields` written with `writer_json`, Confluent-framed, by a
    /// decoder whose schemas are the repository's with `readers` replacing
    /// top-level files.
    async fn decode_written(
        writer_json: &serde_json::Value,
        fields: Vec<(String, Value)>,
        kind: EventKind,
        readers: &[(&str, serde_json::Value)],
    ) -> Result<Event, DecodeError> {
        let writer = Schema::parse_str(&writer_json.to_string()).unwrap();
        let body = apache_avro::to_avro_datum(&writer, Value::Record(fields)).unwrap();
        let stub = stub::start([(1, Answer::Avro(writer_json.to_string()))].into()).await;
        let registry = RegistryClient::new(&stub.base, Duration::from_secs(2)).unwrap();
        let schemas = if readers.is_empty() {
            schemas()
        } else {
            let tmp = tempfile::tempdir().unwrap();
            for (name, text) in dir_files() {
                std::fs::write(tmp.path().join(name), text).unwrap();
            }
            for (name, json) in readers {
                std::fs::write(tmp.path().join(name), json.to_string()).unwrap();
            }
            SchemaSet::load(tmp.path()).unwrap()
        };
        Decoder::new(schemas, Some(registry), DecodeLimits::default())
            .decode(kind, Some(b"glow/cust/42"), &frame_confluent(1, &body), NOW)
            .await
    }

    #[tokio::test]
    async fn finer_timestamps_are_converted_to_milliseconds() {
        let (event, _) = samples().remove(0);
        let ms = NOW - 60_000;
        let cases = [
            (
                serde_json::json!({"type": "long", "logicalType": "timestamp-micros"}),
                Value::TimestampMicros(ms * 1_000 + 999),
            ),
            (
                serde_json::json!({"type": "long", "logicalType": "timestamp-nanos"}),
                Value::TimestampNanos(ms * 1_000_000 + 999_999),
            ),
            (
                serde_json::json!(["null", {"type": "long", "logicalType": "timestamp-micros"}]),
                Value::Union(1, Box::new(Value::TimestampMicros(ms * 1_000))),
            ),
            (serde_json::json!("long"), Value::Long(ms)),
        ];
        for (ty, value) in cases {
            let mut json = send_schema_json();
            retype(&mut json, "occurred_at", ty.clone());
            let mut fields = send_fields();
            set(&mut fields, "occurred_at", value);
            let decoded = decode_written(&json, fields, EventKind::Send, &[])
                .await
                .unwrap_or_else(|e| panic!("{ty}: {e}"));
            assert_eq!(decoded, event, "{ty}");
        }
    }

    #[tokio::test]
    async fn local_timestamps_dates_and_nulls_are_refused_clearly() {
        let ms = NOW - 60_000;
        for (logical, value) in [
            ("local-timestamp-millis", Value::LocalTimestampMillis(ms)),
            (
                "local-timestamp-micros",
                Value::LocalTimestampMicros(ms * 1000),
            ),
        ] {
            let mut json = send_schema_json();
            retype(
                &mut json,
                "occurred_at",
                serde_json::json!({"type": "long", "logicalType": logical}),
            );
            let mut fields = send_fields();
            set(&mut fields, "occurred_at", value);
            let e = decode_written(&json, fields, EventKind::Send, &[])
                .await
                .unwrap_err();
            assert_eq!(e.reason(), "schema_mismatch", "{e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("written as {logical}")), "{msg}");
            assert!(msg.contains("no time zone"), "{msg}");
            assert!(msg.contains("timestamp-millis"), "{msg}");
        }

        let mut json = send_schema_json();
        retype(
            &mut json,
            "occurred_at",
            serde_json::json!({"type": "int", "logicalType": "date"}),
        );
        let mut fields = send_fields();
        set(&mut fields, "occurred_at", Value::Date(20_000));
        let e = decode_written(&json, fields, EventKind::Send, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "schema_mismatch");
        assert!(e.to_string().contains("written as date"), "{e}");

        // A nullable writer field that lapse requires: fine until it is null.
        let mut json = send_schema_json();
        retype(
            &mut json,
            "message_id",
            serde_json::json!(["null", "string"]),
        );
        let mut fields = send_fields();
        set(
            &mut fields,
            "message_id",
            Value::Union(1, Box::new(Value::String("m1".into()))),
        );
        decode_written(&json, fields.clone(), EventKind::Send, &[])
            .await
            .unwrap();
        set(
            &mut fields,
            "message_id",
            Value::Union(0, Box::new(Value::Null)),
        );
        let e = decode_written(&json, fields, EventKind::Send, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "invalid_field");
        assert!(
            e.to_string().contains("`message_id` is invalid: is null"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn union_branch_order_and_promotions() {
        let (event, _) = samples().remove(0);
        let mut json = send_schema_json();
        retype(
            &mut json,
            "campaign_id",
            serde_json::json!(["string", "null"]),
        );
        retype(&mut json, "cost", serde_json::json!(["long", "null"]));
        let mut fields = send_fields();
        set(
            &mut fields,
            "campaign_id",
            Value::Union(0, Box::new(Value::String("spring".into()))),
        );
        set(
            &mut fields,
            "cost",
            Value::Union(0, Box::new(Value::Long(12))),
        );
        let decoded = decode_written(&json, fields.clone(), EventKind::Send, &[])
            .await
            .unwrap();
        assert_eq!(decoded, event);
        set(
            &mut fields,
            "campaign_id",
            Value::Union(1, Box::new(Value::Null)),
        );
        set(&mut fields, "cost", Value::Union(1, Box::new(Value::Null)));
        let decoded = decode_written(&json, fields, EventKind::Send, &[])
            .await
            .unwrap();
        assert!(matches!(
            decoded.body,
            EventBody::Send {
                campaign_id: None,
                cost: None,
                ..
            }
        ));

        // int -> long, as a plain type and in a union; non-union writer for a
        // reader union.
        for (ty, value) in [
            (serde_json::json!("int"), Value::Int(12)),
            (
                serde_json::json!(["null", "int"]),
                Value::Union(1, Box::new(Value::Int(12))),
            ),
            (serde_json::json!("long"), Value::Long(12)),
        ] {
            let mut json = send_schema_json();
            retype(&mut json, "cost", ty.clone());
            retype(&mut json, "campaign_id", serde_json::json!("string"));
            let mut fields = send_fields();
            set(&mut fields, "cost", value);
            set(&mut fields, "campaign_id", Value::String("spring".into()));
            let decoded = decode_written(&json, fields, EventKind::Send, &[])
                .await
                .unwrap_or_else(|e| panic!("{ty}: {e}"));
            assert_eq!(decoded, event, "{ty}");
        }

        // float/double are not promoted to long.
        let mut json = send_schema_json();
        retype(&mut json, "cost", serde_json::json!(["null", "double"]));
        let mut fields = send_fields();
        set(
            &mut fields,
            "cost",
            Value::Union(1, Box::new(Value::Double(0.12))),
        );
        let e = decode_written(&json, fields, EventKind::Send, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "schema_mismatch");
        assert!(e.to_string().contains("written as double"), "{e}");
    }

    #[tokio::test]
    async fn strings_from_bytes_and_uuids() {
        let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let mut json = send_schema_json();
        retype(
            &mut json,
            "event_id",
            serde_json::json!({"type": "string", "logicalType": "uuid"}),
        );
        retype(&mut json, "message_id", serde_json::json!("bytes"));
        retype(
            &mut json,
            "campaign_id",
            serde_json::json!(["null", "bytes"]),
        );
        let mut fields = send_fields();
        set(
            &mut fields,
            "event_id",
            Value::Uuid(apache_avro::Uuid::parse_str(uuid).unwrap()),
        );
        set(&mut fields, "message_id", Value::Bytes(b"m1".to_vec()));
        set(
            &mut fields,
            "campaign_id",
            Value::Union(1, Box::new(Value::Bytes(b"spring".to_vec()))),
        );
        let decoded = decode_written(&json, fields.clone(), EventKind::Send, &[])
            .await
            .unwrap();
        let (mut event, _) = samples().remove(0);
        event.event_id = uuid.into();
        assert_eq!(decoded, event);

        set(
            &mut fields,
            "message_id",
            Value::Bytes(b"\xff\xfesecret".to_vec()),
        );
        let e = decode_written(&json, fields, EventKind::Send, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "schema_mismatch");
        assert!(e.to_string().contains("bytes that are not UTF-8"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    /// A decimal as apache-avro writes it: big-endian two's complement.
    fn dec(unscaled: i128) -> Value {
        Value::Decimal(apache_avro::Decimal::from(unscaled.to_be_bytes().to_vec()))
    }

    async fn visit_with_amount(
        ty: serde_json::Value,
        amount: Value,
        currency: &str,
    ) -> Result<Event, DecodeError> {
        let mut json = visit_schema_json();
        retype(&mut json, "amount", ty);
        let mut fields = visit_fields();
        set(&mut fields, "amount", amount);
        set(&mut fields, "currency", Value::String(currency.into()));
        decode_written(&json, fields, EventKind::Visit, &[]).await
    }

    fn amount_of(e: &Event) -> i64 {
        match e.body {
            EventBody::Visit { amount, .. } => amount,
            _ => panic!("not a visit"),
        }
    }

    #[tokio::test]
    async fn decimal_amounts_become_exact_minor_units() {
        let bytes = |scale: u32| serde_json::json!({"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": scale});
        let fixed = serde_json::json!({"type": "fixed", "name": "Money", "size": 8,
            "logicalType": "decimal", "precision": 18, "scale": 2});
        let ok = [
            (bytes(2), dec(380_000), "CNY", 380_000),
            (fixed.clone(), dec(128_050), "CNY", 128_050),
            (bytes(0), dec(1280), "CNY", 128_000),
            (bytes(4), dec(12_3400), "CNY", 1234),
            (bytes(2), dec(150_000), "JPY", 1500),
            (bytes(2), dec(1250), "KWD", 12_500),
            (bytes(2), dec(0), "CNY", 0),
            (bytes(30), dec(0), "CNY", 0),
            (
                serde_json::json!(["null", bytes(2)]),
                Value::Union(1, Box::new(dec(99))),
                "CNY",
                99,
            ),
        ];
        for (ty, amount, currency, minor) in ok {
            let e = visit_with_amount(ty.clone(), amount, currency)
                .await
                .unwrap_or_else(|e| panic!("{ty} {currency}: {e}"));
            assert_eq!(amount_of(&e), minor, "{ty} {currency}");
        }

        let refused = [
            (bytes(2), dec(150_050), "JPY", "does not round"),
            (bytes(3), dec(12_345), "CNY", "does not round"),
            (bytes(2), dec(100), "XAU", "decimal places XAU has"),
            (bytes(2), dec(-100), "CNY", "is negative"),
            (bytes(0), dec(i128::from(i64::MAX)), "CNY", "too large"),
            (bytes(0), dec(10i128.pow(30)), "JPY", "too large"),
        ];
        for (ty, amount, currency, says) in refused {
            let e = visit_with_amount(ty.clone(), amount, currency)
                .await
                .unwrap_err();
            assert_eq!(e.reason(), "invalid_field", "{ty} {currency}: {e}");
            assert!(e.to_string().contains(says), "{e}");
            assert!(e.to_string().contains("`amount`"), "{e}");
        }

        // A string says nothing about its unit: refused, with what to send.
        let e = visit_with_amount(
            serde_json::json!("string"),
            Value::String("3800.00".into()),
            "CNY",
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason(), "schema_mismatch");
        let msg = e.to_string();
        assert!(msg.contains("`amount` is written as string"), "{msg}");
        assert!(msg.contains("a long in minor units"), "{msg}");
        assert!(!msg.contains("3800"), "{msg}");

        // Other long fields take no decimals (a send has no currency).
        let mut json = send_schema_json();
        retype(&mut json, "cost", serde_json::json!(["null", bytes(2)]));
        let mut fields = send_fields();
        set(&mut fields, "cost", Value::Union(1, Box::new(dec(12))));
        let e = decode_written(&json, fields, EventKind::Send, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "schema_mismatch");
        assert!(e.to_string().contains("written as decimal"), "{e}");
    }

    #[tokio::test]
    async fn unknown_symbols_take_the_reader_default_or_are_refused_clearly() {
        let mut json = send_schema_json();
        json["fields"][4]["type"]["symbols"]
            .as_array_mut()
            .unwrap()
            .push("DOUYIN".into());
        let mut fields = send_fields();
        set(&mut fields, "channel", Value::Enum(5, "DOUYIN".into()));

        let e = decode_written(&json, fields.clone(), EventKind::Send, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "bad_enum");
        let msg = e.to_string();
        assert!(
            msg.contains("field `channel` has symbol \"DOUYIN\""),
            "{msg}"
        );
        assert!(msg.contains("WECHAT, SMS, PHONE, EMAIL, SOCIAL"), "{msg}");
        assert!(msg.contains("`default`"), "{msg}");

        // A reader schema whose enum has a default reads unknown symbols as it.
        let mut reader = send_schema_json();
        reader["fields"][4]["type"]["default"] = "SOCIAL".into();
        let decoded = decode_written(&json, fields, EventKind::Send, &[("send.avsc", reader)])
            .await
            .unwrap();
        assert!(matches!(
            decoded.body,
            EventBody::Send {
                channel: Channel::Social,
                ..
            }
        ));

        // A string written for the enum: shown only if it looks like a symbol.
        let mut json = visit_schema_json();
        retype(&mut json, "visit_type", serde_json::json!("string"));
        let mut fields = visit_fields();
        set(&mut fields, "visit_type", Value::String("CHECKUP".into()));
        let e = decode_written(&json, fields.clone(), EventKind::Visit, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "bad_enum");
        assert!(e.to_string().contains("\"CHECKUP\""), "{e}");
        assert!(e.to_string().contains(VISIT_TYPE_SYMBOLS), "{e}");
        set(
            &mut fields,
            "visit_type",
            Value::String("call 13800000000".into()),
        );
        let e = decode_written(&json, fields.clone(), EventKind::Visit, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "bad_enum");
        assert!(!e.to_string().contains("13800000000"), "{e}");
        set(&mut fields, "visit_type", Value::String("TREATMENT".into()));
        decode_written(&json, fields, EventKind::Visit, &[])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn records_match_by_unqualified_name_or_reader_alias() {
        let (event, _) = samples().remove(0);
        let strip = |json: &mut serde_json::Value| {
            json.as_object_mut().unwrap().remove("namespace");
        };
        let mut bare = send_schema_json();
        strip(&mut bare);
        let mut other = send_schema_json();
        other["namespace"] = "com.clinic.events".into();
        for json in [bare, other] {
            let decoded = decode_written(&json, send_fields(), EventKind::Send, &[])
                .await
                .unwrap();
            assert_eq!(decoded, event, "{}", json["namespace"]);
        }

        let mut renamed = send_schema_json();
        renamed["name"] = "MessageSent".into();
        renamed["namespace"] = "com.clinic.events".into();
        let e = decode_written(&renamed, send_fields(), EventKind::Send, &[])
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "schema_mismatch");
        assert!(
            e.to_string().contains("com.clinic.events.MessageSent"),
            "{e}"
        );
        let mut reader = send_schema_json();
        reader["aliases"] = serde_json::json!(["com.clinic.events.MessageSent"]);
        let decoded = decode_written(
            &renamed,
            send_fields(),
            EventKind::Send,
            &[("send.avsc", reader)],
        )
        .await
        .unwrap();
        assert_eq!(decoded, event);
    }

    #[tokio::test]
    async fn extra_reordered_and_missing_optional_fields() {
        let (mut event, _) = samples().remove(0);
        let mut json = send_schema_json();
        let fields_json = json["fields"].as_array_mut().unwrap();
        fields_json.retain(|f| f["name"] != "campaign_id" && f["name"] != "cost");
        fields_json.reverse();
        fields_json.push(serde_json::json!({"name": "locale", "type": "string"}));
        let mut fields = send_fields();
        fields.retain(|(n, _)| n != "campaign_id" && n != "cost");
        fields.reverse();
        fields.push(("locale".into(), Value::String("zh-CN".into())));
        let decoded = decode_written(&json, fields, EventKind::Send, &[])
            .await
            .unwrap();
        if let EventBody::Send {
            campaign_id, cost, ..
        } = &mut event.body
        {
            *campaign_id = None;
            *cost = None;
        }
        assert_eq!(decoded, event);
    }

    #[test]
    fn minor_units_and_big_endian_integers() {
        assert_eq!(minor_unit_exponent("CNY"), Some(2));
        assert_eq!(minor_unit_exponent("JPY"), Some(0));
        assert_eq!(minor_unit_exponent("KRW"), Some(0));
        assert_eq!(minor_unit_exponent("KWD"), Some(3));
        assert_eq!(minor_unit_exponent("CLF"), Some(4));
        assert_eq!(minor_unit_exponent("XAU"), None);
        assert_eq!(minor_unit_exponent("CN"), None);

        assert_eq!(i128_from_be(&[]), Some(0));
        assert_eq!(i128_from_be(&[0x01, 0x00]), Some(256));
        assert_eq!(i128_from_be(&[0xFF]), Some(-1));
        assert_eq!(i128_from_be(&[0xFF, 0x7F]), Some(-129));
        let mut wide = vec![0u8; 20];
        wide[19] = 5;
        assert_eq!(i128_from_be(&wide), Some(5));
        let mut neg = vec![0xFFu8; 20];
        neg[19] = 0xFE;
        assert_eq!(i128_from_be(&neg), Some(-2));
        wide[3] = 1;
        assert_eq!(i128_from_be(&wide), None);
        // 17 bytes whose low 16 would read as negative: does not fit.
        let mut edge = vec![0u8; 17];
        edge[1] = 0x80;
        assert_eq!(i128_from_be(&edge), None);
        assert_eq!(i128_from_be(&i128::MIN.to_be_bytes()), Some(i128::MIN));
    }

    #[test]
    fn symbol_lists_are_what_the_code_parses() {
        for s in CHANNEL_SYMBOLS.split(", ") {
            assert!(Channel::parse(s).is_some(), "{s}");
        }
        assert_eq!(CHANNEL_SYMBOLS.split(", ").count(), Channel::ALL.len());
        for s in PURPOSE_SYMBOLS.split(", ") {
            assert!(Purpose::parse(s).is_some(), "{s}");
        }
        for s in VISIT_TYPE_SYMBOLS.split(", ") {
            assert!(VisitType::parse(s).is_some(), "{s}");
        }
        assert_eq!(shown_symbol("DOUYIN"), "\"DOUYIN\"");
        assert_eq!(shown_symbol("_A1"), "\"_A1\"");
        for hidden in ["", "1A", "a b", "退订", &"A".repeat(65)] {
            assert!(!shown_symbol(hidden).contains('"'), "{hidden}");
        }
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
                offer_code: None,
                discount: None,
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
