//! The decisions a state write carries out: what the outbox holds.

use serde::{Deserialize, Serialize};

use super::allowance::ThrottleDecision;
use super::recall::{RecallOutcome, RecallTrigger};

/// A decision waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Output {
    Throttle(Box<ThrottleDecision>),
    Trigger(RecallTrigger),
    Outcome(RecallOutcome),
}
