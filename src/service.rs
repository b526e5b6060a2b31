//! `lapse run`: wires the adapters around the domain and runs until SIGTERM/SIGINT.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::codec::{self, DecodeLimits, Decoder, Encoder, RegistryClient, SchemaSet};
use crate::config::{ClockMode, Config};
use crate::dead_letters::DeadLetters;
use crate::domain::clock::Clock;
use crate::domain::clock::EventClock;
use crate::domain::engagement::Horizons;
use crate::domain::event::EventKind;
use crate::domain::policy::Policies;
use crate::domain::state::StateParams;
use crate::http::{self, AllowanceApi, HttpState};
use crate::kafka::admin;
use crate::kafka::consumer::{self, Batch, PollLoop, Shared};
use crate::kafka::offset_gate::{self, Held};
use crate::kafka::producer::OutputProducer;
use crate::metrics::Metrics;
use crate::outputs::{OutputFramings, OutputWriter};
use crate::pipeline::Pipeline;
use crate::retry::with_startup_retry;
use crate::state_write::{OutputSink, StateWriter};
use crate::store::durability::Durability;
use crate::store::event_time::SharedEventTime;
use crate::store::gauges::AllowanceGauges;
use crate::store::timers::TimerStore;
use crate::store::StateStore;
use crate::timer_loop::TimerLoop;
use crate::wall_clock::WallClock;

pub fn state_params(cfg: &Config) -> StateParams {
    StateParams {
        event_ids_per_customer: cfg.state.event_ids_per_customer,
        visit_history: cfg.state.visit_history,
        horizons: Horizons {
            short_half_life_ms: cfg.state.short_half_life.as_millis_i64(),
            long_half_life_ms: cfg.state.long_half_life.as_millis_i64(),
        },
    }
}

pub fn build_decoder(cfg: &Config) -> anyhow::Result<Decoder> {
    codec::set_allocation_limit(cfg.schema.avro_allocation_limit_bytes);
    let schemas = SchemaSet::load(&cfg.schema.dir).with_context(|| {
        format!(
            "loading schemas from {} (config key schema.dir)",
            cfg.schema.dir.display()
        )
    })?;
    let registry = match &cfg.schema.registry_url {
        Some(u) => Some(
            RegistryClient::new(u, cfg.schema.registry_timeout.0).context("schema.registry_url")?,
        ),
        None => None,
    };
    let limits = DecodeLimits {
        max_payload_bytes: cfg.schema.max_payload_bytes,
        max_future_skew_ms: cfg.schema.max_future_skew.as_millis_i64(),
        ..DecodeLimits::default()
    };
    Ok(Decoder::new(schemas, registry, limits))
}

/// Counts (and once logs) records framed with lapse 0.1's fingerprint.
fn observe_legacy_fingerprints(decoder: Decoder, accept: bool, metrics: &Metrics) -> Decoder {
    let counter = metrics.legacy_fingerprints.clone();
    let warned = AtomicBool::new(false);
    decoder.with_legacy_fingerprints(accept, move |kind| {
        counter.with_label_values(&[kind.label()]).inc();
        if !warned.swap(true, Ordering::Relaxed) {
            warn!(
                event_type = kind.label(),
                "a producer frames single-object records with lapse 0.1's non-standard fingerprint; \
                 accepted for now (schema.accept_legacy_fingerprints), migrate it to a standard Avro \
                 library (lapse_legacy_fingerprint_records_total counts such records)"
            );
        }
    })
}

/// Output framing, with Confluent schema ids registered or looked up at
/// start-up: an unreachable registry is retried, a refusal stops start-up.
async fn resolve_output_framings(
    cfg: &Config,
    decoder: &Decoder,
) -> anyhow::Result<OutputFramings> {
    let framing = cfg.output_framing();
    let what = "schema registry (output schemas)";
    let framings = with_startup_retry(what, STARTUP_WAIT, &cfg.retry, || async {
        match OutputFramings::resolve(
            framing,
            &cfg.kafka.topics,
            decoder.schemas(),
            decoder.registry(),
            cfg.outputs.register_schemas,
        )
        .await
        {
            Err(e @ codec::CodecError::RegistryUnreachable { .. }) => Err(anyhow::Error::new(e)),
            other => Ok(other),
        }
    })
    .await?
    .context("resolving the output schemas (config keys outputs.framing, outputs.register_schemas, schema.registry_url)")?;
    info!(?framings, "output framing");
    Ok(framings)
}

/// How long start-up waits for Redis, the broker and the schema registry.
const STARTUP_WAIT: Duration = Duration::from_secs(60);

/// `lapse run`, phase by phase: connect, build the adapters, serve HTTP,
/// consume until a signal, shut down.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Metrics::new(&cfg.metrics);
    // Schemas first: a wrong schema.dir fails at once, not after waiting for Redis.
    let decoder = Arc::new(observe_legacy_fingerprints(
        build_decoder(&cfg)?,
        cfg.schema.accept_legacy_fingerprints,
        &metrics,
    ));
    let connected = connect(&cfg, &metrics).await?;
    let app = build(&cfg, &metrics, decoder, &connected.store).await?;
    let ready = Arc::new(AtomicBool::new(false));
    spawn_http(
        &cfg,
        connected.listener,
        &connected.store,
        &app,
        ready.clone(),
    );
    spawn_readiness_probe(
        connected.store,
        app.producer.clone(),
        ready,
        metrics.clone(),
    );
    let shutdown = spawn_signal_watch();
    let running = consume(&cfg, &app, shutdown)?;
    stop(running, &app.producer).await
}

/// What start-up reached: the HTTP port and Redis.
struct Connected {
    listener: tokio::net::TcpListener,
    store: StateStore,
}

/// Binds the HTTP port, connects to Redis and creates the topics (the broker
/// and Redis are waited for up to a minute).
async fn connect(cfg: &Config, metrics: &Metrics) -> anyhow::Result<Connected> {
    let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (config key http.listen)",
                cfg.http.listen
            )
        })?;
    let store = with_startup_retry("redis", STARTUP_WAIT, &cfg.retry, || {
        let (rc, m) = (cfg.redis.clone(), metrics.clone());
        async move { Ok(StateStore::connect(&rc, m).await?) }
    })
    .await?;
    if cfg.kafka.create_topics {
        with_startup_retry(
            "kafka (creating topics)",
            STARTUP_WAIT,
            &cfg.retry,
            || async { Ok(admin::ensure_topics(&cfg.kafka).await?) },
        )
        .await?;
    }
    Ok(Connected { listener, store })
}

/// The adapters around the domain, wired.
struct App {
    producer: OutputProducer,
    /// The batch path; its state writer, timer store, policies and clocks are
    /// the timer loop's too.
    pipeline: Arc<Pipeline>,
}

/// Builds the producer and dead letters, the output framing (the registry is
/// waited for), the state writer, the timer store, the clocks and the batch
/// pipeline; starts the fleet gauge exporter.
async fn build(
    cfg: &Config,
    metrics: &Metrics,
    decoder: Arc<Decoder>,
    store: &StateStore,
) -> anyhow::Result<App> {
    let producer = OutputProducer::new(&cfg.kafka, metrics.clone())?;
    let dlq = DeadLetters::new(
        producer.clone(),
        cfg.kafka.topics.dlq.clone(),
        cfg.dlq.redact_reply_payloads,
    );
    let policies = Arc::new(
        Policies::new(&cfg.policy)
            .map_err(|(key, message)| crate::error::ConfigError::Invalid { key, message })?,
    );
    let outputs = OutputWriter {
        producer: producer.clone(),
        encoder: Encoder::new(decoder.schemas()),
        topics: cfg.kafka.topics.clone(),
        framings: resolve_output_framings(cfg, &decoder).await?,
    };
    let gauges = AllowanceGauges::new(store.conn(), &cfg.redis.key_prefix);
    spawn_gauge_exporter(
        gauges.clone(),
        metrics.clone(),
        cfg.metrics.fleet_gauge_refresh.0,
    );
    let writer = StateWriter {
        backend: Arc::new(store.clone()),
        sink: Arc::new(OutputSink {
            outputs,
            gauges,
            metrics: metrics.clone(),
        }),
        metrics: metrics.clone(),
    };
    let timers = TimerStore::new(
        store.conn(),
        cfg.redis.key_prefix.clone(),
        cfg.timers.shards,
    )
    .await?;
    let event_clock = match cfg.clock.mode {
        ClockMode::Event => Some((
            Arc::new(EventClock::new()),
            SharedEventTime::new(store.conn(), &cfg.redis.key_prefix),
        )),
        ClockMode::Wall => None,
    };
    let pipeline = Arc::new(Pipeline {
        policies,
        writer,
        timers,
        event_clock,
        decoder,
        dlq,
        metrics: metrics.clone(),
        params: state_params(cfg),
        clock: Arc::new(WallClock),
        retry: cfg.retry.clone(),
        store_chunks: cfg.batch.store_chunks,
        durability: Durability::new(&cfg.redis, store.conn(), metrics.clone()).await,
    });
    Ok(App { producer, pipeline })
}

/// The timer loop, over the batch path's state writer, timer store and clocks:
/// by event time (the shared watermark) in event-time mode, else by wall time.
fn timer_loop(cfg: &Config, p: &Pipeline, shutdown: Arc<AtomicBool>) -> TimerLoop {
    let clock: Arc<dyn Clock> = match &p.event_clock {
        Some((c, _)) => c.clone(),
        None => Arc::new(WallClock),
    };
    TimerLoop {
        writer: p.writer.clone(),
        timers: p.timers.clone(),
        policies: p.policies.clone(),
        params: p.params,
        metrics: p.metrics.clone(),
        retry: p.retry.clone(),
        clock,
        shared_clock: p.event_clock.clone(),
        cfg: cfg.timers.clone(),
        shutdown,
        durability: Some(p.durability.clone()),
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz`, `/v1/allowance` and `/v1/campaigns`.
fn spawn_http(
    cfg: &Config,
    listener: tokio::net::TcpListener,
    store: &StateStore,
    app: &App,
    ready: Arc<AtomicBool>,
) {
    let pipeline = &app.pipeline;
    let http_state = HttpState {
        metrics: pipeline.metrics.clone(),
        ready,
        allowance: Some(AllowanceApi {
            store: store.clone(),
            policies: pipeline.policies.clone(),
            params: pipeline.params,
            clock: pipeline.clock.clone(),
        }),
    };
    tokio::spawn(async move {
        if let Err(e) = http::serve(listener, http_state).await {
            error!(error = %e, "http server stopped");
        }
    });
    info!(listen = %cfg.http.listen, "serving /metrics, /healthz, /readyz, /v1/allowance");
}

/// Readiness: Redis answers PING and the broker answers a metadata request, every 2 s.
fn spawn_readiness_probe(
    store: StateStore,
    probe: OutputProducer,
    ready: Arc<AtomicBool>,
    metrics: Metrics,
) {
    tokio::spawn(async move {
        loop {
            let redis_ok = store.ping().await.is_ok();
            if !redis_ok {
                metrics.redis_errors.with_label_values(&["ping"]).inc();
            }
            let p = probe.clone();
            let broker_ok = tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                p.inner()
                    .client()
                    .fetch_metadata(None, Duration::from_secs(2))
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            if !broker_ok {
                metrics.kafka_errors.with_label_values(&["metadata"]).inc();
            }
            let ok = redis_ok && broker_ok;
            ready.store(ok, Ordering::SeqCst);
            metrics.ready.set(ok as i64);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

/// The shutdown flag, raised on SIGTERM or SIGINT.
fn spawn_signal_watch() -> Arc<AtomicBool> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let raise = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received");
        raise.store(true, Ordering::SeqCst);
    });
    shutdown
}

/// What runs until shutdown.
struct Running {
    poll_thread: std::thread::JoinHandle<()>,
    processor: tokio::task::JoinHandle<()>,
    timer_task: tokio::task::JoinHandle<()>,
}

/// Subscribes, then starts the batch processor, the timer loop and the poll
/// thread, all stopping on `shutdown`.
fn consume(cfg: &Config, app: &App, shutdown: Arc<AtomicBool>) -> anyhow::Result<Running> {
    let shared = Shared::new(app.pipeline.metrics.clone());
    let consumer = consumer::build(&cfg.kafka, shared.clone())?;
    let inputs = cfg.kafka.topics.inputs();
    consumer
        .subscribe(&inputs)
        .context("subscribing to the input topics (kafka.topics.*)")?;
    let topics: HashMap<String, EventKind> = inputs
        .iter()
        .zip(EventKind::ALL)
        .map(|(t, k)| (t.to_string(), k))
        .collect();

    let (tx, mut rx) = mpsc::channel::<Batch>(cfg.batch.queue_depth);
    let processor = {
        let (shared, pipeline) = (shared.clone(), app.pipeline.clone());
        let durability = &pipeline.durability;
        // Durable batches pass the offset gate (redis.durability) in order.
        let gate = offset_gate::spawn(
            durability.mode,
            durability.fsync_horizon,
            durability.epoch.clone(),
            shared.clone(),
            pipeline.metrics.clone(),
        );
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                let abandon = shared.start_batch();
                match pipeline.apply(&batch.records, &abandon).await {
                    Ok(applied) => {
                        let held = Held {
                            done: batch.offsets(),
                            epoch: applied.epoch,
                            acked_at: applied.acked_at,
                            abandon,
                        };
                        if let Err(lost) = gate.send(held) {
                            shared.finish_batch(&lost.0.abandon);
                        }
                    }
                    Err(_) => shared.finish_batch(&abandon),
                }
            }
        })
    };
    let timer_task = tokio::spawn(timer_loop(cfg, &app.pipeline, shutdown.clone()).run());
    let poll = PollLoop {
        consumer,
        shared,
        topics,
        batch: cfg.batch.clone(),
        commit_interval: cfg.kafka.commit_interval.0,
        shutdown_drain_timeout: cfg.kafka.shutdown_drain_timeout.0,
        tx,
        shutdown,
    };
    info!(group = %cfg.kafka.group_id, "consuming");
    let poll_thread = std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || poll.run())
        .context("spawning the poll thread")?;
    Ok(Running {
        poll_thread,
        processor,
        timer_task,
    })
}

/// Waits for the poll thread (it drains and commits), the processor and the
/// timer loop, then flushes the producer.
async fn stop(running: Running, producer: &OutputProducer) -> anyhow::Result<()> {
    let Running {
        poll_thread,
        processor,
        timer_task,
    } = running;
    tokio::task::spawn_blocking(move || poll_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the poll thread panicked"))?;
    let _ = processor.await;
    let _ = timer_task.await;
    if let Err(e) = producer.flush(Duration::from_secs(10)) {
        warn!(error = %e, "producer flush at shutdown failed");
    }
    info!("stopped cleanly");
    Ok(())
}

/// Exports the fleet-wide allowance gauges from Redis every `metrics.fleet_gauge_refresh`.
fn spawn_gauge_exporter(gauges: AllowanceGauges, metrics: Metrics, every: Duration) {
    tokio::spawn(async move {
        loop {
            match gauges.counts().await {
                Ok(counts) => {
                    for ((tenant, channel, state), n) in counts {
                        metrics
                            .customers_restricted
                            .with_label_values(&[
                                &metrics.tenant(&tenant),
                                channel.label(),
                                state.label(),
                            ])
                            .set(n as i64);
                    }
                }
                Err(e) => {
                    metrics.redis_errors.with_label_values(&["gauges"]).inc();
                    warn!(error = %e, "reading allowance gauges failed");
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
