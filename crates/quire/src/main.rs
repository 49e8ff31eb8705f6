//! The `quire` command line.

mod cli;
mod distributed;
mod model;
mod run;

use clap::Parser;

/// Exit codes, documented in `--help` and the README.
pub mod exit {
    /// Everything went through.
    pub const OK: u8 = 0;
    /// quire itself failed (a bug, or the output could not be written).
    pub const INTERNAL: u8 = 1;
    /// Bad command line or setup (missing libpdfium, unreadable model, missing input).
    pub const USAGE: u8 = 2;
    /// The job finished but some inputs or pages failed (see the manifest).
    pub const SOME_FAILED: u8 = 3;
}

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let filter = match cli.verbose {
        0 => "quire=info,quire_pipeline=info,warn",
        1 => "quire=debug,quire_pipeline=debug,info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("QUIRE_LOG").unwrap_or_else(|_| filter.into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let code = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Coordinator(args) => distributed::coordinator(args),
        cli::Command::Worker(args) => distributed::worker(args),
        cli::Command::Status(args) => distributed::status(args),
    };
    std::process::ExitCode::from(code)
}
