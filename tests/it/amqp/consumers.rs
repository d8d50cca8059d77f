//! Consumer repair and life cycle on the shared broker.

use std::time::Duration;
use warren_it::rabbit::Shared;

use warren::amqp::{AckOutcome, ConnectionState};
use warren_it::wait;

use super::*;

each_version!(queue_deleted_under_consumer_is_redeclared_and_consumed -> Result<()>);
/// The queue is deleted under a running consumer: the consumer is
/// re-established on a redeclared queue without a reconnect, and messages
/// published afterwards are consumed.
async fn queue_deleted_under_consumer_is_redeclared_and_consumed(target: Shared) -> Result<()> {
    init_tracing();
    let queue = qname("deleted");
    let (r, seen, _task) =
        start_consuming(config(&target.url, queue_topology(&queue)), &queue, 10).await?;
    r.publish_confirmed(&numbered(&queue, 1), Duration::from_secs(5))
        .await?;
    wait::until_true("first delivery", Duration::from_secs(5), || {
        let ok = seen.lock().unwrap().contains(&1);
        async move { ok }
    })
    .await?;

    delete_queue(&target.url, &queue).await?;
    wait::until_true("consumer re-established", Duration::from_secs(10), || {
        let ok = r
            .handle
            .consumer(&queue)
            .is_some_and(|c| c.reestablished >= 1 && c.believed_consumers == 1);
        async move { ok }
    })
    .await?;
    assert_eq!(r.status().generation, 1, "no reconnect was needed");
    for i in 2..=6 {
        r.publish_confirmed(&numbered(&queue, i), Duration::from_secs(5))
            .await?;
    }
    wait::until_true("deliveries after redeclare", Duration::from_secs(5), || {
        let ok = (2..=6).all(|i| seen.lock().unwrap().contains(&i));
        async move { ok }
    })
    .await?;
    let (_conn, ch) = plain(&target.url).await?;
    assert_eq!(broker_consumers(&ch, &queue).await?, 1);
    r.stop().await?;
    delete_queue(&target.url, &queue).await?;
    Ok(())
}

each_version!(subscriptions_added_and_removed_at_runtime_and_clean_stop -> Result<()>);
/// Subscriptions are added and removed at run time; removal waits for the
/// in-flight delivery's ack; a clean stop leaves no consumer behind.
async fn subscriptions_added_and_removed_at_runtime_and_clean_stop(target: Shared) -> Result<()> {
    init_tracing();
    let a = qname("runtime-a");
    let b = qname("runtime-b");
    let r = Running::start(config(&target.url, queue_topology(&a)))?;
    r.until_running(1, Duration::from_secs(10)).await?;
    // `b` is added to the topology at run time.
    r.handle.declare(queue_topology(&b)).await?;
    let mut sub_a = subscribe(&r, &a, 10);
    let sub_b = subscribe(&r, &b, 10);
    r.until_consuming(&a, Duration::from_secs(5)).await?;
    r.until_consuming(&b, Duration::from_secs(5)).await?;
    wait::until_true("ready", Duration::from_secs(5), || {
        let ok = r.handle.is_ready();
        async move { ok }
    })
    .await?;
    assert!(
        r.handle
            .add_subscription(warren::amqp::SubscriptionConfig::new(&a))
            .is_err()
    );

    r.publish_confirmed(&numbered(&a, 1), Duration::from_secs(5))
        .await?;
    let held = tokio::time::timeout(Duration::from_secs(5), sub_a.next())
        .await?
        .context("delivery on a")?;
    // Removal waits for the held delivery.
    let h = r.handle.clone();
    let qa = a.clone();
    let removal = tokio::spawn(async move { h.remove_subscription(&qa).await });
    let (_conn, ch) = plain(&target.url).await?;
    wait::until_true(
        "broker cancelled the consumer on a",
        Duration::from_secs(5),
        || {
            let ch = ch.clone();
            let q = a.clone();
            async move { broker_consumers(&ch, &q).await.ok() == Some(0) }
        },
    )
    .await?;
    assert!(
        !removal.is_finished(),
        "removal waits for in-flight deliveries"
    );
    assert_eq!(held.acker.ack(), AckOutcome::Sent);
    tokio::time::timeout(Duration::from_secs(5), removal).await???;
    assert!(r.handle.consumer(&a).is_none());
    // The ack reached the broker before the channel closed.
    let q = ch
        .queue_declare(
            a.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    assert_eq!(
        q.message_count(),
        0,
        "held delivery was acked, not requeued"
    );
    assert!(sub_a.next().await.is_none(), "stream ends after removal");

    // b still works.
    let (seen_b, _task) = collect(sub_b);
    r.publish_confirmed(&numbered(&b, 2), Duration::from_secs(5))
        .await?;
    wait::until_true("delivery on b", Duration::from_secs(5), || {
        let ok = seen_b.lock().unwrap().contains(&2);
        async move { ok }
    })
    .await?;

    // Clean stop.
    let mut status = r.handle.status();
    r.stop().await?;
    assert_eq!(status.borrow_and_update().state, ConnectionState::Stopped);
    wait::until_true("no consumer left on b", Duration::from_secs(5), || {
        let ch = ch.clone();
        let q = b.clone();
        async move { broker_consumers(&ch, &q).await.ok() == Some(0) }
    })
    .await?;
    delete_queue(&target.url, &a).await?;
    delete_queue(&target.url, &b).await?;
    Ok(())
}

each_version!(zombie_consumer_is_found_by_the_periodic_check_and_repaired -> Result<()>);
/// A zombie: the broker cancels the consumer (queue deleted and re-created
/// behind Warren's back) but the cancel never arrives (the proxy drops
/// `basic.cancel`). The periodic check sees 0 consumers on the broker,
/// counts a zombie and re-subscribes.
async fn zombie_consumer_is_found_by_the_periodic_check_and_repaired(target: Shared) -> Result<()> {
    init_tracing();
    let queue = qname("zombie");
    let proxy = warren_it::proxy::Proxy::start(target.addr).await?;
    let mut c = config(&proxy.amqp_url(), queue_topology(&queue));
    c.consumer_check_interval = Duration::from_secs(2);
    let (r, seen, _task) = start_consuming(c, &queue, 10).await?;

    proxy.drop_server_methods(&[(60, 30)]);
    let (_conn, ch) = plain(&target.url).await?;
    ch.queue_delete(queue.as_str().into(), Default::default())
        .await?;
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await?;
    wait::until_true("basic.cancel dropped", Duration::from_secs(5), || {
        let n = proxy.dropped();
        async move { n >= 1 }
    })
    .await?;
    assert_eq!(
        broker_consumers(&ch, &queue).await?,
        0,
        "the broker has no consumer"
    );
    wait::until_true("zombie repaired", Duration::from_secs(10), || {
        let ok = r
            .handle
            .consumer(&queue)
            .is_some_and(|c| c.zombies >= 1 && c.believed_consumers == 1);
        async move { ok }
    })
    .await?;
    wait::until_true("broker consumer count 1", Duration::from_secs(5), || {
        let ch = ch.clone();
        let q = queue.clone();
        async move { broker_consumers(&ch, &q).await.ok() == Some(1) }
    })
    .await?;
    r.publish_confirmed(&numbered(&queue, 42), Duration::from_secs(5))
        .await?;
    wait::until_true("delivery after repair", Duration::from_secs(5), || {
        let ok = seen.lock().unwrap().contains(&42);
        async move { ok }
    })
    .await?;
    assert_eq!(r.status().generation, 1, "no reconnect was needed");
    r.stop().await?;
    delete_queue(&target.url, &queue).await?;
    Ok(())
}

each_version!(a_congested_link_does_not_make_the_consumer_lost -> Result<()>);
/// A congested link is not a lost consumer. A 200 kB publish through a
/// 20 kB/s link holds the connection for ~10 s; the periodic check's
/// passive declare queues behind it and gets no answer within its timeout.
/// The consumer must stay (re-establishing it would requeue its deliveries
/// onto a broker that is slow already) and deliver once the link clears.
async fn a_congested_link_does_not_make_the_consumer_lost(target: Shared) -> Result<()> {
    init_tracing();
    let queue = qname("congested");
    let proxy = warren_it::proxy::Proxy::start(target.addr).await?;
    let mut c = config(&proxy.amqp_url(), queue_topology(&queue));
    c.consumer_check_interval = Duration::from_millis(500);
    c.confirm_timeout = Duration::from_secs(60);
    let (r, seen, _task) = start_consuming(c, &queue, 10).await?;

    proxy.set_mode(warren_it::proxy::Mode::Throttle(20_000));
    let mut big = numbered(&queue, 1);
    big.body = format!("{}1", "0".repeat(199_999)).into_bytes().into();
    let confirm = r.handle.publisher().send(&big).await?;
    wait::until_true("a check timed out", Duration::from_secs(20), || {
        let n = r.handle.consumer(&queue).map_or(0, |c| c.check_timeouts);
        async move { n >= 1 }
    })
    .await?;
    confirm.await?;
    proxy.set_mode(warren_it::proxy::Mode::Pass);

    r.publish_confirmed(&numbered(&queue, 2), Duration::from_secs(10))
        .await?;
    wait::until_true(
        "deliveries after the congestion",
        Duration::from_secs(10),
        || {
            let ok = seen.lock().unwrap().is_superset(&[1, 2].into());
            async move { ok }
        },
    )
    .await?;
    let status = r.handle.consumer(&queue).unwrap();
    assert_eq!(
        (status.reestablished, status.believed_consumers),
        (0, 1),
        "{status:?}"
    );
    assert_eq!(r.status().generation, 1, "no reconnect either");
    r.stop().await?;
    delete_queue(&target.url, &queue).await?;
    Ok(())
}
