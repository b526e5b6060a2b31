//! How many exposed customers, and how many days, an experiment needs before
//! its always-valid interval can be expected to show a given difference.

use super::stats::Sequence;

/// The estimate for one comparison (arm vs control).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Plan {
    /// Exposed customers needed in each of the two arms.
    pub per_arm: u64,
    /// Days at the given exposure rate (the smaller arm's share of it fills last).
    pub days: Option<u64>,
}

/// The standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Customers per arm (equal arms) at which a true difference `effect` is
/// expected to be outside the interval with probability `power`, when one
/// customer's outcome has variance `variance` (p (1 − p) for a rate): the
/// smallest n with half-width(V) + z(power) √V ≤ |effect|, V = 2 variance / n.
/// `None` when no n up to 10⁹ gets there (no effect, no variance, bad input).
pub fn customers_per_arm(s: &Sequence, variance: f64, effect: f64, power: f64) -> Option<u64> {
    if !(variance > 0.0 && effect.abs() > 0.0 && power > 0.0 && power < 1.0) {
        return None;
    }
    let z = normal_quantile(power);
    let enough = |n: u64| {
        let v = 2.0 * variance / n as f64;
        s.half_width(v) + z * v.sqrt() <= effect.abs()
    };
    const MAX: u64 = 1_000_000_000;
    let mut hi = 2;
    while !enough(hi) {
        hi *= 2;
        if hi > MAX {
            return None;
        }
    }
    let mut lo = hi / 2; // not enough (or 1)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if enough(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// The plan for an arm of `arm_share` against a control of `control_share`,
/// with `exposed_per_day` customers exposed per day across the experiment.
pub fn plan(
    s: &Sequence,
    variance: f64,
    effect: f64,
    power: f64,
    exposed_per_day: f64,
    arm_share: f64,
    control_share: f64,
) -> Option<Plan> {
    let per_arm = customers_per_arm(s, variance, effect, power)?;
    let slowest = arm_share.min(control_share) * exposed_per_day;
    let days = (slowest > 0.0).then(|| (per_arm as f64 / slowest).ceil() as u64);
    Some(Plan { per_arm, days })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantiles() {
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        assert!((normal_quantile(0.8) - 0.841_621_233_6).abs() < 1e-8);
        assert!((normal_quantile(0.975) - 1.959_963_985).abs() < 1e-8);
        assert!((normal_quantile(0.01) + 2.326_347_874).abs() < 1e-8);
    }

    #[test]
    fn the_sample_size_is_the_smallest_that_suffices() {
        let s = Sequence {
            alpha: 0.05,
            tau: 0.005,
        };
        let var = 0.02 * 0.98; // an unsubscribe rate around 2 %
        let n = customers_per_arm(&s, var, 0.005, 0.8).unwrap();
        let ok = |n: u64| {
            let v = 2.0 * var / n as f64;
            s.half_width(v) + normal_quantile(0.8) * v.sqrt() <= 0.005
        };
        assert!(ok(n) && !ok(n - 1), "{n}");
        // About 3× a fixed-horizon test's 12,300 (the price of peeking every day).
        assert!((20_000..60_000).contains(&n), "{n}");
        // A bigger effect needs fewer customers; more power needs more.
        assert!(customers_per_arm(&s, var, 0.01, 0.8).unwrap() < n);
        assert!(customers_per_arm(&s, var, 0.005, 0.9).unwrap() > n);
        assert_eq!(customers_per_arm(&s, var, 0.0, 0.8), None);
    }

    #[test]
    fn duration_follows_the_smaller_arm() {
        let s = Sequence {
            alpha: 0.05,
            tau: 0.005,
        };
        let var = 0.02 * 0.98;
        let p = plan(&s, var, 0.005, 0.8, 1_000.0, 0.2, 0.8).unwrap();
        assert_eq!(p.days, Some((p.per_arm as f64 / 200.0).ceil() as u64));
        assert_eq!(plan(&s, var, 0.005, 0.8, 0.0, 0.5, 0.5).unwrap().days, None);
    }
}
