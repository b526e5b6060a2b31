//! A customer's visits: count, spend, last treatment and the recent visit times
//! the revisit interval is learnt from.

use serde::{Deserialize, Serialize};

use super::event::VisitType;

/// What lapse keeps about a customer's visits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Visits {
    pub count: u32,
    pub first_at: Option<i64>,
    pub last_at: Option<i64>,
    /// Lifetime spend in minor units of `currency`.
    pub lifetime_spend: i64,
    pub currency: Option<String>,
    /// Treatment of the latest visit that named one.
    pub last_treatment: Option<String>,
    /// Event time of the visit `last_treatment` came from.
    pub last_treatment_at: Option<i64>,
    pub last_visit_type: Option<VisitType>,
    /// Most recent visit times, ascending, at most `visit_history` of them.
    pub recent: Vec<i64>,
}

/// Summary of the gaps between a customer's recent visits, in days.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GapStats {
    pub gaps: usize,
    pub mean_days: f64,
    pub median_days: f64,
    pub min_days: f64,
    pub max_days: f64,
}

impl Visits {
    /// Folds a visit at `t` in, keeping the latest `visit_history` visit times.
    /// Returns true when the visit's currency differs from the customer's (its
    /// amount is then not added to the lifetime spend).
    pub fn record(
        &mut self,
        t: i64,
        visit_type: VisitType,
        treatment: Option<&str>,
        amount: i64,
        currency: &str,
        visit_history: usize,
    ) -> bool {
        let v = self;
        v.count = v.count.saturating_add(1);
        v.first_at = Some(v.first_at.map_or(t, |f| f.min(t)));
        let is_latest = v.last_at.is_none_or(|l| t >= l);
        if is_latest {
            v.last_at = Some(t);
            v.last_visit_type = Some(visit_type);
        }
        if let Some(tr) = treatment {
            if v.last_treatment_at.is_none_or(|l| t >= l) {
                v.last_treatment = Some(tr.to_string());
                v.last_treatment_at = Some(t);
            }
        }
        let mismatch = match &v.currency {
            None => {
                v.currency = Some(currency.to_string());
                false
            }
            Some(c) => c != currency,
        };
        if !mismatch {
            v.lifetime_spend = v.lifetime_spend.saturating_add(amount);
        }
        if let Err(pos) = v.recent.binary_search(&t) {
            v.recent.insert(pos, t);
        } else {
            // Two visits at the same millisecond: keep both so the count of gaps is honest.
            let pos = v.recent.partition_point(|x| *x <= t);
            v.recent.insert(pos, t);
        }
        if v.recent.len() > visit_history {
            let drop = v.recent.len() - visit_history;
            v.recent.drain(..drop);
        }
        mismatch
    }

    pub fn gap_stats(&self) -> Option<GapStats> {
        if self.recent.len() < 2 {
            return None;
        }
        let mut gaps: Vec<f64> = self
            .recent
            .windows(2)
            .map(|w| (w[1] - w[0]) as f64 / 86_400_000.0)
            .collect();
        gaps.sort_by(|a, b| a.total_cmp(b));
        let n = gaps.len();
        let median = if n % 2 == 1 {
            gaps[n / 2]
        } else {
            (gaps[n / 2 - 1] + gaps[n / 2]) / 2.0
        };
        Some(GapStats {
            gaps: n,
            mean_days: gaps.iter().sum::<f64>() / n as f64,
            median_days: median,
            min_days: gaps[0],
            max_days: gaps[n - 1],
        })
    }
}
