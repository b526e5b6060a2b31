//! A small reader for the Prometheus text exposition format, enough for the
//! benchmark to observe a running `lapse run` through its `/metrics` endpoint:
//! sums of counters, and quantiles estimated from histogram buckets.

use std::collections::BTreeMap;

/// One sample line: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Redis round-trip time per batch in ms (`lapse_redis_call_seconds_sum` /
/// batches) between two scrapes of one lapse process (`before` empty: since it
/// started): loads, saves, all calls.
pub fn redis_ms_per_batch(before: &Scrape, after: &Scrape, batches: u64) -> [f64; 3] {
    let name = "lapse_redis_call_seconds_sum";
    let per_batch = |filter: &[(&str, &str)]| {
        1000.0 * (after.sum_where(name, filter) - before.sum_where(name, filter))
            / batches.max(1) as f64
    };
    [
        per_batch(&[("op", "load")]),
        per_batch(&[("op", "save")]),
        per_batch(&[]),
    ]
}

/// The three figures of [`redis_ms_per_batch`], as the benchmarks print them.
pub fn show_redis_ms_per_batch([load, save, all]: [f64; 3]) -> String {
    format!("load {load:.1} ms, save {save:.1} ms, all calls {all:.1} ms")
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format; lines that are not samples (comments, blanks,
    /// anything malformed) are skipped.
    pub fn parse(text: &str) -> Scrape {
        Scrape {
            samples: text.lines().filter_map(parse_line).collect(),
        }
    }

    /// Sum of every series of `name` (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.sum_where(name, &[])
    }

    /// Sum of the series of `name` whose labels include every `(key, value)` of `filter`.
    pub fn sum_where(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Max of `name` over matching series (fleet gauges: every instance exports the same value).
    pub fn max(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, filter)
            .map(|s| s.value)
            .reduce(f64::max)
    }

    /// Sum per value of `label`, over the series matching `filter`.
    pub fn by(&self, name: &str, label: &str, filter: &[(&str, &str)]) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for s in self.matching(name, filter) {
            if let Some(v) = s.labels.get(label) {
                *m.entry(v.clone()).or_insert(0.0) += s.value;
            }
        }
        m
    }

    /// The cumulative buckets `(upper bound, count)` of histogram `name`
    /// (series matching `filter`, summed), sorted by bound, `+Inf` last.
    pub fn buckets(&self, name: &str, filter: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == bucket) {
            if !filter
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            {
                continue;
            }
            let Some(le) = s.labels.get("le").and_then(|v| parse_value(v)) else {
                continue;
            };
            // Order by the bound's bits: bounds are positive, so bit order is numeric order.
            let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += s.value;
        }
        by_le.into_values().collect()
    }

    /// Estimated `q`-quantile (0..=1) of histogram `name`, interpolating linearly
    /// inside the bucket like PromQL's `histogram_quantile`. `None` without observations.
    pub fn quantile(&self, name: &str, filter: &[(&str, &str)], q: f64) -> Option<f64> {
        quantile(&self.buckets(name, filter), q)
    }

    /// Mean of histogram `name`: `_sum / _count` (`None` without observations).
    pub fn mean(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let count = self.sum_where(&format!("{name}_count"), filter);
        (count > 0.0).then(|| self.sum_where(&format!("{name}_sum"), filter) / count)
    }
}

/// `histogram_quantile` over cumulative buckets sorted by bound (`+Inf` last).
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                // Above the highest finite bound: all we know is "more than it".
                return Some(prev_bound);
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return Some(bound);
            }
            return Some(prev_bound + (bound - prev_bound) * (rank - prev_count) / in_bucket);
        }
        prev_bound = bound;
        prev_count = count;
    }
    Some(prev_bound)
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let name = &line[..open];
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (name, labels, after)
        }
        None => {
            let end = line.find(char::is_whitespace)?;
            (&line[..end], BTreeMap::new(), &line[end..])
        }
    };
    // The value, then an optional timestamp.
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and the text after `}`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        rest = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP lapse_records_total Input records consumed.
# TYPE lapse_records_total counter
lapse_records_total{event_type="send",topic="engagement.sends"} 600
lapse_records_total{event_type="open",topic="engagement.opens"} 400
lapse_state_writes_total 250
lapse_batch_seconds_bucket{le="0.001"} 0
lapse_batch_seconds_bucket{le="0.002"} 10
lapse_batch_seconds_bucket{le="0.004"} 90
lapse_batch_seconds_bucket{le="+Inf"} 100
lapse_batch_seconds_sum 0.3
lapse_batch_seconds_count 100
lapse_redis_call_seconds_sum{op="load"} 2
lapse_redis_call_seconds_count{op="load"} 4
weird{a="x\"y,z}",b="2"} 1.5 1700000000000
"#;

    #[test]
    fn sums_counters_with_and_without_labels() {
        let s = Scrape::parse(PAGE);
        assert_eq!(s.sum("lapse_records_total"), 1000.0);
        assert_eq!(
            s.sum_where("lapse_records_total", &[("event_type", "open")]),
            400.0
        );
        assert_eq!(s.sum("lapse_state_writes_total"), 250.0);
        assert_eq!(s.sum("absent"), 0.0);
        assert_eq!(s.sum_where("weird", &[("a", "x\"y,z}"), ("b", "2")]), 1.5);
    }

    #[test]
    fn histogram_quantiles_interpolate_inside_buckets() {
        let s = Scrape::parse(PAGE);
        let p50 = s.quantile("lapse_batch_seconds", &[], 0.5).unwrap();
        assert!((p50 - 0.003).abs() < 1e-9, "{p50}");
        let p05 = s.quantile("lapse_batch_seconds", &[], 0.05).unwrap();
        assert!((p05 - 0.0015).abs() < 1e-9, "{p05}");
        // In the +Inf bucket: the highest finite bound is the best answer.
        assert_eq!(s.quantile("lapse_batch_seconds", &[], 0.99), Some(0.004));
        assert_eq!(s.mean("lapse_batch_seconds", &[]), Some(0.003));
        assert_eq!(
            s.mean("lapse_redis_call_seconds", &[("op", "load")]),
            Some(0.5)
        );
        assert_eq!(s.quantile("absent", &[], 0.5), None);
    }

    #[test]
    fn redis_time_per_batch_since_start_or_over_a_window() {
        let after = Scrape::parse(PAGE);
        let since_start = redis_ms_per_batch(&Scrape::default(), &after, 4);
        assert_eq!(since_start, [500.0, 0.0, 500.0]);
        let before = Scrape::parse("lapse_redis_call_seconds_sum{op=\"load\"} 1\n");
        assert_eq!(redis_ms_per_batch(&before, &after, 2), [500.0, 0.0, 500.0]);
        assert_eq!(
            show_redis_ms_per_batch(since_start),
            "load 500.0 ms, save 0.0 ms, all calls 500.0 ms"
        );
    }
}
