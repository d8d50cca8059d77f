//! The chaos gauntlet: Warren runs `echo` and `router` against a private
//! RabbitMQ node behind the fault proxy and a Redis Sentinel topology,
//! while a publisher sends N uniquely numbered messages with confirms and
//! the test injects, on a schedule: forced connection closes, a blackhole
//! of several heartbeats, `kill -9` of the broker and a restart, `kill -9`
//! of the Redis primary and a manual `SENTINEL FAILOVER` while outputs are
//! spooled, and a hot reload of the plugin serving the first queue (the
//! `stamp` fixture, 1.0.0 → 2.0.0, which echoes like `echo` and stamps its
//! version on each output). At the end every input must be acked and every
//! output received at least once.
//!
//! N defaults to 20,000; `WARREN_GAUNTLET_N=100000` makes it a soak.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use warren::app::{App, AppHandle};
use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::gauntlet::{self, Hold, new_primary_then_pass, until_published};
use warren_it::plugins::wasm;
use warren_it::proxy::{Mode, Proxy};
use warren_it::rabbit::{RabbitNode, Shared};
use warren_it::sentinel::Topology;

async fn until_ready(handle: &AppHandle, what: &str) {
    crate::host::until_ready(handle, what, Duration::from_secs(120))
        .await
        .unwrap();
}

/// Blackhole the proxy and publish `SPOOLED` messages to `sink` through
/// Warren's outbox until they are in the spool. (Plugin outputs alone may
/// not reach the spool: a consumer that has caught up has nothing in
/// flight when the blackhole starts.) Returns the bodies published.
async fn spool_some(proxy: &Proxy, handle: &AppHandle, sink: &str, round: u32) -> Vec<Vec<u8>> {
    const SPOOLED: usize = 100;
    let before = handle.spool.status().await.appended;
    proxy.set_mode(Mode::Blackhole);
    let bodies: Vec<Vec<u8>> = (0..SPOOLED)
        .map(|i| format!("spooled-{round}-{i}").into_bytes())
        .collect();
    let mut publishes = tokio::task::JoinSet::new();
    for body in &bodies {
        let outbox = handle.dispatcher.outbox().clone();
        let msg = warren::message::OutboundMessage::new("", sink, body.clone());
        publishes.spawn(async move { outbox.publish(&msg).await });
    }
    while let Some(r) = publishes.join_next().await {
        r.unwrap().expect("the spool takes what the broker cannot");
    }
    let after = handle.spool.status().await.appended;
    assert!(
        after >= before + SPOOLED as u64,
        "spooled {} of {SPOOLED}",
        after - before
    );
    bodies
}

each_version!(gauntlet_loses_nothing);
async fn gauntlet_loses_nothing(target: Shared) {
    let _turn = gauntlet::one_at_a_time().await.unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        .with_test_writer()
        .try_init();
    let n = gauntlet::messages("WARREN_GAUNTLET_N", 20_000);
    let started = Instant::now();
    let (rabbit, redis) = tokio::join!(
        RabbitNode::start_version(target.version, ""),
        Topology::start()
    );
    let (mut rabbit, redis) = (rabbit.unwrap(), redis.unwrap());
    let proxy = Proxy::start(rabbit.addr()).await.unwrap();

    let broker = Broker::connect(&rabbit.amqp_url()).await.unwrap();
    let (echo_in, echo_out, router_in, routed) = (
        unique("g-echo-in"),
        unique("g-echo-out"),
        unique("g-router-in"),
        unique("g-routed"),
    );
    let region = unique("r").replace('.', "-");
    broker.declare_queue(&echo_out).await.unwrap();
    // Its own exchange, so the router's catch-all queue takes no share of
    // the load.
    broker
        .declare_routed(&routed, "g.routed", &region)
        .await
        .unwrap();
    let sink = unique("g-sink");
    broker.declare_queue(&sink).await.unwrap();
    drop(broker);

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("stamp").unwrap(), dir.path().join("stamp.wasm")).unwrap();
    std::fs::copy(wasm("router").unwrap(), dir.path().join("router.wasm")).unwrap();
    let config = crate::host::parse(
        &WarrenToml::new()
            .amqp_url(&proxy.amqp_url())
            .set("amqp.heartbeat-secs", 1)
            .set("amqp.confirm-timeout-ms", 1000)
            .set("amqp.connect-timeout-ms", 1000)
            .set("amqp.backoff-max-ms", 500)
            .set("amqp.consumer-check-ms", 1000)
            .set("spool.sentinels", redis.sentinel_urls())
            .set("spool.master-name", redis.master_name.as_str())
            .stream_key(&unique("g-spool"))
            .plugins_dir(dir.path())
            .retry_exchange("g.retry")
            .dead_letters("g.dlx", "g.dlq")
            .grace_period_ms(15_000)
            .admin_bind("127.0.0.1:0")
            .merge(&format!(
                r#"
                [plugin.stamp]
                subscriptions = [{{ queue = "{echo_in}", prefetch = 200 }}]
                config = {{ routing-key = "{echo_out}" }}
                [plugin.router]
                subscriptions = [{{ queue = "{router_in}", prefetch = 200 }}]
                config = {{ exchange = "g.routed" }}
                "#
            )),
    );
    let app = App::start(config).await.unwrap();
    let handle = app.handle();
    until_ready(&handle, "warren ready").await;

    let published = Arc::new(AtomicU64::new(0));
    let step = n / 8;
    let (release, hold) = tokio::sync::watch::channel(false);
    // Even-numbered messages to `echo_in`, odd ones to `router_in`.
    let message = {
        let (echo_in, router_in, region) = (echo_in.clone(), router_in.clone(), region.clone());
        move |i: u64| {
            let queue = if i.is_multiple_of(2) {
                &echo_in
            } else {
                &router_in
            };
            let body = format!(r#"{{"id":{i},"region":"{region}"}}"#);
            let props = BasicProperties::default().with_delivery_mode(2);
            (queue.clone(), body.into_bytes(), props)
        }
    };
    let publisher = tokio::spawn(gauntlet::publish_resilient(
        rabbit.amqp_url(),
        n,
        message,
        published.clone(),
        Hold {
            at: 7 * step,
            release: hold,
        },
    ));
    let mut faults: Vec<&str> = Vec::new();

    // 1. The broker force-closes every connection (320).
    until_published(&published, step).await.unwrap();
    rabbit.close_all_connections("gauntlet").await.unwrap();
    faults.push("close_all_connections");
    until_ready(&handle, "ready after forced close").await;

    // 2. A partition: the proxy forwards nothing for several heartbeats.
    until_published(&published, 2 * step).await.unwrap();
    proxy.set_mode(Mode::Blackhole);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_mode(Mode::Pass);
    faults.push("blackhole 4 s");
    until_ready(&handle, "ready after blackhole").await;

    // 3. The broker dies (kill -9) and comes back.
    until_published(&published, 3 * step).await.unwrap();
    rabbit.kill9().await.unwrap();
    rabbit.spawn_again().unwrap();
    rabbit.wait_booted().await.unwrap();
    faults.push("kill -9 broker + restart");
    until_ready(&handle, "ready after broker restart").await;

    // 4. While outputs are being spooled, the Redis primary dies.
    until_published(&published, 4 * step).await.unwrap();
    let mut sunk = spool_some(&proxy, &handle, &sink, 1).await;
    let old = redis.primary_port().await.unwrap();
    redis.kill9(old).await.unwrap();
    new_primary_then_pass(&redis, old, &proxy).await.unwrap();
    redis.restart_node(old).await.unwrap();
    redis
        .wait_rejoined(old, Duration::from_secs(60))
        .await
        .unwrap();
    faults.push("kill -9 redis primary while spooling");
    until_ready(&handle, "ready after redis primary kill").await;

    // 5. While outputs are being spooled, a manual Sentinel failover.
    until_published(&published, 5 * step).await.unwrap();
    sunk.extend(spool_some(&proxy, &handle, &sink, 2).await);
    let old = redis.primary_port().await.unwrap();
    redis.failover().await.unwrap();
    new_primary_then_pass(&redis, old, &proxy).await.unwrap();
    faults.push("SENTINEL FAILOVER while spooling");
    until_ready(&handle, "ready after sentinel failover").await;

    // 6. Hot reload: a new version of the plugin serving the first queue.
    until_published(&published, 6 * step).await.unwrap();
    let v2 = std::fs::read(wasm("stamp-v2").unwrap()).unwrap();
    let tmp = dir.path().join("stamp.wasm.tmp");
    std::fs::write(&tmp, &v2).unwrap();
    std::fs::rename(&tmp, dir.path().join("stamp.wasm")).unwrap();
    let r = warren_it::http::request(app.admin_addr(), "POST", "/plugins/reload", &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("2.0.0"), "reload report: {}", r.text());
    faults.push("hot reload stamp 1.0.0 -> 2.0.0");
    release.send_replace(true);

    publisher.await.unwrap();
    let publish_done = started.elapsed();

    // Every output at least once.
    let want = |parity: u64| -> BTreeSet<Vec<u8>> {
        (0..n)
            .filter(|i| i % 2 == parity)
            .map(|i| format!(r#"{{"id":{i},"region":"{region}"}}"#).into_bytes())
            .collect()
    };
    let check = Broker::connect(&rabbit.amqp_url()).await.unwrap();
    let (echoed, echo_missing) = check
        .collect_until_complete(&echo_out, &want(0), Duration::from_secs(300))
        .await
        .unwrap();
    let (routed_got, routed_missing) = check
        .collect_until_complete(&routed, &want(1), Duration::from_secs(300))
        .await
        .unwrap();
    let (_, sink_missing) = check
        .collect_until_complete(&sink, &sunk.into_iter().collect(), Duration::from_secs(120))
        .await
        .unwrap();
    let lost = echo_missing.len() + routed_missing.len() + sink_missing.len();
    let on_v2 = echoed
        .iter()
        .filter(|g| g.header_str("x-stamp-version").as_deref() == Some("2.0.0"))
        .count();
    let duplicates =
        (echoed.len() + routed_got.len() + echo_missing.len() + routed_missing.len()) as u64 - n;
    let spool = handle.spool.status().await;
    let generation = handle.amqp.status_now().generation;

    app.shutdown().await;
    let in_echo = check.message_count(&echo_in).await.unwrap();
    let in_router = check.message_count(&router_in).await.unwrap();
    let dead = check.message_count("g.dlq").await.unwrap_or(0);
    // Straight to stderr, not `println!`: the harness captures the print
    // macros of passing tests, and CI's log must show this line.
    let summary = format!(
        "gauntlet: messages={n} faults={} duplicates={duplicates} lost={lost} unacked={} dead_lettered={dead} spooled={} spool_refused={} redis_primaries={} left_in_spool={} drain_state={:?} drain={:?} amqp_sessions={generation} handled_by_reloaded={on_v2} took={:.0}s (publishing {:.0}s)\ngauntlet faults: {}\n",
        faults.len(),
        in_echo + in_router,
        spool.appended,
        spool.refused,
        spool.primary_generation,
        spool.depth,
        spool.drainer,
        spool.drain,
        started.elapsed().as_secs_f64(),
        publish_done.as_secs_f64(),
        faults.join(", "),
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), summary.as_bytes());
    assert_eq!(
        lost,
        0,
        "lost outputs, e.g. {:?}",
        echo_missing
            .iter()
            .chain(&routed_missing)
            .take(3)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
    );
    assert_eq!(in_echo + in_router, 0, "inputs left unacked");
    assert_eq!(dead, 0, "nothing should be dead-lettered");
    assert!(spool.appended > 0, "no output went through the spool");
    assert!(on_v2 > 0, "no output was handled by the reloaded version");
}
