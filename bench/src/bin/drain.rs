//! Drain throughput of the whole of Warren (consumer → fresh sandbox
//! instance of the `noop` plugin → coalesced ack) beside plain lapin
//! consumers with per-message and batched acks, in one run, on the same
//! pre-filled quorum queue type Warren declares by default.
//!
//! `cargo run --release -p warren-bench --bin drain [messages]` (default
//! 200,000 × 256 bytes). Needs RabbitMQ on 127.0.0.1:5672 and Redis on
//! 127.0.0.1:6379.

use anyhow::{Context, Result, bail};
use lapin::options::QueueDeleteOptions;
use warren_bench::{connect_shared, count_arg, declare_quorum, drain_lapin, drain_warren, fill};
use warren_it::broker::inspect;

const BODY: usize = 256;
const PREFETCH: u16 = 1000;
/// Batched acks: `multiple = true` every this many deliveries.
const BATCH: u64 = 100;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = count_arg(200_000)?;
    // An optional second argument runs only the variants whose name
    // contains it (for profiling one of them).
    let only = std::env::args().nth(2).unwrap_or_default();
    let conn = connect_shared().await?;

    let mut rows = Vec::new();
    for kind in [
        "lapin, ack per message",
        "lapin, batched acks",
        "pika, ack per message",
        "Warren, noop plugin",
        "Warren, noop plugin, instance = reuse",
        "Warren, noop plugin, dedup by message id",
    ] {
        if !kind.contains(only.as_str()) {
            continue;
        }
        let queue = format!("bench.drain.{}", uuid::Uuid::new_v4().simple());
        let ch = conn.create_channel().await?;
        declare_quorum(&ch, &queue).await?;
        eprintln!("{kind}: filling {queue} with {n} messages…");
        fill(&ch, &queue, n, BODY).await?;
        eprintln!("{kind}: draining…");
        let secs = match kind {
            "lapin, ack per message" => drain_lapin(&conn, &queue, n, 1, PREFETCH).await?,
            "lapin, batched acks" => drain_lapin(&conn, &queue, n, BATCH, PREFETCH).await?,
            "pika, ack per message" => drain_pika(&queue, n).await?,
            "Warren, noop plugin" => {
                drain_warren("noop", &queue, n, PREFETCH, "fresh", "")
                    .await?
                    .secs
            }
            // Each message's key looked up, and marked done, in Redis. The
            // records expire a minute after the run.
            "Warren, noop plugin, dedup by message id" => {
                let dedup = r#"dedup = { key = "message-id", window = "60s" }"#;
                drain_warren("noop", &queue, n, PREFETCH, "fresh", dedup)
                    .await?
                    .secs
            }
            _ => {
                drain_warren("noop", &queue, n, PREFETCH, "reuse", "")
                    .await?
                    .secs
            }
        };
        let (left, _) = inspect(&conn, &queue).await?;
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        rows.push((kind, secs, left));
    }

    let rate = |secs: f64| n as f64 / secs;
    let best_lapin = rows
        .iter()
        .filter(|r| r.0.starts_with("lapin"))
        .map(|r| rate(r.1))
        .fold(0.0, f64::max);
    println!(
        "## Drain of {n} pre-filled {BODY}-byte messages (quorum queue, prefetch {PREFETCH})\n"
    );
    println!("| consumer | seconds | msg/s | vs best lapin | left in queue |");
    println!("|---|---:|---:|---:|---:|");
    for (kind, secs, left) in &rows {
        let vs = if best_lapin > 0.0 {
            format!("{:.2}×", rate(*secs) / best_lapin)
        } else {
            "–".into()
        };
        println!(
            "| {kind} | {secs:.2} | {:.0} | {vs} | {left} |",
            rate(*secs)
        );
    }
    // Targets are judged only against baselines measured in this run.
    if best_lapin > 0.0
        && let Some(reuse) = rows.iter().find(|r| r.0.ends_with("reuse"))
    {
        let ratio = rate(reuse.1) / best_lapin;
        println!(
            "\ntarget: Warren (reuse) ≥ 0.9× best lapin — {ratio:.2}× {}",
            if ratio >= 0.9 { "met" } else { "NOT met" }
        );
    }
    let Some(warren) = rows.iter().find(|r| r.0 == "Warren, noop plugin") else {
        return Ok(());
    };
    let warren = rate(warren.1);
    if let Some(dedup) = rows.iter().find(|r| r.0.contains("dedup")) {
        let ratio = rate(dedup.1) / warren;
        println!(
            "\ntarget: Warren deduplicated ≥ 0.6× Warren — {ratio:.2}× {}",
            if ratio >= 0.6 { "met" } else { "NOT met" }
        );
    }
    if let Some(pika) = rows.iter().find(|r| r.0.starts_with("pika")) {
        let ratio = warren / rate(pika.1);
        println!(
            "\ntarget: Warren ≥ 3× pika — {ratio:.1}× {}",
            if ratio >= 3.0 { "met" } else { "NOT met" }
        );
    }
    if best_lapin > 0.0 {
        let ratio = warren / best_lapin;
        println!(
            "\ntarget: Warren (fresh) ≥ 0.75× best lapin — {ratio:.2}× {}",
            if ratio >= 0.75 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// The Python peer: `bench/pika_drain.py` (needs `pip install pika`).
async fn drain_pika(queue: &str, n: u64) -> Result<f64> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pika_drain.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(queue)
        .arg(n.to_string())
        .arg(PREFETCH.to_string())
        .arg(warren_bench::bench_broker().await?.url)
        .output()
        .await
        .context("running python3 bench/pika_drain.py")?;
    if !out.status.success() {
        bail!(
            "pika drain failed (is pika installed? pip install pika): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
