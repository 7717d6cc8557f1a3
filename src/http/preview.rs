//! `POST /api/v1/preview/{kind}`: the FHIR a record would become, with any profile violations,
//! without storing or sending anything.
//!
//! What a preview shows depends on the caller's scopes. Preview needs `write` (it is the dry run of a write). A
//! care plan or referral names a client, and its Bundle carries that client's `Patient`: the preview reads the
//! stored client for it only when the key also has `read`; a write-only key sees nothing but the FHIR made from
//! the body it sent (the Bundle then has no `Patient` entry), so preview never reveals a stored record to a key
//! that may not read it.
//!
//! Mapping is CPU work: it runs on the blocking pool, at most [`AppState::mapping_slots`] at a time, so a burst of
//! large previews cannot stall the async workers that answer every other request.

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::extract::{ApiQuery, CallerActor, JsonBytes, PathText, parse_json};
use super::problem::{ApiError, Problem, ProblemType};
use crate::config::Scope;
use crate::domain::{AgencyRecord, KindJob, RecordKind, canonical_value};
use crate::mapping::profile::Violation;
use crate::mapping::{MapError, Mappings, Related};
use crate::partners::Partners;
use crate::policy::{self, Decision, Facts, LeftOut, Recipient};

/// Query of a preview.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PreviewParams {
    /// Map for this configured partner (`[[partners]]`), with its overlay when it has one (its US Core version,
    /// identifier systems, extra elements).
    partner: Option<String>,
}

/// What a record would become.
#[derive(Debug, Serialize, ToSchema)]
pub struct Preview {
    /// The FHIR document: one resource, or a transaction Bundle (care plans, referrals, several resources). With
    /// `?partner=`, what that partner would receive (redacted as the policy decides); when it would be held, what
    /// the record maps to with that partner's overlay, and `sendable` is false.
    #[schema(value_type = Object)]
    fhir: Value,
    /// Base R4 (JSON Schema, Codings, bdl-7), typed-model and profile violations; a record with any would not be
    /// sent.
    violations: Vec<Violation>,
    /// Whether it could be sent as it is: no violations, and (with `?partner=`) not held for that partner.
    sendable: bool,
    /// What delivery would do for each partner it is owed to (each partner receiving the kind; the one a referral
    /// or consent names), from the client's consents and referrals as stored: only for a key that may read them
    /// (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    partners: Option<Vec<PartnerPreview>>,
}

/// What delivery of a record would do for one partner.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartnerPreview {
    /// The partner.
    partner: String,
    /// Its policy profile.
    profile: String,
    /// `send`, `redact` (sent with parts left out) or `hold` (nothing sent).
    decision: &'static str,
    /// Why it would be held.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// What would be left out, and why (codes and ids only).
    left_out: Vec<LeftOut>,
    /// The resources that would be sent (`Type/id`), with their security labels' codes.
    resources: Vec<LabelledResource>,
    /// The consents the decision rests on.
    consents: Vec<String>,
}

/// A resource that would be sent, with its labels.
#[derive(Debug, Serialize, ToSchema)]
pub struct LabelledResource {
    /// `Type/id`.
    resource: String,
    /// Its `meta.security` codes (`R`, `PSY`…).
    labels: Vec<String>,
}

/// Maps a record to FHIR without storing or sending it.
#[utoipa::path(
    post,
    path = "/api/v1/preview/{kind}",
    params(("kind" = String, Path, description = "client, assessment, care-plan, referral or consent"), PreviewParams),
    request_body(content = Object, description = "An agency record of that kind, checked exactly as a PUT checks it"),
    responses(
        (status = 200, description = "The FHIR it would become. The Patient of a care plan or referral Bundle comes from the stored client, and only for a key that also has the read scope.", body = Preview),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such kind or partner", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The record is invalid, or a code has no mapping", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["write"])),
    tag = "mappings"
)]
pub async fn preview(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    CallerActor(actor): CallerActor,
    PathText(kind): PathText,
    ApiQuery(params): ApiQuery<PreviewParams>,
    JsonBytes(body): JsonBytes,
) -> Result<Json<Preview>, ApiError> {
    let kind = RecordKind::from_name(&kind).ok_or_else(|| {
        Problem::new(ProblemType::NotFound)
            .detail("no such record kind: client, assessment, care-plan, referral or consent")
    })?;
    let (record, owed) = checked(kind, &body, &state.partners)?;
    let overlay = match params.partner.as_deref() {
        None => None,
        Some(name) => state
            .partners
            .overlay_of(name)
            .ok_or_else(|| Problem::new(ProblemType::NotFound).detail("no such partner in the configuration"))?
            .map(str::to_owned),
    };
    // What other writers stored (the client, the needs' other records, the client's consents and referrals) is
    // read only for a key that may read it. Only what the mapping of this kind reads: the Patient for care plan and
    // referral Bundles, the client's other assessments and care plans for the needs of an assessment or a care plan.
    let readable = caller.may(Scope::Read);
    let (related, facts) = if readable {
        // The stored records read here (the client's among them) are client data read: audited before the answer.
        let client = if kind == RecordKind::Client { record.get("id") } else { record.get("client_id") };
        let entry =
            crate::audit::Entry::new(time::OffsetDateTime::now_utc(), &actor.key_name, "read", &actor.request_id)
                .of_client(client.and_then(Value::as_str))
                .with_detail(&serde_json::json!({"via": "api", "what": "preview", "kind": kind.as_str()}));
        state.store.audit(vec![entry]).await.map_err(super::api::store_problem)?;
        crate::outbox::context_now(&*state.store, kind, &record).await.map_err(super::api::store_problem)?
    } else {
        (Related::default(), Facts::default())
    };
    let mut holding = std::collections::HashSet::new();
    if readable
        && let Some(id) = record.get("id").and_then(Value::as_str).and_then(|i| crate::domain::RecordId::parse(i).ok())
    {
        for name in &owed {
            if policy::partner_holds(&*state.store, name, kind, &id).await.map_err(super::api::store_problem)? {
                holding.insert(name.clone());
            }
        }
    }
    let _slot = state.mapping_slots.acquire().await.map_err(|e| ApiError::internal(ProblemType::Internal, e))?;
    let (mappings, policy, partners) = (state.mappings.clone(), state.policy.clone(), state.partners.clone());
    let focus = params.partner.clone();
    // The request's span goes along, so anything logged there (a panic too) carries the request id.
    let span = tracing::Span::current();
    let today = time::OffsetDateTime::now_utc().date();
    let mapped = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let decide = |name: &str| -> Option<(Decision, String)> {
            let settings = partners.get(name)?;
            let profile = policy.profile(settings.policy_profile())?;
            let recipient = Recipient { name, profile, holds_record: holding.contains(name) };
            let d = policy::decide(mappings.labels(), recipient, kind, &record, &related, &facts, today);
            Some((d, profile.name.clone()))
        };
        let mut previews = Vec::new();
        if readable {
            for name in &owed {
                let Some((decision, profile)) = decide(name) else { continue };
                let overlay = partners.overlay_of(name).flatten();
                previews.push(partner_preview(&mappings, overlay, name, profile, decision, kind)?);
            }
        }
        // The document shown: the partner's release when one is asked for (and known), else the whole record.
        // A partner the record is not owed to would receive nothing of it, whatever the policy says.
        let owed_there = focus.as_deref().is_none_or(|name| owed.iter().any(|o| o == name));
        let (document, held) = match focus.as_deref().filter(|_| readable && owed_there).and_then(decide) {
            Some((Decision::Hold(_), _)) => (None, true),
            Some((Decision::Send(release), _)) => (Some((release.record, release.related)), false),
            None => (None, !owed_there),
        };
        let (source, source_related) = match document {
            Some(d) => d,
            None => (record.clone(), related.clone()),
        };
        let output = mappings.to_fhir(kind, &source, overlay.as_deref(), &source_related)?;
        let violations = output.violations.clone();
        let fhir = output.into_document(kind);
        Ok::<_, MapError>((fhir, violations, held, readable.then_some(previews)))
    })
    .await
    .map_err(|e| ApiError::internal(ProblemType::Internal, e))?;
    let (fhir, violations, held, partners) = match mapped {
        Ok(o) => o,
        Err(MapError::UnknownPartner(_)) => {
            return Err(Problem::new(ProblemType::NotFound).detail("no such partner in the mappings").into());
        }
        Err(e) => return Err(Problem::new(ProblemType::InvalidRecord).detail(e.to_string()).into()),
    };
    let sendable = violations.is_empty() && !held;
    Ok(Json(Preview { fhir, violations, sendable, partners }))
}

/// What delivery would do for one partner: the decision, and for a release the resources with their labels.
fn partner_preview(
    mappings: &Mappings,
    overlay: Option<&str>,
    name: &str,
    profile: String,
    decision: Decision,
    kind: RecordKind,
) -> Result<PartnerPreview, MapError> {
    Ok(match decision {
        Decision::Hold(reason) => PartnerPreview {
            partner: name.to_owned(),
            profile,
            decision: "hold",
            reason: Some(reason),
            left_out: Vec::new(),
            resources: Vec::new(),
            consents: Vec::new(),
        },
        Decision::Send(release) => {
            let mut resources = mappings.render(kind, &release.record, overlay, &release.related)?;
            mappings.label(&mut resources);
            let resources = resources
                .iter()
                .map(|e| {
                    let ty = e.resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
                    let id = e.resource.get("id").and_then(Value::as_str).unwrap_or_default();
                    let labels = e
                        .resource
                        .pointer("/meta/security")
                        .and_then(Value::as_array)
                        .map_or(&[][..], Vec::as_slice)
                        .iter()
                        .filter_map(|c| c.get("code").and_then(Value::as_str).map(str::to_owned))
                        .collect();
                    LabelledResource { resource: format!("{ty}/{id}"), labels }
                })
                .collect();
            PartnerPreview {
                partner: name.to_owned(),
                profile,
                decision: if release.left_out.is_empty() { "send" } else { "redact" },
                reason: None,
                left_out: release.left_out,
                resources,
                consents: release.consents,
            }
        }
    })
}

/// The body parsed as a record of `kind` by the same parser and rules as `PUT`, in canonical JSON, with the
/// partners a version of it would be owed to.
fn checked(kind: RecordKind, bytes: &[u8], partners: &Partners) -> Result<(Value, Vec<String>), ApiError> {
    struct Check<'a>(&'a [u8], &'a Partners);
    impl KindJob for Check<'_> {
        type Output = Result<(Value, Vec<String>), ApiError>;
        fn run<T: AgencyRecord>(self) -> Self::Output {
            let record: T = parse_json(self.0)?;
            let owed = policy::recipients(&record, self.1);
            let value = canonical_value(&record).map_err(|errors| {
                let detail = format!("{} rule(s) broken", errors.len());
                ApiError::from(Problem::new(ProblemType::InvalidRecord).detail(detail).errors(errors))
            })?;
            Ok((value, owed))
        }
    }
    kind.with_type(Check(bytes, partners))
}
