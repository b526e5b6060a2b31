//! The one state-write step, for every keyed record (customer states on the
//! batch path and in the timer loop, campaign states on the batch path):
//!
//! 1. **load** the records (one round trip),
//! 2. **fold** each (the caller's [`Fold`]: pure domain), and run the caller's
//!    [`Fold::before_write`] (a hook before each round's compare-and-set; the
//!    batch path schedules its timers after the step instead: a timer written
//!    before its state could fire, find nothing and be dropped),
//! 3. **compare-and-set** the changed ones (one round trip, multi-key script
//!    calls),
//! 4. **retry conflicts**: a record another writer changed since the load is
//!    loaded and folded again, up to [`MAX_CAS_ROUNDS`] rounds, each conflict
//!    counted in `lapse_state_write_conflicts_total`; records still conflicting
//!    after that fail the step with [`StoreError::Contended`] (the caller
//!    retries with back-off; what did land is idempotent to re-apply),
//!
//! and, as a second call so that a caller can write several kinds of record (or
//! crash, in tests) before publishing, [`StateWriter::publish`]:
//!
//! 5. **publish** every outbox through the [`Sink`] and wait until durable,
//! 6. **clear** the published outboxes by compare-and-set at the revision
//!    written: a failed or lost clear only means the same decisions are
//!    published again later, as exact repeats (deterministic ids).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;
use tracing::{debug, error, warn};

use crate::domain::event::CustomerRef;
use crate::domain::output::Output;
use crate::error::{BatchError, StoreError};
use crate::metrics::Metrics;
use crate::outputs::OutputWriter;
use crate::store::gauges::{AllowanceGauges, Move};
use crate::store::record::{self, Backend, Record};

/// Load → fold → compare-and-set rounds before the step gives up with
/// [`StoreError::Contended`].
pub const MAX_CAS_ROUNDS: usize = 16;

/// What a caller does to each loaded record.
pub trait Fold<R: Record> {
    /// What the caller keeps about each record's fold (counts, timers, ...).
    type Extra: Send;

    /// Folds into `record` (as loaded: the default record at revision 0 when
    /// absent). Returns whether it changed (only changed records are written;
    /// an unchanged record's outbox is still published) and the extra. Called
    /// again, on the record as reloaded, after a conflict.
    fn fold(&mut self, id: &R::Id, record: &mut R) -> (bool, Self::Extra);

    /// Runs after each round's folds, before their compare-and-set.
    fn before_write<'f>(
        &'f self,
        _folded: &'f [Folded<'f, R, Self::Extra>],
    ) -> BoxFuture<'f, Result<(), BatchError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A record folded, before its write.
pub struct Folded<'a, R: Record, X> {
    pub id: &'a R::Id,
    /// The revision loaded.
    pub rev: u64,
    /// Boxed: a customer state is ~2.4 KB, and moving it between the step's
    /// vectors was most of lapse's `memcpy` time.
    pub record: Box<R>,
    pub changed: bool,
    pub extra: X,
}

/// A record as now stored: written by the step, or unchanged and left as it was.
pub struct Stored<'a, R: Record, X> {
    pub id: &'a R::Id,
    /// The revision now stored.
    pub rev: u64,
    pub record: Box<R>,
    /// Whether the step wrote it.
    pub written: bool,
    pub extra: X,
}

/// The outputs of one record's outbox, to publish.
pub struct Outbound<'a> {
    /// Whose outbox this is, when it is a customer's.
    pub customer: Option<&'a CustomerRef>,
    pub outputs: Cow<'a, [Output]>,
}

/// Where outboxes are published.
pub trait Sink: Send + Sync {
    /// Publishes every output and returns once all are durable. An error leaves
    /// the outboxes in place, to be published again.
    fn send<'s>(&'s self, outbound: &'s [Outbound<'s>]) -> BoxFuture<'s, Result<(), BatchError>>;
}

/// The step, over a backend and a sink. Cheap to clone.
#[derive(Clone)]
pub struct StateWriter {
    pub backend: Arc<dyn Backend>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Metrics,
}

impl StateWriter {
    /// Steps 1–4 for the records `ids` (distinct). Returns every record as now
    /// stored, in the order their writes landed (by round, then as given).
    pub async fn write<'a, R, F>(
        &self,
        ids: Vec<&'a R::Id>,
        fold: &mut F,
    ) -> Result<Vec<Stored<'a, R, F::Extra>>, BatchError>
    where
        R: Record,
        F: Fold<R>,
    {
        let mut pending = ids;
        let mut stored = Vec::with_capacity(pending.len());
        for _round in 0..MAX_CAS_ROUNDS {
            if pending.is_empty() {
                break;
            }
            let loaded = record::load::<R, _>(&*self.backend, &pending).await?;
            let folded: Vec<Folded<'a, R, F::Extra>> = pending
                .iter()
                .zip(loaded)
                .map(|(&id, (rev, mut record))| {
                    let (changed, extra) = fold.fold(id, &mut record);
                    Folded {
                        id,
                        rev,
                        record,
                        changed,
                        extra,
                    }
                })
                .collect();
            fold.before_write(&folded).await?;
            let writes: Vec<(&R::Id, u64, &R)> = folded
                .iter()
                .filter(|f| f.changed)
                .map(|f| (f.id, f.rev, &*f.record))
                .collect();
            let mut landed = record::save(&*self.backend, &writes).await?.into_iter();
            let mut conflicted = Vec::new();
            for f in folded {
                if f.changed && !landed.next().unwrap_or(false) {
                    conflicted.push(f.id);
                    continue;
                }
                stored.push(Stored {
                    id: f.id,
                    rev: if f.changed { f.rev + 1 } else { f.rev },
                    record: f.record,
                    written: f.changed,
                    extra: f.extra,
                });
            }
            if !conflicted.is_empty() {
                self.metrics.cas_conflicts.inc_by(conflicted.len() as u64);
            }
            pending = conflicted;
        }
        if pending.is_empty() {
            Ok(stored)
        } else {
            Err(StoreError::Contended {
                records: pending.len(),
            }
            .into())
        }
    }

    /// Steps 5–6: publishes the outboxes of `stored` (records written or loaded
    /// by [`StateWriter::write`]), then clears them.
    pub async fn publish<R: Record, X>(
        &self,
        stored: &[Stored<'_, R, X>],
    ) -> Result<(), BatchError> {
        let with_outbox: Vec<&Stored<'_, R, X>> = stored
            .iter()
            .filter(|s| !s.record.outbox_is_empty())
            .collect();
        if with_outbox.is_empty() {
            return Ok(());
        }
        let outbound: Vec<Outbound<'_>> = with_outbox
            .iter()
            .map(|s| Outbound {
                customer: R::customer(s.id),
                outputs: s.record.outbox(),
            })
            .collect();
        if let Err(e) = self.sink.send(&outbound).await {
            // Some copies may have landed (the sink returns once every output
            // has landed or failed for good), after a newer decision another
            // writer published meanwhile: the same check as after a lost
            // clear, best effort (the error is what the caller acts on).
            let ours = published_by(with_outbox.iter().copied());
            if let Err(again) = self.republish_newest::<R>(ours).await {
                debug!(error = %again, "re-publishing the newest decisions after a failed publish failed too");
            }
            return Err(e);
        }
        let cleared: Vec<R> = with_outbox
            .iter()
            .map(|s| {
                let mut r = (*s.record).clone();
                r.clear_outbox();
                r
            })
            .collect();
        let writes: Vec<(&R::Id, u64, &R)> = with_outbox
            .iter()
            .zip(&cleared)
            .map(|(s, r)| (s.id, s.rev, r))
            .collect();
        let landed = match record::save(&*self.backend, &writes).await {
            Ok(landed) => landed,
            Err(e) => {
                debug!(error = %e, "clearing outboxes failed; they are re-published as exact repeats");
                return Ok(());
            }
        };
        // A clear that did not land: another writer wrote the record after
        // this one, and may have published a newer decision before this
        // writer's older copy landed.
        let overtaken = published_by(
            with_outbox
                .iter()
                .zip(landed)
                .filter(|(_, landed)| !landed)
                .map(|(s, _)| *s),
        );
        self.republish_newest::<R>(overtaken).await
    }

    /// Keeps the newest decision last on each output key this writer published
    /// to: while the record's newest decision under a key differs from the one
    /// this writer published last, publishes the newest again (an exact
    /// repeat). Whatever is decided after the check is written after it, so
    /// its writer publishes it after this writer's copies have landed.
    async fn republish_newest<R: Record>(
        &self,
        mut pending: Vec<(&R::Id, Published)>,
    ) -> Result<(), BatchError> {
        for _round in 0..MAX_CAS_ROUNDS {
            if pending.is_empty() {
                return Ok(());
            }
            let ids: Vec<&R::Id> = pending.iter().map(|(id, _)| *id).collect();
            let loaded = record::load::<R, _>(&*self.backend, &ids).await?;
            let mut again = Vec::new();
            for ((id, mut ours), (_, record)) in pending.into_iter().zip(loaded) {
                let mut newer = Vec::new();
                for d in record.latest_decisions(id) {
                    if let Some(mine) = ours.get_mut(&d.key()) {
                        if *mine != d.decision_id {
                            mine.clone_from(&d.decision_id);
                            newer.push(Output::Throttle(Box::new(d)));
                        }
                    }
                }
                if !newer.is_empty() {
                    again.push((id, ours, newer));
                }
            }
            let outbound: Vec<Outbound<'_>> = again
                .iter()
                .map(|(id, _, newer)| Outbound {
                    customer: R::customer(id),
                    outputs: Cow::Borrowed(newer.as_slice()),
                })
                .collect();
            if !outbound.is_empty() {
                self.sink.send(&outbound).await?;
                let n: usize = again.iter().map(|(_, _, newer)| newer.len()).sum();
                self.metrics.decisions_republished.inc_by(n as u64);
            }
            pending = again.into_iter().map(|(id, ours, _)| (id, ours)).collect();
        }
        warn!(
            records = pending.len(),
            "newer decisions kept coming while re-publishing the newest; the next write of these records publishes again"
        );
        Ok(())
    }
}

/// Decision id published last under each output key of a latest-wins topic.
type Published = HashMap<String, String>;

/// Per record, what its outbox published last under each key (records
/// whose outbox held no such decision left out).
fn published_by<'a, 'b: 'a, R: Record, X: 'a>(
    records: impl Iterator<Item = &'a Stored<'b, R, X>>,
) -> Vec<(&'b R::Id, Published)> {
    records
        .map(|s| {
            let ours: Published = s
                .record
                .outbox()
                .iter()
                .filter_map(|o| match o {
                    Output::Throttle(d) => Some((d.key(), d.decision_id.clone())),
                    _ => None,
                })
                .collect();
            (s.id, ours)
        })
        .filter(|(_, ours)| !ours.is_empty())
        .collect()
}

/// The production sink: encodes the outputs, produces them to their topics and
/// waits for every acknowledgement, counts them, and moves the fleet-wide
/// allowance gauges for published customer decisions.
pub struct OutputSink {
    pub outputs: OutputWriter,
    pub gauges: AllowanceGauges,
    pub metrics: Metrics,
}

impl OutputSink {
    async fn publish(&self, outbound: &[Outbound<'_>]) -> Result<(), BatchError> {
        let mut encoded = Vec::new();
        let mut moves = Vec::new();
        for ob in outbound {
            for o in ob.outputs.iter() {
                match self.outputs.encode(o) {
                    Ok(e) => encoded.push(e),
                    // A bug, not an outage: never retry it forever; say so loudly.
                    Err(e) => error!(error = %e, "cannot encode an output; it is dropped"),
                }
                if let (Some(c), Output::Throttle(d)) = (ob.customer, o) {
                    if let (Some(ch), Some(from)) = (d.channel, d.previous) {
                        moves.push(Move {
                            customer: c.clone(),
                            channel: ch,
                            from,
                            to: d.state,
                        });
                    }
                }
            }
        }
        let started = Instant::now();
        self.outputs.produce(&encoded).await?;
        self.metrics
            .output_seconds
            .observe(started.elapsed().as_secs_f64());
        for e in &encoded {
            self.metrics.outputs.with_label_values(&[e.kind]).inc();
        }
        for ob in outbound {
            for o in ob.outputs.iter() {
                if let Output::Outcome(o) = o {
                    self.metrics.count_outcome(o);
                }
            }
        }
        if let Err(e) = self.gauges.apply(&moves).await {
            self.metrics
                .redis_errors
                .with_label_values(&["gauges"])
                .inc();
            return Err(e.into());
        }
        Ok(())
    }
}

impl Sink for OutputSink {
    fn send<'s>(&'s self, outbound: &'s [Outbound<'s>]) -> BoxFuture<'s, Result<(), BatchError>> {
        Box::pin(self.publish(outbound))
    }
}

/// A sink that keeps what it is sent (tests, tools without a broker).
#[derive(Default)]
pub struct MemorySink {
    sent: Mutex<Vec<(Option<CustomerRef>, Output)>>,
}

impl MemorySink {
    /// Every output sent so far, with its customer, in order.
    pub fn sent(&self) -> Vec<(Option<CustomerRef>, Output)> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Sink for MemorySink {
    fn send<'s>(&'s self, outbound: &'s [Outbound<'s>]) -> BoxFuture<'s, Result<(), BatchError>> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        for ob in outbound {
            for o in ob.outputs.iter() {
                sent.push((ob.customer.cloned(), o.clone()));
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::config::MetricsConfig;
    use crate::domain::allowance::{AllowanceState, ThrottleDecision};
    use crate::domain::campaign::CampaignState;
    use crate::domain::event::{Channel, Event, EventBody, Purpose, ReplyClass};
    use crate::domain::policy::PolicyConfig;
    use crate::domain::state::{CustomerState, Source, StateParams};
    use crate::domain::step;
    use crate::store::record::CampaignId;
    use crate::store::MemoryBackend;

    fn setup() -> (MemoryBackend, Arc<MemorySink>, StateWriter) {
        let backend = MemoryBackend::new("lapse");
        let sink = Arc::new(MemorySink::default());
        let writer = StateWriter {
            backend: Arc::new(backend.clone()),
            sink: sink.clone(),
            metrics: Metrics::new(&MetricsConfig::default()),
        };
        (backend, sink, writer)
    }

    fn decision(id: &str) -> ThrottleDecision {
        ThrottleDecision {
            decision_id: id.into(),
            tenant_id: "brandA".into(),
            customer_id: Some("c1".into()),
            channel: Some(Channel::Sms),
            campaign_id: None,
            state: AllowanceState::Capped,
            reason: "cap".into(),
            allowed_from: Some(2_000),
            cap: Some(2),
            window_ms: Some(1_000),
            short_click_rate: None,
            baseline_click_rate: None,
            sends_in_window: 2,
            decided_at: 1_000,
            cause_event_id: None,
            previous: Some(AllowanceState::Open),
        }
    }

    fn due(st: &CustomerState) -> i64 {
        st.timer_due.unwrap_or(0)
    }

    /// Adds 1 to `timer_due` (a stand-in for folding an event) and, for the
    /// customers in `contended`, has another writer change the record between
    /// this load and the compare-and-set (adding 100) on each of the first
    /// `interfere` folds.
    struct Bump {
        backend: MemoryBackend,
        contended: HashSet<CustomerRef>,
        interfere: usize,
        folds: usize,
        /// Put in the outbox by the fold, when set.
        emit: Option<Output>,
    }

    impl Bump {
        fn new(backend: &MemoryBackend) -> Bump {
            Bump {
                backend: backend.clone(),
                contended: HashSet::new(),
                interfere: 0,
                folds: 0,
                emit: None,
            }
        }
    }

    impl Fold<CustomerState> for Bump {
        type Extra = usize;
        fn fold(&mut self, id: &CustomerRef, st: &mut CustomerState) -> (bool, usize) {
            self.folds += 1;
            if self.contended.contains(id) && self.interfere > 0 {
                self.interfere -= 1;
                let mut theirs = st.clone();
                theirs.timer_due = Some(due(st) + 100);
                self.backend.put(id, &theirs);
            }
            st.timer_due = Some(due(st) + 1);
            if let Some(o) = self.emit.take() {
                st.outbox.push(o);
            }
            (true, self.folds)
        }
    }

    #[tokio::test]
    async fn a_conflicting_writer_between_load_and_write_forces_a_re_fold() {
        let (backend, _, writer) = setup();
        let (c1, c2) = (
            CustomerRef::new("brandA", "c1"),
            CustomerRef::new("brandA", "c2"),
        );
        backend.put(
            &c1,
            &CustomerState {
                timer_due: Some(10),
                ..CustomerState::default()
            },
        );
        let mut fold = Bump::new(&backend);
        fold.contended.insert(c1.clone());
        fold.interfere = 1;
        let stored = writer.write(vec![&c1, &c2], &mut fold).await.unwrap();

        // c2 landed in the first round, c1 after reloading the other writer's
        // change: both writes kept (10 + 100 by them, + 1 by us).
        assert_eq!(fold.folds, 3);
        let got: Vec<(&CustomerRef, u64, i64, usize)> = stored
            .iter()
            .map(|s| (s.id, s.rev, due(&s.record), s.extra))
            .collect();
        assert_eq!(got, [(&c2, 1, 1, 2), (&c1, 3, 111, 3)]);
        assert!(stored.iter().all(|s| s.written));
        let (rev, st) = backend.get::<CustomerState>(&c1).unwrap();
        assert_eq!((rev, due(&st)), (3, 111));
        assert_eq!(writer.metrics.cas_conflicts.get(), 1);
    }

    #[tokio::test]
    async fn running_out_of_rounds_is_contended_and_counted_each_round() {
        let (backend, _, writer) = setup();
        let (c1, c2) = (
            CustomerRef::new("brandA", "c1"),
            CustomerRef::new("brandA", "c2"),
        );
        let mut fold = Bump::new(&backend);
        fold.contended.insert(c1.clone());
        fold.interfere = usize::MAX;
        let err = writer.write(vec![&c1, &c2], &mut fold).await.err();
        assert!(
            matches!(
                err,
                Some(BatchError::Store(StoreError::Contended { records: 1 }))
            ),
            "{err:?}"
        );
        assert_eq!(fold.folds, MAX_CAS_ROUNDS + 1);
        assert_eq!(writer.metrics.cas_conflicts.get(), MAX_CAS_ROUNDS as u64);
        // What landed stays (re-applying it is idempotent); the contended
        // record holds only the other writer's changes.
        assert_eq!(backend.get::<CustomerState>(&c2).unwrap().0, 1);
        let (rev, st) = backend.get::<CustomerState>(&c1).unwrap();
        assert_eq!((rev, due(&st)), (MAX_CAS_ROUNDS as u64, 1_600));
    }

    #[tokio::test]
    async fn an_outbox_is_published_once_then_cleared() {
        let (backend, sink, writer) = setup();
        let c1 = CustomerRef::new("brandA", "c1");
        let out = Output::Throttle(Box::new(decision("d1")));
        let mut fold = Bump::new(&backend);
        fold.emit = Some(out.clone());
        let stored = writer.write(vec![&c1], &mut fold).await.unwrap();
        assert_eq!(
            backend.get::<CustomerState>(&c1).unwrap().1.outbox,
            std::slice::from_ref(&out)
        );
        writer.publish(&stored).await.unwrap();
        assert_eq!(sink.sent(), [(Some(c1.clone()), out.clone())]);
        let (rev, st) = backend.get::<CustomerState>(&c1).unwrap();
        assert_eq!((rev, st.outbox.len(), due(&st)), (2, 0, 1));

        // The next write finds an empty outbox: nothing more is published.
        let stored = writer
            .write(vec![&c1], &mut Bump::new(&backend))
            .await
            .unwrap();
        writer.publish(&stored).await.unwrap();
        assert_eq!(sink.sent().len(), 1);
        assert_eq!(backend.get::<CustomerState>(&c1).unwrap().0, 3);
    }

    /// A fold that changes nothing.
    struct Nothing;
    impl<R: Record> Fold<R> for Nothing {
        type Extra = ();
        fn fold(&mut self, _: &R::Id, _: &mut R) -> (bool, ()) {
            (false, ())
        }
    }

    #[tokio::test]
    async fn an_outbox_left_by_a_crash_is_published_by_the_next_write_and_a_lost_clear_repeats_it()
    {
        let (backend, sink, writer) = setup();
        let c1 = CustomerRef::new("brandA", "c1");
        let out = Output::Throttle(Box::new(decision("d1")));
        // Written, then the process died before publishing.
        let crashed = CustomerState {
            outbox: vec![out.clone()],
            ..CustomerState::default()
        };
        backend.put(&c1, &crashed);
        let stored = writer
            .write::<CustomerState, _>(vec![&c1], &mut Nothing)
            .await
            .unwrap();
        assert!(!stored[0].written, "nothing changed: no write");
        // Another writer changes the customer before the clear: the clear is
        // lost, the outbox stays and is published again, the same decision.
        backend.put(&c1, &crashed);
        writer.publish(&stored).await.unwrap();
        assert_eq!(backend.get::<CustomerState>(&c1).unwrap().1.outbox.len(), 1);
        let stored = writer
            .write::<CustomerState, _>(vec![&c1], &mut Nothing)
            .await
            .unwrap();
        writer.publish(&stored).await.unwrap();
        assert_eq!(
            sink.sent(),
            [(Some(c1.clone()), out.clone()), (Some(c1.clone()), out)]
        );
        let (rev, st) = backend.get::<CustomerState>(&c1).unwrap();
        assert_eq!((rev, st.outbox.len()), (3, 0));
    }

    /// Schedules (here: notes the revision stored at that moment) before the
    /// write; fails when told to.
    struct ScheduleFirst {
        inner: Bump,
        fail: bool,
        seen: Mutex<Vec<u64>>,
    }

    impl Fold<CustomerState> for ScheduleFirst {
        type Extra = usize;
        fn fold(&mut self, id: &CustomerRef, st: &mut CustomerState) -> (bool, usize) {
            self.inner.fold(id, st)
        }
        fn before_write<'f>(
            &'f self,
            folded: &'f [Folded<'f, CustomerState, usize>],
        ) -> BoxFuture<'f, Result<(), BatchError>> {
            Box::pin(async move {
                for f in folded {
                    let rev = self
                        .inner
                        .backend
                        .get::<CustomerState>(f.id)
                        .map_or(0, |s| s.0);
                    self.seen.lock().unwrap().push(rev);
                }
                if self.fail {
                    return Err(StoreError::Contended { records: 0 }.into());
                }
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn before_write_runs_before_every_compare_and_set_and_can_stop_it() {
        let (backend, _, writer) = setup();
        let c1 = CustomerRef::new("brandA", "c1");
        let mut fold = ScheduleFirst {
            inner: Bump::new(&backend),
            fail: false,
            seen: Mutex::default(),
        };
        fold.inner.contended.insert(c1.clone());
        fold.inner.interfere = 1;
        writer.write(vec![&c1], &mut fold).await.unwrap();
        // Round 1 saw the other writer's revision 1, round 2 the same (our
        // write had not happened yet either time).
        assert_eq!(*fold.seen.lock().unwrap(), [1, 1]);
        assert_eq!(backend.get::<CustomerState>(&c1).unwrap().0, 2);

        fold.fail = true;
        assert!(writer.write(vec![&c1], &mut fold).await.is_err());
        assert_eq!(backend.get::<CustomerState>(&c1).unwrap().0, 2, "no write");
    }

    /// Campaign states go through the same step: a decision of a campaign is
    /// published with no customer (no allowance gauge moves) and cleared.
    #[tokio::test]
    async fn campaign_records_use_the_same_step() {
        let (backend, sink, writer) = setup();
        let id: CampaignId = ("brandA".into(), "spring".into());
        struct Decide(ThrottleDecision);
        impl Fold<CampaignState> for Decide {
            type Extra = ();
            fn fold(&mut self, _: &CampaignId, st: &mut CampaignState) -> (bool, ()) {
                st.total_sends += 1;
                st.outbox.push(self.0.clone());
                (true, ())
            }
        }
        let d = decision("campaign-d1");
        let stored = writer
            .write(vec![&id], &mut Decide(d.clone()))
            .await
            .unwrap();
        writer.publish(&stored).await.unwrap();
        assert_eq!(sink.sent(), [(None, Output::Throttle(Box::new(d)))]);
        let (rev, st) = backend.get::<CampaignState>(&id).unwrap();
        assert_eq!((rev, st.total_sends, st.outbox.len()), (2, 1, 0));
    }

    /// Folds events through the domain (as the batch path does).
    struct Apply(Vec<Event>);

    impl Fold<CustomerState> for Apply {
        type Extra = ();
        fn fold(&mut self, _: &CustomerRef, st: &mut CustomerState) -> (bool, ()) {
            let policy = PolicyConfig::default().resolve(None).unwrap();
            let params = StateParams::default();
            for (i, ev) in self.0.iter().enumerate() {
                let src = Source {
                    kind: ev.kind(),
                    partition: 0,
                    offset: i as i64,
                };
                step::on_record(st, ev, src, &policy, &params);
            }
            (true, ())
        }
    }

    fn sms(id: &str, at: i64, body: EventBody) -> Event {
        Event {
            event_id: id.into(),
            customer: CustomerRef::new("brandA", "c1"),
            occurred_at: at,
            body,
        }
    }

    fn marketing_sms(id: &str, at: i64) -> Event {
        sms(
            id,
            at,
            EventBody::Send {
                channel: Channel::Sms,
                message_id: id.into(),
                campaign_id: None,
                purpose: Purpose::Marketing,
                cost: None,
            },
        )
    }

    fn last_on_key(sent: &[(Option<CustomerRef>, Output)], key: &str) -> ThrottleDecision {
        sent.iter()
            .rev()
            .find_map(|(_, o)| match o {
                Output::Throttle(d) if d.key() == key => Some((**d).clone()),
                _ => None,
            })
            .unwrap()
    }

    fn states(sent: &[(Option<CustomerRef>, Output)]) -> Vec<AllowanceState> {
        sent.iter()
            .map(|(_, o)| match o {
                Output::Throttle(d) => d.state,
                _ => unreachable!(),
            })
            .collect()
    }

    /// Writer `a` fills c1's SMS cap (CAPPED: written, not yet published);
    /// writer `b` folds an unsubscribe reply onto a's record (SUPPRESSED) and
    /// publishes both decisions. Returns what `a` stored, to publish late.
    async fn overtake<'c>(
        a: &StateWriter,
        b: &StateWriter,
        c1: &'c CustomerRef,
    ) -> Vec<Stored<'c, CustomerState, ()>> {
        let day = 86_400_000;
        let mut caps = Apply(vec![
            marketing_sms("s1", 10 * day),
            marketing_sms("s2", 10 * day + 1),
        ]);
        let stored_a = a.write(vec![c1], &mut caps).await.unwrap();
        let mut stop = Apply(vec![sms(
            "r1",
            10 * day + 2,
            EventBody::Reply {
                channel: Channel::Sms,
                message_id: None,
                class: ReplyClass::Unsubscribe,
            },
        )]);
        let stored_b = b.write(vec![c1], &mut stop).await.unwrap();
        b.publish(&stored_b).await.unwrap();
        stored_a
    }

    #[tokio::test]
    async fn a_publisher_overtaken_by_a_newer_decision_publishes_the_newest_again() {
        let (_, sink, a) = setup();
        let b = StateWriter {
            metrics: Metrics::new(&MetricsConfig::default()),
            ..a.clone()
        };
        let c1 = CustomerRef::new("brandA", "c1");
        let stored_a = overtake(&a, &b, &c1).await;
        let newest = last_on_key(&sink.sent(), "brandA/c1/SMS");
        assert_eq!(newest.state, AllowanceState::Suppressed);
        assert_eq!(sink.sent().len(), 2);

        // a's copy lands last: without more, the key would end CAPPED.
        a.publish(&stored_a).await.unwrap();
        let sent = sink.sent();
        use AllowanceState::{Capped, Suppressed};
        assert_eq!(states(&sent), [Capped, Suppressed, Capped, Suppressed]);
        // The newest again, exactly as b published it (bar the unpublished
        // `previous`, which moves no gauge a second time).
        let again = last_on_key(&sent, "brandA/c1/SMS");
        assert_eq!(
            ThrottleDecision {
                previous: None,
                ..newest
            },
            again
        );
        assert_eq!(a.metrics.decisions_republished.get(), 1);
        assert_eq!(b.metrics.decisions_republished.get(), 0);
    }

    #[tokio::test]
    async fn a_stored_last_decision_round_trips_the_store_as_published() {
        let (backend, sink, writer) = setup();
        let c1 = CustomerRef::new("brandA", "c1");
        let mut caps = Apply(vec![marketing_sms("s1", 1_000), marketing_sms("s2", 2_000)]);
        let stored = writer.write(vec![&c1], &mut caps).await.unwrap();
        writer.publish(&stored).await.unwrap();
        let (_, st) = backend.get::<CustomerState>(&c1).unwrap();
        let Output::Throttle(published) = &sink.sent()[0].1 else {
            panic!("a throttle decision")
        };
        assert_eq!(
            st.latest_decisions(&c1),
            [ThrottleDecision {
                previous: None,
                ..(**published).clone()
            }]
        );
    }

    /// Lands every output in `inner`, then fails the first call (a publish
    /// whose outputs landed while the producer reported an error).
    struct LandsThenFailsOnce {
        inner: Arc<MemorySink>,
        failed: std::sync::atomic::AtomicBool,
    }

    impl Sink for LandsThenFailsOnce {
        fn send<'s>(
            &'s self,
            outbound: &'s [Outbound<'s>],
        ) -> BoxFuture<'s, Result<(), BatchError>> {
            Box::pin(async move {
                self.inner.send(outbound).await?;
                if self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(crate::error::KafkaError::from(rdkafka::error::KafkaError::Canceled).into())
                }
            })
        }
    }

    #[tokio::test]
    async fn a_failed_publish_whose_copies_landed_after_a_newer_decision_publishes_the_newest_again(
    ) {
        let (_, sink, b) = setup();
        let a = StateWriter {
            sink: Arc::new(LandsThenFailsOnce {
                inner: sink.clone(),
                failed: false.into(),
            }),
            metrics: Metrics::new(&MetricsConfig::default()),
            ..b.clone()
        };
        let c1 = CustomerRef::new("brandA", "c1");
        let stored_a = overtake(&a, &b, &c1).await;
        // a's copy lands, then its producer reports an error: still an error
        // for the caller, and the newest is last on the key.
        assert!(a.publish(&stored_a).await.is_err());
        use AllowanceState::{Capped, Suppressed};
        assert_eq!(
            states(&sink.sent()),
            [Capped, Suppressed, Capped, Suppressed]
        );
        assert_eq!(a.metrics.decisions_republished.get(), 1);
    }
}
