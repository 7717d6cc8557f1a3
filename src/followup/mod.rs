//! Following referrals across the loop: the shared `Task` whose fields belong to different sides ([`task`]), and
//! the sweeps that read what partners did with the referrals the agency sent them ([`poll`]), and the referrals'
//! Tasks as the gateway's own FHIR endpoint serves them to the agency and to partners ([`served`]).
//!
//! The agency's referral and the partner's Task meet here: what the gateway writes into a partner's Task merges
//! into the partner's copy instead of overwriting it, and what the partner writes there moves the agency's referral
//! through the same state machine as every other status change.

pub mod inbound;
pub mod poll;
pub mod served;
pub mod subscription;
pub mod task;
