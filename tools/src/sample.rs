//! `lapse-tools produce-sample`: a small, deterministic set of events of all six kinds,
//! Avro single-object encoded, for the demo and for trying lapse by hand.
//! (The full population simulator is `lapse-tools simulate`.)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::future::try_join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use lapse::codec::{Encoder, Framing, SchemaSet};
use lapse::config::Config;
use lapse::domain::event::{
    Channel, CustomerRef, Event, EventBody, EventKind, FeedbackKind, Purpose, VisitType,
    INPUT_KINDS,
};

#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Customers per tenant.
    #[arg(long, default_value_t = 20)]
    pub customers: usize,
    /// Tenants (clinic brands).
    #[arg(long, default_value_t = 2)]
    pub tenants: usize,
    /// Days of history to generate, ending now.
    #[arg(long, default_value_t = 180)]
    pub days: i64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

const TREATMENTS: &[&str] = &["BOTOX", "FILLER", "LASER", "SKIN_CARE"];
const REPLIES: &[&str] = &["好的，想预约下周", "谢谢", "TD", "多少钱？", "收到"];

/// A generated event with its reply text (replies only) — text lives only until encoded.
pub struct Sample {
    pub event: Event,
    pub text: Option<&'static str>,
}

/// Deterministic sample events for `args`, in time order.
pub fn generate(args: &SampleArgs, now_ms: i64) -> Vec<Sample> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut satisfaction = StdRng::seed_from_u64(args.seed ^ 0xfeed_bacc);
    let day = 86_400_000i64;
    let start = now_ms - args.days * day;
    let mut out = Vec::new();
    let mut n = 0u64;
    let mut id = |prefix: &str| {
        n += 1;
        format!("{prefix}-{}-{n}", args.seed)
    };
    for t in 0..args.tenants {
        let tenant = format!("clinic-{}", t + 1);
        for c in 0..args.customers {
            let customer = CustomerRef::new(tenant.clone(), format!("cust-{:05}", c + 1));
            let treatment = TREATMENTS[rng.random_range(0..TREATMENTS.len())];
            let cadence = match treatment {
                "BOTOX" => 120,
                "FILLER" => 270,
                _ => 30,
            } * day;
            let mut at = start + rng.random_range(0..cadence.min(args.days * day).max(1));
            while at < now_ms - day {
                let visit_id = id("visit");
                // Its own random stream, so the other events stay as they were.
                if satisfaction.random_bool(0.4) {
                    let score = satisfaction.random_range(0..=10);
                    out.push(Sample {
                        event: Event {
                            event_id: format!("{visit_id}-feedback"),
                            customer: customer.clone(),
                            occurred_at: at + 2 * 3_600_000,
                            body: EventBody::Feedback {
                                kind: FeedbackKind::Nps,
                                score,
                                visit_event_id: Some(visit_id.clone()),
                                channel: Some(Channel::Wechat),
                            },
                        },
                        text: None,
                    });
                }
                out.push(Sample {
                    event: Event {
                        event_id: visit_id,
                        customer: customer.clone(),
                        occurred_at: at,
                        body: EventBody::Visit {
                            visit_type: VisitType::Treatment,
                            treatment: Some(treatment.into()),
                            amount: rng.random_range(50_000..800_000),
                            currency: "CNY".into(),
                            offer_code: None,
                            discount: None,
                        },
                    },
                    text: None,
                });
                at += cadence + rng.random_range(-(cadence / 5)..=(cadence / 5));
            }
            let channel = Channel::ALL[rng.random_range(0..Channel::ALL.len())];
            for s in 0..rng.random_range(2..8) {
                let sent = start + rng.random_range(0..args.days * day);
                let message_id = format!("msg-{}-{}-{s}", customer.customer, args.seed);
                let campaign = Some(format!("camp-{}", s % 3));
                let purpose = if s % 4 == 0 {
                    Purpose::Service
                } else {
                    Purpose::Marketing
                };
                out.push(Sample {
                    event: Event {
                        event_id: id("send"),
                        customer: customer.clone(),
                        occurred_at: sent,
                        body: EventBody::Send {
                            channel,
                            message_id: message_id.clone(),
                            campaign_id: campaign.clone(),
                            purpose,
                            cost: None,
                        },
                    },
                    text: None,
                });
                if rng.random_bool(0.6) {
                    out.push(Sample {
                        event: Event {
                            event_id: id("open"),
                            customer: customer.clone(),
                            occurred_at: sent + rng.random_range(60_000..3_600_000),
                            body: EventBody::Open {
                                channel,
                                message_id: message_id.clone(),
                                campaign_id: campaign.clone(),
                            },
                        },
                        text: None,
                    });
                    if rng.random_bool(0.4) {
                        out.push(Sample {
                            event: Event {
                                event_id: id("click"),
                                customer: customer.clone(),
                                occurred_at: sent + rng.random_range(3_600_000..7_200_000),
                                body: EventBody::Click {
                                    channel,
                                    message_id: message_id.clone(),
                                    campaign_id: campaign.clone(),
                                },
                            },
                            text: None,
                        });
                    }
                }
                if rng.random_bool(0.1) {
                    out.push(Sample {
                        event: Event {
                            event_id: id("reply"),
                            customer: customer.clone(),
                            occurred_at: sent + rng.random_range(60_000..86_400_000),
                            body: EventBody::Reply {
                                channel,
                                message_id: Some(message_id),
                                class: lapse::domain::event::ReplyClass::Neutral,
                            },
                        },
                        text: Some(REPLIES[rng.random_range(0..REPLIES.len())]),
                    });
                }
            }
        }
    }
    out.retain(|s| s.event.occurred_at < now_ms);
    out.sort_by_key(|s| s.event.occurred_at);
    out
}

pub async fn produce(cfg: &Config, args: &SampleArgs) -> anyhow::Result<()> {
    let schemas = SchemaSet::load(&cfg.schema.dir).context("schema.dir")?;
    let encoder = Encoder::new(&schemas);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .context("creating the producer (kafka.brokers)")?;
    let now = chrono::Utc::now().timestamp_millis();
    let samples = generate(args, now);
    let topics = cfg.kafka.topics.inputs();
    let mut per_kind = [0usize; INPUT_KINDS];
    for chunk in samples.chunks(1000) {
        let mut encoded = Vec::with_capacity(chunk.len());
        for s in chunk {
            let bytes = encoder
                .encode_event(&s.event, s.text, Framing::SingleObject)
                .context("encoding a sample event")?;
            encoded.push((s.event.kind(), s.event.customer.key(), bytes));
        }
        let sends = encoded.iter().map(|(kind, key, bytes)| {
            let rec = FutureRecord::to(topics[kind.index()])
                .key(key.as_str())
                .payload(bytes.as_slice());
            producer.send(rec, Duration::from_secs(30))
        });
        try_join_all(sends)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing samples: {e}"))?;
        for (kind, _, _) in &encoded {
            per_kind[kind.index()] += 1;
        }
    }
    for k in EventKind::ALL {
        println!(
            "{:>6} {} events -> {}",
            per_kind[k.index()],
            k.label(),
            topics[k.index()]
        );
    }
    println!(
        "{} events for {} customers of {} tenants",
        samples.len(),
        args.customers * args.tenants,
        args.tenants
    );
    Ok(())
}
