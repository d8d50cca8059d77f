//! Hot reload through the admin API: a new version under steady load
//! loses nothing and handles nothing twice, and a broken file leaves the
//! old version serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use warren_it::broker::{Broker, unique};
use warren_it::plugins::wasm;
use warren_it::wait;

use crate::admin::{config, get, plugins_dir, send, start_ready};

/// Publish numbered messages to `queue` at about `rate` per second until
/// `stop`; `sent` counts the confirmed ones (numbers 0..sent), `begun` is
/// one past the highest number handed to the broker so far (so every
/// number at or above a value read from it is published later).
async fn publish_steadily(
    queue: String,
    rate: u64,
    sent: Arc<AtomicU64>,
    begun: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let broker = Broker::shared().await?;
    let batch = 50u64;
    let tick = Duration::from_micros(1_000_000 * batch / rate);
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let first = sent.load(Ordering::SeqCst);
        begun.store(first + batch, Ordering::SeqCst);
        let bodies: Vec<String> = (first..first + batch).map(|i| i.to_string()).collect();
        broker.publish_all("", &queue, &bodies).await?;
        sent.fetch_add(batch, Ordering::SeqCst);
        next += tick;
        // Pacing, not synchronisation.
        tokio::time::sleep_until(next.into()).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_under_load_loses_nothing_and_takes_every_later_message() {
    let broker = Broker::shared().await.unwrap();
    let (stamp_in, stamp_out) = (unique("stamp-in"), unique("stamp-out"));
    broker.declare_queue(&stamp_out).await.unwrap();
    let dir = plugins_dir(&[("stamp", "stamp")]);
    let dlq = unique("dlq");
    let cfg = config(
        dir.path(),
        &dlq,
        &format!(
            r#"
            [plugin.stamp]
            subscriptions = [{{ queue = "{stamp_in}", prefetch = 200 }}]
            config = {{ routing-key = "{stamp_out}" }}
            "#
        ),
    );
    let w = start_ready(cfg).await;

    let sent = Arc::new(AtomicU64::new(0));
    let begun = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_steadily(
        stamp_in.clone(),
        5_000,
        sent.clone(),
        begun.clone(),
        stop.clone(),
    ));
    wait::until_true("load running", Duration::from_secs(30), || async {
        sent.load(Ordering::SeqCst) >= 5_000
    })
    .await
    .unwrap();

    let v2 = std::fs::read(wasm("stamp-v2").unwrap()).unwrap();
    let r = send(w.addr, "PUT", "/plugins/stamp", Some(&v2)).await;
    // Every message numbered from here on is published after the swap
    // (the batch in flight during the request may be handled by either).
    let swapped_at = begun.load(Ordering::SeqCst);
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json().unwrap();
    assert_eq!(report["replaced"][0]["from_version"], "1.0.0", "{report}");
    assert_eq!(report["replaced"][0]["to_version"], "2.0.0", "{report}");
    assert_eq!(report["routes_restarted"], serde_json::json!([]));

    wait::until_true(
        "more load after the swap",
        Duration::from_secs(30),
        || async { sent.load(Ordering::SeqCst) >= swapped_at + 5_000 },
    )
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap().unwrap();
    let total = sent.load(Ordering::SeqCst);

    let got = broker
        .collect(&stamp_out, total as usize, Duration::from_secs(120))
        .await
        .unwrap();
    let mut by_number: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for g in &got {
        let n: u64 = String::from_utf8_lossy(&g.body).parse().unwrap();
        by_number
            .entry(n)
            .or_default()
            .push(g.header_str("x-stamp-version").unwrap());
    }
    let twice: Vec<_> = by_number.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "handled twice: {:?}",
        &twice[..twice.len().min(10)]
    );
    assert_eq!(got.len() as u64, total, "every message handled once");
    assert_eq!(by_number.len() as u64, total);
    let old = by_number.values().filter(|v| v[0] == "1.0.0").count();
    let late_old: Vec<u64> = by_number
        .iter()
        .filter(|(n, v)| **n >= swapped_at && v[0] != "2.0.0")
        .map(|(n, _)| *n)
        .collect();
    assert!(
        late_old.is_empty(),
        "after the swap, only 2.0.0: {late_old:?}"
    );
    assert!(old > 0, "1.0.0 served before the swap");
    assert_eq!(broker.message_count(&dlq).await.unwrap(), 0);
    let status = get(w.addr, "/status").await.json().unwrap();
    assert_eq!(status["plugins"][0]["version"], "2.0.0");
    assert_eq!(status["routes"][0]["version"], "2.0.0");
    w.app.shutdown().await;
    assert_eq!(broker.message_count(&stamp_in).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_is_reported_and_the_old_version_keeps_serving() {
    let broker = Broker::shared().await.unwrap();
    let (stamp_in, stamp_out) = (unique("stamp-in"), unique("stamp-out"));
    broker.declare_queue(&stamp_out).await.unwrap();
    let dir = plugins_dir(&[("stamp", "stamp")]);
    let cfg = config(
        dir.path(),
        &unique("dlq"),
        &format!(
            r#"
            [plugin.stamp]
            subscriptions = [{{ queue = "{stamp_in}" }}]
            config = {{ routing-key = "{stamp_out}" }}
            "#
        ),
    );
    let w = start_ready(cfg).await;
    let v2 = std::fs::read(wasm("stamp-v2").unwrap()).unwrap();
    let file = dir.path().join("stamp.wasm");
    std::fs::write(&file, &v2[..v2.len() / 2]).unwrap();

    let r = send(w.addr, "POST", "/plugins/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json().unwrap();
    assert_eq!(report["replaced"], serde_json::json!([]), "{report}");
    assert_eq!(report["removed"], serde_json::json!([]), "{report}");
    let failed = &report["failed"][0];
    assert!(
        failed["file"].as_str().unwrap().ends_with("stamp.wasm"),
        "{report}"
    );
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("stamp.wasm"), "names the file: {err}");
    assert!(err.contains("invalid component"), "says why: {err}");

    let got = broker
        .publish_and_collect_one(&stamp_in, "after", &stamp_out, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].header_str("x-stamp-version").as_deref(),
        Some("1.0.0")
    );
    let status = get(w.addr, "/status").await.json().unwrap();
    assert_eq!(status["plugins"][0]["version"], "1.0.0");
    assert!(
        status["failed_plugins"][0]["error"]
            .as_str()
            .unwrap()
            .contains("invalid component")
    );
    assert_eq!(get(w.addr, "/ready").await.status, 200);

    // A component that needs more memory than its limit to start: refused
    // by reload and by upload, naming both numbers; 1.0.0 keeps serving.
    let big = std::fs::read(wasm("big-floor").unwrap()).unwrap();
    std::fs::write(&file, &big).unwrap();
    let report = send(w.addr, "POST", "/plugins/reload", None)
        .await
        .json()
        .unwrap();
    let err = report["failed"][0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("needs at least 3.1 MiB of memory to start; its limit is 2.0 MiB"),
        "{report}"
    );
    let r = send(w.addr, "PUT", "/plugins/big-floor", Some(&big)).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("its limit is 2.0 MiB"), "{}", r.text());
    let status = get(w.addr, "/status").await.json().unwrap();
    assert_eq!(status["plugins"][0]["version"], "1.0.0", "{status}");

    // Fixing the file then replaces it.
    std::fs::write(&file, &v2).unwrap();
    let r = send(w.addr, "POST", "/plugins/reload", None).await;
    let report = r.json().unwrap();
    assert_eq!(report["replaced"][0]["to_version"], "2.0.0", "{report}");
    assert_eq!(report["failed"], serde_json::json!([]));

    // Rolling back to 1.0.0 by upload (kept compiled since it served).
    let v1 = std::fs::read(wasm("stamp").unwrap()).unwrap();
    let r = send(w.addr, "PUT", "/plugins/stamp", Some(&v1)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["replaced"][0]["to_version"], "1.0.0");
    broker
        .publish_all("", &stamp_in, ["rolled back"])
        .await
        .unwrap();
    let got = broker
        .collect(&stamp_out, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        got[0].header_str("x-stamp-version").as_deref(),
        Some("1.0.0")
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        v1,
        "the file holds the upload"
    );
    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_the_directory_reloads_a_replaced_file() {
    let stamp_in = unique("stamp-in");
    let dir = plugins_dir(&[("stamp", "stamp")]);
    let mut cfg = config(
        dir.path(),
        &unique("dlq"),
        &format!(
            r#"
            [plugin.stamp]
            subscriptions = [{{ queue = "{stamp_in}" }}]
            "#
        ),
    );
    cfg.plugins.watch_ms = 100;
    let w = start_ready(cfg).await;
    let tmp = dir.path().join("stamp.tmp");
    std::fs::copy(wasm("stamp-v2").unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.path().join("stamp.wasm")).unwrap();
    wait::until_true("2.0.0 serving", Duration::from_secs(30), || async {
        w.handle
            .dispatcher
            .route_info()
            .first()
            .is_some_and(|r| r.version == "2.0.0")
    })
    .await
    .unwrap();
    w.app.shutdown().await;
}
