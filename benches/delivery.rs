//! Delivery load tests: the release `carebridge` binary's outbox against a partner over loopback.
//!
//! Each run writes `--count` clients, each with the consent that gives the partner grounds to receive it (the egress
//! policy holds a client no consent or referral names; without `--mix` the partner does not receive consents, so
//! each client is one delivery, decided by the policy on its consent), and with `--mix` also a referral: three
//! deliveries, the referral waiting for the other two. They are written through `PUT /api/v1/…` with the outbox off, stops the gateway, then starts
//! it again with the outbox on and times the drain: from the start until no delivery is pending. Rows are claimed
//! and settled in batches (`--batch` per claim, `--concurrency` in flight per partner).
//!
//! ```text
//! # the gateway's own ceiling against a fast fake partner (canned transaction-responses)
//! cargo bench --bench delivery -- --backend sqlite   --count 10000 --batch 64 --concurrency 8
//! cargo bench --bench delivery -- --backend postgres --count 10000 --batch 64 --concurrency 8
//! # two gateways on one PostgreSQL database sharing the queue
//! cargo bench --bench delivery -- --backend postgres --count 10000 --batch 64 --concurrency 8 --gateways 2
//! # a backlog: 100,000 deliveries while the partner answers 503 for 60 s, then the drain when it is back
//! cargo bench --bench delivery -- --backend sqlite --count 100000 --down-secs 60
//! # the real FHIR server of ../shared/interop: through the gateway, then the same requests sent directly
//! cargo bench --bench delivery -- --partner interop --count 600 --mix
//! ```
//! The gateway's memory (resident set split into anonymous memory, mapped files and shared memory, sampled at
//! every poll; the peak resident set; the most anonymous memory seen) and the queue gauges of `/metrics` are
//! printed along the way. With `--partner interop` the peer's request log (its last 2,000 requests) is replayed
//! after `POST /_harness/reset` by a plain load client with the same concurrency; the ratio of the two rates says
//! whether the gateway is the bottleneck. PostgreSQL: `CAREBRIDGE_BENCH_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) names a server where the bench creates and drops a database.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use carebridge::keys::KeyHash;
use serde_json::{Value, json};

const KEY: &str = "bench-key";
const PARTNER: &str = "st-marys-ehr";

struct Options {
    backend: String,
    count: usize,
    mix: bool,
    batch: u32,
    concurrency: u32,
    down_secs: u64,
    partner: String,
    /// Gateways draining the queue together (PostgreSQL: replicas sharing one database).
    gateways: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        backend: "sqlite".into(),
        count: 10_000,
        mix: false,
        batch: 64,
        concurrency: 8,
        down_secs: 0,
        partner: "fake".into(),
        gateways: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value is missing after a flag");
        match arg.as_str() {
            "--backend" => o.backend = value()?,
            "--count" => o.count = value()?.parse()?,
            "--mix" => o.mix = true,
            "--batch" => o.batch = value()?.parse()?,
            "--concurrency" => o.concurrency = value()?.parse()?,
            "--down-secs" => o.down_secs = value()?.parse()?,
            "--partner" => o.partner = value()?,
            "--gateways" => o.gateways = value()?.parse()?,
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(["sqlite", "postgres"].contains(&o.backend.as_str()), "--backend sqlite|postgres");
    anyhow::ensure!(["fake", "interop"].contains(&o.partner.as_str()), "--partner fake|interop");
    anyhow::ensure!(
        o.gateways >= 1 && (o.gateways == 1 || o.backend == "postgres"),
        "--gateways N needs --backend postgres"
    );
    Ok(o)
}

fn admin_url() -> String {
    std::env::var("CAREBRIDGE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of the run's own; dropped by [`Database::drop`].
struct Database {
    url: String,
    pg_name: Option<String>,
}

impl Database {
    fn create(backend: &str, dir: &Path) -> anyhow::Result<Database> {
        if backend == "sqlite" {
            return Ok(Database { url: format!("sqlite:{}", dir.join("bench.db").display()), pg_name: None });
        }
        let admin = admin_url();
        let name = format!("carebridge_delivery_{}", std::process::id());
        let status = Command::new("psql").args([&admin, "-qc", &format!("CREATE DATABASE {name}")]).status()?;
        anyhow::ensure!(status.success(), "cannot create database {name} on {admin}");
        let root = admin.rsplit_once('/').map_or(admin.as_str(), |(r, _)| r);
        Ok(Database { url: format!("{root}/{name}"), pg_name: Some(name) })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            let _ =
                Command::new("psql").args([&admin_url(), "-qc", &format!("DROP DATABASE IF EXISTS {name}")]).status();
        }
    }
}

/// The fake partner: canned transaction-responses, or 503 while `down`.
#[derive(Default)]
struct Fake {
    down: AtomicBool,
    next_id: AtomicU64,
    requests: AtomicU64,
}

async fn fake_fhir(State(fake): State<Arc<Fake>>, uri: Uri, body: axum::body::Bytes) -> axum::response::Response {
    fake.requests.fetch_add(1, Ordering::Relaxed);
    let fhir = [("content-type", "application/fhir+json")];
    if fake.down.load(Ordering::Relaxed) {
        let outcome =
            json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]});
        return (StatusCode::SERVICE_UNAVAILABLE, fhir, outcome.to_string()).into_response();
    }
    let bundle: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if bundle["resourceType"] == "Bundle" {
        let entries: Vec<Value> = bundle["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let url = e["request"]["url"].as_str().unwrap_or_default();
                let ty = url.split(['?', '/']).next().unwrap_or_default();
                let id = match url.split_once('/') {
                    Some((_, id)) if !url.contains('?') => id.to_owned(),
                    _ => format!("f{}", fake.next_id.fetch_add(1, Ordering::Relaxed)),
                };
                json!({"response": {"status": "201 Created", "location": format!("{ty}/{id}/_history/1"), "etag": "W/\"1\""}})
            })
            .collect();
        let answer = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": entries});
        return (StatusCode::OK, fhir, answer.to_string()).into_response();
    }
    if body.is_empty() {
        let empty = json!({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []});
        return (StatusCode::OK, fhir, empty.to_string()).into_response();
    }
    let ty = uri.path().trim_start_matches("/fhir/").split(['?', '/']).next().unwrap_or_default().to_owned();
    let id = format!("f{}", fake.next_id.fetch_add(1, Ordering::Relaxed));
    let mut resource = bundle;
    resource["id"] = json!(id);
    let location = format!("http://{}/fhir/{ty}/{id}/_history/1", "127.0.0.1");
    (
        StatusCode::CREATED,
        [("content-type", "application/fhir+json".to_owned()), ("location", location)],
        resource.to_string(),
    )
        .into_response()
}

async fn start_fake() -> anyhow::Result<(String, Arc<Fake>)> {
    let fake = Arc::new(Fake::default());
    let app = axum::Router::new().fallback(fake_fhir).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/fhir", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, fake))
}

/// The interop FHIR server, stopped on drop.
struct Peer {
    port: u16,
    run_dir: tempfile::TempDir,
    base: String,
}

fn interop() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/interop")
}

impl Peer {
    fn start() -> anyhow::Result<Peer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let run_dir = tempfile::tempdir()?;
        let out = Command::new(interop().join("ehr/start.sh"))
            .arg(port.to_string())
            .env("EHR_RUN_DIR", run_dir.path())
            .output()
            .context("ehr/start.sh of ../shared/interop")?;
        anyhow::ensure!(out.status.success(), "the FHIR peer did not start: {}", String::from_utf8_lossy(&out.stderr));
        let base = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(Peer { port, run_dir, base })
    }

    fn harness(&self, path: &str) -> String {
        format!("{}/_harness/{path}", self.base.trim_end_matches("/fhir"))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new(interop().join("ehr/stop.sh"))
            .arg(self.port.to_string())
            .env("EHR_RUN_DIR", self.run_dir.path())
            .output();
    }
}

/// The gateway, a child process.
struct Gateway {
    child: Child,
    base: String,
}

impl Gateway {
    fn start(config: &Path) -> anyhow::Result<Gateway> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_carebridge"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let addr = loop {
            let line = lines.next().context("the gateway stopped before listening")??;
            if line.contains("Listening.") {
                let event: Value = serde_json::from_str(&line)?;
                break event["addr"].as_str().context("addr")?.to_owned();
            }
        };
        // Keep draining the log so the gateway never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Ok(Gateway { child, base: format!("http://{addr}") })
    }

    /// Its memory now, in MiB (from `/proc/<pid>/status`).
    fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        Memory {
            rss: field("VmRSS:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
            shmem: field("RssShmem:"),
            hwm: field("VmHWM:"),
        }
    }

    /// CPU seconds it has used (user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // After the command name in parentheses: state is field 3, utime 14, stime 15 (clock ticks, 100 a second).
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(14) + ticks(15)) / 100.0
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, o: &Options, db: &str, partner: &str, outbox: bool) -> anyhow::Result<PathBuf> {
    let hash = KeyHash::generate(KEY).map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = dir.join(if outbox { "deliver.toml" } else { "write.toml" });
    // Retries come due at once, so the drain starts as soon as the partner is back; never dead while it is down.
    let schedule = vec!["1"; 200].join(", ");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"{db}\"\nmax_connections = 16\n\
             [log]\nformat = \"json\"\nfilter = \"info\"\n\
             [[api_keys]]\nname = \"bench\"\nhash = \"{hash}\"\nscopes = [\"read\", \"write\", \"admin\"]\n\
             [[partners]]\nname = \"{PARTNER}\"\nbase_url = \"{partner}\"\n\
             receives = [{receives}]\noverlay = \"{PARTNER}\"\nmax_transaction_entries = 8\n\
             [outbox]\nenabled = {outbox}\nbatch = {}\nconcurrency = {}\npoll_ms = 100\ntimeout_secs = 10\n\
             lease_secs = 120\nretry_schedule_secs = [{schedule}]\n",
            o.batch,
            o.concurrency,
            receives = if o.mix { "\"client\", \"referral\", \"consent\"" } else { "\"client\"" },
        ),
    )?;
    Ok(path)
}

fn fixture(kind: &str, id: &str) -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/agency/{kind}/{id}.json"));
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// The records of unit `i`: a client and its consent, and with `mix` a referral citing it.
fn unit(i: usize, mix: bool, t: &[Value; 3]) -> Vec<(&'static str, String, Value)> {
    let client = format!("cl-b{i}");
    let mut c = t[0].clone();
    c["id"] = json!(client);
    c["identifiers"][0]["value"] = json!(format!("OR6{i:07}"));
    let consent = format!("co-b{i}");
    let mut co = t[1].clone();
    co["id"] = json!(consent);
    co["client_id"] = json!(client);
    // Open-ended, so the bench's clients stay consented whatever day it runs.
    co["period"] = json!({"start": "2026-01-01"});
    co["signed_on"] = json!("2026-01-01");
    let mut out = vec![("client", client.clone(), c), ("consent", consent.clone(), co)];
    if mix {
        let mut r = t[2].clone();
        r["id"] = json!(format!("ref-b{i}"));
        r["client_id"] = json!(client);
        r["consent_id"] = json!(consent);
        r["goal_ids"] = json!([]);
        r.as_object_mut().map(|m| m.remove("care_plan_id"));
        out.push(("referral", format!("ref-b{i}"), r));
    }
    out
}

/// Writes units `first..first + o.count` through the API, 32 requests at a time; gives the deliveries they owe.
async fn write_records(http: &reqwest::Client, base: &str, o: &Options, first: usize) -> anyhow::Result<usize> {
    let t = Arc::new([fixture("client", "cl-1001")?, fixture("consent", "co-5001")?, fixture("referral", "ref-4001")?]);
    let next = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (http, base, t, next, written, count, mix) =
            (http.clone(), base.to_owned(), t.clone(), next.clone(), written.clone(), o.count, o.mix);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = usize::try_from(next.fetch_add(1, Ordering::Relaxed)).unwrap_or(usize::MAX);
                if i >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                for (kind, id, body) in unit(first + i, mix, &t) {
                    let r = http.put(format!("{base}/api/v1/{kind}s/{id}")).bearer_auth(KEY).json(&body).send().await?;
                    let status = r.status();
                    anyhow::ensure!(status == 201, "{kind}/{id}: {status} {}", r.text().await.unwrap_or_default());
                    // Without --mix the partner does not receive consents: the consent owes no delivery.
                    if mix || kind != "consent" {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(usize::try_from(written.load(Ordering::Relaxed))?)
}

/// Deliveries in `state` (counted a page of 500 at a time; `limit` stops early).
async fn count_state(http: &reqwest::Client, base: &str, state: &str, limit: usize) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut after = 0i64;
    let page_size = limit.min(500);
    loop {
        let page: Value = http
            .get(format!("{base}/api/v1/deliveries?state={state}&limit={page_size}&after={after}"))
            .bearer_auth(KEY)
            .send()
            .await?
            .json()
            .await?;
        let items = page["items"].as_array().context("items")?;
        n += items.len();
        match page["next_after"].as_i64() {
            Some(a) if n < limit => after = a,
            _ => return Ok(n),
        }
    }
}

/// The outbox gauges of `/metrics` (published by the worker every 10 s).
async fn gauges(http: &reqwest::Client, base: &str) -> String {
    let text = match http.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter(|l| l.starts_with("carebridge_outbox_") && l.contains("state=\"pending\""))
        .map(|l| l.replace(&format!("partner=\"{PARTNER}\","), ""))
        .collect::<Vec<_>>()
        .join("  ")
}

/// A process's memory in MiB: resident in all, of which anonymous (its heap), mapped files (the database file
/// and its WAL index, shared with the page cache) and shared memory; and the peak resident set.
#[derive(Clone, Copy, Default)]
struct Memory {
    rss: f64,
    anon: f64,
    file: f64,
    shmem: f64,
    hwm: f64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rss {:.1} MiB (anon {:.1}, file {:.1}, shmem {:.1}; peak rss {:.1})",
            self.rss, self.anon, self.file, self.shmem, self.hwm
        )
    }
}

/// Starts the gateway with the outbox on and waits until nothing is pending; returns the seconds it took.
async fn drain(
    http: &reqwest::Client,
    config: &Path,
    deliveries: usize,
    already: usize,
    fake: Option<&Fake>,
    down_secs: u64,
    gateways: usize,
) -> anyhow::Result<f64> {
    let gateway = Gateway::start(config)?;
    // Replicas beside it, on the same database: they share the queue (FOR UPDATE SKIP LOCKED, leases).
    let replicas = (1..gateways).map(|_| Gateway::start(config)).collect::<anyhow::Result<Vec<_>>>()?;
    let started = Instant::now();
    // The most anonymous memory seen (sampled at every poll): the gateway's own, apart from mapped files.
    let mut peak_anon: f64 = 0.0;
    let mut peak_rss_seen: f64 = 0.0;
    if down_secs > 0 {
        println!("partner down (503) for {down_secs} s:");
        let mut tick = 0;
        while started.elapsed() < Duration::from_secs(down_secs) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tick += 1;
            let m = gateway.memory();
            peak_anon = peak_anon.max(m.anon);
            if tick <= 30 && m.hwm > peak_rss_seen + 1.0 {
                // The first 3 s in detail: what the resident set's peak is made of when it is reached.
                println!("  t={:>4.1} s  {m}", f64::from(tick) / 10.0);
            }
            peak_rss_seen = peak_rss_seen.max(m.hwm);
            if tick % 100 == 0 {
                println!("  t={:>3} s  {m}  {}", tick / 10, gauges(http, &gateway.base).await);
            }
        }
        if let Some(f) = fake {
            f.down.store(false, Ordering::Relaxed);
        }
        println!("partner back");
    }
    let back = Instant::now();
    let cpu_at_back = gateway.cpu_seconds() + replicas.iter().map(Gateway::cpu_seconds).sum::<f64>();
    let mut last_print = Instant::now();
    loop {
        let pending = count_state(http, &gateway.base, "pending", 1).await?;
        if pending == 0 {
            break;
        }
        let m = gateway.memory();
        peak_anon = peak_anon.max(m.anon);
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            // The worker's own gauges (every 10 s): counting the queue through the API would compete with it.
            println!("  +{:>5.1} s  {m}  {}", back.elapsed().as_secs_f64(), gauges(http, &gateway.base).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = back.elapsed().as_secs_f64();
    let cpu = gateway.cpu_seconds() + replicas.iter().map(Gateway::cpu_seconds).sum::<f64>() - cpu_at_back;
    println!(
        "the {gateways} gateway(s) used {cpu:.2} CPU-s while draining ({:.0} % of one core; {:.2} ms a delivery)",
        cpu / seconds * 100.0,
        cpu * 1000.0 / deliveries as f64
    );
    let m = gateway.memory();
    peak_anon = peak_anon.max(m.anon);
    let delivered = count_state(http, &gateway.base, "delivered", usize::MAX).await?;
    let dead = count_state(http, &gateway.base, "dead", usize::MAX).await?;
    let held = count_state(http, &gateway.base, "held", usize::MAX).await?;
    println!(
        "drained {deliveries} deliveries in {seconds:.2} s: {:.0}/s  (delivered {delivered}, dead {dead}, held {held}); \
         at the end {m}; most anonymous memory seen {peak_anon:.1} MiB",
        deliveries as f64 / seconds
    );
    anyhow::ensure!(delivered == already + deliveries && dead == 0, "not every delivery was delivered");
    gateway.stop();
    for r in replicas {
        r.stop();
    }
    Ok(seconds)
}

/// The share of the time from the first request of the peer's `log` to the end of its last that the peer spent
/// handling one (it handles one at a time), and that time in seconds.
fn busy(log: &[Value]) -> (f64, f64) {
    let at = |r: &Value| {
        r["time"]
            .as_str()
            .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
    };
    let ms = |r: &Value| r["ms"].as_f64().unwrap_or(0.0);
    let spans: Vec<(f64, f64)> =
        log.iter().filter_map(|r| at(r).map(|t| ((t.unix_timestamp_nanos() as f64) / 1e6, ms(r)))).collect();
    let start = spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let end = spans.iter().map(|s| s.0 + s.1).fold(f64::NEG_INFINITY, f64::max);
    if end <= start {
        return (0.0, 0.0);
    }
    (spans.iter().map(|s| s.1).sum::<f64>() / (end - start), (end - start) / 1000.0)
}

/// Replays the peer's logged requests (after a reset) with `concurrency` clients; returns the seconds it took.
async fn replay(http: &reqwest::Client, peer: &Peer, log: &[Value], concurrency: usize) -> anyhow::Result<f64> {
    let requests: Arc<Vec<Value>> = Arc::new(log.to_vec());
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let origin = peer.base.trim_end_matches("/fhir").to_owned();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, requests, next, failed, origin) =
            (http.clone(), requests.clone(), next.clone(), failed.clone(), origin.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = usize::try_from(next.fetch_add(1, Ordering::Relaxed)).unwrap_or(usize::MAX);
                let Some(r) = requests.get(i) else { return };
                let method = reqwest::Method::from_bytes(r["method"].as_str().unwrap_or("GET").as_bytes())
                    .unwrap_or(reqwest::Method::GET);
                let mut request = http.request(method, format!("{origin}{}", r["url"].as_str().unwrap_or("/")));
                let mut headers = HeaderMap::new();
                for name in ["accept", "content-type", "if-match", "if-none-exist", "prefer"] {
                    if let Some(v) = r["headers"][name].as_str().and_then(|v| v.parse().ok()) {
                        headers.insert(name, v);
                    }
                }
                request = request.headers(headers);
                if !r["body"].is_null() {
                    request = request.body(r["body"].to_string());
                }
                match request.send().await {
                    Ok(answer) if answer.status().is_success() => {
                        let _ = answer.bytes().await;
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "direct: {} requests in {seconds:.2} s ({:.0} requests/s), {} not 2xx",
        log.len(),
        log.len() as f64 / seconds,
        failed.load(Ordering::Relaxed)
    );
    Ok(seconds)
}

async fn run(o: Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = Database::create(&o.backend, dir.path())?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let (base, fake, peer) = if o.partner == "fake" {
        let (base, fake) = start_fake().await?;
        fake.down.store(o.down_secs > 0, Ordering::Relaxed);
        (base, Some(fake), None)
    } else {
        let peer = Peer::start()?;
        (peer.base.clone(), None, Some(peer))
    };
    println!(
        "backend {}, partner {}, {} clients{}, batch {}, concurrency {}",
        o.backend,
        o.partner,
        o.count,
        if o.mix { " with a consent and a referral each" } else { "" },
        o.batch,
        o.concurrency
    );

    if let Some(peer) = &peer {
        // A rehearsal first, with other records, then the peer is reset: a freshly started peer is slower until
        // its JavaScript is compiled, and the measured runs (through the gateway, then directly) should both
        // find it warm.
        let writer = Gateway::start(&config(dir.path(), &o, &db.url, &base, false)?)?;
        let rehearsed = write_records(&http, &writer.base, &o, o.count).await?;
        writer.stop();
        drain(&http, &config(dir.path(), &o, &db.url, &base, true)?, rehearsed, 0, None, 0, 1).await?;
        let status = http.post(peer.harness("reset")).send().await?.status();
        anyhow::ensure!(status.is_success(), "reset: {status}");
        println!("(rehearsal above: {rehearsed} deliveries to warm the peer; it was reset after)");
    }
    let writer = Gateway::start(&config(dir.path(), &o, &db.url, &base, false)?)?;
    let started = Instant::now();
    let deliveries = write_records(&http, &writer.base, &o, 0).await?;
    println!(
        "wrote records owing {deliveries} deliveries in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        deliveries as f64 / started.elapsed().as_secs_f64()
    );
    writer.stop();

    let deliver = config(dir.path(), &o, &db.url, &base, true)?;
    // The rehearsal delivered as many records as this run writes.
    let already = if peer.is_some() { deliveries } else { 0 };
    let through = drain(&http, &deliver, deliveries, already, fake.as_deref(), o.down_secs, o.gateways).await?;
    if let Some(fake) = &fake {
        println!("the fake partner answered {} requests", fake.requests.load(Ordering::Relaxed));
    }
    if let Some(peer) = &peer {
        let log: Vec<Value> = http.get(peer.harness("requests")).send().await?.json().await?;
        let log: Vec<Value> = log.into_iter().filter(|r| r["status"].as_u64().is_some_and(|s| s < 300)).collect();
        anyhow::ensure!(log.len() < 2000, "the peer keeps its last 2,000 requests only: lower --count");
        let answered = log.len();
        let status = http.post(peer.harness("reset")).send().await?.status();
        anyhow::ensure!(status.is_success(), "reset: {status}");
        let busy_gateway = busy(&log);
        let direct = replay(&http, peer, &log, usize::try_from(o.concurrency)?).await?;
        let replayed: Vec<Value> = http.get(peer.harness("requests")).send().await?.json().await?;
        let busy_direct = busy(&replayed);
        println!(
            "at the peer, from its first request to the end of its last: through the gateway {:.2} s, busy {:.0} % \
             of it; directly {:.2} s, busy {:.0} % (one request at a time there: below 100 % it waited for the next); \
             ratio of those spans (direct / gateway) {:.2}",
            busy_gateway.1,
            busy_gateway.0 * 100.0,
            busy_direct.1,
            busy_direct.0 * 100.0,
            busy_direct.1 / busy_gateway.1
        );
        println!(
            "through the gateway: {deliveries} deliveries ({answered} requests) in {through:.2} s = {:.0}/s; \
             directly: {direct:.2} s = {:.0}/s; ratio (gateway / direct) {:.2}",
            deliveries as f64 / through,
            deliveries as f64 / direct,
            direct / through
        );
    }
    drop(db);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(run(o))
}
