//! The write fence: what keeps the batch path's state writes off a Redis that
//! may have lost acknowledged writes until the records read before are read
//! again.
//!
//! Why it is needed (mode `fsync_horizon`): a customer's watermark says which
//! of its records are applied. Say Redis acknowledged the write of a
//! customer's records 1–3, then crashed and came back without it. If a batch
//! read before lapse knew then wrote records 4–5 of that customer on what is
//! left, the watermark would move past 1–3, and their re-reading would skip
//! them as redeliveries: lost for good. So:
//!
//! * every state write of the batch path goes through a [`WriteToken`], this
//!   process's own copy of the write script: a restarted or promoted Redis
//!   has no scripts, answers `NOSCRIPT` and writes nothing, and the
//!   durability epoch moves (`StateStore::scripts_lost`);
//! * a write is admitted only under the epoch its token was loaded in. Once
//!   the epoch moved (that `NOSCRIPT`, or a poll saw another master), mode
//!   `fsync_horizon` refuses every batch read before the next rewind and asks
//!   for one (the offset gate asks too); the first batch read after it loads
//!   a new token. A refused batch is dropped undone: the rewind re-reads it.
//!
//! Other modes only load a new token: `replicas` confirms every batch with
//! `WAIT` before the next write of its customers, and `ack` promises nothing
//! after a Redis crash (README "Guarantees").

use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::warn;

use crate::config::Durability as Mode;
use crate::error::StoreError;
use crate::kafka::consumer::Shared;
use crate::metrics::Metrics;
use crate::state_write::StateWriter;
use crate::store::redis::StateStore;

/// Where a batch was read: the consumer's ownership generation then, and
/// the consumer (its rewinds).
#[derive(Clone)]
pub struct ReadIn {
    pub generation: u64,
    pub shared: Arc<Shared>,
}

/// The token in use.
struct Admitted {
    writer: StateWriter,
    /// The durability epoch it was loaded in.
    epoch: u64,
    /// The consumer's rewound generation at its latest admission: if no
    /// rewind began since, writes through it may follow what Redis lost.
    used_in: u64,
}

/// What [`decide`] says of a write attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write through the token in use.
    Use,
    /// Load a new token, then write through it.
    Renew,
    /// Do not write: the batch is dropped and read again after a rewind;
    /// `rewind` says whether to ask for one (none is pending yet).
    Refuse { rewind: bool },
}

/// The consumer's side of a decision.
#[derive(Debug, Clone, Copy)]
pub struct Consumer {
    /// The generation the batch was read in.
    pub read_in: u64,
    /// The generation the last rewind began.
    pub rewound: u64,
    pub rewind_pending: bool,
}

/// The fence's rule (pure): `current` is the token in use, as (its epoch,
/// the rewound generation at its latest admission).
pub fn decide(mode: Mode, current: Option<(u64, u64)>, epoch: u64, c: Consumer) -> Decision {
    let fenced = mode == Mode::FsyncHorizon;
    if fenced && (c.rewind_pending || c.read_in < c.rewound) {
        return Decision::Refuse { rewind: false };
    }
    match current {
        Some((e, _)) if e == epoch => Decision::Use,
        // Written through since the last rewind began, and the epoch moved.
        Some((_, used_in)) if fenced && used_in == c.rewound => Decision::Refuse { rewind: true },
        _ => Decision::Renew,
    }
}

/// The fence of one process's batch path (see the module's doc).
pub struct WriteFence {
    mode: Mode,
    store: StateStore,
    /// The writer whose backend the tokens replace (its sink and metrics).
    base: StateWriter,
    current: Mutex<Option<Admitted>>,
    metrics: Metrics,
}

impl WriteFence {
    pub fn new(mode: Mode, store: StateStore, base: StateWriter, metrics: Metrics) -> WriteFence {
        WriteFence {
            mode,
            store,
            base,
            current: Mutex::new(None),
            metrics,
        }
    }

    /// The writer for one write attempt of a batch read in `read`, begun
    /// under `epoch`; `None`: the batch must be dropped (see [`decide`]).
    pub async fn admit(
        &self,
        read: &ReadIn,
        epoch: u64,
    ) -> Result<Option<StateWriter>, StoreError> {
        let mut current = self.current.lock().await;
        let c = Consumer {
            read_in: read.generation,
            rewound: read.shared.rewound_generation(),
            rewind_pending: read.shared.rewind_pending(),
        };
        let now = current.as_ref().map(|a| (a.epoch, a.used_in));
        match decide(self.mode, now, epoch, c) {
            Decision::Use => {}
            Decision::Refuse { rewind } => {
                if rewind {
                    self.metrics
                        .durability_shortfalls
                        .with_label_values(&["epoch"])
                        .inc();
                    warn!("Redis may have lost acknowledged writes (it restarted or failed over): no state is written until lapse has re-read from its last durable offsets");
                    read.shared.request_rewind();
                }
                self.metrics.fenced_batches.inc();
                return Ok(None);
            }
            Decision::Renew => {
                let token = self.store.write_token().await?;
                let writer = StateWriter {
                    backend: Arc::new(self.store.with_token(token)),
                    ..self.base.clone()
                };
                *current = Some(Admitted {
                    writer,
                    epoch,
                    used_in: c.rewound,
                });
            }
        }
        let a = current.as_mut().expect("admitted");
        a.used_in = c.rewound;
        Ok(Some(a.writer.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FSYNC: Mode = Mode::FsyncHorizon;

    fn read(read_in: u64, rewound: u64) -> Consumer {
        Consumer {
            read_in,
            rewound,
            rewind_pending: false,
        }
    }

    #[test]
    fn the_first_write_loads_a_token_and_later_ones_use_it() {
        assert_eq!(decide(FSYNC, None, 0, read(1, 0)), Decision::Renew);
        assert_eq!(decide(FSYNC, Some((0, 0)), 0, read(1, 0)), Decision::Use);
        // A rebalance moves the generation, not the rewound one: still admitted.
        assert_eq!(decide(FSYNC, Some((0, 0)), 0, read(5, 0)), Decision::Use);
    }

    #[test]
    fn a_moved_epoch_refuses_writes_and_asks_for_a_rewind_then_the_reread_renews() {
        // Written through since the last rewind (none), then the epoch moved.
        assert_eq!(
            decide(FSYNC, Some((0, 0)), 1, read(3, 0)),
            Decision::Refuse { rewind: true }
        );
        // Asked: every batch is refused until the poll thread has rewound...
        let pending = Consumer {
            rewind_pending: true,
            ..read(3, 0)
        };
        assert_eq!(
            decide(FSYNC, Some((0, 0)), 1, pending),
            Decision::Refuse { rewind: false }
        );
        // ...and afterwards every batch read before it.
        assert_eq!(
            decide(FSYNC, Some((0, 0)), 1, read(3, 4)),
            Decision::Refuse { rewind: false }
        );
        // A batch read after the rewind loads a new token under the new epoch.
        assert_eq!(decide(FSYNC, Some((0, 0)), 1, read(4, 4)), Decision::Renew);
    }

    #[test]
    fn a_token_last_used_before_a_rewind_is_renewed_without_another() {
        // Its writes all precede the rewind, which re-reads whatever they
        // were: nothing written through it can follow a lost record.
        assert_eq!(decide(FSYNC, Some((0, 2)), 1, read(4, 4)), Decision::Renew);
    }

    #[test]
    fn other_modes_renew_on_a_moved_epoch_and_never_refuse() {
        for mode in [Mode::Ack, Mode::Replicas] {
            assert_eq!(decide(mode, Some((0, 0)), 1, read(3, 0)), Decision::Renew);
            let pending = Consumer {
                rewind_pending: true,
                ..read(1, 4)
            };
            assert_eq!(decide(mode, Some((0, 0)), 0, pending), Decision::Use);
        }
    }
}
