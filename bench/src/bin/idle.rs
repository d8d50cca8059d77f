//! Idle resident memory of a running Warren with 10 plugins loaded and
//! their consumers registered, measured in-process (the binary holds
//! nothing but Warren). `cargo run --release -p warren-bench --bin idle`.
//! Needs RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use warren::app::App;
use warren::config::Config;

const PLUGINS: [&str; 10] = [
    "echo",
    "router",
    "noop",
    "chatty",
    "flaky",
    "slow",
    "panic",
    "mem-hog",
    "spin-loop",
    "sandbox-probe",
];

fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut overrides = String::new();
    for name in PLUGINS {
        std::fs::copy(
            warren_it::plugins::wasm(name)?,
            dir.path().join(format!("{name}.wasm")),
        )?;
        overrides.push_str(&format!(
            "[plugin.{name}]\nsubscriptions = [{{ queue = \"bench.idle.{name}\", prefetch = 10 }}]\n"
        ));
    }
    let before = rss_kib()?;
    let text = format!(
        r#"
        [admin]
        bind = "127.0.0.1:0"
        [plugins]
        dir = "{dir}"
        [spool]
        stream-key = "bench.idle.spool"
        [telemetry]
        log-level = "warn"
        {overrides}
        "#,
        dir = dir.path().display(),
    );
    let config = Config::parse(&text, Vec::new()).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let app = App::start(config).await?;
    let handle = app.handle();
    let started = Instant::now();
    while !handle.readiness().ready {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("not ready: {:?}", handle.readiness());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle: let start-up garbage settle, then sample for a few seconds.
    let mut samples = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push(rss_kib()?);
    }
    let idle = samples.iter().copied().max().unwrap_or_default();
    app.shutdown().await;
    println!("## Idle resident memory, 10 plugins loaded, consumers registered\n");
    println!("| measure | MiB |");
    println!("|---|---:|");
    println!("| process before start | {:.1} |", before as f64 / 1024.0);
    println!(
        "| idle (max of 10 samples over 5 s) | {:.1} |",
        idle as f64 / 1024.0
    );
    println!(
        "\ntarget: idle RSS ≤ 64 MB — {}",
        if idle as f64 / 1024.0 <= 64.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
