//! Contact-policy experiments (issue 15): the statistics that judge them.
//!
//! * `stats`, `plan`, `guardrail`: always-valid intervals, sample size and
//!   duration, the unsubscribe guardrail.

pub mod guardrail;
pub mod plan;
pub mod stats;

#[cfg(test)]
mod aa_tests;
