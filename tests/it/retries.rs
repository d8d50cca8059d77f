//! Retry delay tiers: a retry waits in the tier of its delay, so a short
//! delay never waits behind a long one, and the tiers are quorum queues.

use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::rabbit::Shared;

use crate::admin::plugins_dir;

/// The tiers of a 1 s .. 60 s schedule.
const TIERS: [&str; 7] = ["1s", "2s", "4s", "8s", "16s", "32s", "60s"];

each_version!(short_retries_do_not_wait_behind_long_ones);
/// 100 retries of 60 s wait in their tier; then 100 deliveries `flaky`
/// retries once (1 s, the schedule's first delay) come back and are
/// forwarded within 1 to 3 s, while the 60 s ones still wait.
async fn short_retries_do_not_wait_behind_long_ones(target: Shared) {
    let broker = Broker::connect(&target.url).await.unwrap();
    let (input, out, dlq) = (unique("tiers-in"), unique("tiers-out"), unique("tiers-dlq"));
    // A prefix of its own: the test removes its tiers, with the 60 s
    // retries still in them.
    let prefix = unique("tiers-retry");
    broker.declare_queue(&out).await.unwrap();
    let dir = plugins_dir(&[("flaky", "flaky")]);
    let config = crate::host::parse(
        &WarrenToml::isolated(dir.path())
            .amqp_url(&target.url)
            .retry_exchange(&prefix)
            .set("dispatch.retry-delay-ms", 1000)
            .set("dispatch.retry-delay-max-ms", 60_000)
            .set("dispatch.max-attempts", 10)
            .dead_letters(&unique("tiers-dlx"), &dlq)
            .admin_bind("127.0.0.1:0")
            .merge(&format!(
                r#"
                [plugin.flaky]
                subscriptions = [{{ queue = "{input}" }}]
                config = {{ fail-attempts = "1", routing-key = "{out}" }}
                "#
            )),
    );
    let (app, _handle) = crate::host::start_ready(config).await.unwrap();

    // Retries of 60 s, as Warren publishes them: to the tier's exchange,
    // with the queue they return to as routing key.
    let mut attempt = FieldTable::default();
    attempt.insert("x-warren-attempt".into(), AMQPValue::LongLongInt(8));
    broker
        .publish_all_with(
            &format!("{prefix}.60s"),
            &input,
            (0..100).map(|i| format!("slow-{i}")),
            attempt,
        )
        .await
        .unwrap();

    let published = Instant::now();
    broker
        .publish_all("", &input, (0..100).map(|i| format!("fast-{i}")))
        .await
        .unwrap();
    let mut back = Vec::new();
    let deadline = published + Duration::from_secs(30);
    while back.len() < 100 && Instant::now() < deadline {
        for g in broker
            .collect(&out, 100 - back.len(), Duration::from_millis(100))
            .await
            .unwrap()
        {
            assert!(g.body.starts_with(b"fast-"), "a 60 s retry came back early");
            assert_eq!(g.header_i64("x-warren-attempt"), Some(2));
            back.push(published.elapsed());
        }
    }
    assert_eq!(back.len(), 100, "every 1 s retry came back");
    let (first, last) = (back[0], back[back.len() - 1]);
    println!(
        "{:?}: 100 retries of 1 s behind 100 of 60 s came back after {first:.2?} .. {last:.2?}",
        target.version
    );
    assert!(first >= Duration::from_secs(1), "the delay is honoured");
    assert!(last <= Duration::from_secs(3), "back within one tier");
    assert_eq!(
        broker
            .message_count(&format!("{prefix}.60s"))
            .await
            .unwrap(),
        100,
        "the 60 s retries still wait"
    );

    app.shutdown().await;
    for q in [&input, &out, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
    for tier in TIERS {
        let name = format!("{prefix}.{tier}");
        broker.delete_queue(&name).await.unwrap();
        broker.delete_exchange(&name).await.unwrap();
    }
}
