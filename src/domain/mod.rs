//! The pure domain core: no IO, no clock reads. Every decision is made here.
//! Adapters depend on it, never the other way: `tests/domain_edges.rs` fails
//! when a file here names an adapter module, Avro, Kafka, Redis, IO or the
//! system clock.

pub mod adaptive_cap;
pub mod allowance;
pub mod binding_rule;
pub mod campaign;
pub mod clock;
pub mod contact_hours;
pub mod cross_channel;
pub mod decide;
pub mod engagement;
pub mod event;
pub mod experiment;
pub mod feedback;
pub mod lapse;
pub mod output;
pub mod platform;
pub mod policy;
pub mod recall;
pub mod replies;
pub mod span;
pub mod state;
pub mod step;
pub mod visits;

#[cfg(test)]
mod cross_channel_tests;
#[cfg(test)]
mod decide_tests;
#[cfg(test)]
mod feedback_tests;
#[cfg(test)]
mod platform_tests;
