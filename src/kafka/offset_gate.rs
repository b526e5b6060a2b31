//! The offset gate: between "Redis acknowledged the batch's writes" (and, in
//! mode `replicas`, `WAIT` confirmed them: `store/durability.rs`) and "the
//! batch's offsets may be committed" (`Shared::record_done`).
//!
//! Batches pass in the order they were applied. In mode `fsync_horizon` each
//! is held until `redis.fsync_horizon` after its acknowledgement, then
//! released only if a read of the masters' identities sent after that instant
//! shows the epoch its writes began under. If a master restarted or changed
//! meanwhile, Redis may have lost those writes: nothing held is released,
//! and the poll thread re-reads every assigned partition from its last
//! durable offset (`Shared::request_rewind`), which re-applies what was lost
//! (idempotently: what survived is skipped). A held batch stays "in flight",
//! so a revoke or a shutdown waits for it (bounded by their drain timeouts).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::debug;

use super::consumer::{Done, Shared};
use crate::config::Durability as Mode;
use crate::metrics::Metrics;
use crate::store::durability::{RedisEpoch, Verdict};

/// A batch applied and acknowledged by Redis, waiting to be released.
pub struct Held {
    pub done: Done,
    /// The Redis epoch the batch's writes began under.
    pub epoch: u64,
    pub acked_at: Instant,
    /// The batch's abandon flag (a revoke or shutdown gave up waiting).
    pub abandon: Arc<AtomicBool>,
}

/// Spawns the gate's task; send every durable batch to the returned channel
/// (unbounded: a held batch keeps only its offsets).
pub fn spawn(
    mode: Mode,
    horizon: Duration,
    epoch: RedisEpoch,
    shared: Arc<Shared>,
    metrics: Metrics,
) -> mpsc::UnboundedSender<Held> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Held>();
    tokio::spawn(async move {
        // The newest generation a rewind was requested for: batches read
        // in it or before are re-read anyway, so they ask for no other.
        let mut rewound: Option<u64> = None;
        while let Some(h) = rx.recv().await {
            let stale = rewound.is_some_and(|g| h.done.generation <= g);
            if mode == Mode::FsyncHorizon && !stale {
                if hold(&h, horizon, &epoch, &shared, &metrics).await {
                    metrics
                        .durability_wait_seconds
                        .observe(h.acked_at.elapsed().as_secs_f64());
                    shared.record_done(&h.done);
                } else if shared.generation() > h.done.generation {
                    rewound = Some(h.done.generation);
                }
            } else if !stale {
                shared.record_done(&h.done);
            }
            shared.finish_batch(&h.abandon);
        }
    });
    tx
}

/// Step of the gate's waits (and of its checks of the abandon flag).
const STEP: Duration = Duration::from_millis(20);

/// Waits out the horizon; true when the batch may be recorded done.
async fn hold(
    h: &Held,
    horizon: Duration,
    epoch: &RedisEpoch,
    shared: &Shared,
    metrics: &Metrics,
) -> bool {
    let at = h.acked_at + horizon;
    loop {
        if h.abandon.load(Ordering::SeqCst) {
            return false;
        }
        if Instant::now() < at {
            tokio::time::sleep(STEP.min(at.saturating_duration_since(Instant::now()))).await;
            continue;
        }
        match epoch.verdict(h.epoch, at) {
            Verdict::Same => return true,
            Verdict::Unknown => tokio::time::sleep(STEP).await,
            Verdict::Changed => {
                metrics
                    .durability_shortfalls
                    .with_label_values(&["epoch"])
                    .inc();
                debug!("a held batch's writes may be lost: rewinding");
                shared.request_rewind();
                // Release nothing until the poll thread has moved to a new
                // generation: a later batch's offsets would cover this one.
                while shared.rewind_pending() && !h.abandon.load(Ordering::SeqCst) {
                    tokio::time::sleep(STEP).await;
                }
                return false;
            }
        }
    }
}
