//! The schemas directory: reader schemas (top-level files) and every known
//! writer version (all files, recursively), looked up by CRC-64-AVRO fingerprint
//! for single-object decoding: the standard one ([`super::canonical`]) and, for
//! records framed by lapse 0.1, the legacy one.

use super::canonical::{fingerprint_of_json, legacy_fingerprint};
use super::error::CodecError;
use crate::domain::event::EventKind;
use apache_avro::schema::RecordSchema;
use apache_avro::Schema;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Record fullname of the throttle event output.
pub const THROTTLE_EVENT: &str = "lapse.v1.ThrottleEvent";
/// Record fullname of the recall trigger output.
pub const RECALL_TRIGGER: &str = "lapse.v1.RecallTrigger";
/// Record fullname of the recall outcome output.
pub const RECALL_OUTCOME: &str = "lapse.v1.RecallOutcome";
/// Output records a `SchemaSet` must contain.
pub const OUTPUT_SCHEMAS: [&str; 3] = [THROTTLE_EVENT, RECALL_TRIGGER, RECALL_OUTCOME];

/// Nesting limit of the directory walk: enough for `history/v1/`, stops symlink loops.
const MAX_DIR_DEPTH: usize = 8;

/// The schemas compiled into the binary, identical to `schemas/*.avsc` of this release.
const BUILTIN: [(&str, &str); 9] = [
    ("send.avsc", include_str!("../../schemas/send.avsc")),
    ("open.avsc", include_str!("../../schemas/open.avsc")),
    ("click.avsc", include_str!("../../schemas/click.avsc")),
    ("reply.avsc", include_str!("../../schemas/reply.avsc")),
    ("visit.avsc", include_str!("../../schemas/visit.avsc")),
    ("feedback.avsc", include_str!("../../schemas/feedback.avsc")),
    (
        "throttle_event.avsc",
        include_str!("../../schemas/throttle_event.avsc"),
    ),
    (
        "recall_trigger.avsc",
        include_str!("../../schemas/recall_trigger.avsc"),
    ),
    (
        "recall_outcome.avsc",
        include_str!("../../schemas/recall_outcome.avsc"),
    ),
];

/// Fields the decoder reads from each input record; a reader schema without
/// them would dead-letter every record, so loading refuses it.
pub(crate) fn reader_fields(kind: EventKind) -> &'static [&'static str] {
    match kind {
        EventKind::Send => &[
            "event_id",
            "tenant_id",
            "customer_id",
            "occurred_at",
            "channel",
            "message_id",
            "campaign_id",
            "purpose",
            "cost",
        ],
        EventKind::Open | EventKind::Click => &[
            "event_id",
            "tenant_id",
            "customer_id",
            "occurred_at",
            "channel",
            "message_id",
            "campaign_id",
        ],
        EventKind::Reply => &[
            "event_id",
            "tenant_id",
            "customer_id",
            "occurred_at",
            "channel",
            "message_id",
            "text",
        ],
        EventKind::Visit => &[
            "event_id",
            "tenant_id",
            "customer_id",
            "occurred_at",
            "visit_type",
            "treatment",
            "amount",
            "currency",
        ],
        EventKind::Feedback => &[
            "event_id",
            "tenant_id",
            "customer_id",
            "occurred_at",
            "kind",
            "score",
            "visit_event_id",
            "channel",
        ],
    }
}

/// CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form, as the
/// specification defines it; single-object headers carry it little-endian.
pub use super::canonical::fingerprint;

/// Fullname of a record schema (`lapse.v1.Send`); `None` for other types.
pub fn record_fullname(schema: &Schema) -> Option<String> {
    match schema {
        Schema::Record(RecordSchema { name, .. }) => Some(name.fullname(None)),
        _ => None,
    }
}

/// Whether a record written as `writer_fullname` may be read with `reader`,
/// as Avro schema resolution matches records: by unqualified name (a producer's
/// `Send` or `com.clinic.events.Send` is read as `lapse.v1.Send`), or by one of
/// the reader's aliases (a renamed record), also compared unqualified.
pub fn reader_accepts(reader: &Schema, writer_fullname: &str) -> bool {
    let Schema::Record(RecordSchema { name, aliases, .. }) = reader else {
        return false;
    };
    let writer = writer_fullname
        .rsplit('.')
        .next()
        .unwrap_or(writer_fullname);
    name.name == writer || aliases.iter().flatten().any(|a| a.name() == writer)
}

#[derive(Debug)]
struct Named {
    schema: Arc<Schema>,
    fingerprint: u64,
    path: PathBuf,
    /// The file's JSON, as registered with a schema registry.
    text: String,
}

#[derive(Debug)]
struct Inner {
    source: String,
    readers: Vec<Arc<Schema>>,
    by_name: HashMap<String, Named>,
    by_fingerprint: HashMap<u64, Arc<Schema>>,
    /// lapse 0.1's fingerprints (apache-avro's canonical form), where they
    /// differ from the standard one.
    by_legacy_fingerprint: HashMap<u64, Arc<Schema>>,
}

/// Reader schemas by record name and writer schemas by fingerprint. Cheap to
/// clone (shared).
#[derive(Debug, Clone)]
pub struct SchemaSet {
    inner: Arc<Inner>,
}

impl SchemaSet {
    /// Loads every `*.avsc` under `dir`, recursively. Top-level files are the
    /// reader schemas (one per record name); files in subdirectories (e.g.
    /// `history/`) only add writer versions for single-object decoding. Each file
    /// must parse on its own. Fails if an input or output record is missing.
    pub fn load(dir: &Path) -> Result<SchemaSet, CodecError> {
        let mut files = Vec::new();
        collect(dir, 0, &mut files)?;
        files.sort();
        let mut sources = Vec::with_capacity(files.len());
        for (path, top) in files {
            let text = std::fs::read_to_string(&path).map_err(|source| CodecError::Io {
                path: path.clone(),
                source,
            })?;
            sources.push((path, text, top));
        }
        SchemaSet::from_sources(dir, sources)
    }

    /// The schemas of this release compiled into the binary (no history
    /// versions): for tests, samples and tools that run without `schemas/`.
    pub fn builtin() -> Result<SchemaSet, CodecError> {
        let dir = Path::new("<builtin>");
        let sources = BUILTIN
            .iter()
            .map(|(file, text)| (dir.join(file), (*text).to_owned(), true))
            .collect();
        SchemaSet::from_sources(dir, sources)
    }

    fn from_sources(
        dir: &Path,
        sources: Vec<(PathBuf, String, bool)>,
    ) -> Result<SchemaSet, CodecError> {
        let mut by_name: HashMap<String, Named> = HashMap::new();
        let mut by_fingerprint: HashMap<u64, Arc<Schema>> = HashMap::new();
        let mut by_legacy_fingerprint: HashMap<u64, Arc<Schema>> = HashMap::new();
        for (path, text, top) in sources {
            let parse_error = |detail: String| CodecError::Parse {
                path: path.clone(),
                detail,
            };
            let schema = Schema::parse_str(&text).map_err(|e| parse_error(e.to_string()))?;
            // From the file's own text: exactly what producers fingerprint.
            let fp = fingerprint_of_json(&text).map_err(|e| parse_error(e.to_string()))?;
            let legacy = legacy_fingerprint(&schema);
            let schema = Arc::new(schema);
            by_fingerprint.entry(fp).or_insert_with(|| schema.clone());
            if legacy != fp {
                by_legacy_fingerprint
                    .entry(legacy)
                    .or_insert_with(|| schema.clone());
            }
            if !top {
                continue;
            }
            let Some(name) = record_fullname(&schema) else {
                return Err(CodecError::NotARecord { path });
            };
            if let Some(first) = by_name.get(&name) {
                return Err(CodecError::DuplicateName {
                    name,
                    first: first.path.clone(),
                    second: path,
                });
            }
            by_name.insert(
                name,
                Named {
                    schema,
                    fingerprint: fp,
                    path,
                    text,
                },
            );
        }

        let missing = |name: &str| CodecError::MissingSchema {
            name: name.to_owned(),
            dir: dir.to_owned(),
        };
        let mut readers = Vec::with_capacity(EventKind::ALL.len());
        for kind in EventKind::ALL {
            let named = by_name
                .get(kind.schema_name())
                .ok_or_else(|| missing(kind.schema_name()))?;
            if let Schema::Record(rec) = &*named.schema {
                for field in reader_fields(kind) {
                    if !rec.lookup.contains_key(*field) {
                        return Err(CodecError::IncompatibleReader {
                            path: named.path.clone(),
                            name: kind.schema_name().to_owned(),
                            field: (*field).to_owned(),
                        });
                    }
                }
            }
            readers.push(named.schema.clone());
        }
        for name in OUTPUT_SCHEMAS {
            if !by_name.contains_key(name) {
                return Err(missing(name));
            }
        }
        Ok(SchemaSet {
            inner: Arc::new(Inner {
                source: dir.display().to_string(),
                readers,
                by_name,
                by_fingerprint,
                by_legacy_fingerprint,
            }),
        })
    }

    /// Reader schema of an input kind (the top-level file of `kind.schema_name()`).
    pub fn reader(&self, kind: EventKind) -> &Arc<Schema> {
        &self.inner.readers[kind.index()]
    }

    /// A top-level (current) schema by record fullname, e.g. [`THROTTLE_EVENT`].
    pub fn by_name(&self, fullname: &str) -> Option<&Arc<Schema>> {
        self.inner.by_name.get(fullname).map(|n| &n.schema)
    }

    /// Fingerprint of the current version of a record, for single-object framing.
    pub fn fingerprint_of(&self, fullname: &str) -> Option<u64> {
        self.inner.by_name.get(fullname).map(|n| n.fingerprint)
    }

    /// The JSON text of the current version of a record (its file's content).
    pub fn text_of(&self, fullname: &str) -> Option<&str> {
        self.inner.by_name.get(fullname).map(|n| n.text.as_str())
    }

    /// Any known version (current or history) by CRC-64-AVRO fingerprint.
    pub fn writer(&self, fingerprint: u64) -> Option<&Arc<Schema>> {
        self.inner.by_fingerprint.get(&fingerprint)
    }

    /// A known version by the fingerprint lapse 0.1 wrote (apache-avro's
    /// non-standard canonical form); `None` where that equals the standard one.
    pub fn legacy_writer(&self, fingerprint: u64) -> Option<&Arc<Schema>> {
        self.inner.by_legacy_fingerprint.get(&fingerprint)
    }

    /// Number of distinct writer schemas known (for the start-up log line).
    pub fn writer_count(&self) -> usize {
        self.inner.by_fingerprint.len()
    }

    /// Where the schemas came from (directory or `<builtin>`).
    pub fn source(&self) -> &str {
        &self.inner.source
    }
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, bool)>) -> Result<(), CodecError> {
    let io = |source| CodecError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        // Follows symlinks on purpose (deployments mount schemas that way).
        let meta = std::fs::metadata(&path).map_err(|source| CodecError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            if depth + 1 < MAX_DIR_DEPTH {
                collect(&path, depth + 1, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "avsc") {
            out.push((path, depth == 0));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn schemas_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
    }

    #[test]
    fn loads_the_repository_schemas() {
        let set = SchemaSet::load(&schemas_dir()).unwrap();
        for kind in EventKind::ALL {
            assert_eq!(
                record_fullname(set.reader(kind)).as_deref(),
                Some(kind.schema_name())
            );
            let fp = set.fingerprint_of(kind.schema_name()).unwrap();
            assert_eq!(fingerprint(set.writer(fp).unwrap()), fp);
        }
        for name in OUTPUT_SCHEMAS {
            assert!(set.by_name(name).is_some(), "{name}");
        }
    }

    /// Test vectors of the Avro specification (Java's `parsingFingerprint64`).
    #[test]
    fn fingerprints_match_the_avro_spec() {
        assert_eq!(fingerprint(&Schema::Null) as i64, 7195948357588979594);
        assert_eq!(fingerprint(&Schema::Boolean) as i64, -6970731678124411036);
    }

    #[test]
    fn builtin_equals_directory() {
        let dir = SchemaSet::load(&schemas_dir()).unwrap();
        let builtin = SchemaSet::builtin().unwrap();
        for name in EventKind::ALL
            .iter()
            .map(|k| k.schema_name())
            .chain(OUTPUT_SCHEMAS)
        {
            assert_eq!(
                dir.fingerprint_of(name),
                builtin.fingerprint_of(name),
                "{name}"
            );
        }
    }

    /// Every record and every field documents itself, and shared enums are
    /// identical wherever they are defined inline.
    #[test]
    fn every_record_and_field_has_doc_and_enums_agree() {
        let mut enums: HashMap<String, Vec<String>> = HashMap::new();
        fn walk(s: &serde_json::Value, enums: &mut HashMap<String, Vec<String>>, file: &str) {
            match s {
                serde_json::Value::Object(o) => match o.get("type").and_then(|t| t.as_str()) {
                    Some("record") => {
                        assert!(o.get("doc").is_some(), "{file}: record without doc");
                        for f in o["fields"].as_array().unwrap() {
                            assert!(
                                f.get("doc").is_some(),
                                "{file}: field {} without doc",
                                f["name"]
                            );
                            walk(&f["type"], enums, file);
                        }
                    }
                    Some("enum") => {
                        assert!(o.get("doc").is_some(), "{file}: enum without doc");
                        let name = o["name"].as_str().unwrap().to_owned();
                        let symbols: Vec<String> = o["symbols"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|s| s.as_str().unwrap().to_owned())
                            .collect();
                        if let Some(prev) = enums.insert(name.clone(), symbols.clone()) {
                            assert_eq!(prev, symbols, "{file}: enum {name} differs");
                        }
                    }
                    Some("array") => walk(&o["items"], enums, file),
                    _ => {}
                },
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, enums, file)),
                _ => {}
            }
        }
        for entry in std::fs::read_dir(schemas_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "avsc") {
                let json: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                assert_eq!(json["namespace"], "lapse.v1", "{}", path.display());
                walk(&json, &mut enums, &path.display().to_string());
            }
        }
        assert_eq!(
            enums["Channel"],
            ["WECHAT", "SMS", "PHONE", "EMAIL", "SOCIAL"]
        );
    }

    fn copy_schemas(to: &Path) {
        for entry in std::fs::read_dir(schemas_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "avsc") {
                std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
            }
        }
    }

    #[test]
    fn history_versions_are_writers_only() {
        let tmp = tempfile::tempdir().unwrap();
        copy_schemas(tmp.path());
        std::fs::create_dir_all(tmp.path().join("history/v0")).unwrap();
        let old = r#"{"type":"record","name":"Open","namespace":"lapse.v1","doc":"old",
            "fields":[{"name":"event_id","type":"string","doc":"x"}]}"#;
        std::fs::write(tmp.path().join("history/v0/open.avsc"), old).unwrap();
        let set = SchemaSet::load(tmp.path()).unwrap();
        let old_fp = fingerprint(&Schema::parse_str(old).unwrap());
        assert!(set.writer(old_fp).is_some());
        assert_ne!(set.fingerprint_of("lapse.v1.Open"), Some(old_fp));
        assert_eq!(set.writer_count(), 10);
    }

    #[test]
    fn parse_error_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        copy_schemas(tmp.path());
        std::fs::write(tmp.path().join("broken.avsc"), "{\"type\": \"record\"").unwrap();
        let e = SchemaSet::load(tmp.path()).unwrap_err();
        assert!(matches!(e, CodecError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("broken.avsc"), "{e}");
    }

    #[test]
    fn duplicate_and_missing_and_incompatible() {
        let tmp = tempfile::tempdir().unwrap();
        copy_schemas(tmp.path());
        std::fs::copy(tmp.path().join("send.avsc"), tmp.path().join("send2.avsc")).unwrap();
        let e = SchemaSet::load(tmp.path()).unwrap_err();
        assert!(matches!(e, CodecError::DuplicateName { .. }), "{e}");

        std::fs::remove_file(tmp.path().join("send2.avsc")).unwrap();
        std::fs::remove_file(tmp.path().join("visit.avsc")).unwrap();
        let e = SchemaSet::load(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("lapse.v1.Visit"), "{e}");

        std::fs::write(
            tmp.path().join("visit.avsc"),
            r#"{"type":"record","name":"Visit","namespace":"lapse.v1","fields":[{"name":"event_id","type":"string"}]}"#,
        )
        .unwrap();
        let e = SchemaSet::load(tmp.path()).unwrap_err();
        assert!(matches!(e, CodecError::IncompatibleReader { .. }), "{e}");

        let e = SchemaSet::load(&tmp.path().join("nope")).unwrap_err();
        assert!(matches!(e, CodecError::Io { .. }), "{e}");
    }

    #[test]
    fn aliases_are_accepted() {
        let reader = Schema::parse_str(
            r#"{"type":"record","name":"Send","namespace":"lapse.v1","aliases":["OldSend","other.ns.Sent"],"fields":[]}"#,
        )
        .unwrap();
        assert!(reader_accepts(&reader, "lapse.v1.Send"));
        assert!(reader_accepts(&reader, "lapse.v1.OldSend"));
        assert!(reader_accepts(&reader, "other.ns.Sent"));
        assert!(!reader_accepts(&reader, "lapse.v1.Click"));
        assert!(!reader_accepts(&Schema::String, "lapse.v1.Send"));
        // Records match by unqualified name (Avro schema resolution): a
        // producer's own namespace, or none, is fine; so are aliases.
        assert!(reader_accepts(&reader, "Send"));
        assert!(reader_accepts(&reader, "com.clinic.events.Send"));
        assert!(reader_accepts(&reader, "com.clinic.events.OldSend"));
        assert!(reader_accepts(&reader, "Sent"));
        assert!(!reader_accepts(&reader, "com.clinic.events.Sends"));
        assert!(!reader_accepts(&reader, "Send.Click"));
        assert!(!reader_accepts(&reader, "send"));
    }
}
