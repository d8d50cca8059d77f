//! A three-node RabbitMQ cluster: Warren is given every node
//! (`amqp.urls`), the node it is connected to is killed with `kill -9`
//! under load, and Warren moves to another node and goes on; after the
//! node returns nothing is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
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
async fn until_led(url: &str, queue: &str) {
    let mut k = 0;
    wait::until_true(
        "a leader for the output queue",
        Duration::from_secs(60),
        || {
            k += 1;
            let body = format!("probe-{k}");
            async move {
                match Broker::connect(url).await {
                    Ok(b) => b.publish_all("", queue, [body]).await.is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await
    .unwrap();
}

/// The cluster gauntlet on 3.10: three nodes, `amqp.urls`, `echo` (5,000
/// numbered messages to a quorum output queue led by the node Warren is
/// on) and `router`. Killed with `kill -9`: the connected node while it
/// leads the output queue, then the next connected node while the spool
/// drains; both come back. Nothing is lost, the drain never stalls;
/// prints kill → leader, kill → first new output, the spool's peak and
/// the duplicates.
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
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stalled = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
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
    broker
        .publish_all("", &input, &bodies[..2000])
        .await
        .unwrap();
    broker.publish_all("", "orders.in", &orders).await.unwrap();
    wait::until_true("outputs flowing", Duration::from_secs(60), || {
        let (b, q) = (&broker, &output);
        async move { b.message_count(q).await.unwrap_or(0) >= 500 }
    })
    .await
    .unwrap();

    // Kill 1: the connected node, leader of the output queue.
    let before = broker.message_count(&output).await.unwrap();
    let killed = std::time::Instant::now();
    cluster.node_on(victim).unwrap().kill9().await.unwrap();
    broker
        .publish_all("", &input, &bodies[2000..3500])
        .await
        .unwrap();
    until_led(&url, &output).await;
    let led = killed.elapsed();
    wait::until_true("new outputs", Duration::from_secs(60), || {
        let (b, q) = (&broker, &output);
        async move { b.message_count(q).await.unwrap_or(0) > before + 1 }
    })
    .await
    .unwrap();
    let first_output = killed.elapsed();
    println!(
        "cluster 3.10 kill 1 (connected node, output queue leader): kill → leader {led:.2?}, kill → first new output {first_output:.2?}"
    );
    cluster.node_on(victim).unwrap().restart().await.unwrap();

    // Kill 2: the node Warren is on now, while the spool drains.
    let second = connected_port(&handle, &cluster);
    for b in &bodies[3500..] {
        handle
            .spool
            .append(warren::message::OutboundMessage::new(
                "",
                output.as_str(),
                b.clone(),
            ))
            .await
            .unwrap();
    }
    let url = url_off(&cluster, second);
    let broker = Broker::connect(&url).await.unwrap();
    let killed = std::time::Instant::now();
    cluster.node_on(second).unwrap().kill9().await.unwrap();
    until_led(&url, &output).await;
    let led = killed.elapsed();
    println!("cluster 3.10 kill 2 (connected node, spool draining): kill → leader {led:.2?}");
    cluster.node_on(second).unwrap().restart().await.unwrap();

    let want: BTreeSet<Vec<u8>> = bodies.iter().map(|b| b.clone().into_bytes()).collect();
    let (got, missing) = broker
        .collect_until_complete(&output, &want, Duration::from_secs(180))
        .await
        .unwrap();
    assert!(missing.is_empty(), "{} outputs lost", missing.len());
    let outputs: Vec<&Vec<u8>> = got
        .iter()
        .map(|g| &g.body)
        .filter(|b| !b.starts_with(b"probe-"))
        .collect();
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
    println!(
        "cluster 3.10: {n} inputs, {} outputs ({} duplicates); 300 orders, {} routed ({} duplicates); spool peak {}",
        outputs.len(),
        outputs.len() - n,
        routed_got.len(),
        routed_got.len() - 300,
        peak.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(stalled.is_empty(), "the drain stalled: {stalled:?}");
    app.shutdown().await;
}
