//! Failures that retrying cannot fix: no hot loop, a clear report.

use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use warren::amqp::{ConnectionState, FailureClass};
use warren_it::proxy::Proxy;
use warren_it::wait;

use super::*;

/// A wrong password: the state says auth-failed, and over 10 s the number
/// of connection attempts stays within what the capped backoff allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_auth_failed_without_hot_loop() -> Result<()> {
    init_tracing();
    let proxy = Proxy::start(shared_addr()).await?;
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

/// The queue exists with other arguments (406): the error names the queue
/// and the argument, the connection stays up, and the subscription retries
/// slowly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_queue_arguments_are_reported_without_hot_loop() -> Result<()> {
    init_tracing();
    let queue = qname("conflict");
    let (_conn, ch) = plain(SHARED_URL).await?;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(1000));
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
    let mut c = config(SHARED_URL, Topology::default().queue(spec));
    c.backoff.max = Duration::from_secs(2);
    let r = Running::start(c)?;
    r.until_running(1, Duration::from_secs(10)).await?;
    let s = r.status();
    assert!(
        s.declaration_errors
            .iter()
            .any(|e| e.contains(&queue) && e.contains("x-message-ttl")),
        "{s:?}"
    );
    let _sub = subscribe(&r, &queue, 10);
    wait::until_true(
        "subscription failed with a clear error",
        Duration::from_secs(5),
        || {
            let ok = r
                .handle
                .consumer(&queue)
                .and_then(|c| c.last_error)
                .is_some_and(|e| {
                    e.contains(&format!("queue '{queue}'")) && e.contains("x-message-ttl")
                });
            async move { ok }
        },
    )
    .await?;
    let c = r.handle.consumer(&queue).unwrap();
    assert_eq!(c.last_error_class, Some(FailureClass::PreconditionFailed));
    let attempts0 = c.subscribe_attempts;
    let t0 = Instant::now();
    let _ = wait::until_true("5 s of observation", Duration::from_secs(5), || async {
        false
    })
    .await;
    let attempts = r.handle.consumer(&queue).unwrap().subscribe_attempts - attempts0;
    let allowed = t0.elapsed().as_secs_f64().ceil() as u64 + 1;
    eprintln!("{attempts} subscribe attempts in {:?}", t0.elapsed());
    assert!(attempts <= allowed, "{attempts} attempts > {allowed}");
    assert_eq!(r.status().generation, 1, "a 406 does not reconnect");
    assert!(r.status().is_running());
    r.stop().await?;
    delete_queue(SHARED_URL, &queue).await?;
    Ok(())
}

/// A vhost the user may not use (530 NOT_ALLOWED) is reported as
/// auth-failed with its own class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhost_is_not_allowed() -> Result<()> {
    init_tracing();
    let url = format!(
        "amqp://guest:guest@{SHARED_ADDR}/{}",
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
