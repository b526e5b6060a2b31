//! Keyed records: what lapse keeps under one Redis key and writes by
//! compare-and-set on a revision (a customer's state, a campaign's state), and
//! the storage backend they are read from and written to (Redis in
//! `redis.rs`, memory in `memory.rs`).
//!
//! A stored value is `<revision>:<format byte><body>` (`blob.rs`); a write of
//! revision `r + 1` lands only if the stored revision is still `r` (absent = 0).
//! Each record carries an outbox: decisions written with it, published after
//! the write, then cleared (see `state_write.rs`).

use std::borrow::Cow;

use futures::future::BoxFuture;

use super::blob;
use super::keys::Keys;
use crate::domain::allowance::ThrottleDecision;
use crate::domain::campaign::CampaignState;
use crate::domain::event::CustomerRef;
use crate::domain::output::Output;
use crate::domain::state::CustomerState;
use crate::error::StoreError;

/// A record with a revision and an outbox, stored under one key.
pub trait Record: Clone + Default + Send + Sync + 'static {
    /// What names one record; its key derives from it.
    type Id: Send + Sync + 'static;
    /// Labels (`op`) of its loads and writes in `lapse_redis_call_seconds`.
    const LOAD_OP: &'static str;
    const SAVE_OP: &'static str;

    fn key(keys: &Keys, id: &Self::Id) -> String;
    /// The stored value at revision `rev`.
    fn encode(&self, rev: u64) -> Vec<u8>;
    /// Revision and record from a stored value.
    fn decode(bytes: &[u8]) -> Result<(u64, Self), String>;
    /// [`Record::decode`] into `out`, which it overwrites; returns the revision.
    fn decode_into(bytes: &[u8], out: &mut Self) -> Result<u64, String> {
        let (rev, r) = Self::decode(bytes)?;
        *out = r;
        Ok(rev)
    }
    fn outbox_is_empty(&self) -> bool;
    /// The outbox as output records.
    fn outbox(&self) -> Cow<'_, [Output]>;
    fn clear_outbox(&mut self);
    /// The last decision published under each of the record's output keys, as
    /// published (those the record keeps).
    fn latest_decisions(&self, id: &Self::Id) -> Vec<ThrottleDecision>;
    /// The customer the record belongs to, if it is a customer's (allowance
    /// gauges follow customers' published decisions).
    fn customer(id: &Self::Id) -> Option<&CustomerRef>;
}

impl Record for CustomerState {
    type Id = CustomerRef;
    const LOAD_OP: &'static str = "load";
    const SAVE_OP: &'static str = "save";

    fn key(keys: &Keys, id: &CustomerRef) -> String {
        keys.state(id)
    }
    fn encode(&self, rev: u64) -> Vec<u8> {
        blob::encode(rev, self)
    }
    fn decode(bytes: &[u8]) -> Result<(u64, Self), String> {
        blob::decode(bytes)
    }
    fn decode_into(bytes: &[u8], out: &mut Self) -> Result<u64, String> {
        blob::decode_into(bytes, out)
    }
    fn outbox_is_empty(&self) -> bool {
        self.outbox.is_empty()
    }
    fn outbox(&self) -> Cow<'_, [Output]> {
        Cow::Borrowed(&self.outbox)
    }
    fn clear_outbox(&mut self) {
        self.outbox.clear();
    }
    fn latest_decisions(&self, id: &CustomerRef) -> Vec<ThrottleDecision> {
        CustomerState::latest_decisions(self, id)
    }
    fn customer(id: &CustomerRef) -> Option<&CustomerRef> {
        Some(id)
    }
}

/// A campaign: (tenant, campaign id).
pub type CampaignId = (String, String);

impl Record for CampaignState {
    type Id = CampaignId;
    const LOAD_OP: &'static str = "load_campaigns";
    const SAVE_OP: &'static str = "save_campaigns";

    fn key(keys: &Keys, (tenant, campaign): &CampaignId) -> String {
        keys.campaign(tenant, campaign)
    }
    fn encode(&self, rev: u64) -> Vec<u8> {
        let mut out = blob::encode_any(rev, self);
        if let Some(d) = &self.last {
            // Plain data: postcard into a Vec cannot fail.
            out.extend(postcard::to_allocvec(d).unwrap_or_default());
        }
        out
    }
    fn decode(bytes: &[u8]) -> Result<(u64, Self), String> {
        let (rev, mut c, after): (u64, CampaignState, _) = blob::decode_any_and_rest(bytes)?;
        if !after.is_empty() {
            let (last, trailing) = postcard::take_from_bytes(after)
                .map_err(|e| format!("campaign's last decision: {e}"))?;
            if !trailing.is_empty() {
                return Err(format!("{} trailing bytes", trailing.len()));
            }
            c.last = Some(last);
        }
        Ok((rev, c))
    }
    fn outbox_is_empty(&self) -> bool {
        self.outbox.is_empty()
    }
    fn outbox(&self) -> Cow<'_, [Output]> {
        Cow::Owned(
            self.outbox
                .iter()
                .map(|d| Output::Throttle(Box::new(d.clone())))
                .collect(),
        )
    }
    fn clear_outbox(&mut self) {
        self.outbox.clear();
    }
    fn latest_decisions(&self, _: &CampaignId) -> Vec<ThrottleDecision> {
        self.last.iter().cloned().collect()
    }
    fn customer(_: &CampaignId) -> Option<&CustomerRef> {
        None
    }
}

/// One compare-and-set write: the key, the revision it must still have, the
/// new value (carrying revision + 1).
pub type CasWrite = (String, u64, Vec<u8>);

/// Where records are stored: raw values under keys, written by compare-and-set.
pub trait Backend: Send + Sync {
    fn keys(&self) -> &Keys;
    /// The values of `keys`, in order (`None`: absent). `op` labels the metrics.
    fn get_many<'s>(
        &'s self,
        op: &'static str,
        keys: &'s [String],
    ) -> BoxFuture<'s, Result<Vec<Option<Vec<u8>>>, StoreError>>;
    /// Writes each value whose key's stored revision equals the expected one
    /// (absent, or a value without a revision prefix, is revision 0). Returns,
    /// per write and in order, whether it landed (false: another writer got
    /// there first, nothing changed).
    fn cas_many<'s>(
        &'s self,
        op: &'static str,
        writes: &'s [CasWrite],
    ) -> BoxFuture<'s, Result<Vec<bool>, StoreError>>;
}

/// Loads records (absent: the default record at revision 0) in one call.
/// Boxed, and decoded in place: a customer state is ~2.7 KB, and moving it
/// from the decoder to the caller's box was a tenth of lapse's CPU.
pub async fn load<R: Record, B: Backend + ?Sized>(
    backend: &B,
    ids: &[&R::Id],
) -> Result<Vec<(u64, Box<R>)>, StoreError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let keys: Vec<String> = ids.iter().map(|id| R::key(backend.keys(), id)).collect();
    let values = backend.get_many(R::LOAD_OP, &keys).await?;
    let mut out = Vec::with_capacity(values.len());
    for (v, key) in values.into_iter().zip(keys) {
        let mut record = Box::<R>::default();
        let rev = match v {
            None => 0,
            Some(bytes) => R::decode_into(&bytes, &mut record)
                .map_err(|reason| StoreError::Corrupt { key, reason })?,
        };
        out.push((rev, record));
    }
    Ok(out)
}

/// Compare-and-set writes of `(id, revision loaded, record)`; per write,
/// whether it landed (then the stored revision is the loaded one + 1).
pub async fn save<R: Record, B: Backend + ?Sized>(
    backend: &B,
    writes: &[(&R::Id, u64, &R)],
) -> Result<Vec<bool>, StoreError> {
    if writes.is_empty() {
        return Ok(vec![]);
    }
    let items: Vec<CasWrite> = writes
        .iter()
        .map(|(id, rev, r)| (R::key(backend.keys(), id), *rev, r.encode(rev + 1)))
        .collect();
    backend.cas_many(R::SAVE_OP, &items).await
}

/// The revision of a stored value as the compare-and-set script reads it: the
/// digits before the first `:` in its first 21 bytes; anything else is 0.
pub fn stored_revision(value: &[u8]) -> u64 {
    let head = &value[..value.len().min(21)];
    head.iter()
        .position(|b| *b == b':')
        .filter(|&n| n > 0 && head[..n].iter().all(u8::is_ascii_digit))
        .and_then(|n| std::str::from_utf8(&head[..n]).ok()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_revision_reads_like_the_script() {
        assert_eq!(stored_revision(b"12:\x02abc"), 12);
        assert_eq!(stored_revision(b"0:"), 0);
        assert_eq!(stored_revision(b"junk"), 0);
        assert_eq!(stored_revision(b":x"), 0);
        assert_eq!(stored_revision(b"1a:x"), 0);
        assert_eq!(stored_revision(b""), 0);
        assert_eq!(stored_revision(b"012:x"), 12);
        assert_eq!(stored_revision(b"0:x"), 0);
    }

    #[test]
    fn both_records_round_trip_through_their_encoding() {
        let c = CustomerState {
            timer_due: Some(7),
            ..CustomerState::default()
        };
        let (rev, back) = <CustomerState as Record>::decode(&Record::encode(&c, 3)).unwrap();
        assert_eq!((rev, back), (3, c));
        let k = CampaignState {
            total_sends: 4,
            ..CampaignState::default()
        };
        let (rev, back) = <CampaignState as Record>::decode(&Record::encode(&k, 9)).unwrap();
        assert_eq!((rev, back.total_sends), (9, 4));
    }

    #[test]
    fn a_campaign_keeps_its_last_decision_after_the_body_and_old_records_still_decode() {
        let p = crate::domain::policy::PolicyConfig::default()
            .resolve(None)
            .unwrap();
        // In a click-rate spell, clicks still far below the baseline.
        let mut k = CampaignState {
            spell_until: Some(5_000),
            baseline: crate::domain::campaign::Tally {
                sends: 100.0,
                clicks: 10.0,
            },
            recent: crate::domain::campaign::Tally {
                sends: 100.0,
                clicks: 0.0,
            },
            ..CampaignState::default()
        };
        let d = k.decide("brandA", "spring", &p, 1_000, "e1").unwrap();
        assert_eq!(k.last.as_ref(), Some(&d));
        let bytes = Record::encode(&k, 2);
        let (_, back) = <CampaignState as Record>::decode(&bytes).unwrap();
        assert_eq!(back, k);
        assert_eq!(
            back.latest_decisions(&("brandA".into(), "spring".into())),
            [d]
        );
        // A record written before `last` existed: the body alone.
        let old = blob::encode_any(2, &k);
        let (_, back) = <CampaignState as Record>::decode(&old).unwrap();
        assert_eq!(back.last, None);
        assert!(<CampaignState as Record>::decode(&[&bytes[..], &[7]].concat()).is_err());
    }
}
