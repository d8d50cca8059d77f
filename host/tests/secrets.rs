//! A secret given to a plugin as `{ file = .. }` reaches it (through
//! `wasi:config/store`, while it makes a granted outbound call) and appears
//! nowhere Warren shows things: `/config`, `/status`, `/plugins`,
//! `warren config`, the process's logs at debug level, or the spans it
//! exports.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_it::broker::Broker;
use warren_it::config::WarrenToml;
use warren_it::otlp::Collector;
use warren_it::plugins::wasm;
use warren_it::process::signal;
use warren_it::wait;

const SECRET: &str = "s3cr3t-7Hq9-from-file";

/// Answers every request with 200 `pong`.
async fn server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong")
                    .await;
            });
        }
    });
    port
}

async fn admin_get(port: u16, path: &str) -> String {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    warren_it::http::request(addr, "GET", path, &[], None)
        .await
        .map(|r| r.text())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_secret_reaches_the_plugin_and_is_shown_nowhere() {
    let broker = Broker::shared().await.unwrap();
    let input = warren_it::broker::unique("secret-in");
    let out = warren_it::broker::unique("secret-out");
    broker.declare_queue(&out).await.unwrap();
    let http_port = server().await;
    let collector = Collector::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("caller").unwrap(), dir.path().join("caller.wasm")).unwrap();
    let secret_file = dir.path().join("token");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let admin = warren_it::ports::free_port().unwrap();
    let stream = format!("warren:spool:it-secrets-{}", uuid::Uuid::new_v4().simple());
    let cfg = WarrenToml::isolated(dir.path())
        .stream_key(&stream)
        .admin_bind(format!("127.0.0.1:{admin}"))
        .subscribe("caller", &input)
        .merge(&format!(
            "[plugins.runtime]\noutbound-hosts = {{ \"api.test\" = \"127.0.0.1\" }}\n\
             [plugin.caller]\nallow-outbound = [\"http://api.test:{http_port}\"]\n\
             config = {{ token = {{ file = {:?} }}, routing-key = \"{out}\" }}\n",
            secret_file.display()
        ))
        .write_in(dir.path())
        .unwrap();
    let log = std::fs::File::create(dir.path().join("warren.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "debug")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", collector.port),
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let log_path = dir.path().join("warren.log");
    let consumes = wait::until_true("warren consumes", Duration::from_secs(60), || async {
        broker.consumer_count(&input).await.unwrap_or(0) == 1
    })
    .await;
    if let Err(e) = consumes {
        let _ = child.kill();
        panic!(
            "{e}; warren's log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    broker
        .publish_all("", &input, [format!("http://api.test:{http_port}/ok")])
        .await
        .unwrap();
    let got = broker
        .collect(&out, 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"pong");
    assert_eq!(
        got[0].header_str("x-token-length").as_deref(),
        Some(SECRET.len().to_string().as_str()),
        "the secret reached the plugin"
    );

    let mut shown = Vec::new();
    for path in ["/config", "/status", "/plugins"] {
        let text = admin_get(admin, path).await;
        assert!(!text.is_empty(), "{path} answered");
        shown.push((path.to_string(), text));
    }
    let config = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["config", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let config_text = String::from_utf8_lossy(&config.stdout).into_owned();
    assert!(
        config_text.contains(&secret_file.display().to_string()),
        "warren config shows the reference: {config_text}"
    );
    shown.push(("warren config".into(), config_text));

    signal(&child, "TERM").unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "warren did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let spans = wait::until("spans exported", Duration::from_secs(20), || async {
        let spans = collector.spans().unwrap();
        (!spans.is_empty()).then_some(spans)
    })
    .await
    .unwrap();
    assert!(
        spans.iter().any(|(_, s)| s.name == "GET"),
        "the outbound call has its span: {:?}",
        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
    shown.push(("spans".into(), format!("{spans:?}")));
    let logs = std::fs::read_to_string(dir.path().join("warren.log")).unwrap();
    assert!(!logs.is_empty());
    shown.push(("logs".into(), logs));

    for (where_, text) in &shown {
        assert!(!text.contains(SECRET), "the secret shows in {where_}");
    }
    broker.delete_queue(&out).await.unwrap();
    broker.delete_queue(&input).await.unwrap();
}
