//! A small, portable, seedable random number generator for the simulator.
//!
//! SplitMix64: the same seed gives the same stream on every platform and every
//! version of this crate's dependencies (unlike `rand`'s `StdRng`/`SmallRng`,
//! whose algorithms may change between releases), which is what a reproducible
//! simulation needs. Quality is ample for sampling a population; it is not
//! for cryptography.

/// SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(mix(seed ^ GOLDEN))
    }

    /// A stream keyed by several integers (e.g. seed, customer, day): streams
    /// for different keys are independent, so drawing more or fewer numbers in
    /// one never shifts another.
    pub fn keyed(parts: &[u64]) -> SimRng {
        let mut h = 0x243F_6A88_85A3_08D3u64;
        for p in parts {
            h = mix(h.wrapping_add(GOLDEN) ^ mix(*p));
        }
        SimRng(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p` (clamped to [0, 1]).
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Uniform in [0, n); 0 when n is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in [lo, hi); `lo` when the range is empty.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo) as u64) as i64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.f64(); // (0, 1]
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Log-normal with the given median and log-space standard deviation.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Index drawn with the given (non-negative) weights.
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.f64() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len().saturating_sub(1)
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_keyed() {
        let a: Vec<u64> = (0..5).map(|_| SimRng::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = SimRng::keyed(&[1, 2, 3]);
        let mut y = SimRng::keyed(&[1, 2, 3]);
        let mut z = SimRng::keyed(&[1, 3, 2]);
        let xs: Vec<u64> = (0..4).map(|_| x.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| y.next_u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| z.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        // A fixed value: the stream must not change between releases.
        assert_eq!(SimRng::keyed(&[42, 0, 0]).next_u64(), 0x7dfc_c60b_d3f6_3f11);
    }

    #[test]
    fn distributions_have_the_expected_moments() {
        let mut r = SimRng::new(1);
        let n = 100_000;
        let mean = (0..n).map(|_| r.f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let normals: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = normals.iter().sum::<f64>() / n as f64;
        let var = normals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.02 && (var - 1.0).abs() < 0.03, "{m} {var}");
        let mut ln: Vec<f64> = (0..n).map(|_| r.lognormal(120.0, 0.3)).collect();
        ln.sort_by(f64::total_cmp);
        let median = ln[n / 2];
        assert!((median - 120.0).abs() < 2.0, "{median}");
        let hits = (0..n).filter(|_| r.chance(0.2)).count() as f64 / n as f64;
        assert!((hits - 0.2).abs() < 0.01);
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[r.weighted(&[1.0, 2.0, 1.0])] += 1;
        }
        assert!(
            (counts[1] as f64 / n as f64 - 0.5).abs() < 0.01,
            "{counts:?}"
        );
        for _ in 0..1000 {
            let v = r.range(-3, 4);
            assert!((-3..4).contains(&v));
        }
        assert_eq!(r.range(5, 5), 5);
    }
}
