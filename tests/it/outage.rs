//! Outputs during a broker outage: they go to the spool, and the drainer
//! moves them to the broker, in order, once it is back.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use warren_it::rabbit::Shared;

use warren::config::Config;
use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::proxy::{Mode, Proxy};
use warren_it::wait;

/// Tracing, the shared broker, and a fault proxy in front of it.
pub(crate) async fn shared_broker_behind_proxy() -> (Broker, Proxy) {
    let target = warren_it::rabbit::shared(warren_it::rabbit::Version::V3_10)
        .await
        .unwrap();
    broker_behind_proxy(&target).await
}

/// The shared broker of `target`'s version, and a fault proxy in front of it.
pub(crate) async fn broker_behind_proxy(target: &Shared) -> (Broker, Proxy) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let broker = Broker::connect(&target.url).await.unwrap();
    (broker, Proxy::start(target.addr).await.unwrap())
}

/// Warren connecting to `url` (through a proxy) with the plugins in `dir`,
/// its own spool stream and dead-letter names, `amqp` and `spool` lines
/// added to `[amqp]` and `[spool]`, and `rest` (the plugin sections)
/// merged in.
pub(crate) fn config(url: &str, amqp_spool: (&str, &str), dir: &Path, rest: &str) -> Config {
    crate::host::parse(&toml(url, amqp_spool, dir).merge(rest))
}

/// [`config`]'s file without the plugin sections.
pub(crate) fn toml(url: &str, (amqp, spool): (&str, &str), dir: &Path) -> WarrenToml {
    WarrenToml::isolated(dir)
        .amqp_url(url)
        .merge(&format!("[amqp]\n{amqp}"))
        .admin_bind("127.0.0.1:0")
        .merge(&format!("[spool]\n{spool}"))
        .dead_letters(&unique("dlx"), &unique("dlq"))
}

each_version!(broker_outage_under_load_spools_outputs_and_drains_them_in_order);
async fn broker_outage_under_load_spools_outputs_and_drains_them_in_order(target: Shared) {
    let (broker, proxy) = broker_behind_proxy(&target).await;
    let (echo_in, echo_out) = (unique("outage-in"), unique("outage-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo").unwrap(), dir.path().join("echo.wasm")).unwrap();
    let config = config(
        &proxy.amqp_url(),
        (
            "heartbeat-secs = 1\nconfirm-timeout-ms = 500\nconnect-timeout-ms = 1000\nbackoff-max-ms = 500",
            "",
        ),
        dir.path(),
        &format!(
            r#"
            [shutdown]
            grace-period-ms = 10000
            [plugin.echo]
            # One at a time, so outputs are produced (and spooled) in input order.
            limits = {{ max-concurrency = 1 }}
            subscriptions = [{{ queue = "{echo_in}", prefetch = 500 }}]
            config = {{ routing-key = "{echo_out}" }}
            "#
        ),
    );
    let (app, handle) = crate::host::start_ready(config).await.unwrap();

    let n = 3_000;
    let bodies: Vec<String> = (0..n).map(|i| format!("{i:06}")).collect();
    broker.publish_all("", &echo_in, &bodies).await.unwrap();
    // Let it work a little, then cut the broker off for several heartbeats.
    wait::until_true("first outputs", Duration::from_secs(30), || {
        let b = &broker;
        let q = &echo_out;
        async move { b.message_count(q).await.unwrap_or(0) >= 200 }
    })
    .await
    .unwrap();
    proxy.set_mode(Mode::Blackhole);
    wait::until_true("outputs spooled", Duration::from_secs(30), || {
        let h = handle.clone();
        async move { h.spool.status().await.appended >= 20 }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself
    proxy.set_mode(Mode::Pass);

    let want: BTreeSet<Vec<u8>> = bodies.iter().map(|b| b.clone().into_bytes()).collect();
    let (got, missing) = broker
        .collect_until_complete(&echo_out, &want, Duration::from_secs(180))
        .await
        .unwrap();
    assert!(missing.is_empty(), "{} outputs missing", missing.len());
    wait::until_true("spool drained", Duration::from_secs(60), || {
        let h = handle.clone();
        async move { h.spool.status().await.depth == 0 }
    })
    .await
    .unwrap();
    let status = handle.spool.status().await;
    assert!(status.appended >= 20, "{status:?}");
    assert!(status.drained >= status.appended, "{status:?}");

    // Spooled outputs carry the spool's message id. Outputs that first
    // arrived through the spool arrive in the order they were produced
    // (later copies are redeliveries of inputs whose ack was lost).
    let mut first = BTreeSet::new();
    let spooled: Vec<usize> = got
        .iter()
        .filter_map(|g| {
            let s = String::from_utf8(g.body.clone()).unwrap();
            let is_first = first.insert(s.clone());
            (is_first && g.properties.message_id().is_some()).then(|| s.parse::<usize>().unwrap())
        })
        .collect();
    assert!(!spooled.is_empty(), "no output went through the spool");
    assert!(
        spooled.windows(2).all(|w| w[0] < w[1]),
        "spooled outputs out of order: {:?}",
        &spooled[..spooled.len().min(50)]
    );
    eprintln!(
        "outage: {} outputs received for {n} inputs ({} duplicates), {} via the spool",
        got.len(),
        got.len() - n,
        status.appended
    );

    app.shutdown().await;
    assert_eq!(
        broker.message_count(&echo_in).await.unwrap(),
        0,
        "every input acked"
    );
}

each_version!(a_slow_broker_drains_the_spool_without_republishing);
/// A slow broker is not a failed one. Through a throttled link a full drain
/// window takes several stall timeouts to confirm; the drainer must keep
/// waiting while confirms keep arriving, not give up on the tail of the
/// window and republish it (in CI that livelocked: ~1,000 duplicates per
/// pass, a few entries of progress, the backlog never drained).
async fn a_slow_broker_drains_the_spool_without_republishing(target: Shared) {
    let (broker, proxy) = broker_behind_proxy(&target).await;
    let sink = unique("slow-sink");
    broker.declare_queue(&sink).await.unwrap();
    let dir = crate::host::plugins_dir(&[("echo", "echo")]).unwrap();
    let config = config(
        &proxy.amqp_url(),
        // A stall timeout far below the time a full window takes to confirm:
        // waiting must hinge on progress, not on age.
        (
            "heartbeat-secs = 2\nconfirm-timeout-ms = 1000",
            "drain-stall-timeout-ms = 1000",
        ),
        dir.path(),
        &format!(
            "[plugin.echo]\nsubscriptions = [{{ queue = \"{}\" }}]",
            unique("slow-idle")
        ),
    );
    let (app, handle) = crate::host::start_ready(config).await.unwrap();

    // ~450 bytes a message on the wire: about 220 messages a second, so
    // the last of a 1,024-message window is confirmed ~4.5 s after it was
    // sent, four times the stall timeout.
    proxy.set_mode(Mode::Throttle(100_000));
    spool_and_drain_exactly_once(&broker, &handle, &sink, 1_500, "slow broker").await;
    app.shutdown().await;
}

each_version!(a_pausing_broker_is_waited_for_without_republishing);
/// A broker that pauses for longer than the confirm timeout, again and
/// again, while the spool drains (its disk stalls an fsync, a GC, a starved
/// CPU): nothing is lost on the link, every confirm comes, late. With the
/// default stall timeout the drainer waits each pause out: no failed pass,
/// nothing published twice. (A stall timeout at the confirm timeout made a
/// pass fail at each pause and republish the window in flight.)
async fn a_pausing_broker_is_waited_for_without_republishing(target: Shared) {
    let (broker, proxy) = broker_behind_proxy(&target).await;
    let sink = unique("pausing-sink");
    broker.declare_queue(&sink).await.unwrap();
    let dir = crate::host::plugins_dir(&[("echo", "echo")]).unwrap();
    let config = config(
        &proxy.amqp_url(),
        ("heartbeat-secs = 2\nconfirm-timeout-ms = 1000", ""),
        dir.path(),
        &format!(
            "[plugin.echo]\nsubscriptions = [{{ queue = \"{}\" }}]",
            unique("pausing-idle")
        ),
    );
    let (app, handle) = crate::host::start_ready(config).await.unwrap();

    // Throttled to ~440 messages a second so the drain spans several
    // pauses of 1.5 s (under the 4 s heartbeat deadline, over the 1 s
    // confirm timeout).
    let proxy = std::sync::Arc::new(proxy);
    proxy.set_mode(Mode::Throttle(200_000));
    let stop = tokio_util::sync::CancellationToken::new();
    let pauses = tokio::spawn({
        let (proxy, stop) = (proxy.clone(), stop.clone());
        async move {
            let mut pauses = 0;
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxy.set_mode(Mode::Hold);
                pauses += 1;
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                proxy.set_mode(Mode::Throttle(200_000));
            }
            pauses
        }
    });
    let status =
        spool_and_drain_exactly_once(&broker, &handle, &sink, 3_000, "pausing broker").await;
    stop.cancel();
    let pauses = pauses.await.unwrap();
    assert!(pauses >= 2, "only {pauses} pauses during the drain");
    assert_eq!(
        (status.drain.pauses, status.drain.republished),
        (0, 3_000),
        "no failed pass, nothing republished: {:?}",
        status.drain
    );
    app.shutdown().await;
}

/// Append `n` numbered messages for `sink` to the spool (one at a time, so
/// stream order is body order), wait until the drainer has moved them all,
/// and check that each was published exactly once, in order.
async fn spool_and_drain_exactly_once(
    broker: &Broker,
    handle: &warren::app::AppHandle,
    sink: &str,
    n: usize,
    what: &str,
) -> warren::buffer::SpoolStatus {
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("{i:06}{}", "x".repeat(194)).into_bytes())
        .collect();
    for body in &bodies {
        let msg = warren::message::OutboundMessage::new("", sink, body.clone());
        handle
            .spool
            .append(msg)
            .await
            .expect("the spool takes every append");
    }
    let want: BTreeSet<Vec<u8>> = bodies.iter().cloned().collect();
    let (got, missing) = broker
        .collect_until_complete(sink, &want, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        missing.is_empty(),
        "{what}: {} spooled messages missing",
        missing.len()
    );
    wait::until_true("spool drained", Duration::from_secs(60), || {
        let h = handle.clone();
        async move { h.spool.status().await.depth == 0 }
    })
    .await
    .unwrap();
    let left = broker.message_count(sink).await.unwrap();
    let status = handle.spool.status().await;
    eprintln!(
        "{what}: {} received for {n} spooled, {left} more left in the queue, drained {}, {:?}",
        got.len(),
        status.drained,
        status.drain
    );
    assert_eq!(
        (got.len() as u64 + u64::from(left), status.drained),
        (n as u64, n as u64),
        "{what}: every spooled message published exactly once"
    );
    assert!(
        got.windows(2).all(|w| w[0].body < w[1].body),
        "{what}: drained out of order"
    );
    status
}
