//! The closed loop, measured: referrals hospitals send in, and the sweep that follows referrals sent out.
//!
//! ```text
//! cargo bench --bench closed_loop -- --mode inbound --seconds 20 --concurrency 16
//! cargo bench --bench closed_loop -- --mode sweep --open 10000
//! cargo bench --bench closed_loop -- --mode fhir-search --open 2000
//! ```
//!
//! `inbound` starts the release binary on a fresh SQLite file and keeps `--concurrency` hospitals (connections with
//! the partner key of `st-marys-ehr`) POSTing Gravity transactions (Task + ServiceRequest + Patient, each a new
//! patient and a new Task) to `/fhir` for `--seconds`: every one a new client and a new referral, durable before the
//! answer. Prints throughput and latency percentiles. The load generator shares the 2-core machine.
//!
//! `sweep` runs in this process: `--open` referrals sent to one partner (their Tasks in the crosswalk), a partner
//! server (an axum fake) whose `_lastUpdated` search returns the Tasks changed since the last sweep, and one sweep
//! timed for 0, 10 and 100 changed Tasks, with `--open` open referrals and with 200: the cost should follow the
//! changed Tasks, not the open ones.
//!
//! `fhir-search` starts the release binary, takes in `--open` referrals from two hospitals, and times the `/fhir/Task`
//! searches one hospital makes (by `_id`, by status, by a recent `_lastUpdated`, and a page of all).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use carebridge::keys::KeyHash;
use serde_json::{Value, json};

struct Options {
    mode: String,
    seconds: u64,
    warmup: u64,
    concurrency: usize,
    open: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options { mode: "inbound".into(), seconds: 20, warmup: 3, concurrency: 16, open: 10_000 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value is missing after a flag");
        match arg.as_str() {
            "--mode" => o.mode = value()?,
            "--seconds" => o.seconds = value()?.parse()?,
            "--warmup" => o.warmup = value()?.parse()?,
            "--concurrency" => o.concurrency = value()?.parse()?,
            "--open" => o.open = value()?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    match o.mode.as_str() {
        "inbound" => inbound(&o),
        "fhir-search" => fhir_search(&o),
        "sweep" => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(sweep(&o))
        }
        other => bail!("--mode is inbound, sweep or fhir-search, not {other}"),
    }
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

const HOSPITAL_KEY: &str = "bench-hospital-key";
const MEDICAID: &str = "urn:oid:2.16.840.1.113883.4.3.25";

fn referral(worker: usize, n: u64) -> Value {
    let patient = format!("OR{worker:03}{n:07}");
    json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001", "resource": {
            "resourceType": "Patient", "identifier": [{"system": MEDICAID, "value": patient}],
            "name": [{"family": "Bench", "given": ["Pat"]}], "gender": "female", "birthDate": "1980-01-01"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000002", "resource": {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "75516001"}]},
            "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "366979004"}]}],
            "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000003", "resource": {
            "resourceType": "Task", "status": "requested", "intent": "order",
            "identifier": [{"system": "https://hospital.example/task", "value": format!("T-{worker}-{n}")}],
            "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
            "focus": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000002"},
            "for": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Task"}}
    ]})
}

/// The release gateway on a fresh SQLite file with hospital keys (the first `hospitals` of `HOSPITALS`) and an
/// agency key; its address.
struct Gateway {
    server: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

const HOSPITALS: [(&str, &str); 2] = [("st-marys-ehr", HOSPITAL_KEY), ("county-hospital", "bench-county-key")];
const AGENCY_KEY: &str = "bench-agency-key";

fn start_gateway() -> anyhow::Result<Gateway> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}", dir.path().join("bench.db").display());
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"{url}\"\nmax_connections = 16\n[log]\nformat = \"json\"\nfilter = \"info\"\n\
         [[api_keys]]\nname = \"agency\"\nhash = \"{}\"\nscopes = [\"read\", \"write\"]\n",
        KeyHash::generate(AGENCY_KEY).map_err(|e| anyhow::anyhow!("{e}"))?
    );
    for (name, key) in HOSPITALS {
        let hash = KeyHash::generate(key).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.push_str(&format!(
            "[[api_keys]]\nname = \"{name}\"\nhash = \"{hash}\"\nscopes = [\"read\", \"write\"]\npartner = \"{name}\"\n"
        ));
    }
    for (name, _) in HOSPITALS {
        config.push_str(&format!(
            "[[partners]]\nname = \"{name}\"\nbase_url = \"https://fhir.{name}.example/r4\"\n\
             receives = [\"referral\"]\npatient_match = [\"{MEDICAID}\"]\n"
        ));
    }
    let file = dir.path().join("bench.toml");
    std::fs::write(&file, config)?;
    let mut server = Command::new(env!("CARGO_BIN_EXE_carebridge"))
        .args(["serve", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(server.stderr.take().context("stderr")?));
    let addr = loop {
        let line = lines.next().context("the server stopped before listening")??;
        if line.contains("Listening.") {
            let event: Value = serde_json::from_str(&line)?;
            break event["addr"].as_str().context("addr")?.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Ok(Gateway { server, addr, _dir: dir })
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.server.id().to_string()]).status();
        let _ = self.server.wait();
    }
}

fn inbound(o: &Options) -> anyhow::Result<()> {
    let gateway = start_gateway()?;
    let addr = gateway.addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let result = rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(o.concurrency + 2).build()?;
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for worker in 0..o.concurrency {
            let (client, measuring, stop) = (client.clone(), measuring.clone(), stop.clone());
            let url = format!("http://{addr}/fhir");
            tasks.push(tokio::spawn(async move {
                let (mut latencies, mut failures, mut n) = (Vec::new(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = referral(worker, n).to_string();
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .bearer_auth(HOSPITAL_KEY)
                        .header("content-type", "application/fhir+json")
                        .body(body)
                        .send()
                        .await;
                    let ok = matches!(&response, Ok(r) if r.status() == 200);
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
        let (mut all, mut failures) = (Vec::new(), 0);
        for t in tasks {
            let (l, f) = t.await?;
            all.extend(l);
            failures += f;
        }
        anyhow::ensure!(!all.is_empty(), "no referral was taken in");
        let n = all.len();
        let (p50, p99, max) = percentiles(all);
        println!(
            "inbound transactions backend=sqlite hospitals={} seconds={:.1}: {n} referrals, {:.0}/s, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms, failures {failures}",
            o.concurrency,
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64()
        );
        Ok(())
    });
    drop(gateway);
    result
}

/// `/fhir` searches a hospital makes, over `--open` inbound referrals from two hospitals (half each), each timed
/// 50 times in a row: by `_id`, by a Task status none has, by a recent `_lastUpdated`, and a page of all its Tasks
/// (every candidate rendered: the cost the narrowed searches avoid).
fn fhir_search(o: &Options) -> anyhow::Result<()> {
    let gateway = start_gateway()?;
    let addr = gateway.addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(8).build()?;
        let mut first_id = String::new();
        for n in 0..o.open {
            let (_, key) = HOSPITALS[n % 2];
            let r = client
                .post(format!("http://{addr}/fhir"))
                .bearer_auth(key)
                .header("content-type", "application/fhir+json")
                .body(referral(n % 2, n as u64).to_string())
                .send()
                .await?;
            anyhow::ensure!(r.status() == 200, "seeding: {}", r.status());
            if n == 0 {
                let answer: Value = r.json().await?;
                first_id = answer["entry"][2]["response"]["location"]
                    .as_str()
                    .and_then(|l| l.split('/').nth(1))
                    .context("location")?
                    .to_owned();
            }
        }
        let recent = (time::OffsetDateTime::now_utc() - time::Duration::seconds(1))
            .format(&time::format_description::well_known::Rfc3339)?;
        let queries = [
            ("_id", format!("_id={first_id}")),
            ("status (none)", "status=completed".to_owned()),
            ("_lastUpdated (recent)", format!("_lastUpdated=gt{recent}")),
            ("all, _count=50", "_count=50".to_owned()),
        ];
        for (label, q) in queries {
            let mut times = Vec::new();
            let mut total = 0;
            for _ in 0..50 {
                let started = Instant::now();
                let r = client.get(format!("http://{addr}/fhir/Task?{q}")).bearer_auth(HOSPITAL_KEY).send().await?;
                anyhow::ensure!(r.status() == 200, "{q}: {}", r.status());
                let page: Value = r.json().await?;
                times.push(started.elapsed());
                total = page["total"].as_u64().unwrap_or(0);
            }
            let (p50, p99, max) = percentiles(times);
            println!(
                "fhir search open={} (two hospitals) {label}: total {total}, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
                o.open
            );
        }
        Ok(())
    })
}

/// What the fake partner answers from: the first and the end of the Tasks changed, the searches seen, its base.
type FakeState = (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<String>);

/// The partner of the sweep: its Task search returns the Tasks it changed since the last sweep (`t-<from>` up to
/// `t-<changed>`), `_count` a page, with `next` links.
async fn fake_partner(
    from: Arc<AtomicUsize>,
    changed: Arc<AtomicUsize>,
    searches: Arc<AtomicUsize>,
) -> anyhow::Result<SocketAddr> {
    use axum::extract::{Query, State};
    async fn search(
        State((from, changed, searches, base)): State<FakeState>,
        Query(q): Query<std::collections::HashMap<String, String>>,
    ) -> axum::response::Response {
        searches.fetch_add(1, Ordering::Relaxed);
        let count: usize = q.get("_count").and_then(|c| c.parse().ok()).unwrap_or(100);
        let page: usize = q.get("page").and_then(|c| c.parse().ok()).unwrap_or(0);
        let total = changed.load(Ordering::Relaxed);
        let now =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let first = from.load(Ordering::Relaxed);
        let entries: Vec<Value> = (first + page * count..total.min(first + (page + 1) * count))
            .map(|i| {
                json!({"resource": {"resourceType": "Task", "id": format!("t-{i}"), "status": "accepted",
                "intent": "order", "meta": {"versionId": "2", "lastUpdated": now}}, "search": {"mode": "match"}})
            })
            .collect();
        let mut links = vec![];
        if first + (page + 1) * count < total {
            links.push(json!({"relation": "next", "url": format!("{base}/Task?_count={count}&page={}", page + 1)}));
        }
        let body = json!({"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries});
        ([("content-type", "application/fhir+json")], body.to_string()).into_response()
    }
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let base = Arc::new(format!("http://{addr}/fhir"));
    let app =
        axum::Router::new().route("/fhir/Task", axum::routing::get(search)).with_state((from, changed, searches, base));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn sweep(o: &Options) -> anyhow::Result<()> {
    use carebridge::domain::{Client, RecordId, RecordKind, Referral};
    use carebridge::followup::poll::Poller;
    use carebridge::intake::{self, Intake};
    use carebridge::partners::{PartnerSettings, Partners};
    use carebridge::store::{self, Actor, Change, CrosswalkEntry, Precondition};

    let from = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(AtomicUsize::new(0));
    let searches = Arc::new(AtomicUsize::new(0));
    let addr = fake_partner(from.clone(), changed.clone(), searches.clone()).await?;
    let mappings =
        Arc::new(carebridge::mapping::Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"))?);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agency");
    println!("open referrals | changed Tasks | sweep ms | searches");
    for open in [o.open, 200] {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite:{}", dir.path().join("bench.db").display());
        let store = store::connect(&url, 4, Duration::from_secs(5)).await?;
        let partner: PartnerSettings = serde_json::from_value(json!({"name": "hospital",
            "base_url": format!("http://{addr}/fhir"), "receives": ["referral"]}))?;
        let partners = Arc::new(Partners::new(&[partner]));
        let actor = Actor { key_name: "bench".into(), request_id: "bench".into(), partner: None };
        let intake = Intake { store: &*store, partners: &partners };
        let client: Client = serde_json::from_str(&std::fs::read_to_string(root.join("client/cl-1001.json"))?)?;
        let now = time::OffsetDateTime::now_utc();
        intake::put(
            intake,
            RecordId::parse("cl-1001").map_err(anyhow::Error::msg)?,
            client,
            Precondition::None,
            &actor,
            Change::Put,
            now,
        )
        .await?;
        let mut template: Value = serde_json::from_str(&std::fs::read_to_string(root.join("referral/ref-4001.json"))?)?;
        template["target"]["partner"] = json!("hospital");
        for key in ["id", "consent_id", "care_plan_id", "goal_ids"] {
            template.as_object_mut().context("object")?.remove(key);
        }
        let started = Instant::now();
        let mut crosswalk = Vec::new();
        for chunk in (0..open).collect::<Vec<_>>().chunks(64) {
            let actor = &actor;
            let writes = chunk.iter().map(|i| {
                let referral: Referral = serde_json::from_value(template.clone()).expect("the template is a referral");
                let id = RecordId::parse(&format!("ref-{i}")).expect("an id");
                async move { intake::put(intake, id, referral, Precondition::None, actor, Change::Put, now).await }
            });
            for w in futures_util::future::join_all(writes).await {
                w?;
            }
            crosswalk.extend(chunk.iter().map(|i| CrosswalkEntry {
                partner: "hospital".into(),
                local_ref: format!("Task/ref-{i}"),
                kind: RecordKind::Referral,
                record_id: RecordId::parse(&format!("ref-{i}")).expect("an id"),
                remote_type: "Task".into(),
                remote_id: format!("t-{i}"),
                version_id: Some("1".into()),
                content_hash: "sent".into(),
            }));
        }
        store.save_crosswalk(&crosswalk, now).await?;
        eprintln!("{open} open referrals written in {:.1} s", started.elapsed().as_secs_f64());
        let poller = Poller::new(store.clone(), mappings.clone(), partners.clone(), Duration::from_secs(5))
            .map_err(|e| anyhow::anyhow!(e))?;
        // The first sweep sets the cursor.
        from.store(0, Ordering::Relaxed);
        changed.store(0, Ordering::Relaxed);
        poller.sweep_all(time::OffsetDateTime::now_utc()).await?;
        let mut offset = 0;
        for n in [0usize, 10, 100] {
            // The partner changes `n` Tasks it has not changed before (each a new version).
            from.store(offset, Ordering::Relaxed);
            changed.store(offset + n, Ordering::Relaxed);
            searches.store(0, Ordering::Relaxed);
            let t = Instant::now();
            let reports = poller.sweep_all(time::OffsetDateTime::now_utc()).await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let applied: usize = reports.iter().map(|(_, r)| r.applied).sum();
            anyhow::ensure!(applied == n, "{applied} applied of {n} changed: {reports:?}");
            println!("{open:>14} | {n:>13} | {ms:>8.1} | {}", searches.load(Ordering::Relaxed));
            offset += n;
        }
        store.close().await;
    }
    Ok(())
}
