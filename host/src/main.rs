//! The `warren` command line. Parsing and printing only; the work is in the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren::cli::{self, InvokeArgs};

/// Warren: a RabbitMQ consumer host for sandboxed WebAssembly handlers.
#[derive(Parser)]
#[command(name = "warren", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between variants is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load plugin files, check them against the warren:plugin world, and
    /// print their manifests as JSON. Exits 1 if any file is not a valid
    /// plugin.
    Check {
        /// Plugin component files (.wasm).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run one delivery through a plugin in the sandbox, with no broker,
    /// and print the outcome and collected outputs as JSON. Exits 0 when
    /// the plugin acknowledged, 1 otherwise.
    Invoke(InvokeArgs),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    warren::telemetry::init_logging(warren::telemetry::LogFormat::Text, "warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match args.command {
            Command::Check { files } => cli::check(&files).await,
            Command::Invoke(args) => cli::invoke(args).await,
        }
    })
}
