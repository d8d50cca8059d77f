//! Hot-reload benchmark: how long from `PUT /plugins/stamp` (a new
//! version) until the first delivery handled by the new version, while a
//! publisher keeps ~5,000 msg/s flowing through the plugin. Runs an
//! in-process Warren against the broker on 127.0.0.1:5672 and the Redis on
//! 127.0.0.1:6379, swaps between `stamp` 1.0.0 and 2.0.0 several times,
//! and prints a markdown table. The time to check and compile the upload
//! on its own is measured in the same run as the baseline the swap
//! latency is made of.
//!
//! "First delivery handled by the new version" is observed as the arrival
//! of its output (stamped `x-stamp-version`) at a consumer of the output
//! queue, so the figure includes the output's publish, confirm and
//! delivery (about a millisecond on loopback).
//!
//! `cargo run --release -p warren-bench --bin reload`

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use warren::app::App;
use warren::config::Config;
use warren_it::broker::{Broker, SHARED_URL, unique};
use warren_it::plugins::wasm;
use warren_it::wait;

const RATE: u64 = 5_000;
const SWAPS: usize = 10;
const ROLLBACKS: usize = 4;
const TARGET_MS: f64 = 100.0;

/// The version of the newest output seen, and when it first appeared.
#[derive(Default)]
struct Seen {
    /// (version, first arrival) per version change observed.
    changes: Vec<(String, Instant)>,
    count: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let v1 = std::fs::read(wasm("stamp")?)?;
    let v2 = std::fs::read(wasm("stamp-v2")?)?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("stamp.wasm"), &v1)?;
    let (input, output) = (unique("bench-reload-in"), unique("bench-reload-out"));
    let broker = Broker::shared().await?;
    broker.declare_queue(&output).await?;
    let config = config(dir.path(), &input, &output)?;
    let app = App::start(config).await?;
    let handle = app.handle();
    let addr = app.admin_addr();
    wait::until_true("warren ready", Duration::from_secs(60), || {
        let h = handle.clone();
        async move { h.readiness().ready }
    })
    .await?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let consumer = tokio::spawn(consume(output.clone(), seen.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish(input.clone(), sent.clone(), stop.clone()));
    wait::until_true("load flowing", Duration::from_secs(30), || {
        let seen = seen.clone();
        async move { lock(&seen).count >= RATE }
    })
    .await?;

    // Baseline, under the same load: checking and compiling the upload
    // alone.
    let runtime = handle.reloader.runtime().clone();
    let mut compile_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        runtime
            .load_bytes(
                &dir.path().join("probe.wasm"),
                v2.clone(),
                &Default::default(),
            )
            .await
            .context("compiling stamp 2.0.0")?;
        compile_ms.push(ms(t.elapsed()));
    }

    // Fresh builds: each upload is new bytes (the same code with a custom
    // section naming the swap), so each one is checked and compiled. Then
    // rollbacks to the two most recent builds, which stay compiled.
    let mut uploads: Vec<(Vec<u8>, &str, &str)> = (0..SWAPS)
        .map(|i| {
            let (base, version) = if i % 2 == 0 {
                (&v2, "2.0.0")
            } else {
                (&v1, "1.0.0")
            };
            (variant(base, i as u64), version, "new build (compiled)")
        })
        .collect();
    let last_two = [uploads[SWAPS - 2].clone(), uploads[SWAPS - 1].clone()];
    for i in 0..ROLLBACKS {
        let (bytes, version, _) = &last_two[i % 2];
        uploads.push((bytes.clone(), version, "rollback (kept compiled)"));
    }

    let mut rows = Vec::new();
    for (i, (bytes, version, kind)) in uploads.iter().enumerate() {
        let version = *version;
        let changes_before = lock(&seen).changes.len();
        let t0 = Instant::now();
        let r =
            warren_it::http::request(addr, "PUT", "/plugins/stamp", &[], Some(bytes.as_slice()))
                .await?;
        let response = t0.elapsed();
        if r.status != 200 {
            bail!("swap {i}: {} {}", r.status, r.text());
        }
        let first = wait::until(
            "first output of the new version",
            Duration::from_secs(30),
            || {
                let seen = seen.clone();
                async move {
                    let s = lock(&seen);
                    s.changes[changes_before..]
                        .iter()
                        .find(|(v, _)| v == version)
                        .map(|(_, at)| *at)
                }
            },
        )
        .await?;
        rows.push((
            *kind,
            version,
            ms(response),
            ms(first.saturating_duration_since(t0)),
        ));
        // Let the new version serve for a while before the next swap.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    publisher.await??;
    let published = sent.load(Ordering::SeqCst);
    wait::until_true("every output", Duration::from_secs(60), || {
        let seen = seen.clone();
        async move { lock(&seen).count >= published }
    })
    .await?;
    consumer.abort();
    let received = lock(&seen).count;
    app.shutdown().await;

    print_table(&rows, &compile_ms, published, received);
    trace_cost();
    Ok(())
}

/// What the W3C trace context adds to each delivery with one output: parse
/// the incoming `traceparent`, make the delivery's span context, write it
/// on the output.
fn trace_cost() {
    use warren::dispatch::headers;
    use warren::message::{HeaderValue, MessageProperties};
    let mut incoming = MessageProperties::default();
    incoming.set_header(
        headers::TRACEPARENT,
        HeaderValue::String("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    );
    incoming.set_header("x-other", HeaderValue::I64(1));
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        let parent = headers::trace_parent(std::hint::black_box(&incoming));
        let span = warren::telemetry::TraceContext::child_of(parent.as_ref());
        let mut out = incoming.clone();
        headers::propagate_trace(&incoming, &span, &mut out);
        std::hint::black_box(out);
    }
    let with = t.elapsed();
    let t = Instant::now();
    for _ in 0..n {
        let out = std::hint::black_box(&incoming).clone();
        std::hint::black_box(out);
    }
    let without = t.elapsed();
    println!();
    println!("| per delivery with one output | ns |");
    println!("|---|---:|");
    println!(
        "| copy the headers onto the output (the old propagation's floor) | {:.0} |",
        without.as_nanos() as f64 / f64::from(n)
    );
    println!(
        "| same, plus parse `traceparent`, new span context, write it | {:.0} |",
        with.as_nanos() as f64 / f64::from(n)
    );
}

fn print_table(rows: &[Row], compile_ms: &[f64], published: u64, received: u64) {
    println!(
        "| hot reload under {RATE} msg/s (`PUT /plugins/stamp`) | kind | to version | request → response | request → first delivery on the new version |"
    );
    println!("|---|---|---|---:|---:|");
    for (i, (kind, version, resp, first)) in rows.iter().enumerate() {
        println!(
            "| swap {} | {kind} | {version} | {resp:.1} ms | {first:.1} ms |",
            i + 1
        );
    }
    for kind in ["new build (compiled)", "rollback (kept compiled)"] {
        let resp: Vec<f64> = rows.iter().filter(|r| r.0 == kind).map(|r| r.2).collect();
        let first: Vec<f64> = rows.iter().filter(|r| r.0 == kind).map(|r| r.3).collect();
        println!(
            "| **median** | {kind} | | {:.1} ms | **{:.1} ms** |",
            median(&resp),
            median(&first)
        );
        println!(
            "| max | {kind} | | {:.1} ms | {:.1} ms |",
            max(&resp),
            max(&first)
        );
    }
    println!(
        "| baseline: check + compile the upload alone, same load (median of {}) | | | {:.1} ms | |",
        compile_ms.len(),
        median(compile_ms)
    );
    let fresh: Vec<f64> = rows
        .iter()
        .filter(|r| r.0.starts_with("new"))
        .map(|r| r.3)
        .collect();
    let verdict = if median(&fresh) <= TARGET_MS {
        "met"
    } else {
        "missed"
    };
    println!("| target | | | | ≤ {TARGET_MS:.0} ms ({verdict} by the median of new builds) |");
    println!();
    println!(
        "{published} messages published during the run, {received} outputs received ({}).",
        if received == published {
            "none lost, none twice".to_string()
        } else {
            format!("{} missing or extra", published.abs_diff(received))
        }
    );
}

/// (kind, version, request → response ms, request → first new output ms)
type Row = (&'static str, &'static str, f64, f64);

/// `component` with a custom section appended: other bytes, same code.
fn variant(component: &[u8], n: u64) -> Vec<u8> {
    let name = b"warren-bench";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(&n.to_le_bytes());
    let mut out = component.to_vec();
    out.push(0); // custom section id
    out.push(payload.len() as u8); // LEB128, < 128
    out.extend_from_slice(&payload);
    out
}

fn config(dir: &Path, input: &str, output: &str) -> Result<Config> {
    let text = format!(
        r#"
        [plugins]
        dir = "{dir}"
        [spool]
        stream-key = "{stream}"
        [admin]
        bind = "127.0.0.1:0"
        max-body-bytes = 67108864
        [dispatch]
        retry-exchange = "{retry}"
        dead-letter-exchange = "{dlx}"
        dead-letter-queue = "{dlq}"
        [telemetry]
        log-level = "warn"
        [plugin.stamp]
        subscriptions = [{{ queue = "{input}", prefetch = 200 }}]
        config = {{ routing-key = "{output}" }}
        "#,
        dir = dir.display(),
        stream = unique("bench-spool"),
        retry = unique("bench-retry"),
        dlx = unique("bench-dlx"),
        dlq = unique("bench-dlq"),
    );
    Config::parse(&text, Vec::new()).map_err(|p| anyhow::anyhow!("bench config: {p:?}"))
}

/// Publish numbered messages at about [`RATE`] per second until `stop`.
async fn publish(queue: String, sent: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Result<()> {
    let broker = Broker::shared().await?;
    let batch = 50u64;
    let tick = Duration::from_micros(1_000_000 * batch / RATE);
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let first = sent.load(Ordering::SeqCst);
        let bodies: Vec<String> = (first..first + batch).map(|i| i.to_string()).collect();
        broker.publish_all("", &queue, &bodies).await?;
        sent.fetch_add(batch, Ordering::SeqCst);
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    Ok(())
}

/// Consume the outputs, noting when each new version first appears.
async fn consume(queue: String, seen: Arc<Mutex<Seen>>) -> Result<()> {
    let conn = Connection::connect(SHARED_URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "bench-reload".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        let at = Instant::now();
        let version = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| match h.inner().get("x-stamp-version") {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            })
            .unwrap_or_default();
        let mut s = lock(&seen);
        s.count += 1;
        if s.changes.last().is_none_or(|(v, _)| *v != version) {
            s.changes.push((version, at));
        }
    }
    Ok(())
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    match seen.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}
