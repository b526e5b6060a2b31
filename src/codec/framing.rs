//! Wire framings, detected per record: Confluent Schema Registry
//! (`0x00` + 4-byte big-endian schema id) and Avro single-object encoding
//! (`C3 01` + 8-byte little-endian CRC-64-AVRO fingerprint).

use super::error::DecodeError;

/// First byte of a Confluent-framed record.
pub const CONFLUENT_MAGIC: u8 = 0x00;
/// First two bytes of an Avro single-object encoded record.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];

const CONFLUENT_HEADER: usize = 5;
const SINGLE_OBJECT_HEADER: usize = 10;

/// How a producer frames what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `C3 01` + fingerprint of the writer schema (resolved against `schemas/`).
    SingleObject,
    /// `0x00` + this schema registry id; the caller vouches that the id is the
    /// writer schema's id in its registry.
    Confluent(u32),
}

/// A framed record split into header information and the Avro datum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Confluent { schema_id: u32, body: &'a [u8] },
    SingleObject { fingerprint: u64, body: &'a [u8] },
}

impl<'a> Frame<'a> {
    /// The Avro datum after the header, whichever the framing.
    pub fn body(&self) -> &'a [u8] {
        match *self {
            Frame::Confluent { body, .. } | Frame::SingleObject { body, .. } => body,
        }
    }
}

/// Detects the framing of one record. Never allocates beyond the error text.
pub fn parse_frame(payload: &[u8]) -> Result<Frame<'_>, DecodeError> {
    match payload {
        [] => Err(DecodeError::EmptyPayload),
        [CONFLUENT_MAGIC, ..] => {
            if payload.len() < CONFLUENT_HEADER {
                return Err(DecodeError::UnknownFraming {
                    detail: format!(
                        "Confluent magic byte but only {} bytes (header needs 5)",
                        payload.len()
                    ),
                });
            }
            let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
            Ok(Frame::Confluent {
                schema_id: id,
                body: &payload[CONFLUENT_HEADER..],
            })
        }
        [0xC3, 0x01, ..] => {
            if payload.len() < SINGLE_OBJECT_HEADER {
                return Err(DecodeError::UnknownFraming {
                    detail: format!(
                        "single-object marker but only {} bytes (header needs 10)",
                        payload.len()
                    ),
                });
            }
            let mut fp = [0u8; 8];
            fp.copy_from_slice(&payload[2..SINGLE_OBJECT_HEADER]);
            Ok(Frame::SingleObject {
                fingerprint: u64::from_le_bytes(fp),
                body: &payload[SINGLE_OBJECT_HEADER..],
            })
        }
        _ => Err(DecodeError::UnknownFraming {
            detail: format!("first bytes {}", hex_prefix(payload, 4)),
        }),
    }
}

/// `0x00` + big-endian `schema_id` + `body`.
pub fn frame_confluent(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFLUENT_HEADER + body.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// `C3 01` + little-endian `fingerprint` + `body`.
pub fn frame_single_object(fingerprint: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SINGLE_OBJECT_HEADER + body.len());
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Frames `body` as `framing` says, given the writer schema's fingerprint.
pub fn frame(framing: Framing, fingerprint: u64, body: &[u8]) -> Vec<u8> {
    match framing {
        Framing::SingleObject => frame_single_object(fingerprint, body),
        Framing::Confluent(id) => frame_confluent(id, body),
    }
}

/// The first `n` bytes as hex: enough to recognise JSON (`7b`), text or a
/// foreign framing, too little to leak content.
fn hex_prefix(bytes: &[u8], n: usize) -> String {
    let mut s = String::with_capacity(2 + 3 * n);
    s.push_str("0x");
    for (i, b) in bytes.iter().take(n).enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confluent_round_trip() {
        let framed = frame_confluent(0x0102_0304, b"body");
        assert_eq!(&framed[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(
            parse_frame(&framed).unwrap(),
            Frame::Confluent {
                schema_id: 0x0102_0304,
                body: b"body"
            }
        );
    }

    #[test]
    fn single_object_round_trip() {
        let fp = 0x1122_3344_5566_7788u64;
        let framed = frame_single_object(fp, b"xy");
        assert_eq!(&framed[..3], &[0xC3, 0x01, 0x88]);
        assert_eq!(
            parse_frame(&framed).unwrap(),
            Frame::SingleObject {
                fingerprint: fp,
                body: b"xy"
            }
        );
        assert_eq!(frame(Framing::SingleObject, fp, b"xy"), framed);
        assert_eq!(
            frame(Framing::Confluent(7), fp, b"xy"),
            frame_confluent(7, b"xy")
        );
    }

    #[test]
    fn empty_and_short_and_foreign() {
        assert_eq!(parse_frame(b"").unwrap_err().reason(), "empty_payload");
        for short in [&[0u8][..], &[0, 0, 0, 1], &[0xC3, 0x01, 1, 2, 3]] {
            assert_eq!(parse_frame(short).unwrap_err().reason(), "unknown_framing");
        }
        let e = parse_frame(br#"{"event_id":"x"}"#).unwrap_err();
        assert_eq!(e.reason(), "unknown_framing");
        assert!(e.to_string().contains("0x7b 22 65 76"), "{e}");
        // The old Avro object-container magic is not a per-record framing.
        assert_eq!(
            parse_frame(b"Obj\x01").unwrap_err().reason(),
            "unknown_framing"
        );
        assert_eq!(
            parse_frame(&[0xC3, 0x02, 0, 0, 0, 0, 0, 0, 0, 0])
                .unwrap_err()
                .reason(),
            "unknown_framing"
        );
    }

    #[test]
    fn empty_body_after_header_is_a_frame() {
        // Header-only records parse here; the Avro decoder rejects the empty body.
        assert!(matches!(
            parse_frame(&[0, 0, 0, 0, 9]).unwrap(),
            Frame::Confluent {
                schema_id: 9,
                body: []
            }
        ));
    }
}
