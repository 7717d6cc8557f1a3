//! The [`Catalog`] on sqlx, for SQLite and PostgreSQL. Writes and filters share their SQL; only full-text search
//! differs (FTS5 `MATCH` and `bm25` on SQLite, a generated `tsvector` with `websearch_to_tsquery` and `ts_rank`
//! on PostgreSQL), passed to `impl_catalog!` as fragments.
//!
//! Distance uses the equirectangular approximation with the cosine of the search latitude computed here, so the
//! SQL needs only arithmetic (SQLite has no trigonometry): within a 100 km radius it is off by well under 1 %.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{Postgres, Row, Sqlite};
use time::OffsetDateTime;

use super::catalog::Catalog;
use super::sql::SqlStore;
use super::{StoreError, from_micros, to_micros};
use crate::directories::{CATEGORY_TAXONOMY, CatalogService, ServiceHit, ServiceQuery, Upserted};

/// Kilometres per degree of latitude.
const KM_PER_DEGREE: f64 = 111.195;

/// The FTS5 query for free text: every word must match, the last one as a prefix; `None` when there is no word.
fn fts5_query(text: &str) -> Option<String> {
    let words: Vec<&str> = text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let (last, rest) = words.split_last()?;
    let mut q: Vec<String> = rest.iter().map(|w| format!("\"{w}\"")).collect();
    q.push(format!("\"{last}\"*"));
    Some(q.join(" "))
}

/// Bound parameters of a search, in the order the SQL numbers them.
struct SearchArgs {
    text: Option<String>,
    active_only: i64,
    category: Option<String>,
    term: Option<String>,
    language: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    lon_scale: f64,
    max_d2: f64,
    min_lat: f64,
    max_lat: f64,
    min_lon: f64,
    max_lon: f64,
}

impl SearchArgs {
    fn new(q: &ServiceQuery, text: Option<String>) -> Self {
        let (lat, lon) = q.near.map_or((None, None), |(a, b)| (Some(a), Some(b)));
        let lat0 = lat.unwrap_or(0.0);
        let lon_scale = lat0.to_radians().cos().max(0.01);
        let dlat = q.radius_km / KM_PER_DEGREE;
        let dlon = dlat / lon_scale;
        SearchArgs {
            text,
            active_only: i64::from(!q.include_inactive),
            category: q.category.clone(),
            term: q.taxonomy_term.clone(),
            language: q.language.as_ref().map(|l| l.to_ascii_lowercase()),
            lat,
            lon,
            lon_scale,
            max_d2: dlat * dlat,
            min_lat: lat0 - dlat,
            max_lat: lat0 + dlat,
            min_lon: lon.unwrap_or(0.0) - dlon,
            max_lon: lon.unwrap_or(0.0) + dlon,
        }
    }
}

/// The filtered, ranked candidates as a subquery; `$1`…`$13` as in [`SearchArgs`].
fn search_inner(text_join: &str, text_where: &str, rank: &str) -> String {
    format!(
        "SELECT s.id, s.name, s.description, s.status, s.active, s.source, s.doc, {rank} AS rank, \
           (SELECT MIN((l.latitude - $6) * (l.latitude - $6) + ($8 * (l.longitude - $7)) * ($8 * (l.longitude - $7))) \
              FROM directory_service_locations sl JOIN directory_locations l ON l.id = sl.location_id \
             WHERE sl.service_id = s.id AND l.latitude BETWEEN $10 AND $11 AND l.longitude BETWEEN $12 AND $13) AS d2 \
         FROM directory_services s {text_join} \
         WHERE {text_where} AND ($2 = 0 OR (s.active = 1 AND s.status = 'active')) \
           AND ($3 IS NULL OR EXISTS (SELECT 1 FROM directory_service_terms t \
                WHERE t.service_id = s.id AND t.taxonomy = '{CATEGORY_TAXONOMY}' AND t.code = $3)) \
           AND ($4 IS NULL OR EXISTS (SELECT 1 FROM directory_service_terms t WHERE t.service_id = s.id AND t.code = $4)) \
           AND ($5 IS NULL OR EXISTS (SELECT 1 FROM directory_service_languages g \
                WHERE g.service_id = s.id AND g.language = $5))"
    )
}

const NEAR_FILTER: &str = "($6 IS NULL OR (q.d2 IS NOT NULL AND q.d2 <= $9))";

fn hit(row_doc: &str, active: bool, d2: Option<f64>) -> Result<ServiceHit, StoreError> {
    let service: CatalogService = serde_json::from_str(row_doc).map_err(StoreError::CorruptCatalog)?;
    let categories = service.terms.iter().filter(|t| t.taxonomy == CATEGORY_TAXONOMY).map(|t| t.code.clone()).collect();
    Ok(ServiceHit {
        id: service.id,
        name: service.name,
        description: service.description,
        status: service.status,
        active,
        organization: service.organization.map(|o| o.name),
        categories,
        languages: service.languages,
        distance_km: d2.map(|d2| (d2.sqrt() * KM_PER_DEGREE * 100.0).round() / 100.0),
        source: service.source,
    })
}

macro_rules! impl_catalog {
    ($db:ty, $begin:literal, $text_join:literal, $text_where:literal, $rank:literal, $text_arg:expr) => {
        #[async_trait]
        impl Catalog for SqlStore<$db> {
            async fn upsert_directory_service(
                &self,
                service: &CatalogService,
                raw: &Value,
                now: OffsetDateTime,
            ) -> Result<Upserted, StoreError> {
                let now = to_micros(now);
                let doc = serde_json::to_string(service).map_err(StoreError::CorruptCatalog)?;
                let raw = raw.to_string();
                let mut tx = self.writer().begin_with($begin).await?;
                let current: Option<(String, String, i64)> =
                    sqlx::query_as("SELECT doc, raw, active FROM directory_services WHERE id = $1")
                        .bind(&service.id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some((old_doc, old_raw, 1)) = &current {
                    if *old_doc == doc && *old_raw == raw {
                        sqlx::query("UPDATE directory_services SET seen_at = $2 WHERE id = $1")
                            .bind(&service.id)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        return Ok(Upserted::Unchanged);
                    }
                }
                if let Some(org) = &service.organization {
                    sqlx::query(
                        "INSERT INTO directory_organizations (id, source, source_id, name, doc, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                         doc = excluded.doc, updated_at = excluded.updated_at",
                    )
                    .bind(&org.id)
                    .bind(&service.source)
                    .bind(&org.source_id)
                    .bind(&org.name)
                    .bind(serde_json::to_string(org).map_err(StoreError::CorruptCatalog)?)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for l in &service.locations {
                    sqlx::query(
                        "INSERT INTO directory_locations (id, source, source_id, name, latitude, longitude, doc, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                         latitude = excluded.latitude, longitude = excluded.longitude, doc = excluded.doc, \
                         updated_at = excluded.updated_at",
                    )
                    .bind(&l.id)
                    .bind(&service.source)
                    .bind(&l.source_id)
                    .bind(&l.name)
                    .bind(l.latitude)
                    .bind(l.longitude)
                    .bind(serde_json::to_string(l).map_err(StoreError::CorruptCatalog)?)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query(
                    "INSERT INTO directory_services (id, source, source_id, name, description, status, organization_id, \
                     active, vanished_at, doc, raw, source_modified, seen_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, NULL, $8, $9, $10, $11, $11) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, description = excluded.description, \
                     status = excluded.status, organization_id = excluded.organization_id, active = 1, \
                     vanished_at = NULL, doc = excluded.doc, raw = excluded.raw, \
                     source_modified = excluded.source_modified, seen_at = excluded.seen_at, \
                     updated_at = excluded.updated_at",
                )
                .bind(&service.id)
                .bind(&service.source)
                .bind(&service.source_id)
                .bind(&service.name)
                .bind(&service.description)
                .bind(&service.status)
                .bind(service.organization.as_ref().map(|o| o.id.as_str()))
                .bind(&doc)
                .bind(&raw)
                .bind(service.source_modified.map(to_micros))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                for table in ["directory_service_locations", "directory_service_terms", "directory_service_languages"] {
                    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE service_id = $1")))
                        .bind(&service.id)
                        .execute(&mut *tx)
                        .await?;
                }
                for l in &service.locations {
                    sqlx::query("INSERT INTO directory_service_locations (service_id, location_id) VALUES ($1, $2)")
                        .bind(&service.id)
                        .bind(&l.id)
                        .execute(&mut *tx)
                        .await?;
                }
                for t in &service.terms {
                    sqlx::query(
                        "INSERT INTO directory_service_terms (service_id, taxonomy, code, name) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(&service.id)
                    .bind(&t.taxonomy)
                    .bind(&t.code)
                    .bind(&t.name)
                    .execute(&mut *tx)
                    .await?;
                }
                for language in &service.languages {
                    sqlx::query("INSERT INTO directory_service_languages (service_id, language) VALUES ($1, $2)")
                        .bind(&service.id)
                        .bind(language)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(if current.is_some() { Upserted::Updated } else { Upserted::Added })
            }

            async fn deactivate_vanished_services(
                &self,
                source: &str,
                sync_started: OffsetDateTime,
            ) -> Result<usize, StoreError> {
                let started = to_micros(sync_started);
                let mut tx = self.writer().begin_with($begin).await?;
                let done = sqlx::query(
                    "UPDATE directory_services SET active = 0, vanished_at = $2, updated_at = $2 \
                     WHERE source = $1 AND active = 1 AND seen_at < $2",
                )
                .bind(source)
                .bind(started)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
            }

            async fn mark_directory_service_seen(
                &self,
                source: &str,
                source_id: &str,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                let mut tx = self.writer().begin_with($begin).await?;
                sqlx::query("UPDATE directory_services SET seen_at = $3 WHERE source = $1 AND source_id = $2")
                    .bind(source)
                    .bind(source_id)
                    .bind(to_micros(now))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn directory_watermark(&self, source: &str) -> Result<Option<OffsetDateTime>, StoreError> {
                let row: Option<(Option<i64>,)> =
                    sqlx::query_as("SELECT watermark FROM directory_sync_state WHERE source = $1")
                        .bind(source)
                        .fetch_optional(self.reader())
                        .await?;
                Ok(row.and_then(|(w,)| w).map(from_micros))
            }

            async fn set_directory_watermark(
                &self,
                source: &str,
                newest: Option<OffsetDateTime>,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                let mut tx = self.writer().begin_with($begin).await?;
                sqlx::query(
                    "INSERT INTO directory_sync_state (source, watermark, last_success) VALUES ($1, $2, $3) \
                     ON CONFLICT (source) DO UPDATE SET watermark = excluded.watermark, last_success = excluded.last_success",
                )
                .bind(source)
                .bind(newest.map(to_micros))
                .bind(to_micros(now))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn search_services(&self, q: &ServiceQuery) -> Result<(Vec<ServiceHit>, usize), StoreError> {
                let text_fn: fn(&str) -> Option<String> = $text_arg;
                let text = q.text.as_deref().and_then(text_fn);
                let args = SearchArgs::new(q, text);
                let inner = if args.text.is_some() {
                    search_inner($text_join, $text_where, $rank)
                } else {
                    search_inner("", "$1 IS NULL", "0.0")
                };
                let bind = |sql: String| {
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(args.text.clone())
                        .bind(args.active_only)
                        .bind(args.category.clone())
                        .bind(args.term.clone())
                        .bind(args.language.clone())
                        .bind(args.lat)
                        .bind(args.lon)
                        .bind(args.lon_scale)
                        .bind(args.max_d2)
                        .bind(args.min_lat)
                        .bind(args.max_lat)
                        .bind(args.min_lon)
                        .bind(args.max_lon)
                };
                let total: i64 = bind(format!("SELECT COUNT(*) FROM ({inner}) q WHERE {NEAR_FILTER}"))
                    .fetch_one(self.reader())
                    .await?
                    .try_get(0)?;
                let per_page = i64::from(q.per_page.max(1));
                let offset = i64::from(q.page.max(1) - 1) * per_page;
                let rows = bind(format!(
                    "SELECT q.doc, q.active, q.d2 FROM ({inner}) q WHERE {NEAR_FILTER} \
                     ORDER BY q.rank, q.d2, q.name, q.id LIMIT {per_page} OFFSET {offset}"
                ))
                .fetch_all(self.reader())
                .await?;
                let hits = rows
                    .iter()
                    .map(|r| {
                        let doc: String = r.try_get(0)?;
                        let active: i64 = r.try_get(1)?;
                        let d2: Option<f64> = r.try_get(2)?;
                        hit(&doc, active == 1, d2)
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok((hits, usize::try_from(total).unwrap_or(0)))
            }

            async fn directory_service(&self, id: &str) -> Result<Option<(CatalogService, bool)>, StoreError> {
                let row: Option<(String, i64)> =
                    sqlx::query_as("SELECT doc, active FROM directory_services WHERE id = $1")
                        .bind(id)
                        .fetch_optional(self.reader())
                        .await?;
                row.map(|(doc, active)| {
                    serde_json::from_str(&doc).map(|s| (s, active == 1)).map_err(StoreError::CorruptCatalog)
                })
                .transpose()
            }
        }
    };
}

impl_catalog!(
    Sqlite,
    "BEGIN IMMEDIATE",
    "JOIN directory_services_fts ON directory_services_fts.rowid = s.rowid",
    "directory_services_fts MATCH $1",
    "bm25(directory_services_fts, 10.0, 1.0)",
    fts5_query
);
impl_catalog!(
    Postgres,
    "BEGIN",
    "",
    "s.search @@ websearch_to_tsquery('english', $1)",
    "-ts_rank(s.search, websearch_to_tsquery('english', $1))",
    |t: &str| Some(t.trim().to_owned()).filter(|t| !t.is_empty())
);

#[cfg(test)]
mod tests {
    use super::fts5_query;

    #[test]
    fn free_text_becomes_a_safe_fts5_query() {
        assert_eq!(fts5_query("food pant").as_deref(), Some("\"food\" \"pant\"*"));
        assert_eq!(fts5_query("\"; DROP TABLE x; --").as_deref(), Some("\"DROP\" \"TABLE\" \"x\"*"));
        assert_eq!(fts5_query("  ,;  "), None);
    }
}
