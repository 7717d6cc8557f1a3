//! The catalog's search index, one per gateway, in memory: the store stays the source of truth, the index is built
//! from it at start and brought up to date before each search.
//!
//! Text goes through [`tantivy`] (BM25, the name weighing ten times the description, as FTS5 does), on the words
//! [`search_text`] makes, so both engines find the same services; the filters are terms of the same documents
//! (active, taxonomy terms and agency categories, languages), so a search with text and filters but no place or
//! time keeps only its page (top-k with pruning) instead of ranking every match. Radius and open-now are checked
//! here on what each service's locations and hours say, kept beside the index, after tantivy narrowed the set.
//!
//! Keeping current: every catalog write that changes what a search may find takes the next number of the
//! catalog's change counter in its transaction and stamps the service with it (migration 0012). Before a search
//! the index reads the counter (one indexed row); when it moved, it reads the services stamped after what it has
//! read, in change order, and indexes them again. Replicas on one PostgreSQL database each keep their own index
//! and each catches up by itself. Until the first build is done, searches go to the SQL path (same results,
//! slower).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tantivy::collector::{Collector, Count, SegmentCollector, TopDocs};
use tantivy::columnar::Column;
use tantivy::query::{AllQuery, BooleanQuery, BoostQuery, Occur, Query, RegexQuery, TermQuery};
use tantivy::schema::{FAST, Field, INDEXED, IndexRecordOption, STRING, Schema, TextFieldIndexing, TextOptions};
use tantivy::{DocId, Index, IndexReader, IndexWriter, ReloadPolicy, Score, SegmentReader, TantivyDocument, Term};
use time::OffsetDateTime;

use super::hours;
use super::search_text::TextQuery;
use super::{CATEGORY_TAXONOMY, CatalogService, ServiceHit, ServiceQuery};
use crate::store::catalog_sql::{KM_PER_DEGREE, MAX_COUNTED, all_languages, hit, search_words};
use crate::store::{Store, StoreError};

/// Services read from the store per query while catching up.
const CHANGES_PAGE: u32 = 2_000;

/// The index writer's memory: one indexing thread, flushed to a segment when full.
const WRITER_BYTES: usize = 50_000_000;

/// Weight of a name match against a description match (FTS5's `bm25(…, 10.0, 1.0)`).
const NAME_BOOST: Score = 10.0;

/// Separates the parts of a filter term (never in a code or language the catalog keeps as one).
const SEP: char = '\u{1f}';

struct Fields {
    key: Field,
    name: Field,
    body: Field,
    tag: Field,
}

/// What a search checks beside the index: where a service is and when it is open.
struct Entry {
    id: String,
    name: String,
    /// Kept active by its source and in the catalog (the `active` term of its document).
    active: bool,
    points: Vec<(f64, f64)>,
    /// Opening intervals, packed (a search may check every service's).
    hours: Box<[Opening]>,
}

/// An opening interval of [`hours::weekly_intervals`], its zone by number in [`Entries::zones`].
#[derive(Clone, Copy)]
struct Opening {
    zone: u16,
    day: u8,
    opens: u16,
    closes: u16,
}

impl Opening {
    /// Whether it is open at this local weekday and minute of its zone.
    fn holds(self, day: i32, minute: i32) -> bool {
        i32::from(self.day) == day && i32::from(self.opens) <= minute && i32::from(self.closes) > minute
    }
}

#[derive(Default)]
struct Entries {
    /// By index key.
    by_key: Vec<Option<Entry>>,
    /// Index key by service id.
    keys: HashMap<String, u64>,
    /// Every zone a service keeps hours in, numbered in the order first seen.
    zones: Vec<String>,
    /// Each key's place in [`Entries::order`].
    rank: Vec<u32>,
    /// The keys of the indexed services in (name, id) order, as of the last catch-up.
    order: Vec<u64>,
    /// The keys indexed again since the order was last made.
    dirty: Vec<u64>,
    /// The keys of the services with a location in each cell of [`CELL_DEGREES`] (a radius search without a term
    /// filter measures the services of the cells its box covers, not every service).
    cells: HashMap<(i32, i32), Vec<u64>>,
}

/// The side of a cell of [`Entries::cells`], in degrees of latitude and of longitude (about 11 km north–south).
const CELL_DEGREES: f64 = 0.1;

/// A radius whose box covers more cells than this walks every service instead.
const MAX_CELLS: i64 = 4_096;

fn cell_of(lat: f64, lon: f64) -> (i32, i32) {
    // Latitudes and longitudes are bounded (±90, ±180), so the cell numbers fit.
    #[allow(clippy::cast_possible_truncation)]
    ((lat / CELL_DEGREES).floor() as i32, (lon / CELL_DEGREES).floor() as i32)
}

impl Entries {
    fn unplace(&mut self, key: u64) {
        let Some(Some(old)) = self.by_key.get(key as usize) else { return };
        let cells: Vec<(i32, i32)> = old.points.iter().map(|&(la, lo)| cell_of(la, lo)).collect();
        for c in cells {
            if let Some(keys) = self.cells.get_mut(&c) {
                keys.retain(|&k| k != key);
                if keys.is_empty() {
                    self.cells.remove(&c);
                }
            }
        }
    }

    fn place(&mut self, key: u64, points: &[(f64, f64)]) {
        let mut cells: Vec<(i32, i32)> = points.iter().map(|&(la, lo)| cell_of(la, lo)).collect();
        cells.sort_unstable();
        cells.dedup();
        for c in cells {
            self.cells.entry(c).or_default().push(key);
        }
    }

    /// The keys of the services with a location in the cells `near`'s box covers, each once; `None` when the box
    /// covers too many cells to be worth it.
    fn in_box(&self, near: &Near) -> Option<Vec<u64>> {
        let (south, west) = cell_of(near.box_lat.0, near.box_lon.0);
        let (north, east) = cell_of(near.box_lat.1, near.box_lon.1);
        let count = (i64::from(north) - i64::from(south) + 1) * (i64::from(east) - i64::from(west) + 1);
        if count > MAX_CELLS {
            return None;
        }
        let mut keys = Vec::new();
        for la in south..=north {
            for lo in west..=east {
                if let Some(k) = self.cells.get(&(la, lo)) {
                    keys.extend_from_slice(k);
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Some(keys)
    }
}

/// What [`ServiceIndex::apply`] takes from a kept service before it locks the index.
struct Parsed {
    name: String,
    name_words: String,
    body_words: String,
    active: bool,
    /// Taxonomy, code and language terms.
    tags: Vec<String>,
    intervals: Vec<hours::OpeningInterval>,
    points: Vec<(f64, f64)>,
}

impl Parsed {
    fn of(service: CatalogService) -> Self {
        let (name_words, body_words) = search_words(&service);
        let mut tags = Vec::new();
        for t in &service.terms {
            tags.push(tag(&["term", &t.taxonomy, &t.code]));
            tags.push(tag(&["code", &t.code]));
        }
        for language in all_languages(&service) {
            tags.push(tag(&["lang", &language]));
        }
        let intervals = hours::weekly_intervals(&service);
        let points = service.locations.iter().filter_map(|l| Some((l.latitude?, l.longitude?))).collect();
        Parsed {
            active: service.status == "active",
            name: service.name,
            name_words,
            body_words,
            tags,
            intervals,
            points,
        }
    }
}

/// The opening terms of a service's hours: for each (zone, weekday, hour) an opening touches, a `whole` term when
/// some opening covers the whole hour (open at every minute of it: a search needs no other check), else an `open`
/// term (open at some minute: the minute is checked on the service's own intervals).
fn open_terms(hours: &[Opening], zones: &[String]) -> Vec<String> {
    let mut hours_touched: Vec<(u16, u8, u16, bool)> = Vec::new();
    for o in hours {
        for hour in (o.opens / 60)..=(o.closes.saturating_sub(1) / 60) {
            let whole = o.opens <= hour * 60 && o.closes >= (hour + 1) * 60;
            hours_touched.push((o.zone, o.day, hour, whole));
        }
    }
    // Sorted with the whole ones last in each hour, so the last of each run says whether any is whole.
    hours_touched.sort_unstable();
    let mut out = Vec::new();
    for (i, &(zone, day, hour, whole)) in hours_touched.iter().enumerate() {
        if hours_touched.get(i + 1).is_some_and(|&(z, d, h, _)| (z, d, h) == (zone, day, hour)) {
            continue;
        }
        let zone = &zones[usize::from(zone)];
        out.push(if whole {
            whole_tag(zone, i32::from(day), i32::from(hour))
        } else {
            open_tag(zone, i32::from(day), i32::from(hour))
        });
    }
    out
}

/// How far the index has read the catalog's changes: `(change_seq, id)` of the last service read.
struct Position {
    seq: i64,
    id: String,
}

/// The in-memory search index of the catalog.
pub struct ServiceIndex {
    reader: IndexReader,
    fields: Fields,
    writer: Mutex<IndexWriter>,
    entries: RwLock<Entries>,
    position: tokio::sync::Mutex<Position>,
    /// The change counter the index is current with; -1 until it is built.
    version: AtomicI64,
}

fn tag(parts: &[&str]) -> String {
    parts.join(&SEP.to_string())
}

/// The term of a service open at some minute of `hour` on `day` (0 = Monday) in `zone`, not at all of them.
fn open_tag(zone: &str, day: i32, hour: i32) -> String {
    tag(&["open", zone, &day.to_string(), &hour.to_string()])
}

/// The term of a service open at every minute of `hour` on `day` (0 = Monday) in `zone`.
fn whole_tag(zone: &str, day: i32, hour: i32) -> String {
    tag(&["whole", zone, &day.to_string(), &hour.to_string()])
}

fn index_error(e: tantivy::TantivyError) -> StoreError {
    StoreError::Index(e.to_string())
}

impl ServiceIndex {
    /// An empty index, not built yet.
    ///
    /// # Errors
    /// When tantivy cannot create its writer.
    pub fn new() -> Result<Arc<Self>, StoreError> {
        let mut schema = Schema::builder();
        let words = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default().set_tokenizer("whitespace").set_index_option(IndexRecordOption::WithFreqs),
        );
        let fields = Fields {
            key: schema.add_u64_field("key", FAST | INDEXED),
            name: schema.add_text_field("name", words.clone()),
            body: schema.add_text_field("body", words),
            tag: schema.add_text_field("tag", STRING),
        };
        let index = Index::create_in_ram(schema.build());
        let writer = index.writer_with_num_threads(1, WRITER_BYTES).map_err(index_error)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(index_error)?;
        Ok(Arc::new(ServiceIndex {
            reader,
            fields,
            writer: Mutex::new(writer),
            entries: RwLock::new(Entries::default()),
            position: tokio::sync::Mutex::new(Position { seq: -1, id: String::new() }),
            version: AtomicI64::new(-1),
        }))
    }

    /// Whether the first build is done (searches may use the index).
    #[must_use]
    pub fn is_built(&self) -> bool {
        self.version.load(Ordering::Acquire) >= 0
    }

    /// Services in the index.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.read().map_or(0, |e| e.keys.len())
    }

    /// Whether the index holds no service.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the catalog's changes since the last call and indexes them; the first call builds the index.
    ///
    /// # Errors
    /// When the store cannot be read or tantivy fails.
    pub async fn catch_up(self: &Arc<Self>, store: &dyn Store) -> Result<(), StoreError> {
        let current = store.catalog_version().await?;
        if self.version.load(Ordering::Acquire) >= current {
            return Ok(());
        }
        let mut position = self.position.lock().await;
        if self.version.load(Ordering::Acquire) >= current {
            return Ok(());
        }
        let started = Instant::now();
        let mut read = 0;
        loop {
            let rows = store.catalog_changes((position.seq, &position.id), current, CHANGES_PAGE).await?;
            let Some(last) = rows.last() else { break };
            *position = Position { seq: last.seq, id: last.id.clone() };
            read += rows.len();
            let full = rows.len() == CHANGES_PAGE as usize;
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.apply(rows))
                .await
                .map_err(|e| StoreError::Index(e.to_string()))??;
            if !full {
                break;
            }
        }
        if read > 0 {
            let me = self.clone();
            tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                me.rank()?;
                me.writer
                    .lock()
                    .map_err(|_| StoreError::Index("the index writer is poisoned".into()))?
                    .commit()
                    .map_err(index_error)?;
                me.reader.reload().map_err(index_error)
            })
            .await
            .map_err(|e| StoreError::Index(e.to_string()))??;
        }
        let first = self.version.swap(current, Ordering::AcqRel) < 0;
        if first || read > 100 {
            tracing::info!(
                services = self.len(),
                read,
                version = current,
                ms = started.elapsed().as_millis() as u64,
                "The directory search index is current."
            );
        }
        Ok(())
    }

    /// Keeps every service's place in (name, id) order, so a search sorts by a number: the services indexed since
    /// the last call leave the order and go back in at their new places (a catch-up that changed a few services
    /// costs a walk of the order, not a sort of every name).
    fn rank(&self) -> Result<(), StoreError> {
        let mut guard = self.entries.write().map_err(|_| StoreError::Index("the index is poisoned".into()))?;
        let entries = &mut *guard;
        if entries.dirty.is_empty() {
            return Ok(());
        }
        let mut changed = vec![false; entries.by_key.len()];
        for &k in &entries.dirty {
            changed[k as usize] = true;
        }
        let mut dirty = std::mem::take(&mut entries.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        let by_key = &entries.by_key;
        dirty.retain(|&k| by_key[k as usize].is_some());
        let before = |a: u64, b: u64| match (&by_key[a as usize], &by_key[b as usize]) {
            (Some(x), Some(y)) => x.name.cmp(&y.name).then_with(|| x.id.cmp(&y.id)),
            _ => std::cmp::Ordering::Equal,
        };
        dirty.sort_by(|&a, &b| before(a, b));
        let kept: Vec<u64> = entries.order.iter().copied().filter(|&k| !changed[k as usize]).collect();
        let mut order = Vec::with_capacity(kept.len() + dirty.len());
        let mut from = 0;
        for k in dirty {
            // Everything kept that sorts before `k` (the dirty keys come in order, so the places only grow).
            let at = from + kept[from..].partition_point(|&o| before(o, k) == std::cmp::Ordering::Less);
            order.extend_from_slice(&kept[from..at]);
            order.push(k);
            from = at;
        }
        order.extend_from_slice(&kept[from..]);
        let mut rank = vec![u32::MAX; entries.by_key.len()];
        for (place, &key) in (0u32..).zip(&order) {
            rank[key as usize] = place;
        }
        entries.order = order;
        entries.rank = rank;
        Ok(())
    }

    /// Indexes these services again (their old documents are deleted); committed by the caller. The rows are read
    /// before the index is locked, so searches wait only for the index's own work.
    fn apply(&self, rows: Vec<crate::store::CatalogChange>) -> Result<(), StoreError> {
        let parsed: Vec<(String, bool, Option<Parsed>)> = rows
            .into_iter()
            .map(|row| {
                let parsed = match serde_json::from_str::<CatalogService>(&row.doc) {
                    Ok(service) => Some(Parsed::of(service)),
                    Err(e) => {
                        tracing::warn!(service = %row.id, error = %e, "A kept service does not parse; it is left out of the search index.");
                        None
                    }
                };
                (row.id, row.active, parsed)
            })
            .collect();
        let writer = self.writer.lock().map_err(|_| StoreError::Index("the index writer is poisoned".into()))?;
        let mut entries = self.entries.write().map_err(|_| StoreError::Index("the index is poisoned".into()))?;
        for (id, row_active, parsed) in parsed {
            let next = entries.by_key.len() as u64;
            let key = *entries.keys.entry(id.clone()).or_insert(next);
            if key == next {
                entries.by_key.push(None);
            }
            writer.delete_term(Term::from_field_u64(self.fields.key, key));
            let slot = usize::try_from(key).map_err(|e| StoreError::Index(e.to_string()))?;
            entries.unplace(key);
            entries.dirty.push(key);
            let Some(p) = parsed else {
                entries.by_key[slot] = None;
                continue;
            };
            let mut doc = TantivyDocument::default();
            doc.add_u64(self.fields.key, key);
            doc.add_text(self.fields.name, p.name_words);
            doc.add_text(self.fields.body, p.body_words);
            let active = row_active && p.active;
            if active {
                doc.add_text(self.fields.tag, "active");
            }
            for t in p.tags {
                doc.add_text(self.fields.tag, t);
            }
            let mut hours = Vec::new();
            for h in p.intervals {
                let zone = match entries.zones.iter().position(|z| *z == h.zone) {
                    Some(i) => i,
                    None => {
                        entries.zones.push(h.zone.clone());
                        entries.zones.len() - 1
                    }
                };
                let (Ok(zone), Ok(day), Ok(opens), Ok(closes)) =
                    (u16::try_from(zone), u8::try_from(h.day), u16::try_from(h.opens_min), u16::try_from(h.closes_min))
                else {
                    continue;
                };
                hours.push(Opening { zone, day, opens, closes });
            }
            for t in open_terms(&hours, &entries.zones) {
                doc.add_text(self.fields.tag, t);
            }
            writer.add_document(doc).map_err(index_error)?;
            entries.place(key, &p.points);
            entries.by_key[slot] =
                Some(Entry { id, name: p.name, active, points: p.points, hours: hours.into_boxed_slice() });
        }
        Ok(())
    }

    /// The query of `text`: every word by its stem, the last also as a prefix of the word as typed, in the name
    /// (weighted) or the description; in the name only when `name_only`.
    fn text_query(&self, text: &TextQuery, name_only: bool) -> Box<dyn Query> {
        let f = &self.fields;
        let either = |field_query: &dyn Fn(Field) -> Box<dyn Query>| -> Box<dyn Query> {
            let name: Box<dyn Query> = Box::new(BoostQuery::new(field_query(f.name), NAME_BOOST));
            if name_only {
                return name;
            }
            Box::new(BooleanQuery::new(vec![(Occur::Should, name), (Occur::Should, field_query(f.body))]))
        };
        let term = |word: String| {
            move |field: Field| -> Box<dyn Query> {
                Box::new(TermQuery::new(Term::from_field_text(field, &word), IndexRecordOption::WithFreqs))
            }
        };
        let mut must: Vec<(Occur, Box<dyn Query>)> =
            text.complete.iter().map(|w| (Occur::Must, either(&term(w.clone())))).collect();
        let stem = either(&term(text.last_stem.clone()));
        // The word as typed is letters and digits only (search_text splits at everything else): no regex syntax.
        let pattern = format!("{}.*", text.last_word);
        let prefix = either(&|field: Field| -> Box<dyn Query> {
            match RegexQuery::from_pattern(&pattern, field) {
                Ok(q) => Box::new(q),
                Err(_) => Box::new(BooleanQuery::new(Vec::new())),
            }
        });
        must.push((Occur::Must, Box::new(BooleanQuery::new(vec![(Occur::Should, stem), (Occur::Should, prefix)]))));
        Box::new(BooleanQuery::new(must))
    }

    /// The documents holding the filter term `t`.
    fn tag_query(&self, t: &str) -> Box<dyn Query> {
        Box::new(TermQuery::new(Term::from_field_text(self.fields.tag, t), IndexRecordOption::Basic))
    }

    /// The filters the index holds as terms: active, category, taxonomy term (with the terms under it), language.
    fn filters(&self, q: &ServiceQuery, subtree: Option<&[(String, String)]>) -> Vec<(Occur, Box<dyn Query>)> {
        let exact = |t: String| self.tag_query(&t);
        let mut out: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        if !q.include_inactive {
            out.push((Occur::Must, exact("active".into())));
        }
        if let Some(category) = &q.category {
            out.push((Occur::Must, exact(tag(&["term", CATEGORY_TAXONOMY, category]))));
        }
        if let Some(term) = &q.taxonomy_term {
            let mut any: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Should, exact(tag(&["code", term])))];
            for (taxonomy, code) in subtree.unwrap_or_default() {
                any.push((Occur::Should, exact(tag(&["term", taxonomy, code]))));
            }
            out.push((Occur::Must, Box::new(BooleanQuery::new(any))));
        }
        if let Some(language) = &q.language {
            out.push((Occur::Must, exact(tag(&["lang", &language.to_ascii_lowercase()]))));
        }
        out
    }

    /// One page of services matching `q`, best first, and how many matched, as the SQL path answers it.
    ///
    /// # Errors
    /// When the store cannot be read or tantivy fails.
    pub async fn search(
        self: &Arc<Self>,
        store: &dyn Store,
        q: &ServiceQuery,
    ) -> Result<(Vec<ServiceHit>, usize), StoreError> {
        self.catch_up(store).await?;
        let text = match &q.text {
            None => None,
            Some(t) => match TextQuery::parse(t) {
                Some(words) => Some(words),
                // No word to look for finds nothing, never everything (the API refuses such a `q`).
                None => return Ok((Vec::new(), 0)),
            },
        };
        let subtree = match &q.taxonomy_term {
            Some(term) => Some(store.taxonomy_subtree(term).await?),
            None => None,
        };
        let (page, total) = self.page(q, text.as_ref(), subtree.as_deref())?;
        let ids: Vec<String> = page.iter().map(|(id, _)| id.clone()).collect();
        let docs: HashMap<String, (String, bool)> =
            store.service_docs(&ids).await?.into_iter().map(|(id, doc, active)| (id, (doc, active))).collect();
        let hits = page
            .iter()
            .filter_map(|(id, d2)| docs.get(id).map(|(doc, active)| hit(doc, *active, *d2)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((hits, total))
    }

    /// The page's `(id, squared distance in degrees)` and the number of matches.
    fn page(
        &self,
        q: &ServiceQuery,
        text: Option<&TextQuery>,
        subtree: Option<&[(String, String)]>,
    ) -> Result<(Vec<PageRow>, usize), StoreError> {
        let searcher = self.reader.searcher();
        let per_page = q.per_page.max(1) as usize;
        let offset = (q.page.max(1) as usize - 1) * per_page;
        let mut clauses = self.filters(q, subtree);
        let entries = self.entries.read().map_err(|_| StoreError::Index("the index is poisoned".into()))?;
        let id_of = |key: u64| entries.by_key.get(key as usize).and_then(Option::as_ref).map(|e| e.id.clone());
        // The local (weekday, minute) of `open_at` in each zone, by zone number: an opening is checked against its
        // own zone's moment alone, after the index kept the services open at some minute of that hour.
        let moments: Option<Vec<Option<(i32, i32)>>> = q.open_at.map(|at: OffsetDateTime| {
            entries.zones.iter().map(|z| hours::local_moment(z, at).map(|m| (m.day, m.minute))).collect()
        });
        // Services open at that moment: a `whole` term of its hour in some zone, or an `open` one whose minute is
        // then checked (`partly`: the keys to check, usually few).
        let mut partly: Option<Vec<bool>> = None;
        if let Some(moments) = &moments {
            let terms = |kind: fn(&str, i32, i32) -> String| -> Vec<(Occur, Box<dyn Query>)> {
                entries
                    .zones
                    .iter()
                    .zip(moments)
                    .filter_map(|(zone, m)| {
                        m.map(|(day, minute)| (Occur::Should, self.tag_query(&kind(zone, day, minute / 60))))
                    })
                    .collect()
            };
            let mut check = vec![false; entries.by_key.len()];
            for (key, _) in
                searcher.search(&BooleanQuery::new(terms(open_tag)), &Keys { scoring: false }).map_err(index_error)?
            {
                if let Some(c) = check.get_mut(key as usize) {
                    *c = true;
                }
            }
            partly = Some(check);
            let mut any = terms(whole_tag);
            any.extend(terms(open_tag));
            // No zone has a moment: nothing can be open (an empty disjunction matches nothing).
            clauses.push((Occur::Must, Box::new(BooleanQuery::new(any))));
        }
        if let (Some(text), None, None) = (text, q.near, q.open_at) {
            // Text and term filters only: tantivy keeps the page alone.
            clauses.push((Occur::Must, self.text_query(text, false)));
            let query = BooleanQuery::new(clauses);
            let (top, total) = searcher
                .search(&query, &(TopDocs::with_limit(per_page).and_offset(offset), Count))
                .map_err(index_error)?;
            let mut page = Vec::with_capacity(top.len());
            for (_, address) in top {
                let keys =
                    searcher.segment_reader(address.segment_ord).fast_fields().u64("key").map_err(index_error)?;
                if let Some(id) = keys.first(address.doc_id).and_then(id_of) {
                    page.push((id, None));
                }
            }
            return Ok((page, total));
        }
        let name_matches: HashSet<u64> = match (text, q.near) {
            (Some(text), Some(_)) => {
                let mut only_name = self.filters(q, subtree);
                only_name.push((Occur::Must, self.text_query(text, true)));
                let found =
                    searcher.search(&BooleanQuery::new(only_name), &Keys { scoring: false }).map_err(index_error)?;
                found.into_iter().map(|(k, _)| k).collect()
            }
            _ => HashSet::new(),
        };
        let near = q.near.map(|(lat, lon)| Near::new(lat, lon, q.radius_km));
        let term_filter =
            q.category.is_some() || q.taxonomy_term.is_some() || q.language.is_some() || q.open_at.is_some();
        let found: Vec<(u64, Score)> = if text.is_none() && !term_filter {
            // Nothing for tantivy to narrow: the services themselves (of the radius's cells), checked below.
            let all = || (0u64..).zip(&entries.by_key).filter(|(_, e)| e.is_some()).map(|(k, _)| k).collect();
            let keys: Vec<u64> = near.as_ref().and_then(|n| entries.in_box(n)).unwrap_or_else(all);
            keys.into_iter()
                .filter(|&k| {
                    q.include_inactive
                        || entries.by_key.get(k as usize).and_then(Option::as_ref).is_some_and(|e| e.active)
                })
                .map(|k| (k, 0.0))
                .collect()
        } else {
            if let Some(text) = text {
                clauses.push((Occur::Must, self.text_query(text, false)));
            }
            let query: Box<dyn Query> =
                if clauses.is_empty() { Box::new(AllQuery) } else { Box::new(BooleanQuery::new(clauses)) };
            searcher.search(&*query, &Keys { scoring: text.is_some() }).map_err(index_error)?
        };
        struct Row {
            key: u64,
            /// Place in (name, id) order: compared without reading the names.
            rank: u32,
            score: Score,
            name_miss: bool,
            d2: Option<f64>,
        }
        let mut rows: Vec<Row> = found
            .into_iter()
            .filter_map(|(key, score)| {
                // The entry is read only for what the index cannot say: the minute of a partly open hour, the
                // distance.
                let entry = || entries.by_key.get(key as usize).and_then(Option::as_ref);
                if let (Some(moments), Some(partly)) = (&moments, &partly)
                    && partly.get(key as usize).copied().unwrap_or(false)
                {
                    let open = entry()?.hours.iter().any(|o| {
                        moments
                            .get(usize::from(o.zone))
                            .copied()
                            .flatten()
                            .is_some_and(|(day, minute)| o.holds(day, minute))
                    });
                    if !open {
                        return None;
                    }
                }
                let d2 = match &near {
                    Some(n) => Some(n.distance(&entry()?.points)?),
                    None => None,
                };
                let rank = entries.rank.get(key as usize).copied().unwrap_or(u32::MAX);
                Some(Row { key, rank, score, name_miss: !name_matches.contains(&key), d2 })
            })
            .collect();
        let by_name = |a: &Row, b: &Row| a.rank.cmp(&b.rank);
        let by_d2 = |a: &Row, b: &Row| a.d2.partial_cmp(&b.d2).unwrap_or(std::cmp::Ordering::Equal);
        let order = |a: &Row, b: &Row| match (text.is_some(), near.is_some()) {
            (true, false) => {
                b.score.partial_cmp(&a.score).unwrap_or(std::cmp::Ordering::Equal).then_with(|| by_name(a, b))
            }
            (true, true) => a.name_miss.cmp(&b.name_miss).then_with(|| by_d2(a, b)).then_with(|| by_name(a, b)),
            (false, true) => by_d2(a, b).then_with(|| by_name(a, b)),
            (false, false) => by_name(a, b),
        };
        let total = rows.len();
        let end = (offset + per_page).min(total);
        if offset >= total {
            return Ok((Vec::new(), total.min(MAX_COUNTED as usize)));
        }
        if end < total {
            rows.select_nth_unstable_by(end - 1, order);
            rows.truncate(end);
        }
        rows.sort_by(order);
        Ok((rows[offset..end].iter().filter_map(|r| Some((id_of(r.key)?, r.d2))).collect(), total))
    }
}

/// A service of a page: its id and its squared distance (in degrees of latitude) from `near`.
type PageRow = (String, Option<f64>);

/// A radius around a point, checked as the SQL path does: each location inside the bounding box, the nearest by
/// the equirectangular distance, within the radius.
struct Near {
    lat: f64,
    lon: f64,
    scale: f64,
    box_lat: (f64, f64),
    box_lon: (f64, f64),
    max: f64,
}

impl Near {
    fn new(lat: f64, lon: f64, radius_km: f64) -> Self {
        let scale = lat.to_radians().cos().max(0.01);
        let dlat = radius_km / KM_PER_DEGREE;
        let dlon = dlat / scale;
        Near { lat, lon, scale, box_lat: (lat - dlat, lat + dlat), box_lon: (lon - dlon, lon + dlon), max: dlat * dlat }
    }

    /// The squared distance (in degrees of latitude) of the nearest point within the radius.
    fn distance(&self, points: &[(f64, f64)]) -> Option<f64> {
        points
            .iter()
            .filter(|(la, lo)| {
                (self.box_lat.0..=self.box_lat.1).contains(la) && (self.box_lon.0..=self.box_lon.1).contains(lo)
            })
            .map(|(la, lo)| {
                let (dy, dx) = (la - self.lat, self.scale * (lo - self.lon));
                dy * dy + dx * dx
            })
            .min_by(f64::total_cmp)
            .filter(|d2| *d2 <= self.max)
    }
}

/// Collects the key (and score) of every match.
struct Keys {
    scoring: bool,
}

struct SegmentKeys {
    keys: Column<u64>,
    out: Vec<(u64, Score)>,
}

impl Collector for Keys {
    type Fruit = Vec<(u64, Score)>;
    type Child = SegmentKeys;

    fn for_segment(&self, _: u32, segment: &SegmentReader) -> tantivy::Result<SegmentKeys> {
        Ok(SegmentKeys { keys: segment.fast_fields().u64("key")?, out: Vec::new() })
    }

    fn requires_scoring(&self) -> bool {
        self.scoring
    }

    fn merge_fruits(&self, fruits: Vec<Vec<(u64, Score)>>) -> tantivy::Result<Vec<(u64, Score)>> {
        Ok(fruits.into_iter().flatten().collect())
    }
}

impl SegmentCollector for SegmentKeys {
    type Fruit = Vec<(u64, Score)>;

    fn collect(&mut self, doc: DocId, score: Score) {
        if let Some(key) = self.keys.first(doc) {
            self.out.push((key, score));
        }
    }

    fn harvest(self) -> Self::Fruit {
        self.out
    }
}

/// How the gateway searches its catalog: through the in-memory index once it is built, else through SQL.
#[derive(Clone)]
pub struct ServiceSearch {
    index: Option<Arc<ServiceIndex>>,
}

impl ServiceSearch {
    /// Searches through SQL only.
    #[must_use]
    pub fn sql() -> Self {
        ServiceSearch { index: None }
    }

    /// Searches through `index` once it is built.
    #[must_use]
    pub fn indexed(index: Arc<ServiceIndex>) -> Self {
        ServiceSearch { index: Some(index) }
    }

    /// Builds the index from the store (searches use SQL meanwhile); a failed build is tried again every 10 s.
    /// Returns when the first build is done, or at once when `stop` turns `true` (a gateway shutting down does not
    /// wait for a build; a page being indexed finishes on the blocking pool and is dropped).
    pub async fn build(self, store: Arc<dyn Store>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(index) = self.index else { return };
        let build = async {
            while let Err(e) = index.catch_up(&*store).await {
                tracing::error!(error = %e, "The directory search index could not be built; searches use SQL until it is.");
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            }
        };
        tokio::select! {
            () = build => {}
            _ = stop.wait_for(|stopping| *stopping) => {
                tracing::info!("The directory search index build stopped with the gateway.");
            }
        }
    }

    /// Waits until the index's first build is done (at most `limit`); `true` when it is, or when there is no index.
    pub async fn wait_built(&self, limit: std::time::Duration) -> bool {
        let Some(index) = &self.index else { return true };
        let until = Instant::now() + limit;
        while !index.is_built() {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// One page of services matching `q` and how many matched.
    ///
    /// # Errors
    /// When the store cannot be read or the index fails.
    pub async fn search(&self, store: &dyn Store, q: &ServiceQuery) -> Result<(Vec<ServiceHit>, usize), StoreError> {
        match &self.index {
            Some(index) if index.is_built() => index.search(store, q).await,
            _ => store.search_services(q).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_counts_inside_the_radius_only() {
        let near = Near::new(45.5, -122.6, 10.0);
        assert!(near.distance(&[(45.5, -122.6)]).is_some_and(|d| d == 0.0));
        assert!(near.distance(&[(45.58, -122.6)]).is_some(), "8.9 km north");
        assert!(near.distance(&[(45.6, -122.6)]).is_none(), "11.1 km north");
        assert!(near.distance(&[(47.6, -122.3), (45.51, -122.6)]).is_some(), "the nearest location counts");
        assert!(near.distance(&[]).is_none());
    }

    #[test]
    fn a_radius_looks_in_the_cells_its_box_covers_and_follows_a_move() {
        let mut entries = Entries::default();
        let entry = |points: Vec<(f64, f64)>| Entry {
            id: "s".into(),
            name: "s".into(),
            active: true,
            points,
            hours: Box::new([]),
        };
        // Portland, two locations in one cell and one across a cell edge; Seattle.
        let portland = vec![(45.52, -122.68), (45.521, -122.681), (45.499, -122.6)];
        entries.place(0, &portland);
        entries.by_key.push(Some(entry(portland)));
        entries.place(1, &[(47.6, -122.33)]);
        entries.by_key.push(Some(entry(vec![(47.6, -122.33)])));
        let near = Near::new(45.5, -122.6, 10.0);
        assert_eq!(entries.in_box(&near), Some(vec![0]), "once, though it has three locations there");
        // The Portland service moves to Seattle.
        entries.unplace(0);
        entries.place(0, &[(47.61, -122.33)]);
        entries.by_key[0] = Some(entry(vec![(47.61, -122.33)]));
        assert_eq!(entries.in_box(&near), Some(vec![]));
        assert_eq!(entries.in_box(&Near::new(47.6, -122.33, 5.0)), Some(vec![0, 1]));
        assert!(entries.cells.values().all(|k| !k.is_empty()), "no empty cell is kept");
        // A radius across a continent is not looked up cell by cell.
        assert_eq!(entries.in_box(&Near::new(40.0, -100.0, 2_000.0)), None);
    }

    #[test]
    fn filter_terms_cannot_run_into_each_other() {
        assert_ne!(tag(&["term", "a", "bc"]), tag(&["term", "ab", "c"]));
    }

    #[test]
    fn an_hour_covered_whole_needs_no_minute_check_and_a_partial_one_does() {
        let zones = vec!["America/Los_Angeles".to_owned()];
        // Monday 08:30–12:00 and 11:00–11:15 (an hour both partial and whole), Tuesday until midnight.
        let hours = [
            Opening { zone: 0, day: 0, opens: 8 * 60 + 30, closes: 12 * 60 },
            Opening { zone: 0, day: 0, opens: 11 * 60, closes: 11 * 60 + 15 },
            Opening { zone: 0, day: 1, opens: 23 * 60, closes: 1440 },
        ];
        let z = "America/Los_Angeles";
        let mut terms = open_terms(&hours, &zones);
        terms.sort();
        let mut expected =
            vec![open_tag(z, 0, 8), whole_tag(z, 0, 9), whole_tag(z, 0, 10), whole_tag(z, 0, 11), whole_tag(z, 1, 23)];
        expected.sort();
        assert_eq!(terms, expected);
    }

    #[test]
    fn the_name_order_follows_a_rename_a_newcomer_and_a_removal() {
        let index = ServiceIndex::new().expect("index");
        let put = |entries: &mut Entries, key: u64, name: Option<&str>| {
            while entries.by_key.len() <= key as usize {
                entries.by_key.push(None);
            }
            entries.by_key[key as usize] = name.map(|n| Entry {
                id: format!("s{key}"),
                name: n.into(),
                active: true,
                points: Vec::new(),
                hours: Box::new([]),
            });
            entries.dirty.push(key);
        };
        let order = |index: &ServiceIndex| {
            index.rank().expect("rank");
            let e = index.entries.read().expect("lock");
            let mut by_rank: Vec<(u32, String)> = (0..e.by_key.len())
                .filter_map(|k| e.by_key[k].as_ref().map(|x| (e.rank[k], format!("{} {}", x.id, x.name))))
                .collect();
            by_rank.sort_unstable();
            assert_eq!(e.order.len(), by_rank.len(), "one place per service");
            by_rank.into_iter().map(|(_, n)| n).collect::<Vec<_>>()
        };
        {
            let mut e = index.entries.write().expect("lock");
            for (k, n) in ["Delta", "Alpha", "Charlie", "Bravo"].into_iter().enumerate() {
                put(&mut e, k as u64, Some(n));
            }
        }
        assert_eq!(order(&index), ["s1 Alpha", "s3 Bravo", "s2 Charlie", "s0 Delta"]);
        {
            let mut e = index.entries.write().expect("lock");
            put(&mut e, 0, Some("Aardvark")); // renamed to the front
            put(&mut e, 4, Some("Bravo")); // a second Bravo, after the first by id
            put(&mut e, 2, None); // gone
        }
        assert_eq!(order(&index), ["s0 Aardvark", "s1 Alpha", "s3 Bravo", "s4 Bravo"]);
    }
}
