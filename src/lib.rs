//! carebridge: a FHIR R4 integration gateway for mental-health case management.
//!
//! Where things live (one line a module, in the order data flows through them):
//!
//! - [`cli`]: the command line (`serve`, `check`, `keys`); thin, dispatches to the modules below.
//! - [`config`]: the `Settings` tree, layered defaults → file → `CAREBRIDGE_*` environment → flags.
//! - [`app`]: builds the service (store, seed, router, listener) and runs it until shutdown.
//! - [`outbound`]: the HTTP client for other servers (directory sources, partners): retries, named failures.
//! - [`partners`]: the partner registry (`[[partners]]`): names, base URLs, what each receives, overlays, auth.
//! - [`keys`]: API keys: salted hashes as configured, new keys, the ring that names a caller and its scopes.
//! - [`http`]: the router and its layers; `api` (`/api/v1`), `auth` (API keys), `extract` (bad input → problem),
//!   `problem` (problem+json / OperationOutcome), `ops` (`/healthz`, `/readyz`, `/metrics`), `fhir` and `hsds`
//!   (the catalog published), `preview` (what a record becomes in FHIR), `serve` (the accept loop and its
//!   connection timeouts), `public_url` (the base of the links we hand out).
//! - [`directories`]: community service directories (HSDS 3.0 API or package, FHIR `HealthcareService`) synced
//!   into the catalog, and published back as FHIR and HSDS.
//! - [`mapping`]: declarative mappings (`mappings/`) agency records ⇄ FHIR R4, ConceptMaps, profile rules.
//! - [`fhir`]: FHIR URI constants and the fhir-sdk typed-model check of what we emit.
//! - [`intake`]: the write use cases: validate an agency record (and its links to the client's other records), keep
//!   it with history and audit.
//! - [`outbox`]: delivery to partners: claim, ask the policy, map, plan references and parts, send, settle.
//! - [`followup`]: the closed loop of referrals: the shared Task (whose fields are whose, merged into the
//!   partner's copy).
//! - [`policy`]: the egress decision (send, redact, hold) for one record version, one partner, one moment.
//! - [`domain`]: the agency's records as validated types (client, assessment, care plan, referral, consent).
//! - [`store`]: the `Store` trait and its SQLite/PostgreSQL implementation, with migrations.
//! - [`audit`]: the audit chain (entries, hashes, verification) and its `AuditEvent` rendering.
//! - [`tls`]: PEM certificates and keys, and the listener's TLS (mutual TLS, reloaded on SIGHUP).
//! - [`telemetry`]: JSON logs without PHI, and the Prometheus recorder.

pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod directories;
pub mod domain;
pub mod fhir;
pub mod followup;
pub mod http;
pub mod intake;
pub mod keys;
pub mod mapping;
pub mod outbound;
pub mod outbox;
pub mod partners;
pub mod policy;
pub mod store;
pub mod telemetry;
pub mod tls;
