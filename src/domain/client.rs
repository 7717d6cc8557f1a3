//! A client: the person the agency serves.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::values::vocabulary;
use super::{AgencyRecord, Date, RecordId, RecordKind, Redacted, Validator};

vocabulary! {
    /// Administrative gender, as FHIR `Patient.gender` knows it: `female`, `male`, `other`, `unknown`.
    pub enum Gender {
        Female = "female",
        Male = "male",
        Other = "other",
        Unknown = "unknown",
    }
}

/// A person the agency serves. Every field that identifies the person is kept out of logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// The agency's id for this client; optional in a request body (the path names it), always present in answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RecordId>,
    /// Other identifiers the client is known by (Medicaid id, hospital MRN), each with its system URI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 10)]
    pub identifiers: Vec<Identifier>,
    /// Given (first) name(s).
    #[schema(value_type = String, example = "Maria", max_length = 200)]
    pub given_name: Redacted<String>,
    /// Family (last) name.
    #[schema(value_type = String, example = "Lopez", max_length = 200)]
    pub family_name: Redacted<String>,
    /// Date of birth.
    #[schema(value_type = String, format = Date, example = "1987-03-14")]
    pub birth_date: Redacted<Date>,
    /// Administrative gender.
    pub gender: Gender,
    /// Preferred language as a BCP 47 tag (`en`, `es`, `vi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "es")]
    pub preferred_language: Option<String>,
    /// Phone number the client wants to be reached on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "+1-555-0100", max_length = 40)]
    pub phone: Option<Redacted<String>>,
    /// E-mail address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 254)]
    pub email: Option<Redacted<String>>,
    /// Home address; absent for a client without stable housing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
}

/// An identifier issued by another system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Identifier {
    /// URI of the issuing system, e.g. `urn:oid:2.16.840.1.113883.4.3.25` for a state Medicaid number.
    #[schema(max_length = 200)]
    pub system: String,
    /// The identifier within that system.
    #[schema(value_type = String, max_length = 200)]
    pub value: Redacted<String>,
}

/// A postal address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// Street lines, most specific last (1 to 4, each up to 200 characters).
    #[schema(value_type = Vec<String>, min_items = 1, max_items = 4)]
    pub lines: Redacted<Vec<String>>,
    /// City or town.
    #[schema(max_length = 100)]
    pub city: String,
    /// State or province (two-letter code in the US).
    #[schema(max_length = 100)]
    pub state: String,
    /// Postal code.
    #[schema(value_type = String, max_length = 20)]
    pub postal_code: Redacted<String>,
}

/// Most identifiers a client record carries.
pub const MAX_IDENTIFIERS: usize = 10;
/// Most street lines of an address.
pub const MAX_ADDRESS_LINES: usize = 4;

impl AgencyRecord for Client {
    const KIND: RecordKind = RecordKind::Client;

    fn lookup_keys(&self) -> Vec<(String, String)> {
        self.identifiers.iter().map(|i| (i.system.clone(), i.value.0.clone())).collect()
    }

    fn body_id(&self) -> Option<&RecordId> {
        self.id.as_ref()
    }

    fn set_id(&mut self, id: RecordId) {
        self.id = Some(id);
    }

    fn client_id(&self) -> Option<&RecordId> {
        self.id.as_ref()
    }

    fn status_code(&self) -> Option<&'static str> {
        None
    }

    fn validate(&self, v: &mut Validator) {
        v.text(&self.given_name, "$.given_name", 200);
        v.text(&self.family_name, "$.family_name", 200);
        let today = time::OffsetDateTime::now_utc().date();
        v.check(self.birth_date.0.0 <= today, "$.birth_date", "the birth date is in the future");
        v.check(self.birth_date.0.0.year() >= 1880, "$.birth_date", "the birth date is before 1880");
        if let Some(lang) = &self.preferred_language {
            let ok = !lang.is_empty()
                && lang.len() <= 35
                && lang.split('-').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()));
            v.check(ok, "$.preferred_language", "expected a BCP 47 language tag such as en or es-MX");
        }
        if let Some(phone) = &self.phone {
            v.text(phone, "$.phone", 40);
        }
        if let Some(email) = &self.email {
            v.text(email, "$.email", 254);
            v.check(email.contains('@'), "$.email", "expected an e-mail address");
        }
        v.at_most(self.identifiers.len(), "$.identifiers", MAX_IDENTIFIERS);
        for (i, ident) in self.identifiers.iter().enumerate() {
            let system_ok = ident.system.contains(':') && !ident.system.chars().any(char::is_whitespace);
            v.check(system_ok, format!("$.identifiers[{i}].system"), "expected an absolute URI");
            v.text(&ident.system, format!("$.identifiers[{i}].system"), 200);
            v.text(&ident.value, format!("$.identifiers[{i}].value"), 200);
        }
        if let Some(address) = &self.address {
            v.check(!address.lines.is_empty(), "$.address.lines", "an address has at least one line");
            v.at_most(address.lines.len(), "$.address.lines", MAX_ADDRESS_LINES);
            for (i, line) in address.lines.iter().enumerate() {
                v.text(line, format!("$.address.lines[{i}]"), 200);
            }
            v.text(&address.city, "$.address.city", 100);
            v.text(&address.state, "$.address.state", 100);
            v.text(&address.postal_code, "$.address.postal_code", 20);
        }
    }
}
