//! The FHIR document `carebridge map` prints, and the golden cases that pin it
//! (`fixtures/mappings/<name>[@partner]/<case>.input.json` → `<case>.expected.json`, or
//! `<case>.expected.txt` holding the error text a bad case must give).
//!
//! `<name>` is a record kind (`referral`, `care-plan`: the whole document) or a mapping
//! (`referral.task`: only what that mapping writes). A `<case>.client.json` beside the input is
//! the client record a care plan or referral Bundle includes.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Mappings, Output, Related, canonical};
use crate::domain::RecordKind;

/// Maps a record and shapes the result as `carebridge map` prints it: one resource, or a transaction
/// Bundle when a record gives several (care plans and referrals always give a Bundle).
///
/// # Errors
/// The error text: invalid fields with their JSON paths, a failed rule with file:line, or the
/// profile violations (a resource that breaks its profile never leaves).
pub fn document(
    mappings: &Mappings,
    kind: RecordKind,
    record: &Value,
    partner: Option<&str>,
    related: &Related,
) -> Result<(Value, Output), String> {
    let record = canonical(kind, record)
        .map_err(|errors| errors.iter().map(|e| format!("{}: {}", e.path, e.detail)).collect::<Vec<_>>().join("\n"))?;
    let output = mappings.to_fhir(kind, &record, partner, related).map_err(|e| e.to_string())?;
    if !output.violations.is_empty() {
        return Err(output
            .violations
            .iter()
            .map(|v| format!("{}: {}: {}", v.profile, v.path, v.message))
            .collect::<Vec<_>>()
            .join("\n"));
    }
    Ok((output.document(kind), output))
}

/// The outcome of one golden case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// `<name>/<case>`.
    pub name: String,
    /// `None` when it passed; otherwise what differed.
    pub failure: Option<String>,
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run_case(mappings: &Mappings, dir_name: &str, input: &Path, bless: bool) -> Result<(), String> {
    let (name, partner) = match dir_name.split_once('@') {
        Some((n, p)) => (n, Some(p)),
        None => (dir_name, None),
    };
    let (kind_name, only) = match name.split_once('.') {
        Some((k, _)) => (k.replace('_', "-"), Some(name)),
        None => (name.to_owned(), None),
    };
    let kind = RecordKind::from_name(&kind_name).ok_or_else(|| format!("`{name}` names no record kind or mapping"))?;
    let stem = input.to_string_lossy().trim_end_matches(".input.json").to_owned();
    let record = read_json(input)?;
    let client_file = PathBuf::from(format!("{stem}.client.json"));
    let related_file = PathBuf::from(format!("{stem}.related.json"));
    let (assessments, care_plans) = if related_file.exists() {
        let r = read_json(&related_file)?;
        let list = |k: &str| r.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
        (list("assessments"), list("care_plans"))
    } else {
        (Vec::new(), Vec::new())
    };
    let related =
        Related { client: client_file.exists().then(|| read_json(&client_file)).transpose()?, assessments, care_plans };
    let got = document(mappings, kind, &record, partner, &related);
    let expected_txt = PathBuf::from(format!("{stem}.expected.txt"));
    if expected_txt.exists() {
        let want = std::fs::read_to_string(&expected_txt).map_err(|e| e.to_string())?;
        return match got {
            Ok(_) => Err(format!("expected the error `{}`, but the record mapped", want.trim())),
            Err(text) if text.contains(want.trim()) => Ok(()),
            Err(text) => Err(format!("expected the error `{}`, got `{text}`", want.trim())),
        };
    }
    let (doc, output) = got?;
    let got = match only {
        None => doc,
        Some(m) => {
            let mut rs: Vec<Value> =
                output.resources.into_iter().filter(|e| e.mapping == m).map(|e| e.resource).collect();
            if rs.len() == 1 { rs.remove(0) } else { Value::Array(rs) }
        }
    };
    let expected = PathBuf::from(format!("{stem}.expected.json"));
    if bless {
        let text = serde_json::to_string_pretty(&got).map_err(|e| e.to_string())? + "\n";
        return std::fs::write(&expected, text).map_err(|e| format!("{}: {e}", expected.display()));
    }
    let want = read_json(&expected)?;
    if got == want {
        // A whole referral Bundle also reads back to the record it was made from (the inverse mappings).
        if kind == RecordKind::Referral && only.is_none() {
            let record = canonical(kind, &record).map_err(|e| format!("{e:?}"))?;
            let back = mappings.referral_from_fhir(&[got], partner).map_err(|e| e.to_string())?;
            let again = canonical(kind, &back.referral).map_err(|e| format!("read back: {e:?}"))?;
            if !back.unmapped.is_empty() || again != record {
                return Err(format!(
                    "the Bundle does not read back to the referral (unmapped: {:?}):\n{}",
                    back.unmapped,
                    serde_json::to_string_pretty(&back.referral).unwrap_or_default()
                ));
            }
        }
        Ok(())
    } else {
        Err(format!(
            "output differs from {stem}.expected.json:\n{}",
            serde_json::to_string_pretty(&got).unwrap_or_default()
        ))
    }
}

/// Runs every golden case under `dir`; with `bless`, writes what the mappings give now as the expected
/// output instead of comparing (bad cases keep their `.expected.txt` and are still checked).
#[must_use]
pub fn run(mappings: &Mappings, dir: &Path, bless: bool) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    dirs.sort();
    for d in dirs {
        let dir_name = d.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.to_string_lossy().ends_with(".input.json"))
                    .collect()
            })
            .unwrap_or_default();
        inputs.sort();
        for input in inputs {
            let case = input.file_name().and_then(|n| n.to_str()).unwrap_or_default().trim_end_matches(".input.json");
            out.push(CaseResult {
                name: format!("{dir_name}/{case}"),
                failure: run_case(mappings, &dir_name, &input, bless).err(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_golden_case_gives_its_expected_output() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mappings = Mappings::load(&root.join("mappings")).expect("mappings load");
        let results = run(&mappings, &root.join("fixtures/mappings"), false);
        assert!(results.len() >= 15, "only {} golden cases", results.len());
        let failed: Vec<String> =
            results.into_iter().filter_map(|r| r.failure.map(|f| format!("{}: {f}", r.name))).collect();
        assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    }
}
