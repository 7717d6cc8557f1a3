//! `/fhir/AuditEvent`: the audit chain as FHIR `AuditEvent`s (see [`crate::audit::event`]), for admin keys only
//! (never a partner's key): read by the entry's number, search by `patient`, `date` (prefixes `eq`, `gt`, `ge`,
//! `lt`, `le`, repeatable to bound both sides), `agent` (the key or worker that acted), `entity` (`Patient/<id>` or
//! an agency record `<kind>/<id>`), `outcome`, `type`, `subtype` (`code` or `system|code`), `_sort=-date`,
//! `_count` and `_offset`.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use time::OffsetDateTime;

use super::AppState;
use super::api::store_problem;
use super::fhir::{all_params, base, fhir, invalid, last_updated, not_found, number, params, searchset};
use super::problem::ApiError;
use super::public_url::RequestBase;
use crate::audit::event;
use crate::domain::RecordKind;
use crate::store::{AuditQuery, to_micros};

const DEFAULT_COUNT: u32 = 50;
const MAX_COUNT: u32 = 500;

/// The parameters this endpoint knows (others are ignored and left out of the links).
const KNOWN: [&str; 8] = ["patient", "date", "agent", "entity", "outcome", "type", "subtype", "_sort"];

/// `GET /fhir/AuditEvent/{id}`.
///
/// # Errors
/// 404 when there is no such entry.
pub async fn read(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let seq = id.parse::<i64>().ok().filter(|s| *s > 0).ok_or_else(|| not_found("AuditEvent"))?;
    let found = state.store.audit_chain(seq - 1, 1).await.map_err(store_problem)?;
    let entry = found.into_iter().find(|e| e.seq == seq).ok_or_else(|| not_found("AuditEvent"))?;
    Ok(fhir(StatusCode::OK, &event::render(&entry)))
}

/// `GET /fhir/AuditEvent?…`.
///
/// # Errors
/// 400 `OperationOutcome` for a malformed parameter.
pub async fn search(
    State(state): State<AppState>,
    public: RequestBase,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let every = all_params(raw.as_deref());
    let one = params(raw.as_deref());
    let used: Vec<(String, String)> = every.iter().filter(|(k, _)| KNOWN.contains(&k.as_str())).cloned().collect();
    let mut query = AuditQuery {
        limit: number(&one, "_count", DEFAULT_COUNT, MAX_COUNT)?,
        offset: number(&one, "_offset", 0, u32::MAX)?,
        ..AuditQuery::default()
    };
    for (name, value) in &used {
        narrow(&mut query, name, value)?;
    }
    let (page, total) = state.store.search_audit(&query).await.map_err(store_problem)?;
    let events = page.iter().map(event::render).collect();
    let total = usize::try_from(total).unwrap_or(usize::MAX);
    Ok(fhir(StatusCode::OK, &searchset(&base(&public), "AuditEvent", &used, events, total, query.offset, query.limit)))
}

/// Narrows `query` by one search parameter.
fn narrow(query: &mut AuditQuery, name: &str, value: &str) -> Result<(), ApiError> {
    let both = |slot: &mut Option<String>, v: String| -> Result<(), ApiError> {
        match slot {
            Some(had) if *had != v => Err(invalid(format!("{name}: one value (two different ones match nothing)"))),
            _ => {
                *slot = Some(v);
                Ok(())
            }
        }
    };
    match name {
        "patient" => both(&mut query.client, patient_id(value)?.to_owned()),
        "agent" => both(&mut query.actor, value.rsplit('|').next().unwrap_or(value).to_owned()),
        "entity" => match value.strip_prefix("Patient/") {
            Some(id) => both(&mut query.client, id.to_owned()),
            None => {
                let (kind, id) = value
                    .split_once('/')
                    .filter(|(k, id)| RecordKind::from_name(k).is_some() && !id.is_empty())
                    .ok_or_else(|| invalid("entity: Patient/<id> or an agency record, <kind>/<id> (care-plan/cp-1)"))?;
                query.record = Some((kind.to_owned(), id.to_owned()));
                Ok(())
            }
        },
        "type" | "subtype" | "outcome" => {
            let mut matching: Vec<&'static str> = Vec::new();
            for token in value.split(',') {
                matching.extend(event::actions_matching(name, token.trim()));
            }
            query.actions = Some(match query.actions.take() {
                Some(had) => had.into_iter().filter(|a| matching.contains(a)).collect(),
                None => matching,
            });
            Ok(())
        }
        "date" => {
            let (after, before) = date(value)?;
            if let Some(a) = after.map(to_micros) {
                query.after = Some(query.after.map_or(a, |had| had.max(a)));
            }
            if let Some(b) = before.map(to_micros) {
                query.before = Some(query.before.map_or(b, |had| had.min(b)));
            }
            Ok(())
        }
        "_sort" => match value {
            "date" | "_id" => Ok(()),
            "-date" | "-_id" => {
                query.newest_first = true;
                Ok(())
            }
            _ => Err(invalid("_sort: date or -date")),
        },
        _ => Ok(()),
    }
}

/// `Patient/<id>` or `<id>`.
fn patient_id(value: &str) -> Result<&str, ApiError> {
    let id = value.strip_prefix("Patient/").unwrap_or(value);
    if id.is_empty() || id.contains('/') {
        return Err(invalid("patient: Patient/<id> or <id>"));
    }
    Ok(id)
}

/// A `date` value: `gt`, `ge`, `lt`, `le` as for `_lastUpdated`; `eq` or no prefix, the day (a date) or the
/// instant (a date and time) itself. Exclusive bounds.
fn date(value: &str) -> Result<(Option<OffsetDateTime>, Option<OffsetDateTime>), ApiError> {
    let bare = value.strip_prefix("eq").unwrap_or(value);
    if bare.get(..2).is_some_and(|p| p.bytes().all(|b| b.is_ascii_alphabetic())) {
        return last_updated(value).map_err(|_| invalid("date takes eq, gt, ge, lt or le and a date or an instant"));
    }
    let tick = time::Duration::microseconds(1);
    if let Ok(day) = crate::domain::Date::parse(bare) {
        let start = day.0.midnight().assume_utc();
        return Ok((Some(start.saturating_sub(tick)), Some(start.saturating_add(time::Duration::DAY))));
    }
    let at = crate::domain::Timestamp::parse(bare)
        .map_err(|_| invalid("date takes eq, gt, ge, lt or le and a date or an instant"))?
        .0;
    Ok((Some(at.saturating_sub(tick)), Some(at.saturating_add(tick))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_bounds_the_day_and_prefixes_bound_one_side() {
        let (a, b) = date("2026-12-07").expect("a day");
        assert_eq!(a.map(|a| a.date().to_string()), Some("2026-12-06".into()));
        assert_eq!(b.map(|b| b.date().to_string()), Some("2026-12-08".into()));
        assert!(matches!(date("ge2026-12-07T10:00:00Z"), Ok((Some(_), None))));
        assert!(matches!(date("lt2026-12-07"), Ok((None, Some(_)))));
        assert!(date("2026-13-07").is_err());
        assert!(date("sa2026-12-07").is_err());
    }

    #[test]
    fn type_subtype_and_outcome_intersect() {
        let mut q = AuditQuery::default();
        narrow(&mut q, "type", "110106").expect("type");
        narrow(&mut q, "outcome", "8").expect("outcome");
        assert_eq!(q.actions, Some(vec!["delivery_dead"]));
        narrow(&mut q, "subtype", "read").expect("subtype");
        assert_eq!(q.actions, Some(vec![]), "nothing is both");
        assert!(narrow(&mut q, "entity", "letters/x").is_err());
        assert!(narrow(&mut AuditQuery::default(), "patient", "").is_err());
    }
}
