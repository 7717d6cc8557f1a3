//! The real binary: crash safety, graceful shutdown, configuration errors, and logs without PHI.

use std::io::{Read, Write};
use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{ADMIN_KEY, ServerProcess, fixture, write_config};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// `PUT`s each fixture and keeps what the gateway answered, for [`assert_all_kept`].
fn put_fixtures(
    server: &ServerProcess,
    records: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str, Value)> {
    records
        .iter()
        .map(|&(kind, id)| {
            let response = client()
                .put(format!("{}/api/v1/{kind}s/{id}", server.base()))
                .bearer_auth(ADMIN_KEY)
                .json(&fixture(kind, id))
                .send()
                .expect("sent");
            assert_eq!(response.status(), 201);
            (kind, id, response.json::<Value>().expect("JSON"))
        })
        .collect()
}

/// Every record answered before is there, unchanged, on `server` (started again on the same database).
fn assert_all_kept(server: &ServerProcess, records: Vec<(&str, &str, Value)>) {
    for (kind, id, body) in records {
        let response =
            client().get(format!("{}/api/v1/{kind}s/{id}", server.base())).bearer_auth(ADMIN_KEY).send().expect("sent");
        assert_eq!(response.status(), 200, "{kind}/{id} lost");
        assert_eq!(response.json::<Value>().expect("JSON"), body, "{kind}/{id} changed");
    }
}

#[test]
fn a_record_answered_201_survives_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let sent;
    {
        let server = ServerProcess::start(&config);
        sent = put_fixtures(&server, &[("client", "cl-1002"), ("referral", "ref-4003"), ("consent", "co-5003")]);
        // SIGKILL right after the last 201: no shutdown hook runs.
        let mut child = server;
        child.child.kill().expect("kill -9");
        child.child.wait().expect("reaped");
    }
    assert_all_kept(&ServerProcess::start(&config), sent);
}

#[test]
fn sigterm_lets_a_request_in_flight_finish_then_exits_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let mut server = ServerProcess::start(&config);
    let body = serde_json::to_vec(&fixture("client", "cl-1004")).expect("JSON");
    let (first, rest) = body.split_at(body.len() / 2);
    let mut stream = std::net::TcpStream::connect(server.addr).expect("connect");
    write!(
        stream,
        "PUT /api/v1/clients/cl-1004 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .expect("write head");
    stream.write_all(first).expect("write half the body");
    stream.flush().expect("flush");
    // Make sure the server is inside this request before the signal: it has logged nothing for it yet, so wait
    // for the request span to exist by asking for readiness on another connection first.
    let ready = client().get(format!("{}/readyz", server.base())).send().expect("sent");
    assert_eq!(ready.status(), 200);
    server.signal("TERM");
    server.wait_for_line("Shutdown requested");
    stream.write_all(rest).expect("write the rest");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read answer");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let status = server.child.wait().expect("exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(std::net::TcpStream::connect(server.addr).is_err(), "still listening after shutdown");
}

#[test]
fn logs_never_contain_names_birth_dates_or_notes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let mut server = ServerProcess::start(&config);
    let base = server.base();
    let secrets = ["Zebulon", "Quackenbush", "1966-04-17", "Xyzzy-confidential-note", "+1-555-0199", "97999-0042"];
    let mut client_record = fixture("client", "cl-1001");
    client_record["given_name"] = json!("Zebulon");
    client_record["family_name"] = json!("Quackenbush");
    client_record["birth_date"] = json!("1966-04-17");
    client_record["phone"] = json!("+1-555-0199");
    client_record["address"]["postal_code"] = json!("97999-0042");
    let mut referral = fixture("referral", "ref-4001");
    referral["notes"][0]["text"] = json!("Xyzzy-confidential-note");
    referral["reason"] = json!("Zebulon Quackenbush asked for help");
    let http = client();
    let put = |path: &str, body: &Value| {
        http.put(format!("{base}{path}")).bearer_auth(ADMIN_KEY).json(body).send().expect("sent").status().as_u16()
    };
    assert_eq!(put("/api/v1/clients/cl-1001", &client_record), 201);
    assert_eq!(put("/api/v1/referrals/ref-4001", &referral), 201);
    // Refused input carries the secrets too: the problem goes back to the caller, never into the log.
    let mut bad = client_record.clone();
    bad["gender"] = json!("Zebulon");
    assert_eq!(put("/api/v1/clients/cl-1001", &bad), 422);
    bad = client_record.clone();
    bad["birth_date"] = json!("Quackenbush");
    assert_eq!(put("/api/v1/clients/cl-1001", &bad), 422);
    let mut future = client_record.clone();
    future["given_name"] = json!("   ");
    assert_eq!(put("/api/v1/clients/cl-1001", &future), 422);
    assert_eq!(
        http.post(format!("{base}/api/v1/referrals/ref-4001/status"))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"status": "cancelled", "reason": "Xyzzy-confidential-note"}))
            .send()
            .expect("sent")
            .status(),
        200
    );
    let text = http
        .get(format!("{base}/api/v1/clients/cl-1001"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .expect("sent")
        .text()
        .expect("body");
    assert!(text.contains("Zebulon"), "the record itself keeps the name");
    server.signal("TERM");
    let lines = server.drain();
    assert!(lines.iter().any(|l| l.contains("Request served.")), "request logging is on");
    assert!(lines.iter().any(|l| l.contains("invalid-record")), "refusals are logged by type");
    for line in &lines {
        for secret in secrets {
            assert!(!line.contains(secret), "log line holds {secret:?}: {line}");
        }
        assert!(!line.contains(ADMIN_KEY), "log line holds the API key: {line}");
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
}

#[test]
fn check_reports_every_configuration_error_at_once_and_serve_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"localhost\"\n[database]\nurl = \"mysql://db\"\n\
         [[api_keys]]\nname = \"k\"\nhash = \"plain\"\nscopes = [\"read\"]\n",
    )
    .expect("write");
    let bin = env!("CARGO_BIN_EXE_carebridge");
    let check = Command::new(bin).args(["check", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(check.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&check.stderr);
    for needle in ["server.listen", "database.url", "api_keys[0].hash"] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
    let serve = Command::new(bin).args(["serve", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(serve.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&serve.stderr).contains("Listening"));

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[server]\nlisen = \"127.0.0.1:1\"\n").expect("write");
    let check = Command::new(bin).args(["check", "--config"]).arg(&typo).output().expect("runs");
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("lisen"));

    let good = write_config(dir.path(), "");
    let check = Command::new(bin).args(["check", "--config"]).arg(&good).output().expect("runs");
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
    // --database is global and checked like the file's value.
    let check =
        Command::new(bin).args(["check", "--database", "ftp://x", "--config"]).arg(&good).output().expect("runs");
    assert_eq!(check.status.code(), Some(2));
}

#[test]
fn the_demo_configuration_is_valid_and_its_keys_work() {
    let bin = env!("CARGO_BIN_EXE_carebridge");
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo.toml");
    let check = Command::new(bin)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check", "--config", demo])
        .output()
        .expect("runs");
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
    // Integration tests run in the package root, where the README runs the demo (seed.dir is relative to it).
    let settings =
        carebridge::config::Settings::load(Some(std::path::Path::new(demo)), &carebridge::config::Overrides::default())
            .expect("demo config loads");
    let ring = carebridge::keys::KeyRing::from_settings(&settings.api_keys);
    let admin = ring.authenticate("demo-agency-key").expect("demo-agency-key is configured");
    for scope in [carebridge::config::Scope::Read, carebridge::config::Scope::Write, carebridge::config::Scope::Admin] {
        assert!(admin.may(scope));
    }
    let reader = ring.authenticate("demo-reader-key").expect("demo-reader-key is configured");
    assert!(!reader.may(carebridge::config::Scope::Write));
    assert!(ring.authenticate("demo-writer-key").is_some());
}

#[test]
fn concurrent_writes_answered_201_survive_kill_9_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let server = ServerProcess::start(&config);
    let base = server.base();
    put_fixtures(&server, &[("client", "cl-1001")]);
    let template = fixture("referral", "ref-4001");
    // Many writers at once, so the writer commits them in shared transactions.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (base, template) = (base.clone(), template.clone());
            std::thread::spawn(move || {
                let http = client();
                let mut acknowledged = Vec::new();
                for n in 0..25 {
                    let id = format!("w{w}-{n}");
                    let mut body = template.clone();
                    body["id"] = json!(id);
                    let response = http
                        .put(format!("{base}/api/v1/referrals/{id}"))
                        .bearer_auth(ADMIN_KEY)
                        .json(&body)
                        .send()
                        .expect("sent");
                    assert_eq!(response.status(), 201);
                    acknowledged.push(id);
                }
                acknowledged
            })
        })
        .collect();
    let acknowledged: Vec<String> = writers.into_iter().flat_map(|w| w.join().expect("writer")).collect();
    let mut server = server;
    server.child.kill().expect("kill -9");
    server.child.wait().expect("reaped");
    drop(server);
    let server = ServerProcess::start(&config);
    let http = client();
    for id in &acknowledged {
        let response =
            http.get(format!("{}/api/v1/referrals/{id}", server.base())).bearer_auth(ADMIN_KEY).send().expect("sent");
        assert_eq!(response.status(), 200, "{id} was acknowledged and then lost");
    }
    assert_eq!(acknowledged.len(), 200);
}

#[test]
fn a_clean_sigterm_leaves_no_wal_or_shm_file_and_keeps_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let mut server = ServerProcess::start(&config);
    let kept = put_fixtures(&server, &[("client", "cl-1002"), ("referral", "ref-4003"), ("consent", "co-5003")]);
    let wal = dir.path().join("carebridge.db-wal");
    let shm = dir.path().join("carebridge.db-shm");
    assert!(wal.exists() && shm.exists(), "a serving gateway has its WAL open");
    server.signal("TERM");
    let status = server.child.wait().expect("exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(!wal.exists(), "carebridge.db-wal is left after a clean shutdown");
    assert!(!shm.exists(), "carebridge.db-shm is left after a clean shutdown");
    drop(server);
    assert_all_kept(&ServerProcess::start(&config), kept);
}

#[test]
fn a_custom_method_token_never_reaches_the_logs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let mut server = ServerProcess::start(&config);
    let token = "ZEBULONQUACKENBUSH19660417";
    let method = reqwest::Method::from_bytes(token.as_bytes()).expect("a method token");
    for path in ["/nowhere", "/api/v1/clients"] {
        let response = client().request(method.clone(), format!("{}{path}", server.base())).send().expect("sent");
        assert!(response.status().is_client_error(), "{path}: {}", response.status());
    }
    server.signal("TERM");
    let lines = server.drain();
    let served: Vec<&String> = lines.iter().filter(|l| l.contains("Request served.")).collect();
    assert!(served.len() >= 2, "both requests are logged: {lines:?}");
    assert!(served.iter().all(|l| l.contains("\"method\":\"other\"")), "{served:?}");
    for line in &lines {
        assert!(!line.contains(token) && !line.contains("19660417"), "log line holds the method token: {line}");
    }
}

#[test]
fn a_caller_cannot_forge_log_lines_or_labels_through_any_part_of_a_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let mut server = ServerProcess::start(&config);
    let marker = "Forged-By-Caller";
    let forged = format!("x\r\n{{\"level\":\"ERROR\",\"message\":\"{marker}\"}}\r\n");
    let encoded: String = url::form_urlencoded::byte_serialize(forged.as_bytes()).collect();
    let addr = server.addr;
    let send = |request: String| {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
        let _ = stream.write_all(request.as_bytes());
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let auth = format!("authorization: Bearer {ADMIN_KEY}\r\n");
    // In the path, the query, a header value, the request id, an unknown method, a body, a bad key.
    for request in [
        format!("GET /api/v1/clients/{encoded} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n"),
        format!(
            "GET /fhir/HealthcareService?name={encoded}&_lastUpdated={encoded} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n"
        ),
        format!(
            "GET /api/v1/services?q={encoded}&bogus{encoded}=1 HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n"
        ),
        format!(
            "GET /nowhere/{encoded} HTTP/1.1\r\nhost: x\r\nuser-agent: {marker}\r\nx-request-id: {marker}%0A\r\nconnection: close\r\n\r\n"
        ),
        format!("{marker} /nowhere HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        format!(
            "GET /api/v1/clients HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {marker}\r\nconnection: close\r\n\r\n"
        ),
        {
            let body =
                format!("{{\"status\":\"{}\"}}", forged.replace('\r', "\\r").replace('\n', "\\n").replace('"', "\\\""));
            format!(
                "POST /api/v1/referrals/ref-1/status HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        },
    ] {
        let answer = send(request);
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    }
    server.signal("TERM");
    let lines = server.drain();
    assert!(lines.iter().any(|l| l.contains("Request served.")), "request logging is on");
    for line in &lines {
        assert!(!line.contains(marker), "the caller's text reached the log: {line}");
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(event.is_object(), "{line}");
    }
}

#[test]
fn check_refuses_a_directory_credential_variable_that_is_not_set_and_a_zero_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = "[[directories]]\ntype = \"hsds_api\"\nname = \"metro\"\nbase_url = \"https://211.example\"\n\
                  auth_header = \"X-Api-Key\"\nauth_value_env = \"CAREBRIDGE_TEST_METRO_KEY\"\n";
    let config = write_config(dir.path(), source);
    let bin = env!("CARGO_BIN_EXE_carebridge");
    let unset =
        Command::new(bin).args(["check", "--config"]).arg(&config).env_remove("CAREBRIDGE_TEST_METRO_KEY").output();
    let unset = unset.expect("runs");
    assert_eq!(unset.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unset.stderr);
    assert!(stderr.contains("CAREBRIDGE_TEST_METRO_KEY") && stderr.contains("`metro`"), "{stderr}");
    let set = Command::new(bin)
        .args(["check", "--config"])
        .arg(&config)
        .env("CAREBRIDGE_TEST_METRO_KEY", "k")
        .output()
        .expect("runs");
    assert_eq!(set.status.code(), Some(0), "{}", String::from_utf8_lossy(&set.stderr));

    let zero = write_config(dir.path(), &format!("{source}timeout_secs = 0\n"));
    let check = Command::new(bin)
        .args(["check", "--config"])
        .arg(&zero)
        .env("CAREBRIDGE_TEST_METRO_KEY", "k")
        .output()
        .expect("runs");
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("directories[0].timeout_secs"));
}

/// A partner FHIR server that answers every request 400 with an `OperationOutcome` quoting the record: a name, a
/// birth date and a newline followed by a forged log line.
fn quoting_partner() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Read the head and the body (Content-Length) before answering.
                loop {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let body = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invariant",
                    "diagnostics": "Patient Zebulon Quackenbush born 1966-04-17 already exists\n{\"level\":\"ERROR\",\"message\":\"FORGED-LINE\"}"}]})
                .to_string();
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes());
            });
        }
    });
    base
}

#[test]
fn a_partners_words_are_kept_cleaned_with_the_attempt_and_never_logged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = quoting_partner();
    let partners = format!(
        "[[partners]]\nname = \"st-marys-ehr\"\nbase_url = \"{base}\"\nreceives = [\"client\", \"consent\"]\nmax_transaction_entries = 0\n"
    );
    let config =
        crate::helpers::write_config_with_partners(dir.path(), &partners, "[outbox]\nenabled = true\npoll_ms = 100\n");
    let mut server = ServerProcess::start(&config);
    put_fixtures(&server, &[("client", "cl-1001"), ("consent", "co-5001")]);
    server.wait_for_line("Dead letter");
    let list: Value = client()
        .get(format!("{}/api/v1/deliveries?state=dead", server.base()))
        .bearer_auth(ADMIN_KEY)
        .send()
        .expect("sent")
        .json()
        .expect("JSON");
    let first = list["items"][0]["id"].as_i64().or_else(|| list["items"][0]["seq"].as_i64()).expect("a dead row");
    let row: Value = client()
        .get(format!("{}/api/v1/deliveries/{first}", server.base()))
        .bearer_auth(ADMIN_KEY)
        .send()
        .expect("sent")
        .json()
        .expect("JSON");
    let kept = row.to_string();
    // The words are kept as data, stripped of the newline that would have started a line of its own.
    assert!(kept.contains("already exists"), "{row}");
    assert!(!kept.contains("\\n{"), "a control character was kept: {row}");
    server.signal("TERM");
    let lines = server.drain();
    assert!(lines.iter().any(|l| l.contains("Dead letter") && l.contains("\"issue\":\"invariant\"")), "{lines:#?}");
    for line in &lines {
        assert!(
            !line.contains("Quackenbush") && !line.contains("1966-04-17"),
            "a partner's words reached the log: {line}"
        );
        assert!(!line.contains("FORGED-LINE"), "a partner forged a log line: {line}");
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
}

#[test]
fn check_refuses_a_bearer_token_sent_over_plain_http_to_another_host() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_carebridge");
    for (url, ok) in [
        ("http://fhir.partner.example/r4", false),
        ("http://127.0.0.1:9/fhir", true),
        ("https://fhir.partner.example/r4", true),
    ] {
        let partners = format!(
            "[[partners]]\nname = \"p\"\nbase_url = \"{url}\"\nreceives = [\"client\"]\nauth = {{ type = \"bearer\", token_env = \"CB_TEST_TOKEN\" }}\n"
        );
        let config = crate::helpers::write_config_with_partners(dir.path(), &partners, "");
        let check = Command::new(bin)
            .env("CB_TEST_TOKEN", "t0ken")
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.success(), ok, "{url}: {stderr}");
        if !ok {
            assert!(stderr.contains("partners[0].base_url") && stderr.contains("https://"), "{stderr}");
        }
    }
}

#[test]
fn config_show_prints_every_layer_and_never_a_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bearer = "[[partners]]\nname = \"bearer-ehr\"\nbase_url = \"https://ehr.example/fhir\"\nreceives = [\"client\"]\n\
                  auth = { type = \"bearer\", token_env = \"BEARER_EHR_TOKEN\" }\n";
    let config = crate::helpers::write_config_with_partners(dir.path(), bearer, "[outbox]\nenabled = false\n");
    let hashes: Vec<String> = crate::helpers::test_keys().into_iter().map(|k| k.hash).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_carebridge"))
        .args(["config", "show", "--config"])
        .arg(&config)
        .env("CAREBRIDGE_DATABASE__URL", "postgres://carebridge:hunter2-db-password@db.example:5432/carebridge")
        .env("CAREBRIDGE_SERVER__IDLE_TIMEOUT_SECS", "42")
        .env("BEARER_EHR_TOKEN", "the-partners-bearer-token")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    // Every layer: a default, the file, the environment.
    assert!(shown.contains("header_read_timeout_secs = 10"), "{shown}");
    assert!(shown.contains("name = \"bearer-ehr\""), "{shown}");
    assert!(shown.contains("idle_timeout_secs = 42"), "{shown}");
    // No secret: key hashes, the database password, the partner's token.
    for secret in hashes.iter().map(String::as_str).chain(["hunter2-db-password", "the-partners-bearer-token"]) {
        assert!(!shown.contains(secret), "{secret} shown");
    }
    assert!(shown.contains("postgres://carebridge:[redacted]@db.example:5432/carebridge"), "{shown}");
    assert!(shown.contains("hash = \"[redacted]\""));
    assert!(shown.contains("BEARER_EHR_TOKEN (set)"), "{shown}");
    // An invalid configuration is refused as `check` refuses it.
    let bad = Command::new(env!("CARGO_BIN_EXE_carebridge"))
        .args(["config", "show", "--config"])
        .arg(&config)
        .env("CAREBRIDGE_SERVER__LISTEN", "nowhere")
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("server.listen"));
}
