//! Profile rules kept as data (`mappings/profiles/*.toml`) and the small engine that applies them.
//!
//! A profile file names the StructureDefinition it stands for and lists what we check before a
//! resource leaves: required elements, fixed values, required bindings, codings that must be
//! present, and the resource types a reference may point to. A rule may apply to one US Core
//! version only (`us_core = "7.0.0"`). Paths are FHIRPath-like: `category.coding.code` walks every
//! array on the way.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One profile file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The StructureDefinition's canonical URL.
    pub url: String,
    /// The IG version the rules were written from.
    pub version: String,
    /// The resource type it constrains.
    pub resource: String,
    /// Whether resources claim it in `meta.profile` (false for rules over a base resource).
    #[serde(default = "yes")]
    pub claim: bool,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
    /// The file name, set by the loader.
    #[serde(skip)]
    pub name: String,
}

fn yes() -> bool {
    true
}

/// One rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// At least one value at `path`.
    Required {
        /// Where.
        path: String,
        /// Only for this US Core version.
        #[serde(default)]
        us_core: Option<String>,
    },
    /// Every value at `path` equals `value`.
    Fixed {
        /// Where.
        path: String,
        /// The value.
        value: toml::Value,
        /// Only for this US Core version.
        #[serde(default)]
        us_core: Option<String>,
    },
    /// Every value at `path` is one of `codes`.
    Binding {
        /// Where (a `code`, or a Coding's `code`).
        path: String,
        /// The allowed codes.
        codes: Vec<String>,
        /// Only for this US Core version.
        #[serde(default)]
        us_core: Option<String>,
    },
    /// Some Coding at `path` has this system and code.
    Coding {
        /// Where (a list of Codings, e.g. `category.coding`).
        path: String,
        /// The system.
        system: String,
        /// The code.
        code: String,
        /// Only for this US Core version.
        #[serde(default)]
        us_core: Option<String>,
    },
    /// Every Reference at `path` points to one of `types`: its literal `reference`, or, for a logical reference
    /// (identifier only, which FHIR R4 and the IGs we claim allow), its `type`.
    Reference {
        /// Where (a Reference element).
        path: String,
        /// Allowed resource types.
        types: Vec<String>,
        /// Only for this US Core version.
        #[serde(default)]
        us_core: Option<String>,
    },
}

impl Rule {
    /// The element path the rule looks at.
    #[must_use]
    pub fn path(&self) -> &str {
        match self {
            Rule::Required { path, .. }
            | Rule::Fixed { path, .. }
            | Rule::Binding { path, .. }
            | Rule::Coding { path, .. }
            | Rule::Reference { path, .. } => path,
        }
    }

    fn us_core(&self) -> Option<&str> {
        match self {
            Rule::Required { us_core, .. }
            | Rule::Fixed { us_core, .. }
            | Rule::Binding { us_core, .. }
            | Rule::Coding { us_core, .. }
            | Rule::Reference { us_core, .. } => us_core.as_deref(),
        }
    }

    /// Whether the rule applies under this US Core version.
    #[must_use]
    pub fn applies(&self, us_core: &str) -> bool {
        self.us_core().is_none_or(|v| v == us_core)
    }
}

/// A resource that broke a profile rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Violation {
    /// The profile's canonical URL.
    pub profile: String,
    /// The element path.
    pub path: String,
    /// What is wrong (codes and element names only).
    pub message: String,
}

/// Every value at a FHIRPath-like path, walking arrays.
#[must_use]
pub fn select<'v>(v: &'v Value, path: &str) -> Vec<&'v Value> {
    let mut current = vec![v];
    for key in path.split('.').filter(|k| !k.is_empty()) {
        let mut next = Vec::new();
        for c in current {
            match c.get(key) {
                Some(Value::Array(items)) => next.extend(items.iter()),
                Some(Value::Null) | None => {}
                Some(x) => next.push(x),
            }
        }
        current = next;
    }
    current
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl Profile {
    /// Applies the rules to one resource.
    #[must_use]
    pub fn check(&self, resource: &Value, us_core: &str) -> Vec<Violation> {
        let mut out = Vec::new();
        let mut fail = |path: &str, message: String| {
            out.push(Violation { profile: self.url.clone(), path: path.to_owned(), message });
        };
        for rule in self.rules.iter().filter(|r| r.applies(us_core)) {
            let path = rule.path();
            let found = select(resource, path);
            match rule {
                Rule::Required { .. } => {
                    if found.is_empty() {
                        fail(path, format!("{path} is required"));
                    }
                }
                Rule::Fixed { value, .. } => {
                    let want = toml_to_json(value);
                    if found.iter().any(|v| **v != want) {
                        fail(path, format!("{path} must be {want}"));
                    }
                }
                Rule::Binding { codes, .. } => {
                    for v in found {
                        let code = v.as_str().or_else(|| v.get("code").and_then(Value::as_str));
                        if !code.is_some_and(|c| codes.iter().any(|x| x == c)) {
                            fail(path, format!("{path} holds a code outside the required binding"));
                        }
                    }
                }
                Rule::Coding { system, code, .. } => {
                    let hit = found.iter().any(|c| {
                        c.get("system").and_then(Value::as_str) == Some(system)
                            && c.get("code").and_then(Value::as_str) == Some(code)
                    });
                    if !hit {
                        fail(path, format!("{path} must include {system}#{code}"));
                    }
                }
                Rule::Reference { types, .. } => {
                    for r in found {
                        let ok =
                            match (r.get("reference").and_then(Value::as_str), r.get("type").and_then(Value::as_str)) {
                                (Some(reference), _) => {
                                    let ty = reference.split(['/', '?']).next().unwrap_or("");
                                    reference.starts_with("urn:uuid:") || types.iter().any(|t| t == ty)
                                }
                                (None, Some(ty)) => types.iter().any(|t| t == ty),
                                (None, None) => continue,
                            };
                        if !ok {
                            fail(path, format!("{path} may only reference {}", types.join(" | ")));
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TASK: &str = r#"
url = "http://example.org/Task"
version = "1"
resource = "Task"
[[rule]]
type = "required"
path = "for"
[[rule]]
type = "fixed"
path = "intent"
value = "order"
[[rule]]
type = "coding"
path = "code.coding"
system = "http://hl7.org/fhir/CodeSystem/task-code"
code = "fulfill"
[[rule]]
type = "reference"
path = "focus"
types = ["ServiceRequest"]
[[rule]]
type = "reference"
path = "owner"
types = ["Organization"]
[[rule]]
type = "binding"
path = "status"
codes = ["requested", "accepted"]
us_core = "7.0.0"
"#;

    #[test]
    fn every_broken_rule_is_reported_with_its_path() {
        let profile: Profile = toml::from_str(TASK).expect("parses");
        let task = json!({"resourceType": "Task", "intent": "plan", "status": "draft",
            "focus": {"reference": "Patient/1"}, "code": {"coding": [{"system": "x", "code": "fulfill"}]},
            "owner": {"type": "Practitioner", "identifier": {"system": "urn:x:staff", "value": "s-1"}}});
        let paths: Vec<String> = profile.check(&task, "7.0.0").into_iter().map(|v| v.path).collect();
        assert_eq!(
            paths,
            ["for", "intent", "code.coding", "focus", "owner", "status"],
            "a logical owner is checked by its type"
        );
        assert_eq!(profile.check(&task, "8.0.0").len(), 5, "the binding only applies to US Core 7");
    }
}
