//! Declarative mappings between agency records and FHIR R4, loaded from `mappings/`.
//!
//! - `mappings/<kind>.<resource>.toml`: one file per (agency record kind, FHIR resource), a header
//!   (version, profiles, per-item expansion, inverse) and a `[template]` of the resource
//!   ([`template`] describes the language);
//! - `mappings/terminology/*.json`: FHIR `ConceptMap`s ([`terminology`]);
//! - `mappings/profiles/*.toml`: profile rules ([`profile`]);
//! - `mappings/defaults.toml` and `mappings/partners/<name>.toml`: variables (identifier systems),
//!   the pinned US Core version, and extra elements a partner wants, layered on the defaults.
//!
//! [`Mappings::load`] reads all of it and reports every problem with file:line; it also renders
//! every mapping against a complete built-in record of its kind and runs the result through the
//! fhir-sdk typed model, so an unknown FHIR element is reported at the template line that wrote it.

pub mod bundle;
pub mod expr;
pub mod foreign;
pub mod golden;
pub mod inbound;
pub mod labels;
pub mod needs;
pub mod profile;
pub mod references;
pub mod template;
pub mod terminology;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::domain::{AgencyRecord, FieldError, KindJob, RecordKind};
use crate::fhir;
use profile::{Profile, Violation};
use template::{Compiler, Env, Inverse, LineIndex, Node, Span, Trace};
use terminology::ConceptMap;

/// One problem in the mapping files, at file:line:column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
    }
}

/// Every problem found while loading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// How a resource is written in a transaction Bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// Conditional update on the business identifier (`PUT Type?identifier=…`).
    Upsert,
    /// Conditional create (`POST` with `ifNoneExist`): never overwrite what the partner holds.
    Create,
}

/// What a mapping reads: an agency record of one kind, or a need of a client (gathered by [`needs::views`] from
/// the assessments and care plans naming it, rendered with each of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum MappingKind {
    /// An agency record kind.
    Record(RecordKind),
    /// One client's need (`kind = "need"`).
    Need,
}

impl TryFrom<String> for MappingKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "need" {
            return Ok(MappingKind::Need);
        }
        RecordKind::from_name(&s)
            .map(MappingKind::Record)
            .ok_or_else(|| format!("unknown kind `{s}` (client, assessment, care-plan, referral, consent or need)"))
    }
}

impl MappingKind {
    fn as_str(self) -> &'static str {
        match self {
            MappingKind::Record(k) => k.as_str(),
            MappingKind::Need => "need",
        }
    }
}

impl std::fmt::Display for MappingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingHeader {
    version: String,
    kind: MappingKind,
    resource: String,
    profiles: Vec<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    for_each: Option<String>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default = "default_order")]
    order: u32,
    #[serde(default = "default_request")]
    request: RequestKind,
    inverse: bool,
    #[serde(default)]
    inverse_note: Option<String>,
    #[allow(dead_code)]
    template: toml::Value,
}

fn default_order() -> u32 {
    100
}

fn default_request() -> RequestKind {
    RequestKind::Upsert
}

/// One compiled mapping file.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// `<kind>.<resource>` (the file stem).
    pub name: String,
    /// The file.
    pub file: String,
    /// Its version.
    pub version: String,
    /// What it reads.
    pub kind: MappingKind,
    /// The FHIR resource type it writes.
    pub resource: String,
    /// Profile names (files in `profiles/`).
    pub profiles: Vec<String>,
    /// `list`, or `list[].inner` (each entry of each item's `inner` list).
    for_each: Option<(expr::Path, Option<expr::Path>)>,
    when: Option<expr::Cond>,
    order: u32,
    /// How the resource is written in a transaction.
    pub request: RequestKind,
    /// Whether FHIR → agency is supported.
    pub inverse: bool,
    /// Canonical URLs written to `meta.profile`.
    claims: Vec<String>,
    /// The system of the business identifier the template writes (the agency id of what comes back).
    identifier_system: Option<String>,
    template: Node,
    extras: Vec<(Node, String)>,
}

/// The mappings as one partner sees them.
#[derive(Debug, Clone)]
pub struct MappingSet {
    /// The pinned US Core version (7.0.0 or 8.0.0).
    pub us_core: String,
    /// Compiled mappings, in bundle order.
    pub mappings: Vec<Mapping>,
    /// The layer's variables (`system_base`, `agency_id`…), the partner's over the defaults.
    pub vars: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerFile {
    #[serde(default)]
    us_core: Option<String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    #[serde(default)]
    extra: Vec<ExtraFile>,
    #[serde(default)]
    #[allow(dead_code)] // read by people: the file says what it is for
    description: Option<String>,
    #[serde(skip)]
    file: String,
    #[serde(skip)]
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtraFile {
    mapping: String,
    #[allow(dead_code)]
    template: toml::Value,
}

/// Everything under `mappings/`, compiled for the defaults and for each partner.
#[derive(Debug, Clone)]
pub struct Mappings {
    /// The directory it was loaded from.
    pub dir: PathBuf,
    maps: HashMap<String, ConceptMap>,
    profiles: HashMap<String, Profile>,
    default: MappingSet,
    partners: BTreeMap<String, MappingSet>,
    labels: labels::LabelRules,
}

/// A resource produced from a record, with how it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// The mapping that produced it.
    pub mapping: String,
    /// The FHIR resource.
    pub resource: Value,
    /// How it goes in a transaction.
    pub request: RequestKind,
    /// The categories of data it carries (what its security labels say).
    pub categories: labels::Categories,
}

/// What mapping one record gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The resources, in bundle order.
    pub resources: Vec<Emitted>,
    /// Profile and typed-model violations; a resource with violations must not leave.
    pub violations: Vec<Violation>,
}

impl Output {
    /// The document that goes to a partner: one resource, or a transaction Bundle when a record gives
    /// several (care plans and referrals always go as a Bundle).
    #[must_use]
    pub fn document(&self, kind: RecordKind) -> Value {
        self.clone().into_document(kind)
    }

    /// [`Output::document`], taking the output (no copy of the resources).
    #[must_use]
    pub fn into_document(mut self, kind: RecordKind) -> Value {
        if self.resources.len() == 1 && !matches!(kind, RecordKind::CarePlan | RecordKind::Referral) {
            self.resources.remove(0).resource
        } else {
            bundle::into_transaction(self.resources)
        }
    }
}

/// Why a record could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The agency record itself is invalid.
    #[error("the record is invalid")]
    Invalid(Vec<FieldError>),
    /// No partner overlay of that name.
    #[error("no partner `{0}` in the mappings")]
    UnknownPartner(String),
    /// A rule failed (an unmapped code…), at the mapping file's line.
    #[error("{file}:{line}: {message}")]
    Rule {
        /// The mapping file.
        file: String,
        /// The line.
        line: usize,
        /// What failed (codes and field names only).
        message: String,
    },
}

/// Related records a mapping may include (the client's `Patient` in a Bundle).
#[derive(Debug, Clone, Default)]
pub struct Related {
    /// The client record (agency JSON), when known.
    pub client: Option<Value>,
    /// The client's other assessments (agency JSON): evidence of the needs a record names.
    pub assessments: Vec<Value>,
    /// The client's other care plans (agency JSON): the status and notes of the needs a record names.
    pub care_plans: Vec<Value>,
}

/// Validates agency JSON as a record of `kind`; gives it back in canonical form.
///
/// # Errors
/// Every field problem, with its JSON path.
pub fn canonical(kind: RecordKind, record: &Value) -> Result<Value, Vec<FieldError>> {
    struct Check<'a>(&'a Value);
    impl KindJob for Check<'_> {
        type Output = Result<Value, Vec<FieldError>>;
        fn run<T: AgencyRecord>(self) -> Self::Output {
            // The path-tracking parse only runs for a record that failed the plain one.
            let parsed = match T::deserialize(self.0) {
                Ok(p) => p,
                Err(_) => serde_path_to_error::deserialize::<_, T>(self.0).map_err(|e| {
                    let path = format!("$.{}", e.path()).replace("$..", "$");
                    vec![FieldError { path, detail: e.inner().to_string() }]
                })?,
            };
            crate::domain::canonical_value(&parsed)
        }
    }
    kind.with_type(Check(record))
}

/// The built-in complete records of each kind (every optional field set, every branch taken), rendered at
/// load time to check templates: the JSON text and the file it comes from.
fn exemplar_source(kind: RecordKind) -> (&'static str, &'static str) {
    match kind {
        RecordKind::Client => ("src/mapping/exemplars/client.json", include_str!("exemplars/client.json")),
        RecordKind::Assessment => ("src/mapping/exemplars/assessment.json", include_str!("exemplars/assessment.json")),
        RecordKind::CarePlan => ("src/mapping/exemplars/care-plan.json", include_str!("exemplars/care-plan.json")),
        RecordKind::Referral => ("src/mapping/exemplars/referral.json", include_str!("exemplars/referral.json")),
        RecordKind::Consent => ("src/mapping/exemplars/consent.json", include_str!("exemplars/consent.json")),
    }
}

/// Parses the exemplars of `kind` from `text` (a JSON array of records), each checked as a record of
/// its kind and given back in canonical form, as real records reach the templates.
///
/// # Errors
/// Every problem, at `file`: text that is not a JSON array, or a record that is not a valid record of
/// `kind` (its index, the field's JSON path and what is wrong). The "not a field of the record" check
/// trusts these records, so a broken one must stop loading.
fn parse_exemplars(kind: RecordKind, file: &str, text: &str) -> Result<Vec<Value>, Vec<LoadError>> {
    let at = |line: usize, column: usize, message: String| LoadError { file: file.to_owned(), line, column, message };
    let records: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| vec![at(e.line(), e.column(), format!("not a JSON array of records: {e}"))])?;
    if records.is_empty() {
        return Err(vec![at(1, 1, format!("no {kind} record: the templates of this kind cannot be checked"))]);
    }
    let mut out = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    for (i, record) in records.iter().enumerate() {
        match canonical(kind, record) {
            Ok(r) => out.push(r),
            Err(fields) => errors.extend(
                fields
                    .into_iter()
                    .map(|f| at(1, 1, format!("record [{i}] is not a valid {kind} record: {}: {}", f.path, f.detail))),
            ),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// The exemplars of every kind, parsed and checked once per load.
type Exemplars = HashMap<RecordKind, Vec<Value>>;

/// The needs of the built-in records: each assessment and care plan with all the others of its client.
fn exemplar_needs(exemplars: &Exemplars) -> Vec<Value> {
    let of = |k: RecordKind| exemplars.get(&k).cloned().unwrap_or_default();
    let related =
        Related { client: None, assessments: of(RecordKind::Assessment), care_plans: of(RecordKind::CarePlan) };
    let mut out = Vec::new();
    for kind in [RecordKind::Assessment, RecordKind::CarePlan] {
        for record in of(kind) {
            out.extend(needs::views(kind, &record, &related));
        }
    }
    out
}

fn load_exemplars(errors: &mut Vec<LoadError>) -> Exemplars {
    let mut out = HashMap::new();
    for kind in RecordKind::ALL {
        let (file, text) = exemplar_source(kind);
        match parse_exemplars(kind, file, text) {
            Ok(records) => {
                out.insert(kind, records);
            }
            Err(e) => errors.extend(e),
        }
    }
    out
}

fn read_dir_sorted(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == ext)).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Reads and parses `<dir>/<file>` (a TOML file of the mapping files that is not a mapping: the label rules, the
/// policy profiles), pushing a problem reading or parsing it at its line; gives the value, the file's name as
/// messages say it and its text (for the lines of later problems).
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(
    dir: &Path,
    file: &str,
    what: &str,
    errors: &mut Vec<LoadError>,
) -> Option<(T, String, String)> {
    let path = dir.join(file);
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(LoadError { file: name, line: 1, column: 1, message: format!("cannot read {what}: {e}") });
            return None;
        }
    };
    match toml::from_str(&text) {
        Ok(parsed) => Some((parsed, name, text)),
        Err(e) => {
            errors.push(toml_error(&name, &text, &e));
            None
        }
    }
}

/// A TOML parse error at its file:line:column.
pub(crate) fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> LoadError {
    let span = e.span().map_or(Span { line: 1, column: 1 }, |s| LineIndex::new(text).span(s.start));
    LoadError { file: file.to_owned(), line: span.line, column: span.column, message: e.message().to_owned() }
}

struct Source {
    file: String,
    text: String,
}

const US_CORE_VERSIONS: [&str; 2] = ["7.0.0", "8.0.0"];

impl Mappings {
    /// Loads and checks everything under `dir`.
    ///
    /// # Errors
    /// Every problem in every file, with file:line.
    pub fn load(dir: &Path) -> Result<Self, LoadErrors> {
        let mut errors = Vec::new();
        let at = |file: &Path| file.display().to_string();
        if !dir.is_dir() {
            return Err(LoadErrors(vec![LoadError {
                file: at(dir),
                line: 1,
                column: 1,
                message: "the mappings directory does not exist".into(),
            }]));
        }
        let mut maps = HashMap::new();
        for path in read_dir_sorted(&dir.join("terminology"), "json") {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    if let Some(map) = terminology::load(&path, &text, &mut errors) {
                        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                        if map.id != stem {
                            let (line, column) = terminology::line_of(&text, "\"id\"");
                            errors.push(LoadError {
                                file: at(&path),
                                line,
                                column,
                                message: format!("the ConceptMap id `{}` differs from the file name `{stem}`", map.id),
                            });
                        }
                        maps.insert(map.id.clone(), map);
                    }
                }
                Err(e) => errors.push(LoadError { file: at(&path), line: 1, column: 1, message: e.to_string() }),
            }
        }
        let mut profiles = HashMap::new();
        for path in read_dir_sorted(&dir.join("profiles"), "toml") {
            let file = at(&path);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            match toml::from_str::<Profile>(&text) {
                Ok(mut p) => {
                    p.name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
                    profiles.insert(p.name.clone(), p);
                }
                Err(e) => errors.push(toml_error(&file, &text, &e)),
            }
        }
        let sources: Vec<Source> = read_dir_sorted(dir, "toml")
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n != "defaults.toml"))
            .map(|p| Source { file: at(&p), text: std::fs::read_to_string(&p).unwrap_or_default() })
            .collect();
        let defaults_path = dir.join("defaults.toml");
        let defaults = load_layer(&defaults_path, &mut errors).unwrap_or_default();
        let exemplars = load_exemplars(&mut errors);
        let default = compile_set(&sources, &defaults, None, &maps, &profiles, &exemplars, &mut errors);
        let mut partners = BTreeMap::new();
        for path in read_dir_sorted(&dir.join("partners"), "toml") {
            let Some(layer) = load_layer(&path, &mut errors) else { continue };
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            let set = compile_set(&sources, &defaults, Some(&layer), &maps, &profiles, &exemplars, &mut errors);
            partners.insert(name, set);
        }
        let labels = labels::LabelRules::load(dir, &mut errors);
        if let (true, Some(labels)) = (errors.is_empty(), labels) {
            Ok(Mappings { dir: dir.to_owned(), maps, profiles, default, partners, labels })
        } else {
            errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            errors.dedup();
            Err(LoadErrors(errors))
        }
    }

    /// The identifier system of `what` (`directory-service`, `client`…) under the defaults' `system_base`: what a
    /// logical reference names, and what a published resource carries so that such a reference finds it.
    #[must_use]
    pub fn identifier_system(&self, what: &str) -> Option<String> {
        self.default.vars.get("system_base").map(|base| format!("{}/{what}", base.trim_end_matches('/')))
    }

    /// Partner names with an overlay.
    pub fn partners(&self) -> impl Iterator<Item = &str> {
        self.partners.keys().map(String::as_str)
    }

    /// How many mapping files, ConceptMaps and profiles were loaded.
    #[must_use]
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.default.mappings.len(), self.maps.len(), self.profiles.len())
    }

    /// The mapping set a partner sees (the defaults when `partner` is `None`).
    ///
    /// # Errors
    /// `UnknownPartner`.
    pub fn set(&self, partner: Option<&str>) -> Result<&MappingSet, MapError> {
        match partner {
            None => Ok(&self.default),
            Some(p) => self.partners.get(p).ok_or_else(|| MapError::UnknownPartner(p.to_owned())),
        }
    }

    /// Maps one agency record (already canonical) to FHIR: render, label, check every resource.
    ///
    /// # Errors
    /// An unknown partner, or a rule that failed (an unmapped code).
    pub fn to_fhir(
        &self,
        kind: RecordKind,
        record: &Value,
        partner: Option<&str>,
        related: &Related,
    ) -> Result<Output, MapError> {
        let mut resources = self.render(kind, record, partner, related)?;
        self.label(&mut resources);
        let violations = self.check(partner, &resources)?;
        Ok(Output { resources, violations })
    }

    /// The label rules (`mappings/policy/labels.toml`): what the egress policy classifies records by.
    #[must_use]
    pub fn labels(&self) -> &labels::LabelRules {
        &self.labels
    }

    /// Renders the resources of one record (the first step of [`Mappings::to_fhir`]), each with the categories of
    /// data it carries; nothing is labelled or checked yet.
    ///
    /// # Errors
    /// An unknown partner, or a rule that failed (an unmapped code).
    pub fn render(
        &self,
        kind: RecordKind,
        record: &Value,
        partner: Option<&str>,
        related: &Related,
    ) -> Result<Vec<Emitted>, MapError> {
        let set = self.set(partner)?;
        let mut resources = Vec::new();
        if matches!(kind, RecordKind::CarePlan | RecordKind::Referral)
            && let Some(client) = &related.client
        {
            self.render_kind(set, RecordKind::Client, client, &[], &mut resources)?;
        }
        let needs = needs::views(kind, record, related);
        self.render_kind(set, kind, record, &needs, &mut resources)?;
        Ok(resources)
    }

    /// Writes each resource's security labels (`meta.security`) from its categories: the second step.
    pub fn label(&self, resources: &mut [Emitted]) {
        for e in resources {
            labels::apply(&mut e.resource, self.labels.security(e.categories));
        }
    }

    /// Checks every resource (base R4, typed model, references, the profiles its mapping claims, labels included)
    /// and the set for duplicate full URLs: the last step.
    ///
    /// # Errors
    /// An unknown partner.
    pub fn check(&self, partner: Option<&str>, resources: &[Emitted]) -> Result<Vec<Violation>, MapError> {
        let set = self.set(partner)?;
        let mut violations = Vec::new();
        for e in resources {
            violations.extend(self.check_resource(set, e));
        }
        violations.extend(duplicate_full_urls(resources));
        Ok(violations)
    }

    /// Renders the mappings of `kind` against `record`, and the need mappings against each of `needs`, in
    /// bundle order.
    fn render_kind(
        &self,
        set: &MappingSet,
        kind: RecordKind,
        record: &Value,
        needs: &[Value],
        out: &mut Vec<Emitted>,
    ) -> Result<(), MapError> {
        for m in &set.mappings {
            let sources: &[Value] = match m.kind {
                MappingKind::Record(k) if k == kind => std::slice::from_ref(record),
                MappingKind::Need => needs,
                MappingKind::Record(_) => continue,
            };
            for source in sources {
                for (resource, item, parent) in render_mapping(m, &self.maps, source, &mut None)? {
                    let categories = match m.kind {
                        // A need's Condition says what its need says, and what the record it came from is marked.
                        MappingKind::Need => {
                            self.labels.need(item.get("code").and_then(Value::as_str)).union(self.labels.flags(record))
                        }
                        MappingKind::Record(RecordKind::CarePlan) if !std::ptr::eq(item, source) => {
                            self.labels.care_plan_part(source, item, parent)
                        }
                        MappingKind::Record(k) => self.labels.record(k, source),
                    };
                    out.push(Emitted { mapping: m.name.clone(), resource, request: m.request, categories });
                }
            }
        }
        Ok(())
    }

    fn check_resource(&self, set: &MappingSet, e: &Emitted) -> Vec<Violation> {
        let mut out = Vec::new();
        if let Err(issue) = fhir::typed_parse(&e.resource) {
            out.push(Violation {
                profile: "FHIR R4 (typed model)".into(),
                path: String::new(),
                message: issue.to_string(),
            });
        }
        let ty = e.resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
        out.extend(fhir::schema::check(&e.resource).into_iter().map(|i| Violation {
            profile: "FHIR R4".into(),
            path: if i.path.is_empty() { ty.to_owned() } else { format!("{ty}.{}", i.path) },
            message: i.message,
        }));
        out.extend(references::check(&e.resource).into_iter().map(|i| Violation {
            profile: REFERENCES_RULE.into(),
            path: format!("{ty}.{}", i.path),
            message: i.message,
        }));
        if let Some(m) = set.mappings.iter().find(|m| m.name == e.mapping) {
            for p in m.profiles.iter().filter_map(|p| self.profiles.get(p)) {
                out.extend(p.check(&e.resource, &set.us_core));
            }
        }
        out
    }

    /// The referral status a FHIR `Task.status` code stands for: the `referral-status-task` ConceptMap read
    /// backwards (`None` for a code no referral status maps to, such as `ready` or `received`).
    #[must_use]
    pub fn referral_status_of_task(&self, code: &str) -> Option<crate::domain::ReferralStatus> {
        let map = self.maps.get(TASK_STATUS_MAP)?;
        let system = map.target_system()?;
        crate::domain::ReferralStatus::from_code(map.reverse(system, code).ok()?)
    }

    /// The FHIR `Task.status` code of a referral status (the `referral-status-task` ConceptMap).
    #[must_use]
    pub fn task_status_of(&self, status: crate::domain::ReferralStatus) -> Option<String> {
        let map = self.maps.get(TASK_STATUS_MAP)?;
        map.translate(status.as_str()).ok().flatten().map(|c| c.code.clone())
    }

    /// Reads a referral (and its client) back from FHIR resources that carry the agency's own ids: a
    /// `ServiceRequest`, its `Task` and the `Patient`, loose or in a Bundle.
    ///
    /// # Errors
    /// An unknown partner.
    pub fn referral_from_fhir(&self, resources: &[Value], partner: Option<&str>) -> Result<Inbound, MapError> {
        self.referral_from_fhir_with(resources, partner, inbound::Ids::Agency)
    }

    /// Reads a referral (and its client) back from FHIR resources, with ids as `ids` says: the agency ids come
    /// from the business identifiers, references are followed to the identifiers of what they name.
    ///
    /// # Errors
    /// An unknown partner.
    pub fn referral_from_fhir_with(
        &self,
        resources: &[Value],
        partner: Option<&str>,
        ids: inbound::Ids<'_>,
    ) -> Result<Inbound, MapError> {
        let set = self.set(partner)?;
        let resources = bundle::unbundle(resources);
        let mut systems = inbound::Systems::default();
        for m in &set.mappings {
            if let Some(system) = &m.identifier_system {
                systems.add(&m.resource, system);
            }
        }
        // A literal reference to staff or a partner (the form the mappings once wrote) reads as the logical one
        // whose identifier value comes from the record; the agency's own identifier is fixed, never read back.
        for m in &set.mappings {
            let mut logical = Vec::new();
            m.template.logical_references(&mut logical);
            for (ty, system, _) in logical.into_iter().filter(|(_, _, from_record)| *from_record) {
                systems.add_logical(&ty, &system);
            }
        }
        let mut referral = Inverse {
            maps: &self.maps,
            out: Value::Object(serde_json::Map::new()),
            consumed: HashSet::new(),
            issues: Vec::new(),
            resource: String::new(),
            pending: Vec::new(),
        };
        let mut client = Inverse { out: Value::Object(serde_json::Map::new()), ..referral.clone_empty() };
        let mut unmapped = Vec::new();
        let mut foreign = Vec::new();
        let mut server_ids = Vec::new();
        let mut seen_client = false;
        for local in inbound::localize(&resources, &systems, ids) {
            let r = &local.resource;
            let ty = r.get("resourceType").and_then(Value::as_str).unwrap_or_default();
            match (&local.agency_id, &local.resource_id) {
                (Some(agency), Some(id)) => server_ids.push((format!("{ty}/{id}"), agency.clone())),
                (None, id) => foreign.push(format!(
                    "{ty}/{}: carries no identifier the gateway wrote; a foreign resource, matched by its identifiers",
                    id.as_deref().unwrap_or("(no id)")
                )),
                (Some(_), None) => {}
            }
            unmapped.extend(local.unresolved.iter().map(|u| format!("{ty}.{u}")));
            let (kind, inv) = match ty {
                "Patient" => {
                    seen_client = true;
                    (MappingKind::Record(RecordKind::Client), &mut client)
                }
                _ => (MappingKind::Record(RecordKind::Referral), &mut referral),
            };
            let Some(m) = set.mappings.iter().find(|m| m.kind == kind && m.resource == ty && m.inverse) else {
                // A resource our own one-way mapping derives (the crisis Flag) says nothing new; anything else
                // is reported, never dropped.
                if !set.mappings.iter().any(|m| m.kind == kind && m.resource == ty) {
                    unmapped.push(format!("{ty}: no inverse mapping for this resource type"));
                }
                continue;
            };
            inv.consumed.clear();
            inv.resource = ty.to_owned();
            m.template.invert(r, "", &[], inv);
            inv.settle();
            for path in template::unread(r, "", &inv.consumed) {
                if path != "resourceType" && !path.starts_with("meta.") && !path.starts_with("text.") {
                    unmapped.push(format!("{ty}.{path}: not mapped"));
                }
            }
        }
        unmapped.append(&mut referral.issues);
        unmapped.append(&mut client.issues);
        Ok(Inbound { referral: referral.out, client: seen_client.then_some(client.out), unmapped, foreign, server_ids })
    }
}

impl Inverse<'_> {
    fn clone_empty(&self) -> Self {
        Inverse {
            maps: self.maps,
            out: Value::Null,
            consumed: HashSet::new(),
            issues: Vec::new(),
            resource: String::new(),
            pending: Vec::new(),
        }
    }
}

/// What the inverse mapping read from FHIR.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// The referral as agency JSON (validate it with [`canonical`]).
    pub referral: Value,
    /// The client as agency JSON, when a `Patient` came along.
    pub client: Option<Value>,
    /// What could not be mapped back, by FHIR path (never dropped silently).
    pub unmapped: Vec<String>,
    /// Resources that carry no business identifier of the gateway: not adopted (their ids are not agency ids).
    pub foreign: Vec<String>,
    /// `Type/<id the resource had>` → the agency id its identifier gave (for a partner: the crosswalk).
    pub server_ids: Vec<(String, String)>,
}

/// The ConceptMap between referral statuses and FHIR Task statuses (the closed loop reads it both ways).
pub const TASK_STATUS_MAP: &str = "referral-status-task";

/// The name violations of invariant 7 are reported under ([`references`]).
pub const REFERENCES_RULE: &str = "carebridge references (DESIGN invariant 7)";

/// bdl-7: every entry of the transaction Bundle has its own `fullUrl`. The URL is derived from
/// `Type/id`, so two resources with one id (a need listed twice) would overwrite each other.
fn duplicate_full_urls(resources: &[Emitted]) -> Vec<Violation> {
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, e) in resources.iter().enumerate() {
        let ty = e.resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
        let id = e.resource.get("id").and_then(Value::as_str).unwrap_or_default();
        let key = format!("{ty}/{id}");
        if let Some(j) = first.get(&key) {
            out.push(Violation {
                profile: "FHIR R4".into(),
                path: format!("Bundle.entry[{i}].fullUrl"),
                message: format!("bdl-7: the same fullUrl as entry [{j}] (both are {key})"),
            });
        } else {
            first.insert(key, i);
        }
    }
    out
}

/// A rendered resource, with the item it was rendered from and the item holding that one.
type Rendered<'v> = (Value, &'v Value, Option<&'v Value>);

/// The resources `m` renders from `record`, each with the item it was rendered from and the item holding that
/// one (for a mapping without `for_each`, the record itself and none).
fn render_mapping<'v>(
    m: &Mapping,
    maps: &HashMap<String, ConceptMap>,
    record: &'v Value,
    trace: &mut Option<Trace>,
) -> Result<Vec<Rendered<'v>>, MapError> {
    let fail =
        |e: template::RenderError| MapError::Rule { file: m.file.clone(), line: e.span.line, message: e.message };
    fn list<'v>(root: &'v Value, v: &'v Value, path: &expr::Path) -> &'v [Value] {
        path.get(root, v).and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }
    // Each item with the item whose list holds it and its position there.
    let items: Vec<(&Value, Option<&Value>, usize)> = match &m.for_each {
        Some((outer, None)) => {
            list(record, record, outer).iter().enumerate().map(|(i, x)| (x, Some(record), i + 1)).collect()
        }
        Some((outer, Some(inner))) => list(record, record, outer)
            .iter()
            .flat_map(|o| list(record, o, inner).iter().enumerate().map(move |(i, x)| (x, Some(o), i + 1)))
            .collect(),
        None => vec![(record, None, 1)],
    };
    let mut out = Vec::new();
    for (item, parent, index) in items {
        let env = Env { root: record, maps, parent, index: parent.map(|_| Value::from(index)) };
        if m.when.as_ref().is_some_and(|c| !c.holds(record, item)) {
            continue;
        }
        let Some(mut v) = m.template.render(&env, item, trace).map_err(fail)? else { continue };
        fit_ids(&mut v);
        if !m.claims.is_empty()
            && let Some(obj) = v.as_object_mut()
        {
            obj.insert("meta".into(), serde_json::json!({ "profile": m.claims }));
        }
        for (extra, file) in &m.extras {
            let fail_extra =
                |e: template::RenderError| MapError::Rule { file: file.clone(), line: e.span.line, message: e.message };
            if let Some(x) = extra.render(&env, item, trace).map_err(fail_extra)? {
                bundle::merge(&mut v, x);
            }
        }
        out.push((v, item, parent));
    }
    Ok(out)
}

/// Whether `s` is a FHIR `id` (letters, digits, `-` and `.`, 1 to 64).
pub(crate) fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The id a composed id that breaks FHIR's `id` rule becomes: the same for the resource and every reference to
/// it (`Goal/<plan>.<goal>` over 64 characters), while the business identifier keeps the whole value.
fn fitted_id(resource_type: &str, id: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("urn:carebridge:id:{resource_type}/{id}").as_bytes())
        .to_string()
}

/// Rewrites a resource id, and the literal references, that break FHIR's `id` rule (a composed id of two agency
/// ids can pass 64 characters) to [`fitted_id`].
fn fit_ids(resource: &mut Value) {
    fn references(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get_mut("reference")
                    && let Some((ty, id)) = r.split_once('/')
                    && ty.bytes().all(|b| b.is_ascii_alphabetic())
                    && !id.is_empty()
                    && !id.contains('/')
                    && !is_fhir_id(id)
                {
                    *r = format!("{ty}/{}", fitted_id(ty, id));
                }
                m.values_mut().filter(|x| x.is_object() || x.is_array()).for_each(references);
            }
            Value::Array(a) => a.iter_mut().filter(|x| x.is_object() || x.is_array()).for_each(references),
            _ => {}
        }
    }
    let ty = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_owned();
    if let Some(Value::String(id)) = resource.get_mut("id")
        && !is_fhir_id(id)
    {
        *id = fitted_id(&ty, id);
    }
    references(resource);
}

fn load_layer(path: &Path, errors: &mut Vec<LoadError>) -> Option<LayerFile> {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(LoadError { file, line: 1, column: 1, message: e.to_string() });
            return None;
        }
    };
    match toml::from_str::<LayerFile>(&text) {
        Ok(mut layer) => {
            layer.file.clone_from(&file);
            layer.text.clone_from(&text);
            if let Some(v) = &layer.us_core
                && !US_CORE_VERSIONS.contains(&v.as_str())
            {
                let (line, column) = terminology::line_of(&text, "us_core");
                errors.push(LoadError { file, line, column, message: format!("us_core is 7.0.0 or 8.0.0, not {v}") });
            }
            Some(layer)
        }
        Err(e) => {
            errors.push(toml_error(&file, &text, &e));
            None
        }
    }
}

#[allow(clippy::too_many_lines)]
fn compile_set(
    sources: &[Source],
    defaults: &LayerFile,
    partner: Option<&LayerFile>,
    maps: &HashMap<String, ConceptMap>,
    profiles: &HashMap<String, Profile>,
    exemplars: &Exemplars,
    errors: &mut Vec<LoadError>,
) -> MappingSet {
    let mut vars = defaults.vars.clone();
    let mut us_core = defaults.us_core.clone().unwrap_or_else(|| "7.0.0".to_owned());
    if let Some(p) = partner {
        vars.extend(p.vars.clone());
        if let Some(v) = &p.us_core {
            us_core.clone_from(v);
        }
    }
    vars.insert("us_core".into(), us_core.clone());
    let lookup = |name: &str| vars.get(name).cloned();
    let mut mappings = Vec::new();
    for src in sources {
        let err_at = |span: Span, message: String| LoadError {
            file: src.file.clone(),
            line: span.line,
            column: span.column,
            message,
        };
        let header: MappingHeader = match toml::from_str(&src.text) {
            Ok(h) => h,
            Err(e) => {
                errors.push(toml_error(&src.file, &src.text, &e));
                continue;
            }
        };
        let lines = LineIndex::new(&src.text);
        let stem = Path::new(&src.file).file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        let Ok(doc) = toml::de::DeTable::parse(&src.text) else { continue };
        let Some(tpl) = doc.get_ref().get("template") else { continue };
        let tpl_span = lines.span(tpl.span().start);
        let head_span = |key: &str| {
            let (line, column) = terminology::line_of(&src.text, key);
            Span { line, column }
        };
        let expected_stem = format!("{}.{}", header.kind.as_str().replace('-', "_"), snake(&header.resource));
        // A second mapping of one kind to one resource type (the item Observations of an assessment) is
        // named `<kind>.<resource>-<part>.toml`.
        let part_ok =
            stem.strip_prefix(expected_stem.as_str()).and_then(|rest| rest.strip_prefix('-')).is_some_and(|part| {
                !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            });
        if stem != expected_stem && !part_ok {
            errors.push(err_at(
                Span { line: 1, column: 1 },
                format!(
                    "a mapping of {} to {} is named {expected_stem}.toml (or {expected_stem}-<part>.toml)",
                    header.kind, header.resource
                ),
            ));
        }
        let mut c =
            Compiler { vars: &lookup, lines: &lines, errors: Vec::new(), maps_used: Vec::new(), lossy: Vec::new() };
        let template = c.node(tpl, false);
        let for_each = header.for_each.as_deref().and_then(|p| {
            let (outer, inner) = match p.split_once("[].") {
                Some((o, i)) => (o, Some(i)),
                None => (p, None),
            };
            let mut parse = |s: &str| expr::Path::parse(s).map_err(|e| c.errors.push((head_span("for_each"), e))).ok();
            Some((
                parse(outer)?,
                match inner {
                    Some(i) => Some(parse(i)?),
                    None => None,
                },
            ))
        });
        let when = header
            .when
            .as_deref()
            .and_then(|w| expr::Cond::parse(w, &lookup).map_err(|e| c.errors.push((head_span("when"), e))).ok());
        let mut compile_errors = std::mem::take(&mut c.errors);
        let mut maps_used = std::mem::take(&mut c.maps_used);
        if header.inverse {
            for (filter, span, oneway) in std::mem::take(&mut c.lossy) {
                if !oneway {
                    compile_errors.push((
                        span,
                        format!(
                            "filter `{filter}` cannot be undone when reading FHIR back: mark the element \
                             `$oneway = \"why\"` or the mapping `inverse = false`"
                        ),
                    ));
                }
            }
        }
        // Extras from the defaults and the partner layer, compiled against their own files.
        let mut extras = Vec::new();
        for layer in [Some(defaults), partner] {
            let Some(layer) = layer else { continue };
            if !layer.extra.iter().any(|x| x.mapping == stem) {
                continue;
            }
            let file = layer.file.clone();
            let xlines = LineIndex::new(&layer.text);
            {
                let Ok(xdoc) = toml::de::DeTable::parse(&layer.text) else { continue };
                let Some(toml::de::DeValue::Array(list)) = xdoc.get_ref().get("extra").map(|v| v.get_ref()) else {
                    continue;
                };
                for entry in list.iter() {
                    let toml::de::DeValue::Table(t) = entry.get_ref() else { continue };
                    let names_this = t
                        .get("mapping")
                        .is_some_and(|m| matches!(m.get_ref(), toml::de::DeValue::String(s) if *s == stem));
                    let Some(xt) = t.get("template").filter(|_| names_this) else { continue };
                    let mut xc = Compiler {
                        vars: &lookup,
                        lines: &xlines,
                        errors: Vec::new(),
                        maps_used: Vec::new(),
                        lossy: Vec::new(),
                    };
                    let node = xc.node(xt, true);
                    for (span, message) in xc.errors {
                        errors.push(LoadError { file: file.clone(), line: span.line, column: span.column, message });
                    }
                    extras.push((node, file.clone()));
                }
            }
        }
        for (name, span, oneway) in maps_used.drain(..) {
            match maps.get(&name) {
                None => compile_errors.push((span, format!("no ConceptMap `{name}` in mappings/terminology"))),
                Some(map) if header.inverse && !oneway && !map.reversible() => compile_errors.push((
                    span,
                    format!("ConceptMap `{name}` is not reversible: mark the element `$oneway = \"why\"` or the mapping `inverse = false`"),
                )),
                Some(_) => {}
            }
        }
        if header.inverse && for_each.is_some() {
            compile_errors.push((
                head_span("inverse"),
                "a mapping with for_each cannot be inverted (set inverse = false)".into(),
            ));
        }
        if !header.inverse && header.inverse_note.as_deref().is_none_or(|n| n.trim().is_empty()) {
            compile_errors.push((head_span("inverse"), "a one-way mapping says why in inverse_note".into()));
        }
        let mut produced = HashSet::new();
        template.produced_paths("", &mut produced);
        for p in &header.profiles {
            match profiles.get(p) {
                None => compile_errors.push((head_span("profiles"), format!("no profile `{p}` in mappings/profiles"))),
                Some(profile) => {
                    if profile.resource != header.resource {
                        compile_errors.push((
                            head_span("profiles"),
                            format!("profile `{p}` constrains {}, not {}", profile.resource, header.resource),
                        ));
                    }
                    for rule in profile.rules.iter().filter(|r| r.applies(&us_core)) {
                        if matches!(rule, profile::Rule::Required { .. }) && !produced.contains(rule.path()) {
                            compile_errors.push((
                                tpl_span,
                                format!("the template never writes `{}`, which profile `{p}` requires", rule.path()),
                            ));
                        }
                    }
                }
            }
        }
        if !produced.contains("identifier.value") {
            compile_errors.push((
                tpl_span,
                "the template writes no business identifier (identifier.system + identifier.value)".into(),
            ));
        }
        if header.resource != template_resource_type(&template) {
            compile_errors.push((tpl_span, format!("template.resourceType must be \"{}\"", header.resource)));
        }
        let _ = header.description;
        for (span, message) in compile_errors.drain(..) {
            errors.push(err_at(span, message));
        }
        let claims =
            header.profiles.iter().filter_map(|p| profiles.get(p)).filter(|p| p.claim).map(|p| p.url.clone()).collect();
        mappings.push(Mapping {
            name: stem,
            file: src.file.clone(),
            version: header.version,
            kind: header.kind,
            resource: header.resource,
            profiles: header.profiles,
            for_each,
            when,
            order: header.order,
            request: header.request,
            inverse: header.inverse,
            claims,
            identifier_system: template.identifier_system(),
            template,
            extras,
        });
    }
    for layer in partner.into_iter().chain(std::iter::once(defaults)) {
        for x in layer.extra.iter().filter(|x| !mappings.iter().any(|m| m.name == x.mapping)) {
            let (line, column) = terminology::line_of(&layer.text, &format!("\"{}\"", x.mapping));
            errors.push(LoadError {
                file: layer.file.clone(),
                line,
                column,
                message: format!("no mapping `{}` to extend", x.mapping),
            });
        }
    }
    mappings.sort_by(|a, b| (a.order, &a.name).cmp(&(b.order, &b.name)));
    let set = MappingSet { us_core, mappings, vars };
    self_check(&set, maps, profiles, exemplars, errors);
    set
}

fn template_resource_type(n: &Node) -> &str {
    match n {
        Node::Object { fields, .. } => fields
            .iter()
            .find(|(k, _)| k == "resourceType")
            .and_then(|(_, v)| if let Node::Lit(Value::String(s), _) = v { Some(s.as_str()) } else { None })
            .unwrap_or(""),
        _ => "",
    }
}

fn snake(resource: &str) -> String {
    let mut out = String::new();
    for (i, c) in resource.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Renders every mapping against its kind's exemplar and runs the output through the typed model and
/// the profiles, so a template that writes an unknown element or breaks its profile stops loading.
fn self_check(
    set: &MappingSet,
    maps: &HashMap<String, ConceptMap>,
    profiles: &HashMap<String, Profile>,
    exemplars: &Exemplars,
    errors: &mut Vec<LoadError>,
) {
    for m in &set.mappings {
        let mut reads: HashMap<(usize, usize, String), bool> = HashMap::new();
        let mut rendered = 0;
        let need_views;
        let records: &[Value] = match m.kind {
            MappingKind::Record(k) => exemplars.get(&k).map_or(&[], Vec::as_slice),
            MappingKind::Need => {
                need_views = exemplar_needs(exemplars);
                &need_views
            }
        };
        for record in records {
            rendered += self_check_one(set, m, record, maps, profiles, errors, &mut reads);
        }
        if rendered == 0 {
            errors.push(LoadError {
                file: m.file.clone(),
                line: 1,
                column: 1,
                message: "no built-in complete record reaches this template, so its elements cannot be checked".into(),
            });
        }
        for ((line, column, path), found) in reads {
            if !found {
                errors.push(LoadError {
                    file: m.file.clone(),
                    line,
                    column,
                    message: format!("`{path}` is not a field of a {} record", m.kind),
                });
            }
        }
    }
}

fn self_check_one(
    set: &MappingSet,
    m: &Mapping,
    record: &Value,
    maps: &HashMap<String, ConceptMap>,
    profiles: &HashMap<String, Profile>,
    errors: &mut Vec<LoadError>,
    reads: &mut HashMap<(usize, usize, String), bool>,
) -> usize {
    let count;
    {
        let record = record.clone();
        let mut trace = Some(Trace::default());
        let rendered = match render_mapping(m, maps, &record, &mut trace) {
            Ok(r) => r,
            Err(MapError::Rule { file, line, message }) => {
                errors.push(LoadError { file, line, column: 1, message });
                return 0;
            }
            Err(_) => return 0,
        };
        let trace = trace.unwrap_or_default();
        for (k, found) in &trace.reads {
            *reads.entry(k.clone()).or_default() |= *found;
        }
        count = rendered.len();
        for (r, _, _) in rendered {
            let at = |path: &str| trace.span_of(path).unwrap_or(Span { line: 1, column: 1 });
            match fhir::typed_check(&r) {
                Ok(()) => {}
                Err(fhir::TypedIssue::Unknown(paths)) => {
                    for p in paths {
                        let s = at(&p);
                        errors.push(LoadError {
                            file: m.file.clone(),
                            line: s.line,
                            column: s.column,
                            message: format!("unknown FHIR element `{p}` in {}", m.resource),
                        });
                    }
                }
                Err(fhir::TypedIssue::Refused { path, message }) => {
                    let s = at(&path);
                    errors.push(LoadError {
                        file: m.file.clone(),
                        line: s.line,
                        column: s.column,
                        message: format!("{}.{path}: {message}", m.resource),
                    });
                }
                Err(other) => {
                    errors.push(LoadError { file: m.file.clone(), line: 1, column: 1, message: other.to_string() })
                }
            }
            // The exemplars are complete records: a template that writes a bad literal code or an
            // invalid primitive stops loading at its line instead of refusing every real record.
            for issue in fhir::schema::check(&r) {
                let s = at(&issue.path);
                errors.push(LoadError {
                    file: m.file.clone(),
                    line: s.line,
                    column: s.column,
                    message: format!("{}.{}: {} (FHIR R4)", m.resource, issue.path, issue.message),
                });
            }
            // No literal reference to what is never delivered; every reference names its record by identifier.
            for issue in references::check(&r) {
                let s = at(&issue.path);
                errors.push(LoadError {
                    file: m.file.clone(),
                    line: s.line,
                    column: s.column,
                    message: format!("{}.{}: {}", m.resource, issue.path, issue.message),
                });
            }
            for p in m.profiles.iter().filter_map(|p| profiles.get(p)) {
                for v in p.check(&r, &set.us_core) {
                    let s = at(&v.path);
                    errors.push(LoadError {
                        file: m.file.clone(),
                        line: s.line,
                        column: s.column,
                        message: format!("profile {}: {}", p.name, v.message),
                    });
                }
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    #[test]
    fn the_shipped_mappings_load_without_errors() {
        if let Err(e) = Mappings::load(&repo("mappings")) {
            panic!("{e}");
        }
    }

    #[test]
    fn two_resources_with_one_full_url_break_bdl_7_at_the_second_entry() {
        let e = |id: &str| Emitted {
            mapping: "m".into(),
            resource: serde_json::json!({"resourceType": "Condition", "id": id}),
            request: RequestKind::Upsert,
            categories: crate::mapping::labels::Categories::GENERAL,
        };
        let v = duplicate_full_urls(&[e("cp-1.n1"), e("cp-1.n2"), e("cp-1.n1")]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].path, "Bundle.entry[2].fullUrl");
        assert!(v[0].message.starts_with("bdl-7: the same fullUrl as entry [0]"), "{v:?}");
    }

    #[test]
    fn every_built_in_exemplar_is_a_valid_record_of_its_kind() {
        for kind in RecordKind::ALL {
            let (file, text) = exemplar_source(kind);
            let records = parse_exemplars(kind, file, text).unwrap_or_else(|e| panic!("{kind}: {e:?}"));
            assert!(!records.is_empty(), "{kind} has no exemplar");
        }
    }

    #[test]
    fn an_exemplar_that_is_not_a_valid_record_stops_loading_with_its_field() {
        let (file, text) = exemplar_source(RecordKind::Referral);
        let broken = text.replacen("\"priority\": \"crisis\"", "\"priority\": \"whenever\"", 1);
        assert_ne!(broken, text, "the exemplar changed shape; update this test");
        let errors = parse_exemplars(RecordKind::Referral, file, &broken).expect_err("must not load");
        assert!(errors.iter().any(|e| e.file == file && e.message.contains("priority")), "{errors:?}");
    }

    #[test]
    fn an_exemplar_file_that_is_not_json_stops_loading_with_its_line() {
        let errors = parse_exemplars(RecordKind::Client, "x.json", "[\n  {\"id\": }\n]").expect_err("must not load");
        assert_eq!((errors[0].file.as_str(), errors[0].line), ("x.json", 2), "{errors:?}");
    }
}

#[cfg(test)]
mod round_trip {
    use super::*;

    fn repo(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    fn read(p: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("readable")).expect("JSON")
    }

    /// The referral and client read back are the ones mapped, and nothing was left unread.
    fn assert_came_back(back: &Inbound, referral: &Value, client: &Value, path: &Path) {
        assert_eq!(back.unmapped, Vec::<String>::new(), "{}", path.display());
        let again = canonical(RecordKind::Referral, &back.referral)
            .unwrap_or_else(|e| panic!("{}: {e:?}\n{}", path.display(), back.referral));
        assert_eq!(&again, referral, "{}", path.display());
        let patient = back.client.clone().expect("a Patient came along");
        assert_eq!(&canonical(RecordKind::Client, &patient).expect("valid"), client, "{}", path.display());
    }

    #[test]
    fn every_referral_fixture_comes_back_the_same_through_fhir() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let mut n = 0;
        for path in read_dir_sorted(&repo("fixtures/agency/referral"), "json") {
            let referral = canonical(RecordKind::Referral, &read(&path)).expect("valid fixture");
            let client_id = referral["client_id"].as_str().expect("client id");
            let client =
                canonical(RecordKind::Client, &read(&repo(&format!("fixtures/agency/client/{client_id}.json"))))
                    .expect("valid client");
            let related = Related { client: Some(client.clone()), ..Related::default() };
            let output = mappings.to_fhir(RecordKind::Referral, &referral, None, &related).expect("maps");
            assert!(output.violations.is_empty(), "{}: {:?}", path.display(), output.violations);
            let bundle = output.document(RecordKind::Referral);
            let back = mappings.referral_from_fhir(&[bundle], None).expect("inverts");
            assert_came_back(&back, &referral, &client, &path);
            n += 1;
        }
        assert!(n >= 7, "only {n} referral fixtures");
    }

    #[test]
    fn every_field_of_a_complete_referral_survives_the_round_trip() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let mut errors = Vec::new();
        let exemplars = load_exemplars(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let client = exemplars[&RecordKind::Client][0].clone();
        for referral in &exemplars[&RecordKind::Referral] {
            let related = Related { client: Some(client.clone()), ..Related::default() };
            let output = mappings.to_fhir(RecordKind::Referral, referral, None, &related).expect("maps");
            let back = mappings.referral_from_fhir(&[output.document(RecordKind::Referral)], None).expect("inverts");
            assert_eq!(back.unmapped, Vec::<String>::new());
            assert_eq!(&canonical(RecordKind::Referral, &back.referral).expect("valid"), referral);
            assert_eq!(canonical(RecordKind::Client, &back.client.expect("patient")).expect("valid"), client);
        }
    }

    /// What a partner server does to what it is sent: every resource takes an id of the server's, and every
    /// reference to a resource the server holds (sent along, or delivered before: a care plan, its goals, a
    /// consent) names that id, some as absolute URLs. Gives the resources and the crosswalk (server → agency).
    fn as_a_server_stores_them(resources: &[Emitted]) -> (Vec<Value>, HashMap<String, String>) {
        let server_id = |key: &str| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes()).to_string();
        let mut crosswalk = HashMap::new();
        let mut out = Vec::new();
        for e in resources {
            let mut r = e.resource.clone();
            let ty = r["resourceType"].as_str().expect("type").to_owned();
            let id = r["id"].as_str().expect("id").to_owned();
            r["id"] = Value::String(server_id(&format!("{ty}/{id}")));
            fn walk(v: &mut Value, f: &dyn Fn(&str) -> Option<String>) {
                match v {
                    Value::Object(m) => {
                        if let Some(new) = m.get("reference").and_then(Value::as_str).and_then(f) {
                            m.insert("reference".into(), Value::String(new));
                        }
                        m.values_mut().for_each(|x| walk(x, f));
                    }
                    Value::Array(a) => a.iter_mut().for_each(|x| walk(x, f)),
                    _ => {}
                }
            }
            walk(&mut r, &|reference| {
                let (ty, id) = reference.split_once('/')?;
                match ty {
                    "Patient" => Some(format!("https://ehr.example/r4/Patient/{}/_history/1", server_id(reference))),
                    "CarePlan" | "Goal" | "Consent" | "ServiceRequest" if !id.is_empty() => {
                        Some(format!("{ty}/{}", server_id(reference)))
                    }
                    _ => None,
                }
            });
            out.push(r);
        }
        for e in resources {
            let ty = e.resource["resourceType"].as_str().expect("type");
            let id = e.resource["id"].as_str().expect("id");
            crosswalk.insert(format!("{ty}/{}", server_id(&format!("{ty}/{id}"))), id.to_owned());
        }
        (out, crosswalk)
    }

    #[test]
    fn referrals_read_back_from_a_server_that_assigned_its_own_ids_come_back_unchanged() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let mut n = 0;
        for path in read_dir_sorted(&repo("fixtures/agency/referral"), "json") {
            let referral = canonical(RecordKind::Referral, &read(&path)).expect("valid fixture");
            let client_id = referral["client_id"].as_str().expect("client id");
            let client =
                canonical(RecordKind::Client, &read(&repo(&format!("fixtures/agency/client/{client_id}.json"))))
                    .expect("valid client");
            let related = Related { client: Some(client.clone()), ..Related::default() };
            let output = mappings.to_fhir(RecordKind::Referral, &referral, None, &related).expect("maps");
            let (stored, mut crosswalk) = as_a_server_stores_them(&output.resources);
            // What was delivered before this referral: its care plan, goals and consent.
            let server_id = |key: &str| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes()).to_string();
            let mut earlier: Vec<String> = Vec::new();
            if let Some(cp) = referral["care_plan_id"].as_str() {
                earlier.push(format!("CarePlan/{cp}"));
                for g in referral["goal_ids"].as_array().into_iter().flatten() {
                    earlier.push(format!("Goal/{cp}.{}", g.as_str().expect("goal id")));
                }
            }
            if let Some(co) = referral["consent_id"].as_str() {
                earlier.push(format!("Consent/{co}"));
            }
            for key in earlier {
                let (ty, id) = key.split_once('/').expect("Type/id");
                crosswalk.insert(format!("{ty}/{}", server_id(&key)), id.to_owned());
            }
            assert!(
                stored.iter().all(|r| r["id"].as_str().is_some_and(|id| id.len() == 36)),
                "every id is the server's"
            );
            let lookup = |r: &str| crosswalk.get(r).cloned();
            let back =
                mappings.referral_from_fhir_with(&stored, None, inbound::Ids::Partner(&lookup)).expect("inverts");
            assert_eq!(back.foreign, Vec::<String>::new(), "{}", path.display());
            assert_came_back(&back, &referral, &client, &path);
            n += 1;
        }
        assert!(n >= 7, "only {n} referral fixtures");
    }

    /// Calls `f` on every Reference (an object with `reference`, or a logical one with `type`) under `v`.
    fn each_reference(v: &mut Value, f: &mut dyn FnMut(&mut serde_json::Map<String, Value>)) {
        match v {
            Value::Object(m) => {
                if m.contains_key("reference") || m.get("type").is_some_and(Value::is_string) {
                    f(m);
                }
                m.values_mut().for_each(|x| each_reference(x, f));
            }
            Value::Array(a) => a.iter_mut().for_each(|x| each_reference(x, f)),
            _ => {}
        }
    }

    /// ref-4001 as its Bundle, and the referral and client it was made from.
    fn therapy_referral(mappings: &Mappings) -> (Value, Value, Value) {
        let referral =
            canonical(RecordKind::Referral, &read(&repo("fixtures/agency/referral/ref-4001.json"))).expect("valid");
        let client = canonical(RecordKind::Client, &read(&repo("fixtures/agency/client/cl-1001.json"))).expect("valid");
        let related = Related { client: Some(client.clone()), ..Related::default() };
        let output = mappings.to_fhir(RecordKind::Referral, &referral, None, &related).expect("maps");
        assert!(output.violations.is_empty(), "{:?}", output.violations);
        (output.document(RecordKind::Referral), referral, client)
    }

    #[test]
    fn references_in_the_older_literal_form_still_read_back() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let (mut bundle, referral, client) = therapy_referral(&mappings);
        let mut rewritten = 0;
        each_reference(&mut bundle, &mut |m| {
            // As the mappings wrote them before references became logical: `Type/id`, no identifier.
            if let (Some(ty), Some(value)) = (
                m.get("type").and_then(Value::as_str).map(str::to_owned),
                m.get("identifier").and_then(|i| i["value"].as_str()).map(str::to_owned),
            ) && references::NEVER_DELIVERED.contains(&ty.as_str())
            {
                if value == "riverside-cmh" {
                    // The agency had a type and a display only.
                    m.remove("identifier");
                    return;
                }
                m.remove("type");
                m.insert("reference".into(), Value::String(format!("{ty}/{value}")));
                rewritten += 1;
            }
            if m.contains_key("reference") {
                m.remove("identifier");
            }
        });
        assert_eq!(rewritten, 4, "requester, performer, the note's author and the Task's owner");
        let back = mappings.referral_from_fhir(&[bundle], None).expect("inverts");
        assert_came_back(&back, &referral, &client, Path::new("ref-4001 in the older form"));
    }

    #[test]
    fn references_the_delivery_left_logical_read_back_by_their_identifiers() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let (mut bundle, referral, client) = therapy_referral(&mappings);
        let mut dropped = 0;
        // The partner was never sent the care plan, its goals or the consent: the delivery drops `reference` and
        // keeps the identifier of each.
        each_reference(&mut bundle, &mut |m| {
            if m.get("reference").and_then(Value::as_str).is_some_and(|r| !r.starts_with("urn:uuid:")) {
                m.remove("reference");
                dropped += 1;
            }
        });
        assert_eq!(dropped, 4, "the care plan, two goals and the consent");
        let back =
            mappings.referral_from_fhir_with(&[bundle], None, inbound::Ids::Partner(&|_| None)).expect("inverts");
        assert_came_back(&back, &referral, &client, Path::new("ref-4001 with logical references"));
    }

    #[test]
    fn ids_holding_the_patterns_literal_come_back_whole() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let mut referral = read(&repo("fixtures/agency/referral/ref-4001.json"));
        referral["id"] = "ref.4001.b".into();
        referral["care_plan_id"] = "cp.3001.v2".into();
        referral["goal_ids"] = serde_json::json!(["goal.1", "goal.2.a"]);
        let referral = canonical(RecordKind::Referral, &referral).expect("ids with dots are legal agency ids");
        let client = canonical(RecordKind::Client, &read(&repo("fixtures/agency/client/cl-1001.json"))).expect("valid");
        let related = Related { client: Some(client), ..Related::default() };
        let output = mappings.to_fhir(RecordKind::Referral, &referral, None, &related).expect("maps");
        let back = mappings.referral_from_fhir(&[output.document(RecordKind::Referral)], None).expect("inverts");
        assert_eq!(back.unmapped, Vec::<String>::new());
        assert_eq!(canonical(RecordKind::Referral, &back.referral).expect("valid"), referral);
    }

    #[test]
    fn a_resource_from_a_server_with_no_identifier_of_ours_is_not_adopted() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let sr = serde_json::json!({
            "resourceType": "ServiceRequest", "id": "90fb0440-0000-4000-8000-000000000001", "status": "active",
            "intent": "order",
            "code": {"coding": [{"system": "https://agency.example.org/fhir/CodeSystem/service", "code": "therapy"}]},
            "subject": {"reference": "Patient/5d1e0000-0000-4000-8000-000000000002"}
        });
        let back = mappings.referral_from_fhir_with(&[sr], None, inbound::Ids::Partner(&|_| None)).expect("inverts");
        assert!(back.referral.get("id").is_none(), "{}", back.referral);
        assert!(back.referral.get("client_id").is_none(), "{}", back.referral);
        assert_eq!(back.foreign.len(), 1, "{:?}", back.foreign);
        assert!(
            back.unmapped.iter().any(|u| u.starts_with("ServiceRequest.subject.reference: Patient/5d1e")),
            "{:?}",
            back.unmapped
        );
    }

    #[test]
    fn every_goal_progress_entry_reaches_the_partner_dated_and_linked_from_its_goal() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let case = repo("fixtures/mappings/care-plan/cp-3101-goal-progress-three-dates.input.json");
        let plan = canonical(RecordKind::CarePlan, &read(&case)).expect("valid");
        let output = mappings.to_fhir(RecordKind::CarePlan, &plan, None, &Related::default()).expect("maps");
        assert!(output.violations.is_empty(), "{:?}", output.violations);
        let progress: Vec<&Value> = output
            .resources
            .iter()
            .map(|e| &e.resource)
            .filter(|r| r["code"]["coding"][0]["code"] == "goal-progress")
            .collect();
        let dates: Vec<&str> = progress.iter().filter_map(|r| r["effectiveDateTime"].as_str()).collect();
        assert_eq!(dates, ["2026-09-02", "2026-10-01", "2026-10-28"], "an entry without a note keeps its date");
        assert_eq!(progress[1]["valueCodeableConcept"]["coding"][0]["code"], "worsening");
        assert_eq!(progress[0]["derivedFrom"][0]["reference"], "Observation/as-2001");
        let goal = output
            .resources
            .iter()
            .find(|e| e.resource["resourceType"] == "Goal" && e.resource["id"] == "cp-3101.goal-1")
            .expect("the goal");
        let refs: Vec<String> = goal.resource["outcomeReference"]
            .as_array()
            .expect("outcomes")
            .iter()
            .map(|r| r["reference"].as_str().expect("reference").to_owned())
            .collect();
        let ids: Vec<String> =
            progress.iter().map(|r| format!("Observation/{}", r["id"].as_str().expect("id"))).collect();
        assert_eq!(refs, ids, "the goal lists every entry, oldest first");
    }

    #[test]
    fn two_assessments_and_a_care_plan_naming_one_need_send_one_and_the_same_condition() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let load = |kind: RecordKind, p: &str| canonical(kind, &read(&repo(p))).expect("valid fixture");
        let a1 = load(RecordKind::Assessment, "fixtures/agency/assessment/as-2001.json");
        let a7 = load(RecordKind::Assessment, "fixtures/agency/assessment/as-2007.json");
        let mut cp = load(RecordKind::CarePlan, "fixtures/agency/care-plan/cp-3001.json");
        let conditions = |kind: RecordKind, record: &Value, related: &Related| -> Vec<Value> {
            let out = mappings.to_fhir(kind, record, None, related).expect("maps");
            assert!(out.violations.is_empty(), "{:?}", out.violations);
            out.resources.into_iter().map(|e| e.resource).filter(|r| r["resourceType"] == "Condition").collect()
        };
        let related = |a: Vec<&Value>, c: Vec<&Value>| Related {
            client: None,
            assessments: a.into_iter().cloned().collect(),
            care_plans: c.into_iter().cloned().collect(),
        };
        let from_a1 = conditions(RecordKind::Assessment, &a1, &related(vec![&a7], vec![&cp]));
        let from_a7 = conditions(RecordKind::Assessment, &a7, &related(vec![&a1], vec![&cp]));
        let from_cp = conditions(RecordKind::CarePlan, &cp, &related(vec![&a1, &a7], vec![]));
        assert_eq!(from_a1.len(), 1, "one Condition for the one need");
        assert_eq!(from_a1, from_a7);
        assert_eq!(from_a1, from_cp, "whichever record goes, the partner gets the same Condition");
        let c = &from_cp[0];
        assert_eq!(c["id"], "cl-1001.depression");
        let evidence: Vec<&str> = c["evidence"][0]["detail"]
            .as_array()
            .expect("evidence")
            .iter()
            .filter_map(|d| d["reference"].as_str())
            .collect();
        assert_eq!(evidence, ["Observation/as-2001", "Observation/as-2007"]);
        assert_eq!(c["clinicalStatus"]["coding"][0]["code"], "active");
        cp["needs"][0]["status"] = "resolved".into();
        let resolved = conditions(RecordKind::CarePlan, &cp, &related(vec![&a1, &a7], vec![]));
        assert_eq!(
            resolved[0]["clinicalStatus"]["coding"][0]["code"], "resolved",
            "the need resolved, the Condition says so"
        );
        let from_a7 = conditions(RecordKind::Assessment, &a7, &related(vec![&a1], vec![&cp]));
        assert_eq!(from_a7, resolved, "the status is the care plans' to say, whichever record goes");
    }

    #[test]
    fn composed_ids_over_64_characters_fit_fhir_and_references_still_find_them() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let long = |p: &str| format!("{p}-{}", "x".repeat(60 - p.len()));
        let mut plan = read(&repo("fixtures/agency/care-plan/cp-3001.json"));
        plan["id"] = long("cp").into();
        plan["client_id"] = long("cl").into();
        let plan = canonical(RecordKind::CarePlan, &plan).expect("64-character ids are legal agency ids");
        let out = mappings.to_fhir(RecordKind::CarePlan, &plan, None, &Related::default()).expect("maps");
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        let goal = out.resources.iter().map(|e| &e.resource).find(|r| r["resourceType"] == "Goal").expect("a goal");
        let goal_id = goal["id"].as_str().expect("id");
        assert!(is_fhir_id(goal_id), "{goal_id}");
        assert_eq!(goal["identifier"][0]["value"], format!("{}.goal-1", plan["id"].as_str().expect("id")));
        let plan_fhir =
            out.resources.iter().map(|e| &e.resource).find(|r| r["resourceType"] == "CarePlan").expect("the plan");
        assert!(
            plan_fhir["goal"].as_array().expect("goals").iter().any(|g| g["reference"] == format!("Goal/{goal_id}")),
            "the CarePlan points at the Goal by its fitted id"
        );
        let mut referral = read(&repo("fixtures/agency/referral/ref-4003.json"));
        referral["id"] = long("ref").into();
        let referral = canonical(RecordKind::Referral, &referral).expect("valid");
        let out = mappings.to_fhir(RecordKind::Referral, &referral, None, &Related::default()).expect("maps");
        assert!(out.violations.is_empty(), "the crisis Flag's id fits too: {:?}", out.violations);
    }

    #[test]
    fn what_a_hospital_sends_beyond_the_mapping_is_reported_not_dropped() {
        let mappings = Mappings::load(&repo("mappings")).expect("mappings load");
        let sr = serde_json::json!({
            "resourceType": "ServiceRequest", "id": "h-1", "status": "active", "intent": "order",
            "code": {"coding": [{"system": "https://agency.example.org/fhir/CodeSystem/service", "code": "therapy"}]},
            "subject": {"reference": "Patient/p-1"},
            "priority": "asap",
            "occurrenceDateTime": "2026-12-01",
            "intent_note": null
        });
        let back = mappings.referral_from_fhir(&[sr], None).expect("inverts");
        assert_eq!(back.referral["service"], "therapy");
        assert_eq!(back.referral["client_id"], "p-1");
        assert!(
            back.unmapped.iter().any(|u| u.starts_with("ServiceRequest.occurrenceDateTime")),
            "{:?}",
            back.unmapped
        );
        assert!(back.unmapped.iter().any(|u| u.starts_with("ServiceRequest.priority")), "{:?}", back.unmapped);
    }
}

#[cfg(test)]
mod broken_files {
    use super::*;

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("readable") {
            let e = e.expect("entry");
            let target = to.join(e.file_name());
            if e.path().is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).expect("copy");
            }
        }
    }

    /// Copies the shipped mappings, replaces `old` by `new` in `file`, and loads the copy.
    fn load_with(file: &str, old: &str, new: &str) -> (String, Vec<LoadError>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mappings");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &dir);
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).expect("readable");
        assert!(text.contains(old), "{file} does not contain {old}");
        std::fs::write(&path, text.replacen(old, new, 1)).expect("write");
        let errors = Mappings::load(&dir).expect_err("the broken file is reported").0;
        (path.display().to_string(), errors)
    }

    fn line_of(file: &str, needle: &str) -> usize {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings").join(file))
            .expect("readable");
        text.lines().position(|l| l.contains(needle)).expect("needle") + 1
    }

    #[test]
    fn a_filter_the_inverse_cannot_undo_is_refused_in_an_invertible_mapping_at_its_line() {
        let (file, errors) = load_with(
            "referral.service_request.toml",
            "authoredOn = \"{authored_on}\"",
            "authoredOn = \"{authored_on | date}\"",
        );
        let want = line_of("referral.service_request.toml", "authoredOn = ");
        let hit = errors.iter().find(|e| e.file == file && e.message.contains("filter `date` cannot be undone"));
        assert_eq!(hit.map(|e| e.line), Some(want), "{errors:?}");
    }

    #[test]
    fn an_unknown_fhir_element_is_reported_at_its_line() {
        let (file, errors) = load_with("referral.task.toml", "authoredOn = ", "authoredWhen = ");
        let want = line_of("referral.task.toml", "authoredOn = ");
        let hit = errors.iter().find(|e| e.file == file && e.message.contains("unknown FHIR element `authoredWhen`"));
        assert_eq!(hit.map(|e| e.line), Some(want), "{errors:?}");
    }

    #[test]
    fn a_nested_unknown_element_is_reported_at_its_line() {
        let (file, errors) = load_with("client.patient.toml", "postalCode = ", "zipCode = ");
        let want = line_of("client.patient.toml", "postalCode = ");
        let hit = errors.iter().find(|e| e.file == file && e.message.contains("address[0].zipCode"));
        assert_eq!(hit.map(|e| e.line), Some(want), "{errors:?}");
    }

    #[test]
    fn a_missing_conceptmap_is_reported_where_it_is_named() {
        let (file, errors) = load_with("referral.task.toml", "map referral-status-task", "map referral-status-tsak");
        let want = line_of("referral.task.toml", "map referral-status-task");
        let hit = errors.iter().find(|e| e.file == file && e.message.contains("no ConceptMap `referral-status-tsak`"));
        assert_eq!(hit.map(|e| e.line), Some(want), "{errors:?}");
    }

    #[test]
    fn bad_toml_is_reported_with_its_line() {
        let (file, errors) =
            load_with("consent.consent.toml", "dateTime = \"{signed_on}\"", "dateTime = \"{signed_on}");
        let want = line_of("consent.consent.toml", "dateTime = ");
        assert!(errors.iter().any(|e| e.file == file && e.line == want), "{errors:?}");
    }

    #[test]
    fn an_incomplete_conceptmap_names_the_agency_code_it_misses() {
        let (file, errors) = load_with(
            "terminology/priority.json",
            r#"{
          "code": "crisis","#,
            r#"{
          "code": "urgent","#,
        );
        assert!(errors.iter().any(|e| e.file == file && e.message.contains("`urgent` is mapped twice")), "{errors:?}");
        assert!(errors.iter().any(|e| e.file == file && e.message.contains("agency code `crisis`")), "{errors:?}");
    }

    #[test]
    fn a_field_the_record_does_not_have_is_an_unknown_source_field() {
        let (file, errors) =
            load_with("referral.task.toml", "text = \"{status_reason}\"", "text = \"{status_raeson}\"");
        let want = line_of("referral.task.toml", "text = \"{status_reason}\"");
        let hit = errors.iter().find(|e| e.file == file && e.message.contains("status_raeson"));
        assert_eq!(hit.map(|e| e.line), Some(want), "{errors:?}");
    }

    #[test]
    fn an_item_conceptmap_missing_a_question_names_the_question() {
        let (file, errors) = load_with("terminology/phq9-item-loinc.json", "\"code\": \"9\"", "\"code\": \"10\"");
        assert!(errors.iter().any(|e| e.file == file && e.message.contains("`10` is not a code")), "{errors:?}");
        assert!(errors.iter().any(|e| e.file == file && e.message.contains("agency code `9`")), "{errors:?}");
    }

    #[test]
    fn a_mapping_file_name_with_a_bad_part_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mappings");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &dir);
        std::fs::rename(dir.join("assessment.observation-item.toml"), dir.join("assessment.observation-Item.toml"))
            .expect("rename");
        let errors = Mappings::load(&dir).expect_err("refused").0;
        assert!(errors.iter().any(|e| e.file.ends_with("assessment.observation-Item.toml")), "{errors:?}");
    }

    #[test]
    fn a_literal_reference_to_staff_is_refused_at_its_line() {
        let old = "type = \"Practitioner\"\nidentifier = { system = \"{@system_base}/staff\", value = \"{requester.staff_id}\" }";
        let (file, errors) =
            load_with("referral.service_request.toml", old, "reference = \"Practitioner/{requester.staff_id}\"");
        let want = line_of("referral.service_request.toml", "[template.requester]");
        let hit = errors.iter().find(|e| e.file == file && e.message.contains("literal reference to a Practitioner"));
        assert_eq!(hit.map(|e| e.line), Some(want), "{errors:?}");
    }

    #[test]
    fn a_reference_to_an_agency_record_without_its_identifier_is_refused() {
        let (file, errors) = load_with(
            "referral.service_request.toml",
            "identifier = { system = \"{@system_base}/consent\", value = \"{consent_id}\" }\n",
            "",
        );
        assert!(
            errors
                .iter()
                .any(|e| e.file == file && e.message.contains("a reference to a Consent carries no identifier")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_required_element_no_template_writes_is_reported() {
        let (file, errors) = load_with(
            "referral.task.toml",
            "[template.for]\nreference = \"Patient/{client_id}\"\nidentifier = { system = \"{@system_base}/client\", value = \"{client_id}\" }\n",
            "",
        );
        assert!(errors.iter().any(|e| e.file == file && e.message.contains("never writes `for`")), "{errors:?}");
    }
}

#[cfg(test)]
mod assessments {
    use super::*;
    use serde_json::json;

    fn mappings() -> Mappings {
        Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings load")
    }

    /// A PHQ-9 with items 1–8 scored 1 and item 9 scored `item9`.
    fn phq9(item9: u8) -> Value {
        let total = 8 + u16::from(item9);
        let reading = if total >= 10 { "moderate" } else { "mild" };
        let mut items: Vec<Value> = (1..=8).map(|n| json!({"number": n, "score": 1})).collect();
        items.push(json!({"number": 9, "score": item9}));
        json!({"id": "as-t1", "client_id": "cl-t1", "instrument": "phq9", "date": "2026-09-02",
            "performed_by": "staff-t", "items": items, "total_score": total, "interpretation": reading})
    }

    fn resources(record: &Value) -> Vec<Value> {
        let record = canonical(RecordKind::Assessment, record).expect("a valid assessment");
        let out = mappings().to_fhir(RecordKind::Assessment, &record, None, &Related::default()).expect("maps");
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        out.resources.into_iter().map(|e| e.resource).collect()
    }

    fn by_id<'a>(rs: &'a [Value], id: &str) -> &'a Value {
        rs.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no resource {id}"))
    }

    fn critical(r: &Value) -> bool {
        r["interpretation"].as_array().into_iter().flatten().any(|i| i["coding"][0]["code"] == "AA")
    }

    #[test]
    fn a_positive_phq9_item_9_reads_critical_on_the_item_and_on_the_total() {
        let rs = resources(&phq9(2));
        assert!(critical(by_id(&rs, "as-t1")), "the total must carry it");
        assert!(critical(by_id(&rs, "as-t1.9")), "item 9 must carry it");
        assert!(!critical(by_id(&rs, "as-t1.8")), "only item 9 does");
        let rs = resources(&phq9(0));
        assert!(rs.iter().all(|r| !critical(r)), "item 9 scored 0 is not critical");
    }

    #[test]
    fn every_phq9_answer_is_a_member_with_its_loinc_question_and_scored_answer() {
        let rs = resources(&phq9(2));
        let members: Vec<&str> = by_id(&rs, "as-t1")["hasMember"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m["reference"].as_str())
            .collect();
        let want: Vec<String> = (1..=9).map(|n| format!("Observation/as-t1.{n}")).collect();
        assert_eq!(members, want);
        let item9 = by_id(&rs, "as-t1.9");
        assert_eq!(item9["code"]["coding"][0]["code"], "44260-8");
        assert_eq!(item9["identifier"][0]["value"], "as-t1.9");
        let answer = &item9["valueCodeableConcept"]["coding"][0];
        assert_eq!(answer["code"], "LA6570-1", "score 2 is More than half the days");
        assert_eq!(answer["extension"][0]["valueDecimal"], 2);
        assert_eq!(by_id(&rs, "as-t1.1")["valueCodeableConcept"]["coding"][0]["code"], "LA6569-3");
        assert_eq!(by_id(&rs, "as-t1")["valueInteger"], 10);
    }

    #[test]
    fn the_hunger_vital_sign_result_is_coded_not_an_integer() {
        let rec = json!({"id": "as-t2", "client_id": "cl-t1", "instrument": "hunger_vital_sign", "date": "2026-09-02",
            "items": [{"number": 1, "score": 0}, {"number": 2, "score": 0}], "total_score": 0, "interpretation": "negative"});
        let rs = resources(&rec);
        let result = by_id(&rs, "as-t2");
        assert!(result.get("valueInteger").is_none(), "{result}");
        assert_eq!(result["valueCodeableConcept"]["coding"][0]["code"], "LA19983-8", "No risk");
        assert_eq!(by_id(&rs, "as-t2.2")["code"]["coding"][0]["code"], "88123-5");
        assert_eq!(by_id(&rs, "as-t2.2")["valueCodeableConcept"]["coding"][0]["code"], "LA28398-8", "Never true");
    }

    #[test]
    fn ahc_housing_answers_travel_in_words_and_its_panel_has_no_integer() {
        let rec = json!({"id": "as-t3", "client_id": "cl-t1", "instrument": "ahc_housing", "date": "2026-09-02",
            "items": [{"number": 1, "answer": "sleeping in my car"}], "interpretation": "positive"});
        let rs = resources(&rec);
        let panel = by_id(&rs, "as-t3");
        assert!(panel.get("valueInteger").is_none() && panel.get("dataAbsentReason").is_some(), "{panel}");
        let item = by_id(&rs, "as-t3.1");
        assert_eq!(item["code"]["coding"][0]["code"], "71802-3");
        assert_eq!(item["valueCodeableConcept"]["text"], "sleeping in my car");
    }

    /// The references of the result Observation's members.
    fn members<'a>(rs: &'a [Value], id: &str) -> Vec<&'a str> {
        by_id(rs, id)["hasMember"].as_array().into_iter().flatten().filter_map(|m| m["reference"].as_str()).collect()
    }

    fn answer_code(r: &Value) -> Option<&str> {
        r["valueCodeableConcept"]["coding"][0]["code"].as_str()
    }

    /// A scored assessment of `instrument` with these item scores.
    fn scored(id: &str, instrument: &str, scores: &[u8], reading: &str) -> Value {
        let items: Vec<Value> = scores.iter().enumerate().map(|(n, s)| json!({"number": n + 1, "score": s})).collect();
        let total: u16 = scores.iter().map(|&s| u16::from(s)).sum();
        json!({"id": id, "client_id": "cl-t1", "instrument": instrument, "date": "2026-09-02",
            "items": items, "total_score": total, "interpretation": reading})
    }

    #[test]
    fn every_gad7_answer_is_a_member_with_its_loinc_question_and_scored_answer() {
        let rs = resources(&scored("as-t5", "gad7", &[0, 1, 1, 2, 3, 2, 0], "mild"));
        let want: Vec<String> = (1..=7).map(|n| format!("Observation/as-t5.{n}")).collect();
        assert_eq!(members(&rs, "as-t5"), want);
        let questions: Vec<&str> =
            (1..=7).filter_map(|n| by_id(&rs, &format!("as-t5.{n}"))["code"]["coding"][0]["code"].as_str()).collect();
        assert_eq!(questions, ["69725-0", "68509-9", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7"]);
        let answers: Vec<Option<&str>> = (1..=7).map(|n| answer_code(by_id(&rs, &format!("as-t5.{n}")))).collect();
        let want = ["LA6568-5", "LA6569-3", "LA6569-3", "LA6570-1", "LA6571-9", "LA6570-1", "LA6568-5"];
        assert_eq!(answers, want.map(Some));
        let item5 = by_id(&rs, "as-t5.5");
        assert_eq!(item5["valueCodeableConcept"]["coding"][0]["extension"][0]["valueDecimal"], 3);
        assert_eq!(item5["valueCodeableConcept"]["text"], "Nearly every day");
        assert_eq!(by_id(&rs, "as-t5")["valueInteger"], 9);
    }

    #[test]
    fn gad7_question_2_scored_2_travels_in_words_without_an_uncited_answer_code() {
        let rs = resources(&scored("as-t6", "gad7", &[2, 2, 2, 2, 2, 2, 2], "moderate"));
        let q2 = by_id(&rs, "as-t6.2");
        assert_eq!(q2["code"]["coding"][0]["code"], "68509-9");
        assert!(q2["valueCodeableConcept"].get("coding").is_none(), "{q2}");
        assert_eq!(q2["valueCodeableConcept"]["text"], "More than half the days");
        assert_eq!(answer_code(by_id(&rs, "as-t6.1")), Some("LA6570-1"), "question 1 has its code");
        let rs = resources(&scored("as-t7", "gad7", &[0, 3, 0, 0, 0, 0, 0], "minimal"));
        assert_eq!(answer_code(by_id(&rs, "as-t7.2")), Some("LA6571-9"), "its cited scores keep their codes");
    }

    #[test]
    fn audit_c_sends_questions_2_and_3_with_their_own_answers_and_not_the_uncited_question_1() {
        let rs = resources(&scored("as-t8", "audit_c", &[4, 2, 2], "positive"));
        assert_eq!(members(&rs, "as-t8"), ["Observation/as-t8.2", "Observation/as-t8.3"]);
        assert!(rs.iter().all(|r| r["id"] != "as-t8.1"), "question 1 has no cited code");
        let q2 = by_id(&rs, "as-t8.2");
        let q3 = by_id(&rs, "as-t8.3");
        assert_eq!(q2["code"]["coding"][0]["code"], "68519-8");
        assert_eq!(q3["code"]["coding"][0]["code"], "68520-6");
        // The same score means a different answer on each question.
        assert_eq!(answer_code(q2), Some("LA18930-0"), "5 or 6");
        assert_eq!(answer_code(q3), Some("LA18876-5"), "Monthly");
        assert_eq!(q3["valueCodeableConcept"]["coding"][0]["extension"][0]["valueDecimal"], 2);
        assert_eq!(by_id(&rs, "as-t8")["valueInteger"], 8);
    }

    #[test]
    fn an_instrument_without_cited_item_codes_sends_its_total_alone() {
        let rs = resources(&scored("as-t4", "dast10", &[0; 10], "none"));
        let observations: Vec<&Value> = rs.iter().filter(|r| r["resourceType"] == "Observation").collect();
        assert_eq!(observations.len(), 1, "{observations:?}");
        assert!(observations[0].get("hasMember").is_none());
        assert_eq!(observations[0]["valueInteger"], 0);
    }
}
