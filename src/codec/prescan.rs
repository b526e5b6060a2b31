//! Bounds check of an Avro datum against its writer schema, before apache-avro
//! decodes it.
//!
//! apache-avro trusts length prefixes up to its process-global allocation limit
//! (`vec![0; len]`, `Vec::reserve(count)` of whole `Value`s), recurses without a
//! depth limit on recursive schemas, and turns an early end of input inside a
//! string or union into `Null` instead of an error. This walk costs one pass over
//! a few hundred bytes and allocates nothing; after it succeeds every length the
//! decoder sees fits in the payload, the nesting is bounded, and the datum ends
//! exactly at the end of the payload.

use apache_avro::schema::{Name, Namespace};
use apache_avro::Schema;
use std::borrow::Borrow;
use std::collections::HashMap;

/// Deepest nesting of records, arrays, maps and unions accepted. Input schemas
/// are two levels deep; this only stops crafted recursion.
pub(crate) const MAX_DEPTH: usize = 32;

/// Array/map items allowed beyond one per payload byte (items of zero encoded
/// size, such as `null`, would otherwise be unbounded).
const EXTRA_ITEMS: usize = 4096;

/// Checks that `body` is exactly one datum of `schema`; `names` resolves
/// references (`Schema::Ref`). Returns a description of the first problem.
pub(crate) fn check_datum<S: Borrow<Schema>>(
    schema: &Schema,
    names: &HashMap<Name, S>,
    body: &[u8],
) -> Result<(), String> {
    let mut scan = Scan {
        buf: body,
        pos: 0,
        items_left: body.len().saturating_add(EXTRA_ITEMS),
        names,
    };
    scan.walk(schema, &schema.namespace(), 0)?;
    let rest = body.len() - scan.pos;
    if rest > 0 {
        return Err(format!(
            "{rest} trailing bytes after the record (read with the wrong writer schema?)"
        ));
    }
    Ok(())
}

struct Scan<'a, S> {
    buf: &'a [u8],
    pos: usize,
    items_left: usize,
    names: &'a HashMap<Name, S>,
}

impl<S: Borrow<Schema>> Scan<'_, S> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn skip(&mut self, n: usize, what: &str) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} needs {n} bytes, {} remain",
                self.remaining()
            ));
        }
        self.pos += n;
        Ok(())
    }

    /// Zig-zag varint as apache-avro reads it (at most 10 bytes).
    fn varint(&mut self) -> Result<i64, String> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err("truncated: the body ends inside a number".to_owned());
            };
            self.pos += 1;
            value |= u64::from(b & 0x7F) << (i * 7);
            if b & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err("a variable-length number is longer than 10 bytes".to_owned())
    }

    fn length_prefixed(&mut self, what: &str) -> Result<(), String> {
        let len = self.varint()?;
        if len < 0 {
            return Err(format!("negative {what} length {len}"));
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.remaining() {
            return Err(format!(
                "{what} claims {len} bytes but only {} remain",
                self.remaining()
            ));
        }
        self.pos += len;
        Ok(())
    }

    fn walk(&mut self, schema: &Schema, ns: &Namespace, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        match schema {
            Schema::Null => Ok(()),
            Schema::Boolean => self.skip(1, "a boolean"),
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.varint().map(drop),
            Schema::Float => self.skip(4, "a float"),
            Schema::Double => self.skip(8, "a double"),
            Schema::Bytes | Schema::BigDecimal | Schema::Uuid => self.length_prefixed("bytes"),
            Schema::String => self.length_prefixed("a string"),
            Schema::Decimal(d) => self.walk(&d.inner, ns, depth + 1),
            Schema::Fixed(f) => self.skip(f.size, "a fixed"),
            Schema::Duration => self.skip(12, "a duration"),
            Schema::Enum(e) => {
                let index = self.varint()?;
                if index < 0 || index as u64 >= e.symbols.len() as u64 {
                    return Err(format!(
                        "enum {} index {index} out of range ({} symbols)",
                        e.name.name,
                        e.symbols.len()
                    ));
                }
                Ok(())
            }
            Schema::Union(u) => {
                let index = self.varint()?;
                let variants = u.variants();
                let variant = usize::try_from(index)
                    .ok()
                    .and_then(|i| variants.get(i))
                    .ok_or_else(|| {
                        format!(
                            "union branch {index} out of range ({} branches)",
                            variants.len()
                        )
                    })?;
                self.walk(variant, ns, depth + 1)
            }
            Schema::Record(r) => {
                let full = r.name.fully_qualified_name(ns);
                for field in &r.fields {
                    self.walk(&field.schema, &full.namespace, depth + 1)?;
                }
                Ok(())
            }
            Schema::Array(a) => self.blocks(|s| s.walk(&a.items, ns, depth + 1)),
            Schema::Map(m) => self.blocks(|s| {
                s.length_prefixed("a map key")?;
                s.walk(&m.types, ns, depth + 1)
            }),
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(ns);
                let names = self.names;
                let Some(target) = names.get(&full) else {
                    return Err(format!("writer schema references unknown type {full}"));
                };
                self.walk(target.borrow(), &full.namespace, depth + 1)
            }
        }
    }

    /// Array or map blocks: `count` items (negative count: followed by the
    /// block's byte size), until a zero count.
    fn blocks(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        loop {
            let count = self.varint()?;
            if count == 0 {
                return Ok(());
            }
            let count = if count < 0 {
                self.varint()?;
                count
                    .checked_neg()
                    .ok_or_else(|| "array block count overflows".to_owned())?
            } else {
                count
            };
            // Check the claim before apache-avro reserves room for it.
            if count as u64 > self.items_left as u64 {
                return Err(format!(
                    "array/map block claims {count} items, more than the payload can hold"
                ));
            }
            for _ in 0..count {
                self.items_left -= 1;
                item(self)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema::ResolvedSchema;
    use apache_avro::types::Value;

    fn check(schema: &Schema, body: &[u8]) -> Result<(), String> {
        let rs = ResolvedSchema::try_from(schema).unwrap();
        check_datum(schema, rs.get_names(), body)
    }

    /// Zig-zag varint encoding, for hand-crafted payloads.
    pub(crate) fn zigzag(n: i64) -> Vec<u8> {
        let mut v = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn accepts_what_apache_avro_writes() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"s","type":"string"},
                {"name":"l","type":"long"},
                {"name":"u","type":["null","string"]},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["A","B"]}},
                {"name":"e2","type":"E"},
                {"name":"a","type":{"type":"array","items":"long"}},
                {"name":"m","type":{"type":"map","values":"boolean"}},
                {"name":"f","type":{"type":"fixed","name":"F","size":3}},
                {"name":"d","type":"double"},
                {"name":"t","type":{"type":"long","logicalType":"timestamp-millis"}}
            ]}"#,
        )
        .unwrap();
        let value = Value::Record(vec![
            ("s".into(), Value::String("héllo".into())),
            ("l".into(), Value::Long(-123_456_789)),
            (
                "u".into(),
                Value::Union(1, Box::new(Value::String("x".into()))),
            ),
            ("e".into(), Value::Enum(1, "B".into())),
            ("e2".into(), Value::Enum(0, "A".into())),
            (
                "a".into(),
                Value::Array(vec![Value::Long(1), Value::Long(i64::MIN)]),
            ),
            (
                "m".into(),
                Value::Map([("k".to_owned(), Value::Boolean(true))].into()),
            ),
            ("f".into(), Value::Fixed(3, vec![1, 2, 3])),
            ("d".into(), Value::Double(1.5)),
            ("t".into(), Value::TimestampMillis(1_700_000_000_000)),
        ]);
        let body = apache_avro::to_avro_datum(&schema, value).unwrap();
        check(&schema, &body).unwrap();
        // Every strict prefix is truncated; one more byte is trailing.
        for cut in 0..body.len() {
            assert!(check(&schema, &body[..cut]).is_err(), "prefix {cut}");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(check(&schema, &longer).unwrap_err().contains("trailing"));
    }

    #[test]
    fn huge_claims_fail_without_allocating() {
        let s = Schema::String;
        let mut body = zigzag(1 << 40);
        body.extend_from_slice(b"abc");
        assert!(check(&s, &body).unwrap_err().contains("claims"));

        let arr = Schema::parse_str(r#"{"type":"array","items":"null"}"#).unwrap();
        let body = zigzag(i64::MAX);
        assert!(check(&arr, &body).unwrap_err().contains("items"));
        let mut body = zigzag(-(1 << 50));
        body.extend(zigzag(10));
        assert!(check(&arr, &body).is_err());

        let mut body = zigzag(i64::MIN);
        body.extend(zigzag(0));
        assert!(check(&arr, &body).is_err());
    }

    #[test]
    fn zero_size_items_are_bounded_but_allowed() {
        let arr = Schema::parse_str(r#"{"type":"array","items":"null"}"#).unwrap();
        let mut body = zigzag(100);
        body.push(0);
        check(&arr, &body).unwrap();
    }

    #[test]
    fn deep_recursion_is_refused() {
        let list = Schema::parse_str(
            r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#,
        )
        .unwrap();
        // 10,000 nested `Some(next)`: would overflow the decoder's stack.
        let mut body = vec![2u8; 10_000];
        body.push(0);
        assert!(check(&list, &body).unwrap_err().contains("nested"));
        // Shallow nesting is fine.
        check(&list, &[2, 2, 0]).unwrap();
    }

    #[test]
    fn bad_indexes_and_varints() {
        let e = Schema::parse_str(r#"{"type":"enum","name":"E","symbols":["A"]}"#).unwrap();
        assert!(check(&e, &zigzag(1)).unwrap_err().contains("out of range"));
        assert!(check(&e, &zigzag(-1)).is_err());
        let u = Schema::parse_str(r#"["null","long"]"#).unwrap();
        assert!(check(&u, &zigzag(2)).unwrap_err().contains("branch"));
        assert!(check(&Schema::Long, &[0xFF; 11])
            .unwrap_err()
            .contains("10 bytes"));
        assert!(check(&Schema::Long, &[0x80])
            .unwrap_err()
            .contains("truncated"));
        assert!(check(&Schema::String, &zigzag(-3))
            .unwrap_err()
            .contains("negative"));
    }
}
