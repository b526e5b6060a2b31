//! Contact-policy experiments (issue 15): arms with policy overrides, sticky
//! assignment, exposure, and the statistics that judge them.
//!
//! * `spec`: `[[policy.experiments]]` as written;
//! * `active`: resolved and validated at start-up; a customer's arms and
//!   policy at a time; the arm an output carries;
//! * `assign`: the hash that draws the arm;
//! * `exposure`: when the arm first changes a decision;
//! * `measure`: what exposed customers did while the experiment ran;
//! * `switch`: a stopped arm's customers back on the control's policy;
//! * `stats`, `plan`, `guardrail`: always-valid intervals, sample size and
//!   duration, the unsubscribe guardrail;
//! * `report`: per arm and measure, the difference to the control, the
//!   guardrail's verdict and the winner.

pub mod active;
pub mod assign;
pub mod exposure;
pub mod guardrail;
pub mod measure;
pub mod plan;
pub mod report;
pub mod spec;
pub mod stats;
pub mod switch;

#[cfg(test)]
mod aa_tests;
#[cfg(test)]
mod tests;

pub use active::{policy_under, ArmTag, Assignment, Effective, Experiment, Experiments};
pub use exposure::{observe, Exposure};
pub use spec::{ArmConfig, ExperimentConfig, PolicyKey};
