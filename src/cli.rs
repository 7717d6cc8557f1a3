//! The command line: `serve`, `check`, `keys`. Thin: parse, load settings, call the library, turn errors into
//! exit codes (0 fine, 1 failed while running, 2 bad configuration or usage).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use indicatif::{ProgressBar, ProgressStyle};
use time::OffsetDateTime;

use crate::app::{self, Application};
use crate::config::{DirectorySettings, Overrides, Settings};
use crate::directories::jobs::{StartError, StartedBy, SyncProgress, SyncRunner};
use crate::directories::{self, ServiceQuery, SyncMode, fhir_directory};
use crate::domain::RecordKind;
use crate::keys::{KeyHash, new_key};
use crate::mapping::{self, Mappings};
use crate::store::{self, Store};
use crate::telemetry;

/// carebridge: FHIR R4 integration gateway for mental-health case management.
#[derive(Debug, Parser)]
#[command(name = "carebridge", version, about)]
pub struct Cli {
    /// Configuration file (TOML), layered over the built-in defaults.
    #[arg(long, global = true, env = "CAREBRIDGE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database URL (sqlite:PATH or postgres://…), overriding database.url.
    #[arg(long, global = true, env = "CAREBRIDGE_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C.
    Serve {
        /// Address to listen on (HOST:PORT), overriding server.listen.
        #[arg(long, env = "CAREBRIDGE_LISTEN", value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Check the configuration and the mapping files and exit: 0 when valid, 2 with every error (file:line) otherwise.
    Check {
        /// Also read each partner's CapabilityStatement and say what delivery falls back from there (1 when one
        /// cannot be read).
        #[arg(long)]
        partners: bool,
    },
    /// Map one agency record (JSON file) to FHIR and print it: a transaction Bundle for care plans and referrals.
    Map {
        /// The record's kind.
        #[arg(long, value_enum)]
        kind: KindArg,
        /// The agency record, as JSON.
        file: PathBuf,
        /// Map as this partner's overlay does (mappings/partners/NAME.toml).
        #[arg(long)]
        partner: Option<String>,
        /// The client record, for the Patient entry of a care plan or referral Bundle (default: the
        /// `client/<client_id>.json` beside the record's directory, when there is one).
        #[arg(long, value_name = "FILE")]
        client: Option<PathBuf>,
    },
    /// Work with the mapping files.
    Mappings {
        /// Which mappings command.
        #[command(subcommand)]
        command: MappingsCommand,
    },
    /// Sync and search community service directories.
    Directory {
        /// Which directory command.
        #[command(subcommand)]
        command: DirectoryCommand,
    },
    /// Deliver records to partners, and inspect or repair the delivery queue.
    Outbox {
        /// Which outbox command.
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Show the configuration.
    Config {
        /// Which config command.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Check the audit trail.
    Audit {
        /// Which audit command.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Make API keys.
    Keys {
        /// Which key command.
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// Config subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration after every layer (defaults, file, environment, flags) as TOML, every
    /// secret shown as [redacted]; exit 2 with the errors when it is not valid.
    Show,
}

/// Audit subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of the audit trail from its first entry: exit 0 when every entry holds, 1 naming the
    /// first entry that does not (edited, deleted before it, or inserted).
    Verify,
}

/// Outbox subcommands.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Run the delivery workers: until Ctrl-C, or with `--until-idle` until nothing is due (exit 1 when a
    /// delivery of this run ended dead).
    Run {
        /// Stop once a pass finds nothing due (rows waiting for a later retry stay queued).
        #[arg(long)]
        until_idle: bool,
    },
    /// List deliveries (newest last).
    List {
        /// Only this state: pending, held, delivered, dead, superseded, discarded.
        #[arg(long)]
        state: Option<String>,
        /// Only this partner.
        #[arg(long)]
        partner: Option<String>,
        /// Only this record, as KIND/ID (`referral/ref-4001`).
        #[arg(long, value_name = "KIND/ID")]
        record: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show one delivery and its attempts.
    Show {
        /// Its number.
        seq: i64,
    },
    /// Queue a dead, held, discarded or delivered delivery again (due now).
    Replay {
        /// Its number.
        seq: i64,
    },
    /// Give up a pending, held or dead delivery.
    Discard {
        /// Its number.
        seq: i64,
    },
}

/// Directory subcommands.
#[derive(Debug, Subcommand)]
pub enum DirectoryCommand {
    /// Sync one configured directory, or all of them, and print what changed (exit 1 when a sync failed, 3 when
    /// one was not started because a sync of that directory was already running).
    Sync {
        /// The directory's configured name; all directories when left out.
        source: Option<String>,
        /// Only what changed since the last sync (a full sync also deactivates services that vanished).
        #[arg(long)]
        incremental: bool,
        /// Deactivate what vanished even when the source lists far fewer services than its last complete crawl
        /// (more than `max_deactivate_fraction` fewer).
        #[arg(long)]
        force: bool,
    },
    /// Search the catalog as `GET /api/v1/services` does.
    Search {
        /// Words to find in name and description.
        #[arg(long)]
        q: Option<String>,
        /// Agency service category.
        #[arg(long)]
        category: Option<String>,
        /// Taxonomy term code.
        #[arg(long)]
        taxonomy_term: Option<String>,
        /// Centre of a radius search, `LAT,LON`.
        #[arg(long, value_parser = parse_near, allow_hyphen_values = true)]
        near: Option<(f64, f64)>,
        /// Radius in km.
        #[arg(long, default_value_t = 25.0)]
        radius_km: f64,
        /// Language (BCP 47).
        #[arg(long)]
        language: Option<String>,
        /// Only services open now by their weekly hours, in their time zone (unknown hours or zone: never).
        #[arg(long)]
        open_now: bool,
        /// Only services open at this instant (RFC 3339, e.g. 2026-07-01T16:30:00Z).
        #[arg(long, value_parser = parse_instant, conflicts_with = "open_now")]
        open_at: Option<OffsetDateTime>,
        /// How many results.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

fn parse_instant(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|_| "expected an RFC 3339 date-time with its offset, e.g. 2026-07-01T16:30:00Z".to_owned())
}

fn parse_near(s: &str) -> Result<(f64, f64), String> {
    let (lat, lon) = s.split_once(',').ok_or("expected LAT,LON")?;
    Ok((lat.trim().parse().map_err(|_| "bad latitude")?, lon.trim().parse().map_err(|_| "bad longitude")?))
}

/// Mapping subcommands.
#[derive(Debug, Subcommand)]
pub enum MappingsCommand {
    /// Run the golden cases (`<dir>/<mapping>/<case>.input.json` → `.expected.json` or `.expected.txt`).
    Test {
        /// Where the golden cases live.
        #[arg(long, default_value = "fixtures/mappings")]
        dir: PathBuf,
        /// Write what the mappings give now as each case's expected output (review the diff before committing).
        #[arg(long)]
        bless: bool,
    },
}

/// An agency record kind on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// A client.
    Client,
    /// A scored assessment.
    Assessment,
    /// A care plan.
    CarePlan,
    /// A referral.
    Referral,
    /// A consent.
    Consent,
}

impl From<KindArg> for RecordKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Client => RecordKind::Client,
            KindArg::Assessment => RecordKind::Assessment,
            KindArg::CarePlan => RecordKind::CarePlan,
            KindArg::Referral => RecordKind::Referral,
            KindArg::Consent => RecordKind::Consent,
        }
    }
}

/// Key subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new random key and print it with its `[[api_keys]]` entry (the key itself is shown only once).
    Generate {
        /// Name recorded in the audit log for this key's calls.
        #[arg(long)]
        name: String,
        /// Scopes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "read,write")]
        scopes: Vec<ScopeArg>,
    },
    /// Read a key on standard input and print its salted hash (for keys made elsewhere).
    Hash,
}

/// A scope on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    /// Read records.
    Read,
    /// Write records.
    Write,
    /// Read the audit log.
    Admin,
}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever stopped the command, for `main` to print.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = |listen: Option<String>| Overrides { listen, database: cli.database.clone() };
    match cli.command {
        Command::Serve { listen } => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(listen)) else {
                return Ok(ExitCode::from(2));
            };
            telemetry::init_logs(&settings.log);
            let application = Application::build(&settings).await.context("carebridge could not start")?;
            let addr = application.local_addr()?;
            tracing::info!(%addr, database = backend_name(&settings.database.url), "Listening.");
            application.run_until_stopped(app::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { partners: read_partners } => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(None)) else {
                return Ok(ExitCode::from(2));
            };
            let unset = settings.unset_credentials(|var| std::env::var_os(var).is_some());
            if !unset.is_empty() {
                let source =
                    cli.config.as_deref().map_or_else(|| "built-in defaults".to_owned(), |f| f.display().to_string());
                eprintln!("carebridge: invalid configuration ({source}):");
                for e in &unset {
                    eprintln!("  - {e}");
                }
                return Ok(ExitCode::from(2));
            }
            println!(
                "configuration OK: listen {}, database {}, {} API key(s)",
                settings.server.listen,
                backend_name(&settings.database.url),
                settings.api_keys.len()
            );
            let mappings = load_mappings(&settings);
            let categories_ok = check_category_map(&settings);
            let Some(mappings) = mappings else {
                return Ok(ExitCode::from(2));
            };
            let (files, maps, profiles) = mappings.counts();
            let overlays: Vec<&str> = mappings.partners().collect();
            println!(
                "mappings OK: {files} mapping file(s), {maps} ConceptMap(s), {profiles} profile(s), overlays: {}",
                if overlays.is_empty() { "none".to_owned() } else { overlays.join(", ") }
            );
            let registry = carebridge_partners(&settings);
            let mut missing = registry.missing_overlays(&mappings);
            match crate::policy::Policy::load(&settings.mappings.dir) {
                Ok(policy) => missing.extend(policy.missing_profiles(&registry)),
                Err(errors) => missing.push(format!("policy profiles have errors:\n{errors}")),
            }
            for m in &missing {
                eprintln!("carebridge: {m}");
            }
            let names: Vec<&str> = registry.iter().map(|p| p.name.as_str()).collect();
            if missing.is_empty() {
                println!("partners OK: {}", if names.is_empty() { "none".to_owned() } else { names.join(", ") });
            }
            if !(categories_ok && missing.is_empty()) {
                return Ok(ExitCode::from(2));
            }
            if read_partners && !partner_capabilities(&settings).await {
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Map { kind, file, partner, client } => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(None)) else {
                return Ok(ExitCode::from(2));
            };
            let Some(mappings) = load_mappings(&settings) else {
                return Ok(ExitCode::from(2));
            };
            let read = |p: &std::path::Path| -> anyhow::Result<serde_json::Value> {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
            };
            let record = read(&file)?;
            let kind = RecordKind::from(kind);
            let client_file = client.or_else(|| beside_client(&file, &record));
            let (assessments, care_plans) = beside_related(&file, &record);
            let related =
                mapping::Related { client: client_file.as_deref().map(read).transpose()?, assessments, care_plans };
            // A configured partner maps with its overlay; a name that is no partner but an overlay file maps with
            // that overlay (to try an overlay before any partner uses it).
            let registry = carebridge_partners(&settings);
            let overlay = match partner.as_deref() {
                None => None,
                Some(name) => match registry.overlay_of(name) {
                    Some(o) => o.map(str::to_owned),
                    None => Some(name.to_owned()),
                },
            };
            match mapping::golden::document(&mappings, kind, &record, overlay.as_deref(), &related) {
                Ok((doc, _)) => {
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(text) => {
                    eprintln!("{}: cannot map:\n{text}", file.display());
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Mappings { command: MappingsCommand::Test { dir, bless } } => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(None)) else {
                return Ok(ExitCode::from(2));
            };
            let Some(mappings) = load_mappings(&settings) else {
                return Ok(ExitCode::from(2));
            };
            let results = mapping::golden::run(&mappings, &dir, bless);
            let failed = results.iter().filter(|r| r.failure.is_some()).count();
            for r in &results {
                match &r.failure {
                    None => println!("ok     {}", r.name),
                    Some(why) => println!("FAILED {}\n{why}", r.name),
                }
            }
            println!("{} golden case(s): {} passed, {failed} failed", results.len(), results.len() - failed);
            Ok(if failed == 0 && !results.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Directory { command } => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(None)) else {
                return Ok(ExitCode::from(2));
            };
            let store = open_store(&settings).await?;
            let code = match command {
                DirectoryCommand::Sync { source, incremental, force } => {
                    directory_sync(&store, &settings, source.as_deref(), incremental, force).await?
                }
                DirectoryCommand::Search { q: Some(q), .. }
                    if directories::search_text::TextQuery::parse(&q).is_none() =>
                {
                    eprintln!("--q: no word to search for (letters or digits); leave it out to list every service");
                    ExitCode::from(2)
                }
                DirectoryCommand::Search {
                    q,
                    category,
                    taxonomy_term,
                    near,
                    radius_km,
                    language,
                    open_now,
                    open_at,
                    limit,
                } => {
                    let query = ServiceQuery {
                        text: q,
                        category,
                        taxonomy_term,
                        near,
                        radius_km,
                        language,
                        include_inactive: false,
                        open_at: open_at.or_else(|| open_now.then(OffsetDateTime::now_utc)),
                        page: 1,
                        per_page: limit.clamp(1, 100),
                    };
                    let (hits, total) = store.search_services(&query).await?;
                    for h in &hits {
                        let distance = h.distance_km.map(|d| format!("{d:.1} km  ")).unwrap_or_default();
                        println!("{distance}{}  {}  [{}]", h.id, h.name, h.categories.join(","));
                    }
                    println!("{} of {total} shown", hits.len());
                    ExitCode::SUCCESS
                }
            };
            store.close().await;
            Ok(code)
        }
        Command::Config { command: ConfigCommand::Show } => {
            match Settings::effective_with_env(cli.config.as_deref(), &overrides(None), std::env::vars()) {
                Ok(text) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    eprintln!("carebridge: invalid configuration:");
                    for e in &errors.0 {
                        eprintln!("  - {e}");
                    }
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Audit { command: AuditCommand::Verify } => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(None)) else {
                return Ok(ExitCode::from(2));
            };
            let store = open_store(&settings).await?;
            let verified = verify_audit(&*store).await;
            store.close().await;
            match verified? {
                Ok((entries, head)) => {
                    println!("audit chain holds: {entries} entries, head {head}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(broken) => {
                    println!("{broken}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Outbox { command } => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(None)) else {
                return Ok(ExitCode::from(2));
            };
            let store = open_store(&settings).await?;
            let code = outbox_command(&store, &settings, command).await;
            store.close().await;
            code
        }
        Command::Keys { command: KeysCommand::Generate { name, scopes } } => {
            let key = new_key().context("no randomness available")?;
            let hash = KeyHash::generate(&key).context("no randomness available")?;
            let scopes: Vec<String> = scopes.iter().map(|s| format!("{:?}", format!("{s:?}").to_lowercase())).collect();
            println!("# API key for {name} (give it to the caller; it is not stored anywhere):\n# {key}");
            println!("[[api_keys]]\nname = {name:?}\nhash = \"{hash}\"\nscopes = [{}]", scopes.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command: KeysCommand::Hash } => {
            let mut key = String::new();
            std::io::stdin().read_to_string(&mut key).context("cannot read the key from standard input")?;
            let key = key.trim();
            anyhow::ensure!(!key.is_empty(), "no key on standard input");
            println!("{}", KeyHash::generate(key).context("no randomness available")?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Logs, the TLS provider and the store, for a subcommand that works on the database.
async fn open_store(settings: &Settings) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    telemetry::init_logs(&settings.log);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    store::connect(&settings.database.url, settings.database.max_connections, settings.acquire_timeout())
        .await
        .context("cannot open the database")
}

/// Reads the whole audit chain in order and verifies it: the entries and the head hash, or where it breaks.
///
/// # Errors
/// When the store cannot be read.
pub async fn verify_audit(store: &dyn Store) -> anyhow::Result<Result<(i64, String), crate::audit::Broken>> {
    let mut at = (0, crate::audit::GENESIS.to_owned());
    loop {
        let page = store.audit_chain(at.0, 1000).await.context("reading the audit trail")?;
        if page.is_empty() {
            return Ok(Ok(at));
        }
        match crate::audit::verify(at, &page) {
            Ok(next) => at = next,
            Err(broken) => return Ok(Err(broken)),
        }
    }
}

/// Runs one `outbox` subcommand.
async fn outbox_command(
    store: &std::sync::Arc<dyn Store>,
    settings: &Settings,
    command: OutboxCommand,
) -> anyhow::Result<ExitCode> {
    use crate::store::DeliveryFilter;
    let print_row = |r: &crate::store::DeliveryRow| {
        println!(
            "{:>8}  {:<10}  {:<20}  {}/{} v{}  attempts {}  {}",
            r.seq,
            r.state,
            r.partner,
            r.kind.as_str(),
            r.id,
            r.version,
            r.attempts,
            r.detail.as_deref().unwrap_or("")
        );
    };
    match command {
        OutboxCommand::Run { until_idle } => {
            let Some(mappings) = load_mappings(settings) else {
                return Ok(ExitCode::from(2));
            };
            let registry = carebridge_partners(settings);
            let worker =
                crate::outbox::Worker::new(store.clone(), std::sync::Arc::new(mappings), &registry, &settings.outbox)
                    .map_err(anyhow::Error::msg)?;
            if until_idle {
                let r = worker.run_until_idle(OffsetDateTime::now_utc).await?;
                println!(
                    "{} claimed: {} delivered, {} to retry, {} held, {} dead",
                    r.claimed, r.delivered, r.retried, r.held, r.dead
                );
                return Ok(if r.dead > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS });
            }
            let (stop, stopping) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = stop.send(true);
                }
            });
            worker.run(stopping).await;
            Ok(ExitCode::SUCCESS)
        }
        OutboxCommand::List { state, partner, record, limit } => {
            if let Some(s) = &state
                && !crate::store::outbox::state::ALL.contains(&s.as_str())
            {
                eprintln!("--state: one of {}", crate::store::outbox::state::ALL.join(", "));
                return Ok(ExitCode::from(2));
            }
            let record = match record.as_deref().map(parse_record_arg).transpose() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("--record: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let rows = store
                .list_deliveries(&DeliveryFilter { state, partner, record, after: 0, limit: limit.clamp(1, 10_000) })
                .await?;
            for r in &rows {
                print_row(r);
            }
            println!("{} deliveries", rows.len());
            Ok(ExitCode::SUCCESS)
        }
        OutboxCommand::Show { seq } => {
            let Some((row, attempts)) = store.delivery(seq).await? else {
                eprintln!("no delivery {seq}");
                return Ok(ExitCode::from(1));
            };
            print_row(&row);
            for a in &attempts {
                let status = a.status.map(|s| format!("HTTP {s}  ")).unwrap_or_default();
                println!("  {}  {:>6} ms  {:<9}  {status}{}", a.at, a.ms, a.outcome, a.detail);
                if let Some(oo) = &a.operation_outcome {
                    println!("    OperationOutcome: {oo}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        OutboxCommand::Replay { seq } | OutboxCommand::Discard { seq } => {
            let replay = matches!(command, OutboxCommand::Replay { .. });
            let now = OffsetDateTime::now_utc();
            let actor = cli_actor(if replay { "replay" } else { "discard" });
            let row = if replay {
                store.replay_delivery(seq, &actor, now).await?
            } else {
                store.discard_delivery(seq, &actor, now).await?
            };
            let Some((row, changed)) = row else {
                eprintln!("no delivery {seq}");
                return Ok(ExitCode::from(1));
            };
            print_row(&row);
            if !changed {
                eprintln!(
                    "delivery {seq} is {}: {}",
                    row.state,
                    if replay {
                        "a pending delivery is queued already, and a version older than one delivered cannot go again"
                    } else {
                        "only pending (not in flight), held or dead deliveries can be discarded"
                    }
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Who an operator's command-line action is audited as: `cli:` and the operating-system user who ran it (the
/// command line holds no API key; whoever can run it can open the database).
fn cli_actor(what: &str) -> crate::store::Actor {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    crate::store::Actor {
        key_name: format!("cli:{user}"),
        request_id: format!("cli-{what}-{}", uuid::Uuid::new_v4()),
        partner: None,
    }
}

/// `KIND/ID` (`referral/ref-4001`).
fn parse_record_arg(s: &str) -> Result<(RecordKind, crate::domain::RecordId), String> {
    let (kind, id) = s.split_once('/').ok_or("expected KIND/ID, e.g. referral/ref-4001")?;
    let kind =
        RecordKind::from_name(kind).ok_or("the kind is one of client, assessment, care-plan, referral, consent")?;
    Ok((kind, crate::domain::RecordId::parse(id)?))
}

/// Exit code of `directories sync` when a sync was not started because another of the same source was running.
const EXIT_SYNC_RUNNING: u8 = 3;

/// Syncs the named directory (or all), each as a job holding its source's lease, with a progress line per source
/// and a summary; exit 1 if any failed, else 3 if any was not started because a sync of it was already running
/// (on a gateway or another CLI). Ctrl-C stops the sync running (recorded as stopped, its lease given back).
async fn directory_sync(
    store: &std::sync::Arc<dyn Store>,
    settings: &Settings,
    only: Option<&str>,
    incremental: bool,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let chosen: Vec<_> = settings.directories.iter().filter(|d| only.is_none_or(|n| d.name() == n)).collect();
    if chosen.is_empty() {
        anyhow::bail!("no directory named {} in the configuration", only.unwrap_or("(any)"));
    }
    let mode = if incremental { SyncMode::Incremental } else { SyncMode::Full };
    let mut sources = std::collections::HashMap::new();
    for d in &chosen {
        sources.insert(d.name().to_owned(), directories::source_from_settings(d, &settings.mappings.dir)?);
    }
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let interrupt = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop.send(true);
        }
    });
    let runner = SyncRunner::new(store.clone(), std::sync::Arc::new(sources), stopping);
    let (mut failed, mut busy) = (false, false);
    for d in chosen {
        let by = cli_actor("sync");
        let claimed =
            match runner.claim(d.name(), mode, force, StartedBy::Cli, Some(&by), OffsetDateTime::now_utc()).await {
                Ok(claimed) => claimed,
                Err(StartError::Busy { running, .. }) => {
                    eprintln!("{}: a sync of this directory is already running (job {running}); not started", d.name());
                    busy = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
        let bar = ProgressBar::new_spinner().with_message(format!("{}: syncing (job {})", d.name(), claimed.id));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} records read")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let progress = |p: &SyncProgress| bar.set_position(p.read as u64);
        match runner.run(claimed, &progress).await {
            Ok(r) => {
                bar.finish_and_clear();
                println!(
                    "{}: {} added, {} updated, {} unchanged, {} deactivated, {} rejected",
                    r.source,
                    r.added,
                    r.updated,
                    r.unchanged,
                    r.deactivated,
                    r.rejected.len()
                );
                for note in &r.notes {
                    println!("  note: {note}");
                }
                for rejection in &r.rejected {
                    println!(
                        "  rejected {}: {}",
                        rejection.source_id.as_deref().unwrap_or("(no id)"),
                        rejection.reason
                    );
                }
            }
            Err(e) => {
                bar.finish_and_clear();
                eprintln!("{}: sync failed ({}): {}", d.name(), e.kind, e.detail);
                failed = true;
            }
        }
    }
    interrupt.abort();
    Ok(if failed {
        ExitCode::FAILURE
    } else if busy {
        ExitCode::from(EXIT_SYNC_RUNNING)
    } else {
        ExitCode::SUCCESS
    })
}

/// Loads the settings, printing every error on stderr when they are invalid.
fn load(file: Option<&std::path::Path>, overrides: &Overrides) -> Option<Settings> {
    match Settings::load(file, overrides) {
        Ok(settings) => Some(settings),
        Err(errors) => {
            let source = file.map_or_else(|| "built-in defaults".to_owned(), |f| f.display().to_string());
            eprintln!("carebridge: invalid configuration ({source}):");
            for e in &errors.0 {
                eprintln!("  - {e}");
            }
            None
        }
    }
}

/// The backend named by a database URL, never the URL itself (it may hold a password).
fn backend_name(url: &str) -> &'static str {
    if url.starts_with("sqlite:") { "sqlite" } else { "postgres" }
}

/// Loads the mapping files, printing every error with file:line.
fn load_mappings(settings: &Settings) -> Option<Mappings> {
    match Mappings::load(&settings.mappings.dir) {
        Ok(m) => Some(m),
        Err(errors) => {
            eprintln!("mapping files have errors:\n{errors}");
            None
        }
    }
}

/// Loads the category maps directory sources read (a FHIR directory's, and each HSDS source's `category_map`),
/// printing every error with file:line; `false` when one is missing or broken.
fn check_category_map(settings: &Settings) -> bool {
    let mut paths: Vec<PathBuf> =
        settings.directories.iter().filter_map(|d| d.category_map()).map(|p| settings.mappings.dir.join(p)).collect();
    if settings.directories.iter().any(|d| matches!(d, DirectorySettings::FhirDirectory { .. })) {
        paths.push(settings.mappings.dir.join(fhir_directory::CATEGORY_MAP_FILE));
    }
    paths.sort();
    paths.dedup();
    let mut ok = true;
    for path in paths {
        match fhir_directory::CategoryMap::load(&path) {
            Ok(map) => {
                println!("directory category map OK: {} ({} coding(s) mapped)", path.display(), map.mapped_codings());
            }
            Err(errors) => {
                eprintln!("the directory category map has errors:\n{errors}");
                ok = false;
            }
        }
    }
    ok
}

/// `<dir>/../client/<client_id>.json` for a record kept as `<dir>/<id>.json` (the fixtures' layout).
/// In a directory laid out like `fixtures/agency/` (`<kind>/<id>.json`), the client's other assessments and care
/// plans beside the record: the needs' evidence and status.
fn beside_related(
    file: &std::path::Path,
    record: &serde_json::Value,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let (Some(client), Some(root)) =
        (record.get("client_id").and_then(|v| v.as_str()), file.parent().and_then(|p| p.parent()))
    else {
        return (Vec::new(), Vec::new());
    };
    let of = |dir: &str| -> Vec<serde_json::Value> {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else { return Vec::new() };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths
            .iter()
            .filter_map(|p| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).ok()?).ok())
            .filter(|r| r.get("client_id").and_then(|v| v.as_str()) == Some(client))
            .collect()
    };
    (of("assessment"), of("care-plan"))
}

/// Reads and reports each partner's CapabilityStatement; `false` when one could not be read.
async fn partner_capabilities(settings: &crate::config::Settings) -> bool {
    let mut all_read = true;
    for p in &settings.partners {
        let timeout = std::time::Duration::from_secs(settings.outbox.timeout_secs);
        let read = match crate::fhir::auth::partner_client(p, timeout) {
            Err(e) => Err(e),
            Ok(client) => crate::outbox::read_capabilities(&client).await,
        };
        match read {
            Ok(caps) => {
                let yes = |b: bool| if b { "yes" } else { "no" };
                println!(
                    "partner {}: transactions {}, topic-based subscriptions {}",
                    p.name,
                    yes(caps.transaction),
                    yes(caps.subscriptions)
                );
                for f in caps.fallbacks(crate::outbox::DELIVERED_TYPES) {
                    println!("  {f}");
                }
            }
            Err(e) => {
                all_read = false;
                eprintln!("carebridge: partner {}: its CapabilityStatement could not be read: {e}", p.name);
            }
        }
    }
    all_read
}

fn carebridge_partners(settings: &crate::config::Settings) -> crate::partners::Partners {
    crate::partners::Partners::new(&settings.partners)
}

fn beside_client(file: &std::path::Path, record: &serde_json::Value) -> Option<PathBuf> {
    let id = record.get("client_id")?.as_str()?;
    let candidate = file.parent()?.parent()?.join("client").join(format!("{id}.json"));
    candidate.is_file().then_some(candidate)
}
