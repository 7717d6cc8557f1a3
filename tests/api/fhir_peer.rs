//! The FHIR R4 server of `../shared/interop` (Medplum's router, in memory) as a test peer: a directory source to
//! sync from, a partner EHR to deliver to (with fault injection and a request log).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;

const FHIR_JSON: &str = "application/fhir+json";

/// The interop tools beside the repository.
pub fn interop() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/interop")
}

/// A FHIR peer (`ehr/start.sh PORT`) with its own run directory, stopped by `ehr/stop.sh PORT` when dropped, also
/// when the test panics.
pub struct Peer {
    pub port: u16,
    run_dir: TempDir,
    /// `http://127.0.0.1:PORT/fhir`.
    pub base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Peer {
    /// Starts a peer with these `EHR_*` variables (and none inherited from the caller's environment).
    pub fn start(env: &[(&str, &str)]) -> Peer {
        let start = interop().join("ehr/start.sh");
        assert!(
            start.is_file(),
            "The FHIR peer is missing: {} does not exist. These tests need the interop tools beside the \
             repository (../shared/interop, see its README).",
            start.display()
        );
        let node = Command::new("node").arg("--version").output();
        assert!(
            node.as_ref().is_ok_and(|o| o.status.success()),
            "Node.js is missing (`node --version` failed: {node:?}); the FHIR peer of ../shared/interop needs it."
        );
        let token = env.iter().find(|(k, _)| *k == "EHR_BEARER_TOKEN").map(|(_, v)| (*v).to_owned());
        let mut clashes = Vec::new();
        // The port may be taken between the probe and the start (start.sh then exits 1 with EADDRINUSE).
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
            // The guard exists before the peer does, so it is stopped whatever happens next.
            let mut peer = Peer {
                port,
                run_dir: tempfile::tempdir().expect("temp dir"),
                base: String::new(),
                client: reqwest::Client::new(),
                token: token.clone(),
            };
            let mut command = Command::new(&start);
            command.arg(port.to_string()).env("EHR_RUN_DIR", peer.run_dir.path());
            for var in ["EHR_BEARER_TOKEN", "EHR_VALIDATE", "EHR_DEFAULT_COUNT", "EHR_BASE_PATH"] {
                command.env_remove(var);
            }
            let output = command.envs(env.iter().copied()).output().expect("start.sh runs");
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            if output.status.success() {
                peer.base = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                assert!(peer.base.starts_with("http://127.0.0.1:"), "start.sh printed no base URL:\n{stderr}");
                return peer;
            }
            assert!(stderr.contains("EADDRINUSE"), "The FHIR peer did not start:\n{stderr}");
            clashes.push(stderr);
        }
        panic!("The FHIR peer found no free port:\n{}", clashes.join("\n"));
    }

    /// A request to the peer, with its token when it has one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("/_harness") {
            format!("{}{path}", self.base.trim_end_matches("/fhir"))
        } else if path.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{path}", self.base)
        };
        let request = self.client.request(method, url).header(reqwest::header::ACCEPT, FHIR_JSON);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a FHIR request and returns the status and JSON body (`null` when there is none).
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, FHIR_JSON).body(body.to_string());
        }
        let response = request.send().await.expect("the peer answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// POSTs the fixture transaction; returns the server's id of each entry, in the order of the Bundle.
    pub async fn load_fixture(&self) -> Vec<String> {
        let bundle: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/fhir/directory.json"))
                .expect("fixture"),
        )
        .expect("fixture JSON");
        let (status, answer) = self.send(reqwest::Method::POST, "", Some(&bundle)).await;
        assert_eq!(status, 200, "transaction refused: {answer}");
        answer["entry"]
            .as_array()
            .expect("response entries")
            .iter()
            .map(|e| {
                let location = e["response"]["location"].as_str().expect("a location");
                location.split('/').nth(1).expect("Type/id/_history/v").to_owned()
            })
            .collect()
    }

    /// Queues a fault (`{"mode": "before", "status": 503, …}`, see the interop README).
    pub async fn fault(&self, fault: Value) {
        let (status, answer) = self.send(reqwest::Method::POST, "/_harness/faults", Some(&fault)).await;
        assert!((200..300).contains(&status), "fault refused: {answer}");
    }

    /// Every resource of `resource_type` the peer holds (all pages).
    pub async fn all(&self, resource_type: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let (status, page) =
                self.send(reqwest::Method::GET, &format!("{resource_type}?_count=1000&_offset={offset}"), None).await;
            assert_eq!(status, 200, "search {resource_type}: {page}");
            let entries = page["entry"].as_array().cloned().unwrap_or_default();
            let n = entries.len();
            out.extend(entries.into_iter().map(|e| e["resource"].clone()));
            if n < 1000 {
                return out;
            }
            offset += n;
        }
    }

    /// Creates one resource; returns its id.
    pub async fn create(&self, resource: &Value) -> String {
        let kind = resource["resourceType"].as_str().expect("resourceType");
        let (status, created) = self.send(reqwest::Method::POST, kind, Some(resource)).await;
        assert_eq!(status, 201, "create refused: {created}");
        created["id"].as_str().expect("an id").to_owned()
    }

    /// The requests the peer received (`method`, `url`, `headers`, `authorization`, `status`…), oldest first.
    pub async fn requests(&self) -> Vec<Value> {
        let (status, log) = self.send(reqwest::Method::GET, "/_harness/requests", None).await;
        assert_eq!(status, 200);
        log.as_array().expect("request log").clone()
    }
}

/// `METHOD URL STATUS` of each logged request, for failure messages.
pub fn summary(log: &[Value]) -> Vec<String> {
    log.iter().map(|r| format!("{} {} {}", r["method"], r["url"], r["status"])).collect()
}

impl Drop for Peer {
    fn drop(&mut self) {
        let stopped = Command::new(interop().join("ehr/stop.sh"))
            .arg(self.port.to_string())
            .env("EHR_RUN_DIR", self.run_dir.path())
            .output();
        if !stopped.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("ehr/stop.sh {} failed: {stopped:?}", self.port);
        }
    }
}
