//! A three-node RabbitMQ cluster: Warren is given every node
//! (`amqp.urls`), the node it is connected to is killed with `kill -9`
//! under load, and Warren moves to another node and goes on; after the
//! node returns nothing is lost.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use warren_it::broker::{Broker, unique};
use warren_it::rabbit::{Cluster, Version};
use warren_it::wait;

use crate::host::{plugins_dir, start_ready};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_connected_cluster_node_moves_warren_to_another_and_loses_nothing() {
    let mut cluster = Cluster::start(Version::V4_0, 3).await.unwrap();
    let urls = cluster.amqp_urls();
    let (input, output) = (unique("cluster-in"), unique("cluster-out"));
    let dir = plugins_dir(&[("echo", "echo")]).unwrap();
    let cfg = echo_on_cluster(&urls, dir.path(), &input, &output);
    let (app, handle) = start_ready(cfg).await.unwrap();
    let endpoint = |h: &warren::app::AppHandle| h.amqp.status_now().endpoint.unwrap_or_default();
    let first = endpoint(&handle);
    let victim_port = cluster
        .nodes
        .iter()
        .map(|n| n.port())
        .find(|p| first.contains(&format!(":{p}/")))
        .expect("the endpoint is one of the nodes");
    // The test's own client stays on a node that is not killed.
    let other = urls
        .iter()
        .find(|u| !u.contains(&format!(":{victim_port}/")))
        .unwrap();
    let broker = Broker::connect(other).await.unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(&b"quorum"[..])),
    );
    broker.declare_queue_with(&output, quorum).await.unwrap();

    let n = 3_000;
    let bodies: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let (head, tail) = bodies.split_at(n / 2);
    broker.publish_all("", &input, head).await.unwrap();
    let early = broker
        .collect(&output, 500, Duration::from_secs(60))
        .await
        .unwrap();
    let gen_before = handle.amqp.status_now().generation;
    cluster.node_on(victim_port).unwrap().kill9().await.unwrap();
    broker.publish_all("", &input, tail).await.unwrap();
    wait::until_true("Warren on another node", Duration::from_secs(30), || {
        let s = handle.amqp.status_now();
        let moved = s.generation > gen_before
            && s.is_running()
            && s.endpoint
                .is_some_and(|e| !e.contains(&format!(":{victim_port}/")));
        async move { moved }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", handle.amqp.status_now()));
    eprintln!("moved from {first} to {}", endpoint(&handle));

    let seen_early: BTreeSet<&[u8]> = early.iter().map(|g| g.body.as_slice()).collect();
    let want: BTreeSet<Vec<u8>> = bodies
        .iter()
        .map(|b| b.as_bytes())
        .filter(|b| !seen_early.contains(b))
        .map(<[u8]>::to_vec)
        .collect();
    let (rest, missing) = broker
        .collect_until_complete(&output, &want, Duration::from_secs(120))
        .await
        .unwrap();
    let got = early.len() + rest.len();
    let unique_bodies: BTreeSet<&[u8]> = early
        .iter()
        .chain(&rest)
        .map(|g| g.body.as_slice())
        .collect();
    assert!(missing.is_empty(), "{} outputs missing", missing.len());
    assert_eq!(unique_bodies.len(), n, "every input has its output");
    eprintln!(
        "cluster: inputs={n} outputs={got} unique={} duplicates={}",
        unique_bodies.len(),
        got - unique_bodies.len()
    );
    cluster
        .node_on(victim_port)
        .unwrap()
        .restart()
        .await
        .unwrap();
    wait::until_true("every input acked", Duration::from_secs(30), || {
        let b = &broker;
        let q = &input;
        async move { b.message_count(q).await.is_ok_and(|c| c == 0) }
    })
    .await
    .unwrap();
    app.shutdown().await;
}

/// Warren on every node of `urls` (the first as `amqp.url`), with `echo`
/// consuming `input` and republishing to `output`.
fn echo_on_cluster(
    urls: &[String],
    dir: &std::path::Path,
    input: &str,
    output: &str,
) -> warren::config::Config {
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    crate::outage::config(
        &urls[0],
        (&format!("urls = [{list}]\nheartbeat-secs = 2"), ""),
        dir,
        &format!(
            r#"
            [plugin.echo]
            subscriptions = [{{ queue = "{input}", prefetch = 100 }}]
            config = {{ routing-key = "{output}" }}
            "#
        ),
    )
}

/// The port of the node Warren's session is on.
fn connected_port(h: &warren::app::AppHandle, cluster: &Cluster) -> u16 {
    let e = h.amqp.status_now().endpoint.unwrap_or_default();
    cluster
        .nodes
        .iter()
        .map(|n| n.port())
        .find(|p| e.contains(&format!(":{p}/")))
        .expect("the endpoint is one of the nodes")
}

/// The URL of a node other than `port`.
fn url_off(cluster: &Cluster, port: u16) -> String {
    cluster
        .amqp_urls()
        .into_iter()
        .find(|u| !u.contains(&format!(":{port}/")))
        .unwrap()
}

/// Until a confirmed publish to `queue` through a new client on `url` is
/// acked: the queue has a leader again (a failed publish closes the
/// client's channel, so each probe has its own). Probes are `probe-*`.
/// Returns when the acked probe was started: the leader existed by then
/// at the latest, within one probe of its election.
async fn until_led(url: &str, queue: &str) -> Instant {
    let mut k = 0;
    wait::until(
        "a leader for the output queue",
        Duration::from_secs(60),
        || {
            k += 1;
            let body = format!("probe-{k}");
            async move {
                let started = Instant::now();
                match Broker::connect(url).await {
                    Ok(b) => b
                        .publish_all("", queue, [body])
                        .await
                        .is_ok()
                        .then_some(started),
                    Err(_) => None,
                }
            }
        },
    )
    .await
    .unwrap()
}

/// Every delivery the test's consumer of the output queue saw: the body,
/// when it was delivered, and whether the broker marked it redelivered.
type Arrivals = Arc<Mutex<Vec<(Vec<u8>, Instant, bool)>>>;

/// When each body was published by the test (or appended to the spool).
type Origins = Arc<Mutex<HashMap<Vec<u8>, Instant>>>;

/// A consumer of the output queue that runs alongside Warren, so each
/// output's arrival is timed when the broker delivers it (at most the
/// consumer's lag after it reached the queue).
struct LiveCollector {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u32>,
}

impl LiveCollector {
    /// Consumes `queue` through `url` into `arrivals`, each delivery
    /// recorded before it is acked; a lost connection or a cancelled
    /// consumer is subscribed again.
    fn start(url: String, queue: String, arrivals: Arrivals) -> LiveCollector {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut resubscribed = 0;
            loop {
                let mut stopped = stopped.clone();
                let ended = consume_into(&url, &queue, &arrivals, &mut stopped).await;
                if *stopped.borrow() {
                    return resubscribed;
                }
                resubscribed += 1;
                eprintln!("output collector subscribes again: {ended:?}");
                tokio::time::sleep(wait::POLL).await;
            }
        });
        LiveCollector { stop, task }
    }

    /// Stops consuming (unacked deliveries go back to the queue); returns
    /// how often the consumer had to subscribe again.
    async fn stop(self) -> u32 {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}

/// One subscription of [`LiveCollector`], until `stopped` or it fails.
async fn consume_into(
    url: &str,
    queue: &str,
    arrivals: &Arrivals,
    stopped: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "gauntlet-collector".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let ended = loop {
        tokio::select! {
            _ = stopped.changed() => break Ok(()),
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    let at = Instant::now();
                    arrivals
                        .lock()
                        .unwrap()
                        .push((d.data.clone(), at, d.redelivered));
                    d.ack(BasicAckOptions::default()).await?;
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("consumer cancelled")),
            },
        }
    };
    let _ = ch.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    ended
}

/// Publishes `bodies` to `queue` through `url` at 300 a second (batches of
/// 15 every 50 ms, confirmed), recording each body's first publish in
/// `origins`. A batch the broker does not confirm (its queue's leader is
/// being elected) is published again on a new connection; returns how
/// many messages were published again.
async fn publish_paced(url: String, queue: String, bodies: Vec<String>, origins: Origins) -> usize {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut broker = Broker::connect(&url).await.unwrap();
    let mut again = 0;
    for batch in bodies.chunks(15) {
        tick.tick().await;
        let now = Instant::now();
        origins
            .lock()
            .unwrap()
            .extend(batch.iter().map(|b| (b.clone().into_bytes(), now)));
        let deadline = now + Duration::from_secs(60);
        while let Err(e) = broker.publish_all("", &queue, batch).await {
            assert!(Instant::now() < deadline, "inputs not accepted: {e}");
            again += batch.len();
            tokio::time::sleep(wait::POLL).await;
            if let Ok(b) = Broker::connect(&url).await {
                broker = b;
            }
        }
    }
    again
}

/// Until every one of `bodies` was delivered to the collector.
async fn until_arrived(arrivals: &Arrivals, bodies: &[String], timeout: Duration) {
    let missing = || {
        let seen: BTreeSet<Vec<u8>> = arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|(b, ..)| b.clone())
            .collect();
        bodies
            .iter()
            .filter(|b| !seen.contains(b.as_bytes()))
            .count()
    };
    if let Err(e) = wait::until_true("every output", timeout, || {
        let done = missing() == 0;
        async move { done }
    })
    .await
    {
        panic!("{e}: {} outputs lost", missing());
    }
}

/// One kill's figures over the outputs of `bodies` first delivered after
/// `killed`.
struct KillFigures {
    /// Outputs first delivered after the kill.
    measured: usize,
    /// Kill → first delivery of an output whose input was published after
    /// the kill.
    first_new: Option<Duration>,
    /// Per output: delivery − max(election, its own publish).
    max: Duration,
    p99: Duration,
}

fn kill_figures(
    arrivals: &Arrivals,
    origins: &Origins,
    bodies: &[String],
    killed: Instant,
    elected: Instant,
) -> KillFigures {
    let mut first: HashMap<&[u8], Instant> = HashMap::new();
    let arrivals = arrivals.lock().unwrap();
    for (body, at, _) in arrivals.iter() {
        first
            .entry(body.as_slice())
            .and_modify(|t| *t = (*t).min(*at))
            .or_insert(*at);
    }
    let origins = origins.lock().unwrap();
    let mut late = Vec::new();
    let mut first_new = None::<Duration>;
    for b in bodies {
        let (Some(&at), Some(&origin)) = (first.get(b.as_bytes()), origins.get(b.as_bytes()))
        else {
            continue;
        };
        if at <= killed {
            continue;
        }
        late.push(at.saturating_duration_since(origin.max(elected)));
        if origin > killed {
            let d = at - killed;
            first_new = Some(first_new.map_or(d, |f| f.min(d)));
        }
    }
    late.sort();
    let p99 = late
        .get((late.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default();
    KillFigures {
        measured: late.len(),
        first_new,
        max: late.last().copied().unwrap_or_default(),
        p99,
    }
}

impl std::fmt::Display for KillFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kill → first new output {:.2?}; {} outputs after the kill: election → arrival max {:.2?}, p99 {:.2?}",
            self.first_new.unwrap_or_default(),
            self.measured,
            self.max,
            self.p99
        )
    }
}

/// The cluster gauntlet on 3.10: three nodes, `amqp.urls`, `echo` (5,000
/// numbered messages to a quorum output queue led by the node Warren is
/// on) and `router`. Killed with `kill -9`: the connected node while it
/// leads the output queue (inputs published at 300/s throughout), then
/// the next connected node while the spool drains (entries appended
/// before and during the outage, and inputs at 300/s); both come back.
///
/// Every output first delivered to the output queue after a kill is
/// measured: its delivery to a consumer that runs throughout, minus the
/// new leader's election or its own input's publish (spool append),
/// whichever is later; the election is taken as the start of the first
/// probe publish the output queue confirms. The max must be within 2 s.
/// Nothing is lost and the drain never stalls; prints kill → leader,
/// kill → first output of an input published (or entry spooled) after the
/// kill, the max and p99 above, the spool's peak and the duplicates (a
/// batch of inputs the test had to publish again can add some).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_gauntlet_on_3_10() {
    let mut cluster = Cluster::start(Version::V3_10, 3).await.unwrap();
    let urls = cluster.amqp_urls();
    let (input, output) = (unique("gauntlet-in"), unique("gauntlet-out"));
    let routed = unique("gauntlet-routed");
    let dir = plugins_dir(&[("echo", "echo"), ("router", "router")]).unwrap();
    let cfg = echo_on_cluster(&urls, dir.path(), &input, &output);
    let (app, handle) = start_ready(cfg).await.unwrap();
    let victim = connected_port(&handle, &cluster);
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(&b"quorum"[..])),
    );
    // Declared through the victim: a quorum queue's leader is the node
    // that declared it.
    let on_victim = Broker::connect(&cluster.node_on(victim).unwrap().amqp_url())
        .await
        .unwrap();
    on_victim
        .declare_queue_with(&output, quorum.clone())
        .await
        .unwrap();
    on_victim
        .declare_queue_with(&routed, quorum.clone())
        .await
        .unwrap();
    on_victim.bind(&routed, "orders.routed", "#").await.unwrap();
    drop(on_victim);
    let url = url_off(&cluster, victim);
    let broker = Broker::connect(&url).await.unwrap();

    // Watch the spool's depth and the readiness reasons all along.
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stalled = Arc::new(Mutex::new(Vec::<String>::new()));
    let watch = {
        let (h, peak, stalled) = (handle.clone(), peak.clone(), stalled.clone());
        tokio::spawn(async move {
            let mut spool = h.spool.subscribe();
            loop {
                let depth = spool.borrow_and_update().depth;
                peak.fetch_max(depth, std::sync::atomic::Ordering::Relaxed);
                for d in h.readiness().degraded {
                    if d.contains("stalled") {
                        stalled.lock().unwrap().push(d);
                    }
                }
                if spool.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    let n = 5_000;
    let bodies: Vec<String> = (0..n).map(|i| format!("g{i:05}")).collect();
    let orders: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"id":{i},"region":"eu"}}"#))
        .collect();
    let arrivals = Arrivals::default();
    let origins = Origins::default();
    let collector = LiveCollector::start(url.clone(), output.clone(), arrivals.clone());
    let publisher = tokio::spawn(publish_paced(
        url.clone(),
        input.clone(),
        bodies[..3500].to_vec(),
        origins.clone(),
    ));
    broker.publish_all("", "orders.in", &orders).await.unwrap();
    wait::until_true("outputs flowing", Duration::from_secs(60), || {
        let flowing = arrivals.lock().unwrap().len() >= 500;
        async move { flowing }
    })
    .await
    .unwrap();

    // Kill 1: the connected node, leader of the output queue.
    let killed = Instant::now();
    cluster.node_on(victim).unwrap().kill9().await.unwrap();
    let elected = until_led(&url, &output).await;
    let again_1 = publisher.await.unwrap();
    until_arrived(&arrivals, &bodies[..3500], Duration::from_secs(120)).await;
    let kill_1 = kill_figures(&arrivals, &origins, &bodies[..3500], killed, elected);
    println!(
        "cluster 3.10 kill 1 (connected node, output queue leader): kill → leader {:.2?}, {kill_1}",
        elected - killed
    );
    cluster.node_on(victim).unwrap().restart().await.unwrap();

    // Kill 2: the node Warren is on now, while the spool drains. The
    // collector moves to a node that is not killed first.
    let second = connected_port(&handle, &cluster);
    let url = url_off(&cluster, second);
    let moved = LiveCollector::start(url.clone(), output.clone(), arrivals.clone());
    let resubscribed = collector.stop().await;
    let append = |range: std::ops::Range<usize>| {
        let (h, o, origins) = (handle.clone(), output.clone(), origins.clone());
        let bodies = bodies[range].to_vec();
        async move {
            for b in bodies {
                origins
                    .lock()
                    .unwrap()
                    .insert(b.clone().into_bytes(), Instant::now());
                h.spool
                    .append(warren::message::OutboundMessage::new("", o.as_str(), b))
                    .await
                    .unwrap();
            }
        }
    };
    append(3500..4000).await;
    let publisher = tokio::spawn(publish_paced(
        url.clone(),
        input.clone(),
        bodies[4500..].to_vec(),
        origins.clone(),
    ));
    let depth_at_kill = handle.spool.subscribe().borrow().depth;
    let killed = Instant::now();
    cluster.node_on(second).unwrap().kill9().await.unwrap();
    append(4000..4500).await;
    let elected = until_led(&url, &output).await;
    let again_2 = publisher.await.unwrap();
    until_arrived(&arrivals, &bodies, Duration::from_secs(180)).await;
    let kill_2 = kill_figures(&arrivals, &origins, &bodies[3500..], killed, elected);
    println!(
        "cluster 3.10 kill 2 (connected node, spool draining, {depth_at_kill} spooled at the kill): kill → leader {:.2?}, {kill_2}",
        elected - killed
    );
    cluster.node_on(second).unwrap().restart().await.unwrap();
    let resubscribed = resubscribed + moved.stop().await;

    let broker = Broker::connect(&url).await.unwrap();
    let want_orders: BTreeSet<Vec<u8>> = orders.iter().map(|o| o.clone().into_bytes()).collect();
    let (routed_got, routed_missing) = broker
        .collect_until_complete(&routed, &want_orders, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        routed_missing.is_empty(),
        "{} orders lost",
        routed_missing.len()
    );
    watch.abort();
    let stalled = stalled.lock().unwrap().clone();
    // A duplicate is a second first-time delivery of one body: deliveries
    // the broker marks redelivered are the collector's own (a consumer
    // that stopped or lost its connection before acking).
    let mut delivered: HashMap<Vec<u8>, usize> = HashMap::new();
    for (b, _, redelivered) in arrivals.lock().unwrap().iter() {
        if !redelivered && !b.starts_with(b"probe-") {
            *delivered.entry(b.clone()).or_default() += 1;
        }
    }
    let outputs: usize = delivered.values().sum();
    println!(
        "cluster 3.10: {n} inputs ({} published again by the test), {outputs} outputs ({} duplicates); 300 orders, {} routed ({} duplicates); spool peak {}; collector subscribed again {resubscribed}×",
        again_1 + again_2,
        outputs - delivered.len(),
        routed_got.len(),
        routed_got.len() - 300,
        peak.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(stalled.is_empty(), "the drain stalled: {stalled:?}");
    for (kill, f) in [(1, &kill_1), (2, &kill_2)] {
        assert!(
            f.max <= Duration::from_secs(2),
            "kill {kill}: an output reached its queue {:.2?} after the election",
            f.max
        );
    }
    app.shutdown().await;
}
