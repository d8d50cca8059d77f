//! Idle resident memory of a running Warren with 10 plugins loaded and
//! their consumers registered, measured in-process (the binary holds
//! nothing but Warren). `cargo run --release -p warren-bench --bin idle`.
//! Needs RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379.

use std::time::Duration;

use anyhow::{Context, Result};
use warren_bench::start_warren;

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
    let before = rss_kib()?;
    let overrides: String = PLUGINS
        .iter()
        .map(|name| {
            format!(
                "[plugin.{name}]\nsubscriptions = [{{ queue = \"bench.idle.{name}\", prefetch = 10 }}]\n"
            )
        })
        .collect();
    let warren = start_warren(&PLUGINS, &overrides).await?;
    warren.ready(Duration::from_secs(60)).await?;
    // Idle: let start-up garbage settle, then sample for a few seconds.
    let mut samples = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push(rss_kib()?);
    }
    let idle = samples.iter().copied().max().unwrap_or_default();
    warren.shutdown().await;
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
