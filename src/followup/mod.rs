//! Following referrals across the loop: the shared `Task` whose fields belong to different sides ([`task`]).
//!
//! The agency's referral and the partner's Task meet here: what the gateway writes into a partner's Task merges
//! into the partner's copy instead of overwriting it.

pub mod task;
