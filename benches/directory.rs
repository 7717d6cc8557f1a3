//! Directory benchmark: full sync of a generated 100,000-service HSDS directory, then catalog search latency.
//!
//! ```text
//! cargo bench --bench directory -- --backend sqlite --count 100000 --queries 2000
//! cargo bench --bench directory -- --backend postgres --count 100000 --queries 2000
//! cargo bench --bench directory -- --backend sqlite --db /tmp/directory.db   # keep the catalog; reuse it next time
//! cargo bench --bench directory -- --backend postgres --db carebridge_dirbench   # the same, a database by name
//! ```
//! With `--db`, a catalog kept by an earlier run is searched without syncing again (to compare
//! search plans quickly, or to open it with `sqlite3`).
//! The directory comes from `carebridge::directories::synthetic` (deterministic: same count, same services),
//! written as an HSDS data package and synced through the same code as `carebridge directory sync`. Searches go
//! straight to the store (no HTTP), three kinds in turn: text + radius + category, radius + category, text alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use carebridge::directories::hsds::HsdsPackage;
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

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let backend = arg("--backend", "sqlite");
    let count: u64 = arg("--count", "100000").parse()?;
    let queries: usize = arg("--queries", "2000").parse()?;
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
        let report = directories::sync(&*store, &*source, SyncOptions::new(SyncMode::Full, OffsetDateTime::now_utc()), &|_| {}).await?;
        let sync_secs = started.elapsed().as_secs_f64();
        println!(
            "full sync backend={backend}: {} added, {} rejected in {sync_secs:.1} s ({:.0} services/s)",
            report.added,
            report.rejected.len(),
            report.added as f64 / sync_secs
        );
        let started = Instant::now();
        let again = directories::sync(&*store, &*source, SyncOptions::new(SyncMode::Full, OffsetDateTime::now_utc()), &|_| {}).await?;
        println!("unchanged re-sync: {} unchanged in {:.1} s", again.unchanged, started.elapsed().as_secs_f64());
        }

        let mut by_kind: [Vec<Duration>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        let mut found = [0usize; 3];
        for i in 0..queries {
            let kind = i % 3;
            let centre = CENTRES[i % CENTRES.len()];
            let near = (centre.0 + ((i * 7) % 10) as f64 * 0.01, centre.1 - ((i * 3) % 10) as f64 * 0.01);
            let query = ServiceQuery {
                text: (kind != 1).then(|| WORDS[i % WORDS.len()].to_owned()),
                category: (kind != 2).then(|| CATEGORIES[i % CATEGORIES.len()].to_owned()),
                taxonomy_term: None,
                near: (kind != 2).then_some(near),
                radius_km: 10.0,
                language: None,
                include_inactive: false,
                open_at: None,
                page: 1,
                per_page: 20,
            };
            let started = Instant::now();
            let (_, total) = store.search_services(&query).await?;
            by_kind[kind].push(started.elapsed());
            found[kind] += total;
        }
        for (kind, name) in ["text+radius+category", "radius+category", "text only"].iter().enumerate() {
            let mut times = std::mem::take(&mut by_kind[kind]);
            times.sort_unstable();
            println!(
                "search {name} backend={backend}: {} queries, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.0} matches on average",
                times.len(),
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                times.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                found[kind] as f64 / times.len().max(1) as f64
            );
        }
        store.close().await;
        if let Some((pool, name)) = pg {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&pool).await?;
        }
        anyhow::Ok(())
    })
}
