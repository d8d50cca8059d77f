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
    /// Check a configuration without running it: the file, the WARREN_*
    /// environment, the plugins directory and every plugin's load. Prints
    /// every problem at once; exits 78 when there is any.
    Validate {
        /// Configuration file (default: ./warren.toml if it exists).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Plugins directory (overrides `plugins.dir`).
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Print the effective configuration (the file and the WARREN_*
    /// environment, defaults filled in, secrets redacted) as TOML with a
    /// comment per key. Exits 78 when it is not valid.
    Config {
        /// Configuration file (default: ./warren.toml if it exists).
        #[arg(long, short)]
        config: Option<PathBuf>,
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
    match Cli::parse().command {
        Command::New { name, lang } => new(&name, lang),
        Command::Run {
            config,
            plugins,
            watch,
        } => run(config, plugins, watch),
        Command::Config { config } => print_config(config),
        Command::Check { files } => tool(cli::check(&files)),
        Command::Invoke(args) => tool(cli::invoke(args)),
        Command::Validate { config, plugins } => tool(validate(config, plugins)),
    }
}

/// Run one of the one-shot commands (`check`, `invoke`, `validate`) on a
/// runtime of its own, logging warnings only.
fn tool(command: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    warren::telemetry::init_logging(warren::telemetry::LogFormat::Text, "warn");
    match async_runtime() {
        Ok(runtime) => runtime.block_on(command),
        Err(code) => code,
    }
}

/// The multi-threaded tokio runtime, or the exit code after saying why it
/// cannot start.
fn async_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("warren: failed to start the async runtime: {e}");
            ExitCode::FAILURE
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

/// `--config`, else `./warren.toml` when it exists.
fn config_path(given: Option<PathBuf>) -> Option<PathBuf> {
    let default_path = PathBuf::from("warren.toml");
    given.or_else(|| default_path.exists().then_some(default_path))
}

/// `warren validate`: the plugins found on stdout, the problems on stderr.
async fn validate(config: Option<PathBuf>, plugins: Option<PathBuf>) -> ExitCode {
    let path = config_path(config);
    let v =
        warren::validate::validate(path.as_deref(), warren::config::warren_env(), plugins).await;
    for p in &v.plugins {
        println!(
            "plugin {} {} ({}): loads; queues: {}",
            p.name,
            p.version,
            p.file.display(),
            p.queues.join(", ")
        );
    }
    let file = path.as_ref().map_or_else(
        || "defaults and environment".to_owned(),
        |p| p.display().to_string(),
    );
    if v.is_ok() {
        println!("{file}: configuration is valid");
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "warren: {file}: {} problem{}:",
        v.problems.len(),
        if v.problems.len() == 1 { "" } else { "s" }
    );
    for p in &v.problems {
        eprintln!("  - {p}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// `warren config`: the effective configuration on stdout.
fn print_config(config: Option<PathBuf>) -> ExitCode {
    let path = config_path(config);
    match Config::load(path.as_deref(), warren::config::warren_env()) {
        Ok(c) => {
            let source = path
                .as_ref()
                .map_or_else(|| "no file".to_owned(), |p| p.display().to_string());
            print!("{}", warren::config_doc::render(&c, &source));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warren: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run(config_path: Option<PathBuf>, plugins: Option<PathBuf>, watch: bool) -> ExitCode {
    let path = self::config_path(config_path);
    let config = match run_config(path.as_deref(), plugins, watch) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Flushes exported spans when `run` returns.
    let _telemetry = match start_telemetry(&config) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::info!(config = ?path, "Starting Warren.");
    tracing::debug!(?config, "Configuration.");
    let grace = config.shutdown.grace();
    // Two runtimes: the app's, whose workers plugins may keep busy, and
    // this thread's, which only waits for signals and the stop's deadline,
    // so neither is late however busy the plugins are.
    let (runtime, control) = match (async_runtime(), control_runtime()) {
        (Ok(runtime), Ok(control)) => (runtime, control),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let started = runtime.block_on(async {
        let hangups = shutdown::hangups();
        App::start(config).await.map(|app| {
            let reloader = app.handle().reloader.clone();
            let hangup = tokio::spawn(warren::app::reload_on_hangup(hangups, reloader));
            (app, hangup)
        })
    });
    let code = match started {
        Ok((app, hangup)) => control.block_on(serve(&runtime, app, hangup, grace)),
        Err(e) => {
            tracing::error!(error = %e, "Cannot start.");
            eprintln!("warren: {e}");
            if e.is_config() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    };
    // The stop has had its grace period (or a second signal cut it short):
    // work still running, a compile on a blocking thread included, is
    // abandoned rather than waited for.
    runtime.shutdown_background();
    code
}

/// The configuration `warren run` uses: the file and the environment, then
/// its `--plugins` and `--watch`.
fn run_config(
    path: Option<&std::path::Path>,
    plugins: Option<PathBuf>,
    watch: bool,
) -> Result<Config, warren::config::ConfigError> {
    let mut config = Config::load(path, warren::config::warren_env())?;
    if let Some(dir) = plugins {
        config.plugins.dir = dir;
    }
    if watch && config.plugins.watch_ms == 0 {
        config.plugins.watch_ms = 1000;
    }
    Ok(config)
}

/// Logging, and span export when an endpoint is configured: the file's,
/// else the OpenTelemetry SDK's own variables (OTEL_EXPORTER_OTLP_*);
/// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the SDK.
fn start_telemetry(
    config: &Config,
) -> Result<warren::telemetry::TelemetryGuard, warren::telemetry::TelemetryError> {
    let otlp =
        warren::telemetry::otlp_endpoint(config.telemetry.otlp_endpoint.as_deref(), |name| {
            std::env::var(name).ok()
        })
        .map(|endpoint| warren::telemetry::OtlpConfig {
            endpoint,
            sample_ratio: config.telemetry.otlp_sample_ratio,
            instance_id: config.spool.host_id(),
        });
    warren::telemetry::init(
        config.telemetry.log_format,
        &config.telemetry.log_level,
        otlp.as_ref(),
    )
}

/// Run until the first stop signal, then stop within `grace`: the stop
/// runs on the app's `runtime`, the wait for its deadline here. A second
/// signal ends it at once (130).
async fn serve(
    runtime: &tokio::runtime::Runtime,
    app: App,
    hangup: tokio::task::JoinHandle<()>,
    grace: std::time::Duration,
) -> ExitCode {
    let signal = shutdown::wait_for_signal().await;
    tracing::info!(?signal, "Stop requested.");
    hangup.abort();
    let deadline = tokio::time::Instant::now() + grace;
    let stop = runtime.spawn(app.shutdown_by(deadline));
    tokio::select! {
        stopped = tokio::time::timeout_at(deadline, stop) => {
            if stopped.is_err() {
                tracing::warn!("The grace period is over; abandoning what is still running.");
            }
            ExitCode::SUCCESS
        }
        signal = shutdown::wait_for_signal() => {
            tracing::warn!(?signal, "Second signal: exiting now without finishing in-flight work.");
            ExitCode::from(130)
        }
    }
}

/// The runtime of the main thread: signals and the stop's deadline.
fn control_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("warren: failed to start the control runtime: {e}");
            ExitCode::FAILURE
        })
}
