//! Effectively once when the store is down: with `on-store-down =
//! "at-least-once"` a deduplicated route runs its deliveries without a
//! record and says so in `/ready`. (Warren killed at each step of the
//! journal is in `host/tests/dedup.rs`; the deduplicated chaos gauntlet in
//! `host/tests/dedup_gauntlet.rs`.)

use std::time::Duration;

use lapin::BasicProperties;
use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::private_redis::PrivateRedis;

use crate::host::{parse, plugins_dir_of, start_ready};

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
