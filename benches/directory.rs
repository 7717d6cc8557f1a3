//! Directory benchmark: full sync of a generated 100,000-service HSDS directory, then catalog search latency.
//!
//! ```text
//! cargo bench --bench directory -- --backend sqlite --count 100000 --engine index
//! cargo bench --bench directory -- --backend sqlite --count 100000 --engine sql
//! cargo bench --bench directory -- --backend postgres --count 100000 --engine index
//! cargo bench --bench directory -- --backend sqlite --db /tmp/directory.db   # keep the catalog; reuse it next time
//! cargo bench --bench directory -- --backend postgres --db carebridge_dirbench   # the same, a database by name
//! ```
//! With `--db`, a catalog kept by an earlier run is searched without syncing again (to compare engines and
//! search plans quickly, or to open it with `sqlite3`).
//! The directory comes from `carebridge::directories::synthetic` (deterministic: same count, same services),
//! written as an HSDS data package and synced through the same code as `carebridge directory sync`. Searches go
//! through the gateway's search (`--engine index`: the in-memory index, built first and timed; `--engine sql`: the
//! database's full text) without HTTP, `--queries` of each shape the README documents, in turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use carebridge::directories::hsds::HsdsPackage;
use carebridge::directories::index::{ServiceIndex, ServiceSearch};
use carebridge::directories::{self, ServiceQuery, SyncMode, SyncOptions, synthetic};
use time::OffsetDateTime;

const CENTRES: [(f64, f64); 4] =
    [(45.5152, -122.6784), (47.6062, -122.3321), (39.7392, -104.9903), (41.8781, -87.6298)];
const CATEGORIES: [&str; 5] = ["therapy", "crisis_care", "food_assistance", "housing_assistance", "peer_support"];
const WORDS: [&str; 6] = ["counseling", "pantry", "recovery", "riverside", "shelter", "interpreters"];

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_owned())
}

fn pg_admin_url() -> String {
    std::env::var("CAREBRIDGE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The query shapes the README documents for `GET /api/v1/services`, with the generator's words: unselective
/// ones (a category's noun matches one service in nine, "interpreters" every one), a selective one (a service's
/// number), a word being typed, two words.
const SHAPES: [&str; 15] = [
    "q (unselective word)",
    "q (selective word)",
    "q (prefix being typed)",
    "q (two words)",
    "q + category",
    "q + near 10 km + category",
    "near 10 km + category",
    "near 10 km",
    "category",
    "language",
    "q + language",
    "taxonomy_term",
    "open_now",
    "q + open_now",
    "q + include_inactive",
];

const PREFIXES: [&str; 4] = ["coun", "pan", "rec", "shel"];
const PAIRS: [&str; 4] = ["crisis counseling", "food pantry", "peer recovery", "housing shelter"];
const LANGUAGES: [&str; 5] = ["es", "vi", "zh", "ru", "so"];

/// The `n`th query of `shape`.
fn shape_query(shape: usize, n: usize, count: u64) -> ServiceQuery {
    let centre = CENTRES[n % CENTRES.len()];
    let near = (centre.0 + ((n * 7) % 10) as f64 * 0.01, centre.1 - ((n * 3) % 10) as f64 * 0.01);
    let word = WORDS[n % WORDS.len()].to_owned();
    let category = CATEGORIES[n % CATEGORIES.len()].to_owned();
    // A weekday 10:30 in the Pacific zone (open), or a Sunday (closed), in turn.
    let open_at = if n.is_multiple_of(2) {
        time::macros::datetime!(2026-07-13 18:30 UTC)
    } else {
        time::macros::datetime!(2026-07-12 18:30 UTC)
    };
    let mut q = ServiceQuery {
        text: None,
        category: None,
        taxonomy_term: None,
        near: None,
        radius_km: 10.0,
        language: None,
        include_inactive: false,
        open_at: None,
        page: 1,
        per_page: 20,
    };
    match shape {
        0 => q.text = Some(word),
        1 => q.text = Some(((n as u64 * 7919) % count.max(1)).to_string()),
        2 => q.text = Some(PREFIXES[n % PREFIXES.len()].to_owned()),
        3 => q.text = Some(PAIRS[n % PAIRS.len()].to_owned()),
        4 => (q.text, q.category) = (Some(word), Some(category)),
        5 => (q.text, q.category, q.near) = (Some(word), Some(category), Some(near)),
        6 => (q.category, q.near) = (Some(category), Some(near)),
        7 => q.near = Some(near),
        8 => q.category = Some(category),
        9 => q.language = Some(LANGUAGES[n % LANGUAGES.len()].to_owned()),
        10 => (q.text, q.language) = (Some(word), Some(LANGUAGES[n % LANGUAGES.len()].to_owned())),
        11 => q.taxonomy_term = Some(category),
        12 => q.open_at = Some(open_at),
        13 => (q.text, q.open_at) = (Some(word), Some(open_at)),
        _ => (q.text, q.include_inactive) = (Some(word), true),
    }
    q
}

/// This process's resident memory, in MiB: its own (anonymous: heap, the in-memory index) and mapped files (the
/// executable and the database pages SQLite's readers map).
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let backend = arg("--backend", "sqlite");
    let count: u64 = arg("--count", "100000").parse()?;
    // Queries of each shape.
    let queries: usize = arg("--queries", "100").parse()?;
    let engine = arg("--engine", "index");
    anyhow::ensure!(engine == "index" || engine == "sql", "--engine index|sql");
    let kept_db = std::env::args().any(|a| a == "--db").then(|| arg("--db", ""));
    let dir = tempfile::tempdir()?;
    let package = dir.path().join("services.json");
    // A kept SQLite file, or a kept PostgreSQL database (by name), is searched again without a new sync.
    let reuse = kept_db.as_ref().is_some_and(|db| {
        if backend == "sqlite" {
            std::path::Path::new(db).exists()
        } else {
            std::process::Command::new("psql")
                .args(["-Atqc", &format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"), &pg_admin_url()])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1")
        }
    });
    if !reuse {
        let started = Instant::now();
        let all: Vec<serde_json::Value> = synthetic::services(42, count).collect();
        std::fs::write(&package, serde_json::to_vec(&all)?)?;
        drop(all);
        println!("generated {count} services in {:.1} s", started.elapsed().as_secs_f64());
    }

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let (url, pg) = if backend == "sqlite" {
            let db = kept_db.clone().unwrap_or_else(|| dir.path().join("bench.db").display().to_string());
            (format!("sqlite:{db}"), None)
        } else {
            let admin = pg_admin_url();
            let name = kept_db.clone().unwrap_or_else(|| format!("carebridge_dirbench_{}", std::process::id()));
            let pool = sqlx::PgPool::connect(&admin).await.context("PostgreSQL")?;
            if !reuse {
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await?;
            }
            let root = admin.rsplit_once('/').map_or(admin.as_str(), |(r, _)| r).to_owned();
            // A database asked for by name is kept for the next run.
            (format!("{root}/{name}"), Some((pool, name)).filter(|_| kept_db.is_none()))
        };
        let store = carebridge::store::connect(&url, 8, Duration::from_secs(30)).await?;
        let source = Arc::new(HsdsPackage::new("bench", package.clone()));
        if reuse {
            println!("searching the catalog kept in {}", kept_db.as_deref().unwrap_or_default());
        } else {
            let started = Instant::now();
            let report = directories::sync(
                &*store,
                &*source,
                SyncOptions::new(SyncMode::Full, OffsetDateTime::now_utc()),
                &|_| {},
            )
            .await?;
            let sync_secs = started.elapsed().as_secs_f64();
            println!(
                "full sync backend={backend}: {} added, {} rejected in {sync_secs:.1} s ({:.0} services/s)",
                report.added,
                report.rejected.len(),
                report.added as f64 / sync_secs
            );
            let started = Instant::now();
            let again = directories::sync(
                &*store,
                &*source,
                SyncOptions::new(SyncMode::Full, OffsetDateTime::now_utc()),
                &|_| {},
            )
            .await?;
            println!("unchanged re-sync: {} unchanged in {:.1} s", again.unchanged, started.elapsed().as_secs_f64());
        }

        let search = if engine == "index" {
            let index = ServiceIndex::new()?;
            let rss_before = rss_mib();
            let started = Instant::now();
            index.catch_up(&*store).await?;
            let rss_after = rss_mib();
            println!(
                "index built: {} services in {:.1} s, resident memory: anonymous +{:.0} MiB (to {:.0}), mapped files +{:.0} MiB (to {:.0})",
                index.len(),
                started.elapsed().as_secs_f64(),
                rss_after.0 - rss_before.0,
                rss_after.0,
                rss_after.1 - rss_before.1,
                rss_after.1
            );
            ServiceSearch::indexed(index)
        } else {
            ServiceSearch::sql()
        };
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); SHAPES.len()];
        let mut found = vec![0usize; SHAPES.len()];
        for i in 0..queries * SHAPES.len() {
            let shape = i % SHAPES.len();
            let n = i / SHAPES.len();
            let query = shape_query(shape, n, count);
            let started = Instant::now();
            let (_, total) = search.search(&*store, &query).await?;
            times[shape].push(started.elapsed());
            found[shape] += total;
        }
        println!("| shape (backend {backend}, engine {engine}) | p50 | p95 | p99 | max | matches (mean) |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (shape, name) in SHAPES.iter().enumerate() {
            let mut t = std::mem::take(&mut times[shape]);
            t.sort_unstable();
            println!(
                "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} |",
                percentile(&t, 0.5),
                percentile(&t, 0.95),
                percentile(&t, 0.99),
                t.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                found[shape] as f64 / t.len().max(1) as f64
            );
        }
        store.close().await;
        if let Some((pool, name)) = pg {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&pool)
                .await?;
        }
        anyhow::Ok(())
    })
}
