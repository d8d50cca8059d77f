//! Round-trip latency at a paced 1,000 msg/s: publisher → queue → handler
//! that republishes → queue → collector, for all of Warren (the `echo`
//! plugin in a fresh instance per delivery, output published with a confirm
//! before the input is acked) beside a plain lapin relay doing the same
//! (consume, publish with confirm, ack), in one run. Prints p50, p99 and
//! max of each.
//!
//! `cargo run --release -p warren-bench --bin roundtrip [messages]` (default
//! 10,000 per variant after 1,000 warm-up messages, 256-byte bodies). Needs
//! RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use warren_bench::{Warren, connect_shared, count_arg, declare_quorum, start_warren};

const BODY: usize = 256;
const RATE: u64 = 1_000;
const WARMUP: u64 = 1_000;
const PREFETCH: u16 = 100;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = count_arg(10_000)?;
    let conn = connect_shared().await?;

    let mut rows = Vec::new();
    for kind in ["lapin relay", "Warren, echo plugin"] {
        let id = uuid::Uuid::new_v4().simple();
        let input = format!("bench.rt-in.{id}");
        let output = format!("bench.rt-out.{id}");
        let ch = conn.create_channel().await?;
        declare_quorum(&ch, &input).await?;
        declare_quorum(&ch, &output).await?;
        eprintln!("{kind}: {} messages at {RATE}/s…", WARMUP + n);
        let relay = if kind.starts_with("lapin") {
            let relay_conn = connect_shared().await?;
            Relay::Lapin(tokio::spawn(lapin_relay(
                relay_conn,
                input.clone(),
                output.clone(),
            )))
        } else {
            let warren = start_warren(
                &["echo"],
                &format!(
                    r#"
                    [plugin.echo]
                    subscriptions = [{{ queue = "{input}", prefetch = {PREFETCH} }}]
                    config = {{ routing-key = "{output}" }}
                    "#
                ),
            )
            .await?;
            warren.ready(Duration::from_secs(30)).await?;
            Relay::Warren(Box::new(warren))
        };
        let mut latencies = measure(&conn, &input, &output, n).await?;
        match relay {
            Relay::Lapin(task) => task.abort(),
            Relay::Warren(warren) => warren.shutdown().await,
        }
        for q in [&input, &output] {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        latencies.sort();
        rows.push((kind, latencies));
    }

    println!(
        "## Round trip at {RATE} msg/s, {n} × {BODY}-byte messages (after {WARMUP} warm-up)\n"
    );
    println!(
        "publisher → quorum queue → handler (republish with confirm, then ack) → quorum queue → consumer\n"
    );
    println!("| handler | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    for (kind, v) in &rows {
        println!(
            "| {kind} | {} | {} | {} |",
            ms(pct(v, 0.50)),
            ms(pct(v, 0.99)),
            ms(v[v.len() - 1])
        );
    }
    let p99 = |i: usize| pct(&rows[i].1, 0.99).as_secs_f64();
    let ratio = p99(1) / p99(0);
    println!(
        "\ntarget: Warren p99 ≤ 2× lapin's — {ratio:.2}× {}",
        if ratio <= 2.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

enum Relay {
    Lapin(tokio::task::JoinHandle<Result<()>>),
    Warren(Box<Warren>),
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Publish `WARMUP + n` messages at `RATE`/s, each carrying its send time,
/// and return the round trip of the last `n` as they arrive on `output`.
async fn measure(conn: &Connection, input: &str, output: &str, n: u64) -> Result<Vec<Duration>> {
    let start = Instant::now();
    let rx = conn.create_channel().await?;
    rx.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = rx
        .basic_consume(
            output.into(),
            "rt-collector".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let collect = tokio::spawn(async move {
        let mut got = Vec::with_capacity(n as usize);
        while (got.len() as u64) < WARMUP + n {
            let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .context("no round trip completed for 30 s")?
                .context("collector ended")??;
            let arrived = start.elapsed();
            let sent = u64::from_le_bytes(d.data[..8].try_into()?);
            got.push(arrived.saturating_sub(Duration::from_nanos(sent)));
        }
        anyhow::Ok(got)
    });

    let tx = conn.create_channel().await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut body = vec![b'x'; BODY];
    for _ in 0..WARMUP + n {
        tick.tick().await;
        let sent = start.elapsed().as_nanos() as u64;
        body[..8].copy_from_slice(&sent.to_le_bytes());
        tx.basic_publish(
            "".into(),
            input.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
    }
    let got = collect.await??;
    Ok(got[WARMUP as usize..].to_vec())
}

/// The baseline: a good hand-written lapin consumer for the same job. Each
/// output is published with a confirm and its input acked once the confirm
/// arrives, with up to `PREFETCH` of these in flight (not one at a time,
/// which would queue behind every quorum-queue confirm).
async fn lapin_relay(conn: Connection, input: String, output: String) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let out = conn.create_channel().await?;
    out.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            input.as_str().into(),
            "rt-relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut settling = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            d = consumer.next() => {
                let d = d.context("relay consumer ended")??;
                let confirm = out
                    .basic_publish(
                        "".into(),
                        output.as_str().into(),
                        BasicPublishOptions::default(),
                        &d.data,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?;
                settling.push(async move {
                    confirm.await?;
                    d.ack(BasicAckOptions::default()).await?;
                    anyhow::Ok(())
                });
            }
            Some(r) = settling.next(), if !settling.is_empty() => r?,
        }
    }
}
