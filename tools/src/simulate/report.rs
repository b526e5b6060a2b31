//! `lapse-tools demo-report`: the demo's live one-screen summary (`--watch`) and its
//! closing KPI table, from lapse's `/metrics` and the `recall.outcomes` topic.
//!
//! KPI definitions (per segment, TREATMENT vs HOLDOUT arm):
//! * **triggered**: recall triggers of the stage that puts a customer in the
//!   segment (`AT_RISK` for at_risk, `LAPSED` for the two lapsed segments),
//!   holdout included — `lapse_recall_triggers_total`, since holdout triggers
//!   are recorded but never published;
//! * **recalled**: `RECALLED` outcomes on `recall.outcomes` (deduplicated by
//!   trigger, retracted triggers excluded) whose segment is that of the
//!   episode's last trigger before the visit: an at-risk recall is a visit
//!   after the AT_RISK trigger and before LAPSED fired;
//! * **rate** = recalled / triggered; **uplift** = treatment rate − holdout
//!   rate (points) and their ratio. Triggers of the last attribution window
//!   have not had their full window yet: rates are lower bounds, for both arms alike;
//! * **repurchase rate** (复购率) = `REPURCHASED` / recalled (per trigger);
//! * **cost per recalled customer**: messaging (`marketing_cost` between trigger
//!   and outcome, of every decided treatment outcome) plus incentive
//!   (`incentive_cost` of the recalling visits' redeemed offers) / treatment
//!   recalls, shown split; **per extra recall**: the difference in cost per
//!   decided episode between the arms over the difference in rates;
//! * **time to return**: `days_to_return` of the RECALLED outcomes (mean, median);
//! * **cap violations**: `lapse_cap_violations_total` by channel and kind.

use crate::bench::prom::Scrape;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use apache_avro::types::Value;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use lapse::codec::{SchemaSet, RECALL_OUTCOME};
use lapse::config::Config;
use lapse::domain::event::Channel;

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// TOML config file (brokers, outcomes topic, http.listen, schemas dir).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// lapse's metrics endpoint (default: http://`http.listen`/metrics).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Bootstrap servers; overrides `kafka.brokers`.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Redraw a one-screen live summary every --interval seconds until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between redraws.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
    /// A log whose last line (e.g. the simulator's progress) is shown in the live summary.
    #[arg(long)]
    pub sim_log: Option<PathBuf>,
    /// Print the live summary once and exit.
    #[arg(long, conflicts_with = "watch")]
    pub screen: bool,
    /// Do not clear the screen between redraws.
    #[arg(long)]
    pub no_clear: bool,
}

// ---------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------

async fn scrape(client: &reqwest::Client, url: &str) -> anyhow::Result<Scrape> {
    let body = client
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?
        .text()
        .await?;
    Ok(Scrape::parse(&body))
}

// ---------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------

/// One recall outcome, as the KPIs need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub trigger_id: String,
    pub kind: String,
    pub segment: String,
    pub arm: String,
    pub days_to_return: Option<f64>,
    pub revenue: i64,
    pub marketing_cost: i64,
    pub incentive_cost: i64,
    pub currency: String,
}

fn field<'a>(f: &'a [(String, Value)], k: &str) -> Option<&'a Value> {
    f.iter().find(|(n, _)| n == k).map(|(_, v)| match v {
        Value::Union(_, b) => b.as_ref(),
        o => o,
    })
}

fn s(f: &[(String, Value)], k: &str) -> String {
    match field(f, k) {
        Some(Value::String(s)) | Some(Value::Enum(_, s)) => s.clone(),
        _ => String::new(),
    }
}

fn long(f: &[(String, Value)], k: &str) -> i64 {
    match field(f, k) {
        Some(Value::Long(v)) => *v,
        Some(Value::Int(v)) => *v as i64,
        _ => 0,
    }
}

/// Decodes a `lapse.v1.RecallOutcome` (either framing).
pub fn decode_outcome(schema: &apache_avro::Schema, payload: &[u8]) -> Option<Outcome> {
    let body = lapse::codec::parse_frame(payload).ok()?.body();
    let Value::Record(f) = apache_avro::from_avro_datum(schema, &mut &body[..], None).ok()? else {
        return None;
    };
    Some(Outcome {
        trigger_id: s(&f, "trigger_id"),
        kind: s(&f, "kind"),
        segment: s(&f, "segment").to_ascii_lowercase(),
        arm: s(&f, "arm").to_ascii_lowercase(),
        days_to_return: match field(&f, "days_to_return") {
            Some(Value::Double(d)) => Some(*d),
            _ => None,
        },
        revenue: long(&f, "revenue"),
        marketing_cost: long(&f, "marketing_cost"),
        incentive_cost: long(&f, "incentive_cost"),
        currency: s(&f, "currency"),
    })
}

/// Every outcome on the topic up to its current end.
pub fn read_outcomes(
    brokers: &str,
    extra: &BTreeMap<String, String>,
    topic: &str,
    schema: &apache_avro::Schema,
    timeout: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("lapse-demo-report-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false");
    for (k, v) in extra {
        cc.set(k, v);
    }
    let c: BaseConsumer = cc.create()?;
    let md = c
        .fetch_metadata(None, Duration::from_secs(10))
        .context("broker metadata")?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(vec![]);
    };
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .with_context(|| format!("watermarks of {topic}/{}", p.id()))?;
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    if ends.is_empty() {
        return Ok(vec![]);
    }
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let mut done: BTreeSet<i32> = BTreeSet::new();
    let deadline = Instant::now() + timeout;
    // tansu reports a partition's high watermark as the first offset of its
    // last record batch + 1: past it, the rest of that batch came in the same
    // fetch, so reading goes on until nothing more is waiting.
    loop {
        let reached = done.len() >= ends.len();
        if !reached && Instant::now() >= deadline {
            break;
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(o) = m.payload().and_then(|p| decode_outcome(schema, p)) {
                    out.push(o);
                }
                if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(0) {
                    done.insert(m.partition());
                }
            }
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            None if reached => break,
            None => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// KPIs
// ---------------------------------------------------------------------------

pub const SEGMENTS: [&str; 3] = ["at_risk", "high_value_lapsed", "low_value_lapsed"];
pub const ARMS: [&str; 2] = ["treatment", "holdout"];

/// Per segment and arm.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cell {
    pub triggered: f64,
    pub recalled: u64,
    pub not_recalled: u64,
    /// Recalled triggers with a `REPURCHASED` too.
    pub repurchased: u64,
    /// Messaging (`marketing_cost`) and incentive (`incentive_cost`), minor units.
    pub cost: i64,
    pub incentive: i64,
    pub revenue: i64,
}

impl Cell {
    pub fn rate(&self) -> Option<f64> {
        (self.triggered > 0.0).then(|| self.recalled as f64 / self.triggered)
    }
    pub fn repurchase_rate(&self) -> Option<f64> {
        (self.recalled > 0).then(|| self.repurchased as f64 / self.recalled as f64)
    }
    /// Messaging and incentive.
    pub fn total_cost(&self) -> i64 {
        self.cost + self.incentive
    }
    fn add(&mut self, o: &Cell) {
        self.triggered += o.triggered;
        self.recalled += o.recalled;
        self.not_recalled += o.not_recalled;
        self.repurchased += o.repurchased;
        self.cost += o.cost;
        self.incentive += o.incentive;
        self.revenue += o.revenue;
    }
}

#[derive(Debug, Clone, Default)]
pub struct Kpis {
    /// (segment, arm) → cell; segment "all" sums the others.
    pub cells: BTreeMap<(String, String), Cell>,
    /// arm → days to return of the recalls.
    pub days_to_return: BTreeMap<String, Vec<f64>>,
    pub outcomes_read: usize,
    pub retracted: u64,
    pub currency: String,
}

/// Combines the outcomes with the trigger counts of a scrape.
pub fn kpis(outcomes: &[Outcome], m: &Scrape) -> Kpis {
    // Final kind per trigger: RETRACTED > RECALLED > NOT_RECALLED; a
    // REPURCHASED comes on top of its RECALLED.
    let rank = |k: &str| match k {
        "RETRACTED" => 3,
        "RECALLED" => 2,
        "NOT_RECALLED" => 1,
        _ => 0,
    };
    let repurchased: BTreeSet<&str> = outcomes
        .iter()
        .filter(|o| o.kind == "REPURCHASED")
        .map(|o| o.trigger_id.as_str())
        .collect();
    let mut by_trigger: BTreeMap<&str, &Outcome> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.kind != "REPURCHASED") {
        let e = by_trigger.entry(&o.trigger_id).or_insert(o);
        if rank(&o.kind) > rank(&e.kind) {
            *e = o;
        }
    }
    let mut k = Kpis {
        outcomes_read: outcomes.len(),
        currency: outcomes
            .iter()
            .map(|o| o.currency.clone())
            .find(|c| !c.is_empty())
            .unwrap_or_else(|| "CNY".into()),
        ..Kpis::default()
    };
    for seg in SEGMENTS {
        let stage = if seg == "at_risk" {
            "at_risk"
        } else {
            "lapsed"
        };
        for arm in ARMS {
            k.cells.insert(
                (seg.into(), arm.into()),
                Cell {
                    triggered: m.sum_where(
                        "lapse_recall_triggers_total",
                        &[("segment", seg), ("stage", stage), ("arm", arm)],
                    ),
                    ..Cell::default()
                },
            );
        }
    }
    for o in by_trigger.values() {
        if o.kind == "RETRACTED" {
            k.retracted += 1;
            continue;
        }
        let Some(cell) = k.cells.get_mut(&(o.segment.clone(), o.arm.clone())) else {
            continue;
        };
        cell.cost += o.marketing_cost;
        if o.kind == "RECALLED" {
            cell.recalled += 1;
            cell.repurchased += u64::from(repurchased.contains(o.trigger_id.as_str()));
            cell.incentive += o.incentive_cost;
            cell.revenue += o.revenue;
            if let Some(d) = o.days_to_return {
                k.days_to_return.entry(o.arm.clone()).or_default().push(d);
            }
        } else {
            cell.not_recalled += 1;
        }
    }
    for arm in ARMS {
        let mut all = Cell::default();
        for seg in SEGMENTS {
            all.add(&k.cells[&(seg.to_string(), arm.to_string())]);
        }
        k.cells.insert(("all".into(), arm.into()), all);
    }
    k
}

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

fn money(fen: f64, currency: &str) -> String {
    format!("{currency} {:.2}", fen / 100.0)
}

fn num(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Two-proportion z statistic (pooled), `None` when undefined.
pub fn z_score(x1: f64, n1: f64, x2: f64, n2: f64) -> Option<f64> {
    if n1 <= 0.0 || n2 <= 0.0 {
        return None;
    }
    let p = (x1 + x2) / (n1 + n2);
    let se = (p * (1.0 - p) * (1.0 / n1 + 1.0 / n2)).sqrt();
    (se > 0.0).then(|| (x1 / n1 - x2 / n2) / se)
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The KPI table.
pub fn render_kpis(k: &Kpis, m: &Scrape) -> String {
    let mut s = String::new();
    let cur = &k.currency;
    s.push_str("Recall, treatment vs holdout (holdout customers are never contacted)\n");
    s.push_str(&format!(
        "  {:<19} {:<10} {:>10} {:>9} {:>8} {:>9}   {}\n",
        "segment", "arm", "triggered", "recalled", "rate", "repurch.", "uplift"
    ));
    for seg in SEGMENTS.iter().copied().chain(["all"]) {
        let t = &k.cells[&(seg.to_string(), "treatment".to_string())];
        let h = &k.cells[&(seg.to_string(), "holdout".to_string())];
        let uplift = match (t.rate(), h.rate()) {
            (Some(a), Some(b)) => {
                let ratio = if b > 0.0 {
                    format!(" x{:.2}", a / b)
                } else {
                    String::new()
                };
                let z = z_score(
                    t.recalled as f64,
                    t.triggered,
                    h.recalled as f64,
                    h.triggered,
                )
                .map_or(String::new(), |z| {
                    format!("  z {z:.1}{}", if z.abs() >= 1.96 { " *" } else { "" })
                });
                format!("{:+.1} pts{ratio}{z}", (a - b) * 100.0)
            }
            _ => "-".into(),
        };
        s.push_str(&format!(
            "  {:<19} {:<10} {:>10} {:>9} {:>8} {:>9}   {}\n",
            seg,
            "treatment",
            num(t.triggered),
            num(t.recalled as f64),
            pct(t.rate()),
            pct(t.repurchase_rate()),
            uplift
        ));
        s.push_str(&format!(
            "  {:<19} {:<10} {:>10} {:>9} {:>8} {:>9}\n",
            "",
            "holdout",
            num(h.triggered),
            num(h.recalled as f64),
            pct(h.rate()),
            pct(h.repurchase_rate())
        ));
    }
    s.push_str(
        "  (rate = recalled / triggered; triggers of the last attribution window are still\n   \
         open, so rates are lower bounds, for both arms alike; repurch. = recalled customers\n   \
         who came back again within the repurchase window (复购率); z: two-proportion\n   \
         z-test, * = significant at 95%)\n",
    );
    let t = &k.cells[&("all".to_string(), "treatment".to_string())];
    let h = &k.cells[&("all".to_string(), "holdout".to_string())];
    s.push('\n');
    if t.recalled > 0 {
        let per = |c: i64| money(c as f64 / t.recalled as f64, cur);
        s.push_str(&format!(
            "Cost per recalled customer (treatment): {} = messaging {} + incentive {}  (costs {} + {} of {} decided episodes / {} recalled)\n",
            per(t.total_cost()),
            per(t.cost),
            per(t.incentive),
            money(t.cost as f64, cur),
            money(t.incentive as f64, cur),
            num((t.recalled + t.not_recalled) as f64),
            num(t.recalled as f64)
        ));
    } else {
        s.push_str("Cost per recalled customer (treatment): - (no recall yet)\n");
    }
    let decided = |c: &Cell| (c.recalled + c.not_recalled) as f64;
    match (t.rate(), h.rate()) {
        (Some(a), Some(b)) if a > b && decided(t) > 0.0 && decided(h) > 0.0 => {
            // Per decided episode, over the uplift; messaging and incentive alike.
            let extra = |c: fn(&Cell) -> i64| {
                money(
                    (c(t) as f64 / decided(t) - c(h) as f64 / decided(h)) / (a - b),
                    cur,
                )
            };
            s.push_str(&format!(
                "Cost per extra recall vs holdout: {} = messaging {} + incentive {}  (cost per decided episode {} vs {}, over {:+.1} pts)\n",
                extra(Cell::total_cost),
                extra(|c| c.cost),
                extra(|c| c.incentive),
                money(t.total_cost() as f64 / decided(t), cur),
                money(h.total_cost() as f64 / decided(h), cur),
                (a - b) * 100.0
            ));
        }
        _ => {}
    }
    s.push_str(&format!(
        "Revenue of recalling visits: treatment {}, holdout {}\n",
        money(t.revenue as f64, cur),
        money(h.revenue as f64, cur)
    ));
    s.push_str("Time to return (days from trigger to visit):\n");
    for arm in ARMS {
        let v = k.days_to_return.get(arm).cloned().unwrap_or_default();
        let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        s.push_str(&format!(
            "  {:<10} mean {:>6}  median {:>6}  (n = {})\n",
            arm,
            mean.map_or("-".into(), |x| format!("{x:.1}")),
            median(&v).map_or("-".into(), |x| format!("{x:.1}")),
            v.len()
        ));
    }
    s.push_str(&format!(
        "Outcomes read from recall.outcomes: {} (retracted triggers: {}); episodes decided: treatment {}, holdout {}\n",
        num(k.outcomes_read as f64),
        k.retracted,
        num(decided(t)),
        num(decided(h))
    ));
    s.push_str(&satisfaction(m));
    s.push('\n');
    s.push_str("Cap violations (marketing sends made while not allowed), by channel:\n");
    let kinds = ["cap", "throttled", "suppressed", "quiet_hours"];
    s.push_str(&format!(
        "  {:<8} {:>8} {:>10} {:>11} {:>12} {:>8}   {}\n",
        "channel", "cap", "throttled", "suppressed", "quiet_hours", "total", "of marketing sends"
    ));
    for ch in Channel::ALL {
        let by = m.by(
            "lapse_cap_violations_total",
            "kind",
            &[("channel", ch.label())],
        );
        let total: f64 = by.values().sum();
        let sends = m.sum_where(
            "lapse_engagement_events_total",
            &[
                ("channel", ch.label()),
                ("event_type", "send"),
                ("purpose", "marketing"),
            ],
        );
        s.push_str(&format!(
            "  {:<8} {:>8} {:>10} {:>11} {:>12} {:>8}   {}\n",
            ch.label(),
            num(by.get(kinds[0]).copied().unwrap_or(0.0)),
            num(by.get(kinds[1]).copied().unwrap_or(0.0)),
            num(by.get(kinds[2]).copied().unwrap_or(0.0)),
            num(by.get(kinds[3]).copied().unwrap_or(0.0)),
            num(total),
            if sends > 0.0 {
                format!("{:.2}% of {}", total / sends * 100.0, num(sends))
            } else {
                "-".into()
            }
        ));
    }
    s
}

/// Satisfaction as lapse counted it: NPS and detractor share, the mean score
/// by recall arm (recalled vs holdout), and the care calls fired.
fn satisfaction(m: &Scrape) -> String {
    let nps = m.by("lapse_feedback_total", "class", &[("kind", "nps")]);
    let n: f64 = nps.values().sum();
    let share = |c: &str| nps.get(c).copied().unwrap_or(0.0) / n.max(1.0);
    let mut s = format!(
        "Satisfaction: {} NPS answers, NPS {:+.0}, detractors {}; care calls fired {}\n",
        num(n),
        (share("promoter") - share("detractor")) * 100.0,
        pct((n > 0.0).then(|| share("detractor"))),
        num(m.sum_where("lapse_recall_triggers_total", &[("stage", "care_call")]))
    );
    for arm in ["recalled", "holdout", "none"] {
        let f = [("kind", "nps"), ("recall_arm", arm)];
        let count = m.sum_where("lapse_feedback_scores_count", &f);
        let mean = (count > 0.0).then(|| m.sum_where("lapse_feedback_scores_sum", &f) / count);
        s.push_str(&format!(
            "  mean NPS score, {arm:<9} {:>5}  (n = {})\n",
            mean.map_or("-".into(), |x| format!("{x:.1}")),
            num(count)
        ));
    }
    s
}

/// The live screen.
pub fn render_screen(m: &Scrape, url: &str, rate: Option<f64>, sim_line: Option<&str>) -> String {
    let mut s = String::new();
    let clock = m
        .max("lapse_clock_now_ms", &[])
        .filter(|v| *v > 0.0)
        .and_then(|v| chrono::DateTime::from_timestamp_millis(v as i64))
        .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M UTC").to_string());
    s.push_str(&format!(
        "lapse demo — metrics at {url}\nlapse clock (event time): {clock}\n"
    ));
    if let Some(l) = sim_line {
        s.push_str(&format!("{}\n", l.trim()));
    }
    s.push('\n');
    let records = m.sum_where("lapse_records_total", &[]);
    s.push_str(&format!(
        "records applied {:>12}   {:>9} events/s   consumer lag {:>9}   dead letters {}\n",
        num(records),
        rate.map_or("-".into(), num),
        num(m.sum_where("lapse_consumer_lag", &[])),
        num(m.sum_where("lapse_dlq_writes_total", &[]))
    ));
    let by_type = m.by("lapse_records_total", "event_type", &[]);
    s.push_str(&format!(
        "  by type: {}\n\n",
        ["send", "open", "click", "reply", "visit", "feedback"]
            .iter()
            .map(|t| format!("{t} {}", num(by_type.get(*t).copied().unwrap_or(0.0))))
            .collect::<Vec<_>>()
            .join("  ")
    ));
    s.push_str(&format!(
        "{:<22}{}\n",
        "customers restricted",
        Channel::ALL
            .iter()
            .map(|c| format!("{:>9}", c.label()))
            .collect::<String>()
    ));
    for state in ["capped", "throttled", "suppressed"] {
        s.push_str(&format!(
            "  {:<20}{}\n",
            state,
            Channel::ALL
                .iter()
                .map(|c| format!(
                    "{:>9}",
                    num(m.sum_where(
                        "lapse_customers_restricted",
                        &[("channel", c.label()), ("state", state)]
                    ))
                ))
                .collect::<String>()
        ));
    }
    s.push_str(&format!(
        "  {:<20}{}\n\n",
        "cap violations",
        Channel::ALL
            .iter()
            .map(|c| format!(
                "{:>9}",
                num(m.sum_where("lapse_cap_violations_total", &[("channel", c.label())]))
            ))
            .collect::<String>()
    ));
    s.push_str(&format!(
        "{:<22}{:>12}{:>20}{:>19}\n",
        "recall triggers", "at_risk", "high_value_lapsed", "low_value_lapsed"
    ));
    for arm in ARMS {
        s.push_str(&format!(
            "  {:<20}{}\n",
            arm,
            SEGMENTS
                .iter()
                .zip([12, 20, 19])
                .map(|(seg, w)| format!(
                    "{:>w$}",
                    num(m.sum_where(
                        "lapse_recall_triggers_total",
                        &[("segment", seg), ("arm", arm)]
                    ))
                ))
                .collect::<String>()
        ));
    }
    s.push_str(&format!(
        "{:<22}{:>12}{:>20}{:>19}\n",
        "recall outcomes", "recalled", "not_recalled", "retracted"
    ));
    for arm in ARMS {
        s.push_str(&format!(
            "  {:<20}{}\n",
            arm,
            ["recalled", "not_recalled", "retracted"]
                .iter()
                .zip([12, 20, 19])
                .map(|(kind, w)| format!(
                    "{:>w$}",
                    num(m.sum_where(
                        "lapse_recall_outcomes_total",
                        &[("kind", kind), ("arm", arm)]
                    ))
                ))
                .collect::<String>()
        ));
    }
    s
}

fn last_line(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("simulate:"))
        .map(str::to_string)
}

/// `lapse-tools demo-report`.
pub async fn main(args: ReportArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(b) = &args.brokers {
        cfg.kafka.brokers = b.clone();
    }
    let url = args
        .metrics
        .clone()
        .unwrap_or_else(|| format!("http://{}/metrics", cfg.http.listen));
    let client = reqwest::Client::new();
    if args.screen {
        let m = scrape(&client, &url).await?;
        let sim = args.sim_log.as_deref().and_then(last_line);
        use std::io::Write;
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            render_screen(&m, &url, None, sim.as_deref())
        );
        return Ok(());
    }
    if args.watch {
        let every = Duration::from_secs_f64(args.interval.max(0.2));
        let mut prev: Option<(Instant, f64)> = None;
        loop {
            let now = Instant::now();
            match scrape(&client, &url).await {
                Ok(m) => {
                    let records = m.sum_where("lapse_records_total", &[]);
                    let rate = prev.map(|(t, r)| {
                        (records - r).max(0.0) / now.duration_since(t).as_secs_f64().max(1e-3)
                    });
                    prev = Some((now, records));
                    let sim = args.sim_log.as_deref().and_then(last_line);
                    let screen = render_screen(&m, &url, rate, sim.as_deref());
                    if args.no_clear {
                        println!("{screen}");
                    } else {
                        print!("\x1b[2J\x1b[H{screen}");
                    }
                }
                Err(e) => eprintln!("demo-report: {e:#}"),
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
            tokio::time::sleep(every).await;
        }
    }
    let m = scrape(&client, &url).await?;
    let schemas = SchemaSet::load(&cfg.schema.dir)
        .with_context(|| format!("loading schemas from {}", cfg.schema.dir.display()))?;
    let schema = schemas
        .by_name(RECALL_OUTCOME)
        .ok_or_else(|| anyhow::anyhow!("schema {RECALL_OUTCOME} missing"))?
        .as_ref()
        .clone();
    let brokers = cfg.kafka.brokers.clone();
    let extra = cfg.kafka.consumer_properties.clone();
    let topic = cfg.kafka.topics.outcomes.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        read_outcomes(&brokers, &extra, &topic, &schema, Duration::from_secs(60))
    })
    .await??;
    let k = kpis(&outcomes, &m);
    use std::io::Write;
    let _ = write!(std::io::stdout(), "{}", render_kpis(&k, &m));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP lapse_recall_triggers_total x
# TYPE lapse_recall_triggers_total counter
lapse_recall_triggers_total{arm="treatment",channel="wechat",segment="at_risk",stage="at_risk",tenant="a"} 90
lapse_recall_triggers_total{arm="treatment",channel="sms",segment="at_risk",stage="at_risk",tenant="b"} 10
lapse_recall_triggers_total{arm="holdout",channel="sms",segment="at_risk",stage="at_risk",tenant="a"} 20
lapse_recall_triggers_total{arm="treatment",channel="sms",segment="low_value_lapsed",stage="follow_up",tenant="a"} 50
lapse_cap_violations_total{channel="wechat",kind="cap",tenant="a"} 7
lapse_cap_violations_total{channel="wechat",kind="quiet_hours",tenant="b"} 1
lapse_clock_now_ms 1700000000000
"#;

    fn outcome(id: &str, kind: &str, seg: &str, arm: &str, days: Option<f64>) -> Outcome {
        Outcome {
            trigger_id: id.into(),
            kind: kind.into(),
            segment: seg.into(),
            arm: arm.into(),
            days_to_return: days,
            revenue: if days.is_some() { 100_000 } else { 0 },
            marketing_cost: 10,
            incentive_cost: if kind == "RECALLED" { 500 } else { 0 },
            currency: "CNY".into(),
        }
    }

    #[test]
    fn the_text_format_parses_with_labels() {
        let m = Scrape::parse(PAGE);
        assert_eq!(
            m.sum_where("lapse_recall_triggers_total", &[("arm", "treatment")]),
            150.0
        );
        assert_eq!(
            m.sum_where(
                "lapse_recall_triggers_total",
                &[("segment", "at_risk"), ("stage", "at_risk")]
            ),
            120.0
        );
        assert_eq!(m.by("lapse_cap_violations_total", "kind", &[])["cap"], 7.0);
        assert_eq!(m.max("lapse_clock_now_ms", &[]), Some(1.7e12));
        let escaped = Scrape::parse(r#"x{a="q\"uote",b="2"} 3"#);
        let s = &escaped.samples[0];
        assert_eq!(s.labels["a"], "q\"uote");
        assert_eq!(s.labels["b"], "2");
    }

    #[test]
    fn satisfaction_is_read_from_lapses_feedback_metrics() {
        let m = Scrape::parse(
            r#"lapse_feedback_total{tenant="a",kind="nps",class="promoter"} 6
lapse_feedback_total{tenant="b",kind="nps",class="promoter"} 1
lapse_feedback_total{tenant="a",kind="nps",class="passive"} 1
lapse_feedback_total{tenant="a",kind="nps",class="detractor"} 2
lapse_feedback_total{tenant="a",kind="csat",class="detractor"} 9
lapse_feedback_scores_sum{kind="nps",segment="active",recall_arm="recalled"} 27
lapse_feedback_scores_count{kind="nps",segment="active",recall_arm="recalled"} 3
lapse_feedback_scores_sum{kind="nps",segment="at_risk",recall_arm="recalled"} 5
lapse_feedback_scores_count{kind="nps",segment="at_risk",recall_arm="recalled"} 1
lapse_recall_triggers_total{tenant="a",segment="at_risk",stage="care_call",channel="phone",arm="treatment"} 4
lapse_recall_triggers_total{tenant="a",segment="at_risk",stage="at_risk",channel="sms",arm="treatment"} 50
"#,
        );
        let s = satisfaction(&m);
        assert!(
            s.contains("10 NPS answers, NPS +50, detractors 20.0%; care calls fired 4"),
            "{s}"
        );
        assert!(s.contains("recalled    8.0  (n = 4)"), "{s}");
        assert!(s.contains("holdout       -  (n = 0)"), "{s}");
    }

    #[test]
    fn kpis_take_the_final_kind_per_trigger_and_rates_over_triggers() {
        let m = Scrape::parse(PAGE);
        let outcomes = vec![
            outcome("t1", "NOT_RECALLED", "at_risk", "treatment", None),
            outcome("t1", "RECALLED", "at_risk", "treatment", Some(4.0)),
            outcome("t2", "RECALLED", "at_risk", "treatment", Some(10.0)),
            outcome("t2", "RECALLED", "at_risk", "treatment", Some(10.0)), // exact repeat
            outcome("t3", "RECALLED", "at_risk", "treatment", Some(1.0)),
            outcome("t3", "RETRACTED", "at_risk", "treatment", Some(1.0)),
            outcome("t4", "RECALLED", "at_risk", "holdout", Some(20.0)),
            outcome("t5", "NOT_RECALLED", "at_risk", "holdout", None),
            outcome("t2", "REPURCHASED", "at_risk", "treatment", Some(30.0)),
            outcome("t2", "REPURCHASED", "at_risk", "treatment", Some(30.0)), // repeat
            outcome("t3", "REPURCHASED", "at_risk", "treatment", Some(3.0)),  // retracted
            outcome("t4", "REPURCHASED", "at_risk", "holdout", Some(9.0)),
        ];
        let k = kpis(&outcomes, &m);
        let t = &k.cells[&("at_risk".to_string(), "treatment".to_string())];
        assert_eq!((t.triggered, t.recalled, t.not_recalled), (100.0, 2, 0));
        assert_eq!(t.rate(), Some(0.02));
        assert_eq!((t.repurchased, t.repurchase_rate()), (1, Some(0.5)));
        assert_eq!((t.cost, t.incentive), (20, 1_000));
        let h = &k.cells[&("at_risk".to_string(), "holdout".to_string())];
        assert_eq!((h.triggered, h.recalled, h.not_recalled), (20.0, 1, 1));
        assert_eq!(h.repurchase_rate(), Some(1.0));
        assert_eq!(k.retracted, 1);
        assert_eq!(k.days_to_return["treatment"], vec![4.0, 10.0]);
        // Follow-up triggers are not in the denominator of a segment.
        let lv = &k.cells[&("low_value_lapsed".to_string(), "treatment".to_string())];
        assert_eq!(lv.triggered, 0.0);
        let text = render_kpis(&k, &m);
        assert!(text.contains("at_risk"), "{text}");
        assert!(text.contains("2.0%"), "{text}");
        assert!(text.contains("-3.0 pts"), "{text}");
        assert!(text.contains("50.0%") && text.contains("100.0%"), "{text}");
        // (20 + 1,000) / 2 recalled = CNY 5.10: messaging 0.10 + incentive 5.00.
        assert!(
            text.contains("CNY 5.10 = messaging CNY 0.10 + incentive CNY 5.00"),
            "{text}"
        );
        let z = z_score(60.0, 100.0, 40.0, 100.0).unwrap();
        assert!((z - 2.828).abs() < 0.01, "{z}");
        assert_eq!(z_score(1.0, 0.0, 1.0, 2.0), None);
        assert!(text.contains("wechat"), "{text}");
        let screen = render_screen(
            &m,
            "http://x/metrics",
            Some(12.0),
            Some("simulate: day 3/9"),
        );
        assert!(screen.contains("2023-11-14"), "{screen}");
        assert!(screen.contains("simulate: day 3/9"), "{screen}");
    }
}
