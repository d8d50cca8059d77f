//! Key-value state through `warren run`: the `tally` example counts per
//! key, and its counts follow the deliveries acknowledged: through retries
//! and traps, and through the death of the Redis primary. (A `kill -9` of
//! Warren itself is in `host/tests/state.rs`.)

use std::collections::BTreeMap;
use std::time::Duration;

use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::sentinel::Topology;
use warren_it::tally::Load;
use warren_it::wait;

use crate::host::{parse, plugins_dir_of, start_ready};

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// Queues and a config for `tally` consuming `input`, publishing to `out`,
/// dead-lettering to `dlq`.
fn tally_config(dir: &std::path::Path, input: &str, out: &str, dlq: &str) -> WarrenToml {
    WarrenToml::isolated(dir)
        .subscribe("tally", input)
        .set("plugin.tally.config.routing-key", out)
        .quick_retries(3)
        .dead_letters_to(dlq)
        .admin_bind("127.0.0.1:0")
}

async fn drop_queues(broker: &Broker, queues: &[&str]) {
    for q in queues {
        let _ = broker.delete_queue(q).await;
    }
    // Declared for the manifest's outputs; these tests publish elsewhere.
    let _ = broker.delete_queue("tally.out").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_ends_at_the_deliveries_acked_through_retries_and_traps() {
    let broker = Broker::shared().await.unwrap();
    let (input, out, dlq) = (unique("tally-in"), unique("tally-out"), unique("tally-dlq"));
    broker.declare_queue(&out).await.unwrap();
    let dir = plugins_dir_of(&[("tally", wasm("tally").unwrap())]).unwrap();
    let (app, handle) = start_ready(parse(&tally_config(dir.path(), &input, &out, &dlq)))
        .await
        .unwrap();
    let load = Load::new(1000, Some(10));
    broker.publish_all("", &input, load.bodies()).await.unwrap();

    let got = broker
        .collect(&out, load.acked(), Duration::from_secs(180))
        .await
        .unwrap();
    assert_eq!(got.len(), load.acked(), "outputs of acked deliveries");
    let dead = broker
        .collect(&dlq, load.trapped(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        dead.len(),
        load.trapped(),
        "trapped deliveries dead-lettered"
    );
    // The last commits may still be on their way when their outputs are.
    let expected = load.expected();
    let counts = wait::until("every count committed", Duration::from_secs(30), || async {
        let c = load.counts(SHARED_REDIS).await.ok()?;
        (c == expected).then_some(c)
    })
    .await;
    let status = handle.kv.status().await;
    app.shutdown().await;
    drop_queues(&broker, &[&input, &out, &dlq]).await;
    load.cleanup(SHARED_REDIS).await;

    let counts = counts.unwrap_or_else(|e| panic!("{e}: {:?}", status));
    assert_eq!(counts.values().sum::<i64>(), load.acked() as i64);
    let tally = &status["tally"];
    assert_eq!(tally.commits, load.acked() as u64, "{tally:?}");
    // Each retried first attempt and each trap made one write, discarded.
    let retried = (0..load.n)
        .filter(|i| Load::fate(*i) == warren_it::tally::Fate::RetryOnce)
        .count();
    assert_eq!(
        tally.discarded_writes,
        (retried + load.trapped()) as u64,
        "{tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acked_increment_is_lost_when_the_redis_primary_dies() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,warren::kv=debug,lapin=off".into()),
        )
        .with_test_writer()
        .try_init();
    let redis = Topology::start().await.unwrap();
    let broker = Broker::shared().await.unwrap();
    let (input, out, dlq) = (
        unique("tally-fo-in"),
        unique("tally-fo-out"),
        unique("tally-fo-dlq"),
    );
    broker.declare_queue(&out).await.unwrap();
    let dir = plugins_dir_of(&[("tally", wasm("tally").unwrap())]).unwrap();
    let config = tally_config(dir.path(), &input, &out, &dlq)
        .set("spool.sentinels", redis.sentinel_urls())
        .set("spool.master-name", redis.master_name.as_str())
        .set("spool.status-interval-ms", 200);
    let (app, handle) = start_ready(parse(&config)).await.unwrap();
    // One key per request: a lost increment is a missing key, a repeated
    // one a count of 2.
    let load = Load::new(600, None);
    let bodies = load.bodies();
    let url = |port: u16| format!("redis://127.0.0.1:{port}");
    let old = redis.primary_port().await.unwrap();

    // Publish at about 100/s; kill the primary once a sixth is counted.
    let publisher = {
        let input = input.clone();
        tokio::spawn(async move {
            let broker = Broker::shared().await.unwrap();
            for chunk in bodies.chunks(10) {
                broker
                    .publish_all("", &input, chunk.to_vec())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    wait::until_true("a sixth counted", Duration::from_secs(60), || async {
        load.counts(&url(old)).await.map(|c| c.len()).unwrap_or(0) >= load.n / 6
    })
    .await
    .unwrap();
    redis.kill9(old).await.unwrap();
    let new = redis
        .wait_new_primary(old, Duration::from_secs(60))
        .await
        .unwrap();
    publisher.await.unwrap();

    let expected = load.expected();
    let counted = wait::until(
        "every acked request counted",
        Duration::from_secs(120),
        || async {
            let c = load.counts(&url(new)).await.ok()?;
            expected.keys().all(|k| c.contains_key(k)).then_some(c)
        },
    )
    .await;
    let status = format!(
        "{:?}; input ready {:?}; dead letters {:?}",
        handle.kv.status().await,
        broker.message_count(&input).await,
        broker.message_count(&dlq).await,
    );
    // Only the trapped requests are dead letters: no delivery retried
    // itself out of attempts while the store failed over.
    let dead = broker
        .collect(&dlq, load.n, Duration::from_secs(3))
        .await
        .unwrap();
    app.shutdown().await;
    drop_queues(&broker, &[&input, &out, &dlq]).await;
    drop(redis);

    let counts: BTreeMap<String, i64> = counted.unwrap_or_else(|e| panic!("{e}: {status:?}"));
    let trapped: Vec<&String> = counts
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(trapped.is_empty(), "trapped requests counted: {trapped:?}");
    let twice = counts.values().filter(|v| **v > 1).count();
    eprintln!(
        "redis primary killed: {} acked requests all counted on the new primary; {twice} counted twice (a commit repeated across the failover)",
        expected.len()
    );
    assert!(counts.values().all(|v| (1..=2).contains(v)), "{counts:?}");
    let reasons: Vec<_> = dead
        .iter()
        .filter_map(|d| d.header_str("x-warren-outcome"))
        .collect();
    assert_eq!(dead.len(), load.trapped(), "{reasons:?}");
}
