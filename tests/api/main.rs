//! Integration tests of the gateway, in one binary so it links once.

mod connections;
mod delivery_interop;
mod directories;
mod directories_api;
mod directories_csv;
mod directories_fhir;
mod directories_open_now;
mod directories_search;
mod errors;
mod fhir_peer;
mod hardening;
mod helpers;
mod hostile_input;
mod hsds_api_fake;
mod mappings;
mod metrics_labels;
mod ops;
mod partners;
mod private_answers;
mod process;
mod public_links;
mod publication;
mod records;
mod search_fuzz;
mod store_contract;
mod sync_jobs;
