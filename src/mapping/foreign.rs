//! Reading a partner's own referral (a hospital's `ServiceRequest`, written in its terms, not ours) as agency
//! codes: what is asked for, for which need, how soon. Each code is read through the ConceptMaps backwards (a
//! SNOMED CT service, an ICD-10-CM or SNOMED CT need, the request priority), or taken as it is when the partner
//! already wrote the agency's own code system; a code no map reads back is reported, never guessed.

use serde_json::Value;

use super::Mappings;
use crate::domain::{NeedCode, Priority, ServiceCode};

/// What a partner's ServiceRequest asks, in agency codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignRequest {
    /// The service asked for.
    pub service: ServiceCode,
    /// The need it addresses.
    pub need: NeedCode,
    /// How soon.
    pub priority: Priority,
    /// Why, in the partner's words (`reasonCode.text`, else the first note).
    pub reason: Option<String>,
}

/// The system of `request.priority` codes.
const REQUEST_PRIORITY: &str = "http://hl7.org/fhir/request-priority";

fn codings(v: Option<&Value>) -> Vec<(&str, &str)> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter().filter_map(|c| Some((c.get("system")?.as_str()?, c.get("code")?.as_str()?))).collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

impl Mappings {
    /// Reads a partner's ServiceRequest as agency codes.
    ///
    /// # Errors
    /// Every element that could not be read, by FHIR path.
    pub fn read_foreign_request(&self, sr: &Value) -> Result<ForeignRequest, Vec<String>> {
        let agency = self.default.vars.get("agency_codes").map(|s| s.trim_end_matches('/').to_owned());
        let own = |what: &str| agency.as_ref().map(|a| format!("{a}/{what}"));
        let back = |map: &str, system: &str, code: &str| -> Option<String> {
            self.maps.get(map).and_then(|m| m.read_back(system, code)).map(str::to_owned)
        };
        let mut problems = Vec::new();
        let service = codings(sr.pointer("/code/coding")).into_iter().find_map(|(system, code)| {
            if Some(system) == own("service").as_deref() {
                ServiceCode::from_code(code)
            } else {
                back("service-snomed", system, code).as_deref().and_then(ServiceCode::from_code)
            }
        });
        if service.is_none() {
            problems.push(
                "ServiceRequest.code: no coding names a service the gateway knows (a SNOMED CT code of the \
                 service-snomed ConceptMap, or the agency's own service code)"
                    .to_owned(),
            );
        }
        let reasons: Vec<&Value> =
            sr.get("reasonCode").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        let need = reasons.iter().flat_map(|r| codings(r.get("coding"))).find_map(|(system, code)| {
            if Some(system) == own("need").as_deref() {
                NeedCode::from_code(code)
            } else {
                ["need-icd10cm", "need-snomed-concern"]
                    .iter()
                    .find_map(|m| back(m, system, code))
                    .as_deref()
                    .and_then(NeedCode::from_code)
            }
        });
        if need.is_none() {
            problems.push(
                "ServiceRequest.reasonCode: no coding names a need the gateway knows (an ICD-10-CM or SNOMED CT code \
                 of its need ConceptMaps, or the agency's own need code)"
                    .to_owned(),
            );
        }
        let priority = match sr.get("priority").and_then(Value::as_str) {
            None => Some(Priority::Routine),
            Some(p) => back("priority", REQUEST_PRIORITY, p).as_deref().and_then(Priority::from_code),
        };
        if priority.is_none() {
            problems.push("ServiceRequest.priority: not a priority the gateway reads (routine, urgent, stat)".into());
        }
        let reason = reasons
            .iter()
            .find_map(|r| r.get("text").and_then(Value::as_str))
            .or_else(|| sr.pointer("/note/0/text").and_then(Value::as_str))
            .map(str::to_owned);
        match (service, need, priority) {
            (Some(service), Some(need), Some(priority)) if problems.is_empty() => {
                Ok(ForeignRequest { service, need, priority, reason })
            }
            _ => Err(problems),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use serde_json::json;

    fn mappings() -> Mappings {
        Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings")
    }

    #[test]
    fn a_hospitals_snomed_and_icd10_codes_read_back_as_agency_codes() {
        let m = mappings();
        let priority = m.maps.get("priority").and_then(|p| p.translate("urgent").ok().flatten()).expect("urgent");
        let service = m.maps.get("service-snomed").and_then(|p| p.translate("food_assistance").ok().flatten());
        let need = m.maps.get("need-icd10cm").and_then(|p| p.translate("homelessness").ok().flatten());
        let (service, need) = (service.expect("food"), need.expect("homelessness"));
        let sr = json!({"resourceType": "ServiceRequest", "priority": priority.code,
            "code": {"coding": [{"system": service.system, "code": service.code}]},
            "reasonCode": [{"coding": [{"system": need.system, "code": need.code}], "text": "Discharged to the street"}]});
        let read = m.read_foreign_request(&sr).expect("read");
        assert_eq!(read.service, ServiceCode::FoodAssistance);
        assert_eq!(read.need, NeedCode::Homelessness);
        assert_eq!(read.priority, Priority::Urgent);
        assert_eq!(read.reason.as_deref(), Some("Discharged to the street"));
    }

    #[test]
    fn a_code_several_agency_codes_share_is_not_read_back() {
        // Social service procedure: case management, housing, employment… all map to it.
        let sr = json!({"resourceType": "ServiceRequest",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "410606002"}]},
            "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "366979004"}]}]});
        let problems = mappings().read_foreign_request(&sr).expect_err("ambiguous");
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn a_code_no_map_reads_back_is_reported_not_guessed() {
        let sr = json!({"resourceType": "ServiceRequest", "priority": "asap",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}});
        let problems = mappings().read_foreign_request(&sr).expect_err("unreadable");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("ServiceRequest.code"));
    }
}
