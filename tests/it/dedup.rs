//! Effectively once on a deduplicated route: copies of a message run the
//! plugin once and count once; a store that cannot be reached pauses the
//! route, or, when the operator chose so, lets it run at least once and
//! says so in `/ready`. (Warren killed at each step of the journal is in
//! `host/tests/dedup.rs`; the deduplicated chaos gauntlet in
//! `host/tests/dedup_gauntlet.rs`.)

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::BasicProperties;
use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::private_redis::PrivateRedis;
use warren_it::tally::Load;
use warren_it::wait;

use crate::admin::{metric, scrape};
use crate::host::{parse, plugins_dir_of, start_ready};

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

fn config(dir: &std::path::Path, input: &str, out: &str, dedup: &str) -> WarrenToml {
    WarrenToml::isolated(dir)
        .subscribe("tally", input)
        .set("plugin.tally.config.routing-key", out)
        .merge(&format!("[plugin.tally]\ndedup = {dedup}\n"))
        .quick_retries(3)
        .admin_bind("127.0.0.1:0")
}

/// Publish each of `bodies` `copies` times in a row, all copies of one
/// body with the message id `<prefix>-<i>`, pipelined with confirms.
async fn publish_copies(
    broker: &Broker,
    queue: &str,
    prefix: &str,
    bodies: &[String],
    copies: usize,
) {
    let messages = bodies.iter().enumerate().flat_map(|(i, body)| {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{prefix}-{i}").into());
        std::iter::repeat_n((queue, body.as_bytes(), props), copies)
    });
    broker.publish_each("", messages).await.unwrap();
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(SHARED_REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The records of `queue` in Redis, and the mean bytes one takes.
async fn records(queue: &str) -> (Vec<String>, f64) {
    let mut c = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("warren:dedup:{queue}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut bytes = 0i64;
    let sample = &keys[..keys.len().min(200)];
    for k in sample {
        let b: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(k)
            .query_async(&mut c)
            .await
            .unwrap();
        bytes += b.unwrap_or(0);
    }
    let mean = if sample.is_empty() {
        0.0
    } else {
        bytes as f64 / sample.len() as f64
    };
    (keys, mean)
}

async fn drop_records(queue: &str) {
    let (keys, _) = records(queue).await;
    let mut c = redis().await;
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_published_twice_runs_the_plugin_once_and_counts_once() {
    let n = 10_000;
    let broker = Broker::shared().await.unwrap();
    let (input, out) = (unique("dedup-in"), unique("dedup-out"));
    broker.declare_queue(&out).await.unwrap();
    let dir = plugins_dir_of(&[("tally", wasm("tally").unwrap())]).unwrap();
    let cfg = config(
        dir.path(),
        &input,
        &out,
        r#"{ key = "message-id", window = "1h" }"#,
    );
    let (app, _handle) = start_ready(parse(&cfg)).await.unwrap();
    let admin = app.admin_addr();
    let load = Load::new(n, Some(10));
    publish_copies(&broker, &input, &input, &load.plain_bodies(), 2).await;

    let got = broker
        .collect(&out, n, Duration::from_secs(300))
        .await
        .unwrap();
    let skipped = wait::until(
        "every second copy skipped",
        Duration::from_secs(60),
        || async {
            let m = scrape(admin).await;
            let s = metric(&m, "warren_dedup_skipped_total", &[("queue", &input)]);
            (s as usize >= n).then_some(m)
        },
    )
    .await;
    let counts = load.counts(SHARED_REDIS).await.unwrap();
    let (keys, bytes_per_record) = records(&input).await;
    // Nothing more comes: each copy was acked once, by either path.
    let more = broker
        .collect(&out, 1, Duration::from_secs(2))
        .await
        .unwrap();
    app.shutdown().await;
    let _ = broker.delete_queue(&input).await;
    let _ = broker.delete_queue(&out).await;
    let _ = broker.delete_queue("tally.out").await;
    load.cleanup(SHARED_REDIS).await;
    drop_records(&input).await;

    let m = skipped.unwrap();
    let invoked = metric(&m, "warren_handle_seconds_count", &[("queue", &input)]);
    let skipped = metric(&m, "warren_dedup_skipped_total", &[("queue", &input)]);
    println!(
        "{n} messages x 2 copies: plugin invoked {invoked}, skipped {skipped}, outputs {}, records {} of {bytes_per_record:.0} bytes each (MEMORY USAGE)",
        got.len(),
        keys.len()
    );
    assert_eq!(invoked as usize, n, "the plugin runs once per message");
    assert_eq!(
        skipped as usize, n,
        "the other copy of each is acked unprocessed"
    );
    assert_eq!(got.len(), n, "one output per message");
    assert!(
        more.is_empty(),
        "no output beyond one per message: {}",
        more.len()
    );
    assert_eq!(
        counts.values().sum::<i64>(),
        n as i64,
        "one increment per message"
    );
    assert_eq!(keys.len(), n, "one record per message");
    let ids: BTreeSet<String> = got
        .iter()
        .map(|g| g.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), n, "each output has an id of its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduplicated_route_holds_deliveries_while_its_store_is_down() {
    let broker = Broker::shared().await.unwrap();
    let (input, out) = (unique("dedup-pause-in"), unique("dedup-pause-out"));
    broker.declare_queue(&out).await.unwrap();
    // The store (state and records) on a Redis of its own; the spool on
    // the shared one.
    let mut store = PrivateRedis::start().await.unwrap();
    let dir = plugins_dir_of(&[("tally", wasm("tally").unwrap())]).unwrap();
    let cfg = config(dir.path(), &input, &out, r#"{ key = "message-id" }"#)
        .set("kv.url", store.url())
        .set("kv.read-timeout-ms", 200);
    let (app, handle) = start_ready(parse(&cfg)).await.unwrap();
    let load = Load::new(20, None);
    store.kill();
    publish_copies(&broker, &input, &input, &load.plain_bodies(), 1).await;
    // Taken by Warren and held: none ready in the queue, none acked.
    let held = wait::until_true(
        "deliveries taken and held",
        Duration::from_secs(30),
        || async { broker.message_count(&input).await.unwrap_or(u32::MAX) == 0 },
    )
    .await;
    let early = broker
        .collect(&out, 1, Duration::from_secs(2))
        .await
        .unwrap();
    let ready = handle.readiness();
    store.restart().await.unwrap();
    let got = broker
        .collect(&out, 20, Duration::from_secs(60))
        .await
        .unwrap();
    // A delivery's writes commit after its outputs are confirmed: the last
    // ones may still be on their way.
    let url = store.url();
    let counts = wait::until("every count committed", Duration::from_secs(30), || async {
        let c = load.counts(&url).await.ok()?;
        (c.values().sum::<i64>() == 20).then_some(c)
    })
    .await;
    app.shutdown().await;
    let _ = broker.delete_queue(&input).await;
    let _ = broker.delete_queue(&out).await;
    let _ = broker.delete_queue("tally.out").await;

    held.unwrap();
    assert!(
        early.is_empty(),
        "nothing is handled without its record: {}",
        early.len()
    );
    assert!(ready.ready, "a paused route is not unready: {ready:?}");
    assert_eq!(got.len(), 20, "all handled once the store is back");
    assert_eq!(counts.unwrap().values().sum::<i64>(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_on_store_down_handles_deliveries_and_says_degraded() {
    let broker = Broker::shared().await.unwrap();
    let (input, out) = (unique("dedup-alo-in"), unique("dedup-alo-out"));
    broker.declare_queue(&out).await.unwrap();
    // The store (state and records) on a Redis of its own; the spool on
    // the shared one.
    let mut store = PrivateRedis::start().await.unwrap();
    let dir = plugins_dir_of(&[("echo", wasm("echo").unwrap())]).unwrap();
    let cfg = WarrenToml::isolated(dir.path())
        .echo(&input, &out)
        .merge(
            "[plugin.echo]\ndedup = { key = \"message-id\", on-store-down = \"at-least-once\" }\n",
        )
        .set("kv.url", store.url())
        .set("kv.read-timeout-ms", 200)
        .admin_bind("127.0.0.1:0");
    let (app, handle) = start_ready(parse(&cfg)).await.unwrap();
    store.kill();
    let props = BasicProperties::default().with_message_id("m-1".into());
    for _ in 0..2 {
        broker
            .publish_with_properties("", &input, b"twice", props.clone())
            .await
            .unwrap();
    }
    // Both copies run: without its store the route is at least once.
    let got = broker
        .collect(&out, 2, Duration::from_secs(30))
        .await
        .unwrap();
    let ready = handle.readiness();
    app.shutdown().await;
    let _ = broker.delete_queue(&input).await;
    let _ = broker.delete_queue(&out).await;

    assert_eq!(got.len(), 2, "both copies handled");
    assert!(ready.ready, "{ready:?}");
    assert!(
        ready
            .degraded
            .iter()
            .any(|d| d.contains(&input) && d.contains("at least once")),
        "{ready:?}"
    );
}
