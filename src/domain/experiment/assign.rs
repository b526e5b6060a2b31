//! Which arm of an experiment a customer is in: deterministic and sticky (the
//! same answer on every instance and after every restart), by a hash of tenant,
//! customer and experiment name. Part of the output contract: never change the
//! domain string or the encoding (a change re-draws every running experiment).
//!
//! Independent of the recall holdout (`recall/holdout.rs`): the holdout hashes
//! under the domain string `lapse.holdout.v1`, this one under
//! `lapse.experiment.arm.v1`; SHA-256 of different inputs gives independent
//! uniform draws, so each arm holds the holdout share of its customers.

use sha2::{Digest, Sha256};

/// A uniform 64-bit draw for (tenant, customer, experiment): the first 8 bytes
/// (big-endian) of SHA-256 over the length-prefixed parts.
pub fn draw(tenant: &str, customer: &str, experiment: &str) -> u64 {
    let mut h = Sha256::new();
    for p in [
        b"lapse.experiment.arm.v1".as_slice(),
        tenant.as_bytes(),
        customer.as_bytes(),
        experiment.as_bytes(),
    ] {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let d: [u8; 32] = h.finalize().into();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Upper bounds of the arms' ranges of draws for `shares` (which sum to 1):
/// arm `i` takes the draws below `bounds[i]` and at or above `bounds[i-1]`.
/// The last bound is `u64::MAX` (inclusive), so every draw has an arm.
pub fn bounds(shares: &[f64]) -> Vec<u64> {
    let mut acc = 0.0;
    let mut out = Vec::with_capacity(shares.len());
    for (i, s) in shares.iter().enumerate() {
        acc += s;
        out.push(if i + 1 == shares.len() {
            u64::MAX
        } else {
            // 2^64 × acc, saturating (an f64 above 2^64 casts to u64::MAX).
            (acc * 18_446_744_073_709_551_616.0) as u64
        });
    }
    out
}

/// The arm index of draw `x` under `bounds`.
pub fn arm_of(x: u64, bounds: &[u64]) -> usize {
    bounds
        .iter()
        .position(|b| x < *b)
        .unwrap_or(bounds.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::recall::is_holdout;

    #[test]
    fn shares_hold_within_one_point_over_100000_customers() {
        let shares = [0.5, 0.3, 0.2];
        let b = bounds(&shares);
        let mut n = [0usize; 3];
        for i in 0..100_000 {
            n[arm_of(draw("brandA", &format!("c{i}"), "wechat-1-vs-2"), &b)] += 1;
        }
        for (k, s) in shares.iter().enumerate() {
            let got = n[k] as f64 / 100_000.0;
            assert!((got - s).abs() <= 0.01, "arm {k}: {got} for share {s}");
        }
    }

    #[test]
    fn the_draw_is_stable_across_restarts() {
        // Fixed expectations (checked independently with Python's hashlib): a
        // change of hash, domain string or encoding fails here.
        assert_eq!(draw("brandA", "c1", "wechat-1-vs-2"), 0xa153_542d_0a33_fa0a);
        let b = bounds(&[0.5, 0.5]);
        let arms: Vec<usize> = ["c1", "c2", "c3", "c4", "c5", "c6"]
            .iter()
            .map(|c| arm_of(draw("brandA", c, "wechat-1-vs-2"), &b))
            .collect();
        assert_eq!(arms, vec![1, 0, 0, 1, 0, 1]);
    }

    #[test]
    fn tenant_customer_and_experiment_all_move_the_draw() {
        let x = draw("brandA", "c1", "e1");
        assert_ne!(x, draw("brandB", "c1", "e1"));
        assert_ne!(x, draw("brandA", "c2", "e1"));
        assert_ne!(x, draw("brandA", "c1", "e2"));
        // Length prefixes: moving a character between parts changes the draw.
        assert_ne!(draw("ab", "c", "e"), draw("a", "bc", "e"));
    }

    #[test]
    fn every_arm_holds_the_recall_holdout_share() {
        // Independence from the holdout draw: under the same experiment name
        // the holdout share is the same in both arms (10 % ± 1 point).
        let b = bounds(&[0.5, 0.5]);
        let mut n = [0usize; 2];
        let mut held = [0usize; 2];
        for i in 0..100_000 {
            let c = format!("c{i}");
            let arm = arm_of(draw("brandA", &c, "recall-v1"), &b);
            n[arm] += 1;
            held[arm] += is_holdout("brandA", &c, "recall-v1", 0.10) as usize;
        }
        for k in 0..2 {
            let share = held[k] as f64 / n[k] as f64;
            assert!((share - 0.10).abs() <= 0.01, "arm {k}: holdout {share}");
        }
    }

    #[test]
    fn bounds_cover_every_draw() {
        let b = bounds(&[0.25, 0.25, 0.5]);
        assert_eq!(arm_of(0, &b), 0);
        assert_eq!(arm_of(u64::MAX, &b), 2);
        assert_eq!(arm_of(1 << 62, &b), 1);
        assert_eq!(arm_of(1 << 63, &b), 2);
        assert_eq!(bounds(&[1.0]), vec![u64::MAX]);
    }
}
