//! Per-invocation cost of the sandbox: a fresh instance per delivery (what
//! Warren does) beside a native function call and one reused instance, in
//! one run: `cargo bench -p warren-bench --bench sandbox`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use warren::message::MessageProperties;
use warren::plugins::{Delivery, Outcome, PluginRuntime, PluginSettings, RuntimeConfig};

const WARMUP: u32 = 10_000;
const ITERATIONS: u32 = 100_000;
const ROUNDS: usize = 5;

fn delivery() -> Delivery {
    Delivery {
        body: Bytes::from(vec![b'x'; 256]),
        exchange: "bench".into(),
        routing_key: "bench.key".into(),
        queue: "bench.q".into(),
        properties: MessageProperties::default(),
        redelivered: false,
        attempt: 1,
    }
}

/// What the noop plugin does, natively.
#[inline(never)]
fn native_handle(d: &Delivery) -> Result<(), String> {
    std::hint::black_box((d.body.len(), d.routing_key.len()));
    Ok(())
}

fn per_call(elapsed: Duration, n: u32) -> f64 {
    elapsed.as_nanos() as f64 / f64::from(n)
}

/// Median of `ROUNDS` rounds of `ITERATIONS` calls, in ns per call.
async fn measure<F, Fut>(mut call: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..WARMUP {
        anyhow::ensure!(call().await, "call failed during warm-up");
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..ITERATIONS {
            if !call().await {
                anyhow::bail!("call failed");
            }
        }
        rounds.push(per_call(start.elapsed(), ITERATIONS));
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[ROUNDS / 2])
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<()> {
    let wasm = warren_it::plugins::wasm("noop")?;
    let runtime = PluginRuntime::new(RuntimeConfig::default())?;
    let plugin = runtime
        .load_file(&wasm, &PluginSettings::default())
        .await
        .with_context(|| format!("loading {}", wasm.display()))?;
    let d = delivery();

    let native = measure(|| {
        let ok = native_handle(std::hint::black_box(&d)).is_ok();
        async move { ok }
    })
    .await?;

    let mut reused = plugin.reused_instance().await.map_err(anyhow::Error::msg)?;
    let reused_ns = {
        for _ in 0..WARMUP {
            reused.call(&d).await;
        }
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..ITERATIONS {
                anyhow::ensure!(reused.call(&d).await, "reused call failed");
            }
            rounds.push(per_call(start.elapsed(), ITERATIONS));
        }
        rounds.sort_by(f64::total_cmp);
        rounds[ROUNDS / 2]
    };

    let fresh = measure(|| {
        let plugin = &plugin;
        let d = &d;
        async move { matches!(plugin.invoke(d).await, Outcome::Ack { .. }) }
    })
    .await?;

    let phases = plugin.bench_phases(&d, ITERATIONS).await;

    println!("## Sandbox overhead per delivery (noop plugin, 256-byte body)\n");
    println!("median of {ROUNDS} rounds × {ITERATIONS} calls, current-thread tokio runtime\n");
    println!("| configuration | ns per delivery | vs native |");
    println!("|---|---:|---:|");
    println!("| native function call | {native:.0} | 1× |");
    println!(
        "| one instance reused (not how Warren runs) | {reused_ns:.0} | {:.0}× |",
        reused_ns / native
    );
    println!(
        "| **fresh instance per delivery (Warren)** | **{fresh:.0}** | {:.0}× |",
        fresh / native
    );
    println!(
        "\nfresh instance, by phase (ns): store + WASI context {:.0} / instantiate {:.0} / call {:.0} / drop {:.0}",
        phases[0], phases[1], phases[2], phases[3]
    );
    println!(
        "\ntarget: fresh ≤ 10,000 ns — {}",
        if fresh <= 10_000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
