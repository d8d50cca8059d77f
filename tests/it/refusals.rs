//! Outputs the broker will never take (no exchange, no write permission,
//! too large) are dead-lettered with the broker's reason, never spooled,
//! and never hold up what comes behind them: published straight away or
//! drained from the spool after an outage.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::ExchangeKind;
use warren::app::AppHandle;
use warren::dispatch::Placement;
use warren::message::OutboundMessage;
use warren_it::broker::{Broker, Got, unique};
use warren_it::proxy::{Mode, Proxy};
use warren_it::rabbit::RabbitNode;
use warren_it::wait;

use crate::outage::{config, shared_broker_behind_proxy};

/// An exchange bound to a queue with key `k`, both named from `prefix`.
async fn destination(broker: &Broker, prefix: &str) -> (String, String) {
    let (exchange, queue) = (
        unique(&format!("{prefix}-x")),
        unique(&format!("{prefix}-q")),
    );
    broker.declare_queue(&queue).await.unwrap();
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await
        .unwrap();
    broker.bind(&queue, &exchange, "k").await.unwrap();
    (exchange, queue)
}

/// Warren through `url` with an idle `echo` route (so it reports ready),
/// `amqp` and `spool` lines added to `[amqp]` and `[spool]`, and the
/// dead-letter queue `dlq` (exchange `<dlq>.x`). The plugins folder must
/// outlive the app.
async fn start_warren(
    url: &str,
    amqp: &str,
    spool: &str,
    dlq: &str,
) -> (warren::app::App, AppHandle, tempfile::TempDir) {
    let dir = crate::host::plugins_dir(&[("echo", "echo")]).unwrap();
    let mut cfg = config(
        url,
        (amqp, spool),
        dir.path(),
        &format!(
            "[plugin.echo]\nsubscriptions = [{{ queue = \"{}\" }}]",
            unique("refusals-idle")
        ),
    );
    cfg.dispatch.dead_letter_queue = dlq.to_owned();
    cfg.dispatch.dead_letter_exchange = format!("{dlq}.x");
    let (app, handle) = crate::host::start_ready(cfg).await.unwrap();
    (app, handle, dir)
}

/// Cut Warren off the broker, put `outputs` through its outbox (every one
/// must be spooled, in order), run `meanwhile`, then let the broker back.
async fn spool_during_cut(
    handle: &AppHandle,
    proxy: &Proxy,
    outputs: &[OutboundMessage],
    meanwhile: impl Future<Output = ()>,
) {
    proxy.set_mode(Mode::Refuse);
    wait::until_true("warren disconnected", Duration::from_secs(30), || {
        let connected = handle.amqp.status_now().is_connected();
        async move { !connected }
    })
    .await
    .unwrap();
    let outbox = handle.dispatcher.outbox();
    for m in outputs {
        assert_eq!(outbox.publish(m).await.unwrap(), Placement::Spool);
    }
    meanwhile.await;
    proxy.set_mode(Mode::Pass);
}

/// Wait until the spool is empty and return its status.
async fn drained(handle: &AppHandle) -> warren::buffer::SpoolStatus {
    wait::until_true("spool drained", Duration::from_secs(120), || {
        let h = handle.clone();
        async move { h.spool.status().await.depth == 0 }
    })
    .await
    .unwrap();
    handle.spool.status().await
}

/// The first copy of each body, in arrival order (later copies are
/// republishes of entries whose confirm a refusal's channel close lost).
fn first_copies(got: &[Got]) -> Vec<Vec<u8>> {
    let mut seen = BTreeSet::new();
    got.iter()
        .filter(|g| seen.insert(g.body.clone()))
        .map(|g| g.body.clone())
        .collect()
}

/// A refused output as the test expects its dead letter: its number, the
/// exchange it was published to, the broker's reply code.
type Refused = (Vec<u8>, String, i64);

/// The body (and id) of output `i`.
fn numbered(i: usize) -> Vec<u8> {
    format!("{i:06}").into_bytes()
}

/// Check what a drain through refusals delivered: `live` (every body, first
/// copies in order) in `live_queue`, and `refused` dead letters in `dlq`
/// naming `reply_code` and the exchange each was published to.
async fn assert_delivered_and_dead_lettered(
    broker: &Broker,
    (live_queue, live): (&str, &[Vec<u8>]),
    (dlq, refused): (&str, &[Refused]),
) {
    let want: BTreeSet<Vec<u8>> = live.iter().cloned().collect();
    let (got, missing) = broker
        .collect_until_complete(live_queue, &want, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(missing.is_empty(), "{} live outputs missing", missing.len());
    let firsts = first_copies(&got);
    if let Some(at) = firsts.iter().zip(live).position(|(a, b)| a != b) {
        let show = |v: &[Vec<u8>]| -> Vec<String> {
            v[at.saturating_sub(3)..(at + 5).min(v.len())]
                .iter()
                .map(|b| String::from_utf8_lossy(&b[..6.min(b.len())]).into_owned())
                .collect()
        };
        panic!(
            "live outputs out of order at {at}: got {:?}, want {:?}",
            show(&firsts),
            show(live)
        );
    }

    let want: BTreeSet<Vec<u8>> = refused.iter().map(|(id, ..)| id.clone()).collect();
    let dead = broker
        .collect(dlq, refused.len() * 2, Duration::from_secs(10))
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    for d in &dead {
        // A body the broker takes no body this large for comes without it;
        // its number is in the message id Warren gave it.
        let id = d.header_str("x-test-id").unwrap().into_bytes();
        let (_, exchange, code) = refused
            .iter()
            .find(|(i, ..)| *i == id)
            .unwrap_or_else(|| panic!("unexpected dead letter {d:?}"));
        assert_eq!(d.header_i64("x-warren-reply-code"), Some(*code), "{d:?}");
        assert_eq!(
            d.header_str("x-warren-original-exchange").as_deref(),
            Some(exchange.as_str())
        );
        let reason = d.header_str("x-warren-reason").unwrap();
        assert!(
            reason.contains(&code.to_string()) && reason.contains(exchange.as_str()),
            "{reason}"
        );
        seen.insert(id);
    }
    assert_eq!(seen, want, "every refused output dead-lettered");
    eprintln!(
        "refusals: {} live received ({} copies), {} dead letters ({} copies)",
        live.len(),
        got.len(),
        refused.len(),
        dead.len()
    );
}

/// An output numbered `i` for `exchange`, its number in a header too.
fn output(exchange: &str, i: usize, body_len: usize) -> OutboundMessage {
    let mut body = numbered(i);
    body.resize(body_len.max(body.len()), b'.');
    let mut m = OutboundMessage::new(exchange, "k", body);
    m.properties.set_header(
        "x-test-id",
        warren::message::HeaderValue::String(format!("{i:06}")),
    );
    m
}

/// 2,000 outputs spooled during a broker cut, to two destinations; one
/// destination's exchange is deleted before the broker comes back. The
/// live one gets its 1,000 in order, the other 1,000 are dead-lettered with
/// the broker's 404, and the spool ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_outputs_to_a_deleted_exchange_are_dead_lettered_and_the_rest_drain_in_order() {
    let (broker, proxy) = shared_broker_behind_proxy().await;
    let (live_x, live_q) = destination(&broker, "drain-live").await;
    let (doomed_x, doomed_q) = destination(&broker, "drain-doomed").await;
    let dlq = unique("refusals-dlq");
    let (app, handle, _plugins) = start_warren(
        &proxy.amqp_url(),
        "heartbeat-secs = 1\nconfirm-timeout-ms = 1000\nconnect-timeout-ms = 1000\nbackoff-max-ms = 200",
        "",
        &dlq,
    )
    .await;

    let outputs: Vec<OutboundMessage> = (0..2_000)
        .map(|i| output(if i % 2 == 0 { &live_x } else { &doomed_x }, i, 0))
        .collect();
    spool_during_cut(&handle, &proxy, &outputs, async {
        broker.delete_exchange(&doomed_x).await.unwrap();
    })
    .await;

    let live: Vec<Vec<u8>> = (0..2_000).step_by(2).map(numbered).collect();
    let refused: Vec<Refused> = (1..2_000)
        .step_by(2)
        .map(|i| (numbered(i), doomed_x.clone(), 404))
        .collect();
    assert_delivered_and_dead_lettered(&broker, (&live_q, &live), (&dlq, &refused)).await;
    let status = drained(&handle).await;
    assert_eq!(status.appended, 2_000, "{status:?}");
    assert!(status.drained >= 2_000, "{status:?}");
    assert_eq!(broker.message_count(&doomed_q).await.unwrap(), 0);

    app.shutdown().await;
    for q in [&live_q, &doomed_q, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
    broker.delete_exchange(&live_x).await.unwrap();
}

/// On a private node with a small `max_message_size` and a user that may
/// not write to one exchange: outputs to that exchange (403) and outputs
/// over the size (406) are dead-lettered, the over-size ones without their
/// body; both when sent straight away and when drained from the spool
/// after a cut, and the outputs between them drain in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_refused_for_permission_or_size_are_dead_lettered_live_and_from_the_spool() {
    let node = RabbitNode::start_with("max_message_size = 4096")
        .await
        .unwrap();
    node.ctl(&["add_user", "limited", "limited-pw"])
        .await
        .unwrap();
    node.ctl(&[
        "set_permissions",
        "-p",
        "/",
        "limited",
        ".*",
        r"^(?!it\.forbidden).*",
        ".*",
    ])
    .await
    .unwrap();
    let broker = Broker::connect(&node.amqp_url()).await.unwrap();
    let (live_x, live_q) = destination(&broker, "perm-live").await;
    let forbidden_x = unique("forbidden-x").replace("it.", "it.forbidden.");
    broker
        .declare_exchange(&forbidden_x, ExchangeKind::Direct)
        .await
        .unwrap();
    let proxy = Proxy::start(node.addr()).await.unwrap();
    let dlq = unique("perm-dlq");
    let (app, handle, _plugins) = start_warren(
        &format!("amqp://limited:limited-pw@{}/%2f", proxy.addr()),
        "heartbeat-secs = 1\nconfirm-timeout-ms = 2000\nconnect-timeout-ms = 1000\nbackoff-max-ms = 200",
        "",
        &dlq,
    )
    .await;

    // Straight away, with the broker up.
    let outbox = handle.dispatcher.outbox();
    let big = 8_000;
    for (m, want) in [
        (output(&live_x, 0, 0), Placement::Broker),
        (output(&forbidden_x, 1, 0), Placement::DeadLettered),
        (output(&live_x, 2, big), Placement::DeadLettered),
        (output(&live_x, 3, 0), Placement::Broker),
    ] {
        assert_eq!(outbox.publish(&m).await.unwrap(), want, "{}", m.exchange);
    }

    // Drained after a cut: one in four forbidden, one in four too large.
    let outputs: Vec<OutboundMessage> = (4..2_004)
        .map(|i| match i % 4 {
            0 => output(&forbidden_x, i, 0),
            1 => output(&live_x, i, big),
            _ => output(&live_x, i, 0),
        })
        .collect();
    spool_during_cut(&handle, &proxy, &outputs, async {}).await;

    let live: Vec<Vec<u8>> = (0..2_004)
        .filter(|i| *i == 0 || *i == 3 || (*i >= 4 && i % 4 >= 2))
        .map(numbered)
        .collect();
    let refused: Vec<Refused> = (0..2_004)
        .filter_map(|i| match i {
            1 => Some((numbered(i), forbidden_x.clone(), 403)),
            2 => Some((numbered(i), live_x.clone(), 406)),
            i if i >= 4 && i % 4 == 0 => Some((numbered(i), forbidden_x.clone(), 403)),
            i if i >= 4 && i % 4 == 1 => Some((numbered(i), live_x.clone(), 406)),
            _ => None,
        })
        .collect();
    // The live outputs carry numbered bodies; the over-size ones start with
    // their number too, but only their dead letter (bodiless) arrives.
    let live_bodies: Vec<Vec<u8>> = live.clone();
    assert_delivered_and_dead_lettered(&broker, (&live_q, &live_bodies), (&dlq, &refused)).await;
    let status = drained(&handle).await;
    assert_eq!(status.appended, 2_000, "{status:?}");

    app.shutdown().await;
}

/// The dead-letter exchange is replaced mid-session by one of another type
/// that routes nowhere (so Warren cannot declare its own again), and
/// refused spool entries cannot end: the drain stalls with the broker
/// connected. Warren stays ready but says so (a degraded reason with the
/// failure), and the drain resumes once the exchange is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_progress_is_reported_stalled() {
    let (broker, proxy) = shared_broker_behind_proxy().await;
    let dlq = unique("stalled-dlq");
    let (app, handle, _plugins) = start_warren(
        &proxy.amqp_url(),
        "heartbeat-secs = 2\nconfirm-timeout-ms = 1000",
        "drain-stalled-after-ms = 1000",
        &dlq,
    )
    .await;
    let dlx = format!("{dlq}.x");
    broker.delete_exchange(&dlx).await.unwrap();
    broker
        .declare_exchange(&dlx, ExchangeKind::Direct)
        .await
        .unwrap();
    let missing = unique("stalled-missing-x");
    for i in 0..10 {
        handle.spool.append(output(&missing, i, 0)).await.unwrap();
    }
    let stalled = wait::until("drain reported stalled", Duration::from_secs(30), || {
        let r = handle.readiness();
        async move {
            r.degraded
                .iter()
                .find(|d| d.contains("stalled"))
                .cloned()
                .map(|d| (r.ready, d))
        }
    })
    .await
    .unwrap();
    assert!(stalled.0, "a stalled drain keeps Warren ready");
    assert!(
        stalled.1.contains("dead letter was refused too"),
        "{}",
        stalled.1
    );
    assert!(stalled.1.contains("10 entries"), "{}", stalled.1);
    let metrics = warren_it::http::request(app.admin_addr(), "GET", "/metrics", &[], None)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("warren_spool_drain_stalled 1"),
        "{metrics}"
    );

    broker.delete_exchange(&dlx).await.unwrap();
    broker
        .declare_exchange(&dlx, ExchangeKind::Fanout)
        .await
        .unwrap();
    broker.bind(&dlq, &dlx, "").await.unwrap();
    let dead = broker
        .collect(&dlq, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(dead.len(), 10);
    drained(&handle).await;
    assert!(
        !handle
            .readiness()
            .degraded
            .iter()
            .any(|d| d.contains("stalled")),
        "{:?}",
        handle.readiness()
    );
    app.shutdown().await;
    broker.delete_queue(&dlq).await.unwrap();
    broker.delete_exchange(&dlx).await.unwrap();
}
