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
        // Built in one allocation: this runs for every customer of every batch.
        let mut k =
            String::with_capacity(self.prefix.len() + c.tenant.len() + c.customer.len() + 10);
        for part in [&self.prefix, ":{", &c.tenant, "/", &c.customer, "}:state"] {
            k.push_str(part);
        }
        k
    }

    /// Pattern matching every customer's state key (for the timer sweep).
    pub fn state_pattern(&self) -> String {
        format!("{}:{{*}}:state", self.prefix)
    }

    /// The customer a state key belongs to (the inverse of [`state`](Self::state)).
    pub fn customer_of_state(&self, key: &str) -> Option<CustomerRef> {
        let tag = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix("}:state")?;
        CustomerRef::parse(tag)
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
        assert_eq!(k.customer_of_state(&k.state(&c)), Some(c));
        assert_eq!(
            k.customer_of_state("lapse:{campaign:brandA/x}:campaign"),
            None
        );
        assert_eq!(k.customer_of_state("other:{brandA/cust-1}:state"), None);
    }
}
