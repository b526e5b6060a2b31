//! The incentive cost of a recalling visit: what the redeemed offer cost the
//! clinic, beside the messaging cost of the sends (`marketing_cost`).

use super::attribution::VisitInfo;
use crate::domain::lapse::LapsePolicy;

/// Where a visit's incentive cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncentiveSource {
    /// No offer redeemed (no `offer_code`, no `discount`).
    None,
    /// The visit's own `discount`.
    Discount,
    /// The configured cost of its `offer_code`'s tier (`offer_costs`).
    TierCost,
    /// An `offer_code` with no configured cost and no `discount`: costs 0 (counted).
    UnknownCode,
}

/// A visit's incentive cost, minor units, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incentive {
    pub cost: i64,
    pub source: IncentiveSource,
}

/// The incentive of `visit`: its `discount` when given (the clinic knows the
/// exact amount), else the configured cost of its `offer_code`'s tier, else 0.
pub fn incentive(visit: &VisitInfo, p: &LapsePolicy) -> Incentive {
    let (cost, source) = match (visit.discount, visit.offer_code.as_deref()) {
        (Some(d), _) => (d, IncentiveSource::Discount),
        (None, Some(code)) => match p.offer_costs.get(code) {
            Some(c) => (*c, IncentiveSource::TierCost),
            None => (0, IncentiveSource::UnknownCode),
        },
        (None, None) => (0, IncentiveSource::None),
    };
    Incentive { cost, source }
}

/// The incentive cost of `visit`, minor units (see [`incentive`]).
pub fn incentive_cost(visit: &VisitInfo, p: &LapsePolicy) -> i64 {
    incentive(visit, p).cost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visit(offer_code: Option<&str>, discount: Option<i64>) -> VisitInfo {
        VisitInfo {
            at: 0,
            revenue: 100_000,
            currency: "CNY".into(),
            event_id: "v".into(),
            offer_code: offer_code.map(str::to_string),
            discount,
            expected_interval_days: 120.0,
        }
    }

    #[test]
    fn a_discount_wins_then_the_tier_cost_then_nothing() {
        let p = LapsePolicy::default();
        use IncentiveSource as S;
        let cases = [
            (None, None, 0, S::None),
            (Some("coupon-10pct"), None, 30_000, S::TierCost),
            (Some("vip-care-call"), None, 5_000, S::TierCost),
            (Some("coupon-10pct"), Some(12_345), 12_345, S::Discount),
            (None, Some(700), 700, S::Discount),
            (Some("coupon-10pct"), Some(0), 0, S::Discount),
            (Some("spring-sale"), None, 0, S::UnknownCode),
            (Some("spring-sale"), Some(900), 900, S::Discount),
        ];
        for (code, discount, cost, source) in cases {
            let v = visit(code, discount);
            assert_eq!(
                incentive(&v, &p),
                Incentive { cost, source },
                "{code:?} {discount:?}"
            );
            assert_eq!(incentive_cost(&v, &p), cost);
        }
        let mut tenant = p.clone();
        tenant.offer_costs.insert("spring-sale".into(), 4_000);
        assert_eq!(
            incentive_cost(&visit(Some("spring-sale"), None), &tenant),
            4_000
        );
    }
}
