//! Small value types shared by every record: ids, dates, periods, redaction, the agency's code lists, and the
//! validator that collects every rule violation with the JSON path of the offending field.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

/// Declares one of the agency's closed code lists: a serde enum with its wire codes and an `as_str`.
macro_rules! vocabulary {
    ($(#[$meta:meta])* pub enum $name:ident { $($variant:ident = $code:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
        pub enum $name {
            $(#[serde(rename = $code)] #[allow(missing_docs)] $variant,)+
        }

        impl $name {
            /// Every code of this list.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value with this code, if any.
            #[must_use]
            pub fn from_code(code: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == code)
            }

            /// The code as the agency writes it.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $code),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use vocabulary;

/// The longest id we accept: FHIR's `id` limit, so an agency id can become a resource id unchanged.
const MAX_ID_LEN: usize = 64;

/// An agency record id: 1 to 64 of `A-Z a-z 0-9 - .` (the FHIR `id` alphabet).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, pattern = r"^[A-Za-z0-9\-\.]{1,64}$", example = "ref-2026-0001")]
pub struct RecordId(String);

impl RecordId {
    /// Parses an id, rejecting empty, over-long or out-of-alphabet input.
    ///
    /// # Errors
    /// A sentence saying what is wrong, without echoing the input (it may be anything).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an id must not be empty".into());
        }
        if s.len() > MAX_ID_LEN {
            return Err(format!("an id has at most {MAX_ID_LEN} characters"));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return Err("an id may only contain letters A-Z, a-z, digits, '-' and '.'".into());
        }
        // `.`, `..` and `-` are legal FHIR ids but name no record: a client that normalises URLs turns
        // `/clients/..` into `/`, so such a record could be stored and never read again.
        if !s.bytes().any(|b| b.is_ascii_alphanumeric()) {
            return Err("an id needs at least one letter or digit".into());
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RecordId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A calendar date, `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, format = Date, example = "2026-10-01")]
pub struct Date(pub time::Date);

const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

impl Date {
    /// Parses `YYYY-MM-DD`.
    ///
    /// # Errors
    /// When the text is not a real calendar date in that form.
    pub fn parse(s: &str) -> Result<Self, String> {
        // `time` reads a signed year (`-9999-01-01`); no agency date has one, and such dates overflow arithmetic.
        if !s.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("expected a date as YYYY-MM-DD".to_owned());
        }
        time::Date::parse(s, DATE_FORMAT).map(Date).map_err(|_| "expected a date as YYYY-MM-DD".to_owned())
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.format(DATE_FORMAT).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Date::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An instant with its UTC offset, RFC 3339 (`2026-10-01T14:30:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, format = DateTime, example = "2026-10-01T14:30:00Z")]
pub struct Timestamp(pub time::OffsetDateTime);

impl Timestamp {
    /// Parses RFC 3339.
    ///
    /// # Errors
    /// When the text is not an RFC 3339 date-time with an offset.
    pub fn parse(s: &str) -> Result<Self, String> {
        time::OffsetDateTime::parse(s, &Rfc3339)
            .map(Timestamp)
            .map_err(|_| "expected an RFC 3339 date-time such as 2026-10-01T14:30:00Z".to_owned())
    }

    /// The current instant, UTC.
    #[must_use]
    pub fn now() -> Self {
        Timestamp(time::OffsetDateTime::now_utc())
    }

    /// The calendar date of this instant in its own offset.
    #[must_use]
    pub fn date(self) -> Date {
        Date(self.0.date())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.format(&Rfc3339).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A span of dates; an open end means "until further notice".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Period {
    /// First day the period covers.
    pub start: Date,
    /// Last day the period covers; absent while it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Date>,
}

impl Period {
    /// Adds an error at `path` when the period ends before it starts.
    pub fn validate(&self, path: &str, v: &mut Validator) {
        if let Some(end) = self.end {
            v.check(end >= self.start, format!("{path}.end"), "the period ends before it starts");
        }
    }
}

/// A value that identifies a person (a name, a phone number, a note): it serialises as itself but prints
/// `[redacted]` in `Debug`, so it cannot reach a log line by accident.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Redacted<T>(pub T);

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> std::ops::Deref for Redacted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Whether `c` shows nothing: white space, or a Unicode default-ignorable code point (zero-width space and
/// joiners, word joiner, byte-order mark, soft hyphen, variation selectors, bidirectional marks, tag characters).
/// A name made only of these looks blank to a person and is refused as blank.
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
            | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Whether `c` is a control character a text of this kind may not hold: C0 and C1 controls, DEL, and the
/// Unicode line and paragraph separators; a multi-line text may hold tab, CR and LF.
fn is_forbidden_control(c: char, multiline: bool) -> bool {
    let line_break = matches!(c, '\t' | '\n' | '\r');
    (c.is_control() && !(multiline && line_break)) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// One rule a record breaks: where (a JSON path such as `$.goals[0].target_date`) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// JSON path of the offending field, from the root of the request body (`$` is the body itself).
    pub path: String,
    /// What is wrong, in one sentence.
    pub detail: String,
}

/// Most violations one answer lists; the rest are counted, so a record of 70,000 bad elements gets a short answer.
const MAX_LISTED_ERRORS: usize = 100;

/// Collects every rule violation of a record, so one answer lists them all (up to a hundred, then a count).
#[derive(Debug, Default)]
pub struct Validator {
    errors: Vec<FieldError>,
    unlisted: usize,
}

impl Validator {
    /// A validator with no errors yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an error at `path`.
    pub fn error(&mut self, path: impl Into<String>, detail: impl Into<String>) {
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(FieldError { path: path.into(), detail: detail.into() });
        } else {
            self.unlisted += 1;
        }
    }

    /// Records an error at `path` unless `ok`.
    pub fn check(&mut self, ok: bool, path: impl Into<String>, detail: impl Into<String>) {
        if !ok {
            self.error(path, detail);
        }
    }

    /// Records an error at `path` when a one-line text (a name, a phone number, a title) is blank (nothing but
    /// spaces and invisible characters), longer than `max` characters, or holds a control character (NUL, ESC,
    /// a tab or a line break: any of them could forge lines in a receiver's log or break its display).
    pub fn text(&mut self, value: &str, path: impl Into<String>, max: usize) {
        self.checked_text(value, path.into(), max, false);
    }

    /// Records an error at `path` when a free text that may span lines (a note, a reason, a description) is
    /// blank, longer than `max` characters, or holds a control character other than tab, CR and LF.
    pub fn multiline_text(&mut self, value: &str, path: impl Into<String>, max: usize) {
        self.checked_text(value, path.into(), max, true);
    }

    fn checked_text(&mut self, value: &str, path: String, max: usize, multiline: bool) {
        if value.chars().all(is_invisible) {
            self.error(path, "must not be blank (spaces and invisible characters only)");
        } else if value.chars().count() > max {
            self.error(path, format!("must have at most {max} characters"));
        } else if value.chars().any(|c| is_forbidden_control(c, multiline)) {
            let allowed = if multiline { "; only tab and line breaks are allowed" } else { "" };
            self.error(path, format!("must not contain control characters{allowed}"));
        }
    }

    /// Records an error at `path` when a list has more than `max` elements.
    pub fn at_most(&mut self, len: usize, path: impl Into<String>, max: usize) {
        if len > max {
            self.error(path, format!("has at most {max} elements"));
        }
    }

    /// Records an error at `path[i]` for every value that repeats an earlier one in `values`.
    pub fn no_repeats<T: Eq + std::hash::Hash>(&mut self, values: impl IntoIterator<Item = T>, path: &str) {
        let mut seen = std::collections::HashSet::new();
        for (i, value) in values.into_iter().enumerate() {
            if !seen.insert(value) {
                self.error(format!("{path}[{i}]"), "listed twice");
            }
        }
    }

    /// Records an error for every id that appears more than once in `ids`, at `path[i].id`.
    pub fn unique_ids<'a>(&mut self, ids: impl Iterator<Item = &'a RecordId>, path: &str) {
        let mut seen = std::collections::HashSet::new();
        for (i, id) in ids.enumerate() {
            if !seen.insert(id) {
                self.error(format!("{path}[{i}].id"), "this id is used twice in the same list");
            }
        }
    }

    /// The violations found, if any.
    ///
    /// # Errors
    /// Every violation collected, in the order found.
    pub fn finish(mut self) -> Result<(), Vec<FieldError>> {
        if self.unlisted > 0 {
            let detail = format!("and {} more error(s) not listed", self.unlisted);
            self.errors.push(FieldError { path: "$".into(), detail });
        }
        if self.errors.is_empty() { Ok(()) } else { Err(self.errors) }
    }
}

vocabulary! {
    /// A need the agency identifies: `depression`, `anxiety`, `suicide_risk`, `psychosis`, `trauma`,
    /// `substance_use`, `housing_instability`, `homelessness`, `food_insecurity`, `unemployment`,
    /// `financial_strain`, `transportation_insecurity`, `social_isolation`, `legal_problem`.
    pub enum NeedCode {
        Depression = "depression",
        Anxiety = "anxiety",
        SuicideRisk = "suicide_risk",
        Psychosis = "psychosis",
        Trauma = "trauma",
        SubstanceUse = "substance_use",
        HousingInstability = "housing_instability",
        Homelessness = "homelessness",
        FoodInsecurity = "food_insecurity",
        Unemployment = "unemployment",
        FinancialStrain = "financial_strain",
        TransportationInsecurity = "transportation_insecurity",
        SocialIsolation = "social_isolation",
        LegalProblem = "legal_problem",
    }
}

vocabulary! {
    /// A service the agency refers to or provides: `therapy`, `psychiatry`, `crisis_care`,
    /// `substance_use_treatment`, `case_management`, `peer_support`, `housing_assistance`, `food_assistance`,
    /// `employment_support`, `transportation_assistance`, `financial_counseling`, `legal_aid`.
    pub enum ServiceCode {
        Therapy = "therapy",
        Psychiatry = "psychiatry",
        CrisisCare = "crisis_care",
        SubstanceUseTreatment = "substance_use_treatment",
        CaseManagement = "case_management",
        PeerSupport = "peer_support",
        HousingAssistance = "housing_assistance",
        FoodAssistance = "food_assistance",
        EmploymentSupport = "employment_support",
        TransportationAssistance = "transportation_assistance",
        FinancialCounseling = "financial_counseling",
        LegalAid = "legal_aid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_outside_the_fhir_alphabet_or_length_are_refused() {
        assert!(RecordId::parse("ref-2026.01").is_ok());
        assert!(RecordId::parse("").is_err());
        assert!(RecordId::parse("has space").is_err());
        assert!(RecordId::parse("under_score").is_err());
        assert!(RecordId::parse(&"a".repeat(64)).is_ok());
        assert!(RecordId::parse(&"a".repeat(65)).is_err());
        assert!(RecordId::parse("é").is_err());
        for only_punctuation in [".", "..", "-", "...", ".-.", "--"] {
            assert!(RecordId::parse(only_punctuation).is_err(), "{only_punctuation}");
        }
        assert!(RecordId::parse("a.b-1").is_ok());
    }

    #[test]
    fn control_characters_are_refused_in_one_line_texts_and_allowed_as_line_breaks_in_notes() {
        let errors = |value: &str, multiline: bool| {
            let mut v = Validator::new();
            if multiline {
                v.multiline_text(value, "$.x", 100);
            } else {
                v.text(value, "$.x", 100);
            }
            v.finish().err().map(|e| e[0].detail.clone())
        };
        for bad in ["Ma\u{0}ria", "Maria\u{1b}[31m", "Maria\r\nLopez", "a\tb", "x\u{7f}", "a\u{85}b", "a\u{2028}b"] {
            assert!(errors(bad, false).is_some_and(|d| d.contains("control")), "{bad:?}");
        }
        assert_eq!(errors("Called back.\r\nNo answer;\tleft a message.", true), None);
        assert!(errors("note\u{0}", true).is_some_and(|d| d.contains("control")));
        assert!(errors("note\u{1b}[2J", true).is_some_and(|d| d.contains("control")));
        assert_eq!(errors("José Nguyễn-O'Brien", false), None);
    }

    #[test]
    fn a_text_of_only_invisible_characters_is_blank() {
        for blank in ["", "   ", "\u{200B}", "\u{200B}\u{200C}\u{200D}\u{FEFF}", " \u{2060} ", "\u{00AD}"] {
            let mut v = Validator::new();
            v.text(blank, "$.given_name", 100);
            let errors = v.finish().expect_err("blank");
            assert!(errors[0].detail.contains("blank"), "{blank:?}");
        }
    }

    #[test]
    fn an_answer_lists_a_hundred_errors_and_counts_the_rest() {
        let mut v = Validator::new();
        for i in 0..70_000 {
            v.error(format!("$.x[{i}]"), "bad");
        }
        let errors = v.finish().expect_err("invalid");
        assert_eq!(errors.len(), MAX_LISTED_ERRORS + 1);
        assert_eq!(errors[MAX_LISTED_ERRORS].detail, "and 69900 more error(s) not listed");
    }

    #[test]
    fn repeated_values_and_long_lists_are_reported_by_position() {
        let mut v = Validator::new();
        v.no_repeats(["a", "b", "a"], "$.identified_needs");
        v.at_most(3, "$.items", 2);
        let errors = v.finish().expect_err("invalid");
        assert_eq!(errors[0].path, "$.identified_needs[2]");
        assert_eq!(errors[1].path, "$.items");
    }

    #[test]
    fn dates_round_trip_and_impossible_dates_are_refused() {
        let d = Date::parse("2024-02-29").expect("leap day");
        assert_eq!(d.to_string(), "2024-02-29");
        assert!(Date::parse("2023-02-29").is_err());
        assert!(Date::parse("2023-2-1").is_err());
        assert!(Date::parse("-9999-01-01").is_err());
        assert!(Date::parse("+2026-01-01").is_err());
    }

    #[test]
    fn redacted_values_never_show_in_debug_output() {
        let name = Redacted("Zebulon".to_owned());
        assert_eq!(format!("{name:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&name).expect("serialise"), "\"Zebulon\"");
    }

    #[test]
    fn a_period_that_ends_before_it_starts_is_reported_at_its_end() {
        let p = Period {
            start: Date::parse("2026-05-02").expect("date"),
            end: Some(Date::parse("2026-05-01").expect("date")),
        };
        let mut v = Validator::new();
        p.validate("$.period", &mut v);
        let errors = v.finish().expect_err("invalid period");
        assert_eq!(errors[0].path, "$.period.end");
    }
}
