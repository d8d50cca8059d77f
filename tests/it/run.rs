//! `warren run` in-process: plugins directory in, acknowledged deliveries
//! and confirmed outputs out, against the shared RabbitMQ and Redis.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use warren_it::rabbit::Shared;

use crate::host::{plugins_dir, plugins_dir_of};
use warren::app::{App, AppHandle};
use warren::config::Config;
use warren_it::broker::{Broker, Got, unique};
use warren_it::config::{WarrenToml, echo_section};
use warren_it::plugins::{Lang, js_wasm, polyglot_wasm, python_wasm, wasm};

/// Test-friendly settings: unique retry/dead-letter names and spool
/// stream, short delays. `extra` is TOML merged in.
fn config(target: &Shared, dir: &Path, dlq: &str, extra: &str) -> Config {
    crate::host::parse(
        &WarrenToml::isolated(dir)
            .amqp_url(&target.url)
            .set("amqp.heartbeat-secs", 2)
            .set("amqp.backoff-max-ms", 1000)
            .quick_retries(3)
            .dead_letters(&unique("dlx"), dlq)
            .grace_period_ms(10_000)
            .admin_bind("127.0.0.1:0")
            .merge(extra),
    )
}

async fn start(config: Config) -> (App, AppHandle) {
    crate::host::start_ready(config).await.unwrap()
}

fn ids(got: &[Got]) -> BTreeSet<String> {
    got.iter()
        .map(|g| String::from_utf8(g.body.clone()).unwrap())
        .collect()
}

each_version!(ten_thousand_messages_through_router_and_echo);
async fn ten_thousand_messages_through_router_and_echo(target: Shared) {
    let (echo, router) = (wasm("echo").unwrap(), wasm("router").unwrap());
    messages_through_router_and_echo(target, echo, router, 5_000, 200).await
}

each_version!(a_thousand_messages_through_the_python_router_and_the_js_echo);
async fn a_thousand_messages_through_the_python_router_and_the_js_echo(target: Shared) {
    let (echo, router) = (js_wasm("echo").unwrap(), python_wasm("router").unwrap());
    messages_through_router_and_echo(target, echo, router, 1_000, 100).await
}

/// `n` messages through each of the `echo` and `router` builds given, with
/// `prefetch`: every output received, every input acknowledged, nothing
/// dead-lettered.
async fn messages_through_router_and_echo(
    target: Shared,
    echo: PathBuf,
    router: PathBuf,
    n: usize,
    prefetch: u16,
) {
    let broker = Broker::connect(&target.url).await.unwrap();
    let (echo_in, echo_out, router_in, routed) = (
        unique("echo-in"),
        unique("echo-out"),
        unique("router-in"),
        unique("routed"),
    );
    let region = uuid_region();
    // Its own exchange: outputs to `orders.routed` on the shared broker
    // would also fill the quickstart's catch-all queue.
    let exchange = unique("routed-x");
    broker.declare_queue(&echo_out).await.unwrap();
    broker
        .declare_routed(&routed, &exchange, &region)
        .await
        .unwrap();
    let dir = plugins_dir_of(&[("echo", echo), ("router", router)]).unwrap();
    let dlq = unique("dlq");
    let cfg = config(
        &target,
        dir.path(),
        &dlq,
        &format!(
            r#"
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}", prefetch = {prefetch} }}]
            config = {{ routing-key = "{echo_out}" }}
            [plugin.router]
            subscriptions = [{{ queue = "{router_in}", prefetch = {prefetch} }}]
            config = {{ exchange = "{exchange}" }}
            "#
        ),
    );
    let (app, _handle) = start(cfg).await;

    let echo_bodies: Vec<String> = (0..n).map(|i| format!("echo-{i}")).collect();
    let orders: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"id":{i},"region":"{region}"}}"#))
        .collect();
    let (a, b) = tokio::join!(
        broker.publish_all("", &echo_in, &echo_bodies),
        broker.publish_all("", &router_in, &orders),
    );
    a.unwrap();
    b.unwrap();

    let (echoed, routed_msgs) = tokio::join!(
        broker.collect(&echo_out, n, Duration::from_secs(120)),
        broker.collect(&routed, n, Duration::from_secs(120)),
    );
    let (echoed, routed_msgs) = (echoed.unwrap(), routed_msgs.unwrap());
    assert_eq!(echoed.len(), n, "echo outputs");
    assert_eq!(routed_msgs.len(), n, "router outputs");
    assert_eq!(ids(&echoed), echo_bodies.iter().cloned().collect());
    assert_eq!(ids(&routed_msgs), orders.iter().cloned().collect());
    assert!(
        routed_msgs
            .iter()
            .all(|g| g.routing_key == format!("orders.{region}"))
    );

    app.shutdown().await;
    // Nothing left unacked: after the consumers are gone, unacked messages
    // would be back in the queues.
    assert_eq!(broker.message_count(&echo_in).await.unwrap(), 0);
    assert_eq!(broker.message_count(&router_in).await.unwrap(), 0);
    assert_eq!(
        broker.message_count(&dlq).await.unwrap(),
        0,
        "nothing dead-lettered"
    );
    for q in [&echo_in, &echo_out, &router_in, &routed, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}

fn uuid_region() -> String {
    unique("r").replace('.', "-")
}

each_version!(poison_messages_end_in_the_dead_letter_queue_and_the_rest_keeps_flowing);
async fn poison_messages_end_in_the_dead_letter_queue_and_the_rest_keeps_flowing(target: Shared) {
    let broker = Broker::connect(&target.url).await.unwrap();
    let q = |p: &str| unique(p);
    let (panic_in, spin_in, flaky_in, echo_in, echo_out) = (
        q("panic"),
        q("spin"),
        q("flaky"),
        q("echo-in"),
        q("echo-out"),
    );
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = plugins_dir(&[
        ("panic", "panic"),
        ("spin-loop", "spin-loop"),
        ("flaky", "flaky"),
        ("echo", "echo"),
    ])
    .unwrap();
    let dlq = unique("dlq");
    let cfg = config(
        &target,
        dir.path(),
        &dlq,
        &format!(
            r#"
            [plugin.panic]
            subscriptions = [{{ queue = "{panic_in}" }}]
            [plugin.spin-loop]
            subscriptions = [{{ queue = "{spin_in}" }}]
            limits = {{ deadline-ms = 200 }}
            [plugin.flaky]
            subscriptions = [{{ queue = "{flaky_in}" }}]
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}" }}]
            config = {{ routing-key = "{echo_out}" }}
            "#
        ),
    );
    let (app, _handle) = start(cfg).await;

    broker
        .publish_all("", &panic_in, ["poison-1"])
        .await
        .unwrap();
    broker
        .publish_all("", &spin_in, ["poison-2"])
        .await
        .unwrap();
    broker
        .publish_all("", &flaky_in, ["poison-3"])
        .await
        .unwrap();
    let bodies: Vec<String> = (0..100).map(|i| format!("ok-{i}")).collect();
    broker.publish_all("", &echo_in, &bodies).await.unwrap();

    let echoed = broker
        .collect(&echo_out, 100, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(echoed.len(), 100, "healthy messages keep flowing");

    let dead = broker
        .collect(&dlq, 3, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let by_body = |b: &str| {
        dead.iter()
            .find(|g| g.body == b.as_bytes())
            .unwrap_or_else(|| panic!("{b} not dead-lettered"))
    };

    let p = by_body("poison-1");
    assert_eq!(p.header_str("x-warren-plugin").as_deref(), Some("panic"));
    assert_eq!(p.header_str("x-warren-version").as_deref(), Some("0.1.0"));
    assert_eq!(p.header_str("x-warren-outcome").as_deref(), Some("trap"));
    assert_eq!(p.header_str("x-warren-trap").as_deref(), Some("panic"));
    assert!(
        p.header_str("x-warren-reason")
            .unwrap()
            .contains("boom: poison-1")
    );
    assert_eq!(p.header_i64("x-warren-attempts"), Some(1));
    assert_eq!(
        p.header_str("x-warren-queue").as_deref(),
        Some(panic_in.as_str())
    );

    let s = by_body("poison-2");
    assert_eq!(
        s.header_str("x-warren-plugin").as_deref(),
        Some("spin-loop")
    );
    assert_eq!(s.header_str("x-warren-trap").as_deref(), Some("deadline"));

    let f = by_body("poison-3");
    assert_eq!(f.header_str("x-warren-plugin").as_deref(), Some("flaky"));
    assert_eq!(
        f.header_str("x-warren-outcome").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(
        f.header_i64("x-warren-attempts"),
        Some(3),
        "configured attempts"
    );
    assert!(
        f.header_str("x-warren-reason")
            .unwrap()
            .contains("attempt 3")
    );

    app.shutdown().await;
    for q in [&panic_in, &spin_in, &flaky_in, &echo_in] {
        assert_eq!(broker.message_count(q).await.unwrap(), 0, "{q} drained");
    }
}

each_version!(a_broken_plugin_file_is_reported_and_the_good_ones_run);
async fn a_broken_plugin_file_is_reported_and_the_good_ones_run(target: Shared) {
    let broker = Broker::connect(&target.url).await.unwrap();
    let (echo_in, echo_out) = (unique("echo-in"), unique("echo-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = plugins_dir(&[("echo", "echo")]).unwrap();
    std::fs::write(dir.path().join("broken.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
    let dlq = unique("dlq");
    let cfg = config(
        &target,
        dir.path(),
        &dlq,
        &echo_section(&echo_in, &echo_out),
    );
    let (app, handle) = start(cfg).await;
    let failed = handle.failed_plugins();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].file.ends_with("broken.wasm"));
    assert!(
        failed[0].error.contains("invalid component"),
        "{}",
        failed[0].error
    );

    let got = broker
        .publish_and_collect_one(&echo_in, "hello", &echo_out, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"hello");
    app.shutdown().await;
}

/// The `fixture` plugin of `lang` under `warren run`: `Retry` is
/// redelivered and succeeds on attempt 2; an exception is dead-lettered as
/// a trap whose reason is its one-line summary (`exception`, e.g.
/// `ValueError`).
async fn retry_is_redelivered_and_an_exception_dead_lettered(target: Shared, lang: Lang) {
    let broker = Broker::connect(&target.url).await.unwrap();
    let (fixture_in, out) = (unique("fixture-in"), unique("fixture-out"));
    broker.declare_queue(&out).await.unwrap();
    let dir = plugins_dir_of(&[("fixture", polyglot_wasm(lang, "fixture").unwrap())]).unwrap();
    let dlq = unique("dlq");
    let cfg = config(
        &target,
        dir.path(),
        &dlq,
        &format!(
            r#"
            [plugin.fixture]
            subscriptions = [{{ queue = "{fixture_in}" }}]
            config = {{ fail-attempts = "1", routing-key = "{out}" }}
            "#
        ),
    );
    let (app, _handle) = start(cfg).await;
    broker
        .publish_all("", &fixture_in, ["flaky:order-1", "panic:order-2"])
        .await
        .unwrap();
    let (done, dead) = tokio::join!(
        broker.collect(&out, 1, Duration::from_secs(60)),
        broker.collect(&dlq, 1, Duration::from_secs(60)),
    );
    let (done, dead) = (done.unwrap(), dead.unwrap());
    assert_eq!(done[0].body, b"flaky:order-1");
    assert_eq!(
        done[0].header_i64("x-fixture-attempt"),
        Some(2),
        "Retry(\"db busy\") was delivered again as attempt 2"
    );
    assert_eq!(dead[0].body, b"panic:order-2");
    assert_eq!(
        dead[0].header_str("x-warren-trap").as_deref(),
        Some("panic")
    );
    let exception = match lang {
        Lang::Python => "ValueError",
        Lang::Js => "TypeError",
    };
    assert_eq!(
        dead[0].header_str("x-warren-reason").as_deref(),
        Some(format!("guest panicked: {exception}: boom: panic:order-2").as_str())
    );
    assert_eq!(dead[0].header_i64("x-warren-attempts"), Some(1));
    app.shutdown().await;
    assert_eq!(broker.message_count(&fixture_in).await.unwrap(), 0);
    for q in [&fixture_in, &out, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}

each_version!(python_retry_is_redelivered_and_an_exception_dead_lettered);
async fn python_retry_is_redelivered_and_an_exception_dead_lettered(target: Shared) {
    retry_is_redelivered_and_an_exception_dead_lettered(target, Lang::Python).await
}

each_version!(js_retry_is_redelivered_and_an_exception_dead_lettered);
async fn js_retry_is_redelivered_and_an_exception_dead_lettered(target: Shared) {
    retry_is_redelivered_and_an_exception_dead_lettered(target, Lang::Js).await
}
