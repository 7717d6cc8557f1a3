//! The `carebridge` binary: parse the command line and hand over to [`carebridge::cli`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = carebridge::cli::Cli::parse();
    match carebridge::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "carebridge stopped on an error.");
            eprintln!("carebridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}
