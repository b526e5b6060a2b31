//! Redis key layout. Every key of one customer carries the same hash tag
//! `{tenant/customer}`, so multi-key scripts stay in one Redis Cluster slot.

use crate::domain::event::CustomerRef;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Keys {
        Keys {
            prefix: prefix.into(),
        }
    }

    /// The hash tag of a customer: `{tenant/customer}`.
    pub fn tag(c: &CustomerRef) -> String {
        format!("{{{}/{}}}", c.tenant, c.customer)
    }

    /// The customer's state blob: `PREFIX:{tenant/customer}:state`.
    pub fn state(&self, c: &CustomerRef) -> String {
        format!("{}:{}:state", self.prefix, Self::tag(c))
    }

    /// A campaign's state: `PREFIX:{campaign:tenant/campaign}:campaign`.
    pub fn campaign(&self, tenant: &str, campaign: &str) -> String {
        format!("{}:{{campaign:{tenant}/{campaign}}}:campaign", self.prefix)
    }

    /// Pattern matching every state key of one tenant (for operator scans).
    pub fn tenant_pattern(&self, tenant: &str) -> String {
        format!("{}:{{{}/*}}:*", self.prefix, tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_customer_tag() {
        let k = Keys::new("lapse");
        let c = CustomerRef::new("brandA", "cust-1");
        assert_eq!(k.state(&c), "lapse:{brandA/cust-1}:state");
    }
}
