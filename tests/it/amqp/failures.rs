//! Failures that retrying cannot fix: no hot loop, a clear report.

use std::time::{Duration, Instant};
use warren_it::rabbit::Shared;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use warren::amqp::{ConnectionState, FailureClass};
use warren_it::proxy::Proxy;
use warren_it::wait;

use super::*;

each_version!(wrong_password_is_auth_failed_without_hot_loop -> Result<()>);
/// A wrong password: the state says auth-failed, and over 10 s the number
/// of connection attempts stays within what the capped backoff allows.
async fn wrong_password_is_auth_failed_without_hot_loop(target: Shared) -> Result<()> {
    init_tracing();
    let proxy = Proxy::start(target.addr).await?;
    let url = format!("amqp://guest:wrong-password@{}/%2f", proxy.addr());
    let mut c = config(&url, Topology::default());
    c.backoff.max = Duration::from_secs(2);
    let r = Running::start(c)?;
    wait::until_true("auth-failed", Duration::from_secs(10), || {
        let s = r.status();
        async move { matches!(s.state, ConnectionState::AuthFailed { .. }) }
    })
    .await?;
    let s = r.status();
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.class),
        Some(FailureClass::AccessRefused),
        "{s:?}"
    );
    assert!(
        !s.last_failure
            .as_ref()
            .unwrap()
            .message
            .contains("wrong-password"),
        "no password in status"
    );
    let attempts0 = r.status().connect_attempts;
    let accepted0 = proxy.accepted();
    let t0 = Instant::now();
    // Observe for 10 s (polling, so a state change is seen).
    let _ = wait::until_true("10 s of observation", Duration::from_secs(10), || async {
        false
    })
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    let attempts = r.status().connect_attempts - attempts0;
    let accepted = proxy.accepted() - accepted0;
    eprintln!("{attempts} attempts ({accepted} TCP connections) in {elapsed:.1} s");
    // Slow retries wait at least max/2 = 1 s.
    let allowed = (elapsed / 1.0).ceil() as u64 + 1;
    assert!(attempts <= allowed, "{attempts} attempts > {allowed}");
    assert!(accepted <= allowed, "{accepted} connections > {allowed}");
    assert!(attempts >= 3, "it keeps retrying: {attempts}");
    assert!(matches!(
        r.status().state,
        ConnectionState::AuthFailed { .. } | ConnectionState::Connecting { .. }
    ));
    r.stop().await?;
    Ok(())
}

each_version!(a_flapping_broker_gets_growing_reconnect_delays -> Result<()>);
/// Every session is cut the moment it runs (a broker that drops each
/// connection right after it starts): a session lost before it ran the
/// backoff's cap does not start the backoff over, so over 5 s the sessions
/// stay within what the growing, capped delays allow, not one per
/// first-delay ceiling.
async fn a_flapping_broker_gets_growing_reconnect_delays(target: Shared) -> Result<()> {
    init_tracing();
    let proxy = Proxy::start(target.addr).await?;
    let mut c = config(&proxy.amqp_url(), Topology::default());
    c.backoff.initial = Duration::from_millis(10);
    c.backoff.max = Duration::from_secs(2);
    let r = Running::start(c)?;
    r.until_running(1, Duration::from_secs(10)).await?;
    let mut status = r.handle.status();
    let (mut cut, mut last) = (0u64, 0u64);
    let t0 = Instant::now();
    let window = Duration::from_secs(5);
    while t0.elapsed() < window {
        let s = status.borrow_and_update().clone();
        if s.is_running() && s.generation > last {
            last = s.generation;
            proxy.cut();
            cut += 1;
        }
        // Each state change wakes the loop; the window bounds the wait.
        let _ = tokio::time::timeout(window.saturating_sub(t0.elapsed()), status.changed()).await;
    }
    eprintln!("{cut} sessions cut in {:.1} s", t0.elapsed().as_secs_f64());
    // Growing delays (10 ms doubling to 2 s, fully jittered) allow about
    // ten sessions in 5 s; starting over after each loss leaves only
    // the connect to space them (tens of sessions). 25 leaves a wide
    // margin for the jitter.
    assert!(cut >= 3, "it keeps reconnecting: {cut}");
    assert!(cut <= 25, "{cut} sessions in 5 s: the backoff started over");
    r.stop().await?;
    Ok(())
}

each_version!(a_queue_with_other_arguments_is_consumed_as_it_is -> Result<()>);
/// The queue exists with other arguments (each declaration would be a 406):
/// the status names each differing argument with both values, the queue is
/// consumed as it is, and neither the connection nor the subscription
/// retries.
async fn a_queue_with_other_arguments_is_consumed_as_it_is(target: Shared) -> Result<()> {
    init_tracing();
    let queue = qname("conflict");
    let (_conn, ch) = plain(&target.url).await?;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(60_000));
    args.insert("x-max-length".into(), AMQPValue::LongInt(100));
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;

    let mut spec = QueueSpec::durable(&queue);
    spec.message_ttl = Some(Duration::from_secs(2));
    spec.dead_letter_exchange = Some("it.nowhere".into());
    let r = Running::start(config(&target.url, Topology::default().queue(spec)))?;
    r.until_running(1, Duration::from_secs(10)).await?;
    let s = r.status();
    assert!(s.declaration_errors.is_empty(), "{s:?}");
    let mut diffs: Vec<(String, String, String)> = s.queue_differences[&queue]
        .iter()
        .map(|d| (d.argument.clone(), d.declared.clone(), d.existing.clone()))
        .collect();
    diffs.sort();
    let own = |a: &str, d: &str, e: &str| (a.to_owned(), d.to_owned(), e.to_owned());
    assert_eq!(
        diffs,
        vec![
            own("x-dead-letter-exchange", "it.nowhere", "none"),
            own("x-max-length", "none", "100"),
            own("x-message-ttl", "2000", "60000"),
        ]
    );
    let mut sub = subscribe(&r, &queue, 10);
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        b"as it is",
        lapin::BasicProperties::default(),
    )
    .await?;
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .context("consumed")?
        .context("subscription ended")?;
    assert_eq!(&d.body[..], b"as it is");
    d.acker.ack();
    let c = r.handle.consumer(&queue).unwrap();
    assert_eq!(c.subscribe_attempts, 1, "{c:?}");
    assert_eq!(c.last_error, None);
    assert_eq!(r.status().generation, 1, "nothing reconnects");
    r.stop().await?;
    delete_queue(&target.url, &queue).await?;
    Ok(())
}

each_version!(unknown_vhost_is_not_allowed -> Result<()>);
/// A vhost the user may not use (530 NOT_ALLOWED) is reported as
/// auth-failed with its own class.
async fn unknown_vhost_is_not_allowed(target: Shared) -> Result<()> {
    init_tracing();
    let url = format!(
        "amqp://guest:guest@{}/{}",
        target.addr,
        qname("no-such-vhost")
    );
    let r = Running::start(config(&url, Topology::default()))?;
    wait::until_true("auth-failed", Duration::from_secs(10), || {
        let s = r.status();
        async move { matches!(s.state, ConnectionState::AuthFailed { .. }) }
    })
    .await?;
    let s = r.status();
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.class),
        Some(FailureClass::NotAllowed),
        "{s:?}"
    );
    r.stop().await?;
    Ok(())
}
