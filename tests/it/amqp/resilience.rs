//! Connection failures: cut, blackhole, forced close, kill -9.

use std::collections::HashSet;
use std::time::{Duration, Instant};
use warren_it::rabbit::Shared;

use futures::StreamExt;
use warren::amqp::{AckOutcome, ConnectionState, FailureClass, PublishError};
use warren_it::proxy::{Mode, Proxy};
use warren_it::rabbit::RabbitNode;
use warren_it::wait;

use super::*;

each_version!(cut_while_consuming_10k_resumes_without_loss -> Result<()>);
/// The proxy cuts the connection while 10,000 persistent messages are being
/// consumed: consumption resumes by itself, every confirmed message
/// arrives, the broker sees exactly one consumer again, and an ack for a
/// delivery of the dead session is a counted no-op.
async fn cut_while_consuming_10k_resumes_without_loss(target: Shared) -> Result<()> {
    init_tracing();
    const N: u64 = 10_000;
    let queue = qname("cut");
    let proxy = Proxy::start(target.addr).await?;
    let r = Running::start(config(&proxy.amqp_url(), queue_topology(&queue)))?;
    r.until_running(1, Duration::from_secs(10)).await?;
    wait::until_true("publisher ready", Duration::from_secs(5), || {
        let ok = r.handle.publisher().is_ready();
        async move { ok }
    })
    .await?;

    // Pre-fill with pipelined confirmed publishes.
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..N)
        .map(|i| {
            let p = r.handle.publisher();
            let q = queue.clone();
            async move { p.publish(&numbered(&q, i)).await }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 0, "all pre-fill publishes confirmed");
    eprintln!("published {N} confirmed in {:?}", started.elapsed());

    let mut sub = subscribe(&r, &queue, 200);
    let mut seen = HashSet::new();
    let mut held = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while (seen.len() as u64) < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = tokio::time::timeout(left, sub.next())
            .await
            .context("timed out consuming")?
            .context("subscription ended")?;
        let id = id_of(&d);
        if seen.len() == 1_000 && held.is_none() {
            // Keep one delivery unacked across the cut, then cut.
            held = Some(d);
            proxy.cut();
            continue;
        }
        seen.insert(id);
        d.acker.ack();
    }
    let s = r.status();
    assert!(s.generation >= 2, "reconnected: {s:?}");
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.class),
        Some(FailureClass::TcpReset),
        "{s:?}"
    );
    let held = held.context("held a delivery")?;
    assert_eq!(held.generation, 1);
    assert_eq!(held.acker.ack(), AckOutcome::Stale);

    let (_conn, ch) = plain(&target.url).await?;
    wait::until_true(
        "broker-side consumer count 1",
        Duration::from_secs(10),
        || {
            let ch = ch.clone();
            let q = queue.clone();
            async move { broker_consumers(&ch, &q).await.ok() == Some(1) }
        },
    )
    .await?;
    wait::until_true(
        "periodic check saw 1 consumer",
        Duration::from_secs(5),
        || {
            let ok = r
                .handle
                .consumer(&queue)
                .and_then(|c| c.broker_consumers)
                .is_some_and(|(n, _)| n == 1);
            async move { ok }
        },
    )
    .await?;
    r.stop().await?;
    delete_queue(&target.url, &queue).await?;
    Ok(())
}

each_version!(blackhole_is_detected_within_two_heartbeats_and_recovered -> Result<()>);
/// A blackholed connection is detected within 2× heartbeat (2 s here) and
/// recovered once traffic flows again.
async fn blackhole_is_detected_within_two_heartbeats_and_recovered(target: Shared) -> Result<()> {
    init_tracing();
    let queue = qname("blackhole");
    let proxy = Proxy::start(target.addr).await?;
    let (r, seen, _task) = start_consuming(
        config(&proxy.amqp_url(), queue_topology(&queue)),
        &queue,
        10,
    )
    .await?;

    proxy.set_mode(Mode::Blackhole);
    let t0 = Instant::now();
    let mut status = r.handle.status();
    wait::until_true("blackhole detected", Duration::from_secs(10), || {
        let s = status.borrow_and_update().clone();
        async move { !s.is_connected() }
    })
    .await?;
    let detected = t0.elapsed();
    eprintln!("blackhole detected after {detected:?}");
    let s = r.status();
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.class),
        Some(FailureClass::HeartbeatTimeout),
        "{s:?}"
    );
    assert!(
        detected <= Duration::from_millis(4_500),
        "detection took {detected:?} (heartbeat 2 s)"
    );

    proxy.set_mode(Mode::Pass);
    r.until_running(2, Duration::from_secs(15)).await?;
    r.until_consuming(&queue, Duration::from_secs(5)).await?;
    r.publish_confirmed(&numbered(&queue, 7), Duration::from_secs(5))
        .await?;
    wait::until_true("delivery after recovery", Duration::from_secs(5), || {
        let ok = seen.lock().unwrap().contains(&7);
        async move { ok }
    })
    .await?;
    r.stop().await?;
    delete_queue(&target.url, &queue).await?;
    Ok(())
}

each_version!(forced_close_and_kill9_recover_without_losing_confirmed_messages -> Result<()>);
/// On a private node: `close_all_connections` (320), a memory alarm
/// (`connection.blocked`), then `kill -9` plus restart. Each recovers by
/// itself, classes are reported, and no confirmed message is lost.
async fn forced_close_and_kill9_recover_without_losing_confirmed_messages(
    target: Shared,
) -> Result<()> {
    init_tracing();
    let mut node = RabbitNode::start_version(target.version, "").await?;
    let queue = qname("kill9");
    let mut c = config(&node.amqp_url(), queue_topology(&queue));
    c.confirm_timeout = Duration::from_secs(2);
    let (r, seen, _task) = start_consuming(c, &queue, 50).await?;
    let mut confirmed = HashSet::new();
    let mut next = 0u64;
    let mut publish_batch = async |r: &Running, confirmed: &mut HashSet<u64>| -> Result<()> {
        for _ in 0..200 {
            r.publish_confirmed(&numbered(&queue, next), Duration::from_secs(20))
                .await?;
            confirmed.insert(next);
            next += 1;
        }
        Ok(())
    };
    publish_batch(&r, &mut confirmed).await?;

    // 1. Broker-initiated close (320).
    node.close_all_connections("warren test outage").await?;
    r.until_running(2, Duration::from_secs(15)).await?;
    let s = r.status();
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.class),
        Some(FailureClass::ConnectionForced),
        "{s:?}"
    );
    r.until_consuming(&queue, Duration::from_secs(5)).await?;
    publish_batch(&r, &mut confirmed).await?;

    // 2. A memory alarm blocks publishing: status says blocked, publishes
    //    wait at most the confirm timeout, and resume after the alarm.
    node.ctl(&["set_vm_memory_high_watermark", "0.000001"])
        .await?;
    let p = r.handle.publisher();
    let mut status = r.handle.status();
    let blocked_msg = numbered(&queue, 1_000_000);
    let first = p.publish(&blocked_msg).await;
    eprintln!("publish as the alarm went off: {first:?}");
    wait::until_true("status blocked", Duration::from_secs(10), || {
        let s = status.borrow_and_update().clone();
        async move { matches!(s.state, ConnectionState::Blocked { .. }) }
    })
    .await?;
    let t0 = Instant::now();
    let err = p.publish(&blocked_msg).await.unwrap_err();
    assert_eq!(err, PublishError::Blocked(p.confirm_timeout()), "{err:?}");
    assert!(t0.elapsed() <= p.confirm_timeout() + Duration::from_millis(500));
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await?;
    wait::until_true("unblocked", Duration::from_secs(15), || {
        let s = status.borrow_and_update().clone();
        async move { s.is_running() }
    })
    .await?;
    assert_eq!(r.status().generation, 2, "blocking does not reconnect");
    publish_batch(&r, &mut confirmed).await?;

    // 3. kill -9 and restart.
    node.kill9().await?;
    let mut status = r.handle.status();
    // Session 2 was running until the kill, so recovering with generation
    // still 2 means it was lost. (Its own failure record lasts only until
    // the first reconnect attempt, refused within milliseconds, replaces
    // it: waiting for that record raced the poll.)
    wait::until_true("kill -9 detected", Duration::from_secs(10), || {
        let s = status.borrow_and_update().clone();
        async move { matches!(s.state, ConnectionState::Recovering { .. }) && s.generation == 2 }
    })
    .await?;
    let s = r.status();
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.class),
        Some(FailureClass::TcpReset),
        "{s:?}"
    );
    node.restart().await?;
    let back = Instant::now();
    r.until_running(3, Duration::from_secs(20)).await?;
    eprintln!("running again {:?} after the node was back", back.elapsed());
    r.until_consuming(&queue, Duration::from_secs(5)).await?;
    publish_batch(&r, &mut confirmed).await?;

    wait::until_true(
        "every confirmed message received",
        Duration::from_secs(30),
        || {
            let missing = confirmed.difference(&seen.lock().unwrap()).count();
            async move { missing == 0 }
        },
    )
    .await?;
    r.stop().await?;
    Ok(())
}
