//! Repeated A/A (and A/B) simulations of the confidence sequence under daily
//! peeking: 1,000 experiments of 60 days each, the interval looked at every day,
//! a false positive when it excludes 0 on any day. Seeded, so deterministic.

use super::stats::{Measure, Sample, Sequence};

/// SplitMix64: a small seeded generator (no dependency, same stream everywhere).
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

const RUNS: usize = 1_000;
const DAYS: usize = 60;
const PER_ARM_PER_DAY: usize = 100;

/// Share of runs in which `rejects` is true on some day. `draw(rng, arm)` is one
/// customer's outcome in arm 0 (control) or 1.
fn rejection_rate(
    seed: u64,
    mut draw: impl FnMut(&mut Rng, usize) -> f64,
    rejects: impl Fn(&Sample, &Sample) -> bool,
) -> f64 {
    let mut rng = Rng(seed);
    let mut hits = 0;
    for _ in 0..RUNS {
        let mut s = [Sample::default(); 2];
        for _ in 0..DAYS {
            for (arm, sample) in s.iter_mut().enumerate() {
                for _ in 0..PER_ARM_PER_DAY {
                    sample.add(draw(&mut rng, arm));
                }
            }
            if rejects(&s[0], &s[1]) {
                hits += 1;
                break;
            }
        }
    }
    hits as f64 / RUNS as f64
}

fn bernoulli(p: [f64; 2]) -> impl FnMut(&mut Rng, usize) -> f64 {
    move |r, arm| (r.unit() < p[arm]) as u8 as f64
}

/// Revenue per exposed customer: 80 % spend nothing, the rest an exponential
/// amount (skewed, like clinic spend) with mean `mean[arm]`.
fn revenue(mean: [f64; 2]) -> impl FnMut(&mut Rng, usize) -> f64 {
    move |r, arm| {
        if r.unit() < 0.8 {
            0.0
        } else {
            -r.unit().ln() * mean[arm]
        }
    }
}

fn sequence_rejects(s: Sequence, m: Measure) -> impl Fn(&Sample, &Sample) -> bool {
    move |c, a| s.difference(m, c, a).is_some_and(|i| i.excludes_zero())
}

const RATES: Sequence = Sequence {
    alpha: 0.05,
    tau: 0.01,
};
const MONEY: Sequence = Sequence {
    alpha: 0.05,
    tau: 50.0,
};

#[test]
fn a_a_proportions_false_positive_rate_is_at_most_nominal_with_daily_peeking() {
    let fpr = rejection_rate(
        1,
        bernoulli([0.05, 0.05]),
        sequence_rejects(RATES, Measure::Proportion),
    );
    assert!(fpr <= RATES.alpha, "false-positive rate {fpr}");
}

#[test]
fn a_a_means_false_positive_rate_is_at_most_nominal_with_daily_peeking() {
    let fpr = rejection_rate(
        2,
        revenue([500.0, 500.0]),
        sequence_rejects(MONEY, Measure::Mean),
    );
    assert!(fpr <= MONEY.alpha, "false-positive rate {fpr}");
}

#[test]
fn the_simulation_catches_a_method_that_is_invalid_under_peeking() {
    // A fixed-horizon 95 % interval looked at daily: far above 5 %, which is
    // why the sequence exists (and proves the simulation can fail a method).
    let naive = |c: &Sample, a: &Sample| {
        RATES
            .variance(Measure::Proportion, c, a)
            .is_some_and(|v| (a.mean() - c.mean()).abs() > 1.959_964 * v.sqrt())
    };
    let fpr = rejection_rate(3, bernoulli([0.05, 0.05]), naive);
    assert!(fpr > 0.15, "naive peeking false-positive rate {fpr}");
}

#[test]
fn a_real_difference_is_found() {
    // 5 % vs 7 % unsubscribes, 6,000 customers per arm by day 60.
    let power = rejection_rate(
        4,
        bernoulli([0.05, 0.07]),
        sequence_rejects(RATES, Measure::Proportion),
    );
    assert!(power >= 0.8, "power {power}");
    let power = rejection_rate(
        5,
        revenue([500.0, 650.0]),
        sequence_rejects(MONEY, Measure::Mean),
    );
    assert!(power >= 0.5, "power {power}");
}
