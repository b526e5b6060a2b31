//! The batch processors: the stages between the poll thread's queue and the
//! offset gate, overlapping so that one batch's Redis round trips are not the
//! whole process' wait.
//!
//! * the **dispatcher** takes each batch off the queue (`batch.queue_depth`),
//!   decodes it and dead-letters its invalid records, and splits the rest by
//!   customer hash into `batch.processors` parts;
//! * each **processor** applies its parts in batch order (load, fold, CAS,
//!   timers, `redis.durability` confirmation, decisions published): a
//!   customer is always in the same processor's parts, so its events are
//!   applied in the order read, as with one processor;
//! * the **finisher** takes the batches in the order read, waits for every
//!   part of the next one, folds its campaign signals (in batch order: a
//!   campaign's watermarks are per partition) and hands it to the offset
//!   gate. So a batch's offsets are committed only once every part of it and
//!   of every batch before it is durable: the gate's semantics are those of
//!   one processor.
//!
//! Between the stages at most [`PARTS_QUEUED`] parts per processor and
//! [`BATCHES_IN_FLIGHT`] batches wait (bounded, besides the queue). A batch
//! read before the last rebalance or rewind is dropped undone: its offsets
//! could never be recorded, and applying it after an abandoned batch (a
//! drain that timed out) would move watermarks past records never applied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::kafka::consumer::{Applying, Batch, Done, Shared};
use crate::kafka::offset_gate::Held;
use crate::pipeline::{GaveUp, Part, PartDone, Pipeline};

/// Parts queued per processor behind the one it applies.
const PARTS_QUEUED: usize = 4;
/// Batches decoded and not yet finished (the finisher's queue).
const BATCHES_IN_FLIGHT: usize = 4;

struct Job {
    part: Part,
    abandon: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<PartDone, GaveUp>>,
}

/// A dispatched batch, as the finisher sees it.
struct Ticket {
    done: Done,
    abandon: Arc<AtomicBool>,
    started: Instant,
    /// When each record arrived (`lapse_record_latency_seconds`).
    received: Vec<Instant>,
    dead_letters: usize,
    parts: Vec<oneshot::Receiver<Result<PartDone, GaveUp>>>,
    /// Dropped once the batch is applied or given up (the poll thread batches by it).
    applying: Option<Applying>,
}

/// Starts the dispatcher, `processors` processors and the finisher; the
/// handle ends once `rx` is closed and everything taken from it is done.
pub fn spawn(
    pipeline: Arc<Pipeline>,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Batch>,
    processors: usize,
    gate: mpsc::UnboundedSender<Held>,
) -> JoinHandle<()> {
    let n = processors.max(1);
    let mut to_processors = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n + 1);
    for i in 0..n {
        let (tx, jobs) = mpsc::channel::<Job>(PARTS_QUEUED);
        to_processors.push(tx);
        tasks.push(tokio::spawn(process(pipeline.clone(), jobs, i)));
    }
    let (to_finisher, tickets) = mpsc::channel::<Ticket>(BATCHES_IN_FLIGHT);
    tasks.push(tokio::spawn(finish(
        pipeline.clone(),
        shared.clone(),
        tickets,
        gate,
    )));
    tokio::spawn(async move {
        while let Some(batch) = rx.recv().await {
            let abandon = shared.start_batch();
            if batch.generation != shared.generation() {
                debug!("batch read before a rebalance or rewind; dropped (re-read)");
                shared.finish_batch(&abandon);
                continue;
            }
            let started = Instant::now();
            let decoded = match pipeline.decode(&batch.records, &abandon).await {
                Ok(d) => d,
                Err(GaveUp) => {
                    shared.finish_batch(&abandon);
                    continue;
                }
            };
            let mut parts = Vec::with_capacity(n);
            for (part, tx) in Pipeline::split(decoded.valid, n)
                .into_iter()
                .zip(&to_processors)
            {
                if part.events.is_empty() {
                    continue;
                }
                let (reply, done) = oneshot::channel();
                // A processor that is gone drops the reply: the finisher sees that as given up.
                let _ = tx
                    .send(Job {
                        part,
                        abandon: abandon.clone(),
                        reply,
                    })
                    .await;
                parts.push(done);
            }
            let ticket = Ticket {
                done: batch.offsets(),
                abandon,
                started,
                received: batch.records.iter().map(|r| r.received).collect(),
                dead_letters: decoded.dead_letters,
                parts,
                applying: batch.applying,
            };
            if let Err(lost) = to_finisher.send(ticket).await {
                shared.finish_batch(&lost.0.abandon);
            }
        }
        // Closing the stages' queues ends them once they have drained.
        drop(to_processors);
        drop(to_finisher);
        join_all(tasks).await;
    })
}

/// One processor: applies its parts in the order dispatched.
async fn process(pipeline: Arc<Pipeline>, mut jobs: mpsc::Receiver<Job>, index: usize) {
    let busy = pipeline
        .metrics
        .processor_busy
        .with_label_values(&[&index.to_string()]);
    while let Some(job) = jobs.recv().await {
        // An abandoned batch's later parts are not applied either (see the module's doc).
        let result = if job.abandon.load(Ordering::SeqCst) {
            Err(GaveUp)
        } else {
            let t = Instant::now();
            let r = pipeline.apply_customers(&job.part, &job.abandon).await;
            busy.inc_by(t.elapsed().as_secs_f64());
            r
        };
        let _ = job.reply.send(result);
    }
}

/// The finisher: batches in the order read, each once all its parts are durable.
async fn finish(
    pipeline: Arc<Pipeline>,
    shared: Arc<Shared>,
    mut tickets: mpsc::Receiver<Ticket>,
    gate: mpsc::UnboundedSender<Held>,
) {
    while let Some(t) = tickets.recv().await {
        let mut parts = Vec::with_capacity(t.parts.len());
        let mut gave_up = false;
        for done in t.parts {
            match done.await {
                Ok(Ok(p)) => parts.push(p),
                _ => gave_up = true,
            }
        }
        let applied = if gave_up {
            Err(GaveUp)
        } else {
            pipeline.finish(parts, t.dead_letters, &t.abandon).await
        };
        let Ok(applied) = applied else {
            shared.finish_batch(&t.abandon);
            continue;
        };
        let m = &pipeline.metrics;
        m.batch_records.observe(t.received.len() as f64);
        for r in &t.received {
            m.record_latency.observe(r.elapsed().as_secs_f64());
        }
        m.batch_seconds.observe(t.started.elapsed().as_secs_f64());
        drop(t.applying);
        debug!(summary = ?applied.summary, "batch durable");
        let held = Held {
            done: t.done,
            epoch: applied.epoch,
            acked_at: applied.acked_at,
            abandon: t.abandon,
        };
        if let Err(lost) = gate.send(held) {
            shared.finish_batch(&lost.0.abandon);
        }
    }
}
