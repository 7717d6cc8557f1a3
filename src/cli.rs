//! The command line: `serve`, `check`, `keys`. Thin: parse, load settings, call the library, turn errors into
//! exit codes (0 fine, 1 failed while running, 2 bad configuration or usage).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{self, Application};
use crate::config::{Overrides, Settings};
use crate::http::auth::{KeyHash, new_key};
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
    /// Check the configuration and exit: 0 when it is valid, 2 with every error otherwise.
    Check,
    /// Make API keys.
    Keys {
        /// Which key command.
        #[command(subcommand)]
        command: KeysCommand,
    },
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
        Command::Check => {
            let Some(settings) = load(cli.config.as_deref(), &overrides(None)) else {
                return Ok(ExitCode::from(2));
            };
            println!(
                "configuration OK: listen {}, database {}, {} API key(s)",
                settings.server.listen,
                backend_name(&settings.database.url),
                settings.api_keys.len()
            );
            Ok(ExitCode::SUCCESS)
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
