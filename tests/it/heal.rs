//! The topology Warren owns heals: an output refused because a
//! destination Warren declares is missing (a manifest's output exchange,
//! a retry tier) has it re-declared with its bindings and is published
//! again, never dead-lettered.

use std::collections::BTreeSet;
use std::time::Duration;

use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::rabbit::RabbitNode;

use crate::admin::{metric, scrape};

/// On a node of its own (the router's exchange has a fixed name): the
/// router's output exchange `orders.routed` and the first retry tier are
/// deleted while orders and retries flow; every order reaches
/// `orders.routed.all`, every retried message its output, nothing is
/// dead-lettered, and each destination is re-declared once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_destinations_warren_declares_are_declared_again() {
    let node = RabbitNode::start().await.unwrap();
    let broker = Broker::connect(&node.amqp_url()).await.unwrap();
    let (retry_in, retry_out, dlq) = (
        unique("heal-retry-in"),
        unique("heal-retry-out"),
        unique("heal-dlq"),
    );
    broker.declare_queue(&retry_out).await.unwrap();
    let dir = crate::host::plugins_dir(&[("router", "router"), ("flaky", "flaky")]).unwrap();
    let config = crate::host::parse(
        &WarrenToml::isolated(dir.path())
            .amqp_url(&node.amqp_url())
            .quick_retries(3)
            .dead_letters(&unique("heal-dlx"), &dlq)
            .admin_bind("127.0.0.1:0")
            .merge(&format!(
                r#"
                [plugin.flaky]
                subscriptions = [{{ queue = "{retry_in}" }}]
                config = {{ fail-attempts = "1", routing-key = "{retry_out}" }}
                "#
            )),
    );
    let (app, _handle) = crate::host::start_ready(config).await.unwrap();
    let tier = "warren.retry.50ms";
    let order = |i: usize| format!(r#"{{"id":{i},"region":"eu"}}"#);
    let retried = |i: usize| format!("retried-{i}");

    broker
        .publish_all("", "orders.in", (0..100).map(order))
        .await
        .unwrap();
    broker
        .publish_all("", &retry_in, (0..50).map(retried))
        .await
        .unwrap();
    broker.delete_exchange("orders.routed").await.unwrap();
    broker.delete_exchange(tier).await.unwrap();
    broker
        .publish_all("", "orders.in", (100..400).map(order))
        .await
        .unwrap();
    broker
        .publish_all("", &retry_in, (50..100).map(retried))
        .await
        .unwrap();

    let want: BTreeSet<Vec<u8>> = (0..400).map(|i| order(i).into_bytes()).collect();
    let (_, missing) = broker
        .collect_until_complete("orders.routed.all", &want, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(missing.is_empty(), "{} orders not routed", missing.len());
    let want: BTreeSet<Vec<u8>> = (0..100).map(|i| retried(i).into_bytes()).collect();
    let (_, missing) = broker
        .collect_until_complete(&retry_out, &want, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(missing.is_empty(), "{} retries lost", missing.len());
    assert_eq!(
        broker.message_count(&dlq).await.unwrap(),
        0,
        "no dead letters"
    );

    let m = scrape(app.admin_addr()).await;
    for destination in ["orders.routed", tier] {
        assert_eq!(
            metric(
                &m,
                "warren_destinations_redeclared_total",
                &[("destination", destination)]
            ),
            1.0,
            "{destination} re-declared once"
        );
    }
    app.shutdown().await;
}
