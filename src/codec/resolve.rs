//! Avro schema resolution of a record, field by field.
//!
//! Same rules as apache-avro's `Value::resolve` on a record (fields matched by
//! name or reader alias, writer-only fields ignored, missing fields take the
//! reader default, enums resolved by symbol), but failures name the field and
//! never carry the value: apache-avro's resolution errors embed the offending
//! `Value`, which could be reply text or a customer id.

use apache_avro::error::Details;
use apache_avro::schema::{RecordField, RecordSchema};
use apache_avro::types::Value;
use apache_avro::Schema;

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
}

/// Resolves `value` (a record as written) to the reader record schema.
/// Returns the fields in reader order.
pub(crate) fn resolve_record(
    value: Value,
    reader: &Schema,
) -> Result<Vec<(String, Value)>, FieldError> {
    let incompatible = |field: &str| FieldError {
        field: field.to_owned(),
        problem: Problem::Incompatible,
    };
    let Schema::Record(RecordSchema { fields, .. }) = reader else {
        return Err(incompatible(""));
    };
    let mut written = match value {
        Value::Record(fields) => fields,
        _ => return Err(incompatible("")),
    };
    let mut out = Vec::with_capacity(fields.len());
    for field in fields {
        let value = match take(&mut written, field) {
            Some(v) => v,
            None => match &field.default {
                Some(default) => Value::from(default.clone()),
                None => {
                    return Err(FieldError {
                        field: field.name.clone(),
                        problem: Problem::Missing,
                    })
                }
            },
        };
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
                return Err(FieldError {
                    field: field.name.clone(),
                    problem,
                });
            }
        }
    }
    Ok(out)
}

/// Removes the writer's value for `field`, by name or by one of the field's aliases.
fn take(written: &mut Vec<(String, Value)>, field: &RecordField) -> Option<Value> {
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
    Some(written.swap_remove(pos).1)
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
