//! Avro Parsing Canonical Form and its CRC-64-AVRO fingerprint, exactly as the
//! specification and Java's `SchemaNormalization.parsingFingerprint64` compute
//! them (what `BinaryMessageEncoder`, fastavro and Python's avro put into
//! single-object headers).
//!
//! Written here rather than taken from apache-avro because apache-avro 0.21
//! keeps a primitive that carries a `logicalType` as `{"type":"long"}` where
//! the specification reduces it to `"long"`: its fingerprints of lapse's
//! schemas (every one has a `timestamp-millis`) match no other implementation.
//! That old value lives on only as [`legacy_fingerprint`], to recognise records
//! framed by lapse 0.1.
//!
//! The form is built from the schema's JSON, following the specification's
//! transformations: primitives as their bare name ([PRIMITIVES]), full names
//! ([FULLNAMES]), only `name`, `type`, `fields`, `symbols`, `items`, `values`
//! and `size` kept ([STRIP]), in that order ([ORDER]), no white space
//! ([WHITESPACE]); a named type appears in full once and by its quoted full
//! name afterwards, as in Java. Pinned against the Avro project's own cases
//! (`tests/fixtures/avro/schema-tests.txt`) and fastavro's and Python avro's
//! fingerprints of lapse's schemas (`tests/fixtures/avro/lapse-fingerprints.json`).

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use serde_json::Value;
use std::collections::HashSet;

/// Deeper schemas are refused: the walk recurses, and no real schema nests
/// this far (lapse's own are three levels deep).
const MAX_DEPTH: usize = 64;

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Why a schema has no canonical form. Only malformed schemas get here: a
/// schema apache-avro accepts has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no Parsing Canonical Form: {0}")]
pub struct CanonicalError(String);

/// The Parsing Canonical Form of a schema given as JSON text.
pub fn canonical_form(schema_json: &str) -> Result<String, CanonicalError> {
    let json: Value =
        serde_json::from_str(schema_json).map_err(|e| CanonicalError(format!("not JSON: {e}")))?;
    canonical_form_of(&json)
}

/// The Parsing Canonical Form of a schema given as parsed JSON.
pub fn canonical_form_of(schema: &Value) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(256);
    Walk::default().schema(schema, "", 0, &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO fingerprint of the Parsing Canonical Form, as the signed
/// number Java returns; single-object headers carry it little-endian.
pub fn fingerprint_of_json(schema_json: &str) -> Result<u64, CanonicalError> {
    Ok(crc64_avro(canonical_form(schema_json)?.as_bytes()))
}

/// The standard fingerprint of a parsed schema (its JSON as apache-avro
/// writes it, which keeps every attribute the canonical form needs).
pub fn fingerprint(schema: &Schema) -> u64 {
    let json = serde_json::to_value(schema).expect("an Avro schema serialises to JSON");
    let form = canonical_form_of(&json).expect("a parsed schema has a canonical form");
    crc64_avro(form.as_bytes())
}

/// The fingerprint lapse 0.1 computed (apache-avro's canonical form), kept only
/// to recognise records framed with it during the deprecation period.
pub fn legacy_fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&fp.bytes[..8]);
    u64::from_le_bytes(bytes)
}

/// The 64-bit Rabin fingerprint of the specification ("Schema Fingerprints").
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    let mut fp = CRC64_EMPTY;
    for &b in bytes {
        fp = (fp >> 8) ^ CRC64_TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

const CRC64_EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const CRC64_TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut j = 0;
        while j < 8 {
            fp = (fp >> 1) ^ (CRC64_EMPTY & (fp & 1).wrapping_neg());
            j += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
};

/// Named types already written in full (later uses are by name, as in Java).
#[derive(Default)]
struct Walk {
    defined: HashSet<String>,
}

impl Walk {
    /// Appends the canonical form of `s`; `space` is the enclosing namespace.
    fn schema(
        &mut self,
        s: &Value,
        space: &str,
        depth: usize,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        if depth > MAX_DEPTH {
            return Err(CanonicalError(format!("nested deeper than {MAX_DEPTH}")));
        }
        match s {
            Value::String(name) => self.reference(name, space, out),
            Value::Array(branches) => {
                out.push('[');
                for (i, b) in branches.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.schema(b, space, depth + 1, out)?;
                }
                out.push(']');
                Ok(())
            }
            Value::Object(o) => match o.get("type") {
                Some(Value::String(t)) => match t.as_str() {
                    "record" | "error" | "enum" | "fixed" => self.named(o, t, space, depth, out),
                    "array" => {
                        out.push_str(r#"{"type":"array","items":"#);
                        let items = o
                            .get("items")
                            .ok_or_else(|| CanonicalError("array without items".into()))?;
                        self.schema(items, space, depth + 1, out)?;
                        out.push('}');
                        Ok(())
                    }
                    "map" => {
                        out.push_str(r#"{"type":"map","values":"#);
                        let values = o
                            .get("values")
                            .ok_or_else(|| CanonicalError("map without values".into()))?;
                        self.schema(values, space, depth + 1, out)?;
                        out.push('}');
                        Ok(())
                    }
                    // A primitive, with or without a logicalType, is its bare
                    // name ([PRIMITIVES]); anything else names a defined type.
                    other => self.reference(other, space, out),
                },
                // `{"type": {...}}`: the type is given as a nested schema.
                Some(nested @ (Value::Object(_) | Value::Array(_))) => {
                    self.schema(nested, space, depth + 1, out)
                }
                _ => Err(CanonicalError("an object schema without a type".into())),
            },
            _ => Err(CanonicalError(format!("not a schema: {s}"))),
        }
    }

    /// A primitive name or a reference to a named type defined earlier.
    fn reference(&self, name: &str, space: &str, out: &mut String) -> Result<(), CanonicalError> {
        if PRIMITIVES.contains(&name) {
            push_quoted(out, name);
            return Ok(());
        }
        // Java's lookup: the name in the enclosing namespace, else as given.
        let qualified = fullname(name, None, space);
        let known = if self.defined.contains(&qualified) {
            qualified
        } else if self.defined.contains(name) {
            name.to_owned()
        } else {
            return Err(CanonicalError(format!("unknown type name {name:?}")));
        };
        push_quoted(out, &known);
        Ok(())
    }

    fn named(
        &mut self,
        o: &serde_json::Map<String, Value>,
        kind: &str,
        space: &str,
        depth: usize,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        let name = o
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| CanonicalError(format!("a {kind} without a name")))?;
        let namespace = o.get("namespace").and_then(Value::as_str);
        let full = fullname(name, namespace, space);
        if !self.defined.insert(full.clone()) {
            // Defined before: written by name, as Java does.
            push_quoted(out, &full);
            return Ok(());
        }
        out.push_str(r#"{"name":"#);
        push_quoted(out, &full);
        out.push_str(r#","type":"#);
        match kind {
            "enum" => {
                out.push_str(r#""enum","symbols":["#);
                let symbols = o
                    .get("symbols")
                    .and_then(Value::as_array)
                    .ok_or_else(|| CanonicalError(format!("enum {full} without symbols")))?;
                for (i, sym) in symbols.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let sym = sym.as_str().ok_or_else(|| {
                        CanonicalError(format!("enum {full}: a symbol is not a string"))
                    })?;
                    push_quoted(out, sym);
                }
                out.push(']');
            }
            "fixed" => {
                let size = o
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| CanonicalError(format!("fixed {full} without a size")))?;
                out.push_str(r#""fixed","size":"#);
                out.push_str(&size.to_string());
            }
            _ => {
                // "error" is a record ([PRIMITIVES] of the spec's Java model).
                out.push_str(r#""record","fields":["#);
                let fields = o
                    .get("fields")
                    .and_then(Value::as_array)
                    .ok_or_else(|| CanonicalError(format!("record {full} without fields")))?;
                // Nested definitions take the record's own namespace.
                let inner = namespace_of(&full);
                for (i, f) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let fname = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                        CanonicalError(format!("record {full}: a field without a name"))
                    })?;
                    let ftype = f.get("type").ok_or_else(|| {
                        CanonicalError(format!("record {full}: field {fname} without a type"))
                    })?;
                    out.push_str(r#"{"name":"#);
                    push_quoted(out, fname);
                    out.push_str(r#","type":"#);
                    self.schema(ftype, inner, depth + 1, out)?;
                    out.push('}');
                }
                out.push(']');
            }
        }
        out.push('}');
        Ok(())
    }
}

/// The full name of `name` ([FULLNAMES]): a dotted name is already full;
/// otherwise the explicit namespace (an empty one means none), else the
/// enclosing one.
fn fullname(name: &str, namespace: Option<&str>, enclosing: &str) -> String {
    if name.contains('.') {
        return name.to_owned();
    }
    match namespace.unwrap_or(enclosing) {
        "" => name.to_owned(),
        ns => format!("{ns}.{name}"),
    }
}

fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map_or("", |(ns, _)| ns)
}

/// Names and symbols are `[A-Za-z_][A-Za-z0-9_]*` in a valid schema, where
/// JSON escaping changes nothing; it keeps odd input well-formed.
fn push_quoted(out: &mut String, s: &str) {
    out.push_str(&Value::String(s.to_owned()).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/avro")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// One case of the Avro project's `schema-tests.txt`.
    #[derive(Debug, Default)]
    struct Case {
        id: String,
        input: String,
        canonical: String,
        fingerprint: Option<i64>,
    }

    /// Reads the `<<INPUT`/`<<canonical`/`<<fingerprint` format, including
    /// multi-line `<<INPUT` … `INPUT` blocks.
    fn spec_cases(text: &str) -> Vec<Case> {
        let mut cases = Vec::new();
        let mut case = Case::default();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if let Some(id) = line.strip_prefix("// ") {
                if id.len() == 3 && id.chars().all(|c| c.is_ascii_digit()) {
                    case.id = id.to_owned();
                }
            } else if line == "<<INPUT" {
                let mut block = String::new();
                for l in lines.by_ref() {
                    if l == "INPUT" {
                        break;
                    }
                    block.push_str(l);
                    block.push('\n');
                }
                case.input = block;
            } else if let Some(input) = line.strip_prefix("<<INPUT ") {
                case.input = input.to_owned();
            } else if let Some(c) = line.strip_prefix("<<canonical ") {
                case.canonical = c.to_owned();
            } else if let Some(fp) = line.strip_prefix("<<fingerprint ") {
                case.fingerprint = Some(fp.parse().expect("fingerprint"));
            } else if line.trim().is_empty() && !case.canonical.is_empty() {
                cases.push(std::mem::take(&mut case));
            }
        }
        if !case.canonical.is_empty() {
            cases.push(case);
        }
        cases
    }

    #[test]
    fn the_avro_projects_own_cases() {
        let cases = spec_cases(&fixture("schema-tests.txt"));
        assert_eq!(cases.len(), 34, "cases 000-033 of schema-tests.txt");
        for case in &cases {
            let form =
                canonical_form(&case.input).unwrap_or_else(|e| panic!("case {}: {e}", case.id));
            assert_eq!(form, case.canonical, "case {}", case.id);
            let fp = crc64_avro(form.as_bytes());
            if let Some(expected) = case.fingerprint {
                assert_eq!(fp as i64, expected, "case {}", case.id);
            }
            // Through apache-avro's parsed schema, the same value. It refuses
            // case 026 only (a boolean field with the default "true", a string),
            // which Java's parser lets pass.
            match Schema::parse_str(&case.input) {
                Ok(parsed) => {
                    assert_eq!(fingerprint(&parsed), fp, "case {} via apache-avro", case.id)
                }
                Err(e) => assert_eq!(case.id, "026", "apache-avro refuses case {}: {e}", case.id),
            }
        }
    }

    /// The eight shipped schemas, against fastavro's and Python avro's values.
    #[test]
    fn lapse_schemas_match_independent_implementations() {
        let fixture: Value = serde_json::from_str(&fixture("lapse-fingerprints.json")).unwrap();
        let schemas = fixture["schemas"].as_object().unwrap();
        assert_eq!(schemas.len(), 9);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        for (file, expected) in schemas {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let form = canonical_form(&text).unwrap();
            assert_eq!(form, expected["canonical"], "{file}");
            let fp = crc64_avro(form.as_bytes());
            assert_eq!(
                fp as i64,
                expected["fingerprint"].as_i64().unwrap(),
                "{file}"
            );
            assert_eq!(
                format!("{:016x}", fp),
                expected["fingerprint_hex"].as_str().unwrap(),
                "{file}"
            );
            assert_eq!(
                hex(&fp.to_le_bytes()),
                expected["single_object_header"].as_str().unwrap()[4..],
                "{file}: header bytes"
            );
            let parsed = Schema::parse_str(&text).unwrap();
            assert_eq!(fingerprint(&parsed), fp, "{file} via apache-avro's JSON");
            // The old value differs (that was the bug) and is still recognised.
            assert_ne!(legacy_fingerprint(&parsed), fp, "{file}");
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn logical_types_reduce_to_their_primitive() {
        for (input, form) in [
            (
                r#"{"type":"long","logicalType":"timestamp-millis"}"#,
                r#""long""#,
            ),
            (r#"{"type":"int","logicalType":"date"}"#, r#""int""#),
            (r#"{"type":"string","logicalType":"uuid"}"#, r#""string""#),
            (
                r#"{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}"#,
                r#""bytes""#,
            ),
            (
                r#"{"type":"fixed","name":"D","size":8,"logicalType":"decimal","precision":9,"scale":2}"#,
                r#"{"name":"D","type":"fixed","size":8}"#,
            ),
        ] {
            assert_eq!(canonical_form(input).unwrap(), form, "{input}");
        }
    }

    #[test]
    fn names_resolve_in_the_enclosing_namespace_and_repeat_by_name() {
        let input = r#"{"type":"record","name":"R","namespace":"a.b","fields":[
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X"]}},
            {"name":"e2","type":"E"},
            {"name":"o","type":{"type":"record","name":"c.O","fields":[
                {"name":"f","type":{"type":"fixed","name":"F","size":2}},
                {"name":"g","type":"a.b.E"}]}},
            {"name":"n","type":{"type":"enum","name":"N","namespace":"","symbols":["Y"]}},
            {"name":"m","type":{"type":"map","values":"N"}}]}"#;
        assert_eq!(
            canonical_form(input).unwrap(),
            concat!(
                r#"{"name":"a.b.R","type":"record","fields":["#,
                r#"{"name":"e","type":{"name":"a.b.E","type":"enum","symbols":["X"]}},"#,
                r#"{"name":"e2","type":"a.b.E"},"#,
                r#"{"name":"o","type":{"name":"c.O","type":"record","fields":["#,
                r#"{"name":"f","type":{"name":"c.F","type":"fixed","size":2}},"#,
                r#"{"name":"g","type":"a.b.E"}]}},"#,
                r#"{"name":"n","type":{"name":"N","type":"enum","symbols":["Y"]}},"#,
                r#"{"name":"m","type":{"type":"map","values":"N"}}]}"#
            )
        );
    }

    #[test]
    fn malformed_schemas_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "17",
            r#"{"name":"x"}"#,
            r#"{"type":"record","fields":[]}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"Nope"}]}"#,
            r#"{"type":"array"}"#,
            r#"{"type":"enum","name":"E","symbols":[1]}"#,
            r#"{"type":"fixed","name":"F"}"#,
        ] {
            assert!(canonical_form(bad).is_err(), "{bad}");
        }
        let deep = format!("{}\"int\"{}", "[".repeat(200), "]".repeat(200));
        assert!(canonical_form(&deep).is_err());
    }

    #[test]
    fn crc64_of_nothing_is_the_empty_value() {
        assert_eq!(crc64_avro(b""), CRC64_EMPTY);
    }
}
