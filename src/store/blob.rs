//! Binary encoding of `CustomerState` as stored in Redis:
//! `<revision as ASCII decimal>:` then a format byte, then postcard bytes.
//! The ASCII revision prefix is what the compare-and-set script reads.

use crate::domain::state::CustomerState;

/// Bumped when the stored layout changes incompatibly; old blobs are then migrated on read.
pub const FORMAT_V1: u8 = 1;

pub fn encode(rev: u64, state: &CustomerState) -> Vec<u8> {
    encode_any(rev, state)
}

/// Encodes any stored record (customer or campaign state) the same way.
pub fn encode_any<T: serde::Serialize>(rev: u64, state: &T) -> Vec<u8> {
    let mut out = format!("{rev}:").into_bytes();
    out.push(FORMAT_V1);
    // postcard into a Vec cannot fail for these plain types.
    let body = postcard::to_allocvec(state).unwrap_or_default();
    out.extend_from_slice(&body);
    out
}

/// Splits and decodes a stored value into its revision and state.
pub fn decode(bytes: &[u8]) -> Result<(u64, CustomerState), String> {
    decode_any(bytes)
}

/// Decodes any stored record written by `encode_any`.
pub fn decode_any<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(u64, T), String> {
    let colon = bytes
        .iter()
        .take(21)
        .position(|b| *b == b':')
        .ok_or("no revision prefix")?;
    let rev: u64 = std::str::from_utf8(&bytes[..colon])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("revision is not a number")?;
    let rest = &bytes[colon + 1..];
    match rest.first() {
        Some(&FORMAT_V1) => {
            let state = postcard::from_bytes(&rest[1..]).map_err(|e| format!("postcard: {e}"))?;
            Ok((rev, state))
        }
        Some(v) => Err(format!(
            "unknown state format {v}: this lapse is older than the data"
        )),
        None => Err("empty state".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{Channel, CustomerRef, Event, EventBody, EventKind, Purpose};
    use crate::domain::state::{Source, StateParams};

    #[test]
    fn round_trip() {
        let mut s = CustomerState::default();
        let ev = Event {
            event_id: "e".into(),
            customer: CustomerRef::new("t", "c"),
            occurred_at: 1_700_000_000_000,
            body: EventBody::Send {
                channel: Channel::Wechat,
                message_id: "m".into(),
                campaign_id: None,
                purpose: Purpose::Marketing,
                cost: None,
            },
        };
        s.apply(
            &ev,
            Source {
                kind: EventKind::Send,
                partition: 2,
                offset: 7,
            },
            &StateParams::default(),
        );
        let b = encode(42, &s);
        assert!(b.starts_with(b"42:"));
        let (rev, back) = decode(&b).unwrap();
        assert_eq!(rev, 42);
        assert_eq!(back, s);
        assert!(decode(b"x:1").is_err());
        assert!(decode(b"7:\x09abc").is_err());
    }
}

#[cfg(test)]
mod size {
    use super::*;
    use crate::domain::event::*;
    use crate::domain::policy::PolicyConfig;
    use crate::domain::state::StateParams;

    fn full() -> CustomerState {
        state_after(2000)
    }

    /// Feeds `n` events of every kind on every channel and returns the stored size.
    fn stored_size_after(n: i64) -> usize {
        encode(u64::MAX, &state_after(n)).len()
    }

    fn state_after(n: i64) -> CustomerState {
        let policy = PolicyConfig::default().resolve(None).unwrap();
        let c = CustomerRef::new("brand", "c-000001");
        crate::bench::memory::full_history(&c, n, &StateParams::default(), &policy)
    }

    #[test]
    fn a_customer_state_stops_growing() {
        let a = stored_size_after(500);
        let b = stored_size_after(2_000);
        // Bounded by construction: more history does not make the value bigger.
        assert!(b <= a + 16, "{a} bytes after 500 rounds, {b} after 2000");
        assert!(b < 2_048, "{b} bytes for a full five-channel history");
        eprintln!(
            "stored state with full five-channel history: {b} bytes ({:?})",
            crate::bench::memory::blob_parts(&full())
        );
    }
}
