//! An assessment: a screening instrument administered to a client, its answers, score and reading.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::values::vocabulary;
use super::{AgencyRecord, ConsentCategory, Date, NeedCode, RecordId, RecordKind, Redacted, Validator};

vocabulary! {
    /// The instrument administered: `phq9` (depression, 9 items scored 0–3), `phq2` (depression pre-screen,
    /// 2 items 0–3), `gad7` (anxiety, 7 items 0–3), `dast10` (drug use, 10 items 0–1), `audit_c` (alcohol use,
    /// 3 items 0–4), `hunger_vital_sign` (food insecurity, 2 items: 0 never, 1 sometimes, 2 often true),
    /// `ahc_housing` (AHC HRSN living-situation questions, answered in words, not scored).
    pub enum Instrument {
        Phq9 = "phq9",
        Phq2 = "phq2",
        Gad7 = "gad7",
        Dast10 = "dast10",
        AuditC = "audit_c",
        HungerVitalSign = "hunger_vital_sign",
        AhcHousing = "ahc_housing",
    }
}

vocabulary! {
    /// The reading of the result. PHQ-9: `minimal` 0–4, `mild` 5–9, `moderate` 10–14, `moderately_severe`
    /// 15–19, `severe` 20–27. GAD-7: `minimal`, `mild`, `moderate`, `severe` 15–21. DAST-10: `none` 0, `low`
    /// 1–2, `moderate` 3–5, `substantial` 6–8, `severe` 9–10. PHQ-2 (3 or more), AUDIT-C, Hunger Vital Sign
    /// (any item answered sometimes or often) and AHC housing: `positive` or `negative`.
    pub enum Interpretation {
        None = "none",
        Minimal = "minimal",
        Low = "low",
        Mild = "mild",
        Moderate = "moderate",
        ModeratelySevere = "moderately_severe",
        Substantial = "substantial",
        Severe = "severe",
        Positive = "positive",
        Negative = "negative",
    }
}

/// A screening or assessment administered to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Assessment {
    /// The agency's id for this assessment; optional in a request body, always present in answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RecordId>,
    /// The client assessed.
    pub client_id: RecordId,
    /// The instrument administered.
    pub instrument: Instrument,
    /// The day it was administered.
    pub date: Date,
    /// Staff id of whoever administered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performed_by: Option<RecordId>,
    /// The answers, one per question, numbered from 1 in the instrument's order. Scored instruments need all
    /// of them.
    #[schema(max_items = 50)]
    pub items: Vec<AssessmentItem>,
    /// Total score; must equal the sum of the item scores. Absent for unscored instruments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_score: Option<u16>,
    /// The reading of the result; must agree with the score bands of the instrument.
    pub interpretation: Interpretation,
    /// Needs this assessment identified, each at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 14)]
    pub identified_needs: Vec<NeedCode>,
    /// Categories of sensitive data the case manager marks this record as holding, on top of what its codes say
    /// (a note naming a medication used in substance-use treatment: `substance_use`); each at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 3)]
    pub sensitivity: Vec<ConsentCategory>,
}

/// One answered question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssessmentItem {
    /// Question number within the instrument, from 1.
    pub number: u8,
    /// Score of the answer, for scored instruments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<u8>,
    /// The answer in words (required for unscored instruments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 500)]
    pub answer: Option<Redacted<String>>,
}

/// How an instrument is scored: item count, highest item score, and how a total reads.
struct Scoring {
    items: u8,
    max_item: u8,
    read: fn(total: u16, items: &[AssessmentItem]) -> Interpretation,
}

fn band(total: u16, bands: &[(u16, Interpretation)]) -> Interpretation {
    bands.iter().rev().find(|(from, _)| total >= *from).map_or(bands[0].1, |(_, i)| *i)
}

fn positive_if(ok: bool) -> Interpretation {
    if ok { Interpretation::Positive } else { Interpretation::Negative }
}

impl Instrument {
    fn scoring(self) -> Option<Scoring> {
        use Interpretation as I;
        let scoring = match self {
            Instrument::Phq9 => Scoring {
                items: 9,
                max_item: 3,
                read: |t, _| {
                    band(
                        t,
                        &[(0, I::Minimal), (5, I::Mild), (10, I::Moderate), (15, I::ModeratelySevere), (20, I::Severe)],
                    )
                },
            },
            Instrument::Gad7 => Scoring {
                items: 7,
                max_item: 3,
                read: |t, _| band(t, &[(0, I::Minimal), (5, I::Mild), (10, I::Moderate), (15, I::Severe)]),
            },
            Instrument::Dast10 => Scoring {
                items: 10,
                max_item: 1,
                read: |t, _| {
                    band(t, &[(0, I::None), (1, I::Low), (3, I::Moderate), (6, I::Substantial), (9, I::Severe)])
                },
            },
            Instrument::Phq2 => Scoring { items: 2, max_item: 3, read: |t, _| positive_if(t >= 3) },
            Instrument::HungerVitalSign => Scoring {
                items: 2,
                max_item: 2,
                read: |_, items| positive_if(items.iter().any(|i| i.score.unwrap_or(0) >= 1)),
            },
            // AUDIT-C's cut-off depends on sex (3 for women, 4 for men): the agency's reading stands.
            Instrument::AuditC => Scoring { items: 3, max_item: 4, read: |_, _| I::Positive },
            Instrument::AhcHousing => return None,
        };
        Some(scoring)
    }
}

impl Instrument {
    /// How many questions the instrument has (numbered 1 to this); the AHC housing questions are the two
    /// AHC HRSN living-situation questions (living situation, problems with the place).
    #[must_use]
    pub fn question_count(self) -> u8 {
        self.scoring().map_or(2, |s| s.items)
    }

    /// The highest score one answer can have; `None` for an unscored instrument.
    #[must_use]
    pub fn max_item_score(self) -> Option<u8> {
        self.scoring().map(|s| s.max_item)
    }
}

/// Most answers an assessment carries (the longest instrument has 10 questions).
pub const MAX_ITEMS: usize = 50;

impl AgencyRecord for Assessment {
    const KIND: RecordKind = RecordKind::Assessment;

    fn body_id(&self) -> Option<&RecordId> {
        self.id.as_ref()
    }

    fn set_id(&mut self, id: RecordId) {
        self.id = Some(id);
    }

    fn client_id(&self) -> Option<&RecordId> {
        Some(&self.client_id)
    }

    fn status_code(&self) -> Option<&'static str> {
        None
    }

    fn validate(&self, v: &mut Validator) {
        v.no_repeats(&self.sensitivity, "$.sensitivity");
        let today = time::OffsetDateTime::now_utc().date();
        v.check(self.date.0 <= today + time::Duration::days(1), "$.date", "the assessment date is in the future");
        if self.items.len() > MAX_ITEMS {
            // Nothing more is read of a record over its bounds: checking it item by item is the cost the bound
            // exists to cap.
            v.at_most(self.items.len(), "$.items", MAX_ITEMS);
            return;
        }
        let mut numbers = std::collections::HashSet::new();
        for (i, item) in self.items.iter().enumerate() {
            v.check(numbers.insert(item.number), format!("$.items[{i}].number"), "this question is answered twice");
            if let Some(answer) = &item.answer {
                v.multiline_text(answer, format!("$.items[{i}].answer"), 500);
            }
        }
        // Each need becomes one Condition: a need listed twice would give two Bundle entries with one fullUrl.
        v.no_repeats(&self.identified_needs, "$.identified_needs");
        match self.instrument.scoring() {
            Some(scoring) => self.validate_scored(&scoring, v),
            None => self.validate_unscored(v),
        }
    }
}

impl Assessment {
    fn validate_scored(&self, scoring: &Scoring, v: &mut Validator) {
        let name = self.instrument.as_str();
        if self.items.len() != usize::from(scoring.items) {
            v.error("$.items", format!("{name} has {} questions; {} answered", scoring.items, self.items.len()));
        }
        let mut sum: u16 = 0;
        let mut items_ok = true;
        for (i, item) in self.items.iter().enumerate() {
            if item.number == 0 || item.number > scoring.items {
                v.error(
                    format!("$.items[{i}].number"),
                    format!("{name} questions are numbered 1 to {}", scoring.items),
                );
            }
            match item.score {
                Some(s) if s <= scoring.max_item => sum = sum.saturating_add(u16::from(s)),
                Some(_) => {
                    items_ok = false;
                    v.error(format!("$.items[{i}].score"), format!("{name} items score 0 to {}", scoring.max_item));
                }
                None => {
                    items_ok = false;
                    v.error(format!("$.items[{i}].score"), format!("{name} is scored: every item needs a score"));
                }
            }
        }
        match self.total_score {
            // The total can only be checked against items that are themselves valid.
            Some(_) if !items_ok => {}
            None => v.error("$.total_score", format!("{name} is scored: total_score is required")),
            Some(total) if total != sum => {
                v.error("$.total_score", format!("total_score is {total} but the items add up to {sum}"));
            }
            Some(total) => {
                let expected = (scoring.read)(total, &self.items);
                // AUDIT-C's reading depends on sex, which the score alone cannot tell.
                let checkable = self.instrument != Instrument::AuditC;
                let allowed = [Interpretation::Positive, Interpretation::Negative];
                let ok =
                    if checkable { self.interpretation == expected } else { allowed.contains(&self.interpretation) };
                v.check(
                    ok,
                    "$.interpretation",
                    format!("a {name} total of {total} reads as {expected}, not {}", self.interpretation),
                );
            }
        }
    }

    fn validate_unscored(&self, v: &mut Validator) {
        let name = self.instrument.as_str();
        v.check(self.total_score.is_none(), "$.total_score", format!("{name} is not scored"));
        v.check(!self.items.is_empty(), "$.items", "at least one answer is required");
        let count = self.instrument.question_count();
        for (i, item) in self.items.iter().enumerate() {
            v.check(
                (1..=count).contains(&item.number),
                format!("$.items[{i}].number"),
                format!("{name} questions are numbered 1 to {count}"),
            );
            v.check(item.score.is_none(), format!("$.items[{i}].score"), format!("{name} is not scored"));
            v.check(item.answer.is_some(), format!("$.items[{i}].answer"), "an answer in words is required");
        }
        v.check(
            matches!(self.interpretation, Interpretation::Positive | Interpretation::Negative),
            "$.interpretation",
            format!("{name} reads as positive or negative"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phq9(scores: [u8; 9], total: u16, interpretation: Interpretation) -> Assessment {
        Assessment {
            id: None,
            client_id: RecordId::parse("cl-1").expect("id"),
            instrument: Instrument::Phq9,
            date: Date::parse("2026-10-01").expect("date"),
            performed_by: None,
            items: (1..=9)
                .zip(scores)
                .map(|(number, s)| AssessmentItem { number, score: Some(s), answer: None })
                .collect(),
            total_score: Some(total),
            interpretation,
            identified_needs: vec![NeedCode::Depression],
            sensitivity: Vec::new(),
        }
    }

    fn errors(a: &Assessment) -> Vec<String> {
        let mut v = Validator::new();
        a.validate(&mut v);
        v.finish().err().unwrap_or_default().into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn a_consistent_phq9_is_accepted() {
        assert!(errors(&phq9([2, 2, 2, 2, 2, 2, 2, 2, 1], 17, Interpretation::ModeratelySevere)).is_empty());
    }

    #[test]
    fn a_total_that_is_not_the_sum_of_the_items_is_refused() {
        assert_eq!(errors(&phq9([1; 9], 10, Interpretation::Moderate)), ["$.total_score"]);
    }

    #[test]
    fn an_interpretation_outside_the_score_band_is_refused() {
        assert_eq!(errors(&phq9([1; 9], 9, Interpretation::Severe)), ["$.interpretation"]);
    }

    #[test]
    fn an_item_score_above_the_instrument_range_is_refused() {
        assert_eq!(errors(&phq9([4, 0, 0, 0, 0, 0, 0, 0, 0], 4, Interpretation::Minimal)), ["$.items[0].score"]);
    }

    #[test]
    fn an_ahc_housing_answer_beyond_its_two_questions_is_refused() {
        let a = Assessment {
            id: None,
            client_id: RecordId::parse("cl-1").expect("id"),
            instrument: Instrument::AhcHousing,
            date: Date::parse("2026-10-01").expect("date"),
            performed_by: None,
            items: vec![AssessmentItem { number: 3, score: None, answer: Some(Redacted("car".to_owned())) }],
            total_score: None,
            interpretation: Interpretation::Positive,
            identified_needs: vec![],
            sensitivity: Vec::new(),
        };
        assert_eq!(errors(&a), ["$.items[0].number"]);
    }
}
