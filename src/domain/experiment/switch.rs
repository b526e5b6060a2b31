//! The guardrail's stop, as a customer meets it: an exposed customer of a
//! stopped arm gets the control's policy from the stop on (`Assignment::
//! stopped`), and at their first step after it, one throttle event per
//! channel the experiment changes announces their allowance under the
//! control (reason `experiment_stopped`), so a sender caching allowances
//! hears of the switch. Recorded in the exposure (`Measures::switched_at`),
//! so it is announced once.

use super::active::Effective;
use crate::domain::decide::{self, Effects};
use crate::domain::event::{Channel, CustomerRef};
use crate::domain::state::{CustomerState, StateParams};

/// The reason of the throttle events that announce a switch.
pub const SWITCH_REASON: &str = "experiment_stopped";

/// Switches `who` out of every stopped arm they were exposed in, at `t`.
pub fn switch_stopped(
    state: &mut CustomerState,
    who: &CustomerRef,
    eff: &Effective<'_>,
    params: &StateParams,
    t: i64,
    fx: &mut Effects,
) {
    for a in eff.assignments.iter().filter(|a| a.stopped) {
        let e = a.experiment;
        let Some(x) = state
            .exposures
            .iter_mut()
            .find(|x| x.experiment == e.name && x.measures.switched_at.is_none())
        else {
            continue;
        };
        x.measures.switched_at = Some(t);
        for c in Channel::ALL.into_iter().filter(|c| e.touches_channel(*c)) {
            decide::announce(state, who, c, &eff.policy, params, t, SWITCH_REASON, fx);
        }
    }
}
