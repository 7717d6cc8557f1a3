//! Ingest load test: sustained `PUT /api/v1/referrals/{id}` against the real `carebridge` binary over loopback.
//!
//! Starts the release binary (`cargo bench` builds it) on a fresh SQLite file or a fresh PostgreSQL database,
//! then keeps `--concurrency` keep-alive connections busy for `--seconds`, each PUT a new referral (a durable
//! write: record, history row and audit entry committed before the 201). Prints throughput and latency
//! percentiles. The load generator runs on the same 2-core machine as the server, so the figures are a floor.
//!
//! ```text
//! cargo bench --bench ingest -- --backend sqlite --seconds 20 --concurrency 32
//! cargo bench --bench ingest -- --backend postgres --seconds 20 --concurrency 32
//! ```
//! PostgreSQL: `CAREBRIDGE_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names a
//! server where the bench may create and drop a database of its own.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use carebridge::http::auth::KeyHash;
use serde_json::Value;

const KEY: &str = "bench-key";

struct Options {
    backend: String,
    seconds: u64,
    warmup: u64,
    concurrency: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options { backend: "sqlite".into(), seconds: 20, warmup: 3, concurrency: 32 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value is missing after a flag");
        match arg.as_str() {
            "--backend" => o.backend = value()?,
            "--seconds" => o.seconds = value()?.parse()?,
            "--warmup" => o.warmup = value()?.parse()?,
            "--concurrency" => o.concurrency = value()?.parse()?,
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn database_url(o: &Options, dir: &std::path::Path) -> anyhow::Result<(String, Option<String>)> {
    if o.backend == "sqlite" {
        return Ok((format!("sqlite:{}", dir.join("bench.db").display()), None));
    }
    let admin = std::env::var("CAREBRIDGE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("carebridge_bench_{}", std::process::id());
    let status = Command::new("psql").args([&admin, "-qc", &format!("CREATE DATABASE {name}")]).status()?;
    anyhow::ensure!(status.success(), "cannot create database {name} on {admin}");
    let root = admin.rsplit_once('/').map_or(admin.as_str(), |(r, _)| r);
    Ok((format!("{root}/{name}"), Some(name)))
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let dir = tempfile::tempdir()?;
    let (url, pg_db) = database_url(&o, dir.path())?;
    let hash = KeyHash::generate(KEY).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"{url}\"\nmax_connections = 16\n[log]\nformat = \"json\"\nfilter = \"info\"\n\
             [[api_keys]]\nname = \"bench\"\nhash = \"{hash}\"\nscopes = [\"read\", \"write\"]\n"
        ),
    )?;
    let mut server = Command::new(env!("CARGO_BIN_EXE_carebridge"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(server.stderr.take().context("stderr")?).lines();
    let addr = loop {
        let line = lines.next().context("the server stopped before listening")??;
        if line.contains("Listening.") {
            let event: Value = serde_json::from_str(&line)?;
            break event["addr"].as_str().context("addr")?.to_owned();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});

    let template: Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/agency/referral/ref-4001.json"
    ))?)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let result = rt.block_on(run(&o, &addr, template));
    let _ = Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
    let _ = server.wait();
    if let Some(name) = pg_db {
        let admin = std::env::var("CAREBRIDGE_BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let _ = Command::new("psql").args([&admin, "-qc", &format!("DROP DATABASE IF EXISTS {name}")]).status();
    }
    result
}

async fn run(o: &Options, addr: &str, template: Value) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(o.concurrency).build()?;
    let template = Arc::new(template);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..o.concurrency {
        let (client, template, measuring, stop) = (client.clone(), template.clone(), measuring.clone(), stop.clone());
        let base = format!("http://{addr}/api/v1/referrals");
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("b{worker}-{n}");
                let mut body = (*template).clone();
                body["id"] = Value::String(id.clone());
                let started = Instant::now();
                let response = client.put(format!("{base}/{id}")).bearer_auth(KEY).json(&body).send().await;
                let ok = matches!(&response, Ok(r) if r.status() == 201);
                if let Ok(r) = response {
                    let _ = r.bytes().await;
                }
                if measuring.load(Ordering::Relaxed) {
                    if ok { latencies.push(started.elapsed()) } else { failures += 1 }
                }
            }
            (latencies, failures)
        }));
    }
    tokio::time::sleep(Duration::from_secs(o.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await?;
        all.extend(l);
        failures += f;
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1].as_secs_f64() * 1000.0;
    anyhow::ensure!(!all.is_empty(), "no request succeeded");
    println!(
        "ingest backend={} concurrency={} seconds={:.1}: {} writes, {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, failures {}",
        o.backend,
        o.concurrency,
        elapsed.as_secs_f64(),
        all.len(),
        all.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        all.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        failures
    );
    Ok(())
}
