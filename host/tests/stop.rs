//! `warren run` stops within one grace period, however much is in flight:
//! each phase of the stop waits until the same deadline.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren_it::broker::{Broker, unique};
use warren_it::plugins::wasm;
use warren_it::wait;

/// How often the test looks whether the process has ended.
const POLL: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_deliveries_that_cannot_finish_ends_within_the_grace_period() {
    let broker = Broker::shared().await.unwrap();
    let queue = unique("stop-in");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("slow").unwrap(), dir.path().join("slow.wasm")).unwrap();
    let cfg = dir.path().join("warren.toml");
    // Each delivery takes 20 s of guest time (its deadline is 30 s); four
    // are in flight at once, and the grace period is 2 s.
    std::fs::write(
        &cfg,
        format!(
            r#"
            [plugins]
            dir = "{dir}"
            [spool]
            stream-key = "{stream}"
            [admin]
            bind = "127.0.0.1:0"
            [shutdown]
            grace-period-ms = 2000
            [plugin.slow]
            subscriptions = [{{ queue = "{queue}", prefetch = 4 }}]
            limits = {{ deadline-ms = 30000, max-concurrency = 4 }}
            config = {{ millis = 20000 }}
            "#,
            dir = dir.path().display(),
            stream = unique("spool"),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait::until_true("warren consuming", Duration::from_secs(30), || async {
        broker.consumer_count(&queue).await.unwrap_or(0) == 1
    })
    .await
    .unwrap();
    let n = 12;
    let bodies: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    broker.publish_all("", &queue, &bodies).await.unwrap();
    // Four deliveries taken (the prefetch), the rest ready.
    wait::until_true("deliveries in flight", Duration::from_secs(30), || async {
        broker.message_count(&queue).await.unwrap_or(0) == n - 4
    })
    .await
    .unwrap();

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "warren did not exit"
        );
        tokio::time::sleep(POLL).await;
    };
    let took = stopping.elapsed();
    assert_eq!(status.code(), Some(0), "a stop at the deadline exits 0");
    assert!(
        took <= Duration::from_secs(2) + POLL,
        "the stop took {took:?}, more than the 2 s grace period and one poll"
    );
    eprintln!("stop: ended {took:?} after SIGTERM");
    // The four unfinished deliveries were never acked: the broker has every
    // message back.
    wait::until_true("all messages back", Duration::from_secs(30), || async {
        broker.message_count(&queue).await.unwrap_or(0) == n
    })
    .await
    .unwrap();
    broker.delete_queue(&queue).await.unwrap();
}
