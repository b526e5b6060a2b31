//! `lapse sweep-timers`: schedules the timers of customers whose state has a
//! recall stage (or allowance release) due but no timer: states written before
//! lapse kept timers, or whose timer Redis lost (a failover, a restore of the
//! state keys without the timer keys). Safe while instances run: it only adds
//! a timer where none is (`ZADD NX`), and a timer that turns out not to be due
//! any more only makes the timer loop re-evaluate the customer.

use crate::domain::decide;
use crate::domain::event::CustomerRef;
use crate::domain::policy::Policies;
use crate::error::StoreError;
use crate::store::scan::StateScan;
use crate::store::timers::TimerStore;
use crate::store::StateStore;

/// Keys per SCAN page (and states per pipelined load).
const PAGE: usize = 500;

/// What a sweep found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// Customer states read.
    pub customers: usize,
    /// Of them, with a recall stage or allowance release to come.
    pub with_due_time: usize,
    /// Of those, without a timer: scheduled (or, in a dry run, to schedule).
    pub without_timer: usize,
    /// Keys that matched the state pattern but name no customer.
    pub skipped_keys: usize,
}

/// Scans every customer state and schedules the missing timers.
pub async fn sweep(
    store: &StateStore,
    timers: &TimerStore,
    policies: &Policies,
    dry_run: bool,
    now: i64,
) -> Result<SweepReport, StoreError> {
    let mut report = SweepReport::default();
    let mut scan = StateScan::new(store).await?;
    while let Some(page) = scan.next_page(PAGE).await? {
        report.customers += page.len();
        let due: Vec<(&CustomerRef, i64)> = page
            .iter()
            // Under the customer's experiment arms now (as live, where the
            // due time is recorded under the arms of the latest record).
            .filter_map(|(c, s)| {
                Some((
                    c,
                    decide::next_timer(s, &policies.effective(c, now).policy)?,
                ))
            })
            .collect();
        report.with_due_time += due.len();
        report.without_timer += timers.schedule_missing(&due, dry_run).await?;
    }
    report.skipped_keys = scan.skipped_keys;
    Ok(report)
}
