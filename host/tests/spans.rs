//! The spans `warren run` exports over OTLP/HTTP, decoded by a stand-in
//! collector: OpenTelemetry's messaging conventions (`process <queue>`
//! CONSUMER, `publish <exchange>` PRODUCER per output), parent and child,
//! the link from a spool drain's publish to the span that spooled it, an
//! error status for a trap, `tracestate`, and the resource
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `service.version`,
//! `service.instance.id`).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::trace::v1::Span;
use warren_it::broker::{Broker, text_header, unique};
use warren_it::config::WarrenToml;
use warren_it::otlp::{Collector, SpanKind, StatusCode, attribute, hex};
use warren_it::plugins::wasm;
use warren_it::process::signal;
use warren_it::wait;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";
const TRACESTATE: &str = "vendor=opaque-value";

fn attr(span: &Span, key: &str) -> Option<String> {
    attribute(&span.attributes, key)
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

async fn admin_status(port: u16) -> serde_json::Value {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match warren_it::http::request(addr, "GET", "/status", &[], None).await {
        Ok(r) => r.json().unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

fn stop(child: &mut Child) {
    signal(child, "TERM").unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "warren did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_the_messaging_conventions_through_the_spool() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out, panic_in, parked, dlq) = (
        unique("spans-in"),
        unique("spans-out"),
        unique("spans-panic"),
        unique("spans-parked"),
        unique("dlq"),
    );
    for q in [&echo_out, &parked] {
        broker.declare_queue(q).await.unwrap();
    }
    let collector = Collector::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for p in ["echo", "panic"] {
        std::fs::copy(wasm(p).unwrap(), dir.path().join(format!("{p}.wasm"))).unwrap();
    }
    let stream = format!("warren:spool:it-spans-{}", uuid::Uuid::new_v4().simple());
    let admin = warren_it::ports::free_port().unwrap();
    let cfg = WarrenToml::isolated(dir.path())
        .stream_key(&stream)
        .set("spool.host-id", "spans-test-host")
        .dead_letters_to(&dlq)
        .admin_bind(format!("127.0.0.1:{admin}"))
        .echo(&echo_in, &echo_out)
        .subscribe("panic", &panic_in)
        .write_in(dir.path())
        .unwrap();

    // Hold the spool's drain lease and leave an entry in the stream: the
    // outbox keeps order behind a waiting entry, so the delivery's output
    // goes through the spool, and is drained once the lease is released.
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut r = redis.get_multiplexed_async_connection().await.unwrap();
    let lock = format!("{stream}:drain-lock");
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("spans-test")
        .arg("PX")
        .arg(120_000)
        .query_async(&mut r)
        .await
        .unwrap();
    let first = warren::message::OutboundMessage::new("", parked.as_str(), "first");
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("id")
        .arg(uuid::Uuid::now_v7().to_string())
        .arg("m")
        .arg(serde_json::to_vec(&first).unwrap())
        .query_async(&mut r)
        .await
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", collector.port),
        )
        .env("OTEL_SERVICE_NAME", "orders-host")
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test",
        )
        .spawn()
        .unwrap();
    wait::until_true(
        "warren sees the waiting entry",
        Duration::from_secs(60),
        || async {
            let s = admin_status(admin).await;
            s["spool"]["depth"].as_u64().unwrap_or(0) >= 1
                && broker.consumer_count(&echo_in).await.unwrap_or(0) == 1
                && broker.consumer_count(&panic_in).await.unwrap_or(0) == 1
        },
    )
    .await
    .unwrap();

    broker
        .publish_all_with("", &echo_in, ["traced"], {
            let mut h = text_header("traceparent", &format!("00-{TRACE}-{PARENT}-01"));
            h.insert(
                "tracestate".into(),
                lapin::types::AMQPValue::LongString(TRACESTATE.into()),
            );
            h
        })
        .await
        .unwrap();
    broker.publish_all("", &panic_in, ["boom"]).await.unwrap();
    wait::until_true(
        "the output and the dead letter spooled",
        Duration::from_secs(30),
        || async {
            admin_status(admin).await["spool"]["depth"]
                .as_u64()
                .unwrap_or(0)
                >= 3
        },
    )
    .await
    .unwrap();
    assert_eq!(
        broker.message_count(&echo_out).await.unwrap(),
        0,
        "still in the spool"
    );

    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut r)
        .await
        .unwrap();
    let got = broker
        .collect(&echo_out, 1, Duration::from_secs(60))
        .await
        .unwrap();
    broker
        .collect(&dlq, 1, Duration::from_secs(30))
        .await
        .unwrap();
    broker
        .collect(&parked, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let traceparent = got[0].header_str("traceparent").unwrap().to_owned();
    let out_ids: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(out_ids[1], TRACE, "{traceparent}");
    assert_eq!(
        got[0].header_str("tracestate").as_deref(),
        Some(TRACESTATE),
        "tracestate carried"
    );

    // SIGTERM flushes the exporter.
    stop(&mut child);
    let all = wait::until("spans exported", Duration::from_secs(20), || async {
        let spans = collector.spans().unwrap();
        let drained = spans
            .iter()
            .filter(|(_, s)| attr(s, "warren.placement").as_deref() == Some("drained"))
            .count();
        // The parked entry, the output and the dead letter.
        (drained >= 3).then_some(spans)
    })
    .await
    .unwrap();
    let (resource, _) = &all[0];
    let res = |k| attribute(&resource.attributes, k);
    assert_eq!(res("service.name").as_deref(), Some("orders-host"));
    assert_eq!(res("deployment.environment.name").as_deref(), Some("test"));
    assert_eq!(
        res("service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        res("service.instance.id").as_deref(),
        Some("spans-test-host")
    );
    let spans: Vec<Span> = all.into_iter().map(|(_, s)| s).collect();

    // The delivery: `process <queue>`, CONSUMER, a child of the incoming
    // traceparent, with the conventions' attributes and the tracestate.
    let process = named(&spans, &format!("process {echo_in}"));
    assert_eq!(process.len(), 1, "{spans:#?}");
    let process = process[0];
    assert_eq!(process.kind, SpanKind::Consumer as i32);
    assert_eq!(hex(&process.trace_id), TRACE);
    assert_eq!(hex(&process.parent_span_id), PARENT);
    assert_eq!(process.trace_state, TRACESTATE);
    for (key, want) in [
        ("messaging.system", "rabbitmq"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", echo_in.as_str()),
        (
            "messaging.rabbitmq.destination.routing_key",
            echo_in.as_str(),
        ),
        ("warren.plugin.name", "echo"),
        ("warren.plugin.version", "0.1.0"),
    ] {
        assert_eq!(
            attr(process, key).as_deref(),
            Some(want),
            "{key}: {process:#?}"
        );
    }
    assert!(attr(process, "messaging.rabbitmq.message.delivery_tag").is_some());
    assert_ne!(
        process.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    // Its output: `publish amq.default`, PRODUCER, a child of the delivery,
    // placed in the spool; the output carries this span's context.
    let publishes = named(&spans, "publish amq.default");
    let spooled: Vec<&&Span> = publishes
        .iter()
        .filter(|s| s.parent_span_id == process.span_id)
        .collect();
    assert_eq!(spooled.len(), 1, "{publishes:#?}");
    let spooled = spooled[0];
    assert_eq!(spooled.kind, SpanKind::Producer as i32);
    assert_eq!(hex(&spooled.trace_id), TRACE);
    assert_eq!(attr(spooled, "warren.placement").as_deref(), Some("spool"));
    assert_eq!(
        attr(spooled, "messaging.destination.name").as_deref(),
        Some("")
    );
    assert_eq!(
        attr(spooled, "messaging.rabbitmq.destination.routing_key").as_deref(),
        Some(echo_out.as_str())
    );
    assert_eq!(
        hex(&spooled.span_id),
        out_ids[2],
        "the output's traceparent is its publish span"
    );

    // The drain: a PRODUCER span of its own, linked to the spooled publish.
    let drain: Vec<&&Span> = publishes
        .iter()
        .filter(|s| attr(s, "warren.placement").as_deref() == Some("drained"))
        .filter(|s| {
            s.links
                .iter()
                .any(|l| l.span_id == spooled.span_id && l.trace_id == spooled.trace_id)
        })
        .collect();
    assert_eq!(drain.len(), 1, "{publishes:#?}");
    assert_eq!(drain[0].kind, SpanKind::Producer as i32);
    assert!(drain[0].parent_span_id.is_empty(), "a root of its own");

    // The trap: error status and error.type on its process span.
    let trapped = named(&spans, &format!("process {panic_in}"));
    assert_eq!(trapped.len(), 1, "{spans:#?}");
    let status = trapped[0].status.clone().unwrap_or_default();
    assert_eq!(status.code, StatusCode::Error as i32, "{:#?}", trapped[0]);
    assert_eq!(
        attr(trapped[0], "error.type").as_deref(),
        Some("trap_panic")
    );

    for q in [&echo_in, &echo_out, &panic_in, &parked, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut r)
        .await
        .unwrap();
}
