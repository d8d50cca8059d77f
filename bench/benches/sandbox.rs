//! Per-delivery cost of the sandbox, per plugin language: a fresh instance
//! per delivery (Warren's default) and `instance = "reuse"`, one delivery
//! at a time and with many in flight, beside a native function call and
//! one instance called directly, in one run:
//! `cargo bench -p warren-bench --bench sandbox`.
//!
//! `SANDBOX_ITERATIONS=2000` shortens the run, e.g. to count instructions
//! per phase under `valgrind --tool=callgrind`, which repeats exactly where
//! wall-clock figures on a shared machine do not.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use warren::message::MessageProperties;
use warren::plugins::{
    Delivery, InstancePolicy, Outcome, Plugin, PluginRuntime, PluginSettings, RuntimeConfig,
};

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

/// The middle of `rounds` (`ROUNDS` of them).
fn median(mut rounds: Vec<f64>) -> f64 {
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

fn per_call(elapsed: Duration, n: u32) -> f64 {
    elapsed.as_nanos() as f64 / f64::from(n)
}

/// Median of `ROUNDS` rounds of `n` calls, one after another, in ns per
/// call.
async fn measure<F, Fut>(n: u32, mut call: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..(n / 10).max(1) {
        anyhow::ensure!(call().await, "call failed during warm-up");
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..n {
            anyhow::ensure!(call().await, "call failed");
        }
        rounds.push(per_call(start.elapsed(), n));
    }
    Ok(median(rounds))
}

/// One `Plugin::invoke` that acks.
async fn acks(plugin: &Plugin, d: &Delivery) -> bool {
    matches!(plugin.invoke(d).await, Outcome::Ack { .. })
}

/// Deliveries in flight through `Plugin::invoke`, as dispatch keeps them
/// with a prefetch.
const IN_FLIGHT: usize = 64;

/// Median of `ROUNDS` rounds of `n` invocations through `Plugin::invoke`
/// with [`IN_FLIGHT`] at once, in ns per delivery.
async fn measure_invoke(plugin: &Plugin, d: &Delivery, n: u32) -> Result<f64> {
    let run = |n: u32| async move {
        let mut inflight = FuturesUnordered::new();
        let mut started = 0;
        while started < n || !inflight.is_empty() {
            while started < n && inflight.len() < IN_FLIGHT {
                inflight.push(plugin.invoke(d));
                started += 1;
            }
            if let Some(outcome) = inflight.next().await {
                anyhow::ensure!(matches!(outcome, Outcome::Ack { .. }), "{outcome:?}");
            }
        }
        Ok(())
    };
    run((n / 10).max(1)).await?;
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        run(n).await?;
        rounds.push(per_call(start.elapsed(), n));
    }
    Ok(median(rounds))
}

/// Calls per round for a plugin: `iterations()`, or fewer for a plugin
/// whose fresh instance is slow (an interpreter), so a round stays near a
/// second.
async fn calls_for(plugin: &Plugin, d: &Delivery) -> Result<u32> {
    let probe = 20;
    let start = Instant::now();
    for _ in 0..probe {
        anyhow::ensure!(acks(plugin, d).await, "{} does not ack", plugin.name());
    }
    let each = start.elapsed().as_secs_f64() / f64::from(probe);
    Ok(((1.0 / each) as u32).clamp(200, iterations()))
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

/// One row of the per-language table.
struct Row {
    name: String,
    calls: u32,
    fresh: f64,
    reuse: f64,
    fresh_inflight: f64,
    reuse_inflight: f64,
}

/// The four figures for `plugin`.
async fn row(name: &str, plugin: &Plugin, d: &Delivery) -> Result<Row> {
    let reuse = plugin
        .with_settings(&PluginSettings {
            instance: InstancePolicy::Reuse {
                max_deliveries: 1000,
            },
            ..PluginSettings::default()
        })
        .map_err(anyhow::Error::msg)?;
    let calls = calls_for(plugin, d).await?;
    Ok(Row {
        name: name.to_string(),
        calls,
        fresh: measure(calls, || acks(plugin, d)).await?,
        reuse: measure(calls, || acks(&reuse, d)).await?,
        fresh_inflight: measure_invoke(plugin, d, calls).await?,
        reuse_inflight: measure_invoke(&reuse, d, calls).await?,
    })
}

async fn load(runtime: &PluginRuntime, wasm: &std::path::Path) -> Result<Plugin> {
    runtime
        .load_file(wasm, &PluginSettings::default())
        .await
        .with_context(|| format!("loading {}", wasm.display()))
}

async fn run() -> Result<()> {
    let n = iterations();
    let wasm = warren_it::plugins::wasm("noop")?;
    // At most IN_FLIGHT instances are alive at once here; a small pool also
    // keeps the address-space reservation within what valgrind can map.
    let runtime = PluginRuntime::new(RuntimeConfig {
        max_instances: 2 * IN_FLIGHT as u32,
        ..RuntimeConfig::default()
    })?;
    let plugin = load(&runtime, &wasm).await?;
    let d = delivery();

    let native = measure(n, || {
        let ok = native_handle(std::hint::black_box(&d)).is_ok();
        async move { ok }
    })
    .await?;
    let mut reused = plugin.reused_instance().await.map_err(anyhow::Error::msg)?;
    let mut reused_ns = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..n {
            anyhow::ensure!(reused.call(&d).await, "reused call failed");
        }
        reused_ns.push(per_call(start.elapsed(), n));
    }
    let reused_ns = median(reused_ns);
    let phases = plugin.bench_phases(&d, n).await;

    let mut rows = vec![row("Rust (noop)", &plugin, &d).await?];
    let echo = load(&runtime, &warren_it::plugins::wasm("echo")?).await?;
    rows.push(row("Rust (echo)", &echo, &d).await?);
    // The same echo in each language's SDK, built from source.
    for (name, wasm) in [
        ("Python (echo)", warren_it::plugins::python_wasm("echo")?),
        (
            "JavaScript, QuickJS (echo)",
            warren_it::plugins::js_wasm("echo")?,
        ),
    ] {
        let plugin = load(&runtime, &wasm).await?;
        rows.push(row(name, &plugin, &d).await?);
    }

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

    println!("## Sandbox cost per delivery (256-byte body)\n");
    println!(
        "median of {ROUNDS} rounds of `Plugin::invoke` on a current-thread tokio runtime, one delivery at a time and with {IN_FLIGHT} in flight\n"
    );
    println!(
        "| plugin | calls per round | fresh | `reuse` | fresh, {IN_FLIGHT} in flight | `reuse`, {IN_FLIGHT} in flight |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let us = |ns: f64| format!("{:.2} µs", ns / 1000.0);
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            r.calls,
            us(r.fresh),
            us(r.reuse),
            us(r.fresh_inflight),
            us(r.reuse_inflight)
        );
    }
    println!(
        "\nnative function call {native:.0} ns; one noop instance called directly {reused_ns:.0} ns"
    );
    println!(
        "\nfresh noop instance, by phase (ns): store + WASI context {:.0} / instantiate {:.0} / call {:.0} / drop {:.0}",
        phases[0], phases[1], phases[2], phases[3]
    );
    println!(
        "\nload of the noop component: {:.1} ms compiled, {:.1} ms from the compile cache",
        loads[0].as_secs_f64() * 1000.0,
        loads[1].as_secs_f64() * 1000.0
    );
    let fresh = rows[0].fresh;
    println!(
        "\ntarget: Rust fresh ≤ 5,000 ns — {fresh:.0} ns, {}",
        if fresh <= 5_000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
