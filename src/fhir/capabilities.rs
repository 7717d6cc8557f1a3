//! What a partner's FHIR server says it supports (its CapabilityStatement, `GET <base>/metadata`), as far as
//! delivery and follow-up depend on it: per resource type, the search parameters it declares and whether it takes
//! conditional creates and updates; whether it takes transactions; whether it offers R4 backport topic-based
//! Subscriptions.
//!
//! Servers differ in how much they declare: one lists no search parameters at all although it searches by every
//! R4 parameter, another lists its parameters and has no `identifier` for `Goal`. So a type that declares no search
//! parameters is taken to search by identifier; one that lists some without `identifier` is not. An unreadable
//! statement changes nothing ([`Capabilities::assumed`]: everything the gateway uses is taken as supported).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// The R4 backport IG's canonical, which a server offering topic-based Subscriptions instantiates or profiles.
pub const SUBSCRIPTIONS_BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport";

/// What one resource type supports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceCapabilities {
    /// The search parameters declared (empty: none declared).
    pub search_params: HashSet<String>,
    /// `conditionalCreate`.
    pub conditional_create: bool,
    /// `conditionalUpdate`.
    pub conditional_update: bool,
}

/// What a partner's server supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Per resource type; `None`: the statement was not read (everything assumed).
    resources: Option<HashMap<String, ResourceCapabilities>>,
    /// Whether it takes transaction Bundles.
    pub transaction: bool,
    /// Whether it offers R4 backport topic-based Subscriptions.
    pub subscriptions: bool,
}

impl Capabilities {
    /// Nothing known: every operation the gateway uses is assumed (what it did before it read statements).
    #[must_use]
    pub fn assumed() -> Self {
        Capabilities { resources: None, transaction: true, subscriptions: false }
    }

    /// Reads a CapabilityStatement.
    ///
    /// # Errors
    /// A body that is not a CapabilityStatement with a server `rest` entry.
    pub fn parse(statement: &Value) -> Result<Self, String> {
        if statement.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
            return Err("the metadata is not a CapabilityStatement".into());
        }
        let rest = statement
            .get("rest")
            .and_then(Value::as_array)
            .and_then(|r| r.iter().find(|r| r.get("mode").and_then(Value::as_str) == Some("server")))
            .ok_or("the CapabilityStatement has no server rest entry")?;
        let codes = |v: Option<&Value>| -> HashSet<String> {
            v.and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|i| i.get("code").and_then(Value::as_str).map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        let transaction = codes(rest.get("interaction")).contains("transaction");
        let mut resources = HashMap::new();
        let mut subscriptions = statement
            .get("instantiates")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().filter_map(Value::as_str).any(|c| c.starts_with(SUBSCRIPTIONS_BACKPORT)));
        for r in rest.get("resource").and_then(Value::as_array).map_or(&[][..], Vec::as_slice) {
            let Some(ty) = r.get("type").and_then(Value::as_str) else { continue };
            let search_params = r
                .get("searchParam")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_owned)).collect())
                .unwrap_or_default();
            let flag = |k: &str| r.get(k).and_then(Value::as_bool).unwrap_or(false);
            if ty == "Subscription" {
                let profiles = ["profile", "supportedProfile"]
                    .iter()
                    .flat_map(|k| match r.get(*k) {
                        Some(Value::String(s)) => vec![s.clone()],
                        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                        _ => Vec::new(),
                    })
                    .collect::<Vec<_>>();
                subscriptions |= profiles.iter().any(|p| p.starts_with(SUBSCRIPTIONS_BACKPORT));
            }
            resources.insert(
                ty.to_owned(),
                ResourceCapabilities {
                    search_params,
                    conditional_create: flag("conditionalCreate"),
                    conditional_update: flag("conditionalUpdate"),
                },
            );
        }
        Ok(Capabilities { resources: Some(resources), transaction, subscriptions })
    }

    /// Whether the statement was read.
    #[must_use]
    pub fn known(&self) -> bool {
        self.resources.is_some()
    }

    fn of(&self, ty: &str) -> Option<Option<&ResourceCapabilities>> {
        self.resources.as_ref().map(|r| r.get(ty))
    }

    /// Whether `ty` can be searched by `identifier` (declared, or no parameters declared at all).
    #[must_use]
    pub fn finds_by_identifier(&self, ty: &str) -> bool {
        match self.of(ty) {
            None => true,
            Some(None) => false,
            Some(Some(r)) => r.search_params.is_empty() || r.search_params.contains("identifier"),
        }
    }

    /// Whether a conditional create (`If-None-Exist: identifier=…`) of `ty` works there.
    #[must_use]
    pub fn conditional_create(&self, ty: &str) -> bool {
        match self.of(ty) {
            None => true,
            Some(None) => false,
            Some(Some(r)) => r.conditional_create && self.finds_by_identifier(ty),
        }
    }

    /// Whether a conditional update (`PUT Type?identifier=…`) of `ty` works there.
    #[must_use]
    pub fn conditional_update(&self, ty: &str) -> bool {
        match self.of(ty) {
            None => true,
            Some(None) => false,
            Some(Some(r)) => r.conditional_update && self.finds_by_identifier(ty),
        }
    }

    /// Whether `ty` is offered at all.
    #[must_use]
    pub fn offers(&self, ty: &str) -> bool {
        !matches!(self.of(ty), Some(None))
    }

    /// One line per type among `types` that falls back from a conditional request (for `check --partners`).
    #[must_use]
    pub fn fallbacks(&self, types: &[&str]) -> Vec<String> {
        types
            .iter()
            .filter_map(|ty| {
                if !self.offers(ty) {
                    Some(format!("{ty}: not offered"))
                } else if !self.finds_by_identifier(ty) {
                    Some(format!("{ty}: no identifier search: created once, then updated by the id it assigned"))
                } else if !self.conditional_create(ty) || !self.conditional_update(ty) {
                    Some(format!("{ty}: no conditional create or update: created once, then updated by its id"))
                } else {
                    None
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn statement(goal_params: Value) -> Value {
        json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
        "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
            {"type": "Patient", "conditionalCreate": true, "conditionalUpdate": true, "searchParam": []},
            {"type": "Goal", "conditionalCreate": true, "conditionalUpdate": true, "searchParam": goal_params},
        ]}]})
    }

    #[test]
    fn a_type_listing_search_parameters_without_identifier_is_not_searched_by_it() {
        let c = Capabilities::parse(&statement(json!([{"name": "patient", "type": "reference"}]))).expect("parses");
        assert!(!c.finds_by_identifier("Goal") && !c.conditional_create("Goal") && !c.conditional_update("Goal"));
        assert!(c.finds_by_identifier("Patient"), "no parameters declared: assumed");
        assert!(c.conditional_create("Patient"));
        assert!(!c.offers("Flag"));
        assert!(c.transaction && !c.subscriptions);
        assert_eq!(c.fallbacks(&["Patient", "Goal", "Flag"]).len(), 2);
    }

    #[test]
    fn an_unread_statement_assumes_everything_and_backport_subscriptions_are_recognised() {
        let a = Capabilities::assumed();
        assert!(a.conditional_update("Goal") && a.offers("Flag") && !a.known());
        let mut s = statement(json!([]));
        s["instantiates"] = json!([
            "http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/backport-subscription-server-r4"
        ]);
        assert!(Capabilities::parse(&s).expect("parses").subscriptions);
        assert!(Capabilities::parse(&json!({"resourceType": "Patient"})).is_err());
    }
}
