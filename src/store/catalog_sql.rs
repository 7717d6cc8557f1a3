//! The [`Catalog`] on sqlx, for SQLite and PostgreSQL. Writes and filters share their SQL; only full-text search
//! differs (FTS5 `MATCH` and `bm25` on SQLite, a generated `tsvector` with `websearch_to_tsquery` and `ts_rank`
//! on PostgreSQL), added by `sqlite_text` / `postgres_text`. A search is built from only the filters it uses, each
//! an `IN` over an index (terms, languages) or a join over the bounding box of the radius (locations), so the
//! most selective one drives the query; the page and the number of matches come from one pass.
//!
//! Distance uses the equirectangular approximation with the cosine of the search latitude computed here, so the
//! SQL needs only arithmetic (SQLite has no trigonometry): within a 100 km radius it is off by well under 1 %.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{Postgres, Row, Sqlite};
use time::OffsetDateTime;

use super::catalog::{Catalog, CatalogChange, CatalogListing, DirectorySyncState, Listed};
use super::sql::SqlStore;
use super::{StoreError, from_micros, to_micros};
use crate::directories::hours::{self, LocalMoment};
use crate::directories::search_text::{self, TextQuery};
use crate::directories::{
    CATEGORY_TAXONOMY, CatalogLocation, CatalogOrganization, CatalogService, ServiceHit, ServiceQuery, Upserted,
};

/// Kilometres per degree of latitude.
pub(crate) const KM_PER_DEGREE: f64 = 111.195;

/// SQLite: words through FTS5 (see [`search_text`]: the words are folded and stemmed by the gateway). Without a
/// radius the matches are a set of their own, ranked by BM25 with the name weighing ten times the description.
/// Within a radius only the services inside it are checked against the matches (a set of rowids, unranked): BM25
/// is no use there, as FTS5 recounts each word's matches over the whole index for every row it scores, and
/// probing FTS5 once per service costs more than the set when the last word is a prefix (FTS5 merges the
/// doclists of every word it may complete, per probe).
fn sqlite_text(sql: &mut SearchSql, text: &TextQuery, near: bool) {
    let expr = text.fts5();
    if near {
        let (p, pn) = (sql.bind(Arg::Text(expr.clone())), sql.bind(Arg::Text(format!("search_name : ({expr})"))));
        let set =
            |q: &str| format!("(SELECT rowid FROM directory_services_fts WHERE directory_services_fts MATCH {q})");
        // On `c`'s key (the rowid), so only the services that match are read.
        sql.text_conditions.push(format!("c.ckey IN {}", set(&p)));
        sql.rank.push(format!("c.ckey NOT IN {}", set(&pn)));
        return;
    }
    let p = sql.bind(Arg::Text(expr));
    // The matches as a set of their own: joined to the services the other way round, SQLite may scan the
    // services and run the MATCH once per row, which is quadratic.
    sql.ctes.push(format!(
        "ft AS MATERIALIZED (SELECT rowid AS fts_rowid, bm25(directory_services_fts, 10.0, 1.0) AS score \
           FROM directory_services_fts WHERE directory_services_fts MATCH {p})"
    ));
    sql.sets.push(("ft", "s.rowid = ft.fts_rowid"));
    sql.rank.push("ft.score".into());
}

/// PostgreSQL: words through the generated `tsvector` (`simple` configuration over the gateway's words; name
/// weighted A, description B). Without a radius, ranked by `ts_rank`; within one, services whose name matches
/// first, as on SQLite.
fn postgres_text(sql: &mut SearchSql, text: &TextQuery, near: bool) {
    let p = sql.bind(Arg::Text(text.tsquery()));
    sql.text_conditions.push(format!("s.search @@ to_tsquery('simple', {p})"));
    if near {
        sql.rank.push(format!("NOT (ts_filter(s.search, '{{a}}') @@ to_tsquery('simple', {p}))"));
    } else {
        sql.rank.push(format!("ts_rank(s.search, to_tsquery('simple', {p})) DESC"));
    }
}

/// Most matches counted when a page lies past the last one.
pub const MAX_COUNTED: i64 = 10_000;

/// A bound value of a search.
enum Arg {
    Text(String),
    Float(f64),
    Int(i64),
}

/// The SQL of one search, built from only the filters it uses (so each can drive its index), with every value
/// bound, never spliced: fragments are fixed text, values become `$n`.
///
/// With a radius, the services inside it that pass every other filter are a materialised set of their own (`c`,
/// a fence both planners respect), and only those are checked against the text: the radius is the smallest set a
/// search has. Without one, the text matches (SQLite) or the filters' indexes drive.
struct SearchSql {
    args: Vec<Arg>,
    /// Materialised subqueries (`name AS MATERIALIZED (…)`), and the recursive taxonomy tree.
    ctes: Vec<String>,
    /// Whether a CTE refers to itself (`WITH RECURSIVE`).
    recursive: bool,
    /// Materialised sets joined to the services, `(name, join condition)`; the first drives the query.
    sets: Vec<(&'static str, &'static str)>,
    /// The join that makes the first set drive: `CROSS JOIN` on SQLite (it fixes the order), `JOIN` elsewhere.
    driving_join: &'static str,
    /// The services' row key carried out of `c` (`rowid` on SQLite: the cheapest join and the FTS5 key).
    row_key: &'static str,
    /// Filters on the service row.
    conditions: Vec<String>,
    /// The text's conditions (applied after the radius, when there is one).
    text_conditions: Vec<String>,
    /// The text's ranking, before distance and name.
    rank: Vec<String>,
    /// Whether a radius drives (`c` is the set of services inside it).
    near: bool,
    /// `open_now`: the search's instant as local weekday and minute in every zone the catalog keeps hours in,
    /// set by the caller before `filters` (reading the zones takes a query).
    open_at: Option<Vec<LocalMoment>>,
}

impl SearchSql {
    fn bind(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }

    /// Everything but the text condition, which differs per backend and is added by the caller first.
    fn new(driving_join: &'static str, row_key: &'static str) -> Self {
        SearchSql {
            args: Vec::new(),
            ctes: Vec::new(),
            recursive: false,
            sets: Vec::new(),
            driving_join,
            row_key,
            conditions: Vec::new(),
            text_conditions: Vec::new(),
            rank: Vec::new(),
            near: false,
            open_at: None,
        }
    }

    /// A filter on a side table keyed by service id: an `IN` over its index when it may drive, a probe per
    /// service when the radius has already narrowed them down (an `IN` would first collect every match).
    fn side_filter(&self, table: &str, condition: &str) -> String {
        if self.near {
            // By the radius set's id, so it is checked before the (wide) service row is read.
            format!("EXISTS (SELECT 1 FROM {table} x WHERE x.service_id = nb.sid AND {condition})")
        } else {
            format!("s.id IN (SELECT service_id FROM {table} x WHERE {condition})")
        }
    }

    fn filters(&mut self, q: &ServiceQuery) {
        self.near = q.near.is_some();
        if !q.include_inactive {
            self.conditions.push("s.active = 1 AND s.status = 'active'".into());
        }
        if let Some(category) = &q.category {
            let p = self.bind(Arg::Text(category.clone()));
            let f = self.side_filter(
                "directory_service_terms",
                &format!("x.code = {p} AND x.taxonomy = '{CATEGORY_TAXONOMY}'"),
            );
            self.conditions.push(f);
        }
        if let Some(term) = &q.taxonomy_term {
            // The term (by code, or by the source's id of it) and every term under it, as each source gave the
            // hierarchy (HSDS `parent_id`): by id, its children are found even when no service carries the term.
            let p = self.bind(Arg::Text(term.clone()));
            self.recursive = true;
            self.ctes.push(format!(
                "tree (source, term_id, taxonomy, code) AS (\
                   SELECT source, term_id, taxonomy, code FROM directory_taxonomy_terms \
                   WHERE code = {p} OR term_id = {p} OR parent_id = {p} \
                   UNION SELECT t.source, t.term_id, t.taxonomy, t.code FROM directory_taxonomy_terms t \
                   JOIN tree ON t.source = tree.source AND t.parent_id = tree.term_id)"
            ));
            let f = self.side_filter(
                "directory_service_terms",
                &format!("(x.code = {p} OR EXISTS (SELECT 1 FROM tree WHERE tree.taxonomy = x.taxonomy AND tree.code = x.code))"),
            );
            self.conditions.push(f);
        }
        if let Some(language) = &q.language {
            let p = self.bind(Arg::Text(language.to_ascii_lowercase()));
            let f = self.side_filter("directory_service_languages", &format!("x.language = {p}"));
            self.conditions.push(f);
        }
        // ---- open_now (directories::hours): an interval holding the instant's local weekday and minute in the
        // interval's zone, one bound branch per zone. No zone at all: nothing can be open.
        if let Some(moments) = self.open_at.take() {
            let mut branches = Vec::new();
            for m in moments {
                let zone = self.bind(Arg::Text(m.zone));
                let day = self.bind(Arg::Int(i64::from(m.day)));
                let minute = self.bind(Arg::Int(i64::from(m.minute)));
                branches.push(format!(
                    "(x.zone = {zone} AND x.day = {day} AND x.opens_min <= {minute} AND x.closes_min > {minute})"
                ));
            }
            let f = if branches.is_empty() {
                "1 = 0".to_owned()
            } else {
                self.side_filter("directory_service_hours", &format!("({})", branches.join(" OR ")))
            };
            self.conditions.push(f);
        }
        // ---- end open_now
        if let Some((lat, lon)) = q.near {
            let scale = lat.to_radians().cos().max(0.01);
            let dlat = q.radius_km / KM_PER_DEGREE;
            let dlon = dlat / scale;
            let (plat, plon, pk) =
                (self.bind(Arg::Float(lat)), self.bind(Arg::Float(lon)), self.bind(Arg::Float(scale)));
            let (lat0, lat1) = (self.bind(Arg::Float(lat - dlat)), self.bind(Arg::Float(lat + dlat)));
            let (lon0, lon1) = (self.bind(Arg::Float(lon - dlon)), self.bind(Arg::Float(lon + dlon)));
            let max = self.bind(Arg::Float(dlat * dlat));
            // Locations inside the bounding box (the geo index), nearest per service, then the exact radius. The
            // box is the smallest set a search has, so it drives.
            self.ctes.push(format!(
                "nb AS MATERIALIZED (SELECT p.service_id AS sid, MIN((p.latitude - {plat}) * (p.latitude - {plat}) \
                   + ({pk} * (p.longitude - {plon})) * ({pk} * (p.longitude - {plon}))) AS d2 \
                   FROM directory_service_points p \
                   WHERE p.latitude BETWEEN {lat0} AND {lat1} AND p.longitude BETWEEN {lon0} AND {lon1} \
                   GROUP BY p.service_id)"
            ));
            self.sets.insert(0, ("nb", "s.id = nb.sid"));
            self.conditions.insert(0, format!("nb.d2 <= {max}"));
        }
    }

    fn where_clause(conditions: &[&String]) -> String {
        if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(" AND "))
        }
    }

    /// `WITH … FROM …`: the driving set, then the services, then the other sets. With a radius, the services
    /// inside it that pass the filters first (`c`), then the text over those alone.
    fn from(&self) -> String {
        let mut ctes = self.ctes.clone();
        let mut from = match self.sets.first() {
            None => "directory_services s".to_owned(),
            Some((name, on)) => format!("{name} {} directory_services s ON {on}", self.driving_join),
        };
        for (name, on) in self.sets.iter().skip(1) {
            from.push_str(&format!(" JOIN {name} ON {on}"));
        }
        let mut conditions: Vec<&String> = self.conditions.iter().collect();
        if self.near {
            ctes.push(format!(
                "c AS MATERIALIZED (SELECT s.{key} AS ckey, nb.d2 AS d2 FROM {from}{})",
                Self::where_clause(&conditions),
                key = self.row_key
            ));
            from = format!("c {} directory_services s ON s.{} = c.ckey", self.driving_join, self.row_key);
            conditions.clear();
        }
        conditions.extend(&self.text_conditions);
        let with = match (ctes.is_empty(), self.recursive) {
            (true, _) => String::new(),
            (false, false) => format!("WITH {} ", ctes.join(", ")),
            (false, true) => format!("WITH RECURSIVE {} ", ctes.join(", ")),
        };
        format!("{with}SELECT {{columns}} FROM {from}{}", Self::where_clause(&conditions))
    }

    /// Best text match first, then nearest, then by name.
    fn order(&self) -> String {
        let mut order = self.rank.clone();
        if self.near {
            order.push("c.d2".into());
        }
        order.extend(["s.name".to_owned(), "s.id".to_owned()]);
        order.join(", ")
    }

    fn count_sql(&self) -> String {
        let inner = self.from().replace("{columns}", "1");
        format!("SELECT COUNT(*) FROM ({inner} LIMIT {MAX_COUNTED}) c")
    }

    /// One page, each row carrying the number of matches in all (one pass instead of a count and a page).
    fn page_sql(&self, limit: i64, offset: i64) -> String {
        let distance = if self.near { "c.d2" } else { "CAST(NULL AS DOUBLE PRECISION)" };
        let columns = format!("s.doc, s.active, {distance} AS d2, COUNT(*) OVER () AS total");
        format!(
            "{} ORDER BY {} LIMIT {limit} OFFSET {offset}",
            self.from().replace("{columns}", &columns),
            self.order()
        )
    }
}

/// The HSDS id of a service: a UUID v5 of its gateway id.
fn public_id(id: &str) -> String {
    crate::directories::publish::public_uuid(id)
}

/// A `LIKE … ESCAPE '\\'` pattern matching `name` anywhere, any case (its `%`, `_` and `\\` taken literally).
fn contains_pattern(name: &str) -> String {
    let escaped = name.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("%{escaped}%")
}

/// The SQL and bound values of a publication listing; fixed fragments, values as `$n`.
fn listing_sql(l: &CatalogListing) -> (String, String, Vec<Arg>) {
    let mut args = Vec::new();
    let mut conditions = Vec::new();
    let bind = |args: &mut Vec<Arg>, a: Arg| {
        args.push(a);
        format!("${}", args.len())
    };
    if !l.include_inactive {
        conditions.push("s.active = 1".to_owned());
    }
    if let Some(id) = &l.id {
        let p = bind(&mut args, Arg::Text(id.clone()));
        conditions.push(format!("s.id = {p}"));
    }
    if let Some(id) = &l.public_id {
        let p = bind(&mut args, Arg::Text(id.clone()));
        conditions.push(format!("s.public_id = {p}"));
    }
    if let Some(name) = &l.name {
        let p = bind(&mut args, Arg::Text(contains_pattern(name)));
        conditions.push(format!("LOWER(s.name) LIKE {p} ESCAPE '\\'"));
    }
    if let Some(term) = &l.term {
        let p = bind(&mut args, Arg::Text(term.clone()));
        conditions.push(format!("s.id IN (SELECT service_id FROM directory_service_terms WHERE code = {p})"));
    }
    if let Some(org) = &l.organization {
        let p = bind(&mut args, Arg::Text(org.clone()));
        conditions.push(format!("s.organization_id = {p}"));
    }
    if let Some(id) = &l.organization_public_id {
        let p = bind(&mut args, Arg::Text(id.clone()));
        conditions.push(format!("s.organization_id IN (SELECT id FROM directory_organizations WHERE public_id = {p})"));
    }
    if let Some(id) = &l.term_public_id {
        let p = bind(&mut args, Arg::Text(id.clone()));
        conditions.push(format!("s.id IN (SELECT service_id FROM directory_service_terms WHERE public_id = {p})"));
    }
    if let Some(loc) = &l.location {
        let p = bind(&mut args, Arg::Text(loc.clone()));
        conditions
            .push(format!("s.id IN (SELECT service_id FROM directory_service_locations WHERE location_id = {p})"));
    }
    if let Some(t) = l.updated_after {
        let p = bind(&mut args, Arg::Int(to_micros(t)));
        conditions.push(format!("s.updated_at > {p}"));
    }
    if let Some(t) = l.updated_before {
        let p = bind(&mut args, Arg::Int(to_micros(t)));
        conditions.push(format!("s.updated_at < {p}"));
    }
    let where_clause =
        if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) };
    let limit = bind(&mut args, Arg::Int(i64::from(l.limit)));
    let offset = bind(&mut args, Arg::Int(i64::from(l.offset)));
    let page = format!(
        "SELECT s.doc, s.active, s.updated_at, COUNT(*) OVER () FROM directory_services s{where_clause} \
         ORDER BY s.id LIMIT {limit} OFFSET {offset}"
    );
    let count = format!("SELECT COUNT(*) FROM directory_services s{where_clause}");
    (page, count, args)
}

/// Decodes one listed document.
fn listed<T: serde::de::DeserializeOwned>(doc: &str, active: bool, updated_at: i64) -> Result<Listed<T>, StoreError> {
    Ok(Listed {
        item: serde_json::from_str(doc).map_err(StoreError::CorruptCatalog)?,
        active,
        updated_at: from_micros(updated_at),
    })
}

/// The SQL of an organisation or location listing.
fn named_sql(table: &str, id: Option<&str>, name: Option<&str>, offset: u32, limit: u32) -> (String, String, Vec<Arg>) {
    let mut args = Vec::new();
    let mut conditions = Vec::new();
    if let Some(id) = id {
        args.push(Arg::Text(id.to_owned()));
        conditions.push(format!("id = ${}", args.len()));
    }
    if let Some(name) = name {
        args.push(Arg::Text(contains_pattern(name)));
        conditions.push(format!("LOWER(name) LIKE ${} ESCAPE '\\'", args.len()));
    }
    let where_clause =
        if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) };
    args.push(Arg::Int(i64::from(limit)));
    let l = args.len();
    args.push(Arg::Int(i64::from(offset)));
    let o = args.len();
    (
        format!(
            "SELECT doc, CAST(1 AS BIGINT), updated_at, COUNT(*) OVER () FROM {table}{where_clause} ORDER BY id LIMIT ${l} OFFSET ${o}"
        ),
        format!("SELECT COUNT(*) FROM {table}{where_clause}"),
        args,
    )
}

/// The words a service is found by: its name and alternate name, and its description (see [`search_text`]).
pub(crate) fn search_words(service: &CatalogService) -> (String, String) {
    let name = match &service.alternate_name {
        Some(alternate) => format!("{} {alternate}", service.name),
        None => service.name.clone(),
    };
    (search_text::index_text(&name), search_text::index_text(&service.description))
}

/// Every language a service is offered in: its own, its locations', and those spoken on its phones.
pub(crate) fn all_languages(service: &CatalogService) -> Vec<String> {
    let phones = service
        .phones
        .iter()
        .chain(service.locations.iter().flat_map(|l| l.phones.iter()))
        .chain(service.locations.iter().flat_map(|l| l.service_at_location.iter().flat_map(|a| a.phones.iter())));
    let mut all: Vec<String> = service
        .languages
        .iter()
        .chain(service.locations.iter().flat_map(|l| l.languages.iter()))
        .chain(phones.flat_map(|p| p.languages.iter()))
        .cloned()
        .collect();
    all.sort();
    all.dedup();
    all
}

pub(crate) fn hit(row_doc: &str, active: bool, d2: Option<f64>) -> Result<ServiceHit, StoreError> {
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

/// Marks a service seen at `$3` (a sync's instant); a sync that started earlier never moves it back, so a
/// deactivation (which spares what was seen after its own start) cannot take a service a later sync saw for
/// vanished.
const SEEN: &str = "UPDATE directory_services SET seen_at = CASE WHEN seen_at < $3 THEN $3 ELSE seen_at END \
                    WHERE source = $1 AND source_id = $2";

macro_rules! impl_catalog {
    ($db:ty, $begin:literal, $driving_join:literal, $row_key:literal, $text:expr) => {
        impl SqlStore<$db> {
            /// Keeps one service in `tx` (the caller commits): organisation, locations, the service, its terms,
            /// languages and hours.
            async fn upsert_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                service: &CatalogService,
                raw: &Value,
                now: i64,
            ) -> Result<Upserted, StoreError> {
                // The HSDS ids: the source's UUIDs unless another row already has them (two sources sharing ids).
                let mut service = service.clone();
                let wanted = service.public_id.take();
                service.public_id =
                    Some(Self::free_public_id(tx, "directory_services", &service.id, wanted).await?);
                if let Some(org) = service.organization.as_mut() {
                    let wanted = org.public_id.take();
                    org.public_id = Some(Self::free_public_id(tx, "directory_organizations", &org.id, wanted).await?);
                }
                let service = &service;
                let doc = serde_json::to_string(service).map_err(StoreError::CorruptCatalog)?;
                let raw = raw.to_string();
                let current: Option<(String, String, i64, i64)> =
                    sqlx::query_as("SELECT doc, raw, active, hours_version FROM directory_services WHERE id = $1")
                        .bind(&service.id)
                        .fetch_optional(&mut **tx)
                        .await?;
                if let Some((old_doc, old_raw, 1, hours_version)) = &current {
                    if *old_doc == doc && *old_raw == raw {
                        sqlx::query(
                            "UPDATE directory_services SET seen_at = CASE WHEN seen_at < $2 THEN $2 ELSE seen_at END, \
                             public_id = COALESCE(public_id, $3), hours_version = $4 WHERE id = $1",
                        )
                        .bind(&service.id)
                        .bind(now)
                        .bind(service.public_id.as_deref())
                        .bind(hours::RULES_VERSION)
                        .execute(&mut **tx)
                        .await?;
                        // Kept before its hours were indexed (or by older rules): index them now.
                        if *hours_version != hours::RULES_VERSION {
                            Self::replace_hours(tx, service).await?;
                            let seq = Self::next_change(tx).await?;
                            sqlx::query("UPDATE directory_services SET change_seq = $2 WHERE id = $1")
                                .bind(&service.id)
                                .bind(seq)
                                .execute(&mut **tx)
                                .await?;
                        }
                        return Ok(Upserted::Unchanged);
                    }
                }
                // The change counter first, before any row of the change is written (one lock order for every
                // writer of the catalog).
                let seq = Self::next_change(tx).await?;
                if let Some(org) = &service.organization {
                    sqlx::query(
                        "INSERT INTO directory_organizations (id, source, source_id, name, doc, updated_at, public_id) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                         doc = excluded.doc, updated_at = excluded.updated_at, public_id = excluded.public_id",
                    )
                    .bind(&org.id)
                    .bind(&service.source)
                    .bind(&org.source_id)
                    .bind(&org.name)
                    .bind(serde_json::to_string(org).map_err(StoreError::CorruptCatalog)?)
                    .bind(now)
                    .bind(org.public_id.as_deref())
                    .execute(&mut **tx)
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
                    // The place alone: what one service says of itself there is not the location's.
                    .bind(
                        serde_json::to_string(&CatalogLocation { service_at_location: None, ..l.clone() })
                            .map_err(StoreError::CorruptCatalog)?,
                    )
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
                let (search_name, search_body) = search_words(service);
                sqlx::query(
                    "INSERT INTO directory_services (id, source, source_id, name, description, status, organization_id, \
                     active, vanished_at, doc, raw, source_modified, seen_at, updated_at, public_id, hours_version, \
                     alternate_name, search_name, search_body, search_version, change_seq) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, NULL, $8, $9, $10, $11, $11, $12, $13, $14, $15, $16, $17, \
                     $18) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, description = excluded.description, \
                     status = excluded.status, organization_id = excluded.organization_id, active = 1, \
                     vanished_at = NULL, doc = excluded.doc, raw = excluded.raw, \
                     source_modified = excluded.source_modified, \
                     seen_at = CASE WHEN directory_services.seen_at < excluded.seen_at THEN excluded.seen_at \
                     ELSE directory_services.seen_at END, \
                     updated_at = excluded.updated_at, public_id = excluded.public_id, \
                     hours_version = excluded.hours_version, alternate_name = excluded.alternate_name, \
                     search_name = excluded.search_name, search_body = excluded.search_body, \
                     search_version = excluded.search_version, change_seq = excluded.change_seq",
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
                .bind(service.public_id.as_deref())
                .bind(hours::RULES_VERSION)
                .bind(service.alternate_name.as_deref())
                .bind(search_name)
                .bind(search_body)
                .bind(search_text::RULES_VERSION)
                .bind(seq)
                .execute(&mut **tx)
                .await?;
                for table in [
                    "directory_service_locations",
                    "directory_service_points",
                    "directory_service_terms",
                    "directory_service_languages",
                ] {
                    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE service_id = $1")))
                        .bind(&service.id)
                        .execute(&mut **tx)
                        .await?;
                }
                for l in &service.locations {
                    sqlx::query("INSERT INTO directory_service_locations (service_id, location_id) VALUES ($1, $2)")
                        .bind(&service.id)
                        .bind(&l.id)
                        .execute(&mut **tx)
                        .await?;
                }
                for l in &service.locations {
                    if let (Some(lat), Some(lon)) = (l.latitude, l.longitude) {
                        sqlx::query(
                            "INSERT INTO directory_service_points (service_id, latitude, longitude) VALUES ($1, $2, $3)",
                        )
                        .bind(&service.id)
                        .bind(lat)
                        .bind(lon)
                        .execute(&mut **tx)
                        .await?;
                    }
                }
                for t in &service.terms {
                    sqlx::query(
                        "INSERT INTO directory_service_terms (service_id, taxonomy, code, name, public_id) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(&service.id)
                    .bind(&t.taxonomy)
                    .bind(&t.code)
                    .bind(&t.name)
                    .bind(crate::directories::publish::term_uuid(t))
                    .execute(&mut **tx)
                    .await?;
                    if let Some(term_id) = &t.id {
                        sqlx::query(
                            "INSERT INTO directory_taxonomy_terms (source, term_id, taxonomy, code, parent_id) \
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (source, term_id) DO UPDATE SET \
                             taxonomy = excluded.taxonomy, code = excluded.code, parent_id = excluded.parent_id",
                        )
                        .bind(&service.source)
                        .bind(term_id)
                        .bind(&t.taxonomy)
                        .bind(&t.code)
                        .bind(t.parent_id.as_deref())
                        .execute(&mut **tx)
                        .await?;
                    }
                }
                for language in &all_languages(service) {
                    sqlx::query("INSERT INTO directory_service_languages (service_id, language) VALUES ($1, $2)")
                        .bind(&service.id)
                        .bind(language)
                        .execute(&mut **tx)
                        .await?;
                }
                Self::replace_hours(tx, service).await?;
                Ok(if current.is_some() { Upserted::Updated } else { Upserted::Added })
            }

            /// The next number of the catalog's change counter, in `tx`: the counter row stays locked until `tx`
            /// ends, so changes commit in the order of their numbers (see migration 0012).
            async fn next_change(tx: &mut sqlx::Transaction<'_, $db>) -> Result<i64, StoreError> {
                let (seq,): (i64,) = sqlx::query_as(
                    "UPDATE directory_catalog_version SET seq = seq + 1 WHERE id = 1 RETURNING seq",
                )
                .fetch_one(&mut **tx)
                .await?;
                Ok(seq)
            }

            /// The HSDS id row `id` of `table` is published under: `wanted` (the source's UUID) unless another row
            /// has it, else a UUID v5 of the gateway id.
            async fn free_public_id(
                tx: &mut sqlx::Transaction<'_, $db>,
                table: &str,
                id: &str,
                wanted: Option<String>,
            ) -> Result<String, StoreError> {
                let Some(wanted) = wanted else { return Ok(public_id(id)) };
                let taken: Option<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM {table} WHERE public_id = $1 AND id <> $2"
                )))
                .bind(&wanted)
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
                Ok(if taken.is_some() { public_id(id) } else { wanted })
            }

            /// Replaces a service's opening-hour intervals and notes their zones, in the upsert's transaction (the
            /// caller records `hours::RULES_VERSION` on the service row with its other columns).
            async fn replace_hours(
                tx: &mut sqlx::Transaction<'_, $db>,
                service: &CatalogService,
            ) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM directory_service_hours WHERE service_id = $1")
                    .bind(&service.id)
                    .execute(&mut **tx)
                    .await?;
                let intervals = hours::weekly_intervals(service);
                for i in &intervals {
                    sqlx::query(
                        "INSERT INTO directory_service_hours (service_id, zone, day, opens_min, closes_min) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(&service.id)
                    .bind(&i.zone)
                    .bind(i64::from(i.day))
                    .bind(i64::from(i.opens_min))
                    .bind(i64::from(i.closes_min))
                    .execute(&mut **tx)
                    .await?;
                }
                let mut zones: Vec<&str> = intervals.iter().map(|i| i.zone.as_str()).collect();
                zones.dedup();
                for zone in zones {
                    sqlx::query("INSERT INTO directory_time_zones (zone) VALUES ($1) ON CONFLICT (zone) DO NOTHING")
                        .bind(zone)
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            }

            /// Runs a listing: its page of `(doc, active, updated_at)` and the number of matches.
            async fn listing_rows(
                &self,
                page: String,
                count: String,
                args: &[Arg],
                offset: u32,
            ) -> Result<(Vec<(String, bool, i64)>, usize), StoreError> {
                let bound = |text: String, args: &[Arg]| {
                    args.iter().fold(sqlx::query(sqlx::AssertSqlSafe(text)), |query, arg| match arg {
                        Arg::Text(t) => query.bind(t.clone()),
                        Arg::Float(f) => query.bind(*f),
                        Arg::Int(i) => query.bind(*i),
                    })
                };
                let rows = bound(page, args).fetch_all(self.reader()).await?;
                let mut total: i64 = match rows.first() {
                    Some(row) => row.try_get(3)?,
                    None => 0,
                };
                if rows.is_empty() && offset > 0 {
                    // The count takes every value but the page's limit and offset (bound last).
                    let filters = &args[..args.len().saturating_sub(2)];
                    total = bound(count, filters).fetch_one(self.reader()).await?.try_get(0)?;
                }
                let out = rows
                    .iter()
                    .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? == 1, r.try_get::<i64, _>(2)?)))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok((out, usize::try_from(total).unwrap_or(0)))
            }
        }

        #[async_trait]
        impl Catalog for SqlStore<$db> {
            async fn upsert_directory_service(
                &self,
                service: &CatalogService,
                raw: &Value,
                now: OffsetDateTime,
            ) -> Result<Upserted, StoreError> {
                let mut tx = self.writer().begin_with($begin).await?;
                let done = Self::upsert_in(&mut tx, service, raw, to_micros(now)).await?;
                tx.commit().await?;
                Ok(done)
            }

            async fn upsert_directory_services(
                &self,
                batch: &[(CatalogService, &Value)],
                now: OffsetDateTime,
            ) -> Result<Vec<Upserted>, StoreError> {
                let now = to_micros(now);
                let mut tx = self.writer().begin_with($begin).await?;
                let mut done = Vec::with_capacity(batch.len());
                for (service, raw) in batch {
                    done.push(Self::upsert_in(&mut tx, service, raw, now).await?);
                }
                tx.commit().await?;
                Ok(done)
            }

            async fn fill_public_ids(&self) -> Result<usize, StoreError> {
                const BATCH: i64 = 1000;
                let mut filled = 0;
                // Table by table, a batch per transaction until none is left without its UUID: the one the kept
                // document names (the source's), else a UUID v5 of the gateway id.
                for table in ["directory_services", "directory_organizations"] {
                    loop {
                        let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "SELECT id, doc FROM {table} WHERE public_id IS NULL LIMIT {BATCH}"
                        )))
                        .fetch_all(self.writer())
                        .await?;
                        if rows.is_empty() {
                            break;
                        }
                        let mut tx = self.writer().begin_with($begin).await?;
                        for (id, doc) in &rows {
                            let wanted = serde_json::from_str::<Value>(doc)
                                .ok()
                                .and_then(|d| d.get("public_id").and_then(Value::as_str).map(str::to_owned));
                            let chosen = Self::free_public_id(&mut tx, table, id, wanted).await?;
                            sqlx::query(sqlx::AssertSqlSafe(format!(
                                "UPDATE {table} SET public_id = $2 WHERE id = $1 AND public_id IS NULL"
                            )))
                            .bind(id)
                            .bind(chosen)
                            .execute(&mut *tx)
                            .await?;
                        }
                        tx.commit().await?;
                        filled += rows.len();
                    }
                }
                // Terms by their service's document (a term's UUID may be the source's).
                loop {
                    let services: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT s.id, s.doc FROM directory_services s WHERE s.id IN \
                         (SELECT service_id FROM directory_service_terms WHERE public_id IS NULL) LIMIT {BATCH}"
                    )))
                    .fetch_all(self.writer())
                    .await?;
                    if services.is_empty() {
                        break;
                    }
                    let mut tx = self.writer().begin_with($begin).await?;
                    for (id, doc) in &services {
                        let service: CatalogService = serde_json::from_str(doc).map_err(StoreError::CorruptCatalog)?;
                        for t in &service.terms {
                            let done = sqlx::query(
                                "UPDATE directory_service_terms SET public_id = $4 \
                                 WHERE service_id = $1 AND taxonomy = $2 AND code = $3 AND public_id IS NULL",
                            )
                            .bind(id)
                            .bind(&t.taxonomy)
                            .bind(&t.code)
                            .bind(crate::directories::publish::term_uuid(t))
                            .execute(&mut *tx)
                            .await?;
                            filled += usize::try_from(done.rows_affected()).unwrap_or(0);
                        }
                        // Rows the document does not name: the UUID v5 of `taxonomy|code`, so none is left behind.
                        let rest: Vec<(String, String)> = sqlx::query_as(
                            "SELECT taxonomy, code FROM directory_service_terms WHERE service_id = $1 AND public_id IS NULL",
                        )
                        .bind(id)
                        .fetch_all(&mut *tx)
                        .await?;
                        for (taxonomy, code) in &rest {
                            sqlx::query(
                                "UPDATE directory_service_terms SET public_id = $4 \
                                 WHERE service_id = $1 AND taxonomy = $2 AND code = $3",
                            )
                            .bind(id)
                            .bind(taxonomy)
                            .bind(code)
                            .bind(crate::directories::publish::term_public_uuid(taxonomy, code))
                            .execute(&mut *tx)
                            .await?;
                            filled += 1;
                        }
                    }
                    tx.commit().await?;
                }
                Ok(filled)
            }

            async fn reindex_search_words(&self) -> Result<usize, StoreError> {
                const BATCH: i64 = 500;
                let mut done = 0;
                loop {
                    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT id, doc FROM directory_services WHERE search_version <> {} LIMIT {BATCH}",
                        search_text::RULES_VERSION
                    )))
                    .fetch_all(self.writer())
                    .await?;
                    if rows.is_empty() {
                        break;
                    }
                    let mut tx = self.writer().begin_with($begin).await?;
                    for (id, doc) in &rows {
                        let service: CatalogService = serde_json::from_str(doc).map_err(StoreError::CorruptCatalog)?;
                        let (name, body) = search_words(&service);
                        sqlx::query(
                            "UPDATE directory_services SET search_name = $2, search_body = $3, search_version = $4, \
                             alternate_name = $5 WHERE id = $1",
                        )
                        .bind(id)
                        .bind(name)
                        .bind(body)
                        .bind(search_text::RULES_VERSION)
                        .bind(service.alternate_name.as_deref())
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    done += rows.len();
                }
                Ok(done)
            }

            async fn active_directory_services(
                &self,
                source: &str,
            ) -> Result<Vec<(String, Option<OffsetDateTime>)>, StoreError> {
                let rows: Vec<(String, Option<i64>)> = sqlx::query_as(
                    "SELECT source_id, source_modified FROM directory_services WHERE source = $1 AND active = 1",
                )
                .bind(source)
                .fetch_all(self.reader())
                .await?;
                Ok(rows.into_iter().map(|(id, modified)| (id, modified.map(from_micros))).collect())
            }

            async fn deactivate_directory_services(
                &self,
                source: &str,
                source_ids: &[String],
                now: OffsetDateTime,
            ) -> Result<usize, StoreError> {
                let now = to_micros(now);
                if source_ids.is_empty() {
                    return Ok(0);
                }
                let mut tx = self.writer().begin_with($begin).await?;
                let seq = Self::next_change(&mut tx).await?;
                let mut done = 0;
                for id in source_ids {
                    let row = sqlx::query(
                        "UPDATE directory_services SET active = 0, vanished_at = $3, updated_at = $3, change_seq = $4 \
                         WHERE source = $1 AND source_id = $2 AND active = 1 AND seen_at <= $3",
                    )
                    .bind(source)
                    .bind(id)
                    .bind(now)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                    done += usize::try_from(row.rows_affected()).unwrap_or(0);
                }
                tx.commit().await?;
                Ok(done)
            }

            async fn mark_directory_services_seen(
                &self,
                source: &str,
                source_ids: &[String],
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                let now = to_micros(now);
                let mut tx = self.writer().begin_with($begin).await?;
                for id in source_ids {
                    sqlx::query(SEEN)
                        .bind(source)
                        .bind(id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn mark_directory_service_seen(
                &self,
                source: &str,
                source_id: &str,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                let mut tx = self.writer().begin_with($begin).await?;
                sqlx::query(SEEN)
                    .bind(source)
                    .bind(source_id)
                    .bind(to_micros(now))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn directory_last_success(&self, source: &str) -> Result<Option<OffsetDateTime>, StoreError> {
                let row: Option<(i64,)> =
                    sqlx::query_as("SELECT last_success FROM directory_sync_state WHERE source = $1")
                        .bind(source)
                        .fetch_optional(self.reader())
                        .await?;
                Ok(row.map(|(t,)| from_micros(t)))
            }

            async fn directory_watermark(&self, source: &str) -> Result<Option<OffsetDateTime>, StoreError> {
                let row: Option<(Option<i64>,)> =
                    sqlx::query_as("SELECT watermark FROM directory_sync_state WHERE source = $1")
                        .bind(source)
                        .fetch_optional(self.reader())
                        .await?;
                Ok(row.and_then(|(w,)| w).map(from_micros))
            }

            async fn directory_sync_state(&self, source: &str) -> Result<Option<DirectorySyncState>, StoreError> {
                type Row = (Option<i64>, i64, Option<i64>, Option<i64>, Option<String>);
                let row: Option<Row> = sqlx::query_as(
                    "SELECT watermark, last_success, complete_count, complete_at, detail \
                     FROM directory_sync_state WHERE source = $1",
                )
                .bind(source)
                .fetch_optional(self.reader())
                .await?;
                Ok(row.map(|(watermark, last_success, count, at, detail)| DirectorySyncState {
                    watermark: watermark.map(from_micros),
                    last_success: Some(from_micros(last_success)),
                    complete_count: count.and_then(|c| u64::try_from(c).ok()),
                    complete_at: at.map(from_micros),
                    detail,
                }))
            }

            async fn record_directory_sync(
                &self,
                source: &str,
                sync: &DirectorySyncState,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                let now = to_micros(now);
                let mut tx = self.writer().begin_with($begin).await?;
                sqlx::query(
                    "INSERT INTO directory_sync_state (source, watermark, last_success, complete_count, complete_at, detail) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (source) DO UPDATE SET watermark = excluded.watermark, \
                     last_success = excluded.last_success, \
                     complete_count = COALESCE(excluded.complete_count, directory_sync_state.complete_count), \
                     complete_at = COALESCE(excluded.complete_at, directory_sync_state.complete_at), \
                     detail = COALESCE(excluded.detail, directory_sync_state.detail)",
                )
                .bind(source)
                .bind(sync.watermark.map(to_micros))
                .bind(now)
                .bind(sync.complete_count.and_then(|c| i64::try_from(c).ok()))
                .bind(sync.complete_at.map(to_micros))
                .bind(sync.detail.as_deref())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn search_services(&self, q: &ServiceQuery) -> Result<(Vec<ServiceHit>, usize), StoreError> {
                let mut sql = SearchSql::new($driving_join, $row_key);
                // open_now: the instant in the local time of every zone with hours (computed here, bound in SQL).
                if let Some(at) = q.open_at {
                    let zones: Vec<(String,)> = sqlx::query_as("SELECT zone FROM directory_time_zones ORDER BY zone")
                        .fetch_all(self.reader())
                        .await?;
                    sql.open_at = Some(zones.iter().filter_map(|(zone,)| hours::local_moment(zone, at)).collect());
                }
                sql.filters(q);
                if let Some(text) = &q.text {
                    match TextQuery::parse(text) {
                        Some(words) => {
                            let add_text: fn(&mut SearchSql, &TextQuery, bool) = $text;
                            add_text(&mut sql, &words, q.near.is_some());
                        }
                        // No word to look for finds nothing, never everything (the API refuses such a `q`).
                        None => return Ok((Vec::new(), 0)),
                    }
                }
                let bound = |text: String| {
                    sql.args.iter().fold(sqlx::query(sqlx::AssertSqlSafe(text)), |query, arg| match arg {
                        Arg::Text(t) => query.bind(t.clone()),
                        Arg::Float(f) => query.bind(*f),
                        Arg::Int(i) => query.bind(*i),
                    })
                };
                let per_page = i64::from(q.per_page.max(1));
                let offset = i64::from(q.page.max(1) - 1) * per_page;
                let rows = bound(sql.page_sql(per_page, offset)).fetch_all(self.reader()).await?;
                let mut total: i64 = match rows.first() {
                    Some(row) => row.try_get(3)?,
                    None => 0,
                };
                if rows.is_empty() && offset > 0 {
                    // Past the last page: the total still says how many there are.
                    total = bound(sql.count_sql()).fetch_one(self.reader()).await?.try_get(0)?;
                }
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

            async fn list_services(
                &self,
                listing: &CatalogListing,
            ) -> Result<(Vec<Listed<CatalogService>>, usize), StoreError> {
                let (page, count, args) = listing_sql(listing);
                let rows = self.listing_rows(page, count, &args, listing.offset).await?;
                Ok((rows.0.iter().map(|(d, a, u)| listed(d, *a, *u)).collect::<Result<_, _>>()?, rows.1))
            }

            async fn list_organizations(
                &self,
                id: Option<&str>,
                name: Option<&str>,
                offset: u32,
                limit: u32,
            ) -> Result<(Vec<Listed<CatalogOrganization>>, usize), StoreError> {
                let (page, count, args) = named_sql("directory_organizations", id, name, offset, limit);
                let rows = self.listing_rows(page, count, &args, offset).await?;
                Ok((rows.0.iter().map(|(d, a, u)| listed(d, *a, *u)).collect::<Result<_, _>>()?, rows.1))
            }

            async fn list_locations(
                &self,
                id: Option<&str>,
                name: Option<&str>,
                offset: u32,
                limit: u32,
            ) -> Result<(Vec<Listed<CatalogLocation>>, usize), StoreError> {
                let (page, count, args) = named_sql("directory_locations", id, name, offset, limit);
                let rows = self.listing_rows(page, count, &args, offset).await?;
                Ok((rows.0.iter().map(|(d, a, u)| listed(d, *a, *u)).collect::<Result<_, _>>()?, rows.1))
            }

            async fn catalog_version(&self) -> Result<i64, StoreError> {
                let (seq,): (i64,) = sqlx::query_as("SELECT seq FROM directory_catalog_version WHERE id = 1")
                    .fetch_one(self.reader())
                    .await?;
                Ok(seq)
            }

            async fn catalog_changes(
                &self,
                after: (i64, &str),
                upto: i64,
                limit: u32,
            ) -> Result<Vec<CatalogChange>, StoreError> {
                let rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
                    "SELECT change_seq, id, doc, active FROM directory_services \
                     WHERE (change_seq > $1 OR (change_seq = $1 AND id > $2)) AND change_seq <= $3 \
                     ORDER BY change_seq, id LIMIT $4",
                )
                .bind(after.0)
                .bind(after.1)
                .bind(upto)
                .bind(i64::from(limit))
                .fetch_all(self.reader())
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(seq, id, doc, active)| CatalogChange { seq, id, doc, active: active == 1 })
                    .collect())
            }

            async fn service_docs(&self, ids: &[String]) -> Result<Vec<(String, String, bool)>, StoreError> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
                let sql = format!("SELECT id, doc, active FROM directory_services WHERE id IN ({})", marks.join(", "));
                let rows: Vec<(String, String, i64)> = ids
                    .iter()
                    .fold(sqlx::query_as(sqlx::AssertSqlSafe(sql)), |q, id| q.bind(id))
                    .fetch_all(self.reader())
                    .await?;
                Ok(rows.into_iter().map(|(id, doc, active)| (id, doc, active == 1)).collect())
            }

            async fn taxonomy_subtree(&self, term: &str) -> Result<Vec<(String, String)>, StoreError> {
                Ok(sqlx::query_as(
                    "WITH RECURSIVE tree (source, term_id, taxonomy, code) AS (\
                       SELECT source, term_id, taxonomy, code FROM directory_taxonomy_terms \
                       WHERE code = $1 OR term_id = $1 OR parent_id = $1 \
                       UNION SELECT t.source, t.term_id, t.taxonomy, t.code FROM directory_taxonomy_terms t \
                       JOIN tree ON t.source = tree.source AND t.parent_id = tree.term_id) \
                     SELECT DISTINCT taxonomy, code FROM tree",
                )
                .bind(term)
                .fetch_all(self.reader())
                .await?)
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

impl_catalog!(Sqlite, "BEGIN IMMEDIATE", "CROSS JOIN", "rowid", sqlite_text);
impl_catalog!(Postgres, "BEGIN", "JOIN", "id", postgres_text);
