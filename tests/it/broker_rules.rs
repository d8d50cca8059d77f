//! The broker's own rules, on each version: a queue that exists with other
//! settings than Warren declares is consumed as it is and named in
//! `/status`; a message the broker gives up on (its delivery limit, reached
//! through consumer timeouts) ends in Warren's dead-letter queue, never
//! dropped; the broker's product and version are reported.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use warren::config::Config;
use warren_it::broker::{Broker, unique};
use warren_it::config::echo_section;
use warren_it::rabbit::{RabbitNode, Shared, Version};

use crate::host::{plugins_dir, start_ready};

/// Warren on `url` with `outage::config`'s unique names, `dispatch` lines
/// added to `[dispatch]` and the plugin sections `rest`; and its
/// dead-letter queue.
fn config(url: &str, dir: &std::path::Path, dispatch: &str, rest: &str) -> (Config, String) {
    let cfg = crate::host::parse(
        &crate::outage::toml(url, ("heartbeat-secs = 2", ""), dir)
            .merge(&format!("[dispatch]\n{dispatch}"))
            .merge(rest),
    );
    let dlq = cfg.dispatch.dead_letter_queue.clone();
    (cfg, dlq)
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

each_version!(a_queue_with_other_settings_is_consumed_and_each_difference_named);
async fn a_queue_with_other_settings_is_consumed_and_each_difference_named(target: Shared) {
    let broker = Broker::connect(&target.url).await.unwrap();
    let (input, output) = (unique("diff-in"), unique("diff-out"));
    // Made by someone else: a quorum queue with a length limit and none of
    // the dead-letter settings Warren declares.
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args.insert("x-max-length".into(), AMQPValue::LongInt(500));
    broker.declare_queue_with(&input, args).await.unwrap();
    broker.declare_queue(&output).await.unwrap();
    let dir = plugins_dir(&[("echo", "echo")]).unwrap();
    let (cfg, dlq) = config(&target.url, dir.path(), "", &echo_section(&input, &output));
    let (app, handle) = start_ready(cfg).await.unwrap();

    let bodies: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    broker.publish_all("", &input, &bodies).await.unwrap();
    let got = broker
        .collect(&output, bodies.len(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), bodies.len(), "the queue is consumed as it is");

    let status = handle.amqp.status_now();
    let diffs = &status.queue_differences[&input];
    let named = |arg: &str| diffs.iter().find(|d| d.argument == arg);
    let dlx = named("x-dead-letter-exchange").expect("dead-letter exchange named");
    assert_eq!(dlx.existing, "none");
    assert!(dlx.declared.starts_with("it.dlx."), "{dlx:?}");
    assert_eq!(
        named("x-delivery-limit").map(|d| d.existing.as_str()),
        Some("none")
    );
    let max = named("x-max-length").expect("length limit named");
    assert_eq!(
        (max.existing.as_str(), max.declared.as_str()),
        ("500", "none")
    );
    let degraded = handle.readiness().degraded.join("\n");
    assert!(
        degraded.contains(&format!("queue {input:?} exists with other settings"))
            && degraded.contains("x-dead-letter-exchange is none where Warren declares")
            && degraded.contains("set it with a policy"),
        "{degraded}"
    );
    let server = status.server.expect("server properties");
    assert_eq!(server.product, "RabbitMQ");
    assert!(
        server
            .version
            .starts_with(&format!("{}.", target.version.label())),
        "{server:?} on {:?}",
        target.version
    );
    assert!(
        status
            .endpoint
            .is_some_and(|e| e.contains(&target.addr.port().to_string()))
    );

    app.shutdown().await;
    for q in [&input, &output, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}

/// RabbitMQ 4 dead-letters a quorum-queue message returned to its queue
/// more than its delivery limit, and drops it when the queue has no
/// dead-letter exchange. Here each return is a consumer timeout: the
/// plugin takes longer than the broker waits for an acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_4_a_message_past_its_delivery_limit_ends_in_the_dead_letter_queue() {
    let node = RabbitNode::start_full(
        Version::V4_0,
        "consumer_timeout = 2000",
        // The broker checks consumer timeouts on its channel tick.
        "[{rabbit, [{channel_tick_interval, 500}]}].",
    )
    .await
    .unwrap();
    let url = node.amqp_url();
    let broker = Broker::connect(&url).await.unwrap();
    let input = unique("slow-in");
    let dir = plugins_dir(&[("slow", "slow")]).unwrap();
    let limit = 3;
    let (cfg, dlq) = config(
        &url,
        dir.path(),
        &format!("delivery-limit = {limit}"),
        &format!(
            r#"
            [plugin.slow]
            subscriptions = [{{ queue = "{input}", prefetch = 1 }}]
            config = {{ millis = "4000" }}
            limits = {{ deadline-ms = 10000 }}
            "#
        ),
    );
    let (app, handle) = start_ready(cfg).await.unwrap();
    broker
        .publish_all("", &input, &["held too long".to_string()])
        .await
        .unwrap();

    let dead = broker
        .collect(&dlq, 1, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(dead[0].body, b"held too long");
    assert_eq!(
        dead[0].header_str("x-first-death-reason").as_deref(),
        Some("delivery_limit"),
        "{:?}",
        dead[0].headers
    );
    let consumer = handle.amqp.consumer(&input).unwrap();
    assert!(consumer.consumer_timeouts >= 1, "{consumer:?}");
    assert_eq!(
        consumer.last_loss.map(|f| f.class),
        Some(warren::amqp::FailureClass::ConsumerTimeout)
    );
    assert_eq!(
        broker.message_count(&input).await.unwrap(),
        0,
        "nothing left behind"
    );
    app.shutdown().await;
}
