//! The `edgevec` binary: parses the command line and hands it to
//! `edgevec_node::cli`.

use std::io::IsTerminal;

use clap::Parser;
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

fn main() {
    // Before any thread starts (the runtime's workers included).
    edgevec_engine::memory::configure_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts")
        .block_on(run());
}

async fn run() {
    let cli = edgevec_node::cli::Cli::parse();
    // Plugins are compiled by a child of this same binary, with a memory
    // limit (edgevec_node::policy::compile).
    if let Ok(exe) = std::env::current_exe() {
        edgevec_node::policy::compile::set_compiler(exe);
    }
    // Nodes log at info by default (openraft's own info lines narrate every
    // vote and are left out); one-shot commands only warn.
    let serves = matches!(
        cli.command,
        edgevec_node::cli::Command::Node(_) | edgevec_node::cli::Command::Up { .. }
    );
    let default = if serves { "info,openraft=warn" } else { "warn" };
    if !serves {
        // A one-shot command whose output is piped into `head` ends quietly
        // when the reader goes away, like other command-line tools, instead
        // of panicking on the failed write.
        #[cfg(unix)]
        // SAFETY: restores the default action of one signal, before any
        // write to stdout.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry()
        .with(output.with_filter(filter).with_filter(KnownNoise))
        .init();
    // A panic is logged like every other event: one line with where it
    // happened (a caught one, such as redb's on a damaged file, is then
    // followed by what the node did about it), with a backtrace only when
    // RUST_BACKTRACE asks for one.
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!("{info}\n{backtrace}");
        } else {
            tracing::error!("{info}");
        }
    }));
    let code = match edgevec_node::cli::run(cli).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            1
        }
    };
    // Exit now rather than by returning: returning drops the runtime, which
    // waits for every blocking task, and a node that decided to stop (its
    // disk full, its metadata store failed) must not hang on one stuck in
    // I/O. Everything that must be durable was made so before `run`
    // returned.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// The error and its causes, joined with ": ", leaving out a cause whose
/// text the message already contains (many errors print their source).
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Drops one openraft 0.9 warning that is noise: a follower that has just
/// granted its vote gets its own "vote saved" notice back as a vote
/// response, and warns that it ignores it ("A message will be ignored
/// because vote changed ... current my vote: None"). Every election logged
/// it on every voter, so a clean start was never free of warnings.
struct KnownNoise;

impl<S> Filter<S> for KnownNoise {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        if event.metadata().target() != "openraft::core::raft_core" {
            return true;
        }
        struct Message(bool);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    let text = format!("{value:?}");
                    self.0 |= text.starts_with("A message will be ignored because vote changed")
                        && text.contains("current my vote: None");
                }
            }
        }
        let mut noise = Message(false);
        event.record(&mut noise);
        !noise.0
    }
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot bind 127.0.0.1:7101: {source}")]
    struct Bind {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use (os error 98)");
        let e = anyhow::Error::new(Bind { source: io }).context("node 1");
        assert_eq!(
            describe(&e),
            "node 1: cannot bind 127.0.0.1:7101: Address already in use (os error 98)"
        );
    }
}
