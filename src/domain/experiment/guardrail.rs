//! The guardrail: an arm whose unsubscribe rate is worse than the control's
//! beyond the always-valid interval is flagged. Checked as often as anyone
//! likes (the interval stays valid under continuous monitoring).

use super::stats::{Measure, Sample, Sequence};

/// Below this many exposed customers in either arm no verdict is given.
pub const MIN_PER_ARM: u64 = 100;

/// What the guardrail says about one arm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Too few exposed customers in an arm to judge.
    TooFewCustomers,
    /// The arm's rate is not shown to be worse than control by more than the margin.
    Holds {
        /// Upper end of the interval for arm − control.
        worst: f64,
    },
    /// The arm's rate exceeds the control's by more than `margin` for certain
    /// (the interval's lower end is above it): stop the arm.
    Flagged {
        /// Lower end of the interval for arm − control.
        at_least: f64,
    },
}

/// Judges `arm` against `control` (unsubscribes of exposed customers), with
/// a tolerated increase `margin` (0: any increase shown counts).
pub fn unsubscribe_verdict(s: &Sequence, control: &Sample, arm: &Sample, margin: f64) -> Verdict {
    if control.n < MIN_PER_ARM || arm.n < MIN_PER_ARM {
        return Verdict::TooFewCustomers;
    }
    match s.difference(Measure::Proportion, control, arm) {
        None => Verdict::TooFewCustomers,
        Some(i) if i.lower > margin => Verdict::Flagged { at_least: i.lower },
        Some(i) => Verdict::Holds { worst: i.upper },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Sequence = Sequence {
        alpha: 0.05,
        tau: 0.01,
    };

    #[test]
    fn a_clearly_worse_arm_is_flagged() {
        let c = Sample::proportion(20_000, 200); // 1 %
        let a = Sample::proportion(20_000, 400); // 2 %
        assert!(matches!(
            unsubscribe_verdict(&S, &c, &a, 0.0),
            Verdict::Flagged { at_least } if at_least > 0.005
        ));
        // Within a tolerated increase of 2 points it holds.
        assert!(matches!(
            unsubscribe_verdict(&S, &c, &a, 0.02),
            Verdict::Holds { .. }
        ));
    }

    #[test]
    fn an_equal_or_better_arm_holds() {
        let c = Sample::proportion(20_000, 200);
        assert!(matches!(
            unsubscribe_verdict(&S, &c, &Sample::proportion(20_000, 210), 0.0),
            Verdict::Holds { .. }
        ));
        // A better arm (fewer unsubscribes) is never flagged by this guardrail.
        assert!(matches!(
            unsubscribe_verdict(&S, &c, &Sample::proportion(20_000, 50), 0.0),
            Verdict::Holds { worst } if worst < 0.0
        ));
    }

    #[test]
    fn small_arms_get_no_verdict() {
        let c = Sample::proportion(99, 0);
        let a = Sample::proportion(99, 50);
        assert_eq!(
            unsubscribe_verdict(&S, &c, &a, 0.0),
            Verdict::TooFewCustomers
        );
    }
}
