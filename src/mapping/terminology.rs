//! Terminology: FHIR `ConceptMap` JSON files in `mappings/terminology/`, looked up both ways.
//!
//! A map is reversible when every element is `equivalent` (or `equal`) and no target code is reached
//! from two source codes. A code with no element uses the group's `unmapped` fallback when one is
//! declared (`mode: fixed`), and is an error otherwise, never an empty string. An element whose
//! target is `unmatched` (no code) says on purpose that the concept has no counterpart: the
//! element that would carry it is left out.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::LoadError;
use crate::domain;

/// The prefix of the source URIs that name agency vocabularies (`urn:carebridge:vocabulary:need`).
pub const AGENCY_VOCABULARY: &str = "urn:carebridge:vocabulary:";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConceptMapFile {
    resource_type: String,
    id: String,
    url: String,
    #[serde(default)]
    group: Vec<GroupFile>,
}

#[derive(Debug, Deserialize)]
struct GroupFile {
    source: String,
    target: String,
    #[serde(default)]
    element: Vec<ElementFile>,
    #[serde(default)]
    unmapped: Option<UnmappedFile>,
}

#[derive(Debug, Deserialize)]
struct ElementFile {
    code: String,
    #[serde(default)]
    target: Vec<TargetFile>,
}

#[derive(Debug, Deserialize)]
struct TargetFile {
    code: Option<String>,
    comment: Option<String>,
    display: Option<String>,
    equivalence: String,
}

#[derive(Debug, Deserialize)]
struct UnmappedFile {
    mode: String,
    code: Option<String>,
    display: Option<String>,
}

/// A target concept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concept {
    /// The code system.
    pub system: String,
    /// The code.
    pub code: String,
    /// Its display text, when the map gives one.
    pub display: Option<String>,
}

impl Concept {
    /// The concept as a FHIR `Coding`.
    #[must_use]
    pub fn coding(&self) -> Value {
        // Field by field: `json!` would go through serde for each string, and `c["display"]` search again.
        let mut c = serde_json::Map::new();
        c.insert("system".into(), Value::String(self.system.clone()));
        c.insert("code".into(), Value::String(self.code.clone()));
        if let Some(d) = &self.display {
            c.insert("display".into(), Value::String(d.clone()));
        }
        Value::Object(c)
    }
}

/// One loaded ConceptMap.
#[derive(Debug, Clone)]
pub struct ConceptMap {
    /// Its id (the name mapping files use).
    pub id: String,
    /// Its canonical URL.
    pub url: String,
    /// The file it came from.
    pub file: String,
    forward: HashMap<String, Concept>,
    unmatched: std::collections::HashSet<String>,
    fallback: Option<Concept>,
    reverse: HashMap<(String, String), Vec<String>>,
    reversible: bool,
    /// Every group as the file gives it (mapping files have one; a directory's category map one per source
    /// code system).
    pub groups: Vec<Group>,
}

/// One group of a ConceptMap: source code system → target code system.
#[derive(Debug, Clone)]
pub struct Group {
    /// The source code system.
    pub source: String,
    /// The target code system.
    pub target: String,
    /// Where `target` is written (line, column).
    pub target_at: (usize, usize),
    /// Its elements, in file order.
    pub elements: Vec<Element>,
}

/// One element of a group: a source code and its one target (`None`: unmatched on purpose).
#[derive(Debug, Clone)]
pub struct Element {
    /// The source code.
    pub code: String,
    /// The target concept; `None` when the element says the code has no counterpart.
    pub target: Option<Concept>,
    /// The target's equivalence (`equivalent`, `wider`, `narrower`, …).
    pub equivalence: String,
    /// Where the element's code is written (line, column).
    pub at: (usize, usize),
    /// Where its target code is written (line, column), else where the element is.
    pub target_at: (usize, usize),
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The code has no target and the map declares no fallback.
    #[error("code `{code}` is not mapped by ConceptMap {map}")]
    Unmapped {
        /// The map.
        map: String,
        /// The code.
        code: String,
    },
    /// The reverse lookup found no source, or more than one.
    #[error("code `{code}` of {system} maps back to {count} agency codes in ConceptMap {map}")]
    NotReversible {
        /// The map.
        map: String,
        /// The target system.
        system: String,
        /// The target code.
        code: String,
        /// How many source codes it came from.
        count: usize,
    },
}

impl ConceptMap {
    /// The target of `code`, or the declared fallback; `None` when the map declares it unmatched.
    ///
    /// # Errors
    /// `Unmapped` when there is neither.
    pub fn translate(&self, code: &str) -> Result<Option<&Concept>, LookupError> {
        if self.unmatched.contains(code) {
            return Ok(None);
        }
        self.forward
            .get(code)
            .or(self.fallback.as_ref())
            .map(Some)
            .ok_or_else(|| LookupError::Unmapped { map: self.id.clone(), code: code.to_owned() })
    }

    /// The one source code that maps to `system|code` with an equivalent meaning.
    ///
    /// # Errors
    /// `NotReversible` when there is none or more than one.
    pub fn reverse(&self, system: &str, code: &str) -> Result<&str, LookupError> {
        let found = self.reverse.get(&(system.to_owned(), code.to_owned()));
        match found.map(Vec::as_slice) {
            Some([one]) => Ok(one),
            other => Err(LookupError::NotReversible {
                map: self.id.clone(),
                system: system.to_owned(),
                code: code.to_owned(),
                count: other.map_or(0, <[String]>::len),
            }),
        }
    }

    /// The one source code whose target is `system|code`, whatever the equivalence (`wider` included): how a
    /// partner's code is read back when the partner writes in its terms, not ours. `None` when no source, or
    /// several, map there (the partner's code then says too little to choose).
    #[must_use]
    pub fn read_back(&self, system: &str, code: &str) -> Option<&str> {
        let mut found = self.forward.iter().filter(|(_, c)| c.system == system && c.code == code).map(|(k, _)| k);
        let one = found.next()?;
        found.next().is_none().then_some(one.as_str())
    }

    /// The target system (one per map).
    #[must_use]
    pub fn target_system(&self) -> Option<&str> {
        self.forward.values().next().map(|c| c.system.as_str())
    }

    /// Whether every element is equivalent and one-to-one, so the inverse mapping may use it.
    #[must_use]
    pub fn reversible(&self) -> bool {
        self.reversible
    }
}

/// Codes of the agency vocabulary a ConceptMap group names as its source.
///
/// Besides the named vocabularies, each instrument has two numeric ones: `<instrument>-item` (its question
/// numbers, `phq9-item` = 1…9) and `<instrument>-score` (the scores one answer can have, `phq9-score` = 0…3),
/// so item ConceptMaps are checked to cover every question and every answer.
fn agency_codes(source: &str) -> Option<Vec<String>> {
    let name = source.strip_prefix(AGENCY_VOCABULARY)?;
    if let Some(codes) = instrument_codes(name) {
        return Some(codes);
    }
    fn all<T: Copy>(xs: &[T], f: fn(T) -> &'static str) -> Vec<String> {
        xs.iter().map(|x| f(*x).to_owned()).collect()
    }
    Some(match name {
        "need" => all(domain::NeedCode::ALL, domain::NeedCode::as_str),
        "service" => all(domain::ServiceCode::ALL, domain::ServiceCode::as_str),
        "priority" => all(domain::Priority::ALL, domain::Priority::as_str),
        "referral-status" => all(domain::ReferralStatus::ALL, domain::ReferralStatus::as_str),
        "care-plan-status" => all(domain::CarePlanStatus::ALL, domain::CarePlanStatus::as_str),
        "need-status" => all(domain::NeedStatus::ALL, domain::NeedStatus::as_str),
        "goal-lifecycle" => all(domain::GoalLifecycle::ALL, domain::GoalLifecycle::as_str),
        "goal-achievement" => all(domain::GoalAchievement::ALL, domain::GoalAchievement::as_str),
        "intervention-status" => all(domain::InterventionStatus::ALL, domain::InterventionStatus::as_str),
        "gender" => all(domain::Gender::ALL, domain::Gender::as_str),
        "instrument" => all(domain::Instrument::ALL, domain::Instrument::as_str),
        "interpretation" => all(domain::Interpretation::ALL, domain::Interpretation::as_str),
        "consent-status" => all(domain::ConsentStatus::ALL, domain::ConsentStatus::as_str),
        "consent-category" => all(domain::ConsentCategory::ALL, domain::ConsentCategory::as_str),
        "consent-purpose" => all(domain::ConsentPurpose::ALL, domain::ConsentPurpose::as_str),
        _ => return None,
    })
}

/// `<instrument>-item` → its question numbers; `<instrument>-score` → the scores of one answer.
fn instrument_codes(name: &str) -> Option<Vec<String>> {
    let (instrument, what) = name.rsplit_once('-')?;
    let instrument = domain::Instrument::ALL.iter().copied().find(|i| i.as_str() == instrument)?;
    match what {
        "item" => Some((1..=instrument.question_count()).map(|n| n.to_string()).collect()),
        "score" => instrument.max_item_score().map(|max| (0..=max).map(|n| n.to_string()).collect()),
        _ => None,
    }
}

/// The 1-based line of the first occurrence of `needle` in `text` (1 when absent).
pub(super) fn line_of(text: &str, needle: &str) -> (usize, usize) {
    match text.find(needle) {
        Some(at) => {
            let before = &text[..at];
            let line = before.matches('\n').count() + 1;
            let col = at - before.rfind('\n').map_or(0, |n| n + 1) + 1;
            (line, col)
        }
        None => (1, 1),
    }
}

/// The equivalences of FHIR R4 (`ConceptMapEquivalence`).
const EQUIVALENCES: [&str; 10] = [
    "relatedto",
    "equivalent",
    "equal",
    "wider",
    "subsumes",
    "narrower",
    "specializes",
    "inexact",
    "unmatched",
    "disjoint",
];

/// Finds quoted JSON strings in reading order, so an error points at the occurrence it is about.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl Cursor<'_> {
    /// Line and column of the next `"value"` after the last one found (else the first anywhere, else 1:1).
    fn seek(&mut self, value: &str) -> (usize, usize) {
        let needle = format!("\"{value}\"");
        let found = self.text[self.at..].find(&needle).map(|i| self.at + i).or_else(|| self.text.find(&needle));
        match found {
            Some(i) => {
                self.at = i;
                position(self.text, i)
            }
            None => (1, 1),
        }
    }
}

/// The 1-based line and column of byte `at` of `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = at - before.rfind('\n').map_or(0, |n| n + 1) + 1;
    (line, col)
}

/// Loads one ConceptMap file of the mapping files (exactly one group), pushing every problem into `errors`.
pub fn load(path: &Path, text: &str, errors: &mut Vec<LoadError>) -> Option<ConceptMap> {
    load_map(path, text, errors, true)
}

/// Loads one ConceptMap file of any number of groups (a directory's category map: one per source code system),
/// by the same rules otherwise, pushing every problem into `errors`; the map as far as it could be read (the
/// elements without problems) even when some were pushed, so the caller can check what it needs on top.
pub fn load_groups(path: &Path, text: &str, errors: &mut Vec<LoadError>) -> Option<ConceptMap> {
    load_map(path, text, errors, false)
}

fn load_map(path: &Path, text: &str, errors: &mut Vec<LoadError>, one_group: bool) -> Option<ConceptMap> {
    let file = path.display().to_string();
    let err = |needle: &str, message: String| {
        let (line, column) = line_of(text, needle);
        LoadError { file: file.clone(), line, column, message }
    };
    let parsed: ConceptMapFile = match serde_json::from_str(text) {
        Ok(p) => p,
        Err(e) => {
            errors.push(LoadError { file, line: e.line(), column: e.column(), message: e.to_string() });
            return None;
        }
    };
    if parsed.resource_type != "ConceptMap" {
        errors.push(err("resourceType", format!("expected a ConceptMap, found {}", parsed.resource_type)));
        return None;
    }
    // It is published as FHIR too (and validated as such): its id must be a FHIR id.
    let fhir_id = |id: &str| {
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !fhir_id(&parsed.id) {
        errors.push(err(
            "\"id\"",
            format!("`{}` is not a FHIR id (letters, digits, `-` and `.`, at most 64)", parsed.id),
        ));
    }
    let mut map = ConceptMap {
        id: parsed.id.clone(),
        url: parsed.url,
        file: file.clone(),
        forward: HashMap::new(),
        unmatched: std::collections::HashSet::new(),
        fallback: None,
        reverse: HashMap::new(),
        reversible: true,
        groups: Vec::new(),
    };
    let before = errors.len();
    let at_line =
        |(line, column): (usize, usize), message: String| LoadError { file: file.clone(), line, column, message };
    let mut cursor = Cursor { text, at: 0 };
    if one_group && parsed.group.len() != 1 {
        errors.push(err("\"group\"", "a carebridge ConceptMap has exactly one group".into()));
    }
    if parsed.group.is_empty() && !one_group {
        errors.push(err("\"group\"", "the map has no group".into()));
    }
    for group in &parsed.group {
        let listed: std::collections::HashSet<&str> = group.element.iter().map(|e| e.code.as_str()).collect();
        let source_at = cursor.seek(&group.source);
        if group.source.trim().is_empty() {
            errors.push(at_line(source_at, "a group needs the source code system".into()));
        }
        let known = agency_codes(&group.source);
        if known.is_none() && group.source.starts_with(AGENCY_VOCABULARY) {
            errors.push(at_line(source_at, format!("`{}` is not an agency vocabulary", group.source)));
        }
        let target_at = cursor.seek(&group.target);
        let mut kept =
            Group { source: group.source.clone(), target: group.target.clone(), target_at, elements: Vec::new() };
        let mut seen = std::collections::HashSet::new();
        for el in &group.element {
            let at = cursor.seek(&el.code);
            if let Some(known) = &known
                && !known.contains(&el.code)
            {
                errors.push(at_line(at, format!("`{}` is not a code of {}", el.code, group.source)));
            }
            if !seen.insert(el.code.as_str()) {
                errors.push(at_line(at, format!("`{}` is mapped twice", el.code)));
            }
            let [target] = el.target.as_slice() else {
                errors.push(at_line(at, format!("`{}` needs exactly one target", el.code)));
                continue;
            };
            let equivalence = target.equivalence.as_str();
            if !EQUIVALENCES.contains(&equivalence) {
                errors.push(at_line(at, format!("`{}` maps `{equivalence}`, not a FHIR R4 equivalence", el.code)));
                continue;
            }
            if equivalence == "unmatched" {
                if target.code.is_some() {
                    errors.push(at_line(at, format!("`{}` is unmatched: its target has no code", el.code)));
                    continue;
                }
                map.unmatched.insert(el.code.clone());
                map.reversible = false;
                kept.elements.push(Element {
                    code: el.code.clone(),
                    target: None,
                    equivalence: equivalence.into(),
                    at,
                    target_at: at,
                });
                continue;
            }
            let Some(code) = target.code.clone().filter(|c| !c.trim().is_empty()) else {
                errors.push(at_line(
                    at,
                    format!("the target of `{}` has no code (say `unmatched` if on purpose)", el.code),
                ));
                continue;
            };
            let code_at = cursor.seek(&code);
            if matches!(equivalence, "narrower" | "inexact") && target.comment.is_none() {
                errors.push(at_line(
                    at,
                    format!("`{}` maps {}ly: say why in a comment (FHIR cmd-1)", el.code, target.equivalence),
                ));
            }
            let equivalent = matches!(equivalence, "equivalent" | "equal");
            if !equivalent {
                map.reversible = false;
            }
            let concept = Concept { system: group.target.clone(), code, display: target.display.clone() };
            if equivalent {
                map.reverse.entry((concept.system.clone(), concept.code.clone())).or_default().push(el.code.clone());
            }
            kept.elements.push(Element {
                code: el.code.clone(),
                target: Some(concept.clone()),
                equivalence: equivalence.into(),
                at,
                target_at: code_at,
            });
            map.forward.insert(el.code.clone(), concept);
        }
        map.groups.push(kept);
        match &group.unmapped {
            Some(u) if u.mode == "fixed" => match &u.code {
                Some(code) => {
                    map.fallback =
                        Some(Concept { system: group.target.clone(), code: code.clone(), display: u.display.clone() });
                    map.reversible = false;
                }
                None => errors.push(err("\"unmapped\"", "an unmapped fallback of mode `fixed` needs a code".into())),
            },
            Some(u) => {
                errors.push(err("\"unmapped\"", format!("unmapped mode `{}` is not supported (use fixed)", u.mode)))
            }
            None => {
                if let Some(known) = &known {
                    for code in known.iter().filter(|c| !listed.contains(c.as_str())) {
                        errors.push(err(
                            "\"element\"",
                            format!("agency code `{code}` of {} has no target and no unmapped fallback", group.source),
                        ));
                    }
                }
            }
        }
    }
    if map.reverse.values().any(|sources| sources.len() > 1) {
        map.reversible = false;
    }
    if one_group && errors.len() > before { None } else { Some(map) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIORITY: &str = r#"{
  "resourceType": "ConceptMap", "id": "priority", "url": "urn:test:priority", "status": "active",
  "group": [{
    "source": "urn:carebridge:vocabulary:priority",
    "target": "http://hl7.org/fhir/request-priority",
    "element": [
      {"code": "routine", "target": [{"code": "routine", "equivalence": "equivalent"}]},
      {"code": "urgent", "target": [{"code": "urgent", "equivalence": "equivalent"}]},
      {"code": "crisis", "target": [{"code": "stat", "equivalence": "equivalent"}]}
    ]
  }]
}"#;

    #[test]
    fn a_complete_one_to_one_map_translates_both_ways() {
        let mut errors = Vec::new();
        let map = load(Path::new("priority.json"), PRIORITY, &mut errors).expect("loads");
        assert!(errors.is_empty());
        assert_eq!(map.translate("crisis").expect("mapped").map(|c| c.code.as_str()), Some("stat"));
        assert_eq!(map.reverse("http://hl7.org/fhir/request-priority", "stat"), Ok("crisis"));
        assert!(map.reversible());
    }

    #[test]
    fn a_missing_agency_code_is_a_load_error_with_its_line() {
        let text = PRIORITY.replace(
            r#"      {"code": "crisis", "target": [{"code": "stat", "equivalence": "equivalent"}]}"#,
            r#"      {"code": "crisis", "target": [{"code": "", "equivalence": "equivalent"}]}"#,
        );
        let mut errors = Vec::new();
        assert!(load(Path::new("priority.json"), &text, &mut errors).is_none());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 9);
        assert!(errors[0].message.contains("has no code"));
    }
}
