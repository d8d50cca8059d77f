//! Spool benchmark: append rate through a real Sentinel topology (one
//! appender at a time, and group-committed with many concurrent appenders),
//! and drain rate into the real broker on 127.0.0.1:5672 with publisher
//! confirms, 256-byte messages, in one run. Prints a markdown table.
//!
//! `cargo run --release -p warren-bench --bin spool`

use std::future::Future;
use std::sync::Arc;
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
use warren_it::sentinel::Topology;
use warren_it::wait;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
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

fn message() -> OutboundMessage {
    OutboundMessage::new("", QUEUE, Bytes::from(vec![b'x'; BODY]))
}

async fn single(handle: &SpoolHandle) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..SINGLE {
        handle.append(message()).await?;
    }
    Ok(SINGLE as f64 / start.elapsed().as_secs_f64())
}

async fn grouped(handle: &SpoolHandle) -> Result<f64> {
    let start = Instant::now();
    let per = GROUPED / APPENDERS;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..APPENDERS {
        let h = handle.clone();
        tasks.spawn(async move {
            for _ in 0..per {
                h.append(message()).await?;
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
async fn baseline(channel: &lapin::Channel, window: usize) -> Result<f64> {
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
            .publish(message())
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

    let single_rate = single(&handle).await?;
    let grouped_rate = grouped(&handle).await?;
    let depth = handle.status().await.appended;

    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
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
    let baseline_rate = baseline(&channel, env_or("DRAIN_WINDOW", 1024)).await?;
    let drained_before = handle.status().await.drained;
    let start = Instant::now();
    let drain_cfg = DrainerConfig {
        window: env_or("DRAIN_WINDOW", 1024),
        batch: env_or("DRAIN_BATCH", 1024),
        ..DrainerConfig::default()
    };
    let window = drain_cfg.window;
    let (drainer, _control) = Drainer::new(
        drain_cfg,
        &handle,
        LapinPublisher {
            channel: channel.clone(),
        },
    )?;
    tasks.spawn(drainer.run(cancel.child_token()));
    let h = Arc::new(handle.clone());
    wait::until_true("spool drained", Duration::from_secs(300), || {
        let h = h.clone();
        async move { h.is_empty() && h.status().await.drained >= depth }
    })
    .await?;
    let drain_secs = start.elapsed().as_secs_f64();
    let drained = handle.status().await.drained - drained_before;
    if drained < depth {
        bail!("drained {drained} of {depth}");
    }
    let drain_rate = drained as f64 / drain_secs;

    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    let _ = channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bench done".into()).await;

    println!("| spool ({BODY}-byte messages, WAIT for {replicas} replicas) | count | rate |");
    println!("|---|---:|---:|");
    println!("| append, one appender, one at a time | {SINGLE} | {single_rate:.0}/s |");
    println!(
        "| append, group-committed, {APPENDERS} concurrent appenders | {} | {grouped_rate:.0}/s |",
        GROUPED / APPENDERS * APPENDERS
    );
    println!(
        "| drain to RabbitMQ 127.0.0.1:5672 with confirms (window {window}) | {drained} | {drain_rate:.0}/s |"
    );
    println!(
        "| baseline: lapin publishing straight to RabbitMQ with confirms (window {window}), no spool | {GROUPED} | {baseline_rate:.0}/s |"
    );
    drop(topo);
    Ok(())
}
