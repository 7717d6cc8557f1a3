//! Mapping benchmark: care plans mapped to FHIR per second on one core, against the serde_json floor.
//!
//! ```text
//! cargo bench --bench mapping
//! ```
//! `care_plan_to_fhir` is the whole outbound path for one care plan and its client: agency JSON bytes →
//! validated record → every template rendered (Patient, Conditions, Goals, ServiceRequests, CarePlan) →
//! typed-model parse and profile rules on each resource → transaction Bundle → JSON bytes.
//! `serde_json_floor` parses the same output bytes into a `serde_json::Value` and writes them back: the
//! least any JSON-to-JSON step costs. Ratio reported in BENCHMARKS.md = floor time / mapping time.

use std::path::Path;

use carebridge::domain::RecordKind;
use carebridge::mapping::{Mappings, Related, canonical};
use divan::Bencher;
use serde_json::Value;

fn main() {
    divan::Divan::from_args().threads([1]).main();
}

struct Case {
    mappings: Mappings,
    plans: Vec<(Vec<u8>, Value)>,
    outputs: Vec<Vec<u8>>,
}

fn case() -> Case {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mappings = Mappings::load(&root.join("mappings")).expect("the shipped mappings load");
    let mut plans = Vec::new();
    let mut outputs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(root.join("fixtures/agency/care-plan"))
        .expect("care plan fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for path in files {
        let bytes = std::fs::read(&path).expect("readable");
        let plan: Value = serde_json::from_slice(&bytes).expect("JSON");
        let client_file = root.join(format!("fixtures/agency/client/{}.json", plan["client_id"].as_str().expect("id")));
        let client: Value = serde_json::from_slice(&std::fs::read(client_file).expect("client")).expect("JSON");
        outputs.push(map_one(&mappings, &bytes, &client));
        plans.push((bytes, client));
    }
    Case { mappings, plans, outputs }
}

fn map_one(mappings: &Mappings, bytes: &[u8], client: &Value) -> Vec<u8> {
    let record: Value = serde_json::from_slice(bytes).expect("JSON");
    let record = canonical(RecordKind::CarePlan, &record).expect("valid");
    let related = Related { client: Some(client.clone()), ..Related::default() };
    let output = mappings.to_fhir(RecordKind::CarePlan, &record, None, &related).expect("maps");
    assert!(output.violations.is_empty());
    serde_json::to_vec(&output.into_document(RecordKind::CarePlan)).expect("serialises")
}

/// One care plan (each of the five fixtures in turn) to its transaction Bundle bytes.
#[divan::bench]
fn care_plan_to_fhir(bencher: Bencher) {
    let case = case();
    let mut i = 0;
    bencher.bench_local(|| {
        let (bytes, client) = &case.plans[i % case.plans.len()];
        i += 1;
        divan::black_box(map_one(&case.mappings, bytes, client))
    });
}

/// The floor: parse the same Bundle bytes and write them back.
#[divan::bench]
fn serde_json_floor(bencher: Bencher) {
    let case = case();
    let mut i = 0;
    bencher.bench_local(|| {
        let out = &case.outputs[i % case.outputs.len()];
        i += 1;
        let v: Value = serde_json::from_slice(divan::black_box(out)).expect("JSON");
        divan::black_box(serde_json::to_vec(&v).expect("serialises"))
    });
}
