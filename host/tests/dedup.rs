//! Effectively once through a crash at each step of a deduplicated
//! delivery (DESIGN.md §10): Warren is started with `CRASH_AT`
//! naming a crash point (compiled in for these tests only), dies there as
//! `kill -9` would, and is started again without it. Per point, what the
//! design promises: the plugin runs again only when Warren died before the
//! journal record was written; the increment counts once whatever; the
//! output exists, twice (with one message id) only when Warren died after
//! publishing it and before marking the key done.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::wait;

const REDIS: &str = "redis://127.0.0.1:6379";

fn start(cfg: &std::path::Path, log: &std::path::Path, crash_at: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env_remove("CRASH_AT")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(point) = crash_at {
        cmd.env("CRASH_AT", point);
    }
    cmd.spawn().unwrap()
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The values of `warren:dedup:<queue>:*`.
async fn records(queue: &str) -> Vec<Vec<u8>> {
    let mut c = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("warren:dedup:{queue}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
        out.extend(v);
        let _: () = redis::cmd("DEL").arg(&k).query_async(&mut c).await.unwrap();
    }
    out
}

/// `name{...queue="<queue>"...}` summed from a `/metrics` text.
fn metric(text: &str, name: &str, queue: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(&format!("queue=\"{queue}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(admin: u16) -> Option<String> {
    let addr = format!("127.0.0.1:{admin}").parse().ok()?;
    let r = warren_it::http::request(addr, "GET", "/metrics", &[], None)
        .await
        .ok()?;
    (r.status == 200).then(|| r.text())
}

/// What one crash left behind, once the restarted Warren settled the
/// message.
#[derive(Debug)]
struct After {
    /// Output copies, by message id.
    outputs: BTreeMap<String, usize>,
    count: i64,
    /// Of the restarted process.
    invoked: f64,
    replayed: f64,
    skipped: f64,
    calls: Vec<String>,
}

/// Run `plugin` on a deduplicated route with Warren crashing at `point`
/// on the first delivery, restart it, and report.
async fn crash_at(point: &str, plugin: &str, api: Option<&str>) -> After {
    let broker = Broker::shared().await.unwrap();
    let (input, out) = (unique("dedup-crash-in"), unique("dedup-crash-out"));
    broker.declare_queue(&out).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        wasm(plugin).unwrap(),
        dir.path().join(format!("{plugin}.wasm")),
    )
    .unwrap();
    let admin = warren_it::ports::free_port().unwrap();
    let mut cfg = WarrenToml::isolated(dir.path())
        .own_spool_stream()
        .admin_bind(format!("127.0.0.1:{admin}"))
        .subscribe(plugin, &input)
        .set(&format!("plugin.{plugin}.config.routing-key"), out.as_str())
        .merge(&format!(
            "[plugin.{plugin}]\ndedup = {{ key = \"message-id\" }}\n"
        ));
    if let Some(port) = api {
        cfg = cfg
            .merge("[plugins.runtime.outbound-hosts]\n\"api.test\" = \"127.0.0.1\"\n")
            .set(
                &format!("plugin.{plugin}.allow-outbound"),
                vec![format!("http://api.test:{port}")],
            );
    }
    let cfg = cfg.write_in(dir.path()).unwrap();
    let log = dir.path().join("warren.log");
    let show = || std::fs::read_to_string(&log).unwrap_or_default();
    let key = unique("crash-key");
    let body = match api {
        Some(port) => format!("http://api.test:{port}/pay"),
        None => format!("{{\"key\": \"{key}\"}}"),
    };

    let mut first = start(&cfg, &log, Some(point));
    let consumes = wait::until_true("warren consumes", Duration::from_secs(60), || async {
        broker.consumer_count(&input).await.unwrap_or(0) == 1
    })
    .await;
    assert!(consumes.is_ok(), "{consumes:?}; log:\n{}", show());
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id("order-1".into());
    broker
        .publish_with_properties("", &input, body.as_bytes(), props)
        .await
        .unwrap();
    let died = wait::until(
        "warren dies at the crash point",
        Duration::from_secs(60),
        || {
            let status = first.try_wait().ok().flatten();
            async move { status }
        },
    )
    .await;
    let status = died.unwrap_or_else(|e| {
        let _ = first.kill();
        panic!("{e}; log:\n{}", show())
    });
    assert!(!status.success(), "{status:?}");

    let mut second = start(&cfg, &log, None);
    let settled = wait::until(
        "the restarted warren settles the message",
        Duration::from_secs(90),
        || async {
            let text = scrape(admin).await?;
            let n = metric(&text, "warren_handle_seconds_count", &input)
                + metric(&text, "warren_dedup_replayed_total", &input)
                + metric(&text, "warren_dedup_skipped_total", &input);
            let empty = broker.message_count(&input).await.ok()? == 0;
            let done = {
                let mut c = redis().await;
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("warren:dedup:{input}:*"))
                    .query_async(&mut c)
                    .await
                    .ok()?;
                let mut all = !keys.is_empty();
                for k in keys {
                    let v: Option<Vec<u8>> =
                        redis::cmd("GET").arg(&k).query_async(&mut c).await.ok()?;
                    all &= v.as_deref() == Some(b"1".as_slice());
                }
                all
            };
            (n >= 1.0 && empty && done).then_some(text)
        },
    )
    .await;
    let text = settled.unwrap_or_else(|e| {
        let _ = second.kill();
        panic!("{e}; log:\n{}", show())
    });
    let got = broker
        .collect(&out, 3, Duration::from_secs(3))
        .await
        .unwrap();
    warren_it::process::signal(&second, "TERM").unwrap();
    let _ = wait::until_true("warren exits", Duration::from_secs(30), || {
        let exited = second.try_wait().ok().flatten().is_some();
        async move { exited }
    })
    .await;
    let _ = second.kill();
    let _ = broker.delete_queue(&input).await;
    let _ = broker.delete_queue(&out).await;
    let _ = broker.delete_queue(&format!("{plugin}.out")).await;
    records(&input).await;
    let mut c = redis().await;
    let count: Option<i64> = redis::cmd("GET")
        .arg(format!("warren:kv:tally:count:{key}"))
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("warren:kv:tally:count:{key}"))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut outputs = BTreeMap::new();
    for g in &got {
        let id = g
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        *outputs.entry(id).or_insert(0) += 1;
    }
    After {
        outputs,
        count: count.unwrap_or(0),
        invoked: metric(&text, "warren_handle_seconds_count", &input),
        replayed: metric(&text, "warren_dedup_replayed_total", &input),
        skipped: metric(&text, "warren_dedup_skipped_total", &input),
        calls: Vec::new(),
    }
}

fn one_output(a: &After, copies: usize) {
    assert_eq!(a.outputs.len(), 1, "one output message: {a:?}");
    assert_eq!(a.outputs.values().next(), Some(&copies), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_after_invoking_runs_the_plugin_again_and_counts_once() {
    let a = crash_at("dedup-invoked", "tally", None).await;
    eprintln!("dedup-invoked: {a:?}");
    assert_eq!(
        a.invoked, 1.0,
        "nothing was journalled: the plugin runs again"
    );
    one_output(&a, 1);
    assert_eq!(a.count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_after_journalling_replays_without_running_the_plugin() {
    let a = crash_at("dedup-journalled", "tally", None).await;
    eprintln!("dedup-journalled: {a:?}");
    assert_eq!((a.invoked, a.replayed), (0.0, 1.0), "{a:?}");
    one_output(&a, 1);
    assert_eq!(a.count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_after_publishing_republishes_the_same_message_and_counts_once() {
    let a = crash_at("dedup-published", "tally", None).await;
    eprintln!("dedup-published: {a:?}");
    assert_eq!((a.invoked, a.replayed), (0.0, 1.0), "{a:?}");
    one_output(&a, 2);
    assert_eq!(a.count, 1, "the writes apply once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_after_completing_acks_the_redelivery_unprocessed() {
    let a = crash_at("dedup-completed", "tally", None).await;
    eprintln!("dedup-completed: {a:?}");
    assert_eq!((a.invoked, a.skipped), (0.0, 1.0), "{a:?}");
    one_output(&a, 1);
    assert_eq!(a.count, 1);
}

/// An HTTP server that answers 200 and records each request's
/// `Idempotency-Key`.
fn recording_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = keys.clone();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().flatten() {
            let mut buf = [0u8; 8192];
            let n = sock.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let key = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("idempotency-key")
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default();
            seen.lock().unwrap().push(key);
            let _ = sock.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npaid",
            );
        }
    });
    (port, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_calls_the_api_with_the_same_idempotency_key() {
    let (port, keys) = recording_server();
    let mut a = crash_at("dedup-invoked", "caller", Some(&port.to_string())).await;
    a.calls = keys.lock().unwrap().clone();
    eprintln!("caller, dedup-invoked: {a:?}");
    assert_eq!(a.calls.len(), 2, "the plugin ran twice: {a:?}");
    assert!(
        !a.calls[0].is_empty(),
        "the call carries an Idempotency-Key: {a:?}"
    );
    assert_eq!(a.calls[0], a.calls[1], "the same key both times: {a:?}");
    one_output(&a, 1);
}
