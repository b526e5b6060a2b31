//! The batch processors: the stages between the poll thread's queue and the
//! offset gate, overlapping so that one batch's Redis round trips are not the
//! whole process' wait.
//!
//! * the **dispatcher** takes each batch off the queue (`batch.queue_depth`),
//!   decodes it and dead-letters its invalid records, and splits the rest by
//!   customer hash into `batch.processors` parts;
//! * each **processor** writes its parts in batch order (load, fold, CAS,
//!   timers, `redis.durability` confirmation): a customer is always in the
//!   same processor's parts, so its events are applied in the order read, as
//!   with one processor;
//! * each processor's **publisher** publishes the decisions of its parts, in
//!   the order written, and clears their outboxes, while the processor writes
//!   the next part: producing and acknowledging a batch's decisions was a
//!   fifth of a processor's time. A customer whose outbox is still
//!   unpublished waits in the next part until it is ([`Unpublished`]);
//! * the **finisher** takes the batches in the order read, waits for every
//!   part of the next one, folds its campaign signals (in batch order: a
//!   campaign's watermarks are per partition) and hands it to the offset
//!   gate. So a batch's offsets are committed only once every part of it and
//!   of every batch before it is durable: the gate's semantics are those of
//!   one processor.
//!
//! Between the stages at most [`PARTS_QUEUED`] parts per processor, as many
//! per publisher, and [`BATCHES_IN_FLIGHT`] batches wait (bounded, besides the
//! queue). A batch read before the last rebalance or rewind is dropped
//! undone: its offsets could never be recorded, and applying it after an
//! abandoned batch (a drain that timed out) would move watermarks past
//! records never applied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::domain::event::CustomerRef;
use crate::kafka::consumer::{Applying, Batch, Done, Shared};
use crate::kafka::offset_gate::Held;
use crate::pipeline::{GaveUp, Part, PartDone, Pipeline, Written};
use crate::write_fence::ReadIn;

/// Parts queued per processor behind the one it writes (and per publisher).
const PARTS_QUEUED: usize = 4;
/// Batches decoded and not yet finished (the finisher's queue).
const BATCHES_IN_FLIGHT: usize = 4;

struct Job {
    part: Part,
    read: ReadIn,
    abandon: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<PartDone, GaveUp>>,
}

/// A written part on its way to its processor's publisher.
struct Publish {
    job: Job,
    written: Written,
    /// The part's number in its processor's order (see [`Unpublished`]).
    seq: u64,
}

/// The customers of one processor whose outbox a written part holds and its
/// publisher has not published yet, each with the number of the last part
/// holding it. The processor writes part N + 1 while part N is published; a
/// customer of N + 1 loaded before N's decisions were published and cleared
/// would carry them into its own outbox (published twice) and make N's clear
/// conflict, so it is written only once [`Unpublished::published_through`] N.
pub struct Unpublished {
    held: Mutex<HashMap<CustomerRef, u64>>,
    through: watch::Sender<u64>,
}

impl Default for Unpublished {
    fn default() -> Self {
        Unpublished {
            held: Mutex::new(HashMap::new()),
            through: watch::channel(0).0,
        }
    }
}

impl Unpublished {
    /// `customers` split into those held and the others (each in the given
    /// order), and the last part the held ones wait for.
    pub fn split<'c>(
        &self,
        customers: Vec<&'c CustomerRef>,
    ) -> (Vec<&'c CustomerRef>, Vec<&'c CustomerRef>, Option<u64>) {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            return (Vec::new(), customers, None);
        }
        let mut wait_for = None;
        let (mut waiting, mut free) = (Vec::new(), Vec::with_capacity(customers.len()));
        for c in customers {
            match held.get(c) {
                Some(&seq) => {
                    waiting.push(c);
                    wait_for = wait_for.max(Some(seq));
                }
                None => free.push(c),
            }
        }
        (waiting, free, wait_for)
    }

    fn hold<'c>(&self, seq: u64, customers: impl Iterator<Item = &'c CustomerRef>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for c in customers {
            held.insert(c.clone(), seq);
        }
    }

    /// Part `seq` is published (or given up: its outboxes stay in Redis and
    /// are published with the customers' next write).
    fn release(&self, seq: u64) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| *s != seq);
        self.through.send_replace(seq);
    }

    /// Returns once every part up to `seq` is published or given up.
    pub async fn published_through(&self, seq: u64) {
        let mut rx = self.through.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = rx.wait_for(|s| *s >= seq).await;
    }
}

/// A dispatched batch, as the finisher sees it.
struct Ticket {
    done: Done,
    read: ReadIn,
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
    let mut tasks = Vec::with_capacity(2 * n + 1);
    for i in 0..n {
        let (tx, jobs) = mpsc::channel::<Job>(PARTS_QUEUED);
        let (to_publisher, written) = mpsc::channel::<Publish>(PARTS_QUEUED);
        let unpublished = Arc::new(Unpublished::default());
        to_processors.push(tx);
        tasks.push(tokio::spawn(process(
            pipeline.clone(),
            jobs,
            i,
            to_publisher,
            unpublished.clone(),
        )));
        tasks.push(tokio::spawn(publish(
            pipeline.clone(),
            written,
            unpublished,
        )));
    }
    let (to_finisher, tickets) = mpsc::channel::<Ticket>(BATCHES_IN_FLIGHT);
    tasks.push(tokio::spawn(finish(
        pipeline.clone(),
        shared.clone(),
        tickets,
        gate,
    )));
    let m = &pipeline.metrics.stage_seconds;
    let (working, blocked) = (
        m.with_label_values(&["dispatcher", "working"]),
        m.with_label_values(&["dispatcher", "blocked"]),
    );
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
            let read = ReadIn {
                generation: batch.generation,
                shared: shared.clone(),
            };
            let split = Pipeline::split(decoded.valid, n);
            working.inc_by(started.elapsed().as_secs_f64());
            let sending = Instant::now();
            for (part, tx) in split.into_iter().zip(&to_processors) {
                if part.events.is_empty() {
                    continue;
                }
                let (reply, done) = oneshot::channel();
                // A processor that is gone drops the reply: the finisher sees that as given up.
                let _ = tx
                    .send(Job {
                        part,
                        read: read.clone(),
                        abandon: abandon.clone(),
                        reply,
                    })
                    .await;
                parts.push(done);
            }
            let ticket = Ticket {
                done: batch.offsets(),
                read,
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
            blocked.inc_by(sending.elapsed().as_secs_f64());
        }
        // Closing the stages' queues ends them once they have drained.
        drop(to_processors);
        drop(to_finisher);
        join_all(tasks).await;
    })
}

/// One processor: writes its parts in the order dispatched and hands them to its publisher.
async fn process(
    pipeline: Arc<Pipeline>,
    mut jobs: mpsc::Receiver<Job>,
    index: usize,
    to_publisher: mpsc::Sender<Publish>,
    unpublished: Arc<Unpublished>,
) {
    let busy = pipeline
        .metrics
        .processor_busy
        .with_label_values(&[&index.to_string()]);
    let m = &pipeline.metrics.stage_seconds;
    let (working, blocked) = (
        m.with_label_values(&["processors", "working"]),
        m.with_label_values(&["processors", "blocked"]),
    );
    let mut seq = 0;
    while let Some(job) = jobs.recv().await {
        // An abandoned batch's later parts are not applied either (see the module's doc).
        if job.abandon.load(Ordering::SeqCst) {
            let _ = job.reply.send(Err(GaveUp));
            continue;
        }
        let t = Instant::now();
        let written = pipeline
            .write_part(&job.part, &unpublished, &job.abandon, &job.read)
            .await;
        let took = t.elapsed().as_secs_f64();
        busy.inc_by(took);
        working.inc_by(took);
        match written {
            Err(gave_up) => {
                let _ = job.reply.send(Err(gave_up));
            }
            Ok(written) => {
                seq += 1;
                unpublished.hold(seq, written.outbox_customers());
                // A publisher that is gone drops the reply: the finisher sees that as given up.
                let t = Instant::now();
                let _ = to_publisher.send(Publish { job, written, seq }).await;
                blocked.inc_by(t.elapsed().as_secs_f64());
            }
        }
    }
}

/// One processor's publisher: publishes its written parts in order.
async fn publish(
    pipeline: Arc<Pipeline>,
    mut written: mpsc::Receiver<Publish>,
    unpublished: Arc<Unpublished>,
) {
    let working = pipeline
        .metrics
        .stage_seconds
        .with_label_values(&["publishers", "working"]);
    while let Some(Publish { job, written, seq }) = written.recv().await {
        let t = Instant::now();
        let done = pipeline
            .publish_part(&job.part, written, &job.abandon)
            .await;
        working.inc_by(t.elapsed().as_secs_f64());
        unpublished.release(seq);
        let _ = job.reply.send(done);
    }
}

/// The finisher: batches in the order read, each once all its parts are durable.
async fn finish(
    pipeline: Arc<Pipeline>,
    shared: Arc<Shared>,
    mut tickets: mpsc::Receiver<Ticket>,
    gate: mpsc::UnboundedSender<Held>,
) {
    let working = pipeline
        .metrics
        .stage_seconds
        .with_label_values(&["finisher", "working"]);
    while let Some(t) = tickets.recv().await {
        let mut parts = Vec::with_capacity(t.parts.len());
        let mut gave_up = false;
        for done in t.parts {
            match done.await {
                Ok(Ok(p)) => parts.push(p),
                _ => gave_up = true,
            }
        }
        let working_since = Instant::now();
        let applied = if gave_up {
            Err(GaveUp)
        } else {
            pipeline
                .finish(parts, t.dead_letters, &t.abandon, &t.read)
                .await
        };
        working.inc_by(working_since.elapsed().as_secs_f64());
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_held_customer_waits_for_the_last_part_holding_it() {
        let u = Unpublished::default();
        let (a, b, c) = (
            CustomerRef::new("t", "a"),
            CustomerRef::new("t", "b"),
            CustomerRef::new("t", "c"),
        );
        // Nothing held: everyone is free, nothing to wait for.
        assert_eq!(u.split(vec![&a, &b]), (vec![], vec![&a, &b], None));
        u.hold(1, [&a, &b].into_iter());
        u.hold(2, [&b].into_iter());
        assert_eq!(u.split(vec![&c, &b, &a]), (vec![&b, &a], vec![&c], Some(2)));

        // Part 1 published: a is free again, b still waits for part 2.
        u.release(1);
        assert_eq!(u.split(vec![&a, &b]), (vec![&b], vec![&a], Some(2)));
        let waiting = u.published_through(2);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "part 2 is not published yet"
        );
        u.release(2);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released once part 2 is published");
        assert_eq!(u.split(vec![&a, &b]), (vec![], vec![&a, &b], None));
    }
}
