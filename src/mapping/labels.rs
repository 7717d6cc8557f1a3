//! Security labels (HL7 DS4P) from `mappings/policy/labels.toml`: which agency codes put data in a sensitive
//! category (mental health, substance use), and the `meta.security` codings each category carries.
//!
//! The same rules serve two rooms: the egress policy ([`crate::policy`]) asks which categories a record and each of
//! its parts belong to before anything is mapped, and the mapping's label step writes the codings on every resource
//! it renders. A category not named by any rule is `general`.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use super::LoadError;
use super::template::LineIndex;
use crate::domain::{ConsentCategory, Instrument, NeedCode, RecordKind, ServiceCode};
use crate::fhir::system::{V3_ACT_CODE, V3_CONFIDENTIALITY};

/// The rules file, relative to the mappings directory.
pub const FILE: &str = "policy/labels.toml";

/// A set of data categories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Categories(u8);

impl Categories {
    /// General data only.
    pub const GENERAL: Categories = Categories(1);

    fn bit(c: ConsentCategory) -> u8 {
        match c {
            ConsentCategory::General => 1,
            ConsentCategory::MentalHealth => 2,
            ConsentCategory::SubstanceUse => 4,
        }
    }

    /// The set holding `c` alone.
    #[must_use]
    pub fn of(c: ConsentCategory) -> Self {
        Categories(Self::bit(c))
    }

    /// Adds `c`.
    pub fn insert(&mut self, c: ConsentCategory) {
        self.0 |= Self::bit(c);
    }

    /// Whether `c` is in the set.
    #[must_use]
    pub fn contains(self, c: ConsentCategory) -> bool {
        self.0 & Self::bit(c) != 0
    }

    /// Both sets.
    #[must_use]
    pub fn union(self, other: Categories) -> Categories {
        Categories(self.0 | other.0)
    }

    /// The categories, in the consent vocabulary's order.
    pub fn iter(self) -> impl Iterator<Item = ConsentCategory> {
        ConsentCategory::ALL.iter().copied().filter(move |c| self.contains(*c))
    }
}

/// A confidentiality code, in its order of protection (`U` < `L` < `M` < `N` < `R` < `V`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Confidentiality {
    /// Unrestricted.
    U,
    /// Low.
    L,
    /// Moderate.
    M,
    /// Normal.
    N,
    /// Restricted.
    R,
    /// Very restricted.
    V,
}

impl Confidentiality {
    const ALL: [(Confidentiality, &'static str, &'static str); 6] = [
        (Confidentiality::U, "U", "unrestricted"),
        (Confidentiality::L, "L", "low"),
        (Confidentiality::M, "M", "moderate"),
        (Confidentiality::N, "N", "normal"),
        (Confidentiality::R, "R", "restricted"),
        (Confidentiality::V, "V", "very restricted"),
    ];

    fn from_code(code: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, c, _)| *c == code).map(|(x, _, _)| *x)
    }

    /// The code (`R`).
    #[must_use]
    pub fn code(self) -> &'static str {
        Self::ALL.iter().find(|(x, _, _)| *x == self).map_or("N", |(_, c, _)| c)
    }

    fn display(self) -> &'static str {
        Self::ALL.iter().find(|(x, _, _)| *x == self).map_or("normal", |(_, _, d)| d)
    }

    /// The `meta.security` Coding of this level.
    #[must_use]
    pub fn coding(self) -> Value {
        coding(V3_CONFIDENTIALITY, self.code(), self.display())
    }

    /// The level a `meta.security` list states, if it states one.
    #[must_use]
    pub fn of_security(security: &Value) -> Option<Self> {
        security
            .as_array()?
            .iter()
            .filter(|c| c.get("system").and_then(Value::as_str) == Some(V3_CONFIDENTIALITY))
            .filter_map(|c| c.get("code").and_then(Value::as_str).and_then(Self::from_code))
            .max()
    }
}

/// The v3-ActCode labels a rules file may name, with their displays (a typo is an error, not a label nobody
/// reads).
const SENSITIVITY: [(&str, &str); 9] = [
    ("ETH", "substance abuse information sensitivity"),
    ("SUD", "substance use disorder information sensitivity"),
    ("PSY", "psychiatry disorder information sensitivity"),
    ("BH", "behavioral health information sensitivity"),
    ("PSYTHPN", "psychotherapy note information sensitivity"),
    ("HIV", "HIV/AIDS information sensitivity"),
    ("SDV", "sexual assault, abuse, or domestic violence information sensitivity"),
    ("SEX", "sexuality and reproductive health information sensitivity"),
    ("STD", "sexually transmitted disease information sensitivity"),
];
const POLICY: [(&str, &str); 1] = [("42CFRPart2", "42 CFR Part2")];
const REFRAIN: [(&str, &str); 5] = [
    ("NODSCLCD", "no disclosure without consent directive"),
    ("NORDSLCD", "no redisclosure without consent directive"),
    ("NOREUSE", "no reuse beyond purpose of use"),
    ("NOORGPOL", "no disclosure without organizational authorization"),
    ("NOLIST", "no unlisted entity disclosure"),
];

fn coding(system: &str, code: &str, display: &str) -> Value {
    let mut m = Map::new();
    m.insert("system".into(), Value::String(system.to_owned()));
    m.insert("code".into(), Value::String(code.to_owned()));
    m.insert("display".into(), Value::String(display.to_owned()));
    Value::Object(m)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[allow(dead_code)] // read by people and kept for the file's history
    version: String,
    category: CategoriesFile,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoriesFile {
    general: CategoryFile,
    mental_health: CategoryFile,
    substance_use: CategoryFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryFile {
    confidentiality: Spanned<String>,
    #[serde(default)]
    sensitivity: Vec<Spanned<String>>,
    #[serde(default)]
    policy: Vec<Spanned<String>>,
    #[serde(default)]
    refrain: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    category: Spanned<String>,
    #[serde(default)]
    instruments: Vec<Spanned<String>>,
    #[serde(default)]
    needs: Vec<Spanned<String>>,
    #[serde(default)]
    services: Vec<Spanned<String>>,
}

/// Puts data with `code` in `category` (a code several rules name is in each of their categories), or reports an
/// unknown code at its line.
fn add(
    into: &mut HashMap<String, Categories>,
    code: &Spanned<String>,
    known: bool,
    what: &str,
    category: ConsentCategory,
    err: &mut impl FnMut(std::ops::Range<usize>, String),
) {
    if known {
        into.entry(code.get_ref().clone()).or_insert(Categories::GENERAL).insert(category);
    } else {
        err(code.span(), format!("`{}` is not an agency {what} code", code.get_ref()));
    }
}

/// What data of one category carries.
#[derive(Debug, Clone)]
struct LabelSet {
    confidentiality: Confidentiality,
    /// v3-ActCode codings: sensitivity, then policy, then refrain.
    codings: Vec<Value>,
}

/// The label rules, loaded.
#[derive(Debug, Clone)]
pub struct LabelRules {
    sets: HashMap<ConsentCategory, LabelSet>,
    instruments: HashMap<String, Categories>,
    needs: HashMap<String, Categories>,
    services: HashMap<String, Categories>,
}

impl LabelRules {
    /// Loads `<dir>/policy/labels.toml`, pushing every problem with its line.
    pub fn load(dir: &Path, errors: &mut Vec<LoadError>) -> Option<LabelRules> {
        let (parsed, file, text): (RulesFile, _, _) = super::read_toml(dir, FILE, "the label rules", errors)?;
        let lines = LineIndex::new(&text);
        let before = errors.len();
        let mut err = |at: std::ops::Range<usize>, message: String| {
            let span = lines.span(at.start);
            errors.push(LoadError { file: file.clone(), line: span.line, column: span.column, message });
        };
        let mut sets = HashMap::new();
        let categories = [
            (ConsentCategory::General, &parsed.category.general),
            (ConsentCategory::MentalHealth, &parsed.category.mental_health),
            (ConsentCategory::SubstanceUse, &parsed.category.substance_use),
        ];
        for (category, c) in categories {
            let Some(confidentiality) = Confidentiality::from_code(c.confidentiality.get_ref()) else {
                err(c.confidentiality.span(), "confidentiality is one of U, L, M, N, R, V".into());
                continue;
            };
            let mut codings = Vec::new();
            let lists = [
                (&c.sensitivity, &SENSITIVITY[..], "sensitivity"),
                (&c.policy, &POLICY[..], "policy"),
                (&c.refrain, &REFRAIN[..], "refrain"),
            ];
            for (list, known, what) in lists {
                for code in list {
                    match known.iter().find(|(k, _)| k == code.get_ref()) {
                        Some((k, display)) => codings.push(coding(V3_ACT_CODE, k, display)),
                        None => err(
                            code.span(),
                            format!(
                                "`{}` is not a {what} code this gateway knows ({})",
                                code.get_ref(),
                                known.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                            ),
                        ),
                    }
                }
            }
            if category == ConsentCategory::General && !codings.is_empty() {
                err(c.confidentiality.span(), "general data carries no sensitivity, policy or refrain code".into());
            }
            sets.insert(category, LabelSet { confidentiality, codings });
        }
        let (mut instruments, mut needs, mut services) = (HashMap::new(), HashMap::new(), HashMap::new());
        for r in &parsed.rule {
            let Some(category) = ConsentCategory::from_code(r.category.get_ref()) else {
                err(r.category.span(), format!("`{}` is not a category", r.category.get_ref()));
                continue;
            };
            for code in &r.instruments {
                let known = Instrument::from_code(code.get_ref()).is_some();
                add(&mut instruments, code, known, "instrument", category, &mut err);
            }
            for code in &r.needs {
                add(&mut needs, code, NeedCode::from_code(code.get_ref()).is_some(), "need", category, &mut err);
            }
            for code in &r.services {
                let known = ServiceCode::from_code(code.get_ref()).is_some();
                add(&mut services, code, known, "service", category, &mut err);
            }
        }
        (errors.len() == before).then_some(LabelRules { sets, instruments, needs, services })
    }

    fn lookup(map: &HashMap<String, Categories>, code: Option<&str>) -> Categories {
        code.and_then(|c| map.get(c)).copied().unwrap_or(Categories::GENERAL)
    }

    /// The categories of an instrument's data.
    #[must_use]
    pub fn instrument(&self, code: Option<&str>) -> Categories {
        Self::lookup(&self.instruments, code)
    }

    /// The categories of data about a need.
    #[must_use]
    pub fn need(&self, code: Option<&str>) -> Categories {
        Self::lookup(&self.needs, code)
    }

    /// The categories of data about a service.
    #[must_use]
    pub fn service(&self, code: Option<&str>) -> Categories {
        Self::lookup(&self.services, code)
    }

    /// The categories of a whole record (agency JSON): what its instrument, needs and services say, and its own
    /// `sensitivity` flags.
    #[must_use]
    pub fn record(&self, kind: RecordKind, record: &Value) -> Categories {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let list =
            |v: &Value, k: &str| -> Vec<Value> { v.get(k).and_then(Value::as_array).cloned().unwrap_or_default() };
        let mut out = self.flags(record);
        match kind {
            RecordKind::Client => {}
            RecordKind::Assessment => {
                out = out.union(self.instrument(text(record, "instrument").as_deref()));
                for n in list(record, "identified_needs") {
                    out = out.union(self.need(n.as_str()));
                }
            }
            RecordKind::CarePlan => {
                for n in list(record, "needs") {
                    out = out.union(self.need(n.get("code").and_then(Value::as_str)));
                }
                for i in list(record, "interventions") {
                    out = out.union(self.service(i.get("service").and_then(Value::as_str)));
                }
            }
            RecordKind::Referral => {
                out = out.union(self.need(text(record, "need").as_deref()));
                out = out.union(self.service(text(record, "service").as_deref()));
            }
            RecordKind::Consent => {
                for c in list(record, "categories") {
                    if let Some(c) = c.as_str().and_then(ConsentCategory::from_code) {
                        out.insert(c);
                    }
                }
            }
        }
        out
    }

    /// The categories the record's own `sensitivity` flags name (a case manager marking a record), with general.
    #[must_use]
    pub fn flags(&self, record: &Value) -> Categories {
        let mut out = Categories::GENERAL;
        for c in record.get("sensitivity").and_then(Value::as_array).into_iter().flatten() {
            if let Some(c) = c.as_str().and_then(ConsentCategory::from_code) {
                out.insert(c);
            }
        }
        out
    }

    /// The categories of one part of a care plan (a goal, an intervention, a goal's progress entry, with the goal
    /// holding it as `parent`): its service, the needs it names, and the needs of the goals it serves.
    #[must_use]
    pub fn care_plan_part(&self, plan: &Value, part: &Value, parent: Option<&Value>) -> Categories {
        // A flag on the plan marks every part of it.
        let mut out = self.flags(plan);
        let list = |v: &Value, key: &str| v.get(key).and_then(Value::as_array).map_or(&[][..], Vec::as_slice).to_vec();
        let needs = list(plan, "needs");
        let goals = list(plan, "goals");
        let need_of = |id: &Value| {
            needs.iter().find(|n| n.get("id") == Some(id)).and_then(|n| n.get("code")).and_then(Value::as_str)
        };
        for v in std::iter::once(part).chain(parent.filter(|p| !std::ptr::eq(*p, plan))) {
            out = out.union(self.service(v.get("service").and_then(Value::as_str)));
            for id in list(v, "need_ids") {
                out = out.union(self.need(need_of(&id)));
            }
            // An intervention serving a goal carries what that goal's needs say.
            for goal in list(v, "goal_ids").iter().filter_map(|g| goals.iter().find(|x| x.get("id") == Some(g))) {
                for id in list(goal, "need_ids") {
                    out = out.union(self.need(need_of(&id)));
                }
            }
        }
        out
    }

    /// The `meta.security` codings of data in `categories`: the highest confidentiality, then each sensitive
    /// category's codes, each once.
    #[must_use]
    pub fn security(&self, categories: Categories) -> Vec<Value> {
        let level = self.confidentiality(categories);
        let mut out = vec![level.coding()];
        for c in categories.iter() {
            if let Some(set) = self.sets.get(&c) {
                for coding in &set.codings {
                    if !out.contains(coding) {
                        out.push(coding.clone());
                    }
                }
            }
        }
        out
    }

    /// The highest confidentiality of `categories`.
    #[must_use]
    pub fn confidentiality(&self, categories: Categories) -> Confidentiality {
        categories
            .iter()
            .filter_map(|c| self.sets.get(&c))
            .map(|s| s.confidentiality)
            .max()
            .unwrap_or(Confidentiality::N)
    }
}

/// Writes `security` into a resource's `meta` (after its `profile`, if any).
pub fn apply(resource: &mut Value, security: Vec<Value>) {
    let Some(obj) = resource.as_object_mut() else { return };
    let meta = obj.entry("meta").or_insert_with(|| Value::Object(Map::new()));
    if let Some(m) = meta.as_object_mut() {
        m.insert("security".into(), Value::Array(security));
    }
}

/// The `meta.security` of a Bundle of `resources`: the highest confidentiality among them (the high-water mark),
/// never a sensitivity code (a Bundle's label is read by whoever routes it, not only by its addressee).
#[must_use]
pub fn high_water<'a>(resources: impl IntoIterator<Item = &'a Value>) -> Option<Value> {
    resources
        .into_iter()
        .filter_map(|r| r.pointer("/meta/security").and_then(Confidentiality::of_security))
        .max()
        .map(|level| Value::Array(vec![level.coding()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> LabelRules {
        let mut errors = Vec::new();
        let r = LabelRules::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        r.expect("rules")
    }

    #[test]
    fn substance_use_data_carries_part2_labels_and_general_data_only_a_confidentiality() {
        let r = rules();
        let dast = r.instrument(Some("dast10"));
        assert!(dast.contains(ConsentCategory::SubstanceUse));
        let codes: Vec<String> =
            r.security(dast).iter().map(|c| c["code"].as_str().unwrap_or_default().to_owned()).collect();
        assert_eq!(codes, ["R", "SUD", "ETH", "42CFRPart2", "NODSCLCD"]);
        let general: Vec<Value> = r.security(r.need(Some("food_insecurity")));
        assert_eq!(general.len(), 1);
        assert_eq!(general[0]["code"], "N");
        assert_eq!(general[0]["system"], V3_CONFIDENTIALITY);
    }

    #[test]
    fn a_bundle_carries_the_highest_confidentiality_of_its_entries_and_no_sensitivity() {
        let r = rules();
        let mut a = serde_json::json!({"resourceType": "Patient"});
        let mut b = serde_json::json!({"resourceType": "Observation"});
        apply(&mut a, r.security(Categories::GENERAL));
        apply(&mut b, r.security(r.instrument(Some("phq9"))));
        let mark = high_water([&a, &b]).expect("mark");
        assert_eq!(mark, serde_json::json!([{"system": V3_CONFIDENTIALITY, "code": "R", "display": "restricted"}]));
    }

    #[test]
    fn a_care_plan_part_has_the_categories_of_the_needs_it_names() {
        let r = rules();
        let plan = serde_json::json!({"needs": [{"id": "n1", "code": "substance_use"}, {"id": "n2", "code": "housing_instability"}]});
        let goal = serde_json::json!({"need_ids": ["n2"]});
        assert_eq!(r.care_plan_part(&plan, &goal, Some(&plan)), Categories::GENERAL);
        let both = serde_json::json!({"need_ids": ["n1", "n2"]});
        assert!(r.care_plan_part(&plan, &both, Some(&plan)).contains(ConsentCategory::SubstanceUse));
        let progress = serde_json::json!({"date": "2026-01-01"});
        assert!(r.care_plan_part(&plan, &progress, Some(&both)).contains(ConsentCategory::SubstanceUse));
    }

    #[test]
    fn an_unknown_code_or_category_is_reported_at_its_line() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir(dir.path().join("policy")).expect("mkdir");
        std::fs::write(
            dir.path().join(FILE),
            "version = \"1\"\n[category.general]\nconfidentiality = \"N\"\n[category.mental_health]\nconfidentiality = \"Q\"\n\
             [category.substance_use]\nconfidentiality = \"R\"\nsensitivity = [\"SUDD\"]\n[[rule]]\ncategory = \"mental_health\"\n\
             needs = [\"sadness\"]\n",
        )
        .expect("write");
        let mut errors = Vec::new();
        assert!(LabelRules::load(dir.path(), &mut errors).is_none());
        errors.sort_by_key(|e| e.line);
        let at: Vec<(usize, bool)> = errors.iter().map(|e| (e.line, e.file.ends_with("labels.toml"))).collect();
        assert_eq!(at, [(5, true), (8, true), (11, true)], "{errors:?}");
        assert!(errors[1].message.contains("SUDD"));
        assert!(errors[2].message.contains("sadness"));
    }
}
