//! An in-memory [`Backend`]: the same values and the same compare-and-set rule
//! as the Redis script, in a map. For tests of the state-write step (conflicts
//! can be injected with [`MemoryBackend::put`] between a load and a write) and
//! for tools that need no Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::keys::Keys;
use super::record::{stored_revision, Backend, CasWrite, Record};
use crate::error::StoreError;

/// Cheap to clone; clones share the map.
#[derive(Clone)]
pub struct MemoryBackend {
    keys: Keys,
    values: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl MemoryBackend {
    pub fn new(prefix: impl Into<String>) -> MemoryBackend {
        MemoryBackend {
            keys: Keys::new(prefix),
            values: Arc::default(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A panic while holding the lock leaves a consistent map: every change is one insert.
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored revision and record, if any (reads outside the write step).
    pub fn get<R: Record>(&self, id: &R::Id) -> Option<(u64, R)> {
        let v = self.map().get(&R::key(&self.keys, id)).cloned()?;
        Some(R::decode(&v).expect("a value this backend stored"))
    }

    /// Stores `record` as the next revision whatever is stored: another writer.
    /// Returns the revision now stored.
    pub fn put<R: Record>(&self, id: &R::Id, record: &R) -> u64 {
        let key = R::key(&self.keys, id);
        let mut map = self.map();
        let rev = map.get(&key).map_or(0, |v| stored_revision(v)) + 1;
        map.insert(key, record.encode(rev));
        rev
    }

    /// Number of stored values.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Backend for MemoryBackend {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    fn get_many<'s>(
        &'s self,
        _op: &'static str,
        keys: &'s [String],
    ) -> BoxFuture<'s, Result<Vec<Option<Vec<u8>>>, StoreError>> {
        let map = self.map();
        let values = keys.iter().map(|k| map.get(k).cloned()).collect();
        Box::pin(std::future::ready(Ok(values)))
    }

    fn cas_many<'s>(
        &'s self,
        _op: &'static str,
        writes: &'s [CasWrite],
    ) -> BoxFuture<'s, Result<Vec<bool>, StoreError>> {
        let mut map = self.map();
        let landed = writes
            .iter()
            .map(|(key, expected, value)| {
                let rev = map.get(key).map_or(0, |v| stored_revision(v));
                if rev == *expected {
                    map.insert(key.clone(), value.clone());
                    true
                } else {
                    false
                }
            })
            .collect();
        Box::pin(std::future::ready(Ok(landed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::CustomerRef;
    use crate::domain::state::CustomerState;
    use crate::store::record;

    fn state(n: i64) -> CustomerState {
        CustomerState {
            timer_due: Some(n),
            ..CustomerState::default()
        }
    }

    /// The rule of the Redis script (tests/store.rs checks Redis the same way).
    #[tokio::test]
    async fn writes_land_where_the_revision_matches_and_nowhere_else() {
        let b = MemoryBackend::new("lapse");
        let cs: Vec<CustomerRef> = (0..5)
            .map(|i| CustomerRef::new("brandA", format!("c{i}")))
            .collect();
        let first: Vec<CustomerState> = (0..5).map(state).collect();
        let writes: Vec<_> = cs.iter().zip(&first).map(|(c, s)| (c, 0, s)).collect();
        assert_eq!(
            record::save(&b, &writes).await.unwrap(),
            [true; 5],
            "absent is revision 0"
        );
        let second: Vec<CustomerState> = (0..5).map(|i| state(100 + i)).collect();
        let writes: Vec<_> = cs
            .iter()
            .zip(&second)
            .enumerate()
            .map(|(i, (c, s))| (c, if i % 2 == 0 { 0 } else { 1 }, s))
            .collect();
        assert_eq!(
            record::save(&b, &writes).await.unwrap(),
            [false, true, false, true, false]
        );
        let refs: Vec<&CustomerRef> = cs.iter().collect();
        let loaded: Vec<(u64, Box<CustomerState>)> = record::load(&b, &refs).await.unwrap();
        for (i, (rev, st)) in loaded.into_iter().enumerate() {
            if i % 2 == 0 {
                assert_eq!((rev, *st), (1, first[i].clone()));
            } else {
                assert_eq!((rev, *st), (2, second[i].clone()));
            }
        }
        let absent = CustomerRef::new("brandA", "nobody");
        let loaded: Vec<(u64, Box<CustomerState>)> = record::load(&b, &[&absent]).await.unwrap();
        assert_eq!(loaded, [(0, Box::default())]);
        assert_eq!(b.put(&cs[0], &state(9)), 2);
        assert_eq!(b.get::<CustomerState>(&cs[0]), Some((2, state(9))));
    }
}
