//! The trigger and outcome records (`lapse.v1.RecallTrigger`,
//! `lapse.v1.RecallOutcome`) and the enums of their schemas. Their Avro
//! mapping is the adapter's (`outputs`).

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::domain::event::{Channel, Purpose};
use crate::domain::lapse::{Segment, Stage};
use crate::domain::output::Output;

/// Experiment arm, as in the Avro enum `lapse.v1.Arm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Arm {
    Treatment,
    Holdout,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Treatment => "TREATMENT",
            Arm::Holdout => "HOLDOUT",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn label(self) -> &'static str {
        match self {
            Arm::Treatment => "treatment",
            Arm::Holdout => "holdout",
        }
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome kind, as in the Avro enum `lapse.v1.OutcomeKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutcomeKind {
    Recalled,
    NotRecalled,
    Retracted,
    /// The customer came back again after a `RECALLED` (last in the enum: the
    /// outbox's postcard layout numbers variants in order).
    Repurchased,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 4] = [
        OutcomeKind::Recalled,
        OutcomeKind::NotRecalled,
        OutcomeKind::Retracted,
        OutcomeKind::Repurchased,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Recalled => "RECALLED",
            OutcomeKind::NotRecalled => "NOT_RECALLED",
            OutcomeKind::Retracted => "RETRACTED",
            OutcomeKind::Repurchased => "REPURCHASED",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn label(self) -> &'static str {
        match self {
            OutcomeKind::Recalled => "recalled",
            OutcomeKind::NotRecalled => "not_recalled",
            OutcomeKind::Retracted => "retracted",
            OutcomeKind::Repurchased => "repurchased",
        }
    }
}

impl fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `lapse.v1.RecallTrigger` (schemas/recall_trigger.avsc), field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallTrigger {
    pub trigger_id: String,
    pub tenant_id: String,
    pub customer_id: String,
    pub episode_id: String,
    pub stage: Stage,
    pub attempt: i32,
    pub segment: Segment,
    pub days_since_last_visit: i32,
    pub expected_interval_days: f64,
    pub lifetime_value: i64,
    pub currency: String,
    pub last_treatment: Option<String>,
    pub recommended_channel: Option<Channel>,
    pub fallback_channels: Vec<Channel>,
    pub offer_tier: String,
    pub experiment: String,
    pub arm: Arm,
    pub due_at: i64,
    pub fired_at: i64,
    /// The earliest moment to send: the recommended channel's next good time
    /// (the customer's active hours, outside quiet hours); `None` without a
    /// recommended channel or with `policy.contact_hours` off. Kept out of the
    /// postcard layout (the compact format stores it beside the outbox).
    #[serde(skip)]
    pub send_after: Option<i64>,
}

/// `lapse.v1.RecallOutcome` (schemas/recall_outcome.avsc), field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallOutcome {
    pub outcome_id: String,
    pub trigger_id: String,
    pub kind: OutcomeKind,
    pub tenant_id: String,
    pub customer_id: String,
    pub episode_id: String,
    pub stage: Stage,
    pub segment: Segment,
    pub experiment: String,
    pub arm: Arm,
    pub days_to_return: Option<f64>,
    pub revenue: i64,
    pub marketing_cost: i64,
    pub currency: String,
    pub cause_event_id: Option<String>,
    pub decided_at: i64,
    /// The offer redeemed on the recalling visit, minor units (`RECALLED` only;
    /// 0 otherwise): cost per recall = `marketing_cost + incentive_cost`. Kept
    /// out of the postcard layout (the compact format stores it beside the
    /// outbox, h1 bit 5).
    #[serde(skip)]
    pub incentive_cost: i64,
}

impl RecallTrigger {
    /// The Kafka key, `TENANT/CUSTOMER`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant_id, self.customer_id)
    }

    /// Why the sender contacts the customer: SERVICE for a care call (never
    /// capped, never held out), MARKETING for the win-back stages. Derived
    /// from the stage, so the stored outbox layout needs no field for it.
    pub fn purpose(&self) -> Purpose {
        match self.stage {
            Stage::CareCall => Purpose::Service,
            _ => Purpose::Marketing,
        }
    }
}

impl RecallOutcome {
    /// The Kafka key, `TENANT/CUSTOMER`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant_id, self.customer_id)
    }
}

/// The outbox entry of an outcome (outcomes are published for both arms).
pub fn outcome_output(o: RecallOutcome) -> Output {
    Output::Outcome(o)
}
