//! AMQP benchmark: recovery time after broker faults with Warren's shipped
//! defaults, and drain throughput of Warren's consumer next to plain lapin,
//! in one run against private RabbitMQ nodes of one version. Prints
//! markdown tables.
//!
//! `cargo run --release -p warren-bench --bin amqp [rounds] [messages]`
//! (defaults 10 and 200000); `WARREN_BENCH_RABBITMQ=4.0` for RabbitMQ 4.0
//! (default 3.10); `WARREN_BENCH_STOP_SECS` for the stop fault (default 30).
//!
//! Faults, `rounds` each: `kill -9` and an immediate restart; a clean stop,
//! 30 s down, and a start; the connected node of a three-node cluster
//! killed with `kill -9` (Warren given every node, consuming a quorum
//! queue replicated on all three). Recovery is the time
//! from the broker accepting TCP connections again (for the cluster: from
//! the kill) to Warren's first delivery in its new session, with a plain
//! lapin publisher sending to a durable classic queue every 10 ms. (A
//! quorum queue on a single 3.10 node restarted after `kill -9` answered
//! `basic.consume` with INTERNAL_ERROR and then not at all for minutes;
//! Warren now gives up on such a consume after 15 s and reconnects.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use warren::amqp::{Amqp, AmqpConfig, AmqpHandle, QueueSpec, SubscriptionConfig, Topology};
use warren_it::rabbit::{Cluster, RabbitNode};

const BODY: usize = 256;
const PREFETCH: u16 = 1000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let messages: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200_000);
    // Optional: which drain variants to run, e.g. "23" (default all).
    let only: String = args.next().unwrap_or_else(|| "0123".to_owned());
    let version = warren_bench::bench_version()?;
    let stop_for = Duration::from_secs(
        std::env::var("WARREN_BENCH_STOP_SECS")
            .ok()
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(30),
    );
    eprintln!("booting a private RabbitMQ {} node…", version.label());
    let mut node = RabbitNode::start_version(version, "").await?;
    let mut rows = Vec::new();
    let kill = recover(
        &node.amqp_url(),
        &[node.amqp_url()],
        rounds,
        QueueKind::Classic,
        async |_| {
            node.kill9().await?;
            node.spawn_again()?;
            let accepted = wait_accepting(node.addr(), Duration::from_secs(60)).await?;
            Ok((accepted, Some(node.addr())))
        },
    )
    .await?;
    rows.push((format!("`kill -9` + restart ({rounds}×)"), kill));
    node.wait_booted().await?;
    let stop = recover(
        &node.amqp_url(),
        &[node.amqp_url()],
        rounds,
        QueueKind::Classic,
        async |_| {
            node.stop().await?;
            tokio::time::sleep(stop_for).await;
            node.spawn_again()?;
            let accepted = wait_accepting(node.addr(), Duration::from_secs(60)).await?;
            Ok((accepted, Some(node.addr())))
        },
    )
    .await?;
    rows.push((
        format!("stopped {} s, started ({rounds}×)", stop_for.as_secs()),
        stop,
    ));
    node.wait_booted().await?;
    let throughput = throughput(&node, messages, &only).await?;
    drop(node);
    eprintln!("booting a three-node RabbitMQ {} cluster…", version.label());
    let mut cluster = Cluster::start(version, 3).await?;
    let urls = cluster.amqp_urls();
    let cluster_kill = recover(
        &urls[0],
        &urls,
        rounds,
        QueueKind::Quorum,
        async |endpoint: String| {
            let port = cluster
                .nodes
                .iter()
                .map(RabbitNode::port)
                .find(|p| endpoint.contains(&format!(":{p}/")))
                .context("the endpoint in use is a cluster node")?;
            // A quorum queue needs two of its three nodes: the last victim
            // must be back first.
            for n in &cluster.nodes {
                n.wait_booted().await?;
            }
            let victim = cluster.node_on(port).context("node")?;
            let killed = Instant::now();
            victim.kill9().await?;
            // Back before the next round, which may pick any node.
            victim.spawn_again()?;
            Ok((killed, None))
        },
    )
    .await?;
    rows.push((
        format!("connected cluster node `kill -9` ({rounds}×)"),
        cluster_kill,
    ));
    drop(cluster);

    println!(
        "## Recovery on RabbitMQ {} with Warren's shipped defaults\n",
        version.label()
    );
    println!(
        "From \"broker accepts TCP connections\" (cluster: from the kill) to \"first delivery handled again\", a durable queue (cluster: a quorum queue) fed every 10 ms by a plain lapin publisher.\n"
    );
    println!("| fault | median | max | min |");
    println!("|---|---|---|---|");
    for (label, mut v) in rows {
        v.sort();
        let median = v.get(v.len() / 2).copied().unwrap_or_default();
        let max = v.last().copied().unwrap_or_default();
        let min = v.first().copied().unwrap_or_default();
        println!("| {label} | {} | {} | {} |", ms(median), ms(max), ms(min));
    }
    println!(
        "\n## Drain throughput on RabbitMQ {}: {messages} pre-filled {BODY}-byte messages, prefetch {PREFETCH}\n",
        version.label()
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

/// What `warren run` uses with an empty config file, on `urls`.
fn shipped(urls: &[String], topology: Topology) -> Result<AmqpConfig> {
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = warren::config::Config::parse(&format!("[amqp]\nurls = [{list}]\n"), Vec::new())
        .map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let mut c = config.amqp.supervisor("bench");
    c.topology = topology;
    Ok(c)
}

/// The queue a recovery round consumes.
#[derive(Clone, Copy)]
enum QueueKind {
    /// One node (a quorum queue on one 3.10 node mishandles `kill -9`, see
    /// the module doc).
    Classic,
    /// Replicated on every cluster node: it survives the one that dies.
    Quorum,
}

/// Run Warren (shipped defaults) on `urls`, consuming a durable queue that a
/// publisher on `publish_url`'s cluster feeds, and apply `fault` `rounds`
/// times; `fault` gets the endpoint in use and returns the instant recovery
/// is measured from (and the address to wait on, if any). Returns each
/// round's recovery time.
async fn recover(
    publish_url: &str,
    urls: &[String],
    rounds: usize,
    queue_kind: QueueKind,
    mut fault: impl AsyncFnMut(String) -> Result<(Instant, Option<std::net::SocketAddr>)>,
) -> Result<Vec<Duration>> {
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let queue = format!("bench.recovery.{}", uuid::Uuid::new_v4().simple());
    let spec = match queue_kind {
        QueueKind::Classic => QueueSpec::durable(&queue),
        QueueKind::Quorum => QueueSpec::quorum(&queue),
    };
    let topo = Topology::default().queue(spec);
    let (amqp, handle) = Amqp::new(shipped(urls, topo)?)?;
    tasks.spawn(amqp.run(cancel.clone()));
    let mut sub = handle.add_subscription(SubscriptionConfig::new(&queue))?;
    let firsts: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::new(Mutex::new(BTreeMap::new()));
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
    let publisher_stop = CancellationToken::new();
    let mut publish_urls = vec![publish_url.to_owned()];
    publish_urls.extend(urls.iter().filter(|u| *u != publish_url).cloned());
    tasks.spawn(publish_forever(
        publish_urls,
        vec![queue.clone()],
        publisher_stop.clone(),
    ));
    let mut results = Vec::new();
    for round in 0..=rounds {
        let generation = running_with_delivery(&handle, &firsts, round).await?;
        if round == rounds {
            break;
        }
        eprintln!("fault {}/{rounds}", round + 1);
        let endpoint = handle.status_now().endpoint.unwrap_or_default();
        let (from, _) = fault(endpoint).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let first = loop {
            let found = firsts
                .lock()
                .ok()
                .and_then(|f| f.range(generation + 1..).next().map(|(_, t)| *t));
            if let Some(t) = found {
                break t;
            }
            if Instant::now() > deadline {
                bail!(
                    "no recovery after fault {round}: {:?} {:?}",
                    handle.status_now(),
                    handle.consumer(&queue)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        results.push(first.saturating_duration_since(from));
    }
    publisher_stop.cancel();
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(results)
}

/// Wait until Warren runs and has a delivery in its current generation;
/// returns that generation.
async fn running_with_delivery(
    handle: &AmqpHandle,
    firsts: &Mutex<BTreeMap<u64, Instant>>,
    round: usize,
) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = handle.status_now();
        let got = firsts
            .lock()
            .ok()
            .and_then(|f| f.get(&s.generation).copied());
        if s.generation > 0 && s.is_running() && got.is_some() {
            return Ok(s.generation);
        }
        if Instant::now() > deadline {
            bail!("no delivery in round {round}: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
/// as fast as possible, to the first of `urls` that takes the connection.
async fn publish_forever(urls: Vec<String>, queues: Vec<String>, stop: CancellationToken) {
    let mut next = 0;
    while !stop.is_cancelled() {
        let url = &urls[next % urls.len()];
        next += 1;
        let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await else {
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
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
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
    let topo = Topology::default().queue(QueueSpec::durable(queue));
    let (amqp, handle) = Amqp::new(shipped(&[url.to_owned()], topo)?)?;
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
