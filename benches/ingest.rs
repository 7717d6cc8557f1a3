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
//! cargo bench --bench ingest -- --backend sqlite --seconds 20 --concurrency 32 --previews 4
//! cargo bench --bench ingest -- --backend sqlite --seconds 20 --concurrency 32 --outbox off
//! ```
//!
//! Its one partner is unreachable (a name that does not resolve) and the referrals' client has consented to it:
//! every referral written is owed to it and, with the outbox on (the default), attempted; `--outbox off` measures
//! the same writes without delivery.
//! With `--previews N`, N more connections keep previewing the largest care plan the bounds and the body limit
//! allow (30 needs, 50 goals with progress, 100 interventions), and two probes time `GET /healthz` and a record
//! read every 10 ms: what one caller's heavy work costs everyone else.
//! PostgreSQL: `CAREBRIDGE_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names a
//! server where the bench may create and drop a database of its own.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use carebridge::keys::KeyHash;
use serde_json::Value;

const KEY: &str = "bench-key";

struct Options {
    backend: String,
    seconds: u64,
    warmup: u64,
    concurrency: usize,
    previews: usize,
    outbox: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut o =
        Options { backend: "sqlite".into(), seconds: 20, warmup: 3, concurrency: 32, previews: 0, outbox: true };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value is missing after a flag");
        match arg.as_str() {
            "--backend" => o.backend = value()?,
            "--seconds" => o.seconds = value()?.parse()?,
            "--warmup" => o.warmup = value()?.parse()?,
            "--concurrency" => o.concurrency = value()?.parse()?,
            "--previews" => o.previews = value()?.parse()?,
            "--outbox" => {
                o.outbox = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => bail!("--outbox takes on or off, not {other}"),
                }
            }
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
             [[api_keys]]\nname = \"bench\"\nhash = \"{hash}\"\nscopes = [\"read\", \"write\"]\n\
             [[partners]]\nname = \"st-marys-ehr\"\nbase_url = \"https://fhir.stmarys.example/r4\"\n\
             receives = [\"client\", \"care-plan\", \"referral\"]\noverlay = \"st-marys-ehr\"\n\
             [outbox]\nenabled = {}\n",
            o.outbox
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

/// The largest care plan the record bounds allow that still fits the default 1 MiB body limit.
fn maximal_care_plan() -> Value {
    let needs: Vec<Value> = (0..30)
        .map(|i| {
            serde_json::json!({"id": format!("need-{i}"), "code": "depression", "status": "active",
                "description": "d".repeat(400), "noted_on": "2026-09-02"})
        })
        .collect();
    let need_ids: Vec<String> = (0..30).map(|i| format!("need-{i}")).collect();
    let progress: Vec<Value> = (0..40)
        .map(|d| serde_json::json!({"date": format!("2026-10-{:02}", d % 28 + 1), "achievement": "improving", "note": "n".repeat(200)}))
        .collect();
    let mut progress = progress;
    progress.sort_by(|a, b| a["date"].as_str().cmp(&b["date"].as_str()));
    let goals: Vec<Value> = (0..50)
        .map(|i| {
            serde_json::json!({"id": format!("goal-{i}"), "description": "g".repeat(300), "need_ids": need_ids,
                "lifecycle_status": "active", "achievement": "improving", "progress": progress})
        })
        .collect();
    let goal_ids: Vec<String> = (0..50).map(|i| format!("goal-{i}")).collect();
    let interventions: Vec<Value> = (0..100)
        .map(|i| {
            serde_json::json!({"id": format!("int-{i}"), "description": "i".repeat(200), "service": "therapy",
                "status": "in_progress", "need_ids": need_ids, "goal_ids": goal_ids, "ordered": true})
        })
        .collect();
    serde_json::json!({"client_id": "cl-bench", "title": "Largest plan", "status": "active",
        "period": {"start": "2026-09-02"}, "needs": needs, "goals": goals, "interventions": interventions})
}

/// Sorted latencies: (p50, p99, max) in ms.
fn percentiles(mut all: Vec<Duration>) -> (f64, f64, f64) {
    all.sort_unstable();
    if all.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let pct = |p: f64| all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1].as_secs_f64() * 1000.0;
    (pct(0.50), pct(0.99), all[all.len() - 1].as_secs_f64() * 1000.0)
}

/// Loops `request` every `pause` until `stop`, keeping the latencies measured while `measuring`.
async fn probe(
    request: reqwest::RequestBuilder,
    pause: Duration,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    expect: u16,
) -> (Vec<Duration>, u64) {
    let mut latencies = Vec::new();
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(request) = request.try_clone() else { break };
        let started = Instant::now();
        let response = request.send().await;
        let ok = matches!(&response, Ok(r) if r.status().as_u16() == expect);
        if let Ok(r) = response {
            let _ = r.bytes().await;
        }
        if measuring.load(Ordering::Relaxed) {
            if ok { latencies.push(started.elapsed()) } else { failures += 1 }
        }
        tokio::time::sleep(pause).await;
    }
    (latencies, failures)
}

async fn run(o: &Options, addr: &str, template: Value) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(o.concurrency + o.previews + 2).build()?;
    // The referrals' client, and her consent to share with the partner: every referral written is owed to it and
    // attempted (with the partner unreachable: refused connections) rather than held for want of grounds.
    for (kind, path) in [("clients", "client/cl-1001"), ("consents", "consent/co-5001")] {
        let body: Value = serde_json::from_str(&std::fs::read_to_string(format!(
            "{}/fixtures/agency/{path}.json",
            env!("CARGO_MANIFEST_DIR")
        ))?)?;
        let id = body["id"].as_str().context("fixture id")?.to_owned();
        let stored =
            client.put(format!("http://{addr}/api/v1/{kind}/{id}")).bearer_auth(KEY).json(&body).send().await?;
        anyhow::ensure!(stored.status().is_success(), "storing {path} answered {}", stored.status());
    }
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
    let mut probes = Vec::new();
    if o.previews > 0 {
        let body = serde_json::to_vec(&maximal_care_plan())?;
        anyhow::ensure!(body.len() < 1 << 20, "the maximal plan is {} bytes, over the body limit", body.len());
        println!("maximal care plan: {} bytes", body.len());
        for _ in 0..o.previews {
            let request = client
                .post(format!("http://{addr}/api/v1/preview/care-plan"))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(body.clone());
            probes
                .push(("preview", tokio::spawn(probe(request, Duration::ZERO, measuring.clone(), stop.clone(), 200))));
        }
        let mut client_record: Value = serde_json::from_str(&std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/agency/client/cl-1001.json"
        ))?)?;
        client_record["id"] = Value::String("cl-bench".into());
        let stored = client
            .put(format!("http://{addr}/api/v1/clients/cl-bench"))
            .bearer_auth(KEY)
            .json(&client_record)
            .send()
            .await?;
        anyhow::ensure!(stored.status().is_success(), "storing the probe's client answered {}", stored.status());
        let pause = Duration::from_millis(10);
        let health = client.get(format!("http://{addr}/healthz"));
        probes.push(("healthz", tokio::spawn(probe(health, pause, measuring.clone(), stop.clone(), 200))));
        let read = client.get(format!("http://{addr}/api/v1/clients/cl-bench")).bearer_auth(KEY);
        probes.push(("read", tokio::spawn(probe(read, pause, measuring.clone(), stop.clone(), 200))));
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
    anyhow::ensure!(!all.is_empty(), "no request succeeded");
    let writes = all.len();
    let (p50, p99, max) = percentiles(all);
    println!(
        "ingest backend={} outbox={} concurrency={} previews={} seconds={:.1}: {} writes, {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, failures {}",
        o.backend,
        if o.outbox { "on" } else { "off" },
        o.concurrency,
        o.previews,
        elapsed.as_secs_f64(),
        writes,
        writes as f64 / elapsed.as_secs_f64(),
        p50,
        p99,
        max,
        failures
    );
    let mut by_name: Vec<(&str, Vec<Duration>, u64)> = Vec::new();
    for (name, task) in probes {
        let (l, f) = task.await?;
        match by_name.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, all, fails)) => {
                all.extend(l);
                *fails += f;
            }
            None => by_name.push((name, l, f)),
        }
    }
    for (name, latencies, failures) in by_name {
        let n = latencies.len();
        let (p50, p99, max) = percentiles(latencies);
        println!("  {name}: {n} answers, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms, failures {failures}");
    }
    Ok(())
}
