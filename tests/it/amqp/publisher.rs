//! The confirmed publisher.

use std::time::{Duration, Instant};
use warren_it::rabbit::Shared;

use warren::amqp::{PublishError, RefusalKind};
use warren::message::OutboundMessage;
use warren_it::proxy::{Mode, Proxy};
use warren_it::wait;

use super::*;

each_version!(confirm_times_out_under_blackhole -> Result<()>);
/// A stalled (blackholed) connection: the publish fails with a confirm
/// timeout within the configured time.
async fn confirm_times_out_under_blackhole(target: Shared) -> Result<()> {
    init_tracing();
    let queue = qname("stall");
    let proxy = Proxy::start(target.addr).await?;
    let mut c = config(&proxy.amqp_url(), queue_topology(&queue));
    c.heartbeat = Duration::from_secs(30);
    c.confirm_timeout = Duration::from_secs(1);
    let r = Running::start(c)?;
    r.until_running(1, Duration::from_secs(10)).await?;
    let p = r.handle.publisher();
    wait::until_true("publisher ready", Duration::from_secs(5), || {
        let ok = p.is_ready();
        async move { ok }
    })
    .await?;
    p.publish(&numbered(&queue, 1)).await?;

    proxy.set_mode(Mode::Blackhole);
    let t0 = Instant::now();
    let err = p.publish(&numbered(&queue, 2)).await.unwrap_err();
    let took = t0.elapsed();
    assert_eq!(err, PublishError::ConfirmTimeout(Duration::from_secs(1)));
    assert!(err.is_transient() && err.is_outcome_unknown());
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(1_500),
        "{took:?}"
    );
    proxy.set_mode(Mode::Pass);
    drop(r);
    delete_queue(&target.url, &queue).await?;
    Ok(())
}

each_version!(unroutable_and_missing_exchange_are_typed_errors -> Result<()>);
/// A mandatory publish nobody can route gives the unroutable error; a
/// publish to a missing exchange fails with not-found and the publisher
/// re-opens its channel.
async fn unroutable_and_missing_exchange_are_typed_errors(target: Shared) -> Result<()> {
    init_tracing();
    let r = Running::start(config(&target.url, Topology::default()))?;
    r.until_running(1, Duration::from_secs(10)).await?;
    let p = r.handle.publisher();
    wait::until_true("publisher ready", Duration::from_secs(5), || {
        let ok = p.is_ready();
        async move { ok }
    })
    .await?;
    let msg = OutboundMessage::new("amq.direct", qname("nobody"), "x");
    match p.publish(&msg).await {
        Err(PublishError::Refused(r)) => {
            assert_eq!((r.kind, r.reply_code), (RefusalKind::NoRoute, 312))
        }
        other => panic!("expected unroutable, got {other:?}"),
    }
    let err = p.publish(&msg).await.unwrap_err();
    assert!(!err.is_transient());

    let missing = OutboundMessage::new(qname("no-such-exchange"), "k", "x");
    match p.publish(&missing).await {
        Err(PublishError::Refused(r)) => {
            assert_eq!((r.kind, r.reply_code), (RefusalKind::NotFound, 404));
            assert_eq!(r.exchange, missing.exchange);
            assert!(r.reply_text.contains(&missing.exchange), "{r}");
        }
        other => panic!("expected not-found, got {other:?}"),
    }
    // The channel comes back on the same connection.
    let queue = qname("after-404");
    r.handle.declare(queue_topology(&queue)).await?;
    r.publish_confirmed(&numbered(&queue, 1), Duration::from_secs(5))
        .await?;
    assert_eq!(r.status().generation, 1);

    // Many publishes in flight at once.
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..500 {
        let p = p.clone();
        let m = numbered(&queue, i);
        set.spawn(async move { p.publish(&m).await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    eprintln!("500 concurrent confirmed publishes in {:?}", t0.elapsed());
    r.stop().await?;
    delete_queue(&target.url, &queue).await?;
    Ok(())
}
