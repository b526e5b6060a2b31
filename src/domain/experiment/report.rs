//! The experiment report: per arm and per measure, the arm's difference to the
//! control with an always-valid interval, a sample-size and duration estimate,
//! the unsubscribe guardrail's verdict and the winner (or "not yet").
//!
//! Pure: it reads the exposed customers' [`Measures`] (however the adapter
//! collected them) and the time of reading. The unit of analysis is the
//! exposed customer, the unit the arms are drawn by: rates per send are ratio
//! measures with a delta-method variance, never sends counted as if
//! independent.

use std::collections::BTreeMap;

use serde::Serialize;

use super::active::Experiment;
use super::exposure::Exposure;
use super::guardrail::{self, Verdict};
use super::measure::Measures;
use super::plan::{self, Plan};
use super::stats::{Interval, Measure, Ratio, Sample, Sequence};

/// The power the sample-size estimate is for.
pub const POWER: f64 = 0.8;
const DAY_MS: i64 = 86_400_000;

/// Which way is good for a measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
    /// Descriptive (e.g. sends: the thing an experiment changes).
    Neither,
}

/// One measure of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Metric {
    /// Key in config (`primary`), JSON and metrics.
    pub key: &'static str,
    /// Heading in the text report.
    pub label: &'static str,
    pub better: Better,
    /// Per customer (a mean; the denominator is 1) or a ratio of two sums.
    per_customer: bool,
    /// A 0/1 outcome per customer (interval of two proportions).
    proportion: bool,
    /// Minor currency units (printed as money).
    pub money: bool,
}

const fn metric(key: &'static str, label: &'static str, better: Better) -> Metric {
    Metric {
        key,
        label,
        better,
        per_customer: true,
        proportion: false,
        money: false,
    }
}

const fn ratio(key: &'static str, label: &'static str, better: Better) -> Metric {
    Metric {
        per_customer: false,
        ..metric(key, label, better)
    }
}

/// Every measure, in report order.
pub const METRICS: [Metric; 20] = [
    metric(
        "sends_per_customer",
        "marketing sends / customer",
        Better::Neither,
    ),
    metric("wechat_sends_per_customer", "  WECHAT", Better::Neither),
    metric("sms_sends_per_customer", "  SMS", Better::Neither),
    metric("phone_sends_per_customer", "  PHONE", Better::Neither),
    metric("email_sends_per_customer", "  EMAIL", Better::Neither),
    metric("social_sends_per_customer", "  SOCIAL", Better::Neither),
    ratio("open_rate", "open rate (per send)", Better::Higher),
    ratio("click_rate", "click rate (per send)", Better::Higher),
    ratio("reply_rate", "reply rate (per send)", Better::Higher),
    metric("clicks_per_customer", "clicks / customer", Better::Higher),
    Metric {
        proportion: true,
        ..metric(
            "unsubscribe_rate",
            "unsubscribed (guardrail)",
            Better::Lower,
        )
    },
    metric("visits_per_customer", "visits / customer", Better::Higher),
    Metric {
        money: true,
        ..metric("revenue_per_customer", "revenue / customer", Better::Higher)
    },
    ratio("recall_rate", "recall rate (per trigger)", Better::Higher),
    Metric {
        money: true,
        ..ratio(
            "messaging_cost_per_recall",
            "messaging cost / recall",
            Better::Lower,
        )
    },
    Metric {
        money: true,
        ..ratio(
            "incentive_cost_per_recall",
            "incentive cost / recall",
            Better::Lower,
        )
    },
    Metric {
        money: true,
        ..ratio("cost_per_recall", "cost / recall (both)", Better::Lower)
    },
    ratio(
        "repurchase_rate",
        "repurchase rate (per recall)",
        Better::Higher,
    ),
    ratio(
        "satisfaction",
        "satisfaction (0-1, per answer)",
        Better::Higher,
    ),
    ratio("detractor_share", "detractors (per answer)", Better::Lower),
];

/// Index of the guardrail measure in [`METRICS`].
const UNSUBSCRIBE: usize = 10;

impl Metric {
    /// One customer's (denominator, numerator).
    fn of(&self, m: &Measures) -> (f64, f64) {
        let f = |v: u32| f64::from(v);
        let y = match self.key {
            "sends_per_customer" => f(m.marketing_sends()),
            "wechat_sends_per_customer" => f(m.sends[0]),
            "sms_sends_per_customer" => f(m.sends[1]),
            "phone_sends_per_customer" => f(m.sends[2]),
            "email_sends_per_customer" => f(m.sends[3]),
            "social_sends_per_customer" => f(m.sends[4]),
            "open_rate" => f(m.opens),
            "click_rate" | "clicks_per_customer" => f(m.clicks),
            "reply_rate" => f(m.replies),
            "unsubscribe_rate" => f(u32::from(m.unsubscribes > 0)),
            "visits_per_customer" => f(m.visits),
            "revenue_per_customer" => m.revenue as f64,
            "recall_rate" => f(m.recalled),
            "messaging_cost_per_recall" => m.marketing_cost as f64,
            "incentive_cost_per_recall" => m.incentive_cost as f64,
            "cost_per_recall" => m.marketing_cost.saturating_add(m.incentive_cost) as f64,
            "repurchase_rate" => f(m.repurchased),
            "satisfaction" => f(m.satisfaction) / 100.0,
            "detractor_share" => f(m.detractors),
            _ => 0.0,
        };
        let x = match self.key {
            _ if self.per_customer => 1.0,
            "open_rate" | "click_rate" | "reply_rate" => f(m.marketing_sends()),
            "recall_rate" => f(m.triggers),
            "messaging_cost_per_recall"
            | "incentive_cost_per_recall"
            | "cost_per_recall"
            | "repurchase_rate" => f(m.recalled),
            "satisfaction" | "detractor_share" => f(m.feedback),
            _ => 0.0,
        };
        (x, y)
    }
}

/// The exposed customers of one arm, per measure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmTally {
    pub customers: u64,
    pub stats: [Ratio; METRICS.len()],
    /// Earliest exposure.
    pub first_at: Option<i64>,
}

impl ArmTally {
    pub fn add(&mut self, x: &Exposure) {
        self.customers += 1;
        for (k, m) in METRICS.iter().enumerate() {
            let (a, b) = m.of(&x.measures);
            self.stats[k].add(a, b);
        }
        self.first_at = Some(self.first_at.map_or(x.at, |t| t.min(x.at)));
    }
}

/// Every exposed customer, by experiment and arm.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub arms: BTreeMap<(String, String), ArmTally>,
}

impl Tally {
    /// Adds the exposures of one customer's state.
    pub fn add(&mut self, exposures: &[Exposure]) {
        for x in exposures {
            self.arms
                .entry((x.experiment.clone(), x.arm.clone()))
                .or_default()
                .add(x);
        }
    }

    fn arm(&self, experiment: &str, arm: &str) -> ArmTally {
        self.arms
            .get(&(experiment.to_string(), arm.to_string()))
            .cloned()
            .unwrap_or_default()
    }
}

/// Where an experiment is in its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Phase {
    NotStarted,
    Running { day: i64 },
    Ended { days: i64 },
}

/// One arm's line: customers and each measure's value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmLine {
    pub arm: String,
    pub share: f64,
    pub exposed: u64,
    /// When the guardrail stopped the arm (`auto_stop`).
    pub stopped_at: Option<i64>,
    /// Per measure (in [`METRICS`] order); `None` without data.
    pub values: Vec<Option<f64>>,
}

/// One measure of one arm against the control.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub metric: &'static str,
    pub arm: String,
    /// arm − control, with its always-valid interval; `None` while the data
    /// cannot say anything yet.
    pub difference: Option<Interval>,
    pub verdict: Call,
    /// Exposed customers per arm, and days at the exposure rate so far, for
    /// a difference of the configured effect to show with 80 % power.
    pub plan: Option<Plan>,
}

/// What a comparison says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// The interval excludes 0 on the good side.
    Better,
    /// The interval excludes 0 on the bad side.
    Worse,
    /// The interval excludes 0, for a descriptive measure.
    Higher,
    Lower,
    /// The interval includes 0 (or there is no interval yet).
    NotYet,
}

/// The guardrail's verdict on one arm.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Guard {
    pub arm: String,
    #[serde(flatten)]
    pub verdict: GuardVerdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum GuardVerdict {
    TooFewCustomers { min_per_arm: u64 },
    Holds { worst: f64 },
    Flagged { at_least: f64 },
}

/// Who wins on the primary measure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "winner", content = "arm")]
pub enum Winner {
    /// An arm is better than the control on the primary measure (the best
    /// estimate among such arms) and its guardrail holds.
    Arm(String),
    /// Every other arm is worse than the control.
    Control,
    NotYet,
}

/// The report of one experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub experiment: String,
    pub tenant: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub at_ms: i64,
    pub phase: Phase,
    pub alpha: f64,
    pub effect: f64,
    pub primary: String,
    pub arms: Vec<ArmLine>,
    pub comparisons: Vec<Comparison>,
    pub guardrail: Vec<Guard>,
    pub winner: Winner,
}

/// The report of `e` from `tally` at `now`.
pub fn report(e: &Experiment, tally: &Tally, now: i64) -> Report {
    let j = &e.judging;
    let phase = if now < e.start_ms {
        Phase::NotStarted
    } else if now < e.end_ms {
        Phase::Running {
            day: (now - e.start_ms) / DAY_MS + 1,
        }
    } else {
        Phase::Ended {
            days: (e.end_ms - e.start_ms + DAY_MS - 1) / DAY_MS,
        }
    };
    let tallies: Vec<ArmTally> = e.arms.iter().map(|a| tally.arm(&e.name, &a.name)).collect();
    let exposed: u64 = tallies.iter().map(|t| t.customers).sum();
    let elapsed_days = (now.min(e.end_ms) - e.start_ms) as f64 / DAY_MS as f64;
    let per_day = if elapsed_days > 0.0 {
        exposed as f64 / elapsed_days.max(1.0)
    } else {
        0.0
    };
    let arms = e
        .arms
        .iter()
        .zip(&tallies)
        .enumerate()
        .map(|(i, (a, t))| ArmLine {
            arm: a.name.clone(),
            share: a.share,
            exposed: t.customers,
            stopped_at: e.stopped_at(i),
            values: t.stats.iter().map(Ratio::value).collect(),
        })
        .collect();
    let control = &tallies[e.control];
    let mut comparisons = Vec::new();
    let mut guardrail = Vec::new();
    for (k, (a, t)) in e.arms.iter().zip(&tallies).enumerate() {
        if k == e.control {
            continue;
        }
        for (i, m) in METRICS.iter().enumerate() {
            let (c, x) = (&control.stats[i], &t.stats[i]);
            let mut pooled = *c;
            pooled.merge(x);
            let unit_variance = if m.proportion {
                pooled.value().map(|p| p * (1.0 - p))
            } else {
                pooled.unit_variance()
            };
            let Some(v) = unit_variance.filter(|v| *v > 0.0) else {
                comparisons.push(Comparison {
                    metric: m.key,
                    arm: a.name.clone(),
                    difference: None,
                    verdict: Call::NotYet,
                    plan: None,
                });
                continue;
            };
            let sd = v.sqrt();
            let seq = Sequence {
                alpha: j.alpha,
                tau: j.effect * sd,
            };
            let difference = if m.proportion {
                seq.difference(Measure::Proportion, &proportion(c), &proportion(x))
            } else {
                seq.difference_of_ratios(c, x)
            };
            let share = e.arms[e.control].share;
            let plan = plan::plan(&seq, v, j.effect * sd, POWER, per_day, a.share, share);
            comparisons.push(Comparison {
                metric: m.key,
                arm: a.name.clone(),
                difference,
                verdict: call(m.better, difference),
                plan,
            });
            if i == UNSUBSCRIBE {
                let verdict = match guardrail::unsubscribe_verdict(
                    &seq,
                    &proportion(c),
                    &proportion(x),
                    j.guardrail_margin,
                ) {
                    Verdict::TooFewCustomers => GuardVerdict::TooFewCustomers {
                        min_per_arm: guardrail::MIN_PER_ARM,
                    },
                    Verdict::Holds { worst } => GuardVerdict::Holds { worst },
                    Verdict::Flagged { at_least } => GuardVerdict::Flagged { at_least },
                };
                guardrail.push(Guard {
                    arm: a.name.clone(),
                    verdict,
                });
            }
        }
        if !guardrail.iter().any(|g| g.arm == a.name) {
            guardrail.push(Guard {
                arm: a.name.clone(),
                verdict: if control.customers.min(t.customers) < guardrail::MIN_PER_ARM {
                    GuardVerdict::TooFewCustomers {
                        min_per_arm: guardrail::MIN_PER_ARM,
                    }
                } else {
                    // No unsubscribe at all in either arm: nothing is worse.
                    GuardVerdict::Holds { worst: 0.0 }
                },
            });
        }
    }
    let winner = winner(&comparisons, &guardrail, &j.primary);
    Report {
        experiment: e.name.clone(),
        tenant: e.tenant.clone(),
        start_ms: e.start_ms,
        end_ms: e.end_ms,
        at_ms: now,
        phase,
        alpha: j.alpha,
        effect: j.effect,
        primary: j.primary.clone(),
        arms,
        comparisons,
        guardrail,
        winner,
    }
}

/// The arms whose guardrail is flagged.
pub fn flagged(r: &Report) -> impl Iterator<Item = &str> {
    r.guardrail
        .iter()
        .filter(|g| matches!(g.verdict, GuardVerdict::Flagged { .. }))
        .map(|g| g.arm.as_str())
}

fn proportion(r: &Ratio) -> Sample {
    Sample::proportion(r.n, r.sy.round().max(0.0) as u64)
}

fn call(better: Better, d: Option<Interval>) -> Call {
    let Some(d) = d.filter(Interval::excludes_zero) else {
        return Call::NotYet;
    };
    let up = d.lower > 0.0;
    match (better, up) {
        (Better::Higher, true) | (Better::Lower, false) => Call::Better,
        (Better::Higher, false) | (Better::Lower, true) => Call::Worse,
        (Better::Neither, true) => Call::Higher,
        (Better::Neither, false) => Call::Lower,
    }
}

fn winner(comparisons: &[Comparison], guardrail: &[Guard], primary: &str) -> Winner {
    let on_primary: Vec<&Comparison> = comparisons.iter().filter(|c| c.metric == primary).collect();
    let holds = |arm: &str| {
        guardrail
            .iter()
            .any(|g| g.arm == arm && matches!(g.verdict, GuardVerdict::Holds { .. }))
    };
    let best = on_primary
        .iter()
        .filter(|c| c.verdict == Call::Better && holds(&c.arm))
        .max_by(|a, b| {
            // The best estimate in the measure's good direction.
            let sign = match METRICS.iter().find(|m| m.key == primary).map(|m| m.better) {
                Some(Better::Lower) => -1.0,
                _ => 1.0,
            };
            let est = |c: &Comparison| sign * c.difference.map_or(0.0, |d| d.estimate);
            est(a).total_cmp(&est(b))
        });
    if let Some(c) = best {
        return Winner::Arm(c.arm.clone());
    }
    if !on_primary.is_empty() && on_primary.iter().all(|c| c.verdict == Call::Worse) {
        return Winner::Control;
    }
    Winner::NotYet
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::experiment::{ExperimentConfig, Experiments};
    use crate::domain::policy::{Policy, PolicyConfig};

    fn experiment() -> Experiment {
        let cfg: ExperimentConfig = toml::from_str(
            r#"
name = "wechat-1-vs-2"
tenant = "brandA"
start = "2026-12-01T00:00"
end = "2027-01-01T00:00"
[[arms]]
name = "control"
share = 0.5
[[arms]]
name = "one-a-day"
share = 0.5
caps.WECHAT = { limit = 1, window = "1d" }
"#,
        )
        .unwrap();
        let policy: Policy = PolicyConfig::default().resolve(None).unwrap();
        let x = Experiments::new(&[cfg], |_| &policy).unwrap();
        let e = x.all().next().unwrap().clone();
        e
    }

    fn exposed(arm: &str, at: i64, m: Measures) -> Exposure {
        Exposure {
            experiment: "wechat-1-vs-2".into(),
            arm: arm.into(),
            at,
            measures: m,
        }
    }

    fn customer(sends: u32, clicks: u32, unsubscribed: bool) -> Measures {
        Measures {
            sends: [sends, 0, 0, 0, 0],
            clicks,
            unsubscribes: u32::from(unsubscribed),
            ..Default::default()
        }
    }

    fn find<'r>(r: &'r Report, metric: &str) -> &'r Comparison {
        r.comparisons.iter().find(|c| c.metric == metric).unwrap()
    }

    /// The report's figures for a hand-computed example: four customers per
    /// arm, clicks 0, 1, 1, 2 (control, 2 sends each) and 1, 2, 2, 3 (one a
    /// day, 1 send each).
    ///
    /// clicks per customer: means 1 and 2, d = 1; each arm's variance 2/3,
    ///   V = 2/3 / 4 + 2/3 / 4 = 1/3. Pooled over the 8 customers (mean 1.5):
    ///   variance 6/7, τ = 0.1 √(6/7) = 0.0925820, τ² = 3/350.
    ///   half-width = √( V (V + τ²) / τ² × (2 ln 20 + ln((V + τ²) / V)) )
    ///   = √( 13.296296 × (5.9914645 + 0.0253893) ) = √80.00187 = 8.944376
    /// click rate: control 4 / 8 = 0.5, one a day 8 / 4 = 2, d = 1.5.
    /// sends per customer: 2 and 1, both arms without variance: no interval.
    #[test]
    fn figures_equal_a_hand_computed_example() {
        let e = experiment();
        let t = e.start_ms + 3 * DAY_MS + 1;
        let mut tally = Tally::default();
        for c in [0, 1, 1, 2] {
            tally.add(&[exposed("control", e.start_ms, customer(2, c, false))]);
        }
        for c in [1, 2, 2, 3] {
            tally.add(&[exposed("one-a-day", e.start_ms + 5, customer(1, c, false))]);
        }
        let r = report(&e, &tally, t);
        assert_eq!(r.phase, Phase::Running { day: 4 });
        assert_eq!(r.arms[0].exposed, 4);
        assert_eq!(r.arms[1].exposed, 4);
        let k = |key: &str| METRICS.iter().position(|m| m.key == key).unwrap();
        assert_eq!(r.arms[0].values[k("clicks_per_customer")], Some(1.0));
        assert_eq!(r.arms[1].values[k("clicks_per_customer")], Some(2.0));
        assert_eq!(r.arms[0].values[k("click_rate")], Some(0.5));
        assert_eq!(r.arms[1].values[k("click_rate")], Some(2.0));
        assert_eq!(r.arms[0].values[k("sends_per_customer")], Some(2.0));

        let c = find(&r, "clicks_per_customer");
        let d = c.difference.unwrap();
        assert!((d.estimate - 1.0).abs() < 1e-12);
        let (v, t2) = (1.0f64 / 3.0, 0.01 * 6.0 / 7.0);
        let h = (v * (v + t2) / t2 * (2.0 * 20f64.ln() + ((v + t2) / v).ln())).sqrt();
        assert!((d.half_width() - h).abs() < 1e-9, "{d:?}");
        assert!((h - 8.944_376).abs() < 1e-6, "{h}");
        // Eight customers prove nothing.
        assert_eq!(c.verdict, Call::NotYet);
        let rate = find(&r, "click_rate").difference.unwrap();
        assert!((rate.estimate - 1.5).abs() < 1e-12);
        assert_eq!(find(&r, "sends_per_customer").difference, None);
        // Too few customers for the guardrail, so no winner.
        assert_eq!(
            r.guardrail[0].verdict,
            GuardVerdict::TooFewCustomers { min_per_arm: 100 }
        );
        assert_eq!(r.winner, Winner::NotYet);
    }

    /// 3,000 customers per arm: one a day has fewer sends and clicks per
    /// customer; unsubscribes alike (1 %), then far worse (8 %).
    #[test]
    fn the_winner_and_the_guardrail() {
        let e = experiment();
        let build = |arm_unsub_every: u32| {
            let mut tally = Tally::default();
            for i in 0..3_000u32 {
                tally.add(&[exposed(
                    "control",
                    e.start_ms,
                    customer(14 - i % 2, 2 + i % 3, i % 100 == 0),
                )]);
                tally.add(&[exposed(
                    "one-a-day",
                    e.start_ms,
                    customer(7 + i % 2, i % 3, i % arm_unsub_every == 0),
                )]);
            }
            report(&e, &tally, e.start_ms + 20 * DAY_MS)
        };
        let r = build(100);
        assert_eq!(find(&r, "clicks_per_customer").verdict, Call::Worse);
        assert_eq!(find(&r, "sends_per_customer").verdict, Call::Lower);
        assert!(matches!(r.guardrail[0].verdict, GuardVerdict::Holds { .. }));
        assert_eq!(r.winner, Winner::Control);
        assert_eq!(flagged(&r).count(), 0);

        let r = build(12);
        assert!(matches!(
            r.guardrail[0].verdict,
            GuardVerdict::Flagged { at_least } if at_least > 0.0
        ));
        assert_eq!(flagged(&r).collect::<Vec<_>>(), vec!["one-a-day"]);
        // The sample size of a measure is finite and the duration follows
        // from the exposure rate (6,000 customers in 20 days).
        let p = find(&r, "clicks_per_customer").plan.unwrap();
        assert!(p.per_arm > 0);
        assert_eq!(p.days, Some((p.per_arm as f64 / 150.0).ceil() as u64));
    }

    /// Repeated A/A experiments through the report itself (measures per
    /// customer, the delta method for rates, τ from the data): 1,000
    /// experiments of 60 days, 50 new exposed customers per arm a day, the
    /// report read every day. A false positive is an interval excluding 0 on
    /// any day; its rate must stay at or below α = 5 % for each measure.
    #[test]
    fn a_a_experiments_read_daily_stay_within_alpha() {
        use super::super::aa_tests::Rng;
        let e = experiment();
        let mut rng = Rng(20_261_207);
        let watched = [
            "click_rate",
            "clicks_per_customer",
            "unsubscribe_rate",
            "sends_per_customer",
        ];
        let mut hits = [0u32; 4];
        const RUNS: u32 = 1_000;
        for _ in 0..RUNS {
            let mut arms = [ArmTally::default(), ArmTally::default()];
            let mut seen = [false; 4];
            for day in 0..60 {
                for arm in &mut arms {
                    for _ in 0..50 {
                        let sends = 1 + (rng.unit() * 6.0) as u32;
                        let clicks = (0..sends).filter(|_| rng.unit() < 0.08).count() as u32;
                        let unsub = rng.unit() < 0.03;
                        arm.add(&exposed("x", e.start_ms, customer(sends, clicks, unsub)));
                    }
                }
                let mut tally = Tally::default();
                for (name, t) in ["control", "one-a-day"].iter().zip(&arms) {
                    tally
                        .arms
                        .insert(("wechat-1-vs-2".into(), name.to_string()), t.clone());
                }
                let r = report(&e, &tally, e.start_ms + (day + 1) * DAY_MS);
                for (k, key) in watched.iter().enumerate() {
                    let c = find(&r, key);
                    seen[k] |= c.difference.is_some_and(|d| d.excludes_zero());
                }
            }
            for k in 0..4 {
                hits[k] += u32::from(seen[k]);
            }
        }
        for (k, key) in watched.iter().enumerate() {
            let rate = f64::from(hits[k]) / f64::from(RUNS);
            eprintln!("A/A through the report, {key}: false-positive rate {rate}");
            assert!(rate <= 0.05, "{key}: false-positive rate {rate}");
        }
    }
}
