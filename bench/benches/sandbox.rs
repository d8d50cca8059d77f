//! Per-invocation cost of the sandbox: a fresh instance per delivery (what
//! Warren does) beside a native function call and one reused instance, in
//! one run: `cargo bench -p warren-bench --bench sandbox`.
//!
//! `SANDBOX_ITERATIONS=2000` shortens the run, e.g. to count instructions
//! per phase under `valgrind --tool=callgrind`, which repeats exactly where
//! wall-clock figures on a shared machine do not.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use warren::message::MessageProperties;
use warren::plugins::{Delivery, Outcome, PluginRuntime, PluginSettings, RuntimeConfig};

const ROUNDS: usize = 5;

/// Calls per round (`SANDBOX_ITERATIONS`, default 100,000).
fn iterations() -> u32 {
    std::env::var("SANDBOX_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

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

/// Median of `ROUNDS` rounds of `iterations()` calls, in ns per call.
async fn measure<F, Fut>(mut call: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let n = iterations();
    for _ in 0..n / 10 {
        anyhow::ensure!(call().await, "call failed during warm-up");
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..n {
            if !call().await {
                anyhow::bail!("call failed");
            }
        }
        rounds.push(per_call(start.elapsed(), n));
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
    let n = iterations();
    let wasm = warren_it::plugins::wasm("noop")?;
    // At most two instances are alive at once here; a small pool also keeps
    // the address-space reservation within what valgrind can map.
    let runtime = PluginRuntime::new(RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })?;
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
        for _ in 0..n / 10 {
            reused.call(&d).await;
        }
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..n {
                anyhow::ensure!(reused.call(&d).await, "reused call failed");
            }
            rounds.push(per_call(start.elapsed(), n));
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

    let phases = plugin.bench_phases(&d, n).await;

    let reuse_plugin = plugin
        .with_settings(&PluginSettings {
            instance: warren::plugins::InstancePolicy::Reuse {
                max_deliveries: 1000,
            },
            ..PluginSettings::default()
        })
        .map_err(anyhow::Error::msg)?;
    let reuse = measure(|| {
        let plugin = &reuse_plugin;
        let d = &d;
        async move { matches!(plugin.invoke(d).await, Outcome::Ack { .. }) }
    })
    .await?;

    // Loading: a compile into an empty compile cache, then the same bytes
    // from it (what a second start or an unchanged reload costs).
    let cache = tempfile::tempdir()?;
    let cached_runtime = || {
        PluginRuntime::new(RuntimeConfig {
            max_instances: 4,
            compile_cache_dir: Some(cache.path().to_path_buf()),
            ..RuntimeConfig::default()
        })
    };
    let mut loads = Vec::new();
    for _ in 0..2 {
        let rt = cached_runtime()?;
        let start = Instant::now();
        rt.load_file(&wasm, &PluginSettings::default())
            .await
            .map_err(anyhow::Error::msg)?;
        loads.push(start.elapsed());
    }

    println!("## Sandbox overhead per delivery (noop plugin, 256-byte body)\n");
    println!("median of {ROUNDS} rounds × {n} calls, current-thread tokio runtime\n");
    println!("| configuration | ns per delivery | vs native |");
    println!("|---|---:|---:|");
    println!("| native function call | {native:.0} | 1× |");
    println!(
        "| one instance called directly (lower bound) | {reused_ns:.0} | {:.0}× |",
        reused_ns / native
    );
    println!(
        "| **fresh instance per delivery (Warren's default)** | **{fresh:.0}** | {:.0}× |",
        fresh / native
    );
    println!(
        "| **`instance = \"reuse\"` (Warren)** | **{reuse:.0}** | {:.0}× |",
        reuse / native
    );
    println!(
        "\nfresh instance, by phase (ns): store + WASI context {:.0} / instantiate {:.0} / call {:.0} / drop {:.0}",
        phases[0], phases[1], phases[2], phases[3]
    );
    println!(
        "\nload of the noop component: {:.1} ms compiled, {:.1} ms from the compile cache",
        loads[0].as_secs_f64() * 1000.0,
        loads[1].as_secs_f64() * 1000.0
    );
    println!(
        "\ntarget: fresh ≤ 5,000 ns — {}",
        if fresh <= 5_000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
