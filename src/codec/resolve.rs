//! Avro schema resolution of a record, field by field.
//!
//! Same rules as apache-avro's `Value::resolve` on a record (fields matched by
//! name or reader alias, writer-only fields ignored, missing fields take the
//! reader default, enums resolved by symbol, an unknown symbol read as the
//! reader enum's `default` if it has one), but failures name the field and the
//! written type, never the value: apache-avro's resolution errors embed the
//! offending `Value`, which could be reply text or a customer id.
//!
//! On top of apache-avro, which resolves values without looking at logical
//! types' units:
//!
//! * timestamps are converted between `timestamp-millis`, `-micros` and
//!   `-nanos` (flooring), and between the three `local-timestamp-*` units; a
//!   local timestamp is never read as a UTC one or the other way round (it has
//!   no time zone), nor is a `date` or a `time-*`;
//! * a `uuid` (a string on the wire) is read as a string;
//! * bytes are read as a string only when they are UTF-8;
//! * a decimal logical type written for a plain `long` reader field is passed
//!   on with its scale ([`Resolved::decimal_scales`]) for the caller to convert,
//!   as only it knows the unit (see the decoder's `amount`).

use apache_avro::error::Details;
use apache_avro::schema::{Name, RecordField, RecordSchema, UnionSchema};
use apache_avro::types::Value;
use apache_avro::Schema;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Absent in the writer and no default in the reader.
    Missing,
    /// An enum symbol the reader does not have (and no enum default).
    UnknownSymbol(String),
    /// Writer type cannot be promoted to the reader type.
    Incompatible,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub field: String,
    pub problem: Problem,
    /// The type the writer wrote (`"string"`, `"timestamp-micros"`, `"null"`,
    /// see [`kind_of`]), for `Incompatible`; never the value.
    pub written: Option<&'static str>,
}

/// The writer's record schema and named types: what a value alone does not
/// tell (a decimal's scale).
pub(crate) struct WriterSchema<'a> {
    pub record: &'a RecordSchema,
    pub names: &'a HashMap<Name, Schema>,
}

/// A record resolved for the decoder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    /// In reader order.
    pub fields: Vec<(String, Value)>,
    /// Reader fields of type `long` written as a decimal logical type, with the
    /// writer's scale; their value in `fields` is the unscaled `Value::Decimal`.
    pub decimal_scales: Vec<(String, usize)>,
}

/// Resolves `value` (a record as written) to the reader record schema.
/// Returns the fields in reader order. Decimals are not read as `long`s here
/// (no writer schema to take the scale from).
pub(crate) fn resolve_record(
    value: Value,
    reader: &Schema,
) -> Result<Vec<(String, Value)>, FieldError> {
    resolve(value, reader, None).map(|r| r.fields)
}

/// Resolves a record decoded with `writer` to the reader record schema.
pub(crate) fn resolve_written(
    value: Value,
    reader: &Schema,
    writer: &WriterSchema<'_>,
) -> Result<Resolved, FieldError> {
    resolve(value, reader, Some(writer))
}

fn resolve(
    value: Value,
    reader: &Schema,
    writer: Option<&WriterSchema<'_>>,
) -> Result<Resolved, FieldError> {
    let incompatible = |field: &str, written: Option<&'static str>| FieldError {
        field: field.to_owned(),
        problem: Problem::Incompatible,
        written,
    };
    let Schema::Record(RecordSchema { fields, .. }) = reader else {
        return Err(incompatible("", None));
    };
    let mut written = match value {
        Value::Record(fields) => fields,
        other => return Err(incompatible("", Some(kind_of(&other)))),
    };
    let mut out = Vec::with_capacity(fields.len());
    let mut decimal_scales = Vec::new();
    for field in fields {
        let (value, writer_field) = match take(&mut written, field) {
            Some((name, v)) => (v, Some(name)),
            None => match &field.default {
                Some(default) => (Value::from(default.clone()), None),
                None => {
                    return Err(FieldError {
                        field: field.name.clone(),
                        problem: Problem::Missing,
                        written: None,
                    })
                }
            },
        };
        let kind = kind_of(&value);
        if let Some(scale) =
            decimal_into_long(&value, &field.schema, writer, writer_field.as_deref())
        {
            let value = match value {
                Value::Union(_, inner) => *inner,
                v => v,
            };
            out.push((field.name.clone(), value));
            decimal_scales.push((field.name.clone(), scale));
            continue;
        }
        let value = adapt(value, &field.schema).map_err(|w| incompatible(&field.name, Some(w)))?;
        let resolved = if contains_ref(&field.schema) {
            // A named type defined in an earlier field: resolve with the whole record's names.
            value.resolve_schemata(&field.schema, vec![reader])
        } else {
            // apache-avro builds a name table per `resolve` call; most fields
            // need none, and this runs for every field of every record.
            match resolve_simple(value, &field.schema) {
                Ok(v) => Ok(v),
                Err(value) => value.resolve(&field.schema),
            }
        };
        match resolved {
            Ok(v) => out.push((field.name.clone(), v)),
            Err(e) => {
                let problem = match e.into_details() {
                    Details::GetEnumDefault { symbol, .. } => Problem::UnknownSymbol(symbol),
                    _ => Problem::Incompatible,
                };
                let written = (problem == Problem::Incompatible).then_some(kind);
                return Err(FieldError {
                    field: field.name.clone(),
                    problem,
                    written,
                });
            }
        }
    }
    Ok(Resolved {
        fields: out,
        decimal_scales,
    })
}

/// The scale of a decimal written for a plain `long` reader field, taken from
/// the writer schema (the branch the value was written with, for a union).
/// `None` for anything else.
fn decimal_into_long(
    value: &Value,
    reader: &Schema,
    writer: Option<&WriterSchema<'_>>,
    writer_field: Option<&str>,
) -> Option<usize> {
    if !matches!(reader, Schema::Long) {
        return None;
    }
    let (branch, inner) = match value {
        Value::Union(i, inner) => (Some(*i as usize), &**inner),
        v => (None, v),
    };
    if !matches!(inner, Value::Decimal(_)) {
        return None;
    }
    let writer = writer?;
    let index = *writer.record.lookup.get(writer_field?)?;
    let mut schema = &writer.record.fields.get(index)?.schema;
    if let (Schema::Union(u), Some(i)) = (schema, branch) {
        schema = u.variants().get(i)?;
    }
    if let Schema::Ref { name } = schema {
        let full = name.fully_qualified_name(&writer.record.name.namespace);
        schema = writer.names.get(&full)?;
    }
    match schema {
        Schema::Decimal(d) => Some(d.scale),
        _ => None,
    }
}

/// Conversions apache-avro's resolution does not make (see the module doc).
/// `Err`: the type written, which the reader type cannot take.
fn adapt(value: Value, reader: &Schema) -> Result<Value, &'static str> {
    match reader {
        Schema::Union(u) => {
            // Both unions: the written branch is resolved against the reader's
            // union (which apache-avro does by value, below).
            let value = match value {
                Value::Union(_, inner) => *inner,
                v => v,
            };
            adapt_into_union(value, u)
        }
        // Writer union, reader not: the written branch must match on its own.
        _ => match value {
            Value::Union(_, inner) => convert(*inner, reader),
            v => convert(v, reader),
        },
    }
}

fn adapt_into_union(value: Value, union: &UnionSchema) -> Result<Value, &'static str> {
    let variants = union.variants();
    let has = |want: fn(&Schema) -> bool| variants.iter().any(want);
    match &value {
        Value::Uuid(_) | Value::Bytes(_)
            if has(|s| matches!(s, Schema::String))
                && !has(|s| matches!(s, Schema::Uuid | Schema::Bytes)) =>
        {
            convert(value, &Schema::String)
        }
        v if timestamp(v).is_some() => {
            if variants.iter().any(|s| same_kind(v, s)) {
                return Ok(value);
            }
            // The union's timestamp branch of the same family, if any.
            let (local, _, _) = timestamp(v).expect("checked");
            match variants
                .iter()
                .find(|s| timestamp_schema(s).is_some_and(|(l, _)| l == local))
            {
                Some(target) => convert(value, target),
                None => Ok(value),
            }
        }
        _ => Ok(value),
    }
}

/// Converts a value written as a non-union type to the non-union reader type.
fn convert(value: Value, reader: &Schema) -> Result<Value, &'static str> {
    if let Some((local, unit)) = timestamp_schema(reader) {
        return match value {
            Value::Long(_) | Value::Int(_) => Ok(value),
            v => match timestamp(&v) {
                Some((l, u, n)) if l == local => rescale(n, u, unit)
                    .map(|n| timestamp_value(local, unit, n))
                    .ok_or(kind_of(&v)),
                _ => Err(kind_of(&v)),
            },
        };
    }
    match (reader, value) {
        (Schema::Null, Value::Null) => Ok(Value::Null),
        (_, Value::Null) => Err("null"),
        (Schema::String, Value::Uuid(u)) => Ok(Value::String(u.to_string())),
        (Schema::String, Value::Bytes(b)) => String::from_utf8(b)
            .map(Value::String)
            .map_err(|_| "bytes that are not UTF-8"),
        (_, v) => Ok(v),
    }
}

/// (local, unit as the power of ten per second, count) of a timestamp value.
fn timestamp(v: &Value) -> Option<(bool, u32, i64)> {
    Some(match *v {
        Value::TimestampMillis(n) => (false, 3, n),
        Value::TimestampMicros(n) => (false, 6, n),
        Value::TimestampNanos(n) => (false, 9, n),
        Value::LocalTimestampMillis(n) => (true, 3, n),
        Value::LocalTimestampMicros(n) => (true, 6, n),
        Value::LocalTimestampNanos(n) => (true, 9, n),
        _ => return None,
    })
}

/// (local, unit) of a timestamp schema.
fn timestamp_schema(s: &Schema) -> Option<(bool, u32)> {
    Some(match s {
        Schema::TimestampMillis => (false, 3),
        Schema::TimestampMicros => (false, 6),
        Schema::TimestampNanos => (false, 9),
        Schema::LocalTimestampMillis => (true, 3),
        Schema::LocalTimestampMicros => (true, 6),
        Schema::LocalTimestampNanos => (true, 9),
        _ => return None,
    })
}

fn timestamp_value(local: bool, unit: u32, n: i64) -> Value {
    match (local, unit) {
        (false, 3) => Value::TimestampMillis(n),
        (false, 6) => Value::TimestampMicros(n),
        (false, _) => Value::TimestampNanos(n),
        (true, 3) => Value::LocalTimestampMillis(n),
        (true, 6) => Value::LocalTimestampMicros(n),
        (true, _) => Value::LocalTimestampNanos(n),
    }
}

/// `n` units of 10^-`from` s in units of 10^-`to` s: floored when coarser,
/// `None` on overflow.
fn rescale(n: i64, from: u32, to: u32) -> Option<i64> {
    if from >= to {
        Some(n.div_euclid(10i64.pow(from - to)))
    } else {
        n.checked_mul(10i64.pow(to - from))
    }
}

/// The Avro type of a value (through unions), for error messages that must
/// not contain the value itself.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Boolean(_) => "boolean",
        Value::Int(_) => "int",
        Value::Long(_) => "long",
        Value::Float(_) => "float",
        Value::Double(_) => "double",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "string",
        Value::Fixed(..) => "fixed",
        Value::Enum(..) => "enum",
        Value::Union(_, inner) => kind_of(inner),
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Record(_) => "record",
        Value::Date(_) => "date",
        Value::Decimal(_) => "decimal",
        Value::BigDecimal(_) => "big-decimal",
        Value::TimeMillis(_) => "time-millis",
        Value::TimeMicros(_) => "time-micros",
        Value::TimestampMillis(_) => "timestamp-millis",
        Value::TimestampMicros(_) => "timestamp-micros",
        Value::TimestampNanos(_) => "timestamp-nanos",
        Value::LocalTimestampMillis(_) => "local-timestamp-millis",
        Value::LocalTimestampMicros(_) => "local-timestamp-micros",
        Value::LocalTimestampNanos(_) => "local-timestamp-nanos",
        Value::Duration(_) => "duration",
        Value::Uuid(_) => "uuid",
    }
}

/// Removes the writer's value for `field`, by name or by one of the field's aliases.
/// Returns it with the writer's field name.
fn take(written: &mut Vec<(String, Value)>, field: &RecordField) -> Option<(String, Value)> {
    let pos = written
        .iter()
        .position(|(n, _)| *n == field.name)
        .or_else(|| {
            field.aliases.as_ref().and_then(|aliases| {
                written
                    .iter()
                    .position(|(n, _)| aliases.iter().any(|a| a == n))
            })
        })?;
    Some(written.swap_remove(pos))
}

/// Resolution of the common cases without apache-avro's per-call name table:
/// a primitive or timestamp of the same type, a long/int into a timestamp, an
/// enum symbol the reader has, and a union branch of those. Gives the value
/// back (`Err`) for everything else, which then takes the general path; the
/// results equal `Value::resolve`'s (tested below).
fn resolve_simple(value: Value, schema: &Schema) -> Result<Value, Value> {
    match (schema, value) {
        (Schema::Union(_), Value::Union(_, inner)) => resolve_simple(*inner, schema),
        (Schema::Union(u), value) => {
            // apache-avro takes the first branch the value validates against;
            // only `null` branches are certain not to, so look past those alone.
            for (i, variant) in u.variants().iter().enumerate() {
                if same_kind(&value, variant) {
                    return match resolve_simple(value, variant) {
                        Ok(v) => Ok(Value::Union(i as u32, Box::new(v))),
                        Err(v) => Err(v),
                    };
                }
                if !matches!(variant, Schema::Null) {
                    break;
                }
            }
            Err(value)
        }
        (Schema::Enum(e), Value::Enum(i, symbol)) => {
            if e.symbols.get(i as usize) == Some(&symbol) {
                return Ok(Value::Enum(i, symbol));
            }
            match e.symbols.iter().position(|s| *s == symbol) {
                Some(pos) => Ok(Value::Enum(pos as u32, symbol)),
                None => Err(Value::Enum(i, symbol)),
            }
        }
        (Schema::TimestampMillis, Value::Long(v)) => Ok(Value::TimestampMillis(v)),
        (Schema::TimestampMillis, Value::Int(v)) => Ok(Value::TimestampMillis(v.into())),
        // Enum values against enum schemas were handled above.
        (schema, value) if same_kind(&value, schema) => Ok(value),
        (_, value) => Err(value),
    }
}

/// Whether `value` is written as `schema` without promotion (the union branch
/// apache-avro would pick for it, as it takes the first matching branch).
fn same_kind(value: &Value, schema: &Schema) -> bool {
    matches!(
        (schema, value),
        (Schema::Null, Value::Null)
            | (Schema::Boolean, Value::Boolean(_))
            | (Schema::Int, Value::Int(_))
            | (Schema::Long, Value::Long(_))
            | (Schema::Float, Value::Float(_))
            | (Schema::Double, Value::Double(_))
            | (Schema::String, Value::String(_))
            | (Schema::Bytes, Value::Bytes(_))
            | (Schema::TimestampMillis, Value::TimestampMillis(_))
            | (Schema::Enum(_), Value::Enum(..))
    )
}

fn contains_ref(schema: &Schema) -> bool {
    match schema {
        Schema::Ref { .. } => true,
        Schema::Union(u) => u.variants().iter().any(contains_ref),
        Schema::Array(a) => contains_ref(&a.items),
        Schema::Map(m) => contains_ref(&m.types),
        Schema::Record(r) => r.fields.iter().any(|f| contains_ref(&f.schema)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> Schema {
        Schema::parse_str(
            r#"{"type":"record","name":"R","namespace":"t","fields":[
                {"name":"id","type":"string","aliases":["old_id"]},
                {"name":"n","type":"long"},
                {"name":"c","type":{"type":"enum","name":"C","symbols":["A","B"]}},
                {"name":"cs","type":{"type":"array","items":"C"},"default":[]},
                {"name":"opt","type":["null","string"],"default":null},
                {"name":"oc","type":["null","C"],"default":null}
            ]}"#,
        )
        .unwrap()
    }

    fn rec(fields: Vec<(&str, Value)>) -> Value {
        Value::Record(fields.into_iter().map(|(n, v)| (n.to_owned(), v)).collect())
    }

    #[test]
    fn defaults_aliases_promotion_and_extra_fields() {
        let v = rec(vec![
            ("extra", Value::String("ignored".into())),
            ("c", Value::Enum(7, "B".into())),
            ("old_id", Value::String("x".into())),
            ("n", Value::Int(5)),
            ("oc", Value::Union(1, Box::new(Value::Enum(0, "A".into())))),
        ]);
        let out = resolve_record(v, &reader()).unwrap();
        assert_eq!(
            out,
            vec![
                ("id".to_owned(), Value::String("x".into())),
                ("n".to_owned(), Value::Long(5)),
                ("c".to_owned(), Value::Enum(1, "B".into())),
                ("cs".to_owned(), Value::Array(vec![])),
                ("opt".to_owned(), Value::Union(0, Box::new(Value::Null))),
                (
                    "oc".to_owned(),
                    Value::Union(1, Box::new(Value::Enum(0, "A".into())))
                ),
            ]
        );
    }

    /// The shortcut must agree with apache-avro wherever it answers.
    #[test]
    fn simple_resolution_equals_apache_avro() {
        let schemas = [
            r#""string""#,
            r#""long""#,
            r#""int""#,
            r#""double""#,
            r#""null""#,
            r#"{"type":"long","logicalType":"timestamp-millis"}"#,
            r#"["null","string"]"#,
            r#"["null","long"]"#,
            r#"["string","null"]"#,
            r#"["null",{"type":"long","logicalType":"timestamp-millis"}]"#,
            r#"{"type":"enum","name":"C","symbols":["A","B"]}"#,
            r#"{"type":"enum","name":"D","symbols":["A","B"],"default":"A"}"#,
            r#"["null",{"type":"enum","name":"E","symbols":["A","B"]}]"#,
            r#"["null","long","string"]"#,
        ];
        let values = [
            Value::Null,
            Value::String("x".into()),
            Value::Long(7),
            Value::Int(7),
            Value::Double(1.5),
            Value::TimestampMillis(9),
            Value::Enum(1, "B".into()),
            Value::Enum(0, "B".into()),
            Value::Enum(5, "A".into()),
            Value::Enum(0, "Z".into()),
            Value::Union(1, Box::new(Value::String("y".into()))),
            Value::Union(0, Box::new(Value::Null)),
            Value::Union(1, Box::new(Value::Long(3))),
        ];
        let mut answered = 0;
        for s in schemas {
            let schema = Schema::parse_str(s).unwrap();
            for v in &values {
                if let Ok(fast) = resolve_simple(v.clone(), &schema) {
                    answered += 1;
                    let slow = v.clone().resolve(&schema);
                    assert_eq!(Some(&fast), slow.as_ref().ok(), "{v:?} as {s}");
                }
            }
        }
        assert!(
            answered >= 30,
            "the shortcut answered only {answered} cases"
        );
    }

    fn one_field(ty: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"R","fields":[{{"name":"f","type":{ty}}}]}}"#
        ))
        .unwrap()
    }

    fn resolve_one(value: Value, ty: &str) -> Result<Value, FieldError> {
        resolve_record(rec(vec![("f", value)]), &one_field(ty)).map(|mut f| f.remove(0).1)
    }

    #[test]
    fn timestamps_convert_within_their_family() {
        let millis = r#"{"type":"long","logicalType":"timestamp-millis"}"#;
        let cases = [
            (
                Value::TimestampMicros(1_999),
                millis,
                Value::TimestampMillis(1),
            ),
            (
                Value::TimestampNanos(1_999_999),
                millis,
                Value::TimestampMillis(1),
            ),
            // Floored, not truncated towards zero.
            (
                Value::TimestampMicros(-1),
                millis,
                Value::TimestampMillis(-1),
            ),
            (
                Value::TimestampMillis(2),
                r#"{"type":"long","logicalType":"timestamp-nanos"}"#,
                Value::TimestampNanos(2_000_000),
            ),
            (
                Value::LocalTimestampMillis(3),
                r#"{"type":"long","logicalType":"local-timestamp-micros"}"#,
                Value::LocalTimestampMicros(3_000),
            ),
            (
                Value::Union(1, Box::new(Value::TimestampMicros(5_000))),
                millis,
                Value::TimestampMillis(5),
            ),
            (
                Value::TimestampMicros(7_000),
                r#"["null",{"type":"long","logicalType":"timestamp-millis"}]"#,
                Value::Union(1, Box::new(Value::TimestampMillis(7))),
            ),
            (Value::Long(8), millis, Value::TimestampMillis(8)),
        ];
        for (value, ty, want) in cases {
            assert_eq!(
                resolve_one(value.clone(), ty).unwrap(),
                want,
                "{value:?} as {ty}"
            );
        }

        let refused = [
            (
                Value::LocalTimestampMillis(1),
                millis,
                "local-timestamp-millis",
            ),
            (
                Value::TimestampMillis(1),
                r#"{"type":"long","logicalType":"local-timestamp-millis"}"#,
                "timestamp-millis",
            ),
            (Value::Date(1), millis, "date"),
            (Value::TimeMicros(1), millis, "time-micros"),
            (
                Value::TimestampMillis(i64::MAX / 10),
                r#"{"type":"long","logicalType":"timestamp-micros"}"#,
                "timestamp-millis",
            ),
            (Value::Union(0, Box::new(Value::Null)), millis, "null"),
        ];
        for (value, ty, written) in refused {
            let e = resolve_one(value.clone(), ty).unwrap_err();
            assert_eq!(e.problem, Problem::Incompatible, "{value:?} as {ty}");
            assert_eq!(e.written, Some(written), "{value:?} as {ty}");
        }
    }

    #[test]
    fn strings_from_uuid_and_utf8_bytes_only() {
        let uuid = apache_avro::Uuid::parse_str("0F8FAD5B-D9CB-469F-A165-70867728950E").unwrap();
        assert_eq!(
            resolve_one(Value::Uuid(uuid), r#""string""#).unwrap(),
            Value::String("0f8fad5b-d9cb-469f-a165-70867728950e".into())
        );
        assert_eq!(
            resolve_one(Value::Bytes(b"ok".to_vec()), r#"["null","string"]"#).unwrap(),
            Value::Union(1, Box::new(Value::String("ok".into())))
        );
        let e = resolve_one(Value::Bytes(vec![0xff, b's']), r#""string""#).unwrap_err();
        assert_eq!(e.written, Some("bytes that are not UTF-8"));
        // Where the reader has bytes, they stay bytes.
        assert_eq!(
            resolve_one(Value::Bytes(b"b".to_vec()), r#"["null","bytes","string"]"#).unwrap(),
            Value::Union(1, Box::new(Value::Bytes(b"b".to_vec())))
        );
        // string -> bytes, the other promotion of the specification.
        assert_eq!(
            resolve_one(Value::String("s".into()), r#""bytes""#).unwrap(),
            Value::Bytes(b"s".to_vec())
        );
        // int -> long and float -> double.
        assert_eq!(
            resolve_one(Value::Int(4), r#""long""#).unwrap(),
            Value::Long(4)
        );
        assert_eq!(
            resolve_one(Value::Float(1.5), r#""double""#).unwrap(),
            Value::Double(1.5)
        );
    }

    #[test]
    fn decimal_scale_comes_from_the_written_branch() {
        let writer = Schema::parse_str(
            r#"{"type":"record","name":"W","namespace":"w","fields":[
                {"name":"a","type":["null",{"type":"fixed","name":"M","size":4,
                    "logicalType":"decimal","precision":9,"scale":3}]},
                {"name":"b","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":1}},
                {"name":"c","type":"long"}
            ]}"#,
        )
        .unwrap();
        let reader = Schema::parse_str(
            r#"{"type":"record","name":"W","fields":[
                {"name":"a","type":"long"},{"name":"b","type":"long"},{"name":"c","type":"long"}]}"#,
        )
        .unwrap();
        let Schema::Record(record) = &writer else {
            unreachable!()
        };
        let names = apache_avro::schema::ResolvedSchema::try_from(&writer)
            .unwrap()
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        let w = WriterSchema {
            record,
            names: &names,
        };
        let d = |n: u8| Value::Decimal(apache_avro::Decimal::from(vec![n]));
        let value = rec(vec![
            ("a", Value::Union(1, Box::new(d(5)))),
            ("b", d(6)),
            ("c", Value::Long(7)),
        ]);
        let out = resolve_written(value.clone(), &reader, &w).unwrap();
        assert_eq!(
            out.fields,
            vec![
                ("a".to_owned(), d(5)),
                ("b".to_owned(), d(6)),
                ("c".to_owned(), Value::Long(7)),
            ]
        );
        assert_eq!(
            out.decimal_scales,
            vec![("a".to_owned(), 3), ("b".to_owned(), 1)]
        );
        // Without the writer schema there is no scale: refused.
        let e = resolve_record(value, &reader).unwrap_err();
        assert_eq!((e.field.as_str(), e.written), ("a", Some("decimal")));
    }

    #[test]
    fn kinds_name_types_not_values() {
        assert_eq!(kind_of(&Value::String("secret".into())), "string");
        assert_eq!(
            kind_of(&Value::Union(1, Box::new(Value::TimestampNanos(1)))),
            "timestamp-nanos"
        );
        assert_eq!(kind_of(&Value::Null), "null");
    }

    #[test]
    fn errors_name_the_field_not_the_value() {
        let missing = resolve_record(rec(vec![("n", Value::Long(1))]), &reader()).unwrap_err();
        assert_eq!(missing.field, "id");
        assert_eq!(missing.problem, Problem::Missing);

        let bad_enum = resolve_record(
            rec(vec![
                ("id", Value::String("x".into())),
                ("n", Value::Long(1)),
                ("c", Value::Enum(2, "Z".into())),
            ]),
            &reader(),
        )
        .unwrap_err();
        assert_eq!(bad_enum.problem, Problem::UnknownSymbol("Z".into()));

        let wrong_type = resolve_record(
            rec(vec![
                ("id", Value::String("x".into())),
                ("n", Value::String("secret text".into())),
            ]),
            &reader(),
        )
        .unwrap_err();
        assert_eq!(wrong_type.field, "n");
        assert_eq!(wrong_type.problem, Problem::Incompatible);
        assert!(!format!("{wrong_type:?}").contains("secret"));
    }
}
