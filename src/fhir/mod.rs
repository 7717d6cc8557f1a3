//! Thin helpers over FHIR R4: URI constants and the typed-model check of what we emit.
//!
//! The typed check parses a resource into fhir-sdk's R4B model (identical to R4 for the resources we
//! emit) and serialises it back: an element the model refused is an error, an element the model
//! dropped is an unknown element. Only the resource types carebridge emits are dispatched, so the
//! (large) generated deserialisers of the other 140 types are never instantiated here.

pub mod auth;
pub mod capabilities;
pub mod client;
pub mod schema;
pub mod system;

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";

use serde_json::Value;

/// What the typed model said about one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypedIssue {
    /// The resource type is not one carebridge emits.
    UnsupportedType(String),
    /// The model refused the resource: a wrong type or a missing required element, at a JSON path.
    Refused {
        /// Where the model stopped, as a FHIR path (`category[0].coding`).
        path: String,
        /// What it expected.
        message: String,
    },
    /// The model does not know these elements (it dropped them).
    Unknown(Vec<String>),
}

impl std::fmt::Display for TypedIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypedIssue::UnsupportedType(t) => write!(f, "resource type {t} is not one carebridge emits"),
            TypedIssue::Refused { path, message } => write!(f, "{path}: {message}"),
            TypedIssue::Unknown(paths) => write!(f, "unknown FHIR element(s): {}", paths.join(", ")),
        }
    }
}

/// Calls `$m!` with the resource types carebridge emits, each as `"Name" => Type` (one list for both checks).
macro_rules! with_emitted_types {
    ($m:ident, $value:expr) => {
        $m!($value,
            "Patient" => Patient,
            "Observation" => Observation,
            "Condition" => Condition,
            "CarePlan" => CarePlan,
            "Goal" => Goal,
            "ServiceRequest" => ServiceRequest,
            "Task" => Task,
            "Flag" => Flag,
            "Consent" => Consent,
            "HealthcareService" => HealthcareService,
            "Organization" => Organization,
            "Location" => Location,
            "OperationOutcome" => OperationOutcome,
        )
    };
}

macro_rules! round_trip {
    ($value:expr, $($name:literal => $ty:ident),+ $(,)?) => {{
        use fhir_sdk::r4b::resources as r;
        let value: &Value = $value;
        match value.get("resourceType").and_then(Value::as_str) {
            $(Some($name) => {
                let typed: r::$ty = serde_path_to_error::deserialize(value).map_err(|e| TypedIssue::Refused {
                    path: fhir_path(&e.path().to_string()),
                    message: e.inner().to_string(),
                })?;
                serde_json::to_value(&typed).map_err(|e| TypedIssue::Refused { path: String::new(), message: e.to_string() })
            })+
            Some(other) => Err(TypedIssue::UnsupportedType(other.to_owned())),
            None => Err(TypedIssue::UnsupportedType("(none)".to_owned())),
        }
    }};
}

macro_rules! parse_only {
    ($value:expr, $($name:literal => $ty:ident),+ $(,)?) => {{
        use fhir_sdk::r4b::resources as r;
        use serde::Deserialize;
        let value: &Value = $value;
        match value.get("resourceType").and_then(Value::as_str) {
            $(Some($name) => r::$ty::deserialize(value).map(|_| ()).map_err(|_| ()),)+
            _ => Err(()),
        }
    }};
}

/// Parses `resource` into the typed model (the check made on every resource before it leaves).
///
/// Cheaper than [`typed_check`]: no second pass to find dropped elements, because the templates that
/// write element names are checked for unknown elements when the mapping files load.
///
/// # Errors
/// What the model refused, with its path.
pub fn typed_parse(resource: &Value) -> Result<(), TypedIssue> {
    let ok = with_emitted_types!(parse_only, resource);
    // On failure, the full check finds the path (the slow path only runs for broken resources).
    if ok.is_ok() { Ok(()) } else { typed_check(resource) }
}

/// Parses `resource` into the typed model and back; reports refused or unknown elements.
///
/// # Errors
/// The first issue found: an unsupported type, a refused element, or the unknown elements.
pub fn typed_check(resource: &Value) -> Result<(), TypedIssue> {
    let back = with_emitted_types!(round_trip, resource)?;
    let mut lost = Vec::new();
    missing_in(resource, &back, String::new(), &mut lost);
    if lost.is_empty() { Ok(()) } else { Err(TypedIssue::Unknown(lost)) }
}

/// Collects the paths present in `a` but absent from `b` (presence only: the model may normalise values).
fn missing_in(a: &Value, b: &Value, at: String, lost: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, av) in a {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                match b.get(k) {
                    Some(bv) => missing_in(av, bv, path, lost),
                    None => lost.push(path),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, av) in a.iter().enumerate() {
                let path = format!("{at}[{i}]");
                match b.get(i) {
                    Some(bv) => missing_in(av, bv, path, lost),
                    None => lost.push(path),
                }
            }
        }
        _ => {}
    }
}

/// Turns serde_path_to_error's `a.b[0].c` (or `.`) into a FHIR-style path.
fn fhir_path(p: &str) -> String {
    if p == "." { String::new() } else { p.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_valid_patient_passes_the_typed_check() {
        let p = json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1987-03-14"});
        assert_eq!(typed_check(&p), Ok(()));
    }

    #[test]
    fn an_unknown_element_is_reported_by_path() {
        let p = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "X", "surname": "Y"}]});
        assert_eq!(typed_check(&p), Err(TypedIssue::Unknown(vec!["name[0].surname".into()])));
    }

    #[test]
    fn the_quick_parse_refuses_what_the_full_check_refuses() {
        assert_eq!(typed_parse(&json!({"resourceType": "Patient", "gender": "female"})), Ok(()));
        assert!(matches!(
            typed_parse(&json!({"resourceType": "Patient", "active": "yes"})),
            Err(TypedIssue::Refused { .. })
        ));
    }

    #[test]
    fn a_wrong_type_is_refused_with_its_path() {
        let p = json!({"resourceType": "Patient", "active": "yes"});
        match typed_check(&p) {
            Err(TypedIssue::Refused { path, .. }) => assert_eq!(path, "active"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
