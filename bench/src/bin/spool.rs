//! Spool benchmark: append rate through a real Sentinel topology (one
//! appender at a time, and group-committed with many concurrent appenders),
//! and drain rate into the real broker on 127.0.0.1:5672 with publisher
//! confirms, 256-byte messages, in one run. Prints a markdown table.
//!
//! `cargo run --release -p warren-bench --bin spool`

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::future::BoxFuture;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use warren::buffer::{DrainPublisher, Drainer, DrainerConfig, Spool, SpoolConfig, SpoolHandle};
use warren::message::OutboundMessage;
use warren_it::broker::SHARED_URL;
use warren_it::sentinel::Topology;
use warren_it::wait;

const QUEUE: &str = "warren.bench.spool";
const BODY: usize = 256;
const SINGLE: usize = 2_000;
const GROUPED: usize = 100_000;
const APPENDERS: usize = 256;

/// A minimal confirmed publisher: publishes are sent in order, confirms are
/// awaited by the drainer's window.
struct LapinPublisher {
    channel: lapin::Channel,
}

impl DrainPublisher for LapinPublisher {
    type Error = String;
    type Confirm = BoxFuture<'static, Result<(), String>>;

    fn publish(
        &self,
        m: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, String>> + Send {
        let channel = self.channel.clone();
        async move {
            let mut props = BasicProperties::default();
            if let Some(mode) = m.properties.delivery_mode {
                props = props.with_delivery_mode(mode);
            }
            if let Some(id) = m.properties.message_id.as_deref() {
                props = props.with_message_id(id.into());
            }
            let confirm = channel
                .basic_publish(
                    m.exchange.as_str().into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    props,
                )
                .await
                .map_err(|e| e.to_string())?;
            let confirm: BoxFuture<'static, Result<(), String>> = Box::pin(async move {
                match tokio::time::timeout(Duration::from_secs(10), confirm).await {
                    Ok(Ok(c)) if c.is_ack() => Ok(()),
                    Ok(Ok(_)) => Err("nacked".to_owned()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("confirm timed out".to_owned()),
                }
            });
            Ok(confirm)
        }
    }
}

fn message(delivery_mode: u8) -> OutboundMessage {
    let mut m = OutboundMessage::new("", QUEUE, Bytes::from(vec![b'x'; BODY]));
    m.properties.delivery_mode = Some(delivery_mode);
    m
}

async fn single(handle: &SpoolHandle, mode: u8) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..SINGLE {
        handle.append(message(mode)).await?;
    }
    Ok(SINGLE as f64 / start.elapsed().as_secs_f64())
}

async fn grouped(handle: &SpoolHandle, mode: u8) -> Result<f64> {
    let start = Instant::now();
    let per = GROUPED / APPENDERS;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..APPENDERS {
        let h = handle.clone();
        tasks.spawn(async move {
            for _ in 0..per {
                h.append(message(mode)).await?;
            }
            Ok::<(), warren::buffer::SpoolError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((per * APPENDERS) as f64 / start.elapsed().as_secs_f64())
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The broker's ceiling for the drain: the same publishes and confirms
/// with no spool in between.
async fn baseline(channel: &lapin::Channel, window: usize, mode: u8) -> Result<f64> {
    use futures::StreamExt as _;
    let publisher = LapinPublisher {
        channel: channel.clone(),
    };
    let mut inflight: futures::stream::FuturesOrdered<BoxFuture<'static, Result<(), String>>> =
        futures::stream::FuturesOrdered::new();
    let start = Instant::now();
    for _ in 0..GROUPED {
        if inflight.len() >= window
            && let Some(r) = inflight.next().await
        {
            r.map_err(anyhow::Error::msg)?;
        }
        let confirm = publisher
            .publish(message(mode))
            .await
            .map_err(anyhow::Error::msg)?;
        inflight.push_back(confirm);
    }
    while let Some(r) = inflight.next().await {
        r.map_err(anyhow::Error::msg)?;
    }
    let rate = GROUPED as f64 / start.elapsed().as_secs_f64();
    channel
        .queue_purge(QUEUE.into(), lapin::options::QueuePurgeOptions::default())
        .await?;
    Ok(rate)
}

/// Drain everything in the spool through a fresh drainer; (count, rate).
async fn drain(
    handle: &SpoolHandle,
    channel: &lapin::Channel,
    window: usize,
    batch: usize,
) -> Result<(u64, f64)> {
    let depth = handle.depth();
    let drained_before = handle.status().await.drained;
    let cfg = DrainerConfig {
        window,
        batch,
        ..DrainerConfig::default()
    };
    let (drainer, _control) = Drainer::new(
        cfg,
        handle,
        LapinPublisher {
            channel: channel.clone(),
        },
    )?;
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn(drainer.run(cancel.clone()));
    wait::until_true("spool drained", Duration::from_secs(300), || {
        let h = handle.clone();
        async move { h.is_empty() }
    })
    .await?;
    let secs = start.elapsed().as_secs_f64();
    cancel.cancel();
    task.await?;
    let drained = handle.status().await.drained - drained_before;
    if drained < depth {
        bail!("drained {drained} of {depth}");
    }
    channel
        .queue_purge(QUEUE.into(), lapin::options::QueuePurgeOptions::default())
        .await?;
    Ok((drained, drained as f64 / secs))
}

#[tokio::main]
async fn main() -> Result<()> {
    let topo = Topology::start()
        .await
        .context("start the Sentinel topology")?;
    let mut cfg = SpoolConfig::sentinel(topo.sentinel_urls(), topo.master_name.clone(), "bench");
    cfg.status_interval_ms = 200;
    let (spool, handle) = Spool::new(cfg)?;
    let cancel = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(spool.run(cancel.child_token()));
    wait::until_true("spool connected", Duration::from_secs(10), || {
        let h = handle.clone();
        async move { h.status().await.primary.is_some() }
    })
    .await?;
    let replicas = handle.status().await.wait_for_replicas;

    // Warren's defaults (`spool.drain-window`, the drainer's read batch)
    // unless overridden for an experiment.
    let window = env_or(
        "DRAIN_WINDOW",
        warren::config::SpoolConfig::default().drain_window,
    );
    let batch = env_or("DRAIN_BATCH", DrainerConfig::default().batch);
    let single_rate = single(&handle, 2).await?;
    let grouped_rate = grouped(&handle, 2).await?;

    let conn = Connection::connect(SHARED_URL, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ on 127.0.0.1:5672")?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    // Persistent messages (what OutboundMessage::new makes) into a durable
    // queue: the broker fsyncs before confirming.
    let persistent = drain(&handle, &channel, window, batch).await?;
    let persistent_base = baseline(&channel, window, 2).await?;
    // Transient messages: the broker's confirm path without disk.
    grouped(&handle, 1).await?;
    let transient = drain(&handle, &channel, window, batch).await?;
    let transient_base = baseline(&channel, window, 1).await?;

    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    let _ = channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bench done".into()).await;

    let grouped_n = GROUPED / APPENDERS * APPENDERS;
    println!(
        "| spool, {BODY}-byte messages, appends WAIT for {replicas} replicas | count | rate |"
    );
    println!("|---|---:|---:|");
    println!("| append, one appender, one at a time | {SINGLE} | {single_rate:.0}/s |");
    println!(
        "| append, group-committed, {APPENDERS} concurrent appenders | {grouped_n} | {grouped_rate:.0}/s |"
    );
    println!(
        "| drain to RabbitMQ with confirms, persistent messages, durable queue (window {window}) | {} | {:.0}/s |",
        persistent.0, persistent.1
    );
    println!(
        "| baseline: lapin straight to RabbitMQ, same messages and window, no spool | {GROUPED} | {persistent_base:.0}/s |"
    );
    println!(
        "| drain to RabbitMQ with confirms, transient messages (window {window}) | {} | {:.0}/s |",
        transient.0, transient.1
    );
    println!(
        "| baseline: lapin straight to RabbitMQ, same messages and window, no spool | {GROUPED} | {transient_base:.0}/s |"
    );
    drop(topo);
    Ok(())
}
