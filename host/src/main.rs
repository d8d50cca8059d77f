//! The `warren` command line. Parsing and printing only; the work is in the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren::app::App;
use warren::cli::{self, InvokeArgs};
use warren::config::{Config, EXIT_CONFIG};
use warren::shutdown;

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
    /// Run Warren: load the plugins directory, connect to RabbitMQ and the
    /// spool, and consume until SIGTERM or SIGINT.
    Run {
        /// Configuration file (default: ./warren.toml if it exists).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Plugins directory (overrides `plugins.dir`).
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// Reload plugins when files in the plugins directory change
        /// (polls every second unless `plugins.watch-ms` says otherwise).
        #[arg(long)]
        watch: bool,
    },
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
    /// Write a new plugin project into directory NAME (which must not
    /// exist): the SDK's sources and the WIT of this binary's contract,
    /// a plugin that forwards each delivery to `NAME.out`, and a README
    /// with the one command that builds it.
    New {
        /// The project directory; its last component is the plugin's name.
        name: PathBuf,
        /// The plugin's language.
        #[arg(long, value_enum)]
        lang: warren::new::Lang,
    },
}

fn main() -> ExitCode {
    let args = Cli::parse();
    if let Command::New { name, lang } = &args.command {
        return new(name, *lang);
    }
    if let Command::Run {
        config,
        plugins,
        watch,
    } = args.command
    {
        return run(config, plugins, watch);
    }
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
            Command::Run { .. } | Command::New { .. } => ExitCode::FAILURE,
        }
    })
}

fn new(dir: &std::path::Path, lang: warren::new::Lang) -> ExitCode {
    match warren::new::create(dir, lang) {
        Ok(name) => {
            println!(
                "Wrote plugin {name} to {}. Build it there with `{}`; the plugin is {}.",
                dir.display(),
                warren::new::build_command(lang),
                warren::new::output(lang, &name).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warren: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<PathBuf>, plugins: Option<PathBuf>, watch: bool) -> ExitCode {
    let default_path = PathBuf::from("warren.toml");
    let path = config_path.or_else(|| default_path.exists().then_some(default_path));
    let mut config = match Config::load(path.as_deref(), warren::config::warren_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(dir) = plugins {
        config.plugins.dir = dir;
    }
    if watch && config.plugins.watch_ms == 0 {
        config.plugins.watch_ms = 1000;
    }
    let otlp =
        config
            .telemetry
            .otlp_endpoint
            .clone()
            .map(|endpoint| warren::telemetry::OtlpConfig {
                endpoint,
                sample_ratio: config.telemetry.otlp_sample_ratio,
            });
    // Flushes exported spans when `run` returns.
    let _telemetry = match warren::telemetry::init(
        config.telemetry.log_format,
        &config.telemetry.log_level,
        otlp.as_ref(),
    ) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::info!(config = ?path, "Starting Warren.");
    tracing::debug!(?config, "Configuration.");
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
        let app = match App::start(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "Cannot start.");
                eprintln!("warren: {e}");
                return ExitCode::FAILURE;
            }
        };
        let signal = shutdown::wait_for_signal().await;
        tracing::info!(?signal, "Stop requested.");
        let stop = app.shutdown();
        tokio::select! {
            () = stop => ExitCode::SUCCESS,
            () = shutdown::exit_on_second_signal() => ExitCode::from(130),
        }
    })
}
