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
            let mut record = canonical(kind, &record).map_err(|e| format!("{e:?}"))?;
            // The case manager's sensitivity marks travel as security labels, which say more than the marks (the
            // categories the codes give too): a partner's referral never carries them back as marks.
            if let Some(m) = record.as_object_mut() {
                m.remove("sensitivity");
            }
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
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::mapping::references::{self, NEVER_DELIVERED};

    /// The identifier systems of one mapping set: the business identifiers by resource type, and the logical
    /// references' systems by type.
    struct Systems {
        business: HashMap<String, HashSet<String>>,
        logical: HashMap<String, HashSet<String>>,
    }

    fn systems(mappings: &Mappings, partner: Option<&str>) -> Systems {
        let set = mappings.set(partner).expect("a known partner");
        let mut s = Systems { business: HashMap::new(), logical: HashMap::new() };
        for m in &set.mappings {
            if let Some(system) = &m.identifier_system {
                s.business.entry(m.resource.clone()).or_default().insert(system.clone());
            }
            let mut logical = Vec::new();
            m.template.logical_references(&mut logical);
            for (ty, system, _) in logical {
                s.logical.entry(ty).or_default().insert(system);
            }
        }
        s
    }

    /// The resources of a golden output with their full URLs (a Bundle's entries, a list, or one resource).
    fn resources(doc: &Value) -> Vec<(Option<String>, Value)> {
        match doc {
            Value::Array(items) => items.iter().map(|r| (None, r.clone())).collect(),
            d if d["resourceType"] == "Bundle" => d["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| (e["fullUrl"].as_str().map(str::to_owned), e["resource"].clone()))
                .collect(),
            d => vec![(None, d.clone())],
        }
    }

    /// What is wrong with the references of one document; counts the literal and logical references seen.
    fn reference_problems(doc: &Value, systems: &Systems, seen: &mut (usize, usize)) -> Vec<String> {
        fn walk(v: &Value, at: &str, each: &mut dyn FnMut(&serde_json::Map<String, Value>, &str)) {
            match v {
                Value::Object(m) => {
                    each(m, at);
                    m.iter().for_each(|(k, x)| walk(x, &format!("{at}.{k}"), each));
                }
                Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| walk(x, &format!("{at}[{i}]"), each)),
                _ => {}
            }
        }
        let rs = resources(doc);
        let by_url: HashMap<&str, &Value> = rs.iter().filter_map(|(u, r)| Some((u.as_deref()?, r))).collect();
        let mut out = Vec::new();
        for (_, r) in &rs {
            let ty = r["resourceType"].as_str().unwrap_or("?");
            out.extend(references::check(r).into_iter().map(|i| format!("{ty}.{}: {}", i.path, i.message)));
            walk(r, ty, &mut |m, at| {
                let identifier = m.get("identifier").filter(|i| i.is_object());
                let pair = identifier.map(|i| (i["system"].as_str().unwrap_or(""), i["value"].as_str().unwrap_or("")));
                if let Some(reference) = m.get("reference").and_then(Value::as_str) {
                    seen.0 += 1;
                    if reference.starts_with("urn:uuid:") {
                        let Some(target) = by_url.get(reference) else {
                            out.push(format!("{at}: {reference} is no entry of the Bundle"));
                            return;
                        };
                        let names_it = pair.is_none_or(|(s, v)| {
                            target["identifier"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|i| i["system"] == s && i["value"] == v)
                        });
                        if !names_it {
                            out.push(format!("{at}: its identifier is not the one the entry it points at carries"));
                        }
                    } else if let Some(target) = references::target_type(reference) {
                        let known =
                            systems.business.get(target).is_some_and(|s| pair.is_some_and(|(p, _)| s.contains(p)));
                        if !known {
                            out.push(format!("{at}: its identifier is not in the business system of {target}"));
                        }
                    }
                } else if let Some(t) = m.get("type").and_then(Value::as_str).filter(|t| NEVER_DELIVERED.contains(t)) {
                    seen.1 += 1;
                    let known = systems.logical.get(t).is_some_and(|s| pair.is_some_and(|(p, _)| s.contains(p)));
                    if !known {
                        out.push(format!("{at}: a logical reference to a {t} in a system no mapping writes"));
                    }
                }
            });
        }
        out
    }

    #[test]
    fn no_golden_output_names_what_is_never_delivered_literally_and_every_reference_names_its_record() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mappings = Mappings::load(&root.join("mappings")).expect("mappings load");
        let (mut files, mut seen, mut problems) = (0, (0, 0), Vec::new());
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("fixtures/mappings"))
            .expect("readable")
            .map(|e| e.expect("entry").path())
            .collect();
        dirs.sort();
        for dir in dirs.iter().filter(|d| d.is_dir()) {
            let name = dir.file_name().and_then(|n| n.to_str()).expect("a name");
            let systems = systems(&mappings, name.split_once('@').map(|(_, p)| p).filter(|p| *p != "no-such-partner"));
            for e in std::fs::read_dir(dir).expect("readable") {
                let path = e.expect("entry").path();
                if !path.to_string_lossy().ends_with(".expected.json") {
                    continue;
                }
                files += 1;
                let doc = read_json(&path).expect("a golden output");
                problems.extend(
                    reference_problems(&doc, &systems, &mut seen)
                        .into_iter()
                        .map(|p| format!("{}: {p}", path.display())),
                );
            }
        }
        assert!(files >= 20 && seen.0 >= 200 && seen.1 >= 40, "only {files} outputs, {seen:?} references");
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn the_reference_walk_finds_each_kind_of_broken_reference() {
        let mappings = Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings load");
        let systems = systems(&mappings, None);
        let sid = "https://agency.example.org/fhir/sid";
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "identifier": [{"system": format!("{sid}/client"), "value": "cl-1"}]}},
            {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "ServiceRequest",
                "subject": {"reference": "urn:uuid:1", "identifier": {"system": format!("{sid}/client"), "value": "cl-2"}},
                "basedOn": [{"reference": "CarePlan/cp-1", "identifier": {"system": format!("{sid}/goal"), "value": "cp-1"}}],
                "supportingInfo": [{"reference": "Consent/co-1"}],
                "requester": {"reference": "Practitioner/staff-1"},
                "performer": [{"type": "Organization", "identifier": {"system": "urn:elsewhere", "value": "p"}}]}}]});
        let problems = reference_problems(&bundle, &systems, &mut (0, 0));
        for want in [
            "subject: its identifier is not the one",
            "basedOn[0]: its identifier is not in the business system",
            "supportingInfo[0]: a reference to a Consent carries no identifier",
            "requester: a literal reference to a Practitioner",
            "performer[0]: a logical reference to a Organization in a system no mapping writes",
        ] {
            assert!(problems.iter().any(|p| p.contains(want)), "{want} not found in {problems:#?}");
        }
    }

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
