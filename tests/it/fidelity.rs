//! What is inside a message survives Warren: every AMQP basic property and
//! a header of every field type, published by a client that is not
//! Warren's (the harness's plain lapin), forwarded by `echo`, straight
//! away and through the spool; and kept on retry copies and dead letters,
//! which add only `x-warren-*` headers.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use warren_it::broker::{Broker, Got, unique};
use warren_it::config::echo_section;

use crate::admin::{config, plugins_dir};

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(k), v);
    }
    t
}

/// One header per AMQP field type, nested tables three deep, an array of
/// tables; and every basic property.
fn everything() -> BasicProperties {
    let headers = table(vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(200)),
        ("i16", AMQPValue::ShortInt(-1600)),
        ("u16", AMQPValue::ShortUInt(60000)),
        ("i32", AMQPValue::LongInt(-320_000)),
        ("u32", AMQPValue::LongUInt(4_000_000_000)),
        ("i64", AMQPValue::LongLongInt(-6_400_000_000)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(2.25)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 1,
                value: 15,
            }),
        ),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        ("void", AMQPValue::Void),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 255])),
        ),
        ("long-string", long("héllo")),
        (
            "binary-string",
            AMQPValue::LongString(LongString::from(vec![0xffu8, 0xfe, 0])),
        ),
        (
            "nested",
            AMQPValue::FieldTable(table(vec![
                ("a", AMQPValue::LongLongInt(1)),
                (
                    "b",
                    AMQPValue::FieldTable(table(vec![(
                        "c",
                        AMQPValue::FieldTable(table(vec![("d", long("deep"))])),
                    )])),
                ),
            ])),
        ),
        (
            "tables",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::FieldTable(table(vec![("x", AMQPValue::LongInt(1))])),
                AMQPValue::FieldTable(table(vec![("y", long("two"))])),
                AMQPValue::LongInt(3),
            ])),
        ),
    ]);
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(1)
        .with_priority(7)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_001)
        .with_type("order.created".into())
        // RabbitMQ refuses a user id that is not the connection's user.
        .with_user_id("guest".into())
        .with_app_id("shop".into())
}

/// Publish [`everything`] with [`body`] to `queue`, as a client that is not
/// Warren's would.
async fn publish_everything(broker: &Broker, queue: &str) {
    broker
        .publish_with_properties("", queue, &body(), everything())
        .await
        .unwrap();
}

/// Collect the one message `queue` gets.
async fn the_one(broker: &Broker, queue: &str) -> Got {
    let mut got = broker
        .collect(queue, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "one message in {queue}");
    got.remove(0)
}

/// Every byte value, and a zero byte at either end.
fn body() -> Vec<u8> {
    let mut b: Vec<u8> = (0..=255).collect();
    b.extend((0..=255).rev());
    b
}

/// `got`'s headers without those Warren adds: `traceparent` and `x-warren-*`
/// (returned apart).
fn split_headers(got: &Got) -> (FieldTable, FieldTable) {
    let (mut theirs, mut warrens) = (FieldTable::default(), FieldTable::default());
    for (k, v) in got.headers.inner() {
        if k.as_str() == "traceparent" || k.as_str().starts_with("x-warren-") {
            warrens.insert(k.clone(), v.clone());
        } else {
            theirs.insert(k.clone(), v.clone());
        }
    }
    (theirs, warrens)
}

/// `got` is `sent` field by field: every property, every header but
/// Warren's own, and the body byte for byte. `expiration_moved`: a dead
/// letter keeps its expiration in `x-warren-original-expiration` instead.
fn assert_same(got: &Got, sent: &BasicProperties, expiration_moved: bool) {
    assert_eq!(got.body, body(), "body byte for byte");
    let (theirs, warrens) = split_headers(got);
    assert_eq!(Some(&theirs), sent.headers().as_ref(), "headers");
    let p = &got.properties;
    assert_eq!(p.content_type(), sent.content_type());
    assert_eq!(p.content_encoding(), sent.content_encoding());
    assert_eq!(p.delivery_mode(), sent.delivery_mode());
    assert_eq!(p.priority(), sent.priority());
    assert_eq!(p.correlation_id(), sent.correlation_id());
    assert_eq!(p.reply_to(), sent.reply_to());
    assert_eq!(p.message_id(), sent.message_id());
    assert_eq!(p.timestamp(), sent.timestamp());
    assert_eq!(p.kind(), sent.kind());
    assert_eq!(p.user_id(), sent.user_id());
    assert_eq!(p.app_id(), sent.app_id());
    if expiration_moved {
        assert_eq!(p.expiration(), &None);
        assert_eq!(
            warrens.inner().get("x-warren-original-expiration"),
            Some(&long("600000"))
        );
    } else {
        assert_eq!(p.expiration(), sent.expiration());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_forwards_every_property_and_field_type_straight_and_through_the_spool() {
    let (broker, proxy) = crate::outage::shared_broker_behind_proxy().await;
    let (input, output) = (unique("fidelity-in"), unique("fidelity-out"));
    broker.declare_queue(&output).await.unwrap();
    let dir = plugins_dir(&[("echo", "echo")]);
    let dlq = unique("fidelity-dlq");
    let mut cfg = config(dir.path(), &dlq, &echo_section(&input, &output));
    cfg.amqp.url = proxy.amqp_url();
    let (app, handle) = crate::host::start_ready(cfg).await.unwrap();
    let sent = everything();

    publish_everything(&broker, &input).await;
    assert_same(&the_one(&broker, &output).await, &sent, false);

    // Through the spool: with the drainer paused and an entry ahead of it,
    // the output is appended; then the link is cut, and the output drains
    // once the broker is back.
    handle.drainer.pause();
    let ahead = warren::message::OutboundMessage::new("", output.clone(), "ahead");
    handle.spool.append(ahead).await.unwrap();
    publish_everything(&broker, &input).await;
    warren_it::wait::until_true("output spooled", Duration::from_secs(30), || {
        let h = handle.clone();
        async move { h.spool.status().await.depth == 2 }
    })
    .await
    .unwrap();
    proxy.set_mode(warren_it::proxy::Mode::Refuse);
    warren_it::wait::until_true("link cut", Duration::from_secs(30), || {
        let connected = handle.amqp.status_now().is_connected();
        async move { !connected }
    })
    .await
    .unwrap();
    handle.drainer.resume();
    proxy.set_mode(warren_it::proxy::Mode::Pass);
    let got = broker
        .collect(&output, 2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].body, b"ahead");
    assert_same(&got[1], &sent, false);

    app.shutdown().await;
    for q in [&input, &output, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}

/// `flaky` retries once and then forwards what it was given: the retry
/// copy came back with the original properties (and Warren's attempt
/// headers). With no success in two attempts, the dead letter keeps them
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copies_and_dead_letters_keep_every_property_and_header() {
    let broker = Broker::shared().await.unwrap();
    let (retried_in, retried_out, dead_in) = (
        unique("fidelity-retry-in"),
        unique("fidelity-retry-out"),
        unique("fidelity-dead-in"),
    );
    broker.declare_queue(&retried_out).await.unwrap();
    // One plugin on two queues: the second allows one attempt only, so
    // its retry is a dead letter at once.
    let dir = plugins_dir(&[("flaky", "flaky")]);
    let dlq = unique("fidelity-dlq");
    let (app, _handle) = crate::host::start_ready(config(
        dir.path(),
        &dlq,
        &format!(
            r#"
            [plugin.flaky]
            subscriptions = [{{ queue = "{retried_in}" }}, {{ queue = "{dead_in}", max-attempts = 1 }}]
            config = {{ fail-attempts = "1", routing-key = "{retried_out}" }}
            "#
        ),
    ))
    .await
    .unwrap();
    let sent = everything();
    publish_everything(&broker, &retried_in).await;
    publish_everything(&broker, &dead_in).await;

    let retried = the_one(&broker, &retried_out).await;
    assert_same(&retried, &sent, false);
    assert_eq!(retried.header_i64("x-warren-attempt"), Some(2));

    let dead = the_one(&broker, &dlq).await;
    assert_same(&dead, &sent, true);
    assert_eq!(
        dead.header_str("x-warren-outcome").as_deref(),
        Some("retries-exhausted")
    );

    app.shutdown().await;
    for q in [&retried_in, &retried_out, &dead_in, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}

/// A spool entry written by the format before this one (no byte-array
/// header type; the same JSON otherwise) still drains, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_entry_in_the_previous_format_drains() {
    let broker = Broker::shared().await.unwrap();
    let output = unique("fidelity-old-out");
    broker.declare_queue(&output).await.unwrap();
    let dir = plugins_dir(&[("echo", "echo")]);
    let dlq = unique("fidelity-dlq");
    let (app, handle) = crate::host::start_ready(config(
        dir.path(),
        &dlq,
        &format!(
            "[plugin.echo]\nsubscriptions = [{{ queue = \"{}\" }}]",
            unique("fidelity-idle")
        ),
    ))
    .await
    .unwrap();
    let entry = format!(
        r#"{{"exchange":"","routing_key":"{output}","properties":{{"content_type":"text/plain","delivery_mode":2,"message_id":"old-1","headers":[["x-tenant",{{"t":"string","v":"acme"}}],["x-raw",{{"t":"bytes","v":"AP8="}}],["x-n",{{"t":"i32","v":-5}}]]}},"body":"b2xk"}}"#
    );
    let key = handle.spool.stream_key().to_owned();
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("id")
        .arg("old-1")
        .arg("m")
        .arg(&entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("INCRBY")
        .arg(format!("{key}:bytes"))
        .arg(entry.len())
        .query_async(&mut conn)
        .await
        .unwrap();

    let got = broker
        .collect(&output, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "the old entry drained");
    let g = &got[0];
    assert_eq!(g.body, b"old");
    assert_eq!(
        g.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("old-1")
    );
    assert_eq!(
        g.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(g.header_str("x-tenant").as_deref(), Some("acme"));
    assert_eq!(g.header_i64("x-n"), Some(-5));
    assert_eq!(
        g.headers.inner().get("x-raw"),
        Some(&AMQPValue::LongString(LongString::from(vec![0u8, 0xff])))
    );
    app.shutdown().await;
    for q in [&output, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}
