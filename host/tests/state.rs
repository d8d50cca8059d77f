//! Key-value state through a `kill -9` of Warren: `tally` counts 1,000
//! requests (one in ten retried once, one in twenty trapped), Warren is
//! killed mid-run and started again, and every acknowledged request is
//! counted, each at most twice: twice only when Warren died between a
//! delivery's commit and its ack, so the redelivery ran and committed
//! again (at least once, as the contract says). The run reports how many.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command};
use std::time::Duration;

use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::tally::Load;
use warren_it::wait;

const REDIS: &str = "redis://127.0.0.1:6379";

fn start(cfg: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(cfg)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_every_acked_request_is_counted_and_repeats_are_reported() {
    let broker = Broker::shared().await.unwrap();
    let (input, out, dlq) = (
        unique("tally-k9-in"),
        unique("tally-k9-out"),
        unique("tally-k9-dlq"),
    );
    broker.declare_queue(&out).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("tally").unwrap(), dir.path().join("tally.wasm")).unwrap();
    let admin = warren_it::ports::free_port().unwrap();
    let cfg = WarrenToml::isolated(dir.path())
        .own_spool_stream()
        .admin_bind(format!("127.0.0.1:{admin}"))
        .subscribe("tally", &input)
        .set("plugin.tally.config.routing-key", out.as_str())
        .quick_retries(3)
        .dead_letters_to(&dlq)
        .write_in(dir.path())
        .unwrap();
    let log = dir.path().join("warren.log");
    let load = Load::new(1000, None);
    let mut warren = start(&cfg, &log);
    let consumes = wait::until_true("warren consumes", Duration::from_secs(60), || async {
        broker.consumer_count(&input).await.unwrap_or(0) == 1
    })
    .await;
    if let Err(e) = consumes {
        let _ = warren.kill();
        panic!(
            "{e}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    broker.publish_all("", &input, load.bodies()).await.unwrap();
    let counted = |at_least: usize| {
        let load = &load;
        async move {
            wait::until_true(
                &format!("{at_least} requests counted"),
                Duration::from_secs(120),
                || async { load.counts(REDIS).await.map(|c| c.len()).unwrap_or(0) >= at_least },
            )
            .await
        }
    };
    if let Err(e) = counted(load.n / 4).await {
        let _ = warren.kill();
        panic!(
            "{e}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    warren.kill().unwrap();
    warren.wait().unwrap();
    let at_kill = load.counts(REDIS).await.unwrap().len();

    let mut warren = start(&cfg, &log);
    let expected = load.expected();
    let done = wait::until(
        "every acked request counted",
        Duration::from_secs(180),
        || async {
            let c = load.counts(REDIS).await.ok()?;
            let input_empty = broker.message_count(&input).await.ok()? == 0;
            (input_empty && expected.keys().all(|k| c.contains_key(k))).then_some(c)
        },
    )
    .await;
    let dead = broker
        .collect(&dlq, load.trapped(), Duration::from_secs(60))
        .await
        .unwrap();
    warren_it::process::signal(&warren, "TERM").unwrap();
    let _ = wait::until_true("warren exits", Duration::from_secs(30), || {
        let exited = warren.try_wait().ok().flatten().is_some();
        async move { exited }
    })
    .await;
    let _ = warren.kill();
    for q in [&input, &out, &dlq] {
        let _ = broker.delete_queue(q).await;
    }
    let _ = broker.delete_queue("tally.out").await;
    load.cleanup(REDIS).await;

    let counts = done.unwrap_or_else(|e| {
        panic!(
            "{e}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(
        counts.keys().all(|k| expected.contains_key(k)),
        "a trapped request was counted"
    );
    assert!(counts.values().all(|v| (1..=2).contains(v)), "{counts:?}");
    let twice = counts.values().filter(|v| **v == 2).count();
    let total: i64 = counts.values().sum();
    eprintln!(
        "kill -9 after {at_kill} of {} acked requests were counted; after the restart all {} are, \
         total count {total}: {twice} counted twice (committed, then Warren died before the ack, \
         and the redelivery committed again); {} trapped, none counted",
        load.acked(),
        load.acked(),
        dead.len()
    );
    assert_eq!(total, load.acked() as i64 + twice as i64);
    assert_eq!(dead.len(), load.trapped());
}
