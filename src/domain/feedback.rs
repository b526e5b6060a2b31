//! Satisfaction feedback (`clinic.feedback`): how a score is classified, what
//! a customer's state keeps of it, and which recall arm a score is measured
//! under. Pure: every time is an argument.
//!
//! A customer keeps only their latest feedback (kind, score, time): bounded,
//! and enough for "how satisfied is this customer now". A detractor's
//! feedback starts a care call (`recall::care_call`, stage `CARE_CALL`,
//! purpose SERVICE), once per feedback event: the event-id dedup of the
//! state fold makes a re-sent copy change nothing.

use serde::{Deserialize, Serialize};

use super::event::FeedbackKind;
use super::recall::{Arm, OutcomeKind, RecallState};

/// An NPS score at or above this is a promoter's (the NPS definition: 9–10).
pub const NPS_PROMOTER_MIN: u8 = 9;
/// A CSAT score at or above this is a satisfied customer's (4–5 of 5).
pub const CSAT_PROMOTER_MIN: u8 = 4;

/// `[policy.feedback]` (per tenant: `[policy.tenants.ID.feedback]` replaces it whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedbackPolicy {
    /// NPS scores at or below this are detractors (NPS: 0–6).
    pub nps_detractor_max: u8,
    /// CSAT scores at or below this are detractors (1–2 of 5).
    pub csat_detractor_max: u8,
    /// A detractor's feedback starts a CARE_CALL trigger.
    pub care_call: bool,
    /// `offer_tier` of a care call (no offer: a call about the experience).
    pub care_call_offer: String,
}

impl Default for FeedbackPolicy {
    fn default() -> Self {
        FeedbackPolicy {
            nps_detractor_max: 6,
            csat_detractor_max: 2,
            care_call: true,
            care_call_offer: "CARE_CALL".into(),
        }
    }
}

impl FeedbackPolicy {
    /// Checks the thresholds; `key` is the section's config path.
    pub fn validate(&self, key: &str) -> Result<(), (String, String)> {
        if self.nps_detractor_max >= NPS_PROMOTER_MIN {
            return Err((
                format!("{key}.nps_detractor_max"),
                format!("must be below {NPS_PROMOTER_MIN} (9 and 10 are promoters' scores)"),
            ));
        }
        if !(1..CSAT_PROMOTER_MIN).contains(&self.csat_detractor_max) {
            return Err((
                format!("{key}.csat_detractor_max"),
                format!(
                    "must be between 1 and {} (CSAT is 1–5, 4 and 5 are satisfied)",
                    CSAT_PROMOTER_MIN - 1
                ),
            ));
        }
        if self.care_call_offer.trim().is_empty() {
            return Err((
                format!("{key}.care_call_offer"),
                "must not be empty: it is the care call's offer_tier".into(),
            ));
        }
        Ok(())
    }
}

/// What a score says about the customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackClass {
    Promoter,
    Passive,
    Detractor,
}

impl FeedbackClass {
    pub const ALL: [FeedbackClass; 3] = [
        FeedbackClass::Promoter,
        FeedbackClass::Passive,
        FeedbackClass::Detractor,
    ];

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            FeedbackClass::Promoter => "promoter",
            FeedbackClass::Passive => "passive",
            FeedbackClass::Detractor => "detractor",
        }
    }
}

/// The class of `score` on the scale of `kind` under `p` (a score outside the
/// scale is clamped to it; the codec dead-letters those first).
pub fn class(kind: FeedbackKind, score: u8, p: &FeedbackPolicy) -> FeedbackClass {
    let (detractor_max, promoter_min) = match kind {
        FeedbackKind::Nps => (p.nps_detractor_max, NPS_PROMOTER_MIN),
        FeedbackKind::Csat => (p.csat_detractor_max, CSAT_PROMOTER_MIN),
    };
    if score <= detractor_max {
        FeedbackClass::Detractor
    } else if score >= promoter_min {
        FeedbackClass::Promoter
    } else {
        FeedbackClass::Passive
    }
}

/// The score on a common 0–1 scale (lowest score of its kind 0, highest 1), so
/// NPS and CSAT can be averaged together.
pub fn normalized(kind: FeedbackKind, score: u8) -> f64 {
    let r = kind.range();
    let (lo, hi) = (*r.start() as f64, *r.end() as f64);
    ((f64::from(score) - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// The customer's latest feedback (by event time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LatestFeedback {
    /// Event time, ms.
    pub at: i64,
    pub kind: FeedbackKind,
    pub score: u8,
}

impl LatestFeedback {
    /// Keeps `f` if it is later than the kept one (ties: the greater kind,
    /// then score, so the order of arrival never matters). True when `f` is
    /// now the latest.
    pub fn observe(slot: &mut Option<LatestFeedback>, f: LatestFeedback) -> bool {
        if slot.is_some_and(|s| s >= f) {
            return false;
        }
        *slot = Some(f);
        true
    }

    pub fn class(&self, p: &FeedbackPolicy) -> FeedbackClass {
        class(self.kind, self.score, p)
    }
}

/// An applied feedback event, for the adapters to count (state fold's `Notes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackNote {
    pub kind: FeedbackKind,
    pub score: u8,
    /// It is the customer's latest feedback now (a late, older one is not).
    pub latest: bool,
    /// [`segment_label`] when it was applied.
    pub segment: &'static str,
    /// [`recall_arm`] when it was applied.
    pub recall_arm: RecallArm,
}

/// Which recall arm a customer's satisfaction is measured under: their
/// current episode's triggers if any fired, else the previous episode's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecallArm {
    /// A treatment trigger brought them back (RECALLED).
    Recalled,
    /// Held out: a would-be trigger was recorded, none was sent.
    Holdout,
    /// No trigger, or a treatment trigger they did not come back after (yet).
    None,
}

impl RecallArm {
    pub const ALL: [RecallArm; 3] = [RecallArm::Recalled, RecallArm::Holdout, RecallArm::None];

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            RecallArm::Recalled => "recalled",
            RecallArm::Holdout => "holdout",
            RecallArm::None => "none",
        }
    }
}

/// See [`RecallArm`].
pub fn recall_arm(r: &RecallState) -> RecallArm {
    let episode = [&r.current, &r.previous]
        .into_iter()
        .flatten()
        .find(|e| e.last_trigger().is_some());
    let Some(e) = episode else {
        return RecallArm::None;
    };
    match e.arm {
        Some(Arm::Holdout) => RecallArm::Holdout,
        _ if e
            .stages
            .iter()
            .any(|s| s.outcome == Some(OutcomeKind::Recalled)) =>
        {
            RecallArm::Recalled
        }
        _ => RecallArm::None,
    }
}

/// The metric label of a customer's win-back segment: that of the latest
/// trigger of their current episode (`high_value_lapsed`, `at_risk`,
/// `low_value_lapsed`), or `active` when no stage fired since the last visit.
pub fn segment_label(r: &RecallState) -> &'static str {
    r.current
        .as_ref()
        .and_then(|e| e.last_trigger())
        .map_or("active", |s| s.segment.label())
}

/// Every value [`segment_label`] returns (for metric pre-registration).
pub const SEGMENT_LABELS: [&str; 4] =
    ["high_value_lapsed", "at_risk", "low_value_lapsed", "active"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::lapse::{Segment, Stage};
    use crate::domain::recall::{Episode, StageRecord};

    #[test]
    fn scores_are_classified_by_the_policy_thresholds() {
        let p = FeedbackPolicy::default();
        use FeedbackClass::*;
        let nps: Vec<_> = (0..=10).map(|s| class(FeedbackKind::Nps, s, &p)).collect();
        assert_eq!(
            nps,
            [
                Detractor, Detractor, Detractor, Detractor, Detractor, Detractor, Detractor,
                Passive, Passive, Promoter, Promoter
            ]
        );
        let csat: Vec<_> = (1..=5).map(|s| class(FeedbackKind::Csat, s, &p)).collect();
        assert_eq!(csat, [Detractor, Detractor, Passive, Promoter, Promoter]);
        let strict = FeedbackPolicy {
            nps_detractor_max: 4,
            csat_detractor_max: 1,
            ..p
        };
        assert_eq!(class(FeedbackKind::Nps, 5, &strict), Passive);
        assert_eq!(class(FeedbackKind::Csat, 2, &strict), Passive);
    }

    #[test]
    fn thresholds_that_swallow_the_promoters_are_refused() {
        let bad_nps = FeedbackPolicy {
            nps_detractor_max: 9,
            ..FeedbackPolicy::default()
        };
        let err = bad_nps.validate("policy.feedback").unwrap_err();
        assert_eq!(err.0, "policy.feedback.nps_detractor_max");
        for c in [0, 4] {
            let bad = FeedbackPolicy {
                csat_detractor_max: c,
                ..FeedbackPolicy::default()
            };
            assert_eq!(
                bad.validate("p").unwrap_err().0,
                "p.csat_detractor_max",
                "{c}"
            );
        }
        assert!(FeedbackPolicy::default().validate("p").is_ok());
    }

    #[test]
    fn normalized_scores_span_zero_to_one_on_both_scales() {
        assert_eq!(normalized(FeedbackKind::Nps, 0), 0.0);
        assert_eq!(normalized(FeedbackKind::Nps, 10), 1.0);
        assert_eq!(normalized(FeedbackKind::Nps, 5), 0.5);
        assert_eq!(normalized(FeedbackKind::Csat, 1), 0.0);
        assert_eq!(normalized(FeedbackKind::Csat, 3), 0.5);
        assert_eq!(normalized(FeedbackKind::Csat, 5), 1.0);
    }

    #[test]
    fn the_latest_feedback_does_not_depend_on_arrival_order() {
        let a = LatestFeedback {
            at: 10,
            kind: FeedbackKind::Nps,
            score: 3,
        };
        let b = LatestFeedback { at: 20, ..a };
        let tie = LatestFeedback { score: 9, ..a };
        for order in [[a, b, tie], [b, tie, a], [tie, a, b]] {
            let mut slot = None;
            for f in order {
                LatestFeedback::observe(&mut slot, f);
            }
            assert_eq!(slot, Some(b));
        }
        let mut slot = Some(b);
        assert!(
            !LatestFeedback::observe(&mut slot, a),
            "older: not the latest"
        );
        assert!(!LatestFeedback::observe(&mut slot, b), "the same: not new");
    }

    fn record(segment: Segment, outcome: Option<OutcomeKind>) -> StageRecord {
        StageRecord {
            stage: Stage::Lapsed,
            attempt: 1,
            due_at: 0,
            fired_at: 0,
            segment,
            skipped: false,
            cost: 0,
            outcome,
        }
    }

    fn episode(arm: Arm, stages: Vec<StageRecord>) -> Episode {
        Episode {
            start: 0,
            arm: Some(arm),
            experiment: Some("recall".into()),
            stages,
        }
    }

    #[test]
    fn the_recall_arm_is_the_latest_episode_with_a_trigger() {
        let none = RecallState::default();
        assert_eq!(recall_arm(&none), RecallArm::None);
        assert_eq!(segment_label(&none), "active");
        // Came back after a treatment trigger: the new episode has no stage yet.
        let recalled = RecallState {
            current: Some(episode(Arm::Treatment, vec![])),
            previous: Some(episode(
                Arm::Treatment,
                vec![record(
                    Segment::HighValueLapsed,
                    Some(OutcomeKind::Recalled),
                )],
            )),
            repurchase: None,
        };
        assert_eq!(recall_arm(&recalled), RecallArm::Recalled);
        assert_eq!(segment_label(&recalled), "active");
        let held = RecallState {
            current: Some(episode(Arm::Holdout, vec![record(Segment::AtRisk, None)])),
            previous: None,
            repurchase: None,
        };
        assert_eq!(recall_arm(&held), RecallArm::Holdout);
        assert_eq!(segment_label(&held), "at_risk");
        let not_back = RecallState {
            current: Some(episode(
                Arm::Treatment,
                vec![record(Segment::LowValueLapsed, None)],
            )),
            previous: None,
            repurchase: None,
        };
        assert_eq!(recall_arm(&not_back), RecallArm::None);
        assert_eq!(segment_label(&not_back), "low_value_lapsed");
    }
}
