//! `/hsds`: the service catalog as an Open Referral HSDS 3.0 API (`/hsds/`, `/hsds/services`,
//! `/hsds/services/{id}`), so other platforms can read the directory. Ids are UUIDs (see
//! `directories::publish`).

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::IntoParams;

use super::AppState;
use super::extract::{ApiQuery, PathText, paging};
use super::problem::{ApiError, Problem, ProblemType};
use crate::directories::publish;
use crate::store::CatalogListing;

/// Services per page when the caller does not say.
const DEFAULT_PER_PAGE: u32 = 50;

/// Query of `GET /hsds/services`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ServicesParams {
    /// Part of the service name, any case.
    search: Option<String>,
    /// Page, from 1.
    page: Option<u32>,
    /// Services per page (default 50, at most 100).
    per_page: Option<u32>,
    /// Only services changed in the catalog after this instant (RFC 3339).
    modified_after: Option<String>,
    /// Only services carrying this taxonomy term (its HSDS id, a UUID).
    taxonomy_term_id: Option<String>,
    /// Only services of this organisation (its HSDS id, a UUID).
    organization_id: Option<String>,
}

/// An HSDS id parameter: a UUID, lower case as published.
fn uuid_param(name: &str, value: Option<&str>) -> Result<Option<String>, ApiError> {
    value
        .map(|v| {
            uuid::Uuid::parse_str(v.trim())
                .map(|u| u.to_string())
                .map_err(|_| Problem::new(ProblemType::InvalidQuery).detail(format!("{name} is a UUID")).into())
        })
        .transpose()
}

/// `GET /hsds/`: what this API is.
pub async fn root() -> Json<Value> {
    Json(json!({
        "version": "3.0.1",
        "profile": "https://docs.openreferral.org/en/v3.0.1/",
        "openapi_url": "https://raw.githubusercontent.com/openreferral/specification/3.0.1/schema/openapi.json",
    }))
}

/// `GET /hsds/services?search=&page=&per_page=&modified_after=&taxonomy_term_id=&organization_id=`: a page of services (one-to-one fields).
///
/// # Errors
/// A problem for a malformed parameter or an unreadable catalog.
pub async fn services(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<ServicesParams>,
) -> Result<Json<Value>, ApiError> {
    let (page, per_page) = paging(p.page, p.per_page, DEFAULT_PER_PAGE)?;
    let modified_after = p
        .modified_after
        .as_deref()
        .map(|t| OffsetDateTime::parse(t, &Rfc3339))
        .transpose()
        .map_err(|_| Problem::new(ProblemType::InvalidQuery).detail("modified_after is an RFC 3339 instant"))?;
    let listing = CatalogListing {
        name: p.search.clone(),
        term_public_id: uuid_param("taxonomy_term_id", p.taxonomy_term_id.as_deref())?,
        organization_public_id: uuid_param("organization_id", p.organization_id.as_deref())?,
        updated_after: modified_after,
        include_inactive: true,
        offset: (page - 1).saturating_mul(per_page),
        limit: per_page,
        ..CatalogListing::default()
    };
    let (rows, total) = state.store.list_services(&listing).await.map_err(super::api::store_problem)?;
    let contents: Vec<Value> =
        rows.iter().map(|l| publish::hsds_service_summary(&l.item, l.active, l.updated_at)).collect();
    let total_pages = total.div_ceil(per_page as usize).max(1);
    Ok(Json(json!({
        "total_items": total,
        "total_pages": total_pages,
        "page_number": page,
        "size": contents.len(),
        "first_page": page == 1,
        "last_page": page as usize >= total_pages,
        "empty": contents.is_empty(),
        "contents": contents,
    })))
}

/// `GET /hsds/services/{id}`: one service with everything related, by its HSDS id (a UUID).
///
/// # Errors
/// 404 when no service is published under that id.
pub async fn service(State(state): State<AppState>, PathText(id): PathText) -> Result<Json<Value>, ApiError> {
    let listing = CatalogListing { public_id: Some(id), include_inactive: true, limit: 1, ..CatalogListing::default() };
    let (rows, _) = state.store.list_services(&listing).await.map_err(super::api::store_problem)?;
    let l = rows.first().ok_or_else(|| Problem::new(ProblemType::NotFound).detail("no service with this id"))?;
    Ok(Json(publish::hsds_service(&l.item, l.active, l.updated_at)))
}
