//! A deterministic generator of large synthetic HSDS 3.0 directories, for benchmarks and load tests: the same
//! `(count, seed)` always gives the same services, spread over ten US cities and the agency's categories.

use serde_json::{Value, json};

const CITIES: [(&str, &str, f64, f64); 10] = [
    ("Portland", "OR", 45.5152, -122.6784),
    ("Seattle", "WA", 47.6062, -122.3321),
    ("Boise", "ID", 43.6150, -116.2023),
    ("Sacramento", "CA", 38.5816, -121.4944),
    ("Denver", "CO", 39.7392, -104.9903),
    ("Phoenix", "AZ", 33.4484, -112.0740),
    ("Minneapolis", "MN", 44.9778, -93.2650),
    ("Chicago", "IL", 41.8781, -87.6298),
    ("Atlanta", "GA", 33.7490, -84.3880),
    ("Philadelphia", "PA", 39.9526, -75.1652),
];

const CATEGORIES: [(&str, &str, &str); 9] = [
    ("therapy", "Counseling", "individual and group counseling for depression, anxiety and trauma"),
    ("psychiatry", "Psychiatry", "psychiatric evaluation and medication management"),
    ("crisis_care", "Crisis Line", "crisis counseling and mobile crisis response around the clock"),
    ("substance_use_treatment", "Recovery Clinic", "outpatient treatment and medication for addiction recovery"),
    ("case_management", "Case Management", "help coordinating care, benefits and appointments"),
    ("peer_support", "Peer Support", "peer specialists with lived experience of recovery"),
    ("housing_assistance", "Housing Help", "rapid re-housing, shelter referrals and rental assistance"),
    ("food_assistance", "Food Pantry", "groceries, hot meals and help applying for SNAP"),
    ("employment_support", "Job Center", "supported employment, resume help and job placement"),
];

const ADJECTIVES: [&str; 12] = [
    "Community",
    "Riverside",
    "Northside",
    "Eastside",
    "Harbor",
    "Summit",
    "Cedar",
    "Maple",
    "Unity",
    "Bridge",
    "Hope",
    "Lakeview",
];

const LANGUAGES: [&str; 6] = ["en", "es", "vi", "zh", "ru", "so"];

/// A small, fast, deterministic generator (SplitMix64).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn uuid(kind: u8, n: u64) -> String {
    uuid::Uuid::from_u128((u128::from(kind) << 120) | u128::from(n) | (0x4000 << 64) | (0x8000 << 48)).to_string()
}

/// Service `n` of the synthetic directory with this seed.
#[must_use]
pub fn service(seed: u64, n: u64) -> Value {
    let mut r = Mix(seed ^ n.wrapping_mul(0xA24B_AED4_963E_E407));
    let (city, state, lat, lon) = CITIES[r.below(CITIES.len())];
    let (code, noun, what) = CATEGORIES[r.below(CATEGORIES.len())];
    let adjective = ADJECTIVES[r.below(ADJECTIVES.len())];
    // Within about 25 km of the city centre.
    let (la, lo) = (lat + r.signed() * 0.22, lon + r.signed() * 0.3);
    let mut languages = vec!["en"];
    for l in &LANGUAGES[1..] {
        if r.below(4) == 0 {
            languages.push(l);
        }
    }
    let org = n / 3;
    // Hours at the city's standard UTC offset (HSDS `timezone`, in hours), so open-now has hours to match.
    let offset = match state {
        "OR" | "WA" | "CA" => -8,
        "ID" | "CO" | "AZ" => -7,
        "MN" | "IL" => -6,
        _ => -5,
    };
    json!({
        "id": uuid(1, n),
        "name": format!("{adjective} {noun} {n}"),
        "description": format!("{adjective} {noun} in {city} offers {what}. Walk-ins welcome; call ahead for interpreters."),
        "status": if r.below(50) == 0 { "inactive" } else { "active" },
        "url": format!("https://directory.example.org/services/{n}"),
        "last_modified": format!("2026-{:02}-{:02}T12:00:00Z", 1 + r.below(10), 1 + r.below(28)),
        "languages": languages.iter().enumerate().map(|(i, l)| json!({"id": uuid(2, n * 8 + i as u64), "code": l})).collect::<Vec<_>>(),
        "organization": {"id": uuid(3, org), "name": format!("{adjective} Services of {city} {org}")},
        "service_at_locations": [{"id": uuid(4, n), "location": {
            "id": uuid(5, n), "location_type": "physical", "name": format!("{adjective} Center {n}"),
            "latitude": la, "longitude": lo,
            "addresses": [{"id": uuid(6, n), "address_1": format!("{} Main St", 100 + r.below(9000)), "city": city,
                "state_province": state, "postal_code": format!("{:05}", r.below(99_999)), "country": "US",
                "address_type": "physical"}]}}],
        "schedules": [{"id": uuid(7, n), "freq": "WEEKLY", "byday": "MO,TU,WE,TH,FR", "opens_at": "09:00", "closes_at": "17:00", "timezone": offset}],
        "phones": [{"id": uuid(8, n), "number": format!("555-01{:02}", r.below(100)), "type": "voice"}],
        "attributes": [{"id": uuid(9, n), "link_type": "service", "link_entity": "service", "link_id": uuid(1, n),
            "taxonomy_term": {"id": format!("cbsc-{code}"), "code": code, "name": noun,
                "taxonomy": super::CATEGORY_TAXONOMY}}],
    })
}

/// The first `count` services of the synthetic directory with this seed.
pub fn services(seed: u64, count: u64) -> impl Iterator<Item = Value> {
    (0..count).map(move |n| service(seed, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_directory_and_every_service_normalises() {
        let a: Vec<Value> = services(7, 50).collect();
        let b: Vec<Value> = services(7, 50).collect();
        assert_eq!(a, b);
        assert_ne!(a, services(8, 50).collect::<Vec<_>>());
        for s in &a {
            crate::directories::hsds::normalise_service("syn", s).expect("valid HSDS");
        }
    }
}
