//! Base R4 rules checked on every resource before it leaves: HL7's published R4 JSON Schema, pruned
//! to the resource types carebridge emits (`schema/fhir-r4-emitted.schema.json`, made by
//! `schema/prune.py` from the spec's `fhir.schema.json`), plus the rules the schema cannot express.
//!
//! The schema catches primitive formats (`url`, `uri`, `date`, `dateTime`, `instant`, `code`, `id`…,
//! as the spec's regular expressions), codes outside the required bindings the spec writes as enums
//! (`status`, `intent`, `priority`…), unknown elements and empty strings. By hand: a `Coding` with a
//! `system` but no `code` (it says nothing a receiver can act on). Bundle invariants (bdl-7, one
//! `fullUrl` per entry) are checked where the Bundle is built ([`crate::mapping`]).
//!
//! Messages name the element and the rule, never the value (a value may be PHI).

use std::collections::HashMap;
use std::sync::LazyLock;

use jsonschema::{Draft, Validator};
use serde_json::{Value, json};

/// The pruned R4 schema, embedded so the gate never depends on a file at run time.
const SCHEMA: &str = include_str!("schema/fhir-r4-emitted.schema.json");

/// The resource types the pruned schema holds (the roots `prune.py` starts from).
const TYPES: [&str; 13] = [
    "Patient",
    "Observation",
    "Condition",
    "CarePlan",
    "Goal",
    "ServiceRequest",
    "Task",
    "Flag",
    "Consent",
    "HealthcareService",
    "Organization",
    "Location",
    "OperationOutcome",
];

/// One validator per resource type, compiled on first use; `Err` says why the embedded schema is
/// broken (a build defect, reported on every resource instead of letting anything through).
static VALIDATORS: LazyLock<Result<Compiled, String>> = LazyLock::new(compile);

/// The validators and the definitions they came from (read again to name an element's type).
struct Compiled {
    validators: HashMap<&'static str, Validator>,
    definitions: Value,
}

fn compile() -> Result<Compiled, String> {
    let schema: Value =
        serde_json::from_str(SCHEMA).map_err(|e| format!("the embedded R4 JSON Schema is not JSON: {e}"))?;
    let definitions = schema.get("definitions").cloned().ok_or("the embedded R4 JSON Schema has no definitions")?;
    let mut validators = HashMap::new();
    for ty in TYPES {
        // `$ref` beside other keywords is ignored in draft 6, so the type is reached through `allOf`.
        let root = json!({
            "$schema": "http://json-schema.org/draft-06/schema#",
            "id": "http://hl7.org/fhir/json-schema/4.0",
            "definitions": definitions,
            "allOf": [{ "$ref": format!("#/definitions/{ty}") }],
        });
        let v = jsonschema::options()
            .with_draft(Draft::Draft6)
            .build(&root)
            .map_err(|e| format!("the embedded R4 JSON Schema for {ty} does not compile: {e}"))?;
        validators.insert(ty, v);
    }
    Ok(Compiled { validators, definitions })
}

/// One base-R4 rule a resource breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaIssue {
    /// The element, as a FHIR path from the resource (`sourceAttachment.url`, `category[0].coding[1]`);
    /// empty for the resource itself.
    pub path: String,
    /// The rule it breaks (never the value).
    pub message: String,
}

/// Checks `resource` against the base R4 rules; gives every issue found.
#[must_use]
pub fn check(resource: &Value) -> Vec<SchemaIssue> {
    let mut out = Vec::new();
    let ty = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
    match VALIDATORS.as_ref() {
        Err(broken) => out.push(SchemaIssue { path: String::new(), message: broken.clone() }),
        Ok(compiled) => match compiled.validators.get(ty) {
            None => out.push(SchemaIssue {
                path: String::new(),
                message: "not a resource type carebridge emits, so its R4 rules are not known".into(),
            }),
            // Nearly every resource is valid: the cheap yes/no pass first, the errors only when there are some.
            Some(v) if v.is_valid(resource) => {}
            Some(v) => {
                for e in v.iter_errors(resource) {
                    let pointer = e.instance_path().as_str();
                    let message = describe(&e, || type_at(&compiled.definitions, ty, pointer));
                    out.push(SchemaIssue { path: fhir_path(pointer), message });
                }
            }
        },
    }
    // Nearly every resource has none: a walk that makes no paths first, the paths only when it finds one.
    if has_coding_without_code(resource) {
        codings_without_code(resource, &mut String::new(), &mut out);
    }
    out
}

/// A Coding with a `system` and no `code`: it says nothing a receiver can act on.
fn system_without_code(c: &Value) -> bool {
    c.get("system").is_some() && c.get("code").is_none()
}

/// Whether any `coding` under `v` holds a Coding with a system and no code (no paths made).
fn has_coding_without_code(v: &Value) -> bool {
    let nested = |x: &Value| (x.is_object() || x.is_array()) && has_coding_without_code(x);
    match v {
        Value::Object(m) => m.iter().any(|(k, x)| {
            (k == "coding" && x.as_array().is_some_and(|cs| cs.iter().any(system_without_code))) || nested(x)
        }),
        Value::Array(a) => a.iter().any(nested),
        _ => false,
    }
}

/// What an error says, without the value: the primitive type a pattern belongs to, or the masked
/// message of the validator.
fn describe(e: &jsonschema::ValidationError<'_>, type_name: impl Fn() -> Option<String>) -> String {
    use jsonschema::error::ValidationErrorKind as K;
    match e.kind() {
        K::Pattern { .. } => match type_name() {
            // Primitive definitions are the lower-case ones (`url`, `dateTime`, `code`).
            Some(t) if t.chars().next().is_some_and(char::is_lowercase) => format!("not a valid FHIR `{t}`"),
            _ => "does not match the R4 pattern".to_owned(),
        },
        K::Enum { .. } => format!("a code outside its required R4 value set: {}", e.masked()),
        _ => e.masked().to_string(),
    }
}

/// The schema definition of the element at `pointer` in a resource of type `ty` (`date` for
/// `/birthDate`), following each property's `$ref` (or its array items' `$ref`).
fn type_at(definitions: &Value, ty: &str, pointer: &str) -> Option<String> {
    let mut current = ty.to_owned();
    for seg in pointer.split('/').skip(1).filter(|s| !s.chars().all(|c| c.is_ascii_digit())) {
        let prop = definitions.get(&current)?.get("properties")?.get(seg)?;
        let reference = prop.get("$ref").or_else(|| prop.get("items").and_then(|i| i.get("$ref")))?.as_str()?;
        current = reference.rsplit('/').next()?.to_owned();
    }
    Some(current)
}

/// `/category/0/coding/1` → `category[0].coding[1]`.
fn fhir_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

fn codings_without_code(v: &Value, at: &mut String, out: &mut Vec<SchemaIssue>) {
    // One path buffer for the whole walk: grown on the way down, cut back on the way up (a resource has hundreds
    // of elements and nearly never a bad Coding).
    let len = at.len();
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if !(x.is_object() || x.is_array()) {
                    continue;
                }
                if !at.is_empty() {
                    at.push('.');
                }
                at.push_str(k);
                if k == "coding"
                    && let Some(codings) = x.as_array()
                {
                    for (i, c) in codings.iter().enumerate() {
                        if system_without_code(c) {
                            out.push(SchemaIssue {
                                path: format!("{at}[{i}]"),
                                message: "a Coding with a system and no code".into(),
                            });
                        }
                    }
                }
                codings_without_code(x, at, out);
                at.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                if x.is_object() || x.is_array() {
                    use std::fmt::Write as _;
                    let _ = write!(at, "[{i}]");
                    codings_without_code(x, at, out);
                    at.truncate(len);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_task_passes() {
        let t = json!({"resourceType": "Task", "status": "requested", "intent": "order",
            "authoredOn": "2026-01-02T10:00:00Z", "for": {"reference": "Patient/p1"}});
        assert_eq!(check(&t), Vec::<SchemaIssue>::new());
    }

    #[test]
    fn free_text_in_a_url_is_refused_naming_the_element_not_the_text() {
        let c = json!({"resourceType": "Consent", "status": "active",
            "scope": {"text": "x"}, "category": [{"text": "x"}],
            "sourceAttachment": {"url": "paper form in chart, box 14"}});
        let issues = check(&c);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "sourceAttachment.url");
        assert_eq!(issues[0].message, "not a valid FHIR `url`");
        assert!(!format!("{issues:?}").contains("paper form"));
    }

    #[test]
    fn a_status_outside_the_required_value_set_is_refused() {
        let t = json!({"resourceType": "Task", "status": "done", "intent": "order"});
        let issues = check(&t);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "status");
        assert!(issues[0].message.starts_with("a code outside its required R4 value set"), "{issues:?}");
    }

    #[test]
    fn a_bad_date_is_refused_as_its_primitive_type() {
        let p = json!({"resourceType": "Patient", "birthDate": "14/03/1987"});
        assert_eq!(
            check(&p),
            vec![SchemaIssue { path: "birthDate".into(), message: "not a valid FHIR `date`".into() }]
        );
    }

    #[test]
    fn a_coding_with_a_system_and_no_code_is_refused() {
        let s = json!({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://snomed.info/sct"}], "text": "x"}});
        assert_eq!(
            check(&s),
            vec![SchemaIssue { path: "code.coding[0]".into(), message: "a Coding with a system and no code".into() }]
        );
    }

    #[test]
    fn an_unknown_element_is_refused() {
        let p = json!({"resourceType": "Patient", "surname": "x"});
        let issues = check(&p);
        assert!(issues.iter().any(|i| i.message.contains("surname")), "{issues:?}");
    }
}
