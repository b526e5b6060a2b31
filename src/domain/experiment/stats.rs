//! Always-valid confidence sequences for the difference between an arm and
//! the control: of two proportions (unsubscribe rate, click rate) and of two
//! means (revenue per exposed customer). Valid under continuous monitoring:
//! the probability that the interval *ever* excludes the true difference,
//! however often it is looked at, is at most `alpha`.
//!
//! Method: the mixture sequential probability ratio test (mSPRT) of Johari,
//! Pekelis and Walsh ("Always valid inference", 2017; Optimizely's stats
//! engine) with a normal mixing distribution N(0, τ²) over the difference, on
//! the normal approximation of the difference of means `d` with variance `V`.
//! Inverting the test gives the interval
//!
//! ```text
//!   d ± sqrt( V (V + τ²) / τ² × ( 2 ln(1/α) + ln((V + τ²) / V) ) )
//! ```
//!
//! `V` is estimated from the data: for proportions the pooled rate (smoothed
//! by one success and one failure, so a run of zeros has a variance), for means
//! the arms' sample variances. `τ` is the size of difference the experiment is
//! meant to find, in the outcome's unit: the interval is narrowest around the
//! sample size at which such a difference shows.

/// Sufficient statistics of one arm's outcomes: count, sum, sum of squares.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Sample {
    /// A 0/1 outcome: `successes` of `n`.
    pub fn proportion(n: u64, successes: u64) -> Sample {
        let x = successes.min(n) as f64;
        Sample {
            n,
            sum: x,
            sum_sq: x,
        }
    }

    pub fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    /// Unbiased sample variance (0 below two observations).
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = self.n as f64;
        ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0)
    }
}

/// What is measured: decides how the variance of the difference is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// 0/1 outcomes per customer (rates).
    Proportion,
    /// Real-valued outcomes per customer (revenue).
    Mean,
}

/// The arm's difference to the control with its always-valid interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Interval {
    /// arm − control.
    pub estimate: f64,
    pub lower: f64,
    pub upper: f64,
}

impl Interval {
    /// The interval excludes 0.
    pub fn excludes_zero(&self) -> bool {
        self.lower > 0.0 || self.upper < 0.0
    }

    pub fn half_width(&self) -> f64 {
        (self.upper - self.lower) / 2.0
    }
}

/// Error level and mixing scale of a confidence sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sequence {
    /// Probability of the interval ever missing the true difference (e.g. 0.05).
    pub alpha: f64,
    /// τ: the size of difference the experiment looks for, in the outcome's unit.
    pub tau: f64,
}

impl Sequence {
    /// Half-width of the interval when the difference has variance `v`.
    pub fn half_width(&self, v: f64) -> f64 {
        let t2 = self.tau * self.tau;
        (v * (v + t2) / t2 * (2.0 * (1.0 / self.alpha).ln() + ((v + t2) / v).ln())).sqrt()
    }

    /// Variance of (arm mean − control mean) estimated from the samples; `None`
    /// while an arm has fewer than two observations or no variance at all.
    pub fn variance(&self, m: Measure, control: &Sample, arm: &Sample) -> Option<f64> {
        if control.n < 2 || arm.n < 2 {
            return None;
        }
        let (na, nb) = (control.n as f64, arm.n as f64);
        let v = match m {
            Measure::Proportion => {
                let p = (control.sum + arm.sum + 1.0) / (na + nb + 2.0);
                p * (1.0 - p) * (1.0 / na + 1.0 / nb)
            }
            Measure::Mean => control.variance() / na + arm.variance() / nb,
        };
        (v > 0.0 && v.is_finite()).then_some(v)
    }

    /// The interval for arm − control, or `None` while the data cannot say
    /// anything yet (see [`Sequence::variance`]).
    pub fn difference(&self, m: Measure, control: &Sample, arm: &Sample) -> Option<Interval> {
        let v = self.variance(m, control, arm)?;
        let d = arm.mean() - control.mean();
        let h = self.half_width(v);
        Some(Interval {
            estimate: d,
            lower: d - h,
            upper: d + h,
        })
    }
}

/// Sufficient statistics of a ratio metric (e.g. clicks per send) over
/// customers: each customer contributes a numerator `y` and a denominator `x`;
/// the metric is Σy / Σx. Its variance comes from the delta method (the
/// customer, not the send, is the unit the arms are drawn by, so sends of one
/// customer are not independent). A mean per customer is the case x = 1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ratio {
    pub n: u64,
    pub sx: f64,
    pub sy: f64,
    pub sxx: f64,
    pub syy: f64,
    pub sxy: f64,
}

impl Ratio {
    pub fn add(&mut self, x: f64, y: f64) {
        self.n += 1;
        self.sx += x;
        self.sy += y;
        self.sxx += x * x;
        self.syy += y * y;
        self.sxy += x * y;
    }

    /// Σy / Σx; `None` while Σx is 0.
    pub fn value(&self) -> Option<f64> {
        (self.sx > 0.0).then(|| self.sy / self.sx)
    }

    /// Variance of one customer's linearised contribution
    /// (y − R x) / x̄: the delta method's per-unit variance. `None` below two
    /// customers or while Σx is 0.
    pub fn unit_variance(&self) -> Option<f64> {
        if self.n < 2 {
            return None;
        }
        let r = self.value()?;
        let n = self.n as f64;
        let mx = self.sx / n;
        let cov = |sab: f64, sa: f64, sb: f64| (sab - sa * sb / n) / (n - 1.0);
        let vx = cov(self.sxx, self.sx, self.sx);
        let vy = cov(self.syy, self.sy, self.sy);
        let vxy = cov(self.sxy, self.sx, self.sy);
        Some(((vy - 2.0 * r * vxy + r * r * vx) / (mx * mx)).max(0.0))
    }

    /// Sum of two tallies.
    pub fn merge(&mut self, o: &Ratio) {
        self.n += o.n;
        self.sx += o.sx;
        self.sy += o.sy;
        self.sxx += o.sxx;
        self.syy += o.syy;
        self.sxy += o.sxy;
    }
}

impl Sequence {
    /// The interval for arm − control of a ratio metric (delta method), or
    /// `None` while either arm cannot say anything yet.
    pub fn difference_of_ratios(&self, control: &Ratio, arm: &Ratio) -> Option<Interval> {
        let v = control.unit_variance()? / control.n as f64 + arm.unit_variance()? / arm.n as f64;
        if !(v > 0.0 && v.is_finite()) {
            return None;
        }
        let d = arm.value()? - control.value()?;
        let h = self.half_width(v);
        Some(Interval {
            estimate: d,
            lower: d - h,
            upper: d + h,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-computed example (the arithmetic written out):
    /// control 100 unsubscribes of 10,000, arm 150 of 10,000; α = 0.05, τ = 0.01.
    /// d = 0.015 − 0.010 = 0.005
    /// p̃ = (100 + 150 + 1) / (20,000 + 2) = 251 / 20,002 = 0.012548745…
    /// V = p̃ (1 − p̃) (2 / 10,000) = 2.4782548…e-6
    /// V + τ² = 1.0247825…e-4;  V (V + τ²) / τ² = 2.5396723…e-6
    /// 2 ln 20 = 5.9914645;  ln((V + τ²)/V) = ln(41.35098) = 3.7220960
    /// half-width = sqrt(2.5396723e-6 × 9.7135606) = 4.966816…e-3
    #[test]
    fn hand_computed_difference_of_proportions() {
        let s = Sequence {
            alpha: 0.05,
            tau: 0.01,
        };
        let c = Sample::proportion(10_000, 100);
        let a = Sample::proportion(10_000, 150);
        let p: f64 = 251.0 / 20_002.0;
        let v = p * (1.0 - p) * 2.0 / 10_000.0;
        assert!((s.variance(Measure::Proportion, &c, &a).unwrap() - v).abs() < 1e-18);
        let i = s.difference(Measure::Proportion, &c, &a).unwrap();
        assert!((i.estimate - 0.005).abs() < 1e-12);
        let expected_h =
            (v * (v + 1e-4) / 1e-4 * (2.0 * 20f64.ln() + ((v + 1e-4) / v).ln())).sqrt();
        assert!((i.half_width() - expected_h).abs() < 1e-12);
        // The figures of the comment, to the digits written there.
        assert!((v - 2.478_254_8e-6).abs() < 1e-12, "{v}");
        assert!(
            (i.half_width() - 4.966_816e-3).abs() < 1e-8,
            "{}",
            i.half_width()
        );
        // 0.005 ± 0.00497: just excludes zero.
        assert!(i.lower > 0.0 && i.lower < 1e-4, "{i:?}");
        assert!(i.excludes_zero());
    }

    #[test]
    fn hand_computed_difference_of_means() {
        // control: 1, 2, 3 (mean 2, var 1); arm: 2, 4, 6 (mean 4, var 4).
        let mut c = Sample::default();
        let mut a = Sample::default();
        for x in [1.0, 2.0, 3.0] {
            c.add(x);
        }
        for x in [2.0, 4.0, 6.0] {
            a.add(x);
        }
        let s = Sequence {
            alpha: 0.1,
            tau: 1.0,
        };
        // V = 1/3 + 4/3 = 5/3; V(V+1)/1 = 40/9; 2 ln 10 + ln(8/5).
        let v = 5.0 / 3.0;
        assert!((s.variance(Measure::Mean, &c, &a).unwrap() - v).abs() < 1e-12);
        let h = (40.0f64 / 9.0 * (2.0 * 10f64.ln() + 1.6f64.ln())).sqrt();
        let i = s.difference(Measure::Mean, &c, &a).unwrap();
        assert!((i.estimate - 2.0).abs() < 1e-12);
        assert!((i.half_width() - h).abs() < 1e-12);
        assert!(!i.excludes_zero(), "three customers prove nothing: {i:?}");
    }

    /// With x = 1 a ratio is a mean, and its interval is the means' interval.
    #[test]
    fn a_ratio_over_ones_is_a_mean() {
        let (mut c, mut a) = (Ratio::default(), Ratio::default());
        let (mut cs, mut as_) = (Sample::default(), Sample::default());
        for (i, y) in [1.0, 2.0, 3.0, 7.0].into_iter().enumerate() {
            c.add(1.0, y);
            cs.add(y);
            a.add(1.0, y * 2.0 + i as f64);
            as_.add(y * 2.0 + i as f64);
        }
        let s = Sequence {
            alpha: 0.05,
            tau: 1.0,
        };
        let r = s.difference_of_ratios(&c, &a).unwrap();
        let m = s.difference(Measure::Mean, &cs, &as_).unwrap();
        assert!((r.estimate - m.estimate).abs() < 1e-12);
        assert!((r.half_width() - m.half_width()).abs() < 1e-9);
    }

    /// Hand-computed delta method: customers (x sends, y clicks) = (2, 1),
    /// (4, 1), (6, 4). R = 6/12 = 0.5; x̄ = 4; var x = 4, var y = 3,
    /// cov = (2 + 4 + 24 − 12·6/3)/2 = 3; unit variance
    /// = (3 − 2·0.5·3 + 0.25·4)/16 = 1/16.
    #[test]
    fn hand_computed_ratio_variance() {
        let mut r = Ratio::default();
        for (x, y) in [(2.0, 1.0), (4.0, 1.0), (6.0, 4.0)] {
            r.add(x, y);
        }
        assert_eq!(r.value(), Some(0.5));
        assert!((r.unit_variance().unwrap() - 1.0 / 16.0).abs() < 1e-12);
    }

    #[test]
    fn too_little_data_gives_no_interval() {
        let s = Sequence {
            alpha: 0.05,
            tau: 0.01,
        };
        let one = Sample::proportion(1, 0);
        let many = Sample::proportion(100, 3);
        assert_eq!(s.difference(Measure::Proportion, &one, &many), None);
        let flat = Sample {
            n: 10,
            sum: 10.0,
            sum_sq: 10.0,
        };
        assert_eq!(s.difference(Measure::Mean, &flat, &flat), None);
        // Proportions are smoothed: all zeros still have a (wide) interval.
        let zeros = Sample::proportion(50, 0);
        assert!(!s
            .difference(Measure::Proportion, &zeros, &zeros)
            .unwrap()
            .excludes_zero());
    }

    #[test]
    fn the_interval_narrows_as_data_grows() {
        let s = Sequence {
            alpha: 0.05,
            tau: 0.01,
        };
        let w = |n| {
            s.difference(
                Measure::Proportion,
                &Sample::proportion(n, n / 20),
                &Sample::proportion(n, n / 20),
            )
            .unwrap()
            .half_width()
        };
        assert!(w(1_000) > w(10_000) && w(10_000) > w(100_000));
    }
}
