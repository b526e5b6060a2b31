//! Every customer state, page by page: `lapse sweep-timers` and the
//! experiment report read the whole store this way. SCAN on each primary (a
//! cluster's too), then one pipelined load per page; safe while instances run
//! (a state written meanwhile is read at one of its revisions).

use crate::domain::event::CustomerRef;
use crate::domain::state::CustomerState;
use crate::error::StoreError;
use crate::store::slots::KeyScan;
use crate::store::StateStore;

/// A scan over the customer states of a store.
pub struct StateScan<'a> {
    store: &'a StateStore,
    keys: KeyScan,
    /// Keys that matched the state pattern but name no customer.
    pub skipped_keys: usize,
}

impl<'a> StateScan<'a> {
    pub async fn new(store: &'a StateStore) -> Result<StateScan<'a>, StoreError> {
        let keys = KeyScan::new(store.conn(), store.keys().state_pattern()).await?;
        Ok(StateScan {
            store,
            keys,
            skipped_keys: 0,
        })
    }

    /// The next page of up to about `count` customers with their states
    /// (customers deleted since the scan saw their key are left out); `None`
    /// when the scan is complete.
    pub async fn next_page(
        &mut self,
        count: usize,
    ) -> Result<Option<Vec<(CustomerRef, CustomerState)>>, StoreError> {
        let Some(page) = self.keys.next_page(count).await? else {
            return Ok(None);
        };
        let keys = self.store.keys();
        let customers: Vec<CustomerRef> = page
            .iter()
            .filter_map(|k| keys.customer_of_state(k))
            .collect();
        self.skipped_keys += page.len() - customers.len();
        let refs: Vec<&CustomerRef> = customers.iter().collect();
        let loaded = self.store.load_many(&refs).await?;
        Ok(Some(
            customers
                .into_iter()
                .zip(loaded)
                .filter(|(_, l)| l.rev != 0)
                .map(|(c, l)| (c, l.state))
                .collect(),
        ))
    }
}
