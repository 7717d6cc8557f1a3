//! `/api/v1/services`: search the service catalog; `/api/v1/directories/{source}/sync`: start a sync job of a
//! source, and `/api/v1/directories/{source}/sync/{job}`: follow it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{ApiQuery, CallerActor, PathText, paging};
use super::problem::{ApiError, Problem, ProblemType};
use crate::directories::jobs::{StartError, StartedBy, SyncJob};
use crate::directories::{CatalogService, DirectorySource, ServiceHit, ServiceQuery, SyncMode};

/// The configured directory sources, by name.
pub type Sources = Arc<HashMap<String, Arc<dyn DirectorySource>>>;

/// Results per page when the caller does not say.
const DEFAULT_PER_PAGE: u32 = 20;

/// Largest search radius.
const MAX_RADIUS_KM: f64 = 500.0;

/// Query of a catalog search.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// Words to find in the name, alternate name and description (all must match, any case and accents; the last
    /// may be a prefix of a longer word). A `q` without a letter or digit is a 400.
    q: Option<String>,
    /// Agency service category (`therapy`, `psychiatry`, `crisis_care`, `housing_assistance`, …), as the source
    /// gives it or as its category map derives it from the source's own taxonomy.
    category: Option<String>,
    /// A taxonomy term of any taxonomy the sources use, by code or by the source's id of it; the terms under it
    /// (HSDS `parent_id`) are found too.
    taxonomy_term: Option<String>,
    /// `LAT,LON` (WGS 84) to search around; results carry their distance.
    near: Option<String>,
    /// Radius around `near` in km (default 25, at most 500).
    radius_km: Option<f64>,
    /// A language the service is offered in (BCP 47, e.g. `es`).
    language: Option<String>,
    /// Also list services that are not active: gone from their source, or marked inactive, defunct or closed there.
    include_inactive: Option<bool>,
    /// `true`: only services open now by their weekly hours, in their time zone. Services whose hours or time zone
    /// are unknown never match. `false` (the default) does not filter.
    open_now: Option<String>,
    /// Only services open at this instant (RFC 3339, e.g. `2026-07-01T16:30:00Z`): `open_now` at another time.
    open_at: Option<String>,
    /// Page, from 1.
    page: Option<u32>,
    /// Results per page (default 20, at most 100).
    per_page: Option<u32>,
}

/// A page of search results, best first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchPage {
    /// Results of this page.
    items: Vec<ServiceHit>,
    /// Results in all.
    total: usize,
    /// This page.
    page: u32,
    /// Results per page.
    per_page: u32,
}

fn bad_query(detail: impl Into<String>) -> ApiError {
    Problem::new(ProblemType::InvalidQuery).detail(detail).into()
}

/// The instant an `open_now`/`open_at` search asks about, if any; `now` is the request's time.
fn open_at(p: &SearchParams, now: OffsetDateTime) -> Result<Option<OffsetDateTime>, ApiError> {
    let open_now = match p.open_now.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(bad_query("open_now: true or false")),
    };
    match p.open_at.as_deref() {
        None => Ok(open_now.then_some(now)),
        Some(_) if p.open_now.as_deref() == Some("false") => Err(bad_query("open_now: false contradicts open_at")),
        Some(t) => {
            OffsetDateTime::parse(t.trim(), &time::format_description::well_known::Rfc3339).map(Some).map_err(|_| {
                bad_query("open_at: expected an RFC 3339 date-time with its offset, e.g. 2026-07-01T16:30:00Z")
            })
        }
    }
}

fn service_query(p: SearchParams, now: OffsetDateTime) -> Result<ServiceQuery, ApiError> {
    let open_at = open_at(&p, now)?;
    let near = match &p.near {
        None => None,
        Some(text) => {
            let (lat, lon) = text.split_once(',').ok_or_else(|| bad_query("near: expected LAT,LON"))?;
            let lat: f64 = lat.trim().parse().map_err(|_| bad_query("near: latitude is not a number"))?;
            let lon: f64 = lon.trim().parse().map_err(|_| bad_query("near: longitude is not a number"))?;
            if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                return Err(bad_query("near: off the globe"));
            }
            Some((lat, lon))
        }
    };
    let radius_km = p.radius_km.unwrap_or(25.0);
    if !(radius_km > 0.0 && radius_km <= MAX_RADIUS_KM) {
        return Err(bad_query(format!("radius_km: between 0 and {MAX_RADIUS_KM}")));
    }
    if p.radius_km.is_some() && near.is_none() {
        return Err(bad_query("radius_km: needs near"));
    }
    let (page, per_page) = paging(p.page, p.per_page, DEFAULT_PER_PAGE)?;
    // A `q` without a word (`*`, `'`, an emoji, spaces) is refused: answering it with every service would
    // pass for a match.
    if let Some(q) = &p.q
        && crate::directories::search_text::TextQuery::parse(q).is_none()
    {
        return Err(bad_query("q: no word to search for (letters or digits); leave q out to list every service"));
    }
    Ok(ServiceQuery {
        text: p.q,
        category: p.category,
        taxonomy_term: p.taxonomy_term,
        near,
        radius_km,
        language: p.language,
        include_inactive: p.include_inactive.unwrap_or(false),
        open_at,
        page,
        per_page,
    })
}

/// Searches the service catalog: full text, category, taxonomy term, language, distance, open now; ranked and
/// paged.
#[utoipa::path(get, path = "/api/v1/services", tag = "directory", params(SearchParams),
    responses((status = 200, description = "One page of results, best first", body = SearchPage),
              (status = 400, description = "A malformed parameter", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["read"])))]
pub async fn search(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<SearchParams>,
) -> Result<Json<SearchPage>, ApiError> {
    let query = service_query(params, OffsetDateTime::now_utc())?;
    let (items, total) = state.search.search(&*state.store, &query).await.map_err(super::api::store_problem)?;
    Ok(Json(SearchPage { items, total, page: query.page, per_page: query.per_page }))
}

/// One service of the catalog.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceDetail {
    /// Whether it is offered: still listed by its source, and `active` there.
    active: bool,
    /// The service as normalised from its source.
    service: CatalogService,
}

/// Reads one service of the catalog by its gateway id (as a referral's `target.service_id` names it).
#[utoipa::path(get, path = "/api/v1/services/{id}", tag = "directory",
    params(("id" = String, Path, description = "Gateway id of the service")),
    responses((status = 200, description = "The service", body = ServiceDetail),
              (status = 404, description = "No such service", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["read"])))]
pub async fn service(State(state): State<AppState>, PathText(id): PathText) -> Result<Json<ServiceDetail>, ApiError> {
    let (service, in_source) = state
        .store
        .directory_service(&id)
        .await
        .map_err(super::api::store_problem)?
        .ok_or_else(|| ApiError::from(Problem::new(ProblemType::NotFound).detail("no service with this id")))?;
    let active = in_source && service.status == "active";
    Ok(Json(ServiceDetail { active, service }))
}

/// Query of an on-demand sync.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SyncParams {
    /// `full` (read everything, deactivate what vanished) or `incremental` (what changed since the last sync).
    mode: Option<String>,
    /// `true`: deactivate what vanished even when the source lists far fewer services than its last complete
    /// crawl.
    force: Option<bool>,
}

/// Starts a sync job of one configured directory: `202 Accepted` with the job (`queued`) and its `Location`.
/// One sync per directory runs at a time, across replicas: while one runs, another is refused with 409 naming it.
#[utoipa::path(post, path = "/api/v1/directories/{source}/sync", tag = "directory", params(SyncParams,
        ("source" = String, Path, description = "Configured name of the directory")),
    responses((status = 202, description = "The job, started; follow it at its `Location`", body = SyncJob,
               headers(("location" = String, description = "`/api/v1/directories/{source}/sync/{job}`"))),
              (status = 404, description = "No directory of that name", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "A sync of this directory is already running; `detail` names its job", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["admin"])))]
pub async fn sync_now(
    State(state): State<AppState>,
    CallerActor(actor): CallerActor,
    PathText(source): PathText,
    ApiQuery(params): ApiQuery<SyncParams>,
) -> Result<Response, ApiError> {
    let mode = match params.mode.as_deref() {
        None | Some("full") => SyncMode::Full,
        Some("incremental") => SyncMode::Incremental,
        Some(_) => return Err(bad_query("mode: full or incremental")),
    };
    let force = params.force.unwrap_or(false);
    let job = state
        .syncs
        .start(&source, mode, force, StartedBy::Api, Some(&actor), OffsetDateTime::now_utc())
        .await
        .map_err(|e| match e {
            StartError::UnknownSource => Problem::new(ProblemType::NotFound).detail("no directory of that name").into(),
            StartError::Busy { running, .. } => Problem::new(ProblemType::SyncRunning)
                .detail(format!(
                    "job {running} is syncing this directory; follow it at /api/v1/directories/{source}/sync/{running}"
                ))
                .into(),
            StartError::Store(e) => super::api::store_problem(e),
        })?;
    let location = format!("/api/v1/directories/{source}/sync/{}", job.id);
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(job)).into_response())
}

/// The path of one sync job: the directory's name and the job's id (a UUID).
pub struct JobPath {
    source: String,
    job: uuid::Uuid,
}

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let not_found = || Problem::new(ProblemType::NotFound).detail("no such sync job");
        let Path((source, job)) =
            Path::<(String, String)>::from_request_parts(parts, state).await.map_err(|_| not_found())?;
        let job = uuid::Uuid::parse_str(&job).map_err(|_| not_found())?;
        Ok(JobPath { source, job })
    }
}

/// Query of a sync job read.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobParams {
    /// Wait up to this many seconds (at most 20) for the job to end before answering; 0 (the default) answers at
    /// once.
    wait_secs: Option<u64>,
}

/// Longest a sync job read waits for the job to end (below the default request timeout).
const MAX_WAIT_SECS: u64 = 20;

/// One sync job: its state (`queued`, `running`, `succeeded`, `failed`), counts so far, times, and the report
/// once it succeeded or what failed once it failed. Any replica answers for any job.
#[utoipa::path(get, path = "/api/v1/directories/{source}/sync/{job}", tag = "directory",
    params(JobParams, ("source" = String, Path, description = "Configured name of the directory"),
           ("job" = String, Path, description = "The job's id, as `POST …/sync` answered")),
    responses((status = 200, description = "The job", body = SyncJob),
              (status = 404, description = "No such job of this directory", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["admin"])))]
pub async fn sync_job(
    State(state): State<AppState>,
    path: JobPath,
    ApiQuery(params): ApiQuery<JobParams>,
) -> Result<Json<SyncJob>, ApiError> {
    let wait = match params.wait_secs {
        Some(secs) if secs > MAX_WAIT_SECS => return Err(bad_query(format!("wait_secs: from 0 to {MAX_WAIT_SECS}"))),
        secs => std::time::Duration::from_secs(secs.unwrap_or(0)),
    };
    let job = state
        .syncs
        .wait_for_job(&path.source, &path.job.to_string(), wait)
        .await
        .map_err(super::api::store_problem)?
        .ok_or_else(|| ApiError::from(Problem::new(ProblemType::NotFound).detail("no such sync job")))?;
    Ok(Json(job))
}
