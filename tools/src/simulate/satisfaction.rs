//! Simulated satisfaction: after a treatment a share of customers answer a
//! survey (NPS mostly, some CSAT), less happily the more marketing they got
//! lately; lapse answers a detractor with a CARE_CALL trigger, which the
//! simulator counts (it is no recall: the customer's revisit is unchanged).

use super::rng::SimRng;
use lapse::domain::event::FeedbackKind;
use lapse::domain::feedback::{class, FeedbackClass, FeedbackPolicy};

/// Share of treatments followed by a survey answer.
pub const ANSWER_SHARE: f64 = 0.35;
/// Share of the answers on the CSAT scale (the rest NPS).
pub const CSAT_SHARE: f64 = 0.2;
/// Each unit of recent contact fatigue (≈ one marketing message in the
/// fatigue half-life) costs this much of the score's 0–1 scale.
pub const FATIGUE_COST: f64 = 0.025;

/// A survey answer: its scale and score. The score is drawn on a 0–1 scale
/// around a happy customer's 0.8 (σ 0.2), lowered by `fatigue` (the
/// customer's recent marketing), then mapped onto the scale.
pub fn answer(rng: &mut SimRng, fatigue: f64) -> (FeedbackKind, u8) {
    let kind = if rng.chance(CSAT_SHARE) {
        FeedbackKind::Csat
    } else {
        FeedbackKind::Nps
    };
    let x = (0.8 + 0.2 * rng.normal() - FATIGUE_COST * fatigue).clamp(0.0, 1.0);
    let r = kind.range();
    let (lo, hi) = (*r.start() as f64, *r.end() as f64);
    (kind, (lo + x * (hi - lo)).round() as u8)
}

/// What the simulated customers said, and the care calls lapse sent back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Satisfaction {
    /// NPS answers: promoters, passives, detractors (default thresholds).
    pub nps: [u64; 3],
    pub nps_sum: u64,
    /// CSAT answers: satisfied (4–5), neutral, dissatisfied (1–2).
    pub csat: [u64; 3],
    pub csat_sum: u64,
    /// CARE_CALL triggers read back from lapse.
    pub care_calls: u64,
}

impl Satisfaction {
    pub fn record(&mut self, kind: FeedbackKind, score: u8) {
        let i = match class(kind, score, &FeedbackPolicy::default()) {
            FeedbackClass::Promoter => 0,
            FeedbackClass::Passive => 1,
            FeedbackClass::Detractor => 2,
        };
        match kind {
            FeedbackKind::Nps => {
                self.nps[i] += 1;
                self.nps_sum += u64::from(score);
            }
            FeedbackKind::Csat => {
                self.csat[i] += 1;
                self.csat_sum += u64::from(score);
            }
        }
    }
}

impl std::fmt::Display for Satisfaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nps: u64 = self.nps.iter().sum();
        let csat: u64 = self.csat.iter().sum();
        let share = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
        write!(
            f,
            "satisfaction: {nps} NPS answers, mean {:.1}, NPS {:+.0}, detractors {:.1} %; \
             {csat} CSAT answers, mean {:.2}, dissatisfied {:.1} %; care calls fired {}",
            self.nps_sum as f64 / nps.max(1) as f64,
            share(self.nps[0], nps) - share(self.nps[2], nps),
            share(self.nps[2], nps),
            self.csat_sum as f64 / csat.max(1) as f64,
            share(self.csat[2], csat),
            self.care_calls
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tired_customers_answer_worse_and_some_are_detractors() {
        let mean_nps = |fatigue: f64| {
            let mut rng = SimRng::new(3);
            let mut s = Satisfaction::default();
            for _ in 0..5_000 {
                let (kind, score) = answer(&mut rng, fatigue);
                assert!(kind.range().contains(&i32::from(score)));
                s.record(kind, score);
            }
            let n: u64 = s.nps.iter().sum();
            assert!(s.csat.iter().sum::<u64>() > 500, "{s:?}");
            (s.nps_sum as f64 / n as f64, s.nps[2] as f64 / n as f64)
        };
        let (rested, rested_detractors) = mean_nps(0.0);
        let (tired, tired_detractors) = mean_nps(12.0);
        assert!(rested > 7.0 && tired < rested - 2.0, "{rested} {tired}");
        assert!(rested_detractors > 0.02, "{rested_detractors}");
        assert!(tired_detractors > 2.0 * rested_detractors);
    }
}
