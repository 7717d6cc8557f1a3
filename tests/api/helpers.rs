//! Test harness: the gateway in-process on 127.0.0.1:0 with a temporary SQLite file, the real binary as a child
//! process for crash, signal and log tests, and the fixture records.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use carebridge::app::Application;
use carebridge::config::{ApiKeySettings, Overrides, Scope, Settings};
use carebridge::keys::KeyHash;
use serde_json::Value;
use tempfile::TempDir;

/// Key with every scope.
pub const ADMIN_KEY: &str = "test-admin-key";
/// Key with read and write.
pub const WRITER_KEY: &str = "test-writer-key";
/// Key with read only.
pub const READER_KEY: &str = "test-reader-key";
/// The key of partner `st-marys-ehr` (read and write, on `/fhir` only).
pub const ST_MARYS_KEY: &str = "test-st-marys-key";
/// The key of partner `county-crisis-team` (read and write, on `/fhir` only).
pub const COUNTY_KEY: &str = "test-county-key";

/// The three test keys, hashed as the configuration keeps them.
pub fn test_keys() -> Vec<ApiKeySettings> {
    [
        ("admin", ADMIN_KEY, vec![Scope::Read, Scope::Write, Scope::Admin]),
        ("writer", WRITER_KEY, vec![Scope::Read, Scope::Write]),
        ("reader", READER_KEY, vec![Scope::Read]),
        ("st-marys-key", ST_MARYS_KEY, vec![Scope::Read, Scope::Write]),
        ("county-key", COUNTY_KEY, vec![Scope::Read, Scope::Write]),
    ]
    .into_iter()
    .map(|(name, key, scopes)| ApiKeySettings {
        name: name.into(),
        hash: KeyHash::generate(key).expect("randomness").to_string(),
        scopes,
        partner: match key {
            ST_MARYS_KEY => Some("st-marys-ehr".into()),
            COUNTY_KEY => Some("county-crisis-team".into()),
            _ => None,
        },
    })
    .collect()
}

/// A gateway running in this process.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// HTTP client.
    pub client: reqwest::Client,
    /// The temporary directory holding the database.
    pub dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Settings for a test: port 0, a SQLite file in `dir`, the test keys.
pub fn test_settings(dir: &Path) -> Settings {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        database: Some(format!("sqlite:{}", dir.join("carebridge.db").display())),
    };
    let mut settings = Settings::load_with_env(None, &overrides, []).expect("test settings load");
    settings.api_keys = test_keys();
    // The directory the fixture referrals name as their targets, as the demo configures it; never synced unless a
    // test asks, so their targets are taken unchecked.
    settings.directories = vec![
        serde_json::from_value(serde_json::json!({
            "type": "hsds_package",
            "name": "demo-directory",
            "path": concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds"),
        }))
        .expect("a directory source"),
    ];
    settings.partners = toml::from_str::<PartnersFile>(FIXTURE_PARTNERS).expect("the fixture partners").partners;
    // The fixture partners are fictional hosts: tests that deliver run the worker themselves, stepping `now`.
    settings.outbox.enabled = false;
    settings
}

/// The partners the fixture records name, as the demo configures them.
pub const FIXTURE_PARTNERS: &str = r#"
[[partners]]
name = "st-marys-ehr"
base_url = "https://fhir.stmarys.example/r4"
receives = ["client", "assessment", "care-plan", "referral", "consent"]
overlay = "st-marys-ehr"
max_transaction_entries = 8
policy = "treating-provider"

[[partners]]
name = "county-crisis-team"
base_url = "https://fhir.county-crisis.example/r4"
receives = ["client", "referral", "consent"]
overlay = "county-crisis-team"
policy = "treating-provider"

[[partners]]
name = "harbor-recovery-center"
base_url = "https://fhir.harbor-recovery.example/r4"
receives = ["client", "referral", "consent"]
policy = "part2-program"
"#;

#[derive(serde::Deserialize)]
struct PartnersFile {
    partners: Vec<carebridge::partners::PartnerSettings>,
}

/// Starts the gateway with the test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the gateway with the test settings, changed by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path());
    adjust(&mut settings);
    let app = Application::build(&settings).await.expect("the gateway starts");
    // Searches go to the in-memory index once it is built (SQL before): the tests search the index.
    assert!(app.search().wait_built(Duration::from_secs(30)).await, "the search index was not built in 30 s");
    let addr = app.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp { base: format!("http://{addr}"), client: reqwest::Client::new(), dir, stop: Some(stop), task: Some(task) }
}

impl TestApp {
    /// A request with the admin key.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base)).bearer_auth(ADMIN_KEY)
    }

    /// `PUT` a JSON body with the admin key.
    pub async fn put(&self, path: &str, body: &Value) -> reqwest::Response {
        self.request(reqwest::Method::PUT, path).json(body).send().await.expect("request sent")
    }

    /// `GET` with the admin key.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path).send().await.expect("request sent")
    }

    /// `POST` a JSON body with the admin key.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.request(reqwest::Method::POST, path).json(body).send().await.expect("request sent")
    }

    /// Stores every fixture record through the API, as a newcomer's curl loop would.
    pub async fn load_fixtures(&self) -> usize {
        let mut n = 0;
        for (kind, id, body) in fixtures() {
            let response = self.put(&format!("/api/v1/{kind}s/{id}"), &body).await;
            assert_eq!(response.status(), 201, "fixture {kind}/{id}: {}", response.text().await.unwrap_or_default());
            n += 1;
        }
        n
    }

    /// Stores the fixture clients, whose other records name them (intake refuses a record of a client it does not
    /// hold).
    pub async fn put_clients(&self) {
        for (kind, id, body) in fixtures().into_iter().filter(|(k, _, _)| k == "client") {
            let response = self.put(&format!("/api/v1/{kind}s/{id}"), &body).await;
            assert!(response.status().is_success(), "fixture {kind}/{id}: {}", response.status());
        }
    }

    /// Stops the gateway the way SIGTERM would, and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server stopped cleanly");
        }
    }
}

/// Every fixture record: (kind, id, body), kinds as in `fixtures/agency/<kind>/`.
pub fn fixtures() -> Vec<(String, String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agency");
    let mut out = Vec::new();
    for kind in ["client", "assessment", "care-plan", "referral", "consent"] {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(root.join(kind)).expect("fixture directory").map(|e| e.expect("entry").path()).collect();
        files.sort();
        for path in files {
            let id = path.file_stem().and_then(|s| s.to_str()).expect("file name").to_owned();
            let body: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("fixture JSON");
            out.push((kind.to_owned(), id, body));
        }
    }
    out
}

/// One fixture record.
pub fn fixture(kind: &str, id: &str) -> Value {
    fixtures().into_iter().find(|(k, i, _)| k == kind && i == id).map(|(_, _, b)| b).expect("fixture exists")
}

/// The real `carebridge` binary, serving with a config file in a temporary directory.
pub struct ServerProcess {
    /// The child.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every stderr line read so far, and the rest as it comes.
    lines: mpsc::Receiver<String>,
    /// Lines read so far.
    pub seen: Vec<String>,
}

/// Writes a config for the binary: port 0, SQLite in `dir`, JSON logs, the test keys, the fixture partners.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    write_config_with_partners(dir, FIXTURE_PARTNERS, extra)
}

/// [`write_config`] with these `[[partners]]` instead of the fixture partners.
pub fn write_config_with_partners(dir: &Path, partners: &str, extra: &str) -> PathBuf {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 10\n[database]\nurl = \"sqlite:{}\"\n[log]\nformat = \"json\"\nfilter = \"debug\"\n",
        dir.join("carebridge.db").display()
    );
    // A partner's key belongs to a configured partner: keys of partners this configuration lacks are left out.
    for key in test_keys()
        .into_iter()
        .filter(|k| k.partner.as_ref().is_none_or(|p| partners.contains(&format!("name = \"{p}\""))))
    {
        let scopes: Vec<String> = key.scopes.iter().map(|s| format!("\"{}\"", s.as_str())).collect();
        text.push_str(&format!(
            "[[api_keys]]\nname = \"{}\"\nhash = \"{}\"\nscopes = [{}]\n",
            key.name,
            key.hash,
            scopes.join(", ")
        ));
        if let Some(partner) = &key.partner {
            text.push_str(&format!("partner = \"{partner}\"\n"));
        }
    }
    text.push_str(partners);
    if !extra.contains("[outbox]") {
        text.push_str("[outbox]\nenabled = false\n");
    }
    text.push_str(extra);
    let path = dir.join("carebridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

impl ServerProcess {
    /// Starts `carebridge serve --config CONFIG` and waits for its "Listening." line.
    pub fn start(config: &Path) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_carebridge"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr: ChildStderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = ServerProcess { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), lines, seen: Vec::new() };
        let line = server.wait_for_line("Listening.");
        let event: Value = serde_json::from_str(&line).expect("JSON log line");
        server.addr = event["addr"].as_str().expect("addr field").parse().expect("socket address");
        server
    }

    /// Reads stderr until a line contains `needle` (the process writes it; a minute is a generous bound for a
    /// debug build on a loaded machine).
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no log line with {needle:?} ({e}); saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every stderr line until the process closes it.
    pub fn drain(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(60)) {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// `http://ADDR`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends a signal with kill(1).
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends raw bytes to the server and reads the whole answer (the request should say `connection: close`).
pub async fn raw_http(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer (413) and close before it has read everything; a failed write is then expected.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

impl TestApp {
    /// `GET` with the admin key, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.expect("JSON body")
    }
}

/// `field` of every element of `list[array]`, e.g. the ids of a page or the actions of a history.
pub fn pluck(list: &Value, array: &str, field: &str) -> Vec<String> {
    list[array]
        .as_array()
        .unwrap_or_else(|| panic!("no array {array} in {list}"))
        .iter()
        .map(|item| item[field].as_str().map_or_else(|| item[field].to_string(), str::to_owned))
        .collect()
}

/// Starts a sync job of `source` (`POST /api/v1/directories/{source}/sync?{query}`), expects 202 with a
/// `Location`, and follows it there until it ends: the job as it ended.
pub async fn finished_sync(app: &TestApp, source: &str, query: &str) -> Value {
    let response = app.post(&format!("/api/v1/directories/{source}/sync?{query}"), &serde_json::json!({})).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
    let location = response.headers()["location"].to_str().expect("a Location").to_owned();
    let started: Value = response.json().await.expect("the job");
    assert!(location.ends_with(started["id"].as_str().expect("a job id")), "{location} {started}");
    wait_for_job(app, &location).await
}

/// Reads the job at `location` until it has ended (a sync of the test directories takes well under a minute).
pub async fn wait_for_job(app: &TestApp, location: &str) -> Value {
    // Each read waits up to 10 s for the job to end (the gateway polls its store, not the test).
    for _ in 0..12 {
        let job = app.get_json(&format!("{location}?wait_secs=10")).await;
        if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
            return job;
        }
    }
    panic!("the sync job at {location} did not end within two minutes");
}

/// Syncs `source` as [`finished_sync`] does, expects it to succeed, and returns its report.
pub async fn synced_report(app: &TestApp, source: &str, query: &str) -> Value {
    let job = finished_sync(app, source, query).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    job["report"].clone()
}
