//! Outbound HTTP through the sandbox: deliveries whose plugin makes one
//! call each (the `caller` fixture, Rust, a fresh instance per delivery,
//! through the host's client under its grants) beside the same calls made
//! by a plain `reqwest` client in this process, to one local keep-alive
//! server, 64 in flight for both, in one run. Prints calls/s, the ratio,
//! p50 and p99 latency, CPU per call, and the p50 a call through a plugin
//! adds.
//!
//! No broker: what is measured is the sandbox and the host's client, the
//! part a plugin's call adds to a delivery (the broker side is the drain
//! benchmark's).
//!
//! `cargo run --release -p warren-bench --bin outbound [calls]` (default
//! 20,000 per variant after 2,000 warm-up calls).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren::plugins::{
    Delivery, InstancePolicy, Outcome, Plugin, PluginRuntime, PluginSettings, RuntimeConfig,
};
use warren_bench::{count_arg, process_cpu};

const IN_FLIGHT: usize = 64;
const WARMUP: u64 = 2_000;

/// A keep-alive HTTP/1.1 server answering every request with 200 `pong`.
async fn server() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Requests are GETs without a body: one per blank line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong";
                        if sock.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(port)
}

/// What one variant measured.
struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_call: Duration,
}

/// `n` calls of `call`, `IN_FLIGHT` at a time.
async fn measure<F, Fut>(n: u64, call: F) -> Result<Run>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let cpu = process_cpu()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (next, call) = (next.clone(), call.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                call().await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await??);
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu()? - cpu;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Ok(Run {
        rate: n as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
        cpu_per_call: cpu / u32::try_from(n).unwrap_or(u32::MAX),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = count_arg(20_000)?;
    let port = server().await?;
    let origin = format!("http://127.0.0.1:{port}");
    let url = format!("{origin}/pong");

    // The host's TLS provider, as `warren run` installs it; reqwest here
    // is built without one of its own (ring's deprecation only notes it
    // lacks post-quantum key exchange, which plain HTTP does not use).
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .context("building the plain client")?;
    let plain = {
        let (client, url) = (client.clone(), url.clone());
        move || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let body = client.get(&url).send().await?.bytes().await?;
                if &body[..] != b"pong" {
                    bail!("unexpected body {body:?}");
                }
                Ok(())
            }
        }
    };

    let rt = PluginRuntime::new(RuntimeConfig::default())?;
    let path = warren_it::plugins::wasm("caller")?;
    let settings = PluginSettings {
        allow_outbound: vec![origin.clone()],
        ..PluginSettings::default()
    };
    let fresh = rt.load_file(&path, &settings).await?;
    let reuse = fresh.with_settings(&PluginSettings {
        instance: InstancePolicy::Reuse {
            max_deliveries: 1000,
        },
        ..settings.clone()
    })?;
    let delivery = Arc::new(Delivery {
        body: Bytes::from(url.clone()),
        queue: "bench.outbound".into(),
        attempt: 1,
        ..Delivery::default()
    });
    let through = |plugin: Plugin| {
        let delivery = delivery.clone();
        move || {
            let (plugin, delivery) = (plugin.clone(), delivery.clone());
            async move {
                match plugin.invoke(&delivery).await {
                    Outcome::Ack { outputs, .. } if &outputs[0].body[..] == b"pong" => Ok(()),
                    other => bail!("the plugin's call failed: {other:?}"),
                }
            }
        }
    };

    measure(WARMUP, plain.clone()).await?;
    measure(WARMUP, through(fresh.clone())).await?;
    measure(WARMUP, through(reuse.clone())).await?;
    let a = measure(n, plain).await?;
    let b = measure(n, through(fresh)).await?;
    let c = measure(n, through(reuse)).await?;

    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6);
    println!("### Outbound HTTP: {n} calls, {IN_FLIGHT} in flight, one local keep-alive server\n");
    println!("| variant | calls/s | p50 ms | p99 ms | CPU µs/call |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in [
        ("plain reqwest client in the host", &a),
        ("`caller` plugin, a fresh instance per delivery", &b),
        ("`caller` plugin, `instance = \"reuse\"`", &c),
    ] {
        println!(
            "| {name} | {:.0} | {} | {} | {} |",
            r.rate,
            ms(r.p50),
            ms(r.p99),
            us(r.cpu_per_call)
        );
    }
    println!(
        "\nThrough a plugin: {:.2}× the plain client's throughput ({:.2}× reused); p50 added per call: {} ms ({} ms reused).",
        b.rate / a.rate,
        c.rate / a.rate,
        ms(b.p50.saturating_sub(a.p50)),
        ms(c.p50.saturating_sub(a.p50))
    );
    Ok(())
}
