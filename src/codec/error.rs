//! Codec errors. `DecodeError` is per record (dead-letter or retry); `CodecError`
//! is for start-up and producers (schema files, registry config, encoding).
//!
//! Messages never contain reply text or customer ids: they end up in DLQ headers
//! and logs. Other ids are truncated.

use std::path::PathBuf;

/// Why one input record could not become an `Event`.
///
/// `Clone` because the consumer keeps per-record results while it retries a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload: the record value has no bytes (a tombstone?); producers must send an Avro-encoded event")]
    EmptyPayload,

    #[error("payload of {len} bytes exceeds the limit of {max} bytes (schema.max_payload_bytes); the producer sends something that is not a lapse event, or raise the limit")]
    PayloadTooLarge { len: usize, max: usize },

    #[error("unknown framing: {detail}; expected Confluent (0x00 + 4-byte schema id) or Avro single-object (0xC3 0x01 + 8-byte fingerprint) framing, fix the producer's serializer")]
    UnknownFraming { detail: String },

    #[error("schema id {id} is not registered in the schema registry (HTTP 404); the producer uses another registry or the schema was deleted: fix the producer or the registry, then replay from the DLQ")]
    UnknownSchemaId { id: u32 },

    #[error("record is Confluent-framed (schema id {id}) but no schema registry is configured; set schema.registry_url (LAPSE_SCHEMA_REGISTRY_URL) and replay from the DLQ")]
    RegistryNotConfigured { id: u32 },

    /// Transient: the caller retries, never dead-letters.
    #[error("schema registry unavailable while fetching schema id {id}: {detail}; retrying")]
    RegistryUnavailable { id: u32, detail: String },

    #[error("schema id {id} is a {schema_type} schema, not Avro; produce Avro to lapse topics")]
    UnsupportedSchemaType { id: u32, schema_type: String },

    #[error("schema id {id} uses Confluent schema references ({references}), which lapse does not resolve; register the producer's schema self-contained (the referenced types defined inline, no `references`) and replay from the DLQ")]
    SchemaReferences { id: u32, references: String },

    #[error("writer schema {source_desc} is unusable: {detail}; register a self-contained Avro record schema")]
    BadWriterSchema { source_desc: String, detail: String },

    #[error("no schema with fingerprint {fingerprint:016x} (CRC-64-AVRO, as read from the single-object header) in the schemas directory; add the producer's schema version (e.g. under schemas/history/) or fix the producer")]
    UnknownFingerprint { fingerprint: u64 },

    #[error("single-object fingerprint {fingerprint:016x} is the non-standard one lapse 0.1 wrote (schema.accept_legacy_fingerprints = false); re-encode with a standard Avro library (CRC-64-AVRO of the Parsing Canonical Form), or accept it again during the migration")]
    LegacyFingerprint { fingerprint: u64 },

    #[error("Avro body does not match its writer schema: {detail}; the record is corrupt or framed with the wrong schema")]
    AvroDecode { detail: String },

    #[error("record {found} on a topic for {expected}; the producer writes to the wrong topic or uses the wrong schema")]
    SchemaMismatch { expected: String, found: String },

    /// `written` is a type name (`string`, `timestamp-micros`), never a value.
    #[error("field `{field}` is written as {written}, which lapse cannot read there; the producer must send {expected} (see lapse's schemas/)")]
    IncompatibleField {
        field: String,
        written: String,
        expected: String,
    },

    #[error("required field `{field}` is missing from the writer schema and has no default; the producer must set it")]
    MissingField { field: String },

    /// `symbol` is shown only when it is a valid Avro symbol (a producer
    /// writing a string for the enum could put anything there).
    #[error("field `{field}` has symbol {symbol} that lapse does not know (it knows {known}); the producer must send one of those, or the enum in lapse's reader schema (schemas/) must declare a `default` among them, which unknown symbols are then read as")]
    BadEnum {
        field: String,
        symbol: String,
        known: String,
    },

    #[error("field `{field}` is invalid: {problem}")]
    InvalidField { field: String, problem: String },

    #[error("occurred_at {occurred_at} is after {limit} (now + max future skew); the producer's clock or timestamp unit is wrong (milliseconds expected)")]
    TimestampInFuture { occurred_at: i64, limit: i64 },

    #[error("occurred_at {occurred_at} is before {min} (2000-01-01 by default); the timestamp is not in milliseconds since the Unix epoch")]
    TimestampOutOfRange { occurred_at: i64, min: i64 },

    #[error("Kafka key {detail}; the key must be exactly `tenant_id/customer_id` of the value (UTF-8) so a customer's events stay in one partition")]
    KeyMismatch { detail: &'static str },
}

impl DecodeError {
    /// Every value `reason()` can return, for pre-registering metric series.
    pub const REASONS: &'static [&'static str] = &[
        "empty_payload",
        "payload_too_large",
        "unknown_framing",
        "unknown_schema_id",
        "registry_not_configured",
        "registry_unavailable",
        "unsupported_schema_type",
        "schema_references",
        "bad_writer_schema",
        "unknown_fingerprint",
        "legacy_fingerprint",
        "avro_decode",
        "schema_mismatch",
        "missing_field",
        "bad_enum",
        "invalid_field",
        "timestamp_in_future",
        "timestamp_out_of_range",
        "key_mismatch",
    ];

    /// Bounded snake_case label for metrics and the DLQ reason header.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::EmptyPayload => "empty_payload",
            DecodeError::PayloadTooLarge { .. } => "payload_too_large",
            DecodeError::UnknownFraming { .. } => "unknown_framing",
            DecodeError::UnknownSchemaId { .. } => "unknown_schema_id",
            DecodeError::RegistryNotConfigured { .. } => "registry_not_configured",
            DecodeError::RegistryUnavailable { .. } => "registry_unavailable",
            DecodeError::UnsupportedSchemaType { .. } => "unsupported_schema_type",
            DecodeError::SchemaReferences { .. } => "schema_references",
            DecodeError::BadWriterSchema { .. } => "bad_writer_schema",
            DecodeError::UnknownFingerprint { .. } => "unknown_fingerprint",
            DecodeError::LegacyFingerprint { .. } => "legacy_fingerprint",
            DecodeError::AvroDecode { .. } => "avro_decode",
            DecodeError::SchemaMismatch { .. } | DecodeError::IncompatibleField { .. } => {
                "schema_mismatch"
            }
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::BadEnum { .. } => "bad_enum",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::TimestampInFuture { .. } => "timestamp_in_future",
            DecodeError::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
        }
    }

    /// True when retrying the same bytes later may succeed (registry down, 5xx,
    /// timeout). Such records must be retried by the caller, never dead-lettered.
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable { .. })
    }

    pub(crate) fn invalid(field: &str, problem: impl Into<String>) -> Self {
        DecodeError::InvalidField {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Start-up and producer-side errors: schema files, registry configuration, encoding.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("reading schemas at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid Avro schema: {detail}")]
    Parse { path: PathBuf, detail: String },

    #[error("{path}: a top-level schema must be a named record (history versions may live in subdirectories)")]
    NotARecord { path: PathBuf },

    #[error("record {name} is defined by two top-level files, {first} and {second}; keep one at the top level and move older versions to a subdirectory such as history/")]
    DuplicateName {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("no top-level schema for record {name} in {dir}; lapse needs it (restore it from the lapse release)")]
    MissingSchema { name: String, dir: PathBuf },

    #[error("{path}: record {name} lacks field `{field}` that lapse reads; it must stay compatible with the lapse release")]
    IncompatibleReader {
        path: PathBuf,
        name: String,
        field: String,
    },

    #[error("no schema named {name} is loaded")]
    UnknownSchema { name: String },

    #[error("encoding {schema}: {detail}")]
    Encode { schema: String, detail: String },

    #[error("schema registry URL {url:?}: {detail}")]
    RegistryUrl { url: String, detail: String },

    #[error("schema registry at {url} unreachable: {detail}")]
    RegistryUnreachable { url: String, detail: String },

    #[error("the schema registry refused subject {subject}: {detail}")]
    RegistryRefused { subject: String, detail: String },

    #[error("building the schema registry HTTP client: {0}")]
    HttpClient(String),
}

/// At most `max` characters of `s`, with an ellipsis when cut: ids in messages
/// stay readable but bounded.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_listed_and_snake_case() {
        let samples = [
            DecodeError::EmptyPayload,
            DecodeError::PayloadTooLarge { len: 2, max: 1 },
            DecodeError::UnknownFraming { detail: "x".into() },
            DecodeError::UnknownSchemaId { id: 1 },
            DecodeError::RegistryNotConfigured { id: 1 },
            DecodeError::RegistryUnavailable {
                id: 1,
                detail: "x".into(),
            },
            DecodeError::UnsupportedSchemaType {
                id: 1,
                schema_type: "PROTOBUF".into(),
            },
            DecodeError::SchemaReferences {
                id: 1,
                references: "a.B (subject b, version 1)".into(),
            },
            DecodeError::BadWriterSchema {
                source_desc: "x".into(),
                detail: "x".into(),
            },
            DecodeError::UnknownFingerprint { fingerprint: 1 },
            DecodeError::LegacyFingerprint { fingerprint: 1 },
            DecodeError::AvroDecode { detail: "x".into() },
            DecodeError::SchemaMismatch {
                expected: "a".into(),
                found: "b".into(),
            },
            DecodeError::IncompatibleField {
                field: "f".into(),
                written: "string".into(),
                expected: "a long".into(),
            },
            DecodeError::MissingField { field: "f".into() },
            DecodeError::BadEnum {
                field: "f".into(),
                symbol: "\"S\"".into(),
                known: "A, B".into(),
            },
            DecodeError::invalid("f", "p"),
            DecodeError::TimestampInFuture {
                occurred_at: 2,
                limit: 1,
            },
            DecodeError::TimestampOutOfRange {
                occurred_at: 0,
                min: 1,
            },
            DecodeError::KeyMismatch { detail: "missing" },
        ];
        let mut seen: Vec<&str> = samples.iter().map(|e| e.reason()).collect();
        seen.sort_unstable();
        seen.dedup();
        let mut listed = DecodeError::REASONS.to_vec();
        listed.sort_unstable();
        assert_eq!(seen, listed);
        for e in &samples {
            assert!(e
                .reason()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'));
            assert_eq!(
                e.is_transient(),
                matches!(e, DecodeError::RegistryUnavailable { .. })
            );
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn truncate_is_char_safe() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(truncate("退订退订", 2), "退订…");
    }
}
