//! `warren run` as a process: configuration errors, SIGTERM under load,
//! and trace export.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warren_it::broker::{Broker, unique};
use warren_it::plugins::wasm;
use warren_it::wait;

/// Run `warren run --config cfg` and wait until it consumes `queue`.
async fn spawn_consuming(cfg: &std::path::Path, broker: &Broker, queue: &str) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait::until_true("warren consuming", Duration::from_secs(30), || async {
        broker.consumer_count(queue).await.unwrap_or(0) == 1
    })
    .await
    .unwrap();
    child
}

fn sigterm(child: &Child) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn a_config_file_with_several_mistakes_reports_them_all_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warren.toml");
    std::fs::write(
        &cfg,
        r#"
        [amqp]
        url = "http://not-amqp"
        heartbeat-secs = "often"
        [dispatch]
        max-attempts = 0
        [admin]
        bind = "0.0.0.0:9090"
        [nonsense]
        key = 1
        "#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "amqp:",
        "dispatch.max-attempts",
        "admin.bind 0.0.0.0:9090",
        "unknown section [nonsense]",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(
        err.contains(cfg.to_str().unwrap()),
        "file not named:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out) = (unique("term-in"), unique("term-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("slow").unwrap(), dir.path().join("slow.wasm")).unwrap();
    std::fs::copy(wasm("echo").unwrap(), dir.path().join("echo.wasm")).unwrap();
    let cfg = dir.path().join("warren.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
            [plugins]
            dir = "{dir}"
            [spool]
            stream-key = "{stream}"
            [dispatch]
            retry-exchange = "{retry}"
            dead-letter-exchange = "{dlx}"
            dead-letter-queue = "{dlq}"
            [shutdown]
            grace-period-ms = 10000
            [admin]
            bind = "127.0.0.1:0"
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}", prefetch = 100 }}]
            config = {{ routing-key = "{echo_out}" }}
            [plugin.slow]
            subscriptions = [{{ queue = "{slow_in}" }}]
            "#,
            dir = dir.path().display(),
            stream = unique("spool"),
            retry = unique("retry"),
            dlx = unique("dlx"),
            dlq = unique("dlq"),
            slow_in = unique("slow-in"),
        ),
    )
    .unwrap();
    let mut child = spawn_consuming(&cfg, &broker, &echo_in).await;

    let n = 20_000;
    let bodies: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    broker.publish_all("", &echo_in, &bodies).await.unwrap();
    // Stop while it is still working through them.
    sigterm(&child);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "warren did not exit within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "clean stop exits 0");

    // Every input is either acked with its output confirmed, or still in
    // its queue.
    let remaining_count = broker.message_count(&echo_in).await.unwrap() as usize;
    let remaining = broker
        .collect(&echo_in, remaining_count, Duration::from_secs(30))
        .await
        .unwrap();
    let out_count = broker.message_count(&echo_out).await.unwrap() as usize;
    let outputs = broker
        .collect(&echo_out, out_count, Duration::from_secs(30))
        .await
        .unwrap();
    let seen: BTreeSet<Vec<u8>> = remaining
        .iter()
        .chain(outputs.iter())
        .map(|g| g.body.clone())
        .collect();
    let missing: Vec<&String> = bodies
        .iter()
        .filter(|b| !seen.contains(b.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "sigterm: {} handled before the stop, {} left in the queue",
        outputs.len(),
        remaining.len()
    );
}

/// A stand-in OTLP/HTTP collector: answers 200 to every request and keeps
/// the bodies.
fn collector() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut len = 0usize;
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    break;
                }
                keep.lock().unwrap().push(body);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        }
    });
    (port, bodies)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_spans_are_exported_over_otlp_with_the_ids_outputs_carry() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out) = (unique("otlp-in"), unique("otlp-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let (port, bodies) = collector();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo").unwrap(), dir.path().join("echo.wasm")).unwrap();
    let cfg = dir.path().join("warren.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
            [plugins]
            dir = "{dir}"
            [spool]
            stream-key = "{stream}"
            [dispatch]
            retry-exchange = "{retry}"
            dead-letter-exchange = "{dlx}"
            dead-letter-queue = "{dlq}"
            [admin]
            bind = "127.0.0.1:0"
            [telemetry]
            otlp-endpoint = "http://127.0.0.1:{port}/v1/traces"
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}" }}]
            config = {{ routing-key = "{echo_out}" }}
            "#,
            dir = dir.path().display(),
            stream = unique("spool"),
            retry = unique("retry"),
            dlx = unique("dlx"),
            dlq = unique("dlq"),
        ),
    )
    .unwrap();
    let mut child = spawn_consuming(&cfg, &broker, &echo_in).await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = format!("00-{trace}-b7ad6b7169203331-01");
    broker
        .publish_all_with(
            "",
            &echo_in,
            ["traced"],
            warren_it::broker::text_header("traceparent", &parent),
        )
        .await
        .unwrap();
    let got = broker
        .collect(&echo_out, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let tp = got[0].header_str("traceparent").unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], trace, "{tp}");
    // SIGTERM flushes the exporter.
    sigterm(&child);
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "warren did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (trace_id, span_id, parent_id) = (
        hex_bytes(trace),
        hex_bytes(parts[2]),
        hex_bytes("b7ad6b7169203331"),
    );
    wait::until_true("span exported", Duration::from_secs(10), || {
        let bodies = bodies.clone();
        let (t, s, p) = (trace_id.clone(), span_id.clone(), parent_id.clone());
        async move {
            bodies
                .lock()
                .unwrap()
                .iter()
                .any(|b| contains(b, &t) && contains(b, &s) && contains(b, &p))
        }
    })
    .await
    .unwrap();
}
