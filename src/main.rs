//! The `edgevec` binary: parses the command line and hands it to
//! `edgevec_node::cli`.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = edgevec_node::cli::Cli::parse();
    // Nodes log at info by default (openraft's own info lines narrate every
    // vote and are left out); one-shot commands only warn.
    let default = match cli.command {
        edgevec_node::cli::Command::Node(_) | edgevec_node::cli::Command::Up { .. } => "info,openraft=warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .init();
    match edgevec_node::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
