//! The holdout draw: which customers form the control group of an experiment.
//! Part of the output contract: never change the domain string or the encoding.

use super::ids::digest;
use super::records::Arm;
use crate::domain::event::CustomerRef;
use crate::domain::lapse::LapsePolicy;

/// Whether a customer is in the holdout of `experiment`: a uniform 64-bit draw
/// from the hash of tenant, customer and experiment, below `share` × 2⁶⁴.
/// Deterministic (same answer on every call, every instance, every restart).
pub fn is_holdout(tenant: &str, customer: &str, experiment: &str, share: f64) -> bool {
    if share.is_nan() || share <= 0.0 {
        return false;
    }
    if share >= 1.0 {
        return true;
    }
    let d = digest(&[
        b"lapse.holdout.v1",
        tenant.as_bytes(),
        customer.as_bytes(),
        experiment.as_bytes(),
    ]);
    let x = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (x as f64) < share * 18_446_744_073_709_551_616.0
}

/// The arm of a customer under `p` (experiment name and holdout share).
pub fn arm_for(c: &CustomerRef, p: &LapsePolicy) -> Arm {
    if is_holdout(&c.tenant, &c.customer, &p.experiment, p.holdout_share) {
        Arm::Holdout
    } else {
        Arm::Treatment
    }
}
