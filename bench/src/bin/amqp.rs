//! AMQP benchmark: recovery time after broker restarts, and drain
//! throughput of Warren's consumer next to plain lapin, in one run against
//! a private RabbitMQ node. Prints markdown tables.
//!
//! `cargo run --release -p warren-bench --bin amqp [restarts] [messages]`
//! (defaults 20 and 200000).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use warren::amqp::{
    Amqp, AmqpConfig, AmqpHandle, BackoffConfig, QueueSpec, SubscriptionConfig, Topology,
};
use warren_it::rabbit::RabbitNode;

const BODY: usize = 256;
const PREFETCH: u16 = 1000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let restarts: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let messages: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200_000);
    // Optional: which drain variants to run, e.g. "23" (default all).
    let only: String = args.next().unwrap_or_else(|| "0123".to_owned());
    eprintln!("booting a private RabbitMQ node…");
    let mut node = RabbitNode::start().await?;
    let recovery = recovery(&mut node, restarts).await?;
    let throughput = throughput(&node, messages, &only).await?;

    println!("## Recovery after `kill -9` + restart of the broker ({restarts} restarts)\n");
    println!(
        "Time from \"broker accepts TCP connections\" to \"first delivery received again\" (includes a plain lapin publisher reconnecting and publishing every 10 ms).\n"
    );
    println!("| Warren backoff | median | max | min |");
    println!("|---|---|---|---|");
    for (label, mut v) in recovery {
        v.sort();
        let median = v.get(v.len() / 2).copied().unwrap_or_default();
        let max = v.last().copied().unwrap_or_default();
        let min = v.first().copied().unwrap_or_default();
        println!("| {label} | {} | {} | {} |", ms(median), ms(max), ms(min));
    }
    println!(
        "\n## Drain throughput: {messages} pre-filled {BODY}-byte messages, prefetch {PREFETCH}\n"
    );
    println!("| consumer | seconds | msg/s | left in queue after stop |");
    println!("|---|---|---|---|");
    for (label, secs, left) in throughput {
        println!(
            "| {label} | {secs:.2} | {:.0} | {left} |",
            messages as f64 / secs
        );
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn warren_config(url: &str, topology: Topology, max_backoff: Duration) -> AmqpConfig {
    let mut c = AmqpConfig::new(url, "bench");
    c.heartbeat = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(5);
    c.backoff = BackoffConfig {
        initial: Duration::from_millis(100),
        max: max_backoff,
    };
    c.topology = topology;
    c
}

struct Instance {
    label: String,
    handle: AmqpHandle,
    queue: String,
    /// First delivery instant per generation.
    firsts: Arc<Mutex<BTreeMap<u64, Instant>>>,
}

async fn recovery(node: &mut RabbitNode, restarts: usize) -> Result<Vec<(String, Vec<Duration>)>> {
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut instances = Vec::new();
    for (label, max) in [
        ("cap 1 s", Duration::from_secs(1)),
        ("cap 2 s (default)", Duration::from_secs(2)),
    ] {
        let queue = format!("bench.recovery.{}", instances.len());
        let topo = Topology::default().queue(QueueSpec::durable(&queue));
        let (amqp, handle) = Amqp::new(warren_config(&node.amqp_url(), topo, max))?;
        tasks.spawn(amqp.run(cancel.clone()));
        let mut sub = handle.add_subscription(SubscriptionConfig::new(&queue))?;
        let firsts = Arc::new(Mutex::new(BTreeMap::new()));
        let f = firsts.clone();
        tasks.spawn(async move {
            while let Some(d) = sub.next().await {
                let now = Instant::now();
                if let Ok(mut f) = f.lock() {
                    f.entry(d.generation).or_insert(now);
                }
                d.acker.ack();
            }
        });
        instances.push(Instance {
            label: label.to_owned(),
            handle,
            queue,
            firsts,
        });
    }
    let publisher_stop = CancellationToken::new();
    let url = node.amqp_url();
    let queues: Vec<String> = instances.iter().map(|i| i.queue.clone()).collect();
    tasks.spawn(publish_forever(url, queues, publisher_stop.clone()));

    let mut results: Vec<Vec<Duration>> = vec![Vec::new(); instances.len()];
    for round in 0..=restarts {
        // Wait until every instance received a delivery in its current
        // generation.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut gens = Vec::new();
        for inst in &instances {
            loop {
                let g = inst.handle.status_now().generation;
                let got = inst.firsts.lock().ok().and_then(|f| f.get(&g).copied());
                if g > 0 && inst.handle.status_now().is_running() && got.is_some() {
                    gens.push((g, got));
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{} did not receive a delivery in round {round}", inst.label);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if round == restarts {
            break;
        }
        eprintln!("restart {}/{restarts}", round + 1);
        node.kill9().await?;
        node.spawn_again()?;
        let accepted = wait_accepting(node.addr(), Duration::from_secs(60)).await?;
        for (i, inst) in instances.iter().enumerate() {
            let prev = gens[i].0;
            let deadline = Instant::now() + Duration::from_secs(60);
            let first = loop {
                let found = inst
                    .firsts
                    .lock()
                    .ok()
                    .and_then(|f| f.range(prev + 1..).next().map(|(_, t)| *t));
                if let Some(t) = found {
                    break t;
                }
                if Instant::now() > deadline {
                    bail!("{} did not recover after restart {round}", inst.label);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            results[i].push(first.saturating_duration_since(accepted));
        }
        // Let the node finish booting before the next kill.
        node.wait_booted().await?;
    }
    publisher_stop.cancel();
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(instances
        .into_iter()
        .map(|i| i.label)
        .zip(results)
        .collect())
}

async fn wait_accepting(addr: std::net::SocketAddr, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("broker did not come back");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Publish one persistent message to each queue every 10 ms, reconnecting
/// as fast as possible.
async fn publish_forever(url: String, queues: Vec<String>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        loop {
            if stop.is_cancelled() {
                let _ = conn.close(200, "done".into()).await;
                return;
            }
            let mut ok = true;
            for q in &queues {
                let props = BasicProperties::default().with_delivery_mode(2);
                if ch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        b"tick",
                        props,
                    )
                    .await
                    .is_err()
                {
                    ok = false;
                }
            }
            if !ok || !conn.status().connected() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn prefill(url: &str, queue: &str, n: u64) -> Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; BODY];
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(5_000);
        for _ in 0..batch {
            let _confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await?;
        }
        ch.wait_for_confirms().await?;
        sent += batch;
    }
    let _ = conn.close(200, "filled".into()).await;
    Ok(())
}

async fn ready_count(url: &str, queue: &str) -> Result<u32> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let (n, _) = warren_it::broker::inspect(&conn, queue).await?;
    let _ = conn.close(200, "checked".into()).await;
    Ok(n)
}

async fn throughput(node: &RabbitNode, n: u64, only: &str) -> Result<Vec<(String, f64, u32)>> {
    let url = node.amqp_url();
    let mut out = Vec::new();
    for (i, variant) in [
        "lapin, per-message ack",
        "lapin, batched ack (multiple=true every 100)",
        "Warren, per-message acks",
        "Warren, coalesced acks",
    ]
    .into_iter()
    .enumerate()
    {
        if !only.contains(&i.to_string()) {
            continue;
        }
        let queue = format!("bench.drain.{i}");
        eprintln!("pre-filling {queue} with {n} messages…");
        prefill(&url, &queue, n).await?;
        eprintln!("draining with {variant}…");
        let secs = match i {
            0 => drain_lapin(&url, &queue, n, 1).await?,
            1 => drain_lapin(&url, &queue, n, 100).await?,
            2 => drain_warren(&url, &queue, n, false).await?,
            _ => drain_warren(&url, &queue, n, true).await?,
        };
        let left = ready_count(&url, &queue).await?;
        out.push((variant.to_owned(), secs, left));
    }
    Ok(out)
}

async fn drain_lapin(url: &str, queue: &str, n: u64, every: u64) -> Result<f64> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let secs = warren_bench::drain_lapin(&conn, queue, n, every, PREFETCH).await?;
    let _ = conn.close(200, "drained".into()).await;
    Ok(secs)
}

async fn drain_warren(url: &str, queue: &str, n: u64, coalesce: bool) -> Result<f64> {
    let topo = Topology::default().queue(QueueSpec {
        name: queue.to_owned(),
        ..QueueSpec::default()
    });
    let (amqp, handle) = Amqp::new(warren_config(url, topo, Duration::from_secs(1)))?;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(amqp.run(cancel.clone()));
    let mut sub = handle.add_subscription(
        SubscriptionConfig::new(queue)
            .prefetch(PREFETCH)
            .coalesce_acks(coalesce),
    )?;
    let mut got = 0u64;
    let mut t0 = None;
    while got < n {
        let d = sub.next().await.context("subscription ended")?;
        t0.get_or_insert_with(Instant::now);
        got += 1;
        d.acker.ack();
    }
    let secs = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or_default();
    // Removal flushes held acks before the channel closes.
    handle.remove_subscription(queue).await?;
    cancel.cancel();
    let _ = task.await;
    Ok(secs)
}
