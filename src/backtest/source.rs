//! Where a backtest's history comes from: export files (JSON lines, Avro object
//! container files) or the input topics by time range. Every record goes
//! through the same checks as in the live pipeline; a record or file that
//! cannot be read is counted with its reason, never skipped silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apache_avro::types::Value;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::codec::decode::event_from_record;
use crate::codec::Decoder;
use crate::config::KafkaConfig;
use crate::domain::event::{CustomerRef, Event, EventKind};
use crate::domain::state::Source;

/// Which records to keep.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub tenant: Option<String>,
}

impl Filter {
    fn keeps(&self, ev: &Event) -> bool {
        self.since.is_none_or(|s| ev.occurred_at >= s)
            && self.until.is_none_or(|u| ev.occurred_at < u)
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| *t == ev.customer.tenant)
    }
}

/// A loaded history in replay order: arrival order (the records' Kafka
/// timestamps) from the topics, event time from export files (which carry no
/// arrival time); ties in reading order, so each partition's order is kept.
#[derive(Default)]
pub struct History {
    /// (record, where it came from, its arrival time, ms).
    pub events: Vec<(Event, Source, i64)>,
    /// Per record, its customer's number (dense, in order of first
    /// appearance), set by [`History::number_customers`].
    pub customers: Vec<u32>,
    /// Records read (kept, filtered out or bad).
    pub read: u64,
    /// Records outside the time range or of another tenant.
    pub filtered: u64,
    /// Records or files that could not be used, by reason.
    pub bad: BTreeMap<String, u64>,
}

impl History {
    fn bad(&mut self, reason: &str) {
        *self.bad.entry(reason.to_string()).or_default() += 1;
    }

    fn keep(&mut self, ev: Event, src: Source, arrival: i64, filter: &Filter) {
        if filter.keeps(&ev) {
            self.events.push((ev, src, arrival));
        } else {
            self.filtered += 1;
        }
    }

    /// Sorts by arrival (stable, so reading order breaks ties) and numbers the customers.
    pub fn sort(&mut self) {
        self.events.sort_by_key(|(_, _, at)| *at);
        self.number_customers();
    }

    /// Numbers the customers so the replay keeps them in a vector.
    pub fn number_customers(&mut self) {
        let mut numbers: std::collections::HashMap<&CustomerRef, u32> =
            std::collections::HashMap::new();
        self.customers = self
            .events
            .iter()
            .map(|(ev, _, _)| {
                let next = numbers.len() as u32;
                *numbers.entry(&ev.customer).or_insert(next)
            })
            .collect();
    }
}

/// Reads export files: `*.jsonl` / `*.json` (one record per line) and `*.avro`
/// (object container files written with lapse's schemas, or compatible ones).
/// A directory is read file by file in name order.
pub fn from_files(paths: &[PathBuf], decoder: &Decoder, filter: &Filter, now_ms: i64) -> History {
    let mut h = History::default();
    let mut files = Vec::new();
    for p in paths {
        match std::fs::read_dir(p) {
            Ok(dir) => {
                let mut in_dir: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
                in_dir.sort();
                files.extend(in_dir.into_iter().filter(|f| f.is_file()));
            }
            Err(_) => files.push(p.clone()),
        }
    }
    for (n, f) in files.iter().enumerate() {
        // Each file is its own "partition": records keep their order within it.
        let part = i32::try_from(n).unwrap_or(i32::MAX);
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or_default();
        match ext {
            "avro" => read_avro(f, part, decoder, filter, now_ms, &mut h),
            "jsonl" | "json" | "ndjson" => {
                read_json_lines(f, part, decoder, filter, now_ms, &mut h)
            }
            _ => h.bad("unknown_file_type"),
        }
    }
    h.sort();
    h
}

fn kind_named(name: &str) -> Option<EventKind> {
    let name = name.to_ascii_lowercase();
    EventKind::ALL.into_iter().find(|k| {
        let l = k.label();
        name == l || name == format!("{l}s") || name == k.schema_name().to_ascii_lowercase()
    })
}

fn read_json_lines(
    f: &Path,
    part: i32,
    decoder: &Decoder,
    filter: &Filter,
    now_ms: i64,
    h: &mut History,
) {
    let Ok(text) = std::fs::read_to_string(f) else {
        h.bad("unreadable_file");
        return;
    };
    for (offset, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        h.read += 1;
        let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_str(line) else {
            h.bad("bad_json");
            continue;
        };
        let kind = obj
            .remove("type")
            .and_then(|t| t.as_str().and_then(kind_named));
        let Some(kind) = kind else {
            h.bad("missing_type");
            continue;
        };
        // occurred_at as epoch milliseconds or an RFC 3339 instant.
        if let Some(serde_json::Value::String(s)) = obj.get("occurred_at") {
            match chrono::DateTime::parse_from_rfc3339(s) {
                Ok(t) => {
                    obj.insert("occurred_at".into(), t.timestamp_millis().into());
                }
                Err(_) => {
                    h.bad("bad_timestamp");
                    continue;
                }
            }
        }
        let value = Value::from(serde_json::Value::Object(obj));
        let src = Source {
            kind,
            partition: part,
            offset: offset as i64,
        };
        keep_record(value, src, decoder, filter, now_ms, h);
    }
}

/// A record of an export file: resolved to lapse's reader schema of its kind,
/// checked as a decoded record is, kept in event-time order (files carry no
/// arrival time) or counted with its reason.
fn keep_record(
    value: Value,
    src: Source,
    decoder: &Decoder,
    filter: &Filter,
    now_ms: i64,
    h: &mut History,
) {
    let Ok(record) = value.resolve(decoder.schemas().reader(src.kind)) else {
        h.bad("schema_mismatch");
        return;
    };
    match event_from_record(src.kind, record, decoder.limits(), now_ms) {
        Ok(ev) => {
            let at = ev.occurred_at;
            h.keep(ev, src, at, filter)
        }
        Err(e) => h.bad(e.reason()),
    }
}

fn read_avro(
    f: &Path,
    part: i32,
    decoder: &Decoder,
    filter: &Filter,
    now_ms: i64,
    h: &mut History,
) {
    let reader = std::fs::File::open(f)
        .ok()
        .and_then(|r| apache_avro::Reader::new(std::io::BufReader::new(r)).ok());
    let kind = reader.as_ref().and_then(|r| {
        let name = r.writer_schema().name()?.fullname(None);
        EventKind::ALL.into_iter().find(|k| k.schema_name() == name)
    });
    let (Some(reader), Some(kind)) = (reader, kind) else {
        h.bad("unreadable_avro_file");
        return;
    };
    for (offset, record) in reader.enumerate() {
        h.read += 1;
        let src = Source {
            kind,
            partition: part,
            offset: offset as i64,
        };
        match record {
            Ok(v) => keep_record(v, src, decoder, filter, now_ms, h),
            Err(_) => h.bad("avro_decode"),
        }
    }
}

/// Reads the input topics from `filter.since` (by timestamp index) to their
/// end as of the start, with a consumer of its own: assigned partitions, no
/// group membership, nothing committed.
pub async fn from_kafka(
    cfg: &KafkaConfig,
    decoder: &Decoder,
    filter: &Filter,
    now_ms: i64,
) -> anyhow::Result<History> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("lapse-backtest-{}", std::process::id()))
        .set("client.id", "lapse-backtest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    crate::kafka::client::apply_security(&mut cc, cfg);
    for (k, v) in &cfg.consumer_properties {
        cc.set(k, v);
    }
    let consumer: BaseConsumer = cc.create()?;
    let timeout = Duration::from_secs(30);
    let topics = cfg.topics.inputs();
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                if high > low {
                    ends.insert((topic.to_string(), p.id()), high);
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                }
            }
        }
    }
    if let Some(since) = filter.since {
        let mut times = TopicPartitionList::new();
        for (t, p) in ends.keys() {
            times.add_partition_offset(t, *p, Offset::Offset(since))?;
        }
        tpl = consumer.offsets_for_times(times, timeout)?;
        // Partitions with nothing at or after `since` answer "end": skip them.
        for e in tpl.elements() {
            if matches!(e.offset(), Offset::End | Offset::Invalid) {
                ends.remove(&(e.topic().to_string(), e.partition()));
            }
        }
    }
    let mut h = History::default();
    if ends.is_empty() {
        return Ok(h);
    }
    consumer.assign(&tpl)?;
    let kind_of = |topic: &str| {
        topics
            .iter()
            .position(|t| *t == topic)
            .map(|i| EventKind::ALL[i])
    };
    let mut open = ends.clone();
    while !open.is_empty() {
        let Some(msg) = consumer.poll(timeout) else {
            anyhow::bail!(
                "no record from the broker for {timeout:?} with {} partitions unread (is kafka.brokers reachable?)",
                open.len()
            );
        };
        let msg = msg?;
        let tp = (msg.topic().to_string(), msg.partition());
        let Some(end) = ends.get(&tp) else { continue };
        if msg.offset() + 1 >= *end {
            open.remove(&tp);
        }
        if msg.offset() >= *end {
            continue;
        }
        h.read += 1;
        let Some(kind) = kind_of(msg.topic()) else {
            continue;
        };
        let Some(payload) = msg.payload() else {
            h.bad("empty_payload");
            continue;
        };
        match decoder.decode(kind, msg.key(), payload, now_ms).await {
            Ok(ev) => {
                let src = Source {
                    kind,
                    partition: msg.partition(),
                    offset: msg.offset(),
                };
                let arrival = msg.timestamp().to_millis().unwrap_or(ev.occurred_at);
                h.keep(ev, src, arrival, filter);
            }
            Err(e) if e.is_transient() => {
                anyhow::bail!(
                    "cannot decode {}: {e} (the schema registry must answer)",
                    msg.topic()
                )
            }
            Err(e) => h.bad(e.reason()),
        }
    }
    h.sort();
    Ok(h)
}

/// A customer id as shown in reports: a short stable hash unless ids are asked for.
pub fn shown(c: &CustomerRef, show_ids: bool) -> String {
    if show_ids {
        return c.to_string();
    }
    let d = crate::domain::allowance::stable_id(&["lapse.backtest.sample", &c.tenant, &c.customer]);
    format!("{}/#{}", c.tenant, &d[..12])
}
